//! Webhooks: the event log, in batches, POSTed as a JSON array to each `[[webhook]]` URL with
//! `X-Baton-Signature: sha256=<hex HMAC-SHA256 of the body>`. The log file is the durable
//! queue: each webhook remembers the offset up to which its receiver acknowledged (any 2xx)
//! in `data_dir/webhooks/<key>.offset`, and retries the same batch with backoff (1 s doubling
//! to 60 s) until it does. A receiver that is down for an hour gets everything when it is back;
//! delivery is at least once (a crash between the 2xx and saving the offset resends a batch),
//! and event ids let receivers drop duplicates.
//!
//! Owns the senders and their offsets; it must not write the event log.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tokio::sync::watch;

use crate::EventKind;

/// A receiver of event batches (`[[webhook]]`).
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    pub url: String,
    /// Key of the HMAC-SHA256 signature in `X-Baton-Signature`.
    pub secret: String,
    /// Event types sent; empty = all.
    pub events: Vec<EventKind>,
    pub batch_size: usize,
}

const MAX_BACKOFF: Duration = Duration::from_secs(60);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// The most read from the log per batch.
const READ_CHUNK: usize = 1 << 20;

/// Starts one sender task per webhook.
pub fn start(
    hooks: &[WebhookConfig],
    data_dir: &Path,
    events: &crate::Events,
    https: Option<Arc<rustls::ClientConfig>>,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    if hooks.is_empty() {
        return Ok(());
    }
    let dir = data_dir.join("webhooks");
    std::fs::create_dir_all(&dir)?;
    let log = data_dir.join("events");
    for hook in hooks {
        let key = hex::encode(
            &ring::digest::digest(&ring::digest::SHA256, hook.url.as_bytes()).as_ref()[..8],
        );
        let sender = Sender {
            hook: hook.clone(),
            log: log.clone(),
            offset_file: dir.join(format!("{key}.offset")),
            https: https.clone(),
        };
        tokio::spawn(Arc::new(sender).run(events.length(), events.opened_length(), stop.clone()));
    }
    Ok(())
}

struct Sender {
    hook: WebhookConfig,
    log: PathBuf,
    offset_file: PathBuf,
    https: Option<Arc<rustls::ClientConfig>>,
}

impl Sender {
    async fn run(
        self: Arc<Self>,
        mut length: watch::Receiver<u64>,
        opened_len: u64,
        mut stop: watch::Receiver<bool>,
    ) {
        // A webhook seen for the first time starts with the events written from now on.
        let saved = self
            .off_thread(|s| std::fs::read_to_string(&s.offset_file).ok())
            .await
            .flatten();
        let mut offset = match saved {
            Some(text) => text.trim().parse().unwrap_or(0),
            None => {
                let now = *length.borrow();
                self.save(now).await;
                now
            }
        };
        // The offset is saved without fsync and the log synced once a second: after a power
        // cut it can point past the log's end as it was opened (events written since start
        // there, at a line's start).
        let log_len = opened_len;
        if offset > log_len {
            tracing::warn!(url = %self.hook.url, offset, log_len, "webhook offset past the end of the event log; continuing from the end");
            offset = log_len;
            self.save(offset).await;
        }
        let mut backoff = Duration::from_secs(1);
        while !*stop.borrow() {
            let read = self.off_thread(move |s| s.read_batch(offset)).await;
            let (batch, end) = match read {
                Some(Ok(b)) => b,
                Some(Err(e)) => {
                    tracing::error!(url = %self.hook.url, error = %e, "cannot read the event log for a webhook");
                    (Vec::new(), offset)
                }
                None => (Vec::new(), offset),
            };
            if batch.is_empty() {
                if end > offset {
                    offset = end; // only filtered-out events
                    self.save(offset).await;
                    continue;
                }
                tokio::select! {
                    _ = length.changed() => {}
                    _ = stop.changed() => {}
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                }
                continue;
            }
            let body = format!("[{}]", batch.join(","));
            match self.post(body).await {
                Ok(()) => {
                    offset = end;
                    self.save(offset).await;
                    backoff = Duration::from_secs(1);
                }
                Err(why) => {
                    tracing::warn!(url = %self.hook.url, %why, retry_in = ?backoff, events = batch.len(), "webhook delivery failed");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.changed() => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Runs file work on a blocking thread: this sender's task waits, the runtime's thread
    /// does not. None if the work could not run (the runtime is shutting down).
    async fn off_thread<T: Send + 'static>(
        self: &Arc<Self>,
        work: impl FnOnce(&Sender) -> T + Send + 'static,
    ) -> Option<T> {
        let sender = self.clone();
        tokio::task::spawn_blocking(move || work(&sender))
            .await
            .ok()
    }

    async fn save(self: &Arc<Self>, offset: u64) {
        self.off_thread(move |s| s.save_now(offset)).await;
    }

    fn save_now(&self, offset: u64) {
        let tmp = self.offset_file.with_extension("tmp");
        let saved = std::fs::write(&tmp, offset.to_string())
            .and_then(|()| std::fs::rename(&tmp, &self.offset_file));
        if let Err(e) = saved {
            tracing::warn!(path = %self.offset_file.display(), error = %e, "cannot save a webhook offset (events may be sent again)");
        }
    }

    /// Up to `batch_size` wanted events (raw JSON lines) from `offset`, and the offset just
    /// past the last line looked at. An unfinished last line is left for later.
    /// Reads within one of the log's files; an offset in a file the retention deleted moves
    /// on to the oldest kept.
    fn read_batch(&self, offset: u64) -> std::io::Result<(Vec<String>, u64)> {
        let Some((mut file, at)) = crate::files::open_at(&self.log, offset)? else {
            return Ok((Vec::new(), offset));
        };
        if at != offset {
            tracing::warn!(url = %self.hook.url, offset, now = at, "webhook offset in an event log file deleted by the retention; continuing with the oldest kept");
            return Ok((Vec::new(), at));
        }
        let mut chunk = Vec::with_capacity(64 << 10);
        (&mut file)
            .take(READ_CHUNK as u64)
            .read_to_end(&mut chunk)?;
        let mut batch = Vec::new();
        let mut end = offset;
        let mut at = 0;
        if chunk.len() == READ_CHUNK && !chunk.contains(&b'\n') {
            // A line longer than a whole chunk (the writer bounds lines now; an old log may
            // hold one): skipped, or it would stop this webhook for good.
            let skipped = skip_line(&mut file)?;
            tracing::warn!(url = %self.hook.url, offset, bytes = READ_CHUNK as u64 + skipped, "skipping an over-long event line");
            return Ok((batch, offset + READ_CHUNK as u64 + skipped));
        }
        while let Some(len) = chunk[at..].iter().position(|&b| b == b'\n') {
            let line = &chunk[at..at + len];
            at += len + 1;
            let wanted = self.hook.events.is_empty()
                || serde_json::from_slice::<serde_json::Value>(line)
                    .ok()
                    .and_then(|e| EventKind::of(&e))
                    .is_some_and(|kind| self.hook.events.contains(&kind));
            if wanted && !line.is_empty() {
                batch.push(String::from_utf8_lossy(line).into_owned());
            }
            end = offset + at as u64;
            if batch.len() >= self.hook.batch_size {
                break;
            }
        }
        Ok((batch, end))
    }

    async fn post(&self, body: String) -> Result<(), String> {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, self.hook.secret.as_bytes());
        let signature = hex::encode(ring::hmac::sign(&key, body.as_bytes()).as_ref());
        tokio::time::timeout(REQUEST_TIMEOUT, self.send(body, signature))
            .await
            .map_err(|_| "timed out".to_string())?
    }

    async fn send(&self, body: String, signature: String) -> Result<(), String> {
        let uri: hyper::Uri = self.hook.url.parse().map_err(|e| format!("{e}"))?;
        let host = uri
            .host()
            .ok_or("no host")?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let tls = uri.scheme_str() == Some("https");
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| format!("connecting to {host}:{port}: {e}"))?;
        let path = uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
            .to_string();
        let authority = uri
            .authority()
            .map(|a| a.as_str())
            .unwrap_or(&host)
            .to_string();
        let request = hyper::Request::post(path)
            .header(hyper::header::HOST, authority)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(hyper::header::USER_AGENT, "baton")
            .header("X-Baton-Signature", format!("sha256={signature}"))
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        let status = if tls {
            let config = self
                .https
                .clone()
                .ok_or("no trusted CA certificates for https")?;
            let name = baton_tls::trust::server_name(&host)?;
            let stream = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS with {host}: {e}"))?;
            exchange(stream, request).await?
        } else {
            exchange(tcp, request).await?
        };
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("the receiver answered {status}"))
        }
    }
}

/// Reads on from where `file` stands to just past the next newline (or the end); returns how
/// many bytes that was.
fn skip_line(file: &mut std::fs::File) -> std::io::Result<u64> {
    let mut skipped = 0u64;
    let mut chunk = vec![0u8; 64 << 10];
    loop {
        let n = file.read(&mut chunk)?;
        if n == 0 {
            return Ok(skipped);
        }
        if let Some(i) = chunk[..n].iter().position(|&b| b == b'\n') {
            return Ok(skipped + i as u64 + 1);
        }
        skipped += n as u64;
    }
}

async fn exchange<S>(
    stream: S,
    request: hyper::Request<Full<Bytes>>,
) -> Result<hyper::StatusCode, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status();
    // Read (and drop) the answer so the exchange completes; a receiver's answer is at most
    // 64 KiB of our memory, however much it sends.
    let _ = http_body_util::Limited::new(response.into_body(), 64 << 10)
        .collect()
        .await;
    Ok(status)
}
