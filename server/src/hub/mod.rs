//! The hub: lobby presence and chat for every connected client.
//!
//! One task owns the hub's state and receives [`Command`]s over a bounded channel. It never
//! awaits a client: each connection has a bounded outbox, filled with `try_send`, and a client
//! whose outbox is full is dropped as too slow, so that one stalled reader never slows the rest.
//!
//! People are split into lobbies ("channels") of at most `lobby_capacity` users, each with its
//! own presence list and chat; a small server has one lobby where everyone sees everyone. Joins
//! and leaves are announced in batches every [`PRESENCE_FLUSH`], so that a crowd arriving at
//! once costs one message per client per batch rather than one per arrival.

mod chat_log;
pub mod socket;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use shared::hub::{
    CHAT_HISTORY_LEN, ChatLine, ErrorCode, PRESENCE_CHUNK, PROTOCOL_VERSION, ServerMsg,
    UserSummary, close,
};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::accounts::SessionKey;
use crate::config::Limits;
use crate::db::{Db, unix_now_ms};
use crate::rate::TokenBucket;

/// Identifies one WebSocket connection for the life of the process.
pub type ConnId = u64;

/// How often presence changes are sent out, at most.
pub const PRESENCE_FLUSH: Duration = Duration::from_millis(100);

/// What the hub asks a connection's task to do. It is 16 bytes on purpose: tokio allocates a
/// block of 32 slots for every channel up front, and there is one channel per connection.
#[derive(Debug, Clone)]
pub enum Outbound {
    /// Send this text frame (one encoding, shared by every recipient).
    Text(Arc<Utf8Bytes>),
    /// Send a close frame, then end.
    Close(Closing),
}

/// Why the hub closes a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closing {
    SessionEnded,
    GoingAway,
}

impl Closing {
    /// The close code and reason sent to the client.
    pub fn frame(self) -> (u16, &'static str) {
        match self {
            Self::SessionEnded => (close::SESSION_ENDED, "session ended"),
            Self::GoingAway => (close::GOING_AWAY, "server shutting down"),
        }
    }
}

/// Requests to the hub task.
#[derive(Debug)]
enum Command {
    Join {
        conn: ConnId,
        session: SessionKey,
        user: UserSummary,
        outbox: mpsc::Sender<Outbound>,
        /// The welcome, the lobby's presence list and its recent chat, in order.
        welcome: oneshot::Sender<Vec<Utf8Bytes>>,
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
    pub lobbies: usize,
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
    pub async fn start(
        db: Db,
        limits: Limits,
    ) -> Result<(Self, tokio::task::JoinHandle<()>), sqlx::Error> {
        let recent = chat_log::recent(&db, CHAT_HISTORY_LEN).await?;
        let (log, log_task) = chat_log::ChatLog::start(db);
        let (commands, rx) = mpsc::channel(4096);
        let limits = Arc::new(limits);
        let mut state = State {
            limits: Arc::clone(&limits),
            conns: HashMap::new(),
            users: HashMap::new(),
            lobbies: Vec::new(),
            by_session: HashMap::new(),
            log,
            dropped_slow: 0,
            slow: Vec::new(),
        };
        for (lobby, lines) in recent {
            state.lobby_mut(lobby).recent = lines.into();
        }
        let task = tokio::spawn(async move {
            state.run(rx).await;
            // The log flushes what it holds once every sender is gone.
            let _ = log_task.await;
        });
        Ok((
            Self {
                commands,
                next_conn: Arc::default(),
                limits,
            },
            task,
        ))
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    fn next_conn_id(&self) -> ConnId {
        self.next_conn
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
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

/// A user with at least one connection.
struct Online {
    user: UserSummary,
    lobby: usize,
    conns: usize,
    chat: TokenBucket,
}

#[derive(Default)]
struct Lobby {
    members: BTreeSet<i64>,
    conns: BTreeSet<ConnId>,
    recent: VecDeque<ChatLine>,
    /// Presence changes not yet sent: the latest state of each user who came or went.
    pending: BTreeMap<i64, Option<UserSummary>>,
}

struct State {
    limits: Arc<Limits>,
    conns: HashMap<ConnId, Conn>,
    users: HashMap<i64, Online>,
    lobbies: Vec<Lobby>,
    by_session: HashMap<SessionKey, Vec<ConnId>>,
    log: chat_log::ChatLog,
    dropped_slow: u64,
    /// Connections found with a full outbox, to be dropped once the current command is done.
    slow: Vec<ConnId>,
}

impl State {
    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let mut flush_at: Option<Instant> = None;
        loop {
            let command = match flush_at {
                Some(at) => tokio::select! {
                    command = rx.recv() => command,
                    () = tokio::time::sleep_until(at) => {
                        self.flush_presence();
                        flush_at = None;
                        self.drop_slow();
                        continue;
                    }
                },
                None => rx.recv().await,
            };
            let Some(command) = command else { return };
            match command {
                Command::Join {
                    conn,
                    session,
                    user,
                    outbox,
                    welcome,
                } => {
                    self.join(conn, session, user, outbox, welcome);
                }
                Command::Leave { conn } => self.leave(conn),
                Command::Chat { conn, text } => self.chat(conn, text),
                Command::EndSessions { sessions } => {
                    for session in sessions {
                        for conn in self.by_session.get(&session).cloned().unwrap_or_default() {
                            self.close(conn, Closing::SessionEnded);
                        }
                    }
                }
                Command::Stats { reply } => {
                    let _ = reply.send(HubStats {
                        connections: self.conns.len(),
                        users_online: self.users.len(),
                        lobbies: self
                            .lobbies
                            .iter()
                            .filter(|l| !l.members.is_empty())
                            .count(),
                        dropped_slow: self.dropped_slow,
                    });
                }
                Command::Shutdown => {
                    let conns: Vec<ConnId> = self.conns.keys().copied().collect();
                    for conn in conns {
                        self.close(conn, Closing::GoingAway);
                    }
                    return;
                }
            }
            self.drop_slow();
            if flush_at.is_none() && self.lobbies.iter().any(|l| !l.pending.is_empty()) {
                flush_at = Some(Instant::now() + PRESENCE_FLUSH);
            }
        }
    }

    /// Drops connections found too slow; dropping one may announce its user offline, which
    /// may find more.
    fn drop_slow(&mut self) {
        while let Some(conn) = self.slow.pop() {
            if self.conns.contains_key(&conn) {
                self.dropped_slow += 1;
                self.leave(conn);
            }
        }
    }

    fn lobby_mut(&mut self, index: usize) -> &mut Lobby {
        if self.lobbies.len() <= index {
            self.lobbies.resize_with(index + 1, Lobby::default);
        }
        &mut self.lobbies[index]
    }

    /// The lobby for a user arriving: the first with room.
    fn lobby_with_room(&self) -> usize {
        let capacity = self.limits.lobby_capacity.max(1);
        self.lobbies
            .iter()
            .position(|l| l.members.len() < capacity)
            .unwrap_or(self.lobbies.len())
    }

    fn join(
        &mut self,
        conn: ConnId,
        session: SessionKey,
        user: UserSummary,
        outbox: mpsc::Sender<Outbound>,
        welcome: oneshot::Sender<Vec<Utf8Bytes>>,
    ) {
        let user_id = user.id;
        let lobby = if let Some(online) = self.users.get(&user_id) {
            online.lobby
        } else {
            let lobby = self.lobby_with_room();
            let chat = TokenBucket::new(
                self.limits.chat_per_second,
                self.limits.chat_burst,
                Instant::now(),
            );
            self.users.insert(
                user_id,
                Online {
                    user: user.clone(),
                    lobby,
                    conns: 0,
                    chat,
                },
            );
            let l = self.lobby_mut(lobby);
            l.members.insert(user_id);
            l.pending.insert(user_id, Some(user.clone()));
            lobby
        };
        if let Some(online) = self.users.get_mut(&user_id) {
            online.conns += 1;
        }
        self.conns.insert(
            conn,
            Conn {
                user_id,
                session,
                outbox,
            },
        );
        self.by_session.entry(session).or_default().push(conn);
        self.lobby_mut(lobby).conns.insert(conn);

        let l = &self.lobbies[lobby];
        let members: Vec<UserSummary> = l
            .members
            .iter()
            .filter_map(|id| self.users.get(id).map(|o| o.user.clone()))
            .collect();
        let welcome_msg = ServerMsg::Welcome {
            version: PROTOCOL_VERSION,
            me: user,
            lobby: lobby as u32 + 1,
            online: members.len() as u32,
            history: l.recent.len() as u32,
        };
        let mut frames = vec![welcome_msg.to_json().into()];
        for chunk in members.chunks(PRESENCE_CHUNK) {
            frames.push(
                ServerMsg::Presence {
                    joined: chunk.to_vec(),
                    left: Vec::new(),
                }
                .to_json()
                .into(),
            );
        }
        frames.extend(
            l.recent
                .iter()
                .map(|line| ServerMsg::Chat(line.clone()).to_json().into()),
        );
        if welcome.send(frames).is_err() {
            // The connection ended while joining.
            self.leave(conn);
        }
    }

    fn leave(&mut self, conn: ConnId) {
        let Some(c) = self.conns.remove(&conn) else {
            return;
        };
        if let Some(list) = self.by_session.get_mut(&c.session) {
            list.retain(|&x| x != conn);
            if list.is_empty() {
                self.by_session.remove(&c.session);
            }
        }
        let Some(online) = self.users.get_mut(&c.user_id) else {
            return;
        };
        online.conns -= 1;
        let (lobby, last) = (online.lobby, online.conns == 0);
        let l = &mut self.lobbies[lobby];
        l.conns.remove(&conn);
        if last {
            self.users.remove(&c.user_id);
            l.members.remove(&c.user_id);
            l.pending.insert(c.user_id, None);
        }
    }

    /// Sends each lobby's pending presence changes to its members, in chunks.
    fn flush_presence(&mut self) {
        for lobby in 0..self.lobbies.len() {
            let pending = std::mem::take(&mut self.lobbies[lobby].pending);
            if pending.is_empty() {
                continue;
            }
            let (joined, left): (Vec<_>, Vec<_>) =
                pending.into_iter().partition(|(_, u)| u.is_some());
            let joined: Vec<UserSummary> = joined.into_iter().filter_map(|(_, u)| u).collect();
            let left: Vec<i64> = left.into_iter().map(|(id, _)| id).collect();
            let chunks = joined.len().max(left.len()).div_ceil(PRESENCE_CHUNK);
            for i in 0..chunks {
                let part =
                    |len: usize| (i * PRESENCE_CHUNK).min(len)..((i + 1) * PRESENCE_CHUNK).min(len);
                let msg = ServerMsg::Presence {
                    joined: joined[part(joined.len())].to_vec(),
                    left: left[part(left.len())].to_vec(),
                };
                self.broadcast(lobby, &msg);
            }
        }
    }

    fn chat(&mut self, conn: ConnId, text: String) {
        let Some(user_id) = self.conns.get(&conn).map(|c| c.user_id) else {
            return;
        };
        let Some(online) = self.users.get_mut(&user_id) else {
            return;
        };
        if !online.chat.take(Instant::now()) {
            let msg = ServerMsg::Error {
                code: ErrorCode::RateLimited,
                message: "You are sending messages too fast; wait a moment.".into(),
            };
            self.send_to(conn, &msg);
            return;
        }
        let lobby = online.lobby;
        let line = ChatLine {
            from: online.user.clone(),
            text,
            at_ms: unix_now_ms(),
        };
        if !self.log.append(user_id, lobby, &line) {
            let msg = ServerMsg::Error {
                code: ErrorCode::Busy,
                message: "Chat is busy; try again.".into(),
            };
            self.send_to(conn, &msg);
            return;
        }
        let recent = &mut self.lobbies[lobby].recent;
        if recent.len() == CHAT_HISTORY_LEN {
            recent.pop_front();
        }
        recent.push_back(line.clone());
        self.broadcast(lobby, &ServerMsg::Chat(line));
    }

    fn send_to(&mut self, conn: ConnId, msg: &ServerMsg) {
        let frame = Outbound::Text(Arc::new(msg.to_json().into()));
        if self
            .conns
            .get(&conn)
            .is_some_and(|c| c.outbox.try_send(frame).is_err())
        {
            self.slow.push(conn);
        }
    }

    /// Sends one encoded copy of `msg` to every connection in a lobby.
    fn broadcast(&mut self, lobby: usize, msg: &ServerMsg) {
        let text: Arc<Utf8Bytes> = Arc::new(msg.to_json().into());
        for id in &self.lobbies[lobby].conns {
            let full = self.conns.get(id).is_some_and(|c| {
                c.outbox
                    .try_send(Outbound::Text(Arc::clone(&text)))
                    .is_err()
            });
            if full {
                // Forgetting the connection drops its sender, which ends its task: the socket is
                // closed once the pending write completes or times out.
                self.slow.push(*id);
            }
        }
    }

    fn close(&mut self, conn: ConnId, why: Closing) {
        if let Some(c) = self.conns.get(&conn) {
            // A full outbox still ends the task: the sender is dropped by `leave`.
            let _ = c.outbox.try_send(Outbound::Close(why));
        }
        self.leave(conn);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_outbox_slot_is_small() {
        assert!(size_of::<super::Outbound>() <= 16);
    }
}
