//! `cdc-worker replay`: re-drives a table's files through the queue as synthetic S3
//! notifications, in DMS order (full-load files by counter, then CDC files by name), from
//! a full listing of the table's folder. Safe: the ledger skips what is applied.

use std::collections::BTreeSet;

use anyhow::Context;

use crate::aws::AwsClients;
use crate::config::Config;
use crate::dms::{DmsOrder, KeyClass, SourceTable, TableRouter, classify_key};
use crate::schema::store::SchemaStore;
use crate::storage::{ListedObject, ObjectStore};

/// Where `--since` starts: a key (its date folders known) or a file name.
struct Since {
    order: DmsOrder,
    by_name: bool,
    text: String,
}

impl Since {
    fn parse(prefix: &str, text: &str) -> anyhow::Result<Self> {
        let (key, by_name) = if text.contains('/') {
            (text.to_string(), false)
        } else {
            (format!("schema/table/{text}"), true)
        };
        let prefix = if by_name { "" } else { prefix };
        match classify_key(prefix, &key) {
            Ok(KeyClass::Dms(k)) => Ok(Self {
                order: k.order(),
                by_name,
                text: text.to_string(),
            }),
            _ => anyhow::bail!(
                "--since `{text}` is neither a DMS file name (LOAD00000001.parquet, 20261124-101500123.parquet) nor the S3 key of one under source.prefix"
            ),
        }
    }

    fn admits(&self, order: &DmsOrder) -> bool {
        if self.by_name {
            order.after_by_name(&self.order)
        } else {
            *order > self.order
        }
    }
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
    let since = since
        .map(|s| Since::parse(&config.source.prefix, s))
        .transpose()?;
    let sources = table_folders(config, &aws, &schemas).await?;
    let ours: Vec<&(SourceTable, String)> = sources
        .iter()
        .filter(|(s, _)| router.render(s) == table)
        .collect();
    if ours.is_empty() {
        let known: BTreeSet<String> = sources.iter().map(|(s, _)| router.render(s)).collect();
        anyhow::bail!(unknown_table(config, &router, table, &known));
    }
    let mut files: Vec<(DmsOrder, ListedObject)> = Vec::new();
    for (source, folder) in ours {
        for o in store.list(&config.source.bucket, folder, None).await? {
            if let Ok(KeyClass::Dms(k)) = classify_key(&config.source.prefix, &o.key)
                && &k.source == source
                && since.as_ref().is_none_or(|s| s.admits(&k.order()))
            {
                files.push((k.order(), o));
            }
        }
    }
    files.sort_by(|a, b| a.0.cmp(&b.0));
    let (Some(first), Some(last)) = (files.first(), files.last()) else {
        let after = since
            .map(|s| format!(" after `{}`", s.text))
            .unwrap_or_default();
        anyhow::bail!(
            "no DMS files of table `{table}`{after} under s3://{}/{}",
            config.source.bucket,
            folder(&config.source.prefix)
        );
    };
    let range = format!("{} .. {}", first.0.file_name(), last.0.file_name());
    send(config, &aws, &files, dry_run).await?;
    println!(
        "{} {} of `{table}` ({range}) to {}",
        if dry_run { "would replay" } else { "replayed" },
        count(files.len(), "file", "files"),
        config.queue.url
    );
    Ok(())
}

async fn send(
    config: &Config,
    aws: &AwsClients,
    files: &[(DmsOrder, ListedObject)],
    dry_run: bool,
) -> anyhow::Result<()> {
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
        if dry_run {
            for (_, o) in chunk {
                println!("would send {}", o.key);
            }
        } else {
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
            aws.sqs
                .send_message()
                .queue_url(&config.queue.url)
                .message_body(serde_json::json!({ "Records": records }).to_string())
                .send()
                .await
                .map_err(|e| {
                    anyhow::anyhow!(
                        "SQS queue {}: {}",
                        config.queue.url,
                        crate::aws::explain(&e)
                    )
                })
                .context("sending replay notifications")?;
        }
        progress.inc(chunk.len() as u64);
    }
    progress.finish_and_clear();
    Ok(())
}

/// `1 file`, `3 files`.
pub(super) fn count(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

fn folder(prefix: &str) -> String {
    let trimmed = prefix.trim_end_matches('/');
    if trimmed.is_empty() {
        String::new()
    } else {
        format!("{trimmed}/")
    }
}

/// Every source table folder under the prefix (`prefix/schema/table/`), from S3's
/// folder listing, plus those the schema store knows (their files may be gone).
pub(super) async fn table_folders(
    config: &Config,
    aws: &AwsClients,
    schemas: &SchemaStore,
) -> anyhow::Result<Vec<(SourceTable, String)>> {
    let bucket = &config.source.bucket;
    let root = folder(&config.source.prefix);
    let mut found = BTreeSet::new();
    for schema_folder in subfolders(aws, bucket, &root).await? {
        for table_folder in subfolders(aws, bucket, &schema_folder).await? {
            let rest = &table_folder[root.len()..];
            let mut parts = rest.trim_end_matches('/').splitn(2, '/');
            if let (Some(schema), Some(table)) = (parts.next(), parts.next()) {
                found.insert((
                    SourceTable {
                        schema: schema.into(),
                        table: table.into(),
                    },
                    table_folder.clone(),
                ));
            }
        }
    }
    for target in schemas.tables().await.unwrap_or_default() {
        let Ok(Some(stored)) = schemas.load(&target).await else {
            continue;
        };
        if let Some((schema, table)) = stored
            .current
            .source
            .as_deref()
            .and_then(|s| s.split_once('.'))
        {
            found.insert((
                SourceTable {
                    schema: schema.into(),
                    table: table.into(),
                },
                format!("{root}{schema}/{table}/"),
            ));
        }
    }
    Ok(found.into_iter().collect())
}

/// The folders directly under `prefix` (S3 `CommonPrefixes` with delimiter `/`).
async fn subfolders(aws: &AwsClients, bucket: &str, prefix: &str) -> anyhow::Result<Vec<String>> {
    let mut pages = aws
        .s3
        .list_objects_v2()
        .bucket(bucket)
        .prefix(prefix)
        .delimiter("/")
        .into_paginator()
        .send();
    let mut folders = Vec::new();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| {
            anyhow::anyhow!(
                "listing s3://{bucket}/{prefix}: {}",
                crate::aws::explain(&e)
            )
        })?;
        folders.extend(
            page.common_prefixes()
                .iter()
                .filter_map(|p| p.prefix().map(str::to_string)),
        );
    }
    Ok(folders)
}

/// `--table` names a target table; say which ones exist, and what a source name maps to.
fn unknown_table(
    config: &Config,
    router: &TableRouter,
    table: &str,
    known: &BTreeSet<String>,
) -> String {
    let location = format!(
        "s3://{}/{}",
        config.source.bucket,
        folder(&config.source.prefix)
    );
    let mut text = format!("no DMS files of table `{table}` under {location}");
    if let Some((schema, name)) = table.split_once('.') {
        let target = router.render(&SourceTable {
            schema: schema.into(),
            table: name.into(),
        });
        if target != table {
            text.push_str(&format!(
                "; --table takes the target table's name: source table {table} is `{target}` (routing.table_name = \"{}\")",
                config.routing.table_name
            ));
        }
    }
    if known.is_empty() {
        text.push_str(&format!(
            "; there are no table folders under {location} (source.prefix must be DMS's BucketFolder)"
        ));
    } else {
        let names: Vec<&str> = known.iter().map(String::as_str).collect();
        text.push_str(&format!("; tables: {}", names.join(", ")));
    }
    text
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

#[cfg(test)]
mod tests {
    use super::*;

    fn order(key: &str) -> DmsOrder {
        match classify_key("dms", key).unwrap() {
            KeyClass::Dms(k) => k.order(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn since_follows_dms_order_for_keys_and_names() {
        let load2 = order("dms/s/t/LOAD00000002.parquet");
        let cdc1 = order("dms/s/t/2026/11/24/20261124-100000000.parquet");
        let cdc2 = order("dms/s/t/2026/11/24/20261124-100100000.parquet");
        let by_key = Since::parse("dms", "dms/s/t/LOAD00000001.parquet").unwrap();
        assert!(
            by_key.admits(&load2) && by_key.admits(&cdc1),
            "a LOAD key: later loads and every CDC file"
        );
        let by_key = Since::parse("dms", "dms/s/t/2026/11/24/20261124-100000000.parquet").unwrap();
        assert!(!by_key.admits(&load2) && !by_key.admits(&cdc1) && by_key.admits(&cdc2));
        let by_name = Since::parse("dms", "20261124-100000000.parquet").unwrap();
        assert!(
            !by_name.admits(&cdc1),
            "the named file itself, in its date folder, is not resent"
        );
        assert!(by_name.admits(&cdc2) && !by_name.admits(&load2));
        let err = Since::parse("dms", "part-0001.parquet")
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.starts_with("--since `part-0001.parquet` is neither a DMS file name"),
            "{err}"
        );
    }

    #[test]
    fn an_unknown_table_lists_the_known_ones() {
        let config = Config::from_toml(
            "[queue]\nurl = \"http://q\"\n[source]\nbucket = \"my-dms-bucket\"\nprefix = \"dms\"\n",
        )
        .unwrap();
        let router = TableRouter::new(&config.routing);
        let known: BTreeSet<String> = ["customers".to_string(), "orders".to_string()].into();
        assert_eq!(
            unknown_table(&config, &router, "public.customers", &known),
            "no DMS files of table `public.customers` under s3://my-dms-bucket/dms/; --table takes the target table's name: source table public.customers is `customers` (routing.table_name = \"{table}\"); tables: customers, orders"
        );
        assert_eq!(count(1, "file", "files"), "1 file");
    }
}
