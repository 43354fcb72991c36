//! One loop of the WebRTC transport. It owns a UDP socket on the shared port (`SO_REUSEPORT`:
//! the kernel spreads remote addresses over the loops) and every peer it adopted, and drives
//! them: datagrams in (`recvmmsg`), routed to their peer by a hash map of remote addresses, then
//! of ICE usernames for a new address; the rooms' batches of frames; the peers' timers, from a
//! heap; and datagrams out, all of one wake-up in as few `sendmmsg` calls as they fit. Nothing
//! here waits: a loop is one task on the runtime, and there is no task, channel or lock per peer.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use str0m::channel::ChannelId;
use str0m::ice::StunMessage;
use str0m::net::{DatagramRecv, Protocol, Receive};
use str0m::{Candidate, Event, IceConnectionState, Input, Output};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use super::udp::{self, BATCH, RecvBatch};
use super::{Inner, Place, RtcStats, lock};
use crate::rate::TokenBucket;
use crate::rooms::{DatagramPeer, LinkId, RoomCommand, Route};

/// What the rest of the server asks of a loop.
pub(super) enum ShardCommand {
    /// A room's unreliable frames of one tick, by peer.
    Frames(Vec<(u64, Bytes)>),
    /// A datagram that reached another loop's socket but belongs to a peer of this one.
    Datagram {
        source: SocketAddr,
        at: Instant,
        data: Vec<u8>,
    },
    Candidate {
        id: u64,
        candidate: Candidate,
    },
    Close {
        id: u64,
    },
}

/// Commands taken in one wake-up at most, so that a flood never starves the socket.
const INBOX_BATCH: usize = 64;
/// `recvmmsg` calls in one wake-up at most.
const READ_ROUNDS: usize = 8;
/// Remote addresses one peer may be reached from (ICE tries a few; a flood must not grow it).
const MAX_ADDRS: usize = 8;
/// Addresses remembered as another loop's; past it the memory is cleared.
const MAX_FOREIGN: usize = 65_536;

/// One peer connection, owned by a loop (or pending in [`Inner::places`] before that).
pub(super) struct Peer {
    id: u64,
    ufrag: String,
    rtc: str0m::Rtc,
    link: LinkId,
    room: mpsc::Sender<RoomCommand>,
    route: Arc<Route>,
    inbound: TokenBucket,
    channel: Option<ChannelId>,
    /// Until the channel opens: when the handshake has taken too long.
    deadline: Option<Instant>,
    addrs: Vec<SocketAddr>,
    /// The timeout the peer asked for last, which has an entry in the loop's heap.
    timer: Option<Instant>,
    /// When the offer was answered: the data channel's open time counts from here.
    answered: Instant,
    _counted: Counted,
}

/// Counts a peer in [`RtcStats::peers`] for as long as it lives, however it ends.
struct Counted(Arc<RtcStats>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.peers.fetch_sub(1, Relaxed);
        metrics::gauge!("rallypoint_webrtc_peers").decrement(1.0);
    }
}

impl Peer {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        id: u64,
        ufrag: String,
        rtc: str0m::Rtc,
        link: LinkId,
        room: mpsc::Sender<RoomCommand>,
        route: Arc<Route>,
        inbound: TokenBucket,
        deadline: Instant,
        stats: &Arc<RtcStats>,
    ) -> Self {
        stats.peers.fetch_add(1, Relaxed);
        stats.peers_opened.fetch_add(1, Relaxed);
        metrics::gauge!("rallypoint_webrtc_peers").increment(1.0);
        Self {
            id,
            ufrag,
            rtc,
            link,
            room,
            route,
            inbound,
            channel: None,
            deadline: Some(deadline),
            addrs: Vec::new(),
            timer: None,
            answered: Instant::now(),
            _counted: Counted(Arc::clone(stats)),
        }
    }

    /// Until the channel opens: when the handshake has taken too long.
    pub(super) fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    pub(super) fn add_remote_candidate(&mut self, candidate: Candidate) {
        self.rtc.add_remote_candidate(candidate);
    }
}

/// Why a peer is removed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum End {
    Closed,
    TimedOut,
}

/// Counters bumped on every read and write, registered once (a lookup per use showed in
/// profiles).
struct Counters {
    datagrams_in: metrics::Counter,
    datagrams_out: metrics::Counter,
    recv_calls: metrics::Counter,
    send_calls: metrics::Counter,
}

impl Counters {
    fn new() -> Self {
        Self {
            datagrams_in: metrics::counter!("rallypoint_webrtc_datagrams_in_total"),
            datagrams_out: metrics::counter!("rallypoint_webrtc_datagrams_out_total"),
            recv_calls: metrics::counter!("rallypoint_webrtc_recv_calls_total"),
            send_calls: metrics::counter!("rallypoint_webrtc_send_calls_total"),
        }
    }
}

/// What driving a peer produces, apart from the peers themselves.
struct Io {
    index: u16,
    out: Vec<(SocketAddr, Vec<u8>)>,
    timers: BinaryHeap<Reverse<(Instant, u64)>>,
    doomed: Vec<(u64, End)>,
    stats: Arc<RtcStats>,
    epoch: Instant,
}

pub(super) struct Shard {
    socket: UdpSocket,
    /// The address in our candidate: what peers' datagrams are addressed to, for ICE.
    candidate: SocketAddr,
    inbox: mpsc::Receiver<ShardCommand>,
    inner: Weak<Inner>,
    peers: HashMap<u64, Box<Peer>>,
    by_addr: HashMap<SocketAddr, u64>,
    by_ufrag: HashMap<String, u64>,
    /// Addresses of peers that another loop owns: their datagrams are handed over.
    foreign: HashMap<SocketAddr, u16>,
    recv: Option<Box<RecvBatch>>,
    counters: Counters,
    io: Io,
}

/// Binds one loop's socket on `addr`, sharing the port with the other loops. The `first` one
/// checks that no other socket holds the port.
pub(super) fn bind(addr: SocketAddr, first: bool) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Socket, Type};
    if first && addr.port() != 0 {
        // SO_REUSEPORT would let us share the port with another process of the same user,
        // splitting its traffic silently: make sure nobody holds it first.
        drop(std::net::UdpSocket::bind(addr)?);
    }
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(socket2::Protocol::UDP))?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    // Room for a burst of every peer's datagrams between two reads.
    let _ = socket.set_recv_buffer_size(4 << 20);
    let _ = socket.set_send_buffer_size(4 << 20);
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

impl Shard {
    pub(super) fn new(
        index: u16,
        socket: UdpSocket,
        candidate: SocketAddr,
        inbox: mpsc::Receiver<ShardCommand>,
        inner: &Arc<Inner>,
    ) -> Self {
        Self {
            socket,
            candidate,
            inbox,
            inner: Arc::downgrade(inner),
            peers: HashMap::new(),
            by_addr: HashMap::new(),
            by_ufrag: HashMap::new(),
            foreign: HashMap::new(),
            recv: Some(Box::default()),
            counters: Counters::new(),
            io: Io {
                index,
                out: Vec::new(),
                timers: BinaryHeap::new(),
                doomed: Vec::new(),
                stats: Arc::clone(&inner.stats),
                epoch: inner.epoch.into_std(),
            },
        }
    }

    /// Serves until the transport is dropped (its senders gone).
    pub(super) async fn run(mut self) {
        let sleep = tokio::time::sleep(Duration::from_hours(1));
        tokio::pin!(sleep);
        let mut armed = None;
        loop {
            let next = self.io.timers.peek().map(|Reverse((t, _))| *t);
            if next != armed {
                if let Some(t) = next {
                    sleep.as_mut().reset(tokio::time::Instant::from_std(t));
                }
                armed = next;
            }
            tokio::select! {
                command = self.inbox.recv() => {
                    let Some(command) = command else { break };
                    self.command(command);
                    for _ in 0..INBOX_BATCH {
                        match self.inbox.try_recv() {
                            Ok(command) => self.command(command),
                            Err(_) => break,
                        }
                    }
                }
                ready = self.socket.readable() => {
                    if let Err(e) = ready {
                        tracing::error!(error = %e, "the WebRTC socket failed");
                        break;
                    }
                    self.read();
                }
                () = &mut sleep, if armed.is_some() => armed = None,
            }
            self.expire(Instant::now());
            self.reap();
            self.flush();
        }
        for id in self.peers.keys().copied().collect::<Vec<_>>() {
            self.remove(id, End::Closed);
        }
        self.flush();
    }

    fn read(&mut self) {
        let Some(mut batch) = self.recv.take() else { return };
        let fd = self.socket.as_raw_fd();
        for _ in 0..READ_ROUNDS {
            match self.socket.try_io(Interest::READABLE, || batch.recv(fd)) {
                Ok(n) => {
                    self.io.stats.recv_calls.fetch_add(1, Relaxed);
                    self.io.stats.datagrams_in.fetch_add(n as u64, Relaxed);
                    self.counters.datagrams_in.increment(n as u64);
                    self.counters.recv_calls.increment(1);
                    let now = Instant::now();
                    for (source, data) in batch.datagrams() {
                        self.receive(now, source, data, false);
                    }
                    self.flush();
                    if n < BATCH {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    tracing::debug!(error = %e, "WebRTC socket read");
                    break;
                }
            }
        }
        self.recv = Some(batch);
    }

    /// One datagram from `source`. `forwarded`: it came from another loop, never to go back.
    fn receive(&mut self, now: Instant, source: SocketAddr, data: &[u8], forwarded: bool) {
        let id = match self.by_addr.get(&source) {
            Some(&id) => id,
            None => match self.place(now, source, data, forwarded) {
                Some(id) => id,
                None => return,
            },
        };
        let Some(peer) = self.peers.get_mut(&id) else { return };
        let Ok(contents) = DatagramRecv::try_from(data) else {
            self.io.stats.datagrams_unknown.fetch_add(1, Relaxed);
            return;
        };
        let input =
            Input::Receive(now, Receive { proto: Protocol::Udp, source, destination: self.candidate, contents });
        // A datagram the peer refuses (one that does not decrypt, say) is dropped; it breaks
        // nothing, or anyone who can send from the peer's address could end its connection.
        if let Err(e) = peer.rtc.handle_input(input) {
            tracing::debug!(peer = id, error = %e, "WebRTC datagram refused");
            self.io.stats.datagrams_refused.fetch_add(1, Relaxed);
        }
        drive(peer, &mut self.io);
    }

    /// Finds the peer of a datagram from an address no peer of this loop has used: by its ICE
    /// username, among this loop's peers, then the pending ones (adopted here), then another
    /// loop's (handed over). Anything else is dropped, at the cost of a failed parse.
    fn place(&mut self, now: Instant, source: SocketAddr, data: &[u8], forwarded: bool) -> Option<u64> {
        if let Some(&shard) = self.foreign.get(&source)
            && !forwarded
        {
            self.forward(shard, now, source, data);
            return None;
        }
        let ours =
            StunMessage::parse(data).ok().and_then(|stun| stun.split_username().map(|(ours, _)| ours.to_owned()));
        let Some(ours) = ours else {
            self.io.stats.datagrams_unknown.fetch_add(1, Relaxed);
            return None;
        };
        if let Some(&id) = self.by_ufrag.get(&ours) {
            self.learn(id, source);
            return Some(id);
        }
        let inner = self.inner.upgrade()?;
        let mut places = lock(&inner.places);
        match places.get(&ours) {
            Some(Place::Pending(_)) => {
                let Some(Place::Pending(peer)) = places.insert(ours, Place::Shard(self.io.index)) else { return None };
                drop(places);
                let id = peer.id;
                self.adopt(peer, now);
                self.learn(id, source);
                Some(id)
            }
            Some(&Place::Shard(shard)) if shard != self.io.index && !forwarded => {
                drop(places);
                if self.foreign.len() >= MAX_FOREIGN {
                    self.foreign.clear();
                }
                self.foreign.insert(source, shard);
                self.forward(shard, now, source, data);
                None
            }
            _ => {
                self.io.stats.datagrams_unknown.fetch_add(1, Relaxed);
                None
            }
        }
    }

    fn forward(&self, shard: u16, at: Instant, source: SocketAddr, data: &[u8]) {
        let sent = self.inner.upgrade().is_some_and(|inner| {
            let command = ShardCommand::Datagram { source, at, data: data.to_vec() };
            inner.shards.get(usize::from(shard)).is_some_and(|tx| tx.try_send(command).is_ok())
        });
        let counter = if sent { &self.io.stats.datagrams_forwarded } else { &self.io.stats.datagrams_unknown };
        counter.fetch_add(1, Relaxed);
    }

    /// Remembers that peer `id` is reached from `source`.
    fn learn(&mut self, id: u64, source: SocketAddr) {
        let Some(peer) = self.peers.get_mut(&id) else { return };
        if peer.addrs.len() < MAX_ADDRS && !peer.addrs.contains(&source) {
            peer.addrs.push(source);
            self.by_addr.insert(source, id);
        }
    }

    fn adopt(&mut self, mut peer: Box<Peer>, now: Instant) {
        let id = peer.id;
        if let Some(deadline) = peer.deadline {
            self.io.timers.push(Reverse((deadline, id)));
        }
        peer.timer = None;
        if peer.rtc.handle_input(Input::Timeout(now)).is_err() {
            self.io.doomed.push((id, End::Closed));
        }
        drive(&mut peer, &mut self.io);
        self.by_ufrag.insert(peer.ufrag.clone(), id);
        self.peers.insert(id, peer);
    }

    fn command(&mut self, command: ShardCommand) {
        match command {
            ShardCommand::Frames(frames) => {
                for (id, frame) in frames {
                    let written = self.peers.get_mut(&id).is_some_and(|peer| {
                        let accepted = peer
                            .channel
                            .and_then(|cid| peer.rtc.channel(cid))
                            .is_some_and(|mut channel| matches!(channel.write(true, &frame), Ok(true)));
                        drive(peer, &mut self.io);
                        accepted
                    });
                    // The channel's queue is full (a peer that stopped reading), or the peer
                    // is gone: dropped, as a lost datagram.
                    if !written {
                        self.io.stats.snapshots_dropped.fetch_add(1, Relaxed);
                    }
                }
            }
            ShardCommand::Datagram { source, at, data } => self.receive(at, source, &data, true),
            ShardCommand::Candidate { id, candidate } => {
                if let Some(peer) = self.peers.get_mut(&id) {
                    peer.rtc.add_remote_candidate(candidate);
                    drive(peer, &mut self.io);
                }
            }
            ShardCommand::Close { id } => self.io.doomed.push((id, End::Closed)),
        }
    }

    /// Fires the timers that are due.
    fn expire(&mut self, now: Instant) {
        while let Some(&Reverse((at, id))) = self.io.timers.peek()
            && at <= now
        {
            self.io.timers.pop();
            let Some(peer) = self.peers.get_mut(&id) else { continue };
            if peer.channel.is_none() && peer.deadline.is_some_and(|d| d <= now) {
                self.io.doomed.push((id, End::TimedOut));
                continue;
            }
            if peer.timer.is_some_and(|t| t <= now) {
                peer.timer = None;
                match peer.rtc.handle_input(Input::Timeout(now)) {
                    Ok(()) => drive(peer, &mut self.io),
                    Err(_) => self.io.doomed.push((id, End::Closed)),
                }
            }
        }
        // Superseded entries pile up between firings; rebuild when they outnumber the live ones.
        if self.io.timers.len() > 4 * self.peers.len() + 1024 {
            self.io.timers = self
                .peers
                .values()
                .flat_map(|p| p.timer.into_iter().chain(p.deadline).map(|t| Reverse((t, p.id))))
                .collect();
        }
    }

    fn reap(&mut self) {
        while let Some((id, end)) = self.io.doomed.pop() {
            self.remove(id, end);
        }
    }

    fn remove(&mut self, id: u64, end: End) {
        let Some(mut peer) = self.peers.remove(&id) else { return };
        for addr in &peer.addrs {
            if self.by_addr.get(addr) == Some(&id) {
                self.by_addr.remove(addr);
            }
        }
        self.by_ufrag.remove(&peer.ufrag);
        peer.route.close(DatagramPeer { shard: self.io.index, id });
        if end == End::TimedOut {
            self.io.stats.handshakes_timed_out.fetch_add(1, Relaxed);
            metrics::counter!("rallypoint_webrtc_handshakes_timed_out_total").increment(1);
            tracing::debug!(peer = id, "WebRTC handshake timed out");
        }
        // Tell the client (DTLS close_notify), so it stops sending and falls back at once.
        let _ = peer.rtc.close();
        drive(&mut peer, &mut self.io);
        if let Some(inner) = self.inner.upgrade() {
            let mut places = lock(&inner.places);
            if matches!(places.get(&peer.ufrag), Some(Place::Shard(s)) if *s == self.io.index) {
                places.remove(&peer.ufrag);
            }
        }
    }

    fn flush(&mut self) {
        if self.io.out.is_empty() {
            return;
        }
        let (sent, calls) = udp::send_all(self.socket.as_raw_fd(), &self.io.out);
        self.io.stats.datagrams_out.fetch_add(sent as u64, Relaxed);
        self.io.stats.send_calls.fetch_add(calls as u64, Relaxed);
        self.counters.datagrams_out.increment(sent as u64);
        self.counters.send_calls.increment(calls as u64);
        self.io.out.clear();
    }
}

/// Takes everything a peer has to say: datagrams to send, events, and its next timeout.
fn drive(peer: &mut Peer, io: &mut Io) {
    loop {
        match peer.rtc.poll_output() {
            Ok(Output::Transmit(t)) => io.out.push((t.destination, t.contents.into())),
            Ok(Output::Timeout(at)) => {
                if peer.timer != Some(at) {
                    peer.timer = Some(at);
                    io.timers.push(Reverse((at, peer.id)));
                }
                return;
            }
            Ok(Output::Event(event)) => on_event(peer, event, io),
            Err(e) => {
                tracing::debug!(peer = peer.id, error = %e, "WebRTC peer failed");
                io.doomed.push((peer.id, End::Closed));
                return;
            }
        }
    }
}

fn on_event(peer: &mut Peer, event: Event, io: &mut Io) {
    match event {
        Event::ChannelOpen(cid, label) => {
            if label != shared::room::DATA_CHANNEL_LABEL || peer.channel.is_some() {
                // Only our one channel; another is a confused or hostile client.
                peer.rtc.direct_api().close_data_channel(cid);
                return;
            }
            peer.channel = Some(cid);
            peer.deadline = None;
            metrics::histogram!("rallypoint_webrtc_open_seconds").record(peer.answered.elapsed());
            peer.route.open(DatagramPeer { shard: io.index, id: peer.id });
            io.stats.channels_opened.fetch_add(1, Relaxed);
            metrics::counter!("rallypoint_webrtc_channels_opened_total").increment(1);
        }
        Event::ChannelData(data) if Some(data.id) == peer.channel => {
            peer.route.heard(io.epoch.elapsed().as_millis() as u64);
            // Text, oversized or too frequent: dropped and counted, as a lost datagram would
            // be. Frames that do not decode are counted by the room.
            let accepted = data.binary
                && data.data.len() <= shared::room::MAX_TO_ROOM_BYTES
                && peer.inbound.take(tokio::time::Instant::now())
                && peer.room.try_send(RoomCommand::Frame { link: peer.link, frame: Bytes::from(data.data) }).is_ok();
            if accepted {
                io.stats.messages_in.fetch_add(1, Relaxed);
            } else {
                io.stats.frames_dropped.fetch_add(1, Relaxed);
                metrics::counter!("rallypoint_webrtc_frames_dropped_total").increment(1);
            }
        }
        Event::ChannelClose(cid) if Some(cid) == peer.channel => io.doomed.push((peer.id, End::Closed)),
        Event::IceConnectionStateChange(IceConnectionState::Disconnected) | Event::Closed => {
            io.doomed.push((peer.id, End::Closed));
        }
        _ => {}
    }
}
