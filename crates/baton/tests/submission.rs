//! Submission (RFC 6409) with AUTH (RFC 4954): users from `baton user add`, AUTH only inside
//! TLS, sender ownership, relay for authenticated users only, failed logins limited. Driven by
//! Python's smtplib.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use common::{BATON, Server, free_port};

fn make_cert(dir: &Path) -> (String, String) {
    let certified = rcgen::generate_simple_self_signed(vec!["mx.test.example".into()]).unwrap();
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
    (cert.display().to_string(), key.display().to_string())
}

fn add_user(config: &Path, name: &str, password: &str) {
    let mut child = Command::new(BATON)
        .args(["user", "add", name, "--config"])
        .arg(config)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{password}\n").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

const CLIENT: &str = r#"
import json, smtplib, ssl, sys
port, step = int(sys.argv[1]), sys.argv[2]
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
out = {}
s = smtplib.SMTP("127.0.0.1", port)
s.ehlo("client.test")
out["auth_before_tls"] = s.has_extn("auth")
code, msg = s.mail("alice@example.com")
out["mail_unauthenticated"] = [code, msg.decode()]
s.rset()
code, msg = s.docmd("AUTH", "PLAIN AGFsaWNlQGV4YW1wbGUuY29tAHNlY3JldA==")
out["auth_plaintext"] = [code, msg.decode()]
s.starttls(context=ctx)
s.ehlo("client.test")
out["auth_after_tls"] = s.esmtp_features.get("auth", "")
try:
    s.login("alice@example.com", "wrong")
except smtplib.SMTPAuthenticationError as e:
    out["bad_login"] = [e.smtp_code, e.smtp_error.decode()]
if step == "full":
    s.login("alice@example.com", "s3cret")
    out["good_login"] = True
    out["own"] = s.sendmail("alice@example.com", ["bob@remote.test"],
        b"From: Alice <alice@example.com>\r\nSubject: hi\r\n\r\nhello\r\n")
    code, msg = s.mail("mallory@elsewhere.test")
    out["foreign_sender"] = [code, msg.decode()]
    s.rset()
    try:
        s.sendmail("alice@example.com", ["bob@remote.test"],
            b"From: Someone Else <boss@elsewhere.test>\r\nSubject: x\r\n\r\ny\r\n")
    except smtplib.SMTPDataError as e:
        out["foreign_from"] = [e.smtp_code, e.smtp_error.decode()]
print(json.dumps(out))
s.quit()
"#;

fn run(port: u16, step: &str) -> serde_json::Value {
    let out = Command::new("python3")
        .args(["-c", CLIENT, &port.to_string(), step])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn authenticated_submission_inside_tls() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = make_cert(dir.path());
    let users = dir.path().join("users");
    let port = free_port();
    // No relay networks at all: only authentication lets mail through.
    let server = Server::start(&format!(
        "[relay]\nlocal_domains = [\"example.com\"]\nnetworks = []\n\
         [submission]\nusers_file = \"{}\"\n\
         [[listener]]\naddress = \"127.0.0.1:{port}\"\nrole = \"submission\"\ntls_cert = \"{cert}\"\ntls_key = \"{key}\"\n",
        users.display()
    ));
    add_user(&server.config_path, "alice@example.com", "s3cret");
    assert!(
        std::fs::read_to_string(&users)
            .unwrap()
            .contains("alice@example.com:$argon2id$")
    );

    let r = run(port, "full");
    assert_eq!(
        r["auth_before_tls"], false,
        "no AUTH offered in plaintext: {r}"
    );
    assert_eq!(r["mail_unauthenticated"][0], 530);
    assert_eq!(r["auth_plaintext"][0], 538, "{r}");
    let mechanisms = r["auth_after_tls"].as_str().unwrap();
    assert!(
        mechanisms.contains("PLAIN") && mechanisms.contains("LOGIN"),
        "{r}"
    );
    assert_eq!(r["bad_login"][0], 535);
    assert_eq!(r["good_login"], true);
    assert_eq!(
        r["own"],
        serde_json::json!({}),
        "relayed as an authenticated user"
    );
    assert_eq!(r["foreign_sender"][0], 553, "{r}");
    let ids = server.queued_ids();
    assert_eq!(ids.len(), 1);
    assert_eq!(r["foreign_from"][0], 550, "{r}");
    let body = String::from_utf8_lossy(&server.body(&ids[0])).to_string();
    assert!(body.contains("with ESMTPSA id"), "{body}");
    // The message had neither Date: nor Message-ID:; submission adds both (RFC 6409 §8).
    assert!(body.contains("\r\nDate: "), "{body}");
    assert!(
        body.contains(&format!("\r\nMessage-ID: <{}@mx.test.example>\r\n", ids[0])),
        "{body}"
    );
}

#[test]
fn failed_logins_are_limited_per_address() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = make_cert(dir.path());
    let users = dir.path().join("users");
    let port = free_port();
    let server = Server::start(&format!(
        "[submission]\nusers_file = \"{}\"\n\
         [[listener]]\naddress = \"127.0.0.1:{port}\"\nrole = \"submission\"\ntls_cert = \"{cert}\"\ntls_key = \"{key}\"\n",
        users.display()
    ));
    add_user(&server.config_path, "alice@example.com", "s3cret");
    // smtplib tries PLAIN, then LOGIN: two failures per run. After five failures the address
    // is turned away before any password is looked at.
    let codes: Vec<u64> = (0..4)
        .map(|_| run(port, "fail")["bad_login"][0].as_u64().unwrap())
        .collect();
    assert_eq!(codes, vec![535, 535, 454, 454], "{codes:?}");
}

#[test]
fn plaintext_auth_on_loopback_only_when_configured() {
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users");
    let port = free_port();
    let server = Server::start(&format!(
        "[submission]\nusers_file = \"{}\"\nplaintext_auth_on_loopback = true\n\
         [[listener]]\naddress = \"127.0.0.1:{port}\"\nrole = \"submission\"\n",
        users.display()
    ));
    add_user(&server.config_path, "carol@example.com", "pw");
    let script = r#"
import smtplib, sys
s = smtplib.SMTP("127.0.0.1", int(sys.argv[1]))
s.ehlo("x")
assert s.has_extn("auth"), "AUTH offered on loopback"
s.login("carol@example.com", "pw")
s.sendmail("carol@example.com", ["dave@remote.test"], b"Subject: x\r\n\r\ny\r\n")
s.quit()
print("ok")
"#;
    let out = Command::new("python3")
        .args(["-c", script, &port.to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(server.queued_ids().len(), 1);
}
