//! Every parser of text from operators, API callers and remote peers that is not SMTP itself:
//! time spans, times, rates, durations, sizes, queue ids, operator targets, delivery windows,
//! scheduling headers, envelope addresses, greylisting hints, MTA-STS policies. Any input gets an answer
//! or a refusal, never a panic; what is accepted is sane.
#![no_main]

use baton::config::{parse_duration, parse_size};
use baton_smtp::address::{parse_mailbox, smtp_path};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let _ = baton_events::parse_since(text);
    let _ = baton::schedule::parse_time(text);
    let _ = baton::schedule::Window::parse(text).map(|w| w.next_open(1_800_000_000_000));
    let _ = baton::schedule::requested(text.as_bytes());
    let _ = text.parse::<baton_spool::QueueId>();
    let _ = baton_dns::mta_sts::Policy::parse(text, "id");
    if let Some(rate) = baton_shaping::Rate::parse(text) {
        assert!(rate.count > 0);
    }
    if let Some(secs) = parse_duration(text) {
        assert!(secs > 0 && secs <= 3650 * 86400);
    }
    if let Some(bytes) = parse_size(text) {
        assert!(bytes > 0);
    }
    if let Ok(length) = baton::operator::SuspendFor::new(text.parse().ok()) {
        assert!((1..=baton::operator::MAX_SUSPENSION_SECS).contains(&length.seconds()));
    }
    operator_targets(text);
    if let Some(wait) = baton::policy::retry::greylist_hint(text) {
        assert!(wait.as_secs() > 0);
    }
    for utf8 in [false, true] {
        if let Ok(stored) = parse_mailbox(text, utf8) {
            // Accepted addresses can always go on the wire, and come back the same.
            assert!(!stored.chars().any(char::is_control));
            let wire = smtp_path(&stored).expect("an accepted address is sendable");
            assert!(!wire.contains(['\r', '\n']));
            assert_eq!(parse_mailbox(&wire, utf8).as_deref(), Ok(stored.as_str()));
        }
    }
});

/// Operator targets: whatever the text, a destination keeps the operator's words, and a
/// suspension's key is their lower case.
fn operator_targets(text: &str) {
    use baton::operator::{OperatorCommand, Target, Written};
    let written = Written::destination(text);
    assert_eq!(written.text, text);
    if let Ok(what) = written.target.suspendable() {
        assert_eq!(what.key(), text.to_ascii_lowercase());
    }
    if let Ok(target) = Target::domain_or_message(text) {
        assert!(!text.is_empty() && !text.contains(':'), "{target:?}");
    }
    let _ = Target::message_or_all(text);
    let _ = OperatorCommand::stats(Some(text), Some(text), text);
}
