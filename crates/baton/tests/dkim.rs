//! DKIM signing checked by an independent verifier: dkimpy, with the public keys that
//! `baton dkim keygen` printed supplied as DNS answers.

mod common;

use std::process::Command;

use common::dns::DnsServer;
use common::mx::{Script, common_port};
use common::{BATON, Server};

fn keygen(dir: &std::path::Path, domain: &str, selector: &str, ed25519: bool) -> (String, String) {
    let key = dir.join(format!("{selector}.{domain}.key"));
    let mut cmd = Command::new(BATON);
    cmd.args(["dkim", "keygen", domain, selector, "--out"])
        .arg(&key);
    if ed25519 {
        cmd.arg("--ed25519");
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let record = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(
        record.starts_with(&format!(
            "{selector}._domainkey.{domain}. IN TXT \"v=DKIM1;"
        )),
        "{record}"
    );
    // The TXT content between the quotes.
    let txt = record.split('"').nth(1).unwrap().to_string();
    (key.display().to_string(), txt)
}

const VERIFY: &str = r#"
import dkim, json, sys
records = json.loads(sys.argv[1])
message = sys.stdin.buffer.read()
def dns(name, timeout=5):
    return records.get(name.decode().rstrip("."), "").encode()
print(json.dumps(dkim.verify(message, dnsfunc=dns)))
"#;

fn dkimpy_verifies(message: &[u8], records: &serde_json::Value) -> bool {
    let out = python_with_input(VERIFY, &records.to_string(), message);
    serde_json::from_slice(&out).unwrap()
}

/// Runs a dkimpy script with `message` on standard input; its standard output.
fn python_with_input(script: &str, arg: &str, message: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut child = common::python()
        .args(["-c", script, arg])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(message).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "dkimpy failed (run the tests with scripts/test: it installs dkimpy in target/peers/venv): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

#[test]
fn rsa_and_ed25519_signatures_verify_with_dkimpy() {
    let dir = tempfile::tempdir().unwrap();
    let (rsa_key, rsa_txt) = keygen(dir.path(), "rsa.test", "s1", false);
    let (ed_key, ed_txt) = keygen(dir.path(), "ed.test", "s2", true);
    assert!(rsa_txt.contains("k=rsa") && ed_txt.contains("k=ed25519"));
    let records = serde_json::json!({
        "s1._domainkey.rsa.test": rsa_txt,
        "s2._domainkey.ed.test": ed_txt,
    });

    let dns = DnsServer::start();
    let shared = common_port(&["127.0.0.2"]);
    let port = shared.port;
    dns.mx("dest.test", 10, "mx.dest.test");
    dns.a("mx.dest.test", "127.0.0.2");
    let mx = shared.mx("127.0.0.2", Script::default());
    let server = Server::start_delivering(&format!(
        "{}\n[delivery]\nsmtp_port = {port}\n\
         [[dkim]]\ndomain = \"rsa.test\"\nselector = \"s1\"\nkey = \"{rsa_key}\"\n\
         [[dkim]]\ndomain = \"ed.test\"\nselector = \"s2\"\nkey = \"{ed_key}\"\n",
        dns.config()
    ));
    let mut c = server.connect();
    c.hello();
    for (from, subject) in [
        ("a@rsa.test", "rsa"),
        ("b@ed.test", "ed25519"),
        ("c@none.test", "unsigned"),
    ] {
        let body = format!(
            "From: Someone <{from}>\r\nTo: x@dest.test\r\nSubject: {subject}\r\nDate: Mon, 1 Dec 2026 10:00:00 +0000\r\nMessage-ID: <{subject}@example>\r\n\r\nBody line one.\r\n.dot line\r\n\r\n\r\n"
        );
        let r = c.send_mail(from, &["x@dest.test"], body.as_bytes());
        assert_eq!(r.code, 250);
    }
    let got = mx.wait_for(3, 20);
    assert_eq!(got.len(), 3, "log:\n{}", server.log());
    for m in &got {
        let text = String::from_utf8_lossy(&m.body).to_string();
        let signed = text.starts_with("DKIM-Signature:");
        match m.mail_from.as_str() {
            "a@rsa.test" => {
                assert!(
                    signed && text.contains("a=rsa-sha256") && text.contains("d=rsa.test"),
                    "{text}"
                );
                assert!(text.contains("c=relaxed/relaxed"), "{text}");
                assert!(
                    dkimpy_verifies(&m.body, &records),
                    "RSA signature rejected:\n{text}"
                );
            }
            "b@ed.test" => {
                assert!(signed && text.contains("a=ed25519-sha256"), "{text}");
                assert!(
                    dkimpy_verifies(&m.body, &records),
                    "Ed25519 signature rejected:\n{text}"
                );
            }
            _ => assert!(!signed, "no key for none.test: {text}"),
        }
    }
    // A tampered message no longer verifies (the check is real).
    let rsa = got.iter().find(|m| m.mail_from == "a@rsa.test").unwrap();
    let tampered = String::from_utf8_lossy(&rsa.body).replace("Body line one", "Body line 1");
    assert!(!dkimpy_verifies(tampered.as_bytes(), &records));
}

#[test]
fn one_click_unsubscribe_fields_are_inside_the_signature() {
    let dir = tempfile::tempdir().unwrap();
    let (key, txt) = keygen(dir.path(), "rsa.test", "s1", false);
    let records = serde_json::json!({ "s1._domainkey.rsa.test": txt });
    let dns = DnsServer::start();
    let shared = common_port(&["127.0.0.2"]);
    let port = shared.port;
    dns.mx("dest.test", 10, "mx.dest.test");
    dns.a("mx.dest.test", "127.0.0.2");
    let mx = shared.mx("127.0.0.2", Script::default());
    let server = Server::start_delivering(&format!(
        "{}\n[delivery]\nsmtp_port = {port}\n\
[bounces]\ndomain = \"bounces.rsa.test\"\nunsubscribe_url = \"https://mail.rsa.test\"\n\
         [[dkim]]\ndomain = \"rsa.test\"\nselector = \"s1\"\nkey = \"{key}\"\n",
        dns.config()
    ));
    let r = common::http::post(
        server.http,
        "/api/v1/inject",
        &serde_json::json!({
            "envelope_sender": "news@rsa.test",
            "content": "From: news@rsa.test\r\nTo: x@dest.test\r\nSubject: news\r\n\r\nhello\r\n",
            "recipients": [{"email": "x@dest.test"}],
            "list_unsubscribe": true,
        }),
    );
    assert_eq!(r.status, 202, "{}", r.body);
    let got = mx.wait_for(1, 20);
    let text = String::from_utf8_lossy(&got[0].body).to_string();
    let signature: String = text
        .split("\r\n")
        .skip_while(|l| !l.starts_with("DKIM-Signature:"))
        .take_while(|l| l.starts_with("DKIM-Signature:") || l.starts_with([' ', '\t']))
        .collect();
    let compact = signature.to_ascii_lowercase().replace([' ', '\t'], "");
    let signed: Vec<&str> = compact
        .split(';')
        .find_map(|tag| tag.strip_prefix("h="))
        .unwrap_or_else(|| panic!("no h= in {signature}"))
        .split(':')
        .collect();
    for field in ["list-unsubscribe", "list-unsubscribe-post"] {
        assert!(signed.contains(&field), "{field} not signed: {signature}");
    }
    assert!(
        text.contains("List-Unsubscribe-Post: List-Unsubscribe=One-Click"),
        "{text}"
    );
    assert!(
        got[0].mail_from.starts_with("bounces+"),
        "VERP: {}",
        got[0].mail_from
    );
    assert!(dkimpy_verifies(&got[0].body, &records), "rejected:\n{text}");
    // Another link in List-Unsubscribe no longer verifies: the field is signed.
    let tampered = text.replacen("/unsubscribe/", "/unsubscribe/x", 1);
    assert!(!dkimpy_verifies(tampered.as_bytes(), &records));
}

#[test]
fn keygen_never_overwrites_and_check_config_reports_bad_keys() {
    let dir = tempfile::tempdir().unwrap();
    keygen(dir.path(), "x.test", "k", true);
    let again = Command::new(BATON)
        .args(["dkim", "keygen", "x.test", "k", "--ed25519", "--out"])
        .arg(dir.path().join("k.x.test.key"))
        .output()
        .unwrap();
    assert!(!again.status.success());
    let cfg = dir.path().join("c.toml");
    std::fs::write(dir.path().join("junk.key"), "junk").unwrap();
    std::fs::write(
        &cfg,
        format!(
            "[[dkim]]\ndomain = \"x.test\"\nselector = \"k\"\nkey = \"{}/junk.key\"\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let out = common::check_config(&cfg);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 4:") && err.contains("junk.key"), "{err}");
}

const SIGN: &str = r#"
import dkim, sys
key = open(sys.argv[1], "rb").read()
message = sys.stdin.buffer.read()
sig = dkim.sign(message, b"s1", b"sender.test", key, include_headers=[b"from", b"to", b"subject"])
sys.stdout.buffer.write(sig + message)
"#;

fn dkimpy_sign(key: &str, message: &[u8]) -> Vec<u8> {
    python_with_input(SIGN, key, message)
}

#[test]
fn inbound_spf_dkim_dmarc_verdicts_in_authentication_results() {
    let dir = tempfile::tempdir().unwrap();
    let (key, txt) = keygen(dir.path(), "sender.test", "s1", false);
    let dns = DnsServer::start();
    dns.txt("s1._domainkey.sender.test", &txt);
    dns.txt("sender.test", "v=spf1 ip4:127.0.0.3 -all");
    dns.txt("_dmarc.sender.test", "v=DMARC1; p=reject");
    let server = Server::start(&format!(
        "{}[inbound]\nauthentication_results = true\n",
        dns.config()
    ));

    // Signed by dkimpy, sent from the address SPF allows, carrying a forged verdict.
    let message = b"From: Alice <alice@sender.test>\r\nTo: bob@local.test\r\nSubject: signed\r\n\r\nHello.\r\n";
    let signed = dkimpy_sign(&key, message);
    let mut forged =
        b"Authentication-Results: mx.test.example; dkim=pass header.d=bank.test\r\n".to_vec();
    forged.extend_from_slice(&signed);
    let mut good = common::Client::connect_from(server.addr, std::net::Ipv4Addr::new(127, 0, 0, 3));
    good.hello();
    let r = good.send_mail("alice@sender.test", &["bob@local.test"], &forged);
    assert_eq!(r.code, 250, "{r:?}");
    let id = r.queue_id();
    // Unsigned, from an address SPF refuses.
    let mut bad = server.connect();
    bad.hello();
    let r = bad.send_mail(
        "alice@sender.test",
        &["bob@local.test"],
        b"From: alice@sender.test\r\nSubject: forged\r\n\r\nx\r\n",
    );
    assert_eq!(r.code, 250, "{r:?}");
    let bad_id = r.queue_id();

    let body = String::from_utf8_lossy(&server.body(&id)).to_string();
    let head = body.split("\r\n\r\n").next().unwrap();
    assert_eq!(
        head.matches("Authentication-Results:").count(),
        1,
        "the forged field is gone, ours is there: {head}"
    );
    assert!(!head.contains("bank.test"), "{head}");
    let ar = head
        .split("Authentication-Results: ")
        .nth(1)
        .unwrap()
        .split("\r\nFrom:")
        .next()
        .unwrap();
    assert!(ar.starts_with("mx.test.example;"), "{ar}");
    for verdict in [
        "dkim=pass",
        "header.i=@sender.test",
        "spf=pass",
        "dmarc=pass",
    ] {
        assert!(
            ar.contains(verdict),
            "missing {verdict} in {ar}\nDNS: {:?}",
            dns.log.lock().unwrap()
        );
    }
    // The signature still verifies after our fields went on top.
    let records = serde_json::json!({ "s1._domainkey.sender.test": txt });
    assert!(dkimpy_verifies(body.as_bytes(), &records));

    let body = String::from_utf8_lossy(&server.body(&bad_id)).to_string();
    for verdict in ["dkim=none", "spf=fail", "dmarc=fail", "policy.dmarc=reject"] {
        assert!(body.contains(verdict), "missing {verdict} in {body}");
    }
}
