//! Webhooks against a real HTTP receiver on loopback that is down, then up, then down across
//! a kill -9 of Baton: nothing is lost, every batch is signed with HMAC-SHA256.

mod common;

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Server, free_port};

const SECRET: &str = "a-webhook-secret-of-some-length";

/// One POST as received: the signature header and the body.
struct Post {
    signature: String,
    body: String,
}

/// An HTTP receiver that answers 200 to every POST and keeps them.
struct Receiver {
    posts: Arc<Mutex<Vec<Post>>>,
    stop: Arc<AtomicBool>,
}

impl Receiver {
    fn start(port: u16) -> Receiver {
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind the receiver");
        listener.set_nonblocking(true).unwrap();
        let posts = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (posts.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                let Ok((stream, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                };
                stream.set_nonblocking(false).unwrap();
                if let Some(post) = read_post(&stream) {
                    p.lock().unwrap().push(post);
                    let mut w = &stream;
                    let _ = w.write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    );
                }
            }
        });
        Receiver { posts, stop }
    }

    /// Every event received so far.
    fn events(&self) -> Vec<serde_json::Value> {
        self.posts
            .lock()
            .unwrap()
            .iter()
            .flat_map(|p| {
                serde_json::from_str::<Vec<serde_json::Value>>(&p.body).expect("a JSON array")
            })
            .collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(100)); // the listener closes with the thread
    }
}

fn read_post(stream: &std::net::TcpStream) -> Option<Post> {
    let mut reader = BufReader::new(stream);
    let mut length = 0;
    let mut signature = String::new();
    let mut first = String::new();
    reader.read_line(&mut first).ok()?;
    assert!(first.starts_with("POST /hook "), "{first}");
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).ok()?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (name, value) = line.split_once(':')?;
        match name.to_ascii_lowercase().as_str() {
            "content-length" => length = value.trim().parse().ok()?,
            "x-baton-signature" => signature = value.trim().to_string(),
            _ => {}
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    Some(Post {
        signature,
        body: String::from_utf8(body).ok()?,
    })
}

fn send(server: &Server, n: usize, tag: &str) {
    let mut c = server.connect();
    c.hello();
    for i in 0..n {
        let r = c.send_mail(
            "alice@example.com",
            &[&format!("{tag}{i}@example.net")],
            b"Subject: hook\r\n\r\nx\r\n",
        );
        assert_eq!(r.code, 250);
    }
}

fn wait_for_recipients(receiver: &Receiver, wanted: &[String], server: &Server) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got: HashSet<String> = receiver
            .events()
            .iter()
            .map(|e| e["recipient"].as_str().unwrap().to_string())
            .collect();
        if wanted.iter().all(|w| got.contains(w)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "missing {:?}\nlog:\n{}",
            wanted
                .iter()
                .filter(|w| !got.contains(*w))
                .collect::<Vec<_>>(),
            server.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_receiver_that_is_down_loses_nothing_and_batches_are_signed() {
    let port = free_port();
    let mut server = Server::start(&format!(
        "[[webhook]]\nurl = \"http://127.0.0.1:{port}/hook\"\nsecret = \"{SECRET}\"\nevents = [\"reception\"]\nbatch_size = 4\n"
    ));
    // Down: nothing listens on the port yet.
    send(&server, 6, "early");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !server.log().contains("event export failed") {
        assert!(Instant::now() < deadline, "no failed attempt logged");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Up: the backlog arrives, in batches of at most four.
    let receiver = Receiver::start(port);
    let early: Vec<String> = (0..6).map(|i| format!("early{i}@example.net")).collect();
    wait_for_recipients(&receiver, &early, &server);
    drop(receiver);

    // Down again, and Baton killed: the offset on disk says where to resume.
    send(&server, 3, "late");
    server.wait_event(10, |e| e["recipient"] == "late2@example.net");
    server.kill9();
    server.spawn();
    let receiver = Receiver::start(port);
    let late: Vec<String> = (0..3).map(|i| format!("late{i}@example.net")).collect();
    wait_for_recipients(&receiver, &late, &server);

    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SECRET.as_bytes());
    for post in receiver.posts.lock().unwrap().iter() {
        let expected = hex::encode(ring::hmac::sign(&key, post.body.as_bytes()).as_ref());
        assert_eq!(post.signature, format!("sha256={expected}"));
        let batch: Vec<serde_json::Value> = serde_json::from_str(&post.body).unwrap();
        assert!(!batch.is_empty() && batch.len() <= 4);
        for e in batch {
            assert_eq!(e["type"], "reception", "only the types asked for");
            for key in ["id", "type", "message_id", "recipient", "timestamp"] {
                assert!(e.get(key).is_some(), "{key} missing in {e}");
            }
        }
    }
}

/// A server with a webhook to a receiver on `port`, stopped once the webhook has saved its
/// first offset, so that the test can damage the log or the offset before the next start.
fn stopped_server_with_a_webhook(port: u16) -> Server {
    let mut server = Server::start(&format!(
        "[[webhook]]\nurl = \"http://127.0.0.1:{port}/hook\"\nsecret = \"{SECRET}\"\nevents = [\"reception\"]\n"
    ));
    send(&server, 1, "before");
    server.wait_event(10, |e| e["recipient"] == "before0@example.net");
    server.terminate();
    server
}

fn append(path: &std::path::Path, bytes: &[u8]) {
    std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .unwrap()
        .write_all(bytes)
        .unwrap();
}

#[test]
fn a_torn_or_overlong_event_line_stops_no_webhook() {
    let port = free_port();
    let mut server = stopped_server_with_a_webhook(port);
    let log = server.data_dir().join("events/events.jsonl");
    // An event line over 1 MiB (an old log may hold one), then a line torn by a crash.
    let long = format!(
        "{{\"type\":\"reception\",\"recipient\":\"long@example.net\",\"response\":\"{}\"}}\n",
        "r".repeat(2 << 20)
    );
    append(&log, long.as_bytes());
    append(&log, b"{\"type\":\"reception\",\"recipient\":\"torn@exa");
    server.spawn();
    let receiver = Receiver::start(port);
    send(&server, 3, "after");
    let after: Vec<String> = (0..3).map(|i| format!("after{i}@example.net")).collect();
    wait_for_recipients(&receiver, &after, &server);
    // Every line of the log is whole JSON: the torn tail was cut, not glued to the next event.
    let text = std::fs::read_to_string(&log).unwrap();
    for line in text.lines() {
        assert!(
            serde_json::from_str::<serde_json::Value>(line).is_ok(),
            "not JSON: {}",
            &line[..line.len().min(200)]
        );
    }
}

#[test]
fn an_offset_past_the_end_of_the_log_is_brought_back() {
    let port = free_port();
    let mut server = stopped_server_with_a_webhook(port);
    // As after a power cut: the offset was saved, the last second of the log was not.
    let offsets = server.data_dir().join("webhooks");
    let file = std::fs::read_dir(&offsets)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let log_len = std::fs::metadata(server.data_dir().join("events/events.jsonl"))
        .unwrap()
        .len();
    std::fs::write(&file, (log_len + 300).to_string()).unwrap();
    server.spawn();
    let receiver = Receiver::start(port);
    send(&server, 3, "after");
    let after: Vec<String> = (0..3).map(|i| format!("after{i}@example.net")).collect();
    wait_for_recipients(&receiver, &after, &server);
}

/// The event log cut into files of 2 KiB: the webhook gets every event across the cuts, the
/// events API pages across files, a finished message's history is found in an old file, and
/// `events.jsonl` links to the newest file.
#[test]
fn rotation_loses_no_event_for_webhooks_or_readers() {
    use common::http::get;
    let port = free_port();
    let receiver = Receiver::start(port);
    let server = Server::start(&format!(
        "[events]\nfile_size = \"2KiB\"\n[[webhook]]\nurl = \"http://127.0.0.1:{port}/hook\"\nsecret = \"{SECRET}\"\nevents = [\"reception\"]\nbatch_size = 3\n"
    ));
    let mut c = server.connect();
    c.hello();
    let first = c.send_mail(
        "alice@example.com",
        &["gone@example.net"],
        b"Subject: x\r\n\r\ny\r\n",
    );
    assert_eq!(first.code, 250);
    let first_id = first.queue_id();
    let out = server.cli(&["queue", "delete", &first_id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(c);
    send(&server, 40, "rot");
    let wanted: Vec<String> = (0..40).map(|i| format!("rot{i}@example.net")).collect();
    wait_for_recipients(&receiver, &wanted, &server);

    let dir = server.data_dir().join("events");
    let files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("events-"))
        .collect();
    assert!(files.len() >= 3, "{files:?}");
    let link = std::fs::read_link(dir.join("events.jsonl")).expect("a link");
    let newest = files.iter().max().unwrap();
    assert_eq!(link.to_string_lossy(), *newest);
    // Each reception once, in order, none lost at a cut.
    let receptions: Vec<String> = receiver
        .events()
        .iter()
        .map(|e| e["recipient"].as_str().unwrap().to_string())
        .filter(|r| r.starts_with("rot"))
        .collect();
    assert_eq!(receptions, wanted);
    // The events API pages through every file.
    let mut seen = Vec::new();
    let mut after = String::new();
    loop {
        let page = get(
            server.http,
            &format!("/api/v1/events?type=reception&limit=7{after}"),
        )
        .json();
        for e in page["events"].as_array().unwrap() {
            seen.push(e["recipient"].as_str().unwrap().to_string());
        }
        match page["next"].as_str() {
            Some(next) => after = format!("&after={next}"),
            None => break,
        }
    }
    assert_eq!(seen.len(), 41, "{seen:?}");
    // The deleted message is in the oldest file; its history is still found.
    let status = get(server.http, &format!("/api/v1/messages/{first_id}")).json();
    assert_eq!(
        status["recipients"][0]["email"], "gone@example.net",
        "{status}"
    );
}
