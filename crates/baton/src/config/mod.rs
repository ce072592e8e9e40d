//! Configuration: the TOML file, its embedded defaults and its validation.
//!
//! Parsing keeps each value's position so that every error names its line and comes with a
//! hint. The rest of Baton sees only the validated [`Config`].
//!
//! The files here:
//! - `mod.rs`: the validated [`Config`], its sections that are the binary's own, the lookups
//!   on it (`transport_for`, `route_tls`, `pool_for`, `local_mailbox`) and the entry points
//!   [`Config::parse`] (text only, no file I/O), [`Config::load`] and [`Config::defaults`].
//! - `error.rs`: [`ConfigError`] and [`ConfigErrors`], the report an operator reads.
//! - `raw.rs`: the file as TOML gives it (`Raw*` structs with positions); no checks.
//! - `validate.rs`: the validator's core (positions to lines, error collection, the order of
//!   the sections, shared value parsers); `listen.rs` (listeners, relay, limits, spool),
//!   `delivery.rs` (dns, delivery, local, routes), `shaping.rs` (shaping, sources, pools,
//!   backoff) and `services.rs` (submission, dkim, http, webhooks) validate the sections.
//!   None of them reads a file.
//! - `files.rs`: [`Config::check_files`], the only code here that opens the certificates, keys
//!   and CA file the config names.
//!
//! Section types owned by other crates are re-exported from here; this module must not hold
//! runtime state or start anything.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;

pub use baton_client::TlsMode;
pub use baton_dns::DnsConfig;
pub use baton_events::nats::NatsConfig;
pub use baton_events::webhooks::WebhookConfig;
use baton_shaping::{BackoffRule, Rate, ShapingRule};
pub use baton_shaping::{Pool, Source};
pub use baton_units::{human_duration, parse_duration, parse_size};

mod bounces;
mod cluster;
mod delivery;
mod error;
mod files;
mod listen;
mod raw;
mod services;
mod shaping;
#[cfg(test)]
mod tests;
mod validate;

pub use error::{ConfigError, ConfigErrors};
pub use files::{ConfigFile, NamedFile};

/// What a listener is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Port 25 style: mail for local domains from anyone, relay for trusted networks.
    Mx,
    /// Port 587: message submission; AUTH before MAIL (RFC 6409), unless the listener trusts
    /// `relay.networks`.
    Submission,
    /// Port 465: submission over implicit TLS.
    Submissions,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Mx => "mx",
            Role::Submission => "submission",
            Role::Submissions => "submissions",
        }
    }
}

#[derive(Debug, Clone)]
pub struct ListenerConfig {
    pub address: SocketAddr,
    pub role: Role,
    /// Certificate chain and private key (PEM): STARTTLS, or implicit TLS for `submissions`.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Submission listeners only: clients in `relay.networks` may send without AUTH (an
    /// explicit opt-in; by default an MSA requires AUTH from everyone, as Postfix's
    /// submission service is set up).
    pub trust_networks: bool,
}

#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Lower-case domains Baton accepts mail for from anyone.
    pub local_domains: Vec<String>,
    /// Clients allowed to relay to any domain.
    pub networks: Vec<IpNet>,
}

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_message_size: u64,
    pub max_recipients: usize,
    /// RCPTs past `max_recipients` that get 452 without counting as errors (Postfix's
    /// smtpd_recipient_overshoot_limit); past them each counts.
    pub recipient_overshoot: usize,
    pub max_line_length: usize,
    pub max_errors: u32,
    /// Longest wait for the next command (RFC 5321 §4.5.3.2.7: 5 minutes).
    pub idle_timeout: Duration,
    /// Longest time to receive one command line once it has started.
    pub command_timeout: Duration,
    /// Longest wait for the next chunk of message data (RFC 5321 §4.5.3.2.6: 3 minutes).
    pub data_timeout: Duration,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    /// More Received: fields than this is a mail loop (Postfix's hopcount_limit).
    pub max_received_headers: usize,
    /// New connections per client address (relay networks exempt): past it, 421.
    pub connection_rate_per_ip: Option<Rate>,
    /// Commands per client address across its sessions (relay networks exempt): past it, 421.
    pub command_rate_per_ip: Option<Rate>,
    /// After this many errors in a session every reply is delayed by `error_delay` (tarpit;
    /// Postfix's smtpd_soft_error_limit); at `max_errors` the session ends.
    pub error_delay_after: u32,
    pub error_delay: Duration,
}

#[derive(Debug, Clone)]
pub struct SpoolConfig {
    pub fsync: bool,
    pub segment_size: u64,
    /// Intake pauses (452 4.3.1, API 503) below this much free space on the spool's disk;
    /// never less than 1.5 × `[limits] max_message_size` (0 when not set).
    pub min_free_space: u64,
    /// Intake pauses while this many recipients wait in the queue (none: no limit).
    pub max_queued_recipients: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub hostname: String,
    pub data_dir: PathBuf,
    /// Threads running sessions and deliveries (the spool and event log have their own).
    pub worker_threads: usize,
    pub listeners: Vec<ListenerConfig>,
    pub relay: RelayConfig,
    pub limits: Limits,
    pub spool: SpoolConfig,
    /// `[events]`: how the event log is cut into files and how long they are kept.
    pub events: baton_events::LogOptions,
    pub dns: DnsConfig,
    pub delivery: DeliveryConfig,
    pub local: LocalConfig,
    pub routes: Vec<Route>,
    pub shaping: Vec<ShapingRule>,
    /// Egress pools (each holds its sources).
    pub pools: Vec<Pool>,
    pub backoff: Vec<BackoffRule>,
    pub submission: SubmissionConfig,
    /// SPF, DKIM and DMARC verdicts for mail arriving on mx listeners.
    pub inbound: InboundConfig,
    /// The HTTP API and dashboard; none when disabled.
    pub http: Option<HttpConfig>,
    pub webhooks: Vec<WebhookConfig>,
    pub dkim: Vec<DkimConfig>,
    pub bounces: BouncesConfig,
    /// `[cluster]`: None runs a single node, as without Redis.
    pub cluster: Option<baton_cluster::ClusterConfig>,
    /// `[nats]`: the events exported to NATS JetStream; None exports nothing.
    pub nats: Option<NatsConfig>,
    /// The certificates, keys and CA file named above, each with the line naming it: read by
    /// [`Config::check_files`], never by parsing.
    pub files: Vec<NamedFile>,
}

/// `[bounces]`: return paths (VERP) and what comes back to them.
#[derive(Debug, Clone)]
pub struct BouncesConfig {
    /// The default return-path domain: mail sent with a sender leaves with
    /// `bounces+<token>@<domain>`, and the MX listener takes reports for it. None: senders
    /// leave unchanged.
    pub domain: Option<String>,
    /// Per-tenant and per-pool return-path domains (before `domain`).
    pub tenant_domains: std::collections::BTreeMap<String, String>,
    pub pool_domains: std::collections::BTreeMap<String, String>,
    /// Key for return-path and unsubscribe tokens; none: `data_dir/bounces.key`.
    pub secret: Option<String>,
    /// Operator classification rules, tried before the built-in ones.
    pub rules: Option<std::sync::Arc<baton_bounce::Rules>>,
    /// Soft bounces (full, disabled mailbox) of one address within `soft_bounce_window` that
    /// suppress it as inactive; 0: never.
    pub soft_bounce_limit: u32,
    pub soft_bounce_window: Duration,
    /// Public base URL of the HTTP API for one-click unsubscribe links.
    pub unsubscribe_url: Option<String>,
    /// Tenants (lower case) whose API injections get List-Unsubscribe unless a call says
    /// `"list_unsubscribe": false`.
    pub list_unsubscribe_tenants: std::collections::BTreeSet<String>,
}

impl BouncesConfig {
    /// Every return-path domain, for the MX listener and routing.
    pub fn is_return_domain(&self, domain: &str) -> bool {
        self.domain
            .as_deref()
            .is_some_and(|d| d.eq_ignore_ascii_case(domain))
            || self
                .tenant_domains
                .values()
                .any(|d| d.eq_ignore_ascii_case(domain))
            || self
                .pool_domains
                .values()
                .any(|d| d.eq_ignore_ascii_case(domain))
    }

    /// The return-path domain of a message leaving through `pool`: its tenant's or pool's
    /// domain, or the default `domain` for mail injected through the HTTP API or tagged with
    /// a tenant. Mail Baton only relays (an MX's inbound mail, a relay client's) keeps its
    /// sender: its bounces are that sender's, not Baton's to read. None for a null sender.
    pub fn return_domain(
        &self,
        envelope: &baton_spool::Envelope,
        pool: Option<&str>,
    ) -> Option<&str> {
        if envelope.sender.is_empty() {
            return None;
        }
        let tenant = envelope.meta.tenant.as_deref();
        let own = tenant
            .and_then(|t| self.tenant_domains.get(t))
            .or_else(|| pool.and_then(|p| self.pool_domains.get(p)));
        // The API marks what it injects so (see `api::compose::envelope_for`).
        let injected = envelope.helo == "http" || tenant.is_some();
        own.or(self.domain.as_ref().filter(|_| injected))
            .map(String::as_str)
    }

    /// The return-path domain for a message of `tenant` leaving through `pool`.
    pub fn domain_for(&self, tenant: Option<&str>, pool: Option<&str>) -> Option<&str> {
        tenant
            .and_then(|t| self.tenant_domains.get(t))
            .or_else(|| pool.and_then(|p| self.pool_domains.get(p)))
            .or(self.domain.as_ref())
            .map(String::as_str)
    }
}

/// A DKIM signing key for a domain.
#[derive(Debug, Clone)]
pub struct DkimConfig {
    pub domain: String,
    pub selector: String,
    pub key: PathBuf,
}

/// Who may send through the `submission`/`submissions` listeners.
#[derive(Debug, Clone)]
pub struct SubmissionConfig {
    /// `name:argon2-hash` lines, written by `baton user add`.
    pub users_file: Option<PathBuf>,
    /// Allow AUTH without TLS for clients on loopback (tests, local webmail).
    pub plaintext_auth_on_loopback: bool,
    pub sender_policy: SenderPolicy,
    /// Messages (MAIL commands) per authenticated user: past it, 450 4.7.1.
    pub message_rate: Option<Rate>,
    /// Recipients per authenticated user: past it, 450 4.7.1.
    pub recipient_rate: Option<Rate>,
}

#[derive(Debug, Clone)]
pub struct HttpConfig {
    pub address: SocketAddr,
    /// Bearer tokens accepted from clients outside `trusted_networks`.
    pub tokens: Vec<String>,
    /// Clients that need no token (loopback by default).
    pub trusted_networks: Vec<IpNet>,
    /// The most message bytes one inject call may build (they are all built, and checked,
    /// before any is queued): past it, 413.
    pub max_inject_bytes: u64,
}

#[derive(Debug, Clone, Default)]
pub struct InboundConfig {
    /// Check SPF, DKIM and DMARC and add an Authentication-Results header (RFC 8601).
    pub authentication_results: bool,
}

/// What senders an authenticated user may use (envelope and From:).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SenderPolicy {
    /// The user's own domain (user names are addresses).
    Domain,
    /// Exactly the user's address.
    Address,
    /// Anything.
    Any,
}

#[derive(Debug, Clone)]
pub struct DeliveryConfig {
    /// The port dialled on every MX host (25; tests point it elsewhere).
    pub smtp_port: u16,
    pub retry_min: Duration,
    pub retry_max: Duration,
    pub max_age: Duration,
    /// A delay DSN is sent once a recipient has waited this long.
    pub delay_warning: Duration,
    pub max_connections_per_destination: usize,
    pub max_messages_per_connection: usize,
    pub max_recipients_per_transaction: usize,
    pub connect_timeout: Duration,
    /// How long one 1 MiB block of message data may take to reach the next hop (RFC 5321's
    /// 3-minute data-block timeout; Postfix's smtp_data_xfer_timeout).
    pub data_timeout: Duration,
    /// How long the next hop may take to answer the end of the data (RFC 5321's 10 minutes;
    /// Postfix's smtp_data_done_timeout). After it the attempt is deferred: the message may
    /// have been taken, and may arrive twice.
    pub data_end_timeout: Duration,
    /// Lines of a message longer than this are broken (CRLF SPACE inserted) before sending, as
    /// Postfix's smtp_line_length_limit; 0 sends them as stored.
    pub line_length_limit: usize,
    /// How long an idle outbound connection is kept for more mail.
    pub idle_timeout: Duration,
    /// Accept and queue, but deliver nothing (maintenance; like Postfix's hold queue).
    pub hold: bool,
    /// Retry delay after a greylisting reply, instead of the exponential schedule.
    pub greylist_retry: Duration,
    /// The pool for mail no pool claims by sender domain; none = the system's source address.
    pub default_pool: Option<String>,
    /// TLS for MX delivery where no route and no MTA-STS policy says otherwise.
    pub tls: TlsMode,
    /// Extra trust anchors (PEM) for verifying servers, beside the system's CA store.
    pub tls_ca_file: Option<PathBuf>,
    /// Honour recipient domains' MTA-STS policies (RFC 8461).
    pub mta_sts: bool,
    /// The port MTA-STS policies are fetched from (443; tests point it elsewhere).
    pub mta_sts_port: u16,
    /// Check MX hosts' TLSA records when the resolver vouches for them (DANE, RFC 7672).
    pub dane: bool,
}

#[derive(Debug, Clone)]
pub struct LocalConfig {
    /// Mailboxes: a local part (any local domain) or a full address.
    pub users: Vec<String>,
    pub maildir_root: PathBuf,
    /// Deliver local mail over LMTP instead of into Maildirs.
    pub lmtp: Option<LmtpTarget>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LmtpTarget {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

/// How mail for a domain leaves.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Transport {
    /// Look up the domain's MX hosts (A/AAAA fallback).
    Mx,
    /// Relay everything through one host.
    Smarthost(Smarthost),
    /// Deliver to local mailboxes (Maildir or LMTP).
    Local,
}

/// A relay host and how to talk to it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Smarthost {
    pub host: String,
    pub port: u16,
    /// AUTH PLAIN credentials (user, password).
    pub auth: Option<(String, String)>,
    pub tls: TlsMode,
}

#[derive(Debug, Clone)]
pub struct Route {
    /// Lower-case domain, or "*" for every domain no other route names.
    pub domain: String,
    pub transport: Transport,
    /// TLS for MX delivery on this route (smarthosts carry their own).
    pub tls: Option<TlsMode>,
}

impl Config {
    /// The transport for a recipient domain: an exact route, else local for local domains,
    /// else the `*` route, else MX.
    pub fn transport_for(&self, domain: &str) -> Transport {
        let domain = domain.to_ascii_lowercase();
        if let Some(r) = self.routes.iter().find(|r| r.domain == domain) {
            return r.transport.clone();
        }
        if self.relay.local_domains.contains(&domain) {
            return Transport::Local;
        }
        self.routes
            .iter()
            .find(|r| r.domain == "*")
            .map(|r| r.transport.clone())
            .unwrap_or(Transport::Mx)
    }

    /// The TLS mode an MX route names for a domain (exact, then `*`); none when no route does.
    pub fn route_tls(&self, domain: &str) -> Option<TlsMode> {
        let domain = domain.to_ascii_lowercase();
        let exact = self.routes.iter().find(|r| r.domain == domain);
        let route = exact.or_else(|| self.routes.iter().find(|r| r.domain == "*"))?;
        match route.transport {
            Transport::Mx => route.tls,
            _ => None,
        }
    }

    /// The pool for a message: one named for it (`rebind`), else the one naming its tenant,
    /// else its sender domain, else `[delivery] pool`.
    pub fn pool_for(&self, envelope: &baton_spool::Envelope) -> Option<&Pool> {
        if let Some(name) = envelope.meta.pool.as_deref()
            && let Some(p) = self.pools.iter().find(|p| p.name == name)
        {
            return Some(p);
        }
        if let Some(tenant) = envelope.meta.tenant.as_deref()
            && let Some(p) = self
                .pools
                .iter()
                .find(|p| p.tenants.iter().any(|t| t == tenant))
        {
            return Some(p);
        }
        self.pool_for_sender(&envelope.sender)
    }

    /// The pool for a sender: the one naming its domain, else `[delivery] pool`.
    pub fn pool_for_sender(&self, sender: &str) -> Option<&Pool> {
        let domain = sender
            .rsplit_once('@')
            .map(|(_, d)| d.to_ascii_lowercase())
            .unwrap_or_default();
        self.pools
            .iter()
            .find(|p| p.sender_domains.contains(&domain))
            .or_else(|| {
                let name = self.delivery.default_pool.as_ref()?;
                self.pools.iter().find(|p| &p.name == name)
            })
    }

    /// Whether `address` (at a local domain) is a known mailbox; the user part when it is.
    pub fn local_mailbox(&self, address: &str) -> Option<String> {
        let lower = address.to_ascii_lowercase();
        let local_part = lower.rsplit_once('@').map(|(l, _)| l).unwrap_or(&lower);
        if local_part == "postmaster" {
            return Some("postmaster".into());
        }
        self.local
            .users
            .iter()
            .find(|u| **u == lower || **u == local_part)
            .cloned()
    }
}

pub const DEFAULT_LISTEN: &str = "127.0.0.1:2525";

impl Config {
    /// The embedded defaults: `baton serve` with no config file.
    pub fn defaults() -> Config {
        match Config::parse("") {
            Ok(config) => config,
            Err(_) => unreachable!("the embedded defaults are valid"),
        }
    }

    /// Reads, parses and validates a config file, then checks the files it names
    /// ([`Config::check_files`]): every problem of both steps, in the order of the sections.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let in_file = |errors| ConfigErrors {
            path: Some(path.to_path_buf()),
            errors,
        };
        let text = std::fs::read_to_string(path).map_err(|e| {
            in_file(vec![ConfigError {
                line: 0,
                column: 0,
                message: format!("cannot read the file: {e}"),
                hint: Some("check the path given to --config".into()),
            }])
        })?;
        let (config, errors) = validate::validate(&text).map_err(in_file)?;
        let errors = files::with_file_problems(errors, &config.files);
        if errors.is_empty() {
            Ok(config)
        } else {
            Err(in_file(errors))
        }
    }

    /// Parses and validates config text. Opens no file: the certificates and keys it names
    /// are in [`Config::files`], for [`Config::check_files`].
    pub fn parse(text: &str) -> Result<Config, Vec<ConfigError>> {
        let (config, errors) = validate::validate(text)?;
        if errors.is_empty() {
            Ok(config)
        } else {
            Err(errors)
        }
    }
}
