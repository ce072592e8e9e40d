//! Per-message controls in X-Baton-* header fields. Scheduled sending: a message can say when it may leave (`X-Baton-Send-At`, RFC 3339 or RFC
//! 5322 date) and in which daily window (`X-Baton-Window: 09:00-17:00 Europe/Paris`). Both are
//! read at reception and stripped before delivery, as is `X-Baton-Tenant` (whose mail it is). The queue manager holds the recipients in
//! its timer heap until then; nothing polls.
//!
//! Owns the header syntax and the window arithmetic; it must not touch queues or the spool.

use jiff::civil::Time;
use jiff::tz::TimeZone;
use jiff::{Timestamp, Zoned};

const SEND_AT: &str = "x-baton-send-at";
const WINDOW: &str = "x-baton-window";

/// What a message's X-Baton-* headers asked for.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Requested {
    pub send_at_ms: Option<u64>,
    /// The window as written (kept in the envelope and parsed again when needed).
    pub window: Option<String>,
    /// The body has X-Baton-* header fields to strip before delivery.
    pub has_baton_headers: bool,
    /// `X-Baton-Tenant`: whose mail this is (picks a pool, can be suspended).
    pub tenant: Option<String>,
}

/// Reads the X-Baton-* fields of a header section (`head` may run on into the body).
pub fn requested(head: &[u8]) -> Result<Requested, String> {
    let mut out = Requested::default();
    for (name, value) in header_fields(head) {
        let lower = name.to_ascii_lowercase();
        if !lower.starts_with("x-baton-") {
            continue;
        }
        out.has_baton_headers = true;
        let value = value.trim();
        if lower == SEND_AT {
            out.send_at_ms = Some(parse_time(value).ok_or_else(|| {
                format!(
                    "X-Baton-Send-At {value:?} is not a date (use RFC 3339: 2026-12-01T09:00:00Z)"
                )
            })?);
        } else if lower == WINDOW {
            Window::parse(value)?;
            out.window = Some(value.to_string());
        } else if lower == "x-baton-tenant" {
            let ok = !value.is_empty()
                && value.len() <= 64
                && value
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
            if !ok {
                return Err(format!(
                    "X-Baton-Tenant {value:?}: use up to 64 letters, digits, '-', '_' or '.'"
                ));
            }
            out.tenant = Some(value.to_ascii_lowercase());
        }
    }
    Ok(out)
}

/// An RFC 3339 or RFC 5322 time, as Unix milliseconds.
pub fn parse_time(value: &str) -> Option<u64> {
    let ts = value
        .parse::<Timestamp>()
        .ok()
        .or_else(|| jiff::fmt::rfc2822::parse(value).ok().map(|z| z.timestamp()))?;
    u64::try_from(ts.as_millisecond()).ok()
}

/// A daily delivery window in a time zone; it may run past midnight (22:00-06:00).
#[derive(Debug, Clone)]
pub struct Window {
    start: Time,
    end: Time,
    tz: TimeZone,
}

impl Window {
    /// "09:00-17:00 Europe/Paris" (the zone defaults to UTC).
    pub fn parse(text: &str) -> Result<Window, String> {
        let bad = || format!("X-Baton-Window {text:?}: write \"09:00-17:00 Europe/Paris\"");
        let mut parts = text.split_whitespace();
        let range = parts.next().ok_or_else(bad)?;
        let tz = match parts.next() {
            Some(name) => TimeZone::get(name).map_err(|_| format!("unknown time zone {name:?}"))?,
            None => TimeZone::UTC,
        };
        let (a, b) = range.split_once('-').ok_or_else(bad)?;
        let time = |t: &str| t.parse::<Time>().map_err(|_| bad());
        let (start, end) = (time(a)?, time(b)?);
        if start == end {
            return Err(bad());
        }
        Ok(Window { start, end, tz })
    }

    /// `now` if the window is open then, else when it next opens (ms since the epoch).
    pub fn next_open(&self, now_ms: u64) -> u64 {
        let Ok(now) = Timestamp::from_millisecond(now_ms as i64) else {
            return now_ms;
        };
        let local = now.to_zoned(self.tz.clone());
        let t = local.time();
        let open = if self.start < self.end {
            t >= self.start && t < self.end
        } else {
            t >= self.start || t < self.end
        };
        if open {
            return now_ms;
        }
        let today = local.date();
        let candidate = |date: jiff::civil::Date| -> Option<Zoned> {
            date.to_datetime(self.start).to_zoned(self.tz.clone()).ok()
        };
        let next = match candidate(today) {
            Some(z) if z.timestamp() > now => Some(z),
            _ => today.tomorrow().ok().and_then(candidate),
        };
        next.and_then(|z| u64::try_from(z.timestamp().as_millisecond()).ok())
            .unwrap_or(now_ms)
    }
}

/// The body without its X-Baton-* header fields (and their folded lines).
pub fn strip_baton_headers(body: &[u8]) -> Vec<u8> {
    let end = body
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 2)
        .unwrap_or(body.len());
    let mut out = Vec::with_capacity(body.len());
    let mut skipping = false;
    let mut i = 0;
    while i < end {
        let line_end = body[i..end]
            .windows(2)
            .position(|w| w == b"\r\n")
            .map(|p| i + p + 2)
            .unwrap_or(end);
        let line = &body[i..line_end];
        let folded = line.first().is_some_and(|&b| b == b' ' || b == b'\t');
        if !folded {
            skipping = line.len() >= 8 && line[..8].eq_ignore_ascii_case(b"x-baton-");
        }
        if !skipping {
            out.extend_from_slice(line);
        }
        i = line_end;
    }
    out.extend_from_slice(&body[end..]);
    out
}

/// The address in the first From: field of a header section ("Name <a@b>" or "a@b").
pub fn from_address(head: &[u8]) -> Option<String> {
    let (_, value) = header_fields(head)
        .into_iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("from"))?;
    let address = match value.rsplit_once('<') {
        Some((_, a)) => a.split('>').next().unwrap_or(a),
        None => value.as_str(),
    };
    Some(address.trim().to_string())
}

/// (name, unfolded value) of each header field before the first empty line.
pub fn header_fields(head: &[u8]) -> Vec<(String, String)> {
    let text = String::from_utf8_lossy(head);
    let mut fields: Vec<(String, String)> = Vec::new();
    for line in text.split("\r\n") {
        if line.is_empty() {
            break;
        }
        if line.starts_with([' ', '\t']) {
            if let Some(last) = fields.last_mut() {
                last.1.push(' ');
                last.1.push_str(line.trim());
            }
            continue;
        }
        if let Some((name, value)) = line.split_once(':') {
            fields.push((name.trim().to_string(), value.to_string()));
        }
    }
    fields
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(s: &str) -> u64 {
        s.parse::<Timestamp>().unwrap().as_millisecond() as u64
    }

    #[test]
    fn headers_are_read_and_stripped() {
        let msg = b"Received: x\r\nX-Baton-Send-At: 2026-12-01T09:00:00Z\r\nSubject: hi\r\nx-baton-window: 09:00-17:00\r\n Europe/Paris\r\n\r\nX-Baton-Send-At: in the body stays\r\n";
        let r = requested(msg).unwrap();
        assert_eq!(r.send_at_ms, Some(ms("2026-12-01T09:00:00Z")));
        assert_eq!(r.window.as_deref(), Some("09:00-17:00 Europe/Paris"));
        assert!(r.has_baton_headers);
        assert_eq!(
            strip_baton_headers(msg),
            b"Received: x\r\nSubject: hi\r\n\r\nX-Baton-Send-At: in the body stays\r\n".to_vec()
        );
        assert!(requested(b"X-Baton-Send-At: tomorrow\r\n\r\n").is_err());
        assert!(requested(b"X-Baton-Window: 9-5 Mars/Olympus\r\n\r\n").is_err());
        let r = requested(b"X-Baton-Send-At: Tue, 01 Dec 2026 10:00:00 +0100\r\n\r\n").unwrap();
        assert_eq!(r.send_at_ms, Some(ms("2026-12-01T09:00:00Z")));
    }

    #[test]
    fn windows_open_now_or_next() {
        let w = Window::parse("09:00-17:00 Europe/Paris").unwrap();
        // 10:00 in Paris (UTC+1 in winter): open.
        assert_eq!(
            w.next_open(ms("2026-12-01T09:00:00Z")),
            ms("2026-12-01T09:00:00Z")
        );
        // 18:00 in Paris: the next day at 09:00 Paris = 08:00Z.
        assert_eq!(
            w.next_open(ms("2026-12-01T17:00:00Z")),
            ms("2026-12-02T08:00:00Z")
        );
        // 07:00 in Paris: today at 09:00.
        assert_eq!(
            w.next_open(ms("2026-12-01T06:00:00Z")),
            ms("2026-12-01T08:00:00Z")
        );
        let night = Window::parse("22:00-06:00").unwrap();
        assert_eq!(
            night.next_open(ms("2026-12-01T23:00:00Z")),
            ms("2026-12-01T23:00:00Z")
        );
        assert_eq!(
            night.next_open(ms("2026-12-01T12:00:00Z")),
            ms("2026-12-01T22:00:00Z")
        );
    }
}
