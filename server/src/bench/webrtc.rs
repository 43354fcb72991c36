//! `rallypoint bench webrtc`: the same 16-player rooms over the WebSocket, then over WebRTC
//! data channels, against one server process on one core, in one run.
//!
//! Reports the time from room assignment (the hub's `match_found`) to an open data channel,
//! the server's memory per peer connection, and per transport the all-in CPU per room tick
//! and the bytes per player per second.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use serde::Serialize;

use super::rooms::{Timing, Window, measure, start_bots, wait_until_playing};
use super::{Percentiles, ServerProcess, write_json};
use crate::bots::{Live, Transport};

#[derive(Debug, Args)]
pub struct WebrtcArgs {
    /// Rooms per transport.
    #[arg(long, default_value_t = 4)]
    rooms: usize,
    #[command(flatten)]
    timing: Timing,
}

const PASSWORD: &str = "bench password 123";
const PREFIX: &str = "rtcbench";
const TICK_HZ: f64 = 30.0;

#[derive(Debug, Default, Serialize)]
struct Report {
    pinned_to_one_core: bool,
    rooms_per_transport: usize,
    players_per_room: usize,
    data_channels_opened: usize,
    /// From the hub's `match_found` to the data channel's `open`, with the room WebSocket's
    /// join in between (as in the browser).
    data_channel_open_p50_ms: f64,
    data_channel_open_p99_ms: f64,
    server_rss_after_websocket_rooms_kib: u64,
    server_rss_with_webrtc_rooms_kib: u64,
    /// The growth from the WebSocket phase (same rooms, same players, connections closed and
    /// memory kept by the allocator) to the WebRTC phase, per peer connection.
    server_memory_per_peer_kib: f64,
    websocket: Window,
    webrtc: Window,
    websocket_players_per_core_at_30hz: f64,
    webrtc_players_per_core_at_30hz: f64,
    protocol_errors: u64,
    errors: Vec<String>,
}

pub async fn run(args: WebrtcArgs) -> Result<()> {
    let players = args.rooms * args.timing.players;
    eprintln!("seeding {} users…", 2 * players);
    let (dir, url) = ServerProcess::prepare()?;
    let tokens = {
        let db = crate::db::open(&url).await?;
        let tokens =
            crate::accounts::seed_for_bench(&db, PREFIX, 2 * players, PASSWORD, Duration::from_hours(24)).await?;
        db.close().await;
        tokens
    };
    let metrics_addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let (metrics, max_rooms) = (metrics_addr.to_string(), (2 * args.rooms + 8).to_string());
    let extra = ["--metrics-listen", &metrics, "--match-seconds", "3600", "--max-rooms", &max_rooms];
    let server = ServerProcess::start(dir, url, &extra).await?;
    let metrics_url = format!("http://{metrics_addr}/metrics");
    let mut report = Report {
        pinned_to_one_core: server.pinned(),
        rooms_per_transport: args.rooms,
        players_per_room: args.timing.players,
        ..Report::default()
    };
    let mut opens = Vec::new();
    for (transport, tokens) in [(Transport::Ws, &tokens[..players]), (Transport::Webrtc, &tokens[players..])] {
        eprintln!("{transport:?}: {players} bots in {} rooms of {}…", args.rooms, args.timing.players);
        let live = Arc::new(Live::default());
        let stop = Arc::new(tokio::sync::Notify::new());
        let bots = start_bots(&server.base, tokens, transport, &live, &stop).await;
        wait_until_playing(&live, players).await?;
        tokio::time::sleep(Duration::from_secs(args.timing.warmup)).await;
        let window = measure(&server, &metrics_url, &live, players, args.timing.window, async {}).await?;
        eprintln!("{transport:?}: {}", serde_json::to_string(&window)?);
        let per_core = args.timing.players as f64 * 1000.0 / (window.cpu_per_room_tick_ms.max(1e-6) * TICK_HZ);
        match transport {
            Transport::Ws => (report.websocket, report.websocket_players_per_core_at_30hz) = (window, per_core),
            Transport::Webrtc => {
                report.server_rss_with_webrtc_rooms_kib = server.rss_kib()?;
                (report.webrtc, report.webrtc_players_per_core_at_30hz) = (window, per_core);
            }
        }
        // Everyone leaves; the rooms end and go back to the pool.
        live.leave.store(true, Relaxed);
        for bot in bots {
            if let Ok(tally) = bot.await {
                report.protocol_errors += tally.errors.len() as u64;
                report.errors.extend(tally.errors.into_iter().take(3));
                opens.extend(tally.data_channels);
            }
        }
        stop.notify_waiters();
        if transport == Transport::Ws {
            // Let the closed connections go before taking the baseline.
            tokio::time::sleep(Duration::from_secs(2)).await;
            report.server_rss_after_websocket_rooms_kib = server.rss_kib()?;
        }
    }
    report.data_channels_opened = opens.len();
    let p = Percentiles::of(opens);
    (report.data_channel_open_p50_ms, report.data_channel_open_p99_ms) = (p.p50_ms, p.p99_ms);
    report.server_memory_per_peer_kib =
        report.server_rss_with_webrtc_rooms_kib.saturating_sub(report.server_rss_after_websocket_rooms_kib) as f64
            / players as f64;
    server.stop()?;
    report.errors.truncate(5);
    println!("{}", serde_json::to_string_pretty(&report)?);
    write_json(args.timing.json.as_ref(), &report)
}
