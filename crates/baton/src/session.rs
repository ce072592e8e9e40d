//! One SMTP session: reads commands and message data from a client connection, applies the
//! policy (relay control, limits) and hands complete messages to the spool.
//!
//! Owns the conversation with one client. It must not touch the spool's files or schedule
//! delivery: it calls [`Spool::commit`] and answers 250 only once that has returned.
//!
//! Replies are batched and flushed only when the session needs more input (RFC 2920), so a
//! pipelining client gets one write per batch of commands.

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
use crate::server::Reception;
use baton_shaping::ratelimit::RateLimiter;
use baton_tls::server::{Conn, TlsStore};

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

    /// RFC 3207. Whatever the client pipelined after STARTTLS is thrown away before the
    /// handshake (CVE-2011-0411), and the session starts over inside TLS.
    /// Returns None once TLS is up (the 220 went out before the handshake).
    async fn starttls(&mut self) -> Result<Option<Reply>, Close> {
        let Some(store) = self.tls.clone() else {
            return Ok(Some(Reply::new(
                502,
                "5.5.1",
                "Error: STARTTLS not available",
            )));
        };
        if self.stream.is_tls() {
            return Ok(Some(Reply::new(503, "5.5.1", "Error: TLS already active")));
        }
        self.reply(Reply::new(220, "2.0.0", "Ready to start TLS"));
        self.flush().await?;
        self.inbuf.clear();
        let Conn::Plain(tcp) = std::mem::replace(&mut self.stream, Conn::Gone) else {
            return Err(Close::Eof);
        };
        let limit = self.ctx.config.limits.command_timeout;
        match timeout(limit, store.acceptor().accept(tcp)).await {
            Ok(Ok(tls)) => {
                self.stream = Conn::Tls(Box::new(tls));
                self.inbuf.clear();
                self.helo = None;
                self.tx = None;
                Ok(None)
            }
            Ok(Err(e)) => {
                tracing::info!(client = %self.peer, error = %e, "TLS handshake failed");
                Err(Close::Eof)
            }
            Err(_) => Err(Close::Timeout),
        }
    }

    fn hello(&mut self, host: String, esmtp: bool) -> Reply {
        self.tx = None;
        let me = &self.ctx.config.hostname;
        let reply = if esmtp {
            let max = self.ctx.config.limits.max_message_size;
            Reply::new(
                250,
                "",
                format!(
                    "{me} Hello {} [{}]\nPIPELINING\nSIZE {max}\n8BITMIME\nSMTPUTF8\nENHANCEDSTATUSCODES\nDSN\nCHUNKING{}",
                    printable(&host),
                    self.peer.ip(),
                    match (
                        self.tls.is_some() && !self.stream.is_tls(),
                        self.is_submission() && self.ctx.users.is_some() && self.auth_allowed(),
                    ) {
                        (true, true) => "\nSTARTTLS\nAUTH PLAIN LOGIN",
                        (true, false) => "\nSTARTTLS",
                        (false, true) => "\nAUTH PLAIN LOGIN",
                        (false, false) => "",
                    }
                ),
            )
        } else {
            Reply::new(250, "", me.clone())
        };
        self.helo = Some((host, esmtp));
        reply
    }

    fn esmtp(&self) -> bool {
        matches!(self.helo, Some((_, true)))
    }

    fn mail(&mut self, mail: MailFrom) -> Reply {
        if self.helo.is_none() {
            return Reply::new(503, "5.5.1", "Error: send HELO/EHLO first");
        }
        if self.tx.is_some() {
            return Reply::new(503, "5.5.1", "Error: nested MAIL command");
        }
        // Submission is for authenticated users (and relay.networks where the listener says so).
        let trusted = self.trust_networks && self.in_relay_networks();
        if self.is_submission() && self.auth_user.is_none() && !trusted {
            return Reply::new(530, "5.7.0", "Authentication required");
        }
        if !self.sender_allowed(&mail.address) {
            return Reply::new(
                553,
                "5.7.1",
                format!(
                    "<{}>: Sender address rejected: not owned by user {}",
                    printable(&mail.address),
                    self.auth_user.as_deref().unwrap_or("")
                ),
            );
        }
        if let Some(reply) = self.user_rate(&self.ctx.user_messages, "message") {
            return reply;
        }
        let has_params = mail.size.is_some()
            || mail.body != BodyType::Unspecified
            || mail.smtputf8
            || mail.ret.is_some()
            || mail.envid.is_some();
        if has_params && !self.esmtp() {
            return Reply::new(555, "5.5.4", "Error: MAIL parameters require EHLO");
        }
        let max = self.ctx.config.limits.max_message_size;
        if mail.size.is_some_and(|size| size > max) {
            return Reply::new(
                552,
                "5.3.4",
                "Message size exceeds fixed maximum message size",
            );
        }
        self.tx = Some(Transaction {
            id: self.ctx.intake.next_id(),
            mail,
            rcpts: Vec::new(),
            bdat: None,
        });
        Reply::new(250, "2.1.0", "Ok")
    }

    fn rcpt(&mut self, rcpt: RcptTo) -> Reply {
        let esmtp = self.esmtp();
        let relay_allowed = self.relay_allowed();
        let max = self.ctx.config.limits.max_recipients;
        let Some(tx) = self.tx.as_mut() else {
            return Reply::new(503, "5.5.1", "Error: need MAIL command");
        };
        if (rcpt.notify.is_given() || rcpt.orcpt.is_some()) && !esmtp {
            return Reply::new(555, "5.5.4", "Error: RCPT parameters require EHLO");
        }
        if tx.rcpts.len() >= max {
            self.overshoot = self.overshoot.saturating_add(1);
            return Reply::new(452, "4.5.3", "Error: too many recipients");
        }
        if rcpt.address != "postmaster"
            && validate_mailbox(&rcpt.address, tx.mail.smtputf8).is_err()
        {
            return Reply::new(
                553,
                "5.6.7",
                "Error: non-ASCII recipient address requires SMTPUTF8",
            );
        }
        let local = rcpt.address == "postmaster"
            || domain_of(&rcpt.address)
                .is_some_and(|d| self.ctx.config.relay.local_domains.contains(&d));
        if !local && !relay_allowed {
            return Reply::new(
                554,
                "5.7.1",
                format!("<{}>: Relay access denied", printable(&rcpt.address)),
            );
        }
        if let Some(reply) = self.unknown_local_user(&rcpt.address) {
            return reply;
        }
        if let Some(reply) = self.user_rate(&self.ctx.user_recipients, "recipient") {
            return reply;
        }
        let Some(tx) = self.tx.as_mut() else {
            return Reply::new(503, "5.5.1", "Error: need MAIL command");
        };
        tx.rcpts.push(rcpt);
        Reply::new(250, "2.1.5", "Ok")
    }

    /// 550 5.1.1 for a recipient at a locally delivered domain with no mailbox. With LMTP and
    /// no user list, the LMTP server decides.
    fn unknown_local_user(&self, address: &str) -> Option<Reply> {
        let config = &self.ctx.config;
        let domain = domain_of(address).unwrap_or_default();
        let is_local = address == "postmaster" || config.transport_for(&domain) == Transport::Local;
        if !is_local || (config.local.lmtp.is_some() && config.local.users.is_empty()) {
            return None;
        }
        if config.local_mailbox(address).is_some() {
            return None;
        }
        Some(Reply::new(
            550,
            "5.1.1",
            format!(
                "<{}>: Recipient address rejected: User unknown in local recipient table",
                printable(address)
            ),
        ))
    }

    fn is_submission(&self) -> bool {
        matches!(self.role, Role::Submission | Role::Submissions)
    }

    /// AUTH is offered inside TLS only, or in plaintext from loopback when configured.
    fn auth_allowed(&self) -> bool {
        self.stream.is_tls()
            || (self.ctx.config.submission.plaintext_auth_on_loopback
                && self.peer.ip().to_canonical().is_loopback())
    }

    /// RFC 4954 AUTH with PLAIN or LOGIN.
    async fn auth(&mut self, mechanism: AuthMechanism, initial: String) -> Result<Reply, Close> {
        let Some(users) = self.ctx.users.clone().filter(|_| self.is_submission()) else {
            return Ok(Reply::new(502, "5.5.1", "Error: AUTH not available here"));
        };
        if self.auth_user.is_some() {
            return Ok(Reply::new(503, "5.5.1", "Error: already authenticated"));
        }
        if self.tx.is_some() {
            return Ok(Reply::new(
                503,
                "5.5.1",
                "Error: AUTH not allowed in a mail transaction",
            ));
        }
        if !self.auth_allowed() {
            return Ok(Reply::new(
                538,
                "5.7.11",
                "Encryption required for requested authentication mechanism",
            ));
        }
        let ip = self.peer.ip().to_canonical();
        if self.ctx.auth_failures.blocked(ip) {
            return Ok(Reply::new(
                454,
                "4.7.0",
                "Too many failed authentications from your address; try again later",
            ));
        }
        let initial = if initial == "=" {
            String::new()
        } else {
            initial
        };
        let credentials = match mechanism {
            AuthMechanism::Plain => {
                let response = match initial.is_empty() {
                    true => match self.challenge("").await? {
                        Some(r) => r,
                        None => return Ok(cancelled()),
                    },
                    false => initial,
                };
                crate::auth::decode_plain(&response)
            }
            AuthMechanism::Login => {
                let user = match initial.is_empty() {
                    true => match self.challenge("VXNlcm5hbWU6").await? {
                        Some(r) => r,
                        None => return Ok(cancelled()),
                    },
                    false => initial,
                };
                let Some(password) = self.challenge("UGFzc3dvcmQ6").await? else {
                    return Ok(cancelled());
                };
                crate::auth::decode_b64_text(&user).zip(crate::auth::decode_b64_text(&password))
            }
            AuthMechanism::Other => {
                return Ok(Reply::new(504, "5.5.4", "Unrecognized authentication type"));
            }
        };
        let Some((user, password)) = credentials else {
            return Ok(Reply::new(
                501,
                "5.5.2",
                "Error: cannot decode the response",
            ));
        };
        let check_user = user.clone();
        let ok = tokio::task::spawn_blocking(move || users.verify(&check_user, &password))
            .await
            .unwrap_or(false);
        if ok {
            tracing::info!(client = %self.peer, user = %user, "authenticated");
            self.auth_user = Some(user.to_ascii_lowercase());
            Ok(Reply::new(235, "2.7.0", "Authentication successful"))
        } else {
            self.ctx.auth_failures.failed(ip);
            tracing::warn!(client = %self.peer, user = %printable(&user), "authentication failed");
            Ok(Reply::new(
                535,
                "5.7.8",
                "Authentication credentials invalid",
            ))
        }
    }

    /// Sends a 334 challenge and returns the client's line, or None if it cancelled ("*").
    async fn challenge(&mut self, text: &'static str) -> Result<Option<String>, Close> {
        self.reply(Reply::new(334, "", text));
        match self.next_line().await? {
            Input::Line(line) => {
                let line = String::from_utf8_lossy(&line).trim().to_string();
                Ok((line != "*").then_some(line))
            }
            Input::TooLong => Ok(None),
        }
    }

    /// Whether the authenticated user may use `address` as a sender ([submission] sender_policy).
    fn sender_allowed(&self, address: &str) -> bool {
        let Some(user) = &self.auth_user else {
            return true;
        };
        match self.ctx.config.submission.sender_policy {
            SenderPolicy::Any => true,
            SenderPolicy::Address => address.eq_ignore_ascii_case(user),
            SenderPolicy::Domain => {
                let domain = |a: &str| a.rsplit_once('@').map(|(_, d)| d.to_ascii_lowercase());
                domain(address).is_some() && domain(address) == domain(user)
            }
        }
    }

    /// Counts one message or recipient against the authenticated user's rate (`[submission]`);
    /// past it, a 450 that the client's queue will retry.
    fn user_rate(&self, limiter: &Option<RateLimiter<String>>, what: &str) -> Option<Reply> {
        let (Some(user), Some(limiter)) = (&self.auth_user, limiter) else {
            return None;
        };
        if limiter.take(user) {
            return None;
        }
        tracing::warn!(%user, client = %self.peer, "{what} rate limit reached");
        Some(Reply::new(
            450,
            "4.7.1",
            format!("Error: {what} rate limit exceeded for {user}, try again later"),
        ))
    }

    fn relay_allowed(&self) -> bool {
        self.auth_user.is_some() || self.in_relay_networks()
    }

    fn in_relay_networks(&self) -> bool {
        let ip = self.peer.ip().to_canonical();
        self.ctx
            .config
            .relay
            .networks
            .iter()
            .any(|n| n.contains(&ip))
    }

    /// Checks that a transaction is ready for its content.
    fn ready_for_data(&self) -> Option<Reply> {
        match &self.tx {
            None => Some(Reply::new(503, "5.5.1", "Error: need MAIL command")),
            Some(tx) if tx.rcpts.is_empty() => {
                Some(Reply::new(554, "5.5.1", "Error: no valid recipients"))
            }
            Some(_) => None,
        }
    }

    async fn data(&mut self) -> Result<Reply, Close> {
        if let Some(reply) = self.ready_for_data() {
            return Ok(reply);
        }
        if self.tx.as_ref().is_some_and(|tx| tx.bdat.is_some()) {
            return Ok(Reply::new(503, "5.5.1", "Error: DATA during BDAT transfer"));
        }
        self.reply(Reply::new(354, "", "End data with <CR><LF>.<CR><LF>"));
        let Some(mut body) = self.start_body() else {
            return Ok(Reply::new(503, "5.5.1", "Error: need MAIL command"));
        };
        let limit = self.ctx.config.limits.max_message_size;
        let data_timeout = self.ctx.config.limits.data_timeout;
        let mut reader = DataReader::new(limit);
        let mut scratch = Vec::new();
        let mut spool_error: Option<SpoolError> = None;
        let outcome = loop {
            let sink = if spool_error.is_some() {
                scratch.clear();
                &mut scratch
            } else {
                body.buf()
            };
            let (used, outcome) = reader.feed(&self.inbuf, sink);
            self.inbuf.advance(used);
            if spool_error.is_none()
                && let Err(e) = body.settle().await
            {
                spool_error = Some(e);
            }
            if let Some(outcome) = outcome {
                break outcome;
            }
            if reader.seen() > limit.saturating_mul(2).saturating_add(1 << 20) {
                // Past twice the limit, stop reading what will be thrown away.
                self.tx = None;
                self.reply(too_large());
                return Err(Close::TooLarge);
            }
            self.fill(Instant::now() + data_timeout, false).await?;
        };
        match outcome {
            DataOutcome::Complete => match spool_error {
                Some(e) => {
                    self.tx = None;
                    Ok(spool_reply(&e))
                }
                None => Ok(self.finish(body).await),
            },
            DataOutcome::TooLarge => {
                self.tx = None;
                Ok(too_large())
            }
            DataOutcome::BareCr | DataOutcome::BareLf => {
                self.tx = None;
                let what = if outcome == DataOutcome::BareCr {
                    "CR"
                } else {
                    "LF"
                };
                tracing::warn!(client = %self.peer, "bare {what} in DATA; closing (SMTP smuggling defence)");
                self.reply(Reply::new(
                    550,
                    "5.5.2",
                    format!("Error: bare <{what}> received; lines must end with <CR><LF>"),
                ));
                Err(Close::Smuggling)
            }
        }
    }

    async fn bdat(&mut self, size: u64, last: bool) -> Result<Reply, Close> {
        let not_ready = self.ready_for_data();
        // The chunk is read in every case, or its bytes would be taken for commands.
        if not_ready.is_none()
            && let Some(tx) = self.tx.as_mut()
            && tx.bdat.is_none()
        {
            let body = self.start_body();
            if let (Some(tx), Some(body)) = (self.tx.as_mut(), body) {
                tx.bdat = Some(Bdat {
                    body,
                    check: LineEndingCheck::default(),
                    client_bytes: 0,
                    failure: None,
                });
            }
        }
        let limit = self.ctx.config.limits.max_message_size;
        let data_timeout = self.ctx.config.limits.data_timeout;
        if size > limit.saturating_mul(2) {
            // Reading a chunk this large only to throw it away is not worth staying in step.
            self.tx = None;
            self.reply(too_large());
            return Err(Close::TooLarge);
        }
        let mut remaining = size;
        loop {
            let take = remaining.min(self.inbuf.len() as u64) as usize;
            let chunk = self.inbuf.split_to(take);
            remaining -= take as u64;
            if let Some(bdat) = self.tx.as_mut().and_then(|tx| tx.bdat.as_mut())
                && bdat.failure.is_none()
            {
                bdat.client_bytes += chunk.len() as u64;
                bdat.failure = if bdat.client_bytes > limit {
                    Some(too_large())
                } else if bdat.check.check(&chunk).is_err() {
                    Some(bare_line_end_in_bdat())
                } else {
                    bdat.body.buf().extend_from_slice(&chunk);
                    bdat.body.settle().await.err().map(|e| spool_reply(&e))
                };
            }
            if remaining == 0 {
                break;
            }
            self.fill(Instant::now() + data_timeout, false).await?;
        }
        if let Some(reply) = not_ready {
            return Ok(reply);
        }
        let Some(bdat) = self.tx.as_mut().and_then(|tx| tx.bdat.as_mut()) else {
            return Ok(Reply::new(503, "5.5.1", "Error: need MAIL command"));
        };
        if last && bdat.failure.is_none() && bdat.check.finish().is_err() {
            bdat.failure = Some(bare_line_end_in_bdat());
        }
        if let Some(failure) = bdat.failure.clone() {
            if last {
                self.tx = None;
            }
            return Ok(failure);
        }
        if !last {
            return Ok(Reply::new(250, "2.0.0", format!("{size} octets received")));
        }
        let Some(bdat) = self.tx.as_mut().and_then(|tx| tx.bdat.take()) else {
            return Ok(Reply::new(503, "5.5.1", "Error: need MAIL command"));
        };
        Ok(self.finish(bdat.body).await)
    }

    /// Checks the header section of a complete message: a mail loop (too many Received:
    /// fields, RFC 5321 §6.3), and on submission the From: domain and the Date: and
    /// Message-ID: a submission server adds when missing (RFC 6409 §8).
    fn inspect_headers(
        &self,
        head: &[u8],
        body: &mut BodyWriter,
        id: QueueId,
    ) -> Result<(), Reply> {
        let fields = crate::schedule::header_fields(head);
        let hops = fields
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("received"))
            .count();
        if hops > self.ctx.config.limits.max_received_headers {
            return Err(Reply::new(
                554,
                "5.4.6",
                format!("Error: too many hops ({hops} Received: fields); mail loop?"),
            ));
        }
        if !self.is_submission() {
            return Ok(());
        }
        let from = crate::schedule::from_address(head);
        if let (Some(_), Some(address)) = (&self.auth_user, from)
            && !self.sender_allowed(&address)
        {
            return Err(Reply::new(
                550,
                "5.7.1",
                format!(
                    "Error: From: {} is not an address of user {}",
                    printable(&address),
                    self.auth_user.as_deref().unwrap_or("")
                ),
            ));
        }
        let has = |name: &str| fields.iter().any(|(n, _)| n.eq_ignore_ascii_case(name));
        let mut added = String::new();
        if !has("date") {
            let now = jiff::Zoned::now().strftime("%a, %d %b %Y %H:%M:%S %z");
            added.push_str(&format!("Date: {now}\r\n"));
        }
        if !has("message-id") {
            added.push_str(&format!(
                "Message-ID: <{id}@{}>\r\n",
                self.ctx.config.hostname
            ));
        }
        if !added.is_empty() {
            // After our Received: header, which starts the body (bodies still in memory).
            let at = received_len(head);
            if !body.insert(at, added.as_bytes()) {
                tracing::info!(id = %id, "large message without Date or Message-ID left as it is");
            }
        }
        Ok(())
    }

    /// SPF, DKIM and DMARC verdicts in an Authentication-Results field under our Received:,
    /// after removing any that arrived claiming our name (RFC 8601 §5). Bodies that have spilled
    /// to disk (over 256 KiB) are left unchecked.
    async fn authentication_results(&self, body: &mut BodyWriter, sender: &str) {
        let Some(checker) = &self.ctx.inbound_auth else {
            return;
        };
        let Some(message) = body.in_memory() else {
            tracing::info!(client = %self.peer, "message too large for inbound authentication checks");
            return;
        };
        let forged = crate::inbound_auth::strip_forged(message, checker.hostname());
        if forged > 0 {
            tracing::info!(client = %self.peer, forged, "removed Authentication-Results claiming our name");
        }
        let client = crate::inbound_auth::Client {
            ip: self.peer.ip().to_canonical(),
            helo: self.helo.as_ref().map(|(h, _)| h.as_str()).unwrap_or(""),
            mail_from: sender,
        };
        let header = checker.header(message, &client).await;
        let at = received_len(message);
        message.splice(at..at, header.bytes());
    }

    /// A body writer for the current transaction, primed with our Received: header.
    fn start_body(&mut self) -> Option<BodyWriter> {
        let tx = self.tx.as_ref()?;
        let mut body = self.ctx.intake.body_writer(tx.id);
        let header = self.received_header(tx);
        body.buf().extend_from_slice(header.as_bytes());
        Some(body)
    }

    /// RFC 5321 §4.4 trace header.
    fn received_header(&self, tx: &Transaction) -> String {
        let (helo, esmtp) = self
            .helo
            .as_ref()
            .map(|(h, e)| (sanitize(h), *e))
            .unwrap_or_else(|| ("unknown".into(), false));
        // RFC 3848 / RFC 6531 protocol names; S for TLS.
        let protocol = match (esmtp, tx.mail.smtputf8, self.stream.is_tls()) {
            (true, true, false) => "UTF8SMTP",
            (true, true, true) => "UTF8SMTPS",
            (true, false, false) => "ESMTP",
            (true, false, true) => "ESMTPS",
            (false, _, false) => "SMTP",
            (false, _, true) => "SMTPS",
        };
        let protocol = if self.auth_user.is_some() && protocol.starts_with("ESMTP") {
            if self.stream.is_tls() {
                "ESMTPSA"
            } else {
                "ESMTPA"
            }
        } else {
            protocol
        };
        let tls_comment = self
            .stream
            .tls_description()
            .map(|t| format!("\r\n\t(using {t})"))
            .unwrap_or_default();
        let for_clause = match tx.rcpts.as_slice() {
            [one] => format!("\r\n\tfor <{}>", sanitize(&one.address)),
            _ => String::new(),
        };
        let date = jiff::Zoned::now().strftime("%a, %d %b %Y %H:%M:%S %z");
        format!(
            "Received: from {helo} (unknown [{}]){tls_comment}\r\n\tby {} (Baton) with {protocol} id {}{for_clause};\r\n\t{date}\r\n",
            self.peer.ip().to_canonical(),
            self.ctx.config.hostname,
            tx.id,
        )
    }

    /// Commits the finished message and answers for it.
    async fn finish(&mut self, mut body: BodyWriter) -> Reply {
        let Some(tx) = self.tx.take() else {
            return Reply::new(503, "5.5.1", "Error: need MAIL command");
        };
        let id = tx.id;
        let mut envelope = self.envelope(tx, body.len());
        // One look at the header section serves both checks (Date/Message-ID inserted by the
        // first do not matter to the second).
        let head = match body.head(64 << 10) {
            Ok(head) => head,
            Err(e) => return spool_reply(&SpoolError::Io(e)),
        };
        if let Err(reply) = self.inspect_headers(&head, &mut body, id) {
            return reply;
        }
        if self.role == Role::Mx {
            self.authentication_results(&mut body, &envelope.sender)
                .await;
        }
        envelope.size = body.len();
        // X-Baton-* controls (send-at, window, tenant) are for the operator's own clients: from
        // anyone else they are mere header fields.
        if self.relay_allowed()
            && let Err(reply) = apply_schedule(&mut envelope, &head, &self.ctx.config)
        {
            return reply;
        }
        match self
            .ctx
            .intake
            .queue_message(envelope, body, self.role.as_str())
            .await
        {
            Ok(id) => Reply::new(250, "2.0.0", format!("OK queued as {id}")),
            Err(e) => spool_reply(&e),
        }
    }

    fn envelope(&self, tx: Transaction, size: u64) -> Envelope {
        let Transaction {
            id, mail, rcpts, ..
        } = tx;
        let config = &self.ctx.config;
        // The bare <Postmaster> (RFC 5321 §4.5.1) is this server's postmaster: at its first
        // local domain, so that it is delivered here, never routed to a domain "".
        let postmaster = || {
            let domain = config
                .relay
                .local_domains
                .first()
                .unwrap_or(&config.hostname);
            format!("postmaster@{domain}")
        };
        Envelope {
            id,
            sender: mail.address,
            recipients: rcpts
                .into_iter()
                .map(|r| {
                    let address = match r.address.as_str() {
                        "postmaster" => postmaster(),
                        _ => r.address,
                    };
                    Recipient::new(address, r.orcpt, dsn_notify(r.notify))
                })
                .collect(),
            dsn_ret: mail.ret.map(|r| match r {
                Ret::Full => DsnRet::Full,
                Ret::Headers => DsnRet::Headers,
            }),
            dsn_envid: mail.envid,
            eight_bit: mail.body == BodyType::EightBitMime,
            smtputf8: mail.smtputf8,
            client_ip: self.peer.ip().to_canonical(),
            helo: self
                .helo
                .as_ref()
                .map(|(h, _)| h.clone())
                .unwrap_or_default(),
            arrived_ms: baton_spool::now_ms(),
            size,
            meta: MessageMeta::default(),
        }
    }
}

/// RCPT's NOTIFY as the spool keeps it, keyword by keyword.
fn dsn_notify(given: baton_smtp::Notify) -> Notify {
    [
        (baton_smtp::Notify::NEVER, Notify::NEVER),
        (baton_smtp::Notify::SUCCESS, Notify::SUCCESS),
        (baton_smtp::Notify::FAILURE, Notify::FAILURE),
        (baton_smtp::Notify::DELAY, Notify::DELAY),
    ]
    .into_iter()
    .filter(|&(keyword, _)| given.contains(keyword))
    .fold(Notify::NOT_GIVEN, |notify, (_, flag)| notify | flag)
}

/// Length of the first header field (our Received:, with its folded lines).
fn received_len(head: &[u8]) -> usize {
    let mut i = 0;
    loop {
        let Some(end) = head[i..].windows(2).position(|w| w == b"\r\n") else {
            return head.len();
        };
        i += end + 2;
        if !matches!(head.get(i), Some(b' ') | Some(b'\t')) {
            return i;
        }
    }
}

/// Reads X-Baton-Send-At / X-Baton-Window into the envelope (see [`crate::schedule`]).
fn apply_schedule(envelope: &mut Envelope, head: &[u8], config: &Config) -> Result<(), Reply> {
    let requested = crate::schedule::requested(head)
        .map_err(|why| Reply::new(550, "5.6.0", format!("Error: {why}")))?;
    if let Some(at) = requested.send_at_ms {
        crate::schedule::check_send_at(at, envelope.arrived_ms, &config.delivery)
            .map_err(|why| Reply::new(550, "5.6.0", format!("Error: {why}")))?;
        for r in &mut envelope.recipients {
            r.next_attempt_ms = at;
        }
        // Kept, so that operator actions (flush, resume, release) never send it earlier.
        envelope.meta.send_at_ms = Some(at);
    }
    envelope.meta.window = requested.window;
    envelope.meta.tenant = requested.tenant;
    envelope.meta.strip_baton_headers = requested.has_baton_headers;
    Ok(())
}

fn cancelled() -> Reply {
    Reply::new(501, "5.0.0", "Authentication cancelled")
}

fn too_large() -> Reply {
    Reply::new(
        552,
        "5.3.4",
        "Message size exceeds fixed maximum message size",
    )
}

fn bare_line_end_in_bdat() -> Reply {
    Reply::new(
        550,
        "5.6.0",
        "Error: bare <CR> or <LF> in message; lines must end with <CR><LF>",
    )
}

fn spool_reply(err: &SpoolError) -> Reply {
    match err {
        SpoolError::NoSpace(_) => Reply::new(452, "4.3.1", "Insufficient system storage"),
        _ => Reply::new(
            451,
            "4.3.0",
            "Error: queue file write error, try again later",
        ),
    }
}

/// Client-supplied text for a trace header: printable, no line breaks, bounded.
fn sanitize(s: &str) -> String {
    s.chars()
        .take(255)
        .map(|c| {
            if c.is_control() || c == '(' || c == ')' {
                '?'
            } else {
                c
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_keywords_map_to_spool_flags() {
        let smtp = |bits| baton_smtp::Notify(bits);
        assert_eq!(dsn_notify(smtp(0)), Notify::NOT_GIVEN);
        assert_eq!(dsn_notify(smtp(baton_smtp::Notify::NEVER)), Notify::NEVER);
        assert_eq!(
            dsn_notify(smtp(
                baton_smtp::Notify::SUCCESS | baton_smtp::Notify::DELAY
            )),
            Notify::SUCCESS | Notify::DELAY
        );
        assert_eq!(
            dsn_notify(smtp(baton_smtp::Notify::FAILURE)),
            Notify::FAILURE
        );
    }
}
