//! The command line: check-config, serve on embedded defaults, clear errors.

mod common;

use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{BATON, Client, Server};

#[test]
fn check_config_reports_each_error_with_line_and_hint() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "hostname = \"mx.example.com\"\n\n[[listener]]\naddress = \"127.0.0.1\"\nrole = \"relay\"\n\n[relay]\nnetworks = [\"10.0.0.300/8\"]\n",
    )
    .unwrap();
    let out = common::check_config(&bad);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml:line 4:"), "{err}");
    assert!(err.contains("bad.toml:line 5:"), "{err}");
    assert!(err.contains("bad.toml:line 8:"), "{err}");
    assert_eq!(err.matches("hint:").count(), 3, "{err}");
    assert!(err.contains("3 error(s)"), "{err}");

    let typo = dir.path().join("typo.toml");
    std::fs::write(
        &typo,
        "hostname = \"a.example\"\n[relay]\nlocal_domain = [\"x.example\"]\n",
    )
    .unwrap();
    let out = common::check_config(&typo);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("line 3:") && err.contains("local_domain"),
        "{err}"
    );

    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        "hostname = \"mx.example.com\"\ndata_dir = \"/tmp/x\"\n[[listener]]\naddress = \"127.0.0.1:2600\"\nrole = \"mx\"\n[[listener]]\naddress = \"127.0.0.1:2601\"\nrole = \"submission\"\n[relay]\nlocal_domains = [\"example.com\"]\nnetworks = [\"127.0.0.0/8\"]\n",
    )
    .unwrap();
    let out = common::check_config(&good);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("OK (2 listener(s)"));

    let out = common::check_config(&dir.path().join("missing.toml"));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read the file"));
}

#[test]
fn serve_refuses_a_broken_config_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[limits]\nmax_recipients = 0\n").unwrap();
    let out = Command::new(BATON)
        .args(["serve", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("line 2:") && err.contains("at least 1"),
        "{err}"
    );
}

#[test]
fn serve_reports_a_busy_port() {
    let server = Server::start("");
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "data_dir = \"{}\"\n[[listener]]\naddress = \"{}\"\n[http]\nenabled = false\n",
            dir.path().join("d").display(),
            server.addr
        ),
    )
    .unwrap();
    let out = Command::new(BATON)
        .args(["serve", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("cannot listen on {}", server.addr)),
        "{err}"
    );
}

#[test]
fn queue_show_unknown_id_is_a_clear_error() {
    let server = Server::start("");
    let out = server.cli(&["queue", "show", "0000000000000001"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no message 0000000000000001"));
    let out = server.cli(&["queue", "show", "nonsense"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("16 hex digits"));
    let out = server.cli(&["queue", "list"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "Mail queue is empty"
    );
}

#[test]
fn serve_without_config_uses_embedded_defaults() {
    assert!(
        TcpStream::connect("127.0.0.1:2525").is_err(),
        "something else listens on 127.0.0.1:2525; stop it to run this test"
    );
    assert!(
        TcpStream::connect("127.0.0.1:8025").is_err(),
        "something else listens on 127.0.0.1:8025 (the API's default); stop it to run this test"
    );
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(BATON)
        .arg("serve")
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect("127.0.0.1:2525").is_err() {
        assert!(
            Instant::now() < deadline,
            "baton serve did not listen on 127.0.0.1:2525"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The HTTP API is on by default, on loopback.
    let api = common::http::get("127.0.0.1:8025".parse().unwrap(), "/api/v1/queue");
    assert_eq!(api.status, 200, "{}", api.body);
    let mut c = Client::connect("127.0.0.1:2525".parse().unwrap());
    c.hello();
    // A remote recipient is accepted from loopback (relay allowed by default); RSET so that
    // the test causes no delivery attempt (no traffic leaves loopback).
    c.cmd("MAIL FROM:<a@example.com>");
    assert_eq!(
        c.cmd("RCPT TO:<b@remote.example>").code,
        250,
        "loopback clients may relay"
    );
    c.cmd("RSET");
    // Local mail to postmaster@localhost is delivered into a Maildir under ./baton-data.
    let r = c.send_mail(
        "a@example.com",
        &["postmaster@localhost"],
        b"Subject: hi\r\n\r\nhi\r\n",
    );
    assert_eq!(r.code, 250);
    assert!(dir.path().join("baton-data/spool/journal").is_dir());
    let new = dir.path().join("baton-data/mail/postmaster/new");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::read_dir(&new).map(|d| d.count()).unwrap_or(0) == 0 {
        assert!(
            Instant::now() < deadline,
            "no maildir delivery to postmaster"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // SIGTERM stops it cleanly.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let status = child.wait().unwrap();
    assert!(status.success(), "exit status {status}");
    let mut log = String::new();
    use std::io::Read;
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    assert!(log.contains("listening") && log.contains("queued"), "{log}");
}

#[test]
fn sigterm_lets_data_finish_and_tells_idle_clients_421() {
    let mut server = Server::start("");
    let mut idle = server.connect();
    idle.hello();
    let mut busy = server.connect();
    busy.hello();
    busy.cmd("MAIL FROM:<a@example.com>");
    busy.cmd("RCPT TO:<b@example.net>");
    assert_eq!(busy.cmd("DATA").code, 354);
    busy.send(b"Subject: in flight\r\n\r\nfirst half\r\n");
    std::thread::sleep(Duration::from_millis(100));
    let pid = server.pid() as i32;
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    let r = idle.reply();
    assert_eq!((r.code, &r.lines[0][..5]), (421, "4.3.2"), "{r:?}");
    busy.send(b"second half\r\n.\r\n");
    let r = busy.reply();
    assert_eq!(r.code, 250, "the transaction in DATA completes: {r:?}");
    let r = busy.reply();
    assert_eq!(r.code, 421);
    let status = server.terminate();
    assert!(status.success(), "{status}");
}
