//! The event log: every reception, delivery, transient failure, bounce and expiration as one
//! JSON line in `data_dir/events/` (files rotated by size and age, `events.jsonl` the link to
//! the newest; see [`files`]).
//!
//! Producers call [`Events::emit`], which never blocks or wakes anyone; a writer thread wakes
//! every 20 ms, appends whatever arrived in one write, and fdatasyncs at most once a second (an
//! event is safe from a process crash within 20 ms, from a power cut within a second). Owns
//! that file, the webhooks' offsets and the metrics registry; it must not decide anything
//! about mail.
//!
//! - `writer`: the thread that appends to the log and rotates its files;
//! - `files`: the log's files, reading across them, retention;
//! - `read`: queries over the log (events, a message's history, statistics);
//! - `export`: following the log from a saved offset for a receiver off the node;
//! - `webhooks`: batches of events POSTed to receivers;
//! - `nats`: the events published to a NATS JetStream stream;
//! - `metrics`: the Prometheus counters and gauges.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

mod export;
pub mod files;
pub mod metrics;
pub mod nats;
mod read;
pub mod webhooks;
mod writer;

pub use read::{Filter, Received, history, parse_since, query, received, stats, stats_of_class};
pub use writer::{Events, LogOptions};

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
    /// On failures, complaints and automatic replies: the failure class (`invalid_recipient`,
    /// `reputation`, ...; see baton-bounce).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub class: Option<&'static str>,
    /// On failures: whether the address itself is bad.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hard: Option<bool>,
    /// True on what a report that came back later says (a DSN, a feedback report, an
    /// automatic reply, an unsubscribe), as opposed to a reply during the attempt.
    #[serde(rename = "async", skip_serializing_if = "Option::is_none")]
    pub is_async: Option<bool>,
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
    /// A recipient reported the message as spam (a feedback report came back).
    Complaint,
    /// An automatic reply (vacation, out of office) came back for a recipient.
    AutoReply,
    /// A recipient asked to be taken off the list (one-click, mailto or a feedback report).
    Unsubscribe,
    /// This node lost or regained the cluster's Redis (`[cluster]`): limits are local or
    /// shared again.
    Cluster,
}

impl EventKind {
    /// Every kind, in the order the documentation lists them.
    pub const ALL: [EventKind; 16] = [
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
        EventKind::Complaint,
        EventKind::AutoReply,
        EventKind::Unsubscribe,
        EventKind::Cluster,
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
            EventKind::Complaint => "complaint",
            EventKind::AutoReply => "auto_reply",
            EventKind::Unsubscribe => "unsubscribe",
            EventKind::Cluster => "cluster",
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
}
