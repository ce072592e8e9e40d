//! Signed tokens that tie what comes back to one recipient of one message: the VERP return
//! path (`bounces+<token>@<domain>`) and the unsubscribe links. A token is
//! `<queue id>-<recipient index, hex>-<mac>`: short enough for a 64-octet local part, case
//! blind (some MTAs fold the case of a local part), and signed with HMAC-SHA256 under a
//! purpose tag, so that neither a forged bounce nor a bounce token used as an unsubscribe
//! link is accepted.
//!
//! Pure: the key is given; nothing here reads a file.

use baton_spool::QueueId;

/// Hex digits of MAC kept: 48 bits, far past what forgery by mail can try.
const MAC_HEX: usize = 12;
/// The VERP local part's prefix.
pub const BOUNCE_PREFIX: &str = "bounces+";
/// The mailto unsubscribe local part's prefix.
pub const UNSUBSCRIBE_PREFIX: &str = "unsubscribe+";

/// What a token is for; part of what is signed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    Bounce,
    Unsubscribe,
}

impl Purpose {
    fn tag(self) -> &'static str {
        match self {
            Purpose::Bounce => "bounce",
            Purpose::Unsubscribe => "unsubscribe",
        }
    }
}

/// One recipient of one message, as a checked token names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenRef {
    pub id: QueueId,
    pub rcpt: u32,
}

/// Makes and checks tokens under one key.
pub struct Tokens {
    key: ring::hmac::Key,
}

impl Tokens {
    pub fn new(secret: &[u8]) -> Tokens {
        Tokens {
            key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret),
        }
    }

    fn mac(&self, purpose: Purpose, id: QueueId, rcpt: u32) -> String {
        let text = format!("{}|{id}|{rcpt:x}", purpose.tag());
        let tag = ring::hmac::sign(&self.key, text.as_bytes());
        let mut hex = hex::encode(tag.as_ref());
        hex.truncate(MAC_HEX);
        hex
    }

    pub fn make(&self, purpose: Purpose, id: QueueId, rcpt: u32) -> String {
        format!("{id}-{rcpt:x}-{}", self.mac(purpose, id, rcpt))
    }

    /// The recipient a token names, if its MAC is right for `purpose`.
    pub fn check(&self, purpose: Purpose, token: &str) -> Option<TokenRef> {
        let mut parts = token.trim().splitn(3, '-');
        let id = parts.next()?.to_ascii_uppercase().parse::<QueueId>().ok()?;
        let rcpt_text = parts.next()?;
        if rcpt_text.is_empty() || rcpt_text.len() > 8 {
            return None;
        }
        let rcpt = u32::from_str_radix(rcpt_text, 16).ok()?;
        let mac = parts.next()?.to_ascii_lowercase();
        let want = self.mac(purpose, id, rcpt);
        // Compared in constant time: the MAC is the only secret here.
        let diff = mac
            .bytes()
            .zip(want.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        (mac.len() == want.len() && diff == 0).then_some(TokenRef { id, rcpt })
    }

    /// The return path for recipient `rcpt` of message `id`.
    pub fn return_path(&self, domain: &str, id: QueueId, rcpt: u32) -> String {
        format!(
            "{BOUNCE_PREFIX}{}@{domain}",
            self.make(Purpose::Bounce, id, rcpt)
        )
    }

    /// The token in an address at a return-path domain (`bounces+T@` or `unsubscribe+T@`),
    /// with what it is for; None if the address carries none or its MAC is wrong.
    pub fn in_address(&self, address: &str) -> Option<(Purpose, TokenRef)> {
        let local = address.rsplit_once('@').map_or(address, |(l, _)| l);
        let lower = local.to_ascii_lowercase();
        for (prefix, purpose) in [
            (BOUNCE_PREFIX, Purpose::Bounce),
            (UNSUBSCRIBE_PREFIX, Purpose::Unsubscribe),
        ] {
            if let Some(token) = lower.strip_prefix(prefix) {
                return self.check(purpose, token).map(|t| (purpose, t));
            }
        }
        None
    }

    /// The first valid return-path token anywhere in `text` (the original message's
    /// Return-Path inside a feedback report, say): for reports sent to a fixed address.
    pub fn find_in(&self, text: &str) -> Option<TokenRef> {
        let lower = text.to_ascii_lowercase();
        lower
            .match_indices(BOUNCE_PREFIX)
            .take(100)
            .find_map(|(at, _)| {
                let rest = &lower[at + BOUNCE_PREFIX.len()..];
                let end = rest
                    .find(|c: char| !(c.is_ascii_hexdigit() || c == '-'))
                    .unwrap_or(rest.len());
                self.check(Purpose::Bounce, &rest[..end])
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> QueueId {
        "0000019AF3C2D1E4".parse().unwrap()
    }

    #[test]
    fn a_return_path_names_its_recipient_and_fits_a_local_part() {
        let t = Tokens::new(b"0123456789abcdef0123456789abcdef");
        let rp = t.return_path("bounces.example.com", id(), 0x1f3);
        let local = rp.split('@').next().unwrap();
        assert!(local.len() <= 64, "{local}");
        assert!(baton_smtp::address::validate_mailbox(&rp, false).is_ok());
        let want = TokenRef {
            id: id(),
            rcpt: 0x1f3,
        };
        assert_eq!(t.in_address(&rp), Some((Purpose::Bounce, want)));
        // A folded case still reads.
        assert_eq!(
            t.in_address(&rp.to_uppercase()),
            Some((Purpose::Bounce, want))
        );
        assert_eq!(t.find_in(&format!("Return-Path: <{rp}>\r\n")), Some(want));
    }

    #[test]
    fn forged_or_repurposed_tokens_are_refused() {
        let t = Tokens::new(b"0123456789abcdef0123456789abcdef");
        let other = Tokens::new(b"another key entirely, 32 bytes!!");
        let token = t.make(Purpose::Bounce, id(), 2);
        assert!(t.check(Purpose::Bounce, &token).is_some());
        assert!(
            other.check(Purpose::Bounce, &token).is_none(),
            "another key"
        );
        assert!(
            t.check(Purpose::Unsubscribe, &token).is_none(),
            "another purpose"
        );
        // Another recipient with the same MAC.
        let moved = token.replacen("-2-", "-3-", 1);
        assert!(t.check(Purpose::Bounce, &moved).is_none());
        for bad in [
            "",
            "-",
            "x-1-abc",
            "0000019AF3C2D1E4-1",
            "0000019AF3C2D1E4--",
            "0000019AF3C2D1E4-123456789-0",
        ] {
            assert!(t.check(Purpose::Bounce, bad).is_none(), "{bad:?}");
        }
        assert!(t.in_address("postmaster@bounces.example.com").is_none());
        assert!(t.find_in("bounces+ bounces+0000 nothing").is_none());
    }
}
