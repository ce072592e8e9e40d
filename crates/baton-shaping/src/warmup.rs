//! The warm-up ledger: how many recipients each source has sent to each destination in the
//! current warm-up period, kept in `data_dir/warmup.log` so that a restart (or a crash loop)
//! does not hand a new IP a fresh allowance.
//!
//! Each take appends one line `period count key` (no fsync: a kill -9 keeps it, a power cut
//! loses at most the last moments), written by a thread of the ledger's own so that delivery
//! never waits on the file; at start the file is read, summed per key for the period each key
//! was last seen in, and written back compacted. Owns that file only; the caps and their
//! periods are shaping's.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::{Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

/// An IP warm-up plan: how many messages a source may send to one destination in each period
/// (day or hour) since the plan started; after the table, no cap.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WarmupPlan {
    pub caps: Vec<u64>,
    pub start_ms: u64,
    pub period: Duration,
}

impl WarmupPlan {
    /// A common ramp for a new IP, per destination per day, doubling roughly every day for two
    /// weeks.
    pub const BUILTIN: [u64; 14] = [
        50, 100, 200, 400, 750, 1500, 3000, 6000, 10000, 20000, 35000, 50000, 75000, 100000,
    ];

    /// The period `now_ms` falls in, its cap (None past the table) and when the next begins.
    pub(crate) fn period(&self, now_ms: u64) -> (u64, Option<u64>, u64) {
        let period_ms = self.period.as_millis().max(1) as u64;
        let index = now_ms.saturating_sub(self.start_ms) / period_ms;
        let next = self.start_ms + (index + 1) * period_ms;
        (
            index,
            self.caps.get(index as usize).copied(),
            next.max(now_ms + 1),
        )
    }
}

#[derive(Debug, Default)]
pub(crate) struct WarmupCount {
    pub(crate) period: u64,
    pub(crate) sent: u64,
}

/// A source's warm-up plan under one rule: what it has sent this period, kept in the ledger
/// (when there is one) under `key`, so that a restart does not reset it.
pub struct Warmup {
    pub(crate) plan: WarmupPlan,
    pub(crate) count: Mutex<WarmupCount>,
    pub(crate) key: String,
    pub(crate) ledger: Option<Arc<Ledger>>,
}

impl Warmup {
    pub(crate) fn new(plan: WarmupPlan, key: String, ledger: Option<Arc<Ledger>>) -> Warmup {
        let (period, _, _) = plan.period(baton_spool::now_ms());
        let sent = ledger.as_ref().map_or(0, |l| l.sent(&key, period));
        Warmup {
            plan,
            count: Mutex::new(WarmupCount { period, sent }),
            key,
            ledger,
        }
    }
}

/// Sent counts by key ("source destination-rule"), for the period each was last counted in.
pub struct Ledger {
    path: PathBuf,
    /// Lines for the writer thread; none when it could not start (then lines are appended
    /// inline).
    lines: Mutex<Option<mpsc::Sender<String>>>,
    writer: Option<JoinHandle<()>>,
    /// What each key has sent in the latest period it counted in (read at start, then kept
    /// up to date).
    current: Mutex<HashMap<String, (u64, u64)>>,
}

impl Ledger {
    /// Reads and compacts `path`. A missing or unreadable file starts an empty ledger (the
    /// reason is logged): warm-up then counts from zero, as before it was kept.
    pub fn open(path: &Path) -> Ledger {
        let (loaded, readable) = match std::fs::read_to_string(path) {
            Ok(text) => (parse(&text), true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (HashMap::new(), true),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read the warm-up ledger; counting from zero (the file is kept)");
                (HashMap::new(), false)
            }
        };
        let (tx, rx) = mpsc::channel();
        let thread_path = path.to_path_buf();
        let writer = std::thread::Builder::new()
            .name("warmup-ledger".into())
            .spawn(move || append_lines(&thread_path, rx))
            .map_err(|e| tracing::warn!(error = %e, "the warm-up ledger is written inline"))
            .ok();
        let lines = Mutex::new(writer.as_ref().map(|_| tx));
        let ledger = Ledger {
            path: path.to_path_buf(),
            lines,
            writer,
            current: Mutex::new(loaded),
        };
        // An unreadable ledger is not replaced by an empty one: the counts may come back.
        if readable {
            ledger.compact();
        }
        ledger
    }

    fn current(&self) -> std::sync::MutexGuard<'_, HashMap<String, (u64, u64)>> {
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What `key` has sent in `period` (read at start when a key's counter is made: each key
    /// has one for the whole run).
    pub fn sent(&self, key: &str, period: u64) -> u64 {
        match self.current().get(key) {
            Some(&(p, n)) if p == period => n,
            _ => 0,
        }
    }

    /// Every key's count in the latest period it counted in: (key, period, sent).
    pub fn counts(&self) -> Vec<(String, u64, u64)> {
        self.current()
            .iter()
            .map(|(k, &(p, n))| (k.clone(), p, n))
            .collect()
    }

    /// Records `n` more recipients sent by `key` in `period`.
    pub fn record(&self, key: &str, period: u64, n: u64) {
        {
            let mut current = self.current();
            let count = current.entry(key.to_string()).or_insert((period, 0));
            if count.0 < period {
                *count = (period, 0);
            }
            if count.0 == period {
                count.1 = count.1.saturating_add(n);
            }
        }
        let line = format!("{period} {n} {key}\n");
        let unsent = match &*self.lines.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(tx) => tx.send(line).err().map(|mpsc::SendError(line)| line),
            None => Some(line),
        };
        if let Some(line) = unsent {
            append(&self.path, &mut None, &line);
        }
    }

    /// Writes the loaded counts back, one line per key (a temporary file renamed over).
    fn compact(&self) {
        let mut text = String::new();
        for (key, (period, n)) in self.current().iter() {
            text.push_str(&format!("{period} {n} {key}\n"));
        }
        let tmp = self.path.with_extension("log.tmp");
        let written = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, &self.path));
        if let Err(e) = written {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot compact the warm-up ledger");
        }
    }
}

impl Drop for Ledger {
    /// Waits for the lines already recorded to be written.
    fn drop(&mut self) {
        self.lines.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

/// The writer thread: appends each line as it comes, until the ledger is dropped.
fn append_lines(path: &Path, rx: mpsc::Receiver<String>) {
    let mut file = None;
    while let Ok(line) = rx.recv() {
        append(path, &mut file, &line);
    }
}

/// Appends one line to the ledger, opening it on first use.
fn append(path: &Path, file: &mut Option<std::fs::File>, line: &str) {
    if file.is_none() {
        *file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| tracing::warn!(path = %path.display(), error = %e, "cannot open the warm-up ledger"))
            .ok();
    }
    if let Some(f) = file.as_mut()
        && let Err(e) = f.write_all(line.as_bytes())
    {
        tracing::warn!(path = %path.display(), error = %e, "cannot record warm-up counts");
    }
}

/// Sums `period count key` lines per key, keeping only each key's latest period. Lines that do
/// not parse (a torn last line) are skipped.
fn parse(text: &str) -> HashMap<String, (u64, u64)> {
    let mut counts: HashMap<String, (u64, u64)> = HashMap::new();
    for line in text.lines() {
        let mut parts = line.splitn(3, ' ');
        let (Some(period), Some(n), Some(key)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let (Ok(period), Ok(n)) = (period.parse::<u64>(), n.parse::<u64>()) else {
            continue;
        };
        let entry = counts.entry(key.to_string()).or_insert((period, 0));
        if period > entry.0 {
            *entry = (period, 0);
        }
        if period == entry.0 {
            entry.1 = entry.1.saturating_add(n);
        }
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_survive_a_reopen_and_old_periods_drop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("warmup.log");
        let ledger = Ledger::open(&path);
        ledger.record("ip10 domain gmail.com", 3, 2);
        ledger.record("ip10 domain gmail.com", 3, 5);
        ledger.record("ip11 site google.com", 2, 4);
        ledger.record("ip11 site google.com", 3, 1);
        // What a fleet's store is given to put back: each key in its latest period.
        let mut counts = ledger.counts();
        counts.sort();
        assert_eq!(
            counts,
            [
                ("ip10 domain gmail.com".to_string(), 3, 7),
                ("ip11 site google.com".to_string(), 3, 1)
            ]
        );
        drop(ledger);
        // A torn last line is skipped.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"3 9")
            .unwrap();
        let ledger = Ledger::open(&path);
        assert_eq!(ledger.sent("ip10 domain gmail.com", 3), 7);
        assert_eq!(ledger.sent("ip10 domain gmail.com", 4), 0, "a new period");
        assert_eq!(
            ledger.sent("ip11 site google.com", 3),
            1,
            "period 2 dropped"
        );
        assert_eq!(ledger.sent("nobody", 3), 0);
        assert_eq!(ledger.counts().len(), 2, "read back at start");
        let lines = std::fs::read_to_string(&path).unwrap().lines().count();
        assert_eq!(lines, 2, "compacted to one line per key");
    }
}
