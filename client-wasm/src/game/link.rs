//! The room connection: the client's side of the transport. Frames are bytes; the game module
//! encodes and decodes them. WebSocket now; WebRTC data channels slot in behind the same calls.

use std::cell::RefCell;
use std::rc::Rc;

use js_sys::{ArrayBuffer, Uint8Array};
use wasm_bindgen::prelude::*;
use web_sys::{BinaryType, CloseEvent, MessageEvent, WebSocket};

use crate::dom;

/// What the link tells the game.
pub enum LinkEvent {
    Open,
    Frame(Vec<u8>),
    Closed { code: u16, reason: String },
}

/// An open (or opening) room connection.
pub struct RoomLink {
    socket: WebSocket,
    kind: &'static str,
    _callbacks: Vec<Box<dyn std::any::Any>>,
    /// Bytes sent and received, for the net graph.
    pub bytes_out: Rc<RefCell<u64>>,
    pub bytes_in: Rc<RefCell<u64>>,
}

impl RoomLink {
    /// Connects to `/room`; every event goes to `on_event`.
    pub fn open(on_event: impl Fn(LinkEvent) + 'static) -> Result<Self, JsValue> {
        let socket = WebSocket::new(&dom::socket_url("/room")?)?;
        socket.set_binary_type(BinaryType::Arraybuffer);
        let on_event = Rc::new(on_event);
        let bytes_in = Rc::new(RefCell::new(0u64));
        let on_open = {
            let on_event = Rc::clone(&on_event);
            Closure::<dyn FnMut()>::new(move || on_event(LinkEvent::Open))
        };
        let on_message = {
            let on_event = Rc::clone(&on_event);
            let bytes_in = Rc::clone(&bytes_in);
            Closure::<dyn FnMut(MessageEvent)>::new(move |event: MessageEvent| {
                if let Ok(buffer) = event.data().dyn_into::<ArrayBuffer>() {
                    let bytes = Uint8Array::new(&buffer).to_vec();
                    *bytes_in.borrow_mut() += bytes.len() as u64;
                    on_event(LinkEvent::Frame(bytes));
                }
            })
        };
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
            kind: "WebSocket",
            _callbacks: vec![Box::new(on_open), Box::new(on_message), Box::new(on_close)],
            bytes_out: Rc::default(),
            bytes_in,
        })
    }

    /// Sends one frame (dropped if the connection is not open).
    pub fn send(&self, frame: &[u8]) {
        if self.socket.ready_state() == WebSocket::OPEN && self.socket.send_with_u8_array(frame).is_ok() {
            *self.bytes_out.borrow_mut() += frame.len() as u64;
        }
    }

    /// Which transport carries the link, for the net graph.
    pub fn kind(&self) -> &'static str {
        self.kind
    }

    /// Closes the connection.
    pub fn close(&self) {
        self.socket.set_onclose(None);
        let _ = self.socket.close();
    }
}
