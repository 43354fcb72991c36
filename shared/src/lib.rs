//! Rallypoint's shared crate: the protocol spoken between browser, bots and server, and the
//! deterministic game simulation that the server runs and the client predicts with.
//!
//! Invariant: this crate is pure. It performs no I/O, reads no clock and draws no ambient
//! randomness, so that the same inputs give the same bytes natively and in WebAssembly.

pub mod arena;
pub mod delta;
pub mod game;
pub mod hub;
pub mod inputs;
pub mod interp;
pub mod predict;
pub mod room;
