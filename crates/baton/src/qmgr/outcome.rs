//! Outcomes: each recipient's outcome goes through the policy ([`policy::decide`]) and the
//! queue manager performs the decision: metrics, the greylisting source, the suppression list,
//! events, the in-memory state; then the DSNs and the spool records ([`QueueManager::after_attempt`]).
//!
//! Decides nothing itself (no states, no times, no notices): that is the policy's.

use baton_spool::{QueueId, RecipientUpdate, now_ms};

use super::{QueueManager, domain_of};
use crate::bounce::ReportedRecipient;
use crate::delivery::{JobReport, Outcome};
use crate::policy::{self, Decision, Notice, NoticeKind, Rcpt, Rules, Sticky};
use baton_events::EventKind;

/// A job's notices: one DSN per kind.
#[derive(Default)]
pub(super) struct Notices {
    failures: Vec<ReportedRecipient>,
    delays: Vec<ReportedRecipient>,
    successes: Vec<ReportedRecipient>,
}

impl Notices {
    pub(super) fn push(&mut self, notice: Notice) {
        match notice.kind {
            NoticeKind::Failure => self.failures.push(notice.recipient),
            NoticeKind::Delay => self.delays.push(notice.recipient),
            NoticeKind::Success => self.successes.push(notice.recipient),
        }
    }

    /// The DSNs to send, failures first.
    pub(super) fn into_batches(self) -> Vec<Vec<ReportedRecipient>> {
        [self.failures, self.delays, self.successes]
            .into_iter()
            .filter(|b| !b.is_empty())
            .collect()
    }
}

impl QueueManager {
    /// Applies one job's outcomes.
    pub(super) fn apply(&mut self, report: JobReport) {
        let (id, now) = (report.id, now_ms());
        let Some(q) = self.messages.get_mut(&id) else {
            return;
        };
        if let Some(work) = &mut q.work {
            work.jobs_out = work.jobs_out.saturating_sub(1);
        }
        let mut updates = Vec::with_capacity(report.outcomes.len());
        let mut notices = Notices::default();
        for outcome in &report.outcomes {
            if let Some(decision) = self.decide(id, outcome, now) {
                let i = outcome.rcpt as usize;
                updates.extend(self.perform(id, i, decision, None, &mut notices));
            }
        }
        self.after_attempt(id, updates, notices);
    }

    /// The policy's decision on one outcome; the recipient is no longer out with a worker.
    fn decide(&mut self, id: QueueId, outcome: &Outcome, now: u64) -> Option<Decision> {
        let i = outcome.rcpt as usize;
        let q = self.messages.get_mut(&id)?;
        let env = q.env.open();
        let recipient = env.recipients.get(i)?;
        let mem = q.rcpts.get_mut(i, env.recipients.len())?;
        mem.in_flight = false;
        let rcpt = Rcpt {
            recipient,
            attempts: mem.attempts,
            arrived_ms: env.arrived_ms,
            size: env.size,
        };
        let domain = domain_of(&recipient.address);
        let rules = Rules {
            delivery: &self.config.delivery,
            retry_interval: self.delivery.shaper.domain_rule(domain).retry_interval,
            bounce_rules: self.config.bounces.rules.as_deref(),
        };
        Some(policy::decide(&rcpt, outcome, now, &rules))
    }

    /// Carries out a decision on recipient `i` of message `id`: metrics, greylisting source,
    /// suppression, events and the in-memory state; its notice joins `notices`. Returns the
    /// update to record. The metric is labelled by the recipient's domain and the message's
    /// pool, or by `operator_domain` (what an operator's command named) and no pool.
    pub(super) fn perform(
        &mut self,
        id: QueueId,
        i: usize,
        decision: Decision,
        operator_domain: Option<&str>,
        notices: &mut Notices,
    ) -> Option<RecipientUpdate> {
        let q = self.messages.get_mut(&id)?;
        let env = q.env.open();
        let rcpt = env.recipients.get(i)?;
        if let Some(m) = &decision.metric {
            let (domain, pool) = match operator_domain {
                Some(domain) => (domain, ""),
                None => {
                    let pool = self.config.pool_for(env).map(|p| p.name.as_str());
                    (domain_of(&rcpt.address), pool.unwrap_or(""))
                }
            };
            let class = m.class.map_or("", |c| c.as_str());
            baton_events::metrics::outcome(m.kind, domain, pool, &m.status, class, m.latency_s);
            if decision.state.is_final() {
                baton_events::metrics::queue_depth(-1);
                let _ = self.queued.fetch_update(
                    std::sync::atomic::Ordering::Relaxed,
                    std::sync::atomic::Ordering::Relaxed,
                    |n| Some(n.saturating_sub(1)),
                );
            }
        }
        let ctx = SuppressionContext {
            suppressions: &self.suppressions,
            events: &self.events,
            bounces: &self.config.bounces,
        };
        ctx.after(id, &rcpt.address, &env.sender, &decision);
        match decision.sticky {
            Sticky::Keep => {}
            Sticky::Pin(source) => {
                let sticky = &mut q.work.get_or_insert_default().sticky;
                sticky.retain(|(r, _)| *r != i as u32);
                sticky.push((i as u32, source));
            }
            Sticky::Clear => {
                if let Some(work) = &mut q.work {
                    work.sticky.retain(|(r, _)| *r != i as u32);
                }
            }
        }
        if let Some(notice) = decision.notice {
            notices.push(notice);
        }
        let (sender, address) = (&env.sender, &rcpt.address);
        super::emit(&self.events, decision.event, id, address, sender);
        let update = RecipientUpdate {
            id,
            rcpt: i as u32,
            state: decision.state,
            attempt: decision.attempt,
            next_attempt_ms: decision.next_attempt_ms,
            delay_notified: decision.delay_notified,
        };
        update.apply(env);
        if update.attempt.is_some() {
            // The attempt history lives in the spool only; memory keeps the count.
            if let Some(r) = env.recipients.get_mut(i) {
                r.attempts.clear();
            }
            let n = env.recipients.len();
            if let Some(m) = q.rcpts.get_mut(i, n) {
                m.attempts = m.attempts.saturating_add(1);
            }
        }
        Some(update)
    }

    /// After a job's outcomes: send the DSNs they call for, then record the recipients' new
    /// states; once no job of the message is out, schedule what is deferred and remove the
    /// message if every recipient is final.
    ///
    /// A notice is as durable as the state it reports: the DSN is committed before the states
    /// that caused it are recorded (a crash in between repeats a notice rather than losing one),
    /// and it goes at once, not when the message's slowest destination has answered. The loop
    /// does not wait for the commit: `record` holds the states back until it is done (see
    /// `dsn.rs`).
    pub(super) fn after_attempt(
        &mut self,
        id: QueueId,
        updates: Vec<RecipientUpdate>,
        notices: Notices,
    ) {
        self.send_notices(id, notices);
        if self.messages.get(&id).is_some_and(|q| q.jobs_out() == 0) {
            // Whatever waits for a retry waits packed, without its body or job: the next
            // attempt reads the body from the spool.
            self.dispatch(id);
        }
        let done = self.take_if_done(id);
        self.record(id, updates, done);
    }

    /// Forgets the message if every recipient is final; true if it did. Not while a DSN of
    /// it is being committed: if that fails, its recipients are tried again.
    pub(super) fn take_if_done(&mut self, id: QueueId) -> bool {
        let done = !self.outbox.holds(id)
            && self.messages.get(&id).is_some_and(|q| {
                q.jobs_out() == 0 && q.env.view().recipients.iter().all(|r| r.state.is_final())
            });
        if done {
            self.messages.remove(&id);
        }
        done
    }

    pub(super) fn finish_if_done(&mut self, id: QueueId) {
        if self.take_if_done(id) {
            self.record(id, Vec::new(), true);
        }
    }
}

/// What suppressing an address after an outcome needs.
struct SuppressionContext<'a> {
    suppressions: &'a crate::suppression::Suppressions,
    events: &'a baton_events::Events,
    bounces: &'a crate::config::BouncesConfig,
}

impl SuppressionContext<'_> {
    /// Suppresses the address (globally) after a hard bounce, or once its mailbox soft
    /// bounces reach `[bounces] soft_bounce_limit`; a `suppression` event if it was not there.
    fn after(&self, id: QueueId, address: &str, sender: &str, decision: &Decision) {
        let soft_limit_reached = || {
            decision.soft_bounce
                && self.suppressions.soft_bounce(
                    address,
                    now_ms(),
                    self.bounces.soft_bounce_limit,
                    self.bounces.soft_bounce_window.as_millis() as u64,
                )
        };
        let suppress = match &decision.suppress {
            Some(s) => Some((s.class.as_str(), Some(s.detail.clone()))),
            None if soft_limit_reached() => Some(("soft_bounces", decision.event.response.clone())),
            None => None,
        };
        let Some((reason, detail)) = suppress else {
            return;
        };
        let mut entry =
            crate::suppression::Entry::new(address, &crate::suppression::Scope::Global, reason);
        entry.detail = detail;
        entry.source = Some(id.to_string());
        if self.suppressions.insert(entry) {
            let mut s =
                self.events
                    .new_event(EventKind::Suppression, &id.to_string(), address, sender);
            s.status = decision.event.status.clone();
            s.class = decision.event.class.map(|c| c.as_str());
            s.response = Some(format!("added to the suppression list: {reason}"));
            self.events.emit(s);
        }
    }
}
