//! TLS for both directions: the server side (certificates from PEM, the acceptor for STARTTLS
//! and implicit TLS, reloading on SIGHUP) and the client side's trust (the CA store, chain
//! verification for a host name, DANE TLSA matching, the HTTPS client configuration).
//!
//! Owns certificates and rustls configuration only: it opens no connections and speaks no
//! SMTP. Which policy applies to a destination (opportunistic, verified, DANE) is delivery's.

pub mod server;
pub mod trust;
