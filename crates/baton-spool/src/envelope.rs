//! What the spool keeps about a message besides its body: the envelope and each recipient's
//! state. Plain data; serialised with postcard into journal records.

use std::fmt;
use std::net::IpAddr;
use std::ops::BitOr;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// A message's queue id, the one every reply, view and event uses. 64 bits: milliseconds since
/// the Unix epoch in the high 44 bits, a sequence in the low 20. Shown as 16 hex digits, so
/// ids sort by arrival.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct QueueId(pub u64);

impl fmt::Display for QueueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016X}", self.0)
    }
}

impl FromStr for QueueId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 16 {
            return Err(format!("queue id {s:?} should be 16 hex digits"));
        }
        u64::from_str_radix(s, 16)
            .map(QueueId)
            .map_err(|_| format!("queue id {s:?} should be 16 hex digits"))
    }
}

/// Hands out unique, increasing queue ids, also across restarts (seeded with the largest id
/// found in the spool) and when the clock steps back.
#[derive(Debug, Default)]
pub struct IdGenerator {
    last: AtomicU64,
}

impl IdGenerator {
    pub fn after(last: QueueId) -> Self {
        IdGenerator {
            last: AtomicU64::new(last.0),
        }
    }

    pub fn next(&self) -> QueueId {
        let now = now_ms() << 20;
        let mut last = self.last.load(Ordering::Relaxed);
        loop {
            let candidate = now.max(last + 1);
            match self.last.compare_exchange_weak(
                last,
                candidate,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return QueueId(candidate),
                Err(actual) => last = actual,
            }
        }
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// DSN `RET` (RFC 3461).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DsnRet {
    Full,
    Headers,
}

/// Where a recipient stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RcptState {
    Queued,
    Deferred,
    Delivered,
    Bounced,
    Expired,
    /// Removed by the operator, without a DSN.
    Deleted,
}

impl RcptState {
    pub fn as_str(self) -> &'static str {
        match self {
            RcptState::Queued => "queued",
            RcptState::Deferred => "deferred",
            RcptState::Delivered => "delivered",
            RcptState::Bounced => "bounced",
            RcptState::Expired => "expired",
            RcptState::Deleted => "deleted",
        }
    }

    /// Delivered, bounced or expired: nothing more will be tried.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            RcptState::Delivered | RcptState::Bounced | RcptState::Expired | RcptState::Deleted
        )
    }
}

/// DSN `NOTIFY` (RFC 3461 §4.1) as flags: NEVER, or any of SUCCESS, FAILURE and DELAY; none
/// when the client did not give it. Stored as its bits (1 NEVER, 2 SUCCESS, 4 FAILURE, 8 DELAY:
/// a plain `u8` in the journal and the API's `"notify"` number).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Notify(u8);

impl Notify {
    pub const NEVER: Notify = Notify(1);
    pub const SUCCESS: Notify = Notify(2);
    pub const FAILURE: Notify = Notify(4);
    pub const DELAY: Notify = Notify(8);
    /// NOTIFY was not given (RFC 3461's default applies).
    pub const NOT_GIVEN: Notify = Notify(0);

    pub const fn from_bits(bits: u8) -> Notify {
        Notify(bits)
    }

    pub const fn bits(self) -> u8 {
        self.0
    }

    /// NOTIFY was given (any keyword).
    pub const fn is_given(self) -> bool {
        self.0 != 0
    }

    /// Every flag of `other` is set.
    pub const fn contains(self, other: Notify) -> bool {
        self.0 & other.0 == other.0 && other.0 != 0
    }

    pub const fn is_never(self) -> bool {
        self.contains(Notify::NEVER)
    }

    /// A failure notice is wanted: NOTIFY=FAILURE, or NOTIFY not given (RFC 3461 §4.1: the
    /// default is FAILURE,DELAY); never with NOTIFY=NEVER.
    pub const fn wants_failure(self) -> bool {
        !self.is_never() && (!self.is_given() || self.contains(Notify::FAILURE))
    }

    /// A delay notice is wanted: NOTIFY=DELAY, or NOTIFY not given; never with NOTIFY=NEVER.
    pub const fn wants_delay(self) -> bool {
        !self.is_never() && (!self.is_given() || self.contains(Notify::DELAY))
    }

    /// A success notice is wanted: only when NOTIFY=SUCCESS was given.
    pub const fn wants_success(self) -> bool {
        self.contains(Notify::SUCCESS)
    }
}

impl BitOr for Notify {
    type Output = Notify;
    fn bitor(self, rhs: Notify) -> Notify {
        Notify(self.0 | rhs.0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recipient {
    pub address: String,
    /// DSN ORCPT address (type rfc822).
    pub orcpt: Option<String>,
    /// DSN NOTIFY.
    pub notify: Notify,
    pub state: RcptState,
    /// Every delivery attempt so far, oldest first.
    pub attempts: Vec<Attempt>,
    /// When the next attempt is due (ms since the epoch); 0 = as soon as possible.
    pub next_attempt_ms: u64,
    /// A delay DSN has been sent for this recipient.
    pub delay_notified: bool,
}

impl Recipient {
    pub fn new(address: String, orcpt: Option<String>, notify: Notify) -> Self {
        Recipient {
            address,
            orcpt,
            notify,
            state: RcptState::Queued,
            attempts: Vec::new(),
            next_attempt_ms: 0,
            delay_notified: false,
        }
    }
}

/// One delivery attempt's outcome for one recipient.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    pub at_ms: u64,
    /// SMTP reply code (0 when there was no reply: DNS or connection trouble).
    pub code: u16,
    /// Enhanced status code, e.g. "4.2.0".
    pub status: String,
    /// The remote reply text, or what went wrong.
    pub diagnostic: String,
    /// The host that answered, if any.
    pub remote_mta: Option<String>,
}

/// A change to one recipient, appended to the journal after a delivery attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecipientUpdate {
    pub id: QueueId,
    pub rcpt: u32,
    pub state: RcptState,
    pub attempt: Option<Attempt>,
    pub next_attempt_ms: u64,
    pub delay_notified: bool,
}

impl RecipientUpdate {
    /// Applies the update to the envelope it belongs to.
    pub fn apply(&self, envelope: &mut Envelope) {
        if let Some(r) = envelope.recipients.get_mut(self.rcpt as usize) {
            r.state = self.state;
            if let Some(a) = &self.attempt {
                r.attempts.push(a.clone());
            }
            r.next_attempt_ms = self.next_attempt_ms;
            r.delay_notified |= self.delay_notified;
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub id: QueueId,
    /// Reverse-path; empty for the null sender (bounces).
    pub sender: String,
    pub recipients: Vec<Recipient>,
    pub dsn_ret: Option<DsnRet>,
    pub dsn_envid: Option<String>,
    /// `BODY=8BITMIME` was given.
    pub eight_bit: bool,
    /// `SMTPUTF8` was given.
    pub smtputf8: bool,
    pub client_ip: IpAddr,
    pub helo: String,
    /// Arrival time, milliseconds since the Unix epoch.
    pub arrived_ms: u64,
    /// Body size in bytes as stored (with the Received: header Baton prepended).
    pub size: u64,
    /// What the message carries besides the SMTP envelope: schedule, tenancy, operator hold.
    pub meta: MessageMeta,
}

/// An envelope that waits small. A waiting message is its postcard bytes (the journal's own
/// encoding: a few hundred bytes where the struct with its allocations takes a kilobyte);
/// it is opened (decoded) while it is worked on and packed again when it waits.
#[derive(Debug, Clone)]
pub enum PackedEnvelope {
    Packed(Box<[u8]>),
    Open(Box<Envelope>),
}

impl PackedEnvelope {
    pub fn new(envelope: Envelope) -> Self {
        PackedEnvelope::Open(Box::new(envelope))
    }

    /// The envelope, decoded in place if it was packed.
    pub fn open(&mut self) -> &mut Envelope {
        if let PackedEnvelope::Packed(bytes) = self {
            *self = PackedEnvelope::Open(Box::new(decode_packed(bytes)));
        }
        match self {
            PackedEnvelope::Open(envelope) => envelope,
            PackedEnvelope::Packed(_) => unreachable!("opened just above"),
        }
    }

    /// The envelope to read, decoded if it is packed (left packed).
    pub fn view(&self) -> std::borrow::Cow<'_, Envelope> {
        match self {
            PackedEnvelope::Open(envelope) => std::borrow::Cow::Borrowed(envelope),
            PackedEnvelope::Packed(bytes) => std::borrow::Cow::Owned(decode_packed(bytes)),
        }
    }

    /// Packs an open envelope (it stays open if it cannot be encoded, which postcard never
    /// refuses for this type).
    pub fn pack(&mut self) {
        if let PackedEnvelope::Open(envelope) = self
            && let Ok(bytes) = postcard::to_stdvec(envelope.as_ref())
        {
            *self = PackedEnvelope::Packed(bytes.into_boxed_slice());
        }
    }

    pub fn is_packed(&self) -> bool {
        matches!(self, PackedEnvelope::Packed(_))
    }
}

/// Bytes that `PackedEnvelope::pack` encoded from an `Envelope` in this process decode back:
/// a failure would be a bug in postcard, not something input can cause.
fn decode_packed(bytes: &[u8]) -> Envelope {
    postcard::from_bytes(bytes).expect("a packed envelope decodes")
}

/// A message's facts beyond the SMTP envelope, set at reception (headers, API fields) or by
/// the operator (hold, rebind).
///
/// Stored inside the envelope record and, when it changes, replaced whole by a meta record.
/// Postcard is not self-describing: adding or changing a field means new record kinds, with
/// the old ones still decoded and converted (as format 1's (key, value) pairs are now; see
/// `legacy.rs` and docs/SPOOL.md).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageMeta {
    /// X-Baton-Send-At or the API's `send_at` (ms since the epoch): operator actions (flush,
    /// resume, release, rebind) never make the message due earlier.
    pub send_at_ms: Option<u64>,
    /// X-Baton-Window as written (see `schedule::Window`): deliver only while it is open.
    pub window: Option<String>,
    /// Whose mail it is (X-Baton-Tenant or the API's `tenant`), for pools and suspensions.
    pub tenant: Option<String>,
    /// The API's `campaign` tag, reported on reception events.
    pub campaign: Option<String>,
    /// The pool named for the message (the API's `pool`, or `baton queue rebind`).
    pub pool: Option<String>,
    /// Held by the operator: not delivered until released.
    pub hold: bool,
    /// The body carries X-Baton-* headers, to strip before delivery.
    pub strip_baton_headers: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_increasing_and_round_trip() {
        let ids = IdGenerator::after(QueueId(u64::MAX >> 2));
        let a = ids.next();
        let b = ids.next();
        assert!(b > a);
        assert_eq!(a.to_string().parse::<QueueId>().unwrap(), a);
        assert!("xyz".parse::<QueueId>().is_err());
    }

    #[test]
    fn notify_follows_rfc_3461_defaults() {
        let not_given = Notify::NOT_GIVEN;
        assert!(not_given.wants_failure() && not_given.wants_delay());
        assert!(!not_given.wants_success() && !not_given.is_given());
        let never = Notify::NEVER;
        assert!(!never.wants_failure() && !never.wants_delay() && !never.wants_success());
        let success = Notify::SUCCESS;
        assert!(success.wants_success() && !success.wants_failure() && !success.wants_delay());
        let fd = Notify::FAILURE | Notify::DELAY;
        assert!(fd.wants_failure() && fd.wants_delay() && !fd.wants_success());
        assert!(!Notify::DELAY.wants_failure() && !Notify::FAILURE.wants_delay());
        assert_eq!((Notify::SUCCESS | Notify::DELAY).bits(), 2 | 8);
        assert!(!not_given.contains(Notify::NOT_GIVEN));
    }

    #[test]
    fn a_packed_envelope_opens_to_what_was_packed() {
        let mut envelope = Envelope {
            id: QueueId(7),
            sender: "a@example.com".into(),
            recipients: vec![Recipient::new("b@example.net".into(), None, Notify::DELAY)],
            dsn_ret: Some(DsnRet::Headers),
            dsn_envid: Some("e".into()),
            eight_bit: true,
            smtputf8: false,
            client_ip: std::net::IpAddr::from([127, 0, 0, 1]),
            helo: "client".into(),
            arrived_ms: 9,
            size: 10,
            meta: MessageMeta {
                tenant: Some("t".into()),
                hold: true,
                ..MessageMeta::default()
            },
        };
        let mut packed = PackedEnvelope::new(envelope.clone());
        packed.pack();
        assert!(packed.is_packed());
        assert_eq!(*packed.view(), envelope);
        packed.open().recipients[0].state = RcptState::Deferred;
        assert!(!packed.is_packed());
        envelope.recipients[0].state = RcptState::Deferred;
        packed.pack();
        assert_eq!(*packed.view(), envelope);
    }

    #[test]
    fn notify_is_stored_as_its_bits() {
        let r = Recipient::new("a@b".into(), None, Notify::SUCCESS | Notify::FAILURE);
        let mut plain = r.clone();
        plain.notify = Notify::from_bits(6);
        let bytes = postcard::to_stdvec(&r).unwrap();
        assert_eq!(bytes, postcard::to_stdvec(&plain).unwrap());
        // The byte after the address and ORCPT (None) is the plain u8.
        assert_eq!(bytes[1 + 3 + 1], 6);
    }
}
