//! The feature floor: the oldest Firebolt engine the worker's statements run on. Read once
//! per process (in `check-connection` and before the first batch), so that an engine too
//! old for MERGE or explicit transactions is refused with a message that names both
//! versions, instead of failing at the first MERGE or BEGIN.
//!
//! Sources: MERGE and explicit multi-statement transactions were announced in September
//! 2025 (Firebolt's blog posts of 15 September 2025); neither is in the 2024 or April 2025
//! docs. CREATE SCHEMA appears only in the current docs; ALTER TABLE .. RENAME TO needs
//! 4.10 (2025 ALTER TABLE reference). The oldest release that can be dated after all of
//! them is Firebolt Core 4.28 (its changelog: 4.28.28, December 2025), so the floor is
//! 4.28: conservative, as no source names the first version with MERGE.
//!
//! How the version is read: `SELECT version()` (UNCONFIRMED: PostgreSQL's function, not in
//! Firebolt's function reference), else, on Cloud, the documented
//! `information_schema.engines.version` of the engine. A version that cannot be read is
//! logged and not refused: the statements themselves then say what is missing.

use std::fmt;

/// The oldest engine version the worker supports.
pub const FLOOR: EngineVersion = EngineVersion {
    major: 4,
    minor: 28,
    patch: 0,
};

/// What the floor is for, in the refusal message.
pub const FLOOR_FEATURES: &str =
    "MERGE, explicit transactions, CREATE SCHEMA and ALTER TABLE .. RENAME TO";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct EngineVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl fmt::Display for EngineVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

pub const VERSION_QUERY: &str = "SELECT version()";

/// The documented fallback on Cloud: the version column of the engine's row.
pub fn engines_query(engine: &str) -> String {
    format!(
        "SELECT version FROM information_schema.engines WHERE engine_name = {}",
        crate::warehouse::sql::literal(engine)
    )
}

/// The first `major.minor[.patch]` in a version text (`4.28.28-0.20251208095930.8ab5df`,
/// `Firebolt 4.30.1`, ...).
pub fn parse(text: &str) -> Option<EngineVersion> {
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i].is_ascii_digit()
            && (i == 0 || !(bytes[i - 1].is_ascii_digit() || bytes[i - 1] == b'.'))
        {
            let rest = &text[i..];
            let end = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .unwrap_or(rest.len());
            let mut parts = rest[..end]
                .split('.')
                .filter(|p| !p.is_empty())
                .map(|p| p.parse::<u32>());
            if let (Some(Ok(major)), Some(Ok(minor))) = (parts.next(), parts.next()) {
                let patch = parts.next().and_then(Result::ok).unwrap_or(0);
                return Some(EngineVersion {
                    major,
                    minor,
                    patch,
                });
            }
            i += end.max(1);
        } else {
            i += 1;
        }
    }
    None
}

/// `Err` with the refusal when `found` is below the floor.
pub fn check(found: EngineVersion, text: &str) -> Result<(), String> {
    if found >= FLOOR {
        return Ok(());
    }
    Err(format!(
        "the Firebolt engine is version {found} (`{}`), older than {}.{}, the oldest this worker supports ({FLOOR_FEATURES}); upgrade the engine (docs/firebolt.md, \"Feature floor\")",
        text.trim(),
        FLOOR.major,
        FLOOR.minor
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_read_from_what_engines_print() {
        let v = |major, minor, patch| EngineVersion {
            major,
            minor,
            patch,
        };
        assert_eq!(
            parse("4.28.28-0.20251208095930.8ab5df819266"),
            Some(v(4, 28, 28))
        );
        assert_eq!(parse("Firebolt 4.30"), Some(v(4, 30, 0)));
        assert_eq!(parse("v4.7.3"), Some(v(4, 7, 3)));
        assert_eq!(parse("no version here"), None);
        assert!(check(v(4, 28, 0), "4.28.0").is_ok());
        assert!(check(v(5, 0, 1), "5.0.1").is_ok());
        let refusal = check(v(4, 7, 3), "4.7.3").unwrap_err();
        assert!(
            refusal.contains("version 4.7.3") && refusal.contains("older than 4.28"),
            "{refusal}"
        );
        assert!(refusal.contains("MERGE"), "{refusal}");
    }
}
