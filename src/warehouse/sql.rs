//! The only way names and values reach SQL text. Both warehouses use standard quoting:
//! identifiers in double quotes (`""` escapes one), strings in single quotes (`''`), and
//! backslashes are literal in both.

use std::fmt::Write;

/// A name that cannot be put into a statement.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    #[error("empty name")]
    Empty,
    #[error("name `{0}` contains a NUL or control character")]
    ControlCharacter(String),
    #[error("name `{name}` is longer than {max} bytes")]
    TooLong { name: String, max: usize },
}

/// Checks a table or column name once, where it enters the worker (a key, a footer).
/// Everything printable is allowed: quoting makes it safe.
pub fn check_name(name: &str, max_len: usize) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.chars().any(char::is_control) {
        return Err(NameError::ControlCharacter(name.escape_debug().to_string()));
    }
    if name.len() > max_len {
        return Err(NameError::TooLong {
            name: name.to_string(),
            max: max_len,
        });
    }
    Ok(())
}

/// Quotes an identifier.
pub fn ident(name: &str) -> String {
    debug_assert!(!name.contains('\0'), "identifier with NUL reached SQL");
    let mut out = String::with_capacity(name.len() + 2);
    out.push('"');
    for c in name.chars() {
        if c == '"' {
            out.push('"');
        }
        if c != '\0' {
            out.push(c);
        }
    }
    out.push('"');
    out
}

/// `"schema"."table"`.
pub fn qualified(schema: &str, table: &str) -> String {
    format!("{}.{}", ident(schema), ident(table))
}

/// A string literal.
pub fn literal(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('\'');
    for c in value.chars() {
        if c == '\'' {
            out.push('\'');
        }
        if c != '\0' {
            out.push(c);
        }
    }
    out.push('\'');
    out
}

/// `"a", "b", "c"`, each name quoted.
pub fn ident_list<'a>(names: impl IntoIterator<Item = &'a str>) -> String {
    let mut out = String::new();
    for (i, n) in names.into_iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        let _ = write!(out, "{}", ident(n));
    }
    out
}

/// How many key values appear in more than one row of `target` (both dialects).
pub fn repeated_keys_query(target: &str, key: &[String]) -> String {
    let columns = ident_list(key.iter().map(String::as_str));
    format!(
        "SELECT count(*) FROM (SELECT {columns} FROM {target} GROUP BY {columns} HAVING count(*) > 1) AS repeated"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_neutralises_hostile_names() {
        assert_eq!(ident("plain"), "\"plain\"");
        assert_eq!(ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(
            ident("x\"; DROP TABLE t; --"),
            "\"x\"\"; DROP TABLE t; --\""
        );
        assert_eq!(literal("O'Brien\\"), "'O''Brien\\'");
        assert_eq!(qualified("s", "t\""), "\"s\".\"t\"\"\"");
        assert_eq!(ident_list(["a", "b"]), "\"a\", \"b\"");
    }

    #[test]
    fn names_are_checked_where_they_enter() {
        assert!(check_name("ok name é", 255).is_ok());
        assert_eq!(check_name("", 255), Err(NameError::Empty));
        assert!(matches!(
            check_name("a\0b", 255),
            Err(NameError::ControlCharacter(_))
        ));
        assert!(matches!(
            check_name(&"x".repeat(300), 255),
            Err(NameError::TooLong { .. })
        ));
    }
}
