//! The queue's outcome and retry policy: given a recipient, what just happened to it and the
//! time, what becomes of it. [`decide`] returns a [`Decision`] (new state, next attempt, the
//! notice for the sender, the event, suppression, the greylisting source); the queue manager
//! performs it.
//!
//! Pure: `now` is passed in, and nothing here reads a clock, touches a file, the spool, the
//! event log, metrics, the suppression list or the shaper. Every next-attempt time and every
//! expiry is computed here: the backoff schedule and greylisting (in [`retry`]), suspension and
//! shaping holds, max_age, delivery windows, send-at and operator releases. NOTIFY is read only
//! through the `wants_*` helpers.

pub mod retry;
#[cfg(test)]
mod tests;

use std::time::Duration;

use baton_spool::{Attempt, Notify, RcptState, Recipient};

use crate::bounce::{Action, ReportedRecipient};
use crate::config::DeliveryConfig;
use crate::delivery::Outcome;
use crate::schedule::Window;
use baton_bounce::Class;
use baton_events::EventKind;

pub use retry::{GREYLIST_TRIES, expiry_ms};

/// How long a recipient held by shaping waits when the hold names no time.
pub const HOLD_RECHECK_MS: u64 = 1000;

/// A recipient as the queue manager holds it.
pub struct Rcpt<'a> {
    pub recipient: &'a Recipient,
    /// Attempts made before this outcome.
    pub attempts: u16,
    /// When its message arrived (ms since the epoch).
    pub arrived_ms: u64,
    /// Its message's size, for the event.
    pub size: u64,
}

/// The settings an outcome is judged by.
pub struct Rules<'a> {
    pub delivery: &'a DeliveryConfig,
    /// The recipient domain's shaping rule's `retry_interval` (the backoff's base instead of
    /// `retry_min`).
    pub retry_interval: Option<Duration>,
    /// `[bounces] rules`: tried before the built-in classification rules.
    pub bounce_rules: Option<&'a baton_bounce::Rules>,
}

/// Which DSN a notice goes in: one per kind per job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoticeKind {
    Failure,
    Delay,
    Success,
}

#[derive(Debug, Clone)]
pub struct Notice {
    pub kind: NoticeKind,
    pub recipient: ReportedRecipient,
}

/// The egress source a recipient's next attempt must leave from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sticky {
    /// Unchanged (nothing was attempted).
    Keep,
    /// Greylisted: retry from this source (greylisting keys on the IP).
    Pin(String),
    Clear,
}

/// The event to emit, less what the event log fills in (id, time, message, recipient, sender).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventFields {
    pub kind: EventKind,
    pub code: Option<u16>,
    pub status: Option<String>,
    pub response: Option<String>,
    pub remote_mta: Option<String>,
    pub attempt: Option<usize>,
    pub size: Option<u64>,
    pub tls: Option<String>,
    pub source: Option<String>,
    pub latency_ms: Option<u64>,
    /// Written as an RFC 3339 time.
    pub next_attempt_ms: Option<u64>,
    /// On failures: the failure's class and whether the address itself is bad.
    pub class: Option<Class>,
    pub hard: Option<bool>,
}

impl EventFields {
    fn new(kind: EventKind) -> EventFields {
        EventFields {
            kind,
            code: None,
            status: None,
            response: None,
            remote_mta: None,
            attempt: None,
            size: None,
            tls: None,
            source: None,
            latency_ms: None,
            next_attempt_ms: None,
            class: None,
            hard: None,
        }
    }
}

/// The `baton_outcomes` metric's labels that the policy knows.
#[derive(Debug, Clone, PartialEq)]
pub struct Metric {
    pub kind: EventKind,
    pub status: String,
    pub latency_s: Option<f64>,
    /// The failure's class; none for a delivery.
    pub class: Option<Class>,
}

/// What becomes of a recipient after an outcome.
#[derive(Debug, Clone)]
pub struct Decision {
    pub state: RcptState,
    /// 0 once final.
    pub next_attempt_ms: u64,
    /// None when nothing was attempted (a shaping hold).
    pub attempt: Option<Attempt>,
    /// A delay notice goes with this decision (it is sent once).
    pub delay_notified: bool,
    pub notice: Option<Notice>,
    pub event: EventFields,
    /// None when nothing was attempted.
    pub metric: Option<Metric>,
    /// Add the address to the suppression list: a hard bounce.
    pub suppress: Option<Suppress>,
    /// A soft bounce of the recipient's own mailbox (full, disabled): counted towards
    /// `[bounces] soft_bounce_limit`.
    pub soft_bounce: bool,
    pub sticky: Sticky,
}

/// Why an address is to be suppressed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Suppress {
    /// The hard class (`invalid_recipient`, `bad_domain`).
    pub class: Class,
    /// The reply.
    pub detail: String,
}

/// The class of a failed outcome and whether the address itself is bad: the reply's, except
/// that a recipient given up on has expired, and only the recipient's own refusal by a
/// remote server condemns the address (a refused sender or a refused DATA is no verdict on
/// it, nor is Baton's own local error).
pub fn classify(
    outcome: &Outcome,
    state: RcptState,
    rules: Option<&baton_bounce::Rules>,
) -> (Class, bool) {
    let reply = &outcome.reply;
    let status = (!reply.status.is_empty()).then_some(reply.status.as_str());
    let status = status
        .map(str::to_string)
        .or_else(|| baton_bounce::reply_status(&reply.text));
    let class = match state {
        RcptState::Expired => Class::Expired,
        _ => baton_bounce::classify_with(rules, status.as_deref(), &reply.line()),
    };
    let hard = state == RcptState::Bounced
        && outcome.remote.is_some()
        && reply.to_rcpt
        && class.hard(true);
    (class, hard)
}

/// Soft bounces that say something about the mailbox itself, not the sender or the path.
pub fn is_mailbox_soft_bounce(class: Class) -> bool {
    matches!(class, Class::Quota | Class::InactiveMailbox)
}

/// The decision on one recipient's outcome at `now`.
pub fn decide(rcpt: &Rcpt, outcome: &Outcome, now: u64, rules: &Rules) -> Decision {
    if outcome.hold {
        return held(rcpt, outcome, now);
    }
    let reply = &outcome.reply;
    let d = rules.delivery;
    let attempts = usize::from(rcpt.attempts) + 1;
    let age = Duration::from_millis(now.saturating_sub(rcpt.arrived_ms));
    let (state, next) = match reply.code {
        200..=299 => (RcptState::Delivered, 0),
        500..=599 => (RcptState::Bounced, 0),
        _ if age >= d.max_age => (RcptState::Expired, 0),
        _ => (
            RcptState::Deferred,
            deferred_until(rcpt, outcome, now, rules),
        ),
    };
    let (notice, delay_notified) = notice(rcpt, outcome, state, now, d);
    let delivered = state == RcptState::Delivered;
    let greylisted = state == RcptState::Deferred && retry::is_greylisting(reply.code, &reply.text);
    let mut event = EventFields::new(event_kind(state));
    event.code = Some(reply.code);
    event.status = Some(reply.status.clone());
    event.response = Some(reply.text.clone());
    event.remote_mta = outcome.remote.clone();
    event.attempt = Some(attempts);
    event.size = Some(rcpt.size);
    event.tls = outcome.tls.clone();
    event.source = outcome.source.clone();
    event.latency_ms = delivered.then_some(now.saturating_sub(rcpt.arrived_ms));
    event.next_attempt_ms = (state == RcptState::Deferred).then_some(next);
    let (class, hard) = if delivered {
        (None, false)
    } else {
        let (class, hard) = classify(outcome, state, rules.bounce_rules);
        (Some(class), hard)
    };
    event.class = class;
    event.hard = class.map(|_| hard);
    let mailbox_class = match state {
        RcptState::Expired => {
            class.map(|_| classify(outcome, RcptState::Bounced, rules.bounce_rules).0)
        }
        _ => class,
    };
    Decision {
        state,
        next_attempt_ms: next,
        attempt: Some(Attempt {
            at_ms: now,
            code: reply.code,
            status: reply.status.clone(),
            diagnostic: reply.line(),
            remote_mta: outcome.remote.clone(),
        }),
        delay_notified,
        notice,
        event,
        metric: Some(Metric {
            kind: event_kind(state),
            status: reply.status.clone(),
            latency_s: delivered.then_some(age.as_secs_f64()),
            class,
        }),
        suppress: class.filter(|_| hard).map(|class| Suppress {
            class,
            detail: reply.line(),
        }),
        soft_bounce: state.is_final()
            && outcome.remote.is_some()
            && mailbox_class.is_some_and(is_mailbox_soft_bounce),
        sticky: match (greylisted, &outcome.source) {
            (true, Some(source)) => Sticky::Pin(source.clone()),
            _ => Sticky::Clear,
        },
    }
}

/// Held by Baton's own shaping (a suspension, a warm-up cap): not an attempt, never a reason
/// to expire or bounce; the recipient waits for the stated time.
fn held(rcpt: &Rcpt, outcome: &Outcome, now: u64) -> Decision {
    let until = outcome
        .not_before
        .unwrap_or(now.saturating_add(HOLD_RECHECK_MS));
    let mut event = EventFields::new(EventKind::Held);
    event.response = Some(outcome.reply.text.clone());
    event.next_attempt_ms = Some(until);
    Decision {
        state: rcpt.recipient.state,
        next_attempt_ms: until,
        attempt: None,
        delay_notified: false,
        notice: None,
        event,
        metric: None,
        suppress: None,
        soft_bounce: false,
        sticky: Sticky::Keep,
    }
}

/// The next attempt of a deferred recipient: greylisting's short wait or the backoff schedule,
/// then no sooner than a suspension allows, and never past expiry.
fn deferred_until(rcpt: &Rcpt, outcome: &Outcome, now: u64, rules: &Rules) -> u64 {
    let (d, reply) = (rules.delivery, &outcome.reply);
    let attempts = usize::from(rcpt.attempts) + 1;
    let (base, arrived) = (rules.retry_interval, rcpt.arrived_ms);
    // Greylisting wants the same message again soon, not in an hour.
    let next = if retry::is_greylisting(reply.code, &reply.text) {
        retry::after_greylisting(d, base, arrived, attempts, now, &reply.text)
    } else {
        retry::backoff(d, base, arrived, attempts, now)
    };
    match outcome.not_before {
        Some(nb) => suspended_until(next, nb, expiry_ms(d, arrived), now),
        None => next,
    }
}

/// A suspended destination says when it may be tried again: not before `not_before`, but not
/// past expiry either (and never before `now + 1`).
pub fn suspended_until(next: u64, not_before: u64, expiry: u64, now: u64) -> u64 {
    next.max(not_before).min(expiry.max(now.saturating_add(1)))
}

/// The notice an outcome calls for per the recipient's NOTIFY, and whether it is the delay
/// notice (sent once).
fn notice(
    rcpt: &Rcpt,
    outcome: &Outcome,
    state: RcptState,
    now: u64,
    d: &DeliveryConfig,
) -> (Option<Notice>, bool) {
    let (r, reply) = (rcpt.recipient, &outcome.reply);
    let age = Duration::from_millis(now.saturating_sub(rcpt.arrived_ms));
    let reported = ReportedRecipient {
        address: r.address.clone(),
        orcpt: r.orcpt.clone(),
        action: Action::Failed,
        status: reply.status.clone(),
        diagnostic: reply.line(),
        diagnostic_is_smtp: outcome.remote.is_some() && reply.code != 0,
        remote_mta: outcome.remote.as_deref().map(host_part),
        last_attempt_ms: now,
        will_retry_until_ms: None,
    };
    let (kind, recipient) = match state {
        RcptState::Bounced if wants_failure_notice(r.notify) => (NoticeKind::Failure, reported),
        RcptState::Expired if wants_failure_notice(r.notify) => {
            let diagnostic = format!(
                "message expired after {}; last error: {}",
                crate::config::human_duration(d.max_age),
                reply.line()
            );
            let status = "4.4.7".into();
            let expired = ReportedRecipient {
                status,
                diagnostic,
                ..reported
            };
            (NoticeKind::Failure, expired)
        }
        RcptState::Delivered if wants_success_notice(r.notify) && !outcome.dsn_passed => {
            let action = if outcome.local {
                Action::Delivered
            } else {
                Action::Relayed
            };
            (
                NoticeKind::Success,
                ReportedRecipient { action, ..reported },
            )
        }
        RcptState::Deferred
            if wants_delay_notice(r.notify) && !r.delay_notified && age >= d.delay_warning =>
        {
            let delayed = ReportedRecipient {
                action: Action::Delayed,
                will_retry_until_ms: Some(expiry_ms(d, rcpt.arrived_ms)),
                ..reported
            };
            (NoticeKind::Delay, delayed)
        }
        _ => return (None, false),
    };
    let delay_notified = kind == NoticeKind::Delay;
    (Some(Notice { kind, recipient }), delay_notified)
}

fn event_kind(state: RcptState) -> EventKind {
    match state {
        RcptState::Delivered => EventKind::Delivery,
        RcptState::Bounced => EventKind::Bounce,
        RcptState::Expired => EventKind::Expiration,
        RcptState::Deleted => EventKind::Deleted,
        RcptState::Queued | RcptState::Deferred => EventKind::TransientFailure,
    }
}

/// The operator bounces (with a notice) or deletes (without) a waiting recipient.
pub fn operator_final(recipient: &Recipient, bounce: bool, now: u64) -> Decision {
    let (state, text) = if bounce {
        (RcptState::Bounced, "bounced by the operator")
    } else {
        (RcptState::Deleted, "deleted by the operator")
    };
    let status = "5.0.0";
    let mut event = EventFields::new(event_kind(state));
    event.status = Some(status.into());
    event.response = Some(text.into());
    let notice = (bounce && wants_operator_bounce_notice(recipient.notify)).then(|| Notice {
        kind: NoticeKind::Failure,
        recipient: ReportedRecipient {
            address: recipient.address.clone(),
            orcpt: recipient.orcpt.clone(),
            action: Action::Failed,
            status: status.into(),
            diagnostic: format!("the mail system's operator {text}"),
            diagnostic_is_smtp: false,
            remote_mta: None,
            last_attempt_ms: now,
            will_retry_until_ms: None,
        },
    });
    Decision {
        state,
        next_attempt_ms: 0,
        attempt: Some(Attempt {
            at_ms: now,
            code: 550,
            status: status.into(),
            diagnostic: text.into(),
            remote_mta: None,
        }),
        delay_notified: false,
        notice,
        event,
        metric: Some(Metric {
            kind: event_kind(state),
            status: status.into(),
            latency_s: None,
            class: None,
        }),
        suppress: None,
        soft_bounce: false,
        sticky: Sticky::Keep,
    }
}

// NOTIFY (RFC 3461): which notices a recipient's sender asked for.

/// A bounce or expiry is reported unless NOTIFY says NEVER or names other conditions only.
pub fn wants_failure_notice(notify: Notify) -> bool {
    notify.wants_failure()
}

/// A delay is reported unless NOTIFY says NEVER or names other conditions only.
pub fn wants_delay_notice(notify: Notify) -> bool {
    notify.wants_delay()
}

/// A delivery is reported only when NOTIFY asks for SUCCESS.
pub fn wants_success_notice(notify: Notify) -> bool {
    notify.wants_success()
}

/// An operator's bounce is reported unless NOTIFY says NEVER.
pub fn wants_operator_bounce_notice(notify: Notify) -> bool {
    !notify.is_never()
}

/// Where a waiting recipient stands when its message is dispatched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    /// Its message expired while it waited: expire it now, untried.
    Expired,
    /// Try it now.
    Now,
    /// Wait until `until`; wake the message at `wake` (`until`, but no later than expiry).
    /// `moved` when a delivery window pushed `until` back (the new time is to be recorded).
    Wait { until: u64, wake: u64, moved: bool },
}

/// The times a message's recipients are dispatched by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageClock {
    /// Every recipient expires at max_age, tried or not: a send-at, a window or a hold by
    /// shaping never keeps one (and its journal segment) past it.
    pub expiry: u64,
    /// Outside its delivery window, nothing of the message is due before the window opens.
    pub window_opens: Option<u64>,
}

impl MessageClock {
    pub fn new(
        d: &DeliveryConfig,
        arrived_ms: u64,
        window: Option<&Window>,
        now: u64,
    ) -> MessageClock {
        MessageClock {
            expiry: expiry_ms(d, arrived_ms),
            window_opens: window.map(|w| w.next_open(now)).filter(|&open| open > now),
        }
    }

    /// Where a recipient whose next attempt is `next_attempt_ms` stands at `now`.
    pub fn due(&self, next_attempt_ms: u64, now: u64) -> Due {
        if now >= self.expiry && next_attempt_ms > now {
            return Due::Expired;
        }
        let (until, moved) = match self.window_opens {
            Some(open) if next_attempt_ms < open => (open, true),
            _ => (next_attempt_ms, false),
        };
        if until <= now {
            return Due::Now;
        }
        Due::Wait {
            until,
            wake: until.min(self.expiry),
            moved,
        }
    }
}

/// A send-at time must fall before the message expires (`max_age` after it arrived): later,
/// it could never be tried, only pin the spool until it expired.
pub fn check_send_at(
    send_at_ms: u64,
    arrived_ms: u64,
    delivery: &crate::config::DeliveryConfig,
) -> Result<(), String> {
    let expiry = expiry_ms(delivery, arrived_ms);
    if send_at_ms < expiry {
        return Ok(());
    }
    Err(format!(
        "send-at time is past the message's lifetime ([delivery] max_age = {}); it would expire unsent",
        crate::config::human_duration(delivery.max_age)
    ))
}

/// A message's send-at time (0 when none).
pub fn send_at_ms(meta: Option<u64>) -> u64 {
    meta.unwrap_or(0)
}

/// The next attempt of a recipient the operator makes due (resume, flush, release, rebind):
/// now, but never earlier than the message's send-at time. (Its delivery window is kept by
/// [`MessageClock::due`] when it is dispatched.)
pub fn released(next_attempt_ms: u64, send_at_ms: u64) -> u64 {
    next_attempt_ms.min(send_at_ms)
}

/// "mx1.example.net [192.0.2.1]" → "mx1.example.net".
fn host_part(remote: &str) -> String {
    remote
        .split(' ')
        .next()
        .unwrap_or(remote)
        .trim_matches(['[', ']'])
        .to_string()
}
