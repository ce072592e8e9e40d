//! Inbound authentication on mx listeners (`[inbound] authentication_results = true`): SPF for
//! the HELO and MAIL FROM identities (RFC 7208), DKIM signatures (RFC 6376) and DMARC for the
//! From: domain (RFC 7489), reported in an Authentication-Results header (RFC 8601) that the
//! session puts under its Received: header. Verdicts are reported, never acted on: what to do
//! with a failing message is the mailbox side's decision.
//!
//! Owns the checks (through mail-auth); it must not change the envelope or refuse mail.

use std::net::IpAddr;

use mail_auth::dmarc::verify::DmarcParameters;
use mail_auth::spf::verify::SpfParameters;
use mail_auth::{AuthenticatedMessage, AuthenticationResults, MessageAuthenticator};

use crate::config::DnsConfig;

pub struct InboundAuth {
    authenticator: MessageAuthenticator,
    hostname: String,
}

/// What the client said about itself.
pub struct Client<'a> {
    pub ip: IpAddr,
    pub helo: &'a str,
    /// The envelope sender; empty for the null sender.
    pub mail_from: &'a str,
}

impl InboundAuth {
    pub fn new(dns: &DnsConfig, hostname: &str) -> anyhow::Result<InboundAuth> {
        let (config, options) = baton_dns::resolver_parts(dns)?;
        Ok(InboundAuth {
            authenticator: MessageAuthenticator::new(config, options)?,
            hostname: hostname.to_string(),
        })
    }

    /// The Authentication-Results field (with its CRLF) for `message`.
    pub async fn header(&self, message: &[u8], client: &Client<'_>) -> String {
        let auth = &self.authenticator;
        let sender_domain = client
            .mail_from
            .rsplit_once('@')
            .map(|(_, d)| d)
            .unwrap_or(client.helo);
        let spf = if client.mail_from.is_empty() {
            auth.verify_spf(SpfParameters::verify_ehlo(
                client.ip,
                client.helo,
                &self.hostname,
            ))
            .await
        } else {
            auth.verify_spf(SpfParameters::verify(
                client.ip,
                client.helo,
                &self.hostname,
                client.mail_from,
            ))
            .await
        };
        let mut results = AuthenticationResults::new(&self.hostname);
        let Some(parsed) = AuthenticatedMessage::parse(message) else {
            // Not parseable as a message: SPF is all that can be said.
            results =
                results.with_spf_mailfrom_result(&spf, client.ip, client.mail_from, client.helo);
            return format!("Authentication-Results: {results}\r\n");
        };
        let dkim = auth.verify_dkim(&parsed).await;
        let dmarc = auth
            .verify_dmarc(DmarcParameters::new(&parsed, &dkim, sender_domain, &spf))
            .await;
        results = results
            .with_dkim_results(&dkim, parsed.from())
            .with_spf_mailfrom_result(&spf, client.ip, client.mail_from, client.helo)
            .with_dmarc_result(&dmarc);
        let text = results.to_string();
        // RFC 8601 §2.7.1: an unsigned message is "dkim=none" (mail-auth leaves it out).
        let text = match (dkim.is_empty(), text.strip_prefix(self.hostname.as_str())) {
            (true, Some(rest)) => format!("{};\r\n\tdkim=none{rest}", self.hostname),
            _ => text,
        };
        format!("Authentication-Results: {text}\r\n")
    }

    pub fn hostname(&self) -> &str {
        &self.hostname
    }
}

/// Whether an Authentication-Results field claims to come from `authserv_id` (RFC 8601 §5:
/// such fields arriving from outside are forgeries and must go).
pub fn claims_to_be(field_value: &str, authserv_id: &str) -> bool {
    let id = field_value
        .trim_start()
        .split(|c: char| c == ';' || c.is_whitespace())
        .next()
        .unwrap_or("");
    id.eq_ignore_ascii_case(authserv_id)
}

/// Removes, from the header section of `message`, the Authentication-Results fields that claim
/// `authserv_id`; returns how many went.
pub fn strip_forged(message: &mut Vec<u8>, authserv_id: &str) -> usize {
    let mut removed = 0;
    let mut at = 0;
    while at < message.len() {
        let line_end = find_line_end(message, at);
        if line_end == at + 2 && message[at..].starts_with(b"\r\n") {
            break; // the blank line: end of the header section
        }
        // The field runs on over continuation lines (starting with space or tab).
        let mut field_end = line_end;
        while matches!(message.get(field_end), Some(b' ' | b'\t')) {
            field_end = find_line_end(message, field_end);
        }
        let field = &message[at..field_end];
        let forged = field
            .iter()
            .position(|&b| b == b':')
            .filter(|&colon| field[..colon].eq_ignore_ascii_case(b"authentication-results"))
            .is_some_and(|colon| {
                claims_to_be(&String::from_utf8_lossy(&field[colon + 1..]), authserv_id)
            });
        if forged {
            message.drain(at..field_end);
            removed += 1;
        } else {
            at = field_end;
        }
    }
    removed
}

/// The index just past the CRLF (or the end) of the line starting at `from`.
fn find_line_end(message: &[u8], from: usize) -> usize {
    message[from..]
        .windows(2)
        .position(|w| w == b"\r\n")
        .map(|i| from + i + 2)
        .unwrap_or(message.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forged_results_are_stripped() {
        let mut m = b"Received: x\r\nAuthentication-Results: mx.example.com;\r\n\tspf=pass\r\nauthentication-results: other.example; dkim=pass\r\nSubject: hi\r\n\r\nAuthentication-Results: mx.example.com; body\r\n".to_vec();
        assert_eq!(strip_forged(&mut m, "mx.example.com"), 1);
        assert_eq!(
            m,
            b"Received: x\r\nauthentication-results: other.example; dkim=pass\r\nSubject: hi\r\n\r\nAuthentication-Results: mx.example.com; body\r\n"
        );
    }

    #[test]
    fn authserv_id_is_the_first_token() {
        assert!(claims_to_be(" mx.example.com; spf=pass", "MX.example.com"));
        assert!(claims_to_be("mx.example.com 1; none", "mx.example.com"));
        assert!(!claims_to_be(
            "mx.example.com.evil; spf=pass",
            "mx.example.com"
        ));
        assert!(!claims_to_be("", "mx.example.com"));
    }
}
