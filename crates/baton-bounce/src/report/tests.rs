//! Reports written here for the purpose (the corpus in ../shared is scored by the baton
//! crate's `bounce_corpus` test): one of each shape the reader must know.

use super::*;

fn one(raw: &str) -> Record {
    let records = read(raw.as_bytes(), None);
    assert_eq!(records.len(), 1, "{records:#?}");
    records.into_iter().next().unwrap()
}

fn dsn(human: &str, blocks: &str) -> String {
    format!(
        "From: MAILER-DAEMON@mx.example.net\r\nSubject: Undelivered Mail Returned to Sender\r\n\
         Content-Type: multipart/report; report-type=delivery-status; boundary=\"b\"\r\n\r\n\
         --b\r\nContent-Type: text/plain\r\n\r\n{human}\r\n\r\n--b\r\n\
         Content-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.example.net\r\n\r\n\
         {blocks}\r\n--b--\r\n"
    )
}

#[test]
fn a_delivery_status_report_gives_one_record_per_recipient() {
    let raw = dsn(
        "Two addresses failed.",
        "Final-Recipient: rfc822; gone@example.org\r\nAction: failed\r\nStatus: 5.1.1\r\n\
         Diagnostic-Code: smtp; 550 5.1.1 <gone@example.org>: Recipient address rejected: User unknown\r\n\r\n\
         Final-Recipient: rfc822; full@example.org\r\nAction: failed\r\nStatus: 5.2.2\r\n\
         Diagnostic-Code: smtp; 552 5.2.2 Mailbox full\r\n",
    );
    let records = read(raw.as_bytes(), None);
    assert_eq!(records.len(), 2, "{records:#?}");
    assert_eq!(
        (
            records[0].recipient.as_str(),
            records[0].status.as_str(),
            records[0].class,
            records[0].hard
        ),
        ("gone@example.org", "5.1.1", Class::InvalidRecipient, true)
    );
    assert_eq!((records[1].class, records[1].hard), (Class::Quota, false));
}

#[test]
fn an_unknown_user_is_hard_only_at_rcpt_or_with_a_5_1_status() {
    let raw = dsn(
        "<someone@example.org>: host mx.example.org[192.0.2.1] said: 550 Unknown user \
         someone@example.org (in reply to end of DATA command)",
        "Final-Recipient: rfc822; someone@example.org\r\nAction: failed\r\nStatus: 5.0.0\r\n\
         Diagnostic-Code: smtp; 550 Unknown user someone@example.org\r\n",
    );
    let r = one(&raw);
    assert_eq!((r.class, r.hard), (Class::OtherPolicy, false));
    // The same words in reply to RCPT, or with a 5.1.1 status, condemn the address.
    let at_rcpt = raw.replace("end of DATA", "RCPT TO");
    assert_eq!(one(&at_rcpt).class, Class::InvalidRecipient);
    // RFC 5321's words for a refused RCPT are evidence enough.
    let rcpt_words = raw.replace(
        "550 Unknown user someone@example.org (in reply to end of DATA command)",
        "550 Requested action not taken: mailbox unavailable",
    );
    assert!(one(&rcpt_words).hard, "{:?}", one(&rcpt_words));
    // With no phase at all, the words alone do not condemn it either.
    let no_phase = raw.replace(" (in reply to end of DATA command)", "");
    assert_eq!(
        (one(&no_phase).class, one(&no_phase).hard),
        (Class::OtherPolicy, false)
    );
    let coded = raw
        .replace("Status: 5.0.0", "Status: 5.1.1")
        .replace("550 Unknown", "550 5.1.1 Unknown");
    assert!(one(&coded).hard);
}

#[test]
fn a_prose_bounce_reads_the_reply_under_each_address() {
    let raw = "From: MAILER-DAEMON@mail.example.net\r\nSubject: failure notice\r\n\r\n\
        Hi. This is the qmail-send program at mail.example.net.\r\n\
        I'm afraid I wasn't able to deliver your message to the following addresses.\r\n\r\n\
        <nobody@example.org>:\r\n192.0.2.9 does not like recipient.\r\n\
        Remote host said: 550 5.1.1 <nobody@example.org>... User Unknown\r\nGiving up on 192.0.2.9.\r\n\r\n\
        <stuffed@example.com>:\r\n192.0.2.10 failed after I sent the message.\r\n\
        Remote host said: 552 5.2.2 mailbox full\r\n\r\n\
        --- Below this line is a copy of the message.\r\n\r\nFrom: a@example.net\r\n\
        Authentication-Results: mx; dkim=fail; spf=fail\r\n\r\nhello\r\n";
    let records = read(raw.as_bytes(), None);
    assert_eq!(records.len(), 2, "{records:#?}");
    assert_eq!(records[0].recipient, "nobody@example.org");
    assert_eq!(
        records[0].class,
        Class::InvalidRecipient,
        "not expiry: {records:#?}"
    );
    assert_eq!(records[1].class, Class::Quota);
}

#[test]
fn the_failed_recipients_field_names_them_and_the_original_is_not_read() {
    let raw = "From: Mail Delivery Subsystem <mailer-daemon@example.net>\r\n\
        X-Failed-Recipients: list@groups.example.net\r\nSubject: Delivery Status Notification (Failure)\r\n\r\n\
        The group you tried to contact may not exist, or you may not have permission to post.\r\n\r\n\
        ----- Original message -----\r\n\r\nARC-Authentication-Results: i=1; mx; dkim=pass;\r\n\
        \x20      spf=pass smtp.mailfrom=writer@example.com\r\nFrom: writer@example.com\r\n\r\nhi\r\n";
    let r = one(raw);
    assert_eq!(r.recipient, "list@groups.example.net");
    assert_eq!(r.class, Class::OtherPolicy);
}

#[test]
fn feedback_reports_and_automatic_replies() {
    let arf = |kind: &str| {
        format!(
            "From: fbl@isp.example\r\nTo: fbl@bounces.example.com\r\n\
             Content-Type: multipart/report; report-type=feedback-report; boundary=\"f\"\r\n\r\n\
             --f\r\nContent-Type: text/plain\r\n\r\nAn abuse report.\r\n\r\n--f\r\n\
             Content-Type: message/feedback-report\r\n\r\nFeedback-Type: {kind}\r\nVersion: 1\r\n\
             Original-Rcpt-To: <reader@example.org>\r\n\r\n--f--\r\n"
        )
    };
    let abuse = one(&arf("abuse"));
    assert_eq!(
        (abuse.recipient.as_str(), abuse.class),
        ("reader@example.org", Class::Complaint)
    );
    assert_eq!(abuse.feedback_type.as_deref(), Some("abuse"));
    assert_eq!(one(&arf("opt-out")).class, Class::Unsubscribe);
    let away = one(
        "From: Reader <reader@example.org>\r\nSubject: Out of office\r\nAuto-Submitted: auto-replied\r\n\r\nBack on Monday.\r\n",
    );
    assert_eq!(
        (away.recipient.as_str(), away.class),
        ("reader@example.org", Class::AutoReply)
    );
}

#[test]
fn base64_text_parts_are_read_decoded() {
    use base64::Engine;
    let text = "Delivery to the following recipient failed permanently:\r\n\r\n     lost@example.org\r\n\r\n\
        550 5.1.1 The email account that you tried to reach does not exist.\r\n";
    let encoded = base64::engine::general_purpose::STANDARD.encode(text);
    let wrapped: Vec<&str> = encoded
        .as_bytes()
        .chunks(76)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    let raw = format!(
        "From: Mail Delivery Subsystem <mailer-daemon@example.net>\r\nSubject: Delivery Status Notification (Failure)\r\n\
         Content-Type: multipart/mixed; boundary=\"m\"\r\n\r\n--m\r\nContent-Type: text/plain; charset=UTF-8\r\n\
         Content-Transfer-Encoding: base64\r\n\r\n{}\r\n--m--\r\n",
        wrapped.join("\r\n")
    );
    let r = one(&raw);
    assert_eq!(
        (r.recipient.as_str(), r.class),
        ("lost@example.org", Class::InvalidRecipient)
    );
}

#[test]
fn hostile_reports_are_bounded() {
    // Many recipients: at most MAX_RECIPIENTS records.
    let blocks: String = (0..3000)
        .map(|i| format!("Final-Recipient: rfc822; u{i}@example.org\r\nAction: failed\r\nStatus: 5.1.1\r\n\r\n"))
        .collect();
    assert_eq!(
        read(dsn("x", &blocks).as_bytes(), None).len(),
        MAX_RECIPIENTS
    );
    // Garbage and a truncated base64 part read as nothing, without a panic.
    for raw in [
        &b"\xff\xfe\x00garbage"[..],
        b"Content-Transfer-Encoding: base64\r\n",
        b"",
        b"\n\n\n",
    ] {
        let _ = read(raw, None);
    }
}

#[test]
fn without_a_diagnostic_code_each_recipient_gets_its_own_line() {
    // OpenSMTPD writes the replies in the human part and only "Status: 5.0.0" below.
    let raw = dsn(
        "a@example.org: 550 5.1.1 <a@example.org>: Recipient address rejected: User unknown\r\n\
         b@example.org: 552 5.2.2 <b@example.org>: Recipient address rejected: Mailbox full",
        "Final-Recipient: rfc822; a@example.org\r\nAction: failed\r\nStatus: 5.0.0\r\n\r\n\
         Final-Recipient: rfc822; b@example.org\r\nAction: failed\r\nStatus: 5.0.0\r\n",
    );
    let records = read(raw.as_bytes(), None);
    assert_eq!(records.len(), 2, "{records:#?}");
    assert_eq!(
        (
            records[0].status.as_str(),
            records[0].class,
            records[0].hard
        ),
        ("5.1.1", Class::InvalidRecipient, true)
    );
    assert_eq!(
        (records[1].status.as_str(), records[1].class),
        ("5.2.2", Class::Quota)
    );
}

#[test]
fn the_remote_servers_status_beats_the_relays_own() {
    let raw = dsn(
        "failed",
        "Final-Recipient: rfc822; a@example.org\r\nAction: failed\r\nStatus: 5.0.0\r\n\
         Diagnostic-Code: smtp; 5.1.0 - Unknown address error 550-'5.7.1 Access denied'\r\n",
    );
    assert_eq!(one(&raw).status, "5.7.1");
}

#[test]
fn amazon_ses_notifications_are_read() {
    let wrap = |json: &str| {
        format!(
            "From: no-reply@sns.example\r\nSubject: AWS Notification Message\r\n\r\n{json}\r\n\r\n--\r\nunsubscribe link\r\n"
        )
    };
    let delivery = wrap(
        r#"{"notificationType":"Delivery","delivery":{"recipients":["ok@example.org"],"smtpResponse":"250 2.6.0 Message received"}}"#,
    );
    let r = one(&delivery);
    assert_eq!(
        (r.recipient.as_str(), r.status.as_str(), r.class),
        ("ok@example.org", "2.6.0", Class::Delivered)
    );
    let bounce = wrap(
        r#"{"notificationType":"Bounce","bounce":{"bounceType":"Permanent","bounceSubType":"General","bouncedRecipients":[{"emailAddress":"gone@example.org","action":"failed","status":"5.1.1","diagnosticCode":"smtp; 550 5.1.1 user unknown"}]}}"#,
    );
    let r = one(&bounce);
    assert_eq!(
        (r.class, r.hard, r.status.as_str()),
        (Class::InvalidRecipient, true, "5.1.1")
    );
    let complaint = wrap(
        r#"{"notificationType":"Complaint","complaint":{"complainedRecipients":[{"emailAddress":"angry@example.org"}],"complaintFeedbackType":"abuse"}}"#,
    );
    let r = one(&complaint);
    assert_eq!(
        (r.recipient.as_str(), r.class),
        ("angry@example.org", Class::Complaint)
    );
    assert_eq!(r.feedback_type.as_deref(), Some("abuse"));
    // Not JSON after all: read as anything else.
    assert!(read(wrap("{\"notificationType\": nonsense").as_bytes(), None).len() <= 1);
}

#[test]
fn a_filter_gateways_no_such_user_is_its_verdict_on_the_message() {
    let raw = "From: <>\r\nX-NAI-Header: Modified by McAfee Email Gateway (4500)\r\n\
        Subject: Delivery Status Notification\r\n\r\n\
        a@example.org\r\n    550 No such user\r\n";
    let r = one(raw);
    assert_eq!((r.class, r.hard), (Class::OtherPolicy, false));
    // The same words from a mail server, naming the address as servers answer RCPT: hard.
    let server = "From: MAILER-DAEMON@mx.example.net\r\nSubject: Returned mail\r\n\r\n\
        550 <a@example.org>: User unknown\r\n";
    let r = one(server);
    assert_eq!(
        (r.recipient.as_str(), r.class, r.hard),
        ("a@example.org", Class::InvalidRecipient, true)
    );
}

#[test]
fn delays_lost_connections_and_status_comments() {
    // A delay notice that names no cause in words is expiry in the making, whatever its code.
    let delayed = dsn(
        "Your message has not been delivered yet. The server will keep trying.",
        "Final-Recipient: rfc822; slow@example.org\r\nAction: delayed\r\n\
         Status: 4.4.0 (other or undefined network or routing status)\r\n",
    );
    assert_eq!(one(&delayed).class, Class::Expired);
    // The reporter's comment on its status is read when nothing else says why.
    let named = delayed.replace(
        "(other or undefined network or routing status)",
        "(mx.example.org: host name lookup failure)",
    );
    assert_eq!(one(&named).class, Class::Routing);
    let disabled = dsn(
        "Delivery failed.",
        "Final-Recipient: rfc822; old@example.org\r\nAction: failed\r\n\
         Status: 5.2.1 (mailbox disabled, not accepting messages)\r\n",
    );
    assert_eq!(one(&disabled).class, Class::InactiveMailbox);
    // A host that never answered, reported as failed: the queue gave up (expiry). A
    // connection that was made and then lost is a network error.
    let timed_out = dsn(
        "Delivery failed.",
        "Final-Recipient: rfc822; far@example.org\r\nAction: failed\r\nStatus: 4.4.1\r\n\
         Diagnostic-Code: X-Postfix; connect to mx.example.org[192.0.2.1]:25: Connection timed out\r\n",
    );
    assert_eq!(one(&timed_out).class, Class::Expired);
    let lost = timed_out.replace(
        "connect to mx.example.org[192.0.2.1]:25: Connection timed out",
        "lost connection with mx.example.org[192.0.2.1] while performing the HELO handshake",
    );
    assert_eq!(one(&lost).class, Class::Connection);
}

#[test]
fn yahoos_phase_marker_counts_as_rcpt() {
    let raw = "From: MAILER-DAEMON@yahoo.example\r\nSubject: Failure Notice\r\n\r\n\
        Sorry, we were unable to deliver your message to the following address.\r\n\r\n\
        <gone@example.org>:\r\nRemote host said: 550 5.2.1 <gone@example.org>... User Unknown [RCPT_TO]\r\n\r\n\
        --- Below this line is a copy of the message.\r\n\r\nFrom: a@example.net\r\n\r\nhi\r\n";
    let r = one(raw);
    assert_eq!((r.class, r.hard), (Class::InvalidRecipient, true), "{r:?}");
}
