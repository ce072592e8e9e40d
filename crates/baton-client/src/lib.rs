//! The outbound SMTP/LMTP client: one connection to one server, over which transactions run.
//!
//! EHLO (HELO fallback), STARTTLS (opportunistic by default, RFC 7435; verified against the CA
//! store or DANE TLSA records when the route, MTA-STS or DANE asks for it), AUTH PLAIN for
//! smarthosts, PIPELINING (MAIL, every RCPT and DATA/BDAT go out in one write), SIZE,
//! 8BITMIME, SMTPUTF8, DSN pass-through, CHUNKING, per-recipient results, RSET between
//! transactions. Timeouts follow RFC 5321 §4.5.3.2.
//!
//! - `connection`: opening, greeting, EHLO, AUTH, reading replies, writing;
//! - `tls`: STARTTLS and what was negotiated;
//! - `transaction`: one message's MAIL, RCPT, DATA/BDAT and the replies per recipient;
//! - `reply`: replies, errors and EHLO capabilities;
//! - `downgrade`: what a message must become for one server (pure).
//!
//! Owns one conversation; it must not decide what happens to a recipient after a reply (the
//! queue manager does), nor which TLS policy applies (delivery does).

use std::time::Duration;

mod connection;
pub mod downgrade;
mod reply;
mod tls;
mod transaction;

pub use connection::{Client, ConnectOptions};
pub use reply::{Capabilities, ClientError, Reply};
pub use tls::TlsInfo;
pub use transaction::{OutRcpt, Outgoing};

/// Outbound TLS for a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TlsMode {
    /// STARTTLS when offered, plaintext otherwise (RFC 7435).
    Opportunistic,
    /// No delivery without TLS: the message waits (4.7.10).
    Required,
    /// TLS with a certificate that validates for the host name (4.7.5 otherwise).
    Verify,
    /// Never STARTTLS.
    Disabled,
}

pub(crate) const GREETING_TIMEOUT: Duration = Duration::from_secs(300);
pub(crate) const COMMAND_TIMEOUT: Duration = Duration::from_secs(300);
pub(crate) const DATA_INIT_TIMEOUT: Duration = Duration::from_secs(120);
/// Data goes out in blocks of this size, each under the data-block timeout (RFC 5321
/// §4.5.3.2.6: the timeout is per block, not for the whole message).
pub(crate) const DATA_BLOCK: usize = 1 << 20;
pub(crate) const DATA_END_TIMEOUT: Duration = Duration::from_secs(600);
/// The most a server's reply may hold, all its lines together (a line without its end counts
/// too); past it the attempt is abandoned.
pub(crate) const MAX_REPLY_BYTES: usize = 64 << 10;
/// The most lines one reply may have (an EHLO reply has a dozen or two).
pub(crate) const MAX_REPLY_LINES: usize = 1000;
