//! Limits shared by several nodes: the seam a cluster's store plugs into (the `baton`
//! crate's, over Redis). Shaping asks it for one of a cap's leases before a connection opens
//! (dropping the lease when the connection closes) and for each message's slot under a rate.
//! While the store cannot be reached, each node keeps to its share of every limit.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

/// What the store answers when asked for one of `cap` leases.
pub enum Leased {
    /// Taken; given back when dropped.
    Held(Box<dyn HeldLease>),
    /// All `cap` are held across the fleet now.
    Full,
    /// The store cannot be reached: the node keeps to its own share of the cap.
    Unavailable,
}

/// One of a cap's leases, held while its connection lives; given back when dropped.
pub trait HeldLease: Send + Sync {
    /// Whether another node waits for one of this cap's leases now.
    fn contended(&self) -> bool;

    /// Gives this lease back now if this node holds two or more of the cap's leases beyond
    /// what a node waiting on it holds; checked and given back at once, so that of several
    /// connections only the excess go. True if it did (its connection should close).
    fn give_back_if_richer(&self) -> bool;
}

/// What the store answers when asked for a message's slot under a rate.
pub enum Paced {
    /// Taken: send now.
    Go,
    /// The fleet's next slot is this far off.
    Wait(Duration),
    /// The store cannot be reached: the node paces alone, at its share of the rate.
    Unavailable,
}

/// What the store answers when a transaction's recipients are counted against a warm-up cap.
pub enum Warmed {
    /// Counted: send.
    Taken,
    /// The fleet reached this period's cap.
    Capped,
    /// The store cannot be reached: the node counts alone, against its share of the cap.
    Unavailable,
}

/// This node's warm-up counts: (key, period, sent), each key in its latest period.
pub type WarmupCounts = std::sync::Arc<dyn Fn() -> Vec<(String, u64, u64)> + Send + Sync>;

/// One transaction's recipients counted against a warm-up cap across the fleet.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WarmTake {
    /// The plan's period (its index since the plan started).
    pub period: u64,
    pub cap: u64,
    /// Recipients in this transaction.
    pub n: u64,
    /// What this node counted in the period before it (its own ledger, fallback included):
    /// the store takes it back where it lost it (restarted empty) or never had it (sent while
    /// unreachable).
    pub own: u64,
    /// How long the store keeps the period's count.
    pub ttl: Duration,
}

/// A destination's push-back as one node saw it, for the others: until when it is suspended,
/// and how far its rate and connections are cut until when (Unix ms).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Pushback {
    pub suspended_until_ms: Option<u64>,
    pub factor: Option<f64>,
    pub throttled_until_ms: Option<u64>,
}

pub type Answer<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A store of limits shared by the fleet. Keys are the same on every node for the same rule.
pub trait FleetLimits: Send + Sync {
    /// Takes one of `cap` leases on `key`; none while a node holding fewer waits for one.
    fn lease<'a>(&'a self, key: &'a str, cap: usize) -> Answer<'a, Leased>;

    /// Takes the next slot of `key`'s rate, one message every `interval` across the fleet,
    /// up to `tolerance` early (GCRA's tolerance).
    fn pace<'a>(
        &'a self,
        key: &'a str,
        interval: Duration,
        tolerance: Duration,
    ) -> Answer<'a, Paced>;

    /// How many nodes share the limits now (at least 1): a node alone takes 1/n of each.
    fn nodes(&self) -> u32;

    /// Whether the store can be reached now.
    fn available(&self) -> bool;

    /// Counts a transaction's recipients against a warm-up cap for `key`, unless the fleet
    /// has reached it.
    fn warm<'a>(&'a self, key: &'a str, take: WarmTake) -> Answer<'a, Warmed>;

    /// Tells the fleet that the destination under `key` pushed back here (fire and forget).
    fn share_pushback(&self, key: &str, pushback: Pushback);

    /// The live push-back another node shared for `key`, if any.
    fn pushback(&self, key: &str) -> Option<Pushback>;

    /// Where this node's warm-up counts can be read (its ledger), so that the store can put
    /// them back when it comes back empty; by default the store does not.
    fn keep_warmup_counts(&self, _counts: WarmupCounts) {}
}
