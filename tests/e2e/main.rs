//! End-to-end tests in real headless Chromium against the real binary.

// Test code may panic on anything unexpected: that is how a test fails.
#![allow(clippy::unwrap_used)]

mod game;
mod lobby;

/// Browser tests share two cores: one at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
