//! Reading a pipeline back from NATS: every input and outcome of the input
//! stream, the consumer's figures and the letters of the dead-letter stream,
//! into the records [`super::check`] judges.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer};
use futures::StreamExt as _;
use orderpipeline_common::names::{self, OutcomeKind, OutcomeSubjects};
use orderpipeline_proto::{DeadLetter, Message as _, OrderCreated, OrderProcessed, OrderRejected};

use super::check::{Audit, StoredInput, StoredOutcome};

/// The time the stream stored a message (its server timestamp).
fn stored_at(m: &jetstream::Message) -> std::time::SystemTime {
    m.info()
        .ok()
        .and_then(|i| {
            let ns = u64::try_from(i.published.unix_timestamp_nanos()).ok()?;
            Some(std::time::UNIX_EPOCH + Duration::from_nanos(ns))
        })
        .unwrap_or(std::time::UNIX_EPOCH)
}

async fn read_all(
    js: &jetstream::Context,
    stream: &str,
    filter: &str,
) -> anyhow::Result<Vec<jetstream::Message>> {
    let s = js.get_stream(stream).await?;
    let c = s
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: filter.to_string(),
            ..Default::default()
        })
        .await?;
    let mut info = c.clone();
    let mut remaining = info.info().await?.num_pending;
    let mut out = Vec::new();
    if remaining == 0 {
        return Ok(out);
    }
    let mut msgs = c.messages().await?;
    while remaining > 0 {
        let m = tokio::time::timeout(Duration::from_secs(10), msgs.next())
            .await
            .context("reading the stream stalled")?
            .context("stream ended")??;
        remaining = m.info().map(|i| i.pending).unwrap_or(0);
        out.push(m);
    }
    Ok(out)
}

fn header_u64(m: &jetstream::Message, name: &str) -> Option<u64> {
    m.headers.as_ref()?.get(name)?.as_str().trim().parse().ok()
}

fn replay_of(m: &jetstream::Message) -> Option<u64> {
    let v = m.headers.as_ref()?.get(names::REPLAY_OF_HEADER)?.as_str();
    names::parse_replay_of(v).map(|(marker, _)| marker)
}

fn keeps(m: &jetstream::Message) -> Option<(u64, OutcomeKind)> {
    names::parse_keeps(m.headers.as_ref()?.get(names::KEEPS_HEADER)?.as_str())
}

fn source_seq(m: &jetstream::Message) -> Option<u64> {
    orderpipeline_common::nats::source_sequence(m.headers.as_ref()?)
}

fn stream_seq(m: &jetstream::Message) -> u64 {
    m.info().map(|i| i.stream_sequence).unwrap_or(0)
}

/// An input as stored: its id (when it decodes) and the keys its outcome may be
/// under (the order key, when the id is usable, and always the position key).
fn stored_input(m: &jetstream::Message, created_ns: u128) -> StoredInput {
    let seq = stream_seq(m);
    let order_id = OrderCreated::decode(m.payload.as_ref())
        .map(|o| o.order_id)
        .unwrap_or_default();
    let mut keys = Vec::new();
    if let Some(k) = names::order_key(&order_id) {
        keys.push(k);
    }
    keys.push(names::position_key(created_ns, seq));
    StoredInput {
        seq,
        order_id,
        keys,
        replay_of: replay_of(m),
        stored_at: stored_at(m),
    }
}

/// An outcome as stored, with its dead letter when it is one.
fn stored_outcome(
    m: &jetstream::Message,
    kind: OutcomeKind,
    key: &str,
) -> anyhow::Result<(StoredOutcome, Option<DeadLetter>)> {
    let seq = stream_seq(m);
    let mut dead = None;
    let kept = keeps(m);
    let order_id = match kind {
        OutcomeKind::Processed => {
            OrderProcessed::decode(m.payload.as_ref())
                .with_context(|| format!("outcome {seq} is not an OrderProcessed"))?
                .order_id
        }
        OutcomeKind::Rejected => {
            OrderRejected::decode(m.payload.as_ref())
                .with_context(|| format!("outcome {seq} is not an OrderRejected"))?
                .order_id
        }
        OutcomeKind::DeadLettered => {
            let d = DeadLetter::decode(m.payload.as_ref())
                .with_context(|| format!("outcome {seq} is not a DeadLetter"))?;
            let id = d.order_id.clone();
            dead = Some(d);
            id
        }
        // A copy of the final outcome it keeps, with that outcome's event.
        OutcomeKind::Kept => match kept {
            Some((_, OutcomeKind::Rejected)) => {
                OrderRejected::decode(m.payload.as_ref())
                    .with_context(|| format!("kept copy {seq} is not an OrderRejected"))?
                    .order_id
            }
            Some(_) => {
                OrderProcessed::decode(m.payload.as_ref())
                    .with_context(|| format!("kept copy {seq} is not an OrderProcessed"))?
                    .order_id
            }
            None => anyhow::bail!(
                "kept copy {seq} has no valid {} header",
                names::KEEPS_HEADER
            ),
        },
    };
    let outcome = StoredOutcome {
        seq,
        kind,
        key: key.to_string(),
        input_seq: header_u64(m, names::INPUT_SEQ_HEADER),
        // The outcome this one was written over: a replay's marker, a kept
        // copy's original.
        replay_of: replay_of(m).or(kept.map(|(over, _)| over)),
        keeps: kept.map(|(_, kind)| kind),
        order_id,
        stored_at: stored_at(m),
    };
    Ok((outcome, dead))
}

/// Every outcome under `outcomes` that `stream` holds, by key, oldest first,
/// and the dead letters among them by sequence: the chains the audit judges,
/// from the input stream or from any stream that keeps its messages with their
/// sequences (a mirror without limits keeps what the input stream's limits
/// removed).
pub async fn outcome_chains(
    js: &jetstream::Context,
    stream: &str,
    outcomes: &OutcomeSubjects,
) -> anyhow::Result<(
    BTreeMap<String, Vec<StoredOutcome>>,
    HashMap<u64, DeadLetter>,
)> {
    let mut chains: BTreeMap<String, Vec<StoredOutcome>> = BTreeMap::new();
    let mut dead = HashMap::new();
    for m in read_all(js, stream, &format!("{}.*.*", outcomes.prefix)).await? {
        let Some((kind, key)) = outcomes.parse(&m.subject) else {
            continue;
        };
        let (o, letter) = stored_outcome(&m, kind, key)?;
        if let Some(d) = letter {
            dead.insert(o.seq, d);
        }
        chains.entry(key.to_string()).or_default().push(o);
    }
    Ok((chains, dead))
}

impl Audit {
    /// Reads the pipeline whose input stream is `stream` and whose consumer is
    /// `consumer` (its filter subject names the inputs and the outcome prefix).
    pub async fn collect(
        js: &jetstream::Context,
        stream: &str,
        dlq_stream: &str,
        consumer: &str,
    ) -> anyhow::Result<Self> {
        let mut s = js
            .get_stream(stream)
            .await
            .with_context(|| format!("stream {stream}"))?;
        let info = s.info().await?;
        let (created_ns, first_seq) = (
            orderpipeline_common::topology::unix_ns(info.created),
            info.state.first_sequence,
        );
        let c = s
            .consumer_info(consumer)
            .await
            .with_context(|| format!("consumer {consumer} on {stream}"))?;
        let input_subject = c.config.filter_subject.clone();
        let outcomes = OutcomeSubjects::for_filter(&input_subject).with_context(|| {
            format!("consumer {consumer}'s filter {input_subject} has no outcome prefix")
        })?;
        let mut a = Audit {
            first_seq,
            consumer_pending: c.num_pending,
            consumer_ack_pending: c.num_ack_pending as u64,
            ..Default::default()
        };
        for m in read_all(js, stream, &input_subject).await? {
            a.stored_inputs.push(stored_input(&m, created_ns));
        }
        let (chains, dead) = outcome_chains(js, stream, &outcomes).await?;
        a.chains = chains;
        a.tally(dead);
        for m in read_all(js, dlq_stream, ">").await? {
            a.letters.push((stream_seq(&m), source_seq(&m)));
        }
        Ok(a)
    }

    /// Counts the inputs that have no v2 outcome but whose order the protocol
    /// before v2 recorded final in `bucket` as having their outcome (a pipeline
    /// upgraded from v1 keeps those records until their TTL); an input whose
    /// order has such a record and a v2 outcome too has two outcomes.
    pub async fn honour_legacy_records(
        &mut self,
        js: &jetstream::Context,
        bucket: &str,
    ) -> anyhow::Result<()> {
        let kv = js
            .get_key_value(bucket)
            .await
            .with_context(|| format!("KV bucket {bucket}"))?;
        let inputs: Vec<(u64, String, bool)> = self
            .stored_inputs
            .iter()
            .filter(|i| !i.order_id.is_empty())
            .map(|i| (i.seq, i.order_id.clone(), self.outcome_of(i).is_some()))
            .collect();
        let mut final_ids: HashMap<String, bool> = HashMap::new();
        for (seq, id, has_v2) in inputs {
            let is_final = match final_ids.get(&id) {
                Some(f) => *f,
                None => {
                    let f = kv
                        .get(names::legacy_state_key(&id))
                        .await?
                        .is_some_and(|v| {
                            orderpipeline_protocol::decide::legacy_record_is_final(&v)
                        });
                    final_ids.insert(id, f);
                    f
                }
            };
            match (is_final, has_v2) {
                (true, false) => {
                    self.legacy_final.insert(seq);
                }
                (true, true) => self.legacy_and_v2.push(seq),
                (false, _) => {}
            }
        }
        Ok(())
    }
}
