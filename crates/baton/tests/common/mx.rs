//! Fake receiving servers on 127.0.0.x: real SMTP (or LMTP) over TCP with scripted replies.
//! They record every transaction and count connections, including how many were open at once.

use std::io::{BufRead, BufReader, Read, Write};
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
}

type RcptScript = dyn Fn(&str, usize) -> String + Send + Sync;

/// What the fake server says.
#[derive(Clone)]
pub struct Script {
    pub greeting: String,
    /// EHLO keywords after the first line.
    pub capabilities: Vec<String>,
    /// Reply to RCPT, given the address and how many times this address was seen before.
    pub rcpt: Arc<RcptScript>,
    pub data_reply: String,
    /// Hold the final reply this long (to keep connections busy).
    pub data_delay: Duration,
    pub lmtp: bool,
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
            rcpt: Arc::new(|_, _| "250 2.1.5 ok".into()),
            data_reply: "250 2.0.0 ok: queued".into(),
            data_delay: Duration::ZERO,
            lmtp: false,
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
}

pub struct FakeMx {
    pub addr: SocketAddr,
    pub stats: Arc<Mutex<Stats>>,
    stop: Arc<AtomicBool>,
}

impl FakeMx {
    pub fn start(addr: SocketAddr, script: Script) -> FakeMx {
        let listener = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
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

/// A port free on every one of `ips` (fake MX hosts share `[delivery] smtp_port`).
pub fn common_port(ips: &[&str]) -> u16 {
    'search: for _ in 0..200 {
        let port = super::free_port();
        let mut held = Vec::new();
        for ip in ips {
            match TcpListener::bind(format!("{ip}:{port}")) {
                Ok(l) => held.push(l),
                Err(_) => continue 'search,
            }
        }
        return port;
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
    let _ = converse(stream, &stats, &script);
    stats.lock().unwrap().active -= 1;
}

fn converse(stream: TcpStream, stats: &Mutex<Stats>, script: &Script) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut out = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let say = |out: &mut TcpStream, text: &str| out.write_all(format!("{text}\r\n").as_bytes());
    say(&mut out, &script.greeting)?;
    if !script.greeting.starts_with("220") {
        // A refusing server still answers QUIT, then closes.
        let mut line = String::new();
        let _ = reader.read_line(&mut line);
        let _ = say(&mut out, "221 bye");
        return Ok(());
    }
    let mut tx: Option<Received> = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let cmd = line.trim_end().to_string();
        let upper = cmd.to_ascii_uppercase();
        if upper.starts_with("EHLO") || upper.starts_with("LHLO") {
            let mut lines = vec!["fake.test".to_string()];
            lines.extend(script.capabilities.iter().cloned());
            let n = lines.len();
            for (i, l) in lines.iter().enumerate() {
                let sep = if i + 1 == n { ' ' } else { '-' };
                out.write_all(format!("250{sep}{l}\r\n").as_bytes())?;
            }
        } else if upper.starts_with("HELO") {
            say(&mut out, "250 fake.test")?;
        } else if upper.starts_with("MAIL FROM:") {
            let from = between(&cmd, '<', '>');
            tx = Some(Received {
                mail_from: from,
                mail_line: cmd.clone(),
                rcpts: vec![],
                rcpt_lines: vec![],
                body: vec![],
                via_bdat: false,
            });
            say(&mut out, "250 2.1.0 ok")?;
        } else if upper.starts_with("RCPT TO:") {
            let addr = between(&cmd, '<', '>');
            let seen = {
                let mut s = stats.lock().unwrap();
                let n = s.seen.entry(addr.clone()).or_insert(0);
                *n += 1;
                *n - 1
            };
            let reply = (script.rcpt)(&addr, seen);
            if reply.starts_with('2')
                && let Some(t) = tx.as_mut()
            {
                t.rcpts.push(addr);
                t.rcpt_lines.push(cmd.clone());
            }
            say(&mut out, &reply)?;
        } else if upper == "DATA" {
            if tx.as_ref().is_none_or(|t| t.rcpts.is_empty()) {
                say(&mut out, "554 5.5.1 no valid recipients")?;
                continue;
            }
            say(&mut out, "354 go ahead")?;
            let body = read_data(&mut reader)?;
            finish(&mut out, stats, script, tx.take(), body, false)?;
        } else if upper.starts_with("BDAT") {
            let parts: Vec<&str> = cmd.split_whitespace().collect();
            let size: usize = parts.get(1).and_then(|s| s.parse().ok()).unwrap_or(0);
            let mut chunk = vec![0; size];
            reader.read_exact(&mut chunk)?;
            let last = parts.get(2).is_some_and(|p| p.eq_ignore_ascii_case("LAST"));
            match tx.as_mut() {
                Some(t) if !t.rcpts.is_empty() => {
                    t.body.extend_from_slice(&chunk);
                    if last {
                        let t = tx.take();
                        let body = t.as_ref().map(|t| t.body.clone()).unwrap_or_default();
                        finish(&mut out, stats, script, t, body, true)?;
                    } else {
                        say(&mut out, "250 2.0.0 chunk ok")?;
                    }
                }
                _ => say(&mut out, "554 5.5.1 no valid recipients")?,
            }
        } else if upper == "RSET" {
            tx = None;
            say(&mut out, "250 2.0.0 ok")?;
        } else if upper == "QUIT" {
            say(&mut out, "221 2.0.0 bye")?;
            return Ok(());
        } else if upper == "NOOP" {
            say(&mut out, "250 2.0.0 ok")?;
        } else {
            say(&mut out, "502 5.5.2 not implemented")?;
        }
    }
}

fn finish(
    out: &mut TcpStream,
    stats: &Mutex<Stats>,
    script: &Script,
    tx: Option<Received>,
    body: Vec<u8>,
    via_bdat: bool,
) -> std::io::Result<()> {
    std::thread::sleep(script.data_delay);
    let Some(mut t) = tx else {
        return out.write_all(b"503 5.5.1 no transaction\r\n");
    };
    t.body = body;
    t.via_bdat = via_bdat;
    let n = t.rcpts.len();
    stats.lock().unwrap().messages.push(t);
    if script.lmtp {
        for _ in 0..n {
            out.write_all(format!("{}\r\n", script.data_reply).as_bytes())?;
        }
        Ok(())
    } else {
        out.write_all(format!("{}\r\n", script.data_reply).as_bytes())
    }
}

/// Reads DATA up to CRLF.CRLF, undoing dot-stuffing.
fn read_data(reader: &mut BufReader<TcpStream>) -> std::io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let mut line = Vec::new();
        if reader.read_until(b'\n', &mut line)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "eof in DATA",
            ));
        }
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

fn between(s: &str, open: char, close: char) -> String {
    let start = s.find(open).map(|i| i + 1).unwrap_or(0);
    let end = s[start..].find(close).map(|i| i + start).unwrap_or(s.len());
    s[start..end].to_string()
}
