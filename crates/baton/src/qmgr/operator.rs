//! Operator commands: suspend, resume, hold, release, bounce, delete, rebind, flush; the
//! answers to summary and explain are in `explain.rs`.
//!
//! Carries out [`OperatorCommand`]s, already read from the operator's text by
//! `crate::operator`, and answers with typed [`Reply`]s. Changes the queue only through the
//! policy (`policy::released`, `policy::operator_final`) and `perform`/`record`; must not read
//! user text or shape answers' JSON itself.

use std::time::Duration;

use baton_spool::{QueueId, now_ms};
use tokio::sync::oneshot;

use super::QueueManager;
use super::outcome::Notices;
use crate::operator::{
    Answer, Bounced, ControlError, Deleted, Flushed, Held, OperatorCommand, Rebound, Released,
    Reply, Resumed, SuspendFor, Suspended, Target, Written,
};
use crate::policy;
use baton_events::EventKind;

impl QueueManager {
    /// Carries out an operator's command and sends the answer (a suspension's once it is
    /// saved).
    pub(super) fn handle_control(
        &mut self,
        command: OperatorCommand,
        reply: oneshot::Sender<Answer>,
    ) {
        use OperatorCommand as C;
        let answer = match command {
            C::Suspend {
                destination,
                seconds,
            } => return self.suspend(destination, seconds, reply),
            C::Resume {
                destination,
                only_if_suspended,
            } => return self.resume(destination, only_if_suspended, reply),
            C::Explain { id } => self.explain(id).map(Reply::Explain),
            C::ExplainDestination { domain } => {
                Ok(Reply::ExplainDestination(self.explain_destination(&domain)))
            }
            C::Rebind { from, to } => self.rebind(from, to).map(Reply::Rebound),
            C::Bounce { destination } => self.operator_final(&destination, true).map(|n| {
                Reply::Bounced(Bounced {
                    ok: true,
                    destination: destination.text,
                    bounced: n,
                })
            }),
            C::Delete { destination } => self.operator_final(&destination, false).map(|n| {
                Reply::Deleted(Deleted {
                    ok: true,
                    destination: destination.text,
                    deleted: n,
                })
            }),
            C::Flush { destination } => Ok(Reply::Flushed(self.flush(destination))),
            C::Summary => Ok(Reply::Summary(self.summary())),
            C::Hold { target } => self
                .set_hold(&target, true)
                .map(|n| Reply::Held(Held { ok: true, held: n })),
            C::Release { target } => self.set_hold(&target, false).map(|n| {
                Reply::Released(Released {
                    ok: true,
                    released: n,
                })
            }),
            C::Stats(_) => Err(ControlError::new(
                "statistics come from the event log, not the queue manager",
            )),
        };
        let _ = reply.send(answer);
    }

    fn suspend(
        &mut self,
        destination: Written,
        seconds: SuspendFor,
        reply: oneshot::Sender<Answer>,
    ) {
        let what = match destination.target.suspendable() {
            Ok(what) => what,
            Err(refused) => {
                let _ = reply.send(Err(refused));
                return;
            }
        };
        let secs = seconds.seconds();
        let for_ = Duration::from_secs(secs);
        self.delivery.shaper.operator_suspend(&what, for_);
        let answer = Reply::Suspended(Suspended {
            ok: true,
            destination: destination.text.clone(),
            seconds: secs,
        });
        self.save_operator_state((reply, Ok(answer)));
        let why = format!("suspended by the operator for {secs} s");
        self.shaping_event(&destination.text, why);
    }

    fn resume(
        &mut self,
        destination: Written,
        only_if_suspended: bool,
        reply: oneshot::Sender<Answer>,
    ) {
        let what = match destination.target.suspendable() {
            Ok(what) => what,
            Err(refused) => {
                let _ = reply.send(Err(refused));
                return;
            }
        };
        if only_if_suspended && self.delivery.shaper.operator_suspension(&what).is_none() {
            let _ = reply.send(Ok(Reply::Resumed(Resumed {
                ok: true,
                destination: destination.text,
            })));
            return;
        }
        self.delivery.shaper.operator_resume(&what);
        let answer = Reply::Resumed(Resumed {
            ok: true,
            destination: destination.text.clone(),
        });
        self.save_operator_state((reply, Ok(answer)));
        self.shaping_event(&destination.text, "resumed by the operator".into());
        // Whatever waits for the destination may go now.
        let ids: Vec<QueueId> = self.messages.keys().copied().collect();
        for id in &ids {
            self.release(*id, &destination.target);
        }
    }

    /// Moves the queued mail of pool `from` to pool `to`.
    fn rebind(&mut self, from: String, to: String) -> Result<Rebound, ControlError> {
        if !self.config.pools.iter().any(|p| p.name == to) {
            return Err(ControlError::new(format!("no [[pool]] named {to:?}")));
        }
        let mut moved = 0;
        let ids: Vec<QueueId> = self.messages.keys().copied().collect();
        for id in ids {
            let Some(q) = self.messages.get_mut(&id) else {
                continue;
            };
            if self.config.pool_for(&q.env.view()).map(|p| p.name.as_str()) != Some(from.as_str()) {
                continue;
            }
            let env = q.env.open();
            env.meta.pool = Some(to.clone());
            if let Err(e) = self.spool.record_meta(id, &env.meta) {
                tracing::error!(id = %id, error = %e, "cannot record a rebind");
            }
            moved += 1;
            self.release(id, &Target::All);
            self.settle(id);
        }
        self.shaping_event(
            &format!("pool:{from}"),
            format!("{moved} messages rebound to pool {to}"),
        );
        Ok(Rebound {
            ok: true,
            from,
            to,
            messages: moved,
        })
    }

    /// Makes every waiting recipient the destination names (all: [`Target::All`]) due now.
    fn flush(&mut self, destination: Written) -> Flushed {
        let ids: Vec<QueueId> = self.messages.keys().copied().collect();
        let mut flushed = 0;
        for id in ids {
            flushed += self.release(id, &destination.target);
        }
        Flushed {
            ok: true,
            destination: destination.text.to_ascii_lowercase(),
            flushed,
        }
    }

    /// Holds or releases one message, or all; the flag is a spool meta record. Returns how
    /// many messages changed.
    fn set_hold(&mut self, target: &Target, hold: bool) -> Result<usize, ControlError> {
        let ids: Vec<QueueId> = match target {
            Target::All => self.messages.keys().copied().collect(),
            Target::Message(id) if self.messages.contains_key(id) => vec![*id],
            Target::Message(id) => {
                return Err(ControlError::new(format!("no message {id} in the queue")));
            }
            other => {
                return Err(ControlError::new(format!(
                    "hold and release take a queue id or ALL, not {other:?}"
                )));
            }
        };
        let mut changed = 0;
        for id in ids {
            if self.set_held(id, hold) {
                changed += 1;
            }
        }
        Ok(changed)
    }

    /// Holds or releases message `id`; false if it was so already.
    fn set_held(&mut self, id: QueueId, hold: bool) -> bool {
        let Some(q) = self.messages.get_mut(&id) else {
            return false;
        };
        let env = q.env.open();
        if env.meta.hold == hold {
            return false;
        }
        env.meta.hold = hold;
        let said = if hold {
            "held by the operator"
        } else {
            "released by the operator"
        };
        for r in env.recipients.iter().filter(|r| !r.state.is_final()) {
            let mut e = self.events.new_event(
                EventKind::Operator,
                &id.to_string(),
                &r.address,
                &env.sender,
            );
            e.response = Some(said.into());
            self.events.emit(e);
        }
        if let Err(e) = self.spool.record_meta(id, &env.meta) {
            tracing::error!(id = %id, error = %e, "cannot record a hold");
        }
        if !hold {
            self.release(id, &Target::All);
        }
        self.settle(id);
        true
    }

    /// Saves the operator's suspensions off the loop, then answers.
    fn save_operator_state(&self, answer: super::operator_state::Reply<Answer>) {
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

    /// Recipients of message `id` at `domain` (at every domain: none), not out with a worker.
    fn waiting_at(&self, id: QueueId, domain: Option<&str>) -> Vec<u32> {
        let Some(q) = self.messages.get(&id) else {
            return Vec::new();
        };
        q.env
            .view()
            .recipients
            .iter()
            .enumerate()
            .filter(|(i, r)| {
                !r.state.is_final()
                    && !q.rcpts.get(*i).in_flight
                    && domain.is_none_or(|domain| {
                        r.address
                            .rsplit_once('@')
                            .is_some_and(|(_, d)| d.eq_ignore_ascii_case(domain))
                    })
            })
            .map(|(i, _)| i as u32)
            .collect()
    }

    /// The waiting recipients of message `id` that `target` names: those at a domain, or all
    /// of them if the message is the pool's, the tenant's, the one named, or if all are named.
    fn waiting_named(&self, id: QueueId, target: &Target) -> Vec<u32> {
        let Some(q) = self.messages.get(&id) else {
            return Vec::new();
        };
        let named =
            |value: Option<&str>, name: &str| value.is_some_and(|v| v.eq_ignore_ascii_case(name));
        let whole = match target {
            Target::Domain(domain) => return self.waiting_at(id, Some(domain)),
            Target::Pool(pool) => named(
                self.config.pool_for(&q.env.view()).map(|p| p.name.as_str()),
                pool,
            ),
            Target::Tenant(tenant) => named(q.env.view().meta.tenant.as_deref(), tenant),
            Target::Message(named_id) => *named_id == id,
            Target::All => true,
        };
        if whole {
            self.waiting_at(id, None)
        } else {
            Vec::new()
        }
    }

    /// Makes the waiting recipients of message `id` that `target` names due now (after a
    /// resume, flush, release or rebind). Never earlier than the message's send-at time (its
    /// delivery window is kept by `dispatch`). Returns how many recipients it made due.
    pub(super) fn release(&mut self, id: QueueId, target: &Target) -> usize {
        let rcpts = self.waiting_named(id, target);
        let Some(q) = self.messages.get_mut(&id) else {
            return 0;
        };
        let env = q.env.open();
        let send_at = policy::send_at_ms(env.meta.send_at_ms);
        let now = now_ms();
        let mut released = 0;
        for &i in &rcpts {
            if let Some(r) = env.recipients.get_mut(i as usize) {
                r.next_attempt_ms = policy::released(r.next_attempt_ms, send_at);
                released += usize::from(r.next_attempt_ms <= now);
            }
        }
        if !rcpts.is_empty() {
            self.dispatch(id);
        }
        released
    }

    /// Bounces (with a DSN) or deletes every waiting recipient at a domain, or of one message
    /// (postsuper -d); returns how many.
    fn operator_final(&mut self, target: &Written, bounce: bool) -> Result<usize, ControlError> {
        let all = || self.messages.keys().copied().collect();
        let (ids, domain): (Vec<QueueId>, Option<&str>) = match &target.target {
            Target::Message(id) if self.messages.contains_key(id) => (vec![*id], None),
            // A queue id no queued message has is a domain name, as it always was.
            Target::Message(_) => (all(), Some(target.text.as_str())),
            Target::Domain(domain) => (all(), Some(domain.as_str())),
            _ => {
                return Err(ControlError::new(format!(
                    "bounce and delete take a domain, not {:?}",
                    target.text
                )));
            }
        };
        let now = now_ms();
        let mut total = 0;
        for id in ids {
            total += self.finalise(id, domain, bounce, now);
        }
        Ok(total)
    }

    /// Bounces or deletes the waiting recipients of message `id` at `domain` (all: none).
    fn finalise(&mut self, id: QueueId, domain: Option<&str>, bounce: bool, now: u64) -> usize {
        let rcpts = self.waiting_at(id, domain);
        if rcpts.is_empty() {
            return 0;
        }
        let mut updates = Vec::new();
        let mut notices = Notices::default();
        for &i in &rcpts {
            let Some(r) = self
                .messages
                .get_mut(&id)
                .and_then(|q| q.env.open().recipients.get(i as usize))
            else {
                continue;
            };
            let decision = policy::operator_final(r, bounce, now);
            // The metric is labelled by what the operator named ("" for a message).
            let label = Some(domain.unwrap_or(""));
            let update = self.perform(id, i as usize, decision, label, &mut notices);
            updates.extend(update);
        }
        self.send_notices(id, notices);
        let done = self.take_if_done(id);
        self.record(id, updates, done);
        self.settle(id);
        rcpts.len()
    }
}
