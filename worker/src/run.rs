//! The worker process: HTTP probes, NATS connection, topology binding, and the
//! bounded pull loop (at most WORKER_POOL_SIZE orders in flight), with graceful
//! shutdown. [`run`] reads as its phases: serve the probes, connect, consume
//! (bind, open a pull stream, take the next message; one [`Phase`] at a time),
//! then give the buffered messages back, finish what is in flight and drain.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream;
use futures::{FutureExt as _, StreamExt as _};
use orderpipeline_common::names::{self, OutcomeSubjects};
use orderpipeline_common::nats::NatsConnectError;
use orderpipeline_common::topology::{self, Bound, Topology};
use prometheus_client::registry::Registry;
use tokio::sync::Semaphore;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::downstream::Downstream;
use crate::handler::{self, Ctx, Outcome};
use crate::health::{self, Readiness};
use crate::metrics::Metrics;

/// The pipeline's objects contradict the worker's flags (a consumer filtering
/// another subject, retention that deletes outcomes, a server-side max_deliver,
/// ...): the worker refuses to start (exit 2) rather than write outcomes where
/// nothing reads them or let orders be deleted or stranded.
#[derive(Debug, thiserror::Error)]
#[error("refusing to start: {0}")]
pub struct Misconfigured(pub String);

/// How long one pull request waits for messages before it is renewed.
const PULL_EXPIRES: Duration = Duration::from_secs(5);

/// The topology the worker's flags describe (used by `--create-topology`).
pub fn topology_from(cfg: &Config) -> Topology {
    Topology {
        stream: cfg.stream.clone(),
        consumer: cfg.consumer.clone(),
        filter_subject: cfg.input_subject.clone(),
        dlq_stream: cfg.dlq_stream.clone(),
        idempotency_scope: Some(cfg.pipeline.clone().unwrap_or_else(|| cfg.stream.clone())),
        ..Topology::default()
    }
}

/// Runs until `shutdown` fires, then finishes in-flight work within the grace
/// period, NAKs the rest and drains the connection.
pub async fn run(cfg: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    cfg.check().map_err(anyhow::Error::msg)?;
    let outcomes = cfg.outcome_subjects().map_err(anyhow::Error::msg)?;
    let probes = Probes::serve(&cfg, &shutdown).await?;
    let Some(client) = connect(&cfg, &probes.readiness, &shutdown).await? else {
        return probes.stop().await;
    };
    let _ = probes.client.set(client.clone());
    let js = jetstream::new(client.clone());
    if cfg.create_topology {
        topology_from(&cfg).ensure(&js).await?;
        tracing::info!(stream = %cfg.stream, consumer = %cfg.consumer, "topology created or updated");
    }
    let downstream = match &cfg.downstream_url {
        Some(u) => Some(Downstream::new(u, cfg.downstream_timeout).context("DOWNSTREAM_URL")?),
        None => None,
    };
    let mut consumer = Consumer::new(&cfg, js, outcomes, &probes, downstream);
    let buffered = match consumer.consume(&shutdown).await {
        Ok(b) => b,
        Err(refused) => {
            let _ = client.drain().await;
            shutdown.cancel();
            let _ = probes.stop().await;
            return Err(refused.into());
        }
    };
    consumer.give_back(buffered).await;
    consumer.finish_in_flight().await;
    // Everything acked or NAKed above must reach the server before the connection goes.
    let _ = tokio::time::timeout(Duration::from_secs(5), client.flush()).await;
    if let Err(e) = client.drain().await {
        tracing::warn!(error = %e, "draining the NATS connection failed");
    }
    probes.stop().await
}

/// The HTTP probes and metrics, served from the start.
struct Probes {
    metrics: Metrics,
    readiness: Arc<Readiness>,
    client: Arc<OnceLock<async_nats::Client>>,
    task: JoinHandle<std::io::Result<()>>,
}

impl Probes {
    async fn serve(cfg: &Config, shutdown: &CancellationToken) -> anyhow::Result<Self> {
        let mut registry = Registry::default();
        let metrics = Metrics::new(&mut registry);
        let readiness = Arc::new(Readiness::default());
        readiness.set_not_ready("connecting to NATS");
        let client: Arc<OnceLock<async_nats::Client>> = Arc::new(OnceLock::new());
        let listener = tokio::net::TcpListener::bind(cfg.http_addr)
            .await
            .with_context(|| {
                format!(
                    "HTTP_ADDR {}: cannot listen there; pick a free host:port",
                    cfg.http_addr
                )
            })?;
        let http = health::router(health::HealthState {
            client: client.clone(),
            readiness: readiness.clone(),
            registry: Arc::new(registry),
        });
        let stop = shutdown.clone();
        let task = tokio::spawn(async move {
            axum::serve(listener, http)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await
        });
        tracing::info!(addr = %cfg.http_addr, "serving /health /livez /readyz /metrics");
        Ok(Self {
            metrics,
            readiness,
            client,
            task,
        })
    }

    async fn stop(self) -> anyhow::Result<()> {
        let _ = self.task.await;
        tracing::info!("stopped");
        Ok(())
    }
}

/// Connects to NATS, retrying while it is unreachable; `None` when shutdown
/// came first. Wrong credentials or options are an error at once.
async fn connect(
    cfg: &Config,
    readiness: &Readiness,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<async_nats::Client>> {
    let auth = cfg.nats.auth()?;
    loop {
        match orderpipeline_common::nats::connect(&cfg.nats.nats_url, &auth, &cfg.worker_name())
            .await
        {
            Ok(c) => return Ok(Some(c)),
            Err(e @ (NatsConnectError::Authentication { .. } | NatsConnectError::Options(_))) => {
                return Err(e.into());
            }
            Err(e) => {
                tracing::warn!(error = %e, "NATS not reachable yet; retrying");
                readiness.set_not_ready(e.to_string());
                if !pause(Duration::from_secs(2), shutdown).await {
                    return Ok(None);
                }
            }
        }
    }
}

/// Waits `d`; `false` when shutdown fired first.
async fn pause(d: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => true,
        _ = shutdown.cancelled() => false,
    }
}

/// Where the pull loop stands (boxed: a phase moves on every message).
enum Phase {
    /// Not bound to the pipeline's objects (at start, or after an error).
    Unbound,
    /// Bound, no pull stream yet.
    Bound(Box<Binding>),
    /// Taking messages from one long-lived pull stream.
    Pulling(Box<Binding>, Box<jetstream::consumer::pull::Stream>),
    /// The objects contradict the flags at start: the worker does not start.
    Refused(String),
}

/// The handlers' context and the consumer of one binding.
struct Binding {
    ctx: Arc<Ctx>,
    consumer: jetstream::consumer::PullConsumer,
    /// One pull batch: the pool, within the consumer's max ack pending.
    batch: usize,
}

/// The pull loop and the orders in flight.
struct Consumer {
    cfg: Config,
    js: jetstream::Context,
    outcomes: OutcomeSubjects,
    metrics: Metrics,
    readiness: Arc<Readiness>,
    downstream: Option<Downstream>,
    worker: String,
    /// One slot per order in flight (WORKER_POOL_SIZE).
    slots: Arc<Semaphore>,
    tasks: JoinSet<Outcome>,
    /// Fires when the shutdown grace runs out: unfinished orders are NAKed.
    grace_expired: CancellationToken,
    /// Bound at least once: a contradiction found later (the objects changed
    /// under a running worker) stops consuming instead of the process.
    bound_once: bool,
}

impl Consumer {
    fn new(
        cfg: &Config,
        js: jetstream::Context,
        outcomes: OutcomeSubjects,
        probes: &Probes,
        downstream: Option<Downstream>,
    ) -> Self {
        Self {
            cfg: cfg.clone(),
            js,
            outcomes,
            metrics: probes.metrics.clone(),
            readiness: probes.readiness.clone(),
            downstream,
            worker: cfg.worker_name(),
            slots: Arc::new(Semaphore::new(cfg.worker_pool_size as usize)),
            tasks: JoinSet::new(),
            grace_expired: CancellationToken::new(),
            bound_once: false,
        }
    }

    fn pool(&self) -> usize {
        self.cfg.worker_pool_size as usize
    }

    /// Runs the phases until shutdown; returns the pull stream it had, whose
    /// buffered messages have not been started.
    async fn consume(
        &mut self,
        shutdown: &CancellationToken,
    ) -> Result<Option<jetstream::consumer::pull::Stream>, Misconfigured> {
        let mut phase = Phase::Unbound;
        while !shutdown.is_cancelled() {
            phase = match phase {
                Phase::Unbound => self.bind(shutdown).await,
                Phase::Bound(b) => self.open_pull(b, shutdown).await,
                Phase::Pulling(b, messages) => self.take_next(b, messages, shutdown).await,
                Phase::Refused(why) => return Err(Misconfigured(why)),
            };
        }
        Ok(match phase {
            Phase::Pulling(_, messages) => Some(*messages),
            _ => None,
        })
    }

    /// Binds to the stream, consumer and DLQ (and the legacy bucket when
    /// configured), reporting on /readyz why not while it cannot.
    async fn bind(&mut self, shutdown: &CancellationToken) -> Phase {
        let b = match topology::bind(
            &self.js,
            &self.cfg.stream,
            &self.cfg.consumer,
            &self.cfg.dlq_stream,
        )
        .await
        {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "not ready: cannot bind to the pipeline's JetStream objects");
                return self
                    .not_ready(e.to_string(), Duration::from_secs(2), shutdown)
                    .await;
            }
        };
        let problems = topology::contradictions(
            &self.cfg.input_subject,
            &b.stream_config,
            &b.consumer_info.config,
        );
        if !problems.is_empty() {
            let why = format!(
                "stream {} and consumer {} contradict this worker's configuration: {}",
                self.cfg.stream,
                self.cfg.consumer,
                problems.join("; ")
            );
            if !self.bound_once {
                return Phase::Refused(why);
            }
            tracing::error!("not consuming: {why}");
            return self.not_ready(why, Duration::from_secs(2), shutdown).await;
        }
        // The old protocol's bucket, when configured, must open: the worker does
        // not guess whether an order was done before v2.
        let legacy = match &self.cfg.legacy_state_bucket {
            Some(bucket) => match self.js.get_key_value(bucket).await {
                Ok(kv) => Some(kv),
                Err(e) => {
                    let why = format!(
                        "LEGACY_STATE_BUCKET {bucket} cannot be opened: {e}; it holds the records of the protocol before v2 (unset it once they have expired)"
                    );
                    tracing::warn!("not ready: {why}");
                    return self.not_ready(why, Duration::from_secs(2), shutdown).await;
                }
            },
            None => None,
        };
        let batch = self.batch_size(&b);
        let scope = names::idempotency_scope(
            &b.stream_config.metadata,
            self.cfg.pipeline.as_deref(),
            &self.cfg.stream,
        );
        let ctx = Arc::new(self.handler_context(
            b.stream,
            b.dlq,
            b.stream_created_ns,
            legacy,
            (b.consumer_info.config.ack_wait, scope),
        ));
        self.bound_once = true;
        self.readiness.set_ready();
        tracing::info!(version = orderpipeline_common::version::VERSION, stream = %self.cfg.stream, consumer = %self.cfg.consumer, pool = self.pool(), "bound; consuming");
        Phase::Bound(Box::new(Binding {
            ctx,
            consumer: b.consumer,
            batch,
        }))
    }

    /// The pool, within the consumer's max ack pending.
    fn batch_size(&self, b: &Bound) -> usize {
        let max_ack_pending = match b.consumer_info.config.max_ack_pending {
            n if n > 0 => usize::try_from(n).unwrap_or(self.pool()),
            _ => self.pool(),
        };
        self.pool().min(max_ack_pending).max(1)
    }

    fn handler_context(
        &self,
        stream: jetstream::stream::Stream,
        dlq: jetstream::stream::Stream,
        stream_created_ns: u128,
        legacy: Option<jetstream::kv::Store>,
        (ack_wait, idempotency_scope): (Duration, String),
    ) -> Ctx {
        Ctx {
            cfg: self.cfg.clone(),
            js: self.js.clone(),
            stream,
            dlq,
            outcomes: self.outcomes.clone(),
            stream_created_ns,
            legacy,
            metrics: self.metrics.clone(),
            downstream: self.downstream.clone(),
            worker: self.worker.clone(),
            ack_wait,
            idempotency_scope,
        }
    }

    /// One long-lived pull stream per binding: it asks for the next batch when
    /// half of the current one has arrived, so the pool never waits for a pull
    /// round trip. At most `pool` orders are processed at once (a free slot is
    /// taken before the next message), and at most one batch more is buffered.
    async fn open_pull(&self, b: Box<Binding>, shutdown: &CancellationToken) -> Phase {
        let opened = b
            .consumer
            .stream()
            .max_messages_per_batch(b.batch)
            .expires(PULL_EXPIRES)
            .heartbeat(PULL_EXPIRES / 2)
            .messages()
            .await;
        match opened {
            Ok(messages) => Phase::Pulling(b, Box::new(messages)),
            Err(e) => {
                tracing::warn!(error = %e, "pull request failed; re-binding");
                self.not_ready(
                    format!("pull request failed: {e}"),
                    Duration::from_secs(1),
                    shutdown,
                )
                .await
            }
        }
    }

    /// Takes a free slot and the next message, and hands it to a handler task.
    async fn take_next(
        &mut self,
        b: Box<Binding>,
        mut messages: Box<jetstream::consumer::pull::Stream>,
        shutdown: &CancellationToken,
    ) -> Phase {
        // The usual case takes no wait: a free slot, a message already
        // buffered. Only a wait races the shutdown.
        let slot = match self.slots.clone().try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) => tokio::select! {
                p = self.slots.clone().acquire_owned() => p.ok(),
                _ = shutdown.cancelled() => None,
            },
        };
        let next = match slot {
            None => None,
            Some(_) => match messages.next().now_or_never() {
                Some(n) => Some(n),
                None => tokio::select! {
                    n = messages.next() => Some(n),
                    _ = shutdown.cancelled() => None,
                },
            },
        };
        let phase = match (slot, next) {
            // Shutdown: keep the stream, whose buffered messages go back.
            (_, None) | (None, _) => Phase::Pulling(b, messages),
            (Some(slot), Some(Some(Ok(msg)))) => {
                let (hctx, grace) = (b.ctx.clone(), self.grace_expired.clone());
                self.tasks.spawn(async move {
                    let outcome = handler::handle(hctx, msg, grace).await;
                    drop(slot);
                    outcome
                });
                Phase::Pulling(b, messages)
            }
            (Some(_), Some(Some(Err(e)))) => {
                // E.g. 409 Consumer Deleted, or missed heartbeats after a lost
                // connection. Bind again: that checks the stream, consumer and
                // DLQ and reports what is missing on /readyz; the pause keeps a
                // persistent error from spinning.
                tracing::warn!(error = %e, "pull stream error; binding to the consumer again");
                pause(Duration::from_secs(1), shutdown).await;
                Phase::Unbound
            }
            // The pull stream ended: open another on the same binding.
            (Some(_), Some(None)) => Phase::Bound(b),
        };
        while self.tasks.try_join_next().is_some() {}
        phase
    }

    /// Reports why the worker is not ready and pauses before the next try.
    async fn not_ready(&self, why: String, wait: Duration, shutdown: &CancellationToken) -> Phase {
        self.readiness.set_not_ready(why);
        pause(wait, shutdown).await;
        Phase::Unbound
    }

    /// Messages already buffered but not started go back at once (a NAK without
    /// delay), so another worker takes them instead of waiting for the ack wait.
    async fn give_back(&self, buffered: Option<jetstream::consumer::pull::Stream>) {
        let Some(mut stream) = buffered else { return };
        let mut returned = 0u32;
        while let Some(Some(Ok(m))) = stream.next().now_or_never() {
            if m.ack_with(jetstream::AckKind::Nak(None)).await.is_ok() {
                returned += 1;
            }
        }
        if returned > 0 {
            tracing::info!(returned, "gave buffered, unstarted messages back");
        }
    }

    /// Waits for the orders in flight within the shutdown grace; after it, the
    /// unfinished ones are NAKed.
    async fn finish_in_flight(&mut self) {
        tracing::info!(in_flight = self.tasks.len(), grace = ?self.cfg.shutdown_grace, "stopping: finishing in-flight orders");
        self.readiness.set_not_ready("shutting down");
        let tasks = &mut self.tasks;
        let drained = tokio::time::timeout(self.cfg.shutdown_grace, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                left = self.tasks.len(),
                "shutdown grace expired; NAKing unfinished orders"
            );
            self.grace_expired.cancel();
            let tasks = &mut self.tasks;
            let _ = tokio::time::timeout(Duration::from_secs(5), async {
                while tasks.join_next().await.is_some() {}
            })
            .await;
        }
    }
}
