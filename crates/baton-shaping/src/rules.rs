//! The rules as configured: `[[shaping]]` limits matched by domain, site or default, and
//! `[[backoff]]` rules matched against a destination's replies. Plain data and matching; the
//! state they govern is in `limits`.

use std::time::Duration;

use regex::Regex;

/// What a backoff rule does to a destination that pushes back.
#[derive(Debug, Clone, PartialEq)]
pub enum BackoffAction {
    /// No delivery attempts for the duration.
    Suspend,
    /// Message rate multiplied by `factor` (0 < factor < 1) for the duration, recovering
    /// stepwise after successes.
    Throttle { factor: f64 },
}

/// One `[[backoff]]` rule.
#[derive(Debug, Clone)]
pub struct BackoffRule {
    pub code: Option<u16>,
    /// Enhanced status code prefix, e.g. "4.7".
    pub status: Option<String>,
    pub pattern: Option<Regex>,
    /// The reply's failure class (baton-bounce's built-in rules), e.g. `reputation`.
    pub class: Option<baton_bounce::Class>,
    pub action: BackoffAction,
    pub duration: Duration,
}

impl BackoffRule {
    pub fn matches(&self, code: u16, status: &str, text: &str) -> bool {
        self.matches_classed(code, status, text, &|| reply_class(status, text))
    }

    /// [`BackoffRule::matches`], with the reply's class given (worked out once for all the
    /// rules, and only if one of them asks).
    pub fn matches_classed(
        &self,
        code: u16,
        status: &str,
        text: &str,
        class: &dyn Fn() -> baton_bounce::Class,
    ) -> bool {
        self.code.is_none_or(|c| c == code)
            && self.status.as_deref().is_none_or(|s| status.starts_with(s))
            && self.pattern.as_ref().is_none_or(|p| p.is_match(text))
            && self.class.is_none_or(|c| class() == c)
    }
}

/// A reply's class by Baton's built-in rules.
pub fn reply_class(status: &str, text: &str) -> baton_bounce::Class {
    let status = (!status.is_empty()).then_some(status);
    baton_bounce::classify_with(None, status, text)
}

/// "10/s", "500/h": `count` events per `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u32,
    pub per: Duration,
}

impl Rate {
    pub fn parse(text: &str) -> Option<Rate> {
        let (count, unit) = text.trim().split_once('/')?;
        let count: u32 = count.trim().parse().ok().filter(|&c| c > 0)?;
        let per = match unit.trim() {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            "d" | "day" => Duration::from_secs(86400),
            _ => return None,
        };
        Some(Rate { count, per })
    }

    /// Time between two events at this rate.
    pub(crate) fn interval(self) -> Duration {
        self.per / self.count
    }
}

/// What a rule matches.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Matcher {
    /// A recipient domain, lower case; "*" is the default rule.
    Domain(String),
    /// An MX site: a host name suffix such as "google.com" (matches "aspmx.l.google.com").
    Site(String),
}

impl std::fmt::Display for Matcher {
    /// The operator's words: "domain example.com", "site google.com", "default (*)".
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Matcher::Domain(d) if d == "*" => f.write_str("default (*)"),
            Matcher::Domain(d) => write!(f, "domain {d}"),
            Matcher::Site(s) => write!(f, "site {s}"),
        }
    }
}

/// One `[[shaping]]` table. Unset limits fall back to the `*` rule, then to `[delivery]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapingRule {
    pub matcher: Matcher,
    pub max_connections: Option<usize>,
    pub max_messages_per_connection: Option<usize>,
    pub max_recipients: Option<usize>,
    pub max_message_rate: Option<Rate>,
    pub max_connection_rate: Option<Rate>,
    pub retry_interval: Option<Duration>,
}

impl ShapingRule {
    /// `self` with every unset limit taken from `fallback`.
    pub(crate) fn or(&self, fallback: &ShapingRule) -> ShapingRule {
        ShapingRule {
            matcher: self.matcher.clone(),
            max_connections: self.max_connections.or(fallback.max_connections),
            max_messages_per_connection: self
                .max_messages_per_connection
                .or(fallback.max_messages_per_connection),
            max_recipients: self.max_recipients.or(fallback.max_recipients),
            max_message_rate: self.max_message_rate.or(fallback.max_message_rate),
            max_connection_rate: self.max_connection_rate.or(fallback.max_connection_rate),
            retry_interval: self.retry_interval.or(fallback.retry_interval),
        }
    }
}
