//! Baton, a mail transfer agent. The data flows listener → session → intake → spool → queue
//! manager → delivery → events. The lower crates (units, smtp, spool, tls, dns, client,
//! shaping, events) hold the parts that stand alone; this crate holds the receiving side
//! (`server`, `reception`, `session`, `intake`), the queue side (`qmgr`, `policy`, `bounce`,
//! `suppression`, `schedule`), delivery, the operator's control plane and HTTP API, the
//! configuration, and the composition root (`app`). `main.rs` is only the command line.
//! See docs/ARCHITECTURE.md for how the pieces fit.

pub mod api;
pub mod app;
pub mod auth;
pub mod backpressure;
pub mod bounce;
pub mod bounces;
pub mod cluster;
pub mod config;
pub mod control;
pub mod delivery;
pub mod dkim;
pub mod inbound_auth;
pub mod intake;
pub mod operator;
pub mod policy;
pub mod qmgr;
pub mod queue;
pub mod reception;
pub mod returns;
pub mod schedule;
pub mod server;
pub mod session;
pub mod suppression;
