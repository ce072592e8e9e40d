//! Submission users: a file of `name:argon2-hash` lines (`baton user add` writes it), password
//! checks, SASL PLAIN and LOGIN decoding, and the per-address limit on failed attempts.
//!
//! Owns credentials only; the session decides when AUTH is allowed (after TLS) and what an
//! authenticated user may send.

use std::collections::HashMap;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use base64::Engine;

/// The users file, re-read when it changes on disk (so `baton user add` needs no restart).
pub struct Users {
    path: PathBuf,
    cached: Mutex<(Option<SystemTime>, HashMap<String, String>)>,
}

impl Users {
    pub fn new(path: &Path) -> Users {
        Users {
            path: path.to_path_buf(),
            cached: Mutex::new((None, HashMap::new())),
        }
    }

    fn current(&self) -> HashMap<String, String> {
        let mtime = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .ok();
        let mut cached = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        if cached.0 != mtime || mtime.is_none() {
            cached.1 = read_users(&self.path).unwrap_or_default();
            cached.0 = mtime;
        }
        cached.1.clone()
    }

    /// Checks a password. Slow on purpose (argon2): call it off the async threads.
    pub fn verify(&self, user: &str, password: &str) -> bool {
        let users = self.current();
        let hash = users.get(&user.to_ascii_lowercase());
        // An unknown user costs as much as a wrong password, so timing tells nothing.
        let phc = hash.map(String::as_str).unwrap_or(DUMMY_HASH);
        let ok = PasswordHash::new(phc)
            .map(|h| {
                Argon2::default()
                    .verify_password(password.as_bytes(), &h)
                    .is_ok()
            })
            .unwrap_or(false);
        ok && hash.is_some()
    }
}

/// argon2id of an unguessable password, for timing-equal failures on unknown users.
const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$3LgUX1M1xpGxrByxB9tU5TgMLcBCZqpb7ywC7BkGfNE";

fn read_users(path: &Path) -> std::io::Result<HashMap<String, String>> {
    let text = std::fs::read_to_string(path)?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once(':'))
        .map(|(name, hash)| (name.trim().to_ascii_lowercase(), hash.trim().to_string()))
        .collect())
}

/// Adds or replaces `name` in the users file with an argon2id hash of `password`.
pub fn add_user(path: &Path, name: &str, password: &str) -> anyhow::Result<()> {
    let name = name.trim().to_ascii_lowercase();
    if name.is_empty() || name.contains(':') || name.chars().any(char::is_whitespace) {
        anyhow::bail!(
            "user name {name:?}: no spaces or ':' (use the address, e.g. alice@example.com)"
        );
    }
    if password.is_empty() {
        anyhow::bail!("empty password: give it on standard input");
    }
    let salt_bytes: [u8; 16] = rand::random();
    let salt = SaltString::encode_b64(&salt_bytes).map_err(|e| anyhow::anyhow!("salt: {e}"))?;
    let hash = Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map_err(|e| anyhow::anyhow!("hashing failed: {e}"))?
        .to_string();
    let mut users: Vec<(String, String)> = match std::fs::read_to_string(path) {
        Ok(text) => text
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(n, h)| (n.trim().to_string(), h.trim().to_string()))
            .filter(|(n, _)| !n.eq_ignore_ascii_case(&name))
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    users.push((name, hash));
    let text: String = users.iter().map(|(n, h)| format!("{n}:{h}\n")).collect();
    write_private(path, text.as_bytes())?;
    Ok(())
}

/// Writes a file only its owner can read: a temporary file, fsynced, renamed into place.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// SASL PLAIN (RFC 4616): base64 of `authzid NUL authcid NUL password` → (user, password).
pub fn decode_plain(b64: &str) -> Option<(String, String)> {
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()?;
    let mut parts = raw.split(|&b| b == 0);
    let authzid = parts.next()?;
    let user = String::from_utf8(parts.next()?.to_vec()).ok()?;
    let password = String::from_utf8(parts.next()?.to_vec()).ok()?;
    if parts.next().is_some() || user.is_empty() {
        return None;
    }
    // Acting for someone else is not allowed.
    if !authzid.is_empty() && !authzid.eq_ignore_ascii_case(user.as_bytes()) {
        return None;
    }
    Some((user, password))
}

pub fn decode_b64_text(b64: &str) -> Option<String> {
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()?;
    String::from_utf8(raw).ok()
}

/// Failed AUTH attempts per client address: past the limit within the window, AUTH is refused
/// for the rest of it.
#[derive(Default)]
pub struct FailureLimiter {
    seen: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

const FAILURE_WINDOW: Duration = Duration::from_secs(600);
pub const MAX_FAILURES: u32 = 5;

impl FailureLimiter {
    pub fn blocked(&self, ip: IpAddr) -> bool {
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.get(&ip)
            .is_some_and(|(start, n)| start.elapsed() < FAILURE_WINDOW && *n >= MAX_FAILURES)
    }

    pub fn failed(&self, ip: IpAddr) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let entry = seen.entry(ip).or_insert((Instant::now(), 0));
        if entry.0.elapsed() >= FAILURE_WINDOW {
            *entry = (Instant::now(), 0);
        }
        entry.1 += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_decoding() {
        let b64 = |s: &[u8]| base64::engine::general_purpose::STANDARD.encode(s);
        assert_eq!(
            decode_plain(&b64(b"\0alice@example.com\0secret")),
            Some(("alice@example.com".into(), "secret".into()))
        );
        assert!(
            decode_plain(&b64(b"bob\0alice\0secret")).is_none(),
            "no proxy authorization"
        );
        assert!(decode_plain(&b64(b"alice\0secret")).is_none());
        assert!(decode_plain("!!").is_none());
    }

    #[test]
    fn users_file_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users");
        add_user(&path, "Alice@Example.com", "correct horse").unwrap();
        add_user(&path, "bob@example.com", "battery").unwrap();
        add_user(&path, "alice@example.com", "staple").unwrap();
        let users = Users::new(&path);
        assert!(users.verify("alice@example.com", "staple"));
        assert!(
            !users.verify("alice@example.com", "correct horse"),
            "replaced"
        );
        assert!(users.verify("bob@example.com", "battery"));
        assert!(!users.verify("carol@example.com", "battery"));
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 2);
        assert!(text.contains("$argon2id$"));
    }
}
