//! Starting servers and clients for the tests.

use std::time::Duration;

use rallypoint_load::client::Client;
use rallypoint_server::config::{Config, Limits};
use rallypoint_server::{Running, start_game};
use shared::arena::Arena;
use tokio::net::TcpListener;

pub const PASSWORD: &str = "correct horse battery";

/// The database of the test server whose folder is `dir`: SQLite in that folder, or, with
/// `RALLYPOINT_TEST_DATABASE=postgres` (as `cargo xtask test` runs the database tests a second
/// time), a PostgreSQL database made for it. Its URL is kept in the folder, so that a server
/// restarted on the folder finds the same data.
pub async fn database_url(dir: &std::path::Path) -> String {
    let kept = dir.join("database-url");
    if let Ok(url) = std::fs::read_to_string(&kept) {
        return url;
    }
    let url = match std::env::var("RALLYPOINT_TEST_DATABASE").as_deref() {
        Ok("postgres") => tokio::task::spawn_blocking(|| rallypoint_load::services::fresh_postgres_database("it"))
            .await
            .unwrap()
            .expect("PostgreSQL 15 for the tests (cargo xtask test installs it)"),
        Ok("sqlite") | Err(_) => format!("sqlite://{}", dir.join("rp.db").display()),
        Ok(other) => panic!("RALLYPOINT_TEST_DATABASE={other:?}: use sqlite or postgres"),
    };
    std::fs::write(&kept, &url).unwrap();
    url
}

/// A server on an ephemeral port with its own database folder.
pub struct TestServer {
    pub running: Running,
    pub base: String,
    pub dir: tempfile::TempDir,
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// Starts a server after `adjust` has changed its configuration.
    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(dir, adjust).await
    }

    /// Starts a server on the database in `dir` (to restart one on the same data).
    pub async fn start_in(dir: tempfile::TempDir, adjust: impl FnOnce(&mut Config)) -> Self {
        Self::start_game_in::<Arena>(dir, adjust).await
    }

    /// Starts a server whose rooms play `G`.
    pub async fn start_game<G: shared::game::Game>(adjust: impl FnOnce(&mut Config)) -> Self {
        Self::start_game_in::<G>(tempfile::tempdir().unwrap(), adjust).await
    }

    async fn start_game_in<G: shared::game::Game>(dir: tempfile::TempDir, adjust: impl FnOnce(&mut Config)) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::start_on::<G>(listener, dir, adjust).await
    }

    /// Starts a server again on the database in `dir`, at the address `addr` it had (a restart).
    pub async fn restart_at(
        addr: std::net::SocketAddr,
        dir: tempfile::TempDir,
        adjust: impl FnOnce(&mut Config),
    ) -> Self {
        let mut tries = 0;
        let listener = loop {
            match TcpListener::bind(addr).await {
                Ok(listener) => break listener,
                Err(e) if tries < 50 => {
                    tries += 1;
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("cannot bind {addr} again: {e}"),
            }
        };
        Self::start_on::<Arena>(listener, dir, adjust).await
    }

    async fn start_on<G: shared::game::Game>(
        listener: TcpListener,
        dir: tempfile::TempDir,
        adjust: impl FnOnce(&mut Config),
    ) -> Self {
        let url = database_url(dir.path()).await;
        let mut config = Config::new(url, dir.path());
        config.limits = test_limits();
        adjust(&mut config);
        let running = start_game::<G>(listener, config).await.unwrap();
        let base = format!("http://{}", running.addr);
        Self { running, base, dir }
    }

    pub fn client(&self) -> Client {
        Client::new(&self.base).unwrap()
    }

    /// A new client signed in as a freshly registered user.
    pub async fn user(&self, name: &str) -> Client {
        let client = self.client();
        client.register(name, PASSWORD).await.unwrap();
        client
    }

    /// A signed-in user called `crowd{i}`.
    pub async fn user_named(&self, i: usize) -> Client {
        self.user(&format!("crowd{i}")).await
    }

    /// Stops the server and hands back its data folder.
    pub async fn stop(self) -> tempfile::TempDir {
        self.running.stop().await;
        self.dir
    }
}

/// Production limits, with hashing kept cheap in threads and timers short enough for tests.
fn test_limits() -> Limits {
    Limits { hash_threads: 2, ..Limits::default() }
}

pub const SECOND: Duration = Duration::from_secs(1);

/// Waits until the hub closes the connection, which must be with `code`.
pub async fn expect_close(hub: &mut rallypoint_load::client::Hub, code: u16) {
    use rallypoint_load::client::ClientError;
    match hub.recv_until(Duration::from_secs(10), |_| None::<()>).await {
        Err(ClientError::Closed { code: got, .. }) => assert_eq!(got, code),
        other => panic!("expected close {code}, got {other:?}"),
    }
}

/// Where a redirect points; empty for a response that is not one.
pub(crate) fn location(response: &reqwest::Response) -> String {
    response.headers().get(reqwest::header::LOCATION).map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default()
}
