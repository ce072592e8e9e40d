//! What comes back to the return path: bounces that arrive after the attempt (out-of-band
//! DSNs), feedback reports (complaints), automatic replies and mailto unsubscribes. Mail that
//! Baton sends leaves with a signed VERP return path ([`token`]); a report addressed to one
//! is tied to its message and recipient by the token alone, never by what the report claims,
//! and becomes an event on that recipient (`bounce` with `async: true`, `complaint`,
//! `auto_reply`, `unsubscribe`), a suppression where it calls for one, and a count.
//!
//! Reports arrive as mail on the MX listener and go through the queue like any message (so
//! they are on disk before the 250); the delivery agent for return-path domains hands each
//! one here. Unmatched or unreadable reports are kept in `data_dir/returns/unmatched/` and
//! counted, never lost.
//!
//! Owns that reading and the unmatched folder; it must not touch the queue or the spool.

pub mod token;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use baton_bounce::{Class, Record};
use baton_events::{EventKind, Events};
use baton_spool::QueueId;

use crate::suppression::{Entry, Scope, Suppressions};
use token::{Purpose, TokenRef, Tokens};

/// What became of one report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Taken {
    /// Applied to its message's recipient as these events.
    Applied(Vec<EventKind>),
    /// Kept in the unmatched folder, for this reason.
    Unmatched(String),
}

/// The recipient a report is about, as its message's reception logged it.
struct Original {
    message_id: String,
    recipient: String,
    sender: String,
    campaign: Option<String>,
    tenant: Option<String>,
}

/// Reads reports and applies them.
pub struct Returns {
    pub tokens: Arc<Tokens>,
    suppressions: Arc<Suppressions>,
    events: Events,
    events_dir: PathBuf,
    unmatched_dir: PathBuf,
    rules: Option<Arc<baton_bounce::Rules>>,
}

static UNMATCHED_SEQ: AtomicU64 = AtomicU64::new(0);

/// Most reports the unmatched folder keeps; past it, unmatched reports are counted and
/// dropped (an operator reads and empties the folder).
pub const MAX_UNMATCHED: usize = 10_000;

impl Returns {
    pub fn new(
        config: &crate::config::Config,
        tokens: Arc<Tokens>,
        suppressions: Arc<Suppressions>,
        events: Events,
    ) -> Returns {
        Returns {
            tokens,
            suppressions,
            events,
            events_dir: config.data_dir.join("events"),
            unmatched_dir: config.data_dir.join("returns").join("unmatched"),
            rules: config.bounces.rules.clone(),
        }
    }

    /// Reads the report `body` of message `id`, sent to `rcpt` (an address at a return-path
    /// domain), and applies it; its suppressions are on disk when this returns. Blocking: it
    /// reads the event log and may write a file. Err only when an unmatched report cannot be
    /// kept (the caller defers it).
    pub fn take(&self, id: QueueId, rcpt: &str, body: &[u8]) -> std::io::Result<Taken> {
        let taken = self.read_and_apply(rcpt, body);
        let label = match &taken {
            Taken::Applied(kinds) => kinds.first().map_or("ignored", |k| k.as_str()),
            Taken::Unmatched(_) => "unmatched",
        };
        metrics::counter!("baton_returns_total", "result" => label).increment(1);
        if let Taken::Unmatched(why) = &taken {
            match self.keep_unmatched(id, body)? {
                Some(path) => {
                    tracing::info!(rcpt, path = %path.display(), "report kept as unmatched: {why}")
                }
                None => {
                    metrics::counter!("baton_returns_total", "result" => "unmatched_dropped")
                        .increment(1);
                    tracing::warn!(
                        rcpt,
                        "unmatched report dropped: the folder is at its limit ({why})"
                    );
                }
            }
        }
        crate::suppression::flush_writes();
        Ok(taken)
    }

    fn read_and_apply(&self, rcpt: &str, body: &[u8]) -> Taken {
        let from_address = self.tokens.in_address(rcpt);
        if let Some((Purpose::Unsubscribe, token)) = from_address {
            return match self.original(token) {
                Some(original) => Taken::Applied(vec![self.unsubscribe(&original, "mailto")]),
                None => Taken::Unmatched(format!("message {} not in the event log", token.id)),
            };
        }
        let token = match from_address {
            Some((_, token)) => token,
            None => match self.tokens.find_in(&String::from_utf8_lossy(body)) {
                Some(token) => token,
                None => return Taken::Unmatched("no valid return-path token".into()),
            },
        };
        let Some(original) = self.original(token) else {
            return Taken::Unmatched(format!("message {} not in the event log", token.id));
        };
        let records = baton_bounce::read(body, self.rules.as_deref());
        // The token names the recipient; the report's own recipient field may be an alias.
        let record = records
            .iter()
            .find(|r| r.recipient.eq_ignore_ascii_case(&original.recipient))
            .or(records.first());
        match record {
            Some(record) => Taken::Applied(self.apply(&original, record).into_iter().collect()),
            None => Taken::Unmatched("not a report Baton can read".into()),
        }
    }

    /// The message and recipient a token names, from the event log.
    fn original(&self, token: TokenRef) -> Option<Original> {
        let message_id = token.id.to_string();
        let received = baton_events::received(&self.events_dir, &message_id)?;
        let recipient = received.recipients.get(token.rcpt as usize)?.clone();
        Some(Original {
            message_id,
            recipient,
            sender: received.sender,
            campaign: received.campaign,
            tenant: received.tenant,
        })
    }

    /// One report's event and suppression; none for a success report.
    fn apply(&self, original: &Original, record: &Record) -> Option<EventKind> {
        let kind = report_kind(record)?;
        if kind == EventKind::Unsubscribe {
            return Some(self.unsubscribe(original, "feedback report"));
        }
        let scope = Scope::of_tenant(original.tenant.as_deref());
        if kind == EventKind::Complaint && self.already(original, &scope, "complaint") {
            // The same complaint again (a resent report): counted once.
            return Some(kind);
        }
        let mut e = self.event(kind, original);
        e.status = (!record.status.is_empty()).then(|| record.status.clone());
        e.response = Some(cut(&record.diagnostic, 1000));
        e.class = Some(record.class.as_str());
        e.hard = matches!(kind, EventKind::Bounce).then_some(record.hard);
        let event_id = e.id.clone();
        self.events.emit(e);
        let suppress = match kind {
            EventKind::Bounce if record.hard => Some((Scope::Global, record.class.as_str())),
            EventKind::Complaint if Self::is_spam_complaint(record) => Some((scope, "complaint")),
            _ => None,
        };
        if let Some((scope, reason)) = suppress {
            self.suppress(original, scope, reason, &record.diagnostic, event_id);
        }
        Some(kind)
    }

    /// Whether a complaint of this feedback type is the recipient calling the mail spam (not
    /// `not-spam`, an authentication or virus report): only those suppress.
    fn is_spam_complaint(record: &Record) -> bool {
        matches!(
            record.feedback_type.as_deref(),
            None | Some("abuse" | "fraud")
        )
    }

    /// A recipient asked off the list: suppressed in the message's list (or tenant) scope.
    fn unsubscribe(&self, original: &Original, how: &str) -> EventKind {
        let scope = Scope::narrowest(original.tenant.as_deref(), original.campaign.as_deref());
        if self.already(original, &scope, "unsubscribe") {
            // A second click, or the mailto after the link: counted once.
            return EventKind::Unsubscribe;
        }
        let mut e = self.event(EventKind::Unsubscribe, original);
        e.response = Some(format!("unsubscribed by {how} from {scope}"));
        e.class = Some(Class::Unsubscribe.as_str());
        let event_id = e.id.clone();
        self.events.emit(e);
        self.suppress(original, scope, "unsubscribe", how, event_id);
        EventKind::Unsubscribe
    }

    /// Applies an unsubscribe named by a token of the one-click link; false if the token is
    /// not valid or its message is unknown.
    pub fn one_click(&self, token: &str) -> bool {
        let Some(token) = self.tokens.check(Purpose::Unsubscribe, token) else {
            return false;
        };
        match self.original(token) {
            Some(original) => {
                self.unsubscribe(&original, "one-click");
                true
            }
            None => false,
        }
    }

    /// Whether the recipient is already suppressed in `scope` for `reason`.
    fn already(&self, o: &Original, scope: &Scope, reason: &str) -> bool {
        self.suppressions
            .entry(&o.recipient, scope)
            .is_some_and(|e| e.reason == reason)
    }

    fn event(&self, kind: EventKind, o: &Original) -> baton_events::Event {
        let mut e = self
            .events
            .new_event(kind, &o.message_id, &o.recipient, &o.sender);
        e.is_async = Some(true);
        e.campaign = o.campaign.clone();
        e.tenant = o.tenant.clone();
        e
    }

    fn suppress(&self, o: &Original, scope: Scope, reason: &str, detail: &str, source: String) {
        let mut entry = Entry::new(&o.recipient, &scope, reason);
        entry.detail = Some(cut(detail, 1000));
        entry.source = Some(source);
        if self.suppressions.insert(entry) {
            let mut s = self.event(EventKind::Suppression, o);
            s.response = Some(format!("added to the suppression list ({scope}): {reason}"));
            self.events.emit(s);
        }
    }

    /// Writes report `id` to the unmatched folder, once however many of its recipients are
    /// unmatched (fsynced, and its directory entry); its path, or None when the folder holds
    /// [`MAX_UNMATCHED`] files already (anyone can send mail to `postmaster@`).
    fn keep_unmatched(&self, id: QueueId, body: &[u8]) -> std::io::Result<Option<PathBuf>> {
        use std::io::Write;
        std::fs::create_dir_all(&self.unmatched_dir)?;
        let path = self.unmatched_dir.join(format!("{id}.eml"));
        if path.exists() {
            return Ok(Some(path));
        }
        let held = std::fs::read_dir(&self.unmatched_dir)?
            .take(MAX_UNMATCHED)
            .count();
        if held >= MAX_UNMATCHED {
            return Ok(None);
        }
        let seq = UNMATCHED_SEQ.fetch_add(1, Ordering::Relaxed);
        let tmp = self.unmatched_dir.join(format!(".{id}.{seq}.tmp"));
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(body)?;
        file.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(&self.unmatched_dir)?.sync_all()?;
        Ok(Some(path))
    }
}

/// The event a report's record becomes; none for a success report.
pub fn report_kind(record: &Record) -> Option<EventKind> {
    Some(match record.class {
        Class::Delivered => return None,
        Class::Complaint => EventKind::Complaint,
        Class::AutoReply => EventKind::AutoReply,
        Class::Unsubscribe => EventKind::Unsubscribe,
        _ if record.status.starts_with('4') => EventKind::TransientFailure,
        _ => EventKind::Bounce,
    })
}

fn cut(text: &str, max: usize) -> String {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}
