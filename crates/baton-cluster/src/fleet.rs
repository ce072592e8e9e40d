//! The fleet's view in Redis: each node's last report (`<prefix>:node:<name>`, JSON, kept a
//! week) and when each was last seen (`<prefix>:nodes`, a sorted set scored by milliseconds).

use crate::conn::Conn;
use serde::{Deserialize, Serialize};

use crate::{ClusterConfig, LocalStats};

/// How long a node's last report is kept after it falls silent: long enough to show a dead
/// node as down, short enough that a removed one goes away by itself.
const REPORT_TTL_MS: u64 = 7 * 24 * 3600 * 1000;
/// A node silent for this many heartbeats is down.
const MISSED_BEATS: u64 = 3;

/// One node as the fleet sees it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeReport {
    pub node: String,
    pub version: String,
    /// RFC 3339.
    pub started: String,
    pub last_seen: String,
    pub last_seen_ms: u64,
    pub heartbeat_ms: u64,
    /// Recipients queued.
    pub queue: u64,
    pub connections_in: u64,
    pub connections_out: u64,
    /// Recipients per minute since the previous heartbeat.
    pub delivered_per_min: u64,
    pub bounced_per_min: u64,
    /// Worked out when read: seen within three heartbeats.
    #[serde(default)]
    pub alive: bool,
    /// Which process beats under this name (its start and pid): two that differ while both
    /// beat are two nodes with one name.
    #[serde(default)]
    pub instance: String,
}

impl NodeReport {
    pub(crate) fn new(
        config: &ClusterConfig,
        version: &str,
        started_ms: u64,
        now: u64,
        stats: &LocalStats,
        (before_ms, before): (u64, &LocalStats),
    ) -> NodeReport {
        let per_min = |now_n: u64, then_n: u64| {
            if before_ms == 0 || now <= before_ms {
                return 0;
            }
            now_n.saturating_sub(then_n).saturating_mul(60_000) / (now - before_ms)
        };
        NodeReport {
            node: config.node.clone(),
            version: version.to_string(),
            started: rfc3339(started_ms),
            last_seen: rfc3339(now),
            last_seen_ms: now,
            heartbeat_ms: config.heartbeat.as_millis().try_into().unwrap_or(u64::MAX),
            queue: stats.queue,
            connections_in: stats.connections_in,
            connections_out: stats.connections_out,
            delivered_per_min: per_min(stats.delivered, before.delivered),
            bounced_per_min: per_min(stats.bounced, before.bounced),
            alive: true,
            instance: format!("{started_ms:x}-{}", std::process::id()),
        }
    }

    /// Whether a node last seen at `last_seen_ms` counts as alive at `now`.
    fn alive_at(&self, now: u64) -> bool {
        now.saturating_sub(self.last_seen_ms) <= self.heartbeat_ms.saturating_mul(MISSED_BEATS)
    }
}

/// What a heartbeat learns.
pub(crate) struct Beaten {
    /// Nodes alive, this one included.
    pub(crate) alive: u32,
    /// Another process that beat under this node's name within three beats: its start.
    pub(crate) namesake: Option<String>,
}

/// The keepalive each heartbeat publishes on the channel: a follower that hears nothing, not
/// even its own node's, for long knows its subscription is dead.
pub(crate) const KEEPALIVE: &str = "beat";

/// Writes this node's report (and a keepalive on the channel) in one round trip, and says
/// how many nodes are alive and whether another process beats under the same name.
pub(crate) async fn beat(
    conn: &mut Conn,
    prefix: &str,
    report: &NodeReport,
) -> Result<Beaten, String> {
    let json = serde_json::to_string(report).map_err(|e| e.to_string())?;
    let window = report.heartbeat_ms.saturating_mul(MISSED_BEATS);
    let since = report.last_seen_ms.saturating_sub(window);
    let (before, _, alive): (Option<String>, (), u32) = redis::pipe()
        .cmd("SET")
        .arg(format!("{prefix}:node:{}", report.node))
        .arg(json)
        .arg("PX")
        .arg(REPORT_TTL_MS)
        .arg("GET")
        .cmd("ZADD")
        .arg(format!("{prefix}:nodes"))
        .arg(report.last_seen_ms)
        .arg(&report.node)
        .cmd("ZCOUNT")
        .arg(format!("{prefix}:nodes"))
        .arg(since)
        .arg("+inf")
        .cmd("PUBLISH")
        .arg(format!("{prefix}:ops"))
        .arg(KEEPALIVE)
        .ignore()
        .query_async(conn)
        .await
        .map_err(|e| e.to_string())?;
    let namesake = before
        .and_then(|json| serde_json::from_str::<NodeReport>(&json).ok())
        .filter(|b| b.instance != report.instance && b.alive_at(report.last_seen_ms))
        .map(|b| b.started);
    Ok(Beaten {
        alive: alive.max(1),
        namesake,
    })
}

/// Every node with a report, by name; reports past their TTL drop out of the set here.
pub(crate) async fn read(conn: &mut Conn, prefix: &str) -> Result<Vec<NodeReport>, String> {
    let names: Vec<String> = redis::cmd("ZRANGE")
        .arg(format!("{prefix}:nodes"))
        .arg(0)
        .arg(-1)
        .query_async(conn)
        .await
        .map_err(|e| e.to_string())?;
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let keys: Vec<String> = names.iter().map(|n| format!("{prefix}:node:{n}")).collect();
    let reports: Vec<Option<String>> = redis::cmd("MGET")
        .arg(&keys)
        .query_async(conn)
        .await
        .map_err(|e| e.to_string())?;
    let now = now_ms();
    let mut nodes = Vec::new();
    for (name, report) in names.iter().zip(reports) {
        match report.and_then(|json| serde_json::from_str::<NodeReport>(&json).ok()) {
            Some(mut report) => {
                report.alive = report.alive_at(now);
                nodes.push(report);
            }
            // Expired (or unreadable): forget the name too.
            None => {
                let _: Result<(), _> = redis::cmd("ZREM")
                    .arg(format!("{prefix}:nodes"))
                    .arg(name)
                    .query_async(conn)
                    .await;
            }
        }
    }
    nodes.sort_by(|a, b| a.node.cmp(&b.node));
    Ok(nodes)
}

/// The fleet as seen from outside a running node (`baton cluster status`).
pub async fn read_fleet(config: &ClusterConfig) -> Result<Vec<NodeReport>, String> {
    let (_, mut conn) = crate::conn::connect(config).await?;
    read(&mut conn, &config.prefix).await
}

/// Takes a node out of the fleet's view at once (a node removed for good).
pub async fn forget_node(config: &ClusterConfig, node: &str) -> Result<bool, String> {
    let (_, mut conn) = crate::conn::connect(config).await?;
    let (removed, _): (u32, u32) = redis::pipe()
        .cmd("ZREM")
        .arg(format!("{}:nodes", config.prefix))
        .arg(node)
        .cmd("DEL")
        .arg(format!("{}:node:{node}", config.prefix))
        .query_async(&mut conn)
        .await
        .map_err(|e| e.to_string())?;
    Ok(removed > 0)
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis().try_into().unwrap_or(u64::MAX))
}

fn rfc3339(ms: u64) -> String {
    i64::try_from(ms)
        .ok()
        .and_then(|ms| jiff::Timestamp::from_millisecond(ms).ok())
        .map(|t| {
            t.round(jiff::Unit::Millisecond)
                .map_or_else(|_| t.to_string(), |t| t.to_string())
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn config() -> ClusterConfig {
        ClusterConfig {
            redis: vec![],
            redis_cluster: false,
            node: "a".into(),
            heartbeat: Duration::from_secs(1),
            prefix: "baton".into(),
            fallback_nodes: None,
            lease_ttl: Duration::from_secs(10),
        }
    }

    #[test]
    fn rates_come_from_two_beats_and_silence_means_down() {
        let before = LocalStats {
            delivered: 100,
            ..LocalStats::default()
        };
        let now = LocalStats {
            delivered: 160,
            bounced: 2,
            queue: 7,
            ..LocalStats::default()
        };
        let r = NodeReport::new(&config(), "1.0", 1_000, 31_000, &now, (1_000, &before));
        assert_eq!(
            (r.delivered_per_min, r.bounced_per_min, r.queue),
            (120, 4, 7)
        );
        let first = NodeReport::new(&config(), "1.0", 1_000, 31_000, &now, (0, &before));
        assert_eq!(first.delivered_per_min, 0, "no rate before a second beat");
        assert!(r.alive_at(34_000));
        assert!(!r.alive_at(34_001));
        assert_eq!(r.last_seen, "1970-01-01T00:00:31Z");
    }
}
