//! The services around the mail flow: `[submission]`, `[[dkim]]`, `[http]`, `[[webhook]]` and
//! `[nats]`
//! (`[inbound]` is one switch, read in `validate.rs`).
//!
//! Owns their checks and defaults. DKIM keys and the users file are only named here: the keys
//! are recorded for `Config::check_files`, the users file is read by AUTH when it is used.

use std::net::SocketAddr;
use std::path::PathBuf;

use ipnet::IpNet;
use toml::Spanned;

use super::files::ConfigFile;
use super::raw::{RawDkim, RawHttp, RawNats, RawSubmission, RawWebhook};
use super::validate::Validator;
use super::{DkimConfig, HttpConfig, NatsConfig, SenderPolicy, SubmissionConfig, WebhookConfig};

impl Validator<'_> {
    pub(super) fn sender_policy(&mut self, raw: Option<&Spanned<String>>) -> SenderPolicy {
        match raw.map(|p| p.get_ref().as_str()) {
            None | Some("domain") => SenderPolicy::Domain,
            Some("address") => SenderPolicy::Address,
            Some("any") => SenderPolicy::Any,
            Some(other) => {
                let span = raw.map(|p| p.span()).unwrap_or(0..0);
                self.error::<()>(
                    span,
                    format!("unknown sender_policy {other:?}"),
                    "\"domain\" (the user's domain, default), \"address\" (exactly the user) or \"any\"",
                );
                SenderPolicy::Domain
            }
        }
    }

    /// `[submission]`: its sender policy is checked before `[[dkim]]`, its rates here, after
    /// the webhooks (the order its errors have always had).
    pub(super) fn submission(
        &mut self,
        raw: RawSubmission,
        sender_policy: SenderPolicy,
    ) -> SubmissionConfig {
        SubmissionConfig {
            users_file: raw.users_file.map(PathBuf::from),
            plaintext_auth_on_loopback: raw.plaintext_auth_on_loopback.unwrap_or(false),
            sender_policy,
            message_rate: self.rate(raw.message_rate),
            recipient_rate: self.rate(raw.recipient_rate),
        }
    }

    pub(super) fn dkim(&mut self, raw: RawDkim) -> Option<DkimConfig> {
        let config = DkimConfig {
            domain: raw.domain.get_ref().to_ascii_lowercase(),
            selector: raw.selector.into_inner(),
            key: PathBuf::from(raw.key.get_ref()),
        };
        self.file(
            raw.key.span(),
            ConfigFile::DkimKey {
                domain: config.domain.clone(),
                selector: config.selector.clone(),
                key: config.key.clone(),
            },
        );
        Some(config)
    }

    pub(super) fn webhook(&mut self, raw: RawWebhook) -> Option<WebhookConfig> {
        let url = raw.url.get_ref().trim().to_string();
        let parsed = url.parse::<hyper::Uri>().ok().filter(|u| {
            matches!(u.scheme_str(), Some("http") | Some("https")) && u.host().is_some()
        });
        if parsed.is_none() {
            return self.error(
                raw.url.span(),
                format!("webhook url {url:?} is not an http(s) URL"),
                "write \"https://crm.example.com/hooks/baton\"",
            );
        }
        if raw.secret.get_ref().len() < 16 {
            return self.error(
                raw.secret.span(),
                "a webhook secret must be at least 16 characters".into(),
                "use a long random string, e.g. `openssl rand -hex 32`",
            );
        }
        let events = self.event_kinds(raw.events);
        let batch_size = self.count(raw.batch_size, 100) as usize;
        Some(WebhookConfig {
            url,
            secret: raw.secret.into_inner(),
            events,
            batch_size,
        })
    }

    /// `[nats]`: the JetStream export; `node` names this node in message ids.
    pub(super) fn nats(&mut self, raw: Option<RawNats>, node: &str) -> Option<NatsConfig> {
        let raw = raw?;
        let example = "e.g. url = \"nats://127.0.0.1:4222\", or a list of servers";
        let (servers, span) = self.url_list(raw.url, "[nats] needs url", example)?;
        for server in &servers {
            if let Err(why) = baton_events::nats::check_server(server) {
                return self.error(
                    span.clone(),
                    format!("{server:?} is not a NATS server address: {why}"),
                    "write nats://HOST:PORT (or tls://HOST:PORT)",
                );
            }
        }
        let subject = self.nats_name(raw.subject, "baton.events", true)?;
        let stream = self.nats_name(raw.stream, "BATON_EVENTS", false)?;
        Some(NatsConfig {
            servers,
            subject,
            stream,
            max_age: self.duration_or(raw.max_age, 7 * 86_400),
            node: node.to_string(),
            events: self.event_kinds(raw.events),
            batch_size: self.count(raw.batch_size, 100) as usize,
        })
    }

    /// A subject prefix (dot-separated tokens) or a stream name (one token).
    fn nats_name(
        &mut self,
        raw: Option<Spanned<String>>,
        default: &str,
        dots: bool,
    ) -> Option<String> {
        let Some(raw) = raw else {
            return Some(default.to_string());
        };
        let name = raw.get_ref().trim();
        let token = |t: &str| {
            !t.is_empty()
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_-".contains(&b))
        };
        let ok = name.len() <= 200
            && if dots {
                name.split('.').all(token)
            } else {
                token(name)
            };
        if ok {
            return Some(name.to_string());
        }
        self.error(
            raw.span(),
            format!("{name:?} is not usable here"),
            if dots {
                "use dot-separated words of letters, digits, '-' or '_', e.g. \"baton.events\""
            } else {
                "use letters, digits, '-' or '_', e.g. \"BATON_EVENTS\""
            },
        )
    }

    /// An `events = [...]` filter; empty = all.
    fn event_kinds(&mut self, raw: Option<Vec<Spanned<String>>>) -> Vec<baton_events::EventKind> {
        let mut events = Vec::new();
        for e in raw.unwrap_or_default() {
            match e.get_ref().parse::<baton_events::EventKind>() {
                Ok(kind) => events.push(kind),
                Err(unknown) => {
                    let types = baton_events::EventKind::ALL.map(|k| k.as_str());
                    self.error::<()>(
                        e.span(),
                        unknown.to_string(),
                        &format!("types: {}", types.join(", ")),
                    );
                }
            }
        }
        events
    }

    pub(super) fn http(&mut self, raw: RawHttp) -> Option<HttpConfig> {
        if raw.enabled == Some(false) {
            return None;
        }
        let address = match &raw.address {
            None => SocketAddr::from(([127, 0, 0, 1], 8025)),
            Some(a) => match a.get_ref().parse::<SocketAddr>() {
                Ok(addr) => addr,
                Err(_) => {
                    return self.error(
                        a.span(),
                        format!("http address {:?} is not IP:port", a.get_ref()),
                        "write it as \"127.0.0.1:8025\"; enabled = false turns the API off",
                    );
                }
            },
        };
        let mut tokens = Vec::new();
        for t in raw.tokens.unwrap_or_default() {
            if t.get_ref().len() < 16 {
                self.error::<()>(
                    t.span(),
                    "an API token must be at least 16 characters".into(),
                    "use a long random string, e.g. `openssl rand -hex 32`",
                );
            } else {
                tokens.push(t.into_inner());
            }
        }
        let trusted_networks = match raw.trusted_networks {
            None => vec![
                "127.0.0.0/8".parse().expect("valid network"),
                "::1/128".parse().expect("valid network"),
            ],
            Some(list) => list
                .into_iter()
                .filter_map(|n| match n.get_ref().parse::<IpNet>() {
                    Ok(net) => Some(net),
                    Err(_) => self.error(
                        n.span(),
                        format!("{:?} is not a network", n.get_ref()),
                        "write \"127.0.0.1/32\" or \"10.0.0.0/8\"",
                    ),
                })
                .collect(),
        };
        let max_inject_bytes = raw
            .max_inject_bytes
            .and_then(|s| self.size(s))
            .unwrap_or(256 << 20);
        Some(HttpConfig {
            address,
            tokens,
            trusted_networks,
            max_inject_bytes,
        })
    }
}
