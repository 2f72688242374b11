//! Reading a table's shape from `information_schema`: its columns, its primary index (the
//! key `describe()` reports), and whether a widening rebuild left a copy or a marker
//! behind. One round trip for all of it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::batch::TargetTable;
use crate::schema::dialect::Dialect;
use crate::schema::types::Column;

use super::error::FireboltError;
use super::protocol::QueryResult;
use super::run::Runner;
use super::sql;

/// A table and what a rebuild of it left behind.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Inspection {
    pub target: Option<TargetTable>,
    /// The rebuild copy (`_cdc_worker_rebuild__<table>`).
    pub copy: Option<TargetTable>,
    /// The marker that says the copy is complete and authoritative.
    pub marker: bool,
}

impl Inspection {
    pub fn has_leftovers(&self) -> bool {
        self.marker || self.copy.is_some()
    }
}

#[derive(Default)]
struct Found {
    columns: Vec<Column>,
    in_primary_index: Vec<String>,
    index_definition: Option<String>,
}

fn yes(text: Option<String>) -> bool {
    matches!(
        text.as_deref()
            .map(|t| t.trim().to_ascii_lowercase())
            .as_deref(),
        Some("yes" | "true" | "t" | "1")
    )
}

/// Parses the rows of [`sql::describe_query`].
pub fn parse_inspection(table: &str, result: &QueryResult) -> Inspection {
    let mut found: BTreeMap<String, Found> = BTreeMap::new();
    for row in 0..result.rows.len() {
        let (Some(kind), Some(name)) = (result.text_at(row, 0), result.text_at(row, 1)) else {
            continue;
        };
        let entry = found.entry(name).or_default();
        match kind.as_str() {
            "index" => entry.index_definition = result.text_at(row, 2),
            _ => {
                let Some(column) = result.text_at(row, 2) else {
                    continue;
                };
                let nullable = result
                    .text_at(row, 4)
                    .is_none_or(|n| n.trim().is_empty() || yes(Some(n)));
                if yes(result.text_at(row, 5)) {
                    entry.in_primary_index.push(column.clone());
                }
                entry.columns.push(Column {
                    name: column,
                    ty: Dialect::Firebolt.parse_type(&result.text_at(row, 3).unwrap_or_default()),
                    nullable,
                });
            }
        }
    }
    let mut take = |name: &str| -> Option<TargetTable> {
        let f = found.remove(name)?;
        if f.columns.is_empty() {
            return None;
        }
        // The primary index definition gives the key's order; keep it only if it names
        // columns of the table, else fall back to is_in_primary_index (in column order).
        let from_definition: Vec<String> = f
            .index_definition
            .as_deref()
            .map(sql::parse_index_definition)
            .unwrap_or_default()
            .iter()
            .filter_map(|n| {
                f.columns
                    .iter()
                    .find(|c| c.name == *n)
                    .or_else(|| f.columns.iter().find(|c| c.name.eq_ignore_ascii_case(n)))
                    .map(|c| c.name.clone())
            })
            .collect();
        let primary_key = if !from_definition.is_empty() {
            from_definition
        } else {
            f.in_primary_index
        };
        Some(TargetTable {
            name: table.to_string(),
            columns: f.columns,
            primary_key,
            dialect: Dialect::Firebolt,
        })
    };
    let target = take(table);
    let copy = take(&sql::rebuild_table(table));
    let marker = take(&sql::rebuilt_marker(table)).is_some();
    Inspection {
        target,
        copy,
        marker,
    }
}

/// Describes `table` and its rebuild leftovers. Falls back to the columns alone (and
/// `is_in_primary_index`) where `information_schema.tables.primary_index` is missing, and
/// remembers that in `no_indexes`; and to the server's column order where
/// `ordinal_position` is missing.
pub async fn inspect(
    run: &mut Runner<'_>,
    schema: &str,
    table: &str,
    no_indexes: &AtomicBool,
) -> Result<Inspection, FireboltError> {
    let names = vec![
        table.to_string(),
        sql::rebuild_table(table),
        sql::rebuilt_marker(table),
    ];
    let mut ordered = true;
    loop {
        let with_index = !no_indexes.load(Ordering::Relaxed);
        let sql = if with_index {
            sql::describe_query(schema, &names, ordered)
        } else {
            sql::describe_columns_query(schema, &names, ordered)
        };
        match run.run("describe", sql).await {
            Ok(result) => return Ok(parse_inspection(table, &result)),
            Err(e) => {
                let description = e.sql_description().unwrap_or_default().to_ascii_lowercase();
                if with_index && description.contains("primary_index") {
                    tracing::info!(error = %e, "information_schema.tables has no primary_index; primary keys come from is_in_primary_index");
                    no_indexes.store(true, Ordering::Relaxed);
                } else if ordered && description.contains("ordinal_position") {
                    // The columns then come in the server's order.
                    tracing::info!(error = %e, "information_schema.columns has no ordinal_position");
                    ordered = false;
                } else {
                    return Err(e);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::types::ColumnType;
    use serde_json::json;

    #[test]
    fn columns_primary_index_and_leftovers_are_read() {
        let rows = vec![
            json!(["column", "orders", "id", "bigint", "NO", "YES"]),
            json!(["column", "orders", "name", "text null", "YES", "NO"]),
            json!(["column", "orders", "region", "text", "YES", "YES"]),
            json!(["index", "orders", "[region, id]", "", "", ""]),
            json!([
                "column",
                "_cdc_worker_rebuild__orders",
                "id",
                "numeric(38, 0)",
                "YES",
                "NO"
            ]),
            json!([
                "column",
                "_cdc_worker_rebuilt__orders",
                "rebuilt",
                "boolean",
                "YES",
                "NO"
            ]),
        ];
        let result = QueryResult {
            rows: rows
                .into_iter()
                .map(|r| r.as_array().unwrap().clone())
                .collect(),
            ..Default::default()
        };
        let i = parse_inspection("orders", &result);
        let t = i.target.unwrap();
        assert_eq!(
            t.primary_key,
            vec!["region", "id"],
            "the definition's order wins"
        );
        assert_eq!(
            t.columns[0],
            Column {
                name: "id".into(),
                ty: ColumnType::Int64,
                nullable: false
            }
        );
        assert_eq!(t.columns[1].ty, ColumnType::String);
        assert_eq!(
            i.copy.unwrap().columns[0].ty,
            ColumnType::Decimal {
                precision: 38,
                scale: 0
            }
        );
        assert!(i.marker);

        // Without an index definition, is_in_primary_index decides.
        let result = QueryResult {
            rows: vec![
                json!(["column", "t", "a", "int", "YES", "NO"])
                    .as_array()
                    .unwrap()
                    .clone(),
                json!(["column", "t", "b", "int", "YES", "YES"])
                    .as_array()
                    .unwrap()
                    .clone(),
            ],
            ..Default::default()
        };
        let i = parse_inspection("t", &result);
        assert!(!i.has_leftovers());
        assert_eq!(i.target.unwrap().primary_key, vec!["b"]);
        assert_eq!(parse_inspection("missing", &result).target, None);
    }
}
