//! The queue manager: every spooled recipient is either in a destination's ready queue, out
//! with a delivery worker, or waiting in the retry timer heap. It performs what the policy
//! (`crate::policy`) decides for each outcome (spool record, event, next attempt), sends DSNs,
//! and removes a message once every recipient is final. A restart rebuilds all of this from
//! the spool.
//!
//! One task owns this state; sessions submit to it, workers report to it and operators command
//! it through channels. No message is polled: deferred recipients sleep in a heap keyed by
//! their next attempt. The loop never waits on a file: DSN commits, the suppression list and
//! the operator's state are written off it.
//!
//! Here: the handle, the state, the loop and `add`. `dispatch` hands due recipients out;
//! `outcome` performs decisions; `dsn` queues notices and orders the records behind them;
//! `operator` and `explain` carry out and answer `OperatorCommand`s; `operator_state` saves
//! suspensions.
//! Times, states and notices are never computed here, only in `policy`; delivery itself
//! (connections, shaping's pacing) belongs to `delivery` and `shaping`.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use baton_spool::recover::{Recovered, Recovering};
use baton_spool::{
    BodyLocation, DsnRet, Envelope, PackedEnvelope, QueueId, Spool, StoredMessage, now_ms,
};
use bytes::Bytes;
use tokio::sync::{OnceCell, mpsc};

use crate::config::Config;
use crate::delivery::{DeliveryContext, DestQueue, Destination, JobMessage, JobReport, Services};
use crate::operator::{Answer, ControlError, OperatorCommand};
use crate::policy::EventFields;
use baton_client::OutRcpt;
use baton_events::Events;

mod dispatch;
mod dsn;
mod explain;
mod operator;
mod operator_state;
mod outcome;

/// An operator's command with the way back for its answer.
type Commanded = (OperatorCommand, tokio::sync::oneshot::Sender<Answer>);

/// Sessions hand accepted messages to the queue through this; the control socket and the API
/// give it the operator's commands.
#[derive(Clone)]
pub struct QueueHandle {
    tx: mpsc::UnboundedSender<Submission>,
    control: mpsc::UnboundedSender<Commanded>,
    queued: Arc<AtomicU64>,
    /// With `[cluster]`: operator suspensions made here go to the fleet.
    fleet: Option<tokio::sync::mpsc::UnboundedSender<baton_cluster::FleetChange>>,
}

/// What comes into the queue.
enum Submission {
    /// A message just received, durable in the spool; its body saves a read back.
    Received(Box<StoredMessage>, Option<Bytes>),
    /// Messages the spool's replay found, answered once they are in.
    Recovered(Vec<Recovered>, tokio::sync::oneshot::Sender<()>),
    /// The replay is over.
    RecoveryDone,
}

impl QueueHandle {
    /// Recipients waiting in the queue (queued or deferred), kept current by the queue
    /// manager.
    pub fn queued(&self) -> Arc<AtomicU64> {
        self.queued.clone()
    }

    /// Queues a message that is already durable in the spool. `body` saves a read back.
    pub fn submit(&self, message: StoredMessage, body: Option<Bytes>) {
        let _ = self.tx.send(Submission::Received(Box::new(message), body));
    }

    /// Feeds the queue what the spool's background replay finds, a chunk at a time (the next
    /// is read from the spool once the last is in: memory holds one chunk in transit).
    pub async fn recover(&self, mut replay: tokio::sync::mpsc::Receiver<Recovering>) {
        while let Some(step) = replay.recv().await {
            match step {
                Recovering::Messages(chunk) => {
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    if self.tx.send(Submission::Recovered(chunk, tx)).is_err() {
                        return;
                    }
                    let _ = rx.await;
                }
                Recovering::Done(Ok(report)) => {
                    tracing::info!(
                        messages = report.messages,
                        torn_bytes_cut = report.truncated_bytes,
                        orphan_bodies_removed = report.orphan_bodies_removed,
                        "spool recovered"
                    );
                    break;
                }
                Recovering::Done(Err(why)) => {
                    tracing::error!(%why, "the spool's replay failed; what it had read is queued, restart to read the rest");
                    break;
                }
            }
        }
        let _ = self.tx.send(Submission::RecoveryDone);
    }

    /// Carries out an operator's command in the queue manager and returns its answer; a
    /// suspension or resumption that succeeded is shared with the fleet too.
    pub async fn control(&self, command: OperatorCommand) -> Answer {
        let shared = self
            .fleet
            .as_ref()
            .and_then(|fleet| Some((fleet, fleet_change(&command)?)));
        let answer = self.control_here(command).await;
        if let (Ok(_), Some((fleet, change))) = (&answer, shared) {
            let _ = fleet.send(change);
        }
        answer
    }

    /// Carries out a command on this node only (one the fleet shared with it).
    pub async fn control_here(&self, command: OperatorCommand) -> Answer {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.control.send((command, tx)).is_err() {
            return Err(ControlError::new("the queue manager has stopped"));
        }
        rx.await
            .unwrap_or_else(|_| Err(ControlError::new("no answer from the queue manager")))
    }
}

/// The fleet-wide form of a command: suspensions and resumptions, and actions on whole
/// destinations ([`OperatorCommand::fleet_wide`]); None for the others (a message lives on
/// one node; questions are answered here).
fn fleet_change(command: &OperatorCommand) -> Option<baton_cluster::FleetChange> {
    if let Some(suspension) = fleet_suspension(command) {
        return Some(baton_cluster::FleetChange::Suspension(suspension));
    }
    let command = serde_json::to_string(command)
        .ok()
        .filter(|_| command.fleet_wide())?;
    Some(baton_cluster::FleetChange::Operator(
        baton_cluster::OperatorAction { command },
    ))
}

/// The fleet-wide form of a suspension or resumption; None for other commands.
fn fleet_suspension(command: &OperatorCommand) -> Option<baton_cluster::Suspension> {
    match command {
        OperatorCommand::Suspend {
            destination,
            seconds,
        } => Some(baton_cluster::Suspension {
            destination: destination.text.clone(),
            until_ms: now_ms().saturating_add(seconds.seconds().saturating_mul(1000)),
        }),
        OperatorCommand::Resume { destination, .. } => Some(baton_cluster::Suspension {
            destination: destination.text.clone(),
            until_ms: 0,
        }),
        _ => None,
    }
}

/// A message in the queue. What waits is kept small: the envelope packed (its attempt
/// history lives in the spool only), no body, no job; these come back while it is worked on.
struct Queued {
    env: PackedEnvelope,
    location: BodyLocation,
    /// Per recipient: out with a worker, and attempts made.
    rcpts: RcptMems,
    /// Jobs out, and greylisting's pinned sources: none for most waiting messages.
    work: Option<Box<Work>>,
}

/// What a message being worked on needs besides its envelope.
#[derive(Default)]
struct Work {
    /// What the message's jobs share, while any is out (built at dispatch, dropped after).
    job: Option<Arc<JobMessage>>,
    jobs_out: u32,
    /// The source a greylisted recipient must be retried from (greylisting keys on the IP).
    sticky: Vec<(u32, String)>,
}

impl Queued {
    fn jobs_out(&self) -> u32 {
        self.work.as_ref().map_or(0, |w| w.jobs_out)
    }

    /// A message with no job out waits packed, without its job (and the body it held).
    fn settle(&mut self) {
        if self.jobs_out() > 0 {
            return;
        }
        if let Some(work) = &mut self.work {
            work.job = None;
            if work.sticky.is_empty() {
                self.work = None;
            }
        }
        self.env.pack();
        self.rcpts.trim();
    }
}

/// A recipient's in-memory state besides its envelope entry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct RcptMem {
    in_flight: bool,
    /// Attempts made; the history itself is in the spool (for `baton queue show`).
    attempts: u16,
}

/// Every recipient's [`RcptMem`]; empty (nothing allocated) while all have the defaults, as
/// a fresh or held message's do.
#[derive(Debug, Default)]
struct RcptMems(Box<[RcptMem]>);

impl RcptMems {
    fn from_attempts(attempts: &[u16]) -> RcptMems {
        if attempts.iter().all(|&n| n == 0) {
            return RcptMems::default();
        }
        RcptMems(
            attempts
                .iter()
                .map(|&attempts| RcptMem {
                    in_flight: false,
                    attempts,
                })
                .collect(),
        )
    }

    fn get(&self, i: usize) -> RcptMem {
        self.0.get(i).copied().unwrap_or_default()
    }

    /// Recipient `i` of `n`, to change.
    fn get_mut(&mut self, i: usize, n: usize) -> Option<&mut RcptMem> {
        if self.0.is_empty() {
            self.0 = vec![RcptMem::default(); n].into_boxed_slice();
        }
        self.0.get_mut(i)
    }

    /// Gives the memory back once every recipient is at the defaults again.
    fn trim(&mut self) {
        if self.0.iter().all(|m| *m == RcptMem::default()) {
            self.0 = Box::default();
        }
    }
}

pub struct QueueManager {
    config: Arc<Config>,
    spool: Spool,
    events: Events,
    delivery: Arc<DeliveryContext>,
    /// Boxed: the table of a million entries stays small (and grows cheaply).
    messages: HashMap<QueueId, Box<Queued>>,
    timers: BinaryHeap<Reverse<(u64, QueueId)>>,
    destinations: HashMap<(Destination, Option<String>), Arc<DestQueue>>,
    submissions: mpsc::UnboundedReceiver<Submission>,
    reports: mpsc::UnboundedReceiver<JobReport>,
    control: mpsc::UnboundedReceiver<Commanded>,
    suppressions: Arc<crate::suppression::Suppressions>,
    operator_state: operator_state::OperatorState<Answer>,
    /// Records waiting for DSNs being committed.
    outbox: dsn::Outbox,
    /// DSN tasks report here when their commits are done.
    notices_done: mpsc::UnboundedSender<dsn::Committed>,
    notices: mpsc::UnboundedReceiver<dsn::Committed>,
    /// Recipients waiting (not final), for intake's backpressure.
    queued: Arc<AtomicU64>,
    /// The spool's replay is still feeding the queue.
    recovering: bool,
}

impl QueueManager {
    /// Starts the queue, empty: what the spool holds comes through [`QueueHandle::recover`].
    pub fn start(
        config: Arc<Config>,
        spool: Spool,
        events: Events,
        suppressions: Arc<crate::suppression::Suppressions>,
        services: Services,
        fleet: Option<tokio::sync::mpsc::UnboundedSender<baton_cluster::FleetChange>>,
    ) -> anyhow::Result<QueueHandle> {
        let (tx, submissions) = mpsc::unbounded_channel();
        let (report_tx, reports) = mpsc::unbounded_channel();
        let (control_tx, control) = mpsc::unbounded_channel();
        let (notices_done, notices) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicU64::new(0));
        let operator_state = operator_state::OperatorState::new(&config.data_dir);
        let delivery = Arc::new(DeliveryContext::new(
            config.clone(),
            services,
            events.clone(),
            spool.clone(),
            report_tx,
        ));
        let qmgr = QueueManager {
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
            operator_state,
            outbox: dsn::Outbox::default(),
            notices_done,
            notices,
            queued: queued.clone(),
            recovering: true,
        };
        // Operator suspensions survive restarts.
        if let Some(saved) = qmgr.operator_state.load() {
            qmgr.delivery.shaper.operator_restore(saved);
        }
        tokio::spawn(qmgr.run());
        Ok(QueueHandle {
            tx,
            control: control_tx,
            queued,
            fleet,
        })
    }

    async fn run(mut self) {
        loop {
            let next_timer = self.timers.peek().map(|Reverse((due, _))| *due);
            let sleep = next_timer.map(|due| Duration::from_millis(due.saturating_sub(now_ms())));
            tokio::select! {
                Some(s) = self.submissions.recv() => self.submitted(s),
                Some(report) = self.reports.recv() => self.apply(report),
                Some((command, reply)) = self.control.recv() => self.handle_control(command, reply),
                Some(committed) = self.notices.recv() => self.notices_committed(committed),
                _ = tokio::time::sleep(sleep.unwrap_or(Duration::from_secs(3600))), if sleep.is_some() => {
                    self.fire_timers();
                }
                else => break,
            }
        }
    }

    fn submitted(&mut self, submission: Submission) {
        match submission {
            Submission::Received(message, body) => self.add_received(*message, body),
            Submission::Recovered(chunk, done) => {
                for r in chunk {
                    self.add(r.envelope, &r.attempts, r.body, None);
                }
                let _ = done.send(());
            }
            Submission::RecoveryDone => self.recovering = false,
        }
    }

    /// A message just received (or a DSN just committed) enters the queue.
    fn add_received(&mut self, message: StoredMessage, body: Option<Bytes>) {
        let mut envelope = message.envelope;
        let attempts = envelope
            .recipients
            .iter_mut()
            .map(|r| std::mem::take(&mut r.attempts).len().min(u16::MAX as usize) as u16)
            .collect::<Vec<_>>();
        self.add(PackedEnvelope::new(envelope), &attempts, message.body, body);
    }

    /// A message enters the queue: its due recipients go to their ready queues (with `body`,
    /// which saves a read back), the others wait for their time. `attempts` counts each
    /// recipient's attempts so far (the envelope carries no history).
    fn add(
        &mut self,
        env: PackedEnvelope,
        attempts: &[u16],
        location: BodyLocation,
        body: Option<Bytes>,
    ) {
        // A recovered envelope stays packed unless dispatch has work for it.
        let envelope = env.view();
        let id = envelope.id;
        let waiting = envelope
            .recipients
            .iter()
            .filter(|r| !r.state.is_final())
            .count();
        drop(envelope);
        baton_events::metrics::queue_depth(waiting as i64);
        self.queued.fetch_add(waiting as u64, Ordering::Relaxed);
        self.messages.insert(
            id,
            Box::new(Queued {
                env,
                location,
                rcpts: RcptMems::from_attempts(attempts),
                work: None,
            }),
        );
        self.dispatch_with(id, body);
    }
}

/// The source recipient `i` must be retried from, if greylisting pinned one.
fn sticky_source(work: &Option<Box<Work>>, i: u32) -> Option<String> {
    let (_, source) = work.as_ref()?.sticky.iter().find(|(r, _)| *r == i)?;
    Some(source.clone())
}

/// What the jobs of a message need, from its envelope.
fn job_message(
    env: &Envelope,
    location: BodyLocation,
    body: Option<Bytes>,
    return_domain: Option<String>,
) -> JobMessage {
    JobMessage {
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
        location,
        body: OnceCell::new_with(body),
        strip_baton_headers: env.meta.strip_baton_headers,
        return_domain,
        tenant: env.meta.tenant.clone(),
        signed: OnceCell::new(),
    }
}

/// The domain of an address ("" when it has none).
fn domain_of(address: &str) -> &str {
    address.rsplit_once('@').map(|(_, d)| d).unwrap_or("")
}

/// Emits an event the policy described.
fn emit(events: &Events, fields: EventFields, id: QueueId, recipient: &str, sender: &str) {
    let mut e = events.new_event(fields.kind, &id.to_string(), recipient, sender);
    e.code = fields.code;
    e.status = fields.status;
    e.response = fields.response;
    e.remote_mta = fields.remote_mta;
    e.attempt = fields.attempt;
    e.size = fields.size;
    e.tls = fields.tls;
    e.source = fields.source;
    e.latency_ms = fields.latency_ms;
    e.class = fields.class.map(|c| c.as_str());
    e.hard = fields.hard;
    e.next_attempt = fields
        .next_attempt_ms
        .and_then(|ms| i64::try_from(ms).ok())
        .and_then(|ms| jiff::Timestamp::from_millisecond(ms).ok())
        .map(|t| t.to_string());
    events.emit(e);
}
