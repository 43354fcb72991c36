//! `rallypoint export` and `rallypoint import`: every row of a deployment as JSON lines, to move
//! it from SQLite to PostgreSQL (or back, or to another host) with nothing lost: users and their
//! password hashes, sessions, chat, matches, ratings, room servers and the server's secrets (so
//! that signed-in players stay signed in and room servers keep their tokens).
//!
//! The first line names the format and the schema version; then one line per row,
//! `{"t":"users","r":[1,"Alice",…]}`, columns in the order of [`TABLES`], bytes in base64.
//! Import takes an empty database (migrated first), writes everything in one transaction, and
//! moves PostgreSQL's id sequences past the imported ids.

use std::io::{BufRead, Write};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::{Value, json};
use sqlx::Row as _;

use crate::db::{Backend, Db};

/// The dump format's version (the first line's `rallypoint_dump`).
const FORMAT: u64 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Int,
    Real,
    Text,
    Bytes,
}

use Kind::{Bytes, Int, Real, Text};

/// One table: its name, its columns, what orders its rows, and its identity column (whose
/// PostgreSQL sequence must move past the imported ids).
struct Table {
    name: &'static str,
    columns: &'static [(&'static str, Kind)],
    order: &'static str,
    identity: Option<&'static str>,
}

/// Every table, parents before children. A test checks that this is every column of the schema.
const TABLES: &[Table] = &[
    Table {
        name: "users",
        columns: &[
            ("id", Int),
            ("username", Text),
            ("username_key", Text),
            ("password_hash", Text),
            ("created_at", Int),
        ],
        order: "id",
        identity: Some("id"),
    },
    Table {
        name: "sessions",
        columns: &[("token_hash", Bytes), ("user_id", Int), ("created_at", Int), ("expires_at", Int)],
        order: "token_hash",
        identity: None,
    },
    Table {
        name: "chat_messages",
        columns: &[("id", Int), ("lobby", Int), ("user_id", Int), ("body", Text), ("sent_at", Int)],
        order: "id",
        identity: Some("id"),
    },
    Table { name: "server_secrets", columns: &[("name", Text), ("value", Bytes)], order: "name", identity: None },
    Table {
        name: "room_servers",
        columns: &[
            ("id", Int),
            ("name", Text),
            ("token_hash", Bytes),
            ("community", Int),
            ("public_url", Text),
            ("created_at", Int),
            ("revoked_at", Int),
        ],
        order: "id",
        identity: Some("id"),
    },
    Table {
        name: "matches",
        columns: &[
            ("id", Int),
            ("mode", Text),
            ("room", Text),
            ("end_reason", Text),
            ("ticks", Int),
            ("ended_at", Int),
            ("server", Text),
            ("official", Int),
            ("match_key", Text),
        ],
        order: "id",
        identity: Some("id"),
    },
    Table {
        name: "match_players",
        columns: &[
            ("match_id", Int),
            ("user_id", Int),
            ("seat", Int),
            ("rank", Int),
            ("score", Int),
            ("rating_before", Real),
            ("rating_after", Real),
        ],
        order: "match_id, user_id",
        identity: None,
    },
    Table {
        name: "ratings",
        columns: &[
            ("user_id", Int),
            ("mode", Text),
            ("rating", Real),
            ("deviation", Real),
            ("volatility", Real),
            ("matches", Int),
            ("wins", Int),
            ("draws", Int),
        ],
        order: "user_id, mode",
        identity: None,
    },
];

#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    #[error(transparent)]
    Db(#[from] sqlx::Error),
    #[error("cannot read or write the dump: {0}")]
    Io(#[from] std::io::Error),
    #[error("line {line} of the dump: {what}")]
    Bad { line: usize, what: String },
    #[error("the database already holds {rows} rows of {table}: import only into an empty one")]
    NotEmpty { table: &'static str, rows: i64 },
    #[error(
        "this is a dump of schema {dump}, and the database is at schema {database}: import it with the release that exported it (then upgrade), or export again with this one"
    )]
    Schema { dump: i64, database: i64 },
}

/// Writes every row of `db` to `out`; returns how many rows per table.
pub async fn export(db: &Db, out: &mut impl Write) -> Result<Vec<(&'static str, u64)>, DumpError> {
    let schema = crate::db::schema_version(db).await?;
    writeln!(out, "{}", json!({ "rallypoint_dump": FORMAT, "schema": schema }))?;
    let mut counts = Vec::new();
    for table in TABLES {
        let columns: Vec<&str> = table.columns.iter().map(|(c, _)| *c).collect();
        let sql = format!("SELECT {} FROM {} ORDER BY {}", columns.join(", "), table.name, table.order);
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql)).fetch_all(db).await?;
        for row in &rows {
            let mut values = Vec::with_capacity(table.columns.len());
            for (i, (_, kind)) in table.columns.iter().enumerate() {
                values.push(match kind {
                    Int => row.try_get::<Option<i64>, _>(i)?.map_or(Value::Null, Value::from),
                    Real => row.try_get::<Option<f64>, _>(i)?.map_or(Value::Null, Value::from),
                    Text => row.try_get::<Option<String>, _>(i)?.map_or(Value::Null, Value::from),
                    Bytes => {
                        row.try_get::<Option<Vec<u8>>, _>(i)?.map_or(Value::Null, |b| Value::from(BASE64.encode(b)))
                    }
                });
            }
            writeln!(out, "{}", json!({ "t": table.name, "r": values }))?;
        }
        counts.push((table.name, rows.len() as u64));
    }
    out.flush()?;
    Ok(counts)
}

/// Reads a dump from `input` into `db`, which must be empty; all or nothing. Returns how many
/// rows per table.
pub async fn import(db: &Db, input: impl BufRead) -> Result<Vec<(&'static str, u64)>, DumpError> {
    for table in TABLES {
        let sql = format!("SELECT COUNT(*) FROM {}", table.name);
        let rows: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql)).fetch_one(db).await?;
        if rows > 0 {
            return Err(DumpError::NotEmpty { table: table.name, rows });
        }
    }
    let mut tx = crate::db::begin_write(db).await?;
    let mut counts: Vec<(&'static str, u64)> = TABLES.iter().map(|t| (t.name, 0)).collect();
    let mut lines = input.lines().enumerate();
    let bad = |line: usize, what: &str| DumpError::Bad { line: line + 1, what: what.to_owned() };
    let (_, header) = lines.next().ok_or_else(|| bad(0, "empty: no header"))?;
    let header: Value = serde_json::from_str(&header?).map_err(|e| bad(0, &e.to_string()))?;
    if header.get("rallypoint_dump").and_then(Value::as_u64) != Some(FORMAT) {
        return Err(bad(0, &format!("not a Rallypoint dump of format {FORMAT}")));
    }
    let database = crate::db::schema_version(db).await?;
    let dump = header.get("schema").and_then(Value::as_i64).ok_or_else(|| bad(0, "no schema version"))?;
    if dump != database {
        return Err(DumpError::Schema { dump, database });
    }
    for (n, line) in lines {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let row: Value = serde_json::from_str(&line).map_err(|e| bad(n, &e.to_string()))?;
        let name = row.get("t").and_then(Value::as_str).ok_or_else(|| bad(n, "no table"))?;
        let (index, table) =
            TABLES.iter().enumerate().find(|(_, t)| t.name == name).ok_or_else(|| bad(n, "unknown table"))?;
        let values = row.get("r").and_then(Value::as_array).ok_or_else(|| bad(n, "no row"))?;
        if values.len() != table.columns.len() {
            return Err(bad(n, &format!("{} columns, {} expected", values.len(), table.columns.len())));
        }
        let columns: Vec<&str> = table.columns.iter().map(|(c, _)| *c).collect();
        let params: Vec<String> = (1..=columns.len()).map(|i| format!("${i}")).collect();
        let sql = format!("INSERT INTO {} ({}) VALUES ({})", table.name, columns.join(", "), params.join(", "));
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for ((column, kind), value) in table.columns.iter().zip(values) {
            let wrong = || bad(n, &format!("{}.{column}: not a {kind:?}", table.name));
            query = match (kind, value) {
                (Int, Value::Null) => query.bind(None::<i64>),
                (Real, Value::Null) => query.bind(None::<f64>),
                (Text, Value::Null) => query.bind(None::<String>),
                (Bytes, Value::Null) => query.bind(None::<Vec<u8>>),
                (Int, v) => query.bind(v.as_i64().ok_or_else(wrong)?),
                (Real, v) => query.bind(v.as_f64().ok_or_else(wrong)?),
                (Text, Value::String(s)) => query.bind(s.clone()),
                (Bytes, Value::String(s)) => query.bind(BASE64.decode(s).map_err(|_| wrong())?),
                _ => return Err(wrong()),
            };
        }
        query.execute(&mut *tx).await?;
        counts[index].1 += 1;
    }
    if Backend::of(db) == Backend::Postgres {
        for table in TABLES {
            if let Some(id) = table.identity {
                let sql = format!(
                    "SELECT setval(pg_get_serial_sequence('{0}', '{id}'), (SELECT COALESCE(MAX({id}), 0) + 1 FROM {0}), false)",
                    table.name
                );
                sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&mut *tx).await?;
            }
        }
    }
    tx.commit().await?;
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deployment with a row in every table.
    async fn seed(db: &Db) {
        for sql in [
            "INSERT INTO users (username, username_key, password_hash, created_at) VALUES ('Alice', 'alice', '$argon2id$x', 1)",
            "INSERT INTO users (username, username_key, password_hash, created_at) VALUES ('Bob', 'bob', '$argon2id$y', 2)",
            "INSERT INTO sessions (token_hash, user_id, created_at, expires_at) VALUES (x'00ff10', 1, 3, 4)",
            "INSERT INTO chat_messages (lobby, user_id, body, sent_at) VALUES (0, 2, 'hé \"there\"', 5)",
            "INSERT INTO server_secrets (name, value) VALUES ('k', x'0102')",
            "INSERT INTO room_servers (name, token_hash, community, created_at) VALUES ('eu-1', x'aa', 1, 6)",
            "INSERT INTO matches (mode, room, end_reason, ticks, ended_at, server, official, match_key)
             VALUES ('duel', 'eu-1/7', 'score', 900, 7, 'eu-1', 0, 'eu-1/7')",
            "INSERT INTO match_players (match_id, user_id, seat, rank, score, rating_before, rating_after)
             VALUES (1, 1, 0, 1, 5, 1500.0, 1512.25)",
            "INSERT INTO ratings (user_id, mode, rating, deviation, volatility, matches, wins, draws)
             VALUES (1, 'duel', 1512.25, 290.5, 0.06, 1, 1, 0)",
        ] {
            // Bytes literals: x'..' on SQLite, '\x..'::bytea on PostgreSQL.
            let sql = if Backend::of(db) == Backend::Postgres { to_postgres_bytes(sql) } else { sql.to_owned() };
            sqlx::query(sqlx::AssertSqlSafe(sql)).execute(db).await.unwrap();
        }
    }

    fn to_postgres_bytes(sql: &str) -> String {
        let mut out = String::new();
        let mut rest = sql;
        while let Some(i) = rest.find("x'") {
            let end = rest[i + 2..].find('\'').unwrap() + i + 2;
            out.push_str(&rest[..i]);
            out.push_str("'\\x");
            out.push_str(&rest[i + 2..end]);
            out.push_str("'::bytea");
            rest = &rest[end + 1..];
        }
        out + rest
    }

    /// SQLite → dump → PostgreSQL → dump → SQLite: the same rows every time, nothing lost, and
    /// new rows after the import get fresh ids.
    #[tokio::test]
    async fn a_deployment_moves_between_sqlite_and_postgres_with_nothing_lost() {
        let mut dbs = crate::db::testing::both().await;
        let (_pg_dir, postgres) = dbs.pop().unwrap();
        let (_dir, sqlite) = dbs.pop().unwrap();
        seed(&sqlite).await;
        let mut first = Vec::new();
        let counts = export(&sqlite, &mut first).await.unwrap();
        assert!(counts.iter().all(|(_, n)| *n > 0), "{counts:?}");
        import(&postgres, &first[..]).await.unwrap();
        let mut second = Vec::new();
        export(&postgres, &mut second).await.unwrap();
        assert_eq!(String::from_utf8(first.clone()).unwrap(), String::from_utf8(second).unwrap());
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO users (username, username_key, password_hash, created_at) VALUES ('C', 'c', 'h', 9) RETURNING id",
        )
        .fetch_one(&postgres)
        .await
        .unwrap();
        assert_eq!(id, 3, "the sequence moved past the imported ids");
        assert!(matches!(import(&postgres, &first[..]).await, Err(DumpError::NotEmpty { table: "users", rows: 3 })));
        let back = tempfile::tempdir().unwrap();
        let sqlite_again = crate::db::open(&format!("sqlite://{}", back.path().join("b.db").display())).await.unwrap();
        import(&sqlite_again, &first[..]).await.unwrap();
        let mut third = Vec::new();
        export(&sqlite_again, &mut third).await.unwrap();
        assert_eq!(first, third);
    }

    /// Every column of every table of the schema is in [`TABLES`]: a migration that adds one
    /// must add it here, or exports would lose it.
    #[tokio::test]
    async fn the_dump_covers_every_column_of_the_schema() {
        let (_dir, db) = crate::db::testing::both().await.remove(0);
        let tables: Vec<String> = sqlx::query_scalar(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE '\\_%' ESCAPE '\\' AND name NOT LIKE 'sqlite%' ORDER BY name",
        )
        .fetch_all(&db)
        .await
        .unwrap();
        let mut known: Vec<&str> = TABLES.iter().map(|t| t.name).collect();
        known.sort_unstable();
        assert_eq!(tables, known);
        for table in TABLES {
            let sql = format!("SELECT name FROM pragma_table_info('{}') ORDER BY cid", table.name);
            let columns: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql)).fetch_all(&db).await.unwrap();
            let listed: Vec<&str> = table.columns.iter().map(|(c, _)| *c).collect();
            assert_eq!(columns, listed, "{}", table.name);
        }
    }

    #[tokio::test]
    async fn a_bad_dump_is_refused_and_writes_nothing() {
        let (_dir, db) = crate::db::testing::both().await.remove(0);
        let schema = crate::db::schema_version(&db).await.unwrap();
        let header = format!("{{\"rallypoint_dump\":1,\"schema\":{schema}}}\n");
        let older = format!("dump of schema {}, and the database is at schema {schema}", schema - 1);
        for (dump, says) in [
            ("", "no header"),
            ("{\"rallypoint_dump\":9}\n", "format"),
            ("{\"rallypoint_dump\":1}\n", "no schema version"),
            (&format!("{{\"rallypoint_dump\":1,\"schema\":{}}}\n", schema - 1) as &str, &older as &str),
            (&format!("{header}{{\"t\":\"nope\",\"r\":[]}}\n") as &str, "unknown table"),
            (&format!("{header}{{\"t\":\"users\",\"r\":[1]}}\n"), "columns"),
            (&format!("{header}{{\"t\":\"users\",\"r\":[\"x\",\"a\",\"a\",\"h\",1]}}\n"), "users.id"),
            (&format!("{header}{{\"t\":\"users\",\"r\":[1,\"a\",\"a\",\"h\",1]}}\nnot json\n"), "line 3"),
        ] {
            let err = import(&db, dump.as_bytes()).await.unwrap_err().to_string();
            assert!(err.contains(says), "{err} should say {says}");
        }
        let users: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM users").fetch_one(&db).await.unwrap();
        assert_eq!(users, 0, "all or nothing");
    }
}
