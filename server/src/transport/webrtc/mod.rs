//! The WebRTC transport: one data channel per player (unordered, no retransmissions) for inputs
//! and snapshots, every peer on one UDP port, served by a sans-I/O stack (str0m) from a few
//! loops of our own.
//!
//! A player takes their seat over the room WebSocket ([`super::ws`]), which stays the reliable
//! channel and the fallback. Their browser offers a peer connection over the hub WebSocket at
//! the same time, with the seat's ticket, so that the handshake does not wait for the join;
//! [`Rtc::offer`] accepts it only for a user who holds a seat in that room, or shows that
//! seat's ticket, answers as an ICE-lite server, and binds the peer to the hub connection that
//! negotiated it. The seat's entry gives the peer and the joining WebSocket one link id and
//! one route ([`Rtc::reserve`]), whichever comes first; an entry no WebSocket takes within the
//! handshake timeout goes, with its peer. The peer waits (pending, by its ICE username
//! fragment) until its first STUN check reaches one of the [`shard`] loops, which adopts it:
//! from then on that loop alone owns it, with no lock, task or channel of its own. When the
//! data channel opens, the loop sets the seat's [`Route`], and the room hands the player's
//! unreliable frames to the loop in its tick's batch; when it closes or fails, the route goes
//! back to the WebSocket.

mod shard;
mod udp;

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use axum::body::Bytes;
use str0m::change::SdpOffer;
use str0m::channel::{ChannelConfig, Reliability};
use str0m::config::{CryptoProvider, DtlsCert};
use str0m::{Candidate, IceCreds};
use tokio::sync::mpsc;
use tokio::time::Instant;

use self::shard::{Peer, ShardCommand};
use crate::rate::TokenBucket;
use crate::rooms::{Datagrams, LinkId, RoomCommand, Rooms, Route, Ticket, next_link_id};

/// A client's offer of a peer connection for its seat, as it came over the hub.
#[derive(Debug, Clone, Copy)]
pub struct Offer<'a> {
    pub sdp: &'a str,
    /// The seat's ticket, while the player's room WebSocket joins.
    pub ticket: Option<&'a str>,
    /// The client's data channel is pre-negotiated ([`shared::room::DATA_CHANNEL_ID`]).
    pub negotiated: bool,
}

/// Settings of the WebRTC transport, from the configuration.
#[derive(Debug, Clone)]
pub struct RtcConfig {
    /// The UDP address every peer shares; `None`: the HTTP listener's address and port.
    pub listen: Option<SocketAddr>,
    /// The address announced to browsers as the server's candidate (for NAT or containers).
    pub public_ip: Option<IpAddr>,
    /// STUN/TURN servers handed to clients.
    pub ice_servers: Vec<shared::hub::IceServer>,
    /// Most peer connections at once.
    pub max_peers: usize,
    /// Loops serving peers, each with its own socket on the shared port; 0: one per runtime
    /// worker thread.
    pub shards: usize,
    /// Time from the offer to an open data channel (ICE + DTLS + SCTP), after which the peer is
    /// dropped.
    pub handshake_timeout: Duration,
    /// Bytes queued on one data channel beyond which snapshots are dropped, not queued.
    pub max_buffered_bytes: usize,
    /// Offers one seat may make: burst, then one per this many seconds.
    pub offer_burst: f64,
    pub offers_per_second: f64,
    /// Data-channel messages one player may send per second, and their burst.
    pub messages_per_second: f64,
    pub message_burst: f64,
}

impl Default for RtcConfig {
    fn default() -> Self {
        Self {
            listen: None,
            public_ip: None,
            ice_servers: Vec::new(),
            max_peers: 10_000,
            shards: 0,
            handshake_timeout: Duration::from_secs(10),
            max_buffered_bytes: 64 * 1024,
            offer_burst: 3.0,
            offers_per_second: 0.5,
            messages_per_second: 120.0,
            message_burst: 60.0,
        }
    }
}

/// Why an offer or candidate is refused. The text goes to the client as is.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum RtcError {
    #[error("you have no seat in that room (join it over its WebSocket first)")]
    NoSeat,
    #[error("too many offers; wait a moment")]
    TooManyOffers,
    #[error("the server has too many peer connections; playing over the WebSocket")]
    Full,
    #[error("no offer was made for that room on this connection")]
    NoPeer,
    #[error("the offer is not a valid SDP offer with a data channel")]
    BadOffer,
}

/// Counters for tests, metrics and benchmarks.
#[derive(Debug, Default)]
pub struct RtcStats {
    /// Peers alive now (pending or adopted by a loop).
    pub peers: AtomicUsize,
    pub peers_opened: AtomicU64,
    pub channels_opened: AtomicU64,
    pub handshakes_timed_out: AtomicU64,
    pub offers_refused: AtomicU64,
    /// Candidates from clients that could not be parsed (mDNS names, say): an ICE-lite server
    /// learns the client's address from its checks, so they are ignored.
    pub candidates_ignored: AtomicU64,
    /// Data-channel messages handed to rooms.
    pub messages_in: AtomicU64,
    /// Data-channel messages dropped: text, oversized, too frequent, or the room's mailbox full.
    pub frames_dropped: AtomicU64,
    /// Snapshots dropped: the channel's queue full, the loop's inbox full, or the peer gone.
    pub snapshots_dropped: AtomicU64,
    /// Datagrams from addresses and ICE usernames no peer has (or that do not parse).
    pub datagrams_unknown: AtomicU64,
    /// Datagrams from a peer's address that its connection refused (they do not decrypt, say).
    pub datagrams_refused: AtomicU64,
    /// Datagrams one loop handed to the loop that owns their peer.
    pub datagrams_forwarded: AtomicU64,
    pub datagrams_in: AtomicU64,
    pub datagrams_out: AtomicU64,
    /// System calls that read or wrote datagrams: with batching, far fewer than datagrams.
    pub recv_calls: AtomicU64,
    pub send_calls: AtomicU64,
}

/// One player's seat, as the WebRTC side knows it.
struct SeatEntry {
    link: LinkId,
    room: mpsc::Sender<RoomCommand>,
    route: Arc<Route>,
    offers: TokenBucket,
    peer: Option<PeerRef>,
    /// Until a room WebSocket holds the seat ([`SeatGuard`]): since when the entry waits for
    /// one. An offer with the seat's ticket, or a join whose claim is in flight, made it.
    unclaimed_since: Option<Instant>,
    /// The ticket it is for: an offer or a join with a newer one (a player who came back)
    /// takes the seat's WebRTC side over, even while the older connection lingers.
    ticket: TicketStamp,
}

/// Which ticket an entry is for. Tickets are single-use and short-lived: a later expiry is a
/// newer ticket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TicketStamp {
    expires_ms: i64,
    nonce: u64,
}

impl TicketStamp {
    fn of(ticket: &Ticket) -> Self {
        Self { expires_ms: ticket.expires_ms, nonce: ticket.nonce }
    }

    fn newer_than(self, other: Self) -> bool {
        self.expires_ms > other.expires_ms
    }
}

impl SeatEntry {
    fn new(config: &RtcConfig, room: mpsc::Sender<RoomCommand>, ticket: TicketStamp) -> Self {
        let now = Instant::now();
        let offers = TokenBucket::new(config.offers_per_second, config.offer_burst, now);
        let (link, route) = (next_link_id(), Arc::default());
        Self { link, room, route, offers, peer: None, unclaimed_since: Some(now), ticket }
    }
}

/// A seat's current peer.
struct PeerRef {
    id: u64,
    ufrag: String,
    /// The hub connection that negotiated it.
    signaling: u64,
}

type SeatKey = (i64, String);

/// Where a peer is, by its local ICE username fragment.
enum Place {
    /// Answered, waiting for its first STUN check to reach a loop.
    Pending(Box<Peer>),
    /// Owned by this loop.
    Shard(u16),
}

struct Inner {
    config: RtcConfig,
    /// The address in every answer's candidate.
    candidate: SocketAddr,
    /// The address the loops' sockets are bound to.
    local: SocketAddr,
    crypto: Arc<CryptoProvider>,
    /// One certificate for every peer: generating one per peer costs a key pair each.
    cert: DtlsCert,
    seats: Mutex<HashMap<SeatKey, SeatEntry>>,
    places: Mutex<HashMap<String, Place>>,
    shards: Vec<mpsc::Sender<ShardCommand>>,
    next_peer: AtomicU64,
    /// Zero of the milliseconds in [`Route::heard`].
    epoch: Instant,
    stats: Arc<RtcStats>,
}

/// A cheap handle to the WebRTC transport.
#[derive(Clone)]
pub struct Rtc(Arc<Inner>);

/// The UDP port could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen for WebRTC on UDP {addr}: {reason} (choose the port with --webrtc-listen)")]
pub struct RtcBindError {
    addr: SocketAddr,
    reason: std::io::Error,
}

/// Largest data-channel message the SCTP layer takes (and advertises). Above the room's own
/// limit on purpose: a larger message than the room takes is then refused and counted by us,
/// not by an association abort.
const MAX_SCTP_MESSAGE: u32 = 16 * 1024;

/// Commands queued for one loop at most: a tick's batch per room and the signaling.
const SHARD_INBOX: usize = 4096;

impl Rtc {
    /// Binds the shared UDP port (`config.listen`, else `http`'s address and port) once per
    /// loop, and starts the loops on the current runtime.
    pub fn bind(config: RtcConfig, http: SocketAddr) -> Result<Self, RtcBindError> {
        let addr = config.listen.unwrap_or(http);
        let shards = match config.shards {
            0 => tokio::runtime::Handle::current().metrics().num_workers().max(1),
            n => n,
        };
        let bind_error = |reason| RtcBindError { addr, reason };
        let mut sockets = vec![shard::bind(addr, true).map_err(bind_error)?];
        let local = sockets[0].local_addr().map_err(bind_error)?;
        for _ in 1..shards {
            sockets.push(shard::bind(local, false).map_err(bind_error)?);
        }
        let candidate = SocketAddr::new(config.public_ip.unwrap_or_else(|| announced_ip(local.ip())), local.port());
        let crypto = Arc::new(str0m::crypto::from_feature_flags());
        let cert = crypto
            .dtls_provider
            .generate_certificate()
            .ok_or_else(|| bind_error(std::io::Error::other("the crypto provider cannot make a DTLS certificate")))?;
        let (senders, inboxes): (Vec<_>, Vec<_>) = (0..shards).map(|_| mpsc::channel(SHARD_INBOX)).unzip();
        let inner = Arc::new(Inner {
            config,
            candidate,
            local,
            crypto,
            cert,
            seats: Mutex::default(),
            places: Mutex::default(),
            shards: senders,
            next_peer: AtomicU64::new(1),
            epoch: Instant::now(),
            stats: Arc::default(),
        });
        for (index, (socket, inbox)) in sockets.into_iter().zip(inboxes).enumerate() {
            let socket = tokio::net::UdpSocket::from_std(socket).map_err(bind_error)?;
            tokio::spawn(shard::Shard::new(index as u16, socket, candidate, inbox, &inner).run());
        }
        tokio::spawn(sweep_pending(Arc::downgrade(&inner)));
        tracing::info!(udp = %local, candidate = %candidate, loops = shards, "WebRTC listening");
        Ok(Self(inner))
    }

    pub fn stats(&self) -> &RtcStats {
        &self.0.stats
    }

    /// The UDP address every peer shares.
    pub fn udp_addr(&self) -> SocketAddr {
        self.0.local
    }

    pub fn ice_servers(&self) -> &[shared::hub::IceServer] {
        &self.0.config.ice_servers
    }

    /// The link id and route for a room WebSocket about to claim a seat with `ticket`,
    /// verified (`mailbox`: the room's). They are those of the entry an offer with the same
    /// ticket made, when there is one: the peer it negotiated then carries this connection's
    /// frames. Dropping the reservation (the claim failed) forgets an entry nobody holds;
    /// [`Self::seat`] makes it the seat.
    pub fn reserve(&self, ticket: &Ticket, mailbox: mpsc::Sender<RoomCommand>) -> Reservation {
        let (key, stamp) = ((ticket.user_id, ticket.room.to_string()), TicketStamp::of(ticket));
        let (link, route, old) = {
            let mut seats = lock(&self.0.seats);
            match seats.get(&key) {
                Some(entry) if entry.ticket == stamp && entry.unclaimed_since.is_some() => {
                    (entry.link, Arc::clone(&entry.route), None)
                }
                // Held under this ticket (a second use, which the claim refuses) or a newer one.
                Some(entry) if !stamp.newer_than(entry.ticket) => (next_link_id(), Arc::default(), None),
                _ => {
                    let entry = SeatEntry::new(&self.0.config, mailbox.clone(), stamp);
                    let (link, route) = (entry.link, Arc::clone(&entry.route));
                    (link, route, seats.insert(key.clone(), entry))
                }
            }
        };
        if let Some(peer) = old.and_then(|mut e| e.peer.take()) {
            self.close_peer(&peer);
        }
        Reservation { rtc: self.clone(), key, link, route, mailbox: Some(mailbox), ticket: stamp }
    }

    /// Registers the seat that a room WebSocket took with `reservation`: from now on its player
    /// may offer a peer connection, whose channel will carry the frames of the reservation's
    /// route. Dropping the guard forgets the seat and closes its peer connection.
    pub fn seat(&self, mut reservation: Reservation) -> SeatGuard {
        let mailbox = reservation.mailbox.take().expect("a reservation is used once");
        let (key, link, route) = (reservation.key.clone(), reservation.link, Arc::clone(&reservation.route));
        let old = {
            let mut seats = lock(&self.0.seats);
            match seats.get_mut(&key) {
                // Ours, perhaps with the peer an early offer negotiated: now held.
                Some(entry) if entry.link == link => {
                    entry.unclaimed_since = None;
                    None
                }
                // A newer connection of the same seat (a reloaded tab) replaces the older one.
                _ => {
                    let entry = SeatEntry {
                        link,
                        route: Arc::clone(&route),
                        unclaimed_since: None,
                        ..SeatEntry::new(&self.0.config, mailbox, reservation.ticket)
                    };
                    seats.insert(key.clone(), entry)
                }
            }
        };
        if let Some(peer) = old.and_then(|mut e| e.peer.take()) {
            self.close_peer(&peer);
        }
        SeatGuard { rtc: self.clone(), key, link, route }
    }

    /// Answers a client's offer for the room `room`, negotiated on hub connection `signaling`.
    /// The player must hold their seat, or show its `ticket` (checked by `rooms`) while their
    /// room WebSocket joins.
    pub fn offer(
        &self,
        user_id: i64,
        signaling: u64,
        room: &str,
        offer: Offer<'_>,
        rooms: &Rooms,
    ) -> Result<String, RtcError> {
        let key = (user_id, room.to_owned());
        // The ticket is checked outside the lock (a signature check).
        let ticketed = match offer.ticket {
            Some(ticket) => Some(ticketed_room(rooms, user_id, room, ticket).ok_or(RtcError::NoSeat)?),
            None => None,
        };
        let mut taken_over = None;
        let (link, room_tx, route) = {
            let mut seats = lock(&self.0.seats);
            let entry = match (seats.entry(key.clone()), ticketed) {
                // A newer ticket: the player came back, and their new join will take the seat.
                (Entry::Occupied(entry), Some((mailbox, stamp))) if stamp.newer_than(entry.get().ticket) => {
                    let entry = entry.into_mut();
                    taken_over = std::mem::replace(entry, SeatEntry::new(&self.0.config, mailbox, stamp)).peer;
                    entry
                }
                (Entry::Occupied(entry), _) => entry.into_mut(),
                (Entry::Vacant(vacant), Some((mailbox, stamp))) => {
                    vacant.insert(SeatEntry::new(&self.0.config, mailbox, stamp))
                }
                (Entry::Vacant(_), None) => return Err(RtcError::NoSeat),
            };
            if !entry.offers.take(Instant::now()) {
                return Err(RtcError::TooManyOffers);
            }
            (entry.link, entry.room.clone(), Arc::clone(&entry.route))
        };
        if let Some(peer) = taken_over {
            self.close_peer(&peer);
        }
        if self.0.stats.peers.load(Ordering::Relaxed) >= self.0.config.max_peers {
            return Err(RtcError::Full);
        }
        let creds = IceCreds { ufrag: ice_token(8), pass: ice_token(16) };
        let now = std::time::Instant::now();
        let answerer = Answerer {
            crypto: &self.0.crypto,
            cert: &self.0.cert,
            max_buffered_bytes: self.0.config.max_buffered_bytes,
            candidate: self.0.candidate,
        };
        let (rtc, answer) = answerer.answer(offer.sdp, offer.negotiated, creds.clone(), now)?;
        let id = self.0.next_peer.fetch_add(1, Ordering::Relaxed);
        let config = &self.0.config;
        let inbound = TokenBucket::new(config.messages_per_second, config.message_burst, Instant::now());
        let deadline = now + config.handshake_timeout;
        let peer = Peer::new(id, creds.ufrag.clone(), rtc, link, room_tx, route, inbound, deadline, &self.0.stats);
        lock(&self.0.places).insert(creds.ufrag.clone(), Place::Pending(Box::new(peer)));
        let peer = PeerRef { id, ufrag: creds.ufrag, signaling };
        let replaced = {
            let mut seats = lock(&self.0.seats);
            match seats.get_mut(&key) {
                Some(entry) if entry.link == link => Ok(entry.peer.replace(peer)),
                _ => Err(peer),
            }
        };
        match replaced {
            Ok(Some(old)) => self.close_peer(&old),
            Ok(None) => {}
            Err(peer) => {
                // The seat went away while we answered.
                self.close_peer(&peer);
                return Err(RtcError::NoSeat);
            }
        }
        Ok(answer)
    }

    /// Adds a client's ICE candidate to the peer connection it negotiated on `signaling`.
    pub fn candidate(&self, user_id: i64, signaling: u64, room: &str, candidate: &str) -> Result<(), RtcError> {
        let (id, ufrag) = {
            let seats = lock(&self.0.seats);
            let entry = seats.get(&(user_id, room.to_owned())).ok_or(RtcError::NoSeat)?;
            match &entry.peer {
                Some(peer) if peer.signaling == signaling => (peer.id, peer.ufrag.clone()),
                _ => return Err(RtcError::NoPeer),
            }
        };
        let Ok(candidate) = Candidate::from_sdp_string(candidate) else {
            self.0.stats.candidates_ignored.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        };
        let mut places = lock(&self.0.places);
        match places.get_mut(&ufrag) {
            Some(Place::Pending(peer)) => peer.add_remote_candidate(candidate),
            Some(Place::Shard(shard)) => {
                let command = ShardCommand::Candidate { id, candidate };
                if self.0.shards[usize::from(*shard)].try_send(command).is_err() {
                    self.0.stats.candidates_ignored.fetch_add(1, Ordering::Relaxed);
                }
            }
            None => return Err(RtcError::NoPeer),
        }
        Ok(())
    }

    /// A hub connection ended: close the peer connections it negotiated.
    pub fn signaling_closed(&self, signaling: u64) {
        let peers: Vec<PeerRef> = lock(&self.0.seats)
            .values_mut()
            .filter(|e| e.peer.as_ref().is_some_and(|p| p.signaling == signaling))
            .filter_map(|e| e.peer.take())
            .collect();
        for peer in &peers {
            self.close_peer(peer);
        }
    }

    /// Closes a peer taken out of its seat: a pending one here, an adopted one by its loop.
    fn close_peer(&self, peer: &PeerRef) {
        let mut places = lock(&self.0.places);
        match places.get(&peer.ufrag) {
            Some(Place::Pending(_)) => {
                let pending = places.remove(&peer.ufrag);
                drop(places);
                drop(pending);
            }
            Some(Place::Shard(shard)) => {
                let tx = self.0.shards[usize::from(*shard)].clone();
                drop(places);
                let close = ShardCommand::Close { id: peer.id };
                if let Err(mpsc::error::TrySendError::Full(close)) = tx.try_send(close) {
                    // A loop swamped by a flood: the close waits its turn rather than be lost.
                    tokio::spawn(async move { tx.send(close).await });
                }
            }
            None => {}
        }
    }
}

impl Datagrams for Rtc {
    fn send(&self, shard: u16, frames: Vec<(u64, Bytes)>) {
        let n = frames.len() as u64;
        let queued =
            self.0.shards.get(usize::from(shard)).is_some_and(|tx| tx.try_send(ShardCommand::Frames(frames)).is_ok());
        if !queued {
            self.0.stats.snapshots_dropped.fetch_add(n, Ordering::Relaxed);
        }
    }
}

/// Drops pending peers whose first check never came within the handshake timeout, and seats
/// that no room WebSocket took within it (with their peers). Ends with the transport.
async fn sweep_pending(inner: Weak<Inner>) {
    let mut every = tokio::time::interval(Duration::from_millis(500));
    loop {
        every.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        let unclaimed: Vec<PeerRef> = {
            let limit = inner.config.handshake_timeout;
            let mut peers = Vec::new();
            lock(&inner.seats).retain(|_, entry| {
                let keep = entry.unclaimed_since.is_none_or(|since| since.elapsed() < limit);
                if !keep {
                    peers.extend(entry.peer.take());
                }
                keep
            });
            peers
        };
        let rtc = Rtc(Arc::clone(&inner));
        for peer in &unclaimed {
            rtc.close_peer(peer);
        }
        let now = std::time::Instant::now();
        let expired: Vec<Box<Peer>> = {
            let mut places = lock(&inner.places);
            let late: Vec<String> = places
                .iter()
                .filter(|(_, place)| matches!(place, Place::Pending(p) if p.deadline().is_some_and(|d| d <= now)))
                .map(|(ufrag, _)| ufrag.clone())
                .collect();
            late.iter()
                .filter_map(|u| match places.remove(u) {
                    Some(Place::Pending(p)) => Some(p),
                    _ => None,
                })
                .collect()
        };
        for peer in expired {
            inner.stats.handshakes_timed_out.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("rallypoint_webrtc_handshakes_timed_out_total").increment(1);
            drop(peer);
        }
    }
}

/// The seat's WebRTC side kept for a room WebSocket whose claim is in flight.
pub struct Reservation {
    rtc: Rtc,
    key: SeatKey,
    link: LinkId,
    route: Arc<Route>,
    /// The room's; taken by [`Rtc::seat`].
    mailbox: Option<mpsc::Sender<RoomCommand>>,
    ticket: TicketStamp,
}

impl Reservation {
    /// The link id the connection's [`crate::rooms::Link`] must have.
    pub fn link(&self) -> LinkId {
        self.link
    }

    /// The route its link must share with the seat's peer.
    pub fn route(&self) -> Arc<Route> {
        Arc::clone(&self.route)
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.mailbox.is_none() {
            return;
        }
        let peer = {
            let mut seats = lock(&self.rtc.0.seats);
            match seats.get(&self.key) {
                Some(entry) if entry.link == self.link && entry.unclaimed_since.is_some() => {
                    seats.remove(&self.key).and_then(|mut e| e.peer.take())
                }
                _ => None,
            }
        };
        if let Some(peer) = peer {
            self.rtc.close_peer(&peer);
        }
    }
}

/// The mailbox of `room`, and the ticket's stamp, when `ticket` is a good ticket of `user_id`
/// for a seat there.
fn ticketed_room(
    rooms: &Rooms,
    user_id: i64,
    room: &str,
    ticket: &str,
) -> Option<(mpsc::Sender<RoomCommand>, TicketStamp)> {
    let ticket = rooms.verify(ticket, Some(user_id)).ok()?;
    if ticket.room.to_string() != room {
        return None;
    }
    Some((rooms.mailbox(ticket.room)?, TicketStamp::of(&ticket)))
}

/// The room WebSocket's hold on its seat's WebRTC side.
pub struct SeatGuard {
    rtc: Rtc,
    key: SeatKey,
    link: LinkId,
    route: Arc<Route>,
}

impl SeatGuard {
    /// When the data channel last brought a message.
    pub fn last_heard(&self) -> Option<Instant> {
        self.route.last_heard_ms().map(|ms| self.rtc.0.epoch + Duration::from_millis(ms))
    }
}

impl Drop for SeatGuard {
    fn drop(&mut self) {
        let peer = {
            let mut seats = lock(&self.rtc.0.seats);
            match seats.get(&self.key) {
                Some(entry) if entry.link == self.link => seats.remove(&self.key).and_then(|mut e| e.peer.take()),
                _ => None,
            }
        };
        if let Some(peer) = peer {
            self.rtc.close_peer(&peer);
        }
    }
}

/// The address to announce for a socket bound to `ip`: `ip` itself, or for an unspecified
/// address the one the system routes outwards from (no packet is sent), else loopback.
fn announced_ip(ip: IpAddr) -> IpAddr {
    if !ip.is_unspecified() {
        return ip;
    }
    std::net::UdpSocket::bind("0.0.0.0:0")
        .and_then(|s| {
            s.connect("192.0.2.1:9")?;
            s.local_addr()
        })
        .map_or(IpAddr::from([127, 0, 0, 1]), |a| a.ip())
}

/// Parses `--ice-servers`: space- or comma-separated URLs, TURN ones with credentials as
/// `turn:USER:PASSWORD@host:port`.
pub fn parse_ice_servers(text: &str) -> Result<Vec<shared::hub::IceServer>, String> {
    text.split([' ', ','])
        .filter(|s| !s.is_empty())
        .map(|url| {
            let (scheme, rest) =
                url.split_once(':').ok_or_else(|| format!("{url:?} is not a stun:, stuns:, turn: or turns: URL"))?;
            if !matches!(scheme, "stun" | "stuns" | "turn" | "turns") {
                return Err(format!("{url:?} is not a stun:, stuns:, turn: or turns: URL"));
            }
            let (credentials, host) = match rest.rsplit_once('@') {
                Some((credentials, host)) => (Some(credentials), host),
                None => (None, rest),
            };
            if host.is_empty() {
                return Err(format!("{url:?} names no host"));
            }
            let (username, credential) = match credentials {
                None => (None, None),
                Some(c) if scheme.starts_with("turn") => {
                    let (u, p) = c.split_once(':').ok_or_else(|| format!("{url:?}: write turn:USER:PASSWORD@host"))?;
                    (Some(u.to_owned()), Some(p.to_owned()))
                }
                Some(_) => return Err(format!("{url:?}: only TURN servers take credentials")),
            };
            if scheme.starts_with("turn") && username.is_none() {
                return Err(format!("{url:?}: a TURN server needs credentials (turn:USER:PASSWORD@host)"));
            }
            Ok(shared::hub::IceServer { urls: vec![format!("{scheme}:{host}")], username, credential })
        })
        .collect()
}

/// Random hex: ICE credentials allow only letters, digits, `+` and `/`.
fn ice_token(bytes: usize) -> String {
    let mut raw = vec![0u8; bytes];
    crate::random::fill(&mut raw);
    raw.iter().fold(String::with_capacity(2 * bytes), |mut hex, b| {
        use std::fmt::Write as _;
        let _ = write!(hex, "{b:02x}");
        hex
    })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What the server's half of a negotiation needs from the server.
struct Answerer<'a> {
    crypto: &'a Arc<CryptoProvider>,
    cert: &'a DtlsCert,
    max_buffered_bytes: usize,
    candidate: SocketAddr,
}

impl Answerer<'_> {
    /// Checks and parses a browser's offer, builds the peer's connection (ICE-lite, one DTLS
    /// certificate for all, no media: no codecs or RTP header extensions to keep per peer) and
    /// answers it. With `negotiated`, the client's channel is pre-negotiated, and the peer makes
    /// its side of it: it opens as the SCTP association comes up.
    fn answer(
        &self,
        sdp: &str,
        negotiated: bool,
        creds: IceCreds,
        now: std::time::Instant,
    ) -> Result<(str0m::Rtc, String), RtcError> {
        // A browser's offer for our one data channel has an application section; without it
        // the peer could never open a channel.
        if !sdp.contains("m=application") {
            return Err(RtcError::BadOffer);
        }
        let offer = SdpOffer::from_sdp_string(sdp).map_err(|_| RtcError::BadOffer)?;
        let mut rtc = str0m::RtcConfig::new()
            .clear_codecs()
            .clear_extension_map()
            .set_ice_lite(true)
            .set_crypto_provider(Arc::clone(self.crypto))
            .set_dtls_cert(self.cert.clone())
            .set_local_ice_credentials(creds)
            .set_sctp_max_buffered_amount(self.max_buffered_bytes)
            .set_sctp_max_message_size(MAX_SCTP_MESSAGE)
            .build(now);
        let host = Candidate::host(self.candidate, "udp").map_err(|_| RtcError::BadOffer)?;
        rtc.add_local_candidate(host);
        let answer = rtc.sdp_api().accept_offer(offer).map_err(|_| RtcError::BadOffer)?;
        if negotiated {
            rtc.direct_api().create_data_channel(ChannelConfig {
                label: shared::room::DATA_CHANNEL_LABEL.to_owned(),
                ordered: false,
                reliability: Reliability::MaxRetransmits { retransmits: 0 },
                negotiated: Some(shared::room::DATA_CHANNEL_ID),
                ..ChannelConfig::default()
            });
        }
        Ok((rtc, answer.to_sdp_string()))
    }
}

/// Answers `sdp` as the server would, with a fixed certificate: the fuzz target of offers.
pub(crate) fn fuzz_offer(sdp: &str) {
    static SETUP: std::sync::OnceLock<(Arc<CryptoProvider>, Option<DtlsCert>)> = std::sync::OnceLock::new();
    let (crypto, cert) = SETUP.get_or_init(|| {
        let crypto = Arc::new(str0m::crypto::from_feature_flags());
        let cert = crypto.dtls_provider.generate_certificate();
        (crypto, cert)
    });
    let Some(cert) = cert else { return };
    let answerer =
        Answerer { crypto, cert, max_buffered_bytes: 64 * 1024, candidate: SocketAddr::from(([127, 0, 0, 1], 9)) };
    let creds = IceCreds { ufrag: "fuzzfuzz".into(), pass: "fuzzfuzzfuzzfuzz".into() };
    let _ = answerer.answer(sdp, false, creds, std::time::Instant::now());
}

/// Parses a trickled candidate line as the server does: the fuzz target of candidates.
pub(crate) fn fuzz_candidate(line: &str) {
    let _ = Candidate::from_sdp_string(line);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ice_servers_parse_with_and_without_credentials() {
        let servers = parse_ice_servers("stun:stun.example.org:3478, turn:alice:s3cret@turn.example.org:3478").unwrap();
        assert_eq!(servers.len(), 2);
        assert_eq!(servers[0].urls, ["stun:stun.example.org:3478"]);
        assert_eq!(servers[0].username, None);
        assert_eq!(servers[1].urls, ["turn:turn.example.org:3478"]);
        assert_eq!(servers[1].username.as_deref(), Some("alice"));
        assert_eq!(servers[1].credential.as_deref(), Some("s3cret"));
        assert!(parse_ice_servers("").unwrap().is_empty());
    }

    #[test]
    fn bad_ice_servers_are_refused_with_a_reason() {
        for bad in ["http://x", "turn:turn.example.org", "stun:a:b@host", "stun:", "nonsense"] {
            assert!(parse_ice_servers(bad).is_err(), "{bad}");
        }
    }
}
