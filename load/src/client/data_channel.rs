//! The native client's WebRTC data channel, with the same sans-I/O stack as the server (str0m):
//! it offers a peer connection over the hub WebSocket as the browser does, then drives the
//! peer from whoever awaits it (the room's `recv`), with no task of its own. A seeded link
//! conditioner ([`Conditions`]) can delay, jitter, drop and duplicate its datagrams both ways,
//! for tests and bots on a bad network.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use shared::hub::{ClientMsg, ServerMsg};
use str0m::change::SdpAnswer;
use str0m::channel::{ChannelConfig, ChannelId, Reliability};
use str0m::config::{CryptoProvider, DtlsCert};
use str0m::net::{DatagramRecv, Protocol, Receive};
use str0m::{Candidate, Event, IceConnectionState, Input, Output};
use tokio::net::UdpSocket;

use super::{ClientError, Hub};

/// Frames received and not yet read, at most; past it the newest are dropped.
const INBOX: usize = 256;
/// The first retransmission of an ICE check, doubling up to the maximum, which is also how
/// often an open connection checks that the server still answers (as Chromium does, every few
/// seconds; each check costs the server a STUN exchange).
const STUN_RTO: Duration = Duration::from_millis(100);
const STUN_RTO_MAX: Duration = Duration::from_millis(1500);

/// A network to play through: every datagram, both ways, is delayed by `latency` plus up to
/// `jitter` (which reorders them), dropped with probability `loss`, and sent twice with
/// probability `duplicate`; the first `drop_first` of each direction are lost. The same seed
/// gives the same fate to the same sequence.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Conditions {
    pub latency: Duration,
    pub jitter: Duration,
    pub loss: f64,
    pub duplicate: f64,
    pub drop_first: u32,
    pub seed: u64,
}

impl Conditions {
    fn is_perfect(&self) -> bool {
        *self == Self { seed: self.seed, ..Self::default() }
    }
}

/// A datagram held back by a [`Lane`]: when it is due, in what order it came, where it goes.
type Held = Reverse<(Instant, u64, SocketAddr, Vec<u8>)>;

/// Datagrams of one direction on their way through a [`Conditions`] link.
struct Lane {
    conditions: Conditions,
    rng: shared::game::Rng,
    queue: BinaryHeap<Held>,
    order: u64,
    admitted: u64,
}

impl Lane {
    fn new(conditions: Conditions, salt: u64) -> Self {
        Self {
            conditions,
            rng: shared::game::Rng::new(conditions.seed ^ salt),
            queue: BinaryHeap::new(),
            order: 0,
            admitted: 0,
        }
    }

    fn chance(&mut self) -> f64 {
        (self.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn admit(&mut self, now: Instant, addr: SocketAddr, bytes: Vec<u8>) {
        self.admitted += 1;
        if self.chance() < self.conditions.loss || self.admitted <= u64::from(self.conditions.drop_first) {
            return;
        }
        if self.chance() < self.conditions.duplicate {
            self.hold(now, addr, bytes.clone());
        }
        self.hold(now, addr, bytes);
    }

    fn hold(&mut self, now: Instant, addr: SocketAddr, bytes: Vec<u8>) {
        let jitter = self.conditions.jitter.mul_f64(self.chance());
        self.order += 1;
        self.queue.push(Reverse((now + self.conditions.latency + jitter, self.order, addr, bytes)));
    }

    fn next(&self) -> Option<Instant> {
        self.queue.peek().map(|Reverse((at, ..))| *at)
    }

    fn due(&mut self, now: Instant) -> Option<(SocketAddr, Vec<u8>)> {
        if self.next()? > now {
            return None;
        }
        self.queue.pop().map(|Reverse((_, _, addr, bytes))| (addr, bytes))
    }
}

/// An open data channel to a room.
pub struct DataChannel {
    /// Boxed: a peer is ~20 KB, and every future that holds a room would carry it inline.
    rtc: Box<str0m::Rtc>,
    socket: UdpSocket,
    local: SocketAddr,
    server: SocketAddr,
    channel: Option<ChannelId>,
    frames: VecDeque<Vec<u8>>,
    timeout: Instant,
    closed: bool,
    buf: Vec<u8>,
    /// (outgoing, incoming), when the link is conditioned.
    lanes: Option<Box<(Lane, Lane)>>,
}

/// One crypto provider for every native peer of the process.
fn crypto() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    Arc::clone(PROVIDER.get_or_init(|| Arc::new(str0m::crypto::from_feature_flags())))
}

/// One DTLS certificate for every native peer of the process (a key pair each would be most
/// of what a bot spends to open a channel; the server pins nothing but the fingerprint in the
/// offer).
fn certificate() -> Option<DtlsCert> {
    static CERT: OnceLock<Option<DtlsCert>> = OnceLock::new();
    CERT.get_or_init(|| crypto().dtls_provider.generate_certificate()).clone()
}

/// A peer connection offered for a room, waiting for the server's answer.
pub struct Offered {
    rtc: Box<str0m::Rtc>,
    pending: str0m::change::SdpPendingOffer,
    room: String,
}

impl DataChannel {
    /// Offers a peer connection for `room` over `hub` (which must stay open: the server binds
    /// the peer to it) and waits at most `limit` for the channel to open.
    pub async fn open(hub: &mut Hub, room: &str, limit: Duration, conditions: Conditions) -> Result<Self, ClientError> {
        Self::offer(hub, room, None).await?.open(hub, limit, conditions).await
    }

    /// Sends the offer of a peer connection for `room` over `hub`: with the seat's `ticket`,
    /// before the room WebSocket has joined (as the browser does); without, after. Its channel
    /// is pre-negotiated, as the browser's is.
    pub async fn offer(hub: &mut Hub, room: &str, ticket: Option<&str>) -> Result<Offered, ClientError> {
        Self::offer_with(hub, room, ticket, true).await
    }

    /// Like [`Self::offer`], with the channel opened in band (DCEP), as older pages do.
    pub async fn offer_in_band(hub: &mut Hub, room: &str, ticket: Option<&str>) -> Result<Offered, ClientError> {
        Self::offer_with(hub, room, ticket, false).await
    }

    async fn offer_with(
        hub: &mut Hub,
        room: &str,
        ticket: Option<&str>,
        negotiated: bool,
    ) -> Result<Offered, ClientError> {
        let mut config = str0m::RtcConfig::new().clear_codecs().clear_extension_map().set_crypto_provider(crypto());
        if let Some(cert) = certificate() {
            config = config.set_dtls_cert(cert);
        }
        // As a browser does: a lost check is tried again soon (str0m's defaults, 250 ms doubling
        // to 3 s, took ~10 s to get through three lost checks and three lost answers; these
        // take ~1.5 s through two of each).
        config.set_initial_stun_rto(STUN_RTO);
        config.set_max_stun_rto(STUN_RTO_MAX);
        let mut rtc = Box::new(config.build(Instant::now()));
        let mut change = rtc.sdp_api();
        change.add_channel_with_config(ChannelConfig {
            label: shared::room::DATA_CHANNEL_LABEL.to_owned(),
            ordered: false,
            reliability: Reliability::MaxRetransmits { retransmits: 0 },
            negotiated: negotiated.then_some(shared::room::DATA_CHANNEL_ID),
            ..ChannelConfig::default()
        });
        let (offer, pending) = change.apply().ok_or_else(|| ClientError::WebRtc("no offer to make".into()))?;
        let ticket = ticket.map(str::to_owned);
        let sdp = offer.to_sdp_string();
        hub.send(&ClientMsg::RtcOffer { room: room.to_owned(), sdp, ticket, negotiated }).await?;
        Ok(Offered { rtc, pending, room: room.to_owned() })
    }
}

impl Offered {
    /// Waits at most `limit` for the server's answer over `hub`, then for the channel to open.
    pub async fn open(
        self,
        hub: &mut Hub,
        limit: Duration,
        conditions: Conditions,
    ) -> Result<DataChannel, ClientError> {
        let rtc_error = |e: &dyn std::fmt::Display| ClientError::WebRtc(e.to_string());
        let Self { mut rtc, pending, room } = self;
        let room = room.as_str();
        let answer = hub
            .recv_until(limit, |m| match m {
                ServerMsg::RtcAnswer { room: r, sdp } if r == room => Some(Ok(sdp)),
                ServerMsg::Error { code: shared::hub::ErrorCode::Rtc, message } => Some(Err(message)),
                _ => None,
            })
            .await?
            .map_err(ClientError::WebRtc)?;
        // The server does not trickle: its answer names its one candidate. Send from the
        // address the system routes to it from.
        let server = answer
            .lines()
            .filter_map(|l| l.trim().strip_prefix("a="))
            .filter_map(|c| Candidate::from_sdp_string(c).ok())
            .map(|c| c.addr())
            .next()
            .ok_or_else(|| ClientError::WebRtc("the answer has no candidate".into()))?;
        let socket = UdpSocket::bind((route_from(server)?, 0)).await.map_err(|e| rtc_error(&e))?;
        let local = socket.local_addr().map_err(|e| rtc_error(&e))?;
        rtc.add_local_candidate(Candidate::host(local, "udp").map_err(|e| rtc_error(&e))?);
        let answer = SdpAnswer::from_sdp_string(&answer).map_err(|e| rtc_error(&e))?;
        rtc.sdp_api().accept_answer(pending, answer).map_err(|e| rtc_error(&e))?;
        let lanes = (!conditions.is_perfect())
            .then(|| Box::new((Lane::new(conditions, 0x6f75_7467), Lane::new(conditions, 0x0069_6e63))));
        let mut dc = DataChannel {
            rtc,
            socket,
            local,
            server,
            channel: None,
            frames: VecDeque::new(),
            timeout: Instant::now(),
            closed: false,
            buf: vec![0; 2048],
            lanes,
        };
        dc.pump(Instant::now());
        let opened = tokio::time::timeout(limit, async {
            while dc.channel.is_none() {
                if dc.closed {
                    return Err(ClientError::WebRtc("the peer connection closed before the channel opened".into()));
                }
                dc.wait().await;
            }
            Ok(())
        })
        .await;
        match opened {
            Ok(Ok(())) => Ok(dc),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(ClientError::Timeout),
        }
    }
}

impl DataChannel {
    /// Sends one message; `false` when the channel is gone.
    pub fn send(&mut self, bytes: &[u8]) -> bool {
        let written = match self.channel.and_then(|cid| self.rtc.channel(cid)) {
            Some(mut channel) => channel.write(true, bytes).is_ok(),
            None => false,
        };
        self.pump(Instant::now());
        written && !self.closed
    }

    /// Sends `bytes` to the server as one datagram from this peer's own address, outside the
    /// peer connection (tests use it for bad input).
    pub fn send_datagram(&self, bytes: &[u8]) -> std::io::Result<usize> {
        socket2::SockRef::from(&self.socket).send_to(bytes, &self.server.into())
    }

    /// A message received and not yet taken.
    pub fn take(&mut self) -> Option<Vec<u8>> {
        self.frames.pop_front()
    }

    /// Whether the peer connection ended.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Waits for the next datagram or timer and handles it. Cancel-safe: nothing is lost when
    /// the future is dropped (a datagram is read whole or not at all).
    pub async fn wait(&mut self) {
        let wake = self.wake_at();
        let got = tokio::select! {
            got = self.socket.recv_from(&mut self.buf) => got.ok(),
            () = tokio::time::sleep_until(wake.into()) => None,
        };
        let now = Instant::now();
        if let Some((n, source)) = got {
            let bytes = self.buf[..n].to_vec();
            match &mut self.lanes {
                Some(lanes) => lanes.1.admit(now, source, bytes),
                None => self.input(now, source, &bytes),
            }
        }
        self.tick(now);
    }

    /// Closes the peer connection, telling the server.
    pub fn close(mut self) {
        let _ = self.rtc.close();
        self.pump(Instant::now());
    }

    fn wake_at(&self) -> Instant {
        let lanes = self.lanes.as_ref().and_then(|l| [l.0.next(), l.1.next()].into_iter().flatten().min());
        lanes.map_or(self.timeout, |at| at.min(self.timeout))
    }

    fn tick(&mut self, now: Instant) {
        while let Some((addr, bytes)) = self.lanes.as_mut().and_then(|l| l.0.due(now)) {
            send_to(&self.socket, &bytes, addr);
        }
        while let Some((source, bytes)) = self.lanes.as_mut().and_then(|l| l.1.due(now)) {
            self.input(now, source, &bytes);
        }
        if now >= self.timeout && self.rtc.handle_input(Input::Timeout(now)).is_err() {
            self.closed = true;
        }
        self.pump(now);
    }

    fn input(&mut self, now: Instant, source: SocketAddr, bytes: &[u8]) {
        let Ok(contents) = DatagramRecv::try_from(bytes) else { return };
        let input = Input::Receive(now, Receive { proto: Protocol::Udp, source, destination: self.local, contents });
        // A datagram the peer refuses is dropped; a broken connection shows in `pump`.
        let _ = self.rtc.handle_input(input);
        self.pump(now);
    }

    /// Takes what the peer has to say: datagrams to send, events, its next timeout.
    fn pump(&mut self, now: Instant) {
        loop {
            match self.rtc.poll_output() {
                Ok(Output::Transmit(t)) => match &mut self.lanes {
                    Some(lanes) => lanes.0.admit(now, t.destination, t.contents.into()),
                    None => send_to(&self.socket, &t.contents, t.destination),
                },
                Ok(Output::Timeout(at)) => {
                    self.timeout = at;
                    return;
                }
                Ok(Output::Event(event)) => match event {
                    Event::ChannelOpen(cid, _) => self.channel = Some(cid),
                    Event::ChannelData(data) if self.frames.len() < INBOX => self.frames.push_back(data.data),
                    Event::ChannelClose(_)
                    | Event::Closed
                    | Event::IceConnectionStateChange(IceConnectionState::Disconnected) => self.closed = true,
                    _ => {}
                },
                Err(_) => {
                    self.closed = true;
                    self.timeout = now + Duration::from_hours(1);
                    return;
                }
            }
        }
    }
}

/// Sends one datagram now. Not tokio's `try_send_to`: on a socket whose writability the reactor
/// has not reported yet (a new one) it refuses without trying, which lost every first ICE check
/// and cost each handshake one retransmission timeout. A full socket buffer drops the datagram,
/// as the network would.
fn send_to(socket: &UdpSocket, bytes: &[u8], to: SocketAddr) {
    let _ = socket2::SockRef::from(socket).send_to(bytes, &to.into());
}

/// The local address the system would send to `server` from (no packet is sent).
fn route_from(server: SocketAddr) -> Result<IpAddr, ClientError> {
    let any: SocketAddr =
        if server.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { (std::net::Ipv6Addr::UNSPECIFIED, 0).into() };
    std::net::UdpSocket::bind(any)
        .and_then(|s| {
            s.connect(server)?;
            s.local_addr()
        })
        .map(|a| a.ip())
        .map_err(|e| ClientError::WebRtc(format!("no route to the server's candidate {server}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_conditioned_lane_drops_delays_and_duplicates_as_seeded() {
        let conditions = Conditions {
            latency: Duration::from_millis(50),
            jitter: Duration::from_millis(20),
            loss: 0.1,
            duplicate: 0.05,
            drop_first: 0,
            seed: 7,
        };
        let run = || {
            let mut lane = Lane::new(conditions, 1);
            let (start, addr) = (Instant::now(), SocketAddr::from(([127, 0, 0, 1], 9)));
            for i in 0..1000u32 {
                lane.admit(start, addr, i.to_le_bytes().to_vec());
            }
            assert!(lane.due(start + Duration::from_millis(49)).is_none(), "nothing before the latency");
            let mut out = Vec::new();
            while let Some((_, bytes)) = lane.due(start + Duration::from_millis(71)) {
                out.push(u32::from_le_bytes(bytes.try_into().unwrap()));
            }
            out
        };
        let out = run();
        assert_eq!(out, run(), "the same seed gives the same fate");
        let mut unique = out.clone();
        unique.sort_unstable();
        unique.dedup();
        assert!((850..=950).contains(&unique.len()), "about 10% lost: {} arrived", unique.len());
        assert!(out.len() > unique.len(), "some duplicated");
        assert!(out.windows(2).any(|w| w[0] > w[1]), "jitter reorders");
    }
}
