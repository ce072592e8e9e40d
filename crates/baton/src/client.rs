//! The outbound SMTP/LMTP client: one connection to one server, over which transactions run.
//!
//! EHLO (HELO fallback), opportunistic STARTTLS (certificates are not checked: RFC 7435
//! opportunistic security; what was negotiated is reported), PIPELINING (MAIL, every RCPT and
//! DATA/BDAT go out in one write), SIZE, 8BITMIME, SMTPUTF8, DSN pass-through, CHUNKING,
//! per-recipient results, RSET between transactions. Timeouts follow RFC 5321 §4.5.3.2.
//!
//! Owns one conversation; it must not decide what happens to a recipient after a reply (the
//! queue manager does).

use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use baton_spool::Notify;
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio::time::timeout;

use crate::config::TlsMode;
use crate::trust::{Tlsa, Trust};

/// RFC 5321 §4.5.3.2 client timeouts.
const GREETING_TIMEOUT: Duration = Duration::from_secs(300);
const COMMAND_TIMEOUT: Duration = Duration::from_secs(300);
const DATA_INIT_TIMEOUT: Duration = Duration::from_secs(120);
/// Data goes out in blocks of this size, each under the data-block timeout (RFC 5321
/// §4.5.3.2.6: the timeout is per block, not for the whole message).
const DATA_BLOCK: usize = 1 << 20;
const DATA_END_TIMEOUT: Duration = Duration::from_secs(600);
/// The most a server's reply may hold, all its lines together (a line without its end counts
/// too); past it the attempt is abandoned.
const MAX_REPLY_BYTES: usize = 64 << 10;
/// The most lines one reply may have (an EHLO reply has a dozen or two).
const MAX_REPLY_LINES: usize = 1000;

/// A server reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// Enhanced status code if the server gave one, else derived from the code class.
    pub status: String,
    /// The whole text, lines joined with a space.
    pub text: String,
    /// The text line by line.
    pub lines: Vec<String>,
    /// The server's answer to this recipient's own RCPT: its verdict on the address itself
    /// (a refused MAIL FROM or DATA says nothing about the recipient).
    pub to_rcpt: bool,
}

impl Reply {
    fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }

    /// "550 5.1.1 user unknown", for logs and diagnostic codes.
    pub fn line(&self) -> String {
        format!("{} {}", self.code, self.text)
    }

    /// A reply of our own making (for conditions found before or without the server's word).
    pub fn local(code: u16, status: &str, text: impl Into<String>) -> Reply {
        let text = text.into();
        Reply {
            code,
            status: status.to_string(),
            lines: vec![text.clone()],
            text,
            to_rcpt: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connection to {0} failed: {1}")]
    Connect(String, std::io::Error),
    #[error("{0} timed out {1}")]
    Timeout(String, &'static str),
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    #[error("{0} answered {1}")]
    Rejected(String, String, Box<Reply>),
    #[error("{0}: {1}")]
    Protocol(String, String),
    #[error("TLS with {0} failed: {1}")]
    Tls(String, String),
    /// The route's policy (TLS required, authentication) could not be met; the status says why.
    #[error("{0}: {2}")]
    Policy(String, &'static str, String),
}

impl ClientError {
    /// The server's reply, when the failure was one.
    pub fn reply(&self) -> Option<&Reply> {
        match self {
            ClientError::Rejected(_, _, r) => Some(r.as_ref()),
            _ => None,
        }
    }
}

/// What the server offered in its EHLO reply.
#[derive(Debug, Clone, Default)]
pub struct Capabilities {
    pub pipelining: bool,
    pub size: Option<u64>,
    pub eight_bit: bool,
    pub smtputf8: bool,
    pub dsn: bool,
    pub chunking: bool,
    pub starttls: bool,
    pub auth_plain: bool,
}

/// What TLS was negotiated, for the delivery record.
#[derive(Debug, Clone)]
pub struct TlsInfo {
    pub version: String,
    pub cipher: String,
    /// Whether the certificate chain was authenticated (CA-issued for the host, or by DANE).
    pub verified: bool,
    /// The policy the connection was made under ("opportunistic", "mta-sts", "dane"...).
    pub policy: String,
}

impl std::fmt::Display for TlsInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let check = if self.verified {
            "verified"
        } else {
            "not verified"
        };
        write!(
            f,
            "{} {} ({check}, {})",
            self.version, self.cipher, self.policy
        )
    }
}

/// One message's envelope as the client sends it.
#[derive(Clone, Copy)]
pub struct Outgoing<'a> {
    pub sender: &'a str,
    pub recipients: &'a [OutRcpt],
    pub size: u64,
    pub eight_bit: bool,
    pub smtputf8: bool,
    pub dsn_ret: Option<&'a str>,
    pub dsn_envid: Option<&'a str>,
    pub body: &'a Bytes,
}

#[derive(Debug, Clone)]
pub struct OutRcpt {
    pub address: String,
    pub orcpt: Option<String>,
    /// DSN NOTIFY as in the spool.
    pub notify: Notify,
}

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    /// Only while the TLS handshake owns the socket.
    Gone,
}

fn gone() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::NotConnected,
        "connection in TLS handshake",
    )
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Gone => Poll::Ready(Err(gone())),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Gone => Poll::Ready(Err(gone())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s).poll_flush(cx),
            Stream::Gone => Poll::Ready(Err(gone())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Gone => Poll::Ready(Ok(())),
        }
    }
}

/// An open session with a server, ready for transactions.
pub struct Client {
    stream: Stream,
    rbuf: BytesMut,
    wbuf: Vec<u8>,
    /// The server's name or address, for reports ("mx1.example.net [192.0.2.1]").
    pub remote: String,
    pub caps: Capabilities,
    pub tls: Option<TlsInfo>,
    /// Why this connection is in plaintext though TLS was tried (for the delivery record).
    pub tls_fallback: Option<String>,
    lmtp: bool,
    /// Transactions sent over this connection.
    pub transactions: usize,
    /// A transaction was left open (recipients refused, data refused): RSET before the next.
    needs_rset: bool,
    /// Replies read since the current `send` began.
    replies_this_send: usize,
    /// How long one block of message data may take to go out.
    data_block_timeout: Duration,
    /// Longer lines are broken before sending (0: sent as stored).
    line_limit: usize,
}

/// How a connection should be opened.
#[derive(Clone, Copy)]
pub struct ConnectOptions<'a> {
    pub helo_name: &'a str,
    pub connect_timeout: Duration,
    pub tls: TlsMode,
    /// AUTH PLAIN with these credentials (only inside TLS unless TLS is disabled).
    pub auth: Option<(&'a str, &'a str)>,
    /// The local address to connect from (an egress source).
    pub bind: Option<std::net::IpAddr>,
    /// Trust anchors for checking the server's certificate (reported; enforced under `Verify`).
    pub trust: Option<&'a Trust>,
    /// DANE TLSA records for this host: under `Verify` they, not the CAs, authenticate it.
    pub dane: Option<&'a [Tlsa]>,
    /// What chose `tls`, for the delivery record ("opportunistic", "mta-sts", "dane", "route").
    pub policy: &'a str,
    /// How long one block (1 MiB) of message data may take to go out.
    pub data_block_timeout: Duration,
    /// Lines longer than this are broken before sending (0: sent as stored).
    pub line_limit: usize,
}

impl Client {
    /// Connects over TCP and says EHLO (or LHLO).
    pub async fn connect_tcp(
        addr: SocketAddr,
        host: &str,
        options: &ConnectOptions<'_>,
        lmtp: bool,
    ) -> Result<Client, ClientError> {
        let remote = if host.is_empty() || host == addr.ip().to_string() {
            format!("[{}]", addr.ip())
        } else {
            format!("{host} [{}]", addr.ip())
        };
        let connecting = async {
            match options.bind {
                None => TcpStream::connect(addr).await,
                Some(source) => {
                    let socket = if addr.is_ipv4() {
                        tokio::net::TcpSocket::new_v4()?
                    } else {
                        tokio::net::TcpSocket::new_v6()?
                    };
                    socket.bind(SocketAddr::new(source, 0))?;
                    socket.connect(addr).await
                }
            }
        };
        let stream = match timeout(options.connect_timeout, connecting).await {
            Err(_) => return Err(ClientError::Timeout(remote, "connecting")),
            Ok(Err(e)) => return Err(ClientError::Connect(remote, e)),
            Ok(Ok(s)) => s,
        };
        let _ = stream.set_nodelay(true);
        let mut client = Client::new(Stream::Tcp(stream), remote, lmtp);
        client.open(options, host).await?;
        Ok(client)
    }

    /// Connects to an LMTP server on a Unix socket.
    pub async fn connect_unix(
        path: &Path,
        options: &ConnectOptions<'_>,
    ) -> Result<Client, ClientError> {
        let remote = format!("unix:{}", path.display());
        let stream = match timeout(options.connect_timeout, UnixStream::connect(path)).await {
            Err(_) => return Err(ClientError::Timeout(remote, "connecting")),
            Ok(Err(e)) => return Err(ClientError::Connect(remote, e)),
            Ok(Ok(s)) => s,
        };
        let mut client = Client::new(Stream::Unix(stream), remote, true);
        client.open(options, "").await?;
        Ok(client)
    }

    fn new(stream: Stream, remote: String, lmtp: bool) -> Client {
        Client {
            stream,
            rbuf: BytesMut::with_capacity(4096),
            wbuf: Vec::with_capacity(4096),
            remote,
            caps: Capabilities::default(),
            tls: None,
            tls_fallback: None,
            lmtp,
            transactions: 0,
            needs_rset: false,
            replies_this_send: 0,
            data_block_timeout: Duration::from_secs(180),
            line_limit: crate::downgrade::MAX_LINE,
        }
    }

    async fn open(&mut self, options: &ConnectOptions<'_>, host: &str) -> Result<(), ClientError> {
        self.data_block_timeout = options.data_block_timeout;
        self.line_limit = options.line_limit;
        let greeting = self
            .read_reply(GREETING_TIMEOUT, "waiting for the greeting")
            .await?;
        if greeting.code != 220 {
            return Err(self.rejected("greeting", greeting));
        }
        self.hello(options.helo_name).await?;
        let mut authenticated = Err(String::new());
        if options.tls != TlsMode::Disabled && self.caps.starttls && !self.lmtp {
            authenticated = self.starttls(host, options).await?;
            if self.tls.is_some() {
                self.hello(options.helo_name).await?;
            }
        }
        let must_have_tls = matches!(options.tls, TlsMode::Required | TlsMode::Verify);
        if must_have_tls && self.tls.is_none() {
            self.quit_early().await;
            return Err(ClientError::Policy(
                self.remote.clone(),
                "4.7.10",
                format!(
                    "TLS is required ({}) but was not negotiated",
                    options.policy
                ),
            ));
        }
        if options.tls == TlsMode::Verify
            && let Err(why) = authenticated
        {
            self.quit_early().await;
            return Err(ClientError::Policy(
                self.remote.clone(),
                "4.7.5",
                format!(
                    "certificate not verified for {host} ({}): {why}",
                    options.policy
                ),
            ));
        }
        if let Some((user, password)) = options.auth {
            if self.tls.is_none() && options.tls != TlsMode::Disabled {
                return Err(ClientError::Policy(
                    self.remote.clone(),
                    "4.7.10",
                    "not sending credentials without TLS (set tls = \"disabled\" to allow)".into(),
                ));
            }
            self.authenticate(user, password).await?;
        }
        Ok(())
    }

    /// AUTH PLAIN (RFC 4616) with the initial response.
    async fn authenticate(&mut self, user: &str, password: &str) -> Result<(), ClientError> {
        use base64::Engine;
        if !self.caps.auth_plain {
            return Err(ClientError::Policy(
                self.remote.clone(),
                "4.7.12",
                "AUTH PLAIN is not offered".into(),
            ));
        }
        let token =
            base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"));
        self.command(&format!("AUTH PLAIN {token}")).await?;
        let reply = self.read_reply(COMMAND_TIMEOUT, "after AUTH").await?;
        if reply.code != 235 {
            return Err(ClientError::Policy(
                self.remote.clone(),
                "4.7.8",
                format!("authentication failed: {}", reply.line()),
            ));
        }
        Ok(())
    }

    async fn hello(&mut self, name: &str) -> Result<(), ClientError> {
        let verb = if self.lmtp { "LHLO" } else { "EHLO" };
        self.command(&format!("{verb} {name}")).await?;
        let reply = self.read_reply(COMMAND_TIMEOUT, "after EHLO").await?;
        if reply.code == 250 {
            self.caps = parse_capabilities(&reply.lines);
            return Ok(());
        }
        if self.lmtp || !(500..600).contains(&reply.code) {
            return Err(self.rejected("EHLO", reply));
        }
        self.command(&format!("HELO {name}")).await?;
        let reply = self.read_reply(COMMAND_TIMEOUT, "after HELO").await?;
        if reply.code != 250 {
            return Err(self.rejected("HELO", reply));
        }
        self.caps = Capabilities::default();
        Ok(())
    }

    /// Whether the server answered anything since the current `send` began: a connection that
    /// failed before any answer took nothing of the message.
    pub fn answered_this_send(&self) -> bool {
        self.replies_this_send > 0
    }

    /// Says QUIT on a connection being given up for policy reasons (errors ignored).
    async fn quit_early(&mut self) {
        if self.command("QUIT").await.is_ok() {
            let _ = self.read_reply(Duration::from_secs(5), "after QUIT").await;
        }
    }

    /// Negotiates TLS. The handshake accepts any certificate (opportunistic TLS must not fail
    /// on a self-signed one); the chain is then checked against the trust store or the DANE
    /// records, and the outcome returned for the caller's policy to act on.
    async fn starttls(
        &mut self,
        host: &str,
        options: &ConnectOptions<'_>,
    ) -> Result<Result<(), String>, ClientError> {
        self.command("STARTTLS").await?;
        let reply = self.read_reply(COMMAND_TIMEOUT, "after STARTTLS").await?;
        if reply.code != 220 {
            // Offered but refused: carry on in plaintext, as opportunistic TLS allows.
            tracing::info!(remote = %self.remote, reply = %reply.line(), "STARTTLS refused");
            return Ok(Err("STARTTLS refused".into()));
        }
        if !self.rbuf.is_empty() {
            // Anything the server sent before the handshake could be an injection
            // (CVE-2011-0411 in reverse): never read it as part of the TLS session.
            return Err(ClientError::Protocol(
                self.remote.clone(),
                "data received after the STARTTLS reply, before TLS".into(),
            ));
        }
        let Stream::Tcp(tcp) = std::mem::replace(&mut self.stream, Stream::Gone) else {
            return Err(ClientError::Protocol(
                self.remote.clone(),
                "STARTTLS on a non-TCP stream".into(),
            ));
        };
        let name = rustls::pki_types::ServerName::try_from(host.to_string()).unwrap_or_else(|_| {
            rustls::pki_types::ServerName::IpAddress(
                tcp.peer_addr()
                    .map(|a| a.ip())
                    .unwrap_or(std::net::IpAddr::from([127, 0, 0, 1]))
                    .into(),
            )
        });
        let connector = tokio_rustls::TlsConnector::from(opportunistic_tls_config());
        let tls = timeout(COMMAND_TIMEOUT, connector.connect(name, tcp))
            .await
            .map_err(|_| ClientError::Timeout(self.remote.clone(), "in the TLS handshake"))?
            .map_err(|e| ClientError::Tls(self.remote.clone(), e.to_string()))?;
        let (_, session) = tls.get_ref();
        let chain = session.peer_certificates().unwrap_or(&[]);
        let authenticated = match (options.dane, options.trust) {
            (Some(records), Some(trust)) if !records.is_empty() => {
                crate::trust::dane_verify(records, chain, host, trust.provider())
            }
            (_, Some(trust)) => trust.verify(chain, host),
            (_, None) => Err("no trust store".into()),
        };
        self.tls = Some(TlsInfo {
            version: session
                .protocol_version()
                .and_then(|v| v.as_str())
                .map(str::to_string)
                .unwrap_or_default(),
            cipher: session
                .negotiated_cipher_suite()
                .and_then(|c| c.suite().as_str())
                .map(str::to_string)
                .unwrap_or_default(),
            verified: authenticated.is_ok(),
            policy: options.policy.to_string(),
        });
        self.stream = Stream::Tls(Box::new(tls));
        self.caps = Capabilities::default();
        Ok(authenticated)
    }

    /// Runs one transaction. Returns one reply per recipient, in order; a recipient whose RCPT
    /// was accepted gets the reply to the data (or its own, over LMTP).
    ///
    /// An address that cannot go on the wire (a control character, which intake refuses but an
    /// old spool may hold) is refused here, never written: it could end the command line.
    pub async fn send(&mut self, msg: &Outgoing<'_>) -> Result<Vec<Reply>, ClientError> {
        let n = msg.recipients.len();
        if baton_smtp::address::smtp_path(msg.sender).is_none() {
            let r = Reply::local(
                553,
                "5.1.7",
                "sender address has a control character; not sent",
            );
            return Ok(vec![r; n]);
        }
        let sendable: Vec<usize> = (0..n)
            .filter(|&i| baton_smtp::address::smtp_path(&msg.recipients[i].address).is_some())
            .collect();
        if sendable.len() == n {
            return self.send_checked(msg).await;
        }
        let refused = Reply::local(553, "5.1.3", "address has a control character; not sent");
        let mut replies = vec![refused; n];
        if sendable.is_empty() {
            return Ok(replies);
        }
        let recipients: Vec<OutRcpt> = sendable
            .iter()
            .map(|&i| msg.recipients[i].clone())
            .collect();
        let sent = self
            .send_checked(&Outgoing {
                recipients: &recipients,
                ..*msg
            })
            .await?;
        for (&i, reply) in sendable.iter().zip(sent) {
            replies[i] = reply;
        }
        Ok(replies)
    }

    async fn send_checked(&mut self, msg: &Outgoing<'_>) -> Result<Vec<Reply>, ClientError> {
        self.replies_this_send = 0;
        let n = msg.recipients.len();
        let addresses_ascii =
            msg.sender.is_ascii() && msg.recipients.iter().all(|r| r.address.is_ascii());
        let offers = crate::downgrade::Offers {
            smtputf8: self.caps.smtputf8,
            eight_bit: self.caps.eight_bit,
            line_limit: self.line_limit,
        };
        let prepared =
            match crate::downgrade::prepare(msg.body, addresses_ascii, msg.smtputf8, offers) {
                Ok(p) => p,
                Err((code, status, why)) => {
                    let r = Reply::local(code, status, format!("{}: {why}", self.remote));
                    return Ok(vec![r; n]);
                }
            };
        let body = prepared.body.unwrap_or_else(|| msg.body.clone());
        let msg = &Outgoing {
            body: &body,
            size: body.len() as u64,
            smtputf8: prepared.smtputf8,
            ..*msg
        };
        if let Some(max) = self.caps.size.filter(|&m| m > 0 && msg.size > m) {
            let r = Reply::local(
                552,
                "5.3.4",
                format!(
                    "message size {} exceeds {}'s limit of {max}",
                    msg.size, self.remote
                ),
            );
            return Ok(vec![r; n]);
        }
        if self.needs_rset {
            self.command("RSET").await?;
            let r = self.read_reply(COMMAND_TIMEOUT, "after RSET").await?;
            if r.code != 250 {
                return Err(self.rejected("RSET", r));
            }
        }
        // A completed transaction leaves the server ready for the next MAIL (RFC 5321
        // §4.1.1.4); only an abandoned one needs RSET.
        self.needs_rset = true;
        self.transactions += 1;

        let path = |a: &str| baton_smtp::address::smtp_path(a).unwrap_or_default();
        let mut mail = format!("MAIL FROM:<{}>", path(msg.sender));
        if self.caps.size.is_some() {
            mail.push_str(&format!(" SIZE={}", msg.size));
        }
        if msg.eight_bit && self.caps.eight_bit {
            mail.push_str(" BODY=8BITMIME");
        }
        if msg.smtputf8 {
            mail.push_str(" SMTPUTF8");
        }
        if self.caps.dsn {
            if let Some(ret) = msg.dsn_ret {
                mail.push_str(&format!(" RET={ret}"));
            }
            if let Some(envid) = msg.dsn_envid {
                mail.push_str(&format!(" ENVID={}", xtext(envid)));
            }
        }
        let chunking = self.caps.chunking;
        let rcpt_lines: Vec<String> = msg
            .recipients
            .iter()
            .map(|rcpt| {
                let mut line = format!("RCPT TO:<{}>", path(&rcpt.address));
                if self.caps.dsn {
                    if rcpt.notify.is_given() {
                        line.push_str(&format!(" NOTIFY={}", notify_text(rcpt.notify)));
                    }
                    if let Some(orcpt) = &rcpt.orcpt {
                        line.push_str(&format!(" ORCPT=rfc822;{}", xtext(orcpt)));
                    }
                }
                line
            })
            .collect();
        let data_line = if chunking {
            format!("BDAT {} LAST", msg.body.len())
        } else {
            "DATA".to_string()
        };

        let mut rcpt_replies = Vec::with_capacity(n);
        self.queue_line(&mail);
        if self.caps.pipelining {
            for line in &rcpt_lines {
                self.queue_line(line);
            }
            self.queue_line(&data_line);
            if chunking {
                // The body goes in the same burst: BDAT needs no go-ahead.
                self.flush_with(msg.body).await?;
            } else {
                self.flush().await?;
            }
            let mail_reply = self.read_reply(COMMAND_TIMEOUT, "after MAIL").await?;
            for _ in 0..n {
                rcpt_replies.push(self.read_rcpt_reply().await?);
            }
            if !mail_reply.is_positive() {
                // DATA/BDAT is refused too; read that answer to stay in step.
                let _ = self.read_reply(DATA_INIT_TIMEOUT, "after DATA").await?;
                self.needs_rset = false;
                return Ok(vec![mail_reply; n]);
            }
            if !chunking {
                let go = self.read_reply(DATA_INIT_TIMEOUT, "after DATA").await?;
                if go.code != 354 {
                    return Ok(refused_data(rcpt_replies, &go));
                }
                if rcpt_replies.iter().all(|r| !r.is_positive()) {
                    // Every RCPT refused, yet the pipelined DATA got 354: send only the end of
                    // data (RFC 2920 §3.1), never the message to nobody.
                    self.command(".").await?;
                    let _ = self
                        .read_reply(DATA_END_TIMEOUT, "after the end of data")
                        .await?;
                    self.needs_rset = false;
                    return Ok(rcpt_replies);
                }
                self.send_dot_stuffed(msg.body).await?;
            }
        } else {
            self.flush().await?;
            let mail_reply = self.read_reply(COMMAND_TIMEOUT, "after MAIL").await?;
            if !mail_reply.is_positive() {
                self.needs_rset = false;
                return Ok(vec![mail_reply; n]);
            }
            for line in &rcpt_lines {
                self.command(line).await?;
                rcpt_replies.push(self.read_rcpt_reply().await?);
            }
            if rcpt_replies.iter().all(|r| !r.is_positive()) {
                return Ok(rcpt_replies);
            }
            self.queue_line(&data_line);
            if chunking {
                self.flush_with(msg.body).await?;
            } else {
                self.flush().await?;
                let go = self.read_reply(DATA_INIT_TIMEOUT, "after DATA").await?;
                if go.code != 354 {
                    return Ok(refused_data(rcpt_replies, &go));
                }
                self.send_dot_stuffed(msg.body).await?;
            }
        }

        let accepted: Vec<usize> = (0..n).filter(|&i| rcpt_replies[i].is_positive()).collect();
        let mut results = rcpt_replies;
        if accepted.is_empty() {
            // Only reachable with BDAT pipelined after refused recipients: its one refusal.
            let _ = self.read_reply(DATA_END_TIMEOUT, "after BDAT").await?;
        } else if self.lmtp {
            // LMTP: one reply per accepted recipient, in RCPT order (RFC 2033 §4.2).
            for &i in &accepted {
                results[i] = self
                    .read_reply(DATA_END_TIMEOUT, "after the end of data")
                    .await?;
            }
        } else {
            let end = self
                .read_reply(DATA_END_TIMEOUT, "after the end of data")
                .await?;
            for &i in &accepted {
                results[i] = end.clone();
            }
        }
        self.needs_rset = accepted.is_empty();
        Ok(results)
    }

    /// Says QUIT and closes, ignoring errors: the work is done either way. Waits (briefly) for
    /// the server to close too, so that a connection cap holds as the server counts.
    pub async fn quit(mut self) {
        self.queue_line("QUIT");
        if self.flush().await.is_ok() {
            let _ = self.read_reply(Duration::from_secs(5), "after QUIT").await;
        }
        let _ = self.stream.shutdown().await;
        let mut rest = [0u8; 256];
        let _ = timeout(Duration::from_secs(2), async {
            while matches!(self.stream.read(&mut rest).await, Ok(n) if n > 0) {}
        })
        .await;
    }

    fn queue_line(&mut self, line: &str) {
        self.wbuf.extend_from_slice(line.as_bytes());
        self.wbuf.extend_from_slice(b"\r\n");
    }

    async fn command(&mut self, line: &str) -> Result<(), ClientError> {
        self.queue_line(line);
        self.flush().await
    }

    async fn flush(&mut self) -> Result<(), ClientError> {
        let data = std::mem::take(&mut self.wbuf);
        let r = self
            .write_all(&data, COMMAND_TIMEOUT, "sending a command")
            .await;
        self.wbuf = data;
        self.wbuf.clear();
        r
    }

    /// Flushes the queued commands and then `body` in blocks, each under the data-block
    /// timeout, without copying the body.
    async fn flush_with(&mut self, body: &Bytes) -> Result<(), ClientError> {
        self.flush().await?;
        for block in body.chunks(DATA_BLOCK) {
            self.write_all(block, self.data_block_timeout, "sending data")
                .await?;
        }
        Ok(())
    }

    async fn write_all(
        &mut self,
        data: &[u8],
        limit: Duration,
        what: &'static str,
    ) -> Result<(), ClientError> {
        match timeout(limit, async {
            self.stream.write_all(data).await?;
            self.stream.flush().await
        })
        .await
        {
            Err(_) => Err(ClientError::Timeout(self.remote.clone(), what)),
            Ok(Err(e)) => Err(ClientError::Io(self.remote.clone(), e)),
            Ok(Ok(())) => Ok(()),
        }
    }

    /// Sends the body dot-stuffed, then the terminating `.`.
    async fn send_dot_stuffed(&mut self, body: &Bytes) -> Result<(), ClientError> {
        let mut start = 0;
        let bytes = body.as_ref();
        let mut out = Vec::with_capacity(bytes.len().min(1 << 20) + 64);
        let mut at_line_start = true;
        for (i, &b) in bytes.iter().enumerate() {
            if at_line_start && b == b'.' {
                out.extend_from_slice(&bytes[start..i]);
                out.push(b'.');
                start = i;
            }
            at_line_start = b == b'\n';
            if out.len() + (i - start) >= DATA_BLOCK {
                out.extend_from_slice(&bytes[start..=i]);
                start = i + 1;
                self.write_all(&out, self.data_block_timeout, "sending data")
                    .await?;
                out.clear();
            }
        }
        out.extend_from_slice(&bytes[start..]);
        if !bytes.is_empty() && !bytes.ends_with(b"\r\n") {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b".\r\n");
        self.write_all(&out, self.data_block_timeout, "sending data")
            .await
    }

    /// Reads one reply, multi-line or not. `limit` bounds the whole reply, not each read, and
    /// the reply's size and line count are bounded too: a server that trickles or never ends
    /// its reply costs one timeout and 64 KiB, and the attempt is abandoned.
    async fn read_reply(
        &mut self,
        limit: Duration,
        what: &'static str,
    ) -> Result<Reply, ClientError> {
        let deadline = tokio::time::Instant::now() + limit;
        let mut lines: Vec<String> = Vec::new();
        let mut size = 0usize;
        loop {
            while let Some(pos) = self.rbuf.iter().position(|&b| b == b'\n') {
                size = size.saturating_add(pos + 1);
                if size > MAX_REPLY_BYTES || lines.len() >= MAX_REPLY_LINES {
                    return Err(ClientError::Protocol(
                        self.remote.clone(),
                        format!(
                            "reply too long (over {MAX_REPLY_BYTES} bytes or {MAX_REPLY_LINES} lines) {what}"
                        ),
                    ));
                }
                let raw = self.rbuf.split_to(pos + 1);
                let line = String::from_utf8_lossy(&raw);
                let line = line.trim_end_matches(['\r', '\n']);
                let parsed = line.get(..3).and_then(|c| c.parse::<u16>().ok());
                let Some(c) = parsed.filter(|c| (200..600).contains(c)) else {
                    return Err(ClientError::Protocol(
                        self.remote.clone(),
                        format!("malformed reply line {:?}", truncate(line, 80)),
                    ));
                };
                lines.push(line.get(4..).unwrap_or("").to_string());
                if line.as_bytes().get(3) != Some(&b'-') {
                    self.replies_this_send += 1;
                    return Ok(make_reply(c, &lines));
                }
            }
            if size.saturating_add(self.rbuf.len()) > MAX_REPLY_BYTES {
                return Err(ClientError::Protocol(
                    self.remote.clone(),
                    format!("reply too long (over {MAX_REPLY_BYTES} bytes) {what}"),
                ));
            }
            let read =
                tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.rbuf)).await;
            match read {
                Err(_) => return Err(ClientError::Timeout(self.remote.clone(), what)),
                Ok(Ok(0)) => {
                    return Err(ClientError::Io(
                        self.remote.clone(),
                        std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            format!("connection closed {what}"),
                        ),
                    ));
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(ClientError::Io(self.remote.clone(), e)),
            }
        }
    }

    async fn read_rcpt_reply(&mut self) -> Result<Reply, ClientError> {
        let mut reply = self.read_reply(COMMAND_TIMEOUT, "after RCPT").await?;
        reply.to_rcpt = true;
        Ok(reply)
    }

    fn rejected(&self, stage: &str, reply: Reply) -> ClientError {
        ClientError::Rejected(
            self.remote.clone(),
            format!("{stage}: {}", reply.line()),
            Box::new(reply),
        )
    }
}

/// Recipients that were accepted take the refusal of DATA as their result.
fn refused_data(rcpt_replies: Vec<Reply>, refusal: &Reply) -> Vec<Reply> {
    rcpt_replies
        .into_iter()
        .map(|r| if r.is_positive() { refusal.clone() } else { r })
        .collect()
}

fn make_reply(code: u16, lines: &[String]) -> Reply {
    // Empty lines ("250-" then "250 2.0.0 ok") add nothing to the text.
    let words: Vec<&str> = lines
        .iter()
        .map(|l| l.trim())
        .filter(|l| !l.is_empty())
        .collect();
    let first = words.first().copied().unwrap_or("");
    let status = first
        .split_whitespace()
        .next()
        .filter(|t| is_enhanced_code(t, code))
        .map(str::to_string);
    let text = words.join(" ");
    Reply {
        code,
        status: status.unwrap_or_else(|| format!("{}.0.0", code / 100)),
        text,
        lines: lines.to_vec(),
        to_rcpt: false,
    }
}

fn is_enhanced_code(token: &str, code: u16) -> bool {
    let parts: Vec<&str> = token.split('.').collect();
    parts.len() == 3
        && parts[0] == (code / 100).to_string()
        && parts[1..]
            .iter()
            .all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()))
}

/// Reads the EHLO keywords from the lines after the first (RFC 5321 §4.1.1.1).
fn parse_capabilities(lines: &[String]) -> Capabilities {
    let mut caps = Capabilities::default();
    for line in lines.iter().skip(1) {
        let mut words = line.split_whitespace();
        let Some(keyword) = words.next() else {
            continue;
        };
        match keyword.to_ascii_uppercase().as_str() {
            "PIPELINING" => caps.pipelining = true,
            "8BITMIME" => caps.eight_bit = true,
            "SMTPUTF8" => caps.smtputf8 = true,
            "DSN" => caps.dsn = true,
            "CHUNKING" => caps.chunking = true,
            "STARTTLS" => caps.starttls = true,
            "AUTH" => caps.auth_plain = words.any(|w| w.eq_ignore_ascii_case("PLAIN")),
            "SIZE" => caps.size = Some(words.next().and_then(|v| v.parse().ok()).unwrap_or(0)),
            _ => {}
        }
    }
    caps
}

/// The RCPT `NOTIFY=` value: NEVER, or the keywords given.
fn notify_text(notify: Notify) -> String {
    if notify.is_never() {
        return "NEVER".into();
    }
    let mut parts = Vec::new();
    for (flag, name) in [
        (Notify::SUCCESS, "SUCCESS"),
        (Notify::FAILURE, "FAILURE"),
        (Notify::DELAY, "DELAY"),
    ] {
        if notify.contains(flag) {
            parts.push(name);
        }
    }
    parts.join(",")
}

/// RFC 3461 §4 xtext encoding.
fn xtext(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (33..=126).contains(&b) && b != b'+' && b != b'=' {
            out.push(b as char);
        } else {
            out.push_str(&format!("+{b:02X}"));
        }
    }
    out
}

fn truncate(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Opportunistic TLS (RFC 7435): encrypt whatever the certificate. Verification by policy
/// (`required`, `verify`, MTA-STS, DANE) belongs to the "Secure" issue.
fn opportunistic_tls_config() -> Arc<rustls::ClientConfig> {
    static CONFIG: std::sync::OnceLock<Arc<rustls::ClientConfig>> = std::sync::OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .map(|b| {
                    b.dangerous()
                        .with_custom_certificate_verifier(Arc::new(AcceptAnyCert(provider)))
                        .with_no_client_auth()
                });
            match config {
                Ok(c) => Arc::new(c),
                Err(_) => unreachable!("ring supports the default protocol versions"),
            }
        })
        .clone()
}

#[derive(Debug)]
struct AcceptAnyCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enhanced_codes_are_taken_from_the_reply_or_derived() {
        let r = make_reply(550, &["5.1.1 no such user".into()]);
        assert_eq!(r.status, "5.1.1");
        let r = make_reply(451, &["try later".into()]);
        assert_eq!(r.status, "4.0.0");
        let r = make_reply(550, &["4.1.1 mismatched class".into()]);
        assert_eq!(r.status, "5.0.0");
        // A multi-line reply whose first line is empty (seen after BDAT).
        let r = make_reply(250, &["".into(), "2.0.0 Ok: queued as 4f2".into()]);
        assert_eq!(r.text, "2.0.0 Ok: queued as 4f2");
        assert_eq!(r.status, "2.0.0");
    }

    #[test]
    fn xtext_and_notify() {
        assert_eq!(xtext("a+b=c d"), "a+2Bb+3Dc+20d");
        assert_eq!(
            notify_text(Notify::SUCCESS | Notify::DELAY),
            "SUCCESS,DELAY"
        );
        assert_eq!(notify_text(Notify::NEVER), "NEVER");
    }

    #[test]
    fn capabilities() {
        let r = make_reply(
            250,
            &[
                "mx.example Hello".into(),
                "PIPELINING".into(),
                "SIZE 1000".into(),
                "8BITMIME".into(),
                "CHUNKING".into(),
            ],
        );
        let c = parse_capabilities(&r.lines);
        assert!(c.pipelining && c.eight_bit && c.chunking && !c.dsn && !c.smtputf8);
        assert_eq!(c.size, Some(1000));
    }
}
