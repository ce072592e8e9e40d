//! Dispatch: due recipients to their destinations' ready queues, the others to the timer heap.

use super::*;

impl QueueManager {
    /// Sends every recipient of `id` that is due to its destination's ready queue.
    pub(super) fn dispatch(&mut self, id: QueueId) {
        if self.config.delivery.hold {
            return;
        }
        let now = now_ms();
        let Some(q) = self.messages.get_mut(&id) else {
            return;
        };
        if q.envelope.meta("hold") == Some("1") {
            return; // released by the operator, not by time
        }
        let mut groups: HashMap<(Destination, Option<String>), Vec<u32>> = HashMap::new();
        let mut next_due: Option<u64> = None;
        // Outside its delivery window, nothing of the message is due before the window opens.
        let window_opens = q
            .envelope
            .meta("window")
            .and_then(|w| crate::schedule::Window::parse(w).ok())
            .map(|w| w.next_open(now))
            .filter(|&open| open > now);
        let mut held = Vec::new();
        // Every recipient expires at max_age, tried or not: a send-at, a window or a hold by
        // shaping never keeps one (and its journal segment) past it.
        let expiry = retry::expiry_ms(&self.config.delivery, q.envelope.arrived_ms);
        let mut expired = Vec::new();
        for (i, r) in q.envelope.recipients.iter_mut().enumerate() {
            if r.state.is_final() || q.in_flight[i] {
                continue;
            }
            if now >= expiry && r.next_attempt_ms > now {
                expired.push(i as u32);
                continue;
            }
            if let Some(open) = window_opens
                && r.next_attempt_ms < open
            {
                r.next_attempt_ms = open;
                held.push(RecipientUpdate {
                    id,
                    rcpt: i as u32,
                    state: r.state,
                    attempt: None,
                    next_attempt_ms: open,
                    delay_notified: false,
                });
            }
            if r.next_attempt_ms > now {
                let due = r.next_attempt_ms.min(expiry);
                next_due = Some(next_due.map_or(due, |d: u64| d.min(due)));
                continue;
            }
            let domain = r.address.rsplit_once('@').map(|(_, d)| d).unwrap_or("");
            let dest = Destination::for_domain(&self.config, domain);
            groups
                .entry((dest, q.sticky.get(&(i as u32)).cloned()))
                .or_default()
                .push(i as u32);
        }
        if let Some(due) = next_due {
            self.timers.push(Reverse((due, id)));
        }
        if !expired.is_empty() {
            // Reported as the outcome of an attempt, so that expiry takes its one path
            // (event, metrics, DSN, spool record) in `apply`.
            for &i in &expired {
                q.in_flight[i as usize] = true;
            }
            q.jobs_out += 1;
            let _ = self.delivery.reports.send(expired_unattempted(id, expired));
        }
        if !held.is_empty()
            && let Err(e) = self.spool.record(&held, &[])
        {
            tracing::error!(id = %id, error = %e, "cannot record the delivery window");
        }
        let max_workers = self.config.delivery.max_connections_per_destination;
        let pool = self.config.pool_for(&q.envelope).cloned();
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
            let key = (dest.clone(), pool.as_ref().map(|p| p.name.clone()));
            let queue = self
                .destinations
                .entry(key)
                .or_insert_with(|| DestQueue::new(dest, pool, max_workers))
                .clone();
            for chunk in rcpts.chunks(per_tx) {
                for &i in chunk {
                    q.in_flight[i as usize] = true;
                }
                q.jobs_out += 1;
                queue.push(
                    Job {
                        message: q.job_message.clone(),
                        rcpts: chunk.to_vec(),
                    },
                    &self.delivery,
                );
            }
        }
        if q.jobs_out == 0 && next_due.is_none() {
            // Nothing left to try (all final): the message may have arrived that way.
            self.finish_if_done(id);
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
fn pinned(pool: &crate::config::Pool, name: &str) -> crate::config::Pool {
    match pool.sources.iter().find(|(s, _)| s.name == name) {
        Some(source) => crate::config::Pool {
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
