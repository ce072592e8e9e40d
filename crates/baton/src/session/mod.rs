//! One SMTP session: reads commands and message data from a client connection, applies the
//! policy (relay control, limits) and hands complete messages to the spool.
//!
//! Owns the conversation with one client. It must not touch the spool's files or schedule
//! delivery: it calls [`Spool::commit`] and answers 250 only once that has returned.
//!
//! Replies are batched and flushed only when the session needs more input (RFC 2920), so a
//! pipelining client gets one write per batch of commands.
//!
//! - this file: the session, its input and output, the command dispatch;
//! - `envelope`: HELO/EHLO, MAIL, RCPT and relay control;
//! - `tls`: STARTTLS;
//! - `submission`: AUTH and what an authenticated user may send;
//! - `content`: DATA and BDAT, the headers Baton reads and adds, and the hand-over to intake.

use std::net::SocketAddr;
use std::sync::Arc;

use baton_smtp::address::{domain_of, validate_mailbox};
use baton_smtp::command::printable;
use baton_smtp::{
    AuthMechanism, BodyType, Command, DataOutcome, DataReader, LineEndingCheck, MailFrom, RcptTo,
    Reply, Ret, parse_command,
};
use baton_spool::{
    BodyWriter, DsnRet, Envelope, MessageMeta, Notify, QueueId, Recipient, SpoolError,
};
use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::{Instant, timeout};

use crate::config::{Config, Role, SenderPolicy, Transport};
use crate::reception::Reception;
use baton_shaping::ratelimit::RateLimiter;
use baton_tls::server::{Conn, TlsStore};

mod content;
mod envelope;
mod submission;
mod tls;

use content::*;

/// Why a session ended early; logged, never shown to the client beyond its 421/5xx.
#[derive(Debug)]
enum Close {
    Quit,
    Eof,
    Timeout,
    TooManyErrors,
    /// Past the client's command rate.
    RateLimited,
    /// Data far beyond the size limit.
    TooLarge,
    Smuggling,
    Shutdown,
    Io(#[allow(dead_code, reason = "shown in logs through Debug")] std::io::Error),
}

/// The wait for a command when connection slots run short.
const STRESS_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

struct Transaction {
    id: QueueId,
    mail: MailFrom,
    rcpts: Vec<RcptTo>,
    bdat: Option<Bdat>,
}

/// A BDAT transfer under way.
struct Bdat {
    body: BodyWriter,
    check: LineEndingCheck,
    client_bytes: u64,
    /// The reply every later chunk gets once one has failed (RFC 3030 §2).
    failure: Option<Reply>,
}

pub struct Session {
    stream: Conn,
    /// The listener's TLS, if it has one.
    tls: Option<Arc<TlsStore>>,
    ctx: Arc<Reception>,
    peer: SocketAddr,
    role: Role,
    inbuf: BytesMut,
    out: Vec<u8>,
    /// HELO/EHLO argument and whether it was EHLO.
    helo: Option<(String, bool)>,
    tx: Option<Transaction>,
    errors: u32,
    /// The user who authenticated (submission listeners).
    auth_user: Option<String>,
    /// Commands count against the client address's rate (decided once: relay networks are
    /// exempt).
    command_limited: bool,
    /// A submission listener that lets `relay.networks` send without AUTH (opt-in).
    trust_networks: bool,
    /// RCPTs past `max_recipients` in this session: answered 452 without counting as errors
    /// until `recipient_overshoot` (Postfix's smtpd_recipient_overshoot_limit).
    overshoot: usize,
    shutdown: watch::Receiver<bool>,
}

enum Input {
    Line(BytesMut),
    TooLong,
}

impl Session {
    pub fn new(
        stream: Conn,
        tls: Option<Arc<TlsStore>>,
        ctx: Arc<Reception>,
        peer: SocketAddr,
        role: Role,
    ) -> Self {
        let shutdown = ctx.shutdown.clone();
        let command_limited = ctx.command_rate.is_some() && !ctx.trusted(peer.ip().to_canonical());
        Session {
            stream,
            tls,
            ctx,
            peer,
            role,
            inbuf: BytesMut::with_capacity(8192),
            out: Vec::with_capacity(1024),
            helo: None,
            tx: None,
            errors: 0,
            auth_user: None,
            command_limited,
            trust_networks: false,
            overshoot: 0,
            shutdown,
        }
    }

    /// Lets clients in `relay.networks` use a submission listener without AUTH.
    pub fn trusting_networks(mut self, trust: bool) -> Self {
        self.trust_networks = trust;
        self
    }

    pub async fn run(mut self) {
        let greeting = Reply::new(220, "", format!("{} ESMTP Baton", self.ctx.config.hostname));
        self.reply(greeting);
        let close = self.serve().await;
        let host = &self.ctx.config.hostname;
        let last_word = match close {
            Close::Timeout => Some(Reply::new(
                421,
                "4.4.2",
                format!("{host} Error: timeout exceeded"),
            )),
            Close::Shutdown => Some(Reply::new(
                421,
                "4.3.2",
                format!("{host} Service shutting down, try again later"),
            )),
            _ => None,
        };
        if let Some(reply) = last_word {
            self.reply(reply);
        }
        match &close {
            Close::Quit | Close::Eof => {}
            other => tracing::info!(client = %self.peer, reason = ?other, "session closed"),
        }
        let _ = self.flush().await;
        let _ = self.stream.shutdown().await;
    }

    async fn serve(&mut self) -> Close {
        loop {
            let input = match self.next_line().await {
                Ok(input) => input,
                Err(close) => return close,
            };
            let line = match input {
                Input::Line(line) => line,
                Input::TooLong => {
                    let r = Reply::new(500, "5.5.2", "Error: line too long");
                    if let Some(close) = self.error_reply(r).await {
                        return close;
                    }
                    continue;
                }
            };
            if self.command_limited && !self.ctx.command_allowed(self.peer.ip().to_canonical()) {
                let host = &self.ctx.config.hostname;
                self.reply(Reply::new(
                    421,
                    "4.7.0",
                    format!("{host} Error: too many commands from your address, slow down"),
                ));
                return Close::RateLimited;
            }
            let outcome = match parse_command(&line) {
                Ok(Command::StartTls) => match self.starttls().await {
                    Ok(None) => continue,
                    Ok(Some(reply)) => Ok(reply),
                    Err(close) => Err(close),
                },
                Ok(command) => self.command(command).await,
                Err(reply) => Ok(reply),
            };
            match outcome {
                Ok(reply) => {
                    if reply.is_error() && !self.forgiven(&reply) {
                        if let Some(close) = self.error_reply(reply).await {
                            return close;
                        }
                    } else {
                        self.reply(reply);
                    }
                }
                Err(close) => return close,
            }
        }
    }

    /// An excess recipient's 452 is the transaction's limit at work, not the client's error
    /// (RFC 5321 §4.5.3.1.8): not counted, not delayed, until the session's overshoot passes
    /// `recipient_overshoot`.
    fn forgiven(&self, reply: &Reply) -> bool {
        reply.code == 452
            && reply.status == "4.5.3"
            && self.overshoot <= self.ctx.config.limits.recipient_overshoot
    }

    /// Queues an error reply and counts it. Past `error_delay_after` errors each one is held
    /// back for `error_delay` (a tarpit: a client probing addresses or protocol slows to a
    /// crawl); past `max_errors` the session ends with 421.
    async fn error_reply(&mut self, reply: Reply) -> Option<Close> {
        let limits = &self.ctx.config.limits;
        if self.errors >= limits.error_delay_after {
            let delay = limits.error_delay;
            if let Err(close) = self.flush().await {
                return Some(close);
            }
            tokio::time::sleep(delay).await;
        }
        self.reply(reply);
        self.errors += 1;
        if self.errors >= self.ctx.config.limits.max_errors {
            let host = self.ctx.config.hostname.clone();
            self.reply(Reply::new(
                421,
                "4.7.0",
                format!("{host} Error: too many errors"),
            ));
            return Some(Close::TooManyErrors);
        }
        None
    }

    fn reply(&mut self, reply: Reply) {
        reply.write_to(&mut self.out);
    }

    async fn flush(&mut self) -> Result<(), Close> {
        if !self.out.is_empty() {
            self.stream.write_all(&self.out).await.map_err(Close::Io)?;
            self.out.clear();
        }
        Ok(())
    }

    /// Reads more input, flushing pending replies first. `deadline` bounds the wait.
    async fn fill(&mut self, deadline: Instant, idle: bool) -> Result<(), Close> {
        self.flush().await?;
        let read = async {
            match timeout(
                deadline.saturating_duration_since(Instant::now()),
                self.stream.read_buf(&mut self.inbuf),
            )
            .await
            {
                Err(_) => Err(Close::Timeout),
                Ok(Ok(0)) => Err(Close::Eof),
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(Close::Io(e)),
            }
        };
        if idle {
            // Only between commands may a shutdown interrupt the client.
            let mut shutdown = self.shutdown.clone();
            tokio::select! {
                r = read => r,
                _ = shutdown.wait_for(|stop| *stop) => Err(Close::Shutdown),
            }
        } else {
            read.await
        }
    }

    /// The next command line (with its line end), or a note that it was too long.
    async fn next_line(&mut self) -> Result<Input, Close> {
        let limits = &self.ctx.config.limits;
        let (max_len, mut idle_timeout, command_timeout) = (
            limits.max_line_length,
            limits.idle_timeout,
            limits.command_timeout,
        );
        if self.ctx.under_stress() {
            idle_timeout = idle_timeout.min(STRESS_IDLE_TIMEOUT);
        }
        let mut deadline = Instant::now() + idle_timeout;
        let mut started = !self.inbuf.is_empty();
        if started {
            deadline = deadline.min(Instant::now() + command_timeout);
        }
        let mut discarding = false;
        loop {
            if let Some(pos) = self.inbuf.iter().position(|&b| b == b'\n') {
                let line = self.inbuf.split_to(pos + 1);
                if discarding || line.len() > max_len {
                    return Ok(Input::TooLong);
                }
                return Ok(Input::Line(line));
            }
            if self.inbuf.len() > max_len {
                // Keep only the tail so that a line of any length costs no memory.
                self.inbuf.clear();
                discarding = true;
            }
            let idle = !started && !discarding;
            self.fill(deadline, idle).await?;
            if !started {
                started = true;
                deadline = Instant::now() + command_timeout;
            }
        }
    }

    async fn command(&mut self, command: Command) -> Result<Reply, Close> {
        Ok(match command {
            Command::Ehlo(host) => self.hello(host, true),
            Command::Helo(host) => self.hello(host, false),
            Command::Mail(mail) => self.mail(mail),
            Command::Rcpt(rcpt) => self.rcpt(rcpt),
            Command::Data => return self.data().await,
            Command::Bdat { size, last } => return self.bdat(size, last).await,
            Command::Rset => {
                self.tx = None;
                Reply::new(250, "2.0.0", "Ok")
            }
            Command::Noop => Reply::new(250, "2.0.0", "Ok"),
            Command::Quit => {
                self.reply(Reply::new(221, "2.0.0", "Bye"));
                return Err(Close::Quit);
            }
            Command::Vrfy => Reply::new(
                252,
                "2.0.0",
                "Cannot VRFY user, but will accept message and attempt delivery",
            ),
            Command::Expn => Reply::new(502, "5.5.1", "Error: EXPN not supported"),
            Command::Help => Reply::new(
                214,
                "2.0.0",
                "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP\nSee RFC 5321",
            ),
            Command::StartTls => Reply::new(503, "5.5.1", "Error: STARTTLS out of sequence"),
            Command::Auth { mechanism, initial } => return self.auth(mechanism, initial).await,
        })
    }
}
