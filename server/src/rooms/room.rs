//! One room task: takes a match from the pool, seats the players, ticks the game, reports the
//! outcome, and goes back to the pool. A panic while playing ends that match only: the task
//! reports it and takes the next match.
//!
//! The task is the shell around the match's sans-I/O [`Core`]: it owns the players'
//! connections, the tick clock and the channel to the hub, passes time in, and carries out
//! what the core answers ([`Out`]).

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::FutureExt as _;
use shared::game::{Game, Mode, Outcome};
use shared::room::close;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, sleep_until, timeout};

use super::clock::Clock;
use super::core::{Core, Out};
use super::link::Outgoing;
use super::{Assignment, Claim, Link, LinkId, RoomCommand, RoomEvent, RoomId, Shared, TicketError, lock};

/// Ticks a late room may run back to back before it skips ahead.
const MAX_CATCH_UP: u64 = 3;
/// Commands handled in one wake-up at most, so that a flood never delays a tick for long.
const MAILBOX_BATCH: usize = 64;

/// What the task does after a match.
enum Flow {
    Next,
    Shutdown,
}

pub(super) async fn run<G: Game>(slot: u32, mut rx: mpsc::Receiver<RoomCommand>, shared: Arc<Shared>) {
    while let Some(command) = rx.recv().await {
        match command {
            RoomCommand::Start(assignment) => {
                let room = assignment.room;
                let users: Vec<i64> = assignment.players.iter().map(|p| p.user_id).collect();
                let played = AssertUnwindSafe(play::<G>(assignment, &mut rx, &shared)).catch_unwind().await;
                match played {
                    Ok(Flow::Next) => {}
                    Ok(Flow::Shutdown) => return,
                    Err(panic) => {
                        shared.stats.crashes.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(%room, panic = panic_message(panic.as_ref()), "the match crashed");
                        let _ = shared.events.send(RoomEvent::Crashed { room, users }).await;
                    }
                }
                lock(&shared.idle).push(slot);
            }
            RoomCommand::Claim(claim) => {
                let _ = claim.reply.send(Err(TicketError::Over));
            }
            RoomCommand::Frame { .. } | RoomCommand::Closed { .. } => {}
            RoomCommand::Shutdown => return,
        }
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic.downcast_ref::<&str>().copied().or_else(|| panic.downcast_ref::<String>().map(String::as_str)).unwrap_or("?")
}

struct Match<'a, G: Game> {
    room: RoomId,
    mode: &'static Mode,
    core: Core<G>,
    /// Each seat's connection, while it has one.
    links: Vec<Option<Link>>,
    shared: &'a Shared,
    /// Events for the hub, sent from the loop (which may await).
    events: Vec<RoomEvent>,
    /// What the core answered, carried out after each call.
    out: Vec<Out>,
    /// Unreliable frames for datagram paths, one batch per shard.
    outgoing: Outgoing,
    metrics: TickMetrics,
}

/// The series a tick records, looked up once per match rather than in the registry at
/// every tick (and every acknowledged input).
struct TickMetrics {
    lateness: metrics::Histogram,
    compute: metrics::Histogram,
    input_to_snapshot: metrics::Histogram,
    snapshot_bytes: metrics::Counter,
    snapshot_whole_bytes: metrics::Counter,
}

impl TickMetrics {
    fn new() -> Self {
        Self {
            lateness: metrics::histogram!("rallypoint_room_tick_lateness_seconds"),
            compute: metrics::histogram!("rallypoint_room_tick_seconds"),
            input_to_snapshot: metrics::histogram!("rallypoint_room_input_to_snapshot_seconds"),
            snapshot_bytes: metrics::counter!("rallypoint_room_snapshot_bytes_total"),
            snapshot_whole_bytes: metrics::counter!("rallypoint_room_snapshot_whole_bytes_total"),
        }
    }
}

async fn play<G: Game>(a: Assignment, rx: &mut mpsc::Receiver<RoomCommand>, shared: &Shared) -> Flow {
    let config = &shared.config;
    let tick_hz = u64::from(a.setup.tick_hz.max(1));
    let seats = a.players.len();
    let mut m = Match::<G> {
        room: a.room,
        mode: a.mode,
        core: Core::new(a.room, a.mode, &a.setup, a.players, config.seat_hold),
        links: (0..seats).map(|_| None).collect(),
        shared,
        events: Vec::new(),
        out: Vec::new(),
        outgoing: Outgoing::default(),
        metrics: TickMetrics::new(),
    };
    tracing::info!(room = %m.room, mode = m.mode.name, players = seats, "match starting");

    // Wait for the players to take their seats.
    let claim_deadline = Instant::now() + config.claim_timeout;
    while !m.core.all_claimed() {
        tokio::select! {
            () = sleep_until(claim_deadline) => break,
            command = rx.recv() => match command {
                None | Some(RoomCommand::Shutdown) => return m.shut_down(),
                Some(command) => m.handle(command),
            },
        }
        m.flush_events().await;
    }
    m.core.start(&mut m.out);
    m.carry_out();
    let present = m.core.present();
    if present < usize::from(m.mode.min_players) {
        tracing::info!(room = %m.room, present, "match cancelled: too few players");
        m.close_all(close::MATCH_OVER, "not enough players");
        let users = m.core.players().iter().map(|p| p.user_id).collect();
        m.events.push(RoomEvent::Cancelled { room: m.room, users });
        m.flush_events().await;
        return Flow::Next;
    }

    // Play: tick n is due at start + n/tick_hz, never "sleep one tick" (which drifts).
    let mut clock = match Clock::new() {
        Ok(clock) => clock,
        Err(e) => {
            tracing::error!(room = %m.room, error = %e, "cannot create the tick clock");
            m.close_all(close::ROOM_FAILED, "the match could not start");
            let users = m.core.players().iter().map(|p| p.user_id).collect();
            m.events.push(RoomEvent::Crashed { room: m.room, users });
            m.flush_events().await;
            return Flow::Next;
        }
    };
    let start = Instant::now();
    let mut n: u64 = 1;
    let outcome = loop {
        let due = start + Duration::from_nanos(n * 1_000_000_000 / tick_hz);
        tokio::select! {
            biased;
            slept = clock.sleep_until(due) => {
                if let Err(e) = slept {
                    tracing::warn!(room = %m.room, error = %e, "tick clock failed; using tokio's");
                    sleep_until(due).await;
                }
                m.tick(due);
                n += 1;
                let behind = Instant::now().saturating_duration_since(start).as_nanos() as u64 * tick_hz / 1_000_000_000;
                if behind > n + MAX_CATCH_UP {
                    metrics::counter!("rallypoint_room_ticks_skipped_total").increment(behind - n);
                    n = behind;
                }
                if let Some(outcome) = m.core.outcome() {
                    break outcome;
                }
            }
            command = rx.recv() => match command {
                None | Some(RoomCommand::Shutdown) => return m.shut_down(),
                Some(command) => {
                    m.handle(command);
                    // Take whatever else has arrived in the same wake-up.
                    for _ in 0..MAILBOX_BATCH {
                        match rx.try_recv() {
                            Ok(RoomCommand::Shutdown) => return m.shut_down(),
                            Ok(command) => m.handle(command),
                            Err(_) => break,
                        }
                    }
                }
            },
        }
        m.flush_events().await;
    };
    m.finish(outcome).await;
    Flow::Next
}

impl<G: Game> Match<'_, G> {
    fn handle(&mut self, command: RoomCommand) {
        match command {
            RoomCommand::Claim(claim) => self.claim(claim),
            RoomCommand::Frame { link, frame } => {
                if let Some(seat) = self.seat_of(link) {
                    self.core.frame(seat, &frame, Instant::now().into_std(), &mut self.out);
                    self.carry_out();
                    self.count_refusals();
                }
            }
            RoomCommand::Closed { link } => {
                if let Some(seat) = self.seat_of(link) {
                    self.links[seat] = None;
                    self.core.disconnected(seat, Instant::now().into_std());
                }
            }
            RoomCommand::Start(_) | RoomCommand::Shutdown => {}
        }
    }

    fn seat_of(&self, link: LinkId) -> Option<usize> {
        self.links.iter().position(|l| l.as_ref().is_some_and(|l| l.id == link))
    }

    fn claim(&mut self, Claim { ticket, link, reply }: Claim) {
        let (seat, joined) = match self.core.claim(&ticket) {
            Ok(claimed) => claimed,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        if !link.reliable(joined) {
            self.core.disconnected(seat, Instant::now().into_std());
            let _ = reply.send(Err(TicketError::Over));
            return;
        }
        if let Some(old) = self.links[seat].replace(link) {
            old.close(close::REPLACED, "the seat was taken by another connection");
        }
        tracing::debug!(room = %self.room, seat, user = ticket.user_id, "seat claimed");
        let _ = reply.send(Ok(()));
    }

    /// Carries out what the core answered.
    fn carry_out(&mut self) {
        let mut unreliable = false;
        for out in self.out.drain(..) {
            match out {
                Out::Send { seat, bytes, reliable } => {
                    let Some(link) = &self.links[seat] else { continue };
                    if reliable {
                        link.reliable(bytes);
                    } else {
                        unreliable = true;
                        if !self.outgoing.unreliable(link, bytes) {
                            self.shared.stats.snapshots_dropped.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                Out::Close { seat, code, reason } => {
                    if let Some(link) = self.links[seat].take() {
                        link.close(code, reason);
                    }
                }
                Out::Released { user_id } => self.events.push(RoomEvent::SeatReleased { room: self.room, user_id }),
            }
        }
        if unreliable {
            self.outgoing.flush(self.shared.datagrams.as_ref());
        }
    }

    /// Adds what the core refused since the last look to the counters.
    fn count_refusals(&mut self) {
        let r = std::mem::take(&mut self.core.refusals);
        if r.frames_malformed > 0 {
            self.shared.stats.frames_malformed.fetch_add(r.frames_malformed, Ordering::Relaxed);
            metrics::counter!("rallypoint_room_frames_malformed_total").increment(r.frames_malformed);
        }
        if r.inputs_dropped > 0 {
            self.shared.stats.inputs_dropped.fetch_add(r.inputs_dropped, Ordering::Relaxed);
            metrics::counter!("rallypoint_room_inputs_dropped_total").increment(r.inputs_dropped);
        }
    }

    fn tick(&mut self, due: Instant) {
        let begun = Instant::now();
        self.metrics.lateness.record(begun.saturating_duration_since(due));
        let report = self.core.tick(begun.into_std(), &mut self.out);
        self.carry_out();
        let sent = std::time::Instant::now();
        let (stats, m) = (&self.shared.stats, &self.metrics);
        let (sent_bytes, whole_bytes) = (report.bytes.0 as u64, report.bytes.1 as u64);
        stats.snapshot_bytes.fetch_add(sent_bytes, Ordering::Relaxed);
        stats.snapshot_whole_bytes.fetch_add(whole_bytes, Ordering::Relaxed);
        m.snapshot_bytes.increment(sent_bytes);
        m.snapshot_whole_bytes.increment(whole_bytes);
        for arrived in report.acked_arrivals {
            m.input_to_snapshot.record(sent - arrived);
        }
        stats.ticks.fetch_add(1, Ordering::Relaxed);
        m.compute.record(sent - begun.into_std());
    }

    async fn flush_events(&mut self) {
        for event in self.events.drain(..) {
            let _ = self.shared.events.send(event).await;
        }
    }

    fn close_all(&mut self, code: u16, reason: &'static str) {
        for link in self.links.iter_mut().filter_map(Option::take) {
            link.close(code, reason);
        }
    }

    fn shut_down(&mut self) -> Flow {
        self.close_all(1001, "server shutting down");
        Flow::Shutdown
    }

    /// Reports the outcome, waits for the hub to record it, then tells the players.
    async fn finish(mut self, outcome: Outcome) {
        self.flush_events().await;
        let (reply, recorded) = oneshot::channel();
        let players = self.core.players();
        let finished =
            RoomEvent::Finished { room: self.room, mode: self.mode.name, players, outcome: outcome.clone(), reply };
        let _ = self.shared.events.send(finished).await;
        let ratings = match timeout(self.shared.config.record_timeout, recorded).await {
            Ok(Ok(ratings)) => ratings,
            _ => {
                tracing::error!(room = %self.room, "the hub did not record the result in time");
                Vec::new()
            }
        };
        self.shared.stats.matches_finished.fetch_add(1, Ordering::Relaxed);
        tracing::info!(room = %self.room, reason = outcome.reason.as_str(), ticks = outcome.ticks, "match over");
        let ended = Core::<G>::ended(outcome, ratings);
        for link in self.links.iter_mut().filter_map(Option::take) {
            link.reliable(ended.clone());
            link.close(close::MATCH_OVER, "match over");
        }
    }
}
