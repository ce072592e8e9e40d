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
use std::fmt;
use std::str::FromStr;

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
    /// On reception events: the campaign tag the message was injected with.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub campaign: Option<String>,
    /// On reception events: whose mail it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// On attempt events: the egress source the connection left from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// On delivery events: milliseconds from reception to delivery.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<u64>,
}

/// An event's `type`. Its name ([`EventKind::as_str`]) is what the log, the API, webhooks and
/// the `[[webhook]] events` setting use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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
    /// An address joined the suppression list (it bounced as non-existent), or an injected
    /// recipient was left out because it is on it.
    Suppression,
    /// An operator held or released a message (bounce, delete, suspend and resume have their
    /// own events: bounce, deleted, shaping).
    Operator,
}

impl EventKind {
    /// Every kind, in the order the documentation lists them.
    pub const ALL: [EventKind; 12] = [
        EventKind::Reception,
        EventKind::Delivery,
        EventKind::TransientFailure,
        EventKind::Bounce,
        EventKind::Expiration,
        EventKind::DsnQueued,
        EventKind::BounceDropped,
        EventKind::Shaping,
        EventKind::Deleted,
        EventKind::Held,
        EventKind::Suppression,
        EventKind::Operator,
    ];

    /// The `type` field's value.
    pub const fn as_str(self) -> &'static str {
        match self {
            EventKind::Reception => "reception",
            EventKind::Delivery => "delivery",
            EventKind::TransientFailure => "transient_failure",
            EventKind::Bounce => "bounce",
            EventKind::Expiration => "expiration",
            EventKind::DsnQueued => "dsn_queued",
            EventKind::BounceDropped => "bounce_dropped",
            EventKind::Shaping => "shaping",
            EventKind::Deleted => "deleted",
            EventKind::Held => "held",
            EventKind::Suppression => "suppression",
            EventKind::Operator => "operator",
        }
    }

    /// The kind of a logged event (its `type` field); none for a type this version does not
    /// know.
    pub fn of(event: &serde_json::Value) -> Option<EventKind> {
        event.get("type")?.as_str()?.parse().ok()
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Text that names no event type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown event type {0:?}")]
pub struct UnknownEventKind(pub String);

impl FromStr for EventKind {
    type Err = UnknownEventKind;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        EventKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| UnknownEventKind(s.to_string()))
    }
}

impl Serialize for EventKind {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
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
    /// Starts the writer task. Must be called inside a tokio runtime.
    pub fn start(data_dir: &Path, fsync: bool) -> anyhow::Result<Events> {
        let dir = data_dir.join("events");
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("events.jsonl");
        repair_torn_tail(&path)?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)?;
        let (tx, rx) = mpsc::channel();
        let opened_len = file.metadata()?.len();
        let (length_tx, length) = tokio::sync::watch::channel(opened_len);
        std::thread::Builder::new()
            .name("event-log".into())
            .spawn(move || writer(file, path, rx, fsync, length_tx))?;
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
        }
    }

    pub fn emit(&self, event: Event) {
        let _ = self.tx.send(Entry::Event(Box::new(event)));
    }

    /// The log's length when this run opened it: every offset saved before lies within it.
    pub fn opened_length(&self) -> u64 {
        self.opened_len
    }

    /// The log file's length, updated after every write.
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

fn writer(
    mut file: std::fs::File,
    path: PathBuf,
    rx: mpsc::Receiver<Entry>,
    fsync: bool,
    length: tokio::sync::watch::Sender<u64>,
) {
    let mut buf = Vec::with_capacity(64 << 10);
    let mut written = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut dirty = false;
    let mut last_sync = Instant::now();
    let mut open = true;
    let mut waiting = Vec::new();
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
        if !buf.is_empty() {
            match file.write_all(&buf) {
                Ok(()) => {
                    dirty = true;
                    written += buf.len() as u64;
                    length.send_modify(|n| *n += buf.len() as u64);
                }
                Err(e) => {
                    // A partial write would glue the next event to a torn line: cut it back.
                    let _ = file.set_len(written);
                    tracing::error!(path = %path.display(), error = %e, "cannot write the event log")
                }
            }
        }
        for reply in waiting.drain(..) {
            let _ = reply.send(());
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

/// What `GET /api/v1/events` asks for.
pub struct Filter {
    pub since: Option<jiff::Timestamp>,
    pub until: Option<jiff::Timestamp>,
    pub recipient: Option<String>,
    pub message_id: Option<String>,
    /// Events of messages whose reception carried this campaign tag.
    pub campaign: Option<String>,
    pub kind: Option<EventKind>,
    /// Only events after the one with this id.
    pub after: Option<String>,
    pub limit: usize,
    /// The newest `limit` matching events, newest first (no pagination).
    pub newest_first: bool,
}

/// One page of the event log, oldest first: `{"events": [...], "next": <id or null>}`;
/// `next` is the id to pass as `after` for the following page.
pub fn query(path: &Path, filter: &Filter) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut campaign_messages = std::collections::HashSet::new();
    let mut passed_cursor = filter.after.is_none();
    let mut events = Vec::new();
    let mut more = false;
    for line in text.lines() {
        let Ok(event) = serde_json::from_str::<serde_json::Value>(line) else {
            continue; // a torn last line after a crash
        };
        let field = |name: &str| event.get(name).and_then(|v| v.as_str()).unwrap_or("");
        let kind = EventKind::of(&event);
        if let Some(c) = &filter.campaign
            && kind == Some(EventKind::Reception)
            && field("campaign") == c
        {
            campaign_messages.insert(field("message_id").to_string());
        }
        if !passed_cursor {
            passed_cursor = filter.after.as_deref() == Some(field("id"));
            continue;
        }
        let at = field("timestamp").parse::<jiff::Timestamp>().ok();
        let keep = filter.since.is_none_or(|s| at.is_some_and(|t| t >= s))
            && filter.until.is_none_or(|u| at.is_some_and(|t| t < u))
            && filter
                .recipient
                .as_deref()
                .is_none_or(|r| field("recipient").eq_ignore_ascii_case(r))
            && filter
                .message_id
                .as_deref()
                .is_none_or(|m| field("message_id") == m)
            && filter.kind.is_none_or(|k| kind == Some(k))
            && (filter.campaign.is_none() || campaign_messages.contains(field("message_id")));
        if !keep {
            continue;
        }
        if filter.newest_first {
            events.push(event);
            if events.len() > filter.limit {
                events.remove(0);
            }
            continue;
        }
        if events.len() == filter.limit {
            more = true;
            break;
        }
        events.push(event);
    }
    let next = if more {
        events
            .last()
            .and_then(|e| e.get("id"))
            .cloned()
            .unwrap_or(serde_json::Value::Null)
    } else {
        serde_json::Value::Null
    };
    if filter.newest_first {
        events.reverse();
    }
    serde_json::json!({"events": events, "next": next})
}

/// A message's recipients and their last known state, from the event log (for messages no
/// longer in the queue); none if the log never saw it.
pub fn history(path: &Path, message_id: &str) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut sender = None;
    // (email, state, attempts, last response), in order of first appearance.
    let mut recipients: Vec<(String, &'static str, u64, Option<String>)> = Vec::new();
    for line in text.lines() {
        if !line.contains(message_id) {
            continue;
        }
        let Ok(event) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let field = |name: &str| event.get(name).and_then(|v| v.as_str()).unwrap_or("");
        if field("message_id") != message_id {
            continue;
        }
        sender.get_or_insert_with(|| field("sender").to_string());
        let state = match EventKind::of(&event) {
            Some(EventKind::Reception | EventKind::Held) => "queued",
            Some(EventKind::TransientFailure) => "deferred",
            Some(EventKind::Delivery) => "delivered",
            Some(EventKind::Bounce) => "bounced",
            Some(EventKind::Expiration) => "expired",
            Some(EventKind::Deleted) => "deleted",
            _ => continue,
        };
        let email = field("recipient").to_string();
        let at = match recipients.iter().position(|r| r.0 == email) {
            Some(i) => i,
            None => {
                recipients.push((email, "queued", 0, None));
                recipients.len() - 1
            }
        };
        let r = &mut recipients[at];
        r.1 = state;
        if let Some(n) = event.get("attempt").and_then(|a| a.as_u64()) {
            r.2 = r.2.max(n);
        }
        if let Some(response) = event.get("response").and_then(|v| v.as_str()) {
            r.3 = Some(response.to_string());
        }
    }
    let sender = sender?;
    let recipients: Vec<serde_json::Value> = recipients
        .into_iter()
        .map(|(email, state, attempts, response)| {
            serde_json::json!({"email": email, "state": state, "attempts": attempts, "response": response})
        })
        .collect();
    Some(serde_json::json!({"id": message_id, "sender": sender, "recipients": recipients}))
}

/// Delivery statistics over `[since, until)` from the event log, grouped by `by`
/// ("destination", "campaign", "tenant" or "source"): attempts' outcomes and delivery-latency
/// percentiles (reception to delivery).
pub fn stats(
    path: &Path,
    since: Option<jiff::Timestamp>,
    until: Option<jiff::Timestamp>,
    by: &str,
) -> serde_json::Value {
    #[derive(Default)]
    struct Group {
        delivered: u64,
        deferred: u64,
        bounced: u64,
        expired: u64,
        latencies: Vec<u64>,
    }
    let text = std::fs::read_to_string(path).unwrap_or_default();
    // Message id → (campaign, tenant), from reception events.
    let mut tags: std::collections::HashMap<String, (String, String)> = Default::default();
    let mut groups: std::collections::BTreeMap<String, Group> = Default::default();
    let mut total = Group::default();
    for line in text.lines() {
        let Ok(event) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let field = |name: &str| event.get(name).and_then(|v| v.as_str()).unwrap_or("");
        let Some(kind) = EventKind::of(&event) else {
            continue;
        };
        if kind == EventKind::Reception {
            tags.insert(
                field("message_id").to_string(),
                (field("campaign").to_string(), field("tenant").to_string()),
            );
            continue;
        }
        if !matches!(
            kind,
            EventKind::Delivery
                | EventKind::TransientFailure
                | EventKind::Bounce
                | EventKind::Expiration
        ) {
            continue;
        }
        let at = field("timestamp").parse::<jiff::Timestamp>().ok();
        let in_range = since.is_none_or(|s| at.is_some_and(|t| t >= s))
            && until.is_none_or(|u| at.is_some_and(|t| t < u));
        if !in_range {
            continue;
        }
        let (campaign, tenant) = tags.get(field("message_id")).cloned().unwrap_or_default();
        let key = match by {
            "campaign" => campaign,
            "tenant" => tenant,
            "source" => field("source").to_string(),
            _ => field("recipient")
                .rsplit_once('@')
                .map(|(_, d)| d.to_ascii_lowercase())
                .unwrap_or_default(),
        };
        let latency = event.get("latency_ms").and_then(|v| v.as_u64());
        for g in [groups.entry(key).or_default(), &mut total] {
            match kind {
                EventKind::Delivery => {
                    g.delivered += 1;
                    g.latencies.extend(latency);
                }
                EventKind::TransientFailure => g.deferred += 1,
                EventKind::Bounce => g.bounced += 1,
                _ => g.expired += 1,
            }
        }
    }
    let render = |g: &mut Group| {
        g.latencies.sort_unstable();
        let pct = |p: f64| -> Option<u64> {
            let n = g.latencies.len();
            (n > 0).then(|| g.latencies[((n as f64 * p).ceil() as usize).clamp(1, n) - 1])
        };
        let finished = g.delivered + g.bounced + g.expired;
        serde_json::json!({
            "delivered": g.delivered,
            "deferred": g.deferred,
            "bounced": g.bounced,
            "expired": g.expired,
            "bounce_rate": if finished > 0 { (g.bounced + g.expired) as f64 / finished as f64 } else { 0.0 },
            "latency_ms": {"p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99)},
        })
    };
    let groups: Vec<serde_json::Value> = groups
        .iter_mut()
        .map(|(key, g)| {
            let mut v = render(g);
            v["key"] = serde_json::Value::String(key.clone());
            v
        })
        .collect();
    serde_json::json!({"by": by, "total": render(&mut total), "groups": groups})
}

/// An RFC 3339 time, or a span back from now ("90s", "30m", "24h", "7d").
pub fn parse_since(text: &str) -> Option<jiff::Timestamp> {
    if let Ok(t) = text.parse::<jiff::Timestamp>() {
        return Some(t);
    }
    // Split before the last character, not the last byte: "1€" must not panic.
    let (at, unit) = text.char_indices().last()?;
    let secs = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86400,
        _ => return None,
    };
    let digits = &text[..at];
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: i64 = digits.parse().ok()?;
    jiff::Timestamp::now()
        .checked_sub(jiff::SignedDuration::from_secs(n.checked_mul(secs)?))
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_have_one_name_each_and_parse_back() {
        let names: std::collections::HashSet<_> =
            EventKind::ALL.iter().map(|k| k.as_str()).collect();
        assert_eq!(names.len(), EventKind::ALL.len());
        for kind in EventKind::ALL {
            assert_eq!(kind.as_str().parse::<EventKind>(), Ok(kind));
            assert_eq!(kind.to_string(), kind.as_str());
            assert_eq!(
                serde_json::to_value(kind).unwrap(),
                serde_json::Value::String(kind.as_str().into())
            );
            let line = serde_json::json!({"type": kind.as_str()});
            assert_eq!(EventKind::of(&line), Some(kind));
        }
        // The names the log has always used.
        assert_eq!(EventKind::TransientFailure.as_str(), "transient_failure");
        assert_eq!(EventKind::DsnQueued.as_str(), "dsn_queued");
        assert_eq!(EventKind::BounceDropped.as_str(), "bounce_dropped");
        for bad in ["", "Bounce", "bounced", "transient-failure"] {
            assert!(bad.parse::<EventKind>().is_err(), "{bad:?}");
        }
        assert_eq!(EventKind::of(&serde_json::json!({"type": 3})), None);
    }

    #[test]
    fn spans_and_times_parse_and_nonsense_does_not() {
        let now = jiff::Timestamp::now();
        let hour_ago = parse_since("1h").expect("1h");
        let back = now.as_second() - hour_ago.as_second();
        assert!((3599..=3601).contains(&back), "{back}");
        assert!(parse_since("2026-12-01T09:00:00Z").is_some());
        for bad in [
            "1€",
            "€",
            "",
            "h",
            "-5h",
            "+5h",
            "5x",
            "99999999999999999999d",
            "9223372036854775807d",
        ] {
            assert!(parse_since(bad).is_none(), "{bad:?}");
        }
    }
}
