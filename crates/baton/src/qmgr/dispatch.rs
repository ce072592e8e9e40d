//! Dispatch: a message's due recipients go to their destinations' ready queues, the others
//! to the timer heap. When each is due is the policy's ([`MessageClock`]); this only sorts and
//! hands out jobs.

use std::cmp::Reverse;
use std::collections::HashMap;
use std::sync::Arc;

use baton_spool::{QueueId, RecipientUpdate, now_ms};
use bytes::Bytes;

use super::{QueueManager, domain_of};
use crate::config::Pool;
use crate::delivery::{DestQueue, Destination, Job, JobReport, Outcome};
use crate::policy::{Due, MessageClock};
use baton_client::Reply;

/// Due recipients by destination and the source a greylisted retry must leave from.
type Groups = HashMap<(Destination, Option<String>), Vec<u32>>;

impl QueueManager {
    /// Sends every recipient of `id` that is due to its destination's ready queue; wakes the
    /// message again when the next of the others is due.
    pub(super) fn dispatch(&mut self, id: QueueId) {
        self.dispatch_with(id, None);
    }

    /// [`QueueManager::dispatch`], with the body when it is at hand (a message just received).
    /// A message left with no job out waits packed.
    pub(super) fn dispatch_with(&mut self, id: QueueId, body: Option<Bytes>) {
        self.dispatch_due(id, body);
        self.settle(id);
    }

    /// See [`super::Queued::settle`].
    pub(super) fn settle(&mut self, id: QueueId) {
        if let Some(q) = self.messages.get_mut(&id) {
            q.settle();
        }
    }

    fn dispatch_due(&mut self, id: QueueId, body: Option<Bytes>) {
        if self.config.delivery.hold {
            return;
        }
        let now = now_ms();
        let Some(q) = self.messages.get_mut(&id) else {
            return;
        };
        let env = q.env.open();
        let n = env.recipients.len();
        if env.meta.hold {
            return; // released by the operator, not by time
        }
        let window = env
            .meta
            .window
            .as_deref()
            .and_then(|w| crate::schedule::Window::parse(w).ok());
        let clock = MessageClock::new(&self.config.delivery, env.arrived_ms, window.as_ref(), now);
        let mut groups = Groups::new();
        let (mut next_due, mut held, mut expired) = (None::<u64>, Vec::new(), Vec::new());
        for (i, r) in env.recipients.iter_mut().enumerate() {
            if r.state.is_final() || q.rcpts.get(i).in_flight {
                continue;
            }
            match clock.due(r.next_attempt_ms, now) {
                Due::Expired => expired.push(i as u32),
                Due::Wait { until, wake, moved } => {
                    if moved {
                        r.next_attempt_ms = until;
                        held.push(RecipientUpdate {
                            id,
                            rcpt: i as u32,
                            state: r.state,
                            attempt: None,
                            next_attempt_ms: until,
                            delay_notified: false,
                        });
                    }
                    next_due = Some(next_due.map_or(wake, |d| d.min(wake)));
                }
                Due::Now => {
                    let dest = Destination::for_domain(&self.config, domain_of(&r.address));
                    let sticky = super::sticky_source(&q.work, i as u32);
                    groups.entry((dest, sticky)).or_default().push(i as u32);
                }
            }
        }
        if let Some(due) = next_due {
            self.timers.push(Reverse((due, id)));
        }
        if !expired.is_empty() {
            // Reported as the outcome of an attempt, so that expiry takes its one path
            // (event, metrics, DSN, spool record) in `apply`.
            for &i in &expired {
                if let Some(m) = q.rcpts.get_mut(i as usize, n) {
                    m.in_flight = true;
                }
            }
            q.work.get_or_insert_default().jobs_out += 1;
            let _ = self.delivery.reports.send(expired_unattempted(id, expired));
        }
        if !held.is_empty() {
            self.record(id, held, false);
        }
        self.send_jobs(id, groups, body);
        if self.messages.get(&id).is_some_and(|q| q.jobs_out() == 0) && next_due.is_none() {
            // Nothing left to try (all final): the message may have arrived that way.
            self.finish_if_done(id);
        }
    }

    /// Hands the due recipients to their destinations' ready queues, a job per transaction.
    fn send_jobs(&mut self, id: QueueId, groups: Groups, body: Option<Bytes>) {
        if groups.is_empty() {
            return;
        }
        let Some(q) = self.messages.get_mut(&id) else {
            return;
        };
        let max_workers = self.config.delivery.max_connections_per_destination;
        let env = q.env.open();
        let n = env.recipients.len();
        let pool = self.config.pool_for(env).cloned();
        let work = q.work.get_or_insert_default();
        let return_domain = self
            .config
            .bounces
            .return_domain(env, pool.as_ref().map(|p| p.name.as_str()))
            .map(str::to_string);
        let job = work
            .job
            .get_or_insert_with(|| {
                Arc::new(super::job_message(env, q.location, body, return_domain))
            })
            .clone();
        for ((dest, sticky), rcpts) in groups {
            // Local delivery binds to no source; a greylisted retry binds to its first source.
            let pool = pool
                .clone()
                .filter(|_| dest != Destination::Local)
                .map(|p| match &sticky {
                    Some(name) => pinned(&p, name),
                    None => p,
                });
            let per_tx = match &dest {
                Destination::Mx(domain) => self.delivery.shaper.domain_rule(domain).max_recipients,
                _ => None,
            }
            .unwrap_or(self.config.delivery.max_recipients_per_transaction);
            // Each recipient has its own return path: one per transaction.
            let per_tx = if job.return_domain.is_some() {
                1
            } else {
                per_tx
            };
            let key = (dest.clone(), pool.as_ref().map(|p| p.name.clone()));
            let queue = self
                .destinations
                .entry(key)
                .or_insert_with(|| DestQueue::new(dest, pool, max_workers))
                .clone();
            for chunk in rcpts.chunks(per_tx.max(1)) {
                for &i in chunk {
                    if let Some(m) = q.rcpts.get_mut(i as usize, n) {
                        m.in_flight = true;
                    }
                }
                work.jobs_out += 1;
                let message = job.clone();
                let rcpts = chunk.to_vec();
                queue.push(Job { message, rcpts }, &self.delivery);
            }
        }
    }

    pub(super) fn fire_timers(&mut self) {
        let now = now_ms();
        let mut due = Vec::new();
        while let Some(Reverse((at, id))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            due.push(id);
        }
        due.sort_unstable();
        due.dedup();
        for id in due {
            self.dispatch(id);
        }
    }
}

/// `pool` narrowed to its source `name` (for retries that must leave from the same address).
fn pinned(pool: &Pool, name: &str) -> Pool {
    match pool.sources.iter().find(|(s, _)| s.name == name) {
        Some(source) => Pool {
            name: format!("{}@{name}", pool.name),
            sources: vec![source.clone()],
            sender_domains: Vec::new(),
            tenants: Vec::new(),
        },
        None => pool.clone(),
    }
}

/// The report for recipients whose message expired while they waited for a later attempt.
fn expired_unattempted(id: QueueId, rcpts: Vec<u32>) -> JobReport {
    let reply = Reply::local(
        451,
        "4.4.7",
        "not tried: the message expired before its next attempt was due",
    );
    JobReport {
        id,
        outcomes: rcpts
            .into_iter()
            .map(|rcpt| Outcome {
                rcpt,
                reply: reply.clone(),
                remote: None,
                dsn_passed: false,
                local: false,
                tls: None,
                not_before: None,
                hold: false,
                source: None,
            })
            .collect(),
    }
}
