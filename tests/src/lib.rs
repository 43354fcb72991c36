//! The end-to-end harness: the real `rallypoint` binary on a free port with its own database,
//! and real headless Chromium driven over WebDriver (Debian's chromium + chromium-driver).
//!
//! `cargo xtask test` builds the binary and the client first and passes their paths in
//! `RALLYPOINT_BIN` and `RALLYPOINT_STATIC_DIR`.

// Test code may panic on anything unexpected: that is how a test fails.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, Command};

/// How long a browser step may take before the test fails.
pub const STEP: Duration = Duration::from_secs(15);

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn env_path(var: &str, default: PathBuf) -> PathBuf {
    std::env::var_os(var).map_or(default, PathBuf::from)
}

fn must_exist(path: PathBuf, what: &str) -> PathBuf {
    assert!(path.exists(), "{what} not found at {}: run `cargo xtask test`", path.display());
    path
}

/// The `rallypoint` binary under test (`RALLYPOINT_BIN`).
fn binary() -> PathBuf {
    must_exist(env_path("RALLYPOINT_BIN", workspace().join("target/debug/rallypoint")), "the server binary")
}

/// The built client (`RALLYPOINT_STATIC_DIR`).
fn built_client() -> PathBuf {
    must_exist(env_path("RALLYPOINT_STATIC_DIR", workspace().join("web/dist")), "the built client")
}

/// A `rallypoint serve` process with a fresh database.
pub struct Server {
    pub base: String,
    child: Child,
    dir: tempfile::TempDir,
    /// The certificate and key of [`Server::start_tls`], kept for as long as the server runs.
    #[allow(dead_code)]
    certs: Option<tempfile::TempDir>,
}

impl Server {
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// Starts the server with extra flags.
    pub async fn start_with(extra: &[&str]) -> Self {
        let bin = binary();
        let static_dir = built_client();
        let dir = tempfile::tempdir().expect("a temporary folder");
        let db = format!("sqlite://{}", dir.path().join("rp.db").display());
        let mut child = Command::new(bin)
            .args(["serve", "--listen", "127.0.0.1:0", "--database-url", &db])
            .arg("--static-dir")
            .arg(static_dir)
            .args(extra)
            .env("RALLYPOINT_LOG", "info")
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("the server starts");
        let addr = wait_for_line(&mut child, "the server serving", |line| {
            line.split("addr=").nth(1).filter(|_| line.contains("serving")).map(|a| a.trim().to_owned())
        })
        .await;
        let scheme = if extra.contains(&"--tls-cert") { "https" } else { "http" };
        Self { base: format!("{scheme}://{addr}"), child, dir, certs: None }
    }

    /// Starts the server serving TLS itself, with a fresh self-signed certificate for
    /// 127.0.0.1 (browsers need `--ignore-certificate-errors`).
    pub async fn start_tls() -> Self {
        Self::start_tls_with(&[]).await
    }

    /// [`Server::start_tls`] with extra flags.
    pub async fn start_tls_with(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let key = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .expect("a self-signed certificate");
        let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&cert_path, key.cert.pem()).unwrap();
        std::fs::write(&key_path, key.signing_key.serialize_pem()).unwrap();
        let (cert_path, key_path) = (cert_path.display().to_string(), key_path.display().to_string());
        let mut args = vec!["--tls-cert", &cert_path, "--tls-key", &key_path];
        args.extend_from_slice(extra);
        let mut server = Self::start_with(&args).await;
        server.certs = Some(dir);
        server
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Starts a `rallypoint room-server` registered with this server, under a fresh token
    /// (`rallypoint room-token create` on this server's database); returns once registered.
    pub async fn room_server(&self, name: &str) -> RoomServer {
        let bin = binary();
        let db = format!("sqlite://{}", self.dir.path().join("rp.db").display());
        let created = Command::new(&bin)
            .args(["room-token", "create", "--name", name, "--database-url", &db])
            .output()
            .await
            .expect("room-token runs");
        assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stderr));
        let token = String::from_utf8(created.stdout).unwrap().trim().to_owned();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let dir = tempfile::tempdir().expect("a temporary folder");
        let mut child = Command::new(&bin)
            .args(["room-server", "--hub", &self.base, "--token", &token, "--data-dir"])
            .arg(dir.path())
            .args(["--listen", &format!("127.0.0.1:{port}"), "--public-url", &format!("http://127.0.0.1:{port}")])
            .env("RALLYPOINT_LOG", "info")
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("the room server starts");
        wait_for_line(&mut child, "the room server registered", |line| {
            line.contains("registered with the hub").then_some(())
        })
        .await;
        RoomServer { _child: child, _dir: dir }
    }

    /// Stops the server with SIGTERM and waits for it.
    pub async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = Command::new("kill").arg("-TERM").arg(pid.to_string()).status().await;
        }
        let _ = tokio::time::timeout(STEP, self.child.wait()).await;
    }
}

/// Reads `child`'s standard output until `pick` finds what it looks for in a line (within
/// [`STEP`]), then keeps draining it so that the child never blocks on a full pipe.
async fn wait_for_line<T>(child: &mut Child, what: &str, pick: impl Fn(&str) -> Option<T>) -> T {
    wait_for_line_within(child, what, STEP, pick).await
}

/// [`wait_for_line`] with another limit than [`STEP`].
async fn wait_for_line_within<T>(
    child: &mut Child,
    what: &str,
    limit: Duration,
    pick: impl Fn(&str) -> Option<T>,
) -> T {
    let mut lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
    let found = tokio::time::timeout(limit, async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(found) = pick(&line) {
                return found;
            }
        }
        panic!("the process exited before {what}");
    })
    .await
    .unwrap_or_else(|_| panic!("no sign of {what} within {limit:?}"));
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    found
}

/// A `rallypoint room-server` process, killed when dropped.
pub struct RoomServer {
    _child: Child,
    _dir: tempfile::TempDir,
}

/// A local cluster, as `cargo xtask cluster` starts it: PostgreSQL, NATS, two hubs behind Caddy
/// (round robin, no sticky sessions) and two room servers registered through it.
pub struct Cluster {
    pub base: String,
    child: Child,
}

impl Cluster {
    pub async fn start() -> Self {
        let bin = binary();
        let static_dir = built_client();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut child = Command::new(bin)
            .args(["bench", "local-cluster", "--port", &port.to_string(), "--match-seconds", "12", "--static-dir"])
            .arg(static_dir)
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("the cluster starts");
        // PostgreSQL's initdb, NATS, two hubs, Caddy, two room servers: longer than a step.
        let base = wait_for_line_within(&mut child, "the cluster", Duration::from_mins(1), |line| {
            line.strip_prefix("Rallypoint cluster: open ").and_then(|l| l.split_whitespace().next()).map(str::to_owned)
        })
        .await;
        Self { base, child }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Stops every process of the cluster (SIGTERM) and waits.
    pub async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = Command::new("kill").arg("-TERM").arg(pid.to_string()).status().await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await;
    }
}

/// A chromedriver process; each [`Browser`] it opens is a separate Chromium with its own
/// profile (so separate cookies, like two people on two machines).
pub struct Driver {
    url: String,
    _child: Child,
}

impl Driver {
    pub async fn start() -> Self {
        let chromedriver = must_exist(env_path("CHROMEDRIVER", "/usr/bin/chromedriver".into()), "chromedriver");
        let port = free_port();
        let mut child = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("chromedriver starts");
        wait_for_line(&mut child, "chromedriver ready", |line| line.contains("started successfully").then_some(()))
            .await;
        Self { url: format!("http://127.0.0.1:{port}"), _child: child }
    }

    /// Opens a new headless Chromium with a fresh profile; `extra` flags are added.
    pub async fn browser(&self, extra: &[&str]) -> Browser {
        let chromium = env_path("CHROMIUM", "/usr/bin/chromium".into());
        let profile = tempfile::tempdir().expect("a temporary folder");
        // No WebRTC flags: a stock Chromium must reach the server's UDP port on 127.0.0.1, as a
        // player's browser does with `cargo xtask run`.
        let mut args: Vec<String> = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--window-size=1280,900",
        ]
        .iter()
        .map(ToString::to_string)
        .collect();
        args.push(format!("--user-data-dir={}", profile.path().display()));
        args.extend(extra.iter().map(ToString::to_string));
        let mut caps = serde_json::Map::new();
        caps.insert("goog:chromeOptions".into(), serde_json::json!({ "binary": chromium, "args": args }));
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client =
            ClientBuilder::new(connector).capabilities(caps).connect(&self.url).await.expect("a Chromium session");
        Browser { client, profile }
    }
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    listener.local_addr().expect("an address").port()
}

/// One headless Chromium.
pub struct Browser {
    pub client: Client,
    profile: tempfile::TempDir,
}

impl Drop for Browser {
    /// Kills every process of this browser (they all name its profile folder), so that a test
    /// that fails half-way leaves no Chromium spinning under the tests that follow.
    fn drop(&mut self) {
        let _ = std::process::Command::new("pkill")
            .args(["-KILL", "-f", &format!("user-data-dir={}", self.profile.path().display())])
            .status();
    }
}

impl Browser {
    pub async fn goto(&self, url: &str) {
        self.client.goto(url).await.expect("navigation");
    }

    /// The path of the current page.
    pub async fn path(&self) -> String {
        self.client.current_url().await.expect("a URL").path().to_owned()
    }

    /// Waits until the browser is on `path`.
    pub async fn wait_for_path(&self, path: &str) {
        self.wait_until(&format!("the browser is on {path}"), || async { self.path().await == path }).await;
    }

    /// Fills the form fields by name and submits the form they are in.
    pub async fn submit(&self, fields: &[(&str, &str)]) {
        for (name, value) in fields {
            let input = self.find(&format!("input[name='{name}']")).await;
            input.clear().await.expect("clear");
            input.send_keys(value).await.expect("typing");
        }
        self.find("main form button[type='submit']").await.click().await.expect("submit");
    }

    /// Waits for an element matching a CSS selector.
    pub async fn find(&self, css: &str) -> fantoccini::elements::Element {
        self.find_within(css, STEP).await
    }

    /// Waits up to `limit` for an element matching a CSS selector.
    pub async fn find_within(&self, css: &str, limit: Duration) -> fantoccini::elements::Element {
        self.client
            .wait()
            .at_most(limit)
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no element {css}: {e}"))
    }

    /// Waits until `check` holds, polling the page (WebDriver offers no events to await).
    pub async fn wait_until<F, Fut>(&self, what: &str, mut check: F)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        let deadline = tokio::time::Instant::now() + STEP;
        while !check().await {
            assert!(tokio::time::Instant::now() < deadline, "timed out waiting until {what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether an element matching `css` exists now.
    pub async fn exists(&self, css: &str) -> bool {
        self.client.find_all(Locator::Css(css)).await.is_ok_and(|found| !found.is_empty())
    }

    /// Runs JavaScript in the page and returns its value.
    pub async fn js(&self, script: &str) -> serde_json::Value {
        self.client.execute(script, vec![]).await.expect("script runs")
    }

    /// Saves a screenshot as `target/e2e/NAME.png`, to look at after a run.
    pub async fn screenshot(&self, name: &str) {
        let dir = workspace().join("target/e2e");
        let png = self.client.screenshot().await.expect("a screenshot");
        std::fs::create_dir_all(&dir)
            .and_then(|()| std::fs::write(dir.join(format!("{name}.png")), png))
            .expect("saved");
    }

    /// Ends the WebDriver session (closing Chromium); dropping then kills what is left.
    pub async fn close(self) {
        let _ = self.client.clone().close().await;
    }
}
