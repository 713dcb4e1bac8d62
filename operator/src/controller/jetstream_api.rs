//! The JetStream requests the operator makes, as one small trait: `Live` sends
//! them to a real server; `Fake` (tests) keeps the objects in memory, and an
//! outage is the fake answering with errors. The reconcile steps see only this.

use async_nats::jetstream::{self, consumer, kv, stream};

/// A stream's configuration and the figures the status shows.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct StreamView {
    pub(crate) config: stream::Config,
    pub(crate) messages: u64,
    pub(crate) bytes: u64,
    pub(crate) first_sequence: u64,
    pub(crate) last_sequence: u64,
    /// Distinct subjects stored: one per order with an outcome (the server
    /// keeps each in its in-memory index), plus the input subject.
    pub(crate) subjects: u64,
    /// When NATS created it (unix ns): a stream deleted and recreated under the
    /// same name is another stream, with its sequences starting again.
    pub(crate) created: Option<i128>,
}

/// A consumer's configuration and figures.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct ConsumerView {
    pub(crate) config: consumer::Config,
    pub(crate) pending: u64,
    pub(crate) ack_pending: usize,
    pub(crate) redelivered: usize,
    pub(crate) paused: bool,
    /// Where the consumer stands: the last stream sequence it delivered, its
    /// deliveries so far (redeliveries included), and its ack floor.
    pub(crate) cursor: Cursor,
}

/// A consumer's position in its stream (see [`super::retention`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Cursor {
    /// `delivered.stream_seq`: inputs above it were never delivered.
    pub(crate) delivered_stream_seq: u64,
    /// `delivered.consumer_seq`: one per delivery, redeliveries included; a
    /// skip over removed messages does not move it.
    pub(crate) deliveries: u64,
    /// `ack_floor.stream_seq`: every input at or below it was acknowledged.
    pub(crate) ack_floor_stream_seq: u64,
}

/// Why a JetStream request failed: NATS did not answer (or the connection is
/// gone), or the server refused it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum JsError {
    #[error("NATS did not answer: {0}")]
    Unreachable(String),
    #[error("{0}")]
    Api(String),
}

impl JsError {
    fn of(e: &(dyn std::error::Error + 'static)) -> Self {
        let s = e.to_string();
        if s.contains("timed out") || s.contains("no responders") || s.contains("disconnected") {
            JsError::Unreachable(s)
        } else {
            JsError::Api(s)
        }
    }
}

#[async_trait::async_trait]
pub(crate) trait JetStream: Send + Sync {
    /// `None`: no such stream.
    async fn stream(&self, name: &str) -> Result<Option<StreamView>, JsError>;
    async fn create_stream(&self, cfg: stream::Config) -> Result<(), JsError>;
    async fn update_stream(&self, cfg: stream::Config) -> Result<(), JsError>;
    /// `false`: it was not there.
    async fn delete_stream(&self, name: &str) -> Result<bool, JsError>;
    /// `None`: no such consumer (or stream).
    async fn consumer(&self, stream: &str, name: &str) -> Result<Option<ConsumerView>, JsError>;
    /// Creates the consumer or rewrites its configuration.
    async fn put_consumer(&self, stream: &str, cfg: consumer::pull::Config) -> Result<(), JsError>;
    async fn set_paused(&self, stream: &str, name: &str, paused: bool) -> Result<(), JsError>;
    /// When the first message on `subject` at or after `from_seq` was stored
    /// (unix seconds); `None` when there is none.
    async fn stored_at(
        &self,
        stream: &str,
        subject: &str,
        from_seq: u64,
    ) -> Result<Option<i64>, JsError>;
    /// Creates the KV bucket or updates its settings.
    async fn put_bucket(&self, cfg: kv::Config) -> Result<(), JsError>;
    /// `false`: it was not there.
    async fn delete_bucket(&self, name: &str) -> Result<bool, JsError>;
}

/// A consumer pause that lasts until `spec.paused` is set back to false.
pub(crate) fn pause_forever() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc() + time::Duration::days(365 * 100)
}

/// JetStream on a real connection.
pub(crate) struct Live(pub(crate) jetstream::Context);

impl Live {
    /// A handle on stream `name`, without a request for its info.
    async fn handle(&self, name: &str) -> Result<stream::Stream<()>, JsError> {
        self.0
            .get_stream_no_info(name)
            .await
            .map_err(|e| JsError::of(&e))
    }
}

#[async_trait::async_trait]
impl JetStream for Live {
    async fn stream(&self, name: &str) -> Result<Option<StreamView>, JsError> {
        // One STREAM.INFO request: the info `get_stream` fetched is the answer.
        let s = match self.0.get_stream(name).await {
            Ok(s) => s,
            Err(e) if orderpipeline_common::nats::is_not_found(&e) => return Ok(None),
            Err(e) => return Err(JsError::of(&e)),
        };
        let info = s.cached_info();
        Ok(Some(StreamView {
            config: info.config.clone(),
            messages: info.state.messages,
            bytes: info.state.bytes,
            first_sequence: info.state.first_sequence,
            last_sequence: info.state.last_sequence,
            subjects: info.state.subjects_count,
            created: Some(info.created.unix_timestamp_nanos()),
        }))
    }

    async fn create_stream(&self, cfg: stream::Config) -> Result<(), JsError> {
        self.0
            .create_stream(cfg)
            .await
            .map_err(|e| JsError::of(&e))?;
        Ok(())
    }

    async fn update_stream(&self, cfg: stream::Config) -> Result<(), JsError> {
        self.0
            .update_stream(cfg)
            .await
            .map_err(|e| JsError::of(&e))?;
        Ok(())
    }

    async fn delete_stream(&self, name: &str) -> Result<bool, JsError> {
        match self.0.delete_stream(name).await {
            Ok(_) => Ok(true),
            Err(e) if orderpipeline_common::nats::is_not_found(&e) => Ok(false),
            Err(e) => Err(JsError::of(&e)),
        }
    }

    async fn consumer(&self, stream: &str, name: &str) -> Result<Option<ConsumerView>, JsError> {
        // CONSUMER.INFO alone (a missing stream answers "not found" there too).
        let s = self.handle(stream).await?;
        match s.consumer_info(name).await {
            Ok(c) => Ok(Some(ConsumerView {
                config: c.config.clone(),
                pending: c.num_pending,
                ack_pending: c.num_ack_pending,
                redelivered: c.num_redelivered,
                paused: c.paused,
                cursor: Cursor {
                    delivered_stream_seq: c.delivered.stream_sequence,
                    deliveries: c.delivered.consumer_sequence,
                    ack_floor_stream_seq: c.ack_floor.stream_sequence,
                },
            })),
            Err(e) if orderpipeline_common::nats::is_not_found(&e) => Ok(None),
            Err(e) => Err(JsError::of(&e)),
        }
    }

    async fn put_consumer(&self, stream: &str, cfg: consumer::pull::Config) -> Result<(), JsError> {
        let s = self.handle(stream).await?;
        s.create_consumer(cfg).await.map_err(|e| JsError::of(&e))?;
        Ok(())
    }

    async fn set_paused(&self, stream: &str, name: &str, paused: bool) -> Result<(), JsError> {
        let s = self.handle(stream).await?;
        if paused {
            s.pause_consumer(name, pause_forever())
                .await
                .map_err(|e| JsError::of(&e))?;
        } else {
            s.resume_consumer(name).await.map_err(|e| JsError::of(&e))?;
        }
        Ok(())
    }

    async fn stored_at(
        &self,
        stream: &str,
        subject: &str,
        from_seq: u64,
    ) -> Result<Option<i64>, JsError> {
        let s = self.handle(stream).await?;
        match s
            .get_first_raw_message_by_subject(subject, from_seq.max(1))
            .await
        {
            Ok(m) => Ok(Some(m.time.unix_timestamp())),
            Err(e) if e.kind() == stream::RawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(JsError::of(&e)),
        }
    }

    async fn put_bucket(&self, cfg: kv::Config) -> Result<(), JsError> {
        self.0
            .create_or_update_key_value(cfg)
            .await
            .map_err(|e| JsError::of(&e))?;
        Ok(())
    }

    async fn delete_bucket(&self, name: &str) -> Result<bool, JsError> {
        match self.0.delete_key_value(name).await {
            Ok(_) => Ok(true),
            Err(e) if orderpipeline_common::nats::is_not_found(&e) => Ok(false),
            Err(e) => Err(JsError::of(&e)),
        }
    }
}

/// JetStream in memory, for the reconcile tests: streams and consumers by name;
/// `outage` makes every request fail as an unreachable NATS does; `requests`
/// records what was asked.
#[cfg(test)]
#[derive(Default)]
pub(crate) struct Fake {
    pub(crate) streams: std::sync::Mutex<std::collections::BTreeMap<String, StreamView>>,
    pub(crate) consumers:
        std::sync::Mutex<std::collections::BTreeMap<(String, String), ConsumerView>>,
    pub(crate) outage: std::sync::atomic::AtomicBool,
    pub(crate) requests: std::sync::Mutex<Vec<String>>,
    /// What `stored_at` answers (unix seconds), whatever it is asked.
    pub(crate) oldest_stored_at: std::sync::Mutex<Option<i64>>,
}

/// The Fake's creation times: one per stream it creates.
#[cfg(test)]
static CREATED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1_000);

#[cfg(test)]
impl Fake {
    fn call(&self, what: String) -> Result<(), JsError> {
        self.requests.lock().unwrap().push(what);
        if self.outage.load(std::sync::atomic::Ordering::SeqCst) {
            Err(JsError::Unreachable("request timed out".into()))
        } else {
            Ok(())
        }
    }

    /// The requests that changed something (not the reads), in order.
    pub(crate) fn writes(&self) -> Vec<String> {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|r| !r.starts_with("read"))
            .cloned()
            .collect()
    }
}

#[cfg(test)]
#[async_trait::async_trait]
impl JetStream for Fake {
    async fn stream(&self, name: &str) -> Result<Option<StreamView>, JsError> {
        self.call(format!("read stream {name}"))?;
        Ok(self.streams.lock().unwrap().get(name).cloned())
    }

    async fn create_stream(&self, cfg: stream::Config) -> Result<(), JsError> {
        self.call(format!("create stream {}", cfg.name))?;
        let mut streams = self.streams.lock().unwrap();
        let view = StreamView {
            config: cfg.clone(),
            // Each stream created here is another one.
            created: Some(i128::from(
                CREATED.fetch_add(1, std::sync::atomic::Ordering::SeqCst),
            )),
            ..Default::default()
        };
        streams.insert(cfg.name, view);
        Ok(())
    }

    async fn update_stream(&self, cfg: stream::Config) -> Result<(), JsError> {
        self.call(format!("update stream {}", cfg.name))?;
        let mut streams = self.streams.lock().unwrap();
        let s = streams
            .get_mut(&cfg.name)
            .ok_or_else(|| JsError::Api("stream not found".into()))?;
        s.config = cfg;
        Ok(())
    }

    async fn delete_stream(&self, name: &str) -> Result<bool, JsError> {
        self.call(format!("delete stream {name}"))?;
        self.consumers.lock().unwrap().retain(|(s, _), _| s != name);
        Ok(self.streams.lock().unwrap().remove(name).is_some())
    }

    async fn consumer(&self, stream: &str, name: &str) -> Result<Option<ConsumerView>, JsError> {
        self.call(format!("read consumer {stream}/{name}"))?;
        let key = (stream.to_string(), name.to_string());
        Ok(self.consumers.lock().unwrap().get(&key).cloned())
    }

    async fn put_consumer(&self, stream: &str, cfg: consumer::pull::Config) -> Result<(), JsError> {
        let name = cfg.durable_name.clone().unwrap_or_default();
        self.call(format!("put consumer {stream}/{name}"))?;
        // As the server stores it: with a backoff, the ack wait is its first step.
        let config = consumer::Config {
            durable_name: cfg.durable_name.clone(),
            filter_subject: cfg.filter_subject.clone(),
            ack_wait: cfg.backoff.first().copied().unwrap_or(cfg.ack_wait),
            backoff: cfg.backoff.clone(),
            max_ack_pending: cfg.max_ack_pending,
            max_deliver: cfg.max_deliver,
            deliver_policy: cfg.deliver_policy,
            ..Default::default()
        };
        let paused = cfg.pause_until.is_some();
        let view = ConsumerView {
            config,
            paused,
            ..Default::default()
        };
        let key = (stream.to_string(), name);
        self.consumers.lock().unwrap().insert(key, view);
        Ok(())
    }

    async fn set_paused(&self, stream: &str, name: &str, paused: bool) -> Result<(), JsError> {
        self.call(format!("pause consumer {stream}/{name} {paused}"))?;
        let key = (stream.to_string(), name.to_string());
        if let Some(c) = self.consumers.lock().unwrap().get_mut(&key) {
            c.paused = paused;
        }
        Ok(())
    }

    async fn stored_at(
        &self,
        stream: &str,
        subject: &str,
        from_seq: u64,
    ) -> Result<Option<i64>, JsError> {
        self.call(format!("read first {subject} in {stream} from {from_seq}"))?;
        Ok(*self.oldest_stored_at.lock().unwrap())
    }

    async fn put_bucket(&self, cfg: kv::Config) -> Result<(), JsError> {
        self.call(format!("put bucket {}", cfg.bucket))?;
        let stream = stream::Config {
            name: format!("KV_{}", cfg.bucket),
            max_age: cfg.max_age,
            num_replicas: cfg.num_replicas,
            ..Default::default()
        };
        let view = StreamView {
            config: stream,
            ..Default::default()
        };
        let name = view.config.name.clone();
        self.streams.lock().unwrap().insert(name, view);
        Ok(())
    }

    async fn delete_bucket(&self, name: &str) -> Result<bool, JsError> {
        self.call(format!("delete bucket {name}"))?;
        Ok(self
            .streams
            .lock()
            .unwrap()
            .remove(&format!("KV_{name}"))
            .is_some())
    }
}
