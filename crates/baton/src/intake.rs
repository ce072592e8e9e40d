//! The one way into the queue, for SMTP sessions and the HTTP API alike: commit a complete
//! message to the spool (group commit: this returns once it is on disk), log it, emit its
//! reception events and hand it to the queue manager. The caller acknowledges its client only
//! after this returns Ok.
//!
//! Owns that hand-over; it must not parse SMTP or HTTP.

use std::sync::Arc;

use baton_spool::{BodyWriter, Envelope, QueueId, SpoolError, StoredMessage};

use crate::server::Context;
use baton_events::EventKind;

/// Commits and queues a message; `origin` names where it came from in the log ("mx", "http").
///
/// The work runs in a task of its own: once begun it completes and reaches the queue manager
/// even if the caller goes away (an HTTP client that disconnects, a session aborted at
/// shutdown), so a message on disk is never unknown to the running server.
pub async fn queue_message(
    ctx: &Arc<Context>,
    envelope: Envelope,
    body: BodyWriter,
    origin: &'static str,
) -> Result<QueueId, SpoolError> {
    let ctx = ctx.clone();
    tokio::spawn(async move { commit_and_queue(&ctx, envelope, body, origin).await })
        .await
        .unwrap_or(Err(SpoolError::Stopped))
}

async fn commit_and_queue(
    ctx: &Context,
    envelope: Envelope,
    body: BodyWriter,
    origin: &str,
) -> Result<QueueId, SpoolError> {
    let (location, inline) = match ctx.spool.commit(&envelope, body).await {
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
            ctx.events
                .new_event(EventKind::Reception, &id_text, &r.address, &envelope.sender);
        e.size = Some(envelope.size);
        e.campaign = envelope.meta.campaign.clone();
        e.tenant = envelope.meta.tenant.clone();
        ctx.events.emit(e);
    }
    let body = (!inline.is_empty()).then_some(inline);
    ctx.queue.submit(
        StoredMessage {
            envelope,
            body: location,
        },
        body,
    );
    Ok(id)
}
