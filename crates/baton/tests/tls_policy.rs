//! Outbound TLS policy: `verify` against a test CA, route overrides, MTA-STS policies served
//! over real HTTPS on loopback, and DANE TLSA records from a DNS server that sets the AD bit.

mod common;

use common::mx::{Script, tls_config};
use common::pki::{HttpsServer, TestCa};
use common::world::{World, event_for, send};

const BODY: &[u8] = b"Subject: policy\r\n\r\nhello\r\n";

fn tls_of(e: &serde_json::Value) -> String {
    e["tls"].as_str().unwrap_or_default().to_string()
}

#[test]
fn verify_delivers_only_where_the_certificate_validates() {
    let w = World::new(&["127.0.0.2", "127.0.0.3"]);
    let ca = TestCa::new("Baton Test CA");
    // good.test: a CA-issued certificate for its MX name.
    w.dns.mx("good.test", 10, "mx.good.test");
    w.dns.a("mx.good.test", "127.0.0.2");
    // wrong.test: the same host under another name: the certificate does not name it.
    w.dns.mx("wrong.test", 10, "mx.wrong.test");
    w.dns.a("mx.wrong.test", "127.0.0.2");
    let good = w.mx(
        "127.0.0.2",
        Script {
            tls: Some(ca.issue(&["mx.good.test"]).server_config()),
            ..Script::default()
        },
    );
    // selfsigned.test: a self-signed certificate; a route lets it through opportunistically.
    w.dns.mx("selfsigned.test", 10, "mx.selfsigned.test");
    w.dns.a("mx.selfsigned.test", "127.0.0.3");
    let selfsigned = w.mx(
        "127.0.0.3",
        Script {
            tls: Some(tls_config("mx.selfsigned.test")),
            ..Script::default()
        },
    );
    let dir = tempfile::tempdir().unwrap();
    let ca_file = ca.write_pem(dir.path());
    let server = w.server(
        &format!(
            "tls = \"verify\"\ntls_ca_file = \"{}\"\n",
            ca_file.display()
        ),
        "[[route]]\ndomain = \"selfsigned.test\"\ntransport = \"mx\"\ntls = \"opportunistic\"\n",
    );

    send(&server, &["a@good.test"], BODY);
    let e = server.wait_event(20, event_for("delivery", "a@good.test"));
    assert!(tls_of(&e).contains("(verified, verify)"), "{e}");

    send(&server, &["b@wrong.test"], BODY);
    let e = server.wait_event(20, event_for("transient_failure", "b@wrong.test"));
    assert_eq!(e["status"], "4.7.5", "{e}");
    assert!(
        e["response"]
            .as_str()
            .unwrap_or("")
            .contains("mx.wrong.test"),
        "{e}"
    );

    send(&server, &["c@selfsigned.test"], BODY);
    let e = server.wait_event(20, event_for("delivery", "c@selfsigned.test"));
    assert!(tls_of(&e).contains("(not verified, route)"), "{e}");

    assert_eq!(good.messages().len(), 1, "only good.test's message");
    assert_eq!(selfsigned.messages().len(), 1);
    assert!(
        good.messages()[0].tls && selfsigned.messages()[0].tls,
        "both inside TLS"
    );
}

const ENFORCE: &str = "version: STSv1\r\nmode: enforce\r\nmx: *.sts.test\r\nmax_age: 86400\r\n";
const TESTING: &str = "version: STSv1\nmode: testing\nmx: mx.lax.test\nmax_age: 600\n";

#[test]
fn mta_sts_enforce_restricts_mx_hosts_and_requires_verified_tls() {
    // .2: a policy-conforming MX; .3: a plaintext MX; .4/.5: the policy web servers.
    let w = World::new(&["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]);
    let ca = TestCa::new("Baton Test CA");
    let https = HttpsServer::start(
        w.listener("127.0.0.4"),
        ca.issue(&["mta-sts.sts.test", "mta-sts.plain-sts.test"])
            .server_config(),
        ENFORCE,
    );
    let lax_https = HttpsServer::start(
        w.listener("127.0.0.5"),
        ca.issue(&["mta-sts.lax.test"]).server_config(),
        TESTING,
    );
    for (domain, ip) in [
        ("sts.test", "127.0.0.4"),
        ("plain-sts.test", "127.0.0.4"),
        ("lax.test", "127.0.0.5"),
    ] {
        w.dns.txt(
            &format!("_mta-sts.{domain}"),
            "v=STSv1; id=20261202T000000;",
        );
        w.dns.a(&format!("mta-sts.{domain}"), ip);
    }
    // sts.test prefers a host its policy does not name; it must never be used.
    w.dns.mx("sts.test", 10, "rogue.elsewhere.test");
    w.dns.a("rogue.elsewhere.test", "127.0.0.3");
    w.dns.mx("sts.test", 20, "mx1.sts.test");
    w.dns.a("mx1.sts.test", "127.0.0.2");
    // plain-sts.test: a named host without STARTTLS: nothing may go in plaintext.
    w.dns.mx("plain-sts.test", 10, "plain.sts.test");
    w.dns.a("plain.sts.test", "127.0.0.3");
    // lax.test: testing mode. Its preferred MX is outside the policy and must still be tried
    // first (testing changes nothing); the named one is a plaintext host, the fallback.
    w.dns.mx("lax.test", 5, "first.elsewhere.test");
    w.dns.a("first.elsewhere.test", "127.0.0.2");
    w.dns.mx("lax.test", 10, "mx.lax.test");
    w.dns.a("mx.lax.test", "127.0.0.3");
    let good = w.mx(
        "127.0.0.2",
        Script {
            tls: Some(ca.issue(&["mx1.sts.test"]).server_config()),
            ..Script::default()
        },
    );
    let plain = w.mx("127.0.0.3", Script::default());
    let dir = tempfile::tempdir().unwrap();
    let server = w.server(
        &format!(
            "tls_ca_file = \"{}\"\nmta_sts_port = {}\n",
            ca.write_pem(dir.path()).display(),
            w.port
        ),
        "",
    );

    for rcpt in ["a@sts.test", "b@sts.test", "c@sts.test"] {
        send(&server, &[rcpt], BODY);
        let e = server.wait_event(20, event_for("delivery", rcpt));
        assert!(tls_of(&e).contains("(verified, mta-sts)"), "{e}");
    }
    assert_eq!(good.messages().len(), 3);
    let fetches: Vec<String> = https.requests.lock().unwrap().clone();
    assert_eq!(
        fetches
            .iter()
            .filter(|r| r.ends_with("host=mta-sts.sts.test"))
            .count(),
        1,
        "one fetch, then the cache: {fetches:?}"
    );
    assert!(fetches[0].starts_with("GET /.well-known/mta-sts.txt HTTP/1.1"));

    send(&server, &["d@plain-sts.test"], BODY);
    let e = server.wait_event(20, event_for("transient_failure", "d@plain-sts.test"));
    assert_eq!(e["status"], "4.7.10", "{e}");

    send(&server, &["e@lax.test"], BODY);
    let e = server.wait_event(20, event_for("delivery", "e@lax.test"));
    // The preferred MX, though outside the policy: testing mode changes no routing.
    assert!(
        tls_of(&e).contains("(not verified, mta-sts testing)"),
        "{e}"
    );
    assert_eq!(good.messages().len(), 4);
    assert_eq!(lax_https.count.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert!(plain.messages().is_empty(), "nothing went in plaintext");
    let cached = std::fs::read_to_string(server.data_dir().join("mta-sts.json")).unwrap();
    assert!(
        cached.contains("\"sts.test\"") && cached.contains("enforce"),
        "{cached}"
    );
}

#[test]
fn mta_sts_policy_served_by_an_untrusted_certificate_is_ignored() {
    let w = World::new(&["127.0.0.2", "127.0.0.4"]);
    // The policy server's certificate is self-signed: the policy must not be believed, so an
    // attacker cannot plant one; delivery stays opportunistic.
    let https = HttpsServer::start(
        w.listener("127.0.0.4"),
        tls_config("mta-sts.fake.test"),
        "version: STSv1\nmode: enforce\nmx: nowhere.test\nmax_age: 86400\n",
    );
    w.dns.txt("_mta-sts.fake.test", "v=STSv1; id=1;");
    w.dns.a("mta-sts.fake.test", "127.0.0.4");
    w.dns.mx("fake.test", 10, "mx.fake.test");
    w.dns.a("mx.fake.test", "127.0.0.2");
    let mx = w.mx("127.0.0.2", Script::default());
    let server = w.server(&format!("mta_sts_port = {}\n", w.port), "");
    send(&server, &["a@fake.test"], BODY);
    server.wait_event(20, event_for("delivery", "a@fake.test"));
    assert_eq!(mx.messages().len(), 1);
    assert_eq!(https.count.load(std::sync::atomic::Ordering::SeqCst), 0);
    // It was tried, and refused for its certificate (not merely never looked up).
    let log = server.log();
    assert!(
        log.contains("MTA-STS policy could not be fetched") && log.contains("mta-sts.fake.test"),
        "{log}"
    );
}

fn sha256(data: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .to_vec()
}

#[test]
fn dane_tlsa_records_authenticate_the_mx_when_dnssec_validated() {
    let w = World::new(&["127.0.0.2", "127.0.0.3", "127.0.0.4"]);
    // Certificates from a CA Baton does not trust: only DANE can vouch for them.
    let ca = TestCa::new("Private CA");
    let cert = ca.issue(&["mx.dane.test"]);
    let mx = w.mx(
        "127.0.0.2",
        Script {
            tls: Some(cert.server_config()),
            ..Script::default()
        },
    );
    let other = ca.issue(&["mx.dane-bad.test"]);
    let bad = w.mx(
        "127.0.0.3",
        Script {
            tls: Some(other.server_config()),
            ..Script::default()
        },
    );
    // A domain whose one MX, `mx.DOMAIN` at `ip`, publishes one TLSA record; `validated`
    // says whether the resolver vouches (AD bit) for the MX set and the TLSA records.
    let dane_domain = |domain: &str, ip: &str, tlsa: (u8, u8, u8, &[u8]), validated: bool| {
        let host = format!("mx.{domain}");
        w.dns.mx(domain, 10, &host);
        w.dns.a(&host, ip);
        let (usage, selector, matching, data) = tlsa;
        w.dns.tlsa(&host, w.port, usage, selector, matching, data);
        if validated {
            w.dns.secure(domain);
            w.dns.secure(&format!("_{}._tcp.{host}", w.port));
        }
    };
    let ee = sha256(&cert.spki);
    // dane.test: DANE-EE(3) SPKI(1) SHA-256(1) of the server's key, validated.
    dane_domain("dane.test", "127.0.0.2", (3, 1, 1, &ee), true);
    // dane-bad.test: validated records that match another key.
    dane_domain("dane-bad.test", "127.0.0.3", (3, 1, 1, &ee), true);
    // insecure.test: the same mismatching records, but nothing validated: DANE does not apply.
    dane_domain("insecure.test", "127.0.0.3", (3, 1, 1, &ee), false);
    // ta.test: DANE-TA(2) full certificate (0) exact match (0) of the private CA, validated;
    // the server's chain must then lead to that CA and name the MX host.
    let ta = w.mx(
        "127.0.0.4",
        Script {
            tls: Some(ca.issue(&["mx.ta.test"]).server_config()),
            ..Script::default()
        },
    );
    dane_domain("ta.test", "127.0.0.4", (2, 0, 0, &ca.der), true);
    let server = w.server("", "");

    send(&server, &["a@dane.test"], BODY);
    let e = server.wait_event(20, event_for("delivery", "a@dane.test"));
    assert!(tls_of(&e).contains("(verified, dane)"), "{e}");

    send(&server, &["b@dane-bad.test"], BODY);
    let e = server.wait_event(20, event_for("transient_failure", "b@dane-bad.test"));
    assert_eq!(e["status"], "4.7.5", "{e}");
    assert!(e["response"].as_str().unwrap_or("").contains("TLSA"), "{e}");

    send(&server, &["c@insecure.test"], BODY);
    let e = server.wait_event(20, event_for("delivery", "c@insecure.test"));
    assert!(tls_of(&e).contains("(not verified, opportunistic)"), "{e}");

    send(&server, &["d@ta.test"], BODY);
    let e = server.wait_event(20, event_for("delivery", "d@ta.test"));
    assert!(tls_of(&e).contains("(verified, dane)"), "{e}");

    assert_eq!(mx.messages().len(), 1);
    assert_eq!(ta.messages().len(), 1);
    assert_eq!(bad.messages().len(), 1, "only insecure.test's message");
}

#[test]
fn check_config_reports_bad_tls_policy_settings() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        "[delivery]\ntls = \"verfy\"\ntls_ca_file = \"/nonexistent/ca.pem\"\nmta_sts_port = 0\n\
         [[route]]\ndomain = \"local.test\"\ntransport = \"local\"\ntls = \"required\"\n",
    )
    .unwrap();
    let out = common::check_config(&cfg);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for expected in [
        "line 2:",
        "unknown tls mode \"verfy\"",
        "line 3:",
        "/nonexistent/ca.pem",
        "line 4:",
        "mta_sts_port",
        "line 8:",
        "tls does not apply to local delivery",
    ] {
        assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
    }
}
