//! Spool storage schemes on this machine's disk, all with fsync, counted once durable.
//!
//! `cargo bench -p baton-spool --bench storage [-- MESSAGES]`
//!
//! - file-per-message: write, fdatasync, rename into place, fsync the directory (Postfix's way);
//!   concurrent writers each pay their own fsyncs.
//! - baton journal: `Spool::commit`, i.e. one writev + one fdatasync per batch of whatever
//!   commits are waiting (group commit).
//!
//! Figures and the choice they led to: docs/SPOOL.md.

use std::fs;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use baton_spool::{Envelope, MessageMeta, Notify, Recipient, Spool, SpoolOptions};

fn file_per_message(dir: &Path, threads: usize, total: usize, size: usize) -> f64 {
    let body = Arc::new(vec![b'x'; size]);
    let start = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let dir = dir.to_path_buf();
            let body = body.clone();
            std::thread::spawn(move || {
                for i in 0..total / threads {
                    let tmp = dir.join(format!("tmp.{t}.{i}"));
                    let mut f = fs::File::create(&tmp).expect("create");
                    f.write_all(&body).expect("write");
                    f.sync_data().expect("fdatasync");
                    fs::rename(&tmp, dir.join(format!("msg.{t}.{i}"))).expect("rename");
                    fs::File::open(&dir)
                        .and_then(|d| d.sync_all())
                        .expect("fsync dir");
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("writer thread");
    }
    (total / threads * threads) as f64 / start.elapsed().as_secs_f64()
}

fn envelope(spool: &Spool, size: usize) -> Envelope {
    Envelope {
        id: spool.next_id(),
        sender: "sender@example.com".into(),
        recipients: vec![Recipient::new(
            "b@example.net".into(),
            Some("b@example.net".into()),
            Notify::FAILURE,
        )],
        dsn_ret: None,
        dsn_envid: None,
        eight_bit: false,
        smtputf8: false,
        client_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        helo: "client.example".into(),
        arrived_ms: 0,
        size: size as u64,
        meta: MessageMeta::default(),
    }
}

fn journal(dir: &Path, sessions: usize, total: usize, size: usize) -> f64 {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let (spool, _) = Spool::open(dir, SpoolOptions::default()).expect("open spool");
        let start = Instant::now();
        let tasks: Vec<_> = (0..sessions)
            .map(|_| {
                let spool = spool.clone();
                tokio::spawn(async move {
                    for _ in 0..total / sessions {
                        let env = envelope(&spool, size);
                        let mut body = spool.body_writer(env.id);
                        body.buf().resize(size, b'x');
                        body.settle().await.expect("settle");
                        spool.commit(&env, body).await.expect("commit");
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("session task");
        }
        (total / sessions * sessions) as f64 / start.elapsed().as_secs_f64()
    })
}

fn main() {
    let total: usize = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .and_then(|a| a.parse().ok())
        .unwrap_or(2000);
    let base = std::env::current_dir()
        .expect("cwd")
        .join("target/storage-bench");
    println!("{total} messages per run, fsync on, in {}", base.display());
    println!(
        "{:<28} {:>8} {:>10} {:>12}",
        "scheme", "size", "writers", "msgs/s"
    );
    for &size in &[1024usize, 8192, 102_400] {
        for &writers in &[1usize, 16, 64] {
            let dir = base.join(format!("fpm-{size}-{writers}"));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).expect("mkdir");
            let rate = file_per_message(&dir, writers, total, size);
            println!(
                "{:<28} {:>8} {:>10} {:>12.0}",
                "file per message", size, writers, rate
            );
            let _ = fs::remove_dir_all(&dir);

            let dir = base.join(format!("journal-{size}-{writers}"));
            let _ = fs::remove_dir_all(&dir);
            let rate = journal(&dir, writers, total, size);
            println!(
                "{:<28} {:>8} {:>10} {:>12.0}",
                "baton journal (group commit)", size, writers, rate
            );
            let _ = fs::remove_dir_all(&dir);
        }
    }
}
