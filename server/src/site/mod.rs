//! The site: server-rendered pages and forms, the static files, and the hub WebSocket's door.
//!
//! Handlers are thin: they check the request, call `accounts` or `hub`, and render a page.
//! Errors become responses in one place, [`AppError`].

pub mod caps;
pub mod csrf;
mod error;
mod pages;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use axum_extra::extract::CookieJar;
use axum_extra::extract::cookie::{Cookie, SameSite};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::services::ServeDir;
use tower_http::timeout::TimeoutLayer;

use crate::App;
use crate::accounts::{LoginError, NewSession, RegisterError, Session};
use crate::hub::results;
use crate::transport::direct::Direct;
pub use error::AppError;
use pages::{AccountPage, AuthPage, HomePage, Layout, LeaderboardPage, Pager, PlayPage, ProfilePage};

type AppState = State<Arc<App>>;

/// The whole HTTP surface of the server.
pub fn router(app: Arc<App>) -> Router {
    let limits = &app.config.limits;
    let static_files = ServeDir::new(&app.config.static_dir)
        .precompressed_br()
        .precompressed_gzip()
        .append_index_html_on_directories(false);
    // The WebSocket route stays outside the request timeout: an upgraded socket lives on.
    let pages = Router::new()
        .route("/", get(home))
        .route("/register", get(register_form).post(register))
        .route("/login", get(login_form).post(login))
        .route("/logout", post(logout))
        .route("/play", get(play))
        .route("/account", get(account))
        .route("/account/end-other-sessions", post(end_other_sessions))
        .route("/u/{name}", get(profile))
        .route("/leaderboard", get(leaderboard))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .nest_service("/static", static_files)
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(Arc::clone(&app), refuse_cross_site_posts))
        .layer(RequestBodyLimitLayer::new(limits.http_body_bytes))
        .layer(TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, limits.http_request_timeout));
    Router::new()
        .route("/ws", get(hub_socket))
        .route("/room", get(room_socket))
        .route(crate::fleet::control::PATH, get(crate::hub::room_servers::socket))
        .merge(pages)
        .layer(middleware::from_fn_with_state(Arc::clone(&app), security_headers))
        .with_state(app)
}

/// Headers that every response carries.
async fn security_headers(State(app): AppState, request: Request, next: Next) -> Response {
    let is_static = request.uri().path().starts_with("/static/");
    let mut response = next.run(request).await;
    let h = response.headers_mut();
    let set = |h: &mut HeaderMap, name: &'static str, value: &'static str| {
        h.entry(name).or_insert(HeaderValue::from_static(value));
    };
    // Pages may open WebSockets to their own site and to the room servers it places matches on.
    let rooms = app.hub.room_origins();
    let csp = format!(
        "default-src 'self'; script-src 'self' 'wasm-unsafe-eval'; style-src 'self'; img-src 'self' data:; \
         connect-src 'self'{}{rooms}; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
        if rooms.is_empty() { "" } else { " " }
    );
    if let Ok(csp) = HeaderValue::from_str(&csp) {
        h.entry("content-security-policy").or_insert(csp);
    }
    set(h, "x-content-type-options", "nosniff");
    set(h, "referrer-policy", "same-origin");
    set(h, "x-frame-options", "DENY");
    // Static files are revalidated on every load (cheap 304s), so a new build is never mixed
    // with an old one; pages are never cached, since they depend on the session.
    set(h, "cache-control", if is_static { "no-cache" } else { "no-store" });
    response
}

/// Refuses any non-GET request whose Origin is another site's (see [`csrf::same_origin`]).
async fn refuse_cross_site_posts(State(app): AppState, request: Request, next: Next) -> Response {
    let safe = matches!(*request.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if safe || csrf::same_origin(&app.config, request.headers()) {
        next.run(request).await
    } else {
        AppError::Forbidden("This form was sent from another site.").into_response()
    }
}

/// The session named by the request's cookie, if it is live.
pub struct MaybeSession(pub Option<Session>);

impl FromRequestParts<Arc<App>> for MaybeSession {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> Result<Self, AppError> {
        let jar = CookieJar::from_headers(&parts.headers);
        let Some(token) = jar.get(session_cookie(&app.config)).map(Cookie::value) else {
            return Ok(Self(None));
        };
        Ok(Self(app.accounts.session(token).await?))
    }
}

/// A posted form whose CSRF token matches the cookie's: a handler that takes one cannot forget
/// the check. A body that does not parse is [`AppError::BadForm`]; a token that does not match
/// is [`AppError::Csrf`].
pub(crate) struct CheckedForm<T>(T);

/// A form that carries the CSRF token.
pub(crate) trait WithCsrf {
    fn csrf(&self) -> &str;
}

impl<T: DeserializeOwned + WithCsrf> FromRequest<Arc<App>> for CheckedForm<T> {
    type Rejection = AppError;

    async fn from_request(request: Request, app: &Arc<App>) -> Result<Self, AppError> {
        let jar = CookieJar::from_headers(request.headers());
        let axum::Form(form) = axum::Form::<T>::from_request(request, app).await.map_err(|_| AppError::BadForm)?;
        if !csrf::verify(&app.config, &jar, form.csrf()) {
            return Err(AppError::Csrf);
        }
        Ok(Self(form))
    }
}

fn session_cookie(config: &crate::config::Config) -> &'static str {
    if config.secure_cookies { "__Host-rp_session" } else { "rp_session" }
}

/// The session cookie's attributes, with `value`.
fn session_cookie_with(config: &crate::config::Config, value: String) -> Cookie<'static> {
    Cookie::build((session_cookie(config), value))
        .path("/")
        .http_only(true)
        .secure(config.secure_cookies)
        .same_site(SameSite::Lax)
        .build()
}

/// The client's address: the socket's peer, or the proxy's word when configured to trust it.
fn client_ip(app: &App, headers: &HeaderMap, peer: SocketAddr) -> IpAddr {
    if app.config.trust_forwarded_for {
        let forwarded = headers.get_all("x-forwarded-for").iter().next_back();
        if let Some(ip) = forwarded
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.rsplit(',').next())
            .and_then(|v| v.trim().parse().ok())
        {
            return ip;
        }
    }
    peer.ip()
}

fn layout(app: &App, jar: CookieJar, session: Option<&Session>) -> (CookieJar, Layout) {
    let (jar, csrf) = csrf::ensure(&app.config, jar);
    (jar, Layout { user: session.map(|s| s.user.name.clone()), csrf })
}

async fn home(State(app): AppState, jar: CookieJar, MaybeSession(session): MaybeSession) -> Response {
    let (jar, layout) = layout(&app, jar, session.as_ref());
    (jar, HomePage { layout }).into_response()
}

/// A register or login form as posted. Missing fields read as empty, so that a broken form
/// gets the same clear message as an empty one.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct AuthForm {
    username: String,
    password: String,
    password_confirm: String,
    csrf: String,
}

impl WithCsrf for AuthForm {
    fn csrf(&self) -> &str {
        &self.csrf
    }
}

async fn register_form(State(app): AppState, jar: CookieJar, MaybeSession(s): MaybeSession) -> Response {
    if s.is_some() {
        return Redirect::to("/play").into_response();
    }
    let (jar, layout) = layout(&app, jar, None);
    (jar, AuthPage::register(layout, "", None)).into_response()
}

async fn login_form(State(app): AppState, jar: CookieJar, MaybeSession(s): MaybeSession) -> Response {
    if s.is_some() {
        return Redirect::to("/play").into_response();
    }
    let (jar, layout) = layout(&app, jar, None);
    (jar, AuthPage::login(layout, "", None)).into_response()
}

async fn register(
    State(app): AppState,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    jar: CookieJar,
    CheckedForm(form): CheckedForm<AuthForm>,
) -> Result<Response, AppError> {
    let ip = client_ip(&app, &headers, peer);
    let error = match app.accounts.register(&form.username, &form.password, &form.password_confirm, ip).await {
        Ok(new) => return Ok(signed_in(&app, jar, new).await),
        Err(RegisterError::Db(e)) => return Err(e.into()),
        Err(RegisterError::Busy(_)) => return Err(AppError::Busy),
        Err(e) => e,
    };
    let status = match error {
        RegisterError::Taken => StatusCode::CONFLICT,
        RegisterError::Throttled { .. } => StatusCode::TOO_MANY_REQUESTS,
        _ => StatusCode::UNPROCESSABLE_ENTITY,
    };
    let (jar, layout) = layout(&app, jar, None);
    let mut response =
        (status, jar, AuthPage::register(layout, &form.username, Some(error.to_string()))).into_response();
    if let RegisterError::Throttled { retry_after } = error {
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(retry_after.as_secs().max(1)));
    }
    Ok(response)
}

async fn login(
    State(app): AppState,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    jar: CookieJar,
    CheckedForm(form): CheckedForm<AuthForm>,
) -> Result<Response, AppError> {
    let ip = client_ip(&app, &headers, peer);
    let (status, retry_after, message) = match app.accounts.login(&form.username, &form.password, ip).await {
        Ok(new) => return Ok(signed_in(&app, jar, new).await),
        Err(LoginError::Db(e)) => return Err(e.into()),
        Err(LoginError::Busy(_)) => return Err(AppError::Busy),
        Err(e @ LoginError::Throttled { retry_after }) => {
            (StatusCode::TOO_MANY_REQUESTS, Some(retry_after.as_secs().max(1)), e.to_string())
        }
        Err(e) => (StatusCode::UNAUTHORIZED, None, e.to_string()),
    };
    let (jar, layout) = layout(&app, jar, None);
    let mut response = (status, jar, AuthPage::login(layout, &form.username, Some(message))).into_response();
    if let Some(secs) = retry_after {
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    Ok(response)
}

/// Sets the new session's cookie, ends the session the browser held before (a new id on every
/// login), and sends the user to the lobby.
async fn signed_in(app: &App, jar: CookieJar, new: NewSession) -> Response {
    let name = session_cookie(&app.config);
    if let Some(old) = jar.get(name).map(Cookie::value)
        && let Ok(Some(old)) = app.accounts.session(old).await
    {
        let _ = app.accounts.end_session(old.key).await;
        let _ = app.hub.end_sessions(vec![old.key]).await;
    }
    let mut cookie = session_cookie_with(&app.config, new.token);
    cookie.set_max_age(time_duration(new.max_age));
    (jar.add(cookie), Redirect::to("/play")).into_response()
}

fn time_duration(d: std::time::Duration) -> time::Duration {
    time::Duration::seconds(d.as_secs() as i64)
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct CsrfForm {
    csrf: String,
}

impl WithCsrf for CsrfForm {
    fn csrf(&self) -> &str {
        &self.csrf
    }
}

async fn logout(
    State(app): AppState,
    jar: CookieJar,
    MaybeSession(session): MaybeSession,
    _: CheckedForm<CsrfForm>,
) -> Result<Response, AppError> {
    if let Some(session) = session {
        app.accounts.end_session(session.key).await?;
        let _ = app.hub.end_sessions(vec![session.key]).await;
    }
    // The clearing cookie carries the same attributes as the one it replaces: a browser ignores
    // a `__Host-` cookie without `Secure`, and would keep the dead one.
    let gone = session_cookie_with(&app.config, String::new());
    Ok((jar.remove(gone), Redirect::to("/")).into_response())
}

async fn play(State(app): AppState, jar: CookieJar, MaybeSession(session): MaybeSession) -> Response {
    let Some(session) = session else {
        return Redirect::to("/login").into_response();
    };
    let (jar, layout) = layout(&app, jar, Some(&session));
    (jar, PlayPage { layout, modes: app.hub.rooms().modes() }).into_response()
}

/// `?page=N` (1 when absent or not a number) and `?mode=NAME`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct PageQuery {
    page: Option<String>,
    mode: Option<String>,
}

impl PageQuery {
    pub(crate) fn page(&self) -> u32 {
        self.page.as_deref().and_then(|p| p.parse().ok()).filter(|&p| (1..=100_000).contains(&p)).unwrap_or(1)
    }
}

/// Rows shown per page of history and of the leaderboard.
const PER_PAGE: u32 = 25;

async fn profile(
    State(app): AppState,
    jar: CookieJar,
    MaybeSession(session): MaybeSession,
    axum::extract::Path(name): axum::extract::Path<String>,
    query: Result<axum::extract::Query<PageQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, AppError> {
    let query = query.map(|q| q.0).unwrap_or_default();
    let user = if crate::accounts::valid_username(&name) { app.accounts.user_by_name(&name).await? } else { None };
    let Some(user) = user else { return Err(AppError::NotFound) };
    let page = query.page();
    let mut history = results::history(&app.db, user.id, page, PER_PAGE).await?;
    let pager = Pager::new(page, &mut history, PER_PAGE);
    let standings = results::standings_of(&app.db, user.id).await?;
    let (jar, layout) = layout(&app, jar, session.as_ref());
    let page = ProfilePage::new(layout, user.name, &standings, &history, pager, app.hub.rooms().modes());
    Ok((jar, page).into_response())
}

async fn leaderboard(
    State(app): AppState,
    jar: CookieJar,
    MaybeSession(session): MaybeSession,
    query: Result<axum::extract::Query<PageQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, AppError> {
    let query = query.map(|q| q.0).unwrap_or_default();
    let modes = app.hub.rooms().modes();
    let mode = query.mode.as_deref().and_then(|m| app.hub.rooms().mode(m)).unwrap_or(&modes[0]);
    let page = query.page();
    let mut rows = results::leaderboard(&app.db, mode.name, page, PER_PAGE).await?;
    let pager = Pager::new(page, &mut rows, PER_PAGE);
    let (jar, layout) = layout(&app, jar, session.as_ref());
    Ok((jar, LeaderboardPage::new(layout, modes, mode, &rows, pager)).into_response())
}

async fn account(
    State(app): AppState,
    jar: CookieJar,
    MaybeSession(session): MaybeSession,
) -> Result<Response, AppError> {
    let Some(session) = session else {
        return Ok(Redirect::to("/login").into_response());
    };
    let created_at = app.accounts.created_at(session.user.id).await?;
    let sessions = app.accounts.session_count(session.user.id).await?;
    let (jar, layout) = layout(&app, jar, Some(&session));
    Ok((jar, AccountPage { layout, member_since: pages::date(created_at), sessions }).into_response())
}

async fn end_other_sessions(
    State(app): AppState,
    MaybeSession(session): MaybeSession,
    _: CheckedForm<CsrfForm>,
) -> Result<Response, AppError> {
    let Some(session) = session else {
        return Ok(Redirect::to("/login").into_response());
    };
    let ended = app.accounts.end_other_sessions(session.user.id, session.key).await?;
    let _ = app.hub.end_sessions(ended).await;
    Ok(Redirect::to("/account").into_response())
}

/// Liveness: the process serves requests (a load balancer or supervisor restarts it otherwise).
async fn healthz() -> &'static str {
    "ok\n"
}

/// Readiness: the instance can reach its database and will take players; a load balancer sends
/// no one to an instance that answers 503 here, and takes it back when it answers 200 again.
async fn readyz(State(app): AppState) -> Response {
    if !crate::db::is_healthy(&app.db).await {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready: the database does not answer\n").into_response()
    } else if app.hub.bus().is_some_and(|bus| !bus.is_connected()) {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready: NATS is not connected\n").into_response()
    } else {
        (StatusCode::OK, "ready\n").into_response()
    }
}

async fn not_found() -> AppError {
    AppError::NotFound
}

/// The room WebSocket (in-room traffic over WebSocket): 403 for another site's page, 401
/// without a live session; the seat itself is claimed with a ticket in the first message.
async fn room_socket(
    State(app): AppState,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    MaybeSession(session): MaybeSession,
    direct: Option<Extension<Direct>>,
    upgrade: WebSocketUpgrade,
) -> Response {
    let (session, upgrade, permit) =
        match checked_upgrade(&app, &headers, peer, session, upgrade, shared::room::MAX_TO_ROOM_BYTES) {
            Ok(checked) => checked,
            Err(refused) => return refused.into_response(),
        };
    let (rooms, rtc) = (app.hub.rooms().clone(), app.hub.rtc().clone());
    let limits = app.hub.shared_limits();
    upgrade.on_upgrade(move |socket| async move {
        let direct = direct.map(|Extension(direct)| direct);
        crate::transport::ws::serve(socket, direct, rooms, rtc, Some(session), limits).await;
        drop(permit);
    })
}

/// The hub WebSocket: 403 for another site's page, 401 without a live session.
async fn hub_socket(
    State(app): AppState,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    MaybeSession(session): MaybeSession,
    upgrade: WebSocketUpgrade,
) -> Response {
    let (session, upgrade, permit) =
        match checked_upgrade(&app, &headers, peer, session, upgrade, shared::hub::MAX_CLIENT_MESSAGE_BYTES) {
            Ok(checked) => checked,
            Err(refused) => return refused.into_response(),
        };
    let hub = app.hub.clone();
    upgrade.on_upgrade(move |socket| async move {
        crate::hub::socket::serve(socket, hub, session).await;
        drop(permit);
    })
}

/// What every WebSocket upgrade checks: the site's own origin (403 otherwise: cross-site
/// WebSocket hijacking), a live session (401), and the socket caps (429 per session, user or
/// address; 503 when only the connections kept for page loads are left). On success, the
/// upgrade with messages capped at `max` bytes and small buffers (most of an idle connection's
/// memory is its buffers), and the socket's place under the caps.
fn checked_upgrade(
    app: &App,
    headers: &HeaderMap,
    peer: SocketAddr,
    session: Option<Session>,
    upgrade: WebSocketUpgrade,
    max: usize,
) -> Result<(Session, WebSocketUpgrade, caps::SocketPermit), (StatusCode, String)> {
    if !csrf::same_origin(&app.config, headers) {
        return Err((StatusCode::FORBIDDEN, "cross-site WebSocket refused\n".to_owned()));
    }
    let Some(session) = session else {
        return Err((StatusCode::UNAUTHORIZED, "sign in first\n".to_owned()));
    };
    let permit = app.sockets.admit(&session, client_ip(app, headers, peer)).map_err(|refused| {
        let status = if refused == caps::Refused::Full {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::TOO_MANY_REQUESTS
        };
        tracing::debug!(user = session.user.id, %refused, "WebSocket refused");
        (status, refused.to_string())
    })?;
    let upgrade = upgrade.read_buffer_size(1024).write_buffer_size(0).max_message_size(max).max_frame_size(max);
    Ok((session, upgrade, permit))
}
