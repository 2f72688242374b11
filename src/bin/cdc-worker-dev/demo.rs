//! `dev-setup`, `simulate` and `demo`: LocalStack resources, simulated DMS output, and the
//! whole pipeline end to end with a summary of the target tables and alerts.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;

use cdc_worker::aws::AwsClients;
use cdc_worker::config::Config;
use cdc_worker::devkit::resources::{self, Resources};
use cdc_worker::devkit::{resource_spec, wait_until_idle};
use cdc_worker::schema::store::SchemaStore;
use cdc_worker::storage::{ObjectStore, WriteCondition};
use cdc_worker::worker::Worker;

use crate::simulate;

pub async fn dev_setup(config: &Config) -> anyhow::Result<Resources> {
    let aws = AwsClients::new(&config.aws).await;
    let resources = resources::ensure_resources(&aws, &resource_spec(config)).await?;
    if resources.queue_url != config.queue.url {
        tracing::warn!(created = %resources.queue_url, configured = %config.queue.url, "the queue URL differs from queue.url; use the created one");
    }
    println!("bucket        s3://{}", resources.bucket);
    println!("queue         {}", resources.queue_url);
    println!("dead letters  {}", resources.dlq_url);
    println!("alerts topic  {}", resources.topic_arn);
    println!("alerts inbox  {}", resources.alerts_queue_url);
    Ok(resources)
}

/// Drains the alerts inbox and prints each alert: subject, then the body as JSON.
pub async fn print_alerts(config: &Config) -> anyhow::Result<()> {
    let aws = AwsClients::new(&config.aws).await;
    let topic = resource_spec(config).topic;
    let inbox = resources::alerts_inbox_url(&aws, &topic).await?;
    let alerts = resources::drain_alerts(&aws, &inbox).await?;
    for a in &alerts {
        println!("{}", a.subject);
        println!("  {}", a.body);
    }
    let n = alerts.len();
    eprintln!(
        "{n} {} from {inbox}",
        if n == 1 { "alert" } else { "alerts" }
    );
    Ok(())
}

pub async fn simulate(
    config: &Config,
    seed: u64,
    pace_ms: u64,
) -> anyhow::Result<simulate::Simulation> {
    let aws = AwsClients::new(&config.aws).await;
    let store = ObjectStore::new(aws.s3.clone());
    let dir = tempfile::tempdir()?;
    let sim = simulate::demo(dir.path(), &config.source.prefix, seed)?;
    store
        .put(
            config.metadata_bucket(),
            &config.metadata.table_keys_key(),
            Bytes::from(serde_json::to_vec_pretty(&sim.table_keys)?),
            "application/json",
            WriteCondition::Unconditional,
        )
        .await?;
    simulate::upload(
        &store,
        &config.source.bucket,
        &sim,
        Duration::from_millis(pace_ms),
    )
    .await?;
    println!(
        "uploaded {} DMS files to s3://{}/{}",
        sim.files.len(),
        config.source.bucket,
        config.source.prefix
    );
    Ok(sim)
}

/// Starts the demo from a clean slate: its DMS and metadata prefixes, queue and DuckDB
/// file. Refused unless the config points at a local endpoint (LocalStack).
async fn reset_demo(
    config: &Config,
    aws: &AwsClients,
    resources: &Resources,
) -> anyhow::Result<()> {
    let local = config
        .aws
        .endpoint_url
        .as_deref()
        .and_then(|e| reqwest::Url::parse(e).ok())
        .and_then(|u| u.host_str().map(str::to_owned))
        .is_some_and(|h| {
            matches!(
                h.as_str(),
                "localhost" | "127.0.0.1" | "[::1]" | "localstack"
            )
        });
    anyhow::ensure!(
        local,
        "the demo resets its bucket, queue and DuckDB file; it only runs against LocalStack (aws.endpoint_url on localhost)"
    );
    let store = ObjectStore::new(aws.s3.clone());
    for (bucket, prefix) in [
        (config.source.bucket.as_str(), config.source.prefix.as_str()),
        (config.metadata_bucket(), config.metadata.prefix.as_str()),
    ] {
        for o in store.list(bucket, prefix, None).await? {
            store.delete(bucket, &o.key).await?;
        }
    }
    aws.sqs
        .purge_queue()
        .queue_url(&resources.queue_url)
        .send()
        .await
        .context("purging the demo queue")?;
    let _ = resources::drain_alerts(aws, &resources.alerts_queue_url).await;
    let db = &config.warehouse.duckdb.path;
    // DuckDB's WAL is the database path with `.wal` appended, whatever its extension.
    let mut wal = db.clone().into_os_string();
    wal.push(".wal");
    for path in [db.clone(), PathBuf::from(wal)] {
        if path.exists() {
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    Ok(())
}

pub async fn demo(mut config: Config) -> anyhow::Result<()> {
    let started = Instant::now();
    println!(
        "== cdc-worker demo: LocalStack S3 -> SQS -> cdc-worker -> DuckDB ({})",
        config.warehouse.duckdb.path.display()
    );
    let resources = dev_setup(&config).await?;
    config.queue.url = resources.queue_url.clone();
    config.alerts.sns_topic_arn = Some(resources.topic_arn.clone());
    // The simulated DMS output is dated 2026-11-24: against today's clock every table
    // would miss its freshness objective, which says nothing about the demo.
    config.alerts.freshness_objective = Duration::ZERO;
    let aws = AwsClients::new(&config.aws).await;
    reset_demo(&config, &aws, &resources).await?;

    let worker = Worker::start(config.clone()).await?;
    println!(
        "== worker started ({} receivers); simulating DMS: full load, then 12 minutes of CDC",
        config.worker.concurrency
    );
    let sim = simulate(&config, 7, 20).await?;
    wait_until_idle(
        &aws,
        &worker,
        &resources.queue_url,
        Duration::from_secs(3),
        Duration::from_secs(180),
    )
    .await?;

    let warehouse = worker.warehouse().clone();
    let mut rows = BTreeMap::new();
    for table in sim.expected_rows.keys() {
        rows.insert(table.clone(), warehouse.row_count(table).await.unwrap_or(0));
    }
    worker.shutdown().await;

    let schemas = SchemaStore::from_config(&config, ObjectStore::new(aws.s3.clone()));
    let all_match = print_tables(&schemas, &sim.expected_rows, &rows).await;
    let alerts = resources::drain_alerts(&aws, &resources.alerts_queue_url).await?;
    println!();
    println!(
        "alerts published to {} ({}):",
        resources.topic_arn,
        alerts.len()
    );
    for a in &alerts {
        println!("  {}", a.subject);
    }
    println!();
    println!(
        "DuckDB file: {}  (inspect it with the DuckDB CLI: duckdb {} \"SELECT * FROM orders LIMIT 5\")",
        config.warehouse.duckdb.path.display(),
        config.warehouse.duckdb.path.display()
    );
    println!("done in {:.1}s", started.elapsed().as_secs_f64());
    if !all_match {
        anyhow::bail!("some tables do not match the simulated source");
    }
    Ok(())
}

/// Prints each table's rows beside the simulation's expectation; true when all match.
async fn print_tables(
    schemas: &SchemaStore,
    expected_rows: &BTreeMap<String, usize>,
    rows: &BTreeMap<String, u64>,
) -> bool {
    println!();
    println!(
        "{:<14} {:>10} {:>10}  {:<8} schema",
        "table", "rows", "expected", "match"
    );
    let mut all_match = true;
    for (table, expected) in expected_rows {
        let actual = rows.get(table).copied().unwrap_or(0);
        let version = schemas
            .load(table)
            .await
            .ok()
            .flatten()
            .map(|s| {
                let n = s.current.columns.len();
                let noun = if n == 1 { "column" } else { "columns" };
                format!("v{} ({n} {noun})", s.current.version)
            })
            .unwrap_or_default();
        let ok = actual == *expected as u64;
        all_match &= ok;
        println!(
            "{table:<14} {actual:>10} {expected:>10}  {:<8} {version}",
            if ok { "yes" } else { "NO" }
        );
    }
    all_match
}
