//! `[cluster]`: the Redis this node shares its limits and its view with, and its name there.
//!
//! Owns their checks and defaults; it must not connect to anything.

use toml::Spanned;

use super::raw::{RawCluster, UrlList};
use super::validate::Validator;

impl Validator<'_> {
    pub(super) fn cluster(
        &mut self,
        raw: Option<RawCluster>,
        hostname: &str,
    ) -> Option<baton_cluster::ClusterConfig> {
        let raw = raw?;
        let example = "e.g. redis = \"redis://127.0.0.1:6379\", or a list of URLs tried in turn";
        let (urls, span) = self.url_list(raw.redis, "[cluster] needs redis", example)?;
        if let Some(bad) = urls.iter().find(|u| !redis_url(u)) {
            return self.error(
                span,
                format!("{bad:?} is not a redis URL"),
                "write redis://HOST:PORT[/DB] or redis+unix:///PATH; for TLS (rediss://) put a \
                 local TLS proxy in front of Redis",
            );
        }
        let node = match raw.node {
            Some(n) => self.node_name(n)?,
            None => hostname.to_string(),
        };
        let mut prefix = match raw.prefix {
            Some(p) => self.node_name(p)?,
            None => "baton".into(),
        };
        let redis_cluster = raw.redis_cluster.unwrap_or(false);
        if redis_cluster {
            // A hash tag: every key in one slot, so scripts over several keys stay on one
            // shard (baton-cluster's conn).
            prefix = format!("{{{prefix}}}");
        }
        Some(baton_cluster::ClusterConfig {
            redis: urls,
            redis_cluster,
            node,
            heartbeat: self.duration_or(raw.heartbeat, 1),
            prefix,
            lease_ttl: self.duration_or(raw.lease_ttl, 10),
            fallback_nodes: raw
                .fallback_nodes
                .map(|n| self.count(Some(n), 1).min(u64::from(u32::MAX)) as u32),
        })
    }

    /// One URL or a list of them, at least one, and where it was written; `missing` (with
    /// `example`) when the key is absent.
    pub(super) fn url_list(
        &mut self,
        raw: Option<Spanned<UrlList>>,
        missing: &str,
        example: &str,
    ) -> Option<(Vec<String>, std::ops::Range<usize>)> {
        let Some(urls) = raw else {
            self.error_at_top(missing.into(), example);
            return None;
        };
        let span = urls.span();
        let urls = match urls.into_inner() {
            UrlList::One(url) => vec![url],
            UrlList::Many(urls) => urls,
        };
        if urls.is_empty() {
            return self.error(span, "no URL given".into(), "give at least one URL");
        }
        Some((urls, span))
    }

    /// A node name or key prefix: 1-64 letters, digits, '.', '-' or '_'.
    fn node_name(&mut self, raw: Spanned<String>) -> Option<String> {
        let name = raw.get_ref().trim();
        let ok = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if ok {
            Some(name.to_string())
        } else {
            self.error(
                raw.span(),
                format!("{name:?} is not a usable name"),
                "use 1-64 letters, digits, '.', '-' or '_'",
            )
        }
    }
}

fn redis_url(url: &str) -> bool {
    let rest = ["redis://", "redis+unix://", "unix://"]
        .iter()
        .find_map(|scheme| url.strip_prefix(scheme));
    rest.is_some_and(|r| !r.is_empty())
}
