//! Test environment: a real LocalStack (S3, SQS, SNS) with resources unique to each test,
//! a real DuckDB file in a temp directory, and the worker running in-process.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cdc_worker::aws::AwsClients;
use cdc_worker::config::Config;
use cdc_worker::devkit::resources::{self as dev, ReceivedAlert, ResourceSpec, Resources};
use cdc_worker::storage::{ObjectStore, WriteCondition};
use cdc_worker::worker::Worker;
use duckdb::types::Value;

pub const ENDPOINT: &str = "http://127.0.0.1:4566";

static COUNTER: AtomicU32 = AtomicU32::new(0);

pub struct Env {
    pub aws: AwsClients,
    pub store: ObjectStore,
    pub res: Resources,
    pub config: Config,
    pub dir: tempfile::TempDir,
    pub prefix: String,
}

/// Panics with instructions when LocalStack is not running.
async fn require_localstack() {
    let ok = reqwest::get(format!("{ENDPOINT}/_localstack/health"))
        .await
        .map(|r| r.status().is_success())
        .unwrap_or(false);
    assert!(
        ok,
        "LocalStack is not answering on {ENDPOINT}: start it with deploy/localstack/start.sh (scripts/test does)"
    );
}

impl Env {
    /// Creates a bucket, queue (with DLQ), notification and topic named after `name`.
    pub async fn new(name: &str, tweak: impl FnOnce(&mut Config)) -> Env {
        Self::with_receives(name, 5, tweak).await
    }

    pub async fn with_receives(
        name: &str,
        max_receive_count: u32,
        tweak: impl FnOnce(&mut Config),
    ) -> Env {
        require_localstack().await;
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn,cdc_worker=info".into()),
            )
            .with_test_writer()
            .try_init();
        cdc_worker::telemetry::metrics_handle();
        // The random part keeps a recycled pid (containers) from finding an earlier run's
        // bucket and queues in a LocalStack that is still running.
        let unique = format!(
            "{name}-{}-{}-{:06x}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            fastrand::u32(..1 << 24)
        )
        .to_lowercase()
        .replace('_', "-");
        let dir = tempfile::tempdir().expect("tempdir");
        let prefix = "dms".to_string();
        let base = format!(
            r#"
            [aws]
            region = "us-east-1"
            endpoint_url = "{ENDPOINT}"
            force_path_style = true
            access_key_id = "test"
            secret_access_key = "test"
            [queue]
            url = "{ENDPOINT}/queue/us-east-1/000000000000/{unique}"
            wait_time = "1s"
            visibility_timeout = "10s"
            retry_backoff = "1s"
            retry_backoff_max = "2s"
            [source]
            bucket = "{unique}"
            prefix = "{prefix}"
            [batch]
            linger = "1s"
            [worker]
            concurrency = 2
            shutdown_timeout = "10s"
            [warehouse.duckdb]
            path = "{db}"
            threads = 2
            [alerts]
            sns_topic_arn = "arn:aws:sns:us-east-1:000000000000:{unique}"
            # The test files are named for 2026-11-24: a test that checks freshness sets its own
            # objective.
            freshness_objective = "0s"
            "#,
            db = dir.path().join("warehouse.duckdb").display()
        );
        let mut config = Config::from_toml(&base).expect("test config");
        tweak(&mut config);
        let aws = AwsClients::new(&config.aws).await;
        let mut spec = cdc_worker::devkit::resource_spec(&config);
        spec.max_receive_count = max_receive_count;
        spec.visibility_timeout_s = config.queue.visibility_timeout.as_secs().max(1) as u32;
        let res = dev::ensure_resources(&aws, &ResourceSpec { ..spec })
            .await
            .expect("LocalStack resources");
        config.queue.url = res.queue_url.clone();
        config.alerts.sns_topic_arn = Some(res.topic_arn.clone());
        Env {
            store: ObjectStore::new(aws.s3.clone()),
            aws,
            res,
            config,
            dir,
            prefix,
        }
    }

    pub async fn start(&self) -> Worker {
        Worker::start(self.config.clone())
            .await
            .expect("worker starts")
    }

    pub fn key(&self, table: &str, file: &str) -> String {
        format!("{}/public/{table}/{file}", self.prefix)
    }

    /// Writes rows as a Parquet file and uploads it (S3 notifies the queue).
    pub async fn put_parquet(
        &self,
        key: &str,
        columns: &[(&str, &str)],
        rows: &[Vec<Value>],
    ) -> String {
        let body = parquet_bytes(columns, rows);
        self.put_bytes(key, body).await
    }

    pub async fn put_bytes(&self, key: &str, body: Vec<u8>) -> String {
        self.store
            .put(
                &self.res.bucket,
                key,
                Bytes::from(body),
                "application/octet-stream",
                WriteCondition::Unconditional,
            )
            .await
            .expect("upload")
    }

    pub async fn put_table_keys(&self, doc: serde_json::Value) {
        self.store
            .put(
                &self.res.bucket,
                &self.config.metadata.table_keys_key(),
                Bytes::from(doc.to_string()),
                "application/json",
                WriteCondition::Unconditional,
            )
            .await
            .expect("table keys");
    }

    /// Sends a body straight to the worker's queue.
    pub async fn send(&self, body: &str) {
        self.aws
            .sqs
            .send_message()
            .queue_url(&self.res.queue_url)
            .message_body(body)
            .send()
            .await
            .expect("send");
    }

    /// An S3 notification body as S3 writes it, for `key` with `etag`.
    pub fn notification(&self, key: &str, etag: &str, size: u64) -> String {
        let encoded = key.replace(' ', "+");
        serde_json::json!({"Records": [{
            "eventVersion": "2.1", "eventSource": "aws:s3", "eventName": "ObjectCreated:Put",
            "eventTime": "2026-11-24T10:00:00.000Z",
            "s3": {"bucket": {"name": self.res.bucket}, "object": {"key": encoded, "size": size, "eTag": etag.trim_matches('"')}}
        }]})
        .to_string()
    }

    /// Messages in (visible + in flight) the main queue and the DLQ.
    pub async fn depths(&self) -> (u64, u64) {
        (
            cdc_worker::devkit::queue_depth(&self.aws, &self.res.queue_url)
                .await
                .expect("queue depth"),
            cdc_worker::devkit::queue_depth(&self.aws, &self.res.dlq_url)
                .await
                .expect("DLQ depth"),
        )
    }

    /// Waits until the queue is empty and the worker idle for a moment.
    pub async fn settle(&self, worker: &Worker, timeout: Duration) {
        cdc_worker::devkit::wait_until_idle(
            &self.aws,
            worker,
            &self.res.queue_url,
            Duration::from_millis(1500),
            timeout,
        )
        .await
        .expect("worker settles");
    }

    /// Turns the bucket's notifications off (files uploaded meanwhile are never announced,
    /// as if their messages were lost) and returns what [`Env::resume_notifications`]
    /// restores.
    pub async fn pause_notifications(&self) -> aws_sdk_s3::types::NotificationConfiguration {
        let saved = self
            .aws
            .s3
            .get_bucket_notification_configuration()
            .bucket(&self.res.bucket)
            .send()
            .await
            .expect("notification configuration");
        self.set_notifications(aws_sdk_s3::types::NotificationConfiguration::builder().build())
            .await;
        aws_sdk_s3::types::NotificationConfiguration::builder()
            .set_queue_configurations(Some(saved.queue_configurations().to_vec()))
            .build()
    }

    pub async fn resume_notifications(&self, saved: aws_sdk_s3::types::NotificationConfiguration) {
        self.set_notifications(saved).await;
    }

    async fn set_notifications(&self, config: aws_sdk_s3::types::NotificationConfiguration) {
        self.aws
            .s3
            .put_bucket_notification_configuration()
            .bucket(&self.res.bucket)
            .notification_configuration(config)
            .send()
            .await
            .expect("set notifications");
    }

    /// Waits until `check` holds, polling.
    pub async fn eventually<F, Fut>(&self, what: &str, timeout: Duration, mut check: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let started = Instant::now();
        while started.elapsed() < timeout {
            if check().await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        panic!("timed out after {}s waiting for: {what}", timeout.as_secs());
    }

    pub async fn alerts(&self) -> Vec<ReceivedAlert> {
        dev::drain_alerts(&self.aws, &self.res.alerts_queue_url)
            .await
            .expect("alerts")
    }

    /// Opens the DuckDB file (after the worker stopped).
    pub fn db(&self) -> duckdb::Connection {
        duckdb::Connection::open(&self.config.warehouse.duckdb.path).expect("open DuckDB")
    }

    /// The S3 keys the ledger records as applied, one entry per row, sorted: a file
    /// recorded twice shows twice (after the worker stopped).
    pub fn ledger_keys(&self) -> Vec<String> {
        let conn = self.db();
        let mut stmt = conn
            .prepare(&format!(
                "SELECT s3_key FROM {} WHERE status = 'applied' ORDER BY s3_key",
                cdc_worker::warehouse::LEDGER_TABLE
            ))
            .unwrap();
        stmt.query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    /// Every row of a table as text (NULL as None), sorted.
    pub fn rows(&self, table: &str, columns: &[&str]) -> Vec<Vec<Option<String>>> {
        let conn = self.db();
        let select: Vec<String> = columns
            .iter()
            .map(|c| format!("CAST({} AS VARCHAR)", cdc_worker::warehouse::sql::ident(c)))
            .collect();
        let sql = format!(
            "SELECT {} FROM {}",
            select.join(", "),
            cdc_worker::warehouse::sql::ident(table)
        );
        let mut stmt = conn.prepare(&sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
        let mut rows: Vec<Vec<Option<String>>> = stmt
            .query_map([], |r| {
                (0..columns.len())
                    .map(|i| r.get::<_, Option<String>>(i))
                    .collect()
            })
            .expect("query")
            .map(|r| r.expect("row"))
            .collect();
        rows.sort();
        rows
    }

    pub fn columns(&self, table: &str) -> Vec<(String, String)> {
        let conn = self.db();
        let mut stmt = conn
            .prepare("SELECT column_name, data_type FROM information_schema.columns WHERE table_name = ? ORDER BY ordinal_position")
            .expect("prepare");
        stmt.query_map([table], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
        })
        .expect("query")
        .map(|r| r.expect("row"))
        .collect()
    }
}

/// Parquet bytes for rows; `columns` are (name, DuckDB type).
pub fn parquet_bytes(columns: &[(&str, &str)], rows: &[Vec<Value>]) -> Vec<u8> {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("f.parquet");
    let columns: Vec<(String, String)> = columns
        .iter()
        .map(|(n, t)| (n.to_string(), t.to_string()))
        .collect();
    cdc_worker::devkit::parquet::write_parquet(&path, &columns, rows).expect("write parquet");
    std::fs::read(&path).expect("read parquet")
}

pub fn s(v: &str) -> Value {
    Value::Text(v.to_string())
}

pub fn i(v: i64) -> Value {
    Value::BigInt(v)
}

pub fn null() -> Value {
    Value::Null
}

/// A Parquet file with INT32 columns of these exact names, one row, written without
/// DuckDB (which refuses `Amount` beside `amount`).
pub fn parquet_with_columns(names: &[&str], values: &[i32]) -> Vec<u8> {
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    let fields: Vec<String> = names
        .iter()
        .map(|n| format!("REQUIRED INT32 {n};"))
        .collect();
    let schema = parquet::schema::parser::parse_message_type(&format!(
        "message schema {{ {} }}",
        fields.join(" ")
    ))
    .expect("schema");
    let mut out = Vec::new();
    let mut writer = SerializedFileWriter::new(
        &mut out,
        std::sync::Arc::new(schema),
        std::sync::Arc::new(WriterProperties::builder().build()),
    )
    .expect("writer");
    let mut group = writer.next_row_group().expect("row group");
    let mut n = 0;
    while let Some(mut column) = group.next_column().expect("column") {
        column
            .typed::<parquet::data_type::Int32Type>()
            .write_batch(&values[n..=n], None, None)
            .expect("write");
        column.close().expect("close column");
        n += 1;
    }
    group.close().expect("close group");
    writer.close().expect("close file");
    out
}
