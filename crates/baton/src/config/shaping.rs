//! Outbound shaping: `[[shaping]]`, `[[source]]` (with warm-up plans), `[[pool]]` and
//! `[[backoff]]`.
//!
//! Owns turning those tables into baton-shaping's own types (`ShapingRule`, `Source`, `Pool`,
//! `WarmupPlan`, `BackoffRule`); what the rules do at delivery time is baton-shaping's.

use std::time::Duration;

use baton_shaping::{BackoffAction, BackoffRule, Matcher, Pool, Rate, ShapingRule, Source};
use toml::Spanned;

use super::DeliveryConfig;
use super::raw::{RawBackoff, RawPool, RawShaping, RawSource};
use super::validate::Validator;

impl Validator<'_> {
    /// The pools, built from the sources they name.
    pub(super) fn pools(&mut self, sources: Vec<RawSource>, pools: Vec<RawPool>) -> Vec<Pool> {
        let sources = self.each(sources, Self::source);
        self.each(pools, |v, r| v.pool(r, &sources))
    }

    /// `[delivery] pool` names a `[[pool]]`.
    pub(super) fn default_pool_exists(&mut self, delivery: &DeliveryConfig, pools: &[Pool]) {
        if let Some(name) = &delivery.default_pool
            && !pools.iter().any(|p| &p.name == name)
        {
            self.error_at_top(
                format!("[delivery] pool {name:?} is not a [[pool]]"),
                "name a pool defined with [[pool]] name = ...",
            );
        }
    }

    pub(super) fn backoff(&mut self, raw: RawBackoff) -> Option<BackoffRule> {
        let pattern = match &raw.pattern {
            Some(p) => match regex::Regex::new(p.get_ref()) {
                Ok(r) => Some(r),
                Err(e) => {
                    return self.error(
                        p.span(),
                        format!("pattern is not a valid regular expression: {e}"),
                        "regex syntax; (?i) at the start makes it case-insensitive",
                    );
                }
            },
            None => None,
        };
        let action = match raw.action.get_ref().as_str() {
            "suspend" => BackoffAction::Suspend,
            "throttle" => {
                let factor = raw.factor.as_ref().map(|f| *f.get_ref()).unwrap_or(0.5);
                if !(factor > 0.0 && factor < 1.0) {
                    let span = raw
                        .factor
                        .as_ref()
                        .map(|f| f.span())
                        .unwrap_or(raw.action.span());
                    return self.error(
                        span,
                        format!("factor {factor} is not between 0 and 1"),
                        "0.5 halves the message rate",
                    );
                }
                BackoffAction::Throttle { factor }
            }
            other => {
                return self.error(
                    raw.action.span(),
                    format!("unknown backoff action {other:?}"),
                    "action is \"suspend\" or \"throttle\"",
                );
            }
        };
        let class = match &raw.class {
            Some(c) => match c.get_ref().parse::<baton_bounce::Class>() {
                Ok(class) => Some(class),
                Err(why) => {
                    return self.error(
                        c.span(),
                        why,
                        "a class of docs/bounce-classes.json, e.g. \"reputation\" or \"rate_limited\"",
                    );
                }
            },
            None => None,
        };
        if raw.code.is_none() && raw.status.is_none() && pattern.is_none() && class.is_none() {
            return self.error(
                raw.action.span(),
                "this backoff rule matches every reply".into(),
                "give at least one of code, status, pattern or class",
            );
        }
        Some(BackoffRule {
            code: raw.code.map(|c| *c.get_ref() as u16),
            status: raw.status.map(|s| s.into_inner()),
            pattern,
            class,
            action,
            duration: self.duration_or(raw.duration, 600),
        })
    }

    fn source(&mut self, raw: RawSource) -> Option<Source> {
        let address = raw
            .address
            .get_ref()
            .parse::<std::net::IpAddr>()
            .ok()
            .or_else(|| {
                self.error(
                    raw.address.span(),
                    format!(
                        "source address {:?} is not an IP address",
                        raw.address.get_ref()
                    ),
                    "write the local address to send from, e.g. \"192.0.2.10\"",
                )
            })?;
        let warmup = match &raw.warmup {
            None => None,
            Some(w) => Some(self.warmup(w, &raw)?),
        };
        Some(Source {
            name: raw.name.into_inner(),
            address,
            ehlo: raw.ehlo.map(|e| e.into_inner()),
            warmup,
        })
    }

    fn warmup(
        &mut self,
        plan: &Spanned<toml::Value>,
        raw: &RawSource,
    ) -> Option<baton_shaping::WarmupPlan> {
        let caps = match plan.get_ref() {
            toml::Value::String(s) if s == "builtin" => baton_shaping::WarmupPlan::BUILTIN.to_vec(),
            toml::Value::Array(items) => {
                let caps: Option<Vec<u64>> = items
                    .iter()
                    .map(|v| v.as_integer().and_then(|n| u64::try_from(n).ok()))
                    .collect();
                match caps {
                    Some(c) if !c.is_empty() => c,
                    _ => {
                        return self.error(
                            plan.span(),
                            "warmup caps must be non-negative whole numbers".into(),
                            "e.g. warmup = [50, 100, 200]",
                        );
                    }
                }
            }
            _ => {
                return self.error(
                    plan.span(),
                    "warmup is \"builtin\" or a list of caps per period".into(),
                    "e.g. warmup = \"builtin\" or warmup = [50, 100, 200]",
                );
            }
        };
        let Some(start) = &raw.warmup_start else {
            return self.error(
                plan.span(),
                "a warm-up plan needs warmup_start".into(),
                "the day the IP started sending, e.g. warmup_start = \"2026-11-28\" (UTC)",
            );
        };
        let start_ms = start
            .get_ref()
            .parse::<jiff::civil::Date>()
            .ok()
            .and_then(|d| d.to_zoned(jiff::tz::TimeZone::UTC).ok())
            .and_then(|z| u64::try_from(z.timestamp().as_millisecond()).ok());
        let Some(start_ms) = start_ms else {
            return self.error(
                start.span(),
                format!("warmup_start {:?} is not a date", start.get_ref()),
                "write YYYY-MM-DD (a UTC day)",
            );
        };
        let period = match raw.warmup_period.as_ref().map(|p| p.get_ref().as_str()) {
            None | Some("day") => Duration::from_secs(86400),
            Some("hour") => Duration::from_secs(3600),
            Some(other) => {
                let span = raw.warmup_period.as_ref().map(|p| p.span()).unwrap_or(0..0);
                return self.error(
                    span,
                    format!("warmup_period {other:?} is neither day nor hour"),
                    "warmup_period = \"day\" (default) or \"hour\"",
                );
            }
        };
        Some(baton_shaping::WarmupPlan {
            caps,
            start_ms,
            period,
        })
    }

    fn pool(&mut self, raw: RawPool, sources: &[Source]) -> Option<Pool> {
        let weights: Vec<u32> = match &raw.weights {
            Some(w) if w.len() != raw.sources.len() => {
                return self.error(
                    raw.name.span(),
                    "weights must have one entry per source".into(),
                    "e.g. sources = [\"a\", \"b\"] with weights = [3, 1]",
                );
            }
            Some(w) => w
                .iter()
                .map(|x| (*x.get_ref()).clamp(1, 1_000_000) as u32)
                .collect(),
            None => vec![1; raw.sources.len()],
        };
        let mut members = Vec::new();
        for (name, weight) in raw.sources.iter().zip(weights) {
            match sources.iter().find(|s| &s.name == name.get_ref()) {
                Some(s) => members.push((s.clone(), weight)),
                None => {
                    self.error::<()>(
                        name.span(),
                        format!("no [[source]] named {:?}", name.get_ref()),
                        "define it with [[source]] name = ..., address = ...",
                    );
                }
            }
        }
        if members.is_empty() {
            return self.error(
                raw.name.span(),
                "a pool needs at least one source".into(),
                "list source names in sources = [...]",
            );
        }
        Some(Pool {
            name: raw.name.into_inner(),
            sources: members,
            sender_domains: raw
                .sender_domains
                .into_iter()
                .map(|d| d.into_inner().to_ascii_lowercase())
                .collect(),
            tenants: raw
                .tenants
                .into_iter()
                .map(|t| t.into_inner().to_ascii_lowercase())
                .collect(),
        })
    }

    pub(super) fn shaping(&mut self, raw: RawShaping) -> Option<ShapingRule> {
        let matcher = match (&raw.domain, &raw.site) {
            (Some(d), None) => {
                let name = d.get_ref().trim().to_ascii_lowercase();
                if name != "*" && baton_smtp::address::validate_domain(&name).is_err() {
                    return self.error(
                        d.span(),
                        format!("shaping domain {:?} is not a domain or \"*\"", d.get_ref()),
                        "write a recipient domain such as \"gmail.com\", or \"*\" for the defaults",
                    );
                }
                Matcher::Domain(name)
            }
            (None, Some(site)) => {
                let name = site
                    .get_ref()
                    .trim()
                    .trim_start_matches("*.")
                    .to_ascii_lowercase();
                if baton_smtp::address::validate_domain(&name).is_err() {
                    return self.error(
                        site.span(),
                        format!("site {:?} is not a host name suffix", site.get_ref()),
                        "a site names where MX hosts live, e.g. \"google.com\" for aspmx.l.google.com",
                    );
                }
                Matcher::Site(name)
            }
            (Some(d), Some(_)) => {
                return self.error(
                    d.span(),
                    "a shaping rule has either domain or site, not both".into(),
                    "split it into two [[shaping]] tables",
                );
            }
            (None, None) => {
                return self.error(
                    0..0,
                    "a [[shaping]] table without domain or site".into(),
                    "add domain = \"example.com\" (or \"*\") or site = \"google.com\"",
                );
            }
        };
        let mut rate = |r: &Option<Spanned<String>>| -> Option<Rate> {
            let r = r.as_ref()?;
            Rate::parse(r.get_ref()).or_else(|| {
                self.error(
                    r.span(),
                    format!("rate {:?} is not N/unit", r.get_ref()),
                    "write \"10/s\", \"300/m\", \"5000/h\" or \"100000/d\"",
                )
            })
        };
        let max_message_rate = rate(&raw.max_message_rate);
        let max_connection_rate = rate(&raw.max_connection_rate);
        let opt_count =
            |v: &mut Self, n: Option<Spanned<u64>>| n.map(|n| v.count(Some(n), 1) as usize);
        Some(ShapingRule {
            matcher,
            max_connections: opt_count(self, raw.max_connections),
            max_messages_per_connection: opt_count(self, raw.max_messages_per_connection),
            max_recipients: opt_count(self, raw.max_recipients_per_transaction),
            max_message_rate,
            max_connection_rate,
            retry_interval: raw.retry_interval.and_then(|q| self.duration(q)),
        })
    }
}
