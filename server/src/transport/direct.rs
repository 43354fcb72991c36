//! A plain TCP connection whose write side a room can share with the connection's own task, so
//! that a room WebSocket's frames go from the room's tick to the socket with no task, channel or
//! copy between.
//!
//! The accept loop splits every plain TCP connection into a [`DirectIo`] (what hyper and then
//! tungstenite read and write) and a [`Direct`] handle (put in the request's extensions). Until
//! the room WebSocket [arms](Direct::arm) it, `DirectIo` writes exactly like the socket. Once
//! armed, the room writes each frame itself ([`Direct::write`]: a ready-made WebSocket header and
//! the payload in one `writev`), and both writers go through one lock and one backlog so that
//! frames never interleave: a write is taken whole (into the backlog if the socket is full) or
//! not at all. The connection's task drains the backlog when [told](Direct::backlog), and is told
//! too when the room found the socket full: it then waits for the socket to take bytes again,
//! and lets the client go if that takes longer than the write timeout, as it would for a frame
//! of its own.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, ready};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::protocol::frame::FrameHeader;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Control, Data, OpCode};

use crate::rooms::DirectWrite;

/// Bytes a connection may have waiting in its backlog. A lossy frame is written only onto an
/// empty backlog; frames that must arrive, and the connection's own, wait while it is fuller.
pub const MAX_BACKLOG: usize = 64 * 1024;

/// The longest WebSocket header a server writes (no mask).
const MAX_HEADER: usize = 10;

/// Splits a plain TCP connection into the I/O its HTTP server uses and the handle rooms write to.
pub fn split(stream: TcpStream) -> (DirectIo, Direct) {
    let (read, write) = stream.into_split();
    let shared = Arc::new(Shared {
        writer: Mutex::new(Writer {
            socket: write,
            backlog: BytesMut::new(),
            armed: false,
            stalled: false,
            closed: false,
        }),
        drain: Notify::new(),
    });
    (DirectIo { read, shared: shared.clone() }, Direct(shared))
}

struct Shared {
    writer: Mutex<Writer>,
    /// Told when the room left bytes in the backlog for the connection's task to write, or
    /// found the socket full.
    drain: Notify,
}

struct Writer {
    socket: OwnedWriteHalf,
    /// Bytes taken but not yet written, oldest first; always whole frames once armed.
    backlog: BytesMut,
    armed: bool,
    /// The room found the socket full: draining waits until it takes bytes again.
    stalled: bool,
    /// The connection is ending: the room writes nothing more.
    closed: bool,
}

impl Shared {
    fn writer(&self) -> MutexGuard<'_, Writer> {
        // A panic while holding the lock leaves the backlog as it was: still whole frames.
        self.writer.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Writer {
    /// Writes the backlog out until it is empty and the socket takes bytes (`Ready`), or the
    /// socket is full (`Pending`, woken when it has room).
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.backlog.is_empty() {
            match ready!(Pin::new(&mut self.socket).poll_write(cx, &self.backlog))? {
                0 => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                n => self.backlog.advance(n),
            }
            if self.backlog.is_empty() {
                // Backlogs are rare: an idle connection keeps no buffer.
                self.backlog = BytesMut::new();
            }
        }
        if self.stalled {
            ready!(self.socket.as_ref().poll_write_ready(cx))?;
            self.stalled = false;
        }
        Poll::Ready(Ok(()))
    }

    /// Puts `bufs` at the end of the backlog.
    fn keep(&mut self, bufs: &[IoSlice<'_>]) {
        for buf in bufs {
            self.backlog.extend_from_slice(buf);
        }
    }

    /// Writes `bufs` now as far as the socket takes them and keeps the rest; nothing may be in
    /// the backlog. `None` when the socket took nothing (full).
    fn write_now(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<Option<()>> {
        debug_assert!(self.backlog.is_empty());
        let mut written = match self.socket.try_write_vectored(bufs) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) => return Err(e),
        };
        for buf in bufs {
            let skip = written.min(buf.len());
            self.backlog.extend_from_slice(&buf[skip..]);
            written -= skip;
        }
        Ok(Some(()))
    }
}

/// A room's handle on a plain TCP connection's write side (cheap to clone).
#[derive(Clone)]
pub struct Direct(Arc<Shared>);

impl std::fmt::Debug for Direct {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Direct(..)")
    }
}

impl Direct {
    /// From now on every write is taken whole or not at all, and the room may write. Call it
    /// between two messages (the upgrade's answer has been written).
    pub fn arm(&self) {
        self.0.writer().armed = true;
    }

    /// The room writes nothing more (the connection is closing).
    pub fn close(&self) {
        self.0.writer().closed = true;
    }

    /// Resolves when the room left bytes in the backlog: flush the connection then.
    pub async fn backlog(&self) {
        self.0.drain.notified().await;
    }

    /// The handle rooms keep: it does not keep the connection open.
    pub fn downgrade(&self) -> std::sync::Weak<dyn DirectWrite> {
        let weak: std::sync::Weak<Shared> = Arc::downgrade(&self.0);
        weak
    }
}

impl DirectWrite for Shared {
    fn write(&self, frame: &[u8], lossy: bool) -> bool {
        let mut header = [0; MAX_HEADER];
        let header = binary_header(frame.len(), &mut header);
        let mut w = self.writer();
        if w.closed || !w.armed {
            return false;
        }
        let taken = if w.backlog.is_empty() {
            match w.write_now(&[IoSlice::new(header), IoSlice::new(frame)]) {
                Ok(taken) => taken.is_some(),
                // The connection is broken: its task finds out when it reads.
                Err(_) => {
                    w.closed = true;
                    return false;
                }
            }
        } else {
            false
        };
        if !taken {
            // Behind: a lossy frame is dropped, one that must arrive waits its turn (if it fits).
            if lossy || w.backlog.len() + header.len() + frame.len() > MAX_BACKLOG {
                w.stalled = true;
                self.drain.notify_one();
                return false;
            }
            w.keep(&[IoSlice::new(header), IoSlice::new(frame)]);
        }
        if !w.backlog.is_empty() {
            self.drain.notify_one();
        }
        true
    }
}

/// Formats the header of an unmasked, final binary WebSocket frame of `len` bytes.
fn binary_header(len: usize, out: &mut [u8; MAX_HEADER]) -> &[u8] {
    let header = FrameHeader { opcode: OpCode::Data(Data::Binary), ..FrameHeader::default() };
    let mut cursor = io::Cursor::new(&mut out[..]);
    header.format(len as u64, &mut cursor).expect("a server's header fits in 10 bytes");
    let n = cursor.position() as usize;
    &out[..n]
}

/// Whether the whole frames in `bufs` (as written, one after the other) include a close frame.
fn holds_close(bufs: &[IoSlice<'_>]) -> bool {
    // tungstenite writes one slice at a time; join the rare write of several.
    let joined: Vec<u8>;
    let bytes: &[u8] = match bufs {
        [one] => one,
        _ => {
            joined = bufs.iter().flat_map(|buf| buf.iter().copied()).collect();
            &joined
        }
    };
    let mut cursor = io::Cursor::new(bytes);
    while let Ok(Some((header, len))) = FrameHeader::parse(&mut cursor) {
        if header.opcode == OpCode::Control(Control::Close) {
            return true;
        }
        cursor.set_position(cursor.position().saturating_add(len));
    }
    false
}

/// The connection's own I/O: reads straight from the socket; writes as the socket does until
/// armed, then through the shared backlog.
pub struct DirectIo {
    read: OwnedReadHalf,
    shared: Arc<Shared>,
}

impl AsyncRead for DirectIo {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.read).poll_read(cx, buf)
    }
}

impl AsyncWrite for DirectIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let mut w = self.shared.writer();
        if !w.armed {
            return Pin::new(&mut w.socket).poll_write_vectored(cx, bufs);
        }
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        // Whole or nothing: a write taken in part could let a room's frame in mid-message.
        let ready = w.poll_drain(cx)?.is_ready();
        if !ready && w.backlog.len() + total > MAX_BACKLOG {
            // The socket will wake us (poll_drain registered).
            return Poll::Pending;
        }
        if holds_close(bufs) {
            // Nothing from the room after the close frame (tungstenite answers a client's close
            // before the connection's task hears of it).
            w.closed = true;
        }
        let taken = ready && w.write_now(bufs)?.is_some();
        if !taken {
            w.keep(bufs);
        }
        Poll::Ready(Ok(total))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.shared.writer().poll_drain(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut w = self.shared.writer();
        ready!(w.poll_drain(cx))?;
        Pin::new(&mut w.socket).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::{SinkExt, StreamExt};
    use tokio::net::{TcpListener, TcpSocket};
    use tokio_tungstenite::WebSocketStream;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::Role;

    /// A server-side WebSocket over a split connection, and the client's end, whose receive
    /// buffer is small so that the server's socket fills quickly.
    async fn pair() -> (WebSocketStream<DirectIo>, Direct, WebSocketStream<TcpStream>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpSocket::new_v4().unwrap();
        client.set_recv_buffer_size(4096).unwrap();
        let (client, accepted) = tokio::join!(client.connect(listener.local_addr().unwrap()), listener.accept());
        let (io, direct) = split(accepted.unwrap().0);
        direct.arm();
        let server = WebSocketStream::from_raw_socket(io, Role::Server, None).await;
        let client = WebSocketStream::from_raw_socket(client.unwrap(), Role::Client, None).await;
        (server, direct, client)
    }

    #[test]
    fn headers_match_tungstenite_s_own_framing() {
        for len in [0, 1, 125, 126, 65_535, 65_536, 1 << 20] {
            let mut ours = [0; MAX_HEADER];
            let ours = binary_header(len, &mut ours).to_vec();
            let mut theirs = Vec::new();
            tokio_tungstenite::tungstenite::protocol::frame::Frame::message(
                vec![0; len],
                OpCode::Data(Data::Binary),
                true,
            )
            .format(&mut theirs)
            .unwrap();
            assert_eq!(ours, theirs[..ours.len()], "header for {len} bytes");
            assert_eq!(theirs.len(), ours.len() + len);
        }
    }

    #[tokio::test]
    async fn frames_from_the_room_and_the_connection_never_interleave_and_a_full_socket_drops_only_lossy_ones() {
        let (mut server, direct, mut client) = pair().await;
        let room = direct.downgrade().upgrade().unwrap();
        // Fill the socket: lossy frames first go out, then are refused once it is full.
        let big = vec![7u8; 1000];
        let mut written = 0;
        while room.write(&big, true) {
            written += 1;
            assert!(written < 100_000, "the socket never filled");
        }
        // Full now: what must arrive is kept (backlog), lossy frames are refused.
        assert!(room.write(b"must arrive", false));
        assert!(!room.write(b"lossy", true));
        // The connection's own message queues behind, whole, and its flush waits for the reader.
        let flushing = tokio::spawn(async move {
            server.send(Message::binary(vec![1u8; 3000])).await.unwrap();
            server
        });
        // The client reads everything, in order, every frame whole.
        for _ in 0..written {
            assert_eq!(client.next().await.unwrap().unwrap(), Message::binary(big.clone()));
        }
        assert_eq!(client.next().await.unwrap().unwrap(), Message::binary(&b"must arrive"[..]));
        assert_eq!(client.next().await.unwrap().unwrap(), Message::binary(vec![1u8; 3000]));
        let mut server = flushing.await.unwrap();
        assert_eq!(direct.0.writer().backlog.capacity(), 0, "the drained backlog's buffer is freed");
        // Drained: lossy frames go straight out again, and the connection can close cleanly.
        assert!(room.write(b"again", true));
        assert_eq!(client.next().await.unwrap().unwrap(), Message::binary(&b"again"[..]));
        // Nothing from the room follows the connection's close frame.
        server.close(None).await.unwrap();
        assert!(!room.write(b"after close", false));
        assert!(matches!(client.next().await.unwrap().unwrap(), Message::Close(_)));
    }

    #[test]
    fn a_close_frame_is_found_among_the_frames_of_a_write() {
        use tokio_tungstenite::tungstenite::protocol::frame::Frame;
        let frame = |message: Message| {
            let mut out = Vec::new();
            let frame = match message {
                Message::Binary(b) => Frame::message(b, OpCode::Data(Data::Binary), true),
                Message::Pong(b) => Frame::pong(b),
                Message::Close(c) => Frame::close(c),
                _ => unreachable!(),
            };
            frame.format(&mut out).unwrap();
            out
        };
        let close = frame(Message::Close(None));
        let pong = frame(Message::Pong(vec![1; 125].into()));
        let long = frame(Message::binary(vec![0x88; 70_000]));
        let mid = frame(Message::binary(vec![0x88; 300]));
        assert!(holds_close(&[IoSlice::new(&close)]));
        assert!(!holds_close(&[IoSlice::new(&pong)]));
        assert!(!holds_close(&[IoSlice::new(&long), IoSlice::new(&mid)]), "payloads are skipped");
        let mut all = [pong.clone(), long.clone(), mid.clone()].concat();
        assert!(!holds_close(&[IoSlice::new(&all)]));
        all.extend_from_slice(&close);
        assert!(holds_close(&[IoSlice::new(&all)]));
        let (a, b) = all.split_at(pong.len() + 3);
        assert!(holds_close(&[IoSlice::new(a), IoSlice::new(b)]), "across slices");
    }

    #[tokio::test]
    async fn the_backlog_is_bounded_and_told_to_the_connection() {
        let (_server, direct, _client) = pair().await;
        let room = direct.downgrade().upgrade().unwrap();
        while room.write(&[0; 1000], true) {}
        assert!(room.write(&[0; 1000], false), "a frame that must arrive waits in the backlog");
        // The room left a frame behind for the connection to write, and said so.
        tokio::time::timeout(std::time::Duration::from_secs(1), direct.backlog()).await.expect("told to drain");
        while room.write(&[0; 1000], false) {}
        let kept = direct.0.writer().backlog.len();
        assert!(kept <= MAX_BACKLOG && kept > MAX_BACKLOG - 1002, "{kept} bytes kept");
    }

    #[tokio::test]
    async fn a_room_writes_only_between_arming_and_closing_and_does_not_keep_the_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (_client, accepted) = tokio::join!(TcpStream::connect(listener.local_addr().unwrap()), listener.accept());
        let (io, direct) = split(accepted.unwrap().0);
        let weak = direct.downgrade();
        assert!(!weak.upgrade().unwrap().write(b"too early", false));
        direct.arm();
        assert!(weak.upgrade().unwrap().write(b"armed", false));
        direct.close();
        assert!(!weak.upgrade().unwrap().write(b"closing", false));
        drop((io, direct));
        assert!(weak.upgrade().is_none(), "the room's handle does not keep the connection");
    }
}
