//! The operator's commands around the daemon: schema history, status, replay, leases,
//! health and connection checks. `anyhow` lives here, at the edge.

pub mod ledger;
mod replay;
mod status;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;

pub use replay::replay;
pub use status::status;

use crate::aws::AwsClients;
use crate::config::{Config, WarehouseKind};
use crate::preflight::{self, Check, Status};
use crate::schema::policy::IncompatiblePolicy;
use crate::schema::store::{GuardedBy, SchemaStore, TableStatus};
use crate::storage::ObjectStore;

pub async fn schema_show(config: &Config, table: &str) -> anyhow::Result<()> {
    let aws = AwsClients::new(&config.aws).await;
    let schemas = SchemaStore::from_config(config, ObjectStore::new(aws.s3.clone()));
    let stored = schemas.load(table).await?.with_context(|| {
        format!(
            "no schema recorded for table `{table}` (s3://{}/{})",
            schemas.bucket(),
            schemas.current_key(table)
        )
    })?;
    println!("{}", serde_json::to_string_pretty(&stored.current)?);
    Ok(())
}

pub async fn schema_history(config: &Config, table: &str) -> anyhow::Result<()> {
    let aws = AwsClients::new(&config.aws).await;
    let schemas = SchemaStore::from_config(config, ObjectStore::new(aws.s3.clone()));
    let versions = schemas.history(table).await?;
    if versions.is_empty() {
        anyhow::bail!("no schema history for table `{table}`");
    }
    for v in versions {
        let status = match &v.status {
            TableStatus::Active => "accepted".to_string(),
            TableStatus::Held { .. } | TableStatus::Guarded { .. } => "held".to_string(),
            TableStatus::Ignored { .. } => "ignored".to_string(),
        };
        println!(
            "v{}  {}  {}  {}",
            v.version,
            v.detected_at,
            status,
            v.file.as_deref().unwrap_or("-")
        );
        for c in &v.changes {
            println!("      change: {}", c.describe());
        }
        for a in &v.actions {
            if let Ok(action) = serde_json::from_value::<serde_json::Value>(a.clone()) {
                println!("      action: {}", action);
            }
        }
        println!(
            "      columns: {}",
            v.columns
                .iter()
                .map(|c| format!("{} {}", c.name, c.ty))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}

pub async fn schema_accept(
    config: &Config,
    table: &str,
    incompatible: Option<&str>,
) -> anyhow::Result<()> {
    let resolution = match incompatible {
        None => None,
        Some("variant") => Some(IncompatiblePolicy::Variant),
        Some("cast") => Some(IncompatiblePolicy::Cast),
        Some("ignore") => Some(IncompatiblePolicy::Ignore),
        Some(other) => anyhow::bail!("--incompatible takes variant, cast or ignore, not `{other}`"),
    };
    let (schemas, before) = recorded_schema(config, table).await?;
    if let TableStatus::Guarded { reason, .. } = &before.current.status {
        anyhow::bail!(
            "table `{table}` is held by a reload or the destructive-change guard, not its schema policy ({reason}); nothing was changed. Use `cdc-worker table accept-reload {table}` or `cdc-worker table release-guard {table}`, as the reason says"
        );
    }
    let TableStatus::Held {
        version, reason, ..
    } = &before.current.status
    else {
        // Nothing to release: say so, and what holds a table otherwise, without a change.
        anyhow::bail!(
            "table `{table}` is not held by its schema policy (status: {}); nothing was changed. If `cdc-worker status` shows it held, the reason there names a condition of its files (a key column missing, unusable column names, key values that repeat): fix that and the worker resumes the table by itself",
            before.current.status.label()
        );
    };
    println!("accepting v{version} of `{table}`: {reason}");
    let stored = schemas
        .update(table, |c| {
            if let Some(r) = resolution {
                let changed: Vec<String> = c
                    .columns
                    .iter()
                    .map(|col| crate::schema::diff::fold(&col.name))
                    .collect();
                for name in changed {
                    c.resolutions.entry(name).or_insert(r);
                }
            }
            c.status = TableStatus::Active;
        })
        .await?;
    println!(
        "table `{table}` released at schema v{}; running workers apply its waiting files within seconds",
        stored.current.version
    );
    Ok(())
}

/// What `cdc-worker table accept-reload` and `release-guard` release.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    Reload,
    Deletes,
}

/// The schema store and a table's recorded schema, for the commands that change its status.
async fn recorded_schema(
    config: &Config,
    table: &str,
) -> anyhow::Result<(SchemaStore, crate::schema::store::Stored)> {
    let aws = AwsClients::new(&config.aws).await;
    let schemas = SchemaStore::from_config(config, ObjectStore::new(aws.s3.clone()));
    let stored = schemas
        .load(table)
        .await?
        .with_context(|| format!("no schema recorded for table `{table}`"))?;
    Ok((schemas, stored))
}

/// Releases a table guarded by the reload policy or the destructive-change guard: the
/// status goes back to active with what was released recorded, which the worker uses once.
pub async fn release_guarded(config: &Config, table: &str, release: Release) -> anyhow::Result<()> {
    let (schemas, before) = recorded_schema(config, table).await?;
    let (hold, reason) = match &before.current.status {
        TableStatus::Guarded { hold, reason, .. } => (hold.clone(), reason.clone()),
        other => anyhow::bail!(
            "table `{table}` is not held by a reload or the destructive-change guard (status: {}); nothing was changed",
            other.label()
        ),
    };
    match (&hold, release) {
        (GuardedBy::Reload { .. }, Release::Reload)
        | (GuardedBy::Deletes { .. }, Release::Deletes) => {}
        (GuardedBy::Reload { .. }, Release::Deletes) => anyhow::bail!(
            "table `{table}` waits for its reload, not a mass delete: use `cdc-worker table accept-reload {table}` ({reason})"
        ),
        (GuardedBy::Deletes { .. }, Release::Reload) => anyhow::bail!(
            "table `{table}` waits for a mass delete, not a reload: use `cdc-worker table release-guard {table}` ({reason})"
        ),
    }
    println!("releasing `{table}`: {reason}");
    schemas
        .update(table, |c| {
            match &hold {
                GuardedBy::Reload { generation } => c.released.reload = Some(*generation),
                GuardedBy::Deletes { file } => c.released.deletes_from = Some(file.clone()),
            }
            c.status = TableStatus::Active;
        })
        .await?;
    println!("table `{table}` released; running workers apply it within seconds");
    Ok(())
}

pub async fn lease_show(config: &Config, table: &str) -> anyhow::Result<()> {
    let aws = AwsClients::new(&config.aws).await;
    let leases = crate::lease::LeaseManager::from_config(config, ObjectStore::new(aws.s3.clone()));
    match leases.read(table).await? {
        Some((doc, _)) => println!("{}", serde_json::to_string_pretty(&doc)?),
        None => println!("table `{table}` has never been leased"),
    }
    Ok(())
}

/// Takes, keeps (renewing) and releases a table's lease `rounds` times, printing a JSON
/// line per event with the wall-clock time in milliseconds.
pub async fn lease_hold(
    config: &Config,
    table: &str,
    hold_for: Duration,
    rounds: u32,
) -> anyhow::Result<()> {
    if !config.lease.enabled {
        eprintln!(
            "warning: lease.enabled is false in this config; workers that share it do not take leases, so holding one pauses nothing"
        );
    }
    let aws = AwsClients::new(&config.aws).await;
    let leases = crate::lease::LeaseManager::from_config(config, ObjectStore::new(aws.s3.clone()));
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64
    };
    let event = |name: &str, token: u64| {
        println!(
            "{}",
            serde_json::json!({"event": name, "table": table, "holder": leases.holder(), "token": token, "at_ms": now_ms()})
        );
    };
    for _ in 0..rounds {
        let fence = loop {
            if let Some(fence) = leases.acquire(table).await? {
                break fence;
            }
            tokio::time::sleep(Duration::from_millis(100 + fastrand::u64(..100))).await;
        };
        event("acquired", fence.token);
        let renewing = leases.keep_alive(table);
        tokio::time::sleep(hold_for).await;
        renewing.stop().await;
        event("releasing", fence.token);
        leases.release(table).await;
    }
    Ok(())
}

/// The worker's own endpoint as seen from this host: a wildcard listen address is
/// reached on loopback, a specific one on itself.
fn local_url(listen: SocketAddr, path: &str) -> String {
    let ip = if listen.ip().is_unspecified() {
        std::net::IpAddr::from([127, 0, 0, 1])
    } else {
        listen.ip()
    };
    format!("http://{}{path}", SocketAddr::new(ip, listen.port()))
}

async fn get_local(listen: SocketAddr, path: &str) -> anyhow::Result<reqwest::Response> {
    let url = local_url(listen, path);
    reqwest::Client::new()
        .get(&url)
        .timeout(Duration::from_secs(3))
        .send()
        .await
        .with_context(|| format!("GET {url}"))
}

/// Probes the local worker's `/healthz`: fails when the worker does not answer, or
/// answers that it cannot receive from its queue.
pub async fn health(config: &Config) -> anyhow::Result<()> {
    let addr = config
        .telemetry
        .listen
        .context("telemetry.listen is not set: the worker serves no health endpoint")?;
    let url = local_url(addr, "/healthz");
    let response = get_local(addr, "/healthz").await?;
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    anyhow::ensure!(status.is_success(), "GET {url}: {status}: {}", body.trim());
    Ok(())
}

/// Contacts every dependency (the checks the worker runs at startup, and the warehouse)
/// and prints one line per check; creates nothing.
pub async fn check_connection(config: Config) -> anyhow::Result<()> {
    let aws = AwsClients::new(&config.aws).await;
    let mut report = preflight::run(&config, &aws).await;
    report.checks.push(check_warehouse(&config, &aws).await);
    for c in &report.checks {
        println!("{} {}: {}", c.status.tag(), c.name, c.detail);
    }
    match report.failures() {
        0 => Ok(()),
        1 => anyhow::bail!("1 check failed"),
        n => anyhow::bail!("{n} checks failed"),
    }
}

/// The warehouse answers. DuckDB is opened read-only, so a missing file is not created
/// and a file a running worker holds is reported as such, not as a failure.
async fn check_warehouse(config: &Config, aws: &AwsClients) -> Check {
    let store = ObjectStore::new(aws.s3.clone());
    let name = match config.warehouse.kind {
        WarehouseKind::Duckdb => "warehouse (duckdb)",
        WarehouseKind::Firebolt => "warehouse (firebolt)",
    };
    let check = |status, detail: String| Check {
        name,
        status,
        detail,
    };
    if config.warehouse.kind == WarehouseKind::Duckdb {
        let path = &config.warehouse.duckdb.path;
        if !path.exists() {
            return check(
                Status::Ok,
                format!(
                    "{} does not exist yet; the worker creates it when it starts",
                    path.display()
                ),
            );
        }
    }
    let warehouse = match status::open_for_reading(config, &store) {
        Ok(w) => w,
        Err(e) => {
            let text = format!("{e:#}");
            let held = text.contains("is in use by a running worker");
            return check(if held { Status::Ok } else { Status::Fail }, text);
        }
    };
    match warehouse.ping(Duration::from_secs(10)).await {
        Ok(()) => {
            let detail = match config.warehouse.kind {
                WarehouseKind::Duckdb => {
                    format!("{} answers", config.warehouse.duckdb.path.display())
                }
                WarehouseKind::Firebolt => "answers".to_string(),
            };
            check(Status::Ok, detail)
        }
        Err(e) => check(Status::Fail, e.to_string()),
    }
}
