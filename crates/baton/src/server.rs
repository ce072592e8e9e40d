//! The listeners: bind the configured addresses, accept connections within the connection
//! limits and run one [`Session`] task per client; orderly shutdown of sessions.
//!
//! Owns sockets and the accept loop; admission (connection counts and rates) is
//! [`Reception`]'s. It must not parse SMTP (the session does) or write to the spool (sessions
//! hand messages to intake, which commits them).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::config::{Config, Role};
use crate::reception::Reception;
use crate::session::Session;
use baton_tls::server::{Conn, TlsStore};

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
