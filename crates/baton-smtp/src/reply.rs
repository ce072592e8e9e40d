//! SMTP replies: a code, an optional enhanced status code (RFC 3463) and text.

use std::borrow::Cow;
use std::fmt;

/// One SMTP reply. The text may hold several lines separated by `\n`; they are sent as a
/// multi-line reply (`250-...` then `250 ...`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// Enhanced status code such as `"5.1.1"`, or empty for none (the greeting, EHLO).
    pub status: &'static str,
    pub text: Cow<'static, str>,
}

impl Reply {
    pub fn new(code: u16, status: &'static str, text: impl Into<Cow<'static, str>>) -> Self {
        Reply {
            code,
            status,
            text: text.into(),
        }
    }

    /// True for 4xx and 5xx replies.
    pub fn is_error(&self) -> bool {
        self.code >= 400
    }

    /// True for 5xx replies.
    pub fn is_permanent(&self) -> bool {
        self.code >= 500
    }

    /// Appends the wire form (CRLF-terminated lines) to `out`.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        let mut lines = self.text.split('\n').peekable();
        if lines.peek().is_none() {
            lines = "".split('\n').peekable();
        }
        while let Some(line) = lines.next() {
            let sep = if lines.peek().is_some() { '-' } else { ' ' };
            let line = line.trim_end_matches('\r');
            out.extend_from_slice(self.code.to_string().as_bytes());
            out.push(sep as u8);
            if !self.status.is_empty() {
                out.extend_from_slice(self.status.as_bytes());
                out.push(b' ');
            }
            out.extend_from_slice(line.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = Vec::new();
        self.write_to(&mut out);
        f.write_str(String::from_utf8_lossy(&out).trim_end())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_line_with_enhanced_code() {
        let mut out = Vec::new();
        Reply::new(250, "2.1.0", "OK").write_to(&mut out);
        assert_eq!(out, b"250 2.1.0 OK\r\n");
    }

    #[test]
    fn multi_line_without_enhanced_code() {
        let mut out = Vec::new();
        Reply::new(250, "", "mx.example\nPIPELINING\nSIZE 10").write_to(&mut out);
        assert_eq!(
            out,
            b"250-mx.example\r\n250-PIPELINING\r\n250 SIZE 10\r\n".as_slice()
        );
    }
}
