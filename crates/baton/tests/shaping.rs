//! Traffic shaping against fake MX hosts that count what they see: message rates, connection
//! caps shared by an MX site, messages per connection.

mod common;

use std::time::Duration;

use common::Server;
use common::dns::DnsServer;
use common::mx::{FakeMx, Script, common_port};

fn server(dns: &DnsServer, port: u16, extra: &str) -> Server {
    Server::start_delivering(&format!(
        "{}\n[delivery]\nsmtp_port = {port}\nretry_min = \"1s\"\nidle_timeout = \"1s\"\n{extra}\n",
        dns.config()
    ))
}

/// A DNS server, a port, and `domain` served by a fake MX on 127.0.0.2 answering per `script`.
fn destination(domain: &str, script: Script) -> (DnsServer, u16, FakeMx) {
    let dns = DnsServer::start();
    let shared = common_port(&["127.0.0.2"]);
    let port = shared.port;
    dns.mx(domain, 10, &format!("mx.{domain}"));
    dns.a(&format!("mx.{domain}"), "127.0.0.2");
    let mx = shared.mx("127.0.0.2", script);
    (dns, port, mx)
}

/// Sends `n` messages to `to` over `threads` client connections at once.
fn blast(addr: std::net::SocketAddr, to: &'static str, n: usize, threads: usize) {
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            std::thread::spawn(move || {
                let mut c = common::Client::connect(addr);
                c.hello();
                for i in 0..n / threads {
                    let r = c.send_mail(
                        "a@sender.test",
                        &[to],
                        format!("Subject: {t}-{i}\r\n\r\nhi\r\n").as_bytes(),
                    );
                    assert_eq!(r.code, 250);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

#[test]
fn message_rate_of_10_per_second_holds_over_several_windows() {
    let (dns, port, mx) = destination("rate.test", Script::default());
    let server = server(
        &dns,
        port,
        "[[shaping]]\ndomain = \"rate.test\"\nmax_message_rate = \"10/s\"\n",
    );
    let n = 45;
    blast(server.addr, "r@rate.test", n, 5);
    let got = mx.wait_for(n, 30);
    assert_eq!(got.len(), n, "log:\n{}", server.log());
    let mut times: Vec<_> = got.iter().map(|m| m.at).collect();
    times.sort();
    let start = times[0];
    // Whole one-second windows from the first arrival.
    let mut windows = vec![0usize; 4];
    for t in &times {
        let s = t.duration_since(start).as_secs_f64();
        if let Some(w) = windows.get_mut(s as usize) {
            *w += 1;
        }
    }
    eprintln!("messages per second: {windows:?}");
    for (i, w) in windows.iter().enumerate() {
        assert!(
            (9..=11).contains(w),
            "window {i}: {w} messages (want 10 ± 1): {windows:?}"
        );
    }
    let span = times[n - 1].duration_since(start).as_secs_f64();
    let rate = (n - 1) as f64 / span;
    assert!((9.0..=11.0).contains(&rate), "overall {rate:.2}/s");
}

#[test]
fn a_site_rule_caps_connections_across_its_domains() {
    let dns = DnsServer::start();
    let shared = common_port(&["127.0.0.2"]);
    let port = shared.port;
    // Two domains hosted at the same provider (MX hosts under bigmail.test).
    dns.mx("one.test", 10, "mx1.bigmail.test");
    dns.mx("two.test", 10, "mx2.bigmail.test");
    dns.a("mx1.bigmail.test", "127.0.0.2");
    dns.a("mx2.bigmail.test", "127.0.0.2");
    let mx = shared.mx(
        "127.0.0.2",
        Script {
            data_delay: Duration::from_millis(60),
            ..Script::default()
        },
    );
    let server = server(
        &dns,
        port,
        "[[shaping]]\nsite = \"bigmail.test\"\nmax_connections = 3\nmax_messages_per_connection = 5\n",
    );
    let addr = server.addr;
    let a = std::thread::spawn(move || blast(addr, "x@one.test", 30, 5));
    blast(addr, "y@two.test", 30, 5);
    a.join().unwrap();
    let got = mx.wait_for(60, 60);
    assert_eq!(got.len(), 60, "log:\n{}", server.log());
    let (max_active, connections) = (mx.max_active(), mx.connections());
    eprintln!("60 messages, {connections} connections, at most {max_active} at once");
    assert!(
        max_active <= 3,
        "the site cap of 3 was exceeded: {max_active}"
    );
    assert!(
        max_active >= 2,
        "expected parallel connections, saw {max_active}"
    );
    assert!(
        connections >= 12,
        "5 messages per connection means at least 12: {connections}"
    );
}

#[test]
fn greylisted_mail_is_retried_soon_not_on_the_long_schedule() {
    let (dns, port, mx) = destination(
        "grey.test",
        Script {
            rcpt: std::sync::Arc::new(|addr, seen| match (addr, seen) {
                ("hint@grey.test", 0) => {
                    "450 4.2.0 Greylisted, please try again in 1 seconds".into()
                }
                ("plain@grey.test", 0) => "451 4.7.1 greylisting in action, come back later".into(),
                _ => "250 2.1.5 ok".into(),
            }),
            ..Script::default()
        },
    );
    // The ordinary schedule would wait an hour; greylisting waits the hint, or 1 s here.
    let server = Server::start_delivering(&format!(
        "{}\n[delivery]\nsmtp_port = {port}\nretry_min = \"1h\"\ngreylist_retry = \"1s\"\nidle_timeout = \"1s\"\n",
        dns.config()
    ));
    let mut c = server.connect();
    c.hello();
    let r = c.send_mail(
        "a@sender.test",
        &["hint@grey.test"],
        b"Subject: 1\r\n\r\nhi\r\n",
    );
    assert_eq!(r.code, 250);
    let r = c.send_mail(
        "a@sender.test",
        &["plain@grey.test"],
        b"Subject: 2\r\n\r\nhi\r\n",
    );
    assert_eq!(r.code, 250);
    let got = mx.wait_for(2, 20);
    assert_eq!(got.len(), 2, "log:\n{}", server.log());
    for rcpt in ["hint@grey.test", "plain@grey.test"] {
        let e = server.wait_event(5, |e| e["type"] == "delivery" && e["recipient"] == rcpt);
        assert_eq!(e["attempt"], 2);
    }
}

#[test]
fn pools_bind_their_sources_and_limits_apply_per_source() {
    let (dns, port, mx) = destination(
        "dest.test",
        Script {
            data_delay: Duration::from_millis(80),
            ..Script::default()
        },
    );
    let server = server(
        &dns,
        port,
        "[[source]]\nname = \"ip10\"\naddress = \"127.0.0.10\"\nehlo = \"out10.sender.test\"\n\
         [[source]]\nname = \"ip11\"\naddress = \"127.0.0.11\"\nehlo = \"out11.sender.test\"\n\
         [[pool]]\nname = \"news\"\nsources = [\"ip10\", \"ip11\"]\nsender_domains = [\"news.test\"]\n\
         [[shaping]]\ndomain = \"dest.test\"\nmax_connections = 1\nmax_messages_per_connection = 2\n",
    );
    let addr = server.addr;
    let threads: Vec<_> = (0..4)
        .map(|t| {
            std::thread::spawn(move || {
                let mut c = common::Client::connect(addr);
                c.hello();
                for i in 0..6 {
                    let from = if t == 0 {
                        "a@other.test"
                    } else {
                        "a@news.test"
                    };
                    let r = c.send_mail(
                        from,
                        &["z@dest.test"],
                        format!("Subject: {t}-{i}\r\n\r\nx\r\n").as_bytes(),
                    );
                    assert_eq!(r.code, 250);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let got = mx.wait_for(24, 60);
    assert_eq!(got.len(), 24, "log:\n{}", server.log());
    for m in &got {
        let ip = m.peer.to_string();
        if m.mail_from == "a@news.test" {
            assert!(
                ip == "127.0.0.10" || ip == "127.0.0.11",
                "news mail from {ip}"
            );
            assert_eq!(m.helo, format!("out{}.sender.test", &ip[8..]));
        } else {
            assert!(
                ip != "127.0.0.10" && ip != "127.0.0.11",
                "other mail from a pool source"
            );
            assert_eq!(m.helo, "mx.test.example");
        }
    }
    let used: std::collections::HashSet<_> = got.iter().map(|m| m.peer).collect();
    assert!(
        used.len() >= 3,
        "both pool sources and the default address: {used:?}"
    );
    // One connection per source (and one for the default) under the cap of 1 per source.
    let max_active = mx.max_active();
    assert!(
        (2..=3).contains(&max_active),
        "max {max_active} connections at once"
    );
}

#[test]
fn a_rate_limited_reply_suspends_the_destination_then_it_resumes() {
    let (dns, port, mx) = destination(
        "busy.test",
        Script {
            // The first recipient is refused with a rate-limit reply; everything after is fine.
            rcpt: std::sync::Arc::new(|addr, seen| {
                if addr == "first@busy.test" && seen == 0 {
                    "421 4.7.0 Rate limited, slow down".into()
                } else {
                    "250 2.1.5 ok".into()
                }
            }),
            ..Script::default()
        },
    );
    let server = server(
        &dns,
        port,
        "[[backoff]]\ncode = 421\npattern = \"(?i)rate limit\"\naction = \"suspend\"\nduration = \"2s\"\n",
    );
    let mut c = server.connect();
    c.hello();
    assert_eq!(
        c.send_mail(
            "a@sender.test",
            &["first@busy.test"],
            b"Subject: 1\r\n\r\nx\r\n"
        )
        .code,
        250
    );
    let e = server.wait_event(10, |e| e["type"] == "shaping");
    assert_eq!(e["destination"], "busy.test");
    assert!(
        e["response"].as_str().unwrap().starts_with("suspended"),
        "{e}"
    );
    let suspended_at = std::time::Instant::now();
    // Mail sent during the suspension waits for its end.
    for i in 0..3 {
        let r = c.send_mail(
            "a@sender.test",
            &["later@busy.test"],
            format!("Subject: {i}\r\n\r\nx\r\n").as_bytes(),
        );
        assert_eq!(r.code, 250);
    }
    let waiting = server.wait_event(10, |e| {
        e["type"] == "held" && e["recipient"] == "later@busy.test"
    });
    assert!(
        waiting["response"].as_str().unwrap().contains("suspended"),
        "{waiting}"
    );
    let got = mx.wait_for(4, 30);
    assert_eq!(got.len(), 4, "log:\n{}", server.log());
    // Nothing reached the MX until the suspension was over (~2 s after it began).
    let first_after = got.iter().map(|m| m.at).min().unwrap();
    assert!(
        first_after.duration_since(suspended_at) >= Duration::from_millis(1500),
        "delivered during the suspension"
    );
}

#[test]
fn send_at_and_delivery_windows_hold_mail_until_their_time() {
    let (dns, port, mx) = destination("later.test", Script::default());
    let server = server(&dns, port, "");
    let now = jiff::Timestamp::now();
    let in_2s = now + jiff::SignedDuration::from_secs(2);
    let utc = now.to_zoned(jiff::tz::TimeZone::UTC);
    let hhmm = |z: &jiff::Zoned| z.strftime("%H:%M").to_string();
    let open_window = format!(
        "{}-{} UTC",
        hhmm(&(utc.clone() - jiff::SignedDuration::from_hours(1))),
        hhmm(&(utc.clone() + jiff::SignedDuration::from_hours(1)))
    );
    let closed_window = format!(
        "{}-{} Asia/Tokyo",
        hhmm(
            &(utc.with_time_zone(jiff::tz::TimeZone::get("Asia/Tokyo").unwrap())
                + jiff::SignedDuration::from_hours(3))
        ),
        hhmm(
            &(utc.with_time_zone(jiff::tz::TimeZone::get("Asia/Tokyo").unwrap())
                + jiff::SignedDuration::from_hours(4))
        )
    );
    let mut c = server.connect();
    c.hello();
    let scheduled = format!("X-Baton-Send-At: {in_2s}\r\nSubject: scheduled\r\n\r\nlater\r\n");
    assert_eq!(
        c.send_mail("a@sender.test", &["s@later.test"], scheduled.as_bytes())
            .code,
        250
    );
    let open = format!("X-Baton-Window: {open_window}\r\nSubject: window open\r\n\r\nnow\r\n");
    assert_eq!(
        c.send_mail("a@sender.test", &["w@later.test"], open.as_bytes())
            .code,
        250
    );
    let closed =
        format!("Subject: window closed\r\nX-Baton-Window: {closed_window}\r\n\r\nnot yet\r\n");
    let held_id = c
        .send_mail("a@sender.test", &["h@later.test"], closed.as_bytes())
        .queue_id();
    // Bad values are refused at once, not lost later.
    let r = c.send_mail(
        "a@sender.test",
        &["x@later.test"],
        b"X-Baton-Send-At: soonish\r\n\r\nx\r\n",
    );
    assert_eq!((r.code, &r.lines[0][..5]), (550, "5.6.0"));

    let first = mx.wait_for(1, 10);
    assert_eq!(first.len(), 1, "log:\n{}", server.log());
    assert_eq!(
        first[0].rcpts,
        vec!["w@later.test"],
        "only the open window goes at once"
    );
    let got = mx.wait_for(2, 10);
    assert_eq!(got.len(), 2);
    let sched = &got[1];
    assert_eq!(sched.rcpts, vec!["s@later.test"]);
    let sent_at = jiff::Timestamp::now();
    assert!(sent_at >= in_2s, "delivered before its send-at time");
    for m in &got {
        let text = String::from_utf8_lossy(&m.body);
        assert!(
            !text.to_ascii_lowercase().contains("x-baton-"),
            "control headers stripped:\n{text}"
        );
    }
    // The closed window holds its message until the window opens, hours from now.
    let m = server.message_json(&held_id);
    let next = m["recipients"][0]["next_attempt_ms"]
        .as_u64()
        .expect("a next attempt");
    let hours = (next as i64 - jiff::Timestamp::now().as_millisecond()) as f64 / 3.6e6;
    assert!(
        (2.9..=3.1).contains(&hours),
        "held for {hours:.2} h, want ~3 h"
    );
    assert_eq!(mx.messages().len(), 2);
}

#[test]
fn a_warmup_cap_lets_exactly_that_many_through_and_holds_the_rest() {
    let (dns, port, mx) = destination("inbox.test", Script::default());
    let today = jiff::Timestamp::now()
        .to_zoned(jiff::tz::TimeZone::UTC)
        .date();
    let yesterday = today.yesterday().unwrap();
    // ip10 started today (cap 3); ip11 started yesterday, so it is on day 2 (cap 5).
    let server = server(
        &dns,
        port,
        &format!(
            "[[source]]\nname = \"ip10\"\naddress = \"127.0.0.10\"\nwarmup = [3, 5]\nwarmup_start = \"{today}\"\n\
             [[source]]\nname = \"ip11\"\naddress = \"127.0.0.11\"\nwarmup = [3, 5]\nwarmup_start = \"{yesterday}\"\n\
             [[pool]]\nname = \"new\"\nsources = [\"ip10\"]\nsender_domains = [\"new.test\"]\n\
             [[pool]]\nname = \"older\"\nsources = [\"ip11\"]\nsender_domains = [\"older.test\"]\n"
        ),
    );
    let mut c = server.connect();
    c.hello();
    for i in 0..6 {
        for from in ["a@new.test", "a@older.test"] {
            let r = c.send_mail(
                from,
                &["u@inbox.test"],
                format!("Subject: {i}\r\n\r\nx\r\n").as_bytes(),
            );
            assert_eq!(r.code, 250);
        }
    }
    let got = mx.wait_for(8, 20);
    std::thread::sleep(Duration::from_millis(500));
    let got_now = mx.messages();
    assert_eq!(got_now.len(), got.len(), "more arrived after the caps");
    let from_new = got_now
        .iter()
        .filter(|m| m.mail_from == "a@new.test")
        .count();
    let from_older = got_now
        .iter()
        .filter(|m| m.mail_from == "a@older.test")
        .count();
    assert_eq!((from_new, from_older), (3, 5), "log:\n{}", server.log());
    // The rest waits for tomorrow (UTC midnight), held, not bounced, no attempt spent.
    let tomorrow = today
        .tomorrow()
        .unwrap()
        .to_zoned(jiff::tz::TimeZone::UTC)
        .unwrap();
    let tomorrow_ms = tomorrow.timestamp().as_millisecond() as u64;
    let waiting: Vec<_> = server
        .queue_json()
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["recipients"][0].clone())
        .collect();
    assert_eq!(waiting.len(), 4);
    for r in &waiting {
        assert_eq!(r["next_attempt_ms"], tomorrow_ms, "{r}");
        assert_eq!(r["attempts"].as_array().unwrap().len(), 0, "{r}");
        assert_eq!(r["state"], "queued");
    }
    let held = server.wait_event(5, |e| e["type"] == "held");
    assert!(
        held["response"].as_str().unwrap().contains("warm-up cap"),
        "{held}"
    );
}

#[test]
fn a_greylisted_retry_leaves_from_the_same_source() {
    let (dns, port, mx) = destination(
        "grey.test",
        Script {
            rcpt: std::sync::Arc::new(|_, seen| {
                if seen == 0 {
                    "451 4.7.1 Greylisted, try again in 1 seconds".into()
                } else {
                    "250 2.1.5 ok".into()
                }
            }),
            ..Script::default()
        },
    );
    let server = server(
        &dns,
        port,
        "max_messages_per_connection = 1\n\
         [[source]]\nname = \"ip10\"\naddress = \"127.0.0.10\"\n\
         [[source]]\nname = \"ip11\"\naddress = \"127.0.0.11\"\n\
         [[pool]]\nname = \"p\"\nsources = [\"ip10\", \"ip11\"]\nsender_domains = [\"sender.test\"]\n",
    );
    let mut c = server.connect();
    c.hello();
    let n = 12;
    for i in 0..n {
        let r = c.send_mail(
            "a@sender.test",
            &[&*format!("r{i}@grey.test")],
            b"Subject: g\r\n\r\nx\r\n",
        );
        assert_eq!(r.code, 250);
    }
    let got = mx.wait_for(n, 30);
    assert_eq!(got.len(), n, "log:\n{}", server.log());
    let log = mx.stats.lock().unwrap().rcpt_log.clone();
    let mut sources = std::collections::HashSet::new();
    for m in &got {
        let rcpt = &m.rcpts[0];
        let first = log.iter().find(|(a, _, _)| a == rcpt).unwrap();
        assert!(first.2.starts_with("451"), "{first:?}");
        assert_eq!(
            first.1, m.peer,
            "{rcpt}: greylisted from {} but retried from {}",
            first.1, m.peer
        );
        sources.insert(m.peer);
    }
    assert_eq!(sources.len(), 2, "both sources were used: {sources:?}");
}

#[test]
fn a_throttled_destination_ramps_back_after_successes() {
    let (dns, port, mx) = destination(
        "slowdown.test",
        Script {
            rcpt: std::sync::Arc::new(|addr, seen| {
                if addr == "first@slowdown.test" && seen == 0 {
                    "421 4.7.0 Rate limited, slow down".into()
                } else {
                    "250 2.1.5 ok".into()
                }
            }),
            ..Script::default()
        },
    );
    // The destination has no rate of its own: a throttle holds it to 10/s × factor, here
    // 2.5/s, doubling after every 10 deliveries in a row until it is free again.
    let server = server(
        &dns,
        port,
        "[[backoff]]\npattern = \"(?i)rate limited\"\naction = \"throttle\"\nfactor = 0.25\nduration = \"1h\"\n",
    );
    let mut c = server.connect();
    c.hello();
    c.send_mail(
        "a@sender.test",
        &["first@slowdown.test"],
        b"Subject: 0\r\n\r\nx\r\n",
    );
    let e = server.wait_event(10, |e| e["type"] == "shaping");
    assert!(
        e["response"]
            .as_str()
            .unwrap()
            .starts_with("message rate and connections cut to 25%"),
        "{e}"
    );
    for i in 0..30 {
        let r = c.send_mail(
            "a@sender.test",
            &["next@slowdown.test"],
            format!("Subject: {i}\r\n\r\nx\r\n").as_bytes(),
        );
        assert_eq!(r.code, 250);
    }
    let got = mx.wait_for(31, 60);
    assert_eq!(got.len(), 31, "log:\n{}", server.log());
    let mut times: Vec<_> = got
        .iter()
        .filter(|m| m.rcpts[0] == "next@slowdown.test")
        .map(|m| m.at)
        .collect();
    times.sort();
    let span = |a: usize, b: usize| times[b].duration_since(times[a]).as_secs_f64();
    // 25%: 400 ms apart; then 50%: 200 ms; then free.
    let (slow, medium, free) = (span(0, 9), span(10, 19), span(21, 29));
    eprintln!("10 at 25%: {slow:.2} s, 10 at 50%: {medium:.2} s, 9 recovered: {free:.2} s");
    assert!(
        slow >= 3.2,
        "throttled to 2.5/s, 9 gaps should take 3.6 s: {slow:.2}"
    );
    assert!(
        medium >= 1.5 && medium < slow,
        "ramping: {medium:.2} s; log:\n{}",
        server.log()
    );
    assert!(free < medium, "recovered: {free:.2} s");
    let changes: Vec<String> = server
        .events()
        .iter()
        .filter(|e| e["type"] == "shaping")
        .map(|e| e["response"].as_str().unwrap_or("").to_string())
        .collect();
    assert!(
        changes
            .iter()
            .any(|c| c.starts_with("recovering: message rate and connections at 50%")),
        "{changes:?}"
    );
    assert!(
        changes.iter().any(|c| c == "recovered: normal rate"),
        "{changes:?}"
    );
}
