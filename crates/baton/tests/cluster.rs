//! Several Baton processes sharing one real redis-server ([cluster]): each node's heartbeat
//! shows on every node's `GET /api/v1/cluster` and in `baton cluster status`; Redis killed,
//! the nodes go on taking mail, say they are degraded (a `cluster` event) and rejoin when it
//! is back.

mod common;

use std::time::{Duration, Instant};

use common::Server;
use common::fleet::*;
use common::http::{self, get};
use common::mx::Script;
use common::redis::Redis;
use serde_json::Value;

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
        // Up, then up again after the outage (more when a loaded machine stalls a beat past
        // its 2 s: each stall is a short outage of its own, said as such).
        let events = cluster_events(n);
        let reached = events
            .iter()
            .filter(|e| e.contains("redis reached"))
            .count();
        assert!(reached >= 2, "up, then up again: {events:?}");
        assert_eq!(
            events.last().map(|e| e.contains("redis reached")),
            Some(true),
            "{events:?}"
        );
    }
    let forget = nodes[0].cli(&["cluster", "forget", "c"]);
    assert!(String::from_utf8_lossy(&forget.stdout).contains("forgotten"));
}

#[test]
fn two_nodes_with_one_name_are_told_and_a_quiet_fleet_stays_up() {
    let redis = Redis::start();
    let (a, twin, b) = (node(&redis, "a"), node(&redis, "a"), node(&redis, "b"));
    for n in [&a, &twin] {
        wait_until(
            20,
            || {
                cluster_events(n)
                    .iter()
                    .any(|e| e.contains("beats under the same name"))
            },
            || format!("node a told of its namesake: {:?}", cluster_events(n)),
        );
    }
    // Nothing happens for longer than a silent subscription is given (10 heartbeats): the
    // heartbeats' keepalives keep the channel's followers from taking it for dead.
    std::thread::sleep(Duration::from_secs(12));
    let events = cluster_events(&b);
    assert!(
        !events.iter().any(|e| e.contains("unavailable")),
        "b never lost the fleet: {events:?}"
    );
    assert!(
        !events.iter().any(|e| e.contains("same name")),
        "b has a name of its own: {events:?}"
    );
}

#[test]
fn an_operator_suspension_on_one_node_holds_on_all() {
    let redis = Redis::start();
    let (a, b, c) = (node(&redis, "a"), node(&redis, "b"), node(&redis, "c"));
    for n in [&a, &b, &c] {
        wait_fleet(n, "all up", |f| alive(f) == ["a", "b", "c"]);
    }
    suspend(&a, "far.test");
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

#[test]
fn the_dashboard_shows_the_fleet_and_its_suspensions() {
    let browser_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests-browser");
    assert!(
        std::path::Path::new(browser_dir)
            .join("node_modules/playwright-core")
            .exists(),
        "needs playwright-core in tests-browser/node_modules: scripts/test installs it"
    );
    let redis = Redis::start();
    let (a, b) = (node(&redis, "a"), node(&redis, "b"));
    wait_fleet(&b, "both up", |f| alive(f) == ["a", "b"]);
    suspend(&a, "far.test");
    let fleet = wait_fleet(&b, "the shared suspension listed", |f| {
        f["suspensions"][0]["destination"] == "far.test"
    });
    assert!(
        fleet["suspensions"][0]["until"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')),
        "{fleet}"
    );
    let screenshot =
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard-cluster.png");
    let out = std::process::Command::new("node")
        .current_dir(browser_dir)
        .args(["cluster.mjs", &format!("http://{}/", b.http)])
        .arg(&screenshot)
        .args(["2", "1"])
        .output()
        .expect("node");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let shown: Value = serde_json::from_slice(&out.stdout).expect("cluster.mjs prints JSON");
    assert_eq!(shown["hidden"], false, "{shown}");
    assert!(
        shown["heading"]
            .as_str()
            .is_some_and(|h| h.contains("redis up") && h.contains("seen from b")),
        "{shown}"
    );
    let nodes: Vec<(String, String)> = shown["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|row| {
            (
                row[0].as_str().unwrap_or("").into(),
                row[1].as_str().unwrap_or("").into(),
            )
        })
        .collect();
    assert_eq!(
        nodes,
        [("a".into(), "up".into()), ("b".into(), "up".into())],
        "{shown}"
    );
    assert_eq!(shown["suspensions"][0][0], "far.test", "{shown}");
}

#[test]
fn a_resumption_missed_while_away_is_caught_up() {
    let redis = Redis::start();
    let (a, mut b) = (node(&redis, "a"), node(&redis, "b"));
    wait_fleet(&b, "both up", |f| alive(f) == ["a", "b"]);
    suspend(&a, "far.test");
    wait_shaping(&b, "far.test", "suspended by the operator");
    // b is down (its suspension saved with it) while a resumes.
    b.terminate();
    let out = a.cli(&["resume", "far.test"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    b.spawn();
    wait_shaping(&b, "far.test", "resumed by the operator");
    // a resumed once: its own resumption does not come back to it.
    let resumed_on_a = || {
        a.events()
            .iter()
            .filter(|e| {
                e["type"] == "shaping"
                    && e["destination"] == "far.test"
                    && e["response"]
                        .as_str()
                        .is_some_and(|r| r.contains("resumed"))
            })
            .count()
    };
    assert_eq!(resumed_on_a(), 1);
}

#[test]
fn an_operator_action_on_a_destination_runs_on_every_node() {
    let redis = Redis::start();
    let (a, b) = (node(&redis, "a"), node(&redis, "b"));
    wait_fleet(&b, "both up", |f| alive(f) == ["a", "b"]);
    // Mail for far.test waits on b (held by its config); a has none.
    let mut c = b.connect();
    c.hello();
    let r = c.send_mail("s@sender.test", &["r@far.test"], b"Subject: x\r\n\r\nx\r\n");
    assert_eq!(r.code, 250);
    let out = a.cli(&["queue", "bounce", "far.test"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    b.wait_event(20, |e| {
        e["type"] == "bounce" && e["recipient"] == "r@far.test"
    });
    // One message by its id is the node's own business: b does not act on a's ids.
    let kept = {
        let mut c = b.connect();
        c.hello();
        c.send_mail(
            "s@sender.test",
            &["k@kept.test"],
            b"Subject: y\r\n\r\ny\r\n",
        )
        .queue_id()
    };
    a.cli(&["queue", "bounce", &kept]);
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        !b.events()
            .iter()
            .any(|e| e["type"] == "bounce" && e["recipient"] == "k@kept.test"),
        "b kept its message"
    );
}

#[test]
fn a_removal_made_while_redis_was_away_is_not_undone_by_the_catch_up() {
    let mut redis = Redis::start_persistent();
    let (a, c) = (node(&redis, "a"), node(&redis, "c"));
    wait_fleet(&c, "both up", |f| alive(f) == ["a", "c"]);
    suppress(&a, "back@far.test");
    wait_rcpt(&c, "back@far.test", 550);
    // Redis away (its data kept); a takes the address off its list meanwhile.
    redis.stop();
    wait_fleet(&a, "degraded", |f| f["redis"] == "degraded");
    let r = http::request(
        a.http,
        None,
        "DELETE",
        "/api/v1/suppressions/back%40far.test",
        &[],
        None,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    wait_rcpt(&a, "back@far.test", 250);
    // Back: Redis still holds the old entry, which a's catch-up reads before a's removal is
    // shared. a keeps its removal, and c learns of it.
    redis.restart();
    wait_fleet(&a, "rejoined", |f| f["redis"] == "up");
    wait_rcpt(&c, "back@far.test", 250);
    std::thread::sleep(Duration::from_secs(1));
    wait_rcpt(&a, "back@far.test", 250);
}

#[test]
fn a_suppression_added_on_one_node_refuses_the_address_on_another() {
    let mut redis = Redis::start();
    let (a, c) = (node(&redis, "a"), node(&redis, "c"));
    for n in [&a, &c] {
        wait_fleet(n, "both up", |f| alive(f) == ["a", "c"]);
    }
    wait_rcpt(&c, "gone@far.test", 250);
    suppress(&a, "gone@far.test");
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
    suppress(&a, "later@far.test");
    wait_rcpt(&a, "later@far.test", 550);
    redis.restart();
    wait_rcpt(&c, "later@far.test", 550);
    // A node that joins later has the list.
    let d = node(&redis, "d");
    wait_rcpt(&d, "later@far.test", 550);
    // A removal made while d was down reaches d when it comes back.
    let mut d = d;
    d.kill9();
    let r = http::request(
        a.http,
        None,
        "DELETE",
        "/api/v1/suppressions/later%40far.test",
        &[],
        None,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    d.spawn();
    wait_rcpt(&d, "later@far.test", 250);
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

#[test]
fn an_idle_node_makes_way_for_one_that_waits() {
    let redis = Redis::start();
    let shaping = "[[shaping]]\nsite = \"bigmail.test\"\nmax_connections = 2\n";
    let (_dns, mx, extra) = bigmail(Duration::from_millis(30), shaping);
    // Idle connections would hold their leases for a minute.
    let extra = extra.replace("idle_timeout = \"1s\"", "idle_timeout = \"60s\"");
    let nodes = fleet(&redis, &["a", "b"], &extra, 10);
    push_all(&nodes[..1], 8, 2);
    assert_eq!(mx.wait_for(8, 30).len(), 8);
    let connections = mx.connections();
    // a's two connections are idle now, with both leases; b finds the cap full, says it
    // waits, and a closes them for it.
    let started = Instant::now();
    push_all(&nodes[1..], 4, 2);
    let got = mx.wait_for(12, 30);
    eprintln!(
        "b's mail went {:?} after it came, on {} new connections",
        started.elapsed(),
        mx.connections() - connections
    );
    assert_eq!(
        got.len(),
        12,
        "b waited for a's idle connections to time out"
    );
    assert!(mx.max_active() <= 2, "the cap holds: {}", mx.max_active());
}

#[test]
fn a_node_that_comes_late_gets_its_part_of_a_busy_cap() {
    let redis = Redis::start();
    // Connections stay (no per-connection limit): only fair sharing lets c in.
    let shaping = "[[shaping]]\nsite = \"bigmail.test\"\nmax_connections = 4\n";
    let (_dns, mx, extra) = bigmail(Duration::from_millis(100), shaping);
    let nodes = fleet(&redis, &["a", "b", "c"], &extra, 10);
    let busy: Vec<_> = nodes[..2].iter().flat_map(|n| push(n, 40, 4)).collect();
    mx.wait_for(8, 30);
    // a and b hold the 4 leases between them with mail to spare; c comes with 4 messages.
    let mut client = nodes[2].connect();
    client.hello();
    for i in 0..4 {
        let body = format!("Subject: late {i}\r\n\r\nhi\r\n");
        let r = client.send_mail("a@sender.test", &["x@one.test"], body.as_bytes());
        assert_eq!(r.code, 250);
    }
    for p in busy {
        p.join().unwrap();
    }
    let mut got = mx.wait_for(84, 60);
    assert_eq!(got.len(), 84);
    got.sort_by_key(|m| m.at);
    let late =
        |m: &common::mx::Received| String::from_utf8_lossy(&m.body).contains("Subject: late");
    let last_late = got.iter().rposition(late).unwrap_or(0);
    eprintln!("c's last message arrived {} of 84", last_late + 1);
    // Measured: 26 of 84 (three runs); 53 when a and b give leases back only from idle
    // connections, c waiting for a lull in their queues.
    assert!(
        last_late < 42,
        "c waited for a and b: its last came {} of 84",
        last_late + 1
    );
    assert!(mx.max_active() <= 4, "the cap holds: {}", mx.max_active());
}

#[test]
fn a_site_connection_cap_holds_across_the_fleet() {
    let redis = Redis::start();
    let (_dns, mx, extra) = bigmail(Duration::from_millis(60), &site_cap(4));
    let nodes = fleet(&redis, &["a", "b", "c"], &extra, 10);
    // Each node alone would open 4: 12 at once without the shared leases.
    push_all(&nodes, 24, 4);
    let got = mx.wait_for(72, 120);
    assert_eq!(got.len(), 72);
    let (max_active, connections) = (mx.max_active(), mx.connections());
    eprintln!("72 messages from 3 nodes, {connections} connections, at most {max_active} at once");
    assert!(
        max_active <= 4,
        "the fleet's site cap of 4 was exceeded: {max_active}"
    );
    assert!(
        max_active >= 2,
        "expected parallel connections, saw {max_active}"
    );
}

#[test]
fn a_killed_nodes_leases_run_out_by_themselves() {
    let redis = Redis::start();
    // Connections held for a long time: the cap of 2 stays taken while a lives.
    let (_dns, mx, extra) = bigmail(Duration::from_secs(30), &site_cap(2));
    let mut a = delivering_node(&redis, "a", &extra, 2);
    let b = delivering_node(&redis, "b", &extra, 2);
    for n in [&a, &b] {
        wait_fleet(n, "both up", |f| alive(f) == ["a", "b"]);
    }
    for p in push(&a, 4, 2) {
        p.join().unwrap();
    }
    wait_until(
        20,
        || mx.max_active() >= 2,
        || "a never held its two connections".into(),
    );
    a.kill9();
    // b's mail goes once a's leases run out (2 s), not when a's sessions would have ended.
    for p in push(&b, 1, 1) {
        p.join().unwrap();
    }
    wait_until(
        25,
        || mx.connections() >= 3,
        || format!("b never got a lease: {}", b.log()),
    );
}

#[test]
fn a_message_rate_holds_across_the_fleet() {
    let redis = Redis::start();
    let rate = "[[shaping]]\ndomain = \"one.test\"\nmax_message_rate = \"10/s\"\n";
    let (_dns, mx, extra) = bigmail(Duration::ZERO, rate);
    let nodes = fleet(&redis, &["a", "b", "c"], &extra, 10);
    // 15 messages per node: alone, each would send its own 10/s (30/s for the fleet).
    push_all(&nodes, 15, 3);
    let n = 45;
    let got = mx.wait_for(n, 60);
    assert_eq!(got.len(), n);
    let mut times: Vec<_> = got.iter().map(|m| m.at).collect();
    times.sort();
    // Whole one-second windows from the first arrival, as the single-node rate test counts.
    let mut windows = vec![0usize; 4];
    for t in &times {
        if let Some(w) = windows.get_mut(t.duration_since(times[0]).as_secs_f64() as usize) {
            *w += 1;
        }
    }
    eprintln!("fleet messages per second: {windows:?}");
    for (i, w) in windows.iter().enumerate() {
        assert!(
            (9..=11).contains(w),
            "window {i}: {w} messages (want 10 ± 1): {windows:?}"
        );
    }
    let rate = (n - 1) as f64 / times[n - 1].duration_since(times[0]).as_secs_f64();
    assert!((9.0..=11.0).contains(&rate), "fleet rate {rate:.2}/s");
}

#[test]
fn a_connection_rate_holds_across_the_fleet() {
    let redis = Redis::start();
    // One message per connection: each arrival is one connection.
    let rate = "[[shaping]]\ndomain = \"one.test\"\nmax_connection_rate = \"5/s\"\n\
                max_messages_per_connection = 1\n";
    let (_dns, mx, extra) = bigmail(Duration::ZERO, rate);
    let nodes = fleet(&redis, &["a", "b", "c"], &extra, 10);
    // 8 per node: alone, each would open its own 5 a second (15/s for the fleet).
    push_all(&nodes, 8, 2);
    let got = mx.wait_for(24, 60);
    assert_eq!(got.len(), 24);
    assert_eq!(mx.connections(), 24, "one connection per message");
    let mut times: Vec<_> = got.iter().map(|m| m.at).collect();
    times.sort();
    let mut windows = vec![0usize; 4];
    for t in &times {
        if let Some(w) = windows.get_mut(t.duration_since(times[0]).as_secs_f64() as usize) {
            *w += 1;
        }
    }
    eprintln!("fleet connections per second: {windows:?}");
    eprintln!(
        "arrivals: {:?}",
        times
            .iter()
            .map(|t| t.duration_since(times[0]).as_millis())
            .collect::<Vec<_>>()
    );
    // An arrival comes a connection, a greeting and a transaction after its slot: on a busy
    // machine one can slip into the next window (CI has seen [5, 5, 5, 3]). Each node alone
    // gives [15, 9, 0, 0].
    for (i, w) in windows.iter().enumerate() {
        assert!(
            (3..=7).contains(w),
            "window {i}: {w} connections (want 5 ± 2): {windows:?}"
        );
    }
    let n = times.len();
    let rate = (n - 1) as f64 / times[n - 1].duration_since(times[0]).as_secs_f64();
    assert!((4.0..=6.0).contains(&rate), "fleet rate {rate:.2}/s");
}

#[test]
fn a_pushback_seen_by_one_node_holds_the_others() {
    let redis = Redis::start();
    let script = Script {
        rcpt: std::sync::Arc::new(|_, _| "451 4.7.1 Rate limited, try again later".into()),
        ..Script::default()
    };
    let backoff = "[[backoff]]\ncode = 451\npattern = \"(?i)rate limited\"\naction = \"suspend\"\nduration = \"1h\"\n";
    let (_dns, mx, extra) = bigmail_answering(script, backoff);
    let nodes = fleet(&redis, &["a", "b", "c"], &extra, 10);
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    for p in push(a, 1, 1) {
        p.join().unwrap();
    }
    a.wait_event(20, |e| {
        e["type"] == "shaping"
            && e["response"]
                .as_str()
                .is_some_and(|r| r.starts_with("suspended"))
    });
    // The notice crosses the channel in well under this; it only orders the test.
    std::thread::sleep(Duration::from_millis(500));
    for n in [b, c] {
        for p in push(n, 1, 1) {
            p.join().unwrap();
        }
        let held = n.wait_event(20, |e| {
            e["type"] == "held" && e["recipient"] == "x@one.test"
        });
        assert!(
            held["response"]
                .as_str()
                .is_some_and(|r| r.contains("suspended")),
            "{held}"
        );
    }
    assert_eq!(
        mx.connections(),
        1,
        "only a met the push-back; b and c held their mail"
    );
}

#[test]
fn redis_killed_mid_run_loses_no_mail_and_the_nodes_rejoin() {
    let mut redis = Redis::start();
    let (_dns, mx, extra) = bigmail(Duration::from_millis(20), &site_cap(4));
    let nodes = fleet(&redis, &["a", "b"], &extra, 10);
    for p in nodes
        .iter()
        .flat_map(|n| push(n, 20, 2))
        .collect::<Vec<_>>()
    {
        p.join().unwrap();
    }
    mx.wait_for(40, 60);
    // Killed once those connections are done (idle_timeout 1 s): the outage's own cap is
    // what is measured. (Connections open when Redis goes away run to their end.)
    std::thread::sleep(Duration::from_millis(1500));
    let before = mx.max_active();
    redis.stop();
    for n in &nodes {
        wait_fleet(n, "degraded", |f| f["redis"] == "degraded");
    }
    // Acknowledged while Redis is away: taken and delivered all the same, each node keeping
    // to its share of the cap (4 / 2 nodes).
    for p in nodes
        .iter()
        .flat_map(|n| push(n, 12, 4))
        .collect::<Vec<_>>()
    {
        p.join().unwrap();
    }
    let got = mx.wait_for(64, 60);
    assert_eq!(
        got.len(),
        64,
        "every acknowledged message delivered; queues: {:?}; log: {}",
        nodes.iter().map(|n| n.queue_json()).collect::<Vec<_>>(),
        nodes[0].log()
    );
    // Each node keeps to its share (4 / 2) while degraded; measured here, not asserted: the
    // fake MX counts a connection until its socket closes, so one closing while the next
    // opens can show as one over (docs/CLUSTER.md, failure modes).
    eprintln!(
        "at most {} at once during the outage, {before} before",
        mx.max_active()
    );
    redis.restart();
    for n in &nodes {
        wait_fleet(n, "rejoined", |f| {
            f["redis"] == "up" && alive(f) == ["a", "b"]
        });
    }
    eprintln!(
        "at most {} at once once rejoined, before new mail",
        mx.max_active()
    );
    let after: Vec<_> = nodes.iter().flat_map(|n| push(n, 10, 2)).collect();
    for p in after {
        p.join().unwrap();
    }
    assert_eq!(
        mx.wait_for(84, 60).len(),
        84,
        "delivered after the outage too"
    );
    // Not asserted, for the same reason: 4 in 8 of 8 runs since degraded connections close
    // within a second of Redis's return and a slot whose work went elsewhere goes back unused
    // (6 to 8 before); the steady-state cap is a_site_connection_cap_holds_across_the_fleet's.
    eprintln!("at most {} at once over the whole run", mx.max_active());
    // Exactly once each: nothing went twice across the outage.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(mx.messages().len(), 84, "no message delivered twice");
}
