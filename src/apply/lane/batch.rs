//! Applying one batch, as a sequence of stages: the table's state, the ledger's verdicts,
//! earlier files from the S3 listing, late files, staging, then each segment (files that
//! share a schema) in order. A stage that fails hands its [`ApplyError`] and the files it
//! had not finished to [`Lane::failed`]; the lane's schedule decides the rest.

use std::collections::{BTreeMap, HashSet};
use std::time::Instant;

use tracing::Instrument;

use super::Lane;
use super::segment::{SegmentOutcome, Tally};
use super::verdicts::{
    LedgerVerdict, Listing, generation_verdict, join_gaps, needs_current_etag, still_to_apply,
};
use crate::alerts::{AlertKind, Severity};
use crate::apply::context::{EngineEvent, PendingFile, new_batch_id};
use crate::apply::failure::ApplyError;
use crate::batch::{BatchFile, LedgerRecord, LedgerStatus, StageError, StagedFile};
use crate::dms::{KeyClass, classify_key};
use crate::queue::FileOutcome;
use crate::schema::store::TableStatus;
use crate::storage::bare_etag;
use crate::telemetry::{FileSkipped, SkipKind};

/// A stage's failure: the error, and the files from the failed one on.
pub(super) type Failed = (ApplyError, Vec<PendingFile>);

/// The staged files of a batch, the failure that stopped staging, and the downloads.
struct Staging {
    ready: Vec<(PendingFile, StagedFile)>,
    failed: Option<Failed>,
    /// Dropping it removes what was downloaded.
    workspace: Option<tempfile::TempDir>,
}

impl Lane {
    pub(super) async fn apply_batch(&mut self, batch: Vec<PendingFile>) {
        let batch_id = new_batch_id();
        let started = Instant::now();
        self.batch_started = Some(started);
        let _ = self.ctx.events.send(EngineEvent::BatchStarted {
            table: self.table.clone(),
            batch_id: batch_id.clone(),
            files: batch.len(),
            at: started,
        });
        // Every log line of the batch carries these; the whole key list is logged once, at
        // debug level (a hundred keys on every line would be most of the log's volume).
        let first = batch
            .first()
            .map(|f| f.file.key.clone())
            .unwrap_or_default();
        let last = batch.last().map(|f| f.file.key.clone()).unwrap_or_default();
        let span = tracing::info_span!("batch", table = %self.table, batch_id = %batch_id, files = batch.len(), first_key = %first, last_key = %last);
        let mut tally = Tally::default();
        let ok = async {
            tracing::debug!(file_keys = ?batch.iter().map(|f| f.file.key.as_str()).collect::<Vec<_>>(), "batch files");
            match self.run_batch(&batch_id, batch, &mut tally).await {
                Ok(()) => true,
                Err((error, files)) => {
                    self.failed(&batch_id, files, error).await;
                    false
                }
            }
        }
        .instrument(span)
        .await;
        let _ = self.ctx.events.send(EngineEvent::BatchFinished {
            table: self.table.clone(),
            batch_id,
            committed: tally.keys,
            ok,
            statements: tally.statements,
            rows: tally.rows,
            at: Instant::now(),
        });
        self.publish_info();
    }

    async fn run_batch(
        &mut self,
        batch_id: &str,
        batch: Vec<PendingFile>,
        tally: &mut Tally,
    ) -> Result<(), Failed> {
        if let Err(e) = self.load_state().await {
            return Err((e, batch));
        }
        if self.cache.ignored {
            self.skip_ignored(&batch);
            return Ok(());
        }
        if self.state.held().is_some() {
            self.state.add_all(batch);
            return Ok(());
        }
        let Some(batch) = self.refuse_second_source(batch).await else {
            return Ok(());
        };
        let fresh = self.sort_by_ledger(batch).await?;
        let fresh = self.fill_gaps(fresh).await?;
        let in_order = self.refuse_late(fresh).await;
        if in_order.is_empty() {
            return Ok(());
        }
        let staging = self.stage(batch_id, in_order).await;
        let applied = self.apply_segments(batch_id, staging.ready, tally).await;
        // The downloads are needed until every segment is applied.
        drop(staging.workspace);
        match (applied, staging.failed) {
            (Err((e, mut files)), rest) => {
                // Files after a failed segment wait behind it.
                files.extend(rest.map(|(_, f)| f).unwrap_or_default());
                Err((e, files))
            }
            (Ok(()), Some(rest)) => Err(rest),
            (Ok(()), None) => Ok(()),
        }
    }

    /// Loads what the lane needs to know about its table once: stored schema, status,
    /// last applied file.
    pub(super) async fn load_state(&mut self) -> Result<(), ApplyError> {
        if self.cache.loaded {
            return Ok(());
        }
        let stored = self.ctx.schemas.load(&self.table).await?;
        if let Some(s) = &stored {
            match &s.current.status {
                TableStatus::Held { reason, .. } | TableStatus::Guarded { reason, .. } => {
                    self.state.hold(reason, Vec::new(), Instant::now())
                }
                TableStatus::Ignored { .. } => self.cache.ignored = true,
                TableStatus::Active => {}
            }
        }
        self.cache.stored = stored;
        let last = self
            .ctx
            .warehouse
            .last_applied(&self.table)
            .await
            .map_err(ApplyError::warehouse("reading the last applied file"))?;
        let last = self.load_generations(last).await?;
        self.state.set_last_applied(last);
        self.cache.loaded = true;
        Ok(())
    }

    /// `new_table = "ignore"`: the table's files are acknowledged and dropped.
    pub(super) fn skip_ignored(&self, files: &[PendingFile]) {
        for f in files {
            FileSkipped {
                table: &self.table,
                key: &f.file.key,
                kind: SkipKind::TableIgnored,
                reason: "table ignored by policy",
            }
            .emit();
            f.resolve(FileOutcome::Skipped);
        }
    }

    /// A second source table routed to this target is refused (its files go to the DLQ),
    /// never merged with the first; None when the batch was refused.
    async fn refuse_second_source(&mut self, batch: Vec<PendingFile>) -> Option<Vec<PendingFile>> {
        let source = batch[0].source.clone();
        let Some(stored_source) = self
            .cache
            .stored
            .as_ref()
            .and_then(|s| s.current.source.clone())
        else {
            return Some(batch);
        };
        if stored_source == source.to_string() {
            return Some(batch);
        }
        self.routing_collision(batch, &stored_source, &source).await;
        None
    }

    /// Acknowledges what the ledger has seen and returns the files to apply.
    async fn sort_by_ledger(
        &mut self,
        batch: Vec<PendingFile>,
    ) -> Result<Vec<PendingFile>, Failed> {
        let keys: Vec<String> = batch.iter().map(|f| f.file.key.clone()).collect();
        let applied = match self.ctx.warehouse.applied(&self.table, &keys).await {
            Ok(a) => a,
            Err(e) => return Err((ApplyError::warehouse("reading the ledger")(e), batch)),
        };
        let mut fresh = Vec::with_capacity(batch.len());
        for mut f in batch {
            let record = applied.get(&f.file.key);
            let generation = self.cache.generations.current;
            if needs_current_etag(&f.file, record, generation) {
                match self.current_etag(&f).await {
                    Ok(Some(etag)) => f.file.etag = etag,
                    Ok(None) => {
                        self.skip_missing(f).await;
                        continue;
                    }
                    Err(e) => return Err((e, std::iter::once(f).chain(fresh).collect())),
                }
            }
            if self.skip_if_superseded(&f) {
                f.resolve(FileOutcome::Skipped);
                continue;
            }
            let after_changes = self.loaded_after_changes(&f);
            match generation_verdict(&f.file, record, generation, after_changes) {
                LedgerVerdict::Fresh => fresh.push(f),
                LedgerVerdict::Reload => {
                    if let Some(f) = self.reload_or_refuse(f, record).await {
                        fresh.push(f);
                    }
                }
                LedgerVerdict::StillRejected => {
                    self.state.settled(&f);
                    f.resolve(FileOutcome::Retry(None));
                }
                LedgerVerdict::AlreadyApplied => {
                    FileSkipped {
                        table: &self.table,
                        key: &f.file.key,
                        kind: SkipKind::AlreadyApplied,
                        reason: "already applied (ledger)",
                    }
                    .emit();
                    self.state.settled(&f);
                    f.resolve(FileOutcome::Skipped);
                }
                LedgerVerdict::Replaced { ledger_etag } => {
                    self.skip_replaced(f, &ledger_etag).await
                }
                LedgerVerdict::SkippedByOperator => {
                    FileSkipped {
                        table: &self.table,
                        key: &f.file.key,
                        kind: SkipKind::SkippedByOperator,
                        reason: "skipped by an operator (cdc-worker ledger skip)",
                    }
                    .emit();
                    self.state.settled(&f);
                    f.resolve(FileOutcome::Skipped);
                }
            }
        }
        Ok(fresh)
    }

    pub(super) async fn skip_replaced(&mut self, f: PendingFile, ledger_etag: &str) {
        let reason = format!(
            "replaced after it was applied (ledger ETag {ledger_etag}, now {}); not applied again",
            f.file.etag
        );
        // DMS rewrites full-load files when a table is reloaded, never a change file; a
        // reload reaches here only under `dms.reload = "alert"`.
        let steps = if f.file.full_load {
            format!(
                "DMS wrote the full load of `{t}` again (a reload); with dms.reload = \"alert\" for this table the worker keeps the rows of the earlier load. To follow reloads, set dms.reload (or tables.{t}.reload) to \"replace\" and restart: the next reload replaces the table. To rebuild it now, see docs/reloads.md.",
                t = self.table
            )
        } else {
            "DMS does not rewrite change files: to load the new content, upload it under a new name that sorts after the table's last applied file.".to_string()
        };
        FileSkipped {
            table: &self.table,
            key: &f.file.key,
            kind: SkipKind::Replaced,
            reason: &reason,
        }
        .emit();
        self.alert_file(
            AlertKind::FileSkipped,
            Severity::Warning,
            &f,
            &reason,
            Some(&steps),
        )
        .await;
        self.state.settled(&f);
        f.resolve(FileOutcome::Skipped);
    }

    /// Files older than what is applied, that the lane did not fail itself: without an
    /// ordering column they are refused (alerted, message to the DLQ), because applying
    /// them would overwrite newer changes; those gone from S3 are skipped as missing.
    async fn refuse_late(&mut self, files: Vec<PendingFile>) -> Vec<PendingFile> {
        if self.ctx.config.ordering_column(&self.table).is_some() {
            return files;
        }
        let mut in_order = Vec::with_capacity(files.len());
        for f in files {
            if !self.state.is_late(&f) {
                in_order.push(f);
                continue;
            }
            // A late file deleted since (as a reload deletes the earlier generation's
            // files) cannot overwrite anything: it takes the fate of a missing file.
            if matches!(self.current_etag(&f).await, Ok(None)) {
                self.skip_missing(f).await;
                continue;
            }
            let last = self
                .state
                .last_applied()
                .map(|(_, key)| key.clone())
                .unwrap_or_default();
            let reason = format!(
                "arrived after later files of `{}` were applied (the last applied file is {last}); applying it now would overwrite newer changes",
                self.table
            );
            let steps = "Configure dms.ordering_column (DMS TimestampColumnName or AR_H_CHANGE_SEQ) so late files can be applied safely. The message goes to the dead-letter queue.";
            self.alert_file(
                AlertKind::FileOutOfOrder,
                Severity::Error,
                &f,
                &reason,
                Some(steps),
            )
            .await;
            f.resolve(FileOutcome::Retry(None));
        }
        in_order
    }

    /// Adds files of this table that S3 already holds, ordered before the batch's last
    /// file, and neither applied nor announced yet: notifications arrive out of order, but
    /// DMS writes a table's files one after the other, so an earlier file in the listing is
    /// one whose notification is late. Its notification, when it comes, finds it in the
    /// ledger.
    async fn fill_gaps(&mut self, batch: Vec<PendingFile>) -> Result<Vec<PendingFile>, Failed> {
        let Some(last) = batch.iter().map(|f| f.dms.order()).max() else {
            return Ok(batch);
        };
        let covered = self.cache.listing.as_ref().is_some_and(|l| l.covers(&last));
        if !covered && let Err(e) = self.refresh_listing(&batch[0]).await {
            return Err((e, batch));
        }
        let in_batch: HashSet<String> = batch.iter().map(|f| f.file.key.clone()).collect();
        let Some(listing) = self.cache.listing.as_mut() else {
            return Ok(batch);
        };
        let mut gaps = listing.gaps_before(&last, &in_batch);
        // Another worker may have applied some since an earlier listing (a fresh one was
        // just checked against the ledger).
        if covered && !gaps.is_empty() {
            let keys: Vec<String> = gaps.iter().map(|g| g.file.key.clone()).collect();
            let applied = match self.ctx.warehouse.applied(&self.table, &keys).await {
                Ok(a) => a,
                Err(e) => return Err((ApplyError::warehouse("reading the ledger")(e), batch)),
            };
            let (generation, follow) = (self.cache.generations.current, self.follows_reloads());
            gaps.retain(|g| still_to_apply(&g.file, applied.get(&g.file.key), generation, follow));
            let done: Vec<&str> = gaps_done(&applied);
            let listing = self.cache.listing.as_mut().expect("listed");
            listing.forget(done);
        }
        if gaps.is_empty() {
            return Ok(batch);
        }
        let joined = join_gaps(batch, gaps, self.state.policy());
        let listing = self.cache.listing.as_mut().expect("listed");
        listing.forget(
            joined
                .batch
                .iter()
                .filter(|f| !in_batch.contains(&f.file.key))
                .map(|f| f.file.key.as_str()),
        );
        if joined.joined > 0 {
            tracing::info!(
                table = %self.table,
                files = joined.joined,
                deferred = joined.left,
                "earlier files found in the S3 listing before their notifications; applying them in order"
            );
            metrics::counter!("cdc_worker_gap_files_total", "table" => self.table.clone())
                .increment(joined.joined as u64);
        }
        self.state.add_all(joined.deferred);
        let now = Instant::now();
        Ok(joined
            .batch
            .into_iter()
            .map(|mut f| {
                if f.messages.is_empty() {
                    f.arrived = now;
                }
                f
            })
            .collect())
    }

    /// Lists the table's folder from the last applied file on, and remembers every file
    /// it shows that the ledger does not hold.
    async fn refresh_listing(&mut self, sample: &PendingFile) -> Result<(), ApplyError> {
        let bucket = sample.file.bucket.clone();
        let prefix = self.ctx.config.source.prefix.clone();
        let last_applied = self.state.last_applied().cloned();
        let start_after =
            last_applied
                .as_ref()
                .and_then(|(_, key)| match classify_key(&prefix, key) {
                    Ok(KeyClass::Dms(k)) if k.key_order_is_dms_order() => Some(key.clone()),
                    _ => None,
                });
        let listed = self
            .ctx
            .store
            .list(&bucket, &sample.dms.table_prefix, start_after.as_deref())
            .await
            .map_err(ApplyError::Listing)?;
        let mut files = BTreeMap::new();
        for object in listed {
            let Ok(KeyClass::Dms(dms)) = classify_key(&prefix, &object.key) else {
                continue;
            };
            let order = dms.order();
            let after_last = last_applied
                .as_ref()
                .is_none_or(|(l, _)| order.sort_key() > *l);
            if dms.source != sample.source || !after_last {
                continue;
            }
            let file = BatchFile {
                bucket: bucket.clone(),
                key: object.key,
                size: object.size,
                etag: bare_etag(&object.etag).to_string(),
                order_key: order.sort_key(),
                full_load: dms.is_load(),
            };
            files.insert(
                order,
                PendingFile::listed(&self.table, sample.source.clone(), dms, file),
            );
        }
        let keys: Vec<String> = files.values().map(|f| f.file.key.clone()).collect();
        let applied = self
            .ctx
            .warehouse
            .applied(&self.table, &keys)
            .await
            .map_err(ApplyError::warehouse("reading the ledger"))?;
        let (generation, follow) = (self.cache.generations.current, self.follows_reloads());
        files.retain(|_, f| still_to_apply(&f.file, applied.get(&f.file.key), generation, follow));
        let through = files.keys().next_back().cloned();
        self.cache.listing = Some(Listing {
            through,
            unapplied: files,
        });
        Ok(())
    }

    /// Makes the files readable to the warehouse. Missing objects are skipped, unreadable
    /// ones rejected (the table goes on without them); a transient failure (S3, the disk)
    /// stops the batch at that file.
    async fn stage(&mut self, batch_id: &str, files: Vec<PendingFile>) -> Staging {
        let objects: Vec<BatchFile> = files.iter().map(|f| f.file.clone()).collect();
        let staged = self.ctx.warehouse.stage(batch_id, objects).await;
        let mut staging = Staging {
            ready: Vec::with_capacity(files.len()),
            failed: None,
            workspace: staged.workspace,
        };
        let mut results = staged.files.into_iter();
        let mut files = files.into_iter();
        while let Some(f) = files.next() {
            let message = match results.next() {
                Some(Ok(s)) => {
                    staging.ready.push((f, s));
                    continue;
                }
                Some(Err(StageError::Missing)) => {
                    self.skip_missing(f).await;
                    continue;
                }
                Some(Err(StageError::Poison(e))) => {
                    self.reject_unreadable(f, &e.to_string()).await;
                    continue;
                }
                Some(Err(StageError::Transient(message))) => message,
                None => "staging returned fewer files than asked".to_string(),
            };
            let error = ApplyError::Staging {
                key: f.file.key.clone(),
                message,
            };
            staging.failed = Some((error, std::iter::once(f).chain(files).collect()));
            break;
        }
        staging
    }

    async fn skip_missing(&mut self, f: PendingFile) {
        if self.deleted_by_reload(&f) || self.deleted_by_earlier_reload(&f).await {
            FileSkipped {
                table: &self.table,
                key: &f.file.key,
                kind: SkipKind::Missing,
                reason: "deleted by DMS with the table's earlier generation (a reload)",
            }
            .emit();
            self.state.settled(&f);
            f.resolve(FileOutcome::Skipped);
            return;
        }
        let reason =
            "the object no longer exists (deleted after the notification, or a DMS TRUNCATE)";
        FileSkipped {
            table: &self.table,
            key: &f.file.key,
            kind: SkipKind::Missing,
            reason,
        }
        .emit();
        self.alert_file(AlertKind::FileSkipped, Severity::Warning, &f, reason, None)
            .await;
        self.state.settled(&f);
        f.resolve(FileOutcome::Skipped);
    }

    /// An object that is not readable Parquet: recorded in the ledger so it is not fetched
    /// again, alerted, and its message left for the dead-letter queue; the table goes on.
    async fn reject_unreadable(&mut self, f: PendingFile, error: &str) {
        let reason = format!("cannot be read as Parquet: {error}");
        if let Err(e) = self
            .ctx
            .warehouse
            .record_status(
                &self.table,
                std::slice::from_ref(&f.file),
                LedgerStatus::Rejected,
                &reason,
            )
            .await
        {
            tracing::warn!(table = %self.table, key = %f.file.key, error = %e, "could not record the rejected file in the ledger");
        }
        let steps = "The file is left in the queue and reaches the dead-letter queue after its maximum receives. Replace it in S3 and redrive the DLQ (or run `cdc-worker replay`); the table goes on meanwhile.";
        self.alert_file(
            AlertKind::FileRejected,
            Severity::Error,
            &f,
            &reason,
            Some(steps),
        )
        .await;
        metrics::counter!("cdc_worker_files_rejected_total", "table" => self.table.clone())
            .increment(1);
        self.state.settled(&f);
        f.resolve(FileOutcome::Retry(None));
    }

    /// Splits staged files where the schema changes and applies each segment in order.
    /// A held segment's files and every later file wait in the lane; a failed one returns
    /// its error with its own and every later file.
    async fn apply_segments(
        &mut self,
        batch_id: &str,
        ready: Vec<(PendingFile, StagedFile)>,
        tally: &mut Tally,
    ) -> Result<(), Failed> {
        let mut segments = split_segments(ready).into_iter();
        while let Some(segment) = segments.next() {
            match self.apply_segment(batch_id, segment, tally).await {
                SegmentOutcome::Done => {}
                SegmentOutcome::Waiting(files) => {
                    self.state.add_all(files);
                    self.state.add_all(segments.flatten().map(|(f, _)| f));
                    return Ok(());
                }
                SegmentOutcome::Failed(error, mut files) => {
                    files.extend(segments.flatten().map(|(f, _)| f));
                    return Err((error, files));
                }
            }
        }
        Ok(())
    }
}

/// Staged files in runs that share a schema (same columns and types). A segment's schema
/// is nullable wherever any of its files is.
fn split_segments(ready: Vec<(PendingFile, StagedFile)>) -> Vec<Vec<(PendingFile, StagedFile)>> {
    let mut segments: Vec<Vec<(PendingFile, StagedFile)>> = Vec::new();
    for item in ready {
        match segments.last_mut() {
            Some(seg) if seg[0].1.schema.table.same_shape(&item.1.schema.table) => {
                for (c, other) in seg[0]
                    .1
                    .schema
                    .table
                    .columns
                    .iter_mut()
                    .zip(&item.1.schema.table.columns)
                {
                    c.nullable |= other.nullable;
                }
                seg.push(item);
            }
            _ => segments.push(vec![item]),
        }
    }
    segments
}

/// Keys the ledger holds with a final verdict (applied, rejected, skipped): they leave the
/// listing's gaps.
fn gaps_done(applied: &std::collections::HashMap<String, LedgerRecord>) -> Vec<&str> {
    applied
        .iter()
        .filter(|(_, r)| r.status != LedgerStatus::Forgotten)
        .map(|(k, _)| k.as_str())
        .collect()
}
