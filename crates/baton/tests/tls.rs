//! Inbound TLS: STARTTLS on mx listeners, implicit TLS on `submissions`, the STARTTLS
//! injection defence, reloading the certificate on SIGHUP, and the relay and smuggling
//! matrices inside TLS. The client is Python's ssl/smtplib (an independent implementation).

mod common;

use std::path::Path;

use common::{Server, free_port};

/// Writes a fresh self-signed certificate for `name` and its key; returns their paths.
fn make_cert(dir: &Path, name: &str) -> (String, String) {
    let certified = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
    let cert = dir.join(format!("{name}.crt"));
    let key = dir.join(format!("{name}.key"));
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
    (cert.display().to_string(), key.display().to_string())
}

fn python(script: &str, args: &[String]) -> serde_json::Value {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    common::python_json(script, &args)
}

const CLIENT: &str = r#"
import json, smtplib, socket, ssl, sys
mode, host, port, source = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
out = {}
if mode == "starttls":
    s = smtplib.SMTP(host, port, source_address=(source, 0))
    s.ehlo("client.test")
    out["offered"] = s.has_extn("starttls")
    code, _ = s.starttls(context=ctx)
    out["starttls"] = code
    out["offered_after"] = s.has_extn("starttls")
    out["cipher"] = s.sock.version()
    out["cert"] = s.sock.getpeercert(binary_form=True).hex()
    out["local"] = s.sendmail("a@example.com", ["b@local.test"], b"Subject: tls\r\n\r\nhi\r\n")
    code, msg = s.mail("a@example.com")
    code, msg = s.rcpt("c@remote.test")
    out["remote_rcpt"] = [code, msg.decode()]
    s.quit()
elif mode == "implicit":
    s = smtplib.SMTP_SSL(host, port, context=ctx)
    s.ehlo("client.test")
    out["offered"] = s.has_extn("starttls")
    out["cipher"] = s.sock.version()
    out["local"] = s.sendmail("a@example.com", ["b@local.test"], b"Subject: 465\r\n\r\nhi\r\n")
    s.quit()
elif mode == "injection":
    raw = socket.create_connection((host, port))
    f = raw.makefile("rb")
    def reply(f):
        lines = []
        while True:
            line = f.readline().decode()
            lines.append(line.strip())
            if line[3:4] != "-":
                return lines
    reply(f)
    raw.sendall(b"EHLO client.test\r\n"); reply(f)
    # STARTTLS and a command in one packet: the command must never run.
    raw.sendall(b"STARTTLS\r\nHELP\r\n")
    out["starttls"] = reply(f)
    t = ctx.wrap_socket(raw)
    tf = t.makefile("rb")
    t.sendall(b"NOOP\r\n")
    out["first_after_tls"] = reply(tf)
    t.close()
elif mode == "smuggle":
    raw = socket.create_connection((host, port))
    f = raw.makefile("rb")
    def reply(f):
        while True:
            line = f.readline().decode()
            if line[3:4] != "-":
                return line.strip()
    reply(f)
    raw.sendall(b"EHLO client.test\r\n"); reply(f)
    raw.sendall(b"STARTTLS\r\n"); reply(f)
    t = ctx.wrap_socket(raw)
    tf = t.makefile("rb")
    t.sendall(b"EHLO client.test\r\n"); reply(tf)
    t.sendall(b"MAIL FROM:<a@example.com>\r\n"); reply(tf)
    t.sendall(b"RCPT TO:<b@local.test>\r\n"); reply(tf)
    t.sendall(b"DATA\r\n"); reply(tf)
    t.sendall(b"x\n.\nMAIL FROM:<evil@example.com>\r\nRCPT TO:<b@local.test>\r\nDATA\r\nevil\r\n.\r\n")
    out["reply"] = reply(tf)
    out["closed"] = tf.readline() == b""
print(json.dumps(out))
"#;

fn tls_server(dir: &Path) -> (Server, u16) {
    let (cert, key) = make_cert(dir, "mx.test.example");
    let implicit_port = free_port();
    let server = Server::start(&format!(
        "[relay]\nlocal_domains = [\"local.test\"]\nnetworks = [\"127.0.0.1/32\"]\n[local]\nusers = [\"b\"]\n\
         [[listener]]\naddress = \"127.0.0.1:{implicit_port}\"\nrole = \"submissions\"\ntls_cert = \"{cert}\"\ntls_key = \"{key}\"\ntrust_networks = true\n\
         [[listener]]\naddress = \"127.0.0.1:{mx_port}\"\nrole = \"mx\"\ntls_cert = \"{cert}\"\ntls_key = \"{key}\"\n",
        mx_port = free_port()
    ));
    (server, implicit_port)
}

#[test]
fn starttls_implicit_tls_and_the_relay_matrix_inside_tls() {
    let dir = tempfile::tempdir().unwrap();
    let (server, implicit) = tls_server(dir.path());
    let mx_port = tls_mx_port(&server, implicit);
    let r = python(
        CLIENT,
        &[
            "starttls".into(),
            "127.0.0.1".into(),
            mx_port.to_string(),
            "127.0.0.3".into(),
        ],
    );
    assert_eq!(r["offered"], true);
    assert_eq!(r["starttls"], 220);
    assert_eq!(r["offered_after"], false, "no STARTTLS inside TLS");
    assert!(r["cipher"].as_str().unwrap().starts_with("TLSv1."), "{r}");
    assert_eq!(r["local"], serde_json::json!({}));
    assert_eq!(
        r["remote_rcpt"][0], 554,
        "untrusted client, remote domain, TLS or not: {r}"
    );
    let ids = server.queued_ids();
    assert_eq!(ids.len(), 1);
    let received = String::from_utf8_lossy(&server.body(&ids[0])).to_string();
    assert!(
        received.contains("with ESMTPS id") && received.contains("(using TLSv1_"),
        "{received}"
    );

    let r = python(
        CLIENT,
        &[
            "implicit".into(),
            "127.0.0.1".into(),
            implicit.to_string(),
            "127.0.0.1".into(),
        ],
    );
    assert_eq!(r["offered"], false);
    assert_eq!(r["local"], serde_json::json!({}));
    assert_eq!(server.queued_ids().len(), 2);
}

#[test]
fn commands_pipelined_after_starttls_are_discarded() {
    let dir = tempfile::tempdir().unwrap();
    let (server, implicit) = tls_server(dir.path());
    let mx_port = tls_mx_port(&server, implicit);
    let r = python(
        CLIENT,
        &[
            "injection".into(),
            "127.0.0.1".into(),
            mx_port.to_string(),
            "127.0.0.1".into(),
        ],
    );
    assert_eq!(r["starttls"][0], "220 2.0.0 Ready to start TLS");
    assert_eq!(
        r["first_after_tls"][0], "250 2.0.0 Ok",
        "the injected HELP must not run: {r}"
    );
}

#[test]
fn smuggling_is_refused_inside_tls_too() {
    let dir = tempfile::tempdir().unwrap();
    let (server, implicit) = tls_server(dir.path());
    let mx_port = tls_mx_port(&server, implicit);
    let r = python(
        CLIENT,
        &[
            "smuggle".into(),
            "127.0.0.1".into(),
            mx_port.to_string(),
            "127.0.0.1".into(),
        ],
    );
    assert!(r["reply"].as_str().unwrap().starts_with("550 5.5.2"), "{r}");
    assert_eq!(r["closed"], true);
    assert!(server.queued_ids().is_empty());
}

#[test]
fn sighup_reloads_the_certificate_without_dropping_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let (server, implicit) = tls_server(dir.path());
    let mx_port = tls_mx_port(&server, implicit);
    let args = |p: u16| {
        vec![
            "starttls".to_string(),
            "127.0.0.1".into(),
            p.to_string(),
            "127.0.0.1".into(),
        ]
    };
    let before = python(CLIENT, &args(mx_port))["cert"].clone();
    // An idle plain session stays open across the reload.
    let mut idle = server.connect();
    idle.hello();
    // New files in place, then SIGHUP.
    let (cert, key) = make_cert(dir.path(), "other.test.example");
    std::fs::copy(&cert, dir.path().join("mx.test.example.crt")).unwrap();
    std::fs::copy(&key, dir.path().join("mx.test.example.key")).unwrap();
    unsafe {
        libc::kill(server.pid() as i32, libc::SIGHUP);
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !server.log().contains("TLS certificate reloaded") {
        assert!(
            std::time::Instant::now() < deadline,
            "no reload:\n{}",
            server.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let after = python(CLIENT, &args(mx_port))["cert"].clone();
    assert_ne!(before, after, "the new certificate is served");
    assert_eq!(idle.cmd("NOOP").code, 250, "sessions survive the reload");
}

#[test]
fn check_config_reports_unusable_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(dir.path().join("bad.pem"), "not a certificate").unwrap();
    std::fs::write(
        &cfg,
        format!(
            "[[listener]]\naddress = \"127.0.0.1:2465\"\nrole = \"submissions\"\ntls_cert = \"{0}/bad.pem\"\ntls_key = \"{0}/bad.pem\"\n\
             [[listener]]\naddress = \"127.0.0.1:2466\"\nrole = \"submissions\"\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let out = common::check_config(&cfg);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 4:") && err.contains("bad.pem"), "{err}");
    assert!(
        err.contains("line 8:") && err.contains("needs tls_cert"),
        "{err}"
    );
}

/// The port of the TLS mx listener (the harness's own listener has no TLS: STARTTLS gets 502).
/// The harness's listener may answer before the others are logged: the log is read again
/// until the line is there.
fn tls_mx_port(server: &Server, implicit: u16) -> u16 {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let found = server
            .log()
            .lines()
            .filter(|l| l.contains("listening") && l.contains("tls=true"))
            .filter_map(|l| l.split("address=127.0.0.1:").nth(1))
            .filter_map(|p| p.split_whitespace().next())
            .map(|p| p.parse::<u16>().unwrap())
            .find(|&p| p != implicit);
        if let Some(port) = found {
            return port;
        }
        assert!(std::time::Instant::now() < deadline, "the TLS mx listener");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn a_client_connecting_by_ip_literal_is_not_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let (server, implicit) = tls_server(dir.path());
    let mx_port = tls_mx_port(&server, implicit);
    // openssl s_client sends the IP literal as SNI, as many clients do.
    let out = std::process::Command::new("openssl")
        .args([
            "s_client",
            "-starttls",
            "smtp",
            "-quiet",
            "-servername",
            "127.0.0.1",
        ])
        .arg("-connect")
        .arg(format!("127.0.0.1:{mx_port}"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(b"EHLO c.test\r\nQUIT\r\n")?;
            child.wait_with_output()
        })
        .expect("openssl is needed for this test (scripts/test installs it)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("221"), "the session ran inside TLS: {text}");
    let log = server.log();
    assert!(
        !log.contains("SNI"),
        "an ordinary client is no warning:\n{log}"
    );
}
