//! MTA-STS (RFC 8461): a recipient domain's published demand for verified TLS. A TXT record at
//! `_mta-sts.DOMAIN` announces a policy (with an id); the policy itself is fetched over
//! verified HTTPS from `https://mta-sts.DOMAIN/.well-known/mta-sts.txt` and cached, in memory
//! and in `data_dir/mta-sts.json`, until its `max_age`; a new id in the TXT record refetches it.
//! While a policy is fresh it is used even if DNS or HTTPS fail (that is its point: an attacker
//! who blocks them must not downgrade delivery).
//!
//! Owns fetching, parsing and caching policies. What a policy means for a connection (which
//! MX hosts, verified TLS) is decided in delivery.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use serde::{Deserialize, Serialize};

use crate::Dns;

/// RFC 8461 §3.2: policies are at most 64 KiB.
const MAX_POLICY_BYTES: usize = 64 * 1024;
/// RFC 8461 §3.2: max_age is at most a year.
const MAX_AGE_LIMIT: u64 = 31_557_600;
const FETCH_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Deliver only to matching MX hosts over verified TLS.
    Enforce,
    /// Report failures, deliver anyway.
    Testing,
    /// The domain withdrew its policy.
    None,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// The TXT record's id the policy was fetched under.
    pub id: String,
    pub mode: Mode,
    /// MX host patterns: exact names or `*.example.com` (one leftmost label).
    pub mx: Vec<String>,
    /// Seconds the policy stays valid after it was fetched.
    pub max_age: u64,
    /// When it was fetched (Unix ms).
    pub fetched_ms: u64,
}

impl Policy {
    /// Parses a policy file (RFC 8461 §3.2): `key: value` lines; unknown keys ignored.
    pub fn parse(text: &str, id: &str) -> Result<Policy, String> {
        let (mut version, mut mode, mut max_age) = (None, None, None);
        let mut mx = Vec::new();
        for line in text.lines() {
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() {
                continue;
            }
            let Some((key, value)) = line.split_once(':') else {
                return Err(format!("policy line {line:?} is not key: value"));
            };
            let value = value.trim();
            match key.trim() {
                "version" => version = Some(value.to_string()),
                "mode" => {
                    mode = Some(match value {
                        "enforce" => Mode::Enforce,
                        "testing" => Mode::Testing,
                        "none" => Mode::None,
                        other => return Err(format!("unknown mode {other:?}")),
                    })
                }
                "max_age" => {
                    let secs: u64 = value
                        .parse()
                        .map_err(|_| format!("max_age {value:?} is not a number"))?;
                    max_age = Some(secs.min(MAX_AGE_LIMIT));
                }
                "mx" => mx.push(value.trim_end_matches('.').to_ascii_lowercase()),
                _ => {}
            }
        }
        if version.as_deref() != Some("STSv1") {
            return Err("version is not STSv1".into());
        }
        let mode = mode.ok_or("no mode")?;
        let max_age = max_age.ok_or("no max_age")?;
        if mx.is_empty() && mode != Mode::None {
            return Err("no mx pattern".into());
        }
        Ok(Policy {
            id: id.to_string(),
            mode,
            mx,
            max_age,
            fetched_ms: baton_spool::now_ms(),
        })
    }

    /// Whether an MX host name is one the policy allows (RFC 8461 §4.1).
    pub fn allows(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.mx
            .iter()
            .any(|pattern| match pattern.strip_prefix("*.") {
                Some(parent) => host
                    .split_once('.')
                    .is_some_and(|(label, rest)| !label.is_empty() && rest == parent),
                None => *pattern == host,
            })
    }

    fn fresh(&self, now_ms: u64) -> bool {
        let age_ms = self.max_age.min(MAX_AGE_LIMIT).saturating_mul(1000);
        self.fetched_ms.saturating_add(age_ms) > now_ms
    }
}

/// The policy id announced in `_mta-sts.DOMAIN` TXT records: exactly one `v=STSv1` record.
fn announced_id(records: &[String]) -> Option<String> {
    let sts: Vec<&String> = records
        .iter()
        .filter(|r| r.trim_start().starts_with("v=STSv1"))
        .collect();
    let [record] = sts.as_slice() else {
        return None;
    };
    record.split(';').find_map(|field| {
        let (k, v) = field.split_once('=')?;
        let v = v.trim();
        let ok = k.trim() == "id"
            && !v.is_empty()
            && v.len() <= 32
            && v.bytes().all(|b| b.is_ascii_alphanumeric());
        ok.then(|| v.to_string())
    })
}

/// The order of cache snapshots: numbers handed out, and the newest written.
#[derive(Default)]
struct SaveOrder {
    taken: AtomicU64,
    written: Mutex<u64>,
}

pub struct MtaSts {
    https: Arc<rustls::ClientConfig>,
    port: u16,
    connect_timeout: Duration,
    path: PathBuf,
    known: Mutex<HashMap<String, Policy>>,
    /// The cache file is written on blocking threads; each snapshot has a number and the file
    /// only moves forward (the newest written, never an older one over it).
    saves: Arc<SaveOrder>,
    /// One fetch per domain at a time; the others wait and use its result.
    fetching: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl MtaSts {
    pub fn new(
        https: Arc<rustls::ClientConfig>,
        port: u16,
        connect_timeout: Duration,
        data_dir: &std::path::Path,
    ) -> MtaSts {
        let path = data_dir.join("mta-sts.json");
        let known = std::fs::read(&path)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default();
        MtaSts {
            https,
            port,
            connect_timeout,
            path,
            known: Mutex::new(known),
            saves: Arc::default(),
            fetching: Mutex::new(HashMap::new()),
        }
    }

    /// The policy in force for `domain`, fetching it when announced and not cached.
    pub async fn policy(&self, dns: &Dns, domain: &str) -> Option<Policy> {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        let gate = self
            .fetching
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(domain.clone())
            .or_default()
            .clone();
        let _turn = gate.lock().await;
        let now = baton_spool::now_ms();
        let cached = self
            .known
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&domain)
            .filter(|p| p.fresh(now))
            .cloned();
        let id = match dns.txt(&format!("_mta-sts.{domain}")).await {
            Ok(records) => announced_id(&records),
            // DNS trouble: a cached policy holds (RFC 8461 §5.1).
            Err(_) => return cached,
        };
        let Some(id) = id else {
            return cached;
        };
        if let Some(p) = &cached
            && p.id == id
        {
            return cached;
        }
        match self
            .fetch(dns, &domain)
            .await
            .and_then(|text| Policy::parse(&text, &id))
        {
            Ok(policy) => {
                tracing::info!(%domain, id = %policy.id, mode = ?policy.mode, "MTA-STS policy fetched");
                self.remember(&domain, policy.clone());
                Some(policy)
            }
            Err(why) => {
                tracing::warn!(%domain, %why, "MTA-STS policy could not be fetched");
                cached
            }
        }
    }

    fn remember(&self, domain: &str, policy: Policy) {
        let (snapshot, number) = {
            let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
            known.insert(domain.to_string(), policy);
            let number = self.saves.taken.fetch_add(1, Ordering::Relaxed) + 1;
            (serde_json::to_vec_pretty(&*known), number)
        };
        let (path, saves) = (self.path.clone(), self.saves.clone());
        // Losing the file only costs a refetch; a failed write is logged, not fatal.
        tokio::task::spawn_blocking(move || {
            let mut written = saves.written.lock().unwrap_or_else(|e| e.into_inner());
            if *written > number {
                return; // a newer snapshot is on disk already
            }
            let saved = snapshot.map_err(std::io::Error::other).and_then(|bytes| {
                let tmp = path.with_extension("json.tmp");
                std::fs::write(&tmp, bytes)?;
                std::fs::rename(&tmp, &path)
            });
            match saved {
                Ok(()) => *written = number,
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot save MTA-STS policies")
                }
            }
        });
    }

    /// GET https://mta-sts.DOMAIN/.well-known/mta-sts.txt: verified TLS, 200 only (no
    /// redirects), text/plain, at most 64 KiB.
    async fn fetch(&self, dns: &Dns, domain: &str) -> Result<String, String> {
        let host = format!("mta-sts.{domain}");
        let work = async {
            let ips = dns.addresses(&host).await.map_err(|f| f.to_string())?;
            let mut tcp = None;
            let mut last = String::new();
            for ip in ips {
                let addr = std::net::SocketAddr::new(ip, self.port);
                match tokio::time::timeout(
                    self.connect_timeout,
                    tokio::net::TcpStream::connect(addr),
                )
                .await
                {
                    Ok(Ok(s)) => {
                        tcp = Some(s);
                        break;
                    }
                    Ok(Err(e)) => last = format!("{addr}: {e}"),
                    Err(_) => last = format!("{addr}: connection timed out"),
                }
            }
            let tcp = tcp.ok_or(last)?;
            let name = baton_tls::trust::server_name(&host)?;
            let tls = tokio_rustls::TlsConnector::from(self.https.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS with {host}: {e}"))?;
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                    .await
                    .map_err(|e| e.to_string())?;
            tokio::spawn(async move {
                let _ = connection.await;
            });
            let request = hyper::Request::get("/.well-known/mta-sts.txt")
                .header(hyper::header::HOST, &host)
                .header(hyper::header::USER_AGENT, "baton")
                .body(Empty::<Bytes>::new())
                .map_err(|e| e.to_string())?;
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| e.to_string())?;
            if response.status() != hyper::StatusCode::OK {
                return Err(format!("{host} answered {}", response.status()));
            }
            let plain = response
                .headers()
                .get(hyper::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.trim().to_ascii_lowercase().starts_with("text/plain"));
            if !plain {
                return Err(format!("{host} did not answer with text/plain"));
            }
            let body = Limited::new(response.into_body(), MAX_POLICY_BYTES)
                .collect()
                .await
                .map_err(|e| format!("reading the policy: {e}"))?
                .to_bytes();
            String::from_utf8(body.to_vec()).map_err(|_| "the policy is not UTF-8".to_string())
        };
        tokio::time::timeout(FETCH_TIMEOUT, work)
            .await
            .map_err(|_| format!("fetching from {host} timed out"))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_policy() {
        let text = "version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.example.net\r\nmax_age: 86400\r\n";
        let p = Policy::parse(text, "20260101").unwrap();
        assert_eq!(p.mode, Mode::Enforce);
        assert_eq!(p.max_age, 86400);
        assert!(p.allows("mail.example.com"));
        assert!(p.allows("MX1.example.net."));
        assert!(!p.allows("a.b.example.net"));
        assert!(!p.allows("example.net"));
        assert!(!p.allows("mail.example.org"));
    }

    #[test]
    fn refuses_broken_policies() {
        assert!(Policy::parse("version: STSv2\nmode: enforce\nmx: a\nmax_age: 1\n", "1").is_err());
        assert!(Policy::parse("version: STSv1\nmode: strict\nmx: a\nmax_age: 1\n", "1").is_err());
        assert!(Policy::parse("version: STSv1\nmode: enforce\nmax_age: 1\n", "1").is_err());
        assert!(Policy::parse("version: STSv1\nmode: enforce\nmx: a\n", "1").is_err());
        assert!(Policy::parse("garbage", "1").is_err());
        let capped = Policy::parse("version: STSv1\nmode: none\nmax_age: 999999999\n", "1");
        assert_eq!(capped.unwrap().max_age, MAX_AGE_LIMIT);
    }

    #[test]
    fn reads_the_announced_id() {
        let one = vec!["v=STSv1; id=20160831085700Z;".to_string()];
        assert_eq!(announced_id(&one).as_deref(), Some("20160831085700Z"));
        let two = vec!["v=STSv1; id=1".to_string(), "v=STSv1; id=2".to_string()];
        assert_eq!(announced_id(&two), None);
        assert_eq!(announced_id(&["v=spf1 -all".to_string()]), None);
        assert_eq!(announced_id(&["v=STSv1; id=bad-id".to_string()]), None);
    }
}
