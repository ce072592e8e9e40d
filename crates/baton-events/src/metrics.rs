//! Prometheus metrics (the `metrics` facade and its Prometheus exporter), served at
//! `GET /metrics` on the HTTP listener:
//!
//! - `baton_messages_received_total{origin}`, `baton_recipients_received_total{origin}`
//! - `baton_recipients_total{outcome, destination, pool, class}`: outcome is delivered,
//!   deferred, bounced, expired or deleted; class the enhanced status class and subject ("4.7")
//! - `baton_queue_recipients`: recipients waiting (queued or deferred)
//! - `baton_connections{direction}`: open inbound SMTP sessions and outbound connections
//! - `baton_delivery_latency_seconds{destination}` histogram: reception to delivery
//! - `baton_message_size_bytes` histogram
//!
//! Destination labels are recipient domains: fine for the few hundred a sender mostly mails,
//! a cardinality to watch beyond that.
//!
//! Owns the names and the recorder; it decides nothing.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::EventKind;

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the recorder once per process; the handle renders the text format.
pub fn handle() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full("baton_delivery_latency_seconds".into()),
                    &[
                        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, 300.0, 3600.0,
                        86400.0,
                    ],
                )
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("baton_message_size_bytes".into()),
                        &[1e3, 4e3, 16e3, 64e3, 256e3, 1e6, 4e6, 16e6, 64e6],
                    )
                })
                .and_then(|b| b.install_recorder())
                .map_err(|e| tracing::warn!(error = %e, "metrics are off"))
                .ok()
        })
        .as_ref()
}

/// Running totals for the dashboard's history (the Prometheus recorder is write-only).
static RECEIVED: AtomicU64 = AtomicU64::new(0);
static DELIVERED: AtomicU64 = AtomicU64::new(0);
static BOUNCED: AtomicU64 = AtomicU64::new(0);
static DEPTH: AtomicI64 = AtomicI64::new(0);
static CONNECTIONS_IN: AtomicI64 = AtomicI64::new(0);
static CONNECTIONS_OUT: AtomicI64 = AtomicI64::new(0);

/// This process's running figures, for the cluster heartbeat.
#[derive(Debug, Clone, Copy, Default)]
pub struct Totals {
    pub received: u64,
    pub delivered: u64,
    pub bounced: u64,
    pub queue: u64,
    pub connections_in: u64,
    pub connections_out: u64,
}

pub fn totals() -> Totals {
    let positive = |a: &AtomicI64| a.load(Ordering::Relaxed).max(0) as u64;
    Totals {
        received: RECEIVED.load(Ordering::Relaxed),
        delivered: DELIVERED.load(Ordering::Relaxed),
        bounced: BOUNCED.load(Ordering::Relaxed),
        queue: positive(&DEPTH),
        connections_in: positive(&CONNECTIONS_IN),
        connections_out: positive(&CONNECTIONS_OUT),
    }
}

/// One sample every `SAMPLE_EVERY`, the last hour of them.
pub const SAMPLE_EVERY: std::time::Duration = std::time::Duration::from_secs(5);
const SAMPLES: usize = 720;
static HISTORY: Mutex<VecDeque<[i64; 5]>> = Mutex::new(VecDeque::new());

/// Records the totals now (called every `SAMPLE_EVERY` by the server).
pub fn sample() {
    let row = [
        jiff::Timestamp::now().as_millisecond(),
        RECEIVED.load(Ordering::Relaxed) as i64,
        DELIVERED.load(Ordering::Relaxed) as i64,
        BOUNCED.load(Ordering::Relaxed) as i64,
        DEPTH.load(Ordering::Relaxed),
    ];
    let mut h = HISTORY.lock().unwrap_or_else(|e| e.into_inner());
    if h.len() == SAMPLES {
        h.pop_front();
    }
    h.push_back(row);
}

/// The sampled history: times (Unix ms), cumulative received/delivered/bounced recipients, and
/// the queue depth, oldest first.
pub fn history() -> serde_json::Value {
    let h = HISTORY.lock().unwrap_or_else(|e| e.into_inner());
    let column = |i: usize| h.iter().map(|row| row[i]).collect::<Vec<_>>();
    serde_json::json!({
        "interval_s": SAMPLE_EVERY.as_secs(),
        "at_ms": column(0),
        "received": column(1),
        "delivered": column(2),
        "bounced": column(3),
        "depth": column(4),
    })
}

pub fn received(origin: &'static str, recipients: usize, size: u64) {
    RECEIVED.fetch_add(recipients as u64, Ordering::Relaxed);
    metrics::counter!("baton_messages_received_total", "origin" => origin).increment(1);
    metrics::counter!("baton_recipients_received_total", "origin" => origin)
        .increment(recipients as u64);
    metrics::histogram!("baton_message_size_bytes").record(size as f64);
}

/// The `outcome` label of a recipient's result, by the event it was logged as; none for
/// events that are no outcome.
pub fn outcome_label(kind: EventKind) -> Option<&'static str> {
    match kind {
        EventKind::Delivery => Some("delivered"),
        EventKind::TransientFailure => Some("deferred"),
        EventKind::Bounce => Some("bounced"),
        EventKind::Expiration => Some("expired"),
        EventKind::Deleted => Some("deleted"),
        _ => None,
    }
}

/// One recipient's attempt outcome (or operator's bounce or delete), by its event kind;
/// `bounce_class` is the failure's class ("" for a delivery).
pub fn outcome(
    kind: EventKind,
    destination: &str,
    pool: &str,
    status: &str,
    bounce_class: &'static str,
    latency_s: Option<f64>,
) {
    let Some(outcome) = outcome_label(kind) else {
        return;
    };
    match kind {
        EventKind::Delivery => DELIVERED.fetch_add(1, Ordering::Relaxed),
        EventKind::Bounce | EventKind::Expiration => BOUNCED.fetch_add(1, Ordering::Relaxed),
        _ => 0,
    };
    let class: String = status.split('.').take(2).collect::<Vec<_>>().join(".");
    metrics::counter!(
        "baton_recipients_total",
        "outcome" => outcome,
        "destination" => destination.to_string(),
        "pool" => pool.to_string(),
        "class" => class,
        "bounce_class" => bounce_class,
    )
    .increment(1);
    if let Some(seconds) = latency_s {
        metrics::histogram!("baton_delivery_latency_seconds", "destination" => destination.to_string())
            .record(seconds);
    }
}

/// Recipients entering (+) or leaving (−) the queue.
pub fn queue_depth(delta: i64) {
    DEPTH.fetch_add(delta, Ordering::Relaxed);
    let gauge = metrics::gauge!("baton_queue_recipients");
    if delta >= 0 {
        gauge.increment(delta as f64);
    } else {
        gauge.decrement((-delta) as f64);
    }
}

/// Whether this node reaches the cluster's Redis, and how many nodes it last saw alive.
pub fn cluster(up: bool, nodes: u32) {
    metrics::gauge!("baton_cluster_up").set(if up { 1.0 } else { 0.0 });
    metrics::gauge!("baton_cluster_nodes").set(f64::from(nodes));
}

pub fn connection(direction: &'static str, opened: bool) {
    let count = match direction {
        "inbound" => &CONNECTIONS_IN,
        _ => &CONNECTIONS_OUT,
    };
    count.fetch_add(if opened { 1 } else { -1 }, Ordering::Relaxed);
    let gauge = metrics::gauge!("baton_connections", "direction" => direction);
    if opened {
        gauge.increment(1.0);
    } else {
        gauge.decrement(1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcome_labels_follow_event_kinds() {
        let labels: Vec<_> = EventKind::ALL
            .into_iter()
            .filter_map(|k| outcome_label(k).map(|l| (k, l)))
            .collect();
        assert_eq!(
            labels,
            [
                (EventKind::Delivery, "delivered"),
                (EventKind::TransientFailure, "deferred"),
                (EventKind::Bounce, "bounced"),
                (EventKind::Expiration, "expired"),
                (EventKind::Deleted, "deleted"),
            ]
        );
    }
}
