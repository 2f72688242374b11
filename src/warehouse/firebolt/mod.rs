//! The Firebolt warehouse (Cloud or Core) behind the same trait as DuckDB.
//!
//! - [`client`]: the HTTP client (auth in [`auth`], wire format in [`protocol`], errors in
//!   [`error`]), shared by every worker.
//! - [`stage`]: footers read with S3 range requests; Firebolt reads the data itself.
//! - [`apply`]: staging table, COPY, check, DDL, then MERGE/append, fence and ledger in one
//!   transaction, with the crash story of every step; [`rebuild`] for widening.
//! - [`sql`]: the Firebolt-only SQL text; the dedupe/MERGE is `warehouse::merge`'s.

mod apply;
pub mod auth;
pub mod catalog;
pub mod client;
pub mod error;
pub mod protocol;
mod rebuild;
pub mod run;
pub mod sql;
pub mod stage;
pub mod transport;
pub mod version;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use crate::batch::{
    ApplyPlan, ApplyStats, BatchFile, LedgerEntry, LedgerRecord, LedgerStatus, Staged, StagedFile,
    TargetTable,
};
use crate::config::FireboltConfig;
use crate::storage::ObjectStore;

use super::{FENCE_TABLE, LEDGER_TABLE, Warehouse, WarehouseError};
use crate::warehouse::sql::qualified;
use client::{Client, ClientConfig, Statement};
use error::FireboltError;
use run::Runner;
use sql::{CopySource, S3Credentials};

/// A staging table older than this belongs to a worker that died: prepare() drops it.
/// Far longer than any apply (statements time out after `request_timeout`).
pub const STALE_STAGE_AGE: Duration = Duration::from_secs(6 * 3600);

/// Keys per ledger lookup statement.
const LEDGER_LOOKUP_CHUNK: usize = 500;

pub struct Firebolt {
    client: Arc<Client>,
    schema: String,
    op_column: String,
    store: ObjectStore,
    copy_source: CopySource,
    /// Tombstone tables created by this process (no CREATE per batch).
    tombstones: Mutex<HashSet<String>>,
    /// Tables whose describe() saw rebuild leftovers: the next apply recovers them.
    pending_rebuilds: Mutex<HashSet<String>>,
    /// `information_schema.tables.primary_index` is missing on this server.
    no_indexes: AtomicBool,
    /// The engine's version, once read and found at or above the floor (`version.rs`).
    floor_checked: tokio::sync::OnceCell<Option<version::EngineVersion>>,
}

impl Firebolt {
    /// Builds the warehouse from `[warehouse.firebolt]`; nothing is contacted until
    /// `prepare()`.
    pub fn open(
        config: &FireboltConfig,
        op_column: &str,
        store: ObjectStore,
    ) -> Result<Self, WarehouseError> {
        let client = Client::new(ClientConfig::from_config(config)?)?;
        Ok(Self::with_client(
            Arc::new(client),
            &config.schema,
            op_column,
            store,
            copy_source(config),
        ))
    }

    /// With a client built elsewhere (tests point it at a protocol test server).
    pub fn with_client(
        client: Arc<Client>,
        schema: &str,
        op_column: &str,
        store: ObjectStore,
        copy_source: CopySource,
    ) -> Self {
        Self {
            client,
            schema: schema.to_string(),
            op_column: op_column.to_string(),
            store,
            copy_source,
            tombstones: Mutex::new(HashSet::new()),
            pending_rebuilds: Mutex::new(HashSet::new()),
            no_indexes: AtomicBool::new(false),
            floor_checked: tokio::sync::OnceCell::new(),
        }
    }

    pub fn client(&self) -> &Arc<Client> {
        &self.client
    }

    fn ledger(&self) -> String {
        qualified(&self.schema, LEDGER_TABLE)
    }

    async fn runner(&self, what: &str) -> Result<Runner<'_>, FireboltError> {
        Runner::new(&self.client, format!("cdc-worker:{what}")).await
    }

    fn tombstones_known(&self, table: &str) -> bool {
        self.tombstones
            .lock()
            .expect("tombstones lock")
            .contains(table)
    }

    fn remember_tombstones(&self, table: &str) {
        self.tombstones
            .lock()
            .expect("tombstones lock")
            .insert(table.to_string());
    }

    fn forget_tombstones(&self, table: &str) {
        self.tombstones
            .lock()
            .expect("tombstones lock")
            .remove(table);
    }

    fn take_pending_rebuild(&self, table: &str) -> bool {
        self.pending_rebuilds
            .lock()
            .expect("rebuilds lock")
            .remove(table)
    }

    /// Refuses an engine older than the feature floor; reads the version once per process
    /// (a refusal is not remembered: the next call reads again, after an upgrade).
    pub async fn check_feature_floor(
        &self,
    ) -> Result<Option<version::EngineVersion>, WarehouseError> {
        self.floor_checked
            .get_or_try_init(|| async {
                let Some((found, text)) = self.engine_version().await else {
                    return Ok(None);
                };
                version::check(found, &text).map_err(WarehouseError::Other)?;
                tracing::info!(version = %found, "Firebolt engine version is supported");
                Ok(Some(found))
            })
            .await
            .copied()
    }

    /// The engine's version as it reports it, when it can be read at all.
    async fn engine_version(&self) -> Option<(version::EngineVersion, String)> {
        let mut queries = vec![version::VERSION_QUERY.to_string()];
        if let Some(engine) = self.client.engine_name() {
            queries.push(version::engines_query(engine));
        }
        for sql in queries {
            let statement = Statement::new("version", "cdc-worker:version", sql);
            match self.client.execute(&statement).await {
                Ok(answer) => {
                    let text = answer.text_at(0, 0).unwrap_or_default();
                    match version::parse(&text) {
                        Some(found) => return Some((found, text)),
                        None => {
                            tracing::warn!(answer = %text, "no version number in the engine's answer")
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "could not read the Firebolt engine version"),
            }
        }
        tracing::warn!(
            floor = %version::FLOOR,
            "the Firebolt engine version is unknown: not checked against the feature floor"
        );
        None
    }

    /// Drops staging tables left by workers that died mid-batch.
    async fn drop_stale_stages(&self, run: &mut Runner<'_>) -> Result<usize, FireboltError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let found = run
            .run("list-stages", sql::staging_tables_query(&self.schema))
            .await?;
        let mut dropped = 0;
        for row in 0..found.rows.len() {
            let Some(name) = found.text_at(row, 0) else {
                continue;
            };
            let Some(created) = sql::stage_created_at(&name) else {
                continue;
            };
            if now.saturating_sub(created) < STALE_STAGE_AGE.as_secs() {
                continue;
            }
            run.run(
                "drop-stale-stage",
                sql::drop_table(&qualified(&self.schema, &name)),
            )
            .await?;
            dropped += 1;
        }
        Ok(dropped)
    }
}

/// How COPY reads the bucket, from the config (validated: at most one is set).
pub fn copy_source(config: &FireboltConfig) -> CopySource {
    if let Some(location) = config.s3_location.as_ref().filter(|l| !l.is_empty()) {
        return CopySource::Location(location.clone());
    }
    if let Some(arn) = config.s3_role_arn.as_ref().filter(|a| !a.is_empty()) {
        return CopySource::Direct(Some(S3Credentials::Role {
            arn: arn.clone(),
            external_id: config
                .s3_role_external_id
                .clone()
                .filter(|id| !id.is_empty()),
        }));
    }
    match (&config.s3_access_key_id, &config.s3_secret_access_key) {
        (Some(id), Some(secret)) => CopySource::Direct(Some(S3Credentials::Keys {
            access_key_id: id.clone(),
            secret_access_key: secret.clone(),
            session_token: config
                .s3_session_token
                .clone()
                .filter(|t| !t.expose().is_empty()),
        })),
        _ => CopySource::Direct(None),
    }
}

/// Prefixes a warehouse error with the step it happened in, keeping its kind.
fn in_step(step: &str, e: WarehouseError) -> WarehouseError {
    let m = |text: String| format!("{step}: {text}");
    match e {
        WarehouseError::Conflict(t) => WarehouseError::Conflict(m(t)),
        WarehouseError::Unavailable(t) => WarehouseError::Unavailable(m(t)),
        WarehouseError::Auth(t) => WarehouseError::Auth(m(t)),
        WarehouseError::Data(t) => WarehouseError::Data(m(t)),
        WarehouseError::Sql(t) => WarehouseError::Sql(m(t)),
        WarehouseError::Fenced(t) => WarehouseError::Fenced(m(t)),
        WarehouseError::Other(t) => WarehouseError::Other(m(t)),
        guarded @ WarehouseError::Guarded { .. } => guarded,
    }
}

#[async_trait]
impl Warehouse for Firebolt {
    fn name(&self) -> &'static str {
        "firebolt"
    }

    fn max_identifier_len(&self) -> usize {
        255
    }

    fn column_name(&self, source: &str) -> String {
        // Unquoted identifiers fold to lower case: keep target names usable unquoted.
        source.to_lowercase()
    }

    async fn prepare(&self) -> Result<(), WarehouseError> {
        self.check_feature_floor().await?;
        let mut run = self.runner("prepare").await?;
        if self.schema != "public" {
            // CREATE SCHEMA is in the current docs only (below the feature floor);
            // `public` always exists.
            run.run(
                "create-schema",
                format!(
                    "CREATE SCHEMA IF NOT EXISTS {}",
                    crate::warehouse::sql::ident(&self.schema)
                ),
            )
            .await?;
        }
        run.run("create-ledger", sql::create_ledger(&self.ledger()))
            .await?;
        run.run(
            "create-fence",
            sql::create_fence(&qualified(&self.schema, FENCE_TABLE)),
        )
        .await?;
        match self.drop_stale_stages(&mut run).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                dropped = n,
                "dropped staging tables of workers that died mid-batch"
            ),
            // Leftovers cost storage, not correctness: do not refuse to start over them.
            Err(e) => tracing::warn!(error = %e, "could not look for stale staging tables"),
        }
        Ok(())
    }

    async fn describe(&self, table: &str) -> Result<Option<TargetTable>, WarehouseError> {
        let mut run = self.runner("describe").await?;
        let state = catalog::inspect(&mut run, &self.schema, table, &self.no_indexes).await?;
        if state.has_leftovers() {
            self.pending_rebuilds
                .lock()
                .expect("rebuilds lock")
                .insert(table.to_string());
            if let (true, Some(copy)) = (state.marker, &state.copy) {
                // The copy is authoritative: the table is what the next apply restores.
                return Ok(Some(TargetTable {
                    name: table.to_string(),
                    ..copy.clone()
                }));
            }
        }
        Ok(state.target)
    }

    async fn applied(
        &self,
        table: &str,
        keys: &[String],
    ) -> Result<HashMap<String, LedgerRecord>, WarehouseError> {
        let mut found = HashMap::new();
        if keys.is_empty() {
            return Ok(found);
        }
        let mut run = self.runner("ledger-lookup").await?;
        for chunk in keys.chunks(LEDGER_LOOKUP_CHUNK) {
            let rows = run
                .run("applied", sql::applied_query(&self.ledger(), table, chunk))
                .await?;
            for row in 0..rows.rows.len() {
                let Some(key) = rows.text_at(row, 0) else {
                    continue;
                };
                found.insert(
                    key,
                    LedgerRecord {
                        etag: rows.text_at(row, 1).unwrap_or_default(),
                        status: LedgerStatus::parse(rows.text_at(row, 2).as_deref()),
                        order_key: rows.text_at(row, 3).unwrap_or_default(),
                    },
                );
            }
        }
        Ok(found)
    }

    async fn record_status(
        &self,
        table: &str,
        files: &[BatchFile],
        status: LedgerStatus,
        reason: &str,
    ) -> Result<(), WarehouseError> {
        if files.is_empty() {
            return Ok(());
        }
        let mut run = self.runner("ledger-status").await?;
        run.run(
            "ledger-status",
            sql::status_insert(&self.ledger(), table, files, status.as_str(), reason),
        )
        .await?;
        Ok(())
    }

    async fn ledger_entries(
        &self,
        table: &str,
        limit: usize,
    ) -> Result<Vec<LedgerEntry>, WarehouseError> {
        let mut run = self.runner("ledger-entries").await?;
        let rows = run
            .run(
                "ledger-entries",
                sql::ledger_entries_query(&self.ledger(), table, limit),
            )
            .await?;
        Ok((0..rows.rows.len())
            .map(|r| LedgerEntry {
                table: table.to_string(),
                key: rows.text_at(r, 0).unwrap_or_default(),
                etag: rows.text_at(r, 1).unwrap_or_default(),
                size: rows.u64_at(r, 2).unwrap_or(0),
                batch_id: rows.text_at(r, 3).unwrap_or_default(),
                applied_at: rows.text_at(r, 4).unwrap_or_default(),
                status: rows.text_at(r, 5).unwrap_or_else(|| "applied".into()),
                detail: rows.text_at(r, 6).unwrap_or_default(),
            })
            .collect())
    }

    async fn last_applied(&self, table: &str) -> Result<Option<(String, String)>, WarehouseError> {
        let mut run = self.runner("last-applied").await?;
        let rows = run
            .run(
                "last-applied",
                sql::last_applied_query(&self.ledger(), table),
            )
            .await?;
        Ok(match (rows.text_at(0, 0), rows.text_at(0, 1)) {
            (Some(order), Some(key)) => Some((order, key)),
            _ => None,
        })
    }

    async fn stage(&self, _batch_id: &str, files: Vec<BatchFile>) -> Staged {
        Staged {
            files: stage::read_footers(&self.store, files, &self.op_column).await,
            workspace: None,
        }
    }

    async fn apply(
        &self,
        plan: &ApplyPlan,
        files: &[StagedFile],
    ) -> Result<ApplyStats, WarehouseError> {
        apply::apply(self, plan, files).await
    }

    async fn row_count(&self, table: &str) -> Result<u64, WarehouseError> {
        let Some(found) = self.describe(table).await? else {
            return Ok(0);
        };
        let mut run = self.runner("row-count").await?;
        let rows = run
            .run(
                "row-count",
                format!(
                    "SELECT count(*) FROM {}",
                    qualified(&self.schema, &found.name)
                ),
            )
            .await?;
        rows.u64_at(0, 0).map_err(WarehouseError::Other)
    }

    async fn repeated_keys(&self, table: &str, key: &[String]) -> Result<u64, WarehouseError> {
        let Some(found) = self.describe(table).await? else {
            return Ok(0);
        };
        let target = qualified(&self.schema, &found.name);
        let mut run = self.runner("repeated-keys").await?;
        let rows = run
            .run(
                "repeated-keys",
                crate::warehouse::sql::repeated_keys_query(&target, key),
            )
            .await?;
        rows.u64_at(0, 0).map_err(WarehouseError::Other)
    }

    async fn ledger_summary(&self) -> Result<Vec<LedgerEntry>, WarehouseError> {
        let mut run = self.runner("ledger-summary").await?;
        let rows = run
            .run("ledger-summary", sql::ledger_summary_query(&self.ledger()))
            .await?;
        Ok((0..rows.rows.len())
            .map(|r| LedgerEntry {
                table: rows.text_at(r, 0).unwrap_or_default(),
                key: rows.text_at(r, 1).unwrap_or_default(),
                etag: rows.text_at(r, 2).unwrap_or_default(),
                size: rows.u64_at(r, 3).unwrap_or(0),
                batch_id: rows.text_at(r, 4).unwrap_or_default(),
                applied_at: rows.text_at(r, 5).unwrap_or_default(),
                status: "applied".into(),
                detail: String::new(),
            })
            .collect())
    }

    async fn promote(&self, table: &str, next: &str) -> Result<(), WarehouseError> {
        let mut run = self.runner("promote").await?;
        let result = rebuild::promote(&mut run, &self.schema, table, next, &self.no_indexes).await;
        if result.is_err() {
            run.rollback().await;
        }
        self.forget_tombstones(table);
        self.forget_tombstones(next);
        result
    }

    async fn merge_generation(
        &self,
        table: &str,
        next: &str,
        reload: &crate::batch::HistoryReload,
    ) -> Result<(), WarehouseError> {
        let mut run = self.runner("merge-generation").await?;
        let result = rebuild::merge_generation(&mut run, &self.schema, table, next, reload).await;
        if result.is_err() {
            run.rollback().await;
        }
        result
    }

    async fn discard(&self, next: &str) -> Result<(), WarehouseError> {
        let mut run = self.runner("discard").await?;
        for name in [
            next.to_string(),
            crate::warehouse::merge::tombstone_table(next),
        ] {
            run.run("discard", sql::drop_table(&qualified(&self.schema, &name)))
                .await?;
        }
        self.forget_tombstones(next);
        Ok(())
    }

    /// Authentication, engine resolution, `SELECT 1`, the engine version against the
    /// feature floor: each failure names its step.
    async fn ping(&self, timeout: Duration) -> Result<(), WarehouseError> {
        let steps = async {
            let step1 = if self.client.is_cloud() {
                "step 1/4 (authentication)"
            } else {
                "step 1/4 (authentication: none for Firebolt Core)"
            };
            self.client
                .authenticate()
                .await
                .map_err(|e| in_step(step1, e.into()))?;
            self.client
                .session()
                .await
                .map_err(|e| in_step("step 2/4 (engine resolution)", e.into()))?;
            let select = Statement::new("ping", "cdc-worker:ping", "SELECT 1");
            let answer = self
                .client
                .execute(&select)
                .await
                .map_err(|e| in_step("step 3/4 (SELECT 1)", e.into()))?;
            match answer.u64_at(0, 0) {
                Ok(1) => {}
                other => {
                    return Err(WarehouseError::Other(format!(
                        "step 3/4 (SELECT 1): unexpected answer {other:?}"
                    )));
                }
            }
            self.check_feature_floor()
                .await
                .map(|_| ())
                .map_err(|e| in_step("step 4/4 (engine version)", e))
        };
        match tokio::time::timeout(timeout, steps).await {
            Ok(result) => result,
            Err(_) => Err(WarehouseError::Unavailable(format!(
                "Firebolt did not answer within {}s",
                timeout.as_secs()
            ))),
        }
    }
}
