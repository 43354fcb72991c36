//! Messages on a room connection (`/room` WebSocket now, WebRTC data channels later): compact
//! binary (bitcode), one message per frame. Generic over the game's input, view and rules.
//!
//! On a WebSocket, the first message a client sends is a [`JoinRequest`] with the ticket the hub
//! gave it; everything after is [`ToRoom`]. Transports carry bytes and never look inside.

use bitcode::{Decode, Encode};

use crate::game::{Game, Outcome, Seat};

/// Version of the room protocol.
pub const ROOM_PROTOCOL_VERSION: u32 = 2;

/// Largest message a client may send on a room connection, in bytes.
pub const MAX_TO_ROOM_BYTES: usize = 1024;

/// Most inputs in one [`ToRoom::Inputs`] message. A client sends, every tick, its newest inputs
/// that the server has not acknowledged yet, up to this many: a lost datagram, or an input the
/// server dropped in a burst, is simply sent again. Only a long round trip makes the list long
/// (one input per tick of round trip), and it must stay longer than that, or an input dropped
/// in a burst could fall out of every later message.
pub const MAX_INPUTS_PER_MESSAGE: usize = 32;

/// Label of the WebRTC data channel that carries inputs and snapshots: unordered, with no
/// retransmissions. The client creates it; everything else stays on the room's WebSocket.
pub const DATA_CHANNEL_LABEL: &str = "rallypoint-unreliable";

/// SCTP stream id of that channel when the client pre-negotiates it (`negotiated: true`): both
/// sides make it themselves, and it opens with the SCTP association, without the in-band open
/// (DCEP) and its round trip.
pub const DATA_CHANNEL_ID: u16 = 0;

/// How long a client waits for the data channel to open before it plays over the WebSocket.
pub const DATA_CHANNEL_OPEN_TIMEOUT_MS: u32 = 3000;

/// The WebSocket origin of a room server's public URL: `https://r1.example.com:9000` gives
/// `wss://r1.example.com:9000` (and `http://` gives `ws://`).
pub fn socket_origin(server_url: &str) -> String {
    server_url.trim_end_matches('/').replacen("http", "ws", 1)
}

/// Where players open the room WebSocket of the room server at `server_url`.
pub fn room_socket_url(server_url: &str) -> String {
    format!("{}/room", socket_origin(server_url))
}

/// Close codes of a room connection.
pub mod close {
    /// Malformed messages, or too many of them.
    pub const POLICY: u16 = 1008;
    /// A message over [`super::MAX_TO_ROOM_BYTES`].
    pub const TOO_BIG: u16 = 1009;
    /// The ticket is malformed or its signature is wrong.
    pub const TICKET_FORGED: u16 = 4010;
    /// The ticket is too old.
    pub const TICKET_EXPIRED: u16 = 4011;
    /// The ticket was used already.
    pub const TICKET_USED: u16 = 4012;
    /// The ticket belongs to another user, or names another room.
    pub const TICKET_FOREIGN: u16 = 4013;
    /// The match is over, or the seat was given up.
    pub const MATCH_OVER: u16 = 4014;
    /// Another connection of the same player took the seat.
    pub const REPLACED: u16 = 4015;
    /// The match stopped on a server error.
    pub const ROOM_FAILED: u16 = 4016;
    /// The client speaks another room protocol version: reload the page.
    pub const RELOAD: u16 = 4000;
    /// The first message was not a join, or came too late.
    pub const NO_JOIN: u16 = 4017;
    /// The player left the match.
    pub const LEFT: u16 = 4018;
}

/// Claims a seat with a ticket from the hub: the first message on a room WebSocket.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct JoinRequest {
    /// [`ROOM_PROTOCOL_VERSION`].
    pub version: u32,
    /// The ticket, as the hub gave it.
    pub ticket: String,
}

impl JoinRequest {
    /// Encodes for the wire.
    pub fn encode(&self) -> Vec<u8> {
        bitcode::encode(self)
    }

    /// Decodes from the wire.
    pub fn decode(bytes: &[u8]) -> Result<Self, bitcode::Error> {
        bitcode::decode(bytes)
    }
}

/// A message from a player to their room.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub enum ToRoom<I> {
    /// The newest inputs, oldest first: `inputs[i]` has sequence number `first_seq + i`.
    Inputs {
        /// Sequence number of `inputs[0]`; sequence numbers start at 1.
        first_seq: u32,
        /// The tick the client believed the server was at when it sent the newest input.
        tick: u32,
        /// The newest tick whose view the client holds (0 for none): the room may send later
        /// views as [`FromRoom::Delta`] against it.
        seen: u32,
        /// At most [`MAX_INPUTS_PER_MESSAGE`].
        inputs: Vec<I>,
    },
    /// Asks for a [`FromRoom::Pong`], to measure the round trip.
    Ping {
        /// Chosen by the client.
        id: u32,
    },
    /// The player leaves the match for good.
    Leave,
}

/// A player's rating before and after a match.
#[derive(Debug, Clone, Copy, PartialEq, Encode, Decode, serde::Serialize, serde::Deserialize)]
pub struct RatingChange {
    /// Rating before the match (rounded).
    pub before: i32,
    /// Rating after the match (rounded).
    pub after: i32,
}

/// A message from a room to one player.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub enum FromRoom<V, R, D> {
    /// The seat is yours.
    Joined {
        /// Your seat.
        seat: Seat,
        /// Names of the players, by seat.
        players: Vec<String>,
        /// The mode's name.
        mode: String,
        /// Ticks per second.
        tick_hz: u16,
        /// The current tick.
        tick: u32,
        /// What the client needs to predict.
        rules: R,
    },
    /// What you see at a tick.
    Snapshot {
        /// The tick.
        tick: u32,
        /// The last of your inputs applied before this tick's state.
        ack: u32,
        /// Your view.
        view: V,
    },
    /// What you see at a tick, as the change from the view of tick `tick - back`, one you
    /// said you hold ([`crate::delta`]).
    Delta {
        /// The tick.
        tick: u32,
        /// The last of your inputs applied before this tick's state.
        ack: u32,
        /// How many ticks older the base view is (1 to [`crate::delta::KEPT_VIEWS`] - 1).
        back: u8,
        /// The change.
        delta: D,
    },
    /// The answer to [`ToRoom::Ping`].
    Pong {
        /// The id from the ping.
        id: u32,
    },
    /// The match is over; the result is recorded.
    Ended {
        /// How it ended.
        outcome: Outcome,
        /// Rating changes, by seat.
        ratings: Vec<RatingChange>,
    },
}

impl<I: bitcode::Encode + bitcode::DecodeOwned> ToRoom<I> {
    /// Encodes for the wire.
    pub fn encode(&self) -> Vec<u8> {
        bitcode::encode(self)
    }

    /// Decodes from the wire.
    pub fn decode(bytes: &[u8]) -> Result<Self, bitcode::Error> {
        bitcode::decode(bytes)
    }
}

/// The frames a room of game `G` sends.
pub type FromRoomOf<G> = FromRoom<<G as Game>::View, <G as Game>::Rules, <G as Game>::Delta>;

impl<V, R, D> FromRoom<V, R, D>
where
    V: bitcode::Encode + bitcode::DecodeOwned,
    R: bitcode::Encode + bitcode::DecodeOwned,
    D: bitcode::Encode + bitcode::DecodeOwned,
{
    /// Encodes for the wire.
    pub fn encode(&self) -> Vec<u8> {
        bitcode::encode(self)
    }

    /// Decodes from the wire.
    pub fn decode(bytes: &[u8]) -> Result<Self, bitcode::Error> {
        bitcode::decode(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arena::{ArenaInput, ArenaRules, ArenaView, Me, Seen, SeenBullet};
    use crate::game::EndReason;
    use crate::game::Game;

    type Up = ToRoom<ArenaInput>;
    type Down = FromRoomOf<crate::arena::Arena>;

    #[test]
    fn every_message_round_trips() {
        let input = ArenaInput { buttons: ArenaInput::UP | ArenaInput::FIRE, aim_x: -300, aim_y: 12 };
        let join = JoinRequest { version: ROOM_PROTOCOL_VERSION, ticket: "abc.def".into() };
        assert_eq!(JoinRequest::decode(&join.encode()).unwrap(), join);
        for msg in
            [Up::Inputs { first_seq: 7, tick: 99, seen: 98, inputs: vec![input; 4] }, Up::Ping { id: 5 }, Up::Leave]
        {
            assert_eq!(Up::decode(&msg.encode()).unwrap(), msg);
        }
        let view = ArenaView {
            me: Me { x: 100, y: 200, hp: 80, respawn: 0 },
            others: vec![Seen { seat: 1, x: 3, y: 4, aim_x: 127, aim_y: 0, hp: 100 }],
            bullets: vec![SeenBullet { x: 5, y: 6, vx: -136, vy: 0 }],
            scores: vec![1, 2],
            ticks_left: 500,
        };
        let outcome = Outcome { ranks: vec![1, 2], scores: vec![10, 3], reason: EndReason::ScoreLimit, ticks: 900 };
        for msg in [
            Down::Joined {
                seat: 1,
                players: vec!["a".into(), "b".into()],
                mode: "duel".into(),
                tick_hz: 30,
                tick: 0,
                rules: ArenaRules { tick_hz: 30 },
            },
            Down::Snapshot { tick: 12, ack: 11, view: view.clone() },
            Down::Delta { tick: 13, ack: 12, back: 1, delta: crate::arena::Arena::diff(&view, &view, 1) },
            Down::Pong { id: 5 },
            Down::Ended { outcome, ratings: vec![RatingChange { before: 1500, after: 1562 }; 2] },
        ] {
            assert_eq!(Down::decode(&msg.encode()).unwrap(), msg);
        }
    }

    #[test]
    fn a_room_servers_socket_is_its_url_over_websocket() {
        assert_eq!(socket_origin("https://r1.example.com:9000/"), "wss://r1.example.com:9000");
        assert_eq!(room_socket_url("http://127.0.0.1:9000"), "ws://127.0.0.1:9000/room");
    }

    #[test]
    fn garbage_does_not_decode() {
        // A compact format decodes some short garbage into valid messages; these must not.
        for bad in [&[][..], &[3, 1], &[0, 255, 255, 255, 255, 255], &[9; 40]] {
            assert!(Up::decode(bad).is_err(), "{bad:?}");
        }
    }
}
