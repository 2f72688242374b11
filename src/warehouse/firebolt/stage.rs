//! Staging for Firebolt: the worker reads only each file's Parquet footer, with S3 range
//! requests, to know the batch's schema and row counts before touching the warehouse.
//! The data itself is read by Firebolt's COPY, straight from S3.

use futures::StreamExt;

use crate::batch::{BatchFile, StageError, StagedFile};
use crate::schema::parquet::{ParquetError, Tail, decode_tail};
use crate::schema::types::{ColumnType, FileSchema};
use crate::storage::{ObjectStore, StorageError};

/// The first range read: most DMS footers fit, so one request per file.
pub const FOOTER_PROBE: u64 = 64 * 1024;
/// Footers read at once for one batch.
const FOOTER_CONCURRENCY: usize = 16;
/// A footer that asks for more bytes again after this many reads is corrupt.
const MAX_READS: usize = 3;

/// Why a Parquet TIME column is not loaded into Firebolt: the planner reports it as an
/// ignored column (the schema alert says so) and it never reaches a COPY.
pub const TIME_UNSUPPORTED: &str = "time (Firebolt has no TIME type and documents no Parquet TIME conversion; to load it, change its type to a string with a DMS transformation rule)";

/// Firebolt has no TIME type, and its docs give no Parquet mapping for TIME (only for
/// TIMESTAMP, TIMESTAMPTZ and BYTEA): a TIME column would load as whatever its physical
/// integer converts to (microseconds since midnight as text, at best). It is not loaded.
fn without_time(schema: &mut FileSchema) {
    for column in &mut schema.table.columns {
        if column.ty == ColumnType::Time {
            column.ty = ColumnType::Unsupported(TIME_UNSUPPORTED.into());
        }
    }
}

/// Reads the footers of a batch's files, in batch order.
pub async fn read_footers(
    store: &ObjectStore,
    files: Vec<BatchFile>,
    op_column: &str,
) -> Vec<Result<StagedFile, StageError>> {
    futures::stream::iter(files)
        .map(|file| read_footer(store, file, op_column))
        .buffered(FOOTER_CONCURRENCY)
        .collect()
        .await
}

/// One file's footer: a 64 KiB tail read, and one more read when the footer is longer.
pub async fn read_footer(
    store: &ObjectStore,
    file: BatchFile,
    op_column: &str,
) -> Result<StagedFile, StageError> {
    if file.size == 0 {
        // An empty object has no footer; a range request on it is an error at S3.
        return Err(StageError::Poison(ParquetError::Empty));
    }
    let mut want = FOOTER_PROBE.min(file.size.max(1));
    for _ in 0..MAX_READS {
        let tail = match store.get_tail(&file.bucket, &file.key, want).await {
            Ok(tail) => tail,
            Err(StorageError::NotFound { .. }) => return Err(StageError::Missing),
            Err(e) => return Err(StageError::Transient(e.to_string())),
        };
        // A tail shorter than asked for is the whole object, whatever the notification said.
        let object_size = if (tail.len() as u64) < want {
            tail.len() as u64
        } else {
            file.size.max(tail.len() as u64)
        };
        match decode_tail(&tail, object_size, op_column) {
            Ok(Tail::Decoded(mut schema)) => {
                without_time(&mut schema);
                return Ok(StagedFile {
                    file,
                    schema,
                    local_path: None,
                });
            }
            Ok(Tail::NeedBytes(n)) if n > want => want = n,
            Ok(Tail::NeedBytes(n)) => {
                return Err(StageError::Transient(format!(
                    "footer needs {n} bytes but a read of {want} did not hold it"
                )));
            }
            Err(e) => return Err(StageError::Poison(e)),
        }
    }
    Err(StageError::Transient(format!(
        "footer still incomplete after {MAX_READS} reads"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::types::{Column, TableSchema};

    /// Audit W2: a TIME column never reaches Firebolt; the planner reports it as ignored.
    #[test]
    fn time_columns_are_not_loaded_into_firebolt() {
        let mut schema = FileSchema {
            table: TableSchema::new(vec![
                Column::new("id", ColumnType::Int64),
                Column::new("at", ColumnType::Time),
            ]),
            op: Some("Op".into()),
            rows: 1,
            timestamp_max: vec![],
        };
        without_time(&mut schema);
        assert_eq!(schema.table.columns[0].ty, ColumnType::Int64);
        assert!(matches!(
            &schema.table.columns[1].ty,
            ColumnType::Unsupported(why) if why.contains("no TIME type")
        ));
    }
}
