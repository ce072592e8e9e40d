//! A delivery test world: a DNS server, fake MX hosts on 127.0.0.x sharing one port, and a
//! Baton configured to deliver to them.

use super::Server;
use super::dns::DnsServer;
use super::mx::{FakeMx, Script, SharedPort, common_port};

/// The sender's own MX, where DSNs arrive.
pub const SENDER_MX: &str = "127.0.0.9";

pub struct World {
    pub dns: DnsServer,
    pub port: u16,
    shared: SharedPort,
}

impl World {
    /// A DNS server, a port shared by the fake MX hosts on `ips` (plus the sender's MX), and
    /// sender.test's MX record.
    pub fn new(ips: &[&str]) -> World {
        let dns = DnsServer::start();
        let mut all: Vec<&str> = ips.to_vec();
        all.push(SENDER_MX);
        let shared = common_port(&all);
        dns.mx("sender.test", 10, "mx.sender.test");
        dns.a("mx.sender.test", SENDER_MX);
        World {
            dns,
            port: shared.port,
            shared,
        }
    }

    pub fn mx(&self, ip: &str, script: Script) -> FakeMx {
        self.shared.mx(ip, script)
    }

    /// The listener on `ip` at the shared port, for a test's own server there.
    pub fn listener(&self, ip: &str) -> std::net::TcpListener {
        self.shared.listener(ip)
    }

    pub fn sender_mx(&self) -> FakeMx {
        self.mx(SENDER_MX, Script::default())
    }

    /// Baton configured for this world; `delivery` adds keys to [delivery], `extra` whole tables.
    pub fn server(&self, delivery: &str, extra: &str) -> Server {
        self.server_with_limit(delivery, extra, None)
    }

    /// [`World::server`] with its files limited to `file_size_limit` bytes (a full disk).
    pub fn server_with_limit(
        &self,
        delivery: &str,
        extra: &str,
        file_size_limit: Option<u64>,
    ) -> Server {
        // Addresses without a fake MX by now refuse connections, as a host that is down.
        self.shared.release();
        Server::start_delivering_with(
            &format!(
                "{}\n[delivery]\nsmtp_port = {}\nretry_min = \"1s\"\nretry_max = \"2s\"\nidle_timeout = \"1s\"\nconnect_timeout = \"2s\"\n{delivery}\n{extra}\n",
                self.dns.config(),
                self.port
            ),
            file_size_limit,
        )
    }
}

pub fn send(server: &Server, to: &[&str], body: &[u8]) -> String {
    let mut c = server.connect();
    c.hello();
    let r = c.send_mail("alice@sender.test", to, body);
    assert_eq!(r.code, 250, "{r:?}");
    r.queue_id()
}

pub fn event_for<'a>(kind: &'a str, rcpt: &'a str) -> impl Fn(&serde_json::Value) -> bool + 'a {
    move |e| e["type"] == kind && e["recipient"] == rcpt
}

/// A world with one fake MX for `domain` on 127.0.0.2 answering per `script`.
pub fn destination(domain: &str, script: Script) -> (World, FakeMx) {
    let w = World::new(&["127.0.0.2"]);
    w.dns.mx(domain, 10, &format!("mx.{domain}"));
    w.dns.a(&format!("mx.{domain}"), "127.0.0.2");
    let mx = w.mx("127.0.0.2", script);
    (w, mx)
}
