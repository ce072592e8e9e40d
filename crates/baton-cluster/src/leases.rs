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

/// KEYS: the leases; the nodes waiting for one (a hash: node → "until ms:leases it holds").
/// ARGV: lease ms, cap, member, node, how long a wait is remembered (ms). A node gets none
/// while a node holding fewer waits (that one goes first); one that finds the cap full is
/// noted as waiting, with how many it holds.
const ACQUIRE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
local node = ARGV[4]
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local mine = 0
local prefix = node .. ':'
for _, m in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  if string.sub(m, 1, #prefix) == prefix then mine = mine + 1 end
end
local waits = redis.call('HGETALL', KEYS[2])
for i = 1, #waits, 2 do
  local until_ms, held = string.match(waits[i + 1], '^(%d+):(%d+)$')
  if not until_ms or tonumber(until_ms) <= now then
    redis.call('HDEL', KEYS[2], waits[i])
  elseif waits[i] ~= node and tonumber(held) < mine then
    return 0
  end
end
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], ttl * 2)
  redis.call('HDEL', KEYS[2], node)
  return 1
end
local wait = tonumber(ARGV[5])
redis.call('HSET', KEYS[2], node, (now + wait) .. ':' .. mine)
redis.call('PEXPIRE', KEYS[2], wait * 2)
return 0
";

/// KEYS: wait hashes. ARGV[1]: this node. For each, the fewest leases another node waiting
/// there holds, or -1 when none waits.
const CONTENDED: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for i, key in ipairs(KEYS) do
  local fewest = -1
  local waits = redis.call('HGETALL', key)
  for j = 1, #waits, 2 do
    local until_ms, held = string.match(waits[j + 1], '^(%d+):(%d+)$')
    if until_ms and tonumber(until_ms) > now and waits[j] ~= ARGV[1] then
      held = tonumber(held)
      if fewest < 0 or held < fewest then fewest = held end
    end
  end
  out[i] = fewest
end
return out
";

/// How long a node that found a cap full counts as waiting (it asks again every 100 ms).
const WAIT_MS: u64 = 2000;
/// How often a node holding leases looks for other nodes waiting on their caps.
const CONTENTION_POLL: Duration = Duration::from_millis(500);

const RENEW: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, now + ttl, ARGV[i + 1])
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
    /// The lease keys, among those held, that another node waits on, with the fewest leases
    /// such a node holds.
    contended: Mutex<HashMap<String, usize>>,
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
            contended: Mutex::new(HashMap::new()),
            release,
        });
        let cluster = leases.cluster.clone();
        tokio::spawn(keep(
            Arc::downgrade(&leases),
            cluster,
            leases.ttl(),
            released,
        ));
        tokio::spawn(watch_contention(Arc::downgrade(&leases)));
        leases
    }

    fn ttl(&self) -> Duration {
        self.cluster.config().lease_ttl
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, (String, String)>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn contended_keys(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        self.contended.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes one of `cap` leases on `rule` (the same name on every node); none while a node
    /// holding fewer waits for one.
    pub async fn acquire(self: &Arc<Self>, rule: &str, cap: usize) -> Lease {
        let Some(mut conn) = self.cluster.conn() else {
            return Lease::Unavailable;
        };
        let config = self.cluster.config();
        let key = format!("{}:lease:{rule}", config.prefix);
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        // The process in the name too: two processes under one node name (a mistake the
        // heartbeat reports) must not take each other's leases for their own.
        let member = format!("{}:{}-{id}", config.node, std::process::id());
        let ttl_ms = u64::try_from(self.ttl().as_millis()).unwrap_or(u64::MAX);
        let script = redis::Script::new(ACQUIRE);
        let mut call = script.key(&key);
        call.key(format!("{key}:wait"))
            .arg(ttl_ms)
            .arg(cap)
            .arg(&member)
            .arg(&config.node)
            .arg(WAIT_MS);
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

impl LeaseGuard {
    /// This lease's Redis key, while held.
    fn key(&self) -> Option<String> {
        self.leases.lock().get(&self.id).map(|(key, _)| key.clone())
    }

    /// Whether another node waits on this lease's cap (as of the last look, at most
    /// [`CONTENTION_POLL`] old).
    pub fn contended(&self) -> bool {
        self.key()
            .is_some_and(|key| self.leases.contended_keys().contains_key(&key))
    }

    /// Gives this lease back now if this node holds two or more leases of its cap beyond
    /// what a node waiting on it holds; true if it did. Counted and removed under one lock:
    /// of several connections, only the excess go. Nodes end up within one lease of each
    /// other.
    pub fn give_back_if_richer(&self) -> bool {
        let Some(key) = self.key() else {
            return false;
        };
        let Some(fewest) = self.leases.contended_keys().get(&key).copied() else {
            return false;
        };
        let mut held = self.leases.lock();
        let mine = held.values().filter(|(k, _)| *k == key).count();
        if mine <= fewest.saturating_add(1) {
            return false;
        }
        if let Some(lease) = held.remove(&self.id) {
            let _ = self.leases.release.send(lease);
        }
        true
    }
}

/// Looks, every [`CONTENTION_POLL`] while leases are held, for other nodes waiting on their
/// caps, until the store is dropped.
async fn watch_contention(leases: std::sync::Weak<Leases>) {
    let mut tick = tokio::time::interval(CONTENTION_POLL);
    loop {
        tick.tick().await;
        let Some(leases) = leases.upgrade() else {
            return;
        };
        let mut keys: Vec<String> = leases.lock().values().map(|(k, _)| k.clone()).collect();
        keys.sort();
        keys.dedup();
        let Some(mut conn) = leases.cluster.conn().filter(|_| !keys.is_empty()) else {
            leases.contended_keys().clear();
            continue;
        };
        let script = redis::Script::new(CONTENDED);
        let mut call = script.prepare_invoke();
        for key in &keys {
            call.key(format!("{key}:wait"));
        }
        call.arg(&leases.cluster.config().node);
        let answer = tokio::time::timeout(Duration::from_secs(1), call.invoke_async(&mut conn));
        let fewest: Vec<i64> = match answer.await {
            Ok(Ok(fewest)) => fewest,
            _ => Vec::new(),
        };
        let contended = keys
            .into_iter()
            .zip(fewest)
            .filter_map(|(k, n)| Some((k, usize::try_from(n).ok()?)))
            .collect();
        *leases.contended_keys() = contended;
    }
}

/// Renews every lease held, a third of the lease time apart, and gives leases back as their
/// connections close, a batch per round trip; both on this one task, so that a lease given
/// back is never renewed after (renewal adds what is missing: a Redis restarted empty gets
/// back the leases of the connections still open). Ends when the store is dropped.
async fn keep(
    leases: std::sync::Weak<Leases>,
    cluster: Cluster,
    ttl: Duration,
    mut released: UnboundedReceiver<(String, String)>,
) {
    let mut tick = tokio::time::interval((ttl / 3).max(Duration::from_millis(100)));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let Some(leases) = leases.upgrade() else {
                    return;
                };
                renew(&leases, ttl).await;
            }
            first = released.recv() => {
                let Some(first) = first else {
                    return;
                };
                give_back(&cluster, first, &mut released).await;
            }
        }
    }
}

async fn renew(leases: &Leases, ttl: Duration) {
    let held: Vec<(String, String)> = leases.lock().values().cloned().collect();
    let Some(mut conn) = leases.cluster.conn() else {
        return;
    };
    if held.is_empty() {
        return;
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

/// Gives back `first` and whatever else was released meanwhile, in one round trip.
async fn give_back(
    cluster: &Cluster,
    first: (String, String),
    released: &mut UnboundedReceiver<(String, String)>,
) {
    let mut batch = vec![first];
    while let Ok(more) = released.try_recv() {
        batch.push(more);
    }
    // Unreachable: the leases run out by themselves.
    let Some(mut conn) = cluster.conn() else {
        return;
    };
    let mut pipe = redis::pipe();
    for (key, member) in &batch {
        pipe.cmd("ZREM").arg(key).arg(member).ignore();
    }
    if let Err(e) = pipe.query_async::<()>(&mut conn).await {
        tracing::debug!(error = %e, "leases not given back; they run out by themselves");
    }
}
