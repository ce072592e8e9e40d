//! Where mail for a domain goes: MX hosts by preference (random among equal preferences),
//! the implicit MX (A/AAAA of the domain itself, RFC 5321 §5.1), null MX (RFC 7505), and
//! which DNS failures are permanent (NXDOMAIN) and which are not (SERVFAIL, timeouts).
//!
//! Answers are cached by hickory-resolver for their TTL. Owns name resolution only; it must
//! not open SMTP connections.

use std::net::IpAddr;

use hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ProtocolConfig, ResolveHosts, ResolverConfig,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::RData;
use hickory_resolver::{Resolver, TokioResolver};
use rand::seq::SliceRandom;

use crate::config::DnsConfig;

/// One host to try, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MxHost {
    pub name: String,
    pub preference: u16,
}

/// Why a domain or host cannot be reached through DNS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DnsFailure {
    /// The domain publishes a null MX: it accepts no mail (5.1.10).
    NullMx,
    /// NXDOMAIN, or no usable address: permanent.
    NotFound(String),
    /// SERVFAIL, timeouts, refusals: try again later.
    Temporary(String),
}

pub struct Dns {
    resolver: TokioResolver,
}

impl Dns {
    pub fn new(config: &DnsConfig) -> anyhow::Result<Dns> {
        let provider = TokioRuntimeProvider::default();
        let mut builder = if config.nameservers.is_empty() {
            Resolver::builder(provider)?
        } else {
            let servers = config
                .nameservers
                .iter()
                .map(|addr| {
                    let connections = [ProtocolConfig::Udp, ProtocolConfig::Tcp]
                        .into_iter()
                        .map(|protocol| {
                            let mut c = ConnectionConfig::new(protocol);
                            c.port = addr.port();
                            c
                        })
                        .collect();
                    NameServerConfig::new(addr.ip(), true, connections)
                })
                .collect();
            Resolver::builder_with_config(
                ResolverConfig::from_parts(None, vec![], servers),
                provider,
            )
        };
        let options = builder.options_mut();
        options.timeout = config.timeout;
        options.attempts = 2;
        if !config.nameservers.is_empty() {
            // A resolver given explicitly is the only source of truth (tests rely on it).
            options.use_hosts_file = ResolveHosts::Never;
        }
        Ok(Dns {
            resolver: builder.build()?,
        })
    }

    /// The hosts to try for `domain`, best first.
    pub async fn mx_hosts(&self, domain: &str) -> Result<Vec<MxHost>, DnsFailure> {
        let name = fqdn(domain);
        let lookup = match self.resolver.mx_lookup(name.as_str()).await {
            Ok(lookup) => lookup,
            Err(e) => {
                return match classify(&e, domain) {
                    // No MX records at all: the domain itself is the implicit MX.
                    Lookup::NoData => Ok(vec![MxHost {
                        name: domain.to_string(),
                        preference: 0,
                    }]),
                    Lookup::Failed(f) => Err(f),
                };
            }
        };
        let mut hosts: Vec<MxHost> = lookup
            .answers()
            .iter()
            .filter_map(|r| match &r.data {
                RData::MX(mx) => Some(MxHost {
                    name: mx.exchange.to_utf8().trim_end_matches('.').to_string(),
                    preference: mx.preference,
                }),
                _ => None,
            })
            .collect();
        if hosts.is_empty() {
            return Ok(vec![MxHost {
                name: domain.to_string(),
                preference: 0,
            }]);
        }
        if hosts.iter().all(|h| h.name.is_empty()) {
            return Err(DnsFailure::NullMx);
        }
        hosts.retain(|h| !h.name.is_empty());
        let mut rng = rand::rng();
        hosts.shuffle(&mut rng);
        hosts.sort_by_key(|h| h.preference); // stable: equal preferences stay shuffled
        Ok(hosts)
    }

    /// The addresses of one host (an address literal is its own answer).
    pub async fn addresses(&self, host: &str) -> Result<Vec<IpAddr>, DnsFailure> {
        let literal = host.trim_start_matches('[').trim_end_matches(']');
        let literal = literal
            .strip_prefix("IPv6:")
            .or_else(|| literal.strip_prefix("ipv6:"))
            .unwrap_or(literal);
        if let Ok(ip) = literal.parse::<IpAddr>() {
            return Ok(vec![ip]);
        }
        match self.resolver.lookup_ip(fqdn(host).as_str()).await {
            Ok(ips) => {
                let ips: Vec<IpAddr> = ips.iter().collect();
                if ips.is_empty() {
                    Err(DnsFailure::NotFound(format!("{host}: no A or AAAA record")))
                } else {
                    Ok(ips)
                }
            }
            Err(e) => Err(match classify(&e, host) {
                Lookup::NoData => DnsFailure::NotFound(format!("{host}: no A or AAAA record")),
                Lookup::Failed(f) => f,
            }),
        }
    }
}

enum Lookup {
    /// The name exists but has no records of the type asked.
    NoData,
    Failed(DnsFailure),
}

fn classify(err: &NetError, name: &str) -> Lookup {
    match err {
        NetError::Dns(DnsError::NoRecordsFound(no)) => match no.response_code {
            ResponseCode::NXDomain => Lookup::Failed(DnsFailure::NotFound(format!(
                "{name}: no such domain (NXDOMAIN)"
            ))),
            ResponseCode::NoError => Lookup::NoData,
            other => Lookup::Failed(DnsFailure::Temporary(format!("{name}: DNS {other}"))),
        },
        other => Lookup::Failed(DnsFailure::Temporary(format!("{name}: DNS {other}"))),
    }
}

/// Fully qualified (trailing dot) so that no search domain is appended.
fn fqdn(name: &str) -> String {
    if name.ends_with('.') {
        name.to_string()
    } else {
        format!("{name}.")
    }
}
