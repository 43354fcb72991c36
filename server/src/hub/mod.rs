//! The hub: lobby presence and chat for every connected client.
//!
//! One task owns the hub's state and receives [`Command`]s over a bounded channel. It never
//! awaits a client: each connection has a bounded outbox, filled with `try_send`, and a client
//! whose outbox is full is dropped as too slow, so that one stalled reader never slows the rest.
//!
//! People are split into lobbies ("channels") of at most `lobby_capacity` users, each with its
//! own presence list and chat; a small server has one lobby where everyone sees everyone. Joins
//! and leaves are announced in batches every [`PRESENCE_FLUSH`], so that a crowd arriving at
//! once costs one message per client per batch rather than one per arrival.

mod chat_log;
mod lease;
pub mod matchmaking;
pub mod results;
pub mod room_servers;
pub mod socket;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use shared::game::Mode;
use shared::hub::{
    CHAT_HISTORY_LEN, ChatLine, ErrorCode, PRESENCE_CHUNK, PROTOCOL_VERSION, ServerMsg, UserSummary, close,
};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::accounts::SessionKey;
use crate::bus::{Bus, InstanceId, Note, ServerState};
use crate::config::Limits;
use crate::db::{Db, unix_now_ms};
use crate::fleet::control::{self, Assignment, FromHub, FromServer, Player, Signed};
use crate::rate::TokenBucket;
use crate::rooms::{LOCAL_SERVER, RoomEvent, RoomId, Rooms, Seated, Ticket, TicketSigner};
use crate::transport::webrtc::Rtc;
use matchmaking::Waiting;

/// Identifies one WebSocket connection for the life of the process.
pub type ConnId = u64;

/// How often presence changes are sent out, at most.
pub const PRESENCE_FLUSH: Duration = Duration::from_millis(100);

/// In a cluster, how long a player arriving waits for the lease holder to give them a lobby
/// place (asking again every [`crate::bus::HEARTBEAT`]) before being told to come back later.
pub const JOIN_WAIT: Duration = Duration::from_secs(5);

/// How long an instance must have been on the bus before it gives lobby places as the lease
/// holder: long enough to hear every instance's players (they publish them when it says hello).
const PEERS_HEARD: Duration = Duration::from_secs(2);

/// How long a place the lease holder gave counts as taken before its player shows up in the
/// presence of their instance (or never does: they left meanwhile).
const ADMIT_HOLD: Duration = Duration::from_secs(6);

/// How often the queues are looked at for matches (besides whenever someone joins one).
pub const MATCHMAKING_EVERY: Duration = Duration::from_millis(250);

/// What the hub asks a connection's task to do. It is 16 bytes on purpose: tokio allocates a
/// block of 32 slots for every channel up front, and there is one channel per connection.
#[derive(Debug, Clone)]
pub enum Outbound {
    /// Send this text frame (one encoding, shared by every recipient).
    Text(Arc<Utf8Bytes>),
    /// Send a close frame, then end.
    Close(Closing),
}

/// Why the hub closes a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closing {
    SessionEnded,
    GoingAway,
    /// No lobby place could be had in time (a cluster without a lease holder).
    TryAgain,
}

impl Closing {
    /// The close code and reason sent to the client.
    pub fn frame(self) -> (u16, &'static str) {
        match self {
            Self::SessionEnded => (close::SESSION_ENDED, "session ended"),
            Self::GoingAway => (close::GOING_AWAY, "server shutting down"),
            Self::TryAgain => (close::TRY_AGAIN, "no place in a lobby could be had: try again"),
        }
    }
}

/// A connection joining the hub.
#[derive(Debug)]
struct Arrival {
    session: SessionKey,
    user: UserSummary,
    outbox: mpsc::Sender<Outbound>,
    /// The welcome, the lobby's presence list and its recent chat, in order; or why the
    /// connection closes before it (no lobby place for [`JOIN_WAIT`], the session ended).
    welcome: oneshot::Sender<Result<Vec<Utf8Bytes>, Closing>>,
}

/// Requests to the hub task.
#[derive(Debug)]
enum Command {
    Join {
        conn: ConnId,
        arrival: Arrival,
    },
    Leave {
        conn: ConnId,
    },
    Chat {
        conn: ConnId,
        text: String,
    },
    EndSessions {
        sessions: Vec<SessionKey>,
    },
    FindMatch {
        conn: ConnId,
        mode: &'static Mode,
        rating: f64,
    },
    CancelMatch {
        conn: ConnId,
    },
    Stats {
        reply: oneshot::Sender<HubStats>,
    },
    /// A room server registered (or registered again).
    ServerUp(Box<ServerUp>),
    /// A message from a registered room server's control connection.
    FromServer {
        server: u32,
        generation: u64,
        msg: FromServer,
    },
    /// A room server's result is recorded: its players are out of the match.
    ServerFinished {
        server: u32,
        match_id: u64,
    },
    /// A room server's control connection ended: out of placement at once.
    ServerDown {
        server: u32,
        generation: u64,
    },
    /// The room server did not come back in time: its matches are over, without a result.
    ServerLost {
        server: u32,
        generation: u64,
    },
    /// This instance holds the cluster's matcher lease (or lost it).
    Leader(bool),
    /// WebRTC signaling for a seat on a room server, relayed there.
    RemoteRtc {
        conn: ConnId,
        room: String,
        signal: RemoteSignal,
    },
    Shutdown,
}

/// What a browser signals for a peer connection to a room server.
#[derive(Debug)]
pub enum RemoteSignal {
    Offer { sdp: String, ticket: Option<String>, negotiated: bool },
    Candidate(String),
    Closed,
}

/// A room server's registration, as the hub keeps it.
#[derive(Debug)]
pub struct ServerUp {
    pub server: u32,
    pub name: String,
    pub community: bool,
    pub url: String,
    pub free: u32,
    pub running: Vec<control::Running>,
    /// When the room server made this registration, on its clock.
    pub registered_ms: i64,
    pub outbox: mpsc::Sender<FromHub>,
    /// Told which generation this registration is (or why it is refused).
    pub reply: oneshot::Sender<u64>,
}

/// Counts for health pages, tests and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HubStats {
    pub connections: usize,
    pub users_online: usize,
    pub lobbies: usize,
    pub dropped_slow: u64,
    pub queued: usize,
    pub playing: usize,
    /// Room servers registered and heard from.
    pub room_servers: usize,
}

/// A cheap handle to the hub task.
#[derive(Clone)]
pub struct Hub {
    commands: mpsc::Sender<Command>,
    next_conn: Arc<std::sync::atomic::AtomicU64>,
    limits: Arc<Limits>,
    db: Db,
    rooms: Rooms,
    rtc: Rtc,
    signer: Arc<TicketSigner>,
    /// WebSocket origins of room servers (`wss://host:port`), for the pages' CSP.
    room_origins: Arc<std::sync::RwLock<BTreeSet<String>>>,
    bus: Option<Bus>,
}

/// The hub task has stopped (the server is shutting down).
#[derive(Debug, thiserror::Error)]
#[error("the hub has stopped")]
pub struct HubGone;

impl Hub {
    /// Loads recent chat and starts the hub and chat-log tasks. Room events arrive on `events`;
    /// tickets are signed with `signer`. Without `local_rooms`, every match goes to a room server.
    /// With a `bus`, the lobbies are shared with the cluster's other instances.
    pub async fn start(
        db: Db,
        limits: Limits,
        (rooms, local_rooms): (Rooms, bool),
        rtc: Rtc,
        signer: TicketSigner,
        events: mpsc::Receiver<RoomEvent>,
        bus: Option<(Bus, mpsc::Receiver<Note>)>,
    ) -> Result<(Self, tokio::task::JoinHandle<()>), sqlx::Error> {
        let (bus, notes) = bus.unzip();
        let signer = Arc::new(signer);
        let known = crate::fleet::tokens::known_urls(&db).await?;
        let room_origins =
            Arc::new(std::sync::RwLock::new(known.iter().map(|u| shared::room::socket_origin(u)).collect()));
        let recent = chat_log::recent(&db, CHAT_HISTORY_LEN).await?;
        let (log, log_task) = chat_log::ChatLog::start(db.clone());
        let (commands, rx) = mpsc::channel(4096);
        let limits = Arc::new(limits);
        let mut state = State {
            limits: Arc::clone(&limits),
            conns: HashMap::new(),
            users: HashMap::new(),
            lobbies: Vec::new(),
            by_session: HashMap::new(),
            log,
            dropped_slow: 0,
            slow: Vec::new(),
            db: db.clone(),
            rooms: rooms.clone(),
            ice_servers: rtc.ice_servers().to_vec(),
            queues: BTreeMap::new(),
            queued: HashMap::new(),
            playing: HashMap::new(),
            signer: Arc::clone(&signer),
            local_rooms,
            servers: BTreeMap::new(),
            placing: HashMap::new(),
            leader: bus.is_none(),
            joining: HashMap::new(),
            started: Instant::now(),
            admitted: HashMap::new(),
            room_origins: Arc::clone(&room_origins),
            bus: bus.clone(),
            peers: HashMap::new(),
            recording: tokio::task::JoinSet::new(),
        };
        for (lobby, lines) in recent {
            state.lobby_mut(lobby).recent = lines.into();
        }
        if bus.is_some() && crate::db::Backend::of(&db) == crate::db::Backend::Postgres {
            tokio::spawn(lease::run(db.connect_options().database_url.to_string(), commands.clone()));
        }
        let task = tokio::spawn(async move {
            state.run(rx, events, notes).await;
            // The log flushes what it holds once every sender is gone.
            let _ = log_task.await;
        });
        // Connection ids are unique across the cluster (a room server answers signaling by
        // connection id to every instance): random high bits, then a count.
        let mut high = [0u8; 4];
        crate::random::fill(&mut high);
        let next_conn = Arc::new(std::sync::atomic::AtomicU64::new(u64::from(u32::from_le_bytes(high) >> 8) << 32));
        Ok((Self { commands, next_conn, limits, db, rooms, rtc, signer, room_origins, bus }, task))
    }

    pub fn rooms(&self) -> &Rooms {
        &self.rooms
    }

    pub fn rtc(&self) -> &Rtc {
        &self.rtc
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    /// The cluster's bus, when this instance is one of several.
    pub fn bus(&self) -> Option<&Bus> {
        self.bus.as_ref()
    }

    /// The key that signs tickets and assignments.
    pub fn signer(&self) -> &TicketSigner {
        &self.signer
    }

    /// Lets pages open WebSockets to a room server at `url`.
    pub fn add_room_origin(&self, url: &str) {
        self.room_origins
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(shared::room::socket_origin(url));
    }

    /// The origins pages may open WebSockets to besides their own, separated by spaces.
    pub fn room_origins(&self) -> String {
        let origins = self.room_origins.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        origins.iter().map(String::as_str).collect::<Vec<_>>().join(" ")
    }

    /// Relays WebRTC signaling for a seat on a room server (rooms named `server/room`); `false`
    /// when the room is this process's.
    pub async fn relay_rtc(&self, conn: ConnId, room: &str, signal: RemoteSignal) -> Result<bool, HubGone> {
        if !room.contains('/') {
            return Ok(false);
        }
        self.send(Command::RemoteRtc { conn, room: room.to_owned(), signal }).await?;
        Ok(true)
    }

    /// Tells room servers that a hub connection's peer connections are gone.
    pub async fn rtc_signaling_closed(&self, conn: ConnId) {
        let _ = self.send(Command::RemoteRtc { conn, room: String::new(), signal: RemoteSignal::Closed }).await;
    }

    /// Registers a room server; the answer is the registration's generation.
    pub async fn server_up(&self, up: ServerUp) -> Result<(), HubGone> {
        self.send(Command::ServerUp(Box::new(up))).await
    }

    /// Passes on a room server's message.
    pub async fn from_server(&self, server: u32, generation: u64, msg: FromServer) -> Result<(), HubGone> {
        self.send(Command::FromServer { server, generation, msg }).await
    }

    /// A room server's result is recorded.
    pub async fn server_finished(&self, server: u32, match_id: u64) -> Result<(), HubGone> {
        self.send(Command::ServerFinished { server, match_id }).await
    }

    /// A room server's control connection ended; after a grace, [`Command::ServerLost`].
    pub async fn server_down(&self, server: u32, generation: u64) {
        let _ = self.send(Command::ServerDown { server, generation }).await;
        let hub = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(SERVER_GRACE).await;
            let _ = hub.send(Command::ServerLost { server, generation }).await;
        });
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The limits, to hand to tasks that outlive a borrow.
    pub fn shared_limits(&self) -> Arc<Limits> {
        Arc::clone(&self.limits)
    }

    fn next_conn_id(&self) -> ConnId {
        self.next_conn.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    async fn send(&self, command: Command) -> Result<(), HubGone> {
        self.commands.send(command).await.map_err(|_| HubGone)
    }

    /// Ends sessions: their connections are closed with [`close::SESSION_ENDED`].
    pub async fn end_sessions(&self, sessions: Vec<SessionKey>) -> Result<(), HubGone> {
        self.send(Command::EndSessions { sessions }).await
    }

    /// Current counts.
    pub async fn stats(&self) -> Result<HubStats, HubGone> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Stats { reply }).await?;
        rx.await.map_err(|_| HubGone)
    }

    /// Whether the hub task has stopped.
    pub fn is_stopped(&self) -> bool {
        self.commands.is_closed()
    }

    /// Closes every connection with [`close::GOING_AWAY`] and stops the hub.
    pub async fn shutdown(&self) {
        let _ = self.send(Command::Shutdown).await;
    }
}

struct Conn {
    user_id: i64,
    session: SessionKey,
    outbox: mpsc::Sender<Outbound>,
}

/// A user with at least one connection.
struct Online {
    user: UserSummary,
    lobby: usize,
    conns: Vec<ConnId>,
    chat: TokenBucket,
}

/// A user's seat in a running match, kept while the match runs (also while they are offline,
/// so that a reloaded tab goes back in).
struct Playing {
    /// The room server hosting the match ([`LOCAL_SERVER`]: this process).
    server: u32,
    room: RoomId,
    /// The room server's match id.
    match_id: Option<u64>,
    /// Where the room server takes players, for a remote match.
    url: Option<Arc<str>>,
    seat: u8,
    mode: &'static str,
    players: Vec<String>,
}

#[derive(Default)]
struct Lobby {
    /// Users with a connection to this instance.
    members: BTreeSet<i64>,
    /// Users in this lobby through other instances of the cluster, with how many instances.
    remote: BTreeMap<i64, (UserSummary, u32)>,
    conns: BTreeSet<ConnId>,
    recent: VecDeque<ChatLine>,
    /// Presence changes not yet sent: the latest state of each user who came or went.
    pending: BTreeMap<i64, Option<UserSummary>>,
    /// Changes of this instance's members not yet told to the other instances.
    outgoing: BTreeMap<i64, Option<UserSummary>>,
}

impl Lobby {
    /// Users in the lobby, on any instance.
    fn size(&self) -> usize {
        self.members.len() + self.remote.keys().filter(|id| !self.members.contains(id)).count()
    }

    fn is_visible(&self, user_id: i64) -> bool {
        self.members.contains(&user_id) || self.remote.contains_key(&user_id)
    }
}

/// Another instance of the cluster, as heard on the bus.
struct Peer {
    seen: Instant,
    /// Its users, and the lobby each is in.
    users: HashMap<i64, usize>,
}

struct State {
    limits: Arc<Limits>,
    conns: HashMap<ConnId, Conn>,
    users: HashMap<i64, Online>,
    lobbies: Vec<Lobby>,
    by_session: HashMap<SessionKey, Vec<ConnId>>,
    log: chat_log::ChatLog,
    dropped_slow: u64,
    /// Connections found with a full outbox, to be dropped once the current command is done.
    slow: Vec<ConnId>,
    db: Db,
    rooms: Rooms,
    /// Handed to clients in the welcome.
    ice_servers: Vec<shared::hub::IceServer>,
    /// Who waits for a match, per mode, oldest first.
    queues: BTreeMap<&'static str, Vec<Waiting>>,
    /// The mode each queued user waits for.
    queued: HashMap<i64, &'static str>,
    playing: HashMap<i64, Playing>,
    signer: Arc<TicketSigner>,
    /// Whether matches may run in this process.
    local_rooms: bool,
    /// Room servers registered, by id.
    servers: BTreeMap<u32, Remote>,
    /// Matches sent to a room server that has not said yet where they run.
    placing: HashMap<u64, Placing>,
    /// The cluster's bus, when there are other instances (`--nats-url`).
    bus: Option<Bus>,
    /// The other instances heard on the bus.
    peers: HashMap<InstanceId, Peer>,
    /// Whether this instance forms matches and gives lobby places: always alone, the lease
    /// holder in a cluster.
    leader: bool,
    /// Players arriving here who wait for the lease holder to give them a lobby place.
    joining: HashMap<ConnId, Joining>,
    /// When this instance started (and said hello on the bus).
    started: Instant,
    /// Lobby places the lease holder gave, by user, not yet seen in anyone's presence: with
    /// the members, what a lobby's bound counts.
    admitted: HashMap<i64, (usize, Instant)>,
    /// Room servers' WebSocket origins, for the pages' CSP (shared with [`Hub`]).
    room_origins: Arc<std::sync::RwLock<BTreeSet<String>>>,
    /// The results of this process's matches being written: waited for before the hub stops,
    /// since the database closes after it.
    recording: tokio::task::JoinSet<()>,
}

/// How long a room server whose control connection ended may take to come back before its
/// matches are called off (its players are told within [`control::SILENCE`] + this).
pub const SERVER_GRACE: Duration = Duration::from_secs(2);
/// How long a room server whose holding instance went may take to register with another before
/// its matches are called off: its silence timeout, a retry, and room to spare (its matches play
/// on meanwhile; called off too soon, their players would lose a seat that still exists).
pub const ORPHAN_GRACE: Duration = Duration::from_secs(15);
/// How long a room server may take to answer a match it was sent.
const PLACEMENT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a stopping hub waits for the results being written (a database that is down for
/// longer loses them, and says so in the log).
const RECORDING_GRACE: Duration = Duration::from_secs(10);

/// A registered room server.
struct Remote {
    name: String,
    url: Arc<str>,
    free: u32,
    draining: bool,
    /// `None` while its connection is down (within the grace), or held by another instance.
    outbox: Option<mpsc::Sender<FromHub>>,
    /// The instance of the cluster that holds its control connection, when not this one (and
    /// it is up).
    via: Option<InstanceId>,
    generation: u64,
    /// When it registered with its holder (see [`ServerState::registered_ms`]).
    registered_ms: i64,
    /// Since when another instance's room server is up through no instance (its connection to
    /// its holder ended, or its holder went): it should register again; after [`ORPHAN_GRACE`]
    /// this instance calls its matches off even if its holder never said [`Note::ServerLost`].
    down_since: Option<Instant>,
}

impl Remote {
    /// Whether matches can be sent to it (through this instance or another).
    fn is_up(&self) -> bool {
        self.outbox.is_some() || self.via.is_some()
    }
}

/// A player waiting for a lobby place (see [`Note::Seek`]).
struct Joining {
    arrival: Arrival,
    since: Instant,
    asked: Instant,
}

/// A match sent to a room server, waiting for [`FromServer::Started`].
struct Placing {
    server: u32,
    mode: &'static Mode,
    /// Every player of the match, in seat order (on any instance).
    seats: Vec<UserSummary>,
    /// This instance's players among them.
    players: Vec<Waiting>,
    since: Instant,
}

static GENERATIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl State {
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Command>,
        mut events: mpsc::Receiver<RoomEvent>,
        mut notes: Option<mpsc::Receiver<Note>>,
    ) {
        let mut flush_at: Option<Instant> = None;
        let mut matchmaking = tokio::time::interval(MATCHMAKING_EVERY);
        matchmaking.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut peer_check = tokio::time::interval(crate::bus::HEARTBEAT);
        let mut gauges = tokio::time::interval(Duration::from_secs(1));
        loop {
            let note = async {
                match notes.as_mut() {
                    Some(notes) => notes.recv().await,
                    None => std::future::pending().await,
                }
            };
            let flush = async {
                match flush_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                command = rx.recv() => {
                    let Some(command) = command else { break };
                    if !self.command(command) {
                        break;
                    }
                }
                Some(event) = events.recv() => self.room_event(event),
                Some(note) = note => self.on_note(note),
                _ = peer_check.tick(), if self.bus.is_some() => {
                    self.expire_peers();
                    self.expire_joins();
                }
                _ = gauges.tick() => self.update_gauges(),
                () = flush => {
                    self.flush_presence();
                    flush_at = None;
                }
                _ = matchmaking.tick(), if !self.queued.is_empty() => {
                    self.expire_placements();
                    self.match_all();
                }
            }
            self.drop_slow();
            if flush_at.is_none() && self.lobbies.iter().any(|l| !l.pending.is_empty() || !l.outgoing.is_empty()) {
                flush_at = Some(Instant::now() + PRESENCE_FLUSH);
            }
        }
        self.finish_recording(&mut events).await;
    }

    /// Stopping: the matches that finished before the stop get their results written (those
    /// reported but not handled yet too, and those that end as the rooms hear of the stop:
    /// until every room task has ended, a room that reports a result waits for it to be
    /// written), within [`RECORDING_GRACE`].
    async fn finish_recording(&mut self, events: &mut mpsc::Receiver<RoomEvent>) {
        let deadline = tokio::time::Instant::now() + RECORDING_GRACE;
        let rooms = self.rooms.clone();
        let stopped = rooms.stopped();
        tokio::pin!(stopped);
        let mut rooms_stopped = false;
        loop {
            tokio::select! {
                Some(event) = events.recv() => {
                    if matches!(event, RoomEvent::Finished { .. }) {
                        self.room_event(event);
                    }
                }
                Some(_) = self.recording.join_next(), if !self.recording.is_empty() => {}
                () = &mut stopped, if !rooms_stopped => rooms_stopped = true,
                () = tokio::time::sleep_until(deadline) => {
                    if self.recording.is_empty() {
                        tracing::warn!("stopped with rooms that had not yet heard of the stop");
                    } else {
                        tracing::error!(results = self.recording.len(), "stopped before these match results could be written");
                    }
                    return;
                }
            }
            if rooms_stopped && self.recording.is_empty() && events.is_empty() {
                return;
            }
        }
    }

    /// Handles one command; `false` to stop.
    fn command(&mut self, command: Command) -> bool {
        match command {
            Command::Join { conn, arrival } => self.join(conn, arrival),
            Command::Leave { conn } => self.leave(conn),
            Command::Chat { conn, text } => self.chat(conn, text),
            Command::EndSessions { sessions } => {
                let hex = sessions.iter().map(SessionKey::to_hex).collect();
                self.tell_cluster(|from| Note::EndSessions { from, sessions: hex });
                self.end_sessions(&sessions);
            }
            Command::FindMatch { conn, mode, rating } => self.find_match(conn, mode, rating),
            Command::CancelMatch { conn } => self.cancel_match(conn),
            Command::Stats { reply } => {
                let _ = reply.send(HubStats {
                    connections: self.conns.len(),
                    users_online: self.users.len(),
                    lobbies: self.lobbies.iter().filter(|l| !l.members.is_empty()).count(),
                    dropped_slow: self.dropped_slow,
                    queued: self.queued.len(),
                    playing: self.playing.len(),
                    room_servers: self.servers.values().filter(|r| r.outbox.is_some()).count(),
                });
            }
            Command::ServerUp(up) => self.server_up(*up),
            Command::FromServer { server, generation, msg } => self.on_server_message(server, generation, &msg),
            Command::ServerFinished { server, match_id } => {
                self.playing.retain(|_, p| !(p.server == server && p.match_id == Some(match_id)));
                self.tell_cluster(|from| Note::ServerFinished { from, server, match_id });
            }
            Command::Leader(leader) => {
                self.leader = leader;
                if leader {
                    self.place_waiting();
                    self.match_all();
                }
            }
            Command::ServerDown { server, generation } => {
                if let Some(r) = self.servers.get_mut(&server).filter(|r| r.generation == generation) {
                    tracing::warn!(server = r.name, "room server disconnected");
                    r.outbox = None;
                    r.free = 0;
                    self.publish_server(server);
                }
                self.update_server_metrics();
            }
            Command::ServerLost { server, generation } => self.server_lost(server, generation),
            Command::RemoteRtc { conn, room, signal } => self.remote_rtc(conn, &room, signal),
            Command::Shutdown => {
                let conns: Vec<ConnId> = self.conns.keys().copied().collect();
                for conn in conns {
                    self.close(conn, Closing::GoingAway);
                }
                self.rooms.shutdown();
                return false;
            }
        }
        true
    }

    /// Drops connections found too slow; dropping one may announce its user offline, which
    /// may find more.
    fn drop_slow(&mut self) {
        while let Some(conn) = self.slow.pop() {
            if self.conns.contains_key(&conn) {
                self.dropped_slow += 1;
                self.leave(conn);
            }
        }
    }

    fn lobby_mut(&mut self, index: usize) -> &mut Lobby {
        if self.lobbies.len() <= index {
            self.lobbies.resize_with(index + 1, Lobby::default);
        }
        &mut self.lobbies[index]
    }

    /// The lobby for a user arriving: the one they are in already (here, through another
    /// instance, or by a place just given), else the first with room, counting every
    /// instance's users and the places given but not yet taken.
    fn lobby_with_room(&self, user_id: i64) -> usize {
        if let Some(online) = self.users.get(&user_id) {
            return online.lobby;
        }
        if let Some(&(lobby, _)) = self.admitted.get(&user_id) {
            return lobby;
        }
        if let Some(lobby) = self.lobbies.iter().position(|l| l.remote.contains_key(&user_id)) {
            return lobby;
        }
        // Places given, by lobby (one nobody is in yet included), of users not seen there yet.
        let mut given = vec![0usize; self.lobbies.len()];
        for (user, &(lobby, _)) in &self.admitted {
            if !self.lobbies.get(lobby).is_some_and(|l| l.is_visible(*user)) {
                if given.len() <= lobby {
                    given.resize(lobby + 1, 0);
                }
                given[lobby] += 1;
            }
        }
        let capacity = self.limits.lobby_capacity.max(1);
        let size = |i: usize| self.lobbies.get(i).map_or(0, Lobby::size) + given.get(i).copied().unwrap_or(0);
        // Past the last lobby known or given, every one is empty.
        (0..=self.lobbies.len().max(given.len())).find(|&i| size(i) < capacity).unwrap_or_default()
    }

    /// A lobby place for `user`, arriving on this instance's connection `conn`, when this
    /// instance may give it: alone, as the lease holder (telling the cluster), or when the user
    /// is already in a lobby. `None`: the lease holder is asked ([`Note::Seek`]).
    fn place_for(&mut self, conn: ConnId, user: &UserSummary) -> Option<usize> {
        let Some(bus) = &self.bus else { return Some(self.lobby_with_room(user.id)) };
        let already = self.users.contains_key(&user.id) || self.lobbies.iter().any(|l| l.remote.contains_key(&user.id));
        if already {
            return Some(self.lobby_with_room(user.id));
        }
        if !self.gives_places() {
            bus.publish(Note::Seek { from: bus.id(), conn, user: user.clone() });
            return None;
        }
        let to = bus.id();
        Some(self.admit(to, conn, user.clone()))
    }

    /// Whether this instance gives lobby places: it holds the lease, and has been on the bus
    /// long enough to have heard every instance's players ([`PEERS_HEARD`]).
    fn gives_places(&self) -> bool {
        self.leader && (self.bus.is_none() || self.started.elapsed() >= PEERS_HEARD)
    }

    /// As the lease holder, places this instance's players who wait for a place.
    fn place_waiting(&mut self) {
        if !self.gives_places() {
            return;
        }
        let Some(to) = self.bus.as_ref().map(Bus::id) else { return };
        for (conn, j) in std::mem::take(&mut self.joining) {
            let lobby = self.admit(to, conn, j.arrival.user.clone());
            self.enter(conn, j.arrival, lobby);
        }
    }

    /// Closes the held joins that `which` picks, telling each `why`; how many.
    fn refuse_joins(&mut self, which: impl Fn(&Joining) -> bool, why: Closing) -> usize {
        let mut refused = 0;
        for (_, j) in self.joining.extract_if(|_, j| which(j)) {
            let _ = j.arrival.welcome.send(Err(why));
            refused += 1;
        }
        refused
    }

    /// A lobby number another instance names, unless it is past any lobby there could be.
    fn plausible_lobby(&self, lobby: u32) -> Option<usize> {
        let lobby = lobby as usize;
        (lobby <= self.lobbies.len() + 1024).then_some(lobby)
    }

    /// As the lease holder, gives `user` (of instance `to`) a lobby place and tells everyone.
    fn admit(&mut self, to: InstanceId, conn: ConnId, user: UserSummary) -> usize {
        let lobby = self.lobby_with_room(user.id);
        self.admitted.insert(user.id, (lobby, Instant::now()));
        let lobby_id = lobby as u32;
        self.tell_cluster(|from| Note::Admit { from, to, conn, user, lobby: lobby_id });
        lobby
    }

    /// Asks the lease holder again for players still waiting for a place, gives up on those
    /// who waited [`JOIN_WAIT`], and forgets places given that nobody took.
    fn expire_joins(&mut self) {
        self.place_waiting();
        let now = Instant::now();
        self.admitted.retain(|_, (_, at)| now.duration_since(*at) < ADMIT_HOLD);
        let late = self.refuse_joins(|j| now.duration_since(j.since) >= JOIN_WAIT, Closing::TryAgain);
        if late > 0 {
            tracing::warn!(players = late, "no lobby place given in time (is any instance holding the lease?)");
        }
        let Some(bus) = &self.bus else { return };
        for (&conn, j) in &mut self.joining {
            if now.duration_since(j.asked) >= crate::bus::HEARTBEAT {
                j.asked = now;
                bus.publish(Note::Seek { from: bus.id(), conn, user: j.arrival.user.clone() });
            }
        }
    }

    fn end_sessions(&mut self, sessions: &[SessionKey]) {
        self.refuse_joins(|j| sessions.contains(&j.arrival.session), Closing::SessionEnded);
        for session in sessions {
            for conn in self.by_session.get(session).cloned().unwrap_or_default() {
                self.close(conn, Closing::SessionEnded);
            }
        }
    }

    /// What an operator watches, once a second: players and connections on this instance,
    /// queued and playing, the cluster's other instances.
    fn update_gauges(&self) {
        metrics::gauge!("rallypoint_players_online").set(self.users.len() as f64);
        metrics::gauge!("rallypoint_hub_connections").set(self.conns.len() as f64);
        metrics::gauge!("rallypoint_players_queued").set(self.queued.len() as f64);
        metrics::gauge!("rallypoint_players_in_matches").set(self.playing.len() as f64);
        metrics::gauge!("rallypoint_rooms_running").set(self.rooms.running() as f64);
        if let Some(bus) = &self.bus {
            metrics::gauge!("rallypoint_bus_peers").set(self.peers.len() as f64);
            metrics::gauge!("rallypoint_bus_connected").set(if bus.is_connected() { 1.0 } else { 0.0 });
        }
    }

    /// What another instance said.
    fn on_note(&mut self, note: Note) {
        let from = note.from();
        let known = self.peers.contains_key(&from);
        let peer = self.peers.entry(from).or_insert_with(|| Peer { seen: Instant::now(), users: HashMap::new() });
        peer.seen = Instant::now();
        if !known {
            tracing::info!(instance = format!("{from:016x}"), "another instance is on the bus");
            // It may not know us either (it just arrived, or we were cut apart).
            self.tell_cluster(|from| Note::Hello { from });
        }
        match note {
            // Login counts go to the throttle before the hub (see `bus`).
            Note::Alive { .. } | Note::Login { .. } => {}
            Note::Hello { .. } => self.publish_everyone(),
            Note::Presence { lobby, joined, left, .. } => {
                let Some(lobby) = self.plausible_lobby(lobby) else { return };
                for user in joined {
                    self.remote_join(from, lobby, user);
                }
                for user_id in left {
                    self.remote_leave(from, user_id);
                }
            }
            Note::Seek { conn, user, .. } => {
                if self.gives_places() {
                    self.admit(from, conn, user);
                }
            }
            Note::Admit { to, conn, user, lobby, .. } => {
                let Some(lobby) = self.plausible_lobby(lobby) else { return };
                self.admitted.insert(user.id, (lobby, Instant::now()));
                let mine = self.bus.as_ref().is_some_and(|b| b.id() == to);
                if let Some(j) = mine.then(|| self.joining.remove(&conn)).flatten() {
                    self.enter(conn, j.arrival, lobby);
                }
            }
            Note::Chat { lobby, line, .. } => {
                let lobby = lobby as usize;
                if lobby < self.lobbies.len() {
                    self.remember_line(lobby, line.clone());
                    self.broadcast(lobby, &ServerMsg::Chat(line));
                }
            }
            Note::EndSessions { sessions, .. } => {
                let sessions: Vec<SessionKey> = sessions.iter().filter_map(|h| SessionKey::from_hex(h)).collect();
                self.end_sessions(&sessions);
            }
            Note::Gone { .. } => self.peer_gone(from),
            Note::Queue { mode, user, conn, rating, waited_ms, .. } => {
                let Some(mode) = self.rooms.mode(&mode) else { return };
                if self.queued.contains_key(&user.id) || self.playing.contains_key(&user.id) {
                    return;
                }
                let now = Instant::now();
                let since = now.checked_sub(Duration::from_millis(waited_ms.min(3_600_000))).unwrap_or(now);
                self.queued.insert(user.id, mode.name);
                let waiting = Waiting { user_id: user.id, name: user.name, conn, instance: Some(from), rating, since };
                self.queues.entry(mode.name).or_default().push(waiting);
                self.match_mode(mode);
            }
            Note::Unqueue { user_id, .. } => self.unqueue_remote(|w| w.user_id == user_id && w.instance == Some(from)),
            Note::Place { server, match_id, mode, players, start, .. } => {
                if let Some(mode) = self.rooms.mode(&mode) {
                    self.on_place(server, match_id, mode, &players, start, Vec::new());
                }
            }
            Note::ServerState { state, .. } => self.server_state(from, state),
            Note::FromServer { server, msg, .. } => {
                if self.servers.get(&server).is_some_and(|r| r.outbox.is_none()) {
                    self.on_server_message(server, 0, &msg);
                }
            }
            Note::ToServer { holder, server, msg, .. } => {
                let mine = self.bus.as_ref().is_some_and(|b| b.id() == holder);
                if let Some(outbox) = self.servers.get(&server).and_then(|r| r.outbox.as_ref()).filter(|_| mine) {
                    let _ = outbox.try_send(msg);
                }
            }
            Note::ServerFinished { server, match_id, .. } => {
                self.playing.retain(|_, p| !(p.server == server && p.match_id == Some(match_id)));
            }
            Note::ServerLost { server, .. } => {
                if self.servers.get(&server).is_some_and(|r| !r.is_up()) {
                    self.call_off(server);
                }
            }
        }
    }

    /// Publishes the note `make` builds from this instance's id, when in a cluster.
    fn tell_cluster(&self, make: impl FnOnce(InstanceId) -> Note) {
        if let Some(bus) = &self.bus {
            bus.publish(make(bus.id()));
        }
    }

    /// Tells the cluster that a player of this instance waits.
    fn announce_queued(&self, mode: &'static Mode, w: &Waiting) {
        self.tell_cluster(|from| Note::Queue {
            from,
            mode: mode.name.to_owned(),
            user: UserSummary { id: w.user_id, name: w.name.clone() },
            conn: w.conn,
            rating: w.rating,
            waited_ms: Instant::now().saturating_duration_since(w.since).as_millis() as u64,
        });
    }

    /// Takes the queue entries of other instances that `which` picks out of the queues.
    fn unqueue_remote(&mut self, which: impl Fn(&Waiting) -> bool) {
        for queue in self.queues.values_mut() {
            queue.retain(|w| {
                let gone = w.instance.is_some() && which(w);
                if gone {
                    self.queued.remove(&w.user_id);
                }
                !gone
            });
        }
    }

    /// Tells the cluster how room server `server`, held here, is now.
    fn publish_server(&self, server: u32) {
        let Some(r) = self.servers.get(&server).filter(|r| r.via.is_none()) else { return };
        let state = ServerState {
            server,
            name: r.name.clone(),
            url: r.url.to_string(),
            free: r.free,
            draining: r.draining,
            up: r.outbox.is_some(),
            registered_ms: r.registered_ms,
        };
        self.tell_cluster(|from| Note::ServerState { from, state });
    }

    /// Another instance says how a room server it holds is. Of two registrations of one server,
    /// the later is the live one: what an instance says of an earlier one is stale, and an
    /// instance holding an earlier one lets it go (the room server left it without a word).
    fn server_state(&mut self, from: InstanceId, state: ServerState) {
        let ServerState { server, name, url, free, draining, up, registered_ms } = state;
        if let Some(r) = self.servers.get_mut(&server) {
            if registered_ms < r.registered_ms {
                return; // about an older registration
            }
            if r.outbox.is_some() {
                if !up || registered_ms == r.registered_ms {
                    return; // held here: this instance knows best
                }
                tracing::info!(server = r.name, "room server registered with another instance: letting go");
                r.outbox = None; // its control session here ends
            }
        }
        if up {
            self.room_origins
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(shared::room::socket_origin(&url));
        }
        let via = up.then_some(from);
        let free = if up { free } else { 0 };
        let url = Arc::from(url);
        let down_since =
            if up { None } else { self.servers.get(&server).and_then(|r| r.down_since).or(Some(Instant::now())) };
        let generation = 0;
        let remote = Remote { name, url, free, draining, outbox: None, via, generation, registered_ms, down_since };
        self.servers.insert(server, remote);
        self.update_server_metrics();
    }

    /// A match went to room server `server`: this instance's players in it (`own`, and those
    /// still in its queue) wait for the server's answer; the instance holding the server sends
    /// it `start`; everyone else's entries leave the queues.
    fn on_place(
        &mut self,
        server: u32,
        match_id: u64,
        mode: &'static Mode,
        seats: &[UserSummary],
        start: Signed,
        mut own: Vec<Waiting>,
    ) {
        if let Some(queue) = self.queues.get_mut(mode.name) {
            queue.retain(|w| {
                if !seats.iter().any(|u| u.id == w.user_id) {
                    return true;
                }
                if w.instance.is_none() {
                    own.push(w.clone());
                }
                false
            });
        }
        for u in seats {
            if !own.iter().any(|w| w.user_id == u.id) {
                self.queued.remove(&u.id);
            }
        }
        // Every instance learns the seats (a player whose instance goes comes back through
        // another, which must know their seat); each answers for its own players.
        let seats = seats.to_vec();
        self.placing.insert(match_id, Placing { server, mode, seats, players: own, since: Instant::now() });
        if let Some(remote) = self.servers.get_mut(&server) {
            remote.free = remote.free.saturating_sub(1);
            if let Some(outbox) = &remote.outbox
                && outbox.try_send(FromHub::Start { assignment: start }).is_err()
            {
                tracing::warn!(server = remote.name, "could not send a match to a room server");
            }
        }
    }

    /// A user of instance `from` is in `lobby`.
    fn remote_join(&mut self, from: InstanceId, lobby: usize, user: UserSummary) {
        let Some(peer) = self.peers.get_mut(&from) else { return };
        self.admitted.remove(&user.id);
        match peer.users.insert(user.id, lobby) {
            Some(was) if was == lobby => return,
            Some(was) => self.remote_leave_lobby(was, user.id),
            None => {}
        }
        let l = self.lobby_mut(lobby);
        let visible = l.is_visible(user.id);
        let entry = l.remote.entry(user.id).or_insert_with(|| (user.clone(), 0));
        entry.1 += 1;
        if !visible {
            l.pending.insert(user.id, Some(user));
        }
    }

    /// A user of instance `from` left.
    fn remote_leave(&mut self, from: InstanceId, user_id: i64) {
        if let Some(lobby) = self.peers.get_mut(&from).and_then(|p| p.users.remove(&user_id)) {
            self.remote_leave_lobby(lobby, user_id);
        }
    }

    fn remote_leave_lobby(&mut self, lobby: usize, user_id: i64) {
        let l = self.lobby_mut(lobby);
        if let Some(entry) = l.remote.get_mut(&user_id) {
            entry.1 -= 1;
            if entry.1 == 0 {
                l.remote.remove(&user_id);
                if !l.members.contains(&user_id) {
                    l.pending.insert(user_id, None);
                }
            }
        }
    }

    /// Instance `from` stopped, or went silent: its users leave.
    fn peer_gone(&mut self, from: InstanceId) {
        if let Some(peer) = self.peers.remove(&from) {
            tracing::info!(instance = format!("{from:016x}"), users = peer.users.len(), "an instance left the bus");
            self.unqueue_remote(|w| w.instance == Some(from));
            // Its room servers are out of placement until they register with an instance.
            for r in self.servers.values_mut().filter(|r| r.via == Some(from)) {
                r.via = None;
                r.free = 0;
                r.down_since = Some(Instant::now());
            }
            for (user_id, lobby) in peer.users {
                self.remote_leave_lobby(lobby, user_id);
            }
        }
    }

    fn expire_peers(&mut self) {
        let now = Instant::now();
        let silent: Vec<InstanceId> = self
            .peers
            .iter()
            .filter(|(_, p)| now.duration_since(p.seen) > crate::bus::PEER_TIMEOUT)
            .map(|(id, _)| *id)
            .collect();
        for id in silent {
            self.peer_gone(id);
        }
        let orphans: Vec<u32> = self
            .servers
            .iter()
            .filter(|(_, r)| !r.is_up() && r.down_since.is_some_and(|at| now.duration_since(at) > ORPHAN_GRACE))
            .map(|(&id, _)| id)
            .collect();
        for server in orphans {
            tracing::warn!(server, "a room server whose instance went never came back: its matches are called off");
            self.call_off(server);
        }
    }

    /// Tells the other instances every user of this one, lobby by lobby, who of them waits for
    /// a match, and the room servers held here.
    fn publish_everyone(&self) {
        if self.bus.is_none() {
            return;
        }
        for (mode, queue) in &self.queues {
            let Some(mode) = self.rooms.mode(mode) else { continue };
            for w in queue.iter().filter(|w| w.instance.is_none()) {
                self.announce_queued(mode, w);
            }
        }
        for (&server, r) in &self.servers {
            if r.outbox.is_some() {
                self.publish_server(server);
            }
        }
        for lobby in 0..self.lobbies.len() {
            self.publish_presence(lobby, &self.local_members(lobby), &[]);
        }
    }

    /// This instance's members of `lobby`.
    fn local_members(&self, lobby: usize) -> Vec<UserSummary> {
        let members = &self.lobbies[lobby].members;
        members.iter().filter_map(|id| self.users.get(id).map(|o| o.user.clone())).collect()
    }

    /// Tells the other instances who of this one's players came into `lobby` or left it, in
    /// chunks.
    fn publish_presence(&self, lobby: usize, joined: &[UserSummary], left: &[i64]) {
        let lobby = lobby as u32;
        for chunk in joined.chunks(PRESENCE_CHUNK) {
            self.tell_cluster(|from| Note::Presence { from, lobby, joined: chunk.to_vec(), left: Vec::new() });
        }
        for chunk in left.chunks(PRESENCE_CHUNK) {
            self.tell_cluster(|from| Note::Presence { from, lobby, joined: Vec::new(), left: chunk.to_vec() });
        }
    }

    fn remember_line(&mut self, lobby: usize, line: ChatLine) {
        let recent = &mut self.lobbies[lobby].recent;
        if recent.len() == CHAT_HISTORY_LEN {
            recent.pop_front();
        }
        recent.push_back(line);
    }

    /// A player arrives: in the lobby this instance may choose, or once the lease holder gave a
    /// place.
    fn join(&mut self, conn: ConnId, arrival: Arrival) {
        match self.place_for(conn, &arrival.user) {
            Some(lobby) => self.enter(conn, arrival, lobby),
            None => {
                let now = Instant::now();
                self.joining.insert(conn, Joining { arrival, since: now, asked: now });
            }
        }
    }

    /// Puts a player's connection in `lobby` (or the lobby the user is in already) and sends the
    /// welcome.
    fn enter(&mut self, conn: ConnId, arrival: Arrival, lobby: usize) {
        let Arrival { session, user, outbox, welcome } = arrival;
        let user_id = user.id;
        self.admitted.remove(&user_id);
        let lobby = if let Some(online) = self.users.get(&user_id) {
            online.lobby
        } else {
            let chat = TokenBucket::new(self.limits.chat_per_second, self.limits.chat_burst, Instant::now());
            self.users.insert(user_id, Online { user: user.clone(), lobby, conns: Vec::new(), chat });
            let clustered = self.bus.is_some();
            let l = self.lobby_mut(lobby);
            if !l.is_visible(user_id) {
                l.pending.insert(user_id, Some(user.clone()));
            }
            l.members.insert(user_id);
            if clustered {
                l.outgoing.insert(user_id, Some(user.clone()));
            }
            lobby
        };
        if let Some(online) = self.users.get_mut(&user_id) {
            online.conns.push(conn);
        }
        self.conns.insert(conn, Conn { user_id, session, outbox });
        self.by_session.entry(session).or_default().push(conn);
        self.lobby_mut(lobby).conns.insert(conn);

        let mut members = self.local_members(lobby);
        let l = &self.lobbies[lobby];
        members.extend(l.remote.iter().filter(|(id, _)| !l.members.contains(id)).map(|(_, (u, _))| u.clone()));
        let welcome_msg = ServerMsg::Welcome {
            version: PROTOCOL_VERSION,
            me: user,
            lobby: lobby as u32 + 1,
            online: members.len() as u32,
            history: l.recent.len() as u32,
            ice_servers: self.ice_servers.clone(),
        };
        let mut frames = vec![welcome_msg.to_json().into()];
        for chunk in members.chunks(PRESENCE_CHUNK) {
            frames.push(ServerMsg::Presence { joined: chunk.to_vec(), left: Vec::new() }.to_json().into());
        }
        frames.extend(l.recent.iter().map(|line| ServerMsg::Chat(line.clone()).to_json().into()));
        // A tab reloaded during a match goes straight back in.
        if let Some(p) = self.playing.get(&user_id) {
            frames.push(self.match_found(user_id, p).to_json().into());
        }
        if welcome.send(Ok(frames)).is_err() {
            // The connection ended while joining.
            self.leave(conn);
        }
    }

    fn leave(&mut self, conn: ConnId) {
        self.joining.remove(&conn);
        let Some(c) = self.conns.remove(&conn) else {
            return;
        };
        if let Some(list) = self.by_session.get_mut(&c.session) {
            list.retain(|&x| x != conn);
            if list.is_empty() {
                self.by_session.remove(&c.session);
            }
        }
        self.unqueue_conn(conn);
        let Some(online) = self.users.get_mut(&c.user_id) else {
            return;
        };
        online.conns.retain(|&x| x != conn);
        let (lobby, last) = (online.lobby, online.conns.is_empty());
        let clustered = self.bus.is_some();
        let l = &mut self.lobbies[lobby];
        l.conns.remove(&conn);
        if last {
            self.users.remove(&c.user_id);
            l.members.remove(&c.user_id);
            if !l.remote.contains_key(&c.user_id) {
                l.pending.insert(c.user_id, None);
            }
            if clustered {
                l.outgoing.insert(c.user_id, None);
            }
        }
    }

    /// Sends each lobby's pending presence changes to its members, in chunks, and this
    /// instance's own changes to the other instances.
    fn flush_presence(&mut self) {
        for lobby in 0..self.lobbies.len() {
            let outgoing = std::mem::take(&mut self.lobbies[lobby].outgoing);
            if !outgoing.is_empty() {
                let (joined, left) = split_changes(outgoing);
                self.publish_presence(lobby, &joined, &left);
            }
            let pending = std::mem::take(&mut self.lobbies[lobby].pending);
            if pending.is_empty() {
                continue;
            }
            let (joined, left) = split_changes(pending);
            let chunks = joined.len().max(left.len()).div_ceil(PRESENCE_CHUNK);
            for i in 0..chunks {
                let part = |len: usize| (i * PRESENCE_CHUNK).min(len)..((i + 1) * PRESENCE_CHUNK).min(len);
                let msg = ServerMsg::Presence {
                    joined: joined[part(joined.len())].to_vec(),
                    left: left[part(left.len())].to_vec(),
                };
                self.broadcast(lobby, &msg);
            }
        }
    }

    fn chat(&mut self, conn: ConnId, text: String) {
        let Some(user_id) = self.conns.get(&conn).map(|c| c.user_id) else {
            return;
        };
        let Some(online) = self.users.get_mut(&user_id) else {
            return;
        };
        if !online.chat.take(Instant::now()) {
            let msg = ServerMsg::Error {
                code: ErrorCode::RateLimited,
                message: "You are sending messages too fast; wait a moment.".into(),
            };
            self.send_to(conn, &msg);
            return;
        }
        let lobby = online.lobby;
        let line = ChatLine { from: online.user.clone(), text, at_ms: unix_now_ms() };
        if !self.log.append(user_id, lobby, &line) {
            let msg = ServerMsg::Error { code: ErrorCode::Busy, message: "Chat is busy; try again.".into() };
            self.send_to(conn, &msg);
            return;
        }
        self.remember_line(lobby, line.clone());
        let (lobby_id, said) = (lobby as u32, line.clone());
        self.tell_cluster(|from| Note::Chat { from, lobby: lobby_id, line: said });
        self.broadcast(lobby, &ServerMsg::Chat(line));
    }

    fn find_match(&mut self, conn: ConnId, mode: &'static Mode, rating: f64) {
        let Some(user) = self.conns.get(&conn).and_then(|c| self.users.get(&c.user_id)).map(|o| o.user.clone()) else {
            return;
        };
        let refusal = if self.playing.contains_key(&user.id) {
            Some("You are in a match already.")
        } else if self.queued.contains_key(&user.id) {
            Some("You are in a queue already.")
        } else {
            None
        };
        if let Some(message) = refusal {
            self.send_to(conn, &ServerMsg::Error { code: ErrorCode::AlreadyBusy, message: message.into() });
            return;
        }
        self.queued.insert(user.id, mode.name);
        let waiting =
            Waiting { user_id: user.id, name: user.name, conn, instance: None, rating, since: Instant::now() };
        self.announce_queued(mode, &waiting);
        self.queues.entry(mode.name).or_default().push(waiting);
        self.send_to(conn, &ServerMsg::Queued { mode: mode.name.into(), waited_ms: 0 });
        self.match_mode(mode);
    }

    fn cancel_match(&mut self, conn: ConnId) {
        if self.unqueue_conn(conn) {
            self.send_to(conn, &ServerMsg::Unqueued);
        } else {
            let msg = ServerMsg::Error { code: ErrorCode::NotQueued, message: "You are not in a queue.".into() };
            self.send_to(conn, &msg);
        }
    }

    /// Takes the entry that `conn` queued out of its queue; whether there was one.
    fn unqueue_conn(&mut self, conn: ConnId) -> bool {
        for queue in self.queues.values_mut() {
            if let Some(i) = queue.iter().position(|w| w.conn == conn && w.instance.is_none()) {
                let w = queue.remove(i);
                self.queued.remove(&w.user_id);
                let user_id = w.user_id;
                self.tell_cluster(|from| Note::Unqueue { from, user_id });
                return true;
            }
        }
        false
    }

    fn match_all(&mut self) {
        for mode in self.rooms.modes() {
            self.match_mode(mode);
        }
    }

    /// Starts every match the queue of `mode` allows now, each where most rooms are free: in
    /// this process, or on the room server with the most free rooms.
    fn match_mode(&mut self, mode: &'static Mode) {
        if !self.leader {
            return; // another instance of the cluster forms matches
        }
        let Some(queue) = self.queues.get_mut(mode.name) else { return };
        let matches = matchmaking::form_matches(queue, mode, Instant::now());
        for (i, players) in matches.iter().enumerate() {
            let seed = crate::random::u64();
            // Players on other instances reach rooms only on room servers (a hub's own room
            // socket is behind the load balancer, on whichever instance).
            let all_here = players.iter().all(|w| w.instance.is_none());
            let placed = match self.place(all_here) {
                Some(LOCAL_SERVER) => self.start_local(mode, players, seed),
                Some(server) => self.start_remote(server, mode, players, seed),
                None => false,
            };
            if !placed {
                tracing::warn!(mode = mode.name, "cannot start a match: every room is busy");
                // Back to the front of the queue, in order, for the next look.
                self.requeue(mode, matches[i..].iter().flatten().cloned().collect());
                return;
            }
        }
    }

    /// Where the next match goes: the place with the most free rooms (this process first on
    /// a tie, when it may take the match), or nowhere.
    fn place(&self, here_too: bool) -> Option<u32> {
        let local = if self.local_rooms && here_too { self.rooms.free() } else { 0 };
        let remote = self
            .servers
            .iter()
            .filter(|(_, r)| r.is_up() && !r.draining)
            .map(|(&id, r)| (r.free as usize, id))
            .max_by_key(|&(free, id)| (free, std::cmp::Reverse(id)));
        match remote {
            Some((free, id)) if free > local => Some(id),
            _ if local > 0 => Some(LOCAL_SERVER),
            _ => None,
        }
    }

    fn start_local(&mut self, mode: &'static Mode, players: &[Waiting], seed: u64) -> bool {
        let seated = players.iter().map(|w| Seated { user_id: w.user_id, name: w.name.clone() }).collect();
        let Ok(room) = self.rooms.launch(mode, seated, seed) else { return false };
        for w in players {
            let user_id = w.user_id;
            self.tell_cluster(|from| Note::Unqueue { from, user_id });
        }
        let seats = seats_of(players);
        self.seat_players(mode, &seats, players, LOCAL_SERVER, room, None);
        tracing::debug!(%room, mode = mode.name, players = players.len(), "match made");
        true
    }

    /// Sends the match to a room server; its players wait for [`FromServer::Started`] (they
    /// stay marked as queued meanwhile, so that nobody queues twice).
    fn start_remote(&mut self, server: u32, mode: &'static Mode, players: &[Waiting], seed: u64) -> bool {
        let Some(remote) = self.servers.get(&server).filter(|r| r.is_up()) else { return false };
        if remote.outbox.as_ref().is_some_and(|o| o.capacity() == 0) {
            return false;
        }
        let match_id = crate::random::u64() >> 11; // exact in a JavaScript number, for readers of the JSON
        let assignment = Assignment {
            match_id,
            server,
            mode: mode.name.to_owned(),
            players: players.iter().map(|w| Player { user_id: w.user_id, name: w.name.clone() }).collect(),
            seed,
        };
        let start = Signed::new(&assignment, &self.signer);
        let seats = seats_of(players);
        let own: Vec<Waiting> = players.iter().filter(|w| w.instance.is_none()).cloned().collect();
        if remote.via.is_some() || players.iter().any(|w| w.instance.is_some()) {
            let (mode_name, seats, start) = (mode.name.to_owned(), seats.clone(), start.clone());
            self.tell_cluster(|from| Note::Place { from, server, match_id, mode: mode_name, players: seats, start });
        }
        self.on_place(server, match_id, mode, &seats, start, own);
        true
    }

    /// Puts waiting players back at the front of their queue, in order (those still connected).
    fn requeue(&mut self, mode: &'static Mode, players: Vec<Waiting>) {
        let mut back = Vec::new();
        for waiting in players.into_iter().rev() {
            if waiting.instance.is_some() || self.conns.contains_key(&waiting.conn) {
                self.queued.insert(waiting.user_id, mode.name);
                back.push(waiting);
            } else {
                self.queued.remove(&waiting.user_id);
            }
        }
        for w in back.iter().filter(|w| w.instance.is_none()) {
            self.announce_queued(mode, w);
        }
        let queue = self.queues.entry(mode.name).or_default();
        for waiting in back {
            queue.insert(0, waiting);
        }
    }

    /// Keeps the seats of a match whose players are `seats`, in order, and tells this instance's
    /// players among them (`own`) where to go.
    fn seat_players(
        &mut self,
        mode: &'static Mode,
        seats: &[UserSummary],
        own: &[Waiting],
        server: u32,
        room: RoomId,
        remote: Option<&(u64, Arc<str>)>,
    ) {
        let names: Vec<String> = seats.iter().map(|u| u.name.clone()).collect();
        for (seat, user) in seats.iter().enumerate() {
            let p = Playing {
                server,
                room,
                match_id: remote.map(|r| r.0),
                url: remote.map(|r| Arc::clone(&r.1)),
                seat: seat as u8,
                mode: mode.name,
                players: names.clone(),
            };
            if let Some(w) = own.iter().find(|w| w.user_id == user.id) {
                self.queued.remove(&w.user_id);
                let found = self.match_found(w.user_id, &p);
                self.send_to(w.conn, &found);
            }
            self.playing.insert(user.id, p);
        }
    }

    fn match_found(&self, user_id: i64, p: &Playing) -> ServerMsg {
        let expires_ms = unix_now_ms() + self.rooms.config().ticket_ttl.as_millis() as i64;
        let ticket =
            Ticket { server: p.server, room: p.room, user_id, seat: p.seat, expires_ms, nonce: crate::random::u64() };
        let room = self.room_name(p);
        ServerMsg::MatchFound {
            mode: p.mode.into(),
            room,
            ticket: self.signer.sign(&ticket),
            players: p.players.clone(),
            url: p.url.as_deref().map(str::to_owned),
        }
    }

    /// A seat's room as clients name it (in `MatchFound` and WebRTC signaling): `r0-1` here,
    /// `server/r0-1` on a room server.
    fn room_name(&self, p: &Playing) -> String {
        match self.servers.get(&p.server) {
            Some(r) if p.server != LOCAL_SERVER => format!("{}/{}", r.name, p.room),
            _ => p.room.to_string(),
        }
    }

    fn server_up(&mut self, up: ServerUp) {
        let generation = GENERATIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let url: Arc<str> = Arc::from(up.url.as_str());
        // Matches it plays already (the hub restarted, or the connection dropped a moment);
        // matches it no longer plays (ended or called off while it was away) free their players.
        let assignments: Vec<_> = up
            .running
            .iter()
            .filter_map(|r| Some((r, r.assignment.open(self.signer.verifier()).filter(|a| a.server == up.server)?)))
            .collect();
        let running: BTreeSet<u64> = assignments.iter().map(|(_, a)| a.match_id).collect();
        self.playing.retain(|_, p| p.server != up.server || p.match_id.is_some_and(|id| running.contains(&id)));
        for (running, a) in assignments {
            let Some(mode) = self.rooms.mode(&a.mode) else { continue };
            let room = RoomId { slot: running.slot, number: running.number };
            let names: Vec<String> = a.players.iter().map(|p| p.name.clone()).collect();
            for (seat, player) in a.players.iter().enumerate() {
                if self.playing.contains_key(&player.user_id) || self.queued.contains_key(&player.user_id) {
                    continue;
                }
                let p = Playing {
                    server: up.server,
                    room,
                    match_id: Some(a.match_id),
                    url: Some(Arc::clone(&url)),
                    seat: seat as u8,
                    mode: mode.name,
                    players: names.clone(),
                };
                self.playing.insert(player.user_id, p);
            }
        }
        tracing::info!(server = up.name, url = %url, free = up.free, community = up.community, running = up.running.len(), "room server registered");
        // A second registration of the same server replaces the first (whose outbox closes).
        self.servers.insert(
            up.server,
            Remote {
                name: up.name,
                url,
                free: up.free,
                draining: false,
                outbox: Some(up.outbox),
                via: None,
                generation,
                registered_ms: up.registered_ms,
                down_since: None,
            },
        );
        let _ = up.reply.send(generation);
        self.publish_server(up.server);
        self.update_server_metrics();
    }

    fn on_server_message(&mut self, server: u32, generation: u64, msg: &FromServer) {
        let Some(remote) = self.servers.get_mut(&server).filter(|r| r.generation == generation) else { return };
        if remote.outbox.is_some() && !matches!(msg, FromServer::Register { .. } | FromServer::Finished { .. }) {
            // Held here: the other instances' players in its matches hear it too.
            let msg = msg.clone();
            self.tell_cluster(|from| Note::FromServer { from, server, msg });
        }
        let Some(remote) = self.servers.get_mut(&server) else { return };
        match *msg {
            FromServer::Load { free, draining } => {
                remote.free = free;
                remote.draining = draining;
                metrics::gauge!("rallypoint_room_server_free_rooms", "server" => remote.name.clone())
                    .set(f64::from(free));
            }
            FromServer::Started { match_id, slot, number } => {
                let Some(placing) = self.placing.remove(&match_id).filter(|p| p.server == server) else { return };
                let url = Arc::clone(&remote.url);
                let room = RoomId { slot, number };
                tracing::debug!(server = remote.name, %room, mode = placing.mode.name, "match placed");
                self.seat_players(placing.mode, &placing.seats, &placing.players, server, room, Some(&(match_id, url)));
            }
            FromServer::Full { match_id } => {
                if let Some(placing) = self.placing.remove(&match_id).filter(|p| p.server == server) {
                    remote.free = 0;
                    self.requeue(placing.mode, placing.players);
                }
            }
            FromServer::SeatReleased { match_id, user_id } => {
                if self.playing.get(&user_id).is_some_and(|p| p.server == server && p.match_id == Some(match_id)) {
                    self.playing.remove(&user_id);
                }
            }
            FromServer::Cancelled { match_id } => {
                self.abort_remote(server, match_id, "Too few players took their seats; you are back in the lobby.");
            }
            FromServer::Crashed { match_id } => {
                self.abort_remote(
                    server,
                    match_id,
                    "The match stopped because of a server error; you are back in the lobby.",
                );
            }
            FromServer::RtcAnswer { user_id, signaling, ref sdp } => {
                self.remote_rtc_answer(server, user_id, signaling, Ok(sdp.clone()));
            }
            FromServer::RtcRefused { user_id, signaling, ref reason } => {
                self.remote_rtc_answer(server, user_id, signaling, Err(reason.clone()));
            }
            // Handled by the control connection (which records, then tells the hub).
            FromServer::Register { .. } | FromServer::Finished { .. } => {}
        }
    }

    /// Calls off the matches of a room server that did not come back.
    fn server_lost(&mut self, server: u32, generation: u64) {
        let Some(remote) = self.servers.get(&server) else { return };
        if remote.generation != generation || remote.outbox.is_some() {
            return; // it registered again
        }
        tracing::warn!(server = remote.name, "room server lost: its matches are called off");
        self.tell_cluster(|from| Note::ServerLost { from, server });
        self.call_off(server);
    }

    /// Room server `server` is gone: its matches (those of this instance's players) end.
    fn call_off(&mut self, server: u32) {
        let placing: Vec<u64> = self.placing.iter().filter(|(_, p)| p.server == server).map(|(&id, _)| id).collect();
        for id in placing {
            if let Some(p) = self.placing.remove(&id) {
                self.requeue(p.mode, p.players);
            }
        }
        let matches: BTreeSet<u64> =
            self.playing.values().filter(|p| p.server == server).filter_map(|p| p.match_id).collect();
        for match_id in matches {
            self.abort_remote(
                server,
                match_id,
                "The server hosting your match went away; you are back in the lobby. No rating changed.",
            );
        }
        self.servers.remove(&server);
        self.update_server_metrics();
    }

    /// Placements a room server never answered go back to the queue.
    fn expire_placements(&mut self) {
        let now = Instant::now();
        let late: Vec<u64> =
            self.placing.iter().filter(|(_, p)| now - p.since > PLACEMENT_TIMEOUT).map(|(&id, _)| id).collect();
        for id in late {
            if let Some(p) = self.placing.remove(&id) {
                tracing::warn!(match_id = id, "a room server did not start a match in time");
                self.requeue(p.mode, p.players);
            }
        }
    }

    fn abort_remote(&mut self, server: u32, match_id: u64, message: &str) {
        let users: Vec<i64> = self
            .playing
            .iter()
            .filter(|(_, p)| p.server == server && p.match_id == Some(match_id))
            .map(|(&id, _)| id)
            .collect();
        for user_id in users {
            self.playing.remove(&user_id);
            self.tell_user(user_id, &ServerMsg::MatchAborted { message: message.into() });
        }
    }

    /// Relays a browser's signaling to the room server hosting its seat.
    fn remote_rtc(&mut self, conn: ConnId, room: &str, signal: RemoteSignal) {
        let Some(user_id) = self.conns.get(&conn).map(|c| c.user_id) else { return };
        let seat = self.playing.get(&user_id).and_then(|p| {
            let remote = self.servers.get(&p.server).filter(|r| r.is_up())?;
            let named = matches!(signal, RemoteSignal::Closed) || self.room_name(p) == room;
            Some((p.server, remote.outbox.clone(), remote.via, p.room.to_string())).filter(|_| named)
        });
        let Some((server, outbox, via, local_room)) = seat else {
            if !matches!(signal, RemoteSignal::Closed) {
                let msg = ServerMsg::Error { code: ErrorCode::Rtc, message: "no seat in that room".into() };
                self.send_to(conn, &msg);
            }
            return;
        };
        let msg = match signal {
            RemoteSignal::Offer { sdp, ticket, negotiated } => {
                FromHub::RtcOffer { user_id, signaling: conn, room: local_room, sdp, ticket, negotiated }
            }
            RemoteSignal::Candidate(candidate) => {
                FromHub::RtcCandidate { user_id, signaling: conn, room: local_room, candidate }
            }
            RemoteSignal::Closed => FromHub::RtcClosed { signaling: conn },
        };
        match (outbox, via) {
            (Some(outbox), _) => {
                let _ = outbox.try_send(msg);
            }
            (None, Some(holder)) => self.tell_cluster(|from| Note::ToServer { from, holder, server, msg }),
            (None, None) => {}
        }
    }

    /// A room server's answer to a browser's signaling, for the connection that signaled.
    fn remote_rtc_answer(&mut self, server: u32, user_id: i64, signaling: ConnId, answer: Result<String, String>) {
        if self.conns.get(&signaling).is_none_or(|c| c.user_id != user_id) {
            return;
        }
        let Some(p) = self.playing.get(&user_id).filter(|p| p.server == server) else { return };
        let msg = match answer {
            Ok(sdp) => ServerMsg::RtcAnswer { room: self.room_name(p), sdp },
            Err(reason) => ServerMsg::Error { code: ErrorCode::Rtc, message: reason },
        };
        self.send_to(signaling, &msg);
    }

    fn tell_user(&mut self, user_id: i64, msg: &ServerMsg) {
        let conns = self.users.get(&user_id).map(|o| o.conns.clone()).unwrap_or_default();
        for conn in conns {
            self.send_to(conn, msg);
        }
    }

    fn update_server_metrics(&self) {
        let live = self.servers.values().filter(|r| r.outbox.is_some()).count();
        metrics::gauge!("rallypoint_room_servers").set(live as f64);
    }

    fn room_event(&mut self, event: RoomEvent) {
        match event {
            RoomEvent::Finished { room, mode, players, outcome, reply } => {
                for p in &players {
                    self.leave_room(p.user_id, room);
                }
                let db = self.db.clone();
                while self.recording.try_join_next().is_some() {}
                self.recording.spawn(async move {
                    let label = room.to_string();
                    let finished = results::Finished {
                        room: &label,
                        mode,
                        players: &players,
                        outcome: &outcome,
                        source: results::Source::LOCAL,
                    };
                    if let Some(changes) = results::record_patiently(&db, &finished).await {
                        let _ = reply.send(changes);
                    }
                });
            }
            RoomEvent::SeatReleased { room, user_id } => self.leave_room(user_id, room),
            RoomEvent::Cancelled { room, users } => {
                self.abort(room, &users, "Too few players took their seats; you are back in the lobby.");
            }
            RoomEvent::Crashed { room, users } => {
                self.abort(room, &users, "The match stopped because of a server error; you are back in the lobby.");
            }
        }
    }

    /// A player of one of this process's rooms is out of it.
    fn leave_room(&mut self, user_id: i64, room: RoomId) {
        if self.playing.get(&user_id).is_some_and(|p| p.server == LOCAL_SERVER && p.room == room) {
            self.playing.remove(&user_id);
        }
    }

    fn abort(&mut self, room: RoomId, users: &[i64], message: &str) {
        for &user_id in users {
            self.leave_room(user_id, room);
            self.tell_user(user_id, &ServerMsg::MatchAborted { message: message.into() });
        }
    }

    fn send_to(&mut self, conn: ConnId, msg: &ServerMsg) {
        let frame = Outbound::Text(Arc::new(msg.to_json().into()));
        if self.conns.get(&conn).is_some_and(|c| c.outbox.try_send(frame).is_err()) {
            self.slow.push(conn);
        }
    }

    /// Sends one encoded copy of `msg` to every connection in a lobby.
    fn broadcast(&mut self, lobby: usize, msg: &ServerMsg) {
        let text: Arc<Utf8Bytes> = Arc::new(msg.to_json().into());
        for id in &self.lobbies[lobby].conns {
            let full =
                self.conns.get(id).is_some_and(|c| c.outbox.try_send(Outbound::Text(Arc::clone(&text))).is_err());
            if full {
                // Forgetting the connection drops its sender, which ends its task: the socket is
                // closed once the pending write completes or times out.
                self.slow.push(*id);
            }
        }
    }

    fn close(&mut self, conn: ConnId, why: Closing) {
        if let Some(c) = self.conns.get(&conn) {
            // A full outbox still ends the task: the sender is dropped by `leave`.
            let _ = c.outbox.try_send(Outbound::Close(why));
        }
        self.leave(conn);
    }
}

/// The seats of a match formed of `players`, in order.
fn seats_of(players: &[Waiting]) -> Vec<UserSummary> {
    players.iter().map(|w| UserSummary { id: w.user_id, name: w.name.clone() }).collect()
}

/// Presence changes (each user's latest state: `Some` came, `None` left) as who came and who
/// left.
fn split_changes(changes: BTreeMap<i64, Option<UserSummary>>) -> (Vec<UserSummary>, Vec<i64>) {
    let (joined, left): (Vec<_>, Vec<_>) = changes.into_iter().partition(|(_, u)| u.is_some());
    (joined.into_iter().filter_map(|(_, u)| u).collect(), left.into_iter().map(|(id, _)| id).collect())
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_outbox_slot_is_small() {
        assert!(size_of::<super::Outbound>() <= 16);
    }
}
