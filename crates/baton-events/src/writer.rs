//! The writer: producers send events down a channel; one thread appends whatever arrived in
//! one write every 20 ms and fdatasyncs at most once a second. It starts a new file when the
//! newest reaches its size or age, and deletes files older than the retention (see `files`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use crate::files::{self, LogFile};
use crate::{Event, EventKind};

/// How the log is cut into files and how long they are kept (`[events]`).
#[derive(Debug, Clone)]
pub struct LogOptions {
    /// fdatasync the log (at most once a second).
    pub fsync: bool,
    /// A new file is started once the newest reaches this size...
    pub file_size: u64,
    /// ...or holds events older than this.
    pub file_age: Duration,
    /// Files last written longer ago than this are deleted (none: kept for ever).
    pub retention: Option<Duration>,
}

impl Default for LogOptions {
    fn default() -> Self {
        LogOptions {
            fsync: true,
            file_size: 128 << 20,
            file_age: Duration::from_secs(86_400),
            retention: Some(Duration::from_secs(30 * 86_400)),
        }
    }
}

/// What the writer thread receives.
enum Entry {
    Event(Box<Event>),
    /// Answer once everything sent before has been written (not necessarily synced).
    Written(mpsc::Sender<()>),
}

/// Cheap to clone; emitting never blocks.
#[derive(Clone)]
pub struct Events {
    tx: mpsc::Sender<Entry>,
    /// Bytes in the log file so far; changes after every write (webhooks wait on it).
    length: tokio::sync::watch::Receiver<u64>,
    /// The log's length when it was opened (after a torn tail was cut), before any write.
    opened_len: u64,
    boot: u64,
    seq: std::sync::Arc<AtomicU64>,
}

impl Events {
    /// Starts the writer thread on `data_dir/events`. Must be called inside a tokio runtime.
    pub fn start(data_dir: &Path, options: LogOptions) -> anyhow::Result<Events> {
        let dir = data_dir.join("events");
        let newest = files::prepare(&dir)?;
        repair_torn_tail(&newest.path)?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&newest.path)?;
        let (tx, rx) = mpsc::channel();
        let opened_len = newest.start + file.metadata()?.len();
        let (length_tx, length) = tokio::sync::watch::channel(opened_len);
        let log = Log::new(dir, newest, file, options);
        std::thread::Builder::new()
            .name("event-log".into())
            .spawn(move || writer(log, rx, length_tx))?;
        Ok(Events {
            tx,
            length,
            opened_len,
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
            campaign: None,
            tenant: None,
            source: None,
            latency_ms: None,
            class: None,
            hard: None,
            is_async: None,
        }
    }

    pub fn emit(&self, event: Event) {
        let _ = self.tx.send(Entry::Event(Box::new(event)));
    }

    /// The log's length (all files) when this run opened it: every offset saved before lies
    /// within it.
    pub fn opened_length(&self) -> u64 {
        self.opened_len
    }

    /// The log's length (all files), updated after every write.
    pub fn length(&self) -> tokio::sync::watch::Receiver<u64> {
        self.length.clone()
    }

    /// Waits (up to two seconds) until every event emitted so far is in the file, so that a
    /// reader of the log sees them.
    pub async fn written(&self) {
        let (tx, rx) = mpsc::channel();
        if self.tx.send(Entry::Written(tx)).is_err() {
            return;
        }
        let _ = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(2))).await;
    }
}

/// Cuts an unfinished last line (a crash or a full disk mid-write) so that the next event
/// starts a line of its own instead of being glued to it.
fn repair_torn_tail(path: &Path) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut file) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    else {
        return Ok(()); // not there yet
    };
    let len = file.metadata()?.len();
    let mut end = len;
    let mut chunk = vec![0u8; 64 << 10];
    while end > 0 {
        let start = end.saturating_sub(chunk.len() as u64);
        let part = &mut chunk[..(end - start) as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(part)?;
        if let Some(i) = part.iter().rposition(|&b| b == b'\n') {
            end = start + i as u64 + 1;
            break;
        }
        end = start;
    }
    if end < len {
        tracing::warn!(path = %path.display(), cut = len - end, "event log ended in an unfinished line; cut");
        file.set_len(end)?;
        file.sync_all()?;
    }
    Ok(())
}

/// The longest event line written: a longer one has its `response` shortened (readers, webhooks
/// among them, read the log in bounded chunks).
const MAX_LINE: usize = 64 << 10;

/// Appends one event as a JSON line to `buf`, within [`MAX_LINE`].
fn encode(buf: &mut Vec<u8>, event: &mut Event) {
    let start = buf.len();
    if serde_json::to_writer(&mut *buf, &*event).is_err() {
        buf.truncate(start);
        return;
    }
    if buf.len() - start > MAX_LINE {
        buf.truncate(start);
        let fields = [&mut event.response, &mut event.tls, &mut event.remote_mta];
        for text in fields.into_iter().flatten() {
            let mut cut = text.len().min(4096);
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
        }
        if serde_json::to_writer(&mut *buf, &*event).is_err() || buf.len() - start > MAX_LINE {
            buf.truncate(start);
            return;
        }
    }
    buf.push(b'\n');
}

/// Events written but not fsynced are synced after this long at the latest.
const SYNC_DELAY: Duration = Duration::from_secs(1);
/// The writer wakes this often: producers never pay for waking it, and each wake-up writes
/// everything that arrived meanwhile in one write.
const WRITE_INTERVAL: Duration = Duration::from_millis(20);

/// The file being appended to, and when to leave it.
struct Log {
    dir: PathBuf,
    current: LogFile,
    file: std::fs::File,
    /// When the current file's first event was written (or it was started).
    started: SystemTime,
    options: LogOptions,
    last_expiry: Instant,
}

/// Retention is applied at every rotation and at least this often.
const EXPIRE_EVERY: Duration = Duration::from_secs(3600);

impl Log {
    fn new(dir: PathBuf, current: LogFile, file: std::fs::File, options: LogOptions) -> Log {
        let started = first_stamp(&current.path).unwrap_or_else(SystemTime::now);
        let mut log = Log {
            dir,
            current,
            file,
            started,
            options,
            last_expiry: Instant::now(),
        };
        log.expire();
        log
    }

    /// Appends `buf`; false (and the file cut back) if it could not.
    fn append(&mut self, buf: &[u8]) -> bool {
        match self.file.write_all(buf) {
            Ok(()) => {
                if self.current.len == 0 {
                    self.started = SystemTime::now();
                }
                self.current.len += buf.len() as u64;
                true
            }
            Err(e) => {
                // A partial write would glue the next event to a torn line: cut it back.
                let _ = self.file.set_len(self.current.len);
                tracing::error!(path = %self.current.path.display(), error = %e, "cannot write the event log");
                false
            }
        }
    }

    /// Starts a new file when the current one is full or old enough; applies retention.
    fn rotate_if_due(&mut self) {
        let old = SystemTime::now()
            .duration_since(self.started)
            .is_ok_and(|age| age >= self.options.file_age);
        let due = self.current.len > 0 && (self.current.len >= self.options.file_size || old);
        if due && let Err(e) = self.rotate() {
            tracing::error!(dir = %self.dir.display(), error = %e, "cannot start a new event log file; appending to the old one");
        }
        if self.last_expiry.elapsed() >= EXPIRE_EVERY {
            self.expire();
        }
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        if self.options.fsync {
            self.file.sync_data()?;
        }
        let next = files::create(&self.dir, self.current.end())?;
        let file = std::fs::OpenOptions::new().append(true).open(&next.path)?;
        files::point_link(&self.dir, &next)?;
        if self.options.fsync {
            std::fs::File::open(&self.dir)?.sync_all()?;
        }
        tracing::info!(file = %next.path.display(), "event log: new file");
        self.current = next;
        self.file = file;
        self.started = SystemTime::now();
        self.expire();
        Ok(())
    }

    fn expire(&mut self) {
        self.last_expiry = Instant::now();
        let Some(keep) = self.options.retention else {
            return;
        };
        match files::expire(&self.dir, keep, SystemTime::now()) {
            Ok(0) => {}
            Ok(n) => tracing::info!(files = n, "event log: files past the retention deleted"),
            Err(e) => tracing::warn!(error = %e, "event log: cannot apply the retention"),
        }
    }
}

/// When the file's first event was stamped.
fn first_stamp(path: &Path) -> Option<SystemTime> {
    use std::io::{BufRead, Read};
    let file = std::fs::File::open(path).ok()?;
    let mut line = Vec::new();
    std::io::BufReader::new(file)
        .take(64 << 10)
        .read_until(b'\n', &mut line)
        .ok()?;
    let event: serde_json::Value = serde_json::from_slice(&line).ok()?;
    let at: jiff::Timestamp = event.get("timestamp")?.as_str()?.parse().ok()?;
    Some(SystemTime::from(at))
}

fn writer(mut log: Log, rx: mpsc::Receiver<Entry>, length: tokio::sync::watch::Sender<u64>) {
    let mut buf = Vec::with_capacity(64 << 10);
    let mut dirty = false;
    let mut last_sync = Instant::now();
    let mut open = true;
    let mut waiting = Vec::new();
    let fsync = log.options.fsync;
    while open {
        std::thread::sleep(WRITE_INTERVAL);
        buf.clear();
        loop {
            match rx.try_recv() {
                Ok(Entry::Event(mut event)) => encode(&mut buf, &mut event),
                Ok(Entry::Written(reply)) => waiting.push(reply),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        if !buf.is_empty() && log.append(&buf) {
            dirty = true;
            length.send_modify(|n| *n += buf.len() as u64);
        }
        for reply in waiting.drain(..) {
            let _ = reply.send(());
        }
        if fsync && dirty && (last_sync.elapsed() >= SYNC_DELAY || !open) {
            if let Err(e) = log.file.sync_data() {
                tracing::error!(path = %log.current.path.display(), error = %e, "cannot sync the event log");
            }
            dirty = false;
            last_sync = Instant::now();
        }
        log.rotate_if_due();
    }
}
