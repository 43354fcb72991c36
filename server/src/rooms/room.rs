//! One room task: takes a match from the pool, seats the players, ticks the game, reports the
//! outcome, and goes back to the pool. A panic while playing ends that match only: the task
//! reports it and takes the next match.

use std::collections::{HashSet, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt as _;
use shared::delta::Views;
use shared::game::{Game, Mode, Outcome};
use shared::inputs::InputQueue;
use shared::room::{FromRoomOf, MAX_INPUTS_PER_MESSAGE, ToRoom, close};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, sleep_until, timeout};

use super::clock::Clock;
use super::link::Outgoing;
use super::{Assignment, Claim, Link, LinkId, RoomCommand, RoomEvent, RoomId, Seated, Shared, TicketError, lock};

/// Malformed frames tolerated from one connection before it is closed.
const MALFORMED_STRIKES: u32 = 10;
/// Ticks an input's stamp may differ from the server's tick (two seconds at 30 Hz).
const TICK_SKEW_SECONDS: u32 = 2;
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

struct Seat<G: Game> {
    player: Seated,
    link: Option<Link>,
    claimed: bool,
    released: bool,
    away_since: Option<Instant>,
    inputs: InputQueue<G::Input>,
    applied: Vec<G::Input>,
    /// Newest sequence number accepted from each message with new inputs, and when it came.
    arrivals: VecDeque<(u32, Instant)>,
    malformed: u32,
    /// The views sent to this seat lately: bases for delta snapshots.
    sent: Views<G::View>,
    /// The newest tick whose view this seat's client holds (0: send whole views).
    seen: u32,
}

struct Match<'a, G: Game> {
    room: RoomId,
    mode: &'static Mode,
    game: G,
    seats: Vec<Seat<G>>,
    used_nonces: HashSet<u64>,
    shared: &'a Shared,
    tick_hz: u16,
    started: bool,
    /// Events for the hub, sent from the loop (which may await).
    events: Vec<RoomEvent>,
    /// Reused for every frame encoded or decoded (bitcode would otherwise build its buffers
    /// anew each time: a few allocations per message).
    codec: bitcode::Buffer,
    /// Unreliable frames for datagram paths, one batch per shard.
    outgoing: Outgoing,
}

type Frame<G> = FromRoomOf<G>;

async fn play<G: Game>(a: Assignment, rx: &mut mpsc::Receiver<RoomCommand>, shared: &Shared) -> Flow {
    let config = &shared.config;
    let tick_hz = u64::from(a.setup.tick_hz.max(1));
    let skew = TICK_SKEW_SECONDS * u32::from(a.setup.tick_hz);
    let mut m = Match::<G> {
        room: a.room,
        mode: a.mode,
        game: G::new(a.mode, &a.setup),
        seats: a
            .players
            .into_iter()
            .map(|player| Seat {
                player,
                link: None,
                claimed: false,
                released: false,
                away_since: None,
                inputs: InputQueue::new(skew),
                applied: Vec::new(),
                arrivals: VecDeque::new(),
                malformed: 0,
                sent: Views::default(),
                seen: 0,
            })
            .collect(),
        used_nonces: HashSet::new(),
        shared,
        tick_hz: a.setup.tick_hz,
        started: false,
        events: Vec::new(),
        codec: bitcode::Buffer::new(),
        outgoing: Outgoing::default(),
    };
    tracing::info!(room = %m.room, mode = m.mode.name, players = m.seats.len(), "match starting");

    // Wait for the players to take their seats.
    let claim_deadline = Instant::now() + config.claim_timeout;
    while !m.seats.iter().all(|s| s.claimed) {
        tokio::select! {
            () = sleep_until(claim_deadline) => break,
            command = rx.recv() => match command {
                None | Some(RoomCommand::Shutdown) => return m.shut_down(),
                Some(command) => m.handle(command),
            },
        }
        m.flush_events().await;
    }
    for seat in 0..m.seats.len() {
        if !m.seats[seat].claimed {
            m.release(seat);
        }
    }
    let present = m.seats.iter().filter(|s| !s.released).count();
    if present < usize::from(m.mode.min_players) {
        tracing::info!(room = %m.room, present, "match cancelled: too few players");
        m.close_all(close::MATCH_OVER, "not enough players");
        let users = m.seats.iter().map(|s| s.player.user_id).collect();
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
            let users = m.seats.iter().map(|s| s.player.user_id).collect();
            m.events.push(RoomEvent::Crashed { room: m.room, users });
            m.flush_events().await;
            return Flow::Next;
        }
    };
    m.started = true;
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
                if let Some(outcome) = m.game.outcome() {
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
            RoomCommand::Frame { link, frame } => self.frame(link, &frame),
            RoomCommand::Closed { link } => {
                if let Some(seat) = self.seat_of(link) {
                    self.seats[seat].link = None;
                    self.seats[seat].away_since = Some(Instant::now());
                }
            }
            RoomCommand::Start(_) | RoomCommand::Shutdown => {}
        }
    }

    fn seat_of(&self, link: LinkId) -> Option<usize> {
        self.seats.iter().position(|s| s.link.as_ref().is_some_and(|l| l.id == link))
    }

    fn claim(&mut self, Claim { ticket, link, reply }: Claim) {
        let seat = usize::from(ticket.seat);
        let verdict = if ticket.room != self.room {
            Err(if ticket.room.slot == self.room.slot { TicketError::Over } else { TicketError::Foreign })
        } else if self.seats.get(seat).is_none_or(|s| s.player.user_id != ticket.user_id) {
            Err(TicketError::Foreign)
        } else if self.seats[seat].released {
            Err(TicketError::Over)
        } else if !self.used_nonces.insert(ticket.nonce) {
            Err(TicketError::Used)
        } else {
            Ok(())
        };
        if verdict.is_err() {
            let _ = reply.send(verdict);
            return;
        }
        let joined = Frame::<G>::Joined {
            seat: ticket.seat,
            players: self.seats.iter().map(|s| s.player.name.clone()).collect(),
            mode: self.mode.name.to_owned(),
            tick_hz: self.tick_hz,
            tick: self.game.tick(),
            rules: self.game.rules(),
        };
        if !link.reliable(Bytes::from(joined.encode())) {
            let _ = reply.send(Err(TicketError::Over));
            return;
        }
        let s = &mut self.seats[seat];
        if let Some(old) = s.link.replace(link) {
            old.close(close::REPLACED, "the seat was taken by another connection");
        }
        if !s.claimed {
            s.claimed = true;
            self.game.set_present(ticket.seat, true);
        }
        s.away_since = None;
        // A new connection holds no view yet.
        s.seen = 0;
        tracing::debug!(room = %self.room, seat, user = ticket.user_id, "seat claimed");
        let _ = reply.send(Ok(()));
    }

    fn frame(&mut self, link: LinkId, frame: &[u8]) {
        let Some(seat) = self.seat_of(link) else { return };
        let decoded = self.codec.decode::<ToRoom<G::Input>>(frame).ok().filter(|msg| match msg {
            ToRoom::Inputs { inputs, .. } => inputs.len() <= MAX_INPUTS_PER_MESSAGE,
            _ => true,
        });
        let Some(msg) = decoded else {
            self.shared.stats.frames_malformed.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("rallypoint_room_frames_malformed_total").increment(1);
            let s = &mut self.seats[seat];
            s.malformed += 1;
            if s.malformed >= MALFORMED_STRIKES
                && let Some(link) = s.link.take()
            {
                link.close(close::POLICY, "too many malformed messages");
                s.away_since = Some(Instant::now());
            }
            return;
        };
        match msg {
            ToRoom::Inputs { first_seq, tick, seen, inputs } => {
                if !self.started {
                    return;
                }
                let server_tick = self.game.tick();
                let s = &mut self.seats[seat];
                // Inputs may arrive out of order; a tick not played yet is a lie and ignored.
                if seen <= server_tick {
                    s.seen = s.seen.max(seen);
                }
                let before = (s.inputs.stats.accepted, s.inputs.stats.dropped_far + s.inputs.stats.dropped_flood);
                s.inputs.offer(first_seq, tick, server_tick, &inputs);
                let after = (s.inputs.stats.accepted, s.inputs.stats.dropped_far + s.inputs.stats.dropped_flood);
                if after.0 > before.0 {
                    let newest = first_seq.saturating_add(inputs.len() as u32 - 1);
                    s.arrivals.push_back((newest, Instant::now()));
                    if s.arrivals.len() > 64 {
                        s.arrivals.pop_front();
                    }
                }
                if after.1 > before.1 {
                    self.shared.stats.inputs_dropped.fetch_add(after.1 - before.1, Ordering::Relaxed);
                    metrics::counter!("rallypoint_room_inputs_dropped_total").increment(after.1 - before.1);
                }
            }
            ToRoom::Ping { id } => {
                if let Some(link) = &self.seats[seat].link {
                    self.outgoing.unreliable(link, Bytes::from(Frame::<G>::Pong { id }.encode()));
                    self.outgoing.flush(self.shared.datagrams.as_ref());
                }
            }
            ToRoom::Leave => self.release(seat),
        }
    }

    fn tick(&mut self, due: Instant) {
        let begun = Instant::now();
        metrics::histogram!("rallypoint_room_tick_lateness_seconds").record(begun.saturating_duration_since(due));
        for s in &mut self.seats {
            s.inputs.take(&mut s.applied);
        }
        let inputs: Vec<&[G::Input]> = self.seats.iter().map(|s| s.applied.as_slice()).collect();
        self.game.step(&inputs);
        let tick = self.game.tick();
        let (mut sent_bytes, mut whole_bytes) = (0, 0);
        for (i, s) in self.seats.iter_mut().enumerate() {
            if let Some(link) = &s.link {
                let ack = s.inputs.ack();
                let frame = Frame::<G>::Snapshot { tick, ack, view: self.game.view(i as u8) };
                let mut bytes = Bytes::copy_from_slice(self.codec.encode(&frame));
                whole_bytes += bytes.len();
                let Frame::<G>::Snapshot { view, .. } = frame else { unreachable!("built above") };
                // The change since the newest view the client holds, when that is smaller.
                if let Some((back, base)) = s.sent.base(s.seen, tick) {
                    let delta = Frame::<G>::Delta { tick, ack, back, delta: G::diff(base, &view, u32::from(back)) };
                    let encoded = self.codec.encode(&delta);
                    if encoded.len() < bytes.len() {
                        bytes = Bytes::copy_from_slice(encoded);
                    }
                }
                sent_bytes += bytes.len();
                s.sent.insert(tick, view);
                if !self.outgoing.unreliable(link, bytes) {
                    self.shared.stats.snapshots_dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        self.shared.stats.snapshot_bytes.fetch_add(sent_bytes as u64, Ordering::Relaxed);
        self.shared.stats.snapshot_whole_bytes.fetch_add(whole_bytes as u64, Ordering::Relaxed);
        metrics::counter!("rallypoint_room_snapshot_bytes_total").increment(sent_bytes as u64);
        metrics::counter!("rallypoint_room_snapshot_whole_bytes_total").increment(whole_bytes as u64);
        self.outgoing.flush(self.shared.datagrams.as_ref());
        let sent = Instant::now();
        for s in &mut self.seats {
            let ack = s.inputs.ack();
            while s.arrivals.front().is_some_and(|(seq, _)| *seq <= ack) {
                if let Some((_, arrived)) = s.arrivals.pop_front() {
                    metrics::histogram!("rallypoint_room_input_to_snapshot_seconds").record(sent - arrived);
                }
            }
        }
        let hold = self.shared.config.seat_hold;
        for seat in 0..self.seats.len() {
            let s = &self.seats[seat];
            if !s.released && s.away_since.is_some_and(|t| sent.duration_since(t) >= hold) {
                self.release(seat);
            }
        }
        self.shared.stats.ticks.fetch_add(1, Ordering::Relaxed);
        metrics::histogram!("rallypoint_room_tick_seconds").record(sent - begun);
    }

    /// The player leaves for good: their seat is given up and the hub hears of it.
    fn release(&mut self, seat: usize) {
        let s = &mut self.seats[seat];
        if s.released {
            return;
        }
        s.released = true;
        if let Some(link) = s.link.take() {
            link.close(close::LEFT, "you left the match");
        }
        let user_id = s.player.user_id;
        self.game.set_present(seat as u8, false);
        self.events.push(RoomEvent::SeatReleased { room: self.room, user_id });
    }

    async fn flush_events(&mut self) {
        for event in self.events.drain(..) {
            let _ = self.shared.events.send(event).await;
        }
    }

    fn close_all(&mut self, code: u16, reason: &'static str) {
        for s in &mut self.seats {
            if let Some(link) = s.link.take() {
                link.close(code, reason);
            }
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
        let players = self.seats.iter().map(|s| s.player.clone()).collect();
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
        let ended = Bytes::from(Frame::<G>::Ended { outcome, ratings }.encode());
        for s in &mut self.seats {
            if let Some(link) = s.link.take() {
                link.reliable(ended.clone());
                link.close(close::MATCH_OVER, "match over");
            }
        }
    }
}
