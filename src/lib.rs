//! cdc-worker keeps an analytical warehouse (DuckDB, Firebolt) in sync with the Parquet
//! files AWS DMS writes to S3, driven by the bucket's notifications on an SQS queue.
//!
//! Data flow: [`queue`] receives notifications, [`event`] parses them, [`dms`] maps keys to
//! tables and DMS order, [`apply`] runs one lane per table that batches files, plans them
//! against the [`schema`] policy and has a [`warehouse`] apply them with a ledger entry per
//! file; [`alerts`] tells people what changed.

pub mod alerts;
pub mod apply;
pub mod aws;
pub mod batch;
pub mod commands;
pub mod config;
pub mod devkit;
pub mod dms;
pub mod event;
pub mod health;
pub mod keys;
pub mod lease;
pub mod preflight;
pub mod queue;
pub mod schema;
pub mod storage;
pub mod telemetry;
pub mod warehouse;
pub mod worker;
