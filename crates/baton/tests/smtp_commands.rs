//! Every command and extension, over real TCP against a real `baton serve`.

mod common;

use common::{Server, dot_stuff, strip_received};

#[test]
fn greeting_ehlo_and_helo() {
    let server = Server::start("");
    let mut c = server.connect();
    let greeting = c.reply();
    assert_eq!(greeting.code, 220);
    assert!(
        greeting.text().starts_with("mx.test.example "),
        "{greeting:?}"
    );
    let ehlo = c.cmd("EHLO client.test.example");
    assert_eq!(ehlo.code, 250);
    assert!(ehlo.lines[0].starts_with("mx.test.example"));
    for ext in [
        "PIPELINING",
        "SIZE 52428800",
        "8BITMIME",
        "SMTPUTF8",
        "ENHANCEDSTATUSCODES",
        "DSN",
        "CHUNKING",
    ] {
        assert!(
            ehlo.lines.iter().any(|l| l == ext),
            "{ext} missing: {ehlo:?}"
        );
    }
    // No STARTTLS or AUTH advertised in this version.
    assert!(
        !ehlo
            .lines
            .iter()
            .any(|l| l.starts_with("STARTTLS") || l.starts_with("AUTH"))
    );
    let helo = c.cmd("HELO client.test.example");
    assert_eq!((helo.code, helo.text()), (250, "mx.test.example".into()));
    // Without EHLO, ESMTP parameters are refused.
    let r = c.cmd("MAIL FROM:<a@example.com> SIZE=10");
    assert_eq!((r.code, &r.lines[0][..5]), (555, "5.5.4"));
    assert_eq!(c.cmd("EHLO").code, 501, "EHLO needs a domain");
    assert_eq!(c.cmd("QUIT").code, 221);
    assert!(c.is_closed());
}

#[test]
fn a_message_is_queued_with_its_id_and_stored_byte_exact() {
    let server = Server::start("");
    let mut c = server.connect();
    c.hello();
    let body = b"From: a@example.com\r\nSubject: test\r\n\r\nline one\r\n.leading dot\r\n..two dots\r\n.\r\n\r\nlast\r\n";
    let r = c.send_mail("a@example.com", &["b@example.net", "c@example.org"], body);
    assert_eq!(r.code, 250, "{r:?}");
    assert!(r.lines[0].starts_with("2.0.0 OK queued as "), "{r:?}");
    let id = r.queue_id();
    assert_eq!(id.len(), 16);

    let stored = server.body(&id);
    assert_eq!(
        strip_received(&stored),
        body,
        "dot-unstuffed body must match"
    );
    let received = String::from_utf8_lossy(&stored[..stored.len() - body.len()]).to_string();
    assert!(received.starts_with("Received: from client.test.example (unknown [127.0.0.1])\r\n\tby mx.test.example (Baton) with ESMTP id "), "{received}");
    assert!(received.contains(&id));
    assert!(!received.contains("for <"), "two recipients: no for clause");

    let m = server.message_json(&id);
    assert_eq!(m["sender"], "a@example.com");
    assert_eq!(m["helo"], "client.test.example");
    assert_eq!(m["client_ip"], "127.0.0.1");
    assert_eq!(m["recipients"][0]["email"], "b@example.net");
    assert_eq!(m["recipients"][1]["state"], "queued");
    assert_eq!(m["size"], stored.len() as u64);

    let list = String::from_utf8(server.cli(&["queue", "list"]).stdout).unwrap();
    assert!(
        list.contains(&id) && list.contains("c@example.org (queued)"),
        "{list}"
    );
    assert!(list.contains("1 messages, 2 recipients"), "{list}");
}

#[test]
fn dsn_parameters_are_kept_with_the_envelope() {
    let server = Server::start("");
    let mut c = server.connect();
    c.hello();
    assert_eq!(
        c.cmd("MAIL FROM:<a@example.com> RET=HDRS ENVID=abc+2Bdef BODY=8BITMIME SIZE=100")
            .code,
        250
    );
    assert_eq!(
        c.cmd("RCPT TO:<b@example.net> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;orig+40example.net")
            .code,
        250
    );
    assert_eq!(c.cmd("RCPT TO:<c@example.net> NOTIFY=NEVER").code, 250);
    assert_eq!(c.cmd("DATA").code, 354);
    c.send("Subject: 8bit \u{e9}\r\n\r\nbody\r\n.\r\n".as_bytes());
    let id = c.reply().queue_id();
    let m = server.message_json(&id);
    assert_eq!(m["dsn_ret"], "HEADERS");
    assert_eq!(m["dsn_envid"], "abc+def");
    assert_eq!(m["eight_bit"], true);
    assert_eq!(m["recipients"][0]["orcpt"], "orig@example.net");
    assert_eq!(m["recipients"][0]["notify"], 2 | 8);
    assert_eq!(m["recipients"][1]["notify"], 1);
    assert!(m["recipients"][1]["orcpt"].is_null());
    // Bad DSN values are precise 501s.
    assert_eq!(c.cmd("MAIL FROM:<a@example.com> RET=ALL").code, 501);
    assert_eq!(c.cmd("MAIL FROM:<a@example.com>").code, 250);
    assert_eq!(c.cmd("RCPT TO:<b@example.net> NOTIFY=SOMETIMES").code, 501);
}

#[test]
fn smtputf8_addresses_need_the_parameter() {
    let server = Server::start("");
    let mut c = server.connect();
    c.hello();
    let r = c.cmd("MAIL FROM:<j\u{f6}rg@b\u{fc}cher.example>");
    assert_eq!((r.code, &r.lines[0][..5]), (553, "5.6.7"));
    assert_eq!(c.cmd("MAIL FROM:<a@example.com>").code, 250);
    let r = c.cmd("RCPT TO:<\u{e9}l\u{e8}ve@\u{e9}cole.example>");
    assert_eq!((r.code, &r.lines[0][..5]), (553, "5.6.7"));
    assert_eq!(c.cmd("RSET").code, 250);
    assert_eq!(
        c.cmd("MAIL FROM:<j\u{f6}rg@b\u{fc}cher.example> SMTPUTF8")
            .code,
        250
    );
    assert_eq!(
        c.cmd("RCPT TO:<\u{e9}l\u{e8}ve@\u{e9}cole.example>").code,
        250
    );
    assert_eq!(c.cmd("DATA").code, 354);
    c.send("Subject: caf\u{e9}\r\n\r\nhi\r\n.\r\n".as_bytes());
    let id = c.reply().queue_id();
    let m = server.message_json(&id);
    assert_eq!(m["smtputf8"], true);
    assert_eq!(
        m["recipients"][0]["email"],
        "\u{e9}l\u{e8}ve@\u{e9}cole.example"
    );
    let stored = server.body(&id);
    assert!(String::from_utf8_lossy(&stored).contains("with UTF8SMTP id"));
}

#[test]
fn auxiliary_commands() {
    let server = Server::start("");
    let mut c = server.connect();
    c.hello();
    let r = c.cmd("NOOP");
    assert_eq!((r.code, r.text()), (250, "2.0.0 Ok".to_string()));
    let r = c.cmd("VRFY someone");
    assert_eq!((r.code, &r.lines[0][..5]), (252, "2.0.0"));
    let r = c.cmd("HELP");
    assert_eq!(r.code, 214);
    let r = c.cmd("EXPN list");
    assert_eq!((r.code, &r.lines[0][..5]), (502, "5.5.1"));
    let r = c.cmd("STARTTLS");
    assert_eq!(r.code, 502);
    let r = c.cmd("ETRN example.com");
    assert_eq!(r.code, 502);
    let r = c.cmd("MAIL FROM:<a@example.com>");
    assert_eq!(r.code, 250);
    assert_eq!(c.cmd("RSET").code, 250);
    // After RSET the transaction is gone.
    let r = c.cmd("RCPT TO:<b@example.net>");
    assert_eq!((r.code, &r.lines[0][..5]), (503, "5.5.1"));
    assert_eq!(c.cmd("QUIT").code, 221);
}

#[test]
fn bad_sequences_and_syntax_get_precise_codes() {
    let server = Server::start("[limits]\nmax_errors = 50");
    let mut c = server.connect();
    assert_eq!(c.reply().code, 220);
    let r = c.cmd("MAIL FROM:<a@example.com>");
    assert_eq!(
        (r.code, r.text()),
        (503, "5.5.1 Error: send HELO/EHLO first".into())
    );
    c.cmd("EHLO client.test.example");
    let r = c.cmd("DATA");
    assert_eq!((r.code, &r.lines[0][..5]), (503, "5.5.1"));
    let r = c.cmd("BOGUS");
    assert_eq!((r.code, &r.lines[0][..5]), (500, "5.5.2"));
    let r = c.cmd("MAIL FROM:a@example.com");
    assert_eq!((r.code, &r.lines[0][..5]), (501, "5.5.4"));
    let r = c.cmd("MAIL FROM:<not an address>");
    assert_eq!((r.code, &r.lines[0][..5]), (501, "5.1.7"));
    assert_eq!(c.cmd("MAIL FROM:<>").code, 250, "null sender is allowed");
    let r = c.cmd("MAIL FROM:<a@example.com>");
    assert_eq!(
        (r.code, r.text()),
        (503, "5.5.1 Error: nested MAIL command".into())
    );
    let r = c.cmd("RCPT TO:<b@-bad-.example>");
    assert_eq!((r.code, &r.lines[0][..5]), (501, "5.1.3"));
    let r = c.cmd("DATA");
    assert_eq!(
        (r.code, &r.lines[0][..5]),
        (554, "5.5.1"),
        "no valid recipients"
    );
    c.cmd("RSET");
    let r = c.cmd("MAIL FROM:<a@example.com> FUTURE=1");
    assert_eq!((r.code, &r.lines[0][..5]), (555, "5.5.4"));
    let r = c.cmd("MAIL FROM:<a@example.com> SIZE=999999999999");
    assert_eq!((r.code, &r.lines[0][..5]), (552, "5.3.4"));
    // Postmaster without a domain is always accepted (RFC 5321 §4.5.1).
    assert_eq!(c.cmd("MAIL FROM:<a@example.com>").code, 250);
    assert_eq!(c.cmd("RCPT TO:<Postmaster>").code, 250);
}

#[test]
fn pipelined_session_gets_every_reply_in_order() {
    let server = Server::start("");
    let mut c = server.connect();
    c.hello();
    // Two whole transactions in one write, as a PIPELINING client may send up to DATA.
    c.send(
        b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\nRCPT TO:<bad address>\r\nRCPT TO:<c@example.net>\r\nDATA\r\n",
    );
    let codes: Vec<u16> = (0..5).map(|_| c.reply().code).collect();
    assert_eq!(codes, vec![250, 250, 501, 250, 354]);
    c.send(b"one\r\n.\r\nMAIL FROM:<x@example.com>\r\nRCPT TO:<y@example.net>\r\nDATA\r\n");
    let first = c.reply();
    assert_eq!(first.code, 250);
    let codes: Vec<u16> = (0..3).map(|_| c.reply().code).collect();
    assert_eq!(codes, vec![250, 250, 354]);
    c.send(b"two\r\n.\r\nQUIT\r\n");
    let second = c.reply();
    assert_eq!(second.code, 250);
    assert_eq!(c.reply().code, 221);
    assert_eq!(strip_received(&server.body(&first.queue_id())), b"one\r\n");
    assert_eq!(strip_received(&server.body(&second.queue_id())), b"two\r\n");
    let m = server.message_json(&first.queue_id());
    assert_eq!(m["recipients"].as_array().unwrap().len(), 2);
}

#[test]
fn bdat_chunks_make_one_message() {
    let server = Server::start("");
    let mut c = server.connect();
    c.hello();
    // BDAT without a transaction: the chunk is still consumed, then 503.
    c.send(b"BDAT 5\r\nHELLO");
    let r = c.reply();
    assert_eq!((r.code, &r.lines[0][..5]), (503, "5.5.1"));
    assert_eq!(
        c.cmd("NOOP").code,
        250,
        "chunk bytes were not read as a command"
    );

    c.cmd("MAIL FROM:<a@example.com>");
    c.cmd("RCPT TO:<b@example.net>");
    let part1 = b"Subject: chunked\r\n\r\n.no stuffing in BDAT\r\n";
    let part2 = b"binary-ish \x01\x02 \xff\r\n";
    // Pipelined chunks, the second with LAST.
    let mut wire = format!("BDAT {}\r\n", part1.len()).into_bytes();
    wire.extend_from_slice(part1);
    wire.extend_from_slice(format!("BDAT {} LAST\r\n", part2.len()).as_bytes());
    wire.extend_from_slice(part2);
    c.send(&wire);
    let r1 = c.reply();
    assert_eq!(r1.code, 250, "{r1:?}");
    let r2 = c.reply();
    assert_eq!(r2.code, 250, "{r2:?}");
    let id = r2.queue_id();
    let mut expected = part1.to_vec();
    expected.extend_from_slice(part2);
    assert_eq!(strip_received(&server.body(&id)), expected.as_slice());

    // DATA is refused while a BDAT transfer is under way; BDAT 0 LAST finishes it.
    c.cmd("MAIL FROM:<a@example.com>");
    c.cmd("RCPT TO:<b@example.net>");
    c.send(b"BDAT 5\r\nabc\r\n");
    assert_eq!(c.reply().code, 250);
    assert_eq!(c.cmd("DATA").code, 503);
    let r = c.cmd("BDAT 0 LAST");
    assert_eq!(r.code, 250, "{r:?}");
    assert_eq!(strip_received(&server.body(&r.queue_id())), b"abc\r\n");
}

#[test]
fn data_with_long_lines_and_8bit_is_byte_exact() {
    let server = Server::start("");
    let mut c = server.connect();
    c.hello();
    let mut body = b"Subject: long\r\n\r\n".to_vec();
    body.extend(std::iter::repeat_n(b'x', 5000));
    body.extend_from_slice(b"\r\n");
    body.extend((0x80u8..=0xff).cycle().take(3000));
    body.extend_from_slice(b"\r\n.\r\n..\r\n");
    let r = c.send_mail("a@example.com", &["b@example.net"], &body);
    assert_eq!(r.code, 250);
    assert_eq!(strip_received(&server.body(&r.queue_id())), body.as_slice());
    assert!(dot_stuff(&body).len() > body.len());
}
