//! The delivery agent for return-path domains: each recipient's report is handed to
//! [`crate::returns::Returns`], off the async threads (it reads the event log and may keep a
//! file). A report that cannot even be kept is deferred, never dropped.

use std::sync::Arc;

use baton_client::Reply;

use super::{DeliveryContext, Job, JobReport, Outcome, report_all};
use crate::returns::Taken;

pub(super) async fn take_reports(ctx: &Arc<DeliveryContext>, job: Job) {
    let body = match job.message.stored_body(&ctx.spool).await {
        Ok(b) => b,
        Err(e) => {
            let reply = Reply::local(451, "4.3.0", format!("cannot read the queued message: {e}"));
            report_all(ctx, &job, &reply, None);
            return;
        }
    };
    let returns = ctx.returns.clone();
    let message = job.message.clone();
    let rcpts = job.rcpts.clone();
    let outcomes = tokio::task::spawn_blocking(move || {
        rcpts
            .iter()
            .map(|&rcpt| {
                let address = message
                    .recipients
                    .get(rcpt as usize)
                    .map(|r| r.address.as_str())
                    .unwrap_or_default();
                let reply = match returns.take(message.id, address, &body) {
                    Ok(Taken::Applied(kinds)) => {
                        let kinds: Vec<&str> = kinds.iter().map(|k| k.as_str()).collect();
                        Reply::local(
                            250,
                            "2.0.0",
                            format!("report applied: {}", kinds.join(", ")),
                        )
                    }
                    Ok(Taken::Unmatched(why)) => {
                        Reply::local(250, "2.0.0", format!("report kept as unmatched: {why}"))
                    }
                    Err(e) => Reply::local(451, "4.3.0", format!("cannot keep the report: {e}")),
                };
                outcome(rcpt, reply)
            })
            .collect::<Vec<_>>()
    })
    .await;
    // A panic while reading the report must not leave its recipients out with no outcome.
    let outcomes = outcomes.unwrap_or_else(|e| {
        tracing::error!(id = %job.message.id, error = %e, "reading a report failed");
        let reply = Reply::local(
            451,
            "4.3.0",
            "reading the report failed; it will be tried again",
        );
        job.rcpts
            .iter()
            .map(|&rcpt| outcome(rcpt, reply.clone()))
            .collect()
    });
    // What the reports say is in the event log before they leave the queue.
    ctx.events.written().await;
    let _ = ctx.reports.send(JobReport {
        id: job.message.id,
        outcomes,
    });
}

/// A report's outcome: read here, not relayed.
fn outcome(rcpt: u32, reply: Reply) -> Outcome {
    Outcome {
        rcpt,
        reply,
        remote: None,
        dsn_passed: true,
        local: true,
        tls: None,
        not_before: None,
        hold: false,
        source: None,
    }
}
