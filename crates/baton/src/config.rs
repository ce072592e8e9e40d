//! Configuration: the TOML file, its embedded defaults and its validation.
//!
//! Parsing keeps each value's position so that every error names its line and comes with a
//! hint. The rest of Baton sees only the validated [`Config`].

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;

pub use baton_client::TlsMode;
pub use baton_dns::DnsConfig;
pub use baton_events::webhooks::WebhookConfig;
use baton_shaping::{BackoffAction, BackoffRule, Matcher, Rate, ShapingRule};
pub use baton_shaping::{Pool, Source};
pub use baton_units::{human_duration, parse_duration, parse_size};
use serde::Deserialize;
use toml::Spanned;

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

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub line: usize,
    pub column: usize,
    pub message: String,
    pub hint: Option<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}:{}: {}", self.line, self.column, self.message)?;
        if let Some(hint) = &self.hint {
            write!(f, "\n    hint: {hint}")?;
        }
        Ok(())
    }
}

/// All the problems found in one file.
#[derive(Debug)]
pub struct ConfigErrors {
    pub path: Option<PathBuf>,
    pub errors: Vec<ConfigError>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = self
            .path
            .as_deref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "config".into());
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{name}:{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    hostname: Option<Spanned<String>>,
    data_dir: Option<Spanned<String>>,
    worker_threads: Option<Spanned<u64>>,
    #[serde(default)]
    listener: Vec<RawListener>,
    #[serde(default)]
    relay: RawRelay,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    spool: RawSpool,
    #[serde(default)]
    dns: RawDns,
    #[serde(default)]
    delivery: RawDelivery,
    #[serde(default)]
    local: RawLocal,
    #[serde(default)]
    route: Vec<RawRoute>,
    #[serde(default)]
    shaping: Vec<RawShaping>,
    #[serde(default)]
    source: Vec<RawSource>,
    #[serde(default)]
    pool: Vec<RawPool>,
    #[serde(default)]
    backoff: Vec<RawBackoff>,
    #[serde(default)]
    submission: RawSubmission,
    #[serde(default)]
    inbound: RawInbound,
    #[serde(default)]
    http: RawHttp,
    #[serde(default)]
    webhook: Vec<RawWebhook>,
    #[serde(default)]
    dkim: Vec<RawDkim>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDkim {
    domain: Spanned<String>,
    selector: Spanned<String>,
    key: Spanned<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSubmission {
    users_file: Option<String>,
    plaintext_auth_on_loopback: Option<bool>,
    sender_policy: Option<Spanned<String>>,
    message_rate: Option<Spanned<String>>,
    recipient_rate: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWebhook {
    url: Spanned<String>,
    secret: Spanned<String>,
    events: Option<Vec<Spanned<String>>>,
    batch_size: Option<Spanned<u64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    address: Option<Spanned<String>>,
    enabled: Option<bool>,
    tokens: Option<Vec<Spanned<String>>>,
    trusted_networks: Option<Vec<Spanned<String>>>,
    max_inject_bytes: Option<Spanned<Quantity>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawInbound {
    authentication_results: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackoff {
    code: Option<Spanned<u64>>,
    status: Option<Spanned<String>>,
    pattern: Option<Spanned<String>>,
    action: Spanned<String>,
    factor: Option<Spanned<f64>>,
    duration: Option<Spanned<Quantity>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    name: Spanned<String>,
    address: Spanned<String>,
    ehlo: Option<Spanned<String>>,
    /// "builtin" or a list of caps per period.
    warmup: Option<Spanned<toml::Value>>,
    warmup_start: Option<Spanned<String>>,
    warmup_period: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPool {
    name: Spanned<String>,
    sources: Vec<Spanned<String>>,
    weights: Option<Vec<Spanned<u64>>>,
    #[serde(default)]
    sender_domains: Vec<Spanned<String>>,
    #[serde(default)]
    tenants: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawShaping {
    domain: Option<Spanned<String>>,
    site: Option<Spanned<String>>,
    max_connections: Option<Spanned<u64>>,
    max_messages_per_connection: Option<Spanned<u64>>,
    max_recipients_per_transaction: Option<Spanned<u64>>,
    max_message_rate: Option<Spanned<String>>,
    max_connection_rate: Option<Spanned<String>>,
    retry_interval: Option<Spanned<Quantity>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDns {
    nameservers: Option<Vec<Spanned<String>>>,
    timeout: Option<Spanned<Quantity>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDelivery {
    smtp_port: Option<Spanned<u64>>,
    retry_min: Option<Spanned<Quantity>>,
    retry_max: Option<Spanned<Quantity>>,
    max_age: Option<Spanned<Quantity>>,
    delay_warning: Option<Spanned<Quantity>>,
    max_connections_per_destination: Option<Spanned<u64>>,
    max_messages_per_connection: Option<Spanned<u64>>,
    max_recipients_per_transaction: Option<Spanned<u64>>,
    connect_timeout: Option<Spanned<Quantity>>,
    data_timeout: Option<Spanned<Quantity>>,
    line_length_limit: Option<Spanned<u64>>,
    idle_timeout: Option<Spanned<Quantity>>,
    hold: Option<bool>,
    greylist_retry: Option<Spanned<Quantity>>,
    pool: Option<Spanned<String>>,
    tls: Option<Spanned<String>>,
    tls_ca_file: Option<Spanned<String>>,
    mta_sts: Option<bool>,
    mta_sts_port: Option<Spanned<u64>>,
    dane: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLocal {
    users: Option<Vec<Spanned<String>>>,
    maildir_root: Option<String>,
    lmtp: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    domain: Spanned<String>,
    smarthost: Option<Spanned<String>>,
    transport: Option<Spanned<String>>,
    auth_user: Option<Spanned<String>>,
    auth_password: Option<Spanned<String>>,
    tls: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    address: Spanned<String>,
    role: Option<Spanned<String>>,
    tls_cert: Option<Spanned<String>>,
    tls_key: Option<Spanned<String>>,
    trust_networks: Option<Spanned<bool>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRelay {
    local_domains: Option<Vec<Spanned<String>>>,
    networks: Option<Vec<Spanned<String>>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_message_size: Option<Spanned<Quantity>>,
    max_recipients: Option<Spanned<u64>>,
    recipient_overshoot: Option<Spanned<u64>>,
    max_line_length: Option<Spanned<u64>>,
    max_errors: Option<Spanned<u64>>,
    idle_timeout: Option<Spanned<Quantity>>,
    command_timeout: Option<Spanned<Quantity>>,
    data_timeout: Option<Spanned<Quantity>>,
    max_connections: Option<Spanned<u64>>,
    max_connections_per_ip: Option<Spanned<u64>>,
    max_received_headers: Option<Spanned<u64>>,
    connection_rate_per_ip: Option<Spanned<String>>,
    command_rate_per_ip: Option<Spanned<String>>,
    error_delay_after: Option<Spanned<u64>>,
    error_delay: Option<Spanned<Quantity>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSpool {
    fsync: Option<bool>,
    segment_size: Option<Spanned<Quantity>>,
}

/// A number, or a string with a unit: "30s", "5m", "50MiB".
#[derive(Deserialize, Clone)]
#[serde(untagged)]
enum Quantity {
    Number(u64),
    Text(String),
}

impl Config {
    /// The embedded defaults: `baton serve` with no config file.
    pub fn defaults() -> Config {
        match Config::parse("") {
            Ok(config) => config,
            Err(_) => unreachable!("the embedded defaults are valid"),
        }
    }

    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigErrors {
            path: Some(path.to_path_buf()),
            errors: vec![ConfigError {
                line: 0,
                column: 0,
                message: format!("cannot read the file: {e}"),
                hint: Some("check the path given to --config".into()),
            }],
        })?;
        Config::parse(&text).map_err(|errors| ConfigErrors {
            path: Some(path.to_path_buf()),
            errors,
        })
    }

    pub fn parse(text: &str) -> Result<Config, Vec<ConfigError>> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| vec![toml_error(text, &e)])?;
        let mut v = Validator {
            text,
            errors: Vec::new(),
        };
        let config = v.config(raw);
        if v.errors.is_empty() {
            Ok(config)
        } else {
            Err(v.errors)
        }
    }
}

fn toml_error(text: &str, err: &toml::de::Error) -> ConfigError {
    let (line, column) = err
        .span()
        .map(|s| line_col(text, s.start))
        .unwrap_or((0, 0));
    let message = err.message().trim().to_string();
    let hint = if message.starts_with("unknown field") {
        "a misspelt key? every key is listed in docs/CONFIGURATION.md"
    } else if message.contains("invalid type") {
        "check the value's type (quoted string, number, boolean, list) in docs/CONFIGURATION.md"
    } else {
        "check the TOML syntax near this line"
    };
    ConfigError {
        line,
        column,
        message,
        hint: Some(hint.into()),
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
    (line, column)
}

struct Validator<'a> {
    text: &'a str,
    errors: Vec<ConfigError>,
}

impl Validator<'_> {
    fn error<T>(&mut self, span: std::ops::Range<usize>, message: String, hint: &str) -> Option<T> {
        let (line, column) = line_col(self.text, span.start);
        self.errors.push(ConfigError {
            line,
            column,
            message,
            hint: Some(hint.to_string()),
        });
        None
    }

    fn config(&mut self, raw: RawConfig) -> Config {
        let hostname = match raw.hostname {
            Some(h) => {
                let name = h.get_ref().trim().to_ascii_lowercase();
                if baton_smtp::address::validate_domain(&name).is_err() || name.starts_with('[') {
                    self.error::<()>(
                        h.span(),
                        format!("hostname {:?} is not a valid host name", h.get_ref()),
                        "use the fully qualified name this server greets with, e.g. \"mx1.example.com\"",
                    );
                }
                name
            }
            None => default_hostname(),
        };
        let data_dir = raw
            .data_dir
            .map(|d| PathBuf::from(d.into_inner()))
            .unwrap_or_else(|| PathBuf::from("./baton-data"));
        let mut listeners: Vec<ListenerConfig> = raw
            .listener
            .into_iter()
            .filter_map(|l| self.listener(l))
            .collect();
        if listeners.is_empty() && self.errors.is_empty() {
            listeners.push(ListenerConfig {
                address: DEFAULT_LISTEN.parse().unwrap_or_else(|_| unreachable!()),
                role: Role::Mx,
                tls: None,
                trust_networks: false,
            });
        }
        let relay = self.relay(raw.relay, &hostname);
        let limits = self.limits(raw.limits);
        let spool = SpoolConfig {
            fsync: raw.spool.fsync.unwrap_or(true),
            segment_size: raw
                .spool
                .segment_size
                .and_then(|s| self.size(s))
                .unwrap_or(64 << 20),
        };
        let dns = self.dns(raw.dns);
        let delivery = self.delivery(raw.delivery);
        let local = self.local(raw.local, &data_dir);
        let routes = raw
            .route
            .into_iter()
            .filter_map(|r| self.route(r))
            .collect();
        let worker_threads = match raw.worker_threads {
            Some(n) if *n.get_ref() == 0 || *n.get_ref() > 1024 => self
                .error(
                    n.span(),
                    "worker_threads must be 1-1024".into(),
                    "1 suits a small machine; about one per core on a large one",
                )
                .unwrap_or(1),
            Some(n) => *n.get_ref() as usize,
            None => 1,
        };
        let shaping = raw
            .shaping
            .into_iter()
            .filter_map(|r| self.shaping(r))
            .collect();
        let sources: Vec<Source> = raw
            .source
            .into_iter()
            .filter_map(|r| self.source(r))
            .collect();
        let pools: Vec<Pool> = raw
            .pool
            .into_iter()
            .filter_map(|r| self.pool(r, &sources))
            .collect();
        let backoff = raw
            .backoff
            .into_iter()
            .filter_map(|r| self.backoff(r))
            .collect();
        let sender_policy = match raw
            .submission
            .sender_policy
            .as_ref()
            .map(|p| p.get_ref().as_str())
        {
            None | Some("domain") => SenderPolicy::Domain,
            Some("address") => SenderPolicy::Address,
            Some("any") => SenderPolicy::Any,
            Some(other) => {
                let span = raw
                    .submission
                    .sender_policy
                    .as_ref()
                    .map(|p| p.span())
                    .unwrap_or(0..0);
                self.error::<()>(
                    span,
                    format!("unknown sender_policy {other:?}"),
                    "\"domain\" (the user's domain, default), \"address\" (exactly the user) or \"any\"",
                );
                SenderPolicy::Domain
            }
        };
        let dkim = raw
            .dkim
            .into_iter()
            .filter_map(|d| {
                let path = PathBuf::from(d.key.get_ref());
                match crate::dkim::DkimKey::load(d.domain.get_ref(), d.selector.get_ref(), &path) {
                    Ok(_) => Some(DkimConfig {
                        domain: d.domain.get_ref().to_ascii_lowercase(),
                        selector: d.selector.into_inner(),
                        key: path,
                    }),
                    Err(why) => self.error(
                        d.key.span(),
                        why,
                        "make one with `baton dkim keygen DOMAIN SELECTOR`",
                    ),
                }
            })
            .collect();
        let http = self.http(raw.http);
        let webhooks = raw
            .webhook
            .into_iter()
            .filter_map(|w| self.webhook(w))
            .collect();
        let submission = SubmissionConfig {
            users_file: raw.submission.users_file.map(PathBuf::from),
            plaintext_auth_on_loopback: raw.submission.plaintext_auth_on_loopback.unwrap_or(false),
            sender_policy,
            message_rate: self.rate(raw.submission.message_rate),
            recipient_rate: self.rate(raw.submission.recipient_rate),
        };
        if let Some(name) = &delivery.default_pool
            && !pools.iter().any(|p| &p.name == name)
        {
            self.errors.push(ConfigError {
                line: 0,
                column: 0,
                message: format!("[delivery] pool {name:?} is not a [[pool]]"),
                hint: Some("name a pool defined with [[pool]] name = ...".into()),
            });
        }
        Config {
            hostname,
            data_dir,
            worker_threads,
            shaping,
            pools,
            backoff,
            submission,
            inbound: InboundConfig {
                authentication_results: raw.inbound.authentication_results.unwrap_or(false),
            },
            http,
            webhooks,
            dkim,
            listeners,
            relay,
            limits,
            spool,
            dns,
            delivery,
            local,
            routes,
        }
    }

    fn dns(&mut self, raw: RawDns) -> DnsConfig {
        let nameservers = raw
            .nameservers
            .unwrap_or_default()
            .into_iter()
            .filter_map(|n| {
                let text = n.get_ref();
                text.parse::<SocketAddr>()
                    .ok()
                    .or_else(|| {
                        text.parse::<std::net::IpAddr>()
                            .ok()
                            .map(|ip| (ip, 53).into())
                    })
                    .or_else(|| {
                        self.error(
                            n.span(),
                            format!("nameserver {text:?} is not an IP address or IP:port"),
                            "write \"192.0.2.53\" or \"127.0.0.1:5353\"",
                        )
                    })
            })
            .collect();
        DnsConfig {
            nameservers,
            timeout: raw
                .timeout
                .and_then(|q| self.duration(q))
                .unwrap_or(Duration::from_secs(5)),
        }
    }

    fn delivery(&mut self, raw: RawDelivery) -> DeliveryConfig {
        let port = match raw.smtp_port {
            Some(p) if *p.get_ref() == 0 || *p.get_ref() > 65535 => self
                .error(
                    p.span(),
                    "smtp_port must be 1-65535".into(),
                    "leave it out for port 25",
                )
                .unwrap_or(25),
            Some(p) => *p.get_ref() as u16,
            None => 25,
        };
        let retry_min = self.duration_or(raw.retry_min, 300);
        let retry_max = self.duration_or(raw.retry_max, 4000);
        let max_age = self.duration_or(raw.max_age, 5 * 86400);
        let delay_warning = self.duration_or(raw.delay_warning, 4 * 3600);
        let connect_timeout = self.duration_or(raw.connect_timeout, 30);
        let idle_timeout = self.duration_or(raw.idle_timeout, 5);
        let tls = self
            .tls_mode(raw.tls.as_ref())
            .unwrap_or(TlsMode::Opportunistic);
        let tls_ca_file = raw.tls_ca_file.and_then(|f| {
            let path = PathBuf::from(f.get_ref());
            match baton_tls::trust::load_roots(&path) {
                Ok(_) => Some(path),
                Err(why) => self.error(
                    f.span(),
                    why,
                    "tls_ca_file is a PEM file of CA certificates",
                ),
            }
        });
        let mta_sts_port = match raw.mta_sts_port {
            Some(p) if *p.get_ref() == 0 || *p.get_ref() > 65535 => self
                .error(
                    p.span(),
                    "mta_sts_port must be 1-65535".into(),
                    "leave it out for port 443",
                )
                .unwrap_or(443),
            Some(p) => *p.get_ref() as u16,
            None => 443,
        };
        DeliveryConfig {
            smtp_port: port,
            retry_min,
            retry_max: retry_max.max(retry_min),
            max_age,
            delay_warning,
            max_connections_per_destination: self.count(raw.max_connections_per_destination, 20)
                as usize,
            max_messages_per_connection: self.count(raw.max_messages_per_connection, 1000) as usize,
            max_recipients_per_transaction: self.count(raw.max_recipients_per_transaction, 100)
                as usize,
            connect_timeout,
            data_timeout: self.duration_or(raw.data_timeout, 180),
            line_length_limit: self.line_length_limit(raw.line_length_limit),
            idle_timeout,
            hold: raw.hold.unwrap_or(false),
            greylist_retry: self.duration_or(raw.greylist_retry, 60),
            default_pool: raw.pool.map(|p| p.into_inner()),
            tls,
            tls_ca_file,
            mta_sts: raw.mta_sts.unwrap_or(true),
            mta_sts_port,
            dane: raw.dane.unwrap_or(true),
        }
    }

    fn local(&mut self, raw: RawLocal, data_dir: &Path) -> LocalConfig {
        let users = raw
            .users
            .unwrap_or_default()
            .into_iter()
            .filter_map(|u| {
                let name = u.get_ref().trim().to_ascii_lowercase();
                let bad = name.is_empty()
                    || name.contains('/')
                    || name.starts_with('.')
                    || name.chars().any(|c| c.is_whitespace() || c.is_control());
                if bad {
                    self.error(
                        u.span(),
                        format!("local user {:?} is not a usable mailbox name", u.get_ref()),
                        "list local parts (\"alice\") or addresses (\"alice@example.com\"); no slashes or leading dots",
                    )
                } else {
                    Some(name)
                }
            })
            .collect();
        let lmtp = raw.lmtp.and_then(|l| {
            let text = l.get_ref();
            if let Some(path) = text.strip_prefix("unix:") {
                Some(LmtpTarget::Unix(PathBuf::from(path)))
            } else if let Ok(addr) = text.parse::<SocketAddr>() {
                Some(LmtpTarget::Tcp(addr))
            } else {
                self.error(
                    l.span(),
                    format!("lmtp {text:?} is neither IP:port nor unix:/path"),
                    "write \"127.0.0.1:24\" or \"unix:/run/dovecot/lmtp\"",
                )
            }
        });
        LocalConfig {
            users,
            maildir_root: raw
                .maildir_root
                .map(PathBuf::from)
                .unwrap_or_else(|| data_dir.join("mail")),
            lmtp,
        }
    }

    fn route(&mut self, raw: RawRoute) -> Option<Route> {
        let domain = raw.domain.get_ref().trim().to_ascii_lowercase();
        if domain != "*" && baton_smtp::address::validate_domain(&domain).is_err() {
            return self.error(
                raw.domain.span(),
                format!(
                    "route domain {:?} is not a domain or \"*\"",
                    raw.domain.get_ref()
                ),
                "write a domain such as \"example.com\", or \"*\" for all others",
            );
        }
        let transport = match (&raw.smarthost, &raw.transport) {
            (Some(host), None) => self.smarthost(host, &raw)?,
            (None, Some(t)) => match t.get_ref().as_str() {
                "mx" => Transport::Mx,
                "local" => Transport::Local,
                other => {
                    return self.error(
                        t.span(),
                        format!("unknown transport {other:?}"),
                        "transport is \"mx\" or \"local\"; for a relay host write smarthost = \"host:port\"",
                    );
                }
            },
            (Some(host), Some(_)) => {
                return self.error(
                    host.span(),
                    "a route has either smarthost or transport, not both".into(),
                    "keep smarthost = \"host:port\" for a relay host",
                );
            }
            (None, None) => {
                return self.error(
                    raw.domain.span(),
                    "this route says neither smarthost nor transport".into(),
                    "add smarthost = \"host:port\" or transport = \"mx\" / \"local\"",
                );
            }
        };
        if !matches!(transport, Transport::Smarthost(_)) {
            for key in [&raw.auth_user, &raw.auth_password].into_iter().flatten() {
                self.error::<()>(
                    key.span(),
                    "auth_user and auth_password apply to smarthost routes only".into(),
                    "remove it, or route through a smarthost",
                );
            }
        }
        let tls = match (&transport, &raw.tls) {
            (Transport::Mx, Some(t)) => self.tls_mode(Some(t)),
            (Transport::Local, Some(t)) => self.error(
                t.span(),
                "tls does not apply to local delivery".into(),
                "remove it",
            ),
            _ => None,
        };
        Some(Route {
            domain,
            transport,
            tls,
        })
    }

    fn backoff(&mut self, raw: RawBackoff) -> Option<BackoffRule> {
        let pattern = match &raw.pattern {
            Some(p) => match regex::Regex::new(p.get_ref()) {
                Ok(r) => Some(r),
                Err(e) => {
                    return self.error(
                        p.span(),
                        format!("pattern is not a valid regular expression: {e}"),
                        "regex syntax; (?i) at the start makes it case-insensitive",
                    );
                }
            },
            None => None,
        };
        let action = match raw.action.get_ref().as_str() {
            "suspend" => BackoffAction::Suspend,
            "throttle" => {
                let factor = raw.factor.as_ref().map(|f| *f.get_ref()).unwrap_or(0.5);
                if !(factor > 0.0 && factor < 1.0) {
                    let span = raw
                        .factor
                        .as_ref()
                        .map(|f| f.span())
                        .unwrap_or(raw.action.span());
                    return self.error(
                        span,
                        format!("factor {factor} is not between 0 and 1"),
                        "0.5 halves the message rate",
                    );
                }
                BackoffAction::Throttle { factor }
            }
            other => {
                return self.error(
                    raw.action.span(),
                    format!("unknown backoff action {other:?}"),
                    "action is \"suspend\" or \"throttle\"",
                );
            }
        };
        if raw.code.is_none() && raw.status.is_none() && pattern.is_none() {
            return self.error(
                raw.action.span(),
                "this backoff rule matches every reply".into(),
                "give at least one of code, status or pattern",
            );
        }
        Some(BackoffRule {
            code: raw.code.map(|c| *c.get_ref() as u16),
            status: raw.status.map(|s| s.into_inner()),
            pattern,
            action,
            duration: self.duration_or(raw.duration, 600),
        })
    }

    fn source(&mut self, raw: RawSource) -> Option<Source> {
        let address = raw
            .address
            .get_ref()
            .parse::<std::net::IpAddr>()
            .ok()
            .or_else(|| {
                self.error(
                    raw.address.span(),
                    format!(
                        "source address {:?} is not an IP address",
                        raw.address.get_ref()
                    ),
                    "write the local address to send from, e.g. \"192.0.2.10\"",
                )
            })?;
        let warmup = match &raw.warmup {
            None => None,
            Some(w) => Some(self.warmup(w, &raw)?),
        };
        Some(Source {
            name: raw.name.into_inner(),
            address,
            ehlo: raw.ehlo.map(|e| e.into_inner()),
            warmup,
        })
    }

    fn warmup(
        &mut self,
        plan: &Spanned<toml::Value>,
        raw: &RawSource,
    ) -> Option<baton_shaping::WarmupPlan> {
        let caps = match plan.get_ref() {
            toml::Value::String(s) if s == "builtin" => baton_shaping::WarmupPlan::BUILTIN.to_vec(),
            toml::Value::Array(items) => {
                let caps: Option<Vec<u64>> = items
                    .iter()
                    .map(|v| v.as_integer().and_then(|n| u64::try_from(n).ok()))
                    .collect();
                match caps {
                    Some(c) if !c.is_empty() => c,
                    _ => {
                        return self.error(
                            plan.span(),
                            "warmup caps must be non-negative whole numbers".into(),
                            "e.g. warmup = [50, 100, 200]",
                        );
                    }
                }
            }
            _ => {
                return self.error(
                    plan.span(),
                    "warmup is \"builtin\" or a list of caps per period".into(),
                    "e.g. warmup = \"builtin\" or warmup = [50, 100, 200]",
                );
            }
        };
        let Some(start) = &raw.warmup_start else {
            return self.error(
                plan.span(),
                "a warm-up plan needs warmup_start".into(),
                "the day the IP started sending, e.g. warmup_start = \"2026-11-28\" (UTC)",
            );
        };
        let start_ms = start
            .get_ref()
            .parse::<jiff::civil::Date>()
            .ok()
            .and_then(|d| d.to_zoned(jiff::tz::TimeZone::UTC).ok())
            .and_then(|z| u64::try_from(z.timestamp().as_millisecond()).ok());
        let Some(start_ms) = start_ms else {
            return self.error(
                start.span(),
                format!("warmup_start {:?} is not a date", start.get_ref()),
                "write YYYY-MM-DD (a UTC day)",
            );
        };
        let period = match raw.warmup_period.as_ref().map(|p| p.get_ref().as_str()) {
            None | Some("day") => Duration::from_secs(86400),
            Some("hour") => Duration::from_secs(3600),
            Some(other) => {
                let span = raw.warmup_period.as_ref().map(|p| p.span()).unwrap_or(0..0);
                return self.error(
                    span,
                    format!("warmup_period {other:?} is neither day nor hour"),
                    "warmup_period = \"day\" (default) or \"hour\"",
                );
            }
        };
        Some(baton_shaping::WarmupPlan {
            caps,
            start_ms,
            period,
        })
    }

    fn pool(&mut self, raw: RawPool, sources: &[Source]) -> Option<Pool> {
        let weights: Vec<u32> = match &raw.weights {
            Some(w) if w.len() != raw.sources.len() => {
                return self.error(
                    raw.name.span(),
                    "weights must have one entry per source".into(),
                    "e.g. sources = [\"a\", \"b\"] with weights = [3, 1]",
                );
            }
            Some(w) => w
                .iter()
                .map(|x| (*x.get_ref()).clamp(1, 1_000_000) as u32)
                .collect(),
            None => vec![1; raw.sources.len()],
        };
        let mut members = Vec::new();
        for (name, weight) in raw.sources.iter().zip(weights) {
            match sources.iter().find(|s| &s.name == name.get_ref()) {
                Some(s) => members.push((s.clone(), weight)),
                None => {
                    self.error::<()>(
                        name.span(),
                        format!("no [[source]] named {:?}", name.get_ref()),
                        "define it with [[source]] name = ..., address = ...",
                    );
                }
            }
        }
        if members.is_empty() {
            return self.error(
                raw.name.span(),
                "a pool needs at least one source".into(),
                "list source names in sources = [...]",
            );
        }
        Some(Pool {
            name: raw.name.into_inner(),
            sources: members,
            sender_domains: raw
                .sender_domains
                .into_iter()
                .map(|d| d.into_inner().to_ascii_lowercase())
                .collect(),
            tenants: raw
                .tenants
                .into_iter()
                .map(|t| t.into_inner().to_ascii_lowercase())
                .collect(),
        })
    }

    fn shaping(&mut self, raw: RawShaping) -> Option<ShapingRule> {
        let matcher = match (&raw.domain, &raw.site) {
            (Some(d), None) => {
                let name = d.get_ref().trim().to_ascii_lowercase();
                if name != "*" && baton_smtp::address::validate_domain(&name).is_err() {
                    return self.error(
                        d.span(),
                        format!("shaping domain {:?} is not a domain or \"*\"", d.get_ref()),
                        "write a recipient domain such as \"gmail.com\", or \"*\" for the defaults",
                    );
                }
                Matcher::Domain(name)
            }
            (None, Some(site)) => {
                let name = site
                    .get_ref()
                    .trim()
                    .trim_start_matches("*.")
                    .to_ascii_lowercase();
                if baton_smtp::address::validate_domain(&name).is_err() {
                    return self.error(
                        site.span(),
                        format!("site {:?} is not a host name suffix", site.get_ref()),
                        "a site names where MX hosts live, e.g. \"google.com\" for aspmx.l.google.com",
                    );
                }
                Matcher::Site(name)
            }
            (Some(d), Some(_)) => {
                return self.error(
                    d.span(),
                    "a shaping rule has either domain or site, not both".into(),
                    "split it into two [[shaping]] tables",
                );
            }
            (None, None) => {
                return self.error(
                    0..0,
                    "a [[shaping]] table without domain or site".into(),
                    "add domain = \"example.com\" (or \"*\") or site = \"google.com\"",
                );
            }
        };
        let mut rate = |r: &Option<Spanned<String>>| -> Option<Rate> {
            let r = r.as_ref()?;
            Rate::parse(r.get_ref()).or_else(|| {
                self.error(
                    r.span(),
                    format!("rate {:?} is not N/unit", r.get_ref()),
                    "write \"10/s\", \"300/m\", \"5000/h\" or \"100000/d\"",
                )
            })
        };
        let max_message_rate = rate(&raw.max_message_rate);
        let max_connection_rate = rate(&raw.max_connection_rate);
        let opt_count =
            |v: &mut Self, n: Option<Spanned<u64>>| n.map(|n| v.count(Some(n), 1) as usize);
        Some(ShapingRule {
            matcher,
            max_connections: opt_count(self, raw.max_connections),
            max_messages_per_connection: opt_count(self, raw.max_messages_per_connection),
            max_recipients: opt_count(self, raw.max_recipients_per_transaction),
            max_message_rate,
            max_connection_rate,
            retry_interval: raw.retry_interval.and_then(|q| self.duration(q)),
        })
    }

    fn webhook(&mut self, raw: RawWebhook) -> Option<WebhookConfig> {
        let url = raw.url.get_ref().trim().to_string();
        let parsed = url.parse::<hyper::Uri>().ok().filter(|u| {
            matches!(u.scheme_str(), Some("http") | Some("https")) && u.host().is_some()
        });
        if parsed.is_none() {
            return self.error(
                raw.url.span(),
                format!("webhook url {url:?} is not an http(s) URL"),
                "write \"https://crm.example.com/hooks/baton\"",
            );
        }
        if raw.secret.get_ref().len() < 16 {
            return self.error(
                raw.secret.span(),
                "a webhook secret must be at least 16 characters".into(),
                "use a long random string, e.g. `openssl rand -hex 32`",
            );
        }
        let mut events = Vec::new();
        for e in raw.events.unwrap_or_default() {
            match e.get_ref().parse::<baton_events::EventKind>() {
                Ok(kind) => events.push(kind),
                Err(unknown) => {
                    let types = baton_events::EventKind::ALL.map(|k| k.as_str());
                    self.error::<()>(
                        e.span(),
                        unknown.to_string(),
                        &format!("types: {}", types.join(", ")),
                    );
                }
            }
        }
        let batch_size = raw
            .batch_size
            .map(|n| self.count(Some(n), 100) as usize)
            .unwrap_or(100);
        Some(WebhookConfig {
            url,
            secret: raw.secret.into_inner(),
            events,
            batch_size,
        })
    }

    fn http(&mut self, raw: RawHttp) -> Option<HttpConfig> {
        if raw.enabled == Some(false) {
            return None;
        }
        let address = match &raw.address {
            None => SocketAddr::from(([127, 0, 0, 1], 8025)),
            Some(a) => match a.get_ref().parse::<SocketAddr>() {
                Ok(addr) => addr,
                Err(_) => {
                    return self.error(
                        a.span(),
                        format!("http address {:?} is not IP:port", a.get_ref()),
                        "write it as \"127.0.0.1:8025\"; enabled = false turns the API off",
                    );
                }
            },
        };
        let mut tokens = Vec::new();
        for t in raw.tokens.unwrap_or_default() {
            if t.get_ref().len() < 16 {
                self.error::<()>(
                    t.span(),
                    "an API token must be at least 16 characters".into(),
                    "use a long random string, e.g. `openssl rand -hex 32`",
                );
            } else {
                tokens.push(t.into_inner());
            }
        }
        let trusted_networks = match raw.trusted_networks {
            None => vec![
                "127.0.0.0/8".parse().expect("valid network"),
                "::1/128".parse().expect("valid network"),
            ],
            Some(list) => list
                .into_iter()
                .filter_map(|n| match n.get_ref().parse::<IpNet>() {
                    Ok(net) => Some(net),
                    Err(_) => self.error(
                        n.span(),
                        format!("{:?} is not a network", n.get_ref()),
                        "write \"127.0.0.1/32\" or \"10.0.0.0/8\"",
                    ),
                })
                .collect(),
        };
        let max_inject_bytes = raw
            .max_inject_bytes
            .and_then(|s| self.size(s))
            .unwrap_or(256 << 20);
        Some(HttpConfig {
            address,
            tokens,
            trusted_networks,
            max_inject_bytes,
        })
    }

    /// `[delivery] line_length_limit`: 0 (off) or at least 78, default 998.
    fn line_length_limit(&mut self, raw: Option<Spanned<u64>>) -> usize {
        match raw {
            None => baton_client::downgrade::MAX_LINE,
            Some(n) if *n.get_ref() == 0 || (78..=1_000_000).contains(n.get_ref()) => {
                *n.get_ref() as usize
            }
            Some(n) => self
                .error(
                    n.span(),
                    "line_length_limit must be 0 (off) or from 78 to 1000000".into(),
                    "leave it out for RFC 5322's 998",
                )
                .unwrap_or(baton_client::downgrade::MAX_LINE),
        }
    }

    fn tls_mode(&mut self, raw: Option<&Spanned<String>>) -> Option<TlsMode> {
        let raw = raw?;
        match raw.get_ref().as_str() {
            "opportunistic" => Some(TlsMode::Opportunistic),
            "required" => Some(TlsMode::Required),
            "verify" => Some(TlsMode::Verify),
            "disabled" => Some(TlsMode::Disabled),
            other => self.error(
                raw.span(),
                format!("unknown tls mode {other:?}"),
                "tls is \"opportunistic\" (default), \"required\", \"verify\" or \"disabled\"",
            ),
        }
    }

    fn smarthost(&mut self, host: &Spanned<String>, raw: &RawRoute) -> Option<Transport> {
        let tls = match &raw.tls {
            None => TlsMode::Opportunistic,
            Some(t) => self.tls_mode(Some(t))?,
        };
        let auth = match (&raw.auth_user, &raw.auth_password) {
            (Some(u), Some(p)) => Some((u.get_ref().clone(), p.get_ref().clone())),
            (None, None) => None,
            (Some(k), None) | (None, Some(k)) => {
                return self.error(
                    k.span(),
                    "auth_user and auth_password go together".into(),
                    "give both, or neither",
                );
            }
        };
        let text = host.get_ref().trim();
        let parsed = text
            .parse::<SocketAddr>()
            .ok()
            .map(|a| (a.ip().to_string(), a.port()))
            .or_else(|| {
                let (h, p) = text.rsplit_once(':')?;
                let port = p.parse::<u16>().ok()?;
                let h = h.trim_start_matches('[').trim_end_matches(']');
                baton_smtp::address::validate_domain(h).ok()?;
                Some((h.to_string(), port))
            });
        match parsed {
            Some((host, port)) if port != 0 => Some(Transport::Smarthost(Smarthost {
                host,
                port,
                auth,
                tls,
            })),
            _ => self.error(
                host.span(),
                format!("smarthost {text:?} is not host:port"),
                "write \"relay.example.com:25\" or \"192.0.2.1:587\"",
            ),
        }
    }

    fn listener(&mut self, raw: RawListener) -> Option<ListenerConfig> {
        let address = match raw.address.get_ref().parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => self.error(
                raw.address.span(),
                format!(
                    "listener address {:?} is not IP:port",
                    raw.address.get_ref()
                ),
                "write it as \"127.0.0.1:2525\" or \"[::1]:2525\"",
            ),
        };
        let role = match raw.role.as_ref().map(|r| r.get_ref().as_str()) {
            None | Some("mx") => Some(Role::Mx),
            Some("submission") => Some(Role::Submission),
            Some("submissions") => Some(Role::Submissions),
            Some(other) => {
                let span = raw.role.as_ref().map(|r| r.span()).unwrap_or(0..0);
                self.error(
                    span,
                    format!("unknown listener role {other:?}"),
                    "role is one of \"mx\", \"submission\" (587) or \"submissions\" (465, implicit TLS)",
                )
            }
        };
        let tls = match (&raw.tls_cert, &raw.tls_key) {
            (Some(cert), Some(key)) => {
                let paths = (PathBuf::from(cert.get_ref()), PathBuf::from(key.get_ref()));
                match baton_tls::server::check(&paths.0, &paths.1) {
                    Ok(()) => Some(paths),
                    Err(why) => self.error(
                        cert.span(),
                        why,
                        "tls_cert is the PEM chain (server certificate first), tls_key its PEM private key",
                    ),
                }
            }
            (None, None) => None,
            (Some(k), None) | (None, Some(k)) => self.error(
                k.span(),
                "tls_cert and tls_key go together".into(),
                "give both PEM files, or neither",
            ),
        };
        if role == Some(Role::Submissions) && raw.tls_cert.is_none() {
            let span = raw.role.as_ref().map(|r| r.span()).unwrap_or(0..0);
            self.error::<()>(
                span,
                "role \"submissions\" is implicit TLS: it needs tls_cert and tls_key".into(),
                "add tls_cert = \"/path/cert.pem\" and tls_key = \"/path/key.pem\"",
            );
        }
        if let Some(trust) = &raw.trust_networks
            && role == Some(Role::Mx)
        {
            self.error::<()>(
                trust.span(),
                "trust_networks is for submission listeners".into(),
                "an mx listener always lets relay.networks relay; remove the key",
            );
        }
        Some(ListenerConfig {
            address: address?,
            role: role?,
            tls,
            trust_networks: raw.trust_networks.is_some_and(|t| *t.get_ref()),
        })
    }

    fn relay(&mut self, raw: RawRelay, hostname: &str) -> RelayConfig {
        let local_domains = match raw.local_domains {
            Some(list) => list
                .into_iter()
                .filter_map(|d| {
                    let name = d.get_ref().trim().to_ascii_lowercase();
                    if baton_smtp::address::validate_domain(&name).is_ok() {
                        Some(name)
                    } else {
                        self.error(
                            d.span(),
                            format!("local domain {:?} is not a valid domain", d.get_ref()),
                            "list bare domain names, e.g. [\"example.com\"]",
                        )
                    }
                })
                .collect(),
            None => vec![hostname.to_string(), "localhost".to_string()],
        };
        let networks = match raw.networks {
            Some(list) => list
                .into_iter()
                .filter_map(|n| {
                    parse_network(n.get_ref()).or_else(|| {
                        self.error(
                        n.span(),
                        format!("network {:?} is not an IP address or CIDR block", n.get_ref()),
                        "write networks as \"192.0.2.0/24\", \"2001:db8::/32\" or a single address",
                    )
                    })
                })
                .collect(),
            None => vec![
                "127.0.0.0/8".parse().unwrap_or_else(|_| unreachable!()),
                "::1/128".parse().unwrap_or_else(|_| unreachable!()),
            ],
        };
        RelayConfig {
            local_domains,
            networks,
        }
    }

    fn limits(&mut self, raw: RawLimits) -> Limits {
        let max_line_length = self.count(raw.max_line_length, 2048);
        if max_line_length < 512 {
            self.errors.push(ConfigError {
                line: 0,
                column: 0,
                message: format!("max_line_length {max_line_length} is below 512"),
                hint: Some("RFC 5321 §4.5.3.1.4 requires at least 512 octets".into()),
            });
        }
        Limits {
            max_message_size: raw
                .max_message_size
                .and_then(|s| self.size(s))
                .unwrap_or(50 << 20),
            max_recipients: self.count(raw.max_recipients, 100) as usize,
            recipient_overshoot: self.count(raw.recipient_overshoot, 1000) as usize,
            max_line_length: max_line_length as usize,
            max_errors: self.count(raw.max_errors, 10) as u32,
            idle_timeout: self.duration_or(raw.idle_timeout, 300),
            command_timeout: self.duration_or(raw.command_timeout, 60),
            data_timeout: self.duration_or(raw.data_timeout, 180),
            max_connections: self.count(raw.max_connections, 5000) as usize,
            max_connections_per_ip: self.count(raw.max_connections_per_ip, 50) as usize,
            max_received_headers: self.count(raw.max_received_headers, 50) as usize,
            connection_rate_per_ip: self.rate_or(raw.connection_rate_per_ip, "600/m"),
            command_rate_per_ip: self.rate_or(raw.command_rate_per_ip, "6000/m"),
            error_delay_after: self.count(raw.error_delay_after, 5) as u32,
            error_delay: self.duration_or(raw.error_delay, 1),
        }
    }

    /// A rate such as "10/s"; `"none"` turns the limit off.
    fn rate_or(&mut self, raw: Option<Spanned<String>>, default: &str) -> Option<Rate> {
        match raw {
            None => Rate::parse(default),
            Some(r) if r.get_ref() == "none" => None,
            Some(r) => self.rate(Some(r)),
        }
    }

    fn rate(&mut self, raw: Option<Spanned<String>>) -> Option<Rate> {
        let raw = raw?;
        Rate::parse(raw.get_ref()).or_else(|| {
            self.error(
                raw.span(),
                format!("rate {:?} is not N/unit", raw.get_ref()),
                "write \"10/s\", \"300/m\", \"5000/h\" or \"100000/d\"",
            )
        })
    }

    /// A limit of at least 1, or `default` when not given.
    fn count(&mut self, n: Option<Spanned<u64>>, default: u64) -> u64 {
        match n {
            Some(n) if *n.get_ref() == 0 => self
                .error(
                    n.span(),
                    "this limit must be at least 1".into(),
                    "remove the key to get the default",
                )
                .unwrap_or(default),
            Some(n) => *n.get_ref(),
            None => default,
        }
    }

    fn duration_or(&mut self, q: Option<Spanned<Quantity>>, default_secs: u64) -> Duration {
        q.and_then(|q| self.duration(q))
            .unwrap_or(Duration::from_secs(default_secs))
    }

    fn duration(&mut self, q: Spanned<Quantity>) -> Option<Duration> {
        let parsed = match q.get_ref() {
            Quantity::Number(n) => Some(*n),
            Quantity::Text(t) => baton_units::parse_with_unit(t, baton_units::DURATION_UNITS),
        };
        match parsed {
            Some(0) | None => self.error(
                q.span(),
                "not a valid duration".into(),
                "write a positive number of seconds or a string such as \"30s\", \"5m\", \"1h\"",
            ),
            Some(secs) if secs > baton_units::MAX_DURATION_SECS => self.error(
                q.span(),
                format!("duration of {secs} seconds is longer than ten years"),
                "durations go up to \"3650d\"",
            ),
            Some(secs) => Some(Duration::from_secs(secs)),
        }
    }

    fn size(&mut self, q: Spanned<Quantity>) -> Option<u64> {
        let parsed = match q.get_ref() {
            Quantity::Number(n) => Some(*n),
            Quantity::Text(t) => baton_units::parse_with_unit(t, baton_units::SIZE_UNITS),
        };
        match parsed {
            Some(0) | None => self.error(
                q.span(),
                "not a valid size".into(),
                "write a positive number of bytes or a string such as \"50MiB\", \"10MB\"",
            ),
            Some(n) => Some(n),
        }
    }
}

fn parse_network(text: &str) -> Option<IpNet> {
    text.parse::<IpNet>()
        .ok()
        .or_else(|| text.parse::<std::net::IpAddr>().ok().map(IpNet::from))
}

fn default_hostname() -> String {
    let name = gethostname::gethostname()
        .to_string_lossy()
        .trim()
        .to_ascii_lowercase();
    if name.is_empty() || baton_smtp::address::validate_domain(&name).is_err() {
        "localhost".into()
    } else {
        name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhook_events_are_event_kinds() {
        let hook = |events: &str| {
            Config::parse(&format!(
                "[[webhook]]\nurl = \"https://crm.example.com/hook\"\nsecret = \"0123456789abcdef\"\nevents = {events}\n"
            ))
        };
        let c = hook(r#"["delivery", "transient_failure", "operator"]"#).unwrap();
        use baton_events::EventKind;
        assert_eq!(
            c.webhooks[0].events,
            [
                EventKind::Delivery,
                EventKind::TransientFailure,
                EventKind::Operator
            ]
        );
        let errors = hook(r#"["delivery", "bounced"]"#).unwrap_err();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].message, "unknown event type \"bounced\"");
        assert_eq!(
            errors[0].hint.as_deref(),
            Some(
                "types: reception, delivery, transient_failure, bounce, expiration, dsn_queued, \
                 bounce_dropped, shaping, deleted, held, suppression, operator"
            )
        );
    }

    #[test]
    fn defaults_are_loopback_mx_relay() {
        let c = Config::defaults();
        assert_eq!(c.listeners.len(), 1);
        assert_eq!(c.listeners[0].address.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.listeners[0].role, Role::Mx);
        assert!(
            c.relay
                .networks
                .iter()
                .any(|n| n.contains(&"127.0.0.1".parse::<std::net::IpAddr>().unwrap()))
        );
        assert_eq!(c.data_dir, PathBuf::from("./baton-data"));
        assert_eq!(c.limits.max_recipients, 100);
        assert!(c.spool.fsync);
    }

    #[test]
    fn full_config() {
        let c = Config::parse(
            r#"
hostname = "mx.example.com"
data_dir = "/var/spool/baton"
[[listener]]
address = "127.0.0.1:25"
role = "mx"
[[listener]]
address = "[::1]:587"
role = "submission"
[relay]
local_domains = ["Example.com"]
networks = ["10.0.0.0/8", "192.0.2.7"]
[limits]
max_message_size = "10MB"
idle_timeout = "5m"
data_timeout = 60
"#,
        )
        .unwrap();
        assert_eq!(c.hostname, "mx.example.com");
        assert_eq!(c.listeners[1].role, Role::Submission);
        assert_eq!(c.relay.local_domains, vec!["example.com"]);
        assert_eq!(c.relay.networks.len(), 2);
        assert_eq!(c.limits.max_message_size, 10_000_000);
        assert_eq!(c.limits.idle_timeout, Duration::from_secs(300));
        assert_eq!(c.limits.data_timeout, Duration::from_secs(60));
    }

    #[test]
    fn every_semantic_error_is_reported_with_its_line() {
        let errors = Config::parse(
            "hostname = \"bad host\"\n[[listener]]\naddress = \"nowhere\"\nrole = \"smtp\"\n[relay]\nnetworks = [\"10.0.0.0/33\"]\n[limits]\nidle_timeout = \"5 parsecs\"\n",
        )
        .unwrap_err();
        let lines: Vec<usize> = errors.iter().map(|e| e.line).collect();
        assert_eq!(lines, vec![1, 3, 4, 6, 8], "{errors:?}");
        assert!(errors.iter().all(|e| e.hint.is_some()));
    }

    #[test]
    fn unknown_key_and_syntax_errors() {
        let e = Config::parse("hostname = \"a.b\"\n[limits]\nmax_recipient = 5\n").unwrap_err();
        assert_eq!(e[0].line, 3);
        assert!(e[0].message.contains("max_recipient"), "{}", e[0].message);
        let e = Config::parse("hostname = \n").unwrap_err();
        assert_eq!(e[0].line, 1);
    }
}
