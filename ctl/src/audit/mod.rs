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

use crate::pipeline_ref::RemovedUnprocessed;
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
    /// Set by --pipeline: the orders the operator counted as removed by the
    /// stream's limits before they were processed (`None`: none).
    #[arg(skip)]
    pub removed: Option<Option<RemovedUnprocessed>>,
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
        self.removed = Some(p.removed_unprocessed.clone());
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
    let report = Report::of(&a, args.latency_from_seq, args.removed);
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
    /// What the operator counted (`None`: not bound to an OrderPipeline, so
    /// unknown).
    removed: Option<Option<RemovedUnprocessed>>,
    violations: Vec<String>,
    latencies: usize,
    p50: Option<f64>,
    p99: Option<f64>,
}

impl Report {
    fn of(a: &Audit, latency_from_seq: u64, removed: Option<Option<RemovedUnprocessed>>) -> Self {
        let lat = a.latencies_ms(latency_from_seq);
        let mut violations = a.violations();
        if let Some(Some(r)) = &removed {
            violations.insert(0, removed_violation(r));
        }
        Self {
            summary: a.summary(),
            removed,
            violations,
            latencies: lat.len(),
            p50: quantile(&lat, 0.5),
            p99: quantile(&lat, 0.99),
        }
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({"summary": self.summary, "violations": self.violations,
            "removed_unprocessed": self.removed.as_ref().map(|r| r.as_ref().map_or(0, |r| r.count)),
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
            format!("removed unprocessed    {}", removed_line(&self.removed)),
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

/// The count the operator keeps of orders the stream's limits removed before
/// they were processed: the stream keeps nothing of them, so only the operator
/// (which watched it happen) can say.
fn removed_line(r: &Option<Option<RemovedUnprocessed>>) -> String {
    match r {
        None => "unknown without --pipeline (the operator counts the orders the stream's limits remove before they are processed)".into(),
        Some(None) => "0".into(),
        Some(Some(r)) => format!(
            "{}{} (removed by the input stream's limits before they were processed, {} to {}; counted by the operator)",
            if r.exact { "" } else { "at least " },
            r.count,
            r.first,
            r.last
        ),
    }
}

fn removed_violation(r: &RemovedUnprocessed) -> String {
    format!(
        "removed unprocessed: {}{} order(s) were removed by the input stream's limits (maxAge, maxBytes) before they were processed, between {} and {}: they have no outcome. `kubectl describe orderpipeline` shows how to acknowledge them once handled",
        if r.exact { "" } else { "at least " },
        r.count,
        r.first,
        r.last
    )
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
            removed: Some(None),
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

    #[test]
    fn orders_the_operator_saw_removed_unprocessed_are_a_violation() {
        let a = Audit::default();
        let r = RemovedUnprocessed {
            count: 4,
            exact: true,
            first: "2026-12-07T01:00:00Z".into(),
            last: "2026-12-07T01:00:03Z".into(),
        };
        let report = Report::of(&a, 1, Some(Some(r.clone())));
        assert_eq!(report.violations.len(), 1);
        assert!(report.violations[0].starts_with("removed unprocessed: 4 order(s)"));
        let out = report.human();
        assert!(
            out.contains("\nremoved unprocessed    4 (removed by the input stream's limits"),
            "{out}"
        );
        assert_eq!(report.json()["removed_unprocessed"], 4);
        let at_least = Report::of(&a, 1, Some(Some(RemovedUnprocessed { exact: false, ..r })));
        assert!(at_least.violations[0].contains(": at least 4 order(s)"));
        assert!(Report::of(&a, 1, Some(None)).violations.is_empty());
        let unbound = Report::of(&a, 1, None);
        assert!(unbound.violations.is_empty());
        assert!(
            unbound
                .human()
                .contains("removed unprocessed    unknown without --pipeline")
        );
    }
}
