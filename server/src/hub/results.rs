//! Match results and ratings: written by the hub, read by the pages.
//!
//! A finished match is written in one transaction: the match, its players, and their new
//! Glicko-2 ratings. Every player's result counts as a game against each other player: won when
//! ranked higher, lost when lower, drawn when level.

use shared::game::Outcome;
use shared::room::RatingChange;
use skillratings::Outcomes;
use skillratings::glicko2::{Glicko2Config, Glicko2Rating, glicko2_rating_period};

use crate::db::{Db, unix_now};
use crate::rooms::Seated;

/// A fresh player's rating.
pub const INITIAL_RATING: f64 = 1500.0;

/// A user's rating in a mode (the initial rating when they have not played it).
pub async fn rating(db: &Db, user_id: i64, mode: &str) -> Result<f64, sqlx::Error> {
    let found: Option<f64> = sqlx::query_scalar("SELECT rating FROM ratings WHERE user_id = $1 AND mode = $2")
        .bind(user_id)
        .bind(mode)
        .fetch_optional(db)
        .await?;
    Ok(found.unwrap_or(INITIAL_RATING))
}

/// Where a result comes from.
#[derive(Debug, Clone, Copy)]
pub struct Source<'a> {
    /// The room server's name; `None` for the hub's own rooms.
    pub server: Option<&'a str>,
    /// Official results change ratings; community servers' do not.
    pub official: bool,
    /// The room server's match id: a result reported twice is recorded once.
    pub match_id: Option<u64>,
}

impl Source<'_> {
    /// The hub's own rooms.
    pub const LOCAL: Source<'static> = Source { server: None, official: true, match_id: None };
}

/// A finished match, as recorded.
#[derive(Debug, Clone, Copy)]
pub struct Finished<'a> {
    /// The room's name, as pages and logs show it.
    pub room: &'a str,
    pub mode: &'a str,
    /// By seat.
    pub players: &'a [Seated],
    pub outcome: &'a Outcome,
    pub source: Source<'a>,
}

/// Records a finished match and returns each seat's rating change (none for an unofficial
/// one). A result whose match id is recorded already is not counted again: the changes recorded
/// then are returned.
pub async fn record(db: &Db, finished: &Finished<'_>) -> Result<Vec<RatingChange>, sqlx::Error> {
    let Finished { room, mode, players, outcome, source } = *finished;
    let mut tx = crate::db::begin_write(db).await?;
    let key = source.match_id.map(|id| format!("{}/{id}", source.server.unwrap_or("")));
    if let Some(key) = &key {
        let stored: Option<i64> = sqlx::query_scalar("SELECT id FROM matches WHERE match_key = $1")
            .bind(key)
            .fetch_optional(&mut *tx)
            .await?;
        if let Some(match_id) = stored {
            let rows: Vec<(f64, f64)> = sqlx::query_as(
                "SELECT rating_before, rating_after FROM match_players WHERE match_id = $1 ORDER BY seat",
            )
            .bind(match_id)
            .fetch_all(&mut *tx)
            .await?;
            return Ok(rows
                .into_iter()
                .map(|(b, a)| RatingChange { before: b.round() as i32, after: a.round() as i32 })
                .collect());
        }
    }
    let mut before = Vec::with_capacity(players.len());
    for p in players {
        let row: Option<(f64, f64, f64)> =
            sqlx::query_as("SELECT rating, deviation, volatility FROM ratings WHERE user_id = $1 AND mode = $2")
                .bind(p.user_id)
                .bind(mode)
                .fetch_optional(&mut *tx)
                .await?;
        before.push(row.map_or_else(Glicko2Rating::new, |(rating, deviation, volatility)| Glicko2Rating {
            rating,
            deviation,
            volatility,
        }));
    }
    let after = if source.official { new_ratings(&before, &outcome.ranks) } else { before.clone() };
    let match_id: i64 = sqlx::query_scalar(
        "INSERT INTO matches (mode, room, end_reason, ticks, ended_at, server, official, match_key)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id",
    )
    .bind(mode)
    .bind(room)
    .bind(outcome.reason.as_str())
    .bind(i64::from(outcome.ticks))
    .bind(unix_now())
    .bind(source.server)
    .bind(i64::from(source.official))
    .bind(&key)
    .fetch_one(&mut *tx)
    .await?;
    let firsts: usize = outcome.ranks.iter().map(|&r| usize::from(r == 1)).sum();
    for (seat, p) in players.iter().enumerate() {
        let rank = outcome.ranks.get(seat).copied().unwrap_or(u8::MAX);
        // First alone is a win; first with others is a draw.
        let (won, drew) = (rank == 1 && firsts == 1, rank == 1 && firsts > 1);
        sqlx::query(
            "INSERT INTO match_players (match_id, user_id, seat, rank, score, rating_before, rating_after)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(match_id)
        .bind(p.user_id)
        .bind(seat as i64)
        .bind(i64::from(rank))
        .bind(i64::from(outcome.scores.get(seat).copied().unwrap_or(0)))
        .bind(before[seat].rating)
        .bind(after[seat].rating)
        .execute(&mut *tx)
        .await?;
        if !source.official {
            continue;
        }
        sqlx::query(
            "INSERT INTO ratings (user_id, mode, rating, deviation, volatility, matches, wins, draws)
             VALUES ($1, $2, $3, $4, $5, 1, $6, $7)
             ON CONFLICT (user_id, mode) DO UPDATE SET rating = excluded.rating, deviation = excluded.deviation,
               volatility = excluded.volatility, matches = ratings.matches + 1,
               wins = ratings.wins + excluded.wins, draws = ratings.draws + excluded.draws",
        )
        .bind(p.user_id)
        .bind(mode)
        .bind(after[seat].rating)
        .bind(after[seat].deviation)
        .bind(after[seat].volatility)
        .bind(i64::from(won))
        .bind(i64::from(drew))
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(before
        .iter()
        .zip(&after)
        .map(|(b, a)| RatingChange { before: b.rating.round() as i32, after: a.rating.round() as i32 })
        .collect())
}

/// How many players' results are recorded (two for a finished duel): what a soak checks
/// against the results its bots were shown.
pub async fn count_players_results(db: &Db) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT COUNT(*) FROM match_players").fetch_one(db).await
}

/// How many times a result is tried before it is given up (about ten minutes of retries).
const RECORD_ATTEMPTS: u32 = 130;

/// [`record`], tried again while the database is busy or unreachable (a result held only in
/// memory must not be lost to a moment of load): waits double from 100 ms to 5 s between
/// attempts. `None` only after every attempt failed, which is logged as an error.
pub async fn record_patiently(db: &Db, finished: &Finished<'_>) -> Option<Vec<RatingChange>> {
    let room = finished.room;
    let mut wait = std::time::Duration::from_millis(100);
    for attempt in 1..=RECORD_ATTEMPTS {
        match record(db, finished).await {
            Ok(changes) => return Some(changes),
            Err(e) if attempt < RECORD_ATTEMPTS => {
                tracing::warn!(room, attempt, error = %e, "could not record the match yet; trying again");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(std::time::Duration::from_secs(5));
            }
            Err(e) => tracing::error!(room, error = %e, "could not record the match: given up"),
        }
    }
    None
}

/// Glicko-2 over one rating period in which each player met every other once.
fn new_ratings(before: &[Glicko2Rating], ranks: &[u8]) -> Vec<Glicko2Rating> {
    let config = Glicko2Config::new();
    (0..before.len())
        .map(|i| {
            let results: Vec<(Glicko2Rating, Outcomes)> = (0..before.len())
                .filter(|&j| j != i)
                .map(|j| {
                    let (ri, rj) = (ranks.get(i).copied().unwrap_or(u8::MAX), ranks.get(j).copied().unwrap_or(u8::MAX));
                    let outcome = match ri.cmp(&rj) {
                        std::cmp::Ordering::Less => Outcomes::WIN,
                        std::cmp::Ordering::Greater => Outcomes::LOSS,
                        std::cmp::Ordering::Equal => Outcomes::DRAW,
                    };
                    (before[j], outcome)
                })
                .collect();
            glicko2_rating_period(&before[i], &results, &config)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn winners_gain_and_losers_lose() {
        let before = vec![Glicko2Rating::new(); 3];
        let after = new_ratings(&before, &[2, 1, 3]);
        assert!(after[1].rating > after[0].rating && after[0].rating > after[2].rating);
        assert!((after[0].rating - 1500.0).abs() < 1.0, "the middle player hardly moves");
        let level = new_ratings(&before[..2], &[1, 1]);
        assert!((level[0].rating - 1500.0).abs() < 1e-9 && level[0].deviation < 350.0, "a draw only tightens");
    }

    /// A room server that lost the hub's acknowledgement sends its result again: it is
    /// recorded once, and the changes recorded the first time come back. A community server's
    /// result is history only.
    #[tokio::test]
    async fn a_result_sent_twice_counts_once_and_a_community_one_changes_no_rating() {
        for (_dir, db) in crate::db::testing::both().await {
            a_result_sent_twice_counts_once_on(db).await;
        }
    }

    async fn a_result_sent_twice_counts_once_on(db: Db) {
        for name in ["a", "b"] {
            sqlx::query(
                "INSERT INTO users (username, username_key, password_hash, created_at) VALUES ($1, $2, 'x', 0)",
            )
            .bind(name)
            .bind(name)
            .execute(&db)
            .await
            .unwrap();
        }
        let players: Vec<Seated> = sqlx::query_scalar("SELECT id FROM users ORDER BY id")
            .fetch_all(&db)
            .await
            .unwrap()
            .into_iter()
            .map(|user_id| Seated { user_id, name: String::new() })
            .collect();
        let outcome =
            Outcome { ranks: vec![1, 2], scores: vec![5, 3], reason: shared::game::EndReason::ScoreLimit, ticks: 9 };
        let official = Source { server: Some("eu-1"), official: true, match_id: Some(42) };
        let finished =
            Finished { room: "eu-1/42", mode: "duel", players: &players, outcome: &outcome, source: official };
        let first = record(&db, &finished).await.unwrap();
        let again = record(&db, &finished).await.unwrap();
        assert_eq!(first, again);
        assert!(first[0].after > first[0].before);
        let count = |sql: &'static str| {
            let db = db.clone();
            async move { sqlx::query_scalar::<_, i64>(sql).fetch_one(&db).await.unwrap() }
        };
        assert_eq!(count("SELECT COUNT(*) FROM matches").await, 1);
        assert_eq!(count("SELECT CAST(SUM(matches) AS BIGINT) FROM ratings").await, 2);
        let community = Source { server: Some("club"), official: false, match_id: Some(42) };
        let finished = Finished { room: "club/42", source: community, ..finished };
        let unofficial = record(&db, &finished).await.unwrap();
        assert!(unofficial.iter().all(|r| r.before == r.after), "{unofficial:?}");
        assert_eq!(count("SELECT COUNT(*) FROM matches WHERE official = 0").await, 1);
        assert_eq!(count("SELECT CAST(SUM(matches) AS BIGINT) FROM ratings").await, 2, "no rating touched");
    }

    /// Many rooms ending at once: each transaction reads ratings, then writes. Deferred
    /// transactions failed here with "database is locked" (seen in `bench webrtc`); every
    /// result must be recorded.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn matches_ending_at_once_are_all_recorded() {
        for (_dir, db) in crate::db::testing::both().await {
            matches_ending_at_once_are_all_recorded_on(db).await;
        }
    }

    async fn matches_ending_at_once_are_all_recorded_on(db: Db) {
        for i in 0..64 {
            sqlx::query(
                "INSERT INTO users (username, username_key, password_hash, created_at) VALUES ($1, $2, 'x', 0)",
            )
            .bind(format!("p{i}"))
            .bind(format!("p{i}"))
            .execute(&db)
            .await
            .unwrap();
        }
        let ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM users ORDER BY id").fetch_all(&db).await.unwrap();
        let outcome =
            Outcome { ranks: vec![1, 2], scores: vec![5, 3], reason: shared::game::EndReason::ScoreLimit, ticks: 9 };
        let writes = ids.chunks(2).enumerate().map(|(n, pair)| {
            let (db, outcome) = (db.clone(), outcome.clone());
            let players: Vec<Seated> = pair.iter().map(|&user_id| Seated { user_id, name: String::new() }).collect();
            tokio::spawn(async move {
                let room = format!("r{n}-1");
                let finished =
                    Finished { room: &room, mode: "duel", players: &players, outcome: &outcome, source: Source::LOCAL };
                record(&db, &finished).await
            })
        });
        for w in writes.collect::<Vec<_>>() {
            w.await.unwrap().expect("every result is recorded");
        }
        let matches: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM matches").fetch_one(&db).await.unwrap();
        assert_eq!(matches, 32);
    }
}

/// One match in a player's history.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct HistoryRow {
    pub match_id: i64,
    pub mode: String,
    pub end_reason: String,
    pub ended_at: i64,
    pub rank: i64,
    pub score: i64,
    pub rating_before: f64,
    pub rating_after: f64,
    pub players: i64,
    /// Players who shared this place (1: nobody else).
    pub tied: i64,
    pub opponents: Option<String>,
    /// 0: unofficial, played on a community server (no rating changed).
    pub official: i64,
    /// The room server it was played on, if not the hub's own rooms.
    pub server: Option<String>,
}

/// A page of a player's matches, newest first; `per_page + 1` rows are read to tell whether a
/// next page exists.
pub async fn history(db: &Db, user_id: i64, page: u32, per_page: u32) -> Result<Vec<HistoryRow>, sqlx::Error> {
    // The opponents' names joined into one column: SQLite's group_concat, PostgreSQL's string_agg.
    macro_rules! history {
        ($join:literal) => {
            concat!(
                "SELECT m.id AS match_id, m.mode, m.end_reason, m.ended_at, mp.rank, mp.score, mp.rating_before,
                        mp.rating_after,
                        (SELECT COUNT(*) FROM match_players x WHERE x.match_id = m.id) AS players,
                        (SELECT COUNT(*) FROM match_players x WHERE x.match_id = m.id AND x.rank = mp.rank) AS tied,
                        (SELECT ",
                $join,
                "(u.username, ', ') FROM match_players x JOIN users u ON u.id = x.user_id
                          WHERE x.match_id = m.id AND x.user_id != mp.user_id) AS opponents,
                        m.official, m.server
                 FROM match_players mp JOIN matches m ON m.id = mp.match_id
                 WHERE mp.user_id = $1 ORDER BY m.id DESC LIMIT $2 OFFSET $3"
            )
        };
    }
    let sql = match crate::db::Backend::of(db) {
        crate::db::Backend::Sqlite => history!("group_concat"),
        crate::db::Backend::Postgres => history!("string_agg"),
    };
    sqlx::query_as(sql)
        .bind(user_id)
        .bind(i64::from(per_page) + 1)
        .bind(i64::from(page.saturating_sub(1)) * i64::from(per_page))
        .fetch_all(db)
        .await
}

/// A player's standing in one mode.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Standing {
    pub user_id: i64,
    pub username: String,
    pub mode: String,
    pub rating: f64,
    pub deviation: f64,
    pub matches: i64,
    pub wins: i64,
    pub draws: i64,
}

/// A user's ratings in every mode they have played.
pub async fn standings_of(db: &Db, user_id: i64) -> Result<Vec<Standing>, sqlx::Error> {
    sqlx::query_as(
        "SELECT r.user_id, u.username, r.mode, r.rating, r.deviation, r.matches, r.wins, r.draws
         FROM ratings r JOIN users u ON u.id = r.user_id WHERE r.user_id = $1 ORDER BY r.mode",
    )
    .bind(user_id)
    .fetch_all(db)
    .await
}

/// A page of a mode's leaderboard, best first (`per_page + 1` rows, see [`history`]).
pub async fn leaderboard(db: &Db, mode: &str, page: u32, per_page: u32) -> Result<Vec<Standing>, sqlx::Error> {
    sqlx::query_as(
        "SELECT r.user_id, u.username, r.mode, r.rating, r.deviation, r.matches, r.wins, r.draws
         FROM ratings r JOIN users u ON u.id = r.user_id WHERE r.mode = $1
         ORDER BY r.rating DESC, r.matches DESC, u.username LIMIT $2 OFFSET $3",
    )
    .bind(mode)
    .bind(i64::from(per_page) + 1)
    .bind(i64::from(page.saturating_sub(1)) * i64::from(per_page))
    .fetch_all(db)
    .await
}
