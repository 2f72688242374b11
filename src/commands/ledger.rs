//! `cdc-worker ledger`: a table's ledger, and the way out of a table blocked by a file
//! that can never be applied. `skip` records the file as skipped (its notification is then
//! acknowledged, and the table's later files go on); `forget` makes the worker treat the
//! file as never seen (it is applied when it comes again). Both are recorded in the ledger
//! and announced on the alerts topic.

use std::collections::BTreeSet;

use anyhow::Context;

use crate::alerts::{Alert, AlertKind, Alerts, Severity};
use crate::aws::AwsClients;
use crate::batch::{BatchFile, LedgerStatus};
use crate::config::Config;
use crate::dms::{KeyClass, TableRouter, classify_key};
use crate::schema::store::SchemaStore;
use crate::storage::{ObjectStore, bare_etag};
use crate::warehouse::Warehouse;

/// What an operator does to one file of a table's ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Edit {
    Skip,
    Forget,
}

impl Edit {
    fn status(self) -> LedgerStatus {
        match self {
            Edit::Skip => LedgerStatus::Skipped,
            Edit::Forget => LedgerStatus::Forgotten,
        }
    }
}

/// Prints a table's ledger, newest entry first.
pub async fn show(config: &Config, table: &str, limit: usize) -> anyhow::Result<()> {
    let aws = AwsClients::new(&config.aws).await;
    let store = ObjectStore::new(aws.s3.clone());
    let warehouse = super::status::open_for_reading(config, &store)?;
    let entries = warehouse.ledger_entries(table, limit).await?;
    if entries.is_empty() {
        println!("no ledger entries for table `{table}`");
        return Ok(());
    }
    println!(
        "{:<26} {:<9} {:<22} file (detail)",
        "recorded at", "status", "batch"
    );
    for e in entries {
        let detail = if e.detail.is_empty() {
            String::new()
        } else {
            format!(" ({})", e.detail)
        };
        let batch = if e.batch_id.is_empty() {
            "-"
        } else {
            &e.batch_id
        };
        println!(
            "{:<26} {:<9} {batch:<22} {}{detail}",
            e.applied_at, e.status, e.key
        );
    }
    Ok(())
}

/// Skips or forgets one file of a table (a key, or a file name the table's ledger or
/// folder knows).
pub async fn edit(
    config: &Config,
    table: &str,
    file: &str,
    edit: Edit,
    reason: &str,
) -> anyhow::Result<()> {
    let aws = AwsClients::new(&config.aws).await;
    let store = ObjectStore::new(aws.s3.clone());
    let warehouse = open_for_writing(config, &store)?;
    let key = resolve_key(config, &aws, &store, warehouse.as_ref(), table, file).await?;
    let object = store
        .list(&config.source.bucket, &key, None)
        .await?
        .into_iter()
        .find(|o| o.key == key);
    let order_key = match classify_key(&config.source.prefix, &key) {
        Ok(KeyClass::Dms(k)) => k.order().sort_key(),
        _ => String::new(),
    };
    let batch_file = BatchFile {
        bucket: config.source.bucket.clone(),
        key: key.clone(),
        size: object.as_ref().map_or(0, |o| o.size),
        etag: object
            .as_ref()
            .map(|o| bare_etag(&o.etag).to_string())
            .unwrap_or_default(),
        order_key,
    };
    let detail = format!("{} by an operator: {reason}", edit.status().as_str());
    warehouse
        .record_status(
            table,
            std::slice::from_ref(&batch_file),
            edit.status(),
            &detail,
        )
        .await
        .context("recording it in the ledger")?;
    let alert = announcement(table, &batch_file, edit, reason, object.is_none());
    let alerts = Alerts::new(aws.sns.clone(), config.alerts.sns_topic_arn.clone());
    alerts.publish(&alert).await;
    alerts.flush(std::time::Duration::from_secs(10)).await;
    println!("{}", alert.message);
    if let Some(steps) = &alert.next_steps {
        println!("{steps}");
    }
    Ok(())
}

fn announcement(table: &str, file: &BatchFile, edit: Edit, reason: &str, gone: bool) -> Alert {
    let uri = file.uri();
    let (message, next_steps) = match edit {
        Edit::Skip => (
            format!("{uri}: skipped by an operator ({reason}); it will never be applied"),
            format!(
                "Running workers stop waiting for it within a minute and apply `{table}`'s later files. If its notification is in the dead-letter queue, redrive it (it is acknowledged) or purge it. `cdc-worker ledger forget {table} {}` undoes the skip.",
                file.key
            ),
        ),
        Edit::Forget => (
            format!(
                "{uri}: forgotten by an operator ({reason}); the worker applies it when it comes again"
            ),
            format!(
                "Send it again: `cdc-worker replay --table {table} --since ...`, or redrive the dead-letter queue. Applying it again is only safe if it never took effect (a rejected or skipped file, or one whose content you replaced)."
            ),
        ),
    };
    let mut alert = Alert::new(AlertKind::LedgerEdited, Severity::Warning, table, message);
    alert.file = Some(uri);
    alert.next_steps = Some(if gone {
        format!(
            "{next_steps} (The object is no longer in S3; the ledger records it without an ETag.)"
        )
    } else {
        next_steps
    });
    alert
}

/// The S3 key `file` names: itself when it has a `/`, else the one key of the table's
/// ledger or folder with that file name.
async fn resolve_key(
    config: &Config,
    aws: &AwsClients,
    store: &ObjectStore,
    warehouse: &dyn Warehouse,
    table: &str,
    file: &str,
) -> anyhow::Result<String> {
    if file.contains('/') {
        return Ok(file.to_string());
    }
    let suffix = format!("/{file}");
    let mut found = BTreeSet::new();
    for entry in warehouse.ledger_entries(table, 100_000).await? {
        if entry.key.ends_with(&suffix) {
            found.insert(entry.key);
        }
    }
    let schemas = SchemaStore::from_config(config, store.clone());
    let router = TableRouter::new(&config.routing);
    for (source, folder) in super::replay::table_folders(config, aws, &schemas).await? {
        if router.render(&source) != table {
            continue;
        }
        for o in store.list(&config.source.bucket, &folder, None).await? {
            if o.key.ends_with(&suffix) {
                found.insert(o.key);
            }
        }
    }
    match found.len() {
        1 => Ok(found.into_iter().next().expect("one")),
        0 => anyhow::bail!(
            "no file named `{file}` in the ledger or the S3 folder of table `{table}`; give its S3 key (`cdc-worker status` shows the file a blocked table waits behind)"
        ),
        _ => anyhow::bail!(
            "`{file}` names several files of `{table}`: {}; give the S3 key",
            found.into_iter().collect::<Vec<_>>().join(", ")
        ),
    }
}

/// The warehouse with write access. DuckDB allows one process per file: a running worker
/// holds it, so the command says to stop the worker first.
fn open_for_writing(
    config: &Config,
    store: &ObjectStore,
) -> anyhow::Result<std::sync::Arc<dyn Warehouse>> {
    crate::worker::connect_warehouse(config, store.clone()).map_err(|e| {
        anyhow::anyhow!(super::status::explain_duckdb_open(
            &format!("{e:#}"),
            &config.warehouse.duckdb.path
        ))
    })
}
