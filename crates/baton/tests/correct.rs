//! Baton's promises in their corners (issue "Correct"): every failure reported, nothing
//! acknowledged lost, scheduled mail sent on time, the envelope relayed as received. Each
//! test was written to fail on the code before its fix.

mod common;

use common::Server;
use common::http::get;
use common::mx::Script;
use common::world::{World, destination, event_for, send};

fn suppressed(server: &Server) -> Vec<String> {
    get(server.http, "/api/v1/suppressions").json()["suppressions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["email"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn a_refused_sender_suppresses_no_recipient() {
    let (w, _mx) = destination(
        "strict.test",
        Script {
            mail_reply: "553 5.1.8 sender domain does not exist".into(),
            ..Script::default()
        },
    );
    let server = w.server("", "");
    send(
        &server,
        &["a@strict.test", "b@strict.test"],
        b"Subject: s\r\n\r\nhi\r\n",
    );
    for rcpt in ["a@strict.test", "b@strict.test"] {
        let e = server.wait_event(15, event_for("bounce", rcpt));
        assert_eq!(e["status"], "5.1.8", "{e}");
    }
    assert_eq!(
        suppressed(&server),
        Vec::<String>::new(),
        "the sender was refused, not them"
    );
    // A recipient's own refusal still suppresses it.
    let (w, _mx) = destination(
        "gone.test",
        Script {
            rcpt: std::sync::Arc::new(|_, _| "550 5.1.1 no such user".into()),
            ..Script::default()
        },
    );
    let server = w.server("", "");
    send(&server, &["x@gone.test"], b"Subject: s\r\n\r\nhi\r\n");
    server.wait_event(15, event_for("suppression", "x@gone.test"));
    assert_eq!(suppressed(&server), ["x@gone.test"]);
}

#[test]
fn the_bare_postmaster_is_delivered_here() {
    let server = Server::start_delivering("");
    let mut c = server.connect();
    c.hello();
    assert_eq!(c.cmd("MAIL FROM:<a@example.org>").code, 250);
    assert_eq!(c.cmd("RCPT TO:<Postmaster>").code, 250);
    assert_eq!(c.cmd("DATA").code, 354);
    c.send(b"Subject: to the postmaster\r\n\r\nhi\r\n.\r\n");
    assert_eq!(c.reply().code, 250);
    let e = server.wait_event(15, |e| e["type"] == "delivery");
    assert_eq!(e["recipient"], "postmaster@mx.test.example", "{e}");
    let new = server.data_dir().join("mail/postmaster/new");
    assert_eq!(
        std::fs::read_dir(&new).unwrap().count(),
        1,
        "in {}",
        new.display()
    );
}

#[test]
fn quoted_local_parts_are_relayed_as_received() {
    let (w, mx) = destination("q.test", Script::default());
    let server = w.server("", "");
    let mut c = server.connect();
    c.hello();
    assert_eq!(c.cmd("MAIL FROM:<alice@sender.test>").code, 250);
    for rcpt in ["\"john smith\"@q.test", "\"a@x\"@q.test", "plain@q.test"] {
        let r = c.cmd(&format!("RCPT TO:<{rcpt}>"));
        assert_eq!(r.code, 250, "{rcpt}: {r:?}");
    }
    assert_eq!(c.cmd("DATA").code, 354);
    c.send(b"Subject: q\r\n\r\nhi\r\n.\r\n");
    assert_eq!(c.reply().code, 250);
    let got = mx.wait_for(1, 15);
    assert_eq!(got.len(), 1);
    assert_eq!(
        got[0].rcpt_lines,
        [
            "RCPT TO:<\"john smith\"@q.test>",
            "RCPT TO:<\"a@x\"@q.test>",
            "RCPT TO:<plain@q.test>"
        ]
    );
}

#[test]
fn a_suspension_stops_a_connection_already_open() {
    let (w, mx) = destination("open.test", Script::default());
    // Connections stay open (idle) for 30 s after their last message.
    let server = Server::start_delivering(&format!(
        "{}\n[delivery]\nsmtp_port = {}\nidle_timeout = \"30s\"\nretry_min = \"1s\"\n",
        w.dns.config(),
        w.port
    ));
    send(&server, &["first@open.test"], b"Subject: 1\r\n\r\nhi\r\n");
    assert_eq!(mx.wait_for(1, 15).len(), 1);
    let out = server.cli(&["suspend", "open.test", "--for", "1h"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for i in 0..5 {
        send(
            &server,
            &[&*format!("r{i}@open.test")],
            b"Subject: n\r\n\r\nhi\r\n",
        );
    }
    let held = server.wait_event(15, event_for("held", "r4@open.test"));
    assert!(
        held["response"]
            .as_str()
            .unwrap()
            .contains("suspended by the operator"),
        "{held}"
    );
    std::thread::sleep(std::time::Duration::from_secs(1));
    assert_eq!(
        mx.messages().len(),
        1,
        "nothing went out over the open connection"
    );
    assert_eq!(mx.connections(), 1);
}

#[test]
fn operator_actions_never_send_scheduled_mail_early() {
    let (w, mx) = destination("sched.test", Script::default());
    let server = w.server(
        "",
        "[[source]]\nname = \"ip10\"\naddress = \"127.0.0.10\"\n\
         [[pool]]\nname = \"x\"\nsources = [\"ip10\"]\nsender_domains = [\"other.test\"]\n",
    );
    let at = jiff::Timestamp::now() + jiff::SignedDuration::from_hours(1);
    let body =
        format!("X-Baton-Send-At: {at}\r\nX-Baton-Tenant: acme\r\nSubject: later\r\n\r\nhi\r\n");
    let id = send(&server, &["r@sched.test"], body.as_bytes());
    let act = |action: &str, body: serde_json::Value| {
        let r = common::http::post(server.http, &format!("/api/v1/queue/{action}"), &body);
        assert_eq!(r.status, 200, "{action}: {}", r.body);
    };
    act("resume", serde_json::json!({"destination": "tenant:acme"}));
    act("resume", serde_json::json!({"destination": "pool:x"}));
    act("resume", serde_json::json!({"destination": "sched.test"}));
    act("flush", serde_json::json!({}));
    act("hold", serde_json::json!({"id": id}));
    act("release", serde_json::json!({"id": id}));
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert!(mx.messages().is_empty(), "sent before its time");
    let status = get(server.http, &format!("/api/v1/messages/{id}")).json();
    let next = status["recipients"][0]["next_attempt_ms"].as_i64().unwrap();
    assert_eq!(next, at.as_millisecond(), "{status}");
}

/// Posts an inject call over a raw socket and hangs up `after` the request went out, without
/// reading the answer.
fn inject_and_hang_up(server: &Server, body: &serde_json::Value, after: std::time::Duration) {
    use std::io::Write;
    let body = body.to_string();
    let mut s = std::net::TcpStream::connect(server.http).unwrap();
    let head = format!(
        "POST /api/v1/inject HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body.as_bytes()).unwrap();
    std::thread::sleep(after);
    let _ = s.shutdown(std::net::Shutdown::Both);
}

#[test]
fn a_caller_that_hangs_up_strands_no_message() {
    let server = Server::start("");
    // Personalised messages over 256 KiB: each body is a file of its own.
    let text = format!("Hello {{{{email}}}}\r\n{}\r\n", "z".repeat(300 << 10));
    let recipients: Vec<_> = (0..120)
        .map(|i| serde_json::json!({"email": format!("r{i}@example.net")}))
        .collect();
    let call = serde_json::json!({
        "envelope_sender": "a@example.org",
        "content": format!("From: a@example.org\r\nSubject: s\r\n\r\n{text}"),
        "recipients": recipients,
    });
    for ms in [30, 100, 300, 600, 1000] {
        inject_and_hang_up(&server, &call, std::time::Duration::from_millis(ms));
    }
    std::thread::sleep(std::time::Duration::from_secs(4));
    // Every message on disk is known to the running server, with its body.
    let ids = server.queued_ids();
    for id in &ids {
        let r = get(server.http, &format!("/api/v1/messages/{id}"));
        assert_eq!(
            r.status, 200,
            "{id} is on disk but unknown to the server: {}",
            r.body
        );
        let body = server.body(id);
        assert!(body.len() > 300 << 10, "{id}: body of {} bytes", body.len());
    }
    eprintln!(
        "{} messages queued by calls whose callers hung up",
        ids.len()
    );
}

#[test]
fn a_failure_notice_survives_a_crash_while_another_destination_is_slow() {
    let w = World::new(&["127.0.0.2", "127.0.0.3"]);
    w.dns.mx("fast.test", 10, "mx.fast.test");
    w.dns.a("mx.fast.test", "127.0.0.2");
    w.dns.mx("slow.test", 10, "mx.slow.test");
    w.dns.a("mx.slow.test", "127.0.0.3");
    let _fast = w.mx(
        "127.0.0.2",
        Script {
            rcpt: std::sync::Arc::new(|_, _| "550 5.1.1 no such user".into()),
            ..Script::default()
        },
    );
    let _slow = w.mx(
        "127.0.0.3",
        Script {
            data_delay: std::time::Duration::from_secs(8),
            ..Script::default()
        },
    );
    let sender_mx = w.sender_mx();
    let mut server = w.server("", "");
    send(
        &server,
        &["a@fast.test", "b@slow.test"],
        b"Subject: two\r\n\r\nhi\r\n",
    );
    // A is refused while B's server still holds the data: crash now.
    server.wait_event(15, event_for("bounce", "a@fast.test"));
    server.kill9();
    server.spawn();
    let dsns = sender_mx.wait_for(1, 20);
    assert_eq!(
        dsns.len(),
        1,
        "the failure notice for a@fast.test\n{}",
        server.log()
    );
    let text = String::from_utf8_lossy(&dsns[0].body);
    assert!(
        text.contains("Final-Recipient: rfc822; a@fast.test"),
        "{text}"
    );
}

#[test]
fn a_big_message_to_a_slow_chunking_server_is_timed_per_block() {
    let (w, mx) = destination(
        "slowread.test",
        Script {
            capabilities: vec![
                "PIPELINING".into(),
                "CHUNKING".into(),
                "SIZE 100000000".into(),
            ],
            read_pace: std::time::Duration::from_millis(4),
            ..Script::default()
        },
    );
    // Each 1 MiB block may take 2 s; the whole 20 MB takes about 10 s at ~2 MB/s.
    let server = Server::start_delivering(&format!(
        "{}\n[delivery]\nsmtp_port = {}\ndata_timeout = \"2s\"\nretry_min = \"1h\"\n",
        w.dns.config(),
        w.port
    ));
    let mut body = b"Subject: big\r\n\r\n".to_vec();
    for _ in 0..(20 << 20) / 80 {
        body.extend_from_slice(&[b'x'; 78]);
        body.extend_from_slice(b"\r\n");
    }
    send(&server, &["big@slowread.test"], &body);
    let e = server.wait_event(60, |e| {
        e["recipient"] == "big@slowread.test" && e["type"] != "reception"
    });
    assert_eq!(e["type"], "delivery", "{e}");
    assert_eq!(e["attempt"], 1);
    let got = mx.messages();
    assert!(got[0].via_bdat && got[0].body.len() > 20 << 20);
}

#[test]
fn a_pipelined_data_after_every_rcpt_was_refused_sends_no_message() {
    let (w, mx) = destination(
        "nobody.test",
        Script {
            rcpt: std::sync::Arc::new(|_, _| "550 5.1.1 no such user".into()),
            data_without_rcpts: true,
            ..Script::default()
        },
    );
    let server = w.server("", "");
    send(
        &server,
        &["x@nobody.test", "y@nobody.test"],
        b"Subject: s\r\n\r\nsecret body\r\n",
    );
    server.wait_event(15, event_for("bounce", "y@nobody.test"));
    let orphans = mx.stats.lock().unwrap().orphan_data.clone();
    assert_eq!(orphans, [0], "only the end of data, never the message");
}

#[test]
fn the_message_is_fitted_to_what_the_next_hop_offers() {
    let w = World::new(&["127.0.0.2"]);
    w.dns.mx("old.test", 10, "mx.old.test");
    w.dns.a("mx.old.test", "127.0.0.2");
    // A server with neither SMTPUTF8 nor 8BITMIME.
    let mx = w.mx(
        "127.0.0.2",
        Script {
            capabilities: vec!["PIPELINING".into(), "ENHANCEDSTATUSCODES".into()],
            ..Script::default()
        },
    );
    let _dsn_mx = w.sender_mx();
    let server = w.server("", "");
    let mut c = server.connect();
    c.hello();
    // Flagged SMTPUTF8, but all ASCII: it goes, without the flag.
    assert_eq!(c.cmd("MAIL FROM:<alice@sender.test> SMTPUTF8").code, 250);
    assert_eq!(c.cmd("RCPT TO:<ascii@old.test>").code, 250);
    assert_eq!(c.cmd("DATA").code, 354);
    // And a line of 2,500 octets is broken to fit RFC 5322's 998.
    let long = "a".repeat(2500);
    c.send(format!("Subject: plain\r\n\r\n{long}\r\n.\r\n").as_bytes());
    assert_eq!(c.reply().code, 250);
    // 8-bit content to a server without 8BITMIME: refused with 5.6.3, not sent as it is.
    let r = c.send_mail(
        "alice@sender.test",
        &["eight@old.test"],
        "Subject: x\r\n\r\ncaf\u{e9}\r\n".as_bytes(),
    );
    assert_eq!(r.code, 250);
    let e = server.wait_event(15, event_for("bounce", "eight@old.test"));
    assert_eq!(e["status"], "5.6.3", "{e}");
    server.wait_event(15, event_for("delivery", "ascii@old.test"));
    let got = mx.messages();
    assert_eq!(got.len(), 1);
    assert!(
        !got[0].mail_line.contains("SMTPUTF8"),
        "{}",
        got[0].mail_line
    );
    let body = String::from_utf8_lossy(&got[0].body).to_string();
    assert!(
        body.lines().all(|l| l.trim_end_matches('\r').len() <= 998),
        "a line over 998"
    );
    assert!(
        body.replace("\r\n ", "")
            .contains(&format!("\r\n{long}\r\n")),
        "the long line comes back whole once its breaks are undone"
    );
}

#[test]
fn warm_up_counts_recipients_and_survives_a_restart() {
    let (w, mx) = destination("inbox.test", Script::default());
    let today = jiff::Timestamp::now()
        .to_zoned(jiff::tz::TimeZone::UTC)
        .date();
    let mut server = w.server(
        "",
        &format!(
            "[[source]]\nname = \"ip10\"\naddress = \"127.0.0.10\"\nwarmup = [2]\nwarmup_start = \"{today}\"\n\
             [[pool]]\nname = \"new\"\nsources = [\"ip10\"]\nsender_domains = [\"sender.test\"]\n"
        ),
    );
    // One transaction to two recipients uses the day's cap of two.
    send(
        &server,
        &["u1@inbox.test", "u2@inbox.test"],
        b"Subject: 1\r\n\r\nhi\r\n",
    );
    assert_eq!(mx.wait_for(1, 15).len(), 1);
    send(&server, &["u3@inbox.test"], b"Subject: 2\r\n\r\nhi\r\n");
    let held = server.wait_event(15, event_for("held", "u3@inbox.test"));
    assert!(
        held["response"].as_str().unwrap().contains("warm-up cap"),
        "{held}"
    );
    // A crash does not hand the IP a fresh allowance.
    server.kill9();
    server.spawn();
    send(&server, &["u4@inbox.test"], b"Subject: 3\r\n\r\nhi\r\n");
    server.wait_event(15, event_for("held", "u4@inbox.test"));
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(mx.messages().len(), 1, "nothing past the cap");
}

#[test]
fn a_burst_is_spread_over_the_allowed_connections_and_none_waits_for_a_slot() {
    let (w, mx) = destination(
        "burst.test",
        Script {
            data_delay: std::time::Duration::from_millis(30),
            ..Script::default()
        },
    );
    let server = w.server(
        "",
        "[[shaping]]\ndomain = \"burst.test\"\nmax_connections = 4\n",
    );
    let recipients: Vec<_> = (0..120)
        .map(|i| serde_json::json!({"email": format!("r{i}@burst.test")}))
        .collect();
    let r = common::http::post(
        server.http,
        "/api/v1/inject",
        &serde_json::json!({
            "envelope_sender": "alice@sender.test",
            "content": "From: alice@sender.test\r\nSubject: {{email}}\r\n\r\nhi\r\n",
            "recipients": recipients,
        }),
    );
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(mx.wait_for(120, 60).len(), 120);
    // Four connections at most at once, and about four in all: no job waited, on a worker of
    // its own, for a slot that an idle connection held (each such job opened a connection).
    assert!(mx.max_active() <= 4, "{} at once", mx.max_active());
    assert!(
        mx.connections() <= 6,
        "{} connections for 120 messages under a cap of 4",
        mx.connections()
    );
    assert!(
        mx.max_active() >= 2,
        "spread over connections: {}",
        mx.max_active()
    );
}

#[test]
fn a_source_at_its_warm_up_cap_leaves_the_rest_to_the_pool() {
    let (w, mx) = destination("inbox.test", Script::default());
    let today = jiff::Timestamp::now()
        .to_zoned(jiff::tz::TimeZone::UTC)
        .date();
    // ip10 (nearly always picked first) may send one recipient today; ip11 a hundred.
    let server = w.server(
        "",
        &format!(
            "[[source]]\nname = \"ip10\"\naddress = \"127.0.0.10\"\nwarmup = [1]\nwarmup_start = \"{today}\"\n\
             [[source]]\nname = \"ip11\"\naddress = \"127.0.0.11\"\nwarmup = [100]\nwarmup_start = \"{today}\"\n\
             [[pool]]\nname = \"p\"\nsources = [\"ip10\", \"ip11\"]\nweights = [100000, 1]\nsender_domains = [\"sender.test\"]\n"
        ),
    );
    for i in 0..4 {
        send(
            &server,
            &[&*format!("u{i}@inbox.test")],
            b"Subject: w\r\n\r\nhi\r\n",
        );
    }
    let got = mx.wait_for(4, 20);
    assert_eq!(
        got.len(),
        4,
        "all sent, by whichever source had room\n{}",
        server.log()
    );
    let from_ip10 = got
        .iter()
        .filter(|m| m.peer.to_string() == "127.0.0.10")
        .count();
    assert!(from_ip10 <= 1, "ip10 kept to its cap: {from_ip10}");
}
