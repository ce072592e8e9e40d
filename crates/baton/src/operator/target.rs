//! What an operator's command acts on, read from the operator's text once, at the edge (CLI
//! arguments, API bodies). Each command reads its target by its own grammar:
//!
//! - destinations (suspend, resume, flush): `tenant:NAME`, `pool:NAME` (either prefix in any
//!   case), nothing at all (everything), or else a domain: any other text, an address literal
//!   with colons such as `[IPv6:2001:db8::1]` too;
//! - bounce and delete: a queue id, or else a domain without a colon;
//! - hold and release: a queue id, or `ALL` (any case).
//!
//! There is no `site:` target: shaping rules match MX sites, but no operator command ever did;
//! `site:google.com` is read as a domain, as it always was (and so names nothing).

use baton_shaping::Suspendable;
use baton_spool::QueueId;
use serde::{Deserialize, Serialize};

use super::ControlError;

/// What an operator's command acts on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// A destination domain (or any text that names nothing else, kept as written).
    Domain(String),
    /// The mail of `[[pool]]` NAME.
    Pool(String),
    /// A tenant's mail.
    Tenant(String),
    /// One message, by its queue id.
    Message(QueueId),
    /// Everything.
    All,
}

impl Target {
    /// A destination: `tenant:NAME`, `pool:NAME`, nothing (all), or a domain.
    pub fn destination(text: &str) -> Target {
        if let Some(name) = strip_prefix_ignore_case(text, "tenant:") {
            Target::Tenant(name.to_string())
        } else if let Some(name) = strip_prefix_ignore_case(text, "pool:") {
            Target::Pool(name.to_string())
        } else if text.is_empty() {
            Target::All
        } else {
            Target::Domain(text.to_string())
        }
    }

    /// What bounce and delete take: a queue id, or a domain (never empty, never with a
    /// colon: `pool:x` is refused rather than read as a domain no mail goes to).
    pub fn domain_or_message(text: &str) -> Result<Target, ControlError> {
        if text.is_empty() || text.contains(':') {
            return Err(ControlError::new(format!(
                "bounce and delete take a domain, not {text:?}"
            )));
        }
        Ok(match text.parse::<QueueId>() {
            Ok(id) => Target::Message(id),
            Err(_) => Target::Domain(text.to_string()),
        })
    }

    /// What hold and release take: a queue id, or `ALL`.
    pub fn message_or_all(text: &str) -> Result<Target, ControlError> {
        if text.eq_ignore_ascii_case("all") {
            return Ok(Target::All);
        }
        text.parse::<QueueId>()
            .map(Target::Message)
            .map_err(ControlError::new)
    }

    /// What a suspension of this target holds back. A message cannot be suspended; nor can
    /// everything: `baton suspend ""` suspends the empty domain, which no mail goes to (as it
    /// always did: answered, saved, and holding nothing back).
    pub fn suspendable(&self) -> Result<Suspendable, ControlError> {
        Ok(match self {
            Target::Domain(d) => Suspendable::Domain(d.clone()),
            Target::Pool(p) => Suspendable::Pool(p.clone()),
            Target::Tenant(t) => Suspendable::Tenant(t.clone()),
            Target::All => Suspendable::Domain(String::new()),
            Target::Message(id) => {
                return Err(ControlError::new(format!(
                    "suspend and resume take a domain, pool:NAME or tenant:NAME, not message {id}"
                )));
            }
        })
    }
}

/// `text` without `prefix`, if it starts with it in any case.
fn strip_prefix_ignore_case<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let head = text.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &text[prefix.len()..])
}

/// A target and the words the operator wrote for it: answers and events echo the words
/// (`Tenant:Acme` stays so), the queue manager acts on the target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Written {
    pub target: Target,
    pub text: String,
}

impl Written {
    /// A destination (see [`Target::destination`]).
    pub fn destination(text: &str) -> Written {
        Written {
            target: Target::destination(text),
            text: text.to_string(),
        }
    }

    /// A domain or a queue id (see [`Target::domain_or_message`]).
    pub fn domain_or_message(text: &str) -> Result<Written, ControlError> {
        Ok(Written {
            target: Target::domain_or_message(text)?,
            text: text.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn domain(d: &str) -> Target {
        Target::Domain(d.into())
    }

    #[test]
    fn destinations() {
        assert_eq!(Target::destination("example.com"), domain("example.com"));
        assert_eq!(
            Target::destination("tenant:acme"),
            Target::Tenant("acme".into())
        );
        assert_eq!(
            Target::destination("TENANT:Acme"),
            Target::Tenant("Acme".into())
        );
        assert_eq!(
            Target::destination("Pool:bulk"),
            Target::Pool("bulk".into())
        );
        assert_eq!(Target::destination("pool:"), Target::Pool("".into()));
        assert_eq!(Target::destination(""), Target::All);
        // Colons do not make a target: an address literal is a domain.
        assert_eq!(
            Target::destination("[IPv6:2001:db8::1]"),
            domain("[IPv6:2001:db8::1]")
        );
        assert_eq!(
            Target::destination("site:google.com"),
            domain("site:google.com")
        );
        assert_eq!(Target::destination("ALL"), domain("ALL"));
        assert_eq!(Target::destination("tenant"), domain("tenant"));
        // Multi-byte text never splits inside a character.
        assert_eq!(Target::destination("é:x"), domain("é:x"));
        assert_eq!(Target::destination("tenantéx"), domain("tenantéx"));
    }

    #[test]
    fn bounce_and_delete_targets() {
        let id = "0123456789ABCDEF";
        assert_eq!(
            Target::domain_or_message(id).unwrap(),
            Target::Message(id.parse().unwrap())
        );
        assert_eq!(
            Target::domain_or_message("stuck.test").unwrap(),
            domain("stuck.test")
        );
        assert_eq!(Target::domain_or_message("ALL").unwrap(), domain("ALL"));
        for refused in ["", "pool:bulk", "tenant:acme", "[IPv6:::1]"] {
            assert_eq!(
                Target::domain_or_message(refused).unwrap_err().to_string(),
                format!("bounce and delete take a domain, not {refused:?}")
            );
        }
    }

    #[test]
    fn hold_and_release_targets() {
        assert_eq!(Target::message_or_all("ALL").unwrap(), Target::All);
        assert_eq!(Target::message_or_all("all").unwrap(), Target::All);
        let id: QueueId = "00000000000000FF".parse().unwrap();
        assert_eq!(
            Target::message_or_all("00000000000000ff").unwrap(),
            Target::Message(id)
        );
        assert_eq!(
            Target::message_or_all("example.com")
                .unwrap_err()
                .to_string(),
            "queue id \"example.com\" should be 16 hex digits"
        );
    }

    #[test]
    fn what_a_suspension_holds_back() {
        let key = |text: &str| Target::destination(text).suspendable().unwrap().key();
        // The key is always the operator's words in lower case, as it was.
        for text in [
            "Tenant:ACME",
            "POOL:Bulk",
            "Example.COM",
            "[IPv6:::1]",
            "site:x",
            "",
        ] {
            assert_eq!(key(text), text.to_ascii_lowercase());
        }
        assert_eq!(key("Tenant:ACME"), "tenant:acme");
        assert!(Target::Message(QueueId(1)).suspendable().is_err());
    }

    #[test]
    fn written_keeps_the_words() {
        let w = Written::destination("Tenant:Acme");
        assert_eq!(w.target, Target::Tenant("Acme".into()));
        assert_eq!(w.text, "Tenant:Acme");
    }
}
