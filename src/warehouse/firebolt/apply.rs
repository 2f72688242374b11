//! The apply path: staging table, COPY, a check, DDL, then MERGE (or append), tombstones,
//! fence and ledger in one transaction, and the staging table dropped.
//!
//! COPY is not documented as transactional (and COPY inside a transaction is unverified),
//! so only the statements that change the target and the ledger run inside BEGIN/COMMIT;
//! everything before is idempotent or private to this attempt (a widening rebuild is its
//! own transaction, rebuild.rs). Each step below says how
//! a crash there is recovered. The invariant: a file is in the ledger if and only if its
//! changes are in the target, so a redelivered file is either skipped or applied again.

use crate::batch::{ApplyPlan, ApplyStats, BatchFile, Ddl, DeleteGuard, LoadMode, StagedFile};
use crate::schema::dialect::Dialect;
use crate::warehouse::history;
use crate::warehouse::merge::{self, RESERVED_PREFIX};
use crate::warehouse::{FENCE_TABLE, LEDGER_TABLE, WarehouseError};

use super::run::Runner;
use super::sql;
use super::{Firebolt, rebuild};
use crate::warehouse::sql::qualified;

/// Refuses source columns that collide with the names the staging and MERGE use.
fn check_stage_names(plan: &ApplyPlan) -> Result<(), WarehouseError> {
    for c in &plan.staged_columns {
        if c.name.to_lowercase().starts_with(RESERVED_PREFIX) {
            return Err(WarehouseError::Sql(format!(
                "source column `{}` uses the prefix {RESERVED_PREFIX} the Firebolt loader reserves; rename it in DMS with a transformation rule",
                c.name
            )));
        }
    }
    Ok(())
}

pub async fn apply(
    wh: &Firebolt,
    plan: &ApplyPlan,
    files: &[StagedFile],
) -> Result<ApplyStats, WarehouseError> {
    check_stage_names(plan)?;
    if files.is_empty() || plan.files.is_empty() {
        return Ok(ApplyStats::default());
    }
    let mut run = Runner::new(wh.client(), plan.batch_id.clone()).await?;
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let stage = qualified(
        &wh.schema,
        &sql::stage_table_name(&plan.batch_id, created, fastrand::u32(..)),
    );
    let result = steps(wh, &mut run, plan, files, &stage).await;
    match result {
        Ok(mut stats) => {
            stats.statements = run.statements;
            Ok(stats)
        }
        Err(e) => {
            // Nothing of this attempt may stay: the open transaction is rolled back, the
            // staging table dropped (both best effort; prepare() drops stale staging tables).
            run.rollback().await;
            wh.forget_tombstones(plan.target_table());
            if let Err(drop_error) = run.run("drop-stage", sql::drop_table(&stage)).await {
                tracing::warn!(batch_id = %plan.batch_id, error = %drop_error, "could not drop the staging table after a failure; prepare() drops it later");
            }
            Err(e)
        }
    }
}

/// The batch's steps in order; each helper says how a crash inside it is recovered.
async fn steps(
    wh: &Firebolt,
    run: &mut Runner<'_>,
    plan: &ApplyPlan,
    files: &[StagedFile],
    stage: &str,
) -> Result<ApplyStats, WarehouseError> {
    let schema = &wh.schema;
    let target = qualified(schema, plan.target_table());
    let batch: Vec<_> = files.iter().map(|f| f.file.clone()).collect();
    let expected_rows: u64 = files.iter().map(|f| f.schema.rows).sum();

    let (mut stats, deletes) = stage_and_check(wh, run, plan, &batch, stage, expected_rows).await?;
    apply_ddl(wh, run, plan, &target).await?;
    if let Some(guard) = &plan.guard {
        check_delete_guard(run, plan, &target, deletes, guard).await?;
    }

    // 5. The tombstone table (deleted keys with their ordering value), when the plan keeps
    //    them: CREATE IF NOT EXISTS, sent once per process and table.
    let rows = sql::staged_rows(stage, plan, &batch);
    let tombstones = qualified(schema, &merge::tombstone_table(plan.target_table()));
    let tombstone_sql = merge::tombstone_statements(&target, &tombstones, plan, &rows);
    if let Some((create, _)) = &tombstone_sql
        && !wh.tombstones_known(plan.target_table())
    {
        run.run("create-tombstones", create.clone()).await?;
        wh.remember_tombstones(plan.target_table());
    }

    // 6. BEGIN. From here to COMMIT, all or nothing: a crash before COMMIT leaves no
    //    change in the target, fence or ledger (the server discards a transaction whose
    //    session is gone), and the redelivered files are applied again.
    run.begin().await?;
    check_fence(run, schema, plan).await?;
    stats.fast_load = write_changes(run, plan, &target, &tombstones, &rows).await?;

    // 9. Deletes of this batch into the tombstones, in the same transaction.
    if let Some((_, record)) = tombstone_sql {
        run.run("record-tombstones", record).await?;
    }

    // 10. The ledger: every file of the batch, one INSERT.
    run.run(
        "ledger",
        sql::ledger_insert(&qualified(schema, LEDGER_TABLE), plan),
    )
    .await?;

    // 11. COMMIT. If the answer is lost (crash, timeout), the outcome is unknown: the error
    //     goes up, the files come back, and `applied()` reads the ledger: committed files
    //     are skipped, the others applied again.
    run.commit().await?;

    // 12. Drop the staging table. Crash: step 1's orphan, dropped by prepare().
    if let Err(e) = run.run("drop-stage", sql::drop_table(stage)).await {
        tracing::warn!(batch_id = %plan.batch_id, error = %e, "batch committed but its staging table was not dropped; prepare() drops it later");
    }
    Ok(stats)
}

/// Step 4b, read only: the destructive-change guard weighs the segment's delete rows
/// against the table's rows before anything is written.
async fn check_delete_guard(
    run: &mut Runner<'_>,
    plan: &ApplyPlan,
    target: &str,
    deletes: u64,
    guard: &DeleteGuard,
) -> Result<(), WarehouseError> {
    if !matches!(plan.mode, LoadMode::Merge { .. }) || deletes == 0 {
        return Ok(());
    }
    let counted = run
        .run("guard-count", format!("SELECT count(*) FROM {target}"))
        .await?;
    let rows = counted.u64_at(0, 0).map_err(WarehouseError::Other)?;
    if guard.holds(deletes, rows) {
        return Err(WarehouseError::Guarded { deletes, rows });
    }
    Ok(())
}

/// Steps 1 to 3: the staging table, COPY, and the check of what COPY loaded, which also
/// gathers the batch's statistics (and the delete rows, for the guard).
async fn stage_and_check(
    wh: &Firebolt,
    run: &mut Runner<'_>,
    plan: &ApplyPlan,
    batch: &[BatchFile],
    stage: &str,
    expected_rows: u64,
) -> Result<(ApplyStats, u64), WarehouseError> {
    // 1. The staging table, typed from the footers (never inferred by COPY). Its name is
    //    new for every attempt. Crash: an orphan table that touches no target; prepare()
    //    drops staging tables older than STALE_STAGE_AGE.
    run.run("create-stage", sql::create_staging(stage, plan))
        .await?;

    // 2. COPY the batch's files from S3, `$source_file_name` into a column. It writes only
    //    this attempt's staging table: a crash is step 1's case, and a retry copies into a
    //    new table, so rows can never be loaded twice.
    for (copy, logged) in sql::copy_statements(stage, plan, batch, &wh.copy_source) {
        run.run_redacted("copy", copy, logged, wh.copy_source.secrets())
            .await?;
    }

    // 3. Check what COPY loaded against the footers, and gather the statistics (read only).
    let (check, layout) = sql::check_query(plan, stage, batch);
    let counts = run.run("check", check).await?;
    let at = |col: usize| counts.u64_at(0, col).map_err(WarehouseError::Other);
    let staged = at(0)?;
    if staged != expected_rows {
        return Err(WarehouseError::Other(format!(
            "COPY loaded {staged} rows but the files' footers hold {expected_rows}: a file changed after it was staged, or was read only in part; the batch is retried"
        )));
    }
    let unknown = at(1)?;
    if unknown > 0 {
        return Err(WarehouseError::Other(format!(
            "{unknown} staged rows carry a $source_file_name that matches no file of the batch; their order cannot be known (see sql::source_file_value)"
        )));
    }
    let mut stats = ApplyStats {
        rows_staged: expected_rows,
        ..ApplyStats::default()
    };
    if let Some(col) = layout.ambiguous_keys {
        stats.ambiguous_keys = at(col)?;
        if stats.ambiguous_keys > 0 {
            tracing::warn!(table = %plan.table, batch_id = %plan.batch_id, keys = stats.ambiguous_keys,
                "keys changed more than once inside one file and neither an ordering column nor its values decide: Firebolt cannot see row order");
        }
    }
    for (column, col) in &layout.cast_failures {
        let n = at(*col)?;
        if n > 0 {
            stats.cast_failures.push((column.clone(), n));
        }
    }
    match &plan.mode {
        LoadMode::Merge { .. } => {
            stats.rows_merged = layout.distinct_keys.map(at).transpose()?.unwrap_or(0);
            stats.null_key_rows = layout.null_keys.map(at).transpose()?.unwrap_or(0);
            if stats.null_key_rows > 0 {
                tracing::warn!(table = %plan.table, batch_id = %plan.batch_id, rows = stats.null_key_rows,
                    "staged rows with a NULL key are skipped: they change no row");
            }
        }
        LoadMode::Append => {
            stats.deletes_ignored = layout.deletes.map(at).transpose()?.unwrap_or(0);
            stats.rows_appended = staged - stats.deletes_ignored;
        }
    }
    let deletes = layout.deletes.map(at).transpose()?.unwrap_or(0);
    Ok((stats, deletes))
}

/// Step 4: DDL, one statement each, outside the transaction. All idempotent (IF NOT EXISTS,
/// or a rebuild that is crash-safe on its own, see rebuild.rs): a crash leaves the target
/// with some DDL done and nothing loaded; the replanned batch skips what exists. An
/// interrupted rebuild seen by describe() is finished or cleaned first.
async fn apply_ddl(
    wh: &Firebolt,
    run: &mut Runner<'_>,
    plan: &ApplyPlan,
    target: &str,
) -> Result<(), WarehouseError> {
    let schema = &wh.schema;
    let table = plan.target_table();
    if wh.take_pending_rebuild(table) {
        let state = super::catalog::inspect(run, schema, table, &wh.no_indexes).await?;
        rebuild::recover(run, schema, table, &state).await?;
    }
    let mut widen = Vec::new();
    for ddl in &plan.ddl {
        match ddl {
            Ddl::CreateTable {
                columns,
                primary_key,
            } => {
                run.run(
                    "create-table",
                    sql::create_table(target, columns, primary_key, true),
                )
                .await?;
            }
            Ddl::AddColumn { column } => {
                run.run("add-column", sql::add_column(target, column))
                    .await?;
            }
            Ddl::WidenColumn { column, to, .. } => widen.push((column.clone(), to.clone())),
        }
    }
    if !widen.is_empty() {
        rebuild::widen(run, schema, table, &widen, &wh.no_indexes).await?;
    }
    Ok(())
}

/// Step 7, inside the transaction: refuse to commit if a newer lease holder has committed
/// this table; take the fence over from an older one.
async fn check_fence(
    run: &mut Runner<'_>,
    schema: &str,
    plan: &ApplyPlan,
) -> Result<(), WarehouseError> {
    let Some(fence) = &plan.fence else {
        return Ok(());
    };
    let fence_table = qualified(schema, FENCE_TABLE);
    let current = run
        .run("fence-read", sql::fence_select(&fence_table, &plan.table))
        .await?;
    if current.rows.is_empty() {
        run.run(
            "fence-init",
            sql::fence_insert(&fence_table, &plan.table, fence.token, &fence.holder),
        )
        .await?;
        return Ok(());
    }
    let token = current.u64_at(0, 0).map_err(WarehouseError::Other)?;
    let holder = current.text_at(0, 1).unwrap_or_default();
    if token > fence.token {
        return Err(WarehouseError::Fenced(format!(
            "a newer lease holder ({holder}, token {token}) has committed `{}`; lease token {} is stale",
            plan.table, fence.token
        )));
    }
    if token != fence.token || holder != fence.holder {
        run.run(
            "fence-take",
            sql::fence_update(&fence_table, &plan.table, fence.token, &fence.holder),
        )
        .await?;
    }
    Ok(())
}

/// Step 8, inside the transaction: the MERGE of the latest change per key (or the append,
/// or a history table's MERGE of versions), the SQL DuckDB runs. A segment of full-load files whose keys are unique and new to the
/// table is inserted as it is (merge::fast_load_blockers), checked here, inside the
/// transaction. Returns whether the fast path was taken.
async fn write_changes(
    run: &mut Runner<'_>,
    plan: &ApplyPlan,
    target: &str,
    tombstones: &str,
    rows: &merge::StagedRows,
) -> Result<bool, WarehouseError> {
    if let LoadMode::Append = plan.mode {
        let append = merge::append_statement(Dialect::Firebolt, target, plan, rows);
        run.run("append", append).await?;
        return Ok(false);
    }
    if let Some(history) = &plan.history {
        let sql =
            history::history_statement(Dialect::Firebolt, target, plan, rows, &history.tracked);
        run.run("history-merge", sql).await?;
        return Ok(false);
    }
    let mut fast_load = false;
    if merge::fast_load_candidate(plan) {
        let check = merge::fast_load_blockers(target, Some(tombstones), plan, rows);
        let blockers = run.run("fast-load-check", check).await?;
        // No answer row is no proof: only an explicit 0 takes the fast path.
        fast_load =
            !blockers.rows.is_empty() && blockers.u64_at(0, 0).map_err(WarehouseError::Other)? == 0;
    }
    if fast_load {
        let insert = merge::insert_new_rows_statement(Dialect::Firebolt, target, plan, rows);
        run.run("insert", insert).await?;
    } else {
        let merge = merge::merge_statement(Dialect::Firebolt, target, plan, rows, Some(tombstones));
        run.run("merge", merge).await?;
    }
    Ok(fast_load)
}
