//! Fake receiving servers on 127.0.0.x: real SMTP (or LMTP) over TCP with scripted replies.
//! They record every transaction and count connections, including how many were open at once.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One transaction as the fake server saw it.
#[derive(Debug, Clone)]
pub struct Received {
    pub mail_from: String,
    /// The whole MAIL command line (to check parameters).
    pub mail_line: String,
    pub rcpts: Vec<String>,
    pub rcpt_lines: Vec<String>,
    /// Body as received, after dot-unstuffing (DATA) or as sent (BDAT).
    pub body: Vec<u8>,
    pub via_bdat: bool,
    /// The transaction ran inside TLS (after STARTTLS).
    pub tls: bool,
    /// The user authenticated on this connection, if any.
    pub auth_user: Option<String>,
    /// When the data was complete.
    pub at: Instant,
    /// The client's address and EHLO/HELO name.
    pub peer: std::net::IpAddr,
    pub helo: String,
}

type RcptScript = dyn Fn(&str, usize) -> String + Send + Sync;

/// What the fake server says.
#[derive(Clone)]
pub struct Script {
    pub greeting: String,
    /// EHLO keywords after the first line.
    pub capabilities: Vec<String>,
    /// Reply to MAIL FROM.
    pub mail_reply: String,
    /// Reply to RCPT, given the address and how many times this address was seen before.
    pub rcpt: Arc<RcptScript>,
    pub data_reply: String,
    /// Hold the final reply this long (to keep connections busy).
    pub data_delay: Duration,
    pub lmtp: bool,
    /// Offer STARTTLS with this server configuration.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Offer AUTH PLAIN (inside TLS when TLS is offered) and accept these credentials.
    pub auth: Option<(String, String)>,
    /// Answer EHLO with 500, as an SMTP-only (RFC 821) server does.
    pub no_ehlo: bool,
    /// Drop the connection, without a word, after this many transactions (a server that
    /// closed an idle connection, or restarted).
    pub close_after: Option<usize>,
    /// Drop the connection after answering this many commands (a server that closes after
    /// every command: 1, after EHLO).
    pub close_after_commands: Option<usize>,
    /// Pause this long before each read of at most 8 KiB (a slow reader: 4 ms is ~2 MB/s).
    pub read_pace: Duration,
    /// Answer DATA with 354 even when no RCPT was accepted (as some servers do to a pipelined
    /// DATA), then refuse what comes; the bytes received are kept in `Stats::orphan_data`.
    pub data_without_rcpts: bool,
}

impl Default for Script {
    fn default() -> Self {
        Script {
            greeting: "220 fake.test ESMTP".into(),
            capabilities: [
                "PIPELINING",
                "8BITMIME",
                "SIZE 100000000",
                "ENHANCEDSTATUSCODES",
                "SMTPUTF8",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
            mail_reply: "250 2.1.0 ok".into(),
            rcpt: Arc::new(|_, _| "250 2.1.5 ok".into()),
            data_reply: "250 2.0.0 ok: queued".into(),
            data_delay: Duration::ZERO,
            lmtp: false,
            tls: None,
            auth: None,
            no_ehlo: false,
            close_after: None,
            close_after_commands: None,
            read_pace: Duration::ZERO,
            data_without_rcpts: false,
        }
    }
}

#[derive(Default)]
pub struct Stats {
    pub messages: Vec<Received>,
    pub connections: usize,
    pub active: usize,
    pub max_active: usize,
    pub seen: std::collections::HashMap<String, usize>,
    /// Every RCPT: (address, client address, reply).
    pub rcpt_log: Vec<(String, std::net::IpAddr, String)>,
    /// Sizes of the data received after a DATA with no accepted recipient.
    pub orphan_data: Vec<usize>,
}

pub struct FakeMx {
    pub addr: SocketAddr,
    pub stats: Arc<Mutex<Stats>>,
    stop: Arc<AtomicBool>,
}

impl FakeMx {
    pub fn start(addr: SocketAddr, script: Script) -> FakeMx {
        let listener = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        FakeMx::serve(listener, script)
    }

    /// A fake MX on a listener already bound (see [`SharedPort`]).
    pub fn serve(listener: TcpListener, script: Script) -> FakeMx {
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let stats = Arc::new(Mutex::new(Stats::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (stats.clone(), stop.clone());
        let script = Arc::new(script);
        std::thread::spawn(move || {
            while !sp.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let (st, script) = (st.clone(), script.clone());
                        std::thread::spawn(move || session(stream, st, script));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        FakeMx { addr, stats, stop }
    }

    pub fn messages(&self) -> Vec<Received> {
        self.stats.lock().unwrap().messages.clone()
    }

    pub fn connections(&self) -> usize {
        self.stats.lock().unwrap().connections
    }

    pub fn max_active(&self) -> usize {
        self.stats.lock().unwrap().max_active
    }

    /// Waits until `n` messages have arrived (at most `secs` seconds).
    pub fn wait_for(&self, n: usize, secs: u64) -> Vec<Received> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let m = self.messages();
            if m.len() >= n || Instant::now() > deadline {
                return m;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for FakeMx {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A port listened on at each of some loopback addresses: fake MX hosts share
/// `[delivery] smtp_port`. The listeners are held until a fake MX takes one over, so no other
/// socket can take the port between its choice and the fake MX's bind (CI saw "Address
/// already in use" when the port was chosen, closed, then bound again).
pub struct SharedPort {
    pub port: u16,
    held: Mutex<Vec<TcpListener>>,
}

impl SharedPort {
    /// A fake MX on `ip`: on the listener held for it, or on a new one once released.
    pub fn mx(&self, ip: &str, script: Script) -> FakeMx {
        FakeMx::serve(self.listener(ip), script)
    }

    /// The listener on `ip` and this port: the one held for it, or a new one once released
    /// (for a test's own server).
    pub fn listener(&self, ip: &str) -> TcpListener {
        let addr: SocketAddr = format!("{ip}:{}", self.port).parse().unwrap();
        let mut held = self.held.lock().unwrap();
        match held.iter().position(|l| l.local_addr().ok() == Some(addr)) {
            Some(i) => held.swap_remove(i),
            None => TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}")),
        }
    }

    /// Closes the listeners no fake MX took, so those addresses refuse connections (a
    /// listener nobody accepts on would leave a client waiting for a greeting instead).
    pub fn release(&self) {
        self.held.lock().unwrap().clear();
    }
}

/// A port free on every one of `ips`, listened on at each of them until taken or released.
pub fn common_port(ips: &[&str]) -> SharedPort {
    'search: for _ in 0..200 {
        let port = super::free_port();
        let mut held = Vec::new();
        for ip in ips {
            match TcpListener::bind(format!("{ip}:{port}")) {
                Ok(l) => held.push(l),
                Err(_) => continue 'search,
            }
        }
        let held = Mutex::new(held);
        return SharedPort { port, held };
    }
    panic!("no port free on all of {ips:?}");
}

fn session(stream: TcpStream, stats: Arc<Mutex<Stats>>, script: Arc<Script>) {
    {
        let mut s = stats.lock().unwrap();
        s.connections += 1;
        s.active += 1;
        s.max_active = s.max_active.max(s.active);
    }
    // A session that ends with QUIT stops counting as active when QUIT arrives (see converse).
    if !matches!(converse(stream, &stats, &script), Ok(true)) {
        stats.lock().unwrap().active -= 1;
    }
}

/// The fake server's side of a connection, before or after STARTTLS.
enum Io {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ServerConnection, TcpStream>>),
}

struct Conn {
    io: Io,
    buf: Vec<u8>,
    pace: Duration,
}

impl Conn {
    fn fill(&mut self) -> std::io::Result<usize> {
        if !self.pace.is_zero() {
            std::thread::sleep(self.pace);
        }
        let mut chunk = [0u8; 8192];
        let n = match &mut self.io {
            Io::Plain(s) => s.read(&mut chunk)?,
            Io::Tls(s) => s.read(&mut chunk)?,
        };
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    fn read_line(&mut self) -> std::io::Result<Option<Vec<u8>>> {
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                return Ok(Some(self.buf.drain(..=i).collect()));
            }
            if self.fill()? == 0 {
                return Ok(None);
            }
        }
    }

    fn read_exact(&mut self, n: usize) -> std::io::Result<Vec<u8>> {
        while self.buf.len() < n {
            if self.fill()? == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "eof in BDAT",
                ));
            }
        }
        Ok(self.buf.drain(..n).collect())
    }

    fn say(&mut self, text: &str) -> std::io::Result<()> {
        let bytes = format!("{text}\r\n");
        match &mut self.io {
            Io::Plain(s) => s.write_all(bytes.as_bytes()),
            Io::Tls(s) => s.write_all(bytes.as_bytes()).and_then(|()| s.flush()),
        }
    }

    fn start_tls(self, config: Arc<rustls::ServerConfig>) -> std::io::Result<Conn> {
        let Io::Plain(tcp) = self.io else {
            return Err(std::io::Error::other("TLS already on"));
        };
        let session = rustls::ServerConnection::new(config).map_err(std::io::Error::other)?;
        // Whatever the client sent before the handshake is dropped (CVE-2011-0411).
        Ok(Conn {
            io: Io::Tls(Box::new(rustls::StreamOwned::new(session, tcp))),
            buf: Vec::new(),
            pace: self.pace,
        })
    }
}

/// Returns true if the client said QUIT (and was counted out then).
fn converse(stream: TcpStream, stats: &Mutex<Stats>, script: &Script) -> std::io::Result<bool> {
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let peer = stream.peer_addr()?.ip();
    let mut helo = String::new();
    let mut conn = Conn {
        io: Io::Plain(stream),
        buf: Vec::new(),
        pace: script.read_pace,
    };
    conn.say(&script.greeting)?;
    if !script.greeting.starts_with("220") {
        // A refusing server still answers QUIT, then closes.
        let _ = conn.read_line();
        let _ = conn.say("221 bye");
        return Ok(false);
    }
    let mut tx: Option<Received> = None;
    let mut auth_user: Option<String> = None;
    let mut done = 0;
    let mut commands = 0;
    loop {
        if script.close_after.is_some_and(|n| done >= n)
            || script.close_after_commands.is_some_and(|n| commands >= n)
        {
            return Ok(false);
        }
        let Some(line) = conn.read_line()? else {
            return Ok(false);
        };
        commands += 1;
        let cmd = String::from_utf8_lossy(&line).trim_end().to_string();
        let upper = cmd.to_ascii_uppercase();
        let tls_on = matches!(conn.io, Io::Tls(_));
        if upper.starts_with("EHLO ") || upper.starts_with("HELO ") || upper.starts_with("LHLO ") {
            helo = cmd[5..].trim().to_string();
        }
        if upper.starts_with("EHLO") && script.no_ehlo {
            conn.say("500 5.5.1 command unrecognized")?;
        } else if upper.starts_with("EHLO") || upper.starts_with("LHLO") {
            let mut lines = vec!["fake.test".to_string()];
            lines.extend(script.capabilities.iter().cloned());
            if script.tls.is_some() && !tls_on {
                lines.push("STARTTLS".into());
            }
            if script.auth.is_some() && (tls_on || script.tls.is_none()) {
                lines.push("AUTH PLAIN LOGIN".into());
            }
            let n = lines.len();
            for (i, l) in lines.iter().enumerate() {
                let sep = if i + 1 == n { ' ' } else { '-' };
                conn.say(&format!("250{sep}{l}"))?;
            }
        } else if upper == "STARTTLS" && !tls_on {
            let Some(config) = script.tls.clone() else {
                conn.say("502 5.5.1 no TLS here")?;
                continue;
            };
            conn.say("220 2.0.0 ready to start TLS")?;
            conn = conn.start_tls(config)?;
            tx = None;
        } else if upper.starts_with("AUTH PLAIN ") {
            use base64::Engine;
            let token = cmd[11..].trim();
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(token)
                .unwrap_or_default();
            let parts: Vec<&[u8]> = decoded.split(|&b| b == 0).collect();
            let ok = match (&script.auth, parts.as_slice()) {
                (Some((u, p)), [_, user, pass]) => user == &u.as_bytes() && pass == &p.as_bytes(),
                _ => false,
            };
            if ok {
                auth_user = parts
                    .get(1)
                    .map(|u| String::from_utf8_lossy(u).into_owned());
                conn.say("235 2.7.0 authenticated")?;
            } else {
                conn.say("535 5.7.8 authentication failed")?;
            }
        } else if upper.starts_with("HELO") {
            conn.say("250 fake.test")?;
        } else if upper.starts_with("MAIL FROM:") {
            let from = between(&cmd, '<', '>');
            tx = Some(Received {
                mail_from: from,
                mail_line: cmd.clone(),
                rcpts: vec![],
                rcpt_lines: vec![],
                body: vec![],
                via_bdat: false,
                tls: tls_on,
                auth_user: auth_user.clone(),
                at: Instant::now(),
                peer,
                helo: helo.clone(),
            });
            if !script.mail_reply.starts_with('2') {
                tx = None;
            }
            conn.say(&script.mail_reply)?;
        } else if upper.starts_with("RCPT TO:")
            && tx.is_none()
            && !script.mail_reply.starts_with('2')
        {
            conn.say("503 5.5.1 need MAIL command")?;
        } else if upper.starts_with("RCPT TO:") {
            let addr = between(&cmd, '<', '>');
            let seen = {
                let mut s = stats.lock().unwrap();
                let n = s.seen.entry(addr.clone()).or_insert(0);
                *n += 1;
                *n - 1
            };
            let reply = (script.rcpt)(&addr, seen);
            stats
                .lock()
                .unwrap()
                .rcpt_log
                .push((addr.clone(), peer, reply.clone()));
            if reply.starts_with('2')
                && let Some(t) = tx.as_mut()
            {
                t.rcpts.push(addr);
                t.rcpt_lines.push(cmd.clone());
            }
            conn.say(&reply)?;
        } else if upper == "DATA" {
            if tx.as_ref().is_none_or(|t| t.rcpts.is_empty()) {
                if script.data_without_rcpts {
                    conn.say("354 go ahead")?;
                    let body = read_data(&mut conn)?;
                    stats.lock().unwrap().orphan_data.push(body.len());
                }
                conn.say("554 5.5.1 no valid recipients")?;
                continue;
            }
            conn.say("354 go ahead")?;
            let body = read_data(&mut conn)?;
            finish(&mut conn, stats, script, tx.take(), body, false)?;
            done += 1;
        } else if upper.starts_with("BDAT") {
            let parts: Vec<&str> = cmd.split_whitespace().collect();
            let size: usize = parts.get(1).and_then(|s| s.parse().ok()).unwrap_or(0);
            let chunk = conn.read_exact(size)?;
            let last = parts.get(2).is_some_and(|p| p.eq_ignore_ascii_case("LAST"));
            match tx.as_mut() {
                Some(t) if !t.rcpts.is_empty() => {
                    t.body.extend_from_slice(&chunk);
                    if last {
                        let t = tx.take();
                        let body = t.as_ref().map(|t| t.body.clone()).unwrap_or_default();
                        finish(&mut conn, stats, script, t, body, true)?;
                        done += 1;
                    } else {
                        conn.say("250 2.0.0 chunk ok")?;
                    }
                }
                _ => conn.say("554 5.5.1 no valid recipients")?,
            }
        } else if upper == "RSET" {
            tx = None;
            conn.say("250 2.0.0 ok")?;
        } else if upper == "QUIT" {
            stats.lock().unwrap().active -= 1;
            let _ = conn.say("221 2.0.0 bye");
            return Ok(true);
        } else if upper == "NOOP" {
            conn.say("250 2.0.0 ok")?;
        } else {
            conn.say("502 5.5.2 not implemented")?;
        }
    }
}

fn finish(
    conn: &mut Conn,
    stats: &Mutex<Stats>,
    script: &Script,
    tx: Option<Received>,
    body: Vec<u8>,
    via_bdat: bool,
) -> std::io::Result<()> {
    std::thread::sleep(script.data_delay);
    let Some(mut t) = tx else {
        return conn.say("503 5.5.1 no transaction");
    };
    t.body = body;
    t.via_bdat = via_bdat;
    t.at = Instant::now();
    let n = t.rcpts.len();
    stats.lock().unwrap().messages.push(t);
    let replies = if script.lmtp { n } else { 1 };
    for _ in 0..replies {
        conn.say(&script.data_reply)?;
    }
    Ok(())
}

/// Reads DATA up to CRLF.CRLF, undoing dot-stuffing.
fn read_data(conn: &mut Conn) -> std::io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let Some(line) = conn.read_line()? else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "eof in DATA",
            ));
        };
        if line == b".\r\n" {
            return Ok(body);
        }
        if line.starts_with(b".") {
            body.extend_from_slice(&line[1..]);
        } else {
            body.extend_from_slice(&line);
        }
    }
}

/// A TLS server configuration with a self-signed certificate for `name`, made now (rcgen).
pub fn tls_config(name: &str) -> Arc<rustls::ServerConfig> {
    let certified = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
    let cert = certified.cert.der().clone();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(rustls::pki_types::PrivatePkcs8KeyDer::from(
        certified.signing_key.serialize_der(),
    ));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .unwrap(),
    )
}

fn between(s: &str, open: char, close: char) -> String {
    let start = s.find(open).map(|i| i + 1).unwrap_or(0);
    let end = s[start..].find(close).map(|i| i + start).unwrap_or(s.len());
    s[start..end].to_string()
}
