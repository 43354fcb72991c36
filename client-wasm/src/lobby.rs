//! The lobby: connection state, who is online, and chat, kept live over the hub WebSocket.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

use shared::hub::{ChatLine, ClientMsg, ErrorCode, IceServer, PROTOCOL_VERSION, ServerMsg, UserSummary, close};
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::JsFuture;
use web_sys::{
    CloseEvent, HtmlElement, HtmlFormElement, HtmlInputElement, MessageEvent, RequestInit, RequestRedirect, Response,
    ResponseType, SubmitEvent, WebSocket,
};

use crate::dom;

/// Chat lines kept on screen; older ones are removed.
const MAX_LINES: u32 = 200;
/// Seconds between latency probes.
const PING_EVERY_MS: i32 = 5_000;

/// The lobby's elements (rendered by the server) and its live state.
pub struct Lobby {
    status: HtmlElement,
    chat_log: HtmlElement,
    chat_form: HtmlFormElement,
    chat_input: HtmlInputElement,
    chat_error: HtmlElement,
    online_list: HtmlElement,
    online_count: HtmlElement,
    title: HtmlElement,
    find_match: HtmlElement,
    cancel_match: HtmlElement,
    queue_status: HtmlElement,
    notice: HtmlElement,
    panels: HtmlElement,
    state: RefCell<State>,
}

#[derive(Default)]
struct State {
    socket: Option<WebSocket>,
    /// Callbacks of the current socket, kept alive as long as it is.
    callbacks: Vec<Box<dyn std::any::Any>>,
    online: BTreeMap<i64, UserSummary>,
    me: Option<i64>,
    failures: u32,
    ping: Option<(u32, f64)>,
    next_ping_id: u32,
    /// When the queue wait started (page clock) and for which mode, while queued.
    queued: Option<(String, f64)>,
    connected: bool,
    /// STUN/TURN servers for WebRTC, from the welcome.
    ice_servers: Vec<IceServer>,
}

impl Lobby {
    /// Finds the lobby markup; `None` on pages without it.
    pub fn attach() -> Result<Option<Rc<Self>>, JsValue> {
        let (
            Some(status),
            Some(chat_log),
            Some(chat_form),
            Some(chat_input),
            Some(chat_error),
            Some(online_list),
            Some(online_count),
            Some(title),
            Some(find_match),
            Some(cancel_match),
            Some(queue_status),
            Some(notice),
            Some(panels),
        ) = (
            dom::by_id("status"),
            dom::by_id("chat-log"),
            dom::by_id("chat-form"),
            dom::by_id("chat-input"),
            dom::by_id("chat-error"),
            dom::by_id("online-list"),
            dom::by_id("online-count"),
            dom::by_id("lobby-name"),
            dom::by_id("find-match"),
            dom::by_id("cancel-match"),
            dom::by_id("queue-status"),
            dom::by_id("match-notice"),
            dom::by_id("lobby"),
        )
        else {
            return Ok(None);
        };
        let lobby = Rc::new(Self {
            status,
            chat_log,
            chat_form,
            chat_input,
            chat_error,
            online_list,
            online_count,
            title,
            find_match,
            cancel_match,
            queue_status,
            notice,
            panels,
            state: RefCell::default(),
        });
        let weak = Rc::downgrade(&lobby);
        let on_submit = Closure::<dyn FnMut(SubmitEvent)>::new(move |event: SubmitEvent| {
            event.prevent_default();
            if let Some(lobby) = weak.upgrade() {
                lobby.send_chat();
            }
        });
        lobby.chat_form.add_event_listener_with_callback("submit", on_submit.as_ref().unchecked_ref())?;
        // The form lives as long as the page.
        on_submit.forget();
        lobby.on_click("find-match", Self::find_match)?;
        lobby.on_click("cancel-match", |l| l.send(&ClientMsg::CancelMatch))?;
        lobby.on_click("back-to-lobby", |_| crate::game::back_to_lobby())?;
        let weak = Rc::downgrade(&lobby);
        let tick = Closure::<dyn FnMut()>::new(move || {
            if let Some(lobby) = weak.upgrade() {
                lobby.show_queue();
            }
        });
        dom::window().set_interval_with_callback_and_timeout_and_arguments_0(tick.as_ref().unchecked_ref(), 1000)?;
        tick.forget();
        Ok(Some(lobby))
    }

    fn on_click(self: &Rc<Self>, id: &str, f: impl Fn(&Rc<Self>) + 'static) -> Result<(), JsValue> {
        let Some(el) = dom::by_id::<HtmlElement>(id) else { return Ok(()) };
        let weak = Rc::downgrade(self);
        let callback = Closure::<dyn FnMut()>::new(move || {
            if let Some(lobby) = weak.upgrade() {
                f(&lobby);
            }
        });
        el.add_event_listener_with_callback("click", callback.as_ref().unchecked_ref())?;
        callback.forget();
        Ok(())
    }

    fn find_match(self: &Rc<Self>) {
        let mode = dom::document()
            .query_selector("input[name='mode']:checked")
            .ok()
            .flatten()
            .and_then(|e| e.dyn_into::<HtmlInputElement>().ok())
            .map(|i| i.value());
        if let Some(mode) = mode {
            self.set_notice(None);
            self.send(&ClientMsg::FindMatch { mode });
        }
    }

    fn set_notice(&self, message: Option<&str>) {
        self.notice.set_text_content(message);
        self.notice.set_hidden(message.is_none());
    }

    /// Shows the queue state: the buttons and the time waited so far.
    fn show_queue(&self) {
        let state = self.state.borrow();
        let playing = crate::game::active();
        let _ = self.find_match.toggle_attribute_with_force("disabled", !state.connected || playing);
        self.find_match.set_hidden(state.queued.is_some());
        self.cancel_match.set_hidden(state.queued.is_none());
        match &state.queued {
            Some((mode, since)) => {
                let secs = ((dom::now_ms() - since) / 1000.0).max(0.0) as u64;
                let text = format!("Looking for a {mode} match… {}:{:02}", secs / 60, secs % 60);
                self.queue_status.set_text_content(Some(&text));
                let _ = self.queue_status.set_attribute("data-state", "queued");
            }
            None => {
                self.queue_status.set_text_content(None);
                let _ = self.queue_status.set_attribute("data-state", "idle");
            }
        }
    }

    /// Enters a match: the lobby hides and the game view takes its place.
    fn enter_match(self: &Rc<Self>, ticket: String, room: String, url: Option<&str>) {
        let ice_servers = {
            let mut state = self.state.borrow_mut();
            state.queued = None;
            state.ice_servers.clone()
        };
        self.panels.set_hidden(true);
        let weak = Rc::downgrade(self);
        let started = crate::game::start(ticket, room, url, ice_servers, move |message| {
            if let Some(lobby) = weak.upgrade() {
                lobby.panels.set_hidden(false);
                lobby.set_notice(message.as_deref());
                lobby.show_queue();
            }
        });
        if let Err(e) = started {
            web_sys::console::error_1(&e);
            self.panels.set_hidden(false);
        }
        self.show_queue();
    }

    /// Closes the hub connection and opens a new one (which sends a fresh ticket to a player
    /// who still has a seat in a match).
    pub fn reconnect(self: &Rc<Self>) {
        let socket = self.state.borrow_mut().socket.take();
        if let Some(socket) = socket {
            socket.set_onclose(None);
            let _ = socket.close();
        }
        connect(Rc::clone(self));
    }

    fn set_status(&self, state: &str, text: &str) {
        self.status.set_text_content(Some(text));
        let _ = self.status.set_attribute("data-state", state);
        self.status.set_class_name(&format!("status {state}"));
        let connected = state == "online";
        self.state.borrow_mut().connected = connected;
        self.show_queue();
        self.chat_input.set_disabled(!connected);
        if let Some(button) = self.chat_form.query_selector("button").ok().flatten() {
            let _ = button.toggle_attribute_with_force("disabled", !connected);
        }
    }

    fn show_error(&self, message: Option<&str>) {
        self.chat_error.set_text_content(message);
        self.chat_error.set_hidden(message.is_none());
    }

    pub fn send(&self, msg: &ClientMsg) {
        if let (Some(socket), Ok(json)) = (&self.state.borrow().socket, serde_json::to_string(msg)) {
            let _ = socket.send_with_str(&json);
        }
    }

    fn send_chat(&self) {
        let text = self.chat_input.value();
        if text.trim().is_empty() {
            return;
        }
        self.send(&ClientMsg::Chat { text });
        self.chat_input.set_value("");
        self.show_error(None);
    }

    fn on_message(self: &Rc<Self>, msg: ServerMsg) {
        match msg {
            ServerMsg::Welcome { me, lobby, ice_servers, .. } => {
                {
                    let mut state = self.state.borrow_mut();
                    state.me = Some(me.id);
                    state.ice_servers = ice_servers;
                    state.online.clear();
                    state.failures = 0;
                    state.queued = None;
                }
                self.set_status("online", "Online");
                self.title.set_text_content(Some(&format!("Lobby {lobby}")));
                dom::clear(&self.chat_log);
                self.render_online();
                self.ping();
            }
            ServerMsg::Presence { joined, left } => {
                {
                    let mut state = self.state.borrow_mut();
                    for id in left {
                        state.online.remove(&id);
                    }
                    state.online.extend(joined.into_iter().map(|u| (u.id, u)));
                }
                self.render_online();
            }
            ServerMsg::Chat(line) => self.append_chat(&line),
            ServerMsg::Pong { id } => self.on_pong(id),
            ServerMsg::RtcAnswer { room, sdp } => crate::game::on_rtc_answer(&room, &sdp),
            ServerMsg::Error { code: ErrorCode::Rtc, message } => {
                web_sys::console::warn_1(&format!("WebRTC refused, playing over the WebSocket: {message}").into());
                crate::game::on_rtc_refused();
            }
            ServerMsg::Error { code, message } => match code {
                ErrorCode::UnknownMode | ErrorCode::AlreadyBusy | ErrorCode::NotQueued => {
                    self.set_notice(Some(&message));
                }
                _ => self.show_error(Some(&message)),
            },
            ServerMsg::Queued { mode, waited_ms } => {
                self.state.borrow_mut().queued = Some((mode, dom::now_ms() - waited_ms as f64));
                self.show_queue();
            }
            ServerMsg::Unqueued => {
                self.state.borrow_mut().queued = None;
                self.show_queue();
            }
            ServerMsg::MatchFound { ticket, room, url, .. } => self.enter_match(ticket, room, url.as_deref()),
            ServerMsg::MatchAborted { message } => {
                crate::game::stop();
                self.panels.set_hidden(false);
                self.set_notice(Some(&message));
                self.show_queue();
            }
            ServerMsg::Reload { .. } => {
                self.set_status("reload", "A new version is out: reload the page");
            }
        }
    }

    fn append_chat(&self, line: &ChatLine) {
        let Ok(li) = dom::element("li", "chat-line", "") else {
            return;
        };
        let date = js_sys::Date::new(&JsValue::from_f64(line.at_ms as f64));
        let time = format!("{:02}:{:02}", date.get_hours(), date.get_minutes());
        let is_me = self.state.borrow().me == Some(line.from.id);
        for (class, text) in [
            ("time", time.as_str()),
            (if is_me { "from me" } else { "from" }, line.from.name.as_str()),
            ("text", line.text.as_str()),
        ] {
            if let Ok(part) = dom::element("span", class, text) {
                let _ = li.append_child(&part);
            }
        }
        let log = &self.chat_log;
        let at_bottom = log.scroll_top() + log.client_height() + 40 >= log.scroll_height();
        let _ = log.append_child(&li);
        while log.child_element_count() > MAX_LINES {
            if let Some(first) = log.first_element_child() {
                first.remove();
            }
        }
        if at_bottom {
            log.set_scroll_top(log.scroll_height());
        }
    }

    fn render_online(&self) {
        let state = self.state.borrow();
        let mut users: Vec<&UserSummary> = state.online.values().collect();
        users.sort_by_key(|u| u.name.to_lowercase());
        dom::clear(&self.online_list);
        for user in users {
            let me = state.me == Some(user.id);
            if let Ok(li) = dom::element("li", if me { "user me" } else { "user" }, &user.name) {
                let _ = li.set_attribute("data-user", &user.name);
                let _ = self.online_list.append_child(&li);
            }
        }
        self.online_count.set_text_content(Some(&state.online.len().to_string()));
    }

    /// Sends a latency probe; the answer updates the status line.
    fn ping(&self) {
        let id = {
            let mut state = self.state.borrow_mut();
            state.next_ping_id = state.next_ping_id.wrapping_add(1);
            let id = state.next_ping_id;
            state.ping = Some((id, dom::now_ms()));
            id
        };
        self.send(&ClientMsg::Ping { id });
    }

    fn on_pong(self: &Rc<Self>, id: u32) {
        let sent = self.state.borrow().ping.filter(|(pid, _)| *pid == id).map(|(_, at)| at);
        if let Some(sent) = sent {
            self.status.set_text_content(Some(&format!("Online · {} ms", (dom::now_ms() - sent).round())));
        }
        let weak = Rc::downgrade(self);
        dom::later(PING_EVERY_MS, move || {
            if let Some(lobby) = weak.upgrade()
                && lobby.state.borrow().socket.is_some()
            {
                lobby.ping();
            }
        });
    }
}

/// Opens the hub WebSocket and wires its events to the lobby.
pub fn connect(lobby: Rc<Lobby>) {
    if let Err(e) = try_connect(&lobby) {
        web_sys::console::error_1(&e);
        retry(lobby);
    }
}

fn try_connect(lobby: &Rc<Lobby>) -> Result<(), JsValue> {
    lobby.set_status("connecting", "Connecting…");
    let socket = WebSocket::new(&dom::socket_url("/ws")?)?;

    let on_open = {
        let weak = Rc::downgrade(lobby);
        Closure::<dyn FnMut()>::new(move || {
            if let Some(lobby) = weak.upgrade() {
                lobby.send(&ClientMsg::Hello { version: PROTOCOL_VERSION });
            }
        })
    };
    let on_message = {
        let weak = Rc::downgrade(lobby);
        Closure::<dyn FnMut(MessageEvent)>::new(move |event: MessageEvent| {
            let Some(lobby) = weak.upgrade() else { return };
            let Some(text) = event.data().as_string() else {
                return;
            };
            match serde_json::from_str::<ServerMsg>(&text) {
                Ok(msg) => lobby.on_message(msg),
                Err(e) => web_sys::console::warn_1(&format!("unreadable hub message: {e}").into()),
            }
        })
    };
    let on_close = {
        let weak = Rc::downgrade(lobby);
        Closure::<dyn FnMut(CloseEvent)>::new(move |event: CloseEvent| {
            if let Some(lobby) = weak.upgrade() {
                on_closed(lobby, event.code(), &event.reason());
            }
        })
    };
    socket.set_onopen(Some(on_open.as_ref().unchecked_ref()));
    socket.set_onmessage(Some(on_message.as_ref().unchecked_ref()));
    socket.set_onclose(Some(on_close.as_ref().unchecked_ref()));
    let mut state = lobby.state.borrow_mut();
    state.socket = Some(socket);
    state.callbacks = vec![Box::new(on_open), Box::new(on_message), Box::new(on_close)];
    Ok(())
}

fn on_closed(lobby: Rc<Lobby>, code: u16, reason: &str) {
    {
        let mut state = lobby.state.borrow_mut();
        state.socket = None;
        state.online.clear();
        state.ping = None;
        state.queued = None;
    }
    lobby.render_online();
    match code {
        close::SESSION_ENDED => {
            let _ = dom::window().location().assign("/login");
        }
        close::RELOAD => lobby.set_status("reload", "A new version is out: reload the page"),
        _ => {
            let why = if reason.is_empty() { "connection lost".to_owned() } else { reason.to_owned() };
            lobby.set_status("offline", &format!("Offline ({why}); reconnecting…"));
            retry(lobby);
        }
    }
}

/// Reconnects after a growing, jittered delay, first making sure the session still exists: a failed
/// WebSocket upgrade (401) cannot be told apart from a network failure in the browser.
fn retry(lobby: Rc<Lobby>) {
    let failures = {
        let mut state = lobby.state.borrow_mut();
        state.failures += 1;
        state.failures
    };
    // Exponential backoff with jitter: after a server restart, its players do not all knock
    // again at the same instant.
    let ceiling = f64::from((500 * 2_i32.pow(failures.min(5))).min(10_000));
    let delay = (ceiling * (0.5 + 0.5 * js_sys::Math::random())) as i32;
    dom::later(delay, move || {
        wasm_bindgen_futures::spawn_local(async move {
            // A match that lost its connection meanwhile reconnects the hub at once: done.
            if lobby.state.borrow().socket.is_some() {
                return;
            }
            if session_ended().await {
                let _ = dom::window().location().assign("/login");
            } else {
                connect(lobby);
            }
        });
    });
}

/// Whether `/play` now redirects, meaning the session is gone.
async fn session_ended() -> bool {
    let init = RequestInit::new();
    init.set_redirect(RequestRedirect::Manual);
    let Ok(promise) = web_sys::Request::new_with_str_and_init("/play", &init)
        .map(|request| dom::window().fetch_with_request(&request))
    else {
        return false;
    };
    match JsFuture::from(promise).await.and_then(JsCast::dyn_into::<Response>) {
        Ok(response) => response.type_() == ResponseType::Opaqueredirect,
        Err(_) => false, // the server is unreachable: keep retrying
    }
}
