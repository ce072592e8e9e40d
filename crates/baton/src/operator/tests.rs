//! Replies serialise to the JSON the CLI printed and the API returned when they were built with
//! `json!`; commands read user text as the edges always did and survive the socket's wire.

use serde_json::{Value, json};

use super::*;

/// `reply` as the CLI prints it and the API sends it is `expected`, byte for byte, and it
/// reads back as itself.
fn answers(command: &OperatorCommand, reply: Reply, expected: Value) {
    let json = reply.to_json();
    assert_eq!(json, expected);
    assert_eq!(json.to_string(), expected.to_string());
    let wire = serde_json::to_string(&reply).unwrap();
    let back = Reply::decode(command, serde_json::from_str(&wire).unwrap()).unwrap();
    assert_eq!(back, reply);
}

fn id() -> QueueId {
    "0123456789ABCDEF".parse().unwrap()
}

#[test]
fn actions_answer_as_before() {
    let suspend = OperatorCommand::suspend("Tenant:Acme", Some(60)).unwrap();
    let reply = Reply::Suspended(Suspended {
        ok: true,
        destination: "Tenant:Acme".into(),
        seconds: 60,
    });
    let expected = json!({"ok": true, "destination": "Tenant:Acme", "seconds": 60});
    answers(&suspend, reply, expected);
    let reply = Reply::Resumed(Resumed {
        ok: true,
        destination: "x.test".into(),
    });
    answers(
        &OperatorCommand::resume("x.test"),
        reply,
        json!({"ok": true, "destination": "x.test"}),
    );
    let bounce = OperatorCommand::bounce("stuck.test").unwrap();
    let reply = Reply::Bounced(Bounced {
        ok: true,
        destination: "stuck.test".into(),
        bounced: 2,
    });
    let expected = json!({"ok": true, "destination": "stuck.test", "bounced": 2});
    answers(&bounce, reply, expected);
    let delete = OperatorCommand::delete("stuck.test").unwrap();
    let reply = Reply::Deleted(Deleted {
        ok: true,
        destination: "stuck.test".into(),
        deleted: 1,
    });
    let expected = json!({"ok": true, "destination": "stuck.test", "deleted": 1});
    answers(&delete, reply, expected);
}

#[test]
fn more_actions_answer_as_before() {
    let rebind = OperatorCommand::Rebind {
        from: "a".into(),
        to: "b".into(),
    };
    let reply = Reply::Rebound(Rebound {
        ok: true,
        from: "a".into(),
        to: "b".into(),
        messages: 3,
    });
    let expected = json!({"ok": true, "from": "a", "to": "b", "messages": 3});
    answers(&rebind, reply, expected);
    let reply = Reply::Flushed(Flushed {
        ok: true,
        destination: String::new(),
        flushed: 4,
    });
    let expected = json!({"ok": true, "destination": "", "flushed": 4});
    answers(&OperatorCommand::flush(None), reply, expected);
    let hold = OperatorCommand::hold("ALL").unwrap();
    let reply = Reply::Held(Held { ok: true, held: 5 });
    answers(&hold, reply, json!({"ok": true, "held": 5}));
    let release = OperatorCommand::release("all").unwrap();
    let reply = Reply::Released(Released {
        ok: true,
        released: 0,
    });
    answers(&release, reply, json!({"ok": true, "released": 0}));
    let error = ControlError::new("no message 0123456789ABCDEF in the queue");
    assert_eq!(
        serde_json::to_value(&error).unwrap(),
        json!({"error": "no message 0123456789ABCDEF in the queue"})
    );
    assert_eq!(error.to_json(), serde_json::to_value(&error).unwrap());
}

#[test]
fn summary_answers_as_before() {
    let row = |shaping: Option<&str>, destination: &str, pool: Option<&str>| SummaryRow {
        shaping: shaping.map(Into::into),
        destination: destination.into(),
        pool: pool.map(Into::into),
        counts: Counts {
            queued: 1,
            deferred: 2,
            active: 3,
            held: 4,
        },
        oldest_ms: 1_700_000_000_000,
    };
    let reply = Reply::Summary(Summary {
        messages: 2,
        recipients: Counts {
            queued: 2,
            deferred: 4,
            active: 6,
            held: 8,
        },
        destinations: vec![
            row(Some("normal"), "a.test", None),
            row(None, "[relay.test]:25", Some("bulk")),
        ],
        recovering: false,
    });
    let expected = json!({
        "messages": 2,
        "recipients": {"queued": 2, "deferred": 4, "active": 6, "held": 8},
        "destinations": [
            {"shaping": "normal", "destination": "a.test", "pool": null, "queued": 1,
             "deferred": 2, "active": 3, "held": 4, "oldest_ms": 1_700_000_000_000u64},
            {"shaping": null, "destination": "[relay.test]:25", "pool": "bulk", "queued": 1,
             "deferred": 2, "active": 3, "held": 4, "oldest_ms": 1_700_000_000_000u64},
        ],
    });
    answers(&OperatorCommand::Summary, reply, expected);
}

#[test]
fn explanations_answer_as_before() {
    let shaping = json!({"domain_rule": "default (*)", "operator_suspended_for_s": null,
                         "states": [{"throttle_factor": 0.25}]});
    let reply = Reply::Explain(MessageExplained {
        id: id(),
        sender: "a@sender.test".into(),
        tenant: None,
        recipients: vec![RecipientExplained {
            email: "b@ops.test".into(),
            state: "deferred".into(),
            attempts: 2,
            next_attempt_ms: Some(1_700_000_000_000),
            in_flight: false,
            destination: "ops.test".into(),
            pool: Some("a".into()),
            reasons: vec!["waiting for its next attempt in 60 s".into()],
            shaping: shaping.clone(),
        }],
    });
    let expected = json!({
        "id": "0123456789ABCDEF", "sender": "a@sender.test", "tenant": null,
        "recipients": [{
            "email": "b@ops.test", "state": "deferred", "attempts": 2,
            "next_attempt_ms": 1_700_000_000_000u64, "in_flight": false,
            "destination": "ops.test", "pool": "a",
            "reasons": ["waiting for its next attempt in 60 s"], "shaping": shaping,
        }],
    });
    answers(&OperatorCommand::Explain { id: id() }, reply, expected);
    let reply = Reply::ExplainDestination(DestinationExplained {
        destination: "Ops.test".into(),
        route: "ops.test".into(),
        recipients_waiting: 1,
        recipients_in_flight: 0,
        next_attempt_ms: None,
        shaping: shaping.clone(),
    });
    let expected = json!({
        "destination": "Ops.test", "route": "ops.test", "recipients_waiting": 1,
        "recipients_in_flight": 0, "next_attempt_ms": null, "shaping": shaping,
    });
    let command = OperatorCommand::ExplainDestination {
        domain: "Ops.test".into(),
    };
    answers(&command, reply, expected);
}

#[test]
fn commands_read_user_text_with_the_old_errors() {
    assert_eq!(
        OperatorCommand::explain("nope").unwrap_err().to_string(),
        "queue id \"nope\" should be 16 hex digits"
    );
    assert_eq!(
        OperatorCommand::explain("0123456789abcdef").unwrap(),
        OperatorCommand::Explain { id: id() }
    );
    for seconds in [0, MAX_SUSPENSION_SECS + 1, u64::MAX] {
        assert_eq!(
            OperatorCommand::suspend("x.test", Some(seconds))
                .unwrap_err()
                .to_string(),
            format!("seconds {seconds}: a suspension lasts from 1 to 31536000 seconds (a year)")
        );
    }
    assert_eq!(SuspendFor::new(None).unwrap().seconds(), 86400);
    assert_eq!(
        SuspendFor::new(Some(MAX_SUSPENSION_SECS))
            .unwrap()
            .seconds(),
        MAX_SUSPENSION_SECS
    );
    assert_eq!(
        OperatorCommand::bounce("pool:bulk")
            .unwrap_err()
            .to_string(),
        "bounce and delete take a domain, not \"pool:bulk\""
    );
    assert!(OperatorCommand::hold("x").is_err());
    assert_eq!(
        OperatorCommand::flush(Some("")),
        OperatorCommand::flush(None)
    );
    assert_eq!(
        OperatorCommand::stats(Some("yesterday"), None, "destination")
            .unwrap_err()
            .to_string(),
        "since \"yesterday\" is not an RFC 3339 time or a span like 24h"
    );
    assert_eq!(
        OperatorCommand::stats(Some("24h"), Some("soon"), "tenant")
            .unwrap_err()
            .to_string(),
        "until \"soon\" is not an RFC 3339 time or a span like 24h"
    );
}

#[test]
fn commands_cross_the_socket_unchanged() {
    let commands = [
        OperatorCommand::explain("0123456789ABCDEF").unwrap(),
        OperatorCommand::ExplainDestination {
            domain: "[IPv6:::1]".into(),
        },
        OperatorCommand::suspend("Pool:Bulk", None).unwrap(),
        OperatorCommand::resume("tenant:acme"),
        OperatorCommand::bounce("0123456789ABCDEF").unwrap(),
        OperatorCommand::delete("stuck.test").unwrap(),
        OperatorCommand::Rebind {
            from: "a".into(),
            to: "b".into(),
        },
        OperatorCommand::flush(Some("Example.com")),
        OperatorCommand::Summary,
        OperatorCommand::hold("ALL").unwrap(),
        OperatorCommand::release("0123456789ABCDEF").unwrap(),
        OperatorCommand::stats(Some("2026-01-02T03:04:05.123456789Z"), None, "source").unwrap(),
        OperatorCommand::stats(None, Some("1h"), "campaign").unwrap(),
    ];
    for command in commands {
        let line = serde_json::to_string(&command).unwrap();
        assert!(!line.contains('\n'));
        let back: OperatorCommand = serde_json::from_str(&line).unwrap();
        assert_eq!(back, command, "{line}");
    }
    // The socket checks what no CLI would send.
    let zero = r#"{"cmd":"suspend","destination":{"target":"all","text":""},"seconds":0}"#;
    assert!(serde_json::from_str::<OperatorCommand>(zero).is_err());
}

#[test]
fn only_actions_on_whole_destinations_are_fleet_wide() {
    let id = "1A23CF80D0100000";
    let wide = |c: Result<OperatorCommand, ControlError>| c.unwrap().fleet_wide();
    assert!(wide(OperatorCommand::bounce("far.test")));
    assert!(wide(OperatorCommand::delete("far.test")));
    assert!(
        !wide(OperatorCommand::bounce(id)),
        "one message stays on its node"
    );
    assert!(!wide(OperatorCommand::delete(id)));
    assert!(wide(OperatorCommand::hold("ALL")));
    assert!(wide(OperatorCommand::release("all")));
    assert!(!wide(OperatorCommand::hold(id)));
    assert!(OperatorCommand::flush(None).fleet_wide());
    assert!(OperatorCommand::flush(Some("pool:bulk")).fleet_wide());
    assert!(
        !wide(OperatorCommand::suspend("far.test", None)),
        "shared as state"
    );
    assert!(!wide(OperatorCommand::explain(id)));
    assert!(!OperatorCommand::Summary.fleet_wide());
}
