//! A match in the browser. Inputs are sampled at the server's tick rate and applied to the own
//! player at once (prediction, with the `shared` code the server runs); each snapshot rewinds
//! the own player to the server's state and replays what the server has not applied yet. Other
//! players are drawn a little in the past, between two snapshots (interpolation). Everything is
//! drawn on `requestAnimationFrame`.

mod input;
mod link;
mod render;

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;

use shared::arena::{Arena, ArenaInput, ArenaView};
use shared::delta::Views;
use shared::game::Outcome;
use shared::interp::SnapshotClock;
use shared::predict::Predictor;
use shared::room::{
    FromRoomOf, JoinRequest, MAX_INPUTS_PER_MESSAGE, ROOM_PROTOCOL_VERSION, RatingChange, ToRoom, close,
};
use wasm_bindgen::prelude::*;
use web_sys::{CanvasRenderingContext2d, HtmlCanvasElement, HtmlElement, KeyboardEvent, MouseEvent};

use crate::dom;
use input::Controls;
use link::{LinkEvent, RoomLink};

type Down = FromRoomOf<Arena>;
type Up = ToRoom<ArenaInput>;

/// How far in the past others are drawn before the snapshot clock runs, in ticks.
const INTERPOLATION_TICKS: f64 = 2.0;
/// Snapshots kept for interpolation.
const KEPT_SNAPSHOTS: usize = 16;
/// Ticks the input loop catches up at most after the tab was in the background.
const MAX_CATCH_UP_TICKS: f64 = 5.0;

thread_local! {
    static MATCH: RefCell<Option<Rc<RefCell<Match>>>> = const { RefCell::new(None) };
}

fn with_match(f: impl FnOnce(&mut Match)) {
    let current = MATCH.with(|m| m.borrow().clone());
    if let Some(m) = current {
        f(&mut m.borrow_mut());
    }
}

/// A snapshot as received.
struct Snapshot {
    tick: u32,
    at_ms: f64,
    view: ArenaView,
}

/// The seat this client holds, from the join answer.
struct Joined {
    seat: u8,
    players: Vec<String>,
    tick_hz: u16,
}

/// Figures for the net graph, per second.
#[derive(Default)]
struct Net {
    shown: bool,
    rtt_ms: Option<f64>,
    ping: Option<(u32, f64)>,
    next_ping_id: u32,
    window_start: f64,
    snapshots_in_window: u32,
    snapshots_per_s: u32,
    bytes_marks: (u64, u64),
    down_per_s: u64,
    up_per_s: u64,
}

/// The page elements of the game view.
struct View {
    section: HtmlElement,
    canvas: HtmlCanvasElement,
    ctx: CanvasRenderingContext2d,
    net_graph: HtmlElement,
    banner: HtmlElement,
    result: HtmlElement,
    result_title: HtmlElement,
    result_rows: HtmlElement,
}

pub struct Match {
    view: View,
    link: Option<RoomLink>,
    ticket: String,
    /// The room's name, for WebRTC signaling on the hub.
    room: String,
    ice_servers: Vec<shared::hub::IceServer>,
    joined: Option<Joined>,
    predictor: Option<Predictor<Arena>>,
    snapshots: VecDeque<Snapshot>,
    /// The last views received, whole or rebuilt from deltas: bases for the next deltas.
    views: Views<ArenaView>,
    /// Where on the server's timeline others are drawn (adapts to jitter and loss).
    clock: Option<SnapshotClock>,
    /// How interpolation went: frames drawn, frames with no newer snapshot, largest step.
    interp: shared::interp::InterpStats,
    controls: Controls,
    /// Time not yet turned into ticks, in milliseconds.
    owed_ms: f64,
    last_frame_ms: Option<f64>,
    net: Net,
    /// What is drawn of the own player is eased towards the prediction after a correction.
    drawn_own: Option<(f64, f64)>,
    fog: render::Fog,
    ended: bool,
    on_exit: Rc<dyn Fn(Option<String>)>,
}

impl View {
    fn find() -> Option<Self> {
        let canvas: HtmlCanvasElement = dom::by_id("arena")?;
        let ctx = canvas.get_context("2d").ok()??.dyn_into().ok()?;
        Some(Self {
            section: dom::by_id("game")?,
            canvas,
            ctx,
            net_graph: dom::by_id("net-graph")?,
            banner: dom::by_id("game-banner")?,
            result: dom::by_id("result")?,
            result_title: dom::by_id("result-title")?,
            result_rows: dom::by_id("result-rows")?,
        })
    }
}

/// Joins a room with `ticket`. `on_exit` runs when the player goes back to the lobby, with a
/// message when the match did not end normally.
pub fn start(
    ticket: String,
    room: String,
    url: Option<&str>,
    ice_servers: Vec<shared::hub::IceServer>,
    on_exit: impl Fn(Option<String>) + 'static,
) -> Result<(), JsValue> {
    // A fresh ticket for the room this page plays in already: the hub connection came back (a
    // hub instance went) while the room's link stayed up (a link that drops stops the match).
    // Keep playing; the ticket is for a later rejoin. The server closed the peer connection
    // with the hub connection that signaled it: offer a new one over this one.
    let same = MATCH.with(|slot| {
        let current = slot.borrow();
        let mut m = current.as_ref().map(|m| m.borrow_mut())?;
        if m.room != room || m.ended {
            return None;
        }
        m.ticket.clone_from(&ticket);
        m.ice_servers.clone_from(&ice_servers);
        let m = &mut *m;
        // The seat is held: the offer needs no ticket (a newer one would move the seat's WebRTC
        // side to a join that never comes).
        let ticket = m.joined.is_none().then_some(m.ticket.as_str());
        if let Some(link) = &mut m.link
            && let Err(e) = link.start_webrtc(&m.room, ticket, &m.ice_servers)
        {
            web_sys::console::warn_1(&e);
        }
        Some(())
    });
    if same.is_some() {
        return Ok(());
    }
    stop();
    let view = View::find().ok_or_else(|| JsValue::from_str("the page has no game view"))?;
    view.section.set_hidden(false);
    view.result.set_hidden(true);
    view.banner.set_text_content(Some("Joining the match…"));
    let _ = view.section.set_attribute("data-state", "joining");
    let m = Rc::new(RefCell::new(Match {
        view,
        link: None,
        ticket,
        room,
        ice_servers,
        joined: None,
        predictor: None,
        snapshots: VecDeque::new(),
        views: Views::default(),
        clock: None,
        interp: shared::interp::InterpStats::default(),
        controls: Controls::default(),
        owed_ms: 0.0,
        last_frame_ms: None,
        net: Net::default(),
        drawn_own: None,
        fog: render::Fog::default(),
        ended: false,
        on_exit: Rc::new(on_exit),
    }));
    MATCH.with(|slot| *slot.borrow_mut() = Some(Rc::clone(&m)));
    let mut link = RoomLink::open(url, |event| with_match(|m| m.on_link(event)))?;
    {
        // The offer goes out now, with the ticket: the peer connection opens while the room
        // WebSocket joins, not after.
        let m = m.borrow();
        if let Err(e) = link.start_webrtc(&m.room, Some(&m.ticket), &m.ice_servers) {
            web_sys::console::warn_1(&format!("no WebRTC here, playing over the WebSocket: {e:?}").into());
        }
    }
    m.borrow_mut().link = Some(link);
    install_listeners_once()?;
    animate();
    Ok(())
}

/// Leaves the current match, if any, without a word to the lobby.
pub fn stop() {
    let current = MATCH.with(|slot| slot.borrow_mut().take());
    if let Some(m) = current {
        let mut m = m.borrow_mut();
        if let Some(link) = &mut m.link {
            link.close();
        }
        m.view.section.set_hidden(true);
    }
}

/// The server's WebRTC answer for the current match's room.
pub fn on_rtc_answer(room: &str, sdp: &str) {
    with_match(|m| {
        if let Some(link) = &m.link {
            link.on_rtc_answer(room, sdp);
        }
    });
}

/// The server refused WebRTC signaling: the match stays on the WebSocket.
pub fn on_rtc_refused() {
    with_match(|m| {
        if let Some(link) = &m.link {
            link.on_rtc_refused();
        }
    });
}

/// Whether a match is showing.
pub fn active() -> bool {
    MATCH.with(|slot| slot.borrow().is_some())
}

impl Match {
    fn on_link(&mut self, event: LinkEvent) {
        match event {
            LinkEvent::Open => {
                let join = JoinRequest { version: ROOM_PROTOCOL_VERSION, ticket: self.ticket.clone() };
                self.send_raw(&join.encode());
            }
            LinkEvent::Frame(bytes) => match Down::decode(&bytes) {
                Ok(frame) => self.on_frame(frame),
                Err(e) => web_sys::console::warn_1(&format!("unreadable room frame: {e}").into()),
            },
            LinkEvent::Closed { code, reason } => self.on_closed(code, &reason),
        }
    }

    fn on_frame(&mut self, frame: Down) {
        // The data channel may open, and bring a snapshot, before the join's answer arrives
        // over the WebSocket: such a frame is as good as lost.
        if self.joined.is_none() && !matches!(frame, Down::Joined { .. } | Down::Ended { .. }) {
            return;
        }
        match frame {
            Down::Joined { seat, players, tick_hz, rules, .. } => {
                self.predictor = Some(Predictor::new(rules));
                self.joined = Some(Joined { seat, players, tick_hz });
                self.clock = Some(SnapshotClock::new(tick_hz));
                self.view.banner.set_text_content(Some("Waiting for the other players…"));
                let _ = self.view.section.set_attribute("data-state", "waiting");
            }
            Down::Delta { tick, ack, back, delta } => {
                // A delta whose base is gone is as good as lost: the server sends the next one
                // against a view this client still acknowledges.
                if let Some(view) = self.views.patch::<Arena>(tick, back, &delta) {
                    self.on_snapshot(tick, ack, view);
                }
            }
            Down::Snapshot { tick, ack, view } => {
                self.views.insert(tick, view.clone());
                self.on_snapshot(tick, ack, view);
            }
            Down::Pong { id } => {
                if let Some((pid, sent)) = self.net.ping
                    && pid == id
                {
                    self.net.rtt_ms = Some(dom::now_ms() - sent);
                    self.net.ping = None;
                }
            }
            Down::Ended { outcome, ratings } => self.show_result(&outcome, &ratings),
        }
    }

    fn on_snapshot(&mut self, tick: u32, ack: u32, view: ArenaView) {
        let now = dom::now_ms();
        if self.snapshots.is_empty() {
            self.view.banner.set_text_content(None);
            let _ = self.view.section.set_attribute("data-state", "playing");
        }
        if let Some(p) = &mut self.predictor {
            p.snapshot(ack, &view);
        }
        self.net.snapshots_in_window += 1;
        if let Some(clock) = &mut self.clock {
            clock.on_snapshot(tick, now);
        }
        // Unordered transports may deliver an old snapshot late: keep ticks in order.
        if self.snapshots.back().is_none_or(|s| s.tick < tick) {
            self.snapshots.push_back(Snapshot { tick, at_ms: now, view });
            if self.snapshots.len() > KEPT_SNAPSHOTS {
                self.snapshots.pop_front();
            }
        }
    }

    fn on_closed(&mut self, code: u16, reason: &str) {
        self.link = None;
        if self.ended {
            return;
        }
        let message = match code {
            close::ROOM_FAILED => None, // the hub explains, with MatchAborted
            close::MATCH_OVER | close::LEFT => Some(format!("The match is over: {reason}.")),
            close::RELOAD => Some("A new version is out: reload the page.".to_owned()),
            close::REPLACED => Some("You joined this match from another tab.".to_owned()),
            c if (close::TICKET_FORGED..=close::TICKET_FOREIGN).contains(&c) => {
                Some(format!("Could not join the match ({reason})."))
            }
            // The connection dropped: rejoining goes through the lobby, which sends a new ticket.
            _ => Some("Connection to the match lost; rejoining…".to_owned()),
        };
        let rejoin =
            !matches!(code, close::ROOM_FAILED | close::MATCH_OVER | close::LEFT | close::REPLACED | close::RELOAD)
                && !(close::TICKET_FORGED..=close::TICKET_FOREIGN).contains(&code);
        self.view.section.set_hidden(true);
        let on_exit = Rc::clone(&self.on_exit);
        // Leave the match after this borrow ends.
        dom::later(0, move || {
            stop();
            on_exit(message);
            if rejoin {
                crate::reconnect_hub();
            }
        });
    }

    fn show_result(&mut self, outcome: &Outcome, ratings: &[RatingChange]) {
        self.ended = true;
        let _ = self.view.section.set_attribute("data-state", "ended");
        let Some(seat) = &self.joined else { return };
        let mine = usize::from(seat.seat);
        let shared_first = outcome.ranks.iter().skip_while(|&&r| r != 1).skip(1).any(|&r| r == 1);
        let title = match outcome.ranks.get(mine) {
            Some(1) if shared_first => "A draw".to_owned(),
            Some(1) => "You win!".to_owned(),
            Some(rank) => format!("You placed {rank} of {}", outcome.ranks.len()),
            None => "Match over".to_owned(),
        };
        self.view.result_title.set_text_content(Some(&title));
        dom::clear(&self.view.result_rows);
        let mut order: Vec<usize> = (0..outcome.ranks.len()).collect();
        order.sort_by_key(|&i| (outcome.ranks[i], std::cmp::Reverse(outcome.scores.get(i).copied().unwrap_or(0))));
        for i in order {
            let name = seat.players.get(i).map_or("?", String::as_str);
            let rating = ratings
                .get(i)
                .map_or_else(|| "not recorded".to_owned(), |r| format!("{} ({:+})", r.after, r.after - r.before));
            let cells = [
                outcome.ranks[i].to_string(),
                name.to_owned(),
                outcome.scores.get(i).map_or(0, |s| *s).to_string(),
                rating,
            ];
            if let Ok(tr) = dom::element("tr", if i == mine { "me" } else { "" }, "") {
                for cell in cells {
                    if let Ok(td) = dom::element("td", "", &cell) {
                        let _ = tr.append_child(&td);
                    }
                }
                let _ = self.view.result_rows.append_child(&tr);
            }
        }
        self.view.result.set_hidden(false);
        self.view.banner.set_text_content(None);
    }

    fn send_raw(&self, bytes: &[u8]) {
        if let Some(link) = &self.link {
            link.send(bytes);
        }
    }

    /// The server tick now, as far as this client can tell.
    fn estimated_tick(&self, now: f64) -> f64 {
        match (self.snapshots.back(), &self.joined) {
            (Some(s), Some(seat)) => f64::from(s.tick) + (now - s.at_ms) * f64::from(seat.tick_hz) / 1000.0,
            _ => 0.0,
        }
    }

    /// One animation frame: run the ticks that are due, then draw.
    fn frame(&mut self, now: f64) {
        let elapsed = self.last_frame_ms.map_or(0.0, |last| now - last);
        self.last_frame_ms = Some(now);
        if let (Some(seat), false) = (&self.joined, self.snapshots.is_empty() || self.ended) {
            let tick_ms = 1000.0 / f64::from(seat.tick_hz.max(1));
            self.owed_ms = (self.owed_ms + elapsed).min(tick_ms * MAX_CATCH_UP_TICKS);
            while self.owed_ms >= tick_ms {
                self.owed_ms -= tick_ms;
                self.input_tick(now);
            }
        }
        self.tend_net(now);
        render::draw(self, now);
    }

    /// Samples this tick's input, predicts it, and sends every unacknowledged input.
    fn input_tick(&mut self, now: f64) {
        let estimated = self.estimated_tick(now) as u32;
        let Some(predictor) = &mut self.predictor else { return };
        let (x, y) = predictor.own().map_or((0, 0), |b| (b.x, b.y));
        predictor.input(self.controls.sample(x, y));
        let (first_seq, inputs) = predictor.to_send(MAX_INPUTS_PER_MESSAGE);
        let frame = Up::Inputs { first_seq, tick: estimated, seen: self.views.newest(), inputs }.encode();
        self.send_raw(&frame);
    }

    fn tend_net(&mut self, now: f64) {
        if now - self.net.window_start < 1000.0 {
            return;
        }
        self.net.window_start = now;
        self.net.snapshots_per_s = std::mem::take(&mut self.net.snapshots_in_window);
        if let Some(link) = &self.link {
            let (down, up) = (*link.bytes_in.borrow(), *link.bytes_out.borrow());
            self.net.down_per_s = down - self.net.bytes_marks.0;
            self.net.up_per_s = up - self.net.bytes_marks.1;
            self.net.bytes_marks = (down, up);
        }
        self.net.next_ping_id = self.net.next_ping_id.wrapping_add(1);
        self.net.ping = Some((self.net.next_ping_id, now));
        self.send_raw(&Up::Ping { id: self.net.next_ping_id }.encode());
    }

    /// The text of the net graph.
    fn net_text(&self, now: f64) -> String {
        let (corrections, last, pending) =
            self.predictor.as_ref().map_or((0, 0, 0), |p| (p.corrections, p.last_correction, p.pending()));
        format!(
            "transport   {}\nping        {}\ntick        {:.0} ({} Hz)\nsnapshots   {}/s\ndown        {:.1} KB/s\nup          {:.1} KB/s\ncorrections {} (last {} units)\nunacked     {}",
            self.link.as_ref().map_or("closed", RoomLink::kind),
            self.net.rtt_ms.map_or_else(|| "…".to_owned(), |ms| format!("{ms:.0} ms")),
            self.estimated_tick(now),
            self.joined.as_ref().map_or(0, |s| s.tick_hz),
            self.net.snapshots_per_s,
            self.net.down_per_s as f64 / 1024.0,
            self.net.up_per_s as f64 / 1024.0,
            corrections,
            last,
            pending,
        )
    }

    /// Where the own player is drawn: the prediction, eased after corrections.
    fn own_position(&mut self) -> Option<(f64, f64, bool)> {
        let own = self.predictor.as_ref()?.own()?;
        let target = (f64::from(own.x), f64::from(own.y));
        let drawn = match self.drawn_own {
            // Snap on big jumps (a respawn); ease small corrections over a few frames.
            Some((x, y)) if (x - target.0).abs() + (y - target.1).abs() < 512.0 => {
                (x + (target.0 - x) * 0.5, y + (target.1 - y) * 0.5)
            }
            _ => target,
        };
        self.drawn_own = Some(drawn);
        Some((drawn.0, drawn.1, own.alive))
    }
}

/// Key and mouse listeners, installed once for the page; they act on the current match.
fn install_listeners_once() -> Result<(), JsValue> {
    thread_local! {
        static INSTALLED: RefCell<bool> = const { RefCell::new(false) };
    }
    if INSTALLED.with(|i| i.replace(true)) {
        return Ok(());
    }
    let window = dom::window();
    let key = |down: bool| {
        Closure::<dyn FnMut(KeyboardEvent)>::new(move |event: KeyboardEvent| {
            if !active() {
                return;
            }
            let code = event.code();
            if down && code == "KeyN" && !event.repeat() {
                with_match(|m| {
                    m.net.shown = !m.net.shown;
                    m.view.net_graph.set_hidden(!m.net.shown);
                });
                return;
            }
            if let Some(button) = Controls::button_for(&code) {
                event.prevent_default();
                with_match(|m| m.controls.key(button, down));
            }
        })
    };
    for (name, down) in [("keydown", true), ("keyup", false)] {
        let callback = key(down);
        window.add_event_listener_with_callback(name, callback.as_ref().unchecked_ref())?;
        callback.forget();
    }
    let blur = Closure::<dyn FnMut()>::new(|| with_match(|m| m.controls.release_all()));
    window.add_event_listener_with_callback("blur", blur.as_ref().unchecked_ref())?;
    blur.forget();
    let canvas: HtmlCanvasElement = dom::by_id("arena").ok_or_else(|| JsValue::from_str("no canvas"))?;
    let mouse = |kind: &'static str| {
        Closure::<dyn FnMut(MouseEvent)>::new(move |event: MouseEvent| {
            with_match(|m| {
                m.controls.mouse_world = Some(render::to_world(&m.view.canvas, event.offset_x(), event.offset_y()));
                match kind {
                    "down" if event.button() == 0 => {
                        event.prevent_default();
                        m.controls.fire(true);
                    }
                    "up" if event.button() == 0 => m.controls.fire(false),
                    _ => {}
                }
            });
        })
    };
    for (name, kind) in [("mousemove", "move"), ("mousedown", "down"), ("mouseup", "up")] {
        let callback = mouse(kind);
        canvas.add_event_listener_with_callback(name, callback.as_ref().unchecked_ref())?;
        callback.forget();
    }
    let up_anywhere = Closure::<dyn FnMut()>::new(|| with_match(|m| m.controls.fire(false)));
    window.add_event_listener_with_callback("mouseup", up_anywhere.as_ref().unchecked_ref())?;
    up_anywhere.forget();
    Ok(())
}

/// Runs [`Match::frame`] on every animation frame while a match is showing.
fn animate() {
    type FrameCallback = Rc<RefCell<Option<Closure<dyn FnMut(f64)>>>>;
    let callback: FrameCallback = Rc::new(RefCell::new(None));
    let again = Rc::clone(&callback);
    *callback.borrow_mut() = Some(Closure::new(move |now: f64| {
        if !active() {
            // The match is gone: drop this closure, ending the loop.
            again.borrow_mut().take();
            return;
        }
        with_match(|m| m.frame(now));
        if let Some(next) = again.borrow().as_ref() {
            let _ = dom::window().request_animation_frame(next.as_ref().unchecked_ref());
        }
    }));
    if let Some(first) = callback.borrow().as_ref() {
        let _ = dom::window().request_animation_frame(first.as_ref().unchecked_ref());
    }
}

/// Leaves the result screen for the lobby.
pub fn back_to_lobby() {
    let on_exit = MATCH.with(|slot| slot.borrow().as_ref().map(|m| Rc::clone(&m.borrow().on_exit)));
    stop();
    if let Some(on_exit) = on_exit {
        on_exit(None);
    }
}

impl Match {
    /// The tick others are drawn at now: on the snapshot clock once it runs.
    fn render_tick(&self, now: f64) -> f64 {
        self.clock.as_ref().map_or_else(|| self.estimated_tick(now) - INTERPOLATION_TICKS, |c| c.render_tick(now))
    }

    /// The snapshots either side of `render_tick`, how far between them, and whether the
    /// buffer ran dry (no snapshot after it yet).
    fn interpolation_pair(&self, render_tick: f64) -> Option<(&Snapshot, &Snapshot, f64, bool)> {
        let ticks: Vec<u32> = self.snapshots.iter().map(|s| s.tick).collect();
        let p = shared::interp::pair(&ticks, render_tick)?;
        Some((&self.snapshots[p.from], &self.snapshots[p.to], p.t, p.dry))
    }
}

/// The match as JSON, for tests and the devtools console: seat, own position, the players in
/// sight in the newest snapshot, transport and counters. Read-only.
pub fn state_json() -> String {
    let current = MATCH.with(|slot| slot.borrow().clone());
    let Some(m) = current else { return "null".to_owned() };
    let m = m.borrow();
    let own = m.predictor.as_ref().and_then(Predictor::own);
    let latest = m.snapshots.back();
    let state = m.view.section.get_attribute("data-state").unwrap_or_default();
    serde_json::json!({
        "state": state,
        "seat": m.joined.as_ref().map(|j| j.seat),
        "players": m.joined.as_ref().map(|j| j.players.clone()),
        "tick": latest.map(|s| s.tick),
        "me": own.map(|b| serde_json::json!({ "x": b.x, "y": b.y, "alive": b.alive })),
        "others": latest.map(|s| s.view.others.iter().map(|o| serde_json::json!({ "seat": o.seat, "x": o.x, "y": o.y })).collect::<Vec<_>>()),
        "snapshots": m.net.snapshots_per_s,
        "corrections": m.predictor.as_ref().map(|p| p.corrections),
        "transport": m.link.as_ref().map(RoomLink::kind),
        "data_channel_frames": m.link.as_ref().map(|l| l.data_frames.get()),
        "interp_delay_ticks": m.clock.as_ref().map(SnapshotClock::delay_ticks),
        "jitter_ms": m.clock.as_ref().map(SnapshotClock::jitter_ms),
        "frames": m.interp.frames,
        "dry_frames": m.interp.dry,
        "largest_step": m.interp.largest_step,
    })
    .to_string()
}
