//! A fleet of Baton nodes for the cluster tests: nodes on a shared Redis (one server or a
//! Redis Cluster), a fake MX under a site to cap, and waits on what the fleet shows.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::dns::DnsServer;
use super::http::{get, post};
use super::mx::{FakeMx, Script, common_port};
use super::redis::Store;
use super::{Client, Server};

/// A node named `name` on `redis`, beating every second.
pub fn node(redis: &impl Store, name: &str) -> Server {
    Server::start(&format!(
        "[cluster]\n{}\nnode = \"{name}\"\nheartbeat = 1\n",
        redis.toml()
    ))
}

/// Polls until `ok` holds, `secs` at most; else fails with `why`.
pub fn wait_until(secs: u64, ok: impl Fn() -> bool, why: impl Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !ok() {
        assert!(Instant::now() < deadline, "{}", why());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Polls `GET /api/v1/cluster` on `server` until `ok` holds (20 s at most).
pub fn wait_fleet(server: &Server, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let fleet = get(server.http, "/api/v1/cluster").json();
        if ok(&fleet) {
            return fleet;
        }
        assert!(Instant::now() < deadline, "{what}: {fleet}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn alive(fleet: &Value) -> Vec<String> {
    let mut names: Vec<String> = fleet["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|n| n["alive"] == true)
        .filter_map(|n| n["node"].as_str().map(str::to_string))
        .collect();
    names.sort();
    names
}

pub fn cluster_events(server: &Server) -> Vec<String> {
    server
        .events()
        .iter()
        .filter(|e| e["type"] == "cluster")
        .map(|e| e["response"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// Waits for a `shaping` event about `destination` whose text has `words`.
pub fn wait_shaping(server: &Server, destination: &str, words: &str) {
    server.wait_event(20, |e| {
        e["type"] == "shaping"
            && e["destination"] == destination
            && e["response"].as_str().is_some_and(|r| r.contains(words))
    });
}

/// Adds `email` to `server`'s global suppression list through the API.
pub fn suppress(server: &Server, email: &str) {
    let r = post(
        server.http,
        "/api/v1/suppressions",
        &json!({ "email": email }),
    );
    assert_eq!(r.status, 201, "{}", r.body);
}

/// Polls until RCPT for `rcpt` on `server` gets `code` (20 s at most).
pub fn wait_rcpt(server: &Server, rcpt: &str, code: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut c = server.connect();
        c.hello();
        assert_eq!(c.cmd("MAIL FROM:<app@sender.test>").code, 250);
        let r = c.cmd(&format!("RCPT TO:<{rcpt}>"));
        if r.code == code {
            return;
        }
        assert!(Instant::now() < deadline, "RCPT {rcpt}: {r:?}, not {code}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A fake MX for one.test under the site bigmail.test on 127.0.0.2, holding each DATA reply
/// `hold`; its DNS; and the [delivery] lines and `shaping` for a node.
pub fn bigmail(hold: Duration, shaping: &str) -> (DnsServer, FakeMx, String) {
    let script = Script {
        data_delay: hold,
        ..Script::default()
    };
    bigmail_answering(script, shaping)
}

/// [`bigmail`] with a fake MX answering per `script`.
pub fn bigmail_answering(script: Script, shaping: &str) -> (DnsServer, FakeMx, String) {
    let dns = DnsServer::start();
    let shared = common_port(&["127.0.0.2"]);
    let port = shared.port;
    dns.mx("one.test", 10, "mx1.bigmail.test");
    dns.a("mx1.bigmail.test", "127.0.0.2");
    let mx = shared.mx("127.0.0.2", script);
    let extra = format!(
        "{}\n[delivery]\nsmtp_port = {port}\nretry_min = \"1s\"\nidle_timeout = \"1s\"\n{shaping}\n",
        dns.config()
    );
    (dns, mx, extra)
}

/// Delivering nodes named `names`, up and seeing each other.
pub fn fleet(redis: &impl Store, names: &[&str], extra: &str, lease_ttl: u64) -> Vec<Server> {
    let nodes: Vec<Server> = names
        .iter()
        .map(|n| delivering_node(redis, n, extra, lease_ttl))
        .collect();
    for n in &nodes {
        wait_fleet(n, "all up", |f| alive(f) == names);
    }
    nodes
}

/// Sends `n` messages through each node on `threads` connections each, and waits for them.
pub fn push_all(nodes: &[Server], n: usize, threads: usize) {
    for p in nodes
        .iter()
        .flat_map(|s| push(s, n, threads))
        .collect::<Vec<_>>()
    {
        p.join().unwrap();
    }
}

pub fn site_cap(cap: usize) -> String {
    format!(
        "[[shaping]]\nsite = \"bigmail.test\"\nmax_connections = {cap}\nmax_messages_per_connection = 3\n"
    )
}

pub fn delivering_node(redis: &impl Store, name: &str, extra: &str, lease_ttl: u64) -> Server {
    Server::start_delivering(&format!(
        "{extra}\n[cluster]\n{}\nnode = \"{name}\"\nheartbeat = 1\nlease_ttl = {lease_ttl}\n",
        redis.toml()
    ))
}

/// Sends `n` messages to one.test through `server` on `threads` connections.
pub fn push(server: &Server, n: usize, threads: usize) -> Vec<std::thread::JoinHandle<()>> {
    (0..threads)
        .map(|t| {
            let addr = server.addr;
            std::thread::spawn(move || {
                let mut c = Client::connect(addr);
                c.hello();
                for i in 0..n / threads {
                    let body = format!("Subject: {t}-{i}\r\n\r\nhi\r\n");
                    assert_eq!(
                        c.send_mail("a@sender.test", &["x@one.test"], body.as_bytes())
                            .code,
                        250
                    );
                }
            })
        })
        .collect()
}

/// Suspends `destination` for an hour through `server`'s CLI.
pub fn suspend(server: &Server, destination: &str) {
    let out = server.cli(&["suspend", destination, "--for", "1h"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
