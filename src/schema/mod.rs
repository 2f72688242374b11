//! Source schemas: the type system, reading Parquet footers, comparing schemas, the
//! evolution policies, and the schema history kept in S3.

pub mod dialect;
pub mod diff;
pub mod parquet;
pub mod policy;
pub mod store;
pub mod types;
