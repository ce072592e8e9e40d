//! Operator commands: suspend, resume, hold, release, bounce, delete, rebind, flush; the
//! answers to summary and explain are in `explain.rs`.
//!
//! Changes the queue only through the policy (`policy::released`, `policy::operator_final`)
//! and `perform`/`record`; must not change the `Control` requests or their answers' JSON.

use std::time::Duration;

use baton_spool::{QueueId, now_ms};
use serde_json::{Value, json};
use tokio::sync::oneshot;

use super::outcome::Notices;
use super::{Control, QueueManager};
use crate::policy;
use baton_events::EventKind;

impl QueueManager {
    /// Runs an operator's request and sends the answer (a suspension's once it is saved).
    pub(super) fn handle_control(&mut self, request: Control, reply: oneshot::Sender<Value>) {
        let answer = match request {
            Control::Suspend {
                destination,
                seconds,
            } => return self.suspend(destination, seconds, reply),
            Control::Resume { destination } => return self.resume(destination, reply),
            Control::Explain { id } => match id.parse::<QueueId>() {
                Ok(qid) => self.explain(qid),
                Err(e) => json!({"error": e}),
            },
            Control::ExplainDestination { destination } => self.explain_destination(&destination),
            Control::Bounce { destination } | Control::Delete { destination }
                if destination.is_empty() || destination.contains(':') =>
            {
                json!({"error": format!("bounce and delete take a domain, not {destination:?}")})
            }
            Control::Rebind { from, to } => self.rebind(&from, &to),
            Control::Bounce { destination } => {
                let n = self.operator_final(&destination, true);
                json!({"ok": true, "destination": destination, "bounced": n})
            }
            Control::Delete { destination } => {
                let n = self.operator_final(&destination, false);
                json!({"ok": true, "destination": destination, "deleted": n})
            }
            Control::Flush { destination } => self.flush(destination),
            Control::Summary => self.summary(),
            Control::Hold { id } => self.set_hold(&id, true),
            Control::Release { id } => self.set_hold(&id, false),
        };
        let _ = reply.send(answer);
    }

    fn suspend(
        &mut self,
        destination: String,
        seconds: Option<u64>,
        reply: oneshot::Sender<Value>,
    ) {
        let secs = match suspension_seconds(seconds) {
            Ok(secs) => secs,
            Err(why) => {
                let _ = reply.send(json!({ "error": why }));
                return;
            }
        };
        self.delivery
            .shaper
            .operator_suspend(&destination, Duration::from_secs(secs));
        let answer = json!({"ok": true, "destination": destination, "seconds": secs});
        self.save_operator_state((reply, answer));
        self.shaping_event(
            &destination,
            format!("suspended by the operator for {secs} s"),
        );
    }

    fn resume(&mut self, destination: String, reply: oneshot::Sender<Value>) {
        self.delivery.shaper.operator_resume(&destination);
        let answer = json!({"ok": true, "destination": destination});
        self.save_operator_state((reply, answer));
        self.shaping_event(&destination, "resumed by the operator".into());
        // Whatever waits for the destination may go now.
        let ids: Vec<QueueId> = self.messages.keys().copied().collect();
        for id in &ids {
            self.release(*id, &destination);
        }
    }

    /// Moves the queued mail of pool `from` to pool `to`.
    fn rebind(&mut self, from: &str, to: &str) -> Value {
        if !self.config.pools.iter().any(|p| p.name == to) {
            return json!({"error": format!("no [[pool]] named {to:?}")});
        }
        let mut moved = 0;
        let ids: Vec<QueueId> = self.messages.keys().copied().collect();
        for id in ids {
            let Some(q) = self.messages.get_mut(&id) else {
                continue;
            };
            if self.config.pool_for(&q.envelope).map(|p| p.name.as_str()) != Some(from) {
                continue;
            }
            q.envelope.meta.pool = Some(to.to_string());
            if let Err(e) = self.spool.record_meta(id, &q.envelope.meta) {
                tracing::error!(id = %id, error = %e, "cannot record a rebind");
            }
            moved += 1;
            self.release(id, "");
        }
        self.shaping_event(
            &format!("pool:{from}"),
            format!("{moved} messages rebound to pool {to}"),
        );
        json!({"ok": true, "from": from, "to": to, "messages": moved})
    }

    /// Makes every waiting recipient (at one domain, or all) due now.
    fn flush(&mut self, destination: Option<String>) -> Value {
        let domain = destination.unwrap_or_default().to_ascii_lowercase();
        let ids: Vec<QueueId> = self.messages.keys().copied().collect();
        let mut flushed = 0;
        for id in ids {
            flushed += self.release(id, &domain);
        }
        json!({"ok": true, "destination": domain, "flushed": flushed})
    }

    /// Holds or releases one message, or all ("ALL"); the flag is a spool meta record.
    fn set_hold(&mut self, id: &str, hold: bool) -> Value {
        let ids: Vec<QueueId> = if id.eq_ignore_ascii_case("all") {
            self.messages.keys().copied().collect()
        } else {
            match id.parse::<QueueId>() {
                Ok(qid) if self.messages.contains_key(&qid) => vec![qid],
                Ok(qid) => return json!({"error": format!("no message {qid} in the queue")}),
                Err(e) => return json!({"error": e}),
            }
        };
        let mut changed = 0;
        for qid in ids {
            let Some(q) = self.messages.get_mut(&qid) else {
                continue;
            };
            if q.envelope.meta.hold == hold {
                continue;
            }
            q.envelope.meta.hold = hold;
            for r in q.envelope.recipients.iter().filter(|r| !r.state.is_final()) {
                let mut e = self.events.new_event(
                    EventKind::Operator,
                    &qid.to_string(),
                    &r.address,
                    &q.envelope.sender,
                );
                e.response = Some(
                    if hold {
                        "held by the operator"
                    } else {
                        "released by the operator"
                    }
                    .into(),
                );
                self.events.emit(e);
            }
            if let Err(e) = self.spool.record_meta(qid, &q.envelope.meta) {
                tracing::error!(id = %qid, error = %e, "cannot record a hold");
            }
            changed += 1;
            if !hold {
                self.release(qid, "");
            }
        }
        let key = if hold { "held" } else { "released" };
        json!({"ok": true, key: changed})
    }

    /// Saves the operator's suspensions off the loop, then answers.
    fn save_operator_state(&self, answer: super::operator_state::Answer) {
        let snapshot = self.delivery.shaper.operator_snapshot();
        self.operator_state.save(snapshot, Some(answer));
    }

    fn shaping_event(&self, destination: &str, what: String) {
        tracing::info!(destination, "{what}");
        let mut e = self.events.new_event(EventKind::Shaping, "", "", "");
        e.destination = Some(destination.to_string());
        e.response = Some(what);
        self.events.emit(e);
    }

    /// Recipients at `domain` (every domain when empty), not out with a worker, of message `id`.
    fn waiting_at(&self, id: QueueId, domain: &str) -> Vec<u32> {
        let Some(q) = self.messages.get(&id) else {
            return Vec::new();
        };
        q.envelope
            .recipients
            .iter()
            .enumerate()
            .filter(|(i, r)| {
                !r.state.is_final()
                    && !q.in_flight[*i]
                    && (domain.is_empty()
                        || r.address
                            .rsplit_once('@')
                            .is_some_and(|(_, d)| d.eq_ignore_ascii_case(domain)))
            })
            .map(|(i, _)| i as u32)
            .collect()
    }

    /// Makes the waiting recipients of message `id` that `target` names due now (after a
    /// resume, flush, release or rebind): a domain, "tenant:NAME" or "pool:NAME" (the message's
    /// recipients if it is that tenant's or in that pool), or "" (all of them). Never earlier
    /// than the message's send-at time (its delivery window is kept by `dispatch`). Returns how
    /// many recipients it made due.
    pub(super) fn release(&mut self, id: QueueId, target: &str) -> usize {
        let Some(q) = self.messages.get(&id) else {
            return 0;
        };
        let named =
            |value: Option<&str>, name: &str| value.is_some_and(|v| v.eq_ignore_ascii_case(name));
        let (kind, name) = target.split_once(':').unwrap_or(("", ""));
        let domain = if kind.eq_ignore_ascii_case("tenant") {
            if !named(q.envelope.meta.tenant.as_deref(), name) {
                return 0;
            }
            ""
        } else if kind.eq_ignore_ascii_case("pool") {
            let pool = self.config.pool_for(&q.envelope).map(|p| p.name.as_str());
            if !named(pool, name) {
                return 0;
            }
            ""
        } else {
            // A domain (an address literal such as [IPv6:...] has colons too), or "" for all.
            target
        };
        let rcpts = self.waiting_at(id, domain);
        let Some(q) = self.messages.get_mut(&id) else {
            return 0;
        };
        let send_at = policy::send_at_ms(q.envelope.meta.send_at_ms);
        let now = now_ms();
        let mut released = 0;
        for &i in &rcpts {
            if let Some(r) = q.envelope.recipients.get_mut(i as usize) {
                r.next_attempt_ms = policy::released(r.next_attempt_ms, send_at);
                released += usize::from(r.next_attempt_ms <= now);
            }
        }
        if !rcpts.is_empty() {
            self.dispatch(id);
        }
        released
    }

    /// Bounces (with a DSN) or deletes every waiting recipient at `domain`; returns how many.
    /// `target` is a domain, or a queue id for one message's waiting recipients (postsuper -d).
    fn operator_final(&mut self, target: &str, bounce: bool) -> usize {
        let (ids, domain): (Vec<QueueId>, &str) = match target.parse::<QueueId>() {
            Ok(id) if self.messages.contains_key(&id) => (vec![id], ""),
            _ => (self.messages.keys().copied().collect(), target),
        };
        let mut total = 0;
        let now = now_ms();
        for id in ids {
            let rcpts = self.waiting_at(id, domain);
            if rcpts.is_empty() {
                continue;
            }
            total += rcpts.len();
            let mut updates = Vec::new();
            let mut notices = Notices::default();
            for &i in &rcpts {
                let Some(r) = self
                    .messages
                    .get(&id)
                    .and_then(|q| q.envelope.recipients.get(i as usize))
                else {
                    continue;
                };
                let decision = policy::operator_final(r, bounce, now);
                let update = self.perform(id, i as usize, decision, Some(domain), &mut notices);
                updates.extend(update);
            }
            self.send_notices(id, notices);
            let done = self.take_if_done(id);
            self.record(id, updates, done);
        }
        total
    }
}

/// The longest operator suspension: a year (longer is a typo, or an attack on the timer).
pub const MAX_SUSPENSION_SECS: u64 = 365 * 86400;

/// An operator's suspension length, checked: 1 s to a year; none means a day.
pub fn suspension_seconds(seconds: Option<u64>) -> Result<u64, String> {
    match seconds {
        None => Ok(86400),
        Some(s) if (1..=MAX_SUSPENSION_SECS).contains(&s) => Ok(s),
        Some(s) => Err(format!(
            "seconds {s}: a suspension lasts from 1 to {MAX_SUSPENSION_SECS} seconds (a year)"
        )),
    }
}
