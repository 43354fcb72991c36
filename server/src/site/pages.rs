//! The page templates (askama, in `server/templates/`) and the data each one shows.

use askama::Template;
use askama_web::WebTemplate;
use shared::game::Mode;

use crate::hub::results::{HistoryRow, Standing};

/// What every page's frame needs: who is signed in, and the CSRF token for its forms.
pub struct Layout {
    pub user: Option<String>,
    pub csrf: String,
}

#[derive(Template, WebTemplate)]
#[template(path = "home.html")]
pub struct HomePage {
    pub layout: Layout,
}

/// The register and login forms, which share one template.
#[derive(Template, WebTemplate)]
#[template(path = "auth.html")]
pub struct AuthPage {
    pub layout: Layout,
    pub register: bool,
    pub username: String,
    pub error: Option<String>,
}

impl AuthPage {
    pub fn register(layout: Layout, username: &str, error: Option<String>) -> Self {
        Self { layout, register: true, username: keep(username), error }
    }

    pub fn login(layout: Layout, username: &str, error: Option<String>) -> Self {
        Self { layout, register: false, username: keep(username), error }
    }
}

/// The username typed, kept for the form shown again (bounded: it is echoed back).
fn keep(username: &str) -> String {
    username.chars().take(64).collect()
}

#[derive(Template, WebTemplate)]
#[template(path = "play.html")]
pub struct PlayPage {
    pub layout: Layout,
    pub modes: &'static [Mode],
}

/// Previous and next page links.
pub struct Pager {
    pub page: u32,
    pub prev: Option<u32>,
    pub next: Option<u32>,
}

impl Pager {
    /// From a page read with one row too many (which, if there, says a next page exists).
    pub fn new<T>(page: u32, rows: &mut Vec<T>, per_page: u32) -> Self {
        let more = rows.len() > per_page as usize;
        rows.truncate(per_page as usize);
        Self { page, prev: (page > 1).then(|| page - 1), next: more.then(|| page + 1) }
    }
}

/// A match as a history line.
pub struct HistoryLine {
    pub when: String,
    pub mode: String,
    pub place: String,
    pub score: i64,
    pub against: String,
    pub rating: String,
    pub change: String,
    pub won: bool,
}

fn mode_title(modes: &[Mode], name: &str) -> String {
    modes.iter().find(|m| m.name == name).map_or_else(|| name.to_owned(), |m| m.title.to_owned())
}

fn ordinal(n: i64) -> String {
    let suffix = match (n % 10, n % 100) {
        (1, 11) | (2, 12) | (3, 13) => "th",
        (1, _) => "st",
        (2, _) => "nd",
        (3, _) => "rd",
        _ => "th",
    };
    format!("{n}{suffix}")
}

/// A standing as a leaderboard or profile line.
pub struct StandingLine {
    pub place: u32,
    pub name: String,
    pub mode: String,
    pub rating: i64,
    pub deviation: i64,
    pub matches: i64,
    pub wins: i64,
    pub draws: i64,
}

impl StandingLine {
    fn new(place: u32, s: &Standing, modes: &[Mode]) -> Self {
        Self {
            place,
            name: s.username.clone(),
            mode: mode_title(modes, &s.mode),
            rating: s.rating.round() as i64,
            deviation: s.deviation.round() as i64,
            matches: s.matches,
            wins: s.wins,
            draws: s.draws,
        }
    }
}

#[derive(Template, WebTemplate)]
#[template(path = "profile.html")]
pub struct ProfilePage {
    pub layout: Layout,
    pub name: String,
    pub standings: Vec<StandingLine>,
    pub history: Vec<HistoryLine>,
    pub pager: Pager,
}

impl ProfilePage {
    pub fn new(
        layout: Layout,
        name: String,
        standings: &[Standing],
        history: &[HistoryRow],
        pager: Pager,
        modes: &[Mode],
    ) -> Self {
        let history = history
            .iter()
            .map(|h| {
                let delta = (h.rating_after - h.rating_before).round() as i64;
                HistoryLine {
                    when: datetime(h.ended_at),
                    mode: match (&h.server, h.official != 0) {
                        (Some(server), false) => format!("{} · unofficial ({server})", mode_title(modes, &h.mode)),
                        _ => mode_title(modes, &h.mode),
                    },
                    place: if h.tied > 1 {
                        format!("{} of {} (tied with {})", ordinal(h.rank), h.players, h.tied - 1)
                    } else {
                        format!("{} of {}", ordinal(h.rank), h.players)
                    },
                    score: h.score,
                    against: h.opponents.clone().unwrap_or_default(),
                    rating: format!("{}", h.rating_after.round() as i64),
                    change: if h.official == 0 {
                        "unrated".to_owned()
                    } else if delta >= 0 {
                        format!("+{delta}")
                    } else {
                        delta.to_string()
                    },
                    won: h.rank == 1 && h.tied == 1,
                }
            })
            .collect();
        let standings = standings.iter().map(|s| StandingLine::new(0, s, modes)).collect();
        Self { layout, name, standings, history, pager }
    }
}

#[derive(Template, WebTemplate)]
#[template(path = "leaderboard.html")]
pub struct LeaderboardPage {
    pub layout: Layout,
    pub modes: &'static [Mode],
    pub mode: &'static str,
    pub title: &'static str,
    pub rows: Vec<StandingLine>,
    pub pager: Pager,
}

impl LeaderboardPage {
    pub fn new(layout: Layout, modes: &'static [Mode], mode: &'static Mode, rows: &[Standing], pager: Pager) -> Self {
        let first = (pager.page - 1) * super::PER_PAGE;
        let rows = rows.iter().enumerate().map(|(i, s)| StandingLine::new(first + i as u32 + 1, s, modes)).collect();
        Self { layout, modes, mode: mode.name, title: mode.title, rows, pager }
    }
}

#[derive(Template, WebTemplate)]
#[template(path = "account.html")]
pub struct AccountPage {
    pub layout: Layout,
    pub member_since: String,
    pub sessions: i64,
}

#[derive(Template)]
#[template(path = "error.html")]
pub struct ErrorPage {
    pub title: String,
    pub message: String,
}

/// A Unix time as `YYYY-MM-DD HH:MM` (UTC).
pub fn datetime(unix_seconds: i64) -> String {
    use time::OffsetDateTime;
    OffsetDateTime::from_unix_timestamp(unix_seconds)
        .map(|t| format!("{} {:02}:{:02}", t.date(), t.hour(), t.minute()))
        .unwrap_or_default()
}

/// A Unix time as a calendar date, `YYYY-MM-DD` (UTC).
pub fn date(unix_seconds: i64) -> String {
    use time::OffsetDateTime;
    OffsetDateTime::from_unix_timestamp(unix_seconds).map(|t| t.date().to_string()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #[test]
    fn dates() {
        assert_eq!(super::date(0), "1970-01-01");
        assert_eq!(super::date(951_782_400), "2000-02-29");
        assert_eq!(super::date(1_795_000_000), "2026-11-18");
    }
}
