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

/// [`history`] over the given part of the log.
fn history_in(text: &str, message_id: &str) -> Option<serde_json::Value> {
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
    dir: &Path,
    since: Option<jiff::Timestamp>,
    until: Option<jiff::Timestamp>,
    by: &str,
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
        );
        let at = field("timestamp").parse::<jiff::Timestamp>().ok();
        let in_range = since.is_none_or(|s| at.is_some_and(|t| t >= s))
            && until.is_none_or(|u| at.is_some_and(|t| t < u));
        if !counted || !in_range {
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
        groups.entry(key).or_default().count(kind, latency);
        total.count(kind, latency);
    }
    let groups: Vec<serde_json::Value> = groups
        .iter_mut()
        .map(|(key, g)| {
            let mut v = g.render();
            v["key"] = serde_json::Value::String(key.clone());
            v
        })
        .collect();
    serde_json::json!({"by": by, "total": total.render(), "groups": groups})
}

/// One row of the statistics.
#[derive(Default)]
struct Group {
    delivered: u64,
    deferred: u64,
    bounced: u64,
    expired: u64,
    latencies: Vec<u64>,
}

impl Group {
    fn count(&mut self, kind: EventKind, latency: Option<u64>) {
        match kind {
            EventKind::Delivery => {
                self.delivered += 1;
                self.latencies.extend(latency);
            }
            EventKind::TransientFailure => self.deferred += 1,
            EventKind::Bounce => self.bounced += 1,
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
        serde_json::json!({
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
