//! The pipeline's JetStream objects: the input stream (which also holds every
//! input's outcome on `<prefix>.<kind>.<key>`, see [`names::OutcomeSubjects`]), the
//! dead-letter stream (sourcing the `deadlettered` outcomes), the KV bucket of
//! earlier versions and the durable pull consumer. One description, used by the
//! operator (from the CRD) and by `order-worker --create-topology` (defaults).

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
    /// The Idempotency-Key scope pinned in the input stream's metadata when it
    /// is created (`names::IDEMPOTENCY_SCOPE_METADATA`); `None`: none pinned.
    pub idempotency_scope: Option<String>,
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
            idempotency_scope: None,
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
    #[error(
        "the consumer's filter subject {0} has no prefix for the outcome subjects; use a subject of two or more tokens ending in a literal token, e.g. ORDER.created (outcomes then go to ORDER.processed.<key>, ORDER.rejected.<key> and ORDER.deadlettered.<key>)"
    )]
    NoOutcomePrefix(String),
    #[error(
        "the consumer's filter subject {filter} matches the outcome subject {outcome}; the workers would consume their own results: narrow the filter to the input subject, e.g. {example}"
    )]
    FilterMatchesOutcomes {
        filter: String,
        outcome: String,
        example: String,
    },
    #[error(
        "stream subject {subject} also captures {prefix}.<word>.<key> subjects, which the outcome check would count as outcomes; capture only the input subjects (e.g. {prefix}.*): the operator adds {prefix}.processed.*, {prefix}.rejected.* and {prefix}.deadlettered.* itself"
    )]
    SubjectsCaptureOutcomeSpace { subject: String, prefix: String },
    #[error(
        "stream retention {0} removes messages nobody consumes, and the stream keeps each input's outcome (the record that makes it exactly once); use retention Limits (to migrate an existing stream: create a new pipeline with Limits retention, move producers to its subjects, and delete the old one once its consumer is drained)"
    )]
    RetentionUnsafe(&'static str),
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
    /// Where the pipeline's outcomes go.
    pub fn outcome_subjects(&self) -> Result<names::OutcomeSubjects, TopologyError> {
        names::OutcomeSubjects::for_filter(&self.filter_subject)
            .ok_or_else(|| TopologyError::NoOutcomePrefix(self.filter_subject.clone()))
    }

    /// The input stream's subjects: the spec's plus the outcome subjects the spec's
    /// do not already capture.
    pub fn stream_subjects(&self) -> Vec<String> {
        let mut subjects = self.subjects.clone();
        if let Ok(o) = self.outcome_subjects() {
            for kind in names::OutcomeKind::ALL {
                let all = o.all_of(kind);
                if !subjects.iter().any(|p| names::subject_matches(p, &all)) {
                    subjects.push(all);
                }
            }
        }
        subjects
    }

    /// Checks what can be checked without a server.
    pub fn validate(&self) -> Result<(), TopologyError> {
        let outcomes = self.outcome_subjects()?;
        let space = format!("{}.*.*", outcomes.prefix);
        if let Some(p) = self
            .subjects
            .iter()
            .find(|p| names::subjects_overlap(p, &space))
        {
            return Err(TopologyError::SubjectsCaptureOutcomeSpace {
                subject: p.clone(),
                prefix: outcomes.prefix.clone(),
            });
        }
        for kind in names::OutcomeKind::ALL {
            let all = outcomes.all_of(kind);
            if names::subjects_overlap(&self.filter_subject, &all) {
                return Err(TopologyError::FilterMatchesOutcomes {
                    filter: self.filter_subject.clone(),
                    outcome: all,
                    example: format!("{}.created", outcomes.prefix),
                });
            }
            if names::subjects_overlap(&self.dlq_subject, &all) {
                return Err(TopologyError::DlqOverlaps {
                    dlq: self.dlq_subject.clone(),
                    pattern: all,
                });
            }
        }
        match self.retention {
            stream::RetentionPolicy::Limits => {}
            stream::RetentionPolicy::Interest => {
                return Err(TopologyError::RetentionUnsafe("Interest"));
            }
            stream::RetentionPolicy::WorkQueue => {
                return Err(TopologyError::RetentionUnsafe("WorkQueue"));
            }
        }
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
        let mut metadata = self.metadata();
        if let Some(scope) = &self.idempotency_scope {
            metadata.insert(names::IDEMPOTENCY_SCOPE_METADATA.into(), scope.clone());
        }
        stream::Config {
            metadata,
            name: self.stream.clone(),
            subjects: self.stream_subjects(),
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
            // The dead letters are the input stream's `deadlettered` outcomes, copied
            // here by the server (the worker writes each once, conditionally).
            sources: self.outcome_subjects().ok().map(|o| {
                vec![stream::Source {
                    name: self.stream.clone(),
                    filter_subject: Some(o.all_of(names::OutcomeKind::DeadLettered)),
                    ..Default::default()
                }]
            }),
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
        js.create_consumer_on_stream(self.consumer_config(), self.stream.as_str())
            .await
            .map_err(|e| api(format!("consumer {}", self.consumer), e))?;
        Ok(())
    }
}

/// A stream's creation time in ns since the epoch: part of the position keys, so
/// the worker and the audit must compute it alike.
pub fn unix_ns(t: time::OffsetDateTime) -> u128 {
    u128::try_from(t.unix_timestamp_nanos()).unwrap_or(0)
}

/// Handles to the objects a worker uses.
pub struct Bound {
    pub consumer: consumer::PullConsumer,
    pub consumer_info: consumer::Info,
    /// The input stream (it also holds the outcomes).
    pub stream: stream::Stream,
    /// Its creation time in ns since the epoch (part of position keys).
    pub stream_created_ns: u128,
    /// Its configuration, as the server holds it.
    pub stream_config: stream::Config,
    pub dlq: stream::Stream,
}

/// Finds the stream, the consumer and the dead-letter stream; a missing one is
/// an error naming it.
pub async fn bind(
    js: &jetstream::Context,
    stream: &str,
    consumer: &str,
    dlq_stream: &str,
) -> Result<Bound, TopologyError> {
    use jetstream::context::GetStreamErrorKind;
    let mut s = js.get_stream(stream).await.map_err(|e| match e.kind() {
        GetStreamErrorKind::JetStream(j) if j.code() == 404 => {
            TopologyError::MissingStream(stream.into())
        }
        _ => api(format!("stream {stream}"), e),
    })?;
    let info = s
        .info()
        .await
        .map_err(|e| api(format!("stream {stream}"), e))?;
    let (created, stream_config) = (info.created, info.config.clone());
    let c: consumer::PullConsumer = s.get_consumer(consumer).await.map_err(|e| {
        if crate::nats::is_not_found(&*e) {
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
    let dlq = js
        .get_stream(dlq_stream)
        .await
        .map_err(|e| match e.kind() {
            GetStreamErrorKind::JetStream(j) if j.code() == 404 => {
                TopologyError::MissingDlq(dlq_stream.into())
            }
            _ => api(format!("stream {dlq_stream}"), e),
        })?;
    Ok(Bound {
        consumer: c,
        consumer_info,
        stream_created_ns: unix_ns(created),
        stream_config,
        stream: s,
        dlq,
    })
}

/// The ways the live stream and consumer contradict a worker whose input
/// subject is `input_subject`, each a sentence naming the setting, its value and
/// the fix. Consuming despite one would write outcomes where no reader looks,
/// let the server delete or strand orders, or fail every outcome write.
pub fn contradictions(
    input_subject: &str,
    stream: &stream::Config,
    consumer: &consumer::Config,
) -> Vec<String> {
    let mut out = Vec::new();
    let (s, c) = (
        &stream.name,
        consumer.durable_name.as_deref().unwrap_or("?"),
    );
    let filters: Vec<&str> = if consumer.filter_subjects.is_empty() {
        vec![consumer.filter_subject.as_str()]
    } else {
        consumer
            .filter_subjects
            .iter()
            .map(String::as_str)
            .collect()
    };
    if filters != [input_subject] {
        out.push(format!(
            "INPUT_SUBJECT is {input_subject} but consumer {c} on stream {s} filters {filters:?}: the worker would take another pipeline's orders or write its outcomes under the wrong prefix; set INPUT_SUBJECT to the consumer's filter (the operator renders it), or CONSUMER_NAME to this pipeline's consumer"
        ));
    }
    let retention = match stream.retention {
        stream::RetentionPolicy::Limits => None,
        stream::RetentionPolicy::Interest => Some("Interest"),
        stream::RetentionPolicy::WorkQueue => Some("WorkQueue"),
    };
    if let Some(r) = retention {
        out.push(format!("stream {s}: {}", TopologyError::RetentionUnsafe(r)));
    }
    if consumer.max_deliver > 0 {
        out.push(format!(
            "consumer {c} has max_deliver {}: the server stops delivering an order after that many tries and strands it without an outcome; set max_deliver to -1 (the worker counts attempts itself, MAX_DELIVERIES)",
            consumer.max_deliver
        ));
    }
    if consumer.ack_policy != consumer::AckPolicy::Explicit {
        out.push(format!(
            "consumer {c} has ack policy {:?}: an order would count as done before its outcome is written; set ack_policy explicit",
            consumer.ack_policy
        ));
    }
    if let Some(o) = names::OutcomeSubjects::for_filter(input_subject) {
        for kind in names::OutcomeKind::ALL {
            let example = o.subject(kind, "k");
            if !stream
                .subjects
                .iter()
                .any(|p| names::subject_matches(p, &example))
            {
                out.push(format!(
                    "stream {s} (subjects {:?}) does not capture {}: every outcome write would fail; add it to the stream's subjects (the operator does)",
                    stream.subjects,
                    o.all_of(kind)
                ));
            }
        }
    }
    out
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
    fn stream_subjects_that_capture_the_outcome_space_are_refused() {
        for subjects in [
            vec!["ORDER.>".to_string()],
            vec!["ORDER.*".into(), "ORDER.*.*".into()],
        ] {
            let t = Topology {
                subjects,
                ..Default::default()
            };
            let e = t.validate().unwrap_err().to_string();
            assert!(
                e.contains("ORDER.<word>.<key>") && e.contains("ORDER.*"),
                "{e}"
            );
        }
    }

    /// The consumer's configuration as the server reports it.
    fn live(t: &Topology) -> consumer::Config {
        use consumer::IntoConsumerConfig as _;
        t.consumer_config().into_consumer_config()
    }

    #[test]
    fn the_default_topology_does_not_contradict_its_workers() {
        let t = Topology::default();
        assert_eq!(
            contradictions("ORDER.created", &t.stream_config(), &live(&t)),
            Vec::<String>::new()
        );
    }

    #[test]
    fn each_contradiction_names_the_setting_and_the_fix() {
        let t = Topology::default();
        type Break = fn(&mut stream::Config, &mut consumer::Config);
        let cases: Vec<(&str, Break, &str)> = vec![
            (
                "ORDER.other",
                |_, _| {},
                "INPUT_SUBJECT is ORDER.other but consumer order-workers on stream ORDERS filters [\"ORDER.created\"]",
            ),
            (
                "ORDER.created",
                |s, _| s.retention = stream::RetentionPolicy::WorkQueue,
                "stream ORDERS: stream retention WorkQueue",
            ),
            (
                "ORDER.created",
                |_, c| c.max_deliver = 5,
                "consumer order-workers has max_deliver 5",
            ),
            (
                "ORDER.created",
                |_, c| c.ack_policy = consumer::AckPolicy::None,
                "ack policy None",
            ),
            (
                "ORDER.created",
                |s, _| s.subjects = vec!["ORDER.created".into()],
                "does not capture ORDER.processed.*",
            ),
        ];
        for (input, break_it, want) in cases {
            let (mut sc, mut cc) = (t.stream_config(), live(&t));
            break_it(&mut sc, &mut cc);
            let found = contradictions(input, &sc, &cc);
            assert!(found.iter().any(|f| f.contains(want)), "{want}: {found:?}");
        }
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
