//! SMTP smuggling (CVE-2023-51764 and kin): no line-ending variant may end DATA early or start
//! a second message. Each variant is sent as a client exploiting it would: a first message,
//! the fake end, a smuggled transaction, then a real end.

mod common;

use common::Server;

const VARIANTS: &[(&str, &[u8])] = &[
    ("\\n.\\n", b"\n.\n"),
    ("\\n.\\r", b"\n.\r"),
    ("\\r.\\n", b"\r.\n"),
    ("\\r.\\r", b"\r.\r"),
    ("\\n.\\r\\n", b"\n.\r\n"),
    ("\\r.\\r\\n", b"\r.\r\n"),
    ("\\r\\n.\\n", b"\r\n.\n"),
    ("\\r\\n.\\r", b"\r\n.\r"),
    ("\\r\\n.\\r\\r\\n", b"\r\n.\r\r\n"),
    ("\\r\\r\\n.\\r\\r\\n", b"\r\r\n.\r\r\n"),
];

fn smuggle_payload(fake_end: &[u8]) -> Vec<u8> {
    let mut p = b"Subject: first\r\n\r\nhello".to_vec();
    p.extend_from_slice(fake_end);
    p.extend_from_slice(
        b"MAIL FROM:<admin@example.com>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\nSubject: smuggled\r\n\r\nevil\r\n.\r\n",
    );
    p
}

#[test]
fn no_variant_ends_data_or_smuggles_a_message() {
    let server = Server::start("");
    for (name, fake_end) in VARIANTS {
        let mut c = server.connect();
        c.hello();
        c.cmd("MAIL FROM:<a@example.com>");
        c.cmd("RCPT TO:<b@example.net>");
        assert_eq!(c.cmd("DATA").code, 354);
        c.send(&smuggle_payload(fake_end));
        let r = c.reply();
        assert_eq!(r.code, 550, "variant {name}: {r:?}");
        assert!(
            r.lines[0].starts_with("5.5.2 Error: bare <"),
            "variant {name}: {r:?}"
        );
        assert!(
            c.try_reply().is_none(),
            "variant {name}: nothing after the 550"
        );
        assert!(c.is_closed(), "variant {name}: connection closed");
    }
    assert!(
        server.queued_ids().is_empty(),
        "neither the first nor a smuggled message may be queued"
    );
    // An honest message still goes through.
    let mut c = server.connect();
    c.hello();
    assert_eq!(
        c.send_mail("a@example.com", &["b@example.net"], b"ok\r\n")
            .code,
        250
    );
    assert_eq!(server.queued_ids().len(), 1);
}

#[test]
fn nul_before_dot_is_content_not_an_end() {
    let server = Server::start("");
    let mut c = server.connect();
    c.hello();
    c.cmd("MAIL FROM:<a@example.com>");
    c.cmd("RCPT TO:<b@example.net>");
    c.cmd("DATA");
    c.send(b"hello\r\n\x00.\r\nMAIL FROM:<x@example.com>\r\n.\r\n");
    let r = c.reply();
    assert_eq!(r.code, 250, "{r:?}");
    // Exactly one message, holding the would-be command as body text.
    let ids = server.queued_ids();
    assert_eq!(ids.len(), 1);
    let body = server.body(&ids[0]);
    assert!(body.ends_with(b"hello\r\n\x00.\r\nMAIL FROM:<x@example.com>\r\n"));
}

#[test]
fn bare_line_endings_in_bdat_are_refused() {
    let server = Server::start("");
    let mut c = server.connect();
    c.hello();
    for chunk in [&b"a\nb\r\n"[..], b"a\rb\r\n", b"ab\r"] {
        c.cmd("MAIL FROM:<a@example.com>");
        c.cmd("RCPT TO:<b@example.net>");
        c.send(format!("BDAT {} LAST\r\n", chunk.len()).as_bytes());
        c.send(chunk);
        let r = c.reply();
        assert_eq!((r.code, &r.lines[0][..5]), (550, "5.6.0"), "{chunk:?}");
    }
    // A failed chunk fails the rest of the transfer, and its bytes are still consumed.
    c.cmd("MAIL FROM:<a@example.com>");
    c.cmd("RCPT TO:<b@example.net>");
    c.send(b"BDAT 3\r\na\nb");
    assert_eq!(c.reply().code, 550);
    c.send(b"BDAT 4 LAST\r\nc\r\n\r");
    assert_eq!(c.reply().code, 550);
    assert_eq!(c.cmd("NOOP").code, 250);
    assert!(server.queued_ids().is_empty());
}
