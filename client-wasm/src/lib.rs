//! The Rallypoint browser client. It finds the lobby markup that `/play` renders, connects to
//! the hub WebSocket and keeps the page live. All protocol types come from `shared`.

mod dom;
mod lobby;

use wasm_bindgen::prelude::*;

/// Entry point, called by `boot.js` once the module is instantiated.
#[wasm_bindgen(start)]
pub fn start() -> Result<(), JsValue> {
    if let Some(lobby) = lobby::Lobby::attach()? {
        lobby::connect(lobby);
    }
    Ok(())
}
