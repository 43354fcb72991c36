//! `rallypoint bench rooms`: full rooms of bots against one server process on one core.
//!
//! Bots (signed in with seeded sessions) queue for 16-player brawls and play as the browser
//! does: one input per tick, predicted and reconciled, plus a ping a second. Once every room
//! is playing, two windows are measured: a quiet one, and one with a login storm beside the
//! rooms. Room timings come from the server's own Prometheus histograms, scraped before and
//! after each window.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde::Serialize;

use super::{Backstage, ServerProcess, Storm, write_json};
use crate::bots::{Live, Tally, Transport, play_match_counted};
use crate::client::{Client, Conditions};
use shared::hub::ClientMsg;

#[derive(Debug, Args)]
pub struct RoomsArgs {
    /// Rooms to fill.
    #[arg(long, default_value_t = 48)]
    rooms: usize,
    #[command(flatten)]
    timing: Timing,
    /// Logins in flight during the storm window.
    #[arg(long, default_value_t = 16)]
    storm_concurrency: usize,
}

/// What the room benchmarks share: room size, how long to play, where to write the report.
#[derive(Debug, Args)]
pub(super) struct Timing {
    /// Players per room (the brawl mode takes up to 16).
    #[arg(long, default_value_t = 16)]
    pub players: usize,
    /// Seconds of play before measuring.
    #[arg(long, default_value_t = 5)]
    pub warmup: u64,
    /// Seconds of each measured window.
    #[arg(long, default_value_t = 15)]
    pub window: u64,
    /// Tokio workers of the server, pinned to as many cores from core 0.
    #[arg(long, default_value_t = 1)]
    pub server_workers: usize,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

pub(super) const PASSWORD: &str = "bench password 123";
const PREFIX: &str = "roombench";
pub(super) const TICK_HZ: f64 = 30.0;
/// The histogram of room tick compute times: its count is the number of room ticks.
const TICK_SECONDS: &str = "rallypoint_room_tick_seconds";

#[derive(Debug, Default, Serialize)]
pub(super) struct Window {
    seconds: f64,
    server_cpu_seconds: f64,
    room_ticks: u64,
    /// Everything the server did, divided by room ticks.
    pub(super) cpu_per_room_tick_ms: f64,
    tick_compute_p50_ms: f64,
    tick_compute_p99_ms: f64,
    tick_lateness_p50_ms: f64,
    tick_lateness_p99_ms: f64,
    input_to_snapshot_p50_ms: f64,
    input_to_snapshot_p99_ms: f64,
    /// A bare thread sleeping to deadlines on the server's core, at the same time: the floor
    /// this machine puts under any timer.
    reference_sleep_lateness_p50_ms: f64,
    reference_sleep_lateness_p99_ms: f64,
    down_bytes_per_player_per_s: f64,
    up_bytes_per_player_per_s: f64,
    snapshots_per_player_per_s: f64,
    /// Snapshot payloads the server sent (deltas where smaller than the view), per player...
    snapshot_bytes_per_player_per_s: f64,
    /// ...and what the same snapshots would have taken as whole views.
    snapshot_whole_bytes_per_player_per_s: f64,
    /// Everything on the wire (loopback) per player per second, both ways, with the IP and
    /// TCP/UDP headers, acknowledgements, DTLS and SCTP included.
    wire_bytes_per_player_per_s: f64,
    wire_packets_per_player_per_s: f64,
    /// Datagrams the WebRTC loops moved per `recvmmsg` and per `sendmmsg` call (absent when
    /// no datagram moved): how much the batched syscalls batch at this load.
    #[serde(skip_serializing_if = "Option::is_none")]
    udp_datagrams_per_recv_call: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    udp_datagrams_per_send_call: Option<f64>,
    /// CPU seconds of each tokio worker thread in the window.
    worker_cpu_seconds: Vec<f64>,
}

#[derive(Debug, Default, Serialize)]
struct Report {
    pinned_to_one_core: bool,
    rooms: usize,
    players: usize,
    tick_hz: f64,
    quiet: Window,
    during_login_storm: Window,
    logins_per_second: f64,
    /// 16 players per room, over the all-in CPU per room tick at 30 Hz.
    players_per_core_at_30hz: f64,
    corrections: u64,
    protocol_errors: u64,
}

pub async fn run(args: RoomsArgs, backstage: &dyn Backstage) -> Result<()> {
    let players = args.rooms * args.timing.players;
    eprintln!("seeding {players} users…");
    let (dir, url) = ServerProcess::prepare(backstage)?;
    let tokens = backstage.players(&url, PREFIX, players, PASSWORD).await?;
    let metrics_addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let max_rooms = (args.rooms + 8).to_string();
    let metrics = metrics_addr.to_string();
    let extra = [
        "--metrics-listen",
        &metrics,
        "--match-seconds",
        "3600",
        "--max-rooms",
        &max_rooms,
        "--lobby-capacity",
        "100000",
    ];
    let server = ServerProcess::start_on(dir, url, &extra, args.timing.server_workers).await?;
    let metrics_url = format!("http://{metrics_addr}/metrics");

    eprintln!("starting {players} bots in {} rooms of {}…", args.rooms, args.timing.players);
    let live = Arc::new(Live::default());
    let stop = Arc::new(tokio::sync::Notify::new());
    let bots = start_bots(&server.base, &tokens, Transport::Ws, &live, &stop).await;
    let started = Instant::now();
    wait_until_playing(&live, players).await?;
    eprintln!(
        "all {players} playing after {:.1} s; warming up {} s",
        started.elapsed().as_secs_f64(),
        args.timing.warmup
    );
    tokio::time::sleep(Duration::from_secs(args.timing.warmup)).await;

    let mut report = Report {
        pinned_to_one_core: server.pinned(),
        rooms: args.rooms,
        players,
        tick_hz: TICK_HZ,
        ..Report::default()
    };
    report.quiet = measure(&server, &metrics_url, &live, players, args.timing.window, async {}).await?;
    eprintln!("quiet: {}", serde_json::to_string(&report.quiet)?);
    let storm = Storm {
        base: server.base.clone(),
        prefix: PREFIX,
        password: PASSWORD,
        users: players,
        concurrency: args.storm_concurrency,
    };
    let logins = Arc::new(std::sync::Mutex::new((0, 0, Duration::ZERO)));
    let window = Duration::from_secs(args.timing.window);
    let during = {
        let logins = Arc::clone(&logins);
        async move {
            *logins.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = storm.run(window).await;
        }
    };
    report.during_login_storm = measure(&server, &metrics_url, &live, players, args.timing.window, during).await?;
    let (ok, _failed, took) = *logins.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    report.logins_per_second = ok as f64 / took.as_secs_f64().max(0.001);
    eprintln!(
        "during the storm ({:.1} logins/s): {}",
        report.logins_per_second,
        serde_json::to_string(&report.during_login_storm)?
    );
    report.players_per_core_at_30hz =
        args.timing.players as f64 * 1000.0 / (report.quiet.cpu_per_room_tick_ms.max(1e-6) * TICK_HZ);

    stop.notify_waiters();
    for bot in bots {
        if let Ok(tally) = bot.await {
            report.corrections += tally.corrections;
            report.protocol_errors += tally.errors.len() as u64;
        }
    }
    server.stop()?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    write_json(args.timing.json.as_ref(), &report)
}

/// Starts one bot per session token, queueing for brawls; they play until `stop`.
pub(super) async fn start_bots(
    base: &str,
    tokens: &[String],
    transport: Transport,
    live: &Arc<Live>,
    stop: &Arc<tokio::sync::Notify>,
) -> Vec<tokio::task::JoinHandle<Tally>> {
    let deadline = tokio::time::Instant::now() + Duration::from_hours(1);
    let mut bots = Vec::with_capacity(tokens.len());
    for (i, token) in tokens.iter().enumerate() {
        let (base, token, live, stop) = (base.to_owned(), token.clone(), Arc::clone(live), Arc::clone(stop));
        bots.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            tokio::select! {
                () = bot(&base, &token, transport, i as u64, deadline, &mut tally, &live) => {}
                () = stop.notified() => {}
            }
            tally
        }));
        if i % 64 == 63 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    bots
}

/// Waits until `players` bots receive snapshots.
pub(super) async fn wait_until_playing(live: &Live, players: usize) -> Result<()> {
    let started = Instant::now();
    while live.playing.load(Relaxed) < players as u64 {
        if started.elapsed() > Duration::from_mins(2) {
            bail!("only {} of {players} bots were playing after two minutes", live.playing.load(Relaxed));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// One bot: queue for a brawl, take the seat (and open a data channel over WebRTC), play.
async fn bot(
    base: &str,
    token: &str,
    transport: Transport,
    seed: u64,
    deadline: tokio::time::Instant,
    tally: &mut Tally,
    live: &Live,
) {
    let result: Result<()> = async {
        let client = Client::with_session(base, token)?;
        let mut hub = client.hub().await?;
        hub.send(&ClientMsg::FindMatch { mode: "brawl".into() }).await?;
        let (room_name, ticket) = hub.match_found(Duration::from_mins(2)).await?;
        let room = if transport == Transport::Webrtc {
            // Generous here: the bench opens many at once on a loaded machine; what it took
            // is what is reported.
            let limit = Duration::from_secs(30);
            let seat =
                client.seat_with_data_channel(&mut hub, &room_name, &ticket, limit, Conditions::default()).await?;
            let opened = seat.channel?;
            tally.seats_claimed.push(seat.seated);
            tally.data_channels.push(opened);
            tally.data_channels_ready.push(opened.max(seat.seated));
            seat.room
        } else {
            let found = Instant::now();
            let room = client.room_at::<shared::arena::Arena>(hub.room_url.as_deref(), &ticket).await?;
            tally.seats_claimed.push(found.elapsed());
            room
        };
        let _ = play_match_counted(room, deadline, seed, tally, Some(live), None).await;
        drop(hub);
        Ok(())
    }
    .await;
    if let Err(e) = result {
        tally.errors.push(format!("{e:#}"));
    }
}

/// Measures one window of `seconds` while `beside` runs.
pub(super) async fn measure(
    server: &ServerProcess,
    metrics_url: &str,
    live: &Live,
    players: usize,
    seconds: u64,
    beside: impl std::future::Future<Output = ()>,
) -> Result<Window> {
    let before = Scrape::take(metrics_url).await?;
    let (cpu0, down0, up0, snaps0) =
        (server.cpu()?, live.bytes_down.load(Relaxed), live.bytes_up.load(Relaxed), live.snapshots.load(Relaxed));
    let (workers0, wire0) = (server.worker_cpu()?, super::loopback_traffic()?);
    let t0 = Instant::now();
    let reference = reference_clock(server.pinned(), seconds);
    let ((), (), reference) = tokio::join!(tokio::time::sleep(Duration::from_secs(seconds)), beside, reference);
    let reference = reference?;
    let elapsed = t0.elapsed().as_secs_f64();
    let after = Scrape::take(metrics_url).await?;
    let cpu = server.cpu()?.saturating_sub(cpu0).as_secs_f64();
    let (workers, wire) = (server.worker_cpu()?, super::loopback_traffic()?);
    let worker_cpu_seconds =
        workers.iter().zip(&workers0).map(|(now, then)| now.saturating_sub(*then).as_secs_f64()).collect();
    let per_player = |now: u64, then: u64| (now - then) as f64 / players as f64 / elapsed;
    let ticks = after.count(TICK_SECONDS) - before.count(TICK_SECONDS);
    let q = |name: &str, p: f64| after.quantile_since(&before, name, p) * 1000.0;
    let per_call = |datagrams: &str, calls: &str| {
        let calls = after.total(calls) - before.total(calls);
        (calls > 0).then(|| (after.total(datagrams) - before.total(datagrams)) as f64 / calls as f64)
    };
    Ok(Window {
        seconds: elapsed,
        server_cpu_seconds: cpu,
        room_ticks: ticks,
        cpu_per_room_tick_ms: cpu * 1000.0 / ticks.max(1) as f64,
        tick_compute_p50_ms: q(TICK_SECONDS, 0.5),
        tick_compute_p99_ms: q(TICK_SECONDS, 0.99),
        tick_lateness_p50_ms: q("rallypoint_room_tick_lateness_seconds", 0.5),
        tick_lateness_p99_ms: q("rallypoint_room_tick_lateness_seconds", 0.99),
        input_to_snapshot_p50_ms: q("rallypoint_room_input_to_snapshot_seconds", 0.5),
        input_to_snapshot_p99_ms: q("rallypoint_room_input_to_snapshot_seconds", 0.99),
        reference_sleep_lateness_p50_ms: reference.p50_ms,
        reference_sleep_lateness_p99_ms: reference.p99_ms,
        down_bytes_per_player_per_s: per_player(live.bytes_down.load(Relaxed), down0),
        up_bytes_per_player_per_s: per_player(live.bytes_up.load(Relaxed), up0),
        snapshots_per_player_per_s: per_player(live.snapshots.load(Relaxed), snaps0),
        snapshot_bytes_per_player_per_s: per_player(
            after.total("rallypoint_room_snapshot_bytes_total"),
            before.total("rallypoint_room_snapshot_bytes_total"),
        ),
        snapshot_whole_bytes_per_player_per_s: per_player(
            after.total("rallypoint_room_snapshot_whole_bytes_total"),
            before.total("rallypoint_room_snapshot_whole_bytes_total"),
        ),
        wire_bytes_per_player_per_s: per_player(wire.0, wire0.0),
        wire_packets_per_player_per_s: per_player(wire.1, wire0.1),
        udp_datagrams_per_recv_call: per_call(
            "rallypoint_webrtc_datagrams_in_total",
            "rallypoint_webrtc_recv_calls_total",
        ),
        udp_datagrams_per_send_call: per_call(
            "rallypoint_webrtc_datagrams_out_total",
            "rallypoint_webrtc_send_calls_total",
        ),
        worker_cpu_seconds,
    })
}

/// Runs `rallypoint bench clock` on the server's core for `seconds`.
async fn reference_clock(pinned: bool, seconds: u64) -> Result<super::Percentiles> {
    let exe = std::env::current_exe()?;
    let mut cmd = if pinned {
        let mut cmd = tokio::process::Command::new("taskset");
        cmd.args(["-c", "0"]).arg(exe);
        cmd
    } else {
        tokio::process::Command::new(exe)
    };
    let out = cmd.args(["bench", "clock", "--seconds", &seconds.to_string()]).output().await?;
    serde_json::from_slice(&out.stdout).context("the reference clock's output")
}

/// Prometheus text, as scraped.
pub(super) struct Scrape(String);

impl Scrape {
    pub(super) async fn take(url: &str) -> Result<Self> {
        Ok(Self(reqwest::get(url).await?.error_for_status()?.text().await.context("metrics")?))
    }

    /// Waits until no room ticks: a room whose players left ticks on while it holds their
    /// seats, and its ticks would count in the next window.
    pub(super) async fn wait_for_no_rooms(url: &str) -> Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_mins(1);
        let ticks = |s: &Self| s.count(TICK_SECONDS);
        let mut seen = ticks(&Self::take(url).await?);
        loop {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let now = ticks(&Self::take(url).await?);
            if now == seen {
                return Ok(());
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "rooms still tick a minute after their players left"
            );
            seen = now;
        }
    }

    /// The samples of metric `name`, whatever their labels (every series carries `instance`):
    /// each as its labels' text and its value.
    fn samples<'a>(&'a self, name: &'a str) -> impl Iterator<Item = (&'a str, f64)> + 'a {
        self.0.lines().filter(|l| !l.starts_with('#')).filter_map(move |line| {
            let (head, value) = line.rsplit_once(' ')?;
            let (metric, labels) = head.split_once('{').map_or((head, ""), |(m, rest)| (m, rest.trim_end_matches('}')));
            (metric == name).then_some((labels, value.parse().ok()?))
        })
    }

    /// The sum of a metric's series, if it has any.
    fn value(&self, name: &str) -> Option<f64> {
        self.samples(name).map(|(_, v)| v).reduce(|a, b| a + b)
    }

    /// A counter's value.
    fn total(&self, name: &str) -> u64 {
        self.value(name).unwrap_or(0.0) as u64
    }

    fn count(&self, name: &str) -> u64 {
        self.value(&format!("{name}_count")).unwrap_or(0.0) as u64
    }

    /// Cumulative bucket counts by upper bound (summed over series).
    fn buckets(&self, name: &str) -> Vec<(f64, f64)> {
        let bucket = format!("{name}_bucket");
        let mut by_bound: Vec<(f64, f64)> = Vec::new();
        for (labels, count) in self.samples(&bucket) {
            let Some(le) = labels.split(',').find_map(|l| l.strip_prefix("le=\"")).map(|l| l.trim_end_matches('"'))
            else {
                continue;
            };
            let le = if le == "+Inf" {
                f64::INFINITY
            } else if let Ok(le) = le.parse() {
                le
            } else {
                continue;
            };
            match by_bound.iter_mut().find(|(b, _)| b.to_bits() == le.to_bits()) {
                Some((_, n)) => *n += count,
                None => by_bound.push((le, count)),
            }
        }
        by_bound.sort_by(|a, b| a.0.total_cmp(&b.0));
        by_bound
    }

    /// The `q` quantile of what was recorded between `earlier` and this scrape, interpolated
    /// within its bucket.
    pub(super) fn quantile_since(&self, earlier: &Self, name: &str, q: f64) -> f64 {
        let before = earlier.buckets(name);
        let diff: Vec<(f64, f64)> = self
            .buckets(name)
            .into_iter()
            .map(|(le, n)| {
                // Both scrapes list the same bucket bounds, printed identically.
                let earlier_count = before.iter().find(|(b, _)| b.to_bits() == le.to_bits()).map_or(0.0, |(_, c)| *c);
                (le, n - earlier_count)
            })
            .collect();
        let total = diff.last().map_or(0.0, |(_, n)| *n);
        if total == 0.0 {
            return 0.0;
        }
        let target = q * total;
        let mut lower = (0.0, 0.0);
        for (le, n) in diff {
            if n >= target {
                if le.is_infinite() {
                    return lower.0;
                }
                let span = (n - lower.1).max(1.0);
                return lower.0 + (le - lower.0) * (target - lower.1) / span;
            }
            lower = (le, n);
        }
        lower.0
    }
}
