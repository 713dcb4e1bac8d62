//! Reads every outcome back from the streams and checks the pipeline's promise:
//! each input message has exactly one outcome, nothing is lost or doubled, and
//! nothing is left pending. Used by `orderctl audit`, the demo and the tests.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer};
use futures::StreamExt as _;
use orderpipeline_proto::{DeadLetter, Message as _, OrderProcessed, OrderRejected};

/// Every outcome in the streams, for exactly-once assertions.
#[derive(Debug, Default)]
pub struct Audit {
    /// order id -> number of OrderProcessed events
    pub processed: HashMap<String, u32>,
    pub rejected: HashMap<String, u32>,
    /// original stream sequence -> dead letters
    pub dead_letters: HashMap<u64, Vec<DeadLetter>>,
    /// input stream sequences with their order id ("" when undecodable)
    pub inputs: Vec<(u64, String)>,
    pub consumer_pending: u64,
    pub consumer_ack_pending: u64,
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

impl Audit {
    pub async fn collect(
        js: &jetstream::Context,
        stream: &str,
        dlq_stream: &str,
        consumer: &str,
    ) -> anyhow::Result<Self> {
        let mut a = Audit::default();
        for m in read_all(
            js,
            stream,
            orderpipeline_common::names::DEFAULT_PROCESSED_SUBJECT,
        )
        .await?
        {
            let e = OrderProcessed::decode(m.payload.as_ref())?;
            *a.processed.entry(e.order_id).or_default() += 1;
        }
        for m in read_all(
            js,
            stream,
            orderpipeline_common::names::DEFAULT_REJECTED_SUBJECT,
        )
        .await?
        {
            let e = OrderRejected::decode(m.payload.as_ref())?;
            *a.rejected.entry(e.order_id).or_default() += 1;
        }
        for m in read_all(js, dlq_stream, ">").await? {
            let d = DeadLetter::decode(m.payload.as_ref())?;
            a.dead_letters
                .entry(d.original_stream_sequence)
                .or_default()
                .push(d);
        }
        for m in read_all(
            js,
            stream,
            orderpipeline_common::names::DEFAULT_INPUT_SUBJECT,
        )
        .await?
        {
            let seq = m.info().map(|i| i.stream_sequence).unwrap_or(0);
            let id = orderpipeline_proto::OrderCreated::decode(m.payload.as_ref())
                .map(|o| o.order_id)
                .unwrap_or_default();
            a.inputs.push((seq, id));
        }
        let s = js.get_stream(stream).await?;
        let c = s.consumer_info(consumer).await?;
        a.consumer_pending = c.num_pending;
        a.consumer_ack_pending = c.num_ack_pending as u64;
        Ok(a)
    }

    /// Asserts exactly-once outcomes: each valid id processed once, each invalid
    /// id rejected once, nothing else; the consumer holds nothing; every input
    /// sequence is accounted for (its order has an outcome, or it is dead-lettered).
    pub fn assert_exactly_once(&self, valid: &[String], invalid: &[String]) -> anyhow::Result<()> {
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
        let dl_twice: Vec<_> = self
            .dead_letters
            .iter()
            .filter(|(_, v)| v.len() > 1)
            .map(|(k, _)| k)
            .take(5)
            .collect();
        anyhow::ensure!(
            dl_twice.is_empty(),
            "dead-lettered twice: input sequences {dl_twice:?}"
        );
        anyhow::ensure!(
            self.consumer_pending == 0 && self.consumer_ack_pending == 0,
            "stranded: consumer pending {} ack-pending {}",
            self.consumer_pending,
            self.consumer_ack_pending
        );
        let unaccounted: Vec<_> = self
            .inputs
            .iter()
            .filter(|(seq, id)| {
                !(self.dead_letters.contains_key(seq)
                    || self.processed.contains_key(id)
                    || self.rejected.contains_key(id))
            })
            .take(5)
            .collect();
        anyhow::ensure!(
            unaccounted.is_empty(),
            "input sequences without an outcome: {unaccounted:?}"
        );
        Ok(())
    }

    pub fn dead_letter_count(&self) -> usize {
        self.dead_letters.values().map(Vec::len).sum()
    }

    /// The figures a person wants after a run.
    pub fn summary(&self) -> Summary {
        let dead_seqs: HashSet<u64> = self.dead_letters.keys().copied().collect();
        let lost = self
            .inputs
            .iter()
            .filter(|(seq, id)| {
                !(dead_seqs.contains(seq)
                    || self.processed.contains_key(id)
                    || self.rejected.contains_key(id))
            })
            .count() as u64;
        let outcomes =
            (self.processed.len() + self.rejected.len() + self.dead_letter_count()) as u64;
        Summary {
            published: self.inputs.len() as u64,
            processed: self.processed.len() as u64,
            rejected: self.rejected.len() as u64,
            dead_lettered: self.dead_letter_count() as u64,
            duplicates_suppressed: (self.inputs.len() as u64).saturating_sub(outcomes + lost),
            lost,
            processed_twice: self.processed.values().filter(|n| **n > 1).count() as u64,
            pending: self.consumer_pending + self.consumer_ack_pending,
        }
    }
}

/// Per-run figures: `lost` and `processed_twice` must be 0.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Summary {
    /// Input messages stored in the stream (acknowledged publishes, after dedup).
    pub published: u64,
    pub processed: u64,
    pub rejected: u64,
    pub dead_lettered: u64,
    /// Input messages acked as duplicates (the order already had an outcome).
    pub duplicates_suppressed: u64,
    /// Input messages with no outcome at all.
    pub lost: u64,
    pub processed_twice: u64,
    /// Messages the consumer still holds (pending + awaiting ack).
    pub pending: u64,
}
