//! Configuration errors in a user's words: the key, where its value came from (the file,
//! or the environment variable that set it), what is wrong, and an example of a right
//! value. The `config` and `serde` crates describe problems in terms of Rust types
//! (`enum WarehouseKind does not have variant constructor snowflake`, `data did not match
//! any variant of untagged enum KeySpec`); this module translates them.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use serde::de::DeserializeOwned;

use super::{DEFAULT_TOML, ENV_PREFIX, LogFormat, WarehouseKind};
use crate::schema::policy::{
    IncompatiblePolicy, NewColumnPolicy, NewTablePolicy, PolicyPreset, RemovedColumnPolicy,
    WideningPolicy,
};

/// A configuration that cannot be used. `key` is the dotted path of the offending value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub key: Option<String>,
    pub message: String,
    /// Where the value came from, when known: `in my.toml`, or `set by the environment
    /// variable CDC_WORKER__WORKER__CONCURRENCY`.
    pub origin: Option<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("invalid configuration: ")?;
        match (&self.key, &self.origin) {
            (Some(key), Some(origin)) => write!(f, "`{key}` ({origin}): ")?,
            (Some(key), None) => write!(f, "`{key}`: ")?,
            (None, Some(origin)) => write!(f, "({origin}) ")?,
            (None, None) => {}
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

/// The environment variables of the configuration, by the dotted key they set.
#[derive(Debug, Default, Clone)]
pub struct EnvKeys(HashMap<String, String>);

impl EnvKeys {
    /// `CDC_WORKER__WORKER__CONCURRENCY` sets `worker.concurrency` (keys are lower-cased,
    /// as the `config` crate does).
    pub fn new<'a>(names: impl IntoIterator<Item = &'a String>) -> Self {
        let prefix = format!("{ENV_PREFIX}__");
        Self(
            names
                .into_iter()
                .filter_map(|name| {
                    let rest = name.strip_prefix(&prefix)?;
                    Some((rest.replace("__", ".").to_lowercase(), name.clone()))
                })
                .collect(),
        )
    }

    fn variable(&self, key: &str) -> Option<&str> {
        self.0.get(&key.to_lowercase()).map(String::as_str)
    }
}

impl ConfigError {
    pub fn at(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: Some(key.into()),
            message: message.into(),
            origin: None,
        }
    }

    pub(super) fn file(path: &Path, message: &str) -> Self {
        Self {
            key: None,
            message: format!("{}: {message}", path.display()),
            origin: None,
        }
    }

    /// Names the origin of the offending value: the environment variable that set the key
    /// (it wins over the file), else the file.
    pub(super) fn with_origin(mut self, file: Option<&Path>, env: &EnvKeys) -> Self {
        if self.origin.is_some() {
            return self;
        }
        let variable = self.key.as_deref().and_then(|k| env.variable(k));
        self.origin = match (variable, file) {
            (Some(var), _) => Some(format!("set by the environment variable {var}")),
            (None, Some(path)) if self.key.is_some() => Some(format!("in {}", path.display())),
            _ => None,
        };
        self
    }

    /// Translates an error of the `config` crate (or of serde under it). `layered` is the
    /// merged configuration, to quote the offending value.
    pub(super) fn from_config_crate(
        file: Option<&Path>,
        env: &EnvKeys,
        layered: Option<&::config::Config>,
        e: ::config::ConfigError,
    ) -> Self {
        use ::config::ConfigError as E;
        let (key, core) = match &e {
            E::Type {
                key,
                unexpected,
                expected,
                ..
            } => (
                key.clone(),
                format!("invalid type: {unexpected}, expected {expected}"),
            ),
            E::At { key, error, .. } => (key.clone(), error.to_string()),
            E::FileParse { uri, cause } => {
                let at = uri
                    .as_deref()
                    .map(|u| format!(" in {u}"))
                    .unwrap_or_default();
                return Self {
                    key: None,
                    message: format!("{}{at}", cause.to_string().trim_end()),
                    origin: None,
                };
            }
            other => (None, other.to_string()),
        };
        let raw = |k: &str| layered.and_then(|c| c.get_string(k).ok());
        let (key, message) = translate(key, &core, raw);
        Self {
            key,
            message,
            origin: None,
        }
        .with_origin(file, env)
    }
}

/// The key an error is about, and what to tell the user.
fn translate(
    key: Option<String>,
    core: &str,
    raw: impl Fn(&str) -> Option<String>,
) -> (Option<String>, String) {
    if let Some(field) = between(core, "unknown field `", "`") {
        let full = match &key {
            Some(parent) => format!("{parent}.{field}"),
            None => field.to_string(),
        };
        let known = backticked(core.split_once("expected").map_or("", |(_, r)| r));
        return (Some(full), unknown_key(field, key.as_deref(), &known));
    }
    let Some(key) = key else {
        return (None, core.to_string());
    };
    let leaf = key.rsplit('.').next().unwrap_or(&key).to_string();
    let message = if let Some(value) = between(core, "does not have variant constructor ", " ")
        .or_else(|| core.split("does not have variant constructor ").nth(1))
    {
        let values = valid_values(&key).unwrap_or_default();
        let example = example(&key)
            .or_else(|| values.first().map(|v| format!("{leaf} = \"{v}\"")))
            .unwrap_or_default();
        format!(
            "`{value}` is not a valid value; valid values: {} (example: {example})",
            values.join(", ")
        )
    } else if core.contains("untagged enum KeySpec") {
        "must be a column name or a list of column names, for example key = \"id\" or key = [\"order_id\", \"line_no\"] (key = [] means no key: rows are appended)".to_string()
    } else if core.contains("expected a duration") {
        let value = between(core, "string \"", "\"")
            .map(str::to_string)
            .or_else(|| raw(&key))
            .unwrap_or_default();
        format!(
            "`{value}` is not a duration; write a number with a unit: ms, s, m or h (example: {})",
            example(&key).unwrap_or_else(|| format!("{leaf} = \"30s\""))
        )
    } else if core.contains("invalid socket address") {
        format!(
            "`{}` is not an IP address with a port (example: {leaf} = \"0.0.0.0:9090\", or \"127.0.0.1:9090\" for this host only)",
            raw(&key).unwrap_or_default()
        )
    } else if let Some(rest) = core.strip_prefix("invalid type: ") {
        let (found, expected) = rest
            .split_once(", expected ")
            .unwrap_or((rest, "another type"));
        let expected = match expected {
            "an integer" | "u32" | "u64" | "usize" | "i32" | "i64" => "a whole number",
            "a boolean" => "true or false",
            other => other,
        };
        let found = found
            .strip_prefix("string ")
            .map(|s| format!("the text {s}"))
            .unwrap_or_else(|| found.to_string());
        match example(&key) {
            Some(ex) => format!("expected {expected}, found {found} (example: {ex})"),
            None => format!("expected {expected}, found {found}"),
        }
    } else {
        match example(&key) {
            Some(ex) => format!("{core} (example: {ex})"),
            None => core.to_string(),
        }
    };
    (Some(key), message)
}

fn unknown_key(field: &str, parent: Option<&str>, known: &[String]) -> String {
    let known_here = match parent {
        Some(p) => format!("the keys of [{p}] are"),
        None => "the sections are".to_string(),
    };
    let suggestion = known
        .iter()
        .map(|k| (edit_distance(field, k), k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 4))
        .min()
        .map(|(_, k)| format!(" (did you mean `{k}`?)"))
        .unwrap_or_default();
    if known.is_empty() {
        format!("unknown key{suggestion}")
    } else {
        format!(
            "unknown key{suggestion}; {known_here}: {}",
            known.join(", ")
        )
    }
}

/// The values an enum-valued key takes, read from the type itself (a serde error lists
/// them), so they cannot drift from the code.
fn valid_values(key: &str) -> Option<Vec<String>> {
    fn variants<T: DeserializeOwned>() -> Vec<String> {
        match serde_json::from_value::<T>(serde_json::Value::String("\u{1}".into())) {
            Ok(_) => vec![],
            Err(e) => {
                let text = e.to_string();
                backticked(text.split_once("expected").map_or("", |(_, r)| r))
            }
        }
    }
    let leaf = key.rsplit('.').next()?;
    Some(match (key, leaf) {
        ("warehouse.kind", _) => variants::<WarehouseKind>(),
        ("telemetry.log_format", _) => variants::<LogFormat>(),
        (_, "preset") => variants::<PolicyPreset>(),
        (_, "new_table") => variants::<NewTablePolicy>(),
        (_, "new_column") => variants::<NewColumnPolicy>(),
        (_, "removed_column") => variants::<RemovedColumnPolicy>(),
        (_, "widening") => variants::<WideningPolicy>(),
        (_, "incompatible") => variants::<IncompatiblePolicy>(),
        (_, "reload") => variants::<super::ReloadPolicy>(),
        ("history.default", _) | (_, "history") => variants::<super::HistoryMode>(),
        _ => return None,
    })
}

/// `leaf = default` from config/default.toml, the defaults layer.
fn example(key: &str) -> Option<String> {
    let defaults: toml::Table = DEFAULT_TOML.parse().ok()?;
    let mut value = None::<&toml::Value>;
    for part in key.split('.') {
        value = match value {
            None => defaults.get(part),
            Some(v) => v.get(part),
        };
        value?;
    }
    let value = value?;
    if value.is_table() {
        return None;
    }
    let leaf = key.rsplit('.').next()?;
    Some(format!("{leaf} = {value}"))
}

fn between<'a>(text: &'a str, start: &str, end: &str) -> Option<&'a str> {
    let rest = &text[text.find(start)? + start.len()..];
    Some(&rest[..rest.find(end)?])
}

/// Every `quoted` word of a text.
fn backticked(text: &str) -> Vec<String> {
    text.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut previous = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let current = row[j + 1];
            row[j + 1] = if ca == *cb {
                previous
            } else {
                1 + previous.min(row[j]).min(row[j + 1])
            };
            previous = current;
        }
    }
    row[b.len()]
}
