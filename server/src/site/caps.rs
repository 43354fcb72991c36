//! Caps on WebSockets (hub and room alike) per session, per user and per client address, and in
//! all: a tab needs one or two, so nobody can take the server's connections for themselves, and
//! part of `--max-connections` always stays free for page loads.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::accounts::{Session, SessionKey};

/// How many WebSockets each may hold at once.
#[derive(Debug, Clone, Copy)]
pub struct SocketLimits {
    pub per_session: u32,
    pub per_user: u32,
    pub per_address: u32,
    /// All WebSockets together: `--max-connections` less what is kept for page loads.
    pub total: usize,
}

/// Which cap refused a socket; its text is the body of the 429 or 503.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("this session has too many connections open; close some tabs\n")]
    Session,
    #[error("this account has too many connections open; close some tabs or sessions\n")]
    User,
    #[error("too many connections from this address\n")]
    Address,
    #[error("the server is full; try again later\n")]
    Full,
}

#[derive(Default)]
struct Counts {
    total: usize,
    sessions: HashMap<SessionKey, u32>,
    users: HashMap<i64, u32>,
    addresses: HashMap<IpAddr, u32>,
}

pub struct SocketCaps {
    limits: SocketLimits,
    counts: Mutex<Counts>,
}

/// One admitted WebSocket; dropping it (when the socket's task ends) gives its place back.
pub struct SocketPermit {
    caps: Arc<SocketCaps>,
    session: SessionKey,
    user: i64,
    address: IpAddr,
}

impl Drop for SocketPermit {
    fn drop(&mut self) {
        let mut counts = self.caps.lock();
        counts.total = counts.total.saturating_sub(1);
        release(&mut counts.sessions, &self.session);
        release(&mut counts.users, &self.user);
        release(&mut counts.addresses, &self.address);
    }
}

impl SocketCaps {
    pub fn new(limits: SocketLimits) -> Arc<Self> {
        Arc::new(Self { limits, counts: Mutex::new(Counts::default()) })
    }

    fn lock(&self) -> MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Admits one more socket for `session` from `address`, or says which cap is reached.
    pub fn admit(self: &Arc<Self>, session: &Session, address: IpAddr) -> Result<SocketPermit, Refused> {
        let (key, user) = (session.key, session.user.id);
        let l = &self.limits;
        let mut counts = self.lock();
        if counts.total >= l.total {
            return Err(Refused::Full);
        }
        if held(&counts.sessions, &key) >= l.per_session {
            return Err(Refused::Session);
        }
        if held(&counts.users, &user) >= l.per_user {
            return Err(Refused::User);
        }
        // The machine's own processes (bots, benchmarks) share one address and are not capped
        // by it; behind a proxy, --trust-forwarded-for gives each player their own.
        if !address.is_loopback() && held(&counts.addresses, &address) >= l.per_address {
            return Err(Refused::Address);
        }
        counts.total += 1;
        *counts.sessions.entry(key).or_default() += 1;
        *counts.users.entry(user).or_default() += 1;
        *counts.addresses.entry(address).or_default() += 1;
        Ok(SocketPermit { caps: Arc::clone(self), session: key, user, address })
    }
}

fn held<K: Hash + Eq>(map: &HashMap<K, u32>, key: &K) -> u32 {
    map.get(key).copied().unwrap_or(0)
}

/// Counts one fewer for `key`, forgetting it at zero so that the maps hold only live keys.
fn release<K: Hash + Eq>(map: &mut HashMap<K, u32>, key: &K) {
    if let Some(n) = map.get_mut(key) {
        *n -= 1;
        if *n == 0 {
            map.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accounts::User;

    fn session(user: i64, token: &str) -> Session {
        Session { key: SessionKey::of_token(token), user: User { id: user, name: String::new() } }
    }

    #[test]
    fn an_address_is_capped_except_the_machine_itself() {
        let caps = SocketCaps::new(SocketLimits { per_session: 10, per_user: 10, per_address: 2, total: 100 });
        let there: IpAddr = "198.51.100.7".parse().unwrap();
        let a = caps.admit(&session(1, "a"), there).unwrap();
        let _b = caps.admit(&session(2, "b"), there).unwrap();
        assert_eq!(caps.admit(&session(3, "c"), there).err(), Some(Refused::Address));
        drop(a);
        assert!(caps.admit(&session(3, "c"), there).is_ok());
        let here: IpAddr = "127.0.0.1".parse().unwrap();
        let local: Vec<_> = (0..5).map(|i| caps.admit(&session(10 + i, &format!("l{i}")), here).unwrap()).collect();
        assert_eq!(local.len(), 5);
        drop(local);
        assert!(caps.lock().addresses.len() <= 2 && caps.lock().sessions.len() <= 2, "only live keys are kept");
    }
}
