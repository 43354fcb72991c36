//! One hub WebSocket connection: a single task that reads the client, writes its outbox, and
//! keeps the heartbeat. Everything that can go wrong with a client ends here, in this task.

use axum::extract::ws::{Message, WebSocket};
use shared::hub::{ClientMsg, ErrorCode, MAX_CHAT_CHARS, PROTOCOL_VERSION, ServerMsg, close};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, sleep_until, timeout};

use super::{Arrival, Closing, Command, ConnId, Hub, Outbound, RemoteSignal, results};
use crate::accounts::Session;
use crate::rate::TokenBucket;
use crate::transport::webrtc::{Offer, RtcError};
use crate::transport::ws;

/// Why a connection ended, for the log and for tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The peer closed or the transport failed: nothing more to send.
    Gone,
    /// We close with this code and reason.
    Close(u16, &'static str),
}

impl From<Closing> for End {
    fn from(why: Closing) -> Self {
        let (code, reason) = why.frame();
        Self::Close(code, reason)
    }
}

/// Runs one authenticated connection until it ends.
pub async fn serve(socket: WebSocket, hub: Hub, session: Session) {
    let conn = hub.next_conn_id();
    let mut task = Connection::new(socket, &hub, session.user.id);
    let end = match task.handshake(conn, &hub, &session).await {
        Ok(outbox) => {
            let end = task.run(conn, &hub, outbox).await;
            hub.rtc().signaling_closed(conn);
            hub.rtc_signaling_closed(conn).await;
            end
        }
        Err(end) => end,
    };
    // Joined or not (the welcome may have failed to write, or a held join ended), the hub
    // forgets it.
    let _ = hub.send(Command::Leave { conn }).await;
    tracing::debug!(conn, user = session.user.id, ?end, "hub connection ended");
    if let End::Close(code, reason) = end {
        task.close(code, reason).await;
    }
}

struct Connection<'a> {
    socket: WebSocket,
    user_id: i64,
    limits: &'a crate::config::Limits,
    strikes: u32,
    inbound: TokenBucket,
}

enum Step {
    Continue,
    Stop(End),
}

impl<'a> Connection<'a> {
    fn new(socket: WebSocket, hub: &'a Hub, user_id: i64) -> Self {
        let limits = hub.limits();
        Self {
            socket,
            user_id,
            limits,
            strikes: 0,
            inbound: TokenBucket::new(limits.ws_messages_per_second, limits.ws_message_burst, Instant::now()),
        }
    }

    /// Waits for `hello`, checks its version and joins the hub.
    async fn handshake(&mut self, conn: ConnId, hub: &Hub, session: &Session) -> Result<mpsc::Receiver<Outbound>, End> {
        let first = match timeout(self.limits.ws_hello_timeout, self.socket.recv()).await {
            Err(_) => return Err(End::Close(close::POLICY, "expected hello")),
            Ok(None) => return Err(End::Gone),
            Ok(Some(Err(e))) => return Err(transport_error(e)),
            Ok(Some(Ok(msg))) => msg,
        };
        let hello = match &first {
            Message::Text(text) => ClientMsg::from_json(text.as_str()).ok(),
            _ => None,
        };
        match hello {
            Some(ClientMsg::Hello { version }) if version == PROTOCOL_VERSION => {}
            Some(ClientMsg::Hello { .. }) => {
                let _ = self.write(ServerMsg::Reload { version: PROTOCOL_VERSION }).await;
                return Err(End::Close(close::RELOAD, "protocol version changed: reload the page"));
            }
            _ => return Err(End::Close(close::POLICY, "expected hello")),
        }
        let (outbox_tx, outbox) = mpsc::channel(self.limits.ws_outbox);
        let (welcome_tx, welcome_rx) = oneshot::channel();
        let arrival =
            Arrival { session: session.key, user: session.user.summary(), outbox: outbox_tx, welcome: welcome_tx };
        let join = Command::Join { conn, arrival };
        let gone = End::from(Closing::GoingAway);
        hub.send(join).await.map_err(|_| gone)?;
        // Written here rather than through the outbox: it may be many frames, and the outbox is
        // sized for what arrives while a client is connected.
        let frames = welcome_rx.await.map_err(|_| gone)?.map_err(End::from)?;
        for frame in frames {
            if let Step::Stop(end) = self.write_frame(Message::Text(frame)).await {
                return Err(end);
            }
        }
        Ok(outbox)
    }

    async fn run(&mut self, conn: ConnId, hub: &Hub, mut outbox: mpsc::Receiver<Outbound>) -> End {
        let ping_every = self.limits.ws_ping_interval;
        let mut last_heard = Instant::now();
        let heartbeat = sleep_until(last_heard + ping_every);
        tokio::pin!(heartbeat);
        loop {
            let step = tokio::select! {
                incoming = self.socket.recv() => match incoming {
                    None => Step::Stop(End::Gone),
                    Some(Err(e)) => Step::Stop(transport_error(e)),
                    Some(Ok(msg)) => {
                        last_heard = Instant::now();
                        self.on_message(conn, hub, msg).await
                    }
                },
                out = outbox.recv() => match out {
                    Some(Outbound::Text(text)) => self.write_frame(Message::Text((*text).clone())).await,
                    Some(Outbound::Close(why)) => Step::Stop(why.into()),
                    // The hub forgot this connection because its outbox was full.
                    None => Step::Stop(End::Close(close::TOO_SLOW, "too slow to read")),
                },
                () = &mut heartbeat => {
                    let now = Instant::now();
                    heartbeat.as_mut().reset(now + ping_every);
                    if now.duration_since(last_heard) >= self.limits.ws_idle_timeout {
                        Step::Stop(End::Close(close::IDLE, "idle timeout"))
                    } else {
                        self.write_frame(Message::Ping(axum::body::Bytes::new())).await
                    }
                }
            };
            if let Step::Stop(end) = step {
                return end;
            }
        }
    }

    async fn on_message(&mut self, conn: ConnId, hub: &Hub, msg: Message) -> Step {
        let text = match msg {
            Message::Text(text) => text,
            Message::Binary(_) => return self.strike("the hub speaks JSON text, not binary").await,
            Message::Ping(_) | Message::Pong(_) => return Step::Continue,
            Message::Close(_) => return Step::Stop(End::Gone),
        };
        if !self.inbound.take(Instant::now()) {
            return Step::Stop(End::Close(close::POLICY, "too many messages"));
        }
        match ClientMsg::from_json(text.as_str()) {
            Err(_) => self.strike("not a valid message").await,
            Ok(ClientMsg::Hello { .. }) => self.reply_error(ErrorCode::Unexpected, "Already said hello.").await,
            Ok(ClientMsg::Ping { id }) => self.reply(ServerMsg::Pong { id }).await,
            Ok(ClientMsg::Chat { text }) => {
                let text = visible_chat(&text);
                let text = text.trim();
                let chars = text.chars().count();
                if chars == 0 || chars > MAX_CHAT_CHARS {
                    let message = format!("Chat messages are 1 to {MAX_CHAT_CHARS} characters.");
                    return self.reply_error(ErrorCode::ChatLength, &message).await;
                }
                self.forward(hub, Command::Chat { conn, text: text.to_owned() }).await
            }
            Ok(ClientMsg::FindMatch { mode }) => {
                let Some(mode) = hub.rooms().mode(&mode) else {
                    return self.reply_error(ErrorCode::UnknownMode, "There is no such mode.").await;
                };
                // The hub never waits for the database, so the rating is read here.
                let Ok(rating) = results::rating(hub.db(), self.user_id, mode.name).await else {
                    return self.reply_error(ErrorCode::Busy, "The server is busy; try again.").await;
                };
                self.forward(hub, Command::FindMatch { conn, mode, rating }).await
            }
            Ok(ClientMsg::CancelMatch) => self.forward(hub, Command::CancelMatch { conn }).await,
            Ok(ClientMsg::RtcOffer { room, sdp, ticket, negotiated }) => {
                // A seat on a room server: the hub relays; the answer comes back through it.
                let signal = RemoteSignal::Offer { sdp: sdp.clone(), ticket: ticket.clone(), negotiated };
                match hub.relay_rtc(conn, &room, signal).await {
                    Ok(true) => return Step::Continue,
                    Ok(false) => {}
                    Err(_) => return Step::Stop(End::Close(close::GOING_AWAY, "server shutting down")),
                }
                let offer = Offer { sdp: &sdp, ticket: ticket.as_deref(), negotiated };
                match hub.rtc().offer(self.user_id, conn, &room, offer, hub.rooms()) {
                    Ok(sdp) => self.reply(ServerMsg::RtcAnswer { room, sdp }).await,
                    Err(e) => self.refuse_rtc(hub, &e).await,
                }
            }
            Ok(ClientMsg::RtcCandidate { room, candidate, .. }) => {
                match hub.relay_rtc(conn, &room, RemoteSignal::Candidate(candidate.clone())).await {
                    Ok(true) => return Step::Continue,
                    Ok(false) => {}
                    Err(_) => return Step::Stop(End::Close(close::GOING_AWAY, "server shutting down")),
                }
                match hub.rtc().candidate(self.user_id, conn, &room, &candidate) {
                    Ok(()) => Step::Continue,
                    Err(e) => self.refuse_rtc(hub, &e).await,
                }
            }
        }
    }

    async fn refuse_rtc(&mut self, hub: &Hub, e: &RtcError) -> Step {
        hub.rtc().stats().offers_refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.reply_error(ErrorCode::Rtc, &e.to_string()).await
    }

    async fn forward(&mut self, hub: &Hub, command: Command) -> Step {
        match hub.send(command).await {
            Ok(()) => Step::Continue,
            Err(_) => Step::Stop(End::Close(close::GOING_AWAY, "server shutting down")),
        }
    }

    /// Counts a malformed message: an error reply, and the connection closes after too many.
    async fn strike(&mut self, what: &str) -> Step {
        self.strikes += 1;
        if self.strikes >= self.limits.ws_malformed_strikes {
            return Step::Stop(End::Close(close::POLICY, "too many malformed messages"));
        }
        self.reply_error(ErrorCode::Malformed, what).await
    }

    async fn reply_error(&mut self, code: ErrorCode, message: &str) -> Step {
        self.reply(ServerMsg::Error { code, message: message.to_owned() }).await
    }

    async fn reply(&mut self, msg: ServerMsg) -> Step {
        match self.write(msg).await {
            Ok(()) => Step::Continue,
            Err(end) => Step::Stop(end),
        }
    }

    async fn write(&mut self, msg: ServerMsg) -> Result<(), End> {
        match self.write_frame(Message::Text(msg.to_json().into())).await {
            Step::Continue => Ok(()),
            Step::Stop(end) => Err(end),
        }
    }

    /// Writes one frame; a client that does not take it within the write timeout is dropped.
    async fn write_frame(&mut self, frame: Message) -> Step {
        if ws::write(&mut self.socket, frame, self.limits.ws_write_timeout).await {
            Step::Continue
        } else {
            Step::Stop(End::Gone)
        }
    }

    async fn close(self, code: u16, reason: &'static str) {
        ws::close_with(self.socket, code, reason).await;
    }
}

/// Chat text without what can hide or disguise it: control characters (a tab or line break
/// becomes a space), bidirectional overrides and isolates (which reverse how the rest of a line
/// reads), and zero-width characters.
fn visible_chat(text: &str) -> String {
    text.chars()
        .filter_map(|c| match c {
            '\t' | '\n' | '\r' => Some(' '),
            '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{2069}' | '\u{FEFF}' => None,
            c if c.is_control() => None,
            c => Some(c),
        })
        .collect()
}

/// A read error: an oversized message gets close code 1009; anything else just ends.
fn transport_error(e: axum::Error) -> End {
    match ws::read_error_code(e) {
        Some(code) => End::Close(code, "message too big"),
        None => End::Gone,
    }
}

#[cfg(test)]
mod tests {
    use super::visible_chat;

    #[test]
    fn chat_loses_controls_overrides_and_zero_width_characters() {
        assert_eq!(visible_chat("gg\u{202E}txt.exe"), "ggtxt.exe");
        assert_eq!(visible_chat("a\u{200B}b\u{FEFF}c\u{2066}d\u{2069}"), "abcd");
        assert_eq!(visible_chat("bell\u{7}\u{1b}[31mred"), "bell[31mred");
        assert_eq!(visible_chat("two\nlines\tand tab"), "two lines and tab");
        assert_eq!(visible_chat("héllo 👋 مرحبا"), "héllo 👋 مرحبا", "letters and emoji of any script stay");
    }
}
