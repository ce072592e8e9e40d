//! Records as earlier Baton versions wrote them, decoded and converted to today's types so
//! that a spool written before an upgrade still loads.
//!
//! Format 1 of the envelope (journal kinds 1 and 2, segments with the magic `BATONJ3`) kept the
//! message meta as (key, value) string pairs, and its meta record (kind 5) set one pair. Every
//! key a Baton ever wrote has a field in [`MessageMeta`] now; an unknown key (none was ever
//! written) is dropped with a warning.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::envelope::{DsnRet, Envelope, MessageMeta, QueueId, Recipient};

/// The envelope as format 1 stored it: today's fields in the same order, meta as pairs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct EnvelopeV1 {
    pub id: QueueId,
    pub sender: String,
    pub recipients: Vec<Recipient>,
    pub dsn_ret: Option<DsnRet>,
    pub dsn_envid: Option<String>,
    pub eight_bit: bool,
    pub smtputf8: bool,
    pub client_ip: IpAddr,
    pub helo: String,
    pub arrived_ms: u64,
    pub size: u64,
    pub meta: Vec<(String, String)>,
}

impl From<EnvelopeV1> for Envelope {
    fn from(v1: EnvelopeV1) -> Envelope {
        Envelope {
            id: v1.id,
            sender: v1.sender,
            recipients: v1.recipients,
            dsn_ret: v1.dsn_ret,
            dsn_envid: v1.dsn_envid,
            eight_bit: v1.eight_bit,
            smtputf8: v1.smtputf8,
            client_ip: v1.client_ip,
            helo: v1.helo,
            arrived_ms: v1.arrived_ms,
            size: v1.size,
            meta: MessageMeta::from_v1_pairs(v1.meta),
        }
    }
}

impl MessageMeta {
    /// Format 1's pairs as typed meta. Where a key appears twice the first pair wins, as
    /// format 1's lookup (the first match) read it.
    pub(crate) fn from_v1_pairs(pairs: Vec<(String, String)>) -> MessageMeta {
        let mut meta = MessageMeta::default();
        for (key, value) in pairs.into_iter().rev() {
            meta.set_v1(&key, value);
        }
        meta
    }

    /// Sets the field that format 1 kept under `key`, read as format 1's readers read it.
    pub(crate) fn set_v1(&mut self, key: &str, value: String) {
        match key {
            // An unparsable time read as none.
            "send_at" => self.send_at_ms = value.parse().ok(),
            "window" => self.window = Some(value),
            "tenant" => self.tenant = Some(value),
            "campaign" => self.campaign = Some(value),
            "pool" => self.pool = Some(value),
            // "1" held; a release wrote "".
            "hold" => self.hold = value == "1",
            // Present ("strip") or not.
            "baton-headers" => self.strip_baton_headers = true,
            other => {
                tracing::warn!(
                    key = other,
                    value,
                    "unknown meta entry in an old spool record dropped"
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn every_format_1_key_maps_to_its_field() {
        let meta = MessageMeta::from_v1_pairs(pairs(&[
            ("send_at", "1767258000000"),
            ("window", "Mon-Fri 09:00-17:00 Europe/Berlin"),
            ("tenant", "acme"),
            ("campaign", "winter"),
            ("pool", "bulk"),
            ("hold", "1"),
            ("baton-headers", "strip"),
            ("unheard-of", "x"),
        ]));
        assert_eq!(
            meta,
            MessageMeta {
                send_at_ms: Some(1_767_258_000_000),
                window: Some("Mon-Fri 09:00-17:00 Europe/Berlin".into()),
                tenant: Some("acme".into()),
                campaign: Some("winter".into()),
                pool: Some("bulk".into()),
                hold: true,
                strip_baton_headers: true,
            }
        );
    }

    #[test]
    fn format_1_readings_are_kept() {
        // A release wrote hold = "", an unparsable send_at meant none, the first pair won.
        let meta = MessageMeta::from_v1_pairs(pairs(&[
            ("hold", ""),
            ("send_at", "soon"),
            ("tenant", "first"),
            ("tenant", "second"),
        ]));
        assert!(!meta.hold);
        assert_eq!(meta.send_at_ms, None);
        assert_eq!(meta.tenant.as_deref(), Some("first"));
        assert_eq!(
            MessageMeta::from_v1_pairs(Vec::new()),
            MessageMeta::default()
        );
    }
}
