//! What the queue holds and why: summary, explain, explain-destination, as typed replies.
//! Read-only: answers from the queue's state and the shaper's, changes nothing.

use std::collections::BTreeMap;

use baton_shaping::Suspendable;
use baton_spool::{QueueId, now_ms};

use super::{QueueManager, RcptMem, domain_of};
use crate::delivery::Destination;
use crate::operator::{
    ControlError, Counts, DestinationExplained, MessageExplained, RecipientExplained, Summary,
    SummaryRow,
};
use baton_spool::{Envelope, Recipient};

/// A summary row before it is shown: its counts and oldest arrival.
#[derive(Default)]
struct Row {
    counts: Counts,
    oldest_ms: u64,
}

impl QueueManager {
    /// Waiting recipients by (destination, pool): how many queued, deferred and out with a
    /// worker, and the oldest arrival.
    pub(super) fn summary(&self) -> Summary {
        let rows = self.summary_rows();
        let mut recipients = Counts::default();
        let destinations = rows
            .into_iter()
            .map(|((destination, pool), row)| {
                recipients += row.counts;
                let shaping = (!destination.contains(['[', ':', ' ']) && destination != "local")
                    .then(|| self.delivery.shaper.state_word(&destination));
                SummaryRow {
                    shaping,
                    destination,
                    pool: (!pool.is_empty()).then_some(pool),
                    counts: row.counts,
                    oldest_ms: row.oldest_ms,
                }
            })
            .collect();
        Summary {
            messages: self.messages.len(),
            recipients,
            destinations,
            recovering: self.recovering,
        }
    }

    /// The waiting recipients counted by (destination, pool).
    fn summary_rows(&self) -> BTreeMap<(String, String), Row> {
        let mut rows: BTreeMap<(String, String), Row> = BTreeMap::new();
        for q in self.messages.values() {
            let env = q.env.view();
            let pool = self
                .config
                .pool_for(&env)
                .map(|p| p.name.clone())
                .unwrap_or_default();
            for (i, r) in env.recipients.iter().enumerate() {
                if r.state.is_final() {
                    continue;
                }
                let domain = domain_of(&r.address);
                let dest = Destination::for_domain(&self.config, domain).to_string();
                let row = rows.entry((dest, pool.clone())).or_default();
                let counts = &mut row.counts;
                if q.rcpts.get(i).in_flight {
                    counts.active += 1;
                } else if env.meta.hold {
                    counts.held += 1;
                } else if r.state == baton_spool::RcptState::Deferred {
                    counts.deferred += 1;
                } else {
                    counts.queued += 1;
                }
                if row.oldest_ms == 0 || env.arrived_ms < row.oldest_ms {
                    row.oldest_ms = env.arrived_ms;
                }
            }
        }
        rows
    }

    /// The shaping state of a domain and the recipients waiting for it.
    pub(super) fn explain_destination(&self, domain: &str) -> DestinationExplained {
        let now = now_ms();
        let (mut waiting, mut in_flight, mut next) = (0usize, 0usize, None::<u64>);
        for q in self.messages.values() {
            for (i, r) in q.env.view().recipients.iter().enumerate() {
                let at = domain_of(&r.address);
                if r.state.is_final() || !at.eq_ignore_ascii_case(domain) {
                    continue;
                }
                if q.rcpts.get(i).in_flight {
                    in_flight += 1;
                } else {
                    waiting += 1;
                    let due = r.next_attempt_ms.max(now);
                    next = Some(next.map_or(due, |n: u64| n.min(due)));
                }
            }
        }
        DestinationExplained {
            destination: domain.to_string(),
            route: Destination::for_domain(&self.config, domain).to_string(),
            recipients_waiting: waiting,
            recipients_in_flight: in_flight,
            next_attempt_ms: next,
            shaping: self.delivery.shaper.describe(domain),
        }
    }

    /// Why each recipient of `id` is where it is, with the numbers.
    pub(super) fn explain(&self, id: QueueId) -> Result<MessageExplained, ControlError> {
        let Some(q) = self.messages.get(&id) else {
            return Err(ControlError::new(format!("no message {id} in the queue")));
        };
        let now = now_ms();
        let env = q.env.view();
        let pool = self.config.pool_for(&env).map(|p| p.name.clone());
        let recipients = env
            .recipients
            .iter()
            .enumerate()
            .map(|(i, r)| self.explain_recipient(&env, r, q.rcpts.get(i), pool.as_deref(), now))
            .collect();
        Ok(MessageExplained {
            id,
            sender: env.sender.clone(),
            tenant: env.meta.tenant.clone(),
            recipients,
        })
    }

    /// Recipient `r` of message `env` (of `pool`): its state, route and the reasons it waits.
    fn explain_recipient(
        &self,
        env: &Envelope,
        r: &Recipient,
        mem: RcptMem,
        pool: Option<&str>,
        now: u64,
    ) -> RecipientExplained {
        let domain = domain_of(&r.address);
        RecipientExplained {
            email: r.address.clone(),
            state: r.state.as_str().to_string(),
            attempts: mem.attempts,
            next_attempt_ms: (r.next_attempt_ms > 0).then_some(r.next_attempt_ms),
            in_flight: mem.in_flight,
            destination: Destination::for_domain(&self.config, domain).to_string(),
            pool: pool.map(str::to_string),
            reasons: self.reasons(env, r, mem, pool, now),
            shaping: self.delivery.shaper.describe(domain),
        }
    }

    /// Why recipient `r` of `env` is not being sent right now, in words.
    fn reasons(
        &self,
        env: &Envelope,
        r: &Recipient,
        mem: RcptMem,
        pool: Option<&str>,
        now: u64,
    ) -> Vec<String> {
        let mut reasons = Vec::new();
        if r.state.is_final() {
            reasons.push(format!("final: {}", r.state.as_str()));
        } else if mem.in_flight {
            reasons.push("out with a delivery worker now".to_string());
        } else if self.config.delivery.hold {
            reasons.push("the queue is on hold ([delivery] hold = true)".to_string());
        } else if r.next_attempt_ms > now {
            reasons.push(format!(
                "waiting for its next attempt in {} s",
                (r.next_attempt_ms - now) / 1000
            ));
        }
        if let Some(w) = &env.meta.window {
            reasons.push(format!("delivery window {w}"));
        }
        let suspended =
            |what: Suspendable| self.delivery.shaper.operator_suspension(&what).is_some();
        if let Some(t) = &env.meta.tenant
            && suspended(Suspendable::Tenant(t.clone()))
        {
            reasons.push(format!("tenant {t} is suspended by the operator"));
        }
        if let Some(p) = pool
            && suspended(Suspendable::Pool(p.to_string()))
        {
            reasons.push(format!("pool {p} is suspended by the operator"));
        }
        reasons
    }
}
