//! The operator's suspensions: what `baton suspend` holds back (a domain, a pool or a tenant)
//! and the key it is kept and saved under; must not read the operator's text (the control
//! plane parses it into a [`Suspendable`]).

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
}
