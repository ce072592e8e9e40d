//! `baton queue list|show`: what is in the spool, read straight from its files; and how the
//! CLI prints the running server's answers (explain, summary, stats).
//!
//! Read-only: safe while a server runs (a record being written is simply not shown yet).

use std::io::Write;
use std::path::Path;

use anyhow::{Context as _, bail};
use baton_spool::{BodyLocation, QueueId, Spool, StoredMessage};
use serde_json::json;

use crate::operator::{MessageExplained, Summary};

fn spool_dir(data_dir: &Path) -> std::path::PathBuf {
    data_dir.join("spool")
}

fn load(data_dir: &Path) -> anyhow::Result<Vec<StoredMessage>> {
    let dir = spool_dir(data_dir);
    let mut messages = Spool::read_only(&dir)
        .with_context(|| format!("cannot read the spool at {}", dir.display()))?;
    messages.sort_by_key(|m| m.envelope.id);
    Ok(messages)
}

fn arrived(ms: u64) -> String {
    jiff::Timestamp::from_millisecond(ms as i64)
        .map(|t| t.strftime("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_else(|_| ms.to_string())
}

fn sender(s: &str) -> &str {
    if s.is_empty() { "<>" } else { s }
}

fn message_json(m: &StoredMessage) -> serde_json::Value {
    let e = &m.envelope;
    json!({
        "id": e.id.to_string(),
        "sender": e.sender,
        "arrived_ms": e.arrived_ms,
        "size": e.size,
        "client_ip": e.client_ip.to_string(),
        "helo": e.helo,
        "smtputf8": e.smtputf8,
        "eight_bit": e.eight_bit,
        "dsn_ret": e.dsn_ret.map(ret_word),
        "dsn_envid": e.dsn_envid,
        "body_in_file": m.body == BodyLocation::File,
        "recipients": e.recipients.iter().map(|r| json!({
            "email": r.address,
            "state": r.state.as_str(),
            "orcpt": r.orcpt,
            "notify": r.notify.bits(),
            "next_attempt_ms": (r.next_attempt_ms > 0).then_some(r.next_attempt_ms),
            "attempts": r.attempts.iter().map(|a| json!({
                "at_ms": a.at_ms,
                "code": a.code,
                "status": a.status,
                "diagnostic": a.diagnostic,
                "remote_mta": a.remote_mta,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

pub fn list(data_dir: &Path, as_json: bool) -> anyhow::Result<()> {
    let messages = load(data_dir)?;
    let mut out = std::io::stdout().lock();
    if as_json {
        let all: Vec<_> = messages.iter().map(message_json).collect();
        writeln!(out, "{}", serde_json::to_string_pretty(&all)?)?;
        return Ok(());
    }
    if messages.is_empty() {
        writeln!(out, "Mail queue is empty")?;
        return Ok(());
    }
    writeln!(
        out,
        "{:<16}  {:<19}  {:>9}  SENDER / RECIPIENTS",
        "ID", "ARRIVED", "SIZE"
    )?;
    let mut rcpts = 0;
    for m in &messages {
        let e = &m.envelope;
        writeln!(
            out,
            "{}  {}  {:>9}  {}",
            e.id,
            arrived(e.arrived_ms),
            e.size,
            sender(&e.sender)
        )?;
        for r in &e.recipients {
            writeln!(out, "{:>50}{} ({})", "", r.address, r.state.as_str())?;
        }
        rcpts += e.recipients.len();
    }
    writeln!(out, "-- {} messages, {} recipients", messages.len(), rcpts)?;
    Ok(())
}

pub fn show(data_dir: &Path, id: &str, as_json: bool, body: bool) -> anyhow::Result<()> {
    let id: QueueId = id.parse().map_err(anyhow::Error::msg)?;
    let messages = load(data_dir)?;
    let Some(m) = messages.iter().find(|m| m.envelope.id == id) else {
        bail!("no message {id} in the queue (see `baton queue list`)");
    };
    let mut out = std::io::stdout().lock();
    if body {
        let bytes = Spool::read_body(&spool_dir(data_dir), m)
            .with_context(|| format!("cannot read the body of {id}"))?;
        out.write_all(&bytes)?;
        return Ok(());
    }
    if as_json {
        writeln!(out, "{}", serde_json::to_string_pretty(&message_json(m))?)?;
        return Ok(());
    }
    let e = &m.envelope;
    writeln!(out, "id:        {}", e.id)?;
    writeln!(out, "arrived:   {}", arrived(e.arrived_ms))?;
    writeln!(out, "sender:    {}", sender(&e.sender))?;
    writeln!(out, "size:      {} bytes", e.size)?;
    writeln!(out, "client:    {} (helo {})", e.client_ip, e.helo)?;
    if let Some(envid) = &e.dsn_envid {
        writeln!(out, "envid:     {envid}")?;
    }
    if let Some(ret) = e.dsn_ret {
        writeln!(out, "ret:       {}", ret_word(ret))?;
    }
    writeln!(out, "recipients:")?;
    for r in &e.recipients {
        write!(out, "  {:<40} {}", r.address, r.state.as_str())?;
        if let Some(orcpt) = &r.orcpt {
            write!(out, "  orcpt={orcpt}")?;
        }
        if r.next_attempt_ms > 0 && !r.state.is_final() {
            write!(out, "  next attempt {}", arrived(r.next_attempt_ms))?;
        }
        writeln!(out)?;
        for a in &r.attempts {
            let host = a.remote_mta.as_deref().unwrap_or("-");
            writeln!(out, "    {}  {host}  {}", arrived(a.at_ms), a.diagnostic)?;
        }
    }
    Ok(())
}

/// Prints the server's answer to `explain`.
pub fn print_explain(answer: &MessageExplained, as_json: bool) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    if as_json {
        // Through a JSON value: keys sorted, as the answer always printed.
        let json = serde_json::to_value(answer)?;
        writeln!(out, "{}", serde_json::to_string_pretty(&json)?)?;
        return Ok(());
    }
    // The sender as JSON shows it: in quotes, escaped.
    let sender = serde_json::Value::from(answer.sender.as_str());
    writeln!(out, "{}  from {sender}", answer.id)?;
    for r in &answer.recipients {
        writeln!(
            out,
            "  {}  {}  (attempts {}, destination {}{})",
            r.email,
            r.state,
            r.attempts,
            r.destination,
            r.pool
                .as_ref()
                .map(|p| format!(", pool {p}"))
                .unwrap_or_default()
        )?;
        for reason in &r.reasons {
            writeln!(out, "    - {reason}")?;
        }
        let shaping = &r.shaping;
        if let Some(s) = shaping["operator_suspended_for_s"].as_u64() {
            writeln!(out, "    - suspended by the operator for {s} s more")?;
        }
        for state in shaping["states"].as_array().into_iter().flatten() {
            writeln!(out, "    - shaping {}", state)?;
        }
    }
    Ok(())
}

/// `baton queue summary`: a table of waiting recipients by destination and pool.
pub fn print_summary(answer: &Summary, json: bool) -> anyhow::Result<()> {
    if json {
        let json = serde_json::to_value(answer)?;
        println!("{}", serde_json::to_string_pretty(&json)?);
        return Ok(());
    }
    let now = baton_spool::now_ms();
    println!(
        "{:<40} {:<12} {:>8} {:>8} {:>7} {:>6} {:>10}",
        "DESTINATION", "POOL", "QUEUED", "DEFERRED", "ACTIVE", "HELD", "OLDEST"
    );
    for d in &answer.destinations {
        let oldest = now.saturating_sub(d.oldest_ms) / 1000;
        let c = d.counts;
        println!(
            "{:<40} {:<12} {:>8} {:>8} {:>7} {:>6} {:>9}s",
            d.destination,
            d.pool.as_deref().unwrap_or("-"),
            c.queued,
            c.deferred,
            c.active,
            c.held,
            oldest
        );
    }
    let r = answer.recipients;
    println!(
        "-- {} messages; recipients: {} queued, {} deferred, {} active, {} held",
        answer.messages, r.queued, r.deferred, r.active, r.held
    );
    Ok(())
}

/// `baton stats`: outcomes and latency percentiles per group.
/// A complaint rate past this is flagged (0.3%: Gmail's and Yahoo's bulk-sender line).
pub const COMPLAINT_LINE: f64 = 0.003;

pub fn print_stats(answer: &serde_json::Value, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(answer)?);
        return Ok(());
    }
    println!(
        "{:<32} {:>10} {:>9} {:>8} {:>8} {:>7} {:>9} {:>10} {:>8} {:>8} {:>8} {:>8}",
        answer["by"].as_str().unwrap_or("").to_uppercase(),
        "DELIVERED",
        "DEFERRED",
        "BOUNCED",
        "EXPIRED",
        "BOUNCE%",
        "LATE BNC",
        "COMPLAINTS",
        "COMPL%",
        "P50 ms",
        "P90 ms",
        "P99 ms"
    );
    let row = |key: &str, g: &serde_json::Value| {
        let ms = |p: &str| {
            g["latency_ms"][p]
                .as_u64()
                .map(|v| v.to_string())
                .unwrap_or_else(|| "-".into())
        };
        let complaint_rate = g["complaint_rate"].as_f64().unwrap_or(0.0);
        // Gmail's and Yahoo's line for bulk senders.
        let flag = if complaint_rate > COMPLAINT_LINE {
            "!"
        } else {
            " "
        };
        println!(
            "{:<32} {:>10} {:>9} {:>8} {:>8} {:>6.1}% {:>9} {:>10} {:>6.2}%{flag} {:>8} {:>8} {:>8}",
            if key.is_empty() { "(none)" } else { key },
            g["delivered"],
            g["deferred"],
            g["bounced"],
            g["expired"],
            g["bounce_rate"].as_f64().unwrap_or(0.0) * 100.0,
            g["async_bounced"],
            g["complaints"],
            complaint_rate * 100.0,
            ms("p50"),
            ms("p90"),
            ms("p99")
        );
    };
    for g in answer["groups"].as_array().cloned().unwrap_or_default() {
        row(g["key"].as_str().unwrap_or(""), &g);
    }
    row("TOTAL", &answer["total"]);
    Ok(())
}

/// `baton events tail`: the last `lines` events (of `kind`), then new ones as they come.
pub fn tail_events(
    path: &Path,
    lines: usize,
    kind: Option<&str>,
    json: bool,
    follow: bool,
) -> anyhow::Result<()> {
    use std::io::{BufRead, Seek};
    let file = std::fs::File::open(path)
        .with_context(|| format!("cannot open the event log {}", path.display()))?;
    let mut reader = std::io::BufReader::new(file);
    // A type no event has matches nothing.
    let kind = kind.map(|k| k.parse::<baton_events::EventKind>().ok());
    let wanted = |line: &str| -> Option<serde_json::Value> {
        let event: serde_json::Value = serde_json::from_str(line).ok()?;
        let of = baton_events::EventKind::of(&event);
        kind.is_none_or(|k| k.is_some() && of == k).then_some(event)
    };
    let print = |line: &str, event: &serde_json::Value| {
        if json {
            println!("{line}");
            return;
        }
        let field = |name: &str| event[name].as_str().unwrap_or("").to_string();
        let detail = [field("status"), field("response"), field("destination")]
            .into_iter()
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join(" ");
        println!(
            "{} {:<17} {} {} {}",
            field("timestamp"),
            field("type"),
            field("message_id"),
            field("recipient"),
            detail
        );
    };
    let mut last: std::collections::VecDeque<(String, serde_json::Value)> = Default::default();
    let mut line = String::new();
    while reader.read_line(&mut line)? > 0 {
        if line.ends_with('\n') {
            if let Some(e) = wanted(line.trim_end()) {
                last.push_back((line.trim_end().to_string(), e));
                if last.len() > lines {
                    last.pop_front();
                }
            }
            line.clear();
        }
    }
    for (text, e) in &last {
        print(text, e);
    }
    if !follow {
        return Ok(());
    }
    // Follow: the writer appends whole lines; a partial one is kept until it is complete.
    loop {
        let pos = reader.stream_position()?;
        if reader.read_line(&mut line)? == 0 {
            std::thread::sleep(std::time::Duration::from_millis(200));
            reader.seek(std::io::SeekFrom::Start(pos))?;
            continue;
        }
        if line.ends_with('\n') {
            if let Some(e) = wanted(line.trim_end()) {
                print(line.trim_end(), &e);
            }
            line.clear();
        }
    }
}

/// What RET= asked for (RFC 3461 §4.3): the full message or its headers.
fn ret_word(ret: baton_spool::DsnRet) -> &'static str {
    match ret {
        baton_spool::DsnRet::Full => "FULL",
        baton_spool::DsnRet::Headers => "HEADERS",
    }
}
