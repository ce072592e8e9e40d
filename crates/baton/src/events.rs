//! The event log: every reception, delivery, transient failure, bounce and expiration as one
//! JSON line in `data_dir/events/events.jsonl`.
//!
//! Producers call [`Events::emit`], which never blocks or wakes anyone; a writer thread wakes
//! every 20 ms, appends whatever arrived in one write, and fdatasyncs at most once a second (an
//! event is safe from a process crash within 20 ms, from a power cut within a second). Owns
//! that file only; it must not decide anything about mail.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::Serialize;

/// One event. Field names are the HTTP API's and webhooks' (issue "Observe").
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// Unique across restarts: `<boot time hex>-<sequence>`.
    pub id: String,
    #[serde(rename = "type")]
    pub kind: EventKind,
    /// RFC 3339.
    pub timestamp: String,
    pub message_id: String,
    pub recipient: String,
    pub sender: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remote_mta: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempt: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_attempt: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<String>,
    /// For shaping changes: the destination they apply to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Reception,
    Delivery,
    TransientFailure,
    Bounce,
    Expiration,
    /// A DSN (bounce, delay or success notice) was queued for the sender.
    DsnQueued,
    /// A failure notice was not sent because the failed message was itself a bounce.
    BounceDropped,
    /// A destination's adaptive shaping state changed (suspended, throttled, recovered).
    Shaping,
    /// An operator removed a recipient without a DSN.
    Deleted,
    /// A recipient waits because of Baton's own shaping (a suspension, a warm-up cap): no
    /// attempt was made; `next_attempt` says until when.
    Held,
}

/// Cheap to clone; emitting never blocks.
#[derive(Clone)]
pub struct Events {
    tx: mpsc::Sender<Event>,
    boot: u64,
    seq: std::sync::Arc<AtomicU64>,
}

impl Events {
    /// Starts the writer task. Must be called inside a tokio runtime.
    pub fn start(data_dir: &Path, fsync: bool) -> anyhow::Result<Events> {
        let dir = data_dir.join("events");
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("events.jsonl");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)?;
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("event-log".into())
            .spawn(move || writer(file, path, rx, fsync))?;
        Ok(Events {
            tx,
            boot: baton_spool::now_ms(),
            seq: Default::default(),
        })
    }

    /// A new event with its id and timestamp; fill in the rest and [`Events::emit`] it.
    pub fn new_event(
        &self,
        kind: EventKind,
        message_id: &str,
        recipient: &str,
        sender: &str,
    ) -> Event {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        Event {
            id: format!("{:x}-{seq}", self.boot),
            kind,
            timestamp: jiff::Timestamp::now().to_string(),
            message_id: message_id.to_string(),
            recipient: recipient.to_string(),
            sender: sender.to_string(),
            code: None,
            status: None,
            response: None,
            remote_mta: None,
            attempt: None,
            next_attempt: None,
            size: None,
            tls: None,
            destination: None,
        }
    }

    pub fn emit(&self, event: Event) {
        let _ = self.tx.send(event);
    }
}

/// Events written but not fsynced are synced after this long at the latest.
const SYNC_DELAY: Duration = Duration::from_secs(1);
/// The writer wakes this often: producers never pay for waking it, and each wake-up writes
/// everything that arrived meanwhile in one write.
const WRITE_INTERVAL: Duration = Duration::from_millis(20);

fn writer(mut file: std::fs::File, path: PathBuf, rx: mpsc::Receiver<Event>, fsync: bool) {
    let mut buf = Vec::with_capacity(64 << 10);
    let mut dirty = false;
    let mut last_sync = Instant::now();
    let mut open = true;
    while open {
        std::thread::sleep(WRITE_INTERVAL);
        buf.clear();
        loop {
            match rx.try_recv() {
                Ok(event) => {
                    if serde_json::to_writer(&mut buf, &event).is_ok() {
                        buf.push(b'\n');
                    }
                }
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        if !buf.is_empty() {
            match file.write_all(&buf) {
                Ok(()) => dirty = true,
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "cannot write the event log")
                }
            }
        }
        if fsync && dirty && (last_sync.elapsed() >= SYNC_DELAY || !open) {
            if let Err(e) = file.sync_data() {
                tracing::error!(path = %path.display(), error = %e, "cannot sync the event log");
            }
            dirty = false;
            last_sync = Instant::now();
        }
    }
}
