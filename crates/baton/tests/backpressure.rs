//! Backpressure (issue "Endure"): intake pauses with 452 4.3.1 (SMTP) and 503 (API) when the
//! queue is at `[spool] max_queued_recipients` or the spool's disk is nearly full; deliveries go
//! on, and intake resumes by itself.

mod common;

use std::time::{Duration, Instant};

use common::Server;
use common::http::post;
use common::mx::Script;
use common::world::{destination, event_for, send};
use serde_json::json;

fn inject(server: &Server, to: &str) -> common::http::Response {
    post(
        server.http,
        "/api/v1/inject",
        &json!({
            "envelope_sender": "news@sender.test",
            "content": {"from": "news@sender.test", "subject": "s", "text_body": "hi\n"},
            "recipients": [{"email": to}]
        }),
    )
}

#[test]
fn intake_pauses_at_the_queue_limit_and_resumes_as_the_queue_drains() {
    let (world, mx) = destination("dest.test", Script::default());
    let server = world.server("", "[spool]\nmax_queued_recipients = 2\n");
    let out = server.cli(&["suspend", "dest.test", "--for", "1h"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    send(
        &server,
        &["a@dest.test", "b@dest.test"],
        b"Subject: 1\r\n\r\nx\r\n",
    );
    // The queue holds its limit: the next MAIL waits, the API says why, nothing is lost.
    let mut c = server.connect();
    c.hello();
    let r = c.cmd("MAIL FROM:<alice@sender.test>");
    assert_eq!((r.code, r.text().contains("4.3.1")), (452, true), "{r:?}");
    assert!(r.text().contains("Insufficient system storage"), "{r:?}");
    assert!(r.text().contains("2 recipients queued"), "{r:?}");
    let api = inject(&server, "c@dest.test");
    assert_eq!(api.status, 503, "{}", api.body);
    assert!(
        api.json()["error"]
            .as_str()
            .unwrap()
            .contains("insufficient system storage")
    );

    // Deliveries go on: once the destination is resumed the queue drains and intake resumes.
    let out = server.cli(&["resume", "dest.test"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = mx.wait_for(1, 30);
    assert_eq!(got.len(), 1, "log:\n{}", server.log());
    server.wait_event(30, event_for("delivery", "b@dest.test"));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = c.cmd("MAIL FROM:<alice@sender.test>");
        if r.code == 250 {
            break;
        }
        assert_eq!(r.code, 452, "{r:?}");
        assert!(Instant::now() < deadline, "intake did not resume: {r:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    c.cmd("RSET");
    send(&server, &["d@dest.test"], b"Subject: 2\r\n\r\nx\r\n");
    assert_eq!(inject(&server, "e@dest.test").status, 202);
    assert_eq!(mx.wait_for(3, 30).len(), 3, "log:\n{}", server.log());
}

#[test]
fn intake_pauses_when_the_spool_disk_is_nearly_full() {
    // Asking for more free space than any disk has is a disk that is nearly full.
    let server = Server::start("[spool]\nmin_free_space = \"1000000TiB\"\n");
    let mut c = server.connect();
    c.hello();
    let r = c.cmd("MAIL FROM:<alice@sender.test>");
    assert_eq!(r.code, 452, "{r:?}");
    assert!(
        r.text().contains("4.3.1 Insufficient system storage"),
        "{r:?}"
    );
    assert!(r.text().contains("free on the spool's disk"), "{r:?}");
    // The session goes on: the client may try again later, or QUIT.
    assert_eq!(c.cmd("NOOP").code, 250);
    let api = inject(&server, "x@dest.test");
    assert_eq!(api.status, 503, "{}", api.body);
    assert!(
        api.json()["error"]
            .as_str()
            .unwrap()
            .contains("free on the spool's disk")
    );
    assert!(server.queued_ids().is_empty());
}
