//! `[bounces]`: the return-path domain for VERP and its per-pool and per-tenant overrides, the
//! key that signs return paths and unsubscribe links, operator classification rules, and when
//! repeated soft bounces suppress an address.
//!
//! Owns their checks and defaults; it must not read the key file or start anything.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use toml::Spanned;

use super::BouncesConfig;
use super::raw::RawBounces;
use super::validate::Validator;

impl Validator<'_> {
    pub(super) fn bounces(&mut self, raw: RawBounces) -> BouncesConfig {
        let domain = raw.domain.and_then(|d| self.bounce_domain(d));
        let mut tenant_domains = BTreeMap::new();
        for (tenant, d) in raw.tenant_domains {
            if let Some(d) = self.bounce_domain(d) {
                tenant_domains.insert(tenant.to_ascii_lowercase(), d);
            }
        }
        let mut pool_domains = BTreeMap::new();
        for (pool, d) in raw.pool_domains {
            if let Some(d) = self.bounce_domain(d) {
                pool_domains.insert(pool, d);
            }
        }
        let secret = raw.secret.and_then(|s| {
            if s.get_ref().len() >= 16 {
                Some(s.into_inner())
            } else {
                self.error(
                    s.span(),
                    "the bounces secret must be at least 16 characters".into(),
                    "use a long random string, e.g. `openssl rand -hex 32`; without one Baton \
                     keeps a key in data_dir/bounces.key",
                )
            }
        });
        let rules = raw.rules.and_then(|lines| {
            let text: Vec<&str> = lines.iter().map(|l| l.get_ref().as_str()).collect();
            match baton_bounce::Rules::parse(&text.join("\n")) {
                Ok(rules) => Some(Arc::new(rules)),
                Err(e) => {
                    let span = lines.first().map(|l| l.span()).unwrap_or(0..0);
                    self.error(
                        span,
                        format!("bounce rules: {e}"),
                        "each rule is `text <class> <regex>` or `status <x.y.z> <class>`",
                    )
                }
            }
        });
        let unsubscribe_url = raw.unsubscribe_url.and_then(|u| self.unsubscribe_url(u));
        if let Some(first) = raw.list_unsubscribe_tenants.first()
            && unsubscribe_url.is_none()
        {
            self.error::<()>(
                first.span(),
                "list_unsubscribe_tenants needs unsubscribe_url".into(),
                "set [bounces] unsubscribe_url to the public https address of this server's API",
            );
        }
        BouncesConfig {
            domain,
            tenant_domains,
            pool_domains,
            secret,
            rules,
            soft_bounce_limit: raw
                .soft_bounce_limit
                .map_or(5, |n| self.count(Some(n), 0) as u32),
            soft_bounce_window: raw
                .soft_bounce_window
                .and_then(|d| self.duration(d))
                .unwrap_or(Duration::from_secs(30 * 86400)),
            unsubscribe_url,
            list_unsubscribe_tenants: raw
                .list_unsubscribe_tenants
                .iter()
                .map(|t| t.get_ref().to_ascii_lowercase())
                .collect(),
        }
    }

    fn bounce_domain(&mut self, raw: Spanned<String>) -> Option<String> {
        let name = raw.get_ref().trim().to_ascii_lowercase();
        if baton_smtp::address::validate_domain(&name).is_err() || name.starts_with('[') {
            return self.error(
                raw.span(),
                format!("{name:?} is not a domain name"),
                "write the return-path domain, e.g. \"bounces.example.com\"; its MX must point \
                 at this server",
            );
        }
        Some(name)
    }

    fn unsubscribe_url(&mut self, raw: Spanned<String>) -> Option<String> {
        let url = raw.get_ref().trim().trim_end_matches('/').to_string();
        let ok = url.parse::<hyper::Uri>().ok().is_some_and(|u| {
            matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some()
        });
        if ok {
            Some(url)
        } else {
            self.error(
                raw.span(),
                format!("unsubscribe_url {url:?} is not an http(s) URL"),
                "the public address of this server's HTTP API, e.g. \"https://mail.example.com\"",
            )
        }
    }
}
