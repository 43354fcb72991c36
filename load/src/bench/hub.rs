//! `rallypoint bench hub`: what one server process on one core holds and how fast it answers.
//!
//! 1. Idle authenticated hub connections: how many, how fast they open, server memory each.
//! 2. Chat fan-out latency in a lobby of `--chat-users` users, with everyone else still connected.
//! 3. Logins per second during a login storm, and WebSocket ping round trips before and during it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use serde::Serialize;
use shared::hub::{ClientMsg, ServerMsg};
use tokio::net::TcpSocket;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

use super::{Backstage, Percentiles, ServerProcess, Storm, client_source, write_json};
use crate::client::Hub;

#[derive(Debug, Args)]
pub struct HubArgs {
    /// Idle authenticated connections to open. (Every process here may open at most 20,000
    /// files, the server's listener, database and probes included.)
    #[arg(long, default_value_t = 19_900)]
    connections: usize,
    /// Connections this process holds itself; a second process holds the rest.
    #[arg(long, default_value_t = 9_900)]
    per_process: usize,
    /// Users per lobby (the chat fan-out is measured in one full lobby).
    #[arg(long, default_value_t = 1000)]
    chat_users: usize,
    /// Chat messages sent during the fan-out phase (one per sender, 20 per second).
    #[arg(long, default_value_t = 200)]
    chat_messages: usize,
    /// Seconds of the login storm (and of the quiet baseline before it).
    #[arg(long, default_value_t = 10)]
    storm_seconds: u64,
    /// Logins in flight at once during the storm.
    #[arg(long, default_value_t = 32)]
    storm_concurrency: usize,
    /// Connections that measure ping round trips.
    #[arg(long, default_value_t = 20)]
    probes: usize,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

const PASSWORD: &str = "bench password 123";
const PREFIX: &str = "bench";

#[derive(Debug, Default, Serialize)]
struct Report {
    pinned_to_one_core: bool,
    /// The server's limit on open files: it bounds the connections one process can hold.
    server_open_files_limit: u64,
    connections_requested: usize,
    connections_open: usize,
    connections_lost: usize,
    connect_seconds: f64,
    connects_per_second: f64,
    server_rss_start_kib: u64,
    server_rss_connected_kib: u64,
    server_bytes_per_connection: f64,
    server_cpu_seconds_connecting: f64,
    lobbies: usize,
    chat_lobby_users: usize,
    chat_deliveries: usize,
    chat_fanout: Percentiles,
    ping_quiet: Percentiles,
    ping_during_storm: Percentiles,
    storm_logins: usize,
    storm_failures: usize,
    logins_per_second: f64,
}

/// Shared by the tasks that hold connections.
struct Shared {
    epoch: Instant,
    /// When each benchmark chat message was sent, in µs after `epoch` (0 = not yet).
    sent_at: Vec<AtomicU64>,
    latencies: std::sync::Mutex<Vec<Duration>>,
    lost: AtomicUsize,
}

pub async fn run(args: HubArgs, backstage: &dyn Backstage) -> Result<()> {
    let mut report = Report { connections_requested: args.connections, ..Report::default() };
    let users = args.connections + args.probes;

    eprintln!("seeding {users} users with sessions…");
    let (dir, url) = ServerProcess::prepare(backstage)?;
    let tokens = backstage.players(&url, PREFIX, users, PASSWORD).await?;
    let lobby = args.chat_users.to_string();
    let server = ServerProcess::start(dir, url, &["--lobby-capacity", &lobby]).await?;
    report.pinned_to_one_core = server.pinned();
    report.server_open_files_limit = server.open_files_limit()?;
    report.server_rss_start_kib = server.rss_kib()?;
    eprintln!("server pid {} on {} ({} KiB resident)", server.pid(), server.addr, report.server_rss_start_kib);

    // 1. Idle connections.
    let shared = Arc::new(Shared {
        epoch: Instant::now(),
        sent_at: (0..args.chat_messages).map(|_| AtomicU64::new(0)).collect(),
        latencies: std::sync::Mutex::new(Vec::new()),
        lost: AtomicUsize::new(0),
    });
    let cpu_before = server.cpu()?;
    let started = Instant::now();
    let local = args.connections.min(args.per_process);
    // This process first, so that lobby 1 (where chat is measured) is made of its connections.
    let held = connect_all(&server.addr, &tokens[..local], 0, &shared).await?;
    let helper = if local < args.connections {
        Some(Helper::start(&server.addr, &tokens[local..args.connections], local).await?)
    } else {
        None
    };
    report.connect_seconds = started.elapsed().as_secs_f64();
    report.server_cpu_seconds_connecting = server.cpu()?.saturating_sub(cpu_before).as_secs_f64();
    report.connections_open = held.len() + helper.as_ref().map_or(0, |h| h.open);
    report.connects_per_second = report.connections_open as f64 / report.connect_seconds;
    // Let the last presence batches go out before measuring memory.
    tokio::time::sleep(Duration::from_millis(500)).await;
    report.server_rss_connected_kib = server.rss_kib()?;
    report.server_bytes_per_connection =
        (report.server_rss_connected_kib.saturating_sub(report.server_rss_start_kib)) as f64 * 1024.0
            / report.connections_open.max(1) as f64;
    report.lobbies = report.connections_open.div_ceil(args.chat_users);
    eprintln!(
        "{} connections open in {:.1} s ({:.0}/s); server {} KiB resident, {:.0} bytes per connection",
        report.connections_open,
        report.connect_seconds,
        report.connects_per_second,
        report.server_rss_connected_kib,
        report.server_bytes_per_connection
    );

    // 2. Chat fan-out in lobby 1.
    let lobby_one: Vec<&Held> = held.iter().filter(|h| h.lobby == 1).collect();
    report.chat_lobby_users = lobby_one.len();
    eprintln!("chat fan-out: {} messages in a lobby of {} users…", args.chat_messages, lobby_one.len());
    let mut pace = tokio::time::interval(Duration::from_millis(50));
    for id in 0..args.chat_messages {
        pace.tick().await;
        let sender = lobby_one[id % lobby_one.len()];
        let now = shared.epoch.elapsed().as_micros() as u64;
        shared.sent_at[id].store(now.max(1), Ordering::Release);
        let _ = sender.commands.send(format!("bench {id}")).await;
    }
    // Wait for the stragglers (a message takes well under a second).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let latencies = std::mem::take(&mut *shared.latencies.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
    report.chat_deliveries = latencies.len();
    report.chat_fanout = Percentiles::of(&latencies);
    eprintln!("chat fan-out: {} deliveries, {}", report.chat_deliveries, report.chat_fanout);

    // 3. Ping round trips, quiet then during a login storm.
    let probe_tokens = &tokens[args.connections..];
    let quiet = probe_pings(&server, probe_tokens, Duration::from_secs(args.storm_seconds), None).await?;
    report.ping_quiet = Percentiles::of(&quiet);
    eprintln!("ping, quiet: {}", report.ping_quiet);
    let storm = Storm {
        base: server.base.clone(),
        prefix: PREFIX,
        password: PASSWORD,
        users: args.connections,
        concurrency: args.storm_concurrency,
    };
    let (pings, (logins, failures, elapsed)) = tokio::join!(
        probe_pings(&server, probe_tokens, Duration::from_secs(args.storm_seconds), Some(Duration::from_secs(1))),
        storm.run(Duration::from_secs(args.storm_seconds)),
    );
    report.ping_during_storm = Percentiles::of(&pings?);
    report.storm_logins = logins;
    report.storm_failures = failures;
    report.logins_per_second = logins as f64 / elapsed.as_secs_f64();
    eprintln!("ping during the storm: {}", report.ping_during_storm);
    eprintln!(
        "login storm: {logins} logins ({failures} failed) in {:.1} s = {:.1}/s",
        elapsed.as_secs_f64(),
        report.logins_per_second
    );

    report.connections_lost = shared.lost.load(Ordering::Relaxed);
    if let Some(helper) = helper {
        report.connections_lost += helper.finish().await?;
    }
    drop(held);
    server.stop()?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    write_json(args.json.as_ref(), &report)
}

/// A connection held open by a task that drains it and records chat latencies.
struct Held {
    lobby: u32,
    commands: mpsc::Sender<String>,
}

async fn connect_all(
    addr: &SocketAddr,
    tokens: &[String],
    first_source: usize,
    shared: &Arc<Shared>,
) -> Result<Vec<Held>> {
    use futures_util::StreamExt as _;
    let done = AtomicUsize::new(0);
    let total = tokens.len();
    let results: Vec<Result<Held>> = futures_util::stream::iter(tokens.iter().enumerate())
        .map(|(i, token)| {
            let done = &done;
            async move {
                let held = connect_one(addr, first_source + i, token, shared).await;
                let n = done.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_multiple_of(2000) || n == total {
                    eprintln!("  {n}/{total} connected");
                }
                held
            }
        })
        .buffer_unordered(256)
        .collect()
        .await;
    results.into_iter().collect()
}

async fn open(addr: &SocketAddr, i: usize, token: &str) -> Result<Hub> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(client_source(i), 0))?;
    let stream = socket.connect(*addr).await.context("connect")?;
    let url = format!("ws://{addr}/ws");
    let mut request = url.as_str().into_client_request()?;
    request.headers_mut().insert("cookie", format!("rp_session={token}").parse()?);
    Ok(Hub::open(request, Some(stream)).await?)
}

async fn connect_one(addr: &SocketAddr, i: usize, token: &str, shared: &Arc<Shared>) -> Result<Held> {
    let mut hub = open(addr, i, token).await.with_context(|| format!("connection {i}"))?;
    let ServerMsg::Welcome { lobby, .. } = hub.welcome else { unreachable!("Hub::open checks the welcome") };
    let (commands, mut rx) = mpsc::channel::<String>(4);
    let shared = Arc::clone(shared);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                msg = hub.recv() => match msg {
                    Ok(ServerMsg::Chat(line)) => record(&shared, &line.text),
                    Ok(_) => {}
                    Err(_) => {
                        shared.lost.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                },
                command = rx.recv() => {
                    let Some(text) = command else {
                        hub.close().await;
                        return;
                    };
                    if hub.send(&ClientMsg::Chat { text }).await.is_err() {
                        shared.lost.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                }
            }
        }
    });
    Ok(Held { lobby, commands })
}

fn record(shared: &Shared, text: &str) {
    let Some(id) = text.strip_prefix("bench ").and_then(|n| n.parse::<usize>().ok()) else {
        return;
    };
    let Some(sent) = shared.sent_at.get(id).map(|s| s.load(Ordering::Acquire)).filter(|&s| s > 0) else {
        return;
    };
    let now = shared.epoch.elapsed().as_micros() as u64;
    let latency = Duration::from_micros(now.saturating_sub(sent));
    shared.latencies.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(latency);
}

/// Pings from the probe connections every 20 ms for `length` (after `delay`); returns the
/// round-trip times.
async fn probe_pings(
    server: &ServerProcess,
    tokens: &[String],
    length: Duration,
    delay: Option<Duration>,
) -> Result<Vec<Duration>> {
    let mut probes = Vec::new();
    for (i, token) in tokens.iter().enumerate() {
        probes.push(open(&server.addr, 30_000 + i, token).await?);
    }
    if let Some(delay) = delay {
        // Let the storm get going first.
        tokio::time::sleep(delay).await;
    }
    let deadline = tokio::time::Instant::now() + length;
    let tasks = probes.into_iter().map(|mut hub| async move {
        let mut rtts = Vec::new();
        let mut every = tokio::time::interval(Duration::from_millis(20));
        while tokio::time::Instant::now() < deadline {
            every.tick().await;
            if let Ok(rtt) = hub.ws_ping().await {
                rtts.push(rtt);
            }
        }
        hub.close().await;
        rtts
    });
    Ok(futures_util::future::join_all(tasks).await.into_iter().flatten().collect())
}

#[derive(Debug, Args)]
pub struct HoldArgs {
    /// The server's address.
    #[arg(long)]
    addr: SocketAddr,
    /// A file of session tokens, one per line: one connection each.
    #[arg(long)]
    tokens: PathBuf,
    /// Index of the first connection (spreads source addresses).
    #[arg(long, default_value_t = 0)]
    first: usize,
}

/// `rallypoint bench hold`: opens one connection per token, prints `ready OPEN`, holds them
/// until standard input closes, then prints `lost N` (connections the server dropped).
pub async fn hold(args: HoldArgs) -> Result<()> {
    use tokio::io::AsyncReadExt as _;
    let tokens: Vec<String> = std::fs::read_to_string(&args.tokens)?.lines().map(str::to_owned).collect();
    let shared = Arc::new(Shared {
        epoch: Instant::now(),
        sent_at: Vec::new(),
        latencies: std::sync::Mutex::new(Vec::new()),
        lost: AtomicUsize::new(0),
    });
    let held = connect_all(&args.addr, &tokens, args.first, &shared).await?;
    println!("ready {}", held.len());
    let mut rest = Vec::new();
    tokio::io::stdin().read_to_end(&mut rest).await?;
    println!("lost {}", shared.lost.load(Ordering::Relaxed));
    drop(held);
    Ok(())
}

/// A `rallypoint bench hold` child process.
struct Helper {
    child: tokio::process::Child,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    open: usize,
    _tokens: tempfile::NamedTempFile,
}

impl Helper {
    async fn start(addr: &SocketAddr, tokens: &[String], first: usize) -> Result<Self> {
        use std::io::Write as _;
        use tokio::io::AsyncBufReadExt as _;
        let mut file = tempfile::NamedTempFile::new()?;
        file.write_all(tokens.join("\n").as_bytes())?;
        let mut child = tokio::process::Command::new(std::env::current_exe()?)
            .args(["bench", "hold", "--addr", &addr.to_string(), "--first", &first.to_string(), "--tokens"])
            .arg(file.path())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start the helper process")?;
        let stdout = child.stdout.take().context("no helper stdout")?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let ready = lines.next_line().await?.context("the helper process ended early")?;
        let open = ready.strip_prefix("ready ").and_then(|n| n.parse().ok()).context("odd helper output")?;
        Ok(Self { child, lines, open, _tokens: file })
    }

    /// Closes the helper's connections; returns how many the server had dropped.
    async fn finish(mut self) -> Result<usize> {
        drop(self.child.stdin.take());
        let line = self.lines.next_line().await?.unwrap_or_default();
        self.child.wait().await?;
        Ok(line.strip_prefix("lost ").and_then(|n| n.parse().ok()).unwrap_or(0))
    }
}
