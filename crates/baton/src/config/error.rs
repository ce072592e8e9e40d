//! What a config file's problems look like to the operator: one [`ConfigError`] per problem
//! (line, column, message, hint) and [`ConfigErrors`] for a whole file.
//!
//! Owns only the report's shape and wording of its frame; the messages come from the
//! validators and the file checks.

use std::fmt;
use std::path::PathBuf;

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
