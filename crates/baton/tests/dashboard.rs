//! The live dashboard in headless Chromium (Debian's chromium driven by playwright-core from
//! tests-browser/) against a server under load: the charts must move, their y-axis labels must
//! be distinct (also for small values), the destinations table must fill, a bounce with a very
//! long reply must stay inside its card, nothing may be fetched from anywhere but Baton; a
//! screenshot is kept in the test outputs (target/tmp/dashboard.png).

mod common;

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::http::post;
use common::mx::Script;
use common::world::World;
use serde_json::json;

#[test]
fn dashboard_charts_move_under_load() {
    let browser_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests-browser");
    assert!(
        std::path::Path::new("/usr/bin/chromium").exists()
            && std::path::Path::new(browser_dir)
                .join("node_modules/playwright-core")
                .exists(),
        "needs Debian's chromium and playwright-core in tests-browser/node_modules: scripts/test installs both"
    );
    let w = World::new(&["127.0.0.2", "127.0.0.3"]);
    w.dns.mx("dest.test", 10, "mx.dest.test");
    w.dns.a("mx.dest.test", "127.0.0.2");
    w.dns.mx("refuse.test", 10, "mx.refuse.test");
    w.dns.a("mx.refuse.test", "127.0.0.3");
    // A slow MX keeps a queue standing while mail flows.
    let _mx = w.mx(
        "127.0.0.2",
        Script {
            data_delay: Duration::from_millis(600),
            ..Script::default()
        },
    );
    // An MX that refuses with a 600-character reply, one unbroken token as in a long URL.
    let long_reply = format!(
        "550 5.7.1 Refused, see https://refuse.test/why?{}",
        "z".repeat(560)
    );
    let _refusing_mx = w.mx(
        "127.0.0.3",
        Script {
            rcpt: Arc::new(move |_, _| long_reply.clone()),
            ..Script::default()
        },
    );
    let server = w.server("max_connections_per_destination = 1\n", "");
    let r = post(
        server.http,
        "/api/v1/inject",
        &json!({"envelope_sender": "look@sender.test", "content": "Subject: refused\r\n\r\nx\r\n",
                "recipients": [{"email": "long-reply@refuse.test"}]}),
    );
    assert_eq!(r.status, 202, "{}", r.body);
    // A message to look up on the page.
    let r = post(
        server.http,
        "/api/v1/inject",
        &json!({"envelope_sender": "look@sender.test", "content": "Subject: find me\r\n\r\nx\r\n",
                "recipients": [{"email": "findme@dest.test"}]}),
    );
    let wanted = r.json()["ids"][0].as_str().unwrap().to_string();
    let running = Arc::new(AtomicBool::new(true));
    let load = {
        let (running, http) = (running.clone(), server.http);
        std::thread::spawn(move || {
            let mut n = 0;
            while running.load(Ordering::SeqCst) {
                let recipients: Vec<_> = (0..20)
                    .map(|i| json!({"email": format!("u{n}-{i}@dest.test")}))
                    .collect();
                let r = post(
                    http,
                    "/api/v1/inject",
                    &json!({"envelope_sender": "load@sender.test", "content": "Subject: load\r\n\r\nx\r\n", "recipients": recipients}),
                );
                assert_eq!(r.status, 202, "{}", r.body);
                n += 1;
                std::thread::sleep(Duration::from_millis(250));
            }
        })
    };
    let screenshot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    let out = Command::new("node")
        .current_dir(browser_dir)
        .args(["dashboard.mjs", &format!("http://{}/", server.http)])
        .arg(&screenshot)
        .arg("8")
        .arg(&wanted)
        .output()
        .expect("node");
    running.store(false, Ordering::SeqCst);
    load.join().unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let series = |name: &str| -> Vec<f64> {
        seen["state"][name]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect()
    };
    let received = series("received");
    assert!(
        received.last() > received.first(),
        "received rises: {received:?}"
    );
    assert!(
        series("rate").iter().any(|&r| r > 0.0),
        "throughput chart moves: {seen}"
    );
    assert!(
        series("depth").iter().any(|&d| d > 0.0),
        "queue depth chart moves: {seen}"
    );
    let rows = seen["destinations"].as_array().unwrap();
    assert!(
        rows.iter()
            .any(|r| r.as_str().unwrap().contains("dest.test")),
        "{seen}"
    );
    assert!(
        seen["status"].as_str().unwrap().starts_with("live"),
        "{seen}"
    );
    assert_eq!(seen["foreign"], json!([]), "assets are Baton's own");
    assert_eq!(
        seen["clusterHidden"], true,
        "a single node shows no cluster section"
    );
    assert_eq!(seen["lookup"]["id"], wanted.as_str(), "{seen}");
    assert_eq!(seen["lookup"]["recipients"][0]["email"], "findme@dest.test");
    assert!(std::fs::metadata(&screenshot).unwrap().len() > 10_000);

    // Every frame of both charts, and frames drawn with small series: distinct labels, 0 at
    // the bottom, whole numbers reaching the largest value; 0 and 1 for a largest value of 0
    // or 1.
    let labels = |frame: &serde_json::Value| -> Vec<String> {
        frame
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l.as_str().unwrap().to_string())
            .collect()
    };
    for chart in ["depth-chart", "rate-chart"] {
        let frames = seen["axes"][chart].as_array().unwrap();
        assert!(frames.len() >= 8, "{chart}: {frames:?}");
        for frame in frames {
            let labels = labels(frame);
            let distinct: std::collections::BTreeSet<_> = labels.iter().collect();
            assert!(
                labels.len() >= 2 && distinct.len() == labels.len(),
                "{chart} y-axis labels repeat: {labels:?}"
            );
            assert!(labels.iter().any(|l| l == "0"), "{chart}: {labels:?}");
        }
    }
    for drawn in seen["small"].as_array().unwrap() {
        let max = drawn["series"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .fold(0.0, f64::max);
        let mut ticks: Vec<f64> = labels(&drawn["labels"])
            .iter()
            .map(|l| l.parse().unwrap())
            .collect();
        ticks.sort_by(f64::total_cmp);
        let distinct = ticks.windows(2).all(|p| p[0] < p[1]);
        assert!(
            distinct && ticks[0] == 0.0 && ticks.iter().all(|t| t.fract() == 0.0),
            "labels for {drawn}: distinct whole numbers from 0"
        );
        assert!(*ticks.last().unwrap() >= max, "{drawn}");
        if max <= 1.0 {
            assert_eq!(ticks, [0.0, 1.0], "{drawn}");
        }
    }

    // The bounce with its 600-character reply is listed, and its card keeps to its column.
    let b = &seen["bounces"];
    assert!(
        b["rows"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r.as_str().unwrap().contains("long-reply@refuse.test")),
        "{b}"
    );
    assert!(
        b["longest"].as_f64().unwrap() >= 580.0,
        "the whole reply is there: {b}"
    );
    let num = |v: &serde_json::Value| v.as_f64().unwrap();
    assert!(
        num(&b["card"]["scrollWidth"]) <= num(&b["card"]["clientWidth"]),
        "the reply overflows the bounces card: {b}"
    );
    assert!(
        num(&b["card"]["width"]) <= num(&b["neighbour"]) + 1.0
            && num(&b["table"]) <= num(&b["card"]["width"]),
        "the bounces card is wider than its column: {b}"
    );
    assert!(
        num(&b["page"]["scrollWidth"]) <= num(&b["page"]["clientWidth"]),
        "the page scrolls sideways: {b}"
    );

    // The refusal is counted under its class, and listed with it.
    let classes = seen["classes"].as_array().unwrap();
    assert!(
        classes
            .iter()
            .any(|r| r.as_str().unwrap().starts_with("other_policy")),
        "{classes:?}"
    );
    assert!(
        b["rows"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r.as_str().unwrap().contains("other_policy")),
        "{b}"
    );
}
