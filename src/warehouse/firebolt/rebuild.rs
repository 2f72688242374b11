//! Widening a column (`Ddl::WidenColumn`) where Firebolt has no documented ALTER COLUMN
//! TYPE: the table is rebuilt, crash-safe at every statement.
//!
//! Table RENAME is not in the reference, so the swap is drop-and-recreate, guarded by a
//! marker table whose existence (a CREATE is atomic) says which copy is authoritative:
//!
//! | phase | statements                                   | authoritative | recovery after a crash       |
//! |-------|----------------------------------------------|---------------|------------------------------|
//! | 1     | DROP copy IF EXISTS, CREATE copy, INSERT copy SELECT casts FROM t, compare counts | `t` | copy without marker: drop the copy |
//! | 2     | CREATE marker                                 | the copy      | marker and copy: redo phase 3 |
//! | 3     | DROP t IF EXISTS, CREATE t (new types), INSERT t SELECT FROM copy | the copy | marker and copy: redo phase 3 |
//! | 4     | DROP marker, DROP copy                        | `t`           | copy without marker: drop it; marker without copy: drop it |
//!
//! Recovery runs inside `apply` (under the table's lease, where leases are on), before any
//! DDL of the batch. `describe()` reports the copy's shape while the marker exists, so the
//! plan is made against the table as it will be once recovery has run.
//! Cost: the table is written twice. Widening is rare (a source type change accepted by
//! the schema policy); a planner that prefers a variant column avoids it entirely.

use std::sync::atomic::AtomicBool;

use crate::schema::types::{Column, ColumnType};
use crate::warehouse::WarehouseError;

use super::catalog::{Inspection, inspect};
use super::run::Runner;
use super::sql;
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
        (true, Some(complete)) => {
            tracing::warn!(
                table,
                "finishing an interrupted widening rebuild from its complete copy"
            );
            let primary_key = complete.primary_key.clone();
            restore(run, schema, table, &complete.columns, &primary_key).await
        }
        (true, None) => {
            // The copy is dropped only after t was restored: t is complete.
            run.run("rebuild-cleanup", sql::drop_table(&marker)).await?;
            Ok(())
        }
        (false, Some(_)) => {
            // Phase 1 was interrupted (t untouched) or phase 4 was: t is authoritative.
            run.run("rebuild-cleanup", sql::drop_table(&copy)).await?;
            Ok(())
        }
        (false, None) => Ok(()),
    }
}

/// Rebuilds `table` with the columns of `widen` changed to their new types.
pub async fn widen(
    run: &mut Runner<'_>,
    schema: &str,
    table: &str,
    widen: &[(String, ColumnType)],
    no_indexes: &AtomicBool,
) -> Result<(), WarehouseError> {
    // Table names leave room for the rebuild tables' (`MAX_TABLE_NAME_LEN`).
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
    let mut columns = target.columns.clone();
    let mut changed = Vec::new();
    for (name, to) in widen {
        let Some(c) = columns.iter_mut().find(|c| &c.name == name) else {
            return Err(WarehouseError::Sql(format!(
                "cannot widen `{table}`.`{name}`: no such column"
            )));
        };
        if &c.ty != to {
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
    let marker = qualified(schema, &sql::rebuilt_marker(table));

    // Phase 1: the copy, with the new types. `t` stays authoritative until the marker.
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
    // Phase 2: from here the copy is authoritative.
    run.run("rebuild-mark", sql::create_marker(&marker)).await?;
    // Phases 3 and 4.
    restore(run, schema, table, &columns, &target.primary_key).await
}

/// Phases 3 and 4: recreate `table` from the complete copy, then drop marker and copy.
async fn restore(
    run: &mut Runner<'_>,
    schema: &str,
    table: &str,
    columns: &[Column],
    primary_key: &[String],
) -> Result<(), WarehouseError> {
    let target_q = qualified(schema, table);
    let copy = qualified(schema, &sql::rebuild_table(table));
    let marker = qualified(schema, &sql::rebuilt_marker(table));
    run.run("rebuild-drop", sql::drop_table(&target_q)).await?;
    run.run(
        "rebuild-create",
        sql::create_table(&target_q, columns, primary_key, false),
    )
    .await?;
    run.run(
        "rebuild-restore",
        sql::rebuild_restore(&target_q, &copy, columns),
    )
    .await?;
    run.run("rebuild-unmark", sql::drop_table(&marker)).await?;
    run.run("rebuild-drop-copy", sql::drop_table(&copy)).await?;
    Ok(())
}
