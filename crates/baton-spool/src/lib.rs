//! Baton's durable spool: the only state shared between receiving and delivery.
//!
//! Messages are appended to a journal of segment files (see [`journal`]) by one committer
//! thread that takes every commit waiting at the moment, writes them with one `writev` and makes
//! them durable with one `fdatasync` (group commit): twenty sessions finishing DATA together cost
//! one disk flush, not twenty. A message's [`Spool::commit`] returns only after that flush, so a
//! 250 sent after it means the message survives a crash or `kill -9`.
//!
//! Bodies up to `inline_body_max` travel inside the journal record. Larger ones spill to
//! `bodies/<queue id>` while they are received (never held whole in memory) and are fsynced on
//! their own before their envelope record is committed; the record is the commit point, so a
//! body file without a record (a crash mid-DATA) is garbage and is removed at recovery.
//!
//! This crate owns the files under the spool directory. It knows nothing of SMTP sessions,
//! routing or delivery; see docs/ARCHITECTURE.md and docs/SPOOL.md.

mod committer;
pub mod compact;
pub mod envelope;
pub mod journal;
mod legacy;
pub mod recover;

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;
use std::thread;

use bytes::Bytes;
use tokio::sync::oneshot;

use committer::Committer;

pub use envelope::{
    Attempt, DsnRet, Envelope, IdGenerator, MessageMeta, Notify, PackedEnvelope, QueueId,
    RcptState, Recipient, RecipientUpdate, now_ms,
};
pub use journal::{BodyLocation, Record, StoredMessage};

/// Largest number of commits written with one fsync.
const MAX_BATCH: usize = 4096;
/// Spilled bodies are written to their file in chunks of this size.
const SPILL_CHUNK: usize = 1 << 20;

#[derive(Debug, Clone)]
pub struct SpoolOptions {
    /// fdatasync before acknowledging. Turning it off loses acknowledged mail on power loss.
    pub fsync: bool,
    /// A new segment is started once the active one reaches this size.
    pub segment_size: u64,
    /// Bodies larger than this go to a file of their own.
    pub inline_body_max: usize,
}

impl Default for SpoolOptions {
    fn default() -> Self {
        SpoolOptions {
            fsync: true,
            segment_size: 64 << 20,
            inline_body_max: 256 << 10,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool is out of disk space: {0}")]
    NoSpace(io::Error),
    #[error("spool I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("spool record encoding failed: {0}")]
    Encode(#[from] postcard::Error),
    #[error("spool committer has stopped")]
    Stopped,
}

impl SpoolError {
    fn classify(err: io::Error) -> SpoolError {
        match err.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => SpoolError::NoSpace(err),
            _ => SpoolError::Io(err),
        }
    }
}

enum CommitRequest {
    /// A new message; answered once durable.
    Message {
        id: QueueId,
        head: Vec<u8>,
        body: Bytes,
        body_in_file: bool,
        reply: oneshot::Sender<Result<BodyLocation, SpoolError>>,
    },
    /// Recipient updates and finished messages, already framed.
    Records { frames: Vec<u8>, done: Vec<QueueId> },
    /// The background replay is over: the old segments and where each live message's record
    /// is (see `recover.rs`).
    Recovered {
        segments: Vec<u64>,
        live: Vec<(QueueId, u64, BodyLocation)>,
    },
}

/// Handle to an open spool; cheap to clone.
#[derive(Clone)]
pub struct Spool {
    inner: Arc<Inner>,
}

struct Inner {
    journal_dir: PathBuf,
    bodies_dir: PathBuf,
    /// Bodies compaction moved (see [`Spool::load_body`]).
    moved: committer::Moved,
    options: SpoolOptions,
    ids: IdGenerator,
    committer: Option<mpsc::Sender<CommitRequest>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Inner {
    fn send(&self, request: CommitRequest) -> Result<(), SpoolError> {
        let committer = self.committer.as_ref().ok_or(SpoolError::Stopped)?;
        committer.send(request).map_err(|_| SpoolError::Stopped)
    }
}

impl Drop for Inner {
    /// The last handle gone: the committer writes and syncs what it was sent, and ends; the
    /// spool is closed when this returns (it may be opened again).
    fn drop(&mut self) {
        drop(self.committer.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// What [`Spool::open`] found on disk.
#[derive(Debug, Default)]
pub struct Recovery {
    pub messages: Vec<StoredMessage>,
    /// Bytes of torn records cut off the end of the journal.
    pub truncated_bytes: u64,
    /// Body files that had no committed envelope (cut off mid-transaction) and were removed.
    pub orphan_bodies_removed: usize,
}

impl Spool {
    /// Opens (creating if needed) the spool under `dir`, recovers what is on disk and starts the
    /// committer thread.
    pub fn open(dir: &Path, options: SpoolOptions) -> Result<(Spool, Recovery), SpoolError> {
        let journal_dir = dir.join("journal");
        let bodies_dir = dir.join("bodies");
        fs::create_dir_all(&journal_dir)?;
        fs::create_dir_all(&bodies_dir)?;
        journal::sync_dir(dir)?;

        let segments = journal::list_segments(&journal_dir)?;
        let (live, tail, truncated_bytes) = replay(&journal_dir, &segments)?;
        let mut recovery = Recovery {
            truncated_bytes,
            ..Recovery::default()
        };
        let mut messages = Vec::with_capacity(live.len());
        let mut tracked = Vec::with_capacity(live.len());
        for (message, segment) in live.into_values() {
            tracked.push((message.envelope.id, segment, message.body));
            messages.push(message);
        }
        messages.sort_by_key(|m| m.envelope.id);
        recovery.orphan_bodies_removed = remove_orphan_bodies(&bodies_dir, &messages)?;
        recovery.messages = messages;

        let active = active_segment(&journal_dir, tail, &options)?;
        let last_id = recovery
            .messages
            .iter()
            .map(|m| m.envelope.id)
            .max()
            .unwrap_or(QueueId(0));
        let (tx, rx) = mpsc::channel();
        let moved = committer::Moved::default();
        let mut committer = Committer::new(active, rx, &options, &journal_dir, &bodies_dir, &moved);
        committer.recover(&segments, tracked);
        let spool = Spool::launch(
            committer,
            tx,
            journal_dir,
            bodies_dir,
            moved,
            options,
            last_id,
        )?;
        Ok((spool, recovery))
    }

    /// Starts the committer thread and makes the handle that feeds it.
    fn launch(
        committer: Committer,
        tx: mpsc::Sender<CommitRequest>,
        journal_dir: PathBuf,
        bodies_dir: PathBuf,
        moved: committer::Moved,
        options: SpoolOptions,
        last_id: QueueId,
    ) -> Result<Spool, SpoolError> {
        let thread = thread::Builder::new()
            .name("spool-commit".into())
            .spawn(move || committer.run())?;
        let inner = Inner {
            journal_dir,
            bodies_dir,
            moved,
            options,
            ids: IdGenerator::after(last_id),
            committer: Some(tx),
            thread: Some(thread),
        };
        Ok(Spool {
            inner: Arc::new(inner),
        })
    }

    /// Opens (creating if needed) the spool under `dir` for new mail at once, and replays
    /// what it holds in the background: the messages come on the returned channel (see
    /// `recover.rs`). What `baton serve` uses: with a million messages queued, SMTP answers
    /// while they are read.
    pub fn start(
        dir: &Path,
        options: SpoolOptions,
    ) -> Result<(Spool, tokio::sync::mpsc::Receiver<recover::Recovering>), SpoolError> {
        let journal_dir = dir.join("journal");
        let bodies_dir = dir.join("bodies");
        fs::create_dir_all(&journal_dir)?;
        fs::create_dir_all(&bodies_dir)?;
        journal::sync_dir(dir)?;
        let segments = journal::list_segments(&journal_dir)?;
        let last_id = recover::last_id(&journal_dir, &segments)?;
        let next = segments.last().map_or(1, |n| n + 1);
        let active = journal::ActiveSegment::create(&journal_dir, next, options.fsync)?;
        let (tx, rx) = mpsc::channel();
        let moved = committer::Moved::default();
        let mut committer = Committer::new(active, rx, &options, &journal_dir, &bodies_dir, &moved);
        committer.recovering = !segments.is_empty();
        committer.recover(&[], Vec::new());
        let (out, recovering) = tokio::sync::mpsc::channel(1);
        let replay = recover::Replay {
            journal_dir: journal_dir.clone(),
            bodies_dir: bodies_dir.clone(),
            segments,
            last_id,
            committer: Some(tx.clone()),
            out,
        };
        let spool = Spool::launch(
            committer,
            tx,
            journal_dir,
            bodies_dir,
            moved,
            options,
            last_id,
        )?;
        thread::Builder::new()
            .name("spool-replay".into())
            .spawn(move || replay.run())?;
        Ok((spool, recovering))
    }

    /// Reads the spool under `dir` without changing anything (for `baton queue` while a server
    /// runs). A torn tail is ignored rather than cut off.
    pub fn read_only(dir: &Path) -> Result<Vec<StoredMessage>, SpoolError> {
        let journal_dir = dir.join("journal");
        if !journal_dir.exists() {
            return Ok(Vec::new());
        }
        let mut live = HashMap::new();
        for number in journal::list_segments(&journal_dir)? {
            let path = journal::segment_path(&journal_dir, number);
            match journal::scan_segment(&path, number) {
                Ok(scan) => apply_records(&mut live, scan.records, number, |_| true),
                // Deleted by the server between listing and reading: nothing live was in it.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        let mut messages: Vec<StoredMessage> = live.into_values().map(|(m, _)| m).collect();
        messages.sort_by_key(|m| m.envelope.id);
        Ok(messages)
    }

    /// Reads a stored message's body (the bytes after the envelope: headers and body).
    pub fn read_body(dir: &Path, message: &StoredMessage) -> io::Result<Vec<u8>> {
        read_body_at(dir, message.envelope.id, message.body)
    }

    pub fn next_id(&self) -> QueueId {
        self.inner.ids.next()
    }

    pub fn options(&self) -> &SpoolOptions {
        &self.inner.options
    }

    pub fn journal_dir(&self) -> &Path {
        &self.inner.journal_dir
    }

    /// A writer for the body of message `id`, to fill while receiving it.
    pub fn body_writer(&self, id: QueueId) -> BodyWriter {
        BodyWriter {
            id,
            buf: Vec::new(),
            file: None,
            spilled: 0,
            inline_max: self.inner.options.inline_body_max,
            bodies_dir: self.inner.bodies_dir.clone(),
            committed: false,
        }
    }

    /// Makes the message durable. Returns once it is on disk (when fsync is on): only then may
    /// the client be told 250.
    /// Returns where the body is and, for a body kept in the journal, the bytes themselves (so
    /// that delivery need not read them back).
    pub async fn commit(
        &self,
        envelope: &Envelope,
        mut body: BodyWriter,
    ) -> Result<(BodyLocation, Bytes), SpoolError> {
        let body_in_file = body.file.is_some();
        let inline = if body_in_file {
            // The rest of the body and the fsync go to a blocking thread, as every spill does.
            let fsync = self.inner.options.fsync;
            body.spill(move |file| if fsync { file.sync_data() } else { Ok(()) })
                .await?;
            Bytes::new()
        } else {
            Bytes::from(std::mem::take(&mut body.buf))
        };
        let head = journal::encode_message(envelope, &inline, body_in_file)?;
        let (reply, rx) = oneshot::channel();
        self.inner.send(CommitRequest::Message {
            id: envelope.id,
            head,
            body: inline.clone(),
            body_in_file,
            reply,
        })?;
        // From here the record may reach the disk whether or not this future is awaited to
        // the end (a caller that goes away drops it): the body file must outlive it. A failed
        // write gives it back to be removed; a record never written leaves an orphan that
        // recovery removes.
        body.committed = true;
        match rx.await.map_err(|_| SpoolError::Stopped)? {
            Ok(location) => Ok((location, inline)),
            Err(e) => {
                body.committed = false;
                Err(e)
            }
        }
    }

    /// Appends recipient updates and finished messages. Not waited for: they are written with
    /// the next batch, in order after everything sent before. A crash before that batch means
    /// the attempt is made again (a duplicate delivery), never that mail is lost.
    pub fn record(&self, updates: &[RecipientUpdate], done: &[QueueId]) -> Result<(), SpoolError> {
        let mut frames = Vec::with_capacity(64 * (updates.len() + done.len()));
        for u in updates {
            journal::encode_update(u, &mut frames)?;
        }
        for &id in done {
            journal::encode_done(id, &mut frames);
        }
        self.inner.send(CommitRequest::Records {
            frames,
            done: done.to_vec(),
        })
    }

    /// Replaces a message's meta (e.g. its pool after a rebind, a hold); written like
    /// [`Spool::record`].
    pub fn record_meta(&self, id: QueueId, meta: &MessageMeta) -> Result<(), SpoolError> {
        let mut frames = Vec::new();
        journal::encode_meta(id, meta, &mut frames)?;
        self.inner.send(CommitRequest::Records {
            frames,
            done: Vec::new(),
        })
    }

    /// Reads the body of a message in this spool (for delivery of a message not in memory).
    /// `location` is where it was committed; if compaction has moved it since, the body is
    /// read from where it is now.
    pub fn load_body(&self, id: QueueId, location: BodyLocation) -> io::Result<Bytes> {
        let dir = self.inner.journal_dir.parent().unwrap_or(Path::new("."));
        let first = self.moved_to(id).unwrap_or(location);
        match read_body_at(dir, id, first) {
            // Moved (and its old segment deleted) between the look-up and the read.
            Err(e) if e.kind() == io::ErrorKind::NotFound => match self.moved_to(id) {
                Some(now) if now != first => read_body_at(dir, id, now).map(Bytes::from),
                _ => Err(e),
            },
            read => read.map(Bytes::from),
        }
    }

    fn moved_to(&self, id: QueueId) -> Option<BodyLocation> {
        self.inner.moved.lock().ok()?.get(&id).copied()
    }
}

/// Collects a message body while it is received: in memory up to the inline limit, then in
/// `bodies/<id>`. Dropping it without a commit removes the file.
pub struct BodyWriter {
    id: QueueId,
    buf: Vec<u8>,
    file: Option<File>,
    spilled: u64,
    inline_max: usize,
    bodies_dir: PathBuf,
    committed: bool,
}

impl BodyWriter {
    /// The buffer to append body bytes to; call [`BodyWriter::settle`] after appending.
    pub fn buf(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }

    /// Spills the buffer to the body file once it is large enough. The write runs on a
    /// blocking thread: a slow disk stalls this message, not the tasks sharing the caller's.
    pub async fn settle(&mut self) -> Result<(), SpoolError> {
        let threshold = if self.file.is_some() {
            SPILL_CHUNK
        } else {
            self.inline_max
        };
        if self.buf.len() > threshold {
            self.spill(|_| Ok(())).await?;
        }
        Ok(())
    }

    /// The first `n` bytes of the body (from the file when it has spilled): enough to read the
    /// header section.
    pub fn head(&self, n: usize) -> io::Result<Vec<u8>> {
        if self.spilled == 0 {
            return Ok(self.buf[..n.min(self.buf.len())].to_vec());
        }
        let mut file = File::open(self.path())?;
        let mut head = vec![0; n.min(self.spilled as usize)];
        file.read_exact(&mut head)?;
        Ok(head)
    }

    /// Inserts `bytes` at `at` in a body still held in memory; false (and nothing changed) once
    /// it has spilled to its file.
    pub fn insert(&mut self, at: usize, bytes: &[u8]) -> bool {
        if self.spilled > 0 || at > self.buf.len() {
            return false;
        }
        self.buf.splice(at..at, bytes.iter().copied());
        true
    }

    /// The whole body while it is still held in memory (it has not spilled to its file).
    pub fn in_memory(&mut self) -> Option<&mut Vec<u8>> {
        (self.spilled == 0).then_some(&mut self.buf)
    }

    /// Body bytes so far.
    pub fn len(&self) -> u64 {
        self.spilled + self.buf.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends the buffer to the body file (created on the first spill), then runs `finish`
    /// on it, all on a blocking thread. On failure the file is removed: the message is lost
    /// to its sender's retry, never half-kept. If the caller goes away meanwhile (a client
    /// that disconnects), the file is removed when the write ends, as Drop would have.
    async fn spill(
        &mut self,
        finish: impl FnOnce(&File) -> io::Result<()> + Send + 'static,
    ) -> Result<(), SpoolError> {
        let mut buf = std::mem::take(&mut self.buf);
        let file = self.file.take();
        let path = self.path();
        let n = buf.len() as u64;
        let written = tokio::task::spawn_blocking(move || {
            let mut spilled = Unlinking {
                file: None,
                path: path.clone(),
            };
            let result = (|| {
                let file = match file {
                    Some(file) => file,
                    None => OpenOptions::new()
                        .create(true)
                        .truncate(true)
                        .write(true)
                        .open(&path)?,
                };
                let file = spilled.file.insert(file);
                file.write_all(&buf)?;
                finish(file)
            })();
            buf.clear();
            result.map(|()| (spilled, buf))
        })
        .await
        .map_err(|_| SpoolError::Stopped)?;
        let (mut spilled, buf) = written.map_err(SpoolError::classify)?;
        self.file = spilled.file.take();
        self.buf = buf;
        self.spilled += n;
        Ok(())
    }

    fn path(&self) -> PathBuf {
        self.bodies_dir.join(self.id.to_string())
    }
}

/// A body file being written off the caller's thread: removed when dropped still holding the
/// file (the write failed, or nobody took the result).
struct Unlinking {
    file: Option<File>,
    path: PathBuf,
}

impl Drop for Unlinking {
    fn drop(&mut self) {
        if self.file.is_some() {
            let _ = fs::remove_file(&self.path);
        }
    }
}

impl Drop for BodyWriter {
    fn drop(&mut self) {
        if (self.file.is_some() || self.spilled > 0) && !self.committed {
            let _ = fs::remove_file(self.path());
        }
    }
}

/// Live messages (and the segment each was last written in) after replaying every segment
/// in order; the last segment as found (number, valid length, file length, current format);
/// and the torn bytes at its end.
type Replayed = (
    HashMap<QueueId, (StoredMessage, u64)>,
    Option<(u64, u64, u64, bool)>,
    u64,
);

fn replay(journal_dir: &Path, segments: &[u64]) -> Result<Replayed, SpoolError> {
    let mut live: HashMap<QueueId, (StoredMessage, u64)> = HashMap::new();
    let mut tail = None;
    let mut truncated = 0;
    for (i, &number) in segments.iter().enumerate() {
        let path = journal::segment_path(journal_dir, number);
        let journal::Scan {
            records,
            valid_len: valid,
            file_len,
            current,
        } = journal::scan_segment(&path, number)?;
        let last = i + 1 == segments.len();
        if file_len > valid {
            if last {
                truncated = file_len - valid;
            } else {
                tracing::error!(
                    segment = %path.display(),
                    bad_bytes = file_len - valid,
                    "corrupt record in a sealed journal segment; records after it are skipped"
                );
            }
        }
        apply_records(&mut live, records, number, |_| true);
        if last {
            tail = Some((number, valid, file_len, current));
        }
    }
    Ok((live, tail, truncated))
}

/// The segment to append to: the last one if it has room and is of the current format (its
/// torn tail cut), else a fresh one after it.
fn active_segment(
    journal_dir: &Path,
    tail: Option<(u64, u64, u64, bool)>,
    options: &SpoolOptions,
) -> Result<journal::ActiveSegment, SpoolError> {
    Ok(match tail {
        // A segment with no valid header gets the current one; an older format's is left as
        // it is (see journal.rs).
        Some((number, valid, file_len, current))
            if valid < options.segment_size && (current || valid == 0) =>
        {
            journal::ActiveSegment::reopen(journal_dir, number, valid, file_len)?
        }
        Some((number, valid, file_len, _)) => {
            // Cut any torn tail before moving on to a fresh segment.
            drop(journal::ActiveSegment::reopen(
                journal_dir,
                number,
                valid,
                file_len,
            )?);
            journal::ActiveSegment::create(journal_dir, number + 1, options.fsync)?
        }
        None => journal::ActiveSegment::create(journal_dir, 1, options.fsync)?,
    })
}

fn read_body_at(dir: &Path, id: QueueId, location: BodyLocation) -> io::Result<Vec<u8>> {
    match location {
        BodyLocation::Inline {
            segment,
            offset,
            len,
        } => {
            let mut file = File::open(journal::segment_path(&dir.join("journal"), segment))?;
            file.seek(SeekFrom::Start(offset))?;
            let mut body = vec![0; len as usize];
            file.read_exact(&mut body)?;
            Ok(body)
        }
        BodyLocation::File => fs::read(dir.join("bodies").join(id.to_string())),
    }
}

/// Applies journal records in order: the latest message record for an id wins, updates change
/// it, done removes it. Tracks the segment each live message's record is in.
/// Records of messages `keep` refuses are skipped.
fn apply_records(
    live: &mut HashMap<QueueId, (StoredMessage, u64)>,
    records: Vec<Record>,
    segment: u64,
    keep: impl Fn(QueueId) -> bool,
) {
    for record in records {
        match record {
            Record::Message(m) => {
                if keep(m.envelope.id) {
                    live.insert(m.envelope.id, (m, segment));
                }
            }
            Record::Update(u) => {
                if let Some((m, _)) = live.get_mut(&u.id) {
                    u.apply(&mut m.envelope);
                }
            }
            Record::Done(id) => {
                live.remove(&id);
            }
            Record::Meta(id, meta) => {
                if let Some((m, _)) = live.get_mut(&id) {
                    m.envelope.meta = meta;
                }
            }
            Record::MetaV1(id, key, value) => {
                if let Some((m, _)) = live.get_mut(&id) {
                    m.envelope.meta.set_v1(&key, value);
                }
            }
        }
    }
}

fn remove_orphan_bodies(bodies_dir: &Path, messages: &[StoredMessage]) -> io::Result<usize> {
    let referenced: HashSet<String> = messages
        .iter()
        .filter(|m| m.body == BodyLocation::File)
        .map(|m| m.envelope.id.to_string())
        .collect();
    let mut removed = 0;
    for entry in fs::read_dir(bodies_dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !referenced.contains(&name) {
            fs::remove_file(entry.path())?;
            removed += 1;
        }
    }
    Ok(removed)
}
