//! Delivery workers: take jobs from one destination's ready queue, send them over a reused
//! connection (SMTP to MX hosts or a smarthost, LMTP) or write them into Maildirs, and report
//! each recipient's reply to the queue manager.
//!
//! Owns connections and their reuse. It must not change recipient state or the spool; it only
//! reports outcomes (see [`crate::qmgr`]).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use baton_spool::{BodyLocation, QueueId, Spool};
use bytes::Bytes;
use tokio::sync::{Notify, OnceCell, mpsc};

use crate::config::{Config, LmtpTarget, Pool, Smarthost, Source, TlsMode, Transport};
use baton_client::{Client, ClientError, ConnectOptions, OutRcpt, Outgoing, Reply};
use baton_dns::{Dns, DnsFailure};
use baton_shaping::{Limits, Shaper};

/// An open connection with the shaping state it counts against.
struct Connection {
    client: Client,
    limits: Option<Arc<Limits>>,
    /// The egress source this connection left from.
    source: Option<String>,
    /// This connection's place under the rule's connection cap; released on drop.
    _slot: Option<baton_shaping::ConnectionSlot>,
    _gauge: OpenGauge,
}

impl Connection {
    fn new(
        client: Client,
        limits: Option<Arc<Limits>>,
        source: Option<String>,
        slot: Option<baton_shaping::ConnectionSlot>,
    ) -> Connection {
        crate::metrics::connection("outbound", true);
        Connection {
            client,
            limits,
            source,
            _slot: slot,
            _gauge: OpenGauge,
        }
    }
}

/// Counts an open outbound connection in the metrics while it lives.
struct OpenGauge;

impl Drop for OpenGauge {
    fn drop(&mut self) {
        crate::metrics::connection("outbound", false);
    }
}

/// The domain of the first From: address in a message's header section.
fn from_domain(body: &[u8]) -> Option<String> {
    let head = &body[..body.len().min(64 << 10)];
    crate::schedule::from_address(head)?
        .rsplit_once('@')
        .map(|(_, d)| d.trim().to_ascii_lowercase())
}

/// Where a job goes; each has its own ready queue, workers and connections.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Destination {
    /// A domain delivered through its MX hosts.
    Mx(String),
    /// A relay host.
    Smarthost(Smarthost),
    /// Local mailboxes.
    Local,
}

impl Destination {
    pub fn for_domain(config: &Config, domain: &str) -> Destination {
        match config.transport_for(domain) {
            Transport::Mx => Destination::Mx(domain.to_ascii_lowercase()),
            Transport::Smarthost(relay) => Destination::Smarthost(relay),
            Transport::Local => Destination::Local,
        }
    }
}

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Destination::Mx(d) => write!(f, "{d}"),
            Destination::Smarthost(relay) => write!(f, "[{}]:{}", relay.host, relay.port),
            Destination::Local => write!(f, "local"),
        }
    }
}

/// What a job needs of its message; shared by the jobs of one message.
pub struct JobMessage {
    pub id: QueueId,
    pub sender: String,
    /// Every recipient of the message, by index.
    pub recipients: Vec<OutRcpt>,
    pub dsn_ret: Option<&'static str>,
    pub dsn_envid: Option<String>,
    pub eight_bit: bool,
    pub smtputf8: bool,
    pub location: BodyLocation,
    pub body: OnceCell<Bytes>,
    /// Drop X-Baton-* header fields before sending.
    pub strip_baton_headers: bool,
    /// X-Baton-Tenant, lower case.
    pub tenant: Option<String>,
    /// The body as it leaves: DKIM-signed once, for every job of the message.
    pub signed: OnceCell<Bytes>,
}

impl JobMessage {
    /// The same message, its body to be read from the spool when next needed.
    pub fn without_body(&self) -> JobMessage {
        JobMessage {
            id: self.id,
            sender: self.sender.clone(),
            recipients: self.recipients.clone(),
            dsn_ret: self.dsn_ret,
            dsn_envid: self.dsn_envid.clone(),
            eight_bit: self.eight_bit,
            smtputf8: self.smtputf8,
            location: self.location,
            body: OnceCell::new(),
            strip_baton_headers: self.strip_baton_headers,
            tenant: self.tenant.clone(),
            signed: OnceCell::new(),
        }
    }

    /// The body as it is to be sent: read from the spool the first time if it is not in memory,
    /// without X-Baton-* header fields.
    async fn body(&self, spool: &Spool) -> std::io::Result<Bytes> {
        let body = self.stored_body(spool).await?;
        if self.strip_baton_headers {
            Ok(Bytes::from(crate::schedule::strip_baton_headers(&body)))
        } else {
            Ok(body)
        }
    }

    /// The body to relay: [`JobMessage::body`] with a DKIM-Signature for its From: domain
    /// when there is a key for it.
    async fn outgoing_body(&self, ctx: &DeliveryContext) -> std::io::Result<Bytes> {
        if ctx.dkim.is_empty() {
            return self.body(&ctx.spool).await;
        }
        self.signed
            .get_or_try_init(|| async {
                let body = self.body(&ctx.spool).await?;
                let domain = from_domain(&body).or_else(|| {
                    self.sender.rsplit_once('@').map(|(_, d)| d.to_ascii_lowercase())
                });
                let Some(key) = domain.and_then(|d| ctx.dkim.get(&d)) else {
                    return Ok(body);
                };
                match key.sign(&body) {
                    Ok(header) => {
                        let mut signed = Vec::with_capacity(header.len() + body.len());
                        signed.extend_from_slice(header.as_bytes());
                        signed.extend_from_slice(&body);
                        Ok(Bytes::from(signed))
                    }
                    Err(e) => {
                        tracing::error!(id = %self.id, error = %e, "DKIM signing failed; sending unsigned");
                        Ok(body)
                    }
                }
            })
            .await
            .cloned()
    }

    async fn stored_body(&self, spool: &Spool) -> std::io::Result<Bytes> {
        self.body
            .get_or_try_init(|| async {
                let spool = spool.clone();
                let (id, location) = (self.id, self.location);
                tokio::task::spawn_blocking(move || spool.load_body(id, location))
                    .await
                    .map_err(std::io::Error::other)?
            })
            .await
            .cloned()
    }
}

/// One message to some of its recipients, all for one destination.
pub struct Job {
    pub message: Arc<JobMessage>,
    pub rcpts: Vec<u32>,
}

/// A recipient's result from one attempt.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub rcpt: u32,
    pub reply: Reply,
    /// The host that gave the reply, if any.
    pub remote: Option<String>,
    /// The next hop took DSN parameters, so success notices are its business.
    pub dsn_passed: bool,
    /// Delivered locally (Maildir or LMTP) rather than relayed.
    pub local: bool,
    /// TLS used, e.g. "TLSv1_3 TLS13_AES_256_GCM_SHA384 (not verified)".
    pub tls: Option<String>,
    /// Not to be tried again before this (ms since the epoch).
    pub not_before: Option<u64>,
    /// Nothing was attempted: Baton's own shaping holds the recipient until `not_before`.
    pub hold: bool,
    /// The egress source the attempt left from (a greylisted retry leaves from it again).
    pub source: Option<String>,
}

/// A finished job, for the queue manager.
pub struct JobReport {
    pub id: QueueId,
    pub outcomes: Vec<Outcome>,
}

/// Everything a worker needs.
pub struct DeliveryContext {
    pub config: Arc<Config>,
    /// DKIM keys by signing domain.
    pub dkim: std::collections::HashMap<String, crate::dkim::DkimKey>,
    pub dns: Dns,
    pub shaper: Shaper,
    pub events: crate::events::Events,
    pub spool: Spool,
    pub reports: mpsc::UnboundedSender<JobReport>,
    pub connections_opened: AtomicU64,
    /// CA store for checking servers' certificates.
    pub trust: Arc<baton_tls::trust::Trust>,
    /// Recipient domains' MTA-STS policies (none when `[delivery] mta_sts = false`).
    pub mta_sts: Option<baton_dns::mta_sts::MtaSts>,
}

/// The TLS a destination gets and why.
struct TlsPlan {
    mode: TlsMode,
    /// For the delivery record: "route", "mta-sts", "opportunistic"...
    label: &'static str,
    /// An MTA-STS policy in `enforce` mode: only its MX hosts may be used.
    sts: Option<baton_dns::mta_sts::Policy>,
    /// Look for DANE TLSA records (only where no route overrides, and the MX set validated).
    dane: bool,
}

fn mode_label(mode: TlsMode) -> &'static str {
    match mode {
        TlsMode::Opportunistic => "opportunistic",
        TlsMode::Required => "required",
        TlsMode::Verify => "verify",
        TlsMode::Disabled => "disabled",
    }
}

/// Precedence: a route's `tls`, then DANE (decided per host), then an MTA-STS policy in
/// `enforce` mode (RFC 8461 §2: DANE wins where both exist), then `[delivery] tls`.
async fn tls_plan(ctx: &DeliveryContext, dest: &Destination) -> TlsPlan {
    let fixed = |mode: TlsMode, label: &'static str| TlsPlan {
        mode,
        label,
        sts: None,
        dane: false,
    };
    let domain = match dest {
        Destination::Smarthost(relay) => return fixed(relay.tls, "route"),
        Destination::Local => return fixed(TlsMode::Disabled, "local"),
        Destination::Mx(domain) => domain,
    };
    if let Some(mode) = ctx.config.route_tls(domain) {
        return fixed(mode, "route");
    }
    let default = ctx.config.delivery.tls;
    let dane = ctx.config.delivery.dane && default != TlsMode::Disabled;
    if let Some(sts) = &ctx.mta_sts
        && let Some(policy) = sts.policy(&ctx.dns, domain).await
    {
        match policy.mode {
            baton_dns::mta_sts::Mode::Enforce => {
                return TlsPlan {
                    mode: TlsMode::Verify,
                    label: "mta-sts",
                    sts: Some(policy),
                    dane,
                };
            }
            baton_dns::mta_sts::Mode::Testing => {
                return TlsPlan {
                    mode: default,
                    label: "mta-sts testing",
                    sts: Some(policy),
                    dane,
                };
            }
            baton_dns::mta_sts::Mode::None => {}
        }
    }
    TlsPlan {
        mode: default,
        label: mode_label(default),
        sts: None,
        dane,
    }
}

/// DANE for one MX host (RFC 7672): usable TLSA records validated by the resolver make
/// verified TLS mandatory, authenticated by those records; TLSA records that are all unusable
/// still make TLS mandatory. None: DANE does not apply (insecure or no records).
async fn dane_for(
    ctx: &DeliveryContext,
    host: &str,
    port: u16,
) -> Result<Option<(TlsMode, Vec<baton_tls::trust::Tlsa>)>, ConnectFailure> {
    match ctx.dns.tlsa(host, port).await {
        Ok(answer) if answer.secure && !answer.records.is_empty() => {
            let usable: Vec<_> = answer.records.into_iter().filter(|r| r.usable()).collect();
            if usable.is_empty() {
                Ok(Some((TlsMode::Required, usable)))
            } else {
                Ok(Some((TlsMode::Verify, usable)))
            }
        }
        Ok(_) => Ok(None),
        // A validated MX host whose TLSA lookup fails must not fall back to plaintext.
        Err(f) => Err(ConnectFailure::new(
            451,
            "4.7.5",
            format!("DANE: TLSA lookup for {host} failed: {f}"),
        )),
    }
}

/// One destination's ready queue and its workers.
pub struct DestQueue {
    pub key: Destination,
    /// The egress pool whose sources this queue's connections bind to.
    pub pool: Option<Pool>,
    state: Mutex<DestState>,
    notify: Notify,
    max_workers: usize,
}

#[derive(Default)]
struct DestState {
    jobs: VecDeque<Job>,
    workers: usize,
    idle: usize,
    /// Sources of the pool at their warm-up cap here: until when (ms) and the cap.
    exhausted: std::collections::HashMap<String, (u64, u64)>,
}

impl DestQueue {
    pub fn new(key: Destination, pool: Option<Pool>, max_workers: usize) -> Arc<DestQueue> {
        Arc::new(DestQueue {
            key,
            pool,
            state: Mutex::default(),
            notify: Notify::new(),
            max_workers,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, DestState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a job: an idle worker is woken for it, and a new worker starts (if the cap
    /// allows) when more jobs wait than idle workers could take, so that a burst pushed at
    /// once is spread over connections, not served by the one idle worker.
    pub fn push(self: &Arc<Self>, job: Job, ctx: &Arc<DeliveryContext>) {
        let mut state = self.lock();
        state.jobs.push_back(job);
        let wake = state.idle > 0;
        let spawn = state.jobs.len() > state.idle && state.workers < self.max_workers;
        if spawn {
            state.workers += 1;
        }
        drop(state);
        if wake {
            self.notify.notify_one();
        }
        if spawn {
            tokio::spawn(worker(self.clone(), ctx.clone()));
        }
    }

    /// The next job, waiting up to `idle` for one; None when the worker should stop.
    async fn next_job(&self, idle: Duration) -> Option<Job> {
        loop {
            {
                let mut state = self.lock();
                if let Some(job) = state.jobs.pop_front() {
                    return Some(job);
                }
                state.idle += 1;
            }
            let woken = tokio::time::timeout(idle, self.notify.notified())
                .await
                .is_ok();
            let mut state = self.lock();
            state.idle -= 1;
            if let Some(job) = state.jobs.pop_front() {
                return Some(job);
            }
            if !woken {
                // Decided under the lock, so a push now sees one worker fewer and starts one.
                state.workers -= 1;
                return None;
            }
        }
    }

    /// Puts a job back at the head of the queue, for this worker or an idle one to take.
    fn retry_first(&self, job: Job) {
        let mut state = self.lock();
        state.jobs.push_front(job);
        let wake = state.idle > 0;
        drop(state);
        if wake {
            self.notify.notify_one();
        }
    }

    /// A source of the pool to connect from, at random by weight among those not at their
    /// warm-up cap here; None without a pool; Err with the earliest (next allowance, cap) when
    /// every source is at its cap.
    fn source(&self) -> Result<Option<&Source>, (u64, u64)> {
        let Some(pool) = &self.pool else {
            return Ok(None);
        };
        let now = baton_spool::now_ms();
        let mut state = self.lock();
        state.exhausted.retain(|_, (next, _)| *next > now);
        let open: Vec<&(Source, u32)> = pool
            .sources
            .iter()
            .filter(|(s, _)| !state.exhausted.contains_key(&s.name))
            .collect();
        if open.is_empty() {
            let earliest = state.exhausted.values().min_by_key(|(next, _)| *next);
            return Err(earliest.copied().unwrap_or((now + 1000, 0)));
        }
        Ok(Some(pick_source(&open)))
    }

    /// `source` reached its warm-up cap here until `next`: others of the pool send meanwhile.
    fn exhaust(&self, source: String, next: u64, cap: u64) {
        self.lock().exhausted.insert(source, (next, cap));
    }

    /// Every waiting job (a destination found unreachable defers them all at once).
    fn take_all(&self) -> Vec<Job> {
        self.lock().jobs.drain(..).collect()
    }
}

async fn worker(dest: Arc<DestQueue>, ctx: Arc<DeliveryContext>) {
    let idle = ctx.config.delivery.idle_timeout;
    let mut conn: Option<Connection> = None;
    while let Some(job) = dest.next_job(idle).await {
        if dest.key == Destination::Local && ctx.config.local.lmtp.is_none() {
            deliver_maildir(&ctx, job).await;
            continue;
        }
        let global_reuse = ctx.config.delivery.max_messages_per_connection;
        let used_up = conn.as_ref().is_some_and(|c| {
            let limit = c
                .limits
                .as_ref()
                .and_then(|l| l.rule.max_messages_per_connection)
                .unwrap_or(global_reuse);
            c.client.transactions >= limit
        });
        if used_up && let Some(old) = conn.take() {
            old.client.quit().await;
        }
        if conn.is_none() {
            // The job goes back to the queue while this worker waits for a connection (a slot
            // under the destination's cap may take long): workers already connected take it
            // meanwhile, instead of it waiting for a connection of its own.
            dest.retry_first(job);
            let source = match dest.source() {
                Ok(source) => source,
                Err((next, cap)) => {
                    // Every source of the pool is at its cap here: all waits for the next.
                    let reply = warmup_hold(&dest.key, next, cap);
                    for j in dest.take_all() {
                        report_all_until(&ctx, &j, &reply, None, Some(next));
                    }
                    continue;
                }
            };
            let pool = dest.pool.as_ref().map(pool_name);
            match connect(&ctx, &dest.key, source, pool).await {
                Ok(c) => {
                    ctx.connections_opened.fetch_add(1, Ordering::Relaxed);
                    conn = Some(c);
                }
                Err(failure) => {
                    // The destination is unreachable or suspended: everything waiting for it
                    // waits again.
                    let remote = failure.remote.as_deref();
                    for j in dest.take_all() {
                        report_all_until(&ctx, &j, &failure.reply, remote, failure.not_before);
                    }
                }
            }
            continue;
        }
        let body = match job.message.outgoing_body(&ctx).await {
            Ok(body) => body,
            Err(e) => {
                let reply =
                    Reply::local(451, "4.3.0", format!("cannot read the queued message: {e}"));
                report_all(&ctx, &job, &reply, None);
                continue;
            }
        };
        if let Some(tenant) = &job.message.tenant
            && let Some(until) = ctx
                .shaper
                .operator_suspended_key(&format!("tenant:{tenant}"))
        {
            // This tenant's mail waits; other tenants' mail on this connection goes on.
            let failure = ConnectFailure::suspended(&dest.key, until, BY_OPERATOR);
            let reply = Reply::local(
                451,
                "4.7.0",
                format!("tenant {tenant} is suspended by the operator"),
            );
            report_all_until(&ctx, &job, &reply, None, failure.not_before);
            continue;
        }
        let Some(connection) = conn.as_mut() else {
            continue;
        };
        let pool = dest.pool.as_ref().map(pool_name);
        if let Some((until, by)) = suspension(&ctx, &dest.key, connection.limits.as_deref(), pool) {
            // Suspended while connected (by a backoff rule or the operator): stop before the
            // next transaction, and everything waiting waits for the end.
            let failure = ConnectFailure::suspended(&dest.key, until, by);
            for j in std::iter::once(job).chain(dest.take_all()) {
                report_all_until(&ctx, &j, &failure.reply, None, failure.not_before);
            }
            if let Some(c) = conn.take() {
                c.client.quit().await;
            }
            continue;
        }
        if let Some(limits) = connection.limits.clone() {
            limits.message().await;
            if let Err((next, cap)) =
                limits.warmup_take(baton_spool::now_ms(), job.rcpts.len() as u64)
            {
                // This source is at its warm-up cap here: another of the pool takes over (the
                // next connection picks among the rest), or, if none is left, all waits.
                let source = connection.source.clone().unwrap_or_default();
                dest.exhaust(source, next, cap);
                dest.retry_first(job);
                if let Some(c) = conn.take() {
                    c.client.quit().await;
                }
                continue;
            }
        }
        let client = &mut connection.client;
        let recipients: Vec<OutRcpt> = job
            .rcpts
            .iter()
            .filter_map(|&i| job.message.recipients.get(i as usize).cloned())
            .collect();
        let outgoing = Outgoing {
            sender: &job.message.sender,
            recipients: &recipients,
            size: body.len() as u64,
            eight_bit: job.message.eight_bit,
            smtputf8: job.message.smtputf8,
            dsn_ret: job.message.dsn_ret,
            dsn_envid: job.message.dsn_envid.as_deref(),
            body: &body,
        };
        let source_name = connection.source.clone();
        let remote = client.remote.clone();
        let dsn_passed = client.caps.dsn;
        let tls = client
            .tls
            .as_ref()
            .map(|t| t.to_string())
            .or_else(|| client.tls_fallback.clone());
        let local = dest.key == Destination::Local;
        let reused = client.transactions > 0;
        match client.send(&outgoing).await {
            Ok(replies) => {
                if let Some(limits) = connection.limits.clone() {
                    adapt(&ctx, &dest.key, &limits, &replies);
                }
                let outcomes = job
                    .rcpts
                    .iter()
                    .zip(replies)
                    .map(|(&rcpt, reply)| Outcome {
                        rcpt,
                        reply,
                        remote: Some(remote.clone()),
                        dsn_passed,
                        local,
                        tls: tls.clone(),
                        not_before: None,
                        hold: false,
                        source: source_name.clone(),
                    })
                    .collect();
                let _ = ctx.reports.send(JobReport {
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
                tracing::debug!(destination = %dest.key, error = %e, "reused connection was dead; reconnecting");
                conn = None;
                dest.retry_first(job);
            }
            Err(e) => {
                // The connection is gone mid-transaction: this job is tried again later.
                conn = None;
                let reply = e
                    .reply()
                    .cloned()
                    .unwrap_or_else(|| Reply::local(451, "4.4.2", e.to_string()));
                report_all(&ctx, &job, &reply, Some(&remote));
            }
        }
    }
    if let Some(c) = conn {
        c.client.quit().await;
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
            .new_event(crate::events::EventKind::Shaping, "", "", "");
        e.destination = Some(dest.to_string());
        e.response = Some(change);
        ctx.events.emit(e);
    }
}

/// Reports the same reply for every recipient of a job.
fn report_all(ctx: &DeliveryContext, job: &Job, reply: &Reply, remote: Option<&str>) {
    report_all_until(ctx, job, reply, remote, None);
}

/// [`report_all`], with a time before which the recipients are not to be tried again; with
/// one, nothing was attempted: the recipients are held, not deferred.
fn report_all_until(
    ctx: &DeliveryContext,
    job: &Job,
    reply: &Reply,
    remote: Option<&str>,
    not_before: Option<u64>,
) {
    let hold = not_before.is_some();
    let outcomes = job
        .rcpts
        .iter()
        .map(|&rcpt| Outcome {
            rcpt,
            reply: reply.clone(),
            remote: remote.map(str::to_string),
            dsn_passed: false,
            local: false,
            tls: None,
            not_before,
            hold,
            source: None,
        })
        .collect();
    let _ = ctx.reports.send(JobReport {
        id: job.message.id,
        outcomes,
    });
}

struct ConnectFailure {
    reply: Reply,
    remote: Option<String>,
    not_before: Option<u64>,
}

impl ConnectFailure {
    fn new(code: u16, status: &str, text: String) -> Self {
        ConnectFailure {
            reply: Reply::local(code, status, text),
            remote: None,
            not_before: None,
        }
    }

    /// The destination is suspended until `until`, `by` a backoff rule or the operator.
    fn suspended(dest: &Destination, until: tokio::time::Instant, by: &str) -> Self {
        let ms = until.saturating_duration_since(tokio::time::Instant::now());
        let at = baton_spool::now_ms() + ms.as_millis() as u64;
        let when = jiff::Timestamp::from_millisecond(at as i64)
            .map(|t| t.to_string())
            .unwrap_or_default();
        ConnectFailure {
            reply: Reply::local(
                451,
                "4.7.0",
                format!("{dest} is suspended by {by} until {when}"),
            ),
            remote: None,
            not_before: Some(at),
        }
    }
}

const BY_BACKOFF: &str = "a backoff rule";
const BY_OPERATOR: &str = "the operator";

/// Whether `dest` is suspended now, until when and by whom: its adaptive state (`limits`) or
/// the operator (the destination, or the pool `pool`). Asked before every connection and every
/// transaction, so a suspension stops connections already open too.
fn suspension(
    ctx: &DeliveryContext,
    dest: &Destination,
    limits: Option<&Limits>,
    pool: Option<&str>,
) -> Option<(tokio::time::Instant, &'static str)> {
    if let Some(until) = limits.and_then(|l| l.suspended_until()) {
        return Some((until, BY_BACKOFF));
    }
    let domain = match dest {
        Destination::Mx(d) => d.as_str(),
        Destination::Smarthost(relay) => relay.host.as_str(),
        Destination::Local => "local",
    };
    ctx.shaper
        .operator_suspended(domain, pool)
        .map(|until| (until, BY_OPERATOR))
}

/// A pool's own name: a greylisted retry's pool pinned to one source is "NAME@SOURCE".
fn pool_name(pool: &Pool) -> &str {
    pool.name.split('@').next().unwrap_or(&pool.name)
}

/// A source from the pool, at random by weight.
fn pick_source<'a>(sources: &[&'a (Source, u32)]) -> &'a Source {
    use rand::RngExt;
    let total: u32 = sources.iter().map(|(_, w)| w).sum();
    let mut ticket = rand::rng().random_range(0..total.max(1));
    for (source, weight) in sources {
        if ticket < *weight {
            return source;
        }
        ticket -= weight;
    }
    &sources[0].0
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

async fn connect(
    ctx: &DeliveryContext,
    dest: &Destination,
    source: Option<&Source>,
    pool: Option<&str>,
) -> Result<Connection, ConnectFailure> {
    let config = &ctx.config;
    let auth = match dest {
        Destination::Smarthost(relay) => relay.auth.as_ref(),
        _ => None,
    };
    let plan = tls_plan(ctx, dest).await;
    let options = ConnectOptions {
        helo_name: source
            .and_then(|s| s.ehlo.as_deref())
            .unwrap_or(&config.hostname),
        connect_timeout: config.delivery.connect_timeout,
        data_block_timeout: config.delivery.data_timeout,
        line_limit: config.delivery.line_length_limit,
        tls: plan.mode,
        auth: auth.map(|(u, p)| (u.as_str(), p.as_str())),
        bind: source.map(|s| s.address),
        trust: Some(&ctx.trust),
        dane: None,
        policy: plan.label,
    };
    let (mut hosts, port, lmtp) = match dest {
        Destination::Mx(domain) => {
            let hosts = ctx.dns.mx_hosts(domain).await.map_err(|f| match f {
                DnsFailure::NullMx => ConnectFailure::new(
                    550,
                    "5.1.10",
                    format!("{domain} accepts no mail (null MX, RFC 7505)"),
                ),
                DnsFailure::NotFound(why) => ConnectFailure::new(
                    550,
                    "5.1.2",
                    format!("Host or domain name not found: {why}"),
                ),
                DnsFailure::Temporary(why) => {
                    ConnectFailure::new(451, "4.4.3", format!("DNS lookup failed: {why}"))
                }
            })?;
            (
                hosts.into_iter().map(|h| h.name).collect::<Vec<_>>(),
                config.delivery.smtp_port,
                false,
            )
        }
        Destination::Smarthost(relay) => (vec![relay.host.clone()], relay.port, false),
        Destination::Local => match &config.local.lmtp {
            Some(LmtpTarget::Unix(path)) => {
                let client = Client::connect_unix(path, &options)
                    .await
                    .map_err(|e| ConnectFailure::new(451, "4.4.1", e.to_string()))?;
                return Ok(Connection::new(client, None, None, None));
            }
            Some(LmtpTarget::Tcp(addr)) => (vec![addr.ip().to_string()], addr.port(), true),
            None => {
                return Err(ConnectFailure::new(
                    451,
                    "4.3.5",
                    "no LMTP target configured".into(),
                ));
            }
        },
    };
    if let Some(policy) = &plan.sts {
        if policy.mode == baton_dns::mta_sts::Mode::Enforce {
            hosts.retain(|h| policy.allows(h));
            if hosts.is_empty() {
                return Err(ConnectFailure::new(
                    451,
                    "4.7.5",
                    format!(
                        "no MX host of {dest} matches its MTA-STS policy (mx: {})",
                        policy.mx.join(", ")
                    ),
                ));
            }
        } else {
            // Testing mode: report, and keep the MX preference order as it is.
            let outside: Vec<&String> = hosts.iter().filter(|h| !policy.allows(h)).collect();
            if !outside.is_empty() {
                tracing::warn!(destination = %dest, hosts = ?outside, "MX hosts outside the MTA-STS policy (testing mode: used anyway)");
            }
        }
    }
    // DANE applies only where the MX set itself validated (RFC 7672 §2.2.1).
    let dane_hosts = match dest {
        Destination::Mx(domain) if plan.dane => match ctx.dns.mx_secure(domain).await {
            Ok(answer) if answer.secure => answer.records,
            _ => Vec::new(),
        },
        _ => Vec::new(),
    };
    // Shaping: the rule is known once the MX hosts are (site rules match on them); wait for a
    // connection slot under it before dialling.
    // Limits apply per source × destination.
    let limits = match dest {
        Destination::Mx(domain) => Some(ctx.shaper.limits_for(source, domain, &hosts)),
        Destination::Smarthost(relay) => Some(ctx.shaper.limits_for(source, &relay.host, &hosts)),
        Destination::Local => None,
    };
    if let Some((until, by)) = suspension(ctx, dest, limits.as_deref(), pool) {
        return Err(ConnectFailure::suspended(dest, until, by));
    }
    let slot = match &limits {
        Some(l) => Some(l.connection().await),
        None => None,
    };
    let mut last: Option<ConnectFailure> = None;
    let mut all_not_found = true;
    for host in &hosts {
        let addresses = match ctx.dns.addresses(host).await {
            Ok(a) => a,
            Err(f) => {
                if !matches!(f, DnsFailure::NotFound(_)) {
                    all_not_found = false;
                }
                let text = match f {
                    DnsFailure::NotFound(w) | DnsFailure::Temporary(w) => w,
                    DnsFailure::NullMx => format!("{host}: null MX"),
                };
                last = Some(ConnectFailure::new(451, "4.4.3", text));
                continue;
            }
        };
        all_not_found = false;
        let dane = if dane_hosts.iter().any(|h| h.eq_ignore_ascii_case(host)) {
            match dane_for(ctx, host, port).await {
                Ok(d) => d,
                Err(failure) => {
                    last = Some(failure);
                    continue;
                }
            }
        } else {
            None
        };
        let options = match &dane {
            Some((mode, records)) => ConnectOptions {
                tls: *mode,
                dane: Some(records),
                policy: "dane",
                ..options
            },
            None => options,
        };
        for ip in addresses {
            match connect_host(SocketAddr::new(ip, port), host, &options, lmtp).await {
                Ok(client) => {
                    return Ok(Connection::new(
                        client,
                        limits,
                        source.map(|s| s.name.clone()),
                        slot,
                    ));
                }
                Err(e) => {
                    tracing::debug!(destination = %dest, error = %e, "connection attempt failed");
                    last = Some(connect_error(e));
                }
            }
        }
    }
    if all_not_found && !hosts.is_empty() {
        return Err(ConnectFailure::new(
            550,
            "5.4.4",
            format!("no address for any mail host of {dest}"),
        ));
    }
    Err(last
        .unwrap_or_else(|| ConnectFailure::new(451, "4.4.1", format!("no mail host for {dest}"))))
}

/// Connects to one address. Under plain opportunistic TLS (no DANE, MTA-STS, `required` or
/// `verify` policy, no credentials to protect), a server whose STARTTLS handshake fails gets
/// the mail in plaintext on a fresh connection at once, as Exim does: encryption was only
/// ever on offer, and a broken TLS stack must not strand the mail until it expires.
async fn connect_host(
    addr: SocketAddr,
    host: &str,
    options: &ConnectOptions<'_>,
    lmtp: bool,
) -> Result<Client, ClientError> {
    let failure = match Client::connect_tcp(addr, host, options, lmtp).await {
        Err(e @ ClientError::Tls(..))
        | Err(e @ ClientError::Timeout(_, "in the TLS handshake")) => e,
        other => return other,
    };
    let may_fall_back =
        options.tls == TlsMode::Opportunistic && options.auth.is_none() && options.dane.is_none();
    if !may_fall_back {
        return Err(failure);
    }
    tracing::info!(remote = %addr, error = %failure, "STARTTLS failed; retrying in plaintext");
    let plain = ConnectOptions {
        tls: TlsMode::Disabled,
        ..*options
    };
    let mut client = Client::connect_tcp(addr, host, &plain, lmtp).await?;
    client.tls_fallback = Some(format!(
        "none (STARTTLS failed: {failure}; sent in plaintext, opportunistic TLS)"
    ));
    Ok(client)
}

fn connect_error(e: ClientError) -> ConnectFailure {
    match e {
        ClientError::Policy(remote, status, why) => ConnectFailure {
            reply: Reply::local(451, status, format!("{remote}: {why}")),
            remote: Some(remote),
            not_before: None,
        },
        ClientError::Rejected(remote, what, _) => {
            // A refusing greeting is tried elsewhere and, if all refuse, later: not final.
            let text = format!("{remote} refused the connection: {what}");
            ConnectFailure {
                reply: Reply::local(451, "4.4.2", text),
                remote: Some(remote),
                not_before: None,
            }
        }
        other => ConnectFailure::new(451, "4.4.1", other.to_string()),
    }
}

// ---------------------------------------------------------------- Maildir

static MAILDIR_SEQ: AtomicU64 = AtomicU64::new(0);

async fn deliver_maildir(ctx: &Arc<DeliveryContext>, job: Job) {
    let body = match job.message.body(&ctx.spool).await {
        Ok(b) => b,
        Err(e) => {
            let reply = Reply::local(451, "4.3.0", format!("cannot read the queued message: {e}"));
            report_all(ctx, &job, &reply, None);
            return;
        }
    };
    let config = ctx.config.clone();
    let message = job.message.clone();
    let rcpts = job.rcpts.clone();
    let outcomes = tokio::task::spawn_blocking(move || {
        rcpts
            .iter()
            .map(|&rcpt| {
                let address = message
                    .recipients
                    .get(rcpt as usize)
                    .map(|r| r.address.clone())
                    .unwrap_or_default();
                let reply = match config.local_mailbox(&address) {
                    None => {
                        Reply::local(550, "5.1.1", format!("<{address}>: no such local mailbox"))
                    }
                    Some(user) => {
                        let dir = config.local.maildir_root.join(&user);
                        match write_maildir(
                            &dir,
                            &config.hostname,
                            &message.sender,
                            &address,
                            &body,
                        ) {
                            Ok(name) => Reply::local(
                                250,
                                "2.0.0",
                                format!("delivered to maildir as {name}"),
                            ),
                            Err(e) => Reply::local(
                                451,
                                "4.3.0",
                                format!("maildir {}: {e}", dir.display()),
                            ),
                        }
                    }
                };
                Outcome {
                    rcpt,
                    reply,
                    remote: None,
                    dsn_passed: false,
                    local: true,
                    tls: None,
                    not_before: None,
                    hold: false,
                    source: None,
                }
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
    let _ = ctx.reports.send(JobReport {
        id: job.message.id,
        outcomes,
    });
}

/// Writes one message into a Maildir: tmp/ then rename into new/, fsynced (the Maildir
/// protocol). Adds Return-Path and Delivered-To, as local delivery agents do.
fn write_maildir(
    dir: &Path,
    hostname: &str,
    sender: &str,
    rcpt: &str,
    body: &[u8],
) -> std::io::Result<String> {
    use std::io::Write;
    for sub in ["tmp", "new", "cur"] {
        std::fs::create_dir_all(dir.join(sub))?;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let seq = MAILDIR_SEQ.fetch_add(1, Ordering::Relaxed);
    let name = format!(
        "{}.M{}P{}Q{seq}.{}",
        now.as_secs(),
        now.subsec_micros(),
        std::process::id(),
        hostname.replace(['/', ':'], "_")
    );
    let tmp: PathBuf = dir.join("tmp").join(&name);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)?;
    let written = (|| {
        file.write_all(format!("Return-Path: <{sender}>\r\nDelivered-To: {rcpt}\r\n").as_bytes())?;
        file.write_all(body)?;
        file.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, dir.join("new").join(&name))?;
    std::fs::File::open(dir.join("new"))?.sync_all()?;
    Ok(name)
}
