//! A real nats-server (Debian's) with JetStream on a free loopback port, its store in a
//! temporary directory that outlives restarts: the NATS export tests' receiver. Killed when
//! dropped; `stop` and `restart` on the same port and store play an outage. The stream is read
//! back with nats-py, a client independent of Baton's.

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Nats {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

/// One message of a stream, as nats-py reads it.
#[derive(Debug, Clone)]
pub struct Stored {
    pub subject: String,
    pub msg_id: String,
    pub node: String,
    pub event: serde_json::Value,
}

impl Nats {
    pub fn start() -> Nats {
        let mut nats = Nats {
            port: super::free_port(),
            dir: tempfile::tempdir().expect("tempdir"),
            child: None,
        };
        nats.restart();
        nats
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts it (again) on its port and store, and waits until it answers.
    pub fn restart(&mut self) {
        let child = Command::new("nats-server")
            .args(["-js", "-a", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .arg("-sd")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server (scripts/test installs Debian's nats-server)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills it (SIGKILL: an outage); what it stored stays in its store.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Every message in `stream`, oldest first; None while the stream cannot be read (not
    /// made yet, the server starting).
    pub fn messages(&self, stream: &str) -> Option<Vec<Stored>> {
        let out = super::python()
            .arg("-c")
            .arg(READ_STREAM)
            .arg(self.url())
            .arg(stream)
            .output()
            .expect("python3 with nats-py (scripts/test installs it)");
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                !stderr.contains("ModuleNotFoundError"),
                "nats-py is missing (scripts/test installs it; set BATON_PYTHON): {stderr}"
            );
            return None;
        }
        let all: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).ok()?;
        Some(
            all.into_iter()
                .map(|m| Stored {
                    subject: m["subject"].as_str().unwrap_or_default().into(),
                    msg_id: m["headers"]["Nats-Msg-Id"]
                        .as_str()
                        .unwrap_or_default()
                        .into(),
                    node: m["headers"]["Baton-Node"]
                        .as_str()
                        .unwrap_or_default()
                        .into(),
                    event: serde_json::from_str(m["data"].as_str().unwrap_or_default())
                        .unwrap_or_default(),
                })
                .collect(),
        )
    }
}

const READ_STREAM: &str = r#"
import asyncio, json, sys
import nats

async def main(url, stream):
    nc = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=0)
    js = nc.jetstream()
    info = await js.stream_info(stream)
    out = []
    if info.state.messages:
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            m = await js.get_msg(stream, seq)
            out.append({"subject": m.subject, "headers": dict(m.headers or {}),
                        "data": m.data.decode()})
    await nc.close()
    print(json.dumps(out))

asyncio.run(main(sys.argv[1], sys.argv[2]))
"#;

impl Drop for Nats {
    fn drop(&mut self) {
        self.stop();
    }
}
