//! Rallypoint's load tools, apart from the production server: a native client that speaks the
//! browser's protocols (forms, hub WebSocket, room WebSocket, WebRTC data channel), bots that
//! play through it, and the benchmarks that start real `rallypoint serve` processes and drive
//! them. Nothing here links the server library; what only the server can do to its database
//! (seeding players for a benchmark) comes in through [`bench::Backstage`].

pub mod bench;
pub mod bots;
pub mod client;
pub mod services;
pub mod stats;
