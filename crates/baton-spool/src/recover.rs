//! Starting with the replay in the background: a spool with a million queued messages takes
//! seconds to replay, and mail must be accepted meanwhile.
//!
//! [`Spool::start`] does only what new commits need: it finds the largest queue id on disk
//! (frame headers only, see [`journal::max_message_id`]), so that new ids are above every one
//! there, and starts a fresh segment for new records. A thread then replays the segments that
//! were there, keeping each message packed ([`PackedEnvelope`], attempts counted but not
//! kept): memory stays near what the queue will hold. When it is done it cuts a torn tail off
//! the last old segment, removes old body files no message refers to, tells the committer
//! which old segments hold which live messages (until then it deletes and compacts nothing),
//! and only then hands the messages over, in id order, in chunks the receiver takes one at a
//! time.

use std::collections::{HashMap, HashSet};
use std::fs::{self, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use tokio::sync::mpsc as async_mpsc;

use crate::journal::{self, BodyLocation, Record};
use crate::{CommitRequest, PackedEnvelope, QueueId, SpoolError};

/// Messages per chunk handed over.
const CHUNK: usize = 10_000;

/// A message recovered from the journal, packed, with its attempts counted per recipient
/// (empty when none was attempted).
#[derive(Debug)]
pub struct Recovered {
    pub id: QueueId,
    pub envelope: PackedEnvelope,
    pub attempts: Box<[u16]>,
    pub body: BodyLocation,
}

/// What the replay found, once it is over.
#[derive(Debug, Default, Clone)]
pub struct RecoveryReport {
    pub messages: usize,
    /// Bytes of torn records cut off the end of the last segment.
    pub truncated_bytes: u64,
    /// Body files that had no committed envelope (cut off mid-transaction) and were removed.
    pub orphan_bodies_removed: usize,
}

/// What the replay hands over: chunks of messages, then how it ended.
#[derive(Debug)]
pub enum Recovering {
    Messages(Vec<Recovered>),
    Done(Result<RecoveryReport, String>),
}

/// One message during the replay (boxed in the map: a million of them take their bytes,
/// not twice that in a half-empty table).
struct Replaying {
    envelope: PackedEnvelope,
    /// Attempts per recipient; empty while none was attempted.
    attempts: Box<[u16]>,
    segment: u64,
    body: BodyLocation,
}

/// What the replay thread needs.
pub(crate) struct Replay {
    pub journal_dir: PathBuf,
    pub bodies_dir: PathBuf,
    /// The segments there were at start, in order.
    pub segments: Vec<u64>,
    /// Ids above this are the new process's: their body files are not the replay's business.
    pub last_id: QueueId,
    /// Taken when the replay reports to the committer (see `replay_and_hand_over`).
    pub committer: Option<mpsc::Sender<CommitRequest>>,
    pub out: async_mpsc::Sender<Recovering>,
}

impl Replay {
    pub fn run(mut self) {
        let result = self.replay_and_hand_over();
        let _ = self
            .out
            .blocking_send(Recovering::Done(result.map_err(|e| e.to_string())));
    }

    fn replay_and_hand_over(&mut self) -> Result<RecoveryReport, SpoolError> {
        let mut live: HashMap<QueueId, Box<Replaying>> = HashMap::new();
        let mut report = RecoveryReport::default();
        for (i, &number) in self.segments.iter().enumerate() {
            let path = journal::segment_path(&self.journal_dir, number);
            let scan = journal::scan_segment_each(
                &path,
                number,
                |_| true,
                |r| apply(&mut live, r, number),
            )?;
            if scan.file_len > scan.valid_len {
                if i + 1 == self.segments.len() {
                    // Never appended to again: the torn tail goes now, not at the next start.
                    report.truncated_bytes = scan.file_len - scan.valid_len;
                    OpenOptions::new()
                        .write(true)
                        .open(&path)
                        .and_then(|f| f.set_len(scan.valid_len).and_then(|()| f.sync_data()))?;
                } else {
                    tracing::error!(segment = %path.display(), bad_bytes = scan.file_len - scan.valid_len,
                        "corrupt record in a sealed journal segment; records after it are skipped");
                }
            }
        }
        report.messages = live.len();
        report.orphan_bodies_removed = self.remove_orphan_bodies(&live)?;
        let tracked = live
            .iter()
            .map(|(id, m)| (*id, m.segment, m.body))
            .collect();
        let committer = self.committer.take().ok_or(SpoolError::Stopped)?;
        committer
            .send(CommitRequest::Recovered {
                segments: self.segments.clone(),
                live: tracked,
            })
            .map_err(|_| SpoolError::Stopped)?;
        // Let go of the committer before blocking on the hand-over: the last spool handle
        // waits for the committer to end, and it ends only once every sender is gone.
        drop(committer);
        // In id order (arrival), moved out of the map chunk by chunk.
        let mut ids: Vec<QueueId> = live.keys().copied().collect();
        ids.sort_unstable();
        for chunk in ids.chunks(CHUNK) {
            let chunk = chunk
                .iter()
                .filter_map(|&id| live.remove(&id).map(|m| (id, m)))
                .map(|(id, m)| {
                    let Replaying {
                        envelope,
                        attempts,
                        body,
                        ..
                    } = *m;
                    Recovered {
                        id,
                        envelope,
                        attempts,
                        body,
                    }
                })
                .collect();
            self.out
                .blocking_send(Recovering::Messages(chunk))
                .map_err(|_| SpoolError::Stopped)?;
        }
        Ok(report)
    }

    /// Body files of old ids that no recovered message refers to (a crash mid-DATA).
    fn remove_orphan_bodies(&self, live: &HashMap<QueueId, Box<Replaying>>) -> io::Result<usize> {
        let referenced: HashSet<QueueId> = live
            .iter()
            .filter(|(_, m)| m.body == BodyLocation::File)
            .map(|(id, _)| *id)
            .collect();
        let mut removed = 0;
        for entry in fs::read_dir(&self.bodies_dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Ok(id) = name.to_string_lossy().parse::<QueueId>() else {
                continue;
            };
            if id <= self.last_id && !referenced.contains(&id) {
                fs::remove_file(entry.path())?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}

/// Applies one record to the messages being replayed (as `apply_records` does, packed).
fn apply(live: &mut HashMap<QueueId, Box<Replaying>>, record: Record, segment: u64) {
    match record {
        Record::Message(m) => {
            let mut envelope = m.envelope;
            let id = envelope.id;
            let attempts: Box<[u16]> = envelope
                .recipients
                .iter_mut()
                .map(|r| std::mem::take(&mut r.attempts).len().min(u16::MAX as usize) as u16)
                .collect();
            let attempts = if attempts.iter().all(|&n| n == 0) {
                Box::default()
            } else {
                attempts
            };
            let mut envelope = PackedEnvelope::new(envelope);
            envelope.pack();
            live.insert(
                id,
                Box::new(Replaying {
                    envelope,
                    attempts,
                    segment,
                    body: m.body,
                }),
            );
        }
        Record::Update(u) => {
            if let Some(m) = live.get_mut(&u.id) {
                let envelope = m.envelope.open();
                u.apply(envelope);
                if u.attempt.is_some() {
                    if let Some(r) = envelope.recipients.get_mut(u.rcpt as usize) {
                        r.attempts.clear();
                    }
                    if m.attempts.is_empty() {
                        m.attempts = vec![0; envelope.recipients.len()].into_boxed_slice();
                    }
                    if let Some(n) = m.attempts.get_mut(u.rcpt as usize) {
                        *n = n.saturating_add(1);
                    }
                }
                m.envelope.pack();
            }
        }
        Record::Done(id) => {
            live.remove(&id);
        }
        Record::Meta(id, meta) => {
            if let Some(m) = live.get_mut(&id) {
                m.envelope.open().meta = meta;
                m.envelope.pack();
            }
        }
        Record::MetaV1(id, key, value) => {
            if let Some(m) = live.get_mut(&id) {
                m.envelope.open().meta.set_v1(&key, value);
                m.envelope.pack();
            }
        }
    }
}

/// The largest message id in `segments` (none: 0).
pub(crate) fn last_id(journal_dir: &Path, segments: &[u64]) -> io::Result<QueueId> {
    let mut last = QueueId(0);
    for &number in segments {
        let path = journal::segment_path(journal_dir, number);
        if let Some(id) = journal::max_message_id(&path)? {
            last = last.max(id);
        }
    }
    Ok(last)
}
