//! The validator's core: TOML text to a [`Config`] plus every problem found, each at its line.
//!
//! Owns turning spans into line and column, collecting errors (validation never stops at the
//! first), the order sections are validated in (which is the order errors are reported in),
//! and the value parsers every section shares: counts, durations, sizes, rates, TLS modes.
//! The sections themselves live in `listen.rs`, `delivery.rs`, `shaping.rs` and `services.rs`.
//!
//! It must not read any file: a file the config names is only recorded, with its position, in
//! [`Config::files`] for [`Config::check_files`] (`files.rs`) to read.

use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;

use baton_shaping::Rate;
use ipnet::IpNet;
use toml::Spanned;

use super::files::{ConfigFile, NamedFile};
use super::raw::{Quantity, RawConfig};
use super::{Config, ConfigError, InboundConfig, TlsMode};

/// Parses and validates `text`: the configuration (built even when there are problems, with
/// defaults in their place) and the problems, in the order sections are validated; Err only
/// when the text is not TOML of the config's shape.
pub(super) fn validate(text: &str) -> Result<(Config, Vec<ConfigError>), Vec<ConfigError>> {
    let raw: RawConfig = toml::from_str(text).map_err(|e| vec![toml_error(text, &e)])?;
    let mut v = Validator {
        text,
        errors: Vec::new(),
        files: Vec::new(),
    };
    let config = v.config(raw);
    Ok((config, v.errors))
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

pub(super) struct Validator<'a> {
    text: &'a str,
    pub(super) errors: Vec<ConfigError>,
    /// The files named so far, each with the number of errors before it.
    files: Vec<NamedFile>,
}

impl Validator<'_> {
    /// Records a problem at `span`; None, so that a failed value can be returned as it is.
    pub(super) fn error<T>(
        &mut self,
        span: Range<usize>,
        message: String,
        hint: &str,
    ) -> Option<T> {
        let (line, column) = line_col(self.text, span.start);
        self.errors.push(ConfigError {
            line,
            column,
            message,
            hint: Some(hint.to_string()),
        });
        None
    }

    /// Records a problem that no single value is to blame for (reported at line 0).
    pub(super) fn error_at_top(&mut self, message: String, hint: &str) {
        self.errors.push(ConfigError {
            line: 0,
            column: 0,
            message,
            hint: Some(hint.into()),
        });
    }

    /// Records a file named at `span`, for [`Config::check_files`] to read.
    pub(super) fn file(&mut self, span: Range<usize>, file: ConfigFile) {
        let (line, column) = line_col(self.text, span.start);
        self.files
            .push(NamedFile::new(file, line, column, self.errors.len()));
    }

    /// Validates each raw table of an array, keeping the valid ones.
    pub(super) fn each<R, T>(
        &mut self,
        raw: Vec<R>,
        mut one: impl FnMut(&mut Self, R) -> Option<T>,
    ) -> Vec<T> {
        raw.into_iter().filter_map(|r| one(self, r)).collect()
    }

    /// The whole file, section by section; the order of the calls is the order of the errors.
    fn config(&mut self, raw: RawConfig) -> Config {
        let hostname = self.hostname(raw.hostname);
        let data_dir = raw
            .data_dir
            .map(|d| PathBuf::from(d.into_inner()))
            .unwrap_or_else(|| PathBuf::from("./baton-data"));
        let listeners = self.listeners(raw.listener);
        let relay = self.relay(raw.relay, &hostname);
        let limits = self.limits(raw.limits);
        let spool = self.spool(raw.spool);
        let events = self.events(raw.events, spool.fsync);
        let dns = self.dns(raw.dns);
        let delivery = self.delivery(raw.delivery);
        let local = self.local(raw.local, &data_dir);
        let routes = self.each(raw.route, Self::route);
        let worker_threads = self.worker_threads(raw.worker_threads);
        let shaping = self.each(raw.shaping, Self::shaping);
        let pools = self.pools(raw.source, raw.pool);
        let backoff = self.each(raw.backoff, Self::backoff);
        let sender_policy = self.sender_policy(raw.submission.sender_policy.as_ref());
        let dkim = self.each(raw.dkim, Self::dkim);
        let http = self.http(raw.http);
        let webhooks = self.each(raw.webhook, Self::webhook);
        let submission = self.submission(raw.submission, sender_policy);
        let bounces = self.bounces(raw.bounces);
        let cluster = self.cluster(raw.cluster, &hostname);
        let node = cluster
            .as_ref()
            .map_or(hostname.as_str(), |c| c.node.as_str());
        let nats = self.nats(raw.nats, node);
        self.default_pool_exists(&delivery, &pools);
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
            events,
            dns,
            delivery,
            local,
            routes,
            bounces,
            cluster,
            nats,
            files: std::mem::take(&mut self.files),
        }
    }

    fn hostname(&mut self, raw: Option<Spanned<String>>) -> String {
        let Some(h) = raw else {
            return default_hostname();
        };
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

    fn worker_threads(&mut self, raw: Option<Spanned<u64>>) -> usize {
        match raw {
            Some(n) if *n.get_ref() == 0 || *n.get_ref() > 1024 => self
                .error(
                    n.span(),
                    "worker_threads must be 1-1024".into(),
                    "1 suits a small machine; about one per core on a large one",
                )
                .unwrap_or(1),
            Some(n) => *n.get_ref() as usize,
            None => 1,
        }
    }

    /// A rate such as "10/s"; `"none"` turns the limit off.
    pub(super) fn rate_or(&mut self, raw: Option<Spanned<String>>, default: &str) -> Option<Rate> {
        match raw {
            None => Rate::parse(default),
            Some(r) if r.get_ref() == "none" => None,
            Some(r) => self.rate(Some(r)),
        }
    }

    pub(super) fn rate(&mut self, raw: Option<Spanned<String>>) -> Option<Rate> {
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
    pub(super) fn count(&mut self, n: Option<Spanned<u64>>, default: u64) -> u64 {
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

    /// A port from 1 to 65535 (`key` names it in the error), or `default` when not given.
    pub(super) fn port(
        &mut self,
        raw: Option<Spanned<u64>>,
        key: &str,
        default: u16,
        hint: &str,
    ) -> u16 {
        match raw {
            Some(p) if *p.get_ref() == 0 || *p.get_ref() > 65535 => self
                .error(p.span(), format!("{key} must be 1-65535"), hint)
                .unwrap_or(default),
            Some(p) => *p.get_ref() as u16,
            None => default,
        }
    }

    pub(super) fn duration_or(
        &mut self,
        q: Option<Spanned<Quantity>>,
        default_secs: u64,
    ) -> Duration {
        q.and_then(|q| self.duration(q))
            .unwrap_or(Duration::from_secs(default_secs))
    }

    pub(super) fn duration(&mut self, q: Spanned<Quantity>) -> Option<Duration> {
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

    pub(super) fn size(&mut self, q: Spanned<Quantity>) -> Option<u64> {
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

    pub(super) fn tls_mode(&mut self, raw: Option<&Spanned<String>>) -> Option<TlsMode> {
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
}

pub(super) fn parse_network(text: &str) -> Option<IpNet> {
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
