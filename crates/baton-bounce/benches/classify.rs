//! Classifier throughput: reports read per second (`read` over every email of the bounce
//! corpus) and replies classified per second (`classify_reply` over the corpus's
//! diagnostics), beside a naive status-code lookup measured in the same run: the floor any
//! classifier pays.
//!
//! `cargo bench -p baton-bounce --bench classify [-- SECONDS]`
//! The corpus is `../shared/bounce-corpus/emails` beside the repository, or `$BOUNCE_CORPUS`.
//! Figures: docs/BENCHMARKS.md.

use std::path::PathBuf;
use std::time::{Duration, Instant};

fn corpus() -> Vec<Vec<u8>> {
    let dir = std::env::var_os("BOUNCE_CORPUS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/bounce-corpus/emails")
        });
    let Ok(entries) = std::fs::read_dir(&dir) else {
        eprintln!("no corpus at {}: set BOUNCE_CORPUS", dir.display());
        std::process::exit(1);
    };
    let mut files: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    files.sort();
    files.iter().filter_map(|p| std::fs::read(p).ok()).collect()
}

/// Runs `f` over `items` until `secs` have passed; items per second.
fn rate<T>(items: &[T], secs: f64, mut f: impl FnMut(&T) -> usize) -> f64 {
    let start = Instant::now();
    let (mut done, mut sink) = (0usize, 0usize);
    while start.elapsed() < Duration::from_secs_f64(secs) {
        for item in items {
            sink = sink.wrapping_add(f(item));
        }
        done += items.len();
    }
    std::hint::black_box(sink);
    done as f64 / start.elapsed().as_secs_f64()
}

/// What a classifier with no rules does: look at the status code.
fn naive(reply: &str) -> usize {
    match baton_bounce::reply_status(reply) {
        Some(s) if s.starts_with("5.1.") => 1,
        Some(s) if s.starts_with('5') => 2,
        Some(_) => 3,
        None => 0,
    }
}

fn main() {
    let secs: f64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(3.0);
    let emails = corpus();
    let replies: Vec<String> = emails
        .iter()
        .flat_map(|e| baton_bounce::read(e, None))
        .map(|r| r.diagnostic)
        .filter(|d| !d.is_empty())
        .collect();
    let bytes: usize = emails.iter().map(Vec::len).sum();
    println!(
        "corpus: {} emails ({:.1} MB), {} diagnostics",
        emails.len(),
        bytes as f64 / 1e6,
        replies.len()
    );
    let reports = rate(&emails, secs, |e| baton_bounce::read(e, None).len());
    println!(
        "read (DSNs, ARF, auto-replies, prose): {reports:.0} reports/s ({:.1} MB/s)",
        reports * bytes as f64 / emails.len() as f64 / 1e6
    );
    let classified = rate(&replies, secs, |r| {
        baton_bounce::classify_reply(r).0 as usize
    });
    let floor = rate(&replies, secs, |r| naive(r));
    println!(
        "classify_reply: {classified:.0} replies/s; naive status lookup: {floor:.0}/s (ratio {:.3})",
        classified / floor
    );
}
