//! Checks of what a user gets wrong when setting the worker up, run by `check-connection`
//! and at startup, without creating or changing anything: AWS region and credentials, the
//! queue (and its redrive policy), the source bucket, the bucket's notification to this
//! queue with a filter that covers `source.prefix`, the metadata bucket and the alerts
//! topic.
//!
//! At startup a queue that cannot be used stops the worker (exit non-zero): nothing would
//! ever arrive. Every other problem is a WARN and a `setup_problem` alert: the worker can
//! still do useful work (a missing redrive policy only matters once a file is poison).

use aws_sdk_s3::types::{Event, FilterRule, NotificationConfigurationFilter};
use aws_sdk_sqs::types::QueueAttributeName;

use crate::alerts::{Alert, AlertKind, Alerts, Severity};
use crate::aws::{AwsClients, AwsFailure, explain};
use crate::config::Config;

/// The outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    /// Works, but something is likely to bite later.
    Warn,
    /// Does not work.
    Fail,
    /// Not checked (not configured, not checkable, or an earlier check failed).
    Skip,
}

impl Status {
    /// The five-column tag `check-connection` prints.
    pub fn tag(self) -> &'static str {
        match self {
            Status::Ok => "ok   ",
            Status::Warn => "WARN ",
            Status::Fail => "FAIL ",
            Status::Skip => "skip ",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    pub detail: String,
}

impl Check {
    fn new(name: &'static str, status: Status, detail: impl Into<String>) -> Self {
        Self {
            name,
            status,
            detail: detail.into(),
        }
    }
}

/// Every check, in the order they ran.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub checks: Vec<Check>,
}

/// The names of the checks that stop the worker at startup when they fail.
const FATAL: [&str; 2] = ["aws", "queue"];

impl Report {
    pub fn failures(&self) -> usize {
        self.checks
            .iter()
            .filter(|c| c.status == Status::Fail)
            .count()
    }

    /// Why the worker cannot start, if it cannot.
    pub fn fatal(&self) -> Option<String> {
        self.checks
            .iter()
            .find(|c| c.status == Status::Fail && FATAL.contains(&c.name))
            .map(|c| format!("cannot start: {}: {}", c.name, c.detail))
    }

    /// At startup: each problem that does not stop the worker is a WARN and an alert.
    pub async fn announce(&self, alerts: &Alerts) {
        for c in &self.checks {
            let severity = match c.status {
                Status::Fail => Severity::Error,
                Status::Warn => Severity::Warning,
                Status::Ok | Status::Skip => continue,
            };
            tracing::warn!(check = c.name, problem = %c.detail, "setup check failed; the worker runs on, but see the problem");
            // The detail reads "problem; what to do": the alert's message is the problem,
            // its next steps the fix.
            let (problem, fix) = c.detail.split_once("; ").unwrap_or((&c.detail, ""));
            let mut alert = Alert::new(
                AlertKind::SetupProblem,
                severity,
                "",
                format!("{}: {problem}", c.name),
            );
            alert.next_steps = Some(format!(
                "{}Then restart the worker; `cdc-worker check-connection` runs the same checks.",
                capitalized_sentence(fix)
            ));
            alerts.publish(&alert).await;
        }
    }
}

/// `fix it` as `Fix it. ` (empty stays empty).
fn capitalized_sentence(text: &str) -> String {
    let text = text.trim().trim_end_matches('.');
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => format!("{}{}. ", first.to_uppercase(), chars.as_str()),
        None => String::new(),
    }
}

/// Runs every check against AWS (the warehouse is checked by the callers that need it).
pub async fn run(config: &Config, aws: &AwsClients) -> Report {
    let mut report = Report::default();
    let setup = aws.check_setup().await;
    let aws_ok = setup.is_ok();
    report.checks.push(match setup {
        Ok(detail) => {
            let endpoint = config
                .aws
                .endpoint_url
                .as_deref()
                .filter(|e| !e.is_empty())
                .map(|e| format!(", endpoint {e}"))
                .unwrap_or_default();
            Check::new("aws", Status::Ok, format!("{detail}{endpoint}"))
        }
        Err(e) => Check::new("aws", Status::Fail, e.to_string()),
    });
    if !aws_ok {
        for name in [
            "queue",
            "source bucket",
            "bucket notification",
            "metadata bucket",
            "alerts topic",
        ] {
            report.checks.push(Check::new(
                name,
                Status::Skip,
                "needs an AWS region and credentials (see above)",
            ));
        }
        return report;
    }
    let queue_arn = check_queue(config, aws, &mut report.checks).await;
    let source = check_source_bucket(config, aws).await;
    let source_ok = source.status == Status::Ok;
    report.checks.push(source);
    report
        .checks
        .push(check_notification(config, aws, queue_arn.as_deref()).await);
    report
        .checks
        .push(check_metadata_bucket(config, aws, source_ok).await);
    report.checks.push(check_topic(config, aws).await);
    report
}

/// The queue and its redrive policy; returns the queue's ARN when it answered.
async fn check_queue(config: &Config, aws: &AwsClients, checks: &mut Vec<Check>) -> Option<String> {
    let url = &config.queue.url;
    let answer = aws
        .sqs
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::QueueArn)
        .attribute_names(QueueAttributeName::RedrivePolicy)
        .send()
        .await;
    let attributes = match answer {
        Ok(out) => out.attributes().cloned().unwrap_or_default(),
        Err(e) => {
            let why = explain(&e);
            let hint = if why.kind == crate::aws::FailureKind::NotFound {
                ". queue.url must be the URL of the queue the bucket notifies (`aws sqs get-queue-url --queue-name NAME` prints it)"
            } else {
                ""
            };
            checks.push(Check::new(
                "queue",
                Status::Fail,
                format!("SQS queue {url}: {why}{hint}"),
            ));
            checks.push(Check::new(
                "dead-letter queue",
                Status::Skip,
                "the queue did not answer",
            ));
            return None;
        }
    };
    checks.push(Check::new("queue", Status::Ok, url.clone()));
    checks.push(judge_redrive(
        attributes
            .get(&QueueAttributeName::RedrivePolicy)
            .map(String::as_str),
    ));
    attributes.get(&QueueAttributeName::QueueArn).cloned()
}

/// The queue's redrive policy: without one a file that can never be applied comes back
/// forever instead of resting in a dead-letter queue.
pub fn judge_redrive(policy: Option<&str>) -> Check {
    let parsed = policy
        .filter(|p| !p.is_empty())
        .and_then(|p| serde_json::from_str::<serde_json::Value>(p).ok());
    match parsed {
        Some(p) => {
            let target = p["deadLetterTargetArn"].as_str().unwrap_or("?");
            let name = target.rsplit(':').next().unwrap_or(target);
            let receives = match &p["maxReceiveCount"] {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            Check::new(
                "dead-letter queue",
                Status::Ok,
                format!("{name}, after {receives} receives"),
            )
        }
        None => Check::new(
            "dead-letter queue",
            Status::Warn,
            "the queue has no redrive policy: a file that can never be applied (corrupt, or late) comes back forever instead of resting in a dead-letter queue; give the queue a RedrivePolicy (deadLetterTargetArn, maxReceiveCount 5)",
        ),
    }
}

/// One `ListObjectsV2` call of at most one key: proves the bucket exists and may be
/// listed under the prefix (the IAM policy grants listing by prefix, not `HeadBucket`).
async fn list_one(aws: &AwsClients, bucket: &str, prefix: &str) -> Result<bool, AwsFailure> {
    aws.s3
        .list_objects_v2()
        .bucket(bucket)
        .prefix(prefix)
        .max_keys(1)
        .send()
        .await
        .map(|out| !out.contents().is_empty())
        .map_err(|e| explain(&e))
}

fn folder(prefix: &str) -> String {
    let trimmed = prefix.trim_end_matches('/');
    if trimmed.is_empty() {
        String::new()
    } else {
        format!("{trimmed}/")
    }
}

async fn check_source_bucket(config: &Config, aws: &AwsClients) -> Check {
    let bucket = &config.source.bucket;
    let prefix = folder(&config.source.prefix);
    match list_one(aws, bucket, &prefix).await {
        Ok(true) => Check::new(
            "source bucket",
            Status::Ok,
            format!("s3://{bucket}/{prefix} has files"),
        ),
        Ok(false) => Check::new(
            "source bucket",
            Status::Ok,
            format!(
                "s3://{bucket} exists; nothing under `{prefix}` yet (source.prefix must be DMS's BucketFolder)"
            ),
        ),
        Err(e) => Check::new(
            "source bucket",
            Status::Fail,
            format!("S3 bucket `{bucket}` (source.bucket): {e}"),
        ),
    }
}

async fn check_metadata_bucket(config: &Config, aws: &AwsClients, source_ok: bool) -> Check {
    let bucket = config.metadata_bucket();
    let prefix = folder(&config.metadata.prefix);
    if bucket == config.source.bucket {
        let (status, seen) = if source_ok {
            (Status::Ok, "the source bucket")
        } else {
            (Status::Skip, "the source bucket, see above")
        };
        return Check::new(
            "metadata bucket",
            status,
            format!("s3://{bucket}/{prefix} ({seen})"),
        );
    }
    match list_one(aws, bucket, &prefix).await {
        Ok(_) => Check::new(
            "metadata bucket",
            Status::Ok,
            format!("s3://{bucket}/{prefix}"),
        ),
        Err(e) => Check::new(
            "metadata bucket",
            Status::Fail,
            format!("S3 bucket `{bucket}` (metadata.bucket): {e}"),
        ),
    }
}

async fn check_topic(config: &Config, aws: &AwsClients) -> Check {
    let Some(topic) = config
        .alerts
        .sns_topic_arn
        .as_deref()
        .filter(|t| !t.is_empty())
    else {
        return Check::new(
            "alerts topic",
            Status::Skip,
            "alerts.sns_topic_arn is not set: alerts are only logged",
        );
    };
    match aws.sns.get_topic_attributes().topic_arn(topic).send().await {
        Ok(_) => Check::new("alerts topic", Status::Ok, topic),
        Err(e) => Check::new(
            "alerts topic",
            Status::Fail,
            format!("SNS topic {topic} (alerts.sns_topic_arn): {}", explain(&e)),
        ),
    }
}

/// One destination of a bucket's event notifications, reduced to what is judged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Destination {
    pub arn: String,
    pub events: Vec<String>,
    pub prefix: String,
    pub suffix: String,
}

/// A bucket's notification configuration, reduced to what is judged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BucketNotifications {
    pub queues: Vec<Destination>,
    pub topics: Vec<Destination>,
    pub eventbridge: bool,
}

fn filter_value(filter: Option<&NotificationConfigurationFilter>, name: &str) -> String {
    filter
        .and_then(|f| f.key())
        .map(|k| k.filter_rules())
        .unwrap_or_default()
        .iter()
        .filter(|r: &&FilterRule| {
            r.name()
                .is_some_and(|n| n.as_str().eq_ignore_ascii_case(name))
        })
        .filter_map(|r| r.value())
        .next()
        .unwrap_or_default()
        .to_string()
}

fn event_names(events: &[Event]) -> Vec<String> {
    events.iter().map(|e| e.as_str().to_string()).collect()
}

async fn check_notification(config: &Config, aws: &AwsClients, queue_arn: Option<&str>) -> Check {
    let Some(queue_arn) = queue_arn else {
        return Check::new(
            "bucket notification",
            Status::Skip,
            "the queue did not answer",
        );
    };
    let bucket = &config.source.bucket;
    let answer = aws
        .s3
        .get_bucket_notification_configuration()
        .bucket(bucket)
        .send()
        .await;
    let out = match answer {
        Ok(out) => out,
        Err(e) => {
            let why = explain(&e);
            let status = match why.kind {
                crate::aws::FailureKind::AccessDenied => Status::Skip,
                _ => Status::Fail,
            };
            return Check::new(
                "bucket notification",
                status,
                format!(
                    "cannot read the event notifications of `{bucket}`: {why} (the check needs s3:GetBucketNotification)"
                ),
            );
        }
    };
    let notifications = BucketNotifications {
        queues: out
            .queue_configurations()
            .iter()
            .map(|q| Destination {
                arn: q.queue_arn().to_string(),
                events: event_names(q.events()),
                prefix: filter_value(q.filter(), "prefix"),
                suffix: filter_value(q.filter(), "suffix"),
            })
            .collect(),
        topics: out
            .topic_configurations()
            .iter()
            .map(|t| Destination {
                arn: t.topic_arn().to_string(),
                events: event_names(t.events()),
                prefix: filter_value(t.filter(), "prefix"),
                suffix: filter_value(t.filter(), "suffix"),
            })
            .collect(),
        eventbridge: out.event_bridge_configuration().is_some(),
    };
    let (status, detail) = judge_notifications(&notifications, queue_arn, &config.source.prefix);
    Check::new("bucket notification", status, detail)
}

/// Whether the bucket's notifications bring every DMS file under `prefix` to the queue.
pub fn judge_notifications(
    n: &BucketNotifications,
    queue_arn: &str,
    source_prefix: &str,
) -> (Status, String) {
    let wanted = folder(source_prefix);
    let how_to = format!(
        "add an event notification to the bucket: events s3:ObjectCreated:*, destination {queue_arn}, prefix `{wanted}`, suffix `.parquet` (deploy/cloudformation does it; on LocalStack `cdc-worker-dev dev-setup`)"
    );
    let ours: Vec<&Destination> = n.queues.iter().filter(|d| d.arn == queue_arn).collect();
    if ours.is_empty() {
        if !n.topics.is_empty() {
            let topics: Vec<&str> = n.topics.iter().map(|t| t.arn.as_str()).collect();
            return (
                Status::Skip,
                format!(
                    "the bucket notifies SNS topic {}; that it delivers to this queue is not checked",
                    topics.join(", ")
                ),
            );
        }
        if n.eventbridge {
            return (
                Status::Skip,
                "the bucket sends its events to EventBridge; that a rule delivers them to this queue is not checked".into(),
            );
        }
        let others: Vec<&str> = n.queues.iter().map(|q| q.arn.as_str()).collect();
        let elsewhere = if others.is_empty() {
            "the bucket has no event notification to this queue".to_string()
        } else {
            format!(
                "the bucket notifies {} but not this queue",
                others.join(", ")
            )
        };
        return (
            Status::Fail,
            format!("{elsewhere}: no file will reach the worker; {how_to}"),
        );
    }
    let verdicts: Vec<(Status, String)> = ours
        .iter()
        .map(|d| judge_destination(d, &wanted, &how_to))
        .collect();
    verdicts
        .iter()
        .find(|(s, _)| *s == Status::Ok)
        .or_else(|| verdicts.iter().find(|(s, _)| *s == Status::Warn))
        .unwrap_or(&verdicts[0])
        .clone()
}

fn judge_destination(d: &Destination, wanted: &str, how_to: &str) -> (Status, String) {
    let all_created = d.events.iter().any(|e| e == "s3:ObjectCreated:*");
    let some_created = d.events.iter().any(|e| e.starts_with("s3:ObjectCreated:"));
    if !some_created {
        return (
            Status::Fail,
            format!(
                "the notification to this queue is for {}, not s3:ObjectCreated:*: no file will reach the worker; {how_to}",
                d.events.join(", ")
            ),
        );
    }
    let filter = match (d.prefix.as_str(), d.suffix.as_str()) {
        ("", "") => "no filter".to_string(),
        (p, "") => format!("prefix `{p}`"),
        ("", s) => format!("suffix `{s}`"),
        (p, s) => format!("prefix `{p}`, suffix `{s}`"),
    };
    if !".parquet".ends_with(d.suffix.as_str()) {
        return (
            Status::Fail,
            format!(
                "the notification to this queue has suffix filter `{}`, which excludes DMS's .parquet files: no file will reach the worker; set the suffix to `.parquet`",
                d.suffix
            ),
        );
    }
    if !wanted.starts_with(d.prefix.as_str()) {
        if d.prefix.starts_with(wanted) {
            return (
                Status::Warn,
                format!(
                    "the notification to this queue has prefix filter `{}`, which announces only part of source.prefix `{wanted}`: files of other tables never reach the worker; set the prefix to `{wanted}`",
                    d.prefix
                ),
            );
        }
        return (
            Status::Fail,
            format!(
                "the notification to this queue has prefix filter `{}`, which matches nothing under source.prefix `{wanted}`: no file will reach the worker; set the prefix to `{wanted}` (or source.prefix to DMS's BucketFolder)",
                d.prefix
            ),
        );
    }
    if !all_created {
        return (
            Status::Warn,
            format!(
                "the notification to this queue announces only {}: files uploaded another way (DMS uploads large files in parts: CompleteMultipartUpload) never arrive; use s3:ObjectCreated:*",
                d.events.join(", ")
            ),
        );
    }
    (
        Status::Ok,
        format!("s3:ObjectCreated:* to this queue, {filter}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const ARN: &str = "arn:aws:sqs:eu-west-1:1:dms-files";

    fn to_queue(prefix: &str, suffix: &str, events: &[&str]) -> BucketNotifications {
        BucketNotifications {
            queues: vec![Destination {
                arn: ARN.into(),
                events: events.iter().map(|e| e.to_string()).collect(),
                prefix: prefix.into(),
                suffix: suffix.into(),
            }],
            ..Default::default()
        }
    }

    #[test]
    fn a_filter_covering_the_prefix_passes() {
        let all = ["s3:ObjectCreated:*"];
        for (prefix, suffix) in [("dms/", ".parquet"), ("dms", ""), ("", "parquet"), ("", "")] {
            let (status, detail) = judge_notifications(&to_queue(prefix, suffix, &all), ARN, "dms");
            assert_eq!(status, Status::Ok, "{prefix} {suffix}: {detail}");
        }
        assert_eq!(
            judge_notifications(&to_queue("dms/", ".parquet", &all), ARN, "dms").1,
            "s3:ObjectCreated:* to this queue, prefix `dms/`, suffix `.parquet`"
        );
    }

    #[test]
    fn filters_that_lose_files_are_named() {
        let all = ["s3:ObjectCreated:*"];
        let (status, detail) = judge_notifications(&to_queue("cdc/", "", &all), ARN, "dms");
        assert_eq!(status, Status::Fail);
        assert_eq!(
            detail,
            "the notification to this queue has prefix filter `cdc/`, which matches nothing under source.prefix `dms/`: no file will reach the worker; set the prefix to `dms/` (or source.prefix to DMS's BucketFolder)"
        );
        let (status, _) = judge_notifications(&to_queue("dms/public/", "", &all), ARN, "dms");
        assert_eq!(status, Status::Warn);
        let (status, detail) = judge_notifications(&to_queue("dms/", ".csv", &all), ARN, "dms");
        assert_eq!(status, Status::Fail, "{detail}");
        let (status, detail) =
            judge_notifications(&to_queue("dms/", "", &["s3:ObjectCreated:Put"]), ARN, "dms");
        assert_eq!(status, Status::Warn, "{detail}");
        let (status, _) =
            judge_notifications(&to_queue("dms/", "", &["s3:ObjectRemoved:*"]), ARN, "dms");
        assert_eq!(status, Status::Fail);
    }

    #[test]
    fn a_bucket_that_notifies_another_queue_or_nothing_fails() {
        let mut other = to_queue("dms/", "", &["s3:ObjectCreated:*"]);
        other.queues[0].arn = "arn:aws:sqs:eu-west-1:1:old-queue".into();
        let (status, detail) = judge_notifications(&other, ARN, "dms");
        assert_eq!(status, Status::Fail);
        assert!(
            detail.starts_with("the bucket notifies arn:aws:sqs:eu-west-1:1:old-queue but not this queue: no file will reach the worker; add an event notification"),
            "{detail}"
        );
        let (status, detail) = judge_notifications(&BucketNotifications::default(), ARN, "dms");
        assert_eq!(status, Status::Fail);
        assert!(
            detail.starts_with("the bucket has no event notification to this queue"),
            "{detail}"
        );
        let via_sns = BucketNotifications {
            topics: vec![Destination {
                arn: "arn:aws:sns:eu-west-1:1:fanout".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        assert_eq!(judge_notifications(&via_sns, ARN, "dms").0, Status::Skip);
    }

    #[test]
    fn a_queue_without_redrive_policy_is_a_warning() {
        assert_eq!(judge_redrive(None).status, Status::Warn);
        let ok = judge_redrive(Some(
            r#"{"deadLetterTargetArn":"arn:aws:sqs:eu-west-1:1:dms-files-dlq","maxReceiveCount":"5"}"#,
        ));
        assert_eq!(
            (ok.status, ok.detail.as_str()),
            (Status::Ok, "dms-files-dlq, after 5 receives")
        );
    }
}
