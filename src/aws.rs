//! AWS clients built from `[aws]`: one shared SDK configuration, with the endpoint override
//! and path-style addressing LocalStack needs; and AWS errors told in a user's words.
//!
//! The SDK's own error text is a `Debug` dump of nested structs (`DispatchFailure {
//! source: ConnectorError { .. } }`) that says neither what was called nor what to change.
//! [`explain`] turns an error into one line: the cause, and a hint naming the setting
//! that fixes it (region, credentials, endpoint, the resource's name, permissions).

use std::error::Error as StdError;
use std::fmt;

use aws_config::{BehaviorVersion, Region};
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::{Credentials, ProvideCredentials, SharedCredentialsProvider};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};

use crate::config::AwsConfig;

/// The three clients the worker uses, cheap to clone.
#[derive(Clone, Debug)]
pub struct AwsClients {
    pub s3: aws_sdk_s3::Client,
    pub sqs: aws_sdk_sqs::Client,
    pub sns: aws_sdk_sns::Client,
    /// The region the SDK resolved (config, environment, profile or instance metadata).
    pub region: Option<String>,
    credentials: Option<SharedCredentialsProvider>,
}

impl AwsClients {
    pub async fn new(config: &AwsConfig) -> Self {
        let mut loader = aws_config::defaults(BehaviorVersion::latest());
        if let Some(region) = config.region.as_deref().filter(|r| !r.is_empty()) {
            loader = loader.region(Region::new(region.to_string()));
        }
        if let Some(endpoint) = config.endpoint_url.as_deref().filter(|e| !e.is_empty()) {
            loader = loader.endpoint_url(endpoint);
        }
        if let (Some(id), Some(secret)) = (&config.access_key_id, &config.secret_access_key) {
            loader = loader.credentials_provider(Credentials::new(
                id,
                secret.expose(),
                config
                    .session_token
                    .as_ref()
                    .map(|t| t.expose().to_string()),
                None,
                "cdc-worker-config",
            ));
        }
        let shared = loader.load().await;
        let s3_config = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(config.force_path_style)
            .build();
        Self {
            s3: aws_sdk_s3::Client::from_conf(s3_config),
            sqs: aws_sdk_sqs::Client::new(&shared),
            sns: aws_sdk_sns::Client::new(&shared),
            region: shared.region().map(|r| r.to_string()),
            credentials: shared.credentials_provider(),
        }
    }

    /// Whether a region and credentials are at hand, before any call needs them: the
    /// error names what is missing and where to set it.
    pub async fn check_setup(&self) -> Result<String, AwsFailure> {
        let Some(region) = &self.region else {
            return Err(AwsFailure::new(FailureKind::NoRegion, String::new()));
        };
        let Some(provider) = &self.credentials else {
            return Err(AwsFailure::new(FailureKind::NoCredentials, String::new()));
        };
        match provider.provide_credentials().await {
            Ok(c) => Ok(format!(
                "region {region}, credentials from {}",
                credential_source(&c)
            )),
            Err(e) => Err(AwsFailure::new(
                FailureKind::NoCredentials,
                innermost(&e).to_string(),
            )),
        }
    }
}

/// Where credentials came from, without any part of them.
fn credential_source(c: &Credentials) -> &'static str {
    // The provider names itself in the credentials' Debug text only; the access key is
    // printed there too, so only a fixed vocabulary is looked for.
    let debug = format!("{c:?}");
    for (needle, name) in [
        ("cdc-worker-config", "the config (aws.access_key_id)"),
        ("Environment", "the environment (AWS_ACCESS_KEY_ID)"),
        ("ProfileFile", "the AWS profile"),
        ("Profile", "the AWS profile"),
        ("WebIdentityToken", "a web identity token"),
        ("EcsContainer", "the ECS task role"),
        ("Ec2InstanceMetadata", "the EC2 instance profile"),
        ("Sso", "AWS SSO"),
    ] {
        if debug.contains(needle) {
            return name;
        }
    }
    "the SDK's default chain"
}

/// What kind of failure an AWS call met: what a caller acts on, and what the hint says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// No region configured anywhere.
    NoRegion,
    /// No credentials found (or the provider failed).
    NoCredentials,
    /// Credentials were sent and refused (unknown key, bad signature, expired token).
    CredentialsRefused,
    /// The queue, bucket, topic or key does not exist.
    NotFound,
    /// The credentials lack a permission.
    AccessDenied,
    /// The endpoint could not be reached (DNS, refused connection, TLS).
    Unreachable,
    /// The call timed out.
    Timeout,
    /// Anything else the service answered.
    Other,
}

/// An AWS call's failure in one line: the cause and what to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.text())]
pub struct AwsFailure {
    pub kind: FailureKind,
    /// What the service or the SDK said, shortened to its innermost cause.
    pub detail: String,
}

impl AwsFailure {
    fn new(kind: FailureKind, detail: String) -> Self {
        Self { kind, detail }
    }

    fn text(&self) -> String {
        let d = &self.detail;
        let colon = if d.is_empty() {
            String::new()
        } else {
            format!(": {d}")
        };
        let paren = if d.is_empty() {
            String::new()
        } else {
            format!(" ({d})")
        };
        match self.kind {
            FailureKind::NoRegion => format!(
                "no AWS region is configured{colon}; set aws.region in the config (or AWS_REGION), and credentials if not done yet"
            ),
            FailureKind::NoCredentials => format!(
                "no AWS credentials found{paren}; set aws.access_key_id and aws.secret_access_key in the config, or AWS_PROFILE or AWS_ACCESS_KEY_ID, or run with an IAM role (ECS task role); check aws.region too"
            ),
            FailureKind::CredentialsRefused => format!(
                "the credentials were refused{colon}; check aws.access_key_id / aws.secret_access_key (or the profile), and aws.endpoint_url when using LocalStack"
            ),
            FailureKind::NotFound => {
                format!("does not exist{paren}; check the name in the config and aws.region")
            }
            FailureKind::AccessDenied => format!(
                "access denied{colon}; the credentials in use lack a permission (deploy/cloudformation lists what the worker needs)"
            ),
            FailureKind::Unreachable => format!(
                "cannot connect{colon}; check aws.endpoint_url (LocalStack: http://127.0.0.1:4566), aws.region and the network"
            ),
            FailureKind::Timeout => {
                format!("timed out{colon}; check the network and aws.endpoint_url")
            }
            FailureKind::Other => d.clone(),
        }
    }
}

/// Explains an SDK error (any service's): see [`AwsFailure`].
pub fn explain<E>(err: &SdkError<E, HttpResponse>) -> AwsFailure
where
    E: ProvideErrorMetadata + StdError + 'static,
{
    match err {
        SdkError::ServiceError(_) | SdkError::ResponseError(_) => {
            let status = err.raw_response().map(|r| r.status().as_u16());
            service_failure(err.code(), err.message(), status)
        }
        SdkError::TimeoutError(_) => AwsFailure::new(FailureKind::Timeout, chain_text(err)),
        SdkError::DispatchFailure(d) => {
            let text = chain_text(err);
            if let Some(kind) = setup_kind(&text) {
                return AwsFailure::new(kind, innermost(err).to_string());
            }
            let kind = match d.as_connector_error() {
                Some(c) if c.is_timeout() => FailureKind::Timeout,
                Some(c) if c.is_io() => FailureKind::Unreachable,
                _ => FailureKind::Other,
            };
            AwsFailure::new(kind, innermost(err).to_string())
        }
        _ => {
            let text = chain_text(err);
            let kind = setup_kind(&text).unwrap_or(FailureKind::Other);
            AwsFailure::new(kind, innermost(err).to_string())
        }
    }
}

/// A failure the service answered, by its error code (or the HTTP status of a HEAD).
pub fn service_failure(
    code: Option<&str>,
    message: Option<&str>,
    status: Option<u16>,
) -> AwsFailure {
    let said = match (code, message) {
        (Some(c), Some(m)) if !m.is_empty() => format!("{c}: {m}"),
        (Some(c), _) => c.to_string(),
        (None, Some(m)) => m.to_string(),
        (None, None) => status.map(|s| format!("HTTP {s}")).unwrap_or_default(),
    };
    let kind = match (code, status) {
        (
            Some(
                "AWS.SimpleQueueService.NonExistentQueue"
                | "QueueDoesNotExist"
                | "NoSuchBucket"
                | "NoSuchKey"
                | "NotFound"
                | "ResourceNotFoundException",
            ),
            _,
        )
        | (None, Some(404)) => FailureKind::NotFound,
        (
            Some(
                "InvalidClientTokenId"
                | "UnrecognizedClientException"
                | "SignatureDoesNotMatch"
                | "InvalidAccessKeyId"
                | "ExpiredToken"
                | "InvalidSecurity"
                | "IncompleteSignature",
            ),
            _,
        ) => FailureKind::CredentialsRefused,
        (
            Some(
                "AccessDenied"
                | "AccessDeniedException"
                | "AuthorizationError"
                | "Forbidden"
                | "AllAccessDisabled",
            ),
            _,
        )
        | (None, Some(403)) => FailureKind::AccessDenied,
        _ => FailureKind::Other,
    };
    AwsFailure::new(kind, said)
}

/// Region and credential problems show up as dispatch or construction failures whose
/// text is the only clue.
fn setup_kind(text: &str) -> Option<FailureKind> {
    let lower = text.to_lowercase();
    if lower.contains("region must be set") || lower.contains("no region") {
        Some(FailureKind::NoRegion)
    } else if lower.contains("loading credentials")
        || lower.contains("credentials provider")
        || lower.contains("credential provider")
        || lower.contains("no credentials")
        || lower.contains("provided credentials")
    {
        Some(FailureKind::NoCredentials)
    } else {
        None
    }
}

/// Every message of the error's source chain, joined (for classification only).
fn chain_text(err: &(dyn StdError + 'static)) -> String {
    let mut parts = vec![err.to_string()];
    let mut source = err.source();
    while let Some(s) = source {
        parts.push(s.to_string());
        source = s.source();
    }
    parts.join(": ")
}

/// The innermost message of the chain: the SDK's outer layers only say "dispatch failure"
/// or "other"; the last one says what happened. Struct dumps (some SDK errors print their
/// fields) are cut at the first `(` or `{` that opens one.
fn innermost(err: &(dyn StdError + 'static)) -> String {
    let mut last = err;
    while let Some(s) = last.source() {
        last = s;
    }
    let text = last.to_string();
    let cut = text
        .find(" (")
        .filter(|i| text[*i..].contains('{') || text[*i..].contains("Error"))
        .map(|i| &text[..i])
        .unwrap_or(&text);
    let cut = cut.split(" {").next().unwrap_or(cut);
    cut.trim().trim_end_matches('.').to_string()
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FailureKind::NoRegion => "no_region",
            FailureKind::NoCredentials => "no_credentials",
            FailureKind::CredentialsRefused => "credentials_refused",
            FailureKind::NotFound => "not_found",
            FailureKind::AccessDenied => "access_denied",
            FailureKind::Unreachable => "unreachable",
            FailureKind::Timeout => "timeout",
            FailureKind::Other => "other",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_s3::error::ConnectorError;

    type S3Err = SdkError<aws_sdk_s3::operation::head_bucket::HeadBucketError, HttpResponse>;

    #[derive(Debug, thiserror::Error)]
    #[error("{0}")]
    struct Inner(&'static str);

    #[derive(Debug, thiserror::Error)]
    #[error("an error occurred while loading credentials")]
    struct Loading(#[source] Inner);

    #[test]
    fn missing_region_and_credentials_name_the_settings() {
        let err: S3Err = SdkError::dispatch_failure(ConnectorError::other(
            Box::new(Inner("A region must be set when sending requests to S3.")),
            None,
        ));
        assert_eq!(
            explain(&err).to_string(),
            "no AWS region is configured: A region must be set when sending requests to S3; set aws.region in the config (or AWS_REGION), and credentials if not done yet"
        );
        let err: S3Err = SdkError::dispatch_failure(ConnectorError::other(
            Box::new(Loading(Inner(
                "failed to load IMDS session token: request forbidden (FailedToLoadToken(FailedToLoadToken { source: .. }))",
            ))),
            None,
        ));
        let explained = explain(&err);
        assert_eq!(explained.kind, FailureKind::NoCredentials);
        assert_eq!(
            explained.to_string(),
            "no AWS credentials found (failed to load IMDS session token: request forbidden); set aws.access_key_id and aws.secret_access_key in the config, or AWS_PROFILE or AWS_ACCESS_KEY_ID, or run with an IAM role (ECS task role); check aws.region too"
        );
    }

    #[test]
    fn connection_failures_point_at_the_endpoint() {
        let err: S3Err = SdkError::dispatch_failure(ConnectorError::io(Box::new(Inner(
            "tcp connect error: Connection refused (os error 111)",
        ))));
        assert_eq!(
            explain(&err).to_string(),
            "cannot connect: tcp connect error: Connection refused (os error 111); check aws.endpoint_url (LocalStack: http://127.0.0.1:4566), aws.region and the network"
        );
    }

    #[test]
    fn service_answers_by_code() {
        assert_eq!(
            service_failure(
                Some("AWS.SimpleQueueService.NonExistentQueue"),
                Some("The specified queue does not exist."),
                Some(400)
            )
            .to_string(),
            "does not exist (AWS.SimpleQueueService.NonExistentQueue: The specified queue does not exist.); check the name in the config and aws.region"
        );
        assert_eq!(
            service_failure(None, None, Some(404)).kind,
            FailureKind::NotFound
        );
        assert_eq!(
            service_failure(Some("AccessDenied"), Some("no"), Some(403)).to_string(),
            "access denied: AccessDenied: no; the credentials in use lack a permission (deploy/cloudformation lists what the worker needs)"
        );
        assert_eq!(
            service_failure(Some("InvalidClientTokenId"), None, Some(403)).kind,
            FailureKind::CredentialsRefused
        );
        assert_eq!(
            service_failure(Some("Throttling"), Some("slow down"), Some(400)).to_string(),
            "Throttling: slow down"
        );
    }
}
