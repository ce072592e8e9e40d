//! The rules that turn a reply or diagnostic into a [`Class`]: Baton's own (`rules.txt`,
//! shipped inside the binary) after any the operator adds. First match wins; text rules before
//! status-code rules (see the head of `rules.txt`).

use std::sync::OnceLock;

use regex::{Regex, RegexBuilder};

use crate::Class;

/// The rules shipped with Baton.
pub const BUILTIN: &str = include_str!("rules.txt");

/// Longest text looked at: a reply or diagnostic, not a whole message.
const MAX_TEXT: usize = 16 << 10;

enum Rule {
    Text(Class, Regex),
    /// Class digit (None: any), subject, detail.
    Status(Option<u8>, u16, u16, Class),
}

/// A parsed rule set.
pub struct Rules {
    rules: Vec<Rule>,
}

impl std::fmt::Debug for Rules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Rules({} rules)", self.rules.len())
    }
}

impl Rules {
    /// Parses rules in `rules.txt`'s format; the error names the line.
    pub fn parse(text: &str) -> Result<Rules, String> {
        let mut rules = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let rule = parse_line(line).map_err(|why| format!("line {}: {why}", n + 1))?;
            rules.push(rule);
        }
        Ok(Rules { rules })
    }

    /// Baton's own rules.
    pub fn builtin() -> &'static Rules {
        static RULES: OnceLock<Rules> = OnceLock::new();
        RULES.get_or_init(|| match Rules::parse(BUILTIN) {
            Ok(rules) => rules,
            // Checked by a unit test: the shipped file always parses.
            Err(why) => panic!("the built-in bounce rules do not parse: {why}"),
        })
    }

    /// The class of a failure with enhanced status `status` (if any) and reply or diagnostic
    /// `text`; None when no rule matches.
    pub fn classify(&self, status: Option<&str>, text: &str) -> Option<Class> {
        let text = cut(text, MAX_TEXT);
        let code = status.and_then(parse_status);
        for rule in &self.rules {
            match rule {
                Rule::Text(class, re) if re.is_match(text) => return Some(*class),
                Rule::Status(digit, subject, detail, class) => {
                    if let Some((d, s, t)) = code
                        && digit.is_none_or(|x| x == d)
                        && *subject == s
                        && *detail == t
                    {
                        return Some(*class);
                    }
                }
                Rule::Text(..) => {}
            }
        }
        None
    }
}

/// Rules tried in order: the operator's first, then Baton's.
pub fn classify_with(extra: Option<&Rules>, status: Option<&str>, text: &str) -> Class {
    if status.is_some_and(|s| s.starts_with('2')) {
        return Class::Delivered;
    }
    let by_rules = |text: &str| {
        extra
            .and_then(|r| r.classify(status, text))
            .or_else(|| Rules::builtin().classify(status, text))
    };
    // Postfix puts "Recipient address rejected:" before every RCPT refusal, whatever its
    // reason: the words after it decide, when they say anything.
    let class = strip_rejected_prefix(text)
        .and_then(|rest| by_rules(&rest))
        .or_else(|| by_rules(text))
        .unwrap_or(Class::Uncategorized);
    // Words of an unknown user under a security or policy status (5.7.x) are a filter's
    // ("550 5.7.1 User unknown" from a gateway that refuses what it will not relay).
    if class == Class::InvalidRecipient && status.is_some_and(|s| s.starts_with("5.7.")) {
        return Class::OtherPolicy;
    }
    // A domain that does not exist is a permanent verdict: with a temporary status it is a
    // lookup that failed ("Host not found, try again").
    if class == Class::BadDomain
        && status.is_some_and(|s| s.starts_with('4'))
        && !takes_no_mail(text)
    {
        return Class::Routing;
    }
    class
}

/// The text without Postfix's "Recipient address rejected:" prefix; None without one.
fn strip_rejected_prefix(text: &str) -> Option<String> {
    static R: OnceLock<Regex> = OnceLock::new();
    let prefix = R.get_or_init(|| {
        RegexBuilder::new(r"recipient address rejected:")
            .case_insensitive(true)
            .build()
            .unwrap_or_else(|e| panic!("bad built-in pattern: {e}"))
    });
    let text = cut(text, MAX_TEXT);
    prefix
        .is_match(text)
        .then(|| prefix.replace_all(text, " ").into_owned())
}

/// Whether the text says the domain takes no mail at all (a null MX, RFC 7505): permanent,
/// whatever status the reporter gave it.
fn takes_no_mail(text: &str) -> bool {
    static R: OnceLock<Regex> = OnceLock::new();
    R.get_or_init(|| {
        RegexBuilder::new(r"null mx|does(?:n't| not) (?:receive|accept) (?:e-?)?mail")
            .case_insensitive(true)
            .build()
            .unwrap_or_else(|e| panic!("bad built-in pattern: {e}"))
    })
    .is_match(cut(text, MAX_TEXT))
}

fn parse_line(line: &str) -> Result<Rule, String> {
    let mut parts = line.splitn(3, char::is_whitespace);
    let kind = parts.next().unwrap_or("");
    let a = parts.next().ok_or("a rule needs a class and a pattern")?;
    let b = parts
        .next()
        .ok_or("a rule needs a class and a pattern")?
        .trim();
    match kind {
        "text" => {
            let class: Class = a.parse()?;
            let re = RegexBuilder::new(b)
                .case_insensitive(true)
                .size_limit(1 << 22)
                .build()
                .map_err(|e| format!("bad regular expression: {e}"))?;
            Ok(Rule::Text(class, re))
        }
        "status" => {
            let class: Class = b.parse()?;
            let mut fields = a.split('.');
            let digit = match fields.next() {
                Some("x") => None,
                Some(d) => Some(d.parse::<u8>().map_err(|_| format!("bad status {a:?}"))?),
                None => return Err(format!("bad status {a:?}")),
            };
            let num = |f: Option<&str>| f.and_then(|f| f.parse::<u16>().ok());
            let (Some(subject), Some(detail)) = (num(fields.next()), num(fields.next())) else {
                return Err(format!("bad status {a:?}"));
            };
            Ok(Rule::Status(digit, subject, detail, class))
        }
        other => Err(format!("unknown rule kind {other:?} (text or status)")),
    }
}

/// `"5.1.1"` as numbers; None when it is not a status code.
pub fn parse_status(s: &str) -> Option<(u8, u16, u16)> {
    let mut f = s.trim().split('.');
    let d: u8 = f.next()?.parse().ok()?;
    let subject: u16 = f.next()?.parse().ok()?;
    let detail: u16 = f.next()?.parse().ok()?;
    (matches!(d, 2 | 4 | 5) && f.next().is_none()).then_some((d, subject, detail))
}

fn cut(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(status: &str, text: &str) -> Class {
        classify_with(None, (!status.is_empty()).then_some(status), text)
    }

    #[test]
    fn the_shipped_rules_parse() {
        assert!(Rules::parse(BUILTIN).is_ok());
    }

    /// Replies of the big providers, in several phrasings each, as one would class them by hand.
    #[test]
    fn provider_replies_are_classed_as_by_hand() {
        let cases = [
            (
                "5.1.1",
                "550-5.1.1 The email account that you tried to reach does not exist. Please try double-checking the recipient's email address",
                Class::InvalidRecipient,
            ),
            (
                "5.1.1",
                "550 5.1.1 <x@yahoo.com>: Recipient address rejected: User unknown in virtual alias table",
                Class::InvalidRecipient,
            ),
            (
                "5.5.0",
                "550 5.5.0 Requested action not taken: mailbox unavailable",
                Class::InvalidRecipient,
            ),
            (
                "5.1.10",
                "550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup",
                Class::InvalidRecipient,
            ),
            (
                "5.2.2",
                "552-5.2.2 The email account that you tried to reach is over quota",
                Class::Quota,
            ),
            ("4.2.2", "452 4.2.2 Mailbox full", Class::Quota),
            (
                "5.7.1",
                "554 5.7.1 Service unavailable; Client host [192.0.2.1] blocked using zen.spamhaus.org",
                Class::Reputation,
            ),
            (
                "5.7.1",
                "550 5.7.1 Our system has detected that this message is likely unsolicited mail. To reduce the amount of spam",
                Class::SpamContent,
            ),
            (
                "4.7.0",
                "421 4.7.0 [TSS04] Messages from 192.0.2.1 temporarily deferred due to unexpected volume or user complaints",
                Class::Reputation,
            ),
            (
                "4.7.28",
                "421-4.7.28 Gmail has detected an unusual rate of unsolicited mail",
                Class::RateLimited,
            ),
            (
                "5.7.26",
                "550-5.7.26 Unauthenticated email from example.com is not accepted due to domain's DMARC policy",
                Class::AuthPolicy,
            ),
            (
                "5.7.1",
                "550 5.7.1 Unfortunately, messages from [192.0.2.1] weren't sent. Please contact your Internet service provider since part of their network is on our block list (S3150)",
                Class::Reputation,
            ),
            ("5.7.1", "550 5.7.1 Relaying denied", Class::RelayingDenied),
            (
                "5.3.4",
                "552 5.3.4 Message size exceeds fixed limit",
                Class::TooLarge,
            ),
            (
                "",
                "421 Too many concurrent SMTP connections from this IP address; please try again later",
                Class::RateLimited,
            ),
            (
                "5.2.1",
                "550 5.2.1 The email account that you tried to reach is disabled",
                Class::InactiveMailbox,
            ),
            (
                "5.7.0",
                "554 5.7.0 <a@example.org>: Recipient address rejected: Spam detected",
                Class::SpamContent,
            ),
            (
                "5.7.1",
                "550 5.7.1 This system is not configured to relay mail from <s@example.net> to <a@example.org>",
                Class::RelayingDenied,
            ),
            (
                "5.7.1",
                "550 5.7.1 <a@example.org>: Recipient address rejected: Access denied",
                Class::OtherPolicy,
            ),
            (
                "4.0.0",
                "DNS type 'mx' lookup of example.org responded with code NOERROR: the domain doesn't receive email (null MX)",
                Class::BadDomain,
            ),
            (
                "4.4.3",
                "451 4.4.3 Host not found, try again",
                Class::Routing,
            ),
            (
                "5.4.1",
                "550 5.4.1 Recipient address rejected: Access denied. AS(201806281)",
                Class::InvalidRecipient,
            ),
            (
                "5.3.0",
                "550 5.3.0 <a@example.org>: Recipient address rejected: Internal system error",
                Class::SystemError,
            ),
            (
                "5.2.1",
                "550-5.2.1 The user you are trying to contact is receiving mail at a rate that prevents additional messages from being delivered",
                Class::RateLimited,
            ),
            (
                "5.1.1",
                "550 5.1.1 <a@example.org>: inactive email address",
                Class::InactiveMailbox,
            ),
            (
                "4.1.9",
                "I'm not going to try again; this message has been in the queue too long.",
                Class::Expired,
            ),
            (
                "5.7.25",
                "550-5.7.25 The IP address sending this message does not have a PTR record setup",
                Class::Reputation,
            ),
            ("5.7.9", "554 5.7.9 Header error", Class::Protocol),
            (
                "5.5.4",
                "504 5.5.4 Command parameter not implemented",
                Class::Protocol,
            ),
            (
                "",
                "550-Please turn on SMTP Authentication in your mail client.",
                Class::AuthPolicy,
            ),
            ("5.7.6", "550 5.7.6 Failed to deliver", Class::AuthPolicy),
            (
                "4.7.650",
                "451 4.7.650 The mail server [192.0.2.25] has been temporarily rate limited due to IP reputation.",
                Class::Reputation,
            ),
            (
                "5.5.0",
                "550 domain [example.com] mismatches client ip 192.0.2.225.",
                Class::Reputation,
            ),
            (
                "",
                "554 mx.example.org ESMTP not accepting connections",
                Class::Reputation,
            ),
            (
                "",
                "550 Client host blocked for spamming issues.",
                Class::Reputation,
            ),
            (
                "5.0.0",
                "Connected to 192.0.2.1 but my name was rejected. Remote host said: 501 5.0.0 Invalid domain name",
                Class::Reputation,
            ),
            (
                "",
                "550-REJECTED - Blacklisted URL in message.",
                Class::SpamContent,
            ),
            (
                "4.3.0",
                "In: RCPT TO:<a@example.org> ORCPT=rfc822;a@example.org Out: 451 4.3.0 Error: queue file write error",
                Class::SystemError,
            ),
            (
                "5.4.4",
                "Name service error for name=example.org type=MX: Malformed or unexpected name server reply",
                Class::Routing,
            ),
            (
                "",
                "an MX or SRV record indicated no SMTP service",
                Class::BadDomain,
            ),
            ("4.4.7", "Delivery time expired", Class::Expired),
            ("2.0.0", "250 2.0.0 OK", Class::Delivered),
            ("", "hello", Class::Uncategorized),
        ];
        for (status, text, want) in cases {
            assert_eq!(class(status, text), want, "{text}");
        }
    }

    #[test]
    fn operator_rules_come_first_and_bad_ones_name_their_line() {
        let mine = Rules::parse("# mine\ntext quota (?:stuffed)\nstatus 5.9.9 virus\n").unwrap();
        assert_eq!(
            classify_with(Some(&mine), Some("5.1.1"), "mailbox is stuffed"),
            Class::Quota
        );
        assert_eq!(classify_with(Some(&mine), Some("5.9.9"), "?"), Class::Virus);
        let err = Rules::parse("text quota (\n").err().unwrap();
        assert!(err.starts_with("line 1:"), "{err}");
        assert!(Rules::parse("text nonsense x\n").is_err());
        assert!(Rules::parse("status 5.a.1 quota\n").is_err());
    }
}
