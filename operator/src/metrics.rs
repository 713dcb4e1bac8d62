//! The operator's Prometheus metrics (served on `/metrics`), described in the README.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PipelineLabels {
    /// `namespace/name`
    pub pipeline: String,
}

#[derive(Clone)]
pub struct Metrics {
    pub reconciles: Counter,
    pub failures: Family<KindLabels, Counter>,
    pub not_ready: Family<ReasonLabels, Counter>,
    pub duration: Histogram,
    pub lag: Family<PipelineLabels, Gauge>,
    pub dead_letters: Family<PipelineLabels, Gauge>,
    pub replicas: Family<PipelineLabels, Gauge>,
    pub nats_connections: Gauge,
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            reconciles: Counter::default(),
            failures: Family::default(),
            not_ready: Family::default(),
            duration: Histogram::new(exponential_buckets(0.005, 2.0, 12)),
            lag: Family::default(),
            dead_letters: Family::default(),
            replicas: Family::default(),
            nats_connections: Gauge::default(),
        };
        let r = registry.sub_registry_with_prefix("orderoperator");
        r.register("reconciles", "Reconciles run", m.reconciles.clone());
        r.register(
            "reconcile_failures",
            "Reconciles that failed, by error kind (kubernetes, nats, finalizer)",
            m.failures.clone(),
        );
        r.register(
            "reconcile_not_ready",
            "Reconciles that ended with Ready=False, by reason (NatsUnreachable, SecretMissing, InvalidSpec, ...)",
            m.not_ready.clone(),
        );
        r.register(
            "reconcile_duration_seconds",
            "Time one reconcile took",
            m.duration.clone(),
        );
        r.register(
            "pipeline_lag",
            "Orders not yet processed (consumer pending + ack pending), per pipeline",
            m.lag.clone(),
        );
        r.register(
            "pipeline_dead_letters",
            "Messages in the pipeline's dead-letter stream",
            m.dead_letters.clone(),
        );
        r.register(
            "pipeline_replicas",
            "Worker pods of the pipeline's Deployment",
            m.replicas.clone(),
        );
        r.register(
            "nats_connections",
            "NATS connections the operator holds: one per distinct server and credentials, shared by the pipelines that use them",
            m.nats_connections.clone(),
        );
        m
    }

    pub fn reconciled(&self, took: Duration, failure: Option<&'static str>) {
        self.reconciles.inc();
        self.duration.observe(took.as_secs_f64());
        if let Some(kind) = failure {
            self.failures.get_or_create(&KindLabels { kind }).inc();
        }
    }

    pub fn pipeline(&self, key: &str, lag: i64, dead_letters: i64, replicas: i64) {
        let l = PipelineLabels {
            pipeline: key.to_string(),
        };
        self.lag.get_or_create(&l).set(lag);
        self.dead_letters.get_or_create(&l).set(dead_letters);
        self.replicas.get_or_create(&l).set(replicas);
    }

    pub fn forget(&self, key: &str) {
        let l = PipelineLabels {
            pipeline: key.to_string(),
        };
        self.lag.remove(&l);
        self.dead_letters.remove(&l);
        self.replicas.remove(&l);
    }
}
