//! Clients and warehouses pointed at the protocol test server, with short backoffs so
//! retry tests run in milliseconds.

use std::sync::Arc;
use std::time::Duration;

use cdc_worker::config::Secret;
use cdc_worker::warehouse::firebolt::Firebolt;
use cdc_worker::warehouse::firebolt::auth::Credentials;
use cdc_worker::warehouse::firebolt::client::{Backoff, Client, ClientConfig, Target};
use cdc_worker::warehouse::firebolt::sql::CopySource;

use crate::s3::store_at;
use crate::server::ProtocolServer;

pub const SECRET: &str = "svc-secret-do-not-print";

pub fn base_config(target: Target) -> ClientConfig {
    ClientConfig {
        target,
        database: "db".into(),
        max_concurrent_statements: 4,
        request_timeout: Duration::from_secs(5),
        max_retries: 3,
        backoff: Backoff {
            base: Duration::from_millis(5),
            max: Duration::from_millis(40),
        },
        max_retry_after: Duration::from_secs(5),
    }
}

pub fn cloud_config(server: &ProtocolServer) -> ClientConfig {
    base_config(Target::Cloud {
        api_url: server.url.clone(),
        account: "acme".into(),
        engine: "etl".into(),
        credentials: Credentials {
            auth_url: server.url.clone(),
            client_id: "svc-id".into(),
            client_secret: Secret::new(SECRET),
        },
    })
}

pub fn core_config(server: &ProtocolServer) -> ClientConfig {
    base_config(Target::Core {
        url: server.url.clone(),
    })
}

pub fn client(config: ClientConfig) -> Arc<Client> {
    Arc::new(Client::new(config).expect("client"))
}

/// A Firebolt warehouse on the protocol test server (Core mode), S3 nowhere (these
/// tests hand `apply` files that were staged already).
pub fn warehouse(server: &ProtocolServer) -> Firebolt {
    warehouse_with(core_config(server), CopySource::Direct(None))
}

pub fn warehouse_with(config: ClientConfig, source: CopySource) -> Firebolt {
    Firebolt::with_client(
        client(config),
        "public",
        "Op",
        store_at("http://127.0.0.1:9"),
        source,
    )
}
