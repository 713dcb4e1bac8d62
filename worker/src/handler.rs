//! Handles one input message, end to end: decide what the input is (decode, size,
//! validation), then carry out the steps of the outcome protocol
//! ([`orderpipeline_protocol::machine::Machine`]): read the key's outcome when needed, call the
//! downstream, write the outcome as one conditional publish on
//! `<prefix>.<kind>.<key>`, ack. Every message ends as exactly one of: acked with
//! its outcome written by this delivery, acked because its key already has one
//! (duplicate), or NAKed with a delay.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, AckKind, stream};
use bytes::Bytes;
use orderpipeline_common::names::{self, OutcomeKind, OutcomeSubjects};
use orderpipeline_proto::{
    DeadLetter, ErrorClass, Header, Message as _, OrderCreated, OrderProcessed, OrderRejected,
    RejectReason,
};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, field};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::config::Config;
use crate::downstream::Downstream;
use crate::metrics::Metrics;
use orderpipeline_common::trace;
use orderpipeline_protocol::decide::{self, CallClass};
use orderpipeline_protocol::machine::{
    DeadReason, Delivery as ProtocolDelivery, Event, Machine, Step, Verdict,
};
use orderpipeline_protocol::replay;

/// Everything a handler needs; shared by all in-flight messages.
pub struct Ctx {
    pub cfg: Config,
    pub js: jetstream::Context,
    /// The input stream, which also holds the outcomes.
    pub stream: stream::Stream,
    /// The dead-letter stream (replays remove the letter they supersede).
    pub dlq: stream::Stream,
    pub outcomes: OutcomeSubjects,
    /// The input stream's creation time (ns): part of position keys, so a
    /// recreated stream's inputs never share a key with the old one's.
    pub stream_created_ns: u128,
    /// The state bucket of the protocol before v2, while it may hold records.
    pub legacy: Option<async_nats::jetstream::kv::Store>,
    pub metrics: Metrics,
    pub downstream: Option<Downstream>,
    pub worker: String,
    /// The consumer's ack wait: in-progress acks are sent well within it.
    pub ack_wait: Duration,
    /// The Idempotency-Key's scope (the stream's pin, see
    /// `names::idempotency_scope`).
    pub idempotency_scope: String,
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

struct Delivery {
    stream_seq: u64,
    delivered: u64,
    published: prost_types::Timestamp,
}

fn jitter() -> f64 {
    rand::random::<f64>()
}

/// Handles `msg` and records its outcome in the metrics. `cancel` fires when the
/// shutdown grace runs out: unfinished work is then NAKed.
pub async fn handle(ctx: Arc<Ctx>, msg: jetstream::Message, cancel: CancellationToken) -> Outcome {
    let start = Instant::now();
    ctx.metrics.in_flight.inc();
    let subject = msg.subject.as_str();
    let msg_id = msg
        .headers
        .as_ref()
        .and_then(|h| h.get(names::MSG_ID_HEADER))
        .map_or("", |v| v.as_str());
    // The JetStream metadata, parsed once from the reply subject.
    let delivery = msg.info().map(|i| Delivery {
        stream_seq: i.stream_sequence,
        delivered: u64::try_from(i.delivered).unwrap_or(1),
        published: prost_types::Timestamp {
            seconds: i.published.unix_timestamp(),
            nanos: i32::try_from(i.published.nanosecond()).unwrap_or(0),
        },
    });
    // As i64, like the metadata: trace exporters show a u64 as a string.
    let delivered = delivery
        .as_ref()
        .map_or(1, |d| i64::try_from(d.delivered).unwrap_or(i64::MAX));
    let span = tracing::info_span!(
        "process",
        otel.name = format!("process {subject}"),
        otel.kind = "consumer",
        otel.status_code = field::Empty,
        messaging.system = "nats",
        messaging.operation.type = "process",
        messaging.destination.name = subject,
        messaging.consumer.group.name = ctx.cfg.consumer.as_str(),
        messaging.message.id = msg_id,
        messaging.nats.delivery_count = delivered,
        messaging.nats.stream_sequence = field::Empty,
        order.id = field::Empty,
        outcome = field::Empty,
        worker = ctx.worker.as_str(),
    );
    // Nothing to continue when no layer records the span (sampled out, or no
    // exporter and quiet logs): the headers are not even looked at.
    if !span.is_disabled() {
        let _ = span.set_parent(trace::extract(msg.headers.as_ref()));
    }
    let outcome = run_with_progress(&ctx, &msg, delivery, &cancel)
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
    delivery: Result<Delivery, async_nats::Error>,
    cancel: &CancellationToken,
) -> Outcome {
    let work = process(ctx, msg, delivery);
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

/// What this input is, before any I/O.
struct Classified {
    /// The subject token of the input's outcome.
    key: String,
    verdict: Verdict,
    order: Option<OrderCreated>,
    /// Set for `Verdict::Reject`.
    rejection: Option<decide::Rejection>,
    /// Set for `Verdict::DeadLetter`.
    class: ErrorClass,
    why: String,
}

fn classify(ctx: &Ctx, msg: &jetstream::Message, delivery: &Delivery) -> Classified {
    classify_payload(&msg.payload, ctx.cfg.max_payload_bytes, || {
        names::position_key(ctx.stream_created_ns, delivery.stream_seq)
    })
}

/// What a payload is (pure): too large or undecodable (dead-lettered, keyed by
/// `position`), an invalid order (rejected) or a valid one (processed), keyed by
/// its order id when usable.
fn classify_payload(
    payload: &[u8],
    max_payload_bytes: usize,
    position: impl FnOnce() -> String,
) -> Classified {
    if payload.len() > max_payload_bytes {
        return Classified {
            key: position(),
            verdict: Verdict::DeadLetter,
            order: None,
            rejection: None,
            class: ErrorClass::Oversized,
            why: format!(
                "payload of {} bytes exceeds MAX_PAYLOAD_BYTES ({max_payload_bytes})",
                payload.len(),
            ),
        };
    }
    let order = match OrderCreated::decode(payload) {
        Ok(o) => o,
        Err(e) => {
            return Classified {
                key: position(),
                verdict: Verdict::DeadLetter,
                order: None,
                rejection: None,
                class: ErrorClass::Undecodable,
                why: format!("payload is not an orders.v1.OrderCreated: {e}"),
            };
        }
    };
    let validation = {
        let _s = tracing::info_span!("validate").entered();
        decide::validate(&order)
    };
    // An order with no usable id (empty, too long) is keyed by its position.
    let key = names::order_key(&order.order_id).unwrap_or_else(position);
    let (verdict, rejection) = match validation {
        Ok(()) => (Verdict::Process, None),
        Err(r) => (Verdict::Reject, Some(r)),
    };
    Classified {
        key,
        verdict,
        order: Some(order),
        rejection,
        class: ErrorClass::Unspecified,
        why: String::new(),
    }
}

async fn process(
    ctx: &Ctx,
    msg: &jetstream::Message,
    delivery: Result<Delivery, async_nats::Error>,
) -> Outcome {
    let delivery = match delivery {
        Ok(d) => d,
        Err(e) => {
            // Not a JetStream delivery: nothing to ack against.
            tracing::error!(error = %e, "message without JetStream metadata ignored");
            return Outcome::Duplicate;
        }
    };
    tracing::Span::current().record("messaging.nats.stream_sequence", delivery.stream_seq);
    let input = classify(ctx, msg, &delivery);
    if let Some(o) = &input.order {
        tracing::Span::current().record("order.id", o.order_id.as_str());
    }
    let order_key = input
        .order
        .as_ref()
        .and_then(|o| names::order_key(&o.order_id));
    let replay = match replay_of(ctx, msg, order_key.as_deref()).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "giving the input back for a later delivery");
            return nak_for_redelivery(ctx, msg, &delivery).await;
        }
    };
    if replay.as_ref().is_none_or(|r| r.key.is_none())
        && let Some(done) = done_before_v2(ctx, msg, &delivery, &input).await
    {
        return done;
    }
    let mut machine = Machine::new(
        input.verdict,
        ProtocolDelivery {
            delivered: delivery.delivered,
            max_deliveries: ctx.cfg.max_deliveries,
            replay_of: replay
                .as_ref()
                .filter(|r| r.key.is_some())
                .map(|r| r.marker),
            orphan_letter: replay.as_ref().is_some_and(|r| r.key.is_none()),
            downstream: ctx.downstream.is_some(),
            input_seq: delivery.stream_seq,
        },
    );
    let mut attempt = Attempt::new(ctx, msg, delivery, input, replay);
    let mut step = machine.on(Event::Start);
    loop {
        match attempt.execute(step).await {
            Ok(event) => step = machine.on(event),
            Err(outcome) => return outcome,
        }
    }
}

/// An order the protocol before v2 recorded final is acked as a duplicate
/// (`Some`); an error reading its record gives the input back.
async fn done_before_v2(
    ctx: &Ctx,
    msg: &jetstream::Message,
    delivery: &Delivery,
    input: &Classified,
) -> Option<Outcome> {
    let order = input.order.as_ref().filter(|o| !o.order_id.is_empty())?;
    match recorded_before_v2(ctx, &order.order_id).await {
        Ok(false) => None,
        Ok(true) => {
            tracing::info!("the order was recorded final before the upgrade; acked as duplicate");
            if let Err(e) = msg.ack().await {
                tracing::warn!(error = %e, "ack failed; the redelivery finds the record again");
            }
            Some(Outcome::Duplicate)
        }
        Err(e) => {
            tracing::warn!(error = %e, "giving the input back for a later delivery");
            Some(nak_for_redelivery(ctx, msg, delivery).await)
        }
    }
}

/// One delivery of one input: what it is, the key its outcome goes under, and
/// what happened so far. [`Attempt::execute`] carries out one step of the
/// protocol machine and says what it found, or how the message ended.
struct Attempt<'a> {
    ctx: &'a Ctx,
    msg: &'a jetstream::Message,
    delivery: Delivery,
    input: Classified,
    replay: Option<Replay>,
    /// The outcome's key: a replay's goes under the key of the letter it
    /// supersedes (for a letter without a usable id, the original input's position).
    key: String,
    /// The last failure, for the dead letter's message.
    last_error: String,
    /// The outcome this delivery wrote.
    written: Option<OutcomeKind>,
}

impl<'a> Attempt<'a> {
    fn new(
        ctx: &'a Ctx,
        msg: &'a jetstream::Message,
        delivery: Delivery,
        input: Classified,
        replay: Option<Replay>,
    ) -> Self {
        let key = replay
            .as_ref()
            .and_then(|r| r.key.clone())
            .unwrap_or_else(|| input.key.clone());
        let last_error = input.why.clone();
        Self {
            ctx,
            msg,
            delivery,
            input,
            replay,
            key,
            last_error,
            written: None,
        }
    }

    /// Carries out `step`: `Ok(event)` for the machine, `Err(outcome)` when the
    /// message is acked or given back.
    async fn execute(&mut self, step: Step) -> Result<Event, Outcome> {
        match step {
            Step::ReadOutcome => Ok(self.read().await),
            Step::CallDownstream => Ok(self.call().await),
            Step::Write { kind, expect, dead } => Ok(self.write(kind, expect, dead).await),
            Step::Keep { over } => Ok(self.keep(over).await),
            Step::RemoveLetter => Ok(self.remove_letter().await),
            Step::Ack => Err(self.ack().await),
            Step::Nak => {
                tracing::warn!(error = %self.last_error, delivery = self.delivery.delivered, "giving the input back for a later delivery");
                Err(nak_for_redelivery(self.ctx, self.msg, &self.delivery).await)
            }
        }
    }

    async fn read(&mut self) -> Event {
        match read_outcome(self.ctx, &self.key).await {
            Ok(last) => Event::Read(last),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the order's outcome");
                self.last_error = e;
                Event::ReadFailed
            }
        }
    }

    async fn call(&mut self) -> Event {
        let (Some(ds), Some(order)) = (&self.ctx.downstream, &self.input.order) else {
            // The machine asks only when both exist; never record a call that
            // was not made.
            self.last_error = "no downstream call possible for this input".into();
            return Event::Downstream(CallClass::Transient);
        };
        let (class, detail) = call_downstream(self.ctx, ds, order, &self.key).await;
        if class != CallClass::Ok {
            self.last_error = detail;
        }
        Event::Downstream(class)
    }

    async fn write(&mut self, kind: OutcomeKind, expect: u64, dead: Option<DeadReason>) -> Event {
        let payload = self.payload(kind, dead);
        match write_outcome(self, kind, expect, payload).await {
            WriteResult::Written => {
                self.written = Some(kind);
                self.log_written(kind, dead);
                Event::Written
            }
            WriteResult::Conflict => Event::Conflict,
            WriteResult::Failed(e) => {
                tracing::warn!(error = %e, "writing the outcome failed; it may or may not be stored");
                self.last_error = e;
                Event::WriteFailed
            }
        }
    }

    fn log_written(&self, kind: OutcomeKind, dead: Option<DeadReason>) {
        if kind == OutcomeKind::DeadLettered {
            let class = dead_class(&self.input, dead);
            count_dead_letter(self.ctx, class);
            tracing::warn!(class = class.label(), error = %self.last_error, "dead-lettered");
        } else if kind == OutcomeKind::Rejected
            && let Some(r) = &self.input.rejection
        {
            tracing::info!(reason = ?r.reason, detail = %r.message, "order rejected");
        }
    }

    /// Writes a `kept` copy of the key's outcome at `over`, which is older than
    /// this input (see `Step::Keep`): `Conflict` when that outcome is no longer
    /// the key's last (or gone), `Written` without a write when it is a dead
    /// letter (not kept).
    async fn keep(&mut self, over: u64) -> Event {
        use async_nats::jetstream::stream::RawMessageErrorKind;
        let original = match self.ctx.stream.get_raw_message(over).await {
            Ok(m) => m,
            Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => return Event::Conflict,
            Err(e) => {
                self.last_error = format!("reading the outcome {over} to keep: {e}");
                return Event::WriteFailed;
            }
        };
        let kept = match self.ctx.outcomes.parse(&original.subject) {
            Some((OutcomeKind::Kept, _)) => original
                .headers
                .get(names::KEEPS_HEADER)
                .and_then(|v| names::parse_keeps(v.as_str()))
                .map(|(_, k)| k),
            Some((kind, _)) => Some(kind),
            None => None,
        };
        let Some(kind) = kept.filter(|k| orderpipeline_protocol::machine::keeps(*k)) else {
            return Event::Written;
        };
        match write_kept(self, over, kind, original.payload).await {
            WriteResult::Written => {
                tracing::info!(
                    over,
                    kind = kind.token(),
                    "the order's outcome predates this input: kept it"
                );
                Event::Written
            }
            WriteResult::Conflict => Event::Conflict,
            WriteResult::Failed(e) => {
                tracing::warn!(error = %e, "writing the kept copy failed; it may or may not be stored");
                self.last_error = e;
                Event::WriteFailed
            }
        }
    }

    async fn remove_letter(&mut self) -> Event {
        let Some(r) = &self.replay else {
            return Event::Removed;
        };
        match remove_letter(self.ctx, r).await {
            Ok(()) => Event::Removed,
            Err(e) => {
                tracing::warn!(error = %e, letter = r.letter, "the replayed dead letter could not be removed; orderctl shows it as replayed");
                self.last_error = e;
                Event::RemoveFailed
            }
        }
    }

    /// No confirmation needed: a lost ack redelivers the input, whose outcome
    /// write then conflicts and it is acked again.
    async fn ack(&self) -> Outcome {
        if let Err(e) = self.msg.ack().await {
            tracing::warn!(error = %e, "ack failed; the redelivery finds the outcome");
        }
        let outcome = ended_as(self.written);
        if outcome == Outcome::Duplicate {
            tracing::info!("the input already has an outcome; acked as duplicate");
        }
        outcome
    }

    /// The encoded event of an outcome.
    fn payload(&self, kind: OutcomeKind, dead: Option<DeadReason>) -> Vec<u8> {
        outcome_payload(
            &self.ctx.worker,
            &self.input,
            kind,
            self.delivery.delivered,
            || {
                dead_letter(
                    self.ctx,
                    self.msg,
                    &self.delivery,
                    dead_class(&self.input, dead),
                    &self.last_error,
                    self.input.order.as_ref(),
                )
            },
        )
    }
}

/// How an acked message ended: with the outcome this delivery wrote, or as a
/// duplicate (its key already had one).
fn ended_as(written: Option<OutcomeKind>) -> Outcome {
    match written {
        Some(OutcomeKind::Processed) => Outcome::Processed,
        Some(OutcomeKind::Rejected) => Outcome::Rejected,
        Some(OutcomeKind::DeadLettered) => Outcome::DeadLettered,
        // A kept copy is the key's earlier outcome, not this input's.
        Some(OutcomeKind::Kept) | None => Outcome::Duplicate,
    }
}

/// Whether the protocol before v2 recorded this order final in its KV bucket
/// (an error when that cannot be read: the input is given back, not guessed).
async fn recorded_before_v2(ctx: &Ctx, order_id: &str) -> Result<bool, String> {
    let Some(kv) = &ctx.legacy else {
        return Ok(false);
    };
    let key = names::legacy_state_key(order_id);
    match kv.get(key.as_str()).await {
        Ok(Some(v)) => Ok(decide::legacy_record_is_final(&v)),
        Ok(None) => Ok(false),
        Err(e) => Err(format!(
            "reading the record of the protocol before v2 in {:?}: {e}",
            ctx.cfg.legacy_state_bucket
        )),
    }
}

/// A replayed input names the dead-letter marker it supersedes (its sequence in
/// the input stream) and the letter's sequence in the dead-letter stream.
#[derive(Clone, Debug)]
struct Replay {
    marker: u64,
    letter: u64,
    /// The marker's key: the replay's outcome goes there. `None` when the
    /// marker is gone (aged out, removed): the replay is then an ordinary input
    /// under its own key that removes its letter once the key has an outcome.
    key: Option<String>,
}

/// The claim of a replayed input, from its headers.
fn replay_claim(headers: Option<&HeaderMap>) -> Option<replay::Claim> {
    let h = headers?;
    let (marker, letter) = names::parse_replay_of(h.get(names::REPLAY_OF_HEADER)?.as_str())?;
    Some(replay::Claim {
        marker,
        letter,
        stream_created: h
            .get(names::REPLAY_STREAM_HEADER)
            .and_then(|v| v.as_str().trim().parse().ok()),
        key: h.get(names::REPLAY_KEY_HEADER).map(|v| v.to_string()),
    })
}

/// The replay this input is, if any ([`replay::judge`]): a replay that names no
/// letter it may supersede (a letter of an earlier stream of the same name,
/// another order's marker, no letter at all) is refused, logged and counted,
/// and the input is an ordinary one. An error reading the marker gives the
/// input back.
async fn replay_of(
    ctx: &Ctx,
    msg: &jetstream::Message,
    order_key: Option<&str>,
) -> Result<Option<Replay>, String> {
    use async_nats::jetstream::stream::RawMessageErrorKind;
    let Some(claim) = replay_claim(msg.headers.as_ref()) else {
        return Ok(None);
    };
    let stored = match ctx.stream.get_raw_message(claim.marker).await {
        Ok(m) => Some(m.subject),
        Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => None,
        Err(e) => return Err(format!("reading dead-letter marker {}: {e}", claim.marker)),
    };
    let at_marker = match stored.as_ref().map(|s| ctx.outcomes.parse(s)) {
        None => replay::AtMarker::Nothing,
        Some(Some((kind, key))) => replay::AtMarker::Outcome(kind, key),
        Some(None) => replay::AtMarker::Other,
    };
    match replay::judge(&claim, ctx.stream_created_ns, at_marker, order_key) {
        // `None`: the marker is gone; the letter is still removed once the
        // input has its outcome.
        Ok(key) => Ok(Some(Replay {
            marker: claim.marker,
            letter: claim.letter,
            key,
        })),
        Err(refusal) => {
            tracing::warn!(reason = refusal.label(), "{}", refusal.describe(&claim));
            ctx.metrics
                .replays_refused
                .get_or_create(&crate::metrics::ReasonLabels {
                    reason: refusal.label(),
                })
                .inc();
            Ok(None)
        }
    }
}

/// The sequence of the key's latest outcome, if any.
async fn read_outcome(ctx: &Ctx, key: &str) -> Result<Option<u64>, String> {
    use async_nats::jetstream::stream::LastRawMessageErrorKind;
    let span = tracing::info_span!("read outcome");
    let subject = ctx.outcomes.any_kind(key);
    match ctx
        .stream
        .get_last_raw_message_by_subject(&subject)
        .instrument(span)
        .await
    {
        Ok(m) => Ok(Some(m.sequence)),
        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
        Err(e) => Err(format!("reading the last outcome on {subject}: {e}")),
    }
}

enum WriteResult {
    Written,
    Conflict,
    Failed(String),
}

fn is_wrong_last_sequence(e: &async_nats::jetstream::context::PublishError) -> bool {
    use async_nats::jetstream::context::PublishErrorKind;
    use async_nats::jetstream::{Error as JsError, ErrorCode};
    if e.kind() == PublishErrorKind::WrongLastSequence {
        return true;
    }
    // A clustered stream refuses a second conditional write on a key while the
    // first is still in flight with a code of its own (10164).
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<JsError>())
        .is_some_and(|j| j.error_code() == ErrorCode::STREAM_WRONG_LAST_SEQUENCE_CONSTANT)
}

/// Publishes the outcome on `<prefix>.<kind>.<key>`, accepted by the stream only
/// if the key's last outcome sequence is `expect`.
async fn write_outcome(
    a: &Attempt<'_>,
    kind: OutcomeKind,
    expect: u64,
    payload: Vec<u8>,
) -> WriteResult {
    let ctx = a.ctx;
    let subject = ctx.outcomes.subject(kind, &a.key);
    let span = tracing::info_span!(
        "publish",
        otel.name = format!("publish {}.{}", ctx.outcomes.prefix, kind.token()),
        otel.kind = "producer",
        messaging.system = "nats",
        messaging.operation.type = "publish",
        messaging.destination.name = subject.as_str(),
        outcome.expect = expect,
    );
    let headers = outcome_headers(a, kind, expect);
    publish_over(ctx, subject, headers, expect, Bytes::from(payload))
        .instrument(span)
        .await
}

/// Publishes to `subject`, accepted by the stream only if the key's last
/// outcome sequence is `expect` (the headers name the key's subjects).
async fn publish_over(
    ctx: &Ctx,
    subject: String,
    headers: HeaderMap,
    expect: u64,
    payload: Bytes,
) -> WriteResult {
    let publish = jetstream::message::PublishMessage::build()
        .headers(headers)
        .expected_last_subject_sequence(expect)
        .payload(payload);
    let ack = match ctx.js.send_publish(subject.clone(), publish).await {
        Ok(fut) => fut.await,
        Err(e) => return WriteResult::Failed(format!("publishing to {subject}: {e}")),
    };
    match ack {
        Ok(_) => WriteResult::Written,
        Err(e) if is_wrong_last_sequence(&e) => WriteResult::Conflict,
        Err(e) => WriteResult::Failed(format!("publishing to {subject}: {e}")),
    }
}

/// Publishes the `kept` copy of outcome `over` (of `kind`, with its event
/// `payload`) on `<prefix>.kept.<key>`, accepted only while `over` is the key's
/// last outcome.
async fn write_kept(a: &Attempt<'_>, over: u64, kind: OutcomeKind, payload: Bytes) -> WriteResult {
    let subject = a.ctx.outcomes.subject(OutcomeKind::Kept, &a.key);
    let mut headers = key_headers(a);
    headers.insert(
        names::KEEPS_HEADER,
        format!("{over}/{}", kind.token()).as_str(),
    );
    trace::inject_current(&mut headers);
    publish_over(a.ctx, subject, headers, over, payload).await
}

/// The headers of every write on the key: its subjects for the conditional
/// write, and the input's sequence.
fn key_headers(a: &Attempt<'_>) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(
        "Nats-Expected-Last-Subject-Sequence-Subject",
        a.ctx.outcomes.any_kind(&a.key).as_str(),
    );
    headers.insert(
        names::INPUT_SEQ_HEADER,
        a.delivery.stream_seq.to_string().as_str(),
    );
    headers
}

/// The outcome's headers: the key's subjects for the conditional write, the
/// input's sequence, the letter a replay supersedes (only when it writes over
/// it: a replay whose letter vanished writes over nothing), on a dead letter its
/// key and the stream's identity (a replay names its letter by them), and the
/// trace context.
fn outcome_headers(a: &Attempt<'_>, kind: OutcomeKind, expect: u64) -> HeaderMap {
    let mut headers = key_headers(a);
    if let Some(r) = a.replay.as_ref().filter(|r| r.marker == expect) {
        headers.insert(
            names::REPLAY_OF_HEADER,
            format!("{}/{}", r.marker, r.letter).as_str(),
        );
    }
    if kind == OutcomeKind::DeadLettered {
        headers.insert(names::KEY_HEADER, a.key.as_str());
        headers.insert(
            names::STREAM_CREATED_HEADER,
            a.ctx.stream_created_ns.to_string().as_str(),
        );
    }
    trace::inject_current(&mut headers);
    headers
}

/// The encoded event of an outcome (pure but for the timestamp); the dead
/// letter's envelope comes from `dead_letter`.
fn outcome_payload(
    worker: &str,
    c: &Classified,
    kind: OutcomeKind,
    delivered: u64,
    dead_letter: impl FnOnce() -> Vec<u8>,
) -> Vec<u8> {
    let empty = OrderCreated::default();
    let order = c.order.as_ref().unwrap_or(&empty);
    match kind {
        OutcomeKind::Processed => OrderProcessed {
            order_id: order.order_id.clone(),
            customer_id: order.customer_id.clone(),
            total_amount: order.total_amount,
            processed_at: Some(orderpipeline_proto::now()),
            delivery_count: delivered,
            worker: worker.to_string(),
        }
        .encode_to_vec(),
        OutcomeKind::Rejected => {
            let r = c.rejection.clone().unwrap_or(decide::Rejection {
                reason: RejectReason::Unspecified,
                message: String::new(),
            });
            OrderRejected {
                order_id: order.order_id.clone(),
                customer_id: order.customer_id.clone(),
                reason_code: r.reason as i32,
                message: r.message,
                rejected_at: Some(orderpipeline_proto::now()),
                worker: worker.to_string(),
            }
            .encode_to_vec()
        }
        OutcomeKind::DeadLettered => dead_letter(),
        // Never written through `Step::Write`: a kept copy carries the payload
        // of the outcome it keeps (see `write_kept`).
        OutcomeKind::Kept => Vec::new(),
    }
}

fn dead_class(c: &Classified, dead: Option<DeadReason>) -> ErrorClass {
    match dead {
        Some(DeadReason::Unhandleable) | None => c.class,
        Some(DeadReason::Permanent) => ErrorClass::Permanent,
        Some(DeadReason::AttemptsExhausted) => ErrorClass::AttemptsExhausted,
    }
}

fn count_dead_letter(ctx: &Ctx, class: ErrorClass) {
    ctx.metrics
        .dead_letters
        .get_or_create(&crate::metrics::ClassLabels {
            class: class.label(),
        })
        .inc();
}

/// Removes the dead letter a replay superseded: only the DLQ message that is
/// the copy of the replay's marker (a letter already gone is fine).
async fn remove_letter(ctx: &Ctx, r: &Replay) -> Result<(), String> {
    use async_nats::jetstream::stream::RawMessageErrorKind;
    let letter = r.letter;
    match ctx.dlq.get_raw_message(letter).await {
        Ok(m) if orderpipeline_common::nats::source_sequence(&m.headers) == Some(r.marker) => {}
        Ok(_) => {
            tracing::warn!(
                letter,
                marker = r.marker,
                "DLQ message {letter} is not the copy of marker {}; left in place",
                r.marker
            );
            return Ok(());
        }
        Err(g) if g.kind() == RawMessageErrorKind::NoMessageFound => return Ok(()),
        Err(g) => {
            return Err(format!(
                "reading dead letter {letter} in {}: {g}",
                ctx.cfg.dlq_stream
            ));
        }
    }
    let Err(e) = ctx.dlq.delete_message(letter).await else {
        return Ok(());
    };
    // The server answers a delete of a missing message with a generic error:
    // look the letter up to tell "already gone" (a redelivery of the replay, a
    // second replay, a person) from a real failure.
    match ctx.dlq.get_raw_message(letter).await {
        Err(g) if g.kind() == RawMessageErrorKind::NoMessageFound => Ok(()),
        _ => Err(format!(
            "removing dead letter {letter} from {}: {e}",
            ctx.cfg.dlq_stream
        )),
    }
}

/// Calls the downstream with its in-process retries; the class of the last answer.
async fn call_downstream(
    ctx: &Ctx,
    ds: &Downstream,
    order: &OrderCreated,
    key: &str,
) -> (CallClass, String) {
    let attempts = ctx.cfg.retry_attempts;
    let idempotency_key = names::idempotency_key(&ctx.idempotency_scope, key);
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
        let result = ds
            .call(order, &idempotency_key, headers)
            .instrument(span.clone())
            .await;
        span.record("http.outcome", result.detail.as_str());
        match result.class {
            CallClass::Ok => return (CallClass::Ok, result.detail),
            CallClass::Permanent => return (CallClass::Permanent, result.detail),
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
    (
        CallClass::Transient,
        format!("downstream failed {attempts} time(s); last: {last}"),
    )
}

/// The dead-letter envelope of this input: the original payload (its first
/// bytes when it cannot fit the server's max_payload), headers and why.
fn dead_letter(
    ctx: &Ctx,
    msg: &jetstream::Message,
    delivery: &Delivery,
    class: ErrorClass,
    why: &str,
    order: Option<&OrderCreated>,
) -> Vec<u8> {
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
    let mut envelope = DeadLetter {
        original_subject: msg.subject.to_string(),
        original_stream: ctx.cfg.stream.clone(),
        original_stream_sequence: delivery.stream_seq,
        payload: Vec::new(),
        headers,
        error_class: class as i32,
        error_message: why.to_string(),
        delivery_count: delivery.delivered,
        original_published_at: Some(delivery.published),
        dead_lettered_at: Some(orderpipeline_proto::now()),
        order_id: order.map(|o| o.order_id.clone()).unwrap_or_default(),
        worker: ctx.worker.clone(),
        payload_size: u64::try_from(msg.payload.len()).unwrap_or(u64::MAX),
        payload_truncated: false,
    };
    let max_payload = ctx.js.client().server_info().max_payload;
    fill_envelope(&mut envelope, &msg.payload, max_payload);
    envelope.encode_to_vec()
}

/// Puts the original payload into the envelope: whole when the encoded letter
/// fits the server's `max_payload`, else its first bytes, marked truncated.
fn fill_envelope(envelope: &mut DeadLetter, payload: &[u8], max_payload: usize) {
    match decide::dead_letter_payload_cap(payload.len(), envelope.encoded_len(), max_payload) {
        None => envelope.payload = payload.to_vec(),
        Some(cap) => {
            envelope.payload = payload[..cap].to_vec();
            envelope.payload_truncated = true;
        }
    }
}

/// The trace id of the current span, for logs and for orderctl.
pub fn trace_id() -> Option<String> {
    trace::current_trace_id()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(id: &str) -> OrderCreated {
        OrderCreated {
            order_id: id.into(),
            customer_id: "c-1".into(),
            items: vec![orderpipeline_proto::OrderItem {
                product_id: "sku-1".into(),
                quantity: 2,
                unit_price: 1.25,
            }],
            total_amount: 2.5,
            created_at: Some(orderpipeline_proto::now()),
        }
    }

    fn classified(payload: &[u8]) -> Classified {
        classify_payload(payload, 1024, || "=7-3".into())
    }

    #[test]
    fn inputs_are_classified_and_keyed() {
        let mut invalid = order("o-2");
        invalid.total_amount = 9.0;
        let cases: Vec<(Vec<u8>, Verdict, ErrorClass, &str)> = vec![
            (
                order("o-1").encode_to_vec(),
                Verdict::Process,
                ErrorClass::Unspecified,
                "o-1",
            ),
            (
                invalid.encode_to_vec(),
                Verdict::Reject,
                ErrorClass::Unspecified,
                "o-2",
            ),
            // Any UTF-8 id: encoded, never raw in a subject.
            (
                order("a b").encode_to_vec(),
                Verdict::Process,
                ErrorClass::Unspecified,
                "~612062",
            ),
            // No usable id: keyed by position (and rejected).
            (
                order("").encode_to_vec(),
                Verdict::Reject,
                ErrorClass::Unspecified,
                "=7-3",
            ),
            (
                vec![0x0f, 0xff, 0xff],
                Verdict::DeadLetter,
                ErrorClass::Undecodable,
                "=7-3",
            ),
            (
                vec![0; 2000],
                Verdict::DeadLetter,
                ErrorClass::Oversized,
                "=7-3",
            ),
        ];
        for (payload, verdict, class, key) in cases {
            let c = classified(&payload);
            assert_eq!((c.verdict, c.class, c.key.as_str()), (verdict, class, key));
            assert_eq!(c.rejection.is_some(), verdict == Verdict::Reject);
            assert_eq!(c.order.is_some(), verdict != Verdict::DeadLetter);
            assert_eq!(c.why.is_empty(), verdict != Verdict::DeadLetter);
        }
        assert_eq!(
            classified(&[0; 2000]).why,
            "payload of 2000 bytes exceeds MAX_PAYLOAD_BYTES (1024)"
        );
    }

    #[test]
    fn outcome_events_carry_the_order() {
        let c = classified(&order("o-1").encode_to_vec());
        let no_letter = || panic!("not a dead letter");
        let p = OrderProcessed::decode(
            outcome_payload("w-1", &c, OutcomeKind::Processed, 3, no_letter).as_slice(),
        )
        .unwrap();
        assert_eq!(
            (
                p.order_id.as_str(),
                p.customer_id.as_str(),
                p.total_amount,
                p.delivery_count,
                p.worker.as_str()
            ),
            ("o-1", "c-1", 2.5, 3, "w-1")
        );
        let mut bad = order("o-2");
        bad.total_amount = 9.0;
        let c = classified(&bad.encode_to_vec());
        let r = OrderRejected::decode(
            outcome_payload("w-1", &c, OutcomeKind::Rejected, 1, no_letter).as_slice(),
        )
        .unwrap();
        assert_eq!(r.order_id, "o-2");
        assert_eq!(r.reason_code, c.rejection.as_ref().unwrap().reason as i32);
        assert!(!r.message.is_empty());
        let d = outcome_payload("w-1", &c, OutcomeKind::DeadLettered, 1, || vec![42]);
        assert_eq!(
            d,
            vec![42],
            "a dead letter's envelope is built by dead_letter"
        );
    }

    #[test]
    fn dead_letters_name_why() {
        let undecodable = classified(&[0x0f, 0xff]);
        let valid = classified(&order("o-1").encode_to_vec());
        let cases = [
            (&undecodable, None, ErrorClass::Undecodable),
            (
                &undecodable,
                Some(DeadReason::Unhandleable),
                ErrorClass::Undecodable,
            ),
            (&valid, Some(DeadReason::Permanent), ErrorClass::Permanent),
            (
                &valid,
                Some(DeadReason::AttemptsExhausted),
                ErrorClass::AttemptsExhausted,
            ),
        ];
        for (c, dead, class) in cases {
            assert_eq!(dead_class(c, dead), class);
        }
    }

    #[test]
    fn a_message_ends_as_what_this_delivery_wrote() {
        let cases = [
            (
                Some(OutcomeKind::Processed),
                Outcome::Processed,
                "processed",
            ),
            (Some(OutcomeKind::Rejected), Outcome::Rejected, "rejected"),
            (
                Some(OutcomeKind::DeadLettered),
                Outcome::DeadLettered,
                "dead_lettered",
            ),
            (None, Outcome::Duplicate, "duplicate"),
        ];
        for (written, outcome, label) in cases {
            assert_eq!(ended_as(written), outcome);
            assert_eq!(outcome.as_str(), label);
        }
        assert_eq!(Outcome::Nak.as_str(), "nak");
    }

    #[test]
    fn a_dead_letter_keeps_the_payload_whole_only_when_it_fits() {
        let envelope = || DeadLetter {
            original_subject: "ORDER.created".into(),
            original_stream: "ORDERS".into(),
            error_message: "payload is not an orders.v1.OrderCreated".into(),
            payload_size: 5000,
            ..Default::default()
        };
        let payload = vec![7u8; 5000];
        for (max_payload, truncated) in [
            (1 << 20, false),
            (16384, false),
            (13000, true),
            (1024, true),
        ] {
            let mut d = envelope();
            fill_envelope(&mut d, &payload, max_payload);
            assert_eq!(d.payload_truncated, truncated, "max_payload {max_payload}");
            assert!(d.encoded_len() <= max_payload, "max_payload {max_payload}");
            assert_eq!(&payload[..d.payload.len()], d.payload.as_slice());
            assert_eq!(d.payload.len() == payload.len(), !truncated);
        }
    }
}
