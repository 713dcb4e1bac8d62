//! What `orderctl` does, as a library (the tests use it too): publish orders the
//! way the contract says, count outcomes, list and replay dead letters.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer};
use bytes::Bytes;
use orderpipeline_common::names;
use orderpipeline_proto::{DeadLetter, Message as _, OrderCreated, OrderItem};
use tracing::Instrument as _;

use crate::trace;

/// Builds a valid order with a deterministic content for `id`.
pub fn valid_order(id: &str, n: u64) -> OrderCreated {
    let items: Vec<OrderItem> = (0..(1 + n % 3))
        .map(|i| OrderItem {
            product_id: format!("sku-{}", (n + i) % 97),
            quantity: i32::try_from(1 + (n + i) % 4).unwrap_or(1),
            unit_price: ((n + i) % 50) as f64 + 0.25,
        })
        .collect();
    let total = items
        .iter()
        .map(|i| f64::from(i.quantity) * i.unit_price)
        .sum();
    OrderCreated {
        order_id: id.to_string(),
        customer_id: format!("cust-{}", n % 1000),
        items,
        total_amount: total,
        created_at: Some(orderpipeline_proto::now()),
    }
}

/// An order that fails validation (its total does not match its items).
pub fn invalid_order(id: &str, n: u64) -> OrderCreated {
    let mut o = valid_order(id, n);
    o.total_amount += 1.0;
    o
}

#[derive(Clone, Debug)]
pub struct PublishOptions {
    pub subject: String,
    pub count: u64,
    /// Orders per second; 0 = as fast as acks allow.
    pub rate: f64,
    pub invalid_ratio: f64,
    pub duplicate_ratio: f64,
    /// Order ids are `<prefix>-<n>`.
    pub prefix: String,
    /// Publishes awaiting their PubAck at once.
    pub window: usize,
    pub ack_timeout: Duration,
    pub progress: bool,
    /// Undecodable messages to publish after the orders (they end in the DLQ).
    pub poison: u64,
}

/// What a publish run achieved; "published" means acknowledged by JetStream.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct PublishReport {
    pub published: u64,
    pub valid: u64,
    pub invalid: u64,
    /// Undecodable messages published on purpose.
    pub poison: u64,
    /// Re-publishes of an earlier order with the same Nats-Msg-Id.
    pub duplicates_sent: u64,
    /// PubAcks that said "duplicate" (the stream already had the id).
    pub duplicates_acked: u64,
    /// Publishes retried after an error or a timeout (same Nats-Msg-Id).
    pub retries: u64,
    pub seconds: f64,
    /// The trace id of the first order, to look it up in Jaeger.
    pub first_trace_id: Option<String>,
    #[serde(skip)]
    pub valid_ids: Vec<String>,
    #[serde(skip)]
    pub invalid_ids: Vec<String>,
}

struct Pending {
    payload: Bytes,
    headers: HeaderMap,
    fut: jetstream::context::PublishAckFuture,
    /// When the PubAck stops being worth waiting for (sent + ack timeout), so
    /// a window of publishes lost in an outage times out together, not one by one.
    deadline: tokio::time::Instant,
}

async fn send(
    js: &jetstream::Context,
    subject: &str,
    headers: HeaderMap,
    payload: Bytes,
) -> anyhow::Result<jetstream::context::PublishAckFuture> {
    Ok(js
        .publish_with_headers(subject.to_string(), headers, payload)
        .await?)
}

/// Publishes orders, each with `Nats-Msg-Id: <order_id>` and a `traceparent`, and
/// counts an order only once JetStream acknowledged it. A failed or timed-out
/// publish is retried with the same id until acknowledged.
pub async fn publish_orders(
    js: &jetstream::Context,
    opts: &PublishOptions,
) -> anyhow::Result<PublishReport> {
    let start = Instant::now();
    let mut report = PublishReport::default();
    let bar = if opts.progress {
        let b = indicatif::ProgressBar::new(opts.count);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} {bar:40} {pos}/{len} orders acked ({per_sec}, eta {eta})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut window: VecDeque<Pending> = VecDeque::new();
    let mut sent_ids: Vec<String> = Vec::new();
    let mut rng_state = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(std::process::id());
    let mut next_rand = move || {
        // xorshift: cheap and good enough for choosing which orders to vary
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 7;
        rng_state ^= rng_state << 17;
        (rng_state >> 11) as f64 / (1u64 << 53) as f64
    };
    let total = opts.count;
    let mut n = 0u64;
    while n < total || !window.is_empty() {
        // Keep the window full.
        while n < total && window.len() < opts.window.max(1) {
            if opts.rate > 0.0 {
                let due = start + Duration::from_secs_f64(n as f64 / opts.rate);
                tokio::time::sleep_until(due.into()).await;
            }
            let dup = !sent_ids.is_empty() && next_rand() < opts.duplicate_ratio;
            let (id, order) = if dup {
                let pick = (next_rand() * sent_ids.len() as f64) as usize;
                let id = sent_ids[pick.min(sent_ids.len() - 1)].clone();
                // The same content: a producer retrying its publish.
                let idx = id
                    .rsplit('-')
                    .next()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                let o = if report.invalid_ids.contains(&id) {
                    invalid_order(&id, idx)
                } else {
                    valid_order(&id, idx)
                };
                report.duplicates_sent += 1;
                (id, o)
            } else {
                let id = format!("{}-{n}", opts.prefix);
                let invalid = next_rand() < opts.invalid_ratio;
                let o = if invalid {
                    invalid_order(&id, n)
                } else {
                    valid_order(&id, n)
                };
                (id, o)
            };
            let span = tracing::info_span!(
                "publish",
                otel.name = format!("publish {}", opts.subject),
                otel.kind = "producer",
                messaging.system = "nats",
                messaging.operation.type = "publish",
                messaging.destination.name = opts.subject.as_str(),
                messaging.message.id = id.as_str(),
            );
            let mut headers = HeaderMap::new();
            headers.insert(names::MSG_ID_HEADER, id.as_str());
            {
                let _g = span.enter();
                trace::inject_current(&mut headers);
                if report.first_trace_id.is_none() {
                    report.first_trace_id = trace::current_trace_id();
                }
            }
            let payload = Bytes::from(order.encode_to_vec());
            let fut = loop {
                match send(js, &opts.subject, headers.clone(), payload.clone())
                    .instrument(span.clone())
                    .await
                {
                    Ok(f) => break f,
                    Err(e) => {
                        report.retries += 1;
                        tracing::warn!(error = %e, id, "publish failed; retrying with the same id");
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                }
            };
            if !dup {
                let valid = crate::decide::validate(&order).is_ok();
                if valid {
                    report.valid_ids.push(id.clone());
                } else {
                    report.invalid_ids.push(id.clone());
                }
                sent_ids.push(id.clone());
                n += 1;
            }
            window.push_back(Pending {
                payload,
                headers,
                fut,
                deadline: tokio::time::Instant::now() + opts.ack_timeout,
            });
        }
        // Collect the oldest ack; retry on error with the same id.
        if let Some(p) = window.pop_front() {
            match tokio::time::timeout_at(p.deadline, p.fut).await {
                Ok(Ok(ack)) => {
                    report.published += 1;
                    if ack.duplicate {
                        report.duplicates_acked += 1;
                    }
                    bar.inc(1);
                }
                Ok(Err(_)) | Err(_) => {
                    report.retries += 1;
                    let fut = loop {
                        match send(js, &opts.subject, p.headers.clone(), p.payload.clone()).await {
                            Ok(f) => break f,
                            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
                        }
                    };
                    window.push_front(Pending {
                        fut,
                        deadline: tokio::time::Instant::now() + opts.ack_timeout,
                        ..p
                    });
                }
            }
        }
    }
    for i in 0..opts.poison {
        let id = format!("{}-poison-{i}", opts.prefix);
        let mut headers = HeaderMap::new();
        headers.insert(names::MSG_ID_HEADER, id.as_str());
        // A field tag with an invalid wire type: no protobuf decoder accepts it.
        let payload = Bytes::from(vec![0x0f, 0xff, 0xff, 0xff, 0xff, i as u8]);
        loop {
            match send(js, &opts.subject, headers.clone(), payload.clone()).await {
                Ok(f) => match tokio::time::timeout(opts.ack_timeout, f).await {
                    Ok(Ok(_)) => break,
                    _ => report.retries += 1,
                },
                Err(_) => report.retries += 1,
            }
        }
        report.poison += 1;
    }
    bar.finish_and_clear();
    // `published` counts acks, including those of deliberate duplicates.
    report.valid = report.valid_ids.len() as u64;
    report.invalid = report.invalid_ids.len() as u64;
    report.seconds = start.elapsed().as_secs_f64();
    Ok(report)
}

/// Counts by outcome, read from the streams and the consumer.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct StatusReport {
    pub created: u64,
    pub processed: u64,
    pub rejected: u64,
    /// Dead-letter outcomes (markers) in the input stream, including superseded ones.
    pub dead_lettered: u64,
    pub dead_letters: u64,
    pub consumer_pending: u64,
    pub consumer_ack_pending: u64,
    pub consumer_redelivered: u64,
}

pub struct Names {
    pub stream: String,
    pub consumer: String,
    pub input_subject: String,
    pub dlq_stream: String,
}

/// How many messages of `stream` match `filter` (an ordered consumer's pending count).
async fn count(stream: &jetstream::stream::Stream, filter: &str) -> anyhow::Result<u64> {
    let mut c = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: filter.to_string(),
            ..Default::default()
        })
        .await?;
    Ok(c.info().await?.num_pending)
}

pub async fn status(js: &jetstream::Context, n: &Names) -> anyhow::Result<StatusReport> {
    let stream = js
        .get_stream(&n.stream)
        .await
        .with_context(|| format!("stream {}", n.stream))?;
    let outcomes = names::OutcomeSubjects::for_filter(&n.input_subject).with_context(|| {
        format!(
            "input subject {} has no outcome prefix; pass the pipeline's consumer filter subject with --input-subject",
            n.input_subject
        )
    })?;
    let mut r = StatusReport {
        created: count(&stream, &n.input_subject).await?,
        processed: count(&stream, &outcomes.all_of(names::OutcomeKind::Processed)).await?,
        rejected: count(&stream, &outcomes.all_of(names::OutcomeKind::Rejected)).await?,
        dead_lettered: count(&stream, &outcomes.all_of(names::OutcomeKind::DeadLettered)).await?,
        ..Default::default()
    };
    let mut dlq = js
        .get_stream(&n.dlq_stream)
        .await
        .with_context(|| format!("stream {}", n.dlq_stream))?;
    r.dead_letters = dlq.info().await?.state.messages;
    let c = stream.consumer_info(&n.consumer).await?;
    r.consumer_pending = c.num_pending;
    r.consumer_ack_pending = c.num_ack_pending as u64;
    r.consumer_redelivered = c.num_redelivered as u64;
    Ok(r)
}

/// One dead letter as stored.
#[derive(Clone, Debug)]
pub struct StoredDeadLetter {
    pub dlq_sequence: u64,
    /// Its marker (the `deadlettered` outcome) in the input stream, when the
    /// server copied it from there; `None` for letters written by earlier versions.
    pub marker: Option<u64>,
    pub letter: DeadLetter,
}

/// The input-stream sequence a sourced dead letter was copied from
/// (`Nats-Stream-Source: <stream> <seq> ...`).
pub fn source_sequence(headers: &HeaderMap) -> Option<u64> {
    let v = headers.get("Nats-Stream-Source")?.as_str();
    v.split_whitespace().nth(1)?.parse().ok()
}

/// Every dead letter in the DLQ stream, oldest first (at most `limit`).
pub async fn dlq_list(
    js: &jetstream::Context,
    dlq_stream: &str,
    limit: usize,
) -> anyhow::Result<Vec<StoredDeadLetter>> {
    let mut s = js
        .get_stream(dlq_stream)
        .await
        .with_context(|| format!("dead-letter stream {dlq_stream}"))?;
    let state = s.info().await?.state.clone();
    let mut out = Vec::new();
    if state.messages == 0 {
        return Ok(out);
    }
    for seq in state.first_sequence..=state.last_sequence {
        if out.len() >= limit {
            break;
        }
        match s.get_raw_message(seq).await {
            Ok(m) => {
                let letter = DeadLetter::decode(m.payload.as_ref())
                    .with_context(|| format!("dead letter {seq} is not an orders.v1.DeadLetter"))?;
                out.push(StoredDeadLetter {
                    dlq_sequence: seq,
                    marker: source_sequence(&m.headers),
                    letter,
                });
            }
            Err(e) if e.kind() == jetstream::stream::RawMessageErrorKind::NoMessageFound => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(out)
}

/// Replays dead letter `dlq_sequence`: re-submits the original payload to its
/// subject as a new input naming the letter it supersedes
/// (`Orderpipeline-Replay-Of: <marker>/<dlq seq>`). The worker gives the replay
/// its outcome (written over the letter's marker, so the order still has one
/// outcome) and then removes the letter. Replaying the same letter twice has one
/// effect: only one replay can write over the marker.
pub async fn dlq_replay(
    js: &jetstream::Context,
    dlq_stream: &str,
    dlq_sequence: u64,
) -> anyhow::Result<String> {
    let s = js
        .get_stream(dlq_stream)
        .await
        .with_context(|| format!("dead-letter stream {dlq_stream}"))?;
    let m = match s.get_raw_message(dlq_sequence).await {
        Ok(m) => m,
        Err(e) if e.kind() == jetstream::stream::RawMessageErrorKind::NoMessageFound => {
            anyhow::bail!(
                "dead letter {dlq_sequence} is not in {dlq_stream} (already replayed and removed, or never there); see `orderctl dlq list`"
            )
        }
        Err(e) => {
            return Err(anyhow::Error::new(e).context(format!(
                "reading dead letter {dlq_sequence} in {dlq_stream}"
            )));
        }
    };
    let letter = DeadLetter::decode(m.payload.as_ref())
        .with_context(|| format!("dead letter {dlq_sequence} is not an orders.v1.DeadLetter"))?;
    anyhow::ensure!(
        !letter.payload_truncated,
        "dead letter {dlq_sequence} keeps only the first {} of the original {} bytes (the payload was too large for the dead-letter stream), so it cannot be replayed; publish the order again from its source",
        letter.payload.len(),
        letter.payload_size
    );
    let marker = source_sequence(&m.headers);
    let mut headers = HeaderMap::new();
    let replay_of = marker.map(|mk| format!("{mk}/{dlq_sequence}"));
    if let Some(r) = &replay_of {
        headers.insert(names::REPLAY_OF_HEADER, r.as_str());
    }
    for h in &letter.headers {
        let lower = h.name.to_ascii_lowercase();
        if (lower == "traceparent" || lower == "tracestate")
            && let Ok(value) = h.value.parse::<async_nats::HeaderValue>()
        {
            headers.insert(lower.as_str(), value);
        }
    }
    js.publish_with_headers(
        letter.original_subject.clone(),
        headers,
        Bytes::from(letter.payload.clone()),
    )
    .await?
    .await
    .context("re-submitting the order")?;
    if marker.is_none() {
        // A letter from an earlier version has no marker to supersede: the replay
        // is an ordinary input, and the letter goes now.
        s.delete_message(dlq_sequence)
            .await
            .with_context(|| format!("removing dead letter {dlq_sequence} after replay"))?;
    }
    Ok(replay_of.unwrap_or_else(|| format!("legacy letter {dlq_sequence}")))
}
