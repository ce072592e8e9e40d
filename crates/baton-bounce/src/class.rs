//! The taxonomy: what a failure says about the recipient, the sender or the path between.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

/// One failure class. Hard ones say the address itself is bad (suppress it); the others say
/// something about the message, the sender's reputation, the path or the moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    /// No such mailbox (5.1.1), or it has moved with no forwarding.
    InvalidRecipient,
    /// No such domain, or one that takes no mail (null MX).
    BadDomain,
    /// The mailbox exists but is disabled, suspended or on hold.
    InactiveMailbox,
    /// The mailbox or the receiving system is full.
    Quota,
    /// The sending IP or domain is blocked: a blocklist, low reputation, no reverse DNS.
    Reputation,
    /// The content was taken for spam.
    SpamContent,
    /// SPF, DKIM or DMARC failed, or the receiver's sender-authentication policy refused it.
    AuthPolicy,
    /// Another policy: the sender or the message refused by a filter or local rule.
    OtherPolicy,
    /// Too many messages or connections: slow down.
    RateLimited,
    /// Over the receiver's size limit.
    TooLarge,
    /// The next hop does not relay for this sender.
    RelayingDenied,
    /// DNS or routing trouble on the way (a lookup that failed, a loop).
    Routing,
    /// No connection, or it was lost or timed out.
    Connection,
    /// A protocol or syntax error, or a TLS requirement not met.
    Protocol,
    /// Trouble on the receiving system itself (a mailer error, a temporary failure).
    SystemError,
    /// Given up after the queue lifetime.
    Expired,
    /// A virus was found.
    Virus,
    /// An automatic reply (vacation, out of office): not a failure.
    AutoReply,
    /// A spam complaint (a feedback report).
    Complaint,
    /// The recipient asked to be taken off the list.
    Unsubscribe,
    /// A success report (2.x.x), not a failure.
    Delivered,
    /// Nothing matched.
    Uncategorized,
}

/// Every class, for the documentation and the mapping file.
pub const ALL: [Class; 22] = [
    Class::InvalidRecipient,
    Class::BadDomain,
    Class::InactiveMailbox,
    Class::Quota,
    Class::Reputation,
    Class::SpamContent,
    Class::AuthPolicy,
    Class::OtherPolicy,
    Class::RateLimited,
    Class::TooLarge,
    Class::RelayingDenied,
    Class::Routing,
    Class::Connection,
    Class::Protocol,
    Class::SystemError,
    Class::Expired,
    Class::Virus,
    Class::AutoReply,
    Class::Complaint,
    Class::Unsubscribe,
    Class::Delivered,
    Class::Uncategorized,
];

impl Class {
    pub fn as_str(self) -> &'static str {
        match self {
            Class::InvalidRecipient => "invalid_recipient",
            Class::BadDomain => "bad_domain",
            Class::InactiveMailbox => "inactive_mailbox",
            Class::Quota => "quota",
            Class::Reputation => "reputation",
            Class::SpamContent => "spam_content",
            Class::AuthPolicy => "auth_policy",
            Class::OtherPolicy => "other_policy",
            Class::RateLimited => "rate_limited",
            Class::TooLarge => "too_large",
            Class::RelayingDenied => "relaying_denied",
            Class::Routing => "routing",
            Class::Connection => "connection",
            Class::Protocol => "protocol",
            Class::SystemError => "system_error",
            Class::Expired => "expired",
            Class::Virus => "virus",
            Class::AutoReply => "auto_reply",
            Class::Complaint => "complaint",
            Class::Unsubscribe => "unsubscribe",
            Class::Delivered => "delivered",
            Class::Uncategorized => "uncategorized",
        }
    }

    /// Whether a permanent failure of this class condemns the address (suppress it). Never a
    /// reputation, policy or content block: those say nothing about the recipient.
    pub fn hard(self, permanent: bool) -> bool {
        permanent && matches!(self, Class::InvalidRecipient | Class::BadDomain)
    }
}

impl fmt::Display for Class {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Class {
    type Err = String;
    fn from_str(s: &str) -> Result<Class, String> {
        ALL.iter()
            .copied()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| format!("unknown bounce class {s:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_only_address_failures_are_hard() {
        for c in ALL {
            assert_eq!(c.as_str().parse::<Class>().unwrap(), c);
        }
        assert!(Class::InvalidRecipient.hard(true));
        assert!(!Class::InvalidRecipient.hard(false), "a 4xx is never hard");
        assert!(
            !Class::Reputation.hard(true),
            "a block says nothing of the address"
        );
        assert!(!Class::AuthPolicy.hard(true));
    }
}
