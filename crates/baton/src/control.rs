//! The control socket: `data_dir/control.sock`, one JSON request per line and one JSON answer
//! per line, for the operator commands (`baton suspend`, `baton queue explain`, ...).
//!
//! Owns the socket and the wire format only; the queue manager does the work. The socket is
//! created with mode 0600: whoever may use it may bounce mail.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::net::UnixListener;

use crate::qmgr::{Control, QueueHandle};

pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join("control.sock")
}

/// Serves the control socket until the process ends.
pub fn listen(data_dir: &Path, queue: QueueHandle) -> anyhow::Result<()> {
    let events = data_dir.join("events/events.jsonl");
    let path = socket_path(data_dir);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)
        .with_context(|| format!("cannot create the control socket {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let queue = queue.clone();
            let events = events.clone();
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut lines = tokio::io::BufReader::new(read).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let answer = match serde_json::from_str::<serde_json::Value>(&line) {
                        // Statistics come from the event log, not the queue manager.
                        Ok(request) if request["cmd"] == "stats" => stats(&events, &request).await,
                        Ok(request) => match serde_json::from_value::<Control>(request) {
                            Ok(request) => queue.control(request).await,
                            Err(e) => serde_json::json!({"error": format!("bad request: {e}")}),
                        },
                        Err(e) => serde_json::json!({"error": format!("bad request: {e}")}),
                    };
                    let mut out = answer.to_string();
                    out.push('\n');
                    if write.write_all(out.as_bytes()).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    Ok(())
}

/// Sends one request to a running server and returns its answer.
pub fn request(data_dir: &Path, request: serde_json::Value) -> anyhow::Result<serde_json::Value> {
    let path = socket_path(data_dir);
    let mut stream = std::os::unix::net::UnixStream::connect(&path).with_context(|| {
        format!(
            "cannot reach the server at {} (is `baton serve` running with this config?)",
            path.display()
        )
    })?;
    let mut line = request.to_string();
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    let mut answer = String::new();
    let waiting = Waiting::start();
    BufReader::new(stream).read_line(&mut answer)?;
    drop(waiting);
    let value: serde_json::Value =
        serde_json::from_str(&answer).context("the server's answer is not JSON")?;
    if let Some(e) = value.get("error").and_then(|e| e.as_str()) {
        anyhow::bail!("{e}");
    }
    Ok(value)
}

/// `{"cmd": "stats", "since": ..., "until": ..., "by": ...}`.
async fn stats(events: &Path, request: &serde_json::Value) -> serde_json::Value {
    let time = |name: &str| -> Result<Option<jiff::Timestamp>, String> {
        match request.get(name).and_then(|v| v.as_str()) {
            None => Ok(None),
            Some(text) => baton_events::parse_since(text).map(Some).ok_or_else(|| {
                format!("{name} {text:?} is not an RFC 3339 time or a span like 24h")
            }),
        }
    };
    let (since, until) = match (time("since"), time("until")) {
        (Ok(s), Ok(u)) => (s, u),
        (Err(e), _) | (_, Err(e)) => return serde_json::json!({"error": e}),
    };
    let by = request
        .get("by")
        .and_then(|v| v.as_str())
        .unwrap_or("destination")
        .to_string();
    let path = events.to_path_buf();
    tokio::task::spawn_blocking(move || baton_events::stats(&path, since, until, &by))
        .await
        .unwrap_or_else(|e| serde_json::json!({"error": e.to_string()}))
}

/// While a request runs longer than a second (bouncing a large queue, say), shows how long it
/// has been running on a terminal's standard error; silent when stderr is not a terminal.
struct Waiting {
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
    display: Option<std::thread::JoinHandle<()>>,
}

impl Waiting {
    fn start() -> Waiting {
        use std::io::IsTerminal;
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut display = None;
        if std::io::stderr().is_terminal() {
            let flag = done.clone();
            display = Some(std::thread::spawn(move || {
                let start = std::time::Instant::now();
                let mut shown = false;
                while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                    std::thread::sleep(std::time::Duration::from_millis(250));
                    let secs = start.elapsed().as_secs();
                    if secs >= 1 {
                        eprint!("\rworking… {secs} s");
                        shown = true;
                    }
                }
                if shown {
                    eprint!("\r\x1b[K");
                }
            }));
        }
        Waiting { done, display }
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.done.store(true, std::sync::atomic::Ordering::Relaxed);
        // The display clears its line before the answer is printed.
        if let Some(display) = self.display.take() {
            let _ = display.join();
        }
    }
}
