//! Widening a column (`Ddl::WidenColumn`) where Firebolt has no documented ALTER COLUMN
//! TYPE: the table is rebuilt in one explicit transaction, so it is never missing and
//! never half-copied for a reader, and a crash or failure anywhere leaves it untouched:
//!
//! BEGIN; DROP copy IF EXISTS; CREATE copy (new types); INSERT copy SELECT casts FROM t;
//! compare row counts; DROP t; ALTER TABLE copy RENAME TO t; COMMIT.
//!
//! DDL is allowed inside BEGIN..COMMIT and ALTER TABLE .. RENAME TO exists from 4.10 (both
//! below the feature floor, `version.rs`). RENAME fails on a table that views depend on
//! (ALTER TABLE reference): such a table cannot be widened by the worker.
//!
//! Workers before this one rebuilt by drop-and-refill with a marker table; `recover`
//! finishes or cleans what a crash of such a worker left (the copy and marker names are
//! the same), inside a transaction too.

use std::sync::atomic::AtomicBool;

use crate::schema::types::ColumnType;
use crate::warehouse::WarehouseError;

use super::catalog::{Inspection, inspect};
use super::run::Runner;
use super::sql;
use crate::warehouse::merge::tombstone_table;
use crate::warehouse::sql::qualified;

/// Finishes or cleans up whatever an interrupted rebuild of `table` left.
pub async fn recover(
    run: &mut Runner<'_>,
    schema: &str,
    table: &str,
    state: &Inspection,
) -> Result<(), WarehouseError> {
    let copy = qualified(schema, &sql::rebuild_table(table));
    let marker = qualified(schema, &sql::rebuilt_marker(table));
    match (state.marker, &state.copy) {
        (true, Some(_)) => {
            // An older worker's drop-and-refill: the copy was complete and authoritative.
            tracing::warn!(
                table,
                "finishing an interrupted widening rebuild from its complete copy"
            );
            let target = qualified(schema, table);
            run.begin().await?;
            run.run("rebuild-drop", sql::drop_table(&target)).await?;
            run.run("rebuild-rename", sql::rename_table(&copy, table))
                .await?;
            run.run("rebuild-cleanup", sql::drop_table(&marker)).await?;
            run.commit().await?;
            Ok(())
        }
        (true, None) => {
            // The copy is dropped only after t was restored: t is complete.
            run.run("rebuild-cleanup", sql::drop_table(&marker)).await?;
            Ok(())
        }
        (false, Some(_)) => {
            // A copy without its marker was never authoritative: t is.
            run.run("rebuild-cleanup", sql::drop_table(&copy)).await?;
            Ok(())
        }
        (false, None) => Ok(()),
    }
}

/// A reload's swap (`Warehouse::promote`): the live table is replaced by its next
/// generation, and its deleted-keys table by the generation's, in one transaction (DDL is
/// allowed inside BEGIN..COMMIT, audit M6): a reader sees the old table or the new one.
pub async fn promote(
    run: &mut Runner<'_>,
    schema: &str,
    table: &str,
    next: &str,
    no_indexes: &AtomicBool,
) -> Result<(), WarehouseError> {
    if inspect(run, schema, next, no_indexes)
        .await?
        .target
        .is_none()
    {
        return Err(WarehouseError::Sql(format!(
            "cannot replace `{table}` by `{next}`: `{next}` does not exist"
        )));
    }
    let (tombstones, next_tombstones) = (tombstone_table(table), tombstone_table(next));
    let has_tombstones = inspect(run, schema, &next_tombstones, no_indexes)
        .await?
        .target
        .is_some();
    run.begin().await?;
    run.run("promote-drop", sql::drop_table(&qualified(schema, table)))
        .await?;
    run.run(
        "promote-rename",
        sql::rename_table(&qualified(schema, next), table),
    )
    .await?;
    run.run(
        "promote-drop-tombstones",
        sql::drop_table(&qualified(schema, &tombstones)),
    )
    .await?;
    if has_tombstones {
        run.run(
            "promote-rename-tombstones",
            sql::rename_table(&qualified(schema, &next_tombstones), &tombstones),
        )
        .await?;
    }
    run.commit().await?;
    Ok(())
}

/// A history table's reload (`Warehouse::merge_generation`): the columns the generation
/// added, the MERGE of its versions into the live history, and the generation dropped, in
/// one transaction (DDL is allowed inside BEGIN..COMMIT, audit M6).
pub async fn merge_generation(
    run: &mut Runner<'_>,
    schema: &str,
    table: &str,
    next: &str,
    reload: &crate::batch::HistoryReload,
) -> Result<(), WarehouseError> {
    let (live, generation) = (qualified(schema, table), qualified(schema, next));
    run.begin().await?;
    for column in &reload.add_columns {
        run.run("reload-add-column", sql::add_column(&live, column))
            .await?;
    }
    let merge = crate::warehouse::history::reload_statement(&live, &generation, reload);
    run.run("reload-history-merge", merge).await?;
    run.run("reload-drop-generation", sql::drop_table(&generation))
        .await?;
    run.commit().await?;
    Ok(())
}

/// Rebuilds `table` with the columns of `widen` changed to their new types, in one
/// transaction (the caller rolls it back when this fails).
pub async fn widen(
    run: &mut Runner<'_>,
    schema: &str,
    table: &str,
    widen: &[(String, ColumnType)],
    no_indexes: &AtomicBool,
) -> Result<(), WarehouseError> {
    // Table names leave room for the rebuild table's (`MAX_TABLE_NAME_LEN`).
    let mut state = inspect(run, schema, table, no_indexes).await?;
    if state.has_leftovers() {
        recover(run, schema, table, &state).await?;
        state = inspect(run, schema, table, no_indexes).await?;
    }
    let Some(target) = state.target else {
        return Err(WarehouseError::Sql(format!(
            "cannot widen columns of `{table}`: the table does not exist"
        )));
    };
    let dialect = target.dialect;
    let mut columns = target.columns.clone();
    let mut changed = Vec::new();
    for (name, to) in widen {
        let Some(c) = columns.iter_mut().find(|c| &c.name == name) else {
            return Err(WarehouseError::Sql(format!(
                "cannot widen `{table}`.`{name}`: no such column"
            )));
        };
        // Compared as Firebolt names them: NUMERIC(38, 2) is already what a decimal(40,2)
        // becomes, and rebuilding for it would rebuild on every batch.
        if dialect.type_name(&c.ty) != dialect.type_name(to) {
            c.ty = to.clone();
            changed.push(name.clone());
        }
    }
    if changed.is_empty() {
        // Already widened (a batch planned before a crash that finished the rebuild).
        return Ok(());
    }
    tracing::info!(table, columns = ?changed, "widening by table rebuild");
    let target_q = qualified(schema, table);
    let copy = qualified(schema, &sql::rebuild_table(table));

    run.begin().await?;
    run.run("rebuild-drop-copy", sql::drop_table(&copy)).await?;
    run.run(
        "rebuild-create-copy",
        sql::create_table(&copy, &columns, &target.primary_key, false),
    )
    .await?;
    run.run(
        "rebuild-fill-copy",
        sql::rebuild_copy(&copy, &target_q, &columns, &changed),
    )
    .await?;
    let counts = run
        .run("rebuild-verify", sql::row_counts(&target_q, &copy))
        .await?;
    let (original, copied) = (
        counts.u64_at(0, 0).map_err(WarehouseError::Other)?,
        counts.u64_at(0, 1).map_err(WarehouseError::Other)?,
    );
    if original != copied {
        return Err(WarehouseError::Other(format!(
            "rebuild of `{table}`: the copy has {copied} rows, the table {original}; the table is untouched"
        )));
    }
    run.run("rebuild-drop", sql::drop_table(&target_q)).await?;
    run.run("rebuild-rename", sql::rename_table(&copy, table))
        .await?;
    run.commit().await?;
    Ok(())
}
