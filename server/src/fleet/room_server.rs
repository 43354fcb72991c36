//! `rallypoint room-server`: a process that hosts rooms for a hub. It registers over a control
//! connection (a WebSocket to the hub, or in a cluster a session over its NATS), takes the matches the hub places on it, admits players at its own `/room` by
//! ticket alone (and only from the site's pages), and reports each result until the hub
//! acknowledges it, keeping it on disk meanwhile. It keeps playing when it loses the hub and
//! registers again when the hub is back. SIGTERM drains it: no new matches, the running ones
//! finish (within `--drain-timeout`), then it exits.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use axum::Extension;
use axum::Router;
use axum::extract::State;
use axum::extract::ws::WebSocketUpgrade;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use clap::Args;
use futures_util::{SinkExt as _, StreamExt as _};
use shared::room::RatingChange;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::{self, Message};

use super::control::nats::{self, Down, Registration};
use super::control::{self, CONTROL_VERSION, FromHub, FromServer, Running, Signed};
use super::outbox::Outbox;
use crate::config::Limits;
use crate::rooms::{RoomConfig, RoomEvent, RoomId, Rooms, Seated, TicketVerifier};
use crate::transport::direct::Direct;
use crate::transport::webrtc::{Offer, Rtc, RtcConfig};

#[derive(Debug, Args)]
pub struct RoomServerArgs {
    /// The hub's address, as players reach it (`https://play.example.com`).
    #[arg(long, env = "RALLYPOINT_HUB", value_name = "URL")]
    pub hub: String,

    /// PEM certificates to trust for an https hub besides the system's (a private CA, or a
    /// hub's self-signed certificate).
    #[arg(long, env = "RALLYPOINT_HUB_CA", value_name = "FILE")]
    pub hub_ca: Option<PathBuf>,

    /// This server's token, from `rallypoint room-token create` on the hub's host.
    #[arg(long, env = "RALLYPOINT_ROOM_SERVER_TOKEN", value_name = "TOKEN", hide_env_values = true)]
    pub token: String,

    /// Register through the cluster's NATS server (`nats://nats.internal:4222`) instead of a
    /// WebSocket to --hub: any hub instance takes the registration, and another one when that
    /// one goes. For the operator's own room servers on the cluster's network; --hub still
    /// names the site.
    #[arg(long, env = "RALLYPOINT_NATS_URL", value_name = "URL")]
    pub nats_url: Option<String>,

    /// Address and port where players' room WebSockets arrive.
    #[arg(long, env = "RALLYPOINT_LISTEN", default_value = "127.0.0.1:9000", value_name = "ADDR:PORT")]
    pub listen: SocketAddr,

    /// How browsers reach --listen (`https://r1.example.com:9000`), told to the hub.
    #[arg(long, env = "RALLYPOINT_PUBLIC_URL", value_name = "URL")]
    pub public_url: String,

    /// Most matches playing here at once.
    #[arg(long, env = "RALLYPOINT_CAPACITY", default_value_t = 100, value_name = "ROOMS")]
    pub capacity: usize,

    /// Folder for results not yet acknowledged by the hub.
    #[arg(long, env = "RALLYPOINT_DATA_DIR", default_value = "./data/room-server", value_name = "DIR")]
    pub data_dir: PathBuf,

    /// On SIGTERM, how long running matches may take to finish before the server exits anyway.
    #[arg(long, env = "RALLYPOINT_DRAIN_TIMEOUT", default_value_t = 600, value_name = "SECONDS")]
    pub drain_timeout: u64,

    /// Serve Prometheus metrics at `/metrics` on this address (off by default; keep it private),
    /// labelled with `instance` = its --public-url.
    #[arg(long, env = "RALLYPOINT_METRICS_LISTEN", value_name = "ADDR:PORT")]
    pub metrics_listen: Option<SocketAddr>,

    /// UDP address and port for WebRTC peers. Default: the address and port of --listen.
    #[arg(long, env = "RALLYPOINT_WEBRTC_LISTEN", value_name = "ADDR:PORT")]
    pub webrtc_listen: Option<SocketAddr>,

    /// The IP address browsers reach the WebRTC port at (behind NAT or in a container).
    #[arg(long, env = "RALLYPOINT_PUBLIC_IP", value_name = "IP")]
    pub public_ip: Option<std::net::IpAddr>,

    /// Log filter, for example `info`.
    #[arg(long, env = "RALLYPOINT_LOG", default_value = "info", value_name = "FILTER")]
    pub log: String,
}

/// The checked settings.
struct Settings {
    control: tungstenite::handshake::client::Request,
    /// TLS to an https hub.
    tls: Option<tokio_tungstenite::Connector>,
    /// The hub's origin: what browsers' `Origin` is, unless the hub names its site's.
    hub_origin: String,
    public_url: String,
    capacity: usize,
    token: String,
    nats_url: Option<String>,
}

fn check(args: &RoomServerArgs) -> anyhow::Result<Settings> {
    let hub = url::Url::parse(&args.hub).ok().filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some());
    let Some(hub) = hub else { bail!("--hub {:?} must be the hub's http(s):// address", args.hub) };
    let tls = if hub.scheme() == "https" { Some(tls_to_hub(args.hub_ca.as_deref())?) } else { None };
    let public = url::Url::parse(&args.public_url)
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some() && u.path() == "/");
    let Some(public) = public else {
        bail!("--public-url {:?} must be http(s)://host[:port], how browsers reach --listen", args.public_url)
    };
    if args.capacity == 0 || args.capacity > 100_000 {
        bail!("--capacity must be between 1 and 100000 rooms");
    }
    if args.token.is_empty() || args.token.len() > 100 || !args.token.is_ascii() {
        bail!("--token must be the token `rallypoint room-token create` printed");
    }
    if let Some(url) = &args.nats_url
        && (url.is_empty() || url.len() > control::MAX_URL || url.contains(char::is_whitespace))
    {
        bail!("--nats-url {url:?} must be the NATS server's address, such as nats://nats.internal:4222");
    }
    let mut control = hub.join(control::PATH)?;
    let _ = control.set_scheme(if tls.is_some() { "wss" } else { "ws" });
    let mut request = control.as_str().into_client_request()?;
    let bearer = format!("Bearer {}", args.token).parse().context("--token has characters a header cannot carry")?;
    request.headers_mut().insert(header::AUTHORIZATION, bearer);
    Ok(Settings {
        control: request,
        tls,
        hub_origin: hub.origin().ascii_serialization(),
        public_url: public.origin().ascii_serialization(),
        capacity: args.capacity,
        token: args.token.clone(),
        nats_url: args.nats_url.clone(),
    })
}

/// TLS for the control connection: the system's roots and `--hub-ca`'s certificates.
fn tls_to_hub(extra: Option<&std::path::Path>) -> anyhow::Result<tokio_tungstenite::Connector> {
    use tokio_rustls::rustls::pki_types::CertificateDer;
    use tokio_rustls::rustls::pki_types::pem::PemObject as _;
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    if let Some(path) = extra {
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(Iterator::collect::<Result<Vec<_>, _>>)
            .with_context(|| format!("--hub-ca {}: cannot read PEM certificates", path.display()))?;
        if certs.is_empty() {
            bail!("--hub-ca {}: no certificate in it", path.display());
        }
        for cert in certs {
            roots.add(cert).with_context(|| format!("--hub-ca {}: not a usable certificate", path.display()))?;
        }
    }
    if roots.is_empty() {
        bail!("no trusted certificates for an https hub: install ca-certificates, or pass --hub-ca");
    }
    let config = tokio_rustls::rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    Ok(tokio_tungstenite::Connector::Rustls(Arc::new(config)))
}

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// What the hub said when it accepted the registration.
struct Welcome {
    server: u32,
    key: TicketVerifier,
    site_origin: String,
    rooms: RoomConfig,
}

/// The control connection to the hub (one per process: its size does not matter).
#[allow(clippy::large_enum_variant)]
enum Control {
    Ws(Socket),
    Nats(NatsControl),
}

/// A control session over NATS (see [`control::nats`]).
struct NatsControl {
    client: async_nats::Client,
    /// Where to publish.
    up: String,
    /// What the hub instance holding this session says.
    down: async_nats::Subscriber,
    /// When its instance counts as gone, unless heard from.
    silent_at: Instant,
}

impl Control {
    /// Sends `msg`; `false` when the connection is lost.
    async fn send(&mut self, msg: &FromServer) -> bool {
        match self {
            Self::Ws(s) => {
                let sent = tokio::time::timeout(Duration::from_secs(5), s.send(Message::text(msg.to_json()))).await;
                matches!(sent, Ok(Ok(())))
            }
            Self::Nats(n) => n.client.publish(n.up.clone(), msg.to_json().into()).await.is_ok(),
        }
    }

    /// The next message from the hub; `None` when the connection ended, went silent or broke
    /// the protocol.
    async fn next(&mut self) -> Option<FromHub> {
        let n = match self {
            Self::Ws(s) => return next_frame(s).await,
            Self::Nats(n) => n,
        };
        loop {
            let Ok(message) = tokio::time::timeout_at(n.silent_at, n.down.next()).await else {
                tracing::warn!("the hub instance holding this server went silent");
                return None;
            };
            let message = message?;
            n.silent_at = Instant::now() + control::SILENCE;
            let down = (message.payload.len() <= control::MAX_MESSAGE)
                .then(|| serde_json::from_slice::<Down>(&message.payload).ok())
                .flatten();
            match down {
                Some(Down::Msg { msg }) => return Some(msg),
                Some(Down::Beat) => {}
                Some(Down::Close { code, reason }) => {
                    tracing::warn!(code, reason, "the hub closed the control session");
                    return None;
                }
                None => {
                    tracing::error!("unreadable message from the hub");
                    return None;
                }
            }
        }
    }
}

/// Connects and registers; `Err` with a sentence for the operator.
async fn register(
    settings: &Settings,
    nats: Option<&async_nats::Client>,
    free: u32,
    running: Vec<Running>,
) -> Result<(Control, Welcome), String> {
    let register = FromServer::Register {
        control_version: CONTROL_VERSION,
        room_protocol: shared::room::ROOM_PROTOCOL_VERSION,
        public_url: settings.public_url.clone(),
        free,
        running,
        registered_ms: crate::db::unix_now_ms(),
    };
    let (control, welcome) = match nats {
        Some(client) => register_nats(settings, client, register).await?,
        None => register_ws(settings, register).await?,
    };
    welcome_of(settings, welcome).map(|welcome| (control, welcome))
}

/// Registers over NATS: a request that one hub instance answers.
async fn register_nats(
    settings: &Settings,
    client: &async_nats::Client,
    register: FromServer,
) -> Result<(Control, Option<FromHub>), String> {
    let session = crate::random::u64();
    let down = client.subscribe(nats::down(session)).await.map_err(|e| format!("cannot use NATS: {e}"))?;
    let request = Registration { token: settings.token.clone(), session, register };
    let request = serde_json::to_vec(&request).expect("a registration serializes");
    // Short: NATS may still hand the request to an instance whose host died (until it notices),
    // and the next attempt likely reaches a live one.
    let answer = tokio::time::timeout(nats::ANSWER_WITHIN, client.request(nats::REGISTER, request.into())).await;
    let answer = match answer {
        Err(_) => return Err("no hub instance answered the registration over NATS in time".into()),
        Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => {
            return Err(
                "no hub instance listens on NATS (are the hubs started with --nats-url, on this NATS server?)".into()
            );
        }
        Ok(Err(e)) => return Err(format!("cannot register over NATS: {e}")),
        Ok(Ok(answer)) => answer,
    };
    let welcome = match serde_json::from_slice::<Down>(&answer.payload) {
        Ok(Down::Msg { msg }) => Some(msg),
        Ok(Down::Close { reason, .. }) => return Err(format!("the hub refused: {reason}")),
        _ => None,
    };
    let up = nats::up(session);
    let silent_at = Instant::now() + control::SILENCE;
    Ok((Control::Nats(NatsControl { client: client.clone(), up, down, silent_at }), welcome))
}

/// Registers over a WebSocket to the hub.
async fn register_ws(settings: &Settings, register: FromServer) -> Result<(Control, Option<FromHub>), String> {
    let config = tungstenite::protocol::WebSocketConfig::default().max_message_size(Some(control::MAX_MESSAGE));
    let request = settings.control.clone();
    let (mut socket, _) =
        tokio_tungstenite::connect_async_tls_with_config(request, Some(config), true, settings.tls.clone())
            .await
            .map_err(|e| match e {
                tungstenite::Error::Http(r) if r.status() == 401 => {
                    "the hub refused this token (wrong or revoked)".to_owned()
                }
                e => format!("cannot reach the hub: {e}"),
            })?;
    socket.send(Message::text(register.to_json())).await.map_err(|e| format!("the hub went away: {e}"))?;
    let answer = tokio::time::timeout(Duration::from_secs(10), socket.next()).await;
    let welcome = match answer {
        Ok(Some(Ok(Message::Text(text)))) => serde_json::from_str::<FromHub>(text.as_str()).ok(),
        Ok(Some(Ok(Message::Close(Some(frame))))) => return Err(format!("the hub refused: {}", frame.reason)),
        _ => None,
    };
    Ok((Control::Ws(socket), welcome))
}

/// What the hub's answer to a registration says.
fn welcome_of(settings: &Settings, welcome: Option<FromHub>) -> Result<Welcome, String> {
    let Some(FromHub::Welcome { server, ticket_key, site_origin, tick_hz, time_limit_secs, ticket_ttl_ms }) = welcome
    else {
        return Err("the hub did not answer the registration".into());
    };
    let key = URL_SAFE_NO_PAD
        .decode(&ticket_key)
        .ok()
        .and_then(|k| <[u8; 32]>::try_from(k).ok())
        .ok_or("the hub sent a malformed ticket key")?;
    let rooms = RoomConfig {
        tick_hz,
        time_limit_secs,
        ticket_ttl: Duration::from_millis(ticket_ttl_ms),
        ..RoomConfig::default()
    };
    let site_origin = site_origin.unwrap_or_else(|| settings.hub_origin.clone());
    Ok(Welcome { server, key: TicketVerifier::from_bytes(key), site_origin, rooms })
}

/// Runs until drained after `shutdown` (SIGTERM).
pub async fn run(args: &RoomServerArgs, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
    let settings = check(args)?;
    let mut outbox = Outbox::open(&args.data_dir.join("results"))
        .with_context(|| format!("cannot use the data folder {}", args.data_dir.display()))?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {} (choose another with --listen)", args.listen))?;
    let nats = match &settings.nats_url {
        Some(url) => Some(
            async_nats::ConnectOptions::new()
                .name(&args.public_url)
                .connection_timeout(Duration::from_secs(5))
                .connect(url.as_str())
                .await
                .with_context(|| format!("cannot reach NATS at {url}"))?,
        ),
        None => None,
    };
    // The first registration: a hub that refuses the token or the version stops us here.
    let (control, welcome) = register(&settings, nats.as_ref(), settings.capacity as u32, Vec::new())
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    let through = if nats.is_some() { "NATS" } else { "WebSocket" };
    tracing::info!(server = welcome.server, hub = %settings.hub_origin, through, "registered with the hub");
    if let Some(addr) = args.metrics_listen {
        crate::metrics_endpoint::serve(addr, &args.public_url)
            .await
            .with_context(|| format!("cannot serve metrics on {addr} (choose another with --metrics-listen)"))?;
    }
    let rtc_config = RtcConfig { listen: args.webrtc_listen, public_ip: args.public_ip, ..RtcConfig::default() };
    let rtc = Rtc::bind(rtc_config, args.listen)?;
    let (events_tx, events) = mpsc::channel(1024);
    let rooms_config = RoomConfig { max_rooms: settings.capacity, ..welcome.rooms.clone() };
    let rooms = Rooms::new::<shared::arena::Arena>(
        rooms_config,
        (welcome.key.clone(), welcome.server),
        events_tx,
        Arc::new(rtc.clone()),
    );
    let door = Door {
        rooms: rooms.clone(),
        rtc: rtc.clone(),
        site_origin: welcome.site_origin.clone(),
        limits: Arc::default(),
    };
    let router = Router::new()
        .route("/room", get(room_socket))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(Arc::new(door));
    let (stop_http, http_stopped) = oneshot::channel::<()>();
    let limits = Limits::default();
    let http = tokio::spawn(crate::http::serve(listener, router, 50_000, limits.http_header_timeout, None, async {
        let _ = http_stopped.await;
    }));
    let mut server = Server {
        settings: &settings,
        nats,
        rooms: rooms.clone(),
        rtc,
        key: welcome.key,
        id: welcome.server,
        matches: HashMap::new(),
        ratings: HashMap::new(),
        draining: None,
        drain_timeout: Duration::from_secs(args.drain_timeout),
    };
    for result in outbox.pending() {
        tracing::info!(result = ?result_id(result), "a result from before is still to be delivered");
    }
    server.serve(Some(control), events, &mut outbox, shutdown).await;
    rooms.shutdown();
    let _ = stop_http.send(());
    let _ = http.await;
    if !outbox.is_empty() {
        tracing::warn!(results = outbox.len(), folder = %args.data_dir.display(), "results not acknowledged yet stay on disk for the next start");
    }
    Ok(())
}

fn result_id(msg: &FromServer) -> Option<String> {
    match msg {
        FromServer::Finished { assignment, .. } => Some(assignment.body.chars().take(40).collect()),
        _ => None,
    }
}

/// How often results the hub has not acknowledged are sent again.
const RESEND_EVERY: Duration = Duration::from_secs(10);

/// The control side of a running room server.
struct Server<'a> {
    settings: &'a Settings,
    /// The cluster's NATS, when registering through it.
    nats: Option<async_nats::Client>,
    rooms: Rooms,
    rtc: Rtc,
    key: TicketVerifier,
    id: u32,
    /// Matches playing, by room: the assignment and its match id.
    matches: HashMap<RoomId, (Signed, u64)>,
    /// Rooms waiting to show their players the rating changes, by match id.
    ratings: HashMap<u64, oneshot::Sender<Vec<RatingChange>>>,
    /// Since when the server drains (SIGTERM).
    draining: Option<Instant>,
    drain_timeout: Duration,
}

impl Server<'_> {
    fn free(&self) -> u32 {
        if self.draining.is_some() { 0 } else { self.rooms.free() as u32 }
    }

    fn running(&self) -> Vec<Running> {
        self.matches
            .iter()
            .map(|(room, (assignment, _))| Running {
                assignment: assignment.clone(),
                slot: room.slot,
                number: room.number,
            })
            .collect()
    }

    async fn serve(
        &mut self,
        mut socket: Option<Control>,
        mut events: mpsc::Receiver<RoomEvent>,
        outbox: &mut Outbox,
        shutdown: impl Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        let mut heartbeat = tokio::time::interval(control::HEARTBEAT);
        // Results the hub has not acknowledged (it could not write them yet) go again.
        let mut again = tokio::time::interval(RESEND_EVERY);
        again.reset();
        let mut retry_wait = Duration::from_millis(250);
        let mut retry_at = Instant::now();
        let mut resend = true;
        loop {
            if let Some(since) = self.draining {
                let done = self.matches.is_empty() && outbox.is_empty();
                if done || since.elapsed() > self.drain_timeout + Duration::from_secs(10) {
                    return;
                }
            }
            if resend {
                // Results not acknowledged: again, after every (re)registration and now and then.
                let pending: Vec<FromServer> = outbox.pending().cloned().collect();
                for result in &pending {
                    self.send(&mut socket, result).await;
                }
                resend = false;
            }
            let connected = socket.is_some();
            tokio::select! {
                () = &mut shutdown, if self.draining.is_none() => {
                    tracing::info!(matches = self.matches.len(), "draining: no new matches; the running ones finish");
                    self.draining = Some(Instant::now());
                    self.send(&mut socket, &FromServer::Load { free: 0, draining: true }).await;
                }
                event = events.recv() => {
                    let Some(event) = event else { return };
                    if let Some(msg) = self.room_event(event, outbox) {
                        self.send(&mut socket, &msg).await;
                    }
                }
                msg = next(&mut socket), if connected => match msg {
                    Some(msg) => {
                        if let Some(answer) = self.on_hub_message(msg, outbox) {
                            self.send(&mut socket, &answer).await;
                        }
                    }
                    None => {
                        tracing::warn!("lost the hub; matches go on, results wait on disk");
                        socket = None;
                        retry_at = Instant::now() + retry_wait;
                    }
                },
                () = tokio::time::sleep_until(retry_at), if !connected => {
                    match register(self.settings, self.nats.as_ref(), self.free(), self.running()).await {
                        Ok((s, welcome)) => {
                            if welcome.key != self.key || welcome.server != self.id {
                                tracing::error!("the hub's key or this server's id changed: restart this room server");
                            }
                            tracing::info!("registered with the hub again");
                            socket = Some(s);
                            resend = true;
                            retry_wait = Duration::from_millis(250);
                        }
                        Err(e) => {
                            tracing::warn!("{e}; trying again");
                            let jitter = 0.5 + f64::from(rand_below(1000)) / 2000.0;
                            retry_at = Instant::now() + retry_wait.mul_f64(jitter);
                            retry_wait = (retry_wait * 2).min(Duration::from_secs(5));
                        }
                    }
                }
                _ = again.tick(), if connected && !outbox.is_empty() => resend = true,
                _ = heartbeat.tick(), if connected => {
                    let load = FromServer::Load { free: self.free(), draining: self.draining.is_some() };
                    self.send(&mut socket, &load).await;
                }
            }
        }
    }

    async fn send(&self, socket: &mut Option<Control>, msg: &FromServer) {
        if let Some(s) = socket
            && !s.send(msg).await
        {
            tracing::warn!("lost the hub while sending");
            *socket = None;
        }
    }

    /// A room's event, as the message for the hub.
    fn room_event(&mut self, event: RoomEvent, outbox: &mut Outbox) -> Option<FromServer> {
        match event {
            RoomEvent::Finished { room, outcome, reply, .. } => {
                let (assignment, match_id) = self.matches.remove(&room)?;
                let msg = FromServer::Finished { assignment, outcome };
                if let Err(e) = outbox.keep(match_id, msg.clone()) {
                    tracing::error!(match_id, error = %e, "cannot keep a result on disk; sending it anyway");
                }
                self.ratings.insert(match_id, reply);
                Some(msg)
            }
            RoomEvent::SeatReleased { room, user_id } => {
                let match_id = self.matches.get(&room)?.1;
                Some(FromServer::SeatReleased { match_id, user_id })
            }
            RoomEvent::Cancelled { room, .. } => {
                let (_, match_id) = self.matches.remove(&room)?;
                Some(FromServer::Cancelled { match_id })
            }
            RoomEvent::Crashed { room, .. } => {
                let (_, match_id) = self.matches.remove(&room)?;
                Some(FromServer::Crashed { match_id })
            }
        }
    }

    /// A message from the hub, and the answer to it.
    fn on_hub_message(&mut self, msg: FromHub, outbox: &mut Outbox) -> Option<FromServer> {
        match msg {
            FromHub::Start { assignment } => {
                let Some(a) = assignment.open(&self.key).filter(|a| a.server == self.id) else {
                    tracing::warn!("an assignment this hub did not sign, or for another server: ignored");
                    return None;
                };
                let mode = self.rooms.mode(&a.mode);
                let launched = match mode {
                    Some(mode) if self.draining.is_none() => {
                        let players: Vec<Seated> = a.players.iter().map(Seated::from).collect();
                        self.rooms.launch(mode, players, a.seed).ok()
                    }
                    _ => None,
                };
                let Some(room) = launched else { return Some(FromServer::Full { match_id: a.match_id }) };
                self.matches.insert(room, (assignment, a.match_id));
                Some(FromServer::Started { match_id: a.match_id, slot: room.slot, number: room.number })
            }
            FromHub::Recorded { match_id, ratings } => {
                outbox.acknowledged(match_id);
                if let Some(reply) = self.ratings.remove(&match_id) {
                    let _ = reply.send(ratings);
                }
                None
            }
            FromHub::RtcOffer { user_id, signaling, room, sdp, ticket, negotiated } => {
                let offer = Offer { sdp: &sdp, ticket: ticket.as_deref(), negotiated };
                Some(match self.rtc.offer(user_id, signaling, &room, offer, &self.rooms) {
                    Ok(sdp) => FromServer::RtcAnswer { user_id, signaling, sdp },
                    Err(e) => FromServer::RtcRefused { user_id, signaling, reason: e.to_string() },
                })
            }
            FromHub::RtcCandidate { user_id, signaling, room, candidate } => {
                let refused = self.rtc.candidate(user_id, signaling, &room, &candidate).err();
                refused.map(|e| FromServer::RtcRefused { user_id, signaling, reason: e.to_string() })
            }
            FromHub::RtcClosed { signaling } => {
                self.rtc.signaling_closed(signaling);
                None
            }
            FromHub::Welcome { .. } => None,
        }
    }
}

/// The next message from the hub; `None` when the connection ended or broke the protocol.
async fn next(control: &mut Option<Control>) -> Option<FromHub> {
    control.as_mut()?.next().await
}

/// The next message on the control WebSocket.
async fn next_frame(s: &mut Socket) -> Option<FromHub> {
    loop {
        match tokio::time::timeout(control::SILENCE * 2, s.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => match serde_json::from_str(text.as_str()) {
                Ok(msg) => return Some(msg),
                Err(e) => {
                    tracing::error!(error = %e, "unreadable message from the hub");
                    return None;
                }
            },
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)))) => {}
            Ok(Some(Ok(Message::Close(frame)))) => {
                if let Some(frame) = frame {
                    tracing::warn!(code = u16::from(frame.code), reason = %frame.reason, "the hub closed the control connection");
                }
                return None;
            }
            _ => return None,
        }
    }
}

fn rand_below(n: u32) -> u32 {
    let mut b = [0u8; 4];
    crate::random::fill(&mut b);
    u32::from_le_bytes(b) % n
}

/// The players' door: `/room`, by ticket alone, only from the site's pages.
struct Door {
    rooms: Rooms,
    rtc: Rtc,
    site_origin: String,
    limits: Arc<Limits>,
}

async fn room_socket(
    State(door): State<Arc<Door>>,
    headers: HeaderMap,
    direct: Option<Extension<Direct>>,
    upgrade: WebSocketUpgrade,
) -> Response {
    // Browsers always send an Origin: only the site's pages may open a room here. Native
    // clients send none and are judged by their ticket, like everyone.
    if let Some(origin) = headers.get(header::ORIGIN)
        && !origin.to_str().is_ok_and(|o| o.eq_ignore_ascii_case(&door.site_origin))
    {
        return (StatusCode::FORBIDDEN, "rooms here are for the site's pages only\n").into_response();
    }
    let (rooms, rtc, limits) = (door.rooms.clone(), door.rtc.clone(), Arc::clone(&door.limits));
    // As the hub's own door: small buffers (a room frame is small), written at once.
    upgrade
        .read_buffer_size(1024)
        .write_buffer_size(0)
        .max_message_size(shared::room::MAX_TO_ROOM_BYTES)
        .max_frame_size(shared::room::MAX_TO_ROOM_BYTES)
        .on_upgrade(move |socket| {
            crate::transport::ws::serve(socket, direct.map(|Extension(d)| d), rooms, rtc, None, limits)
        })
}
