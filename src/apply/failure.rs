//! Why a batch could not be applied, with the context of the stage that failed, and what
//! the lane does about it: its [`Disposition`]. An outage is not a poison file: only a file
//! whose own data is refused goes back to the queue (and from there, after its receives, to
//! the dead-letter queue); everything else keeps the table's files in the lane until it
//! passes.

use crate::keys::KeyError;
use crate::lease::LeaseError;
use crate::schema::store::SchemaStoreError;
use crate::storage::StorageError;
use crate::warehouse::WarehouseError;

/// What the lane does with a failed batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// The file's data is refused: retrying cannot help. The file goes back to the queue with
    /// backoff and reaches the dead-letter queue after its receives; the table waits behind it.
    Poison,
    /// The warehouse, S3, the disk or the network failed, or the table's setup is broken (a
    /// key document that cannot be read): the files stay in the lane and are retried with a
    /// capped backoff until it passes, however long that takes.
    Transient,
    /// Another worker holds the table: try again shortly, it is not a failure.
    Fenced,
}

impl Disposition {
    /// The metric label and log field.
    pub fn label(self) -> &'static str {
        match self {
            Disposition::Poison => "poison",
            Disposition::Transient => "transient",
            Disposition::Fenced => "fenced",
        }
    }
}

/// A failed stage of a batch.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("{stage}: {source}")]
    Warehouse {
        stage: &'static str,
        #[source]
        source: WarehouseError,
    },
    #[error("reading the table's schema history: {0}")]
    SchemaHistory(#[from] SchemaStoreError),
    #[error("resolving the table's key: {0}")]
    Key(#[from] KeyError),
    #[error("taking the table's lease: {0}")]
    Lease(#[from] LeaseError),
    #[error("listing the table's files: {0}")]
    Listing(#[source] StorageError),
    /// A file could not be made readable (download, disk): its message says which.
    #[error("staging {key}: {message}")]
    Staging { key: String, message: String },
}

impl ApplyError {
    /// A warehouse call of `stage` ("ledger", "describe", "apply", ...) failed.
    pub fn warehouse(stage: &'static str) -> impl FnOnce(WarehouseError) -> Self {
        move |source| ApplyError::Warehouse { stage, source }
    }

    pub fn disposition(&self) -> Disposition {
        match self {
            ApplyError::Warehouse {
                source: WarehouseError::Data(_),
                ..
            } => Disposition::Poison,
            ApplyError::Warehouse {
                source: WarehouseError::Fenced(_),
                ..
            } => Disposition::Fenced,
            _ => Disposition::Transient,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_refused_data_is_poison_and_only_a_fence_is_not_a_failure() {
        let wh = |e| ApplyError::warehouse("apply")(e);
        assert_eq!(
            wh(WarehouseError::Data("Constraint Error".into())).disposition(),
            Disposition::Poison
        );
        assert_eq!(
            wh(WarehouseError::Fenced("token 3".into())).disposition(),
            Disposition::Fenced
        );
        for outage in [
            WarehouseError::Unavailable("engine stopped".into()),
            WarehouseError::Conflict("detected 2 conflicts".into()),
            WarehouseError::Auth("401".into()),
            WarehouseError::Sql("Catalog Error: table t does not exist".into()),
            WarehouseError::Other("DuckDB task failed".into()),
        ] {
            assert_eq!(wh(outage).disposition(), Disposition::Transient);
        }
        let disk = ApplyError::Staging {
            key: "dms/a/b/x.parquet".into(),
            message: "No space left on device".into(),
        };
        assert_eq!(disk.disposition(), Disposition::Transient);
        assert!(disk.to_string().contains("No space left on device"));
    }
}
