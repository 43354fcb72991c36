//! The Rallypoint browser client. It finds the lobby markup that `/play` renders, connects to
//! the hub WebSocket and keeps the page live. All protocol types come from `shared`.

mod dom;
mod game;
mod lobby;

use std::cell::RefCell;
use std::rc::Rc;

use wasm_bindgen::prelude::*;

thread_local! {
    /// The page's lobby. Callbacks hold weak references to it; this is the strong one, so the
    /// lobby lives as long as the page.
    static LOBBY: RefCell<Option<Rc<lobby::Lobby>>> = const { RefCell::new(None) };
}

/// Entry point, called by `boot.js` once the module is instantiated.
#[wasm_bindgen(start)]
pub fn start() -> Result<(), JsValue> {
    if let Some(lobby) = lobby::Lobby::attach()? {
        LOBBY.with(|slot| *slot.borrow_mut() = Some(Rc::clone(&lobby)));
        lobby::connect(lobby);
    }
    Ok(())
}

/// Reconnects the hub, which gives a player who still has a seat a fresh ticket.
pub(crate) fn reconnect_hub() {
    if let Some(lobby) = LOBBY.with(|slot| slot.borrow().clone()) {
        lobby.reconnect();
    }
}

/// Sends a message on the hub WebSocket (WebRTC signaling for the game).
pub(crate) fn send_hub(msg: &shared::hub::ClientMsg) {
    if let Some(lobby) = LOBBY.with(|slot| slot.borrow().clone()) {
        lobby.send(msg);
    }
}

/// The current match as JSON (see `game::state_json`); `null` outside a match.
#[wasm_bindgen]
pub fn game_state() -> String {
    game::state_json()
}
