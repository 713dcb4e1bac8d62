//! `orderctl status`: orders by outcome, read from the streams, and what the
//! consumer still holds.

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer};
use orderpipeline_common::names::{self, OutcomeKind, OutcomeSubjects};

use crate::target::{Binding, Session};

/// `orderctl status`'s flags.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    #[arg(long, env = "CONSUMER_NAME", default_value = names::DEFAULT_CONSUMER)]
    pub consumer: String,
    /// The pipeline's input subject (its consumer's filter); outcomes are
    /// counted on the subjects derived from it.
    #[arg(long, env = "INPUT_SUBJECT", default_value = names::DEFAULT_INPUT_SUBJECT)]
    pub input_subject: String,
    #[arg(long, env = "DLQ_STREAM", default_value = names::DEFAULT_DLQ_STREAM)]
    pub dlq_stream: String,
}

impl Args {
    pub fn bind(&mut self, b: &Binding<'_>) -> anyhow::Result<()> {
        let p = b.pipeline;
        b.name(&mut self.consumer, "consumer", &p.consumer)?;
        b.name(&mut self.input_subject, "input_subject", &p.input_subject)?;
        b.name(&mut self.dlq_stream, "dlq_stream", &p.dlq_stream)
    }
}

pub async fn run(s: &Session, args: Args) -> anyhow::Result<()> {
    let n = Names {
        stream: s.stream.clone(),
        consumer: args.consumer,
        input_subject: args.input_subject,
        dlq_stream: args.dlq_stream,
    };
    let r = status(&s.js, &n).await?;
    if s.json {
        return s.print_json(&r);
    }
    print!("{}", human(&r));
    Ok(())
}

fn human(r: &StatusReport) -> String {
    format!(
        "created      {}\nprocessed    {}\nrejected     {}\ndead letters {}\npending      {} (ack pending {}, redelivered {})\n",
        r.created,
        r.processed,
        r.rejected,
        r.dead_letters,
        r.consumer_pending,
        r.consumer_ack_pending,
        r.consumer_redelivered
    )
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

/// The pipeline's objects a status reads.
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
    let outcomes = OutcomeSubjects::for_filter(&n.input_subject).with_context(|| {
        format!(
            "input subject {} has no outcome prefix; pass the pipeline's consumer filter subject with --input-subject",
            n.input_subject
        )
    })?;
    let mut r = StatusReport {
        created: count(&stream, &n.input_subject).await?,
        processed: count(&stream, &outcomes.all_of(OutcomeKind::Processed)).await?,
        rejected: count(&stream, &outcomes.all_of(OutcomeKind::Rejected)).await?,
        dead_lettered: count(&stream, &outcomes.all_of(OutcomeKind::DeadLettered)).await?,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_human_status_lines_up() {
        let r = StatusReport {
            created: 10,
            processed: 7,
            rejected: 2,
            dead_lettered: 1,
            dead_letters: 1,
            consumer_pending: 0,
            consumer_ack_pending: 0,
            consumer_redelivered: 3,
        };
        assert_eq!(
            human(&r),
            "created      10\nprocessed    7\nrejected     2\ndead letters 1\npending      0 (ack pending 0, redelivered 3)\n"
        );
    }
}
