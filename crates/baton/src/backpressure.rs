//! Backpressure: intake pauses before anything breaks. When the spool's file system runs low
//! on space or the queue holds more recipients than `[spool] max_queued_recipients`, SMTP
//! answers MAIL with `452 4.3.1 Insufficient system storage` and the API answers 503 with the
//! reason; deliveries go on, and intake resumes by itself once the cause is gone.
//!
//! The free space is read once a second on a blocking thread (statvfs); the queue's size is
//! read when asked (an atomic the queue manager keeps). The verdict is [`verdict`], a pure
//! function with unit tests. Owns that decision only: the session and the API word the
//! refusal.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// How often the free space is read.
const DISK_EVERY: Duration = Duration::from_secs(1);

/// The limits intake keeps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    /// Refuse when the spool's file system has fewer bytes free than this.
    pub min_free_bytes: u64,
    /// Refuse when this many recipients wait in the queue (None: no limit).
    pub max_queued_recipients: Option<u64>,
}

impl Thresholds {
    /// `[spool] min_free_space`, but never less than 1.5 × `[limits] max_message_size` (one
    /// more message of the largest size must fit, as Postfix's smtpd requires).
    pub fn new(min_free_space: u64, max_message_size: u64, max_queued: Option<u64>) -> Self {
        let room_for_one = max_message_size.saturating_add(max_message_size / 2);
        Thresholds {
            min_free_bytes: min_free_space.max(room_for_one),
            max_queued_recipients: max_queued,
        }
    }
}

/// Why intake must pause, if it must: `free_bytes` on the spool's file system (None when it
/// could not be read: no verdict on space) and `queued` recipients waiting.
pub fn verdict(t: &Thresholds, free_bytes: Option<u64>, queued: u64) -> Option<String> {
    if let Some(free) = free_bytes
        && free < t.min_free_bytes
    {
        return Some(format!(
            "{} free on the spool's disk, below the {} kept free",
            baton_units::human_size(free),
            baton_units::human_size(t.min_free_bytes)
        ));
    }
    match t.max_queued_recipients {
        Some(max) if queued >= max => Some(format!(
            "{queued} recipients queued, at the limit of {max} ([spool] max_queued_recipients)"
        )),
        _ => None,
    }
}

/// The state intake asks before taking a message.
pub struct Backpressure {
    thresholds: Thresholds,
    /// Free bytes on the spool's file system as last read; u64::MAX until read or when
    /// unreadable (no verdict on space).
    free: AtomicU64,
    /// Recipients waiting, kept by the queue manager.
    queued: Arc<AtomicU64>,
}

impl Backpressure {
    /// Starts reading the free space under `data_dir` once a second.
    pub fn start(thresholds: Thresholds, data_dir: &Path, queued: Arc<AtomicU64>) -> Arc<Self> {
        let state = Arc::new(Backpressure {
            thresholds,
            free: AtomicU64::new(free_bytes(data_dir).unwrap_or(u64::MAX)),
            queued,
        });
        let watched = state.clone();
        let dir = data_dir.to_path_buf();
        tokio::spawn(async move { watched.watch_disk(dir).await });
        state
    }

    /// Why intake must pause now, if it must.
    pub fn refusal(&self) -> Option<String> {
        let free = self.free.load(Ordering::Relaxed);
        let free = (free != u64::MAX).then_some(free);
        verdict(&self.thresholds, free, self.queued.load(Ordering::Relaxed))
    }

    async fn watch_disk(self: Arc<Self>, dir: PathBuf) {
        let mut paused = false;
        loop {
            tokio::time::sleep(DISK_EVERY).await;
            let path = dir.clone();
            let free = tokio::task::spawn_blocking(move || free_bytes(&path))
                .await
                .ok()
                .flatten();
            self.free.store(free.unwrap_or(u64::MAX), Ordering::Relaxed);
            let refusal = self.refusal();
            match (&refusal, paused) {
                (Some(why), false) => tracing::warn!(%why, "intake paused"),
                (None, true) => tracing::info!("intake resumed"),
                _ => {}
            }
            paused = refusal.is_some();
        }
    }
}

/// Bytes available to an unprivileged writer on the file system holding `path`.
fn free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: c_path is a valid NUL-terminated string and stat points to writable memory of
    // the right type; statvfs fills it in when it returns 0.
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), stat.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so it initialised the struct.
    let stat = unsafe { stat.assume_init() };
    // The field types differ by platform (u32 on some); on this one they are u64 already.
    #[allow(clippy::unnecessary_cast)]
    let (blocks, size) = (stat.f_bavail as u64, stat.f_frsize as u64);
    Some(blocks.saturating_mul(size))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn space_for_one_more_of_the_largest_message_is_always_kept() {
        let t = Thresholds::new(0, 50 * MIB, None);
        assert_eq!(t.min_free_bytes, 75 * MIB);
        let t = Thresholds::new(1 << 30, 50 * MIB, None);
        assert_eq!(t.min_free_bytes, 1 << 30);
        let t = Thresholds::new(0, u64::MAX, None);
        assert_eq!(t.min_free_bytes, u64::MAX, "saturates");
    }

    #[test]
    fn the_verdict_names_the_cause() {
        let t = Thresholds::new(100 * MIB, 10 * MIB, Some(1000));
        assert_eq!(verdict(&t, Some(200 * MIB), 999), None);
        let low = verdict(&t, Some(99 * MIB), 0).expect("low on space");
        assert!(
            low.contains("99 MiB free") && low.contains("100 MiB"),
            "{low}"
        );
        let full = verdict(&t, Some(200 * MIB), 1000).expect("queue full");
        assert!(full.contains("1000 recipients queued"), "{full}");
        // Space unknown: no verdict on space, the queue still counts.
        assert_eq!(verdict(&t, None, 0), None);
        let unlimited = Thresholds::new(0, 10 * MIB, None);
        assert_eq!(verdict(&unlimited, Some(u64::MAX), u64::MAX), None);
    }

    #[test]
    fn free_space_is_read() {
        let dir = tempfile::tempdir().unwrap();
        assert!(free_bytes(dir.path()).is_some_and(|b| b > 0));
        assert_eq!(free_bytes(&dir.path().join("missing")), None);
    }
}
