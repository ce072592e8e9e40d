//! What nodes tell each other as it happens: operator suspensions and actions, push-backs and
//! suppression-list changes. Each kind has a hash of what is live (`<prefix>:suspensions`, destination →
//! until in Unix ms; `<prefix>:suppressions`, `scope|email` → the entry's JSON) for nodes that
//! join or come back, and every change goes out on one channel (`<prefix>:ops`).

use std::time::Duration;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc::UnboundedSender;

use crate::fleet::now_ms;
use crate::link::Cluster;

/// A destination suspended until `until_ms` (Unix ms), or resumed (`until_ms` 0).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Suspension {
    /// As the operator wrote it: a domain, `pool:NAME` or `tenant:NAME`.
    pub destination: String,
    pub until_ms: u64,
}

/// A suppression-list entry added or removed; the entry stays opaque here (the server's
/// JSON), keyed by `scope|email`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SuppressionChange {
    pub key: String,
    pub entry: String,
    pub removed: bool,
}

/// A destination that pushed back on one node (a backoff rule matched its reply), under the
/// shaping rule's key: until when it is suspended, how far its rate and connections are cut
/// and until when (Unix ms).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PushbackChange {
    pub key: String,
    pub suspended_until_ms: Option<u64>,
    pub factor: Option<f64>,
    pub throttled_until_ms: Option<u64>,
}

/// An operator's action on the whole queue of a destination (bounce, delete or flush a
/// domain, hold or release everything, move a pool's mail), carried out on every node. The
/// command stays opaque here (the server's JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OperatorAction {
    pub command: String,
}

/// One change shared by the fleet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FleetChange {
    Suspension(Suspension),
    Suppression(SuppressionChange),
    Pushback(PushbackChange),
    Operator(OperatorAction),
    /// Not shared: the link's word that catch-up number N (see
    /// [`crate::Cluster::catch_ups_started`]) has been fed in whole.
    #[serde(skip)]
    CaughtUp(u64),
}

/// What goes over the channel: the change and the node it came from (which ignores it).
#[derive(Serialize, Deserialize)]
struct Notice {
    node: String,
    change: FleetChange,
}

/// Entries read per step when a node catches up on the suppression hash.
const SCAN_BATCH: usize = 1000;

impl Cluster {
    /// Tells the fleet of a change made on this node. Err while degraded: the caller keeps
    /// it and tries again when the link is back.
    pub async fn share(&self, change: &FleetChange) -> Result<(), String> {
        let mut conn = self.conn().ok_or("redis unavailable")?;
        let prefix = &self.config().prefix;
        let mut pipe = redis::pipe();
        match change {
            // A resumption is kept (destination → when) so that a node that was away when
            // it happened learns of it when it catches up.
            FleetChange::Suspension(s) if s.until_ms == 0 => {
                pipe.cmd("HDEL")
                    .arg(format!("{prefix}:suspensions"))
                    .arg(&s.destination)
                    .ignore();
                pipe.cmd("HSET")
                    .arg(format!("{prefix}:resumptions"))
                    .arg(&s.destination)
                    .arg(now_ms())
                    .ignore();
            }
            FleetChange::Suspension(s) => {
                pipe.cmd("HSET")
                    .arg(format!("{prefix}:suspensions"))
                    .arg(&s.destination)
                    .arg(s.until_ms)
                    .ignore();
                pipe.cmd("HDEL")
                    .arg(format!("{prefix}:resumptions"))
                    .arg(&s.destination)
                    .ignore();
            }
            // A removal stays in the hash as the entry marked removed, so that a node that
            // was away when it happened learns of it when it catches up.
            FleetChange::Suppression(c) => {
                pipe.cmd("HSET")
                    .arg(format!("{prefix}:suppressions"))
                    .arg(&c.key)
                    .arg(&c.entry)
                    .ignore();
            }
            // Only told: it lasts minutes, and a node that misses it meets the push-back itself.
            FleetChange::Pushback(_) => {}
            // Only told: a one-off on what each node has queued at that moment.
            FleetChange::Operator(_) => {}
            // The link's own word on this node: nothing to tell.
            FleetChange::CaughtUp(_) => return Ok(()),
        }
        let json = serde_json::to_string(&Notice {
            node: self.config().node.clone(),
            change: change.clone(),
        })
        .map_err(|e| e.to_string())?;
        pipe.cmd("PUBLISH")
            .arg(format!("{prefix}:ops"))
            .arg(json)
            .ignore();
        pipe.query_async::<()>(&mut conn)
            .await
            .map_err(|e| e.to_string())
    }
}

impl Cluster {
    /// The operator suspensions in force across the fleet, soonest to end first; at most
    /// [`MAX_LISTED`]. Err while degraded.
    pub async fn suspensions(&self) -> Result<Vec<Suspension>, String> {
        let mut conn = self.conn().ok_or("redis unavailable")?;
        let key = format!("{}:suspensions", self.config().prefix);
        let now = now_ms();
        let mut live = Vec::new();
        let mut cursor = 0u64;
        loop {
            let (next, batch): (u64, Vec<(String, u64)>) = redis::cmd("HSCAN")
                .arg(&key)
                .arg(cursor)
                .arg("COUNT")
                .arg(SCAN_BATCH)
                .query_async(&mut conn)
                .await
                .map_err(|e| e.to_string())?;
            live.extend(batch.into_iter().filter(|(_, until)| *until > now).map(
                |(destination, until_ms)| Suspension {
                    destination,
                    until_ms,
                },
            ));
            if next == 0 || live.len() >= MAX_LISTED {
                break;
            }
            cursor = next;
        }
        live.sort_by(|a, b| (a.until_ms, &a.destination).cmp(&(b.until_ms, &b.destination)));
        live.truncate(MAX_LISTED);
        Ok(live)
    }
}

/// The most suspensions [`Cluster::suspensions`] lists.
pub const MAX_LISTED: usize = 1000;

/// Feeds `to` what is live in the fleet, then every change another node shares, until the
/// connection fails (the link starts it again on reconnecting).
pub(crate) async fn follow(
    client: redis::Client,
    mut conn: crate::conn::Conn,
    config: crate::ClusterConfig,
    to: UnboundedSender<FleetChange>,
    catch_ups: std::sync::Arc<std::sync::atomic::AtomicU64>,
) -> Result<(), String> {
    let (prefix, node) = (config.prefix, config.node);
    // Every heartbeat publishes a keepalive: this long without a message, the subscription is
    // dead (say, dropped by a NAT or load balancer without a reset).
    let silence = (config.heartbeat * 10).max(Duration::from_secs(5));
    let mut pubsub = client.get_async_pubsub().await.map_err(|e| e.to_string())?;
    pubsub
        .subscribe(format!("{prefix}:ops"))
        .await
        .map_err(|e| e.to_string())?;
    // Subscribed first, read second: nothing shared in between is missed. Counted before the
    // first read: a change written after the count went up is in what this catch-up reads.
    let number = catch_ups.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
    catch_up(&mut conn, &prefix, &to).await?;
    let _ = to.send(FleetChange::CaughtUp(number));
    let mut messages = pubsub.on_message();
    loop {
        let Ok(next) = tokio::time::timeout(silence, messages.next()).await else {
            return Err(format!(
                "nothing on the cluster channel for {} s, not even this node's keepalive",
                silence.as_secs()
            ));
        };
        let Some(message) = next else {
            break;
        };
        let Ok(payload) = message.get_payload::<String>() else {
            continue;
        };
        if payload == crate::fleet::KEEPALIVE {
            continue;
        }
        match serde_json::from_str::<Notice>(&payload) {
            Ok(notice) if notice.node != node => {
                if to.send(notice.change).is_err() {
                    return Ok(());
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "unreadable notice on the cluster channel"),
        }
    }
    Err("the cluster channel closed".into())
}

/// The live suspensions and every shared suppression entry, a batch at a time.
async fn catch_up(
    conn: &mut crate::conn::Conn,
    prefix: &str,
    to: &UnboundedSender<FleetChange>,
) -> Result<(), String> {
    let live: Vec<(String, u64)> = redis::cmd("HGETALL")
        .arg(format!("{prefix}:suspensions"))
        .query_async(conn)
        .await
        .map_err(|e| e.to_string())?;
    let now = now_ms();
    for (destination, until_ms) in live.into_iter().filter(|(_, until)| *until > now) {
        let _ = to.send(FleetChange::Suspension(Suspension {
            destination,
            until_ms,
        }));
    }
    // Resumptions this node may have missed (it resumes only what it holds suspended).
    let resumed: Vec<(String, u64)> = redis::cmd("HGETALL")
        .arg(format!("{prefix}:resumptions"))
        .query_async(conn)
        .await
        .map_err(|e| e.to_string())?;
    for (destination, _) in resumed {
        let _ = to.send(FleetChange::Suspension(Suspension {
            destination,
            until_ms: 0,
        }));
    }
    let mut cursor = 0u64;
    loop {
        let (next, batch): (u64, Vec<(String, String)>) = redis::cmd("HSCAN")
            .arg(format!("{prefix}:suppressions"))
            .arg(cursor)
            .arg("COUNT")
            .arg(SCAN_BATCH)
            .query_async(conn)
            .await
            .map_err(|e| e.to_string())?;
        for (key, entry) in batch {
            let _ = to.send(FleetChange::Suppression(SuppressionChange {
                key,
                entry,
                removed: false,
            }));
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}
