//! Test harness: a real `baton serve` process on a loopback port with its own data directory,
//! and a minimal blocking SMTP client over real TCP.

#![allow(dead_code)]

pub mod dns;
pub mod fleet;
pub mod http;
pub mod mx;
pub mod nats;
pub mod pki;
pub mod redis;
pub mod world;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BATON: &str = env!("CARGO_BIN_EXE_baton");

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port")
}

pub struct Server {
    pub child: Option<Child>,
    /// RLIMIT_FSIZE for the server process: files cannot grow past it, as on a full disk.
    pub file_size_limit: Option<u64>,
    pub dir: tempfile::TempDir,
    pub addr: SocketAddr,
    /// The HTTP API (unless the test's own `[http]` section says otherwise).
    pub http: SocketAddr,
    pub config_path: PathBuf,
}

impl Server {
    /// Starts baton with `extra` appended to a config that sets hostname, data_dir and one mx
    /// listener on a free loopback port.
    /// A receiving server: mail is queued and held, never delivered (no DNS, no traffic).
    pub fn start(extra: &str) -> Server {
        Self::start_with(extra, None)
    }

    /// A server that delivers; `extra` must route mail to loopback test hosts only.
    pub fn start_delivering(extra: &str) -> Server {
        Self::start_raw(extra, None)
    }

    /// A delivering server (see [`Server::start_delivering`]) with files limited to
    /// `file_size_limit` bytes (a full disk).
    pub fn start_delivering_with(extra: &str, file_size_limit: Option<u64>) -> Server {
        Self::start_raw(extra, file_size_limit)
    }

    /// A held server (see [`Server::start`]) with files limited to `file_size_limit` bytes.
    pub fn start_with(extra: &str, file_size_limit: Option<u64>) -> Server {
        Self::start_raw(
            &format!("{extra}\n[delivery]\nhold = true\n"),
            file_size_limit,
        )
    }

    fn start_raw(extra: &str, file_size_limit: Option<u64>) -> Server {
        // A safety net: no test may reach the system's resolver (outside loopback). Tests that
        // deliver bring their own [dns] section pointing at a loopback server.
        let extra = if extra.contains("[dns]") {
            extra.to_string()
        } else {
            format!("{extra}\n[dns]\nnameservers = [\"127.0.0.1:9\"]\n")
        };
        // Every server gets its own HTTP API port (the default, 8025, would collide).
        let own_http = extra.split("[http]").nth(1).and_then(|section| {
            let line = section
                .lines()
                .find(|l| l.trim_start().starts_with("address"))?;
            line.split('"').nth(1)?.parse::<SocketAddr>().ok()
        });
        // The ports are picked free, then bound by the server a moment later: another test may
        // take one in between. Then the server exits at start, and it is tried again on others.
        for attempt in 1.. {
            let http =
                own_http.unwrap_or_else(|| format!("127.0.0.1:{}", free_port()).parse().unwrap());
            let with_http = if extra.contains("[http]") {
                extra.clone()
            } else {
                format!("{extra}\n[http]\naddress = \"{http}\"\n")
            };
            let dir = tempfile::tempdir().expect("tempdir");
            let port = free_port();
            let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
            let config = format!(
                "hostname = \"mx.test.example\"\ndata_dir = \"{}\"\n{with_http}\n[[listener]]\naddress = \"{addr}\"\nrole = \"mx\"\n",
                dir.path().join("data").display()
            );
            let config_path = dir.path().join("baton.toml");
            std::fs::write(&config_path, config).unwrap();
            let mut server = Server {
                child: None,
                file_size_limit,
                dir,
                addr,
                http,
                config_path,
            };
            match server.try_spawn() {
                Ok(()) => return server,
                Err(log) if attempt < 3 && log.contains("in use") => continue,
                Err(log) => panic!("{log}"),
            }
        }
        unreachable!("the loop returns or panics")
    }

    pub fn spawn(&mut self) {
        if let Err(why) = self.try_spawn() {
            panic!("{why}");
        }
    }

    /// Starts the server and waits until it listens (it and no other process: a port taken
    /// meanwhile by another test shows as the server's exit); the reason with its log if not.
    fn try_spawn(&mut self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("server.log"))
            .unwrap();
        let mut command = Command::new(BATON);
        command
            .args(["serve", "--config"])
            .arg(&self.config_path)
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(limit) = self.file_size_limit {
            use std::os::unix::process::CommandExt;
            // SAFETY: only async-signal-safe calls between fork and exec. SIG_IGN survives exec,
            // so writes past the limit fail with EFBIG instead of killing the server.
            unsafe {
                command.pre_exec(move || {
                    let rl = libc::rlimit {
                        rlim_cur: limit,
                        rlim_max: limit,
                    };
                    libc::setrlimit(libc::RLIMIT_FSIZE, &rl);
                    libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                    Ok(())
                });
            }
        }
        let child = command.spawn().expect("spawn baton");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                return Err(format!("baton exited at start ({status}):\n{}", self.log()));
            }
            // Accepting, and this server says it listens there: not another that took the port.
            let ours = format!("listening address={}", self.addr);
            if TcpStream::connect(self.addr).is_ok() && self.log().contains(&ours) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!("baton did not listen:\n{}", self.log()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, and the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("server running");
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        c.wait().expect("wait for baton")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// SIGKILL, as a crash would.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn connect(&self) -> Client {
        Client::connect(self.addr)
    }

    /// Runs `baton ARGS --config <this server's config>`.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(BATON)
            .args(args)
            .arg("--config")
            .arg(&self.config_path)
            .output()
            .expect("run baton")
    }

    pub fn queue_json(&self) -> serde_json::Value {
        let out = self.cli(&["queue", "list", "--json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("queue list --json")
    }

    pub fn queued_ids(&self) -> Vec<String> {
        self.queue_json()
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_string())
            .collect()
    }

    pub fn message_json(&self, id: &str) -> serde_json::Value {
        let out = self.cli(&["queue", "show", id, "--json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    pub fn body(&self, id: &str) -> Vec<u8> {
        let out = self.cli(&["queue", "show", id, "--body"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// Every event in the server's event log (all its files, oldest first).
    pub fn events(&self) -> Vec<serde_json::Value> {
        let dir = self.data_dir().join("events");
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| {
                        p.file_name()
                            .is_some_and(|n| n.to_string_lossy().starts_with("events-"))
                    })
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        files
            .iter()
            .flat_map(|f| {
                std::fs::read_to_string(f)
                    .unwrap_or_default()
                    .lines()
                    .filter_map(|l| serde_json::from_str(l).ok())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Waits (at most `secs`) for an event matching `pred`.
    pub fn wait_event(
        &self,
        secs: u64,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(e) = self.events().into_iter().find(|e| pred(e)) {
                return e;
            }
            assert!(
                Instant::now() < deadline,
                "no such event within {secs} s; events: {:#?}\nlog:\n{}",
                self.events(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Peak resident memory of the server process, in KiB.
    pub fn peak_rss_kb(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The body after baton's own Received: header (the first header field, with its folded lines).
pub fn strip_received(stored: &[u8]) -> &[u8] {
    assert!(
        stored.starts_with(b"Received: "),
        "no Received header first"
    );
    let mut i = 0;
    loop {
        let end = stored[i..].windows(2).position(|w| w == b"\r\n").unwrap() + i + 2;
        i = end;
        if !matches!(stored.get(i), Some(b' ') | Some(b'\t')) {
            return &stored[i..];
        }
    }
}

pub struct Reply {
    pub code: u16,
    pub lines: Vec<String>,
}

impl Reply {
    pub fn text(&self) -> String {
        self.lines.join("\n")
    }

    /// The queue id from "250 2.0.0 OK queued as ID".
    pub fn queue_id(&self) -> String {
        let text = self.text();
        let id = text
            .rsplit("queued as ")
            .next()
            .unwrap_or_else(|| panic!("no queue id in {text:?}"));
        id.trim().to_string()
    }
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.code, self.lines.join(" / "))
    }
}

pub struct Client {
    pub reader: BufReader<TcpStream>,
    pub stream: TcpStream,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        Self::from_stream(TcpStream::connect(addr).expect("connect"))
    }

    /// Connects from a chosen loopback source address (e.g. 127.0.0.3).
    pub fn connect_from(addr: SocketAddr, source: Ipv4Addr) -> Client {
        use socket2::{Domain, Socket, Type};
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
        socket
            .bind(&SocketAddr::from((source, 0)).into())
            .expect("bind to a loopback source address");
        socket.connect(&addr.into()).expect("connect");
        Self::from_stream(socket.into())
    }

    fn from_stream(stream: TcpStream) -> Client {
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        Client {
            reader: BufReader::new(stream.try_clone().unwrap()),
            stream,
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("send");
    }

    /// Reads one (possibly multi-line) reply.
    pub fn reply(&mut self) -> Reply {
        self.try_reply().expect("connection closed before a reply")
    }

    pub fn try_reply(&mut self) -> Option<Reply> {
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            match self.reader.read_line(&mut line) {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
            let line = line.trim_end_matches(['\r', '\n']);
            let code: u16 = line.get(..3)?.parse().ok()?;
            let last = line.as_bytes().get(3) != Some(&b'-');
            lines.push(line.get(4..).unwrap_or("").to_string());
            if last {
                return Some(Reply { code, lines });
            }
        }
    }

    pub fn cmd(&mut self, line: &str) -> Reply {
        self.send(format!("{line}\r\n").as_bytes());
        self.reply()
    }

    /// Reads the greeting and says EHLO.
    pub fn hello(&mut self) -> Reply {
        let greeting = self.reply();
        assert_eq!(greeting.code, 220, "{greeting:?}");
        self.cmd("EHLO client.test.example")
    }

    /// A whole transaction; returns the final reply.
    pub fn send_mail(&mut self, from: &str, to: &[&str], body: &[u8]) -> Reply {
        let r = self.cmd(&format!("MAIL FROM:<{from}>"));
        assert_eq!(r.code, 250, "{r:?}");
        for rcpt in to {
            let r = self.cmd(&format!("RCPT TO:<{rcpt}>"));
            assert_eq!(r.code, 250, "{r:?}");
        }
        let r = self.cmd("DATA");
        assert_eq!(r.code, 354, "{r:?}");
        self.send(&dot_stuff(body));
        self.send(b".\r\n");
        self.reply()
    }

    /// True when the server has closed the connection.
    pub fn is_closed(&mut self) -> bool {
        let mut buf = [0u8; 1];
        matches!(self.reader.read(&mut buf), Ok(0) | Err(_))
    }
}

/// Runs `baton check-config FILE`.
pub fn check_config(file: &Path) -> Output {
    Command::new(BATON)
        .arg("check-config")
        .arg(file)
        .output()
        .expect("run baton check-config")
}

/// The Python the tests drive as a peer: `$BATON_PYTHON` (scripts/test sets it to the venv in
/// target/peers/venv, which has dkimpy, PyNaCl and prometheus_client), else `python3`.
pub fn python() -> Command {
    Command::new(std::env::var_os("BATON_PYTHON").unwrap_or_else(|| "python3".into()))
}

/// Runs a Python script with arguments; it must succeed and print one JSON value.
pub fn python_json(script: &str, args: &[&str]) -> serde_json::Value {
    let out = python()
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .expect("python3 (scripts/test installs it)");
    assert!(
        out.status.success(),
        "python failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("python prints JSON")
}

/// Dot-stuffs a CRLF body for DATA; the body must end with CRLF.
pub fn dot_stuff(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 16);
    let mut at_line_start = true;
    for &b in body {
        if at_line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        at_line_start = b == b'\n';
    }
    out
}

pub fn data_dir_size(path: &Path) -> u64 {
    std::fs::read_dir(path)
        .map(|rd| {
            rd.flatten()
                .map(|e| {
                    let m = e.metadata().unwrap();
                    if m.is_dir() {
                        data_dir_size(&e.path())
                    } else {
                        m.len()
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}
