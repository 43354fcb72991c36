//! The bus between hub instances of one cluster: NATS (`--nats-url`), core publish/subscribe on
//! one subject. Each instance tells the others what its own players do that the others' players
//! see: who is in which lobby, what they say, which sessions ended. Every note names the
//! instance it comes from (a random id per process); NATS keeps one publisher's notes in order,
//! so chat stays in order per sender.
//!
//! Two tasks per instance, so that the hub task never awaits the network: the writer takes
//! notes from a bounded queue (the hub `try_send`s; a full queue drops the note and counts it)
//! and publishes them, with a heartbeat every [`HEARTBEAT`]; the reader decodes what arrives
//! (bounded, validated: a note that does not parse is dropped and counted) and hands it to the
//! hub. An instance silent for [`PEER_TIMEOUT`] is taken for dead: its players leave the lobbies.
//! When an instance hears from one it does not know (at start, or after a partition), it says
//! [`Note::Hello`], and whoever hears that publishes everything its own players are in.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use shared::hub::{ChatLine, UserSummary};
use tokio::sync::mpsc;

use crate::accounts::throttle::{Shared, Throttle};
use crate::fleet::control::{FromHub, FromServer, Signed};

/// The subject every instance publishes on and listens to.
pub const SUBJECT: &str = "rallypoint.hub";
/// How often an instance says it is alive.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// How long an instance may be silent before its players are taken out of the lobbies.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(3);
/// The largest note read; NATS's own limit (`max_payload`, 1 MiB by default) bounds it first.
pub const MAX_NOTE: usize = 1 << 20;
/// Notes waiting to be published, at most.
const QUEUE: usize = 4096;

/// An instance of the cluster, for the life of its process.
pub type InstanceId = u64;

/// What instances tell each other.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "k", rename_all = "snake_case")]
pub enum Note {
    /// Still here.
    Alive { from: InstanceId },
    /// Just arrived (or back): everyone, please publish your players.
    Hello { from: InstanceId },
    /// Players of `from` who came into lobby `lobby` (0-based) or left it.
    Presence { from: InstanceId, lobby: u32, joined: Vec<UserSummary>, left: Vec<i64> },
    /// A player arriving at `from` (on its hub connection `conn`) needs a place in a lobby: the
    /// instance holding the matcher lease answers with [`Note::Admit`].
    Seek { from: InstanceId, conn: u64, user: UserSummary },
    /// The lease holder (`from`) gave that player a place in lobby `lobby` (0-based), for
    /// instance `to`. Every instance counts the place as taken until the player shows up in
    /// `to`'s presence, so that no lobby grows past its bound across the cluster.
    Admit { from: InstanceId, to: InstanceId, conn: u64, user: UserSummary, lobby: u32 },
    /// A line said in lobby `lobby` by a player of `from` (already stored by `from`).
    Chat { from: InstanceId, lobby: u32, line: ChatLine },
    /// Sessions that ended (logged out, or ended from the account page): their sockets close
    /// everywhere. Each is the session's key (SHA-256 of its token) in hex.
    EndSessions { from: InstanceId, sessions: Vec<String> },
    /// A change of `from`'s login throttle: every instance counts it.
    Login { from: InstanceId, change: Shared },
    /// A player of `from` (on its hub connection `conn`) waits for a match of `mode`.
    Queue { from: InstanceId, mode: String, user: UserSummary, conn: u64, rating: f64, waited_ms: u64 },
    /// That player waits no more (cancelled, left, or matched).
    Unqueue { from: InstanceId, user_id: i64 },
    /// The matcher (`from`) sent a match to room server `server`: every instance's players in
    /// it wait for the server's `Started`, and the instance holding the server sends `start`.
    Place { from: InstanceId, server: u32, match_id: u64, mode: String, players: Vec<UserSummary>, start: Signed },
    /// A room server held by `from` (its control session is there), as it is now.
    ServerState { from: InstanceId, state: ServerState },
    /// What room server `server`, held by `from`, said.
    FromServer { from: InstanceId, server: u32, msg: FromServer },
    /// For room server `server`, held by `holder`, to pass on.
    ToServer { from: InstanceId, holder: InstanceId, server: u32, msg: FromHub },
    /// Room server `server`'s match `match_id` is over and recorded.
    ServerFinished { from: InstanceId, server: u32, match_id: u64 },
    /// Room server `server` did not come back: its matches are called off.
    ServerLost { from: InstanceId, server: u32 },
    /// Stopping: its players are gone.
    Gone { from: InstanceId },
}

impl Note {
    pub fn from(&self) -> InstanceId {
        match self {
            Self::Alive { from }
            | Self::Hello { from }
            | Self::Presence { from, .. }
            | Self::Seek { from, .. }
            | Self::Admit { from, .. }
            | Self::Chat { from, .. }
            | Self::EndSessions { from, .. }
            | Self::Login { from, .. }
            | Self::Queue { from, .. }
            | Self::Unqueue { from, .. }
            | Self::Place { from, .. }
            | Self::ServerState { from, .. }
            | Self::FromServer { from, .. }
            | Self::ToServer { from, .. }
            | Self::ServerFinished { from, .. }
            | Self::ServerLost { from, .. }
            | Self::Gone { from } => *from,
        }
    }
}

/// A room server as its holding instance tells the others.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerState {
    pub server: u32,
    pub name: String,
    pub url: String,
    pub free: u32,
    pub draining: bool,
    pub up: bool,
    /// When it registered with its holder (the room server's clock, Unix ms): a room server
    /// holds one session at a time, so of two instances that claim it, the later registration
    /// is the live one, and what the other says of it is stale.
    pub registered_ms: i64,
}

/// The bus could not be reached.
#[derive(Debug, thiserror::Error)]
#[error("cannot use NATS at {url}: {source}")]
pub struct BusError {
    url: String,
    source: Box<dyn std::error::Error + Send + Sync>,
}

/// This instance's end of the bus: what the hub publishes through.
#[derive(Clone)]
pub struct Bus {
    id: InstanceId,
    out: mpsc::Sender<Note>,
    client: async_nats::Client,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus").field("id", &self.id).finish_non_exhaustive()
    }
}

impl Bus {
    /// Connects to NATS at `url` (retrying in the background while it is down: the instance
    /// serves, and says it is not ready, until it is up) and starts the writer and reader. Notes
    /// from other instances arrive on the returned receiver, but for their login counts, which
    /// go straight to `throttle` (and this instance's go out).
    pub async fn connect(
        url: &str,
        name: &str,
        throttle: Arc<Throttle>,
    ) -> Result<(Self, mpsc::Receiver<Note>), BusError> {
        let err = |source: Box<dyn std::error::Error + Send + Sync>| BusError { url: url.to_owned(), source };
        let client = async_nats::ConnectOptions::new()
            .name(name)
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(2))
            .connect(url)
            .await
            .map_err(|e| err(Box::new(e)))?;
        let subscriber = client.subscribe(SUBJECT).await.map_err(|e| err(Box::new(e)))?;
        let id = crate::random::u64();
        let (out, queue) = mpsc::channel(QUEUE);
        let (notes, inbox) = mpsc::channel(QUEUE);
        tokio::spawn(write(client.clone(), id, queue));
        tokio::spawn(read(subscriber, id, notes, Arc::clone(&throttle)));
        let bus = Self { id, out, client };
        let tell = bus.clone();
        throttle.share(move |change| tell.publish(Note::Login { from: id, change }));
        bus.publish(Note::Hello { from: id });
        Ok((bus, inbox))
    }

    pub fn id(&self) -> InstanceId {
        self.id
    }

    /// Queues `note` for the other instances; a full queue drops it (counted in
    /// `rallypoint_bus_dropped_total`).
    pub fn publish(&self, note: Note) {
        if self.out.try_send(note).is_err() {
            metrics::counter!("rallypoint_bus_dropped_total").increment(1);
        }
    }

    /// The NATS client, for what else travels on NATS (room servers' control sessions).
    pub fn nats(&self) -> &async_nats::Client {
        &self.client
    }

    /// Whether NATS is connected now.
    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// Says goodbye and waits (a second at most) until what is queued is sent.
    pub async fn close(&self) {
        self.publish(Note::Gone { from: self.id });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        while self.out.capacity() < QUEUE && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), self.client.flush()).await;
    }
}

/// Publishes queued notes, and a heartbeat every [`HEARTBEAT`]. While NATS is down, the client
/// buffers what it can and reconnects by itself.
async fn write(client: async_nats::Client, id: InstanceId, mut queue: mpsc::Receiver<Note>) {
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let note = tokio::select! {
            note = queue.recv() => match note {
                Some(note) => note,
                None => return,
            },
            _ = heartbeat.tick() => Note::Alive { from: id },
        };
        match serde_json::to_vec(&note) {
            Ok(bytes) => {
                if let Err(e) = client.publish(SUBJECT, bytes.into()).await {
                    tracing::warn!(error = %e, "could not publish on the bus");
                }
            }
            Err(e) => tracing::error!(error = %e, "could not encode a bus note"),
        }
    }
}

/// Decodes what other instances publish and hands it to the hub, in order.
async fn read(
    mut subscriber: async_nats::Subscriber,
    id: InstanceId,
    notes: mpsc::Sender<Note>,
    throttle: Arc<Throttle>,
) {
    use futures_util::StreamExt as _;
    while let Some(message) = subscriber.next().await {
        match decode(&message.payload) {
            Some(note) if note.from() == id => {}
            Some(Note::Login { change, .. }) => throttle.apply(change, tokio::time::Instant::now()),
            Some(note) => {
                if notes.send(note).await.is_err() {
                    return;
                }
            }
            None => {
                metrics::counter!("rallypoint_bus_dropped_total").increment(1);
                tracing::warn!(bytes = message.payload.len(), "dropped a bus note that does not parse");
            }
        }
    }
}

/// A note from its bytes; `None` for anything too big or malformed.
pub fn decode(bytes: &[u8]) -> Option<Note> {
    if bytes.len() > MAX_NOTE {
        return None;
    }
    serde_json::from_slice(bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_round_trip_and_bad_ones_are_refused() {
        let user = UserSummary { id: 7, name: "ana".into() };
        for note in [
            Note::Alive { from: 1 },
            Note::Hello { from: 2 },
            Note::Presence { from: 3, lobby: 1, joined: vec![user.clone()], left: vec![9] },
            Note::Seek { from: 3, conn: 4, user: user.clone() },
            Note::Admit { from: 3, to: 5, conn: 4, user: user.clone(), lobby: 2 },
            Note::Chat { from: 4, lobby: 0, line: ChatLine { from: user, text: "hi".into(), at_ms: 5 } },
            Note::EndSessions { from: 5, sessions: vec!["ab".repeat(32)] },
            Note::Login { from: 7, change: Shared::Attempt { account: "ana".into(), address: [10, 0, 0, 1].into() } },
            Note::Queue {
                from: 8,
                mode: "duel".into(),
                user: UserSummary { id: 1, name: "b".into() },
                conn: 3,
                rating: 1500.0,
                waited_ms: 9,
            },
            Note::Unqueue { from: 9, user_id: 1 },
            Note::FromServer { from: 1, server: 2, msg: FromServer::Full { match_id: 3 } },
            Note::ToServer { from: 1, holder: 2, server: 3, msg: FromHub::RtcClosed { signaling: 4 } },
            Note::ServerState {
                from: 1,
                state: ServerState {
                    server: 2,
                    name: "eu-1".into(),
                    url: "https://r".into(),
                    free: 3,
                    draining: false,
                    up: true,
                    registered_ms: 4,
                },
            },
            Note::ServerFinished { from: 1, server: 2, match_id: 3 },
            Note::ServerLost { from: 1, server: 2 },
            Note::Gone { from: 6 },
        ] {
            let bytes = serde_json::to_vec(&note).unwrap();
            assert_eq!(decode(&bytes), Some(note));
        }
        for bad in
            [&b""[..], b"{}", b"{\"k\":\"alive\"}", b"{\"k\":\"nope\",\"from\":1}", b"\xff", &vec![b' '; MAX_NOTE + 1]]
        {
            assert_eq!(decode(bad), None);
        }
    }

    #[test]
    fn session_keys_cross_the_bus_as_hex_and_nothing_else_parses() {
        use crate::accounts::SessionKey;
        let key = SessionKey::of_token("some token");
        assert_eq!(SessionKey::from_hex(&key.to_hex()), Some(key));
        for bad in ["", "00", &"g".repeat(64), &"0".repeat(63), &"é".repeat(32), &"0".repeat(65)] {
            assert_eq!(SessionKey::from_hex(bad), None, "{bad}");
        }
    }
}
