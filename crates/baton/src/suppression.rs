//! The suppression list: addresses (or whole domains) that must not be mailed again, each in a
//! scope: everyone's mail (`global`), one tenant's (`tenant:NAME`) or one list or campaign's
//! (`list:NAME`). An entry says why (a hard bounce's class, `complaint`, `unsubscribe`,
//! `soft_bounces`, `manual`), which event caused it, since when, and until when if it expires.
//! The HTTP API's intake leaves suppressed recipients out and says which; each is a
//! `suppression` event. SMTP traffic is not filtered: an MX or relay passes on what it is given.
//!
//! Kept in `data_dir/suppressions.jsonl`, an append-only log of additions and removals that is
//! replayed at start. Owns that list and the soft-bounce counts (in memory) only.
//!
//! The set in memory changes at once (a suppressed address is refused from that moment); the
//! file is appended by a writer thread, in the order of the changes, so that no caller (the
//! queue manager's loop, an API request) waits on the disk.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock, mpsc};

use serde::{Deserialize, Serialize};

/// Addresses whose soft bounces are counted at once; past it, the oldest counts are dropped.
const MAX_SOFT_COUNTED: usize = 1_000_000;

/// Who an entry keeps mail from.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    Global,
    Tenant(String),
    /// A mailing list or campaign.
    List(String),
}

impl Scope {
    /// `global`, `tenant:NAME` or `list:NAME` (names in lower case).
    pub fn parse(text: &str) -> Result<Scope, String> {
        let text = text.trim();
        let named = |name: &str| {
            // A list may be a tenant's: "acme/spring".
            let ok = !name.is_empty()
                && name.len() <= 129
                && name.split('/').count() <= 2
                && name.split('/').all(|part| {
                    !part.is_empty()
                        && part.len() <= 64
                        && part
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
                });
            ok.then(|| name.to_ascii_lowercase()).ok_or_else(|| {
                format!("scope {text:?}: a name is up to 64 letters, digits, '-', '_' or '.'")
            })
        };
        if text.is_empty() || text.eq_ignore_ascii_case("global") {
            Ok(Scope::Global)
        } else if let Some(name) = text.strip_prefix("tenant:") {
            Ok(Scope::Tenant(named(name)?))
        } else if let Some(name) = text.strip_prefix("list:") {
            Ok(Scope::List(named(name)?))
        } else {
            Err(format!(
                "scope {text:?}: write global, tenant:NAME or list:NAME"
            ))
        }
    }

    /// The narrowest scope a message's tags give: its list (campaign), else its tenant, else
    /// global. What an unsubscribe applies to.
    pub fn narrowest(tenant: Option<&str>, campaign: Option<&str>) -> Scope {
        match (campaign, tenant) {
            (Some(c), _) if !c.is_empty() => Scope::list(tenant, c),
            (_, Some(t)) if !t.is_empty() => Scope::Tenant(t.to_ascii_lowercase()),
            _ => Scope::Global,
        }
    }

    /// Campaign `campaign`'s list: `list:TENANT/CAMPAIGN` for a tenant's (two tenants' lists
    /// of one name are not one list), `list:CAMPAIGN` without a tenant.
    pub fn list(tenant: Option<&str>, campaign: &str) -> Scope {
        let campaign = campaign.to_ascii_lowercase();
        match tenant.filter(|t| !t.is_empty()) {
            Some(t) => Scope::List(format!("{}/{campaign}", t.to_ascii_lowercase())),
            None => Scope::List(campaign),
        }
    }

    /// The tenant's scope when there is one, else global: what a complaint applies to.
    pub fn of_tenant(tenant: Option<&str>) -> Scope {
        match tenant {
            Some(t) if !t.is_empty() => Scope::Tenant(t.to_ascii_lowercase()),
            _ => Scope::Global,
        }
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scope::Global => f.write_str("global"),
            Scope::Tenant(t) => write!(f, "tenant:{t}"),
            Scope::List(l) => write!(f, "list:{l}"),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Entry {
    /// An address, or `@domain` for a whole domain; lower case.
    pub email: String,
    #[serde(default = "global")]
    pub scope: String,
    /// A bounce class (`invalid_recipient`, `bad_domain`), `complaint`, `unsubscribe`,
    /// `soft_bounces` or `manual` (older entries: the reply that caused them).
    pub reason: String,
    /// The reply or report text behind it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The event (or `api`, `import`) that added it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// RFC 3339.
    pub since: String,
    /// RFC 3339; none: kept until removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
}

fn global() -> String {
    "global".into()
}

impl Entry {
    /// A new entry from now on, with no detail, source or expiry.
    pub fn new(email: &str, scope: &Scope, reason: &str) -> Entry {
        Entry {
            email: normalise(email),
            scope: scope.to_string(),
            reason: reason.to_string(),
            detail: None,
            source: None,
            since: jiff::Timestamp::now().to_string(),
            expires: None,
        }
    }

    fn expired_at(&self, now: jiff::Timestamp) -> bool {
        self.expires
            .as_deref()
            .and_then(|e| e.parse::<jiff::Timestamp>().ok())
            .is_some_and(|e| e <= now)
    }
}

/// An address in the form the list keys it by: lower case; `*@d` and `@d` name domain `d`.
pub fn normalise(email: &str) -> String {
    let e = email.trim().to_ascii_lowercase();
    match e.strip_prefix('*') {
        Some(rest) if rest.starts_with('@') => rest.to_string(),
        _ => e,
    }
}

#[derive(Serialize, Deserialize)]
struct LogLine {
    #[serde(default)]
    removed: bool,
    #[serde(flatten)]
    entry: Entry,
}

type Key = (String, String);

fn key(email: &str, scope: &str) -> Key {
    (scope.to_string(), normalise(email))
}

/// What to list: every filter given must hold. Pages go by `(scope, email)` after `after`.
#[derive(Debug, Default)]
pub struct ListFilter {
    pub scope: Option<String>,
    pub reason: Option<String>,
    /// A substring of the address.
    pub email: Option<String>,
    /// `scope|email` of the last entry of the previous page.
    pub after: Option<String>,
    pub limit: usize,
}

pub struct Suppressions {
    path: PathBuf,
    entries: Mutex<HashMap<Key, Entry>>,
    soft: Mutex<HashMap<String, VecDeque<u64>>>,
    /// With `[cluster]`: where this node's own changes go, to be shared with the fleet.
    fleet: OnceLock<tokio::sync::mpsc::UnboundedSender<baton_cluster::FleetChange>>,
}

impl Suppressions {
    pub fn open(data_dir: &Path) -> std::io::Result<Suppressions> {
        let path = data_dir.join("suppressions.jsonl");
        // What an earlier handle on this file queued is in it before it is read.
        flush_writes();
        let mut entries = HashMap::new();
        end_torn_line(&path)?;
        if let Ok(text) = std::fs::read_to_string(&path) {
            for line in text.lines() {
                // A torn last line after a crash is skipped.
                let Ok(l) = serde_json::from_str::<LogLine>(line) else {
                    continue;
                };
                let k = key(&l.entry.email, &l.entry.scope);
                if l.removed {
                    entries.remove(&k);
                } else {
                    entries.insert(k, l.entry);
                }
            }
        }
        Ok(Suppressions {
            path,
            entries: Mutex::new(entries),
            soft: Mutex::new(HashMap::new()),
            fleet: OnceLock::new(),
        })
    }

    /// Whether the address is suppressed for everyone's mail.
    pub fn contains(&self, email: &str) -> bool {
        self.find(email, None, None).is_some()
    }

    /// The entry that keeps mail of `tenant` and list `campaign` from `email`, if any: the
    /// address or its domain, in the global, the tenant's or the list's scope; expired entries
    /// do not count.
    pub fn find(&self, email: &str, tenant: Option<&str>, campaign: Option<&str>) -> Option<Entry> {
        // Every outbound RCPT asks: an empty list answers without building any key.
        if self.lock().is_empty() {
            return None;
        }
        let email = normalise(email);
        let domain = email.rsplit_once('@').map(|(_, d)| format!("@{d}"));
        let mut scopes = vec![Scope::Global];
        scopes.extend(
            tenant
                .filter(|t| !t.is_empty())
                .map(|t| Scope::Tenant(t.to_ascii_lowercase())),
        );
        if let Some(c) = campaign.filter(|c| !c.is_empty()) {
            scopes.push(Scope::list(tenant, c));
        }
        let now = jiff::Timestamp::now();
        let entries = self.lock();
        scopes.iter().find_map(|scope| {
            let scope = scope.to_string();
            std::iter::once(&email)
                .chain(domain.as_ref())
                .filter_map(|e| entries.get(&(scope.clone(), e.clone())))
                .find(|entry| !entry.expired_at(now))
                .cloned()
        })
    }

    /// The live entry of exactly `email` in `scope`, if any.
    pub fn entry(&self, email: &str, scope: &Scope) -> Option<Entry> {
        let now = jiff::Timestamp::now();
        self.lock()
            .get(&key(email, &scope.to_string()))
            .filter(|e| !e.expired_at(now))
            .cloned()
    }

    /// Adds a manual global entry; false if the address was already there.
    pub fn add(&self, email: &str, reason: &str) -> bool {
        self.insert(Entry::new(email, &Scope::Global, reason))
    }

    /// From now on, every change made on this node goes to `fleet` too ([`Self::apply_from_fleet`]
    /// takes the other nodes' changes).
    pub fn share_with(
        &self,
        fleet: tokio::sync::mpsc::UnboundedSender<baton_cluster::FleetChange>,
    ) {
        let _ = self.fleet.set(fleet);
    }

    /// Another node's change, kept here without sharing it back.
    pub fn apply_from_fleet(&self, change: &baton_cluster::SuppressionChange) {
        let Ok(line) = serde_json::from_str::<LogLine>(&change.entry) else {
            tracing::warn!(key = %change.key, "an unreadable suppression entry from the fleet");
            return;
        };
        if change.removed || line.removed {
            self.remove_here(&line.entry.email, &line.entry.scope);
        } else if !line.entry.expired_at(jiff::Timestamp::now()) {
            // An expired one is not written here again at every catch-up.
            self.insert_here(line.entry);
        }
    }

    /// Adds an entry; false if its address was already suppressed in its scope (an expired
    /// entry is replaced).
    pub fn insert(&self, entry: Entry) -> bool {
        let shared = self.fleet.get().map(|_| entry.clone());
        let added = self.insert_here(entry);
        if added && let Some(entry) = shared {
            self.share(LogLine {
                removed: false,
                entry,
            });
        }
        added
    }

    fn insert_here(&self, entry: Entry) -> bool {
        let k = key(&entry.email, &entry.scope);
        let mut entries = self.lock();
        if entries
            .get(&k)
            .is_some_and(|e| !e.expired_at(jiff::Timestamp::now()))
        {
            return false;
        }
        self.append(&LogLine {
            removed: false,
            entry: entry.clone(),
        });
        entries.insert(k, entry);
        true
    }

    /// Removes a global entry; false if it was not there.
    pub fn remove(&self, email: &str) -> bool {
        self.remove_in(email, &Scope::Global)
    }

    /// Removes an entry of `scope`; false if it was not there.
    pub fn remove_in(&self, email: &str, scope: &Scope) -> bool {
        let Some(entry) = self.remove_here(email, &scope.to_string()) else {
            return false;
        };
        self.share(LogLine {
            removed: true,
            entry,
        });
        true
    }

    fn remove_here(&self, email: &str, scope: &str) -> Option<Entry> {
        let mut entries = self.lock();
        let entry = entries.remove(&key(email, scope))?;
        self.append(&LogLine {
            removed: true,
            entry: entry.clone(),
        });
        Some(entry)
    }

    /// Sends a change made here to the fleet, when there is one.
    fn share(&self, line: LogLine) {
        let Some(fleet) = self.fleet.get() else {
            return;
        };
        let Ok(entry) = serde_json::to_string(&line) else {
            return;
        };
        let _ = fleet.send(baton_cluster::FleetChange::Suppression(
            baton_cluster::SuppressionChange {
                key: format!("{}|{}", line.entry.scope, line.entry.email),
                entry,
                removed: line.removed,
            },
        ));
    }

    /// Every entry, by scope then address.
    pub fn list(&self) -> Vec<Entry> {
        self.page(&ListFilter {
            limit: usize::MAX,
            ..Default::default()
        })
    }

    /// One page of the entries that pass `filter`, by scope then address.
    pub fn page(&self, filter: &ListFilter) -> Vec<Entry> {
        let after = filter
            .after
            .as_deref()
            .and_then(|a| a.split_once('|'))
            .map(|(s, e)| (s.to_string(), e.to_string()));
        let entries = self.lock();
        let mut keys: Vec<&Key> = entries
            .iter()
            .filter(|(k, e)| {
                after.as_ref().is_none_or(|a| *k > a)
                    && filter.scope.as_deref().is_none_or(|s| e.scope == s)
                    && filter.reason.as_deref().is_none_or(|r| e.reason == r)
                    && filter
                        .email
                        .as_deref()
                        .is_none_or(|m| e.email.contains(&m.to_ascii_lowercase()))
            })
            .map(|(k, _)| k)
            .collect();
        keys.sort_unstable();
        keys.into_iter()
            .take(filter.limit)
            .filter_map(|k| entries.get(k).cloned())
            .collect()
    }

    /// Counts a soft bounce of `email` at `now_ms`; true when it makes `limit` within
    /// `window_ms` (the caller suppresses the address). In memory: a restart starts the
    /// counts again.
    pub fn soft_bounce(&self, email: &str, now_ms: u64, limit: u32, window_ms: u64) -> bool {
        if limit == 0 {
            return false;
        }
        let mut soft = self.soft.lock().unwrap_or_else(|e| e.into_inner());
        if soft.len() >= MAX_SOFT_COUNTED && !soft.contains_key(&normalise(email)) {
            let horizon = now_ms.saturating_sub(window_ms);
            soft.retain(|_, times| times.back().is_some_and(|&t| t > horizon));
            if soft.len() >= MAX_SOFT_COUNTED {
                return false;
            }
        }
        let times = soft.entry(normalise(email)).or_default();
        times.push_back(now_ms);
        let horizon = now_ms.saturating_sub(window_ms);
        while times.front().is_some_and(|&t| t <= horizon) || times.len() > limit as usize {
            times.pop_front();
        }
        let reached = times.len() >= limit as usize;
        if reached {
            soft.remove(&normalise(email));
        }
        reached
    }

    /// Queues a line for the file; called under the lock, so lines go in the order of the
    /// changes.
    fn append(&self, line: &LogLine) {
        let text = match serde_json::to_string(line) {
            Ok(text) => text + "\n",
            Err(e) => {
                tracing::error!(error = %e, "cannot write the suppression list");
                return;
            }
        };
        let write = Write::Append {
            path: self.path.clone(),
            text,
        };
        match writer() {
            Some(tx) => {
                if let Err(mpsc::SendError(write)) = tx.send(write) {
                    perform(write);
                }
            }
            None => perform(write),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Ends a last line torn by a crash with a newline, so that the next append starts a line of
/// its own (the torn line is skipped at replay; the next one must not be spoiled with it).
fn end_torn_line(path: &Path) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut file = match std::fs::OpenOptions::new()
        .read(true)
        .append(true)
        .open(path)
    {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if file.metadata()?.len() == 0 {
        return Ok(());
    }
    file.seek(SeekFrom::End(-1))?;
    let mut last = [0u8; 1];
    file.read_exact(&mut last)?;
    if last[0] != b'\n' {
        file.write_all(b"\n")?;
        file.sync_data()?;
    }
    Ok(())
}

/// What the writer thread does, in the order received.
enum Write {
    Append {
        path: PathBuf,
        text: String,
    },
    /// Answer once everything before is written.
    Flush(mpsc::Sender<()>),
}

/// One writer thread for the process's suppression files, started with the first change.
static WRITER: OnceLock<Option<mpsc::Sender<Write>>> = OnceLock::new();

fn writer() -> Option<&'static mpsc::Sender<Write>> {
    WRITER
        .get_or_init(|| {
            let (tx, rx) = mpsc::channel::<Write>();
            std::thread::Builder::new()
                .name("suppressions".into())
                .spawn(move || {
                    while let Ok(first) = rx.recv() {
                        // Whatever else is waiting goes in the same fdatasync.
                        let batch: Vec<Write> =
                            std::iter::once(first).chain(rx.try_iter()).collect();
                        perform_all(batch);
                    }
                })
                .map_err(|e| tracing::warn!(error = %e, "suppression writes are inline"))
                .ok()?;
            Some(tx)
        })
        .as_ref()
}

/// Waits until every change queued so far is in its file (nothing to wait for before the
/// writer has started). The server calls it as it stops.
pub fn flush_writes() {
    let Some(Some(tx)) = WRITER.get() else {
        return;
    };
    let (done, wait) = mpsc::channel();
    if tx.send(Write::Flush(done)).is_ok() {
        let _ = wait.recv();
    }
}

fn perform(write: Write) {
    perform_all(vec![write]);
}

/// Appends a batch of lines (each file opened once, fdatasynced once), then answers the
/// flushes in it: a flush answered means every change before it is on disk.
fn perform_all(batch: Vec<Write>) {
    let mut texts: Vec<(PathBuf, String)> = Vec::new();
    let mut flushes = Vec::new();
    for write in batch {
        match write {
            Write::Append { path, text } => match texts.iter_mut().find(|(p, _)| *p == path) {
                Some((_, all)) => all.push_str(&text),
                None => texts.push((path, text)),
            },
            Write::Flush(done) => flushes.push(done),
        }
    }
    for (path, text) in texts {
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut file| {
                std::io::Write::write_all(&mut file, text.as_bytes())?;
                file.sync_data()
            });
        if let Err(e) = written {
            tracing::error!(path = %path.display(), error = %e, "cannot write the suppression list");
        }
    }
    for done in flushes {
        let _ = done.send(());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let s = Suppressions::open(dir.path()).unwrap();
        assert!(s.add("Ann@Example.com", "5.1.1"));
        assert!(!s.add("ann@example.com", "again"));
        assert!(s.add("bob@example.com", "operator"));
        assert!(s.remove("BOB@example.com"));
        let s = Suppressions::open(dir.path()).unwrap();
        assert!(s.contains("ANN@example.com"));
        assert!(!s.contains("bob@example.com"));
        assert_eq!(s.list().len(), 1);
    }

    #[test]
    fn changes_reach_the_file_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let s = Suppressions::open(dir.path()).unwrap();
        for round in 0..50 {
            assert!(s.add("cy@example.com", &format!("round {round}")));
            assert!(s.contains("cy@example.com"), "refused at once");
            assert!(s.remove("cy@example.com"));
        }
        assert!(s.add("cy@example.com", "last"));
        let reopened = Suppressions::open(dir.path()).unwrap();
        assert_eq!(reopened.list().len(), 1);
        assert_eq!(reopened.list()[0].reason, "last");
        let text = std::fs::read_to_string(dir.path().join("suppressions.jsonl")).unwrap();
        assert_eq!(text.lines().count(), 101);
        assert!(text.lines().all(|l| l.starts_with('{') && l.ends_with('}')));
    }

    #[test]
    fn scopes_domains_and_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let s = Suppressions::open(dir.path()).unwrap();
        let list = Scope::parse("list:Spring").unwrap();
        assert!(s.insert(Entry::new("ann@example.com", &list, "unsubscribe")));
        assert!(s.find("ann@example.com", None, Some("spring")).is_some());
        assert!(
            s.find("ann@example.com", Some("acme"), Some("autumn"))
                .is_none()
        );
        assert!(!s.contains("ann@example.com"), "only that list");
        let tenant = Scope::parse("tenant:acme").unwrap();
        assert!(s.insert(Entry::new("*@Dead.example", &tenant, "manual")));
        assert!(s.find("x@dead.example", Some("acme"), None).is_some());
        assert!(s.find("x@dead.example", Some("other"), None).is_none());
        let mut gone = Entry::new("old@example.com", &Scope::Global, "manual");
        gone.expires = Some("2020-01-01T00:00:00Z".into());
        assert!(s.insert(gone));
        assert!(!s.contains("old@example.com"), "expired");
        assert!(
            s.add("old@example.com", "manual"),
            "an expired entry is replaced"
        );
        let reopened = Suppressions::open(dir.path()).unwrap();
        assert_eq!(reopened.list().len(), 3);
        assert!(reopened.remove_in("ann@example.com", &list));
        assert!(!reopened.remove_in("ann@example.com", &list));
        for bad in ["tenant:", "list:a b", "team:x"] {
            assert!(Scope::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn an_expired_address_entry_hides_no_domain_entry_and_torn_lines_end() {
        let dir = tempfile::tempdir().unwrap();
        let s = Suppressions::open(dir.path()).unwrap();
        let mut gone = Entry::new("ann@x.example", &Scope::Global, "manual");
        gone.expires = Some("2020-01-01T00:00:00Z".into());
        assert!(s.insert(gone));
        assert!(s.insert(Entry::new("@x.example", &Scope::Global, "bad_domain")));
        assert_eq!(
            s.find("ann@x.example", None, None).unwrap().email,
            "@x.example"
        );
        // Two tenants' lists of one name are two lists.
        let acme = Scope::narrowest(Some("acme"), Some("news"));
        assert_eq!(acme.to_string(), "list:acme/news");
        assert!(s.insert(Entry::new("bo@y.example", &acme, "unsubscribe")));
        assert!(s.find("bo@y.example", Some("acme"), Some("news")).is_some());
        assert!(
            s.find("bo@y.example", Some("other"), Some("news"))
                .is_none()
        );
        assert_eq!(Scope::parse("list:acme/news"), Ok(acme));
        assert!(Scope::parse("list:a/b/c").is_err() && Scope::parse("list:/b").is_err());
        flush_writes();
        // A crash tore the last line: the next addition still reads back.
        let path = dir.path().join("suppressions.jsonl");
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        std::io::Write::write_all(&mut file, b"{\"email\":\"torn").unwrap();
        drop(file);
        let s = Suppressions::open(dir.path()).unwrap();
        assert!(s.add("cy@z.example", "manual"));
        flush_writes();
        let s = Suppressions::open(dir.path()).unwrap();
        assert!(s.contains("cy@z.example"));
    }

    #[test]
    fn pages_follow_on() {
        let dir = tempfile::tempdir().unwrap();
        let s = Suppressions::open(dir.path()).unwrap();
        for i in 0..25 {
            s.add(&format!("u{i:02}@example.com"), "manual");
        }
        let mut filter = ListFilter {
            limit: 10,
            ..Default::default()
        };
        let mut seen = Vec::new();
        loop {
            let page = s.page(&filter);
            let Some(last) = page.last() else { break };
            filter.after = Some(format!("{}|{}", last.scope, last.email));
            seen.extend(page.into_iter().map(|e| e.email));
        }
        assert_eq!(seen.len(), 25);
        assert_eq!(seen[0], "u00@example.com");
        assert_eq!(seen[24], "u24@example.com");
    }

    #[test]
    fn soft_bounces_count_within_their_window() {
        let dir = tempfile::tempdir().unwrap();
        let s = Suppressions::open(dir.path()).unwrap();
        let day = 86_400_000;
        assert!(!s.soft_bounce("a@x.example", 0, 3, 7 * day));
        assert!(!s.soft_bounce("a@x.example", 3 * day, 3, 7 * day));
        // The first has left the window by day 8.
        assert!(!s.soft_bounce("a@x.example", 8 * day, 3, 7 * day));
        assert!(s.soft_bounce("A@x.example", 9 * day, 3, 7 * day));
        // Counting starts again after a verdict; a limit of 0 never suppresses.
        assert!(!s.soft_bounce("a@x.example", 9 * day, 3, 7 * day));
        assert!(!s.soft_bounce("b@x.example", 0, 0, day));
    }
}
