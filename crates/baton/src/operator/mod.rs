//! The control plane's vocabulary: the operator's commands ([`OperatorCommand`]), what they act
//! on ([`Target`]) and their answers ([`Reply`]), shared by the CLI (`main.rs`), the control
//! socket (`control.rs`) and the HTTP API (`api.rs`); the queue manager carries them out.
//!
//! User text is read here, once, by the constructors the edges call
//! ([`OperatorCommand::suspend`], ...), with the errors operators have always seen. Between
//! `baton` and `baton serve` a command travels as its serde JSON (one line on the control
//! socket; both ends are the same version).
//!
//! Owns the types and their reading only: must not touch the queue, the shaper, the event log
//! or any socket (it depends on nothing of this crate, so any edge can use it).

use baton_spool::QueueId;
use serde::{Deserialize, Serialize};

mod reply;
mod target;

pub use reply::{
    Answer, Bounced, ControlError, Counts, Deleted, DestinationExplained, Flushed, Held,
    MessageExplained, Rebound, RecipientExplained, Released, Reply, Resumed, Summary, SummaryRow,
    Suspended,
};
pub use target::{Target, Written};

/// An operator's command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum OperatorCommand {
    /// Why each recipient of a message is where it is.
    Explain { id: QueueId },
    /// What holds a destination domain back, and how much mail waits for it. The domain is
    /// taken as written.
    ExplainDestination { domain: String },
    /// No deliveries to a destination (domain, pool or tenant) for a while.
    Suspend {
        destination: Written,
        seconds: SuspendFor,
    },
    /// Deliveries to a suspended destination go again, and what waited for it goes now.
    /// `only_if_suspended`: nothing at all (no event) unless the operator suspended it here
    /// (the fleet's resumptions, which may be old news).
    Resume {
        destination: Written,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        only_if_suspended: bool,
    },
    /// Bounce (with DSNs) every waiting recipient at a domain, or of one message.
    Bounce { destination: Written },
    /// Delete (without DSNs) every waiting recipient at a domain, or of one message.
    Delete { destination: Written },
    /// Move the queued mail of one pool to another.
    Rebind { from: String, to: String },
    /// Try the waiting recipients a destination names (all of them: [`Target::All`]) now.
    Flush { destination: Written },
    /// Counts of waiting recipients by destination, pool and state.
    Summary,
    /// Keep a message (or every message) from delivery until released; survives restarts.
    Hold { target: Target },
    /// Let held messages go again.
    Release { target: Target },
    /// Delivery statistics from the event log (answered by the control socket, not the queue).
    Stats(StatsQuery),
}

impl OperatorCommand {
    /// Whether this acts on whole destinations, so that with `[cluster]` every node carries
    /// it out: bounce, delete or flush a domain (pool, tenant), hold or release everything,
    /// move a pool's mail. Not what names one message (it lives on one node), nor
    /// suspensions (shared as state), nor questions.
    pub fn fleet_wide(&self) -> bool {
        match self {
            OperatorCommand::Bounce { destination } | OperatorCommand::Delete { destination } => {
                !matches!(destination.target, Target::Message(_))
            }
            OperatorCommand::Flush { .. } | OperatorCommand::Rebind { .. } => true,
            OperatorCommand::Hold { target } | OperatorCommand::Release { target } => {
                *target == Target::All
            }
            _ => false,
        }
    }

    /// `explain ID`.
    pub fn explain(id: &str) -> Result<OperatorCommand, ControlError> {
        let id = id.parse().map_err(ControlError::new)?;
        Ok(OperatorCommand::Explain { id })
    }

    /// `suspend DESTINATION` for `seconds` (a day when none).
    pub fn suspend(
        destination: &str,
        seconds: Option<u64>,
    ) -> Result<OperatorCommand, ControlError> {
        Ok(OperatorCommand::Suspend {
            destination: Written::destination(destination),
            seconds: SuspendFor::new(seconds)?,
        })
    }

    /// `resume DESTINATION`.
    pub fn resume(destination: &str) -> OperatorCommand {
        OperatorCommand::Resume {
            destination: Written::destination(destination),
            only_if_suspended: false,
        }
    }

    /// `bounce DOMAIN-OR-ID`.
    pub fn bounce(destination: &str) -> Result<OperatorCommand, ControlError> {
        let destination = Written::domain_or_message(destination)?;
        Ok(OperatorCommand::Bounce { destination })
    }

    /// `delete DOMAIN-OR-ID`.
    pub fn delete(destination: &str) -> Result<OperatorCommand, ControlError> {
        let destination = Written::domain_or_message(destination)?;
        Ok(OperatorCommand::Delete { destination })
    }

    /// `flush [DESTINATION]`.
    pub fn flush(destination: Option<&str>) -> OperatorCommand {
        OperatorCommand::Flush {
            destination: Written::destination(destination.unwrap_or("")),
        }
    }

    /// `hold ID-OR-ALL`.
    pub fn hold(id: &str) -> Result<OperatorCommand, ControlError> {
        let target = Target::message_or_all(id)?;
        Ok(OperatorCommand::Hold { target })
    }

    /// `release ID-OR-ALL`.
    pub fn release(id: &str) -> Result<OperatorCommand, ControlError> {
        let target = Target::message_or_all(id)?;
        Ok(OperatorCommand::Release { target })
    }

    /// `stats`: `since` and `until` are RFC 3339 times or spans back from now ("24h").
    pub fn stats(
        since: Option<&str>,
        until: Option<&str>,
        by: &str,
    ) -> Result<OperatorCommand, ControlError> {
        let time = |name: &str, text: Option<&str>| {
            text.map(|text| {
                baton_events::parse_since(text).ok_or_else(|| {
                    ControlError::new(format!(
                        "{name} {text:?} is not an RFC 3339 time or a span like 24h"
                    ))
                })
            })
            .transpose()
        };
        Ok(OperatorCommand::Stats(StatsQuery {
            since: time("since", since)?,
            until: time("until", until)?,
            by: by.to_string(),
            class: None,
        }))
    }
}

/// The longest operator suspension: a year (longer is a typo, or an attack on the timer).
pub const MAX_SUSPENSION_SECS: u64 = 365 * 86400;

/// How long a suspension lasts: 1 s to a year.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "u64", into = "u64")]
pub struct SuspendFor(u64);

impl SuspendFor {
    /// The operator's length, checked; none means a day.
    pub fn new(seconds: Option<u64>) -> Result<SuspendFor, ControlError> {
        SuspendFor::try_from(seconds.unwrap_or(86400))
    }

    pub fn seconds(self) -> u64 {
        self.0
    }
}

impl TryFrom<u64> for SuspendFor {
    type Error = ControlError;

    fn try_from(s: u64) -> Result<SuspendFor, ControlError> {
        if (1..=MAX_SUSPENSION_SECS).contains(&s) {
            Ok(SuspendFor(s))
        } else {
            Err(ControlError::new(format!(
                "seconds {s}: a suspension lasts from 1 to {MAX_SUSPENSION_SECS} seconds (a year)"
            )))
        }
    }
}

impl From<SuspendFor> for u64 {
    fn from(s: SuspendFor) -> u64 {
        s.0
    }
}

/// Which events `stats` counts, and how it groups them: destination, campaign, tenant,
/// source or class (`baton_events::stats` groups any other word by destination).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatsQuery {
    #[serde(with = "timestamp_text")]
    pub since: Option<jiff::Timestamp>,
    #[serde(with = "timestamp_text")]
    pub until: Option<jiff::Timestamp>,
    pub by: String,
    /// Count only failures of this class.
    #[serde(default)]
    pub class: Option<String>,
}

/// A time as RFC 3339 text (jiff's own form, to the nanosecond).
mod timestamp_text {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &Option<jiff::Timestamp>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => s.collect_str(t),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<jiff::Timestamp>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|text| text.parse().map_err(serde::de::Error::custom))
            .transpose()
    }
}

#[cfg(test)]
mod tests;
