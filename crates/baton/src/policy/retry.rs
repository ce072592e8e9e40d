//! The retry schedule's numbers: when a deferred recipient is tried again, and when it
//! expires. Pure functions of the `[delivery]` settings, the reply and the time (ms since the
//! epoch); `policy::decide` applies them.
//!
//! Numbers read from a peer's reply ("try again in N seconds") are parsed with saturating
//! arithmetic and clamped between a floor and `retry_max`: no remote text can put a recipient
//! in a tight retry loop or overflow a timer.

use std::time::Duration;

use crate::config::DeliveryConfig;

/// Greylisted attempts (in a row or not) that get the short greylisting wait; after them a
/// recipient that is still refused is on the ordinary exponential schedule.
pub const GREYLIST_TRIES: usize = 3;

/// When a message that arrived at `arrived_ms` expires.
pub fn expiry_ms(d: &DeliveryConfig, arrived_ms: u64) -> u64 {
    arrived_ms.saturating_add(millis(d.max_age))
}

/// Exponential backoff from `retry_min` (or a shaping rule's `retry_interval`, `base`),
/// doubling, capped at `retry_max`, never past expiry (so the last try happens when the
/// message expires). `attempts` counts the attempt just made.
pub fn backoff(
    d: &DeliveryConfig,
    base: Option<Duration>,
    arrived_ms: u64,
    attempts: usize,
    now: u64,
) -> u64 {
    let factor = 1u32
        .checked_shl(attempts.saturating_sub(1).min(30) as u32)
        .unwrap_or(u32::MAX);
    let base = base.unwrap_or(d.retry_min);
    let delay = base.saturating_mul(factor).min(d.retry_max.max(base));
    not_past_expiry(d, arrived_ms, now.saturating_add(millis(delay)), now)
}

/// The next attempt after a greylisting reply: the wait the reply names (or
/// `greylist_retry`), for the first [`GREYLIST_TRIES`] attempts; after those, the ordinary
/// schedule. A named wait is clamped between [`greylist_floor`] and `retry_max`.
pub fn after_greylisting(
    d: &DeliveryConfig,
    base: Option<Duration>,
    arrived_ms: u64,
    attempts: usize,
    now: u64,
    text: &str,
) -> u64 {
    if attempts > GREYLIST_TRIES {
        return backoff(d, base, arrived_ms, attempts, now);
    }
    let floor = greylist_floor(d);
    let wait = greylist_hint(text)
        .unwrap_or(d.greylist_retry)
        .clamp(floor, d.retry_max.max(floor));
    not_past_expiry(d, arrived_ms, now.saturating_add(millis(wait)), now)
}

/// The shortest wait a greylisting reply can ask for: `greylist_retry` or `retry_min`, whichever
/// is shorter (never sooner than Baton would retry anything on its own; 60 s by default).
pub fn greylist_floor(d: &DeliveryConfig) -> Duration {
    d.greylist_retry.min(d.retry_min)
}

/// `at`, but no later than the message's expiry (and never before `now + 1`).
fn not_past_expiry(d: &DeliveryConfig, arrived_ms: u64, at: u64, now: u64) -> u64 {
    at.min(expiry_ms(d, arrived_ms).max(now.saturating_add(1)))
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A temporary refusal that says it is greylisting (Postgrey, rspamd, Exchange and others word
/// it so; some use 4.7.1 with "greylist", some 4.2.0 "Greylisted").
pub fn is_greylisting(code: u16, text: &str) -> bool {
    if !(400..500).contains(&code) {
        return false;
    }
    let text = text.to_ascii_lowercase();
    [
        "greylist",
        "graylist",
        "grey-list",
        "gray-list",
        "grey list",
        "gray list",
    ]
    .iter()
    .any(|w| text.contains(w))
}

/// The wait a greylisting reply asks for ("try again in 5 minutes", "retry in 60 seconds"),
/// plus a second. Saturates: any number of any length is read without overflow.
pub fn greylist_hint(text: &str) -> Option<Duration> {
    let text = text.to_ascii_lowercase();
    let words: Vec<&str> = text
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect();
    words.windows(2).find_map(|w| {
        let unit: u64 = match w[1] {
            "s" | "sec" | "secs" | "second" | "seconds" => 1,
            "m" | "min" | "mins" | "minute" | "minutes" => 60,
            "h" | "hour" | "hours" => 3600,
            _ => return None,
        };
        if !w[0].bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        // Past u64 the number is simply "very long": saturate instead of failing.
        let n: u64 = w[0].parse().unwrap_or(u64::MAX);
        Some(Duration::from_secs(
            n.saturating_mul(unit).saturating_add(1),
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    const S: u64 = 1000;

    fn delivery(min: u64, max: u64, grey: u64) -> DeliveryConfig {
        let mut d = Config::defaults().delivery;
        d.retry_min = Duration::from_secs(min);
        d.retry_max = Duration::from_secs(max);
        d.greylist_retry = Duration::from_secs(grey);
        d.max_age = Duration::from_secs(5 * 86400);
        d
    }

    #[test]
    fn the_schedule_doubles_from_retry_min_to_retry_max() {
        let d = delivery(300, 4000, 60);
        let now = 1_000_000 * S;
        let waits: Vec<u64> = (1..=6)
            .map(|n| (backoff(&d, None, now, n, now) - now) / S)
            .collect();
        assert_eq!(waits, [300, 600, 1200, 2400, 4000, 4000]);
        // A shaping rule's retry_interval replaces retry_min as the base.
        let wait = backoff(&d, Some(Duration::from_secs(30)), now, 2, now) - now;
        assert_eq!(wait, 60 * S);
        // Thousands of attempts do not overflow.
        assert_eq!(backoff(&d, None, now, usize::MAX, now) - now, 4000 * S);
    }

    #[test]
    fn no_attempt_is_scheduled_past_expiry() {
        let d = delivery(300, 4000, 60);
        let arrived = 1_000_000 * S;
        let expiry = arrived + 5 * 86400 * S;
        assert_eq!(backoff(&d, None, arrived, 5, expiry - 10 * S), expiry);
        // Already past expiry: the next try is now (where it expires).
        let late = expiry + 50 * S;
        assert_eq!(backoff(&d, None, arrived, 5, late), late + 1);
        assert_eq!(expiry_ms(&d, u64::MAX - 5), u64::MAX);
    }

    #[test]
    fn greylisting_hints_are_read_and_bounded() {
        let text = |t: &str| greylist_hint(t).map(|d| d.as_secs());
        assert_eq!(text("Greylisted, please try again in 5 minutes"), Some(301));
        assert_eq!(text("retry in 60 seconds"), Some(61));
        assert_eq!(text("greylisting in action"), None);
        assert_eq!(
            text("try again in 18446744073709551615 seconds"),
            Some(u64::MAX)
        );
        assert_eq!(
            text("try again in 99999999999999999999999999 minutes"),
            Some(u64::MAX)
        );

        let d = delivery(300, 4000, 60);
        let now = 1_000_000 * S;
        let next =
            |t: &str, attempts| (after_greylisting(&d, None, now, attempts, now, t) - now) / S;
        assert_eq!(next("Greylisted, try again in 5 minutes", 1), 301);
        // Too soon: the floor is greylist_retry (or retry_min if shorter); too late: retry_max.
        assert_eq!(next("Greylisted, try again in 0 seconds", 1), 60);
        let quick = delivery(10, 4000, 60);
        let wait = after_greylisting(&quick, None, now, 1, now, "greylisted, retry in 0 s") - now;
        assert_eq!(wait / S, 10);
        assert_eq!(
            next("Greylisted, try again in 18446744073709551615 seconds", 1),
            4000
        );
        assert_eq!(next("greylisted, come back later", 2), 60);
        // Greylisted past GREYLIST_TRIES attempts: the ordinary schedule.
        assert_eq!(
            next("Greylisted, try again in 0 seconds", GREYLIST_TRIES + 1),
            2400
        );
    }

    #[test]
    fn greylisting_is_recognised() {
        assert!(is_greylisting(450, "4.2.0 Greylisted, please try again"));
        assert!(is_greylisting(
            451,
            "Please try later: greylisting in action"
        ));
        assert!(!is_greylisting(450, "4.2.1 mailbox busy"));
        assert!(!is_greylisting(550, "5.7.1 greylisted forever"));
    }
}
