//! Relay control: trusted/untrusted client × local/remote recipient. Never an open relay.

mod common;

use common::{Client, Server};

const CONFIG: &str = "[relay]\nlocal_domains = [\"local.example\"]\nnetworks = [\"127.0.0.2/32\"]\n[local]\nusers = [\"user\"]";

fn rcpt_from(server: &Server, source: &str, rcpt: &str) -> common::Reply {
    let mut c = Client::connect_from(server.addr, source.parse().unwrap());
    c.hello();
    assert_eq!(c.cmd("MAIL FROM:<sender@elsewhere.example>").code, 250);
    c.cmd(&format!("RCPT TO:<{rcpt}>"))
}

#[test]
fn relay_matrix() {
    let server = Server::start(CONFIG);
    let trusted = "127.0.0.2";
    let untrusted = "127.0.0.3";
    // Local recipients: accepted from anyone (we are their MX).
    assert_eq!(
        rcpt_from(&server, untrusted, "user@local.example").code,
        250
    );
    assert_eq!(
        rcpt_from(&server, untrusted, "user@LOCAL.Example").code,
        250
    );
    assert_eq!(rcpt_from(&server, trusted, "user@local.example").code, 250);
    // Remote recipients: only trusted networks may relay.
    assert_eq!(rcpt_from(&server, trusted, "user@remote.example").code, 250);
    let r = rcpt_from(&server, untrusted, "user@remote.example");
    assert_eq!(
        (r.code, r.text()),
        (
            554,
            "5.7.1 <user@remote.example>: Relay access denied".into()
        )
    );
    // Tricks that must not pass for local: a subdomain, a lookalike, a source route.
    for rcpt in [
        "user@sub.local.example",
        "user@local.example.evil.example",
        "@local.example:user@remote.example",
    ] {
        assert_eq!(rcpt_from(&server, untrusted, rcpt).code, 554, "{rcpt}");
    }
    // Postmaster is always reachable.
    assert_eq!(rcpt_from(&server, untrusted, "postmaster").code, 250);
    assert_eq!(
        rcpt_from(&server, untrusted, "postmaster@local.example").code,
        250
    );
    // Unknown local users are refused at RCPT, from anyone.
    for source in [trusted, untrusted] {
        let r = rcpt_from(&server, source, "nobody@local.example");
        assert_eq!((r.code, &r.text()[..5]), (550, "5.1.1"), "{r:?}");
    }
}

#[test]
fn default_config_relays_for_loopback_only_clients() {
    // The embedded defaults trust 127.0.0.0/8, so every loopback client may relay.
    let server = Server::start("");
    assert_eq!(
        rcpt_from(&server, "127.0.0.9", "user@remote.example").code,
        250
    );
}

#[test]
fn untrusted_client_cannot_queue_mail_for_remote_domains() {
    let server = Server::start(CONFIG);
    let mut c = Client::connect_from(server.addr, "127.0.0.3".parse().unwrap());
    c.hello();
    c.cmd("MAIL FROM:<sender@elsewhere.example>");
    assert_eq!(c.cmd("RCPT TO:<victim@remote.example>").code, 554);
    let r = c.cmd("DATA");
    assert_eq!(r.code, 554, "no valid recipients: {r:?}");
    assert!(server.queued_ids().is_empty());
}
