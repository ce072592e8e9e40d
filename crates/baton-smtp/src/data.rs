//! The message body readers: DATA (dot-stuffed, ended by `<CRLF>.<CRLF>`) and BDAT chunks.
//!
//! SMTP smuggling (CVE-2023-51764 and kin) lives here. The only end of DATA is
//! `<CRLF>.<CRLF>`; a CR not followed by LF or an LF not preceded by CR ends the read at once
//! with [`DataOutcome::BareCr`] / [`DataOutcome::BareLf`], so `\n.\n`, `\r.\r`, `\n.\r\n`,
//! `\r\n.\n`, `\r\n.\r` and the rest can neither end a message early nor reach a later relay.
//! The session answers those with a 5xx and closes the connection, so nothing after them is
//! read as a command.

/// How a DATA read ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataOutcome {
    /// `<CRLF>.<CRLF>` seen; the body is complete and within the size limit.
    Complete,
    /// `<CRLF>.<CRLF>` seen, but the body exceeded the limit; bytes past it were discarded.
    TooLarge,
    /// A CR not followed by LF.
    BareCr,
    /// An LF not preceded by CR.
    BareLf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    LineStart,
    Mid,
    Cr,
    Dot,
    DotCr,
}

/// Incremental DATA reader: feed it socket bytes, it appends the dot-unstuffed body (with CRLF
/// line ends) to an output buffer and reports where the data ended.
#[derive(Debug)]
pub struct DataReader {
    state: State,
    limit: u64,
    written: u64,
    seen: u64,
}

impl DataReader {
    /// `limit` is the largest body (after unstuffing) that is kept.
    pub fn new(limit: u64) -> Self {
        DataReader {
            state: State::LineStart,
            limit,
            written: 0,
            seen: 0,
        }
    }

    /// Body bytes produced so far (capped at the limit + 1 once it is exceeded).
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Raw bytes consumed so far, including any discarded past the limit.
    pub fn seen(&self) -> u64 {
        self.seen
    }

    pub fn over_limit(&self) -> bool {
        self.written > self.limit
    }

    /// Consumes bytes from `input`. Returns how many were used and, once the data has ended,
    /// how. Bytes after the end (pipelined commands) are left unconsumed.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> (usize, Option<DataOutcome>) {
        let mut i = 0;
        while i < input.len() {
            if self.state == State::Mid {
                // Fast path: copy the run up to the next CR or LF.
                let rest = &input[i..];
                let run = rest
                    .iter()
                    .position(|&b| b == b'\r' || b == b'\n')
                    .unwrap_or(rest.len());
                self.emit(&rest[..run], out);
                i += run;
                if i == input.len() {
                    break;
                }
            }
            let b = input[i];
            i += 1;
            let next = match (self.state, b) {
                (State::LineStart, b'.') => State::Dot,
                (State::LineStart | State::Mid, b'\r') => State::Cr,
                (State::Dot, b'\r') => State::DotCr,
                (State::Cr, b'\n') => {
                    self.emit(b"\r\n", out);
                    State::LineStart
                }
                (State::DotCr, b'\n') => {
                    self.seen += i as u64;
                    let outcome = if self.over_limit() {
                        DataOutcome::TooLarge
                    } else {
                        DataOutcome::Complete
                    };
                    return (i, Some(outcome));
                }
                (State::Cr | State::DotCr, _) => {
                    self.seen += i as u64;
                    return (i, Some(DataOutcome::BareCr));
                }
                (_, b'\n') => {
                    self.seen += i as u64;
                    return (i, Some(DataOutcome::BareLf));
                }
                (State::LineStart | State::Mid | State::Dot, other) => {
                    // A leading dot is dropped (RFC 5321 §4.5.2); `other` is kept.
                    self.emit(&[other], out);
                    State::Mid
                }
            };
            self.state = next;
        }
        self.seen += input.len() as u64;
        (input.len(), None)
    }

    fn emit(&mut self, bytes: &[u8], out: &mut Vec<u8>) {
        if bytes.is_empty() {
            return;
        }
        let room = self.limit.saturating_sub(self.written);
        if (bytes.len() as u64) <= room {
            out.extend_from_slice(bytes);
            self.written += bytes.len() as u64;
        } else {
            out.extend_from_slice(&bytes[..room as usize]);
            self.written = self.limit + 1;
        }
    }
}

/// Checks BDAT chunks for bare CR or LF across chunk boundaries. BDAT needs no end marker,
/// but a bare line ending must not be relayed onwards, where a DATA peer might read it as
/// the end of the message.
#[derive(Debug, Default)]
pub struct LineEndingCheck {
    prev_cr: bool,
}

impl LineEndingCheck {
    pub fn check(&mut self, chunk: &[u8]) -> Result<(), DataOutcome> {
        for &b in chunk {
            match (self.prev_cr, b) {
                (true, b'\n') => self.prev_cr = false,
                (true, _) => return Err(DataOutcome::BareCr),
                (false, b'\n') => return Err(DataOutcome::BareLf),
                (false, b'\r') => self.prev_cr = true,
                (false, _) => {}
            }
        }
        Ok(())
    }

    /// Call after the last chunk: a trailing CR is a bare CR.
    pub fn finish(&self) -> Result<(), DataOutcome> {
        if self.prev_cr {
            Err(DataOutcome::BareCr)
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(input: &[u8], limit: u64) -> (Vec<u8>, usize, Option<DataOutcome>) {
        let mut out = Vec::new();
        let mut r = DataReader::new(limit);
        let (n, outcome) = r.feed(input, &mut out);
        (out, n, outcome)
    }

    #[test]
    fn unstuffs_and_stops_at_crlf_dot_crlf() {
        let (out, n, o) = read_all(b"a\r\n..b\r\n.c\r\n\r\n.\r\nQUIT\r\n", 100);
        assert_eq!(out, b"a\r\n.b\r\nc\r\n\r\n");
        assert_eq!(o, Some(DataOutcome::Complete));
        assert_eq!(n, 17);
    }

    #[test]
    fn empty_body() {
        let (out, _, o) = read_all(b".\r\n", 100);
        assert!(out.is_empty());
        assert_eq!(o, Some(DataOutcome::Complete));
    }

    #[test]
    fn same_result_when_fed_byte_by_byte() {
        let input = b"x\r\n..y\r\nz\r\n.\r\n";
        let mut out = Vec::new();
        let mut r = DataReader::new(100);
        let mut outcome = None;
        for b in input {
            let (n, o) = r.feed(std::slice::from_ref(b), &mut out);
            assert_eq!(n, 1);
            if o.is_some() {
                outcome = o;
            }
        }
        assert_eq!(out, b"x\r\n.y\r\nz\r\n");
        assert_eq!(outcome, Some(DataOutcome::Complete));
    }

    #[test]
    fn smuggling_variants_never_end_the_data() {
        for (input, expect) in [
            (&b"a\n.\nMAIL"[..], DataOutcome::BareLf),
            (b"a\r.\rMAIL", DataOutcome::BareCr),
            (b"a\n.\r\nMAIL", DataOutcome::BareLf),
            (b"a\r\n.\nMAIL", DataOutcome::BareLf),
            (b"a\r\n.\rMAIL", DataOutcome::BareCr),
            (b"a\r.\r\nMAIL", DataOutcome::BareCr),
            (b"a\n.\rMAIL", DataOutcome::BareLf),
            (b"a\r\n.\r\r\nMAIL", DataOutcome::BareCr),
        ] {
            let (_, _, o) = read_all(input, 100);
            assert_eq!(o, Some(expect), "{input:?}");
        }
        // A NUL before the dot is content, not an end.
        let (_, _, o) = read_all(b"a\r\n\x00.\r\nb", 100);
        assert_eq!(o, None);
    }

    #[test]
    fn size_limit_discards_but_finds_the_end() {
        let (out, _, o) = read_all(b"0123456789\r\n.\r\n", 5);
        assert_eq!(out, b"01234");
        assert_eq!(o, Some(DataOutcome::TooLarge));
        let (_, _, o) = read_all(b"0123\r\n.\r\n", 6);
        assert_eq!(o, Some(DataOutcome::Complete));
    }

    #[test]
    fn bdat_line_endings() {
        let mut c = LineEndingCheck::default();
        assert!(c.check(b"a\r").is_ok());
        assert!(c.check(b"\nb\r\n").is_ok());
        assert!(c.finish().is_ok());
        let mut c = LineEndingCheck::default();
        assert_eq!(c.check(b"a\nb"), Err(DataOutcome::BareLf));
        let mut c = LineEndingCheck::default();
        assert!(c.check(b"a\r").is_ok());
        assert_eq!(c.finish(), Err(DataOutcome::BareCr));
    }
}
