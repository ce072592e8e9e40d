//! Outcomes: what a delivery attempt did to each recipient, applied and recorded.

use super::*;

impl QueueManager {
    /// Applies one job's outcomes.
    pub(super) async fn apply(&mut self, report: JobReport) {
        let id = report.id;
        let now = now_ms();
        let mut updates = Vec::new();
        {
            let config = self.config.clone();
            let Some(q) = self.messages.get_mut(&id) else {
                return;
            };
            q.jobs_out = q.jobs_out.saturating_sub(1);
            for outcome in report.outcomes {
                let i = outcome.rcpt as usize;
                let Some(rcpt) = q.envelope.recipients.get(i) else {
                    continue;
                };
                if let Some(flag) = q.in_flight.get_mut(i) {
                    *flag = false;
                }
                let reply = &outcome.reply;
                if outcome.hold {
                    // Held by our own shaping (suspension, warm-up cap): not an attempt, never
                    // a reason to expire or bounce; the recipient waits for the stated time.
                    let until = outcome.not_before.unwrap_or(now + 1000);
                    let mut event = self.events.new_event(
                        EventKind::Held,
                        &id.to_string(),
                        &rcpt.address,
                        &q.envelope.sender,
                    );
                    event.response = Some(reply.text.clone());
                    event.next_attempt = jiff::Timestamp::from_millisecond(until as i64)
                        .ok()
                        .map(|t| t.to_string());
                    self.events.emit(event);
                    let update = RecipientUpdate {
                        id,
                        rcpt: i as u32,
                        state: rcpt.state,
                        attempt: None,
                        next_attempt_ms: until,
                        delay_notified: false,
                    };
                    update.apply(&mut q.envelope);
                    updates.push(update);
                    continue;
                }
                let attempt = Attempt {
                    at_ms: now,
                    code: reply.code,
                    status: reply.status.clone(),
                    diagnostic: reply.line(),
                    remote_mta: outcome.remote.clone(),
                };
                let attempts = q.attempts.get(i).map_or(0, |&a| a as usize) + 1;
                let age = Duration::from_millis(now.saturating_sub(q.envelope.arrived_ms));
                let (state, next, kind) = match reply.code {
                    200..=299 => (RcptState::Delivered, 0, EventKind::Delivery),
                    500..=599 => (RcptState::Bounced, 0, EventKind::Bounce),
                    _ if age >= config.delivery.max_age => {
                        (RcptState::Expired, 0, EventKind::Expiration)
                    }
                    _ => {
                        let domain = rcpt.address.rsplit_once('@').map(|(_, d)| d).unwrap_or("");
                        let base = self.delivery.shaper.domain_rule(domain).retry_interval;
                        let (d, arrived) = (&config.delivery, q.envelope.arrived_ms);
                        // Greylisting wants the same message again soon, not in an hour.
                        let next = if retry::is_greylisting(reply.code, &reply.text) {
                            retry::after_greylisting(d, base, arrived, attempts, now, &reply.text)
                        } else {
                            retry::backoff(d, base, arrived, attempts, now)
                        };
                        (RcptState::Deferred, next, EventKind::TransientFailure)
                    }
                };
                {
                    let domain = rcpt.address.rsplit_once('@').map(|(_, d)| d).unwrap_or("");
                    let pool = config
                        .pool_for(&q.envelope)
                        .map(|p| p.name.as_str())
                        .unwrap_or("");
                    let label = match state {
                        RcptState::Delivered => "delivered",
                        RcptState::Bounced => "bounced",
                        RcptState::Expired => "expired",
                        _ => "deferred",
                    };
                    let latency = (state == RcptState::Delivered).then_some(age.as_secs_f64());
                    crate::metrics::outcome(label, domain, pool, &reply.status, latency);
                    if state.is_final() {
                        crate::metrics::queue_depth(-1);
                    }
                }
                // A greylisted recipient is retried from the same source address.
                let greylisted =
                    state == RcptState::Deferred && retry::is_greylisting(reply.code, &reply.text);
                match (greylisted, &outcome.source) {
                    (true, Some(source)) => {
                        q.sticky.insert(i as u32, source.clone());
                    }
                    _ => {
                        q.sticky.remove(&(i as u32));
                    }
                }
                // A suspended destination says when it may be tried again.
                let next = match outcome.not_before {
                    Some(nb) if state == RcptState::Deferred => {
                        let expiry = retry::expiry_ms(&config.delivery, q.envelope.arrived_ms);
                        next.max(nb).min(expiry.max(now + 1))
                    }
                    _ => next,
                };
                let reported = ReportedRecipient {
                    address: rcpt.address.clone(),
                    orcpt: rcpt.orcpt.clone(),
                    action: Action::Failed,
                    status: reply.status.clone(),
                    diagnostic: reply.line(),
                    diagnostic_is_smtp: outcome.remote.is_some() && reply.code != 0,
                    remote_mta: outcome.remote.as_ref().map(|r| host_part(r)),
                    last_attempt_ms: now,
                    will_retry_until_ms: None,
                };
                let notify = rcpt.notify;
                let never = notify & 1 != 0;
                let mut delay_notified = false;
                match state {
                    RcptState::Bounced if !never && (notify == 0 || notify & 4 != 0) => {
                        q.failures.push(reported);
                    }
                    RcptState::Expired if !never && (notify == 0 || notify & 4 != 0) => {
                        q.failures.push(ReportedRecipient {
                            status: "4.4.7".into(),
                            diagnostic: format!(
                                "message expired after {}; last error: {}",
                                crate::config::human_duration(config.delivery.max_age),
                                reply.line()
                            ),
                            ..reported
                        });
                    }
                    RcptState::Delivered if notify & 2 != 0 && !outcome.dsn_passed => {
                        q.successes.push(ReportedRecipient {
                            action: if outcome.local {
                                Action::Delivered
                            } else {
                                Action::Relayed
                            },
                            ..reported
                        });
                    }
                    RcptState::Deferred
                        if !never
                            && (notify == 0 || notify & 8 != 0)
                            && !rcpt.delay_notified
                            && age >= config.delivery.delay_warning =>
                    {
                        delay_notified = true;
                        q.delays.push(ReportedRecipient {
                            action: Action::Delayed,
                            will_retry_until_ms: Some(retry::expiry_ms(
                                &config.delivery,
                                q.envelope.arrived_ms,
                            )),
                            ..reported
                        });
                    }
                    _ => {}
                }
                let mut event =
                    self.events
                        .new_event(kind, &id.to_string(), &rcpt.address, &q.envelope.sender);
                event.code = Some(reply.code);
                event.status = Some(reply.status.clone());
                event.response = Some(reply.text.clone());
                event.remote_mta = outcome.remote.clone();
                event.attempt = Some(attempts);
                event.size = Some(q.envelope.size);
                event.tls = outcome.tls.clone();
                event.source = outcome.source.clone();
                // Only the recipient's own refusal says the address is bad: a refused sender
                // (553 5.1.8) or a refused DATA is no verdict on it.
                if state == RcptState::Bounced
                    && outcome.remote.is_some()
                    && reply.to_rcpt
                    && crate::suppression::means_no_such_address(&reply.status)
                    && self.suppressions.add(&rcpt.address, &reply.line())
                {
                    let mut s = self.events.new_event(
                        EventKind::Suppression,
                        &id.to_string(),
                        &rcpt.address,
                        &q.envelope.sender,
                    );
                    s.status = Some(reply.status.clone());
                    s.response = Some(format!("added to the suppression list: {}", reply.line()));
                    self.events.emit(s);
                }
                event.latency_ms = (state == RcptState::Delivered)
                    .then_some(now.saturating_sub(q.envelope.arrived_ms));
                if state == RcptState::Deferred {
                    event.next_attempt = jiff::Timestamp::from_millisecond(next as i64)
                        .ok()
                        .map(|t| t.to_string());
                }
                self.events.emit(event);
                let update = RecipientUpdate {
                    id,
                    rcpt: i as u32,
                    state,
                    attempt: Some(attempt),
                    next_attempt_ms: next,
                    delay_notified,
                };
                update.apply(&mut q.envelope);
                if let Some(r) = q.envelope.recipients.get_mut(i) {
                    r.attempts.clear();
                }
                if let Some(a) = q.attempts.get_mut(i) {
                    *a = a.saturating_add(1);
                }
                updates.push(update);
            }
        }
        self.after_attempt(id, updates).await;
    }

    /// After a job's outcomes: send the DSNs they call for, then record the recipients' new
    /// states; once no job of the message is out, schedule what is deferred and remove the
    /// message if every recipient is final.
    ///
    /// A notice is as durable as the state it reports: the DSN is committed before the states
    /// that caused it are recorded (a crash in between repeats a notice rather than losing one),
    /// and it goes at once, not when the message's slowest destination has answered.
    pub(super) async fn after_attempt(&mut self, id: QueueId, updates: Vec<RecipientUpdate>) {
        let Some(q) = self.messages.get_mut(&id) else {
            return;
        };
        let batches = [
            std::mem::take(&mut q.failures),
            std::mem::take(&mut q.delays),
            std::mem::take(&mut q.successes),
        ];
        for batch in batches.into_iter().filter(|b| !b.is_empty()) {
            self.send_dsn(id, batch).await;
        }
        if self.messages.get(&id).is_some_and(|q| q.jobs_out == 0) {
            if let Some(q) = self.messages.get_mut(&id) {
                // Whatever waits for a retry waits without its body in memory: the next
                // attempt reads it from the spool.
                q.job_message = Arc::new(q.job_message.without_body());
            }
            self.dispatch(id);
        }
        let done = self.take_if_done(id);
        let done: &[QueueId] = if done { &[id] } else { &[] };
        if let Err(e) = self.spool.record(&updates, done) {
            tracing::error!(id = %id, error = %e, "cannot record delivery results");
        }
    }

    /// Forgets the message if every recipient is final; true if it did.
    pub(super) fn take_if_done(&mut self, id: QueueId) -> bool {
        let done = self.messages.get(&id).is_some_and(|q| {
            q.jobs_out == 0 && q.envelope.recipients.iter().all(|r| r.state.is_final())
        });
        if done {
            self.messages.remove(&id);
        }
        done
    }

    pub(super) fn finish_if_done(&mut self, id: QueueId) {
        if self.take_if_done(id)
            && let Err(e) = self.spool.record(&[], &[id])
        {
            tracing::error!(id = %id, error = %e, "cannot record a finished message");
        }
    }
}

/// "mx1.example.net [192.0.2.1]" → "mx1.example.net".
fn host_part(remote: &str) -> String {
    remote
        .split(' ')
        .next()
        .unwrap_or(remote)
        .trim_matches(['[', ']'])
        .to_string()
}
