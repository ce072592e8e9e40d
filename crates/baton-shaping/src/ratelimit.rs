//! Token buckets keyed by client address or user name: per-IP connection and command rates,
//! per-user submission rates. A bucket holds `count` tokens (the burst) and refills at
//! `count / per`; an empty bucket refuses. Full buckets are forgotten when the map grows, so
//! memory follows the number of recently active clients.
//!
//! Owns counting only; what a refusal means (a reply, a closed connection) is the caller's.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::Instant;

use crate::Rate;

/// Past this many buckets, full ones are dropped before adding another.
const PRUNE_AT: usize = 50_000;

pub struct RateLimiter<K> {
    rate: Rate,
    buckets: Mutex<HashMap<K, Bucket>>,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

impl<K: Hash + Eq + Clone> RateLimiter<K> {
    pub fn new(rate: Rate) -> Self {
        RateLimiter {
            rate,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token for `key`; false when its bucket is empty.
    pub fn take(&self, key: &K) -> bool {
        self.take_at(key, Instant::now())
    }

    fn take_at(&self, key: &K, now: Instant) -> bool {
        let capacity = f64::from(self.rate.count);
        let per_sec = capacity / self.rate.per.as_secs_f64();
        let refill = |b: &Bucket| {
            let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
            (b.tokens + elapsed * per_sec).min(capacity)
        };
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= PRUNE_AT && !buckets.contains_key(key) {
            buckets.retain(|_, b| refill(b) < capacity);
        }
        let bucket = buckets.entry(key.clone()).or_insert(Bucket {
            tokens: capacity,
            at: now,
        });
        bucket.tokens = refill(bucket);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_refill() {
        let limiter = RateLimiter::new(Rate::parse("3/m").unwrap());
        let t0 = Instant::now();
        assert!((0..3).all(|_| limiter.take_at(&"a", t0)));
        assert!(!limiter.take_at(&"a", t0), "the burst is spent");
        assert!(
            limiter.take_at(&"b", t0),
            "other keys have their own bucket"
        );
        assert!(!limiter.take_at(&"a", t0 + Duration::from_secs(19)));
        assert!(
            limiter.take_at(&"a", t0 + Duration::from_secs(21)),
            "one token per 20 s"
        );
        assert!(!limiter.take_at(&"a", t0 + Duration::from_secs(22)));
    }
}
