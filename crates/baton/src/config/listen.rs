//! The receiving side's sections: `[[listener]]`, `[relay]`, `[limits]`, `[spool]`, and
//! `[events]` (the log the spool's outcomes go to).
//!
//! Owns their checks and defaults. A listener's certificate and key are only recorded (for
//! `Config::check_files`), never opened here.

use std::net::SocketAddr;
use std::path::PathBuf;

use super::files::ConfigFile;
use super::raw::{Quantity, RawEvents, RawLimits, RawListener, RawRelay, RawSpool};
use super::validate::{Validator, parse_network};
use super::{DEFAULT_LISTEN, Limits, ListenerConfig, RelayConfig, Role, SpoolConfig};

impl Validator<'_> {
    /// The listeners; the default one (loopback, mx) when none is given and nothing is wrong.
    pub(super) fn listeners(&mut self, raw: Vec<RawListener>) -> Vec<ListenerConfig> {
        let mut listeners = self.each(raw, Self::listener);
        if listeners.is_empty() && self.errors.is_empty() {
            listeners.push(ListenerConfig {
                address: DEFAULT_LISTEN.parse().unwrap_or_else(|_| unreachable!()),
                role: Role::Mx,
                tls: None,
                trust_networks: false,
            });
        }
        listeners
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
                let (cert_path, key_path) =
                    (PathBuf::from(cert.get_ref()), PathBuf::from(key.get_ref()));
                self.file(
                    cert.span(),
                    ConfigFile::ListenerTls {
                        cert: cert_path.clone(),
                        key: key_path.clone(),
                    },
                );
                Some((cert_path, key_path))
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

    pub(super) fn relay(&mut self, raw: RawRelay, hostname: &str) -> RelayConfig {
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

    pub(super) fn limits(&mut self, raw: RawLimits) -> Limits {
        let max_line_length = self.count(raw.max_line_length, 2048);
        if max_line_length < 512 {
            self.error_at_top(
                format!("max_line_length {max_line_length} is below 512"),
                "RFC 5321 §4.5.3.1.4 requires at least 512 octets",
            );
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

    /// `[events]`: the event log's files (fsync follows `[spool]`).
    pub(super) fn events(&mut self, raw: RawEvents, fsync: bool) -> baton_events::LogOptions {
        let defaults = baton_events::LogOptions::default();
        let retention = match raw.retention {
            Some(q) if matches!(q.get_ref(), Quantity::Text(t) if t == "forever") => None,
            Some(q) => self.duration(q).or(defaults.retention),
            None => defaults.retention,
        };
        baton_events::LogOptions {
            fsync,
            file_size: raw
                .file_size
                .and_then(|s| self.size(s))
                .unwrap_or(defaults.file_size),
            file_age: raw
                .file_age
                .and_then(|d| self.duration(d))
                .unwrap_or(defaults.file_age),
            retention,
        }
    }

    pub(super) fn spool(&mut self, raw: RawSpool) -> SpoolConfig {
        SpoolConfig {
            fsync: raw.fsync.unwrap_or(true),
            segment_size: raw
                .segment_size
                .and_then(|s| self.size(s))
                .unwrap_or(64 << 20),
            min_free_space: raw.min_free_space.and_then(|s| self.size(s)).unwrap_or(0),
            max_queued_recipients: raw.max_queued_recipients.map(|n| self.count(Some(n), 1)),
        }
    }
}
