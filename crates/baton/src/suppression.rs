//! The suppression list: addresses that must not be mailed again through the HTTP API, because
//! they bounced as non-existent (a permanent 5.1.x reply) or an operator said so. Injection
//! leaves them out and says which; each is a `suppression` event. SMTP traffic is not
//! filtered: an MX or relay passes on what it is given.
//!
//! Kept in `data_dir/suppressions.jsonl`, an append-only log of additions and removals that is
//! replayed at start. Owns that list only.
//!
//! The set in memory changes at once (a suppressed address is refused from that moment); the
//! file is appended by a writer thread, in the order of the changes, so that no caller (the
//! queue manager's loop, an API request) waits on the disk.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock, mpsc};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Entry {
    pub email: String,
    pub reason: String,
    /// RFC 3339.
    pub since: String,
}

#[derive(Serialize, Deserialize)]
struct LogLine {
    #[serde(default)]
    removed: bool,
    #[serde(flatten)]
    entry: Entry,
}

pub struct Suppressions {
    path: PathBuf,
    entries: Mutex<HashMap<String, Entry>>,
}

impl Suppressions {
    pub fn open(data_dir: &Path) -> std::io::Result<Suppressions> {
        let path = data_dir.join("suppressions.jsonl");
        // What an earlier handle on this file queued is in it before it is read.
        flush_writes();
        let mut entries = HashMap::new();
        if let Ok(text) = std::fs::read_to_string(&path) {
            for line in text.lines() {
                // A torn last line after a crash is skipped.
                let Ok(l) = serde_json::from_str::<LogLine>(line) else {
                    continue;
                };
                let key = l.entry.email.to_ascii_lowercase();
                if l.removed {
                    entries.remove(&key);
                } else {
                    entries.insert(key, l.entry);
                }
            }
        }
        Ok(Suppressions {
            path,
            entries: Mutex::new(entries),
        })
    }

    pub fn contains(&self, email: &str) -> bool {
        self.lock().contains_key(&email.to_ascii_lowercase())
    }

    /// Adds an address; false if it was already there.
    pub fn add(&self, email: &str, reason: &str) -> bool {
        let entry = Entry {
            email: email.to_ascii_lowercase(),
            reason: reason.to_string(),
            since: jiff::Timestamp::now().to_string(),
        };
        let mut entries = self.lock();
        if entries.contains_key(&entry.email) {
            return false;
        }
        self.append(&LogLine {
            removed: false,
            entry: entry.clone(),
        });
        entries.insert(entry.email.clone(), entry);
        true
    }

    /// Removes an address; false if it was not there.
    pub fn remove(&self, email: &str) -> bool {
        let mut entries = self.lock();
        let Some(entry) = entries.remove(&email.to_ascii_lowercase()) else {
            return false;
        };
        self.append(&LogLine {
            removed: true,
            entry,
        });
        true
    }

    pub fn list(&self) -> Vec<Entry> {
        let mut all: Vec<Entry> = self.lock().values().cloned().collect();
        all.sort_by(|a, b| a.email.cmp(&b.email));
        all
    }

    /// Queues a line for the file; called under the lock, so lines go in the order of the
    /// changes.
    fn append(&self, line: &LogLine) {
        let text = match serde_json::to_string(line) {
            Ok(text) => text + "\n",
            Err(e) => {
                tracing::error!(error = %e, "cannot write the suppression list");
                return;
            }
        };
        let write = Write::Append {
            path: self.path.clone(),
            text,
        };
        match writer() {
            Some(tx) => {
                if let Err(mpsc::SendError(write)) = tx.send(write) {
                    perform(write);
                }
            }
            None => perform(write),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What the writer thread does, in the order received.
enum Write {
    Append {
        path: PathBuf,
        text: String,
    },
    /// Answer once everything before is written.
    Flush(mpsc::Sender<()>),
}

/// One writer thread for the process's suppression files, started with the first change.
static WRITER: OnceLock<Option<mpsc::Sender<Write>>> = OnceLock::new();

fn writer() -> Option<&'static mpsc::Sender<Write>> {
    WRITER
        .get_or_init(|| {
            let (tx, rx) = mpsc::channel::<Write>();
            std::thread::Builder::new()
                .name("suppressions".into())
                .spawn(move || rx.into_iter().for_each(perform))
                .map_err(|e| tracing::warn!(error = %e, "suppression writes are inline"))
                .ok()?;
            Some(tx)
        })
        .as_ref()
}

/// Waits until every change queued so far is in its file (nothing to wait for before the
/// writer has started). The server calls it as it stops.
pub fn flush_writes() {
    let Some(Some(tx)) = WRITER.get() else {
        return;
    };
    let (done, wait) = mpsc::channel();
    if tx.send(Write::Flush(done)).is_ok() {
        let _ = wait.recv();
    }
}

fn perform(write: Write) {
    match write {
        Write::Append { path, text } => {
            let written = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .and_then(|mut file| std::io::Write::write_all(&mut file, text.as_bytes()));
            if let Err(e) = written {
                tracing::error!(path = %path.display(), error = %e, "cannot write the suppression list");
            }
        }
        Write::Flush(done) => {
            let _ = done.send(());
        }
    }
}

/// Whether a permanent failure says the address does not exist (RFC 3463 5.1.x: bad
/// mailbox, bad domain, null MX), which is what suppression is for; policy refusals (5.7.x)
/// and full mailboxes are not.
pub fn means_no_such_address(status: &str) -> bool {
    status.starts_with("5.1.")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let s = Suppressions::open(dir.path()).unwrap();
        assert!(s.add("Ann@Example.com", "5.1.1"));
        assert!(!s.add("ann@example.com", "again"));
        assert!(s.add("bob@example.com", "operator"));
        assert!(s.remove("BOB@example.com"));
        let s = Suppressions::open(dir.path()).unwrap();
        assert!(s.contains("ANN@example.com"));
        assert!(!s.contains("bob@example.com"));
        assert_eq!(s.list().len(), 1);
    }

    #[test]
    fn changes_reach_the_file_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let s = Suppressions::open(dir.path()).unwrap();
        for round in 0..50 {
            assert!(s.add("cy@example.com", &format!("round {round}")));
            assert!(s.contains("cy@example.com"), "refused at once");
            assert!(s.remove("cy@example.com"));
        }
        assert!(s.add("cy@example.com", "last"));
        let reopened = Suppressions::open(dir.path()).unwrap();
        assert_eq!(reopened.list().len(), 1);
        assert_eq!(reopened.list()[0].reason, "last");
        let text = std::fs::read_to_string(dir.path().join("suppressions.jsonl")).unwrap();
        assert_eq!(text.lines().count(), 101);
        assert!(text.lines().all(|l| l.starts_with('{') && l.ends_with('}')));
    }
}
