//! A local cluster (`cargo xtask cluster`: PostgreSQL, NATS, two hubs, two room servers and
//! Caddy in front, for trying and testing by hand), and `rallypoint bench cluster`, which
//! measures what the cluster costs against one instance in the same run:
//! 1. chat delivery (presence and chat go the same way) to players on the sender's instance and
//!    to players on the other one, p50/p99;
//! 2. matches placed per second with the queue spread over two instances (one room server);
//! 3. the hubs' CPU per hub connection opened, alone and in the cluster (what the bus adds);
//! 4. logins per second with PostgreSQL against SQLite.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde::Serialize;
use shared::hub::{ClientMsg, ServerMsg};

use super::{Backstage, Percentiles, ServerProcess, Storm, write_json};
use crate::client::{Client, Hub};
use crate::services::{Nats, Postgres};

const PASSWORD: &str = "bench password 123";

/// Every core of the machine, for `taskset`.
fn all_cores() -> String {
    format!("0-{}", std::thread::available_parallelism().map_or(1, usize::from) - 1)
}

/// One `rallypoint serve` of a cluster (rooms on room servers only), on the shared database
/// and, given one, NATS.
async fn hub(backstage: &dyn Backstage, database: &str, nats: Option<&str>, extra: &[String]) -> Result<ServerProcess> {
    let (dir, _) = ServerProcess::prepare(backstage)?;
    let mut flags = vec!["--local-rooms".to_owned(), "off".to_owned()];
    if let Some(nats) = nats {
        flags.extend(["--nats-url".to_owned(), nats.to_owned()]);
    }
    flags.extend(extra.iter().cloned());
    ServerProcess::serve(dir, database.to_owned(), &flags, &all_cores(), 1).await
}

/// A `rallypoint room-server` registered through `hub_url`, or through `nats` when given
/// (`hub_url` then names the site).
async fn room_server(
    backstage: &dyn Backstage,
    (hub_url, nats): (&str, Option<&str>),
    token: &str,
    capacity: usize,
) -> Result<ServerProcess> {
    ServerProcess::room_server(backstage, (hub_url, token, nats), capacity, &all_cores(), 1).await
}

#[derive(Debug, Args)]
pub struct LocalClusterArgs {
    /// Where the load balancer listens (the URL to open).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// The built client (as for `rallypoint serve`).
    #[arg(long, default_value = "web/dist")]
    static_dir: PathBuf,
    /// Passed to the hubs (`rallypoint serve --match-seconds`): shorter matches, for tests.
    #[arg(long)]
    match_seconds: Option<u16>,
}

/// Starts PostgreSQL, NATS, two hubs, Caddy in front of them and two room servers (one
/// registered through NATS, one through Caddy), prints the URL, and runs until Ctrl-C.
pub async fn local(args: LocalClusterArgs, backstage: &dyn Backstage) -> Result<()> {
    let caddy_bin = PathBuf::from("/usr/bin/caddy");
    if !caddy_bin.exists() {
        bail!("Caddy is not installed (/usr/bin/caddy): `cargo xtask cluster` installs Debian's caddy");
    }
    eprintln!("starting PostgreSQL and NATS…");
    let (pg, nats) = tokio::task::spawn_blocking(|| anyhow::Ok((Postgres::start(true)?, Nats::start()?))).await??;
    let database = pg.create_database("rallypoint")?;
    let public = format!("http://127.0.0.1:{}", args.port);
    let static_dir = std::fs::canonicalize(&args.static_dir)
        .with_context(|| format!("no built client in {}: run `cargo xtask client`", args.static_dir.display()))?;
    let mut hubs = Vec::new();
    for n in 1..=2 {
        eprintln!("starting hub-{n}…");
        let extra: Vec<String> = [
            "--public-url",
            &public,
            "--trust-forwarded-for",
            "--instance",
            &format!("hub-{n}"),
            "--static-dir",
            &static_dir.display().to_string(),
        ]
        .iter()
        .map(|a| (*a).to_owned())
        .collect();
        let mut extra = extra;
        if let Some(seconds) = args.match_seconds {
            extra.extend(["--match-seconds".to_owned(), seconds.to_string()]);
        }
        hubs.push(hub(backstage, &database, Some(&nats.url()), &extra).await?);
    }
    let caddy = Caddy::start(&caddy_bin, args.port, &hubs)?;
    let mut rooms = Vec::new();
    // The first registers through NATS (an operator's own server on the cluster's network), the
    // second through the load balancer's WebSocket (as a community server would).
    for (n, through) in [(1, Some(nats.url())), (2, None)] {
        eprintln!(
            "starting room server room-{n} (registering through {})…",
            if through.is_some() { "NATS" } else { "Caddy" }
        );
        let token = backstage.room_token(&database, &format!("room-{n}")).await?;
        rooms.push(room_server(backstage, (&public, through.as_deref()), &token, 50).await?);
    }
    println!("Rallypoint cluster: open {public} (two tabs, two accounts, Play).");
    println!("  hubs: {}  (behind Caddy, round robin, health check /readyz)", bases(&hubs));
    println!("  room servers: {}", bases(&rooms));
    println!("  PostgreSQL: {database}   NATS: {}", nats.url());
    println!("Ctrl-C stops everything.");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    eprintln!("stopping…");
    for server in rooms.into_iter().chain(hubs) {
        let _ = server.stop();
    }
    drop(caddy);
    Ok(())
}

fn bases(servers: &[ServerProcess]) -> String {
    servers.iter().map(|s| s.base.as_str()).collect::<Vec<_>>().join(" ")
}

/// Caddy as the load balancer, killed when dropped.
struct Caddy {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Caddy {
    fn start(bin: &std::path::Path, port: u16, hubs: &[ServerProcess]) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let upstreams: Vec<String> = hubs.iter().map(|h| h.addr.to_string()).collect();
        let config = format!(
            "{{\n\tadmin off\n\tauto_https off\n}}\nhttp://127.0.0.1:{port} {{\n\treverse_proxy {} {{\n\t\tlb_policy round_robin\n\t\thealth_uri /readyz\n\t\thealth_interval 1s\n\t}}\n}}\n",
            upstreams.join(" ")
        );
        let file = dir.path().join("Caddyfile");
        std::fs::write(&file, config)?;
        let child = Command::new("setpriv")
            .args(["--pdeathsig", "KILL", "--"])
            .arg(bin)
            .args(["run", "--adapter", "caddyfile", "--config"])
            .arg(&file)
            .env("XDG_DATA_HOME", dir.path())
            .env("XDG_CONFIG_HOME", dir.path())
            .env("HOME", dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("caddy.log"))?)
            .spawn()
            .context("cannot start Caddy")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(dir.path().join("caddy.log")).unwrap_or_default();
                bail!("Caddy did not listen on {port} within 10 s:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Self { child, _dir: dir })
    }
}

impl Drop for Caddy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug, Args)]
pub struct ClusterArgs {
    /// Players listening on each instance during the chat phase.
    #[arg(long, default_value_t = 200)]
    listeners: usize,
    /// Chat lines sent (by as many players, a few per second each).
    #[arg(long, default_value_t = 200)]
    lines: usize,
    /// Duels queued at once, their players spread over both instances.
    #[arg(long, default_value_t = 256)]
    burst: usize,
    /// Hub connections opened to measure their CPU, alone and in the cluster.
    #[arg(long, default_value_t = 2000)]
    connections: usize,
    /// Seconds of each login storm.
    #[arg(long, default_value_t = 10)]
    storm_seconds: u64,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Debug, Default, Serialize)]
struct Report {
    /// Chat lines from a player on instance A, to players on A (as with one instance).
    chat_same_instance: Percentiles,
    /// The same lines, to players on instance B (through NATS).
    chat_other_instance: Percentiles,
    chat_lines_lost: u64,
    /// Opening a hub connection (upgrade, hello, welcome) at the instance that gives lobby places
    /// (the lease holder, A), one after another.
    hub_join_at_lease_holder: Percentiles,
    /// The same at the other instance, which asks the holder for each place over NATS.
    hub_join_at_other_instance: Percentiles,
    /// Duels queued at once, players alternating between the two instances, on a room server
    /// registered with A over a WebSocket.
    burst: super::fleet::Burst,
    /// The same with the room server registered through NATS.
    burst_room_server_through_nats: super::fleet::Burst,
    /// A hub's CPU per hub connection opened (sign-in, welcome, presence), alone.
    hub_cpu_per_connection_alone_ms: f64,
    /// The same in a cluster of two (the bus's share on top).
    hub_cpu_per_connection_clustered_ms: f64,
    logins_per_second_sqlite: f64,
    logins_per_second_postgres: f64,
}

pub async fn run(args: ClusterArgs, backstage: &dyn Backstage) -> Result<()> {
    let mut report = Report::default();
    let (pg, nats) = tokio::task::spawn_blocking(|| anyhow::Ok((Postgres::start(true)?, Nats::start()?))).await??;

    eprintln!("cluster of two: chat across instances…");
    let database = pg.create_database("cluster_chat")?;
    let a = hub(backstage, &database, Some(&nats.url()), &[]).await?;
    let b = hub(backstage, &database, Some(&nats.url()), &[]).await?;
    let tokens = backstage.players(&database, "chat", 2 * args.listeners + args.lines, PASSWORD).await?;
    chat(&args, &a, &b, &tokens, &mut report).await?;
    a.stop()?;
    b.stop()?;

    eprintln!("cluster of two: a burst of {} duels over both instances…", args.burst);
    let database = pg.create_database("cluster_burst")?;
    report.burst = burst(backstage, &database, (&nats.url(), false), args.burst).await?;
    eprintln!("the same burst, the room server registered through NATS…");
    let database = pg.create_database("cluster_burst_nats")?;
    report.burst_room_server_through_nats = burst(backstage, &database, (&nats.url(), true), args.burst).await?;

    eprintln!("hub CPU per connection, alone then clustered…");
    let database = pg.create_database("cluster_alone")?;
    let alone = hub(backstage, &database, None, &[]).await?;
    report.hub_cpu_per_connection_alone_ms = connection_cpu(backstage, &alone, &[&alone], args.connections).await?;
    alone.stop()?;
    let database = pg.create_database("cluster_conns")?;
    let a = hub(backstage, &database, Some(&nats.url()), &[]).await?;
    let b = hub(backstage, &database, Some(&nats.url()), &[]).await?;
    report.hub_cpu_per_connection_clustered_ms = connection_cpu(backstage, &a, &[&a, &b], args.connections).await?;
    a.stop()?;
    b.stop()?;

    eprintln!("logins per second, SQLite then PostgreSQL…");
    let (dir, sqlite) = ServerProcess::prepare(backstage)?;
    backstage.players(&sqlite, "storm", 64, PASSWORD).await?;
    let server = ServerProcess::start(dir, sqlite, &[]).await?;
    report.logins_per_second_sqlite = storm(&server, args.storm_seconds).await;
    server.stop()?;
    let database = pg.create_database("cluster_logins")?;
    backstage.players(&database, "storm", 64, PASSWORD).await?;
    let (dir, _) = ServerProcess::prepare(backstage)?;
    let server = ServerProcess::start(dir, database, &[]).await?;
    report.logins_per_second_postgres = storm(&server, args.storm_seconds).await;
    server.stop()?;

    println!("{}", serde_json::to_string_pretty(&report)?);
    write_json(args.json.as_ref(), &report)
}

/// `duels` queued at once on two hubs, players alternating between them, one room server
/// registered with the first (through NATS when `through_nats`).
async fn burst(
    backstage: &dyn Backstage,
    database: &str,
    (nats, through_nats): (&str, bool),
    duels: usize,
) -> Result<super::fleet::Burst> {
    let a = hub(backstage, database, Some(nats), &[]).await?;
    let b = hub(backstage, database, Some(nats), &[]).await?;
    let token = backstage.room_token(database, "bench").await?;
    let rooms = room_server(backstage, (&a.base, through_nats.then_some(nats)), &token, duels + 8).await?;
    tokio::time::sleep(Duration::from_secs(2)).await; // registered, and a matcher elected
    let tokens = backstage.players(database, "burst", 2 * duels, PASSWORD).await?;
    let burst = super::fleet::burst(&[&a, &b], &tokens).await?;
    rooms.stop()?;
    a.stop()?;
    b.stop()?;
    Ok(burst)
}

/// Listeners on both instances, senders on A; every line's time from send to each receipt.
async fn chat(
    args: &ClusterArgs,
    a: &ServerProcess,
    b: &ServerProcess,
    tokens: &[String],
    report: &mut Report,
) -> Result<()> {
    let (listen_a, rest) = tokens.split_at(args.listeners);
    let (listen_b, senders) = rest.split_at(args.listeners);
    let sent: Arc<std::sync::Mutex<std::collections::HashMap<String, Instant>>> = Arc::default();
    let mut listeners = Vec::new();
    // A started first, alone: it holds the lease (and gives lobby places).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (mut join_a, mut join_b) = (Vec::new(), Vec::new());
    for (base, group, same) in [(&a.base, listen_a, true), (&b.base, listen_b, false)] {
        for token in group {
            let client = Client::with_session(base, token)?;
            let started = Instant::now();
            let hub = client.hub().await?;
            if same { &mut join_a } else { &mut join_b }.push(started.elapsed());
            listeners.push((same, hub));
        }
    }
    report.hub_join_at_lease_holder = Percentiles::of(&join_a);
    report.hub_join_at_other_instance = Percentiles::of(&join_b);
    let mut sending = Vec::new();
    for token in senders {
        sending.push(Client::with_session(&a.base, token)?.hub().await?);
    }
    // Everyone hears of everyone before the clock starts.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let expected = senders.len();
    let receivers = listeners.into_iter().map(|(same, mut hub)| {
        let sent = Arc::clone(&sent);
        tokio::spawn(async move {
            let mut got = Vec::new();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            while got.len() < expected && tokio::time::Instant::now() < deadline {
                match tokio::time::timeout_at(deadline, hub.recv()).await {
                    Ok(Ok(ServerMsg::Chat(line))) => {
                        let at =
                            sent.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(&line.text).copied();
                        if let Some(at) = at {
                            got.push(at.elapsed());
                        }
                    }
                    Ok(Ok(_)) => {}
                    _ => break,
                }
            }
            (same, got)
        })
    });
    let receivers: Vec<_> = receivers.collect();
    // Paced: 50 lines a second, each sender once (within its chat allowance).
    for (i, hub) in sending.iter_mut().enumerate() {
        let text = format!("bench line {i}");
        sent.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(text.clone(), Instant::now());
        hub.send(&ClientMsg::Chat { text }).await?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (mut same, mut other) = (Vec::new(), Vec::new());
    let mut lost = 0;
    for r in futures_util::future::join_all(receivers).await {
        let (is_same, got) = r?;
        lost += (expected - got.len()) as u64;
        if is_same { same.extend(got) } else { other.extend(got) }
    }
    report.chat_same_instance = Percentiles::of(&same);
    report.chat_other_instance = Percentiles::of(&other);
    report.chat_lines_lost = lost;
    drop(sending);
    Ok(())
}

/// `measured`'s CPU per hub connection, `n` connections opened to the hubs in turn.
async fn connection_cpu(
    backstage: &dyn Backstage,
    measured: &ServerProcess,
    hubs: &[&ServerProcess],
    n: usize,
) -> Result<f64> {
    let tokens = backstage.players(&measured.database_url, "conn", n, PASSWORD).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cpu0 = measured.cpu()?;
    let mut open: Vec<Hub> = Vec::with_capacity(n);
    // Only `measured`'s own connections are counted; in a cluster, half land on the other hub
    // and cost `measured` only the bus's share.
    let mut mine = 0usize;
    for (i, token) in tokens.iter().enumerate() {
        let hub = hubs[i % hubs.len()];
        if std::ptr::eq(hub, measured) {
            mine += 1;
        }
        open.push(Client::with_session(&hub.base, token)?.hub().await?);
    }
    tokio::time::sleep(Duration::from_secs(1)).await; // presence flushed everywhere
    let cpu = measured.cpu()?.saturating_sub(cpu0);
    drop(open);
    Ok(cpu.as_secs_f64() * 1000.0 / mine.max(1) as f64)
}

async fn storm(server: &ServerProcess, seconds: u64) -> f64 {
    let storm = Storm { base: server.base.clone(), prefix: "storm", password: PASSWORD, users: 64, concurrency: 16 };
    let (ok, _, took) = storm.run(Duration::from_secs(seconds)).await;
    ok as f64 / took.as_secs_f64()
}
