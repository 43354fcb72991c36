//! In-room transports. A room never sees a socket: it sees a [`Link`] per player, which takes
//! frames to the client, and it receives the client's frames as [`crate::rooms::RoomCommand`]s.
//! A player's room WebSocket ([`ws`]) is one task that moves bytes between the client and those
//! two channels, never looking inside them; when the player's WebRTC data channel
//! ([`webrtc`]) is open, that task sends unreliable frames on it instead, and the channel's
//! messages go straight to the room.

pub mod webrtc;
pub mod ws;

use std::sync::atomic::{AtomicU64, Ordering};

use axum::body::Bytes;
use tokio::sync::mpsc;

/// Identifies one player connection for the life of the process.
pub type LinkId = u64;

static NEXT_LINK: AtomicU64 = AtomicU64::new(1);

/// A frame on its way to the client.
#[derive(Debug)]
pub enum ToClient {
    /// May be lost (snapshots): the newest one is what matters.
    Unreliable(Bytes),
    /// Must arrive, in order (the join answer, the result).
    Reliable(Bytes),
    /// Close the connection with this code and reason.
    Close(u16, &'static str),
}

/// Frames queued for one client at most. Small on purpose: a client that cannot keep up loses
/// snapshots instead of falling further behind.
pub const LINK_QUEUE: usize = 8;

/// A room's handle on one player connection.
#[derive(Debug)]
pub struct Link {
    pub id: LinkId,
    tx: mpsc::Sender<ToClient>,
}

impl Link {
    /// A new link and the receiving end its transport drains.
    pub fn new() -> (Self, mpsc::Receiver<ToClient>) {
        let (tx, rx) = mpsc::channel(LINK_QUEUE);
        (Self { id: NEXT_LINK.fetch_add(1, Ordering::Relaxed), tx }, rx)
    }

    /// Queues a frame that may be lost; `false` when it was dropped (the queue is full).
    pub fn unreliable(&self, frame: Bytes) -> bool {
        self.tx.try_send(ToClient::Unreliable(frame)).is_ok()
    }

    /// Queues a frame that must arrive; `false` when the client is too far behind to take it.
    pub fn reliable(&self, frame: Bytes) -> bool {
        self.tx.try_send(ToClient::Reliable(frame)).is_ok()
    }

    /// Asks the transport to close the connection.
    pub fn close(&self, code: u16, reason: &'static str) {
        let _ = self.tx.try_send(ToClient::Close(code, reason));
    }
}
