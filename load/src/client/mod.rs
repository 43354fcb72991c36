//! A native Rust client that speaks to a Rallypoint server exactly as the browser does: it
//! fetches the forms, posts them with their CSRF token, keeps the session cookie, and opens the
//! hub WebSocket. Bots, benchmarks and tests use it.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use reqwest::StatusCode;
use reqwest::cookie::CookieStore as _;
use shared::hub::{ChatLine, ClientMsg, PROTOCOL_VERSION, ServerMsg, UserSummary};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};
use url::Url;

mod data_channel;

pub use data_channel::{Conditions, DataChannel};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("bad server URL {0:?}")]
    Url(String),
    #[error("HTTP: {0}")]
    Http(#[from] reqwest::Error),
    #[error("{path} answered {status}: {message}")]
    Refused { path: String, status: StatusCode, message: String },
    #[error("the page {0} has no CSRF token")]
    NoCsrf(String),
    #[error("WebSocket: {0}")]
    Ws(#[from] tungstenite::Error),
    #[error("the server closed the connection ({code}: {reason})")]
    Closed { code: u16, reason: String },
    #[error("unexpected hub message: {0}")]
    Unexpected(String),
    #[error("timed out waiting for the hub")]
    Timeout,
    #[error("WebRTC: {0}")]
    WebRtc(String),
}

impl ClientError {
    /// Whether the connection was lost or the server is going away (come back), rather than
    /// closed for a reason that coming back would not change (a refused ticket, a match over).
    pub fn is_connection_lost(&self) -> bool {
        match self {
            // 1001 going away (a restart), 1006 no close frame, 1011/1012/1013 server trouble.
            Self::Closed { code, .. } => matches!(code, 1001 | 1006 | 1011 | 1012 | 1013),
            Self::Ws(_) | Self::Http(_) | Self::Timeout => true,
            _ => false,
        }
    }
}

/// One user's browser-like session with a server.
pub struct Client {
    http: reqwest::Client,
    jar: Arc<reqwest::cookie::Jar>,
    base: Url,
}

impl Client {
    /// A client for the server at `base`, such as `http://127.0.0.1:8080`.
    pub fn new(base: &str) -> Result<Self, ClientError> {
        let base = Url::parse(base).map_err(|_| ClientError::Url(base.to_owned()))?;
        let jar = Arc::new(reqwest::cookie::Jar::default());
        let http = reqwest::Client::builder()
            .cookie_provider(Arc::clone(&jar))
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(30))
            .build()?;
        Ok(Self { http, jar, base })
    }

    /// A client that already holds a session (for benchmarks, which create sessions directly).
    pub fn with_session(base: &str, token: &str) -> Result<Self, ClientError> {
        let client = Self::new(base)?;
        client.jar.add_cookie_str(&format!("rp_session={token}; Path=/"), &client.base);
        Ok(client)
    }

    pub fn base(&self) -> &Url {
        &self.base
    }

    fn url(&self, path: &str) -> Url {
        self.base.join(path).unwrap_or_else(|_| self.base.clone())
    }

    /// The underlying HTTP client, which carries this session's cookies.
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// Fetches a page and returns the CSRF token of its forms. A page that redirects (the
    /// login form, once signed in) is replaced by the home page, whose log-out form has one.
    pub async fn csrf(&self, path: &str) -> Result<String, ClientError> {
        let mut response = self.http.get(self.url(path)).send().await?;
        if response.status().is_redirection() {
            response = self.http.get(self.url("/")).send().await?;
        }
        let page = response.text().await?;
        csrf_in(&page).ok_or_else(|| ClientError::NoCsrf(path.to_owned()))
    }

    /// Posts a form from `path` with its CSRF token; returns the response.
    pub async fn post_form(&self, path: &str, fields: &[(&str, &str)]) -> Result<reqwest::Response, ClientError> {
        let csrf = self.csrf(path).await?;
        let mut form: Vec<(&str, &str)> = fields.to_vec();
        form.push(("csrf", &csrf));
        Ok(self.http.post(self.url(path)).form(&form).send().await?)
    }

    /// Registers a new account and signs in.
    pub async fn register(&self, username: &str, password: &str) -> Result<(), ClientError> {
        let fields = [("username", username), ("password", password), ("password_confirm", password)];
        expect_redirect("/register", self.post_form("/register", &fields).await?).await
    }

    /// Signs in.
    pub async fn login(&self, username: &str, password: &str) -> Result<(), ClientError> {
        let fields = [("username", username), ("password", password)];
        expect_redirect("/login", self.post_form("/login", &fields).await?).await
    }

    /// Registers the account, or signs in when it exists already. Registering first means a
    /// new account costs no failed login: bots on one machine share one address, and failed
    /// logins are throttled per address.
    pub async fn register_or_login(&self, username: &str, password: &str) -> Result<(), ClientError> {
        match self.register(username, password).await {
            Err(ClientError::Refused { status: StatusCode::CONFLICT, .. }) => self.login(username, password).await,
            other => other,
        }
    }

    /// Signs out.
    pub async fn logout(&self) -> Result<(), ClientError> {
        let csrf = self.csrf("/").await?;
        let response = self.http.post(self.url("/logout")).form(&[("csrf", csrf)]).send().await?;
        expect_redirect("/logout", response).await
    }

    /// The `Cookie` header this client sends to the server.
    pub fn cookie_header(&self) -> Option<String> {
        self.jar.cookies(&self.base).and_then(|v| v.to_str().ok().map(str::to_owned))
    }

    /// The session's token (the `rp_session` cookie), to carry the session to another address
    /// of the same site (another instance of a cluster).
    pub fn session_token(&self) -> Option<String> {
        let cookies = self.cookie_header()?;
        cookies.split("; ").find_map(|c| c.strip_prefix("rp_session=")).map(str::to_owned)
    }

    /// The same session, on the same site at another address.
    pub fn at(&self, base: &str) -> Result<Self, ClientError> {
        let token = self.session_token().ok_or_else(|| ClientError::Url("no session to carry".into()))?;
        Self::with_session(base, &token)
    }

    /// The hub's WebSocket URL.
    pub fn hub_url(&self) -> Url {
        let mut url = self.url("/ws");
        let scheme = if self.base.scheme() == "https" { "wss" } else { "ws" };
        let _ = url.set_scheme(scheme);
        url
    }

    /// Opens the hub WebSocket, says hello and waits for the welcome.
    pub async fn hub(&self) -> Result<Hub, ClientError> {
        Hub::open(self.hub_request()?, None).await
    }

    /// The upgrade request for the hub, with this session's cookie.
    pub fn hub_request(&self) -> Result<tungstenite::handshake::client::Request, ClientError> {
        let mut request = self.hub_url().as_str().into_client_request()?;
        if let Some(cookie) = self.cookie_header().and_then(|c| c.parse().ok()) {
            request.headers_mut().insert("cookie", cookie);
        }
        Ok(request)
    }
}

async fn expect_redirect(path: &str, response: reqwest::Response) -> Result<(), ClientError> {
    let status = response.status();
    if status == StatusCode::SEE_OTHER {
        return Ok(());
    }
    let body = response.text().await.unwrap_or_default();
    Err(ClientError::Refused { path: path.to_owned(), status, message: page_message(&body) })
}

/// The token in a page's `<input type="hidden" name="csrf" value="…">`.
pub fn csrf_in(page: &str) -> Option<String> {
    let at = page.find("name=\"csrf\" value=\"")? + "name=\"csrf\" value=\"".len();
    let len = page[at..].find('"')?;
    Some(page[at..at + len].to_owned())
}

/// The error message a page shows (`class="error"`), or its first paragraph.
pub fn page_message(page: &str) -> String {
    let start = page.find("class=\"error\"").or_else(|| page.find("<p>"));
    start
        .and_then(|s| {
            let rest = &page[s..];
            let open = rest.find('>')? + 1;
            let close = rest[open..].find('<')?;
            Some(rest[open..open + close].trim().to_owned())
        })
        .unwrap_or_default()
}

/// Plain TCP only: the native client speaks to servers over `ws://` (tests, bots, benchmarks).
type Socket = WebSocketStream<TcpStream>;

/// Opens a WebSocket (over `stream` when given, to choose the local address) with small
/// buffers, as a benchmark holding thousands of them needs.
async fn connect(
    request: tungstenite::handshake::client::Request,
    stream: Option<TcpStream>,
) -> Result<Socket, ClientError> {
    let config = tungstenite::protocol::WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(0);
    let stream = match stream {
        Some(stream) => stream,
        None => {
            let uri = request.uri();
            let host = uri.host().ok_or_else(|| ClientError::Url(uri.to_string()))?;
            if uri.scheme_str() != Some("ws") {
                return Err(ClientError::Url(format!("{uri} (the native client speaks ws:// only)")));
            }
            let stream = TcpStream::connect((host.trim_matches(['[', ']']), uri.port_u16().unwrap_or(80)))
                .await
                .map_err(|e| ClientError::Ws(tungstenite::Error::Io(e)))?;
            stream.set_nodelay(true).map_err(|e| ClientError::Ws(tungstenite::Error::Io(e)))?;
            stream
        }
    };
    let (socket, _) = tokio_tungstenite::client_async_with_config(request, stream, Some(config)).await?;
    Ok(socket)
}

/// An open hub connection, past the welcome and the lobby's state that follows it.
pub struct Hub {
    socket: Socket,
    /// The server's welcome message.
    pub welcome: ServerMsg,
    /// Everyone in the lobby when this connection joined, in the order the server listed them.
    pub online: Vec<UserSummary>,
    /// The lobby's recent chat when this connection joined, oldest first.
    pub history: Vec<ChatLine>,
    /// Where the last match found runs, when on a room server ([`Client::room_at`]).
    pub room_url: Option<String>,
}

impl Hub {
    /// Connects (over `stream` when given, to choose the local address), says hello and
    /// waits for the welcome.
    pub async fn open(
        request: tungstenite::handshake::client::Request,
        stream: Option<TcpStream>,
    ) -> Result<Self, ClientError> {
        let socket = connect(request, stream).await?;
        let mut hub = Self {
            socket,
            welcome: ServerMsg::Pong { id: 0 },
            online: Vec::new(),
            history: Vec::new(),
            room_url: None,
        };
        hub.send(&ClientMsg::Hello { version: PROTOCOL_VERSION }).await?;
        let limit = Duration::from_secs(10);
        hub.welcome = hub.recv_timeout(limit).await?;
        let ServerMsg::Welcome { online, history, .. } = hub.welcome else {
            return Err(ClientError::Unexpected(hub.welcome.to_json()));
        };
        while hub.online.len() < online as usize {
            match hub.recv_timeout(limit).await? {
                ServerMsg::Presence { joined, .. } => hub.online.extend(joined),
                other => return Err(ClientError::Unexpected(other.to_json())),
            }
        }
        while hub.history.len() < history as usize {
            match hub.recv_timeout(limit).await? {
                ServerMsg::Chat(line) => hub.history.push(line),
                other => return Err(ClientError::Unexpected(other.to_json())),
            }
        }
        Ok(hub)
    }

    /// The names of [`Self::online`], sorted.
    pub fn online_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.online.iter().map(|u| u.name.clone()).collect();
        names.sort();
        names
    }

    /// Sends a message.
    pub async fn send(&mut self, msg: &ClientMsg) -> Result<(), ClientError> {
        let json = serde_json::to_string(msg).unwrap_or_default();
        Ok(self.socket.send(Message::text(json)).await?)
    }

    /// Sends a raw frame (tests use it for bad input).
    pub async fn send_raw(&mut self, message: Message) -> Result<(), ClientError> {
        Ok(self.socket.send(message).await?)
    }

    /// The next hub message; a close frame becomes [`ClientError::Closed`].
    pub async fn recv(&mut self) -> Result<ServerMsg, ClientError> {
        loop {
            let Some(frame) = self.socket.next().await else {
                return Err(ClientError::Closed { code: 1006, reason: "connection lost".into() });
            };
            match frame? {
                Message::Text(text) => {
                    let msg: ServerMsg = serde_json::from_str(text.as_str())
                        .map_err(|_| ClientError::Unexpected(text.as_str().to_owned()))?;
                    if let ServerMsg::MatchFound { url, .. } = &msg {
                        self.room_url.clone_from(url);
                    }
                    return Ok(msg);
                }
                Message::Close(frame) => {
                    let (code, reason) = close_parts(frame);
                    return Err(ClientError::Closed { code, reason });
                }
                Message::Binary(_) => return Err(ClientError::Unexpected("binary frame".into())),
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
            }
        }
    }

    /// Like [`Self::recv`], giving up after `limit`.
    pub async fn recv_timeout(&mut self, limit: Duration) -> Result<ServerMsg, ClientError> {
        tokio::time::timeout(limit, self.recv()).await.map_err(|_| ClientError::Timeout)?
    }

    /// Waits for a match: the room's name and the seat's ticket.
    pub async fn match_found(&mut self, limit: Duration) -> Result<(String, String), ClientError> {
        self.recv_until(limit, |m| match m {
            ServerMsg::MatchFound { room, ticket, .. } => Some((room, ticket)),
            _ => None,
        })
        .await
    }

    /// Waits for the first message that `pick` accepts, skipping others.
    pub async fn recv_until<T>(
        &mut self,
        limit: Duration,
        mut pick: impl FnMut(ServerMsg) -> Option<T>,
    ) -> Result<T, ClientError> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if let Some(found) = pick(self.recv_timeout(left).await?) {
                return Ok(found);
            }
        }
    }

    /// Sends a WebSocket ping frame and waits for its pong; returns the round-trip time.
    pub async fn ws_ping(&mut self) -> Result<Duration, ClientError> {
        let start = std::time::Instant::now();
        self.socket.send(Message::Ping(Vec::new().into())).await?;
        loop {
            match self.socket.next().await {
                Some(Ok(Message::Pong(_))) => return Ok(start.elapsed()),
                Some(Ok(Message::Close(frame))) => {
                    let (code, reason) = close_parts(frame);
                    return Err(ClientError::Closed { code, reason });
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.into()),
                None => {
                    return Err(ClientError::Closed { code: 1006, reason: "connection lost".into() });
                }
            }
        }
    }

    /// The TCP stream under the WebSocket (tests use it to play a peer that stops answering).
    pub fn into_tcp(self) -> Option<TcpStream> {
        Some(self.socket.into_inner())
    }

    /// Closes the connection politely.
    pub async fn close(mut self) {
        let _ = self.socket.close(None).await;
    }
}

fn close_parts(frame: Option<CloseFrame>) -> (u16, String) {
    frame.map_or((1005, String::new()), |f| (u16::from(f.code), f.reason.as_str().to_owned()))
}

/// A seat in a room, over the room WebSocket, speaking the game `G`'s frames.
pub struct Room<G: shared::game::Game> {
    socket: Socket,
    /// The join answer's details.
    pub seat: u8,
    pub players: Vec<String>,
    pub tick_hz: u16,
    pub rules: G::Rules,
    /// Bytes received so far (frames' payloads).
    pub bytes_in: u64,
    /// Bytes sent so far.
    pub bytes_out: u64,
    /// The WebRTC data channel, once [`Room::open_data_channel`] opened it.
    data: Option<DataChannel>,
    /// The last views received: bases of delta snapshots.
    views: shared::delta::Views<G::View>,
    deltas: (u64, u64),
}

/// A frame from a room.
pub type FromRoom<G> = shared::room::FromRoomOf<G>;

impl Client {
    /// The room WebSocket's upgrade request, with this session's cookie.
    pub fn room_request(&self) -> Result<tungstenite::handshake::client::Request, ClientError> {
        let mut url = self.hub_url();
        url.set_path("/room");
        let mut request = url.as_str().into_client_request()?;
        if let Some(cookie) = self.cookie_header().and_then(|c| c.parse().ok()) {
            request.headers_mut().insert("cookie", cookie);
        }
        Ok(request)
    }

    /// Takes the seat that `ticket` grants.
    pub async fn room<G: shared::game::Game>(&self, ticket: &str) -> Result<Room<G>, ClientError> {
        Room::join(self.room_request()?, None, ticket).await
    }

    /// Takes the seat that `ticket` grants, on the room server at `url` (the match found's;
    /// `None`: this site's own rooms, [`Client::room`]).
    pub async fn room_at<G: shared::game::Game>(
        &self,
        url: Option<&str>,
        ticket: &str,
    ) -> Result<Room<G>, ClientError> {
        match url {
            None => self.room(ticket).await,
            Some(url) => Room::join(remote_room_request(url)?, None, ticket).await,
        }
    }
}

/// A seat taken with its WebRTC data channel ([`Client::seat_with_data_channel`]).
pub struct Seat<G: shared::game::Game> {
    pub room: Room<G>,
    /// From the call to the room's join answer.
    pub seated: Duration,
    /// From the call to the open channel, or why it did not open (the room then plays over its
    /// WebSocket).
    pub channel: Result<Duration, ClientError>,
}

impl Client {
    /// Takes the seat that `ticket` grants in `room` and opens its WebRTC data channel at the
    /// same time, as the browser does: the offer, with the ticket, goes out over `hub` first,
    /// and the channel opens while the room WebSocket joins. Waits at most `limit` for the
    /// channel.
    pub async fn seat_with_data_channel<G: shared::game::Game>(
        &self,
        hub: &mut Hub,
        room: &str,
        ticket: &str,
        limit: Duration,
        conditions: Conditions,
    ) -> Result<Seat<G>, ClientError> {
        let start = std::time::Instant::now();
        let url = hub.room_url.clone();
        let offered = DataChannel::offer(hub, room, Some(ticket)).await;
        let join = async { (self.room_at::<G>(url.as_deref(), ticket).await, start.elapsed()) };
        let open = async {
            let channel = offered?.open(hub, limit, conditions).await?;
            Ok::<_, ClientError>((channel, start.elapsed()))
        };
        let ((joined, seated), opened) = tokio::join!(join, open);
        let mut room = joined?;
        let channel = opened.map(|(channel, took)| {
            room.data = Some(channel);
            took
        });
        Ok(Seat { room, seated, channel })
    }
}

impl<G: shared::game::Game> Room<G> {
    /// Connects (over `stream` when given), presents the ticket and waits for the seat.
    pub async fn join(
        request: tungstenite::handshake::client::Request,
        stream: Option<TcpStream>,
        ticket: &str,
    ) -> Result<Self, ClientError> {
        use shared::room::{JoinRequest, ROOM_PROTOCOL_VERSION};
        let mut socket = connect(request, stream).await?;
        let join = JoinRequest { version: ROOM_PROTOCOL_VERSION, ticket: ticket.to_owned() }.encode();
        let bytes_out = join.len() as u64;
        socket.send(Message::binary(join)).await?;
        let (answer, bytes_in) = tokio::time::timeout(Duration::from_secs(10), read_room_frame::<G>(&mut socket))
            .await
            .map_err(|_| ClientError::Timeout)??;
        match answer {
            shared::room::FromRoom::Joined { seat, players, tick_hz, rules, .. } => Ok(Self {
                socket,
                seat,
                players,
                tick_hz,
                rules,
                bytes_in,
                bytes_out,
                data: None,
                views: shared::delta::Views::default(),
                deltas: (0, 0),
            }),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Sends a message.
    pub async fn send(&mut self, msg: &shared::room::ToRoom<G::Input>) -> Result<(), ClientError> {
        self.send_raw(msg.encode()).await
    }

    /// Sends one WebSocket message as it is on the room connection (tests: pings, text).
    pub async fn send_ws(&mut self, message: Message) -> Result<(), ClientError> {
        Ok(self.socket.send(message).await?)
    }

    /// Sends raw bytes as one frame, on the data channel while it is open (tests use it for
    /// bad input).
    pub async fn send_raw(&mut self, bytes: Vec<u8>) -> Result<(), ClientError> {
        self.bytes_out += bytes.len() as u64;
        if let Some(data) = &mut self.data {
            if !data.send(&bytes) {
                // The channel failed: play goes on over the WebSocket, as in the browser.
                self.data = None;
            }
            return Ok(());
        }
        Ok(self.socket.send(Message::binary(bytes)).await?)
    }

    /// The next frame, from the WebSocket or the data channel; a close of the WebSocket
    /// becomes [`ClientError::Closed`]. A delta snapshot comes as the
    /// [`shared::room::FromRoom::Snapshot`] it stands for; one whose base is gone is skipped,
    /// as the browser does. Cancel-safe.
    pub async fn recv(&mut self) -> Result<FromRoom<G>, ClientError> {
        loop {
            match self.recv_frame().await? {
                shared::room::FromRoom::Snapshot { tick, ack, view } => {
                    self.views.insert(tick, view.clone());
                    return Ok(shared::room::FromRoom::Snapshot { tick, ack, view });
                }
                shared::room::FromRoom::Delta { tick, ack, back, delta } => {
                    if let Some(view) = self.views.patch::<G>(tick, back, &delta) {
                        self.deltas.0 += 1;
                        return Ok(shared::room::FromRoom::Snapshot { tick, ack, view });
                    }
                    self.deltas.1 += 1;
                }
                other => return Ok(other),
            }
        }
    }

    /// The newest tick whose view this client holds: `seen` in the inputs it sends.
    pub fn seen(&self) -> u32 {
        self.views.newest()
    }

    /// Delta snapshots received: how many were applied, and how many were skipped because
    /// their base was gone.
    pub fn deltas(&self) -> (u64, u64) {
        self.deltas
    }

    async fn recv_frame(&mut self) -> Result<FromRoom<G>, ClientError> {
        loop {
            let Some(data) = &mut self.data else {
                let (frame, bytes) = read_room_frame::<G>(&mut self.socket).await?;
                self.bytes_in += bytes;
                return Ok(frame);
            };
            if let Some(frame) = data.take() {
                self.bytes_in += frame.len() as u64;
                return shared::room::FromRoom::decode(&frame)
                    .map_err(|e| ClientError::Unexpected(format!("undecodable data-channel frame: {e}")));
            }
            if data.is_closed() {
                self.data = None;
                continue;
            }
            tokio::select! {
                read = read_room_frame::<G>(&mut self.socket) => {
                    let (frame, bytes) = read?;
                    self.bytes_in += bytes;
                    return Ok(frame);
                }
                () = data.wait() => {}
            }
        }
    }

    /// The open data channel, if any.
    pub fn data_channel(&mut self) -> Option<&mut DataChannel> {
        self.data.as_mut()
    }

    /// Which transport carries snapshots and inputs now: `"webrtc"` or `"websocket"`.
    pub fn transport(&self) -> &'static str {
        if self.data.is_some() { "webrtc" } else { "websocket" }
    }

    /// Opens a WebRTC data channel to this room, negotiated over `hub` (which must stay open:
    /// the server binds the peer connection to it), as the browser does. `room` is the name
    /// from [`ServerMsg::MatchFound`]. Waits at most `limit` for the channel to open.
    pub async fn open_data_channel(&mut self, hub: &mut Hub, room: &str, limit: Duration) -> Result<(), ClientError> {
        self.open_data_channel_through(hub, room, limit, Conditions::default()).await
    }

    /// Like [`Self::open_data_channel`], over a link with these `conditions`.
    pub async fn open_data_channel_through(
        &mut self,
        hub: &mut Hub,
        room: &str,
        limit: Duration,
        conditions: Conditions,
    ) -> Result<(), ClientError> {
        self.data = Some(DataChannel::open(hub, room, limit, conditions).await?);
        Ok(())
    }

    /// Like [`Self::open_data_channel`], with the channel opened in band (DCEP), as older pages
    /// do.
    pub async fn open_data_channel_in_band(
        &mut self,
        hub: &mut Hub,
        room: &str,
        limit: Duration,
    ) -> Result<(), ClientError> {
        let offered = DataChannel::offer_in_band(hub, room, None).await?;
        self.data = Some(offered.open(hub, limit, Conditions::default()).await?);
        Ok(())
    }

    /// Like [`Self::recv`], giving up after `limit`.
    pub async fn recv_timeout(&mut self, limit: Duration) -> Result<FromRoom<G>, ClientError> {
        tokio::time::timeout(limit, self.recv()).await.map_err(|_| ClientError::Timeout)?
    }

    /// Closes the connection (and the peer connection) politely.
    pub async fn close(mut self) {
        if let Some(data) = self.data.take() {
            data.close();
        }
        let _ = self.socket.close(None).await;
    }
}

/// The upgrade request for `/room` on the room server at `url`: no cookie (another site's
/// server sees only the ticket).
pub fn remote_room_request(url: &str) -> Result<tungstenite::handshake::client::Request, ClientError> {
    Ok(shared::room::room_socket_url(url).into_client_request()?)
}

/// Reads the next room frame and its size.
async fn read_room_frame<G: shared::game::Game>(socket: &mut Socket) -> Result<(FromRoom<G>, u64), ClientError> {
    loop {
        let Some(frame) = socket.next().await else {
            return Err(ClientError::Closed { code: 1006, reason: "connection lost".into() });
        };
        match frame? {
            Message::Binary(bytes) => {
                let frame = shared::room::FromRoom::decode(&bytes)
                    .map_err(|e| ClientError::Unexpected(format!("undecodable room frame: {e}")))?;
                return Ok((frame, bytes.len() as u64));
            }
            Message::Close(frame) => {
                let (code, reason) = close_parts(frame);
                return Err(ClientError::Closed { code, reason });
            }
            Message::Text(text) => return Err(ClientError::Unexpected(text.as_str().to_owned())),
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
        }
    }
}
