//! Configuration: the TOML file, its embedded defaults and its validation.
//!
//! Parsing keeps each value's position so that every error names its line and comes with a
//! hint. The rest of Baton sees only the validated [`Config`].

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;
use toml::Spanned;

/// What a listener is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Port 25 style: mail for local domains from anyone, relay for trusted networks.
    Mx,
    /// Port 587: message submission (AUTH arrives with the "Secure" issue).
    Submission,
    /// Port 465: submission over implicit TLS.
    Submissions,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Mx => "mx",
            Role::Submission => "submission",
            Role::Submissions => "submissions",
        }
    }
}

#[derive(Debug, Clone)]
pub struct ListenerConfig {
    pub address: SocketAddr,
    pub role: Role,
}

#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Lower-case domains Baton accepts mail for from anyone.
    pub local_domains: Vec<String>,
    /// Clients allowed to relay to any domain.
    pub networks: Vec<IpNet>,
}

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_message_size: u64,
    pub max_recipients: usize,
    pub max_line_length: usize,
    pub max_errors: u32,
    /// Longest wait for the next command (RFC 5321 §4.5.3.2.7: 5 minutes).
    pub idle_timeout: Duration,
    /// Longest time to receive one command line once it has started.
    pub command_timeout: Duration,
    /// Longest wait for the next chunk of message data (RFC 5321 §4.5.3.2.6: 3 minutes).
    pub data_timeout: Duration,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
}

#[derive(Debug, Clone)]
pub struct SpoolConfig {
    pub fsync: bool,
    pub segment_size: u64,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub hostname: String,
    pub data_dir: PathBuf,
    pub listeners: Vec<ListenerConfig>,
    pub relay: RelayConfig,
    pub limits: Limits,
    pub spool: SpoolConfig,
}

pub const DEFAULT_LISTEN: &str = "127.0.0.1:2525";

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub line: usize,
    pub column: usize,
    pub message: String,
    pub hint: Option<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}:{}: {}", self.line, self.column, self.message)?;
        if let Some(hint) = &self.hint {
            write!(f, "\n    hint: {hint}")?;
        }
        Ok(())
    }
}

/// All the problems found in one file.
#[derive(Debug)]
pub struct ConfigErrors {
    pub path: Option<PathBuf>,
    pub errors: Vec<ConfigError>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = self
            .path
            .as_deref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "config".into());
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{name}:{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    hostname: Option<Spanned<String>>,
    data_dir: Option<Spanned<String>>,
    #[serde(default)]
    listener: Vec<RawListener>,
    #[serde(default)]
    relay: RawRelay,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    spool: RawSpool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    address: Spanned<String>,
    role: Option<Spanned<String>>,
    tls_cert: Option<Spanned<String>>,
    tls_key: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRelay {
    local_domains: Option<Vec<Spanned<String>>>,
    networks: Option<Vec<Spanned<String>>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_message_size: Option<Spanned<Quantity>>,
    max_recipients: Option<Spanned<u64>>,
    max_line_length: Option<Spanned<u64>>,
    max_errors: Option<Spanned<u64>>,
    idle_timeout: Option<Spanned<Quantity>>,
    command_timeout: Option<Spanned<Quantity>>,
    data_timeout: Option<Spanned<Quantity>>,
    max_connections: Option<Spanned<u64>>,
    max_connections_per_ip: Option<Spanned<u64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSpool {
    fsync: Option<bool>,
    segment_size: Option<Spanned<Quantity>>,
}

/// A number, or a string with a unit: "30s", "5m", "50MiB".
#[derive(Deserialize, Clone)]
#[serde(untagged)]
enum Quantity {
    Number(u64),
    Text(String),
}

impl Config {
    /// The embedded defaults: `baton serve` with no config file.
    pub fn defaults() -> Config {
        match Config::parse("") {
            Ok(config) => config,
            Err(_) => unreachable!("the embedded defaults are valid"),
        }
    }

    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigErrors {
            path: Some(path.to_path_buf()),
            errors: vec![ConfigError {
                line: 0,
                column: 0,
                message: format!("cannot read the file: {e}"),
                hint: Some("check the path given to --config".into()),
            }],
        })?;
        Config::parse(&text).map_err(|errors| ConfigErrors {
            path: Some(path.to_path_buf()),
            errors,
        })
    }

    pub fn parse(text: &str) -> Result<Config, Vec<ConfigError>> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| vec![toml_error(text, &e)])?;
        let mut v = Validator {
            text,
            errors: Vec::new(),
        };
        let config = v.config(raw);
        if v.errors.is_empty() {
            Ok(config)
        } else {
            Err(v.errors)
        }
    }
}

fn toml_error(text: &str, err: &toml::de::Error) -> ConfigError {
    let (line, column) = err
        .span()
        .map(|s| line_col(text, s.start))
        .unwrap_or((0, 0));
    let message = err.message().trim().to_string();
    let hint = if message.starts_with("unknown field") {
        "a misspelt key? every key is listed in docs/CONFIGURATION.md"
    } else if message.contains("invalid type") {
        "check the value's type (quoted string, number, boolean, list) in docs/CONFIGURATION.md"
    } else {
        "check the TOML syntax near this line"
    };
    ConfigError {
        line,
        column,
        message,
        hint: Some(hint.into()),
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
    (line, column)
}

struct Validator<'a> {
    text: &'a str,
    errors: Vec<ConfigError>,
}

impl Validator<'_> {
    fn error<T>(&mut self, span: std::ops::Range<usize>, message: String, hint: &str) -> Option<T> {
        let (line, column) = line_col(self.text, span.start);
        self.errors.push(ConfigError {
            line,
            column,
            message,
            hint: Some(hint.to_string()),
        });
        None
    }

    fn config(&mut self, raw: RawConfig) -> Config {
        let hostname = match raw.hostname {
            Some(h) => {
                let name = h.get_ref().trim().to_ascii_lowercase();
                if baton_smtp::address::validate_domain(&name).is_err() || name.starts_with('[') {
                    self.error::<()>(
                        h.span(),
                        format!("hostname {:?} is not a valid host name", h.get_ref()),
                        "use the fully qualified name this server greets with, e.g. \"mx1.example.com\"",
                    );
                }
                name
            }
            None => default_hostname(),
        };
        let data_dir = raw
            .data_dir
            .map(|d| PathBuf::from(d.into_inner()))
            .unwrap_or_else(|| PathBuf::from("./baton-data"));
        let mut listeners: Vec<ListenerConfig> = raw
            .listener
            .into_iter()
            .filter_map(|l| self.listener(l))
            .collect();
        if listeners.is_empty() && self.errors.is_empty() {
            listeners.push(ListenerConfig {
                address: DEFAULT_LISTEN.parse().unwrap_or_else(|_| unreachable!()),
                role: Role::Mx,
            });
        }
        let relay = self.relay(raw.relay, &hostname);
        let limits = self.limits(raw.limits);
        let spool = SpoolConfig {
            fsync: raw.spool.fsync.unwrap_or(true),
            segment_size: raw
                .spool
                .segment_size
                .and_then(|s| self.size(s))
                .unwrap_or(64 << 20),
        };
        Config {
            hostname,
            data_dir,
            listeners,
            relay,
            limits,
            spool,
        }
    }

    fn listener(&mut self, raw: RawListener) -> Option<ListenerConfig> {
        let address = match raw.address.get_ref().parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => self.error(
                raw.address.span(),
                format!(
                    "listener address {:?} is not IP:port",
                    raw.address.get_ref()
                ),
                "write it as \"127.0.0.1:2525\" or \"[::1]:2525\"",
            ),
        };
        let role = match raw.role.as_ref().map(|r| r.get_ref().as_str()) {
            None | Some("mx") => Some(Role::Mx),
            Some("submission") => Some(Role::Submission),
            Some("submissions") => Some(Role::Submissions),
            Some(other) => {
                let span = raw.role.as_ref().map(|r| r.span()).unwrap_or(0..0);
                self.error(
                    span,
                    format!("unknown listener role {other:?}"),
                    "role is one of \"mx\", \"submission\" (587) or \"submissions\" (465, implicit TLS)",
                )
            }
        };
        for key in [&raw.tls_cert, &raw.tls_key].into_iter().flatten() {
            self.error::<()>(
                key.span(),
                "TLS is not available in this version of Baton".into(),
                "remove tls_cert/tls_key; STARTTLS and implicit TLS arrive with the \"Secure\" issue",
            );
        }
        if role == Some(Role::Submissions) && raw.tls_cert.is_none() {
            let span = raw.role.as_ref().map(|r| r.span()).unwrap_or(0..0);
            self.error::<()>(
                span,
                "role \"submissions\" needs implicit TLS, which this version cannot offer".into(),
                "use role \"submission\" or \"mx\" for now",
            );
        }
        Some(ListenerConfig {
            address: address?,
            role: role?,
        })
    }

    fn relay(&mut self, raw: RawRelay, hostname: &str) -> RelayConfig {
        let local_domains = match raw.local_domains {
            Some(list) => list
                .into_iter()
                .filter_map(|d| {
                    let name = d.get_ref().trim().to_ascii_lowercase();
                    if baton_smtp::address::validate_domain(&name).is_ok() {
                        Some(name)
                    } else {
                        self.error(
                            d.span(),
                            format!("local domain {:?} is not a valid domain", d.get_ref()),
                            "list bare domain names, e.g. [\"example.com\"]",
                        )
                    }
                })
                .collect(),
            None => vec![hostname.to_string(), "localhost".to_string()],
        };
        let networks = match raw.networks {
            Some(list) => list
                .into_iter()
                .filter_map(|n| {
                    parse_network(n.get_ref()).or_else(|| {
                        self.error(
                        n.span(),
                        format!("network {:?} is not an IP address or CIDR block", n.get_ref()),
                        "write networks as \"192.0.2.0/24\", \"2001:db8::/32\" or a single address",
                    )
                    })
                })
                .collect(),
            None => vec![
                "127.0.0.0/8".parse().unwrap_or_else(|_| unreachable!()),
                "::1/128".parse().unwrap_or_else(|_| unreachable!()),
            ],
        };
        RelayConfig {
            local_domains,
            networks,
        }
    }

    fn limits(&mut self, raw: RawLimits) -> Limits {
        let secs = |v: &mut Self, q: Option<Spanned<Quantity>>, default: u64| {
            q.and_then(|q| v.duration(q))
                .unwrap_or(Duration::from_secs(default))
        };
        let count = |v: &mut Self, n: Option<Spanned<u64>>, default: u64| match n {
            Some(n) if *n.get_ref() == 0 => v
                .error(
                    n.span(),
                    "this limit must be at least 1".into(),
                    "remove the key to get the default",
                )
                .unwrap_or(default),
            Some(n) => *n.get_ref(),
            None => default,
        };
        let max_line_length = count(self, raw.max_line_length, 2048);
        if max_line_length < 512 {
            self.errors.push(ConfigError {
                line: 0,
                column: 0,
                message: format!("max_line_length {max_line_length} is below 512"),
                hint: Some("RFC 5321 §4.5.3.1.4 requires at least 512 octets".into()),
            });
        }
        Limits {
            max_message_size: raw
                .max_message_size
                .and_then(|s| self.size(s))
                .unwrap_or(50 << 20),
            max_recipients: count(self, raw.max_recipients, 100) as usize,
            max_line_length: max_line_length as usize,
            max_errors: count(self, raw.max_errors, 10) as u32,
            idle_timeout: secs(self, raw.idle_timeout, 300),
            command_timeout: secs(self, raw.command_timeout, 60),
            data_timeout: secs(self, raw.data_timeout, 180),
            max_connections: count(self, raw.max_connections, 1000) as usize,
            max_connections_per_ip: count(self, raw.max_connections_per_ip, 50) as usize,
        }
    }

    fn duration(&mut self, q: Spanned<Quantity>) -> Option<Duration> {
        let parsed = match q.get_ref() {
            Quantity::Number(n) => Some(*n),
            Quantity::Text(t) => {
                parse_with_unit(t, &[("s", 1), ("m", 60), ("h", 3600), ("d", 86400)])
            }
        };
        match parsed {
            Some(0) | None => self.error(
                q.span(),
                "not a valid duration".into(),
                "write a positive number of seconds or a string such as \"30s\", \"5m\", \"1h\"",
            ),
            Some(secs) => Some(Duration::from_secs(secs)),
        }
    }

    fn size(&mut self, q: Spanned<Quantity>) -> Option<u64> {
        let parsed = match q.get_ref() {
            Quantity::Number(n) => Some(*n),
            Quantity::Text(t) => parse_with_unit(
                t,
                &[
                    ("B", 1),
                    ("KB", 1000),
                    ("KiB", 1 << 10),
                    ("MB", 1_000_000),
                    ("MiB", 1 << 20),
                    ("GB", 1_000_000_000),
                    ("GiB", 1 << 30),
                ],
            ),
        };
        match parsed {
            Some(0) | None => self.error(
                q.span(),
                "not a valid size".into(),
                "write a positive number of bytes or a string such as \"50MiB\", \"10MB\"",
            ),
            Some(n) => Some(n),
        }
    }
}

fn parse_with_unit(text: &str, units: &[(&str, u64)]) -> Option<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().ok()?;
    let unit = unit.trim();
    if unit.is_empty() {
        return Some(number);
    }
    let factor = units.iter().find(|(u, _)| *u == unit)?.1;
    number.checked_mul(factor)
}

fn parse_network(text: &str) -> Option<IpNet> {
    text.parse::<IpNet>()
        .ok()
        .or_else(|| text.parse::<std::net::IpAddr>().ok().map(IpNet::from))
}

fn default_hostname() -> String {
    let name = gethostname::gethostname()
        .to_string_lossy()
        .trim()
        .to_ascii_lowercase();
    if name.is_empty() || baton_smtp::address::validate_domain(&name).is_err() {
        "localhost".into()
    } else {
        name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_loopback_mx_relay() {
        let c = Config::defaults();
        assert_eq!(c.listeners.len(), 1);
        assert_eq!(c.listeners[0].address.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.listeners[0].role, Role::Mx);
        assert!(
            c.relay
                .networks
                .iter()
                .any(|n| n.contains(&"127.0.0.1".parse::<std::net::IpAddr>().unwrap()))
        );
        assert_eq!(c.data_dir, PathBuf::from("./baton-data"));
        assert_eq!(c.limits.max_recipients, 100);
        assert!(c.spool.fsync);
    }

    #[test]
    fn full_config() {
        let c = Config::parse(
            r#"
hostname = "mx.example.com"
data_dir = "/var/spool/baton"
[[listener]]
address = "127.0.0.1:25"
role = "mx"
[[listener]]
address = "[::1]:587"
role = "submission"
[relay]
local_domains = ["Example.com"]
networks = ["10.0.0.0/8", "192.0.2.7"]
[limits]
max_message_size = "10MB"
idle_timeout = "5m"
data_timeout = 60
"#,
        )
        .unwrap();
        assert_eq!(c.hostname, "mx.example.com");
        assert_eq!(c.listeners[1].role, Role::Submission);
        assert_eq!(c.relay.local_domains, vec!["example.com"]);
        assert_eq!(c.relay.networks.len(), 2);
        assert_eq!(c.limits.max_message_size, 10_000_000);
        assert_eq!(c.limits.idle_timeout, Duration::from_secs(300));
        assert_eq!(c.limits.data_timeout, Duration::from_secs(60));
    }

    #[test]
    fn every_semantic_error_is_reported_with_its_line() {
        let errors = Config::parse(
            "hostname = \"bad host\"\n[[listener]]\naddress = \"nowhere\"\nrole = \"smtp\"\n[relay]\nnetworks = [\"10.0.0.0/33\"]\n[limits]\nidle_timeout = \"5 parsecs\"\n",
        )
        .unwrap_err();
        let lines: Vec<usize> = errors.iter().map(|e| e.line).collect();
        assert_eq!(lines, vec![1, 3, 4, 6, 8], "{errors:?}");
        assert!(errors.iter().all(|e| e.hint.is_some()));
    }

    #[test]
    fn unknown_key_and_syntax_errors() {
        let e = Config::parse("hostname = \"a.b\"\n[limits]\nmax_recipient = 5\n").unwrap_err();
        assert_eq!(e[0].line, 3);
        assert!(e[0].message.contains("max_recipient"), "{}", e[0].message);
        let e = Config::parse("hostname = \n").unwrap_err();
        assert_eq!(e[0].line, 1);
    }
}
