//! A fleet on a Redis Cluster (`redis_cluster = true`): three real redis-server primaries made
//! one cluster by redis-cli. The nodes see each other, share operator actions, suppressions
//! and connection caps as on one Redis, and every key they write lives in one slot.

mod common;

use std::time::Duration;

use common::fleet::{
    alive, bigmail, cluster_events, fleet, node, push_all, site_cap, suppress, suspend, wait_fleet,
    wait_rcpt, wait_shaping, wait_until,
};
use common::redis::RedisCluster;

#[test]
fn a_fleet_shares_its_state_through_a_redis_cluster() {
    let redis = RedisCluster::start(0);
    let (a, b) = (node(&redis, "a"), node(&redis, "b"));
    for n in [&a, &b] {
        wait_fleet(n, "both up", |f| alive(f) == ["a", "b"]);
    }
    // Published on one shard's channel, heard by the node subscribed on another.
    suspend(&a, "far.test");
    wait_shaping(&b, "far.test", "suspended by the operator");
    suppress(&a, "gone@far.test");
    wait_rcpt(&b, "gone@far.test", 550);
    // A node that joins later reads both from the cluster.
    let c = node(&redis, "c");
    wait_shaping(&c, "far.test", "suspended by the operator");
    wait_rcpt(&c, "gone@far.test", 550);
    let status = a.cli(&["cluster", "status"]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(["a", "b", "c"].iter().all(|n| text.contains(n)), "{text}");

    // Every key carries the hash tag, so all of them are on the shard that owns its slot.
    let keys = redis.keys();
    assert!(keys.len() >= 5, "{keys:?}");
    assert!(
        keys.iter().all(|(_, k)| k.starts_with("{baton}:")),
        "{keys:?}"
    );
    assert!(keys.iter().all(|(port, _)| *port == keys[0].0), "{keys:?}");
}

#[test]
fn a_site_cap_holds_across_a_fleet_on_a_redis_cluster() {
    let redis = RedisCluster::start(0);
    let (_dns, mx, extra) = bigmail(Duration::from_millis(60), &site_cap(3));
    let nodes = fleet(&redis, &["a", "b"], &extra, 10);
    // Each node alone would open 3: 6 at once without the shared leases.
    push_all(&nodes, 24, 3);
    assert_eq!(mx.wait_for(48, 120).len(), 48);
    let max_active = mx.max_active();
    eprintln!("48 messages from 2 nodes, at most {max_active} connections at once");
    assert!(
        max_active <= 3,
        "the fleet's cap of 3 was exceeded: {max_active}"
    );
}

#[test]
fn a_node_pointed_at_a_redis_cluster_as_at_one_server_says_what_to_set() {
    let redis = RedisCluster::start(0);
    // One seed, without redis_cluster = true: the node would miss keys on other shards.
    let lone = node(&redis.nodes[0], "lone");
    wait_until(
        20,
        || {
            cluster_events(&lone)
                .iter()
                .any(|e| e.contains("redis_cluster = true"))
        },
        || format!("{:?}", cluster_events(&lone)),
    );
    wait_fleet(&lone, "degraded", |f| f["redis"] == "degraded");
}

#[test]
fn the_fleet_follows_its_shard_through_a_failover() {
    let mut redis = RedisCluster::start(1);
    let (a, b) = (node(&redis, "a"), node(&redis, "b"));
    for n in [&a, &b] {
        wait_fleet(n, "both up", |f| alive(f) == ["a", "b"]);
    }
    suppress(&a, "before@far.test");
    wait_rcpt(&b, "before@far.test", 550);
    // Kill the primary that holds the fleet's slot: its replica takes over.
    let (port, _) = redis.keys()[0].clone();
    let primary = redis.nodes.iter().position(|n| n.port == port).unwrap();
    redis.nodes[primary].stop();
    wait_until(
        30,
        || {
            redis
                .keys()
                .iter()
                .any(|(p, k)| *p != port && k == "{baton}:nodes")
        },
        || {
            let up = redis.nodes.iter().filter(|n| n.port != port);
            let roles: Vec<String> = up
                .map(|n| format!("{}: {:?}", n.port, n.cli(&["role"])))
                .collect();
            format!(
                "no replica took over the fleet's slot from {port}: {roles:?} {}",
                redis.nodes[(primary + 1) % 6].cli(&["cluster", "nodes"])
            )
        },
    );
    // The fleet goes on on the new primary: it sees both nodes, and what one node shares
    // (held before, made after) reaches the other.
    for n in [&a, &b] {
        wait_fleet(n, "both up again", |f| {
            f["redis"] == "up" && alive(f) == ["a", "b"]
        });
    }
    suspend(&b, "far.test");
    wait_shaping(&a, "far.test", "suspended by the operator");
    suppress(&b, "after@far.test");
    wait_rcpt(&a, "after@far.test", 550);
    wait_rcpt(&a, "before@far.test", 550);
    eprintln!("cluster events on a: {:?}", cluster_events(&a));
}
