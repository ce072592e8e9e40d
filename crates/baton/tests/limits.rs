//! Each limit with its precise reply, against a real server.

mod common;

use std::io::Write;
use std::thread::sleep;
use std::time::Duration;

use common::{Client, Server, strip_received};

#[test]
fn command_line_length() {
    let server = Server::start("[limits]\nmax_line_length = 600");
    let mut c = server.connect();
    c.hello();
    let long = format!("NOOP {}", "x".repeat(700));
    let r = c.cmd(&long);
    assert_eq!(
        (r.code, r.text()),
        (500, "5.5.2 Error: line too long".into())
    );
    // A line far longer than any buffer is discarded without harm, and the session goes on.
    c.send(b"NOOP ");
    c.send(&vec![b'y'; 1 << 20]);
    let r = c.cmd("");
    assert_eq!(r.code, 500);
    assert_eq!(c.cmd("NOOP").code, 250);
}

#[test]
fn recipients_per_transaction() {
    let server = Server::start("");
    let mut c = server.connect();
    c.hello();
    c.cmd("MAIL FROM:<a@example.com>");
    for i in 0..100 {
        let r = c.cmd(&format!("RCPT TO:<r{i}@example.net>"));
        assert_eq!(r.code, 250, "recipient {i}: {r:?}");
    }
    let r = c.cmd("RCPT TO:<r100@example.net>");
    assert_eq!(
        (r.code, r.text()),
        (452, "4.5.3 Error: too many recipients".into())
    );
    assert_eq!(c.cmd("DATA").code, 354);
    c.send(b"x\r\n.\r\n");
    let id = c.reply().queue_id();
    let m = server.message_json(&id);
    assert_eq!(m["recipients"].as_array().unwrap().len(), 100);
}

#[test]
fn message_size_is_enforced_while_reading() {
    let server = Server::start("[limits]\nmax_message_size = 10000");
    let mut c = server.connect();
    let ehlo = c.hello();
    assert!(ehlo.lines.iter().any(|l| l == "SIZE 10000"));
    let r = c.cmd("MAIL FROM:<a@example.com> SIZE=10001");
    assert_eq!((r.code, &r.lines[0][..5]), (552, "5.3.4"));
    c.cmd("MAIL FROM:<a@example.com>");
    c.cmd("RCPT TO:<b@example.net>");
    assert_eq!(c.cmd("DATA").code, 354);
    for _ in 0..200 {
        c.send(&[b'z'; 98]);
        c.send(b"\r\n");
    }
    c.send(b".\r\n");
    let r = c.reply();
    assert_eq!((r.code, &r.lines[0][..5]), (552, "5.3.4"));
    // The session is still in step: the next transaction works.
    let r = c.send_mail("a@example.com", &["b@example.net"], b"small\r\n");
    assert_eq!(r.code, 250);
    assert_eq!(server.queued_ids().len(), 1);
    // The same over BDAT.
    c.cmd("MAIL FROM:<a@example.com>");
    c.cmd("RCPT TO:<b@example.net>");
    c.send(b"BDAT 6000\r\n");
    c.send(&[b'q'; 6000]);
    assert_eq!(c.reply().code, 250);
    c.send(b"BDAT 6000 LAST\r\n");
    c.send(&[b'q'; 6000]);
    let r = c.reply();
    assert_eq!((r.code, &r.lines[0][..5]), (552, "5.3.4"));
    assert_eq!(server.queued_ids().len(), 1);
    // A chunk announced far beyond the limit is refused without reading it, and the
    // connection closed (its bytes could not be told from commands otherwise).
    c.cmd("MAIL FROM:<a@example.com>");
    c.cmd("RCPT TO:<b@example.net>");
    let r = c.cmd("BDAT 999999999999 LAST");
    assert_eq!((r.code, &r.lines[0][..5]), (552, "5.3.4"));
    assert!(c.is_closed());
}

#[test]
fn too_many_errors_closes_with_421() {
    let server = Server::start("[limits]\nmax_errors = 3");
    let mut c = server.connect();
    c.hello();
    assert_eq!(c.cmd("FOO").code, 500);
    assert_eq!(c.cmd("BAR").code, 500);
    let r = c.cmd("BAZ");
    assert_eq!(r.code, 500);
    let r = c.reply();
    assert_eq!(
        (r.code, r.text()),
        (421, "4.7.0 mx.test.example Error: too many errors".into())
    );
    assert!(c.is_closed());
}

#[test]
fn idle_command_and_data_timeouts() {
    let server = Server::start("[limits]\nidle_timeout = 2\ncommand_timeout = 1\ndata_timeout = 1");
    // Idle: nothing sent after EHLO.
    let mut c = server.connect();
    c.hello();
    let r = c.reply();
    assert_eq!(
        (r.code, r.text()),
        (421, "4.4.2 mx.test.example Error: timeout exceeded".into())
    );
    assert!(c.is_closed());
    // Command: a line trickled a byte at a time never completes (slowloris); the deadline
    // runs from its first byte, however often bytes arrive.
    let mut c = server.connect();
    c.hello();
    c.stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut reply = None;
    for _ in 0..40 {
        if c.stream.write_all(b"N").is_err() {
            break;
        }
        if let Some(r) = c.try_reply() {
            reply = Some(r);
            break;
        }
    }
    let r = reply.expect("no reply to a trickled line");
    assert_eq!((r.code, &r.lines[0][..5]), (421, "4.4.2"));
    // Data: the client stops in the middle of DATA.
    let mut c = server.connect();
    c.hello();
    c.cmd("MAIL FROM:<a@example.com>");
    c.cmd("RCPT TO:<b@example.net>");
    c.cmd("DATA");
    c.send(b"partial\r\n");
    let r = c.reply();
    assert_eq!(r.code, 421);
    assert!(
        server.queued_ids().is_empty(),
        "a timed-out message is not queued"
    );
}

/// Connects from `source` until greeted: the harness's own readiness probe may still hold a
/// connection slot for a moment after the server starts.
fn greeted_from(addr: std::net::SocketAddr, source: &str) -> Client {
    for _ in 0..100 {
        let mut c = Client::connect_from(addr, source.parse().unwrap());
        if c.reply().code == 220 {
            return c;
        }
        sleep(Duration::from_millis(20));
    }
    panic!("never greeted from {source}");
}

#[test]
fn connection_limit_per_ip() {
    let server = Server::start("[limits]\nmax_connections_per_ip = 2");
    let addr = server.addr;
    let mut a = greeted_from(addr, "127.0.0.5");
    let _b = greeted_from(addr, "127.0.0.5");
    let mut third = Client::connect_from(addr, "127.0.0.5".parse().unwrap());
    let r = third.reply();
    assert_eq!(
        (r.code, r.text()),
        (
            421,
            "4.7.0 mx.test.example Error: too many connections from your address".into()
        )
    );
    assert!(third.is_closed());
    // Another address is not affected.
    let _other = greeted_from(addr, "127.0.0.6");
    // A slot comes back when its session ends.
    assert_eq!(a.cmd("QUIT").code, 221);
    assert!(a.is_closed());
    let _again = greeted_from(addr, "127.0.0.5");
}

#[test]
fn connection_limit_total() {
    let server = Server::start("[limits]\nmax_connections = 2");
    let addr = server.addr;
    let _a = greeted_from(addr, "127.0.0.5");
    let _b = greeted_from(addr, "127.0.0.6");
    let mut third = Client::connect_from(addr, "127.0.0.7".parse().unwrap());
    let r = third.reply();
    assert_eq!(
        (r.code, r.text()),
        (
            421,
            "4.7.0 mx.test.example Error: too many connections".into()
        )
    );
}

#[test]
fn large_message_is_streamed_not_held_in_memory() {
    let server = Server::start("[limits]\nmax_message_size = \"60MB\"");
    let mut c = server.connect();
    c.hello();
    c.cmd("MAIL FROM:<a@example.com> SIZE=50000000");
    c.cmd("RCPT TO:<b@example.net>");
    assert_eq!(c.cmd("DATA").code, 354);
    let line: Vec<u8> = (0..998)
        .map(|i| b'!' + (i % 90) as u8)
        .chain(*b"\r\n")
        .collect();
    let lines = 50_000_000 / line.len();
    let mut hasher_input_len = 0usize;
    let mut chunk = Vec::with_capacity(line.len() * 100);
    for i in 0..lines {
        chunk.extend_from_slice(&line);
        hasher_input_len += line.len();
        if i % 100 == 99 {
            c.send(&chunk);
            chunk.clear();
        }
    }
    c.send(&chunk);
    c.send(b".\r\n");
    let r = c.reply();
    assert_eq!(r.code, 250, "{r:?}");
    let stored = server.body(&r.queue_id());
    let body = strip_received(&stored);
    assert_eq!(body.len(), hasher_input_len);
    assert!(body.chunks(line.len()).all(|l| l == line.as_slice()));
    let peak = server.peak_rss_kb();
    eprintln!("peak RSS after a 50 MB message: {peak} KiB");
    assert!(
        peak < 40 * 1024,
        "peak RSS {peak} KiB: a 50 MB message must not be held in memory"
    );
}

#[test]
fn a_mail_loop_is_refused_with_5_4_6() {
    let server = Server::start("");
    let mut c = server.connect();
    c.hello();
    let mut body = String::new();
    for i in 0..50 {
        body.push_str(&format!(
            "Received: from hop{i}.example by hop{}.example; Mon, 1 Jan 2026 00:00:00 +0000\r\n",
            i + 1
        ));
    }
    body.push_str("Subject: loop\r\n\r\nround and round\r\n");
    // 50 hops plus ours is one too many.
    let r = c.send_mail("a@example.com", &["b@example.net"], body.as_bytes());
    assert_eq!((r.code, &r.lines[0][..5]), (554, "5.4.6"), "{r:?}");
    assert!(server.queued_ids().is_empty());
    // 49 hops plus ours is fine.
    let fine = body.split_once("\r\n").unwrap().1;
    assert_eq!(
        c.send_mail("a@example.com", &["b@example.net"], fine.as_bytes())
            .code,
        250
    );
}

#[test]
fn a_thousand_idle_connections_do_not_stop_service_to_others() {
    // 20 addresses × 50 connections (the per-address default), each idle after the greeting.
    let server = Server::start("");
    let mut idle = Vec::new();
    for a in 0..20u8 {
        let source = format!("127.0.1.{}", a + 1);
        for _ in 0..50 {
            let mut c = Client::connect_from(server.addr, source.parse().unwrap());
            assert_eq!(c.reply().code, 220);
            idle.push(c);
        }
    }
    // A 51st from one of those addresses is turned away...
    let mut extra = Client::connect_from(server.addr, "127.0.1.1".parse().unwrap());
    assert_eq!(extra.reply().code, 421);
    // ...while everyone else is served as usual.
    let mut c = server.connect();
    c.hello();
    let r = c.send_mail(
        "a@example.com",
        &["b@example.net"],
        b"Subject: still here\r\n\r\nok\r\n",
    );
    assert_eq!(r.code, 250, "{r:?}");
    assert_eq!(idle.len(), 1000);
}

const UNTRUSTED: std::net::Ipv4Addr = std::net::Ipv4Addr::new(127, 0, 0, 3);
const TRUSTED: std::net::Ipv4Addr = std::net::Ipv4Addr::new(127, 0, 0, 2);

#[test]
fn connection_rate_per_ip_spares_relay_networks() {
    let server = Server::start(
        "[relay]\nnetworks = [\"127.0.0.2/32\"]\n[limits]\nconnection_rate_per_ip = \"3/m\"\n",
    );
    for _ in 0..3 {
        let mut c = Client::connect_from(server.addr, UNTRUSTED);
        assert_eq!(c.reply().code, 220);
    }
    let mut fourth = Client::connect_from(server.addr, UNTRUSTED);
    let r = fourth.reply();
    assert_eq!(r.code, 421, "{r:?}");
    assert!(r.text().starts_with("4.7.0"), "{r:?}");
    assert!(fourth.is_closed());
    for _ in 0..6 {
        let mut c = Client::connect_from(server.addr, TRUSTED);
        assert_eq!(c.reply().code, 220, "relay networks are exempt");
    }
}

#[test]
fn command_rate_per_ip_closes_a_flooding_client() {
    let server = Server::start(
        "[relay]\nnetworks = [\"127.0.0.2/32\"]\n[limits]\ncommand_rate_per_ip = \"20/m\"\n",
    );
    let mut c = Client::connect_from(server.addr, UNTRUSTED);
    c.hello();
    for i in 0..19 {
        assert_eq!(c.cmd("NOOP").code, 250, "command {}", i + 2);
    }
    let r = c.cmd("NOOP");
    assert_eq!(r.code, 421, "the 21st command: {r:?}");
    assert!(r.text().contains("too many commands"), "{r:?}");
    assert!(c.is_closed());
    // The bucket is the address's, not the session's.
    let mut again = Client::connect_from(server.addr, UNTRUSTED);
    again.reply();
    assert_eq!(again.cmd("NOOP").code, 421);
    let mut trusted = Client::connect_from(server.addr, TRUSTED);
    trusted.hello();
    for _ in 0..30 {
        assert_eq!(trusted.cmd("NOOP").code, 250);
    }
}

#[test]
fn repeated_errors_are_tarpitted() {
    let server =
        Server::start("[limits]\nerror_delay_after = 2\nerror_delay = \"3s\"\nmax_errors = 5\n");
    let mut c = server.connect();
    c.hello();
    assert_eq!(c.cmd("BOGUS").code, 500);
    assert_eq!(c.cmd("BOGUS").code, 500);
    // The third error's reply is held back: nothing arrives for a while.
    c.send(b"BOGUS\r\n");
    c.stream
        .set_read_timeout(Some(Duration::from_millis(800)))
        .unwrap();
    let mut buf = [0u8; 64];
    let early = std::io::Read::read(&mut c.reader, &mut buf);
    assert!(
        matches!(&early, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut),
        "the reply came at once: {early:?}"
    );
    c.stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    assert_eq!(c.reply().code, 500, "then it comes");
    assert_eq!(c.cmd("NOOP").code, 250, "good commands still work");
    assert_eq!(c.cmd("BOGUS").code, 500);
    assert_eq!(c.cmd("BOGUS").code, 500, "the fifth error");
    assert_eq!(c.reply().code, 421, "max_errors ends the session");
    assert!(c.is_closed());
}
