//! Following the event log for a receiver off the node (a webhook, the NATS JetStream
//! export). The log file is the durable queue: each receiver remembers the offset up to which
//! it acknowledged in `<dir>/<key>.offset`, and is sent the same batch again with backoff
//! (1 s doubling to 60 s) until it acknowledges. A receiver down for an hour gets everything
//! when it is back. Delivery is at least once: a crash between the acknowledgement and saving
//! the offset sends a batch again, and event ids let receivers drop duplicates.
//!
//! Owns the offsets and the reading; it must not write the event log nor know a receiver's
//! protocol.

use std::future::Future;
use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::watch;

use crate::EventKind;

const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// The most read from the log per batch.
const READ_CHUNK: usize = 1 << 20;

/// One event as logged, with what a receiver needs to route and deduplicate it.
pub(crate) struct Line {
    /// The event's `id` (empty on a line that does not parse).
    pub(crate) id: String,
    pub(crate) kind: Option<EventKind>,
    /// The JSON line, without its newline.
    pub(crate) text: String,
}

/// Where batches of events go.
pub(crate) trait Sink: Send + Sync + 'static {
    /// What logs call it (its URL).
    fn name(&self) -> &str;
    /// The event types sent; empty = all.
    fn events(&self) -> &[EventKind];
    /// Whether it uses each event's id and type ([`Line::id`], [`Line::kind`]); without a
    /// type filter a sink that does not is spared parsing every line.
    fn reads_heads(&self) -> bool;
    fn batch_size(&self) -> usize;
    /// Sends a batch; Ok once the receiver has acknowledged all of it.
    fn send(&self, batch: &[Line]) -> impl Future<Output = Result<(), String>> + Send;
}

/// Starts following the log at `log` for `sink`, its offset kept in `offset_file`.
pub(crate) fn spawn<S: Sink>(
    sink: S,
    log: PathBuf,
    offset_file: PathBuf,
    events: &crate::Events,
    stop: watch::Receiver<bool>,
) {
    let follower = Arc::new(Follower {
        sink,
        log,
        offset_file,
    });
    tokio::spawn(follower.run(events.length(), events.opened_length(), stop));
}

/// The file an export keeps its offset in: `dir/<first 8 bytes of SHA-256(key) in hex>.offset`.
pub(crate) fn offset_file(dir: &std::path::Path, key: &str) -> PathBuf {
    let digest = ring::digest::digest(&ring::digest::SHA256, key.as_bytes());
    dir.join(format!("{}.offset", hex::encode(&digest.as_ref()[..8])))
}

struct Follower<S> {
    sink: S,
    log: PathBuf,
    offset_file: PathBuf,
}

impl<S: Sink> Follower<S> {
    async fn run(
        self: Arc<Self>,
        mut length: watch::Receiver<u64>,
        opened_len: u64,
        mut stop: watch::Receiver<bool>,
    ) {
        let now = *length.borrow();
        let mut offset = self.start_offset(now, opened_len).await;
        let mut backoff = Duration::from_secs(1);
        while !*stop.borrow() {
            let read = self.off_thread(move |f| f.read_batch(offset)).await;
            let (batch, end) = match read {
                Some(Ok(b)) => b,
                Some(Err(e)) => {
                    tracing::error!(to = %self.sink.name(), error = %e, "cannot read the event log for an export");
                    (Vec::new(), offset)
                }
                None => (Vec::new(), offset),
            };
            if batch.is_empty() {
                if end > offset {
                    offset = end; // only filtered-out events
                    self.save(offset).await;
                    continue;
                }
                tokio::select! {
                    _ = length.changed() => {}
                    _ = stop.changed() => {}
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                }
                continue;
            }
            match self.sink.send(&batch).await {
                Ok(()) => {
                    offset = end;
                    self.save(offset).await;
                    backoff = Duration::from_secs(1);
                }
                Err(why) => {
                    tracing::warn!(to = %self.sink.name(), %why, retry_in = ?backoff, events = batch.len(), "event export failed");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.changed() => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// The saved offset; a receiver seen for the first time starts with the events written
    /// from now on (`now`).
    async fn start_offset(self: &Arc<Self>, now: u64, opened_len: u64) -> u64 {
        let saved = self
            .off_thread(|f| std::fs::read_to_string(&f.offset_file).ok())
            .await
            .flatten();
        let offset = match saved {
            Some(text) => text.trim().parse().unwrap_or(0),
            None => {
                self.save(now).await;
                return now;
            }
        };
        // The offset is saved without fsync and the log synced once a second: after a power
        // cut it can point past the log's end as it was opened (events written since start
        // there, at a line's start).
        if offset > opened_len {
            tracing::warn!(to = %self.sink.name(), offset, log_len = opened_len, "export offset past the end of the event log; continuing from the end");
            self.save(opened_len).await;
            return opened_len;
        }
        offset
    }

    /// Runs file work on a blocking thread: this follower's task waits, the runtime's thread
    /// does not. None if the work could not run (the runtime is shutting down).
    async fn off_thread<T: Send + 'static>(
        self: &Arc<Self>,
        work: impl FnOnce(&Follower<S>) -> T + Send + 'static,
    ) -> Option<T> {
        let follower = self.clone();
        tokio::task::spawn_blocking(move || work(&follower))
            .await
            .ok()
    }

    async fn save(self: &Arc<Self>, offset: u64) {
        self.off_thread(move |f| f.save_now(offset)).await;
    }

    fn save_now(&self, offset: u64) {
        let tmp = self.offset_file.with_extension("tmp");
        let saved = std::fs::write(&tmp, offset.to_string())
            .and_then(|()| std::fs::rename(&tmp, &self.offset_file));
        if let Err(e) = saved {
            tracing::warn!(path = %self.offset_file.display(), error = %e, "cannot save an export offset (events may be sent again)");
        }
    }

    /// Up to `batch_size` wanted events from `offset`, and the offset just past the last line
    /// looked at. An unfinished last line is left for later.
    /// Reads within one of the log's files; an offset in a file the retention deleted moves
    /// on to the oldest kept.
    fn read_batch(&self, offset: u64) -> std::io::Result<(Vec<Line>, u64)> {
        let Some((mut file, at)) = crate::files::open_at(&self.log, offset)? else {
            return Ok((Vec::new(), offset));
        };
        if at != offset {
            tracing::warn!(to = %self.sink.name(), offset, now = at, "export offset in an event log file deleted by the retention; continuing with the oldest kept");
            return Ok((Vec::new(), at));
        }
        let mut chunk = Vec::with_capacity(64 << 10);
        (&mut file)
            .take(READ_CHUNK as u64)
            .read_to_end(&mut chunk)?;
        if chunk.len() == READ_CHUNK && !chunk.contains(&b'\n') {
            // A line longer than a whole chunk (the writer bounds lines now; an old log may
            // hold one): skipped, or it would stop this export for good.
            let skipped = skip_line(&mut file)?;
            tracing::warn!(to = %self.sink.name(), offset, bytes = READ_CHUNK as u64 + skipped, "skipping an over-long event line");
            return Ok((Vec::new(), offset + READ_CHUNK as u64 + skipped));
        }
        let heads = self.sink.reads_heads() || !self.sink.events().is_empty();
        let (batch, used) = lines(&chunk, self.sink.events(), self.sink.batch_size(), heads);
        Ok((batch, offset + used as u64))
    }
}

/// The wanted events among the whole lines of `chunk`, at most `max`, and how many bytes of
/// `chunk` they (and the unwanted lines between them) took. Each line's id and type are read
/// only with `heads` (else they are left empty).
fn lines(chunk: &[u8], wanted: &[EventKind], max: usize, heads: bool) -> (Vec<Line>, usize) {
    #[derive(Deserialize)]
    struct Head {
        #[serde(default)]
        id: String,
        #[serde(rename = "type", default)]
        kind: String,
    }
    let mut batch = Vec::new();
    let mut at = 0;
    while let Some(len) = chunk[at..].iter().position(|&b| b == b'\n') {
        let text = &chunk[at..at + len];
        at += len + 1;
        if text.is_empty() {
            continue;
        }
        let head = heads
            .then(|| serde_json::from_slice::<Head>(text).ok())
            .flatten();
        let kind = head.as_ref().and_then(|h| h.kind.parse().ok());
        if wanted.is_empty() || kind.is_some_and(|k| wanted.contains(&k)) {
            batch.push(Line {
                id: head.map(|h| h.id).unwrap_or_default(),
                kind,
                text: String::from_utf8_lossy(text).into_owned(),
            });
            if batch.len() >= max {
                break;
            }
        }
    }
    (batch, at)
}

/// Reads on from where `file` stands to just past the next newline (or the end); returns how
/// many bytes that was.
fn skip_line(file: &mut std::fs::File) -> std::io::Result<u64> {
    let mut skipped = 0u64;
    let mut chunk = vec![0u8; 64 << 10];
    loop {
        let n = file.read(&mut chunk)?;
        if n == 0 {
            return Ok(skipped);
        }
        if let Some(i) = chunk[..n].iter().position(|&b| b == b'\n') {
            return Ok(skipped + i as u64 + 1);
        }
        skipped += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_keep_the_wanted_whole_lines_and_say_how_far_they_read() {
        let chunk = b"{\"id\":\"a-1\",\"type\":\"reception\"}\n\n{\"id\":\"a-2\",\"type\":\"delivery\"}\n{\"id\":\"a-3\",\"type\":\"reception\"}\n{\"id\":\"a-4\"";
        let (all, used) = lines(chunk, &[], 100, true);
        assert_eq!(
            all.iter().map(|l| l.id.as_str()).collect::<Vec<_>>(),
            ["a-1", "a-2", "a-3"]
        );
        assert_eq!(all[1].kind, Some(EventKind::Delivery));
        assert_eq!(all[0].text, "{\"id\":\"a-1\",\"type\":\"reception\"}");
        assert_eq!(
            used,
            chunk.len() - "{\"id\":\"a-4\"".len(),
            "the unfinished line waits"
        );

        let (receptions, used) = lines(chunk, &[EventKind::Reception], 1, true);
        assert_eq!(receptions.len(), 1);
        assert_eq!(used, 32, "stops after the first wanted line");
        let (receptions, _) = lines(chunk, &[EventKind::Reception], 100, true);
        // Without heads (a webhook with no filter): the lines as they are, unparsed.
        let (raw, used_raw) = lines(chunk, &[], 100, false);
        assert_eq!(raw.len(), 3);
        assert_eq!((raw[1].id.as_str(), raw[1].kind), ("", None));
        assert_eq!(used_raw, chunk.len() - "{\"id\":\"a-4\"".len());
        assert_eq!(receptions.len(), 2);

        // A line that is not JSON goes to receivers of everything, with no id.
        let (odd, _) = lines(b"not json\n", &[], 10, true);
        assert_eq!((odd[0].id.as_str(), odd[0].kind), ("", None));
        assert!(
            lines(b"not json\n", &[EventKind::Bounce], 10, true)
                .0
                .is_empty()
        );
    }
}
