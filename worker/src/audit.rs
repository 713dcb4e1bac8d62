//! Reads every input and every outcome back from the streams and checks the
//! pipeline's promise (see `protocol.rs`): each stored input's key has exactly one
//! current outcome, an outcome is only ever superseded by the replay of a dead
//! letter, nothing is left with the consumer, and no outcome or dead letter lacks
//! its input. Used by `orderctl audit`, the demo and the tests.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer};
use futures::StreamExt as _;
use orderpipeline_common::names::{self, OutcomeKind, OutcomeSubjects};
use orderpipeline_proto::{DeadLetter, Message as _, OrderCreated, OrderProcessed, OrderRejected};

/// One outcome message as stored in the input stream.
#[derive(Clone, Debug)]
pub struct StoredOutcome {
    pub seq: u64,
    pub kind: OutcomeKind,
    pub key: String,
    /// The input whose delivery wrote it.
    pub input_seq: Option<u64>,
    /// For a replay's outcome: the dead-letter marker it supersedes.
    pub replay_of: Option<u64>,
    /// The order id in the event (empty for undecodable inputs).
    pub order_id: String,
    /// When the stream stored it.
    pub stored_at: std::time::SystemTime,
}

/// One input message as stored.
#[derive(Clone, Debug)]
pub struct StoredInput {
    pub seq: u64,
    /// "" when undecodable.
    pub order_id: String,
    /// The keys its outcome may be under: the order key (when the id is usable)
    /// and always the position key (undecodable, oversized, unusable id).
    pub keys: Vec<String>,
    pub replay_of: Option<u64>,
    /// When the stream stored it.
    pub stored_at: std::time::SystemTime,
}

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

/// Every input and outcome in the streams, for exactly-once assertions.
#[derive(Debug, Default)]
pub struct Audit {
    /// order id -> number of OrderProcessed events
    pub processed: HashMap<String, u32>,
    pub rejected: HashMap<String, u32>,
    /// original stream sequence -> current dead letters (outcomes not superseded)
    pub dead_letters: HashMap<u64, Vec<DeadLetter>>,
    pub stored_inputs: Vec<StoredInput>,
    /// key -> its outcomes, oldest first
    pub chains: BTreeMap<String, Vec<StoredOutcome>>,
    /// Dead letters in the DLQ stream: (DLQ sequence, marker sequence in the input stream).
    pub letters: Vec<(u64, Option<u64>)>,
    pub consumer_pending: u64,
    pub consumer_ack_pending: u64,
    /// Inputs with no v2 outcome whose order the protocol before v2 recorded
    /// final in its KV bucket (see [`Audit::honour_legacy_records`]).
    pub legacy_final: HashSet<u64>,
    /// Inputs whose order has both a final record before v2 and a v2 outcome:
    /// two outcomes.
    pub legacy_and_v2: Vec<u64>,
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
    crate::handler::parse_replay_of(v).map(|(marker, _)| marker)
}

fn source_seq(m: &jetstream::Message) -> Option<u64> {
    crate::ctl::source_sequence(m.headers.as_ref()?)
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
        let created = s.info().await?.created;
        let created_ns = orderpipeline_common::topology::unix_ns(created);
        let c = s
            .consumer_info(consumer)
            .await
            .with_context(|| format!("consumer {consumer} on {stream}"))?;
        let input_subject = c.config.filter_subject.clone();
        let outcomes = OutcomeSubjects::for_filter(&input_subject).with_context(|| {
            format!("consumer {consumer}'s filter {input_subject} has no outcome prefix")
        })?;
        let mut a = Audit {
            consumer_pending: c.num_pending,
            consumer_ack_pending: c.num_ack_pending as u64,
            ..Default::default()
        };
        for m in read_all(js, stream, &input_subject).await? {
            let seq = m.info().map(|i| i.stream_sequence).unwrap_or(0);
            let id = OrderCreated::decode(m.payload.as_ref())
                .map(|o| o.order_id)
                .unwrap_or_default();
            let mut keys = Vec::new();
            if let Some(k) = names::order_key(&id) {
                keys.push(k);
            }
            keys.push(names::position_key(created_ns, seq));
            a.stored_inputs.push(StoredInput {
                seq,
                order_id: id,
                keys,
                replay_of: replay_of(&m),
                stored_at: stored_at(&m),
            });
        }
        let mut current_dead: HashMap<u64, DeadLetter> = HashMap::new();
        for m in read_all(js, stream, &format!("{}.*.*", outcomes.prefix)).await? {
            let Some((kind, key)) = outcomes.parse(&m.subject) else {
                continue;
            };
            let seq = m.info().map(|i| i.stream_sequence).unwrap_or(0);
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
                    current_dead.insert(seq, d);
                    id
                }
            };
            a.chains
                .entry(key.to_string())
                .or_default()
                .push(StoredOutcome {
                    seq,
                    kind,
                    key: key.to_string(),
                    input_seq: header_u64(&m, names::INPUT_SEQ_HEADER),
                    replay_of: replay_of(&m),
                    order_id,
                    stored_at: stored_at(&m),
                });
        }
        let superseded = a.superseded();
        for chain in a.chains.values() {
            let Some(last) = chain.last() else { continue };
            match last.kind {
                OutcomeKind::DeadLettered if superseded.contains(&last.seq) => {}
                OutcomeKind::Processed => {
                    *a.processed.entry(last.order_id.clone()).or_default() += 1
                }
                OutcomeKind::Rejected => *a.rejected.entry(last.order_id.clone()).or_default() += 1,
                OutcomeKind::DeadLettered => {
                    if let Some(d) = current_dead.remove(&last.seq) {
                        a.dead_letters
                            .entry(d.original_stream_sequence)
                            .or_default()
                            .push(d);
                    }
                }
            }
            // Earlier processed/rejected in the same chain count too: they are
            // second outcomes, which the checks below report.
            for o in &chain[..chain.len() - 1] {
                match o.kind {
                    OutcomeKind::Processed => {
                        *a.processed.entry(o.order_id.clone()).or_default() += 1
                    }
                    OutcomeKind::Rejected => {
                        *a.rejected.entry(o.order_id.clone()).or_default() += 1
                    }
                    OutcomeKind::DeadLettered => {}
                }
            }
        }
        for m in read_all(js, dlq_stream, ">").await? {
            let seq = m.info().map(|i| i.stream_sequence).unwrap_or(0);
            a.letters.push((seq, source_seq(&m)));
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
                        .is_some_and(|v| crate::decide::legacy_record_is_final(&v));
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

    /// How many processed-or-rejected outcomes a chain holds (more than one is a
    /// second outcome).
    fn finals(chain: &[StoredOutcome]) -> usize {
        chain
            .iter()
            .filter(|o| o.kind != OutcomeKind::DeadLettered)
            .count()
    }

    /// The dead-letter markers a replay's outcome names: superseded (under the
    /// same key, or under the replay's own key when the letter had no usable id).
    fn superseded(&self) -> HashSet<u64> {
        self.chains
            .values()
            .flatten()
            .filter_map(|o| o.replay_of)
            .collect()
    }

    /// Whether an input has its outcome (v2, or a final record before v2).
    fn has_outcome(&self, input: &StoredInput) -> bool {
        self.outcome_of(input).is_some() || self.legacy_final.contains(&input.seq)
    }

    /// The current outcome of an input: the last of its key's chain.
    /// A replay's outcome is under the key of the marker it names.
    pub fn outcome_of(&self, input: &StoredInput) -> Option<&StoredOutcome> {
        if let Some(marker) = input.replay_of
            && let Some(chain) = self
                .chains
                .values()
                .find(|c| c.iter().any(|o| o.seq == marker))
        {
            return chain.last();
        }
        input
            .keys
            .iter()
            .find_map(|k| self.chains.get(k).and_then(|c| c.last()))
    }

    /// Problems with the promise, each a sentence; empty when it holds.
    pub fn violations(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut push = |what: &str, items: Vec<String>| {
            if !items.is_empty() {
                let n = items.len();
                let some: Vec<_> = items.into_iter().take(5).collect();
                out.push(format!("{what}: {n}, e.g. {some:?}"));
            }
        };
        // Chains: at most one processed-or-rejected; only a replay of the current
        // dead letter may supersede it.
        let mut two = Vec::new();
        let mut bad_supersede = Vec::new();
        for (key, chain) in &self.chains {
            if Self::finals(chain) > 1 {
                two.push(format!(
                    "{key}: {:?}",
                    chain
                        .iter()
                        .map(|o| (o.seq, o.kind.token()))
                        .collect::<Vec<_>>()
                ));
            }
            for w in chain.windows(2) {
                if w[0].kind != OutcomeKind::DeadLettered || w[1].replay_of != Some(w[0].seq) {
                    bad_supersede.push(format!(
                        "{key}: {} {} then {} {}",
                        w[0].kind.token(),
                        w[0].seq,
                        w[1].kind.token(),
                        w[1].seq
                    ));
                }
            }
        }
        push("inputs with two outcomes (processed and/or rejected)", two);
        push(
            "inputs with a final record before v2 and a v2 outcome (two outcomes)",
            self.legacy_and_v2
                .iter()
                .map(|s| format!("seq {s}"))
                .collect(),
        );
        push(
            "outcomes written over another outcome without replaying its dead letter",
            bad_supersede,
        );
        let lost: Vec<String> = self
            .stored_inputs
            .iter()
            .filter(|i| !self.has_outcome(i))
            .map(|i| format!("seq {} id {:?}", i.seq, i.order_id))
            .collect();
        push("lost: stored inputs without an outcome", lost);
        let input_keys: HashSet<&String> =
            self.stored_inputs.iter().flat_map(|i| &i.keys).collect();
        let orphans: Vec<String> = self
            .chains
            .keys()
            .filter(|k| !input_keys.contains(k))
            .cloned()
            .collect();
        push("outcomes with no stored input", orphans);
        // Dead letters in the DLQ: each copies a marker that is its key's current
        // outcome; a superseded one should have been removed by its replay.
        let superseded = self.superseded();
        let current: HashSet<u64> = self
            .chains
            .values()
            .filter_map(|c| c.last())
            .filter(|o| o.kind == OutcomeKind::DeadLettered && !superseded.contains(&o.seq))
            .map(|o| o.seq)
            .collect();
        let all_markers: HashSet<u64> = self
            .chains
            .values()
            .flatten()
            .filter(|o| o.kind == OutcomeKind::DeadLettered)
            .map(|o| o.seq)
            .collect();
        let stale: Vec<String> = self
            .letters
            .iter()
            .filter(|(_, m)| m.is_some_and(|m| all_markers.contains(&m) && !current.contains(&m)))
            .map(|(s, m)| format!("DLQ seq {s} (marker {m:?})"))
            .collect();
        push(
            "dead letters still in the DLQ although a replay superseded them (remove with orderctl dlq list/replay)",
            stale,
        );
        let letterless: Vec<String> = self
            .letters
            .iter()
            .filter(|(_, m)| m.is_some_and(|m| !all_markers.contains(&m)))
            .map(|(s, m)| format!("DLQ seq {s} (marker {m:?})"))
            .collect();
        push(
            "dead letters with no input (their marker is gone)",
            letterless,
        );
        if self.consumer_pending + self.consumer_ack_pending > 0 {
            out.push(format!(
                "stranded: the consumer still holds pending {} ack-pending {}",
                self.consumer_pending, self.consumer_ack_pending
            ));
        }
        out
    }

    /// Asserts exactly-once outcomes: each valid id processed once, each invalid
    /// id rejected once, nothing else, and no [`Audit::violations`].
    pub fn assert_exactly_once(&self, valid: &[String], invalid: &[String]) -> anyhow::Result<()> {
        let v = self.violations();
        anyhow::ensure!(v.is_empty(), "{}", v.join("; "));
        let valid_set: HashSet<&String> = valid.iter().collect();
        let invalid_set: HashSet<&String> = invalid.iter().collect();
        let missing: Vec<_> = valid
            .iter()
            .filter(|id| !self.processed.contains_key(*id))
            .take(5)
            .collect();
        anyhow::ensure!(
            missing.is_empty(),
            "lost: valid orders without OrderProcessed, e.g. {missing:?}"
        );
        let twice: Vec<_> = self
            .processed
            .iter()
            .filter(|(_, n)| **n > 1)
            .take(5)
            .collect();
        anyhow::ensure!(twice.is_empty(), "processed twice: {twice:?}");
        let extra: Vec<_> = self
            .processed
            .keys()
            .filter(|id| !valid_set.contains(id))
            .take(5)
            .collect();
        anyhow::ensure!(extra.is_empty(), "unexpected OrderProcessed for {extra:?}");
        let missing: Vec<_> = invalid
            .iter()
            .filter(|id| !self.rejected.contains_key(*id))
            .take(5)
            .collect();
        anyhow::ensure!(
            missing.is_empty(),
            "invalid orders without OrderRejected: {missing:?}"
        );
        let twice: Vec<_> = self
            .rejected
            .iter()
            .filter(|(_, n)| **n > 1)
            .take(5)
            .collect();
        anyhow::ensure!(twice.is_empty(), "rejected twice: {twice:?}");
        let extra: Vec<_> = self
            .rejected
            .keys()
            .filter(|id| !invalid_set.contains(id))
            .take(5)
            .collect();
        anyhow::ensure!(extra.is_empty(), "unexpected OrderRejected for {extra:?}");
        Ok(())
    }

    /// Publish -> outcome latency in milliseconds, from the stream's own
    /// timestamps, for each input stored at or after `from_seq` that is the first
    /// input of its key: the time from storing it to storing the key's first outcome.
    pub fn latencies_ms(&self, from_seq: u64) -> Vec<f64> {
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for i in &self.stored_inputs {
            let Some(key) = i.keys.iter().find(|k| self.chains.contains_key(*k)) else {
                continue;
            };
            if !seen.insert(key.clone()) || i.seq < from_seq {
                continue;
            }
            if let Some(first) = self.chains[key].first()
                && let Ok(d) = first.stored_at.duration_since(i.stored_at)
            {
                out.push(d.as_secs_f64() * 1000.0);
            }
        }
        out
    }

    /// Current dead letters (outcomes not superseded by a replay).
    pub fn dead_letter_count(&self) -> usize {
        self.dead_letters.values().map(Vec::len).sum()
    }

    /// Current dead letters of valid orders whose attempts ran out.
    pub fn attempts_exhausted(&self) -> usize {
        self.dead_letters
            .values()
            .flatten()
            .filter(|d| d.error_class == orderpipeline_proto::ErrorClass::AttemptsExhausted as i32)
            .count()
    }

    /// The figures a person wants after a run.
    pub fn summary(&self) -> Summary {
        let lost = self
            .stored_inputs
            .iter()
            .filter(|i| !self.has_outcome(i))
            .count() as u64;
        let outcomes = self.chains.len() as u64;
        Summary {
            published: self.stored_inputs.len() as u64,
            processed: self.processed.len() as u64,
            rejected: self.rejected.len() as u64,
            dead_lettered: self.dead_letter_count() as u64,
            attempts_exhausted: self.attempts_exhausted() as u64,
            duplicates_suppressed: (self.stored_inputs.len() as u64)
                .saturating_sub(outcomes + lost),
            lost,
            processed_twice: self.processed.values().filter(|n| **n > 1).count() as u64,
            two_outcomes: self.chains.values().filter(|c| Self::finals(c) > 1).count() as u64
                + self.legacy_and_v2.len() as u64,
            pending: self.consumer_pending + self.consumer_ack_pending,
        }
    }
}

/// The `q` quantile (0..1) of `values` (nearest rank); `None` when empty.
pub fn quantile(values: &[f64], q: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    Some(v[rank - 1])
}

/// Per-run figures: `lost`, `processed_twice` and `two_outcomes` must be 0.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Summary {
    /// Input messages stored in the stream (acknowledged publishes, after dedup).
    pub published: u64,
    pub processed: u64,
    pub rejected: u64,
    /// Current dead letters (not superseded by a replay).
    pub dead_lettered: u64,
    /// Of those, valid orders whose attempts ran out.
    pub attempts_exhausted: u64,
    /// Inputs whose key already had an outcome (the same order stored again).
    pub duplicates_suppressed: u64,
    /// Input messages with no outcome at all.
    pub lost: u64,
    pub processed_twice: u64,
    /// Keys with more than one processed-or-rejected outcome.
    pub two_outcomes: u64,
    /// Messages the consumer still holds (pending + awaiting ack).
    pub pending: u64,
}

#[cfg(test)]
mod tests {
    use super::quantile;

    #[test]
    fn quantiles_use_the_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), Some(50.0));
        assert_eq!(quantile(&v, 0.99), Some(99.0));
        assert_eq!(quantile(&[3.0], 0.99), Some(3.0));
        assert_eq!(quantile(&[], 0.5), None);
    }
}
