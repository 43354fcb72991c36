//! Room-server tokens: `rallypoint room-token create/list/revoke` on the hub's host. A token is
//! printed once; the database keeps only its SHA-256 (a token is 256 random bits, so a fast
//! hash is enough: there is nothing to guess).

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest as _, Sha256};

use crate::db::{Db, unix_now};

/// What every token starts with, so that one pasted in the wrong place is recognisable.
const PREFIX: &str = "rpt_";
/// Longest name of a room server.
pub const MAX_NAME: usize = 32;

/// A room server the hub knows.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RoomServer {
    pub id: i64,
    pub name: String,
    /// Community servers' results are unofficial.
    pub community: bool,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds, when revoked.
    pub revoked_at: Option<i64>,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("a room server's name is 1 to {MAX_NAME} characters: lower-case letters, digits, '-', '_' and '.'")]
    BadName,
    #[error("room server {0:?} already has a token; revoke it first (`rallypoint room-token revoke {0}`)")]
    Exists(String),
    #[error("no room server is called {0:?} (`rallypoint room-token list` shows them)")]
    NotFound(String),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

fn check_name(name: &str) -> Result<(), TokenError> {
    let ok = (1..=MAX_NAME).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b));
    if ok { Ok(()) } else { Err(TokenError::BadName) }
}

fn hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Creates the token of room server `name` (or a new one, for a name whose token was revoked)
/// and returns it: the only time it is ever shown.
pub async fn create(db: &Db, name: &str, community: bool) -> Result<String, TokenError> {
    check_name(name)?;
    let mut secret = [0u8; 32];
    crate::random::fill(&mut secret);
    let token = format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(secret));
    let mut tx = crate::db::begin_write(db).await?;
    let revoked: Option<Option<i64>> = sqlx::query_scalar("SELECT revoked_at FROM room_servers WHERE name = $1")
        .bind(name)
        .fetch_optional(&mut *tx)
        .await?;
    match revoked {
        Some(None) => return Err(TokenError::Exists(name.to_owned())),
        Some(Some(_)) => {
            sqlx::query(
                "UPDATE room_servers SET token_hash = $1, community = $2, created_at = $3, revoked_at = NULL WHERE name = $4",
            )
            .bind(&hash(&token)[..])
            .bind(i64::from(community))
            .bind(unix_now())
            .bind(name)
            .execute(&mut *tx)
            .await?;
        }
        None => {
            sqlx::query("INSERT INTO room_servers (name, token_hash, community, created_at) VALUES ($1, $2, $3, $4)")
                .bind(name)
                .bind(&hash(&token)[..])
                .bind(i64::from(community))
                .bind(unix_now())
                .execute(&mut *tx)
                .await?;
        }
    }
    tx.commit().await?;
    Ok(token)
}

/// Every room server ever given a token, by name.
pub async fn list(db: &Db) -> Result<Vec<RoomServer>, TokenError> {
    let rows: Vec<(i64, String, i64, i64, Option<i64>)> =
        sqlx::query_as("SELECT id, name, community, created_at, revoked_at FROM room_servers ORDER BY name")
            .fetch_all(db)
            .await?;
    Ok(rows
        .into_iter()
        .map(|(id, name, community, created_at, revoked_at)| RoomServer {
            id,
            name,
            community: community != 0,
            created_at,
            revoked_at,
        })
        .collect())
}

/// Revokes the token of `name`: that server is refused from now on (and dropped if connected,
/// at its next heartbeat).
pub async fn revoke(db: &Db, name: &str) -> Result<(), TokenError> {
    let done = sqlx::query("UPDATE room_servers SET revoked_at = $1 WHERE name = $2 AND revoked_at IS NULL")
        .bind(unix_now())
        .bind(name)
        .execute(db)
        .await?;
    if done.rows_affected() == 1 { Ok(()) } else { Err(TokenError::NotFound(name.to_owned())) }
}

/// The room server a token belongs to, unless it is unknown or revoked.
pub async fn authenticate(db: &Db, token: &str) -> Result<Option<RoomServer>, sqlx::Error> {
    if !token.starts_with(PREFIX) || token.len() > 100 {
        return Ok(None);
    }
    let row: Option<(i64, String, i64, i64)> = sqlx::query_as(
        "SELECT id, name, community, created_at FROM room_servers WHERE token_hash = $1 AND revoked_at IS NULL",
    )
    .bind(&hash(token)[..])
    .fetch_optional(db)
    .await?;
    Ok(row.map(|(id, name, community, created_at)| RoomServer {
        id,
        name,
        community: community != 0,
        created_at,
        revoked_at: None,
    }))
}

/// Keeps where room server `id` says browsers reach it.
pub async fn remember_url(db: &Db, id: i64, url: &str) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE room_servers SET public_url = $1 WHERE id = $2").bind(url).bind(id).execute(db).await?;
    Ok(())
}

/// Where the room servers with valid tokens said browsers reach them.
pub async fn known_urls(db: &Db) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT public_url FROM room_servers WHERE revoked_at IS NULL AND public_url IS NOT NULL")
        .fetch_all(db)
        .await
}

/// Whether room server `id` still holds a valid token.
pub async fn is_active(db: &Db, id: i64) -> Result<bool, sqlx::Error> {
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM room_servers WHERE id = $1 AND revoked_at IS NULL")
        .bind(id)
        .fetch_one(db)
        .await?;
    Ok(n == 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_token_authenticates_its_server_until_revoked_and_only_its_hash_is_stored() {
        for (_dir, db) in crate::db::testing::both().await {
            a_token_authenticates_its_server_on(db).await;
        }
    }

    async fn a_token_authenticates_its_server_on(db: Db) {
        let token = create(&db, "eu-1", false).await.unwrap();
        let community = create(&db, "friends", true).await.unwrap();
        assert_ne!(token, community);
        let found = authenticate(&db, &token).await.unwrap().unwrap();
        assert_eq!((found.name.as_str(), found.community), ("eu-1", false));
        assert!(authenticate(&db, &community).await.unwrap().unwrap().community);
        let stored: Vec<Vec<u8>> =
            sqlx::query_scalar("SELECT token_hash FROM room_servers").fetch_all(&db).await.unwrap();
        assert!(stored.iter().all(|h| h.len() == 32 && !token.as_bytes().windows(h.len()).any(|w| w == &h[..])));
        // Wrong tokens.
        for wrong in ["", "rpt_", "rpt_AAAA", &token[..token.len() - 1], &"rpt_x".repeat(100)] {
            assert_eq!(authenticate(&db, wrong).await.unwrap(), None, "{wrong}");
        }
        assert!(matches!(create(&db, "eu-1", false).await, Err(TokenError::Exists(_))));
        revoke(&db, "eu-1").await.unwrap();
        assert_eq!(authenticate(&db, &token).await.unwrap(), None);
        assert!(!is_active(&db, found.id).await.unwrap());
        assert!(matches!(revoke(&db, "eu-1").await, Err(TokenError::NotFound(_))));
        // A new token for the same name; the old one stays refused.
        let again = create(&db, "eu-1", false).await.unwrap();
        assert_eq!(authenticate(&db, &again).await.unwrap().unwrap().id, found.id);
        assert_eq!(authenticate(&db, &token).await.unwrap(), None);
        let names: Vec<String> = list(&db).await.unwrap().into_iter().map(|s| s.name).collect();
        assert_eq!(names, ["eu-1", "friends"]);
    }

    #[tokio::test]
    async fn bad_names_are_refused() {
        let (_dir, db) = crate::db::testing::both().await.remove(0);
        for bad in ["", "EU", "a b", "é", &"a".repeat(33), "x/y"] {
            assert!(matches!(create(&db, bad, false).await, Err(TokenError::BadName)), "{bad:?}");
        }
    }
}
