//! Operator controls on a running server, through the CLI and the control socket: suspend and
//! resume a destination, explain why mail waits, bounce or delete a destination's mail.

mod common;

use std::sync::Arc;

use common::Server;
use common::dns::DnsServer;
use common::mx::{Script, common_port};

fn cli_ok(server: &Server, args: &[&str]) -> serde_json::Value {
    let out = server.cli(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

#[test]
fn suspend_explain_resume_bounce_delete() {
    let dns = DnsServer::start();
    let shared = common_port(&["127.0.0.2", "127.0.0.9"]);
    let port = shared.port;
    dns.mx("ops.test", 10, "mx.ops.test");
    dns.a("mx.ops.test", "127.0.0.2");
    dns.mx("stuck.test", 10, "mx.ops.test");
    dns.mx("sender.test", 10, "mx.sender.test");
    dns.a("mx.sender.test", "127.0.0.9");
    let mx = shared.mx(
        "127.0.0.2",
        Script {
            rcpt: Arc::new(|addr, _| {
                if addr.ends_with("@stuck.test") {
                    "451 4.3.0 not now".into()
                } else {
                    "250 2.1.5 ok".into()
                }
            }),
            ..Script::default()
        },
    );
    let sender_mx = shared.mx("127.0.0.9", Script::default());
    let server = Server::start_delivering(&format!(
        "{}\n[delivery]\nsmtp_port = {port}\nretry_min = \"1h\"\nidle_timeout = \"1s\"\n",
        dns.config()
    ));

    // Suspended: mail waits, and explain says why.
    let out = cli_ok(&server, &["suspend", "ops.test", "--for", "1h"]);
    assert_eq!(out["seconds"], 3600);
    let mut c = server.connect();
    c.hello();
    let id = c
        .send_mail("a@sender.test", &["b@ops.test"], b"Subject: s\r\n\r\nx\r\n")
        .queue_id();
    server.wait_event(10, |e| {
        e["type"] == "held" && e["recipient"] == "b@ops.test"
    });
    let explained = cli_ok(&server, &["queue", "explain", &id, "--json"]);
    let r = &explained["recipients"][0];
    assert_eq!(r["destination"], "ops.test");
    assert!(
        r["shaping"]["operator_suspended_for_s"].as_u64().unwrap() > 3500,
        "{r}"
    );
    assert!(
        r["reasons"][0]
            .as_str()
            .unwrap()
            .starts_with("waiting for its next attempt"),
        "{r}"
    );
    let text = String::from_utf8(server.cli(&["queue", "explain", &id]).stdout).unwrap();
    assert!(text.contains("suspended by the operator"), "{text}");
    let dest = cli_ok(&server, &["queue", "explain", "--destination", "ops.test"]);
    assert_eq!(dest["recipients_waiting"], 1, "{dest}");
    assert!(
        dest["shaping"]["operator_suspended_for_s"]
            .as_u64()
            .unwrap()
            > 3500,
        "{dest}"
    );
    assert!(mx.messages().is_empty());

    // Resumed: it goes at once.
    cli_ok(&server, &["resume", "ops.test"]);
    assert_eq!(mx.wait_for(1, 10).len(), 1, "log:\n{}", server.log());

    // Bounce: deferred mail for stuck.test is returned to its sender now.
    c.send_mail(
        "a@sender.test",
        &["c@stuck.test"],
        b"Subject: b\r\n\r\nx\r\n",
    );
    server.wait_event(10, |e| {
        e["type"] == "transient_failure" && e["recipient"] == "c@stuck.test"
    });
    let out = cli_ok(&server, &["queue", "bounce", "stuck.test"]);
    assert_eq!(out["bounced"], 1);
    let dsn = sender_mx.wait_for(1, 10);
    assert_eq!(dsn.len(), 1);
    assert!(
        String::from_utf8_lossy(&dsn[0].body).contains("Final-Recipient: rfc822; c@stuck.test")
    );

    // Delete: gone without a word to the sender.
    c.send_mail(
        "a@sender.test",
        &["d@stuck.test"],
        b"Subject: d\r\n\r\nx\r\n",
    );
    server.wait_event(10, |e| {
        e["type"] == "transient_failure" && e["recipient"] == "d@stuck.test"
    });
    let out = cli_ok(&server, &["queue", "delete", "stuck.test"]);
    assert_eq!(out["deleted"], 1);
    server.wait_event(5, |e| {
        e["type"] == "deleted" && e["recipient"] == "d@stuck.test"
    });
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(sender_mx.messages().len(), 1, "no DSN for a deletion");
    assert!(server.queued_ids().is_empty(), "{:?}", server.queue_json());

    // Without a running server, the CLI says so.
    drop(server);
}

#[test]
fn control_commands_need_a_running_server() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, format!("data_dir = \"{}\"\n", dir.path().display())).unwrap();
    let out = std::process::Command::new(common::BATON)
        .args(["resume", "x.test", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is `baton serve` running"));
}

#[test]
fn tenants_pick_pools_can_be_suspended_and_mail_can_be_rebound() {
    let dns = DnsServer::start();
    let shared = common_port(&["127.0.0.2"]);
    let port = shared.port;
    dns.mx("dest.test", 10, "mx.dest.test");
    dns.a("mx.dest.test", "127.0.0.2");
    let mx = shared.mx("127.0.0.2", Script::default());
    let mut server = Server::start_delivering(&format!(
        "{}\n[delivery]\nsmtp_port = {port}\nretry_min = \"1h\"\nidle_timeout = \"1s\"\n\
         [[source]]\nname = \"ip10\"\naddress = \"127.0.0.10\"\n\
         [[source]]\nname = \"ip11\"\naddress = \"127.0.0.11\"\n\
         [[pool]]\nname = \"a\"\nsources = [\"ip10\"]\ntenants = [\"acme\"]\n\
         [[pool]]\nname = \"b\"\nsources = [\"ip11\"]\n",
        dns.config()
    ));
    cli_ok(&server, &["suspend", "tenant:acme", "--for", "1h"]);
    let mut c = server.connect();
    c.hello();
    let acme = c
        .send_mail(
            "x@sender.test",
            &["t@dest.test"],
            b"X-Baton-Tenant: ACME\r\nSubject: a\r\n\r\nx\r\n",
        )
        .queue_id();
    let other = c.send_mail(
        "x@sender.test",
        &["u@dest.test"],
        b"Subject: o\r\n\r\nx\r\n",
    );
    assert_eq!(other.code, 250);
    server.wait_event(10, |e| {
        e["type"] == "held" && e["recipient"] == "t@dest.test"
    });
    let got = mx.wait_for(1, 10);
    assert_eq!(got.len(), 1);
    assert_eq!(
        got[0].rcpts,
        vec!["u@dest.test"],
        "other tenants are not held"
    );
    let explained = cli_ok(&server, &["queue", "explain", &acme, "--json"]);
    assert_eq!(explained["tenant"], "acme");
    assert_eq!(explained["recipients"][0]["pool"], "a");
    let reasons = explained["recipients"][0]["reasons"].to_string();
    assert!(reasons.contains("tenant acme is suspended"), "{reasons}");

    // Rebind pool a to pool b; the choice survives a crash.
    let out = cli_ok(&server, &["queue", "rebind", "--from", "a", "--to", "b"]);
    assert_eq!(out["messages"], 1);
    server.kill9();
    server.spawn();
    // The suspension survived the restart too: nothing moves until the operator resumes.
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(mx.messages().len(), 1);
    cli_ok(&server, &["resume", "tenant:acme"]);
    let got = mx.wait_for(2, 20);
    assert_eq!(got.len(), 2, "log:\n{}", server.log());
    let acme_mail = got.iter().find(|m| m.rcpts == vec!["t@dest.test"]).unwrap();
    assert_eq!(acme_mail.peer.to_string(), "127.0.0.11");
    assert!(!String::from_utf8_lossy(&acme_mail.body).contains("X-Baton-Tenant"));
}
