//! The worker's Prometheus metrics (served on `/metrics`). Each one is described
//! in docs/src/worker/probes-metrics.md.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// processed | rejected | dead_lettered | duplicate | nak
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClassLabels {
    /// undecodable | permanent | attempts_exhausted | oversized
    pub class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

/// All worker metrics; cheap to clone (counters are shared).
#[derive(Clone)]
pub struct Metrics {
    pub messages: Family<OutcomeLabels, Counter>,
    pub duration: Histogram,
    pub retries: Counter,
    pub naks: Counter,
    pub dead_letters: Family<ClassLabels, Counter>,
    pub duplicates: Counter,
    pub in_flight: Gauge,
    pub downstream_calls: Counter,
    pub replays_refused: Family<ReasonLabels, Counter>,
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            messages: Family::default(),
            duration: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            retries: Counter::default(),
            naks: Counter::default(),
            dead_letters: Family::default(),
            duplicates: Counter::default(),
            in_flight: Gauge::default(),
            downstream_calls: Counter::default(),
            replays_refused: Family::default(),
        };
        let r = registry.sub_registry_with_prefix("orderworker");
        r.register(
            "messages",
            "Input messages finished, by outcome (processed, rejected, dead_lettered, duplicate, nak)",
            m.messages.clone(),
        );
        r.register(
            "processing_duration_seconds",
            "Time from receiving a message to its final ack/nak/term",
            m.duration.clone(),
        );
        r.register(
            "retries",
            "In-process retries after transient errors",
            m.retries.clone(),
        );
        r.register(
            "naks",
            "Messages given back with a delayed NAK",
            m.naks.clone(),
        );
        r.register(
            "dead_letters",
            "Messages written to the dead-letter stream, by error class",
            m.dead_letters.clone(),
        );
        r.register(
            "duplicates_skipped",
            "Messages acked without effect because the order already had an outcome",
            m.duplicates.clone(),
        );
        r.register(
            "in_flight",
            "Orders being processed right now",
            m.in_flight.clone(),
        );
        r.register(
            "downstream_calls",
            "HTTP calls made to the downstream service (every try)",
            m.downstream_calls.clone(),
        );
        r.register(
            "replays_refused",
            "Replayed inputs that named a letter they may not supersede (another stream, another order's marker), handled as ordinary inputs, by reason",
            m.replays_refused.clone(),
        );
        m
    }

    pub fn outcome(&self, outcome: &'static str) {
        self.messages
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }
}

/// Renders the registry in the Prometheus text format.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, registry).is_err() {
        out.clear();
    }
    out
}
