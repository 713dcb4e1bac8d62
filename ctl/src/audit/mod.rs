//! `orderctl audit`: reads every input and every outcome back from the streams
//! ([`read`]) and checks the pipeline's promise ([`check`]): each stored input's
//! key has exactly one current outcome, an outcome is only ever superseded by
//! the replay of a dead letter, nothing is left with the consumer, and no
//! outcome or dead letter lacks its input. Used by `orderctl audit`, the demo
//! and the tests.

pub mod check;
pub mod read;

use anyhow::Context as _;
use orderpipeline_common::names;

pub use check::{Audit, StoredInput, StoredOutcome, Summary, quantile};

use crate::target::{Binding, Session};

/// `orderctl audit`'s flags.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    #[arg(long, env = "CONSUMER_NAME", default_value = names::DEFAULT_CONSUMER)]
    pub consumer: String,
    #[arg(long, env = "DLQ_STREAM", default_value = names::DEFAULT_DLQ_STREAM)]
    pub dlq_stream: String,
    /// Publish -> outcome latency (p50, p99, from the stream's timestamps) of
    /// the inputs stored from this stream sequence on.
    #[arg(long, default_value_t = 1)]
    pub latency_from_seq: u64,
    /// After an upgrade from the protocol before v2: its KV bucket (e.g.
    /// ORDERS_STATE), whose final records count as outcomes.
    #[arg(long, env = "LEGACY_STATE_BUCKET")]
    pub legacy_state_bucket: Option<String>,
    /// Set by --pipeline: honour the legacy bucket only if it still exists.
    #[arg(skip)]
    pub legacy_if_present: bool,
}

impl Args {
    pub fn bind(&mut self, b: &Binding<'_>) -> anyhow::Result<()> {
        let p = b.pipeline;
        b.name(&mut self.consumer, "consumer", &p.consumer)?;
        b.name(&mut self.dlq_stream, "dlq_stream", &p.dlq_stream)?;
        if self.legacy_state_bucket.is_none() {
            self.legacy_state_bucket = Some(p.state_bucket.clone());
            self.legacy_if_present = true;
        }
        Ok(())
    }
}

pub async fn run(s: &Session, args: Args) -> anyhow::Result<()> {
    let mut a = Audit::collect(&s.js, &s.stream, &args.dlq_stream, &args.consumer).await?;
    if let Some(bucket) = &args.legacy_state_bucket
        && legacy_bucket_exists(s, bucket, args.legacy_if_present).await?
    {
        a.honour_legacy_records(&s.js, bucket).await?;
    }
    let report = Report::of(&a, args.latency_from_seq);
    if s.json {
        s.print_json(&report.json())?;
    } else {
        print!("{}", report.human());
    }
    if !report.violations.is_empty() {
        anyhow::bail!("{} violation(s) of exactly-once", report.violations.len());
    }
    Ok(())
}

/// Whether the legacy bucket is there; with `if_present` a missing one is fine.
async fn legacy_bucket_exists(s: &Session, bucket: &str, if_present: bool) -> anyhow::Result<bool> {
    match s.js.get_key_value(bucket).await {
        Ok(_) => Ok(true),
        Err(e) if if_present && orderpipeline_common::nats::is_not_found(&e) => Ok(false),
        Err(e) => Err(e).with_context(|| format!("cannot open the legacy state bucket {bucket}")),
    }
}

/// What `orderctl audit` prints.
struct Report {
    summary: Summary,
    violations: Vec<String>,
    latencies: usize,
    p50: Option<f64>,
    p99: Option<f64>,
}

impl Report {
    fn of(a: &Audit, latency_from_seq: u64) -> Self {
        let lat = a.latencies_ms(latency_from_seq);
        Self {
            summary: a.summary(),
            violations: a.violations(),
            latencies: lat.len(),
            p50: quantile(&lat, 0.5),
            p99: quantile(&lat, 0.99),
        }
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({"summary": self.summary, "violations": self.violations,
            "latency_ms": {"inputs": self.latencies, "p50": self.p50, "p99": self.p99}})
    }

    fn human(&self) -> String {
        let s = &self.summary;
        let mut lines = vec![
            format!("published              {}", s.published),
            format!("processed              {}", s.processed),
            format!("rejected               {}", s.rejected),
            format!(
                "dead-lettered          {} ({} valid orders whose attempts ran out)",
                s.dead_lettered, s.attempts_exhausted
            ),
            format!("duplicates suppressed  {}", s.duplicates_suppressed),
            format!("still pending          {}", s.pending),
            format!("lost                   {}", s.lost),
            format!("processed twice        {}", s.processed_twice),
            format!("two outcomes           {}", s.two_outcomes),
            format!(
                "archived               {} outcomes and {} dead letters whose inputs aged out of the stream",
                s.archived_outcomes, s.archived_letters
            ),
        ];
        if let (Some(p50), Some(p99)) = (self.p50, self.p99) {
            lines.push(format!(
                "publish -> outcome     p50 {p50:.1} ms, p99 {p99:.1} ms ({} inputs, stream timestamps)",
                self.latencies
            ));
        }
        for v in &self.violations {
            lines.push(format!("VIOLATION: {v}"));
        }
        lines.join("\n") + "\n"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_human_report_names_each_violation() {
        let r = Report {
            summary: Summary {
                published: 3,
                lost: 1,
                ..Default::default()
            },
            violations: vec!["lost: stored inputs without an outcome: 1, e.g. [\"seq 3\"]".into()],
            latencies: 2,
            p50: Some(1.0),
            p99: Some(2.5),
        };
        let out = r.human();
        assert!(out.starts_with("published              3\n"), "{out}");
        assert!(out.contains("lost                   1\n"), "{out}");
        assert!(out.contains("p50 1.0 ms, p99 2.5 ms (2 inputs"), "{out}");
        assert!(
            out.ends_with(
                "VIOLATION: lost: stored inputs without an outcome: 1, e.g. [\"seq 3\"]\n"
            )
        );
        assert_eq!(r.json()["summary"]["lost"], 1);
    }
}
