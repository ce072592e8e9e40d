//! Delivery status notifications queued back to the sender.

use baton_spool::{Envelope, QueueId, Recipient, StoredMessage, now_ms};
use bytes::Bytes;

use super::QueueManager;
use crate::bounce::{self, ReportedRecipient};
use crate::events::EventKind;

impl QueueManager {
    /// Queues a DSN to the sender about `recipients`; a bounce is never bounced.
    pub(super) async fn send_dsn(&mut self, id: QueueId, recipients: Vec<ReportedRecipient>) {
        let Some(q) = self.messages.get(&id) else {
            return;
        };
        let original = q.envelope.clone();
        if original.sender.is_empty() {
            for r in &recipients {
                tracing::info!(id = %id, recipient = %r.address, "not returning a failed bounce (null sender)");
                let e = self.events.new_event(
                    EventKind::BounceDropped,
                    &id.to_string(),
                    &r.address,
                    "",
                );
                self.events.emit(e);
            }
            return;
        }
        let body = match q.job_message.body.get() {
            Some(b) => Ok(b.clone()),
            None => {
                let spool = self.spool.clone();
                let location = q.location;
                tokio::task::spawn_blocking(move || spool.load_body(id, location))
                    .await
                    .unwrap_or_else(|e| Err(std::io::Error::other(e)))
            }
        };
        let body = match body {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(id = %id, error = %e, "cannot read the message for its DSN");
                Bytes::new()
            }
        };
        let dsn_id = self.spool.next_id();
        let bytes = bounce::build(
            &self.config.hostname,
            &original,
            &body,
            &recipients,
            &dsn_id.to_string(),
        );
        let envelope = Envelope {
            id: dsn_id,
            sender: String::new(),
            recipients: vec![Recipient::new(original.sender.clone(), None, 1)],
            dsn_ret: None,
            dsn_envid: None,
            eight_bit: true,
            smtputf8: original.smtputf8,
            client_ip: std::net::IpAddr::from([127, 0, 0, 1]),
            helo: self.config.hostname.clone(),
            arrived_ms: now_ms(),
            size: bytes.len() as u64,
            meta: Vec::new(),
        };
        let mut writer = self.spool.body_writer(dsn_id);
        writer.buf().extend_from_slice(&bytes);
        let committed = match writer.settle() {
            Ok(()) => self.spool.commit(&envelope, writer).await,
            Err(e) => Err(e),
        };
        match committed {
            Ok((location, inline)) => {
                tracing::info!(id = %dsn_id, original = %id, to = %original.sender, recipients = recipients.len(), "DSN queued");
                for r in &recipients {
                    let e = self.events.new_event(
                        EventKind::DsnQueued,
                        &id.to_string(),
                        &r.address,
                        &original.sender,
                    );
                    self.events.emit(e);
                }
                let body = (!inline.is_empty()).then_some(inline);
                self.add(
                    StoredMessage {
                        envelope,
                        body: location,
                    },
                    body,
                );
            }
            Err(e) => tracing::error!(original = %id, error = %e, "cannot queue a DSN"),
        }
    }
}
