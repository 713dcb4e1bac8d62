//! The worker process: HTTP probes, NATS connection, topology binding, and the
//! bounded pull loop (at most WORKER_POOL_SIZE orders in flight), with graceful
//! shutdown.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream;
use futures::StreamExt as _;
use orderpipeline_common::nats::NatsConnectError;
use orderpipeline_common::topology::{self, Topology, TopologyError};
use prometheus_client::registry::Registry;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::downstream::Downstream;
use crate::handler::{self, Ctx};
use crate::health::{self, Readiness};
use crate::metrics::Metrics;

/// How long one pull request waits for messages before it is renewed.
const PULL_EXPIRES: Duration = Duration::from_secs(5);

/// The topology the worker's flags describe (used by `--create-topology`).
pub fn topology_from(cfg: &Config) -> Topology {
    Topology {
        stream: cfg.stream.clone(),
        consumer: cfg.consumer.clone(),
        filter_subject: cfg.input_subject.clone(),
        dlq_stream: cfg.dlq_stream.clone(),
        ..Topology::default()
    }
}

/// Runs until `shutdown` fires, then finishes in-flight work within the grace
/// period, NAKs the rest and drains the connection.
pub async fn run(cfg: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    cfg.check().map_err(anyhow::Error::msg)?;
    let outcomes = cfg.outcome_subjects().map_err(anyhow::Error::msg)?;
    let mut registry = Registry::default();
    let metrics = Metrics::new(&mut registry);
    let readiness = Arc::new(Readiness::default());
    readiness.set_not_ready("connecting to NATS");
    let client_cell: Arc<OnceLock<async_nats::Client>> = Arc::new(OnceLock::new());

    let listener = tokio::net::TcpListener::bind(cfg.http_addr)
        .await
        .with_context(|| {
            format!(
                "HTTP_ADDR {}: cannot listen there; pick a free host:port",
                cfg.http_addr
            )
        })?;
    let http = health::router(health::HealthState {
        client: client_cell.clone(),
        readiness: readiness.clone(),
        registry: Arc::new(registry),
    });
    let http_shutdown = shutdown.clone();
    let http_task = tokio::spawn(async move {
        axum::serve(listener, http)
            .with_graceful_shutdown(async move { http_shutdown.cancelled().await })
            .await
    });
    tracing::info!(addr = %cfg.http_addr, "serving /health /livez /readyz /metrics");

    let worker = cfg.worker_name();
    let auth = cfg.nats.auth()?;
    let client = loop {
        match orderpipeline_common::nats::connect(&cfg.nats.nats_url, &auth, &worker).await {
            Ok(c) => break c,
            Err(e @ (NatsConnectError::Authentication { .. } | NatsConnectError::Options(_))) => {
                return Err(e.into());
            }
            Err(e) => {
                tracing::warn!(error = %e, "NATS not reachable yet; retrying");
                readiness.set_not_ready(e.to_string());
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    _ = shutdown.cancelled() => return Ok(()),
                }
            }
        }
    };
    let _ = client_cell.set(client.clone());
    let js = jetstream::new(client.clone());

    if cfg.create_topology {
        topology_from(&cfg).ensure(&js).await?;
        tracing::info!(stream = %cfg.stream, consumer = %cfg.consumer, "topology created or updated");
    }

    let downstream = match &cfg.downstream_url {
        Some(u) => Some(Downstream::new(u, cfg.downstream_timeout).context("DOWNSTREAM_URL")?),
        None => None,
    };

    let grace_expired = CancellationToken::new();
    let mut tasks = JoinSet::new();
    let pool = cfg.worker_pool_size as usize;
    let sem = Arc::new(Semaphore::new(pool));
    let mut ctx: Option<Arc<Ctx>> = None;
    let mut consumer: Option<jetstream::consumer::PullConsumer> = None;
    let mut messages: Option<jetstream::consumer::pull::Stream> = None;
    let mut max_ack_pending = pool;

    'outer: while !shutdown.is_cancelled() {
        // (Re)bind when needed; report why not ready meanwhile.
        if consumer.is_none() {
            messages = None;
            match topology::bind(&js, &cfg.stream, &cfg.consumer, &cfg.dlq_stream).await {
                Ok(b) => {
                    // The old protocol's bucket, when configured, must open: the
                    // worker does not guess whether an order was done before v2.
                    let legacy = match &cfg.legacy_state_bucket {
                        Some(bucket) => match js.get_key_value(bucket).await {
                            Ok(kv) => Some(kv),
                            Err(e) => {
                                let why = format!(
                                    "LEGACY_STATE_BUCKET {bucket} cannot be opened: {e}; it holds the records of the protocol before v2 (unset it once they have expired)"
                                );
                                tracing::warn!("not ready: {why}");
                                readiness.set_not_ready(why);
                                tokio::select! {
                                    _ = tokio::time::sleep(Duration::from_secs(2)) => continue,
                                    _ = shutdown.cancelled() => break,
                                }
                            }
                        },
                        None => None,
                    };
                    if b.consumer_info.config.max_ack_pending > 0 {
                        max_ack_pending =
                            usize::try_from(b.consumer_info.config.max_ack_pending).unwrap_or(pool);
                    }
                    ctx = Some(Arc::new(Ctx {
                        cfg: cfg.clone(),
                        js: js.clone(),
                        stream: b.stream,
                        dlq: b.dlq,
                        outcomes: outcomes.clone(),
                        stream_created_ns: b.stream_created_ns,
                        legacy,
                        metrics: metrics.clone(),
                        downstream: downstream.clone(),
                        worker: worker.clone(),
                        ack_wait: b.consumer_info.config.ack_wait,
                    }));
                    consumer = Some(b.consumer);
                    readiness.set_ready();
                    tracing::info!(stream = %cfg.stream, consumer = %cfg.consumer, pool, "bound; consuming");
                }
                Err(e) => {
                    log_bind_error(&e);
                    readiness.set_not_ready(e.to_string());
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(2)) => continue,
                        _ = shutdown.cancelled() => break,
                    }
                }
            }
        }
        let (Some(c), Some(hctx)) = (consumer.as_ref(), ctx.as_ref()) else {
            continue;
        };

        // One long-lived pull stream per binding: it asks for the next batch when
        // half of the current one has arrived, so the pool never waits for a pull
        // round trip. At most `pool` orders are processed at once (a free slot is
        // taken before the next message), and at most one batch more is buffered.
        if messages.is_none() {
            match c
                .stream()
                .max_messages_per_batch(pool.min(max_ack_pending).max(1))
                .expires(PULL_EXPIRES)
                .heartbeat(PULL_EXPIRES / 2)
                .messages()
                .await
            {
                Ok(m) => messages = Some(m),
                Err(e) => {
                    tracing::warn!(error = %e, "pull request failed; re-binding");
                    readiness.set_not_ready(format!("pull request failed: {e}"));
                    consumer = None;
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        _ = shutdown.cancelled() => break,
                    }
                }
            }
        }
        let Some(stream) = messages.as_mut() else {
            continue;
        };
        // The usual case takes no wait: a free slot, a message already
        // buffered. Only a wait races the shutdown.
        let permit = match sem.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => tokio::select! {
                p = sem.clone().acquire_owned() => p?,
                _ = shutdown.cancelled() => break,
            },
        };
        let next = match futures::FutureExt::now_or_never(stream.next()) {
            Some(n) => n,
            None => tokio::select! {
                n = stream.next() => n,
                _ = shutdown.cancelled() => break 'outer,
            },
        };
        match next {
            Some(Ok(msg)) => {
                let (hctx, grace) = (hctx.clone(), grace_expired.clone());
                tasks.spawn(async move {
                    let outcome = handler::handle(hctx, msg, grace).await;
                    drop(permit);
                    outcome
                });
            }
            Some(Err(e)) => {
                // E.g. 409 Consumer Deleted, or missed heartbeats after a lost
                // connection. Bind again: that checks the stream, consumer and DLQ
                // and reports what is missing on /readyz; the pause keeps a
                // persistent error from spinning.
                tracing::warn!(error = %e, "pull stream error; binding to the consumer again");
                consumer = None;
                messages = None;
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = shutdown.cancelled() => break 'outer,
                }
            }
            None => messages = None,
        }
        while tasks.try_join_next().is_some() {}
    }

    // Messages already buffered but not started go back at once (a NAK without
    // delay), so another worker takes them instead of waiting for the ack wait.
    if let Some(mut stream) = messages.take() {
        use futures::FutureExt as _;
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
    tracing::info!(in_flight = tasks.len(), grace = ?cfg.shutdown_grace, "stopping: finishing in-flight orders");
    readiness.set_not_ready("shutting down");
    let drained = tokio::time::timeout(cfg.shutdown_grace, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            left = tasks.len(),
            "shutdown grace expired; NAKing unfinished orders"
        );
        grace_expired.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
    }
    // Everything acked or NAKed above must reach the server before the connection goes.
    let _ = tokio::time::timeout(Duration::from_secs(5), client.flush()).await;
    if let Err(e) = client.drain().await {
        tracing::warn!(error = %e, "draining the NATS connection failed");
    }
    let _ = http_task.await;
    tracing::info!("stopped");
    Ok(())
}

fn log_bind_error(e: &TopologyError) {
    tracing::warn!(error = %e, "not ready: cannot bind to the pipeline's JetStream objects");
}
