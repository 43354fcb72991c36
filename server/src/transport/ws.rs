//! The WebSocket transport for rooms (`/room`), and WebSocket helpers the hub shares.
//!
//! The first frame is a [`JoinRequest`] with the hub's ticket; once the room gives the seat to
//! this connection, binary frames go to the room as they come, and the room's frames for this
//! WebSocket go out. While the player's WebRTC data channel is open the room sends the frames
//! that may be lost there instead (through the link's route), and this task only sees the
//! reliable ones. Over plain TCP the room writes its frames itself ([`Direct`]), and this task
//! writes only what the socket could not take at once, and the close.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::SinkExt;
use shared::room::{JoinRequest, ROOM_PROTOCOL_VERSION, close};
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};

use super::direct::Direct;
use super::webrtc::{Rtc, SeatGuard};
use crate::accounts::Session;
use crate::config::Limits;
use crate::rate::TokenBucket;
use crate::rooms::{Link, RoomCommand, Rooms, TicketError, ToClient};

/// Writes one frame, giving up after `limit` (a client that does not read is dropped).
pub async fn write(socket: &mut WebSocket, frame: Message, limit: Duration) -> bool {
    matches!(timeout(limit, socket.send(frame)).await, Ok(Ok(())))
}

/// Sends a close frame, reads until the client answers it (or goes), then lets the socket go;
/// a second at most. Dropping the socket right after the frame would meet the frames the client
/// was still sending with a reset, which can discard what we sent last (the match's result)
/// before the client reads it.
pub async fn close_with(mut socket: WebSocket, code: u16, reason: &str) {
    let frame = Message::Close(Some(CloseFrame { code, reason: reason.into() }));
    let _ = timeout(Duration::from_secs(1), async {
        if socket.send(frame).await.is_ok() {
            while let Some(Ok(message)) = socket.recv().await {
                if matches!(message, Message::Close(_)) {
                    break;
                }
            }
        }
    })
    .await;
}

/// A read error: `Some(1009)` for an oversized message (which deserves a close frame), `None`
/// for anything else (the connection is gone).
pub fn read_error_code(e: axum::Error) -> Option<u16> {
    use tokio_tungstenite::tungstenite::Error;
    match e.into_inner().downcast::<Error>() {
        Ok(e) if matches!(*e, Error::Capacity(_)) => Some(1009),
        _ => None,
    }
}

/// Runs one player's room connection until it ends. With a `session` (the hub's own rooms) the
/// ticket must be that user's; a room server has no sessions and goes by the ticket alone. With
/// `direct` (a plain TCP connection) the room writes its frames to the socket itself.
pub async fn serve(
    mut socket: WebSocket,
    direct: Option<Direct>,
    rooms: Rooms,
    rtc: Rtc,
    session: Option<Session>,
    limits: Arc<Limits>,
) {
    let first = match timeout(limits.ws_hello_timeout, socket.recv()).await {
        Ok(Some(Ok(Message::Binary(frame)))) => JoinRequest::decode(&frame).ok(),
        Ok(Some(Err(e))) => {
            if let Some(code) = read_error_code(e) {
                close_with(socket, code, "message too big").await;
            }
            return;
        }
        Ok(None | Some(Ok(Message::Close(_)))) => return,
        _ => None,
    };
    let Some(join) = first else {
        return close_with(socket, close::NO_JOIN, "expected a join request").await;
    };
    if join.version != ROOM_PROTOCOL_VERSION {
        return close_with(socket, close::RELOAD, "protocol version changed: reload the page").await;
    }
    let ticket = match rooms.verify(&join.ticket, session.as_ref().map(|s| s.user.id)) {
        Ok(ticket) => ticket,
        Err(e) => return close_with(socket, e.close_code(), &e.to_string()).await,
    };
    let Some(room) = rooms.mailbox(ticket.room) else {
        return close_with(socket, TicketError::Foreign.close_code(), &TicketError::Foreign.to_string()).await;
    };
    // The link takes the id and route of the peer an offer with this ticket may have begun.
    let reservation = rtc.reserve(&ticket, room.clone());
    let (mut link, mut to_client) = Link::on_route(reservation.link(), reservation.route());
    if let Some(direct) = &direct {
        // Arm between two messages: the upgrade's answer is written, and nothing of
        // tungstenite's (a pong) may be half out.
        if !matches!(timeout(limits.ws_write_timeout, socket.flush()).await, Ok(Ok(()))) {
            return;
        }
        direct.arm();
        link = link.writing_to(direct.downgrade());
    }
    let link_id = link.id;
    if let Err(e) = Rooms::claim(&room, ticket, link).await {
        return close_with(socket, e.close_code(), &e.to_string()).await;
    }
    tracing::debug!(link = link_id, room = %ticket.room, user = ticket.user_id, "room connection joined");
    let seat = rtc.seat(reservation);
    let end = pump(&mut socket, direct.as_ref(), &room, link_id, &mut to_client, &seat, &limits).await;
    if let Some(direct) = &direct {
        // Nothing after the close frame.
        direct.close();
    }
    drop(seat);
    // Tell the room, even if its mailbox is busy for a moment.
    let _ = timeout(Duration::from_secs(1), room.send(RoomCommand::Closed { link: link_id })).await;
    if let Some((code, reason)) = end {
        close_with(socket, code, reason).await;
    }
}

/// Moves frames both ways until one side ends; returns the close frame to send, if any.
async fn pump(
    socket: &mut WebSocket,
    direct: Option<&Direct>,
    room: &mpsc::Sender<RoomCommand>,
    link: u64,
    to_client: &mut mpsc::Receiver<ToClient>,
    seat: &SeatGuard,
    limits: &Limits,
) -> Option<(u16, &'static str)> {
    let mut inbound = TokenBucket::new(limits.room_messages_per_second, limits.room_message_burst, Instant::now());
    let mut strikes = 0;
    // Checked twice per timeout rather than re-armed on every message (a timer update each).
    let mut last_heard = Instant::now();
    let mut idle_check = tokio::time::interval(limits.room_idle_timeout / 2);
    idle_check.reset();
    loop {
        tokio::select! {
            incoming = socket.recv() => {
                last_heard = Instant::now();
                match incoming {
                    None | Some(Ok(Message::Close(_))) => return None,
                    Some(Err(e)) => return read_error_code(e).map(|code| (code, "message too big")),
                    Some(Ok(Message::Binary(frame))) => {
                        if !inbound.take(Instant::now()) {
                            return Some((close::POLICY, "too many messages"));
                        }
                        // A full mailbox drops the frame, as a lost datagram would be.
                        let _ = room.try_send(RoomCommand::Frame { link, frame });
                    }
                    Some(Ok(Message::Text(_))) => {
                        strikes += 1;
                        if strikes >= limits.ws_malformed_strikes {
                            return Some((close::POLICY, "rooms speak binary"));
                        }
                    }
                    // Answered by tungstenite, so they cost a write: under the same limit.
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {
                        if !inbound.take(Instant::now()) {
                            return Some((close::POLICY, "too many messages"));
                        }
                    }
                }
            }
            out = to_client.recv() => match out {
                Some(ToClient::Unreliable(frame) | ToClient::Reliable(frame)) => {
                    if !write(socket, Message::Binary(frame), limits.ws_write_timeout).await {
                        return None;
                    }
                }
                Some(ToClient::Close(code, reason)) => return Some((code, reason)),
                None => return Some((close::ROOM_FAILED, "the match stopped")),
            },
            // The room left a frame the socket could not take at once, or found it full: write it
            // out, or wait until the socket takes bytes again; a client that does not read for
            // the write timeout is let go.
            () = backlog(direct) => {
                if !matches!(timeout(limits.ws_write_timeout, socket.flush()).await, Ok(Ok(()))) {
                    return None;
                }
            }
            _ = idle_check.tick() => {
                let heard = seat.last_heard().map_or(last_heard, |dc| dc.max(last_heard));
                if heard.elapsed() >= limits.room_idle_timeout {
                    return Some((close::POLICY, "idle timeout"));
                }
            }
        }
    }
}

/// Resolves when the room left bytes for this task to write; never without a direct writer.
async fn backlog(direct: Option<&Direct>) {
    match direct {
        Some(direct) => direct.backlog().await,
        None => std::future::pending().await,
    }
}
