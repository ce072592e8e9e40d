//! The NATS JetStream export ([nats]) against a real nats-server -js, read back with nats-py:
//! every event in Baton's log arrives in the stream, once, on `baton.events.<type>`, also
//! across a nats-server outage and a Baton crash (kill -9) and restart.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::Server;
use common::nats::{Nats, Stored};

const STREAM: &str = "BATON_EVENTS";

fn send(server: &Server, n: usize, tag: &str) {
    let mut c = server.connect();
    c.hello();
    for i in 0..n {
        let body = format!("Subject: {tag} {i}\r\n\r\nbody\r\n");
        let reply = c.send_mail("s@sender.test", &["r@far.test"], body.as_bytes());
        assert_eq!(reply.code, 250, "{}", reply.text());
    }
}

/// Waits until the stream holds every event of `server`'s log; returns the stream.
fn wait_all_exported(server: &Server, nats: &Nats, what: &str) -> Vec<Stored> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let logged: Vec<String> = server
            .events()
            .iter()
            .filter_map(|e| e["id"].as_str().map(str::to_string))
            .collect();
        let stored = nats.messages(STREAM).unwrap_or_default();
        let ids: Vec<&str> = stored
            .iter()
            .map(|m| m.event["id"].as_str().unwrap_or(""))
            .collect();
        if !logged.is_empty() && logged.iter().all(|id| ids.contains(&id.as_str())) {
            return stored;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {} of {} events in the stream\nlog:\n{}",
            ids.len(),
            logged.len(),
            server.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn every_event_reaches_jetstream_once_across_outages_and_restarts() {
    let mut nats = Nats::start();
    let mut server = Server::start(&format!("[nats]\nurl = \"{}\"\n", nats.url()));
    send(&server, 5, "first");
    wait_all_exported(&server, &nats, "while both run");

    // nats-server killed: mail is still taken; its events arrive once the server is back.
    nats.stop();
    send(&server, 5, "during the outage");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !server.log().contains("event export failed") {
        assert!(
            Instant::now() < deadline,
            "the failure is logged:\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    nats.restart();
    wait_all_exported(&server, &nats, "after nats-server came back");

    // Baton killed right after its events are logged, before it can know they were sent.
    send(&server, 5, "before the crash");
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.events().len() < 15 {
        assert!(Instant::now() < deadline, "15 receptions logged");
        std::thread::sleep(Duration::from_millis(10));
    }
    server.kill9();
    server.spawn();
    send(&server, 5, "after the restart");
    let stored = wait_all_exported(&server, &nats, "after Baton's restart");

    // Once each: the stream drops what a retry sends again (Nats-Msg-Id).
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for m in &stored {
        *seen.entry(m.msg_id.as_str()).or_default() += 1;
    }
    let repeated: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(repeated.is_empty(), "stored twice: {repeated:?}");
    let logged = server.events();
    assert_eq!(
        stored.len(),
        logged.len(),
        "the stream holds the log, no more"
    );
    for (m, e) in stored.iter().zip(&logged) {
        assert_eq!(&m.event, e, "the log's line, in the log's order");
        let kind = e["type"].as_str().unwrap_or_default();
        assert_eq!(m.subject, format!("baton.events.{kind}"));
        assert_eq!(m.node, "mx.test.example");
        assert_eq!(
            m.msg_id,
            format!("mx.test.example/{}", e["id"].as_str().unwrap_or_default())
        );
    }
    let receptions = logged.iter().filter(|e| e["type"] == "reception").count();
    assert_eq!(receptions, 20, "every message's reception");
}

#[test]
fn the_export_sends_only_the_chosen_types_to_its_own_subject_and_stream() {
    let nats = Nats::start();
    let server = Server::start(&format!(
        "[nats]\nurl = [\"{}\"]\nsubject = \"mail.out\"\nstream = \"MAIL\"\nevents = [\"operator\"]\n",
        nats.url()
    ));
    send(&server, 2, "x");
    let id = server.queued_ids()[0].clone();
    let out = server.cli(&["queue", "hold", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let stored = loop {
        if let Some(stored) = nats.messages("MAIL").filter(|s| !s.is_empty()) {
            break stored;
        }
        assert!(
            Instant::now() < deadline,
            "the operator event exported:\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    std::thread::sleep(Duration::from_millis(500));
    let stored = nats.messages("MAIL").unwrap_or(stored);
    assert_eq!(stored.len(), 1, "only the operator event: {stored:?}");
    assert_eq!(stored[0].subject, "mail.out.operator");
    assert_eq!(stored[0].event["message_id"], id.as_str());
}
