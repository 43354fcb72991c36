//! The match itself, without I/O: seats, input queues, the tick, snapshots (deltas where
//! smaller) and the outcome. It reads no clock (the caller passes `now`), owns no socket and
//! spawns nothing: the room task (`room.rs`) is the shell that owns the connections, the tick
//! clock and the hub's channel, and carries out the [`Out`]s. A test drives it tick by tick.

use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use shared::delta::Views;
use shared::game::{Game, MatchSetup, Mode, Outcome};
use shared::inputs::InputQueue;
use shared::room::{FromRoomOf, MAX_INPUTS_PER_MESSAGE, RatingChange, ToRoom, close};

use super::{RoomId, Seated, Ticket, TicketError};

/// Malformed frames tolerated from one connection before it is closed.
const MALFORMED_STRIKES: u32 = 10;
/// Ticks an input's stamp may differ from the server's tick (two seconds at 30 Hz).
const TICK_SKEW_SECONDS: u32 = 2;
/// Input arrivals remembered per seat, for the input-to-snapshot latency.
const ARRIVALS_KEPT: usize = 64;

type Frame<G> = FromRoomOf<G>;

/// What the shell must do.
#[derive(Debug, PartialEq, Eq)]
pub enum Out {
    /// A frame for a seat's connection: on the reliable path, or where unreliable frames go.
    Send { seat: usize, bytes: Bytes, reliable: bool },
    /// Close a seat's connection.
    Close { seat: usize, code: u16, reason: &'static str },
    /// A seat was given up (left, or away too long): the hub hears of it.
    Released { user_id: i64 },
}

/// What one tick did, for metrics.
#[derive(Debug, Default)]
pub struct TickReport {
    /// Snapshot bytes sent, and what whole views would have taken (each seat's whole view is
    /// measured once a second; its size stands for the ticks in between).
    pub bytes: (usize, usize),
    /// When each input first acknowledged by this tick's snapshots arrived.
    pub acked_arrivals: Vec<Instant>,
}

/// Counts of refused input, for metrics.
#[derive(Debug, Default, Clone, Copy)]
pub struct Refusals {
    pub frames_malformed: u64,
    pub inputs_dropped: u64,
}

struct Seat<G: Game> {
    player: Seated,
    /// Whether a connection holds the seat now.
    connected: bool,
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
    /// The size of this seat's last whole view encoded (0: none yet).
    whole_len: usize,
    /// The same, taken only at the once-a-second measure: what the statistic of whole-view
    /// bytes counts (`whole_len` leans high, as it is also taken when a delta is large).
    whole_sampled: usize,
}

pub struct Core<G: Game> {
    room: RoomId,
    mode: &'static Mode,
    game: G,
    seats: Vec<Seat<G>>,
    used_nonces: HashSet<u64>,
    tick_hz: u16,
    seat_hold: Duration,
    /// Inputs count once play has started (every seat claimed, or the claim time is over).
    started: bool,
    /// Reused for every frame encoded or decoded (bitcode would otherwise build its buffers
    /// anew each time: a few allocations per message).
    codec: bitcode::Buffer,
    pub refusals: Refusals,
}

impl<G: Game> Core<G> {
    pub fn new(
        room: RoomId,
        mode: &'static Mode,
        setup: &MatchSetup,
        players: Vec<Seated>,
        seat_hold: Duration,
    ) -> Self {
        let skew = TICK_SKEW_SECONDS * u32::from(setup.tick_hz);
        let seats = players
            .into_iter()
            .map(|player| Seat {
                player,
                connected: false,
                claimed: false,
                released: false,
                away_since: None,
                inputs: InputQueue::new(skew),
                applied: Vec::new(),
                arrivals: VecDeque::new(),
                malformed: 0,
                sent: Views::default(),
                seen: 0,
                whole_len: 0,
                whole_sampled: 0,
            })
            .collect();
        Self {
            room,
            mode,
            game: G::new(mode, setup),
            seats,
            used_nonces: HashSet::new(),
            tick_hz: setup.tick_hz,
            seat_hold,
            started: false,
            codec: bitcode::Buffer::new(),
            refusals: Refusals::default(),
        }
    }

    pub fn seats(&self) -> usize {
        self.seats.len()
    }

    pub fn players(&self) -> Vec<Seated> {
        self.seats.iter().map(|s| s.player.clone()).collect()
    }

    pub fn all_claimed(&self) -> bool {
        self.seats.iter().all(|s| s.claimed)
    }

    /// Seats not given up.
    pub fn present(&self) -> usize {
        self.seats.iter().filter(|s| !s.released).count()
    }

    pub fn outcome(&self) -> Option<Outcome> {
        self.game.outcome()
    }

    /// Play starts: every seat not claimed by now is given up.
    pub fn start(&mut self, out: &mut Vec<Out>) {
        for seat in 0..self.seats.len() {
            if !self.seats[seat].claimed {
                self.release(seat, out);
            }
        }
        self.started = true;
    }

    /// A connection presents a verified ticket: the seat's join answer, to send reliably
    /// before anything else; the seat is then this connection's (the caller closes any other
    /// with [`close::REPLACED`]).
    pub fn claim(&mut self, ticket: &Ticket) -> Result<(usize, Bytes), TicketError> {
        let seat = usize::from(ticket.seat);
        if ticket.room != self.room {
            return Err(if ticket.room.slot == self.room.slot { TicketError::Over } else { TicketError::Foreign });
        }
        if self.seats.get(seat).is_none_or(|s| s.player.user_id != ticket.user_id) {
            return Err(TicketError::Foreign);
        }
        if self.seats[seat].released {
            return Err(TicketError::Over);
        }
        if !self.used_nonces.insert(ticket.nonce) {
            return Err(TicketError::Used);
        }
        let joined = Frame::<G>::Joined {
            seat: ticket.seat,
            players: self.seats.iter().map(|s| s.player.name.clone()).collect(),
            mode: self.mode.name.to_owned(),
            tick_hz: self.tick_hz,
            tick: self.game.tick(),
            rules: self.game.rules(),
        };
        let s = &mut self.seats[seat];
        s.connected = true;
        s.away_since = None;
        // A new connection holds no view yet.
        s.seen = 0;
        if !s.claimed {
            s.claimed = true;
            self.game.set_present(ticket.seat, true);
        }
        Ok((seat, Bytes::from(joined.encode())))
    }

    /// The seat's connection is gone; the seat is held for a while.
    pub fn disconnected(&mut self, seat: usize, now: Instant) {
        if let Some(s) = self.seats.get_mut(seat) {
            s.connected = false;
            s.away_since = Some(now);
        }
    }

    /// A frame from the seat's connection.
    pub fn frame(&mut self, seat: usize, frame: &[u8], now: Instant, out: &mut Vec<Out>) {
        let decoded = self.codec.decode::<ToRoom<G::Input>>(frame).ok().filter(|msg| match msg {
            ToRoom::Inputs { inputs, .. } => inputs.len() <= MAX_INPUTS_PER_MESSAGE,
            _ => true,
        });
        let Some(msg) = decoded else {
            self.refusals.frames_malformed += 1;
            let s = &mut self.seats[seat];
            s.malformed += 1;
            if s.malformed >= MALFORMED_STRIKES && s.connected {
                out.push(Out::Close { seat, code: close::POLICY, reason: "too many malformed messages" });
                self.disconnected(seat, now);
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
                let dropped = |s: &Seat<G>| s.inputs.stats.dropped_far + s.inputs.stats.dropped_flood;
                let before = (s.inputs.stats.accepted, dropped(s));
                s.inputs.offer(first_seq, tick, server_tick, &inputs);
                if s.inputs.stats.accepted > before.0 {
                    let newest = first_seq.saturating_add(inputs.len() as u32 - 1);
                    s.arrivals.push_back((newest, now));
                    if s.arrivals.len() > ARRIVALS_KEPT {
                        s.arrivals.pop_front();
                    }
                }
                self.refusals.inputs_dropped += dropped(s) - before.1;
            }
            ToRoom::Ping { id } => {
                out.push(Out::Send { seat, bytes: Bytes::from(Frame::<G>::Pong { id }.encode()), reliable: false });
            }
            ToRoom::Leave => self.release(seat, out),
        }
    }

    /// One tick: the inputs that arrived are applied, the game steps, each connected seat gets
    /// its snapshot (a delta against the newest view its client holds where smaller), and seats
    /// away longer than the hold are given up.
    pub fn tick(&mut self, now: Instant, out: &mut Vec<Out>) -> TickReport {
        let mut report = TickReport::default();
        for s in &mut self.seats {
            s.inputs.take(&mut s.applied);
        }
        let inputs: Vec<&[G::Input]> = self.seats.iter().map(|s| s.applied.as_slice()).collect();
        self.game.step(&inputs);
        let tick = self.game.tick();
        for (i, s) in self.seats.iter_mut().enumerate() {
            if !s.connected {
                continue;
            }
            let ack = s.inputs.ack();
            let frame = Frame::<G>::Snapshot { tick, ack, view: self.game.view(i as u8) };
            // The delta when the client holds a base, unless the whole view is smaller. The whole
            // view is encoded to compare only when the delta is not clearly smaller than the
            // seat's last whole view, and once a second to keep that size current: with both
            // encoded at every tick, encoding was ~9% of the server's CPU (ARCHITECTURE: `delta`).
            let remeasure = tick.wrapping_add(i as u32).is_multiple_of(u32::from(self.tick_hz));
            // The encoded delta, and whether it is clearly smaller than a whole view.
            let delta = s.sent.base(s.seen, tick).map(|(back, base)| {
                let Frame::<G>::Snapshot { view, .. } = &frame else { unreachable!("built above") };
                let encoded = self.codec.encode(&Frame::<G>::Delta {
                    tick,
                    ack,
                    back,
                    delta: G::diff(base, view, u32::from(back)),
                });
                (Bytes::copy_from_slice(encoded), 4 * encoded.len() < 3 * s.whole_len && !remeasure)
            });
            let bytes = match delta {
                Some((bytes, true)) => bytes,
                delta => {
                    let whole = self.codec.encode(&frame);
                    s.whole_len = whole.len();
                    if remeasure || s.whole_sampled == 0 {
                        s.whole_sampled = whole.len();
                    }
                    match delta {
                        Some((bytes, _)) if bytes.len() < whole.len() => bytes,
                        _ => Bytes::copy_from_slice(whole),
                    }
                }
            };
            report.bytes.1 += s.whole_sampled;
            let Frame::<G>::Snapshot { view, .. } = frame else { unreachable!("built above") };
            report.bytes.0 += bytes.len();
            s.sent.insert(tick, view);
            out.push(Out::Send { seat: i, bytes, reliable: false });
            while s.arrivals.front().is_some_and(|(seq, _)| *seq <= ack) {
                if let Some((_, arrived)) = s.arrivals.pop_front() {
                    report.acked_arrivals.push(arrived);
                }
            }
        }
        for seat in 0..self.seats.len() {
            let s = &self.seats[seat];
            if !s.released && s.away_since.is_some_and(|t| now.saturating_duration_since(t) >= self.seat_hold) {
                self.release(seat, out);
            }
        }
        report
    }

    /// The player leaves for good: their seat is given up and the hub hears of it.
    pub fn release(&mut self, seat: usize, out: &mut Vec<Out>) {
        let s = &mut self.seats[seat];
        if s.released {
            return;
        }
        s.released = true;
        if s.connected {
            s.connected = false;
            out.push(Out::Close { seat, code: close::LEFT, reason: "you left the match" });
        }
        out.push(Out::Released { user_id: s.player.user_id });
        self.game.set_present(seat as u8, false);
    }

    /// The result frame, with the rating changes the hub recorded (none if it did not answer).
    pub fn ended(outcome: Outcome, ratings: Vec<RatingChange>) -> Bytes {
        Bytes::from(Frame::<G>::Ended { outcome, ratings }.encode())
    }
}

#[cfg(test)]
mod tests {
    use shared::arena::{Arena, ArenaInput};
    use shared::room::{FromRoom, ToRoom};

    use super::*;

    const T0: Duration = Duration::from_millis(33);

    fn duel(hold: Duration) -> Core<Arena> {
        let mode = &Arena::modes()[0];
        let setup = MatchSetup { players: 2, tick_hz: 30, seed: 5, time_limit_secs: Some(10) };
        let players = (1..=2).map(|user_id| Seated { user_id, name: format!("p{user_id}") }).collect();
        Core::new(RoomId { slot: 0, number: 1 }, mode, &setup, players, hold)
    }

    fn ticket(seat: u8, nonce: u64) -> Ticket {
        Ticket {
            server: 0,
            room: RoomId { slot: 0, number: 1 },
            user_id: i64::from(seat) + 1,
            seat,
            expires_ms: 0,
            nonce,
        }
    }

    fn snapshots(out: &[Out], seat: usize) -> Vec<FromRoomOf<Arena>> {
        out.iter()
            .filter_map(|o| match o {
                Out::Send { seat: s, bytes, reliable: false } if *s == seat => FromRoomOf::<Arena>::decode(bytes).ok(),
                _ => None,
            })
            .collect()
    }

    /// Driven by hand, no socket, task or clock: seats are claimed, inputs are acknowledged in
    /// snapshots, a client that says what it holds gets deltas, pings are answered, a seat
    /// away past the hold is given up, and the match ends with an outcome.
    #[test]
    fn a_match_driven_tick_by_tick() {
        let start = Instant::now();
        let mut core = duel(Duration::from_secs(1));
        let mut out = Vec::new();
        assert_eq!(core.claim(&ticket(0, 1)).map(|(seat, _)| seat), Ok(0));
        assert_eq!(core.claim(&ticket(0, 1)).unwrap_err(), TicketError::Used);
        assert_eq!(core.claim(&ticket(1, 2)).map(|(seat, _)| seat), Ok(1));
        assert!(core.all_claimed());
        core.start(&mut out);
        assert!(out.is_empty());
        let right = ArenaInput { buttons: ArenaInput::RIGHT, aim_x: 1, aim_y: 0 };
        let mut seen = 0;
        let (mut deltas, mut bytes) = (0, (0, 0));
        for n in 1..=60u32 {
            let now = start + T0 * n;
            let up = ToRoom::Inputs { first_seq: n, tick: n, seen, inputs: vec![right] }.encode();
            core.frame(0, &up, now, &mut out);
            out.clear();
            let report = core.tick(now, &mut out);
            (bytes.0, bytes.1) = (bytes.0 + report.bytes.0, bytes.1 + report.bytes.1);
            for frame in snapshots(&out, 0) {
                match frame {
                    FromRoom::Snapshot { tick, ack, .. } => {
                        assert_eq!(ack, n, "every input applied by its tick");
                        seen = tick;
                    }
                    FromRoom::Delta { tick, ack, .. } => {
                        assert_eq!(ack, n, "every input applied by its tick");
                        seen = tick;
                        deltas += 1;
                    }
                    other => panic!("{other:?}"),
                }
            }
            assert_eq!(snapshots(&out, 1).len(), 1, "the other seat gets its view too");
        }
        assert!(deltas > 50, "{deltas} deltas once the client said what it holds");
        assert!(bytes.0 < bytes.1, "{bytes:?}: deltas are what makes the bytes sent smaller than whole views");
        // A ping is answered at once, unreliably.
        out.clear();
        core.frame(1, &ToRoom::<ArenaInput>::Ping { id: 9 }.encode(), start, &mut out);
        assert!(matches!(&snapshots(&out, 1)[..], [FromRoom::Pong { id: 9 }]));
        // Seat 1 goes away; past the hold it is given up.
        let away = start + T0 * 61;
        core.disconnected(1, away);
        out.clear();
        core.tick(away + Duration::from_millis(500), &mut out);
        assert!(!out.contains(&Out::Released { user_id: 2 }));
        core.tick(away + Duration::from_secs(1), &mut out);
        assert!(out.contains(&Out::Released { user_id: 2 }));
        assert_eq!(core.present(), 1);
        // Malformed frames: counted, and the tenth closes the connection.
        out.clear();
        for _ in 0..MALFORMED_STRIKES {
            core.frame(0, &[0xff; 3], away, &mut out);
        }
        assert_eq!(core.refusals.frames_malformed, u64::from(MALFORMED_STRIKES));
        assert!(matches!(out[..], [Out::Close { seat: 0, code: close::POLICY, .. }]));
        // Play on to the time limit: an outcome.
        let mut n = 62;
        while core.outcome().is_none() {
            n += 1;
            out.clear();
            core.tick(start + T0 * n, &mut out);
            assert!(n < 400, "the 10 s limit ends it");
        }
    }
}
