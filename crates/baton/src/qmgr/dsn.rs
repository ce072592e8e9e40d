//! Delivery status notifications to the sender, and the order of spool records they impose.
//!
//! A DSN is built and committed by a task of its own (reading the original's body, writing and
//! fsyncing the DSN), so the queue manager's loop never waits on the disk. The invariant stays
//! the one `after_attempt` states: the recipient updates that called for a DSN are recorded
//! only after the DSN is committed. It holds because [`QueueManager::send_notices`] puts a
//! barrier in the message's [`Outbox`] before anything of that job is recorded, every record of
//! the message goes through [`QueueManager::record`] (which queues it behind a barrier), and
//! the barrier lifts only when the task reports the commit done ([`QueueManager::notices_committed`]);
//! then the records go to the spool in their original order. A crash before that loses the
//! updates with the DSN or after it: the attempt and its notice are repeated, never lost. Bounces
//! are never bounced: a message from the null sender gets a `bounce_dropped` event instead.

use std::collections::{HashMap, VecDeque};

use baton_spool::{
    BodyLocation, Envelope, QueueId, RcptState, Recipient, RecipientUpdate, Spool, SpoolError,
    StoredMessage, now_ms,
};
use bytes::Bytes;

use super::QueueManager;
use super::outcome::Notices;
use crate::bounce::{self, ReportedRecipient};
use baton_events::EventKind;

/// What a DSN task reports back to the loop.
pub(super) struct Committed {
    id: QueueId,
    ticket: u64,
    dsns: Vec<Result<Dsn, SpoolError>>,
    /// The recipients each DSN (in the same order) reports on.
    batches: Vec<Vec<String>>,
}

/// A committed DSN, to be queued.
struct Dsn {
    message: StoredMessage,
    /// The body, when the spool keeps it inline.
    body: Bytes,
    /// The original's recipients it reports on.
    reported: Vec<String>,
}

/// Everything a DSN task needs, taken from the queue before it goes.
struct NoticeJob {
    original: Envelope,
    body: Option<Bytes>,
    location: BodyLocation,
    batches: Vec<Vec<ReportedRecipient>>,
    hostname: String,
    spool: Spool,
}

impl QueueManager {
    /// Queues a DSN per batch of `notices` to the sender of message `id`; the message's later
    /// records wait until they are committed.
    pub(super) fn send_notices(&mut self, id: QueueId, notices: Notices) {
        let batches = notices.into_batches();
        let Some(q) = self.messages.get(&id).filter(|_| !batches.is_empty()) else {
            return;
        };
        let original = q.env.view().into_owned();
        if original.sender.is_empty() {
            for r in batches.iter().flatten() {
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
        let addresses = batches
            .iter()
            .map(|b| b.iter().map(|r| r.address.clone()).collect())
            .collect();
        let job = NoticeJob {
            original,
            body: q
                .work
                .as_ref()
                .and_then(|w| w.job.as_ref())
                .and_then(|j| j.body.get().cloned()),
            location: q.location,
            batches,
            hostname: self.config.hostname.clone(),
            spool: self.spool.clone(),
        };
        let ticket = self.outbox.hold(id);
        let done = self.notices_done.clone();
        tokio::spawn(async move {
            // Even a task that failed reports back, or the message's records would wait forever.
            let dsns = tokio::spawn(commit_notices(id, job))
                .await
                .unwrap_or_else(|e| vec![Err(SpoolError::Io(std::io::Error::other(e)))]);
            let _ = done.send(Committed {
                id,
                ticket,
                dsns,
                batches: addresses,
            });
        });
    }

    /// A DSN task is done: its DSNs join the queue, and the records held behind them go to
    /// the spool. A failure notice that could not be committed (a full disk) is not lost: its
    /// recipients wait for another attempt instead of being recorded final without it.
    pub(super) fn notices_committed(&mut self, committed: Committed) {
        let id = committed.id;
        let mut unnoticed = Vec::new();
        for (dsn, batch) in committed.dsns.into_iter().zip(committed.batches) {
            let dsn = match dsn {
                Ok(dsn) => dsn,
                Err(e) => {
                    tracing::error!(original = %id, error = %e, recipients = batch.len(), "cannot queue a DSN; its recipients are tried again later");
                    unnoticed.extend(batch);
                    continue;
                }
            };
            let envelope = &dsn.message.envelope;
            let to = envelope
                .recipients
                .first()
                .map_or("", |r| r.address.as_str());
            tracing::info!(id = %envelope.id, original = %id, to = %to, recipients = dsn.reported.len(), "DSN queued");
            for address in &dsn.reported {
                let e = self
                    .events
                    .new_event(EventKind::DsnQueued, &id.to_string(), address, to);
                self.events.emit(e);
            }
            let body = (!dsn.body.is_empty()).then_some(dsn.body);
            self.add_received(dsn.message, body);
        }
        let retry_at = now_ms().saturating_add(self.config.delivery.retry_min.as_millis() as u64);
        for (mut updates, done) in self.outbox.release(id, committed.ticket) {
            self.unfinish(id, &mut updates, &unnoticed, retry_at);
            self.write_records(id, &updates, done);
        }
        if !unnoticed.is_empty() {
            // Not dispatched now: an expired recipient would fail again at once.
            self.timers.push(std::cmp::Reverse((retry_at, id)));
        }
        if !self.outbox.holds(id) {
            self.finish_if_done(id);
        }
    }

    /// Turns the failed (bounced, expired) recipients among `updates` whose notice could not
    /// be committed back into deferred ones, due at `retry_at`, in the updates and in memory.
    fn unfinish(
        &mut self,
        id: QueueId,
        updates: &mut [RecipientUpdate],
        unnoticed: &[String],
        retry_at: u64,
    ) {
        if unnoticed.is_empty() {
            return;
        }
        let Some(q) = self.messages.get_mut(&id) else {
            return;
        };
        let env = q.env.open();
        for u in updates.iter_mut() {
            let Some(r) = env.recipients.get_mut(u.rcpt as usize) else {
                continue;
            };
            let failed = matches!(u.state, RcptState::Bounced | RcptState::Expired);
            if !failed || !unnoticed.contains(&r.address) {
                continue;
            }
            u.state = RcptState::Deferred;
            u.next_attempt_ms = retry_at;
            r.state = RcptState::Deferred;
            r.next_attempt_ms = retry_at;
            baton_events::metrics::queue_depth(1);
            self.queued
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        q.settle();
    }

    /// Records recipient updates of message `id` (and that it is done) in the spool, after any
    /// DSN of the message still being committed.
    pub(super) fn record(&mut self, id: QueueId, updates: Vec<RecipientUpdate>, done: bool) {
        if self.outbox.holds(id) {
            self.outbox.push(id, updates, done);
        } else {
            self.write_records(id, &updates, done);
        }
    }

    fn write_records(&self, id: QueueId, updates: &[RecipientUpdate], done: bool) {
        let done: &[QueueId] = if done { &[id] } else { &[] };
        if (!updates.is_empty() || !done.is_empty())
            && let Err(e) = self.spool.record(updates, done)
        {
            tracing::error!(id = %id, error = %e, "cannot record delivery results");
        }
    }
}

/// Builds and commits one DSN per batch, in order (failures, delays, successes).
async fn commit_notices(id: QueueId, job: NoticeJob) -> Vec<Result<Dsn, SpoolError>> {
    let spool = job.spool.clone();
    let built = tokio::task::spawn_blocking(move || build_all(id, job))
        .await
        .unwrap_or_else(|e| vec![Err(SpoolError::Io(std::io::Error::other(e)))]);
    let mut dsns = Vec::with_capacity(built.len());
    for b in built {
        let committed = match b {
            Ok((envelope, mut writer, reported)) => {
                // A large DSN spills to its own body file, as any large message does.
                let settled = writer.settle().await;
                let committed = match settled {
                    Ok(()) => spool.commit(&envelope, writer).await,
                    Err(e) => Err(e),
                };
                committed.map(|(location, body)| Dsn {
                    message: StoredMessage {
                        envelope,
                        body: location,
                    },
                    body,
                    reported,
                })
            }
            Err(e) => Err(e),
        };
        dsns.push(committed);
    }
    dsns
}

type Built = Result<(Envelope, baton_spool::BodyWriter, Vec<String>), SpoolError>;

/// The DSNs' envelopes and bodies, ready to commit (blocking: reads the original's body if it
/// is not in memory).
fn build_all(id: QueueId, job: NoticeJob) -> Vec<Built> {
    let body = match job.body {
        Some(b) => Ok(b),
        None => job.spool.load_body(id, job.location),
    };
    let body = body.unwrap_or_else(|e| {
        tracing::error!(id = %id, error = %e, "cannot read the message for its DSN");
        Bytes::new()
    });
    let original = &job.original;
    job.batches
        .iter()
        .map(|recipients| {
            let dsn_id = job.spool.next_id();
            let bytes = bounce::build(
                &job.hostname,
                original,
                &body,
                recipients,
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
                helo: job.hostname.clone(),
                arrived_ms: now_ms(),
                size: bytes.len() as u64,
                meta: Default::default(),
            };
            let mut writer = job.spool.body_writer(dsn_id);
            writer.buf().extend_from_slice(&bytes);
            let reported = recipients.iter().map(|r| r.address.clone()).collect();
            Ok((envelope, writer, reported))
        })
        .collect()
}

/// Spool records of messages whose DSNs are being committed, held back in order.
#[derive(Default)]
pub(super) struct Outbox {
    waiting: HashMap<QueueId, VecDeque<Held>>,
    next_ticket: u64,
}

enum Held {
    /// DSNs being committed: nothing after them is written before they are.
    Barrier { ticket: u64, lifted: bool },
    Records {
        updates: Vec<RecipientUpdate>,
        done: bool,
    },
}

impl Outbox {
    /// A barrier for message `id`; its ticket lifts it.
    fn hold(&mut self, id: QueueId) -> u64 {
        let ticket = self.next_ticket;
        self.next_ticket = self.next_ticket.wrapping_add(1);
        let lifted = false;
        let barrier = Held::Barrier { ticket, lifted };
        self.waiting.entry(id).or_default().push_back(barrier);
        ticket
    }

    pub(super) fn holds(&self, id: QueueId) -> bool {
        self.waiting.contains_key(&id)
    }

    fn push(&mut self, id: QueueId, updates: Vec<RecipientUpdate>, done: bool) {
        let records = Held::Records { updates, done };
        self.waiting.entry(id).or_default().push_back(records);
    }

    /// Lifts the barrier `ticket` of message `id`; returns the records now free to write, in
    /// order (up to the next barrier still up).
    fn release(&mut self, id: QueueId, ticket: u64) -> Vec<(Vec<RecipientUpdate>, bool)> {
        let Some(queue) = self.waiting.get_mut(&id) else {
            return Vec::new();
        };
        for held in queue.iter_mut() {
            if let Held::Barrier { ticket: t, lifted } = held
                && *t == ticket
            {
                *lifted = true;
            }
        }
        let mut free = Vec::new();
        while let Some(held) = queue.pop_front() {
            match held {
                Held::Barrier { lifted: false, .. } => {
                    queue.push_front(held);
                    break;
                }
                Held::Barrier { .. } => {}
                Held::Records { updates, done } => free.push((updates, done)),
            }
        }
        if queue.is_empty() {
            self.waiting.remove(&id);
        }
        free
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(rcpt: u32) -> Vec<RecipientUpdate> {
        vec![RecipientUpdate {
            id: QueueId(1),
            rcpt,
            state: baton_spool::RcptState::Deferred,
            attempt: None,
            next_attempt_ms: 0,
            delay_notified: false,
        }]
    }

    fn rcpts(free: &[(Vec<RecipientUpdate>, bool)]) -> Vec<(u32, bool)> {
        free.iter().map(|(u, done)| (u[0].rcpt, *done)).collect()
    }

    #[test]
    fn records_wait_for_the_dsns_before_them_in_order() {
        let (id, other) = (QueueId(1), QueueId(2));
        let mut outbox = Outbox::default();
        assert!(!outbox.holds(id));
        let first = outbox.hold(id);
        outbox.push(id, update(0), false);
        let second = outbox.hold(id);
        outbox.push(id, update(1), true);
        assert!(outbox.holds(id) && !outbox.holds(other));
        // The second DSN is committed first: nothing moves until the first is.
        assert!(outbox.release(id, second).is_empty());
        assert_eq!(rcpts(&outbox.release(id, first)), [(0, false), (1, true)]);
        assert!(!outbox.holds(id));
        // In commit order: each lifts what follows it.
        let a = outbox.hold(id);
        outbox.push(id, update(2), false);
        let b = outbox.hold(id);
        outbox.push(id, update(3), false);
        assert_eq!(rcpts(&outbox.release(id, a)), [(2, false)]);
        assert!(outbox.holds(id));
        assert_eq!(rcpts(&outbox.release(id, b)), [(3, false)]);
        assert!(!outbox.holds(id));
        assert!(outbox.release(id, b).is_empty());
    }
}
