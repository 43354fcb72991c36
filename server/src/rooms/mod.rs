//! Rooms: server-authoritative matches of a [`Game`], each run by one task at a fixed tick.
//!
//! Room tasks live in a pool: a task takes a match, plays it, reports the outcome, resets and
//! goes back to the pool. The hub talks to rooms only through messages: it launches a match
//! ([`Rooms::launch`]) and hears back through [`RoomEvent`]s. Players reach a room through a
//! transport, with a signed ticket the hub gave them ([`Rooms::claim`]). Nothing here touches the
//! hub's state or the database, so rooms could later run in a process of their own.

mod clock;
pub mod core;
pub mod link;
mod room;
pub mod ticket;

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use shared::game::{Game, MatchSetup, Mode, Outcome};
use shared::room::RatingChange;
use tokio::sync::{mpsc, oneshot};

pub use link::{DatagramPeer, Datagrams, DirectWrite, Link, LinkId, NoDatagrams, Route, ToClient, next_link_id};
pub use ticket::{LOCAL_SERVER, RoomId, Ticket, TicketError, TicketSigner, TicketVerifier};

/// Settings of every room, from the configuration.
#[derive(Debug, Clone)]
pub struct RoomConfig {
    /// Ticks per second (10–60).
    pub tick_hz: u16,
    /// Most rooms playing at once.
    pub max_rooms: usize,
    /// Overrides every mode's time limit (for short matches in tests and demos).
    pub time_limit_secs: Option<u16>,
    /// How long a ticket is valid.
    pub ticket_ttl: Duration,
    /// How long a match waits for its players to take their seats.
    pub claim_timeout: Duration,
    /// How long a seat is kept for a player who dropped out.
    pub seat_hold: Duration,
    /// How long a room waits for the hub to record a result.
    pub record_timeout: Duration,
}

impl Default for RoomConfig {
    fn default() -> Self {
        Self {
            tick_hz: 30,
            max_rooms: 1000,
            time_limit_secs: None,
            ticket_ttl: Duration::from_secs(30),
            claim_timeout: Duration::from_secs(15),
            seat_hold: Duration::from_secs(20),
            record_timeout: Duration::from_secs(10),
        }
    }
}

/// A player seated in a match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seated {
    pub user_id: i64,
    pub name: String,
}

/// What rooms tell the hub.
#[derive(Debug)]
pub enum RoomEvent {
    /// A match ended: record it, then answer with the rating changes (by seat).
    Finished {
        room: RoomId,
        mode: &'static str,
        players: Vec<Seated>,
        outcome: Outcome,
        reply: oneshot::Sender<Vec<RatingChange>>,
    },
    /// A player gave up their seat (left, or stayed away too long); the match goes on.
    SeatReleased { room: RoomId, user_id: i64 },
    /// The match did not start (too few players took their seats).
    Cancelled { room: RoomId, users: Vec<i64> },
    /// The match stopped on a panic; nothing is recorded.
    Crashed { room: RoomId, users: Vec<i64> },
}

/// Messages to a room task.
#[derive(Debug)]
pub enum RoomCommand {
    Start(Assignment),
    Claim(Claim),
    /// A frame from a player's connection.
    Frame {
        link: LinkId,
        frame: Bytes,
    },
    /// A player's connection closed.
    Closed {
        link: LinkId,
    },
    /// The server is stopping: close every connection and end.
    Shutdown,
}

#[derive(Debug)]
pub struct Assignment {
    room: RoomId,
    mode: &'static Mode,
    players: Vec<Seated>,
    setup: MatchSetup,
}

/// A transport asking for a seat, with a ticket it has verified.
#[derive(Debug)]
pub struct Claim {
    pub ticket: Ticket,
    pub link: Link,
    pub reply: oneshot::Sender<Result<(), TicketError>>,
}

/// The pool is full: every room is playing.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("every room is busy")]
pub struct RoomsFull;

/// Counters for tests, metrics and benchmarks.
#[derive(Debug, Default)]
pub struct RoomStats {
    pub matches_started: AtomicU64,
    pub matches_finished: AtomicU64,
    pub crashes: AtomicU64,
    pub ticks: AtomicU64,
    pub inputs_dropped: AtomicU64,
    pub frames_malformed: AtomicU64,
    pub snapshots_dropped: AtomicU64,
    /// Snapshot bytes sent (deltas where smaller).
    pub snapshot_bytes: AtomicU64,
    /// What the same snapshots would have taken as whole views.
    pub snapshot_whole_bytes: AtomicU64,
}

/// What room tasks share.
struct Shared {
    config: RoomConfig,
    /// Checks the hub's tickets.
    tickets: TicketVerifier,
    /// This pool's server number in tickets ([`LOCAL_SERVER`] inside the hub's process).
    server: u32,
    events: mpsc::Sender<RoomEvent>,
    /// Where unreliable frames go for players with a datagram path.
    datagrams: Arc<dyn Datagrams>,
    idle: Mutex<Vec<u32>>,
    stats: RoomStats,
    /// The room tasks, for [`Rooms::stopped`].
    tasks: tokio_util::task::TaskTracker,
}

type Spawner = dyn Fn(u32, mpsc::Receiver<RoomCommand>, Arc<Shared>) + Send + Sync;

struct Inner {
    shared: Arc<Shared>,
    modes: &'static [Mode],
    slots: RwLock<Vec<mpsc::Sender<RoomCommand>>>,
    numbers: AtomicU32,
    spawn: Box<Spawner>,
}

/// A cheap handle to the room pool.
#[derive(Clone)]
pub struct Rooms(Arc<Inner>);

/// Room commands queued at most per room.
const MAILBOX: usize = 1024;

impl Rooms {
    /// A pool of rooms running `G`, admitting players with tickets for `server` that `tickets`
    /// verifies; events go to `events`, and the unreliable frames of players with an open
    /// datagram path to `datagrams`.
    pub fn new<G: Game>(
        config: RoomConfig,
        (tickets, server): (TicketVerifier, u32),
        events: mpsc::Sender<RoomEvent>,
        datagrams: Arc<dyn Datagrams>,
    ) -> Self {
        let stats = RoomStats::default();
        let shared = Arc::new(Shared {
            config,
            tickets,
            server,
            events,
            datagrams,
            idle: Mutex::default(),
            stats,
            tasks: tokio_util::task::TaskTracker::new(),
        });
        let spawn: Box<Spawner> = Box::new(|slot, rx, shared| {
            shared.tasks.spawn(room::run::<G>(slot, rx, Arc::clone(&shared)));
        });
        Self(Arc::new(Inner { shared, modes: G::modes(), slots: RwLock::default(), numbers: AtomicU32::new(1), spawn }))
    }

    /// The game's modes.
    pub fn modes(&self) -> &'static [Mode] {
        self.0.modes
    }

    pub fn mode(&self, name: &str) -> Option<&'static Mode> {
        self.0.modes.iter().find(|m| m.name == name)
    }

    pub fn stats(&self) -> &RoomStats {
        &self.0.shared.stats
    }

    pub fn config(&self) -> &RoomConfig {
        &self.0.shared.config
    }

    /// Starts a match in an idle room (or a new one, up to `max_rooms`).
    pub fn launch(&self, mode: &'static Mode, players: Vec<Seated>, seed: u64) -> Result<RoomId, RoomsFull> {
        let shared = &self.0.shared;
        let idle = lock(&shared.idle).pop();
        let slot = match idle {
            Some(slot) => slot,
            None => {
                let mut slots = self.0.slots.write().unwrap_or_else(std::sync::PoisonError::into_inner);
                if slots.len() >= shared.config.max_rooms {
                    return Err(RoomsFull);
                }
                let (tx, rx) = mpsc::channel(MAILBOX);
                let slot = slots.len() as u32;
                slots.push(tx);
                (self.0.spawn)(slot, rx, Arc::clone(shared));
                slot
            }
        };
        let room = RoomId { slot, number: self.0.numbers.fetch_add(1, Ordering::Relaxed) };
        let setup = MatchSetup {
            players: players.len() as u8,
            tick_hz: shared.config.tick_hz,
            seed,
            time_limit_secs: shared.config.time_limit_secs,
        };
        let start = RoomCommand::Start(Assignment { room, mode, players, setup });
        match self.sender(slot).map(|tx| tx.try_send(start)) {
            Some(Ok(())) => {
                shared.stats.matches_started.fetch_add(1, Ordering::Relaxed);
                Ok(room)
            }
            // An idle room always has room in its mailbox; give the slot back if not.
            _ => {
                lock(&shared.idle).push(slot);
                Err(RoomsFull)
            }
        }
    }

    fn sender(&self, slot: u32) -> Option<mpsc::Sender<RoomCommand>> {
        let slots = self.0.slots.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        slots.get(slot as usize).cloned()
    }

    /// Checks a ticket's signature and expiry, that it names this pool's server, and that it
    /// belongs to `user_id` (when the connection has a session; a room server has only the
    /// ticket to go by).
    pub fn verify(&self, ticket: &str, user_id: Option<i64>) -> Result<Ticket, TicketError> {
        let shared = &self.0.shared;
        let ticket = shared.tickets.verify(ticket, crate::db::unix_now_ms())?;
        let theirs = user_id.is_none_or(|id| id == ticket.user_id);
        if theirs && ticket.server == shared.server { Ok(ticket) } else { Err(TicketError::Foreign) }
    }

    /// How many rooms play a match now.
    pub fn running(&self) -> usize {
        let shared = &self.0.shared;
        let slots = self.0.slots.read().unwrap_or_else(std::sync::PoisonError::into_inner).len();
        slots.saturating_sub(lock(&shared.idle).len())
    }

    /// How many rooms could start a match now.
    pub fn free(&self) -> usize {
        let shared = &self.0.shared;
        let slots = self.0.slots.read().unwrap_or_else(std::sync::PoisonError::into_inner).len();
        shared.config.max_rooms.saturating_sub(slots) + lock(&shared.idle).len()
    }

    /// The mailbox of the room a verified ticket names, while that room is in the pool.
    pub fn mailbox(&self, room: RoomId) -> Option<mpsc::Sender<RoomCommand>> {
        self.sender(room.slot)
    }

    /// Gives a verified ticket's seat to `link`, through `room`: the mailbox of the room the
    /// ticket names ([`Self::mailbox`]), where the transport then sends the client's frames.
    pub async fn claim(room: &mpsc::Sender<RoomCommand>, ticket: Ticket, link: Link) -> Result<(), TicketError> {
        let (reply, answer) = oneshot::channel();
        room.send(RoomCommand::Claim(Claim { ticket, link, reply })).await.map_err(|_| TicketError::Foreign)?;
        answer.await.map_err(|_| TicketError::Foreign)?
    }

    /// Resolves once every room task has ended, after [`Self::shutdown`]: a room whose match
    /// ended before it heard of the stop waits for its result to be recorded first.
    pub async fn stopped(&self) {
        let tasks = &self.0.shared.tasks;
        tasks.close();
        tasks.wait().await;
    }

    /// Stops every room task (matches still playing end without a result).
    pub fn shutdown(&self) {
        let slots = std::mem::take(&mut *self.0.slots.write().unwrap_or_else(std::sync::PoisonError::into_inner));
        for slot in slots {
            let _ = slot.try_send(RoomCommand::Shutdown);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
