//! `rallypoint bench soak` (`cargo xtask soak --minutes N`): bots sign in, play duels, drop
//! their match connection (a relay cuts one every few seconds) and come back, sign out and in
//! again, without pause, for N minutes. Resident memory and open files are sampled: at the end
//! they must be within 5% of the 10-minute mark (or of the half-way mark in shorter runs), with no
//! error, and every result a bot saw announced must be in the database.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use serde::Serialize;
use shared::game::Rng;
use tokio::time::Instant;

use super::relay::{Kind, Relay};
use super::{Backstage, ServerProcess, write_json};
use crate::bots::{Tally, Transport};
use crate::client::{Client, Conditions};

#[derive(Debug, Args)]
pub struct SoakArgs {
    /// How long to run.
    #[arg(long, default_value_t = 60)]
    minutes: u64,
    /// Bots playing at once.
    #[arg(long, default_value_t = 24)]
    bots: usize,
    /// Time between two cuts of a room connection, in seconds.
    #[arg(long, default_value_t = 3)]
    cut_every: u64,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Debug, Default, Serialize)]
struct Sample {
    minute: f64,
    rss_kib: u64,
    open_files: u64,
}

#[derive(Debug, Default, Serialize)]
struct Report {
    minutes: u64,
    bots: usize,
    sessions: u64,
    matches_seen_ended: u64,
    results_in_database: i64,
    cuts: u64,
    room_connections_lost: u64,
    seats_regained: u64,
    seats_gone: u64,
    errors: u64,
    first_errors: Vec<String>,
    /// Means over the minute up to 10 minutes in (half-way in shorter runs), and over the last
    /// minute: the end is compared with the first.
    reference: Sample,
    end: Sample,
    rss_growth: f64,
    open_files_growth: f64,
    samples: Vec<Sample>,
}

pub async fn run(args: SoakArgs, backstage: &dyn Backstage) -> Result<()> {
    let (dir, url) = ServerProcess::prepare(backstage)?;
    let server = ServerProcess::start_on(dir, url.clone(), &["--match-seconds", "30"], 1).await?;
    let relay = Relay::start(server.addr).await?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.minutes * 60);
    let bots: Vec<_> = (1..=args.bots).map(|i| tokio::spawn(bot(relay.base(), i, deadline))).collect();

    let reference_at = Duration::from_secs(if args.minutes >= 20 { 600 } else { args.minutes * 30 });
    let mut reference_minute: Option<f64> = None;
    let mut report = Report { minutes: args.minutes, bots: args.bots, ..Report::default() };
    let mut rng = Rng::new(7);
    let mut cut = tokio::time::interval(Duration::from_secs(args.cut_every.max(1)));
    let mut sample = tokio::time::interval(Duration::from_secs(10));
    while Instant::now() < deadline {
        tokio::select! {
            _ = cut.tick() => report.cuts += u64::from(relay.cut(Kind::Room, rng.below(1 << 16) as usize)),
            _ = sample.tick() => {
                let s = Sample {
                    minute: started.elapsed().as_secs_f64() / 60.0,
                    rss_kib: server.rss_kib()?,
                    open_files: std::fs::read_dir(format!("/proc/{}/fd", server.pid()))?.count() as u64,
                };
                eprintln!("{:5.1} min: {} KiB resident, {} files open", s.minute, s.rss_kib, s.open_files);
                if reference_minute.is_none() && started.elapsed() >= reference_at {
                    reference_minute = Some(s.minute);
                }
                report.samples.push(s);
            }
        }
    }
    for bot in bots {
        let (tally, sessions) = bot.await?;
        report.sessions += sessions;
        report.matches_seen_ended += tally.matches;
        report.room_connections_lost += tally.room_connections_lost;
        report.seats_regained += tally.seats_regained.len() as u64;
        report.seats_gone += tally.seats_gone;
        report.errors += tally.errors.len() as u64;
        report.first_errors.extend(tally.errors.into_iter().take(5usize.saturating_sub(report.first_errors.len())));
    }
    // Connections come and go: compare the means over a minute up to each mark.
    let mean_before = |until: f64| {
        let window: Vec<&Sample> =
            report.samples.iter().filter(|s| s.minute > until - 1.0 && s.minute <= until).collect();
        let n = window.len().max(1) as u64;
        Sample {
            minute: until,
            rss_kib: window.iter().map(|s| s.rss_kib).sum::<u64>() / n,
            open_files: window.iter().map(|s| s.open_files).sum::<u64>() / n,
        }
    };
    report.reference = mean_before(reference_minute.unwrap_or(0.0));
    report.end = mean_before(report.samples.last().map_or(0.0, |s| s.minute));
    let growth = |end: u64, reference: u64| end as f64 / reference.max(1) as f64 - 1.0;
    report.rss_growth = growth(report.end.rss_kib, report.reference.rss_kib);
    report.open_files_growth = growth(report.end.open_files, report.reference.open_files);
    // Every result a player was shown is in the database (each duel has two players).
    report.results_in_database = backstage.results(&url).await?;
    server.stop()?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    write_json(args.json.as_ref(), &report)?;
    if report.errors > 0
        || report.results_in_database < report.matches_seen_ended as i64
        || report.rss_growth > 0.05
        || report.open_files_growth > 0.05
    {
        anyhow::bail!("the soak failed: see the report above");
    }
    Ok(())
}

/// One bot, over and over until the deadline: sign in, play for a while (through cuts), sign out.
/// Returns its tallies and the number of sessions it had.
async fn bot(base: String, i: usize, deadline: Instant) -> (Tally, u64) {
    let mut tally = Tally::default();
    let mut rng = Rng::new(i as u64);
    let mut sessions = 0;
    while Instant::now() < deadline {
        let name = format!("soaker{i}");
        let client = match Client::new(&base) {
            Ok(client) => client,
            Err(e) => {
                tally.errors.push(e.to_string());
                break; // a bad URL: trying again changes nothing
            }
        };
        if let Err(e) = client.register_or_login(&name, "soak password 123").await {
            // Counted, and tried again after a pause, as a person would.
            tally.errors.push(format!("{name}: {e}"));
            tokio::time::sleep(Duration::from_secs(2)).await;
            continue;
        }
        sessions += 1;
        let stint = Instant::now() + Duration::from_secs(30 + u64::from(rng.below(60)));
        let until = stint.min(deadline);
        crate::bots::play(&client, "duel", Transport::Webrtc, Conditions::default(), until, i as u64, &mut tally).await;
        if let Err(e) = client.logout().await {
            tally.errors.push(format!("{name} logout: {e}"));
        }
    }
    (tally, sessions)
}
