//! In-room transports. A room never sees a socket: it sees a [`crate::rooms::Link`] per player
//! and receives the client's frames as [`crate::rooms::RoomCommand`]s.
//!
//! A player's room WebSocket ([`ws`]) is one task that reads the client's frames into the room,
//! and carries the join, the reliable frames and everything while the player has no data
//! channel. Over plain TCP ([`direct`]) the room writes those frames to the socket itself, and
//! the task only writes what the socket could not take at once; over TLS they cross the link's
//! queue and the task. The WebRTC transport ([`webrtc`]) serves every data channel
//! from a few loops (one per core), each owning a UDP socket on the shared port; while a
//! player's channel is open, the room hands that player's unreliable frames to the loop
//! directly, and the channel's messages go straight to the room.

pub mod direct;
pub mod webrtc;
pub mod ws;
