//! `rallypoint bench fleet`: the same full rooms played all in one process, then on a room
//! server registered with a hub that runs no match itself. The process that plays the rooms is
//! pinned to core 0 both times (in the split, the hub shares core 1 with the bots), so that the
//! CPU per room tick of the two can be set side by side: what the split costs the rooms. Also:
//! how fast the hub places matches on the room server, the time from "match found" to the seat
//! taken on the room server, and the hub's CPU per placed match.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Args;
use serde::Serialize;

use super::rooms::{PASSWORD, TICK_HZ, Timing, start_bots, wait_until_playing};
use super::{Backstage, Percentiles, ServerProcess, write_json};
use crate::bots::{Live, Tally, Transport};

#[derive(Debug, Args)]
pub struct FleetArgs {
    /// Rooms to fill.
    #[arg(long, default_value_t = 32)]
    rooms: usize,
    /// Duels queued at once on the split deployment, to measure how fast the hub places
    /// matches on a room server when the queue is full (0 skips it).
    #[arg(long, default_value_t = 256)]
    burst: usize,
    #[command(flatten)]
    timing: Timing,
}

/// Every duel of a burst queued at the same instant, players already connected to the hub.
#[derive(Debug, Default, Serialize)]
pub(super) struct Burst {
    matches: usize,
    /// From the burst's queueing to the last "match found".
    all_found_seconds: f64,
    /// From the burst's queueing to the last seat taken on the room server.
    all_seated_seconds: f64,
    /// Matches over `all_seated_seconds`: the placement rate with a full queue.
    pub(super) matches_placed_per_second: f64,
    /// From queueing to "match found", per player.
    queue_to_found: Percentiles,
    /// From "match found" to the seat taken on the room server, per player.
    match_found_to_seat: Percentiles,
    /// The hub's CPU over the burst, per match (connections were open before).
    hub_cpu_per_placed_match_ms: f64,
    errors: Vec<String>,
}

/// One way of running the rooms.
#[derive(Debug, Default, Serialize)]
struct Run {
    /// Seconds from the first bot's start to every bot seated and receiving snapshots.
    seating_seconds: f64,
    /// Matches placed per second over that time (bots arrive over it: a floor, not a ceiling).
    matches_placed_per_second: f64,
    /// From "match found" to the seat taken (the room's join answer), per player.
    match_found_to_seat: Percentiles,
    /// CPU of the process that runs the rooms over the window, per room tick.
    rooms_cpu_per_room_tick_ms: f64,
    /// 16 players per room over that CPU at 30 Hz.
    players_per_core_at_30hz: f64,
    /// The hub's CPU over the seating, per match placed (split run only; it includes the
    /// players' hub connections and queueing).
    hub_cpu_per_placed_match_ms: Option<f64>,
    /// The hub's CPU over the window, per room tick of play (split run only).
    hub_cpu_per_room_tick_ms: Option<f64>,
    protocol_errors: u64,
}

#[derive(Debug, Default, Serialize)]
struct Report {
    pinned_to_one_core: bool,
    rooms: usize,
    players: usize,
    all_in_one: Run,
    room_server: Run,
    /// Placement with a full queue, on the split deployment.
    burst: Burst,
    /// Room-server CPU per room tick over all-in-one's, minus 1 (the split's cost, or gain).
    split_cost: f64,
}

pub async fn run(args: FleetArgs, backstage: &dyn Backstage) -> Result<()> {
    let players = args.rooms * args.timing.players;
    let max_rooms = (args.rooms + 8).to_string();
    let common = ["--match-seconds", "3600", "--lobby-capacity", "100000"];

    eprintln!("all in one process: {} rooms of {}…", args.rooms, args.timing.players);
    let (dir, url) = ServerProcess::prepare(backstage)?;
    let tokens = backstage.players(&url, "fleetone", players, PASSWORD).await?;
    let extra: Vec<&str> = common.iter().copied().chain(["--max-rooms", &max_rooms]).collect();
    let server = ServerProcess::start_on(dir, url, &extra, args.timing.server_workers).await?;
    let pinned = server.pinned();
    let all_in_one = play(&args, &server.base, &tokens, &server, None).await?;
    server.stop()?;
    eprintln!("all in one: {}", serde_json::to_string(&all_in_one)?);

    eprintln!("hub and room server: the same rooms on a room server…");
    let (dir, url) = ServerProcess::prepare(backstage)?;
    let tokens = backstage.players(&url, "fleetsplit", players, PASSWORD).await?;
    let token = backstage.room_token(&url, "bench").await?;
    let extra: Vec<String> = common.iter().chain(&["--local-rooms", "off"]).map(|a| (*a).to_owned()).collect();
    // The hub on core 1, beside the bots: the rooms' core is the room server's alone.
    let hub = ServerProcess::serve(dir, url, &extra, "1", 1).await?;
    let workers = args.timing.server_workers.max(1);
    let capacity = args.rooms + args.burst + 8;
    let cores = format!("0-{}", workers - 1);
    let room_server =
        ServerProcess::room_server(backstage, (&hub.base, &token, None), capacity, &cores, workers).await?;
    tokio::time::sleep(Duration::from_millis(500)).await; // registered (heartbeat)
    let split = play(&args, &hub.base, &tokens, &room_server, Some(&hub)).await?;
    let burst = if args.burst > 0 {
        let burst_tokens = backstage.players(&hub.database_url, "fleetburst", 2 * args.burst, PASSWORD).await?;
        burst(&[&hub], &burst_tokens).await?
    } else {
        Burst::default()
    };
    eprintln!("burst: {}", serde_json::to_string(&burst)?);
    room_server.stop()?;
    hub.stop()?;
    eprintln!("room server: {}", serde_json::to_string(&split)?);

    let report = Report {
        pinned_to_one_core: pinned,
        rooms: args.rooms,
        players,
        split_cost: split.rooms_cpu_per_room_tick_ms / all_in_one.rooms_cpu_per_room_tick_ms.max(1e-9) - 1.0,
        all_in_one,
        room_server: split,
        burst,
    };
    println!("{}", serde_json::to_string_pretty(&report)?);
    write_json(args.timing.json.as_ref(), &report)
}

/// Seats every bot, then measures one window of play on `rooms` (and `hub`, when apart).
async fn play(
    args: &FleetArgs,
    base: &str,
    tokens: &[String],
    rooms: &ServerProcess,
    hub: Option<&ServerProcess>,
) -> Result<Run> {
    let players = tokens.len();
    let live = Arc::new(Live::default());
    let stop = Arc::new(tokio::sync::Notify::new());
    let hub_cpu0 = hub.map(ServerProcess::cpu).transpose()?;
    let started = Instant::now();
    let bots = start_bots(base, tokens, Transport::Ws, &live, &stop).await;
    wait_until_playing(&live, players).await?;
    let seating = started.elapsed().as_secs_f64();
    let hub_seating_cpu = match (hub, hub_cpu0) {
        (Some(hub), Some(cpu0)) => Some(hub.cpu()?.saturating_sub(cpu0)),
        _ => None,
    };
    tokio::time::sleep(Duration::from_secs(args.timing.warmup)).await;
    let (cpu0, hub_window0, t0) = (rooms.cpu()?, hub.map(ServerProcess::cpu).transpose()?, Instant::now());
    tokio::time::sleep(Duration::from_secs(args.timing.window)).await;
    let seconds = t0.elapsed().as_secs_f64();
    let cpu = rooms.cpu()?.saturating_sub(cpu0).as_secs_f64();
    let room_ticks = args.rooms as f64 * TICK_HZ * seconds;
    let hub_window = match (hub, hub_window0) {
        (Some(hub), Some(cpu0)) => Some(hub.cpu()?.saturating_sub(cpu0).as_secs_f64()),
        _ => None,
    };
    stop.notify_waiters();
    let mut tally = Tally::default();
    for bot in bots {
        if let Ok(t) = bot.await {
            tally.seats_claimed.extend(t.seats_claimed);
            tally.errors.extend(t.errors);
        }
    }
    let per_tick = cpu * 1000.0 / room_ticks;
    Ok(Run {
        seating_seconds: seating,
        matches_placed_per_second: args.rooms as f64 / seating,
        match_found_to_seat: Percentiles::of(&tally.seats_claimed),
        rooms_cpu_per_room_tick_ms: per_tick,
        players_per_core_at_30hz: args.timing.players as f64 * 1000.0 / (per_tick.max(1e-9) * TICK_HZ),
        hub_cpu_per_placed_match_ms: hub_seating_cpu.map(|c| c.as_secs_f64() * 1000.0 / args.rooms as f64),
        hub_cpu_per_room_tick_ms: hub_window.map(|c| c * 1000.0 / room_ticks),
        protocol_errors: tally.errors.len() as u64,
    })
}

/// Connects every player of `tokens` to a hub of `hubs` (in turn), then queues them all for a
/// duel at once and takes each seat on the room server as soon as the match is found.
pub(super) async fn burst(hubs: &[&ServerProcess], tokens: &[String]) -> Result<Burst> {
    let mut players = Vec::with_capacity(tokens.len());
    for (i, token) in tokens.iter().enumerate() {
        let client = crate::client::Client::with_session(&hubs[i % hubs.len()].base, token)?;
        let connection = client.hub().await?;
        players.push((client, connection));
    }
    let cpu = |hubs: &[&ServerProcess]| -> Result<Duration> { hubs.iter().map(|h| h.cpu()).sum() };
    let cpu0 = cpu(hubs)?;
    let start = tokio::time::Instant::now();
    let players = players.into_iter().map(|(client, mut connection)| {
        tokio::spawn(async move {
            connection.send(&shared::hub::ClientMsg::FindMatch { mode: "duel".into() }).await?;
            let (_, ticket) = connection.match_found(Duration::from_mins(1)).await?;
            let found = tokio::time::Instant::now();
            let room = client.room_at::<shared::arena::Arena>(connection.room_url.as_deref(), &ticket).await?;
            let seated = tokio::time::Instant::now();
            drop((room, connection));
            anyhow::Ok((found - start, seated - found, seated - start))
        })
    });
    let mut report = Burst { matches: tokens.len() / 2, ..Burst::default() };
    let (mut to_found, mut to_seat) = (Vec::new(), Vec::new());
    let mut last = (Duration::ZERO, Duration::ZERO);
    for player in futures_util::future::join_all(players).await {
        match player {
            Ok(Ok((found, seat, seated))) => {
                to_found.push(found);
                to_seat.push(seat);
                last = (last.0.max(found), last.1.max(seated));
            }
            Ok(Err(e)) => report.errors.push(e.to_string()),
            Err(e) => report.errors.push(e.to_string()),
        }
    }
    let spent = cpu(hubs)?.saturating_sub(cpu0);
    report.all_found_seconds = last.0.as_secs_f64();
    report.all_seated_seconds = last.1.as_secs_f64();
    report.matches_placed_per_second = report.matches as f64 / report.all_seated_seconds.max(1e-9);
    report.queue_to_found = Percentiles::of(&to_found);
    report.match_found_to_seat = Percentiles::of(&to_seat);
    report.hub_cpu_per_placed_match_ms = spent.as_secs_f64() * 1000.0 / report.matches.max(1) as f64;
    Ok(report)
}
