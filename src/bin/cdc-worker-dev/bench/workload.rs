//! The benchmark's workloads: DMS output written to local disk, and the state of the
//! source that it implies, which every loader's result must equal.
//!
//! Changes are generated in Rust against a model of each source table (an insert takes a
//! new key, an update or delete a live one), so the expected rows come from the model, not
//! from a query that could share a mistake with the loaders. Full-load rows come from a
//! formula over the key ([`load_rows_sql`]) so that gigabytes can be written quickly.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::Context;
use duckdb::Connection;

use cdc_worker::warehouse::sql::literal;

/// One generated DMS file.
pub struct GenFile {
    pub table: String,
    /// The object's name in the table's folder, as DMS names it.
    pub name: String,
    pub path: PathBuf,
    pub rows: u64,
    pub bytes: u64,
}

/// A source row's values (its key aside).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub name: String,
    /// 32 hex digits: what keeps rows from compressing to nothing, as real rows do not.
    pub note: String,
    pub amount_cents: i64,
    pub qty: i64,
    pub updated_us: i64,
}

/// A table's source state after all its files: the load formula's rows `0..load_rows`,
/// except keys a change touched, which hold their last change (`None`: deleted).
#[derive(Debug, Default)]
pub struct TableState {
    pub load_rows: u64,
    pub touched: HashMap<i64, Option<Row>>,
}

/// Files in upload order (each table's in DMS order) and the state they imply.
pub struct Workload {
    pub files: Vec<GenFile>,
    pub tables: BTreeMap<String, TableState>,
}

impl Workload {
    pub fn changes(&self) -> u64 {
        self.files.iter().map(|f| f.rows).sum()
    }

    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.bytes).sum()
    }
}

/// What the change files of a workload look like.
pub struct ChangeSpec {
    pub tables: usize,
    pub files: usize,
    pub rows: usize,
    /// Percent of inserts, updates (the rest are deletes).
    pub inserts: u32,
    pub updates: u32,
    /// From the middle of each table's files on, `qty` is BIGINT (a widening DMS passes on
    /// when the source column is altered), with values beyond 32 bits.
    pub widen: bool,
}

/// Microseconds of 2026-11-24 09:00:00 UTC, where generated timestamps start.
const EPOCH_US: i64 = 1_795_510_800_000_000;

/// A column DuckDB writes to Parquet as OPTIONAL, the way DMS writes every column: DuckDB
/// marks columns it can prove NOT NULL as REQUIRED, which would vary from file to file.
fn optional(expr: &str) -> String {
    format!("CASE WHEN {expr} IS NULL THEN NULL ELSE {expr} END")
}

/// The full-load formula: `n` rows keyed `0..n`, the types DMS writes for the source.
pub fn load_rows_sql(n: u64) -> String {
    format!(
        "SELECT {} AS id, {} AS name, {} AS note, {} AS amount, {} AS qty, {} AS updated_at FROM range({n})",
        optional("CAST(range AS BIGINT)"),
        optional("'customer-' || (range % 977)"),
        optional("md5(CAST(range AS VARCHAR))"),
        optional("CAST(((range * 7919) % 10000000) / 100 AS DECIMAL(12,2))"),
        optional("CAST(range % 50 AS INTEGER)"),
        optional(&format!("make_timestamp({EPOCH_US} + range)")),
    )
}

/// Bytes a row of the load formula takes in Parquet, measured on a sample, to size a
/// LOAD file.
pub fn load_bytes_per_row(dir: &Path) -> anyhow::Result<f64> {
    const SAMPLE: u64 = 500_000;
    let path = dir.join("sample.parquet");
    let conn = Connection::open_in_memory()?;
    conn.execute_batch(&format!(
        "COPY ({}) TO {} (FORMAT PARQUET)",
        load_rows_sql(SAMPLE),
        literal(&path.to_string_lossy())
    ))?;
    let bytes = std::fs::metadata(&path)?.len();
    std::fs::remove_file(&path)?;
    Ok(bytes as f64 / SAMPLE as f64)
}

/// The source of one table, as far as generating changes needs it.
struct Model {
    live: Vec<i64>,
    next_id: i64,
    state: TableState,
}

impl Model {
    fn new(load_rows: u64) -> Self {
        Self {
            live: (0..load_rows as i64).collect(),
            next_id: load_rows as i64,
            state: TableState {
                load_rows,
                touched: HashMap::new(),
            },
        }
    }

    /// One change: `(op, key, row)`, applied to the model.
    fn change(&mut self, rng: &mut fastrand::Rng, spec: &ChangeSpec, row: Row) -> (char, i64) {
        let roll = rng.u32(..100);
        if roll < spec.inserts || self.live.is_empty() {
            let id = self.next_id;
            self.next_id += 1;
            self.live.push(id);
            self.state.touched.insert(id, Some(row));
            return ('I', id);
        }
        let at = rng.usize(..self.live.len());
        let id = self.live[at];
        if roll < spec.inserts + spec.updates {
            self.state.touched.insert(id, Some(row));
            ('U', id)
        } else {
            self.live.swap_remove(at);
            self.state.touched.insert(id, None);
            ('D', id)
        }
    }
}

/// CDC name of a table's `seq`-th change file: one per second from 10:00, then by
/// milliseconds, so names sort in DMS order.
fn cdc_name(seq: usize, salt: usize) -> String {
    format!(
        "20261124-{:02}{:02}{:02}{:03}.parquet",
        10 + seq / 3600,
        (seq / 60) % 60,
        seq % 60,
        salt % 1000
    )
}

/// Change files over `spec.tables` tables named `{prefix}NN`, on top of `load_rows` loaded
/// rows per table (0: none). Returns the files and the models' states.
pub fn changes(
    spec: &ChangeSpec,
    prefix: &str,
    load_rows: u64,
    dir: &Path,
    seed: u64,
) -> anyhow::Result<Workload> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let conn = Connection::open_in_memory()?;
    conn.execute_batch(
        "CREATE TABLE staged (file_no INTEGER, op VARCHAR, id BIGINT, name VARCHAR,
                              note VARCHAR, cents BIGINT, qty BIGINT, updated_us BIGINT)",
    )?;
    let mut models: Vec<Model> = (0..spec.tables).map(|_| Model::new(load_rows)).collect();
    let per_table = spec.files.div_ceil(spec.tables).max(1);
    let mut files = Vec::with_capacity(spec.files);
    {
        let mut app = conn.appender("staged")?;
        for i in 0..spec.files {
            let (t, seq) = (i % spec.tables, i / spec.tables);
            let wide = spec.widen && seq >= per_table / 2;
            for n in 0..spec.rows {
                let big = if wide && rng.u32(..100) == 0 {
                    3_000_000_000
                } else {
                    0
                };
                let row = Row {
                    name: format!("customer-{}", rng.u32(..977)),
                    note: format!("{:016x}{:016x}", rng.u64(..), rng.u64(..)),
                    amount_cents: rng.i64(0..10_000_000),
                    qty: big + rng.i64(0..50),
                    updated_us: EPOCH_US + 3_600_000_000 + (seq as i64) * 1_000_000 + n as i64,
                };
                let (op, id) = models[t].change(&mut rng, spec, row.clone());
                app.append_row(duckdb::params![
                    i as i32,
                    op.to_string(),
                    id,
                    row.name,
                    row.note,
                    row.amount_cents,
                    row.qty,
                    row.updated_us
                ])?;
            }
            files.push(GenFile {
                table: format!("{prefix}{t:02}"),
                name: cdc_name(seq, i),
                path: dir.join(format!("{prefix}{t:02}-{seq:06}.parquet")),
                rows: spec.rows as u64,
                bytes: 0,
            });
        }
    }
    write_change_files(&conn, &mut files, spec, per_table)?;
    let tables = models
        .into_iter()
        .enumerate()
        .map(|(t, m)| (format!("{prefix}{t:02}"), m.state))
        .collect();
    Ok(Workload { files, tables })
}

/// Writes each file's staged rows to its Parquet file, as DMS would (`Op` first; `qty`
/// widened to BIGINT in the second half when the spec asks for a widening).
fn write_change_files(
    conn: &Connection,
    files: &mut [GenFile],
    spec: &ChangeSpec,
    per_table: usize,
) -> anyhow::Result<()> {
    for (i, f) in files.iter_mut().enumerate() {
        let wide = spec.widen && i / spec.tables >= per_table / 2;
        conn.execute_batch(&format!(
            "COPY (SELECT {op} AS \"Op\", {id} AS id, {name} AS name, {note} AS note,
                          {amount} AS amount, {qty} AS qty, {at} AS updated_at
                   FROM staged WHERE file_no = {i} ORDER BY rowid)
             TO {} (FORMAT PARQUET)",
            literal(&f.path.to_string_lossy()),
            op = optional("op"),
            id = optional("id"),
            name = optional("name"),
            note = optional("note"),
            amount = optional("CAST(cents / 100 AS DECIMAL(12,2))"),
            qty = optional(&format!(
                "CAST(qty AS {})",
                if wide { "BIGINT" } else { "INTEGER" }
            )),
            at = optional("make_timestamp(updated_us)"),
        ))?;
        f.bytes = std::fs::metadata(&f.path)?.len();
    }
    Ok(())
}

/// A full load of `tables` tables of `rows` rows each, one `LOAD00000001.parquet` per
/// table, followed by `spec`'s change files on the same tables.
pub fn full_load(
    tables: usize,
    rows: u64,
    spec: &ChangeSpec,
    prefix: &str,
    dir: &Path,
    seed: u64,
) -> anyhow::Result<Workload> {
    let conn = Connection::open_in_memory()?;
    let mut loads = Vec::new();
    for t in 0..tables {
        let path = dir.join(format!("{prefix}{t:02}-LOAD00000001.parquet"));
        conn.execute_batch(&format!(
            "COPY ({}) TO {} (FORMAT PARQUET)",
            load_rows_sql(rows),
            literal(&path.to_string_lossy())
        ))
        .with_context(|| format!("writing {}", path.display()))?;
        loads.push(GenFile {
            table: format!("{prefix}{t:02}"),
            name: "LOAD00000001.parquet".into(),
            bytes: std::fs::metadata(&path)?.len(),
            path,
            rows,
        });
    }
    let mut workload = if spec.files > 0 {
        changes(spec, prefix, rows, dir, seed)?
    } else {
        Workload {
            files: vec![],
            tables: (0..tables)
                .map(|t| {
                    let state = TableState {
                        load_rows: rows,
                        ..TableState::default()
                    };
                    (format!("{prefix}{t:02}"), state)
                })
                .collect(),
        }
    };
    loads.append(&mut workload.files);
    workload.files = loads;
    Ok(workload)
}
