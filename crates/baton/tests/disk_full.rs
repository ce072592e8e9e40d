//! A full disk: the spool cannot grow (RLIMIT_FSIZE on the server, writes fail with EFBIG as
//! with ENOSPC). Clients get 452 4.3.1, the server keeps running, and nothing acknowledged is
//! lost or left half-written.

mod common;

use common::{Server, strip_received};

fn body(i: usize, size: usize) -> Vec<u8> {
    let mut b = format!("Subject: m{i}\r\n\r\n").into_bytes();
    while b.len() < size {
        b.extend_from_slice(format!("message {i} filler line\r\n").as_bytes());
    }
    b
}

#[test]
fn full_disk_gets_452_and_loses_nothing_acknowledged() {
    let mut server = Server::start_with("", Some(200_000));
    let mut c = server.connect();
    c.hello();
    let mut acked = Vec::new();
    let mut refusal = None;
    for i in 0..100 {
        let b = body(i, 10_000);
        let r = c.send_mail("a@example.com", &["b@example.net"], &b);
        if r.code == 250 {
            acked.push((r.queue_id(), b));
        } else {
            refusal = Some(r);
            break;
        }
    }
    let r = refusal.expect("the spool never filled up");
    assert_eq!(
        (r.code, r.text()),
        (452, "4.3.1 Insufficient system storage".into())
    );
    assert!(acked.len() >= 5, "only {} messages fit", acked.len());

    // Still serving: small commands work, and a large body (spilled to its own file) gets 452 too.
    assert_eq!(c.cmd("NOOP").code, 250);
    let r = c.send_mail("a@example.com", &["b@example.net"], &body(999, 400_000));
    assert_eq!((r.code, &r.lines[0][..5]), (452, "4.3.1"));
    let r = c.send_mail("a@example.com", &["b@example.net"], &body(1000, 10_000));
    assert_eq!(r.code, 452);

    // Space comes back (restart without the limit): everything acknowledged is intact, and
    // nothing refused is there.
    server.kill9();
    server.file_size_limit = None;
    server.spawn();
    let ids = server.queued_ids();
    assert_eq!(
        ids.len(),
        acked.len(),
        "refused messages must not be stored"
    );
    for (id, b) in &acked {
        assert_eq!(strip_received(&server.body(id)), b.as_slice(), "{id}");
    }
    let mut c = server.connect();
    c.hello();
    assert_eq!(
        c.send_mail("a@example.com", &["b@example.net"], &body(1, 10_000))
            .code,
        250
    );
}
