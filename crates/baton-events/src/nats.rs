//! The NATS JetStream export (`[nats]`): every event, as its JSON line, published to
//! `<subject>.<type>` (`baton.events.delivery`, ...) in a stream Baton creates if it is missing
//! (file storage, `max_age`, a 10-minute duplicate window). Each message carries
//! `Nats-Msg-Id: <node>/<event id>`, so the stream drops the copies a retry sends within the
//! window, and `Baton-Node: <node>`. The follower in [`crate::export`] keeps the offset in
//! `data_dir/nats/<key>.offset` and moves it only once JetStream acknowledged the whole batch.
//!
//! Owns the NATS client; it must not write the event log.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, context::PublishErrorKind, stream};
use bytes::Bytes;
use tokio::sync::{OnceCell, watch};

use crate::EventKind;
use crate::export::Line;

/// `[nats]`: where the events go.
#[derive(Debug, Clone)]
pub struct NatsConfig {
    /// NATS servers (`nats://host:port`, `tls://host:port`); the client moves between them.
    pub servers: Vec<String>,
    /// Subjects are `<subject>.<event type>`.
    pub subject: String,
    pub stream: String,
    /// How long the stream keeps events, when Baton creates it.
    pub max_age: Duration,
    /// This node's name in message ids and the `Baton-Node` header.
    pub node: String,
    /// Event types sent; empty = all.
    pub events: Vec<EventKind>,
    pub batch_size: usize,
}

/// Why a server address cannot be used, if it cannot.
pub fn check_server(url: &str) -> Result<(), String> {
    let addr = url
        .parse::<async_nats::ServerAddr>()
        .map_err(|e| e.to_string())?;
    match addr.into_inner().scheme() {
        "nats" | "tls" => Ok(()),
        other => Err(format!("the {other}:// scheme is not supported")),
    }
}

/// JetStream's own wait for one acknowledgement.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// The most one batch may take, acknowledgements included.
const BATCH_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the stream remembers message ids to drop repeats.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(600);

/// Starts the export, if configured.
pub fn start(
    config: Option<&NatsConfig>,
    data_dir: &Path,
    events: &crate::Events,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let Some(config) = config else {
        return Ok(());
    };
    let dir = data_dir.join("nats");
    std::fs::create_dir_all(&dir)?;
    let offset_file =
        crate::export::offset_file(&dir, &format!("{}|{}", config.stream, config.subject));
    let exporter = Exporter {
        name: format!("nats stream {}", config.stream),
        config: config.clone(),
        jetstream: OnceCell::new(),
        stream_ready: AtomicBool::new(false),
    };
    crate::export::spawn(exporter, data_dir.join("events"), offset_file, events, stop);
    Ok(())
}

struct Exporter {
    name: String,
    config: NatsConfig,
    jetstream: OnceCell<jetstream::Context>,
    /// Whether the stream was found or made (again after it went missing).
    stream_ready: AtomicBool,
}

impl crate::export::Sink for Exporter {
    fn name(&self) -> &str {
        &self.name
    }

    fn events(&self) -> &[EventKind] {
        &self.config.events
    }

    fn batch_size(&self) -> usize {
        self.config.batch_size
    }

    /// Subjects and message ids come from them.
    fn reads_heads(&self) -> bool {
        true
    }

    async fn send(&self, batch: &[Line]) -> Result<(), String> {
        tokio::time::timeout(BATCH_TIMEOUT, self.publish(batch))
            .await
            .map_err(|_| format!("JetStream did not acknowledge within {BATCH_TIMEOUT:?}"))?
    }
}

impl Exporter {
    /// Publishes the whole batch, then waits for every acknowledgement: one round trip's
    /// wait per batch, not per event.
    async fn publish(&self, batch: &[Line]) -> Result<(), String> {
        let jetstream = self.jetstream().await?;
        if !self.stream_ready.load(Ordering::Relaxed) {
            self.ensure_stream(jetstream).await?;
            self.stream_ready.store(true, Ordering::Relaxed);
        }
        let mut acks = Vec::with_capacity(batch.len());
        for line in batch {
            let kind = line.kind.map_or("unknown", EventKind::as_str);
            let message = jetstream::message::PublishMessage::build()
                .payload(Bytes::from(line.text.clone()))
                .message_id(self.message_id(line))
                .header("Baton-Node", self.config.node.as_str());
            let ack = jetstream
                .send_publish(format!("{}.{kind}", self.config.subject), message)
                .await
                .map_err(|e| format!("publishing to NATS: {e}"))?;
            acks.push(ack);
        }
        let mut repeats = 0usize;
        for ack in acks {
            match ack.await {
                Ok(ack) => repeats += usize::from(ack.duplicate),
                Err(e) if e.kind() == PublishErrorKind::StreamNotFound => {
                    // Deleted under us: made again on the next try.
                    self.stream_ready.store(false, Ordering::Relaxed);
                    return Err(format!("no stream takes {}.>", self.config.subject));
                }
                Err(e) => return Err(format!("JetStream did not acknowledge: {e}")),
            }
        }
        if repeats > 0 {
            tracing::debug!(repeats, "JetStream dropped events it already had");
        }
        Ok(())
    }

    /// `<node>/<event id>`; a line with no id (not JSON) is named by its digest.
    fn message_id(&self, line: &Line) -> String {
        if line.id.is_empty() {
            let digest = ring::digest::digest(&ring::digest::SHA256, line.text.as_bytes());
            format!(
                "{}/{}",
                self.config.node,
                hex::encode(&digest.as_ref()[..12])
            )
        } else {
            format!("{}/{}", self.config.node, line.id)
        }
    }

    /// The client, connected once; it reconnects by itself from then on.
    async fn jetstream(&self) -> Result<&jetstream::Context, String> {
        self.jetstream
            .get_or_try_init(|| async {
                let servers = self
                    .config
                    .servers
                    .iter()
                    .map(|s| s.parse::<async_nats::ServerAddr>())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| e.to_string())?;
                let client = async_nats::ConnectOptions::new()
                    .name(format!("baton {}", self.config.node))
                    .connection_timeout(Duration::from_secs(5))
                    .max_reconnects(None)
                    .retry_on_initial_connect()
                    .connect(servers)
                    .await
                    .map_err(|e| format!("connecting to NATS: {e}"))?;
                let mut context = jetstream::new(client);
                context.set_timeout(ACK_TIMEOUT);
                Ok(context)
            })
            .await
    }

    /// Finds the stream, or creates it for `<subject>.>`.
    async fn ensure_stream(&self, jetstream: &jetstream::Context) -> Result<(), String> {
        let config = stream::Config {
            name: self.config.stream.clone(),
            subjects: vec![format!("{}.>", self.config.subject)],
            storage: stream::StorageType::File,
            max_age: self.config.max_age,
            duplicate_window: DUPLICATE_WINDOW,
            ..Default::default()
        };
        jetstream
            .get_or_create_stream(config)
            .await
            .map(drop)
            .map_err(|e| format!("finding or creating stream {}: {e}", self.config.stream))
    }
}
