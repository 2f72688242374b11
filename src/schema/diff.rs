//! Comparing two schemas: what changed, and how a type change is classified by the
//! promotion rules (see docs/schema-evolution.md for the matrix).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::types::{Column, ColumnType, TableSchema};

/// How a column's type changed from one schema to the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TypeChange {
    Same,
    /// Every old value is representable in the new type (int32 -> int64).
    Widening,
    /// The new type is narrower than the old one: new values fit the old column.
    Narrowing,
    /// Neither holds every value of the other (int64 -> string, timestamp -> timestamptz).
    Incompatible,
}

/// The kind of a change, for policies, metrics and alert attributes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    NewTable,
    NewColumn,
    RemovedColumn,
    Widening,
    Narrowing,
    IncompatibleType,
    Nullability,
    ProbableRename,
}

impl ChangeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::NewTable => "new_table",
            ChangeKind::NewColumn => "new_column",
            ChangeKind::RemovedColumn => "removed_column",
            ChangeKind::Widening => "widening",
            ChangeKind::Narrowing => "narrowing",
            ChangeKind::IncompatibleType => "incompatible_type",
            ChangeKind::Nullability => "nullability",
            ChangeKind::ProbableRename => "probable_rename",
        }
    }
}

/// One difference between the last known schema of a table and a new file's schema.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SchemaChange {
    NewTable {
        columns: Vec<Column>,
    },
    NewColumn {
        column: String,
        #[serde(rename = "type")]
        ty: ColumnType,
    },
    RemovedColumn {
        column: String,
        #[serde(rename = "type")]
        ty: ColumnType,
    },
    /// A type change; `change` is widening, narrowing or incompatible.
    TypeChanged {
        column: String,
        from: ColumnType,
        to: ColumnType,
        change: TypeChange,
    },
    Nullability {
        column: String,
        nullable: bool,
    },
    /// A column removed and one of the same type added in the same file. Applied as a
    /// remove plus an add: the warehouse cannot know it is the same data.
    ProbableRename {
        from: String,
        to: String,
        #[serde(rename = "type")]
        ty: ColumnType,
    },
}

impl SchemaChange {
    pub fn kind(&self) -> ChangeKind {
        match self {
            SchemaChange::NewTable { .. } => ChangeKind::NewTable,
            SchemaChange::NewColumn { .. } => ChangeKind::NewColumn,
            SchemaChange::RemovedColumn { .. } => ChangeKind::RemovedColumn,
            SchemaChange::TypeChanged { change, .. } => match change {
                TypeChange::Widening | TypeChange::Same => ChangeKind::Widening,
                TypeChange::Narrowing => ChangeKind::Narrowing,
                TypeChange::Incompatible => ChangeKind::IncompatibleType,
            },
            SchemaChange::Nullability { .. } => ChangeKind::Nullability,
            SchemaChange::ProbableRename { .. } => ChangeKind::ProbableRename,
        }
    }

    /// A one-line human description, used in logs and alert subjects.
    pub fn describe(&self) -> String {
        match self {
            SchemaChange::NewTable { columns } => match columns.len() {
                1 => "new table (1 column)".to_string(),
                n => format!("new table ({n} columns)"),
            },
            SchemaChange::NewColumn { column, ty } => format!("new column {column} {ty}"),
            SchemaChange::RemovedColumn { column, ty } => {
                format!("removed column {column} {ty}")
            }
            SchemaChange::TypeChanged {
                column,
                from,
                to,
                change,
            } => format!(
                "{column}: {from} -> {to} ({})",
                match change {
                    TypeChange::Widening | TypeChange::Same => "widening",
                    TypeChange::Narrowing => "narrowing",
                    TypeChange::Incompatible => "incompatible",
                }
            ),
            SchemaChange::Nullability { column, nullable } => format!(
                "{column} is now {}",
                if *nullable { "nullable" } else { "not null" }
            ),
            SchemaChange::ProbableRename { from, to, ty } => {
                format!("probable rename {from} -> {to} ({ty})")
            }
        }
    }
}

/// Names are compared case-insensitively: both warehouses treat `ID` and `id` as one
/// column (DuckDB always, Firebolt because unquoted names fold to lower case and the
/// worker creates lower-case names there).
pub fn fold(name: &str) -> String {
    name.to_lowercase()
}

/// Two columns of one schema whose names collide once folded.
pub fn folding_collision(schema: &TableSchema) -> Option<(String, String)> {
    let mut seen: HashMap<String, &str> = HashMap::new();
    for c in &schema.columns {
        if let Some(other) = seen.insert(fold(&c.name), &c.name) {
            return Some((other.to_string(), c.name.clone()));
        }
    }
    None
}

/// The changes from `previous` (None: the table was never seen) to `next`.
pub fn diff(previous: Option<&TableSchema>, next: &TableSchema) -> Vec<SchemaChange> {
    let Some(previous) = previous else {
        return vec![SchemaChange::NewTable {
            columns: next.columns.clone(),
        }];
    };
    let old: HashMap<String, &Column> = previous
        .columns
        .iter()
        .map(|c| (fold(&c.name), c))
        .collect();
    let new: HashMap<String, &Column> = next.columns.iter().map(|c| (fold(&c.name), c)).collect();

    let mut added: Vec<&Column> = next
        .columns
        .iter()
        .filter(|c| !old.contains_key(&fold(&c.name)))
        .collect();
    let mut removed: Vec<&Column> = previous
        .columns
        .iter()
        .filter(|c| !new.contains_key(&fold(&c.name)))
        .collect();

    let mut changes = Vec::new();
    // A removed and an added column of the same type, paired in column order.
    let mut renames = Vec::new();
    removed.retain(|r| {
        if let Some(pos) = added.iter().position(|a| a.ty == r.ty) {
            let a = added.remove(pos);
            renames.push(SchemaChange::ProbableRename {
                from: r.name.clone(),
                to: a.name.clone(),
                ty: a.ty.clone(),
            });
            false
        } else {
            true
        }
    });
    for c in added {
        changes.push(SchemaChange::NewColumn {
            column: c.name.clone(),
            ty: c.ty.clone(),
        });
    }
    for c in removed {
        changes.push(SchemaChange::RemovedColumn {
            column: c.name.clone(),
            ty: c.ty.clone(),
        });
    }
    changes.extend(renames);
    for c in &next.columns {
        let Some(before) = old.get(&fold(&c.name)) else {
            continue;
        };
        let change = classify(&before.ty, &c.ty);
        if change != TypeChange::Same {
            changes.push(SchemaChange::TypeChanged {
                column: c.name.clone(),
                from: before.ty.clone(),
                to: c.ty.clone(),
                change,
            });
        }
        if before.nullable != c.nullable {
            changes.push(SchemaChange::Nullability {
                column: c.name.clone(),
                nullable: c.nullable,
            });
        }
    }
    changes
}

/// Classifies a type change by the promotion rules.
pub fn classify(from: &ColumnType, to: &ColumnType) -> TypeChange {
    if from == to {
        TypeChange::Same
    } else if widens(from, to) {
        TypeChange::Widening
    } else if widens(to, from) {
        TypeChange::Narrowing
    } else {
        TypeChange::Incompatible
    }
}

/// Whether every value of `from` is exactly representable in `to`.
pub fn widens(from: &ColumnType, to: &ColumnType) -> bool {
    use ColumnType::*;
    if from == to {
        return true;
    }
    if let (Some((fs, fb)), Some((ts, tb))) = (from.integer(), to.integer()) {
        return match (fs, ts) {
            (true, true) | (false, false) => tb > fb,
            (false, true) => tb > fb,
            (true, false) => false,
        };
    }
    if let Some((_, bits)) = from.integer() {
        return match to {
            // Floats hold integers exactly up to their mantissa width.
            Float32 => bits <= 16,
            Float64 => bits <= 32,
            Decimal { precision, scale } => {
                let digits = from.integer_digits().unwrap_or(u8::MAX);
                precision.saturating_sub(*scale) >= digits
            }
            _ => false,
        };
    }
    match (from, to) {
        (Float32, Float64) => true,
        (
            Decimal {
                precision: p1,
                scale: s1,
            },
            Decimal {
                precision: p2,
                scale: s2,
            },
        ) => s2 >= s1 && p2.saturating_sub(*s2) >= p1.saturating_sub(*s1),
        (Date, Timestamp) | (Date, TimestampTz) => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ColumnType::*;

    fn schema(cols: &[(&str, ColumnType)]) -> TableSchema {
        TableSchema::new(
            cols.iter()
                .map(|(n, t)| Column::new(*n, t.clone()))
                .collect(),
        )
    }

    #[test]
    fn promotion_matrix() {
        assert_eq!(classify(&Int32, &Int64), TypeChange::Widening);
        assert_eq!(classify(&Int8, &Int16), TypeChange::Widening);
        assert_eq!(classify(&UInt32, &Int64), TypeChange::Widening);
        assert_eq!(classify(&Int64, &Int32), TypeChange::Narrowing);
        assert_eq!(classify(&Int32, &UInt32), TypeChange::Incompatible);
        assert_eq!(classify(&Float32, &Float64), TypeChange::Widening);
        assert_eq!(classify(&Int64, &Float64), TypeChange::Incompatible);
        assert_eq!(classify(&Int32, &Float64), TypeChange::Widening);
        let d = |p, s| Decimal {
            precision: p,
            scale: s,
        };
        assert_eq!(classify(&d(10, 2), &d(12, 2)), TypeChange::Widening);
        assert_eq!(classify(&d(10, 2), &d(12, 4)), TypeChange::Widening);
        assert_eq!(classify(&d(10, 2), &d(10, 4)), TypeChange::Incompatible);
        assert_eq!(classify(&d(12, 2), &d(10, 2)), TypeChange::Narrowing);
        assert_eq!(classify(&Int32, &d(10, 0)), TypeChange::Widening);
        assert_eq!(classify(&Int32, &d(9, 0)), TypeChange::Incompatible);
        assert_eq!(classify(&Int64, &String), TypeChange::Incompatible);
        assert_eq!(classify(&Date, &TimestampTz), TypeChange::Widening);
        assert_eq!(classify(&Timestamp, &TimestampTz), TypeChange::Incompatible);
    }

    #[test]
    fn detects_every_change_kind() {
        let before = schema(&[
            ("id", Int32),
            ("name", String),
            ("old", Float64),
            ("n", Int32),
        ]);
        let mut after = schema(&[
            ("ID", Int64),
            ("name", Int64),
            ("new", Float64),
            ("extra", Boolean),
            ("n", Int32),
        ]);
        after.columns[4].nullable = false;
        let changes = diff(Some(&before), &after);
        let kinds: Vec<_> = changes.iter().map(|c| c.kind()).collect();
        assert!(kinds.contains(&ChangeKind::Widening), "{changes:?}");
        assert!(kinds.contains(&ChangeKind::IncompatibleType));
        assert!(kinds.contains(&ChangeKind::ProbableRename));
        assert!(kinds.contains(&ChangeKind::NewColumn));
        assert!(kinds.contains(&ChangeKind::Nullability));
        assert!(
            !kinds.contains(&ChangeKind::RemovedColumn),
            "old/new pair is a rename"
        );
        assert_eq!(diff(None, &after)[0].kind(), ChangeKind::NewTable);
        assert!(diff(Some(&before), &before).is_empty());
    }

    #[test]
    fn folding_collisions_name_both_columns() {
        let s = schema(&[("Amount", Int32), ("amount", Int64)]);
        assert_eq!(
            folding_collision(&s),
            Some(("Amount".to_string(), "amount".to_string()))
        );
    }
}
