//! Reading what happened: the event log (`/events`), statistics (`/stats`) and the
//! suppression list.

use super::*;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct EventQuery {
    /// RFC 3339 bounds.
    pub(super) since: Option<String>,
    pub(super) until: Option<String>,
    pub(super) recipient: Option<String>,
    pub(super) message_id: Option<String>,
    pub(super) campaign: Option<String>,
    #[serde(rename = "type")]
    pub(super) kind: Option<String>,
    /// Events after this one (the `next` of the previous page).
    pub(super) after: Option<String>,
    pub(super) limit: Option<usize>,
    /// "newest": the latest `limit` events, newest first.
    pub(super) order: Option<String>,
}

pub(super) async fn events(
    State(ctx): State<Arc<Context>>,
    query: Result<Query<EventQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) = query.map_err(|e| bad_request(e.body_text()))?;
    let kind = q.kind.as_deref().map(str::parse::<baton_events::EventKind>);
    let filter = baton_events::Filter {
        since: time_param(&q.since, "since")?,
        until: time_param(&q.until, "until")?,
        recipient: q.recipient,
        message_id: q.message_id,
        campaign: q.campaign,
        kind: kind.as_ref().and_then(|k| k.as_ref().ok()).copied(),
        after: q.after,
        limit: q.limit.unwrap_or(100).clamp(1, 1000),
        newest_first: match q.order.as_deref() {
            None | Some("oldest") => false,
            Some("newest") => true,
            Some(other) => return Err(bad_request(format!("order {other:?}: oldest or newest"))),
        },
    };
    if let Some(Err(_)) = kind {
        // A type no event has: nothing matches.
        return Ok(Json(json!({"events": [], "next": null})));
    }
    ctx.events.written().await;
    let path = ctx.config.data_dir.join("events");
    let page = tokio::task::spawn_blocking(move || baton_events::query(&path, &filter))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(Json(page))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct StatsQuery {
    pub(super) since: Option<String>,
    pub(super) until: Option<String>,
    pub(super) by: Option<String>,
    /// Count only failures of this class.
    pub(super) class: Option<String>,
}

pub(super) async fn stats(
    State(ctx): State<Arc<Context>>,
    query: Result<Query<StatsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) = query.map_err(|e| bad_request(e.body_text()))?;
    let by = q.by.unwrap_or_else(|| "destination".into());
    if !matches!(
        by.as_str(),
        "destination" | "campaign" | "tenant" | "source" | "class"
    ) {
        return Err(bad_request(format!(
            "by {by:?}: destination, campaign, tenant, source or class"
        )));
    }
    let since = time_param(&q.since, "since")?;
    let until = time_param(&q.until, "until")?;
    ctx.events.written().await;
    let path = ctx.config.data_dir.join("events");
    let class = q.class;
    if let Some(c) = &class {
        c.parse::<baton_bounce::Class>().map_err(bad_request)?;
    }
    let answer = tokio::task::spawn_blocking(move || {
        baton_events::stats_of_class(&path, since, until, &by, class.as_deref())
    })
    .await
    .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(Json(answer))
}

/// An RFC 3339 time, or a span back from now ("1h", "7d").
pub(super) fn time_param(
    value: &Option<String>,
    name: &str,
) -> Result<Option<jiff::Timestamp>, ApiError> {
    value
        .as_deref()
        .map(|text| {
            baton_events::parse_since(text).ok_or_else(|| {
                bad_request(format!(
                    "{name} {text:?} is not an RFC 3339 time or a span like 24h"
                ))
            })
        })
        .transpose()
}
