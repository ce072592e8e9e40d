//! The schedule's actual numbers, and which outcome gets which state, notice and event.

use super::*;
use crate::config::Config;
use baton_client::Reply;
use baton_spool::Notify;

const S: u64 = 1000;
const ARRIVED: u64 = 1_700_000_000 * S;
const DAY: u64 = 86400 * S;

/// retry_min 60 s, retry_max 1 h, greylist_retry 5 min, max_age 5 days, delay_warning 4 h.
fn delivery() -> DeliveryConfig {
    let mut d = Config::defaults().delivery;
    d.retry_min = Duration::from_secs(60);
    d.retry_max = Duration::from_secs(3600);
    d.greylist_retry = Duration::from_secs(300);
    d.max_age = Duration::from_secs(5 * 86400);
    d.delay_warning = Duration::from_secs(4 * 3600);
    d
}

/// The `baton_outcomes` label of a metric's kind.
fn label(kind: baton_events::EventKind) -> &'static str {
    baton_events::metrics::outcome_label(kind).unwrap_or("")
}

fn recipient(notify: u8) -> Recipient {
    Recipient::new("ann@example.net".into(), None, Notify::from_bits(notify))
}

fn outcome(code: u16, status: &str, text: &str) -> Outcome {
    Outcome {
        rcpt: 0,
        reply: Reply {
            code,
            status: status.into(),
            text: text.into(),
            lines: vec![text.into()],
            to_rcpt: true,
        },
        remote: Some("mx1.example.net [192.0.2.1]".into()),
        dsn_passed: false,
        local: false,
        tls: None,
        not_before: None,
        hold: false,
        source: Some("ip10".into()),
    }
}

fn deferral() -> Outcome {
    outcome(451, "4.3.0", "4.3.0 try later")
}

/// The decision after `attempts` earlier attempts, at `now`.
fn decide_with(
    r: &Recipient,
    attempts: u16,
    o: &Outcome,
    now: u64,
    d: &DeliveryConfig,
    retry_interval: Option<Duration>,
) -> Decision {
    let rcpt = Rcpt {
        recipient: r,
        attempts,
        arrived_ms: ARRIVED,
        size: 1234,
    };
    let rules = Rules {
        delivery: d,
        retry_interval,
        bounce_rules: None,
    };
    decide(&rcpt, o, now, &rules)
}

/// Seconds from `now` to the next attempt after attempt number `attempts + 1`.
fn wait_s(o: &Outcome, attempts: u16, now: u64, retry_interval: Option<Duration>) -> u64 {
    let d = decide_with(&recipient(0), attempts, o, now, &delivery(), retry_interval);
    assert_eq!(d.state, RcptState::Deferred);
    (d.next_attempt_ms - now) / S
}

#[test]
fn backoff_doubles_from_retry_min_up_to_retry_max() {
    let now = ARRIVED + 10 * S;
    let waits: Vec<u64> = (0..9).map(|n| wait_s(&deferral(), n, now, None)).collect();
    assert_eq!(waits, [60, 120, 240, 480, 960, 1920, 3600, 3600, 3600]);
    // Attempts past u16 do not overflow.
    assert_eq!(wait_s(&deferral(), u16::MAX, now, None), 3600);
}

#[test]
fn a_rules_retry_interval_is_the_base() {
    let now = ARRIVED + 10 * S;
    let base = Some(Duration::from_secs(30));
    let waits: Vec<u64> = (0..9).map(|n| wait_s(&deferral(), n, now, base)).collect();
    assert_eq!(waits, [30, 60, 120, 240, 480, 960, 1920, 3600, 3600]);
    // A base above retry_max is the wait itself.
    let long = Some(Duration::from_secs(7200));
    assert_eq!(wait_s(&deferral(), 0, now, long), 7200);
    assert_eq!(wait_s(&deferral(), 5, now, long), 7200);
}

#[test]
fn max_age_expires_and_the_last_attempt_is_at_expiry() {
    let d = delivery();
    let expiry = ARRIVED + 5 * DAY;
    assert_eq!(expiry_ms(&d, ARRIVED), expiry);
    // Ten seconds before expiry the next attempt would be an hour away: it is at expiry.
    let last = decide_with(&recipient(0), 9, &deferral(), expiry - 10 * S, &d, None);
    assert_eq!(last.state, RcptState::Deferred);
    assert_eq!(last.next_attempt_ms, expiry);
    // Deferred at (or past) max_age: expired, with a 4.4.7 failure notice.
    let expired = decide_with(&recipient(0), 10, &deferral(), expiry, &d, None);
    assert_eq!(expired.state, RcptState::Expired);
    assert_eq!(expired.next_attempt_ms, 0);
    assert_eq!(expired.event.kind, EventKind::Expiration);
    assert_eq!(expired.event.next_attempt_ms, None);
    assert_eq!(
        expired.metric.as_ref().map(|m| label(m.kind)),
        Some("expired")
    );
    let notice = expired.notice.expect("a failure notice");
    assert_eq!(notice.kind, NoticeKind::Failure);
    assert_eq!(notice.recipient.status, "4.4.7");
    assert_eq!(
        notice.recipient.diagnostic,
        "message expired after 5 days; last error: 451 4.3.0 try later"
    );
    // A 2xx or 5xx at max_age is still what it says.
    let late = decide_with(
        &recipient(0),
        10,
        &outcome(250, "2.0.0", "ok"),
        expiry,
        &d,
        None,
    );
    assert_eq!(late.state, RcptState::Delivered);
}

#[test]
fn greylisting_hints_are_bounded_then_the_ordinary_schedule() {
    let now = ARRIVED + 10 * S;
    let grey = |text: &str| outcome(450, "4.2.0", text);
    let hinted = grey("4.2.0 Greylisted, please try again in 5 minutes");
    // The named wait, plus a second, for the first GREYLIST_TRIES attempts.
    for n in 0..GREYLIST_TRIES as u16 {
        assert_eq!(wait_s(&hinted, n, now, None), 301);
    }
    // Then the ordinary schedule, from the attempt count: 60 * 2^3.
    assert_eq!(wait_s(&hinted, GREYLIST_TRIES as u16, now, None), 480);
    // No hint: greylist_retry.
    assert_eq!(wait_s(&grey("4.2.0 greylisted"), 0, now, None), 300);
    // Too soon: the floor (greylist_retry or retry_min, the shorter); too late: retry_max.
    assert_eq!(wait_s(&grey("greylisted, retry in 0 s"), 0, now, None), 60);
    let huge = grey("greylisted, retry in 99999999999999999999999 hours");
    assert_eq!(wait_s(&huge, 0, now, None), 3600);
    // The retry leaves from the same source.
    let d = decide_with(&recipient(0), 0, &hinted, now, &delivery(), None);
    assert_eq!(d.sticky, Sticky::Pin("ip10".into()));
    let plain = decide_with(&recipient(0), 0, &deferral(), now, &delivery(), None);
    assert_eq!(plain.sticky, Sticky::Clear);
}

#[test]
fn a_suspension_postpones_the_next_attempt_but_never_past_expiry() {
    let d = delivery();
    let now = ARRIVED + 10 * S;
    let mut o = deferral();
    o.not_before = Some(now + 2 * 3600 * S);
    let two_hours = decide_with(&recipient(0), 0, &o, now, &d, None);
    assert_eq!(two_hours.next_attempt_ms, now + 2 * 3600 * S);
    assert_eq!(two_hours.event.next_attempt_ms, Some(now + 2 * 3600 * S));
    // Sooner than the backoff: the backoff stands.
    o.not_before = Some(now + 5 * S);
    let soon = decide_with(&recipient(0), 0, &o, now, &d, None);
    assert_eq!(soon.next_attempt_ms, now + 60 * S);
    // Past expiry: at expiry.
    o.not_before = Some(ARRIVED + 30 * DAY);
    let capped = decide_with(&recipient(0), 0, &o, now, &d, None);
    assert_eq!(capped.next_attempt_ms, ARRIVED + 5 * DAY);
    assert_eq!(suspended_until(0, u64::MAX, 500, 1000), 1001);
    assert_eq!(suspended_until(0, u64::MAX, u64::MAX, u64::MAX), u64::MAX);
}

#[test]
fn a_shaping_hold_is_not_an_attempt() {
    let d = delivery();
    let now = ARRIVED + 6 * DAY; // past max_age: a hold still neither expires nor bounces
    let mut o = outcome(451, "4.7.0", "destination suspended");
    o.hold = true;
    o.not_before = Some(now + 30 * S);
    let mut r = recipient(0);
    r.state = RcptState::Deferred;
    let held = decide_with(&r, 3, &o, now, &d, None);
    assert_eq!(held.state, RcptState::Deferred);
    assert_eq!(held.next_attempt_ms, now + 30 * S);
    assert!(held.attempt.is_none());
    assert!(held.metric.is_none() && held.notice.is_none() && held.suppress.is_none());
    assert_eq!(held.sticky, Sticky::Keep);
    assert_eq!(held.event.kind, EventKind::Held);
    assert_eq!(held.event.next_attempt_ms, Some(now + 30 * S));
    assert_eq!(held.event.attempt, None);
    assert_eq!(
        held.event.response.as_deref(),
        Some("destination suspended")
    );
    // No time named: a second from now.
    o.not_before = None;
    assert_eq!(
        decide_with(&r, 3, &o, now, &d, None).next_attempt_ms,
        now + S
    );
}

fn ms(t: &str) -> u64 {
    crate::schedule::parse_time(t).expect("a time")
}

#[test]
fn a_delivery_window_holds_recipients_until_it_opens() {
    let d = delivery();
    let window = Window::parse("09:00-17:00").expect("a window");
    let evening = ms("2026-03-02T18:00:00Z");
    let opens = ms("2026-03-03T09:00:00Z");
    let arrived = evening - 3600 * S;
    let clock = MessageClock::new(&d, arrived, Some(&window), evening);
    assert_eq!(clock.window_opens, Some(opens));
    assert_eq!(clock.expiry, arrived + 5 * DAY);
    let moved = Due::Wait {
        until: opens,
        wake: opens,
        moved: true,
    };
    assert_eq!(clock.due(0, evening), moved);
    assert_eq!(clock.due(evening + 60 * S, evening), moved);
    // Due after the window opens anyway: not moved.
    let later = opens + 3600 * S;
    let wait = Due::Wait {
        until: later,
        wake: later,
        moved: false,
    };
    assert_eq!(clock.due(later, evening), wait);
    // Inside the window: now.
    let noon = ms("2026-03-03T12:00:00Z");
    let open = MessageClock::new(&d, arrived, Some(&window), noon);
    assert_eq!(open.window_opens, None);
    assert_eq!(open.due(0, noon), Due::Now);
    // A window that opens after expiry: woken at expiry, then expired untried.
    let short = MessageClock {
        expiry: evening + 600 * S,
        ..clock
    };
    let at_expiry = Due::Wait {
        until: opens,
        wake: evening + 600 * S,
        moved: true,
    };
    assert_eq!(short.due(0, evening), at_expiry);
    assert_eq!(short.due(opens, evening + 600 * S), Due::Expired);
}

#[test]
fn send_at_holds_recipients_and_release_keeps_it() {
    let d = delivery();
    let now = ARRIVED + 10 * S;
    let send_at = send_at_ms(Some(now + 7200 * S));
    assert_eq!(send_at, now + 7200 * S);
    assert_eq!(send_at_ms(None), 0);
    let clock = MessageClock::new(&d, ARRIVED, None, now);
    let wait = Due::Wait {
        until: send_at,
        wake: send_at,
        moved: false,
    };
    assert_eq!(clock.due(send_at, now), wait);
    // Released by the operator: now, but not before its send-at time.
    assert_eq!(released(now + 3 * 7200 * S, send_at), send_at);
    assert_eq!(released(now + 3600 * S, 0), 0);
    assert_eq!(clock.due(0, now), Due::Now);
    // Past expiry and not yet due: expired untried.
    assert_eq!(clock.due(u64::MAX, ARRIVED + 5 * DAY), Due::Expired);
}

#[test]
fn replies_decide_the_state_event_and_metric() {
    let d = delivery();
    let now = ARRIVED + 2500;
    let ok = decide_with(
        &recipient(0),
        0,
        &outcome(250, "2.0.0", "2.0.0 ok"),
        now,
        &d,
        None,
    );
    assert_eq!((ok.state, ok.next_attempt_ms), (RcptState::Delivered, 0));
    assert_eq!(ok.event.kind, EventKind::Delivery);
    assert_eq!(ok.event.latency_ms, Some(2500));
    assert_eq!(ok.event.attempt, Some(1));
    assert_eq!(ok.event.size, Some(1234));
    assert_eq!(ok.event.source.as_deref(), Some("ip10"));
    let metric = ok.metric.expect("a metric");
    assert_eq!(
        (label(metric.kind), metric.latency_s),
        ("delivered", Some(2.5))
    );
    assert!(ok.notice.is_none(), "no success notice unless asked");
    let attempt = ok.attempt.expect("an attempt");
    assert_eq!(attempt.diagnostic, "250 2.0.0 ok");
    assert_eq!(attempt.at_ms, now);

    let no_user = outcome(550, "5.1.1", "5.1.1 no such user");
    let bounced = decide_with(&recipient(0), 2, &no_user, now, &d, None);
    assert_eq!(
        (bounced.state, bounced.next_attempt_ms),
        (RcptState::Bounced, 0)
    );
    assert_eq!(bounced.event.kind, EventKind::Bounce);
    assert_eq!(bounced.event.attempt, Some(3));
    assert_eq!(bounced.event.latency_ms, None);
    let suppress = bounced.suppress.clone().expect("a hard bounce");
    assert_eq!(suppress.class, baton_bounce::Class::InvalidRecipient);
    assert_eq!(suppress.detail, "550 5.1.1 no such user");
    assert_eq!(
        bounced.event.class,
        Some(baton_bounce::Class::InvalidRecipient)
    );
    assert_eq!(bounced.event.hard, Some(true));
    assert!(!bounced.soft_bounce);
    let notice = bounced.notice.expect("a failure notice");
    assert_eq!(
        notice.recipient.remote_mta.as_deref(),
        Some("mx1.example.net")
    );
    assert!(notice.recipient.diagnostic_is_smtp);
    // Not the recipient's own refusal, or not about the address: not suppressed.
    let mut sender_refused = no_user.clone();
    sender_refused.reply.to_rcpt = false;
    assert!(
        decide_with(&recipient(0), 0, &sender_refused, now, &d, None)
            .suppress
            .is_none()
    );
    let policy = outcome(550, "5.7.1", "5.7.1 refused");
    assert!(
        decide_with(&recipient(0), 0, &policy, now, &d, None)
            .suppress
            .is_none()
    );
    // A reputation block worded as an unknown user is no verdict on the address.
    let blocked = outcome(
        550,
        "5.1.1",
        "5.1.1 Service unavailable; client host [192.0.2.1] blocked using Spamhaus",
    );
    let verdict = decide_with(&recipient(0), 0, &blocked, now, &d, None);
    assert_eq!(verdict.event.class, Some(baton_bounce::Class::Reputation));
    assert!(verdict.suppress.is_none() && !verdict.soft_bounce);
    // A full mailbox, given up on: a soft bounce of the mailbox, counted, not suppressed.
    let full = outcome(552, "5.2.2", "5.2.2 mailbox full");
    let verdict = decide_with(&recipient(0), 0, &full, now, &d, None);
    assert_eq!(verdict.event.class, Some(baton_bounce::Class::Quota));
    assert_eq!(verdict.event.hard, Some(false));
    assert!(verdict.suppress.is_none() && verdict.soft_bounce);
    let full_now = outcome(452, "4.2.2", "4.2.2 mailbox full");
    let verdict = decide_with(&recipient(0), 0, &full_now, now, &d, None);
    assert!(!verdict.soft_bounce, "a deferral is not a bounce");
    assert_eq!(verdict.event.class, Some(baton_bounce::Class::Quota));

    let deferred = decide_with(&recipient(0), 0, &deferral(), now, &d, None);
    assert_eq!(deferred.event.kind, EventKind::TransientFailure);
    assert_eq!(deferred.event.next_attempt_ms, Some(now + 60 * S));
    assert_eq!(deferred.metric.map(|m| label(m.kind)), Some("deferred"));
}

/// Which notices (failure, delay, success) each NOTIFY gets.
#[test]
fn notices_follow_notify() {
    let d = delivery();
    let late = ARRIVED + 5 * 3600 * S; // past delay_warning
    let kind = |notify: u8, o: &Outcome| {
        decide_with(&recipient(notify), 0, o, late, &d, None)
            .notice
            .map(|n| n.kind)
    };
    let bounce = outcome(550, "5.1.1", "5.1.1 no such user");
    let ok = outcome(250, "2.0.0", "ok");
    let (f, dl, s) = (
        Some(NoticeKind::Failure),
        Some(NoticeKind::Delay),
        Some(NoticeKind::Success),
    );
    // (NOTIFY, failure, delay, success): 0 default, 1 NEVER, 2 SUCCESS, 4 FAILURE, 8 DELAY.
    let table = [
        (0, f, dl, None),
        (1, None, None, None),
        (2, None, None, s),
        (4, f, None, None),
        (8, None, dl, None),
        (2 | 4 | 8, f, dl, s),
    ];
    for (notify, failure, delay, success) in table {
        assert_eq!(kind(notify, &bounce), failure, "NOTIFY {notify}");
        assert_eq!(kind(notify, &deferral()), delay, "NOTIFY {notify}");
        assert_eq!(kind(notify, &ok), success, "NOTIFY {notify}");
    }
    assert!(
        wants_failure_notice(Notify::from_bits(0))
            && !wants_failure_notice(Notify::from_bits(1))
            && !wants_failure_notice(Notify::from_bits(8))
    );
    assert!(wants_delay_notice(Notify::from_bits(8)) && !wants_delay_notice(Notify::from_bits(4)));
    assert!(
        wants_success_notice(Notify::from_bits(2)) && !wants_success_notice(Notify::from_bits(0))
    );
    // A success the next hop reports itself (it took the DSN parameters): not ours to send.
    let mut passed = ok.clone();
    passed.dsn_passed = true;
    assert_eq!(kind(2, &passed), None);
    // Delivered here or relayed onwards.
    let mut local = ok.clone();
    local.local = true;
    let action = |o: &Outcome| {
        decide_with(&recipient(2), 0, o, late, &d, None)
            .notice
            .map(|n| n.recipient.action)
    };
    assert_eq!(action(&local), Some(Action::Delivered));
    assert_eq!(action(&ok), Some(Action::Relayed));
}

#[test]
fn a_delay_warning_goes_once_after_delay_warning() {
    let d = delivery();
    let warning = ARRIVED + 4 * 3600 * S;
    let early = decide_with(&recipient(0), 0, &deferral(), warning - S, &d, None);
    assert!(early.notice.is_none() && !early.delay_notified);
    let due = decide_with(&recipient(0), 0, &deferral(), warning, &d, None);
    assert!(due.delay_notified);
    let notice = due.notice.expect("a delay notice");
    assert_eq!(notice.kind, NoticeKind::Delay);
    assert_eq!(notice.recipient.action, Action::Delayed);
    assert_eq!(
        notice.recipient.will_retry_until_ms,
        Some(ARRIVED + 5 * DAY)
    );
    let mut warned = recipient(0);
    warned.delay_notified = true;
    let again = decide_with(&warned, 1, &deferral(), warning + 3600 * S, &d, None);
    assert!(again.notice.is_none() && !again.delay_notified);
}

#[test]
fn the_operator_bounces_with_a_notice_or_deletes_without() {
    let now = ARRIVED + 10 * S;
    let bounced = operator_final(&recipient(0), true, now);
    assert_eq!(
        (bounced.state, bounced.next_attempt_ms),
        (RcptState::Bounced, 0)
    );
    assert_eq!(bounced.event.kind, EventKind::Bounce);
    assert_eq!(bounced.event.status.as_deref(), Some("5.0.0"));
    assert_eq!(bounced.event.code, None);
    let notice = bounced.notice.expect("a failure notice");
    assert_eq!(
        notice.recipient.diagnostic,
        "the mail system's operator bounced by the operator"
    );
    assert_eq!(bounced.attempt.map(|a| a.code), Some(550));
    assert!(operator_final(&recipient(1), true, now).notice.is_none());
    let deleted = operator_final(&recipient(0), false, now);
    assert_eq!(deleted.state, RcptState::Deleted);
    assert_eq!(deleted.event.kind, EventKind::Deleted);
    assert_eq!(deleted.metric.map(|m| label(m.kind)), Some("deleted"));
    assert!(deleted.notice.is_none());
}
