//! Opening a connection for a destination: the TLS it gets and why (route, MTA-STS, DANE,
//! default), its hosts, a slot under its shaping rule, then each host's addresses in turn,
//! with the plaintext fallback that opportunistic TLS allows.

use std::net::SocketAddr;

use baton_client::{Client, ClientError, ConnectOptions, Reply};
use baton_dns::DnsFailure;
use baton_shaping::Limits;

use super::worker::Connection;
use super::{DeliveryContext, Destination};
use crate::config::{LmtpTarget, Pool, Source, TlsMode};

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
        Destination::Local | Destination::Returns => return fixed(TlsMode::Disabled, "local"),
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

pub(super) struct ConnectFailure {
    pub(super) reply: Reply,
    pub(super) remote: Option<String>,
    pub(super) not_before: Option<u64>,
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
    pub(super) fn suspended(dest: &Destination, until: tokio::time::Instant, by: &str) -> Self {
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
pub(super) const BY_OPERATOR: &str = "the operator";

/// Whether `dest` is suspended now, until when and by whom: its adaptive state (`limits`) or
/// the operator (the destination, or the pool `pool`). Asked before every connection and every
/// transaction, so a suspension stops connections already open too.
pub(super) fn suspension(
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
        Destination::Local | Destination::Returns => "local",
    };
    ctx.shaper
        .operator_suspended(domain, pool)
        .map(|until| (until, BY_OPERATOR))
}

/// A pool's own name: a greylisted retry's pool pinned to one source is "NAME@SOURCE".
pub(super) fn pool_name(pool: &Pool) -> &str {
    pool.name.split('@').next().unwrap_or(&pool.name)
}

/// Opens a connection for `dest` from `source`: its TLS plan, its hosts (MX, smarthost or
/// LMTP), MTA-STS's and DANE's say on them, a slot under the shaping rule, then each host's
/// addresses in turn. Ok(None) when `wanted` says, once a slot is had, that the work went
/// elsewhere meanwhile (a connected worker took it): the slot goes back unused.
pub(super) async fn connect(
    ctx: &DeliveryContext,
    dest: &Destination,
    source: Option<&Source>,
    pool: Option<&str>,
    wanted: impl Fn() -> bool + Send + Sync,
) -> Result<Option<Connection>, ConnectFailure> {
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
        data_end_timeout: config.delivery.data_end_timeout,
        line_limit: config.delivery.line_length_limit,
        tls: plan.mode,
        auth: auth.map(|(u, p)| (u.as_str(), p.as_str())),
        bind: source.map(|s| s.address),
        trust: Some(&ctx.trust),
        dane: None,
        policy: plan.label,
    };
    let (mut hosts, port, lmtp) = match mail_hosts(ctx, dest).await? {
        Hosts::Listed(hosts, port, lmtp) => (hosts, port, lmtp),
        Hosts::UnixSocket(path) => {
            let client = Client::connect_unix(&path, &options)
                .await
                .map_err(|e| ConnectFailure::new(451, "4.4.1", e.to_string()))?;
            return Ok(Some(Connection::new(client, None, None, None)));
        }
    };
    if let Some(policy) = &plan.sts {
        apply_sts(policy, dest, &mut hosts)?;
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
    // connection slot under it before dialling. Limits apply per source × destination.
    let limits = match dest {
        Destination::Mx(domain) => Some(ctx.shaper.limits_for(source, domain, &hosts)),
        Destination::Smarthost(relay) => Some(ctx.shaper.limits_for(source, &relay.host, &hosts)),
        Destination::Local | Destination::Returns => None,
    };
    if let Some((until, by)) = suspension(ctx, dest, limits.as_deref(), pool) {
        return Err(ConnectFailure::suspended(dest, until, by));
    }
    let slot = match &limits {
        Some(l) => match l.connection_for(&wanted).await {
            Some(slot) => Some(slot),
            None => return Ok(None),
        },
        None => None,
    };
    if !wanted() {
        return Ok(None);
    }
    let dial = Dial {
        ctx,
        dest,
        options,
        port,
        lmtp,
        dane_hosts,
    };
    let client = dial.first_answering(&hosts).await?;
    let source = source.map(|s| s.name.clone());
    Ok(Some(Connection::new(client, limits, source, slot)))
}

/// Where a destination's mail goes.
enum Hosts {
    /// Host names in order of preference, the port, and whether they speak LMTP.
    Listed(Vec<String>, u16, bool),
    /// An LMTP server on a Unix socket.
    UnixSocket(std::path::PathBuf),
}

/// The hosts for a destination: its MX hosts (DNS failures become the replies a sender
/// reads), the smarthost, or the LMTP target.
async fn mail_hosts(ctx: &DeliveryContext, dest: &Destination) -> Result<Hosts, ConnectFailure> {
    let config = &ctx.config;
    match dest {
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
            let names = hosts.into_iter().map(|h| h.name).collect();
            Ok(Hosts::Listed(names, config.delivery.smtp_port, false))
        }
        Destination::Smarthost(relay) => {
            Ok(Hosts::Listed(vec![relay.host.clone()], relay.port, false))
        }
        Destination::Local => match &config.local.lmtp {
            Some(LmtpTarget::Unix(path)) => Ok(Hosts::UnixSocket(path.clone())),
            Some(LmtpTarget::Tcp(addr)) => Ok(Hosts::Listed(
                vec![addr.ip().to_string()],
                addr.port(),
                true,
            )),
            None => Err(ConnectFailure::new(
                451,
                "4.3.5",
                "no LMTP target configured".into(),
            )),
        },
        Destination::Returns => Err(ConnectFailure::new(
            451,
            "4.3.5",
            "reports are read here, not relayed".into(),
        )),
    }
}

/// An MTA-STS policy in `enforce` mode keeps only the MX hosts it names (none left: the mail
/// waits); in `testing` mode the others are reported and used anyway.
fn apply_sts(
    policy: &baton_dns::mta_sts::Policy,
    dest: &Destination,
    hosts: &mut Vec<String>,
) -> Result<(), ConnectFailure> {
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
        let outside: Vec<&String> = hosts.iter().filter(|h| !policy.allows(h)).collect();
        if !outside.is_empty() {
            tracing::warn!(destination = %dest, hosts = ?outside, "MX hosts outside the MTA-STS policy (testing mode: used anyway)");
        }
    }
    Ok(())
}

/// Dialling a destination's hosts in order.
struct Dial<'a> {
    ctx: &'a DeliveryContext,
    dest: &'a Destination,
    options: ConnectOptions<'a>,
    port: u16,
    lmtp: bool,
    /// Hosts whose MX set validated: DANE is looked up for them.
    dane_hosts: Vec<String>,
}

impl Dial<'_> {
    /// The first host (and address) that answers; else the last failure, or a permanent one
    /// when no host has an address at all.
    async fn first_answering(&self, hosts: &[String]) -> Result<Client, ConnectFailure> {
        let dest = self.dest;
        let mut last: Option<ConnectFailure> = None;
        let mut all_not_found = true;
        for host in hosts {
            let addresses = match self.ctx.dns.addresses(host).await {
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
            match self.host(host, addresses).await {
                Ok(client) => return Ok(client),
                Err(failure) => last = failure.or(last),
            }
        }
        if all_not_found && !hosts.is_empty() {
            return Err(ConnectFailure::new(
                550,
                "5.4.4",
                format!("no address for any mail host of {dest}"),
            ));
        }
        Err(last.unwrap_or_else(|| {
            ConnectFailure::new(451, "4.4.1", format!("no mail host for {dest}"))
        }))
    }

    /// One host: its DANE records if it has any, then each of its addresses. The failure is
    /// the last address's (none when it had no address to try).
    async fn host(
        &self,
        host: &str,
        addresses: Vec<std::net::IpAddr>,
    ) -> Result<Client, Option<ConnectFailure>> {
        let dane = if self.dane_hosts.iter().any(|h| h.eq_ignore_ascii_case(host)) {
            dane_for(self.ctx, host, self.port).await.map_err(Some)?
        } else {
            None
        };
        let options = match &dane {
            Some((mode, records)) => ConnectOptions {
                tls: *mode,
                dane: Some(records),
                policy: "dane",
                ..self.options
            },
            None => self.options,
        };
        let mut last = None;
        for ip in addresses {
            let addr = SocketAddr::new(ip, self.port);
            match connect_host(addr, host, &options, self.lmtp).await {
                Ok(client) => return Ok(client),
                Err(e) => {
                    tracing::debug!(destination = %self.dest, error = %e, "connection attempt failed");
                    last = Some(connect_error(e));
                }
            }
        }
        Err(last)
    }
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
