//! What every SMTP session shares ([`Reception`]): the receiving side's configuration, the way
//! into the queue ([`Intake`]), the per-client and per-user limits, and the count of open
//! connections that admits or refuses a new one.
//!
//! Owns that shared state; it must not accept sockets (the listeners do) or speak SMTP.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use tokio::sync::watch;

use crate::config::Config;
use crate::intake::Intake;
use baton_shaping::ratelimit::RateLimiter;

/// What every session shares: the receiving side's configuration, the way into the queue,
/// and the per-client and per-user limits.
pub struct Reception {
    pub config: Arc<Config>,
    pub intake: Intake,
    /// Why intake must pause now (disk nearly full, queue at its limit), if it must.
    pub backpressure: Arc<crate::backpressure::Backpressure>,
    /// Submission users, when `[submission] users_file` is set.
    pub users: Option<Arc<crate::auth::Users>>,
    pub auth_failures: crate::auth::FailureLimiter,
    /// Per-client-address rates (`[limits]`); relay networks are exempt.
    pub connection_rate: Option<RateLimiter<IpAddr>>,
    pub command_rate: Option<RateLimiter<IpAddr>>,
    /// Per-user submission rates (`[submission]`).
    pub user_messages: Option<RateLimiter<String>>,
    pub user_recipients: Option<RateLimiter<String>>,
    /// SPF/DKIM/DMARC checks for mx listeners (`[inbound] authentication_results`).
    pub inbound_auth: Option<crate::inbound_auth::InboundAuth>,
    pub shutdown: watch::Receiver<bool>,
    connections: Mutex<Connections>,
}

#[derive(Default)]
struct Connections {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

/// Holds a connection's place in the counts; released on drop.
pub(crate) struct Slot {
    ctx: Arc<Reception>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self
            .ctx
            .connections
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        c.total = c.total.saturating_sub(1);
        baton_events::metrics::connection("inbound", false);
        if let Some(n) = c.per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                c.per_ip.remove(&self.ip);
            }
        }
    }
}

impl Reception {
    /// Sets up the limits and checks the configuration names; fails when the inbound
    /// authentication checks cannot be set up.
    pub fn new(
        config: Arc<Config>,
        intake: Intake,
        backpressure: Arc<crate::backpressure::Backpressure>,
        shutdown: watch::Receiver<bool>,
    ) -> anyhow::Result<Reception> {
        let users = config
            .submission
            .users_file
            .as_deref()
            .map(|p| Arc::new(crate::auth::Users::new(p)));
        let inbound_auth = if config.inbound.authentication_results {
            Some(
                crate::inbound_auth::InboundAuth::new(&config.dns, &config.hostname)
                    .context("cannot set up inbound authentication checks")?,
            )
        } else {
            None
        };
        Ok(Reception {
            inbound_auth,
            users,
            auth_failures: Default::default(),
            connection_rate: config.limits.connection_rate_per_ip.map(RateLimiter::new),
            command_rate: config.limits.command_rate_per_ip.map(RateLimiter::new),
            user_messages: config.submission.message_rate.map(RateLimiter::new),
            user_recipients: config.submission.recipient_rate.map(RateLimiter::new),
            intake,
            backpressure,
            shutdown,
            connections: Mutex::default(),
            config,
        })
    }

    /// More than three quarters of the connection slots taken: sessions then wait for a
    /// command only briefly (Postfix's stress-adaptive behaviour), so idle or slow clients
    /// cannot hold the server.
    pub fn under_stress(&self) -> bool {
        let c = self.connections.lock().unwrap_or_else(|e| e.into_inner());
        c.total * 4 > self.config.limits.max_connections * 3
    }

    /// Clients in `relay.networks` are trusted: rate limits do not apply to them.
    pub fn trusted(&self, ip: IpAddr) -> bool {
        self.config.relay.networks.iter().any(|n| n.contains(&ip))
    }

    /// Counts a command against the client's rate; false when it is past the limit. The
    /// session asks only for clients outside the relay networks.
    pub fn command_allowed(&self, ip: IpAddr) -> bool {
        self.command_rate.as_ref().is_none_or(|l| l.take(&ip))
    }

    /// Takes a connection slot, or says which limit is full.
    pub(crate) fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, &'static str> {
        let limits = &self.config.limits;
        if let Some(limiter) = &self.connection_rate
            && !self.trusted(ip)
            && !limiter.take(&ip)
        {
            return Err("Error: too many connections from your address, slow down");
        }
        let mut c = self.connections.lock().unwrap_or_else(|e| e.into_inner());
        if c.total >= limits.max_connections {
            return Err("Error: too many connections");
        }
        let n = c.per_ip.entry(ip).or_insert(0);
        if *n >= limits.max_connections_per_ip {
            return Err("Error: too many connections from your address");
        }
        *n += 1;
        c.total += 1;
        baton_events::metrics::connection("inbound", true);
        Ok(Slot {
            ctx: self.clone(),
            ip,
        })
    }
}
