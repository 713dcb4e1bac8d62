//! The plan step's decisions, pure: who sets the worker replicas and to what
//! (Manual, the lag scaler, an external scaler, a pause), and what the workers
//! are told about the protocol before v2. Table-tested on real resources.

use std::sync::Arc;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use crate::crd::{ConsumerStatus, OrderPipeline, OrderPipelineStatus, ReplicaMode};
use crate::render::{self, Plan};

use super::dereference::Figures;
use super::error::{Cause, NotReady};
use crate::scaling;

/// The replica mode in force: the spec's, else Operator when bounds are set.
pub fn replica_mode(p: &OrderPipeline) -> ReplicaMode {
    let w = &p.spec.workers;
    w.scaling
        .mode
        .unwrap_or(if w.min_replicas.is_some() || w.max_replicas.is_some() {
            ReplicaMode::Operator
        } else {
            ReplicaMode::Manual
        })
}

/// The pipeline's plan, its spec checked against itself.
pub(crate) fn own(p: &OrderPipeline) -> Result<Plan, NotReady> {
    render::plan(p).map_err(invalid)
}

/// The plan checked against the other pipelines, which must not share its
/// NATS objects or subjects on the same NATS account (`scope_of`; where a
/// side's account is not known, on the same URL).
pub(crate) fn conflicts(
    p: &OrderPipeline,
    plan: &Plan,
    others: &[Arc<OrderPipeline>],
    footprints: &render::Footprints,
    scope_of: &dyn Fn(&OrderPipeline) -> Option<String>,
) -> Result<(), NotReady> {
    render::conflicts(p, plan, others, footprints, scope_of).map_err(invalid)
}

fn invalid(e: render::InvalidSpec) -> NotReady {
    NotReady::new(Cause::InvalidSpec, format!("{e}; fix the spec"))
}

/// Whether a difference found now is drift (made outside the operator): the
/// current generation was applied in full before. A blocked reconcile records
/// observedGeneration too, and applying its spec later is an update, not drift.
/// (`status.stream` is set once the stream has been seen, and kept when a later
/// read fails, so a failed read in between does not hide drift.)
pub(crate) fn is_drift(p: &OrderPipeline, old: &OrderPipelineStatus) -> bool {
    old.applied_generation == p.metadata.generation && old.stream.is_some()
}

/// Orders not yet processed: the consumer's pending plus ack pending. The one
/// definition, for the status and the scaler.
pub(crate) fn lag(c: &ConsumerStatus) -> i64 {
    c.pending + c.ack_pending
}

/// Who sets the worker replicas this reconcile, and to what.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Replicas {
    pub(crate) mode: ReplicaMode,
    /// What to apply to the Deployment; `None`: someone else sets them (External).
    pub(crate) apply: Option<i32>,
    /// The replicas a pause took away, kept to hand back in External mode.
    pub(crate) before_pause: Option<i32>,
    /// Unpausing in External mode: the replicas to hand back to the external
    /// scaler (an HPA does not scale up from zero).
    pub(crate) resume_at: Option<i32>,
    /// Operator mode: whether the lag was known, and the scaler's reason.
    pub(crate) note: Option<(bool, String)>,
    /// The scaler's clocks for the status: last busy, idle since.
    pub(crate) clock: (Option<Time>, Option<Time>),
}

/// Decides the replicas from the spec, the status of the last reconcile, the
/// live Deployment's replicas and the lag (`None`: NATS could not be read).
pub(crate) fn replicas(
    p: &OrderPipeline,
    plan: &Plan,
    old: &OrderPipelineStatus,
    live: Option<i32>,
    lag: Option<u64>,
    now: Timestamp,
) -> Replicas {
    let w = &p.spec.workers;
    let mode = replica_mode(p);
    let mut r = Replicas {
        mode,
        apply: None,
        before_pause: old.replicas_before_pause,
        resume_at: None,
        note: None,
        clock: (old.last_busy_time.clone(), old.idle_since.clone()),
    };
    if p.spec.paused {
        r.before_pause = r.before_pause.or(live.filter(|n| *n > 0));
        r.apply = Some(0);
        return r;
    }
    r.resume_at = r.before_pause.take();
    r.apply = match mode {
        ReplicaMode::Manual => Some(w.replicas),
        ReplicaMode::External => None,
        ReplicaMode::Operator => {
            let sc = &w.scaling;
            let min = w.min_replicas.unwrap_or(1);
            let max = w.max_replicas.unwrap_or(w.replicas.max(min));
            let d = scaling::decide(&scaling::Inputs {
                lag,
                current: live.unwrap_or(w.replicas.clamp(min, max)),
                min,
                max,
                target_lag_per_replica: u64::try_from(sc.target_lag_per_replica).unwrap_or(1),
                activation_lag: u64::try_from(sc.activation_lag).unwrap_or(0),
                max_step: sc.max_step,
                stabilization_window: plan.stabilization_window,
                cooldown: plan.cooldown,
                now,
                last_busy: old.last_busy_time.as_ref().map(|t| t.0),
                idle_since: old.idle_since.as_ref().map(|t| t.0),
            });
            r.clock = (d.last_busy.map(Time), d.idle_since.map(Time));
            r.note = Some((d.lag_known, d.reason));
            Some(d.desired)
        }
    };
    r
}

/// What the workers get this reconcile: the replica decision, and in `plan`
/// what they are told about the bucket of the protocol before v2 and whether
/// the rollout replaces workers of that protocol.
pub(crate) fn workers(
    p: &OrderPipeline,
    plan: &mut Plan,
    old: &OrderPipelineStatus,
    live: Option<&Deployment>,
    figures: &Result<Figures, String>,
    now: Timestamp,
) -> Replicas {
    let f = figures.as_ref().ok();
    let records = f.and_then(|f| f.legacy_records);
    plan.legacy_bucket = legacy_bucket(records, live, &plan.topology.bucket);
    plan.replaces_old_protocol = live.is_some_and(render::replaces_old_protocol);
    let lag = f.map(|f| u64::try_from(lag(&f.consumer)).unwrap_or(0));
    let live_replicas = live.and_then(|d| d.spec.as_ref()?.replicas);
    replicas(p, plan, old, live_replicas, lag, now)
}

/// Why the replicas changed from `live` to `applied`, for the Scaled Event;
/// `None` when they did not, or when the operator does not set them.
pub(crate) fn scale_reason(
    p: &OrderPipeline,
    r: &Replicas,
    live: Option<i32>,
    applied: Option<i32>,
) -> Option<String> {
    if r.apply.is_none() || live == applied {
        return None;
    }
    let (from, to) = (live.unwrap_or(0), applied.unwrap_or(0));
    Some(if p.spec.paused {
        format!("paused, scaling {from} -> 0")
    } else if let Some((_, why)) = &r.note {
        why.clone()
    } else {
        format!("spec.workers.replicas, scaling {from} -> {to}")
    })
}

/// The bucket of the protocol before v2 while it holds records (the workers
/// check it); when NATS could not say (`None`), what the workers have now.
pub(crate) fn legacy_bucket(
    records: Option<u64>,
    live: Option<&Deployment>,
    bucket: &str,
) -> Option<String> {
    match records {
        Some(n) => (n > 0).then(|| bucket.to_string()),
        None => live
            .and_then(|d| d.spec.as_ref())
            .and_then(|s| s.template.spec.as_ref())
            .and_then(|s| s.containers.first())
            .and_then(|c| c.env.as_ref())
            .and_then(|env| env.iter().find(|v| v.name == "LEGACY_STATE_BUCKET"))
            .and_then(|v| v.value.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sample from manifests/ as the API server stores it, changed by `yaml`
    /// (a merge of the given spec fields).
    fn pipeline(spec_patch: &str) -> OrderPipeline {
        let mut v: serde_json::Value = serde_yaml::from_str(include_str!(
            "../../../manifests/samples/orderpipeline.yaml"
        ))
        .unwrap();
        v["metadata"]["namespace"] = "demo".into();
        let patch: serde_json::Value = serde_yaml::from_str(spec_patch).unwrap();
        merge(&mut v["spec"], &patch);
        serde_json::from_value(v).unwrap()
    }

    fn merge(a: &mut serde_json::Value, b: &serde_json::Value) {
        match (a, b) {
            (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
                for (k, v) in b {
                    merge(a.entry(k.clone()).or_insert(serde_json::Value::Null), v);
                }
            }
            (a, b) => *a = b.clone(),
        }
    }

    fn status(yaml: &str) -> OrderPipelineStatus {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn now() -> Timestamp {
        "2026-11-28T12:00:00Z".parse().unwrap()
    }

    #[test]
    fn who_sets_the_replicas_and_to_what() {
        struct Case {
            what: &'static str,
            spec: &'static str,
            old: &'static str,
            live: Option<i32>,
            lag: Option<u64>,
            apply: Option<i32>,
            before_pause: Option<i32>,
            resume_at: Option<i32>,
        }
        let cases = [
            Case {
                what: "Manual: spec.workers.replicas",
                spec: "{workers: {replicas: 3}}",
                old: "{}",
                live: Some(1),
                lag: Some(0),
                apply: Some(3),
                before_pause: None,
                resume_at: None,
            },
            Case {
                what: "External: the operator sets nothing",
                spec: "{workers: {scaling: {mode: External}}}",
                old: "{}",
                live: Some(7),
                lag: Some(0),
                apply: None,
                before_pause: None,
                resume_at: None,
            },
            Case {
                what: "paused: zero, the live replicas remembered",
                spec: "{paused: true, workers: {scaling: {mode: External}}}",
                old: "{}",
                live: Some(7),
                lag: Some(0),
                apply: Some(0),
                before_pause: Some(7),
                resume_at: None,
            },
            Case {
                what: "still paused: the first memory is kept",
                spec: "{paused: true, workers: {scaling: {mode: External}}}",
                old: "{replicasBeforePause: 7}",
                live: Some(0),
                lag: Some(0),
                apply: Some(0),
                before_pause: Some(7),
                resume_at: None,
            },
            Case {
                what: "unpaused in External mode: the replicas handed back",
                spec: "{workers: {scaling: {mode: External}}}",
                old: "{replicasBeforePause: 7}",
                live: Some(0),
                lag: Some(0),
                apply: None,
                before_pause: None,
                resume_at: Some(7),
            },
            Case {
                what: "Operator: the scaler follows the lag",
                spec: "{workers: {minReplicas: 1, maxReplicas: 10, scaling: {targetLagPerReplica: 100}}}",
                old: "{}",
                live: Some(1),
                lag: Some(550),
                apply: Some(6),
                before_pause: None,
                resume_at: None,
            },
        ];
        for c in cases {
            let p = pipeline(c.spec);
            let plan = crate::render::plan(&p).unwrap();
            let r = replicas(&p, &plan, &status(c.old), c.live, c.lag, now());
            assert_eq!(
                (r.apply, r.before_pause, r.resume_at),
                (c.apply, c.before_pause, c.resume_at),
                "{}: {r:?}",
                c.what
            );
        }
    }

    #[test]
    fn the_scaled_event_says_why() {
        let manual = pipeline("{workers: {replicas: 3}}");
        let plan = crate::render::plan(&manual).unwrap();
        let r = replicas(&manual, &plan, &status("{}"), Some(1), Some(0), now());
        assert_eq!(
            scale_reason(&manual, &r, Some(1), Some(3)).as_deref(),
            Some("spec.workers.replicas, scaling 1 -> 3")
        );
        assert_eq!(scale_reason(&manual, &r, Some(3), Some(3)), None);
        let paused = pipeline("{paused: true}");
        let r = replicas(&paused, &plan, &status("{}"), Some(2), Some(0), now());
        assert_eq!(
            scale_reason(&paused, &r, Some(2), Some(0)).as_deref(),
            Some("paused, scaling 2 -> 0")
        );
        let external = pipeline("{workers: {scaling: {mode: External}}}");
        let r = replicas(&external, &plan, &status("{}"), Some(2), Some(0), now());
        assert_eq!(scale_reason(&external, &r, Some(2), Some(5)), None);
    }

    #[test]
    fn the_old_bucket_is_named_while_it_holds_records_or_nats_cannot_say() {
        let live: Deployment = serde_yaml::from_str(
            "metadata: {name: orders-workers}
spec:
  selector: {matchLabels: {app: w}}
  template:
    metadata: {labels: {app: w}}
    spec:
      containers:
      - name: worker
        env: [{name: LEGACY_STATE_BUCKET, value: ORDERS_STATE}]",
        )
        .unwrap();
        assert_eq!(
            legacy_bucket(Some(3), None, "ORDERS_STATE").as_deref(),
            Some("ORDERS_STATE")
        );
        assert_eq!(legacy_bucket(Some(0), Some(&live), "ORDERS_STATE"), None);
        assert_eq!(
            legacy_bucket(None, Some(&live), "ORDERS_STATE").as_deref(),
            Some("ORDERS_STATE"),
            "unknown: keep what the workers have"
        );
        assert_eq!(legacy_bucket(None, None, "ORDERS_STATE"), None);
    }
}
