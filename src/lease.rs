//! Per-table leases in S3, so that several worker tasks never apply one table at once.
//!
//! A lease is a small JSON object `<metadata prefix>/leases/<table>.json` written with S3
//! conditional writes: `If-None-Match: *` to take a table nobody ever leased, `If-Match:
//! <etag>` to renew, release or take over an expired lease. Every take-over increments a
//! fencing token; the warehouse commit checks that no higher token has committed the table
//! (see `warehouse::FENCE_TABLE`), so a worker that lost its lease (paused, partitioned)
//! cannot commit over a newer holder.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::batch::Fence;
use crate::schema::store::key_segment;
use crate::storage::{ObjectStore, StorageError, WriteCondition};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseDocument {
    pub table: String,
    pub holder: String,
    pub token: u64,
    /// Milliseconds since the Unix epoch.
    pub expires_at_ms: u64,
    pub released: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("lease object {0} is not a lease document: {1}")]
    Corrupt(String, String),
}

/// Lease events, for logs and metrics.
fn lease_event(table: &str, event: &'static str) {
    metrics::counter!("cdc_worker_lease_events_total", "event" => event).increment(1);
    tracing::debug!(table, event, "lease");
}

#[derive(Debug, Clone)]
struct Held {
    etag: String,
    token: u64,
}

#[derive(Clone)]
pub struct LeaseManager {
    inner: Arc<Inner>,
}

struct Inner {
    store: ObjectStore,
    bucket: String,
    prefix: String,
    ttl: Duration,
    holder: String,
    held: Mutex<HashMap<String, Held>>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

impl LeaseManager {
    /// The leases `config` describes, held under this process's worker id.
    pub fn from_config(config: &crate::config::Config, store: ObjectStore) -> Self {
        Self::new(
            store,
            config.metadata_bucket(),
            &config.metadata.prefix,
            config.lease.ttl,
            crate::telemetry::worker_id(),
        )
    }

    pub fn new(
        store: ObjectStore,
        bucket: &str,
        prefix: &str,
        ttl: Duration,
        holder: &str,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                bucket: bucket.to_string(),
                prefix: prefix.trim_end_matches('/').to_string(),
                ttl,
                holder: holder.to_string(),
                held: Mutex::new(HashMap::new()),
            }),
        }
    }

    pub fn holder(&self) -> &str {
        &self.inner.holder
    }

    fn key(&self, table: &str) -> String {
        format!("{}/leases/{}.json", self.inner.prefix, key_segment(table))
    }

    /// Reads the lease of a table as it is now.
    pub async fn read(&self, table: &str) -> Result<Option<(LeaseDocument, String)>, LeaseError> {
        let key = self.key(table);
        let Some(object) = self.inner.store.get(&self.inner.bucket, &key).await? else {
            return Ok(None);
        };
        let doc: LeaseDocument = serde_json::from_slice(&object.body)
            .map_err(|e| LeaseError::Corrupt(key.clone(), e.to_string()))?;
        Ok(Some((doc, object.etag)))
    }

    async fn write(
        &self,
        table: &str,
        doc: &LeaseDocument,
        condition: WriteCondition,
    ) -> Result<Option<String>, LeaseError> {
        let body = Bytes::from(serde_json::to_vec(doc).expect("serializable"));
        match self
            .inner
            .store
            .put(
                &self.inner.bucket,
                &self.key(table),
                body,
                "application/json",
                condition,
            )
            .await
        {
            Ok(etag) => Ok(Some(etag)),
            Err(StorageError::PreconditionFailed { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Takes (or renews) the lease of `table`. `Ok(None)`: another worker holds it.
    pub async fn acquire(&self, table: &str) -> Result<Option<Fence>, LeaseError> {
        let expires_at_ms = now_ms() + self.inner.ttl.as_millis() as u64;
        let current = self.read(table).await?;
        let (token, condition) = match &current {
            None => (1, WriteCondition::Absent),
            Some((doc, etag)) => {
                let mine = doc.holder == self.inner.holder && !doc.released;
                let free = doc.released || doc.expires_at_ms <= now_ms();
                if mine {
                    (doc.token, WriteCondition::Matches(etag.clone()))
                } else if free {
                    (doc.token + 1, WriteCondition::Matches(etag.clone()))
                } else {
                    lease_event(table, "busy");
                    return Ok(None);
                }
            }
        };
        let doc = LeaseDocument {
            table: table.to_string(),
            holder: self.inner.holder.clone(),
            token,
            expires_at_ms,
            released: false,
        };
        match self.write(table, &doc, condition).await? {
            Some(etag) => {
                let taken_over = current
                    .as_ref()
                    .is_some_and(|(d, _)| d.holder != self.inner.holder && !d.released);
                lease_event(table, if taken_over { "taken_over" } else { "acquired" });
                self.inner
                    .held
                    .lock()
                    .expect("lease map")
                    .insert(table.to_string(), Held { etag, token });
                Ok(Some(Fence {
                    token,
                    holder: self.inner.holder.clone(),
                }))
            }
            None => {
                lease_event(table, "lost_race");
                Ok(None)
            }
        }
    }

    /// Extends the lease now; false when it was lost.
    pub async fn renew(&self, table: &str) -> Result<bool, LeaseError> {
        let Some(held) = self
            .inner
            .held
            .lock()
            .expect("lease map")
            .get(table)
            .cloned()
        else {
            return Ok(false);
        };
        let doc = LeaseDocument {
            table: table.to_string(),
            holder: self.inner.holder.clone(),
            token: held.token,
            expires_at_ms: now_ms() + self.inner.ttl.as_millis() as u64,
            released: false,
        };
        match self
            .write(table, &doc, WriteCondition::Matches(held.etag))
            .await?
        {
            Some(etag) => {
                lease_event(table, "renewed");
                if let Some(h) = self.inner.held.lock().expect("lease map").get_mut(table) {
                    h.etag = etag;
                }
                Ok(true)
            }
            None => {
                lease_event(table, "lost");
                self.inner.held.lock().expect("lease map").remove(table);
                Ok(false)
            }
        }
    }

    /// Renews the lease every third of its TTL until the renewal is stopped or dropped.
    pub fn keep_alive(&self, table: &str) -> Renewal {
        let token = CancellationToken::new();
        let this = self.clone();
        let table = table.to_string();
        let stop = token.clone();
        let every = (self.inner.ttl / 3).max(Duration::from_millis(500));
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(every) => {}
                }
                match this.renew(&table).await {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::warn!(
                            table,
                            "lease lost while applying; the commit will be fenced if another worker took over"
                        );
                        return;
                    }
                    Err(e) => tracing::warn!(table, error = %e, "could not renew lease"),
                }
            }
        });
        Renewal {
            _guard: token.drop_guard(),
            task,
        }
    }

    /// Gives the lease up so another worker can take it at once (keeps the token).
    pub async fn release(&self, table: &str) {
        let Some(held) = self.inner.held.lock().expect("lease map").remove(table) else {
            return;
        };
        let doc = LeaseDocument {
            table: table.to_string(),
            holder: self.inner.holder.clone(),
            token: held.token,
            expires_at_ms: now_ms(),
            released: true,
        };
        match self
            .write(table, &doc, WriteCondition::Matches(held.etag))
            .await
        {
            Ok(Some(_)) => lease_event(table, "released"),
            Ok(None) => lease_event(table, "lost"),
            Err(e) => {
                tracing::warn!(table, error = %e, "could not release lease; it expires on its own")
            }
        }
    }
}

/// A lease being renewed in the background. Dropping it stops further renewals; [`Renewal::stop`]
/// also waits for one already in flight, so a release that follows cannot race it (a
/// renewal landing after the release would revive the lease until its TTL).
pub struct Renewal {
    _guard: DropGuard,
    task: tokio::task::JoinHandle<()>,
}

impl Renewal {
    pub async fn stop(self) {
        let Renewal { _guard, task } = self;
        drop(_guard);
        let _ = task.await;
    }
}
