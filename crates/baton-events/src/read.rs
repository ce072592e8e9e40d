//! Readers of the event log (the directory of its files): a page of events, one message's
//! history, statistics over a time span. They run on blocking threads. The log is appended in
//! time order, so a reader whose question starts at a time (and needs nothing from before it)
//! starts reading there ([`tail_since`]), instead of scanning the whole history; the others
//! scan from the oldest file kept.

use std::path::Path;

use crate::EventKind;
use crate::files::tail_since;

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
pub fn query(dir: &Path, filter: &Filter) -> serde_json::Value {
    // A campaign filter needs the receptions before `since`; a cursor, the line it names.
    let from = filter
        .since
        .filter(|_| filter.campaign.is_none() && filter.after.is_none());
    let text = tail_since(dir, from);
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
pub fn history(dir: &Path, message_id: &str) -> Option<serde_json::Value> {
    // A queue id carries its arrival time: nothing of the message is older than that.
    let arrived = message_id
        .parse::<baton_spool::QueueId>()
        .ok()
        .and_then(|id| jiff::Timestamp::from_millisecond(i64::try_from(id.0 >> 20).ok()?).ok());
    std::fs::metadata(dir).ok()?;
    if arrived.is_some()
        && let Some(found) = history_in(&tail_since(dir, arrived), message_id)
    {
        return Some(found);
    }
    // Not seen from its arrival on (a clock that stepped back, an id that is not Baton's):
    // the whole log.
    history_in(&tail_since(dir, None), message_id)
}

/// One recipient in [`history`].
struct Seen {
    email: String,
    state: &'static str,
    attempts: u64,
    response: Option<String>,
    /// The last failure's class.
    class: Option<String>,
    /// Reports that came back later: `bounce`, `complaint`, `auto_reply`, `unsubscribe`.
    reports: Vec<&'static str>,
}

/// What an event says of its recipient in [`history`]: its new state, and the report that
/// came back, if it is one; None for events that say neither.
type StateAndReport = (Option<&'static str>, Option<&'static str>);

fn seen_as(kind: EventKind, is_async: bool) -> Option<StateAndReport> {
    Some(match kind {
        EventKind::Reception | EventKind::Held => (Some("queued"), None),
        EventKind::TransientFailure if is_async => (None, Some("delay")),
        EventKind::TransientFailure => (Some("deferred"), None),
        EventKind::Delivery => (Some("delivered"), None),
        EventKind::Bounce if is_async => (Some("bounced"), Some("bounce")),
        EventKind::Bounce => (Some("bounced"), None),
        EventKind::Expiration => (Some("expired"), None),
        EventKind::Deleted => (Some("deleted"), None),
        EventKind::Complaint => (None, Some("complaint")),
        EventKind::AutoReply => (None, Some("auto_reply")),
        EventKind::Unsubscribe => (None, Some("unsubscribe")),
        _ => return None,
    })
}

/// [`history`] over the given part of the log.
fn history_in(text: &str, message_id: &str) -> Option<serde_json::Value> {
    let mut sender = None;
    // In order of first appearance.
    let mut recipients: Vec<Seen> = Vec::new();
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
        let Some(kind) = EventKind::of(&event) else {
            continue;
        };
        let is_async = event.get("async").and_then(|v| v.as_bool()) == Some(true);
        let Some((state, report)) = seen_as(kind, is_async) else {
            continue;
        };
        let email = field("recipient").to_string();
        let at = match recipients.iter().position(|r| r.email == email) {
            Some(i) => i,
            None => {
                recipients.push(Seen {
                    email,
                    state: "queued",
                    attempts: 0,
                    response: None,
                    class: None,
                    reports: Vec::new(),
                });
                recipients.len() - 1
            }
        };
        let r = &mut recipients[at];
        if let Some(state) = state {
            r.state = state;
        }
        r.reports.extend(report);
        if let Some(n) = event.get("attempt").and_then(|a| a.as_u64()) {
            r.attempts = r.attempts.max(n);
        }
        if let Some(response) = event.get("response").and_then(|v| v.as_str()) {
            r.response = Some(response.to_string());
        }
        if let Some(class) = event.get("class").and_then(|v| v.as_str()) {
            r.class = Some(class.to_string());
        }
    }
    let sender = sender?;
    let recipients: Vec<serde_json::Value> = recipients
        .into_iter()
        .map(|r| {
            let mut v = serde_json::json!({
                "email": r.email,
                "state": r.state,
                "attempts": r.attempts,
                "response": r.response,
            });
            if let Some(class) = r.class {
                v["class"] = class.into();
            }
            if !r.reports.is_empty() {
                v["reports"] = r.reports.into();
            }
            v
        })
        .collect();
    Some(serde_json::json!({"id": message_id, "sender": sender, "recipients": recipients}))
}

/// A message as its reception events logged it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub sender: String,
    /// In the envelope's order.
    pub recipients: Vec<String>,
    pub campaign: Option<String>,
    pub tenant: Option<String>,
}

/// How long after a message's queue id was made its reception events can be: its data was
/// still arriving (a large message on a slow link), then it was committed.
const RECEPTION_WINDOW: jiff::SignedDuration = jiff::SignedDuration::from_secs(3600);

/// The reception of `message_id`, from the log (none once retention has removed it). Reads
/// the log from the id's time for at most [`RECEPTION_WINDOW`], a line at a time: what a
/// report that comes back costs does not grow with the log.
pub fn received(dir: &Path, message_id: &str) -> Option<Received> {
    let arrived = message_id
        .parse::<baton_spool::QueueId>()
        .ok()
        .and_then(|id| jiff::Timestamp::from_millisecond(i64::try_from(id.0 >> 20).ok()?).ok())?;
    let end = arrived.checked_add(RECEPTION_WINDOW).ok()?;
    let mut found: Option<Received> = None;
    let mut seen = 0u64;
    crate::files::each_line_since(dir, arrived, |line| {
        seen += 1;
        // Now and then, whether the log has gone past the window.
        if seen.is_multiple_of(512) && stamp_of(line).is_some_and(|t| t > end) {
            return std::ops::ControlFlow::Break(());
        }
        if line.contains(message_id) {
            take_reception(line, message_id, &mut found);
        }
        std::ops::ControlFlow::Continue(())
    });
    found
}

/// An event line's timestamp.
fn stamp_of(line: &str) -> Option<jiff::Timestamp> {
    let rest = &line[line.find("\"timestamp\":\"")? + 13..];
    rest[..rest.find('"')?].parse().ok()
}

/// Adds a reception event of `message_id` in `line` to `found`.
fn take_reception(line: &str, message_id: &str, found: &mut Option<Received>) {
    let Ok(event) = serde_json::from_str::<serde_json::Value>(line) else {
        return;
    };
    let field = |name: &str| event.get(name).and_then(|v| v.as_str()).map(str::to_string);
    if EventKind::of(&event) != Some(EventKind::Reception)
        || field("message_id").as_deref() != Some(message_id)
    {
        return;
    }
    let r = found.get_or_insert_with(|| Received {
        sender: field("sender").unwrap_or_default(),
        recipients: Vec::new(),
        campaign: field("campaign"),
        tenant: field("tenant"),
    });
    if r.recipients.len() < 100_000 {
        r.recipients.push(field("recipient").unwrap_or_default());
    }
}

/// Delivery statistics over `[since, until)` from the event log, grouped by `by`
/// ("destination", "campaign", "tenant", "source" or "class"): attempts' outcomes, what came
/// back later (bounces, complaints, automatic replies, unsubscribes), the complaint rate and
/// delivery-latency percentiles (reception to delivery).
pub fn stats(
    dir: &Path,
    since: Option<jiff::Timestamp>,
    until: Option<jiff::Timestamp>,
    by: &str,
) -> serde_json::Value {
    stats_of_class(dir, since, until, by, None)
}

/// [`stats`], with the failures (deferrals, bounces, expiries) of failure class `class` only:
/// a class per destination, campaign or tenant. Deliveries are all counted (the rates'
/// denominators).
pub fn stats_of_class(
    dir: &Path,
    since: Option<jiff::Timestamp>,
    until: Option<jiff::Timestamp>,
    by: &str,
    class: Option<&str>,
) -> serde_json::Value {
    // Campaign and tenant come from the receptions, which may be older than `since`.
    let from = since.filter(|_| !matches!(by, "campaign" | "tenant"));
    let text = tail_since(dir, from);
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
        let counted = matches!(
            kind,
            EventKind::Delivery
                | EventKind::TransientFailure
                | EventKind::Bounce
                | EventKind::Expiration
                | EventKind::Complaint
                | EventKind::AutoReply
                | EventKind::Unsubscribe
        );
        let at = field("timestamp").parse::<jiff::Timestamp>().ok();
        let in_range = since.is_none_or(|s| at.is_some_and(|t| t >= s))
            && until.is_none_or(|u| at.is_some_and(|t| t < u));
        let other_class = class.is_some_and(|c| {
            !matches!(kind, EventKind::Delivery)
                && event.get("class").and_then(|v| v.as_str()) != Some(c)
        });
        if !counted || !in_range || other_class {
            continue;
        }
        let (campaign, tenant) = tags.get(field("message_id")).cloned().unwrap_or_default();
        let key = match by {
            "campaign" => campaign,
            "tenant" => tenant,
            _ => group_key(by, kind, &event),
        };
        let latency = event.get("latency_ms").and_then(|v| v.as_u64());
        let is_async = event.get("async").and_then(|v| v.as_bool()) == Some(true);
        groups
            .entry(key)
            .or_default()
            .count(kind, is_async, latency);
        total.count(kind, is_async, latency);
    }
    let groups: Vec<serde_json::Value> = groups
        .iter_mut()
        .map(|(key, g)| {
            let mut v = g.render();
            v["key"] = serde_json::Value::String(key.clone());
            v
        })
        .collect();
    let mut answer = serde_json::json!({"by": by, "total": total.render(), "groups": groups});
    if let Some(class) = class {
        answer["class"] = class.into();
    }
    answer
}

/// The group of an event by source, class or (any other `by`) recipient domain.
fn group_key(by: &str, kind: EventKind, event: &serde_json::Value) -> String {
    let field = |name: &str| event.get(name).and_then(|v| v.as_str()).unwrap_or("");
    match by {
        "source" => field("source").to_string(),
        "class" => match field("class") {
            "" if kind == EventKind::Delivery => "delivered".to_string(),
            "" => "uncategorized".to_string(),
            class => class.to_string(),
        },
        _ => field("recipient")
            .rsplit_once('@')
            .map(|(_, d)| d.to_ascii_lowercase())
            .unwrap_or_default(),
    }
}

/// One row of the statistics.
#[derive(Default)]
struct Group {
    delivered: u64,
    deferred: u64,
    bounced: u64,
    expired: u64,
    /// Bounces that came back after a delivery.
    async_bounced: u64,
    complaints: u64,
    auto_replies: u64,
    unsubscribes: u64,
    latencies: Vec<u64>,
}

impl Group {
    fn count(&mut self, kind: EventKind, is_async: bool, latency: Option<u64>) {
        match kind {
            EventKind::Delivery => {
                self.delivered += 1;
                self.latencies.extend(latency);
            }
            EventKind::TransientFailure if is_async => {}
            EventKind::TransientFailure => self.deferred += 1,
            EventKind::Bounce if is_async => self.async_bounced += 1,
            EventKind::Bounce => self.bounced += 1,
            EventKind::Complaint => self.complaints += 1,
            EventKind::AutoReply => self.auto_replies += 1,
            EventKind::Unsubscribe => self.unsubscribes += 1,
            _ => self.expired += 1,
        }
    }

    fn render(&mut self) -> serde_json::Value {
        self.latencies.sort_unstable();
        let latencies = &self.latencies;
        let pct = |p: f64| -> Option<u64> {
            let n = latencies.len();
            (n > 0).then(|| latencies[((n as f64 * p).ceil() as usize).clamp(1, n) - 1])
        };
        let finished = self.delivered + self.bounced + self.expired;
        let failed = self.bounced + self.expired;
        let bounce_rate = if finished > 0 {
            failed as f64 / finished as f64
        } else {
            0.0
        };
        let complaint_rate = if self.delivered > 0 {
            self.complaints as f64 / self.delivered as f64
        } else {
            0.0
        };
        serde_json::json!({
            "async_bounced": self.async_bounced,
            "complaints": self.complaints,
            "complaint_rate": complaint_rate,
            "auto_replies": self.auto_replies,
            "unsubscribes": self.unsubscribes,
            "delivered": self.delivered,
            "deferred": self.deferred,
            "bounced": self.bounced,
            "expired": self.expired,
            "bounce_rate": bounce_rate,
            "latency_ms": {"p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99)},
        })
    }
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
    fn a_message_history_starts_at_its_arrival() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let path = crate::files::prepare(dir.path()).unwrap().path;
        let mut f = std::fs::File::create(&path).unwrap();
        let t0 = "2026-12-01T00:00:00Z".parse::<jiff::Timestamp>().unwrap();
        let id_at = |at: jiff::Timestamp| format!("{:016X}", (at.as_millisecond() as u64) << 20);
        for i in 0..20_000i64 {
            let at = t0 + jiff::SignedDuration::from_secs(i * 10);
            let (id, rcpt) = (id_at(at), format!("r{i}@dest.test"));
            for kind in ["reception", "delivery"] {
                writeln!(
                    f,
                    r#"{{"type":"{kind}","timestamp":"{at}","message_id":"{id}","recipient":"{rcpt}","sender":"s@x.test","code":250}}"#
                )
                .unwrap();
            }
        }
        drop(f);
        let late = id_at(t0 + jiff::SignedDuration::from_secs(190_000));
        let h = history(dir.path(), &late).expect("found");
        assert_eq!(h["recipients"][0]["email"], "r19000@dest.test");
        assert_eq!(h["recipients"][0]["state"], "delivered");
        let early = id_at(t0);
        assert_eq!(
            history(dir.path(), &early).expect("found")["recipients"][0]["email"],
            "r0@dest.test"
        );
        assert!(history(dir.path(), "0000000000000001").is_none());
        assert!(history(&dir.path().join("none"), &early).is_none());
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
