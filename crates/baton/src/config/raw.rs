//! The config file as TOML gives it: one `Raw*` struct per table, every value still carrying
//! its position (`Spanned`) so that validation can name the line of each problem.
//!
//! Owns the file's shape (key names, types, `deny_unknown_fields`); it must not check values,
//! pick defaults or read files: that is the validators' job (`validate.rs` and its sections).

use serde::Deserialize;
use toml::Spanned;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) hostname: Option<Spanned<String>>,
    pub(super) data_dir: Option<Spanned<String>>,
    pub(super) worker_threads: Option<Spanned<u64>>,
    #[serde(default)]
    pub(super) listener: Vec<RawListener>,
    #[serde(default)]
    pub(super) relay: RawRelay,
    #[serde(default)]
    pub(super) limits: RawLimits,
    #[serde(default)]
    pub(super) spool: RawSpool,
    #[serde(default)]
    pub(super) events: RawEvents,
    #[serde(default)]
    pub(super) dns: RawDns,
    #[serde(default)]
    pub(super) delivery: RawDelivery,
    #[serde(default)]
    pub(super) local: RawLocal,
    #[serde(default)]
    pub(super) route: Vec<RawRoute>,
    #[serde(default)]
    pub(super) shaping: Vec<RawShaping>,
    #[serde(default)]
    pub(super) source: Vec<RawSource>,
    #[serde(default)]
    pub(super) pool: Vec<RawPool>,
    #[serde(default)]
    pub(super) backoff: Vec<RawBackoff>,
    #[serde(default)]
    pub(super) submission: RawSubmission,
    #[serde(default)]
    pub(super) inbound: RawInbound,
    #[serde(default)]
    pub(super) http: RawHttp,
    #[serde(default)]
    pub(super) webhook: Vec<RawWebhook>,
    #[serde(default)]
    pub(super) dkim: Vec<RawDkim>,
    #[serde(default)]
    pub(super) bounces: RawBounces,
    pub(super) cluster: Option<RawCluster>,
    pub(super) nats: Option<RawNats>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawNats {
    pub(super) url: Option<Spanned<UrlList>>,
    pub(super) subject: Option<Spanned<String>>,
    pub(super) stream: Option<Spanned<String>>,
    pub(super) max_age: Option<Spanned<Quantity>>,
    pub(super) events: Option<Vec<Spanned<String>>>,
    pub(super) batch_size: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCluster {
    pub(super) redis: Option<Spanned<UrlList>>,
    pub(super) redis_cluster: Option<bool>,
    pub(super) node: Option<Spanned<String>>,
    pub(super) heartbeat: Option<Spanned<Quantity>>,
    pub(super) prefix: Option<Spanned<String>>,
    pub(super) fallback_nodes: Option<Spanned<u64>>,
    pub(super) lease_ttl: Option<Spanned<Quantity>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum UrlList {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBounces {
    pub(super) domain: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) tenant_domains: std::collections::BTreeMap<String, Spanned<String>>,
    #[serde(default)]
    pub(super) pool_domains: std::collections::BTreeMap<String, Spanned<String>>,
    pub(super) secret: Option<Spanned<String>>,
    pub(super) rules: Option<Vec<Spanned<String>>>,
    pub(super) soft_bounce_limit: Option<Spanned<u64>>,
    pub(super) soft_bounce_window: Option<Spanned<Quantity>>,
    pub(super) unsubscribe_url: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) list_unsubscribe_tenants: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDkim {
    pub(super) domain: Spanned<String>,
    pub(super) selector: Spanned<String>,
    pub(super) key: Spanned<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSubmission {
    pub(super) users_file: Option<String>,
    pub(super) plaintext_auth_on_loopback: Option<bool>,
    pub(super) sender_policy: Option<Spanned<String>>,
    pub(super) message_rate: Option<Spanned<String>>,
    pub(super) recipient_rate: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWebhook {
    pub(super) url: Spanned<String>,
    pub(super) secret: Spanned<String>,
    pub(super) events: Option<Vec<Spanned<String>>>,
    pub(super) batch_size: Option<Spanned<u64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHttp {
    pub(super) address: Option<Spanned<String>>,
    pub(super) enabled: Option<bool>,
    pub(super) tokens: Option<Vec<Spanned<String>>>,
    pub(super) trusted_networks: Option<Vec<Spanned<String>>>,
    pub(super) max_inject_bytes: Option<Spanned<Quantity>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawInbound {
    pub(super) authentication_results: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBackoff {
    pub(super) code: Option<Spanned<u64>>,
    pub(super) status: Option<Spanned<String>>,
    pub(super) pattern: Option<Spanned<String>>,
    pub(super) class: Option<Spanned<String>>,
    pub(super) action: Spanned<String>,
    pub(super) factor: Option<Spanned<f64>>,
    pub(super) duration: Option<Spanned<Quantity>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSource {
    pub(super) name: Spanned<String>,
    pub(super) address: Spanned<String>,
    pub(super) ehlo: Option<Spanned<String>>,
    /// "builtin" or a list of caps per period.
    pub(super) warmup: Option<Spanned<toml::Value>>,
    pub(super) warmup_start: Option<Spanned<String>>,
    pub(super) warmup_period: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPool {
    pub(super) name: Spanned<String>,
    pub(super) sources: Vec<Spanned<String>>,
    pub(super) weights: Option<Vec<Spanned<u64>>>,
    #[serde(default)]
    pub(super) sender_domains: Vec<Spanned<String>>,
    #[serde(default)]
    pub(super) tenants: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawShaping {
    pub(super) domain: Option<Spanned<String>>,
    pub(super) site: Option<Spanned<String>>,
    pub(super) max_connections: Option<Spanned<u64>>,
    pub(super) max_messages_per_connection: Option<Spanned<u64>>,
    pub(super) max_recipients_per_transaction: Option<Spanned<u64>>,
    pub(super) max_message_rate: Option<Spanned<String>>,
    pub(super) max_connection_rate: Option<Spanned<String>>,
    pub(super) retry_interval: Option<Spanned<Quantity>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDns {
    pub(super) nameservers: Option<Vec<Spanned<String>>>,
    pub(super) timeout: Option<Spanned<Quantity>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDelivery {
    pub(super) smtp_port: Option<Spanned<u64>>,
    pub(super) retry_min: Option<Spanned<Quantity>>,
    pub(super) retry_max: Option<Spanned<Quantity>>,
    pub(super) max_age: Option<Spanned<Quantity>>,
    pub(super) delay_warning: Option<Spanned<Quantity>>,
    pub(super) max_connections_per_destination: Option<Spanned<u64>>,
    pub(super) max_messages_per_connection: Option<Spanned<u64>>,
    pub(super) max_recipients_per_transaction: Option<Spanned<u64>>,
    pub(super) connect_timeout: Option<Spanned<Quantity>>,
    pub(super) data_timeout: Option<Spanned<Quantity>>,
    pub(super) data_end_timeout: Option<Spanned<Quantity>>,
    pub(super) line_length_limit: Option<Spanned<u64>>,
    pub(super) idle_timeout: Option<Spanned<Quantity>>,
    pub(super) hold: Option<bool>,
    pub(super) greylist_retry: Option<Spanned<Quantity>>,
    pub(super) pool: Option<Spanned<String>>,
    pub(super) tls: Option<Spanned<String>>,
    pub(super) tls_ca_file: Option<Spanned<String>>,
    pub(super) mta_sts: Option<bool>,
    pub(super) mta_sts_port: Option<Spanned<u64>>,
    pub(super) dane: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLocal {
    pub(super) users: Option<Vec<Spanned<String>>>,
    pub(super) maildir_root: Option<String>,
    pub(super) lmtp: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRoute {
    pub(super) domain: Spanned<String>,
    pub(super) smarthost: Option<Spanned<String>>,
    pub(super) transport: Option<Spanned<String>>,
    pub(super) auth_user: Option<Spanned<String>>,
    pub(super) auth_password: Option<Spanned<String>>,
    pub(super) tls: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawListener {
    pub(super) address: Spanned<String>,
    pub(super) role: Option<Spanned<String>>,
    pub(super) tls_cert: Option<Spanned<String>>,
    pub(super) tls_key: Option<Spanned<String>>,
    pub(super) trust_networks: Option<Spanned<bool>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRelay {
    pub(super) local_domains: Option<Vec<Spanned<String>>>,
    pub(super) networks: Option<Vec<Spanned<String>>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    pub(super) max_message_size: Option<Spanned<Quantity>>,
    pub(super) max_recipients: Option<Spanned<u64>>,
    pub(super) recipient_overshoot: Option<Spanned<u64>>,
    pub(super) max_line_length: Option<Spanned<u64>>,
    pub(super) max_errors: Option<Spanned<u64>>,
    pub(super) idle_timeout: Option<Spanned<Quantity>>,
    pub(super) command_timeout: Option<Spanned<Quantity>>,
    pub(super) data_timeout: Option<Spanned<Quantity>>,
    pub(super) max_connections: Option<Spanned<u64>>,
    pub(super) max_connections_per_ip: Option<Spanned<u64>>,
    pub(super) max_received_headers: Option<Spanned<u64>>,
    pub(super) connection_rate_per_ip: Option<Spanned<String>>,
    pub(super) command_rate_per_ip: Option<Spanned<String>>,
    pub(super) error_delay_after: Option<Spanned<u64>>,
    pub(super) error_delay: Option<Spanned<Quantity>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSpool {
    pub(super) fsync: Option<bool>,
    pub(super) segment_size: Option<Spanned<Quantity>>,
    pub(super) min_free_space: Option<Spanned<Quantity>>,
    pub(super) max_queued_recipients: Option<Spanned<u64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEvents {
    pub(super) file_size: Option<Spanned<Quantity>>,
    pub(super) file_age: Option<Spanned<Quantity>>,
    pub(super) retention: Option<Spanned<Quantity>>,
}

/// A number, or a string with a unit: "30s", "5m", "50MiB".
#[derive(Deserialize, Clone)]
#[serde(untagged)]
pub(super) enum Quantity {
    Number(u64),
    Text(String),
}
