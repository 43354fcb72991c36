//! Integration tests: a real server on port 0 with a real SQLite file, driven over HTTP and
//! WebSocket by the native client, as a browser would.

// Test code may panic on anything unexpected: that is how a test fails.
#![allow(clippy::unwrap_used)]

mod cli;
mod cluster;
mod fuzz_corpus;
mod hub;
mod room_servers;
mod rooms;
mod site;
mod support;
mod webrtc;
