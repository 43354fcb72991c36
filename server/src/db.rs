//! The database: opening it, applying migrations, and the server's own secrets.
//!
//! Other modules own their tables and keep their queries; this one owns the pool.

use std::time::Duration;

use sqlx::any::AnyPoolOptions;

/// The pool every module queries through: SQLite (one file, the default) or PostgreSQL (for
/// several instances), behind sqlx's `Any` driver. Queries are written once, in the SQL both
/// accept (`$1` parameters, `ON CONFLICT`, `RETURNING`, integers as BIGINT, booleans as 0/1);
/// the schema is in `migrations/sqlite` and `migrations/postgres`, one file per version in each.
pub type Db = sqlx::AnyPool;

/// Which database a URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// The backend of `sqlite:…`, `postgres://…` or `postgresql://…`; `None` for anything else.
    pub fn of_url(url: &str) -> Option<Self> {
        if url.starts_with("sqlite:") {
            Some(Self::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Some(Self::Postgres)
        } else {
            None
        }
    }

    /// The backend `db` was opened on.
    pub fn of(db: &Db) -> Self {
        if db.connect_options().database_url.scheme() == "sqlite" { Self::Sqlite } else { Self::Postgres }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("cannot open database {url}: {source}")]
    Open { url: String, source: sqlx::Error },
    #[error("cannot create the database folder {path}: {source}")]
    Folder { path: String, source: std::io::Error },
    #[error("--database-url {0:?} is not supported: use sqlite://PATH or postgres://USER:PASSWORD@HOST/DATABASE")]
    Unsupported(String),
    #[error("cannot apply database migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error(transparent)]
    Query(#[from] sqlx::Error),
}

/// How long a write waits for the database's write lock.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// Opens the database at `url` (creating a SQLite file and its folder when missing) and applies
/// pending migrations.
pub async fn open(url: &str) -> Result<Db, DbError> {
    let db = connect(url).await?;
    migrate(&db).await?;
    Ok(db)
}

/// Opens the database at `url` without touching its schema.
pub async fn connect(url: &str) -> Result<Db, DbError> {
    sqlx::any::install_default_drivers();
    let open_err = |source| DbError::Open { url: url.to_owned(), source };
    let backend = Backend::of_url(url).ok_or_else(|| DbError::Unsupported(url.to_owned()))?;
    let (url, connections) = match backend {
        Backend::Sqlite => (sqlite_url(url)?, 8),
        Backend::Postgres => (url.to_owned(), 16),
    };
    let mut options = AnyPoolOptions::new().max_connections(connections).acquire_timeout(Duration::from_secs(10));
    if backend == Backend::Sqlite {
        options = options.after_connect(|conn, _| {
            Box::pin(async move {
                // WAL lets pages be read while the hub writes. FULL makes every committed
                // transaction durable even across a power cut, not only a crash: results are
                // never lost once acknowledged. A writer waits its turn BUSY_TIMEOUT: under heavy
                // disk load (fsyncs of seconds each, seen in the soak beside a build) 5 s was not
                // enough and writes failed as "database is locked".
                let pragmas = format!(
                    "PRAGMA foreign_keys = ON; PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; \
                     PRAGMA busy_timeout = {}",
                    BUSY_TIMEOUT.as_millis()
                );
                sqlx::raw_sql(sqlx::AssertSqlSafe(pragmas)).execute(conn).await?;
                Ok(())
            })
        });
    }
    options.connect(&url).await.map_err(open_err)
}

/// Applies pending migrations to `db`: SQLite's or PostgreSQL's form of the same versions.
pub async fn migrate(db: &Db) -> Result<(), DbError> {
    match Backend::of(db) {
        Backend::Sqlite => sqlx::migrate!("./migrations/sqlite").run(db).await?,
        Backend::Postgres => sqlx::migrate!("./migrations/postgres").run(db).await?,
    }
    Ok(())
}

/// The schema version the database is at (its newest applied migration).
pub async fn schema_version(db: &Db) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations").fetch_one(db).await
}

/// `url` with SQLite's `mode=rwc` (create when missing) unless it sets a mode, after creating
/// the file's folder.
fn sqlite_url(url: &str) -> Result<String, DbError> {
    let rest = url.trim_start_matches("sqlite:").trim_start_matches("//");
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    if path == ":memory:" || query.contains("mode=") {
        return Ok(url.to_owned());
    }
    if let Some(folder) = std::path::Path::new(path).parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(folder)
            .map_err(|source| DbError::Folder { path: folder.display().to_string(), source })?;
    }
    let joiner = if query.is_empty() { "?" } else { "&" };
    Ok(format!("{url}{joiner}mode=rwc"))
}

/// Begins a transaction that will read and then write (results and ratings, room-server
/// tokens), one at a time. On SQLite, `BEGIN IMMEDIATE` takes the write lock at once, waiting for
/// it under the busy timeout (a deferred transaction that reads first and then writes fails at
/// once with "database is locked" when another writer committed meanwhile). On PostgreSQL, a
/// transaction-scoped advisory lock does the same across every instance: two hubs recording at
/// once cannot both read a rating and both write their own. (Writes that only insert, such as
/// sessions and chat, do not take it.)
pub async fn begin_write(db: &Db) -> Result<sqlx::Transaction<'static, sqlx::Any>, sqlx::Error> {
    match Backend::of(db) {
        Backend::Sqlite => db.begin_with("BEGIN IMMEDIATE").await,
        Backend::Postgres => {
            let mut tx = db.begin().await?;
            sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(WRITE_LOCK).execute(&mut *tx).await?;
            Ok(tx)
        }
    }
}

/// The advisory lock of [`begin_write`] on PostgreSQL ("rallypnt" in ASCII).
const WRITE_LOCK: i64 = 0x7261_6c6c_7970_6e74;

/// Whether the database answers a trivial query within a second.
pub async fn is_healthy(db: &Db) -> bool {
    let probe = sqlx::query_scalar::<_, i64>("SELECT 1").fetch_one(db);
    matches!(tokio::time::timeout(Duration::from_secs(1), probe).await, Ok(Ok(1)))
}

/// Returns the 32-byte secret called `name`, generating and storing it on first use.
pub async fn secret(db: &Db, name: &str) -> Result<[u8; 32], DbError> {
    let mut fresh = [0u8; 32];
    crate::random::fill(&mut fresh);
    // INSERT unless present, then SELECT: several instances starting at once agree on one value.
    sqlx::query("INSERT INTO server_secrets (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING")
        .bind(name)
        .bind(&fresh[..])
        .execute(db)
        .await?;
    let stored: Vec<u8> =
        sqlx::query_scalar("SELECT value FROM server_secrets WHERE name = $1").bind(name).fetch_one(db).await?;
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

#[cfg(test)]
pub mod testing {
    use super::{Db, open};

    /// A fresh, migrated database of each backend: SQLite in a new folder (kept alive by the
    /// returned guard) and PostgreSQL 15 (a database of its own on the test binary's server).
    pub async fn both() -> Vec<(tempfile::TempDir, Db)> {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let sqlite = open(&format!("sqlite://{}", dir.path().join("t.db").display())).await.expect("SQLite");
        let url = tokio::task::spawn_blocking(|| rallypoint_load::services::fresh_postgres_database("unit"))
            .await
            .expect("no panic")
            .expect("PostgreSQL 15 for the tests (cargo xtask test installs it)");
        let postgres = open(&url).await.expect("PostgreSQL");
        vec![(dir, sqlite), (tempfile::tempdir().expect("a temporary folder"), postgres)]
    }
}
