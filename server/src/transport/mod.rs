//! In-room transports. A room never sees a socket: it sees a [`crate::rooms::Link`] per player
//! and receives the client's frames as [`crate::rooms::RoomCommand`]s.
//!
//! A player's room WebSocket ([`ws`]) is one task that moves bytes between the client and the
//! link's queue, never looking inside them: the join, the reliable frames, and everything while
//! the player has no data channel. The WebRTC transport ([`webrtc`]) serves every data channel
//! from a few loops (one per core), each owning a UDP socket on the shared port; while a
//! player's channel is open, the room hands that player's unreliable frames to the loop
//! directly, and the channel's messages go straight to the room.

pub mod webrtc;
pub mod ws;
