//! SMTP protocol pieces for Baton's receiving side, free of I/O so they can be unit-tested and
//! fuzzed: command parsing ([`command`]), envelope address checks ([`address`]), replies
//! ([`reply`]) and the DATA/BDAT body readers ([`data`]).
//!
//! This crate owns the wire syntax. It must not know about sockets, the spool or policy
//! (relay rules, limits): the session in the `baton` crate decides what to do with a command.

pub mod address;
pub mod command;
pub mod data;
pub mod reply;

pub use command::{AuthMechanism, BodyType, Command, MailFrom, Notify, RcptTo, Ret, parse_command};
pub use data::{DataOutcome, DataReader, LineEndingCheck};
pub use reply::Reply;
