//! Baton's cluster link: several nodes, each with its own spool, share one Redis.
//!
//! Owns the Redis connection (connect, reconnect with backoff, degraded state), the node's
//! heartbeat and the fleet's view ([`read_fleet`]); the shared limits are built on [`Cluster::conn`].
//! It must not touch the spool, SMTP or the event log: the server watches [`Cluster::health`]
//! and turns its changes into events and metrics.
//!
//! Without Redis (not configured, or down) nothing here blocks mail: callers get `None` or an
//! error and keep to their share of each limit (the limit divided by the nodes last seen).

mod conn;
mod fleet;
mod leases;
mod link;
mod ops;
mod rates;

use std::sync::Arc;
use std::time::Duration;

pub use conn::Conn;
pub use fleet::{NodeReport, forget_node, read_fleet};
pub use leases::{Lease, LeaseGuard, Leases};
pub use link::{Cluster, Health};
pub use ops::{FleetChange, OperatorAction, PushbackChange, SuppressionChange, Suspension};
pub use rates::WarmupTake;

/// `[cluster]` as the server uses it.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterConfig {
    /// Redis URLs, tried in turn (`redis://host:port/db`, `rediss://`, `redis+unix://`).
    pub redis: Vec<String>,
    /// This node's name, unique in the fleet.
    pub node: String,
    /// How often the node reports itself; a node silent for three beats is down.
    pub heartbeat: Duration,
    /// The URLs are the seed nodes of a Redis Cluster, not servers tried in turn.
    pub redis_cluster: bool,
    /// Key prefix, so that several fleets can share one Redis. Under Redis Cluster it is a
    /// hash tag (`{baton}`), so that every key is in one slot (see `conn`).
    pub prefix: String,
    /// While Redis is down, shared limits are divided by this many nodes; None: by the number
    /// of nodes last seen alive.
    pub fallback_nodes: Option<u32>,
    /// How long a connection lease lasts unrenewed: a dead node's connections stop counting
    /// against the fleet's caps this long after it died.
    pub lease_ttl: Duration,
}

/// What the server tells the fleet about itself at each heartbeat.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LocalStats {
    /// Recipients queued.
    pub queue: u64,
    /// Open SMTP connections, inbound and outbound.
    pub connections_in: u64,
    pub connections_out: u64,
    /// Recipients delivered and bounced since start (rates are worked out from two beats).
    pub delivered: u64,
    pub bounced: u64,
}

/// Where the server's figures come from (called once per heartbeat).
pub type StatsSource = Arc<dyn Fn() -> LocalStats + Send + Sync>;
