//! Room servers: processes apart from the hub that host rooms for it (issue 10).
//!
//! - [`tokens`]: `rallypoint room-token create/list/revoke`, and checking a token;
//! - [`control`]: the control protocol between a room server and the hub;
//! - [`room_server`]: `rallypoint room-server`, the process itself;
//! - [`outbox`]: results a room server keeps on disk until the hub acknowledges them.
//!
//! The hub's end of control connections is `crate::hub::room_servers`. Only the hub touches
//! the database. A room server learns the hub's public ticket key at
//! registration and admits players by ticket alone.

pub mod control;
pub mod outbox;
pub mod room_server;
pub mod tokens;
