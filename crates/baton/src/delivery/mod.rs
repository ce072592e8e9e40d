//! Delivery workers: take jobs from one destination's ready queue, send them over a reused
//! connection (SMTP to MX hosts or a smarthost, LMTP) or write them into Maildirs, and report
//! each recipient's reply to the queue manager.
//!
//! Owns connections and their reuse. It must not change recipient state or the spool; it only
//! reports outcomes (the queue manager applies them).
//!
//! - `queue`: a destination's ready queue and the sources its connections leave from;
//! - `worker`: the loop over a queue's jobs on a reused connection;
//! - `connect`: TLS plan, hosts, MTA-STS, DANE and dialling;
//! - `maildir`: local delivery into Maildirs.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use baton_spool::{BodyLocation, QueueId, Spool};
use bytes::Bytes;
use tokio::sync::{OnceCell, mpsc};

use crate::config::{Config, Smarthost, Transport};
use baton_client::{OutRcpt, Reply};
use baton_dns::Dns;
use baton_shaping::Shaper;

mod connect;
mod maildir;
mod queue;
mod returns;
mod worker;

pub use queue::DestQueue;

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
    /// Reports to a return-path domain (`[bounces]`): read here, not delivered.
    Returns,
}

impl Destination {
    pub fn for_domain(config: &Config, domain: &str) -> Destination {
        if config.bounces.is_return_domain(domain) {
            return Destination::Returns;
        }
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
            Destination::Returns => write!(f, "returns"),
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
    /// The return-path domain: each recipient's transaction leaves with its own signed
    /// `bounces+<token>@<domain>` sender (VERP). None: the sender as given.
    pub return_domain: Option<String>,
    /// Drop X-Baton-* header fields before sending.
    pub strip_baton_headers: bool,
    /// X-Baton-Tenant, lower case.
    pub tenant: Option<String>,
    /// The body as it leaves: DKIM-signed once, for every job of the message.
    pub signed: OnceCell<Bytes>,
}

impl JobMessage {
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

    pub(super) async fn stored_body(&self, spool: &Spool) -> std::io::Result<Bytes> {
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

/// The services delivery uses, built once by the composition root (`app.rs`).
pub struct Services {
    /// DKIM keys by signing domain.
    pub dkim: std::collections::HashMap<String, crate::dkim::DkimKey>,
    pub dns: Dns,
    pub shaper: Shaper,
    /// CA store for checking servers' certificates.
    pub trust: Arc<baton_tls::trust::Trust>,
    /// Recipient domains' MTA-STS policies (none when `[delivery] mta_sts = false`).
    pub mta_sts: Option<baton_dns::mta_sts::MtaSts>,
    /// Return paths and the reader of what comes back to them.
    pub returns: Arc<crate::returns::Returns>,
}

impl DeliveryContext {
    /// The workers' context: the services, plus the queue manager's handles.
    pub fn new(
        config: Arc<Config>,
        services: Services,
        events: baton_events::Events,
        spool: Spool,
        reports: mpsc::UnboundedSender<JobReport>,
    ) -> DeliveryContext {
        let Services {
            dkim,
            dns,
            shaper,
            trust,
            mta_sts,
            returns,
        } = services;
        DeliveryContext {
            config,
            dkim,
            dns,
            shaper,
            events,
            spool,
            reports,
            connections_opened: AtomicU64::new(0),
            trust,
            mta_sts,
            returns,
        }
    }
}

/// Everything a worker needs.
pub struct DeliveryContext {
    pub config: Arc<Config>,
    /// DKIM keys by signing domain.
    pub dkim: std::collections::HashMap<String, crate::dkim::DkimKey>,
    pub dns: Dns,
    pub shaper: Shaper,
    pub events: baton_events::Events,
    pub spool: Spool,
    pub reports: mpsc::UnboundedSender<JobReport>,
    pub connections_opened: AtomicU64,
    /// CA store for checking servers' certificates.
    pub trust: Arc<baton_tls::trust::Trust>,
    /// Recipient domains' MTA-STS policies (none when `[delivery] mta_sts = false`).
    pub mta_sts: Option<baton_dns::mta_sts::MtaSts>,
    pub returns: Arc<crate::returns::Returns>,
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
