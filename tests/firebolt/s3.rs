//! A minimal S3 stand-in for the footer reads: path-style `GET /bucket/key`, honouring
//! `Range: bytes=-N` (the only range form the worker sends), recording each request so a
//! test can assert that only tails were read.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use cdc_worker::storage::ObjectStore;

#[derive(Debug, Clone)]
pub struct S3Request {
    pub method: String,
    pub path: String,
    pub range: Option<String>,
}

#[derive(Default)]
struct State {
    objects: HashMap<String, Vec<u8>>,
    seen: Vec<S3Request>,
}

pub struct FakeS3 {
    pub url: String,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeS3 {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeS3 {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State::default()));
        let app_state = state.clone();
        let app = axum::Router::new().fallback(
            move |method: Method, uri: Uri, headers: HeaderMap, _body: Bytes| {
                let state = app_state.clone();
                async move { handle(&state, method, uri, headers) }
            },
        );
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        FakeS3 { url, state, task }
    }

    pub fn put(&self, bucket: &str, key: &str, body: Vec<u8>) {
        self.state
            .lock()
            .unwrap()
            .objects
            .insert(format!("/{bucket}/{key}"), body);
    }

    pub fn requests(&self) -> Vec<S3Request> {
        self.state.lock().unwrap().seen.clone()
    }

    pub fn store(&self) -> ObjectStore {
        store_at(&self.url)
    }
}

/// An S3 client for an endpoint (nothing is contacted until used).
pub fn store_at(url: &str) -> ObjectStore {
    use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
    let conf = aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .endpoint_url(url)
        .force_path_style(true)
        .credentials_provider(Credentials::new("test", "test", None, None, "test"))
        .build();
    ObjectStore::new(aws_sdk_s3::Client::from_conf(conf))
}

fn handle(state: &Mutex<State>, method: Method, uri: Uri, headers: HeaderMap) -> Response {
    let path = percent_encoding::percent_decode_str(uri.path())
        .decode_utf8_lossy()
        .into_owned();
    let range = headers
        .get("range")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let mut state = state.lock().unwrap();
    state.seen.push(S3Request {
        method: method.to_string(),
        path: path.clone(),
        range: range.clone(),
    });
    let Some(body) = state.objects.get(&path).cloned() else {
        let xml = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>NoSuchKey</Code><Message>The specified key does not exist.</Message></Error>";
        return (
            StatusCode::NOT_FOUND,
            [("content-type", "application/xml")],
            xml,
        )
            .into_response();
    };
    let total = body.len();
    let etag = format!("\"etag-{total}\"");
    match range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes=-"))
        .and_then(|n| n.parse::<usize>().ok())
    {
        Some(n) => {
            let start = total.saturating_sub(n);
            let end = total.saturating_sub(1);
            (
                StatusCode::PARTIAL_CONTENT,
                [
                    ("content-range", format!("bytes {start}-{end}/{total}")),
                    ("etag", etag),
                    ("content-type", "application/octet-stream".to_string()),
                ],
                body[start..].to_vec(),
            )
                .into_response()
        }
        None => (StatusCode::OK, [("etag", etag)], body).into_response(),
    }
}
