//! Throwaway servers for tests, benchmarks and `cargo xtask cluster`: a real PostgreSQL 15 and a
//! real NATS server (with JetStream) from Debian (`postgresql-15`, `nats-server`), each started
//! on a free port with its data in a temporary folder, gone when the process that started it
//! ends.
//!
//! The server runs as the `postgres` user when this process is root (PostgreSQL refuses root),
//! and dies with this process: it is started from a thread that lives as long as the process,
//! with `setpriv --pdeathsig` (a parent-death signal follows the thread that forked, not the
//! process), so a test binary that exits leaves nothing behind. Data folders of processes that
//! are gone are removed at the next start.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Where Debian installs PostgreSQL 15's programs.
pub const POSTGRES_BIN: &str = "/usr/lib/postgresql/15/bin";

/// A PostgreSQL server of this process.
#[derive(Debug)]
pub struct Postgres {
    port: u16,
    data: PathBuf,
}

impl Postgres {
    /// Initialises a cluster in a fresh folder and starts it on a free loopback port. `durable`
    /// false turns off fsync (tests); benchmarks keep it on, as production does.
    pub fn start(durable: bool) -> Result<Self> {
        let bin = Path::new(POSTGRES_BIN);
        if !bin.join("postgres").exists() {
            bail!(
                "PostgreSQL 15 is not installed ({POSTGRES_BIN}/postgres): `apt-get install postgresql-15`, or run `cargo xtask test`, which installs it"
            );
        }
        let root = std::env::temp_dir();
        remove_stale(&root, "rallypoint-pg-");
        let data = root.join(format!("rallypoint-pg-{}-{}", std::process::id(), next_id()));
        std::fs::create_dir_all(&data)?;
        let owner = as_postgres_user()?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&data, Some(uid), Some(gid))?;
        }
        let initdb = user_command(owner, &bin.join("initdb"))
            .args(["--auth=trust", "--username=postgres", "--encoding=UTF8", "--no-sync", "-D"])
            .arg(&data)
            .stdout(Stdio::null())
            .output()
            .context("cannot run initdb")?;
        if !initdb.status.success() {
            bail!("initdb failed: {}", String::from_utf8_lossy(&initdb.stderr));
        }
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let mut postgres = user_command(owner, &bin.join("postgres"));
        postgres
            .arg("-D")
            .arg(&data)
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-k"])
            .arg(&data)
            .args(["-c", "max_connections=200", "-c", "shared_buffers=64MB"])
            .args(if durable { &[][..] } else { &["-c", "fsync=off", "-c", "synchronous_commit=off"][..] })
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(data.with_extension("log"))?);
        spawn_for_life(postgres)?;
        let server = Self { port, data };
        server.wait_ready()?;
        Ok(server)
    }

    /// The URL of database `name` on this server.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    /// Creates an empty database and returns its URL.
    pub fn create_database(&self, name: &str) -> Result<String> {
        let out = Command::new(Path::new(POSTGRES_BIN).join("createdb"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "postgres", name])
            .output()
            .context("cannot run createdb")?;
        if !out.status.success() {
            bail!("createdb {name} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(self.url(name))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's log (next to its data folder).
    pub fn log(&self) -> PathBuf {
        self.data.with_extension("log")
    }

    fn wait_ready(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = Command::new(Path::new(POSTGRES_BIN).join("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(self.log()).unwrap_or_default();
                bail!("PostgreSQL did not start within 30 s:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Where Debian installs the NATS server.
pub const NATS_SERVER: &str = "/usr/sbin/nats-server";

/// A NATS server (JetStream on) of this process.
#[derive(Debug)]
pub struct Nats {
    port: u16,
    data: PathBuf,
    pid: u32,
}

impl Nats {
    /// Starts a NATS server on a free loopback port, its JetStream store in a fresh folder.
    pub fn start() -> Result<Self> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        Self::start_on(port, None)
    }

    /// Starts a NATS server on `port` with the JetStream store in `data` (a fresh folder when
    /// `None`): the same port and store as a server stopped before, to restart it.
    pub fn start_on(port: u16, data: Option<PathBuf>) -> Result<Self> {
        if !Path::new(NATS_SERVER).exists() {
            bail!(
                "the NATS server is not installed ({NATS_SERVER}): `apt-get install nats-server`, or run `cargo xtask test`, which installs it"
            );
        }
        let root = std::env::temp_dir();
        remove_stale(&root, "rallypoint-nats-");
        let data = match data {
            Some(data) => data,
            None => root.join(format!("rallypoint-nats-{}-{}", std::process::id(), next_id())),
        };
        std::fs::create_dir_all(&data)?;
        let mut nats = user_command(None, Path::new(NATS_SERVER));
        nats.args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(&data)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(data.with_extension("log"))?);
        let pid = spawn_for_life(nats)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(data.with_extension("log")).unwrap_or_default();
                bail!("the NATS server did not start within 10 s:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Self { port, data, pid })
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its JetStream store, to start it again on the same data.
    pub fn data(&self) -> &Path {
        &self.data
    }

    /// Stops it at once (SIGKILL), as a crash would.
    pub fn kill(&self) {
        let _ = Command::new("kill").args(["-s", "KILL", &self.pid.to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// One PostgreSQL server for the whole process (a test binary's tests each create their own
/// database on it), started on first use.
pub fn shared_postgres() -> Result<&'static Postgres> {
    static SERVER: std::sync::OnceLock<std::result::Result<Postgres, String>> = std::sync::OnceLock::new();
    SERVER
        .get_or_init(|| Postgres::start(false).map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| anyhow::anyhow!("{e}"))
}

/// A fresh, empty database on [`shared_postgres`], named after `prefix`; returns its URL.
pub fn fresh_postgres_database(prefix: &str) -> Result<String> {
    let name = format!("{prefix}_{}", next_id());
    shared_postgres()?.create_database(&name)
}

fn next_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// The `postgres` user's ids when this process is root, else `None` (run as ourselves).
fn as_postgres_user() -> Result<Option<(u32, u32)>> {
    let me = Command::new("id").arg("-u").output().context("cannot run id")?;
    if String::from_utf8_lossy(&me.stdout).trim() != "0" {
        return Ok(None);
    }
    let passwd = std::fs::read_to_string("/etc/passwd")?;
    let fields: Vec<&str> = passwd
        .lines()
        .find(|l| l.starts_with("postgres:"))
        .context("no postgres user (it comes with Debian's postgresql-15 package)")?
        .split(':')
        .collect();
    let id = |i: usize| fields.get(i).and_then(|f| f.parse().ok()).context("odd /etc/passwd");
    Ok(Some((id(2)?, id(3)?)))
}

/// `program`, run as `owner` when given, killed (SIGINT, PostgreSQL's fast shutdown) when the
/// thread that starts it ends.
fn user_command(owner: Option<(u32, u32)>, program: &Path) -> Command {
    let mut cmd = Command::new("setpriv");
    if let Some((uid, gid)) = owner {
        cmd.args([format!("--reuid={uid}"), format!("--regid={gid}"), "--clear-groups".to_owned()]);
    }
    cmd.args(["--pdeathsig", "INT", "--"]).arg(program);
    cmd
}

/// Spawns `cmd` from a thread that outlives every caller (it parks until the process ends), so
/// that the child's parent-death signal comes only when the process goes.
fn spawn_for_life(mut cmd: Command) -> Result<u32> {
    let (tx, rx) = mpsc::channel::<std::io::Result<Child>>();
    std::thread::spawn(move || {
        let child = cmd.spawn();
        let failed = child.is_err();
        let _ = tx.send(child);
        if !failed {
            loop {
                std::thread::park();
            }
        }
    });
    let child = rx.recv().context("the spawning thread ended")?.context("cannot start the server")?;
    Ok(child.id())
}

/// Removes `root/{prefix}{pid}-…` folders (and their logs) of processes that are gone.
fn remove_stale(root: &Path, prefix: &str) {
    let Ok(entries) = std::fs::read_dir(root) else { return };
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix(prefix).and_then(|r| r.split('-').next()) else { continue };
        if !Path::new("/proc").join(pid).exists() {
            let path = entry.path();
            let _ = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
        }
    }
}
