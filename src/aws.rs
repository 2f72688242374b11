//! AWS clients built from `[aws]`: one shared SDK configuration, with the endpoint override
//! and path-style addressing LocalStack needs.

use aws_config::{BehaviorVersion, Region};
use aws_sdk_s3::config::Credentials;

use crate::config::AwsConfig;

/// The three clients the worker uses, cheap to clone.
#[derive(Clone, Debug)]
pub struct AwsClients {
    pub s3: aws_sdk_s3::Client,
    pub sqs: aws_sdk_sqs::Client,
    pub sns: aws_sdk_sns::Client,
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
        }
    }
}
