//! Configuration: one TOML document, layered defaults < file < environment.
//!
//! `config/default.toml` is compiled in as the bottom layer, so that file is both the
//! documentation of every key and the source of every default (a unit test keeps it in
//! step with the `Default` impls below). Environment variables override with
//! `CDC_WORKER__SECTION__KEY` (double underscores separate levels, so keys keep theirs).

mod errors;
mod size;
mod validate;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use errors::ConfigError;
pub use size::ByteSize;

pub use crate::schema::policy::{SchemaConfig, TableSchemaConfig};

/// The embedded defaults: the same file users read to learn the keys.
pub const DEFAULT_TOML: &str = include_str!("../../config/default.toml");

/// Environment prefix: `CDC_WORKER__WORKER__CONCURRENCY=8` sets `worker.concurrency`.
pub const ENV_PREFIX: &str = "CDC_WORKER";

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub aws: AwsConfig,
    pub queue: QueueConfig,
    pub source: SourceConfig,
    pub dms: DmsConfig,
    pub routing: RoutingConfig,
    pub worker: WorkerConfig,
    pub batch: BatchConfig,
    pub warehouse: WarehouseConfig,
    pub metadata: MetadataConfig,
    pub schema: SchemaConfig,
    pub alerts: AlertsConfig,
    pub lease: LeaseConfig,
    pub guard: GuardConfig,
    pub history: HistoryConfig,
    pub telemetry: TelemetryConfig,
    /// Per-table settings, keyed by *target* table name.
    pub tables: BTreeMap<String, TableConfig>,
}

/// How to reach AWS (or LocalStack).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
#[derive(Default)]
pub struct AwsConfig {
    /// Region; empty means the SDK's default chain (AWS_REGION, profile, IMDS).
    pub region: Option<String>,
    /// Endpoint override for every AWS service, e.g. `http://127.0.0.1:4566` for LocalStack.
    pub endpoint_url: Option<String>,
    /// Path-style S3 addressing (`host/bucket/key`), needed by LocalStack.
    pub force_path_style: bool,
    /// Static credentials; when unset the SDK's default chain is used (task role on ECS).
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<Secret>,
    pub session_token: Option<Secret>,
}

/// The SQS queue that receives the S3 notifications.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// Queue URL (required).
    pub url: String,
    /// Long-poll wait per ReceiveMessage call (at most 20 s).
    #[serde(with = "humantime_serde")]
    pub wait_time: Duration,
    /// Messages per ReceiveMessage call (1 to 10).
    pub max_messages: i32,
    /// Visibility the keep-alive grants each time it extends an in-flight message.
    #[serde(with = "humantime_serde")]
    pub visibility_timeout: Duration,
    /// First delay before a failed message is seen again; doubles per receive.
    #[serde(with = "humantime_serde")]
    pub retry_backoff: Duration,
    /// Upper bound of that delay (SQS allows at most 12 h).
    #[serde(with = "humantime_serde")]
    pub retry_backoff_max: Duration,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            wait_time: Duration::from_secs(20),
            max_messages: 10,
            visibility_timeout: Duration::from_secs(60),
            retry_backoff: Duration::from_secs(15),
            retry_backoff_max: Duration::from_secs(900),
        }
    }
}

/// Where DMS writes.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SourceConfig {
    /// Bucket DMS writes to (required); notifications for other buckets are ignored.
    pub bucket: String,
    /// DMS `BucketFolder`: keys outside it are ignored. Empty means the bucket root.
    pub prefix: String,
}

/// What DMS adds to each file.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DmsConfig {
    /// Name of the operation column (`I`/`U`/`D`); it is never stored in the target.
    pub op_column: String,
    /// Column that orders changes across and within files (DMS `TimestampColumnName` or an
    /// `AR_H_CHANGE_SEQ` transformation column). Empty: file order, then row order.
    pub ordering_column: Option<String>,
    /// What a table's full load arriving again (a DMS reload) does; per table
    /// `tables.T.reload`. See docs/reloads.md.
    pub reload: ReloadPolicy,
    /// A reload is complete at the first change file of its new generation, or after this
    /// long without a new file of the table (a table without changes gets no CDC file).
    #[serde(with = "humantime_serde")]
    pub reload_settle: Duration,
}

impl Default for DmsConfig {
    fn default() -> Self {
        Self {
            op_column: "Op".into(),
            ordering_column: None,
            reload: ReloadPolicy::Replace,
            reload_settle: Duration::from_secs(15 * 60),
        }
    }
}

/// What a DMS reload of a table does to its target.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ReloadPolicy {
    /// Build the next generation beside the live table and swap it in when complete.
    #[default]
    Replace,
    /// Keep the live table; alert and skip the new full load (the behaviour before reloads
    /// were followed).
    Alert,
    /// Build the next generation, then wait for `cdc-worker table accept-reload T`.
    Hold,
}

impl ReloadPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            ReloadPolicy::Replace => "replace",
            ReloadPolicy::Alert => "alert",
            ReloadPolicy::Hold => "hold",
        }
    }
}

/// The destructive-change guard: a batch that would delete, or a reload that would
/// shrink, a large part of a table is held until a person releases it.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GuardConfig {
    /// Share of a table's rows (0 to 1) a batch may delete, or a reload may remove, before
    /// it is held. 0 turns the guard off.
    pub max_delete_fraction: f64,
    /// Changes of at most this many rows are never held, whatever their share.
    pub min_rows: u64,
}

impl Default for GuardConfig {
    fn default() -> Self {
        Self {
            max_delete_fraction: 0.5,
            min_rows: 10_000,
        }
    }
}

impl GuardConfig {
    /// The guard as a batch carries it; None when off.
    pub fn delete_guard(&self) -> Option<crate::batch::DeleteGuard> {
        (self.max_delete_fraction > 0.0).then_some(crate::batch::DeleteGuard {
            max_fraction: self.max_delete_fraction,
            min_rows: self.min_rows,
        })
    }
}

/// What a target table keeps of its keys: the latest row, or every version.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum HistoryMode {
    /// One row per key, the latest change winning.
    #[default]
    Latest,
    /// Slowly changing dimension type 2: one row per version of a key, with `__valid_from`,
    /// `__valid_to`, `__is_current` and `__op` (docs/history.md).
    Scd2,
}

/// History tables: the default for every table (per table: `tables.T.history`).
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HistoryConfig {
    pub default: HistoryMode,
}

/// How source `schema.table` becomes a target table name.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    /// Template with `{schema}` and `{table}`, e.g. `"{schema}_{table}"`.
    pub table_name: String,
    /// Lower-case the rendered name (DMS from Oracle writes upper-case names).
    pub lowercase: bool,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        Self {
            table_name: "{table}".into(),
            lowercase: true,
        }
    }
}

/// The worker pool.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// Tasks long-polling SQS.
    pub concurrency: usize,
    /// Batches applied at once across all tables; 0 picks per warehouse (see
    /// [`Config::parallel_batches`]).
    pub max_parallel_batches: usize,
    /// On SIGTERM: time to finish in-flight batches before releasing the rest.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// A table's lane with no work for this long is dropped (it is recreated on demand).
    #[serde(with = "humantime_serde")]
    pub lane_idle_timeout: Duration,
    /// Receivers pause while this many files wait in lanes: bounds memory and the
    /// visibility keep-alive calls a large backlog would cost.
    pub max_waiting_files: usize,
    /// `/healthz` (and `cdc-worker health`) fail once no receive from the queue has
    /// succeeded for this long.
    #[serde(with = "humantime_serde")]
    pub unhealthy_after: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            concurrency: 4,
            max_parallel_batches: 0,
            shutdown_timeout: Duration::from_secs(30),
            lane_idle_timeout: Duration::from_secs(300),
            max_waiting_files: 2000,
            unhealthy_after: Duration::from_secs(300),
        }
    }
}

/// How files waiting for one table are coalesced.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BatchConfig {
    /// Most files in one batch.
    pub max_files: usize,
    /// Most bytes (sum of object sizes) in one batch.
    pub max_bytes: ByteSize,
    /// How long a table waits for more files after the first one arrives.
    #[serde(with = "humantime_serde")]
    pub linger: Duration,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            max_files: 100,
            max_bytes: ByteSize::mib(512),
            linger: Duration::from_secs(2),
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum WarehouseKind {
    #[default]
    Duckdb,
    Firebolt,
}

/// The target warehouse.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WarehouseConfig {
    pub kind: WarehouseKind,
    pub duckdb: DuckdbConfig,
    pub firebolt: FireboltConfig,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DuckdbConfig {
    /// Database file (created when missing).
    pub path: PathBuf,
    /// Schema that holds the target tables.
    pub schema: String,
    /// DuckDB `memory_limit`, e.g. "1GB"; empty keeps DuckDB's default (80% of RAM).
    pub memory_limit: Option<String>,
    /// DuckDB `threads`; 0 keeps DuckDB's default (all cores).
    pub threads: u32,
    /// Directory for downloaded batch files; empty means the system temp directory.
    pub download_dir: Option<PathBuf>,
}

impl Default for DuckdbConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::from("cdc-worker.duckdb"),
            schema: "main".into(),
            memory_limit: None,
            threads: 0,
            download_dir: None,
        }
    }
}

/// Firebolt Cloud (`client_id` set) or Firebolt Core (`url` set).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FireboltConfig {
    /// Firebolt Core: base URL, e.g. `http://localhost:3473`. Leave empty for Cloud.
    pub url: Option<String>,
    /// Cloud: service account credentials and names.
    pub client_id: Option<String>,
    pub client_secret: Option<Secret>,
    pub account: Option<String>,
    pub engine: Option<String>,
    /// Database (Core's default is `firebolt`).
    pub database: String,
    /// Schema that holds the target tables.
    pub schema: String,
    /// Cloud API host; the token host is derived from it (`api.` becomes `id.`).
    pub api_host: String,
    /// Statements in flight to the engine at once, across all workers.
    pub max_concurrent_statements: usize,
    /// Per-request timeout.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Retries for transient failures (429, 502, 503, 504, timeouts, connection errors).
    pub max_retries: u32,
    /// How COPY reads the DMS bucket: an IAM role Firebolt assumes, static keys, or the
    /// name of a `LOCATION` object created beforehand.
    pub s3_role_arn: Option<String>,
    /// The external id the role's trust policy asks for (with `s3_role_arn`).
    pub s3_role_external_id: Option<String>,
    pub s3_access_key_id: Option<String>,
    pub s3_secret_access_key: Option<Secret>,
    /// With temporary (STS) keys: their session token.
    pub s3_session_token: Option<Secret>,
    pub s3_location: Option<String>,
}

impl Default for FireboltConfig {
    fn default() -> Self {
        Self {
            url: None,
            client_id: None,
            client_secret: None,
            account: None,
            engine: None,
            database: "firebolt".into(),
            schema: "public".into(),
            api_host: "api.app.firebolt.io".into(),
            max_concurrent_statements: 8,
            request_timeout: Duration::from_secs(300),
            max_retries: 3,
            s3_role_arn: None,
            s3_role_external_id: None,
            s3_access_key_id: None,
            s3_secret_access_key: None,
            s3_session_token: None,
            s3_location: None,
        }
    }
}

/// Where the worker keeps its own state in S3 (schemas, history, keys, leases).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MetadataConfig {
    /// Bucket; empty means `source.bucket`.
    pub bucket: Option<String>,
    /// Key prefix for everything the worker writes.
    pub prefix: String,
    /// Key of the table-keys document, relative to `prefix`.
    pub table_keys: String,
    /// How long a fetched `table_keys.json` is trusted before it is read again.
    #[serde(with = "humantime_serde")]
    pub table_keys_refresh: Duration,
}

impl MetadataConfig {
    /// The S3 key of the table-keys document.
    pub fn table_keys_key(&self) -> String {
        format!("{}/{}", self.prefix.trim_end_matches('/'), self.table_keys)
    }
}

impl Default for MetadataConfig {
    fn default() -> Self {
        Self {
            bucket: None,
            prefix: "cdc-worker".into(),
            table_keys: "table_keys.json".into(),
            table_keys_refresh: Duration::from_secs(60),
        }
    }
}

/// Where alerts go, and when a failing table is reported.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// SNS topic; empty disables publishing (alerts are still logged).
    pub sns_topic_arn: Option<String>,
    /// Consecutive failed batches after which a table is reported (`table_failing`).
    pub table_failing_after: u32,
    /// While a table keeps failing, the first reminder comes this long after the first
    /// report; each later one waits twice as long.
    #[serde(with = "humantime_serde")]
    pub table_failing_reminder: Duration,
    /// A table whose newest applied change is older than this breaks its freshness
    /// objective (`freshness_objective_missed`, then `freshness_recovered`); per table
    /// `tables.T.freshness_objective`. Zero: no objective.
    #[serde(with = "humantime_serde")]
    pub freshness_objective: Duration,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        Self {
            sns_topic_arn: None,
            table_failing_after: 3,
            table_failing_reminder: Duration::from_secs(30 * 60),
            freshness_objective: Duration::from_secs(30 * 60),
        }
    }
}

/// The per-table lease that keeps several worker tasks from applying one table at once.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LeaseConfig {
    /// Take a lease in S3 before applying a batch. Needed with more than one task.
    pub enabled: bool,
    /// A lease not renewed for this long may be taken by another worker.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            ttl: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// JSON when stdout is not a terminal (containers), human-readable otherwise.
    #[default]
    Auto,
    Json,
    Pretty,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    pub log_format: LogFormat,
    /// `tracing` filter, e.g. "info" or "info,cdc_worker::apply=debug". `RUST_LOG` wins.
    pub log_level: String,
    /// Address of the `/healthz`, `/readyz`, `/status` and `/metrics` endpoints; empty
    /// disables them.
    pub listen: Option<SocketAddr>,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            log_format: LogFormat::Auto,
            log_level: "info".into(),
            listen: None,
        }
    }
}

/// Settings of one target table.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TableConfig {
    /// Key columns. A list (`["order_id", "line_no"]`), one name, or `[]` for "no key,
    /// append". Unset: `table_keys.json`, then the target's declared primary key.
    pub key: Option<KeySpec>,
    /// Overrides `dms.ordering_column`.
    pub ordering_column: Option<String>,
    /// Refinements of `[schema]` for this table.
    pub schema: Option<TableSchemaConfig>,
    /// Overrides `alerts.freshness_objective` ("0s": none for this table).
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub freshness_objective: Option<Duration>,
    /// Overrides `dms.reload`.
    pub reload: Option<ReloadPolicy>,
    /// Overrides `history.default`: `"latest"` or `"scd2"` (every version kept).
    pub history: Option<HistoryMode>,
    /// Of a history table, the source columns whose change opens a new version; unset: all
    /// but the key and the ordering column. An update that changes none opens none.
    pub track_history_columns: Option<Vec<String>>,
}

/// A key as written in the config file or `table_keys.json`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum KeySpec {
    One(String),
    Many(Vec<String>),
}

impl KeySpec {
    pub fn columns(&self) -> Vec<String> {
        match self {
            KeySpec::One(c) => vec![c.clone()],
            KeySpec::Many(cs) => cs.clone(),
        }
    }
}

/// A string that never prints: `Debug`, `Display` and serialization show `****`.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    /// The secret itself: call only where it is handed to the service that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"****\"")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("****")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("****")
    }
}

impl Config {
    /// Batches applied at once. By default DuckDB gets two per core (at most one per
    /// receiver; cores are `warehouse.duckdb.threads` when set): it runs in this
    /// process, so more only holds more staged data in memory (measured in BENCHMARKS.md);
    /// a Firebolt engine is remote, so every receiver may have a batch in flight.
    pub fn parallel_batches(&self) -> usize {
        if self.worker.max_parallel_batches > 0 {
            return self.worker.max_parallel_batches;
        }
        match self.warehouse.kind {
            WarehouseKind::Duckdb => {
                let cores = match self.warehouse.duckdb.threads {
                    0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
                    n => n as usize,
                };
                self.worker.concurrency.min(2 * cores).max(1)
            }
            WarehouseKind::Firebolt => self.worker.concurrency.max(1),
        }
    }

    /// Loads defaults < `file` < environment, then validates.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_with_env(file, None)
    }

    /// As [`Config::load`], with the environment given explicitly (tests).
    pub fn load_with_env(
        file: Option<&Path>,
        env: Option<std::collections::HashMap<String, String>>,
    ) -> Result<Self, ConfigError> {
        use ::config::{Environment, File, FileFormat};
        let names: Vec<String> = match &env {
            Some(map) => map.keys().cloned().collect(),
            None => std::env::vars().map(|(k, _)| k).collect(),
        };
        let env_keys = errors::EnvKeys::new(&names);
        let mut builder =
            ::config::Config::builder().add_source(File::from_str(DEFAULT_TOML, FileFormat::Toml));
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigError::file(path, "no such file"));
            }
            builder = builder.add_source(File::from(path).format(FileFormat::Toml));
        }
        builder = builder.add_source(
            Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .source(env),
        );
        let layered = builder
            .build()
            .map_err(|e| ConfigError::from_config_crate(file, &env_keys, None, e))?;
        let config: Config = layered
            .clone()
            .try_deserialize()
            .map_err(|e| ConfigError::from_config_crate(file, &env_keys, Some(&layered), e))?;
        config
            .validate()
            .map_err(|e| e.with_origin(file, &env_keys))?;
        Ok(config)
    }

    /// Parses a TOML document on top of the defaults, without the environment (tests,
    /// embedded use).
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        use ::config::{File, FileFormat};
        let none = errors::EnvKeys::default();
        let layered = ::config::Config::builder()
            .add_source(File::from_str(DEFAULT_TOML, FileFormat::Toml))
            .add_source(File::from_str(text, FileFormat::Toml))
            .build()
            .map_err(|e| ConfigError::from_config_crate(None, &none, None, e))?;
        let config: Config = layered
            .clone()
            .try_deserialize()
            .map_err(|e| ConfigError::from_config_crate(None, &none, Some(&layered), e))?;
        config.validate()?;
        Ok(config)
    }

    /// The effective configuration as TOML, secrets masked.
    pub fn to_masked_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }

    pub fn metadata_bucket(&self) -> &str {
        self.metadata
            .bucket
            .as_deref()
            .filter(|b| !b.is_empty())
            .unwrap_or(&self.source.bucket)
    }

    /// The settings of a target table (defaults when it has no section).
    pub fn table(&self, name: &str) -> TableConfig {
        self.tables.get(name).cloned().unwrap_or_default()
    }

    /// The freshness objective of a table: its own, else the default; None when zero.
    pub fn freshness_objective(&self, table: &str) -> Option<Duration> {
        let objective = self
            .tables
            .get(table)
            .and_then(|t| t.freshness_objective)
            .unwrap_or(self.alerts.freshness_objective);
        (!objective.is_zero()).then_some(objective)
    }

    /// The ordering column for a table: its own, else the global one.
    /// What a reload of `table` does: its own policy, else `dms.reload`.
    pub fn reload_policy(&self, table: &str) -> ReloadPolicy {
        self.tables
            .get(table)
            .and_then(|t| t.reload)
            .unwrap_or(self.dms.reload)
    }

    /// Whether `table` keeps every version of a key: its own setting; else, once it exists,
    /// what it was created as (`existing`: the default applies to tables created after it
    /// is set, so changing it holds no table); else the default, which a table without a
    /// key does not follow (its rows are appended, every one kept already). Its own
    /// setting it follows without a key too, and waits for one.
    pub fn keeps_history(&self, table: &str, existing: Option<bool>, keyed: bool) -> bool {
        match (self.tables.get(table).and_then(|t| t.history), existing) {
            (Some(own), _) => own == HistoryMode::Scd2,
            (None, Some(is_history)) => is_history,
            (None, None) => keyed && self.history.default == HistoryMode::Scd2,
        }
    }

    /// Whether `table` keeps every version of its keys: its own setting, else the default.
    pub fn history_setting(&self, table: &str) -> HistoryMode {
        self.tables
            .get(table)
            .and_then(|t| t.history)
            .unwrap_or(self.history.default)
    }

    pub fn ordering_column(&self, table: &str) -> Option<String> {
        self.tables
            .get(table)
            .and_then(|t| t.ordering_column.clone())
            .or_else(|| self.dms.ordering_column.clone())
            .filter(|c| !c.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_history_default_applies_to_keyed_tables_and_a_table_s_own_setting_always() {
        let mut c = Config::default();
        assert!(!c.keeps_history("t", None, true), "latest by default");
        c.history.default = HistoryMode::Scd2;
        assert!(c.keeps_history("t", None, true));
        assert!(
            !c.keeps_history("t", None, false),
            "a keyless table is appended"
        );
        assert!(
            !c.keeps_history("t", Some(false), true),
            "an existing latest table keeps its kind"
        );
        c.tables.insert(
            "k".into(),
            TableConfig {
                history: Some(HistoryMode::Scd2),
                ..Default::default()
            },
        );
        assert!(
            c.keeps_history("k", Some(false), false),
            "its own setting: it waits for a key"
        );
        c.tables.insert(
            "l".into(),
            TableConfig {
                history: Some(HistoryMode::Latest),
                ..Default::default()
            },
        );
        assert!(!c.keeps_history("l", Some(true), true));
    }

    #[test]
    fn parallel_batches_follow_the_warehouse_unless_set() {
        let mut c = Config::default();
        c.worker.concurrency = 16;
        c.warehouse.duckdb.threads = 2;
        assert_eq!(c.parallel_batches(), 4, "DuckDB: two per core");
        c.warehouse.kind = WarehouseKind::Firebolt;
        assert_eq!(c.parallel_batches(), 16, "Firebolt: one per receiver");
        c.worker.max_parallel_batches = 3;
        assert_eq!(c.parallel_batches(), 3, "explicit setting wins");
    }

    #[test]
    fn default_toml_matches_default_impls() {
        let from_file: Config = ::config::Config::builder()
            .add_source(::config::File::from_str(
                DEFAULT_TOML,
                ::config::FileFormat::Toml,
            ))
            .build()
            .unwrap()
            .try_deserialize()
            .unwrap();
        assert_eq!(from_file, Config::default());
    }

    #[test]
    fn environment_overrides_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "[queue]\nurl = \"http://q\"\n[source]\nbucket = \"my-dms-bucket\"\n[worker]\nconcurrency = 2\n",
        )
        .unwrap();
        let env = [("CDC_WORKER__WORKER__CONCURRENCY", "7")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let config = Config::load_with_env(Some(&path), Some(env)).unwrap();
        assert_eq!(config.worker.concurrency, 7);
        assert_eq!(config.queue.url, "http://q");
    }

    #[test]
    fn secrets_are_masked_everywhere() {
        let config = Config::from_toml(
            "[queue]\nurl = \"http://q\"\n[source]\nbucket = \"my-dms-bucket\"\n[aws]\naccess_key_id = \"AKIA\"\nsecret_access_key = \"hunter2\"\n",
        )
        .unwrap();
        assert_eq!(
            config.aws.secret_access_key.as_ref().unwrap().expose(),
            "hunter2"
        );
        assert!(!config.to_masked_toml().contains("hunter2"));
        assert!(!format!("{config:?}").contains("hunter2"));
    }

    #[test]
    fn freshness_objectives_default_and_can_be_turned_off_per_table() {
        let config = Config::from_toml(
            "[queue]\nurl = \"http://q\"\n[source]\nbucket = \"my-dms-bucket\"\n[alerts]\nfreshness_objective = \"10m\"\n[tables.orders]\nfreshness_objective = \"5m\"\n[tables.archive]\nfreshness_objective = \"0s\"\n",
        )
        .unwrap();
        let minutes = |m: u64| Some(Duration::from_secs(60 * m));
        assert_eq!(config.freshness_objective("orders"), minutes(5));
        assert_eq!(config.freshness_objective("items"), minutes(10));
        assert_eq!(config.freshness_objective("archive"), None);
        assert_eq!(
            Config::default().freshness_objective("orders"),
            minutes(30),
            "the default"
        );
    }

    #[test]
    fn table_keys_accept_one_or_many() {
        let config = Config::from_toml(
            "[queue]\nurl = \"http://q\"\n[source]\nbucket = \"my-dms-bucket\"\n[tables.orders]\nkey = \"id\"\n[tables.items]\nkey = [\"order_id\", \"line_no\"]\n[tables.events]\nkey = []\n",
        )
        .unwrap();
        assert_eq!(config.table("orders").key.unwrap().columns(), vec!["id"]);
        assert_eq!(
            config.table("items").key.unwrap().columns(),
            vec!["order_id", "line_no"]
        );
        assert!(config.table("events").key.unwrap().columns().is_empty());
    }
}
