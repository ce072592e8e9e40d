//! The HTTP API on `[http] address` (axum): message injection, message status, the queue
//! summary and operator actions, the event log, and the OpenAPI description. JSON in and out;
//! errors are `{"error": "..."}` with a 4xx or 5xx status. Clients off loopback must present
//! `Authorization: Bearer <token>` (one of `[http] tokens`).
//!
//! Owns HTTP only: messages go in through [`crate::intake`] (202 once they are on disk, as SMTP
//! answers 250), queue questions and actions go to the queue manager, events are read from
//! the event log.

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

/// The OpenAPI description of these routes (a test checks it against the router).
pub const OPENAPI: &str = include_str!("../../../docs/openapi.json");

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
        .route("/metrics", get(metrics))
        .route("/", get(dashboard))
        .route(
            "/api/v1/history",
            get(|| async { Json(baton_events::metrics::history()) }),
        )
        .route("/api/v1/suppressions", get(suppressions).post(suppress))
        .route(
            "/api/v1/suppressions/{email}",
            axum::routing::delete(unsuppress),
        )
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such route".into()) })
        .layer(middleware::from_fn_with_state(access, authorize))
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InjectRequest {
    envelope_sender: String,
    content: Content,
    recipients: Vec<InjectRecipient>,
    /// Defaults for every recipient's substitutions.
    #[serde(default)]
    substitutions: HashMap<String, Value>,
    campaign: Option<String>,
    tenant: Option<String>,
    pool: Option<String>,
    /// RFC 3339 (or RFC 5322) time before which nothing is sent.
    send_at: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    /// A whole RFC 5322 message.
    Raw(String),
    Parts(Box<Parts>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Parts {
    from: String,
    #[serde(default)]
    subject: String,
    text_body: Option<String>,
    html_body: Option<String>,
    reply_to: Option<String>,
    /// `{"X-Name": "value"}`, or `[["X-Name", "value"], ...]` when a name repeats.
    #[serde(default, deserialize_with = "header_list")]
    headers: Vec<(String, String)>,
    #[serde(default)]
    attachments: Vec<Attachment>,
}

/// Header fields given as an object or as a list of pairs.
fn header_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<(String, String)>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Headers {
        Map(ordered_map::Ordered),
        Pairs(Vec<(String, String)>),
    }
    Ok(match Headers::deserialize(d)? {
        Headers::Map(map) => map.0,
        Headers::Pairs(pairs) => pairs,
    })
}

/// A JSON object's string members in document order (serde_json's Map sorts them).
mod ordered_map {
    use serde::de::{MapAccess, Visitor};

    pub struct Ordered(pub Vec<(String, String)>);

    impl<'de> serde::Deserialize<'de> for Ordered {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Ordered;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("an object of header names and string values")
                }
                fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Ordered, A::Error> {
                    let mut out = Vec::new();
                    while let Some((k, v)) = map.next_entry::<String, String>()? {
                        out.push((k, v));
                    }
                    Ok(Ordered(out))
                }
            }
            d.deserialize_map(V)
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Attachment {
    filename: String,
    content_type: String,
    /// Base64.
    content: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InjectRecipient {
    email: String,
    #[serde(default)]
    substitutions: HashMap<String, Value>,
}

async fn inject(
    State(ctx): State<Arc<Context>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Result<Json<InjectRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let mut request = body(request)?;
    normalise_addresses(&mut request)?;
    let suppressed = leave_out_suppressed(&ctx, &mut request);
    if request.recipients.is_empty() && !suppressed.is_empty() {
        return Ok((
            StatusCode::ACCEPTED,
            Json(json!({"ids": [], "recipients": 0, "suppressed": suppressed})),
        ));
    }
    let plan = plan_injection(&ctx, &request)?;
    let client = peer.ip().to_canonical();
    let shared = Shared::from(&request)?;
    crate::policy::check_send_at(
        shared.send_at_ms,
        baton_spool::now_ms(),
        &ctx.config.delivery,
    )
    .map_err(|why| bad_request(format!("send_at: {why}")))?;
    // Every message is built (and so checked) before any is queued: a 4xx never leaves some
    // of the call's messages queued behind it. What they may take is bounded, and each is
    // rendered only as it is built (a rendered copy of every recipient's content, attachments
    // and all, would be the call's size times its recipients).
    let limits = CallLimits::of(&ctx);
    let mut built = 0u64;
    let messages = plan
        .into_iter()
        .map(|planned| {
            let text = planned.render(&request);
            let envelope = envelope_for(&ctx, &request, &shared, planned.rcpts, client);
            let bytes = message_bytes(&ctx, &envelope, &text, client)?;
            built = built.saturating_add(bytes.len() as u64);
            limits.check(bytes.len() as u64, built)?;
            Ok((envelope, bytes))
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    let mut tasks = tokio::task::JoinSet::new();
    let total = messages.len();
    for (index, (envelope, bytes)) in messages.into_iter().enumerate() {
        let ctx = ctx.clone();
        tasks.spawn(async move {
            let mut envelope = envelope;
            envelope.size = bytes.len() as u64;
            let mut writer = ctx.intake.body_writer(envelope.id);
            writer.buf().extend_from_slice(&bytes);
            if let Err(e) = writer.settle().await {
                return (index, Err(e));
            }
            (
                index,
                ctx.intake.queue_message(envelope, writer, "http").await,
            )
        });
    }
    let mut ids = vec![None; total];
    let mut failure = None;
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok((i, Ok(id))) => ids[i] = Some(id.to_string()),
            Ok((_, Err(e))) => failure = Some(e.to_string()),
            Err(e) => failure = Some(e.to_string()),
        }
    }
    let ids: Vec<String> = ids.into_iter().flatten().collect();
    match failure {
        None => Ok((
            StatusCode::ACCEPTED,
            Json(
                json!({"ids": ids, "recipients": request.recipients.len(), "suppressed": suppressed}),
            ),
        )),
        // Some made it to disk: say which, so that a retry does not duplicate them.
        Some(why) => Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "{} of {total} messages queued ({}); not queued: {why}",
                ids.len(),
                ids.join(",")
            ),
        )),
    }
}

/// The size limits of one inject call: each message as SMTP's (`[limits] max_message_size`),
/// and all of them together (`[http] max_inject_bytes`).
struct CallLimits {
    message: u64,
    call: u64,
}

impl CallLimits {
    fn of(ctx: &Context) -> CallLimits {
        CallLimits {
            message: ctx.config.limits.max_message_size,
            call: ctx
                .config
                .http
                .as_ref()
                .map_or(256 << 20, |h| h.max_inject_bytes),
        }
    }

    fn check(&self, size: u64, built: u64) -> Result<(), ApiError> {
        let too_large = |why: String| Err(ApiError(StatusCode::PAYLOAD_TOO_LARGE, why));
        if size > self.message {
            let limit = self.message;
            return too_large(format!(
                "a message of {size} bytes exceeds [limits] max_message_size ({limit} bytes)"
            ));
        }
        if built > self.call {
            let limit = self.call;
            return too_large(format!(
                "the call's messages exceed [http] max_inject_bytes ({limit} bytes); split it into smaller calls"
            ));
        }
        Ok(())
    }
}

/// Reads every envelope address as RFC 5321 writes it (a control character or a stray `<`
/// could otherwise become a command on the next hop's wire) and keeps its stored form.
fn normalise_addresses(request: &mut InjectRequest) -> Result<(), ApiError> {
    use baton_smtp::address::parse_mailbox;
    if !request.envelope_sender.is_empty() {
        request.envelope_sender = parse_mailbox(&request.envelope_sender, false).map_err(|e| {
            bad_request(format!(
                "envelope_sender {:?}: {e}",
                request.envelope_sender
            ))
        })?;
    }
    for (i, r) in request.recipients.iter_mut().enumerate() {
        r.email = parse_mailbox(&r.email, false)
            .map_err(|e| bad_request(format!("recipients[{i}].email {:?}: {e}", r.email)))?;
    }
    Ok(())
}

/// Takes suppressed addresses out of the call; each is a `suppression` event.
fn leave_out_suppressed(ctx: &Context, request: &mut InjectRequest) -> Vec<String> {
    let mut left_out = Vec::new();
    request.recipients.retain(|r| {
        if !ctx.suppressions.contains(&r.email) {
            return true;
        }
        let mut e = ctx.events.new_event(
            baton_events::EventKind::Suppression,
            "",
            &r.email,
            &request.envelope_sender,
        );
        e.response = Some("not sent: the address is on the suppression list".into());
        e.campaign = request.campaign.clone();
        ctx.events.emit(e);
        left_out.push(r.email.clone());
        false
    });
    left_out
}

/// One message per distinct text: without placeholders every recipient shares one message;
/// with them each recipient gets their own. Returns (recipient indexes, rendered content).
fn plan_injection(ctx: &Context, request: &InjectRequest) -> Result<Vec<Planned>, ApiError> {
    if request.recipients.is_empty() {
        return Err(bad_request("recipients is empty"));
    }
    if request.recipients.len() > MAX_RECIPIENTS_PER_CALL {
        return Err(bad_request(format!(
            "at most {MAX_RECIPIENTS_PER_CALL} recipients per call"
        )));
    }
    if let Some(pool) = &request.pool
        && !ctx.config.pools.iter().any(|p| &p.name == pool)
    {
        return Err(bad_request(format!("no [[pool]] named {pool:?}")));
    }
    if !has_placeholders(&request.content) {
        return Ok(vec![Planned {
            rcpts: (0..request.recipients.len()).collect(),
            personal: None,
        }]);
    }
    Ok((0..request.recipients.len())
        .map(|i| Planned {
            rcpts: vec![i],
            personal: Some(i),
        })
        .collect())
}

/// One message of a call: the recipients (indexes) it goes to, and the recipient whose
/// substitutions fill it in (none: one message for all, with the call's defaults).
struct Planned {
    rcpts: Vec<usize>,
    personal: Option<usize>,
}

impl Planned {
    fn render(&self, request: &InjectRequest) -> Rendered {
        let empty = HashMap::new();
        let (own, email) = match self.personal.and_then(|i| request.recipients.get(i)) {
            Some(r) => (&r.substitutions, r.email.as_str()),
            None => (&empty, ""),
        };
        render(&request.content, own, &request.substitutions, email)
    }
}

fn has_placeholders(content: &Content) -> bool {
    match content {
        Content::Raw(raw) => raw.contains("{{"),
        Content::Parts(p) => {
            p.subject.contains("{{")
                || p.from.contains("{{")
                || p.text_body.as_deref().is_some_and(|t| t.contains("{{"))
                || p.html_body.as_deref().is_some_and(|t| t.contains("{{"))
                || p.headers.iter().any(|(_, v)| v.contains("{{"))
        }
    }
}

/// Content with its placeholders filled in.
enum Rendered {
    Raw(String),
    Parts(Box<Parts>),
}

fn render(
    content: &Content,
    own: &HashMap<String, Value>,
    defaults: &HashMap<String, Value>,
    email: &str,
) -> Rendered {
    let fill = |text: &str, header: bool| substitute(text, own, defaults, email, header);
    match content {
        Content::Raw(raw) => {
            // Header values must not gain line breaks from a substitution.
            let (head, rest) = match raw.find("\r\n\r\n").or_else(|| raw.find("\n\n")) {
                Some(at) => raw.split_at(at),
                None => (raw.as_str(), ""),
            };
            Rendered::Raw(format!("{}{}", fill(head, true), fill(rest, false)))
        }
        Content::Parts(p) => Rendered::Parts(Box::new(Parts {
            from: fill(&p.from, true),
            subject: fill(&p.subject, true),
            text_body: p.text_body.as_deref().map(|t| fill(t, false)),
            html_body: p.html_body.as_deref().map(|t| fill(t, false)),
            reply_to: p.reply_to.as_deref().map(|t| fill(t, true)),
            headers: p
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), fill(v, true)))
                .collect(),
            attachments: p
                .attachments
                .iter()
                .map(|a| Attachment {
                    filename: a.filename.clone(),
                    content_type: a.content_type.clone(),
                    content: a.content.clone(),
                })
                .collect(),
        })),
    }
}

/// Replaces `{{name}}` (spaces inside allowed) with the recipient's value, else the call's
/// default, else nothing; `{{email}}` is the recipient's address unless given.
fn substitute(
    text: &str,
    own: &HashMap<String, Value>,
    defaults: &HashMap<String, Value>,
    email: &str,
    header: bool,
) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        let Some(len) = rest[start + 2..].find("}}") else {
            break;
        };
        out.push_str(&rest[..start]);
        let name = rest[start + 2..start + 2 + len].trim();
        let value = own
            .get(name)
            .or_else(|| defaults.get(name))
            .map(|v| match v {
                Value::String(s) => s.clone(),
                Value::Null => String::new(),
                other => other.to_string(),
            })
            .unwrap_or_else(|| {
                if name == "email" {
                    email.to_string()
                } else {
                    String::new()
                }
            });
        if header {
            out.extend(
                value
                    .chars()
                    .map(|c| if c == '\r' || c == '\n' { ' ' } else { c }),
            );
        } else {
            out.push_str(&value);
        }
        rest = &rest[start + 2 + len + 2..];
    }
    out.push_str(rest);
    out
}

/// What every message of one call shares: its tags and its send time, checked once.
struct Shared {
    meta: MessageMeta,
    send_at_ms: u64,
}

impl Shared {
    fn from(request: &InjectRequest) -> Result<Shared, ApiError> {
        let send_at_ms = match &request.send_at {
            Some(t) => crate::schedule::parse_time(t).ok_or_else(|| {
                bad_request(format!(
                    "send_at {t:?} is not a time (RFC 3339: 2026-12-01T09:00:00Z)"
                ))
            })?,
            None => 0,
        };
        let mut meta = MessageMeta::default();
        for (key, value, field) in [
            ("tenant", &request.tenant, &mut meta.tenant),
            ("pool", &request.pool, &mut meta.pool),
            ("campaign", &request.campaign, &mut meta.campaign),
        ] {
            if let Some(v) = value {
                let ok = !v.is_empty()
                    && v.len() <= 64
                    && v.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
                if !ok {
                    return Err(bad_request(format!(
                        "{key} {v:?}: use up to 64 letters, digits, '-', '_' or '.'"
                    )));
                }
                *field = Some(v.to_ascii_lowercase());
            }
        }
        // Kept, so that operator actions (flush, resume, release) never send it earlier.
        meta.send_at_ms = (send_at_ms > 0).then_some(send_at_ms);
        Ok(Shared { meta, send_at_ms })
    }
}

fn envelope_for(
    ctx: &Context,
    request: &InjectRequest,
    shared: &Shared,
    rcpts: Vec<usize>,
    client: IpAddr,
) -> Envelope {
    let recipients = rcpts
        .into_iter()
        .map(|i| {
            let mut r =
                Recipient::new(request.recipients[i].email.clone(), None, Notify::NOT_GIVEN);
            r.next_attempt_ms = shared.send_at_ms;
            r
        })
        .collect();
    Envelope {
        id: ctx.intake.next_id(),
        sender: request.envelope_sender.clone(),
        recipients,
        dsn_ret: None,
        dsn_envid: None,
        eight_bit: true,
        smtputf8: false,
        client_ip: client,
        helo: "http".into(),
        arrived_ms: baton_spool::now_ms(),
        size: 0,
        meta: shared.meta.clone(),
    }
}

/// The stored message: our Received: field, then the content with CRLF line ends and a Date:
/// and Message-ID: if it had none.
fn message_bytes(
    ctx: &Context,
    envelope: &Envelope,
    text: &Rendered,
    client: IpAddr,
) -> Result<Vec<u8>, ApiError> {
    let host = &ctx.config.hostname;
    let id = envelope.id;
    let date = jiff::Zoned::now()
        .strftime("%a, %d %b %Y %H:%M:%S %z")
        .to_string();
    let mut out = format!(
        "Received: from api ([{client}])\r\n\tby {host} (Baton) with HTTP id {id};\r\n\t{date}\r\n"
    )
    .into_bytes();
    match text {
        Rendered::Raw(raw) => {
            let content = crlf(raw);
            let head_end = find_blank_line(&content).unwrap_or(content.len());
            let fields = crate::schedule::header_fields(&content[..head_end]);
            let has = |name: &str| fields.iter().any(|(n, _)| n.eq_ignore_ascii_case(name));
            if !has("date") {
                out.extend_from_slice(format!("Date: {date}\r\n").as_bytes());
            }
            if !has("message-id") {
                out.extend_from_slice(format!("Message-ID: <{id}@{host}>\r\n").as_bytes());
            }
            out.extend_from_slice(&content);
            if !out.ends_with(b"\r\n") {
                out.extend_from_slice(b"\r\n");
            }
        }
        Rendered::Parts(p) => out.extend_from_slice(&build_parts(p, &format!("{id}@{host}"))?),
    }
    Ok(out)
}

fn build_parts(p: &Parts, message_id: &str) -> Result<Vec<u8>, ApiError> {
    use base64::Engine;
    use mail_builder::MessageBuilder;
    use mail_builder::headers::address::Address;
    use mail_builder::headers::raw::Raw;
    if p.text_body.is_none() && p.html_body.is_none() {
        return Err(bad_request("content needs text_body or html_body"));
    }
    let address = |text: &str| -> Result<Address<'static>, ApiError> {
        let (name, email) = match text.rsplit_once('<') {
            Some((name, rest)) => (
                Some(name.trim().trim_matches('"').to_string()),
                rest.trim_end_matches('>').trim().to_string(),
            ),
            None => (None, text.trim().to_string()),
        };
        baton_smtp::address::validate_mailbox(&email, false)
            .map_err(|e| bad_request(format!("address {text:?}: {e}")))?;
        Ok(match name.filter(|n| !n.is_empty()) {
            Some(name) => Address::new_address(Some(name), email),
            None => Address::new_address(None::<String>, email),
        })
    };
    let mut builder = MessageBuilder::new()
        .from(address(&p.from)?)
        .subject(p.subject.clone())
        .message_id(message_id.to_string());
    if let Some(r) = &p.reply_to {
        builder = builder.reply_to(address(r)?);
    }
    for (name, value) in &p.headers {
        let valid_name =
            !name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic() && b != b':');
        if !valid_name || value.contains(['\r', '\n']) {
            return Err(bad_request(format!("header {name:?} is not a valid field")));
        }
        builder = builder.header(name.clone(), Raw::new(value.clone()));
    }
    if let Some(t) = &p.text_body {
        builder = builder.text_body(t.clone());
    }
    if let Some(h) = &p.html_body {
        builder = builder.html_body(h.clone());
    }
    for a in &p.attachments {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(a.content.trim())
            .map_err(|e| {
                bad_request(format!(
                    "attachment {:?}: content is not base64: {e}",
                    a.filename
                ))
            })?;
        builder = builder.attachment(a.content_type.clone(), a.filename.clone(), bytes);
    }
    builder
        .write_to_vec()
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

/// Line ends as CRLF.
fn crlf(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() + text.len() / 32);
    let bytes = text.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'\n' && (i == 0 || bytes[i - 1] != b'\r') {
            out.push(b'\r');
        }
        if b == b'\r' && bytes.get(i + 1) != Some(&b'\n') {
            out.extend_from_slice(b"\r\n");
            continue;
        }
        out.push(b);
    }
    out
}

fn find_blank_line(message: &[u8]) -> Option<usize> {
    if message.starts_with(b"\r\n") {
        return Some(0);
    }
    message
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 2)
}

// ---------------------------------------------------------------------------------------
// Status, queue, events

async fn message(
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
    let path = ctx.config.data_dir.join("events/events.jsonl");
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

async fn queue_summary(State(ctx): State<Arc<Context>>) -> Json<Value> {
    match ctx.queue.control(OperatorCommand::Summary).await {
        Ok(summary) => Json(summary.to_json()),
        Err(e) => Json(e.to_json()),
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct QueueAction {
    destination: Option<String>,
    seconds: Option<u64>,
    /// For hold and release: a message id or "ALL".
    id: Option<String>,
}

async fn queue_action(
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
fn queue_command(action: &str, request: QueueAction) -> Result<OperatorCommand, ApiError> {
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

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct EventQuery {
    /// RFC 3339 bounds.
    since: Option<String>,
    until: Option<String>,
    recipient: Option<String>,
    message_id: Option<String>,
    campaign: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    /// Events after this one (the `next` of the previous page).
    after: Option<String>,
    limit: Option<usize>,
    /// "newest": the latest `limit` events, newest first.
    order: Option<String>,
}

async fn events(
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
    let path = ctx.config.data_dir.join("events/events.jsonl");
    let page = tokio::task::spawn_blocking(move || baton_events::query(&path, &filter))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(Json(page))
}

async fn suppressions(State(ctx): State<Arc<Context>>) -> Json<Value> {
    Json(json!({"suppressions": ctx.suppressions.list()}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Suppress {
    email: String,
    reason: Option<String>,
}

async fn suppress(
    State(ctx): State<Arc<Context>>,
    request: Result<Json<Suppress>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let request = body(request)?;
    baton_smtp::address::validate_mailbox(&request.email, false)
        .map_err(|e| bad_request(format!("email {:?}: {e}", request.email)))?;
    let reason = request
        .reason
        .unwrap_or_else(|| "added through the API".into());
    let added = ctx.suppressions.add(&request.email, &reason);
    if added {
        let mut e =
            ctx.events
                .new_event(baton_events::EventKind::Suppression, "", &request.email, "");
        e.response = Some(format!("added to the suppression list: {reason}"));
        ctx.events.emit(e);
    }
    let status = if added {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        Json(json!({"email": request.email.to_ascii_lowercase(), "added": added})),
    ))
}

async fn unsuppress(
    State(ctx): State<Arc<Context>>,
    Path(email): Path<String>,
) -> Result<Json<Value>, ApiError> {
    if ctx.suppressions.remove(&email) {
        Ok(Json(
            json!({"email": email.to_ascii_lowercase(), "removed": true}),
        ))
    } else {
        Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("{email} is not on the suppression list"),
        ))
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct StatsQuery {
    since: Option<String>,
    until: Option<String>,
    by: Option<String>,
}

async fn stats(
    State(ctx): State<Arc<Context>>,
    query: Result<Query<StatsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) = query.map_err(|e| bad_request(e.body_text()))?;
    let by = q.by.unwrap_or_else(|| "destination".into());
    if !matches!(
        by.as_str(),
        "destination" | "campaign" | "tenant" | "source"
    ) {
        return Err(bad_request(format!(
            "by {by:?}: destination, campaign, tenant or source"
        )));
    }
    let since = time_param(&q.since, "since")?;
    let until = time_param(&q.until, "until")?;
    ctx.events.written().await;
    let path = ctx.config.data_dir.join("events/events.jsonl");
    let answer = tokio::task::spawn_blocking(move || baton_events::stats(&path, since, until, &by))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(Json(answer))
}

/// An RFC 3339 time, or a span back from now ("1h", "7d").
fn time_param(value: &Option<String>, name: &str) -> Result<Option<jiff::Timestamp>, ApiError> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn substitutions() {
        let own: HashMap<String, Value> = [("first_name".to_string(), json!("Ann\r\nBcc: x"))]
            .into_iter()
            .collect();
        let defaults: HashMap<String, Value> = [("n".to_string(), json!(3))].into_iter().collect();
        assert_eq!(
            substitute(
                "Hi {{ first_name }}, {{n}} {{missing}}{{email}}",
                &own,
                &defaults,
                "a@b",
                true
            ),
            "Hi Ann  Bcc: x, 3 a@b"
        );
        assert_eq!(
            substitute("x {{first_name}} {{unclosed", &own, &defaults, "", false),
            "x Ann\r\nBcc: x {{unclosed"
        );
    }

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

    #[test]
    fn headers_as_an_object_or_as_pairs() {
        let object: Parts =
            serde_json::from_str(r#"{"from": "a@b.test", "headers": {"X-B": "2", "X-A": "1"}}"#)
                .unwrap();
        assert_eq!(
            object.headers,
            [
                ("X-B".to_string(), "2".to_string()),
                ("X-A".to_string(), "1".to_string())
            ]
        );
        let pairs: Parts = serde_json::from_str(
            r#"{"from": "a@b.test", "headers": [["Received-By", "x"], ["Received-By", "y"]]}"#,
        )
        .unwrap();
        assert_eq!(pairs.headers.len(), 2);
        assert!(serde_json::from_str::<Parts>(r#"{"from": "a", "headers": {"X": 1}}"#).is_err());
    }

    #[test]
    fn line_ends_become_crlf() {
        assert_eq!(crlf("a\nb\r\nc\rd"), b"a\r\nb\r\nc\r\nd".to_vec());
    }
}
