//! Integration tests against a real LocalStack (S3, SQS, SNS) and a real DuckDB file.
//! Start LocalStack first: `deploy/localstack/start.sh` (scripts/test does it).

mod harness;
mod model;

mod alerts;
mod crash;
mod delivery;
mod end_to_end;
mod faults;
mod first_hour;
mod freshness;
mod history;
mod hostile;
mod keys;
mod lanes;
mod leases;
mod ops;
mod outage;
mod poison;
mod reload;
mod schema_matrix;
