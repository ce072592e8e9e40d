//! The connection to Redis and the heartbeat: one supervising task connects (see `conn`),
//! beats every `heartbeat`, and on any error drops the connection, says so through
//! [`Health`] and reconnects with backoff (0.1 s doubling to 5 s).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::watch;

use crate::conn::{Conn, TIMEOUT};
use crate::fleet::{self, NodeReport, now_ms};
use crate::ops::{self, FleetChange};
use crate::{ClusterConfig, LocalStats, StatsSource};

const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// A link up this long has earned a fresh backoff when it fails.
const STABLE: Duration = Duration::from_secs(10);

/// Whether this node shares the fleet's limits now.
#[derive(Debug, Clone, PartialEq)]
pub struct Health {
    pub up: bool,
    /// Nodes alive at the last good heartbeat, this one included (0 before the first).
    pub nodes_seen: u32,
    /// Why Redis cannot be used, while it cannot (None before the first attempt ends).
    pub error: Option<String>,
    /// Another running process beats under this node's name (its start): node names must be
    /// unique. Said after two of three beats, so a node's own restart does not count.
    pub namesake: Option<String>,
}

/// A handle on the cluster link; cheap to clone.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

struct Inner {
    config: ClusterConfig,
    conn: Mutex<Option<Conn>>,
    health: watch::Sender<Health>,
    /// Where the changes other nodes share go.
    changes: UnboundedSender<FleetChange>,
    /// Catch-ups started (each reads what the fleet keeps, see `ops::follow`).
    catch_ups: Arc<AtomicU64>,
}

impl Cluster {
    /// Starts the link in the background; it never fails: with Redis down the node runs
    /// degraded until it comes back. What the fleet shares (what is live when the link comes
    /// up, then each change another node makes) goes to `changes`.
    pub fn start(
        config: ClusterConfig,
        stats: StatsSource,
        version: &str,
        changes: UnboundedSender<FleetChange>,
    ) -> Cluster {
        let (health, _) = watch::channel(Health {
            up: false,
            nodes_seen: 0,
            error: None,
            namesake: None,
        });
        let inner = Arc::new(Inner {
            config,
            conn: Mutex::new(None),
            health,
            changes,
            catch_ups: Arc::new(AtomicU64::new(0)),
        });
        let me = Cluster { inner };
        tokio::spawn(supervise(me.clone(), stats, version.to_string()));
        me
    }

    pub fn config(&self) -> &ClusterConfig {
        &self.inner.config
    }

    /// Changes of [`Health`], as they happen.
    pub fn health(&self) -> watch::Receiver<Health> {
        self.inner.health.subscribe()
    }

    /// How many catch-ups have started: one reading after a change was written sees it if
    /// this was read after the write and its number is higher.
    pub fn catch_ups_started(&self) -> u64 {
        self.inner.catch_ups.load(Ordering::SeqCst)
    }

    /// Nodes alive at the last good heartbeat (this one included; 0 before the first).
    pub fn nodes_seen(&self) -> u32 {
        self.inner.health.borrow().nodes_seen
    }

    /// How many nodes share each limit: `fallback_nodes` when set, else the nodes alive at
    /// the last good heartbeat; at least 1. A degraded node keeps to 1/n of each limit.
    pub fn sharing_nodes(&self) -> u32 {
        self.inner
            .config
            .fallback_nodes
            .unwrap_or_else(|| self.nodes_seen())
            .max(1)
    }

    /// The live connection, or None while degraded (use local limits then).
    pub fn conn(&self) -> Option<Conn> {
        self.lock().clone()
    }

    /// Every node Redis knows of, alive or not, by name.
    pub async fn fleet(&self) -> Result<Vec<NodeReport>, String> {
        let mut conn = self.conn().ok_or_else(|| {
            let why = self.inner.health.borrow().error.clone();
            why.unwrap_or_else(|| "not connected yet".into())
        })?;
        fleet::read(&mut conn, &self.inner.config.prefix).await
    }

    fn lock(&self) -> MutexGuard<'_, Option<Conn>> {
        self.inner.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_health(&self, health: Health) {
        self.inner.health.send_if_modified(|h| {
            let changed = *h != health;
            *h = health;
            changed
        });
    }
}

async fn supervise(cluster: Cluster, stats: StatsSource, version: String) {
    let started_ms = now_ms();
    let mut backoff = MIN_BACKOFF;
    let mut last = Beat::default();
    loop {
        let error = match crate::conn::connect(&cluster.inner.config).await {
            Ok((client, conn)) => {
                *cluster.lock() = Some(conn.clone());
                let config = &cluster.inner.config;
                let follower = tokio::spawn(ops::follow(
                    client,
                    conn.clone(),
                    config.clone(),
                    cluster.inner.changes.clone(),
                    cluster.inner.catch_ups.clone(),
                ));
                let connected_at = tokio::time::Instant::now();
                let beats =
                    beat_until_error(&cluster, conn, &stats, &version, started_ms, &mut last);
                let why = following(follower, beats).await;
                *cluster.lock() = None;
                // A link that fails at once after connecting (an ACL refusing SUBSCRIBE, a
                // damaged key) keeps backing off instead of reconnecting ten times a second.
                if connected_at.elapsed() >= STABLE {
                    backoff = MIN_BACKOFF;
                }
                why
            }
            Err(why) => why,
        };
        // The namesake said before the outage holds until the beats say otherwise.
        let (nodes_seen, namesake) = {
            let h = cluster.inner.health.borrow();
            (h.nodes_seen, h.namesake.clone())
        };
        cluster.set_health(Health {
            up: false,
            nodes_seen,
            error: Some(error),
            namesake,
        });
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Runs the heartbeat and the channel's follower together; whichever fails first ends both
/// (the link then reconnects them together).
async fn following(
    mut follower: tokio::task::JoinHandle<Result<(), String>>,
    beats: impl std::future::Future<Output = String>,
) -> String {
    let why = tokio::select! {
        why = beats => why,
        ended = &mut follower => match ended {
            Ok(Err(why)) => why,
            Ok(Ok(())) => "the channel's follower stopped".into(),
            Err(e) => format!("the channel's follower failed: {e}"),
        },
    };
    follower.abort();
    why
}

/// The nodes alive as limits should count them: the most seen over the last three beats (the
/// window a node stays alive in), so that a Redis restarted empty, where each node first sees
/// only itself, does not hand every node the whole of each limit.
fn steady_count(recent: &mut std::collections::VecDeque<u32>, seen: u32) -> u32 {
    recent.push_back(seen);
    while recent.len() > 3 {
        recent.pop_front();
    }
    recent.iter().copied().max().unwrap_or(seen).max(1)
}

/// Another process under this node's name: said once seen in two of the last three beats
/// (one sighting is this node's own previous run, just restarted), and until three beats in
/// a row see none (`was`: what the last beat said).
fn persistent(
    recent: &mut std::collections::VecDeque<Option<String>>,
    seen: Option<String>,
    was: Option<String>,
) -> Option<String> {
    recent.push_back(seen);
    while recent.len() > 3 {
        recent.pop_front();
    }
    let sightings: Vec<&String> = recent.iter().flatten().collect();
    match sightings.len() {
        0 => None,
        1 => was,
        n => Some(sightings[n - 1].clone()),
    }
}

/// The figures of the previous beat, for rates.
#[derive(Default)]
struct Beat {
    at_ms: u64,
    stats: LocalStats,
}

/// Beats until Redis fails; returns why.
async fn beat_until_error(
    cluster: &Cluster,
    mut conn: Conn,
    stats: &StatsSource,
    version: &str,
    started_ms: u64,
    last: &mut Beat,
) -> String {
    let config = &cluster.inner.config;
    let mut tick = tokio::time::interval(config.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The count from before an outage holds until the others have beaten again.
    let mut recent = std::collections::VecDeque::from([cluster.nodes_seen()]);
    let mut namesakes = std::collections::VecDeque::new();
    loop {
        tick.tick().await;
        let now = now_ms();
        let current = stats();
        let report = NodeReport::new(
            config,
            version,
            started_ms,
            now,
            &current,
            (last.at_ms, &last.stats),
        );
        let beat = fleet::beat(&mut conn, &config.prefix, &report);
        match tokio::time::timeout(TIMEOUT, beat).await {
            Ok(Ok(beaten)) => {
                // Read before set_health: the watch's read guard must be gone by then.
                let was = cluster.inner.health.borrow().namesake.clone();
                cluster.set_health(Health {
                    up: true,
                    nodes_seen: steady_count(&mut recent, beaten.alive),
                    error: None,
                    namesake: persistent(&mut namesakes, beaten.namesake, was),
                });
            }
            Ok(Err(e)) => return e,
            Err(_) => return format!("no answer from redis within {} s", TIMEOUT.as_secs()),
        }
        *last = Beat {
            at_ms: now,
            stats: current,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_namesake_counts_from_its_second_sighting_in_three_beats() {
        let mut recent = std::collections::VecDeque::new();
        let other = || Some("2026-12-03T10:00:00Z".to_string());
        let mut said = None;
        let mut beat = |seen: Option<String>| {
            said = persistent(&mut recent, seen, said.clone());
            said.clone()
        };
        // This node's own previous run, seen once as it restarts: not a namesake.
        assert_eq!(beat(other()), None);
        assert_eq!(beat(None), None);
        assert_eq!(beat(None), None);
        // Another process beating under the name: said from the second sighting.
        assert_eq!(beat(other()), None);
        assert_eq!(beat(other()), other());
        // Said until three beats in a row see none.
        assert_eq!(beat(None), other());
        assert_eq!(beat(None), other());
        assert_eq!(beat(None), None);
    }

    #[test]
    fn the_count_of_nodes_does_not_drop_on_one_beat() {
        let mut recent = std::collections::VecDeque::from([3]);
        // Redis came back empty: this node sees itself first, then the others again.
        assert_eq!(steady_count(&mut recent, 1), 3);
        assert_eq!(steady_count(&mut recent, 2), 3);
        assert_eq!(steady_count(&mut recent, 3), 3);
        // A node really gone: after three beats the count follows.
        assert_eq!(steady_count(&mut recent, 2), 3);
        assert_eq!(steady_count(&mut recent, 2), 3);
        assert_eq!(steady_count(&mut recent, 2), 2);
        assert_eq!(steady_count(&mut recent, 0), 2);
    }
}
