//! Which columns identify a row of a table. Precedence: `[tables.NAME] key` in the config
//! file, then the `table_keys.json` document in S3, then the target table's declared
//! primary key (primary index on Firebolt). No key: the table is appended.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::batch::TargetTable;
use crate::config::{Config, KeySpec};
use crate::dms::SourceTable;
use crate::storage::{ObjectStore, StorageError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KeySource {
    Config,
    TableKeysJson,
    Warehouse,
    None,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedKey {
    pub columns: Vec<String>,
    pub source: KeySource,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("reading s3://{bucket}/{key}: {source}")]
    Read {
        bucket: String,
        key: String,
        source: StorageError,
    },
    /// A broken document must not silently turn merges into appends.
    #[error(
        "s3://{bucket}/{key} is not a valid table keys document ({reason}); expected {{\"table\": \"col\" | [\"col\", ...] | null}}"
    )]
    Invalid {
        bucket: String,
        key: String,
        reason: String,
    },
}

/// `table_keys.json`: table -> key, where `null` means "no key".
type TableKeys = HashMap<String, Option<KeySpec>>;

pub struct KeyResolver {
    configured: HashMap<String, Option<KeySpec>>,
    store: ObjectStore,
    bucket: String,
    key: String,
    refresh: Duration,
    cache: Mutex<Option<(Instant, TableKeys)>>,
}

impl KeyResolver {
    pub fn new(config: &Config, store: ObjectStore) -> Self {
        let configured = config
            .tables
            .iter()
            .filter_map(|(name, t)| {
                t.key.as_ref().map(|k| {
                    let spec = if k.columns().is_empty() {
                        None
                    } else {
                        Some(k.clone())
                    };
                    (name.to_lowercase(), spec)
                })
            })
            .collect();
        Self {
            configured,
            store,
            bucket: config.metadata_bucket().to_string(),
            key: config.metadata.table_keys_key(),
            refresh: config.metadata.table_keys_refresh,
            cache: Mutex::new(None),
        }
    }

    /// Where the table keys document is read from.
    pub fn document_uri(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.key)
    }

    /// The key of `table` (target name), routed from `source`.
    pub async fn resolve(
        &self,
        table: &str,
        source: &SourceTable,
        target: Option<&TargetTable>,
    ) -> Result<ResolvedKey, KeyError> {
        if let Some(spec) = self.configured.get(&table.to_lowercase()) {
            return Ok(resolved(spec.as_ref(), KeySource::Config));
        }
        let document = self.document().await?;
        let lookup = [
            table.to_string(),
            table.to_lowercase(),
            source.to_string(),
            source.table.clone(),
            source.table.to_lowercase(),
        ];
        for name in &lookup {
            if let Some(spec) = document.get(name) {
                return Ok(resolved(spec.as_ref(), KeySource::TableKeysJson));
            }
        }
        if let Some(t) = target.filter(|t| !t.primary_key.is_empty()) {
            return Ok(ResolvedKey {
                columns: t.primary_key.clone(),
                source: KeySource::Warehouse,
            });
        }
        Ok(ResolvedKey {
            columns: vec![],
            source: KeySource::None,
        })
    }

    async fn document(&self) -> Result<TableKeys, KeyError> {
        if let Some((at, keys)) = self.cache.lock().expect("key cache").as_ref()
            && at.elapsed() < self.refresh
        {
            return Ok(keys.clone());
        }
        let object = self
            .store
            .get(&self.bucket, &self.key)
            .await
            .map_err(|source| KeyError::Read {
                bucket: self.bucket.clone(),
                key: self.key.clone(),
                source,
            })?;
        let keys = match object {
            None => TableKeys::new(),
            Some(o) => parse_table_keys(&o.body).map_err(|reason| KeyError::Invalid {
                bucket: self.bucket.clone(),
                key: self.key.clone(),
                reason,
            })?,
        };
        *self.cache.lock().expect("key cache") = Some((Instant::now(), keys.clone()));
        Ok(keys)
    }
}

fn resolved(spec: Option<&KeySpec>, source: KeySource) -> ResolvedKey {
    match spec.map(|s| s.columns()).filter(|c| !c.is_empty()) {
        Some(columns) => ResolvedKey { columns, source },
        None => ResolvedKey {
            columns: vec![],
            source,
        },
    }
}

fn parse_table_keys(body: &[u8]) -> Result<TableKeys, String> {
    let keys: TableKeys = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    for (table, spec) in &keys {
        if let Some(spec) = spec
            && spec.columns().iter().any(|c| c.is_empty())
        {
            return Err(format!("table `{table}` has an empty key column name"));
        }
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documented_format_parses() {
        let keys = parse_table_keys(
            br#"{"orders": "id", "order_items": ["order_id", "line_no"], "events": null}"#,
        )
        .unwrap();
        assert_eq!(keys["orders"].as_ref().unwrap().columns(), vec!["id"]);
        assert_eq!(keys["order_items"].as_ref().unwrap().columns().len(), 2);
        assert!(keys["events"].is_none());
        assert!(parse_table_keys(br#"{"orders": 5}"#).is_err());
        assert!(parse_table_keys(br#"["orders"]"#).is_err());
    }
}
