//! Local delivery into Maildirs (tmp/ then new/, fsynced), off the async threads.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use baton_client::Reply;

use super::{DeliveryContext, Job, JobReport, Outcome, report_all};

static MAILDIR_SEQ: AtomicU64 = AtomicU64::new(0);

pub(super) async fn deliver_maildir(ctx: &Arc<DeliveryContext>, job: Job) {
    let body = match job.message.body(&ctx.spool).await {
        Ok(b) => b,
        Err(e) => {
            let reply = Reply::local(451, "4.3.0", format!("cannot read the queued message: {e}"));
            report_all(ctx, &job, &reply, None);
            return;
        }
    };
    let config = ctx.config.clone();
    let message = job.message.clone();
    let rcpts = job.rcpts.clone();
    let outcomes = tokio::task::spawn_blocking(move || {
        rcpts
            .iter()
            .map(|&rcpt| {
                let address = message
                    .recipients
                    .get(rcpt as usize)
                    .map(|r| r.address.clone())
                    .unwrap_or_default();
                let reply = match config.local_mailbox(&address) {
                    None => {
                        Reply::local(550, "5.1.1", format!("<{address}>: no such local mailbox"))
                    }
                    Some(user) => {
                        let dir = config.local.maildir_root.join(&user);
                        match write_maildir(
                            &dir,
                            &config.hostname,
                            &message.sender,
                            &address,
                            &body,
                        ) {
                            Ok(name) => Reply::local(
                                250,
                                "2.0.0",
                                format!("delivered to maildir as {name}"),
                            ),
                            Err(e) => Reply::local(
                                451,
                                "4.3.0",
                                format!("maildir {}: {e}", dir.display()),
                            ),
                        }
                    }
                };
                Outcome {
                    rcpt,
                    reply,
                    remote: None,
                    dsn_passed: false,
                    local: true,
                    tls: None,
                    not_before: None,
                    hold: false,
                    source: None,
                }
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
    let _ = ctx.reports.send(JobReport {
        id: job.message.id,
        outcomes,
    });
}

/// Writes one message into a Maildir: tmp/ then rename into new/, fsynced (the Maildir
/// protocol). Adds Return-Path and Delivered-To, as local delivery agents do.
fn write_maildir(
    dir: &Path,
    hostname: &str,
    sender: &str,
    rcpt: &str,
    body: &[u8],
) -> std::io::Result<String> {
    use std::io::Write;
    for sub in ["tmp", "new", "cur"] {
        std::fs::create_dir_all(dir.join(sub))?;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let seq = MAILDIR_SEQ.fetch_add(1, Ordering::Relaxed);
    let name = format!(
        "{}.M{}P{}Q{seq}.{}",
        now.as_secs(),
        now.subsec_micros(),
        std::process::id(),
        hostname.replace(['/', ':'], "_")
    );
    let tmp: PathBuf = dir.join("tmp").join(&name);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)?;
    let written = (|| {
        file.write_all(format!("Return-Path: <{sender}>\r\nDelivered-To: {rcpt}\r\n").as_bytes())?;
        file.write_all(body)?;
        file.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, dir.join("new").join(&name))?;
    std::fs::File::open(dir.join("new"))?.sync_all()?;
    Ok(name)
}
