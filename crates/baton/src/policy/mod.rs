//! The queue's outcome and retry policy.

pub mod retry;

pub use retry::expiry_ms;
