//! The hub: lobby presence and chat for every connected client.
//!
//! One task owns the hub's state and receives [`Command`]s over a bounded channel. It never
//! awaits a client: each connection has a bounded outbox, filled with `try_send`, and a client
//! whose outbox is full is dropped as too slow, so that one stalled reader never slows the rest.

mod chat_log;
pub mod socket;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use axum::extract::ws::Utf8Bytes;
use shared::hub::{CHAT_HISTORY_LEN, ChatLine, ErrorCode, PROTOCOL_VERSION, ServerMsg, UserSummary, close};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::accounts::SessionKey;
use crate::config::Limits;
use crate::db::{Db, unix_now_ms};
use crate::rate::TokenBucket;

/// Identifies one WebSocket connection for the life of the process.
pub type ConnId = u64;

/// What the hub asks a connection's task to do.
#[derive(Debug, Clone)]
pub enum Outbound {
    /// Send this text frame.
    Text(Utf8Bytes),
    /// Send a close frame with this code and reason, then end.
    Close(u16, &'static str),
}

/// Requests to the hub task.
#[derive(Debug)]
enum Command {
    Join {
        conn: ConnId,
        session: SessionKey,
        user: UserSummary,
        outbox: mpsc::Sender<Outbound>,
        welcome: oneshot::Sender<ServerMsg>,
    },
    Leave {
        conn: ConnId,
    },
    Chat {
        conn: ConnId,
        text: String,
    },
    EndSessions {
        sessions: Vec<SessionKey>,
    },
    Stats {
        reply: oneshot::Sender<HubStats>,
    },
    Shutdown,
}

/// Counts for health pages, tests and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HubStats {
    pub connections: usize,
    pub users_online: usize,
    pub dropped_slow: u64,
}

/// A cheap handle to the hub task.
#[derive(Clone)]
pub struct Hub {
    commands: mpsc::Sender<Command>,
    next_conn: Arc<std::sync::atomic::AtomicU64>,
    limits: Arc<Limits>,
}

/// The hub task has stopped (the server is shutting down).
#[derive(Debug, thiserror::Error)]
#[error("the hub has stopped")]
pub struct HubGone;

impl Hub {
    /// Loads recent chat and starts the hub and chat-log tasks.
    pub async fn start(db: Db, limits: Limits) -> Result<(Self, tokio::task::JoinHandle<()>), sqlx::Error> {
        let recent = chat_log::recent(&db, CHAT_HISTORY_LEN).await?;
        let (log, log_task) = chat_log::ChatLog::start(db);
        let (commands, rx) = mpsc::channel(4096);
        let limits = Arc::new(limits);
        let state = State {
            limits: Arc::clone(&limits),
            conns: HashMap::new(),
            online: BTreeMap::new(),
            by_session: HashMap::new(),
            recent: recent.into(),
            log,
            dropped_slow: 0,
            slow: Vec::new(),
        };
        let task = tokio::spawn(async move {
            state.run(rx).await;
            // The log flushes what it holds once every sender is gone.
            let _ = log_task.await;
        });
        Ok((Self { commands, next_conn: Arc::default(), limits }, task))
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    fn next_conn_id(&self) -> ConnId {
        self.next_conn.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    async fn send(&self, command: Command) -> Result<(), HubGone> {
        self.commands.send(command).await.map_err(|_| HubGone)
    }

    /// Ends sessions: their connections are closed with [`close::SESSION_ENDED`].
    pub async fn end_sessions(&self, sessions: Vec<SessionKey>) -> Result<(), HubGone> {
        self.send(Command::EndSessions { sessions }).await
    }

    /// Current counts.
    pub async fn stats(&self) -> Result<HubStats, HubGone> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Stats { reply }).await?;
        rx.await.map_err(|_| HubGone)
    }

    /// Closes every connection with [`close::GOING_AWAY`] and stops the hub.
    pub async fn shutdown(&self) {
        let _ = self.send(Command::Shutdown).await;
    }
}

struct Conn {
    user_id: i64,
    session: SessionKey,
    outbox: mpsc::Sender<Outbound>,
}

struct Presence {
    user: UserSummary,
    conns: usize,
    chat: TokenBucket,
}

struct State {
    limits: Arc<Limits>,
    conns: HashMap<ConnId, Conn>,
    /// Users online, by id; each counted once however many connections they have.
    online: BTreeMap<i64, Presence>,
    by_session: HashMap<SessionKey, Vec<ConnId>>,
    recent: VecDeque<ChatLine>,
    log: chat_log::ChatLog,
    dropped_slow: u64,
    /// Connections found with a full outbox, to be dropped once the current command is done.
    slow: Vec<ConnId>,
}

impl State {
    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        while let Some(command) = rx.recv().await {
            match command {
                Command::Join { conn, session, user, outbox, welcome } => {
                    self.join(conn, session, user, outbox, welcome);
                }
                Command::Leave { conn } => self.leave(conn),
                Command::Chat { conn, text } => self.chat(conn, text),
                Command::EndSessions { sessions } => {
                    for session in sessions {
                        for conn in self.by_session.get(&session).cloned().unwrap_or_default() {
                            self.close(conn, close::SESSION_ENDED, "session ended");
                        }
                    }
                }
                Command::Stats { reply } => {
                    let _ = reply.send(HubStats {
                        connections: self.conns.len(),
                        users_online: self.online.len(),
                        dropped_slow: self.dropped_slow,
                    });
                }
                Command::Shutdown => {
                    let conns: Vec<ConnId> = self.conns.keys().copied().collect();
                    for conn in conns {
                        self.close(conn, close::GOING_AWAY, "server shutting down");
                    }
                    return;
                }
            }
            // Dropping a slow client may announce it offline, which may find more slow clients.
            while let Some(conn) = self.slow.pop() {
                if self.conns.contains_key(&conn) {
                    self.dropped_slow += 1;
                    self.leave(conn);
                }
            }
        }
    }

    fn join(
        &mut self,
        conn: ConnId,
        session: SessionKey,
        user: UserSummary,
        outbox: mpsc::Sender<Outbound>,
        welcome: oneshot::Sender<ServerMsg>,
    ) {
        let user_id = user.id;
        let first = !self.online.contains_key(&user_id);
        let presence = self.online.entry(user_id).or_insert_with(|| Presence {
            user: user.clone(),
            conns: 0,
            chat: TokenBucket::new(self.limits.chat_per_second, self.limits.chat_burst, Instant::now()),
        });
        presence.conns += 1;
        self.conns.insert(conn, Conn { user_id, session, outbox });
        self.by_session.entry(session).or_default().push(conn);
        let reply = ServerMsg::Welcome {
            version: PROTOCOL_VERSION,
            me: user.clone(),
            online: self.online.values().map(|p| p.user.clone()).collect(),
            chat: self.recent.iter().cloned().collect(),
        };
        if welcome.send(reply).is_err() {
            // The connection ended while joining.
            self.leave(conn);
            return;
        }
        if first {
            self.broadcast(&ServerMsg::UserOnline { user }, Some(conn));
        }
    }

    fn leave(&mut self, conn: ConnId) {
        let Some(c) = self.conns.remove(&conn) else { return };
        if let Some(list) = self.by_session.get_mut(&c.session) {
            list.retain(|&x| x != conn);
            if list.is_empty() {
                self.by_session.remove(&c.session);
            }
        }
        let last = match self.online.get_mut(&c.user_id) {
            Some(p) => {
                p.conns -= 1;
                p.conns == 0
            }
            None => false,
        };
        if last {
            self.online.remove(&c.user_id);
            self.broadcast(&ServerMsg::UserOffline { id: c.user_id }, None);
        }
    }

    fn chat(&mut self, conn: ConnId, text: String) {
        let Some(user_id) = self.conns.get(&conn).map(|c| c.user_id) else { return };
        let Some(presence) = self.online.get_mut(&user_id) else { return };
        if !presence.chat.take(Instant::now()) {
            let msg = ServerMsg::Error {
                code: ErrorCode::RateLimited,
                message: "You are sending messages too fast; wait a moment.".into(),
            };
            self.send_to(conn, &msg);
            return;
        }
        let line = ChatLine { from: presence.user.clone(), text, at_ms: unix_now_ms() };
        if !self.log.append(user_id, &line) {
            let msg = ServerMsg::Error { code: ErrorCode::Busy, message: "Chat is busy; try again.".into() };
            self.send_to(conn, &msg);
            return;
        }
        if self.recent.len() == CHAT_HISTORY_LEN {
            self.recent.pop_front();
        }
        self.recent.push_back(line.clone());
        self.broadcast(&ServerMsg::Chat(line), None);
    }

    fn send_to(&mut self, conn: ConnId, msg: &ServerMsg) {
        let frame = Outbound::Text(msg.to_json().into());
        if self.conns.get(&conn).is_some_and(|c| c.outbox.try_send(frame).is_err()) {
            self.slow.push(conn);
        }
    }

    /// Sends one encoded copy of `msg` to every connection but `except`.
    fn broadcast(&mut self, msg: &ServerMsg, except: Option<ConnId>) {
        let text: Utf8Bytes = msg.to_json().into();
        for (&id, c) in &self.conns {
            if Some(id) != except && c.outbox.try_send(Outbound::Text(text.clone())).is_err() {
                // Forgetting the connection drops its sender, which ends its task: the socket is
                // closed once the pending write completes or times out.
                self.slow.push(id);
            }
        }
    }

    fn close(&mut self, conn: ConnId, code: u16, reason: &'static str) {
        if let Some(c) = self.conns.get(&conn) {
            // A full outbox still ends the task: the sender is dropped by `leave`.
            let _ = c.outbox.try_send(Outbound::Close(code, reason));
        }
        self.leave(conn);
    }
}
