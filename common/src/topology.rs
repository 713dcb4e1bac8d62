//! The pipeline's JetStream objects: the input stream, the dead-letter stream, the
//! idempotency KV bucket and the durable pull consumer. One description, used by
//! the operator (from the CRD) and by `order-worker --create-topology` (defaults).

use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv, stream};

use crate::names;

/// What the pipeline needs in JetStream.
#[derive(Clone, Debug, PartialEq)]
pub struct Topology {
    pub stream: String,
    pub subjects: Vec<String>,
    pub retention: stream::RetentionPolicy,
    pub storage: stream::StorageType,
    pub replicas: usize,
    pub max_age: Duration,
    pub max_bytes: i64,
    pub duplicate_window: Duration,
    pub dlq_stream: String,
    pub dlq_subject: String,
    pub dlq_max_age: Duration,
    pub bucket: String,
    pub bucket_ttl: Duration,
    pub consumer: String,
    pub filter_subject: String,
    pub ack_wait: Duration,
    pub max_ack_pending: i64,
    pub backoff: Vec<Duration>,
    /// Who manages these objects (`namespace/name` of the pipeline), recorded in
    /// the stream's and consumer's metadata so a foreign stream is recognised.
    pub owner: Option<String>,
}

/// Metadata key naming the pipeline that manages a stream or consumer.
pub const OWNER_METADATA_KEY: &str = "orderpipeline.dev/owner";

impl Default for Topology {
    fn default() -> Self {
        Self {
            stream: names::DEFAULT_STREAM.into(),
            subjects: vec![names::DEFAULT_STREAM_SUBJECTS.into()],
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            replicas: 1,
            max_age: Duration::from_secs(7 * 24 * 3600),
            max_bytes: -1,
            duplicate_window: Duration::from_secs(30 * 60),
            dlq_stream: names::DEFAULT_DLQ_STREAM.into(),
            dlq_subject: names::DEFAULT_DLQ_SUBJECT.into(),
            dlq_max_age: Duration::from_secs(30 * 24 * 3600),
            bucket: names::DEFAULT_STATE_BUCKET.into(),
            bucket_ttl: Duration::from_secs(7 * 24 * 3600),
            consumer: names::DEFAULT_CONSUMER.into(),
            filter_subject: names::DEFAULT_INPUT_SUBJECT.into(),
            ack_wait: Duration::from_secs(30),
            max_ack_pending: 1000,
            backoff: Vec::new(),
            owner: None,
        }
    }
}

/// A JetStream object the worker needs but cannot find.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error(
        "stream {0} does not exist; apply the OrderPipeline (the operator creates it) or run the worker with --create-topology"
    )]
    MissingStream(String),
    #[error(
        "consumer {consumer} on stream {stream} does not exist; apply the OrderPipeline or run the worker with --create-topology"
    )]
    MissingConsumer { stream: String, consumer: String },
    #[error(
        "dead-letter stream {0} does not exist; apply the OrderPipeline or run the worker with --create-topology"
    )]
    MissingDlq(String),
    #[error(
        "KV bucket {0} does not exist; apply the OrderPipeline or run the worker with --create-topology"
    )]
    MissingBucket(String),
    #[error(
        "the dead-letter subject {dlq} is matched by the stream's subject {pattern}; dead letters would be consumed again: pick a subject outside the stream's subjects"
    )]
    DlqOverlaps { dlq: String, pattern: String },
    #[error("JetStream request for {what} failed: {detail}")]
    Api { what: String, detail: String },
}

fn api(what: impl Into<String>, e: impl std::fmt::Display) -> TopologyError {
    TopologyError::Api {
        what: what.into(),
        detail: e.to_string(),
    }
}

impl Topology {
    /// Checks what can be checked without a server.
    pub fn validate(&self) -> Result<(), TopologyError> {
        if let Some(p) = self
            .subjects
            .iter()
            .find(|p| names::subjects_overlap(p, &self.dlq_subject))
        {
            return Err(TopologyError::DlqOverlaps {
                dlq: self.dlq_subject.clone(),
                pattern: p.clone(),
            });
        }
        Ok(())
    }

    fn metadata(&self) -> std::collections::HashMap<String, String> {
        self.owner
            .iter()
            .map(|o| (OWNER_METADATA_KEY.to_string(), o.clone()))
            .collect()
    }

    pub fn stream_config(&self) -> stream::Config {
        stream::Config {
            metadata: self.metadata(),
            name: self.stream.clone(),
            subjects: self.subjects.clone(),
            retention: self.retention,
            storage: self.storage,
            num_replicas: self.replicas,
            max_age: self.max_age,
            max_bytes: self.max_bytes,
            duplicate_window: self.duplicate_window,
            ..Default::default()
        }
    }

    pub fn dlq_stream_config(&self) -> stream::Config {
        stream::Config {
            metadata: self.metadata(),
            name: self.dlq_stream.clone(),
            subjects: vec![self.dlq_subject.clone()],
            retention: stream::RetentionPolicy::Limits,
            storage: self.storage,
            num_replicas: self.replicas,
            max_age: self.dlq_max_age,
            max_bytes: -1,
            duplicate_window: self.duplicate_window,
            ..Default::default()
        }
    }

    pub fn kv_config(&self) -> kv::Config {
        kv::Config {
            bucket: self.bucket.clone(),
            description: format!("order state of stream {}", self.stream),
            history: 1,
            max_age: self.bucket_ttl.max(self.max_age),
            storage: self.storage,
            num_replicas: self.replicas,
            ..Default::default()
        }
    }

    pub fn consumer_config(&self) -> consumer::pull::Config {
        consumer::pull::Config {
            durable_name: Some(self.consumer.clone()),
            filter_subject: self.filter_subject.clone(),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: self.ack_wait,
            // Unlimited: the workers count attempts and dead-letter themselves, so a
            // final delivery that dies with its worker is redelivered, not stranded.
            max_deliver: -1,
            max_ack_pending: self.max_ack_pending,
            backoff: self.backoff.clone(),
            deliver_policy: consumer::DeliverPolicy::All,
            metadata: self.metadata(),
            ..Default::default()
        }
    }

    /// Creates every object, or updates the fields NATS can change in place.
    pub async fn ensure(&self, js: &jetstream::Context) -> Result<(), TopologyError> {
        self.validate()?;
        js.create_or_update_stream(self.stream_config())
            .await
            .map_err(|e| api(format!("stream {}", self.stream), e))?;
        js.create_or_update_stream(self.dlq_stream_config())
            .await
            .map_err(|e| api(format!("stream {}", self.dlq_stream), e))?;
        js.create_or_update_key_value(self.kv_config())
            .await
            .map_err(|e| api(format!("KV bucket {}", self.bucket), e))?;
        js.create_consumer_on_stream(self.consumer_config(), self.stream.as_str())
            .await
            .map_err(|e| api(format!("consumer {}", self.consumer), e))?;
        Ok(())
    }
}

/// Handles to the objects a worker uses.
pub struct Bound {
    pub consumer: consumer::PullConsumer,
    pub consumer_info: consumer::Info,
    pub state: kv::Store,
}

/// Finds the consumer, the dead-letter stream and the KV bucket; a missing one
/// is an error naming it.
pub async fn bind(
    js: &jetstream::Context,
    stream: &str,
    consumer: &str,
    dlq_stream: &str,
    bucket: &str,
) -> Result<Bound, TopologyError> {
    use jetstream::context::{GetStreamErrorKind, KeyValueErrorKind};
    let s = js.get_stream(stream).await.map_err(|e| match e.kind() {
        GetStreamErrorKind::JetStream(j) if j.code() == 404 => {
            TopologyError::MissingStream(stream.into())
        }
        _ => api(format!("stream {stream}"), e),
    })?;
    let c: consumer::PullConsumer = s.get_consumer(consumer).await.map_err(|e| {
        if e.to_string().contains("not found") {
            TopologyError::MissingConsumer {
                stream: stream.into(),
                consumer: consumer.into(),
            }
        } else {
            api(format!("consumer {consumer}"), e)
        }
    })?;
    let consumer_info = s
        .consumer_info(consumer)
        .await
        .map_err(|e| api(format!("consumer {consumer}"), e))?;
    js.get_stream(dlq_stream)
        .await
        .map_err(|e| match e.kind() {
            GetStreamErrorKind::JetStream(j) if j.code() == 404 => {
                TopologyError::MissingDlq(dlq_stream.into())
            }
            _ => api(format!("stream {dlq_stream}"), e),
        })?;
    let state = js.get_key_value(bucket).await.map_err(|e| match e.kind() {
        KeyValueErrorKind::GetBucket => TopologyError::MissingBucket(bucket.into()),
        _ => api(format!("KV bucket {bucket}"), e),
    })?;
    Ok(Bound {
        consumer: c,
        consumer_info,
        state,
    })
}

/// The longest time between an order's first delivery and its last possible
/// redelivery: what the stream's `duplicate_window` must cover so a result event
/// re-published on a late redelivery is still deduplicated.
pub fn redelivery_horizon(
    ack_wait: Duration,
    backoff: &[Duration],
    max_deliveries: u32,
    max_nak_delay: Duration,
    delivery_budget: Duration,
) -> Duration {
    let per_delivery_wait = |n: u32| -> Duration {
        if backoff.is_empty() {
            ack_wait
        } else {
            backoff[(n as usize).min(backoff.len() - 1)]
        }
    };
    (0..max_deliveries)
        .map(|n| per_delivery_wait(n).max(max_nak_delay) + delivery_budget)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_dlq_subject_is_outside_the_stream() {
        Topology::default()
            .validate()
            .expect("defaults are consistent");
    }

    #[test]
    fn overlapping_dlq_subject_is_refused_naming_both() {
        let t = Topology {
            dlq_subject: "ORDER.dead".into(),
            ..Default::default()
        };
        let e = t.validate().unwrap_err().to_string();
        assert!(e.contains("ORDER.dead") && e.contains("ORDER.*"), "{e}");
    }

    #[test]
    fn consumer_never_relies_on_server_max_deliver() {
        assert_eq!(Topology::default().consumer_config().max_deliver, -1);
    }

    #[test]
    fn default_duplicate_window_covers_default_redelivery_horizon() {
        let t = Topology::default();
        let h = redelivery_horizon(
            t.ack_wait,
            &t.backoff,
            5,
            Duration::from_secs(60),
            Duration::from_secs(30),
        );
        assert!(t.duplicate_window >= h, "{h:?} > {:?}", t.duplicate_window);
    }

    #[test]
    fn horizon_uses_backoff_when_set() {
        let h = redelivery_horizon(
            Duration::from_secs(30),
            &[Duration::from_secs(1), Duration::from_secs(10)],
            3,
            Duration::ZERO,
            Duration::ZERO,
        );
        assert_eq!(h, Duration::from_secs(21));
    }
}
