//! Bounce intelligence end to end: mail leaves with signed VERP return paths; later a DSN, a
//! feedback report and an automatic reply for it arrive at Baton's MX listener from another
//! server and land on the right recipient (events, message status, suppression, webhook); a
//! forged return path is kept as unmatched, never applied; a reputation block suppresses
//! nothing; the one-click unsubscribe suppresses in its list's scope only.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::http::{self, get, post};
use common::mx::{FakeMx, Script};
use common::world::World;
use common::{Client, Server, free_port};
use serde_json::{Value, json};

const BOUNCE_DOMAIN: &str = "bounces.sender.test";

/// A world where dest.test's MX takes everything except `blocked*` (a reputation block that
/// says 5.1.1, as some do) and `nobody*` (no such user).
fn world() -> (World, FakeMx) {
    let w = World::new(&["127.0.0.2"]);
    w.dns.mx("dest.test", 10, "mx.dest.test");
    w.dns.a("mx.dest.test", "127.0.0.2");
    let mx = w.mx(
        "127.0.0.2",
        Script {
            rcpt: Arc::new(|rcpt: &str, _| {
                if rcpt.starts_with("blocked") {
                    "550 5.1.1 Service unavailable; client [127.0.0.1] blocked using zen.spamhaus.org".into()
                } else if rcpt.starts_with("nobody") {
                    "550 5.1.1 <nobody@dest.test>: Recipient address rejected: User unknown".into()
                } else {
                    "250 2.1.5 ok".into()
                }
            }),
            ..Script::default()
        },
    );
    (w, mx)
}

fn server(w: &World, hook_port: u16) -> Server {
    w.server(
        "",
        &format!(
            "[bounces]\ndomain = \"{BOUNCE_DOMAIN}\"\nsecret = \"a-long-bounce-signing-secret\"\n\
             unsubscribe_url = \"https://mail.sender.test\"\nlist_unsubscribe_tenants = [\"Beta\"]\n\
             [[webhook]]\nurl = \"http://127.0.0.1:{hook_port}/hook\"\nsecret = \"a-webhook-secret-of-some-length\"\n\
             events = [\"bounce\", \"complaint\", \"auto_reply\", \"unsubscribe\", \"suppression\"]\n"
        ),
    )
}

/// Injects one message per recipient with List-Unsubscribe; their ids.
fn inject(server: &Server, rcpts: &[&str], campaign: &str) -> Value {
    let recipients: Vec<_> = rcpts.iter().map(|r| json!({"email": r})).collect();
    let r = post(
        server.http,
        "/api/v1/inject",
        &json!({
            "envelope_sender": "news@sender.test",
            "content": "From: news@sender.test\r\nSubject: hello\r\n\r\nspring news\r\n",
            "recipients": recipients,
            "campaign": campaign,
            "tenant": "acme",
            "list_unsubscribe": true,
        }),
    );
    assert_eq!(r.status, 202, "{}", r.body);
    r.json()
}

/// What the receiving MX got for `rcpt`: its return path and body.
fn received_for(mx: &FakeMx, rcpt: &str) -> (String, String) {
    let m = mx
        .messages()
        .into_iter()
        .find(|m| m.rcpts.iter().any(|r| r == rcpt))
        .unwrap_or_else(|| panic!("nothing for {rcpt}"));
    (m.mail_from, String::from_utf8_lossy(&m.body).to_string())
}

/// Sends `report` to `to` at Baton's MX listener, from another server (127.0.0.5).
fn report_to(server: &Server, to: &str, report: &str) {
    let mut c = Client::connect_from(server.addr, Ipv4Addr::new(127, 0, 0, 5));
    c.hello();
    let r = c.send_mail("", &[to], report.as_bytes());
    assert_eq!(r.code, 250, "{r:?}");
}

fn dsn(rcpt: &str) -> String {
    format!(
        "From: MAILER-DAEMON@mx.dest.test\r\nTo: {BOUNCE_DOMAIN}\r\nSubject: Undelivered Mail Returned to Sender\r\n\
         MIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=delivery-status; boundary=\"b1\"\r\n\r\n\
         --b1\r\nContent-Type: text/plain\r\n\r\nThe mailbox is gone.\r\n\r\n\
         --b1\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.dest.test\r\n\r\n\
         Final-Recipient: rfc822; {rcpt}\r\nAction: failed\r\nStatus: 5.1.1\r\n\
         Diagnostic-Code: smtp; 550 5.1.1 <{rcpt}>: Recipient address rejected: User unknown in virtual mailbox table\r\n\r\n--b1--\r\n"
    )
}

fn arf(rcpt: &str, return_path: &str) -> String {
    format!(
        "From: fbl@isp.test\r\nTo: fbl@{BOUNCE_DOMAIN}\r\nSubject: FW: spam report\r\nMIME-Version: 1.0\r\n\
         Content-Type: multipart/report; report-type=feedback-report; boundary=\"f1\"\r\n\r\n\
         --f1\r\nContent-Type: text/plain\r\n\r\nThis is an email abuse report.\r\n\r\n\
         --f1\r\nContent-Type: message/feedback-report\r\n\r\nFeedback-Type: abuse\r\nUser-Agent: isp-fbl/1.0\r\n\
         Version: 1\r\nOriginal-Rcpt-To: {rcpt}\r\n\r\n\
         --f1\r\nContent-Type: message/rfc822\r\n\r\nReturn-Path: <{return_path}>\r\nFrom: news@sender.test\r\n\
         To: {rcpt}\r\nSubject: hello\r\n\r\nspring news\r\n\r\n--f1--\r\n"
    )
}

#[test]
fn reports_that_come_back_land_on_their_recipient() {
    let (w, mx) = world();
    let hooks = Hooks::start();
    let server = server(&w, hooks.port);
    let ids = inject(
        &server,
        &["ann@dest.test", "bob@dest.test", "cy@dest.test"],
        "spring",
    );
    let ids: Vec<String> = serde_json::from_value(ids["ids"].clone()).unwrap();
    assert_eq!(
        ids.len(),
        3,
        "one message per recipient with list_unsubscribe"
    );
    mx.wait_for(3, 30);
    let (ann_rp, ann_body) = received_for(&mx, "ann@dest.test");
    let (bob_rp, _) = received_for(&mx, "bob@dest.test");
    let (cy_rp, _) = received_for(&mx, "cy@dest.test");
    for rp in [&ann_rp, &bob_rp, &cy_rp] {
        assert!(
            rp.starts_with("bounces+") && rp.ends_with(&format!("@{BOUNCE_DOMAIN}")),
            "{rp}"
        );
        assert!(rp.split('@').next().unwrap().len() <= 64, "{rp}");
    }
    assert!(
        ann_body.contains("List-Unsubscribe: <https://mail.sender.test/unsubscribe/"),
        "{ann_body}"
    );
    assert!(
        ann_body.contains(&format!("@{BOUNCE_DOMAIN}>")),
        "a mailto too: {ann_body}"
    );
    assert!(ann_body.contains("List-Unsubscribe-Post: List-Unsubscribe=One-Click"));

    // Later, a DSN for ann, a complaint about bob, a vacation reply from cy.
    report_to(&server, &ann_rp, &dsn("ann@dest.test"));
    report_to(
        &server,
        &format!("fbl@{BOUNCE_DOMAIN}"),
        &arf("bob@dest.test", &bob_rp),
    );
    report_to(
        &server,
        &cy_rp,
        "From: cy@dest.test\r\nTo: news@sender.test\r\nSubject: Out of office\r\nAuto-Submitted: auto-replied\r\n\r\nI am away until Monday.\r\n",
    );
    let bounce = server.wait_event(30, |e| {
        e["type"] == "bounce" && e["recipient"] == "ann@dest.test"
    });
    assert_eq!(bounce["async"], true, "{bounce}");
    assert_eq!(bounce["class"], "invalid_recipient");
    assert_eq!(bounce["hard"], true);
    assert_eq!(bounce["message_id"], ids[0].as_str());
    assert_eq!(bounce["campaign"], "spring");
    let complaint = server.wait_event(30, |e| {
        e["type"] == "complaint" && e["recipient"] == "bob@dest.test"
    });
    assert_eq!(complaint["message_id"], ids[1].as_str());
    assert_eq!(complaint["class"], "complaint");
    let reply = server.wait_event(30, |e| {
        e["type"] == "auto_reply" && e["recipient"] == "cy@dest.test"
    });
    assert_eq!(reply["message_id"], ids[2].as_str());

    // The message status shows it, the suppression list holds it in its scope.
    let status = get(server.http, &format!("/api/v1/messages/{}", ids[0])).json();
    let ann = &status["recipients"][0];
    assert_eq!(ann["state"], "bounced", "{status}");
    assert_eq!(ann["class"], "invalid_recipient", "{status}");
    assert_eq!(ann["reports"], json!(["bounce"]), "{status}");
    let list = get(server.http, "/api/v1/suppressions").json();
    let entry = |email: &str| {
        list["suppressions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["email"] == email)
            .cloned()
            .unwrap_or_else(|| panic!("{email} not suppressed: {list}"))
    };
    assert_eq!(entry("ann@dest.test")["reason"], "invalid_recipient");
    assert_eq!(entry("ann@dest.test")["scope"], "global");
    assert_eq!(entry("bob@dest.test")["reason"], "complaint");
    assert_eq!(entry("bob@dest.test")["scope"], "tenant:acme");
    assert!(
        !list.to_string().contains("cy@dest.test"),
        "an automatic reply suppresses nothing: {list}"
    );

    // Stats count what came back, per campaign, and flag the complaint rate (1 in 3 > 0.3%).
    let stats = get(server.http, "/api/v1/stats?by=campaign&since=1h").json();
    let spring = stats["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["key"] == "spring")
        .unwrap_or_else(|| panic!("{stats}"));
    assert_eq!(spring["delivered"], 3, "{stats}");
    assert_eq!(spring["async_bounced"], 1, "{stats}");
    assert_eq!(spring["complaints"], 1, "{stats}");
    assert_eq!(spring["auto_replies"], 1, "{stats}");
    let out = server.cli(&["stats", "--by", "campaign", "--since", "1h"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("COMPLAINTS") && text.contains("33.33%!"),
        "{text}"
    );

    // The webhook saw them.
    let seen = hooks.wait_for(&["bounce", "complaint", "auto_reply"], &server);
    assert!(
        seen.iter()
            .any(|e| e["type"] == "bounce" && e["async"] == true)
    );
}

#[test]
fn a_forged_return_path_is_kept_but_not_applied() {
    let (w, mx) = world();
    let server = server(&w, free_port());
    inject(&server, &["dee@dest.test"], "spring");
    mx.wait_for(1, 30);
    let (rp, _) = received_for(&mx, "dee@dest.test");
    // The same message and recipient, another MAC.
    let (token, _) = rp.split_once('@').unwrap();
    let mut forged = token.to_string();
    let last = forged.pop().unwrap();
    forged.push(if last == '0' { '1' } else { '0' });
    report_to(
        &server,
        &format!("{forged}@{BOUNCE_DOMAIN}"),
        &dsn("dee@dest.test"),
    );
    // A report with no token at all, to a role address.
    report_to(
        &server,
        &format!("postmaster@{BOUNCE_DOMAIN}"),
        "Subject: hi\r\n\r\nhello\r\n",
    );
    let unmatched = server.data_dir().join("returns/unmatched");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::fs::read_dir(&unmatched).map_or(0, |d| d.count()) < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "not kept: {}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !server.events().iter().any(|e| e["type"] == "bounce"),
        "a forged bounce is not applied"
    );
    let list = get(server.http, "/api/v1/suppressions").json();
    assert_eq!(list["suppressions"], json!([]), "{list}");
    let metrics = get(server.http, "/metrics").body;
    assert!(
        metrics.contains("baton_returns_total{result=\"unmatched\"} 2"),
        "{metrics}"
    );
    // Mail Baton only relays (SMTP from a relay client, no tenant) keeps its own sender.
    let mut c = server.connect();
    c.hello();
    let r = c.send_mail(
        "alice@sender.test",
        &["relayed@dest.test"],
        b"Subject: r\r\n\r\nr\r\n",
    );
    assert_eq!(r.code, 250, "{r:?}");
    let (relayed_rp, _) = {
        mx.wait_for(2, 30);
        received_for(&mx, "relayed@dest.test")
    };
    assert_eq!(relayed_rp, "alice@sender.test");
    // Other local parts at the return-path domain are refused at RCPT.
    let mut c = Client::connect_from(server.addr, Ipv4Addr::new(127, 0, 0, 5));
    c.hello();
    assert_eq!(c.cmd("MAIL FROM:<>").code, 250);
    let r = c.cmd(&format!("RCPT TO:<someone@{BOUNCE_DOMAIN}>"));
    assert_eq!(r.code, 550, "{r:?}");
}

#[test]
fn a_reputation_block_suppresses_nothing_but_a_dead_mailbox_does() {
    let (w, _mx) = world();
    let _dsn_mx = w.sender_mx();
    let server = server(&w, free_port());
    inject(
        &server,
        &["blocked@dest.test", "nobody@dest.test"],
        "spring",
    );
    let blocked = server.wait_event(30, |e| {
        e["type"] == "bounce" && e["recipient"] == "blocked@dest.test"
    });
    assert_eq!(blocked["class"], "reputation", "{blocked}");
    assert_eq!(blocked["hard"], false);
    let dead = server.wait_event(30, |e| {
        e["type"] == "bounce" && e["recipient"] == "nobody@dest.test"
    });
    assert_eq!(dead["class"], "invalid_recipient", "{dead}");
    assert_eq!(dead["hard"], true);
    server.wait_event(30, |e| {
        e["type"] == "suppression" && e["recipient"] == "nobody@dest.test"
    });
    let list = get(server.http, "/api/v1/suppressions").json();
    let emails: Vec<&str> = list["suppressions"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["email"].as_str())
        .collect();
    assert_eq!(emails, ["nobody@dest.test"], "{list}");
    let stats = get(server.http, "/api/v1/stats?by=class&since=1h").json();
    let class = |name: &str| {
        stats["groups"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["key"] == name)
            .map(|g| g["bounced"].clone())
    };
    assert_eq!(class("reputation"), Some(json!(1)), "{stats}");
    assert_eq!(class("invalid_recipient"), Some(json!(1)), "{stats}");
    // One class per campaign.
    let reputation = get(
        server.http,
        "/api/v1/stats?by=campaign&class=reputation&since=1h",
    )
    .json();
    let spring = reputation["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["key"] == "spring")
        .unwrap_or_else(|| panic!("{reputation}"));
    assert_eq!(spring["bounced"], 1, "{reputation}");
    assert_eq!(
        reputation["total"]["bounced"], 1,
        "only the reputation block: {reputation}"
    );
    assert_eq!(get(server.http, "/api/v1/stats?class=nonsense").status, 400);
    let metrics = get(server.http, "/metrics").body;
    assert!(metrics.contains("bounce_class=\"reputation\""), "{metrics}");
}

#[test]
fn one_click_unsubscribes_from_its_list_only() {
    let (w, mx) = world();
    let server = server(&w, free_port());
    inject(&server, &["eve@dest.test"], "spring");
    mx.wait_for(1, 30);
    let (_, body) = received_for(&mx, "eve@dest.test");
    let link = body
        .split("https://mail.sender.test")
        .nth(1)
        .and_then(|rest| rest.split('>').next())
        .unwrap_or_else(|| panic!("no link in {body}"))
        .to_string();
    assert!(link.starts_with("/unsubscribe/"), "{link}");
    // A GET only shows the button; a wrong token is refused; no login is needed.
    let page = get(server.http, &link);
    assert_eq!(page.status, 200);
    assert!(server.events().iter().all(|e| e["type"] != "unsubscribe"));
    let bad = http::request(
        server.http,
        None,
        "POST",
        "/unsubscribe/0000019AF3C2D1E4-0-000000000000",
        &[],
        None,
    );
    assert_eq!(bad.status, 404, "{}", bad.body);
    let r = http::request(
        server.http,
        None,
        "POST",
        &link,
        &[],
        Some(b"List-Unsubscribe=One-Click".as_slice()),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    // A second click is answered the same, and counted once.
    let again = http::request(server.http, None, "POST", &link, &[], None);
    assert_eq!(again.status, 200, "{}", again.body);
    let e = server.wait_event(10, |e| {
        e["type"] == "unsubscribe" && e["recipient"] == "eve@dest.test"
    });
    assert_eq!(e["campaign"], "spring");
    // Suppressed for the spring list only.
    let again = inject(&server, &["eve@dest.test"], "spring");
    assert_eq!(again["suppressed"], json!(["eve@dest.test"]), "{again}");
    let other = inject(&server, &["eve@dest.test"], "autumn");
    assert_eq!(other["suppressed"], json!([]), "{other}");
    let unsubscribes = server
        .events()
        .iter()
        .filter(|e| e["type"] == "unsubscribe")
        .count();
    assert_eq!(unsubscribes, 1);
    // Content with its own List-Unsubscribe cannot have Baton's too.
    let own = post(
        server.http,
        "/api/v1/inject",
        &json!({"envelope_sender": "n@sender.test", "recipients": [{"email": "x@dest.test"}],
                "content": "List-Unsubscribe: <mailto:u@sender.test>\r\nSubject: x\r\n\r\nx\r\n",
                "list_unsubscribe": true}),
    );
    assert_eq!(own.status, 400, "{}", own.body);
    let list = get(server.http, "/api/v1/suppressions?scope=list:acme/spring").json();
    assert_eq!(list["suppressions"][0]["reason"], "unsubscribe", "{list}");
    assert_eq!(
        get(server.http, "/api/v1/suppressions?scope=global").json()["suppressions"],
        json!([])
    );
}

#[test]
fn a_tenant_can_have_list_unsubscribe_by_default() {
    let (w, mx) = world();
    let server = server(&w, free_port());
    for (rcpt, tenant, asked) in [
        ("by-default@dest.test", "beta", Value::Null),
        ("declined@dest.test", "beta", json!(false)),
        ("other-tenant@dest.test", "acme", Value::Null),
    ] {
        let mut call = json!({"envelope_sender": "news@sender.test", "tenant": tenant,
            "content": "Subject: x\r\n\r\nx\r\n", "recipients": [{"email": rcpt}]});
        if !asked.is_null() {
            call["list_unsubscribe"] = asked;
        }
        let r = post(server.http, "/api/v1/inject", &call);
        assert_eq!(r.status, 202, "{}", r.body);
    }
    mx.wait_for(3, 30);
    let has_fields = |rcpt: &str| {
        let (_, body) = received_for(&mx, rcpt);
        body.contains("List-Unsubscribe-Post: List-Unsubscribe=One-Click")
    };
    assert!(has_fields("by-default@dest.test"));
    assert!(!has_fields("declined@dest.test"));
    assert!(!has_fields("other-tenant@dest.test"));
}

#[test]
fn the_suppression_api_pages_filters_and_moves_csv() {
    let (w, _mx) = world();
    let server = server(&w, free_port());
    let csv = "email,scope,reason,expires\nu1@x.test,,manual,\n*@dead.test,tenant:acme,bad_domain,\nu2@x.test,list:spring,unsubscribe,30d\n";
    let r = import(&server, csv);
    assert_eq!(r.json()["added"], 3);
    let bad = http::request(
        server.http,
        None,
        "POST",
        "/api/v1/suppressions/import",
        &[],
        Some(b"x@y.test,team:z\n".as_slice()),
    );
    assert_eq!(bad.status, 400, "{}", bad.body);
    let page = get(server.http, "/api/v1/suppressions?limit=2").json();
    assert_eq!(page["suppressions"].as_array().unwrap().len(), 2);
    let next = page["next"].as_str().unwrap().to_string();
    let rest = get(
        server.http,
        &format!(
            "/api/v1/suppressions?limit=2&after={}",
            next.replace('|', "%7C")
                .replace(':', "%3A")
                .replace('@', "%40")
        ),
    )
    .json();
    assert_eq!(rest["suppressions"].as_array().unwrap().len(), 1, "{rest}");
    let domain = get(server.http, "/api/v1/suppressions?reason=bad_domain").json();
    assert_eq!(domain["suppressions"][0]["email"], "@dead.test");
    // The domain entry keeps the tenant's mail from any address there.
    let r = post(
        server.http,
        "/api/v1/inject",
        &json!({"envelope_sender": "n@sender.test", "content": "Subject: x\r\n\r\nx\r\n",
                "recipients": [{"email": "anyone@dead.test"}, {"email": "u1@x.test"}], "tenant": "acme"}),
    );
    assert_eq!(
        r.json()["suppressed"],
        json!(["anyone@dead.test", "u1@x.test"]),
        "{}",
        r.body
    );
    let export = get(server.http, "/api/v1/suppressions?format=csv");
    assert!(export.headers.to_ascii_lowercase().contains("text/csv"));
    assert_eq!(export.body.lines().count(), 4, "{}", export.body);
    let r = http::request(
        server.http,
        None,
        "DELETE",
        "/api/v1/suppressions/%40dead.test?scope=tenant:acme",
        &[],
        None,
    );
    assert_eq!(r.status, 200, "{}", r.body);
}

#[test]
fn smtp_intake_refuses_or_drops_suppressed_recipients_per_scope() {
    let (w, mx) = world();
    let server = server(&w, free_port());
    let csv = "email,scope,reason,expires\ngone@dest.test,,hard_bounce,\nquiet@dest.test,tenant:acme,unsubscribe,\n";
    import(&server, csv);
    let mut c = server.connect();
    c.hello();
    // Globally suppressed: refused at RCPT, saying why.
    assert_eq!(c.cmd("MAIL FROM:<app@sender.test>").code, 250);
    let refused = c.cmd("RCPT TO:<gone@dest.test>");
    assert_eq!(refused.code, 550, "{refused:?}");
    assert!(
        refused.text().contains("5.7.1")
            && refused
                .text()
                .contains("suppression list (global: hard_bounce)"),
        "{refused:?}"
    );
    // The tenant's entry is known once X-Baton-Tenant is read: that recipient is dropped, the
    // other delivered.
    for rcpt in ["quiet@dest.test", "ok@dest.test"] {
        assert_eq!(c.cmd(&format!("RCPT TO:<{rcpt}>")).code, 250);
    }
    assert_eq!(c.cmd("DATA").code, 354);
    c.send(b"X-Baton-Tenant: acme\r\nSubject: one\r\n\r\nhello\r\n.\r\n");
    let accepted = c.reply();
    assert_eq!(accepted.code, 250, "{accepted:?}");
    let id = accepted.queue_id();
    // With only suppressed recipients left, the message itself is refused.
    assert_eq!(c.cmd("MAIL FROM:<app@sender.test>").code, 250);
    assert_eq!(c.cmd("RCPT TO:<quiet@dest.test>").code, 250);
    assert_eq!(c.cmd("DATA").code, 354);
    c.send(b"X-Baton-Tenant: acme\r\nSubject: two\r\n\r\nhello\r\n.\r\n");
    let all_gone = c.reply();
    assert_eq!(all_gone.code, 550, "{all_gone:?}");
    assert!(
        all_gone.text().contains("tenant:acme: unsubscribe"),
        "{all_gone:?}"
    );
    // Another tenant's mail (none here) may still reach the address.
    let free = c.send_mail(
        "app@sender.test",
        &["quiet@dest.test"],
        b"Subject: three\r\n\r\nhi\r\n",
    );
    assert_eq!(free.code, 250, "{free:?}");
    let got = mx.wait_for(2, 20);
    let mut rcpts: Vec<String> = got.iter().flat_map(|m| m.rcpts.clone()).collect();
    rcpts.sort();
    assert_eq!(rcpts, ["ok@dest.test", "quiet@dest.test"], "{got:?}");
    let received: Vec<String> = server
        .events()
        .iter()
        .filter(|e| e["type"] == "reception" && e["message_id"] == id.as_str())
        .map(|e| e["recipient"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(received, ["ok@dest.test"]);
    for rcpt in ["gone@dest.test", "quiet@dest.test"] {
        server.wait_event(10, |e| e["type"] == "suppression" && e["recipient"] == rcpt);
    }
}

/// Imports suppression entries from `csv`; the answer must be 200.
fn import(server: &Server, csv: &str) -> http::Response {
    let r = http::request(
        server.http,
        None,
        "POST",
        "/api/v1/suppressions/import",
        &[],
        Some(csv.as_bytes()),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    r
}

/// A webhook receiver that keeps every event posted to it.
struct Hooks {
    port: u16,
    events: Arc<Mutex<Vec<Value>>>,
}

impl Hooks {
    fn start() -> Hooks {
        let port = free_port();
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind the receiver");
        let events = Arc::new(Mutex::new(Vec::new()));
        let kept = events.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let mut reader = BufReader::new(&stream);
                let mut length = 0;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        break;
                    }
                    let line = line.trim_end();
                    if line.is_empty() {
                        break;
                    }
                    if let Some((name, value)) = line.split_once(':')
                        && name.eq_ignore_ascii_case("content-length")
                    {
                        length = value.trim().parse().unwrap_or(0);
                    }
                }
                let mut body = vec![0; length];
                if reader.read_exact(&mut body).is_ok()
                    && let Ok(batch) = serde_json::from_slice::<Value>(&body)
                {
                    let list = batch.as_array().cloned().unwrap_or_default();
                    kept.lock().unwrap().extend(list);
                }
                let _ = (&stream).write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
            }
        });
        Hooks { port, events }
    }

    /// Waits until an event of each type arrived; all so far.
    fn wait_for(&self, types: &[&str], server: &Server) -> Vec<Value> {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let events = self.events.lock().unwrap().clone();
            if types.iter().all(|t| events.iter().any(|e| e["type"] == *t)) {
                return events;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "webhook got {events:?}\n{}",
                server.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
