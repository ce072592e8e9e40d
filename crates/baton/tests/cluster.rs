//! Several Baton processes sharing one real redis-server ([cluster]): each node's heartbeat
//! shows on every node's `GET /api/v1/cluster` and in `baton cluster status`; Redis killed,
//! the nodes go on taking mail, say they are degraded (a `cluster` event) and rejoin when it
//! is back.

mod common;

use std::time::{Duration, Instant};

use common::Server;
use common::http::{self, get, post};
use common::redis::Redis;
use serde_json::{Value, json};

fn node(redis: &Redis, name: &str) -> Server {
    Server::start(&format!(
        "[cluster]\nredis = \"{}\"\nnode = \"{name}\"\nheartbeat = 1\n",
        redis.url()
    ))
}

/// Polls `GET /api/v1/cluster` on `server` until `ok` holds (20 s at most).
fn wait_fleet(server: &Server, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let fleet = get(server.http, "/api/v1/cluster").json();
        if ok(&fleet) {
            return fleet;
        }
        assert!(Instant::now() < deadline, "{what}: {fleet}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn alive(fleet: &Value) -> Vec<String> {
    let mut names: Vec<String> = fleet["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|n| n["alive"] == true)
        .filter_map(|n| n["node"].as_str().map(str::to_string))
        .collect();
    names.sort();
    names
}

fn cluster_events(server: &Server) -> Vec<String> {
    server
        .events()
        .iter()
        .filter(|e| e["type"] == "cluster")
        .map(|e| e["response"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn nodes_see_each_other_and_ride_out_a_redis_outage() {
    let mut redis = Redis::start();
    let nodes = [node(&redis, "a"), node(&redis, "b"), node(&redis, "c")];
    for n in &nodes {
        wait_fleet(n, "every node sees all three", |f| {
            f["redis"] == "up" && alive(f) == ["a", "b", "c"]
        });
    }
    // A message held on b shows in b's queue as every node sees it.
    let mut c = nodes[1].connect();
    c.hello();
    assert_eq!(
        c.send_mail("s@sender.test", &["r@far.test"], b"Subject: x\r\n\r\nx\r\n")
            .code,
        250
    );
    let fleet = wait_fleet(&nodes[0], "b's queue reported", |f| {
        f["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|n| n["node"] == "b" && n["queue"] == 1)
    });
    for n in fleet["nodes"].as_array().unwrap() {
        assert!(
            n["last_seen"].as_str().is_some_and(|s| s.ends_with('Z')),
            "{n}"
        );
    }
    let out = nodes[2].cli(&["cluster", "status", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: Value = serde_json::from_slice(&out.stdout).expect("status --json");
    assert_eq!(alive(&status), ["a", "b", "c"], "{status}");
    let table = nodes[2].cli(&["cluster", "status"]);
    assert!(String::from_utf8_lossy(&table.stdout).contains("up"));

    // Redis gone: every node says so once, and still takes mail.
    redis.stop();
    for n in &nodes {
        let fleet = wait_fleet(n, "degraded", |f| f["redis"] == "degraded");
        assert_eq!(
            fleet["nodes"].as_array().map(Vec::len),
            Some(1),
            "only itself: {fleet}"
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cluster_events(n).iter().any(|e| e.contains("unavailable")) {
            assert!(
                Instant::now() < deadline,
                "no cluster event: {:?}",
                cluster_events(n)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(
            cluster_events(n).iter().any(|e| e.contains("divided by 3")),
            "{:?}",
            cluster_events(n)
        );
    }
    let mut c = nodes[0].connect();
    c.hello();
    assert_eq!(
        c.send_mail("s@sender.test", &["r@far.test"], b"Subject: y\r\n\r\ny\r\n")
            .code,
        250
    );
    let out = nodes[0].cli(&["cluster", "status"]);
    assert!(!out.status.success(), "status without redis must fail");
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read the fleet"));

    // Back: they rejoin by themselves (the new Redis is empty; their heartbeats refill it).
    redis.restart();
    for n in &nodes {
        wait_fleet(n, "rejoined", |f| {
            f["redis"] == "up" && alive(f) == ["a", "b", "c"]
        });
        let events = cluster_events(n);
        assert_eq!(
            events
                .iter()
                .filter(|e| e.contains("redis reached"))
                .count(),
            2,
            "up, then up again: {events:?}"
        );
    }
    let forget = nodes[0].cli(&["cluster", "forget", "c"]);
    assert!(String::from_utf8_lossy(&forget.stdout).contains("forgotten"));
}

/// Waits for a `shaping` event about `destination` whose text has `words`.
fn wait_shaping(server: &Server, destination: &str, words: &str) {
    server.wait_event(20, |e| {
        e["type"] == "shaping"
            && e["destination"] == destination
            && e["response"].as_str().is_some_and(|r| r.contains(words))
    });
}

#[test]
fn an_operator_suspension_on_one_node_holds_on_all() {
    let redis = Redis::start();
    let (a, b, c) = (node(&redis, "a"), node(&redis, "b"), node(&redis, "c"));
    for n in [&a, &b, &c] {
        wait_fleet(n, "all up", |f| alive(f) == ["a", "b", "c"]);
    }
    let out = a.cli(&["suspend", "far.test", "--for", "1h"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for n in [&b, &c] {
        wait_shaping(n, "far.test", "suspended by the operator");
    }
    // A node that joins later finds the live suspension.
    let d = node(&redis, "d");
    wait_shaping(&d, "far.test", "suspended by the operator");
    let out = b.cli(&["resume", "far.test"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for n in [&a, &c, &d] {
        wait_shaping(n, "far.test", "resumed by the operator");
    }
    // Each node applied it once: nothing echoes back to the node that shared it.
    let suspended = a
        .events()
        .iter()
        .filter(|e| e["type"] == "shaping" && e["destination"] == "far.test")
        .count();
    assert_eq!(suspended, 2, "{:#?}", a.events());
}

/// Polls until RCPT for `rcpt` on `server` gets `code` (20 s at most).
fn wait_rcpt(server: &Server, rcpt: &str, code: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut c = server.connect();
        c.hello();
        assert_eq!(c.cmd("MAIL FROM:<app@sender.test>").code, 250);
        let r = c.cmd(&format!("RCPT TO:<{rcpt}>"));
        if r.code == code {
            return;
        }
        assert!(Instant::now() < deadline, "RCPT {rcpt}: {r:?}, not {code}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_suppression_added_on_one_node_refuses_the_address_on_another() {
    let mut redis = Redis::start();
    let (a, c) = (node(&redis, "a"), node(&redis, "c"));
    for n in [&a, &c] {
        wait_fleet(n, "both up", |f| alive(f) == ["a", "c"]);
    }
    wait_rcpt(&c, "gone@far.test", 250);
    let r = post(
        a.http,
        "/api/v1/suppressions",
        &json!({"email": "gone@far.test"}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    wait_rcpt(&c, "gone@far.test", 550);
    // Removed on c: gone on a too.
    let r = http::request(
        c.http,
        None,
        "DELETE",
        "/api/v1/suppressions/gone%40far.test",
        &[],
        None,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    wait_rcpt(&a, "gone@far.test", 250);
    // Added while Redis is down: it waits on a, and reaches c once Redis is back.
    redis.stop();
    wait_fleet(&a, "degraded", |f| f["redis"] == "degraded");
    let r = post(
        a.http,
        "/api/v1/suppressions",
        &json!({"email": "later@far.test"}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    wait_rcpt(&a, "later@far.test", 550);
    redis.restart();
    wait_rcpt(&c, "later@far.test", 550);
    // A node that joins later has the list.
    let d = node(&redis, "d");
    wait_rcpt(&d, "later@far.test", 550);
}

#[test]
fn a_node_that_starts_without_redis_runs_degraded_and_joins_later() {
    let mut redis = Redis::start();
    redis.stop();
    let lone = node(&redis, "late");
    let mut c = lone.connect();
    c.hello();
    assert_eq!(
        c.send_mail("s@sender.test", &["r@far.test"], b"Subject: x\r\n\r\nx\r\n")
            .code,
        250
    );
    wait_fleet(&lone, "degraded from the start", |f| {
        f["redis"] == "degraded"
    });
    redis.restart();
    wait_fleet(&lone, "joined", |f| {
        f["redis"] == "up" && alive(f) == ["late"]
    });
}

#[test]
fn without_cluster_the_view_is_this_node() {
    let server = Server::start("");
    let fleet = get(server.http, "/api/v1/cluster").json();
    assert_eq!(fleet["redis"], Value::Null);
    assert_eq!(fleet["nodes"][0]["node"], "mx.test.example", "{fleet}");
    let out = server.cli(&["cluster", "status"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no [cluster]"));
}
