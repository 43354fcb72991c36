//! The control connection between the hub and a room server: JSON text frames on a WebSocket
//! that the room server opens to the hub's [`PATH`], with its token as a bearer. Every frame is
//! bounded ([`MAX_MESSAGE`]) and parsed into these types or refused, like any client's.
//!
//! A match placed on a room server travels as an [`Assignment`] that the hub signs with its
//! ticket key: the room server reports the result with the assignment it was given, so that the
//! hub (even one restarted since) knows who played, and a room server cannot invent players or
//! another server's match.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use shared::game::Outcome;
use shared::room::RatingChange;

use crate::rooms::{Seated, TicketSigner, TicketVerifier};

/// Where the hub takes control connections.
pub const PATH: &str = "/room-servers";
/// Version of this protocol; the room protocol version must match too.
pub const CONTROL_VERSION: u32 = 4;
/// Largest control message either way.
pub const MAX_MESSAGE: usize = 256 * 1024;
/// How often a room server says how many rooms it has free.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// A room server not heard from for this long is out of placement, and its connection closed.
pub const SILENCE: Duration = Duration::from_secs(3);
/// Longest a room server's public URL may be.
pub const MAX_URL: usize = 512;
/// Most matches a room server may report running when it registers.
pub const MAX_RUNNING: usize = 100_000;

/// A match the hub places on a room server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    /// Unique across the hub's life and restarts (random): a result is recorded once per id.
    pub match_id: u64,
    /// The room server's id (its row in `room_servers`).
    pub server: u32,
    pub mode: String,
    pub players: Vec<Player>,
    pub seed: u64,
}

/// A player in an [`Assignment`]: all a room server learns about them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Player {
    pub user_id: i64,
    pub name: String,
}

impl From<&Player> for Seated {
    fn from(p: &Player) -> Self {
        Self { user_id: p.user_id, name: p.name.clone() }
    }
}

/// An [`Assignment`] as JSON, with the hub's Ed25519 signature over it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signed {
    pub body: String,
    pub signature: String,
}

/// What assignment signatures are made over, apart from tickets (which are binary).
const CONTEXT: &[u8] = b"rallypoint assignment\0";

impl Signed {
    pub fn new(assignment: &Assignment, signer: &TicketSigner) -> Self {
        let body = serde_json::to_string(assignment).expect("an assignment serializes");
        let signature = URL_SAFE_NO_PAD.encode(signer.sign_bytes(&[CONTEXT, body.as_bytes()].concat()));
        Self { body, signature }
    }

    /// The assignment, if the hub signed it.
    pub fn open(&self, verifier: &TicketVerifier) -> Option<Assignment> {
        let signature = URL_SAFE_NO_PAD.decode(&self.signature).ok()?;
        verifier.verify_bytes(&[CONTEXT, self.body.as_bytes()].concat(), &signature).then_some(())?;
        serde_json::from_str(&self.body).ok()
    }
}

/// A match a room server is playing, as it tells a hub it registers with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Running {
    pub assignment: Signed,
    pub slot: u32,
    pub number: u32,
}

/// From a room server to the hub.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum FromServer {
    /// The first message.
    Register {
        control_version: u32,
        room_protocol: u32,
        /// Where browsers reach this server (`https://host:port`); rooms are at `/room`.
        public_url: String,
        /// Rooms free now.
        free: u32,
        /// Matches in flight (after a lost connection, or the hub's restart).
        running: Vec<Running>,
        /// When this registration was made, on the room server's clock (Unix ms): of two
        /// registrations of one server with two hub instances, the later is the live one.
        /// (Defaulted so that an older room server's registration still parses and is refused
        /// for its version.)
        #[serde(default)]
        registered_ms: i64,
    },
    /// Heartbeat: rooms free now; `draining` when the server takes no more matches.
    Load { free: u32, draining: bool },
    /// A match started, in this room.
    Started { match_id: u64, slot: u32, number: u32 },
    /// No room was free for this match.
    Full { match_id: u64 },
    /// A player gave up their seat.
    SeatReleased { match_id: u64, user_id: i64 },
    /// Too few players took their seats: no result.
    Cancelled { match_id: u64 },
    /// The match stopped on an error: no result.
    Crashed { match_id: u64 },
    /// A result, with the assignment it is for. Sent again until [`FromHub::Recorded`].
    Finished { assignment: Signed, outcome: Outcome },
    /// The answer to [`FromHub::RtcOffer`], for the player's hub connection `signaling`.
    RtcAnswer { user_id: i64, signaling: u64, sdp: String },
    /// [`FromHub::RtcOffer`] or a candidate was refused: the player stays on the WebSocket.
    RtcRefused { user_id: i64, signaling: u64, reason: String },
}

/// From the hub to a room server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum FromHub {
    /// Registration accepted.
    Welcome {
        /// This server's id, as tickets name it.
        server: u32,
        /// The hub's public ticket key (base64url): what checks tickets and assignments.
        ticket_key: String,
        /// The site's origin, the only `Origin` accepted from browsers.
        site_origin: Option<String>,
        tick_hz: u16,
        time_limit_secs: Option<u16>,
        ticket_ttl_ms: u64,
    },
    /// Play this match.
    Start { assignment: Signed },
    /// The result of this match is recorded (official or not); these are the rating changes.
    Recorded { match_id: u64, ratings: Vec<RatingChange> },
    /// A player's WebRTC offer for their seat in `room` (`r0-1`), made on hub connection
    /// `signaling`: the browser signals through the hub, the peer connection is the room server's.
    /// With the seat's ticket while the player's room WebSocket joins.
    RtcOffer {
        user_id: i64,
        signaling: u64,
        room: String,
        sdp: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ticket: Option<String>,
        /// The client's data channel is pre-negotiated (see `ClientMsg::RtcOffer`).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        negotiated: bool,
    },
    /// A trickled ICE candidate of that peer connection.
    RtcCandidate { user_id: i64, signaling: u64, room: String, candidate: String },
    /// The player's hub connection `signaling` closed: its peer connections go.
    RtcClosed { signaling: u64 },
}

impl FromHub {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("control messages serialize")
    }
}

impl FromServer {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("control messages serialize")
    }
}

/// The control connection over the cluster's NATS (`rallypoint room-server --nats-url`), for an
/// operator's own room servers on the cluster's network: no hub has to be reached through the
/// load balancer, and whichever instance answers holds the server. The room server sends a
/// [`nats::Registration`] as a request to [`nats::REGISTER`], which the instances share as a
/// queue group (NATS hands it to one); the instance's answer is the welcome or a refusal. After
/// it, the room server publishes its [`FromServer`]s on [`nats::up`] and reads [`nats::Down`]s on
/// [`nats::down`] of its session (a random id it chose). Every message is bounded like a
/// WebSocket frame. The instance says it is there every [`nats::BEAT`] ([`nats::Down::Beat`],
/// from a task of its own, so that a slow database write does not silence it), so a room
/// server whose instance died hears nothing for [`SILENCE`] and registers again, with another.
pub mod nats {
    use serde::{Deserialize, Serialize};

    use super::{FromHub, FromServer};

    /// Where registrations go.
    pub const REGISTER: &str = "rallypoint.fleet.register";
    /// The queue group every hub instance listens to [`REGISTER`] in.
    pub const HUBS: &str = "rallypoint-hubs";
    /// How long a room server waits for the answer to a registration before trying again.
    pub const ANSWER_WITHIN: std::time::Duration = std::time::Duration::from_secs(2);
    /// How often the hub instance holding a session says it is there ([`Down::Beat`]).
    pub const BEAT: std::time::Duration = super::HEARTBEAT;

    /// Where a session's room server publishes.
    pub fn up(session: u64) -> String {
        format!("rallypoint.fleet.{session:016x}.up")
    }

    /// Where the hub instance holding a session publishes.
    pub fn down(session: u64) -> String {
        format!("rallypoint.fleet.{session:016x}.down")
    }

    /// The registration request.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Registration {
        /// The room server's token (as the WebSocket's bearer).
        pub token: String,
        /// Chosen at random by the room server for this registration.
        pub session: u64,
        /// [`FromServer::Register`].
        pub register: FromServer,
    }

    /// From the hub instance to a room server.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    #[serde(tag = "k", rename_all = "snake_case", deny_unknown_fields)]
    pub enum Down {
        Msg {
            msg: FromHub,
        },
        /// The holding instance is there.
        Beat,
        /// The session is over (what a WebSocket's close frame says).
        Close {
            code: u16,
            reason: String,
        },
    }

    impl Down {
        pub fn to_json(&self) -> Vec<u8> {
            serde_json::to_vec(self).expect("control messages serialize")
        }
    }
}

/// Close codes of a control connection.
pub mod close {
    /// The room server speaks another version: run the same release as the hub.
    pub const VERSION: u16 = 4100;
    /// The token was revoked meanwhile.
    pub const REVOKED: u16 = 4101;
    /// A malformed message, or a breach of the protocol.
    pub const POLICY: u16 = 1008;
    /// A message over [`super::MAX_MESSAGE`].
    pub const TOO_BIG: u16 = 1009;
    /// Another connection registered as the same server.
    pub const REPLACED: u16 = 4102;
    /// Nothing heard for [`super::SILENCE`].
    pub const SILENT: u16 = 4103;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assignment() -> Assignment {
        Assignment {
            match_id: 7,
            server: 3,
            mode: "duel".into(),
            players: vec![Player { user_id: 1, name: "a".into() }, Player { user_id: 2, name: "b".into() }],
            seed: 9,
        }
    }

    #[test]
    fn an_assignment_opens_only_with_the_hubs_key_and_unchanged() {
        let hub = TicketSigner::from_seed(&[1; 32]);
        let signed = Signed::new(&assignment(), &hub);
        assert_eq!(signed.open(hub.verifier()), Some(assignment()));
        assert_eq!(signed.open(TicketSigner::from_seed(&[2; 32]).verifier()), None);
        let forged = Signed { body: signed.body.replace("\"user_id\":2", "\"user_id\":5"), ..signed.clone() };
        assert_eq!(forged.open(hub.verifier()), None);
        assert_eq!(Signed { signature: "!!".into(), ..signed }.open(hub.verifier()), None);
    }

    #[test]
    fn messages_round_trip_and_unknown_ones_are_refused() {
        let msg = FromServer::Load { free: 3, draining: false };
        assert_eq!(serde_json::from_str::<FromServer>(&msg.to_json()).unwrap(), msg);
        for bad in [
            r#"{"type":"load","free":-1,"draining":false}"#,
            r#"{"type":"nuke"}"#,
            r#"{"type":"load","free":1,"draining":false,"x":1}"#,
        ] {
            assert!(serde_json::from_str::<FromServer>(bad).is_err(), "{bad}");
        }
    }
}
