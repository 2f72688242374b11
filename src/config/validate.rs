//! Validation of a loaded [`Config`]: every error names the key it is about.

use std::collections::BTreeMap;
use std::time::Duration;

use super::{Config, ConfigError, WarehouseKind};

impl Config {
    /// Checks values the type system cannot: required keys, ranges, combinations.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_queue()?;
        self.validate_locations()?;
        self.validate_alerts()?;
        self.validate_routing()?;
        self.validate_worker()?;
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.telemetry.log_level) {
            return Err(ConfigError::at("telemetry.log_level", e.to_string()));
        }
        if self.lease.enabled && self.lease.ttl < Duration::from_secs(5) {
            return Err(ConfigError::at("lease.ttl", "must be at least 5s"));
        }
        let fraction = self.guard.max_delete_fraction;
        if !(0.0..=1.0).contains(&fraction) {
            return Err(ConfigError::at(
                "guard.max_delete_fraction",
                format!(
                    "`{fraction}` is not a share of rows between 0 (guard off) and 1 (example: 0.5 holds a batch that deletes more than half of a table)"
                ),
            ));
        }
        self.validate_warehouse()?;
        self.validate_tables()?;
        Ok(())
    }

    fn validate_queue(&self) -> Result<(), ConfigError> {
        let q = &self.queue;
        if q.url.trim().is_empty() {
            return Err(ConfigError::at(
                "queue.url",
                "must be set to the SQS queue URL that receives the S3 notifications",
            ));
        }
        if !(q.url.starts_with("https://") || q.url.starts_with("http://")) {
            return Err(ConfigError::at(
                "queue.url",
                format!(
                    "`{}` is not a queue URL; write the URL SQS shows for the queue, not its ARN or name (example: url = \"https://sqs.eu-west-1.amazonaws.com/123456789012/dms-files\")",
                    q.url
                ),
            ));
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
        Ok(())
    }

    /// Where the files come from and where the worker keeps its metadata.
    fn validate_locations(&self) -> Result<(), ConfigError> {
        if self.source.bucket.trim().is_empty() {
            return Err(ConfigError::at(
                "source.bucket",
                "must be set to the bucket DMS writes to",
            ));
        }
        check_bucket_name("source.bucket", &self.source.bucket)?;
        if let Some(bucket) = self.metadata.bucket.as_deref().filter(|b| !b.is_empty()) {
            check_bucket_name("metadata.bucket", bucket)?;
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
        Ok(())
    }

    fn validate_alerts(&self) -> Result<(), ConfigError> {
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
        Ok(())
    }

    /// The worker pool, batches and AWS credentials.
    fn validate_worker(&self) -> Result<(), ConfigError> {
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
        if self.worker.unhealthy_after < Duration::from_secs(1) {
            return Err(ConfigError::at(
                "worker.unhealthy_after",
                "must be at least 1s (example: unhealthy_after = \"5m\")",
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
            WarehouseKind::Firebolt => self.validate_firebolt()?,
        }
        Ok(())
    }

    fn validate_firebolt(&self) -> Result<(), ConfigError> {
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
        self.validate_firebolt_copy_credentials()
    }

    /// The credentials COPY uses to read the source bucket: one kind at most.
    fn validate_firebolt_copy_credentials(&self) -> Result<(), ConfigError> {
        let f = &self.warehouse.firebolt;
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
            self.validate_history(name, table)?;
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

impl Config {
    /// `history` and `track_history_columns` of one table: a history table needs a key,
    /// and tracked columns mean something only for one.
    fn validate_history(&self, name: &str, table: &super::TableConfig) -> Result<(), ConfigError> {
        let history = self.history_setting(name) == super::HistoryMode::Scd2;
        let own = table.history == Some(super::HistoryMode::Scd2);
        if own && table.key.as_ref().is_some_and(|k| k.columns().is_empty()) {
            return Err(ConfigError::at(
                format!("tables.{name}.history"),
                "a history table (\"scd2\") needs a key, and key = [] says it has none",
            ));
        }
        let Some(tracked) = &table.track_history_columns else {
            return Ok(());
        };
        let at = format!("tables.{name}.track_history_columns");
        if !history {
            return Err(ConfigError::at(
                at,
                "applies only to a history table: set history = \"scd2\" for it, or remove the setting",
            ));
        }
        if tracked.is_empty() || tracked.iter().any(|c| c.is_empty()) {
            return Err(ConfigError::at(
                at,
                "must name the columns whose change opens a version; leave it unset to track all but the key and the ordering column",
            ));
        }
        Ok(())
    }
}

/// A bucket's name, not a URL or an ARN: the most common paste is `s3://bucket/folder`.
fn check_bucket_name(key: &str, name: &str) -> Result<(), ConfigError> {
    let bare = name
        .strip_prefix("s3://")
        .or_else(|| name.strip_prefix("arn:aws:s3:::"))
        .or_else(|| name.strip_prefix("https://"));
    if let Some(rest) = bare {
        let (bucket, folder) = rest.split_once('/').unwrap_or((rest, ""));
        let folder = folder.trim_matches('/');
        let prefix_hint = if folder.is_empty() || key != "source.bucket" {
            String::new()
        } else {
            format!(" and the folder in source.prefix: prefix = \"{folder}\"")
        };
        return Err(ConfigError::at(
            key,
            format!(
                "`{name}` is a location, not a bucket name; write the name alone: bucket = \"{bucket}\"{prefix_hint}"
            ),
        ));
    }
    if let Some((bucket, folder)) = name.split_once('/') {
        let hint = if key == "source.bucket" {
            format!(
                "; write bucket = \"{bucket}\" and prefix = \"{}\"",
                folder.trim_matches('/')
            )
        } else {
            format!("; write bucket = \"{bucket}\" (the worker's own folder is metadata.prefix)")
        };
        return Err(ConfigError::at(
            key,
            format!("`{name}` is not a bucket name (it contains `/`){hint}"),
        ));
    }
    // S3's rules for bucket names (docs.aws.amazon.com/AmazonS3/latest/userguide/bucketnamingrules.html).
    let valid_chars = name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
    let ends_ok = name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    if !(3..=63).contains(&name.len()) || !valid_chars || !ends_ok {
        return Err(ConfigError::at(
            key,
            format!(
                "`{name}` is not a valid S3 bucket name: 3 to 63 lower-case letters, digits, dots and hyphens, starting and ending with a letter or digit"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> String {
        "[queue]\nurl = \"http://q\"\n[source]\nbucket = \"my-dms-bucket\"\n".to_string()
    }

    #[test]
    fn missing_queue_url_names_the_key() {
        let err = Config::from_toml("[source]\nbucket = \"my-dms-bucket\"\n").unwrap_err();
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
    fn history_settings_that_cannot_work_name_their_key() {
        let with = |tables: &str| Config::from_toml(&format!("{}{tables}", base()));
        let err = with("[tables.t]\nhistory = \"scd\"\n").unwrap_err();
        assert!(
            err.to_string().contains("scd2"),
            "the choices are named: {err}"
        );
        let err = with("[tables.t]\nhistory = \"scd2\"\nkey = []\n").unwrap_err();
        assert_eq!(err.key.as_deref(), Some("tables.t.history"));
        let err = with("[tables.t]\ntrack_history_columns = [\"v\"]\n").unwrap_err();
        assert_eq!(err.key.as_deref(), Some("tables.t.track_history_columns"));
        let err = with("[tables.t]\nhistory = \"scd2\"\ntrack_history_columns = []\n").unwrap_err();
        assert_eq!(err.key.as_deref(), Some("tables.t.track_history_columns"));
        let ok =
            with("[history]\ndefault = \"scd2\"\n[tables.t]\ntrack_history_columns = [\"v\"]\n");
        assert!(ok.is_ok(), "the default makes t a history table: {ok:?}");
        let ok = with("[history]\ndefault = \"scd2\"\n[tables.events]\nkey = []\n");
        assert!(
            ok.is_ok(),
            "a keyless table does not follow the default: {ok:?}"
        );
    }

    #[test]
    fn unknown_key_is_an_error() {
        let err = Config::from_toml(&format!("{}[worker]\nconcurency = 3\n", base())).unwrap_err();
        assert!(err.to_string().contains("concurency"), "{err}");
    }

    #[test]
    fn out_of_range_values_are_rejected() {
        let err = Config::from_toml(
            "[queue]\nurl = \"http://q\"\nmax_messages = 11\n[source]\nbucket = \"my-dms-bucket\"\n",
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

    /// Golden texts: what a user reads for the mistakes people make first.
    #[test]
    fn errors_speak_the_users_language() {
        let err = |extra: &str| {
            Config::from_toml(&format!("{}{extra}", base()))
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            err("[warehouse]\nkind = \"snowflake\"\n"),
            "invalid configuration: `warehouse.kind`: `snowflake` is not a valid value; valid values: duckdb, firebolt (example: kind = \"duckdb\")"
        );
        assert_eq!(
            err("[tables.orders]\nkey = 5\n"),
            "invalid configuration: `tables.orders.key`: must be a column name or a list of column names, for example key = \"id\" or key = [\"order_id\", \"line_no\"] (key = [] means no key: rows are appended)"
        );
        assert_eq!(
            err("[batch]\nlinger = \"2\"\n"),
            "invalid configuration: `batch.linger`: `2` is not a duration; write a number with a unit: ms, s, m or h (example: linger = \"2s\")"
        );
        assert_eq!(
            err("[worker]\nconcurrency = \"many\"\n"),
            "invalid configuration: `worker.concurrency`: expected a whole number, found the text \"many\" (example: concurrency = 4)"
        );
        assert_eq!(
            err("[schema]\nincompatible = \"yolo\"\n"),
            "invalid configuration: `schema.incompatible`: `yolo` is not a valid value; valid values: fail, variant, cast, ignore (example: incompatible = \"fail\")"
        );
        assert_eq!(
            err("[telemetry]\nlisten = \"localhost:9090\"\n"),
            "invalid configuration: `telemetry.listen`: `localhost:9090` is not an IP address with a port (example: listen = \"0.0.0.0:9090\", or \"127.0.0.1:9090\" for this host only)"
        );
        assert_eq!(
            err("[worker]\nconcurency = 3\n"),
            "invalid configuration: `worker.concurency`: unknown key (did you mean `concurrency`?); the keys of [worker] are: concurrency, max_parallel_batches, shutdown_timeout, lane_idle_timeout, max_waiting_files, unhealthy_after"
        );
    }

    #[test]
    fn bucket_locations_are_refused_with_the_name_to_write() {
        let err = |bucket: &str| {
            Config::from_toml(&format!(
                "[queue]\nurl = \"http://q\"\n[source]\nbucket = \"{bucket}\"\n"
            ))
            .unwrap_err()
            .to_string()
        };
        assert_eq!(
            err("s3://my-bucket"),
            "invalid configuration: `source.bucket`: `s3://my-bucket` is a location, not a bucket name; write the name alone: bucket = \"my-bucket\""
        );
        assert_eq!(
            err("s3://my-bucket/dms/"),
            "invalid configuration: `source.bucket`: `s3://my-bucket/dms/` is a location, not a bucket name; write the name alone: bucket = \"my-bucket\" and the folder in source.prefix: prefix = \"dms\""
        );
        assert_eq!(
            err("my-bucket/dms"),
            "invalid configuration: `source.bucket`: `my-bucket/dms` is not a bucket name (it contains `/`); write bucket = \"my-bucket\" and prefix = \"dms\""
        );
        assert!(err("My_Bucket").contains("is not a valid S3 bucket name"));
        let arn = Config::from_toml("[queue]\nurl = \"arn:aws:sqs:eu-west-1:123456789012:q\"\n[source]\nbucket = \"my-bucket\"\n")
            .unwrap_err()
            .to_string();
        assert!(arn.contains("not its ARN or name"), "{arn}");
    }

    #[test]
    fn the_environment_variable_that_caused_an_error_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("my.toml");
        std::fs::write(&path, base()).unwrap();
        let load = |var: &str, value: &str| {
            let env = [(var.to_string(), value.to_string())].into_iter().collect();
            Config::load_with_env(Some(&path), Some(env))
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            load("CDC_WORKER__WORKER__CONCURENCY", "8"),
            "invalid configuration: `worker.concurency` (set by the environment variable CDC_WORKER__WORKER__CONCURENCY): unknown key (did you mean `concurrency`?); the keys of [worker] are: concurrency, max_parallel_batches, shutdown_timeout, lane_idle_timeout, max_waiting_files, unhealthy_after"
        );
        assert_eq!(
            load("CDC_WORKER__QUEUE__MAX_MESSAGES", "11"),
            "invalid configuration: `queue.max_messages` (set by the environment variable CDC_WORKER__QUEUE__MAX_MESSAGES): must be between 1 and 10"
        );
        let in_file = Config::load_with_env(Some(&path), Some(Default::default())).map(|_| ());
        assert!(in_file.is_ok(), "{in_file:?}");
        std::fs::write(
            &path,
            format!("{}[warehouse]\nkind = \"snowflake\"\n", base()),
        )
        .unwrap();
        let err = Config::load_with_env(Some(&path), Some(Default::default())).unwrap_err();
        assert_eq!(err.origin, Some(format!("in {}", path.display())));
    }
}
