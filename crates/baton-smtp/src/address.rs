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
}

impl fmt::Display for AddressError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AddressError::NoDomain => "missing domain",
            AddressError::LocalPartTooLong => "local part longer than 64 octets",
            AddressError::DomainTooLong => "domain longer than 255 octets",
            AddressError::BadDomain => "invalid domain",
            AddressError::NeedsSmtpUtf8 => "non-ASCII address without SMTPUTF8",
        })
    }
}

/// Checks `local@domain`. Non-ASCII is accepted only when `utf8` (SMTPUTF8) is set.
pub fn validate_mailbox(address: &str, utf8: bool) -> Result<(), AddressError> {
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
    }
}
