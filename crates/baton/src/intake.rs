//! The one way into the queue, for SMTP sessions and the HTTP API alike: commit a complete
//! message to the spool (group commit: this returns once it is on disk), log it, emit its
//! reception events and hand it to the queue manager. The caller acknowledges its client only
//! after this returns Ok.
//!
//! Also the one place intake asks the suppression list whether a recipient may be sent to.
//!
//! Owns that hand-over; it must not parse SMTP or HTTP.

use std::sync::Arc;

use baton_events::{EventKind, Events};
use baton_spool::{BodyWriter, Envelope, QueueId, Spool, SpoolError, StoredMessage};

use crate::qmgr::QueueHandle;
use crate::suppression::{Entry, Suppressions};

/// The handles intake needs: the spool to commit to, the event log, the queue manager.
/// Cheap to clone; sessions and the API each hold one.
#[derive(Clone)]
pub struct Intake {
    spool: Spool,
    events: Events,
    queue: QueueHandle,
    suppressions: Arc<Suppressions>,
}

impl Intake {
    pub fn new(
        spool: Spool,
        events: Events,
        queue: QueueHandle,
        suppressions: Arc<Suppressions>,
    ) -> Intake {
        Intake {
            spool,
            events,
            queue,
            suppressions,
        }
    }

    /// The live suppression entry that keeps `recipient` of a message from `tenant` (and
    /// `campaign`, if any) from being sent, as a `suppression` event; None when it may go.
    pub fn suppressed(
        &self,
        recipient: &str,
        sender: &str,
        tenant: Option<&str>,
        campaign: Option<&str>,
    ) -> Option<Entry> {
        let entry = self.suppressions.find(recipient, tenant, campaign)?;
        let mut e = self
            .events
            .new_event(EventKind::Suppression, "", recipient, sender);
        e.response = Some(format!(
            "not sent: the address is on the suppression list ({}: {})",
            entry.scope, entry.reason
        ));
        e.campaign = campaign.map(str::to_string);
        e.tenant = tenant.map(str::to_string);
        self.events.emit(e);
        Some(entry)
    }

    /// A fresh queue id for a message being received.
    pub fn next_id(&self) -> QueueId {
        self.spool.next_id()
    }

    /// Where a message's body is written while it arrives.
    pub fn body_writer(&self, id: QueueId) -> BodyWriter {
        self.spool.body_writer(id)
    }

    /// Commits and queues a message; `origin` names where it came from in the log ("mx",
    /// "http").
    ///
    /// The work runs in a task of its own: once begun it completes and reaches the queue
    /// manager even if the caller goes away (an HTTP client that disconnects, a session aborted
    /// at shutdown), so a message on disk is never unknown to the running server.
    pub async fn queue_message(
        &self,
        envelope: Envelope,
        body: BodyWriter,
        origin: &'static str,
    ) -> Result<QueueId, SpoolError> {
        let intake = self.clone();
        tokio::spawn(async move { intake.commit_and_queue(envelope, body, origin).await })
            .await
            .unwrap_or(Err(SpoolError::Stopped))
    }

    async fn commit_and_queue(
        &self,
        envelope: Envelope,
        body: BodyWriter,
        origin: &str,
    ) -> Result<QueueId, SpoolError> {
        let (location, inline) = match self.spool.commit(&envelope, body).await {
            Ok(stored) => stored,
            Err(e) => {
                tracing::error!(id = %envelope.id, error = %e, "message not queued");
                return Err(e);
            }
        };
        tracing::info!(
            id = %envelope.id,
            from = %envelope.sender,
            nrcpt = envelope.recipients.len(),
            size = envelope.size,
            client = %envelope.client_ip,
            listener = origin,
            "queued"
        );
        let origin_label = if origin == "http" { "http" } else { "smtp" };
        baton_events::metrics::received(origin_label, envelope.recipients.len(), envelope.size);
        let id = envelope.id;
        let id_text = id.to_string();
        for r in &envelope.recipients {
            let mut e =
                self.events
                    .new_event(EventKind::Reception, &id_text, &r.address, &envelope.sender);
            e.size = Some(envelope.size);
            e.campaign = envelope.meta.campaign.clone();
            e.tenant = envelope.meta.tenant.clone();
            self.events.emit(e);
        }
        let body = (!inline.is_empty()).then_some(inline);
        self.queue.submit(
            StoredMessage {
                envelope,
                body: location,
            },
            body,
        );
        Ok(id)
    }
}
