//! Mailbox syntax checks for envelope addresses (RFC 5321 §4.1.2, limits of §4.5.3.1).

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressError {
    NoDomain,
    LocalPartTooLong,
    DomainTooLong,
    BadDomain,
    NeedsSmtpUtf8,
    /// A control character (CR, LF, NUL, DEL...): never part of an address.
    ControlCharacter,
    /// Not `Dot-string@domain` or `Quoted-string@domain` (RFC 5321 §4.1.2).
    BadLocalPart,
}

impl fmt::Display for AddressError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AddressError::NoDomain => "missing domain",
            AddressError::LocalPartTooLong => "local part longer than 64 octets",
            AddressError::DomainTooLong => "domain longer than 255 octets",
            AddressError::BadDomain => "invalid domain",
            AddressError::NeedsSmtpUtf8 => "non-ASCII address without SMTPUTF8",
            AddressError::ControlCharacter => "control character in address",
            AddressError::BadLocalPart => {
                "local part is neither a dot-string nor a quoted string (RFC 5321 4.1.2)"
            }
        })
    }
}

/// Checks `local@domain`. Non-ASCII is accepted only when `utf8` (SMTPUTF8) is set.
///
/// `address` is in Baton's stored form, the local part unquoted (as smtp-proto hands it over):
/// its characters are checked, not its quoting. Text written by a person or a program (API
/// calls) goes through [`parse_mailbox`] instead.
pub fn validate_mailbox(address: &str, utf8: bool) -> Result<(), AddressError> {
    if address.chars().any(char::is_control) {
        return Err(AddressError::ControlCharacter);
    }
    if !utf8 && !address.is_ascii() {
        return Err(AddressError::NeedsSmtpUtf8);
    }
    let (local, domain) = address.rsplit_once('@').ok_or(AddressError::NoDomain)?;
    if local.is_empty() || domain.is_empty() {
        return Err(AddressError::NoDomain);
    }
    if local.len() > 64 {
        return Err(AddressError::LocalPartTooLong);
    }
    validate_domain(domain)
}

/// Checks a domain name or an address literal (`[192.0.2.1]`, `[IPv6:2001:db8::1]`).
pub fn validate_domain(domain: &str) -> Result<(), AddressError> {
    if domain.len() > 255 {
        return Err(AddressError::DomainTooLong);
    }
    if let Some(literal) = domain.strip_prefix('[').and_then(|d| d.strip_suffix(']')) {
        let ok = match literal.get(..5) {
            Some(tag) if tag.eq_ignore_ascii_case("IPv6:") => {
                literal[5..].parse::<Ipv6Addr>().is_ok()
            }
            _ => literal.parse::<Ipv4Addr>().is_ok(),
        };
        return if ok {
            Ok(())
        } else {
            Err(AddressError::BadDomain)
        };
    }
    let labels_ok = domain.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || !c.is_ascii())
    });
    if labels_ok {
        Ok(())
    } else {
        Err(AddressError::BadDomain)
    }
}

/// Parses an RFC 5321 Mailbox as written (`Dot-string@domain` or `"Quoted string"@domain`,
/// RFC 6531 UTF-8 when `utf8`) and returns it in stored form, the local part unquoted.
pub fn parse_mailbox(text: &str, utf8: bool) -> Result<String, AddressError> {
    if text.chars().any(char::is_control) {
        return Err(AddressError::ControlCharacter);
    }
    let (local, domain) = text.rsplit_once('@').ok_or(AddressError::NoDomain)?;
    let local = match local.strip_prefix('"') {
        Some(quoted) => unquote(quoted)?,
        None if is_dot_string(local) => local.to_string(),
        None => return Err(AddressError::BadLocalPart),
    };
    let address = format!("{local}@{domain}");
    validate_mailbox(&address, utf8)?;
    Ok(address)
}

/// The inside of a quoted string after its opening quote, up to the closing one, which must
/// end the text: qtextSMTP and quoted-pairSMTP (printable ASCII and, under SMTPUTF8, UTF-8).
fn unquote(quoted: &str) -> Result<String, AddressError> {
    let mut out = String::with_capacity(quoted.len());
    let mut chars = quoted.chars();
    loop {
        match chars.next() {
            None => return Err(AddressError::BadLocalPart),
            Some('"') if chars.as_str().is_empty() => return Ok(out),
            Some('"') => return Err(AddressError::BadLocalPart),
            Some('\\') => out.push(chars.next().ok_or(AddressError::BadLocalPart)?),
            Some(c) => out.push(c),
        }
    }
}

/// RFC 5321 atext (RFC 6531: and any non-ASCII character).
fn is_atext(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c) || !c.is_ascii()
}

/// `Atom *("." Atom)`.
fn is_dot_string(local: &str) -> bool {
    !local.is_empty()
        && local
            .split('.')
            .all(|atom| !atom.is_empty() && atom.chars().all(is_atext))
}

/// An address as it goes on the wire inside `<...>`: the local part as a dot-string when it is
/// one, else quoted with `"` and `\` escaped. None for an address that cannot be sent (a
/// control character: it could end the command line).
pub fn smtp_path(address: &str) -> Option<String> {
    if address.chars().any(char::is_control) {
        return None;
    }
    let Some((local, domain)) = address.rsplit_once('@') else {
        return Some(address.to_string());
    };
    if is_dot_string(local) {
        return Some(address.to_string());
    }
    let mut out = String::with_capacity(address.len() + 4);
    out.push('"');
    for c in local.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push_str("\"@");
    out.push_str(domain);
    Some(out)
}

/// The domain of `local@domain`, lower-cased for comparisons.
pub fn domain_of(address: &str) -> Option<String> {
    address
        .rsplit_once('@')
        .map(|(_, d)| d.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_normal_and_literal_addresses() {
        assert!(validate_mailbox("a.b+c@example.com", false).is_ok());
        assert!(validate_mailbox("x@[192.0.2.1]", false).is_ok());
        assert!(validate_mailbox("x@[IPv6:2001:db8::1]", false).is_ok());
        assert!(validate_mailbox("ü@bücher.example", true).is_ok());
    }

    #[test]
    fn rejects_bad_addresses() {
        assert_eq!(
            validate_mailbox("nodomain", false),
            Err(AddressError::NoDomain)
        );
        assert_eq!(
            validate_mailbox("a@-x.com", false),
            Err(AddressError::BadDomain)
        );
        assert_eq!(
            validate_mailbox("a@x..com", false),
            Err(AddressError::BadDomain)
        );
        assert_eq!(
            validate_mailbox("a@[300.1.1.1]", false),
            Err(AddressError::BadDomain)
        );
        assert_eq!(
            validate_mailbox("a@x_y.com", false),
            Err(AddressError::BadDomain)
        );
        let long = format!("{}@x.com", "a".repeat(65));
        assert_eq!(
            validate_mailbox(&long, false),
            Err(AddressError::LocalPartTooLong)
        );
        assert_eq!(
            validate_mailbox("ü@x.com", false),
            Err(AddressError::NeedsSmtpUtf8)
        );
        assert_eq!(
            validate_mailbox("a\r\nNOOP <b@sink.test", true),
            Err(AddressError::ControlCharacter)
        );
        assert_eq!(
            validate_mailbox("a\u{0}b@x.com", false),
            Err(AddressError::ControlCharacter)
        );
    }

    #[test]
    fn written_addresses_are_parsed_to_rfc_5321() {
        assert_eq!(
            parse_mailbox("a.b+c@example.com", false).as_deref(),
            Ok("a.b+c@example.com")
        );
        assert_eq!(
            parse_mailbox("\"john doe\"@example.com", false).as_deref(),
            Ok("john doe@example.com")
        );
        assert_eq!(
            parse_mailbox("\"a\\\"b\"@example.com", false).as_deref(),
            Ok("a\"b@example.com")
        );
        for bad in [
            "a\r\nNOOP <b@sink.test",
            "a b@example.com",
            "a<b@example.com",
            ".a@example.com",
            "a..b@example.com",
            "\"unclosed@example.com",
            "\"a\"b\"@example.com",
            "a\tb@example.com",
        ] {
            assert!(parse_mailbox(bad, false).is_err(), "{bad:?} accepted");
        }
        assert_eq!(
            parse_mailbox("a\r\nNOOP <b@sink.test", false),
            Err(AddressError::ControlCharacter)
        );
    }

    #[test]
    fn addresses_go_on_the_wire_quoted_when_they_must() {
        assert_eq!(smtp_path("a.b@x.test").as_deref(), Some("a.b@x.test"));
        assert_eq!(
            smtp_path("john doe@x.test").as_deref(),
            Some("\"john doe\"@x.test")
        );
        assert_eq!(
            smtp_path("a\"b@x.test").as_deref(),
            Some("\"a\\\"b\"@x.test")
        );
        assert_eq!(smtp_path("a>b@x.test").as_deref(), Some("\"a>b\"@x.test"));
        assert_eq!(smtp_path(""), Some(String::new()));
        assert_eq!(smtp_path("a\r\nRSET@x.test"), None);
        // What goes out parses back to what was stored.
        for stored in ["john doe@x.test", "a\"b@x.test", "plain@x.test"] {
            let wire = smtp_path(stored).unwrap();
            assert_eq!(parse_mailbox(&wire, false).as_deref(), Ok(stored));
        }
    }
}
