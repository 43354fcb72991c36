//! Command line and environment, validated once into a [`Config`] that the rest of the server
//! receives. Every flag can also be set with a `RALLYPOINT_*` environment variable.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address and port for HTTP and WebSocket traffic.
    #[arg(long, env = "RALLYPOINT_LISTEN", default_value = "127.0.0.1:8080", value_name = "ADDR:PORT")]
    pub listen: SocketAddr,

    /// Database to use. `sqlite://PATH` keeps everything in one file, created with its folder
    /// when missing; `postgres://USER:PASSWORD@HOST/DATABASE` is for several instances.
    #[arg(long, env = "RALLYPOINT_DATABASE_URL", default_value = "sqlite://./data/rallypoint.db", value_name = "URL")]
    pub database_url: String,

    /// The NATS server that the instances of a cluster share (lobbies, chat, sessions), such as
    /// `nats://nats.internal:4222`. Needs a PostgreSQL --database-url shared by every instance.
    #[arg(long, env = "RALLYPOINT_NATS_URL", value_name = "URL")]
    pub nats_url: Option<String>,

    /// This instance's name in metrics (the `instance` label) and logs. Default: the host's
    /// name and the --listen port.
    #[arg(long, env = "RALLYPOINT_INSTANCE", value_name = "NAME")]
    pub instance: Option<String>,

    /// Folder with the built client and stylesheets (the output of `cargo xtask dist` or Trunk).
    /// Default: `./static` when it exists, else `./web/dist`.
    #[arg(long, env = "RALLYPOINT_STATIC_DIR", value_name = "DIR")]
    pub static_dir: Option<PathBuf>,

    /// The origin browsers use to reach this server, such as `https://play.example.com`. It is
    /// the only `Origin` allowed for WebSocket upgrades and form posts, and `https` makes
    /// cookies `Secure`.
    /// Without it, a request's own Host is taken as the site's origin (fine on a laptop).
    #[arg(long, env = "RALLYPOINT_PUBLIC_URL", value_name = "URL")]
    pub public_url: Option<String>,

    /// Take the client address from the last `X-Forwarded-For` entry. Set it only behind a
    /// reverse proxy that sets that header, or clients can choose their own address.
    #[arg(long, env = "RALLYPOINT_TRUST_FORWARDED_FOR")]
    pub trust_forwarded_for: bool,

    /// Most TCP connections served at once (HTTP and WebSocket); further ones are closed at once.
    #[arg(long, env = "RALLYPOINT_MAX_CONNECTIONS", default_value_t = 50_000, value_name = "N")]
    pub max_connections: usize,

    /// Most users in one lobby: beyond it, people are put in a second lobby, and so on. Each lobby
    /// has its own presence list and chat.
    #[arg(long, env = "RALLYPOINT_LOBBY_CAPACITY", default_value_t = 1000, value_name = "USERS")]
    pub lobby_capacity: usize,

    /// Simulation ticks per second in every room (10 to 60).
    #[arg(long, env = "RALLYPOINT_TICK_RATE", default_value_t = 30, value_name = "HZ")]
    pub tick_rate: u16,

    /// Most matches playing at once; beyond it, players wait in the queue.
    #[arg(long, env = "RALLYPOINT_MAX_ROOMS", default_value_t = 1000, value_name = "N")]
    pub max_rooms: usize,

    /// Ends every match after this many seconds (each mode has its own limit otherwise).
    #[arg(long, env = "RALLYPOINT_MATCH_SECONDS", value_name = "SECONDS")]
    pub match_seconds: Option<u16>,

    /// Serve Prometheus metrics at `/metrics` on this address (off by default; keep it private).
    #[arg(long, env = "RALLYPOINT_METRICS_LISTEN", value_name = "ADDR:PORT")]
    pub metrics_listen: Option<SocketAddr>,

    /// UDP address and port that every WebRTC peer shares. Default: the address and port
    /// number of --listen, over UDP (so one port number is opened for TCP and UDP).
    #[arg(long, env = "RALLYPOINT_WEBRTC_LISTEN", value_name = "ADDR:PORT")]
    pub webrtc_listen: Option<SocketAddr>,

    /// The IP address browsers reach the WebRTC port at, when the server is behind NAT or in a
    /// container (announced as the server's ICE candidate). Default: the --webrtc-listen address
    /// (for 0.0.0.0, the address of the outward interface).
    #[arg(long, env = "RALLYPOINT_PUBLIC_IP", value_name = "IP")]
    pub public_ip: Option<std::net::IpAddr>,

    /// STUN/TURN servers handed to browsers, separated by spaces or commas, TURN ones with
    /// credentials: `stun:stun.example.org:3478 turn:USER:PASSWORD@turn.example.org:3478`.
    /// Needed only for players whose network blocks UDP to the server's port (then TURN).
    #[arg(long, env = "RALLYPOINT_ICE_SERVERS", value_name = "URLS", hide_env_values = true)]
    pub ice_servers: Option<String>,

    /// Most WebRTC peer connections at once; beyond it, players play over the WebSocket.
    #[arg(long, env = "RALLYPOINT_MAX_PEERS", default_value_t = 10_000, value_name = "N")]
    pub max_peers: usize,

    /// Loops that serve WebRTC peers, each with its own socket on the shared UDP port.
    /// Default (0): one per runtime worker thread, i.e. one per core.
    #[arg(long, env = "RALLYPOINT_WEBRTC_LOOPS", default_value_t = 0, value_name = "N")]
    pub webrtc_loops: usize,

    /// PEM certificate chain (leaf first) to serve `https` and `wss` directly, with
    /// --tls-key. Without them the server speaks plain HTTP (put a TLS proxy in front).
    #[arg(long, env = "RALLYPOINT_TLS_CERT", value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, env = "RALLYPOINT_TLS_KEY", value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Run matches in this process (`on`), or only on room servers (`off`): with `off`, players
    /// wait in the queue until a room server has a free room.
    #[arg(long, env = "RALLYPOINT_LOCAL_ROOMS", default_value = "on", value_name = "on|off", value_parser = on_off, action = clap::ArgAction::Set)]
    pub local_rooms: bool,

    /// Log filter, for example `info` or `rallypoint_server=debug,info`.
    #[arg(long, env = "RALLYPOINT_LOG", default_value = "info", value_name = "FILTER")]
    pub log: String,
}

fn on_off(value: &str) -> Result<bool, String> {
    match value {
        "on" => Ok(true),
        "off" => Ok(false),
        other => Err(format!("{other:?} is neither on nor off")),
    }
}

/// The validated configuration of a running server.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the database lives.
    pub database_url: String,
    /// Folder of static files served under `/static/`.
    pub static_dir: PathBuf,
    /// The site's public origin (`scheme://host[:port]`), when configured.
    pub public_origin: Option<String>,
    /// Whether cookies carry the `Secure` attribute (the public URL is https, or TLS is served).
    pub secure_cookies: bool,
    /// See [`ServeArgs::trust_forwarded_for`].
    pub trust_forwarded_for: bool,
    /// See [`ServeArgs::max_connections`].
    pub max_connections: usize,
    /// TLS served by this process (`--tls-cert/--tls-key`), if any.
    pub tls: Option<crate::tls::Tls>,
    /// Limits and timeouts, with production defaults; tests shorten some of them.
    pub limits: Limits,
    /// How rooms run.
    pub rooms: crate::rooms::RoomConfig,
    /// Where to serve metrics, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    /// How WebRTC peers are served.
    pub webrtc: crate::transport::webrtc::RtcConfig,
    /// Whether matches run in this process (else only on room servers).
    pub local_rooms: bool,
    /// The cluster's NATS server, when this is one instance of several.
    pub nats_url: Option<String>,
    /// This instance's name (metrics' `instance` label).
    pub instance: String,
}

/// Sizes, rates and timeouts. The defaults are what production runs with.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest HTTP request body (forms).
    pub http_body_bytes: usize,
    /// Time allowed for a whole HTTP request/response, WebSocket upgrades excluded.
    pub http_request_timeout: Duration,
    /// Time allowed for a client to send its request headers.
    pub http_header_timeout: Duration,
    /// How long a session lasts after login.
    pub session_ttl: Duration,
    /// Failed logins allowed from one address on one account within [`Self::login_window`].
    pub login_failures_per_account_address: u32,
    /// Failed logins allowed per client address within [`Self::login_window`].
    pub login_failures_per_address: u32,
    /// Failed logins on an account, from anywhere, before it is paced (never locked).
    pub login_failures_per_account: u32,
    /// A paced account takes one attempt per this long, except from addresses that logged into
    /// it before.
    pub login_account_pace: Duration,
    /// The window over which failed logins are counted.
    pub login_window: Duration,
    /// Password hashes waiting for a hashing thread; beyond it a login gets "busy, retry".
    pub hash_queue: usize,
    /// Threads that hash passwords (run at a lower CPU priority than the network).
    pub hash_threads: usize,
    /// WebSockets (hub and room together) one session may hold at once.
    pub ws_per_session: u32,
    /// WebSockets one user may hold at once, over all their sessions.
    pub ws_per_user: u32,
    /// WebSockets one client address may hold at once (a household or a school shares one).
    pub ws_per_address: u32,
    /// Registrations one client address may make in a burst, then per hour.
    pub registrations_per_address: u32,
    /// Messages queued for one WebSocket client before it is dropped as too slow.
    pub ws_outbox: usize,
    /// Time a client has to send `hello` after the upgrade.
    pub ws_hello_timeout: Duration,
    /// Interval between server pings.
    pub ws_ping_interval: Duration,
    /// A connection with no traffic at all for this long is closed.
    pub ws_idle_timeout: Duration,
    /// Time allowed for one write to a client before it is dropped as too slow.
    pub ws_write_timeout: Duration,
    /// Malformed messages tolerated on one connection before it is closed with 1008.
    pub ws_malformed_strikes: u32,
    /// Messages a client may send per second on average, and in a burst.
    pub ws_messages_per_second: f64,
    /// See [`Self::ws_messages_per_second`].
    pub ws_message_burst: f64,
    /// Most users in one lobby.
    pub lobby_capacity: usize,
    /// Messages a player may send a room per second on average, and in a burst.
    pub room_messages_per_second: f64,
    /// See [`Self::room_messages_per_second`].
    pub room_message_burst: f64,
    /// A room connection with no traffic for this long is closed.
    pub room_idle_timeout: Duration,
    /// Chat messages a user may send per second on average, and in a burst.
    pub chat_per_second: f64,
    /// See [`Self::chat_per_second`].
    pub chat_burst: f64,
}

impl Default for Limits {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        Self {
            http_body_bytes: 16 * 1024,
            http_request_timeout: Duration::from_secs(15),
            http_header_timeout: Duration::from_secs(10),
            session_ttl: Duration::from_hours(30 * 24),
            login_failures_per_account_address: 5,
            login_failures_per_address: 30,
            login_failures_per_account: 10,
            login_account_pace: Duration::from_secs(30),
            login_window: Duration::from_mins(15),
            hash_queue: 256,
            ws_per_session: 8,
            ws_per_user: 16,
            ws_per_address: 256,
            registrations_per_address: 10,
            hash_threads: cores,
            ws_outbox: 64,
            ws_hello_timeout: Duration::from_secs(10),
            ws_ping_interval: Duration::from_secs(20),
            ws_idle_timeout: Duration::from_mins(1),
            ws_write_timeout: Duration::from_secs(10),
            ws_malformed_strikes: 5,
            ws_messages_per_second: 20.0,
            ws_message_burst: 40.0,
            lobby_capacity: 1000,
            room_messages_per_second: 90.0,
            room_message_burst: 180.0,
            room_idle_timeout: Duration::from_secs(10),
            chat_per_second: 1.0,
            chat_burst: 5.0,
        }
    }
}

/// A configuration value that cannot be used, with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--public-url {0:?} is not an http(s) origin such as https://play.example.com")]
    PublicUrl(String),
    #[error("--database-url {0:?} is not supported: use sqlite://PATH or postgres://USER:PASSWORD@HOST/DATABASE")]
    DatabaseUrl(String),
    #[error(
        "no built client in {0}: run `cargo xtask run` (or `cargo xtask dist`), or point --static-dir at a folder holding rallypoint-client.js"
    )]
    StaticDir(PathBuf),
    #[error(
        "--nats-url joins instances into a cluster, and a SQLite database belongs to one instance: give every instance the same --database-url postgres://…, or leave out --nats-url"
    )]
    NatsWithSqlite,
    #[error("--nats-url {0:?} is not a NATS URL such as nats://nats.internal:4222")]
    NatsUrl(String),
    #[error("--max-connections must be at least 1")]
    MaxConnections,
    #[error("--lobby-capacity must be at least 1")]
    LobbyCapacity,
    #[error("--tick-rate must be between 10 and 60")]
    TickRate,
    #[error("--max-rooms must be at least 1")]
    MaxRooms,
    #[error("--match-seconds must be at least 5")]
    MatchSeconds,
    #[error("--ice-servers: {0}")]
    IceServers(String),
    #[error("--max-peers must be at least 1")]
    MaxPeers,
    #[error("--tls-cert/--tls-key {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("--webrtc-loops must be at most {MAX_WEBRTC_LOOPS} (0: one per core)")]
    WebrtcLoops,
}

impl Config {
    /// Validates command-line arguments into a configuration.
    pub fn from_args(args: &ServeArgs) -> Result<Self, ConfigError> {
        let public_origin = args.public_url.as_deref().map(parse_origin).transpose()?;
        let tls = match (&args.tls_cert, &args.tls_key) {
            (Some(cert), Some(key)) => Some(crate::tls::load(cert, key)?),
            _ => None,
        };
        let secure_cookies = tls.is_some() || public_origin.as_deref().is_some_and(|o| o.starts_with("https://"));
        let backend = crate::db::Backend::of_url(&args.database_url);
        if backend.is_none() {
            return Err(ConfigError::DatabaseUrl(args.database_url.clone()));
        }
        if let Some(nats) = &args.nats_url {
            if backend == Some(crate::db::Backend::Sqlite) {
                return Err(ConfigError::NatsWithSqlite);
            }
            if !(nats.starts_with("nats://") || nats.starts_with("tls://")) {
                return Err(ConfigError::NatsUrl(nats.clone()));
            }
        }
        if args.max_connections == 0 {
            return Err(ConfigError::MaxConnections);
        }
        if args.lobby_capacity == 0 {
            return Err(ConfigError::LobbyCapacity);
        }
        if !(10..=60).contains(&args.tick_rate) {
            return Err(ConfigError::TickRate);
        }
        if args.max_rooms == 0 {
            return Err(ConfigError::MaxRooms);
        }
        if args.match_seconds.is_some_and(|s| s < 5) {
            return Err(ConfigError::MatchSeconds);
        }
        let static_dir = match &args.static_dir {
            Some(dir) => dir.clone(),
            None => ["static", "web/dist"]
                .iter()
                .map(PathBuf::from)
                .find(|d| d.is_dir())
                .unwrap_or_else(|| PathBuf::from("static")),
        };
        check_static_dir(&static_dir)?;
        let ice_servers = crate::transport::webrtc::parse_ice_servers(args.ice_servers.as_deref().unwrap_or(""))
            .map_err(ConfigError::IceServers)?;
        if args.max_peers == 0 {
            return Err(ConfigError::MaxPeers);
        }
        if args.webrtc_loops > MAX_WEBRTC_LOOPS {
            return Err(ConfigError::WebrtcLoops);
        }
        Ok(Self {
            database_url: args.database_url.clone(),
            static_dir,
            public_origin,
            secure_cookies,
            trust_forwarded_for: args.trust_forwarded_for,
            max_connections: args.max_connections,
            tls,
            limits: Limits { lobby_capacity: args.lobby_capacity, ..Limits::default() },
            rooms: crate::rooms::RoomConfig {
                tick_hz: args.tick_rate,
                max_rooms: args.max_rooms,
                time_limit_secs: args.match_seconds,
                ..crate::rooms::RoomConfig::default()
            },
            metrics_listen: args.metrics_listen,
            local_rooms: args.local_rooms,
            nats_url: args.nats_url.clone(),
            instance: args.instance.clone().unwrap_or_else(|| default_instance(args.listen.port())),
            webrtc: crate::transport::webrtc::RtcConfig {
                listen: args.webrtc_listen,
                public_ip: args.public_ip,
                ice_servers,
                max_peers: args.max_peers,
                shards: args.webrtc_loops,
                ..Default::default()
            },
        })
    }

    /// The WebSocket caps: a tenth of `--max-connections` is kept for page loads.
    pub fn socket_limits(&self) -> crate::site::caps::SocketLimits {
        crate::site::caps::SocketLimits {
            per_session: self.limits.ws_per_session,
            per_user: self.limits.ws_per_user,
            per_address: self.limits.ws_per_address,
            total: self.max_connections - self.max_connections / 10,
        }
    }

    /// A configuration for tests and tools: the given database and static folder, default limits.
    pub fn new(database_url: impl Into<String>, static_dir: impl Into<PathBuf>) -> Self {
        Self {
            database_url: database_url.into(),
            static_dir: static_dir.into(),
            public_origin: None,
            secure_cookies: false,
            trust_forwarded_for: false,
            max_connections: 50_000,
            tls: None,
            limits: Limits::default(),
            rooms: crate::rooms::RoomConfig::default(),
            metrics_listen: None,
            webrtc: crate::transport::webrtc::RtcConfig {
                listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
                ..Default::default()
            },
            local_rooms: true,
            nats_url: None,
            instance: "test".to_owned(),
        }
    }
}

/// `HOSTNAME:PORT`, from the kernel's host name.
fn default_instance(port: u16) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host = host.trim();
    format!("{}:{port}", if host.is_empty() { "localhost" } else { host })
}

/// More loops than this would be a typo: each is a socket and a task.
pub const MAX_WEBRTC_LOOPS: usize = 256;

/// The file that proves a folder holds the built client.
pub const CLIENT_JS: &str = "rallypoint-client.js";

fn check_static_dir(dir: &Path) -> Result<(), ConfigError> {
    if dir.join(CLIENT_JS).is_file() { Ok(()) } else { Err(ConfigError::StaticDir(dir.to_path_buf())) }
}

/// Reduces a URL such as `https://Example.com:443/x` to its origin, `https://example.com`.
fn parse_origin(raw: &str) -> Result<String, ConfigError> {
    let err = || ConfigError::PublicUrl(raw.to_owned());
    let url = url::Url::parse(raw).map_err(|_| err())?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(err());
    }
    Ok(url.origin().ascii_serialization())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_normalised() {
        assert_eq!(parse_origin("https://Play.Example.com/").unwrap(), "https://play.example.com");
        assert_eq!(parse_origin("https://example.com:443/x").unwrap(), "https://example.com");
        assert_eq!(parse_origin("http://127.0.0.1:8080").unwrap(), "http://127.0.0.1:8080");
        for bad in ["example.com", "ftp://example.com", "http://", "not a url"] {
            assert!(parse_origin(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn every_flag_has_an_environment_variable() {
        let serve = <ServeArgs as clap::Args>::augment_args(clap::Command::new("serve"));
        let room_server =
            <crate::fleet::room_server::RoomServerArgs as clap::Args>::augment_args(clap::Command::new("room-server"));
        for arg in serve.get_arguments().chain(room_server.get_arguments()) {
            if matches!(arg.get_id().as_str(), "help" | "version") {
                continue;
            }
            let env = arg.get_env().map(|e| e.to_string_lossy().into_owned());
            assert!(
                env.as_deref().is_some_and(|e| e.starts_with("RALLYPOINT_")),
                "--{} has no RALLYPOINT_ variable",
                arg.get_id()
            );
            assert!(arg.get_help().is_some(), "--{} has no help", arg.get_id());
        }
    }
}
