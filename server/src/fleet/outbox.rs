//! Results a room server has not seen acknowledged yet, one file each in its data folder:
//! written (and synced) before the result is first sent, removed when the hub says it is
//! recorded. A room server that loses the hub, or is restarted, sends them again; the hub
//! records each match id once.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use super::control::FromServer;

#[derive(Debug)]
pub struct Outbox {
    dir: PathBuf,
    /// By match id.
    pending: BTreeMap<u64, FromServer>,
}

impl Outbox {
    /// Opens (creating) the folder and reads what it holds. Unreadable files are reported and
    /// left in place for the operator.
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut pending = BTreeMap::new();
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            let Some(id) = path.file_stem().and_then(|s| s.to_str()).and_then(|s| s.parse::<u64>().ok()) else {
                continue;
            };
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            match std::fs::read(&path).map(|bytes| serde_json::from_slice::<FromServer>(&bytes)) {
                Ok(Ok(msg @ FromServer::Finished { .. })) => {
                    pending.insert(id, msg);
                }
                _ => tracing::error!(path = %path.display(), "unreadable result file left in place"),
            }
        }
        Ok(Self { dir: dir.to_owned(), pending })
    }

    /// Keeps `result` (a [`FromServer::Finished`]) on disk before it is sent.
    pub fn keep(&mut self, match_id: u64, result: FromServer) -> std::io::Result<()> {
        let path = self.dir.join(format!("{match_id}.json"));
        let partial = self.dir.join(format!("{match_id}.json.partial"));
        let mut file = std::fs::File::create(&partial)?;
        file.write_all(result.to_json().as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&partial, &path)?;
        std::fs::File::open(&self.dir)?.sync_all()?;
        self.pending.insert(match_id, result);
        Ok(())
    }

    /// The hub recorded it.
    pub fn acknowledged(&mut self, match_id: u64) {
        if self.pending.remove(&match_id).is_some()
            && let Err(e) = std::fs::remove_file(self.dir.join(format!("{match_id}.json")))
        {
            tracing::warn!(match_id, error = %e, "cannot remove an acknowledged result");
        }
    }

    /// Results not acknowledged yet, oldest match id first.
    pub fn pending(&self) -> impl Iterator<Item = &FromServer> {
        self.pending.values()
    }

    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::control::Signed;
    use shared::game::{EndReason, Outcome};

    fn finished(n: u64) -> FromServer {
        FromServer::Finished {
            assignment: Signed { body: format!("{{\"match_id\":{n}}}"), signature: "s".into() },
            outcome: Outcome { ranks: vec![1, 2], scores: vec![3, 1], reason: EndReason::ScoreLimit, ticks: 9 },
        }
    }

    #[test]
    fn results_survive_a_restart_until_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let mut outbox = Outbox::open(dir.path()).unwrap();
        outbox.keep(1, finished(1)).unwrap();
        outbox.keep(2, finished(2)).unwrap();
        std::fs::write(dir.path().join("junk.json"), "not json").unwrap();
        std::fs::write(dir.path().join("3.json"), "{").unwrap();
        let mut again = Outbox::open(dir.path()).unwrap();
        assert_eq!(again.pending().cloned().collect::<Vec<_>>(), vec![finished(1), finished(2)]);
        again.acknowledged(1);
        again.acknowledged(7);
        let last = Outbox::open(dir.path()).unwrap();
        assert_eq!(last.len(), 1);
        assert!(dir.path().join("3.json").exists(), "an unreadable file is left for the operator");
    }
}
