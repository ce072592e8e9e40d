//! Hostile peers and careless callers against a running server: numbers from remote replies,
//! endless replies, broken TLS, control characters in addresses and DSN parameters, huge
//! operator durations, oversized API calls, recipients past the limit, scheduling headers from
//! strangers. Each test was written to fail on the code before its fix.

mod common;

use std::io::Write;
use std::net::{Ipv4Addr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use common::Server;
use common::http::{get, post};
use common::mx::Script;
use common::world::{World, destination, event_for, send};
use serde_json::json;

fn rcpts_seen(mx: &common::mx::FakeMx, address: &str) -> usize {
    let stats = mx.stats.lock().unwrap();
    stats
        .rcpt_log
        .iter()
        .filter(|(a, _, _)| a == address)
        .count()
}

#[test]
fn a_greylisting_hint_cannot_start_a_retry_storm() {
    let (w, mx) = destination(
        "grey.test",
        Script {
            rcpt: Arc::new(|_, _| {
                "451 4.7.1 Greylisted, try again in 18446744073709551615 seconds".into()
            }),
            ..Script::default()
        },
    );
    // retry_max = 2 s (the world's): a wait named by the peer is clamped to it, never to 0.
    let server = w.server("greylist_retry = \"1s\"", "");
    send(&server, &["d@grey.test"], b"Subject: g\r\n\r\nhi\r\n");
    let first = server.wait_event(10, event_for("transient_failure", "d@grey.test"));
    assert!(first["next_attempt"].is_string(), "{first}");
    std::thread::sleep(Duration::from_secs(7));
    let attempts = rcpts_seen(&mx, "d@grey.test");
    eprintln!("greylisted for 2^64 s: {attempts} RCPTs in about 7 s");
    // One attempt, then one every 1-2 s: a storm makes thousands, a dead queue manager one.
    assert!(
        (3..=8).contains(&attempts),
        "{attempts} RCPTs in about 7 s\n{}",
        server.log()
    );
    assert!(!server.log().contains("panicked"), "{}", server.log());
}

#[test]
fn a_non_ascii_time_span_gets_400_not_a_dropped_connection() {
    let server = Server::start("");
    for path in [
        "/api/v1/events?since=1%E2%82%AC",
        "/api/v1/stats?since=1%E2%82%AC",
        "/api/v1/stats?until=%E2%82%AC",
    ] {
        let r = get(server.http, path);
        assert_eq!(r.status, 400, "{path}: {}", r.body);
        assert!(
            r.json()["error"].as_str().unwrap().contains("span"),
            "{}",
            r.body
        );
    }
    // The server is still there.
    assert_eq!(get(server.http, "/api/v1/events?since=1h").status, 200);
}

#[test]
fn an_enormous_suspension_is_refused_and_delivery_goes_on() {
    let (w, mx) = destination("ok.test", Script::default());
    let server = w.server("", "");
    for seconds in [u64::MAX, 18_000_000_000_000_000, 0] {
        let r = post(
            server.http,
            "/api/v1/queue/suspend",
            &json!({"destination": "ok.test", "seconds": seconds}),
        );
        assert_eq!(r.status, 400, "{seconds}: {}", r.body);
        assert!(
            r.json()["error"].as_str().unwrap().contains("seconds"),
            "{}",
            r.body
        );
    }
    let out = server.cli(&["suspend", "ok.test", "--for", "999999999999d"]);
    assert!(!out.status.success(), "the CLI refuses it too");
    // The queue manager is alive and nothing is suspended: mail flows.
    send(&server, &["r@ok.test"], b"Subject: s\r\n\r\nhi\r\n");
    assert_eq!(mx.wait_for(1, 15).len(), 1, "{}", server.log());
}

/// A server on `addr` that greets with `220-` continuation lines and never ends the reply;
/// it stops after `cap` bytes or when Baton hangs up. Returns how many bytes it wrote.
fn endless_greeting(listener: TcpListener, cap: usize) -> std::thread::JoinHandle<usize> {
    std::thread::spawn(move || {
        let Ok((mut stream, _)) = listener.accept() else {
            return 0;
        };
        let line = format!("220-{}\r\n", "x".repeat(990));
        let mut written = 0;
        while written < cap && stream.write_all(line.as_bytes()).is_ok() {
            written += line.len();
        }
        written
    })
}

#[test]
fn an_endless_reply_is_abandoned_within_bounded_memory() {
    let w = World::new(&["127.0.0.2"]);
    w.dns.mx("endless.test", 10, "mx.endless.test");
    w.dns.a("mx.endless.test", "127.0.0.2");
    let listener = w.listener("127.0.0.2");
    let writer = endless_greeting(listener, 400 << 20);
    let server = w.server("", "");
    let rss_before = server.peak_rss_kb();
    send(&server, &["e@endless.test"], b"Subject: e\r\n\r\nhi\r\n");
    let e = server.wait_event(30, event_for("transient_failure", "e@endless.test"));
    assert!(
        e["response"].as_str().unwrap().contains("too long"),
        "abandoned for its length: {e}"
    );
    let written = writer.join().unwrap();
    assert!(written < 100 << 20, "Baton hung up early: {written} bytes");
    let grown = server.peak_rss_kb().saturating_sub(rss_before);
    eprintln!("endless reply: Baton hung up after {written} bytes; peak RSS grew {grown} KiB");
    assert!(grown < 50_000, "peak RSS grew by {grown} KiB");
}

#[test]
fn control_characters_in_api_addresses_are_refused() {
    let (w, mx) = destination("sink.test", Script::default());
    let server = w.server("", "");
    let inject = |sender: &str, rcpt: &str| {
        post(
            server.http,
            "/api/v1/inject",
            &json!({
                "envelope_sender": sender,
                "content": "From: a@sender.test\r\nSubject: x\r\n\r\nhi\r\n",
                "recipients": [{"email": rcpt}],
            }),
        )
    };
    for (sender, rcpt) in [
        ("a@sender.test", "a\r\nNOOP <b@sink.test"),
        ("a@sender.test", "a\nRSET@sink.test"),
        ("a@sender.test", "a<b@sink.test"),
        ("a@sender.test", "a b@sink.test"),
        ("a\r\nRSET@sender.test", "b@sink.test"),
    ] {
        let r = inject(sender, rcpt);
        assert_eq!(r.status, 400, "{sender:?} → {rcpt:?}: {}", r.body);
    }
    // A quoted local part is an address; it goes out quoted, as one RCPT.
    let r = inject("a@sender.test", "\"john doe\"@sink.test");
    assert_eq!(r.status, 202, "{}", r.body);
    let got = mx.wait_for(1, 15);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].rcpt_lines, ["RCPT TO:<\"john doe\"@sink.test>"]);
    let log = mx.stats.lock().unwrap().rcpt_log.clone();
    assert_eq!(
        log.len(),
        1,
        "nothing but that one RCPT reached the wire: {log:?}"
    );
}

#[test]
fn xtext_that_decodes_to_line_breaks_is_refused() {
    let server =
        Server::start("[relay]\nlocal_domains = [\"example.com\"]\n[local]\nusers = [\"b\"]\n");
    let mut c = server.connect();
    c.hello();
    assert_eq!(c.cmd("MAIL FROM:<a@example.org>").code, 250);
    let r = c.cmd("RCPT TO:<b@example.com> ORCPT=rfc822;x+0D+0AAction:+20delivered");
    assert_eq!(r.code, 501, "{r:?}");
    let r = c.cmd("RCPT TO:<b@example.com> ORCPT=rfc822;b+40example.com");
    assert_eq!(r.code, 250, "{r:?}");
    c.cmd("RSET");
    let r = c.cmd("MAIL FROM:<a@example.org> ENVID=x+0D+0ABcc:+20c@example.net");
    assert_eq!(r.code, 501, "{r:?}");
}

/// The current UTC hour plus `n`, as "HH:00".
fn hour_from_now(n: i64) -> String {
    let now = jiff::Timestamp::now().to_zoned(jiff::tz::TimeZone::UTC);
    let hour = (now.hour() as i64 + n).rem_euclid(24);
    format!("{hour:02}:00")
}

#[test]
fn a_recipient_waiting_for_its_window_still_expires_at_max_age() {
    let (w, mx) = destination("later.test", Script::default());
    let dsn_mx = w.sender_mx();
    let server = w.server("max_age = \"3s\"", "");
    // A window that opens in two hours: the recipient is never tried before max_age.
    let body = format!(
        "X-Baton-Window: {}-{} UTC\r\nSubject: w\r\n\r\nhi\r\n",
        hour_from_now(2),
        hour_from_now(3)
    );
    send(&server, &["w@later.test"], body.as_bytes());
    let e = server.wait_event(20, event_for("expiration", "w@later.test"));
    assert_eq!(e["status"], "4.4.7", "{e}");
    assert!(mx.messages().is_empty(), "never tried");
    let dsn = dsn_mx.wait_for(1, 15);
    assert_eq!(dsn.len(), 1, "the sender hears of it");
    assert_eq!(dsn[0].rcpts, ["alice@sender.test"]);
    // And the queue is empty: nothing pins the spool.
    assert!(server.queued_ids().is_empty());
}

#[test]
fn scheduling_headers_count_only_from_trusted_clients() {
    let server = Server::start(
        "[relay]\nlocal_domains = [\"example.com\"]\nnetworks = [\"127.0.0.1/32\"]\n[local]\nusers = [\"b\"]\n",
    );
    let far = b"X-Baton-Send-At: 2999-01-01T00:00:00Z\r\nSubject: x\r\n\r\nhi\r\n";
    // A stranger's header is a header, nothing more.
    let mut c = common::Client::connect_from(server.addr, Ipv4Addr::new(127, 0, 0, 3));
    c.hello();
    let r = c.send_mail("x@stranger.test", &["b@example.com"], far);
    assert_eq!(r.code, 250, "{r:?}");
    let m = server.message_json(&r.queue_id());
    assert!(
        m["recipients"][0]["next_attempt_ms"].is_null(),
        "send-at ignored: {m}"
    );
    // From a trusted client it counts, but not past max_age (5 days by default).
    let mut c = server.connect();
    c.hello();
    assert_eq!(c.cmd("MAIL FROM:<a@example.org>").code, 250);
    assert_eq!(c.cmd("RCPT TO:<b@example.com>").code, 250);
    assert_eq!(c.cmd("DATA").code, 354);
    c.send(far);
    c.send(b".\r\n");
    let r = c.reply();
    assert_eq!(r.code, 550, "{r:?}");
    assert!(r.text().contains("max_age"), "{r:?}");
    let soon = jiff::Timestamp::now() + jiff::SignedDuration::from_hours(1);
    let body = format!("X-Baton-Send-At: {soon}\r\nSubject: x\r\n\r\nhi\r\n");
    let r = c.send_mail("a@example.org", &["b@example.com"], body.as_bytes());
    assert_eq!(r.code, 250, "{r:?}");
    let m = server.message_json(&r.queue_id());
    let at = m["recipients"][0]["next_attempt_ms"].as_u64().unwrap();
    assert_eq!(at as i64, soon.as_millisecond(), "{m}");
    // The API refuses a send_at past max_age too.
    let r = post(
        server.http,
        "/api/v1/inject",
        &json!({
            "envelope_sender": "a@example.org",
            "content": "From: a@example.org\r\nSubject: x\r\n\r\nhi\r\n",
            "recipients": [{"email": "b@example.com"}],
            "send_at": "2999-01-01T00:00:00Z",
        }),
    );
    assert_eq!(r.status, 400, "{}", r.body);
}

#[test]
fn recipients_past_the_limit_get_452_and_the_transaction_goes_on() {
    let server = Server::start("[relay]\nlocal_domains = [\"example.com\"]\n");
    let mut c = server.connect();
    c.hello();
    assert_eq!(c.cmd("MAIL FROM:<a@example.org>").code, 250);
    let mut codes = Vec::new();
    for i in 0..150 {
        codes.push(c.cmd(&format!("RCPT TO:<r{i}@example.net>")).code);
    }
    assert!(codes[..100].iter().all(|&c| c == 250), "{codes:?}");
    assert!(codes[100..].iter().all(|&c| c == 452), "{codes:?}");
    assert_eq!(c.cmd("DATA").code, 354);
    c.send(b"Subject: many\r\n\r\nhi\r\n.\r\n");
    let r = c.reply();
    assert_eq!(r.code, 250, "{r:?}");
    let m = server.message_json(&r.queue_id());
    assert_eq!(m["recipients"].as_array().unwrap().len(), 100);
}

#[test]
fn api_messages_are_held_to_the_size_limits() {
    let port = common::free_port();
    let server = Server::start(&format!(
        "[limits]\nmax_message_size = \"1MiB\"\n[http]\naddress = \"127.0.0.1:{port}\"\nmax_inject_bytes = \"2MiB\"\n"
    ));
    let big = format!(
        "From: a@example.org\r\nSubject: big\r\n\r\n{}\r\n",
        "x".repeat(2 << 20)
    );
    let r = post(
        server.http,
        "/api/v1/inject",
        &json!({"envelope_sender": "a@example.org", "content": big, "recipients": [{"email": "b@example.net"}]}),
    );
    assert_eq!(r.status, 413, "{}", r.body);
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("max_message_size")
    );
    // Many personalised messages, each under the limit, together over max_inject_bytes.
    let recipients: Vec<_> = (0..40)
        .map(|i| json!({"email": format!("r{i}@example.net")}))
        .collect();
    let body = format!("Hi {{{{email}}}}\r\n{}\r\n", "y".repeat(100 << 10));
    let r = post(
        server.http,
        "/api/v1/inject",
        &json!({"envelope_sender": "a@example.org", "content": format!("From: a@example.org\r\nSubject: s\r\n\r\n{body}"), "recipients": recipients}),
    );
    assert_eq!(r.status, 413, "{}", r.body);
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("max_inject_bytes")
    );
    assert!(
        server.queued_ids().is_empty(),
        "nothing of a refused call is queued"
    );
    let r = post(
        server.http,
        "/api/v1/inject",
        &json!({"envelope_sender": "a@example.org", "content": "From: a@example.org\r\nSubject: s\r\n\r\nhi\r\n", "recipients": [{"email": "b@example.net"}]}),
    );
    assert_eq!(r.status, 202, "{}", r.body);
}

#[test]
fn operator_output_uses_operator_words() {
    let server = Server::start(
        "[[shaping]]\ndomain = \"slow.test\"\nmax_connections = 2\n[[shaping]]\nsite = \"google.com\"\nmax_connections = 5\n",
    );
    let out = server.cli(&["queue", "explain", "--destination", "slow.test"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("\"domain slow.test\""), "{text}");
    let out = server.cli(&["queue", "explain", "--destination", "other.test"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("\"default (*)\""), "{text}");
    assert!(!text.contains("Domain("), "{text}");
}

/// A TLS server configuration whose every handshake fails for Baton: TLS 1.2 only and a client
/// certificate required (Baton presents none), so the server answers with a fatal alert.
fn failing_tls() -> Arc<rustls::ServerConfig> {
    let certified = rcgen::generate_simple_self_signed(vec!["mx.broken.test".into()]).unwrap();
    let cert = certified.cert.der().clone();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(rustls::pki_types::PrivatePkcs8KeyDer::from(
        certified.signing_key.serialize_der(),
    ));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.clone()).unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .unwrap();
    Arc::new(
        rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS12])
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![cert], key)
            .unwrap(),
    )
}

/// broken.test, whose MX offers STARTTLS and fails every handshake; Baton with `delivery`
/// added to [delivery] has sent it one message.
fn mail_to_broken_tls(delivery: &str) -> (World, common::mx::FakeMx, Server) {
    let (w, mx) = destination(
        "broken.test",
        Script {
            tls: Some(failing_tls()),
            ..Script::default()
        },
    );
    let server = w.server(delivery, "");
    send(&server, &["t@broken.test"], b"Subject: t\r\n\r\nhi\r\n");
    (w, mx, server)
}

#[test]
fn a_failed_opportunistic_starttls_is_retried_in_plaintext() {
    let (_w, mx, server) = mail_to_broken_tls("");
    let e = server.wait_event(20, event_for("delivery", "t@broken.test"));
    assert_eq!(e["attempt"], 1, "delivered at the first attempt: {e}");
    let tls = e["tls"].as_str().unwrap_or_default();
    assert!(
        tls.contains("STARTTLS failed") && tls.contains("plaintext"),
        "{e}"
    );
    let got = mx.messages();
    assert_eq!(got.len(), 1);
    assert!(!got[0].tls);
}

#[test]
fn a_required_tls_policy_never_falls_back() {
    let (_w, mx, server) = mail_to_broken_tls("tls = \"required\"");
    let e = server.wait_event(20, event_for("transient_failure", "t@broken.test"));
    assert!(e["response"].as_str().unwrap().contains("TLS"), "{e}");
    std::thread::sleep(Duration::from_secs(1));
    assert!(mx.messages().is_empty(), "nothing sent in plaintext");
}

#[test]
fn a_multi_line_reply_is_recorded_without_a_leading_space() {
    let (w, _mx) = destination(
        "chunky.test",
        Script {
            capabilities: vec!["PIPELINING".into(), "CHUNKING".into(), "8BITMIME".into()],
            data_reply: "250-\r\n250 2.0.0 queued as 4F2".into(),
            ..Script::default()
        },
    );
    let server = w.server("", "");
    send(&server, &["c@chunky.test"], b"Subject: c\r\n\r\nhi\r\n");
    let e = server.wait_event(20, event_for("delivery", "c@chunky.test"));
    assert_eq!(e["response"], "2.0.0 queued as 4F2", "{e}");
}
