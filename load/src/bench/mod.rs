//! Benchmarks, run by `cargo xtask bench …` as `rallypoint bench …`. Each one starts a real
//! `rallypoint serve` child process pinned to one core (`taskset -c 0`, one tokio worker) and
//! drives it over loopback with native clients from this process, then prints a report.
//! Bounded: every phase has a fixed size and duration, and the run stops by itself.

mod cluster;
mod fleet;
mod hub;
mod reconnect;
pub mod relay;
mod rooms;
mod soak;
mod webrtc;

pub use crate::stats::{Percentiles, quantile};

use futures_util::future::BoxFuture;

use std::net::SocketAddr;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    which: Which,
}

#[derive(Debug, Subcommand)]
enum Which {
    /// Idle connections and memory per connection, chat fan-out, logins under load.
    Hub(hub::HubArgs),
    /// The same full rooms all in one process, then on a room server behind a hub: what the
    /// split costs, and "match found" to every seat claimed on the room server.
    Fleet(fleet::FleetArgs),
    /// Full rooms of bots: CPU per tick, players per core, bytes per player, latencies.
    Rooms(rooms::RoomsArgs),
    /// The same rooms over WebSocket and over WebRTC: connect time, memory per peer, CPU, bytes.
    Webrtc(webrtc::WebrtcArgs),
    /// Bots whose room connections a relay cuts at random: how many take their seat back.
    Reconnect(reconnect::ReconnectArgs),
    /// Bots joining, playing, dropping and coming back, signing out and in, for a long time:
    /// memory and open files must stay flat, and no result may be lost.
    Soak(soak::SoakArgs),
    /// Two hubs on PostgreSQL and NATS against one: chat across instances, placement with the
    /// queue spread over both, CPU per hub connection, logins per second on each database.
    Cluster(cluster::ClusterArgs),
    /// Starts a local cluster to try by hand (`cargo xtask cluster`): PostgreSQL, NATS, two
    /// hubs behind Caddy, two room servers.
    LocalCluster(cluster::LocalClusterArgs),
    /// Measures how late plain timed sleeps wake up on this core: the floor under room ticks.
    Clock(ClockArgs),
    /// Holds idle hub connections for `bench hub` (a second process: each process here may
    /// open only 20,000 files).
    Hold(hub::HoldArgs),
}

/// What the benchmarks need done in a server's database, which only the server knows how to
/// do: the `rallypoint` binary provides it from the server library, which this crate does not
/// link (the load tools drive the server from outside, as players and operators do).
pub trait Backstage: Send + Sync {
    /// Creates the users `{prefix}0`, `{prefix}1`, … with `password` and a day-long session
    /// each, and returns the sessions' tokens (the `session` cookie) in that order.
    fn players<'a>(
        &'a self,
        database_url: &'a str,
        prefix: &'a str,
        count: usize,
        password: &'a str,
    ) -> BoxFuture<'a, Result<Vec<String>>>;
    /// Creates an official room server's token, named `name`, and returns it.
    fn room_token<'a>(&'a self, database_url: &'a str, name: &'a str) -> BoxFuture<'a, Result<String>>;
    /// How many players' results the database holds (two for a finished duel).
    fn results<'a>(&'a self, database_url: &'a str) -> BoxFuture<'a, Result<i64>>;
    /// The file that `--static-dir` must hold for the server to start.
    fn client_js(&self) -> &'static str;
}

/// Runs the chosen benchmark (the caller raises the limit on open files first).
pub fn run(args: BenchArgs, backstage: &dyn Backstage) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        match args.which {
            Which::Hub(args) => hub::run(args, backstage).await,
            Which::Fleet(args) => fleet::run(args, backstage).await,
            Which::Rooms(args) => rooms::run(args, backstage).await,
            Which::Webrtc(args) => webrtc::run(args, backstage).await,
            Which::Reconnect(args) => reconnect::run(args, backstage).await,
            Which::Soak(args) => soak::run(args, backstage).await,
            Which::Cluster(args) => cluster::run(args, backstage).await,
            Which::LocalCluster(args) => cluster::local(args, backstage).await,
            Which::Clock(args) => {
                println!("{}", serde_json::to_string(&clock(&args))?);
                Ok(())
            }
            Which::Hold(args) => hub::hold(args).await,
        }
    })
}

#[derive(Debug, Args)]
pub struct ClockArgs {
    /// Wake-ups per second.
    #[arg(long, default_value_t = 480)]
    hz: u32,
    /// How long to measure.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
}

/// How late a thread that sleeps until fixed deadlines wakes up, with nothing else to do.
pub fn clock(args: &ClockArgs) -> Percentiles {
    let start = std::time::Instant::now();
    let period = Duration::from_secs(1) / args.hz.max(1);
    let mut late = Vec::new();
    for n in 1..=u64::from(args.hz) * args.seconds {
        let due = start + period * n as u32;
        if let Some(wait) = due.checked_duration_since(std::time::Instant::now()) {
            std::thread::sleep(wait);
        }
        late.push(std::time::Instant::now().saturating_duration_since(due));
    }
    Percentiles::of(&late)
}

/// A `rallypoint serve` child process with its own database.
pub struct ServerProcess {
    child: Child,
    pub addr: SocketAddr,
    pub base: String,
    pub database_url: String,
    _dir: tempfile::TempDir,
    pinned: bool,
}

impl ServerProcess {
    /// A folder for the server's database and static files, and the database URL.
    pub fn prepare(backstage: &dyn Backstage) -> Result<(tempfile::TempDir, String)> {
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join(backstage.client_js()), "")?;
        let url = format!("sqlite://{}", dir.path().join("bench.db").display());
        Ok((dir, url))
    }

    /// Starts the server on core 0 with one tokio worker and waits until it answers.
    pub async fn start(dir: tempfile::TempDir, database_url: String, extra: &[&str]) -> Result<Self> {
        Self::start_on(dir, database_url, extra, 1).await
    }

    /// Starts the server with `workers` tokio workers pinned to cores 0..workers, and waits
    /// until it answers. RALLYPOINT_BENCH_SERVER names another `rallypoint` binary to measure
    /// (an older build, to compare in one sitting) instead of this one.
    pub async fn start_on(
        dir: tempfile::TempDir,
        database_url: String,
        extra: &[&str],
        workers: usize,
    ) -> Result<Self> {
        let workers = workers.max(1);
        let extra: Vec<String> = extra.iter().map(|a| (*a).to_owned()).collect();
        Self::serve(dir, database_url, &extra, &format!("0-{}", workers - 1), workers).await
    }

    /// `rallypoint serve` on `database_url` with `extra` flags, pinned to `cores` with
    /// `workers` tokio workers; its static files are `dir`'s unless `extra` names a folder.
    pub async fn serve(
        dir: tempfile::TempDir,
        database_url: String,
        extra: &[String],
        cores: &str,
        workers: usize,
    ) -> Result<Self> {
        let addr = free_addr()?;
        let mut args: Vec<String> = ["serve", "--listen", &addr.to_string(), "--database-url", &database_url]
            .iter()
            .map(|a| (*a).to_owned())
            .collect();
        if !extra.iter().any(|a| a == "--static-dir") {
            args.extend(["--static-dir".to_owned(), dir.path().display().to_string()]);
        }
        args.extend(["--max-connections", "100000", "--log", "warn"].map(str::to_owned));
        args.extend(extra.iter().cloned());
        Self::spawn(dir, database_url, addr, &args, cores, workers).await
    }

    /// `rallypoint room-server` for `capacity` rooms, registered with the hub at `hub_url` under
    /// `token`, pinned to `cores` with `workers` tokio workers; waits until it answers.
    pub async fn room_server(
        backstage: &dyn Backstage,
        (hub_url, token, nats): (&str, &str, Option<&str>),
        capacity: usize,
        cores: &str,
        workers: usize,
    ) -> Result<Self> {
        let (dir, url) = Self::prepare(backstage)?;
        let addr = free_addr()?;
        let mut args: Vec<String> = [
            "room-server",
            "--hub",
            hub_url,
            "--token",
            token,
            "--listen",
            &addr.to_string(),
            "--public-url",
            &format!("http://{addr}"),
            "--capacity",
            &capacity.to_string(),
            "--log",
            "warn",
            "--data-dir",
            &dir.path().display().to_string(),
        ]
        .iter()
        .map(|a| (*a).to_owned())
        .collect();
        if let Some(nats) = nats {
            args.extend(["--nats-url".to_owned(), nats.to_owned()]);
        }
        Self::spawn(dir, url, addr, &args, cores, workers).await
    }

    /// Runs `rallypoint ARGS` (which must serve `/healthz` on `addr`) pinned to `cores` with
    /// `workers` tokio workers, and waits until it answers.
    pub async fn spawn(
        dir: tempfile::TempDir,
        database_url: String,
        addr: SocketAddr,
        args: &[String],
        cores: &str,
        workers: usize,
    ) -> Result<Self> {
        let exe = match std::env::var_os("RALLYPOINT_BENCH_SERVER") {
            Some(path) => PathBuf::from(path),
            None => std::env::current_exe()?,
        };
        let pinned = Path::new("/usr/bin/taskset").exists();
        // RALLYPOINT_BENCH_WRAP runs the server under a profiler, e.g. "heaptrack" or "perf record".
        let wrap: Vec<String> =
            std::env::var("RALLYPOINT_BENCH_WRAP").unwrap_or_default().split_whitespace().map(String::from).collect();
        // Killed with this process, however it ends (a parent-death signal: the spawning thread
        // is a runtime worker, which lives as long as the benchmark).
        let mut argv: Vec<std::ffi::OsString> =
            vec!["setpriv".into(), "--pdeathsig".into(), "KILL".into(), "--".into()];
        if pinned {
            argv.extend(["taskset".into(), "-c".into(), cores.into()]);
        }
        argv.extend(wrap.into_iter().map(Into::into));
        argv.push(exe.into_os_string());
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .args(args)
            .env("TOKIO_WORKER_THREADS", workers.max(1).to_string())
            .stdin(Stdio::null())
            // Its own process group, so that signals reach it through taskset or a profiler.
            .process_group(0);
        let child = cmd.spawn().context("cannot start the server")?;
        let server = Self { child, addr, base: format!("http://{addr}"), database_url, _dir: dir, pinned };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if reqwest::get(format!("{}/healthz", server.base)).await.is_ok_and(|r| r.status().is_success()) {
                return Ok(server);
            }
            if tokio::time::Instant::now() > deadline {
                bail!("the server did not start within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn pinned(&self) -> bool {
        self.pinned
    }

    /// Resident memory in KiB.
    pub fn rss_kib(&self) -> Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .context("no VmRSS in /proc/PID/status")
    }

    /// The soft limit on open files that the server runs with.
    pub fn open_files_limit(&self) -> Result<u64> {
        let limits = std::fs::read_to_string(format!("/proc/{}/limits", self.pid()))?;
        limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .and_then(|l| l.split_whitespace().nth(3))
            .and_then(|v| v.parse().ok())
            .context("no open-files limit in /proc/PID/limits")
    }

    /// CPU time used so far (user + system).
    pub fn cpu(&self) -> Result<Duration> {
        cpu_of(self.pid())
    }

    /// CPU time used so far by each tokio worker thread, in thread order.
    pub fn worker_cpu(&self) -> Result<Vec<Duration>> {
        let mut workers = Vec::new();
        let mut tasks: Vec<_> =
            std::fs::read_dir(format!("/proc/{}/task", self.pid()))?.filter_map(Result::ok).collect();
        tasks.sort_by_key(std::fs::DirEntry::file_name);
        for task in tasks {
            let stat = std::fs::read_to_string(task.path().join("stat"))?;
            // Tokio names its workers "tokio-rt-worker" ("tokio-runtime-worker", cut to 15 bytes, before).
            if stat.contains("(tokio-rt-worker") || stat.contains("(tokio-runtime-w") {
                workers.push(cpu_of_stat(&stat)?);
            }
        }
        Ok(workers)
    }

    /// Stops the server with SIGTERM and waits for it.
    pub fn stop(mut self) -> Result<()> {
        self.signal("TERM");
        self.child.wait()?;
        Ok(())
    }

    fn signal(&self, name: &str) {
        let group = format!("-{}", self.pid());
        let _ = Command::new("kill").args(["-s", name, "--", &group]).status();
    }
}

impl Drop for ServerProcess {
    /// A benchmark that fails half-way leaves no server behind.
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.signal("KILL");
            let _ = self.child.wait();
        }
    }
}

/// CPU time of a process: fields 14 and 15 of /proc/PID/stat, in clock ticks of 1/100 s
/// (Linux's USER_HZ).
pub fn cpu_of(pid: u32) -> Result<Duration> {
    cpu_of_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat"))?)
}

/// CPU time in a process's or thread's `stat` line.
fn cpu_of_stat(stat: &str) -> Result<Duration> {
    let after_name = stat.rsplit_once(')').map(|(_, rest)| rest).context("odd /proc/PID/stat")?;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks: u64 =
        fields.get(11..13).context("short /proc/PID/stat")?.iter().filter_map(|f| f.parse::<u64>().ok()).sum();
    Ok(Duration::from_millis(ticks * 10))
}

/// Bytes and packets the loopback interface has carried so far (every byte between the
/// benchmark's clients and the server, with its IP, UDP or TCP headers).
pub fn loopback_traffic() -> Result<(u64, u64)> {
    let dev = std::fs::read_to_string("/proc/net/dev")?;
    let line = dev.lines().find_map(|l| l.trim_start().strip_prefix("lo:")).context("no lo in /proc/net/dev")?;
    let fields: Vec<u64> = line.split_whitespace().filter_map(|f| f.parse().ok()).collect();
    Ok((*fields.first().context("odd /proc/net/dev")?, *fields.get(1).context("odd /proc/net/dev")?))
}

fn free_addr() -> Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// Source addresses for client sockets: spread over 127.0.0.2–127.0.0.201 so that no one
/// address runs out of ephemeral ports.
pub fn client_source(i: usize) -> std::net::IpAddr {
    std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2 + (i % 200) as u8))
}

/// Where a report is written when asked for JSON.
pub fn write_json(path: Option<&PathBuf>, report: &impl serde::Serialize) -> Result<()> {
    if let Some(path) = path {
        std::fs::write(path, serde_json::to_string_pretty(report)?)?;
        eprintln!("report written to {}", path.display());
    }
    Ok(())
}

/// Logins as fast as `concurrency` browsers can do them: each fetches the form, posts it, and
/// is signed in (one argon2id verification each).
pub struct Storm {
    pub base: String,
    pub prefix: &'static str,
    pub password: &'static str,
    pub users: usize,
    pub concurrency: usize,
}

impl Storm {
    pub async fn run(&self, length: Duration) -> (usize, usize, Duration) {
        let start = std::time::Instant::now();
        let stop = std::sync::atomic::AtomicBool::new(false);
        let next = std::sync::atomic::AtomicUsize::new(0);
        let ok = std::sync::atomic::AtomicUsize::new(0);
        let failed = std::sync::atomic::AtomicUsize::new(0);
        let workers = (0..self.concurrency).map(|_| async {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % self.users;
                let Ok(client) = crate::client::Client::new(&self.base) else {
                    break;
                };
                match client.login(&format!("{}{i}", self.prefix), self.password).await {
                    Ok(()) => ok.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                    Err(_) => failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                };
            }
        });
        let timer = async {
            tokio::time::sleep(length).await;
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        };
        tokio::join!(futures_util::future::join_all(workers), timer);
        (
            ok.load(std::sync::atomic::Ordering::Relaxed),
            failed.load(std::sync::atomic::Ordering::Relaxed),
            start.elapsed(),
        )
    }
}
