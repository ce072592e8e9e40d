//! Keeping lists clean: the suppression list (`/api/v1/suppressions`: list with filters and
//! pages, add, remove, CSV export and import) and the one-click unsubscribe link
//! (`/unsubscribe/{token}`, RFC 8058), which needs no login: its token is signed.

use super::*;
use crate::suppression::{Entry, ListFilter, Scope};

/// Most entries one page lists.
const MAX_PAGE: usize = 10_000;
/// Most lines one CSV import takes.
const MAX_IMPORT: usize = 1_000_000;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct ListQuery {
    scope: Option<String>,
    reason: Option<String>,
    /// A part of the address.
    email: Option<String>,
    /// The `next` of the previous page.
    after: Option<String>,
    limit: Option<usize>,
    /// `csv` for a CSV export of every matching entry.
    format: Option<String>,
}

pub(super) async fn suppressions(
    State(ctx): State<Arc<Context>>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| bad_request(e.body_text()))?;
    let scope = q
        .scope
        .as_deref()
        .map(|s| Scope::parse(s).map(|s| s.to_string()))
        .transpose()
        .map_err(bad_request)?;
    let csv = q.format.as_deref() == Some("csv");
    let limit = if csv {
        usize::MAX
    } else {
        q.limit.unwrap_or(1000).clamp(1, MAX_PAGE)
    };
    let filter = ListFilter {
        scope,
        reason: q.reason,
        email: q.email,
        after: q.after,
        limit,
    };
    let page = ctx.suppressions.page(&filter);
    if csv {
        let text = to_csv(&page);
        return Ok(([(header::CONTENT_TYPE, "text/csv; charset=utf-8")], text).into_response());
    }
    let next = (page.len() == limit)
        .then(|| page.last().map(|e| format!("{}|{}", e.scope, e.email)))
        .flatten();
    Ok(Json(json!({"suppressions": page, "next": next})).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Suppress {
    email: String,
    reason: Option<String>,
    scope: Option<String>,
    /// RFC 3339, or a span from now ("30d").
    expires: Option<String>,
}

pub(super) async fn suppress(
    State(ctx): State<Arc<Context>>,
    request: Result<Json<Suppress>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let request = body(request)?;
    let entry = entry_of(
        &request.email,
        request.scope.as_deref(),
        request.reason.as_deref(),
        request.expires.as_deref(),
        "api",
    )?;
    let (email, scope) = (entry.email.clone(), entry.scope.clone());
    let added = add(&ctx, entry);
    let status = if added {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        Json(json!({"email": email, "scope": scope, "added": added})),
    ))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct ScopeQuery {
    scope: Option<String>,
}

pub(super) async fn unsuppress(
    State(ctx): State<Arc<Context>>,
    Path(email): Path<String>,
    query: Result<Query<ScopeQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) = query.map_err(|e| bad_request(e.body_text()))?;
    let scope = Scope::parse(q.scope.as_deref().unwrap_or("global")).map_err(bad_request)?;
    if ctx.suppressions.remove_in(&email, &scope) {
        Ok(Json(json!({
            "email": crate::suppression::normalise(&email),
            "scope": scope.to_string(),
            "removed": true
        })))
    } else {
        Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("{email} is not on the suppression list in scope {scope}"),
        ))
    }
}

/// `POST /api/v1/suppressions/import`: CSV lines `email,scope,reason,expires` (a header line
/// naming `email` first is skipped; scope, reason and expires may be empty).
pub(super) async fn import(
    State(ctx): State<Arc<Context>>,
    text: String,
) -> Result<Json<Value>, ApiError> {
    let (mut added, mut present) = (0u64, 0u64);
    let mut entries = Vec::new();
    for (n, line) in text.lines().enumerate().take(MAX_IMPORT) {
        let fields: Vec<&str> = line
            .split(',')
            .map(|f| f.trim().trim_matches('"'))
            .collect();
        let email = fields.first().copied().unwrap_or("");
        if email.is_empty() || (n == 0 && email.eq_ignore_ascii_case("email")) {
            continue;
        }
        let field = |i: usize| fields.get(i).copied().filter(|f| !f.is_empty());
        let entry = entry_of(email, field(1), field(2), field(3), "import")
            .map_err(|ApiError(_, why)| bad_request(format!("line {}: {why}", n + 1)))?;
        entries.push(entry);
    }
    // Every line is checked before any is added.
    for entry in entries {
        if add(&ctx, entry) {
            added += 1;
        } else {
            present += 1;
        }
    }
    Ok(Json(json!({"added": added, "already_present": present})))
}

/// A checked entry from the API's fields.
fn entry_of(
    email: &str,
    scope: Option<&str>,
    reason: Option<&str>,
    expires: Option<&str>,
    source: &str,
) -> Result<Entry, ApiError> {
    let normal = crate::suppression::normalise(email);
    let checked = match normal.strip_prefix('@') {
        Some(domain) => baton_smtp::address::validate_domain(domain),
        None => baton_smtp::address::validate_mailbox(&normal, false),
    };
    checked.map_err(|e| bad_request(format!("email {email:?}: {e}")))?;
    let scope = Scope::parse(scope.unwrap_or("global")).map_err(bad_request)?;
    let mut entry = Entry::new(&normal, &scope, reason.unwrap_or("manual"));
    entry.source = Some(source.into());
    if let Some(text) = expires {
        let at = expires_at(text).ok_or_else(|| {
            bad_request(format!(
                "expires {text:?}: an RFC 3339 time or a span like 30d"
            ))
        })?;
        entry.expires = Some(at.to_string());
    }
    Ok(entry)
}

/// An RFC 3339 time, or a span forward from now ("30d").
fn expires_at(text: &str) -> Option<jiff::Timestamp> {
    if let Ok(t) = text.parse::<jiff::Timestamp>() {
        return Some(t);
    }
    let secs = crate::config::parse_duration(text)?;
    let secs = i64::try_from(secs).ok()?;
    jiff::Timestamp::now()
        .checked_add(jiff::SignedDuration::from_secs(secs))
        .ok()
}

/// Adds an entry with its `suppression` event; false if it was there.
fn add(ctx: &Context, entry: Entry) -> bool {
    let (email, scope, reason) = (
        entry.email.clone(),
        entry.scope.clone(),
        entry.reason.clone(),
    );
    let added = ctx.suppressions.insert(entry);
    if added {
        let mut e = ctx
            .events
            .new_event(baton_events::EventKind::Suppression, "", &email, "");
        e.response = Some(format!("added to the suppression list ({scope}): {reason}"));
        ctx.events.emit(e);
    }
    added
}

fn to_csv(entries: &[Entry]) -> String {
    let quote = |f: &str| {
        if f.contains([',', '"', '\n', '\r']) {
            format!("\"{}\"", f.replace('"', "\"\"").replace(['\r', '\n'], " "))
        } else {
            f.to_string()
        }
    };
    let mut out = String::from("email,scope,reason,expires,since,source\n");
    for e in entries {
        let fields = [
            e.email.as_str(),
            &e.scope,
            &e.reason,
            e.expires.as_deref().unwrap_or(""),
            &e.since,
            e.source.as_deref().unwrap_or(""),
        ];
        let line: Vec<String> = fields.iter().map(|f| quote(f)).collect();
        out.push_str(&line.join(","));
        out.push('\n');
    }
    out
}

/// `GET /unsubscribe/{token}`: a page with one button (a GET must not unsubscribe: mail
/// scanners follow links).
pub(super) async fn unsubscribe_page(Path(token): Path<String>) -> Response {
    let token: String = token
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .collect();
    let page = format!(
        "<!doctype html><meta charset=utf-8><title>Unsubscribe</title>\
         <form method=post action=\"/unsubscribe/{token}\">\
         <input type=hidden name=List-Unsubscribe value=One-Click>\
         <p><button type=submit>Unsubscribe</button></p></form>"
    );
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], page).into_response()
}

/// `POST /unsubscribe/{token}`: the one-click unsubscribe (RFC 8058); 200 with no login.
pub(super) async fn one_click(
    State(ctx): State<Arc<Context>>,
    Path(token): Path<String>,
) -> Result<Json<Value>, ApiError> {
    ctx.events.written().await;
    let returns = ctx.returns.clone();
    let applied = tokio::task::spawn_blocking(move || returns.one_click(&token))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    if applied {
        Ok(Json(json!({"unsubscribed": true})))
    } else {
        Err(ApiError(
            StatusCode::NOT_FOUND,
            "this unsubscribe link is not valid (or its message is no longer known)".into(),
        ))
    }
}
