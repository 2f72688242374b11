//! Planning one segment of a batch (files that share a schema): which DDL the target
//! needs, how each column is loaded, and whether the schema policy holds the table.
//!
//! Two comparisons drive it. The *source changes* (last accepted source schema vs. the
//! file) decide whether a policy holds the table and what the alert says. The *target
//! comparison* (the warehouse's columns vs. the file) decides the DDL and casts. Keeping
//! them apart makes the plan idempotent: a crash between DDL and commit, or a change
//! accepted with `cdc-worker schema accept`, is simply planned again from what is there.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::batch::{
    Ddl, HISTORY_COLUMNS, HISTORY_OP, IS_CURRENT, KeyColumn, LoadColumn, LoadExpr, LoadMode,
    TargetTable, VALID_FROM, VALID_TO,
};
use crate::schema::diff::{ChangeKind, SchemaChange, TypeChange, classify, fold};
use crate::schema::policy::{
    IncompatiblePolicy, NewColumnPolicy, NewTablePolicy, RemovedColumnPolicy, SchemaPolicy,
    WideningPolicy,
};
use crate::schema::types::{Column, ColumnType, FileSchema};

/// What the worker did (or will do) about a change, for alerts and logs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action {
    CreatedTable {
        key: Vec<String>,
    },
    AddedColumn {
        column: String,
        #[serde(rename = "type")]
        ty: ColumnType,
    },
    IgnoredColumn {
        column: String,
        reason: String,
    },
    KeptColumn {
        column: String,
        note: String,
    },
    WidenedColumn {
        column: String,
        from: ColumnType,
        to: ColumnType,
    },
    CastOnLoad {
        column: String,
        to: ColumnType,
        lossless: bool,
    },
    AddedVariantColumn {
        column: String,
        variant: String,
        #[serde(rename = "type")]
        ty: ColumnType,
    },
    Held {
        reason: String,
    },
    IgnoredTable,
    AppendOnly {
        note: String,
    },
}

impl Action {
    pub fn describe(&self) -> String {
        match self {
            Action::CreatedTable { key } if key.is_empty() => {
                "created the table (no key: rows are appended)".into()
            }
            Action::CreatedTable { key } => format!("created the table, key ({})", key.join(", ")),
            Action::AddedColumn { column, ty } => format!("added column {column} {ty}"),
            Action::IgnoredColumn { column, reason } => {
                format!("ignored column {column}: {reason}")
            }
            Action::KeptColumn { column, note } => format!("kept column {column}: {note}"),
            Action::WidenedColumn { column, from, to } => {
                format!("widened column {column} {from} -> {to}")
            }
            Action::CastOnLoad {
                column,
                to,
                lossless,
            } => format!(
                "values of {column} are cast to {to}{}",
                if *lossless {
                    " (lossless)"
                } else {
                    "; values that do not cast load as NULL"
                }
            ),
            Action::AddedVariantColumn {
                column,
                variant,
                ty,
            } => format!("values of {column} that do not fit go to new column {variant} {ty}"),
            Action::Held { reason } => format!("table held: {reason}"),
            Action::IgnoredTable => "table ignored: its files are dropped".into(),
            Action::AppendOnly { note } => note.clone(),
        }
    }
}

/// What the planner decided for a segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Apply {
        ddl: Vec<Ddl>,
        load: Vec<LoadColumn>,
        mode: LoadMode,
        actions: Vec<Action>,
    },
    /// The policy says stop: nothing is applied until the change is accepted.
    Hold {
        reason: String,
        kinds: Vec<ChangeKind>,
    },
    /// The files cannot be applied as they are (a key column missing, key values the
    /// table repeats): not a policy decision, so nothing to accept. They wait, and are tried
    /// again until the cause is fixed.
    Wait { reason: String },
    /// `new_table = "ignore"`: the table's files are dropped.
    Ignore,
}

/// The inputs of [`plan`].
pub struct PlanInput<'a> {
    pub target: Option<&'a TargetTable>,
    pub file: &'a FileSchema,
    pub policy: SchemaPolicy,
    /// Changes from the last accepted source schema to this file (empty: none).
    pub source_changes: &'a [SchemaChange],
    /// Per-column choices made with `cdc-worker schema accept` for incompatible types.
    pub resolutions: &'a BTreeMap<String, IncompatiblePolicy>,
    /// Key columns (source names); empty: no key, append.
    pub key: &'a [String],
    pub column_name: &'a dyn Fn(&str) -> String,
    /// `history = "scd2"`: the target keeps every version, in the history columns.
    pub history: bool,
    /// `track_history_columns`, when configured (source names).
    pub tracked: Option<&'a [String]>,
}

/// Suffix of variant columns: `price__v_string`.
pub fn variant_column(column: &str, ty: &ColumnType) -> String {
    let ty = ty.to_string();
    let ty: String = ty
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("{column}__v_{}", ty.trim_end_matches('_'))
}

/// Decides DDL, load expressions and holds for one segment.
pub fn plan(input: &PlanInput<'_>) -> Decision {
    if let Some(reason) = history_mismatch(input) {
        return Decision::Wait { reason };
    }
    if let Some(hold) = policy_hold(input) {
        return hold;
    }
    let key = match key_columns(input) {
        Ok(key) => key,
        Err(hold) => return hold,
    };
    let mode = if key.is_empty() {
        LoadMode::Append
    } else {
        LoadMode::Merge { key: key.clone() }
    };
    let mut out = Planned::default();
    let loadable = loadable_columns(input, &mut out.actions);
    match input.target {
        None => plan_new_table(input, &key, &loadable, &mut out),
        Some(target) => {
            note_source_changes(input, &mut out.actions);
            for c in loadable {
                plan_column(input, target, c, &mut out);
            }
        }
    }
    if let Some(reason) = untracked_configured_columns(input, &out.load) {
        return Decision::Wait { reason };
    }
    Decision::Apply {
        ddl: out.ddl,
        load: out.load,
        mode,
        actions: out.actions,
    }
}

/// Why the segment cannot go into the table as its `history` setting says, if it cannot:
/// a history table needs a key and the history column names, and a table keeps the kind
/// it was created as (changing it is a new table: docs/history.md).
fn history_mismatch(input: &PlanInput<'_>) -> Option<String> {
    let has = |columns: &[Column], name: &str| columns.iter().any(|c| fold(&c.name) == name);
    if input.history {
        if input.key.is_empty() {
            return Some("history = \"scd2\" needs a key: set [tables.NAME] key = [...] or add the table to table_keys.json".into());
        }
        if let Some(c) = HISTORY_COLUMNS
            .iter()
            .find(|c| has(&input.file.table.columns, c))
        {
            return Some(format!(
                "source column `{c}` collides with a history column of history = \"scd2\"; rename it with a DMS transformation rule"
            ));
        }
    }
    let target = input.target?;
    match (input.history, target.is_history(&input.file.table.columns)) {
        (true, false) => Some("history = \"scd2\" but the table exists without history columns: keep history = \"latest\", or start a new history table (docs/history.md)".into()),
        (false, true) => Some("the table is a history table but its history setting is \"latest\": set history = \"scd2\" for it, or start a new table (docs/history.md)".into()),
        _ => None,
    }
}

/// Configured `track_history_columns` the segment does not load (a type that cannot be
/// loaded, a column a policy ignores): tracking fewer columns than asked would quietly
/// turn updates of them into in-place changes, so the table waits instead.
fn untracked_configured_columns(input: &PlanInput<'_>, load: &[LoadColumn]) -> Option<String> {
    let tracked = input.tracked.filter(|_| input.history)?;
    let loaded = |c: &str| load.iter().any(|l| fold(l.expr.source_column()) == fold(c));
    let missing: Vec<&str> = tracked
        .iter()
        .map(String::as_str)
        .filter(|c| !loaded(c))
        .collect();
    (!missing.is_empty()).then(|| {
        format!(
            "track_history_columns names columns this table does not load: {}; name loaded columns only",
            missing.join(", ")
        )
    })
}

/// The columns a history table adds to the source's.
fn history_columns() -> Vec<Column> {
    [
        (VALID_FROM, ColumnType::Timestamp),
        (VALID_TO, ColumnType::Timestamp),
        (IS_CURRENT, ColumnType::Boolean),
        (HISTORY_OP, ColumnType::String),
    ]
    .into_iter()
    .map(|(name, ty)| Column {
        name: name.into(),
        ty,
        nullable: true,
    })
    .collect()
}

/// What a plan accumulates column by column.
#[derive(Default)]
struct Planned {
    ddl: Vec<Ddl>,
    load: Vec<LoadColumn>,
    actions: Vec<Action>,
}

impl Planned {
    fn load_as_is(&mut self, target: String, source: &str) {
        self.load.push(LoadColumn {
            target,
            expr: LoadExpr::Column(source.to_string()),
        });
    }
}

/// The key's columns as the file names them; a key column missing from the file holds
/// the table, whatever the target.
fn key_columns(input: &PlanInput<'_>) -> Result<Vec<KeyColumn>, Decision> {
    let file_columns = &input.file.table.columns;
    input
        .key
        .iter()
        .map(|k| match file_columns.iter().find(|c| fold(&c.name) == fold(k)) {
            Some(c) => Ok(KeyColumn {
                target: (input.column_name)(&c.name),
                source: c.name.clone(),
            }),
            None => Err(Decision::Wait {
                reason: format!(
                    "key column `{k}` is not in the file; fix the table's key (config, table_keys.json) or the source"
                ),
            }),
        })
        .collect()
}

/// The file's columns that can be loaded; the others are reported as ignored.
fn loadable_columns<'a>(input: &PlanInput<'a>, actions: &mut Vec<Action>) -> Vec<&'a Column> {
    input
        .file
        .table
        .columns
        .iter()
        .filter(|c| {
            let ColumnType::Unsupported(what) = &c.ty else {
                return true;
            };
            actions.push(Action::IgnoredColumn {
                column: c.name.clone(),
                reason: format!("type {what} cannot be loaded"),
            });
            false
        })
        .collect()
}

fn plan_new_table(
    input: &PlanInput<'_>,
    key: &[KeyColumn],
    loadable: &[&Column],
    out: &mut Planned,
) {
    let name = input.column_name;
    // Key columns are NOT NULL: Firebolt refuses nullable columns in a primary index
    // (its docs up to 2025), and DMS keys are primary keys. Staged rows with a NULL key
    // are skipped and counted by the warehouse (`ApplyStats::null_key_rows`).
    let mut columns: Vec<Column> = loadable
        .iter()
        .map(|c| Column {
            name: name(&c.name),
            ty: c.ty.clone(),
            nullable: !key.iter().any(|k| k.source == c.name),
        })
        .collect();
    if input.history {
        columns.extend(history_columns());
    }
    let key_names: Vec<String> = key.iter().map(|k| k.target.clone()).collect();
    out.actions.insert(
        0,
        Action::CreatedTable {
            key: key_names.clone(),
        },
    );
    if key.is_empty() {
        out.actions.push(Action::AppendOnly {
            note: "no key configured: rows are appended and deletes ignored; set [tables.NAME] key = [...] or add the table to table_keys.json to merge".into(),
        });
    }
    out.ddl.push(Ddl::CreateTable {
        columns,
        primary_key: key_names,
    });
    for c in loadable {
        out.load_as_is(name(&c.name), &c.name);
    }
}

/// Source changes that need no DDL but are reported: removed columns are kept, columns
/// that became nullable need nothing.
fn note_source_changes(input: &PlanInput<'_>, actions: &mut Vec<Action>) {
    for change in input.source_changes {
        match change {
            SchemaChange::RemovedColumn { column, .. }
            | SchemaChange::ProbableRename { from: column, .. } => {
                actions.push(Action::KeptColumn {
                    column: column.clone(),
                    note: "inserted rows get NULL; updated rows keep their last value".into(),
                })
            }
            SchemaChange::Nullability {
                column,
                nullable: true,
            } => actions.push(Action::KeptColumn {
                column: column.clone(),
                note: "now nullable at the source; no change needed (target columns are nullable)"
                    .into(),
            }),
            _ => {}
        }
    }
}

/// How one file column reaches an existing target: added, loaded as it is, cast, widened,
/// or split into a variant column.
fn plan_column(input: &PlanInput<'_>, target: &TargetTable, c: &Column, out: &mut Planned) {
    let target_name = (input.column_name)(&c.name);
    let Some(existing) = target
        .columns
        .iter()
        .find(|t| fold(&t.name) == fold(&target_name))
    else {
        plan_new_column(input, c, target_name, out);
        return;
    };
    let target_name = existing.name.clone();
    match target_change(target, &existing.ty, &c.ty) {
        TypeChange::Same => out.load_as_is(target_name, &c.name),
        TypeChange::Narrowing => {
            let reported = input.source_changes.iter().any(|ch| {
                matches!(ch, SchemaChange::TypeChanged { column, .. } if fold(column) == fold(&c.name))
            });
            if reported {
                out.actions.push(Action::CastOnLoad {
                    column: target_name.clone(),
                    to: existing.ty.clone(),
                    lossless: true,
                });
            }
            out.load.push(LoadColumn {
                target: target_name,
                expr: LoadExpr::Cast {
                    column: c.name.clone(),
                    to: existing.ty.clone(),
                },
            });
        }
        TypeChange::Widening => {
            // `widening = "fail"` reaches here only once accepted.
            out.actions.push(Action::WidenedColumn {
                column: target_name.clone(),
                from: existing.ty.clone(),
                to: c.ty.clone(),
            });
            out.ddl.push(Ddl::WidenColumn {
                column: target_name.clone(),
                from: existing.ty.clone(),
                to: c.ty.clone(),
            });
            out.load_as_is(target_name, &c.name);
        }
        TypeChange::Incompatible => plan_incompatible(input, target, existing, c, out),
    }
}

fn plan_new_column(input: &PlanInput<'_>, c: &Column, target_name: String, out: &mut Planned) {
    match input.policy.new_column {
        NewColumnPolicy::Ignore => out.actions.push(Action::IgnoredColumn {
            column: c.name.clone(),
            reason: "policy new_column = ignore: its values are not loaded".into(),
        }),
        // Fail reaches here only once accepted: then it is added.
        NewColumnPolicy::Add | NewColumnPolicy::Fail => {
            out.actions.push(Action::AddedColumn {
                column: target_name.clone(),
                ty: c.ty.clone(),
            });
            out.ddl.push(Ddl::AddColumn {
                column: Column {
                    name: target_name.clone(),
                    ty: c.ty.clone(),
                    nullable: true,
                },
            });
            out.load_as_is(target_name, &c.name);
        }
    }
}

/// A type the target column cannot hold: a variant column, a cast that may fail, or the
/// values ignored, as the accepted resolution or the policy says.
fn plan_incompatible(
    input: &PlanInput<'_>,
    target: &TargetTable,
    existing: &Column,
    c: &Column,
    out: &mut Planned,
) {
    let target_name = existing.name.clone();
    let resolution =
        input
            .resolutions
            .get(&fold(&c.name))
            .copied()
            .unwrap_or(match input.policy.incompatible {
                // Fail reaches here only once accepted without a choice.
                IncompatiblePolicy::Fail => IncompatiblePolicy::Variant,
                other => other,
            });
    let try_cast = LoadExpr::TryCast {
        column: c.name.clone(),
        to: existing.ty.clone(),
    };
    match resolution {
        IncompatiblePolicy::Variant | IncompatiblePolicy::Fail => {
            let variant = variant_column(&target_name, &c.ty);
            if !target.columns.iter().any(|t| fold(&t.name) == fold(&variant)) {
                out.ddl.push(Ddl::AddColumn {
                    column: Column::new(variant.clone(), c.ty.clone()),
                });
            }
            out.actions.push(Action::AddedVariantColumn {
                column: target_name.clone(),
                variant: variant.clone(),
                ty: c.ty.clone(),
            });
            out.load.push(LoadColumn {
                target: target_name,
                expr: try_cast,
            });
            out.load.push(LoadColumn {
                target: variant,
                expr: LoadExpr::Variant {
                    column: c.name.clone(),
                    fits: existing.ty.clone(),
                },
            });
        }
        IncompatiblePolicy::Cast => {
            out.actions.push(Action::CastOnLoad {
                column: target_name.clone(),
                to: existing.ty.clone(),
                lossless: false,
            });
            out.load.push(LoadColumn {
                target: target_name,
                expr: try_cast,
            });
        }
        IncompatiblePolicy::Ignore => out.actions.push(Action::IgnoredColumn {
            column: target_name,
            reason: format!(
                "type changed to {} (incompatible = ignore): inserted rows get NULL, updated rows keep their last value",
                c.ty
            ),
        }),
    }
}

/// How a target column's type compares with the file's. Types the target's dialect
/// renders alike are the same column type there, whatever the parsed types say: a column
/// the worker created from the file's type must never look changed when it is described
/// again (Firebolt: a uint64 and a decimal(20,0) are both NUMERIC(20, 0), a decimal wider
/// than 38 digits is NUMERIC(38, s), a TIME is TEXT).
fn target_change(target: &TargetTable, existing: &ColumnType, file: &ColumnType) -> TypeChange {
    if target.dialect.type_name(existing) == target.dialect.type_name(file) {
        TypeChange::Same
    } else {
        classify(existing, file)
    }
}

/// Whether a new (not yet accepted) change meets a policy that stops the table.
fn policy_hold(input: &PlanInput<'_>) -> Option<Decision> {
    let p = &input.policy;
    let mut kinds = Vec::new();
    let mut reasons = Vec::new();
    for change in input.source_changes {
        let stop = match change {
            SchemaChange::NewTable { .. } => match p.new_table {
                NewTablePolicy::Ignore => return Some(Decision::Ignore),
                NewTablePolicy::Hold => input.target.is_none(),
                NewTablePolicy::Create => false,
            },
            SchemaChange::NewColumn { .. } => p.new_column == NewColumnPolicy::Fail,
            SchemaChange::RemovedColumn { .. } => p.removed_column == RemovedColumnPolicy::Fail,
            SchemaChange::ProbableRename { .. } => {
                p.new_column == NewColumnPolicy::Fail
                    || p.removed_column == RemovedColumnPolicy::Fail
            }
            SchemaChange::TypeChanged { change, .. } => match change {
                TypeChange::Widening => p.widening == WideningPolicy::Fail,
                TypeChange::Incompatible => p.incompatible == IncompatiblePolicy::Fail,
                TypeChange::Narrowing | TypeChange::Same => false,
            },
            SchemaChange::Nullability { .. } => false,
        };
        if stop {
            kinds.push(change.kind());
            reasons.push(change.describe());
        }
    }
    if kinds.is_empty() {
        return None;
    }
    kinds.sort();
    kinds.dedup();
    Some(Decision::Hold {
        reason: format!(
            "{} (policy {})",
            reasons.join("; "),
            serde_json::to_value(p.preset)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default()
        ),
        kinds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::diff::diff;
    use crate::schema::policy::PolicyPreset;
    use crate::schema::types::TableSchema;

    fn file(cols: &[(&str, ColumnType)]) -> FileSchema {
        FileSchema {
            table: TableSchema::new(
                cols.iter()
                    .map(|(n, t)| Column::new(*n, t.clone()))
                    .collect(),
            ),
            op: Some("Op".into()),
            rows: 1,
            timestamp_max: vec![],
        }
    }

    fn target(cols: &[(&str, ColumnType)]) -> TargetTable {
        TargetTable {
            name: "t".into(),
            columns: cols
                .iter()
                .map(|(n, t)| Column::new(*n, t.clone()))
                .collect(),
            primary_key: vec![],
            dialect: crate::schema::dialect::Dialect::Duckdb,
        }
    }

    /// A new history table of `f` keyed on `id`, tracking `tracked`.
    fn history_plan(f: &FileSchema, tracked: &[String]) -> Decision {
        let key = vec!["id".to_string()];
        let identity = |s: &str| s.to_string();
        plan(&PlanInput {
            target: None,
            file: f,
            policy: PolicyPreset::Evolve.policy(),
            source_changes: &[],
            resolutions: &BTreeMap::new(),
            key: &key,
            column_name: &identity,
            history: true,
            tracked: Some(tracked),
        })
    }

    #[test]
    fn a_history_table_gets_its_columns_and_waits_for_tracked_columns_it_cannot_load() {
        let f = file(&[
            ("id", ColumnType::Int64),
            ("v", ColumnType::String),
            ("shape", ColumnType::Unsupported("GEOMETRY".into())),
        ]);
        let Decision::Apply { ddl, .. } = history_plan(&f, &["V".into()]) else {
            panic!("a tracked column that loads applies")
        };
        let Ddl::CreateTable { columns, .. } = &ddl[0] else {
            panic!("{ddl:?}")
        };
        let names: Vec<&str> = columns.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "id",
                "v",
                "__valid_from",
                "__valid_to",
                "__is_current",
                "__op"
            ]
        );
        for tracked in ["shape", "typo"] {
            match history_plan(&f, &[tracked.into()]) {
                Decision::Wait { reason } => assert!(reason.contains(tracked), "{reason}"),
                other => panic!("{tracked}: {other:?}"),
            }
        }
        let with_op = file(&[("id", ColumnType::Int64), ("__op", ColumnType::String)]);
        match history_plan(&with_op, &[]) {
            Decision::Wait { reason } => assert!(reason.contains("__op"), "{reason}"),
            other => panic!("a source column named like a history column: {other:?}"),
        }
    }

    fn run(
        target: Option<&TargetTable>,
        stored: Option<&TableSchema>,
        f: &FileSchema,
        preset: PolicyPreset,
        key: &[&str],
    ) -> Decision {
        let changes = if stored.map(|s| s == &f.table).unwrap_or(false) {
            vec![]
        } else {
            diff(stored, &f.table)
        };
        let key: Vec<String> = key.iter().map(|s| s.to_string()).collect();
        let identity = |s: &str| s.to_string();
        plan(&PlanInput {
            target,
            file: f,
            policy: preset.policy(),
            source_changes: &changes,
            resolutions: &BTreeMap::new(),
            key: &key,
            column_name: &identity,
            history: false,
            tracked: None,
        })
    }

    #[test]
    fn new_table_is_created_with_its_key() {
        let f = file(&[("id", ColumnType::Int64), ("name", ColumnType::String)]);
        match run(None, None, &f, PolicyPreset::Evolve, &["ID"]) {
            Decision::Apply { ddl, mode, .. } => {
                let Ddl::CreateTable {
                    primary_key,
                    columns,
                } = &ddl[0]
                else {
                    panic!("{ddl:?}")
                };
                assert_eq!(primary_key, &["id"]);
                assert_eq!(
                    columns
                        .iter()
                        .map(|c| (c.name.as_str(), c.nullable))
                        .collect::<Vec<_>>(),
                    [("id", false), ("name", true)],
                    "key columns are NOT NULL (a Firebolt primary index refuses nullable ones)"
                );
                assert!(matches!(mode, LoadMode::Merge { .. }));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            run(None, None, &f, PolicyPreset::Strict, &["id"]),
            Decision::Hold { .. }
        ));
    }

    #[test]
    fn new_column_is_added_or_holds() {
        let t = target(&[("id", ColumnType::Int64)]);
        let stored = t.columns.clone();
        let stored = TableSchema::new(stored);
        let f = file(&[("id", ColumnType::Int64), ("email", ColumnType::String)]);
        match run(Some(&t), Some(&stored), &f, PolicyPreset::Evolve, &["id"]) {
            Decision::Apply { ddl, load, .. } => {
                assert!(matches!(&ddl[0], Ddl::AddColumn { column } if column.name == "email"));
                assert_eq!(load.len(), 2);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            run(Some(&t), Some(&stored), &f, PolicyPreset::Strict, &["id"]),
            Decision::Hold { .. }
        ));
        // Once accepted (stored schema = file schema), strict adds it too.
        match run(Some(&t), Some(&f.table), &f, PolicyPreset::Strict, &["id"]) {
            Decision::Apply { ddl, .. } => assert_eq!(ddl.len(), 1),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn type_changes_widen_cast_or_variant() {
        let t = target(&[
            ("id", ColumnType::Int64),
            ("n", ColumnType::Int32),
            ("p", ColumnType::Int64),
        ]);
        let stored = TableSchema::new(t.columns.clone());
        let f = file(&[
            ("id", ColumnType::Int32),
            ("n", ColumnType::Int64),
            ("p", ColumnType::String),
        ]);
        match run(Some(&t), Some(&stored), &f, PolicyPreset::Evolve, &["id"]) {
            Decision::Apply { ddl, load, .. } => {
                assert!(matches!(
                    &load[0].expr,
                    LoadExpr::Cast {
                        to: ColumnType::Int64,
                        ..
                    }
                ));
                assert!(
                    ddl.iter()
                        .any(|d| matches!(d, Ddl::WidenColumn { column, .. } if column == "n"))
                );
                assert!(ddl.iter().any(
                    |d| matches!(d, Ddl::AddColumn { column } if column.name == "p__v_string")
                ));
                assert!(
                    load.iter()
                        .any(|l| matches!(&l.expr, LoadExpr::Variant { .. }))
                );
            }
            other => panic!("{other:?}"),
        }
        match run(Some(&t), Some(&stored), &f, PolicyPreset::Lenient, &["id"]) {
            Decision::Apply { load, .. } => {
                assert!(load.iter().any(|l| matches!(
                    &l.expr,
                    LoadExpr::TryCast {
                        to: ColumnType::Int64,
                        ..
                    }
                )));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn missing_key_column_holds() {
        let f = file(&[("name", ColumnType::String)]);
        assert!(matches!(
            run(None, None, &f, PolicyPreset::Evolve, &["id"]),
            Decision::Wait { .. }
        ));
    }

    /// Every source type, created by the worker and described back by each warehouse,
    /// plans as unchanged: no DDL, no cast (a rebuild or variant per batch otherwise).
    #[test]
    fn a_column_the_worker_created_never_looks_changed() {
        use crate::schema::dialect::Dialect;
        let all = [
            ColumnType::Boolean,
            ColumnType::Int8,
            ColumnType::Int16,
            ColumnType::Int32,
            ColumnType::Int64,
            ColumnType::UInt8,
            ColumnType::UInt16,
            ColumnType::UInt32,
            ColumnType::UInt64,
            ColumnType::Float32,
            ColumnType::Float64,
            ColumnType::Decimal {
                precision: 20,
                scale: 0,
            },
            ColumnType::Decimal {
                precision: 12,
                scale: 2,
            },
            ColumnType::Decimal {
                precision: 40,
                scale: 4,
            },
            ColumnType::String,
            ColumnType::Binary,
            ColumnType::Date,
            ColumnType::Time,
            ColumnType::Timestamp,
            ColumnType::TimestampTz,
        ];
        for dialect in [Dialect::Duckdb, Dialect::Firebolt] {
            let cols: Vec<(String, ColumnType)> = all
                .iter()
                .enumerate()
                .map(|(i, t)| (format!("c{i}"), t.clone()))
                .collect();
            let refs: Vec<(&str, ColumnType)> =
                cols.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
            let f = file(&refs);
            // What the warehouse reports after creating each column from the file's type.
            let described = TargetTable {
                dialect,
                ..target(
                    &refs
                        .iter()
                        .map(|(n, t)| (*n, dialect.parse_type(&dialect.type_name(t))))
                        .collect::<Vec<_>>(),
                )
            };
            match run(
                Some(&described),
                Some(&f.table),
                &f,
                PolicyPreset::Strict,
                &[],
            ) {
                Decision::Apply { ddl, load, .. } => {
                    assert!(ddl.is_empty(), "{dialect:?}: {ddl:?}");
                    for l in load {
                        assert!(matches!(l.expr, LoadExpr::Column(_)), "{dialect:?}: {l:?}");
                    }
                }
                other => panic!("{dialect:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn variant_names_are_plain() {
        assert_eq!(
            variant_column(
                "price",
                &ColumnType::Decimal {
                    precision: 10,
                    scale: 2
                }
            ),
            "price__v_decimal_10_2"
        );
    }
}
