//! Connection leases shared by the fleet (KumoMTA's design): per capped rule a sorted set
//! `<prefix>:lease:<rule>` of holders scored by when their lease runs out, in Redis's own
//! clock. One script drops the expired, counts, and adds when under the cap; the node renews
//! all it holds in one script every third of the lease time and gives a lease back when its
//! connection closes. A node that dies stops renewing: its leases run out by themselves.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use crate::link::Cluster;

const ACQUIRE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], ttl * 2)
  return 1
end
return 0
";

const RENEW: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, 'XX', now + ttl, ARGV[i + 1])
  redis.call('PEXPIRE', key, ttl * 2)
end
return #KEYS
";

/// Leases this node holds.
pub struct Leases {
    cluster: Cluster,
    next: AtomicU64,
    /// id → (Redis key, member).
    held: Mutex<HashMap<u64, (String, String)>>,
    release: UnboundedSender<(String, String)>,
}

/// The answer to [`Leases::acquire`].
pub enum Lease {
    Held(LeaseGuard),
    Full,
    Unavailable,
}

/// A lease held; given back when dropped.
pub struct LeaseGuard {
    id: u64,
    leases: Arc<Leases>,
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        let taken = self.leases.lock().remove(&self.id);
        if let Some(lease) = taken {
            let _ = self.leases.release.send(lease);
        }
    }
}

impl Leases {
    /// Starts renewing and releasing in the background.
    pub fn start(cluster: Cluster) -> Arc<Leases> {
        let (release, released) = unbounded_channel();
        let leases = Arc::new(Leases {
            cluster,
            next: AtomicU64::new(0),
            held: Mutex::new(HashMap::new()),
            release,
        });
        tokio::spawn(renew(Arc::downgrade(&leases), leases.ttl()));
        tokio::spawn(give_back(leases.cluster.clone(), released));
        leases
    }

    fn ttl(&self) -> Duration {
        self.cluster.config().lease_ttl
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, (String, String)>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes one of `cap` leases on `rule` (the same name on every node).
    pub async fn acquire(self: &Arc<Self>, rule: &str, cap: usize) -> Lease {
        let Some(mut conn) = self.cluster.conn() else {
            return Lease::Unavailable;
        };
        let config = self.cluster.config();
        let key = format!("{}:lease:{rule}", config.prefix);
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let member = format!("{}:{id}", config.node);
        let ttl_ms = u64::try_from(self.ttl().as_millis()).unwrap_or(u64::MAX);
        let script = redis::Script::new(ACQUIRE);
        let mut call = script.key(&key);
        call.arg(ttl_ms).arg(cap).arg(&member);
        let answer =
            tokio::time::timeout(Duration::from_secs(1), call.invoke_async::<i64>(&mut conn));
        match answer.await {
            Ok(Ok(1)) => {
                self.lock().insert(id, (key, member));
                Lease::Held(LeaseGuard {
                    id,
                    leases: self.clone(),
                })
            }
            Ok(Ok(_)) => Lease::Full,
            Ok(Err(_)) | Err(_) => Lease::Unavailable,
        }
    }
}

/// Renews every lease held, a third of the lease time apart, until the store is dropped.
async fn renew(leases: std::sync::Weak<Leases>, ttl: Duration) {
    let mut tick = tokio::time::interval((ttl / 3).max(Duration::from_millis(100)));
    loop {
        tick.tick().await;
        let Some(leases) = leases.upgrade() else {
            return;
        };
        let held: Vec<(String, String)> = leases.lock().values().cloned().collect();
        let Some(mut conn) = leases.cluster.conn() else {
            continue;
        };
        if held.is_empty() {
            continue;
        }
        let script = redis::Script::new(RENEW);
        let mut call = script.prepare_invoke();
        call.arg(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
        for (key, member) in &held {
            call.key(key).arg(member);
        }
        if let Err(e) = call.invoke_async::<i64>(&mut conn).await {
            tracing::warn!(error = %e, leases = held.len(), "cannot renew connection leases");
        }
    }
}

/// Gives leases back as their connections close, a batch per round trip.
async fn give_back(cluster: Cluster, mut released: UnboundedReceiver<(String, String)>) {
    while let Some(first) = released.recv().await {
        let mut batch = vec![first];
        while let Ok(more) = released.try_recv() {
            batch.push(more);
        }
        // Unreachable: the leases run out by themselves.
        let Some(mut conn) = cluster.conn() else {
            continue;
        };
        let mut pipe = redis::pipe();
        for (key, member) in &batch {
            pipe.cmd("ZREM").arg(key).arg(member).ignore();
        }
        if let Err(e) = pipe.query_async::<()>(&mut conn).await {
            tracing::debug!(error = %e, "leases not given back; they run out by themselves");
        }
    }
}
