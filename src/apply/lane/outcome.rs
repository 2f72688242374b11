//! What a batch leaves behind besides rows: schema versions and their alerts, held
//! tables, failures with backoff, and alerts about single files.

use std::time::{Duration, Instant};

use super::{Lane, SegmentOutcome, StopKind};
use crate::alerts::{Alert, AlertKind, Severity};
use crate::apply::plan::{self, Decision};
use crate::apply::{EngineEvent, PendingFile};
use crate::dms::SourceTable;
use crate::queue::FileOutcome;
use crate::schema::diff::SchemaChange;
use crate::schema::store::{Recorded, SchemaVersion, TableStatus};
use crate::schema::types::FileSchema;
use crate::telemetry::BatchFailed;

/// Consecutive failures after which a table is reported as failing.
const FAILING_AFTER: u32 = 3;

impl Lane {
    pub(super) async fn record_version(
        &mut self,
        source: &SourceTable,
        schema: &FileSchema,
        changes: &[SchemaChange],
        decision: &Decision,
        policy: crate::schema::policy::SchemaPolicy,
        first: &PendingFile,
    ) -> Result<(), String> {
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let (status, actions, held_reason) = match decision {
            Decision::Apply { actions, .. } => (TableStatus::Active, actions.clone(), None),
            Decision::Hold { reason, kinds } => (
                TableStatus::Held {
                    version: 0,
                    reason: reason.clone(),
                    since: now.clone(),
                    kinds: kinds.clone(),
                },
                vec![plan::Action::Held {
                    reason: reason.clone(),
                }],
                Some(reason.clone()),
            ),
            Decision::Ignore => (
                TableStatus::Ignored { since: now.clone() },
                vec![plan::Action::IgnoredTable],
                None,
            ),
        };
        let previous = self.state.stored.clone();
        // Nullability only ever relaxes in the record.
        let mut columns = schema.table.columns.clone();
        if let Some(p) = &previous {
            for c in &mut columns {
                if p.current.columns.iter().any(|o| {
                    crate::schema::diff::fold(&o.name) == crate::schema::diff::fold(&c.name)
                        && o.nullable
                }) {
                    c.nullable = true;
                }
            }
        }
        let mut version = SchemaVersion {
            table: self.table.clone(),
            version: 0,
            source: Some(source.to_string()),
            columns,
            changes: changes.to_vec(),
            actions: actions
                .iter()
                .map(|a| serde_json::to_value(a).unwrap_or_default())
                .collect(),
            policy: Some(policy),
            file: Some(first.file.uri()),
            detected_at: now,
            status,
        };
        if let TableStatus::Held { version: v, .. } = &mut version.status {
            *v = previous.as_ref().map(|p| p.current.version).unwrap_or(0) + 1;
        }
        let recorded = self
            .ctx
            .schemas
            .record(previous.as_ref(), version.clone())
            .await
            .map_err(|e| e.to_string())?;
        match recorded {
            Recorded::Created(stored) => {
                let number = stored.current.version;
                self.state.stored = Some(stored);
                if changes.is_empty() {
                    // First sight of a table that already existed: a baseline, no alert.
                    return Ok(());
                }
                let mut alert = Alert::new(
                    AlertKind::SchemaChange,
                    if held_reason.is_some() {
                        Severity::Error
                    } else if changes
                        .iter()
                        .any(|c| matches!(c, SchemaChange::NewTable { .. }))
                    {
                        Severity::Info
                    } else {
                        Severity::Warning
                    },
                    &self.table,
                    format!(
                        "{}: {}",
                        self.table,
                        changes
                            .iter()
                            .map(|c| c.describe())
                            .collect::<Vec<_>>()
                            .join("; ")
                    ),
                );
                alert.source = Some(source.to_string());
                alert.schema_version = Some(number);
                alert.changes = changes.to_vec();
                alert.actions = actions
                    .iter()
                    .map(|a| {
                        let mut v = serde_json::to_value(a).unwrap_or_default();
                        if let Some(obj) = v.as_object_mut() {
                            obj.insert("description".into(), a.describe().into());
                        }
                        v
                    })
                    .collect();
                alert.policy = Some(policy);
                alert.file = Some(first.file.uri());
                alert.held = held_reason.is_some();
                if held_reason.is_some() {
                    alert.next_steps = Some(format!(
                        "Files of `{t}` wait (nothing is lost). Review the change, then run `cdc-worker schema accept {t}` to apply it as the evolve preset would (add `--incompatible cast|variant|ignore` for type changes), or change the table's policy in the config and accept.",
                        t = self.table
                    ));
                }
                self.ctx.alerts.publish(&alert).await;
                metrics::counter!("cdc_worker_schema_changes_total", "table" => self.table.clone())
                    .increment(1);
            }
            Recorded::Lost(current) => {
                // Another worker recorded it (and alerted); adopt its view.
                if let Some(c) = &current
                    && let TableStatus::Held { reason, .. } = &c.current.status
                {
                    self.state.held = Some(reason.clone());
                    self.state.held_checked = Some(Instant::now());
                }
                self.state.stored = current;
            }
        }
        Ok(())
    }

    pub(super) async fn hold(&mut self, files: Vec<PendingFile>, reason: &str) -> SegmentOutcome {
        if self.state.alerted.insert(format!("hold:{reason}")) {
            let mut alert = Alert::new(
                AlertKind::TableHeld,
                Severity::Error,
                &self.table,
                reason.to_string(),
            );
            alert.held = true;
            alert.file = files.first().map(|f| f.file.uri());
            alert.next_steps = Some(format!(
                "Files of `{}` wait in the queue (nothing is lost). Fix the cause, then restart the worker or run `cdc-worker schema accept {}`.",
                self.table, self.table
            ));
            self.ctx.alerts.publish(&alert).await;
        }
        self.state.held = Some(reason.to_string());
        self.state.held_checked = Some(Instant::now());
        let _ = self.ctx.events.send(EngineEvent::TableHeld {
            table: self.table.clone(),
            reason: reason.to_string(),
        });
        SegmentOutcome::Stop(StopKind::Held(files))
    }

    pub(super) async fn segment_failed(
        &mut self,
        batch_id: &str,
        files: Vec<PendingFile>,
        error: &str,
    ) -> SegmentOutcome {
        self.fail(batch_id, files, error).await;
        SegmentOutcome::Stop(StopKind::Failed)
    }

    /// Releases files with backoff and blocks later files of the table behind them.
    pub(super) async fn fail(
        &mut self,
        batch_id: &str,
        files: Vec<PendingFile>,
        error: &str,
    ) -> bool {
        self.state.consecutive_failures += 1;
        let keys: Vec<String> = files.iter().map(|f| f.file.key.clone()).collect();
        BatchFailed {
            table: &self.table,
            batch_id,
            files: &keys,
            error,
            consecutive_failures: self.state.consecutive_failures,
        }
        .emit();
        if self.state.consecutive_failures >= FAILING_AFTER && !self.state.failing_alerted {
            self.state.failing_alerted = true;
            let mut alert = Alert::new(
                AlertKind::TableFailing,
                Severity::Error,
                &self.table,
                format!(
                    "{} consecutive batches failed; last error: {error}",
                    self.state.consecutive_failures
                ),
            );
            alert.file = files.first().map(|f| f.file.uri());
            alert.next_steps = Some("The table's files are retried with backoff and later files wait behind them; after the queue's maximum receives they reach the dead-letter queue. Fix the cause, then redrive the DLQ or run `cdc-worker replay --table TABLE`.".into());
            self.ctx.alerts.publish(&alert).await;
        }
        self.retry_later(files);
        false
    }

    /// After a failure: the earliest file goes back to the queue with backoff (and, after
    /// the queue's maximum receives, to the DLQ); every later file waits in the lane behind
    /// it, its visibility kept alive. Repeated failures thus narrow down to the one file
    /// that fails, and no healthy file is pushed into the DLQ with it.
    pub(super) fn retry_later(&mut self, mut files: Vec<PendingFile>) {
        files.sort_by_key(|f| f.dms.order());
        let mut files = files.into_iter();
        let Some(first) = files.next() else {
            return;
        };
        let order = first.dms.order();
        if self.state.blocked_from.as_ref().is_none_or(|b| &order < b) {
            self.state.blocked_from = Some(order);
        }
        self.state.retrying.insert(first.file.key.clone());
        if first.messages.is_empty() {
            // Found in the S3 listing: no message will bring it back, so the lane retries.
            let backoff = self.retry_backoff();
            self.state.not_before = Some(Instant::now() + backoff);
            self.add(first);
        } else {
            first.resolve(FileOutcome::Retry(None));
        }
        for f in files {
            self.add(f);
        }
    }

    /// The lane's own backoff for files without a message, like the queue's.
    pub(super) fn retry_backoff(&self) -> Duration {
        let q = &self.ctx.config.queue;
        let exp = self.state.consecutive_failures.saturating_sub(1).min(16);
        q.retry_backoff
            .saturating_mul(1u32 << exp)
            .min(q.retry_backoff_max)
    }

    pub(super) async fn routing_collision(
        &mut self,
        batch: Vec<PendingFile>,
        first: &str,
        second: &SourceTable,
    ) -> bool {
        let reason = format!(
            "source tables {first} and {second} both map to target table `{}`",
            self.table
        );
        if self.state.alerted.insert(format!("collision:{second}")) {
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
        false
    }

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
            .alerted
            .insert(format!("{}:{}", kind.as_str(), file.file.key))
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
