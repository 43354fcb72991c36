//! The WebRTC transport: one data channel per player (unordered, no retransmissions) for inputs
//! and snapshots, every peer on one UDP port.
//!
//! A player first takes their seat over the room WebSocket ([`super::ws`]), which stays the
//! reliable channel and the fallback. Their browser then offers a peer connection over the hub
//! WebSocket; [`Rtc::offer`] accepts it only for a user who holds a seat in that room at that
//! moment, and binds it to the hub connection that negotiated it. When the data channel opens,
//! the room WebSocket's task is told ([`DataPath`]) and sends snapshots on it; when it closes or
//! fails, snapshots go back to the WebSocket. The room never knows which path a frame took.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use axum::body::Bytes;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::Instant;
use webrtc::api::setting_engine::SettingEngine;
use webrtc::api::{API, APIBuilder};
use webrtc::data_channel::RTCDataChannel;
use webrtc::ice::mdns::MulticastDnsMode;
use webrtc::ice::network_type::NetworkType;
use webrtc::ice::udp_mux::{UDPMuxDefault, UDPMuxParams};
use webrtc::ice::udp_network::UDPNetwork;
use webrtc::ice_transport::ice_candidate::RTCIceCandidateInit;
use webrtc::ice_transport::ice_candidate_type::RTCIceCandidateType;
use webrtc::peer_connection::RTCPeerConnection;
use webrtc::peer_connection::configuration::RTCConfiguration;
use webrtc::peer_connection::peer_connection_state::RTCPeerConnectionState;
use webrtc::peer_connection::sdp::session_description::RTCSessionDescription;

use super::LinkId;
use crate::rate::TokenBucket;
use crate::rooms::RoomCommand;

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
    #[error("the ICE candidate was refused")]
    BadCandidate,
    #[error("the server could not answer the offer")]
    Internal,
}

/// What the room WebSocket's task hears about its player's data channel.
pub enum DataPath {
    /// The data channel is open: send unreliable frames on it.
    Open(Arc<RTCDataChannel>),
    /// It closed or failed: send everything on the WebSocket again.
    Closed,
}

/// Counters for tests, metrics and benchmarks.
#[derive(Debug, Default)]
pub struct RtcStats {
    pub peers: AtomicUsize,
    pub peers_opened: AtomicU64,
    pub channels_opened: AtomicU64,
    pub handshakes_timed_out: AtomicU64,
    pub offers_refused: AtomicU64,
    pub frames_dropped: AtomicU64,
    pub snapshots_dropped: AtomicU64,
}

/// One player's seat, as the WebRTC side knows it.
struct SeatEntry {
    link: LinkId,
    room: mpsc::Sender<RoomCommand>,
    paths: mpsc::Sender<DataPath>,
    heard: Arc<AtomicU64>,
    offers: TokenBucket,
    peer: Option<Peer>,
}

struct Peer {
    id: u64,
    pc: Arc<RTCPeerConnection>,
    /// The hub connection that negotiated it.
    signaling: u64,
}

type SeatKey = (i64, String);

struct Inner {
    api: API,
    config: RtcConfig,
    seats: Mutex<HashMap<SeatKey, SeatEntry>>,
    next_peer: AtomicU64,
    started: Instant,
    stats: RtcStats,
}

/// A cheap handle to the WebRTC transport.
#[derive(Clone)]
pub struct Rtc(Arc<Inner>);

/// The UDP port could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen for WebRTC on UDP {addr}: {source} (choose the port with --webrtc-listen)")]
pub struct RtcBindError {
    addr: SocketAddr,
    source: std::io::Error,
}

impl Rtc {
    /// Binds the shared UDP port (`config.listen`, else `http`'s address and port) and
    /// prepares the WebRTC stack.
    pub async fn bind(config: RtcConfig, http: SocketAddr) -> Result<Self, RtcBindError> {
        let addr = config.listen.unwrap_or(http);
        let bind_error = |source| RtcBindError { addr, source };
        let socket = UdpSocket::bind(addr).await.map_err(bind_error)?;
        let local_addr = socket.local_addr().map_err(bind_error)?;
        // With the mux, each local address that passes the filter gives a host candidate on the
        // shared port; with several, ICE was seen to fail. Keep exactly one, announced as
        // `candidate_ip`.
        let gather_ip = announced_ip(local_addr.ip());
        let candidate_ip = config.public_ip.unwrap_or(gather_ip);
        let mut settings = SettingEngine::default();
        settings.set_udp_network(UDPNetwork::Muxed(UDPMuxDefault::new(UDPMuxParams::new(socket))));
        settings.set_network_types(vec![NetworkType::Udp4, NetworkType::Udp6]);
        settings.set_ice_multicast_dns_mode(MulticastDnsMode::Disabled);
        settings.set_include_loopback_candidate(candidate_ip.is_loopback() || gather_ip.is_loopback());
        settings.set_ip_filter(Box::new(move |ip| ip == gather_ip));
        settings.set_nat_1to1_ips(vec![candidate_ip.to_string()], RTCIceCandidateType::Host);
        let api = APIBuilder::new().with_setting_engine(settings).build();
        tracing::info!(udp = %local_addr, candidate = %candidate_ip, "WebRTC listening");
        Ok(Self(Arc::new(Inner {
            api,
            config,
            seats: Mutex::default(),
            next_peer: AtomicU64::new(1),
            started: Instant::now(),
            stats: RtcStats::default(),
        })))
    }

    pub fn stats(&self) -> &RtcStats {
        &self.0.stats
    }

    pub fn ice_servers(&self) -> &[shared::hub::IceServer] {
        &self.0.config.ice_servers
    }

    /// Registers a seat that a room WebSocket took: from now on its player may offer a peer
    /// connection. Dropping the guard forgets the seat and closes its peer connection.
    pub fn seat(&self, user_id: i64, room: &str, link: LinkId, room_tx: mpsc::Sender<RoomCommand>) -> SeatGuard {
        let (paths, events) = mpsc::channel(4);
        let heard = Arc::new(AtomicU64::new(0));
        let config = &self.0.config;
        let entry = SeatEntry {
            link,
            room: room_tx,
            paths,
            heard: Arc::clone(&heard),
            offers: TokenBucket::new(config.offers_per_second, config.offer_burst, Instant::now()),
            peer: None,
        };
        let key = (user_id, room.to_owned());
        // A newer connection of the same seat (a reloaded tab) replaces the older one.
        let old = lock(&self.0.seats).insert(key.clone(), entry);
        if let Some(peer) = old.and_then(|mut e| e.peer.take()) {
            self.close_peer(peer);
        }
        SeatGuard { rtc: self.clone(), key, link, events, heard }
    }

    /// Answers a client's offer for the room `room`, negotiated on hub connection `signaling`.
    pub async fn offer(&self, user_id: i64, signaling: u64, room: &str, sdp: String) -> Result<String, RtcError> {
        let key = (user_id, room.to_owned());
        let (link, room_tx, paths, heard) = {
            let mut seats = lock(&self.0.seats);
            let entry = seats.get_mut(&key).ok_or(RtcError::NoSeat)?;
            if !entry.offers.take(Instant::now()) {
                return Err(RtcError::TooManyOffers);
            }
            (entry.link, entry.room.clone(), entry.paths.clone(), Arc::clone(&entry.heard))
        };
        if self.0.stats.peers.load(Ordering::Relaxed) >= self.0.config.max_peers {
            return Err(RtcError::Full);
        }
        let offer = RTCSessionDescription::offer(sdp).map_err(|_| RtcError::BadOffer)?;
        let pc = Arc::new(self.0.api.new_peer_connection(RTCConfiguration::default()).await.map_err(|e| {
            tracing::warn!(error = %e, "cannot create a peer connection");
            RtcError::Internal
        })?);
        let id = self.0.next_peer.fetch_add(1, Ordering::Relaxed);
        self.0.stats.peers.fetch_add(1, Ordering::Relaxed);
        self.0.stats.peers_opened.fetch_add(1, Ordering::Relaxed);
        metrics::gauge!("rallypoint_webrtc_peers").increment(1.0);
        // From here on the peer is counted; `close_peer` (exactly once) uncounts it.
        let peer = Peer { id, pc: Arc::clone(&pc), signaling };
        let replaced = {
            let mut seats = lock(&self.0.seats);
            match seats.get_mut(&key) {
                Some(entry) if entry.link == link => Ok(entry.peer.replace(peer)),
                _ => Err(peer),
            }
        };
        match replaced {
            Ok(Some(old)) => self.close_peer(old),
            Ok(None) => {}
            Err(peer) => {
                self.close_peer(peer);
                return Err(RtcError::NoSeat);
            }
        }
        let wiring = Wiring { rtc: Arc::downgrade(&self.0), key: key.clone(), peer: id, link, room_tx, paths, heard };
        match self.answer(&pc, offer, wiring).await {
            Ok(sdp) => Ok(sdp),
            Err(e) => {
                self.drop_peer(&key, id);
                Err(e)
            }
        }
    }

    async fn answer(
        &self,
        pc: &Arc<RTCPeerConnection>,
        offer: RTCSessionDescription,
        wiring: Wiring,
    ) -> Result<String, RtcError> {
        let wiring = Arc::new(wiring);
        let opened = Arc::new(std::sync::atomic::AtomicBool::new(false));
        {
            let wiring = Arc::clone(&wiring);
            let opened = Arc::clone(&opened);
            pc.on_data_channel(Box::new(move |dc| {
                wiring.attach(dc, Arc::clone(&opened));
                Box::pin(async {})
            }));
        }
        {
            let wiring = Arc::clone(&wiring);
            pc.on_peer_connection_state_change(Box::new(move |state| {
                if matches!(state, RTCPeerConnectionState::Failed | RTCPeerConnectionState::Disconnected) {
                    let _ = wiring.paths.try_send(DataPath::Closed);
                    if state == RTCPeerConnectionState::Failed
                        && let Some(rtc) = wiring.rtc.upgrade()
                    {
                        Rtc(rtc).drop_peer(&wiring.key, wiring.peer);
                    }
                }
                Box::pin(async {})
            }));
        }
        pc.set_remote_description(offer).await.map_err(|_| RtcError::BadOffer)?;
        let answer = pc.create_answer(None).await.map_err(|_| RtcError::BadOffer)?;
        let mut gathered = pc.gathering_complete_promise().await;
        pc.set_local_description(answer).await.map_err(|_| RtcError::Internal)?;
        // One host candidate on a known port: gathering ends at once.
        let _ = tokio::time::timeout(Duration::from_secs(2), gathered.recv()).await;
        let sdp = pc.local_description().await.ok_or(RtcError::Internal)?.sdp;
        // A peer that never opens its channel is dropped on time.
        let rtc = Arc::downgrade(&self.0);
        let (key, id, limit) = (wiring.key.clone(), wiring.peer, self.0.config.handshake_timeout);
        tokio::spawn(async move {
            tokio::time::sleep(limit).await;
            if !opened.load(Ordering::Acquire)
                && let Some(rtc) = rtc.upgrade()
            {
                let rtc = Rtc(rtc);
                if rtc.drop_peer(&key, id) {
                    rtc.0.stats.handshakes_timed_out.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("rallypoint_webrtc_handshakes_timed_out_total").increment(1);
                    tracing::debug!(peer = id, "WebRTC handshake timed out");
                }
            }
        });
        Ok(sdp)
    }

    /// Adds a client's ICE candidate to the peer connection it negotiated on `signaling`.
    pub async fn candidate(
        &self,
        user_id: i64,
        signaling: u64,
        room: &str,
        candidate: RTCIceCandidateInit,
    ) -> Result<(), RtcError> {
        let pc = {
            let seats = lock(&self.0.seats);
            let entry = seats.get(&(user_id, room.to_owned())).ok_or(RtcError::NoSeat)?;
            match &entry.peer {
                Some(peer) if peer.signaling == signaling => Arc::clone(&peer.pc),
                _ => return Err(RtcError::NoPeer),
            }
        };
        pc.add_ice_candidate(candidate).await.map_err(|_| RtcError::BadCandidate)
    }

    /// A hub connection ended: close the peer connections it negotiated.
    pub fn signaling_closed(&self, signaling: u64) {
        let peers: Vec<Peer> = lock(&self.0.seats)
            .values_mut()
            .filter(|e| e.peer.as_ref().is_some_and(|p| p.signaling == signaling))
            .filter_map(|e| {
                let _ = e.paths.try_send(DataPath::Closed);
                e.peer.take()
            })
            .collect();
        for peer in peers {
            self.close_peer(peer);
        }
    }

    /// Closes the peer `id` of a seat if it is still that seat's peer; `true` if it was.
    fn drop_peer(&self, key: &SeatKey, id: u64) -> bool {
        let peer = {
            let mut seats = lock(&self.0.seats);
            let Some(entry) = seats.get_mut(key) else { return false };
            if entry.peer.as_ref().is_none_or(|p| p.id != id) {
                return false;
            }
            let _ = entry.paths.try_send(DataPath::Closed);
            entry.peer.take()
        };
        peer.is_some_and(|peer| {
            self.close_peer(peer);
            true
        })
    }

    /// Closes a peer connection taken out of its seat, and uncounts it.
    fn close_peer(&self, peer: Peer) {
        let inner = Arc::clone(&self.0);
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(5), peer.pc.close()).await;
            inner.stats.peers.fetch_sub(1, Ordering::Relaxed);
            metrics::gauge!("rallypoint_webrtc_peers").decrement(1.0);
        });
    }
}

/// What a peer connection's callbacks need, without keeping the transport alive.
struct Wiring {
    rtc: Weak<Inner>,
    key: SeatKey,
    peer: u64,
    link: LinkId,
    room_tx: mpsc::Sender<RoomCommand>,
    paths: mpsc::Sender<DataPath>,
    heard: Arc<AtomicU64>,
}

impl Wiring {
    /// Wires the client's data channel: its messages go to the room, its opening and closing
    /// to the room WebSocket's task.
    fn attach(&self, dc: Arc<RTCDataChannel>, opened: Arc<std::sync::atomic::AtomicBool>) {
        let Some(rtc) = self.rtc.upgrade() else { return };
        if dc.label() != shared::room::DATA_CHANNEL_LABEL {
            // Only our one channel; another label is a confused or hostile client.
            tokio::spawn(async move { dc.close().await });
            return;
        }
        let config = &rtc.config;
        let bucket = Mutex::new(TokenBucket::new(config.messages_per_second, config.message_burst, Instant::now()));
        let (room_tx, link, heard, started) = (self.room_tx.clone(), self.link, Arc::clone(&self.heard), rtc.started);
        let weak = Weak::clone(&self.rtc);
        dc.on_message(Box::new(move |msg| {
            heard.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
            let allowed = lock(&bucket).take(Instant::now());
            let fits = msg.data.len() <= shared::room::MAX_TO_ROOM_BYTES;
            // Text, oversized or too frequent: dropped and counted, as a lost datagram would be.
            // Frames that do not decode are counted by the room.
            if (msg.is_string
                || !allowed
                || !fits
                || room_tx.try_send(RoomCommand::Frame { link, frame: msg.data }).is_err())
                && let Some(rtc) = weak.upgrade()
            {
                rtc.stats.frames_dropped.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("rallypoint_webrtc_frames_dropped_total").increment(1);
            }
            Box::pin(async {})
        }));
        {
            let (paths, dc2, weak) = (self.paths.clone(), Arc::clone(&dc), Weak::clone(&self.rtc));
            dc.on_open(Box::new(move || {
                opened.store(true, Ordering::Release);
                if let Some(rtc) = weak.upgrade() {
                    rtc.stats.channels_opened.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("rallypoint_webrtc_channels_opened_total").increment(1);
                }
                let _ = paths.try_send(DataPath::Open(dc2));
                Box::pin(async {})
            }));
        }
        let paths = self.paths.clone();
        dc.on_close(Box::new(move || {
            let _ = paths.try_send(DataPath::Closed);
            Box::pin(async {})
        }));
    }
}

/// The room WebSocket's hold on its seat's WebRTC side.
pub struct SeatGuard {
    rtc: Rtc,
    key: SeatKey,
    link: LinkId,
    /// Data-channel openings and closings, for the room WebSocket's task.
    pub events: mpsc::Receiver<DataPath>,
    heard: Arc<AtomicU64>,
}

impl SeatGuard {
    /// When the data channel last brought a message.
    pub fn last_heard(&self) -> Option<Instant> {
        match self.heard.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(self.rtc.0.started + Duration::from_millis(ms)),
        }
    }

    /// Sends a frame that may be lost on the data channel; `false` if the channel is gone.
    /// A channel with too much queued drops the frame (and says `true`: it still works).
    pub async fn send(&self, dc: &RTCDataChannel, frame: &Bytes) -> bool {
        if dc.buffered_amount().await > self.rtc.0.config.max_buffered_bytes {
            self.rtc.0.stats.snapshots_dropped.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        dc.send(frame).await.is_ok()
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
            self.rtc.close_peer(peer);
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
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
