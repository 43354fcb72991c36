//! Matchmaking: one queue per mode, pairing people of similar rating.
//!
//! Each waiting player accepts opponents within a rating window that starts narrow and widens
//! the longer they wait. A match forms when the oldest waiter finds enough players who accept
//! each other: a full match at once, or, after [`FILL_WAIT`], as many as are there (at least the
//! mode's minimum).

use std::time::Duration;

use shared::game::Mode;
use tokio::time::Instant;

use super::ConnId;

/// Rating difference everyone accepts from the start.
pub const BASE_WINDOW: f64 = 100.0;
/// How fast the window widens, in rating points per second of waiting.
pub const WIDEN_PER_SECOND: f64 = 50.0;
/// The widest window (reached after 14 seconds): beyond it, anyone.
pub const MAX_WINDOW: f64 = 800.0;
/// How long the oldest waiter waits for a full match before starting with fewer players.
pub const FILL_WAIT: Duration = Duration::from_secs(10);

/// A player waiting for a match.
#[derive(Debug, Clone, PartialEq)]
pub struct Waiting {
    pub user_id: i64,
    pub name: String,
    /// The connection that asked, which gets the ticket.
    pub conn: ConnId,
    /// The instance of the cluster the player is on; `None`: this one.
    pub instance: Option<crate::bus::InstanceId>,
    pub rating: f64,
    pub since: Instant,
}

impl Waiting {
    /// The rating difference this player accepts now.
    pub fn window(&self, now: Instant) -> f64 {
        let waited = now.saturating_duration_since(self.since).as_secs_f64();
        if waited * WIDEN_PER_SECOND + BASE_WINDOW >= MAX_WINDOW {
            f64::INFINITY
        } else {
            BASE_WINDOW + waited * WIDEN_PER_SECOND
        }
    }

    fn accepts(&self, other: &Self, now: Instant) -> bool {
        (self.rating - other.rating).abs() <= self.window(now).min(other.window(now))
    }
}

/// Takes the matches that can start now out of `queue` (kept oldest first).
pub fn form_matches(queue: &mut Vec<Waiting>, mode: &Mode, now: Instant) -> Vec<Vec<Waiting>> {
    let mut matches = Vec::new();
    let mut i = 0;
    while i < queue.len() {
        let anchor = &queue[i];
        // Closest ratings first, so that each match is as even as the queue allows.
        let mut candidates: Vec<usize> =
            (0..queue.len()).filter(|&j| j != i && anchor.accepts(&queue[j], now)).collect();
        candidates.sort_by(|&a, &b| {
            let da = (queue[a].rating - anchor.rating).abs();
            let db = (queue[b].rating - anchor.rating).abs();
            da.total_cmp(&db).then(a.cmp(&b))
        });
        let mut group = vec![i];
        for j in candidates {
            if group.len() == usize::from(mode.max_players) {
                break;
            }
            if group.iter().all(|&g| queue[g].accepts(&queue[j], now)) {
                group.push(j);
            }
        }
        let full = group.len() == usize::from(mode.max_players);
        let enough =
            group.len() >= usize::from(mode.min_players) && now.saturating_duration_since(anchor.since) >= FILL_WAIT;
        if full || enough {
            group.sort_unstable();
            // Remove from the back so that the other indices stay valid, then restore the order.
            let mut players: Vec<Waiting> = group.iter().rev().map(|&g| queue.remove(g)).collect();
            players.reverse();
            matches.push(players);
            // Start over: the queue changed under every index.
            i = 0;
        } else {
            i += 1;
        }
    }
    matches
}

#[cfg(test)]
mod tests {
    use super::*;

    const DUEL: Mode = Mode { name: "duel", title: "Duel", min_players: 2, max_players: 2 };
    const FFA: Mode = Mode { name: "ffa", title: "FFA", min_players: 2, max_players: 4 };

    fn waiting(id: i64, rating: f64, since: Instant) -> Waiting {
        Waiting { user_id: id, name: format!("p{id}"), conn: id as u64, instance: None, rating, since }
    }

    #[test]
    fn close_ratings_are_paired_at_once() {
        let t0 = Instant::now();
        let mut queue = vec![waiting(1, 1500.0, t0), waiting(2, 1900.0, t0), waiting(3, 1550.0, t0)];
        let matches = form_matches(&mut queue, &DUEL, t0);
        assert_eq!(matches.len(), 1);
        let ids: Vec<i64> = matches[0].iter().map(|w| w.user_id).collect();
        assert_eq!(ids, vec![1, 3]);
        assert_eq!(queue.len(), 1);
        assert_eq!(queue[0].user_id, 2);
    }

    #[test]
    fn the_window_widens_with_waiting() {
        let t0 = Instant::now();
        let mut queue = vec![waiting(1, 1500.0, t0), waiting(2, 1800.0, t0)];
        assert!(form_matches(&mut queue, &DUEL, t0).is_empty());
        assert!(form_matches(&mut queue, &DUEL, t0 + Duration::from_secs(3)).is_empty(), "window 250 < 300");
        assert_eq!(form_matches(&mut queue, &DUEL, t0 + Duration::from_secs(5)).len(), 1, "window 350 ≥ 300");
        // Beyond the widest window, anyone.
        let mut far = vec![waiting(1, 100.0, t0), waiting(2, 3000.0, t0)];
        assert_eq!(form_matches(&mut far, &DUEL, t0 + Duration::from_secs(15)).len(), 1);
    }

    #[test]
    fn a_free_for_all_fills_up_or_starts_after_the_fill_wait() {
        let t0 = Instant::now();
        let mut queue: Vec<Waiting> = (1..=3).map(|id| waiting(id, 1500.0, t0)).collect();
        assert!(form_matches(&mut queue, &FFA, t0 + Duration::from_secs(1)).is_empty(), "not full yet");
        let matches = form_matches(&mut queue, &FFA, t0 + FILL_WAIT);
        assert_eq!(matches.len(), 1);
        assert_eq!(matches[0].len(), 3);
        let mut full: Vec<Waiting> = (1..=9).map(|id| waiting(id, 1500.0, t0)).collect();
        let matches = form_matches(&mut full, &FFA, t0);
        assert_eq!(matches.iter().map(Vec::len).collect::<Vec<_>>(), vec![4, 4]);
        assert_eq!(full.len(), 1);
    }

    #[test]
    fn nobody_is_matched_twice() {
        let t0 = Instant::now();
        let mut queue: Vec<Waiting> = (1..=7).map(|id| waiting(id, 1500.0 + id as f64, t0)).collect();
        let matches = form_matches(&mut queue, &DUEL, t0);
        let mut ids: Vec<i64> = matches.iter().flatten().map(|w| w.user_id).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), 6);
        assert_eq!(queue.len(), 1);
    }
}
