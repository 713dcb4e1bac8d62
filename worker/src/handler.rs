//! Handles one input message, end to end, per the contract in ARCHITECTURE.md:
//! decode -> check KV state -> validate -> (downstream, retried) -> publish the
//! result event (own Nats-Msg-Id) -> finalise the KV record (CAS) -> ack.
//! Every message ends as exactly one of: acked after success, acked as duplicate,
//! NAKed with a delay, or dead-lettered then TERMed.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, AckKind, kv};
use async_nats::{HeaderMap, HeaderValue};
use bytes::Bytes;
use orderpipeline_common::names;
use orderpipeline_proto::{
    DeadLetter, ErrorClass, Header, Message as _, OrderCreated, OrderProcessed, OrderRejected,
};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, field};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::config::Config;
use crate::decide::{self, AfterFailure, CallClass, OrderState, StateRecord};
use crate::downstream::Downstream;
use crate::metrics::Metrics;
use crate::trace;

/// Everything a handler needs; shared by all in-flight messages.
pub struct Ctx {
    pub cfg: Config,
    pub js: jetstream::Context,
    pub kv: kv::Store,
    pub metrics: Metrics,
    pub downstream: Option<Downstream>,
    pub worker: String,
    /// The consumer's ack wait: in-progress acks are sent well within it.
    pub ack_wait: Duration,
}

/// How a message ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Processed,
    Rejected,
    DeadLettered,
    Duplicate,
    Nak,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Processed => "processed",
            Outcome::Rejected => "rejected",
            Outcome::DeadLettered => "dead_lettered",
            Outcome::Duplicate => "duplicate",
            Outcome::Nak => "nak",
        }
    }
}

/// A failure of one step; transient ones end in a NAK (or, on the last delivery,
/// a dead letter), permanent ones in a dead letter.
#[derive(Debug)]
enum StepError {
    Transient(String),
    Permanent(String),
    /// The result event is published but its KV record could not be written:
    /// never a dead letter (that would be a second outcome), always a NAK, and
    /// the redelivery finds the event deduplicated and writes the record.
    Unrecorded(String),
}

struct Delivery {
    stream: String,
    stream_seq: u64,
    delivered: u64,
    published: prost_types::Timestamp,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn jitter() -> f64 {
    rand::random::<f64>()
}

/// Handles `msg` and records its outcome in the metrics. `cancel` fires when the
/// shutdown grace runs out: unfinished work is then NAKed.
pub async fn handle(ctx: Arc<Ctx>, msg: jetstream::Message, cancel: CancellationToken) -> Outcome {
    let start = Instant::now();
    ctx.metrics.in_flight.inc();
    let subject = msg.subject.to_string();
    let msg_id = msg
        .headers
        .as_ref()
        .and_then(|h| h.get(names::MSG_ID_HEADER))
        .map(|v| v.as_str().to_string())
        .unwrap_or_default();
    let delivered = msg.info().map(|i| i.delivered).unwrap_or(1);
    let span = tracing::info_span!(
        "process",
        otel.name = format!("process {subject}"),
        otel.kind = "consumer",
        otel.status_code = field::Empty,
        messaging.system = "nats",
        messaging.operation.type = "process",
        messaging.destination.name = subject.as_str(),
        messaging.consumer.group.name = ctx.cfg.consumer.as_str(),
        messaging.message.id = msg_id.as_str(),
        messaging.nats.delivery_count = delivered,
        messaging.nats.stream_sequence = field::Empty,
        order.id = field::Empty,
        outcome = field::Empty,
        worker = ctx.worker.as_str(),
    );
    let _ = span.set_parent(trace::extract(msg.headers.as_ref()));
    let outcome = run_with_progress(&ctx, &msg, &cancel)
        .instrument(span.clone())
        .await;
    span.record("outcome", outcome.as_str());
    span.in_scope(|| tracing::debug!(outcome = outcome.as_str(), "message finished"));
    if outcome == Outcome::Nak {
        span.record("otel.status_code", "ERROR");
    }
    ctx.metrics.outcome(outcome.as_str());
    if outcome == Outcome::Duplicate {
        ctx.metrics.duplicates.inc();
    }
    ctx.metrics.duration.observe(start.elapsed().as_secs_f64());
    ctx.metrics.in_flight.dec();
    outcome
}

/// Runs the processing while sending in-progress acks, so long work (retries,
/// slow downstream) does not exceed the ack wait; NAKs on cancellation.
async fn run_with_progress(
    ctx: &Ctx,
    msg: &jetstream::Message,
    cancel: &CancellationToken,
) -> Outcome {
    let work = process(ctx, msg);
    tokio::pin!(work);
    let every = (ctx.ack_wait / 3).max(Duration::from_millis(200));
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        tokio::select! {
            outcome = &mut work => return outcome,
            _ = tick.tick() => {
                if let Err(e) = msg.ack_with(AckKind::Progress).await {
                    tracing::warn!(error = %e, "in-progress ack failed");
                }
            }
            _ = cancel.cancelled() => {
                tracing::warn!("shutdown grace expired; giving the message back");
                nak(ctx, msg, Duration::from_secs(1)).await;
                return Outcome::Nak;
            }
        }
    }
}

/// NAKs with a delay and waits (briefly) for the server's confirmation, so a
/// NAK sent just before shutdown is not lost in the client's buffer.
async fn nak(ctx: &Ctx, msg: &jetstream::Message, delay: Duration) {
    ctx.metrics.naks.inc();
    match tokio::time::timeout(
        Duration::from_secs(2),
        msg.double_ack_with(AckKind::Nak(Some(delay))),
    )
    .await
    {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "NAK failed; the message is redelivered after the ack wait")
        }
        Err(_) => tracing::warn!(
            "NAK not confirmed within 2s; the message is redelivered after the ack wait at the latest"
        ),
    }
}

/// NAKs with the delay this delivery's count calls for (never a bare NAK).
async fn nak_for_redelivery(ctx: &Ctx, msg: &jetstream::Message, delivery: &Delivery) -> Outcome {
    let delay = decide::nak_delay(
        delivery.delivered,
        ctx.cfg.nak_initial_delay,
        ctx.cfg.nak_max_delay,
    );
    nak(ctx, msg, delay).await;
    Outcome::Nak
}

async fn process(ctx: &Ctx, msg: &jetstream::Message) -> Outcome {
    let delivery = match msg.info() {
        Ok(i) => Delivery {
            stream: i.stream.to_string(),
            stream_seq: i.stream_sequence,
            delivered: u64::try_from(i.delivered).unwrap_or(1),
            published: prost_types::Timestamp {
                seconds: i.published.unix_timestamp(),
                nanos: i32::try_from(i.published.nanosecond()).unwrap_or(0),
            },
        },
        Err(e) => {
            // Not a JetStream delivery: nothing to ack against.
            tracing::error!(error = %e, "message without JetStream metadata ignored");
            return Outcome::Duplicate;
        }
    };
    tracing::Span::current().record("messaging.nats.stream_sequence", delivery.stream_seq);

    if msg.payload.len() > ctx.cfg.max_payload_bytes {
        let why = format!(
            "payload of {} bytes exceeds MAX_PAYLOAD_BYTES ({})",
            msg.payload.len(),
            ctx.cfg.max_payload_bytes
        );
        return dead_letter_or_nak(ctx, msg, &delivery, ErrorClass::Oversized, &why, None).await;
    }
    let order = match OrderCreated::decode(msg.payload.as_ref()) {
        Ok(o) => o,
        Err(e) => {
            let why = format!("payload is not an orders.v1.OrderCreated: {e}");
            return dead_letter_or_nak(ctx, msg, &delivery, ErrorClass::Undecodable, &why, None)
                .await;
        }
    };
    tracing::Span::current().record("order.id", order.order_id.as_str());

    if !decide::order_id_is_usable(&order.order_id) {
        // No usable id: nothing to key state on. Reject with an id derived from
        // the message's stream position, so redelivery still dedups the event.
        let rejection = decide::validate(&order).unwrap_err();
        let id = format!("{}:{}:rejected", delivery.stream, delivery.stream_seq);
        return match publish_rejected(ctx, &order, &rejection, &id).await {
            Ok(()) => ack(msg, Outcome::Rejected).await,
            Err(e) => after_failure(ctx, msg, &delivery, &e, Some(&order)).await,
        };
    }

    match process_order(ctx, msg, &delivery, &order).await {
        Ok(outcome) => outcome,
        Err(StepError::Permanent(why)) => {
            dead_letter_or_nak(
                ctx,
                msg,
                &delivery,
                ErrorClass::Permanent,
                &why,
                Some(&order),
            )
            .await
        }
        Err(e @ StepError::Transient(_)) => {
            after_failure(ctx, msg, &delivery, &e, Some(&order)).await
        }
        Err(StepError::Unrecorded(why)) => {
            tracing::warn!(error = %why, "result published but not recorded; NAK with delay");
            nak_for_redelivery(ctx, msg, &delivery).await
        }
    }
}

async fn process_order(
    ctx: &Ctx,
    msg: &jetstream::Message,
    delivery: &Delivery,
    order: &OrderCreated,
) -> Result<Outcome, StepError> {
    let key = names::state_key(&order.order_id);
    let revision = match claim(ctx, &key, delivery).await? {
        Claim::Final(state) => {
            tracing::info!(
                state = state.as_str(),
                "order already has an outcome; acking as duplicate"
            );
            return Ok(ack(msg, Outcome::Duplicate).await);
        }
        Claim::Pending(rev) => rev,
    };

    if delivery.delivered > u64::from(ctx.cfg.max_deliveries) {
        // A delivery beyond the limit: the last allowed one died with its worker.
        let why = format!(
            "delivery {} exceeds MAX_DELIVERIES ({}); the last allowed delivery did not finish",
            delivery.delivered, ctx.cfg.max_deliveries
        );
        return Ok(dead_letter_or_nak(
            ctx,
            msg,
            delivery,
            ErrorClass::AttemptsExhausted,
            &why,
            Some(order),
        )
        .await);
    }

    if let Err(rejection) = {
        let _s = tracing::info_span!("validate").entered();
        decide::validate(order)
    } {
        tracing::info!(reason = ?rejection.reason, message = %rejection.message, "order rejected");
        publish_rejected(
            ctx,
            order,
            &rejection,
            &names::rejected_msg_id(&order.order_id),
        )
        .await?;
        return finalise(
            ctx,
            msg,
            &key,
            revision,
            delivery,
            OrderState::Rejected,
            Some(rejection.message),
        )
        .await;
    }

    if let Some(ds) = &ctx.downstream {
        call_downstream(ctx, ds, order).await?;
    }

    publish_processed(ctx, order, delivery).await?;
    finalise(
        ctx,
        msg,
        &key,
        revision,
        delivery,
        OrderState::Processed,
        None,
    )
    .await
}

enum Claim {
    /// The order is pending at this KV revision: go on.
    Pending(u64),
    /// The order already has this final state.
    Final(OrderState),
}

fn record(state: OrderState, delivery: &Delivery, worker: &str, reason: Option<String>) -> Bytes {
    let r = StateRecord {
        state,
        stream_sequence: delivery.stream_seq,
        delivery_count: delivery.delivered,
        worker: worker.to_string(),
        updated_at_ms: now_ms(),
        reason,
    };
    Bytes::from(serde_json::to_vec(&r).unwrap_or_default())
}

fn parse_record(value: &[u8]) -> Option<StateRecord> {
    serde_json::from_slice(value).ok()
}

/// Reads the order's state, creating a `pending` record if there is none.
async fn claim(ctx: &Ctx, key: &str, delivery: &Delivery) -> Result<Claim, StepError> {
    let span = tracing::info_span!("record", kv.op = "claim");
    async {
        for _ in 0..5 {
            let entry = ctx
                .kv
                .entry(key)
                .await
                .map_err(|e| StepError::Transient(format!("reading order state {key}: {e}")))?;
            match entry {
                Some(e) if e.operation == kv::Operation::Put => {
                    return match parse_record(&e.value) {
                        Some(r) if r.state.is_final() => Ok(Claim::Final(r.state)),
                        Some(_) => Ok(Claim::Pending(e.revision)),
                        None => {
                            // A record we cannot read: take it over as pending.
                            ctx.kv
                                .update(
                                    key,
                                    record(OrderState::Pending, delivery, &ctx.worker, None),
                                    e.revision,
                                )
                                .await
                                .map(Claim::Pending)
                                .or(Ok(Claim::Pending(e.revision)))
                        }
                    };
                }
                _ => {
                    match ctx
                        .kv
                        .create(
                            key,
                            record(OrderState::Pending, delivery, &ctx.worker, None),
                        )
                        .await
                    {
                        Ok(rev) => return Ok(Claim::Pending(rev)),
                        Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => continue,
                        Err(e) => {
                            return Err(StepError::Transient(format!(
                                "creating order state {key}: {e}"
                            )));
                        }
                    }
                }
            }
        }
        Err(StepError::Transient(format!(
            "order state {key} keeps changing"
        )))
    }
    .instrument(span)
    .await
}

/// Moves the record from `pending` to `state` with compare-and-set, then acks.
/// Losing the race to another worker that already finalised is fine: its result
/// event has the same message id, so the stream kept only one.
async fn finalise(
    ctx: &Ctx,
    msg: &jetstream::Message,
    key: &str,
    mut revision: u64,
    delivery: &Delivery,
    state: OrderState,
    reason: Option<String>,
) -> Result<Outcome, StepError> {
    let span = tracing::info_span!("record", kv.op = "finalise", order.state = state.as_str());
    let outcome = if state == OrderState::Processed {
        Outcome::Processed
    } else {
        Outcome::Rejected
    };
    let finalised = async {
        for _ in 0..5 {
            match ctx
                .kv
                .update(
                    key,
                    record(state, delivery, &ctx.worker, reason.clone()),
                    revision,
                )
                .await
            {
                Ok(_) => return Ok(true),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                    let entry = ctx.kv.entry(key).await.map_err(|e| {
                        StepError::Unrecorded(format!("re-reading order state {key}: {e}"))
                    })?;
                    match entry
                        .as_ref()
                        .and_then(|e| parse_record(&e.value).map(|r| (r, e.revision)))
                    {
                        Some((r, _)) if r.state.is_final() => return Ok(false),
                        Some((_, rev)) => revision = rev,
                        None => {
                            return Err(StepError::Unrecorded(format!(
                                "order state {key} vanished"
                            )));
                        }
                    }
                }
                Err(e) => {
                    return Err(StepError::Unrecorded(format!(
                        "writing order state {key}: {e}"
                    )));
                }
            }
        }
        Err(StepError::Unrecorded(format!(
            "order state {key} keeps changing"
        )))
    }
    .instrument(span)
    .await?;
    Ok(ack(
        msg,
        if finalised {
            outcome
        } else {
            Outcome::Duplicate
        },
    )
    .await)
}

/// Acks and waits for the server's confirmation. A failed ack is logged: the
/// message is redelivered and found final in KV, so it is acked as a duplicate.
async fn ack(msg: &jetstream::Message, outcome: Outcome) -> Outcome {
    if let Err(e) = msg.double_ack().await {
        tracing::warn!(error = %e, outcome = outcome.as_str(), "ack not confirmed; a redelivery will be acked as duplicate");
    }
    outcome
}

async fn call_downstream(
    ctx: &Ctx,
    ds: &Downstream,
    order: &OrderCreated,
) -> Result<(), StepError> {
    let attempts = ctx.cfg.retry_attempts;
    let mut last = String::new();
    for attempt in 1..=attempts {
        let span = tracing::info_span!(
            "downstream call",
            otel.kind = "client",
            http.request.method = "POST",
            url.full = ds.url(),
            attempt,
            http.outcome = field::Empty,
        );
        let mut headers = reqwest::header::HeaderMap::new();
        {
            let _g = span.enter();
            let mut nats_headers = HeaderMap::new();
            trace::inject_current(&mut nats_headers);
            for (k, v) in nats_headers.iter() {
                if let (Ok(name), Some(Ok(value))) = (
                    reqwest::header::HeaderName::from_bytes(AsRef::<[u8]>::as_ref(k)),
                    v.first()
                        .map(|v| reqwest::header::HeaderValue::from_str(v.as_str())),
                ) {
                    headers.insert(name, value);
                }
            }
        }
        ctx.metrics.downstream_calls.inc();
        let result = ds.call(order, headers).instrument(span.clone()).await;
        span.record("http.outcome", result.detail.as_str());
        match result.class {
            CallClass::Ok => return Ok(()),
            CallClass::Permanent => return Err(StepError::Permanent(result.detail)),
            CallClass::Transient => {
                last = result.detail;
                if attempt < attempts {
                    ctx.metrics.retries.inc();
                    let wait = decide::retry_backoff(
                        attempt,
                        ctx.cfg.retry_initial_backoff,
                        ctx.cfg.retry_max_backoff,
                        jitter(),
                    );
                    tracing::info!(attempt, wait_ms = wait.as_millis() as u64, error = %last, "downstream failed; retrying");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
    Err(StepError::Transient(format!(
        "downstream failed {attempts} time(s); last: {last}"
    )))
}

/// Publishes with a message id and waits for the PubAck, retrying a failed or
/// timed-out publish with the same id (the stream dedups).
async fn publish(
    ctx: &Ctx,
    subject: &str,
    msg_id: &str,
    payload: Vec<u8>,
    extra: &[(&str, String)],
) -> Result<(), StepError> {
    let span = tracing::info_span!(
        "publish",
        otel.name = format!("publish {subject}"),
        otel.kind = "producer",
        messaging.system = "nats",
        messaging.operation.type = "publish",
        messaging.destination.name = subject,
        messaging.message.id = msg_id,
    );
    async {
        let mut headers = HeaderMap::new();
        let id = msg_id.parse::<HeaderValue>().map_err(|e| {
            StepError::Permanent(format!(
                "message id {msg_id:?} cannot be a NATS header: {e}"
            ))
        })?;
        headers.insert(names::MSG_ID_HEADER, id);
        for (k, v) in extra {
            // Informational headers: one that NATS cannot carry is left out.
            match v.parse::<HeaderValue>() {
                Ok(v) => headers.insert(*k, v),
                Err(e) => tracing::debug!(header = *k, error = %e, "header left out"),
            }
        }
        trace::inject_current(&mut headers);
        let payload = Bytes::from(payload);
        let mut last = String::new();
        for attempt in 0..3u32 {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
            }
            match ctx
                .js
                .publish_with_headers(subject.to_string(), headers.clone(), payload.clone())
                .await
            {
                Ok(fut) => match fut.await {
                    Ok(ack) => {
                        if ack.duplicate {
                            tracing::info!(
                                msg_id,
                                "result event was already in the stream (deduplicated)"
                            );
                        }
                        return Ok(());
                    }
                    Err(e) => last = e.to_string(),
                },
                Err(e) => last = e.to_string(),
            }
        }
        Err(StepError::Transient(format!(
            "publishing to {subject} failed: {last}"
        )))
    }
    .instrument(span)
    .await
}

async fn publish_rejected(
    ctx: &Ctx,
    order: &OrderCreated,
    rejection: &decide::Rejection,
    msg_id: &str,
) -> Result<(), StepError> {
    let event = OrderRejected {
        order_id: order.order_id.clone(),
        customer_id: order.customer_id.clone(),
        reason_code: rejection.reason as i32,
        message: rejection.message.clone(),
        rejected_at: Some(orderpipeline_proto::now()),
        worker: ctx.worker.clone(),
    };
    publish(
        ctx,
        &ctx.cfg.rejected_subject,
        msg_id,
        event.encode_to_vec(),
        &[],
    )
    .await
}

async fn publish_processed(
    ctx: &Ctx,
    order: &OrderCreated,
    delivery: &Delivery,
) -> Result<(), StepError> {
    let event = OrderProcessed {
        order_id: order.order_id.clone(),
        customer_id: order.customer_id.clone(),
        total_amount: order.total_amount,
        processed_at: Some(orderpipeline_proto::now()),
        delivery_count: delivery.delivered,
        worker: ctx.worker.clone(),
    };
    publish(
        ctx,
        &ctx.cfg.processed_subject,
        &names::processed_msg_id(&order.order_id),
        event.encode_to_vec(),
        &[],
    )
    .await
}

/// After a transient failure: NAK with a delay growing with the delivery count,
/// or dead-letter on the last allowed delivery.
async fn after_failure(
    ctx: &Ctx,
    msg: &jetstream::Message,
    delivery: &Delivery,
    error: &StepError,
    order: Option<&OrderCreated>,
) -> Outcome {
    let why = match error {
        StepError::Transient(s) | StepError::Permanent(s) | StepError::Unrecorded(s) => s.as_str(),
    };
    match decide::after_transient_failure(
        delivery.delivered,
        ctx.cfg.max_deliveries,
        ctx.cfg.nak_initial_delay,
        ctx.cfg.nak_max_delay,
    ) {
        AfterFailure::Nak(delay) => {
            tracing::warn!(
                error = why,
                delivery = delivery.delivered,
                delay_ms = delay.as_millis() as u64,
                "transient failure; NAK with delay"
            );
            nak(ctx, msg, delay).await;
            Outcome::Nak
        }
        AfterFailure::DeadLetter => {
            let why = format!(
                "failed on delivery {} of {}: {why}",
                delivery.delivered, ctx.cfg.max_deliveries
            );
            dead_letter_or_nak(
                ctx,
                msg,
                delivery,
                ErrorClass::AttemptsExhausted,
                &why,
                order,
            )
            .await
        }
    }
}

fn class_label(class: ErrorClass) -> &'static str {
    match class {
        ErrorClass::Undecodable => "undecodable",
        ErrorClass::Permanent => "permanent",
        ErrorClass::AttemptsExhausted => "attempts_exhausted",
        ErrorClass::Oversized => "oversized",
        ErrorClass::Unspecified => "unspecified",
    }
}

/// Writes the dead-letter envelope (id `<stream>:<seq>`), marks the order
/// `dead_lettered` when it has an id, then TERMs. If the DLQ cannot be written
/// the message is NAKed instead, so nothing is lost.
async fn dead_letter_or_nak(
    ctx: &Ctx,
    msg: &jetstream::Message,
    delivery: &Delivery,
    class: ErrorClass,
    why: &str,
    order: Option<&OrderCreated>,
) -> Outcome {
    tracing::warn!(
        class = class_label(class),
        error = why,
        "dead-lettering message"
    );
    let headers = msg
        .headers
        .as_ref()
        .map(|h| {
            h.iter()
                .flat_map(|(k, vs)| {
                    vs.iter().map(move |v| Header {
                        name: k.to_string(),
                        value: v.to_string(),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    let order_id = order.map(|o| o.order_id.clone()).unwrap_or_default();
    let mut envelope = DeadLetter {
        original_subject: msg.subject.to_string(),
        original_stream: delivery.stream.clone(),
        original_stream_sequence: delivery.stream_seq,
        payload: Vec::new(),
        headers,
        error_class: class as i32,
        error_message: why.to_string(),
        delivery_count: delivery.delivered,
        original_published_at: Some(delivery.published),
        dead_lettered_at: Some(orderpipeline_proto::now()),
        order_id: order_id.clone(),
        worker: ctx.worker.clone(),
        payload_size: u64::try_from(msg.payload.len()).unwrap_or(u64::MAX),
        payload_truncated: false,
    };
    // A payload near the server's max_payload cannot travel inside an envelope:
    // keep its first bytes and say so, rather than fail to dead-letter forever.
    let max_payload = ctx.js.client().server_info().max_payload;
    match decide::dead_letter_payload_cap(msg.payload.len(), envelope.encoded_len(), max_payload) {
        None => envelope.payload = msg.payload.to_vec(),
        Some(cap) => {
            envelope.payload = msg.payload[..cap].to_vec();
            envelope.payload_truncated = true;
        }
    }
    let id = names::dead_letter_msg_id(&delivery.stream, delivery.stream_seq);
    let extra = [
        ("Orderpipeline-Error-Class", class_label(class).to_string()),
        ("Orderpipeline-Order-Id", order_id.clone()),
    ];
    if let Err(StepError::Transient(e) | StepError::Permanent(e)) = publish(
        ctx,
        &ctx.cfg.dlq_subject,
        &id,
        envelope.encode_to_vec(),
        &extra,
    )
    .await
    {
        tracing::error!(error = %e, "cannot write the dead letter; NAK so the message is not lost");
        return nak_for_redelivery(ctx, msg, delivery).await;
    }
    if !order_id.trim().is_empty() {
        mark_dead_lettered(ctx, &order_id, delivery, why).await;
    }
    ctx.metrics
        .dead_letters
        .get_or_create(&crate::metrics::ClassLabels {
            class: class_label(class),
        })
        .inc();
    if let Err(e) = msg.double_ack_with(AckKind::Term).await {
        tracing::warn!(error = %e, "TERM not confirmed; a redelivery is dead-lettered again under the same id (deduplicated)");
    }
    Outcome::DeadLettered
}

async fn mark_dead_lettered(ctx: &Ctx, order_id: &str, delivery: &Delivery, why: &str) {
    let key = names::state_key(order_id);
    let value = record(
        OrderState::DeadLettered,
        delivery,
        &ctx.worker,
        Some(why.to_string()),
    );
    for _ in 0..5 {
        let result = match ctx.kv.entry(key.as_str()).await {
            Ok(Some(e)) if e.operation == kv::Operation::Put => {
                if parse_record(&e.value).is_some_and(|r| r.state.is_final()) {
                    return;
                }
                ctx.kv
                    .update(key.as_str(), value.clone(), e.revision)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
            Ok(_) => ctx
                .kv
                .create(key.as_str(), value.clone())
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match result {
            Ok(()) => return,
            Err(e) => tracing::debug!(error = %e, "retrying dead_lettered record"),
        }
    }
    tracing::warn!(
        key,
        "could not record dead_lettered state; the dead letter itself is stored"
    );
}

/// The trace id of the current span, for logs and for orderctl.
pub fn trace_id() -> Option<String> {
    trace::current_trace_id()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_have_metric_labels() {
        for o in [
            Outcome::Processed,
            Outcome::Rejected,
            Outcome::DeadLettered,
            Outcome::Duplicate,
            Outcome::Nak,
        ] {
            assert!(!o.as_str().is_empty());
        }
    }
}
