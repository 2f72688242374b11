//! Alerts as subscribers get them: one publish per alert with a message per protocol (an
//! SQS subscriber gets the JSON body, an email subscriber the text), and publishing that
//! never delays the worker, whatever SNS does.
//!
//! LocalStack delivers email through its SES, whose `/_aws/ses` endpoint lists what it
//! sent; `deploy/localstack/start.sh` enables SES for that.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use cdc_worker::alerts::{Alert, AlertKind, Alerts, Severity, email_text};
use cdc_worker::config::{KeySpec, TableConfig};

use crate::harness::{ENDPOINT, Env, i, null, s};

/// Fails with what to do when the running LocalStack was started without SES.
async fn require_ses() {
    let health: serde_json::Value = reqwest::get(format!("{ENDPOINT}/_localstack/health"))
        .await
        .expect("LocalStack health")
        .json()
        .await
        .expect("health JSON");
    let ses = health["services"]["ses"].as_str().unwrap_or("missing");
    assert!(
        matches!(ses, "available" | "running"),
        "LocalStack runs without SES (ses: {ses}), which the email test reads alerts from: \
         restart it with deploy/localstack/stop.sh && deploy/localstack/start.sh"
    );
}

/// Subscribes `address` to the topic by email and confirms it with the token LocalStack
/// keeps (AWS mails a link instead).
async fn subscribe_email(env: &Env, address: &str) {
    let arn = env
        .aws
        .sns
        .subscribe()
        .topic_arn(&env.res.topic_arn)
        .protocol("email")
        .endpoint(address)
        .return_subscription_arn(true)
        .send()
        .await
        .expect("email subscription")
        .subscription_arn
        .expect("subscription ARN");
    let token: serde_json::Value =
        reqwest::get(format!("{ENDPOINT}/_aws/sns/subscription-tokens/{arn}"))
            .await
            .expect("subscription token")
            .json()
            .await
            .expect("token JSON");
    env.aws
        .sns
        .confirm_subscription()
        .topic_arn(&env.res.topic_arn)
        .token(token["subscription_token"].as_str().expect("token"))
        .send()
        .await
        .expect("confirm the email subscription");
}

/// Text bodies of the mails LocalStack's SES sent to `address`.
async fn mails_to(address: &str) -> Vec<String> {
    let sent: serde_json::Value = reqwest::get(format!("{ENDPOINT}/_aws/ses"))
        .await
        .expect("sent mails")
        .json()
        .await
        .expect("mails JSON");
    sent["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| {
            m["Destination"]["ToAddresses"]
                .as_array()
                .is_some_and(|to| to.iter().any(|a| a == address))
        })
        .filter_map(|m| m["Body"]["text_part"].as_str().map(str::to_string))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_schema_change_reaches_sqs_as_json_and_email_as_text() {
    require_ses().await;
    let env = Env::new("alerts-email", |c| {
        c.tables.insert(
            "orders".into(),
            TableConfig {
                key: Some(KeySpec::One("id".into())),
                ..Default::default()
            },
        );
    })
    .await;
    let address = format!("oncall-{}@example.com", env.res.bucket);
    subscribe_email(&env, &address).await;

    let worker = env.start().await;
    env.put_parquet(
        &env.key("orders", "LOAD00000001.parquet"),
        &[("id", "BIGINT"), ("v", "VARCHAR")],
        &[vec![i(1), s("a")]],
    )
    .await;
    env.settle(&worker, Duration::from_secs(30)).await;
    env.put_parquet(
        &env.key("orders", "20261124-100400000.parquet"),
        &[
            ("Op", "VARCHAR"),
            ("id", "BIGINT"),
            ("v", "VARCHAR"),
            ("coupon", "VARCHAR"),
        ],
        &[vec![s("I"), i(2), s("b"), null()]],
    )
    .await;
    env.settle(&worker, Duration::from_secs(30)).await;
    worker.shutdown().await;

    // The SQS subscriber (raw delivery off) gets the SNS envelope with the JSON body, as
    // before per-protocol messages.
    let received = env.alerts().await;
    let change = received
        .iter()
        .find(|a| a.body["alert"] == "schema_change" && a.body["schema_version"] == 2)
        .unwrap_or_else(|| panic!("no schema v2 alert in {received:#?}"));
    assert_eq!(change.subject, "[cdc-worker] orders: schema v2: new column");
    assert_eq!(change.body["format_version"], 1);
    assert_eq!(
        change.body["changes"],
        serde_json::json!([{"kind": "new_column", "column": "coupon", "type": "string"}])
    );
    assert_eq!(change.body["severity"], "warning");
    assert_eq!(change.attributes["alert"]["Value"], "schema_change");
    assert_eq!(change.attributes["table"]["Value"], "orders");

    // The email subscriber gets the text of that very alert, not JSON.
    let alert: Alert = serde_json::from_value(change.body.clone()).expect("the body is an Alert");
    let expected = email_text(&alert);
    env.eventually(
        "the email of schema v2",
        Duration::from_secs(10),
        || async { mails_to(&address).await.contains(&expected) },
    )
    .await;
    let mails = mails_to(&address).await;
    assert!(
        expected.starts_with("orders: schema v2: new column\n\n"),
        "{expected}"
    );
    assert!(
        expected.contains("\n  - added column coupon string\n"),
        "{expected}"
    );
    assert!(
        expected.contains("\n    cdc-worker schema history orders\n"),
        "{expected}"
    );
    assert!(
        mails.iter().all(|m| !m.trim_start().starts_with('{')),
        "{mails:#?}"
    );
    // One mail per alert: the new table (v1) and the new column (v2).
    assert_eq!(mails.len(), 2, "{mails:#?}");
}

/// Accepts connections and never answers: an SNS endpoint that hangs.
async fn black_hole() -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().unwrap());
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            held.push(socket);
        }
    });
    (url, accepted)
}

fn sns_client(endpoint: &str) -> aws_sdk_sns::Client {
    use aws_sdk_sns::config::{BehaviorVersion, Credentials, Region};
    aws_sdk_sns::Client::from_conf(
        aws_sdk_sns::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .endpoint_url(endpoint)
            .credentials_provider(Credentials::new("test", "test", None, None, "test"))
            .build(),
    )
}

fn alert(n: usize) -> Alert {
    Alert::new(
        AlertKind::FileSkipped,
        Severity::Warning,
        "orders",
        format!("file {n} skipped"),
    )
}

/// Publishes as a batch does; panics if that waits for SNS (an attempt against the black
/// hole waits 10 s, three of them far longer).
async fn publish_without_waiting(alerts: &Alerts, alert: &Alert) {
    tokio::time::timeout(Duration::from_secs(2), alerts.publish(alert))
        .await
        .expect("publish returned while SNS hangs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_sns_delays_no_caller_and_a_full_queue_drops_what_does_not_fit() {
    let (url, accepted) = black_hole().await;
    let topic = "arn:aws:sns:us-east-1:000000000000:hangs".to_string();
    let alerts = Alerts::with_queue_capacity(sns_client(&url), Some(topic), 10);

    publish_without_waiting(&alerts, &alert(0)).await;
    // The background task is now stuck on the first alert, inside SNS.
    let started = std::time::Instant::now();
    while accepted.load(Ordering::SeqCst) == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no publish attempt"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for n in 1..=13 {
        publish_without_waiting(&alerts, &alert(n)).await;
    }
    let stats = alerts.stats();
    assert_eq!(
        (stats.published, stats.failed, stats.dropped, stats.queued),
        (0, 0, 3, 11),
        "one in SNS, ten queued, three dropped: {stats:?}"
    );
    // At shutdown: what cannot go out within the budget is counted, not waited for.
    assert_eq!(alerts.flush(Duration::from_millis(200)).await, 11);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_topic_fails_in_the_background_and_the_error_names_it() {
    let env = Env::new("alerts-missing-topic", |_| {}).await;
    let topic = format!("{}-gone", env.res.topic_arn);
    let alerts = Alerts::new(env.aws.sns.clone(), Some(topic.clone()));
    publish_without_waiting(&alerts, &alert(1)).await;
    assert_eq!(alerts.flush(Duration::from_secs(10)).await, 0);
    let stats = alerts.stats();
    assert_eq!((stats.published, stats.failed), (0, 1), "{stats:?}");
    let error = stats.last_error.expect("the failure is recorded");
    assert!(
        error.starts_with(&format!(
            "could not publish alert to SNS topic {topic} after 1 attempt(s): NotFound"
        )),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_waits_for_queued_alerts_to_reach_the_topic() {
    let env = Env::new("alerts-flush", |_| {}).await;
    let alerts = Alerts::new(env.aws.sns.clone(), Some(env.res.topic_arn.clone()));
    // The publisher's failure counters exist from the start (at zero), so that the
    // alerting rules' increase() sees the first failure.
    let metrics = cdc_worker::telemetry::metrics_handle().render();
    for series in [
        "cdc_worker_alert_publish_failures_total",
        "cdc_worker_alerts_dropped_total{reason=\"queue_full\"}",
        "cdc_worker_alerts_dropped_total{reason=\"shutdown\"}",
    ] {
        assert!(
            metrics.contains(series),
            "/metrics lacks {series}:\n{metrics}"
        );
    }
    for n in 0..5 {
        publish_without_waiting(&alerts, &alert(n)).await;
    }
    assert_eq!(alerts.flush(Duration::from_secs(10)).await, 0);
    assert_eq!(alerts.stats().published, 5);
    let mut messages: Vec<String> = env
        .alerts()
        .await
        .into_iter()
        .map(|a| a.body["message"].as_str().unwrap_or_default().to_string())
        .collect();
    messages.sort();
    assert_eq!(
        messages,
        (0..5)
            .map(|n| format!("file {n} skipped"))
            .collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_sns_is_tried_three_times_in_the_background() {
    // A port nobody listens on: every connection is refused.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let topic = "arn:aws:sns:us-east-1:000000000000:unreachable".to_string();
    let alerts = Alerts::new(sns_client(&url), Some(topic.clone()));
    publish_without_waiting(&alerts, &alert(1)).await;
    assert_eq!(alerts.flush(Duration::from_secs(10)).await, 0);
    let stats = alerts.stats();
    assert_eq!((stats.published, stats.failed), (0, 1), "{stats:?}");
    let error = stats.last_error.expect("the failure is recorded");
    assert!(
        error.starts_with(&format!(
            "could not publish alert to SNS topic {topic} after 3 attempt(s): cannot reach SNS"
        )),
        "{error}"
    );
}
