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

/// The demo stream: 5 tables, full load then 12 CDC minutes.
pub fn demo(dir: &Path, prefix: &str, seed: u64) -> anyhow::Result<Simulation> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut w = Writer {
        dir: dir.to_path_buf(),
        prefix: prefix.to_string(),
        files: Vec::new(),
    };
    let mut customers = SimTable::new(
        "customers",
        vec!["id"],
        &[
            ("id", "BIGINT"),
            ("name", "VARCHAR"),
            ("email", "VARCHAR"),
            ("created_at", "TIMESTAMPTZ"),
        ],
    );
    let mut orders = SimTable::new(
        "orders",
        vec!["id"],
        &[
            ("id", "BIGINT"),
            ("customer_id", "BIGINT"),
            ("status", "VARCHAR"),
            ("amount", "DECIMAL(12,2)"),
            ("updated_at", "TIMESTAMPTZ"),
        ],
    );
    let mut items = SimTable::new(
        "order_items",
        vec!["order_id", "line_no"],
        &[
            ("order_id", "BIGINT"),
            ("line_no", "INTEGER"),
            ("sku", "VARCHAR"),
            ("qty", "INTEGER"),
        ],
    );
    let mut events = SimTable::new(
        "events",
        vec![],
        &[
            ("kind", "VARCHAR"),
            ("payload", "VARCHAR"),
            ("at", "TIMESTAMPTZ"),
        ],
    );
    let mut refunds = SimTable::new(
        "refunds",
        vec!["id"],
        &[
            ("id", "BIGINT"),
            ("order_id", "BIGINT"),
            ("amount", "DECIMAL(12,2)"),
        ],
    );
    let statuses = ["new", "paid", "shipped", "delivered"];
    let ts = |minute: u32| format!("2026-11-24 10:{minute:02}:00+00");

    // Full load.
    let customer_row = |id: i64, rng: &mut fastrand::Rng| {
        vec![
            Value::BigInt(id),
            text(format!("Customer {id}")),
            text(format!("c{id}.{}@example.com", rng.u16(..))),
            text(ts(0)),
        ]
    };
    let order_row = |id: i64, status: &str, rng: &mut fastrand::Rng, minute: u32| {
        vec![
            Value::BigInt(id),
            Value::BigInt(rng.i64(1..=40)),
            text(status),
            text(format!("{}.{:02}", rng.u32(5..500), rng.u32(0..100))),
            text(ts(minute)),
        ]
    };
    let load: Vec<(String, Vec<Value>)> = (1..=40)
        .map(|id| ("I".to_string(), customer_row(id, &mut rng)))
        .collect();
    for (op, r) in &load {
        customers.apply(op, r);
    }
    w.write(&customers, "", "LOAD00000001.parquet", false, &load)?;
    for part in 0..2 {
        let rows: Vec<(String, Vec<Value>)> = (1..=60)
            .map(|i| {
                (
                    "I".to_string(),
                    order_row(part * 60 + i, statuses[0], &mut rng, 0),
                )
            })
            .collect();
        for (op, r) in &rows {
            orders.apply(op, r);
        }
        w.write(
            &orders,
            "",
            &format!("LOAD{:08X}.parquet", part + 1),
            false,
            &rows,
        )?;
    }
    orders.next_id = 121;
    let rows: Vec<(String, Vec<Value>)> = (1..=30)
        .flat_map(|o| (1..=2).map(move |l| (o, l)))
        .map(|(o, l)| {
            (
                "I".to_string(),
                vec![
                    Value::BigInt(o),
                    Value::Int(l),
                    text(format!("SKU-{}", o * 10 + l as i64)),
                    Value::Int(1),
                ],
            )
        })
        .collect();
    for (op, r) in &rows {
        items.apply(op, r);
    }
    w.write(&items, "", "LOAD00000001.parquet", false, &rows)?;
    let rows: Vec<(String, Vec<Value>)> = (0..20)
        .map(|i| {
            (
                "I".to_string(),
                vec![text("signup"), text(format!("{{\"n\":{i}}}")), text(ts(0))],
            )
        })
        .collect();
    for (op, r) in &rows {
        events.apply(op, r);
    }
    w.write(&events, "", "LOAD00000001.parquet", false, &rows)?;

    // CDC, one minute per tick.
    let mut discount = false;
    for minute in 1..=12u32 {
        let name = format!("20261124-10{minute:02}00{:03}.parquet", rng.u32(0..1000));
        if minute == 5 {
            // The source adds a column: later order files carry it.
            discount = true;
            orders
                .columns
                .push(("discount".into(), "DECIMAL(5,2)".into()));
            for row in orders.rows.values_mut() {
                row.push(Value::Null);
            }
        }
        let with_discount = |mut row: Vec<Value>, rng: &mut fastrand::Rng| {
            if discount {
                row.push(text(format!("{}.{:02}", rng.u32(0..20), rng.u32(0..100))));
            }
            row
        };
        let mut changes: Vec<(String, Vec<Value>)> = Vec::new();
        for _ in 0..rng.usize(5..15) {
            let existing: Vec<Vec<Value>> = orders.rows.values().cloned().collect();
            match rng.u8(0..10) {
                0..=3 => {
                    let id = orders.next_id;
                    orders.next_id += 1;
                    changes.push((
                        "I".into(),
                        with_discount(order_row(id, "new", &mut rng, minute), &mut rng),
                    ));
                }
                4..=8 if !existing.is_empty() => {
                    let mut row = existing[rng.usize(..existing.len())].clone();
                    row.truncate(5);
                    row[2] = text(statuses[rng.usize(..statuses.len())]);
                    row[4] = text(ts(minute));
                    changes.push(("U".into(), with_discount(row, &mut rng)));
                }
                _ if !existing.is_empty() => {
                    let mut row = existing[rng.usize(..existing.len())].clone();
                    row.truncate(5);
                    changes.push(("D".into(), with_discount(row, &mut rng)));
                }
                _ => {}
            }
            // Keep the model in step so later picks see current rows.
            let (op, row) = changes.last().cloned().unwrap_or_default();
            if !op.is_empty() {
                orders.apply(&op, &row);
            }
        }
        if minute == 3 {
            // Several changes to one key inside one file, ending in a delete.
            let id = orders.next_id;
            orders.next_id += 1;
            for (op, status) in [
                ("I", "new"),
                ("U", "paid"),
                ("U", "shipped"),
                ("D", "shipped"),
            ] {
                let row = order_row(id, status, &mut rng, minute);
                orders.apply(op, &row);
                changes.push((op.into(), row));
            }
        }
        w.write(&orders, "2026/11/24", &name, true, &changes)?;

        if minute % 2 == 0 {
            let mut changes = Vec::new();
            let id = customers.next_id.max(41);
            customers.next_id = id + 1;
            changes.push(("I".to_string(), customer_row(id, &mut rng)));
            let target = rng.i64(1..=40);
            if let Some(row) = customers
                .rows
                .get(&vec![format!("{:?}", Value::BigInt(target))])
                .cloned()
            {
                let mut row = row;
                row[2] = text(format!("updated{minute}@example.com"));
                changes.push(("U".to_string(), row));
            }
            for (op, r) in &changes {
                customers.apply(op, r);
            }
            w.write(&customers, "", &name, true, &changes)?;
        }
        if minute % 3 == 0 {
            let order = rng.i64(1..=30);
            let mut changes = vec![(
                "U".to_string(),
                vec![
                    Value::BigInt(order),
                    Value::Int(1),
                    text("SKU-CHANGED"),
                    Value::Int(3),
                ],
            )];
            changes.push((
                "I".to_string(),
                vec![
                    Value::BigInt(order),
                    Value::Int(3 + minute as i32),
                    text("SKU-NEW"),
                    Value::Int(1),
                ],
            ));
            changes.push((
                "D".to_string(),
                vec![
                    Value::BigInt(order),
                    Value::Int(2),
                    Value::Null,
                    Value::Null,
                ],
            ));
            for (op, r) in &changes {
                items.apply(op, r);
            }
            w.write(&items, "", &name, true, &changes)?;
        }
        let changes: Vec<(String, Vec<Value>)> = (0..rng.usize(1..5))
            .map(|i| {
                (
                    "I".to_string(),
                    vec![
                        text("click"),
                        text(format!("{{\"m\":{minute},\"i\":{i}}}")),
                        text(ts(minute)),
                    ],
                )
            })
            .collect();
        for (op, r) in &changes {
            events.apply(op, r);
        }
        w.write(&events, "", &name, true, &changes)?;
        if minute >= 6 && minute % 2 == 0 {
            let id = refunds.next_id;
            refunds.next_id += 1;
            let changes = vec![(
                "I".to_string(),
                vec![
                    Value::BigInt(id),
                    Value::BigInt(rng.i64(1..=120)),
                    text("9.99"),
                ],
            )];
            for (op, r) in &changes {
                refunds.apply(op, r);
            }
            w.write(&refunds, "", &name, true, &changes)?;
        }
    }
    let mut expected = BTreeMap::new();
    for t in [&customers, &orders, &items, &events, &refunds] {
        expected.insert(t.name.to_string(), t.expected());
    }
    Ok(Simulation {
        files: w.files,
        expected_rows: expected,
        table_keys: serde_json::json!({
            "customers": "id",
            "orders": "id",
            "order_items": ["order_id", "line_no"],
            "events": null,
            "refunds": "id"
        }),
    })
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
