//! `rallypoint bench webrtc`: the same 16-player rooms over the WebSocket, then over WebRTC
//! data channels, against one server process, in one run; then a storm of data channels
//! opening at once while other rooms keep the server busy.
//!
//! Reports per transport the all-in server CPU per room tick (and per worker thread), the
//! bytes per player per second in payload and on the wire, the server's memory per peer
//! connection, and the time from room assignment (the hub's `match_found`) to an open data
//! channel, quiet and in the storm.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use serde::Serialize;

use super::relay::Relay;
use super::rooms::{PASSWORD, Scrape, TICK_HZ, Timing, Window, measure, start_bots, wait_until_playing};
use super::{Backstage, Percentiles, ServerProcess, write_json};
use crate::bots::{Live, Tally, Transport};
use crate::client::{Client, Conditions};
use shared::arena::Arena;
use shared::hub::ClientMsg;
use shared::room::ToRoom;

#[derive(Debug, Args)]
pub struct WebrtcArgs {
    /// Rooms per transport.
    #[arg(long, default_value_t = 4)]
    rooms: usize,
    /// Rooms of WebRTC players that join at once in the storm (16 rooms: 256 peers).
    #[arg(long, default_value_t = 16)]
    storm_rooms: usize,
    /// WebSocket rooms that keep the server busy during the storm.
    #[arg(long, default_value_t = 24)]
    load_rooms: usize,
    /// Delay each way, in milliseconds, of the network that the far duels' players reach the
    /// server through (a delaying TCP relay for their WebSockets, their own conditioner for the
    /// data channel): when their channel opens with the offer after the join and beside it.
    #[arg(long, default_value_t = 50)]
    far_latency_ms: u64,
    /// Far duels of each kind, alternated (0: none).
    #[arg(long, default_value_t = 8)]
    far_duels: usize,
    #[command(flatten)]
    timing: Timing,
}

const PREFIX: &str = "rtcbench";

#[derive(Debug, Default, Serialize)]
struct Report {
    pinned: bool,
    server_workers: usize,
    rooms_per_transport: usize,
    players_per_room: usize,
    data_channels_opened: usize,
    /// From the hub's `match_found` to the data channel's `open`; the offer goes out with the
    /// seat's ticket while the room WebSocket joins (as in the browser).
    data_channel_open_p50_ms: f64,
    data_channel_open_p99_ms: f64,
    /// From `match_found` until the channel is open and the seat taken (the later of the two):
    /// when play over the channel can begin.
    data_channel_ready_p50_ms: f64,
    data_channel_ready_p99_ms: f64,
    /// The server's own view: from answering the offer to the channel's opening.
    server_open_p50_ms: f64,
    server_open_p99_ms: f64,
    server_rss_after_websocket_rooms_kib: u64,
    server_rss_with_webrtc_rooms_kib: u64,
    /// The growth from the WebSocket phase (same rooms, same players, connections closed and
    /// memory kept by the allocator) to the WebRTC phase, per peer connection; one WebRTC room
    /// has played before both, so one-time costs are not counted.
    server_memory_per_peer_kib: f64,
    websocket: Window,
    webrtc: Window,
    websocket_players_per_core_at_30hz: f64,
    webrtc_players_per_core_at_30hz: f64,
    /// WebRTC's all-in CPU per room tick over the WebSocket's, same rooms, same run.
    webrtc_cpu_over_websocket: f64,
    storm: Storm,
    far: Far,
    protocol_errors: u64,
    errors: Vec<String>,
}

/// Duels played one at a time by players far from the server, each player opening its data
/// channel as the browser used to (the offer after the room's join) or as it does now (the
/// offer with the ticket, beside the join), alternately. Times from `match_found`.
#[derive(Debug, Default, Serialize)]
struct Far {
    latency_ms_each_way: u64,
    duels_of_each_kind: usize,
    /// The offer after the join: the channel is open, and play over it can begin.
    after_join_open_p50_ms: f64,
    after_join_open_p99_ms: f64,
    /// The offer beside the join: the channel is open, and, later of that and the join, play
    /// over it can begin.
    beside_join_open_p50_ms: f64,
    beside_join_open_p99_ms: f64,
    beside_join_ready_p50_ms: f64,
    beside_join_ready_p99_ms: f64,
    /// The join alone (both kinds).
    room_join_p50_ms: f64,
}

#[derive(Debug, Default, Serialize)]
struct Storm {
    peers: usize,
    /// The busy server's CPU share (of all its cores) while the storm came.
    server_cpu_share_before: f64,
    data_channels_opened: usize,
    data_channel_open_p50_ms: f64,
    data_channel_open_p99_ms: f64,
    /// Open and the seat taken, as in [`Report`].
    data_channel_ready_p50_ms: f64,
    data_channel_ready_p99_ms: f64,
    /// From `match_found` to the room's welcome (the room WebSocket's connection and join),
    /// while the offer and the handshake go on beside it.
    room_join_p50_ms: f64,
    room_join_p99_ms: f64,
    /// This process's CPU share (the bots', on their one core) while the storm came: near 100%
    /// means the figures above measure the bots as much as the server.
    bots_cpu_share: f64,
    /// The server's CPU share (of all its cores) from the storm's start until every channel
    /// opened: near 100% means its cores were saturated (the storm's own rooms start playing as
    /// their seats are claimed) and the open times are mostly queueing.
    server_cpu_share_during: f64,
    server_open_p50_ms: f64,
    server_open_p99_ms: f64,
}

const OPEN_SECONDS: &str = "rallypoint_webrtc_open_seconds";

/// Bots started together, and how to stop them and collect their tallies.
struct Crowd {
    live: Arc<Live>,
    stop: Arc<tokio::sync::Notify>,
    bots: Vec<tokio::task::JoinHandle<Tally>>,
}

impl Crowd {
    async fn start(server: &ServerProcess, tokens: &[String], transport: Transport) -> Self {
        let (live, stop) = (Arc::new(Live::default()), Arc::new(tokio::sync::Notify::new()));
        let bots = start_bots(&server.base, tokens, transport, &live, &stop).await;
        Self { live, stop, bots }
    }

    /// Everyone leaves; the rooms end and go back to the pool. Returns the tallies.
    async fn leave(self) -> Vec<Tally> {
        self.live.leave.store(true, Relaxed);
        let mut tallies = Vec::new();
        for bot in self.bots {
            if let Ok(tally) = bot.await {
                tallies.push(tally);
            }
        }
        self.stop.notify_waiters();
        tallies
    }
}

pub async fn run(args: WebrtcArgs, backstage: &dyn Backstage) -> Result<()> {
    let per_room = args.timing.players;
    let players = args.rooms * per_room;
    let (storm, load) = (args.storm_rooms * per_room, args.load_rooms * per_room);
    let far = 4 * args.far_duels;
    let users = 2 * players + storm + load + far + per_room;
    eprintln!("seeding {users} users…");
    let (dir, url) = ServerProcess::prepare(backstage)?;
    let tokens = backstage.players(&url, PREFIX, users, PASSWORD).await?;
    let metrics_addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let rooms_needed = 2 * args.rooms + args.storm_rooms + args.load_rooms + 8;
    let (metrics, max_rooms) = (metrics_addr.to_string(), rooms_needed.to_string());
    let extra = ["--metrics-listen", &metrics, "--match-seconds", "3600", "--max-rooms", &max_rooms];
    let workers = args.timing.server_workers;
    let server = ServerProcess::start_on(dir, url, &extra, workers).await?;
    let metrics_url = format!("http://{metrics_addr}/metrics");
    let mut report = Report {
        pinned: server.pinned(),
        server_workers: workers,
        rooms_per_transport: args.rooms,
        players_per_room: per_room,
        ..Report::default()
    };
    let (mut opens, mut readies) = (Vec::new(), Vec::new());
    let (ws_tokens, rest) = tokens.split_at(players);
    let (rtc_tokens, rest) = rest.split_at(players);
    let (load_tokens, rest) = rest.split_at(load);
    let (storm_tokens, rest) = rest.split_at(storm);
    let (far_tokens, warmup_tokens) = rest.split_at(far);
    // One WebRTC room plays briefly first, so that what the first peers cost once (crypto
    // tables, the loops' maps and buffers) is not counted per peer below.
    eprintln!("warm-up: one WebRTC room…");
    let warmup = Crowd::start(&server, warmup_tokens, Transport::Webrtc).await;
    wait_until_playing(&warmup.live, per_room).await?;
    for tally in warmup.leave().await {
        count_errors(&mut report, &tally);
    }
    Scrape::wait_for_no_rooms(&metrics_url).await?;
    for (transport, tokens) in [(Transport::Ws, ws_tokens), (Transport::Webrtc, rtc_tokens)] {
        eprintln!("{transport:?}: {players} bots in {} rooms of {per_room}…", args.rooms);
        let before = Scrape::take(&metrics_url).await?;
        let crowd = Crowd::start(&server, tokens, transport).await;
        wait_until_playing(&crowd.live, players).await?;
        if transport == Transport::Webrtc {
            let after = Scrape::take(&metrics_url).await?;
            report.server_open_p50_ms = after.quantile_since(&before, OPEN_SECONDS, 0.5) * 1000.0;
            report.server_open_p99_ms = after.quantile_since(&before, OPEN_SECONDS, 0.99) * 1000.0;
        }
        tokio::time::sleep(Duration::from_secs(args.timing.warmup)).await;
        let window = measure(&server, &metrics_url, &crowd.live, players, args.timing.window, async {}).await?;
        eprintln!("{transport:?}: {}", serde_json::to_string(&window)?);
        let per_core = per_room as f64 * 1000.0 / (window.cpu_per_room_tick_ms.max(1e-6) * TICK_HZ);
        match transport {
            Transport::Ws => (report.websocket, report.websocket_players_per_core_at_30hz) = (window, per_core),
            Transport::Webrtc => {
                report.server_rss_with_webrtc_rooms_kib = server.rss_kib()?;
                (report.webrtc, report.webrtc_players_per_core_at_30hz) = (window, per_core);
            }
        }
        for tally in crowd.leave().await {
            count_errors(&mut report, &tally);
            opens.extend(tally.data_channels);
            readies.extend(tally.data_channels_ready);
        }
        if transport == Transport::Ws {
            // Let the closed connections and their rooms go before taking the baseline.
            Scrape::wait_for_no_rooms(&metrics_url).await?;
            tokio::time::sleep(Duration::from_secs(2)).await;
            report.server_rss_after_websocket_rooms_kib = server.rss_kib()?;
        }
    }
    report.data_channels_opened = opens.len();
    let (p, r) = (Percentiles::of(&opens), Percentiles::of(&readies));
    (report.data_channel_open_p50_ms, report.data_channel_open_p99_ms) = (p.p50_ms, p.p99_ms);
    (report.data_channel_ready_p50_ms, report.data_channel_ready_p99_ms) = (r.p50_ms, r.p99_ms);
    report.server_memory_per_peer_kib =
        report.server_rss_with_webrtc_rooms_kib.saturating_sub(report.server_rss_after_websocket_rooms_kib) as f64
            / players as f64;
    report.webrtc_cpu_over_websocket =
        report.webrtc.cpu_per_room_tick_ms / report.websocket.cpu_per_room_tick_ms.max(1e-9);
    if storm > 0 {
        report.storm =
            open_storm(&server, &metrics_url, load_tokens, storm_tokens, workers, &mut report.errors).await?;
    }
    if args.far_duels > 0 {
        let latency = Duration::from_millis(args.far_latency_ms);
        report.far = far_duels(&server, far_tokens, latency, &mut report.errors).await?;
    }
    server.stop()?;
    report.errors.truncate(5);
    println!("{}", serde_json::to_string_pretty(&report)?);
    write_json(args.timing.json.as_ref(), &report)
}

fn count_errors(report: &mut Report, tally: &Tally) {
    report.protocol_errors += tally.errors.len() as u64;
    report.errors.extend(tally.errors.iter().take(3).cloned());
}

/// WebSocket rooms keep the server busy; then every storm bot queues at once, and each opens
/// its data channel as soon as it has its seat.
async fn open_storm(
    server: &ServerProcess,
    metrics_url: &str,
    load_tokens: &[String],
    storm_tokens: &[String],
    workers: usize,
    errors: &mut Vec<String>,
) -> Result<Storm> {
    eprintln!("storm: {} WebSocket players as load…", load_tokens.len());
    let load = Crowd::start(server, load_tokens, Transport::Ws).await;
    wait_until_playing(&load.live, load_tokens.len()).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    // The server's CPU share per core since (`cpu0`, `t0`).
    let server_share = |(cpu0, t0): (Duration, std::time::Instant)| -> Result<f64> {
        Ok(server.cpu()?.saturating_sub(cpu0).as_secs_f64() / t0.elapsed().as_secs_f64() / workers.max(1) as f64)
    };
    let quiet = (server.cpu()?, std::time::Instant::now());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let share = server_share(quiet)?;
    eprintln!(
        "storm: the server is busy at {:.0}% of its cores; {} peers open at once…",
        share * 100.0,
        storm_tokens.len()
    );
    let before = Scrape::take(metrics_url).await?;
    let (own0, start) = (super::cpu_of(std::process::id())?, (server.cpu()?, std::time::Instant::now()));
    let storm = Crowd::start(server, storm_tokens, Transport::Webrtc).await;
    wait_until_playing(&storm.live, storm_tokens.len()).await?;
    let server_cpu_share_during = server_share(start)?;
    let bots_cpu_share =
        super::cpu_of(std::process::id())?.saturating_sub(own0).as_secs_f64() / start.1.elapsed().as_secs_f64();
    let after = Scrape::take(metrics_url).await?;
    let (mut opens, mut joins, mut readies) = (Vec::new(), Vec::new(), Vec::new());
    for tally in storm.leave().await {
        errors.extend(tally.errors.iter().take(3).cloned());
        opens.extend(tally.data_channels);
        joins.extend(tally.seats_claimed);
        readies.extend(tally.data_channels_ready);
    }
    load.leave().await;
    let opened = opens.len();
    let (p, j, r) = (Percentiles::of(&opens), Percentiles::of(&joins), Percentiles::of(&readies));
    Ok(Storm {
        peers: storm_tokens.len(),
        server_cpu_share_before: share,
        data_channels_opened: opened,
        data_channel_open_p50_ms: p.p50_ms,
        data_channel_open_p99_ms: p.p99_ms,
        data_channel_ready_p50_ms: r.p50_ms,
        data_channel_ready_p99_ms: r.p99_ms,
        room_join_p50_ms: j.p50_ms,
        room_join_p99_ms: j.p99_ms,
        bots_cpu_share,
        server_cpu_share_during,
        server_open_p50_ms: after.quantile_since(&before, OPEN_SECONDS, 0.5) * 1000.0,
        server_open_p99_ms: after.quantile_since(&before, OPEN_SECONDS, 0.99) * 1000.0,
    })
}

/// Plays `tokens.len() / 4` duels of each kind, one at a time, through a network with
/// `latency` each way ([`Far`]).
async fn far_duels(
    server: &ServerProcess,
    tokens: &[String],
    latency: Duration,
    errors: &mut Vec<String>,
) -> Result<Far> {
    eprintln!("far: duels {} ms away…", latency.as_millis());
    let relay = Relay::start_with_latency(server.addr, latency).await?;
    let conditions = Conditions { latency, ..Conditions::default() };
    let (mut after, mut beside, mut ready, mut joins) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (i, pair) in tokens.chunks_exact(2).enumerate() {
        let offer_beside = i % 2 == 1;
        let base = relay.base();
        let (a, b) = tokio::join!(
            far_player(&base, &pair[0], offer_beside, conditions),
            far_player(&base, &pair[1], offer_beside, conditions)
        );
        for played in [a, b] {
            match played {
                Ok((seated, open)) if offer_beside => {
                    beside.push(open);
                    ready.push(open.max(seated));
                    joins.push(seated);
                }
                Ok((seated, open)) => {
                    after.push(open);
                    joins.push(seated);
                }
                Err(e) => errors.push(format!("far: {e:#}")),
            }
        }
    }
    let (a, b, r, j) =
        (Percentiles::of(&after), Percentiles::of(&beside), Percentiles::of(&ready), Percentiles::of(&joins));
    Ok(Far {
        latency_ms_each_way: latency.as_millis() as u64,
        duels_of_each_kind: tokens.len() / 4,
        after_join_open_p50_ms: a.p50_ms,
        after_join_open_p99_ms: a.p99_ms,
        beside_join_open_p50_ms: b.p50_ms,
        beside_join_open_p99_ms: b.p99_ms,
        beside_join_ready_p50_ms: r.p50_ms,
        beside_join_ready_p99_ms: r.p99_ms,
        room_join_p50_ms: j.p50_ms,
    })
}

/// One far player: queues for a duel, takes the seat and opens the channel (the offer after
/// the join, or beside it), then leaves. Returns the times to the seat and to the open channel.
async fn far_player(
    base: &str,
    token: &str,
    offer_beside: bool,
    conditions: Conditions,
) -> Result<(Duration, Duration)> {
    let client = Client::with_session(base, token)?;
    let mut hub = client.hub().await?;
    hub.send(&ClientMsg::FindMatch { mode: "duel".into() }).await?;
    let (room_name, ticket) = hub.match_found(Duration::from_secs(30)).await?;
    let limit = Duration::from_secs(10);
    let (mut room, seated, open) = if offer_beside {
        let seat = client.seat_with_data_channel::<Arena>(&mut hub, &room_name, &ticket, limit, conditions).await?;
        (seat.room, seat.seated, seat.channel?)
    } else {
        let found = std::time::Instant::now();
        let mut room = client.room_at::<Arena>(hub.room_url.as_deref(), &ticket).await?;
        let seated = found.elapsed();
        room.open_data_channel_through(&mut hub, &room_name, limit, conditions).await?;
        (room, seated, found.elapsed())
    };
    let _ = room.send(&ToRoom::Leave).await;
    room.close().await;
    hub.close().await;
    Ok((seated, open))
}
