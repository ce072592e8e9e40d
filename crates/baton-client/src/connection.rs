//! A connection: opening it (TCP from an egress source, or a Unix socket for LMTP), the
//! greeting, EHLO/LHLO, AUTH, and the reads and writes every command goes through, each under
//! its RFC 5321 timeout and the reply size limits.

use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio::time::timeout;

use baton_tls::trust::{Tlsa, Trust};

use crate::reply::{make_reply, parse_capabilities, truncate};
use crate::{
    COMMAND_TIMEOUT, Capabilities, ClientError, DATA_BLOCK, GREETING_TIMEOUT, MAX_REPLY_BYTES,
    MAX_REPLY_LINES, Reply, TlsInfo, TlsMode,
};

pub(crate) enum Stream {
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
    pub(crate) stream: Stream,
    pub(crate) rbuf: BytesMut,
    pub(crate) wbuf: Vec<u8>,
    /// The server's name or address, for reports ("mx1.example.net [192.0.2.1]").
    pub remote: String,
    pub caps: Capabilities,
    pub tls: Option<TlsInfo>,
    /// Why this connection is in plaintext though TLS was tried (for the delivery record).
    pub tls_fallback: Option<String>,
    pub(crate) lmtp: bool,
    /// Transactions sent over this connection.
    pub transactions: usize,
    /// A transaction was left open (recipients refused, data refused): RSET before the next.
    pub(crate) needs_rset: bool,
    /// Replies read since the current `send` began.
    pub(crate) replies_this_send: usize,
    /// How long one block of message data may take to go out.
    pub(crate) data_block_timeout: Duration,
    /// How long the reply to the end of the data may take.
    pub(crate) data_end_timeout: Duration,
    /// Longer lines are broken before sending (0: sent as stored).
    pub(crate) line_limit: usize,
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
    /// How long the reply to the end of the data may take (RFC 5321 §4.5.3.2.6: 10 minutes).
    pub data_end_timeout: Duration,
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

    pub(crate) fn new(stream: Stream, remote: String, lmtp: bool) -> Client {
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
            data_end_timeout: crate::DATA_END_TIMEOUT,
            line_limit: crate::downgrade::MAX_LINE,
        }
    }

    pub(crate) async fn open(
        &mut self,
        options: &ConnectOptions<'_>,
        host: &str,
    ) -> Result<(), ClientError> {
        self.data_block_timeout = options.data_block_timeout;
        self.data_end_timeout = options.data_end_timeout;
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
    pub(crate) async fn authenticate(
        &mut self,
        user: &str,
        password: &str,
    ) -> Result<(), ClientError> {
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

    pub(crate) async fn hello(&mut self, name: &str) -> Result<(), ClientError> {
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
    pub(crate) async fn quit_early(&mut self) {
        if self.command("QUIT").await.is_ok() {
            let _ = self.read_reply(Duration::from_secs(5), "after QUIT").await;
        }
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

    pub(crate) fn queue_line(&mut self, line: &str) {
        self.wbuf.extend_from_slice(line.as_bytes());
        self.wbuf.extend_from_slice(b"\r\n");
    }

    pub(crate) async fn command(&mut self, line: &str) -> Result<(), ClientError> {
        self.queue_line(line);
        self.flush().await
    }

    pub(crate) async fn flush(&mut self) -> Result<(), ClientError> {
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
    pub(crate) async fn flush_with(&mut self, body: &Bytes) -> Result<(), ClientError> {
        self.flush().await?;
        for block in body.chunks(DATA_BLOCK) {
            self.write_all(block, self.data_block_timeout, "sending data")
                .await?;
        }
        Ok(())
    }

    pub(crate) async fn write_all(
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
    pub(crate) async fn send_dot_stuffed(&mut self, body: &Bytes) -> Result<(), ClientError> {
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
    pub(crate) async fn read_reply(
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

    pub(crate) async fn read_rcpt_reply(&mut self) -> Result<Reply, ClientError> {
        let mut reply = self.read_reply(COMMAND_TIMEOUT, "after RCPT").await?;
        reply.to_rcpt = true;
        Ok(reply)
    }

    pub(crate) fn rejected(&self, stage: &str, reply: Reply) -> ClientError {
        ClientError::Rejected(
            self.remote.clone(),
            format!("{stage}: {}", reply.line()),
            Box::new(reply),
        )
    }
}
