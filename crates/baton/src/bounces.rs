//! `baton bounce classify`: what a report that came back (or one reply) says, per recipient.

use std::io::Write;
use std::path::Path;

use anyhow::{Context as _, bail};
use baton_bounce::Record;

/// Reads `file` (or classes `reply`) and prints one line, or one JSON object, per recipient.
pub fn classify_command(
    file: Option<&Path>,
    reply: Option<&str>,
    json: bool,
) -> anyhow::Result<()> {
    let records = match (file, reply) {
        (_, Some(reply)) => {
            let (class, hard) = baton_bounce::classify_reply(reply);
            let status = baton_bounce::reply_status(reply).unwrap_or_default();
            vec![Record {
                recipient: String::new(),
                status,
                class,
                hard,
                diagnostic: reply.to_string(),
                feedback_type: None,
            }]
        }
        (Some(file), None) => {
            let raw =
                std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
            baton_bounce::read(&raw, None)
        }
        (None, None) => bail!("name a FILE to read, or give --reply TEXT"),
    };
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string(&records)?)?;
        return Ok(());
    }
    if records.is_empty() {
        writeln!(out, "no recipient found in the report")?;
    }
    for r in &records {
        let verdict = if r.hard { "hard" } else { "soft" };
        let status = if r.status.is_empty() { "-" } else { &r.status };
        writeln!(
            out,
            "{}  {status}  {}  {verdict}  {}",
            r.recipient, r.class, r.diagnostic
        )?;
    }
    Ok(())
}
