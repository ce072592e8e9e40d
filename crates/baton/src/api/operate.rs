//! Message status, the queue summary and the operator's queue actions: typed commands for
//! the queue manager, answered with its typed replies.

use super::*;

pub(super) async fn message(
    State(ctx): State<Arc<Context>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let qid: QueueId = id
        .parse()
        .map_err(|_| bad_request(format!("{id:?} is not a message id")))?;
    if let Ok(live) = ctx
        .queue
        .control(OperatorCommand::Explain { id: qid })
        .await
    {
        return Ok(Json(live.to_json()));
    }
    // Gone from the queue: every recipient reached a final state; the event log says which.
    ctx.events.written().await;
    let path = ctx.config.data_dir.join("events");
    let wanted = qid.to_string();
    let found = tokio::task::spawn_blocking(move || baton_events::history(&path, &wanted))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    match found {
        Some(summary) => Ok(Json(summary)),
        None => Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no message {qid} in the queue or the event log"),
        )),
    }
}

pub(super) async fn queue_summary(State(ctx): State<Arc<Context>>) -> Json<Value> {
    match ctx.queue.control(OperatorCommand::Summary).await {
        Ok(summary) => Json(summary.to_json()),
        Err(e) => Json(e.to_json()),
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct QueueAction {
    pub(super) destination: Option<String>,
    pub(super) seconds: Option<u64>,
    /// For hold and release: a message id or "ALL".
    pub(super) id: Option<String>,
}

pub(super) async fn queue_action(
    State(ctx): State<Arc<Context>>,
    Path(action): Path<String>,
    request: Result<Json<QueueAction>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let request = body(request)?;
    let command = queue_command(&action, request)?;
    match ctx.queue.control(command).await {
        Ok(reply) => Ok(Json(reply.to_json())),
        Err(refused) => Err(bad_request(refused.error)),
    }
}

/// The command `POST /api/v1/queue/{action}` asks for.
pub(super) fn queue_command(
    action: &str,
    request: QueueAction,
) -> Result<OperatorCommand, ApiError> {
    let need = |d: Option<String>| {
        d.filter(|d| !d.is_empty())
            .ok_or_else(|| bad_request(format!("{action} needs a destination")))
    };
    let refused = |e: ControlError| bad_request(e.error);
    Ok(match action {
        "suspend" => OperatorCommand::suspend(&need(request.destination)?, request.seconds)
            .map_err(refused)?,
        "resume" => OperatorCommand::resume(&need(request.destination)?),
        "bounce" => OperatorCommand::bounce(&need(request.destination)?).map_err(refused)?,
        "delete" => OperatorCommand::delete(&need(request.destination)?).map_err(refused)?,
        "flush" => OperatorCommand::flush(request.destination.as_deref()),
        "hold" | "release" => {
            let id = request
                .id
                .filter(|i| !i.is_empty())
                .ok_or_else(|| bad_request(format!("{action} needs an id (or \"ALL\")")))?;
            if action == "hold" {
                OperatorCommand::hold(&id)
            } else {
                OperatorCommand::release(&id)
            }
            .map_err(refused)?
        }
        other => {
            return Err(ApiError(
                StatusCode::NOT_FOUND,
                format!(
                    "no queue action {other:?}: suspend, resume, bounce, delete, flush, hold or release"
                ),
            ));
        }
    })
}
