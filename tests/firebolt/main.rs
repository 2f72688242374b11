//! Tests of the Firebolt warehouse that need no Firebolt: a protocol test server (a local
//! HTTP server answering as Firebolt's documented protocol does; it is not Firebolt), a
//! minimal S3 for footer range reads, and DuckDB running the Firebolt-dialect SQL where
//! the syntax is common. `core` runs the full path against a real Firebolt Core when
//! FIREBOLT_CORE_URL is set, and is skipped with a printed reason otherwise.

mod fbsql;
mod s3;
mod server;
mod support;

mod client;
mod core;
mod sdk;
mod semantics;
mod strict;
mod warehouse;
