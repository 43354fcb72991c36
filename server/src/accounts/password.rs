//! Password hashing with argon2id on a small pool of low-priority threads.
//!
//! One hash costs ~20 ms of CPU. The pool is bounded twice: a fixed number of threads, and a
//! queue of fixed length beyond which callers are told the server is busy. Its threads run
//! under `SCHED_IDLE` on Linux: they get only CPU time nobody else wants, so a login storm never
//! delays a room tick or a WebSocket message (measured: nice +10 still let ticks wait ~4 ms).

use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};

use argon2::password_hash::phc::{Output, ParamsString, PasswordHash, Salt};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use subtle::ConstantTimeEq;
use tokio::sync::oneshot;

/// A hashing thread's working memory (19 MiB with OWASP's parameters), allocated once and
/// reused: allocating, faulting in and freeing it for every hash is kernel work that delays
/// whatever else runs on the core.
type Memory = Vec<Block>;

type Job = Box<dyn FnOnce(&mut Memory) + Send>;

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
        let decoy = hash_blocking(crate::random::token().as_bytes());
        Self { jobs, decoy: Arc::new(decoy) }
    }

    /// Hashes `password` into a PHC string (`$argon2id$v=19$m=19456,t=2,p=1$…`).
    pub async fn hash(&self, password: String) -> Result<String, Busy> {
        self.run(move |memory| hash_with(memory, password.as_bytes())).await
    }

    /// Checks `password` against a stored PHC string; `None` checks against a decoy and fails.
    pub async fn verify(&self, password: String, stored: Option<String>) -> Result<bool, Busy> {
        let known = stored.is_some();
        let phc = stored.unwrap_or_else(|| self.decoy.as_str().to_owned());
        let ok = self.run(move |memory| verify_with(memory, password.as_bytes(), &phc)).await?;
        Ok(known && ok)
    }

    async fn run<T: Send + 'static>(&self, f: impl FnOnce(&mut Memory) -> T + Send + 'static) -> Result<T, Busy> {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |memory| {
            let _ = tx.send(f(memory));
        });
        match self.jobs.try_send(job) {
            Ok(()) => rx.await.map_err(|_| Busy),
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => Err(Busy),
        }
    }
}

fn work(rx: &Mutex<Receiver<Job>>) {
    lower_priority();
    let mut memory = Memory::new();
    loop {
        // The lock is held only while waiting for the next job, never while hashing.
        let job = match rx.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        match job {
            Ok(job) => job(&mut memory),
            Err(_) => return, // every Hasher was dropped
        }
    }
}

/// Hashes on the calling thread (for tools, not for request handlers).
pub fn hash_blocking(password: &[u8]) -> String {
    hash_with(&mut Memory::new(), password)
}

/// Most memory a stored hash may ask for (64 MiB): hashes come from our own database, but a
/// bound costs nothing.
const MAX_M_COST: u32 = 64 * 1024;

fn argon2id(params: Params) -> Argon2<'static> {
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

fn memory_for<'m>(memory: &'m mut Memory, params: &Params) -> &'m mut [Block] {
    let blocks = params.block_count();
    if memory.len() < blocks {
        memory.resize(blocks, Block::default());
    }
    &mut memory[..blocks]
}

/// argon2id with the crate's defaults, which are OWASP's: m = 19 MiB, t = 2, p = 1, a 16-byte
/// random salt and a 32-byte output, as a PHC string.
fn hash_with(memory: &mut Memory, password: &[u8]) -> String {
    let params = Params::default();
    let mut salt = [0u8; Salt::RECOMMENDED_LENGTH];
    crate::random::fill(&mut salt);
    let mut out = [0u8; Params::DEFAULT_OUTPUT_LEN];
    // Only lengths can make these fail, and ours are the defaults.
    argon2id(params.clone())
        .hash_password_into_with_memory(password, &salt, &mut out, memory_for(memory, &params))
        .expect("argon2 rejected its own default parameters");
    let phc = PasswordHash {
        algorithm: Algorithm::Argon2id.ident(),
        version: Some(Version::V0x13.into()),
        params: ParamsString::try_from(&params).expect("default parameters format"),
        salt: Some(Salt::new(&salt).expect("a 16-byte salt")),
        hash: Some(Output::new(&out).expect("a 32-byte output")),
    };
    phc.to_string()
}

/// Checks a password against a PHC string, in the thread's memory.
fn verify_with(memory: &mut Memory, password: &[u8], stored: &str) -> bool {
    let Ok(phc) = PasswordHash::new(stored) else { return false };
    let Ok(params) = Params::try_from(&phc) else { return false };
    let (Some(salt), Some(expected)) = (phc.salt, phc.hash) else { return false };
    if phc.algorithm != Algorithm::Argon2id.ident() || params.m_cost() > MAX_M_COST {
        return false;
    }
    let mut out = vec![0u8; expected.len()];
    let computed = argon2id(params.clone()).hash_password_into_with_memory(
        password,
        salt.as_ref(),
        &mut out,
        memory_for(memory, &params),
    );
    computed.is_ok() && bool::from(out.ct_eq(expected.as_bytes()))
}

/// Moves the calling thread to `SCHED_IDLE` (Linux; scheduling policy is per thread).
#[allow(unsafe_code)]
fn lower_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: sched_setscheduler reads a plain struct owned by this frame and changes only the
    // calling thread (pid 0); on failure the thread simply keeps its policy.
    unsafe {
        let param = libc::sched_param { sched_priority: 0 };
        libc::sched_setscheduler(0, libc::SCHED_IDLE, &raw const param);
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

    #[test]
    fn hashes_interoperate_with_the_argon2_crates_own_hasher_and_verifier() {
        use argon2::password_hash::{PasswordHasher, PasswordVerifier};
        let ours = hash_blocking(b"hunter2hunter2");
        let parsed = PasswordHash::new(&ours).unwrap();
        assert!(Argon2::default().verify_password(b"hunter2hunter2", &parsed).is_ok());
        assert!(Argon2::default().verify_password(b"hunter3hunter3", &parsed).is_err());
        let theirs = Argon2::default().hash_password(b"hunter2hunter2").unwrap().to_string();
        let mut memory = Memory::new();
        assert!(verify_with(&mut memory, b"hunter2hunter2", &theirs));
        assert!(!verify_with(&mut memory, b"hunter2hunter3", &theirs));
        // Another algorithm or an absurd memory cost is refused without hashing.
        let argon2i = theirs.replacen("argon2id", "argon2i", 1);
        assert!(!verify_with(&mut memory, b"hunter2hunter2", &argon2i));
        let greedy = theirs.replacen("m=19456", "m=4000000", 1);
        assert!(!verify_with(&mut memory, b"hunter2hunter2", &greedy));
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
