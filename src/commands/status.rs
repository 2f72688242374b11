//! `cdc-worker status`: each table's schema version and status (from S3), and its lane,
//! last applied file, key and mode. A running worker is asked (its `/status`): DuckDB
//! admits one process per file, so nothing else can read the warehouse while it runs.
//! Without a worker the warehouse is read directly (read-only: nothing is created).

use std::collections::BTreeSet;

use std::time::Duration;

use anyhow::Context;

use super::{get_local, local_url};
use crate::apply::freshness;
use crate::aws::AwsClients;
use crate::config::{Config, WarehouseKind};
use crate::dms::{KeyClass, SourceTable, classify_key};
use crate::health::TableReport;
use crate::keys::KeyResolver;
use crate::schema::store::{CurrentSchema, GuardedBy, SchemaStore, TableStatus};
use crate::storage::ObjectStore;
use crate::warehouse::{self, Warehouse};

pub async fn status(config: &Config) -> anyhow::Result<()> {
    let aws = AwsClients::new(&config.aws).await;
    let store = ObjectStore::new(aws.s3.clone());
    let schemas = SchemaStore::from_config(config, store.clone());
    let (reports, origin) = match ask_worker(config).await {
        Ok(reports) => (reports, "as the running worker reports it".to_string()),
        Err(why) => match from_warehouse(config, &store, &schemas).await {
            Ok(reports) => (reports, format!("from the warehouse ({why})")),
            Err(e) => {
                println!("({why}; the warehouse cannot be read either: {e:#})");
                (vec![], String::new())
            }
        },
    };
    let mut names: BTreeSet<String> = schemas.tables().await?.into_iter().collect();
    names.extend(reports.iter().map(|r| r.table.clone()));
    if names.is_empty() {
        println!("no tables yet: the worker has applied nothing and recorded no schema");
        return Ok(());
    }
    if !origin.is_empty() {
        println!("tables, {origin}:");
    }
    println!(
        "{:<24} {:<7} {:<8} {:>7} {:>8} {:>9}  {:<20} last applied file",
        "table", "schema", "status", "waiting", "failures", "freshness", "mode (key)"
    );
    for name in names {
        let current = schemas.load(&name).await?.map(|s| s.current);
        let (version, status) = match &current {
            Some(c) => (
                format!("v{}", c.version),
                match &c.status {
                    TableStatus::Active => "active".to_string(),
                    TableStatus::Held { .. } => "HELD".to_string(),
                    TableStatus::Guarded { hold, .. } => match hold {
                        GuardedBy::Reload { generation } => {
                            format!("HELD (reload to generation {generation} waits)")
                        }
                        GuardedBy::Deletes { .. } => "HELD (mass delete waits)".to_string(),
                    },
                    TableStatus::Ignored { .. } => "ignored".to_string(),
                },
            ),
            None => ("-".into(), "-".into()),
        };
        let report = reports
            .iter()
            .find(|r| r.table == name)
            .cloned()
            .unwrap_or_default();
        let waiting = if report.lane {
            report.pending_files.to_string()
        } else {
            "-".into()
        };
        let last = match (&report.last_applied_file, &report.last_applied_at) {
            (Some(file), Some(at)) => format!("{file} (newest commit {at})"),
            (Some(file), None) => file.clone(),
            _ => "-".into(),
        };
        println!(
            "{name:<24} {version:<7} {status:<8} {waiting:>7} {:>8} {:>9}  {:<20} {last}",
            report.consecutive_failures,
            freshness_text(&report),
            mode_text(&report)
        );
        for note in notes(&name, current.as_ref(), &report) {
            println!("{:<24} {note}", "");
        }
    }
    Ok(())
}

/// The lines under a table's row: why it is held, the file it waits behind, the
/// freshness objective it misses.
fn notes(name: &str, current: Option<&CurrentSchema>, report: &TableReport) -> Vec<String> {
    let mut notes = Vec::new();
    // A policy hold is recorded in S3; a condition hold (a missing key column, say)
    // only the running lane knows.
    let held = match current.map(|c| &c.status) {
        Some(TableStatus::Held { reason, .. } | TableStatus::Guarded { reason, .. }) => {
            Some(reason.clone())
        }
        _ => report.held.clone(),
    };
    if let Some(reason) = held {
        notes.push(format!("held: {reason}"));
    }
    if let Some(file) = &report.blocked_by {
        notes.push(format!(
            "blocked by: {file} (later files wait behind it; `cdc-worker ledger skip {name} FILE --reason ...` if it can never be applied)"
        ));
    }
    if let Some(reload) = &report.reload {
        notes.push(format!("reload: {reload}"));
    } else if let Some(g) = report.generation.filter(|g| *g > 1) {
        notes.push(format!("generation {g} (reloaded by DMS {} times)", g - 1));
    }
    notes.extend(objective_note(report));
    notes
}

/// Without a worker to ask: the freshness the last applied file's name implies (a CDC
/// file's DMS time; the ordering column's values are only known to a running worker).
fn freshness_from_name(config: &Config, report: &mut TableReport) {
    let key = report.last_applied_file.as_deref().unwrap_or_default();
    let Ok(KeyClass::Dms(dms)) = classify_key(&config.source.prefix, key) else {
        return;
    };
    if let Some(at) = dms.cdc_time() {
        let age = std::time::SystemTime::now()
            .duration_since(at)
            .unwrap_or_default();
        report.newest_change_at = Some(freshness::rfc3339(at));
        report.freshness_s = Some(age.as_secs_f64());
        report.freshness_objective_s = config
            .freshness_objective(&report.table)
            .map(|o| o.as_secs_f64());
    }
}

/// How far behind the table is (`2h 0m`), or `-` before its first commit.
fn freshness_text(report: &TableReport) -> String {
    report
        .freshness_s
        .map(|s| freshness::short(Duration::from_secs_f64(s.max(0.0))))
        .unwrap_or_else(|| "-".into())
}

/// A line under a table that misses its freshness objective.
fn objective_note(report: &TableReport) -> Option<String> {
    let (age, objective) = (report.freshness_s?, report.freshness_objective_s?);
    (age > objective).then(|| {
        format!(
            "freshness objective {} missed: the newest applied change is from {}",
            humantime::format_duration(Duration::from_secs_f64(objective)),
            report.newest_change_at.as_deref().unwrap_or("-")
        )
    })
}

/// `merge (order_id, line_no)`, `append (no key)`, or `-` when unknown.
fn mode_text(report: &TableReport) -> String {
    match (report.mode.as_deref(), &report.key) {
        (Some("append"), _) => "append (no key)".into(),
        (Some(mode), Some(key)) => format!("{mode} ({})", key.join(", ")),
        (Some(mode), None) => mode.to_string(),
        (None, _) => "-".into(),
    }
}

/// The running worker's `/status`; `Err` says why there is none to ask.
async fn ask_worker(config: &Config) -> Result<Vec<TableReport>, String> {
    let Some(addr) = config.telemetry.listen else {
        return Err("telemetry.listen is not set, so no worker can be asked".into());
    };
    let url = local_url(addr, "/status");
    let response = get_local(addr, "/status")
        .await
        .map_err(|_| format!("no worker answers on {url}"))?;
    if !response.status().is_success() {
        return Err(format!("{url} answered {}", response.status()));
    }
    response
        .json()
        .await
        .map_err(|e| format!("{url} answered something else than a table list: {e}"))
}

/// What the warehouse's ledger says, with each table's key as the worker would resolve
/// it. The DuckDB file is opened read-only: a running worker holding it is named.
async fn from_warehouse(
    config: &Config,
    store: &ObjectStore,
    schemas: &SchemaStore,
) -> anyhow::Result<Vec<TableReport>> {
    let warehouse = open_for_reading(config, store)?;
    let keys = KeyResolver::new(config, store.clone());
    let mut reports = Vec::new();
    for entry in warehouse.ledger_summary().await? {
        let last = warehouse.last_applied(&entry.table).await?;
        let generation = last
            .as_ref()
            .map(|(order, _)| crate::batch::split_order_key(order).0);
        let mut report = TableReport {
            table: entry.table.clone(),
            generation,
            last_applied_file: last.map(|(_, k)| k).or(Some(entry.key)),
            last_applied_at: Some(entry.applied_at),
            ..Default::default()
        };
        freshness_from_name(config, &mut report);
        let source = schemas
            .load(&entry.table)
            .await
            .ok()
            .flatten()
            .and_then(|s| s.current.source)
            .and_then(|s| {
                let (schema, table) = s.split_once('.')?;
                Some(SourceTable {
                    schema: schema.into(),
                    table: table.into(),
                })
            });
        if let Some(source) = source {
            let target = warehouse.describe(&entry.table).await.ok().flatten();
            if let Ok(key) = keys.resolve(&entry.table, &source, target.as_ref()).await {
                report.mode = Some(
                    if key.columns.is_empty() {
                        "append"
                    } else {
                        "merge"
                    }
                    .into(),
                );
                report.key = Some(key.columns);
            }
        }
        reports.push(report);
    }
    Ok(reports)
}

/// The configured warehouse for reading only: DuckDB read-only (a missing file is not
/// created), Firebolt as configured.
pub(super) fn open_for_reading(
    config: &Config,
    store: &ObjectStore,
) -> anyhow::Result<Box<dyn Warehouse>> {
    Ok(match config.warehouse.kind {
        WarehouseKind::Duckdb => {
            let path = &config.warehouse.duckdb.path;
            anyhow::ensure!(
                path.exists(),
                "{} does not exist yet (the worker creates it when it starts)",
                path.display()
            );
            Box::new(
                warehouse::duckdb::Duckdb::open_read_only(
                    &config.warehouse.duckdb,
                    &config.dms.op_column,
                    store.clone(),
                )
                .map_err(|e| anyhow::anyhow!(explain_duckdb_open(&e.to_string(), path)))?,
            )
        }
        WarehouseKind::Firebolt => Box::new(
            warehouse::firebolt::Firebolt::open(
                &config.warehouse.firebolt,
                &config.dms.op_column,
                store.clone(),
            )
            .context("configuring the Firebolt warehouse")?,
        ),
    })
}

/// DuckDB's lock error names the process holding the file; say what it means.
pub(super) fn explain_duckdb_open(error: &str, path: &std::path::Path) -> String {
    if error.contains("Could not set lock") || error.contains("Conflicting lock") {
        let pid = error
            .split("PID ")
            .nth(1)
            .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
            .filter(|p| !p.is_empty())
            .map(|p| format!(" (PID {p})"))
            .unwrap_or_default();
        format!(
            "{} is in use by a running worker{pid}: DuckDB lets one process open the file; ask that worker (telemetry.listen, `cdc-worker status`) or stop it to read the tables",
            path.display()
        )
    } else {
        format!("opening {}: {error}", path.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_duckdb_file_is_explained() {
        let error = "opening /data/w.duckdb: IO Error: Could not set lock on file \"/data/w.duckdb\": Conflicting lock is held in /usr/bin/cdc-worker (PID 4242) by user root.";
        assert_eq!(
            explain_duckdb_open(error, std::path::Path::new("/data/w.duckdb")),
            "/data/w.duckdb is in use by a running worker (PID 4242): DuckDB lets one process open the file; ask that worker (telemetry.listen, `cdc-worker status`) or stop it to read the tables"
        );
    }

    #[test]
    fn modes_read_as_words() {
        let mut r = TableReport {
            mode: Some("merge".into()),
            key: Some(vec!["order_id".into(), "line_no".into()]),
            ..Default::default()
        };
        assert_eq!(mode_text(&r), "merge (order_id, line_no)");
        r.mode = Some("append".into());
        assert_eq!(mode_text(&r), "append (no key)");
    }
}
