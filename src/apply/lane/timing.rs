//! What a commit tells about time: how long each file's stages took on its way to the
//! commit (`cdc_worker_stage_seconds`; the last stage, commit to delete, is the queue
//! tracker's), and the newest change the commit applied, for the table's freshness.

use std::time::{Instant, SystemTime};

use super::Lane;
use crate::apply::context::PendingFile;
use crate::batch::StagedFile;
use crate::telemetry::{Stage, record_stage};

impl Lane {
    /// After a segment committed: its files' stages, then the table's freshness (and an
    /// alert when the commit breaks or meets the objective again).
    pub(super) async fn record_commit(&mut self, files: &[PendingFile], staged: &[StagedFile]) {
        let committed = Instant::now();
        let batch_started = self.batch_started.unwrap_or(committed);
        for f in files {
            record_stages(f, batch_started, committed);
        }
        let ordering = self.ctx.config.ordering_column(&self.table);
        let newest = files
            .iter()
            .zip(staged)
            .filter_map(|(f, s)| change_time(f, s, ordering.as_deref()))
            .max();
        let Some(newest) = newest else {
            return;
        };
        let objective = self.ctx.config.freshness_objective(&self.table);
        let verdict = self
            .ctx
            .freshness
            .applied(&self.table, newest, SystemTime::now(), objective);
        if let Some(verdict) = verdict {
            self.ctx.alerts.publish(&verdict.alert()).await;
        }
    }
}

/// One committed file's stages: those its message's times allow (a file found in the S3
/// listing has no message, so only its batch).
fn record_stages(f: &PendingFile, batch_started: Instant, committed: Instant) {
    let between = |from: Option<SystemTime>, to: Option<SystemTime>| {
        // Clocks of S3 and SQS differ by a little: a negative stage counts as zero.
        Some(to?.duration_since(from?).unwrap_or_default())
    };
    if let Some(times) = f.messages.first().map(|m| m.times()) {
        // A copy's SentTimestamp is when the worker re-sent it, not when S3 notified.
        if let Some(d) = between(f.event_time, times.sent.filter(|_| !times.copy)) {
            record_stage(Stage::S3ToSqs, d);
        }
        if let Some(d) = between(times.sent, times.first_receive) {
            record_stage(Stage::SqsToReceive, d);
        }
        record_stage(
            Stage::ReceiveToBatch,
            batch_started.saturating_duration_since(times.received),
        );
    }
    record_stage(
        Stage::BatchToCommit,
        committed.saturating_duration_since(batch_started),
    );
}

/// The time of the newest change a committed file holds: the ordering column's largest
/// value when it is a timestamp (the Parquet statistics say), else the DMS time in a CDC
/// file's name, else (a full-load file) its upload time, when its notification said.
pub(crate) fn change_time(
    f: &PendingFile,
    staged: &StagedFile,
    ordering: Option<&str>,
) -> Option<SystemTime> {
    ordering
        .and_then(|column| staged.schema.newest_timestamp(column))
        .or_else(|| f.dms.cdc_time())
        .or(f.event_time)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::batch::BatchFile;
    use crate::dms::{KeyClass, classify_key};
    use crate::schema::types::{FileSchema, TableSchema};

    fn file(name: &str, timestamps: Vec<(String, SystemTime)>) -> (PendingFile, StagedFile) {
        let key = format!("dms/public/t/{name}");
        let Ok(KeyClass::Dms(dms)) = classify_key("dms", &key) else {
            panic!("{key} is a DMS key");
        };
        let batch_file = BatchFile {
            bucket: "b".into(),
            key,
            size: 1,
            etag: "e".into(),
            order_key: dms.order().sort_key(),
            full_load: dms.is_load(),
        };
        let staged = StagedFile {
            file: batch_file.clone(),
            schema: FileSchema {
                table: TableSchema::default(),
                op: Some("Op".into()),
                rows: 1,
                timestamp_max: timestamps,
            },
            local_path: None,
        };
        (
            PendingFile::listed("t", dms.source.clone(), dms, batch_file),
            staged,
        )
    }

    fn utc(text: &str) -> SystemTime {
        chrono::DateTime::parse_from_rfc3339(text).unwrap().into()
    }

    #[test]
    fn the_newest_change_comes_from_the_ordering_column_else_the_name_else_the_upload() {
        let name_time = utc("2026-11-24T10:15:00.123Z");
        let column_time = utc("2026-11-24T10:14:59Z");
        let (cdc, staged) = file(
            "20261124-101500123.parquet",
            vec![("ts".into(), column_time)],
        );
        assert_eq!(change_time(&cdc, &staged, Some("ts")), Some(column_time));
        assert_eq!(change_time(&cdc, &staged, None), Some(name_time));
        assert_eq!(
            change_time(&cdc, &staged, Some("AR_H_CHANGE_SEQ")),
            Some(name_time),
            "an ordering column that is not a timestamp"
        );
        let (mut load, staged) = file("LOAD00000001.parquet", vec![]);
        assert_eq!(
            change_time(&load, &staged, None),
            None,
            "listed: no upload time"
        );
        let uploaded = name_time + Duration::from_secs(60);
        load.event_time = Some(uploaded);
        assert_eq!(change_time(&load, &staged, None), Some(uploaded));
    }
}
