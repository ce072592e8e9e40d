//! Message rates shared by the fleet: GCRA with a burst of one, one message every `interval`
//! across all nodes, in one script per message over `<prefix>:rate:<rule>` (the theoretical
//! arrival time, in Redis's clock). Only rated rules call it, at their own (limited) pace.

use std::time::Duration;

use crate::link::Cluster;

// Microseconds (Lua's doubles hold them exactly): a rate of 300/s is 3,333 µs, not 3 ms.
// A slot may be taken up to ARGV[2] µs early (the tolerance, shaping's choice): a node's timer
// wakes it late by whole milliseconds, and without it every late wake-up would lose a slot.
const GCRA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local slack = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat - slack > now then
  return tat - slack - now
end
local next = math.max(tat, now) + interval
redis.call('SET', KEYS[1], next, 'PX', math.floor((next - now) / 1000) + 60000)
return 0
";

// A hash of each node's count: a node puts back what it counted and the hash lacks (Redis
// restarted empty, or the node sent while it could not reach it), then the sum is the fleet's.
const WARM: &str = r"
local mine = tonumber(redis.call('HGET', KEYS[1], ARGV[4]) or 0)
local own = tonumber(ARGV[5])
if own > mine then
  redis.call('HSET', KEYS[1], ARGV[4], own)
end
local sent = 0
for _, n in ipairs(redis.call('HVALS', KEYS[1])) do
  sent = sent + tonumber(n)
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
if sent >= tonumber(ARGV[1]) then
  return 0
end
redis.call('HINCRBY', KEYS[1], ARGV[4], ARGV[2])
return 1
";

/// One transaction counted against a warm-up cap (see [`Cluster::warm`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WarmupTake {
    pub period: u64,
    pub cap: u64,
    /// Recipients in this transaction.
    pub n: u64,
    /// What this node counted in the period before this transaction.
    pub own: u64,
    /// How long the period's count is kept.
    pub ttl: Duration,
}

impl Cluster {
    /// Counts a transaction against warm-up `key`'s cap in its period: Ok(true) counted,
    /// Ok(false) the fleet reached the cap; Err while unreachable. The count is a hash of
    /// each node's (`<prefix>:warm:<key>:<period>`, kept `ttl`).
    pub async fn warm(&self, key: &str, t: WarmupTake) -> Result<bool, String> {
        let mut conn = self.conn().ok_or("redis unavailable")?;
        let key = format!("{}:warm:{key}:{}", self.config().prefix, t.period);
        let ttl_ms = u64::try_from(t.ttl.as_millis())
            .unwrap_or(u64::MAX)
            .max(1000);
        let script = redis::Script::new(WARM);
        let mut call = script.key(&key);
        call.arg(t.cap)
            .arg(t.n)
            .arg(ttl_ms)
            .arg(&self.config().node)
            .arg(t.own);
        let answer =
            tokio::time::timeout(Duration::from_secs(1), call.invoke_async::<i64>(&mut conn));
        match answer.await {
            Ok(Ok(taken)) => Ok(taken == 1),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("no answer from redis within 1 s".into()),
        }
    }

    /// Takes the next slot of `rule`'s rate (one message every `interval` across the fleet,
    /// up to `tolerance` early): Ok(zero) to send now, Ok(wait) until the next slot; Err
    /// while Redis is unreachable.
    pub async fn pace(
        &self,
        rule: &str,
        interval: Duration,
        tolerance: Duration,
    ) -> Result<Duration, String> {
        let mut conn = self.conn().ok_or("redis unavailable")?;
        let key = format!("{}:rate:{rule}", self.config().prefix);
        let interval_us = u64::try_from(interval.as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        let script = redis::Script::new(GCRA);
        let mut call = script.key(&key);
        let tolerance_us = u64::try_from(tolerance.as_micros()).unwrap_or(u64::MAX);
        call.arg(interval_us).arg(tolerance_us);
        let answer =
            tokio::time::timeout(Duration::from_secs(1), call.invoke_async::<i64>(&mut conn));
        match answer.await {
            // A wait past a minute is no answer to trust (a clock or a key gone wrong).
            Ok(Ok(us)) => Ok(Duration::from_micros(
                u64::try_from(us).unwrap_or(0).min(60_000_000),
            )),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("no answer from redis within 1 s".into()),
        }
    }
}
