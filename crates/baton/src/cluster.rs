//! The server's side of `[cluster]`: starts the link ([`baton_cluster::Cluster`]) with this
//! process's figures for its heartbeat, and turns the link's health into `cluster` events and
//! the `baton_cluster_up` / `baton_cluster_nodes` gauges.
//!
//! Owns that wiring only; the link, the heartbeat and the shared state are baton-cluster's.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use baton_cluster::{
    Cluster, FleetChange, Health, Lease, LeaseGuard, Leases, LocalStats, PushbackChange,
};
use baton_events::{EventKind, Events};
use baton_shaping::fleet::{
    Answer, FleetLimits, HeldLease, Leased, Paced, Pushback, WarmTake, Warmed, WarmupCounts,
};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use crate::config::Config;
use crate::operator::OperatorCommand;
use crate::qmgr::QueueHandle;
use crate::suppression::Suppressions;

/// Changes made here that wait while Redis is unreachable; past this many the oldest are
/// dropped (and logged): an outage must not grow memory without bound.
const MAX_BACKLOG: usize = 100_000;
/// How soon a change that could not be shared is tried again.
const RETRY: Duration = Duration::from_secs(1);
/// The push-backs kept from other nodes (one per rule key), and how far ahead they may reach.
const MAX_PUSHBACKS: usize = 10_000;
const MAX_PUSHBACK_MS: u64 = 7 * 86_400_000;

/// The running link, and where this node's own changes go to be shared.
pub struct Fleet {
    pub cluster: Cluster,
    /// Suspensions and suppression changes made here, sent in order, kept while degraded.
    pub out: UnboundedSender<FleetChange>,
    /// What the other nodes share, until [`Fleet::join`] takes it.
    incoming: Option<UnboundedReceiver<FleetChange>>,
    /// The shaper's view of the fleet: leases, rates, push-backs.
    store: Arc<FleetStore>,
}

impl Fleet {
    /// The fleet's limits, for the shaper: every `max_connections` and `max_message_rate`
    /// holds across the fleet, and a destination's push-back on one node holds on all; while
    /// Redis is unreachable each node keeps to its share.
    pub fn limits(&self) -> Arc<dyn FleetLimits> {
        self.store.clone()
    }

    /// Shares the suppression list's changes and applies the fleet's to this node's queue
    /// manager and list (once the queue is up).
    pub fn join(&mut self, queue: &QueueHandle, suppressions: &Arc<Suppressions>) {
        suppressions.share_with(self.out.clone());
        if let Some(incoming) = self.incoming.take() {
            let store = self.store.clone();
            apply_fleet_changes(incoming, queue.clone(), suppressions.clone(), store);
        }
    }
}

/// Starts the link when `[cluster]` is set.
pub fn start(config: &Config, events: &Events) -> Option<Fleet> {
    let cluster_config = config.cluster.clone()?;
    let stats = Arc::new(|| {
        let t = baton_events::metrics::totals();
        LocalStats {
            queue: t.queue,
            connections_in: t.connections_in,
            connections_out: t.connections_out,
            delivered: t.delivered,
            bounced: t.bounced,
        }
    });
    tracing::info!(node = %cluster_config.node, redis = ?cluster_config.redis, "joining the cluster");
    let (incoming, incoming_rx) = unbounded_channel();
    let cluster = Cluster::start(cluster_config, stats, env!("CARGO_PKG_VERSION"), incoming);
    tokio::spawn(report_health(cluster.clone(), events.clone()));
    let (out, outgoing) = unbounded_channel();
    let store = Arc::new(FleetStore {
        leases: Leases::start(cluster.clone()),
        cluster: cluster.clone(),
        out: out.clone(),
        pushbacks: Mutex::new(HashMap::new()),
        unshared: Mutex::new(Unshared::default()),
        warmup_counts: std::sync::OnceLock::new(),
    });
    tokio::spawn(put_back_warmup_counts(cluster.clone(), store.clone()));
    tokio::spawn(forward(cluster.clone(), outgoing, store.clone()));
    Some(Fleet {
        cluster,
        out,
        incoming: Some(incoming_rx),
        store,
    })
}

/// Shares this node's changes in order; while Redis is unreachable they wait (at most
/// [`MAX_BACKLOG`]) and go when it is back.
async fn forward(
    cluster: Cluster,
    mut outgoing: UnboundedReceiver<FleetChange>,
    store: Arc<FleetStore>,
) {
    let mut backlog: VecDeque<FleetChange> = VecDeque::new();
    let mut health = cluster.health();
    loop {
        while let Some(change) = backlog.front() {
            match cluster.share(change).await {
                Ok(()) => {
                    if let Some(shared) = backlog.pop_front() {
                        store.shared(&shared, cluster.catch_ups_started());
                    }
                }
                Err(why) => {
                    tracing::debug!(%why, waiting = backlog.len(), "changes wait for redis");
                    break;
                }
            }
        }
        tokio::select! {
            change = outgoing.recv() => {
                let Some(change) = change else { return };
                // A push-back is news only now: it does not wait (nor crowd out what must).
                if matches!(change, FleetChange::Pushback(_)) && !backlog.is_empty() {
                    continue;
                }
                if backlog.len() >= MAX_BACKLOG {
                    tracing::warn!("redis unreachable for long: the oldest change made here is not shared");
                    if let Some(dropped) = backlog.pop_front() {
                        store.shared(&dropped, 0);
                    }
                }
                store.waiting(&change);
                backlog.push_back(change);
            }
            changed = health.changed() => if changed.is_err() { return },
            // A share that failed while the link stayed up is tried again.
            _ = tokio::time::sleep(RETRY), if !backlog.is_empty() => {}
        }
        backlog.retain(|c| !matches!(c, FleetChange::Pushback(_)) || cluster.conn().is_some());
    }
}

struct FleetStore {
    leases: Arc<Leases>,
    cluster: Cluster,
    /// Where this node's push-backs go to be shared.
    out: UnboundedSender<FleetChange>,
    /// The push-backs other nodes shared, by rule key.
    pushbacks: Mutex<HashMap<String, Pushback>>,
    /// Suspensions and suppression changes made here that the fleet's copy may still be
    /// older than.
    unshared: Mutex<Unshared>,
    /// This node's warm-up ledger, to put its counts back whenever the link comes up.
    warmup_counts: std::sync::OnceLock<WarmupCounts>,
}

/// How long a warm-up count put back is kept: two of the longest period (a day).
const WARMUP_PUT_BACK_TTL: Duration = Duration::from_secs(2 * 86_400);

/// Each time the link comes up (at start, after an outage, on a Redis that came back empty),
/// puts this node's warm-up counts back where Redis has less, so that the fleet's count
/// holds even for a source this node sends nothing more from.
async fn put_back_warmup_counts(cluster: Cluster, store: Arc<FleetStore>) {
    let mut health = cluster.health();
    let mut was_up = false;
    loop {
        let up = health.borrow_and_update().up;
        if up
            && !was_up
            && let Some(counts) = store.warmup_counts.get()
        {
            for (key, period, sent) in counts().into_iter().filter(|c| c.2 > 0) {
                let take = baton_cluster::WarmupTake {
                    period,
                    cap: u64::MAX,
                    n: 0,
                    own: sent,
                    ttl: WARMUP_PUT_BACK_TTL,
                };
                if let Err(e) = cluster.warm(&key, take).await {
                    tracing::debug!(%key, error = %e, "a warm-up count was not put back");
                }
            }
        }
        was_up = up;
        if health.changed().await.is_err() {
            return;
        }
    }
}

/// What the fleet says of a destination or suppression entry is older than a change made here
/// while that change waits to be shared, and after, until every catch-up that may have read
/// the hash before it was written has been applied here (a catch-up's entries and its
/// `CaughtUp` come in order on one channel).
#[derive(Default)]
struct Unshared {
    /// By destination or suppression key.
    marks: HashMap<String, Mark>,
    /// The last catch-up applied here.
    caught_up: u64,
}

#[derive(Default)]
struct Mark {
    /// Changes made here still waiting to be shared.
    waiting: usize,
    /// Shared while this catch-up was under way: kept until it has been applied.
    until_catch_up: u64,
}

impl FleetStore {
    /// Whether a change made here to what `change` is about (a destination's suspension, a
    /// suppression entry) is newer than what the fleet may say of it now (see [`Unshared`]).
    fn unshared(&self, change: &FleetChange) -> bool {
        unshared_key(change).is_some_and(|key| self.guard().marks.contains_key(&key))
    }

    /// Counts `change`, made here, in what waits to be shared.
    fn waiting(&self, change: &FleetChange) {
        if let Some(key) = unshared_key(change) {
            self.guard().marks.entry(key).or_default().waiting += 1;
        }
    }

    /// Counts `change` out of what waits, once written (or dropped: `catch_ups` 0); its mark
    /// stays until the catch-ups started by then (`catch_ups`) have been applied.
    fn shared(&self, change: &FleetChange, catch_ups: u64) {
        let Some(key) = unshared_key(change) else {
            return;
        };
        let mut guard = self.guard();
        let caught_up = guard.caught_up;
        let Some(mark) = guard.marks.get_mut(&key) else {
            return;
        };
        mark.waiting = mark.waiting.saturating_sub(1);
        mark.until_catch_up = mark.until_catch_up.max(catch_ups);
        if mark.waiting == 0 && mark.until_catch_up <= caught_up {
            guard.marks.remove(&key);
        }
    }

    /// Catch-up `number` has been applied here: the marks it was keeping go.
    fn caught_up(&self, number: u64) {
        let mut guard = self.guard();
        guard.caught_up = guard.caught_up.max(number);
        let caught_up = guard.caught_up;
        guard
            .marks
            .retain(|_, m| m.waiting > 0 || m.until_catch_up > caught_up);
    }

    fn guard(&self) -> std::sync::MutexGuard<'_, Unshared> {
        self.unshared.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn pushbacks(&self) -> std::sync::MutexGuard<'_, HashMap<String, Pushback>> {
        self.pushbacks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps another node's push-back: its times at most a week ahead, its factor in
    /// range, and at most [`MAX_PUSHBACKS`] (the ones over are dropped, expired first).
    fn keep_pushback(&self, p: PushbackChange) {
        let now = baton_spool::now_ms();
        let cap = |t: Option<u64>| t.map(|t| t.min(now.saturating_add(MAX_PUSHBACK_MS)));
        let pushback = Pushback {
            suspended_until_ms: cap(p.suspended_until_ms),
            factor: p.factor.map(|f| f.clamp(0.001, 1.0)),
            throttled_until_ms: cap(p.throttled_until_ms),
        };
        let mut all = self.pushbacks();
        if all.len() >= MAX_PUSHBACKS && !all.contains_key(&p.key) {
            let live = |t: Option<u64>| t.is_some_and(|t| t > now);
            all.retain(|_, p| live(p.suspended_until_ms) || live(p.throttled_until_ms));
            if all.len() >= MAX_PUSHBACKS {
                tracing::warn!("too many push-backs from the fleet; one is not kept");
                return;
            }
        }
        all.insert(p.key, pushback);
    }
}

/// A fleet lease, as the shaper holds it.
struct HeldLeaseGuard(LeaseGuard);

impl HeldLease for HeldLeaseGuard {
    fn contended(&self) -> bool {
        self.0.contended()
    }

    fn give_back_if_richer(&self) -> bool {
        self.0.give_back_if_richer()
    }
}

impl FleetLimits for FleetStore {
    fn lease<'a>(&'a self, key: &'a str, cap: usize) -> Answer<'a, Leased> {
        Box::pin(async move {
            match self.leases.acquire(key, cap).await {
                Lease::Held(guard) => Leased::Held(Box::new(HeldLeaseGuard(guard))),
                Lease::Full => Leased::Full,
                Lease::Unavailable => Leased::Unavailable,
            }
        })
    }

    fn pace<'a>(
        &'a self,
        key: &'a str,
        interval: Duration,
        tolerance: Duration,
    ) -> Answer<'a, Paced> {
        Box::pin(async move {
            match self.cluster.pace(key, interval, tolerance).await {
                Ok(wait) if wait.is_zero() => Paced::Go,
                Ok(wait) => Paced::Wait(wait),
                Err(_) => Paced::Unavailable,
            }
        })
    }

    fn nodes(&self) -> u32 {
        self.cluster.sharing_nodes()
    }

    fn available(&self) -> bool {
        self.cluster.conn().is_some()
    }

    fn warm<'a>(&'a self, key: &'a str, t: WarmTake) -> Answer<'a, Warmed> {
        Box::pin(async move {
            let take = baton_cluster::WarmupTake {
                period: t.period,
                cap: t.cap,
                n: t.n,
                own: t.own,
                ttl: t.ttl,
            };
            match self.cluster.warm(key, take).await {
                Ok(true) => Warmed::Taken,
                Ok(false) => Warmed::Capped,
                Err(_) => Warmed::Unavailable,
            }
        })
    }

    fn share_pushback(&self, key: &str, p: Pushback) {
        let _ = self.out.send(FleetChange::Pushback(PushbackChange {
            key: key.to_string(),
            suspended_until_ms: p.suspended_until_ms,
            factor: p.factor,
            throttled_until_ms: p.throttled_until_ms,
        }));
    }

    fn keep_warmup_counts(&self, counts: WarmupCounts) {
        let _ = self.warmup_counts.set(counts);
    }

    fn pushback(&self, key: &str) -> Option<Pushback> {
        let mut all = self.pushbacks();
        let p = *all.get(key)?;
        let now = baton_spool::now_ms();
        let live = |t: Option<u64>| t.is_some_and(|t| t > now);
        if live(p.suspended_until_ms) || live(p.throttled_until_ms) {
            Some(p)
        } else {
            all.remove(key);
            None
        }
    }
}

/// Carries out, on this node only, what the fleet shares: suspensions and resumptions (each a
/// `shaping` event here, as the operator's own) and suppression-list changes.
fn apply_fleet_changes(
    mut from: UnboundedReceiver<FleetChange>,
    queue: QueueHandle,
    suppressions: Arc<Suppressions>,
    store: Arc<FleetStore>,
) {
    tokio::spawn(async move {
        while let Some(change) = from.recv().await {
            match change {
                FleetChange::Suspension(s) => apply_suspension(&queue, &store, s).await,
                FleetChange::Suppression(c) => {
                    // A catch-up's old copy must not undo a change made here that waits.
                    if !store.unshared(&FleetChange::Suppression(c.clone())) {
                        suppressions.apply_from_fleet(&c);
                    }
                }
                FleetChange::Pushback(p) => store.keep_pushback(p),
                FleetChange::Operator(a) => apply_operator(&queue, &a).await,
                FleetChange::CaughtUp(number) => store.caught_up(number),
            }
        }
    });
}

/// Carries out an action another node's operator took on the whole fleet; only the kinds
/// meant to be shared, whatever the channel carries.
async fn apply_operator(queue: &QueueHandle, action: &baton_cluster::OperatorAction) {
    let command = serde_json::from_str::<OperatorCommand>(&action.command);
    match command {
        Ok(command) if command.fleet_wide() => {
            if let Err(e) = queue.control_here(command.clone()).await {
                tracing::warn!(?command, error = %e, "an operator action from the fleet failed here");
            }
        }
        Ok(command) => tracing::warn!(?command, "ignored from the fleet: not a fleet-wide action"),
        Err(e) => tracing::warn!(error = %e, "unreadable operator action from the fleet"),
    }
}

/// What a change is about, for [`FleetStore::unshared`]: a destination or a suppression key.
fn unshared_key(change: &FleetChange) -> Option<String> {
    match change {
        FleetChange::Suspension(s) => Some(format!("suspension {}", s.destination)),
        FleetChange::Suppression(c) => Some(format!("suppression {}", c.key)),
        FleetChange::Pushback(_) | FleetChange::Operator(_) | FleetChange::CaughtUp(_) => None,
    }
}

/// Applies a suspension or resumption the fleet shared. A resumption applies only to what
/// this node holds suspended (a node catching up is sent every resumption kept), and not
/// while a suspension of the same destination made here waits to be shared (it is newer).
async fn apply_suspension(queue: &QueueHandle, store: &FleetStore, s: baton_cluster::Suspension) {
    let command = if s.until_ms == 0 {
        if store.unshared(&FleetChange::Suspension(s.clone())) {
            return;
        }
        Ok(OperatorCommand::Resume {
            destination: crate::operator::Written::destination(&s.destination),
            only_if_suspended: true,
        })
    } else {
        let left_ms = s.until_ms.saturating_sub(baton_spool::now_ms());
        OperatorCommand::suspend(&s.destination, Some(left_ms.div_ceil(1000).max(1)))
    };
    let answer = match command {
        Ok(command) => queue.control_here(command).await.map(|_| ()),
        Err(e) => Err(e),
    };
    if let Err(e) = answer {
        tracing::warn!(destination = %s.destination, error = %e, "a suspension shared by the fleet was not applied");
    }
}

/// One `cluster` event per change between up and degraded (not per reconnect attempt).
async fn report_health(cluster: Cluster, events: Events) {
    let mut health = cluster.health();
    let mut reported: Option<bool> = None;
    let mut namesake_reported = false;
    loop {
        let now = health.borrow_and_update().clone();
        baton_events::metrics::cluster(now.up, now.nodes_seen);
        if now.namesake.is_some() != namesake_reported {
            namesake_reported = now.namesake.is_some();
            let text = describe_namesake(&cluster, now.namesake.as_deref());
            if namesake_reported {
                tracing::error!("{text}");
            } else {
                tracing::info!("{text}");
            }
            let mut e = events.new_event(EventKind::Cluster, "", "", "");
            e.response = Some(text);
            events.emit(e);
        }
        // Once the first attempt has ended, either way: a node that starts degraded says so.
        let attempted = now.up || now.error.is_some();
        if attempted && reported != Some(now.up) {
            let text = describe(&cluster, &now);
            if now.up {
                tracing::info!(nodes = now.nodes_seen, "{text}");
            } else {
                tracing::warn!("{text}");
            }
            let mut e = events.new_event(EventKind::Cluster, "", "", "");
            e.response = Some(text);
            events.emit(e);
            reported = Some(now.up);
        }
        if health.changed().await.is_err() {
            return;
        }
    }
}

fn describe_namesake(cluster: &Cluster, other: Option<&str>) -> String {
    let node = &cluster.config().node;
    match other {
        Some(started) => format!(
            "node {node}: another running process (started {started}) beats under the same name; \
             node names must be unique (set [cluster] node): until they are, the fleet's view \
             and its count of nodes are wrong"
        ),
        None => format!("node {node}: no other process beats under this name any more"),
    }
}

fn describe(cluster: &Cluster, health: &Health) -> String {
    let node = &cluster.config().node;
    if health.up {
        return format!(
            "node {node}: redis reached; limits shared, {} node(s) alive",
            health.nodes_seen
        );
    }
    let nodes = cluster.sharing_nodes();
    format!(
        "node {node}: redis unavailable ({}); each shared limit divided by {nodes} and kept \
         locally until it is back",
        health.error.as_deref().unwrap_or("no reason given")
    )
}

/// `baton cluster status`: the fleet, read from Redis itself (it works with this node down).
pub fn status_command(config: &Config, json: bool) -> anyhow::Result<()> {
    let cluster = cluster_config(config)?;
    let nodes = runtime()?
        .block_on(baton_cluster::read_fleet(cluster))
        .map_err(|why| anyhow::anyhow!("cannot read the fleet from redis: {why}"))?;
    if json {
        println!("{}", serde_json::json!({ "nodes": nodes }));
        return Ok(());
    }
    println!(
        "{:<20} {:<6} {:>8} {:>7} {:>7} {:>10} {:>9}  last seen",
        "node", "state", "queue", "conn in", "out", "deliv/min", "bounce/m"
    );
    for n in &nodes {
        println!(
            "{:<20} {:<6} {:>8} {:>7} {:>7} {:>10} {:>9}  {}",
            n.node,
            if n.alive { "up" } else { "DOWN" },
            n.queue,
            n.connections_in,
            n.connections_out,
            n.delivered_per_min,
            n.bounced_per_min,
            n.last_seen
        );
    }
    if nodes.is_empty() {
        println!("(no node has reported to this redis yet)");
    }
    Ok(())
}

/// `baton cluster forget NODE`: drops a node removed for good from the fleet's view.
pub fn forget_command(config: &Config, node: &str) -> anyhow::Result<()> {
    let cluster = cluster_config(config)?;
    let removed = runtime()?
        .block_on(baton_cluster::forget_node(cluster, node))
        .map_err(|why| anyhow::anyhow!("cannot reach redis: {why}"))?;
    if removed {
        println!("{node}: forgotten (it reappears if it is still running)");
    } else {
        println!("{node}: no such node");
    }
    Ok(())
}

fn cluster_config(config: &Config) -> anyhow::Result<&baton_cluster::ClusterConfig> {
    config.cluster.as_ref().ok_or_else(|| {
        anyhow::anyhow!("this node is not in a cluster: the config has no [cluster] section")
    })
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}
