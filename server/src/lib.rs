//! The Rallypoint server as a library: `main.rs` parses flags and calls [`run`]; tests call
//! [`start`] with a port-0 listener.

pub mod accounts;
pub mod bus;
pub mod config;
pub mod db;
pub mod dump;
pub mod fleet;
pub mod fuzzing;
mod http;
pub mod hub;
pub mod metrics_endpoint;
mod random;
mod rate;
pub mod rooms;
pub mod site;
pub mod tls;
pub mod transport;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::accounts::Accounts;
use crate::config::Config;
use crate::db::Db;
use crate::hub::Hub;

/// Everything a request handler can reach.
pub struct App {
    pub config: Config,
    pub db: Db,
    pub accounts: Accounts,
    pub hub: Hub,
    /// Caps on WebSockets per session, user and address.
    pub sockets: Arc<site::caps::SocketCaps>,
}

/// The server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Db(#[from] db::DbError),
    #[error("cannot load the lobby chat: {0}")]
    Chat(#[from] sqlx::Error),
    #[error(transparent)]
    WebRtc(#[from] transport::webrtc::RtcBindError),
    #[error(transparent)]
    Bus(#[from] bus::BusError),
}

/// A server running in this process.
pub struct Running {
    pub addr: SocketAddr,
    pub app: Arc<App>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl Running {
    /// Stops accepting, closes every WebSocket with 1001, finishes requests in flight and
    /// writes what is queued for the database.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// Opens the database, starts the hub and the rooms (playing the demo arena), and serves on
/// `listener` until [`Running::stop`].
pub async fn start(listener: TcpListener, config: Config) -> Result<Running, StartError> {
    start_game::<shared::arena::Arena>(listener, config).await
}

/// Like [`start`], with rooms playing the game `G`.
pub async fn start_game<G: shared::game::Game>(listener: TcpListener, config: Config) -> Result<Running, StartError> {
    let addr = listener.local_addr().map_err(|e| db::DbError::Folder { path: "listener".into(), source: e })?;
    let db = db::open(&config.database_url).await?;
    // Before anything takes a handle on a series (the WebRTC loops take theirs once, at
    // start): a handle taken before the recorder exists records nothing, ever.
    if let Some(metrics) = config.metrics_listen {
        metrics_endpoint::serve(metrics, &config.instance)
            .await
            .map_err(|e| db::DbError::Folder { path: format!("metrics listener {metrics}"), source: e })?;
    }
    let signer = rooms::TicketSigner::from_seed(&db::secret(&db, "room-tickets-ed25519").await?);
    let (room_events, events) = tokio::sync::mpsc::channel(1024);
    let rtc = transport::webrtc::Rtc::bind(config.webrtc.clone(), addr)?;
    let tickets = (signer.verifier().clone(), rooms::LOCAL_SERVER);
    let rooms = rooms::Rooms::new::<G>(config.rooms.clone(), tickets, room_events, Arc::new(rtc.clone()));
    let local = (rooms, config.local_rooms);
    let accounts = Accounts::new(db.clone(), &config.limits);
    let bus = match &config.nats_url {
        Some(url) => Some(bus::Bus::connect(url, &config.instance, Arc::clone(accounts.throttle())).await?),
        None => None,
    };
    let (hub, hub_task) = Hub::start(db.clone(), config.limits.clone(), local, rtc, signer, events, bus).await?;
    let sockets = site::caps::SocketCaps::new(config.socket_limits());
    let app = Arc::new(App { config, db, accounts, hub, sockets });
    let (stop, stopped) = oneshot::channel::<()>();
    let router = site::router(Arc::clone(&app));
    let task = {
        let app = Arc::clone(&app);
        tokio::spawn(async move {
            let purge = tokio::spawn(purge_sessions(Arc::clone(&app)));
            let fleet = app
                .hub
                .bus()
                .map(|bus| tokio::spawn(hub::room_servers::listen_nats(Arc::clone(&app), bus.nats().clone())));
            let (limit, header_timeout) = (app.config.max_connections, app.config.limits.http_header_timeout);
            http::serve(listener, router, limit, header_timeout, app.config.tls.clone(), async {
                let _ = stopped.await;
                // Room servers that register now go to another instance.
                if let Some(fleet) = &fleet {
                    fleet.abort();
                }
                app.hub.shutdown().await;
            })
            .await;
            purge.abort();
            let _ = hub_task.await;
            if let Some(bus) = app.hub.bus() {
                bus.close().await;
            }
            app.db.close().await;
        })
    };
    Ok(Running { addr, app, stop, task })
}

/// Serves until `shutdown` completes, then stops gracefully.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), StartError> {
    let running = start(listener, config).await?;
    tracing::info!(addr = %running.addr, "serving");
    shutdown.await;
    tracing::info!("shutting down");
    running.stop().await;
    Ok(())
}

/// Deletes expired sessions once an hour.
async fn purge_sessions(app: Arc<App>) {
    let mut every = tokio::time::interval(std::time::Duration::from_hours(1));
    loop {
        every.tick().await;
        match app.accounts.purge_expired().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(sessions = n, "purged expired sessions"),
            Err(e) => tracing::warn!(error = %e, "could not purge expired sessions"),
        }
    }
}

/// Raises the limit on open files (every connection is one): to `want` for both the soft and
/// the hard limit where allowed (as root), else the soft limit to the hard one.
pub fn raise_fd_limit(want: Option<u64>) {
    #[allow(unsafe_code)]
    // SAFETY: getrlimit/setrlimit read and write a plain struct owned by this frame.
    unsafe {
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit) != 0 {
            return;
        }
        if let Some(want) = want.filter(|&w| w > limit.rlim_max) {
            let raised = libc::rlimit { rlim_cur: want, rlim_max: want };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raw const raised) == 0 {
                return;
            }
        }
        if limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &raw const limit);
        }
    }
}
