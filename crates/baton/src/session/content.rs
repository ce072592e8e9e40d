//! Message content: DATA and BDAT, the header checks, the Received: and
//! Authentication-Results: fields Baton adds, and the hand-over to intake.

use super::*;

impl Session {
    /// Checks that a transaction is ready for its content.
    pub(super) fn ready_for_data(&self) -> Option<Reply> {
        match &self.tx {
            None => Some(Reply::new(503, "5.5.1", "Error: need MAIL command")),
            Some(tx) if tx.rcpts.is_empty() => {
                Some(Reply::new(554, "5.5.1", "Error: no valid recipients"))
            }
            Some(_) => None,
        }
    }

    pub(super) async fn data(&mut self) -> Result<Reply, Close> {
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

    pub(super) async fn bdat(&mut self, size: u64, last: bool) -> Result<Reply, Close> {
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
    pub(super) fn inspect_headers(
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
    pub(super) async fn authentication_results(&self, body: &mut BodyWriter, sender: &str) {
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
    pub(super) fn start_body(&mut self) -> Option<BodyWriter> {
        let tx = self.tx.as_ref()?;
        let mut body = self.ctx.intake.body_writer(tx.id);
        let header = self.received_header(tx);
        body.buf().extend_from_slice(header.as_bytes());
        Some(body)
    }

    /// RFC 5321 §4.4 trace header.
    pub(super) fn received_header(&self, tx: &Transaction) -> String {
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
    pub(super) async fn finish(&mut self, mut body: BodyWriter) -> Reply {
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
        if self.relay_allowed() {
            if let Err(reply) = apply_schedule(&mut envelope, &head, &self.ctx.config) {
                return reply;
            }
            if let Some(reply) = self.leave_out_suppressed(&mut envelope) {
                return reply;
            }
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

    pub(super) fn envelope(&self, tx: Transaction, size: u64) -> Envelope {
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
pub(super) fn dsn_notify(given: baton_smtp::Notify) -> Notify {
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
pub(super) fn received_len(head: &[u8]) -> usize {
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
pub(super) fn apply_schedule(
    envelope: &mut Envelope,
    head: &[u8],
    config: &Config,
) -> Result<(), Reply> {
    let requested = crate::schedule::requested(head)
        .map_err(|why| Reply::new(550, "5.6.0", format!("Error: {why}")))?;
    if let Some(at) = requested.send_at_ms {
        crate::policy::check_send_at(at, envelope.arrived_ms, &config.delivery)
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

pub(super) fn cancelled() -> Reply {
    Reply::new(501, "5.0.0", "Authentication cancelled")
}

pub(super) fn too_large() -> Reply {
    Reply::new(
        552,
        "5.3.4",
        "Message size exceeds fixed maximum message size",
    )
}

pub(super) fn bare_line_end_in_bdat() -> Reply {
    Reply::new(
        550,
        "5.6.0",
        "Error: bare <CR> or <LF> in message; lines must end with <CR><LF>",
    )
}

pub(super) fn spool_reply(err: &SpoolError) -> Reply {
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
pub(super) fn sanitize(s: &str) -> String {
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
