//! Independent clients drive the server: swaks and Python's smtplib. They catch what our own
//! test client would agree with.

mod common;

use std::process::Command;

use common::{Server, strip_received};

#[test]
fn swaks_delivers_a_message_with_pipelining() {
    let server = Server::start("");
    let out = Command::new("swaks")
        .args(["--server", &server.addr.ip().to_string()])
        .args(["--port", &server.addr.port().to_string()])
        .args(["--from", "swaks@example.com", "--to", "rcpt@example.net"])
        .args(["--helo", "swaks.test.example", "--pipeline"])
        .args(["--header", "Subject: from swaks"])
        .args(["--body", "Hello from swaks.\n.dotted line\n"])
        .output()
        .expect("swaks is needed for this test (scripts/test installs it)");
    let transcript = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "swaks failed:\n{transcript}");
    let queued = transcript
        .lines()
        .find(|l| l.contains("queued as"))
        .unwrap_or_else(|| panic!("no 'queued as' in:\n{transcript}"));
    let id = queued.rsplit("queued as ").next().unwrap().trim();
    let stored = server.body(id);
    let text = String::from_utf8_lossy(strip_received(&stored)).to_string();
    assert!(text.contains("Subject: from swaks\r\n"), "{text}");
    assert!(text.contains("\r\n.dotted line\r\n"), "{text}");
    let m = server.message_json(id);
    assert_eq!(m["sender"], "swaks@example.com");
    assert_eq!(m["helo"], "swaks.test.example");
}

const SMTPLIB_SCRIPT: &str = r#"
import smtplib, sys, json
from email.message import EmailMessage
host, port = sys.argv[1], int(sys.argv[2])
out = {}
with smtplib.SMTP(host, port) as s:
    code, _ = s.ehlo("python.test.example")
    assert code == 250
    out["features"] = sorted(s.esmtp_features)
    msg = EmailMessage()
    msg["From"] = "jörg@bücher.example"
    msg["To"] = "zoë@example.net"
    msg["Subject"] = "smtplib ünïcode"
    msg.set_content("Grüße\n.line with a dot\n")
    refused = s.send_message(msg, mail_options=["SMTPUTF8"],
                             rcpt_options=["NOTIFY=SUCCESS,FAILURE"])
    out["refused"] = refused
    code, text = s.mail("a@example.com", ["RET=FULL", "ENVID=py1"])
    out["mail"] = code
    code, text = s.rcpt("b@example.net", ["ORCPT=rfc822;b@example.net"])
    out["rcpt"] = code
    code, text = s.data(b"Subject: plain\r\n\r\nbody\r\n")
    out["data"] = [code, text.decode()]
    code, text = s.docmd("VRFY", "b")
    out["vrfy"] = code
print(json.dumps(out))
"#;

#[test]
fn python_smtplib_sends_utf8_and_dsn() {
    let server = Server::start("");
    let out = common::python()
        .args(["-c", SMTPLIB_SCRIPT])
        .arg(server.addr.ip().to_string())
        .arg(server.addr.port().to_string())
        .output()
        .expect("python3 (scripts/test installs it)");
    assert!(
        out.status.success(),
        "smtplib script failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for ext in [
        "pipelining",
        "size",
        "8bitmime",
        "smtputf8",
        "dsn",
        "chunking",
    ] {
        assert!(
            result["features"]
                .as_array()
                .unwrap()
                .iter()
                .any(|f| f == ext),
            "{ext} not seen by smtplib: {result}"
        );
    }
    assert_eq!(result["refused"], serde_json::json!({}));
    assert_eq!(result["mail"], 250);
    assert_eq!(result["rcpt"], 250);
    assert_eq!(result["data"][0], 250);
    assert_eq!(result["vrfy"], 252);
    let plain_id = result["data"][1]
        .as_str()
        .unwrap()
        .rsplit("queued as ")
        .next()
        .unwrap()
        .to_string();
    let m = server.message_json(&plain_id);
    assert_eq!(m["dsn_ret"], "FULL");
    assert_eq!(m["dsn_envid"], "py1");
    assert_eq!(m["recipients"][0]["orcpt"], "b@example.net");

    let all = server.queue_json();
    let utf8 = all
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["smtputf8"] == true)
        .expect("the SMTPUTF8 message");
    assert_eq!(utf8["sender"], "jörg@bücher.example");
    assert_eq!(utf8["recipients"][0]["email"], "zoë@example.net");
    assert_eq!(utf8["recipients"][0]["notify"], 2 | 4);
    let body = server.body(utf8["id"].as_str().unwrap());
    let text = String::from_utf8_lossy(&body);
    assert!(text.contains("\r\n.line with a dot\r\n"), "{text}");
}
