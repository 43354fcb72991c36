//! Throttling of failed logins, per account and per client address.
//!
//! Each key counts failures in a fixed window that starts at its first failure. Once a key has
//! used its allowance, attempts are refused until the window ends, without checking a password.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Most keys kept; beyond it, expired windows are dropped, then arbitrary ones.
const MAX_KEYS: usize = 100_000;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Account(String),
    Address(IpAddr),
}

#[derive(Debug, Clone, Copy)]
struct Window {
    start: Instant,
    failures: u32,
}

pub struct Throttle {
    per_account: u32,
    per_address: u32,
    window: Duration,
    counts: Mutex<HashMap<Key, Window>>,
}

impl Throttle {
    pub fn new(per_account: u32, per_address: u32, window: Duration) -> Self {
        Self { per_account, per_address, window, counts: Mutex::new(HashMap::new()) }
    }

    /// `Err(retry_after)` when either the account or the address has no attempts left.
    pub fn check(&self, account: &str, address: IpAddr, now: Instant) -> Result<(), Duration> {
        let counts = self.counts.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let wait = |key: Key, limit: u32| {
            counts.get(&key).and_then(|w| {
                let end = w.start + self.window;
                (w.failures >= limit && end > now).then(|| end - now)
            })
        };
        let waits = [
            wait(Key::Account(account.to_owned()), self.per_account),
            wait(Key::Address(prefix(address)), self.per_address),
        ];
        match waits.into_iter().flatten().max() {
            Some(wait) => Err(wait),
            None => Ok(()),
        }
    }

    /// Records a failed attempt against both the account and the address.
    pub fn fail(&self, account: &str, address: IpAddr, now: Instant) {
        let mut counts = self.counts.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if counts.len() >= MAX_KEYS {
            counts.retain(|_, w| w.start + self.window > now);
            while counts.len() >= MAX_KEYS {
                let Some(key) = counts.keys().next().cloned() else {
                    break;
                };
                counts.remove(&key);
            }
        }
        for key in [Key::Account(account.to_owned()), Key::Address(prefix(address))] {
            let w = counts.entry(key).or_insert(Window { start: now, failures: 0 });
            if w.start + self.window <= now {
                *w = Window { start: now, failures: 0 };
            }
            w.failures += 1;
        }
    }

    /// A successful login clears the account's count (the address keeps its own).
    pub fn succeed(&self, account: &str) {
        let mut counts = self.counts.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        counts.remove(&Key::Account(account.to_owned()));
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

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn an_account_is_locked_after_its_allowance_until_the_window_ends() {
        let t = Throttle::new(3, 100, WINDOW);
        let now = Instant::now();
        for i in 0..3 {
            assert!(t.check("bob", ip("10.0.0.1"), now).is_ok());
            t.fail("bob", ip(&format!("10.0.0.{i}")), now);
        }
        assert_eq!(t.check("bob", ip("10.9.9.9"), now), Err(WINDOW));
        let later = now + Duration::from_secs(20);
        assert_eq!(t.check("bob", ip("10.9.9.9"), later), Err(Duration::from_secs(40)));
        assert!(t.check("alice", ip("10.9.9.9"), later).is_ok());
        assert!(t.check("bob", ip("10.9.9.9"), now + WINDOW).is_ok());
    }

    #[test]
    fn an_address_is_locked_across_accounts() {
        let t = Throttle::new(100, 2, WINDOW);
        let now = Instant::now();
        t.fail("a", ip("192.0.2.1"), now);
        t.fail("b", ip("192.0.2.1"), now);
        assert!(t.check("c", ip("192.0.2.1"), now).is_err());
        assert!(t.check("c", ip("192.0.2.2"), now).is_ok());
    }

    #[test]
    fn ipv6_addresses_count_by_their_64_prefix() {
        let t = Throttle::new(100, 1, WINDOW);
        let now = Instant::now();
        t.fail("a", ip("2001:db8::1"), now);
        assert!(t.check("a2", ip("2001:db8::ffff:1"), now).is_err());
        assert!(t.check("a2", ip("2001:db8:0:1::1"), now).is_ok());
    }

    #[test]
    fn success_clears_the_account_but_not_the_address() {
        let t = Throttle::new(1, 1, WINDOW);
        let now = Instant::now();
        t.fail("bob", ip("10.0.0.1"), now);
        t.succeed("bob");
        assert!(t.check("bob", ip("10.0.0.2"), now).is_ok());
        assert!(t.check("bob", ip("10.0.0.1"), now).is_err());
    }
}
