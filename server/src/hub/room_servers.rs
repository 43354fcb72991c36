//! The hub's end of room servers' control connections: a WebSocket at [`control::PATH`] (a
//! bearer token checked before the upgrade), or in a cluster a session over NATS
//! ([`control::nats`]: the token in the registration request). Then the same for both: a
//! registration checked for versions, heartbeats, match answers and results. Results are
//! recorded here (once per match id) and acknowledged; the hub's task hears of everything else.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use tokio::sync::{mpsc, oneshot};
use tokio::time::timeout;

use crate::App;
use crate::fleet::control::nats::{self, Down, Registration};
use crate::fleet::control::{self, CONTROL_VERSION, FromHub, FromServer, close};
use crate::fleet::tokens::{self, RoomServer};
use crate::hub::results::{self, Finished, Source};
use crate::hub::{Hub, ServerUp};
use crate::rooms::Seated;
use crate::transport::ws;

/// How often a connected room server's token is checked again (a revoked one is dropped).
const RECHECK_TOKEN: Duration = Duration::from_secs(5);

/// `GET /room-servers`: 401 without a valid token, else the control WebSocket.
pub async fn socket(State(app): State<Arc<App>>, headers: HeaderMap, upgrade: WebSocketUpgrade) -> Response {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let server = match tokens::authenticate(&app.db, token).await {
        Ok(Some(server)) => server,
        Ok(None) => {
            tracing::warn!("a room server presented an unknown or revoked token");
            return (StatusCode::UNAUTHORIZED, "unknown or revoked room-server token\n").into_response();
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot check a room-server token");
            return (StatusCode::SERVICE_UNAVAILABLE, "database unavailable\n").into_response();
        }
    };
    upgrade
        .max_message_size(control::MAX_MESSAGE)
        .max_frame_size(control::MAX_MESSAGE)
        .on_upgrade(move |socket| serve_socket(socket, app, server))
}

/// A control connection: a WebSocket, or a session over NATS.
enum Link {
    Ws(WebSocket),
    Nats(NatsLink),
}

/// One room server's session over NATS.
struct NatsLink {
    client: async_nats::Client,
    /// What the room server publishes.
    up: async_nats::Subscriber,
    /// Where to publish to it.
    down: String,
    /// Where the welcome goes: the registration request's reply subject.
    reply: Option<async_nats::Subject>,
    /// Says [`Down::Beat`] every [`nats::BEAT`] while the session lasts.
    beat: tokio::task::AbortHandle,
}

impl NatsLink {
    fn new(client: async_nats::Client, up: async_nats::Subscriber, session: u64, reply: async_nats::Subject) -> Self {
        let down = nats::down(session);
        let beat = {
            let (client, down) = (client.clone(), down.clone());
            let beat = bytes::Bytes::from(Down::Beat.to_json());
            tokio::spawn(async move {
                let mut every = tokio::time::interval(nats::BEAT);
                loop {
                    every.tick().await;
                    let _ = client.publish(down.clone(), beat.clone()).await;
                }
            })
            .abort_handle()
        };
        Self { client, up, down, reply: Some(reply), beat }
    }

    /// Like [`recv`].
    async fn recv(&mut self) -> Result<Option<FromServer>, (u16, String)> {
        use futures_util::StreamExt as _;
        let Some(message) = self.up.next().await else { return Ok(None) };
        if message.payload.len() > control::MAX_MESSAGE {
            return Err((close::TOO_BIG, "message too big".into()));
        }
        serde_json::from_slice(&message.payload)
            .map(Some)
            .map_err(|e| (close::POLICY, format!("unreadable control message: {e}")))
    }

    /// Publishes `down` to the room server: the first answer to the registration request's
    /// reply subject, the rest to the session's own; `false` when NATS is gone.
    async fn publish(&mut self, down: &Down) -> bool {
        let to = self.reply.take().unwrap_or_else(|| self.down.clone().into());
        self.client.publish(to, down.to_json().into()).await.is_ok()
    }
}

impl Drop for NatsLink {
    fn drop(&mut self) {
        self.beat.abort();
    }
}

impl Link {
    /// The next message, parsed; `Err` with a close frame for a breach, `Ok(None)` when gone.
    async fn recv(&mut self) -> Result<Option<FromServer>, (u16, String)> {
        match self {
            Self::Ws(socket) => recv(socket).await,
            Self::Nats(link) => link.recv().await,
        }
    }

    async fn send(&mut self, msg: &FromHub) -> bool {
        match self {
            Self::Ws(socket) => send(socket, msg).await,
            Self::Nats(link) => link.publish(&Down::Msg { msg: msg.clone() }).await,
        }
    }

    async fn close(self, code: u16, reason: &str) {
        match self {
            Self::Ws(socket) => ws::close_with(socket, code, reason).await,
            Self::Nats(mut link) => {
                link.publish(&Down::Close { code, reason: reason.to_owned() }).await;
            }
        }
    }
}

/// Takes room servers' registrations over NATS (in the queue group every instance shares), a
/// task per session, until aborted.
pub async fn listen_nats(app: Arc<App>, client: async_nats::Client) {
    use futures_util::StreamExt as _;
    let mut requests = match client.queue_subscribe(nats::REGISTER, nats::HUBS.into()).await {
        Ok(requests) => requests,
        Err(e) => return tracing::error!(error = %e, "cannot take room servers' registrations over NATS"),
    };
    while let Some(request) = requests.next().await {
        if let Some(reply) = request.reply {
            tokio::spawn(serve_nats(Arc::clone(&app), client.clone(), request.payload, reply));
        }
    }
}

/// A registration over NATS: the token, then the session.
async fn serve_nats(app: Arc<App>, client: async_nats::Client, payload: bytes::Bytes, reply: async_nats::Subject) {
    let refuse = |code: u16, reason: &str| {
        let answer = Down::Close { code, reason: reason.to_owned() }.to_json();
        let (client, reply) = (client.clone(), reply.clone());
        async move {
            let _ = client.publish(reply, answer.into()).await;
        }
    };
    let registration = (payload.len() <= control::MAX_MESSAGE)
        .then(|| serde_json::from_slice::<Registration>(&payload).ok())
        .flatten();
    let Some(registration) = registration else {
        tracing::warn!(bytes = payload.len(), "an unreadable room-server registration over NATS");
        return refuse(close::POLICY, "unreadable registration").await;
    };
    let server = match tokens::authenticate(&app.db, &registration.token).await {
        Ok(Some(server)) => server,
        Ok(None) => {
            tracing::warn!("a room server presented an unknown or revoked token");
            return refuse(close::REVOKED, "unknown or revoked room-server token").await;
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot check a room-server token");
            return refuse(1011, "database unavailable").await;
        }
    };
    let up = match client.subscribe(nats::up(registration.session)).await {
        Ok(up) => up,
        Err(e) => return tracing::warn!(error = %e, "cannot listen to a room server over NATS"),
    };
    let link = NatsLink::new(client.clone(), up, registration.session, reply);
    serve(Link::Nats(link), app, server, registration.register).await;
}

/// How long one message to a room server may take to write.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

async fn send(socket: &mut WebSocket, msg: &FromHub) -> bool {
    ws::write(socket, Message::text(msg.to_json()), WRITE_TIMEOUT).await
}

/// The next message, parsed; `Err` with a close frame for a breach, `Ok(None)` when gone.
async fn recv(socket: &mut WebSocket) -> Result<Option<FromServer>, (u16, String)> {
    loop {
        return match socket.recv().await {
            None | Some(Ok(Message::Close(_))) => Ok(None),
            Some(Err(e)) => match ws::read_error_code(e) {
                Some(code) => Err((code, "message too big".into())),
                None => Ok(None),
            },
            Some(Ok(Message::Text(text))) => serde_json::from_str(text.as_str())
                .map(Some)
                .map_err(|e| (close::POLICY, format!("unreadable control message: {e}"))),
            Some(Ok(Message::Binary(_))) => Err((close::POLICY, "control messages are JSON text".into())),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
        };
    }
}

/// A registration, checked.
struct Checked {
    /// The origin browsers reach it at.
    url: String,
    free: u32,
    running: Vec<control::Running>,
    registered_ms: i64,
}

/// Checks a registration: the versions, and a URL browsers can reach.
fn check_registration(msg: FromServer) -> Result<Checked, (u16, String)> {
    let FromServer::Register { control_version, room_protocol, public_url, free, running, registered_ms } = msg else {
        return Err((close::POLICY, "the first message must be a registration".into()));
    };
    if control_version != CONTROL_VERSION || room_protocol != shared::room::ROOM_PROTOCOL_VERSION {
        return Err((
            close::VERSION,
            format!(
                "this hub speaks control protocol {CONTROL_VERSION} and room protocol {}, the room server {control_version} and {room_protocol}: run the same release on both",
                shared::room::ROOM_PROTOCOL_VERSION
            ),
        ));
    }
    let origin = url::Url::parse(&public_url)
        .ok()
        .filter(|u| public_url.len() <= control::MAX_URL && matches!(u.scheme(), "http" | "https"))
        .filter(|u| u.host().is_some() && u.path() == "/" && u.query().is_none() && u.username().is_empty())
        .map(|u| u.origin().ascii_serialization());
    let Some(url) = origin else {
        return Err((close::POLICY, format!("public URL {public_url:?} must be http(s)://host[:port]")));
    };
    if running.len() > control::MAX_RUNNING {
        return Err((close::POLICY, "too many running matches".into()));
    }
    Ok(Checked { url, free, running, registered_ms })
}

async fn serve_socket(mut socket: WebSocket, app: Arc<App>, server: RoomServer) {
    let first = match timeout(Duration::from_secs(10), recv(&mut socket)).await {
        Ok(Ok(Some(msg))) => msg,
        Ok(Err((code, reason))) => return ws::close_with(socket, code, &reason).await,
        _ => return,
    };
    serve(Link::Ws(socket), app, server, first).await;
}

/// A room server's control session, from its registration (`first`) on.
async fn serve(mut link: Link, app: Arc<App>, server: RoomServer, first: FromServer) {
    let hub = app.hub.clone();
    let Checked { url, free, running, registered_ms } = match check_registration(first) {
        Ok(registered) => registered,
        Err((code, reason)) => {
            tracing::warn!(server = server.name, "room server refused: {reason}");
            return link.close(code, &reason).await;
        }
    };
    let Ok(id) = u32::try_from(server.id) else { return };
    let _ = tokens::remember_url(&app.db, server.id, &url).await;
    app.hub.add_room_origin(&url);
    let (outbox_tx, mut outbox) = mpsc::channel(1024);
    let (reply, generation) = oneshot::channel();
    let up = ServerUp {
        server: id,
        name: server.name.clone(),
        community: server.community,
        url,
        free,
        running,
        registered_ms,
        outbox: outbox_tx,
        reply,
    };
    if hub.server_up(up).await.is_err() {
        return link.close(1001, "the hub is stopping").await;
    }
    let Ok(generation) = generation.await else { return };
    let config = &app.config.rooms;
    let welcome = FromHub::Welcome {
        server: id,
        ticket_key: URL_SAFE_NO_PAD.encode(hub.signer().verifier().to_bytes()),
        site_origin: app.config.public_origin.clone(),
        tick_hz: config.tick_hz,
        time_limit_secs: config.time_limit_secs,
        ticket_ttl_ms: config.ticket_ttl.as_millis() as u64,
    };
    let end = if link.send(&welcome).await {
        control_loop(&mut link, &app, &server, id, generation, &mut outbox).await
    } else {
        None
    };
    hub.server_down(id, generation).await;
    if let Some((code, reason)) = end {
        link.close(code, &reason).await;
    }
}

async fn control_loop(
    link: &mut Link,
    app: &App,
    server: &RoomServer,
    id: u32,
    generation: u64,
    outbox: &mut mpsc::Receiver<FromHub>,
) -> Option<(u16, String)> {
    let hub = &app.hub;
    let mut recheck = tokio::time::interval(RECHECK_TOKEN);
    recheck.reset();
    // A deadline, not a timeout per read: what the hub sends meanwhile must not extend it.
    let mut silent_at = tokio::time::Instant::now() + control::SILENCE;
    loop {
        tokio::select! {
            msg = tokio::time::timeout_at(silent_at, link.recv()) => {
                let msg = match msg {
                    Err(_) => return Some((close::SILENT, "nothing heard for too long".into())),
                    Ok(Err(breach)) => return Some(breach),
                    Ok(Ok(None)) => return None,
                    Ok(Ok(Some(msg))) => msg,
                };
                silent_at = tokio::time::Instant::now() + control::SILENCE;
                match msg {
                    FromServer::Register { .. } => return Some((close::POLICY, "registered twice".into())),
                    FromServer::Finished { assignment, outcome } => {
                        let recorded = record(app, server, id, &assignment, &outcome).await;
                        match recorded {
                            Ok((match_id, ratings)) => {
                                let _ = hub.server_finished(id, match_id).await;
                                if !link.send(&FromHub::Recorded { match_id, ratings }).await {
                                    return None;
                                }
                            }
                            Err(Refused::Breach(reason)) => return Some((close::POLICY, reason)),
                            // Not acknowledged: the room server sends it again later.
                            Err(Refused::Later(e)) => tracing::warn!(server = server.name, error = %e, "could not record a room server's result"),
                        }
                    }
                    other => {
                        if hub.from_server(id, generation, other).await.is_err() {
                            return Some((1001, "the hub is stopping".into()));
                        }
                    }
                }
            }
            out = outbox.recv() => match out {
                Some(msg) => {
                    if !link.send(&msg).await {
                        return None;
                    }
                }
                // The hub let go of this registration: it stops, or another connection replaced it.
                None if hub.is_stopped() => return Some((1001, "the hub is stopping".into())),
                None => return Some((close::REPLACED, "another connection registered as this server".into())),
            },
            _ = recheck.tick() => {
                if matches!(tokens::is_active(&app.db, server.id).await, Ok(false)) {
                    tracing::warn!(server = server.name, "room server's token revoked: disconnected");
                    return Some((close::REVOKED, "this room server's token was revoked".into()));
                }
            }
        }
    }
}

enum Refused {
    /// The message breaks the protocol: the connection is closed.
    Breach(String),
    /// The database failed: try again later.
    Later(sqlx::Error),
}

/// Records a room server's result, once per match id: official only from an official server.
async fn record(
    app: &App,
    server: &RoomServer,
    id: u32,
    assignment: &control::Signed,
    outcome: &shared::game::Outcome,
) -> Result<(u64, Vec<shared::room::RatingChange>), Refused> {
    let hub: &Hub = &app.hub;
    let a = assignment
        .open(hub.signer().verifier())
        .ok_or_else(|| Refused::Breach("a result for an assignment this hub did not sign".into()))?;
    if a.server != id {
        return Err(Refused::Breach("a result for another server's match".into()));
    }
    let mode = hub.rooms().mode(&a.mode).ok_or_else(|| Refused::Breach(format!("no mode {:?}", a.mode)))?;
    let n = a.players.len();
    if outcome.ranks.len() != n
        || outcome.scores.len() != n
        || outcome.ranks.iter().any(|&r| r == 0 || usize::from(r) > n)
    {
        return Err(Refused::Breach("an outcome that does not fit its players".into()));
    }
    let players: Vec<Seated> = a.players.iter().map(Seated::from).collect();
    let source = Source { server: Some(&server.name), official: !server.community, match_id: Some(a.match_id) };
    let label = format!("{}/{}", server.name, a.match_id);
    let ratings =
        results::record(&app.db, &Finished { room: &label, mode: mode.name, players: &players, outcome, source })
            .await
            .map_err(Refused::Later)?;
    tracing::info!(
        server = server.name,
        match_id = a.match_id,
        official = !server.community,
        "room server's result recorded"
    );
    Ok((a.match_id, ratings))
}
