//! Password hashing with argon2id on a small pool of low-priority threads.
//!
//! One hash costs ~20 ms of CPU. The pool is bounded twice: a fixed number of threads, and a
//! queue of fixed length beyond which callers are told the server is busy. Its threads run at
//! nice +10, so that during a login storm the scheduler still runs the network threads first and
//! WebSocket traffic is not delayed.

use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};

use argon2::Argon2;
use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use tokio::sync::oneshot;

type Job = Box<dyn FnOnce() + Send>;

/// The queue is full: the caller should answer "busy, try again".
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the server is busy hashing passwords; try again in a moment")]
pub struct Busy;

/// A handle to the hashing pool; cheap to clone.
#[derive(Clone)]
pub struct Hasher {
    jobs: SyncSender<Job>,
    /// The hash of a random password, checked when a login names an unknown user so that the
    /// answer takes as long as for a known one.
    decoy: Arc<String>,
}

impl Hasher {
    /// Starts `threads` hashing threads with room for `queue` waiting jobs.
    pub fn start(threads: usize, queue: usize) -> Self {
        let (jobs, rx) = sync_channel::<Job>(queue);
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads.max(1) {
            let rx = Arc::clone(&rx);
            std::thread::Builder::new()
                .name(format!("password-hash-{i}"))
                .spawn(move || work(&rx))
                .expect("cannot start a password hashing thread");
        }
        let decoy = hash_now(crate::random::token().as_bytes());
        Self { jobs, decoy: Arc::new(decoy) }
    }

    /// Hashes `password` into a PHC string (`$argon2id$v=19$m=19456,t=2,p=1$…`).
    pub async fn hash(&self, password: String) -> Result<String, Busy> {
        self.run(move || hash_now(password.as_bytes())).await
    }

    /// Checks `password` against a stored PHC string; `None` checks against a decoy and fails.
    pub async fn verify(&self, password: String, stored: Option<String>) -> Result<bool, Busy> {
        let known = stored.is_some();
        let phc = stored.unwrap_or_else(|| self.decoy.as_str().to_owned());
        let ok = self.run(move || verify_now(password.as_bytes(), &phc)).await?;
        Ok(known && ok)
    }

    async fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T, Busy> {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        match self.jobs.try_send(job) {
            Ok(()) => rx.await.map_err(|_| Busy),
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => Err(Busy),
        }
    }
}

fn work(rx: &Mutex<Receiver<Job>>) {
    lower_priority();
    loop {
        // The lock is held only while waiting for the next job, never while hashing.
        let job = match rx.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        match job {
            Ok(job) => job(),
            Err(_) => return, // every Hasher was dropped
        }
    }
}

/// Hashes on the calling thread (for tools, not for request handlers).
pub fn hash_blocking(password: &[u8]) -> String {
    hash_now(password)
}

/// argon2id with the crate's defaults, which are OWASP's: m = 19 MiB, t = 2, p = 1.
fn hash_now(password: &[u8]) -> String {
    Argon2::default()
        .hash_password(password)
        .map(|h| h.to_string())
        // Hashing fails only for parameters out of range, and the defaults are in range.
        .expect("argon2 rejected its own default parameters")
}

fn verify_now(password: &[u8], stored: &str) -> bool {
    PasswordHash::new(stored).is_ok_and(|h| Argon2::default().verify_password(password, &h).is_ok())
}

/// Runs the calling thread at nice +10 (Linux: niceness is per thread).
#[allow(unsafe_code)]
fn lower_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: setpriority takes plain integers and only changes the calling thread's niceness;
    // on failure the thread simply keeps its priority.
    unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 10);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hashes_are_argon2id_with_owasp_parameters_and_verify() {
        let hasher = Hasher::start(1, 4);
        let phc = hasher.hash("correct horse".into()).await.unwrap();
        assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");
        assert!(hasher.verify("correct horse".into(), Some(phc.clone())).await.unwrap());
        assert!(!hasher.verify("wrong horse".into(), Some(phc.clone())).await.unwrap());
        assert!(!hasher.verify("correct horse".into(), None).await.unwrap());
        assert!(!hasher.verify("x".into(), Some("not a hash".into())).await.unwrap());
    }

    #[tokio::test]
    async fn a_full_queue_answers_busy() {
        let hasher = Hasher::start(1, 1);
        let many: Vec<_> = (0..8).map(|_| hasher.hash("password123".into())).collect();
        let results = futures_util::future::join_all(many).await;
        assert!(results.iter().any(Result::is_ok));
        assert!(results.iter().any(Result::is_err), "eight hashes fitted in a queue of one");
    }
}
