//! Development support shared by the `cdc-worker-dev` binary and the tests: LocalStack
//! resources, Parquet files written as DMS writes them, and waiting for a worker to drain
//! its queue. The daemon (`cdc-worker`) never calls into it.

pub mod parquet;
pub mod resources;

use std::time::{Duration, Instant};

use crate::aws::AwsClients;
use crate::config::Config;
use crate::worker::Worker;
use resources::ResourceSpec;

fn last_segment(s: &str, sep: char) -> &str {
    s.rsplit(sep).next().unwrap_or(s)
}

/// The resource names a config implies.
pub fn resource_spec(config: &Config) -> ResourceSpec {
    let topic = config
        .alerts
        .sns_topic_arn
        .as_deref()
        .map(|a| last_segment(a, ':').to_string())
        .unwrap_or_else(|| "cdc-worker-alerts".into());
    ResourceSpec {
        bucket: config.source.bucket.clone(),
        prefix: config.source.prefix.clone(),
        queue: last_segment(config.queue.url.trim_end_matches('/'), '/').to_string(),
        topic,
        max_receive_count: 5,
        visibility_timeout_s: 60,
    }
}

/// Visible plus in-flight messages of a queue.
pub async fn queue_depth(aws: &AwsClients, url: &str) -> anyhow::Result<u64> {
    use aws_sdk_sqs::types::QueueAttributeName as A;
    let out = aws
        .sqs
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(A::ApproximateNumberOfMessages)
        .attribute_names(A::ApproximateNumberOfMessagesNotVisible)
        .send()
        .await?;
    let attrs = out.attributes().cloned().unwrap_or_default();
    let n = |k: A| {
        attrs
            .get(&k)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Ok(n(A::ApproximateNumberOfMessages) + n(A::ApproximateNumberOfMessagesNotVisible))
}

/// Waits until the queue is empty and no lane has work, for `quiet` in a row.
pub async fn wait_until_idle(
    aws: &AwsClients,
    worker: &Worker,
    queue_url: &str,
    quiet: Duration,
    timeout: Duration,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut idle_since: Option<Instant> = None;
    while started.elapsed() < timeout {
        let depth = queue_depth(aws, queue_url).await?;
        let busy = worker
            .engine()
            .lanes()
            .iter()
            .any(|(_, l)| l.pending_files > 0);
        if depth == 0 && !busy {
            let since = *idle_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= quiet {
                return Ok(());
            }
        } else {
            idle_since = None;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    anyhow::bail!("the worker did not finish within {}s", timeout.as_secs())
}
