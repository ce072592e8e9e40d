//! The event log's files. The log is cut into `events/events-<start>.jsonl`, each named by the
//! offset of its first byte in the log as a whole: offsets never go back, so a webhook's saved
//! offset stays valid across rotation. The newest file is the one appended to, and
//! `events/events.jsonl` is a symbolic link to it (for `tail -F`). Files older than the
//! retention are deleted whole.
//!
//! Readers whose question starts at a time open the last file that starts before it and bisect
//! inside it ([`tail_since`]), so a query over the last hour reads about an hour of events
//! whatever the history holds.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// The link to the file being appended to (before rotation existed, the log itself).
pub const LINK: &str = "events.jsonl";

/// One file of the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogFile {
    /// Offset of its first byte in the whole log.
    pub start: u64,
    pub path: PathBuf,
    pub len: u64,
}

impl LogFile {
    /// Offset just past its last byte in the whole log.
    pub fn end(&self) -> u64 {
        self.start.saturating_add(self.len)
    }
}

pub fn file_name(start: u64) -> String {
    format!("events-{start:020}.jsonl")
}

fn start_of(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("events-")?.strip_suffix(".jsonl")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The log's files, oldest first (none: an empty list).
pub fn list(dir: &Path) -> io::Result<Vec<LogFile>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry?;
        let Some(start) = start_of(&entry.file_name().to_string_lossy()) else {
            continue;
        };
        let len = entry.metadata()?.len();
        files.push(LogFile {
            start,
            path: entry.path(),
            len,
        });
    }
    files.sort_by_key(|f| f.start);
    Ok(files)
}

/// Makes the log ready to append to and returns its newest file: a log from before rotation
/// (`events.jsonl` a plain file) becomes its first file; an empty directory gets one.
pub fn prepare(dir: &Path) -> io::Result<LogFile> {
    std::fs::create_dir_all(dir)?;
    let link = dir.join(LINK);
    let files = list(dir)?;
    let plain = std::fs::symlink_metadata(&link).is_ok_and(|m| m.file_type().is_file());
    if plain {
        let start = files.last().map_or(0, LogFile::end);
        std::fs::rename(&link, dir.join(file_name(start)))?;
    }
    let newest = match list(dir)?.pop() {
        Some(newest) => newest,
        None => create(dir, 0)?,
    };
    point_link(dir, &newest)?;
    Ok(newest)
}

/// A new, empty file starting at `start`.
pub fn create(dir: &Path, start: u64) -> io::Result<LogFile> {
    let path = dir.join(file_name(start));
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)?;
    let len = std::fs::metadata(&path)?.len();
    Ok(LogFile { start, path, len })
}

/// Points `events.jsonl` at `file` (a new link renamed over the old: never missing).
pub fn point_link(dir: &Path, file: &LogFile) -> io::Result<()> {
    let tmp = dir.join(".events.jsonl.tmp");
    let _ = std::fs::remove_file(&tmp);
    let name = file.path.file_name().unwrap_or_default();
    std::os::unix::fs::symlink(name, &tmp)?;
    std::fs::rename(&tmp, dir.join(LINK))
}

/// Deletes the files, except the newest, last written before `now - keep`. Returns how many.
pub fn expire(dir: &Path, keep: Duration, now: SystemTime) -> io::Result<usize> {
    let mut files = list(dir)?;
    files.pop(); // the one being written
    let mut removed = 0;
    for f in files {
        let written = std::fs::metadata(&f.path)?.modified()?;
        if now.duration_since(written).is_ok_and(|age| age > keep) {
            std::fs::remove_file(&f.path)?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// The file holding offset `offset`, opened and positioned there; and the offset it is at,
/// moved up to the oldest file kept when `offset` was in a deleted one. None past the end.
pub fn open_at(dir: &Path, offset: u64) -> io::Result<Option<(File, u64)>> {
    let files = list(dir)?;
    let Some(file) = files
        .iter()
        .find(|f| offset < f.end())
        .or_else(|| files.last().filter(|f| f.len == 0 && offset == f.start))
    else {
        return Ok(None);
    };
    let offset = offset.max(file.start);
    let mut opened = File::open(&file.path)?;
    opened.seek(SeekFrom::Start(offset - file.start))?;
    Ok(Some((opened, offset)))
}

/// The log's length as a whole.
pub fn end(dir: &Path) -> u64 {
    list(dir)
        .ok()
        .and_then(|files| files.last().map(LogFile::end))
        .unwrap_or(0)
}

/// Events are stamped when made and written a moment later, so the log's order is time order
/// only to within this much; bisection looks this far before `since`.
pub const ORDER_SLACK: jiff::SignedDuration = jiff::SignedDuration::from_secs(60);

/// The log from about `since` on (from the start without `since`, or when it cannot tell):
/// whole lines, starting at or before the first event stamped `since` − [`ORDER_SLACK`].
/// Callers still filter on the time: this only skips what is certainly older.
pub fn tail_since(dir: &Path, since: Option<jiff::Timestamp>) -> String {
    let Ok(files) = list(dir) else {
        return String::new();
    };
    let at = since.and_then(|s| s.checked_sub(ORDER_SLACK).ok());
    let first = first_file(&files, at);
    let mut text = String::new();
    for (i, f) in files.iter().enumerate().skip(first) {
        let Ok(mut file) = File::open(&f.path) else {
            continue; // deleted by retention meanwhile
        };
        let start = match at {
            Some(at) if i == first => bisect(&mut file, at).unwrap_or(0),
            _ => 0,
        };
        if file.seek(SeekFrom::Start(start)).is_ok() {
            let _ = file.read_to_string(&mut text);
        }
    }
    text
}

/// The lines of the log from about `since` on (as [`tail_since`]), one at a time, until `f`
/// says to stop: memory for one line, whatever the span.
pub fn each_line_since(
    dir: &Path,
    since: jiff::Timestamp,
    mut f: impl FnMut(&str) -> std::ops::ControlFlow<()>,
) {
    let Ok(files) = list(dir) else {
        return;
    };
    let at = since.checked_sub(ORDER_SLACK).ok();
    let first = first_file(&files, at);
    for (i, lf) in files.iter().enumerate().skip(first) {
        let Ok(mut file) = File::open(&lf.path) else {
            continue; // deleted by retention meanwhile
        };
        let start = match at {
            Some(at) if i == first => bisect(&mut file, at).unwrap_or(0),
            _ => 0,
        };
        if file.seek(SeekFrom::Start(start)).is_err() {
            continue;
        }
        let mut reader = BufReader::new(file);
        let mut line = String::new();
        loop {
            line.clear();
            // A line longer than 1 MiB is no event of Baton's: read no further in this file.
            match (&mut reader).take(1 << 20).read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) if f(line.trim_end()).is_break() => return,
                Ok(_) => {}
            }
        }
    }
}

/// The last file whose first event is older than `at` (everything before it is too); 0
/// without `at`.
fn first_file(files: &[LogFile], at: Option<jiff::Timestamp>) -> usize {
    let Some(at) = at else {
        return 0;
    };
    files
        .iter()
        .rposition(|f| {
            File::open(&f.path)
                .and_then(|mut file| line_after(&mut file, 0, true))
                .ok()
                .flatten()
                .and_then(|(_, stamp)| stamp)
                .is_some_and(|t| t < at)
        })
        .unwrap_or(0)
}

/// An offset at a line's start before which every line is stamped earlier than `at` (0 when
/// the first line is not).
fn bisect(file: &mut File, at: jiff::Timestamp) -> io::Result<u64> {
    let (mut lo, mut hi) = (0u64, file.metadata()?.len());
    // lo: a line start known to be before `at` (or 0); hi: an offset at or after it.
    while hi.saturating_sub(lo) > 64 << 10 {
        let mid = lo + (hi - lo) / 2;
        match line_after(file, mid, false)? {
            Some((start, stamp)) if start < hi && stamp.is_some_and(|t| t < at) => lo = start,
            _ => hi = mid,
        }
    }
    Ok(lo)
}

/// The first whole line starting after `offset` (at it, when `at_start`): where it starts and
/// its timestamp (None when it has none that parses).
fn line_after(
    file: &mut File,
    offset: u64,
    at_start: bool,
) -> io::Result<Option<(u64, Option<jiff::Timestamp>)>> {
    file.seek(SeekFrom::Start(offset))?;
    let mut reader = BufReader::new(&mut *file);
    let mut skipped = Vec::new();
    let partial = if at_start {
        0
    } else {
        reader.read_until(b'\n', &mut skipped)? as u64
    };
    let mut line = Vec::new();
    if reader
        .by_ref()
        .take(64 << 10)
        .read_until(b'\n', &mut line)?
        == 0
    {
        return Ok(None);
    }
    let stamp = serde_json::from_slice::<serde_json::Value>(&line)
        .ok()
        .and_then(|e| {
            e.get("timestamp")?
                .as_str()?
                .parse::<jiff::Timestamp>()
                .ok()
        });
    Ok(Some((offset + partial, stamp)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write_events(path: &Path, from: i64, n: i64) {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap();
        let t0 = "2026-12-01T00:00:00Z".parse::<jiff::Timestamp>().unwrap();
        for i in from..from + n {
            let at = t0 + jiff::SignedDuration::from_secs(i * 10);
            writeln!(f, r#"{{"id":"{i}","type":"delivery","timestamp":"{at}"}}"#).unwrap();
        }
    }

    #[test]
    fn reading_from_a_time_skips_only_what_is_older() {
        let dir = tempfile::tempdir().unwrap();
        let first = prepare(dir.path()).unwrap();
        write_events(&first.path, 0, 20_000);
        let t0 = "2026-12-01T00:00:00Z".parse::<jiff::Timestamp>().unwrap();
        let since = t0 + jiff::SignedDuration::from_secs(150_000);
        let tail = tail_since(dir.path(), Some(since));
        let first_line: serde_json::Value =
            serde_json::from_str(tail.lines().next().unwrap()).unwrap();
        let first_at: jiff::Timestamp = first_line["timestamp"].as_str().unwrap().parse().unwrap();
        // Nothing at or after `since` (minus the slack) is skipped, and most before it is.
        assert!(first_at <= since - ORDER_SLACK, "{first_at}");
        assert!(tail.lines().count() < 6_000, "{}", tail.lines().count());
        assert!(tail.contains(r#""id":"15000""#));
        assert_eq!(tail_since(dir.path(), None).lines().count(), 20_000);
        let before_all = t0 - jiff::SignedDuration::from_secs(3600);
        assert_eq!(
            tail_since(dir.path(), Some(before_all)).lines().count(),
            20_000
        );
        assert_eq!(tail_since(&dir.path().join("none"), Some(since)), "");
    }

    /// Four files of 5,000 events: a tail from a time in the third reads the third from about
    /// there, and the fourth; offsets run on across files.
    #[test]
    fn a_tail_starts_in_the_file_that_holds_its_time() {
        let dir = tempfile::tempdir().unwrap();
        let mut file = prepare(dir.path()).unwrap();
        for part in 0..4 {
            write_events(&file.path, part * 5_000, 5_000);
            let len = std::fs::metadata(&file.path).unwrap().len();
            file = create(dir.path(), file.start + len).unwrap();
        }
        let files = list(dir.path()).unwrap();
        assert_eq!(files.len(), 5);
        assert!(files.windows(2).all(|w| w[0].end() == w[1].start));
        let t0 = "2026-12-01T00:00:00Z".parse::<jiff::Timestamp>().unwrap();
        let since = t0 + jiff::SignedDuration::from_secs(12_000 * 10);
        let tail = tail_since(dir.path(), Some(since));
        let ids: Vec<i64> = tail
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["id"]
                    .as_str()
                    .unwrap()
                    .parse()
                    .unwrap()
            })
            .collect();
        assert!(ids[0] > 10_000 && ids[0] <= 12_000 - 6, "{}", ids[0]);
        assert_eq!(*ids.last().unwrap(), 19_999);
        assert!(ids.windows(2).all(|w| w[1] == w[0] + 1));
        // Reading at an offset finds its file.
        let (mut f, at) = open_at(dir.path(), files[2].start + 1).unwrap().unwrap();
        assert_eq!(at, files[2].start + 1);
        let mut rest = String::new();
        f.read_to_string(&mut rest).unwrap();
        assert_eq!(rest.len() as u64, files[2].len - 1);
        assert!(open_at(dir.path(), files[4].start + 1).unwrap().is_none());
        assert!(open_at(dir.path(), files[4].start).unwrap().is_some());
    }

    #[test]
    fn retention_deletes_old_files_never_the_newest_and_offsets_move_up() {
        let dir = tempfile::tempdir().unwrap();
        let a = prepare(dir.path()).unwrap();
        write_events(&a.path, 0, 10);
        let b = create(dir.path(), std::fs::metadata(&a.path).unwrap().len()).unwrap();
        write_events(&b.path, 10, 10);
        let later = SystemTime::now() + Duration::from_secs(3600);
        assert_eq!(
            expire(dir.path(), Duration::from_secs(7200), later).unwrap(),
            0
        );
        assert_eq!(
            expire(dir.path(), Duration::from_secs(60), later).unwrap(),
            1
        );
        let left = list(dir.path()).unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].start, b.start);
        // An offset in the deleted file continues at the oldest kept.
        let (_, at) = open_at(dir.path(), 3).unwrap().unwrap();
        assert_eq!(at, b.start);
    }

    #[test]
    fn a_log_from_before_rotation_becomes_the_first_file() {
        let dir = tempfile::tempdir().unwrap();
        write_events(&dir.path().join(LINK), 0, 3);
        let newest = prepare(dir.path()).unwrap();
        assert_eq!(newest.start, 0);
        assert_eq!(newest.path, dir.path().join(file_name(0)));
        let via_link = std::fs::read_to_string(dir.path().join(LINK)).unwrap();
        assert_eq!(via_link.lines().count(), 3);
        assert!(
            std::fs::symlink_metadata(dir.path().join(LINK))
                .unwrap()
                .file_type()
                .is_symlink()
        );
    }
}
