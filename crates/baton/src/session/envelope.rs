//! HELO/EHLO, MAIL FROM and RCPT TO: the envelope, with relay control and the limits on
//! recipients.

use super::*;
use crate::suppression::Entry;

impl Session {
    pub(super) fn hello(&mut self, host: String, esmtp: bool) -> Reply {
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

    pub(super) fn esmtp(&self) -> bool {
        matches!(self.helo, Some((_, true)))
    }

    pub(super) fn mail(&mut self, mail: MailFrom) -> Reply {
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
        if let Some(why) = self.ctx.backpressure.refusal() {
            return Reply::new(452, "4.3.1", format!("Insufficient system storage: {why}"));
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

    pub(super) fn rcpt(&mut self, rcpt: RcptTo) -> Reply {
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
        let domain = domain_of(&rcpt.address);
        let returns = domain
            .as_deref()
            .is_some_and(|d| self.ctx.config.bounces.is_return_domain(d));
        if returns && !takes_reports(&rcpt.address) {
            return Reply::new(
                550,
                "5.1.1",
                format!(
                    "<{}>: Recipient address rejected: this domain takes only bounces and feedback reports",
                    printable(&rcpt.address)
                ),
            );
        }
        let local = self.local_recipient(&rcpt.address);
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
        if !local && let Some(reply) = self.suppressed(&rcpt.address) {
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
    pub(super) fn unknown_local_user(&self, address: &str) -> Option<Reply> {
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

    /// 550 for outbound mail to a globally suppressed address: refused at RCPT, so that the
    /// client's own bounce tells its sender. Narrower scopes (a tenant's) are known only after
    /// DATA ([`Session::leave_out_suppressed`]).
    fn suppressed(&self, address: &str) -> Option<Reply> {
        let sender = self.tx.as_ref().map_or("", |tx| tx.mail.address.as_str());
        let entry = self.ctx.intake.suppressed(address, sender, None, None)?;
        Some(suppressed_reply(address, &entry))
    }

    /// Takes the outbound recipients suppressed in the message's scopes (its tenant's, from
    /// X-Baton-Tenant) out of `envelope`: they had their 250 at RCPT, so they are dropped,
    /// each a `suppression` event. None while some remain; else the reply that refuses it.
    pub(super) fn leave_out_suppressed(&self, envelope: &mut Envelope) -> Option<Reply> {
        let tenant = envelope.meta.tenant.as_deref()?;
        let mut last = None;
        let sender = &envelope.sender;
        envelope.recipients.retain(|r| {
            if self.local_recipient(&r.address) {
                return true;
            }
            let entry = self
                .ctx
                .intake
                .suppressed(&r.address, sender, Some(tenant), None);
            let keep = entry.is_none();
            last = entry.map(|e| (r.address.clone(), e)).or(last.take());
            keep
        });
        let (address, entry) = last.filter(|_| envelope.recipients.is_empty())?;
        Some(suppressed_reply(&address, &entry))
    }

    /// Whether mail for `address` stays here: the bare postmaster, a local domain, a
    /// return-path domain.
    pub(super) fn local_recipient(&self, address: &str) -> bool {
        let config = &self.ctx.config;
        address == "postmaster"
            || domain_of(address).is_some_and(|d| {
                config.relay.local_domains.contains(&d) || config.bounces.is_return_domain(&d)
            })
    }

    pub(super) fn relay_allowed(&self) -> bool {
        self.auth_user.is_some() || self.in_relay_networks()
    }

    pub(super) fn in_relay_networks(&self) -> bool {
        let ip = self.peer.ip().to_canonical();
        self.ctx
            .config
            .relay
            .networks
            .iter()
            .any(|n| n.contains(&ip))
    }
}

/// 550 5.7.1 for a recipient on the suppression list, with the entry's scope and reason.
pub(super) fn suppressed_reply(address: &str, entry: &Entry) -> Reply {
    Reply::new(
        550,
        "5.7.1",
        format!(
            "<{}>: Recipient address rejected: on the suppression list ({}: {})",
            printable(address),
            entry.scope,
            printable(&entry.reason)
        ),
    )
}

/// The local parts a return-path domain takes: signed return paths and unsubscribe addresses
/// (their tokens are checked when the report is read) and the usual role addresses that
/// feedback loops and people write to.
fn takes_reports(address: &str) -> bool {
    use crate::returns::token::{BOUNCE_PREFIX, UNSUBSCRIBE_PREFIX};
    let local = address.rsplit_once('@').map_or(address, |(l, _)| l);
    let local = local.to_ascii_lowercase();
    local.starts_with(BOUNCE_PREFIX)
        || local.starts_with(UNSUBSCRIBE_PREFIX)
        || matches!(
            local.as_str(),
            "postmaster" | "abuse" | "fbl" | "unsubscribe"
        )
}
