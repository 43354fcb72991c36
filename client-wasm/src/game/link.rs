//! The room connection: the client's side of the transport. Frames are bytes; the game module
//! encodes and decodes them.
//!
//! The room WebSocket carries the join, the result and, until a WebRTC data channel opens (or
//! when it never does), everything else. While it joins, [`RoomLink::start_webrtc`] offers a
//! peer connection over the hub WebSocket with the seat's ticket; when its unordered, unreliable
//! data channel opens within [`DATA_CHANNEL_OPEN_TIMEOUT_MS`], inputs go on it and snapshots
//! arrive on it. When it does not open in time, fails later, or the browser has no WebRTC, play
//! goes on over the WebSocket.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use js_sys::{Array, ArrayBuffer, Reflect, Uint8Array};
use shared::hub::{ClientMsg, IceServer};
use shared::room::{DATA_CHANNEL_ID, DATA_CHANNEL_LABEL, DATA_CHANNEL_OPEN_TIMEOUT_MS};
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::JsFuture;
use web_sys::{
    BinaryType, CloseEvent, MessageEvent, RtcConfiguration, RtcDataChannel, RtcDataChannelInit, RtcDataChannelState,
    RtcDataChannelType, RtcIceServer, RtcPeerConnection, RtcPeerConnectionIceEvent, RtcPeerConnectionState, RtcSdpType,
    RtcSessionDescriptionInit, WebSocket,
};

use crate::dom;

/// What the link tells the game.
pub enum LinkEvent {
    Open,
    Frame(Vec<u8>),
    Closed { code: u16, reason: String },
}

/// Where a data channel stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PathState {
    Connecting,
    Open,
    /// Never opened in time, failed, or refused: the WebSocket carries everything.
    Failed,
}

/// The WebRTC side of a room link.
struct DataPath {
    pc: RtcPeerConnection,
    dc: RtcDataChannel,
    room: String,
    state: Rc<Cell<PathState>>,
    _callbacks: Vec<Box<dyn std::any::Any>>,
}

/// An open (or opening) room connection.
pub struct RoomLink {
    socket: WebSocket,
    data: Option<DataPath>,
    on_event: Rc<dyn Fn(LinkEvent)>,
    _callbacks: Vec<Box<dyn std::any::Any>>,
    /// Bytes sent and received, for the net graph.
    pub bytes_out: Rc<RefCell<u64>>,
    pub bytes_in: Rc<RefCell<u64>>,
    /// Frames that arrived on the data channel.
    pub data_frames: Rc<Cell<u64>>,
}

impl RoomLink {
    /// Connects to `/room` on this site, or on the room server at `url` (`https://host:port`);
    /// every event goes to `on_event`.
    pub fn open(url: Option<&str>, on_event: impl Fn(LinkEvent) + 'static) -> Result<Self, JsValue> {
        let target = match url {
            Some(url) => shared::room::room_socket_url(url),
            None => dom::socket_url("/room")?,
        };
        let socket = WebSocket::new(&target)?;
        socket.set_binary_type(BinaryType::Arraybuffer);
        let on_event: Rc<dyn Fn(LinkEvent)> = Rc::new(on_event);
        let bytes_in = Rc::new(RefCell::new(0u64));
        let on_open = {
            let on_event = Rc::clone(&on_event);
            Closure::<dyn FnMut()>::new(move || on_event(LinkEvent::Open))
        };
        let on_message = frame_handler(&on_event, &bytes_in, None);
        let on_close = {
            let on_event = Rc::clone(&on_event);
            Closure::<dyn FnMut(CloseEvent)>::new(move |event: CloseEvent| {
                on_event(LinkEvent::Closed { code: event.code(), reason: event.reason() });
            })
        };
        socket.set_onopen(Some(on_open.as_ref().unchecked_ref()));
        socket.set_onmessage(Some(on_message.as_ref().unchecked_ref()));
        socket.set_onclose(Some(on_close.as_ref().unchecked_ref()));
        Ok(Self {
            socket,
            data: None,
            on_event,
            _callbacks: vec![Box::new(on_open), Box::new(on_message), Box::new(on_close)],
            bytes_out: Rc::default(),
            bytes_in,
            data_frames: Rc::default(),
        })
    }

    /// Offers a WebRTC peer connection for `room` over the hub: with the `ticket` the room
    /// WebSocket joins with while it joins (the server then answers before the join), without
    /// once the seat is held. Errors mean the browser has no usable WebRTC; the link then stays
    /// on the WebSocket.
    pub fn start_webrtc(&mut self, room: &str, ticket: Option<&str>, ice_servers: &[IceServer]) -> Result<(), JsValue> {
        self.stop_webrtc();
        let config = RtcConfiguration::new();
        let servers = Array::new();
        for server in ice_servers {
            let s = RtcIceServer::new();
            s.set_urls(&server.urls.iter().map(|u| JsValue::from_str(u)).collect::<Array>());
            if let (Some(user), Some(pass)) = (&server.username, &server.credential) {
                s.set_username(user);
                s.set_credential(pass);
            }
            servers.push(&s);
        }
        config.set_ice_servers(&servers);
        let pc = RtcPeerConnection::new_with_configuration(&config)?;
        let init = RtcDataChannelInit::new();
        init.set_ordered(false);
        init.set_max_retransmits(0);
        // Pre-negotiated: the server makes its side too, so the channel opens with the SCTP
        // association, a round trip before an in-band open would.
        init.set_negotiated(true);
        init.set_id(DATA_CHANNEL_ID);
        let dc = pc.create_data_channel_with_data_channel_dict(DATA_CHANNEL_LABEL, &init);
        dc.set_binary_type(RtcDataChannelType::Arraybuffer);
        let state = Rc::new(Cell::new(PathState::Connecting));

        let on_message = frame_handler(&self.on_event, &self.bytes_in, Some(&self.data_frames));
        let on_open = {
            let state = Rc::clone(&state);
            Closure::<dyn FnMut()>::new(move || {
                if state.get() == PathState::Connecting {
                    state.set(PathState::Open);
                }
            })
        };
        let on_close = {
            let state = Rc::clone(&state);
            Closure::<dyn FnMut()>::new(move || state.set(PathState::Failed))
        };
        let on_state = {
            let (state, pc) = (Rc::clone(&state), pc.clone());
            Closure::<dyn FnMut()>::new(move || {
                if matches!(pc.connection_state(), RtcPeerConnectionState::Failed | RtcPeerConnectionState::Closed) {
                    state.set(PathState::Failed);
                }
            })
        };
        // Candidates found before the offer went out wait for it (the server needs the offer
        // first); `None` once it is sent.
        let waiting: Rc<RefCell<Option<Vec<ClientMsg>>>> = Rc::new(RefCell::new(Some(Vec::new())));
        let on_candidate = {
            let (room, waiting) = (room.to_owned(), Rc::clone(&waiting));
            Closure::<dyn FnMut(RtcPeerConnectionIceEvent)>::new(move |event: RtcPeerConnectionIceEvent| {
                let Some(c) = event.candidate() else { return };
                if c.candidate().is_empty() {
                    return;
                }
                let msg = ClientMsg::RtcCandidate {
                    room: room.clone(),
                    candidate: c.candidate(),
                    sdp_mid: c.sdp_mid(),
                    sdp_m_line_index: c.sdp_m_line_index(),
                };
                match waiting.borrow_mut().as_mut() {
                    Some(queue) => queue.push(msg),
                    None => crate::send_hub(&msg),
                }
            })
        };
        dc.set_onmessage(Some(on_message.as_ref().unchecked_ref()));
        dc.set_onopen(Some(on_open.as_ref().unchecked_ref()));
        dc.set_onclose(Some(on_close.as_ref().unchecked_ref()));
        pc.set_onconnectionstatechange(Some(on_state.as_ref().unchecked_ref()));
        pc.set_onicecandidate(Some(on_candidate.as_ref().unchecked_ref()));

        {
            let (pc, room, state) = (pc.clone(), room.to_owned(), Rc::clone(&state));
            let ticket = ticket.map(str::to_owned);
            wasm_bindgen_futures::spawn_local(async move {
                let offered = async {
                    let offer = JsFuture::from(pc.create_offer()).await?;
                    let sdp = Reflect::get(&offer, &"sdp".into())?.as_string().unwrap_or_default();
                    let desc = RtcSessionDescriptionInit::new(RtcSdpType::Offer);
                    desc.set_sdp(&sdp);
                    JsFuture::from(pc.set_local_description(&desc)).await?;
                    crate::send_hub(&ClientMsg::RtcOffer { room, sdp, ticket, negotiated: true });
                    for msg in waiting.borrow_mut().take().unwrap_or_default() {
                        crate::send_hub(&msg);
                    }
                    Ok::<(), JsValue>(())
                }
                .await;
                if offered.is_err() {
                    state.set(PathState::Failed);
                }
            });
        }
        {
            let (pc, state) = (pc.clone(), Rc::clone(&state));
            dom::later(DATA_CHANNEL_OPEN_TIMEOUT_MS as i32, move || {
                if state.get() == PathState::Connecting {
                    state.set(PathState::Failed);
                    pc.close();
                }
            });
        }
        self.data = Some(DataPath {
            pc,
            dc,
            room: room.to_owned(),
            state,
            _callbacks: vec![
                Box::new(on_message),
                Box::new(on_open),
                Box::new(on_close),
                Box::new(on_state),
                Box::new(on_candidate),
            ],
        });
        Ok(())
    }

    /// The server's answer to the offer for `room`.
    pub fn on_rtc_answer(&self, room: &str, sdp: &str) {
        let Some(data) = self.data.as_ref().filter(|d| d.room == room) else { return };
        let desc = RtcSessionDescriptionInit::new(RtcSdpType::Answer);
        desc.set_sdp(sdp);
        let (pc, state) = (data.pc.clone(), Rc::clone(&data.state));
        wasm_bindgen_futures::spawn_local(async move {
            if JsFuture::from(pc.set_remote_description(&desc)).await.is_err() {
                state.set(PathState::Failed);
                pc.close();
            }
        });
    }

    /// The server refused the offer or a candidate: stay on the WebSocket.
    pub fn on_rtc_refused(&self) {
        if let Some(data) = &self.data {
            data.state.set(PathState::Failed);
            data.pc.close();
        }
    }

    fn data_channel(&self) -> Option<&RtcDataChannel> {
        self.data
            .as_ref()
            .filter(|d| d.state.get() == PathState::Open && d.dc.ready_state() == RtcDataChannelState::Open)
            .map(|d| &d.dc)
    }

    /// Sends one frame: on the data channel when it is open, else on the WebSocket (dropped if
    /// neither is open).
    pub fn send(&self, frame: &[u8]) {
        let sent = match self.data_channel() {
            Some(dc) => dc.send_with_u8_array(frame).is_ok(),
            None => self.socket.ready_state() == WebSocket::OPEN && self.socket.send_with_u8_array(frame).is_ok(),
        };
        if sent {
            *self.bytes_out.borrow_mut() += frame.len() as u64;
        }
    }

    /// Which transport carries inputs and snapshots: `"webrtc"` or `"websocket"`.
    pub fn kind(&self) -> &'static str {
        if self.data_channel().is_some() { "webrtc" } else { "websocket" }
    }

    fn stop_webrtc(&mut self) {
        if let Some(data) = self.data.take() {
            data.dc.set_onclose(None);
            data.pc.set_onconnectionstatechange(None);
            data.pc.close();
        }
    }

    /// Closes the connection.
    pub fn close(&mut self) {
        self.stop_webrtc();
        self.socket.set_onclose(None);
        let _ = self.socket.close();
    }
}

/// A `message` handler that counts the bytes (and, for the data channel, the frames) and hands
/// the frame to the game.
fn frame_handler(
    on_event: &Rc<dyn Fn(LinkEvent)>,
    bytes_in: &Rc<RefCell<u64>>,
    frames: Option<&Rc<Cell<u64>>>,
) -> Closure<dyn FnMut(MessageEvent)> {
    let (on_event, bytes_in, frames) = (Rc::clone(on_event), Rc::clone(bytes_in), frames.map(Rc::clone));
    Closure::<dyn FnMut(MessageEvent)>::new(move |event: MessageEvent| {
        if let Ok(buffer) = event.data().dyn_into::<ArrayBuffer>() {
            let bytes = Uint8Array::new(&buffer).to_vec();
            *bytes_in.borrow_mut() += bytes.len() as u64;
            if let Some(frames) = &frames {
                frames.set(frames.get() + 1);
            }
            on_event(LinkEvent::Frame(bytes));
        }
    })
}
