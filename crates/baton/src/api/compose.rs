//! Building each injected message: placeholders substituted per recipient, the MIME parts
//! (text, HTML, attachments) or the raw message, and its envelope.

use super::*;

pub(super) fn has_placeholders(content: &Content) -> bool {
    match content {
        Content::Raw(raw) => raw.contains("{{"),
        Content::Parts(p) => {
            p.subject.contains("{{")
                || p.from.contains("{{")
                || p.text_body.as_deref().is_some_and(|t| t.contains("{{"))
                || p.html_body.as_deref().is_some_and(|t| t.contains("{{"))
                || p.headers.iter().any(|(_, v)| v.contains("{{"))
        }
    }
}

/// Content with its placeholders filled in.
pub(super) enum Rendered {
    Raw(String),
    Parts(Box<Parts>),
}

pub(super) fn render(
    content: &Content,
    own: &HashMap<String, Value>,
    defaults: &HashMap<String, Value>,
    email: &str,
) -> Rendered {
    let fill = |text: &str, header: bool| substitute(text, own, defaults, email, header);
    match content {
        Content::Raw(raw) => {
            // Header values must not gain line breaks from a substitution.
            let (head, rest) = match raw.find("\r\n\r\n").or_else(|| raw.find("\n\n")) {
                Some(at) => raw.split_at(at),
                None => (raw.as_str(), ""),
            };
            Rendered::Raw(format!("{}{}", fill(head, true), fill(rest, false)))
        }
        Content::Parts(p) => Rendered::Parts(Box::new(Parts {
            from: fill(&p.from, true),
            subject: fill(&p.subject, true),
            text_body: p.text_body.as_deref().map(|t| fill(t, false)),
            html_body: p.html_body.as_deref().map(|t| fill(t, false)),
            reply_to: p.reply_to.as_deref().map(|t| fill(t, true)),
            headers: p
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), fill(v, true)))
                .collect(),
            attachments: p
                .attachments
                .iter()
                .map(|a| Attachment {
                    filename: a.filename.clone(),
                    content_type: a.content_type.clone(),
                    content: a.content.clone(),
                })
                .collect(),
        })),
    }
}

/// Replaces `{{name}}` (spaces inside allowed) with the recipient's value, else the call's
/// default, else nothing; `{{email}}` is the recipient's address unless given.
pub(super) fn substitute(
    text: &str,
    own: &HashMap<String, Value>,
    defaults: &HashMap<String, Value>,
    email: &str,
    header: bool,
) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        let Some(len) = rest[start + 2..].find("}}") else {
            break;
        };
        out.push_str(&rest[..start]);
        let name = rest[start + 2..start + 2 + len].trim();
        let value = own
            .get(name)
            .or_else(|| defaults.get(name))
            .map(|v| match v {
                Value::String(s) => s.clone(),
                Value::Null => String::new(),
                other => other.to_string(),
            })
            .unwrap_or_else(|| {
                if name == "email" {
                    email.to_string()
                } else {
                    String::new()
                }
            });
        if header {
            out.extend(
                value
                    .chars()
                    .map(|c| if c == '\r' || c == '\n' { ' ' } else { c }),
            );
        } else {
            out.push_str(&value);
        }
        rest = &rest[start + 2 + len + 2..];
    }
    out.push_str(rest);
    out
}

/// What every message of one call shares: its tags and its send time, checked once.
pub(super) struct Shared {
    pub(super) meta: MessageMeta,
    pub(super) send_at_ms: u64,
}

impl Shared {
    pub(super) fn from(request: &InjectRequest) -> Result<Shared, ApiError> {
        let send_at_ms = match &request.send_at {
            Some(t) => crate::schedule::parse_time(t).ok_or_else(|| {
                bad_request(format!(
                    "send_at {t:?} is not a time (RFC 3339: 2026-12-01T09:00:00Z)"
                ))
            })?,
            None => 0,
        };
        let mut meta = MessageMeta::default();
        for (key, value, field) in [
            ("tenant", &request.tenant, &mut meta.tenant),
            ("pool", &request.pool, &mut meta.pool),
            ("campaign", &request.campaign, &mut meta.campaign),
        ] {
            if let Some(v) = value {
                let ok = !v.is_empty()
                    && v.len() <= 64
                    && v.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
                if !ok {
                    return Err(bad_request(format!(
                        "{key} {v:?}: use up to 64 letters, digits, '-', '_' or '.'"
                    )));
                }
                *field = Some(v.to_ascii_lowercase());
            }
        }
        // Kept, so that operator actions (flush, resume, release) never send it earlier.
        meta.send_at_ms = (send_at_ms > 0).then_some(send_at_ms);
        Ok(Shared { meta, send_at_ms })
    }
}

pub(super) fn envelope_for(
    ctx: &Context,
    request: &InjectRequest,
    shared: &Shared,
    rcpts: Vec<usize>,
    client: IpAddr,
) -> Envelope {
    let recipients = rcpts
        .into_iter()
        .map(|i| {
            let mut r =
                Recipient::new(request.recipients[i].email.clone(), None, Notify::NOT_GIVEN);
            r.next_attempt_ms = shared.send_at_ms;
            r
        })
        .collect();
    Envelope {
        id: ctx.intake.next_id(),
        sender: request.envelope_sender.clone(),
        recipients,
        dsn_ret: None,
        dsn_envid: None,
        eight_bit: true,
        smtputf8: false,
        client_ip: client,
        helo: "http".into(),
        arrived_ms: baton_spool::now_ms(),
        size: 0,
        meta: shared.meta.clone(),
    }
}

/// The stored message: our Received: field, then the content with CRLF line ends and a Date:
/// and Message-ID: if it had none.
pub(super) fn message_bytes(
    ctx: &Context,
    envelope: &Envelope,
    text: &Rendered,
    client: IpAddr,
    extra_fields: &str,
) -> Result<Vec<u8>, ApiError> {
    let host = &ctx.config.hostname;
    let id = envelope.id;
    let date = jiff::Zoned::now()
        .strftime("%a, %d %b %Y %H:%M:%S %z")
        .to_string();
    let mut out = format!(
        "Received: from api ([{client}])\r\n\tby {host} (Baton) with HTTP id {id};\r\n\t{date}\r\n"
    )
    .into_bytes();
    out.extend_from_slice(extra_fields.as_bytes());
    match text {
        Rendered::Raw(raw) => {
            let content = crlf(raw);
            let head_end = find_blank_line(&content).unwrap_or(content.len());
            let fields = crate::schedule::header_fields(&content[..head_end]);
            let has = |name: &str| fields.iter().any(|(n, _)| n.eq_ignore_ascii_case(name));
            if !has("date") {
                out.extend_from_slice(format!("Date: {date}\r\n").as_bytes());
            }
            if !has("message-id") {
                out.extend_from_slice(format!("Message-ID: <{id}@{host}>\r\n").as_bytes());
            }
            out.extend_from_slice(&content);
            if !out.ends_with(b"\r\n") {
                out.extend_from_slice(b"\r\n");
            }
        }
        Rendered::Parts(p) => out.extend_from_slice(&build_parts(p, &format!("{id}@{host}"))?),
    }
    Ok(out)
}

pub(super) fn build_parts(p: &Parts, message_id: &str) -> Result<Vec<u8>, ApiError> {
    use base64::Engine;
    use mail_builder::MessageBuilder;
    use mail_builder::headers::address::Address;
    use mail_builder::headers::raw::Raw;
    if p.text_body.is_none() && p.html_body.is_none() {
        return Err(bad_request("content needs text_body or html_body"));
    }
    let address = |text: &str| -> Result<Address<'static>, ApiError> {
        let (name, email) = match text.rsplit_once('<') {
            Some((name, rest)) => (
                Some(name.trim().trim_matches('"').to_string()),
                rest.trim_end_matches('>').trim().to_string(),
            ),
            None => (None, text.trim().to_string()),
        };
        baton_smtp::address::validate_mailbox(&email, false)
            .map_err(|e| bad_request(format!("address {text:?}: {e}")))?;
        Ok(match name.filter(|n| !n.is_empty()) {
            Some(name) => Address::new_address(Some(name), email),
            None => Address::new_address(None::<String>, email),
        })
    };
    let mut builder = MessageBuilder::new()
        .from(address(&p.from)?)
        .subject(p.subject.clone())
        .message_id(message_id.to_string());
    if let Some(r) = &p.reply_to {
        builder = builder.reply_to(address(r)?);
    }
    for (name, value) in &p.headers {
        let valid_name =
            !name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic() && b != b':');
        if !valid_name || value.contains(['\r', '\n']) {
            return Err(bad_request(format!("header {name:?} is not a valid field")));
        }
        builder = builder.header(name.clone(), Raw::new(value.clone()));
    }
    if let Some(t) = &p.text_body {
        builder = builder.text_body(t.clone());
    }
    if let Some(h) = &p.html_body {
        builder = builder.html_body(h.clone());
    }
    for a in &p.attachments {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(a.content.trim())
            .map_err(|e| {
                bad_request(format!(
                    "attachment {:?}: content is not base64: {e}",
                    a.filename
                ))
            })?;
        builder = builder.attachment(a.content_type.clone(), a.filename.clone(), bytes);
    }
    builder
        .write_to_vec()
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

/// Line ends as CRLF.
pub(super) fn crlf(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() + text.len() / 32);
    let bytes = text.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'\n' && (i == 0 || bytes[i - 1] != b'\r') {
            out.push(b'\r');
        }
        if b == b'\r' && bytes.get(i + 1) != Some(&b'\n') {
            out.extend_from_slice(b"\r\n");
            continue;
        }
        out.push(b);
    }
    out
}

pub(super) fn find_blank_line(message: &[u8]) -> Option<usize> {
    if message.starts_with(b"\r\n") {
        return Some(0);
    }
    message
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 2)
}

// ---------------------------------------------------------------------------------------
// Status, queue, events

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn substitutions() {
        let own: HashMap<String, Value> = [("first_name".to_string(), json!("Ann\r\nBcc: x"))]
            .into_iter()
            .collect();
        let defaults: HashMap<String, Value> = [("n".to_string(), json!(3))].into_iter().collect();
        assert_eq!(
            substitute(
                "Hi {{ first_name }}, {{n}} {{missing}}{{email}}",
                &own,
                &defaults,
                "a@b",
                true
            ),
            "Hi Ann  Bcc: x, 3 a@b"
        );
        assert_eq!(
            substitute("x {{first_name}} {{unclosed", &own, &defaults, "", false),
            "x Ann\r\nBcc: x {{unclosed"
        );
    }

    #[test]
    fn line_ends_become_crlf() {
        assert_eq!(crlf("a\nb\r\nc\rd"), b"a\r\nb\r\nc\r\nd".to_vec());
    }
}
