//! The control socket: `data_dir/control.sock`, one JSON request per line and one JSON answer
//! per line, for the operator commands (`baton suspend`, `baton queue explain`, ...).
//!
//! Owns the socket and its wire only: a request is an [`OperatorCommand`]'s serde JSON, an
//! answer is the [`Reply`]'s JSON (as the API returns it) or `{"error": "..."}`. The queue
//! manager does the work, except for `stats`, answered here from the event log. The socket is
//! created with mode 0600: whoever may use it may bounce mail.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::net::UnixListener;

use crate::operator::{Answer, ControlError, OperatorCommand, Reply, StatsQuery};
use crate::qmgr::QueueHandle;

pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join("control.sock")
}

/// Serves the control socket until the process ends.
pub fn listen(data_dir: &Path, queue: QueueHandle) -> anyhow::Result<()> {
    let events = data_dir.join("events");
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
                    let answer = match serde_json::from_str::<OperatorCommand>(&line) {
                        // Statistics come from the event log, not the queue manager.
                        Ok(OperatorCommand::Stats(query)) => stats(&events, query).await,
                        Ok(command) => queue.control(command).await,
                        Err(e) => Err(ControlError::new(format!("bad request: {e}"))),
                    };
                    let mut out = match answer {
                        Ok(reply) => serde_json::to_string(&reply),
                        Err(refused) => serde_json::to_string(&refused),
                    }
                    .unwrap_or_else(|e| ControlError::new(e.to_string()).to_json().to_string());
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

/// A connection to a running server's control socket.
pub struct Client {
    stream: UnixStream,
}

impl Client {
    /// Connects to the server that keeps its data in `data_dir`.
    pub fn connect(data_dir: &Path) -> anyhow::Result<Client> {
        let path = socket_path(data_dir);
        let stream = UnixStream::connect(&path).with_context(|| {
            format!(
                "cannot reach the server at {} (is `baton serve` running with this config?)",
                path.display()
            )
        })?;
        Ok(Client { stream })
    }

    /// Sends `command` and returns the server's answer; a refusal is an error with the
    /// server's words.
    pub fn ask(mut self, command: &OperatorCommand) -> anyhow::Result<Reply> {
        let mut line = serde_json::to_string(command)?;
        line.push('\n');
        self.stream.write_all(line.as_bytes())?;
        let mut answer = String::new();
        let waiting = Waiting::start();
        BufReader::new(self.stream).read_line(&mut answer)?;
        drop(waiting);
        let value: serde_json::Value =
            serde_json::from_str(&answer).context("the server's answer is not JSON")?;
        if let Some(e) = value.get("error").and_then(|e| e.as_str()) {
            anyhow::bail!("{e}");
        }
        Reply::decode(command, value).context("the server's answer does not fit the request")
    }
}

/// `stats`, from the event log.
async fn stats(events: &Path, query: StatsQuery) -> Answer {
    let path = events.to_path_buf();
    let StatsQuery {
        since,
        until,
        by,
        class,
    } = query;
    tokio::task::spawn_blocking(move || {
        baton_events::stats_of_class(&path, since, until, &by, class.as_deref())
    })
    .await
    .map(Reply::Stats)
    .map_err(|e| ControlError::new(e.to_string()))
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
