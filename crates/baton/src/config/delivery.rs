//! Where mail goes and how it leaves: `[dns]`, `[delivery]`, `[local]` and `[[route]]`.
//!
//! Owns their checks and defaults, smarthost syntax and the TLS settings of routes. The CA file
//! is only recorded (for `Config::check_files`), never opened here.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::Spanned;

use super::files::ConfigFile;
use super::raw::{RawDelivery, RawDns, RawLocal, RawRoute};
use super::validate::Validator;
use super::{
    DeliveryConfig, DnsConfig, LmtpTarget, LocalConfig, Route, Smarthost, TlsMode, Transport,
};

impl Validator<'_> {
    pub(super) fn dns(&mut self, raw: RawDns) -> DnsConfig {
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

    pub(super) fn delivery(&mut self, raw: RawDelivery) -> DeliveryConfig {
        let port = self.port(raw.smtp_port, "smtp_port", 25, "leave it out for port 25");
        let retry_min = self.duration_or(raw.retry_min, 300);
        let retry_max = self.duration_or(raw.retry_max, 4000);
        let max_age = self.duration_or(raw.max_age, 5 * 86400);
        let delay_warning = self.duration_or(raw.delay_warning, 4 * 3600);
        let connect_timeout = self.duration_or(raw.connect_timeout, 30);
        let idle_timeout = self.duration_or(raw.idle_timeout, 5);
        let tls = self
            .tls_mode(raw.tls.as_ref())
            .unwrap_or(TlsMode::Opportunistic);
        let tls_ca_file = raw.tls_ca_file.map(|f| {
            let path = PathBuf::from(f.get_ref());
            self.file(f.span(), ConfigFile::CaFile(path.clone()));
            path
        });
        let mta_sts_port = self.port(
            raw.mta_sts_port,
            "mta_sts_port",
            443,
            "leave it out for port 443",
        );
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
            data_end_timeout: self.duration_or(raw.data_end_timeout, 600),
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

    pub(super) fn local(&mut self, raw: RawLocal, data_dir: &Path) -> LocalConfig {
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

    pub(super) fn route(&mut self, raw: RawRoute) -> Option<Route> {
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
}
