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
    python(CLIENT, &[&port.to_string(), step])
}

use common::python_json as python;

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
    let out = common::python()
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

#[test]
fn per_user_message_and_recipient_rates() {
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users");
    let port = free_port();
    let server = Server::start(&format!(
        "[relay]\nnetworks = []\n\
         [submission]\nusers_file = \"{}\"\nplaintext_auth_on_loopback = true\nmessage_rate = \"2/h\"\nrecipient_rate = \"5/h\"\n\
         [[listener]]\naddress = \"127.0.0.1:{port}\"\nrole = \"submission\"\n",
        users.display()
    ));
    add_user(&server.config_path, "carol@example.com", "pw");
    add_user(&server.config_path, "dave@example.com", "pw");
    let script = r#"
import json, smtplib, sys
out = {}
s = smtplib.SMTP("127.0.0.1", int(sys.argv[1]))
s.login("carol@example.com", "pw")
for i in range(2):
    s.sendmail("carol@example.com", ["x@remote.test"], b"Subject: x\r\n\r\ny\r\n")
code, msg = s.mail("carol@example.com")
out["third_message"] = [code, msg.decode()]
s.quit()
s = smtplib.SMTP("127.0.0.1", int(sys.argv[1]))
s.login("dave@example.com", "pw")
rcpts = ["r%d@remote.test" % i for i in range(7)]
refused = s.sendmail("dave@example.com", rcpts, b"Subject: x\r\n\r\ny\r\n")
out["refused"] = {k: [v[0], v[1].decode()] for k, v in refused.items()}
s.quit()
print(json.dumps(out))
"#;
    let r = python(script, &[&port.to_string()]);
    assert_eq!(r["third_message"][0], 450, "{r}");
    assert!(
        r["third_message"][1]
            .as_str()
            .unwrap()
            .contains("4.7.1 Error: message rate limit exceeded for carol@example.com"),
        "{r}"
    );
    let refused = r["refused"].as_object().unwrap();
    let mut refused_rcpts: Vec<&String> = refused.keys().collect();
    refused_rcpts.sort();
    assert_eq!(refused_rcpts, ["r5@remote.test", "r6@remote.test"], "{r}");
    assert!(refused.values().all(|v| v[0] == 450));
    // Carol's two messages and Dave's one (to five recipients) are queued.
    assert_eq!(server.queued_ids().len(), 3);
}

const MATRIX: &str = r#"
import json, smtplib, socket, ssl, sys
port = int(sys.argv[1])
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
out = {}
def reply(f):
    while True:
        line = f.readline().decode()
        if line[3:4] != "-":
            return line.strip()
for source in ["127.0.0.1", "127.0.0.3"]:
    s = smtplib.SMTP("127.0.0.1", port, source_address=(source, 0))
    s.starttls(context=ctx)
    s.ehlo("client.test")
    row = {}
    for rcpt in ["a@example.com", "b@remote.test"]:
        code, _ = s.mail("alice@example.com")
        row["unauthenticated " + rcpt] = code
        s.rset()
    s.login("alice@example.com", "s3cret")
    for rcpt in ["a@example.com", "b@remote.test"]:
        s.mail("alice@example.com")
        code, _ = s.rcpt(rcpt)
        row["authenticated " + rcpt] = code
        s.rset()
    s.quit()
    out[source] = row
# Smuggling inside TLS, after AUTH: a bare-LF "end of data" must not end the message.
raw = socket.create_connection(("127.0.0.1", port))
f = raw.makefile("rb")
reply(f)
raw.sendall(b"EHLO client.test\r\n"); reply(f)
raw.sendall(b"STARTTLS\r\n"); reply(f)
t = ctx.wrap_socket(raw); tf = t.makefile("rb")
t.sendall(b"EHLO client.test\r\n"); reply(tf)
t.sendall(b"AUTH PLAIN AGFsaWNlQGV4YW1wbGUuY29tAHMzY3JldA==\r\n"); out["auth"] = reply(tf)
t.sendall(b"MAIL FROM:<alice@example.com>\r\n"); reply(tf)
t.sendall(b"RCPT TO:<b@remote.test>\r\n"); reply(tf)
t.sendall(b"DATA\r\n"); reply(tf)
t.sendall(b"From: alice@example.com\r\n\r\nx\n.\nMAIL FROM:<alice@example.com>\r\nRCPT TO:<evil@remote.test>\r\nDATA\r\nevil\r\n.\r\n")
out["smuggle"] = reply(tf)
out["closed"] = tf.readline() == b""
print(json.dumps(out))
"#;

/// A submission server with TLS and user alice; 127.0.0.1 is in relay.networks, 127.0.0.3 is
/// not. `listener` adds keys to the submission listener.
fn matrix_server(dir: &std::path::Path, listener: &str) -> (Server, u16) {
    let (cert, key) = make_cert(dir);
    let users = dir.join("users");
    let port = free_port();
    let server = Server::start(&format!(
        "[relay]\nlocal_domains = [\"example.com\"]\nnetworks = [\"127.0.0.1/32\"]\n[local]\nusers = [\"a\"]\n\
         [submission]\nusers_file = \"{}\"\n\
         [[listener]]\naddress = \"127.0.0.1:{port}\"\nrole = \"submission\"\ntls_cert = \"{cert}\"\ntls_key = \"{key}\"\n{listener}\n",
        users.display()
    ));
    add_user(&server.config_path, "alice@example.com", "s3cret");
    (server, port)
}

fn matrix_row(unauthenticated: u16) -> serde_json::Value {
    serde_json::json!({
        "unauthenticated a@example.com": unauthenticated,
        "unauthenticated b@remote.test": unauthenticated,
        "authenticated a@example.com": 250,
        "authenticated b@remote.test": 250,
    })
}

#[test]
fn relay_and_smuggling_matrix_on_submission() {
    let dir = tempfile::tempdir().unwrap();
    // An MSA requires AUTH before MAIL from everyone, trusted network or not (RFC 6409, and
    // Postfix's submission service); once authenticated both relay.
    let (server, port) = matrix_server(dir.path(), "");
    let r = python(MATRIX, &[&port.to_string()]);
    assert_eq!(r["127.0.0.1"], matrix_row(530), "trusted network: {r}");
    assert_eq!(r["127.0.0.3"], matrix_row(530), "untrusted network: {r}");
    assert!(r["auth"].as_str().unwrap().starts_with("235"), "{r}");
    assert!(
        r["smuggle"].as_str().unwrap().starts_with("550 5.5.2"),
        "{r}"
    );
    assert_eq!(r["closed"], true);
    assert!(server.queued_ids().is_empty(), "nothing was queued");
}

#[test]
fn a_submission_listener_may_trust_the_relay_networks_by_opting_in() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, port) = matrix_server(dir.path(), "trust_networks = true");
    let r = python(MATRIX, &[&port.to_string()]);
    assert_eq!(r["127.0.0.1"], matrix_row(250), "trusted network: {r}");
    assert_eq!(r["127.0.0.3"], matrix_row(530), "untrusted network: {r}");
}
