//! Traffic shaping: per-destination limits from `[[shaping]]` rules, matched by domain or by MX
//! site (domains whose MX hosts share a name suffix, e.g. every Google-hosted domain, rolled up
//! as PowerMTA's mx-rollup does), with a `*` default.
//!
//! A rule's state is shared by everything it matches: a connection cap (a semaphore whose
//! permit a connection holds for its life), a connection rate and a message rate (token
//! buckets). Delivery workers ask here before connecting and before each transaction; they
//! wait, never fail, when a limit is reached.
//!
//! Adaptive sending flows: `[[backoff]]` rules match a destination's replies (code, enhanced
//! status, regex on the text) and suspend it for a while or cut its message rate by a factor;
//! the rate then recovers step by step with each run of successes (PowerMTA's backoff mode,
//! KumoMTA's shaping automation). Owns no connections and no recipient state.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

pub mod fleet;
mod limits;
mod operator;
pub mod ratelimit;
mod rules;
pub mod warmup;

pub use limits::{ConnectionSlot, Limits};
pub use operator::Suspendable;
pub use rules::{BackoffAction, BackoffRule, Matcher, Rate, ShapingRule};
pub use warmup::{Warmup, WarmupPlan};

/// A local address outbound connections bind to, with the name it says EHLO with.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Source {
    pub name: String,
    pub address: std::net::IpAddr,
    pub ehlo: Option<String>,
    pub warmup: Option<WarmupPlan>,
}

/// A weighted set of sources, and the mail it carries.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Pool {
    pub name: String,
    /// Sources and their weights.
    pub sources: Vec<(Source, u32)>,
    /// Sender domains whose mail goes out through this pool.
    pub sender_domains: Vec<String>,
    /// Tenants (X-Baton-Tenant) whose mail goes out through this pool.
    pub tenants: Vec<String>,
}

/// (egress source, rule): each source has its own state under each rule.
type StateKey = (Option<String>, Matcher);

/// All rules and their live states.
pub struct Shaper {
    rules: Vec<ShapingRule>,
    /// `[delivery] max_connections_per_destination`: what a throttle cuts when no rule caps.
    nominal_connections: usize,
    backoff: Vec<BackoffRule>,
    /// Operator suspensions: of a domain, a pool or a tenant, until when.
    operator: operator::Suspensions,
    /// Which live states each domain has used (for `explain`).
    by_domain: Mutex<HashMap<String, Vec<Arc<Limits>>>>,
    default: ShapingRule,
    states: Mutex<HashMap<StateKey, Arc<Limits>>>,
    /// Where warm-up counts outlive a restart (none: in memory only).
    ledger: Option<Arc<crate::warmup::Ledger>>,
    /// Connection caps and rates shared with other nodes (`[cluster]`); none: this node's alone.
    fleet: Option<Arc<dyn fleet::FleetLimits>>,
}

impl Shaper {
    pub fn new(
        rules: Vec<ShapingRule>,
        backoff: Vec<BackoffRule>,
        nominal_connections: usize,
    ) -> Shaper {
        let star = Matcher::Domain("*".into());
        let default = rules
            .iter()
            .find(|r| r.matcher == star)
            .cloned()
            .unwrap_or(ShapingRule {
                matcher: star,
                max_connections: None,
                max_messages_per_connection: None,
                max_recipients: None,
                max_message_rate: None,
                max_connection_rate: None,
                retry_interval: None,
            });
        Shaper {
            rules,
            nominal_connections,
            backoff,
            operator: Default::default(),
            by_domain: Mutex::default(),
            default,
            states: Mutex::default(),
            ledger: None,
            fleet: None,
        }
    }

    /// Holds every connection cap and message rate across the fleet through `fleet`.
    pub fn with_fleet(mut self, fleet: Arc<dyn fleet::FleetLimits>) -> Shaper {
        self.fleet = Some(fleet);
        self.share_ledger();
        self
    }

    /// Keeps warm-up counts in `ledger`, so that a restart does not reset them.
    pub fn with_ledger(mut self, ledger: Arc<crate::warmup::Ledger>) -> Shaper {
        self.ledger = Some(ledger);
        self.share_ledger();
        self
    }

    /// Lets the fleet's store read the ledger, once both are set.
    fn share_ledger(&self) {
        if let (Some(fleet), Some(ledger)) = (&self.fleet, &self.ledger) {
            let ledger = ledger.clone();
            fleet.keep_warmup_counts(Arc::new(move || ledger.counts()));
        }
    }

    /// Suspends a domain, pool or tenant by the operator's word.
    pub fn operator_suspend(&self, what: &Suspendable, for_: Duration) {
        self.operator.suspend(what.key(), later(for_));
    }

    /// The operator's suspensions as (key, until in ms since the epoch), for saving.
    pub fn operator_snapshot(&self) -> Vec<(String, u64)> {
        self.operator.snapshot()
    }

    /// Restores suspensions saved by [`Shaper::operator_snapshot`].
    pub fn operator_restore(&self, saved: Vec<(String, u64)>) {
        self.operator.restore(saved);
    }

    pub fn operator_resume(&self, what: &Suspendable) {
        self.operator.resume(&what.key());
    }

    /// Until when the operator suspended `what`, if they did.
    pub fn operator_suspension(&self, what: &Suspendable) -> Option<Instant> {
        self.operator.until(&what.key())
    }

    /// Until when the operator suspended `domain` or `pool`, if they did.
    pub fn operator_suspended(&self, domain: &str, pool: Option<&str>) -> Option<Instant> {
        let by_domain = self.operator_suspension(&Suspendable::Domain(domain.into()));
        let by_pool = pool.and_then(|p| self.operator_suspension(&Suspendable::Pool(p.into())));
        by_domain.into_iter().chain(by_pool).max()
    }

    /// What shaping currently does to `domain`, for `baton queue explain`.
    pub fn describe(&self, domain: &str) -> serde_json::Value {
        use serde_json::json;
        let domain = domain.to_ascii_lowercase();
        let now = Instant::now();
        let rule = self.domain_rule(&domain);
        let states: Vec<_> = self
            .by_domain
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&domain)
            .map(|v| {
                v.iter()
                    .map(|l| {
                        let a = l.adaptive();
                        let open = match (&l.connections, l.rule.max_connections) {
                            (Some(s), Some(cap)) => Some(cap - s.available_permits()),
                            _ => None,
                        };
                        json!({
                            "rule": l.rule.matcher.to_string(),
                            "max_connections": l.rule.max_connections,
                            "open_connections": open,
                            "max_message_rate": l.rule.max_message_rate.map(|r| format!("{}/{}s", r.count, r.per.as_secs())),
                            "suspended_for_s": a.suspended_until.filter(|&t| t > now).map(|t| (t - now).as_secs()),
                            "throttle_factor": a.factor,
                            "warmup": l.warmup.as_ref().map(|w| {
                                let c = w.count.lock().unwrap_or_else(|e| e.into_inner());
                                let (_, cap, _) = w.plan.period(baton_spool::now_ms());
                                json!({"cap": cap, "sent_this_period": c.sent})
                            }),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        let operator = self
            .operator_suspended(&domain, None)
            .map(|t| (t - now).as_secs());
        json!({
            "domain_rule": rule.matcher.to_string(),
            "operator_suspended_for_s": operator,
            "states": states,
        })
    }

    /// A destination's shaping state in a few words, for tables: "suspended 120 s",
    /// "throttled ×0.25", "operator hold 3600 s", or "normal".
    pub fn state_word(&self, domain: &str) -> String {
        let d = self.describe(domain);
        if let Some(s) = d["operator_suspended_for_s"].as_u64() {
            return format!("operator hold {s} s");
        }
        let states = d["states"].as_array().cloned().unwrap_or_default();
        if let Some(s) = states
            .iter()
            .filter_map(|s| s["suspended_for_s"].as_u64())
            .max()
        {
            return format!("suspended {s} s");
        }
        if let Some(f) = states
            .iter()
            .filter_map(|s| s["throttle_factor"].as_f64())
            .filter(|&f| f < 1.0)
            .reduce(f64::min)
        {
            return format!("throttled ×{f}");
        }
        "normal".into()
    }

    /// The first backoff rule a reply matches.
    pub fn backoff_for(&self, code: u16, status: &str, text: &str) -> Option<&BackoffRule> {
        let class = std::cell::OnceCell::new();
        let class = || *class.get_or_init(|| rules::reply_class(status, text));
        self.backoff
            .iter()
            .find(|r| r.matches_classed(code, status, text, &class))
    }

    /// The rule for a domain known by name alone (before its MX hosts are known).
    pub fn domain_rule(&self, domain: &str) -> ShapingRule {
        let domain = domain.to_ascii_lowercase();
        self.rules
            .iter()
            .find(|r| r.matcher == Matcher::Domain(domain.clone()))
            .map(|r| r.or(&self.default))
            .unwrap_or_else(|| self.default.clone())
    }

    /// The live limits for `domain` delivered through `mx_hosts` from egress `source`: an exact
    /// domain rule, else the first site rule that one of the MX hosts falls under, else the
    /// default (per domain). Each source has its own state under each rule.
    pub fn limits_for(
        &self,
        source: Option<&Source>,
        domain: &str,
        mx_hosts: &[String],
    ) -> Arc<Limits> {
        let domain = domain.to_ascii_lowercase();
        let exact = Matcher::Domain(domain.clone());
        let rule = self.rules.iter().find(|r| r.matcher == exact).or_else(|| {
            self.rules.iter().find(|r| match &r.matcher {
                Matcher::Site(site) => mx_hosts.iter().any(|h| under(h, site)),
                Matcher::Domain(_) => false,
            })
        });
        // The default rule's limits apply to each domain on its own.
        let (key, rule) = match rule {
            Some(r) => (r.matcher.clone(), r.or(&self.default)),
            None => (
                exact,
                ShapingRule {
                    matcher: Matcher::Domain(domain.clone()),
                    ..self.default.clone()
                },
            ),
        };
        let limits = self
            .states
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((source.map(|s| s.name.clone()), key))
            .or_insert_with(|| {
                let warmup = source.and_then(|s| {
                    let key = format!("{} {}", s.name, rule.matcher);
                    Some(Warmup::new(s.warmup.clone()?, key, self.ledger.clone()))
                });
                let shared = self.fleet.clone().map(|l| {
                    let key = format!(
                        "{} {}",
                        source.map_or("", |s| s.name.as_str()),
                        rule.matcher
                    );
                    (l, key)
                });
                Arc::new(Limits::new(rule, warmup, self.nominal_connections).sharing(shared))
            })
            .clone();
        let mut by_domain = self.by_domain.lock().unwrap_or_else(|e| e.into_inner());
        let known = by_domain.entry(domain).or_default();
        if !known.iter().any(|l| Arc::ptr_eq(l, &limits)) {
            known.push(limits.clone());
        }
        limits
    }
}

/// `for_` from now; a span past what the clock can hold is a century (never a panic).
pub(crate) fn later(for_: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(for_)
        .or_else(|| now.checked_add(Duration::from_secs(100 * 365 * 86400)))
        .unwrap_or(now)
}

/// True if `host` is `site` or a name under it.
fn under(host: &str, site: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let site = site
        .trim_start_matches("*.")
        .trim_end_matches('.')
        .to_ascii_lowercase();
    host == site || host.ends_with(&format!(".{site}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::{Pacer, RECOVERY_RUN, local_share};
    use regex::Regex;

    #[test]
    fn a_node_cut_off_from_the_fleet_keeps_to_its_share_of_a_cap() {
        assert_eq!(local_share(12, 3), 4);
        assert_eq!(local_share(12, 0), 12, "no node seen: the whole cap");
        assert_eq!(local_share(10, 3), 3, "rounded down: never over the cap");
        assert_eq!(local_share(2, 5), 1, "never below one");
    }

    fn rule(matcher: Matcher) -> ShapingRule {
        ShapingRule {
            matcher,
            max_connections: None,
            max_messages_per_connection: None,
            max_recipients: None,
            max_message_rate: None,
            max_connection_rate: None,
            retry_interval: None,
        }
    }

    #[test]
    fn rates() {
        assert_eq!(
            Rate::parse("10/s"),
            Some(Rate {
                count: 10,
                per: Duration::from_secs(1)
            })
        );
        assert_eq!(
            Rate::parse("500/h").map(|r| r.interval()),
            Some(Duration::from_millis(7200))
        );
        assert!(Rate::parse("0/s").is_none());
        assert!(Rate::parse("10 per second").is_none());
    }

    #[test]
    fn pacer_spaces_events() {
        let mut p = Pacer {
            interval: Duration::from_millis(100),
            next: None,
        };
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        assert_eq!(p.try_take(t0, 1.0), Ok(()));
        // The next slot is 100 ms on; it may be taken up to SLACK (10 ms) early.
        assert_eq!(p.try_take(t0, 1.0), Err(t0 + ms(90)));
        assert_eq!(p.try_take(t0 + ms(90), 1.0), Ok(()));
        // Taken early, the slot after is still 100 ms after the slot, not after now.
        assert_eq!(p.try_take(t0 + ms(91), 1.0), Err(t0 + ms(190)));
        // Taken late, the next is counted from now: a late waiter does not bank time.
        assert_eq!(p.try_take(t0 + ms(250), 1.0), Ok(()));
        assert_eq!(p.try_take(t0 + ms(250), 1.0), Err(t0 + ms(340)));
        // After a pause the next event may go at once, but no burst builds up.
        let later = t0 + Duration::from_secs(5);
        assert_eq!(p.try_take(later, 0.5), Ok(()));
        assert_eq!(
            p.try_take(later + ms(100), 0.5),
            Err(later + ms(190)),
            "halved rate"
        );
    }

    #[test]
    fn a_fast_rate_is_met_by_a_waiter_woken_late() {
        // 2,000/s, one waiter that the timer wakes 1 ms after each slot it asked for.
        let mut p = Pacer {
            interval: Duration::from_micros(500),
            next: None,
        };
        let t0 = Instant::now();
        let (mut now, mut sent) = (t0, 0);
        while now < t0 + Duration::from_secs(1) {
            match p.try_take(now, 1.0) {
                Ok(()) => sent += 1,
                Err(at) => now = at.max(now) + Duration::from_millis(1),
            }
        }
        // Each wake-up takes every slot due within SLACK: about the rate, and never more
        // than the rate plus SLACK's worth.
        assert!((1_950..=2_021).contains(&sent), "{sent} in a second");
    }

    #[test]
    fn throttle_recovers_step_by_step() {
        let limits = Limits::new(rule(Matcher::Domain("x.test".into())), None, 20);
        let throttle = BackoffRule {
            code: Some(421),
            status: None,
            pattern: Regex::new("(?i)rate limit").ok(),
            class: None,
            action: BackoffAction::Throttle { factor: 0.25 },
            duration: Duration::from_secs(3600),
        };
        assert!(throttle.matches(421, "4.7.0", "421 4.7.0 Rate limited, slow down"));
        assert!(!throttle.matches(450, "4.7.0", "rate limited"));
        assert!(!throttle.matches(421, "4.7.0", "service shutting down"));
        limits.pushback(&throttle);
        let mut changes = Vec::new();
        for _ in 0..RECOVERY_RUN * 2 {
            changes.extend(limits.success());
        }
        assert_eq!(
            changes,
            vec![
                "recovering: message rate and connections at 50%",
                "recovered: normal rate"
            ]
        );
        assert!(limits.success().is_none());
        let suspend = BackoffRule {
            action: BackoffAction::Suspend,
            duration: Duration::from_secs(60),
            ..throttle
        };
        limits.pushback(&suspend);
        assert!(limits.suspended_until().is_some());
    }

    #[test]
    fn a_backoff_rule_can_match_a_failure_class() {
        let blocked = BackoffRule {
            code: None,
            status: None,
            pattern: None,
            class: Some(baton_bounce::Class::Reputation),
            action: BackoffAction::Suspend,
            duration: Duration::from_secs(3600),
        };
        let spamhaus =
            "554 5.7.1 Service unavailable; Client host [192.0.2.1] blocked using zen.spamhaus.org";
        assert!(blocked.matches(554, "5.7.1", spamhaus));
        assert!(!blocked.matches(550, "5.1.1", "550 5.1.1 user unknown"));
        assert!(!blocked.matches(452, "4.2.2", "452 4.2.2 mailbox full"));
    }

    #[tokio::test]
    async fn a_throttle_cuts_connections_too() {
        let limits = Arc::new(Limits::new(rule(Matcher::Domain("x.test".into())), None, 4));
        limits.pushback(&BackoffRule {
            code: None,
            status: None,
            pattern: None,
            class: None,
            action: BackoffAction::Throttle { factor: 0.25 },
            duration: Duration::from_secs(60),
        });
        let first = limits.connection().await;
        let second = tokio::time::timeout(Duration::from_millis(200), limits.connection()).await;
        assert!(second.is_err(), "4 × 25% = 1 connection while throttled");
        drop(first);
        let second = tokio::time::timeout(Duration::from_millis(500), limits.connection()).await;
        assert!(
            second.is_ok(),
            "a slot comes back when the connection closes"
        );
    }

    #[test]
    fn warmup_caps_each_period() {
        let day = 86_400_000;
        let plan = WarmupPlan {
            caps: vec![2, 3],
            start_ms: 10 * day,
            period: Duration::from_millis(day),
        };
        let warmup = Warmup::new(plan, "ip x.test".into(), None);
        let limits = Limits::new(rule(Matcher::Domain("x.test".into())), Some(warmup), 20);
        let t = 10 * day + 5;
        assert!(limits.warmup_take(t, 1).is_ok());
        assert!(limits.warmup_take(t, 1).is_ok());
        assert_eq!(limits.warmup_take(t, 1), Err((11 * day, 2)));
        let t = 11 * day + 5;
        assert!((0..3).all(|_| limits.warmup_take(t, 1).is_ok()));
        assert!(limits.warmup_take(t, 1).is_err());
        // Recipients count: one transaction of 5 uses a day's cap of 3 (and goes whole).
        let t = 12 * day - 5;
        let fresh = Limits::new(
            rule(Matcher::Domain("y.test".into())),
            Some(Warmup::new(
                WarmupPlan {
                    caps: vec![2, 3],
                    start_ms: 10 * day,
                    period: Duration::from_millis(day),
                },
                "ip y.test".into(),
                None,
            )),
            20,
        );
        assert!(fresh.warmup_take(t, 5).is_ok());
        assert!(fresh.warmup_take(t, 1).is_err());
        // Past the table: no cap.
        assert!((0..100).all(|_| limits.warmup_take(12 * day, 1).is_ok()));
    }

    #[test]
    fn domain_then_site_then_default() {
        let mut google = rule(Matcher::Site("google.com".into()));
        google.max_connections = Some(3);
        let mut example = rule(Matcher::Domain("example.com".into()));
        example.max_message_rate = Rate::parse("1/s");
        let mut star = rule(Matcher::Domain("*".into()));
        star.max_connections = Some(10);
        let shaper = Shaper::new(vec![google, example, star], vec![], 20);

        let g1 = shaper.limits_for(None, "gmail.com", &["gmail-smtp-in.l.google.com".into()]);
        let g2 = shaper.limits_for(None, "corp.example", &["aspmx.l.google.com".into()]);
        let ip2 = Source {
            name: "ip2".into(),
            address: "192.0.2.2".parse().unwrap(),
            ehlo: None,
            warmup: None,
        };
        let g3 = shaper.limits_for(Some(&ip2), "gmail.com", &["aspmx.l.google.com".into()]);
        assert!(!Arc::ptr_eq(&g1, &g3), "each source has its own state");
        assert!(Arc::ptr_eq(&g1, &g2), "one site, one state");
        assert_eq!(g1.rule.max_connections, Some(3));

        let e = shaper.limits_for(None, "example.com", &["aspmx.l.google.com".into()]);
        assert_eq!(e.rule.matcher, Matcher::Domain("example.com".into()));
        assert_eq!(e.rule.max_connections, Some(10), "unset limits come from *");

        let a = shaper.limits_for(None, "a.test", &["mx.a.test".into()]);
        let b = shaper.limits_for(None, "b.test", &["mx.b.test".into()]);
        assert!(!Arc::ptr_eq(&a, &b), "the default applies per domain");
        assert!(!under("notgoogle.com", "google.com"));
    }
}
