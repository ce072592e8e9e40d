//! The state under one rule for one egress source: a connection cap (a semaphore whose permit
//! a connection holds for its life), connection and message pacing, the adaptive throttle or
//! suspension a backoff rule set, and the warm-up count.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::fleet::{FleetLimits, HeldLease, Leased, Paced, Pushback, WarmTake, Warmed};
use crate::later;
use crate::rules::{BackoffAction, BackoffRule, Rate, ShapingRule};
use crate::warmup::{Warmup, WarmupCount};

/// Successes in a row that undo one halving of a throttled rate.
pub(crate) const RECOVERY_RUN: u32 = 10;
/// How often a connection waiting for a fleet-wide lease asks again (sooner when one of this
/// node's own connections closes).
const LEASE_POLL: Duration = Duration::from_millis(100);
/// The rate a throttle cuts when the rule sets none.
const NOMINAL_RATE: Duration = Duration::from_millis(100);

/// A destination's adaptive state.
#[derive(Debug, Default)]
pub(crate) struct Adaptive {
    pub(crate) suspended_until: Option<Instant>,
    /// 1.0 = normal; below 1 the message rate is cut.
    pub(crate) factor: Option<f64>,
    pub(crate) throttled_until: Option<Instant>,
    pub(crate) successes: u32,
}

/// A token bucket holding at most one token: events are spaced evenly, `interval` apart
/// (a "10/s" rule sends one message every 100 ms, not ten at once).
#[derive(Debug)]
pub(crate) struct Pacer {
    pub(crate) interval: Duration,
    pub(crate) next: Option<Instant>,
}

/// How early a slot may be taken (GCRA's tolerance): a waiter woken late by the timer (whole
/// milliseconds) does not lose its slot, so a rate of thousands a second is met; after a pause
/// at most this much of the rate goes at once (1 + SLACK / interval messages: 21 at 2,000/s,
/// none extra at 100/s or less).
pub(crate) const SLACK: Duration = Duration::from_millis(10);

impl Pacer {
    /// Takes the slot if it is due, up to [`SLACK`] early (the next one is then
    /// `interval / factor` after it, or after now if it was missed), or says when to ask
    /// again. Slots are taken, never booked ahead, so a rate change applies to the very next
    /// interval.
    pub(crate) fn try_take(&mut self, now: Instant, factor: f64) -> Result<(), Instant> {
        let due = self.next.unwrap_or(now);
        if due > now + SLACK {
            return Err(due - SLACK);
        }
        self.next = Some(due.max(now) + self.interval.div_f64(factor.clamp(0.001, 1.0)));
        Ok(())
    }
}

/// Whether a connection waited for is still wanted (its work may have gone to another).
pub type Wanted<'a> = dyn Fn() -> bool + Send + Sync + 'a;

/// A connection's place under its limits; given back on drop.
pub struct ConnectionSlot {
    _permit: Option<OwnedSemaphorePermit>,
    /// The fleet-wide lease, with `[cluster]`.
    lease: Option<Box<dyn HeldLease>>,
    /// Counted against this node's share while the fleet's store was unreachable.
    unleased: bool,
    limits: Arc<Limits>,
}

impl ConnectionSlot {
    /// Whether this connection counts against a cap the fleet shares (with a lease, or
    /// against this node's share while the store was away).
    pub fn shared(&self) -> bool {
        self.unleased || self.lease.is_some()
    }

    /// Whether this connection was opened without a lease while the fleet's store was away,
    /// and the store is back: it should close at its next chance (new connections take leases).
    pub fn outlived(&self) -> bool {
        self.unleased
            && self
                .limits
                .shared
                .as_ref()
                .is_some_and(|(fleet, _)| fleet.available())
    }
}

impl ConnectionSlot {
    /// Whether this connection should close to make way for another node's: another node
    /// waits for one of its cap's leases, and this connection is `idle`, or this node holds
    /// two or more beyond what the waiting node holds (then the lease is given back at once).
    pub fn make_way(&self, idle: bool) -> bool {
        let Some(lease) = self.lease.as_ref() else {
            return false;
        };
        lease.contended() && (idle || lease.give_back_if_richer())
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.limits
            .open
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        self.limits.closed.notify_waiters();
    }
}

/// How a connection stands with the fleet's cap.
enum FleetSlot {
    /// No shared cap here: count it in `open` as usual.
    Unshared,
    /// One of the fleet's leases, held while connected.
    Lease(Box<dyn HeldLease>),
    /// The store is unreachable: counted in `open` against this node's share.
    Counted,
}

/// The live state of one rule (or of one domain under the default rule).
pub struct Limits {
    pub rule: ShapingRule,
    pub(crate) connections: Option<Arc<Semaphore>>,
    pub(crate) message_pacer: Option<Mutex<Pacer>>,
    pub(crate) connection_pacer: Option<Mutex<Pacer>>,
    pub(crate) adaptive: Mutex<Adaptive>,
    /// A pacer used only while throttled without a configured rate.
    pub(crate) throttle_pacer: Mutex<Pacer>,
    /// The source's warm-up plan and what it has sent to this destination this period.
    pub(crate) warmup: Option<Warmup>,
    /// Connections open under these limits, and a wake-up for those waiting for one to close.
    pub(crate) open: std::sync::atomic::AtomicUsize,
    pub(crate) closed: tokio::sync::Notify,
    /// The connection count a throttle cuts when the rule sets no cap.
    pub(crate) nominal_connections: usize,
    /// The fleet's leases and this rule's key there, with `[cluster]`.
    pub(crate) shared: Option<(Arc<dyn FleetLimits>, String)>,
}

impl Limits {
    pub(crate) fn new(
        rule: ShapingRule,
        warmup: Option<Warmup>,
        nominal_connections: usize,
    ) -> Limits {
        let pacer = |r: Option<Rate>| {
            r.map(|r| {
                Mutex::new(Pacer {
                    interval: r.interval(),
                    next: None,
                })
            })
        };
        Limits {
            connections: rule.max_connections.map(|n| Arc::new(Semaphore::new(n))),
            message_pacer: pacer(rule.max_message_rate),
            connection_pacer: pacer(rule.max_connection_rate),
            rule,
            adaptive: Mutex::default(),
            throttle_pacer: Mutex::new(Pacer {
                interval: NOMINAL_RATE,
                next: None,
            }),
            warmup,
            open: Default::default(),
            closed: tokio::sync::Notify::new(),
            nominal_connections,
            shared: None,
        }
    }

    /// Holds the connection cap across the fleet through `shared` (the store and this
    /// rule's key).
    pub(crate) fn sharing(mut self, shared: Option<(Arc<dyn FleetLimits>, String)>) -> Limits {
        self.shared = shared;
        self
    }

    /// Counts a transaction's recipients against the warm-up cap, or says when the next period
    /// starts (ms since the epoch) and what the cap was, if this period's cap is reached.
    pub fn warmup_take(&self, now_ms: u64, recipients: u64) -> Result<(), (u64, u64)> {
        self.take_warmup(now_ms, recipients, 1)
    }

    /// [`Limits::warmup_take`] across the fleet, with `[cluster]`: the cap is the fleet's
    /// (counted in Redis); while it is unreachable, this node counts alone against its share.
    pub async fn warmup_admit(&self, now_ms: u64, recipients: u64) -> Result<(), (u64, u64)> {
        let (Some((fleet, _)), Some(w)) = (&self.shared, &self.warmup) else {
            return self.warmup_take(now_ms, recipients);
        };
        let (period, cap, next) = w.plan.period(now_ms);
        let Some(cap) = cap else { return Ok(()) };
        let own = {
            let count = w.count.lock().unwrap_or_else(|e| e.into_inner());
            if count.period == period {
                count.sent
            } else {
                0
            }
        };
        let take = WarmTake {
            period,
            cap,
            n: recipients,
            own,
            ttl: w.plan.period.saturating_mul(2),
        };
        match fleet.warm(&w.key, take).await {
            // Counted here too: the ledger and the fallback share go on from it.
            Warmed::Taken => {
                self.take_warmup(now_ms, recipients, 0).ok();
                Ok(())
            }
            Warmed::Capped => Err((next, cap)),
            Warmed::Unavailable => self.take_warmup(now_ms, recipients, fleet.nodes()),
        }
    }

    /// Counts against the cap divided among `nodes` (0: count without a cap).
    fn take_warmup(&self, now_ms: u64, recipients: u64, nodes: u32) -> Result<(), (u64, u64)> {
        let Some(w) = &self.warmup else {
            return Ok(());
        };
        let (period, cap, next) = w.plan.period(now_ms);
        let Some(cap) = cap else { return Ok(()) };
        let mut count = w.count.lock().unwrap_or_else(|e| e.into_inner());
        if count.period != period {
            *count = WarmupCount { period, sent: 0 };
        }
        if nodes > 0 && count.sent >= (cap / u64::from(nodes)).max(1) {
            return Err((next, cap));
        }
        // Recipients, not transactions, are what a provider counts; a transaction that
        // crosses the cap goes whole (at most one transaction's recipients over it).
        count.sent = count.sent.saturating_add(recipients);
        if let Some(ledger) = &w.ledger {
            ledger.record(&w.key, period, recipients);
        }
        Ok(())
    }

    pub(crate) fn adaptive(&self) -> std::sync::MutexGuard<'_, Adaptive> {
        self.adaptive.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Until when the destination is suspended, if it is (here or, with `[cluster]`, on
    /// another node that shared it).
    pub fn suspended_until(&self) -> Option<Instant> {
        self.merge_fleet_pushback();
        let mut a = self.adaptive();
        match a.suspended_until {
            Some(t) if t > Instant::now() => Some(t),
            _ => {
                a.suspended_until = None;
                None
            }
        }
    }

    /// Takes in another node's push-back for this destination: the later suspension and the
    /// deeper cut win (merging is idempotent, so it is done on every look).
    fn merge_fleet_pushback(&self) {
        let Some(p) = self
            .shared
            .as_ref()
            .and_then(|(fleet, key)| fleet.pushback(key))
        else {
            return;
        };
        let mut a = self.adaptive();
        let until = |ms: Option<u64>| ms.map(instant_at);
        if let Some(t) = until(p.suspended_until_ms) {
            a.suspended_until = Some(a.suspended_until.map_or(t, |mine| mine.max(t)));
        }
        if let (Some(f), Some(t)) = (p.factor, until(p.throttled_until_ms)) {
            a.factor = Some(a.factor.map_or(f, |mine| mine.min(f)));
            a.throttled_until = Some(a.throttled_until.map_or(t, |mine| mine.max(t)));
        }
    }

    /// Shares this node's push-back for the destination with the fleet.
    fn share_pushback(&self, a: &Adaptive) {
        let Some((fleet, key)) = &self.shared else {
            return;
        };
        fleet.share_pushback(
            key,
            Pushback {
                suspended_until_ms: a.suspended_until.map(ms_at),
                factor: a.factor,
                throttled_until_ms: a.throttled_until.map(ms_at),
            },
        );
    }

    /// The destination pushed back and `rule` matched: returns what changed, for the log.
    pub fn pushback(&self, rule: &BackoffRule) -> String {
        let change = self.pushback_here(rule);
        self.share_pushback(&self.adaptive());
        change
    }

    fn pushback_here(&self, rule: &BackoffRule) -> String {
        let mut a = self.adaptive();
        a.successes = 0;
        match rule.action {
            BackoffAction::Suspend => {
                a.suspended_until = Some(later(rule.duration));
                format!(
                    "suspended for {}",
                    baton_units::human_duration(rule.duration)
                )
            }
            BackoffAction::Throttle { factor } => {
                let f = (a.factor.unwrap_or(1.0) * factor).max(0.001);
                a.factor = Some(f);
                a.throttled_until = Some(later(rule.duration));
                format!(
                    "message rate and connections cut to {:.0}% for {}",
                    f * 100.0,
                    baton_units::human_duration(rule.duration)
                )
            }
        }
    }

    /// A delivery went through: a throttled rate recovers one step per run of successes, and
    /// fully once its time is up. Returns what changed, if anything.
    pub fn success(&self) -> Option<String> {
        let mut a = self.adaptive();
        let f = a.factor?;
        if a.throttled_until.is_some_and(|t| t <= Instant::now()) {
            *a = Adaptive::default();
            return Some("throttle expired: normal rate".into());
        }
        a.successes += 1;
        if a.successes < RECOVERY_RUN {
            return None;
        }
        a.successes = 0;
        let up = f * 2.0;
        if up >= 1.0 {
            *a = Adaptive::default();
            Some("recovered: normal rate".into())
        } else {
            a.factor = Some(up);
            Some(format!(
                "recovering: message rate and connections at {:.0}%",
                up * 100.0
            ))
        }
    }

    /// Waits for a connection slot (cap, throttled cap, rate); the slot is held while
    /// connected and given back when dropped.
    pub async fn connection(self: &Arc<Self>) -> ConnectionSlot {
        loop {
            if let Some(slot) = self.connection_for(&|| true).await {
                return slot;
            }
        }
    }

    /// As [`Limits::connection`], while `wanted` says the connection is still wanted (asked
    /// at each step of the wait): None once it is not, and no rate slot or lease is taken
    /// for it.
    pub async fn connection_for(self: &Arc<Self>, wanted: &Wanted<'_>) -> Option<ConnectionSlot> {
        let permit = match &self.connections {
            Some(s) => s.clone().acquire_owned().await.ok(),
            None => None,
        };
        // While throttled, the connection cap is cut by the same factor.
        loop {
            if !wanted() {
                return None;
            }
            let limit = self.adaptive().factor.map(|f| {
                ((self
                    .rule
                    .max_connections
                    .unwrap_or(self.nominal_connections) as f64
                    * f)
                    .ceil() as usize)
                    .max(1)
            });
            let open = self.open.load(std::sync::atomic::Ordering::Relaxed);
            match limit {
                Some(limit) if open >= limit => {
                    let _ =
                        tokio::time::timeout(Duration::from_secs(1), self.closed.notified()).await;
                }
                _ => break,
            }
        }
        // Paced before the fleet's lease: a lease is not held while waiting for a slot.
        if !self.connection_rate(wanted).await {
            return None;
        }
        let slot = self.fleet_lease(wanted).await?;
        let unleased = matches!(slot, FleetSlot::Counted);
        let lease = match slot {
            // Counted in `open` already, atomically with the check against the share.
            FleetSlot::Counted => None,
            slot => {
                self.open.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                match slot {
                    FleetSlot::Lease(lease) => Some(lease),
                    _ => None,
                }
            }
        };
        Some(ConnectionSlot {
            _permit: permit,
            lease,
            unleased,
            limits: self.clone(),
        })
    }

    /// Waits for the next new connection's slot under `max_connection_rate`: the fleet's
    /// with `[cluster]`, else this node's. False (no slot taken) once it is not `wanted`.
    async fn connection_rate(&self, wanted: &Wanted<'_>) -> bool {
        if let (Some((fleet, key)), Some(rate)) = (&self.shared, self.rule.max_connection_rate) {
            let key = format!("{key} connections");
            let local = self.connection_pacer.as_ref();
            return fleet_pace(fleet.as_ref(), &key, rate, || 1.0, local, wanted).await;
        }
        let Some(pacer) = &self.connection_pacer else {
            return true;
        };
        loop {
            if !wanted() {
                return false;
            }
            let taken = pacer
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .try_take(Instant::now(), 1.0);
            match taken {
                Ok(()) => return true,
                Err(at) => tokio::time::sleep_until(at).await,
            }
        }
    }

    /// One of the fleet's leases on this rule's connection cap, when the cap is shared: waits
    /// while all are held; while the store is unreachable, keeps to this node's share.
    async fn fleet_lease(&self, wanted: &Wanted<'_>) -> Option<FleetSlot> {
        use std::sync::atomic::Ordering::Relaxed;
        let (Some((leases, key)), Some(cap)) = (self.shared.as_ref(), self.rule.max_connections)
        else {
            return Some(FleetSlot::Unshared);
        };
        loop {
            if !wanted() {
                return None;
            }
            match leases.lease(key, cap).await {
                Leased::Held(lease) => return Some(FleetSlot::Lease(lease)),
                Leased::Full => {
                    let _ = tokio::time::timeout(LEASE_POLL, self.closed.notified()).await;
                }
                Leased::Unavailable => {
                    // Checked and counted at once: workers racing here cannot all pass.
                    let share = local_share(cap, leases.nodes());
                    let counted = self
                        .open
                        .fetch_update(Relaxed, Relaxed, |open| (open < share).then_some(open + 1));
                    if counted.is_ok() {
                        return Some(FleetSlot::Counted);
                    }
                    let _ = tokio::time::timeout(LEASE_POLL, self.closed.notified()).await;
                }
            }
        }
    }

    /// Waits until the message rate (cut while throttled) allows one more message.
    pub async fn message(&self) {
        if let (Some((fleet, key)), Some(rate)) = (&self.shared, self.rule.max_message_rate) {
            return self.fleet_message(fleet.as_ref(), key, rate).await;
        }
        loop {
            let factor = self.adaptive().factor;
            let pacer = match (factor, &self.message_pacer) {
                (None, None) => return,
                (None, Some(p)) | (Some(_), Some(p)) => p,
                (Some(_), None) => &self.throttle_pacer,
            };
            let taken = pacer
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .try_take(Instant::now(), factor.unwrap_or(1.0));
            match taken {
                Ok(()) => return,
                Err(at) => tokio::time::sleep_until(at).await,
            }
        }
    }

    /// The message rate held across the fleet: each message takes the fleet's next slot; while
    /// the store is unreachable this node paces alone at its share of the rate.
    async fn fleet_message(&self, fleet: &dyn FleetLimits, key: &str, rate: Rate) {
        let factor = || self.adaptive().factor.unwrap_or(1.0);
        fleet_pace(
            fleet,
            key,
            rate,
            factor,
            self.message_pacer.as_ref(),
            &|| true,
        )
        .await;
    }
}

/// Waits for the next slot of the fleet's `rate` under `key` (cut by `factor()`, asked at
/// each try); while the store is unreachable, for the next of `local` at this node's share.
/// False, with no slot taken, once the slot is not `wanted` (asked before each try).
async fn fleet_pace(
    fleet: &dyn FleetLimits,
    key: &str,
    rate: Rate,
    factor: impl Fn() -> f64,
    local: Option<&Mutex<Pacer>>,
    wanted: &Wanted<'_>,
) -> bool {
    loop {
        if !wanted() {
            return false;
        }
        let cut = factor().clamp(0.001, 1.0);
        let interval = rate.interval().div_f64(cut);
        match fleet.pace(key, interval, SLACK).await {
            Paced::Go => return true,
            Paced::Wait(d) => tokio::time::sleep(d.min(Duration::from_secs(1))).await,
            Paced::Unavailable => {
                let Some(pacer) = local else {
                    return true;
                };
                let share = cut / f64::from(fleet.nodes().max(1));
                let taken = pacer
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .try_take(Instant::now(), share);
                match taken {
                    Ok(()) => return true,
                    Err(at) => tokio::time::sleep_until(at).await,
                }
            }
        }
    }
}

/// This node's part of a fleet-wide connection cap while the fleet's store is unreachable:
/// the cap divided among the nodes, at least one.
pub(crate) fn local_share(cap: usize, nodes: u32) -> usize {
    (cap / usize::try_from(nodes.max(1)).unwrap_or(usize::MAX)).max(1)
}

/// The instant of Unix time `ms` (now, for a time past).
fn instant_at(ms: u64) -> Instant {
    let now = baton_spool::now_ms();
    later(Duration::from_millis(ms.saturating_sub(now)))
}

/// The Unix time (ms) of `at`.
fn ms_at(at: Instant) -> u64 {
    let left = at.saturating_duration_since(Instant::now());
    baton_spool::now_ms().saturating_add(u64::try_from(left.as_millis()).unwrap_or(u64::MAX))
}
