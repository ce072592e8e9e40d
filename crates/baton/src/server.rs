//! The listeners: bind the configured addresses, accept connections within the connection
//! limits and run one [`Session`] task per client; orderly shutdown of sessions.
//!
//! Owns sockets, counting connections and what every session shares ([`Reception`]). It must
//! not parse SMTP (the session does) or write to the spool (sessions hand messages to
//! [`Intake`], which commits them).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::config::{Config, Role};
use crate::intake::Intake;
use crate::session::Session;
use baton_shaping::ratelimit::RateLimiter;
use baton_tls::server::{Conn, TlsStore};

/// What every session shares: the receiving side's configuration, the way into the queue,
/// and the per-client and per-user limits.
pub struct Reception {
    pub config: Arc<Config>,
    pub intake: Intake,
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
struct Slot {
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
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, &'static str> {
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

/// A bound listener: its socket, its role (and whether it trusts the relay networks without
/// AUTH) and its TLS certificate.
pub struct Bound {
    listener: TcpListener,
    role: (Role, bool),
    tls: Option<Arc<TlsStore>>,
}

/// Binds every configured listener and loads its certificate; SIGHUP reloads them.
pub async fn bind(config: &Config) -> anyhow::Result<Vec<Bound>> {
    let mut bound = Vec::new();
    let mut stores = Vec::new();
    for l in &config.listeners {
        let listener = TcpListener::bind(l.address)
            .await
            .with_context(|| format!("cannot listen on {} (in use? permitted?)", l.address))?;
        let tls = match &l.tls {
            Some((cert, key)) => {
                let store = Arc::new(TlsStore::load(cert, key).map_err(anyhow::Error::msg)?);
                stores.push(store.clone());
                Some(store)
            }
            None => None,
        };
        tracing::info!(address = %l.address, role = l.role.as_str(), tls = tls.is_some(), "listening");
        bound.push(Bound {
            listener,
            role: (l.role, l.trust_networks),
            tls,
        });
    }
    reload_certificates_on_sighup(stores);
    Ok(bound)
}

/// Accepts connections on every listener and runs their sessions until `stop` turns true;
/// then gives sessions under way ten seconds to finish.
pub async fn run(ctx: Arc<Reception>, listeners: Vec<Bound>, mut stop: watch::Receiver<bool>) {
    let mut sessions = JoinSet::new();
    let mut acceptors = JoinSet::new();
    let (conn_tx, mut conn_rx) = tokio::sync::mpsc::channel::<Accepted>(64);
    for bound in listeners {
        acceptors.spawn(accept_loop(bound, conn_tx.clone()));
    }
    drop(conn_tx);
    loop {
        tokio::select! {
            conn = conn_rx.recv() => {
                let Some((stream, peer, role, tls)) = conn else { break };
                start_session(&ctx, &mut sessions, stream, peer, role, tls);
            }
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    acceptors.abort_all();
    tracing::info!(sessions = sessions.len(), "shutting down");
    let drain = async { while sessions.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(10), drain)
        .await
        .is_err()
    {
        tracing::warn!("sessions still busy after 10 s; closing them");
    }
}

/// Accepts on one listener and passes each connection on.
async fn accept_loop(bound: Bound, conn_tx: tokio::sync::mpsc::Sender<Accepted>) {
    loop {
        match bound.listener.accept().await {
            Ok((stream, peer)) => {
                let accepted = (stream, peer, bound.role, bound.tls.clone());
                if conn_tx.send(accepted).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                // Out of file descriptors and the like: back off, keep serving.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// A connection as accepted: socket, client, listener role (and whether it trusts the relay
/// networks without AUTH) and TLS.
type Accepted = (TcpStream, SocketAddr, (Role, bool), Option<Arc<TlsStore>>);

/// SIGHUP reloads every listener's certificate and key; sessions under way keep theirs.
fn reload_certificates_on_sighup(stores: Vec<Arc<TlsStore>>) {
    if stores.is_empty() {
        return;
    }
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            return;
        };
        while hup.recv().await.is_some() {
            for store in &stores {
                match store.reload() {
                    Ok(()) => tracing::info!("TLS certificate reloaded"),
                    Err(e) => {
                        tracing::error!(error = %e, "TLS certificate not reloaded; keeping the old one")
                    }
                }
            }
        }
    });
}

fn start_session(
    ctx: &Arc<Reception>,
    sessions: &mut JoinSet<()>,
    mut stream: TcpStream,
    peer: SocketAddr,
    (role, trust_networks): (Role, bool),
    tls: Option<Arc<TlsStore>>,
) {
    let _ = stream.set_nodelay(true);
    let ip = peer.ip().to_canonical();
    match ctx.admit(ip) {
        Ok(slot) => {
            let ctx = ctx.clone();
            sessions.spawn(async move {
                // Port 465: TLS before anything else (RFC 8314).
                let conn = match (&tls, role) {
                    (Some(store), Role::Submissions) => {
                        let limit = ctx.config.limits.command_timeout;
                        match tokio::time::timeout(limit, store.acceptor().accept(stream)).await {
                            Ok(Ok(s)) => Conn::Tls(Box::new(s)),
                            Ok(Err(e)) => {
                                tracing::info!(client = %peer, error = %e, "TLS handshake failed");
                                return;
                            }
                            Err(_) => return,
                        }
                    }
                    _ => Conn::Plain(stream),
                };
                Session::new(conn, tls, ctx, peer, role)
                    .trusting_networks(trust_networks)
                    .run()
                    .await;
                drop(slot);
            });
        }
        Err(why) => {
            tracing::warn!(client = %peer, "{why}");
            let msg = format!("421 4.7.0 {} {why}\r\n", ctx.config.hostname);
            sessions.spawn(async move {
                let _ = stream.write_all(msg.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    }
}
