//! The expected state of target tables, computed from the changes the test wrote,
//! independently of the worker's code: apply each file's rows in order to a map.

use std::collections::BTreeMap;

use duckdb::types::Value;

/// A cell as DuckDB prints it with `CAST(.. AS VARCHAR)`; None is NULL.
pub type Cell = Option<String>;

#[derive(Debug, Clone)]
pub struct TableModel {
    pub columns: Vec<String>,
    key: Vec<String>,
    keyed: BTreeMap<Vec<Cell>, Vec<Cell>>,
    appended: Vec<Vec<Cell>>,
}

impl TableModel {
    pub fn keyed(key: &[&str]) -> Self {
        Self {
            columns: vec![],
            key: key.iter().map(|k| k.to_string()).collect(),
            keyed: BTreeMap::new(),
            appended: vec![],
        }
    }

    pub fn append_only() -> Self {
        Self::keyed(&[])
    }

    /// Applies one file: `columns` as written (with `Op` first for CDC files).
    pub fn apply(&mut self, columns: &[&str], rows: &[Vec<Option<&str>>]) {
        let data: Vec<&str> = columns.iter().copied().filter(|c| *c != "Op").collect();
        for c in &data {
            if !self.columns.iter().any(|m| m == c) {
                self.columns.push(c.to_string());
                for row in self.keyed.values_mut().chain(self.appended.iter_mut()) {
                    row.push(None);
                }
            }
        }
        let op_index = columns.iter().position(|c| *c == "Op");
        for row in rows {
            let op = op_index.and_then(|i| row[i]).unwrap_or("I");
            let value = |name: &str| -> Option<Cell> {
                columns
                    .iter()
                    .position(|c| *c == name)
                    .map(|i| row[i].map(str::to_string))
            };
            if self.key.is_empty() {
                if op != "D" {
                    let full = self.columns.iter().map(|c| value(c).flatten()).collect();
                    self.appended.push(full);
                }
                continue;
            }
            let key: Vec<Cell> = self.key.iter().map(|k| value(k).flatten()).collect();
            if op == "D" {
                self.keyed.remove(&key);
                continue;
            }
            let existing = self.keyed.get(&key).cloned();
            let full = self
                .columns
                .iter()
                .enumerate()
                .map(|(i, c)| match value(c) {
                    Some(v) => v,
                    // Columns the file lacks: updated rows keep theirs, new rows get NULL.
                    None => existing.as_ref().and_then(|e| e[i].clone()),
                })
                .collect();
            self.keyed.insert(key, full);
        }
    }

    pub fn rows(&self) -> Vec<Vec<Cell>> {
        let mut rows: Vec<Vec<Cell>> = if self.key.is_empty() {
            self.appended.clone()
        } else {
            self.keyed.values().cloned().collect()
        };
        rows.sort();
        rows
    }
}

/// Parquet values for a row of text cells (the writer casts them to the column types).
pub fn values(row: &[Option<&str>]) -> Vec<Value> {
    row.iter()
        .map(|c| match c {
            Some(s) => Value::Text(s.to_string()),
            None => Value::Null,
        })
        .collect()
}

/// Uploads DMS files and keeps the expected state in step.
pub struct Stream<'a> {
    pub env: &'a crate::harness::Env,
    pub models: BTreeMap<String, TableModel>,
    /// (key, etag, size) of every upload, in order.
    pub uploaded: Vec<(String, String, u64)>,
}

impl<'a> Stream<'a> {
    pub fn new(env: &'a crate::harness::Env) -> Self {
        Self {
            env,
            models: BTreeMap::new(),
            uploaded: vec![],
        }
    }

    /// The keys of every uploaded file, sorted.
    pub fn uploaded_keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.uploaded.iter().map(|(k, _, _)| k.clone()).collect();
        keys.sort();
        keys
    }

    pub fn table(&mut self, name: &str, model: TableModel) {
        self.models.insert(name.to_string(), model);
    }

    /// Writes `rows` under `columns` (name, DuckDB type) as `public/<table>/<file>`.
    pub async fn file(
        &mut self,
        table: &str,
        file: &str,
        columns: &[(&str, &str)],
        rows: &[Vec<Option<&str>>],
    ) {
        let key = self.env.key(table, file);
        let data: Vec<Vec<Value>> = rows.iter().map(|r| values(r)).collect();
        let body = crate::harness::parquet_bytes(columns, &data);
        let size = body.len() as u64;
        let etag = self.env.put_bytes(&key, body).await;
        let names: Vec<&str> = columns.iter().map(|(n, _)| *n).collect();
        self.models
            .get_mut(table)
            .unwrap_or_else(|| panic!("no model for {table}"))
            .apply(&names, rows);
        self.uploaded.push((key, etag, size));
    }

    /// Asserts every modelled table equals its expected rows (after the worker stopped).
    pub fn assert_tables(&self) {
        for (table, model) in &self.models {
            let columns: Vec<&str> = model.columns.iter().map(String::as_str).collect();
            let actual = self.env.rows(table, &columns);
            let expected = model.rows();
            assert_eq!(
                actual, expected,
                "table {table}: actual rows (left) differ from the expected state (right)"
            );
        }
    }
}
