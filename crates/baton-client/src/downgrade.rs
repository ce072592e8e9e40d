//! What a message must become for one server: the SMTPUTF8 flag dropped when nothing needs it,
//! 8-bit content refused where the server takes only 7 bits, lines over 998 octets broken.
//! Pure functions of the message and the server's EHLO capabilities; the client applies them.

use bytes::Bytes;

/// RFC 5322 §2.1.1: a line is at most 998 octets before its CRLF.
pub const MAX_LINE: usize = 998;

/// The message as it goes to this server.
#[derive(Debug, PartialEq, Eq)]
pub struct Prepared {
    /// A new body, when the stored one had to change (long lines broken).
    pub body: Option<Bytes>,
    /// Send MAIL with SMTPUTF8.
    pub smtputf8: bool,
}

/// Why the message cannot go to this server as it is: (code, enhanced status, text).
pub type Refusal = (u16, &'static str, String);

/// What the server offers that matters here, and the longest line to send it (0: any).
#[derive(Debug, Clone, Copy)]
pub struct Offers {
    pub smtputf8: bool,
    pub eight_bit: bool,
    pub line_limit: usize,
}

/// Decides how `body` (flagged SMTPUTF8 or not) goes to a server offering `offers`.
pub fn prepare(
    body: &Bytes,
    addresses_ascii: bool,
    smtputf8: bool,
    offers: Offers,
) -> Result<Prepared, Refusal> {
    let mut smtputf8 = smtputf8;
    if smtputf8 && !offers.smtputf8 {
        // Flagged, but needed only if an address or a header field is not ASCII (RFC 6531
        // §3.2: a server without SMTPUTF8 may get what is ASCII without the flag).
        if !addresses_ascii || !header_section(body).is_ascii() {
            return Err((
                550,
                "5.6.7",
                "the server does not support SMTPUTF8, which this message needs".into(),
            ));
        }
        smtputf8 = false;
    }
    if !offers.eight_bit && !smtputf8 && !body.is_ascii() {
        // Postfix would convert to quoted-printable; Baton refuses rather than rewrite MIME.
        return Err((
            554,
            "5.6.3",
            "8-bit content, and the server offers no 8BITMIME: conversion to 7 bits is not supported"
                .into(),
        ));
    }
    Ok(Prepared {
        body: break_long_lines(body, offers.line_limit),
        smtputf8,
    })
}

/// The header section, up to and including the blank line (all of it if there is none).
fn header_section(body: &[u8]) -> &[u8] {
    match body.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(i) => &body[..i + 4],
        None => body,
    }
}

/// Lines over `limit` octets broken by inserting CRLF SPACE (as Postfix's SMTP client does, to
/// do MIME the least harm); None when no line is that long, or `limit` is 0 (the body goes as
/// stored).
pub fn break_long_lines(body: &[u8], limit: usize) -> Option<Bytes> {
    let too_long = limit > 0
        && body
            .split(|&b| b == b'\n')
            .any(|line| line.strip_suffix(b"\r").unwrap_or(line).len() > limit);
    if !too_long {
        return None;
    }
    let mut out = Vec::with_capacity(body.len() + body.len() / limit * 3 + 3);
    let mut run = 0usize;
    for (i, &b) in body.iter().enumerate() {
        let ends_line = b == b'\r' && body.get(i + 1) == Some(&b'\n');
        if b == b'\n' || ends_line {
            run = 0;
        } else if run == limit {
            out.extend_from_slice(b"\r\n ");
            run = 2; // the space and this byte
        } else {
            run += 1;
        }
        out.push(b);
    }
    Some(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOTH: Offers = Offers {
        smtputf8: true,
        eight_bit: true,
        line_limit: MAX_LINE,
    };
    const NEITHER: Offers = Offers {
        smtputf8: false,
        eight_bit: false,
        line_limit: MAX_LINE,
    };

    #[test]
    fn smtputf8_goes_only_where_it_is_needed() {
        let ascii = Bytes::from_static(b"Subject: hi\r\n\r\nbody\r\n");
        let prepared = prepare(&ascii, true, true, NEITHER).unwrap();
        assert_eq!(
            prepared,
            Prepared {
                body: None,
                smtputf8: false
            }
        );
        assert!(prepare(&ascii, true, true, BOTH).unwrap().smtputf8);
        // A non-ASCII address or header needs it.
        assert_eq!(
            prepare(&ascii, false, true, NEITHER).unwrap_err().1,
            "5.6.7"
        );
        let utf8_header = Bytes::from("Subject: héllo\r\n\r\nbody\r\n");
        assert_eq!(
            prepare(&utf8_header, true, true, NEITHER).unwrap_err().1,
            "5.6.7"
        );
    }

    #[test]
    fn eight_bit_content_needs_8bitmime() {
        let eight = Bytes::from("Subject: x\r\n\r\ncafé\r\n");
        assert_eq!(
            prepare(&eight, true, false, NEITHER).unwrap_err().1,
            "5.6.3"
        );
        let offers = Offers {
            eight_bit: true,
            ..NEITHER
        };
        assert!(prepare(&eight, true, false, offers).is_ok());
    }

    #[test]
    fn long_lines_are_broken_with_crlf_space() {
        assert_eq!(break_long_lines(b"short\r\nlines\r\n", MAX_LINE), None);
        let exactly = [vec![b'a'; MAX_LINE], b"\r\n".to_vec()].concat();
        assert_eq!(break_long_lines(&exactly, MAX_LINE), None);
        let long = [vec![b'a'; 2500], b"\r\nend\r\n".to_vec()].concat();
        assert_eq!(break_long_lines(&long, 0), None, "0: sent as stored");
        let broken = break_long_lines(&long, MAX_LINE).unwrap();
        let lines: Vec<&[u8]> = broken.split(|&b| b == b'\n').collect();
        let lens: Vec<usize> = lines.iter().map(|l| l.len()).collect();
        // 998 + CR, then " " + 997 + CR, then the rest: all of it there, in order.
        assert_eq!(lens, [999, 999, 507, 4, 0]);
        let content: Vec<u8> = broken.iter().copied().filter(|&b| b == b'a').collect();
        assert_eq!(content.len(), 2500);
        assert!(lines.iter().all(|l| l.len() <= MAX_LINE + 1));
    }
}
