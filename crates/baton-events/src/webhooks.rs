//! Webhooks: the event log, in batches, POSTed as a JSON array to each `[[webhook]]` URL with
//! `X-Baton-Signature: sha256=<hex HMAC-SHA256 of the body>`, from the offset up to which the
//! receiver acknowledged (any 2xx), kept in `data_dir/webhooks/<key>.offset` (see [`crate::export`]
//! for the retries and what at least once means here).
//!
//! Owns the HTTP side of the senders; it must not write the event log.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tokio::sync::watch;

use crate::EventKind;
use crate::export::Line;

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

const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

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
    for hook in hooks {
        let offset_file = crate::export::offset_file(&dir, &hook.url);
        let hook = Hook {
            config: hook.clone(),
            https: https.clone(),
        };
        crate::export::spawn(
            hook,
            data_dir.join("events"),
            offset_file,
            events,
            stop.clone(),
        );
    }
    Ok(())
}

struct Hook {
    config: WebhookConfig,
    https: Option<Arc<rustls::ClientConfig>>,
}

impl crate::export::Sink for Hook {
    fn name(&self) -> &str {
        &self.config.url
    }

    fn events(&self) -> &[EventKind] {
        &self.config.events
    }

    fn batch_size(&self) -> usize {
        self.config.batch_size
    }

    fn reads_heads(&self) -> bool {
        false
    }

    async fn send(&self, batch: &[Line]) -> Result<(), String> {
        let mut body =
            String::with_capacity(batch.iter().map(|l| l.text.len() + 1).sum::<usize>() + 2);
        body.push('[');
        for (i, line) in batch.iter().enumerate() {
            if i > 0 {
                body.push(',');
            }
            body.push_str(&line.text);
        }
        body.push(']');
        self.post(body).await
    }
}

impl Hook {
    async fn post(&self, body: String) -> Result<(), String> {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, self.config.secret.as_bytes());
        let signature = hex::encode(ring::hmac::sign(&key, body.as_bytes()).as_ref());
        tokio::time::timeout(REQUEST_TIMEOUT, self.send(body, signature))
            .await
            .map_err(|_| "timed out".to_string())?
    }

    async fn send(&self, body: String, signature: String) -> Result<(), String> {
        let uri: hyper::Uri = self.config.url.parse().map_err(|e| format!("{e}"))?;
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
