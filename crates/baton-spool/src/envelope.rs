//! What the spool keeps about a message besides its body: the envelope and each recipient's
//! state. Plain data; serialised with postcard into journal records.

use std::fmt;
use std::net::IpAddr;
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

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recipient {
    pub address: String,
    /// DSN ORCPT address (type rfc822).
    pub orcpt: Option<String>,
    /// DSN NOTIFY bits: 1 NEVER, 2 SUCCESS, 4 FAILURE, 8 DELAY; 0 when not given.
    pub notify: u8,
    pub state: RcptState,
    /// Every delivery attempt so far, oldest first.
    pub attempts: Vec<Attempt>,
    /// When the next attempt is due (ms since the epoch); 0 = as soon as possible.
    pub next_attempt_ms: u64,
    /// A delay DSN has been sent for this recipient.
    pub delay_notified: bool,
}

impl Recipient {
    pub fn new(address: String, orcpt: Option<String>, notify: u8) -> Self {
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
    /// Further facts as (key, value): "window" (a delivery window), "baton-headers" (the body
    /// carries X-Baton-* headers to strip before delivery), and what later features need.
    pub meta: Vec<(String, String)>,
}

impl Envelope {
    pub fn meta(&self, key: &str) -> Option<&str> {
        self.meta
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
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
}
