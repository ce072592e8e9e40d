//! The group-commit loop, on its own thread: the only writer of the journal and the only one
//! that deletes spool files. Besides writing what it is sent, it deletes finished bodies and
//! segments, and copies live messages out of the oldest segment when that is what keeps the
//! journal large (see [`crate::compact`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::io::{self, IoSlice};
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::compact;
use crate::journal::{self, BodyLocation};
use crate::{CommitRequest, MAX_BATCH, QueueId, SpoolError, SpoolOptions};

/// Where a message's body went when compaction copied its record forward: readers holding the
/// old location look here (`Spool::load_body`).
pub(crate) type Moved = Arc<Mutex<HashMap<QueueId, BodyLocation>>>;

/// A live message as the committer tracks it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Live {
    /// The segment holding its latest message record.
    pub segment: u64,
    pub in_file: bool,
    /// The size of that record (an estimate for recovered messages; u32 keeps a million
    /// entries small, and a record is at most an inline body and its envelope).
    pub bytes: u32,
}

/// One segment: its size on disk and the live messages whose record it holds.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct SegmentUse {
    pub size: u64,
    pub live: usize,
    pub live_bytes: u64,
}

/// What a recovered message's envelope is taken to weigh (its exact record size is not kept).
const RECOVERED_ENVELOPE_BYTES: u64 = 256;

/// A compaction that freed nothing is not tried again before this (a message whose done record
/// waits for its fsync, a write that failed).
const COMPACT_BACKOFF: Duration = Duration::from_secs(10);

pub(crate) struct Committer {
    pub active: journal::ActiveSegment,
    pub rx: mpsc::Receiver<CommitRequest>,
    pub options: SpoolOptions,
    pub journal_dir: PathBuf,
    pub bodies_dir: PathBuf,
    pub live: HashMap<QueueId, Live>,
    /// Every existing segment, oldest first.
    pub segments: BTreeMap<u64, SegmentUse>,
    pub moved: Moved,
    /// Records written since the last fsync.
    pub dirty: bool,
    /// When the journal was last fsynced (records wait at most RECORD_SYNC_DELAY for one).
    pub last_sync: Instant,
    /// Finished messages whose done record is written but not yet fsynced: their body files
    /// and segments may go only once it is (after a power cut the message would come back
    /// pointing at a missing body).
    pub unsynced_done: Vec<QueueId>,
    /// No compaction before this.
    pub compact_after: Instant,
    /// The old segments are being replayed in the background: none is deleted or compacted
    /// until the replay says which hold live messages.
    pub recovering: bool,
}

/// Records not followed by a message commit are fsynced after this long at the latest.
const RECORD_SYNC_DELAY: Duration = Duration::from_secs(1);

impl Committer {
    pub fn new(
        active: journal::ActiveSegment,
        rx: mpsc::Receiver<CommitRequest>,
        options: &SpoolOptions,
        journal_dir: &std::path::Path,
        bodies_dir: &std::path::Path,
        moved: &Moved,
    ) -> Committer {
        Committer {
            active,
            rx,
            options: options.clone(),
            journal_dir: journal_dir.to_path_buf(),
            bodies_dir: bodies_dir.to_path_buf(),
            live: HashMap::new(),
            segments: BTreeMap::new(),
            moved: moved.clone(),
            dirty: false,
            last_sync: Instant::now(),
            unsynced_done: Vec::new(),
            compact_after: Instant::now(),
            recovering: false,
        }
    }

    pub fn run(mut self) {
        let mut batch = Vec::new();
        loop {
            let first = match self.rx.recv_timeout(RECORD_SYNC_DELAY) {
                Ok(first) => first,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    self.sync_if_dirty();
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            };
            batch.push(first);
            while batch.len() < MAX_BATCH {
                match self.rx.try_recv() {
                    Ok(next) => batch.push(next),
                    Err(_) => break,
                }
            }
            self.commit_batch(&mut batch);
        }
        self.sync_if_dirty();
    }

    fn sync_if_dirty(&mut self) {
        if self.dirty && self.options.fsync {
            match self.active.sync() {
                Ok(()) => {
                    self.dirty = false;
                    self.last_sync = Instant::now();
                }
                Err(e) => tracing::error!(error = %e, "journal fsync failed"),
            }
        }
        self.forget_durable();
    }

    /// Takes over what recovery found: every segment (with its size) and where each live
    /// message's record is; then deletes the segments nothing live needs.
    pub fn recover(&mut self, segments: &[u64], live: Vec<(QueueId, u64, BodyLocation)>) {
        for &number in segments.iter().chain([&self.active.number]) {
            let path = journal::segment_path(&self.journal_dir, number);
            let size = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            self.segments.entry(number).or_default().size = size;
        }
        for (id, segment, body) in live {
            let (in_file, bytes) = match body {
                BodyLocation::File => (true, RECOVERED_ENVELOPE_BYTES),
                BodyLocation::Inline { len, .. } => {
                    (false, len.saturating_add(RECOVERED_ENVELOPE_BYTES))
                }
            };
            self.track(id, segment, in_file, bytes);
        }
        self.remove_dead_segments();
    }

    /// Forgets the finished messages whose done records are on disk: their body files go, and
    /// segments from the oldest on once nothing in them is live.
    fn forget_durable(&mut self) {
        if self.dirty && self.options.fsync {
            return;
        }
        for id in std::mem::take(&mut self.unsynced_done) {
            self.forget(id);
        }
        self.remove_dead_segments();
    }

    fn commit_batch(&mut self, batch: &mut Vec<CommitRequest>) {
        let result = self.write_batch(batch);
        // After the write: a full segment is rotated before it.
        let segment = self.active.number;
        let ok = result.is_ok();
        let mut results = result_per_request(result, batch.len()).into_iter();
        let mut finished = Vec::new();
        let mut replies = Vec::new();
        for request in batch.drain(..) {
            let location = results.next().unwrap_or(Err(SpoolError::Stopped));
            match request {
                CommitRequest::Message {
                    id,
                    head,
                    body,
                    body_in_file,
                    reply,
                } => {
                    if location.is_ok() {
                        let bytes = (head.len() + body.len()) as u64;
                        self.track(id, segment, body_in_file, bytes);
                    }
                    replies.push((reply, location));
                }
                CommitRequest::Records { done, .. } if ok => finished.extend(done),
                CommitRequest::Records { .. } => {}
                CommitRequest::Recovered { segments, live } => {
                    self.recovering = false;
                    self.recover(&segments, live);
                }
            }
        }
        self.unsynced_done.extend(finished);
        if self.dirty && self.last_sync.elapsed() >= RECORD_SYNC_DELAY {
            // Records keep coming (a backlog draining, no new mail): sync them anyway once a
            // second, or finished bodies and segments would stay until the next rotation.
            self.sync_if_dirty();
        } else {
            self.forget_durable();
        }
        // Answer last, so that whoever waits on a commit sees the batch's clean-up done too.
        for (reply, location) in replies {
            let _ = reply.send(location);
        }
        self.compact_if_due();
    }

    /// Counts a message record just written to `segment` (moving the message there if it had
    /// a record elsewhere).
    fn track(&mut self, id: QueueId, segment: u64, in_file: bool, bytes: u64) {
        self.untrack(id);
        let live = Live {
            segment,
            in_file,
            bytes: u32::try_from(bytes).unwrap_or(u32::MAX),
        };
        self.live.insert(id, live);
        let used = self.segments.entry(segment).or_default();
        used.live += 1;
        used.live_bytes = used.live_bytes.saturating_add(u64::from(live.bytes));
    }

    fn untrack(&mut self, id: QueueId) -> Option<Live> {
        let live = self.live.remove(&id)?;
        if let Some(used) = self.segments.get_mut(&live.segment) {
            used.live = used.live.saturating_sub(1);
            used.live_bytes = used.live_bytes.saturating_sub(u64::from(live.bytes));
        }
        Some(live)
    }

    /// A finished message whose done record is durable: its body file goes now, its segment
    /// once nothing in it or before it is live.
    fn forget(&mut self, id: QueueId) {
        if let Some(live) = self.untrack(id) {
            if live.in_file {
                let _ = fs::remove_file(self.bodies_dir.join(id.to_string()));
            }
            if let Ok(mut moved) = self.moved.lock() {
                moved.remove(&id);
            }
        }
    }

    /// Deletes segments from the oldest on while they hold nothing live. Only from the oldest:
    /// a later segment may hold the done record of a message in an earlier one.
    fn remove_dead_segments(&mut self) {
        if self.recovering {
            return;
        }
        while let Some((&oldest, used)) = self.segments.first_key_value() {
            if used.live > 0 || oldest == self.active.number {
                break;
            }
            let path = journal::segment_path(&self.journal_dir, oldest);
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(segment = %path.display(), error = %e, "cannot delete a finished journal segment");
                    break;
                }
            }
            self.segments.remove(&oldest);
        }
    }

    /// Copies the live messages of the oldest segment forward when the journal has grown past
    /// what is live (see [`compact::due`]), so that the segment, and the dead ones after it, go.
    fn compact_if_due(&mut self) {
        if self.recovering {
            return;
        }
        let Some((&oldest, used)) = self.segments.first_key_value() else {
            return;
        };
        let journal_bytes = self.segments.values().map(|u| u.size).sum();
        let live_bytes = self.segments.values().map(|u| u.live_bytes).sum();
        let sealed = oldest != self.active.number;
        if Instant::now() < self.compact_after
            || !compact::due(
                sealed,
                used.live,
                journal_bytes,
                live_bytes,
                self.options.segment_size,
            )
        {
            return;
        }
        let started = Instant::now();
        match self.compact(oldest) {
            Ok(moved) => {
                let ms = started.elapsed().as_millis() as u64;
                tracing::info!(
                    segment = oldest,
                    moved,
                    ms,
                    "journal compacted: live messages copied forward"
                );
            }
            Err(e) => {
                tracing::warn!(segment = oldest, error = %e, "journal compaction failed; retried later")
            }
        }
        self.remove_dead_segments();
        if self.segments.contains_key(&oldest) {
            self.compact_after = Instant::now() + COMPACT_BACKOFF;
        }
    }

    /// Writes a fresh record (current state, body copied when inline) for every live message
    /// whose record is in `oldest`, fsynced before that segment may go. Returns how many moved.
    fn compact(&mut self, oldest: u64) -> Result<usize, SpoolError> {
        let ids: HashSet<QueueId> = self
            .live
            .iter()
            .filter(|(_, l)| l.segment == oldest)
            .map(|(id, _)| *id)
            .collect();
        let segments: Vec<u64> = self.segments.keys().copied().collect();
        let current = compact::current_state(&self.journal_dir, &segments, &ids)?;
        let mut batch = Vec::with_capacity(current.len());
        for (message, body) in &current {
            let in_file = message.body == BodyLocation::File;
            let head = journal::encode_message(&message.envelope, body, in_file)?;
            let (reply, _) = tokio::sync::oneshot::channel();
            batch.push(CommitRequest::Message {
                id: message.envelope.id,
                head,
                body: body.clone(),
                body_in_file: in_file,
                reply,
            });
        }
        if batch.is_empty() {
            return Ok(0);
        }
        // Message requests are fsynced: only then may the old copies go.
        let locations = self.write_batch(&batch)?;
        let segment = self.active.number;
        for (request, location) in batch.iter().zip(locations) {
            if let CommitRequest::Message {
                id,
                head,
                body,
                body_in_file,
                ..
            } = request
            {
                self.track(
                    *id,
                    segment,
                    *body_in_file,
                    (head.len() + body.len()) as u64,
                );
                if !body_in_file && let Ok(mut moved) = self.moved.lock() {
                    moved.insert(*id, location);
                }
            }
        }
        Ok(batch.len())
    }

    fn write_batch(&mut self, batch: &[CommitRequest]) -> Result<Vec<BodyLocation>, SpoolError> {
        if self.active.len >= self.options.segment_size {
            // Records written to the old segment must be durable before it is left behind.
            self.sync_if_dirty();
            self.active
                .rotate(self.options.fsync)
                .map_err(SpoolError::classify)?;
            self.segments.entry(self.active.number).or_default();
        }
        let any_file = batch.iter().any(|r| {
            matches!(
                r,
                CommitRequest::Message {
                    body_in_file: true,
                    ..
                }
            )
        });
        if self.options.fsync && any_file {
            journal::sync_dir(&self.bodies_dir).map_err(SpoolError::classify)?;
        }
        let mut offset = self.active.len;
        let mut locations = Vec::with_capacity(batch.len());
        let mut slices = Vec::with_capacity(batch.len() * 2);
        for request in batch {
            match request {
                CommitRequest::Message {
                    head,
                    body,
                    body_in_file,
                    ..
                } => {
                    let body_offset = offset + head.len() as u64;
                    locations.push(if *body_in_file {
                        BodyLocation::File
                    } else {
                        BodyLocation::Inline {
                            segment: self.active.number,
                            offset: body_offset,
                            len: body.len() as u64,
                        }
                    });
                    offset = body_offset + body.len() as u64;
                    slices.push(IoSlice::new(head));
                    if !body.is_empty() {
                        slices.push(IoSlice::new(body));
                    }
                }
                CommitRequest::Records { frames, .. } => {
                    // Records carry no location; a placeholder keeps results aligned.
                    locations.push(BodyLocation::File);
                    offset += frames.len() as u64;
                    slices.push(IoSlice::new(frames));
                }
                CommitRequest::Recovered { .. } => locations.push(BodyLocation::File),
            }
        }
        // Only new messages wait for their fsync (a 250 hangs on it). Recipient updates and
        // done records ride along with the next one, or are synced within a second: losing them
        // to a power cut repeats a delivery, it never loses mail.
        let has_message = batch
            .iter()
            .any(|r| matches!(r, CommitRequest::Message { .. }));
        let sync = self.options.fsync && has_message;
        self.active
            .append(&mut slices, sync)
            .map_err(SpoolError::classify)?;
        self.segments.entry(self.active.number).or_default().size = self.active.len;
        // A synced append covers earlier unsynced records too (same file: rotation syncs first).
        self.dirty = !sync;
        if sync {
            self.last_sync = Instant::now();
        }
        Ok(locations)
    }
}

/// Spreads a batch result over its requests: each gets its location, or a copy of the error.
fn result_per_request(
    result: Result<Vec<BodyLocation>, SpoolError>,
    n: usize,
) -> Vec<Result<BodyLocation, SpoolError>> {
    match result {
        Ok(locations) => locations.into_iter().map(Ok).collect(),
        Err(err) => {
            tracing::error!(error = %err, "spool commit failed; {n} requests not written");
            (0..n)
                .map(|_| {
                    Err(match &err {
                        SpoolError::NoSpace(e) => {
                            SpoolError::NoSpace(io::Error::new(e.kind(), e.to_string()))
                        }
                        other => SpoolError::Io(io::Error::other(other.to_string())),
                    })
                })
                .collect()
        }
    }
}
