//! The cluster's matcher lease: exactly one instance forms matches and gives lobby places. It is a PostgreSQL
//! session-level advisory lock, held on a connection of its own: when the instance holding it
//! dies, its connection closes and PostgreSQL lets the lock go at once; the others try for it
//! every [`TRY_EVERY`], so one takes over within that (the queue is not lost: every instance
//! keeps the whole cluster's queue, each the authority on its own players). The holder checks
//! its connection as often, and stops matching the moment it cannot (it may have lost the lock).
//! A holder that stops answering without closing its connection (its host died) loses the lock
//! after 5 s idle (`idle_session_timeout`, PostgreSQL 14 and later).

use std::time::Duration;

use sqlx::Connection as _;
use tokio::sync::mpsc;

use super::Command;

/// The advisory lock's key ("rp-match" in ASCII).
const MATCHER_LOCK: i64 = 0x7270_2d6d_6174_6368;
/// How often the lock is tried for (by the others) and checked (by the holder).
pub const TRY_EVERY: Duration = Duration::from_secs(1);

/// Tries for the lease on the database at `url` until the hub stops, telling it each time it
/// is won or lost.
pub(super) async fn run(url: String, hub: mpsc::Sender<Command>) {
    let mut held: Option<sqlx::AnyConnection> = None;
    let mut every = tokio::time::interval(TRY_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        if hub.is_closed() {
            return;
        }
        let was = held.is_some();
        held = match held.take() {
            Some(mut conn) => {
                let alive = tokio::time::timeout(TRY_EVERY, sqlx::query("SELECT 1").execute(&mut conn)).await;
                matches!(alive, Ok(Ok(_))).then_some(conn)
            }
            None => try_lock(&url).await,
        };
        if held.is_some() != was {
            tracing::info!(leader = held.is_some(), "matcher lease {}", if held.is_some() { "won" } else { "lost" });
            if hub.send(Command::Leader(held.is_some())).await.is_err() {
                return;
            }
        }
    }
}

async fn try_lock(url: &str) -> Option<sqlx::AnyConnection> {
    let attempt = async {
        let mut conn = sqlx::AnyConnection::connect(url).await.ok()?;
        // A holder whose host dies without closing its connection (power, network) would keep
        // the lock until the server's TCP keepalive noticed, hours later; a live holder checks
        // every second, so a session idle for 5 s is a dead one: PostgreSQL ends it, and with
        // it the lock.
        let _ = sqlx::query("SET idle_session_timeout = '5s'").execute(&mut conn).await;
        let won: bool =
            sqlx::query_scalar("SELECT pg_try_advisory_lock($1)").bind(MATCHER_LOCK).fetch_one(&mut conn).await.ok()?;
        if won {
            Some(conn)
        } else {
            let _ = conn.close().await;
            None
        }
    };
    tokio::time::timeout(TRY_EVERY * 3, attempt).await.ok().flatten()
}
