//! Realistic DMS output for demos and benchmarks: full-load files, then CDC files with
//! inserts, updates and deletes, a column added mid-stream, a table with a composite key,
//! one without a key, and one that first appears in CDC. Files are written as DMS writes
//! them (Parquet, `Op` first, LOAD counters, timestamped CDC names, date folders).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use duckdb::types::Value;

use cdc_worker::devkit::parquet::write_parquet;
use cdc_worker::storage::{ObjectStore, WriteCondition};

/// One file of the simulation, in upload order.
#[derive(Debug, Clone)]
pub struct SimFile {
    pub key: String,
    pub path: PathBuf,
}

/// A generated stream and the state the targets must end in.
#[derive(Debug, Default)]
pub struct Simulation {
    pub files: Vec<SimFile>,
    /// Target table -> expected row count.
    pub expected_rows: BTreeMap<String, usize>,
    /// The `table_keys.json` document for these tables.
    pub table_keys: serde_json::Value,
}

struct SimTable {
    schema: &'static str,
    name: &'static str,
    key: Vec<&'static str>,
    columns: Vec<(String, String)>,
    rows: BTreeMap<Vec<String>, Vec<Value>>,
    appended: usize,
    next_id: i64,
}

impl SimTable {
    fn new(name: &'static str, key: Vec<&'static str>, columns: &[(&str, &str)]) -> Self {
        Self {
            schema: "public",
            name,
            key,
            columns: columns
                .iter()
                .map(|(n, t)| (n.to_string(), t.to_string()))
                .collect(),
            rows: BTreeMap::new(),
            appended: 0,
            next_id: 1,
        }
    }

    fn key_of(&self, row: &[Value]) -> Vec<String> {
        self.key
            .iter()
            .map(|k| {
                let i = self
                    .columns
                    .iter()
                    .position(|(n, _)| n == k)
                    .expect("key column");
                format!("{:?}", row[i])
            })
            .collect()
    }

    /// Applies a change to the model the way the target must end up.
    fn apply(&mut self, op: &str, row: &[Value]) {
        if self.key.is_empty() {
            if op != "D" {
                self.appended += 1;
            }
            return;
        }
        let key = self.key_of(row);
        if op == "D" {
            self.rows.remove(&key);
        } else {
            self.rows.insert(key, row.to_vec());
        }
    }

    fn expected(&self) -> usize {
        if self.key.is_empty() {
            self.appended
        } else {
            self.rows.len()
        }
    }
}

struct Writer {
    dir: PathBuf,
    prefix: String,
    files: Vec<SimFile>,
}

impl Writer {
    fn write(
        &mut self,
        table: &SimTable,
        folder: &str,
        name: &str,
        with_op: bool,
        rows: &[(String, Vec<Value>)],
    ) -> anyhow::Result<()> {
        let mut columns = Vec::new();
        if with_op {
            columns.push(("Op".to_string(), "VARCHAR".to_string()));
        }
        columns.extend(table.columns.iter().cloned());
        let data: Vec<Vec<Value>> = rows
            .iter()
            .map(|(op, r)| {
                let mut row = Vec::new();
                if with_op {
                    row.push(Value::Text(op.clone()));
                }
                row.extend(r.iter().cloned());
                row
            })
            .collect();
        let prefix = if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.prefix.trim_end_matches('/'))
        };
        let folder = if folder.is_empty() {
            String::new()
        } else {
            format!("{folder}/")
        };
        let key = format!("{prefix}{}/{}/{folder}{name}", table.schema, table.name);
        let path = self.dir.join(format!("{:05}.parquet", self.files.len()));
        write_parquet(&path, &columns, &data).with_context(|| format!("writing {key}"))?;
        self.files.push(SimFile { key, path });
        Ok(())
    }
}

fn text(s: impl Into<String>) -> Value {
    Value::Text(s.into())
}

/// A file's changes: (`Op`, row) in order.
type Changes = Vec<(String, Vec<Value>)>;

const STATUSES: [&str; 4] = ["new", "paid", "shipped", "delivered"];

fn ts(minute: u32) -> String {
    format!("2026-11-24 10:{minute:02}:00+00")
}

fn customer_row(id: i64, rng: &mut fastrand::Rng) -> Vec<Value> {
    vec![
        Value::BigInt(id),
        text(format!("Customer {id}")),
        text(format!("c{id}.{}@example.com", rng.u16(..))),
        text(ts(0)),
    ]
}

fn order_row(id: i64, status: &str, rng: &mut fastrand::Rng, minute: u32) -> Vec<Value> {
    vec![
        Value::BigInt(id),
        Value::BigInt(rng.i64(1..=40)),
        text(status),
        text(format!("{}.{:02}", rng.u32(5..500), rng.u32(0..100))),
        text(ts(minute)),
    ]
}

fn inserts(rows: impl Iterator<Item = Vec<Value>>) -> Changes {
    rows.map(|r| ("I".to_string(), r)).collect()
}

impl SimTable {
    fn record(&mut self, changes: &Changes) {
        for (op, row) in changes {
            self.apply(op, row);
        }
    }
}

/// The demo's source database and the files written so far.
struct Demo {
    rng: fastrand::Rng,
    w: Writer,
    customers: SimTable,
    orders: SimTable,
    items: SimTable,
    events: SimTable,
    refunds: SimTable,
    /// Whether `orders` has gained its `discount` column yet.
    discount: bool,
}

/// The demo stream: 5 tables, full load then 12 CDC minutes.
pub fn demo(dir: &Path, prefix: &str, seed: u64) -> anyhow::Result<Simulation> {
    let mut d = Demo::new(dir, prefix, seed);
    d.full_load()?;
    for minute in 1..=12u32 {
        d.cdc_minute(minute)?;
    }
    Ok(d.finish())
}

impl Demo {
    fn new(dir: &Path, prefix: &str, seed: u64) -> Self {
        Demo {
            rng: fastrand::Rng::with_seed(seed),
            w: Writer {
                dir: dir.to_path_buf(),
                prefix: prefix.to_string(),
                files: Vec::new(),
            },
            customers: SimTable::new(
                "customers",
                vec!["id"],
                &[
                    ("id", "BIGINT"),
                    ("name", "VARCHAR"),
                    ("email", "VARCHAR"),
                    ("created_at", "TIMESTAMPTZ"),
                ],
            ),
            orders: SimTable::new(
                "orders",
                vec!["id"],
                &[
                    ("id", "BIGINT"),
                    ("customer_id", "BIGINT"),
                    ("status", "VARCHAR"),
                    ("amount", "DECIMAL(12,2)"),
                    ("updated_at", "TIMESTAMPTZ"),
                ],
            ),
            items: SimTable::new(
                "order_items",
                vec!["order_id", "line_no"],
                &[
                    ("order_id", "BIGINT"),
                    ("line_no", "INTEGER"),
                    ("sku", "VARCHAR"),
                    ("qty", "INTEGER"),
                ],
            ),
            events: SimTable::new(
                "events",
                vec![],
                &[
                    ("kind", "VARCHAR"),
                    ("payload", "VARCHAR"),
                    ("at", "TIMESTAMPTZ"),
                ],
            ),
            refunds: SimTable::new(
                "refunds",
                vec!["id"],
                &[
                    ("id", "BIGINT"),
                    ("order_id", "BIGINT"),
                    ("amount", "DECIMAL(12,2)"),
                ],
            ),
            discount: false,
        }
    }

    /// LOAD files for four tables (orders in two, the hex counter as DMS writes it);
    /// `refunds` first appears in CDC.
    fn full_load(&mut self) -> anyhow::Result<()> {
        let rng = &mut self.rng;
        let load = inserts((1..=40).map(|id| customer_row(id, rng)));
        self.customers.record(&load);
        self.w
            .write(&self.customers, "", "LOAD00000001.parquet", false, &load)?;
        for part in 0..2 {
            let rng = &mut self.rng;
            let rows = inserts((1..=60).map(|i| order_row(part * 60 + i, STATUSES[0], rng, 0)));
            self.orders.record(&rows);
            let name = format!("LOAD{:08X}.parquet", part + 1);
            self.w.write(&self.orders, "", &name, false, &rows)?;
        }
        self.orders.next_id = 121;
        let rows = inserts(
            (1..=30)
                .flat_map(|o| (1..=2).map(move |l| (o, l)))
                .map(|(o, l)| {
                    vec![
                        Value::BigInt(o),
                        Value::Int(l),
                        text(format!("SKU-{}", o * 10 + l as i64)),
                        Value::Int(1),
                    ]
                }),
        );
        self.items.record(&rows);
        self.w
            .write(&self.items, "", "LOAD00000001.parquet", false, &rows)?;
        let rows = inserts(
            (0..20).map(|i| vec![text("signup"), text(format!("{{\"n\":{i}}}")), text(ts(0))]),
        );
        self.events.record(&rows);
        self.w
            .write(&self.events, "", "LOAD00000001.parquet", false, &rows)?;
        Ok(())
    }

    /// One minute of CDC: a file per table that changed, all with the minute's DMS name.
    fn cdc_minute(&mut self, minute: u32) -> anyhow::Result<()> {
        let name = format!(
            "20261124-10{minute:02}00{:03}.parquet",
            self.rng.u32(0..1000)
        );
        if minute == 5 {
            // The source adds a column: later order files carry it.
            self.discount = true;
            self.orders
                .columns
                .push(("discount".into(), "DECIMAL(5,2)".into()));
            for row in self.orders.rows.values_mut() {
                row.push(Value::Null);
            }
        }
        let changes = self.order_changes(minute);
        self.w
            .write(&self.orders, "2026/11/24", &name, true, &changes)?;
        if minute.is_multiple_of(2) {
            let changes = self.customer_changes(minute);
            self.w.write(&self.customers, "", &name, true, &changes)?;
        }
        if minute.is_multiple_of(3) {
            let changes = self.item_changes(minute);
            self.w.write(&self.items, "", &name, true, &changes)?;
        }
        let rng = &mut self.rng;
        let changes = inserts((0..rng.usize(1..5)).map(|i| {
            vec![
                text("click"),
                text(format!("{{\"m\":{minute},\"i\":{i}}}")),
                text(ts(minute)),
            ]
        }));
        self.events.record(&changes);
        self.w.write(&self.events, "", &name, true, &changes)?;
        if minute >= 6 && minute.is_multiple_of(2) {
            let id = self.refunds.next_id;
            self.refunds.next_id += 1;
            let order = self.rng.i64(1..=120);
            let changes = inserts(std::iter::once(vec![
                Value::BigInt(id),
                Value::BigInt(order),
                text("9.99"),
            ]));
            self.refunds.record(&changes);
            self.w.write(&self.refunds, "", &name, true, &changes)?;
        }
        Ok(())
    }

    fn with_discount(&mut self, mut row: Vec<Value>) -> Vec<Value> {
        if self.discount {
            let rng = &mut self.rng;
            row.push(text(format!("{}.{:02}", rng.u32(0..20), rng.u32(0..100))));
        }
        row
    }

    /// Random inserts, updates and deletes of orders; at minute 3 also several changes to
    /// one key inside one file, ending in a delete.
    fn order_changes(&mut self, minute: u32) -> Changes {
        let mut changes: Changes = Vec::new();
        for _ in 0..self.rng.usize(5..15) {
            let existing: Vec<Vec<Value>> = self.orders.rows.values().cloned().collect();
            let change = match self.rng.u8(0..10) {
                0..=3 => {
                    let id = self.orders.next_id;
                    self.orders.next_id += 1;
                    let row = order_row(id, "new", &mut self.rng, minute);
                    Some(("I", self.with_discount(row)))
                }
                4..=8 if !existing.is_empty() => {
                    let mut row = existing[self.rng.usize(..existing.len())].clone();
                    row.truncate(5);
                    row[2] = text(STATUSES[self.rng.usize(..STATUSES.len())]);
                    row[4] = text(ts(minute));
                    Some(("U", self.with_discount(row)))
                }
                _ if !existing.is_empty() => {
                    let mut row = existing[self.rng.usize(..existing.len())].clone();
                    row.truncate(5);
                    Some(("D", self.with_discount(row)))
                }
                _ => None,
            };
            // Keep the model in step so later picks see current rows.
            if let Some((op, row)) = change {
                self.orders.apply(op, &row);
                changes.push((op.into(), row));
            }
        }
        if minute == 3 {
            let id = self.orders.next_id;
            self.orders.next_id += 1;
            for (op, status) in [
                ("I", "new"),
                ("U", "paid"),
                ("U", "shipped"),
                ("D", "shipped"),
            ] {
                let row = order_row(id, status, &mut self.rng, minute);
                self.orders.apply(op, &row);
                changes.push((op.into(), row));
            }
        }
        changes
    }

    /// A new customer and an e-mail change of an existing one.
    fn customer_changes(&mut self, minute: u32) -> Changes {
        let mut changes = Vec::new();
        let id = self.customers.next_id.max(41);
        self.customers.next_id = id + 1;
        changes.push(("I".to_string(), customer_row(id, &mut self.rng)));
        let target = self.rng.i64(1..=40);
        let key = vec![format!("{:?}", Value::BigInt(target))];
        if let Some(mut row) = self.customers.rows.get(&key).cloned() {
            row[2] = text(format!("updated{minute}@example.com"));
            changes.push(("U".to_string(), row));
        }
        self.customers.record(&changes);
        changes
    }

    /// An update, an insert and a delete on the composite key (order_id, line_no).
    fn item_changes(&mut self, minute: u32) -> Changes {
        let order = self.rng.i64(1..=30);
        let changes: Changes = vec![
            (
                "U".to_string(),
                vec![
                    Value::BigInt(order),
                    Value::Int(1),
                    text("SKU-CHANGED"),
                    Value::Int(3),
                ],
            ),
            (
                "I".to_string(),
                vec![
                    Value::BigInt(order),
                    Value::Int(3 + minute as i32),
                    text("SKU-NEW"),
                    Value::Int(1),
                ],
            ),
            (
                "D".to_string(),
                vec![
                    Value::BigInt(order),
                    Value::Int(2),
                    Value::Null,
                    Value::Null,
                ],
            ),
        ];
        self.items.record(&changes);
        changes
    }

    fn finish(self) -> Simulation {
        let mut expected = BTreeMap::new();
        for t in [
            &self.customers,
            &self.orders,
            &self.items,
            &self.events,
            &self.refunds,
        ] {
            expected.insert(t.name.to_string(), t.expected());
        }
        Simulation {
            files: self.w.files,
            expected_rows: expected,
            table_keys: serde_json::json!({
                "customers": "id",
                "orders": "id",
                "order_items": ["order_id", "line_no"],
                "events": null,
                "refunds": "id"
            }),
        }
    }
}

/// Uploads the files in order, `pace` apart.
pub async fn upload(
    store: &ObjectStore,
    bucket: &str,
    sim: &Simulation,
    pace: Duration,
) -> anyhow::Result<()> {
    for f in &sim.files {
        let body = tokio::fs::read(&f.path).await?;
        store
            .put(
                bucket,
                &f.key,
                Bytes::from(body),
                "application/octet-stream",
                WriteCondition::Unconditional,
            )
            .await
            .with_context(|| format!("uploading {}", f.key))?;
        if !pace.is_zero() {
            tokio::time::sleep(pace).await;
        }
    }
    Ok(())
}
