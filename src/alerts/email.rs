//! The plain-text body email subscribers get: what happened, to which table, what the
//! worker did, what to do next (with the exact commands) and where the runbook is, in
//! that order, so that the first lines are enough at a glance.
//!
//! Everything that depends on the kind of alert is in [`guide`]: a new kind gets its
//! text there (the match is exhaustive) and a golden file in `src/alerts/golden/`.

use std::fmt::Write;

use super::{Alert, AlertKind};

/// At most this many changes or actions are listed; the JSON body has them all.
const MAX_LISTED: usize = 20;

/// What an email says about one kind of alert.
struct Guide {
    /// The table's state in one line, when it is not held (a held table says so instead).
    state: &'static str,
    /// What the worker did, when the alert lists no actions of its own.
    did: &'static str,
    /// What to do, when the alert carries no `next_steps` of its own.
    todo: &'static str,
    /// Commands to run, `{table}` standing for the alert's table.
    commands: &'static [&'static str],
    /// Documents beside the runbook entry (docs/operations.md#<kind>).
    docs: &'static [&'static str],
}

const HELD_STATE: &str = "HELD: nothing of this table is applied until you act; its files wait in the queue (nothing is lost)";

// Long on purpose: one arm per alert kind, a table of texts kept in one place so that a new
// kind is one more arm (the match is exhaustive).
fn guide(alert: &Alert) -> Guide {
    match alert.alert {
        AlertKind::SchemaChange if alert.held => Guide {
            state: HELD_STATE,
            did: "recorded the new schema version and held the table",
            todo: "Review the change, then release the table: `schema accept` applies it as the evolve preset would (add `--incompatible cast|variant|ignore` for a type change).",
            commands: &[
                "cdc-worker schema show {table}",
                "cdc-worker schema accept {table}",
            ],
            docs: &["docs/schema-evolution.md"],
        },
        AlertKind::SchemaChange => Guide {
            state: "loading goes on with the new schema",
            did: "recorded the new schema version and applied it as the table's policy says",
            todo: "Nothing is required. Check that the table's readers expect the change.",
            commands: &["cdc-worker schema history {table}"],
            docs: &["docs/schema-evolution.md"],
        },
        AlertKind::TableHeld => Guide {
            state: HELD_STATE,
            did: "stopped applying the table; its files wait in the queue",
            todo: "Fix the cause named above, then release the table.",
            commands: &["cdc-worker status", "cdc-worker schema accept {table}"],
            docs: &["docs/schema-evolution.md"],
        },
        AlertKind::FileSkipped => Guide {
            state: "loading goes on without this file",
            did: "skipped the file and acknowledged its notification; it will not be applied",
            todo: "Nothing, if the file does not belong to any table. Otherwise upload it again under a valid DMS name and replay the table.",
            commands: if alert.table.is_empty() {
                &["cdc-worker status"]
            } else {
                &["cdc-worker replay --table {table} --dry-run"]
            },
            docs: &[],
        },
        AlertKind::FileRejected => Guide {
            state: "loading goes on without this file",
            did: "recorded the file as rejected in the ledger; its notification goes to the dead-letter queue after the queue's maximum receives",
            todo: "Check the object in S3 (complete? really Parquet?). Replace it, then redrive the dead-letter queue or replay the table.",
            commands: &["cdc-worker replay --table {table}"],
            docs: &["docs/deployment.md#dead-letter-queue"],
        },
        AlertKind::FileOutOfOrder => Guide {
            state: "loading goes on; this file is not applied",
            did: "did not apply the file, because later files of the table are applied and no ordering column makes it safe; its notification goes to the dead-letter queue",
            todo: "Set dms.ordering_column so that late files apply safely, then replay the table.",
            commands: &["cdc-worker status", "cdc-worker replay --table {table}"],
            docs: &["docs/deployment.md#dead-letter-queue"],
        },
        AlertKind::TableFailing => Guide {
            state: "BLOCKED: the table's files wait and are retried with backoff (nothing is lost); other tables go on",
            did: "is retrying the failing batch with backoff; later files of the table wait behind it",
            todo: "Find the cause in the error above and fix it. An outage (warehouse, S3, disk): the files wait in the worker, nothing goes to the dead-letter queue, and the table resumes by itself. A file whose data is refused: it goes to the dead-letter queue after its receives and the table waits behind it; fix or replace the file in S3, then redrive the DLQ.",
            commands: &[
                "cdc-worker status",
                "cdc-worker check-connection",
                "cdc-worker replay --table {table}",
            ],
            docs: &["docs/deployment.md#dead-letter-queue"],
        },
        AlertKind::TableRecovered => Guide {
            state: "loading again",
            did: "applied the table's files again after the failures; the files that waited follow in order",
            todo: "Nothing: the files that waited are applied in order.",
            commands: &["cdc-worker status"],
            docs: &[],
        },
        AlertKind::RoutingCollision => Guide {
            state: "the second source table's files are not applied",
            did: "kept the target for the first source table; the files of the second go to the dead-letter queue",
            todo: "Give each source table its own target with routing.table_name (for example \"{schema}_{table}\"), then replay the second source's files.",
            commands: &["cdc-worker check-config", "cdc-worker status"],
            docs: &[],
        },
        AlertKind::KeyChanged if alert.held => Guide {
            state: HELD_STATE,
            did: "recorded the table's new key and held the table: rows already in it repeat a key value",
            todo: "Remove the repeated rows (or drop the table and replay it), then release the table.",
            commands: &[
                "cdc-worker replay --table {table}",
                "cdc-worker schema accept {table}",
            ],
            docs: &["docs/schema-evolution.md"],
        },
        AlertKind::KeyChanged => Guide {
            state: "loading goes on with the new key",
            did: "recorded the table's new key and applies its files with it from here on",
            todo: "Nothing, if the key change is intended. Otherwise set the key back ([tables.NAME] key or table_keys.json).",
            commands: &["cdc-worker schema history {table}"],
            docs: &["docs/schema-evolution.md"],
        },
        AlertKind::LedgerEdited => Guide {
            state: "loading goes on",
            did: "recorded an operator's decision about the file in the table's ledger",
            todo: "Nothing, if the decision was intended. `cdc-worker ledger show` lists the table's ledger.",
            commands: &["cdc-worker ledger show {table}"],
            docs: &["docs/operations.md"],
        },
        AlertKind::RowsSkipped => Guide {
            state: "loading goes on",
            did: "applied the file without the rows whose key has a NULL: a key identifies a row, so such a row changes none",
            todo: "Check the table's key ([tables.NAME] key, table_keys.json): a DMS key is the source's primary key and is never NULL. If the key is right, nothing is lost.",
            commands: &["cdc-worker schema show {table}"],
            docs: &["docs/firebolt.md"],
        },
        AlertKind::OpColumnMissing => Guide {
            state: "loading goes on",
            did: "applied the file's rows as inserts and updates of their keys: without an `Op` column no row is a delete",
            todo: "If the source's deletes matter, turn CdcInsertsOnly off on the DMS endpoint and reload the table; if the column has another name, set dms.op_column.",
            commands: &["cdc-worker check-config"],
            docs: &["docs/deployment.md#7-configure-dms"],
        },
        AlertKind::AmbiguousOrder => Guide {
            state: "loading goes on",
            did: "applied the file; for keys changed more than once in it, the change kept may not be the latest",
            todo: "Enable a DMS TimestampColumnName or an AR_H_CHANGE_SEQ column and set dms.ordering_column.",
            commands: &["cdc-worker check-config"],
            docs: &["docs/firebolt.md"],
        },
        AlertKind::NotificationIgnored => Guide {
            state: "these files are not applied; the tables of source.bucket under source.prefix go on",
            did: "acknowledged and ignored the notifications of this cause (this alert comes once per bucket or folder); cdc_worker_notifications_ignored_total counts them",
            todo: "If DMS writes there, correct source.bucket or source.prefix and restart; otherwise narrow the bucket notification so they no longer reach the queue.",
            commands: &["cdc-worker check-config", "cdc-worker check-connection"],
            docs: &["docs/deployment.md"],
        },
        AlertKind::FreshnessObjectiveMissed => Guide {
            state: "loading goes on, but the table lags behind its source",
            did: "keeps applying whatever arrives; this alert comes once per breach, and `freshness_recovered` when the table catches up",
            todo: "Find out why no newer change applies: is the table held, failing, or waiting behind a file (`cdc-worker status`)? Does DMS still write files (its task, the bucket)? A source table without changes has no new files: give it a longer tables.NAME.freshness_objective, or \"0s\" for none.",
            commands: &[
                "cdc-worker status",
                "cdc-worker replay --table {table} --dry-run",
            ],
            docs: &[],
        },
        AlertKind::FreshnessRecovered => Guide {
            state: "within its freshness objective again",
            did: "applied a change recent enough to meet the table's freshness objective",
            todo: "Nothing.",
            commands: &["cdc-worker status"],
            docs: &[],
        },
        AlertKind::TableReloaded => Guide {
            state: "loading goes on in the table's new generation",
            did: "built the reload's new generation beside the table from its new full load and the changes after it, then replaced the table by it in one transaction; readers never saw a half-loaded table",
            todo: "Nothing, if the reload was intended. The row counts above say how much the table changed.",
            commands: &["cdc-worker status", "cdc-worker ledger show {table}"],
            docs: &["docs/reloads.md"],
        },
        AlertKind::ReloadWaiting => Guide {
            state: "the table keeps its earlier rows; the reload's new generation is built and waits",
            did: "built the new generation beside the table (dms.reload = \"hold\"); the table's later files wait",
            todo: "Compare the new generation with the table, then accept it.",
            commands: &[
                "cdc-worker status",
                "cdc-worker table accept-reload {table}",
            ],
            docs: &["docs/reloads.md"],
        },
        AlertKind::DestructiveChangeHeld => Guide {
            state: HELD_STATE,
            did: "stopped before writing anything: the change would remove more of the table than guard.max_delete_fraction allows",
            todo: "Check at the source whether the deletes (or the smaller reload) are intended; if so, release the table with the command the alert names. To never hold this table, raise guard.max_delete_fraction or set it to 0.",
            commands: &["cdc-worker status"],
            docs: &["docs/reloads.md#the-destructive-change-guard"],
        },
        AlertKind::SetupProblem => Guide {
            state: "the worker runs, but files may not arrive or may never reach a dead-letter queue",
            did: "started anyway: only a queue it cannot use stops it",
            todo: "Fix the setup named above and restart the worker; check-connection runs the same checks.",
            commands: &["cdc-worker check-connection"],
            docs: &["docs/deployment.md"],
        },
    }
}

/// The email body of an alert.
pub fn email_text(alert: &Alert) -> String {
    let guide = guide(alert);
    let mut out = String::new();
    // `write!` into a String cannot fail.
    let _ = writeln!(out, "{}\n", headline(alert));

    let table = match (&alert.table, &alert.source) {
        (t, _) if t.is_empty() => "(none: the file names no table)".to_string(),
        (t, Some(source)) => format!("{t} (source {source})"),
        (t, None) => t.clone(),
    };
    let _ = writeln!(out, "Table:  {table}");
    if let Some(file) = &alert.file {
        let _ = writeln!(out, "File:   {file}");
    }
    let state = if alert.held { HELD_STATE } else { guide.state };
    let _ = writeln!(out, "State:  {state}");

    if !alert.changes.is_empty() {
        let changes: Vec<String> = alert.changes.iter().map(|c| c.describe()).collect();
        list(&mut out, "Changes", &changes);
    }
    let actions: Vec<String> = alert
        .actions
        .iter()
        .filter_map(|a| a["description"].as_str().map(str::to_string))
        .collect();
    if actions.is_empty() {
        list(&mut out, "What the worker did", &[guide.did.to_string()]);
    } else {
        list(&mut out, "What the worker did", &actions);
    }

    let _ = writeln!(out, "\nWhat to do\n  {}", next_steps(alert, &guide));
    if !guide.commands.is_empty() {
        out.push('\n');
        for command in guide.commands {
            let _ = writeln!(out, "    {}", command.replace("{table}", &alert.table));
        }
    }

    let _ = writeln!(
        out,
        "\nRunbook: docs/operations.md#{}",
        alert.alert.as_str()
    );
    let mut more: Vec<&str> = guide.docs.to_vec();
    more.push("docs/alerts.md");
    let _ = writeln!(out, "More:    {}", more.join(", "));

    let _ = writeln!(out, "\n--\n{}", footer(alert));
    out
}

/// The first line: what happened.
fn headline(alert: &Alert) -> String {
    if alert.alert != AlertKind::SchemaChange {
        // File alerts open with the file's URI, which has a line of its own below.
        let what = alert
            .file
            .as_deref()
            .and_then(|f| alert.message.strip_prefix(f))
            .and_then(|rest| rest.strip_prefix(": "))
            .unwrap_or(&alert.message);
        return if alert.table.is_empty() {
            format!(
                "{}: {what}",
                capitalized(&alert.alert.as_str().replace('_', " "))
            )
        } else if what.starts_with(alert.table.as_str()) {
            what.to_string()
        } else {
            format!("{}: {what}", alert.table)
        };
    }
    let kinds: Vec<String> = alert
        .change_kinds()
        .iter()
        .map(|k| k.as_str().replace('_', " "))
        .collect();
    format!(
        "{}: schema v{}{}: {}",
        alert.table,
        alert.schema_version.unwrap_or(0),
        if alert.held { " is HELD" } else { "" },
        kinds.join(", ")
    )
}

fn capitalized(text: &str) -> String {
    let mut chars = text.chars();
    chars
        .next()
        .map(|c| c.to_uppercase().chain(chars).collect())
        .unwrap_or_default()
}

/// The alert's own advice when it has some (it knows the case), else the kind's.
fn next_steps(alert: &Alert, guide: &Guide) -> String {
    alert
        .next_steps
        .clone()
        .unwrap_or_else(|| guide.todo.to_string())
}

fn list(out: &mut String, title: &str, items: &[String]) {
    let _ = writeln!(out, "\n{title}");
    for item in items.iter().take(MAX_LISTED) {
        let _ = writeln!(out, "  - {item}");
    }
    if items.len() > MAX_LISTED {
        let _ = writeln!(
            out,
            "  ... and {} more (the JSON body lists them all)",
            items.len() - MAX_LISTED
        );
    }
}

fn footer(alert: &Alert) -> String {
    let mut facts = vec![
        format!("alert {}", alert.alert.as_str()),
        format!("severity {}", alert.severity.as_str()),
    ];
    if let Some(v) = alert.schema_version {
        facts.push(format!("schema v{v}"));
    }
    if let Some(policy) = &alert.policy
        && let Ok(serde_json::Value::String(preset)) = serde_json::to_value(policy.preset)
    {
        facts.push(format!("policy {preset}"));
    }
    format!(
        "{}\nDetected {} by worker {}.\nRun the commands where the worker's configuration is (--config FILE or CDC_WORKER_CONFIG).",
        facts.join(", "),
        alert.detected_at,
        alert.worker
    )
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;
    use crate::alerts::Severity;
    use crate::schema::diff::{SchemaChange, TypeChange};
    use crate::schema::policy::PolicyPreset;
    use crate::schema::types::ColumnType;

    const FILE: &str = "s3://dms-bucket/dms/public/orders/2026/11/24/20261124-100400000.parquet";

    fn alert(kind: AlertKind, severity: Severity, table: &str, message: &str) -> Alert {
        let mut a = Alert::new(kind, severity, table, message);
        a.detected_at = "2026-11-24T10:04:02.118Z".into();
        a.worker = "ip-10-0-1-23/1".into();
        a
    }

    fn action(action: &str, description: &str) -> serde_json::Value {
        serde_json::json!({"action": action, "description": description})
    }

    /// A typical alert of each kind, as the worker raises it (same messages and advice).
    /// Long on purpose: one arm per alert kind, the golden files' inputs in one place.
    fn fixture(kind: AlertKind) -> Alert {
        match kind {
            AlertKind::SchemaChange => {
                let mut a = alert(
                    kind,
                    Severity::Warning,
                    "orders",
                    "orders: new column coupon string",
                );
                a.source = Some("public.orders".into());
                a.schema_version = Some(2);
                a.changes = vec![SchemaChange::NewColumn {
                    column: "coupon".into(),
                    ty: ColumnType::String,
                }];
                a.actions = vec![action("added_column", "added column coupon string")];
                a.policy = Some(PolicyPreset::Evolve.policy());
                a.file = Some(FILE.into());
                a
            }
            AlertKind::TableHeld => {
                let mut a = alert(
                    kind,
                    Severity::Error,
                    "orders",
                    "columns `Amount` and `amount` of the source are one column once case is folded",
                );
                a.held = true;
                a.file = Some(FILE.into());
                a.next_steps = Some("Files of `orders` wait in the queue (nothing is lost). Fix the cause, then restart the worker or run `cdc-worker schema accept orders`.".into());
                a
            }
            AlertKind::FileSkipped => {
                let mut a = alert(
                    kind,
                    Severity::Warning,
                    "orders",
                    &format!("{FILE}: the object is gone (deleted before it was applied)"),
                );
                a.source = Some("public.orders".into());
                a.file = Some(FILE.into());
                a
            }
            AlertKind::FileRejected => {
                let mut a = alert(
                    kind,
                    Severity::Error,
                    "orders",
                    &format!(
                        "{FILE}: cannot be read as Parquet: file too small to be Parquet (12 bytes)"
                    ),
                );
                a.source = Some("public.orders".into());
                a.file = Some(FILE.into());
                a.next_steps = Some("The file is left in the queue and reaches the dead-letter queue after its maximum receives. Replace it in S3 and redrive the DLQ (or run `cdc-worker replay`); the table goes on meanwhile.".into());
                a
            }
            AlertKind::FileOutOfOrder => {
                let mut a = alert(
                    kind,
                    Severity::Error,
                    "orders",
                    &format!(
                        "{FILE}: arrived after later files of `orders` were applied; applying it now would overwrite newer changes"
                    ),
                );
                a.source = Some("public.orders".into());
                a.file = Some(FILE.into());
                a.next_steps = Some("Configure dms.ordering_column (DMS TimestampColumnName or AR_H_CHANGE_SEQ) so late files can be applied safely, or rebuild the table with `cdc-worker replay`. The message goes to the dead-letter queue.".into());
                a
            }
            AlertKind::TableFailing => {
                let mut a = alert(
                    kind,
                    Severity::Error,
                    "orders",
                    "3 consecutive batches failed; last error: warehouse unavailable: connection refused",
                );
                a.file = Some(FILE.into());
                a.next_steps = Some("The table's files wait in the worker (visibility kept alive, nothing goes to the dead-letter queue) and are retried with backoff until the cause passes. Check the warehouse, S3 and the worker's disk; `cdc-worker status` shows the table.".into());
                a
            }
            AlertKind::TableRecovered => alert(
                kind,
                Severity::Info,
                "orders",
                "orders applies again after 4 failed batches",
            ),
            AlertKind::RoutingCollision => {
                let mut a = alert(
                    kind,
                    Severity::Error,
                    "orders",
                    "source tables public.orders and sales.orders both map to target table `orders`",
                );
                a.source = Some("sales.orders".into());
                a.next_steps = Some("Change routing.table_name (for example to \"{schema}_{table}\") so each source table has its own target. The files of the second source go to the dead-letter queue.".into());
                a
            }
            AlertKind::KeyChanged => {
                let mut a = alert(
                    kind,
                    Severity::Warning,
                    "events",
                    "`events` now has a key (id): its rows are merged by key from here on; the rows loaded before are kept, and no key value repeats among them",
                );
                a.source = Some("public.events".into());
                a.file = Some(FILE.into());
                a.next_steps = Some("Nothing is required. Deletes apply from here on; rows deleted at the source before the key was set are still in the table (replay the table to remove them).".into());
                a
            }
            AlertKind::LedgerEdited => {
                let mut a = alert(
                    kind,
                    Severity::Warning,
                    "orders",
                    &format!(
                        "{FILE}: skipped by an operator (its data is corrupt at the source); it will never be applied"
                    ),
                );
                a.file = Some(FILE.into());
                a.next_steps = Some("Running workers stop waiting for it within a minute and apply `orders`'s later files. If its notification is in the dead-letter queue, redrive it (it is acknowledged) or purge it.".into());
                a
            }
            AlertKind::RowsSkipped => {
                let mut a = alert(
                    kind,
                    Severity::Warning,
                    "orders",
                    &format!(
                        "{FILE}: 2 rows with a NULL in the key column(s) were skipped (a key identifies a row; a NULL key changes none)"
                    ),
                );
                a.source = Some("public.orders".into());
                a.file = Some(FILE.into());
                a.next_steps = Some("Check the table's key ([tables.NAME] key, table_keys.json): a DMS key is the source's primary key and is never NULL. If the source key is right, the rows were not changes of any row.".into());
                a
            }
            AlertKind::OpColumnMissing => {
                let mut a = alert(
                    kind,
                    Severity::Warning,
                    "orders",
                    &format!(
                        "{FILE}: a CDC file without an `Op` column (by that name, or in another case as the first column): its rows were applied as inserts and updates; deletes of the source cannot be seen"
                    ),
                );
                a.source = Some("public.orders".into());
                a.file = Some(FILE.into());
                a.next_steps = Some("DMS leaves `Op` out only with CdcInsertsOnly: if the table's deletes matter, turn it off on the endpoint and reload the table; if the column has another name, set dms.op_column (now `Op`).".into());
                a
            }
            AlertKind::AmbiguousOrder => {
                let mut a = alert(
                    kind,
                    Severity::Warning,
                    "orders",
                    &format!(
                        "{FILE}: 2 keys changed more than once inside one file and no ordering column decides which change is last; the result for those keys may not be the latest change"
                    ),
                );
                a.source = Some("public.orders".into());
                a.file = Some(FILE.into());
                a.next_steps = Some("Enable a DMS TimestampColumnName or an AR_H_CHANGE_SEQ column and set dms.ordering_column.".into());
                a
            }
            AlertKind::NotificationIgnored => {
                let mut a = alert(
                    kind,
                    Severity::Warning,
                    "",
                    "notifications for bucket `dms-bucket-old` are ignored: source.bucket is `dms-bucket` (reported once per bucket)",
                );
                a.file =
                    Some("s3://dms-bucket-old/dms/public/orders/20261124-100400000.parquet".into());
                a.next_steps = Some("If DMS writes to `dms-bucket-old`, set source.bucket = \"dms-bucket-old\" and restart; otherwise remove this queue from that bucket's event notifications.".into());
                a
            }
            AlertKind::FreshnessObjectiveMissed => alert(
                kind,
                Severity::Warning,
                "orders",
                "orders is 2h 0m behind its source: its newest applied change is from 2026-11-24T08:04:00.000Z (objective 30m)",
            ),
            AlertKind::FreshnessRecovered => alert(
                kind,
                Severity::Info,
                "orders",
                "orders is within its freshness objective again: 12s behind its source (objective 30m)",
            ),
            AlertKind::TableReloaded => {
                let mut a = alert(
                    kind,
                    Severity::Warning,
                    "orders",
                    "orders was reloaded by DMS: generation 2 (3 files) replaced the table; 3,623 rows before, 3,586 after; 2 files of the earlier generation were deleted by DMS before they were applied",
                );
                a.source = Some("public.orders".into());
                a.file = Some("s3://dms-bucket/dms/public/orders/LOAD00000001.parquet".into());
                a
            }
            AlertKind::ReloadWaiting => {
                let mut a = alert(
                    kind,
                    Severity::Warning,
                    "orders",
                    "orders was reloaded by DMS: generation 2 (3 files, 3,586 rows) is built beside the table (3,623 rows) and waits for acceptance (dms.reload = \"hold\")",
                );
                a.source = Some("public.orders".into());
                a.held = true;
                a.next_steps = Some("The table keeps its rows and its later files wait in the new generation's lane (nothing is lost). Compare `_cdc_worker_g00000002__orders` with `orders`, then run `cdc-worker table accept-reload orders`.".into());
                a
            }
            AlertKind::DestructiveChangeHeld => {
                let mut a = alert(
                    kind,
                    Severity::Error,
                    "orders",
                    &format!(
                        "{FILE}: the batch from this file deletes 45,000 of the table's 50,000 rows, more than guard.max_delete_fraction (0.5) allows; nothing of it was applied"
                    ),
                );
                a.source = Some("public.orders".into());
                a.file = Some(FILE.into());
                a.held = true;
                a.next_steps = Some("Files of `orders` wait (nothing is lost; other tables go on). If the deletes are intended, run `cdc-worker table release-guard orders` and the batch is applied as it is.".into());
                a
            }
            AlertKind::SetupProblem => {
                let mut a = alert(
                    kind,
                    Severity::Warning,
                    "",
                    "dead-letter queue: the queue has no redrive policy: a file that can never be applied (corrupt, or late) comes back forever instead of resting in a dead-letter queue",
                );
                a.next_steps = Some("Give the queue a RedrivePolicy (deadLetterTargetArn, maxReceiveCount 5). Then restart the worker; `cdc-worker check-connection` runs the same checks.".into());
                a
            }
        }
    }

    /// Variants whose text differs from their kind's fixture.
    fn variants() -> Vec<(&'static str, Alert)> {
        let mut held = alert(
            AlertKind::SchemaChange,
            Severity::Error,
            "payments",
            "payments: amount: decimal(10,2) -> string (incompatible)",
        );
        held.source = Some("public.payments".into());
        held.schema_version = Some(7);
        held.changes = vec![SchemaChange::TypeChanged {
            column: "amount".into(),
            from: ColumnType::Decimal {
                precision: 10,
                scale: 2,
            },
            to: ColumnType::String,
            change: TypeChange::Incompatible,
        }];
        held.actions = vec![action(
            "held",
            "table held: amount: decimal(10,2) -> string (incompatible) under the strict policy",
        )];
        held.policy = Some(PolicyPreset::Strict.policy());
        held.file = Some(
            "s3://dms-bucket/dms/public/payments/2026/11/24/20261124-101500123.parquet".into(),
        );
        held.held = true;
        held.next_steps = Some("Files of `payments` wait (nothing is lost). Review the change, then run `cdc-worker schema accept payments` to apply it as the evolve preset would (add `--incompatible cast|variant|ignore` for type changes), or change the table's policy in the config and accept.".into());

        let mut unroutable = alert(
            AlertKind::FileSkipped,
            Severity::Warning,
            "",
            "s3://dms-bucket/dms/../etc/passwd.parquet: not a DMS key: `..` in the key",
        );
        unroutable.file = Some("s3://dms-bucket/dms/../etc/passwd.parquet".into());

        let columns: Vec<SchemaChange> = (0..25)
            .map(|i| SchemaChange::NewColumn {
                column: format!("c{i:02}"),
                ty: ColumnType::Int64,
            })
            .collect();
        let mut many = fixture(AlertKind::SchemaChange);
        many.actions = columns
            .iter()
            .map(|c| action("added_column", &format!("added {}", c.describe())))
            .collect();
        many.changes = columns;
        vec![
            ("schema_change_held", held),
            ("file_skipped_unroutable", unroutable),
            ("schema_change_many_columns", many),
        ]
    }

    fn root() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
    }

    /// Compares with `src/alerts/golden/NAME.txt`; `CDC_WORKER_UPDATE_GOLDEN=1` rewrites it
    /// (then review the diff).
    fn check_golden(name: &str, actual: &str) {
        let path = root().join("src/alerts/golden").join(format!("{name}.txt"));
        if std::env::var_os("CDC_WORKER_UPDATE_GOLDEN").is_some() {
            std::fs::write(&path, actual).expect("write golden file");
            return;
        }
        let expected = std::fs::read_to_string(&path).unwrap_or_else(|_| {
            panic!(
                "no golden file {}: run `CDC_WORKER_UPDATE_GOLDEN=1 cargo test --lib alerts::` and review it",
                path.display()
            )
        });
        assert_eq!(
            actual,
            expected,
            "email text of {name} differs from {}",
            path.display()
        );
    }

    #[test]
    fn email_text_of_every_kind_matches_its_golden_file() {
        for &kind in AlertKind::ALL {
            check_golden(kind.as_str(), &email_text(&fixture(kind)));
        }
        for (name, alert) in variants() {
            check_golden(name, &email_text(&alert));
        }
    }

    /// Markdown's heading anchor: lower case, punctuation dropped, spaces to dashes.
    fn anchor(heading: &str) -> String {
        heading
            .trim()
            .to_lowercase()
            .chars()
            .filter(|c| c.is_alphanumeric() || *c == '_' || *c == '-' || *c == ' ')
            .map(|c| if c == ' ' { '-' } else { c })
            .collect()
    }

    fn anchors(doc: &Path) -> Vec<String> {
        let text =
            std::fs::read_to_string(doc).unwrap_or_else(|e| panic!("{}: {e}", doc.display()));
        text.lines()
            .filter(|l| l.starts_with('#'))
            .map(|l| anchor(l.trim_start_matches('#')))
            .collect()
    }

    #[test]
    fn every_document_an_email_names_exists() {
        let mut alerts: Vec<Alert> = AlertKind::ALL.iter().map(|&k| fixture(k)).collect();
        alerts.extend(variants().into_iter().map(|(_, a)| a));
        for alert in alerts {
            let text = email_text(&alert);
            let links = text
                .split([' ', ',', '\n'])
                .filter(|w| w.starts_with("docs/"));
            for link in links {
                let (file, section) = link.split_once('#').unwrap_or((link, ""));
                let path = root().join(file);
                assert!(
                    path.exists(),
                    "{link} (alert {}) does not exist",
                    alert.alert.as_str()
                );
                if !section.is_empty() {
                    assert!(
                        anchors(&path).iter().any(|a| a == section),
                        "{file} has no section #{section} (alert {})",
                        alert.alert.as_str()
                    );
                }
            }
        }
    }

    #[test]
    fn email_leads_with_what_happened_and_names_the_table() {
        for &kind in AlertKind::ALL {
            let a = fixture(kind);
            let text = email_text(&a);
            let mut lines = text.lines();
            let first = lines.next().unwrap();
            assert!(!first.is_empty() && first.len() < 200, "{kind:?}: {first}");
            assert_eq!(
                lines.next(),
                Some(""),
                "{kind:?}: a blank line after the headline"
            );
            assert!(text.contains(&format!("Table:  {}", a.table)), "{text}");
            assert!(text.contains("What the worker did\n"), "{text}");
            assert!(text.contains("What to do\n"), "{text}");
            assert!(
                text.contains("\n    cdc-worker "),
                "{kind:?} names a command: {text}"
            );
        }
    }

    #[test]
    fn the_example_in_the_docs_is_the_email_the_worker_sends() {
        let doc = std::fs::read_to_string(root().join("docs/alerts.md")).unwrap();
        let example = doc
            .split("```text\n")
            .nth(1)
            .and_then(|rest| rest.split("```").next())
            .expect("docs/alerts.md has a ```text example");
        assert_eq!(example, email_text(&fixture(AlertKind::SchemaChange)));
    }

    #[test]
    fn the_json_body_renders_the_same_email() {
        // What an SQS subscriber gets carries everything the email says.
        for &kind in AlertKind::ALL {
            let a = fixture(kind);
            let back: Alert = serde_json::from_str(&serde_json::to_string(&a).unwrap()).unwrap();
            assert_eq!(email_text(&back), email_text(&a), "{kind:?}");
        }
    }

    #[test]
    fn long_lists_are_cut_with_a_count() {
        let (_, many) = variants().pop().unwrap();
        let text = email_text(&many);
        assert_eq!(text.matches("  - new column c").count(), MAX_LISTED);
        assert!(
            text.contains("  ... and 5 more (the JSON body lists them all)"),
            "{text}"
        );
    }
}
