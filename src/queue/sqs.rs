//! [`Queue`] on Amazon SQS (or LocalStack).

use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_sqs::types::{
    DeleteMessageBatchRequestEntry, MessageAttributeValue, MessageSystemAttributeName,
    QueueAttributeName,
};

use super::{COPY_ATTRIBUTE, MessageTimes, Queue, QueueError, RawMessage};

#[derive(Clone, Debug)]
pub struct SqsQueue {
    client: aws_sdk_sqs::Client,
    url: String,
}

impl SqsQueue {
    pub fn new(client: aws_sdk_sqs::Client, url: impl Into<String>) -> Self {
        Self {
            client,
            url: url.into(),
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }
}

fn secs(d: Duration) -> i32 {
    d.as_secs().min(i32::MAX as u64) as i32
}

#[async_trait]
impl Queue for SqsQueue {
    async fn receive(
        &self,
        max: i32,
        wait: Duration,
        visibility: Duration,
    ) -> Result<Vec<RawMessage>, QueueError> {
        let out = self
            .client
            .receive_message()
            .queue_url(&self.url)
            .max_number_of_messages(max)
            .wait_time_seconds(secs(wait))
            .visibility_timeout(secs(visibility))
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            // For the stage histograms (cdc_worker_stage_seconds).
            .message_system_attribute_names(MessageSystemAttributeName::SentTimestamp)
            .message_system_attribute_names(
                MessageSystemAttributeName::ApproximateFirstReceiveTimestamp,
            )
            .message_attribute_names(COPY_ATTRIBUTE)
            .send()
            .await
            .map_err(|e| QueueError::Receive {
                queue: self.url.clone(),
                message: crate::aws::explain(&e).to_string(),
            })?;
        Ok(out
            .messages
            .unwrap_or_default()
            .into_iter()
            .filter_map(|m| {
                let attribute = |name: MessageSystemAttributeName| {
                    m.attributes()
                        .and_then(|a| a.get(&name))
                        .map(String::as_str)
                };
                let receive_count = attribute(MessageSystemAttributeName::ApproximateReceiveCount)
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(1);
                let copy = m
                    .message_attributes()
                    .is_some_and(|a| a.contains_key(COPY_ATTRIBUTE));
                let times = MessageTimes::received_now(
                    attribute(MessageSystemAttributeName::SentTimestamp),
                    attribute(MessageSystemAttributeName::ApproximateFirstReceiveTimestamp),
                    copy,
                );
                Some(RawMessage {
                    message_id: m.message_id?,
                    receipt_handle: m.receipt_handle?,
                    body: m.body.unwrap_or_default(),
                    receive_count,
                    times,
                })
            })
            .collect())
    }

    async fn delete(&self, receipt_handles: &[String]) -> Result<Vec<String>, QueueError> {
        if receipt_handles.is_empty() {
            return Ok(vec![]);
        }
        let entries = receipt_handles
            .iter()
            .enumerate()
            .map(|(i, h)| {
                DeleteMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(h)
                    .build()
                    .expect("id and handle set")
            })
            .collect();
        let out = self
            .client
            .delete_message_batch()
            .queue_url(&self.url)
            .set_entries(Some(entries))
            .send()
            .await
            .map_err(|e| QueueError::Delete {
                queue: self.url.clone(),
                message: crate::aws::explain(&e).to_string(),
            })?;
        Ok(out
            .failed()
            .iter()
            .filter_map(|f| f.id().parse::<usize>().ok())
            .filter_map(|i| receipt_handles.get(i).cloned())
            .collect())
    }

    async fn set_visibility(
        &self,
        receipt_handle: &str,
        timeout: Duration,
    ) -> Result<(), QueueError> {
        self.client
            .change_message_visibility()
            .queue_url(&self.url)
            .receipt_handle(receipt_handle)
            .visibility_timeout(secs(timeout))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| QueueError::Visibility {
                queue: self.url.clone(),
                message: crate::aws::explain(&e).to_string(),
            })
    }

    async fn send(&self, body: &str) -> Result<(), QueueError> {
        self.client
            .send_message()
            .queue_url(&self.url)
            .message_body(body)
            .message_attributes(
                COPY_ATTRIBUTE,
                MessageAttributeValue::builder()
                    .data_type("String")
                    .string_value("1")
                    .build()
                    .expect("data type set"),
            )
            .send()
            .await
            .map(|_| ())
            .map_err(|e| QueueError::Send {
                queue: self.url.clone(),
                message: crate::aws::explain(&e).to_string(),
            })
    }

    async fn ping(&self) -> Result<(), QueueError> {
        self.client
            .get_queue_attributes()
            .queue_url(&self.url)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| QueueError::Receive {
                queue: self.url.clone(),
                message: crate::aws::explain(&e).to_string(),
            })
    }
}
