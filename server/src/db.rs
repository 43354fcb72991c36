//! The database: opening it, applying migrations, and the server's own secrets.
//!
//! Other modules own their tables and keep their queries; this one owns the pool.

use std::str::FromStr;
use std::time::Duration;

use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

/// The pool every module queries through.
pub type Db = SqlitePool;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("cannot open database {url}: {source}")]
    Open { url: String, source: sqlx::Error },
    #[error("cannot create the database folder {path}: {source}")]
    Folder { path: String, source: std::io::Error },
    #[error("cannot apply database migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error(transparent)]
    Query(#[from] sqlx::Error),
}

/// How long a write waits for the database's write lock.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// Opens (creating when missing) the database at `url` and applies pending migrations.
pub async fn open(url: &str) -> Result<Db, DbError> {
    let open_err = |source| DbError::Open { url: url.to_owned(), source };
    let options = SqliteConnectOptions::from_str(url)
        .map_err(open_err)?
        .create_if_missing(true)
        .foreign_keys(true)
        // WAL lets pages be read while the hub writes. FULL makes every committed transaction
        // durable even across a power cut, not only a crash: results are never lost once acked.
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        // A writer waits its turn this long. Under heavy disk load (fsyncs of seconds each, seen
        // in the soak beside a build) 5 s was not enough and writes failed as "database is locked".
        .busy_timeout(BUSY_TIMEOUT);
    if let Some(folder) = options.get_filename().parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(folder)
            .map_err(|source| DbError::Folder { path: folder.display().to_string(), source })?;
    }
    let pool = SqlitePoolOptions::new()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await
        .map_err(open_err)?;
    sqlx::migrate!("./migrations").run(&pool).await?;
    Ok(pool)
}

/// Begins a transaction that will write. `BEGIN IMMEDIATE` takes the write lock at once, waiting
/// for it under the busy timeout; a plain (deferred) transaction that reads first and then writes
/// fails at once with "database is locked" when another writer committed meanwhile.
pub async fn begin_write(db: &Db) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>, sqlx::Error> {
    db.begin_with("BEGIN IMMEDIATE").await
}

/// Whether the database answers a trivial query within a second.
pub async fn is_healthy(db: &Db) -> bool {
    let probe = sqlx::query_scalar::<_, i64>("SELECT 1").fetch_one(db);
    matches!(tokio::time::timeout(Duration::from_secs(1), probe).await, Ok(Ok(1)))
}

/// Returns the 32-byte secret called `name`, generating and storing it on first use.
pub async fn secret(db: &Db, name: &str) -> Result<[u8; 32], DbError> {
    let mut fresh = [0u8; 32];
    crate::random::fill(&mut fresh);
    // INSERT OR IGNORE then SELECT: several instances starting at once agree on one value.
    sqlx::query("INSERT OR IGNORE INTO server_secrets (name, value) VALUES (?, ?)")
        .bind(name)
        .bind(&fresh[..])
        .execute(db)
        .await?;
    let stored: Vec<u8> =
        sqlx::query_scalar("SELECT value FROM server_secrets WHERE name = ?").bind(name).fetch_one(db).await?;
    let mut out = [0u8; 32];
    if stored.len() == out.len() {
        out.copy_from_slice(&stored);
        Ok(out)
    } else {
        Err(DbError::Query(sqlx::Error::Protocol(format!("secret {name} has the wrong length"))))
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// Milliseconds since the Unix epoch.
pub fn unix_now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}
