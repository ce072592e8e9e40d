//! A delivery worker: the loop over one destination's jobs on a connection it reuses, the
//! holds it applies before each transaction (suspensions, warm-up caps), and the replies it
//! reports and feeds to the adaptive flow.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use baton_client::{Client, OutRcpt, Outgoing, Reply};
use baton_shaping::Limits;

use super::connect::{BY_OPERATOR, ConnectFailure, connect, pool_name, suspension};
use super::maildir::deliver_maildir;
use super::queue::DestQueue;
use super::{DeliveryContext, Destination, Job, JobReport, Outcome, report_all, report_all_until};

/// An open connection with the shaping state it counts against.
pub(super) struct Connection {
    pub(super) client: Client,
    pub(super) limits: Option<Arc<Limits>>,
    /// The egress source this connection left from.
    pub(super) source: Option<String>,
    /// This connection's place under the rule's connection cap; released on drop.
    slot: Option<baton_shaping::ConnectionSlot>,
    _gauge: OpenGauge,
}

impl Connection {
    pub(super) fn new(
        client: Client,
        limits: Option<Arc<Limits>>,
        source: Option<String>,
        slot: Option<baton_shaping::ConnectionSlot>,
    ) -> Connection {
        baton_events::metrics::connection("outbound", true);
        Connection {
            client,
            limits,
            source,
            slot,
            _gauge: OpenGauge,
        }
    }
}

/// Counts an open outbound connection in the metrics while it lives.
struct OpenGauge;

impl Drop for OpenGauge {
    fn drop(&mut self) {
        baton_events::metrics::connection("outbound", false);
    }
}

/// One worker of a destination: takes its jobs one by one over a connection it keeps open
/// while there is work (up to `max_messages_per_connection`), and stops when idle.
pub(super) async fn worker(dest: Arc<DestQueue>, ctx: Arc<DeliveryContext>) {
    let idle = ctx.config.delivery.idle_timeout;
    let mut w = Worker {
        dest,
        ctx,
        conn: None,
    };
    while let Some(job) = w.next_job(idle).await {
        if w.dest.key == Destination::Local && w.ctx.config.local.lmtp.is_none() {
            deliver_maildir(&w.ctx, job).await;
            continue;
        }
        if w.dest.key == Destination::Returns {
            super::returns::take_reports(&w.ctx, job).await;
            continue;
        }
        w.retire_if_used_up().await;
        if w.conn.is_none() {
            w.open_connection(job).await;
            continue;
        }
        w.deliver(job).await;
    }
    w.close().await;
}

struct Worker {
    dest: Arc<DestQueue>,
    ctx: Arc<DeliveryContext>,
    conn: Option<Connection>,
}

impl Worker {
    async fn close(&mut self) {
        if let Some(c) = self.conn.take() {
            c.client.quit().await;
        }
    }

    /// The next job, waiting up to `idle`. Under a cap the fleet shares, an idle connection
    /// does not wait out `idle` when another node waits for one of the cap's leases, nor one
    /// opened without a lease while the fleet's store was away once the store is back: the
    /// worker ends (and closes it) then.
    async fn next_job(&self, idle: Duration) -> Option<Job> {
        let slot = self.conn.as_ref().and_then(|c| c.slot.as_ref());
        match slot.filter(|s| s.shared()) {
            Some(slot) => {
                let give_up = || slot.outlived() || slot.make_way(true);
                self.dest.next_job_unless(idle, Some(&give_up)).await
            }
            None => self.dest.next_job(idle).await,
        }
    }

    /// Closes a connection that has carried its share of transactions.
    async fn retire_if_used_up(&mut self) {
        let global_reuse = self.ctx.config.delivery.max_messages_per_connection;
        let used_up = self.conn.as_ref().is_some_and(|c| {
            let limit = c
                .limits
                .as_ref()
                .and_then(|l| l.rule.max_messages_per_connection)
                .unwrap_or(global_reuse);
            // Opened while the fleet's store was away: it holds no lease, so once the
            // store is back it makes way for one that does.
            // And one over this node's share of a cap that another node waits on makes way.
            c.client.transactions >= limit
                || c.slot
                    .as_ref()
                    .is_some_and(|s| s.outlived() || s.make_way(false))
        });
        if used_up {
            self.close().await;
        }
    }

    /// Connects for `job`. The job goes back to the queue while this worker waits for a
    /// connection (a slot under the destination's cap may take long): workers already
    /// connected take it meanwhile, instead of it waiting for a connection of its own.
    async fn open_connection(&mut self, job: Job) {
        let (dest, ctx) = (&self.dest, &self.ctx);
        dest.retry_first(job);
        let source = match dest.source() {
            Ok(source) => source,
            Err((next, cap)) => {
                // Every source of the pool is at its cap here: all waits for the next.
                let reply = warmup_hold(&dest.key, next, cap);
                for j in dest.take_all() {
                    report_all_until(ctx, &j, &reply, None, Some(next));
                }
                return;
            }
        };
        let pool = dest.pool.as_ref().map(pool_name);
        match connect(ctx, &dest.key, source, pool, || dest.has_jobs()).await {
            Ok(Some(c)) => {
                ctx.connections_opened.fetch_add(1, Ordering::Relaxed);
                self.conn = Some(c);
            }
            // Connected workers took the work while this one waited for a slot.
            Ok(None) => {}
            Err(failure) => {
                // The destination is unreachable or suspended: everything waiting for it
                // waits again.
                let remote = failure.remote.as_deref();
                for j in dest.take_all() {
                    report_all_until(ctx, &j, &failure.reply, remote, failure.not_before);
                }
            }
        }
    }

    /// Sends `job` over the open connection, unless a suspension or a warm-up cap holds it.
    async fn deliver(&mut self, job: Job) {
        let body = match job.message.outgoing_body(&self.ctx).await {
            Ok(body) => body,
            Err(e) => {
                let reply =
                    Reply::local(451, "4.3.0", format!("cannot read the queued message: {e}"));
                report_all(&self.ctx, &job, &reply, None);
                return;
            }
        };
        if self.tenant_held(&job) {
            return;
        }
        let Some(job) = self.unless_suspended(job).await else {
            return;
        };
        let Some(job) = self.within_warmup(job).await else {
            return;
        };
        self.transact(job, body).await;
    }

    /// A suspended tenant's mail waits; other tenants' mail on this connection goes on.
    fn tenant_held(&self, job: &Job) -> bool {
        let Some(tenant) = &job.message.tenant else {
            return false;
        };
        let key = baton_shaping::Suspendable::Tenant(tenant.clone());
        let Some(until) = self.ctx.shaper.operator_suspension(&key) else {
            return false;
        };
        let failure = ConnectFailure::suspended(&self.dest.key, until, BY_OPERATOR);
        let reply = Reply::local(
            451,
            "4.7.0",
            format!("tenant {tenant} is suspended by the operator"),
        );
        report_all_until(&self.ctx, job, &reply, None, failure.not_before);
        true
    }

    /// Suspended while connected (by a backoff rule or the operator): stop before the next
    /// transaction, and everything waiting waits for the end.
    async fn unless_suspended(&mut self, job: Job) -> Option<Job> {
        let Some(connection) = self.conn.as_ref() else {
            return Some(job);
        };
        let pool = self.dest.pool.as_ref().map(pool_name);
        let limits = connection.limits.as_deref();
        let Some((until, by)) = suspension(&self.ctx, &self.dest.key, limits, pool) else {
            return Some(job);
        };
        let failure = ConnectFailure::suspended(&self.dest.key, until, by);
        for j in std::iter::once(job).chain(self.dest.take_all()) {
            report_all_until(&self.ctx, &j, &failure.reply, None, failure.not_before);
        }
        self.close().await;
        None
    }

    /// Paces the transaction under the rule's message rate and counts it against the
    /// source's warm-up cap. At the cap, another source of the pool takes over (the next
    /// connection picks among the rest), or, if none is left, all waits.
    async fn within_warmup(&mut self, job: Job) -> Option<Job> {
        let Some(connection) = self.conn.as_ref() else {
            return Some(job);
        };
        let Some(limits) = connection.limits.clone() else {
            return Some(job);
        };
        limits.message().await;
        let now = baton_spool::now_ms();
        let Err((next, cap)) = limits.warmup_admit(now, job.rcpts.len() as u64).await else {
            return Some(job);
        };
        let source = connection.source.clone().unwrap_or_default();
        self.dest.exhaust(source, next, cap);
        self.dest.retry_first(job);
        self.close().await;
        None
    }

    /// VERP: the job's one recipient's own signed return path (see `send_jobs`), when its
    /// message has a return-path domain and leaves this server.
    fn return_path(&self, job: &Job) -> Option<String> {
        match (&job.message.return_domain, job.rcpts.first()) {
            (Some(domain), Some(&rcpt)) if self.dest.key != Destination::Local => Some(
                self.ctx
                    .returns
                    .tokens
                    .return_path(domain, job.message.id, rcpt),
            ),
            _ => None,
        }
    }

    /// One transaction; its replies go to the queue manager and the adaptive flow.
    async fn transact(&mut self, job: Job, body: bytes::Bytes) {
        let verp = self.return_path(&job);
        let Some(connection) = self.conn.as_mut() else {
            self.dest.retry_first(job);
            return;
        };
        let recipients: Vec<OutRcpt> = job
            .rcpts
            .iter()
            .filter_map(|&i| job.message.recipients.get(i as usize).cloned())
            .collect();
        let outgoing = Outgoing {
            sender: verp.as_deref().unwrap_or(&job.message.sender),
            recipients: &recipients,
            size: body.len() as u64,
            eight_bit: job.message.eight_bit,
            smtputf8: job.message.smtputf8,
            dsn_ret: job.message.dsn_ret,
            dsn_envid: job.message.dsn_envid.as_deref(),
            body: &body,
        };
        let client = &mut connection.client;
        let remote = client.remote.clone();
        let reused = client.transactions > 0;
        let template = Outcome {
            rcpt: 0,
            reply: Reply::local(0, "", ""),
            remote: Some(remote.clone()),
            dsn_passed: client.caps.dsn,
            local: self.dest.key == Destination::Local,
            tls: client
                .tls
                .as_ref()
                .map(|t| t.to_string())
                .or_else(|| client.tls_fallback.clone()),
            not_before: None,
            hold: false,
            source: connection.source.clone(),
        };
        match client.send(&outgoing).await {
            Ok(replies) => {
                if let Some(limits) = &connection.limits {
                    adapt(&self.ctx, &self.dest.key, limits, &replies);
                }
                let outcomes = job
                    .rcpts
                    .iter()
                    .zip(replies)
                    .map(|(&rcpt, reply)| Outcome {
                        rcpt,
                        reply,
                        ..template.clone()
                    })
                    .collect();
                let _ = self.ctx.reports.send(JobReport {
                    id: job.message.id,
                    outcomes,
                });
            }
            Err(e) if reused && e.reply().is_none() && !client.answered_this_send() => {
                // A cached connection the server had closed meanwhile (idle timeout, restart),
                // dead before it answered anything of this transaction: not the message's
                // fault, and nothing of it was taken; it goes again at once on a fresh
                // connection, as Postfix does after a connection-cache miss. A fresh
                // connection failing is reported below, so this cannot loop.
                tracing::debug!(destination = %self.dest.key, error = %e, "reused connection was dead; reconnecting");
                self.conn = None;
                self.dest.retry_first(job);
            }
            Err(e) => {
                // The connection is gone mid-transaction: this job is tried again later.
                self.conn = None;
                let reply = e
                    .reply()
                    .cloned()
                    .unwrap_or_else(|| Reply::local(451, "4.4.2", e.to_string()));
                report_all(&self.ctx, &job, &reply, Some(&remote));
            }
        }
    }
}

/// Feeds a transaction's replies to the adaptive flow: a reply matching a backoff rule pushes
/// the destination back, a delivery helps it recover. Every change is an event.
fn adapt(ctx: &DeliveryContext, dest: &Destination, limits: &Limits, replies: &[Reply]) {
    let pushback = replies.iter().find_map(|r| {
        ctx.shaper
            .backoff_for(r.code, &r.status, &r.line())
            .map(|rule| (rule, r))
    });
    let change = match pushback {
        Some((rule, reply)) => Some(format!(
            "{}; after: {}",
            limits.pushback(rule),
            reply.line()
        )),
        None if replies.iter().any(|r| (200..300).contains(&r.code)) => limits.success(),
        None => None,
    };
    if let Some(change) = change {
        tracing::info!(destination = %dest, "{change}");
        let mut e = ctx
            .events
            .new_event(baton_events::EventKind::Shaping, "", "", "");
        e.destination = Some(dest.to_string());
        e.response = Some(change);
        ctx.events.emit(e);
    }
}

/// The answer for mail held because every source is at its warm-up cap for `dest`.
fn warmup_hold(dest: &Destination, next: u64, cap: u64) -> Reply {
    let until = jiff::Timestamp::from_millisecond(next as i64)
        .map(|t| t.to_string())
        .unwrap_or_default();
    Reply::local(
        451,
        "4.7.0",
        format!("warm-up cap of {cap} for {dest} reached; next allowance {until}"),
    )
}
