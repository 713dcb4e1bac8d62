//! The operator's Prometheus metrics (served on `/metrics`), described in docs/src/guide/operator.md.

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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: &'static str,
    pub commit: &'static str,
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
    pub ready: Family<PipelineLabels, Gauge>,
    pub paused: Family<PipelineLabels, Gauge>,
    pub workers_desired: Family<PipelineLabels, Gauge>,
    pub workers_available: Family<PipelineLabels, Gauge>,
    pub target_lag: Family<PipelineLabels, Gauge>,
    pub oldest_unprocessed_age: Family<PipelineLabels, Gauge>,
    pub max_age: Family<PipelineLabels, Gauge>,
    pub removed_unprocessed: Family<PipelineLabels, Gauge>,
    pub stream_subjects: Family<PipelineLabels, Gauge>,
    pub stream_bytes: Family<PipelineLabels, Gauge>,
    pub estimated_server_memory: Family<PipelineLabels, Gauge>,
    pub stalled: Family<PipelineLabels, Gauge>,
    pub nats_connections: Gauge,
    pub leader: Gauge,
}

/// One pipeline's figures as its last reconcile saw them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PipelineFigures {
    pub ready: bool,
    pub paused: bool,
    pub lag: i64,
    pub dead_letters: i64,
    pub replicas: i64,
    pub workers_desired: i64,
    pub workers_available: i64,
    pub target_lag_per_replica: i64,
    pub oldest_unprocessed_age_seconds: i64,
    pub max_age_seconds: i64,
    /// Removed unprocessed and not acknowledged.
    pub removed_unprocessed: i64,
    pub stream_subjects: i64,
    pub stream_bytes: i64,
    pub estimated_server_memory_bytes: i64,
    /// The Stalled condition is True.
    pub stalled: bool,
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
            ready: Family::default(),
            paused: Family::default(),
            workers_desired: Family::default(),
            workers_available: Family::default(),
            target_lag: Family::default(),
            oldest_unprocessed_age: Family::default(),
            max_age: Family::default(),
            removed_unprocessed: Family::default(),
            stream_subjects: Family::default(),
            stream_bytes: Family::default(),
            estimated_server_memory: Family::default(),
            stalled: Family::default(),
            nats_connections: Gauge::default(),
            leader: Gauge::default(),
        };
        let r = registry.sub_registry_with_prefix("orderoperator");
        m.register_reconcile_metrics(r);
        m.register_pipeline_metrics(r);
        m.register_process_metrics(r);
        m
    }

    /// The reconcile loop's own figures: how many ran, how they failed, how long they took.
    fn register_reconcile_metrics(&self, r: &mut Registry) {
        r.register("reconciles", "Reconciles run", self.reconciles.clone());
        r.register(
            "reconcile_failures",
            "Reconciles that failed, by error kind (kubernetes, nats, finalizer)",
            self.failures.clone(),
        );
        r.register(
            "reconcile_not_ready",
            "Reconciles that ended with Ready=False, by reason (NatsUnreachable, SecretMissing, InvalidSpec, ...)",
            self.not_ready.clone(),
        );
        r.register(
            "reconcile_duration_seconds",
            "Time one reconcile took",
            self.duration.clone(),
        );
    }

    /// Per-pipeline gauges, labelled `pipeline="namespace/name"`, set by [`Metrics::pipeline`].
    fn register_pipeline_metrics(&self, r: &mut Registry) {
        r.register(
            "pipeline_lag",
            "Orders not yet processed (consumer pending + ack pending), per pipeline",
            self.lag.clone(),
        );
        r.register(
            "pipeline_dead_letters",
            "Messages in the pipeline's dead-letter stream",
            self.dead_letters.clone(),
        );
        r.register(
            "pipeline_replicas",
            "Worker pods of the pipeline's Deployment",
            self.replicas.clone(),
        );
        r.register(
            "pipeline_ready",
            "1 when the pipeline's Ready condition is True, else 0",
            self.ready.clone(),
        );
        r.register(
            "pipeline_paused",
            "1 while spec.paused is true",
            self.paused.clone(),
        );
        r.register(
            "pipeline_workers_desired",
            "Worker pods the Deployment asks for (its spec.replicas)",
            self.workers_desired.clone(),
        );
        r.register(
            "pipeline_workers_available",
            "Worker pods available (the Deployment's availableReplicas)",
            self.workers_available.clone(),
        );
        r.register(
            "pipeline_target_lag_per_replica",
            "spec.workers.scaling.targetLagPerReplica: the lag one worker pod is expected to handle",
            self.target_lag.clone(),
        );
        r.register(
            "pipeline_oldest_unprocessed_age_seconds",
            "Seconds since the oldest order not yet processed was stored (0: none waiting); the input stream removes it unprocessed at its maxAge",
            self.oldest_unprocessed_age.clone(),
        );
        r.register(
            "pipeline_max_age_seconds",
            "spec.stream.maxAge in seconds (0: none)",
            self.max_age.clone(),
        );
        r.register(
            "pipeline_inputs_removed_unprocessed",
            "Orders the input stream's limits removed before they were processed (lost), not yet acknowledged with the orderpipeline.dev/removed-unprocessed-acknowledged annotation",
            self.removed_unprocessed.clone(),
        );
        self.register_capacity_metrics(r);
    }

    /// What each pipeline's retained orders cost the NATS server.
    fn register_capacity_metrics(&self, r: &mut Registry) {
        r.register(
            "pipeline_stream_subjects",
            "Distinct subjects in the input stream: one per retained order with an outcome, plus the input subject",
            self.stream_subjects.clone(),
        );
        r.register(
            "pipeline_stream_bytes",
            "Bytes in the input stream (the server's disk, for file storage)",
            self.stream_bytes.clone(),
        );
        r.register(
            "pipeline_estimated_server_memory_bytes",
            "NATS server memory the input stream's subjects hold, estimated: subjects x --nats-bytes-per-subject",
            self.estimated_server_memory.clone(),
        );
        r.register(
            "pipeline_stalled",
            "1 while the pipeline's consumer is Stalled: orders wait, its workers are available, and it has delivered nothing and kept its ack floor for longer than --stall-window",
            self.stalled.clone(),
        );
    }

    /// The operator process's state: leadership and the NATS connections it holds.
    fn register_process_metrics(&self, r: &mut Registry) {
        r.register(
            "leader",
            "1 while this operator replica holds the Lease (reconciles), 0 on a standby",
            self.leader.clone(),
        );
        let build = Family::<BuildLabels, Gauge>::default();
        build
            .get_or_create(&BuildLabels {
                version: orderpipeline_common::version::RELEASE,
                commit: orderpipeline_common::version::COMMIT,
            })
            .set(1);
        r.register(
            "build_info",
            "1, labelled with the operator's release version and git commit",
            build,
        );
        r.register(
            "nats_connections",
            "NATS connections the operator holds: one per distinct server and credentials, shared by the pipelines that use them",
            self.nats_connections.clone(),
        );
    }

    pub fn reconciled(&self, took: Duration, failure: Option<&'static str>) {
        self.reconciles.inc();
        self.duration.observe(took.as_secs_f64());
        if let Some(kind) = failure {
            self.failures.get_or_create(&KindLabels { kind }).inc();
        }
    }

    pub fn pipeline(&self, key: &str, f: &PipelineFigures) {
        let l = PipelineLabels {
            pipeline: key.to_string(),
        };
        self.ready.get_or_create(&l).set(i64::from(f.ready));
        self.paused.get_or_create(&l).set(i64::from(f.paused));
        self.lag.get_or_create(&l).set(f.lag);
        self.dead_letters.get_or_create(&l).set(f.dead_letters);
        self.replicas.get_or_create(&l).set(f.replicas);
        self.workers_desired
            .get_or_create(&l)
            .set(f.workers_desired);
        self.workers_available
            .get_or_create(&l)
            .set(f.workers_available);
        self.target_lag
            .get_or_create(&l)
            .set(f.target_lag_per_replica);
        self.oldest_unprocessed_age
            .get_or_create(&l)
            .set(f.oldest_unprocessed_age_seconds);
        self.max_age.get_or_create(&l).set(f.max_age_seconds);
        self.removed_unprocessed
            .get_or_create(&l)
            .set(f.removed_unprocessed);
        self.stream_subjects
            .get_or_create(&l)
            .set(f.stream_subjects);
        self.stream_bytes.get_or_create(&l).set(f.stream_bytes);
        self.estimated_server_memory
            .get_or_create(&l)
            .set(f.estimated_server_memory_bytes);
        self.stalled.get_or_create(&l).set(i64::from(f.stalled));
    }

    /// A blocked reconcile: Ready is 0, the last figures stay.
    pub fn not_ready(&self, key: &str) {
        let l = PipelineLabels {
            pipeline: key.to_string(),
        };
        self.ready.get_or_create(&l).set(0);
    }

    pub fn forget(&self, key: &str) {
        let l = PipelineLabels {
            pipeline: key.to_string(),
        };
        for f in [
            &self.lag,
            &self.dead_letters,
            &self.replicas,
            &self.ready,
            &self.paused,
            &self.workers_desired,
            &self.workers_available,
            &self.target_lag,
            &self.oldest_unprocessed_age,
            &self.max_age,
            &self.removed_unprocessed,
            &self.stream_subjects,
            &self.stream_bytes,
            &self.estimated_server_memory,
            &self.stalled,
        ] {
            f.remove(&l);
        }
    }
}
