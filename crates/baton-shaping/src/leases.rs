//! Connection caps shared by several nodes: the seam a cluster's lease store plugs into
//! (the `baton` crate's, over Redis). Shaping asks it for one of a cap's leases before a
//! connection opens and drops the lease when the connection closes.

use std::future::Future;
use std::pin::Pin;

/// What the store answers when asked for one of `cap` leases.
pub enum Leased {
    /// Taken; given back when dropped.
    Held(Box<dyn Send + Sync>),
    /// All `cap` are held across the fleet now.
    Full,
    /// The store cannot be reached: the node keeps to its own share of the cap.
    Unavailable,
}

/// A store of leases shared by the fleet.
pub trait SharedLeases: Send + Sync {
    /// Takes one of `cap` leases on `key` (the same key on every node for the same rule).
    fn acquire<'a>(
        &'a self,
        key: &'a str,
        cap: usize,
    ) -> Pin<Box<dyn Future<Output = Leased> + Send + 'a>>;

    /// The part of `cap` this node may use on its own while the store is unreachable.
    fn local_share(&self, cap: usize) -> usize;
}
