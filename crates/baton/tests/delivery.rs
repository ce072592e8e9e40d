//! Delivery end to end: a real DNS server and fake MX hosts on 127.0.0.x, Baton resolving,
//! connecting, retrying and bouncing for real.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::mx::Script;
use common::strip_received;
use common::world::{World, event_for, send};
use mail_parser::MimeHeaders;

#[test]
fn mx_preference_failover_and_byte_exact_body() {
    let w = World::new(&["127.0.0.2", "127.0.0.3"]);
    // mx1 (preference 10) refuses connections: nothing listens on 127.0.0.4.
    w.dns.mx("dest.test", 10, "mx1.dest.test");
    w.dns.a("mx1.dest.test", "127.0.0.4");
    // mx2 (20) greets with 421; mx3 (30) takes the mail.
    w.dns.mx("dest.test", 20, "mx2.dest.test");
    w.dns.a("mx2.dest.test", "127.0.0.2");
    w.dns.mx("dest.test", 30, "mx3.dest.test");
    w.dns.a("mx3.dest.test", "127.0.0.3");
    let busy = w.mx(
        "127.0.0.2",
        Script {
            greeting: "421 4.7.0 too busy".into(),
            ..Script::default()
        },
    );
    let good = w.mx("127.0.0.3", Script::default());
    // Lines as long as 4,000 octets go as stored only with line breaking off.
    let server = w.server("line_length_limit = 0", "");
    let mut body = b"Subject: exact\r\n\r\n.leading dot\r\n..two\r\n".to_vec();
    body.extend((0x80u8..=0xff).cycle().take(1500));
    body.extend_from_slice(b"\r\n");
    body.extend(std::iter::repeat_n(b'y', 4000));
    body.extend_from_slice(b"\r\n.\r\nend\r\n");
    let id = send(&server, &["bob@dest.test"], &body);
    let got = good.wait_for(1, 20);
    assert_eq!(got.len(), 1, "log:\n{}", server.log());
    assert_eq!(got[0].mail_from, "alice@sender.test");
    assert_eq!(got[0].rcpts, vec!["bob@dest.test"]);
    assert!(
        !got[0].via_bdat,
        "this fake MX offers no CHUNKING: DATA it is"
    );
    assert_eq!(strip_received(&got[0].body), body.as_slice());
    assert!(busy.connections() >= 1, "the 421 host was tried");
    let e = server.wait_event(10, event_for("delivery", "bob@dest.test"));
    assert_eq!(e["message_id"], id.as_str());
    assert!(
        e["remote_mta"]
            .as_str()
            .unwrap()
            .starts_with("mx3.dest.test")
    );
    // Delivered: the message leaves the spool.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !server.queued_ids().is_empty() {
        assert!(std::time::Instant::now() < deadline, "message not removed");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn bdat_when_offered_and_a_record_fallback() {
    let w = World::new(&["127.0.0.2"]);
    // No MX for plain.test: its A record is the implicit MX.
    w.dns.a("plain.test", "127.0.0.2");
    let mut script = Script::default();
    script.capabilities.push("CHUNKING".into());
    let mx = w.mx("127.0.0.2", script);
    let server = w.server("", "");
    let body = b"Subject: chunked\r\n\r\n.dot stays\r\n\xe9t\xe9\r\n".to_vec();
    send(&server, &["carol@plain.test"], &body);
    let got = mx.wait_for(1, 20);
    assert_eq!(got.len(), 1, "log:\n{}", server.log());
    assert!(got[0].via_bdat);
    assert_eq!(strip_received(&got[0].body), body.as_slice());
}

#[test]
fn smarthost_route_takes_everything() {
    let w = World::new(&["127.0.0.6"]);
    let relay = w.mx("127.0.0.6", Script::default());
    let server = w.server(
        "",
        &format!(
            "[[route]]\ndomain = \"*\"\nsmarthost = \"127.0.0.6:{}\"\n",
            w.port
        ),
    );
    send(
        &server,
        &["x@anywhere.test", "y@elsewhere.test"],
        b"Subject: s\r\n\r\nhi\r\n",
    );
    let got = relay.wait_for(1, 20);
    assert_eq!(got.len(), 1, "log:\n{}", server.log());
    assert_eq!(
        got[0].rcpts.len(),
        2,
        "one transaction for both domains via the smarthost"
    );
    assert_eq!(
        w.dns.queries.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "no MX lookups"
    );
}

#[test]
fn null_mx_and_nxdomain_bounce_with_a_dsn() {
    let w = World::new(&[]);
    w.dns.null_mx("nomail.test");
    let sender_mx = w.sender_mx();
    let server = w.server("", "");
    send(
        &server,
        &["a@nomail.test"],
        b"Subject: to null mx\r\n\r\nhi\r\n",
    );
    send(
        &server,
        &["b@nonexistent.test"],
        b"Subject: to nxdomain\r\n\r\nhi\r\n",
    );
    let e = server.wait_event(20, event_for("bounce", "a@nomail.test"));
    assert_eq!(e["status"], "5.1.10");
    let e = server.wait_event(20, event_for("bounce", "b@nonexistent.test"));
    assert_eq!(e["status"], "5.1.2");
    let dsns = sender_mx.wait_for(2, 20);
    assert_eq!(dsns.len(), 2, "log:\n{}", server.log());
    for dsn in &dsns {
        assert_eq!(dsn.mail_from, "", "DSNs go out with a null reverse-path");
        assert_eq!(dsn.rcpts, vec!["alice@sender.test"]);
    }
    let all = String::from_utf8_lossy(&dsns[0].body).to_string()
        + &String::from_utf8_lossy(&dsns[1].body);
    assert!(all.contains("Status: 5.1.10"), "{all}");
    assert!(all.contains("Status: 5.1.2"), "{all}");
}

#[test]
fn servfail_defers_and_keeps_the_message() {
    let w = World::new(&[]);
    w.dns.servfail("flaky.test");
    let server = w.server("", "");
    let id = send(&server, &["c@flaky.test"], b"Subject: x\r\n\r\nhi\r\n");
    let e = server.wait_event(20, event_for("transient_failure", "c@flaky.test"));
    assert_eq!(e["status"], "4.4.3");
    assert!(e["next_attempt"].is_string());
    let m = server.message_json(&id);
    assert_eq!(m["recipients"][0]["state"], "deferred");
    let attempts = m["recipients"][0]["attempts"].as_array().unwrap();
    assert_eq!(attempts[0]["status"], "4.4.3", "{m}");
    let shown = String::from_utf8(server.cli(&["queue", "show", &id]).stdout).unwrap();
    assert!(
        shown.contains("deferred") && shown.contains("DNS lookup failed"),
        "{shown}"
    );
}

#[test]
fn retry_after_450_then_delivered_with_attempt_history() {
    let w = World::new(&["127.0.0.2"]);
    w.dns.mx("greylist.test", 10, "mx.greylist.test");
    w.dns.a("mx.greylist.test", "127.0.0.2");
    let mx = w.mx(
        "127.0.0.2",
        Script {
            rcpt: Arc::new(|_, seen| {
                if seen == 0 {
                    "450 4.2.0 try again later".into()
                } else {
                    "250 2.1.5 ok".into()
                }
            }),
            ..Script::default()
        },
    );
    let server = w.server("", "");
    let id = send(
        &server,
        &["d@greylist.test"],
        b"Subject: retry\r\n\r\nhi\r\n",
    );
    let first = server.wait_event(20, event_for("transient_failure", "d@greylist.test"));
    assert_eq!(first["code"], 450);
    let m = server.message_json(&id);
    assert_eq!(m["recipients"][0]["state"], "deferred");
    let got = mx.wait_for(1, 20);
    assert_eq!(
        got.len(),
        1,
        "retried and delivered; log:\n{}",
        server.log()
    );
    let e = server.wait_event(20, event_for("delivery", "d@greylist.test"));
    assert_eq!(e["attempt"], 2);
}

#[test]
fn mixed_results_in_one_transaction_and_a_parseable_dsn() {
    let w = World::new(&["127.0.0.2"]);
    w.dns.mx("mixed.test", 10, "mx.mixed.test");
    w.dns.a("mx.mixed.test", "127.0.0.2");
    let mx = w.mx(
        "127.0.0.2",
        Script {
            rcpt: Arc::new(|addr, _| {
                if addr.starts_with("bad") {
                    "550 5.1.1 no such user here".into()
                } else if addr.starts_with("later") {
                    "451 4.3.0 come back later".into()
                } else {
                    "250 2.1.5 ok".into()
                }
            }),
            ..Script::default()
        },
    );
    let sender_mx = w.sender_mx();
    let server = w.server("", "");
    let mut c = server.connect();
    c.hello();
    c.cmd("MAIL FROM:<alice@sender.test> RET=HDRS ENVID=env-42");
    c.cmd("RCPT TO:<good@mixed.test>");
    c.cmd("RCPT TO:<bad@mixed.test> ORCPT=rfc822;original-bad@mixed.test");
    c.cmd("RCPT TO:<later@mixed.test>");
    c.cmd("DATA");
    c.send(b"Subject: mixed bag\r\nMessage-ID: <m1@sender.test>\r\n\r\nbody\r\n.\r\n");
    let id = c.reply().queue_id();
    let got = mx.wait_for(1, 20);
    assert_eq!(
        got[0].rcpts,
        vec!["good@mixed.test"],
        "one transaction, one accepted"
    );
    server.wait_event(20, event_for("delivery", "good@mixed.test"));
    server.wait_event(20, event_for("bounce", "bad@mixed.test"));
    server.wait_event(20, event_for("transient_failure", "later@mixed.test"));
    let m = server.message_json(&id);
    let states: Vec<&str> = m["recipients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, vec!["delivered", "bounced", "deferred"]);

    let dsns = sender_mx.wait_for(1, 20);
    assert_eq!(dsns.len(), 1, "exactly one DSN; log:\n{}", server.log());
    let dsn = &dsns[0].body;
    // Parsed by mail-parser ...
    let parsed = mail_parser::MessageParser::default()
        .parse(dsn)
        .expect("DSN parses");
    let ct = parsed.content_type().expect("content type");
    assert_eq!(ct.ctype(), "multipart");
    assert_eq!(ct.subtype(), Some("report"));
    assert_eq!(ct.attribute("report-type"), Some("delivery-status"));
    let text = String::from_utf8_lossy(dsn);
    for needle in [
        "Reporting-MTA: dns; mx.test.example",
        "Original-Envelope-Id: env-42",
        "Arrival-Date: ",
        "Final-Recipient: rfc822; bad@mixed.test",
        "Original-Recipient: rfc822; original-bad@mixed.test",
        "Action: failed",
        "Status: 5.1.1",
        "Remote-MTA: dns; mx.mixed.test",
        "Diagnostic-Code: smtp; 550 5.1.1 no such user here",
        "Last-Attempt-Date: ",
        "Content-Type: text/rfc822-headers",
        "Subject: mixed bag",
    ] {
        assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
    }
    assert!(
        !text.contains("good@mixed.test"),
        "only failures are reported"
    );
    assert!(!text.contains("\r\nbody\r\n"), "RET=HDRS: headers only");
    // ... and by Python's email package.
    let script = r#"
import email, sys
from email import policy
msg = email.message_from_bytes(sys.stdin.buffer.read(), policy=policy.default)
assert msg.get_content_type() == "multipart/report", msg.get_content_type()
assert msg.get_param("report-type") == "delivery-status"
parts = list(msg.iter_parts())
assert parts[0].get_content_type() == "text/plain"
assert parts[1].get_content_type() == "message/delivery-status"
blocks = parts[1].get_payload()
assert blocks[0]["Reporting-MTA"] == "dns; mx.test.example", blocks[0]["Reporting-MTA"]
assert blocks[1]["Final-Recipient"] == "rfc822; bad@mixed.test"
assert blocks[1]["Action"] == "failed"
assert blocks[1]["Status"] == "5.1.1"
assert parts[2].get_content_type() == "text/rfc822-headers"
print("ok")
"#;
    let mut child = common::python()
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(dsn).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "python email rejects the DSN: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn expiry_bounces_after_max_age() {
    let w = World::new(&["127.0.0.2"]);
    w.dns.mx("slow.test", 10, "mx.slow.test");
    w.dns.a("mx.slow.test", "127.0.0.2");
    let _mx = w.mx(
        "127.0.0.2",
        Script {
            rcpt: Arc::new(|_, _| "451 4.4.5 system busy".into()),
            ..Script::default()
        },
    );
    let sender_mx = w.sender_mx();
    let server = w.server("max_age = \"3s\"", "");
    send(&server, &["e@slow.test"], b"Subject: old\r\n\r\nhi\r\n");
    let e = server.wait_event(30, event_for("expiration", "e@slow.test"));
    assert!(e["attempt"].as_u64().unwrap() >= 2, "{e}");
    let dsns = sender_mx.wait_for(1, 20);
    assert_eq!(dsns.len(), 1);
    let text = String::from_utf8_lossy(&dsns[0].body);
    assert!(
        text.contains("Status: 4.4.7") && text.contains("Action: failed"),
        "{text}"
    );
    assert!(text.contains("451 4.4.5 system busy"), "{text}");
}

#[test]
fn connections_are_reused_and_capped() {
    let w = World::new(&["127.0.0.2"]);
    w.dns.mx("busy.test", 10, "mx.busy.test");
    w.dns.a("mx.busy.test", "127.0.0.2");
    let mx = w.mx(
        "127.0.0.2",
        Script {
            data_delay: Duration::from_millis(50),
            ..Script::default()
        },
    );
    let server = w.server("max_connections_per_destination = 3", "");
    let n = 60;
    let threads: Vec<_> = (0..6)
        .map(|t| {
            let addr = server.addr;
            std::thread::spawn(move || {
                let mut c = common::Client::connect(addr);
                c.hello();
                for i in 0..n / 6 {
                    let r = c.send_mail(
                        "alice@sender.test",
                        &["f@busy.test"],
                        format!("Subject: {t}-{i}\r\n\r\nhi\r\n").as_bytes(),
                    );
                    assert_eq!(r.code, 250);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let got = mx.wait_for(n, 60);
    assert_eq!(got.len(), n, "log:\n{}", server.log());
    let connections = mx.connections();
    let max_active = mx.max_active();
    eprintln!("{n} messages over {connections} connections, at most {max_active} at once");
    assert!(max_active <= 3, "cap of 3 exceeded: {max_active}");
    assert!(
        max_active >= 2,
        "expected parallel connections, saw {max_active}"
    );
    assert!(
        connections <= 10,
        "{n} messages needed {connections} connections"
    );
}

#[test]
fn smtputf8_message_to_a_server_without_it_bounces_5_6_7() {
    let w = World::new(&["127.0.0.2"]);
    w.dns.mx("ascii.test", 10, "mx.ascii.test");
    w.dns.a("mx.ascii.test", "127.0.0.2");
    let mut script = Script::default();
    script.capabilities.retain(|c| c != "SMTPUTF8");
    let mx = w.mx("127.0.0.2", script);
    let sender_mx = w.sender_mx();
    let server = w.server("", "");
    let mut c = server.connect();
    c.hello();
    c.cmd("MAIL FROM:<alice@sender.test> SMTPUTF8");
    c.cmd("RCPT TO:<j\u{f6}rg@ascii.test>");
    c.cmd("DATA");
    c.send("Subject: \u{fc}\r\n\r\nhi\r\n.\r\n".as_bytes());
    assert_eq!(c.reply().code, 250);
    let e = server.wait_event(20, event_for("bounce", "j\u{f6}rg@ascii.test"));
    assert_eq!(e["status"], "5.6.7");
    assert_eq!(sender_mx.wait_for(1, 20).len(), 1);
    assert!(mx.messages().is_empty());
}

#[test]
fn a_bounce_is_never_bounced() {
    let w = World::new(&["127.0.0.2"]);
    w.dns.mx("reject.test", 10, "mx.reject.test");
    w.dns.a("mx.reject.test", "127.0.0.2");
    let _mx = w.mx(
        "127.0.0.2",
        Script {
            rcpt: Arc::new(|_, _| "550 5.1.1 unknown".into()),
            ..Script::default()
        },
    );
    let sender_mx = w.sender_mx();
    let server = w.server("", "");
    let mut c = server.connect();
    c.hello();
    let r = c.send_mail("", &["g@reject.test"], b"Subject: a bounce\r\n\r\nhi\r\n");
    assert_eq!(r.code, 250);
    server.wait_event(20, event_for("bounce", "g@reject.test"));
    server.wait_event(20, event_for("bounce_dropped", "g@reject.test"));
    std::thread::sleep(Duration::from_millis(500));
    assert!(sender_mx.messages().is_empty());
}

#[test]
fn notify_success_and_delay_notices() {
    let w = World::new(&["127.0.0.2", "127.0.0.3"]);
    // nodsn.test's MX lacks DSN: Baton itself reports the success ("relayed").
    w.dns.mx("nodsn.test", 10, "mx.nodsn.test");
    w.dns.a("mx.nodsn.test", "127.0.0.2");
    let _plain = w.mx("127.0.0.2", Script::default());
    // withdsn.test's MX offers DSN: NOTIFY and ORCPT travel on, no notice from Baton.
    w.dns.mx("withdsn.test", 10, "mx.withdsn.test");
    w.dns.a("mx.withdsn.test", "127.0.0.3");
    let mut script = Script::default();
    script.capabilities.push("DSN".into());
    let dsn_mx = w.mx("127.0.0.3", script);
    let sender_mx = w.sender_mx();
    let server = w.server("delay_warning = \"1s\"", "");
    let mut c = server.connect();
    c.hello();
    c.cmd("MAIL FROM:<alice@sender.test> ENVID=e1");
    c.cmd("RCPT TO:<h@nodsn.test> NOTIFY=SUCCESS");
    c.cmd("RCPT TO:<i@withdsn.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;i@withdsn.test");
    c.cmd("DATA");
    c.send(b"Subject: notify\r\n\r\nhi\r\n.\r\n");
    assert_eq!(c.reply().code, 250);
    let got = dsn_mx.wait_for(1, 20);
    assert!(
        got[0].mail_line.contains("ENVID=e1"),
        "{}",
        got[0].mail_line
    );
    assert!(
        got[0].rcpt_lines[0].contains("NOTIFY=SUCCESS,FAILURE")
            && got[0].rcpt_lines[0].contains("ORCPT=rfc822;i@withdsn.test"),
        "{:?}",
        got[0].rcpt_lines
    );
    let dsns = sender_mx.wait_for(1, 20);
    assert_eq!(dsns.len(), 1, "log:\n{}", server.log());
    let text = String::from_utf8_lossy(&dsns[0].body);
    assert!(
        text.contains("Final-Recipient: rfc822; h@nodsn.test"),
        "{text}"
    );
    assert!(text.contains("Action: relayed"), "{text}");
    assert!(!text.contains("i@withdsn.test"), "{text}");
}

#[test]
fn delay_notice_once_after_delay_warning() {
    let w = World::new(&["127.0.0.2"]);
    w.dns.mx("later.test", 10, "mx.later.test");
    w.dns.a("mx.later.test", "127.0.0.2");
    let _mx = w.mx(
        "127.0.0.2",
        Script {
            rcpt: Arc::new(|_, _| "450 4.2.1 mailbox busy".into()),
            ..Script::default()
        },
    );
    let sender_mx = w.sender_mx();
    let server = w.server("delay_warning = \"1s\"", "");
    let mut c = server.connect();
    c.hello();
    c.cmd("MAIL FROM:<alice@sender.test>");
    c.cmd("RCPT TO:<j@later.test> NOTIFY=DELAY");
    c.cmd("DATA");
    c.send(b"Subject: slow\r\n\r\nhi\r\n.\r\n");
    assert_eq!(c.reply().code, 250);
    let dsns = sender_mx.wait_for(1, 20);
    assert_eq!(dsns.len(), 1, "log:\n{}", server.log());
    let text = String::from_utf8_lossy(&dsns[0].body);
    assert!(
        text.contains("Action: delayed") && text.contains("Will-Retry-Until: "),
        "{text}"
    );
    // Only once, however many retries follow.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(sender_mx.messages().len(), 1);
}

#[test]
fn local_maildir_delivery() {
    let w = World::new(&[]);
    let server = w.server(
        "",
        "[relay]\nlocal_domains = [\"home.test\"]\n[local]\nusers = [\"kim\", \"lee@home.test\"]\n",
    );
    let body = b"Subject: for kim\r\n\r\n.dot\r\nhello kim\r\n";
    send(&server, &["kim@home.test", "lee@home.test"], body);
    for user in ["kim", "lee@home.test"] {
        let rcpt = if user == "kim" { "kim@home.test" } else { user };
        server.wait_event(20, event_for("delivery", rcpt));
        let new = server.data_dir().join("mail").join(user).join("new");
        let files: Vec<_> = std::fs::read_dir(&new).unwrap().flatten().collect();
        assert_eq!(files.len(), 1, "{user}");
        let stored = std::fs::read(files[0].path()).unwrap();
        let text = String::from_utf8_lossy(&stored);
        assert!(text.starts_with(&format!(
            "Return-Path: <alice@sender.test>\r\nDelivered-To: {rcpt}\r\nReceived: "
        )));
        assert!(stored.ends_with(body));
    }
    // Unknown users never get in.
    let mut c = server.connect();
    c.hello();
    c.cmd("MAIL FROM:<alice@sender.test>");
    let r = c.cmd("RCPT TO:<nobody@home.test>");
    assert_eq!((r.code, &r.lines[0][..5]), (550, "5.1.1"));
}

#[test]
fn lmtp_delivery_with_per_recipient_replies() {
    let w = World::new(&["127.0.0.7"]);
    let lmtp = w.mx(
        "127.0.0.7",
        Script {
            lmtp: true,
            capabilities: vec!["PIPELINING".into(), "ENHANCEDSTATUSCODES".into()],
            ..Script::default()
        },
    );
    let server = w.server(
        "",
        &format!(
            "[relay]\nlocal_domains = [\"lmtp.test\"]\n[local]\nlmtp = \"127.0.0.7:{}\"\n",
            w.port
        ),
    );
    send(
        &server,
        &["m@lmtp.test", "n@lmtp.test"],
        b"Subject: lmtp\r\n\r\nhi\r\n",
    );
    let got = lmtp.wait_for(1, 20);
    assert_eq!(got.len(), 1, "log:\n{}", server.log());
    assert_eq!(got[0].rcpts, vec!["m@lmtp.test", "n@lmtp.test"]);
    server.wait_event(20, event_for("delivery", "m@lmtp.test"));
    server.wait_event(20, event_for("delivery", "n@lmtp.test"));
}

#[test]
fn sigkill_during_delivery_loses_nothing() {
    let w = World::new(&["127.0.0.2"]);
    w.dns.mx("sink.test", 10, "mx.sink.test");
    w.dns.a("mx.sink.test", "127.0.0.2");
    let mx = w.mx(
        "127.0.0.2",
        Script {
            data_delay: Duration::from_millis(100),
            ..Script::default()
        },
    );
    let mut server = w.server("max_connections_per_destination = 2", "");
    let n = 30;
    let mut c = server.connect();
    c.hello();
    for i in 0..n {
        let r = c.send_mail(
            "alice@sender.test",
            &["k@sink.test"],
            format!("Subject: m{i}\r\nX-N: {i}\r\n\r\nbody {i}\r\n").as_bytes(),
        );
        assert_eq!(r.code, 250);
    }
    // Let some go out, then crash in the middle of deliveries.
    mx.wait_for(5, 20);
    server.kill9();
    let before = mx.messages().len();
    assert!(
        before < n,
        "all delivered before the kill; slow the fake MX down"
    );
    server.spawn();
    let numbers_of = |got: &[common::mx::Received]| -> Vec<usize> {
        let mut numbers: Vec<usize> = got
            .iter()
            .map(|m| {
                let t = String::from_utf8_lossy(&m.body).to_string();
                t.split("X-N: ")
                    .nth(1)
                    .unwrap()
                    .split("\r\n")
                    .next()
                    .unwrap()
                    .parse()
                    .unwrap()
            })
            .collect();
        numbers.sort_unstable();
        numbers
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let (numbers, distinct) = loop {
        let numbers = numbers_of(&mx.messages());
        let mut distinct = numbers.clone();
        distinct.dedup();
        if distinct.len() == n || std::time::Instant::now() > deadline {
            break (numbers, distinct);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        distinct,
        (0..n).collect::<Vec<_>>(),
        "every message arrived"
    );
    let duplicates = numbers.len() - distinct.len();
    eprintln!("{before} delivered before the kill, {duplicates} delivered twice");
    assert!(
        duplicates <= 2,
        "duplicates only for the transactions in flight (2 connections)"
    );
}

#[test]
fn starttls_is_used_when_offered() {
    let w = World::new(&["127.0.0.2"]);
    w.dns.mx("secure.test", 10, "mx.secure.test");
    w.dns.a("mx.secure.test", "127.0.0.2");
    let mx = w.mx(
        "127.0.0.2",
        Script {
            tls: Some(common::mx::tls_config("mx.secure.test")),
            ..Script::default()
        },
    );
    let server = w.server("", "");
    let body = b"Subject: over TLS\r\n\r\nsecret\r\n".to_vec();
    send(&server, &["o@secure.test"], &body);
    let got = mx.wait_for(1, 20);
    assert_eq!(got.len(), 1, "log:\n{}", server.log());
    assert!(got[0].tls, "the transaction must run inside TLS");
    assert_eq!(strip_received(&got[0].body), body.as_slice());
    let e = server.wait_event(20, event_for("delivery", "o@secure.test"));
    let tls = e["tls"].as_str().unwrap_or_default();
    assert!(tls.starts_with("TLSv1_"), "{e}");
}

#[test]
fn smarthost_with_required_tls_and_auth() {
    let w = World::new(&["127.0.0.6", "127.0.0.7"]);
    let relay = w.mx(
        "127.0.0.6",
        Script {
            tls: Some(common::mx::tls_config("relay.test")),
            auth: Some(("baton".into(), "s3cret pass".into())),
            ..Script::default()
        },
    );
    // A second relay that offers no TLS: with tls = "required" nothing goes there.
    let plain = w.mx("127.0.0.7", Script::default());
    let server = w.server(
        "",
        &format!(
            "[[route]]\ndomain = \"*\"\nsmarthost = \"127.0.0.6:{port}\"\ntls = \"required\"\nauth_user = \"baton\"\nauth_password = \"s3cret pass\"\n\
             [[route]]\ndomain = \"strict.test\"\nsmarthost = \"127.0.0.7:{port}\"\ntls = \"required\"\n",
            port = w.port
        ),
    );
    send(
        &server,
        &["p@anywhere.test"],
        b"Subject: relayed\r\n\r\nhi\r\n",
    );
    let got = relay.wait_for(1, 20);
    assert_eq!(got.len(), 1, "log:\n{}", server.log());
    assert!(got[0].tls);
    assert_eq!(got[0].auth_user.as_deref(), Some("baton"));

    send(
        &server,
        &["q@strict.test"],
        b"Subject: needs tls\r\n\r\nhi\r\n",
    );
    let e = server.wait_event(20, event_for("transient_failure", "q@strict.test"));
    assert_eq!(e["status"], "4.7.10", "{e}");
    assert!(plain.messages().is_empty(), "nothing sent without TLS");
}

#[test]
fn equal_preferences_share_the_load_and_dns_answers_are_cached() {
    let w = World::new(&["127.0.0.2", "127.0.0.3"]);
    w.dns.mx("twins.test", 10, "a.twins.test");
    w.dns.mx("twins.test", 10, "b.twins.test");
    w.dns.a("a.twins.test", "127.0.0.2");
    w.dns.a("b.twins.test", "127.0.0.3");
    let a = w.mx("127.0.0.2", Script::default());
    let b = w.mx("127.0.0.3", Script::default());
    // One message per connection, so each message picks a host afresh.
    let server = w.server(
        "max_messages_per_connection = 1\nmax_connections_per_destination = 1",
        "",
    );
    for i in 0..20 {
        send(
            &server,
            &["r@twins.test"],
            format!("Subject: {i}\r\n\r\nhi\r\n").as_bytes(),
        );
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while a.messages().len() + b.messages().len() < 20 {
        assert!(
            std::time::Instant::now() < deadline,
            "log:\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (na, nb) = (a.messages().len(), b.messages().len());
    assert!(
        na > 0 && nb > 0,
        "equal preferences must both be used: {na} and {nb}"
    );
    // 20 connections, 3 names to resolve, answers with a 60 s TTL: a handful of queries.
    let queries = w.dns.queries.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        queries <= 8,
        "{queries} DNS queries: the cache is not used: {:?}",
        w.dns.log.lock().unwrap()
    );
}

#[test]
fn helo_fallback_and_size_limit() {
    let w = World::new(&["127.0.0.2", "127.0.0.3"]);
    w.dns.mx("old.test", 10, "mx.old.test");
    w.dns.a("mx.old.test", "127.0.0.2");
    let old = w.mx(
        "127.0.0.2",
        Script {
            no_ehlo: true,
            ..Script::default()
        },
    );
    w.dns.mx("small.test", 10, "mx.small.test");
    w.dns.a("mx.small.test", "127.0.0.3");
    let mut script = Script::default();
    script.capabilities.retain(|c| !c.starts_with("SIZE"));
    script.capabilities.push("SIZE 500".into());
    let small = w.mx("127.0.0.3", script);
    let sender_mx = w.sender_mx();
    let server = w.server("", "");
    send(
        &server,
        &["s@old.test"],
        b"Subject: plain SMTP\r\n\r\nhi\r\n",
    );
    let got = old.wait_for(1, 20);
    assert_eq!(got.len(), 1, "HELO fallback; log:\n{}", server.log());
    assert!(
        !got[0].mail_line.contains("SIZE="),
        "no ESMTP parameters after HELO"
    );
    let big = format!("Subject: big\r\n\r\n{}\r\n", "x".repeat(900));
    send(&server, &["t@small.test"], big.as_bytes());
    let e = server.wait_event(20, event_for("bounce", "t@small.test"));
    assert_eq!(e["status"], "5.3.4");
    assert!(small.messages().is_empty());
    assert_eq!(sender_mx.wait_for(1, 20).len(), 1);
}

#[test]
fn a_cached_connection_the_server_dropped_is_replaced_without_a_deferral() {
    let w = World::new(&["127.0.0.2"]);
    w.dns.mx("drops.test", 10, "mx.drops.test");
    w.dns.a("mx.drops.test", "127.0.0.2");
    // Each connection takes one message, then the server drops it silently.
    let mx = w.mx(
        "127.0.0.2",
        Script {
            close_after: Some(1),
            ..Script::default()
        },
    );
    let server = w.server("max_connections_per_destination = 1\n", "");
    // Four messages at once: one worker takes them one after the other, each time finding
    // its cached connection dead.
    let mut c = server.connect();
    c.hello();
    for i in 0..4 {
        let r = c.send_mail(
            "alice@sender.test",
            &[&format!("r{i}@drops.test")],
            b"Subject: x\r\n\r\ny\r\n",
        );
        assert_eq!(r.code, 250);
    }
    for i in 0..4 {
        server.wait_event(20, event_for("delivery", &format!("r{i}@drops.test")));
    }
    assert_eq!(mx.messages().len(), 4);
    assert!(mx.connections() >= 4, "a new connection for each message");
    let deferred: Vec<_> = server
        .events()
        .into_iter()
        .filter(|e| e["type"] == "transient_failure")
        .collect();
    assert!(
        deferred.is_empty(),
        "no attempt was spent on a dead connection: {deferred:?}"
    );
}
