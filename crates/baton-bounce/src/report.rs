//! Reading a report that came back: a DSN (RFC 3464, or the free text many MTAs write), a
//! feedback report (ARF, RFC 5965) or an automatic reply (RFC 3834), into one record per
//! recipient. Works on the raw text: the shapes in the wild are too many for one MIME model.

use std::sync::OnceLock;

use regex::Regex;
use serde::Serialize;

use crate::Class;
use crate::rules::{Rules, classify_with, parse_status};

/// Largest report read.
const MAX_REPORT: usize = 4 << 20;
/// Most recipients taken from one report.
const MAX_RECIPIENTS: usize = 1000;

/// One recipient's outcome, as a report tells it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Record {
    pub recipient: String,
    /// Enhanced status code ("" when the report gives none).
    pub status: String,
    pub class: Class,
    /// The address itself is bad: suppress it.
    pub hard: bool,
    /// What the remote side said (or the report's text).
    pub diagnostic: String,
    /// ARF Feedback-Type (`abuse`, `opt-out`, ...), for feedback reports.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub feedback_type: Option<String>,
}

fn re(cell: &'static OnceLock<Regex>, pattern: &str) -> &'static Regex {
    cell.get_or_init(|| match Regex::new(pattern) {
        Ok(re) => re,
        Err(e) => panic!("bad built-in pattern {pattern}: {e}"),
    })
}

fn status_re() -> &'static Regex {
    static R: OnceLock<Regex> = OnceLock::new();
    re(&R, r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")
}

fn address_re() -> &'static Regex {
    static R: OnceLock<Regex> = OnceLock::new();
    re(
        &R,
        r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+",
    )
}

/// Reads the report in `raw` (with operator rules `extra` tried first).
pub fn read(raw: &[u8], extra: Option<&Rules>) -> Vec<Record> {
    let raw = &raw[..raw.len().min(MAX_REPORT)];
    let text = decode_base64_parts(&decode_qp(&String::from_utf8_lossy(raw)));
    let (head, body) = split_head(&text);
    if let Some(mut records) = ses_notification(body, extra) {
        records.truncate(MAX_RECIPIENTS);
        return records;
    }
    if let Some(mut records) = feedback(&text, head, body) {
        records.truncate(MAX_RECIPIENTS);
        return records;
    }
    let mut records = delivery_status(&text, extra);
    if records.is_empty() {
        // Exim marks its bounces Auto-Submitted too: a bounce is read as one.
        if !is_bounce(head)
            && let Some(record) = auto_reply(head, body)
        {
            return vec![record];
        }
        records = free_text(head, body, extra);
    }
    records.truncate(MAX_RECIPIENTS);
    if !refused_at_rcpt(&text) || from_filter_gateway(head) {
        records.iter_mut().for_each(unproven_unknown_user);
    }
    records
}

/// "User unknown" in a report is a verdict on the address only where the report shows it
/// answered RCPT, or carries a 5.1.x status: after DATA it is a content filter's (the server
/// took the RCPT), and with no phase nothing says which. Otherwise it is another policy and
/// never hard, as Baton judges its own attempts (only a refused RCPT suppresses).
fn unproven_unknown_user(record: &mut Record) {
    // A 5.1.x status still names the address ("bad destination mailbox"): pipelined RCPT
    // replies are often shown after DATA.
    if record.class == Class::InvalidRecipient && !record.status.starts_with("5.1.") {
        record.class = Class::OtherPolicy;
        record.hard = false;
    }
}

/// Whether the report shows the refusal was the answer to RCPT: the first phase marker
/// decides (Postfix's "in reply to RCPT TO command", Exim's "after RCPT TO", a Sendmail
/// transcript's `>>> RCPT`, qmail's "does not like recipient"), and the words servers give
/// at RCPT count as one (RFC 5321's "mailbox unavailable", Postfix's "Recipient address
/// rejected", "no such user", "does not exist"). A bare "user unknown" is not: content
/// filters say it after DATA.
fn refused_at_rcpt(text: &str) -> bool {
    static R: OnceLock<Regex> = OnceLock::new();
    let phase = re(
        &R,
        r"(?im)in reply to (?:end of )?(DATA|RCPT|MAIL)\b|after (end of data|data\b|RCPT|MAIL)|^>>> (DATA|RCPT|MAIL|\.)[^\n]*\n<<< [45]\d\d|(does not like recipient|recipient address rejected|RCPT TO|\[RCPT_TO\]|recipient name is not recognized|unknown recipient|mailbox unavailable|does(?:n't| not) have an? \S+ account|does not exist|no such (?:user|mailbox|recipient)|invalid recipient|<[^>\s]+@[^>\s]+>:? user unknown|unknown user: \S+@)",
    );
    let Some(m) = phase.captures(text) else {
        return false;
    };
    let word = (1..=4)
        .find_map(|i| m.get(i))
        .map_or("", |g| g.as_str())
        .to_ascii_lowercase();
    !matches!(word.as_str(), "data" | "end of data" | "." | "mail")
}

/// Whether the report comes from a content-filter gateway (McAfee, m-FILTER, SurfControl,
/// MailFoundry, InterScan): its "no such user" is the filter's verdict on the message.
fn from_filter_gateway(head: &str) -> bool {
    static R: OnceLock<Regex> = OnceLock::new();
    re(
        &R,
        r"(?i)mcafee email gateway|\bby m-filter\b|surfcontrol|\(mailfoundry\)|interscan|activehunter",
    )
    .is_match(head)
}

/// The header section and the body of a message.
fn split_head(text: &str) -> (&str, &str) {
    match text.find("\n\n") {
        Some(i) => (&text[..i], &text[i + 2..]),
        None => (text, ""),
    }
}

/// The value of header `name` in `head` (unfolded), case-insensitive.
fn header(head: &str, name: &str) -> Option<String> {
    let mut lines = head.lines().peekable();
    while let Some(line) = lines.next() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        if !key.trim().eq_ignore_ascii_case(name) {
            continue;
        }
        let mut value = value.trim().to_string();
        while let Some(next) = lines.peek().filter(|l| l.starts_with([' ', '\t'])) {
            value.push(' ');
            value.push_str(next.trim());
            lines.next();
        }
        return Some(value);
    }
    None
}

/// An Amazon SES notification (JSON, as SNS mails it): a delivery, bounce or complaint
/// with its recipients.
fn ses_notification(body: &str, extra: Option<&Rules>) -> Option<Vec<Record>> {
    let start = body.find("{\"notificationType\"")?;
    // The JSON up to the first blank line, unfolded (long lines come folded, as headers are).
    let json = &body[start..];
    let json = json.split("\n\n").next().unwrap_or(json).replace("\n ", "");
    let v: serde_json::Value = serde_json::from_str(json.trim()).ok()?;
    let text = |v: &serde_json::Value| v.as_str().unwrap_or("").to_string();
    let record = |recipient: String, status: String, class: Class, diagnostic: String| Record {
        recipient,
        status,
        class,
        hard: false,
        diagnostic: cut_line(&diagnostic),
        feedback_type: None,
    };
    let list = |v: &serde_json::Value| v.as_array().cloned().unwrap_or_default();
    let records = match v.get("notificationType")?.as_str()? {
        "Delivery" => {
            let d = v.get("delivery")?;
            let reply = text(&d["smtpResponse"]);
            let status = status_re()
                .find(&reply)
                .map_or("2.0.0".to_string(), |m| m.as_str().to_string());
            list(&d["recipients"])
                .iter()
                .map(|r| record(text(r), status.clone(), Class::Delivered, reply.clone()))
                .collect()
        }
        "Bounce" => list(&v["bounce"]["bouncedRecipients"])
            .iter()
            .map(|r| {
                let diagnostic = text(&r["diagnosticCode"]);
                let status = text(&r["status"]);
                let action = text(&r["action"]);
                let context = format!("{diagnostic} {}", text(&v["bounce"]["bounceSubType"]));
                self::record(
                    text(&r["emailAddress"]),
                    status,
                    &context,
                    diagnostic,
                    &action,
                    extra,
                )
            })
            .collect(),
        "Complaint" => {
            let kind = v["complaint"]["complaintFeedbackType"]
                .as_str()
                .map(str::to_string);
            list(&v["complaint"]["complainedRecipients"])
                .iter()
                .map(|r| Record {
                    feedback_type: kind.clone(),
                    ..record(
                        text(&r["emailAddress"]),
                        String::new(),
                        Class::Complaint,
                        "complaint".into(),
                    )
                })
                .collect()
        }
        _ => return None,
    };
    Some(records)
}

/// An ARF feedback report: one record per original recipient.
fn feedback(text: &str, head: &str, body: &str) -> Option<Vec<Record>> {
    let lower = text.to_ascii_lowercase();
    let at = lower.find("message/feedback-report")?;
    let fields = &text[at..];
    let fields = fields.split_once("\n\n").map_or(fields, |(_, rest)| rest);
    let fields = fields.split("\n\n").next().unwrap_or("");
    let kind = header(fields, "Feedback-Type").map(|k| k.to_ascii_lowercase());
    let class = match kind.as_deref() {
        Some("opt-out") | Some("unsubscribe") => Class::Unsubscribe,
        // auth-failure reports too: a receiver's report on mail it was sent.
        _ => Class::Complaint,
    };
    let mut recipients: Vec<String> = Vec::new();
    for line in fields.lines() {
        if let Some((k, v)) = line.split_once(':')
            && k.trim().eq_ignore_ascii_case("Original-Rcpt-To")
            && let Some(a) = address_re().find(v)
        {
            recipients.push(a.as_str().to_string());
        }
    }
    if recipients.is_empty() {
        // The original message's To:, after the report part.
        let original = &text[at..];
        recipients.extend(
            original
                .lines()
                .filter(|l| l.to_ascii_lowercase().starts_with("to:"))
                .filter_map(|l| address_re().find(l).map(|m| m.as_str().to_string()))
                .take(1),
        );
    }
    if recipients.is_empty() {
        // The report's own To: (a display name is not an address).
        let to = header(head, "To").unwrap_or_default();
        let address = address_re().find(&to).map_or(to.as_str(), |m| m.as_str());
        recipients.push(address.to_string());
    }
    let diagnostic = cut_line(body);
    Some(
        recipients
            .into_iter()
            .map(|recipient| Record {
                recipient,
                status: String::new(),
                class,
                hard: false,
                diagnostic: diagnostic.clone(),
                feedback_type: kind.clone(),
            })
            .collect(),
    )
}

/// The per-recipient blocks of every message/delivery-status part.
fn delivery_status(text: &str, extra: Option<&Rules>) -> Vec<Record> {
    let lower = text.to_ascii_lowercase();
    let mut records = Vec::new();
    let mut from = 0;
    while let Some(i) = lower[from..].find("final-recipient:") {
        let at = from + i;
        // The whole per-recipient group: some MTAs put Status and Diagnostic-Code before
        // Final-Recipient.
        let start = text[from..at].rfind("\n\n").map_or(from, |b| from + b + 2);
        let block_end = text[at..].find("\n\n").map_or(text.len(), |e| at + e);
        let block = &text[start..block_end];
        from = block_end.max(at + 1);
        let Some(recipient) = header(block, "Final-Recipient")
            .or_else(|| header(block, "Original-Recipient"))
            .and_then(|v| address_re().find(&v).map(|m| m.as_str().to_string()))
        else {
            continue;
        };
        let action = header(block, "Action")
            .unwrap_or_default()
            .to_ascii_lowercase();
        // Without a Diagnostic-Code, the human part's line about the recipient (OpenSMTPD).
        let raw_diagnostic = header(block, "Diagnostic-Code")
            .or_else(|| line_about(text, &recipient))
            .unwrap_or_default();
        let diagnostic = raw_diagnostic
            .split_once(';')
            .map_or(raw_diagnostic.clone(), |(_, t)| t.trim().to_string());
        let status_field = header(block, "Status").unwrap_or_default();
        let mut status = reply_status_in(&diagnostic)
            .filter(|s| !s.starts_with('2') || action.starts_with("deliver"))
            .or_else(|| {
                status_re()
                    .find(&status_field)
                    .map(|m| m.as_str().to_string())
            })
            .unwrap_or_default();
        if status.is_empty() && action.starts_with("deliver") {
            status = "2.0.0".into();
        }
        // With its type: "X-Unix; 255" is a local delivery agent's exit code.
        let mut context = if diagnostic.is_empty() {
            human_text(text)
        } else {
            raw_diagnostic
        };
        // The reporter's comment on its status ("4.0.0 (host name lookup failure)").
        if let Some((_, comment)) = status_field.split_once('(') {
            context.push(' ');
            context.push_str(comment.trim_end_matches([')', ' ']));
        }
        records.push(record(
            recipient, status, &context, diagnostic, &action, extra,
        ));
    }
    records
}

/// The enhanced status in a diagnostic: the one that follows an SMTP reply code (the remote
/// server's, "550-'5.7.1"), else the first.
fn reply_status_in(diagnostic: &str) -> Option<String> {
    static R: OnceLock<Regex> = OnceLock::new();
    let after_code = re(&R, r"\b[245]\d\d[ -]'?([245]\.\d{1,3}\.\d{1,3})\b");
    after_code
        .captures(diagnostic)
        .and_then(|c| c.get(1))
        .or_else(|| status_re().find(diagnostic))
        .map(|m| m.as_str().to_string())
}

/// The first line of the human-readable part that names `recipient` and carries a reply.
fn line_about(text: &str, recipient: &str) -> Option<String> {
    let end = text
        .to_ascii_lowercase()
        .find("message/delivery-status")
        .unwrap_or(text.len());
    let lower = recipient.to_ascii_lowercase();
    text[..end]
        .lines()
        .filter(|l| l.to_ascii_lowercase().contains(&lower))
        .find(|l| reply_code(l).is_some())
        .map(|l| l.trim().to_string())
}

/// Whether the message is a bounce by its sender or subject.
fn is_bounce(head: &str) -> bool {
    static R: OnceLock<Regex> = OnceLock::new();
    let bounce = re(
        &R,
        r"(?i)mailer-daemon|postmaster|mail delivery|undeliver|delivery (?:status|failure|failed|notification|report|problem)|returned mail|failure notice|non-?delivery|could not be delivered|undelivered|delivery has failed|returning message|mail system error|error sending",
    );
    ["From", "Subject", "Sender"]
        .iter()
        .filter_map(|h| header(head, h))
        .any(|v| bounce.is_match(&v))
}

/// An automatic reply (RFC 3834's Auto-Submitted, or the usual subjects).
fn auto_reply(head: &str, body: &str) -> Option<Record> {
    let auto = header(head, "Auto-Submitted")
        .is_some_and(|v| v.to_ascii_lowercase().starts_with("auto-replied"));
    let subject = header(head, "Subject").unwrap_or_default();
    let looks = classify_with(None, None, &subject) == Class::AutoReply;
    if !auto && !looks && header(head, "X-Autoreply").is_none() {
        return None;
    }
    let recipient = header(head, "From")
        .and_then(|f| address_re().find(&f).map(|m| m.as_str().to_string()))
        .unwrap_or_default();
    Some(Record {
        recipient,
        status: String::new(),
        class: Class::AutoReply,
        hard: false,
        diagnostic: cut_line(if subject.is_empty() { body } else { &subject }),
        feedback_type: None,
    })
}

/// A bounce written as prose (qmail, Exchange, older Sendmail...): the addresses named next to
/// an error, and the status and words around them.
fn free_text(head: &str, body: &str, extra: Option<&Rules>) -> Vec<Record> {
    let human = body;
    let own: Vec<String> = ["From", "To", "Return-Path", "Sender"]
        .iter()
        .filter_map(|h| header(head, h))
        .flat_map(|v| {
            address_re()
                .find_iter(&v)
                .map(|m| m.as_str().to_ascii_lowercase())
                .collect::<Vec<_>>()
        })
        .collect();
    let lines: Vec<&str> = human.lines().take(400).collect();
    // Each recipient with the line it was found on.
    let mut recipients: Vec<(String, usize)> = Vec::new();
    for (n, line) in lines.iter().enumerate() {
        if recipients.first().is_some_and(|(_, at)| n > at + 12) {
            break;
        }
        let lower = line.to_ascii_lowercase();
        if lower.starts_with("from:")
            || lower.starts_with("return-path")
            || lower.starts_with("message-id")
            || lower.starts_with("received:")
            || lower.contains("postmaster@")
            || lower.contains("mailer-daemon@")
        {
            continue;
        }
        if lower.starts_with("to:") && !recipients.is_empty() {
            continue;
        }
        // Recipients start their line (after spaces or "<"): an address inside an error
        // text is usually a host's or the sender's.
        // Sendmail's transcript starts the line with the reply: "554 <a@b>... Host unknown".
        let trimmed = line.trim_start();
        let after_code = match trimmed.split_once(' ') {
            Some((code, rest)) if code.len() == 3 && code.bytes().all(|b| b.is_ascii_digit()) => {
                rest
            }
            _ => trimmed,
        };
        let leading = after_code.trim_start().trim_start_matches(['<', '"']);
        for m in address_re().find_iter(line) {
            let a = m.as_str().trim_end_matches('.').to_string();
            let first = leading.starts_with(m.as_str());
            if (first || recipients.is_empty())
                && !own.contains(&a.to_ascii_lowercase())
                && !recipients.iter().any(|(r, _)| r.eq_ignore_ascii_case(&a))
            {
                recipients.push((a, n));
            }
        }
        let original =
            lower.contains("original message") || lower.starts_with("content-type: message/rfc822");
        if original && !recipients.is_empty() {
            break;
        }
    }
    let whole = error_lines(human);
    let first_status = |text: &str| {
        status_re()
            .find_iter(text)
            .map(|m| m.as_str().to_string())
            .find(|s| !s.starts_with('2'))
    };
    let status = first_status(human).unwrap_or_default();
    with_failed_header(head, recipients)
        .into_iter()
        .take(20)
        .map(|(r, at)| {
            let context = context_of(&lines, &r, at, extra).unwrap_or_else(|| whole.clone());
            let status = first_status(&context).unwrap_or_else(|| status.clone());
            record(r, status, &context, context.clone(), "", extra)
        })
        .collect()
}

/// The words about recipient `r`: the block under the line it is first named on (qmail,
/// Exim: the reply that refused it), or under a later line naming it when the first block
/// says nothing classifiable (Exchange names the address in a "To:" summary first). None
/// when no block says anything classifiable: the whole error text is read instead.
fn context_of(
    lines: &[&str],
    r: &str,
    first: Option<usize>,
    extra: Option<&Rules>,
) -> Option<String> {
    let lower = r.to_ascii_lowercase();
    let later = lines
        .iter()
        .enumerate()
        .skip(first.map_or(0, |at| at + 1))
        .take_while(|(_, l)| !is_original_boundary(l))
        .filter(|(_, l)| {
            let l = l.to_ascii_lowercase();
            let header_like = l.split_once(':').is_some_and(|(k, _)| {
                !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            });
            l.contains(&lower) && !header_like
        })
        .map(|(n, _)| n)
        .take(5);
    first
        .into_iter()
        .chain(later)
        .map(|at| own_block(lines, at))
        .find(|block| classify_with(extra, None, block) != Class::Uncategorized)
}

/// The recipients an `X-Failed-Recipients:` field names (Exim, Google), each with the line
/// the text names it on, if it does; without the field, those the text names.
fn with_failed_header(head: &str, found: Vec<(String, usize)>) -> Vec<(String, Option<usize>)> {
    let failed: Vec<String> = header(head, "X-Failed-Recipients")
        .map(|v| {
            address_re()
                .find_iter(&v)
                .map(|m| m.as_str().to_string())
                .collect()
        })
        .unwrap_or_default();
    if failed.is_empty() {
        return found.into_iter().map(|(r, at)| (r, Some(at))).collect();
    }
    failed
        .into_iter()
        .map(|r| {
            let at = found
                .iter()
                .find(|(f, _)| f.eq_ignore_ascii_case(&r))
                .map(|(_, at)| *at);
            (r, at)
        })
        .collect()
}

/// The rest of line `at` and the lines under it, up to a blank line (at most ten).
fn own_block(lines: &[&str], at: usize) -> String {
    let mut block = String::new();
    if let Some(line) = lines.get(at) {
        let rest = line.split_once(['>', ':']).map_or("", |(_, r)| r);
        block.push_str(rest.trim());
    }
    for line in lines.iter().skip(at + 1).take(10) {
        if line.trim().is_empty() {
            break;
        }
        block.push(' ');
        block.push_str(line.trim());
    }
    block
}

/// Whether a line starts the returned original message.
fn is_original_boundary(line: &str) -> bool {
    let lower = line.to_ascii_lowercase();
    let separator = lower.trim_start().starts_with("--");
    lower.starts_with("content-type: message/rfc822")
        || lower.starts_with("--- below this line")
        || lower.starts_with("------ this is a copy")
        || lower.contains("original message follows")
        || (separator && lower.contains("original message"))
}

/// The lines of a prose bounce that carry the error (up to the returned message).
fn error_lines(body: &str) -> String {
    let mut out = String::new();
    for line in body.lines() {
        if is_original_boundary(line) {
            break;
        }
        out.push_str(line.trim());
        out.push(' ');
        if out.len() > 8192 {
            break;
        }
    }
    out
}

/// The report's human-readable text (its first part, before the delivery-status part).
fn human_text(text: &str) -> String {
    let (_, body) = split_head(text);
    let end = body
        .to_ascii_lowercase()
        .find("message/delivery-status")
        .unwrap_or(body.len());
    error_lines(&body[..end])
}

fn record(
    recipient: String,
    status: String,
    context: &str,
    diagnostic: String,
    action: &str,
    extra: Option<&Rules>,
) -> Record {
    let code = parse_status(&status);
    let mut class = classify_with(
        extra,
        (!status.is_empty()).then_some(status.as_str()),
        context,
    );
    // A temporary status on a final failure: the queue gave up on it.
    let gave_up = action.starts_with("failed") && status.starts_with('4');
    let delayed = action.starts_with("delayed");
    let vague = matches!(class, Class::Uncategorized);
    // A delay notice whose words name no cause (only its status code): still trying.
    let wordless_delay = delayed && classify_with(extra, None, context) == Class::Uncategorized;
    // A host that never answered is temporary: a bounce for one says the queue gave up on
    // it. A connection that was made and then lost is a network error, whenever it happened.
    let final_failure = !delayed && !status.starts_with('5');
    let never_answered = class == Class::Connection && !lost_connection(context);
    if (vague && (gave_up || delayed)) || wordless_delay || (never_answered && final_failure) {
        class = Class::Expired;
    }
    let permanent = match code {
        Some((d, ..)) => d == 5,
        // A report with no code says it failed unless it says it is a delay.
        None => match reply_code(context) {
            Some(c) => c >= 500,
            None => !action.starts_with("delayed"),
        },
    };
    Record {
        recipient,
        status,
        class,
        hard: class.hard(permanent),
        diagnostic: cut_line(&diagnostic),
        feedback_type: None,
    }
}

/// Whether the text says a connection was made and then lost (not refused or timed out).
fn lost_connection(text: &str) -> bool {
    static R: OnceLock<Regex> = OnceLock::new();
    re(
        &R,
        r"(?i)lost connection|network error|connection (?:reset|dropped|closed)",
    )
    .is_match(text)
}

/// The first SMTP reply code in `text`.
fn reply_code(text: &str) -> Option<u16> {
    static R: OnceLock<Regex> = OnceLock::new();
    let m = re(&R, r"\b([245][0-9][0-9])[ -]").captures(text)?;
    m.get(1)?.as_str().parse().ok()
}

/// Undoes quoted-printable soft breaks and =XX escapes (bounces quote their text so).
fn decode_qp(text: &str) -> String {
    if !text.contains("=\n") && !text.contains("=20") && !text.contains("=3D") {
        return text.replace("\r\n", "\n");
    }
    let text = text.replace("\r\n", "\n").replace("=\n", "");
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'='
            && i + 2 < bytes.len()
            && let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push(h * 16 + l);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Replaces the body of each base64-encoded MIME part with its decoded text (Google and
/// others encode their bounce text so).
fn decode_base64_parts(text: &str) -> String {
    use base64::Engine;
    if !text.to_ascii_lowercase().contains("base64") {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len());
    let mut lines = text.split_inclusive('\n').peekable();
    while let Some(line) = lines.next() {
        out.push_str(line);
        let lower = line.to_ascii_lowercase();
        if !(lower.starts_with("content-transfer-encoding:") && lower.contains("base64")) {
            continue;
        }
        // The rest of the part's header section, then its body up to a blank line or boundary.
        while let Some(h) = lines.next_if(|l| !l.trim().is_empty()) {
            out.push_str(h);
        }
        if let Some(blank) = lines.next() {
            out.push_str(blank);
        }
        let mut encoded = String::new();
        while let Some(l) = lines.next_if(|l| {
            let t = l.trim();
            !t.is_empty()
                && !t.starts_with("--")
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b))
        }) {
            encoded.push_str(l.trim());
        }
        match base64::engine::general_purpose::STANDARD.decode(encoded.as_bytes()) {
            Ok(bytes) => {
                out.push_str(&String::from_utf8_lossy(&bytes).replace("\r\n", "\n"));
                out.push('\n');
            }
            Err(_) => {
                out.push_str(&encoded);
                out.push('\n');
            }
        }
    }
    out
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// At most 1,000 characters of `text` on one line.
fn cut_line(text: &str) -> String {
    let flat: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    flat.chars().take(1000).collect()
}

#[cfg(test)]
mod tests;
