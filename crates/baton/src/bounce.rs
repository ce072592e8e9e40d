//! Delivery status notifications (RFC 3464): the message Baton sends back to a sender when
//! recipients failed, were delayed, or (NOTIFY=SUCCESS) were delivered.
//!
//! Builds the bytes only. Whether a DSN is due is the policy's call (`policy::decide`, per
//! NOTIFY); queueing it with a null reverse-path, and never bouncing a bounce, is the queue
//! manager's (`qmgr/dsn.rs`).

use baton_spool::{DsnRet, Envelope};

/// What happened to the recipients a DSN reports on (RFC 3464 §2.3.3 Action).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Failed,
    Delayed,
    Delivered,
    Relayed,
}

impl Action {
    fn as_str(self) -> &'static str {
        match self {
            Action::Failed => "failed",
            Action::Delayed => "delayed",
            Action::Delivered => "delivered",
            Action::Relayed => "relayed",
        }
    }
}

/// One recipient's line in the report.
#[derive(Debug, Clone)]
pub struct ReportedRecipient {
    pub address: String,
    pub orcpt: Option<String>,
    pub action: Action,
    pub status: String,
    /// The remote reply ("550 5.1.1 no such user") or our own explanation.
    pub diagnostic: String,
    /// Whether `diagnostic` is a remote SMTP reply (Diagnostic-Code type "smtp").
    pub diagnostic_is_smtp: bool,
    pub remote_mta: Option<String>,
    pub last_attempt_ms: u64,
    /// For delays: when Baton gives up.
    pub will_retry_until_ms: Option<u64>,
}

/// Bodies returned in full up to this size when the sender did not say RET (as Postfix's
/// bounce_size_limit); larger ones are returned as headers only.
const FULL_RETURN_LIMIT: usize = 50_000;

/// Builds the DSN for `original` (whose stored body is `body`) reporting `recipients`.
pub fn build(
    hostname: &str,
    original: &Envelope,
    body: &[u8],
    recipients: &[ReportedRecipient],
    dsn_id: &str,
) -> Vec<u8> {
    let action = recipients
        .first()
        .map(|r| r.action)
        .unwrap_or(Action::Failed);
    let boundary = format!("{dsn_id}/{hostname}");
    let mut out = String::with_capacity(2048 + body.len());
    notification(
        &mut out, hostname, original, recipients, action, &boundary, dsn_id,
    );
    delivery_report(&mut out, hostname, original, recipients, &boundary);
    let headers_only = match original.dsn_ret {
        Some(DsnRet::Headers) => true,
        Some(DsnRet::Full) => false,
        None => body.len() > FULL_RETURN_LIMIT || action != Action::Failed,
    };
    let mut bytes = out.into_bytes();
    returned_message(&mut bytes, body, headers_only, &boundary);
    bytes
}

/// The header and the human-readable part.
fn notification(
    out: &mut String,
    hostname: &str,
    original: &Envelope,
    recipients: &[ReportedRecipient],
    action: Action,
    boundary: &str,
    dsn_id: &str,
) {
    let (subject, intro) = match action {
        Action::Failed => (
            "Undelivered Mail Returned to Sender",
            "I'm sorry to have to inform you that your message could not\r\nbe delivered to one or more recipients. It's attached below.",
        ),
        Action::Delayed => (
            "Delayed Mail (still being retried)",
            "Your message could not be delivered yet to one or more recipients.\r\nDelivery will be retried; you do not need to resend it.",
        ),
        Action::Delivered | Action::Relayed => (
            "Successful Mail Delivery Report",
            "Your message was successfully delivered to the destination(s)\r\nlisted below.",
        ),
    };
    let now = rfc5322_date(baton_spool::now_ms());
    out.push_str(&format!(
        "From: MAILER-DAEMON@{hostname} (Mail Delivery System)\r\n\
         To: <{}>\r\n\
         Subject: {subject}\r\n\
         Date: {now}\r\n\
         Message-ID: <{dsn_id}@{hostname}>\r\n\
         Auto-Submitted: auto-replied\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=\"{boundary}\"\r\n\
         \r\n\
         This is a MIME-encapsulated message.\r\n\
         \r\n\
         --{boundary}\r\n\
         Content-Description: Notification\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\
         Content-Transfer-Encoding: 8bit\r\n\
         \r\n\
         This is the mail system at host {hostname}.\r\n\
         \r\n\
         {intro}\r\n\
         \r\n",
        one_line(&original.sender)
    ));
    for r in recipients {
        out.push_str(&format!(
            "<{}>: {}\r\n",
            one_line(&r.address),
            one_line(&r.diagnostic)
        ));
    }
}

/// The machine-readable part (message/delivery-status).
fn delivery_report(
    out: &mut String,
    hostname: &str,
    original: &Envelope,
    recipients: &[ReportedRecipient],
    boundary: &str,
) {
    out.push_str(&format!(
        "\r\n--{boundary}\r\n\
         Content-Description: Delivery report\r\n\
         Content-Type: message/delivery-status\r\n\
         \r\n\
         Reporting-MTA: dns; {hostname}\r\n\
         X-Baton-Queue-ID: {}\r\n",
        original.id
    ));
    if let Some(envid) = &original.dsn_envid {
        out.push_str(&format!("Original-Envelope-Id: {}\r\n", one_line(envid)));
    }
    out.push_str(&format!(
        "Arrival-Date: {}\r\n",
        rfc5322_date(original.arrived_ms)
    ));
    for r in recipients {
        out.push_str("\r\n");
        recipient_fields(out, r);
    }
}

fn recipient_fields(out: &mut String, r: &ReportedRecipient) {
    out.push_str(&format!(
        "Final-Recipient: rfc822; {}\r\n",
        one_line(&r.address)
    ));
    if let Some(orcpt) = &r.orcpt {
        out.push_str(&format!(
            "Original-Recipient: rfc822; {}\r\n",
            one_line(orcpt)
        ));
    }
    out.push_str(&format!("Action: {}\r\n", r.action.as_str()));
    out.push_str(&format!("Status: {}\r\n", one_line(&r.status)));
    if let Some(mta) = &r.remote_mta {
        out.push_str(&format!("Remote-MTA: dns; {}\r\n", one_line(mta)));
    }
    let kind = if r.diagnostic_is_smtp {
        "smtp"
    } else {
        "x-baton"
    };
    out.push_str(&format!(
        "Diagnostic-Code: {kind}; {}\r\n",
        one_line(&r.diagnostic)
    ));
    out.push_str(&format!(
        "Last-Attempt-Date: {}\r\n",
        rfc5322_date(r.last_attempt_ms)
    ));
    if let Some(until) = r.will_retry_until_ms {
        out.push_str(&format!("Will-Retry-Until: {}\r\n", rfc5322_date(until)));
    }
}

/// The returned message (or its header section), and the closing boundary.
fn returned_message(bytes: &mut Vec<u8>, body: &[u8], headers_only: bool, boundary: &str) {
    if headers_only {
        bytes.extend_from_slice(
            format!(
                "\r\n--{boundary}\r\n\
                 Content-Description: Undelivered Message Headers\r\n\
                 Content-Type: text/rfc822-headers\r\n\
                 \r\n"
            )
            .as_bytes(),
        );
        bytes.extend_from_slice(header_section(body));
    } else {
        bytes.extend_from_slice(
            format!(
                "\r\n--{boundary}\r\n\
                 Content-Description: Undelivered Message\r\n\
                 Content-Type: message/rfc822\r\n\
                 \r\n"
            )
            .as_bytes(),
        );
        bytes.extend_from_slice(body);
    }
    if !bytes.ends_with(b"\r\n") {
        bytes.extend_from_slice(b"\r\n");
    }
    bytes.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
}

/// The header section of a message, up to and including the blank line.
fn header_section(body: &[u8]) -> &[u8] {
    match body.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(i) => &body[..i + 4],
        None => body,
    }
}

/// Every value written into the report is one line: a control character (CR, LF, NUL...) from
/// a peer's reply or a client's ORCPT becomes a space, so no text can add a field.
fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

pub fn rfc5322_date(ms: u64) -> String {
    jiff::Timestamp::from_millisecond(ms as i64)
        .map(|t| {
            t.to_zoned(jiff::tz::TimeZone::UTC)
                .strftime("%a, %d %b %Y %H:%M:%S +0000")
                .to_string()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use baton_spool::{QueueId, Recipient};

    #[test]
    fn no_value_can_add_a_field() {
        let original = Envelope {
            id: QueueId(7),
            sender: "a@example.com".into(),
            recipients: vec![Recipient::new(
                "b@example.net".into(),
                None,
                baton_spool::Notify::NOT_GIVEN,
            )],
            dsn_ret: None,
            dsn_envid: Some("e\r\nBcc: x@y".into()),
            eight_bit: false,
            smtputf8: false,
            client_ip: std::net::IpAddr::from([127, 0, 0, 1]),
            helo: "c".into(),
            arrived_ms: 1,
            size: 0,
            meta: Default::default(),
        };
        let forged = ReportedRecipient {
            address: "b@example.net".into(),
            orcpt: Some("x\r\nAction: delivered".into()),
            action: Action::Failed,
            status: "5.1.1".into(),
            diagnostic: "550 5.1.1 no\r\nStatus: 2.0.0".into(),
            diagnostic_is_smtp: true,
            remote_mta: Some("mx\nRemote-MTA: evil".into()),
            last_attempt_ms: 1,
            will_retry_until_ms: None,
        };
        let dsn = build(
            "mx.test",
            &original,
            b"Subject: x\r\n\r\nhi\r\n",
            &[forged],
            "9",
        );
        let text = String::from_utf8(dsn).unwrap();
        let fields = |name: &str| text.lines().filter(|l| l.starts_with(name)).count();
        assert_eq!(fields("Action:"), 1, "{text}");
        assert_eq!(fields("Status:"), 1, "{text}");
        assert_eq!(fields("Remote-MTA:"), 1, "{text}");
        assert_eq!(fields("Bcc:"), 0, "{text}");
        assert!(text.contains("Original-Recipient: rfc822; x  Action: delivered\r\n"));
    }

    /// A failure (the message returned in full) and a delay (headers only), byte for byte but
    /// for the Date field.
    #[test]
    fn a_failure_and_a_delay_byte_for_byte() {
        let original = Envelope {
            id: QueueId(7),
            sender: "a@example.com".into(),
            recipients: vec![Recipient::new(
                "b@example.net".into(),
                None,
                baton_spool::Notify::NOT_GIVEN,
            )],
            dsn_ret: None,
            dsn_envid: Some("env-1".into()),
            eight_bit: false,
            smtputf8: false,
            client_ip: std::net::IpAddr::from([127, 0, 0, 1]),
            helo: "c".into(),
            arrived_ms: 1_700_000_000_000,
            size: 0,
            meta: Default::default(),
        };
        let reported = |action, will_retry_until_ms| ReportedRecipient {
            address: "b@example.net".into(),
            orcpt: Some("B@example.net".into()),
            action,
            status: "5.1.1".into(),
            diagnostic: "550 5.1.1 no".into(),
            diagnostic_is_smtp: true,
            remote_mta: Some("mx.example.net".into()),
            last_attempt_ms: 1_700_000_100_000,
            will_retry_until_ms,
        };
        let text = |r: ReportedRecipient| {
            let dsn = build("mx.test", &original, b"Subject: x\r\n\r\nhi", &[r], "9");
            let text = String::from_utf8(dsn).unwrap();
            let date = text.lines().filter(|l| l.starts_with("Date: ")).count();
            assert_eq!(date, 1);
            text.split_inclusive("\r\n")
                .filter(|l| !l.starts_with("Date: "))
                .collect::<String>()
        };
        let head = |subject: &str, intro: &str| {
            format!(
                "From: MAILER-DAEMON@mx.test (Mail Delivery System)\r\nTo: <a@example.com>\r\n\
                 Subject: {subject}\r\nMessage-ID: <9@mx.test>\r\nAuto-Submitted: auto-replied\r\n\
                 MIME-Version: 1.0\r\n\
                 Content-Type: multipart/report; report-type=delivery-status;\r\n\
                 \tboundary=\"9/mx.test\"\r\n\r\nThis is a MIME-encapsulated message.\r\n\r\n\
                 --9/mx.test\r\nContent-Description: Notification\r\n\
                 Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n\
                 This is the mail system at host mx.test.\r\n\r\n{intro}\r\n\r\n\
                 <b@example.net>: 550 5.1.1 no\r\n\r\n\
                 --9/mx.test\r\nContent-Description: Delivery report\r\n\
                 Content-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.test\r\n\
                 X-Baton-Queue-ID: 0000000000000007\r\nOriginal-Envelope-Id: env-1\r\n\
                 Arrival-Date: Tue, 14 Nov 2023 22:13:20 +0000\r\n\r\n\
                 Final-Recipient: rfc822; b@example.net\r\n\
                 Original-Recipient: rfc822; B@example.net\r\n"
            )
        };
        let fields = "Status: 5.1.1\r\nRemote-MTA: dns; mx.example.net\r\n\
                      Diagnostic-Code: smtp; 550 5.1.1 no\r\n\
                      Last-Attempt-Date: Tue, 14 Nov 2023 22:15:00 +0000\r\n";
        let failed = head(
            "Undelivered Mail Returned to Sender",
            "I'm sorry to have to inform you that your message could not\r\n\
             be delivered to one or more recipients. It's attached below.",
        ) + "Action: failed\r\n"
            + fields
            + "\r\n--9/mx.test\r\nContent-Description: Undelivered Message\r\n\
               Content-Type: message/rfc822\r\n\r\nSubject: x\r\n\r\nhi\r\n\r\n--9/mx.test--\r\n";
        assert_eq!(text(reported(Action::Failed, None)), failed);
        let delayed = head(
            "Delayed Mail (still being retried)",
            "Your message could not be delivered yet to one or more recipients.\r\n\
             Delivery will be retried; you do not need to resend it.",
        ) + "Action: delayed\r\n"
            + fields
            + "Will-Retry-Until: Sun, 19 Nov 2023 13:20:00 +0000\r\n\
               \r\n--9/mx.test\r\nContent-Description: Undelivered Message Headers\r\n\
               Content-Type: text/rfc822-headers\r\n\r\nSubject: x\r\n\r\n\r\n--9/mx.test--\r\n";
        let delay = reported(Action::Delayed, Some(1_700_400_000_000));
        assert_eq!(text(delay), delayed);
    }
}
