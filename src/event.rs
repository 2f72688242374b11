//! Parsing SQS message bodies into S3 object notifications.
//!
//! Four shapes reach the queue: S3 notifications sent directly (several records per body),
//! the same wrapped in an SNS envelope, EventBridge "Object Created" events, and the
//! `s3:TestEvent` S3 sends when a notification is configured. Direct and SNS-wrapped keys
//! are URL-encoded (`+` is a space); EventBridge keys are not.

use percent_encoding::percent_decode_str;
use serde::Deserialize;
use serde_json::Value;

/// A new object, as announced by S3.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectCreated {
    pub bucket: String,
    /// The decoded key.
    pub key: String,
    pub size: u64,
    /// The ETag without quotes, when the notification carries one.
    pub etag: Option<String>,
    pub sequencer: Option<String>,
    /// When S3 says the object was created (RFC 3339), for latency figures.
    pub event_time: Option<String>,
}

impl ObjectCreated {
    /// `event_time` as a time, when it is one (S3 writes `2026-11-24T10:15:00.123Z`).
    pub fn event_at(&self) -> Option<std::time::SystemTime> {
        let text = self.event_time.as_deref()?;
        chrono::DateTime::parse_from_rfc3339(text)
            .ok()
            .map(|t| t.with_timezone(&chrono::Utc).into())
    }
}

/// What one notification in a body means for the worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notification {
    Created(ObjectCreated),
    /// `s3:TestEvent`: acknowledged and dropped.
    Test,
    /// Any other event (deletes, restores, SNS subscription confirmations): dropped.
    Other(String),
}

/// A body the worker cannot understand: left in the queue for its redrive policy.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EventParseError {
    #[error("body is not JSON: {0}")]
    NotJson(String),
    #[error("unrecognized message shape (expected an S3, SNS or EventBridge notification)")]
    UnknownShape,
    #[error("malformed {what}: {reason}")]
    Malformed { what: &'static str, reason: String },
    #[error("object key `{0}` is not valid URL-encoded UTF-8")]
    BadKey(String),
}

/// Parses one SQS message body.
pub fn parse_body(body: &str) -> Result<Vec<Notification>, EventParseError> {
    let value: Value =
        serde_json::from_str(body).map_err(|e| EventParseError::NotJson(e.to_string()))?;
    parse_value(&value, 0)
}

fn parse_value(value: &Value, depth: u8) -> Result<Vec<Notification>, EventParseError> {
    let Value::Object(map) = value else {
        return Err(EventParseError::UnknownShape);
    };
    if map.contains_key("Records") {
        return parse_s3_records(value);
    }
    if map.get("Event").and_then(Value::as_str) == Some("s3:TestEvent") {
        return Ok(vec![Notification::Test]);
    }
    if let Some(kind) = map.get("Type").and_then(Value::as_str) {
        // SNS envelope. The message is a JSON string; unwrap once (SNS never nests).
        if kind != "Notification" {
            return Ok(vec![Notification::Other(format!("SNS {kind}"))]);
        }
        if depth > 0 {
            return Err(EventParseError::UnknownShape);
        }
        let inner =
            map.get("Message")
                .and_then(Value::as_str)
                .ok_or(EventParseError::Malformed {
                    what: "SNS envelope",
                    reason: "no Message string".into(),
                })?;
        let inner: Value = serde_json::from_str(inner).map_err(|e| EventParseError::Malformed {
            what: "SNS envelope",
            reason: format!("Message is not JSON: {e}"),
        })?;
        return parse_value(&inner, depth + 1);
    }
    if map.contains_key("detail-type") {
        return parse_eventbridge(value);
    }
    Err(EventParseError::UnknownShape)
}

#[derive(Deserialize)]
struct S3Records {
    #[serde(rename = "Records")]
    records: Vec<S3Record>,
}

#[derive(Deserialize)]
struct S3Record {
    #[serde(rename = "eventName", default)]
    event_name: String,
    #[serde(rename = "eventTime")]
    event_time: Option<String>,
    s3: S3Entity,
}

#[derive(Deserialize)]
struct S3Entity {
    bucket: S3Bucket,
    object: S3Object,
}

#[derive(Deserialize)]
struct S3Bucket {
    name: String,
}

#[derive(Deserialize)]
struct S3Object {
    key: String,
    #[serde(default)]
    size: Option<u64>,
    #[serde(rename = "eTag", alias = "etag", default)]
    etag: Option<String>,
    #[serde(default)]
    sequencer: Option<String>,
}

fn parse_s3_records(value: &Value) -> Result<Vec<Notification>, EventParseError> {
    let parsed: S3Records =
        serde_json::from_value(value.clone()).map_err(|e| EventParseError::Malformed {
            what: "S3 notification",
            reason: e.to_string(),
        })?;
    parsed
        .records
        .into_iter()
        .map(|r| {
            if !r.event_name.starts_with("ObjectCreated:") {
                return Ok(Notification::Other(r.event_name));
            }
            Ok(Notification::Created(ObjectCreated {
                bucket: r.s3.bucket.name,
                key: decode_key(&r.s3.object.key)?,
                size: r.s3.object.size.unwrap_or(0),
                etag: r.s3.object.etag.map(|e| e.trim_matches('"').to_string()),
                sequencer: r.s3.object.sequencer,
                event_time: r.event_time,
            }))
        })
        .collect()
}

#[derive(Deserialize)]
struct EventBridgeEvent {
    #[serde(rename = "detail-type")]
    detail_type: String,
    #[serde(default)]
    source: String,
    time: Option<String>,
    detail: Option<EventBridgeDetail>,
}

#[derive(Deserialize)]
struct EventBridgeDetail {
    bucket: S3Bucket,
    object: S3Object,
}

fn parse_eventbridge(value: &Value) -> Result<Vec<Notification>, EventParseError> {
    let event: EventBridgeEvent =
        serde_json::from_value(value.clone()).map_err(|e| EventParseError::Malformed {
            what: "EventBridge event",
            reason: e.to_string(),
        })?;
    if event.source != "aws.s3" || event.detail_type != "Object Created" {
        return Ok(vec![Notification::Other(format!(
            "{} {}",
            event.source, event.detail_type
        ))]);
    }
    let detail = event.detail.ok_or(EventParseError::Malformed {
        what: "EventBridge event",
        reason: "no detail".into(),
    })?;
    Ok(vec![Notification::Created(ObjectCreated {
        bucket: detail.bucket.name,
        key: detail.object.key,
        size: detail.object.size.unwrap_or(0),
        etag: detail.object.etag.map(|e| e.trim_matches('"').to_string()),
        sequencer: detail.object.sequencer,
        event_time: event.time,
    })])
}

/// Decodes a key from an S3 notification: `+` is a space, `%XX` a byte.
pub fn decode_key(raw: &str) -> Result<String, EventParseError> {
    let spaced = raw.replace('+', " ");
    percent_decode_str(&spaced)
        .decode_utf8()
        .map(|k| k.into_owned())
        .map_err(|_| EventParseError::BadKey(raw.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn direct(keys: &[&str]) -> String {
        let records: Vec<Value> = keys
            .iter()
            .map(|k| {
                serde_json::json!({
                    "eventVersion": "2.1", "eventSource": "aws:s3",
                    "eventTime": "2026-11-24T10:00:00.000Z", "eventName": "ObjectCreated:Put",
                    "s3": {"bucket": {"name": "dms"}, "object": {"key": k, "size": 42,
                        "eTag": "abc", "sequencer": "0A"}}
                })
            })
            .collect();
        serde_json::json!({ "Records": records }).to_string()
    }

    fn created(n: &Notification) -> &ObjectCreated {
        match n {
            Notification::Created(o) => o,
            other => panic!("not created: {other:?}"),
        }
    }

    #[test]
    fn the_event_time_is_read_as_a_time() {
        let n = parse_body(&direct(&["dms/public/t/LOAD00000001.parquet"])).unwrap();
        let at = created(&n[0]).event_at().expect("eventTime");
        assert_eq!(
            chrono::DateTime::<chrono::Utc>::from(at).to_rfc3339(),
            "2026-11-24T10:00:00+00:00"
        );
        let mut o = created(&n[0]).clone();
        o.event_time = Some("yesterday".into());
        assert_eq!(o.event_at(), None);
    }

    #[test]
    fn direct_notification_with_several_records() {
        let parsed = parse_body(&direct(&["a/b.parquet", "a/c.parquet"])).unwrap();
        assert_eq!(parsed.len(), 2);
        assert_eq!(created(&parsed[1]).key, "a/c.parquet");
        assert_eq!(created(&parsed[0]).size, 42);
        assert_eq!(created(&parsed[0]).etag.as_deref(), Some("abc"));
    }

    #[test]
    fn keys_are_url_decoded() {
        let parsed = parse_body(&direct(&["dms/my+schema/a%2Bb/caf%C3%A9.parquet"])).unwrap();
        assert_eq!(created(&parsed[0]).key, "dms/my schema/a+b/café.parquet");
        assert!(matches!(
            parse_body(&direct(&["bad%FF%FE.parquet"])),
            Err(EventParseError::BadKey(_))
        ));
    }

    #[test]
    fn sns_wrapped_notification() {
        let body = serde_json::json!({
            "Type": "Notification", "MessageId": "m", "TopicArn": "arn:aws:sns:us-east-1:1:t",
            "Message": direct(&["x/y/z.parquet"])
        })
        .to_string();
        let parsed = parse_body(&body).unwrap();
        assert_eq!(created(&parsed[0]).key, "x/y/z.parquet");
    }

    #[test]
    fn eventbridge_keys_are_not_decoded() {
        let body = serde_json::json!({
            "version": "0", "detail-type": "Object Created", "source": "aws.s3",
            "time": "2026-11-24T10:00:00Z",
            "detail": {"bucket": {"name": "dms"}, "object": {"key": "s/t/a+b.parquet",
                "size": 7, "etag": "e1", "sequencer": "01"}}
        })
        .to_string();
        let parsed = parse_body(&body).unwrap();
        assert_eq!(created(&parsed[0]).key, "s/t/a+b.parquet");
        assert_eq!(created(&parsed[0]).etag.as_deref(), Some("e1"));
    }

    #[test]
    fn test_events_and_other_events() {
        let test = r#"{"Service":"Amazon S3","Event":"s3:TestEvent","Time":"t","Bucket":"dms"}"#;
        assert_eq!(parse_body(test).unwrap(), vec![Notification::Test]);
        let sns_test = serde_json::json!({"Type": "Notification", "Message": test}).to_string();
        assert_eq!(parse_body(&sns_test).unwrap(), vec![Notification::Test]);
        let delete = direct(&["a.parquet"]).replace("ObjectCreated:Put", "ObjectRemoved:Delete");
        assert!(matches!(
            parse_body(&delete).unwrap()[0],
            Notification::Other(_)
        ));
        let confirm = r#"{"Type":"SubscriptionConfirmation","Message":"hi"}"#;
        assert!(matches!(
            parse_body(confirm).unwrap()[0],
            Notification::Other(_)
        ));
    }

    #[test]
    fn malformed_bodies_are_errors() {
        assert!(matches!(
            parse_body("not json"),
            Err(EventParseError::NotJson(_))
        ));
        assert_eq!(parse_body("[1,2]"), Err(EventParseError::UnknownShape));
        assert_eq!(
            parse_body(r#"{"hello":1}"#),
            Err(EventParseError::UnknownShape)
        );
        assert!(matches!(
            parse_body(r#"{"Records":[{"eventName":"ObjectCreated:Put"}]}"#),
            Err(EventParseError::Malformed { .. })
        ));
        assert!(matches!(
            parse_body(r#"{"Type":"Notification","Message":"{not json"}"#),
            Err(EventParseError::Malformed { .. })
        ));
    }
}
