//! The answers to operator commands, as the queue manager gives them and as the CLI prints
//! and the API returns them: each serialises to exactly the JSON object those always showed.
//! Plain data; what goes into them is the queue manager's business.

use baton_spool::QueueId;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::OperatorCommand;

/// An answer, or the reason there is none.
pub type Answer = Result<Reply, ControlError>;

/// Why a command was refused or could not be carried out: `{"error": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlError {
    pub error: String,
}

impl ControlError {
    pub fn new(error: impl Into<String>) -> ControlError {
        ControlError {
            error: error.into(),
        }
    }

    /// `{"error": "..."}`.
    pub fn to_json(&self) -> Value {
        serde_json::json!({ "error": self.error })
    }
}

impl std::fmt::Display for ControlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.error)
    }
}

impl std::error::Error for ControlError {}

/// The answer to one command; serialises as the answer itself (no tag).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Reply {
    Explain(MessageExplained),
    ExplainDestination(DestinationExplained),
    Suspended(Suspended),
    Resumed(Resumed),
    Bounced(Bounced),
    Deleted(Deleted),
    Rebound(Rebound),
    Flushed(Flushed),
    Summary(Summary),
    Held(Held),
    Released(Released),
    /// Outcomes and latencies from the event log (`baton_events::stats`).
    Stats(Value),
}

impl Reply {
    /// The answer as a JSON value: object keys sorted, as the CLI printed them and the API
    /// sent them when answers were built as JSON values.
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).unwrap_or_else(|e| ControlError::new(e.to_string()).to_json())
    }

    /// Reads the answer to `command` from its JSON.
    pub fn decode(command: &OperatorCommand, json: Value) -> Result<Reply, serde_json::Error> {
        use serde_json::from_value as read;
        Ok(match command {
            OperatorCommand::Explain { .. } => Reply::Explain(read(json)?),
            OperatorCommand::ExplainDestination { .. } => Reply::ExplainDestination(read(json)?),
            OperatorCommand::Suspend { .. } => Reply::Suspended(read(json)?),
            OperatorCommand::Resume { .. } => Reply::Resumed(read(json)?),
            OperatorCommand::Bounce { .. } => Reply::Bounced(read(json)?),
            OperatorCommand::Delete { .. } => Reply::Deleted(read(json)?),
            OperatorCommand::Rebind { .. } => Reply::Rebound(read(json)?),
            OperatorCommand::Flush { .. } => Reply::Flushed(read(json)?),
            OperatorCommand::Summary => Reply::Summary(read(json)?),
            OperatorCommand::Hold { .. } => Reply::Held(read(json)?),
            OperatorCommand::Release { .. } => Reply::Released(read(json)?),
            OperatorCommand::Stats(_) => Reply::Stats(json),
        })
    }
}

/// `explain`: why each recipient of a queued message is where it is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MessageExplained {
    #[serde(with = "queue_id_text")]
    pub id: QueueId,
    pub sender: String,
    pub tenant: Option<String>,
    pub recipients: Vec<RecipientExplained>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecipientExplained {
    pub email: String,
    /// queued, deferred, delivered, bounced, ...
    pub state: String,
    pub attempts: u16,
    pub next_attempt_ms: Option<u64>,
    pub in_flight: bool,
    /// Where it goes: a domain, `[relay]:port` or `local`.
    pub destination: String,
    pub pool: Option<String>,
    pub reasons: Vec<String>,
    /// What shaping does to its domain (`baton_shaping::Shaper::describe`).
    pub shaping: Value,
}

/// `explain --destination`: what holds a domain back and how much mail waits for it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DestinationExplained {
    pub destination: String,
    pub route: String,
    pub recipients_waiting: usize,
    pub recipients_in_flight: usize,
    pub next_attempt_ms: Option<u64>,
    pub shaping: Value,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Suspended {
    pub ok: bool,
    pub destination: String,
    pub seconds: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resumed {
    pub ok: bool,
    pub destination: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bounced {
    pub ok: bool,
    pub destination: String,
    pub bounced: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deleted {
    pub ok: bool,
    pub destination: String,
    pub deleted: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rebound {
    pub ok: bool,
    pub from: String,
    pub to: String,
    pub messages: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flushed {
    pub ok: bool,
    /// The domain (or `pool:`/`tenant:` target) in lower case; empty for all.
    pub destination: String,
    pub flushed: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    pub ok: bool,
    pub held: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Released {
    pub ok: bool,
    pub released: usize,
}

/// `summary`: waiting recipients by destination and pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    pub messages: usize,
    pub recipients: Counts,
    pub destinations: Vec<SummaryRow>,
    /// The spool is still being read after a start: the counts are rising to the full queue.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub recovering: bool,
}

/// Waiting recipients by what they wait for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub queued: usize,
    pub deferred: usize,
    pub active: usize,
    pub held: usize,
}

impl std::ops::AddAssign for Counts {
    fn add_assign(&mut self, other: Counts) {
        self.queued += other.queued;
        self.deferred += other.deferred;
        self.active += other.active;
        self.held += other.held;
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SummaryRow {
    /// The shaping state in a few words; none for relays, literals and local delivery.
    pub shaping: Option<String>,
    pub destination: String,
    pub pool: Option<String>,
    #[serde(flatten)]
    pub counts: Counts,
    pub oldest_ms: u64,
}

/// A queue id as its 16 hex digits.
mod queue_id_text {
    use baton_spool::QueueId;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(id: &QueueId, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(id)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<QueueId, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}
