//! Accounts: registration, login, sessions. Owns the `users` and `sessions` tables.

mod password;
pub mod throttle;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use shared::hub::UserSummary;

use crate::config::Limits;
use crate::db::{Db, unix_now};
pub use password::Busy;
use password::Hasher;
use throttle::Throttle;

/// Shortest and longest usernames, in characters.
pub const USERNAME_CHARS: std::ops::RangeInclusive<usize> = 3..=24;
/// Shortest and longest passwords, in characters.
pub const PASSWORD_CHARS: std::ops::RangeInclusive<usize> = 8..=128;

/// A registered user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub id: i64,
    pub name: String,
}

impl User {
    pub fn summary(&self) -> UserSummary {
        UserSummary { id: self.id, name: self.name.clone() }
    }
}

/// What identifies a session on the server: the SHA-256 of its cookie token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionKey([u8; 32]);

impl SessionKey {
    /// The key in hex, as the cluster's bus carries it.
    pub fn to_hex(&self) -> String {
        use std::fmt::Write as _;
        self.0.iter().fold(String::with_capacity(64), |mut hex, b| {
            let _ = write!(hex, "{b:02x}");
            hex
        })
    }

    /// A key from [`Self::to_hex`]'s form; `None` for anything else.
    pub fn from_hex(hex: &str) -> Option<Self> {
        if hex.len() != 64 || !hex.is_ascii() {
            return None;
        }
        let mut key = [0u8; 32];
        for (i, byte) in key.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Self(key))
    }

    pub(crate) fn of_token(token: &str) -> Self {
        Self(Sha256::digest(token.as_bytes()).into())
    }
}

/// A live session, as found from a request's cookie.
#[derive(Debug, Clone)]
pub struct Session {
    pub key: SessionKey,
    pub user: User,
}

/// A session just created: the token goes into the cookie and nowhere else.
pub struct NewSession {
    pub token: String,
    pub session: Session,
    pub max_age: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error("Usernames are 3 to 24 characters: letters, digits, _ and -.")]
    Username,
    #[error("Passwords are 8 to 128 characters.")]
    PasswordLength,
    #[error("The two passwords differ.")]
    PasswordMismatch,
    #[error("That username is taken; choose another.")]
    Taken,
    #[error("Too many new accounts from your network; try again in {} minutes.", retry_after.as_secs().div_ceil(60).max(1))]
    Throttled { retry_after: Duration },
    #[error(transparent)]
    Busy(#[from] Busy),
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
}

#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    /// The same answer whether the user exists or not.
    #[error("Wrong username or password.")]
    Wrong,
    #[error("Too many failed attempts; try again in {} seconds.", retry_after.as_secs().max(1))]
    Throttled { retry_after: Duration },
    #[error(transparent)]
    Busy(#[from] Busy),
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
}

/// Registration, login and sessions, over the database and the hashing pool.
pub struct Accounts {
    db: Db,
    hasher: Hasher,
    throttle: Arc<Throttle>,
    registrations: throttle::Registrations,
    session_ttl: Duration,
}

impl Accounts {
    pub fn new(db: Db, limits: &Limits) -> Self {
        Self {
            db,
            hasher: Hasher::start(limits.hash_threads, limits.hash_queue),
            throttle: Arc::new(Throttle::new(throttle::Limits {
                per_account_address: limits.login_failures_per_account_address,
                per_address: limits.login_failures_per_address,
                per_account: limits.login_failures_per_account,
                account_pace: limits.login_account_pace,
                window: limits.login_window,
            })),
            registrations: throttle::Registrations::new(limits.registrations_per_address),
            session_ttl: limits.session_ttl,
        }
    }

    /// The login throttle, to share its counts with the cluster's other instances.
    pub fn throttle(&self) -> &Arc<Throttle> {
        &self.throttle
    }

    /// Creates an account and a session for it.
    pub async fn register(
        &self,
        username: &str,
        password: &str,
        confirm: &str,
        client: IpAddr,
    ) -> Result<NewSession, RegisterError> {
        if !valid_username(username) {
            return Err(RegisterError::Username);
        }
        if !PASSWORD_CHARS.contains(&password.chars().count()) {
            return Err(RegisterError::PasswordLength);
        }
        if password != confirm {
            return Err(RegisterError::PasswordMismatch);
        }
        let key = username.to_ascii_lowercase();
        if self.find(&key).await?.is_some() {
            return Err(RegisterError::Taken);
        }
        // Counted once the form is valid, before hashing: only a registration that can succeed
        // costs the address one.
        self.registrations
            .take(client, tokio::time::Instant::now())
            .map_err(|retry_after| RegisterError::Throttled { retry_after })?;
        let hash = self.hasher.hash(password.to_owned()).await?;
        let inserted = sqlx::query_scalar::<_, i64>(
            "INSERT INTO users (username, username_key, password_hash, created_at)
             VALUES ($1, $2, $3, $4) ON CONFLICT (username_key) DO NOTHING RETURNING id",
        )
        .bind(username)
        .bind(&key)
        .bind(&hash)
        .bind(unix_now())
        .fetch_optional(&self.db)
        .await?;
        // A concurrent registration of the same name may have won between find and insert.
        let id = inserted.ok_or(RegisterError::Taken)?;
        let user = User { id, name: username.to_owned() };
        Ok(self.start_session(user).await?)
    }

    /// Checks a username and password and starts a new session.
    pub async fn login(&self, username: &str, password: &str, client: IpAddr) -> Result<NewSession, LoginError> {
        let key = username.to_ascii_lowercase();
        let now = tokio::time::Instant::now();
        let attempt = self.throttle.begin(&key, client, now).map_err(|retry_after| {
            metrics::counter!("rallypoint_logins_total", "result" => "throttled").increment(1);
            LoginError::Throttled { retry_after }
        })?;
        // Overlong input is never hashed; it fails like any wrong password.
        let plausible = valid_username(username) && password.chars().count() <= *PASSWORD_CHARS.end();
        let found = if plausible { self.find(&key).await? } else { None };
        let (user, stored) = match found {
            Some((user, hash)) => (Some(user), Some(hash)),
            None => (None, None),
        };
        let ok = plausible && self.hasher.verify(password.to_owned(), stored).await?;
        match user {
            Some(user) if ok => {
                let session = self.start_session(user).await?;
                attempt.succeeded(now);
                metrics::counter!("rallypoint_logins_total", "result" => "ok").increment(1);
                Ok(session)
            }
            _ => {
                attempt.failed();
                metrics::counter!("rallypoint_logins_total", "result" => "wrong").increment(1);
                Err(LoginError::Wrong)
            }
        }
    }

    async fn find(&self, key: &str) -> Result<Option<(User, String)>, sqlx::Error> {
        let row = sqlx::query_as::<_, (i64, String, String)>(
            "SELECT id, username, password_hash FROM users WHERE username_key = $1",
        )
        .bind(key)
        .fetch_optional(&self.db)
        .await?;
        Ok(row.map(|(id, name, hash)| (User { id, name }, hash)))
    }

    /// Looks up a user by name, without regard to case.
    pub async fn user_by_name(&self, name: &str) -> Result<Option<User>, sqlx::Error> {
        Ok(self.find(&name.to_ascii_lowercase()).await?.map(|(user, _)| user))
    }

    async fn start_session(&self, user: User) -> Result<NewSession, sqlx::Error> {
        let token = crate::random::token();
        let key = SessionKey::of_token(&token);
        let now = unix_now();
        sqlx::query("INSERT INTO sessions (token_hash, user_id, created_at, expires_at) VALUES ($1, $2, $3, $4)")
            .bind(&key.0[..])
            .bind(user.id)
            .bind(now)
            .bind(now + self.session_ttl.as_secs() as i64)
            .execute(&self.db)
            .await?;
        Ok(NewSession { token, session: Session { key, user }, max_age: self.session_ttl })
    }

    /// The live session whose cookie token is `token`, if any.
    pub async fn session(&self, token: &str) -> Result<Option<Session>, sqlx::Error> {
        if token.len() > 64 {
            return Ok(None);
        }
        let key = SessionKey::of_token(token);
        let row = sqlx::query_as::<_, (i64, String)>(
            "SELECT u.id, u.username FROM sessions s JOIN users u ON u.id = s.user_id
             WHERE s.token_hash = $1 AND s.expires_at > $2",
        )
        .bind(&key.0[..])
        .bind(unix_now())
        .fetch_optional(&self.db)
        .await?;
        Ok(row.map(|(id, name)| Session { key, user: User { id, name } }))
    }

    /// Ends one session.
    pub async fn end_session(&self, key: SessionKey) -> Result<(), sqlx::Error> {
        sqlx::query("DELETE FROM sessions WHERE token_hash = $1").bind(&key.0[..]).execute(&self.db).await?;
        Ok(())
    }

    /// Ends every session of a user but `keep`; returns the keys ended.
    pub async fn end_other_sessions(&self, user_id: i64, keep: SessionKey) -> Result<Vec<SessionKey>, sqlx::Error> {
        let rows: Vec<Vec<u8>> =
            sqlx::query_scalar("DELETE FROM sessions WHERE user_id = $1 AND token_hash != $2 RETURNING token_hash")
                .bind(user_id)
                .bind(&keep.0[..])
                .fetch_all(&self.db)
                .await?;
        Ok(rows.into_iter().filter_map(|r| r.try_into().ok().map(SessionKey)).collect())
    }

    /// Number of live sessions of a user.
    pub async fn session_count(&self, user_id: i64) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar("SELECT COUNT(*) FROM sessions WHERE user_id = $1 AND expires_at > $2")
            .bind(user_id)
            .bind(unix_now())
            .fetch_one(&self.db)
            .await
    }

    /// When the user registered, in Unix seconds.
    pub async fn created_at(&self, user_id: i64) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar("SELECT created_at FROM users WHERE id = $1").bind(user_id).fetch_one(&self.db).await
    }

    /// Deletes expired sessions; returns how many.
    pub async fn purge_expired(&self) -> Result<u64, sqlx::Error> {
        let done =
            sqlx::query("DELETE FROM sessions WHERE expires_at <= $1").bind(unix_now()).execute(&self.db).await?;
        Ok(done.rows_affected())
    }
}

/// Creates `count` users named `{prefix}{i}`, all with `password`, and a session for each;
/// returns the session tokens, in order. For benchmarks, which need thousands of signed-in users
/// without paying for thousands of password hashes.
pub async fn seed_for_bench(
    db: &Db,
    prefix: &str,
    count: usize,
    password: &str,
    session_ttl: Duration,
) -> Result<Vec<String>, sqlx::Error> {
    let hash = password::hash_blocking(password.as_bytes());
    let now = unix_now();
    let mut tokens = Vec::with_capacity(count);
    let mut tx = crate::db::begin_write(db).await?;
    for i in 0..count {
        let name = format!("{prefix}{i}");
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO users (username, username_key, password_hash, created_at) VALUES ($1, $2, $3, $4) RETURNING id",
        )
        .bind(&name)
        .bind(name.to_ascii_lowercase())
        .bind(&hash)
        .bind(now)
        .fetch_one(&mut *tx)
        .await?;
        let token = crate::random::token();
        sqlx::query("INSERT INTO sessions (token_hash, user_id, created_at, expires_at) VALUES ($1, $2, $3, $4)")
            .bind(&SessionKey::of_token(&token).0[..])
            .bind(id)
            .bind(now)
            .bind(now + session_ttl.as_secs() as i64)
            .execute(&mut *tx)
            .await?;
        tokens.push(token);
    }
    tx.commit().await?;
    Ok(tokens)
}

/// 3–24 characters of `[A-Za-z0-9_-]`.
pub fn valid_username(name: &str) -> bool {
    USERNAME_CHARS.contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames() {
        for ok in ["abc", "Alice_99", "x-y-z", "a23456789012345678901234"] {
            assert!(valid_username(ok), "{ok}");
        }
        for bad in ["ab", "a234567890123456789012345", "al ice", "ålice", "<b>", "a.b", ""] {
            assert!(!valid_username(bad), "{bad}");
        }
    }
}
