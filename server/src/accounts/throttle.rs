//! Throttling of login attempts, so that nobody can guess fast and nobody can lock a player out.
//!
//! Three counts, each over a fixed window that starts at its first attempt:
//! - per (account, address), strict: after its allowance that address may not try that account
//!   again until the window ends;
//! - per address, strict: one address cannot guess across many accounts;
//! - per account, soft: after its allowance the account is *paced* (one attempt per
//!   [`Limits::account_pace`] from anywhere), never locked, and an address that logged into it
//!   before is not paced at all. Usernames are public: a strict per-account lock would let anyone
//!   lock any player out.
//!
//! An attempt is counted when it starts, under one lock, and released if it succeeds (or fails
//! for a reason that is not a wrong password). Guesses sent in parallel therefore use up the
//! allowance as they arrive instead of all passing the check before any failure is recorded.
//!
//! In a cluster, each instance tells the others every count it makes ([`Shared`], over the
//! bus), and counts theirs as its own: guesses spread over instances use up the same allowance
//! (an attempt's note arrives in about a millisecond; its password check takes far longer).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

/// Most keys kept in each map; beyond it, expired entries are dropped, then arbitrary ones.
const MAX_KEYS: usize = 100_000;
/// How long an address that logged into an account stays exempt from that account's pace.
const KNOWN_FOR: Duration = Duration::from_hours(30 * 24);

/// How many attempts each count allows, and over which window.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub per_account_address: u32,
    pub per_address: u32,
    /// Failures on an account before it is paced.
    pub per_account: u32,
    pub account_pace: Duration,
    pub window: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Pair(String, IpAddr),
    Address(IpAddr),
    Account(String),
}

#[derive(Debug, Clone, Copy)]
struct Window {
    start: Instant,
    attempts: u32,
    /// When a paced account may be tried next (accounts only).
    next: Instant,
}

/// A change of one instance's counts, applied by the cluster's other instances.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "e", rename_all = "snake_case")]
pub enum Shared {
    /// An attempt on `account` from `address` started (and counts).
    Attempt { account: String, address: IpAddr },
    /// It did not count after all (it succeeded, or failed on our side).
    Release { account: String, address: IpAddr },
    /// `address` logged into `account`: exempt from its pace.
    Known { account: String, address: IpAddr },
}

/// The longest account name a remote note may carry (usernames are shorter; anything longer is
/// not a count an instance made).
const MAX_SHARED_ACCOUNT: usize = 64;

#[derive(Default)]
struct State {
    counts: HashMap<Key, Window>,
    /// (account, address) pairs that logged in, and when.
    known: HashMap<(String, IpAddr), Instant>,
}

impl State {
    /// The keys of an attempt on `account` from `address` and their windows now (expired ones
    /// start afresh), after pruning expired windows when the map is full.
    fn windows(&mut self, account: &str, address: IpAddr, now: Instant, window: Duration) -> ([Key; 3], [Window; 3]) {
        prune(&mut self.counts, MAX_KEYS - 3, |w| w.start + window > now);
        let keys = [Key::Pair(account.to_owned(), address), Key::Address(address), Key::Account(account.to_owned())];
        let windows = keys.each_ref().map(|key| {
            let fresh = Window { start: now, attempts: 0, next: now };
            self.counts.get(key).copied().filter(|w| w.start + window > now).unwrap_or(fresh)
        });
        (keys, windows)
    }

    /// Counts one attempt in each window.
    fn count(&mut self, keys: [Key; 3], windows: [Window; 3]) {
        for (key, mut w) in keys.into_iter().zip(windows) {
            w.attempts += 1;
            self.counts.insert(key, w);
        }
    }

    /// `address` logged into `account` at `now`.
    fn know(&mut self, account: String, address: IpAddr, now: Instant) {
        prune(&mut self.known, MAX_KEYS, |&at| at + KNOWN_FOR > now);
        self.known.insert((account, address), now);
    }

    /// Gives back an attempt's count on each key (the account's pace stays as it was).
    fn release(&mut self, account: &str, address: IpAddr) {
        for key in [Key::Pair(account.to_owned(), address), Key::Address(address), Key::Account(account.to_owned())] {
            if let Some(w) = self.counts.get_mut(&key) {
                w.attempts = w.attempts.saturating_sub(1);
            }
        }
    }
}

pub struct Throttle {
    limits: Limits,
    state: Mutex<State>,
    /// Tells the cluster's other instances (set once the bus is up).
    share: std::sync::OnceLock<Box<dyn Fn(Shared) + Send + Sync>>,
}

/// An attempt in progress, counted against its keys. Settle it with [`Attempt::failed`] (a
/// wrong password: the count stays) or [`Attempt::succeeded`]; dropped unsettled (an error on
/// our side, a client gone mid-check) it is released, as it proved nothing.
#[must_use]
pub struct Attempt<'a> {
    throttle: &'a Throttle,
    account: String,
    address: IpAddr,
    settled: bool,
}

impl Attempt<'_> {
    pub fn failed(mut self) {
        self.settled = true;
    }

    pub fn succeeded(mut self, now: Instant) {
        self.settled = true;
        let (account, address) = (self.account.clone(), self.address);
        {
            let mut state = self.throttle.lock();
            state.release(&account, address);
            state.know(account.clone(), address, now);
        }
        self.throttle.tell(Shared::Release { account: account.clone(), address });
        self.throttle.tell(Shared::Known { account, address });
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        if !self.settled {
            self.throttle.lock().release(&self.account, self.address);
            self.throttle.tell(Shared::Release { account: self.account.clone(), address: self.address });
        }
    }
}

impl Throttle {
    pub fn new(limits: Limits) -> Self {
        Self { limits, state: Mutex::new(State::default()), share: std::sync::OnceLock::new() }
    }

    /// From now on, every count is also handed to `tell` (for the cluster's other instances).
    pub fn share(&self, tell: impl Fn(Shared) + Send + Sync + 'static) {
        let _ = self.share.set(Box::new(tell));
    }

    fn tell(&self, change: Shared) {
        if let Some(tell) = self.share.get() {
            tell(change);
        }
    }

    /// Applies another instance's count as if it were made here.
    pub fn apply(&self, change: Shared, now: Instant) {
        match change {
            Shared::Attempt { account, address } if account.len() <= MAX_SHARED_ACCOUNT => {
                let limits = &self.limits;
                let mut state = self.lock();
                let (keys, [pair, addr, mut acc]) = state.windows(&account, prefix(address), now, limits.window);
                if acc.attempts >= limits.per_account {
                    acc.next = now + limits.account_pace;
                }
                state.count(keys, [pair, addr, acc]);
            }
            Shared::Release { account, address } => self.lock().release(&account, prefix(address)),
            Shared::Known { account, address } if account.len() <= MAX_SHARED_ACCOUNT => {
                self.lock().know(account, prefix(address), now);
            }
            Shared::Attempt { .. } | Shared::Known { .. } => {}
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Starts an attempt on `account` from `address`, or `Err(retry_after)`.
    pub fn begin(&self, account: &str, address: IpAddr, now: Instant) -> Result<Attempt<'_>, Duration> {
        let address = prefix(address);
        let limits = &self.limits;
        let mut state = self.lock();
        let window = limits.window;
        let (keys, [pair, addr, acc]) = state.windows(account, address, now, window);
        let lock_wait = |w: Window, limit: u32| (w.attempts >= limit).then(|| w.start + window - now);
        let known = state.known.get(&(account.to_owned(), address)).is_some_and(|&at| at + KNOWN_FOR > now);
        let paced = acc.attempts >= limits.per_account && !known;
        let pace_wait = (paced && acc.next > now).then(|| acc.next - now);
        if let Some(wait) =
            [lock_wait(pair, limits.per_account_address), lock_wait(addr, limits.per_address), pace_wait]
                .into_iter()
                .flatten()
                .max()
        {
            return Err(wait);
        }
        // Counted now; given back by `Attempt` unless it turns out to be a wrong password.
        let acc = Window { next: if paced { now + limits.account_pace } else { acc.next }, ..acc };
        state.count(keys, [pair, addr, acc]);
        drop(state);
        self.tell(Shared::Attempt { account: account.to_owned(), address });
        Ok(Attempt { throttle: self, account: account.to_owned(), address, settled: false })
    }
}

/// Registrations per client address: a burst, then the same number per hour.
pub struct Registrations {
    per_hour: u32,
    buckets: Mutex<HashMap<IpAddr, crate::rate::TokenBucket>>,
}

impl Registrations {
    pub fn new(per_hour: u32) -> Self {
        Self { per_hour, buckets: Mutex::new(HashMap::new()) }
    }

    /// Counts one registration from `address`, or `Err(retry_after)`. The machine's own
    /// processes (bots, tests) are not throttled.
    pub fn take(&self, address: IpAddr, now: Instant) -> Result<(), Duration> {
        if address.is_loopback() {
            return Ok(());
        }
        let per_second = f64::from(self.per_hour) / 3600.0;
        let burst = f64::from(self.per_hour);
        let mut buckets = self.buckets.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        // A bucket idle for an hour is full again, the same as no bucket: those go first.
        prune(&mut buckets, MAX_KEYS, |b| b.idle_for(now) < Duration::from_hours(1));
        buckets
            .entry(prefix(address))
            .or_insert_with(|| crate::rate::TokenBucket::new(per_second, burst, now))
            .take_or_wait(now)
    }
}

/// Keeps `map` under `max` entries: drops those `keep` refuses, then arbitrary ones.
fn prune<K: Clone + Eq + std::hash::Hash, V>(map: &mut HashMap<K, V>, max: usize, keep: impl Fn(&V) -> bool) {
    if map.len() >= max {
        map.retain(|_, v| keep(v));
        while map.len() >= max {
            let Some(key) = map.keys().next().cloned() else {
                break;
            };
            map.remove(&key);
        }
    }
}

/// IPv6 clients usually hold a whole /64, so they are counted by it.
fn prefix(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V4(_) => address,
        IpAddr::V6(v6) => {
            let mut seg = v6.segments();
            seg[4..].fill(0);
            IpAddr::V6(seg.into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_mins(1);
    const PACE: Duration = Duration::from_secs(10);

    fn throttle(per_account_address: u32, per_address: u32, per_account: u32) -> Throttle {
        Throttle::new(Limits { per_account_address, per_address, per_account, account_pace: PACE, window: WINDOW })
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn fail(t: &Throttle, account: &str, address: &str, now: Instant) -> Result<(), Duration> {
        t.begin(account, ip(address), now).map(Attempt::failed)
    }

    #[test]
    fn one_address_is_locked_out_of_one_account_after_its_allowance() {
        let t = throttle(3, 100, 100);
        let now = Instant::now();
        for _ in 0..3 {
            fail(&t, "bob", "10.0.0.1", now).unwrap();
        }
        assert_eq!(fail(&t, "bob", "10.0.0.1", now), Err(WINDOW));
        let later = now + Duration::from_secs(20);
        assert_eq!(fail(&t, "bob", "10.0.0.1", later), Err(Duration::from_secs(40)));
        assert!(t.begin("bob", ip("10.0.0.2"), later).is_ok(), "another address may still try");
        assert!(t.begin("alice", ip("10.0.0.1"), later).is_ok(), "and this one another account");
        assert!(t.begin("bob", ip("10.0.0.1"), now + WINDOW).is_ok());
    }

    #[test]
    fn attempts_count_when_they_start_so_parallel_guesses_use_up_the_allowance() {
        let t = throttle(5, 100, 100);
        let now = Instant::now();
        let in_flight: Vec<_> = (0..5).map(|_| t.begin("bob", ip("10.0.0.1"), now).unwrap()).collect();
        assert!(t.begin("bob", ip("10.0.0.1"), now).is_err(), "the sixth guess in flight is refused");
        drop(in_flight);
        assert!(t.begin("bob", ip("10.0.0.1"), now).is_ok(), "attempts dropped unsettled are released");
    }

    #[test]
    fn an_account_under_attack_is_paced_not_locked_and_known_addresses_are_not_paced() {
        let t = throttle(100, 100, 3);
        let now = Instant::now();
        t.begin("bob", ip("192.0.2.7"), now).unwrap().succeeded(now);
        for i in 0..3 {
            fail(&t, "bob", &format!("10.0.0.{i}"), now).unwrap();
        }
        // From anywhere new: one attempt per pace.
        fail(&t, "bob", "10.0.1.1", now).unwrap();
        assert_eq!(fail(&t, "bob", "10.0.1.2", now), Err(PACE));
        assert!(fail(&t, "bob", "10.0.1.2", now + PACE).is_ok());
        // The owner's usual address is not paced, however busy the attacker is.
        for _ in 0..5 {
            t.begin("bob", ip("192.0.2.7"), now + PACE).unwrap().succeeded(now + PACE);
        }
        assert!(t.begin("alice", ip("10.0.1.3"), now).is_ok(), "other accounts are untouched");
    }

    #[test]
    fn an_address_is_locked_across_accounts() {
        let t = throttle(100, 2, 100);
        let now = Instant::now();
        fail(&t, "a", "192.0.2.1", now).unwrap();
        fail(&t, "b", "192.0.2.1", now).unwrap();
        assert!(t.begin("c", ip("192.0.2.1"), now).is_err());
        assert!(t.begin("c", ip("192.0.2.2"), now).is_ok());
    }

    #[test]
    fn ipv6_addresses_count_by_their_64_prefix() {
        let t = throttle(100, 1, 100);
        let now = Instant::now();
        fail(&t, "a", "2001:db8::1", now).unwrap();
        assert!(t.begin("a2", ip("2001:db8::ffff:1"), now).is_err());
        assert!(t.begin("a2", ip("2001:db8:0:1::1"), now).is_ok());
    }

    #[test]
    fn success_gives_back_its_own_attempt_only() {
        let t = throttle(2, 100, 100);
        let now = Instant::now();
        fail(&t, "bob", "10.0.0.1", now).unwrap();
        t.begin("bob", ip("10.0.0.1"), now).unwrap().succeeded(now);
        fail(&t, "bob", "10.0.0.1", now).unwrap();
        assert!(t.begin("bob", ip("10.0.0.1"), now).is_err(), "two failures still count");
    }
}
