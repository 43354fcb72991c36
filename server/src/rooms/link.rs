//! A room's handle on one player connection, and the datagram path its unreliable frames take
//! while the player has one.
//!
//! A room never sees a socket. It sees a [`Link`] per player: a bounded queue of frames that the
//! player's reliable connection (the room WebSocket) drains, and a [`Route`] that a datagram
//! transport (WebRTC) sets while the player's data channel is open. At each tick the room reads
//! every route and hands all the frames bound for one datagram shard over in one batch
//! ([`Datagrams::send`]), so a tick costs one hand-over per shard, not one per player.
//!
//! When the reliable connection lets the room write to it itself ([`DirectWrite`]: the room
//! WebSocket over plain TCP), the link's frames go straight to its socket, and the queue only
//! carries the close.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use bytes::Bytes;
use tokio::sync::mpsc;

/// Identifies one player connection for the life of the process.
pub type LinkId = u64;

static NEXT_LINK: AtomicU64 = AtomicU64::new(1);

/// A frame on its way to the client over the reliable connection.
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

/// A peer of a datagram transport: which shard (loop) owns it, and its number there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DatagramPeer {
    pub shard: u16,
    /// Below 2^48.
    pub id: u64,
}

const PEER_BITS: u32 = 48;
const PEER_MASK: u64 = (1 << PEER_BITS) - 1;

impl DatagramPeer {
    fn pack(self) -> u64 {
        ((u64::from(self.shard) + 1) << PEER_BITS) | (self.id & PEER_MASK)
    }

    fn unpack(packed: u64) -> Option<Self> {
        let shard = packed >> PEER_BITS;
        (shard != 0).then(|| Self { shard: (shard - 1) as u16, id: packed & PEER_MASK })
    }
}

/// Where a player's unreliable frames go now, shared by the link (read at each tick) and the
/// datagram transport (which sets it when a channel opens and clears it when it closes). Two
/// atomics, no lock: the room never waits for a transport.
#[derive(Debug, Default)]
pub struct Route {
    peer: AtomicU64,
    /// Milliseconds since [`Route::epoch`] when the datagram path last brought a message; 0: never.
    heard_ms: AtomicU64,
}

impl Route {
    /// The open datagram path, if any.
    pub fn datagram(&self) -> Option<DatagramPeer> {
        DatagramPeer::unpack(self.peer.load(Ordering::Acquire))
    }

    /// Sends unreliable frames on `peer` from now on.
    pub fn open(&self, peer: DatagramPeer) {
        self.peer.store(peer.pack(), Ordering::Release);
    }

    /// Back to the reliable connection, if `peer` is still the path (a newer peer of the same
    /// seat may have replaced it).
    pub fn close(&self, peer: DatagramPeer) {
        let _ = self.peer.compare_exchange(peer.pack(), 0, Ordering::AcqRel, Ordering::Relaxed);
    }

    /// Records that the datagram path brought a message `ms` after the transport's epoch.
    pub fn heard(&self, ms: u64) {
        self.heard_ms.store(ms.max(1), Ordering::Relaxed);
    }

    /// When the datagram path last brought a message, in the transport's milliseconds.
    pub fn last_heard_ms(&self) -> Option<u64> {
        match self.heard_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(ms),
        }
    }
}

/// A transport that carries unreliable frames as datagrams, in shards.
pub trait Datagrams: Send + Sync + 'static {
    /// Queues `frames` (peer id, frame) for the peers of `shard`; frames that cannot be queued
    /// are dropped and counted, as lost datagrams would be. Never waits.
    fn send(&self, shard: u16, frames: Vec<(u64, Bytes)>);
}

/// No datagram transport: every route stays on the reliable connection.
pub struct NoDatagrams;

impl Datagrams for NoDatagrams {
    fn send(&self, _: u16, _: Vec<(u64, Bytes)>) {}
}

/// A reliable connection that the room writes its frames to itself, with no task between: each
/// frame is written at once, kept in a bounded backlog, or dropped — never waited for.
pub trait DirectWrite: Send + Sync {
    /// Writes `frame` as one message. A `lossy` frame is dropped when the connection is behind;
    /// another waits in its backlog up to a bound. `false`: dropped.
    fn write(&self, frame: &[u8], lossy: bool) -> bool;
}

/// A room's handle on one player connection.
pub struct Link {
    pub id: LinkId,
    tx: mpsc::Sender<ToClient>,
    pub route: Arc<Route>,
    /// The connection's write side, while it lives.
    direct: Option<Weak<dyn DirectWrite>>,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link").field("id", &self.id).field("direct", &self.direct.is_some()).finish_non_exhaustive()
    }
}

/// A link id no link has had yet.
pub fn next_link_id() -> LinkId {
    NEXT_LINK.fetch_add(1, Ordering::Relaxed)
}

impl Link {
    /// A new link and the receiving end its transport drains.
    pub fn new() -> (Self, mpsc::Receiver<ToClient>) {
        Self::on_route(next_link_id(), Arc::default())
    }

    /// A link with an id and a route chosen already (a seat's WebRTC side may have them first).
    pub fn on_route(id: LinkId, route: Arc<Route>) -> (Self, mpsc::Receiver<ToClient>) {
        let (tx, rx) = mpsc::channel(LINK_QUEUE);
        (Self { id, tx, route, direct: None }, rx)
    }

    /// The room writes this link's frames to `direct` itself (while it lives) instead of
    /// queueing them.
    #[must_use]
    pub fn writing_to(mut self, direct: Weak<dyn DirectWrite>) -> Self {
        self.direct = Some(direct);
        self
    }

    /// Sends a frame that may be lost on the reliable connection; `false` when it was dropped
    /// (the client is behind).
    pub fn unreliable(&self, frame: Bytes) -> bool {
        match &self.direct {
            Some(direct) => direct.upgrade().is_some_and(|d| d.write(&frame, true)),
            None => self.tx.try_send(ToClient::Unreliable(frame)).is_ok(),
        }
    }

    /// Sends a frame that must arrive; `false` when the client is too far behind to take it.
    pub fn reliable(&self, frame: Bytes) -> bool {
        match &self.direct {
            Some(direct) => direct.upgrade().is_some_and(|d| d.write(&frame, false)),
            None => self.tx.try_send(ToClient::Reliable(frame)).is_ok(),
        }
    }

    /// Asks the transport to close the connection (after the frames sent before).
    pub fn close(&self, code: u16, reason: &'static str) {
        let _ = self.tx.try_send(ToClient::Close(code, reason));
    }
}

/// Frames of one tick grouped by datagram shard, so that each shard gets one batch.
#[derive(Default)]
pub struct Outgoing {
    batches: Vec<(u16, Vec<(u64, Bytes)>)>,
}

impl Outgoing {
    /// Sends `frame` on `link`'s datagram path if it has one (batched until [`Self::flush`]),
    /// else queues it on the reliable connection. `false` when it was dropped there.
    pub fn unreliable(&mut self, link: &Link, frame: Bytes) -> bool {
        let Some(peer) = link.route.datagram() else { return link.unreliable(frame) };
        match self.batches.iter_mut().find(|(shard, _)| *shard == peer.shard) {
            Some((_, frames)) => frames.push((peer.id, frame)),
            None => self.batches.push((peer.shard, vec![(peer.id, frame)])),
        }
        true
    }

    /// Hands every batch to its shard.
    pub fn flush(&mut self, datagrams: &dyn Datagrams) {
        for (shard, frames) in self.batches.drain(..) {
            datagrams.send(shard, frames);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_route_packs_its_peer_and_only_the_current_peer_closes_it() {
        let route = Route::default();
        assert_eq!(route.datagram(), None);
        let (a, b) = (DatagramPeer { shard: 0, id: 7 }, DatagramPeer { shard: 3, id: PEER_MASK });
        route.open(a);
        assert_eq!(route.datagram(), Some(a));
        route.open(b);
        route.close(a);
        assert_eq!(route.datagram(), Some(b), "an older peer must not close its successor's path");
        route.close(b);
        assert_eq!(route.datagram(), None);
    }

    #[test]
    fn frames_are_batched_by_shard_and_the_rest_go_to_the_link() {
        struct Collect(std::sync::Mutex<Vec<(u16, usize)>>);
        impl Datagrams for Collect {
            fn send(&self, shard: u16, frames: Vec<(u64, Bytes)>) {
                self.0.lock().unwrap().push((shard, frames.len()));
            }
        }
        let links: Vec<_> = (0..5).map(|_| Link::new()).collect();
        links[0].0.route.open(DatagramPeer { shard: 1, id: 1 });
        links[1].0.route.open(DatagramPeer { shard: 0, id: 2 });
        links[2].0.route.open(DatagramPeer { shard: 1, id: 3 });
        let mut out = Outgoing::default();
        for (link, _) in &links {
            assert!(out.unreliable(link, Bytes::from_static(b"x")));
        }
        let sink = Collect(std::sync::Mutex::default());
        out.flush(&sink);
        assert_eq!(*sink.0.lock().unwrap(), [(1, 2), (0, 1)]);
        let mut rx3 = links.into_iter().nth(3).unwrap().1;
        assert!(matches!(rx3.try_recv(), Ok(ToClient::Unreliable(_))));
    }
}
