//! What a batch tells people and the schema history besides rows: schema versions and their
//! alerts, held tables, failures and recoveries, and alerts about single files.

use std::time::Instant;

use super::Lane;
use super::state::{FailingAlert, Recovered};
use crate::alerts::{Alert, AlertKind, Severity};
use crate::apply::context::{EngineEvent, PendingFile};
use crate::apply::failure::{ApplyError, Disposition};
use crate::apply::plan::{self, Decision};
use crate::dms::SourceTable;
use crate::queue::FileOutcome;
use crate::schema::diff::{SchemaChange, fold};
use crate::schema::store::{Recorded, SchemaVersion, Stored, TableStatus};
use crate::schema::types::{Column, FileSchema};
use crate::telemetry::BatchFailed;

use super::segment::Decided;
use super::verdicts::KeyTransition;

impl Lane {
    /// Records the segment's schema as the table's next version, and announces it.
    pub(super) async fn record_version(
        &mut self,
        source: &SourceTable,
        schema: &FileSchema,
        decided: &Decided,
        first: &PendingFile,
    ) -> Result<(), ApplyError> {
        let previous = self.cache.stored.clone();
        let version = self.next_version(source, schema, decided, previous.as_ref(), first);
        match self.ctx.schemas.record(previous.as_ref(), version).await? {
            Recorded::Created(stored) => {
                let number = stored.current.version;
                self.cache.stored = Some(stored);
                // First sight of a table that already existed: a baseline, no alert.
                if !decided.changes.is_empty() {
                    self.announce_version(source, decided, number, first).await;
                }
            }
            Recorded::Lost(current) => {
                // Another worker recorded it (and alerted); adopt its view.
                if let Some(c) = &current
                    && let TableStatus::Held { reason, .. } = &c.current.status
                {
                    self.state.hold(reason, Vec::new(), Instant::now());
                }
                self.cache.stored = current;
            }
        }
        Ok(())
    }

    fn next_version(
        &self,
        source: &SourceTable,
        schema: &FileSchema,
        decided: &Decided,
        previous: Option<&Stored>,
        first: &PendingFile,
    ) -> SchemaVersion {
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let next_number = previous.map_or(0, |p| p.current.version) + 1;
        let status = match &decided.decision {
            Decision::Apply { .. } => TableStatus::Active,
            Decision::Hold { reason, kinds } => TableStatus::Held {
                version: next_number,
                reason: reason.clone(),
                since: now.clone(),
                kinds: kinds.clone(),
            },
            Decision::Ignore => TableStatus::Ignored { since: now.clone() },
            // Never recorded (the lane holds the files without a version).
            Decision::Wait { .. } => TableStatus::Active,
        };
        SchemaVersion {
            table: self.table.clone(),
            version: 0,
            source: Some(source.to_string()),
            columns: relaxed_columns(&schema.table.columns, previous),
            changes: decided.changes.clone(),
            actions: actions_of(&decided.decision)
                .iter()
                .map(|a| serde_json::to_value(a).unwrap_or_default())
                .collect(),
            policy: Some(decided.policy),
            file: Some(first.file.uri()),
            detected_at: now,
            status,
            key: Some(decided.key.clone()),
        }
    }

    async fn announce_version(
        &mut self,
        source: &SourceTable,
        decided: &Decided,
        number: u64,
        first: &PendingFile,
    ) {
        let held = matches!(decided.decision, Decision::Hold { .. });
        let changes = &decided.changes;
        // A new table without a key is appended and its deletes are ignored: worth a look.
        let keyless = actions_of(&decided.decision)
            .iter()
            .any(|a| matches!(a, plan::Action::AppendOnly { .. }));
        let severity = if held {
            Severity::Error
        } else if keyless {
            Severity::Warning
        } else if changes
            .iter()
            .any(|c| matches!(c, SchemaChange::NewTable { .. }))
        {
            Severity::Info
        } else {
            Severity::Warning
        };
        let described: Vec<String> = changes.iter().map(|c| c.describe()).collect();
        let mut alert = Alert::new(
            AlertKind::SchemaChange,
            severity,
            &self.table,
            format!("{}: {}", self.table, described.join("; ")),
        );
        alert.source = Some(source.to_string());
        alert.schema_version = Some(number);
        alert.changes = changes.clone();
        alert.actions = actions_of(&decided.decision)
            .iter()
            .map(|a| {
                let mut v = serde_json::to_value(a).unwrap_or_default();
                if let Some(obj) = v.as_object_mut() {
                    obj.insert("description".into(), a.describe().into());
                }
                v
            })
            .collect();
        alert.policy = Some(decided.policy);
        alert.file = Some(first.file.uri());
        alert.held = held;
        if keyless {
            alert.next_steps = Some(format!(
                "`{t}` has no key: its rows are appended and deletes are ignored. If the source table has a primary key, set `[tables.{t}] key = [\"...\"]` in the config (or add it to table_keys.json), drop the target table and replay it with `cdc-worker replay --table {t}`.",
                t = self.table
            ));
        }
        if held {
            alert.next_steps = Some(format!(
                "Files of `{t}` wait (nothing is lost). Review the change, then run `cdc-worker schema accept {t}` to apply it as the evolve preset would (add `--incompatible cast|variant|ignore` for type changes), or change the table's policy in the config and accept.",
                t = self.table
            ));
        }
        self.ctx.alerts.publish(&alert).await;
        metrics::counter!("cdc_worker_schema_changes_total", "table" => self.table.clone())
            .increment(1);
    }

    /// The table's key appeared, changed or went away: said once, with what the worker does.
    pub(super) async fn alert_key_transition(&mut self, decided: &Decided, first: &PendingFile) {
        let t = &self.table;
        let held = matches!(decided.decision, Decision::Wait { .. });
        if held
            && !self
                .state
                .first_time(format!("key:{:?}", decided.key_transition))
        {
            return;
        }
        let (message, next_steps) = match &decided.key_transition {
            KeyTransition::Same => return,
            KeyTransition::Dropped { was } => (
                format!(
                    "`{t}` no longer has a key (it was merged by {}): from here on its rows are appended and deletes are ignored",
                    was.join(", ")
                ),
                format!(
                    "If this is not intended, set the key again (`[tables.{t}] key` or table_keys.json)."
                ),
            ),
            KeyTransition::Appeared { key } | KeyTransition::Changed { key, .. } if held => (
                format!(
                    "`{t}` now has a key ({}), but {} key values appear more than once among its rows; the table is held",
                    key.join(", "),
                    decided.repeated_keys
                ),
                format!(
                    "Files of `{t}` wait (nothing is lost). Remove the repeated rows (or drop the table and replay it: `cdc-worker replay --table {t}`): the worker checks again now and then and resumes the table by itself."
                ),
            ),
            KeyTransition::Appeared { key } | KeyTransition::Changed { key, .. } => (
                format!(
                    "`{t}` now has a key ({}): its rows are merged by key from here on; the rows loaded before are kept, and no key value repeats among them",
                    key.join(", ")
                ),
                "Nothing is required. Deletes apply from here on; rows deleted at the source before the key was set are still in the table (replay the table to remove them).".to_string(),
            ),
        };
        let severity = if held {
            Severity::Error
        } else {
            Severity::Warning
        };
        let mut alert = Alert::new(AlertKind::KeyChanged, severity, t, message);
        alert.source = Some(first.source.to_string());
        alert.file = Some(first.file.uri());
        alert.held = held;
        alert.next_steps = Some(next_steps);
        self.ctx.alerts.publish(&alert).await;
    }

    /// Holds the table for a condition of its files (unusable names, a key column missing),
    /// alerting once per reason. The caller keeps the files waiting; the lane tries them
    /// again now and then.
    pub(super) async fn wait_for_condition(&mut self, files: &[PendingFile], reason: &str) {
        if self.state.first_time(format!("hold:{reason}")) {
            let mut alert = Alert::new(
                AlertKind::TableHeld,
                Severity::Error,
                &self.table,
                reason.to_string(),
            );
            alert.held = true;
            alert.file = files.first().map(|f| f.file.uri());
            alert.next_steps = Some(format!(
                "Files of `{}` wait (nothing is lost). Fix the cause named above: the worker tries the files again now and then and resumes the table by itself (there is nothing to `schema accept`).",
                self.table
            ));
            self.ctx.alerts.publish(&alert).await;
        }
        tracing::warn!(table = %self.table, reason, files = files.len(), "table held until its files can be applied");
        self.state
            .hold_for_condition(reason, Vec::new(), Instant::now());
        let _ = self.ctx.events.send(EngineEvent::TableHeld {
            table: self.table.clone(),
            reason: reason.to_string(),
        });
    }

    /// A stage of a batch failed: the schedule decides what waits and what goes back to
    /// the queue; the table is reported when it keeps failing.
    pub(super) async fn failed(
        &mut self,
        batch_id: &str,
        files: Vec<PendingFile>,
        error: ApplyError,
    ) {
        let disposition = error.disposition();
        let message = error.to_string();
        // What the lane read may be stale now.
        self.cache.target = None;
        if disposition == Disposition::Fenced {
            // A newer lease holder committed: re-read the table's state before going on.
            tracing::info!(table = %self.table, error = %message, "fenced out; re-reading the table's state");
            self.cache.loaded = false;
            self.cache.listing = None;
        }
        let first = files.iter().min_by_key(|f| f.dms.order()).cloned();
        let after = self
            .state
            .failed(files, disposition, &message, Instant::now());
        if disposition != Disposition::Fenced {
            BatchFailed {
                table: &self.table,
                batch_id,
                error: &message,
                disposition: disposition.label(),
                consecutive_failures: self.state.snapshot().consecutive_failures,
            }
            .emit();
        }
        for f in after.release {
            f.resolve(FileOutcome::Retry(None));
        }
        if let (Some(alert), Some(first)) = (after.alert, first) {
            self.alert_failing(alert, disposition, &message, &first)
                .await;
        }
    }

    async fn alert_failing(
        &mut self,
        alert: FailingAlert,
        disposition: Disposition,
        error: &str,
        first: &PendingFile,
    ) {
        let failures = self.state.snapshot().consecutive_failures;
        let message = match alert {
            FailingAlert::First => {
                format!("{failures} consecutive batches failed; last error: {error}")
            }
            FailingAlert::Reminder { failing_for } => format!(
                "still failing after {} ({failures} consecutive failures); last error: {error}",
                humantime::format_duration(std::time::Duration::from_secs(failing_for.as_secs()))
            ),
        };
        let next_steps = match disposition {
            Disposition::Poison => format!(
                "The data of {} is refused. The table waits behind it (nothing later is applied); the file goes back to the queue with backoff and, after the queue's maximum receives, to the dead-letter queue. Fix or replace the file in S3 and redrive the DLQ; if it can never be applied, `cdc-worker ledger skip {} {} --reason ...` lets the table go on.",
                first.file.uri(),
                self.table,
                first.file.key
            ),
            _ => "The table's files wait in the worker (visibility kept alive, nothing goes to the dead-letter queue) and are retried with backoff until the cause passes. Check the warehouse, S3 and the worker's disk; `cdc-worker status` shows the table.".to_string(),
        };
        let mut alert = Alert::new(
            AlertKind::TableFailing,
            Severity::Error,
            &self.table,
            message,
        );
        alert.file = Some(first.file.uri());
        alert.next_steps = Some(next_steps);
        self.ctx.alerts.publish(&alert).await;
    }

    pub(super) async fn alert_recovered(&mut self, recovered: &Recovered, first: &PendingFile) {
        let message = format!(
            "applies again after {} of failures ({} consecutive failed batches)",
            humantime::format_duration(std::time::Duration::from_secs(
                recovered.failing_for.as_secs()
            )),
            recovered.failures
        );
        tracing::info!(table = %self.table, failures = recovered.failures, "table recovered");
        let mut alert = Alert::new(
            AlertKind::TableRecovered,
            Severity::Info,
            &self.table,
            message,
        );
        alert.file = Some(first.file.uri());
        self.ctx.alerts.publish(&alert).await;
    }

    pub(super) async fn routing_collision(
        &mut self,
        batch: Vec<PendingFile>,
        first: &str,
        second: &SourceTable,
    ) {
        let reason = format!(
            "source tables {first} and {second} both map to target table `{}`",
            self.table
        );
        if self.state.first_time(format!("collision:{second}")) {
            let mut alert = Alert::new(
                AlertKind::RoutingCollision,
                Severity::Error,
                &self.table,
                reason.clone(),
            );
            alert.source = Some(second.to_string());
            alert.next_steps = Some("Change routing.table_name (for example to \"{schema}_{table}\") so each source table has its own target. The files of the second source go to the dead-letter queue.".into());
            self.ctx.alerts.publish(&alert).await;
        }
        tracing::error!(table = %self.table, reason, "routing collision; files not applied");
        for f in batch {
            f.resolve(FileOutcome::Retry(None));
        }
    }

    /// An alert about one file, once per kind and file.
    pub(super) async fn alert_file(
        &mut self,
        kind: AlertKind,
        severity: Severity,
        file: &PendingFile,
        reason: &str,
        next_steps: Option<&str>,
    ) {
        if !self
            .state
            .first_time(format!("{}:{}", kind.as_str(), file.file.key))
        {
            return;
        }
        let mut alert = Alert::new(
            kind,
            severity,
            &self.table,
            format!("{}: {reason}", file.file.uri()),
        );
        alert.source = Some(file.source.to_string());
        alert.file = Some(file.file.uri());
        alert.next_steps = next_steps.map(str::to_string);
        self.ctx.alerts.publish(&alert).await;
    }
}

/// What the worker does about a decision, as the schema history and alerts record it.
fn actions_of(decision: &Decision) -> Vec<plan::Action> {
    match decision {
        Decision::Apply { actions, .. } => actions.clone(),
        Decision::Hold { reason, .. } => vec![plan::Action::Held {
            reason: reason.clone(),
        }],
        Decision::Ignore => vec![plan::Action::IgnoredTable],
        Decision::Wait { reason } => vec![plan::Action::Held {
            reason: reason.clone(),
        }],
    }
}

/// Nullability only ever relaxes in the record: a column nullable before stays nullable.
fn relaxed_columns(columns: &[Column], previous: Option<&Stored>) -> Vec<Column> {
    let mut columns = columns.to_vec();
    if let Some(p) = previous {
        for c in &mut columns {
            if p.current
                .columns
                .iter()
                .any(|o| fold(&o.name) == fold(&c.name) && o.nullable)
            {
                c.nullable = true;
            }
        }
    }
    columns
}
