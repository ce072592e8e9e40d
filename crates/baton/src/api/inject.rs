//! `POST /api/v1/messages`: the request as sent, the limits of one call, the suppressed
//! recipients left out, and the plan of messages to build.

use super::*;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct InjectRequest {
    pub(super) envelope_sender: String,
    pub(super) content: Content,
    pub(super) recipients: Vec<InjectRecipient>,
    /// Defaults for every recipient's substitutions.
    #[serde(default)]
    pub(super) substitutions: HashMap<String, Value>,
    pub(super) campaign: Option<String>,
    pub(super) tenant: Option<String>,
    pub(super) pool: Option<String>,
    /// RFC 3339 (or RFC 5322) time before which nothing is sent.
    pub(super) send_at: Option<String>,
    /// Add List-Unsubscribe (an HTTPS one-click link and, with a return-path domain, a mailto)
    /// and List-Unsubscribe-Post (RFC 8058): one message per recipient. Unset: the tenant's
    /// default (`[bounces] list_unsubscribe_tenants`).
    pub(super) list_unsubscribe: Option<bool>,
}

#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum Content {
    /// A whole RFC 5322 message.
    Raw(String),
    Parts(Box<Parts>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Parts {
    pub(super) from: String,
    #[serde(default)]
    pub(super) subject: String,
    pub(super) text_body: Option<String>,
    pub(super) html_body: Option<String>,
    pub(super) reply_to: Option<String>,
    /// `{"X-Name": "value"}`, or `[["X-Name", "value"], ...]` when a name repeats.
    #[serde(default, deserialize_with = "header_list")]
    pub(super) headers: Vec<(String, String)>,
    #[serde(default)]
    pub(super) attachments: Vec<Attachment>,
}

/// Header fields given as an object or as a list of pairs.
pub(super) fn header_list<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Vec<(String, String)>, D::Error> {
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
pub(super) struct Attachment {
    pub(super) filename: String,
    pub(super) content_type: String,
    /// Base64.
    pub(super) content: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct InjectRecipient {
    pub(super) email: String,
    #[serde(default)]
    pub(super) substitutions: HashMap<String, Value>,
}

pub(super) async fn inject(
    State(ctx): State<Arc<Context>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Result<Json<InjectRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let mut request = body(request)?;
    if let Some(why) = ctx.backpressure.refusal() {
        return Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("insufficient system storage: {why}; try again later"),
        ));
    }
    normalise_addresses(&mut request)?;
    request.list_unsubscribe = Some(wants_list_unsubscribe(&ctx, &request));
    let suppressed = leave_out_suppressed(&ctx, &mut request);
    if request.recipients.is_empty() && !suppressed.is_empty() {
        return Ok((
            StatusCode::ACCEPTED,
            Json(json!({"ids": [], "recipients": 0, "suppressed": suppressed})),
        ));
    }
    check_list_unsubscribe(&ctx, &request)?;
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
    let messages = build_all(&ctx, &request, &shared, plan, client)?;
    let total = messages.len();
    let (ids, failure) = queue_all(&ctx, messages).await;
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

/// Builds every message of the call, each checked against the call's limits as it is built.
fn build_all(
    ctx: &Context,
    request: &InjectRequest,
    shared: &Shared,
    plan: Vec<Planned>,
    client: IpAddr,
) -> Result<Vec<(Envelope, Vec<u8>)>, ApiError> {
    let limits = CallLimits::of(ctx);
    let mut built = 0u64;
    plan.into_iter()
        .map(|planned| {
            let text = planned.render(request);
            let envelope = envelope_for(ctx, request, shared, planned.rcpts, client);
            let extra = match request.list_unsubscribe {
                Some(true) => list_unsubscribe(ctx, &envelope),
                _ => String::new(),
            };
            let bytes = message_bytes(ctx, &envelope, &text, client, &extra)?;
            built = built.saturating_add(bytes.len() as u64);
            limits.check(bytes.len() as u64, built)?;
            Ok((envelope, bytes))
        })
        .collect()
}

/// Queues the built messages concurrently through intake: the ids, in the call's order, of
/// those on disk, and why one was not (if one was not).
async fn queue_all(
    ctx: &Arc<Context>,
    messages: Vec<(Envelope, Vec<u8>)>,
) -> (Vec<Option<String>>, Option<String>) {
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
    (ids, failure)
}

/// The size limits of one inject call: each message as SMTP's (`[limits] max_message_size`),
/// and all of them together (`[http] max_inject_bytes`).
pub(super) struct CallLimits {
    pub(super) message: u64,
    pub(super) call: u64,
}

impl CallLimits {
    pub(super) fn of(ctx: &Context) -> CallLimits {
        CallLimits {
            message: ctx.config.limits.max_message_size,
            call: ctx
                .config
                .http
                .as_ref()
                .map_or(256 << 20, |h| h.max_inject_bytes),
        }
    }

    pub(super) fn check(&self, size: u64, built: u64) -> Result<(), ApiError> {
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
pub(super) fn normalise_addresses(request: &mut InjectRequest) -> Result<(), ApiError> {
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
pub(super) fn leave_out_suppressed(ctx: &Context, request: &mut InjectRequest) -> Vec<String> {
    let mut left_out = Vec::new();
    request.recipients.retain(|r| {
        let entry = ctx.intake.suppressed(
            &r.email,
            &request.envelope_sender,
            request.tenant.as_deref(),
            request.campaign.as_deref(),
        );
        if entry.is_some() {
            left_out.push(r.email.clone());
        }
        entry.is_none()
    });
    left_out
}

/// The call's `list_unsubscribe`, else its tenant's default.
fn wants_list_unsubscribe(ctx: &Context, request: &InjectRequest) -> bool {
    request.list_unsubscribe.unwrap_or_else(|| {
        request.tenant.as_deref().is_some_and(|t| {
            ctx.config
                .bounces
                .list_unsubscribe_tenants
                .contains(&t.to_ascii_lowercase())
        })
    })
}

/// `list_unsubscribe` needs the public address its links point at, and content that does
/// not already carry the fields.
fn check_list_unsubscribe(ctx: &Context, request: &InjectRequest) -> Result<(), ApiError> {
    if request.list_unsubscribe != Some(true) {
        return Ok(());
    }
    if ctx.config.bounces.unsubscribe_url.is_none() {
        return Err(bad_request(
            "list_unsubscribe needs [bounces] unsubscribe_url, the public https address of this API",
        ));
    }
    let has_own = match &request.content {
        Content::Raw(raw) => {
            let content = crlf(raw);
            let head_end = find_blank_line(&content).unwrap_or(content.len());
            crate::schedule::header_fields(&content[..head_end])
                .iter()
                .any(|(n, _)| n.to_ascii_lowercase().starts_with("list-unsubscribe"))
        }
        Content::Parts(p) => p
            .headers
            .iter()
            .any(|(n, _)| n.to_ascii_lowercase().starts_with("list-unsubscribe")),
    };
    if has_own {
        return Err(bad_request(
            "the content has its own List-Unsubscribe: drop it or list_unsubscribe",
        ));
    }
    Ok(())
}

/// The List-Unsubscribe fields for a message to one recipient (RFC 2369, RFC 8058): a signed
/// one-click link to this server's API and, when the message has a return-path domain, a
/// mailto address there. Both carry the same token; both end in an `unsubscribe` event and a
/// suppression in the message's list (or tenant) scope.
pub(super) fn list_unsubscribe(ctx: &Context, envelope: &Envelope) -> String {
    use crate::returns::token::{Purpose, UNSUBSCRIBE_PREFIX};
    let token = ctx
        .returns
        .tokens
        .make(Purpose::Unsubscribe, envelope.id, 0);
    let base = ctx
        .config
        .bounces
        .unsubscribe_url
        .clone()
        .unwrap_or_default();
    let mut uris = vec![format!("<{base}/unsubscribe/{token}>")];
    let meta = &envelope.meta;
    if let Some(domain) = ctx
        .config
        .bounces
        .domain_for(meta.tenant.as_deref(), meta.pool.as_deref())
    {
        uris.push(format!("<mailto:{UNSUBSCRIBE_PREFIX}{token}@{domain}>"));
    }
    format!(
        "List-Unsubscribe: {}\r\nList-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n",
        uris.join(", ")
    )
}

/// One message per distinct text: without placeholders every recipient shares one message;
/// with them each recipient gets their own. Returns (recipient indexes, rendered content).
pub(super) fn plan_injection(
    ctx: &Context,
    request: &InjectRequest,
) -> Result<Vec<Planned>, ApiError> {
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
    if !has_placeholders(&request.content) && request.list_unsubscribe != Some(true) {
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
pub(super) struct Planned {
    pub(super) rcpts: Vec<usize>,
    pub(super) personal: Option<usize>,
}

impl Planned {
    pub(super) fn render(&self, request: &InjectRequest) -> Rendered {
        let empty = HashMap::new();
        let (own, email) = match self.personal.and_then(|i| request.recipients.get(i)) {
            Some(r) => (&r.substitutions, r.email.as_str()),
            None => (&empty, ""),
        };
        render(&request.content, own, &request.substitutions, email)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
