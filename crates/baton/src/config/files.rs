//! The files a config names, and the one step that reads them: [`Config::check_files`].
//!
//! Validation only records each file with the line naming it; this module opens them (TLS
//! certificates and keys, the CA file, DKIM keys) the way serving will, and reports each
//! problem at that line with the loader's own message. It must not validate anything else;
//! the users file is left to AUTH, which reads it when used.

use std::path::PathBuf;

use super::{Config, ConfigError};

/// A file that serving reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigFile {
    /// A listener's certificate chain and private key (PEM).
    ListenerTls { cert: PathBuf, key: PathBuf },
    /// `[delivery] tls_ca_file`: extra trust anchors (PEM).
    CaFile(PathBuf),
    /// A `[[dkim]]` signing key (PEM).
    DkimKey {
        domain: String,
        selector: String,
        key: PathBuf,
    },
}

/// A file and where the config names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedFile {
    pub file: ConfigFile,
    pub line: usize,
    pub column: usize,
    /// How many validation errors came before it, so that [`Config::load`] reports the file's
    /// problems among the others in the order of the sections.
    after_errors: usize,
}

impl NamedFile {
    pub(super) fn new(file: ConfigFile, line: usize, column: usize, after_errors: usize) -> Self {
        NamedFile {
            file,
            line,
            column,
            after_errors,
        }
    }

    /// Reads the file as serving will; the problem, at the line naming it, if it is unusable.
    fn check(&self) -> Option<ConfigError> {
        let (result, hint) = match &self.file {
            ConfigFile::ListenerTls { cert, key } => (
                baton_tls::server::check(cert, key),
                "tls_cert is the PEM chain (server certificate first), tls_key its PEM private key",
            ),
            ConfigFile::CaFile(path) => (
                baton_tls::trust::load_roots(path).map(|_| ()),
                "tls_ca_file is a PEM file of CA certificates",
            ),
            ConfigFile::DkimKey {
                domain,
                selector,
                key,
            } => (
                crate::dkim::DkimKey::load(domain, selector, key).map(|_| ()),
                "make one with `baton dkim keygen DOMAIN SELECTOR`",
            ),
        };
        let message = result.err()?;
        Some(ConfigError {
            line: self.line,
            column: self.column,
            message,
            hint: Some(hint.into()),
        })
    }
}

impl Config {
    /// Reads every certificate, key and CA file the config names (`Config::parse` opens none)
    /// and reports each that serving could not use, at the line naming it.
    pub fn check_files(&self) -> Result<(), Vec<ConfigError>> {
        let errors: Vec<ConfigError> = self.files.iter().filter_map(NamedFile::check).collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }
}

/// Validation's errors with the problems of `files` among them, each where validation named
/// the file: one list in the order of the sections.
pub(super) fn with_file_problems(
    errors: Vec<ConfigError>,
    files: &[NamedFile],
) -> Vec<ConfigError> {
    let mut found = files
        .iter()
        .filter_map(|f| Some((f.after_errors, f.check()?)))
        .peekable();
    let mut all = Vec::with_capacity(errors.len());
    for (i, error) in errors.into_iter().enumerate() {
        while let Some((_, problem)) = found.next_if(|(after, _)| *after <= i) {
            all.push(problem);
        }
        all.push(error);
    }
    all.extend(found.map(|(_, problem)| problem));
    all
}
