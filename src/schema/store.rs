//! Schema history in S3: the current schema of each table (the seed layout's
//! `<prefix>/schema_metadata/<table>_schema.json`, still readable as-is) and one object per
//! version under `schema_metadata/history/<table>/`. Writes use S3 conditional writes, so
//! concurrent workers cannot lose an update: exactly one of them creates each version (and
//! publishes its alert).

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::schema::dialect::Dialect;
use crate::schema::diff::{ChangeKind, SchemaChange};
use crate::schema::policy::{IncompatiblePolicy, SchemaPolicy};
use crate::schema::types::{Column, ColumnType, TableSchema};
use crate::storage::{ObjectStore, StorageError, WriteCondition};

/// Whether a table's files are being applied.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum TableStatus {
    #[default]
    Active,
    /// A policy stopped the table at `version`; `cdc-worker schema accept` releases it.
    Held {
        version: u64,
        reason: String,
        since: String,
        #[serde(default)]
        kinds: Vec<ChangeKind>,
    },
    /// `new_table = "ignore"`: files are dropped.
    Ignored { since: String },
    /// A reload or a destructive change waits for a person: `cdc-worker table
    /// accept-reload` or `cdc-worker table release-guard` releases it.
    Guarded {
        hold: GuardedBy,
        reason: String,
        since: String,
    },
}

/// What waits for a person on a guarded table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum GuardedBy {
    /// A reload's new generation is built and waits to replace the table (`dms.reload =
    /// "hold"`, or it is much smaller than the table).
    Reload { generation: u32 },
    /// A batch from this file on deletes a large part of the table.
    Deletes { file: String },
}

impl TableStatus {
    /// One word for people: active, held or ignored.
    pub fn label(&self) -> &'static str {
        match self {
            TableStatus::Active => "active",
            TableStatus::Held { .. } | TableStatus::Guarded { .. } => "held",
            TableStatus::Ignored { .. } => "ignored",
        }
    }
}

/// What a person released on a guarded table; the worker acts on it once.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Released {
    /// The reload generation accepted by `cdc-worker table accept-reload`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reload: Option<u32>,
    /// The file whose batch `cdc-worker table release-guard` let delete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletes_from: Option<String>,
}

impl Released {
    pub fn is_empty(&self) -> bool {
        self.reload.is_none() && self.deletes_from.is_none()
    }
}

/// `<table>_schema.json`: the last accepted source schema of a table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CurrentSchema {
    pub table: String,
    /// `schema.table` of the source; a different source routing here is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// 0 for a document written by an older loader.
    #[serde(default)]
    pub version: u64,
    pub columns: Vec<Column>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    #[serde(default)]
    pub status: TableStatus,
    /// Choices made when accepting incompatible type changes, by folded column name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub resolutions: BTreeMap<String, IncompatiblePolicy>,
    /// The key the table is applied with (source column names; empty: appended). `None` in
    /// documents written before keys were recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<Vec<String>>,
    /// Holds of the destructive-change guard or the reload policy a person released.
    #[serde(default, skip_serializing_if = "Released::is_empty")]
    pub released: Released,
}

impl CurrentSchema {
    pub fn schema(&self) -> TableSchema {
        TableSchema::new(self.columns.clone())
    }
}

/// `history/<table>/vNNNNNNNN.json`: one accepted (or held) schema version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SchemaVersion {
    pub table: String,
    pub version: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    pub columns: Vec<Column>,
    pub changes: Vec<SchemaChange>,
    #[serde(default)]
    pub actions: Vec<serde_json::Value>,
    pub policy: Option<SchemaPolicy>,
    /// The file that introduced this version (s3://bucket/key).
    pub file: Option<String>,
    pub detected_at: String,
    pub status: TableStatus,
    /// The key the table is applied with from this version on (see [`CurrentSchema::key`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<Vec<String>>,
}

/// A current document and the ETag it was read with.
#[derive(Debug, Clone)]
pub struct Stored {
    pub current: CurrentSchema,
    pub etag: String,
}

/// The outcome of [`SchemaStore::record`].
#[derive(Debug)]
pub enum Recorded {
    /// This worker created the version: it publishes the alert.
    Created(Stored),
    /// Another worker got there first; here is what is current now.
    Lost(Option<Stored>),
}

#[derive(Debug, thiserror::Error)]
pub enum SchemaStoreError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("s3://{bucket}/{key} is not a schema document: {reason}")]
    Unreadable {
        bucket: String,
        key: String,
        reason: String,
    },
    #[error("gave up writing s3://{bucket}/{key} after repeated concurrent updates")]
    Contended { bucket: String, key: String },
}

#[derive(Clone, Debug)]
pub struct SchemaStore {
    store: ObjectStore,
    bucket: String,
    prefix: String,
}

/// Encodes a table name for use in an S3 key: letters, digits, `_` and `-` stay; every
/// other byte becomes `%XX` (so `/`, `..` and quotes cannot escape the folder).
pub fn key_segment(table: &str) -> String {
    let mut out = String::with_capacity(table.len());
    for b in table.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl SchemaStore {
    /// The store where `config` keeps schemas (`metadata.bucket`, `metadata.prefix`).
    pub fn from_config(config: &crate::config::Config, store: ObjectStore) -> Self {
        Self::new(store, config.metadata_bucket(), &config.metadata.prefix)
    }

    pub fn new(store: ObjectStore, bucket: impl Into<String>, prefix: &str) -> Self {
        Self {
            store,
            bucket: bucket.into(),
            prefix: prefix.trim_end_matches('/').to_string(),
        }
    }

    pub fn current_key(&self, table: &str) -> String {
        format!(
            "{}/schema_metadata/{}_schema.json",
            self.prefix,
            key_segment(table)
        )
    }

    pub fn version_key(&self, table: &str, version: u64) -> String {
        format!(
            "{}/schema_metadata/history/{}/v{version:08}.json",
            self.prefix,
            key_segment(table)
        )
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The current schema of a table, if it has one.
    pub async fn load(&self, table: &str) -> Result<Option<Stored>, SchemaStoreError> {
        let key = self.current_key(table);
        let Some(object) = self.store.get(&self.bucket, &key).await? else {
            return Ok(None);
        };
        let current =
            parse_current(table, &object.body).map_err(|reason| SchemaStoreError::Unreadable {
                bucket: self.bucket.clone(),
                key: key.clone(),
                reason,
            })?;
        Ok(Some(Stored {
            current,
            etag: object.etag,
        }))
    }

    /// Records `version` as the next version after `previous`.
    pub async fn record(
        &self,
        previous: Option<&Stored>,
        mut version: SchemaVersion,
    ) -> Result<Recorded, SchemaStoreError> {
        let table = version.table.clone();
        version.version = previous.map(|p| p.current.version).unwrap_or(0) + 1;
        let version_key = self.version_key(&table, version.version);
        let body = Bytes::from(serde_json::to_vec_pretty(&version).expect("serializable"));
        match self
            .store
            .put(
                &self.bucket,
                &version_key,
                body,
                "application/json",
                WriteCondition::Absent,
            )
            .await
        {
            Ok(_) => {}
            Err(StorageError::PreconditionFailed { .. }) => {
                // Someone else made this version: make sure `current` reflects it.
                self.repair(&table, version.version).await?;
                return Ok(Recorded::Lost(self.load(&table).await?));
            }
            Err(e) => return Err(e.into()),
        }
        let mut current = current_of(
            &version,
            previous
                .map(|p| p.current.resolutions.clone())
                .unwrap_or_default(),
        );
        // A release a person gave is not undone by a new schema version.
        current.released = previous
            .map(|p| p.current.released.clone())
            .unwrap_or_default();
        let condition = match previous {
            Some(p) => WriteCondition::Matches(p.etag.clone()),
            None => WriteCondition::Absent,
        };
        match self.write_current(&current, condition).await {
            Ok(stored) => Ok(Recorded::Created(stored)),
            // The version is ours; only the status changed under us (an accept): retry
            // on top of the fresh document.
            Err(SchemaStoreError::Storage(StorageError::PreconditionFailed { .. })) => {
                let stored = self
                    .update(&table, |c| {
                        if c.version < current.version {
                            let resolutions = std::mem::take(&mut c.resolutions);
                            *c = current.clone();
                            c.resolutions = resolutions;
                        }
                    })
                    .await?;
                Ok(Recorded::Created(stored))
            }
            Err(e) => Err(e),
        }
    }

    /// Rewrites `current` from history version `version` if it lags behind (a writer
    /// crashed between the two writes).
    async fn repair(&self, table: &str, version: u64) -> Result<(), SchemaStoreError> {
        let key = self.version_key(table, version);
        let Some(object) = self.store.get(&self.bucket, &key).await? else {
            return Ok(());
        };
        let v: SchemaVersion =
            serde_json::from_slice(&object.body).map_err(|e| SchemaStoreError::Unreadable {
                bucket: self.bucket.clone(),
                key,
                reason: e.to_string(),
            })?;
        if self.load(table).await?.is_none() {
            // The writer of the version died before writing the current document (the
            // first version of a table): write it now, unless another worker just did.
            match self
                .write_current(&current_of(&v, BTreeMap::new()), WriteCondition::Absent)
                .await
            {
                Ok(_) => return Ok(()),
                Err(SchemaStoreError::Storage(StorageError::PreconditionFailed { .. })) => {}
                Err(e) => return Err(e),
            }
        }
        self.update(table, |c| {
            if c.version < v.version {
                c.version = v.version;
                c.columns = v.columns.clone();
                c.file = v.file.clone();
                c.updated_at = Some(v.detected_at.clone());
                c.status = v.status.clone();
                c.key = v.key.clone();
                if c.source.is_none() {
                    c.source = v.source.clone();
                }
            }
        })
        .await
        .map(|_| ())
    }

    /// Read-modify-write of the current document with `If-Match`, retried on conflicts.
    pub async fn update(
        &self,
        table: &str,
        mut change: impl FnMut(&mut CurrentSchema),
    ) -> Result<Stored, SchemaStoreError> {
        let key = self.current_key(table);
        for _ in 0..10 {
            let Some(mut stored) = self.load(table).await? else {
                return Err(SchemaStoreError::Storage(StorageError::NotFound {
                    bucket: self.bucket.clone(),
                    key: key.clone(),
                }));
            };
            change(&mut stored.current);
            match self
                .write_current(
                    &stored.current,
                    WriteCondition::Matches(stored.etag.clone()),
                )
                .await
            {
                Ok(s) => return Ok(s),
                Err(SchemaStoreError::Storage(StorageError::PreconditionFailed { .. })) => {
                    continue;
                }
                Err(e) => return Err(e),
            }
        }
        Err(SchemaStoreError::Contended {
            bucket: self.bucket.clone(),
            key,
        })
    }

    async fn write_current(
        &self,
        current: &CurrentSchema,
        condition: WriteCondition,
    ) -> Result<Stored, SchemaStoreError> {
        let body = Bytes::from(serde_json::to_vec_pretty(current).expect("serializable"));
        let etag = self
            .store
            .put(
                &self.bucket,
                &self.current_key(&current.table),
                body,
                "application/json",
                condition,
            )
            .await?;
        Ok(Stored {
            current: current.clone(),
            etag,
        })
    }

    /// Every recorded version of a table, oldest first.
    pub async fn history(&self, table: &str) -> Result<Vec<SchemaVersion>, SchemaStoreError> {
        let prefix = format!(
            "{}/schema_metadata/history/{}/",
            self.prefix,
            key_segment(table)
        );
        let mut versions = Vec::new();
        for listed in self.store.list(&self.bucket, &prefix, None).await? {
            if let Some(object) = self.store.get(&self.bucket, &listed.key).await? {
                let v: SchemaVersion = serde_json::from_slice(&object.body).map_err(|e| {
                    SchemaStoreError::Unreadable {
                        bucket: self.bucket.clone(),
                        key: listed.key.clone(),
                        reason: e.to_string(),
                    }
                })?;
                versions.push(v);
            }
        }
        versions.sort_by_key(|v| v.version);
        Ok(versions)
    }

    /// Tables that have a current schema document.
    pub async fn tables(&self) -> Result<Vec<String>, SchemaStoreError> {
        let prefix = format!("{}/schema_metadata/", self.prefix);
        let mut tables = Vec::new();
        for listed in self.store.list(&self.bucket, &prefix, None).await? {
            let Some(rest) = listed.key.strip_prefix(&prefix) else {
                continue;
            };
            if rest.contains('/') {
                continue;
            }
            if let Some(encoded) = rest.strip_suffix("_schema.json")
                && let Some(object) = self.store.get(&self.bucket, &listed.key).await?
            {
                match parse_current(encoded, &object.body) {
                    Ok(c) => tables.push(c.table),
                    Err(_) => tables.push(encoded.to_string()),
                }
            }
        }
        Ok(tables)
    }
}

/// Parses a current document, accepting older layouts: `{"columns": {"id": "bigint"}}` or
/// a bare `{"id": "bigint"}` map as an older loader may have written.
fn parse_current(table: &str, body: &[u8]) -> Result<CurrentSchema, String> {
    if let Ok(current) = serde_json::from_slice::<CurrentSchema>(body) {
        return Ok(current);
    }
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    let map = value
        .get("columns")
        .and_then(|c| c.as_object())
        .or_else(|| value.as_object())
        .ok_or("neither a schema document nor a column map")?;
    let mut columns = Vec::new();
    for (name, ty) in map {
        let text = ty
            .as_str()
            .or_else(|| ty.get("type").and_then(|t| t.as_str()))
            .ok_or_else(|| format!("column `{name}` has no type"))?;
        let ty = text
            .parse::<ColumnType>()
            .unwrap_or_else(|_| Dialect::Duckdb.parse_type(text));
        columns.push(Column::new(name.clone(), ty));
    }
    Ok(CurrentSchema {
        table: value
            .get("table")
            .and_then(|t| t.as_str())
            .unwrap_or(table)
            .to_string(),
        source: None,
        version: 0,
        columns,
        updated_at: None,
        file: None,
        status: TableStatus::Active,
        resolutions: BTreeMap::new(),
        key: None,
        released: Released::default(),
    })
}

/// The current document a version makes, keeping the resolutions accepted before.
fn current_of(
    version: &SchemaVersion,
    resolutions: BTreeMap<String, IncompatiblePolicy>,
) -> CurrentSchema {
    CurrentSchema {
        table: version.table.clone(),
        source: version.source.clone(),
        version: version.version,
        columns: version.columns.clone(),
        updated_at: Some(version.detected_at.clone()),
        file: version.file.clone(),
        status: version.status.clone(),
        resolutions,
        key: version.key.clone(),
        released: Released::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_segments_cannot_escape() {
        assert_eq!(key_segment("orders"), "orders");
        assert_eq!(key_segment("../x"), "%2E%2E%2Fx");
        assert_eq!(key_segment("a\"b c"), "a%22b%20c");
    }

    #[test]
    fn older_layouts_stay_readable() {
        let legacy = br#"{"columns": {"id": "bigint", "amount": "decimal(15,2)"}}"#;
        let c = parse_current("orders", legacy).unwrap();
        assert_eq!(c.version, 0);
        let columns: Vec<(&str, &ColumnType)> =
            c.columns.iter().map(|c| (c.name.as_str(), &c.ty)).collect();
        assert!(columns.contains(&("id", &ColumnType::Int64)), "{columns:?}");
        assert!(
            columns.contains(&(
                "amount",
                &ColumnType::Decimal {
                    precision: 15,
                    scale: 2
                }
            )),
            "{columns:?}"
        );
        assert_eq!(columns.len(), 2);
        let bare = br#"{"id": "INTEGER"}"#;
        assert_eq!(
            parse_current("t", bare).unwrap().columns[0].ty,
            ColumnType::Int32
        );
        assert!(parse_current("t", b"[1]").is_err());
    }
}
