//! The HTTP API on `[http] address` (axum): message injection, message status, the queue
//! summary and operator actions, the event log, and the OpenAPI description. JSON in and out;
//! errors are `{"error": "..."}` with a 4xx or 5xx status. Clients off loopback must present
//! `Authorization: Bearer <token>` (one of `[http] tokens`).
//!
//! Owns HTTP only: messages go in through [`crate::intake`] (202 once they are on disk, as SMTP
//! answers 250), queue questions and actions go to the queue manager, events are read from
//! the event log.
//!
//! - this file: the router, authorization, errors, the static pages;
//! - `inject`: `POST /api/v1/messages`: the request, its limits, the plan of messages;
//! - `compose`: building each message (placeholders, MIME parts, the envelope);
//! - `operate`: message status, the queue summary and operator actions;
//! - `read`: events and statistics;
//! - `lists`: the suppression list and the one-click unsubscribe.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use baton_spool::{Envelope, MessageMeta, Notify, QueueId, Recipient};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::config::HttpConfig;
use crate::intake::Intake;
use crate::operator::{ControlError, OperatorCommand};

mod compose;
mod fleet;
mod inject;
mod lists;
mod operate;
mod read;

use compose::*;
use fleet::*;
use inject::*;
use lists::*;
use operate::*;
use read::*;

/// The OpenAPI description of these routes (a test checks it against the router).
pub const OPENAPI: &str = include_str!("../../../../docs/openapi.json");

/// Most recipients one inject call may carry.
const MAX_RECIPIENTS_PER_CALL: usize = 100_000;

/// An error answer.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({"error": self.1}))).into_response()
    }
}

fn bad_request(text: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, text.into())
}

/// The largest request body: room for 100,000 personalised recipients.
const MAX_BODY: usize = 64 << 20;

/// JSON bodies with a JSON error for malformed ones (413 for one over `MAX_BODY`).
fn body<T>(parsed: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    parsed.map(|Json(v)| v).map_err(|e| {
        let status = match e.status() {
            StatusCode::PAYLOAD_TOO_LARGE => StatusCode::PAYLOAD_TOO_LARGE,
            _ => StatusCode::BAD_REQUEST,
        };
        ApiError(status, format!("bad JSON: {}", e.body_text()))
    })
}

/// Every route, as documented in docs/openapi.json (a unit test compares the two).
pub const ROUTES: &[(&str, &str)] = &[
    ("post", "/api/v1/inject"),
    ("get", "/api/v1/messages/{id}"),
    ("get", "/api/v1/queue"),
    ("post", "/api/v1/queue/{action}"),
    ("get", "/api/v1/events"),
    ("get", "/api/v1/openapi.json"),
    ("get", "/api/v1/stats"),
    ("get", "/metrics"),
    ("get", "/"),
    ("get", "/api/v1/suppressions"),
    ("post", "/api/v1/suppressions"),
    ("delete", "/api/v1/suppressions/{email}"),
    ("get", "/api/v1/history"),
    ("post", "/api/v1/suppressions/import"),
    ("get", "/unsubscribe/{token}"),
    ("post", "/unsubscribe/{token}"),
    ("get", "/api/v1/cluster"),
];

pub fn router(ctx: Arc<Context>) -> Router {
    let access = Arc::new(
        ctx.config
            .http
            .as_ref()
            .map(|h| (h.tokens.clone(), h.trusted_networks.clone()))
            .unwrap_or_default(),
    );
    Router::new()
        .route("/api/v1/inject", post(inject))
        .route("/api/v1/messages/{id}", get(message))
        .route("/api/v1/queue", get(queue_summary))
        .route("/api/v1/queue/{action}", post(queue_action))
        .route("/api/v1/events", get(events))
        .route("/api/v1/openapi.json", get(openapi))
        .route("/api/v1/stats", get(stats))
        .route("/api/v1/cluster", get(cluster))
        .route("/metrics", get(metrics))
        .route("/", get(dashboard))
        .route(
            "/api/v1/history",
            get(|| async { Json(baton_events::metrics::history()) }),
        )
        .route("/api/v1/suppressions", get(suppressions).post(suppress))
        .route("/api/v1/suppressions/import", post(import))
        .route(
            "/api/v1/suppressions/{email}",
            axum::routing::delete(unsuppress),
        )
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such route".into()) })
        .layer(middleware::from_fn_with_state(access, authorize))
        // The one-click unsubscribe is for recipients: no token, its link is signed.
        .merge(Router::new().route(
            "/unsubscribe/{token}",
            get(unsubscribe_page).post(one_click),
        ))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(ctx)
}

/// What the API's handlers share: the handles they use, built by the composition root.
pub struct Context {
    pub config: Arc<crate::config::Config>,
    /// Injected messages go in through it, as SMTP's do.
    pub intake: Intake,
    /// Operator commands and queue views.
    pub queue: crate::qmgr::QueueHandle,
    /// The event log, read by `/events`, `/stats` and message status.
    pub events: baton_events::Events,
    /// Addresses the API does not mail.
    pub suppressions: Arc<crate::suppression::Suppressions>,
    /// Why intake must pause now, if it must (503).
    pub backpressure: Arc<crate::backpressure::Backpressure>,
    /// Unsubscribe links: made at injection, applied by the one-click POST.
    pub returns: Arc<crate::returns::Returns>,
    /// The fleet's view, with `[cluster]`.
    pub cluster: Option<baton_cluster::Cluster>,
}

/// Binds the API's address (before the SMTP listeners: once mail can come in, so can API
/// calls).
pub async fn bind(http: &HttpConfig) -> anyhow::Result<tokio::net::TcpListener> {
    let listener = tokio::net::TcpListener::bind(http.address)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {} for HTTP: {e}", http.address))?;
    tracing::info!(address = %http.address, "HTTP API listening");
    Ok(listener)
}

/// Serves the API until `stop` turns true.
pub fn serve(
    ctx: Arc<Context>,
    listener: tokio::net::TcpListener,
    mut stop: watch::Receiver<bool>,
) {
    let app = router(ctx).into_make_service_with_connect_info::<SocketAddr>();
    tokio::spawn(async move {
        let shutdown = async move {
            while !*stop.borrow() {
                if stop.changed().await.is_err() {
                    break;
                }
            }
        };
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::error!(error = %e, "HTTP API stopped");
        }
    });
}

/// Clients in `[http] trusted_networks` (loopback) pass; others need a configured token.
async fn authorize(
    State(access): State<Arc<(Vec<String>, Vec<ipnet::IpNet>)>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
    next: Next,
) -> Response {
    let (tokens, trusted) = &*access;
    let ip = peer.ip().to_canonical();
    // The dashboard page itself holds no data; its API calls carry the token.
    if request.uri().path() == "/" || trusted.iter().any(|n| n.contains(&ip)) {
        return next.run(request).await;
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let digest = |t: &str| ring::digest::digest(&ring::digest::SHA256, t.as_bytes());
    let ok = presented.is_some_and(|p| {
        let p = digest(p);
        tokens.iter().any(|t| digest(t).as_ref() == p.as_ref())
    });
    if ok {
        next.run(request).await
    } else {
        ApiError(
            StatusCode::UNAUTHORIZED,
            "a bearer token is required from this address (Authorization: Bearer <token>)".into(),
        )
        .into_response()
    }
}

/// The live dashboard: one page, its script and styles inline (no CDN); it asks for a token
/// (`#token=...`) only when the browser is outside the trusted networks.
async fn dashboard() -> Response {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        include_str!("dashboard/index.html"),
    )
        .into_response()
}

/// Prometheus text format.
async fn metrics() -> Response {
    match baton_events::metrics::handle() {
        Some(h) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            h.render(),
        )
            .into_response(),
        None => ApiError(StatusCode::SERVICE_UNAVAILABLE, "metrics are off".into()).into_response(),
    }
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

// ---------------------------------------------------------------------------------------
// Injection

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openapi_documents_exactly_the_routes() {
        let spec: Value = serde_json::from_str(OPENAPI).unwrap();
        let mut documented: Vec<(String, String)> = spec["paths"]
            .as_object()
            .unwrap()
            .iter()
            .flat_map(|(path, ops)| {
                ops.as_object()
                    .unwrap()
                    .keys()
                    .map(|m| (m.clone(), path.clone()))
                    .collect::<Vec<_>>()
            })
            .collect();
        documented.sort();
        let mut routes: Vec<(String, String)> = ROUTES
            .iter()
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .collect();
        routes.sort();
        assert_eq!(documented, routes);
    }
}
