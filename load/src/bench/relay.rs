//! A TCP relay between clients and a server that can cut connections at will: the "network
//! failure" of the reconnection benchmark and tests. It tells hub, room and page connections
//! apart by their HTTP request line, so that a cut can aim at players in a match. It can also
//! delay everything it carries, as a distant server's network would.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;
use tokio::time::{Duration, Instant};

/// What a relayed connection carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The hub WebSocket (`/ws`).
    Hub,
    /// A room WebSocket (`/room`).
    Room,
    /// Anything else (pages, forms).
    Page,
}

#[derive(Default)]
struct Live {
    next: AtomicU64,
    conns: Mutex<HashMap<u64, (Kind, AbortHandle)>>,
}

/// A running relay; dropping it stops accepting (relayed connections run on until cut or closed).
pub struct Relay {
    pub addr: SocketAddr,
    live: Arc<Live>,
    accept: AbortHandle,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl Relay {
    /// Listens on a free loopback port and relays every connection to `target`.
    pub async fn start(target: SocketAddr) -> std::io::Result<Self> {
        Self::start_with_latency(target, Duration::ZERO).await
    }

    /// Like [`Self::start`], each byte arriving `latency` after it was sent, either way (and a
    /// connection's first bytes a round trip later still: its TCP handshake).
    pub async fn start_with_latency(target: SocketAddr, latency: Duration) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let live = Arc::new(Live::default());
        let accept = tokio::spawn({
            let live = Arc::clone(&live);
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    let id = live.next.fetch_add(1, Ordering::Relaxed);
                    let task = tokio::spawn(relay(client, target, id, Arc::clone(&live), latency));
                    // Registered as a page until its request line says otherwise; a task that
                    // already ended has removed nothing yet, so it is dropped at its next cut.
                    live.conns
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .insert(id, (Kind::Page, task.abort_handle()));
                }
            }
        })
        .abort_handle();
        Ok(Self { addr, live, accept })
    }

    /// The base URL clients use to go through the relay.
    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Connections of `kind` open now.
    pub fn count(&self, kind: Kind) -> usize {
        self.conns().values().filter(|(k, h)| *k == kind && !h.is_finished()).count()
    }

    /// Cuts the `pick`-th (modulo their number) open connection of `kind`: both sides see the
    /// connection end without a close frame. `false` when none was open.
    pub fn cut(&self, kind: Kind, pick: usize) -> bool {
        let mut conns = self.conns();
        conns.retain(|_, (_, h)| !h.is_finished());
        let mut open: Vec<u64> = conns.iter().filter(|(_, (k, _))| *k == kind).map(|(id, _)| *id).collect();
        if open.is_empty() {
            return false;
        }
        open.sort_unstable();
        let id = open[pick % open.len()];
        if let Some((_, handle)) = conns.remove(&id) {
            handle.abort();
        }
        true
    }

    fn conns(&self) -> std::sync::MutexGuard<'_, HashMap<u64, (Kind, AbortHandle)>> {
        self.live.conns.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

async fn relay(mut client: TcpStream, target: SocketAddr, id: u64, live: Arc<Live>, latency: Duration) {
    let Ok(mut server) = TcpStream::connect(target).await else { return };
    let _ = (client.set_nodelay(true), server.set_nodelay(true));
    // The request line comes in the first read (clients send it in one write).
    let mut first = vec![0u8; 2048];
    let n = match client.read(&mut first).await {
        Ok(0) | Err(_) => return,
        Ok(n) => n,
    };
    let line = String::from_utf8_lossy(&first[..n.min(64)]).into_owned();
    let kind = if line.starts_with("GET /ws ") || line.starts_with("GET /ws?") {
        Kind::Hub
    } else if line.starts_with("GET /room") {
        Kind::Room
    } else {
        Kind::Page
    };
    if let Some(entry) = live.conns.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get_mut(&id) {
        entry.0 = kind;
    }
    // Sent after the handshake's round trip, it arrives one way later.
    tokio::time::sleep(3 * latency).await;
    if server.write_all(&first[..n]).await.is_ok() {
        if latency.is_zero() {
            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
        } else {
            let ((client_in, client_out), (server_in, server_out)) = (client.into_split(), server.into_split());
            tokio::join!(delayed_copy(client_in, server_out, latency), delayed_copy(server_in, client_out, latency));
        }
    }
    live.conns.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&id);
}

/// Copies `from` to `to`, each read written `latency` after it came, in order.
async fn delayed_copy(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, latency: Duration) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(Instant, Vec<u8>)>(256);
    let read = async move {
        let mut buf = vec![0u8; 16 * 1024];
        while let Ok(n @ 1..) = from.read(&mut buf).await {
            if tx.send((Instant::now() + latency, buf[..n].to_vec())).await.is_err() {
                break;
            }
        }
    };
    let write = async move {
        while let Some((due, bytes)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&bytes).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(read, write);
}
