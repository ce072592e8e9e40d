//! Faults under load (issue "Endure", item 5): kill -9 again and again while mail arrives over
//! SMTP and the API and is delivered, with segments and event files small enough that
//! compaction and rotation run all the time; receiving servers that hang after DATA or close
//! after every command; the DNS server gone for a while. Each ends with every acknowledged
//! recipient delivered (or still deferred, as configured), and duplicates counted.

mod common;

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::mx::{FakeMx, Script};
use common::world::{World, send};

type Acked = Arc<Mutex<HashSet<String>>>;

/// Reads one (possibly multi-line) SMTP reply; its code.
fn reply(reader: &mut BufReader<TcpStream>) -> Option<u16> {
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        if line.as_bytes().get(3) != Some(&b'-') {
            return line.get(..3)?.parse().ok();
        }
    }
}

/// One SMTP session sending one-recipient messages until `stop` or an error; each recipient
/// whose message got its 250 joins `acked`.
fn smtp_session(addr: SocketAddr, tag: &str, next: &AtomicUsize, acked: &Acked, stop: &AtomicBool) {
    let Ok(stream) = TcpStream::connect(addr) else {
        return;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let Ok(mut w) = stream.try_clone() else {
        return;
    };
    let mut r = BufReader::new(stream);
    let ok = |code: Option<u16>, want: u16| code == Some(want);
    if !ok(reply(&mut r), 220) || w.write_all(b"EHLO load.test\r\n").is_err() {
        return;
    }
    if !ok(reply(&mut r), 250) {
        return;
    }
    while !stop.load(Ordering::Relaxed) {
        let rcpt = format!("{tag}-{}@dest.test", next.fetch_add(1, Ordering::Relaxed));
        let head = format!("MAIL FROM:<alice@sender.test>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n");
        if w.write_all(head.as_bytes()).is_err()
            || !ok(reply(&mut r), 250)
            || !ok(reply(&mut r), 250)
            || !ok(reply(&mut r), 354)
        {
            return;
        }
        let body = format!("Subject: {rcpt}\r\n\r\nfor {rcpt}\r\n.\r\n");
        if w.write_all(body.as_bytes()).is_err() {
            return;
        }
        match reply(&mut r) {
            Some(250) => {
                acked.lock().unwrap().insert(rcpt);
                // Paced: the point is faults under load, not a backlog that takes minutes.
                thread::sleep(Duration::from_millis(10));
            }
            Some(_) => {}
            None => return,
        }
    }
}

/// One API injection of five recipients; they join `acked` on a 202.
fn api_inject(http: SocketAddr, n: usize, acked: &Acked) {
    let rcpts: Vec<String> = (0..5).map(|k| format!("api{n}-{k}@dest.test")).collect();
    let body = serde_json::json!({
        "envelope_sender": "alice@sender.test",
        "content": "Subject: api\r\n\r\nthrough the API\r\n",
        "recipients": rcpts.iter().map(|e| serde_json::json!({"email": e})).collect::<Vec<_>>(),
    })
    .to_string();
    let Ok(mut s) = TcpStream::connect(http) else {
        return;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let req = format!(
        "POST /api/v1/inject HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut answer = String::new();
    if s.write_all(req.as_bytes()).is_ok()
        && s.read_to_string(&mut answer).is_ok()
        && answer.starts_with("HTTP/1.1 202")
    {
        acked.lock().unwrap().extend(rcpts);
    }
}

/// Load until `stop`: `smtp` sessions that reconnect after every failure, and API calls.
fn load(
    smtp: SocketAddr,
    http: SocketAddr,
    sessions: usize,
    acked: &Acked,
    stop: &Arc<AtomicBool>,
) -> Vec<thread::JoinHandle<()>> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut threads = Vec::new();
    for t in 0..sessions {
        let (acked, stop, next) = (acked.clone(), stop.clone(), next.clone());
        threads.push(thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                smtp_session(smtp, &format!("s{t}"), &next, &acked, &stop);
                thread::sleep(Duration::from_millis(20));
            }
        }));
    }
    let (acked, stop) = (acked.clone(), stop.clone());
    threads.push(thread::spawn(move || {
        for n in 0.. {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            api_inject(http, n, &acked);
            thread::sleep(Duration::from_millis(50));
        }
    }));
    threads
}

/// Waits until `mx` has received every address in `wanted`; deliveries per address.
fn delivered_all(mx: &FakeMx, wanted: &HashSet<String>, secs: u64) -> HashMap<String, usize> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let mut count: HashMap<String, usize> = HashMap::new();
        for m in mx.messages() {
            for r in m.rcpts {
                *count.entry(r).or_default() += 1;
            }
        }
        let missing: Vec<&String> = wanted.iter().filter(|w| !count.contains_key(*w)).collect();
        if missing.is_empty() {
            return count;
        }
        assert!(
            Instant::now() < deadline,
            "{} acknowledged recipients never delivered, e.g. {:?}",
            missing.len(),
            &missing[..missing.len().min(5)]
        );
        thread::sleep(Duration::from_millis(200));
    }
}

const CYCLES: usize = 20;

/// Twenty kill -9s while SMTP sessions and API calls bring mail that is delivered at once,
/// with one recipient deferred throughout (its record is what compaction must carry along),
/// 16 KiB journal segments and 16 KiB event files. Every acknowledged recipient is delivered;
/// duplicates stay within what can be in flight at a kill; the deferred one is still queued
/// with its attempts.
#[test]
fn kill_9_twenty_times_while_receiving_and_delivering() {
    let world = World::new(&["127.0.0.2", "127.0.0.3"]);
    world.dns.mx("dest.test", 10, "mx.dest.test");
    world.dns.a("mx.dest.test", "127.0.0.2");
    world.dns.mx("stuck.test", 10, "mx.stuck.test");
    world.dns.a("mx.stuck.test", "127.0.0.3");
    let mx = world.mx("127.0.0.2", Script::default());
    let stuck = Script {
        rcpt: Arc::new(|_, _| "451 4.7.1 try again later".into()),
        ..Script::default()
    };
    let _stuck_mx = world.mx("127.0.0.3", stuck);
    let _sender_mx = world.sender_mx();
    let mut server = world.server(
        "max_connections_per_destination = 4",
        "[spool]\nsegment_size = \"16KiB\"\n[events]\nfile_size = \"16KiB\"\n",
    );
    let waiting = send(
        &server,
        &["late@stuck.test"],
        b"Subject: stuck\r\n\r\nwaits\r\n",
    );

    let acked: Acked = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let threads = load(server.addr, server.http, 4, &acked, &stop);
    for _ in 0..CYCLES {
        thread::sleep(Duration::from_millis(400));
        server.kill9();
        server.spawn();
    }
    thread::sleep(Duration::from_millis(400));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= 200, "only {} acknowledged", acked.len());

    let count = delivered_all(&mx, &acked, 240);
    let deliveries: usize = count.values().sum();
    let duplicates = deliveries - count.len();
    eprintln!(
        "{CYCLES} kill -9s: {} recipients acknowledged, {} delivered, {duplicates} duplicate deliveries",
        acked.len(),
        count.len()
    );
    // At a kill, at most every connection's transaction (4, of up to 5 recipients) can have
    // been delivered without its outcome on disk.
    assert!(
        duplicates <= CYCLES * 4 * 5,
        "{duplicates} duplicates over {CYCLES} kills"
    );
    let queue = server.queue_json();
    let kept = queue
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == waiting.as_str())
        .unwrap_or_else(|| panic!("the deferred message was lost: {queue:#}"));
    assert!(
        !kept["recipients"][0]["attempts"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    assert!(
        mx.messages()
            .iter()
            .all(|m| !m.rcpts.iter().any(|r| r.ends_with("@stuck.test")))
    );
    let log = server.log();
    assert!(log.contains("journal compacted"), "no compaction ran");
    assert!(log.contains("event log: new file"), "no rotation ran");
}

/// Waits (at most `secs`) until `n` messages have reached `mx`.
fn wait_messages(mx: &FakeMx, n: usize, secs: u64) -> Vec<common::mx::Received> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let got = mx.messages();
        if got.len() >= n {
            return got;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {n} messages arrived",
            got.len()
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// Every recipient in `rcpts` ends as configured for a destination that never takes mail:
/// deferred until `max_age`, then expired with a bounce to the sender.
fn expires_with_a_bounce(server: &common::Server, sender_mx: &FakeMx, rcpts: &[&str]) {
    for r in rcpts {
        server.wait_event(60, |e| e["type"] == "expiration" && e["recipient"] == *r);
    }
    let dsns = wait_messages(sender_mx, rcpts.len(), 60);
    for r in rcpts {
        assert!(
            dsns.iter().any(|m| m.rcpts == ["alice@sender.test"]
                && String::from_utf8_lossy(&m.body).contains(r)),
            "no bounce for {r}"
        );
    }
    assert!(
        !server
            .events()
            .iter()
            .any(|e| e["type"] == "delivery" && e["recipient"] != "alice@sender.test"),
        "nothing was delivered"
    );
}

/// A receiving server that takes the data and never answers it: each attempt gives up after
/// `data_end_timeout`, is deferred (the message may have been taken), and the recipients
/// expire at `max_age` with a bounce. No worker stays stuck: SMTP still answers meanwhile.
#[test]
fn a_server_that_hangs_after_data_is_given_up_on() {
    let hang = Script {
        data_delay: Duration::from_secs(120),
        ..Script::default()
    };
    let (world, mx) = common::world::destination("dest.test", hang);
    let sender_mx = world.sender_mx();
    let server = world.server("data_end_timeout = \"1s\"\nmax_age = \"6s\"", "");
    let rcpts = ["a@dest.test", "b@dest.test"];
    for r in rcpts {
        send(
            &server,
            &[r],
            b"Subject: hang\r\n\r\nwaits for an answer\r\n",
        );
    }
    let deferral = server.wait_event(30, |e| e["type"] == "transient_failure");
    assert!(
        deferral["response"]
            .as_str()
            .unwrap_or("")
            .contains("end of data"),
        "{deferral}"
    );
    expires_with_a_bounce(&server, &sender_mx, &rcpts);
    assert!(mx.connections() >= 2, "the hanging server was tried");
    let mut c = server.connect();
    assert_eq!(c.hello().code, 250);
}

/// A receiving server that drops the connection after every command it answers: never a
/// transaction, so every attempt is deferred, retried on the schedule (not in a loop), and the
/// recipients expire with a bounce.
#[test]
fn a_server_that_closes_after_every_command_is_retried_on_schedule() {
    let closing = Script {
        close_after_commands: Some(1),
        ..Script::default()
    };
    let (world, mx) = common::world::destination("dest.test", closing);
    let sender_mx = world.sender_mx();
    let server = world.server("max_age = \"6s\"", "");
    let rcpts = ["a@dest.test", "b@dest.test"];
    for r in rcpts {
        send(&server, &[r], b"Subject: close\r\n\r\nnever taken\r\n");
    }
    expires_with_a_bounce(&server, &sender_mx, &rcpts);
    assert!(mx.messages().is_empty());
    // Retries 1-2 s apart over 6 s, a connection or two each: tens, not thousands.
    let connections = mx.connections();
    assert!((2..60).contains(&connections), "{connections} connections");
}

/// The DNS server gone (queries dropped) for a while: deliveries are deferred, not bounced,
/// and go out once it answers again.
#[test]
fn deliveries_wait_out_a_dns_outage() {
    let (world, mx) = common::world::destination("dest.test", Script::default());
    world.dns.set_down(true);
    let server = world.server("", "");
    let rcpts: Vec<String> = (0..5).map(|i| format!("r{i}@dest.test")).collect();
    for r in &rcpts {
        send(
            &server,
            &[r.as_str()],
            b"Subject: dns\r\n\r\nafter the outage\r\n",
        );
    }
    let deferral = server.wait_event(60, |e| e["type"] == "transient_failure");
    thread::sleep(Duration::from_secs(5));
    assert!(mx.messages().is_empty());
    assert!(
        !server.events().iter().any(|e| e["type"] == "bounce"),
        "a DNS outage bounced mail: {deferral}"
    );
    world.dns.set_down(false);
    let got = wait_messages(&mx, rcpts.len(), 60);
    let mut delivered: Vec<String> = got.iter().flat_map(|m| m.rcpts.clone()).collect();
    delivered.sort();
    assert_eq!(delivered, rcpts);
}

/// The disk fills while mail is delivered and bounced (RLIMIT_FSIZE on the server: a write
/// past it fails as on a full disk): a DSN returning a large message in full cannot be
/// written while the small outcome records can. Its recipient must not be recorded bounced
/// without its notice: after space comes back (a restart without the limit) every refused
/// recipient is bounced with a DSN, and every accepted one delivered.
#[test]
fn a_full_disk_while_bouncing_loses_no_notice() {
    let world = World::new(&["127.0.0.2", "127.0.0.3"]);
    world.dns.mx("dest.test", 10, "mx.dest.test");
    world.dns.a("mx.dest.test", "127.0.0.2");
    world.dns.mx("refuses.test", 10, "mx.refuses.test");
    world.dns.a("mx.refuses.test", "127.0.0.3");
    let mx = world.mx("127.0.0.2", Script::default());
    let refusing = Script {
        rcpt: Arc::new(|_, _| "550 5.1.1 no such user".into()),
        ..Script::default()
    };
    let _refusing_mx = world.mx("127.0.0.3", refusing);
    let sender_mx = world.sender_mx();
    // The originals (300 kB, in body files of their own) fit; their DSNs, which return them
    // in full, do not.
    let mut server = world.server_with_limit("", "", Some(295_000));
    let mut c = server.connect();
    c.hello();
    let delivered: HashSet<String> = (0..3).map(|i| format!("d{i}@dest.test")).collect();
    for to in &delivered {
        assert_eq!(
            c.send_mail(
                "alice@sender.test",
                &[to.as_str()],
                b"Subject: d\r\n\r\nsmall\r\n"
            )
            .code,
            250
        );
    }
    let refused = ["r0@refuses.test", "r1@refuses.test"];
    let large = format!(
        "Subject: large\r\n\r\n{}",
        "0123456789012345678\r\n".repeat(14_000)
    );
    for to in refused {
        assert_eq!(c.cmd("MAIL FROM:<alice@sender.test> RET=FULL").code, 250);
        assert_eq!(c.cmd(&format!("RCPT TO:<{to}>")).code, 250);
        assert_eq!(c.cmd("DATA").code, 354);
        c.send(large.as_bytes());
        c.send(b".\r\n");
        assert_eq!(c.reply().code, 250);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while server.log().matches("cannot queue a DSN").count() < 2 {
        assert!(Instant::now() < deadline, "no DSN met the full disk");
        thread::sleep(Duration::from_millis(100));
    }
    // Retried (and failing again) for a moment, then space comes back.
    thread::sleep(Duration::from_secs(2));
    server.kill9();
    server.file_size_limit = None;
    server.spawn();
    delivered_all(&mx, &delivered, 60);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let dsns: String = sender_mx
            .messages()
            .iter()
            .map(|m| String::from_utf8_lossy(&m.body).into_owned())
            .collect();
        let missing: Vec<&str> = refused
            .iter()
            .copied()
            .filter(|r| !dsns.contains(r))
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "refused recipients never bounced: {missing:?}"
        );
        thread::sleep(Duration::from_millis(200));
    }
}
