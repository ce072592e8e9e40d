//! Bounce intelligence: every failure gets a [`Class`] from one taxonomy and a hard/soft
//! verdict, from the reply text and its enhanced status code ([`rules`]); reports that come
//! back (DSNs, feedback reports, automatic replies) are read into one [`Record`] per
//! recipient ([`report`]).
//!
//! Pure: no I/O, no state. It must not decide what happens to the mail (suppression, shaping):
//! it only says what a failure is.

pub mod class;
pub mod report;
pub mod rules;

pub use class::Class;
pub use report::{Record, read};
pub use rules::{Rules, classify_with};

/// The class and hard/soft verdict of one SMTP reply (`"550 5.1.1 user unknown"`).
pub fn classify_reply(reply: &str) -> (Class, bool) {
    let status = reply_status(reply);
    let class = classify_with(None, status.as_deref(), reply);
    let permanent = match &status {
        Some(s) => s.starts_with('5'),
        None => reply.trim_start().starts_with('5'),
    };
    (class, class.hard(permanent))
}

/// The enhanced status code in a reply, if it has one.
pub fn reply_status(reply: &str) -> Option<String> {
    reply
        .split(|c: char| c.is_whitespace() || c == '-')
        .find(|w| rules::parse_status(w).is_some())
        .map(str::to_string)
}
