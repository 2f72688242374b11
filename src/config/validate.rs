//! Validation of a loaded [`Config`]: every error names the key it is about.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use super::{Config, WarehouseKind};

/// A configuration that cannot be used. `key` is the dotted path of the offending value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub key: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.key {
            Some(key) => write!(f, "invalid configuration: `{key}`: {}", self.message),
            None => write!(f, "invalid configuration: {}", self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    pub fn at(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: Some(key.into()),
            message: message.into(),
        }
    }

    pub(super) fn file(path: &Path, message: &str) -> Self {
        Self {
            key: None,
            message: format!("{}: {message}", path.display()),
        }
    }

    pub(super) fn from_config_crate(file: Option<&Path>, e: ::config::ConfigError) -> Self {
        let key = match &e {
            ::config::ConfigError::Type { key, .. } | ::config::ConfigError::At { key, .. } => {
                key.clone()
            }
            _ => None,
        };
        use ::config::ConfigError as E;
        // Errors with an origin name it themselves (the file, or "the environment"); the
        // others (an unknown key, say) could come from either.
        let names_origin = matches!(
            &e,
            E::Type {
                origin: Some(_),
                ..
            } | E::At {
                origin: Some(_),
                ..
            } | E::FileParse { uri: Some(_), .. }
        );
        let origin = file
            .filter(|_| !names_origin)
            .map(|p| format!(" (in {} or the environment)", p.display()))
            .unwrap_or_default();
        let text = e.to_string();
        Self {
            key,
            message: format!("{text}{origin}"),
        }
    }
}

impl Config {
    /// Checks values the type system cannot: required keys, ranges, combinations.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let q = &self.queue;
        if q.url.trim().is_empty() {
            return Err(ConfigError::at(
                "queue.url",
                "must be set to the SQS queue URL that receives the S3 notifications",
            ));
        }
        if !(q.url.starts_with("https://") || q.url.starts_with("http://")) {
            return Err(ConfigError::at("queue.url", "must be an http(s) URL"));
        }
        if q.wait_time > Duration::from_secs(20) {
            return Err(ConfigError::at(
                "queue.wait_time",
                "SQS long polling waits at most 20s",
            ));
        }
        if !(1..=10).contains(&q.max_messages) {
            return Err(ConfigError::at(
                "queue.max_messages",
                "must be between 1 and 10",
            ));
        }
        let twelve_hours = Duration::from_secs(12 * 3600);
        for (key, value) in [
            ("queue.visibility_timeout", q.visibility_timeout),
            ("queue.retry_backoff", q.retry_backoff),
            ("queue.retry_backoff_max", q.retry_backoff_max),
        ] {
            if value < Duration::from_secs(1) || value > twelve_hours {
                return Err(ConfigError::at(
                    key,
                    "must be between 1s and 12h (SQS limits)",
                ));
            }
        }
        if self.source.bucket.trim().is_empty() {
            return Err(ConfigError::at(
                "source.bucket",
                "must be set to the bucket DMS writes to",
            ));
        }
        if self.source.prefix.starts_with('/') {
            return Err(ConfigError::at(
                "source.prefix",
                "S3 keys do not start with `/`; write the folder as DMS's BucketFolder",
            ));
        }
        if self.metadata.prefix.starts_with('/') || self.metadata.prefix.is_empty() {
            return Err(ConfigError::at(
                "metadata.prefix",
                "must be a non-empty key prefix without a leading `/`",
            ));
        }
        if self.dms.op_column.is_empty() {
            return Err(ConfigError::at("dms.op_column", "must not be empty"));
        }
        if self.alerts.table_failing_after == 0 {
            return Err(ConfigError::at(
                "alerts.table_failing_after",
                "must be at least 1 (consecutive failures before a table is reported)",
            ));
        }
        if self.alerts.table_failing_reminder < Duration::from_secs(1) {
            return Err(ConfigError::at(
                "alerts.table_failing_reminder",
                "must be at least 1s (for example \"30m\")",
            ));
        }
        self.validate_routing()?;
        if self.worker.concurrency == 0 || self.worker.concurrency > 1024 {
            return Err(ConfigError::at(
                "worker.concurrency",
                "must be between 1 and 1024",
            ));
        }
        if self.worker.max_waiting_files < self.batch.max_files {
            return Err(ConfigError::at(
                "worker.max_waiting_files",
                "must be at least batch.max_files, or batches could never fill",
            ));
        }
        if self.batch.max_files == 0 {
            return Err(ConfigError::at("batch.max_files", "must be at least 1"));
        }
        if self.batch.max_bytes.as_u64() == 0 {
            return Err(ConfigError::at("batch.max_bytes", "must be more than 0"));
        }
        if self.aws.access_key_id.is_some() != self.aws.secret_access_key.is_some() {
            return Err(ConfigError::at(
                "aws.secret_access_key",
                "set both aws.access_key_id and aws.secret_access_key, or neither",
            ));
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.telemetry.log_level) {
            return Err(ConfigError::at("telemetry.log_level", e.to_string()));
        }
        if self.lease.enabled && self.lease.ttl < Duration::from_secs(5) {
            return Err(ConfigError::at("lease.ttl", "must be at least 5s"));
        }
        self.validate_warehouse()?;
        self.validate_tables()?;
        Ok(())
    }

    fn validate_routing(&self) -> Result<(), ConfigError> {
        let template = &self.routing.table_name;
        if !template.contains("{table}") {
            return Err(ConfigError::at(
                "routing.table_name",
                "must contain `{table}` (and may contain `{schema}`)",
            ));
        }
        let stripped = template.replace("{table}", "").replace("{schema}", "");
        if stripped.contains('{') || stripped.contains('}') {
            return Err(ConfigError::at(
                "routing.table_name",
                "only `{schema}` and `{table}` can be used as placeholders",
            ));
        }
        Ok(())
    }

    fn validate_warehouse(&self) -> Result<(), ConfigError> {
        match self.warehouse.kind {
            WarehouseKind::Duckdb => {
                let d = &self.warehouse.duckdb;
                if d.path.as_os_str().is_empty() {
                    return Err(ConfigError::at("warehouse.duckdb.path", "must be set"));
                }
                if d.schema.is_empty() {
                    return Err(ConfigError::at("warehouse.duckdb.schema", "must be set"));
                }
            }
            WarehouseKind::Firebolt => {
                let f = &self.warehouse.firebolt;
                let core = f.url.as_deref().is_some_and(|u| !u.is_empty());
                let cloud = f.client_id.is_some() || f.client_secret.is_some();
                if core && cloud {
                    return Err(ConfigError::at(
                        "warehouse.firebolt.url",
                        "set `url` for Firebolt Core or `client_id`/`client_secret` for Firebolt Cloud, not both",
                    ));
                }
                if core {
                    let url = f.url.as_deref().unwrap_or_default();
                    if !(url.starts_with("http://") || url.starts_with("https://")) {
                        return Err(ConfigError::at(
                            "warehouse.firebolt.url",
                            "must be an http(s) URL such as http://localhost:3473",
                        ));
                    }
                } else {
                    for (key, present) in [
                        ("warehouse.firebolt.client_id", f.client_id.is_some()),
                        (
                            "warehouse.firebolt.client_secret",
                            f.client_secret.is_some(),
                        ),
                        ("warehouse.firebolt.account", f.account.is_some()),
                        ("warehouse.firebolt.engine", f.engine.is_some()),
                    ] {
                        if !present {
                            return Err(ConfigError::at(
                                key,
                                "must be set for Firebolt Cloud (or set warehouse.firebolt.url for Firebolt Core)",
                            ));
                        }
                    }
                }
                if f.database.is_empty() {
                    return Err(ConfigError::at(
                        "warehouse.firebolt.database",
                        "must be set",
                    ));
                }
                if f.max_concurrent_statements == 0 {
                    return Err(ConfigError::at(
                        "warehouse.firebolt.max_concurrent_statements",
                        "must be at least 1",
                    ));
                }
                let credentials = [
                    f.s3_role_arn.is_some(),
                    f.s3_access_key_id.is_some(),
                    f.s3_location.is_some(),
                ]
                .into_iter()
                .filter(|p| *p)
                .count();
                if credentials > 1 {
                    return Err(ConfigError::at(
                        "warehouse.firebolt.s3_role_arn",
                        "choose one of s3_role_arn, s3_access_key_id/s3_secret_access_key, s3_location",
                    ));
                }
                if f.s3_access_key_id.is_some() != f.s3_secret_access_key.is_some() {
                    return Err(ConfigError::at(
                        "warehouse.firebolt.s3_secret_access_key",
                        "set both s3_access_key_id and s3_secret_access_key, or neither",
                    ));
                }
                if f.s3_session_token.is_some() && f.s3_access_key_id.is_none() {
                    return Err(ConfigError::at(
                        "warehouse.firebolt.s3_session_token",
                        "a session token goes with s3_access_key_id and s3_secret_access_key",
                    ));
                }
                if f.s3_role_external_id.is_some() && f.s3_role_arn.is_none() {
                    return Err(ConfigError::at(
                        "warehouse.firebolt.s3_role_external_id",
                        "an external id goes with s3_role_arn",
                    ));
                }
            }
        }
        Ok(())
    }

    fn validate_tables(&self) -> Result<(), ConfigError> {
        let mut lowered: BTreeMap<String, &str> = BTreeMap::new();
        for (name, table) in &self.tables {
            if let Some(other) = lowered.insert(name.to_lowercase(), name) {
                return Err(ConfigError::at(
                    format!("tables.{name}"),
                    format!("`{other}` and `{name}` name the same table"),
                ));
            }
            if let Some(key) = &table.key {
                let columns = key.columns();
                if columns.iter().any(|c| c.is_empty()) {
                    return Err(ConfigError::at(
                        format!("tables.{name}.key"),
                        "key column names must not be empty",
                    ));
                }
                let mut seen = std::collections::BTreeSet::new();
                for c in &columns {
                    if !seen.insert(c) {
                        return Err(ConfigError::at(
                            format!("tables.{name}.key"),
                            format!("column `{c}` is listed twice"),
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> String {
        "[queue]\nurl = \"http://q\"\n[source]\nbucket = \"b\"\n".to_string()
    }

    #[test]
    fn missing_queue_url_names_the_key() {
        let err = Config::from_toml("[source]\nbucket = \"b\"\n").unwrap_err();
        assert_eq!(err.key.as_deref(), Some("queue.url"));
        assert!(err.to_string().contains("queue.url"));
    }

    #[test]
    fn wrong_type_names_the_key() {
        let err = Config::from_toml(&format!("{}[worker]\nconcurrency = \"many\"\n", base()))
            .unwrap_err();
        assert!(err.to_string().contains("concurrency"), "{err}");
    }

    #[test]
    fn unknown_key_is_an_error() {
        let err = Config::from_toml(&format!("{}[worker]\nconcurency = 3\n", base())).unwrap_err();
        assert!(err.to_string().contains("concurency"), "{err}");
    }

    #[test]
    fn out_of_range_values_are_rejected() {
        let err = Config::from_toml(
            "[queue]\nurl = \"http://q\"\nmax_messages = 11\n[source]\nbucket = \"b\"\n",
        )
        .unwrap_err();
        assert_eq!(err.key.as_deref(), Some("queue.max_messages"));
        let err = Config::from_toml(&format!(
            "{}[routing]\ntable_name = \"{{schema}}\"\n",
            base()
        ))
        .unwrap_err();
        assert_eq!(err.key.as_deref(), Some("routing.table_name"));
    }

    #[test]
    fn firebolt_cloud_needs_all_its_keys() {
        let err = Config::from_toml(&format!(
            "{}[warehouse]\nkind = \"firebolt\"\n[warehouse.firebolt]\nclient_id = \"id\"\nclient_secret = \"s\"\n",
            base()
        ))
        .unwrap_err();
        assert_eq!(err.key.as_deref(), Some("warehouse.firebolt.account"));
        let ok = Config::from_toml(&format!(
            "{}[warehouse]\nkind = \"firebolt\"\n[warehouse.firebolt]\nurl = \"http://localhost:3473\"\n",
            base()
        ));
        assert!(ok.is_ok(), "{ok:?}");
    }
}
