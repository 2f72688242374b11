//! Writing Parquet files as DMS would, for the tests and the development tools.

use std::path::Path;

use duckdb::types::Value;

use crate::warehouse::sql::{ident, literal};

/// Writes rows to a Parquet file with DuckDB. `columns` are (name, DuckDB type); values
/// are cast to the column type, so text works for decimals and timestamps.
pub fn write_parquet(
    path: &Path,
    columns: &[(String, String)],
    rows: &[Vec<Value>],
) -> anyhow::Result<()> {
    let conn = duckdb::Connection::open_in_memory()?;
    let defs: Vec<String> = columns
        .iter()
        .map(|(n, t)| format!("{} {t}", ident(n)))
        .collect();
    conn.execute_batch(&format!("CREATE TABLE t ({})", defs.join(", ")))?;
    // Many rows per statement: one round trip per chunk instead of per row.
    let casts: Vec<String> = columns
        .iter()
        .map(|(_, t)| format!("CAST(? AS {t})"))
        .collect();
    let tuple = format!("({})", casts.join(", "));
    for chunk in rows.chunks(500) {
        let sql = format!(
            "INSERT INTO t VALUES {}",
            vec![tuple.as_str(); chunk.len()].join(", ")
        );
        conn.execute(&sql, duckdb::params_from_iter(chunk.iter().flatten()))?;
    }
    conn.execute_batch(&format!(
        "COPY t TO {} (FORMAT PARQUET)",
        literal(&path.to_string_lossy())
    ))?;
    Ok(())
}
