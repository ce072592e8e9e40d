//! `baton`: the command line. See docs/ARCHITECTURE.md for how the pieces fit.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio::sync::watch;

use baton::config::Config;
use baton::operator::{ControlError, OperatorCommand, Reply};
use baton::{app, auth, config, control, dkim, queue};

#[derive(Parser)]
#[command(name = "baton", version, about = "Baton, a mail transfer agent")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the server (embedded defaults when no --config is given).
    Serve {
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Validate a config file and report every error with its line.
    CheckConfig { file: PathBuf },
    /// Stop deliveries to a destination domain (or `pool:NAME`) on the running server.
    Suspend {
        destination: String,
        /// How long, e.g. 30m, 2h (default 1 day).
        #[arg(long = "for", value_name = "DURATION")]
        duration: Option<String>,
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Let deliveries to a suspended destination go again, at once.
    Resume {
        destination: String,
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// DKIM keys.
    Dkim {
        #[command(subcommand)]
        command: DkimCmd,
    },
    /// Manage submission users ([submission] users_file).
    User {
        #[arg(long, value_name = "FILE", global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        command: UserCmd,
    },
    /// Delivery statistics from the running server: outcomes and latency percentiles.
    Stats {
        /// From when: RFC 3339 or a span back from now (default 24h).
        #[arg(long, default_value = "24h")]
        since: String,
        #[arg(long)]
        until: Option<String>,
        /// destination, campaign, tenant, source or class (the failure class).
        #[arg(long, default_value = "destination")]
        by: String,
        /// Count only failures of this class (e.g. reputation).
        #[arg(long)]
        class: Option<String>,
        #[arg(long)]
        json: bool,
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// The event log.
    Events {
        #[arg(long, value_name = "FILE", global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        command: EventsCmd,
    },
    /// Bounce intelligence.
    Bounce {
        #[command(subcommand)]
        command: BounceCmd,
    },
    /// The fleet of nodes sharing one Redis ([cluster]).
    Cluster {
        #[arg(long, value_name = "FILE", global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        command: ClusterCmd,
    },
    /// Look into the queue.
    Queue {
        #[arg(long, value_name = "FILE", global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        command: QueueCmd,
    },
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Every node's last heartbeat: state, queue, connections, rates.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Take a node removed for good out of the fleet's view.
    Forget { node: String },
}

#[derive(Subcommand)]
enum BounceCmd {
    /// Read one stored email (a DSN, a feedback report, an automatic reply) and print, per
    /// recipient, its status, class and whether it is hard; or class one reply with --reply.
    Classify {
        /// The email (raw RFC 5322 message).
        file: Option<PathBuf>,
        /// Class this SMTP reply instead ("550 5.1.1 user unknown").
        #[arg(long, value_name = "TEXT")]
        reply: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum DkimCmd {
    /// Make a key for DOMAIN and SELECTOR, write it (mode 0600) and print the DNS TXT record.
    Keygen {
        domain: String,
        selector: String,
        /// Ed25519 instead of RSA-2048.
        #[arg(long)]
        ed25519: bool,
        /// Where to write the key (default: SELECTOR.DOMAIN.key here).
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum EventsCmd {
    /// Print the last events, then follow new ones as they are written (like tail -f).
    Tail {
        /// How many past events to print first.
        #[arg(short = 'n', long, default_value_t = 20)]
        lines: usize,
        /// Only events of this type (reception, delivery, transient_failure, bounce, ...).
        #[arg(long = "type")]
        kind: Option<String>,
        /// Print the JSON lines as they are.
        #[arg(long)]
        json: bool,
        /// Print and exit instead of following.
        #[arg(long)]
        no_follow: bool,
    },
}

#[derive(Subcommand)]
enum UserCmd {
    /// Add a user, or set a new password; the password is read from standard input.
    Add { name: String },
}

#[derive(Subcommand)]
enum QueueCmd {
    /// Every queued message with its recipients and their states.
    List {
        #[arg(long)]
        json: bool,
    },
    /// One message: envelope, recipients and states.
    Show {
        id: String,
        #[arg(long)]
        json: bool,
        /// Print the stored message (headers and body) instead.
        #[arg(long, conflicts_with = "json")]
        body: bool,
    },
    /// Why a message's recipients (or a destination's mail) are not being sent right now
    /// (asks the running server).
    Explain {
        /// A queue id.
        #[arg(required_unless_present = "destination")]
        id: Option<String>,
        /// Explain a destination domain instead.
        #[arg(long, conflicts_with = "id")]
        destination: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Waiting recipients by destination and pool (asks the running server).
    Summary {
        #[arg(long)]
        json: bool,
    },
    /// Try waiting recipients now: all, or those at one domain (postqueue -f).
    Flush { destination: Option<String> },
    /// Keep a message (or ALL) from delivery until released (postsuper -h).
    Hold { id: String },
    /// Let a held message (or ALL) go again (postsuper -H).
    Release { id: String },
    /// Bounce every waiting recipient at a domain, or of one message (queue id), with DSNs.
    Bounce { destination: String },
    /// Delete every waiting recipient at a domain, or of one message (queue id), without DSNs.
    Delete { destination: String },
    /// Move queued mail from one pool to another.
    Rebind {
        #[arg(long)]
        from: String,
        #[arg(long)]
        to: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Serve { config } => load_config(config.as_deref()).and_then(serve),
        Cmd::CheckConfig { file } => return check_config(&file),
        Cmd::Bounce {
            command: BounceCmd::Classify { file, reply, json },
        } => baton::bounces::classify_command(file.as_deref(), reply.as_deref(), json),
        Cmd::Stats {
            since,
            until,
            by,
            class,
            json,
            config,
        } => load_config(config.as_deref()).and_then(|c| {
            let command = || stats_command(&since, until.as_deref(), &by, class.as_deref());
            match ask(&c, command)? {
                Reply::Stats(answer) => queue::print_stats(&answer, json),
                other => print(&other),
            }
        }),
        Cmd::Events {
            config,
            command:
                EventsCmd::Tail {
                    lines,
                    kind,
                    json,
                    no_follow,
                },
        } => load_config(config.as_deref()).and_then(|c| {
            queue::tail_events(
                &c.data_dir.join("events/events.jsonl"),
                lines,
                kind.as_deref(),
                json,
                !no_follow,
            )
        }),
        Cmd::Queue { config, command } => {
            load_config(config.as_deref()).and_then(|c| queue_command(&c, command))
        }
        Cmd::Suspend {
            destination,
            duration,
            config,
        } => load_config(config.as_deref()).and_then(|c| suspend(&c, &destination, duration)),
        Cmd::Dkim {
            command:
                DkimCmd::Keygen {
                    domain,
                    selector,
                    ed25519,
                    out,
                },
        } => dkim_keygen(&domain, &selector, ed25519, out),
        Cmd::User {
            config,
            command: UserCmd::Add { name },
        } => load_config(config.as_deref()).and_then(|c| add_user(&c, &name)),
        Cmd::Cluster { config, command } => {
            load_config(config.as_deref()).and_then(|c| cluster_command(&c, command))
        }
        Cmd::Resume {
            destination,
            config,
        } => load_config(config.as_deref()).and_then(|c| {
            let reply = ask(&c, || Ok(OperatorCommand::resume(&destination)))?;
            print(&reply)
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("baton: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn queue_command(c: &Config, command: QueueCmd) -> anyhow::Result<()> {
    let reply = match command {
        QueueCmd::List { json } => return queue::list(&c.data_dir, json),
        QueueCmd::Show { id, json, body } => return queue::show(&c.data_dir, &id, json, body),
        QueueCmd::Explain {
            id,
            destination,
            json,
        } => return explain(c, id, destination, json),
        QueueCmd::Bounce { destination } => ask(c, || OperatorCommand::bounce(&destination))?,
        QueueCmd::Delete { destination } => ask(c, || OperatorCommand::delete(&destination))?,
        QueueCmd::Rebind { from, to } => ask(c, || Ok(OperatorCommand::Rebind { from, to }))?,
        QueueCmd::Summary { json } => match ask(c, || Ok(OperatorCommand::Summary))? {
            Reply::Summary(summary) => return queue::print_summary(&summary, json),
            other => other,
        },
        QueueCmd::Flush { destination } => {
            ask(c, || Ok(OperatorCommand::flush(destination.as_deref())))?
        }
        QueueCmd::Hold { id } => ask(c, || OperatorCommand::hold(&id))?,
        QueueCmd::Release { id } => ask(c, || OperatorCommand::release(&id))?,
    };
    print(&reply)
}

/// `baton suspend DESTINATION [--for DURATION]`.
fn suspend(c: &Config, destination: &str, duration: Option<String>) -> anyhow::Result<()> {
    let seconds = match duration {
        Some(d) => Some(config::parse_duration(&d).ok_or_else(|| {
            anyhow::anyhow!("--for {d:?}: write a duration such as 30m, 2h or 1d")
        })?),
        None => None,
    };
    let reply = ask(c, || OperatorCommand::suspend(destination, seconds))?;
    print(&reply)
}

/// `baton queue explain`: a message, or a destination domain.
fn explain(
    c: &Config,
    id: Option<String>,
    destination: Option<String>,
    json: bool,
) -> anyhow::Result<()> {
    match (id, destination) {
        (_, Some(domain)) => {
            let reply = ask(c, || Ok(OperatorCommand::ExplainDestination { domain }))?;
            println!("{}", serde_json::to_string_pretty(&reply.to_json())?);
            Ok(())
        }
        (Some(id), None) => match ask(c, || OperatorCommand::explain(&id))? {
            Reply::Explain(explained) => queue::print_explain(&explained, json),
            other => print(&other),
        },
        (None, None) => anyhow::bail!("give a queue id or --destination DOMAIN"),
    }
}

fn dkim_keygen(
    domain: &str,
    selector: &str,
    ed25519: bool,
    out: Option<PathBuf>,
) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let (pem, record) = dkim::keygen(domain, selector, ed25519).map_err(anyhow::Error::msg)?;
    let path = out.unwrap_or_else(|| PathBuf::from(format!("{selector}.{domain}.key")));
    let mut f = std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot create {}: {e} (an existing key is never overwritten)",
                path.display()
            )
        })?;
    f.write_all(pem.as_bytes())?;
    eprintln!("key written to {}; publish this record:", path.display());
    println!("{record}");
    Ok(())
}

fn add_user(c: &Config, name: &str) -> anyhow::Result<()> {
    let Some(path) = &c.submission.users_file else {
        anyhow::bail!("no [submission] users_file in the config: set one to keep users in");
    };
    let mut password = String::new();
    std::io::stdin().read_line(&mut password)?;
    let password = password.trim_end_matches(['\r', '\n']);
    auth::add_user(path, name, password)?;
    println!("user {name} saved in {}", path.display());
    Ok(())
}

/// Asks the running server: connects first (no server, no other complaint), then reads the
/// operator's words into the command and sends it.
fn ask(
    c: &Config,
    command: impl FnOnce() -> Result<OperatorCommand, ControlError>,
) -> anyhow::Result<Reply> {
    let client = control::Client::connect(&c.data_dir)?;
    let command = command()?;
    client.ask(&command)
}

/// Prints an answer as one line of JSON.
fn print(reply: &Reply) -> anyhow::Result<()> {
    println!("{}", reply.to_json());
    Ok(())
}

fn cluster_command(config: &Config, command: ClusterCmd) -> anyhow::Result<()> {
    match command {
        ClusterCmd::Status { json } => baton::cluster::status_command(config, json),
        ClusterCmd::Forget { node } => baton::cluster::forget_command(config, &node),
    }
}

fn load_config(path: Option<&Path>) -> anyhow::Result<Config> {
    match path {
        Some(path) => Ok(Config::load(path)?),
        None => Ok(Config::defaults()),
    }
}

fn check_config(file: &Path) -> ExitCode {
    match Config::load(file) {
        Ok(c) => {
            println!(
                "{}: OK ({} listener(s), data_dir {})",
                file.display(),
                c.listeners.len(),
                c.data_dir.display()
            );
            ExitCode::SUCCESS
        }
        Err(errors) => {
            eprintln!("{errors}");
            eprintln!("{} error(s)", errors.errors.len());
            ExitCode::FAILURE
        }
    }
}

/// Info for Baton; rustls only for errors: it warns about ordinary client behaviour ("Illegal
/// SNI extension" from every client that connects by IP literal), and Baton reports failed
/// handshakes itself. async-nats only for warnings: it logs each reconnect attempt at info, and
/// Baton reports a failing export itself. RUST_LOG overrides it.
const DEFAULT_LOG_FILTER: &str = "info,rustls=error,async_nats=warn";

fn serve(config: Config) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER)),
        )
        .init();
    // One thread measured cheapest per message on two cores (no cross-thread wake-ups); more
    // pay off where TLS or many connections need more than a core (docs/BENCHMARKS.md).
    raise_open_file_limit(config.limits.max_connections);
    let runtime = if config.worker_threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.worker_threads)
            .enable_all()
            .build()?
    };
    runtime.block_on(async {
        let (stop_tx, stop_rx) = watch::channel(false);
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("stop signal received");
            let _ = stop_tx.send(true);
        });
        app::serve(config, stop_rx).await
    })
}

/// Every connection is a file descriptor: lift the soft limit to the hard one, and say so if
/// even that cannot hold `max_connections` (with room for the spool, logs and deliveries).
fn raise_open_file_limit(max_connections: usize) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain system calls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return;
        }
        if limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
    let wanted = max_connections as u64 * 2 + 256;
    if limit.rlim_cur < wanted {
        tracing::warn!(
            open_files = limit.rlim_cur,
            max_connections,
            "the open-file limit may not hold max_connections (and their deliveries); raise it (ulimit -n) or lower [limits] max_connections"
        );
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => std::future::pending().await,
    }
}

/// `baton stats`'s command: the time span, the grouping and the one class to count, checked.
fn stats_command(
    since: &str,
    until: Option<&str>,
    by: &str,
    class: Option<&str>,
) -> Result<OperatorCommand, ControlError> {
    if let Some(c) = class {
        c.parse::<baton_bounce::Class>()
            .map_err(ControlError::new)?;
    }
    let mut query = OperatorCommand::stats(Some(since), until, by)?;
    if let OperatorCommand::Stats(q) = &mut query {
        q.class = class.map(str::to_string);
    }
    Ok(query)
}
