//! The queue manager: every spooled recipient is either in a destination's ready queue, out
//! with a delivery worker, or waiting in the retry timer heap. It applies each outcome (spool
//! record, event, next attempt), sends DSNs, and removes a message once every recipient is
//! final. A restart rebuilds all of this from the spool.
//!
//! One task owns this state; sessions submit to it and workers report to it through channels.
//! No message is polled: deferred recipients sleep in a heap keyed by their next attempt.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use baton_spool::{
    Attempt, BodyLocation, DsnRet, Envelope, QueueId, RcptState, Recipient, RecipientUpdate, Spool,
    StoredMessage, now_ms,
};
use bytes::Bytes;
use tokio::sync::{OnceCell, mpsc};

use crate::bounce::{self, Action, ReportedRecipient};
use crate::config::Config;
use crate::delivery::{
    DeliveryContext, DestQueue, Destination, Job, JobMessage, JobReport, Outcome,
};
use crate::retry;
use baton_client::{OutRcpt, Reply};
use baton_events::{EventKind, Events};

/// Sessions hand accepted messages to the queue through this; the control socket asks it
/// questions and gives it orders.
#[derive(Clone)]
pub struct QueueHandle {
    tx: mpsc::UnboundedSender<StoredWithBody>,
    control: mpsc::UnboundedSender<(Control, tokio::sync::oneshot::Sender<serde_json::Value>)>,
}

/// An operator's request (see `control.rs`).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Control {
    /// Why each recipient of a message is where it is.
    Explain {
        id: String,
    },
    /// What holds a destination domain back, and how much mail waits for it.
    ExplainDestination {
        destination: String,
    },
    /// No deliveries to a destination domain (or `pool:NAME`, `tenant:NAME`) for `seconds`
    /// (default: a day).
    Suspend {
        destination: String,
        seconds: Option<u64>,
    },
    Resume {
        destination: String,
    },
    /// Bounce (with DSN) or delete (without) every queued recipient at a domain.
    Bounce {
        destination: String,
    },
    Delete {
        destination: String,
    },
    /// Move the queued mail of one pool to another.
    Rebind {
        from: String,
        to: String,
    },
    /// Try every waiting recipient (at one domain, or all) now (postqueue -f).
    Flush {
        #[serde(default)]
        destination: Option<String>,
    },
    /// Counts of waiting recipients by destination, pool and state.
    Summary,
    /// Keep a message (or every message: "ALL") from delivery until released (postsuper -h);
    /// survives restarts.
    Hold {
        id: String,
    },
    /// Let held messages go again (postsuper -H).
    Release {
        id: String,
    },
}

struct StoredWithBody {
    message: StoredMessage,
    body: Option<Bytes>,
}

impl QueueHandle {
    /// Queues a message that is already durable in the spool. `body` saves a read back.
    pub fn submit(&self, message: StoredMessage, body: Option<Bytes>) {
        let _ = self.tx.send(StoredWithBody { message, body });
    }

    /// Runs an operator request in the queue manager and returns its answer.
    pub async fn control(&self, request: Control) -> serde_json::Value {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.control.send((request, tx)).is_err() {
            return serde_json::json!({"error": "the queue manager has stopped"});
        }
        rx.await
            .unwrap_or_else(|_| serde_json::json!({"error": "no answer from the queue manager"}))
    }
}

struct Queued {
    envelope: Envelope,
    location: BodyLocation,
    job_message: Arc<JobMessage>,
    /// Recipients out with a worker.
    in_flight: Vec<bool>,
    /// The source a greylisted recipient must be retried from (greylisting keys on the IP).
    /// (Only greylisted recipients are in it: most messages never allocate.)
    sticky: HashMap<u32, String>,
    /// Attempts made per recipient. The attempt history itself lives in the spool only (for
    /// `baton queue show`): in memory it would grow with every retry of every recipient.
    attempts: Vec<u16>,
    jobs_out: usize,
    failures: Vec<ReportedRecipient>,
    successes: Vec<ReportedRecipient>,
    delays: Vec<ReportedRecipient>,
}

pub struct QueueManager {
    config: Arc<Config>,
    spool: Spool,
    events: Events,
    delivery: Arc<DeliveryContext>,
    messages: HashMap<QueueId, Queued>,
    timers: BinaryHeap<Reverse<(u64, QueueId)>>,
    destinations: HashMap<(Destination, Option<String>), Arc<DestQueue>>,
    submissions: mpsc::UnboundedReceiver<StoredWithBody>,
    reports: mpsc::UnboundedReceiver<JobReport>,
    control: mpsc::UnboundedReceiver<(Control, tokio::sync::oneshot::Sender<serde_json::Value>)>,
    suppressions: Arc<crate::suppression::Suppressions>,
}

impl QueueManager {
    /// Builds the queue from what the spool recovered and starts it.
    pub fn start(
        config: Arc<Config>,
        spool: Spool,
        events: Events,
        recovered: Vec<StoredMessage>,
        suppressions: Arc<crate::suppression::Suppressions>,
        trust: Arc<baton_tls::trust::Trust>,
    ) -> anyhow::Result<QueueHandle> {
        let (tx, submissions) = mpsc::unbounded_channel();
        let (report_tx, reports) = mpsc::unbounded_channel();
        let (control_tx, control) = mpsc::unbounded_channel();
        let mut dkim = HashMap::new();
        for d in &config.dkim {
            let key = crate::dkim::DkimKey::load(&d.domain, &d.selector, &d.key)
                .map_err(anyhow::Error::msg)?;
            dkim.insert(d.domain.clone(), key);
        }
        let mta_sts = if config.delivery.mta_sts {
            match trust.https_config() {
                Ok(https) => Some(baton_dns::mta_sts::MtaSts::new(
                    https,
                    config.delivery.mta_sts_port,
                    config.delivery.connect_timeout,
                    &config.data_dir,
                )),
                Err(why) => {
                    tracing::warn!(%why, "MTA-STS is off: policies cannot be fetched");
                    None
                }
            }
        } else {
            None
        };
        let delivery = Arc::new(DeliveryContext {
            config: config.clone(),
            dkim,
            dns: baton_dns::Dns::new(&config.dns)?,
            shaper: shaper(&config),
            events: events.clone(),
            spool: spool.clone(),
            reports: report_tx,
            connections_opened: Default::default(),
            trust,
            mta_sts,
        });
        let mut qmgr = QueueManager {
            config,
            spool,
            events,
            delivery,
            messages: HashMap::new(),
            timers: BinaryHeap::new(),
            destinations: HashMap::new(),
            submissions,
            reports,
            control,
            suppressions,
        };
        // Operator suspensions survive restarts.
        if let Ok(text) = std::fs::read_to_string(qmgr.operator_file())
            && let Ok(saved) = serde_json::from_str::<Vec<(String, u64)>>(&text)
        {
            qmgr.delivery.shaper.operator_restore(saved);
        }
        for message in recovered {
            qmgr.add(message, None);
        }
        tokio::spawn(qmgr.run());
        Ok(QueueHandle {
            tx,
            control: control_tx,
        })
    }

    async fn run(mut self) {
        loop {
            let next_timer = self.timers.peek().map(|Reverse((due, _))| *due);
            let sleep = next_timer.map(|due| Duration::from_millis(due.saturating_sub(now_ms())));
            tokio::select! {
                Some(s) = self.submissions.recv() => self.add(s.message, s.body),
                Some(report) = self.reports.recv() => self.apply(report).await,
                Some((request, reply)) = self.control.recv() => {
                    let answer = self.handle_control(request).await;
                    let _ = reply.send(answer);
                }
                _ = tokio::time::sleep(sleep.unwrap_or(Duration::from_secs(3600))), if sleep.is_some() => {
                    self.fire_timers();
                }
                else => break,
            }
        }
    }

    /// A message enters the queue: its due recipients go to their ready queues, the others
    /// wait for their time.
    fn add(&mut self, message: StoredMessage, body: Option<Bytes>) {
        let env = &message.envelope;
        let job_message = Arc::new(JobMessage {
            id: env.id,
            sender: env.sender.clone(),
            recipients: env
                .recipients
                .iter()
                .map(|r| OutRcpt {
                    address: r.address.clone(),
                    orcpt: r.orcpt.clone(),
                    notify: r.notify,
                })
                .collect(),
            dsn_ret: env.dsn_ret.map(|r| match r {
                DsnRet::Full => "FULL",
                DsnRet::Headers => "HDRS",
            }),
            dsn_envid: env.dsn_envid.clone(),
            eight_bit: env.eight_bit,
            smtputf8: env.smtputf8,
            location: message.body,
            body: OnceCell::new_with(body),
            strip_baton_headers: env.meta.strip_baton_headers,
            tenant: env.meta.tenant.clone(),
            signed: OnceCell::new(),
        });
        let id = env.id;
        let n = env.recipients.len();
        baton_events::metrics::queue_depth(
            env.recipients
                .iter()
                .filter(|r| !r.state.is_final())
                .count() as i64,
        );
        let attempts = env
            .recipients
            .iter()
            .map(|r| r.attempts.len().min(u16::MAX as usize) as u16)
            .collect();
        let mut envelope = message.envelope;
        for r in &mut envelope.recipients {
            r.attempts = Vec::new();
        }
        self.messages.insert(
            id,
            Queued {
                envelope,
                location: message.body,
                job_message,
                in_flight: vec![false; n],
                sticky: HashMap::new(),
                attempts,
                jobs_out: 0,
                failures: Vec::new(),
                successes: Vec::new(),
                delays: Vec::new(),
            },
        );
        self.dispatch(id);
    }

    /// Sends every recipient of `id` that is due to its destination's ready queue.
    fn dispatch(&mut self, id: QueueId) {
        if self.config.delivery.hold {
            return;
        }
        let now = now_ms();
        let Some(q) = self.messages.get_mut(&id) else {
            return;
        };
        if q.envelope.meta.hold {
            return; // released by the operator, not by time
        }
        let mut groups: HashMap<(Destination, Option<String>), Vec<u32>> = HashMap::new();
        let mut next_due: Option<u64> = None;
        // Outside its delivery window, nothing of the message is due before the window opens.
        let window_opens = q
            .envelope
            .meta
            .window
            .as_deref()
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

    fn fire_timers(&mut self) {
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

    /// Applies one job's outcomes.
    async fn apply(&mut self, report: JobReport) {
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
                    let latency = (state == RcptState::Delivered).then_some(age.as_secs_f64());
                    baton_events::metrics::outcome(kind, domain, pool, &reply.status, latency);
                    if state.is_final() {
                        baton_events::metrics::queue_depth(-1);
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
                let mut delay_notified = false;
                match state {
                    RcptState::Bounced if notify.wants_failure() => {
                        q.failures.push(reported);
                    }
                    RcptState::Expired if notify.wants_failure() => {
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
                    RcptState::Delivered if notify.wants_success() && !outcome.dsn_passed => {
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
                        if notify.wants_delay()
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
    async fn after_attempt(&mut self, id: QueueId, updates: Vec<RecipientUpdate>) {
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
    fn take_if_done(&mut self, id: QueueId) -> bool {
        let done = self.messages.get(&id).is_some_and(|q| {
            q.jobs_out == 0 && q.envelope.recipients.iter().all(|r| r.state.is_final())
        });
        if done {
            self.messages.remove(&id);
        }
        done
    }

    fn finish_if_done(&mut self, id: QueueId) {
        if self.take_if_done(id)
            && let Err(e) = self.spool.record(&[], &[id])
        {
            tracing::error!(id = %id, error = %e, "cannot record a finished message");
        }
    }

    async fn handle_control(&mut self, request: Control) -> serde_json::Value {
        use serde_json::json;
        match request {
            Control::Explain { id } => match id.parse::<QueueId>() {
                Ok(qid) => self.explain(qid),
                Err(e) => json!({"error": e}),
            },
            Control::ExplainDestination { destination } => self.explain_destination(&destination),
            Control::Suspend {
                destination,
                seconds,
            } => {
                let secs = match suspension_seconds(seconds) {
                    Ok(secs) => secs,
                    Err(why) => return json!({ "error": why }),
                };
                self.delivery
                    .shaper
                    .operator_suspend(&destination, Duration::from_secs(secs));
                self.save_operator_state();
                self.shaping_event(
                    &destination,
                    format!("suspended by the operator for {secs} s"),
                );
                json!({"ok": true, "destination": destination, "seconds": secs})
            }
            Control::Resume { destination } => {
                self.delivery.shaper.operator_resume(&destination);
                self.save_operator_state();
                self.shaping_event(&destination, "resumed by the operator".into());
                // Whatever waits for the destination may go now.
                let ids: Vec<QueueId> = self.messages.keys().copied().collect();
                for id in &ids {
                    self.release(*id, &destination);
                }
                json!({"ok": true, "destination": destination})
            }
            Control::Bounce { destination } | Control::Delete { destination }
                if destination.is_empty() || destination.contains(':') =>
            {
                json!({"error": format!("bounce and delete take a domain, not {destination:?}")})
            }
            Control::Rebind { from, to } => {
                if !self.config.pools.iter().any(|p| p.name == to) {
                    return json!({"error": format!("no [[pool]] named {to:?}")});
                }
                let mut moved = 0;
                let ids: Vec<QueueId> = self.messages.keys().copied().collect();
                for id in ids {
                    let Some(q) = self.messages.get_mut(&id) else {
                        continue;
                    };
                    if self.config.pool_for(&q.envelope).map(|p| p.name.as_str())
                        != Some(from.as_str())
                    {
                        continue;
                    }
                    q.envelope.meta.pool = Some(to.clone());
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
            Control::Bounce { destination } => {
                let n = self.operator_final(&destination, true).await;
                json!({"ok": true, "destination": destination, "bounced": n})
            }
            Control::Delete { destination } => {
                let n = self.operator_final(&destination, false).await;
                json!({"ok": true, "destination": destination, "deleted": n})
            }
            Control::Flush { destination } => {
                let domain = destination.unwrap_or_default().to_ascii_lowercase();
                let ids: Vec<QueueId> = self.messages.keys().copied().collect();
                let mut flushed = 0;
                for id in ids {
                    flushed += self.release(id, &domain);
                }
                json!({"ok": true, "destination": domain, "flushed": flushed})
            }
            Control::Summary => self.summary(),
            Control::Hold { id } => self.set_hold(&id, true),
            Control::Release { id } => self.set_hold(&id, false),
        }
    }

    /// Holds or releases one message, or all ("ALL"); the flag is a spool meta record.
    fn set_hold(&mut self, id: &str, hold: bool) -> serde_json::Value {
        use serde_json::json;
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

    /// Waiting recipients by (destination, pool): how many queued, deferred and out with a
    /// worker, and the oldest arrival.
    fn summary(&self) -> serde_json::Value {
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
                let domain = r.address.rsplit_once('@').map(|(_, d)| d).unwrap_or("");
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

    fn operator_file(&self) -> std::path::PathBuf {
        self.config.data_dir.join("operator-suspensions.json")
    }

    /// Saves the operator's suspensions (write a temporary file, then rename over).
    fn save_operator_state(&self) {
        let snapshot = self.delivery.shaper.operator_snapshot();
        let path = self.operator_file();
        let tmp = path.with_extension("json.tmp");
        let written = serde_json::to_vec(&snapshot)
            .map_err(std::io::Error::other)
            .and_then(|bytes| std::fs::write(&tmp, bytes))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            tracing::error!(path = %path.display(), error = %e, "cannot save the operator's suspensions");
        }
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
    fn release(&mut self, id: QueueId, target: &str) -> usize {
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
        let not_before = q.envelope.meta.send_at_ms.unwrap_or(0);
        let now = now_ms();
        let mut released = 0;
        for &i in &rcpts {
            if let Some(r) = q.envelope.recipients.get_mut(i as usize) {
                r.next_attempt_ms = r.next_attempt_ms.min(not_before);
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
    async fn operator_final(&mut self, target: &str, bounce: bool) -> usize {
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
            let (state, status, text, kind) = if bounce {
                (
                    RcptState::Bounced,
                    "5.0.0",
                    "bounced by the operator",
                    EventKind::Bounce,
                )
            } else {
                (
                    RcptState::Deleted,
                    "5.0.0",
                    "deleted by the operator",
                    EventKind::Deleted,
                )
            };
            let mut updates = Vec::new();
            let mut reported = Vec::new();
            if let Some(q) = self.messages.get_mut(&id) {
                for &i in &rcpts {
                    let Some(r) = q.envelope.recipients.get_mut(i as usize) else {
                        continue;
                    };
                    let update = RecipientUpdate {
                        id,
                        rcpt: i,
                        state,
                        attempt: Some(Attempt {
                            at_ms: now,
                            code: 550,
                            status: status.into(),
                            diagnostic: text.into(),
                            remote_mta: None,
                        }),
                        next_attempt_ms: 0,
                        delay_notified: false,
                    };
                    r.state = state;
                    baton_events::metrics::outcome(kind, domain, "", status, None);
                    baton_events::metrics::queue_depth(-1);
                    let mut e = self.events.new_event(
                        kind,
                        &id.to_string(),
                        &r.address,
                        &q.envelope.sender,
                    );
                    e.status = Some(status.into());
                    e.response = Some(text.into());
                    self.events.emit(e);
                    if bounce && !r.notify.is_never() {
                        reported.push(ReportedRecipient {
                            address: r.address.clone(),
                            orcpt: r.orcpt.clone(),
                            action: Action::Failed,
                            status: status.into(),
                            diagnostic: format!("the mail system's operator {text}"),
                            diagnostic_is_smtp: false,
                            remote_mta: None,
                            last_attempt_ms: now,
                            will_retry_until_ms: None,
                        });
                    }
                    updates.push(update);
                }
            }
            if !reported.is_empty() {
                self.send_dsn(id, reported).await;
            }
            let done = self.take_if_done(id);
            let done: &[QueueId] = if done { &[id] } else { &[] };
            if let Err(e) = self.spool.record(&updates, done) {
                tracing::error!(id = %id, error = %e, "cannot record an operator action");
            }
        }
        total
    }

    /// The shaping state of a domain and the recipients waiting for it.
    fn explain_destination(&self, domain: &str) -> serde_json::Value {
        let now = now_ms();
        let (mut waiting, mut in_flight, mut next) = (0usize, 0usize, None::<u64>);
        for q in self.messages.values() {
            for (i, r) in q.envelope.recipients.iter().enumerate() {
                let at = r.address.rsplit_once('@').map(|(_, d)| d).unwrap_or("");
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
    fn explain(&self, id: QueueId) -> serde_json::Value {
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
                let domain = r.address.rsplit_once('@').map(|(_, d)| d).unwrap_or("");
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

    /// Queues a DSN to the sender about `recipients`; a bounce is never bounced.
    async fn send_dsn(&mut self, id: QueueId, recipients: Vec<ReportedRecipient>) {
        let Some(q) = self.messages.get(&id) else {
            return;
        };
        let original = q.envelope.clone();
        if original.sender.is_empty() {
            for r in &recipients {
                tracing::info!(id = %id, recipient = %r.address, "not returning a failed bounce (null sender)");
                let e = self.events.new_event(
                    EventKind::BounceDropped,
                    &id.to_string(),
                    &r.address,
                    "",
                );
                self.events.emit(e);
            }
            return;
        }
        let body = match q.job_message.body.get() {
            Some(b) => Ok(b.clone()),
            None => {
                let spool = self.spool.clone();
                let location = q.location;
                tokio::task::spawn_blocking(move || spool.load_body(id, location))
                    .await
                    .unwrap_or_else(|e| Err(std::io::Error::other(e)))
            }
        };
        let body = match body {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(id = %id, error = %e, "cannot read the message for its DSN");
                Bytes::new()
            }
        };
        let dsn_id = self.spool.next_id();
        let bytes = bounce::build(
            &self.config.hostname,
            &original,
            &body,
            &recipients,
            &dsn_id.to_string(),
        );
        let envelope = Envelope {
            id: dsn_id,
            sender: String::new(),
            recipients: vec![Recipient::new(
                original.sender.clone(),
                None,
                baton_spool::Notify::NEVER,
            )],
            dsn_ret: None,
            dsn_envid: None,
            eight_bit: true,
            smtputf8: original.smtputf8,
            client_ip: std::net::IpAddr::from([127, 0, 0, 1]),
            helo: self.config.hostname.clone(),
            arrived_ms: now_ms(),
            size: bytes.len() as u64,
            meta: Default::default(),
        };
        let mut writer = self.spool.body_writer(dsn_id);
        writer.buf().extend_from_slice(&bytes);
        let committed = match writer.settle() {
            Ok(()) => self.spool.commit(&envelope, writer).await,
            Err(e) => Err(e),
        };
        match committed {
            Ok((location, inline)) => {
                tracing::info!(id = %dsn_id, original = %id, to = %original.sender, recipients = recipients.len(), "DSN queued");
                for r in &recipients {
                    let e = self.events.new_event(
                        EventKind::DsnQueued,
                        &id.to_string(),
                        &r.address,
                        &original.sender,
                    );
                    self.events.emit(e);
                }
                let body = (!inline.is_empty()).then_some(inline);
                self.add(
                    StoredMessage {
                        envelope,
                        body: location,
                    },
                    body,
                );
            }
            Err(e) => tracing::error!(original = %id, error = %e, "cannot queue a DSN"),
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

/// The shaper, with the warm-up ledger in `data_dir` when a source has a warm-up plan.
fn shaper(config: &Config) -> baton_shaping::Shaper {
    let shaper = baton_shaping::Shaper::new(
        config.shaping.clone(),
        config.backoff.clone(),
        config.delivery.max_connections_per_destination,
    );
    let planned = config
        .pools
        .iter()
        .flat_map(|p| &p.sources)
        .any(|(s, _)| s.warmup.is_some());
    if !planned {
        return shaper;
    }
    let ledger = baton_shaping::warmup::Ledger::open(&config.data_dir.join("warmup.log"));
    shaper.with_ledger(Arc::new(ledger))
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

/// "mx1.example.net [192.0.2.1]" → "mx1.example.net".
fn host_part(remote: &str) -> String {
    remote
        .split(' ')
        .next()
        .unwrap_or(remote)
        .trim_matches(['[', ']'])
        .to_string()
}
