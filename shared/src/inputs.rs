//! A room's buffer of one player's inputs, between the network and the simulation.
//!
//! Clients number their inputs 1, 2, 3… and repeat their newest few in every message, so
//! duplicates are normal and ignored. Each tick the room takes the next input, or two when the
//! player is catching up after a late burst; a budget that grows by one per tick keeps the
//! average at one input per tick, so sending faster never makes a player faster. The budget may
//! go one input into debt, so that two inputs arriving within one tick (a client whose clock
//! runs a little ahead in phase) are both applied at once instead of one waiting a whole tick:
//! that lends a player at most one input, ever. Per tick at
//! most [`MAX_ACCEPTED_PER_TICK`] new inputs are accepted; inputs far ahead of what was applied,
//! or stamped with a tick far from the server's, are dropped. Every drop is counted.

use std::collections::BTreeMap;

/// New inputs accepted from one player per tick; more are dropped.
pub const MAX_ACCEPTED_PER_TICK: u32 = 2;
/// Inputs applied for one player in one tick, at most.
pub const MAX_APPLIED_PER_TICK: u32 = 2;
/// Inputs waiting at most; beyond the window an input is "far ahead".
pub const WINDOW: u32 = 32;
/// Ticks of catch-up a player can bank while no inputs arrive.
const MAX_BUDGET: i32 = 4;
/// Inputs a player may take ahead of the ticks that have passed.
const MAX_DEBT: i32 = 1;

/// Counts of what happened to a player's inputs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InputStats {
    /// New inputs taken into the buffer.
    pub accepted: u64,
    /// Inputs seen before (redundant copies), ignored.
    pub duplicates: u64,
    /// Dropped: sequence number far ahead, or tick far from the server's.
    pub dropped_far: u64,
    /// Dropped: more than [`MAX_ACCEPTED_PER_TICK`] new inputs in one tick.
    pub dropped_flood: u64,
    /// Skipped: never arrived, passed over to keep latency bounded.
    pub lost: u64,
}

/// One player's inputs on their way into the simulation.
#[derive(Debug, Clone)]
pub struct InputQueue<I> {
    applied: u32,
    pending: BTreeMap<u32, I>,
    budget: i32,
    accepted_this_tick: u32,
    max_tick_skew: u32,
    /// What happened so far.
    pub stats: InputStats,
}

impl<I: Copy> InputQueue<I> {
    /// An empty queue; inputs stamped more than `max_tick_skew` ticks away from the server's
    /// tick are dropped.
    pub fn new(max_tick_skew: u32) -> Self {
        Self {
            applied: 0,
            pending: BTreeMap::new(),
            budget: 0,
            accepted_this_tick: 0,
            max_tick_skew,
            stats: InputStats::default(),
        }
    }

    /// Offers inputs `first_seq, first_seq + 1, …` that the client stamped with `client_tick`.
    pub fn offer(&mut self, first_seq: u32, client_tick: u32, server_tick: u32, inputs: &[I]) {
        let far_in_time = client_tick.abs_diff(server_tick) > self.max_tick_skew;
        for (i, input) in inputs.iter().enumerate() {
            let Some(seq) = first_seq.checked_add(i as u32) else {
                self.stats.dropped_far += 1;
                continue;
            };
            if seq <= self.applied || self.pending.contains_key(&seq) {
                self.stats.duplicates += 1;
            } else if far_in_time || seq > self.applied.saturating_add(WINDOW) {
                self.stats.dropped_far += 1;
            } else if self.accepted_this_tick >= MAX_ACCEPTED_PER_TICK {
                self.stats.dropped_flood += 1;
            } else {
                self.pending.insert(seq, *input);
                self.accepted_this_tick += 1;
                self.stats.accepted += 1;
            }
        }
    }

    /// Takes this tick's inputs (none, one, or two when catching up) into `out`, in order.
    pub fn take(&mut self, out: &mut Vec<I>) {
        out.clear();
        self.accepted_this_tick = 0;
        self.budget = (self.budget + 1).min(MAX_BUDGET);
        while (out.len() as u32) < MAX_APPLIED_PER_TICK && self.budget > -MAX_DEBT {
            let Some((seq, input)) = self.pending.pop_first() else {
                break;
            };
            self.stats.lost += u64::from(seq - self.applied - 1);
            self.applied = seq;
            self.budget -= 1;
            out.push(input);
        }
    }

    /// The last sequence number applied.
    pub fn ack(&self) -> u32 {
        self.applied
    }

    /// Inputs waiting.
    pub fn waiting(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue() -> InputQueue<u32> {
        InputQueue::new(60)
    }

    fn take(q: &mut InputQueue<u32>) -> Vec<u32> {
        let mut out = Vec::new();
        q.take(&mut out);
        out
    }

    #[test]
    fn one_input_per_tick_with_redundant_copies() {
        let mut q = queue();
        for tick in 1..=10u32 {
            let first = tick.saturating_sub(3).max(1);
            let inputs: Vec<u32> = (first..=tick).collect();
            q.offer(first, tick, tick, &inputs);
            assert_eq!(take(&mut q), vec![tick]);
        }
        assert_eq!(q.ack(), 10);
        assert_eq!(q.stats.accepted, 10);
        assert!(q.stats.duplicates > 0);
        assert_eq!(q.stats.dropped_flood + q.stats.dropped_far + q.stats.lost, 0);
    }

    #[test]
    fn a_late_burst_is_caught_up_two_per_tick() {
        let mut q = queue();
        for _ in 0..3 {
            assert!(take(&mut q).is_empty(), "nothing arrived: the player stands");
        }
        q.offer(1, 4, 4, &[1, 2]);
        q.offer(3, 4, 4, &[3, 4]); // two more in the same tick: dropped, resent later
        assert_eq!(q.stats.dropped_flood, 2);
        assert_eq!(take(&mut q), vec![1, 2]);
        q.offer(1, 5, 5, &[1, 2, 3, 4]);
        assert_eq!(take(&mut q), vec![3, 4]);
        assert_eq!(q.ack(), 4);
    }

    #[test]
    fn sending_faster_does_not_make_a_player_faster() {
        let mut q = queue();
        let mut seq = 1;
        let mut applied = 0;
        for tick in 0..100 {
            q.offer(seq, tick, tick, &[0, 0, 0, 0]);
            seq += 4;
            applied += take(&mut q).len();
        }
        assert!(applied <= 100 + 1 + 1, "{applied} inputs applied in 100 ticks");
        assert!(q.stats.dropped_flood > 0 || q.stats.dropped_far > 0);
    }

    #[test]
    fn two_inputs_in_one_tick_interval_are_both_applied_at_once() {
        let mut q = queue();
        q.offer(1, 1, 1, &[1]);
        assert_eq!(take(&mut q), vec![1]);
        // The client's next two inputs both arrive before the server's next tick.
        q.offer(2, 2, 2, &[2]);
        q.offer(2, 2, 2, &[2, 3]);
        assert_eq!(take(&mut q), vec![2, 3], "no input waits a tick behind another");
        // The loan is one input: the next tick takes one, as it comes.
        q.offer(4, 3, 3, &[4]);
        assert_eq!(take(&mut q), vec![4]);
        q.offer(5, 4, 4, &[5, 6]);
        assert_eq!(take(&mut q), vec![5], "already one ahead: no second loan");
    }

    #[test]
    fn far_inputs_are_dropped_and_counted() {
        let mut q = queue();
        q.offer(1000, 1, 1, &[7]);
        q.offer(1, 500, 1, &[7]);
        q.offer(u32::MAX, 1, 1, &[7, 8]);
        assert_eq!(q.stats.dropped_far, 4);
        assert!(take(&mut q).is_empty());
    }

    #[test]
    fn inputs_that_never_arrive_are_skipped() {
        let mut q = queue();
        q.offer(3, 1, 1, &[3]);
        assert_eq!(take(&mut q), vec![3]);
        assert_eq!(q.stats.lost, 2);
        q.offer(1, 2, 2, &[1, 2]);
        assert_eq!(q.stats.duplicates, 2, "too late: already passed");
    }
}
