//! The listeners: bind the configured addresses, accept connections within the connection
//! limits and run one [`Session`] task per client. Also owns orderly shutdown.
//!
//! Owns sockets and counting connections. It must not parse SMTP (the session does) or write
//! to the spool (the session commits through [`Spool`]).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use baton_spool::{Spool, SpoolOptions};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::config::{Config, Role};
use crate::qmgr::{QueueHandle, QueueManager};
use crate::session::Session;
use baton_events::Events;
use baton_shaping::ratelimit::RateLimiter;
use baton_tls::server::{Conn, TlsStore};

/// What every session shares.
pub struct Context {
    pub config: Arc<Config>,
    pub spool: Spool,
    pub queue: QueueHandle,
    pub events: Events,
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
    /// Addresses the API does not mail (they bounced as non-existent).
    pub suppressions: Arc<crate::suppression::Suppressions>,
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
    ctx: Arc<Context>,
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

impl Context {
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

/// Opens the spool, binds every listener and serves until `stop` turns true.
pub async fn serve(config: Config, mut stop: watch::Receiver<bool>) -> anyhow::Result<()> {
    let options = SpoolOptions {
        fsync: config.spool.fsync,
        segment_size: config.spool.segment_size,
        ..SpoolOptions::default()
    };
    let spool_dir = config.data_dir.join("spool");
    let (spool, recovery) = Spool::open(&spool_dir, options).with_context(|| {
        format!(
            "cannot open the spool at {} (check that data_dir exists and is writable)",
            spool_dir.display()
        )
    })?;
    tracing::info!(
        messages = recovery.messages.len(),
        torn_bytes_cut = recovery.truncated_bytes,
        orphan_bodies_removed = recovery.orphan_bodies_removed,
        dir = %spool_dir.display(),
        "spool recovered"
    );
    if !config.spool.fsync {
        tracing::warn!("spool fsync is off: acknowledged mail can be lost on power failure");
    }

    let config = Arc::new(config);
    let events = Events::start(&config.data_dir, config.spool.fsync)
        .context("cannot open the event log under data_dir/events")?;
    // Metrics are recorded from the start (they are read at GET /metrics), and sampled for
    // the dashboard's history.
    let _ = baton_events::metrics::handle();
    tokio::spawn(async {
        let mut tick = tokio::time::interval(baton_events::metrics::SAMPLE_EVERY);
        loop {
            tick.tick().await;
            baton_events::metrics::sample();
        }
    });
    // One CA store (the system's certificates are read once) for delivery, MTA-STS and webhooks.
    let trust = Arc::new(
        baton_tls::trust::Trust::load(config.delivery.tls_ca_file.as_deref())
            .map_err(anyhow::Error::msg)?,
    );
    let https = if config.webhooks.iter().any(|w| w.url.starts_with("https:")) {
        trust
            .https_config()
            .map_err(|why| tracing::warn!(%why, "https webhooks cannot verify their receivers"))
            .ok()
    } else {
        None
    };
    baton_events::webhooks::start(
        &config.webhooks,
        &config.data_dir,
        &events,
        https,
        stop.clone(),
    )
    .context("cannot start the webhook senders")?;
    let suppressions = Arc::new(
        crate::suppression::Suppressions::open(&config.data_dir)
            .context("cannot read the suppression list")?,
    );
    let queue = QueueManager::start(
        config.clone(),
        spool.clone(),
        events.clone(),
        recovery.messages,
        suppressions.clone(),
        trust,
    )?;
    crate::control::listen(&config.data_dir, queue.clone())?;
    // Listeners last: once a client can connect, the queue and the control socket are up.
    let http_listener = match &config.http {
        Some(http) => Some(crate::api::bind(http).await?),
        None => None,
    };
    let mut listeners = Vec::new();
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
        listeners.push((listener, (l.role, l.trust_networks), tls));
    }
    reload_certificates_on_sighup(stores);
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
    let ctx = Arc::new(Context {
        inbound_auth,
        suppressions,
        spool,
        users,
        auth_failures: Default::default(),
        connection_rate: config.limits.connection_rate_per_ip.map(RateLimiter::new),
        command_rate: config.limits.command_rate_per_ip.map(RateLimiter::new),
        user_messages: config.submission.message_rate.map(RateLimiter::new),
        user_recipients: config.submission.recipient_rate.map(RateLimiter::new),
        queue,
        events,
        shutdown: stop.clone(),
        connections: Mutex::default(),
        config,
    });
    if let Some(listener) = http_listener {
        crate::api::serve(ctx.clone(), listener, stop.clone());
    }
    let mut sessions = JoinSet::new();
    let mut acceptors = JoinSet::new();
    let (conn_tx, mut conn_rx) = tokio::sync::mpsc::channel::<Accepted>(64);
    for (listener, role, tls) in listeners {
        let conn_tx = conn_tx.clone();
        acceptors.spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, peer)) => {
                        if conn_tx
                            .send((stream, peer, role, tls.clone()))
                            .await
                            .is_err()
                        {
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
        });
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
    Ok(())
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
    ctx: &Arc<Context>,
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
