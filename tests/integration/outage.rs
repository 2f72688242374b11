//! Outages longer than the queue's whole backoff budget: the worker's disk, then the
//! warehouse, fail every call for much longer than `maxReceiveCount` receives would last
//! with backoff, and then recover. Nothing may reach the dead-letter queue, every table must
//! end with exactly the source's rows, and each table is reported failing once and
//! recovered once. A file whose own data is refused is the one exception: it alone reaches
//! the dead-letter queue, and the other tables are unaffected.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use cdc_worker::batch::{
    ApplyPlan, ApplyStats, BatchFile, LedgerEntry, LedgerRecord, LedgerStatus, Staged, StagedFile,
    TargetTable,
};
use cdc_worker::config::{Config, KeySpec, TableConfig};
use cdc_worker::warehouse::{Warehouse, WarehouseError};
use cdc_worker::worker::Worker;

use crate::harness::{Env, i, s};

const CDC: &[(&str, &str)] = &[("Op", "VARCHAR"), ("id", "BIGINT"), ("v", "VARCHAR")];
const TABLES: [&str; 3] = ["accounts", "orders", "parcels"];
/// Files per table; each updates id 1 and inserts one row.
const FILES: u32 = 4;

fn keyed(c: &mut Config) {
    for t in TABLES.iter().chain(["fragile"].iter()) {
        c.tables.insert(
            t.to_string(),
            TableConfig {
                key: Some(KeySpec::One("id".into())),
                ..Default::default()
            },
        );
    }
    // The queue's whole backoff budget is a few seconds: 5 receives, 1 s doubling to 2 s.
    c.queue.retry_backoff = Duration::from_secs(1);
    c.queue.retry_backoff_max = Duration::from_secs(2);
    c.queue.visibility_timeout = Duration::from_secs(3);
    c.batch.linger = Duration::from_millis(300);
}

async fn upload_stream(env: &Env) {
    for n in 1..=FILES {
        for table in TABLES {
            let rows = vec![
                vec![s(if n == 1 { "I" } else { "U" }), i(1), s(&format!("v{n}"))],
                vec![s("I"), i(100 + n as i64), s("x")],
            ];
            env.put_parquet(
                &env.key(table, &format!("20261124-10{n:02}00000.parquet")),
                CDC,
                &rows,
            )
            .await;
        }
    }
}

fn expected_rows() -> Vec<Vec<Option<String>>> {
    let mut rows = vec![vec![Some("1".to_string()), Some(format!("v{FILES}"))]];
    for n in 1..=FILES {
        rows.push(vec![Some((100 + n).to_string()), Some("x".to_string())]);
    }
    rows
}

/// How many alerts of `kind` each table got.
fn alerts_per_table(
    alerts: &[cdc_worker::devkit::resources::ReceivedAlert],
    kind: &str,
) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for a in alerts.iter().filter(|a| a.body["alert"] == kind) {
        *counts
            .entry(a.body["table"].as_str().unwrap_or_default().to_string())
            .or_insert(0) += 1;
    }
    counts
}

async fn outlast_the_backoff_budget(env: &Env) {
    // Five receives with 1-2 s of backoff take under 10 s; the outage lasts three times that.
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(
            env.depths().await.1,
            0,
            "nothing reaches the DLQ during the outage"
        );
    }
}

async fn assert_recovered_exactly(env: &Env, worker: Worker) {
    env.settle(&worker, Duration::from_secs(60)).await;
    worker.shutdown().await;
    for table in TABLES {
        assert_eq!(
            env.rows(table, &["id", "v"]),
            expected_rows(),
            "{table} has the source's rows"
        );
    }
    assert_eq!(
        env.depths().await,
        (0, 0),
        "every message deleted, none in the DLQ"
    );
    let alerts = env.alerts().await;
    let once: HashMap<String, usize> = TABLES.iter().map(|t| (t.to_string(), 1)).collect();
    assert_eq!(
        alerts_per_table(&alerts, "table_failing"),
        once,
        "reported failing once per table"
    );
    assert_eq!(
        alerts_per_table(&alerts, "table_recovered"),
        once,
        "recovered once per table"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_disk_outage_longer_than_the_backoff_budget_strands_no_table() {
    // The download directory sits under a regular file: every download fails (ENOTDIR) as
    // it would on a full or missing disk, until the file is removed.
    let scratch = tempfile::tempdir().unwrap();
    let blocker = scratch.path().join("disk");
    std::fs::write(&blocker, b"not a directory").unwrap();
    let downloads: PathBuf = blocker.join("downloads");
    let env = Env::new("disk-outage", |c| {
        keyed(c);
        c.warehouse.duckdb.download_dir = Some(downloads.clone());
    })
    .await;
    let worker = env.start().await;
    upload_stream(&env).await;
    outlast_the_backoff_budget(&env).await;
    std::fs::remove_file(&blocker).unwrap();
    assert_recovered_exactly(&env, worker).await;
}

/// The real DuckDB warehouse behind a switch that makes every call fail as an unreachable
/// warehouse does.
struct Switchable {
    inner: Arc<dyn Warehouse>,
    down: AtomicBool,
}

impl Switchable {
    fn check(&self) -> Result<(), WarehouseError> {
        if self.down.load(Ordering::SeqCst) {
            Err(WarehouseError::Unavailable(
                "connection refused (test outage)".into(),
            ))
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl Warehouse for Switchable {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn max_identifier_len(&self) -> usize {
        self.inner.max_identifier_len()
    }
    fn column_name(&self, source: &str) -> String {
        self.inner.column_name(source)
    }
    async fn prepare(&self) -> Result<(), WarehouseError> {
        self.inner.prepare().await
    }
    async fn describe(&self, table: &str) -> Result<Option<TargetTable>, WarehouseError> {
        self.check()?;
        self.inner.describe(table).await
    }
    async fn applied(
        &self,
        table: &str,
        keys: &[String],
    ) -> Result<HashMap<String, LedgerRecord>, WarehouseError> {
        self.check()?;
        self.inner.applied(table, keys).await
    }
    async fn record_status(
        &self,
        table: &str,
        files: &[BatchFile],
        status: LedgerStatus,
        reason: &str,
    ) -> Result<(), WarehouseError> {
        self.check()?;
        self.inner.record_status(table, files, status, reason).await
    }
    async fn ledger_entries(
        &self,
        table: &str,
        limit: usize,
    ) -> Result<Vec<LedgerEntry>, WarehouseError> {
        self.check()?;
        self.inner.ledger_entries(table, limit).await
    }
    async fn last_applied(&self, table: &str) -> Result<Option<(String, String)>, WarehouseError> {
        self.check()?;
        self.inner.last_applied(table).await
    }
    async fn stage(&self, batch_id: &str, files: Vec<BatchFile>) -> Staged {
        self.inner.stage(batch_id, files).await
    }
    async fn apply(
        &self,
        plan: &ApplyPlan,
        files: &[StagedFile],
    ) -> Result<ApplyStats, WarehouseError> {
        self.check()?;
        self.inner.apply(plan, files).await
    }
    async fn row_count(&self, table: &str) -> Result<u64, WarehouseError> {
        self.inner.row_count(table).await
    }
    async fn repeated_keys(&self, table: &str, key: &[String]) -> Result<u64, WarehouseError> {
        self.check()?;
        self.inner.repeated_keys(table, key).await
    }
    async fn ledger_summary(&self) -> Result<Vec<LedgerEntry>, WarehouseError> {
        self.inner.ledger_summary().await
    }
    async fn promote(&self, table: &str, next: &str) -> Result<(), WarehouseError> {
        self.check()?;
        self.inner.promote(table, next).await
    }
    async fn merge_generation(
        &self,
        table: &str,
        next: &str,
        reload: &cdc_worker::batch::HistoryReload,
    ) -> Result<(), WarehouseError> {
        self.check()?;
        self.inner.merge_generation(table, next, reload).await
    }
    async fn discard(&self, next: &str) -> Result<(), WarehouseError> {
        self.check()?;
        self.inner.discard(next).await
    }
    async fn ping(&self, timeout: Duration) -> Result<(), WarehouseError> {
        self.check()?;
        self.inner.ping(timeout).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_warehouse_outage_with_one_poison_file_sends_only_that_file_to_the_dlq() {
    let env = Env::new("warehouse-outage", keyed).await;
    // A target whose CHECK constraint one file's data violates: that file is poison.
    env.db()
        .execute_batch("CREATE TABLE fragile (id BIGINT, v VARCHAR CHECK (length(v) < 5))")
        .unwrap();
    let real = cdc_worker::worker::open_warehouse(&env.config, env.store.clone())
        .await
        .unwrap();
    let warehouse = Arc::new(Switchable {
        inner: real,
        down: AtomicBool::new(true),
    });
    let worker = Worker::start_with_warehouse(env.config.clone(), warehouse.clone())
        .await
        .unwrap();
    upload_stream(&env).await;
    env.put_parquet(
        &env.key("fragile", "20261124-100000000.parquet"),
        CDC,
        &[vec![s("I"), i(1), s("far too long")]],
    )
    .await;
    env.put_parquet(
        &env.key("fragile", "20261124-100100000.parquet"),
        CDC,
        &[vec![s("I"), i(2), s("ok")]],
    )
    .await;
    outlast_the_backoff_budget(&env).await;
    warehouse.down.store(false, Ordering::SeqCst);
    env.eventually(
        "the poison file reaches the DLQ",
        Duration::from_secs(60),
        || async { env.depths().await.1 == 1 },
    )
    .await;
    // The healthy tables finish; the poison table's later file waits behind the poison one.
    env.eventually(
        "the healthy tables are applied",
        Duration::from_secs(60),
        || async {
            TABLES.iter().all(|t| {
                worker
                    .engine()
                    .lanes()
                    .iter()
                    .find(|(name, _)| name == t)
                    .is_none_or(|(_, l)| l.pending_files == 0)
            })
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (queue, dlq) = env.depths().await;
    worker.shutdown().await;
    assert_eq!(
        (queue, dlq),
        (1, 1),
        "the poison file in the DLQ, the file behind it in flight"
    );
    for table in TABLES {
        assert_eq!(
            env.rows(table, &["id", "v"]),
            expected_rows(),
            "{table} has the source's rows"
        );
    }
    assert_eq!(
        env.rows("fragile", &["id"]),
        Vec::<Vec<Option<String>>>::new()
    );
    let alerts = env.alerts().await;
    let recovered = alerts_per_table(&alerts, "table_recovered");
    for table in TABLES {
        assert_eq!(recovered.get(table), Some(&1), "{table} recovered once");
    }
    assert_eq!(
        recovered.get("fragile"),
        None,
        "the poison table does not recover"
    );
    let failing = alerts_per_table(&alerts, "table_failing");
    assert_eq!(
        failing.get("fragile"),
        Some(&2),
        "the poison table is reported for the outage, then for its file"
    );
    let poison_alert = alerts
        .iter()
        .rfind(|a| a.body["alert"] == "table_failing" && a.body["table"] == "fragile")
        .unwrap();
    assert!(
        poison_alert.body["next_steps"]
            .as_str()
            .unwrap_or_default()
            .contains("20261124-100000000.parquet"),
        "the alert names the poison file: {}",
        poison_alert.body
    );
}
