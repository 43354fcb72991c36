//! `rallypoint`: the command line (every subcommand) and what each runs. All logic lives in the
//! libraries: the server's (`config` validates `serve`'s flags) and, for `bots` and `bench`,
//! the load tools' (`rallypoint_load`), which reach the server's database only through
//! [`Backstage`] below.

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use futures_util::future::BoxFuture;
use rallypoint_server::config::{Config, ServeArgs};
use rallypoint_server::fleet::room_server::RoomServerArgs;

/// Rallypoint: a self-hosted multiplayer game server for the browser.
#[derive(Debug, Parser)]
#[command(name = "rallypoint", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the site, the lobby hub and the game rooms.
    Serve(ServeArgs),
    /// Host rooms for a hub, as a separate process (official or community).
    RoomServer(RoomServerArgs),
    /// Create, list and revoke the tokens room servers register with (run on the hub's host).
    RoomToken(RoomTokenArgs),
    /// Apply the database schema (SQLite or PostgreSQL) and say which version it is at.
    Migrate(DatabaseArgs),
    /// Write every row of a deployment's database as JSON lines (to move it, e.g. to PostgreSQL).
    Export(DumpArgs),
    /// Read an export into an empty database (migrated first), all or nothing.
    Import(DumpArgs),
    /// Run native bots that sign in, queue and play against a server, then report.
    Bots(rallypoint_load::bots::BotsArgs),
    /// Benchmarks, run by `cargo xtask bench` (not for production).
    #[command(hide = true)]
    Bench(rallypoint_load::bench::BenchArgs),
}

#[derive(Debug, Args)]
struct RoomTokenArgs {
    #[command(subcommand)]
    action: RoomTokenAction,

    /// The hub's database (as given to `rallypoint serve`).
    #[arg(
        long,
        env = "RALLYPOINT_DATABASE_URL",
        default_value = "sqlite://./data/rallypoint.db",
        value_name = "URL",
        global = true
    )]
    database_url: String,
}

#[derive(Debug, Args)]
struct DatabaseArgs {
    /// The database (as given to `rallypoint serve`): sqlite://PATH or postgres://USER:PASSWORD@HOST/DATABASE.
    #[arg(long, env = "RALLYPOINT_DATABASE_URL", default_value = "sqlite://./data/rallypoint.db", value_name = "URL")]
    database_url: String,
}

#[derive(Debug, Args)]
struct DumpArgs {
    #[command(flatten)]
    database: DatabaseArgs,
    /// The dump file (default: standard output for export, standard input for import).
    #[arg(long, value_name = "PATH")]
    file: Option<std::path::PathBuf>,
}

#[derive(Debug, Subcommand)]
enum RoomTokenAction {
    /// Create a room server's token and print it (only once: keep it).
    Create {
        /// The room server's name: lower-case letters, digits, '-', '_' and '.'.
        #[arg(long)]
        name: String,
        /// A community server: its results go to history as unofficial and change no rating.
        #[arg(long)]
        community: bool,
    },
    /// List room servers, their kind and whether their token is revoked.
    List,
    /// Revoke a room server's token: it is refused from now on, and disconnected if connected.
    Revoke {
        /// The room server's name.
        name: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve(&args),
        Command::Bench(args) => bench(args),
        Command::Bots(args) => bots(&args),
        Command::RoomServer(args) => room_server(&args),
        Command::RoomToken(args) => room_token(&args),
        Command::Migrate(args) => migrate(&args),
        Command::Export(args) => export(&args),
        Command::Import(args) => import(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(args: &ServeArgs) -> anyhow::Result<()> {
    init_logging(&args.log)?;
    let config = Config::from_args(args)?;
    rallypoint_server::raise_fd_limit(None);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(args.listen).await.map_err(|e| {
            anyhow::anyhow!(
                "cannot listen on {}: {e} (is another server running? choose another address with --listen)",
                args.listen
            )
        })?;
        rallypoint_server::run(listener, config, shutdown_signal()).await?;
        Ok(())
    })
}

fn room_server(args: &RoomServerArgs) -> anyhow::Result<()> {
    init_logging(&args.log)?;
    rallypoint_server::raise_fd_limit(None);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(rallypoint_server::fleet::room_server::run(args, shutdown_signal()))
}

fn room_token(args: &RoomTokenArgs) -> anyhow::Result<()> {
    use rallypoint_server::fleet::tokens;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let db = rallypoint_server::db::open(&args.database_url).await?;
        match &args.action {
            RoomTokenAction::Create { name, community } => {
                let token = tokens::create(&db, name, *community).await?;
                let kind = if *community { "community" } else { "official" };
                println!("{token}");
                eprintln!("Token of the {kind} room server {name:?}: shown only now. Start it with");
                eprintln!("  rallypoint room-server --hub URL --token TOKEN --public-url URL");
            }
            RoomTokenAction::List => {
                let servers = tokens::list(&db).await?;
                if servers.is_empty() {
                    println!("No room servers yet: `rallypoint room-token create --name NAME` makes one.");
                }
                for s in servers {
                    let kind = if s.community { "community" } else { "official" };
                    let state = if s.revoked_at.is_some() { "revoked" } else { "active" };
                    println!("{}\t{kind}\t{state}", s.name);
                }
            }
            RoomTokenAction::Revoke { name } => {
                tokens::revoke(&db, name).await?;
                println!("Revoked {name:?}: it is refused from now on.");
            }
        }
        db.close().await;
        anyhow::Ok(())
    })
}

fn migrate(args: &DatabaseArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let db = rallypoint_server::db::open(&args.database_url).await?;
        let version = rallypoint_server::db::schema_version(&db).await?;
        db.close().await;
        println!("The database is at schema version {version}.");
        Ok(())
    })
}

fn export(args: &DumpArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        // Not `open`: an export changes nothing, not even the schema.
        let db = rallypoint_server::db::connect(&args.database.database_url).await?;
        let counts = match &args.file {
            Some(path) => {
                let file =
                    std::fs::File::create(path).map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
                let mut out = std::io::BufWriter::new(file);
                rallypoint_server::dump::export(&db, &mut out).await?
            }
            None => {
                rallypoint_server::dump::export(&db, &mut std::io::BufWriter::new(std::io::stdout().lock())).await?
            }
        };
        db.close().await;
        eprintln!("Exported {}.", describe(&counts));
        Ok(())
    })
}

fn import(args: &DumpArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let db = rallypoint_server::db::open(&args.database.database_url).await?;
        let counts = match &args.file {
            Some(path) => {
                let file =
                    std::fs::File::open(path).map_err(|e| anyhow::anyhow!("cannot open {}: {e}", path.display()))?;
                rallypoint_server::dump::import(&db, std::io::BufReader::new(file)).await?
            }
            None => rallypoint_server::dump::import(&db, std::io::stdin().lock()).await?,
        };
        db.close().await;
        eprintln!("Imported {}.", describe(&counts));
        Ok(())
    })
}

fn describe(counts: &[(&str, u64)]) -> String {
    counts.iter().map(|(table, n)| format!("{n} {table}")).collect::<Vec<_>>().join(", ")
}

/// Runs the bots and prints their report; any protocol error makes the exit status non-zero.
fn bots(args: &rallypoint_load::bots::BotsArgs) -> anyhow::Result<()> {
    args.check().map_err(anyhow::Error::msg)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let report = runtime.block_on(rallypoint_load::bots::run(args));
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "{} bots: {} matches completed, {} inputs sent, {} snapshots received, RTT p50 {:.1} ms p99 {:.1} ms, {} corrections, {} protocol errors",
            report.bots,
            report.matches_completed,
            report.inputs_sent,
            report.snapshots_received,
            report.rtt_p50_ms,
            report.rtt_p99_ms,
            report.corrections,
            report.protocol_errors
        );
        for e in &report.errors {
            println!("  error: {e}");
        }
    }
    if report.protocol_errors > 0 {
        anyhow::bail!("{} protocol errors", report.protocol_errors);
    }
    Ok(())
}

fn bench(args: rallypoint_load::bench::BenchArgs) -> anyhow::Result<()> {
    rallypoint_server::raise_fd_limit(Some(200_000));
    rallypoint_load::bench::run(args, &Backstage)
}

/// What the benchmarks need from the server's database, done with the server library.
struct Backstage;

impl rallypoint_load::bench::Backstage for Backstage {
    fn players<'a>(
        &'a self,
        database_url: &'a str,
        prefix: &'a str,
        count: usize,
        password: &'a str,
    ) -> BoxFuture<'a, anyhow::Result<Vec<String>>> {
        Box::pin(async move {
            let db = rallypoint_server::db::open(database_url).await?;
            let ttl = std::time::Duration::from_hours(24);
            let tokens = rallypoint_server::accounts::seed_for_bench(&db, prefix, count, password, ttl).await;
            db.close().await;
            Ok(tokens?)
        })
    }

    fn room_token<'a>(&'a self, database_url: &'a str, name: &'a str) -> BoxFuture<'a, anyhow::Result<String>> {
        Box::pin(async move {
            let db = rallypoint_server::db::open(database_url).await?;
            let token = rallypoint_server::fleet::tokens::create(&db, name, false).await;
            db.close().await;
            Ok(token?)
        })
    }

    fn results<'a>(&'a self, database_url: &'a str) -> BoxFuture<'a, anyhow::Result<i64>> {
        Box::pin(async move {
            let db = rallypoint_server::db::open(database_url).await?;
            let count = rallypoint_server::hub::results::count_players_results(&db).await;
            db.close().await;
            Ok(count?)
        })
    }

    fn client_js(&self) -> &'static str {
        rallypoint_server::config::CLIENT_JS
    }
}

/// The WebRTC stack's crates log every state change of every peer at `info`: they get `warn`
/// unless the filter names them.
const QUIET_CRATES: [&str; 6] = ["webrtc", "webrtc_ice", "webrtc_sctp", "webrtc_dtls", "webrtc_data", "dtls"];

fn init_logging(filter: &str) -> anyhow::Result<()> {
    let mut directives = filter.to_owned();
    for krate in QUIET_CRATES {
        if !filter.split(',').any(|d| d.trim_start().starts_with(krate)) {
            directives.push(',');
            directives.push_str(krate);
            directives.push_str("=warn");
        }
    }
    let filter = tracing_subscriber::EnvFilter::try_new(&directives)
        .map_err(|e| anyhow::anyhow!("--log {filter:?} is not a valid log filter: {e}"))?;
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    tracing_subscriber::fmt().with_env_filter(filter).with_target(false).with_ansi(ansi).init();
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) else {
            return ctrl_c.await.unwrap_or(());
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
