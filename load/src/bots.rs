//! `rallypoint bots`: native clients that sign in through the same forms as a browser, queue,
//! and play the arena through the same protocols (prediction included), then report.

use std::time::Duration;

use clap::Args;
use serde::Serialize;
use shared::arena::{Arena, ArenaInput, ArenaView, MAP_H, MAP_W, TILE};
use shared::game::Rng;
use shared::hub::{ClientMsg, ServerMsg};
use shared::predict::Predictor;
use shared::room::{MAX_INPUTS_PER_MESSAGE, ToRoom, close};
use tokio::time::Instant;

use crate::client::{Client, ClientError, Conditions, FromRoom, Hub, Room};

#[derive(Debug, Clone, Args)]
pub struct BotsArgs {
    /// The server, as browsers reach it.
    #[arg(long, env = "RALLYPOINT_BOTS_SERVER", default_value = "http://127.0.0.1:8080", value_name = "URL")]
    pub server: String,
    /// How many bots.
    #[arg(long, default_value_t = 2, value_name = "N")]
    pub count: usize,
    /// How long to play, in seconds; a match still running then is left.
    #[arg(long, default_value_t = 60, value_name = "SECONDS")]
    pub duration: u64,
    /// The mode to queue for.
    #[arg(long, default_value = "duel")]
    pub mode: String,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Bots are named PREFIX1, PREFIX2, …; accounts are created on first use.
    #[arg(long, default_value = "bot", value_name = "PREFIX")]
    pub name_prefix: String,
    /// What carries inputs and snapshots: a WebRTC data channel (`webrtc`, as browsers do),
    /// or the room WebSocket (`ws`, the browsers' fallback).
    #[arg(long, value_enum, default_value_t = Transport::Webrtc)]
    pub transport: Transport,
    /// The bots' password (their accounts are created with it).
    #[arg(long, env = "RALLYPOINT_BOTS_PASSWORD", default_value = "rallypoint bot password", hide_env_values = true)]
    pub password: String,
    #[command(flatten)]
    pub network: NetworkArgs,
}

/// A bad network to play through: applied to the WebRTC data channel's datagrams, both ways,
/// seeded (each bot its own sequence).
#[derive(Debug, Clone, Default, Args)]
pub struct NetworkArgs {
    /// Added delay each way, in milliseconds.
    #[arg(long, env = "RALLYPOINT_BOTS_LATENCY_MS", default_value_t = 0, value_name = "MS",
          value_parser = clap::value_parser!(u32).range(0..=10_000))]
    pub latency_ms: u32,
    /// Random extra delay each way, up to this many milliseconds (it reorders datagrams).
    #[arg(long, env = "RALLYPOINT_BOTS_JITTER_MS", default_value_t = 0, value_name = "MS",
          value_parser = clap::value_parser!(u32).range(0..=10_000))]
    pub jitter_ms: u32,
    /// Share of datagrams lost each way, from 0 to 1.
    #[arg(long, env = "RALLYPOINT_BOTS_LOSS", default_value_t = 0.0, value_name = "P", value_parser = parse_share)]
    pub loss: f64,
    /// Seed of the losses and delays.
    #[arg(long, env = "RALLYPOINT_BOTS_SEED", default_value_t = 1)]
    pub seed: u64,
}

impl NetworkArgs {
    /// The conditions for bot number `bot`.
    pub fn conditions(&self, bot: u64) -> Conditions {
        Conditions {
            latency: Duration::from_millis(u64::from(self.latency_ms)),
            jitter: Duration::from_millis(u64::from(self.jitter_ms)),
            loss: self.loss,
            seed: self.seed ^ bot.wrapping_mul(0x9e37_79b9_7f4a_7c15),
            ..Conditions::default()
        }
    }

    fn is_perfect(&self) -> bool {
        self.latency_ms == 0 && self.jitter_ms == 0 && self.loss == 0.0
    }
}

fn parse_share(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(p) if (0.0..=1.0).contains(&p) => Ok(p),
        _ => Err(format!("{text:?} is not a share from 0 to 1 (0.05 is 5%)")),
    }
}

impl BotsArgs {
    /// Refuses combinations that cannot work, with a sentence saying why.
    pub fn check(&self) -> Result<(), String> {
        if self.transport == Transport::Ws && !self.network.is_perfect() {
            return Err("--latency-ms, --jitter-ms and --loss act on the WebRTC data channel; \
                        use them with --transport webrtc"
                .into());
        }
        Ok(())
    }
}

/// What carries a bot's in-room traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Webrtc,
    Ws,
}

/// What the bots did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BotReport {
    pub bots: usize,
    pub transport: Option<Transport>,
    pub matches_completed: u64,
    /// Matches played over a WebRTC data channel.
    pub data_channels_opened: u64,
    /// Time from the match being found to the data channel's opening.
    pub data_channel_open_p50_ms: f64,
    pub data_channel_open_p99_ms: f64,
    pub inputs_sent: u64,
    pub snapshots_received: u64,
    pub rtt_p50_ms: f64,
    pub rtt_p99_ms: f64,
    pub corrections: u64,
    pub bytes_down: u64,
    pub bytes_up: u64,
    pub protocol_errors: u64,
    /// Room connections lost mid-match, seats taken back after it, and matches that ended
    /// while the bot was away.
    pub room_connections_lost: u64,
    pub seats_regained: u64,
    pub seat_regained_p50_ms: f64,
    pub seat_regained_p99_ms: f64,
    pub seats_gone: u64,
    /// Others drawn between snapshots at 60 frames a second: share of frames past the newest
    /// snapshot, the largest step between two frames (tiles), and the delay (ticks, p50/p99).
    pub interp_frames: u64,
    pub interp_dry_share: f64,
    pub interp_largest_step_tiles: f64,
    pub interp_delay_p50_ticks: f64,
    pub interp_delay_p99_ticks: f64,
    pub corrections_per_minute: f64,
    /// Size of corrections of the own prediction, in tiles.
    pub correction_p50_tiles: f64,
    pub correction_p99_tiles: f64,
    /// The first few errors, for the reader.
    pub errors: Vec<String>,
}

/// One bot's tallies.
#[derive(Debug, Default)]
pub struct Tally {
    pub matches: u64,
    pub data_channels: Vec<Duration>,
    pub inputs: u64,
    pub snapshots: u64,
    pub corrections: u64,
    pub rtts: Vec<Duration>,
    pub bytes_down: u64,
    pub bytes_up: u64,
    pub errors: Vec<String>,
    /// Room connections lost mid-match (a cut, a restart).
    pub room_connections_lost: u64,
    /// Time from each loss to the first snapshot back in the same seat.
    pub seats_regained: Vec<Duration>,
    /// Losses after which the hub had no seat to offer back (the match had ended meanwhile).
    pub seats_gone: u64,
    /// Drawing others between snapshots, as the browser does at 60 frames a second.
    pub interp: shared::interp::InterpStats,
    /// The interpolation delay each match ended with, in ticks.
    pub interp_delays: Vec<f64>,
    /// Size of each correction of the own prediction, in world units.
    pub correction_sizes: Vec<u32>,
    /// Time spent in matches.
    pub playing: Duration,
    /// Time from each match found to the seat taken (the room's join answer).
    pub seats_claimed: Vec<Duration>,
    /// Time from each match found to a data channel open and its seat taken, the later of
    /// the two: when play over the channel can begin.
    pub data_channels_ready: Vec<Duration>,
}

impl Tally {
    fn error(&mut self, e: impl std::fmt::Display) {
        self.errors.push(e.to_string());
    }
}

/// Runs the bots and returns their report.
pub async fn run(args: &BotsArgs) -> BotReport {
    let deadline = Instant::now() + Duration::from_secs(args.duration);
    let bots = (1..=args.count).map(|i| {
        let args = args.clone();
        tokio::spawn(async move {
            let mut tally = Tally::default();
            let name = format!("{}{i}", args.name_prefix);
            match sign_in(&args.server, &name, &args.password).await {
                Ok(client) => {
                    let conditions = args.network.conditions(i as u64);
                    play(&client, &args.mode, args.transport, conditions, deadline, i as u64, &mut tally).await;
                }
                Err(e) => tally.error(format!("{name}: {e}")),
            }
            tally
        })
    });
    let tallies: Vec<Tally> = futures_util::future::join_all(bots).await.into_iter().filter_map(Result::ok).collect();
    let mut report = report(args.count, tallies);
    report.transport = Some(args.transport);
    report
}

/// Sums the bots' tallies into a report.
pub fn report(bots: usize, tallies: Vec<Tally>) -> BotReport {
    let mut r = BotReport { bots, ..BotReport::default() };
    let (mut rtts, mut opens, mut regained) = (Vec::new(), Vec::new(), Vec::new());
    let (mut delays, mut sizes, mut playing, mut dry) = (Vec::new(), Vec::new(), Duration::ZERO, 0);
    for t in tallies {
        r.interp_frames += t.interp.frames;
        dry += t.interp.dry;
        r.interp_largest_step_tiles = r.interp_largest_step_tiles.max(t.interp.largest_step);
        delays.extend(t.interp_delays);
        sizes.extend(t.correction_sizes);
        playing += t.playing;
        r.room_connections_lost += t.room_connections_lost;
        r.seats_gone += t.seats_gone;
        regained.extend(t.seats_regained);
        r.matches_completed += t.matches;
        r.data_channels_opened += t.data_channels.len() as u64;
        opens.extend(t.data_channels);
        r.inputs_sent += t.inputs;
        r.snapshots_received += t.snapshots;
        r.corrections += t.corrections;
        r.bytes_down += t.bytes_down;
        r.bytes_up += t.bytes_up;
        r.protocol_errors += t.errors.len() as u64;
        r.errors.extend(t.errors.into_iter().take(5usize.saturating_sub(r.errors.len())));
        rtts.extend(t.rtts);
    }
    let p = crate::stats::Percentiles::of(&rtts);
    (r.rtt_p50_ms, r.rtt_p99_ms) = (p.p50_ms, p.p99_ms);
    let p = crate::stats::Percentiles::of(&opens);
    (r.data_channel_open_p50_ms, r.data_channel_open_p99_ms) = (p.p50_ms, p.p99_ms);
    r.interp_dry_share = dry as f64 / r.interp_frames.max(1) as f64;
    delays.sort_by(f64::total_cmp);
    let at = crate::stats::quantile;
    (r.interp_delay_p50_ticks, r.interp_delay_p99_ticks) = (at(&delays, 0.5), at(&delays, 0.99));
    r.corrections_per_minute = r.corrections as f64 / (playing.as_secs_f64() / 60.0).max(1e-9);
    let mut sizes: Vec<f64> = sizes.into_iter().map(|s| f64::from(s) / f64::from(TILE)).collect();
    sizes.sort_by(f64::total_cmp);
    (r.correction_p50_tiles, r.correction_p99_tiles) = (at(&sizes, 0.5), at(&sizes, 0.99));
    r.seats_regained = regained.len() as u64;
    let p = crate::stats::Percentiles::of(&regained);
    (r.seat_regained_p50_ms, r.seat_regained_p99_ms) = (p.p50_ms, p.p99_ms);
    r
}

async fn sign_in(server: &str, name: &str, password: &str) -> Result<Client, ClientError> {
    let client = Client::new(server)?;
    client.register_or_login(name, password).await?;
    Ok(client)
}

/// Queues and plays matches until the deadline. A lost connection (hub or room) is reopened
/// with backoff, as the browser does; a bot whose room connection dropped mid-match gets a fresh
/// ticket from the hub and takes its seat back.
pub async fn play(
    client: &Client,
    mode: &str,
    transport: Transport,
    conditions: Conditions,
    deadline: Instant,
    seed: u64,
    tally: &mut Tally,
) {
    let mut hub = match client.hub().await {
        Ok(hub) => hub,
        Err(e) => return tally.error(format!("hub: {e}")),
    };
    // A seat to go back to: the room, its ticket, and when the connection to it was lost.
    let mut rejoin: Option<(String, String, Instant)> = None;
    while Instant::now() < deadline {
        let (room_name, ticket, coming_back) = match rejoin.take() {
            Some((room, ticket, lost_at)) => (room, ticket, Some(lost_at)),
            None => match queue(&mut hub, mode, deadline).await {
                Ok(Some((room, ticket))) => (room, ticket, None),
                Ok(None) => break,
                Err(e) if e.is_connection_lost() => {
                    match back_to_hub(client, deadline, seed).await {
                        Ok((again, seat)) => (hub, rejoin) = (again, seat.map(|(r, t)| (r, t, Instant::now()))),
                        Err(e) => return tally.error(format!("hub: {e}")),
                    }
                    continue;
                }
                Err(e) => return tally.error(format!("queue: {e}")),
            },
        };
        let regained_before = tally.seats_regained.len();
        let joined = match transport {
            Transport::Webrtc => {
                let limit = Duration::from_millis(u64::from(shared::room::DATA_CHANNEL_OPEN_TIMEOUT_MS));
                client.seat_with_data_channel::<Arena>(&mut hub, &room_name, &ticket, limit, conditions).await.map(
                    |seat| {
                        match seat.channel {
                            Ok(took) => {
                                tally.data_channels.push(took);
                                tally.data_channels_ready.push(took.max(seat.seated));
                            }
                            // Counted as an error, and the match is played over the WebSocket.
                            Err(e) => tally.error(format!("webrtc: {e}")),
                        }
                        seat.room
                    },
                )
            }
            Transport::Ws => client.room_at::<Arena>(hub.room_url.as_deref(), &ticket).await,
        };
        let lost = match joined {
            Ok(room) => match play_match_counted(room, deadline, seed, tally, None, coming_back).await {
                MatchEnd::Over => None,
                MatchEnd::Lost(e) => Some(e),
            },
            Err(e) if e.is_connection_lost() => Some(e),
            Err(e) => return tally.error(format!("join: {e}")),
        };
        let Some(lost) = lost else { continue };
        if Instant::now() >= deadline {
            break;
        }
        tracing::debug!(seed, error = %lost, "room connection lost: back through the hub");
        // A loss while still coming back from the previous one is the same time away.
        let lost_at = match coming_back {
            Some(lost_at) if tally.seats_regained.len() == regained_before => lost_at,
            _ => {
                tally.room_connections_lost += 1;
                Instant::now()
            }
        };
        match back_to_hub(client, deadline, seed).await {
            Ok((again, seat)) => {
                hub = again;
                match seat {
                    Some((room, ticket)) => rejoin = Some((room, ticket, lost_at)),
                    None => tally.seats_gone += 1,
                }
            }
            Err(e) => return tally.error(format!("hub: {e}")),
        }
    }
    hub.close().await;
}

/// Opens a new hub connection, retrying with exponential backoff and jitter (100 ms doubling to
/// 2 s, each wait drawn between half and all of it) until the deadline. Returns it, with the
/// seat the hub offers back (a room and a fresh ticket) when the bot still has one.
async fn back_to_hub(
    client: &Client,
    deadline: Instant,
    seed: u64,
) -> Result<(Hub, Option<(String, String)>), ClientError> {
    let mut rng = Rng::new(seed ^ 0x5eed_0fba_c0ff);
    let mut wait = Duration::from_millis(100);
    loop {
        match client.hub().await {
            Ok(mut hub) => {
                // A seated player's MatchFound follows the welcome at once.
                let seat = hub
                    .recv_until(Duration::from_millis(500), |m| match m {
                        ServerMsg::MatchFound { room, ticket, .. } => Some((room, ticket)),
                        _ => None,
                    })
                    .await
                    .ok();
                return Ok((hub, seat));
            }
            Err(e) if e.is_connection_lost() && Instant::now() + wait < deadline => {
                let jittered = wait.mul_f64(0.5 + 0.5 * f64::from(rng.below(1000)) / 1000.0);
                tokio::time::sleep(jittered).await;
                wait = (wait * 2).min(Duration::from_secs(2));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Joins the queue and waits for a match; `None` when the deadline comes first, else the
/// room's name and the ticket.
pub async fn queue(hub: &mut Hub, mode: &str, deadline: Instant) -> Result<Option<(String, String)>, ClientError> {
    hub.send(&ClientMsg::FindMatch { mode: mode.to_owned() }).await?;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match hub.recv_timeout(left).await {
            Ok(ServerMsg::MatchFound { room, ticket, .. }) => return Ok(Some((room, ticket))),
            Ok(ServerMsg::Error { message, .. } | ServerMsg::MatchAborted { message }) => {
                return Err(ClientError::Unexpected(message));
            }
            Ok(_) => {}
            Err(ClientError::Timeout) => {
                hub.send(&ClientMsg::CancelMatch).await?;
                return Ok(None);
            }
            Err(e) => return Err(e),
        }
    }
}

/// Counters that benchmarks read while bots play.
#[derive(Debug, Default)]
pub struct Live {
    pub bytes_down: std::sync::atomic::AtomicU64,
    pub bytes_up: std::sync::atomic::AtomicU64,
    pub snapshots: std::sync::atomic::AtomicU64,
    pub playing: std::sync::atomic::AtomicU64,
    /// Set to make every bot leave its match at its next tick.
    pub leave: std::sync::atomic::AtomicBool,
}

/// Other players' seats and positions, as in a snapshot or as drawn in a frame.
type Drawn = Vec<(u8, f64, f64)>;

/// How a match ended for one bot.
#[derive(Debug)]
pub enum MatchEnd {
    /// It was over (the result came, the bot left, or the match was closed for good).
    Over,
    /// The connection was lost mid-match: the seat is held for a while.
    Lost(ClientError),
}

/// Plays one match: one input per tick, predicted and reconciled like the browser does.
pub async fn play_match(room: Room<Arena>, deadline: Instant, seed: u64, tally: &mut Tally) -> MatchEnd {
    play_match_counted(room, deadline, seed, tally, None, None).await
}

/// Like [`play_match`], also counting into `live` as it goes. `rejoined` is when the bot lost
/// its previous connection to this match, if it is coming back: its first snapshot then
/// counts as a seat taken back, after that long.
pub async fn play_match_counted(
    mut room: Room<Arena>,
    deadline: Instant,
    seed: u64,
    tally: &mut Tally,
    live: Option<&Live>,
    mut rejoined: Option<Instant>,
) -> MatchEnd {
    use std::sync::atomic::Ordering::Relaxed;
    let (mut seen_down, mut seen_up) = (room.bytes_in, room.bytes_out);
    let mut counted_playing = false;
    let mut brain = Brain::new(seed ^ u64::from(room.seat));
    let mut predictor: Predictor<Arena> = Predictor::new(room.rules);
    let tick = Duration::from_secs(1) / u32::from(room.tick_hz.max(1));
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pinger = tokio::time::interval(Duration::from_secs(1));
    // Others are drawn between snapshots as the browser draws them, 60 times a second, except in
    // the room benchmarks (`live`), where the bots' own CPU matters.
    let drawing = live.is_none();
    let started = Instant::now();
    let ms = |at: Instant| at.duration_since(started).as_secs_f64() * 1000.0;
    let mut clock = shared::interp::SnapshotClock::new(room.tick_hz);
    let mut kept: std::collections::VecDeque<(u32, Drawn)> = std::collections::VecDeque::new();
    let mut frames = tokio::time::interval(Duration::from_micros(16_667));
    let mut ping: Option<(u32, Instant)> = None;
    let mut latest: Option<(u32, ArenaView)> = None;
    // Cleared when a send fails: the server may have ended the match and closed the socket
    // with the result still unread, so read on, and let what comes decide (the result, or a
    // lost connection).
    let mut sending = true;
    let end = loop {
        tokio::select! {
            _ = ticker.tick(), if latest.is_some() && sending => {
                if Instant::now() >= deadline || live.is_some_and(|l| l.leave.load(Relaxed)) {
                    let _ = room.send(&ToRoom::Leave).await;
                    break None;
                }
                let Some((tick, view)) = &latest else { continue };
                let own = predictor.own().copied();
                predictor.input(brain.decide(own.map(|b| (b.x, b.y)), view));
                let (first_seq, inputs) = predictor.to_send(MAX_INPUTS_PER_MESSAGE);
                if room.send(&ToRoom::Inputs { first_seq, tick: *tick, seen: room.seen(), inputs }).await.is_err() {
                    sending = false;
                    continue;
                }
                tally.inputs += 1;
            }
            _ = frames.tick(), if drawing && !kept.is_empty() => {
                let ticks: Vec<u32> = kept.iter().map(|(t, _)| *t).collect();
                if let Some(p) = shared::interp::pair(&ticks, clock.render_tick(ms(Instant::now()))) {
                    let (from, to) = (&kept[p.from].1, &kept[p.to].1);
                    let drawn: Drawn = to
                        .iter()
                        .map(|&(seat, x, y)| match from.iter().find(|(s, ..)| *s == seat) {
                            Some(&(_, fx, fy)) => (seat, fx + (x - fx) * p.t, fy + (y - fy) * p.t),
                            None => (seat, x, y),
                        })
                        .collect();
                    tally.interp.frame(p.dry, &drawn, f64::from(TILE));
                }
            }
            _ = pinger.tick() => {
                let id = ping.map_or(1, |(id, _)| id + 1);
                ping = Some((id, Instant::now()));
                let _ = room.send(&ToRoom::Ping { id }).await;
            }
            frame = room.recv() => match frame {
                Ok(FromRoom::<Arena>::Snapshot { tick, ack, view }) => {
                    tally.snapshots += 1;
                    if let Some(lost_at) = rejoined.take() {
                        tally.seats_regained.push(lost_at.elapsed());
                    }
                    if let Some(live) = live {
                        live.snapshots.fetch_add(1, Relaxed);
                        live.bytes_down.fetch_add(room.bytes_in - seen_down, Relaxed);
                        live.bytes_up.fetch_add(room.bytes_out - seen_up, Relaxed);
                        (seen_down, seen_up) = (room.bytes_in, room.bytes_out);
                        if !counted_playing {
                            counted_playing = true;
                            live.playing.fetch_add(1, Relaxed);
                        }
                    }
                    if predictor.snapshot(ack, &view).is_some() {
                        tally.corrections += 1;
                        tally.correction_sizes.push(predictor.last_correction);
                    }
                    if drawing {
                        clock.on_snapshot(tick, ms(Instant::now()));
                        if kept.back().is_none_or(|(t, _)| *t < tick) {
                            let others = view.others.iter().map(|o| (o.seat, f64::from(o.x), f64::from(o.y))).collect();
                            kept.push_back((tick, others));
                            if kept.len() > 16 {
                                kept.pop_front();
                            }
                        }
                    }
                    if latest.as_ref().is_none_or(|(t, _)| *t < tick) {
                        latest = Some((tick, view));
                    }
                }
                Ok(FromRoom::<Arena>::Pong { id }) => {
                    if let Some((sent_id, at)) = ping
                        && sent_id == id
                    {
                        tally.rtts.push(at.elapsed());
                    }
                }
                Ok(FromRoom::<Arena>::Ended { .. }) => {
                    tally.matches += 1;
                    break None;
                }
                Ok(FromRoom::<Arena>::Joined { .. }) => break Some(ClientError::Unexpected("a second join answer".into())),
                // `Room::recv` turns deltas into snapshots.
                Ok(FromRoom::<Arena>::Delta { .. }) => {}
                Err(e) => break Some(e),
            },
        }
    };
    tally.bytes_down += room.bytes_in;
    tally.bytes_up += room.bytes_out;
    tally.playing += started.elapsed();
    if drawing {
        tally.interp_delays.push(clock.delay_ticks());
    }
    room.close().await;
    match end {
        // Closed for a reason a match can end with: not a protocol error.
        None | Some(ClientError::Closed { code: close::MATCH_OVER | close::LEFT, .. }) => MatchEnd::Over,
        Some(e) if e.is_connection_lost() => MatchEnd::Lost(e),
        Some(e) => {
            tally.error(format!("room: {e}"));
            MatchEnd::Over
        }
    }
}

/// A bot's mind: chase and shoot what it sees, wander otherwise.
struct Brain {
    rng: Rng,
    goal: (i32, i32),
    last: (i32, i32),
    stuck: u32,
    strafe: u8,
}

impl Brain {
    fn new(seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let goal = Self::random_goal(&mut rng);
        Self { rng, goal, last: (0, 0), stuck: 0, strafe: ArenaInput::LEFT }
    }

    fn random_goal(rng: &mut Rng) -> (i32, i32) {
        (rng.below(MAP_W as u32) as i32 * TILE + TILE / 2, rng.below(MAP_H as u32) as i32 * TILE + TILE / 2)
    }

    fn decide(&mut self, own: Option<(i32, i32)>, view: &ArenaView) -> ArenaInput {
        let Some((x, y)) = own else { return ArenaInput::default() };
        if (x, y) == self.last {
            self.stuck += 1;
        } else {
            self.stuck = 0;
        }
        self.last = (x, y);
        if self.stuck > 8 || (x - self.goal.0).abs() + (y - self.goal.1).abs() < TILE {
            self.goal = Self::random_goal(&mut self.rng);
            self.stuck = 0;
        }
        let target = view
            .others
            .iter()
            .min_by_key(|o| (i32::from(o.x) - x).abs() + (i32::from(o.y) - y).abs())
            .map(|o| (i32::from(o.x), i32::from(o.y)));
        let towards = |(tx, ty): (i32, i32)| {
            let mut b = 0;
            if tx > x + 32 {
                b |= ArenaInput::RIGHT;
            } else if tx < x - 32 {
                b |= ArenaInput::LEFT;
            }
            if ty > y + 32 {
                b |= ArenaInput::DOWN;
            } else if ty < y - 32 {
                b |= ArenaInput::UP;
            }
            b
        };
        match target {
            Some((tx, ty)) => {
                if self.rng.below(20) == 0 {
                    self.strafe = if self.strafe == ArenaInput::LEFT { ArenaInput::RIGHT } else { ArenaInput::LEFT };
                }
                let dx = (tx - x).clamp(-i32::from(shared::arena::MAX_AIM), i32::from(shared::arena::MAX_AIM));
                let dy = (ty - y).clamp(-i32::from(shared::arena::MAX_AIM), i32::from(shared::arena::MAX_AIM));
                ArenaInput { buttons: self.strafe | ArenaInput::FIRE, aim_x: dx as i16, aim_y: dy as i16 }
            }
            None => ArenaInput { buttons: towards(self.goal), aim_x: 1, aim_y: 0 },
        }
    }
}
