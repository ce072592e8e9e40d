//! The HTTP API against a running server over real sockets: injection (parts with
//! substitutions, raw content, 10,000 recipients in one call) delivered to a fake MX, message
//! status, the queue summary and actions, events with pagination, errors and token checks,
//! and the OpenAPI description against the live routes.

mod common;

use std::net::Ipv4Addr;

use common::Server;
use common::http::{self, get, post};
use common::mx::Script;
use common::world::World;
use mail_parser::MessageParser;
use serde_json::json;

fn world_with_mx() -> (World, common::mx::FakeMx) {
    let w = World::new(&["127.0.0.2"]);
    w.dns.mx("dest.test", 10, "mx.dest.test");
    w.dns.a("mx.dest.test", "127.0.0.2");
    let mx = w.mx("127.0.0.2", Script::default());
    (w, mx)
}

#[test]
fn parts_with_substitutions_and_raw_content_are_delivered() {
    let (w, mx) = world_with_mx();
    let server = w.server("", "");
    let r = post(
        server.http,
        "/api/v1/inject",
        &json!({
            "envelope_sender": "news@sender.test",
            "content": {
                "from": "News <news@sender.test>",
                "subject": "Hello {{first_name}}",
                "text_body": "Dear {{ first_name }},\nyour code is {{code}}.\n",
                "html_body": "<p>Dear {{first_name}}</p>",
                "headers": {"X-Campaign-Id": "c42", "X-Mailer": "tests"}
            },
            "recipients": [
                {"email": "ann@dest.test", "substitutions": {"first_name": "Ann", "code": 1}},
                {"email": "bob@dest.test", "substitutions": {"first_name": "Bob\r\nBcc: eve@evil.test"}}
            ],
            "substitutions": {"code": "none"},
            "campaign": "winter"
        }),
    );
    assert_eq!(r.status, 202, "{}", r.body);
    let ids = r.json()["ids"].as_array().unwrap().clone();
    assert_eq!(ids.len(), 2, "one message per personalised recipient");

    let got = mx.wait_for(2, 30);
    assert_eq!(got.len(), 2, "log:\n{}", server.log());
    for m in &got {
        let parsed = MessageParser::default().parse(&m.body).unwrap();
        let text = parsed.body_text(0).unwrap().to_string();
        match m.rcpts.as_slice() {
            [r] if r == "ann@dest.test" => {
                assert_eq!(parsed.subject(), Some("Hello Ann"));
                assert!(text.contains("Dear Ann,\r\nyour code is 1."), "{text:?}");
            }
            [r] if r == "bob@dest.test" => {
                // A line break in a header substitution cannot add a header field.
                assert_eq!(parsed.subject(), Some("Hello Bob  Bcc: eve@evil.test"));
                assert!(parsed.header("Bcc").is_none());
                assert!(text.contains("your code is none."), "{text:?}");
            }
            other => panic!("unexpected recipients {other:?}"),
        }
        assert!(parsed.body_html(0).unwrap().contains("<p>Dear "));
        assert_eq!(
            parsed.header("X-Campaign-Id").and_then(|h| h.as_text()),
            Some("c42")
        );
        assert_eq!(
            parsed.header("X-Mailer").and_then(|h| h.as_text()),
            Some("tests")
        );
        assert!(parsed.message_id().is_some() && parsed.date().is_some());
        assert_eq!(m.mail_from, "news@sender.test");
    }

    // Raw content without placeholders: one message for every recipient.
    let r = post(
        server.http,
        "/api/v1/inject",
        &json!({
            "envelope_sender": "news@sender.test",
            "content": "From: news@sender.test\nSubject: raw\n\nplain text\n",
            "recipients": [{"email": "c@dest.test"}, {"email": "d@dest.test"}]
        }),
    );
    assert_eq!(r.status, 202, "{}", r.body);
    let ids = r.json()["ids"].as_array().unwrap().clone();
    assert_eq!(ids.len(), 1);
    let got = mx.wait_for(3, 30);
    let raw = got
        .iter()
        .find(|m| m.rcpts.len() == 2)
        .expect("one transaction, two rcpts");
    let body = String::from_utf8_lossy(&raw.body).to_string();
    assert!(
        body.contains("\r\nSubject: raw\r\n\r\nplain text\r\n"),
        "{body}"
    );
    assert!(
        body.starts_with("Received: from api ([127.0.0.1])"),
        "{body}"
    );

    // Its status once delivered (from the event log: it has left the queue).
    let id = ids[0].as_str().unwrap();
    let status = wait_for(|| {
        let s = get(server.http, &format!("/api/v1/messages/{id}")).json();
        let done = s["recipients"]
            .as_array()
            .is_some_and(|rs| rs.len() == 2 && rs.iter().all(|r| r["state"] == "delivered"));
        done.then_some(s)
    });
    assert_eq!(status["id"], id);
    let emails: Vec<&str> = status["recipients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["email"].as_str().unwrap())
        .collect();
    assert_eq!(emails, ["c@dest.test", "d@dest.test"]);

    // Events by campaign: both personalised messages' receptions and deliveries.
    let page = get(server.http, "/api/v1/events?campaign=winter&type=delivery").json();
    assert_eq!(page["events"].as_array().unwrap().len(), 2, "{page}");
}

fn wait_for<T>(mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(std::time::Instant::now() < deadline, "timed out");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[test]
fn ten_thousand_recipients_in_one_call() {
    let (w, mx) = world_with_mx();
    let server = w.server("max_recipients_per_transaction = 1000\n", "");
    let recipients: Vec<serde_json::Value> = (0..10_000)
        .map(|i| json!({"email": format!("r{i}@dest.test"), "substitutions": {"n": i}}))
        .collect();
    let r = post(
        server.http,
        "/api/v1/inject",
        &json!({
            "envelope_sender": "bulk@sender.test",
            "content": {"from": "bulk@sender.test", "subject": "number {{n}}", "text_body": "You are number {{n}}.\n"},
            "recipients": recipients,
        }),
    );
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(r.json()["ids"].as_array().unwrap().len(), 10_000);
    let got = mx.wait_for(10_000, 300);
    assert_eq!(got.len(), 10_000, "log:\n{}", server.log());
    let mut seen = vec![false; 10_000];
    for m in &got {
        let rcpt = &m.rcpts[0];
        let n: usize = rcpt[1..rcpt.find('@').unwrap()].parse().unwrap();
        let body = String::from_utf8_lossy(&m.body);
        assert!(
            body.contains(&format!("You are number {n}.")),
            "{rcpt}: {body}"
        );
        assert!(!seen[n], "{rcpt} twice");
        seen[n] = true;
    }
}

#[test]
fn queue_summary_actions_and_events_pagination() {
    let server = Server::start("[relay]\nlocal_domains = [\"local.test\"]\n");
    for (domain, n) in [("a.test", 3), ("b.test", 2)] {
        let recipients: Vec<_> = (0..n)
            .map(|i| json!({"email": format!("u{i}@{domain}")}))
            .collect();
        let r = post(
            server.http,
            "/api/v1/inject",
            &json!({"envelope_sender": "s@sender.test", "content": "Subject: x\r\n\r\ny\r\n", "recipients": recipients, "tenant": "acme"}),
        );
        assert_eq!(r.status, 202, "{}", r.body);
    }
    let summary = get(server.http, "/api/v1/queue").json();
    assert_eq!(summary["messages"], 2, "{summary}");
    assert_eq!(summary["recipients"]["queued"], 5, "{summary}");
    let dests = summary["destinations"].as_array().unwrap();
    let a = dests.iter().find(|d| d["destination"] == "a.test").unwrap();
    assert_eq!(a["queued"], 3);

    let r = post(
        server.http,
        "/api/v1/queue/suspend",
        &json!({"destination": "a.test", "seconds": 60}),
    );
    assert_eq!(
        (r.status, r.json()["ok"].clone()),
        (200, json!(true)),
        "{}",
        r.body
    );
    let r = post(
        server.http,
        "/api/v1/queue/resume",
        &json!({"destination": "a.test"}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let r = post(server.http, "/api/v1/queue/flush", &json!({}));
    assert_eq!(r.status, 200, "{}", r.body);
    let r = post(
        server.http,
        "/api/v1/queue/delete",
        &json!({"destination": "b.test"}),
    );
    assert_eq!(r.json()["deleted"], 2, "{}", r.body);
    // One message by its queue id (postsuper -d).
    let r = post(
        server.http,
        "/api/v1/inject",
        &json!({"envelope_sender": "s@sender.test", "content": "Subject: x\r\n\r\ny\r\n",
                "recipients": [{"email": "v0@c.test"}, {"email": "v1@c.test"}]}),
    );
    let id = r.json()["ids"][0].as_str().unwrap().to_string();
    let out = server.cli(&["queue", "delete", &id]);
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{said}");
    let said: serde_json::Value = serde_json::from_str(said.trim()).expect("JSON");
    assert_eq!(said["deleted"], 2, "{said}");
    let summary = get(server.http, "/api/v1/queue").json();
    assert_eq!(summary["recipients"]["queued"], 3, "{summary}");
    // Errors are 4xx with a JSON reason.
    let r = post(server.http, "/api/v1/queue/explode", &json!({}));
    assert_eq!(r.status, 404);
    assert!(r.json()["error"].as_str().unwrap().contains("explode"));
    let r = post(server.http, "/api/v1/queue/bounce", &json!({}));
    assert_eq!(r.status, 400);
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("needs a destination")
    );

    // Seven receptions: pages of two, oldest first.
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let path = match &after {
            None => "/api/v1/events?type=reception&limit=2".to_string(),
            Some(a) => format!("/api/v1/events?type=reception&limit=2&after={a}"),
        };
        let page = get(server.http, &path).json();
        for e in page["events"].as_array().unwrap() {
            for key in ["id", "type", "message_id", "recipient", "timestamp"] {
                assert!(e.get(key).is_some(), "{key} missing in {e}");
            }
            seen.push(e["recipient"].as_str().unwrap().to_string());
        }
        match page["next"].as_str() {
            Some(next) => after = Some(next.to_string()),
            None => break,
        }
    }
    assert_eq!(
        seen,
        [
            "u0@a.test",
            "u1@a.test",
            "u2@a.test",
            "u0@b.test",
            "u1@b.test",
            "v0@c.test",
            "v1@c.test",
        ]
    );
    let page = get(
        server.http,
        "/api/v1/events?type=deleted&recipient=U1@b.test",
    )
    .json();
    assert_eq!(page["events"].as_array().unwrap().len(), 1, "{page}");
    let r = get(server.http, "/api/v1/events?since=yesterday");
    assert_eq!(r.status, 400);
}

#[test]
fn bad_requests_get_clear_errors() {
    let server = Server::start("");
    let cases: Vec<(&str, &str, &[u8], u16, &str)> = vec![
        ("POST", "/api/v1/inject", b"{not json", 400, "bad JSON"),
        ("POST", "/api/v1/inject", br#"{"envelope_sender": "a@b.test", "content": "x", "recipients": []}"#, 400, "recipients is empty"),
        ("POST", "/api/v1/inject", br#"{"envelope_sender": "a@b.test", "content": "x", "recipients": [{"email": "not an address"}]}"#, 400, "recipients[0].email"),
        ("POST", "/api/v1/inject", br#"{"envelope_sender": "a@b.test", "content": "x", "recipients": [{"email": "c@d.test"}], "send_at": "soon"}"#, 400, "send_at"),
        ("POST", "/api/v1/inject", br#"{"envelope_sender": "a@b.test", "content": {"from": "a@b.test"}, "recipients": [{"email": "c@d.test"}]}"#, 400, "text_body or html_body"),
        ("POST", "/api/v1/inject", br#"{"envelope_sender": "a@b.test", "content": "x", "recipients": [{"email": "c@d.test"}], "pool": "nope"}"#, 400, "no [[pool]]"),
        ("GET", "/api/v1/messages/zzz", b"", 400, "not a message id"),
        ("GET", "/api/v1/messages/0000000000000001", b"", 404, "no message"),
        ("GET", "/api/v1/nothing", b"", 404, "no such route"),
    ];
    for (method, path, body, status, text) in cases {
        let body = (!body.is_empty()).then_some(body);
        let r = http::request(server.http, None, method, path, &[], body);
        assert_eq!(r.status, status, "{method} {path}: {}", r.body);
        let error = r.json()["error"].as_str().unwrap_or_default().to_string();
        assert!(
            error.contains(text),
            "{method} {path}: {error:?} lacks {text:?}"
        );
    }
    // One bad message among good ones refuses the whole call, and queues none of it.
    let r = post(
        server.http,
        "/api/v1/inject",
        &json!({"envelope_sender": "a@b.test",
        "content": {"from": "{{from}}", "text_body": "x"},
        "recipients": [
            {"email": "c@d.test", "substitutions": {"from": "ok@b.test"}},
            {"email": "e@d.test", "substitutions": {"from": "not an address"}}
        ]}),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("not an address")
    );
    assert!(
        server.queued_ids().is_empty(),
        "nothing queued behind a 400"
    );
}

#[test]
fn clients_outside_trusted_networks_need_a_token() {
    let token = "0123456789abcdef0123";
    let server = Server::start(&format!(
        "[http]\naddress = \"127.0.0.1:{}\"\ntrusted_networks = [\"127.0.0.1/32\"]\ntokens = [\"{token}\"]\n",
        common::free_port()
    ));
    let http_addr = server.http;
    let other = Some(Ipv4Addr::new(127, 0, 0, 2));
    let r = http::request(http_addr, other, "GET", "/api/v1/queue", &[], None);
    assert_eq!(r.status, 401, "{}", r.body);
    assert!(r.json()["error"].as_str().unwrap().contains("bearer token"));
    let wrong = [("Authorization", "Bearer not-the-token-at-all")];
    let r = http::request(http_addr, other, "GET", "/api/v1/queue", &wrong, None);
    assert_eq!(r.status, 401);
    let auth = format!("Bearer {token}");
    let right = [("Authorization", auth.as_str())];
    let r = http::request(http_addr, other, "GET", "/api/v1/queue", &right, None);
    assert_eq!(r.status, 200, "{}", r.body);
    let r = http::request(http_addr, None, "GET", "/api/v1/queue", &[], None);
    assert_eq!(r.status, 200, "trusted without a token");
}

#[test]
fn every_documented_route_answers() {
    let server = Server::start("");
    let spec = get(server.http, "/api/v1/openapi.json").json();
    let on_disk: serde_json::Value =
        serde_json::from_str(include_str!("../../../docs/openapi.json")).unwrap();
    assert_eq!(spec, on_disk, "the served description is docs/openapi.json");
    for (path, ops) in spec["paths"].as_object().unwrap() {
        for method in ops.as_object().unwrap().keys() {
            let concrete = path
                .replace("{id}", "0000000000000001")
                .replace("{action}", "flush");
            let body = (method == "post").then_some(b"{}".as_slice());
            let r = http::request(
                server.http,
                None,
                &method.to_uppercase(),
                &concrete,
                &[],
                body,
            );
            let text = r.body.clone();
            assert!(
                !text.contains("no such route") && r.status != 405,
                "{method} {path}: {} {text}",
                r.status
            );
            let wanted = match (path.as_str(), method.as_str()) {
                ("/metrics", _) => "text/plain",
                ("/", _) | ("/unsubscribe/{token}", "get") => "text/html",
                _ => "application/json",
            };
            assert!(
                r.headers.to_ascii_lowercase().contains(wanted),
                "{method} {path}"
            );
        }
    }
}

const PARSE_METRICS: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = []
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        out.append([s.name, s.labels, s.value])
print(json.dumps(out))
"#;

#[test]
fn metrics_parse_with_the_prometheus_client_parser() {
    let (_w, _mx, _dsn_mx, server) = settled_campaign();
    let text = get(server.http, "/metrics").body;
    let mut child = common::python()
        .args(["-c", PARSE_METRICS])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "prometheus_client could not parse (run the tests with scripts/test: it installs prometheus_client in target/peers/venv):\n{}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let samples: Vec<(String, serde_json::Value, f64)> =
        serde_json::from_slice(&out.stdout).unwrap();
    let value = |name: &str, labels: &[(&str, &str)]| -> f64 {
        samples
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).and_then(|x| x.as_str()) == Some(*v))
            })
            .map(|(_, _, v)| v)
            .sum()
    };
    assert_eq!(
        value("baton_messages_received_total", &[("origin", "http")]),
        1.0,
        "{text}"
    );
    assert_eq!(
        value("baton_recipients_received_total", &[("origin", "http")]),
        3.0
    );
    let delivered = [
        ("outcome", "delivered"),
        ("destination", "dest.test"),
        ("class", "2.0"),
    ];
    assert_eq!(value("baton_recipients_total", &delivered), 2.0, "{text}");
    let bounced = [
        ("outcome", "bounced"),
        ("destination", "dest.test"),
        ("class", "5.1"),
    ];
    assert_eq!(value("baton_recipients_total", &bounced), 1.0, "{text}");
    assert_eq!(value("baton_queue_recipients", &[]), 0.0, "{text}");
    assert_eq!(
        value(
            "baton_delivery_latency_seconds_count",
            &[("destination", "dest.test")]
        ),
        2.0
    );
    assert_eq!(value("baton_message_size_bytes_count", &[]), 1.0);
    assert!(
        samples
            .iter()
            .any(|(n, l, _)| n == "baton_connections" && l["direction"] == "outbound")
    );
}

/// One message to three recipients at dest.test, one refused (550 5.1.1), tagged campaign
/// "winter" and tenant "acme"; returns once every outcome and the DSN to the sender are in.
fn settled_campaign() -> (World, common::mx::FakeMx, common::mx::FakeMx, Server) {
    let (w, mx) = bouncing_world();
    let dsn_mx = w.sender_mx();
    let server = w.server("", "");
    let r = post(
        server.http,
        "/api/v1/inject",
        &json!({"envelope_sender": "s@sender.test", "content": "Subject: m\r\n\r\nx\r\n",
                "campaign": "winter", "tenant": "acme",
                "recipients": [{"email": "a@dest.test"}, {"email": "b@dest.test"}, {"email": "nobody@dest.test"}]}),
    );
    assert_eq!(r.status, 202, "{}", r.body);
    for (kind, rcpt) in [
        ("bounce", "nobody@dest.test"),
        ("delivery", "a@dest.test"),
        ("delivery", "b@dest.test"),
        // The bounce's DSN reaches the sender's MX: nothing waits any more.
        ("delivery", "s@sender.test"),
    ] {
        server.wait_event(30, |e| e["type"] == kind && e["recipient"] == rcpt);
    }
    (w, mx, dsn_mx, server)
}

/// dest.test's MX takes everyone but nobody@ (550 5.1.1).
fn bouncing_world() -> (World, common::mx::FakeMx) {
    let w = World::new(&["127.0.0.2"]);
    w.dns.mx("dest.test", 10, "mx.dest.test");
    w.dns.a("mx.dest.test", "127.0.0.2");
    let mx = w.mx(
        "127.0.0.2",
        Script {
            rcpt: std::sync::Arc::new(|rcpt: &str, _| {
                if rcpt.starts_with("nobody") {
                    "550 5.1.1 no such user".into()
                } else {
                    "250 2.1.5 ok".into()
                }
            }),
            ..Script::default()
        },
    );
    (w, mx)
}

#[test]
fn stats_by_campaign_through_the_api_and_the_cli() {
    let (_w, _mx, _dsn_mx, server) = settled_campaign();
    let stats = get(server.http, "/api/v1/stats?by=campaign&since=1h").json();
    let winter = stats["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["key"] == "winter")
        .unwrap_or_else(|| panic!("no winter group: {stats}"))
        .clone();
    assert_eq!(
        (winter["delivered"].clone(), winter["bounced"].clone()),
        (json!(2), json!(1)),
        "{stats}"
    );
    assert!((winter["bounce_rate"].as_f64().unwrap() - 1.0 / 3.0).abs() < 1e-9);
    assert!(winter["latency_ms"]["p50"].as_u64().is_some(), "{winter}");
    let by_tenant = get(server.http, "/api/v1/stats?by=tenant").json();
    assert!(
        by_tenant["groups"]
            .as_array()
            .unwrap()
            .iter()
            .any(|g| g["key"] == "acme" && g["delivered"] == 2)
    );
    assert_eq!(get(server.http, "/api/v1/stats?by=colour").status, 400);

    // The CLI asks the running server.
    let out = server.cli(&["stats", "--by", "campaign", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cli: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(cli["groups"], stats["groups"]);
    let out = server.cli(&["stats", "--by", "campaign"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("winter") && table.contains("TOTAL"),
        "{table}"
    );
    let out = server.cli(&["queue", "summary"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && table.contains("0 messages"),
        "{table}"
    );
    let out = server.cli(&["queue", "flush"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = server.cli(&["events", "tail", "--no-follow", "--type", "bounce"]);
    let lines = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(lines.lines().count(), 1, "{lines}");
    assert!(
        lines.contains(" bounce ") && lines.contains("nobody@dest.test") && lines.contains("5.1.1"),
        "{lines}"
    );
    let out = server.cli(&["events", "tail", "--no-follow", "-n", "2", "--json"]);
    let lines = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(lines.lines().count(), 2, "{lines}");
    for line in lines.lines() {
        serde_json::from_str::<serde_json::Value>(line).expect("JSON lines");
    }
}

#[test]
fn held_messages_wait_for_release_across_a_restart() {
    let (w, mx) = world_with_mx();
    let mut server = w.server("", "");
    // The destination waits (suspended) while one message is held.
    let r = post(
        server.http,
        "/api/v1/queue/suspend",
        &json!({"destination": "dest.test", "seconds": 3600}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let mut ids = Vec::new();
    for rcpt in ["kept@dest.test", "free@dest.test"] {
        let r = post(
            server.http,
            "/api/v1/inject",
            &json!({"envelope_sender": "s@sender.test", "content": "Subject: h\r\n\r\nx\r\n",
                    "recipients": [{"email": rcpt}]}),
        );
        assert_eq!(r.status, 202, "{}", r.body);
        ids.push(r.json()["ids"][0].as_str().unwrap().to_string());
    }
    // Both tried and parked by the suspension (a job already out with a worker is beyond
    // a hold's reach, as in Postfix).
    for rcpt in ["kept@dest.test", "free@dest.test"] {
        server.wait_event(10, |e| e["type"] == "held" && e["recipient"] == rcpt);
    }
    let r = post(server.http, "/api/v1/queue/hold", &json!({"id": ids[0]}));
    assert_eq!(r.json()["held"], 1, "{}", r.body);
    let r = post(server.http, "/api/v1/queue/hold", &json!({}));
    assert_eq!(r.status, 400);
    // A resume sends what waited for the destination, not what the operator holds.
    let r = post(
        server.http,
        "/api/v1/queue/resume",
        &json!({"destination": "dest.test"}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    server.wait_event(30, |e| {
        e["type"] == "delivery" && e["recipient"] == "free@dest.test"
    });
    let q = get(server.http, "/api/v1/queue").json();
    assert_eq!(q["recipients"]["held"], 1, "{q}\n{:#?}", server.events());

    server.kill9();
    server.spawn();
    post(server.http, "/api/v1/queue/flush", &json!({}));
    let out = server.cli(&["queue", "summary"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("1 held"),
        "still held after a restart: {table}"
    );
    assert_eq!(mx.messages().len(), 1);

    let out = server.cli(&["queue", "release", &ids[0]]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Released, it goes.
    server.wait_event(30, |e| {
        e["type"] == "delivery" && e["recipient"] == "kept@dest.test"
    });
    assert_eq!(mx.messages().len(), 2);
    let page = get(server.http, "/api/v1/events?type=operator").json();
    let said: Vec<&str> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["response"].as_str().unwrap())
        .collect();
    assert_eq!(said, ["held by the operator", "released by the operator"]);
}

#[test]
fn a_202_survives_kill_9() {
    let mut server = Server::start("");
    let recipients: Vec<_> = (0..500)
        .map(|i| json!({"email": format!("r{i}@remote.test"), "substitutions": {"n": i}}))
        .collect();
    let r = post(
        server.http,
        "/api/v1/inject",
        &json!({"envelope_sender": "s@sender.test",
                "content": {"from": "s@sender.test", "subject": "n={{n}}", "text_body": "{{n}}\n"},
                "recipients": recipients}),
    );
    assert_eq!(r.status, 202, "{}", r.body);
    let mut ids: Vec<String> = r.json()["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    // Killed at once: everything acknowledged is on disk.
    server.kill9();
    server.spawn();
    let mut queued = server.queued_ids();
    ids.sort();
    queued.sort();
    assert_eq!(queued, ids, "every message the 202 named, and no other");
    let body = String::from_utf8_lossy(&server.body(&ids[0])).to_string();
    assert!(body.contains("Subject: n="), "{body}");
}

#[test]
fn addresses_that_bounce_as_unknown_are_suppressed() {
    let (w, mx) = bouncing_world();
    let _dsn_mx = w.sender_mx();
    let server = w.server("", "");
    let inject = |rcpts: &[&str]| {
        let recipients: Vec<_> = rcpts.iter().map(|r| json!({"email": r})).collect();
        let r = post(
            server.http,
            "/api/v1/inject",
            &json!({"envelope_sender": "s@sender.test", "content": "Subject: s\r\n\r\nx\r\n", "recipients": recipients}),
        );
        assert_eq!(r.status, 202, "{}", r.body);
        r.json()
    };
    inject(&["nobody@dest.test"]);
    server.wait_event(30, |e| {
        e["type"] == "suppression" && e["recipient"] == "nobody@dest.test"
    });
    let list = get(server.http, "/api/v1/suppressions").json();
    assert_eq!(
        list["suppressions"][0]["email"], "nobody@dest.test",
        "{list}"
    );
    assert_eq!(
        list["suppressions"][0]["reason"], "invalid_recipient",
        "{list}"
    );
    assert_eq!(list["suppressions"][0]["scope"], "global", "{list}");
    assert!(
        list["suppressions"][0]["detail"]
            .as_str()
            .unwrap()
            .contains("5.1.1")
    );

    let answer = inject(&["nobody@dest.test", "a@dest.test"]);
    assert_eq!(
        answer["suppressed"],
        json!(["nobody@dest.test"]),
        "{answer}"
    );
    assert_eq!(answer["recipients"], 1);
    server.wait_event(30, |e| {
        e["type"] == "delivery" && e["recipient"] == "a@dest.test"
    });
    let tried: usize = mx
        .stats
        .lock()
        .unwrap()
        .rcpt_log
        .iter()
        .filter(|(r, _, _)| r == "nobody@dest.test")
        .count();
    assert_eq!(tried, 1, "the suppressed address was not tried again");
    let answer = inject(&["nobody@dest.test"]);
    assert_eq!(answer["ids"], json!([]));

    let r = http::request(
        server.http,
        None,
        "DELETE",
        "/api/v1/suppressions/Nobody@dest.test",
        &[],
        None,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let r = http::request(
        server.http,
        None,
        "DELETE",
        "/api/v1/suppressions/nobody@dest.test",
        &[],
        None,
    );
    assert_eq!(r.status, 404);
    let r = post(
        server.http,
        "/api/v1/suppressions",
        &json!({"email": "x@dest.test", "reason": "complaint"}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let r = post(
        server.http,
        "/api/v1/suppressions",
        &json!({"email": "x@dest.test"}),
    );
    assert_eq!(r.status, 200);
    let r = post(
        server.http,
        "/api/v1/suppressions",
        &json!({"email": "not an address"}),
    );
    assert_eq!(r.status, 400);
}

#[test]
fn history_samples_totals_every_five_seconds() {
    let server = Server::start("");
    let r = post(
        server.http,
        "/api/v1/inject",
        &json!({"envelope_sender": "s@sender.test", "content": "Subject: h\r\n\r\nx\r\n",
                "recipients": [{"email": "a@remote.test"}, {"email": "b@remote.test"}]}),
    );
    assert_eq!(r.status, 202);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let h = get(server.http, "/api/v1/history").json();
        assert_eq!(h["interval_s"], 5);
        let received = h["received"].as_array().unwrap();
        if received.last().and_then(|v| v.as_i64()) == Some(2) {
            assert_eq!(h["depth"].as_array().unwrap().last().unwrap(), 2, "{h}");
            assert_eq!(h["at_ms"].as_array().unwrap().len(), received.len());
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no sample with the injection: {h}"
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}
