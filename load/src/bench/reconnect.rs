//! `rallypoint bench reconnect`: bots play duels through a relay that cuts their room
//! connections at random moments; each bot comes back through the hub, as the browser does, and
//! takes its seat back. Reports how many cuts ended back in the seat, and how fast.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use serde::Serialize;
use shared::game::Rng;
use tokio::time::Instant;

use super::relay::{Kind, Relay};
use super::{Backstage, ServerProcess, write_json};
use crate::bots::{BotReport, Tally, Transport};
use crate::client::{Client, Conditions};

#[derive(Debug, Args)]
pub struct ReconnectArgs {
    /// Bots playing duels.
    #[arg(long, default_value_t = 32)]
    bots: usize,
    /// Room connections to cut.
    #[arg(long, default_value_t = 1000)]
    cuts: u64,
    /// Time between two cuts, in milliseconds.
    #[arg(long, default_value_t = 40)]
    every_ms: u64,
    /// What carries the bots' in-room traffic.
    #[arg(long, value_enum, default_value_t = Transport::Ws)]
    transport: Transport,
    /// Seed of which connection is cut when.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct Report {
    cuts: u64,
    /// Seats taken back over cuts that left a seat to take back (the match had not ended).
    back_in_seat_share: f64,
    bots: BotReport,
}

pub async fn run(args: ReconnectArgs, backstage: &dyn Backstage) -> Result<()> {
    let (dir, url) = ServerProcess::prepare(backstage)?;
    let server = ServerProcess::start(dir, url, &["--match-seconds", "60"]).await?;
    let report = measure(&args, server.addr).await?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    write_json(args.json.as_ref(), &report)
}

/// Runs the bots through a relay to `server`, cuts, and gathers the bots' report.
async fn measure(args: &ReconnectArgs, server: std::net::SocketAddr) -> Result<Report> {
    let relay = Relay::start(server).await?;
    let cutting = Duration::from_millis(args.every_ms) * u32::try_from(args.cuts).unwrap_or(u32::MAX);
    // Time to sign in and be matched, the cuts, then time for the last ones to come back.
    let deadline = Instant::now() + Duration::from_secs(20) + cutting + Duration::from_secs(10);
    let bots: Vec<_> = (1..=args.bots)
        .map(|i| {
            let (base, transport) = (relay.base(), args.transport);
            tokio::spawn(async move {
                let mut tally = Tally::default();
                let name = format!("rejoiner{i}");
                match Client::new(&base) {
                    Ok(client) => match client.register_or_login(&name, "bench password 123").await {
                        Ok(()) => {
                            let conditions = Conditions::default();
                            crate::bots::play(&client, "duel", transport, conditions, deadline, i as u64, &mut tally)
                                .await;
                        }
                        Err(e) => tally.errors.push(format!("{name}: {e}")),
                    },
                    Err(e) => tally.errors.push(e.to_string()),
                }
                tally
            })
        })
        .collect();
    let mut rng = Rng::new(args.seed);
    // Start once most bots are in a match.
    let ready = Instant::now() + Duration::from_secs(20);
    while relay.count(Kind::Room) < args.bots * 3 / 4 && Instant::now() < ready {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("{} bots in rooms; cutting {} room connections…", relay.count(Kind::Room), args.cuts);
    let mut cuts = 0;
    let mut every = tokio::time::interval(Duration::from_millis(args.every_ms));
    while cuts < args.cuts && Instant::now() + Duration::from_secs(10) < deadline {
        every.tick().await;
        if relay.cut(Kind::Room, rng.below(1 << 16) as usize) {
            cuts += 1;
        }
    }
    let mut tallies = Vec::new();
    for bot in bots {
        tallies.push(bot.await?);
    }
    let mut bots = crate::bots::report(args.bots, tallies);
    bots.transport = Some(args.transport);
    let could_return = bots.room_connections_lost.saturating_sub(bots.seats_gone).max(1);
    Ok(Report { cuts, back_in_seat_share: bots.seats_regained as f64 / could_return as f64, bots })
}
