//! Compaction: a message that waits (deferred for days) must not pin every segment written
//! after its own, or a week of traffic behind one stubborn destination fills the disk.
//!
//! When the journal has grown past twice what is live plus two segments of slack, the
//! committer copies the live messages of the oldest segment forward: it reads their current
//! state (their record, with every later update applied), writes one fresh record each to the
//! active segment with their inline body, fsyncs, and only then deletes the old segment (and
//! any dead ones after it). Replay takes the latest message record of an id, so a crash
//! before the fsync leaves the old copy in charge and one after it the new one; the updates
//! left behind in later segments apply to no live message any more and are ignored.

use std::collections::{HashMap, HashSet};
use std::io;
use std::path::Path;

use bytes::Bytes;

use crate::journal::{self, BodyLocation, StoredMessage};
use crate::{QueueId, apply_records, read_body_at};

/// Whether to copy the oldest segment's live messages forward. Only a sealed segment with
/// something live in it, and only when the journal holds more than twice the live data plus
/// two segments: a backlog that is all live is not copied round and round, and the disk
/// used stays within about twice what is queued plus three segments.
pub fn due(
    sealed: bool,
    oldest_live: usize,
    journal_bytes: u64,
    live_bytes: u64,
    segment_size: u64,
) -> bool {
    let allowed = live_bytes
        .saturating_mul(2)
        .saturating_add(segment_size.saturating_mul(2));
    sealed && oldest_live > 0 && journal_bytes > allowed
}

/// The current state of the messages `ids`, read from `segments` (in order): their latest
/// message record with every later update and meta applied, and their inline body. A message
/// whose done record is found is left out.
pub(crate) fn current_state(
    journal_dir: &Path,
    segments: &[u64],
    ids: &HashSet<QueueId>,
) -> io::Result<Vec<(StoredMessage, Bytes)>> {
    let mut live: HashMap<QueueId, (StoredMessage, u64)> = HashMap::with_capacity(ids.len());
    for &number in segments {
        let path = journal::segment_path(journal_dir, number);
        let scan = journal::scan_segment_for(&path, number, |id| ids.contains(&id))?;
        apply_records(&mut live, scan.records, number, |id| ids.contains(&id));
    }
    let spool_dir = journal_dir.parent().unwrap_or(Path::new("."));
    let mut current = Vec::with_capacity(live.len());
    for (id, (message, _)) in live {
        let body = match message.body {
            BodyLocation::File => Bytes::new(),
            inline => Bytes::from(read_body_at(spool_dir, id, inline)?),
        };
        current.push((message, body));
    }
    current.sort_by_key(|(m, _)| m.envelope.id);
    Ok(current)
}

#[cfg(test)]
mod tests {
    use super::due;

    const MIB: u64 = 1 << 20;

    #[test]
    fn one_small_waiting_message_behind_much_traffic_is_compacted() {
        // 23 MiB of journal, 2 KB live, 1 MiB segments: well past 2 × live + 2 segments.
        assert!(due(true, 1, 23 * MIB, 2_000, MIB));
    }

    #[test]
    fn a_journal_within_slack_is_left_alone() {
        assert!(!due(true, 1, 2 * MIB, 2_000, MIB));
        assert!(!due(true, 1, 2 * MIB + 4_000, 2_000, MIB));
        assert!(due(true, 1, 2 * MIB + 4_001, 2_000, MIB));
    }

    #[test]
    fn a_backlog_that_is_all_live_is_not_copied_round() {
        // 40 MiB live in a 41 MiB journal: copying would free next to nothing.
        assert!(!due(true, 500, 41 * MIB, 40 * MIB, MIB));
    }

    #[test]
    fn the_active_segment_and_empty_segments_are_never_compacted() {
        assert!(!due(false, 1, 23 * MIB, 2_000, MIB));
        // Nothing live in it: it is simply deleted, no copy needed.
        assert!(!due(true, 0, 23 * MIB, 2_000, MIB));
    }

    #[test]
    fn huge_figures_saturate() {
        assert!(!due(true, 1, u64::MAX, u64::MAX, u64::MAX));
    }
}
