//! STARTTLS: the switch to TLS, with nothing read before it kept.

use super::*;

impl Session {
    /// RFC 3207. Whatever the client pipelined after STARTTLS is thrown away before the
    /// handshake (CVE-2011-0411), and the session starts over inside TLS.
    /// Returns None once TLS is up (the 220 went out before the handshake).
    pub(super) async fn starttls(&mut self) -> Result<Option<Reply>, Close> {
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
}
