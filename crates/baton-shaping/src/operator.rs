//! The operator's suspensions: what `baton suspend` holds back (a domain, a pool or a tenant)
//! and until when. Owns that map and the key each entry is saved under; must not touch the
//! file the keys are saved in (the queue manager's) nor read the operator's text (the control
//! plane parses it into a [`Suspendable`]).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// What an operator's suspension names. Names compare without regard to case.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Suspendable {
    /// A destination domain (or whatever else the operator named that is not a pool or a
    /// tenant: an address literal, a relay host).
    Domain(String),
    /// Every destination of the mail sent from `[[pool]]` NAME.
    Pool(String),
    /// A tenant's mail, wherever it goes.
    Tenant(String),
}

impl Suspendable {
    /// The key the suspension is kept and saved under: the domain, "pool:NAME" or
    /// "tenant:NAME", in lower case (`operator-suspensions.json` holds these).
    pub fn key(&self) -> String {
        match self {
            Suspendable::Domain(d) => d.to_ascii_lowercase(),
            Suspendable::Pool(p) => format!("pool:{}", p.to_ascii_lowercase()),
            Suspendable::Tenant(t) => format!("tenant:{}", t.to_ascii_lowercase()),
        }
    }
}

/// The live suspensions, by key.
#[derive(Default)]
pub(crate) struct Suspensions(Mutex<HashMap<String, Instant>>);

impl Suspensions {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn suspend(&self, key: String, until: Instant) {
        self.map().insert(key, until);
    }

    pub(crate) fn resume(&self, key: &str) {
        self.map().remove(key);
    }

    /// Until when `key` is suspended, if it still is.
    pub(crate) fn until(&self, key: &str) -> Option<Instant> {
        let now = Instant::now();
        self.map().get(key).copied().filter(|&t| t > now)
    }

    /// The suspensions still running as (key, until in ms since the epoch).
    pub(crate) fn snapshot(&self) -> Vec<(String, u64)> {
        let now = Instant::now();
        let now_ms = baton_spool::now_ms();
        self.map()
            .iter()
            .filter(|(_, t)| **t > now)
            .map(|(k, t)| {
                let left = u64::try_from((*t - now).as_millis()).unwrap_or(u64::MAX);
                (k.clone(), now_ms.saturating_add(left))
            })
            .collect()
    }

    /// Puts back what [`Suspensions::snapshot`] saved (keys as saved, whatever they name).
    pub(crate) fn restore(&self, saved: Vec<(String, u64)>) {
        let now_ms = baton_spool::now_ms();
        for (key, until) in saved {
            if until > now_ms {
                let until = crate::later(Duration::from_millis(until - now_ms));
                self.suspend(key.to_ascii_lowercase(), until);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_the_saved_form() {
        assert_eq!(Suspendable::Domain("Ex.COM".into()).key(), "ex.com");
        assert_eq!(Suspendable::Pool("Bulk".into()).key(), "pool:bulk");
        assert_eq!(Suspendable::Tenant("ACME".into()).key(), "tenant:acme");
        assert_eq!(Suspendable::Domain("[IPv6:::1]".into()).key(), "[ipv6:::1]");
    }

    #[tokio::test]
    async fn a_snapshot_restores() {
        let live = Suspensions::default();
        live.suspend("tenant:acme".into(), crate::later(Duration::from_secs(60)));
        live.suspend("gone.test".into(), Instant::now());
        let saved = live.snapshot();
        assert_eq!(saved.len(), 1);
        let again = Suspensions::default();
        again.restore(saved);
        assert!(again.until("tenant:acme").is_some());
        again.resume("tenant:acme");
        assert!(again.until("tenant:acme").is_none());
    }
}
