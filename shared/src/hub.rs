//! Messages on the hub WebSocket (`/ws`): lobby, presence and chat.
//!
//! Control traffic is JSON so that it can be read in a browser's devtools. Every message is an
//! object with a `type` field. The first message a client sends is [`ClientMsg::Hello`], which
//! carries [`PROTOCOL_VERSION`]; a client of another version is told to reload.

use serde::{Deserialize, Serialize};

/// Version of the hub protocol. Bump it whenever a message changes shape.
pub const PROTOCOL_VERSION: u32 = 3;

/// Largest WebSocket message, in bytes, that the hub accepts from a client.
pub const MAX_CLIENT_MESSAGE_BYTES: usize = 4096;

/// Longest chat message, in characters (Unicode scalar values).
pub const MAX_CHAT_CHARS: usize = 500;

/// How many recent chat messages a client receives when it joins.
pub const CHAT_HISTORY_LEN: usize = 50;

/// Most users named in one [`ServerMsg::Presence`] message; longer lists come in several.
/// Small on purpose: a server keeps, per connection, a write buffer as large as the largest
/// frame it ever sent that connection.
pub const PRESENCE_CHUNK: usize = 16;

/// WebSocket close codes the hub uses, so that clients can react to each.
pub mod close {
    /// The server is shutting down or restarting; reconnect later.
    pub const GOING_AWAY: u16 = 1001;
    /// The server cannot take the connection now (no lobby place could be had); reconnect later.
    pub const TRY_AGAIN: u16 = 1013;
    /// Too many malformed messages, or the first message was not `hello`.
    pub const POLICY: u16 = 1008;
    /// A message was larger than [`super::MAX_CLIENT_MESSAGE_BYTES`].
    pub const TOO_BIG: u16 = 1009;
    /// The client speaks another protocol version: reload the page.
    pub const RELOAD: u16 = 4000;
    /// The session ended (logout or expiry): sign in again.
    pub const SESSION_ENDED: u16 = 4001;
    /// Nothing was heard from the client for too long.
    pub const IDLE: u16 = 4002;
    /// The client did not read what the server sent it fast enough.
    pub const TOO_SLOW: u16 = 4003;
}

/// A message from a client to the hub.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientMsg {
    /// The first message on every connection.
    Hello {
        /// The client's [`PROTOCOL_VERSION`].
        version: u32,
    },
    /// Say something in the lobby chat.
    Chat {
        /// The text, at most [`MAX_CHAT_CHARS`] characters.
        text: String,
    },
    /// Ask for a [`ServerMsg::Pong`] with the same id, to measure round-trip time.
    Ping {
        /// Chosen by the client.
        id: u32,
    },
    /// Join the matchmaking queue of a mode.
    FindMatch {
        /// The mode's name, one of those the lobby lists.
        mode: String,
    },
    /// Leave the matchmaking queue.
    CancelMatch,
    /// Open a WebRTC peer connection to your room: an SDP offer with one data channel labelled
    /// [`crate::room::DATA_CHANNEL_LABEL`]. Sent with the seat's ticket as soon as the match is
    /// found, while the room WebSocket joins (the peer then carries the seat's frames once the
    /// join takes the seat), or without it after that join; answered with
    /// [`ServerMsg::RtcAnswer`] or an [`ErrorCode::Rtc`] error.
    RtcOffer {
        /// The room, as [`ServerMsg::MatchFound`] named it.
        room: String,
        /// The offer's SDP.
        sdp: String,
        /// The ticket of [`ServerMsg::MatchFound`] for that room, which proves the seat before
        /// the room WebSocket has joined (the ticket stays good for that join).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ticket: Option<String>,
        /// Whether the client's data channel is pre-negotiated, with id
        /// [`crate::room::DATA_CHANNEL_ID`]: the server then makes its side of it, which opens
        /// with the SCTP association. Without it (older pages) the client opens the channel in
        /// band, a round trip later.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        negotiated: bool,
    },
    /// One of the client's ICE candidates for the peer connection of `room` (trickle ICE).
    RtcCandidate {
        /// The room, as [`ServerMsg::MatchFound`] named it.
        room: String,
        /// The candidate line (`candidate:…`), as the browser gives it.
        candidate: String,
        /// The media stream id the candidate belongs to.
        sdp_mid: Option<String>,
        /// The index of that media line.
        sdp_m_line_index: Option<u16>,
    },
}

/// A STUN or TURN server that clients may use to reach the server's UDP port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IceServer {
    /// `stun:host:port`, `turn:host:port`, `turns:host:port?transport=tcp`, …
    pub urls: Vec<String>,
    /// The TURN user name, if any.
    pub username: Option<String>,
    /// The TURN password, if any.
    pub credential: Option<String>,
}

/// A user as others see them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserSummary {
    /// The user's id, stable for the account's life.
    pub id: i64,
    /// The user's name, as registered.
    pub name: String,
}

/// One line of lobby chat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatLine {
    /// Who said it.
    pub from: UserSummary,
    /// What they said, as plain text (never HTML).
    pub text: String,
    /// When the server received it, in milliseconds since the Unix epoch.
    pub at_ms: i64,
}

/// Why the hub refused a client message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The message was not valid JSON of a known type.
    Malformed,
    /// The message was valid but not allowed now (for example a second `hello`).
    Unexpected,
    /// Chat text was empty or longer than [`MAX_CHAT_CHARS`].
    ChatLength,
    /// The user is sending chat faster than allowed.
    RateLimited,
    /// The server is too busy to take this now; try again.
    Busy,
    /// No such mode.
    UnknownMode,
    /// Already queued or playing.
    AlreadyBusy,
    /// Not queued.
    NotQueued,
    /// A WebRTC signaling message was refused: play goes on over the WebSocket.
    Rtc,
}

/// A game mode as the lobby lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModeInfo {
    /// Identifier, for [`ClientMsg::FindMatch`].
    pub name: String,
    /// What players read.
    pub title: String,
}

/// A message from the hub to a client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMsg {
    /// The answer to a valid `hello`. It is followed by [`ServerMsg::Presence`] messages
    /// naming everyone in the lobby, then the lobby's recent chat, oldest first (up to
    /// [`CHAT_HISTORY_LEN`] [`ServerMsg::Chat`] lines).
    Welcome {
        /// The server's [`PROTOCOL_VERSION`].
        version: u32,
        /// The authenticated user.
        me: UserSummary,
        /// Which lobby the user is in (1, 2, …). Busy servers split people into lobbies of a
        /// fixed size; a user's tabs are always in the same one.
        lobby: u32,
        /// How many users the [`ServerMsg::Presence`] messages that follow name.
        online: u32,
        /// How many chat lines follow them.
        history: u32,
        /// STUN/TURN servers for the WebRTC peer connection to a room (often none: the
        /// server's UDP port is reachable directly).
        ice_servers: Vec<IceServer>,
    },
    /// The client's version differs from the server's: reload the page.
    Reload {
        /// The server's [`PROTOCOL_VERSION`].
        version: u32,
    },
    /// Who came online in the lobby and who left, since the last such message. Each user is
    /// counted once, however many tabs they have open. At most [`PRESENCE_CHUNK`] users each.
    Presence {
        /// Users now online (a user may be named again; treat it as an update).
        joined: Vec<UserSummary>,
        /// Ids of users who went offline.
        left: Vec<i64>,
    },
    /// A chat line, sent to every connected client including the sender.
    Chat(ChatLine),
    /// The answer to [`ClientMsg::Ping`].
    Pong {
        /// The id from the ping.
        id: u32,
    },
    /// You are in the queue of a mode (sent again to a reloaded tab).
    Queued {
        /// The mode.
        mode: String,
        /// How long you have waited already, in milliseconds.
        waited_ms: u64,
    },
    /// You left the queue.
    Unqueued,
    /// A match is ready: connect to the room with this ticket (also sent again to a tab that
    /// reloads during a match).
    MatchFound {
        /// The mode.
        mode: String,
        /// The room, as named in pages and logs.
        room: String,
        /// A signed, single-use, short-lived ticket for your seat.
        ticket: String,
        /// Names of the players, by seat.
        players: Vec<String>,
        /// Where the room runs, when on a room server (`https://host:port`; its room
        /// WebSocket is at `/room` there); none for the site's own rooms.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        url: Option<String>,
    },
    /// The server's answer to [`ClientMsg::RtcOffer`]. Its SDP carries every server candidate
    /// (the server does not trickle).
    RtcAnswer {
        /// The room of the offer.
        room: String,
        /// The answer's SDP.
        sdp: String,
    },
    /// Your match stopped without a result (a server error); you are back in the lobby.
    MatchAborted {
        /// A sentence for the user.
        message: String,
    },
    /// A client message was refused; the connection stays open.
    Error {
        /// What kind of refusal.
        code: ErrorCode,
        /// A sentence for the user.
        message: String,
    },
}

impl ClientMsg {
    /// Parses a client message from JSON text.
    pub fn from_json(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }
}

impl ServerMsg {
    /// Encodes this message as JSON text.
    pub fn to_json(&self) -> String {
        // Serializing these plain data types cannot fail: no maps with non-string keys, no I/O.
        serde_json::to_string(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alice() -> UserSummary {
        UserSummary { id: 7, name: "alice".into() }
    }

    #[test]
    fn every_client_message_round_trips() {
        for msg in [
            ClientMsg::Hello { version: PROTOCOL_VERSION },
            ClientMsg::Chat { text: "hi <b>there</b> \u{1f600}".into() },
            ClientMsg::Ping { id: 42 },
            ClientMsg::FindMatch { mode: "duel".into() },
            ClientMsg::CancelMatch,
            ClientMsg::RtcOffer { room: "r0-1".into(), sdp: "v=0\r\n".into(), ticket: None, negotiated: false },
            ClientMsg::RtcOffer {
                room: "r0-1".into(),
                sdp: "v=0\r\n".into(),
                ticket: Some("t.s".into()),
                negotiated: true,
            },
            ClientMsg::RtcCandidate {
                room: "r0-1".into(),
                candidate: "candidate:1 1 udp 1 127.0.0.1 5000 typ host".into(),
                sdp_mid: Some("0".into()),
                sdp_m_line_index: Some(0),
            },
        ] {
            let json = serde_json::to_string(&msg).unwrap();
            assert_eq!(ClientMsg::from_json(&json).unwrap(), msg, "{json}");
        }
    }

    #[test]
    fn every_server_message_round_trips() {
        let line = ChatLine { from: alice(), text: "gg".into(), at_ms: 1_700_000_000_000 };
        for msg in [
            ServerMsg::Welcome {
                version: PROTOCOL_VERSION,
                me: alice(),
                lobby: 1,
                online: 1,
                history: 0,
                ice_servers: vec![IceServer {
                    urls: vec!["turn:turn.example.org:3478".into()],
                    username: Some("u".into()),
                    credential: Some("p".into()),
                }],
            },
            ServerMsg::RtcAnswer { room: "r0-1".into(), sdp: "v=0\r\n".into() },
            ServerMsg::Reload { version: 9 },
            ServerMsg::Presence { joined: vec![alice()], left: vec![8, 9] },
            ServerMsg::Chat(line),
            ServerMsg::Pong { id: 1 },
            ServerMsg::Queued { mode: "duel".into(), waited_ms: 1200 },
            ServerMsg::Unqueued,
            ServerMsg::MatchFound {
                mode: "duel".into(),
                room: "r1".into(),
                ticket: "t.s".into(),
                players: vec!["a".into(), "b".into()],
                url: None,
            },
            ServerMsg::MatchFound {
                mode: "duel".into(),
                room: "eu-1/r0-1".into(),
                ticket: "t.s".into(),
                players: vec!["a".into(), "b".into()],
                url: Some("https://r1.example.com:9000".into()),
            },
            ServerMsg::MatchAborted { message: "sorry".into() },
            ServerMsg::Error { code: ErrorCode::RateLimited, message: "slow down".into() },
        ] {
            let json = msg.to_json();
            assert_eq!(serde_json::from_str::<ServerMsg>(&json).unwrap(), msg, "{json}");
        }
    }

    #[test]
    fn wire_format_is_tagged_json() {
        assert_eq!(serde_json::to_string(&ClientMsg::Hello { version: 1 }).unwrap(), r#"{"type":"hello","version":1}"#);
        assert_eq!(
            ServerMsg::Presence { joined: vec![], left: vec![3] }.to_json(),
            r#"{"type":"presence","joined":[],"left":[3]}"#
        );
    }

    #[test]
    fn unknown_or_malformed_messages_are_errors() {
        for bad in [
            "",
            "null",
            "{}",
            r#"{"type":"nope"}"#,
            r#"{"type":"chat"}"#,
            r#"{"type":"chat","text":5}"#,
            r#"{"type":"hello","version":1,"extra":true}"#,
            r#"{"type":"hello","version":-1}"#,
        ] {
            assert!(ClientMsg::from_json(bad).is_err(), "accepted {bad:?}");
        }
    }
}
