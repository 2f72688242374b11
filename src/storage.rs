//! S3 objects: the few operations the worker needs (read, tail read, conditional write,
//! streamed download, listing), with errors a caller can act on.

use std::path::Path;

use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use bytes::Bytes;
use tokio::io::AsyncWriteExt;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("s3://{bucket}/{key} does not exist")]
    NotFound { bucket: String, key: String },
    /// A conditional write lost: someone else wrote the object first.
    #[error("s3://{bucket}/{key} was changed by another writer")]
    PreconditionFailed { bucket: String, key: String },
    #[error("access to s3://{bucket}/{key} denied: {message}")]
    AccessDenied {
        bucket: String,
        key: String,
        message: String,
    },
    #[error("s3://{bucket}/{key}: {message}")]
    Other {
        bucket: String,
        key: String,
        message: String,
    },
}

impl StorageError {
    fn from_sdk<E>(bucket: &str, key: &str, e: SdkError<E, HttpResponse>) -> Self
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        // HEAD and ranged GETs can answer 404/412 without an error body: use the status too.
        let status = e.raw_response().map(|r| r.status().as_u16());
        let (bucket, key) = (bucket.to_string(), key.to_string());
        match (e.code(), status) {
            (Some("NoSuchKey" | "NotFound" | "NoSuchBucket"), _) | (_, Some(404)) => {
                Self::NotFound { bucket, key }
            }
            (Some("PreconditionFailed" | "ConditionalRequestConflict"), _) | (_, Some(412)) => {
                Self::PreconditionFailed { bucket, key }
            }
            (Some("AccessDenied" | "Forbidden"), _) | (_, Some(403)) => Self::AccessDenied {
                bucket,
                key,
                message: crate::aws::explain(&e).to_string(),
            },
            _ => Self::Other {
                bucket,
                key,
                message: crate::aws::explain(&e).to_string(),
            },
        }
    }

    pub fn is_not_found(&self) -> bool {
        matches!(self, StorageError::NotFound { .. })
    }
}

/// How a write is conditioned (S3 conditional writes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteCondition {
    Unconditional,
    /// Only if the key does not exist (`If-None-Match: *`).
    Absent,
    /// Only if the object still has this ETag (`If-Match`).
    Matches(String),
}

/// An object read whole, with its ETag for a later conditional write.
#[derive(Debug, Clone)]
pub struct Object {
    pub body: Bytes,
    pub etag: String,
}

/// One entry of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedObject {
    pub key: String,
    pub size: u64,
    pub etag: String,
    /// When the object was written (S3 keeps whole seconds).
    pub last_modified: Option<std::time::SystemTime>,
}

#[derive(Clone, Debug)]
pub struct ObjectStore {
    client: aws_sdk_s3::Client,
}

impl ObjectStore {
    pub fn new(client: aws_sdk_s3::Client) -> Self {
        Self { client }
    }

    pub fn client(&self) -> &aws_sdk_s3::Client {
        &self.client
    }

    /// Reads an object; `Ok(None)` when it does not exist.
    pub async fn get(&self, bucket: &str, key: &str) -> Result<Option<Object>, StorageError> {
        let out = match self
            .client
            .get_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
        {
            Ok(out) => out,
            Err(e) => {
                let e = StorageError::from_sdk(bucket, key, e);
                return if e.is_not_found() { Ok(None) } else { Err(e) };
            }
        };
        let etag = out.e_tag().unwrap_or_default().to_string();
        let body = out
            .body
            .collect()
            .await
            .map_err(|e| StorageError::Other {
                bucket: bucket.into(),
                key: key.into(),
                message: format!("reading body: {e}"),
            })?
            .into_bytes();
        Ok(Some(Object { body, etag }))
    }

    /// An object's current ETag (without quotes); `Ok(None)` when it does not exist.
    pub async fn current_etag(
        &self,
        bucket: &str,
        key: &str,
    ) -> Result<Option<String>, StorageError> {
        match self
            .client
            .head_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
        {
            Ok(out) => Ok(Some(bare_etag(out.e_tag().unwrap_or_default()).to_string())),
            Err(e) => {
                let e = StorageError::from_sdk(bucket, key, e);
                if e.is_not_found() { Ok(None) } else { Err(e) }
            }
        }
    }

    /// The last `len` bytes of an object (all of it when shorter).
    pub async fn get_tail(&self, bucket: &str, key: &str, len: u64) -> Result<Bytes, StorageError> {
        let out = self
            .client
            .get_object()
            .bucket(bucket)
            .key(key)
            .range(format!("bytes=-{len}"))
            .send()
            .await
            .map_err(|e| StorageError::from_sdk(bucket, key, e))?;
        out.body
            .collect()
            .await
            .map(|b| b.into_bytes())
            .map_err(|e| StorageError::Other {
                bucket: bucket.into(),
                key: key.into(),
                message: format!("reading body: {e}"),
            })
    }

    /// Writes an object under a condition; returns the new ETag.
    pub async fn put(
        &self,
        bucket: &str,
        key: &str,
        body: Bytes,
        content_type: &str,
        condition: WriteCondition,
    ) -> Result<String, StorageError> {
        let mut request = self
            .client
            .put_object()
            .bucket(bucket)
            .key(key)
            .content_type(content_type)
            .body(ByteStream::from(body));
        request = match condition {
            WriteCondition::Unconditional => request,
            WriteCondition::Absent => request.if_none_match("*"),
            WriteCondition::Matches(etag) => request.if_match(etag),
        };
        let out = request
            .send()
            .await
            .map_err(|e| StorageError::from_sdk(bucket, key, e))?;
        Ok(out.e_tag().unwrap_or_default().to_string())
    }

    /// Streams an object to a local file; returns the bytes written and the ETag read.
    pub async fn download(
        &self,
        bucket: &str,
        key: &str,
        to: &Path,
    ) -> Result<(u64, String), StorageError> {
        let other = |message: String| StorageError::Other {
            bucket: bucket.into(),
            key: key.into(),
            message,
        };
        let out = self
            .client
            .get_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| StorageError::from_sdk(bucket, key, e))?;
        let etag = out.e_tag().unwrap_or_default().to_string();
        let mut file = tokio::fs::File::create(to)
            .await
            .map_err(|e| other(format!("creating {}: {e}", to.display())))?;
        let mut body = out.body;
        let mut written = 0u64;
        while let Some(chunk) = body
            .try_next()
            .await
            .map_err(|e| other(format!("reading body: {e}")))?
        {
            written += chunk.len() as u64;
            file.write_all(&chunk)
                .await
                .map_err(|e| other(format!("writing {}: {e}", to.display())))?;
        }
        file.flush()
            .await
            .map_err(|e| other(format!("writing {}: {e}", to.display())))?;
        Ok((written, etag))
    }

    /// Every object under `prefix`, in key order, starting after `start_after`.
    pub async fn list(
        &self,
        bucket: &str,
        prefix: &str,
        start_after: Option<&str>,
    ) -> Result<Vec<ListedObject>, StorageError> {
        let mut objects = Vec::new();
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(bucket)
            .prefix(prefix)
            .set_start_after(start_after.map(str::to_string))
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| StorageError::from_sdk(bucket, prefix, e))?;
            for o in page.contents() {
                objects.push(ListedObject {
                    key: o.key().unwrap_or_default().to_string(),
                    size: o.size().unwrap_or(0).max(0) as u64,
                    etag: o.e_tag().unwrap_or_default().to_string(),
                    last_modified: o
                        .last_modified()
                        .and_then(|t| std::time::SystemTime::try_from(*t).ok()),
                });
            }
        }
        Ok(objects)
    }

    pub async fn delete(&self, bucket: &str, key: &str) -> Result<(), StorageError> {
        self.client
            .delete_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| StorageError::from_sdk(bucket, key, e))?;
        Ok(())
    }
}

/// ETags as S3 returns them carry quotes; notifications carry them bare. Compare bare.
pub fn bare_etag(etag: &str) -> &str {
    etag.trim_matches('"')
}
