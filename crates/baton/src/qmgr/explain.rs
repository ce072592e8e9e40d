//! What the queue holds and why: summary, explain, explain-destination. Read-only: answers
//! from the queue's state and the shaper's, changes nothing.

use baton_spool::{QueueId, now_ms};

use super::{QueueManager, domain_of};
use crate::delivery::Destination;

impl QueueManager {
    /// Waiting recipients by (destination, pool): how many queued, deferred and out with a
    /// worker, and the oldest arrival.
    pub(super) fn summary(&self) -> serde_json::Value {
        use serde_json::json;
        use std::collections::BTreeMap;
        #[derive(Default, serde::Serialize)]
        struct Row {
            queued: usize,
            deferred: usize,
            active: usize,
            held: usize,
            oldest_ms: u64,
        }
        let mut rows: BTreeMap<(String, String), Row> = BTreeMap::new();
        let mut messages = 0;
        for q in self.messages.values() {
            messages += 1;
            let pool = self
                .config
                .pool_for(&q.envelope)
                .map(|p| p.name.clone())
                .unwrap_or_default();
            for (i, r) in q.envelope.recipients.iter().enumerate() {
                if r.state.is_final() {
                    continue;
                }
                let domain = domain_of(&r.address);
                let dest = Destination::for_domain(&self.config, domain).to_string();
                let row = rows.entry((dest, pool.clone())).or_default();
                if q.in_flight[i] {
                    row.active += 1;
                } else if q.envelope.meta.hold {
                    row.held += 1;
                } else if r.state == baton_spool::RcptState::Deferred {
                    row.deferred += 1;
                } else {
                    row.queued += 1;
                }
                if row.oldest_ms == 0 || q.envelope.arrived_ms < row.oldest_ms {
                    row.oldest_ms = q.envelope.arrived_ms;
                }
            }
        }
        let (mut queued, mut deferred, mut active, mut held) = (0, 0, 0, 0);
        let destinations: Vec<serde_json::Value> = rows
            .into_iter()
            .map(|((destination, pool), row)| {
                queued += row.queued;
                deferred += row.deferred;
                active += row.active;
                held += row.held;
                let shaping = (!destination.contains(['[', ':', ' ']) && destination != "local")
                    .then(|| self.delivery.shaper.state_word(&destination));
                json!({
                    "shaping": shaping,
                    "destination": destination,
                    "pool": (!pool.is_empty()).then_some(pool),
                    "queued": row.queued,
                    "deferred": row.deferred,
                    "active": row.active,
                    "held": row.held,
                    "oldest_ms": row.oldest_ms,
                })
            })
            .collect();
        json!({
            "messages": messages,
            "recipients": {"queued": queued, "deferred": deferred, "active": active, "held": held},
            "destinations": destinations,
        })
    }

    /// The shaping state of a domain and the recipients waiting for it.
    pub(super) fn explain_destination(&self, domain: &str) -> serde_json::Value {
        let now = now_ms();
        let (mut waiting, mut in_flight, mut next) = (0usize, 0usize, None::<u64>);
        for q in self.messages.values() {
            for (i, r) in q.envelope.recipients.iter().enumerate() {
                let at = domain_of(&r.address);
                if r.state.is_final() || !at.eq_ignore_ascii_case(domain) {
                    continue;
                }
                if q.in_flight[i] {
                    in_flight += 1;
                } else {
                    waiting += 1;
                    let due = r.next_attempt_ms.max(now);
                    next = Some(next.map_or(due, |n: u64| n.min(due)));
                }
            }
        }
        serde_json::json!({
            "destination": domain,
            "route": Destination::for_domain(&self.config, domain).to_string(),
            "recipients_waiting": waiting,
            "recipients_in_flight": in_flight,
            "next_attempt_ms": next,
            "shaping": self.delivery.shaper.describe(domain),
        })
    }

    /// Why each recipient of `id` is where it is, with the numbers.
    pub(super) fn explain(&self, id: QueueId) -> serde_json::Value {
        use serde_json::json;
        let Some(q) = self.messages.get(&id) else {
            return json!({"error": format!("no message {id} in the queue")});
        };
        let now = now_ms();
        let window = q.envelope.meta.window.clone();
        let pool = self.config.pool_for(&q.envelope).map(|p| p.name.clone());
        let tenant = q.envelope.meta.tenant.clone();
        let recipients: Vec<_> = q
            .envelope
            .recipients
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let domain = domain_of(&r.address);
                let dest = Destination::for_domain(&self.config, domain);
                let mut reasons = Vec::new();
                if r.state.is_final() {
                    reasons.push(format!("final: {}", r.state.as_str()));
                } else if q.in_flight[i] {
                    reasons.push("out with a delivery worker now".to_string());
                } else if self.config.delivery.hold {
                    reasons.push("the queue is on hold ([delivery] hold = true)".to_string());
                } else if r.next_attempt_ms > now {
                    reasons.push(format!(
                        "waiting for its next attempt in {} s",
                        (r.next_attempt_ms - now) / 1000
                    ));
                }
                if let Some(w) = &window {
                    reasons.push(format!("delivery window {w}"));
                }
                if let Some(t) = &tenant
                    && self
                        .delivery
                        .shaper
                        .operator_suspended_key(&format!("tenant:{t}"))
                        .is_some()
                {
                    reasons.push(format!("tenant {t} is suspended by the operator"));
                }
                if let Some(p) = &pool
                    && self
                        .delivery
                        .shaper
                        .operator_suspended_key(&format!("pool:{p}"))
                        .is_some()
                {
                    reasons.push(format!("pool {p} is suspended by the operator"));
                }
                let shaping = self.delivery.shaper.describe(domain);
                json!({
                    "email": r.address,
                    "state": r.state.as_str(),
                    "attempts": q.attempts.get(i).copied().unwrap_or(0),
                    "next_attempt_ms": (r.next_attempt_ms > 0).then_some(r.next_attempt_ms),
                    "in_flight": q.in_flight[i],
                    "destination": dest.to_string(),
                    "pool": pool,
                    "reasons": reasons,
                    "shaping": shaping,
                })
            })
            .collect();
        json!({
            "id": id.to_string(),
            "sender": q.envelope.sender,
            "tenant": tenant,
            "recipients": recipients,
        })
    }
}
