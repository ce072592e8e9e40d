//! Warm-up caps across a fleet ([cluster] with `[[source]] warmup`): the fleet's recipients
//! count against one source's cap per period, and the count outlives Redis restarting empty.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::Server;
use common::fleet::{bigmail, fleet, wait_until};
use common::redis::Redis;

/// A pool of one source, 127.0.0.10, for mail from new.test, allowed `cap` recipients today.
fn warmup(cap: u64) -> String {
    let today = jiff::Timestamp::now()
        .to_zoned(jiff::tz::TimeZone::UTC)
        .date();
    format!(
        "[[source]]\nname = \"ip10\"\naddress = \"127.0.0.10\"\nwarmup = [{cap}]\nwarmup_start = \"{today}\"\n\
         [[pool]]\nname = \"new\"\nsources = [\"ip10\"]\nsender_domains = [\"new.test\"]\n"
    )
}

/// Sends `n` messages from new.test through `node`.
fn send(node: &Server, n: usize) {
    let mut c = node.connect();
    c.hello();
    for i in 0..n {
        let body = format!("Subject: {i}\r\n\r\nx\r\n");
        let r = c.send_mail("a@new.test", &["u@one.test"], body.as_bytes());
        assert_eq!(r.code, 250, "{r:?}");
    }
}

/// Waits until `total` messages are delivered or held for the warm-up cap across `nodes`,
/// and returns how many were delivered.
fn settle(nodes: &[Server], total: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (mut delivered, mut held) = (0, HashSet::new());
        for e in nodes.iter().flat_map(Server::events) {
            let capped = e["response"]
                .as_str()
                .is_some_and(|r| r.contains("warm-up cap"));
            if e["type"] == "delivery" {
                delivered += 1;
            } else if e["type"] == "held" && capped {
                held.insert(e["message_id"].to_string());
            }
        }
        if delivered + held.len() >= total {
            return delivered;
        }
        assert!(
            Instant::now() < deadline,
            "{delivered} delivered, {} held, of {total}",
            held.len()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_warmup_cap_counts_the_whole_fleet() {
    let redis = Redis::start();
    let (_dns, mx, extra) = bigmail(Duration::ZERO, &warmup(5));
    let nodes = fleet(&redis, &["a", "b", "c"], &extra, 10);
    // Four messages from each node: each alone would let all four through (12 > 5).
    for n in &nodes {
        send(n, 4);
    }
    assert_eq!(settle(&nodes, 12), 5, "the fleet's cap is 5 a day");
    assert_eq!(mx.messages().len(), 5, "the fleet's cap is 5 a day");
}

#[test]
fn a_warmup_count_outlives_redis_restarting_empty() {
    let mut redis = Redis::start();
    let (_dns, mx, extra) = bigmail(Duration::ZERO, &warmup(6));
    let nodes = fleet(&redis, &["a", "b"], &extra, 10);
    send(&nodes[0], 4);
    assert_eq!(mx.wait_for(4, 30).len(), 4);
    // Redis comes back with nothing: a puts its 4 back as soon as it is reconnected.
    redis.stop();
    redis.restart();
    wait_until(
        20,
        || a_part(&redis) == Some(4),
        || format!("a's part in Redis: {:?}", a_part(&redis)),
    );
    // b, which sent nothing yet, gets the 2 left of the day's 6.
    send(&nodes[1], 4);
    assert_eq!(
        settle(&nodes, 8),
        6,
        "a's 4 before the restart and b's 2 after"
    );
    // And a, which did not send since, finds the cap reached too.
    send(&nodes[0], 4);
    assert_eq!(settle(&nodes, 12), 6, "the fleet's cap is 6 a day");
    assert_eq!(mx.messages().len(), 6, "the fleet's cap is 6 a day");
}

/// Node a's part of the warm-up count in Redis, if there is one.
fn a_part(redis: &Redis) -> Option<u64> {
    let keys = redis.cli(&["--scan", "--pattern", "baton:warm:*"]);
    let key = keys.lines().next()?;
    redis.cli(&["hget", key, "a"]).trim().parse().ok()
}
