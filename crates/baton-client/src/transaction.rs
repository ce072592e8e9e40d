//! One transaction: MAIL, RCPT (pipelined when the server offers it), DATA or BDAT, and one
//! reply per recipient.

use baton_spool::Notify;
use bytes::Bytes;

use crate::connection::Client;
use crate::{COMMAND_TIMEOUT, ClientError, DATA_INIT_TIMEOUT, Reply};

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

impl Client {
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
        let fitted = match self.fit_to_server(msg) {
            Ok(fitted) => fitted,
            Err(refusal) => return Ok(vec![refusal; n]),
        };
        let msg = &Outgoing {
            body: &fitted.body,
            size: fitted.body.len() as u64,
            smtputf8: fitted.smtputf8,
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
        let lines = EnvelopeLines::new(msg, &self.caps);
        let sent = if self.caps.pipelining {
            self.pipelined_envelope(msg, &lines).await?
        } else {
            self.stepwise_envelope(msg, &lines).await?
        };
        match sent {
            Sent::Finished(replies) => Ok(replies),
            Sent::Data(rcpt_replies) => self.data_results(rcpt_replies).await,
        }
    }

    /// The body as this server can take it (SMTPUTF8 dropped where nothing needs it, long
    /// lines broken), or the refusal that says why it cannot.
    fn fit_to_server(&self, msg: &Outgoing<'_>) -> Result<Fitted, Reply> {
        let addresses_ascii =
            msg.sender.is_ascii() && msg.recipients.iter().all(|r| r.address.is_ascii());
        let offers = crate::downgrade::Offers {
            smtputf8: self.caps.smtputf8,
            eight_bit: self.caps.eight_bit,
            line_limit: self.line_limit,
        };
        match crate::downgrade::prepare(msg.body, addresses_ascii, msg.smtputf8, offers) {
            Ok(p) => Ok(Fitted {
                body: p.body.unwrap_or_else(|| msg.body.clone()),
                smtputf8: p.smtputf8,
            }),
            Err((code, status, why)) => Err(Reply::local(
                code,
                status,
                format!("{}: {why}", self.remote),
            )),
        }
    }

    /// MAIL, every RCPT and DATA (or BDAT with the body) in one write (RFC 2920), then their
    /// replies in order.
    async fn pipelined_envelope(
        &mut self,
        msg: &Outgoing<'_>,
        lines: &EnvelopeLines,
    ) -> Result<Sent, ClientError> {
        let n = msg.recipients.len();
        self.queue_line(&lines.mail);
        for line in &lines.rcpts {
            self.queue_line(line);
        }
        self.queue_line(&lines.data);
        if lines.chunking {
            // The body goes in the same burst: BDAT needs no go-ahead.
            self.flush_with(msg.body).await?;
        } else {
            self.flush().await?;
        }
        let mail_reply = self.read_reply(COMMAND_TIMEOUT, "after MAIL").await?;
        let mut rcpt_replies = Vec::with_capacity(n);
        for _ in 0..n {
            rcpt_replies.push(self.read_rcpt_reply().await?);
        }
        if !mail_reply.is_positive() {
            // DATA/BDAT is refused too; read that answer to stay in step.
            let _ = self.read_reply(DATA_INIT_TIMEOUT, "after DATA").await?;
            self.needs_rset = false;
            return Ok(Sent::Finished(vec![mail_reply; n]));
        }
        if lines.chunking {
            return Ok(Sent::Data(rcpt_replies));
        }
        let go = self.read_reply(DATA_INIT_TIMEOUT, "after DATA").await?;
        if go.code != 354 {
            return Ok(Sent::Finished(refused_data(rcpt_replies, &go)));
        }
        if rcpt_replies.iter().all(|r| !r.is_positive()) {
            // Every RCPT refused, yet the pipelined DATA got 354: send only the end of data
            // (RFC 2920 §3.1), never the message to nobody.
            self.command(".").await?;
            let _ = self
                .read_reply(self.data_end_timeout, "after the end of data")
                .await?;
            self.needs_rset = false;
            return Ok(Sent::Finished(rcpt_replies));
        }
        self.send_dot_stuffed(msg.body).await?;
        Ok(Sent::Data(rcpt_replies))
    }

    /// MAIL, each RCPT and DATA one at a time, each waiting for its reply.
    async fn stepwise_envelope(
        &mut self,
        msg: &Outgoing<'_>,
        lines: &EnvelopeLines,
    ) -> Result<Sent, ClientError> {
        let n = msg.recipients.len();
        self.queue_line(&lines.mail);
        self.flush().await?;
        let mail_reply = self.read_reply(COMMAND_TIMEOUT, "after MAIL").await?;
        if !mail_reply.is_positive() {
            self.needs_rset = false;
            return Ok(Sent::Finished(vec![mail_reply; n]));
        }
        let mut rcpt_replies = Vec::with_capacity(n);
        for line in &lines.rcpts {
            self.command(line).await?;
            rcpt_replies.push(self.read_rcpt_reply().await?);
        }
        if rcpt_replies.iter().all(|r| !r.is_positive()) {
            return Ok(Sent::Finished(rcpt_replies));
        }
        self.queue_line(&lines.data);
        if lines.chunking {
            self.flush_with(msg.body).await?;
            return Ok(Sent::Data(rcpt_replies));
        }
        self.flush().await?;
        let go = self.read_reply(DATA_INIT_TIMEOUT, "after DATA").await?;
        if go.code != 354 {
            return Ok(Sent::Finished(refused_data(rcpt_replies, &go)));
        }
        self.send_dot_stuffed(msg.body).await?;
        Ok(Sent::Data(rcpt_replies))
    }

    /// The replies after the data went out: one for the message (SMTP) or one per accepted
    /// recipient (LMTP), given to each accepted recipient.
    async fn data_results(&mut self, rcpt_replies: Vec<Reply>) -> Result<Vec<Reply>, ClientError> {
        let n = rcpt_replies.len();
        let accepted: Vec<usize> = (0..n).filter(|&i| rcpt_replies[i].is_positive()).collect();
        let mut results = rcpt_replies;
        if accepted.is_empty() {
            // Only reachable with BDAT pipelined after refused recipients: its one refusal.
            let _ = self.read_reply(self.data_end_timeout, "after BDAT").await?;
        } else if self.lmtp {
            // LMTP: one reply per accepted recipient, in RCPT order (RFC 2033 §4.2).
            for &i in &accepted {
                results[i] = self
                    .read_reply(self.data_end_timeout, "after the end of data")
                    .await?;
            }
        } else {
            let end = self
                .read_reply(self.data_end_timeout, "after the end of data")
                .await?;
            for &i in &accepted {
                results[i] = end.clone();
            }
        }
        self.needs_rset = accepted.is_empty();
        Ok(results)
    }
}

/// The body as it goes to one server.
struct Fitted {
    body: Bytes,
    smtputf8: bool,
}

/// Where the envelope exchange left the transaction.
enum Sent {
    /// Nothing more to read: these are the recipients' results.
    Finished(Vec<Reply>),
    /// The data went out; these are the RCPT replies, the data's reply is still to come.
    Data(Vec<Reply>),
}

/// The command lines of one transaction, with the parameters the server's EHLO allows.
struct EnvelopeLines {
    mail: String,
    rcpts: Vec<String>,
    data: String,
    chunking: bool,
}

impl EnvelopeLines {
    fn new(msg: &Outgoing<'_>, caps: &crate::Capabilities) -> EnvelopeLines {
        let path = |a: &str| baton_smtp::address::smtp_path(a).unwrap_or_default();
        let mut mail = format!("MAIL FROM:<{}>", path(msg.sender));
        if caps.size.is_some() {
            mail.push_str(&format!(" SIZE={}", msg.size));
        }
        if msg.eight_bit && caps.eight_bit {
            mail.push_str(" BODY=8BITMIME");
        }
        if msg.smtputf8 {
            mail.push_str(" SMTPUTF8");
        }
        if caps.dsn {
            if let Some(ret) = msg.dsn_ret {
                mail.push_str(&format!(" RET={ret}"));
            }
            if let Some(envid) = msg.dsn_envid {
                mail.push_str(&format!(" ENVID={}", xtext(envid)));
            }
        }
        let rcpts = msg
            .recipients
            .iter()
            .map(|r| rcpt_line(r, caps.dsn))
            .collect();
        let data = if caps.chunking {
            format!("BDAT {} LAST", msg.body.len())
        } else {
            "DATA".to_string()
        };
        EnvelopeLines {
            mail,
            rcpts,
            data,
            chunking: caps.chunking,
        }
    }
}

/// `RCPT TO:<...>` with the DSN parameters when the server takes them.
fn rcpt_line(rcpt: &OutRcpt, dsn: bool) -> String {
    let path = baton_smtp::address::smtp_path(&rcpt.address).unwrap_or_default();
    let mut line = format!("RCPT TO:<{path}>");
    if dsn {
        if rcpt.notify.is_given() {
            line.push_str(&format!(" NOTIFY={}", notify_text(rcpt.notify)));
        }
        if let Some(orcpt) = &rcpt.orcpt {
            line.push_str(&format!(" ORCPT=rfc822;{}", xtext(orcpt)));
        }
    }
    line
}

/// Recipients that were accepted take the refusal of DATA as their result.
fn refused_data(rcpt_replies: Vec<Reply>, refusal: &Reply) -> Vec<Reply> {
    rcpt_replies
        .into_iter()
        .map(|r| if r.is_positive() { refusal.clone() } else { r })
        .collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xtext_and_notify() {
        assert_eq!(xtext("a+b=c d"), "a+2Bb+3Dc+20d");
        assert_eq!(
            notify_text(Notify::SUCCESS | Notify::DELAY),
            "SUCCESS,DELAY"
        );
        assert_eq!(notify_text(Notify::NEVER), "NEVER");
    }
}
