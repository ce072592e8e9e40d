//! Where mail for a domain goes: MX hosts by preference (random among equal preferences),
//! the implicit MX (A/AAAA of the domain itself, RFC 5321 §5.1), null MX (RFC 7505), and
//! which DNS failures are permanent (NXDOMAIN) and which are not (SERVFAIL, timeouts).
//!
//! Answers are cached by hickory-resolver for their TTL; TLSA records come with whether the
//! resolver validated them (DANE). [`mta_sts`] fetches and caches recipient domains' MTA-STS
//! policies. Owns name resolution and those policies; it must not open SMTP connections or
//! decide what a policy means for one (delivery does).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ProtocolConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::op::{Edns, Message, Query};
use hickory_resolver::proto::rr::{Name, RData, RecordType};
use hickory_resolver::{Resolver, TokioResolver};
use rand::seq::SliceRandom;

use baton_tls::trust::Tlsa;

#[derive(Debug, Clone)]
pub struct DnsConfig {
    /// Replace the system resolver (from /etc/resolv.conf) with these servers.
    pub nameservers: Vec<SocketAddr>,
    pub timeout: Duration,
}

pub mod mta_sts;

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

impl std::fmt::Display for DnsFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DnsFailure::NullMx => f.write_str("null MX (the domain accepts no mail)"),
            DnsFailure::NotFound(why) => write!(f, "not found: {why}"),
            DnsFailure::Temporary(why) => write!(f, "temporary failure: {why}"),
        }
    }
}

pub struct Dns {
    resolver: TokioResolver,
    /// Where DNSSEC-aware queries (DANE) go: the configured servers, else the system's.
    nameservers: Vec<SocketAddr>,
    timeout: std::time::Duration,
    /// DNSSEC-aware answers until their TTL runs out (hickory's cache does not hold them).
    secure_cache: std::sync::Mutex<SecureCache>,
}

/// (name, type) → (expiry, answer).
type SecureCache = HashMap<(String, RecordType), (Instant, Secure<RData>)>;

/// How long an answer with no records (NXDOMAIN, no data) is cached; and the longest TTL kept.
const NEGATIVE_TTL: Duration = Duration::from_secs(60);
const MAX_TTL: Duration = Duration::from_secs(3600);
/// Past this many cached answers, expired ones are dropped.
const SECURE_CACHE_PRUNE_AT: usize = 10_000;

/// An answer from a DNSSEC-aware query: `secure` is the validating resolver's AD bit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Secure<T> {
    pub secure: bool,
    pub records: Vec<T>,
}

impl Dns {
    pub fn new(config: &DnsConfig) -> anyhow::Result<Dns> {
        let (resolver_config, options) = resolver_parts(config)?;
        let resolver =
            Resolver::builder_with_config(resolver_config, TokioRuntimeProvider::default())
                .with_options(options)
                .build()?;
        let nameservers = if config.nameservers.is_empty() {
            hickory_resolver::system_conf::read_system_conf()
                .map(|(c, _)| {
                    c.name_servers()
                        .iter()
                        .map(|ns| SocketAddr::new(ns.ip, 53))
                        .collect()
                })
                .unwrap_or_default()
        } else {
            config.nameservers.clone()
        };
        Ok(Dns {
            resolver,
            nameservers,
            timeout: config.timeout,
            secure_cache: Default::default(),
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

    /// The TXT strings at `name` (each record's strings joined); none for NXDOMAIN or no data.
    pub async fn txt(&self, name: &str) -> Result<Vec<String>, DnsFailure> {
        match self.resolver.txt_lookup(fqdn(name).as_str()).await {
            Ok(lookup) => Ok(lookup
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    RData::TXT(txt) => Some(
                        txt.txt_data
                            .iter()
                            .map(|part| String::from_utf8_lossy(part))
                            .collect::<String>(),
                    ),
                    _ => None,
                })
                .collect()),
            Err(e) => match classify(&e, name) {
                Lookup::NoData | Lookup::Failed(DnsFailure::NotFound(_)) => Ok(Vec::new()),
                Lookup::Failed(f) => Err(f),
            },
        }
    }

    /// The MX hosts of `domain` and whether the resolver validated them (DNSSEC), for DANE.
    pub async fn mx_secure(&self, domain: &str) -> Result<Secure<String>, DnsFailure> {
        let answer = self.secure_query(domain, RecordType::MX).await?;
        let records = answer
            .records
            .into_iter()
            .filter_map(|r| match r {
                RData::MX(mx) => Some(
                    mx.exchange
                        .to_utf8()
                        .trim_end_matches('.')
                        .to_ascii_lowercase(),
                ),
                _ => None,
            })
            .collect();
        Ok(Secure {
            secure: answer.secure,
            records,
        })
    }

    /// The TLSA records for SMTP on `host` (`_PORT._tcp.HOST`, RFC 7672 §2.2).
    pub async fn tlsa(&self, host: &str, port: u16) -> Result<Secure<Tlsa>, DnsFailure> {
        let name = format!("_{port}._tcp.{}", host.trim_end_matches('.'));
        let answer = self.secure_query(&name, RecordType::TLSA).await?;
        let records = answer
            .records
            .into_iter()
            .filter_map(|r| match r {
                RData::TLSA(t) => Some(Tlsa {
                    usage: u8::from(t.cert_usage),
                    selector: u8::from(t.selector),
                    matching: u8::from(t.matching),
                    data: t.cert_data,
                }),
                _ => None,
            })
            .collect();
        Ok(Secure {
            secure: answer.secure,
            records,
        })
    }

    /// One query with the DO bit, read for the AD bit: DANE trusts a validating resolver
    /// (as Postfix does), so the nameservers must be one on a trusted path, usually loopback.
    /// NXDOMAIN and no data are empty answers (secure if validated).
    async fn secure_query(
        &self,
        name: &str,
        rtype: RecordType,
    ) -> Result<Secure<RData>, DnsFailure> {
        let key = (name.trim_end_matches('.').to_ascii_lowercase(), rtype);
        let now = Instant::now();
        if let Some((expires, answer)) = self.cache().get(&key)
            && *expires > now
        {
            return Ok(answer.clone());
        }
        let (answer, ttl) = self.secure_query_uncached(name, rtype).await?;
        let mut cache = self.cache();
        if cache.len() >= SECURE_CACHE_PRUNE_AT {
            cache.retain(|_, (expires, _)| *expires > now);
        }
        cache.insert(key, (now + ttl, answer.clone()));
        Ok(answer)
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, SecureCache> {
        self.secure_cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn secure_query_uncached(
        &self,
        name: &str,
        rtype: RecordType,
    ) -> Result<(Secure<RData>, Duration), DnsFailure> {
        let qname = Name::from_ascii(fqdn(name))
            .map_err(|e| DnsFailure::NotFound(format!("{name}: {e}")))?;
        let mut query = Message::query();
        query.add_query(Query::query(qname, rtype));
        query.metadata.recursion_desired = true;
        query.metadata.authentic_data = true;
        let mut edns = Edns::new();
        edns.set_dnssec_ok(true);
        edns.set_max_payload(1232);
        query.set_edns(edns);
        let wire = query
            .to_vec()
            .map_err(|e| DnsFailure::Temporary(format!("{name}: {e}")))?;
        let mut last = format!("{name}: no nameserver");
        for server in &self.nameservers {
            let reply = match tokio::time::timeout(self.timeout, exchange(*server, &wire)).await {
                Ok(Ok(bytes)) => bytes,
                Ok(Err(e)) => {
                    last = format!("{name}: {server}: {e}");
                    continue;
                }
                Err(_) => {
                    last = format!("{name}: {server}: timed out");
                    continue;
                }
            };
            let Ok(message) = Message::from_vec(&reply) else {
                last = format!("{name}: {server}: malformed reply");
                continue;
            };
            if message.metadata.id != query.metadata.id {
                last = format!("{name}: {server}: reply to another query");
                continue;
            }
            return match message.metadata.response_code {
                ResponseCode::NoError | ResponseCode::NXDomain => {
                    let answers: Vec<_> = message
                        .answers
                        .into_iter()
                        .filter(|r| r.record_type() == rtype)
                        .collect();
                    let ttl = answers
                        .iter()
                        .map(|r| Duration::from_secs(u64::from(r.ttl)))
                        .min()
                        .unwrap_or(NEGATIVE_TTL)
                        .min(MAX_TTL);
                    let answer = Secure {
                        secure: message.metadata.authentic_data,
                        records: answers.into_iter().map(|r| r.data).collect(),
                    };
                    Ok((answer, ttl))
                }
                other => Err(DnsFailure::Temporary(format!("{name}: DNS {other}"))),
            };
        }
        Err(DnsFailure::Temporary(last))
    }
}

/// Sends a query over UDP, and over TCP when the answer was truncated.
async fn exchange(server: SocketAddr, wire: &[u8]) -> std::io::Result<Vec<u8>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let local: SocketAddr = if server.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = tokio::net::UdpSocket::bind(local).await?;
    socket.connect(server).await?;
    socket.send(wire).await?;
    let mut buf = vec![0u8; 4096];
    let n = socket.recv(&mut buf).await?;
    buf.truncate(n);
    // TC is bit 1 of the third header byte.
    if buf.len() < 3 || buf[2] & 0x02 == 0 {
        return Ok(buf);
    }
    let mut tcp = tokio::net::TcpStream::connect(server).await?;
    let mut framed = (wire.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(wire);
    tcp.write_all(&framed).await?;
    let len = tcp.read_u16().await? as usize;
    let mut answer = vec![0u8; len];
    tcp.read_exact(&mut answer).await?;
    Ok(answer)
}

/// The resolver configuration for `[dns]`: its nameservers, else the system's
/// (/etc/resolv.conf); with the timeout and attempts Baton uses everywhere.
pub fn resolver_parts(config: &DnsConfig) -> anyhow::Result<(ResolverConfig, ResolverOpts)> {
    let (resolver_config, mut options) = if config.nameservers.is_empty() {
        hickory_resolver::system_conf::read_system_conf()?
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
        let mut options = ResolverOpts::default();
        // A resolver given explicitly is the only source of truth (tests rely on it).
        options.use_hosts_file = ResolveHosts::Never;
        (ResolverConfig::from_parts(None, vec![], servers), options)
    };
    options.timeout = config.timeout;
    options.attempts = 2;
    Ok((resolver_config, options))
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
