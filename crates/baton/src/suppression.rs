//! The suppression list: addresses that must not be mailed again through the HTTP API, because
//! they bounced as non-existent (a permanent 5.1.x reply) or an operator said so. Injection
//! leaves them out and says which; each is a `suppression` event. SMTP traffic is not
//! filtered: an MX or relay passes on what it is given.
//!
//! Kept in `data_dir/suppressions.jsonl`, an append-only log of additions and removals that is
//! replayed at start. Owns that list only.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

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

    fn append(&self, line: &LogLine) {
        let written = serde_json::to_string(line)
            .map_err(std::io::Error::other)
            .and_then(|mut text| {
                text.push('\n');
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.path)?
                    .write_all(text.as_bytes())
            });
        if let Err(e) = written {
            tracing::error!(path = %self.path.display(), error = %e, "cannot write the suppression list");
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
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
}
