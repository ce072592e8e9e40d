//! Durability: many concurrent clients, the server SIGKILLed mid-load, then restarted.
//! Every message that got a 250 must be in the spool byte-exact; a message whose data was cut
//! off (no final dot sent) must never be there.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{Client, Server, dot_stuff, strip_received};

#[derive(Debug, Clone)]
struct Sent {
    body: Vec<u8>,
    final_dot_sent: bool,
    acked_id: Option<String>,
}

fn body_for(thread: usize, i: usize) -> Vec<u8> {
    let marker = format!("t{thread}-m{i}");
    let mut body = format!("Subject: {marker}\r\nX-Marker: {marker}\r\n\r\n").into_bytes();
    // Mostly small messages, every 7th large enough to spill to its own file.
    let lines = if i % 7 == 3 {
        6000
    } else {
        10 + (i * 37 + thread * 11) % 200
    };
    for l in 0..lines {
        body.extend_from_slice(format!("{marker} line {l} .{}\r\n", "x".repeat(l % 50)).as_bytes());
        if l % 13 == 0 {
            body.extend_from_slice(b".leading dot\r\n");
        }
    }
    body
}

fn marker_of(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let start = text.find("X-Marker: ").expect("marker") + 10;
    text[start..].split("\r\n").next().unwrap().to_string()
}

fn client_loop(
    server: std::net::SocketAddr,
    thread: usize,
    slow: bool,
    sent: Arc<Mutex<HashMap<String, Sent>>>,
    acks: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
) {
    let mut c = Client::connect(server);
    c.hello();
    for i in 0.. {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let body = body_for(thread, i);
        let marker = format!("t{thread}-m{i}");
        sent.lock().unwrap().insert(
            marker.clone(),
            Sent {
                body: body.clone(),
                final_dot_sent: false,
                acked_id: None,
            },
        );
        let ok = (|| {
            c.stream
                .set_write_timeout(Some(Duration::from_secs(5)))
                .ok()?;
            use std::io::Write;
            c.stream
                .write_all(
                    b"MAIL FROM:<load@example.com>\r\nRCPT TO:<sink@example.net>\r\nDATA\r\n",
                )
                .ok()?;
            for _ in 0..3 {
                let code = c.try_reply()?.code;
                if code != 250 && code != 354 {
                    return None;
                }
            }
            let stuffed = dot_stuff(&body);
            let (a, b) = stuffed.split_at(stuffed.len() / 2);
            c.stream.write_all(a).ok()?;
            if slow {
                thread::sleep(Duration::from_millis(30));
            }
            c.stream.write_all(b).ok()?;
            c.stream.write_all(b".\r\n").ok()?;
            sent.lock().unwrap().get_mut(&marker)?.final_dot_sent = true;
            let r = c.try_reply()?;
            if r.code == 250 {
                sent.lock().unwrap().get_mut(&marker)?.acked_id = Some(r.queue_id());
                acks.fetch_add(1, Ordering::Relaxed);
            }
            Some(())
        })();
        if ok.is_none() {
            return;
        }
    }
}

#[test]
fn sigkill_under_load_loses_no_acknowledged_message() {
    let mut server = Server::start("");
    let sent = Arc::new(Mutex::new(HashMap::new()));
    let acks = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..16)
        .map(|t| {
            let (sent, acks, stop) = (sent.clone(), acks.clone(), stop.clone());
            let addr = server.addr;
            thread::spawn(move || client_loop(addr, t, t % 4 == 0, sent, acks, stop))
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while acks.load(Ordering::Relaxed) < 300 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    server.kill9();
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    let sent = sent.lock().unwrap().clone();
    let acked: Vec<&Sent> = sent.values().filter(|s| s.acked_id.is_some()).collect();
    let cut_off = sent.values().filter(|s| !s.final_dot_sent).count();
    assert!(
        acked.len() >= 300,
        "only {} acks before the kill",
        acked.len()
    );

    // Restart on the same data: recovery must cut any torn record and serve again.
    server.spawn();
    let ids = server.queued_ids();
    let mut seen = HashMap::new();
    for id in &ids {
        let stored = server.body(id);
        let body = strip_received(&stored).to_vec();
        let marker = marker_of(&body);
        let s = sent
            .get(&marker)
            .unwrap_or_else(|| panic!("{id} holds unknown message {marker}"));
        assert!(
            s.final_dot_sent,
            "{marker} was cut off mid-DATA but is in the spool as {id}"
        );
        assert_eq!(body, s.body, "{marker} ({id}) is not byte-exact");
        assert!(
            seen.insert(marker.clone(), id.clone()).is_none(),
            "{marker} stored twice"
        );
    }
    for s in &acked {
        let marker = marker_of(&s.body);
        let id = s.acked_id.as_ref().unwrap();
        assert_eq!(
            seen.get(&marker),
            Some(id),
            "acknowledged {marker} ({id}) was lost"
        );
    }
    let unacked_but_stored = ids.len() - acked.len();
    eprintln!(
        "crash test: {} acked, {} stored after restart ({} complete but unacknowledged at the kill), {} cut off mid-DATA",
        acked.len(),
        ids.len(),
        unacked_but_stored,
        cut_off
    );
    assert!(server.log().contains("spool recovered"));

    // The recovered server takes new mail, with an id after every old one.
    let mut c = server.connect();
    c.hello();
    let r = c.send_mail("a@example.com", &["b@example.net"], b"after restart\r\n");
    assert_eq!(r.code, 250);
    let new_id = r.queue_id();
    assert!(ids.iter().all(|old| *old < new_id));
    assert_eq!(server.queued_ids().len(), ids.len() + 1);
}
