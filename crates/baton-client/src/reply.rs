//! Server replies, the errors of a conversation, and what an EHLO reply offers.

/// A server reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// Enhanced status code if the server gave one, else derived from the code class.
    pub status: String,
    /// The whole text, lines joined with a space.
    pub text: String,
    /// The text line by line.
    pub lines: Vec<String>,
    /// The server's answer to this recipient's own RCPT: its verdict on the address itself
    /// (a refused MAIL FROM or DATA says nothing about the recipient).
    pub to_rcpt: bool,
}

impl Reply {
    pub(crate) fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }

    /// "550 5.1.1 user unknown", for logs and diagnostic codes.
    pub fn line(&self) -> String {
        format!("{} {}", self.code, self.text)
    }

    /// A reply of our own making (for conditions found before or without the server's word).
    pub fn local(code: u16, status: &str, text: impl Into<String>) -> Reply {
        let text = text.into();
        Reply {
            code,
            status: status.to_string(),
            lines: vec![text.clone()],
            text,
            to_rcpt: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connection to {0} failed: {1}")]
    Connect(String, std::io::Error),
    #[error("{0} timed out {1}")]
    Timeout(String, &'static str),
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    #[error("{0} answered {1}")]
    Rejected(String, String, Box<Reply>),
    #[error("{0}: {1}")]
    Protocol(String, String),
    #[error("TLS with {0} failed: {1}")]
    Tls(String, String),
    /// The route's policy (TLS required, authentication) could not be met; the status says why.
    #[error("{0}: {2}")]
    Policy(String, &'static str, String),
}

impl ClientError {
    /// The server's reply, when the failure was one.
    pub fn reply(&self) -> Option<&Reply> {
        match self {
            ClientError::Rejected(_, _, r) => Some(r.as_ref()),
            _ => None,
        }
    }
}

/// What the server offered in its EHLO reply.
#[derive(Debug, Clone, Default)]
pub struct Capabilities {
    pub pipelining: bool,
    pub size: Option<u64>,
    pub eight_bit: bool,
    pub smtputf8: bool,
    pub dsn: bool,
    pub chunking: bool,
    pub starttls: bool,
    pub auth_plain: bool,
}

pub(crate) fn make_reply(code: u16, lines: &[String]) -> Reply {
    // Empty lines ("250-" then "250 2.0.0 ok") add nothing to the text.
    let words: Vec<&str> = lines
        .iter()
        .map(|l| l.trim())
        .filter(|l| !l.is_empty())
        .collect();
    let first = words.first().copied().unwrap_or("");
    let status = first
        .split_whitespace()
        .next()
        .filter(|t| is_enhanced_code(t, code))
        .map(str::to_string);
    let text = words.join(" ");
    Reply {
        code,
        status: status.unwrap_or_else(|| format!("{}.0.0", code / 100)),
        text,
        lines: lines.to_vec(),
        to_rcpt: false,
    }
}

pub(crate) fn is_enhanced_code(token: &str, code: u16) -> bool {
    let parts: Vec<&str> = token.split('.').collect();
    parts.len() == 3
        && parts[0] == (code / 100).to_string()
        && parts[1..]
            .iter()
            .all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()))
}

/// Reads the EHLO keywords from the lines after the first (RFC 5321 §4.1.1.1).
pub(crate) fn parse_capabilities(lines: &[String]) -> Capabilities {
    let mut caps = Capabilities::default();
    for line in lines.iter().skip(1) {
        let mut words = line.split_whitespace();
        let Some(keyword) = words.next() else {
            continue;
        };
        match keyword.to_ascii_uppercase().as_str() {
            "PIPELINING" => caps.pipelining = true,
            "8BITMIME" => caps.eight_bit = true,
            "SMTPUTF8" => caps.smtputf8 = true,
            "DSN" => caps.dsn = true,
            "CHUNKING" => caps.chunking = true,
            "STARTTLS" => caps.starttls = true,
            "AUTH" => caps.auth_plain = words.any(|w| w.eq_ignore_ascii_case("PLAIN")),
            "SIZE" => caps.size = Some(words.next().and_then(|v| v.parse().ok()).unwrap_or(0)),
            _ => {}
        }
    }
    caps
}

pub(crate) fn truncate(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enhanced_codes_are_taken_from_the_reply_or_derived() {
        let r = make_reply(550, &["5.1.1 no such user".into()]);
        assert_eq!(r.status, "5.1.1");
        let r = make_reply(451, &["try later".into()]);
        assert_eq!(r.status, "4.0.0");
        let r = make_reply(550, &["4.1.1 mismatched class".into()]);
        assert_eq!(r.status, "5.0.0");
        // A multi-line reply whose first line is empty (seen after BDAT).
        let r = make_reply(250, &["".into(), "2.0.0 Ok: queued as 4f2".into()]);
        assert_eq!(r.text, "2.0.0 Ok: queued as 4f2");
        assert_eq!(r.status, "2.0.0");
    }

    #[test]
    fn capabilities() {
        let r = make_reply(
            250,
            &[
                "mx.example Hello".into(),
                "PIPELINING".into(),
                "SIZE 1000".into(),
                "8BITMIME".into(),
                "CHUNKING".into(),
            ],
        );
        let c = parse_capabilities(&r.lines);
        assert!(c.pipelining && c.eight_bit && c.chunking && !c.dsn && !c.smtputf8);
        assert_eq!(c.size, Some(1000));
    }
}
