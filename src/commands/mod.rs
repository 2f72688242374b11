//! The operator's commands around the daemon: schema history, status, replay, leases,
//! health and connection checks. `anyhow` lives here, at the edge.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;

use crate::aws::AwsClients;
use crate::config::Config;
use crate::dms::{KeyClass, TableRouter, classify_key};
use crate::schema::policy::IncompatiblePolicy;
use crate::schema::store::{SchemaStore, TableStatus};
use crate::storage::ObjectStore;
use crate::worker;

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
            TableStatus::Held { .. } => "held".to_string(),
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
    let aws = AwsClients::new(&config.aws).await;
    let schemas = SchemaStore::from_config(config, ObjectStore::new(aws.s3.clone()));
    let before = schemas
        .load(table)
        .await?
        .with_context(|| format!("no schema recorded for table `{table}`"))?;
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

pub async fn status(config: &Config) -> anyhow::Result<()> {
    // A running worker knows its lanes; the rest comes from S3 and the warehouse.
    if let Some(addr) = config.telemetry.listen {
        let response = get_local(addr, "/status")
            .await
            .ok()
            .filter(|r| r.status().is_success());
        match response {
            Some(r) => {
                let lanes: Vec<crate::health::LaneStatus> =
                    r.json().await.context("reading /status")?;
                println!("lanes of the worker on {addr}:");
                println!(
                    "{:<20} {:>8} {:>9} {:>9}  held",
                    "table", "waiting", "oldest s", "failures"
                );
                for l in &lanes {
                    let oldest = l
                        .oldest_pending_s
                        .map(|s| format!("{s:.1}"))
                        .unwrap_or_else(|| "-".into());
                    println!(
                        "{:<20} {:>8} {:>9} {:>9}  {}",
                        l.table,
                        l.pending_files,
                        oldest,
                        l.consecutive_failures,
                        l.held.as_deref().unwrap_or("-")
                    );
                }
                println!();
            }
            None => {
                println!(
                    "(no worker answers on {}: lanes are shown for a running worker)\n",
                    local_url(addr, "/status")
                )
            }
        }
    }
    let aws = AwsClients::new(&config.aws).await;
    let store = ObjectStore::new(aws.s3.clone());
    let schemas = SchemaStore::from_config(config, store.clone());
    let mut tables = schemas.tables().await?;
    tables.sort();
    let ledger = match worker::connect_warehouse(config, store) {
        Ok(w) => w.ledger_summary().await.unwrap_or_default(),
        Err(e) => {
            println!("(warehouse not readable while a worker holds it, or unreachable: {e:#})");
            vec![]
        }
    };
    println!(
        "{:<20} {:<8} {:<10} last applied file",
        "table", "schema", "status"
    );
    for t in &tables {
        let stored = schemas.load(t).await?.map(|s| s.current);
        let (version, status) = match &stored {
            Some(c) => (
                format!("v{}", c.version),
                match &c.status {
                    TableStatus::Active => "active".to_string(),
                    TableStatus::Held { reason, .. } => format!("HELD: {reason}"),
                    TableStatus::Ignored { .. } => "ignored".to_string(),
                },
            ),
            None => ("-".into(), "-".into()),
        };
        let last = ledger
            .iter()
            .find(|l| &l.table == t)
            .map(|l| format!("{} ({})", l.key, l.applied_at))
            .unwrap_or_else(|| "-".into());
        println!("{t:<20} {version:<8} {status:<10} {last}");
    }
    Ok(())
}

/// Sends synthetic S3 notifications for a table's files, in DMS order.
pub async fn replay(
    config: &Config,
    table: &str,
    since: Option<&str>,
    dry_run: bool,
) -> anyhow::Result<()> {
    let aws = AwsClients::new(&config.aws).await;
    let store = ObjectStore::new(aws.s3.clone());
    let schemas = SchemaStore::from_config(config, store.clone());
    let router = TableRouter::new(&config.routing);
    // The source folder: from the schema history, else every source that routes here.
    let source = schemas.load(table).await?.and_then(|s| s.current.source);
    let prefix = config.source.prefix.trim_end_matches('/');
    let folder = match &source {
        Some(s) => {
            let (schema, name) = s
                .split_once('.')
                .context("malformed source in schema document")?;
            if prefix.is_empty() {
                format!("{schema}/{name}/")
            } else {
                format!("{prefix}/{schema}/{name}/")
            }
        }
        None => {
            if prefix.is_empty() {
                String::new()
            } else {
                format!("{prefix}/")
            }
        }
    };
    let listed = store.list(&config.source.bucket, &folder, since).await?;
    let mut files = Vec::new();
    for o in listed {
        if let Ok(KeyClass::Dms(k)) = classify_key(&config.source.prefix, &o.key)
            && router.render(&k.source) == table
        {
            files.push((k.order(), o));
        }
    }
    files.sort_by(|a, b| a.0.cmp(&b.0));
    if files.is_empty() {
        anyhow::bail!(
            "no DMS files of table `{table}` under s3://{}/{folder}",
            config.source.bucket
        );
    }
    let progress = indicatif::ProgressBar::new(files.len() as u64);
    if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        progress.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} replay {pos}/{len} [{bar:40}] {per_sec} eta {eta}",
            )
            .expect("template")
            .progress_chars("=> "),
        );
    } else {
        progress.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    for chunk in files.chunks(10) {
        let records: Vec<serde_json::Value> = chunk
            .iter()
            .map(|(_, o)| {
                serde_json::json!({
                    "eventVersion": "2.1", "eventSource": "aws:s3", "eventName": "ObjectCreated:Put",
                    "eventTime": chrono::Utc::now().to_rfc3339(),
                    "s3": {"bucket": {"name": config.source.bucket},
                           "object": {"key": encode_key(&o.key), "size": o.size, "eTag": o.etag.trim_matches('"')}}
                })
            })
            .collect();
        if dry_run {
            for (_, o) in chunk {
                println!("would send {}", o.key);
            }
        } else {
            aws.sqs
                .send_message()
                .queue_url(&config.queue.url)
                .message_body(serde_json::json!({ "Records": records }).to_string())
                .send()
                .await
                .context("sending replay notifications")?;
        }
        progress.inc(chunk.len() as u64);
    }
    progress.finish_and_clear();
    println!(
        "{} {} files of `{table}` to {}",
        if dry_run { "would replay" } else { "replayed" },
        files.len(),
        config.queue.url
    );
    Ok(())
}

/// URL-encodes a key as S3 notifications do (space as `+`).
fn encode_key(key: &str) -> String {
    const SET: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'/')
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'~')
        .remove(b' ');
    percent_encoding::utf8_percent_encode(key, SET)
        .to_string()
        .replace(' ', "+")
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

/// Probes the local worker's `/healthz`.
pub async fn health(config: &Config) -> anyhow::Result<()> {
    let addr = config
        .telemetry
        .listen
        .context("telemetry.listen is not set: the worker serves no health endpoint")?;
    let url = local_url(addr, "/healthz");
    let response = get_local(addr, "/healthz").await?;
    anyhow::ensure!(
        response.status().is_success(),
        "GET {url}: {}",
        response.status()
    );
    Ok(())
}

pub async fn check_connection(config: Config) -> anyhow::Result<()> {
    let aws = AwsClients::new(&config.aws).await;
    let mut failures = 0;
    let mut report = |what: &str, result: anyhow::Result<String>| match result {
        Ok(detail) => println!("ok    {what}: {detail}"),
        Err(e) => {
            failures += 1;
            println!("FAIL  {what}: {e:#}");
        }
    };
    let queue = crate::queue::SqsQueue::new(aws.sqs.clone(), &config.queue.url);
    report(
        "queue",
        crate::queue::Queue::ping(&queue)
            .await
            .map(|_| config.queue.url.clone())
            .map_err(Into::into),
    );
    let store = ObjectStore::new(aws.s3.clone());
    report(
        "source bucket",
        store
            .list(&config.source.bucket, &config.source.prefix, None)
            .await
            .map(|l| {
                format!(
                    "s3://{}/{} ({} objects listed)",
                    config.source.bucket,
                    config.source.prefix,
                    l.len()
                )
            })
            .map_err(Into::into),
    );
    report(
        "metadata bucket",
        store
            .get(config.metadata_bucket(), &config.metadata.table_keys_key())
            .await
            .map(|o| {
                format!(
                    "s3://{}/{} {}",
                    config.metadata_bucket(),
                    config.metadata.table_keys_key(),
                    if o.is_some() {
                        "found"
                    } else {
                        "(no table keys document)"
                    }
                )
            })
            .map_err(Into::into),
    );
    match &config.alerts.sns_topic_arn {
        Some(topic) => report(
            "alerts topic",
            aws.sns
                .get_topic_attributes()
                .topic_arn(topic)
                .send()
                .await
                .map(|_| topic.clone())
                .map_err(|e| anyhow::anyhow!("{}", aws_sdk_sns::error::DisplayErrorContext(&e))),
        ),
        None => {
            println!("skip  alerts topic: alerts.sns_topic_arn not set (alerts are only logged)")
        }
    }
    let warehouse = worker::connect_warehouse(&config, store);
    match warehouse {
        Ok(w) => report(
            &format!("warehouse ({})", w.name()),
            w.ping(Duration::from_secs(10))
                .await
                .map(|_| "answers".to_string())
                .map_err(Into::into),
        ),
        Err(e) => report("warehouse", Err(e)),
    }
    if failures > 0 {
        anyhow::bail!("{failures} check(s) failed");
    }
    Ok(())
}
