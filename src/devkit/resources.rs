//! Local development: creates what the worker needs around it (bucket, queue with a
//! dead-letter queue, the bucket's notification, the alerts topic) in LocalStack or any
//! AWS account. Idempotent. Production accounts use deploy/cloudformation instead.

use anyhow::Context;
use aws_sdk_s3::types::{
    Event, FilterRule, FilterRuleName, NotificationConfiguration, NotificationConfigurationFilter,
    QueueConfiguration, S3KeyFilter,
};
use aws_sdk_sqs::types::QueueAttributeName;

use crate::aws::AwsClients;

/// Names of the resources to create.
#[derive(Debug, Clone)]
pub struct ResourceSpec {
    pub bucket: String,
    /// Only keys under this prefix are notified ("" for all).
    pub prefix: String,
    pub queue: String,
    pub topic: String,
    /// Receives after which a message moves to the dead-letter queue.
    pub max_receive_count: u32,
    /// Queue default visibility timeout, seconds.
    pub visibility_timeout_s: u32,
}

/// What was created, with the URLs and ARNs the config and tests need.
#[derive(Debug, Clone)]
pub struct Resources {
    pub bucket: String,
    pub queue_url: String,
    pub queue_arn: String,
    pub dlq_url: String,
    pub topic_arn: String,
    /// A queue subscribed to the alerts topic, to read alerts back.
    pub alerts_queue_url: String,
}

async fn arn_of_queue(aws: &AwsClients, url: &str) -> anyhow::Result<String> {
    let attrs = aws
        .sqs
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .with_context(|| format!("reading attributes of {url}"))?;
    attrs
        .attributes()
        .and_then(|a| a.get(&QueueAttributeName::QueueArn))
        .cloned()
        .context("queue has no ARN")
}

async fn create_queue(
    aws: &AwsClients,
    name: &str,
    attributes: Vec<(QueueAttributeName, String)>,
) -> anyhow::Result<String> {
    let mut request = aws.sqs.create_queue().queue_name(name);
    for (k, v) in attributes {
        request = request.attributes(k, v);
    }
    let out = request
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("SQS: {}", crate::aws::explain(&e)))
        .with_context(|| format!("creating queue {name}"))?;
    out.queue_url().map(str::to_string).context("no queue URL")
}

/// The key filter of the bucket notification: the prefix as a folder (`dms/`, so that
/// `dms-old/` is not announced) and DMS's `.parquet` suffix, so the worker's own objects
/// and other uploads never reach the queue.
pub fn notification_filter(prefix: &str) -> NotificationConfigurationFilter {
    let mut rules = S3KeyFilter::builder().filter_rules(
        FilterRule::builder()
            .name(FilterRuleName::Suffix)
            .value(".parquet")
            .build(),
    );
    let folder = prefix.trim_end_matches('/');
    if !folder.is_empty() {
        rules = rules.filter_rules(
            FilterRule::builder()
                .name(FilterRuleName::Prefix)
                .value(format!("{folder}/"))
                .build(),
        );
    }
    NotificationConfigurationFilter::builder()
        .key(rules.build())
        .build()
}

/// Creates (or finds) every resource of `spec`.
pub async fn ensure_resources(aws: &AwsClients, spec: &ResourceSpec) -> anyhow::Result<Resources> {
    ensure_bucket(aws, &spec.bucket).await?;
    let queues = create_queue_with_dead_letter_queue(aws, spec).await?;
    allow_bucket_to_send(aws, &queues, &spec.bucket).await?;
    notify_queue_of_new_objects(aws, &queues.queue_arn, spec).await?;
    let (topic_arn, alerts_queue_url) = create_alerts_topic_with_inbox(aws, &spec.topic).await?;
    Ok(Resources {
        bucket: spec.bucket.clone(),
        queue_url: queues.queue_url,
        queue_arn: queues.queue_arn,
        dlq_url: queues.dlq_url,
        topic_arn,
        alerts_queue_url,
    })
}

/// Creates the bucket; one that exists already (ours, or one the name was taken for) is
/// left as it is.
async fn ensure_bucket(aws: &AwsClients, bucket: &str) -> anyhow::Result<()> {
    match aws.s3.create_bucket().bucket(bucket).send().await {
        Ok(_) => {}
        Err(e) => {
            let why = crate::aws::explain(&e);
            if !why.detail.contains("BucketAlreadyOwnedByYou")
                && !why.detail.contains("BucketAlreadyExists")
            {
                anyhow::bail!("creating bucket {bucket}: {why}");
            }
        }
    }
    Ok(())
}

/// The notification queue and its dead-letter queue.
struct Queues {
    queue_url: String,
    queue_arn: String,
    dlq_url: String,
}

/// Creates the dead-letter queue, then the queue that redrives to it after
/// `spec.max_receive_count` receives.
async fn create_queue_with_dead_letter_queue(
    aws: &AwsClients,
    spec: &ResourceSpec,
) -> anyhow::Result<Queues> {
    let dlq_url = create_queue(aws, &format!("{}-dlq", spec.queue), vec![]).await?;
    let dlq_arn = arn_of_queue(aws, &dlq_url).await?;
    let redrive = serde_json::json!({
        "deadLetterTargetArn": dlq_arn,
        "maxReceiveCount": spec.max_receive_count.to_string(),
    })
    .to_string();
    let queue_url = create_queue(
        aws,
        &spec.queue,
        vec![
            (QueueAttributeName::RedrivePolicy, redrive),
            (
                QueueAttributeName::VisibilityTimeout,
                spec.visibility_timeout_s.to_string(),
            ),
        ],
    )
    .await?;
    let queue_arn = arn_of_queue(aws, &queue_url).await?;
    Ok(Queues {
        queue_url,
        queue_arn,
        dlq_url,
    })
}

/// The queue policy that lets S3 deliver the bucket's notifications, and nothing else.
async fn allow_bucket_to_send(
    aws: &AwsClients,
    queues: &Queues,
    bucket: &str,
) -> anyhow::Result<()> {
    let policy = serde_json::json!({
        "Version": "2012-10-17",
        "Statement": [{
            "Effect": "Allow",
            "Principal": {"Service": "s3.amazonaws.com"},
            "Action": "sqs:SendMessage",
            "Resource": queues.queue_arn,
            "Condition": {"ArnLike": {"aws:SourceArn": format!("arn:aws:s3:::{bucket}")}}
        }]
    })
    .to_string();
    aws.sqs
        .set_queue_attributes()
        .queue_url(&queues.queue_url)
        .attributes(QueueAttributeName::Policy, policy)
        .send()
        .await
        .context("setting the queue policy")?;
    Ok(())
}

/// The bucket's notification: every object created under the prefix (see
/// [`notification_filter`]) is announced on the queue.
async fn notify_queue_of_new_objects(
    aws: &AwsClients,
    queue_arn: &str,
    spec: &ResourceSpec,
) -> anyhow::Result<()> {
    let queue_config = QueueConfiguration::builder()
        .queue_arn(queue_arn)
        .events(Event::S3ObjectCreated)
        .filter(notification_filter(&spec.prefix));
    aws.s3
        .put_bucket_notification_configuration()
        .bucket(&spec.bucket)
        .notification_configuration(
            NotificationConfiguration::builder()
                .queue_configurations(queue_config.build().context("queue configuration")?)
                .build(),
        )
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("S3 bucket {}: {}", spec.bucket, crate::aws::explain(&e)))
        .context("configuring the bucket notification")?;
    Ok(())
}

/// The alerts topic and the inbox queue subscribed to it (alerts are read back from
/// there): the topic's ARN and the inbox's URL.
async fn create_alerts_topic_with_inbox(
    aws: &AwsClients,
    topic: &str,
) -> anyhow::Result<(String, String)> {
    let topic_arn = aws
        .sns
        .create_topic()
        .name(topic)
        .send()
        .await
        .context("creating the alerts topic")?
        .topic_arn()
        .map(str::to_string)
        .context("no topic ARN")?;
    let alerts_queue_url = create_queue(aws, &format!("{topic}-inbox"), vec![]).await?;
    let alerts_queue_arn = arn_of_queue(aws, &alerts_queue_url).await?;
    aws.sns
        .subscribe()
        .topic_arn(&topic_arn)
        .protocol("sqs")
        .endpoint(&alerts_queue_arn)
        .send()
        .await
        .context("subscribing the alerts inbox queue")?;
    Ok((topic_arn, alerts_queue_url))
}

/// One alert read back from the inbox queue: the SNS envelope's subject, attributes and
/// the parsed JSON body.
#[derive(Debug, Clone)]
pub struct ReceivedAlert {
    pub subject: String,
    pub attributes: serde_json::Value,
    pub body: serde_json::Value,
}

/// The inbox queue [`ensure_resources`] subscribed to the alerts topic `topic` (a name).
pub async fn alerts_inbox_url(aws: &AwsClients, topic: &str) -> anyhow::Result<String> {
    let name = format!("{topic}-inbox");
    let out = aws
        .sqs
        .get_queue_url()
        .queue_name(&name)
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("SQS queue {name}: {}", crate::aws::explain(&e)))
        .context("finding the alerts inbox (created by `cdc-worker-dev dev-setup`)")?;
    out.queue_url().map(str::to_string).context("no queue URL")
}

/// Drains the alerts inbox queue (SNS envelopes, raw delivery off).
pub async fn drain_alerts(aws: &AwsClients, inbox_url: &str) -> anyhow::Result<Vec<ReceivedAlert>> {
    let mut alerts = Vec::new();
    loop {
        let out = aws
            .sqs
            .receive_message()
            .queue_url(inbox_url)
            .max_number_of_messages(10)
            .wait_time_seconds(1)
            .send()
            .await
            .context("reading the alerts inbox")?;
        let messages = out.messages.unwrap_or_default();
        if messages.is_empty() {
            return Ok(alerts);
        }
        for m in messages {
            let envelope: serde_json::Value =
                serde_json::from_str(m.body().unwrap_or("{}")).unwrap_or_default();
            let body = envelope["Message"]
                .as_str()
                .and_then(|s| serde_json::from_str(s).ok())
                .unwrap_or_default();
            alerts.push(ReceivedAlert {
                subject: envelope["Subject"].as_str().unwrap_or_default().to_string(),
                attributes: envelope["MessageAttributes"].clone(),
                body,
            });
            if let Some(h) = m.receipt_handle() {
                let _ = aws
                    .sqs
                    .delete_message()
                    .queue_url(inbox_url)
                    .receipt_handle(h)
                    .send()
                    .await;
            }
        }
    }
}
