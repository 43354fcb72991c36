//! Lobby chat kept in the database: written in batches by one task, read back on start.

use shared::hub::{ChatLine, UserSummary};
use tokio::sync::mpsc;

use crate::db::Db;

/// Chat lines waiting to be written; when full, new lines are refused as "busy".
const QUEUE: usize = 4096;
/// Most lines written in one transaction.
const BATCH: usize = 256;

struct Record {
    lobby: usize,
    user_id: i64,
    body: String,
    sent_at: i64,
}

/// The sending side of the chat writer.
pub struct ChatLog {
    tx: mpsc::Sender<Record>,
}

impl ChatLog {
    /// Starts the writer task; it ends, after writing everything queued, when `ChatLog` drops.
    pub fn start(db: Db) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        (Self { tx }, tokio::spawn(write(db, rx)))
    }

    /// Queues a line for writing; `false` when the queue is full.
    pub fn append(&self, user_id: i64, lobby: usize, line: &ChatLine) -> bool {
        let record = Record { lobby, user_id, body: line.text.clone(), sent_at: line.at_ms };
        self.tx.try_send(record).is_ok()
    }
}

async fn write(db: Db, mut rx: mpsc::Receiver<Record>) {
    let mut batch = Vec::with_capacity(BATCH);
    while rx.recv_many(&mut batch, BATCH).await > 0 {
        if let Err(e) = write_batch(&db, &batch).await {
            tracing::error!(error = %e, lines = batch.len(), "could not store chat lines");
        }
        batch.clear();
    }
}

async fn write_batch(db: &Db, batch: &[Record]) -> Result<(), sqlx::Error> {
    let mut tx = crate::db::begin_write(db).await?;
    for r in batch {
        sqlx::query("INSERT INTO chat_messages (lobby, user_id, body, sent_at) VALUES ($1, $2, $3, $4)")
            .bind(r.lobby as i64)
            .bind(r.user_id)
            .bind(&r.body)
            .bind(r.sent_at)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await
}

/// Lobbies beyond this many are not given their history back after a restart.
const MAX_LOBBIES_RESTORED: i64 = 1000;

/// The last `n` chat lines of each lobby, oldest first.
pub async fn recent(db: &Db, n: usize) -> Result<Vec<(usize, Vec<ChatLine>)>, sqlx::Error> {
    let lobbies: Vec<i64> = sqlx::query_scalar("SELECT DISTINCT lobby FROM chat_messages WHERE lobby < $1")
        .bind(MAX_LOBBIES_RESTORED)
        .fetch_all(db)
        .await?;
    let mut out = Vec::with_capacity(lobbies.len());
    for lobby in lobbies {
        let rows = sqlx::query_as::<_, (i64, String, String, i64)>(
            "SELECT u.id, u.username, c.body, c.sent_at FROM chat_messages c JOIN users u ON u.id = c.user_id
             WHERE c.lobby = $1 ORDER BY c.id DESC LIMIT $2",
        )
        .bind(lobby)
        .bind(n as i64)
        .fetch_all(db)
        .await?;
        let lines = rows
            .into_iter()
            .rev()
            .map(|(id, name, text, at_ms)| ChatLine { from: UserSummary { id, name }, text, at_ms })
            .collect();
        out.push((lobby as usize, lines));
    }
    Ok(out)
}
