//! Whether a loader's result equals the source: the expected rows of every table, built
//! from the workload's model, compared with a result row by row (`EXCEPT ALL` both ways,
//! so a missing, extra, duplicated or changed row is caught where a count would not be).
//!
//! Rows are compared in one canonical form (key, name, amount in cents, qty as BIGINT,
//! timestamp in epoch microseconds) so that a loader's choice of types (dlt stores
//! timestamps with a time zone) is not a difference.

use duckdb::Connection;

use cdc_worker::warehouse::sql::{ident, literal};

use super::workload::{Workload, load_rows_sql};

pub struct Verifier {
    conn: Connection,
    tables: Vec<String>,
}

/// The canonical form of a relation with the source's columns.
fn canonical(relation: &str) -> String {
    format!(
        "SELECT CAST(id AS BIGINT) AS id, CAST(name AS VARCHAR) AS name, CAST(note AS VARCHAR) AS note,
                CAST(round(amount * 100) AS BIGINT) AS cents, CAST(qty AS BIGINT) AS qty,
                epoch_us(updated_at) AS us
         FROM {relation}"
    )
}

impl Verifier {
    /// Builds every table's expected rows in an in-memory database.
    pub fn new(workload: &Workload) -> anyhow::Result<Self> {
        let conn = Connection::open_in_memory()?;
        for (table, state) in &workload.tables {
            conn.execute_batch(
                "CREATE OR REPLACE TABLE touched (id BIGINT, present BOOLEAN, name VARCHAR,
                                                  note VARCHAR, cents BIGINT, qty BIGINT, us BIGINT)",
            )?;
            {
                let mut app = conn.appender("touched")?;
                for (id, row) in &state.touched {
                    match row {
                        Some(r) => app.append_row(duckdb::params![
                            id,
                            true,
                            r.name,
                            r.note,
                            r.amount_cents,
                            r.qty,
                            r.updated_us
                        ])?,
                        None => app.append_row(duckdb::params![
                            id,
                            false,
                            None::<String>,
                            None::<String>,
                            None::<i64>,
                            None::<i64>,
                            None::<i64>
                        ])?,
                    }
                }
            }
            conn.execute_batch(&format!(
                "CREATE TABLE {t} AS
                     SELECT * FROM ({load}) AS l WHERE NOT EXISTS (SELECT 1 FROM touched WHERE touched.id = l.id)
                     UNION ALL SELECT id, name, note, cents, qty, us FROM touched WHERE present",
                t = ident(&format!("expected_{table}")),
                load = canonical(&format!("({})", load_rows_sql(state.load_rows))),
            ))?;
        }
        Ok(Self {
            conn,
            tables: workload.tables.keys().cloned().collect(),
        })
    }

    /// Attaches a DuckDB file read-only under `alias` (for the worker's and the floor's).
    pub fn attach(&self, path: &std::path::Path, alias: &str) -> anyhow::Result<()> {
        self.conn.execute_batch(&format!(
            "ATTACH {} AS {} (READ_ONLY)",
            literal(&path.to_string_lossy()),
            ident(alias)
        ))?;
        Ok(())
    }

    /// "yes", or what differs, with each table read from `relation(table)`.
    pub fn check(&self, relation: impl Fn(&str) -> String) -> String {
        let mut problems = Vec::new();
        for table in &self.tables {
            let expected = ident(&format!("expected_{table}"));
            let actual = canonical(&relation(table));
            let sql = format!(
                "SELECT (SELECT count(*) FROM (SELECT * FROM {expected} EXCEPT ALL {actual})),
                        (SELECT count(*) FROM ({actual} EXCEPT ALL SELECT * FROM {expected}))"
            );
            match self
                .conn
                .query_row(&sql, [], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))
            {
                Ok((0, 0)) => {}
                Ok((missing, extra)) => problems.push(format!(
                    "{table}: {missing} rows missing, {extra} unexpected"
                )),
                Err(e) => problems.push(format!("{table}: {}", first_line(&e.to_string()))),
            }
        }
        if problems.is_empty() {
            "yes".into()
        } else {
            format!("NO ({})", problems.join("; "))
        }
    }
}

pub fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or_default()
}
