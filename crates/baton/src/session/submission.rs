//! Submission: AUTH (PLAIN, LOGIN) and what an authenticated user may send, at what rate.

use super::*;

impl Session {
    pub(super) fn is_submission(&self) -> bool {
        matches!(self.role, Role::Submission | Role::Submissions)
    }

    /// AUTH is offered inside TLS only, or in plaintext from loopback when configured.
    pub(super) fn auth_allowed(&self) -> bool {
        self.stream.is_tls()
            || (self.ctx.config.submission.plaintext_auth_on_loopback
                && self.peer.ip().to_canonical().is_loopback())
    }

    /// RFC 4954 AUTH with PLAIN or LOGIN.
    pub(super) async fn auth(
        &mut self,
        mechanism: AuthMechanism,
        initial: String,
    ) -> Result<Reply, Close> {
        let Some(users) = self.ctx.users.clone().filter(|_| self.is_submission()) else {
            return Ok(Reply::new(502, "5.5.1", "Error: AUTH not available here"));
        };
        if let Some(refusal) = self.auth_refused_now() {
            return Ok(refusal);
        }
        let initial = if initial == "=" {
            String::new()
        } else {
            initial
        };
        let credentials = match self.credentials(mechanism, initial).await? {
            Ok(credentials) => credentials,
            Err(reply) => return Ok(reply),
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
            self.ctx.auth_failures.failed(self.peer.ip().to_canonical());
            tracing::warn!(client = %self.peer, user = %printable(&user), "authentication failed");
            Ok(Reply::new(
                535,
                "5.7.8",
                "Authentication credentials invalid",
            ))
        }
    }

    /// Why AUTH cannot start now (already authenticated, inside a transaction, no TLS, too
    /// many failures from this address), if it cannot.
    fn auth_refused_now(&self) -> Option<Reply> {
        if self.auth_user.is_some() {
            return Some(Reply::new(503, "5.5.1", "Error: already authenticated"));
        }
        if self.tx.is_some() {
            return Some(Reply::new(
                503,
                "5.5.1",
                "Error: AUTH not allowed in a mail transaction",
            ));
        }
        if !self.auth_allowed() {
            return Some(Reply::new(
                538,
                "5.7.11",
                "Encryption required for requested authentication mechanism",
            ));
        }
        if self
            .ctx
            .auth_failures
            .blocked(self.peer.ip().to_canonical())
        {
            return Some(Reply::new(
                454,
                "4.7.0",
                "Too many failed authentications from your address; try again later",
            ));
        }
        None
    }

    /// The user name and password the client gives under `mechanism` (None when they do not
    /// decode), or the reply that ends the exchange (cancelled, unknown mechanism).
    async fn credentials(
        &mut self,
        mechanism: AuthMechanism,
        initial: String,
    ) -> Result<Result<Option<(String, String)>, Reply>, Close> {
        match mechanism {
            AuthMechanism::Plain => {
                let response = match initial.is_empty() {
                    true => match self.challenge("").await? {
                        Some(r) => r,
                        None => return Ok(Err(cancelled())),
                    },
                    false => initial,
                };
                Ok(Ok(crate::auth::decode_plain(&response)))
            }
            AuthMechanism::Login => {
                let user = match initial.is_empty() {
                    true => match self.challenge("VXNlcm5hbWU6").await? {
                        Some(r) => r,
                        None => return Ok(Err(cancelled())),
                    },
                    false => initial,
                };
                let Some(password) = self.challenge("UGFzc3dvcmQ6").await? else {
                    return Ok(Err(cancelled()));
                };
                let decode = crate::auth::decode_b64_text;
                Ok(Ok(decode(&user).zip(decode(&password))))
            }
            AuthMechanism::Other => Ok(Err(Reply::new(
                504,
                "5.5.4",
                "Unrecognized authentication type",
            ))),
        }
    }

    /// Sends a 334 challenge and returns the client's line, or None if it cancelled ("*").
    pub(super) async fn challenge(&mut self, text: &'static str) -> Result<Option<String>, Close> {
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
    pub(super) fn sender_allowed(&self, address: &str) -> bool {
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
    pub(super) fn user_rate(
        &self,
        limiter: &Option<RateLimiter<String>>,
        what: &str,
    ) -> Option<Reply> {
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
}
