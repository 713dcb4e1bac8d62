use kube::ResourceExt as _;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;

use crate::conditions::{self, types};
use crate::crd::{OrderPipeline, OrderPipelineStatus};
use crate::events::EventType;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use orderpipeline_common::topology::Topology;

use crate::conditions::reasons;
use crate::crd::ReplicaMode;
use crate::render::Plan;

use super::plan::{Replicas, lag};
use super::*;

/// StreamReady and ConsumerReady, both False for one cause: neither can be
/// confirmed, and neither may keep a stale True.
pub(crate) fn topology_not_ready(
    reason: &str,
    message: &str,
    generation: Option<i64>,
) -> [Condition; 2] {
    [types::STREAM_READY, types::CONSUMER_READY]
        .map(|type_| conditions::condition(type_, false, reason, message, generation))
}

/// Ends a reconcile that cannot go on: Ready=False with the reason, an Event
/// when the reason or message is new, a requeue.
pub(crate) async fn finish_blocked(
    p: &OrderPipeline,
    ctx: &Context,
    old: &OrderPipelineStatus,
    b: NotReady,
) -> Result<Action, Error> {
    let reason = b.cause.reason();
    let was = old.conditions.iter().find(|c| c.type_ == types::READY);
    if was.is_none_or(|c| c.reason != reason || c.message != b.message) {
        ctx.event(
            p,
            EventType::Warning,
            reason,
            "Reconcile",
            b.message.clone(),
        )
        .await;
    }
    tracing::warn!(pipeline = %key_of(p), reason, message = %b.message, "pipeline not ready");
    ctx.metrics
        .not_ready
        .get_or_create(&crate::metrics::ReasonLabels { reason })
        .inc();
    write_status(p, ctx, old, &blocked_status(p.metadata.generation, old, &b)).await?;
    Ok(Action::requeue(jittered(b.cause.retry())))
}

/// The status of a blocked reconcile: the generation observed (not applied),
/// Ready False, and StreamReady/ConsumerReady too when the cause hides them.
pub(crate) fn blocked_status(
    generation: Option<i64>,
    old: &OrderPipelineStatus,
    b: &NotReady,
) -> OrderPipelineStatus {
    let reason = b.cause.reason();
    let mut conds = vec![conditions::condition(
        types::READY,
        false,
        reason,
        b.message.clone(),
        generation,
    )];
    if b.cause.takes_down_topology() {
        conds.extend(topology_not_ready(reason, &b.message, generation));
    }
    OrderPipelineStatus {
        observed_generation: generation,
        conditions: conditions::merge(&old.conditions, conds),
        ..old.clone()
    }
}

pub(crate) async fn write_status(
    p: &OrderPipeline,
    ctx: &Context,
    old: &OrderPipelineStatus,
    status: &OrderPipelineStatus,
) -> Result<(), Error> {
    // One server-side apply of the whole status, none when nothing changed.
    if status == old {
        return Ok(());
    }
    let api: Api<OrderPipeline> =
        Api::namespaced(ctx.client.clone(), &p.namespace().unwrap_or_default());
    let patch = serde_json::json!({
        "apiVersion": "orderpipeline.dev/v1alpha1",
        "kind": "OrderPipeline",
        "status": status,
    });
    api.patch_status(
        &p.name_any(),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(Error::Kube)?;
    Ok(())
}

/// What a full reconcile observed, for the status (everything the pure build
/// needs, nothing it must fetch).
pub(crate) struct Observed<'a> {
    pub(crate) generation: Option<i64>,
    pub(crate) paused: bool,
    pub(crate) plan: &'a Plan,
    pub(crate) replicas: &'a Replicas,
    /// The JetStream figures, or why they could not be read.
    pub(crate) figures: &'a Result<Figures, String>,
    /// The worker Deployment after the apply.
    pub(crate) deployment: &'a Deployment,
    pub(crate) selector: String,
    pub(crate) secrets_checksum: Option<String>,
    /// Set when this reconcile changed the replicas.
    pub(crate) scaled_at: Option<Time>,
}

/// The status of a reconcile that went through: the figures, the conditions
/// (Ready first), the replica decision's memory. Pure.
pub(crate) fn build(old: &OrderPipelineStatus, o: &Observed) -> OrderPipelineStatus {
    let generation = o.generation;
    let r = o.replicas;
    let mut status = OrderPipelineStatus {
        observed_generation: generation,
        applied_generation: generation,
        replica_mode: Some(r.mode),
        replicas_before_pause: r.before_pause,
        // The operator's own decision; absent when it decides nothing (External
        // mode). What the Deployment asks for is `workers.desired`.
        desired_replicas: r.apply,
        last_busy_time: r.clock.0.clone(),
        idle_since: r.clock.1.clone(),
        last_scale_time: o.scaled_at.clone().or(old.last_scale_time.clone()),
        ..old.clone()
    };
    let mut conds = vec![
        paused_condition(o.paused, generation),
        scaling_condition(o, r),
    ];
    let figures_ok = match o.figures {
        Ok(f) => {
            status.stream = Some(f.stream.clone());
            status.consumer = Some(f.consumer.clone());
            status.lag = Some(lag(&f.consumer));
            status.dead_letters = Some(f.dead_letters);
            conds.extend(topology_ready(&o.plan.topology, generation));
            true
        }
        Err(e) => {
            conds.extend(topology_not_ready(reasons::JETSTREAM_ERROR, e, generation));
            false
        }
    };
    let ds = o.deployment.status.clone().unwrap_or_default();
    let desired = o
        .deployment
        .spec
        .as_ref()
        .and_then(|s| s.replicas)
        .unwrap_or(0);
    let (ready_pods, available) = (
        ds.ready_replicas.unwrap_or(0),
        ds.available_replicas.unwrap_or(0),
    );
    status.workers = Some(crate::crd::WorkersStatus {
        desired,
        ready: ready_pods,
        available,
    });
    status.workers_ready = Some(format!("{ready_pods}/{desired}"));
    status.replicas = Some(ds.replicas.unwrap_or(0));
    status.selector = Some(o.selector.clone());
    status.secrets_checksum = o.secrets_checksum.clone();
    let workers_ok = available >= desired;
    conds.push(conditions::condition(
        types::WORKERS_AVAILABLE,
        workers_ok,
        if workers_ok {
            reasons::WORKERS_AVAILABLE
        } else {
            reasons::WORKERS_UNAVAILABLE
        },
        format!("{available} of {desired} worker pod(s) available"),
        generation,
    ));
    conds.push(window_condition(o.plan, generation));
    let ready = figures_ok && workers_ok;
    let (reason, message) = if ready {
        (
            reasons::READY,
            format!("stream, consumer and {available} worker pod(s) ready"),
        )
    } else if !workers_ok {
        (
            reasons::WORKERS_UNAVAILABLE,
            format!("waiting for workers: {available} of {desired} available"),
        )
    } else {
        (
            reasons::JETSTREAM_ERROR,
            o.figures.as_ref().err().cloned().unwrap_or_default(),
        )
    };
    conds.insert(
        0,
        conditions::condition(types::READY, ready, reason, message, generation),
    );
    status.conditions = conditions::merge(&old.conditions, conds);
    status
}

fn paused_condition(paused: bool, generation: Option<i64>) -> Condition {
    if paused {
        conditions::condition(
            types::PAUSED,
            true,
            reasons::PAUSED,
            "workers scaled to zero and the consumer paused; set spec.paused: false to resume",
            generation,
        )
    } else {
        conditions::condition(
            types::PAUSED,
            false,
            reasons::RUNNING,
            "not paused",
            generation,
        )
    }
}

fn scaling_condition(o: &Observed, r: &Replicas) -> Condition {
    let g = o.generation;
    let c = |active, reason, message: String| {
        conditions::condition(types::SCALING, active, reason, message, g)
    };
    match (&r.note, o.paused, r.mode) {
        (_, true, _) => c(false, reasons::PAUSED, "paused".into()),
        (Some((true, why)), _, _) => c(true, reasons::SCALING_ACTIVE, why.clone()),
        (Some((false, why)), _, _) => c(
            false,
            reasons::LAG_UNAVAILABLE,
            format!("{why}; check the consumer and NATS"),
        ),
        (None, _, ReplicaMode::Manual) => c(
            false,
            reasons::MANUAL,
            "replica mode Manual: spec.workers.replicas (kubectl scale orderpipeline/NAME) sets the replicas".into(),
        ),
        (None, _, _) => c(
            false,
            reasons::EXTERNAL,
            "replica mode External: another scaler (KEDA, HPA) sets the Deployment's replicas".into(),
        ),
    }
}

fn topology_ready(t: &Topology, generation: Option<i64>) -> [Condition; 2] {
    [
        conditions::condition(
            types::STREAM_READY,
            true,
            reasons::STREAM_READY,
            format!(
                "stream {} and dead-letter stream {} exist",
                t.stream, t.dlq_stream
            ),
            generation,
        ),
        conditions::condition(
            types::CONSUMER_READY,
            true,
            reasons::CONSUMER_READY,
            format!(
                "consumer {} on {} filters {}",
                t.consumer, t.stream, t.filter_subject
            ),
            generation,
        ),
    ]
}

fn window_condition(plan: &Plan, generation: Option<i64>) -> Condition {
    match &plan.window_warning {
        None => conditions::condition(
            types::DUPLICATE_WINDOW,
            true,
            reasons::WINDOW_COVERS,
            "the stream's duplicate window covers the redelivery horizon",
            generation,
        ),
        Some(w) => conditions::condition(
            types::DUPLICATE_WINDOW,
            false,
            reasons::WINDOW_TOO_SHORT,
            w.clone(),
            generation,
        ),
    }
}

/// An Event a status change calls for.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Note {
    pub(crate) type_: EventType,
    pub(crate) reason: &'static str,
    pub(crate) action: &'static str,
    pub(crate) message: String,
}

/// The Events between two statuses: the duplicate window turning short, dead
/// letters growing. Pure.
pub(crate) fn notes(
    old: &OrderPipelineStatus,
    new: &OrderPipelineStatus,
    dlq_stream: &str,
) -> Vec<Note> {
    let short = |s: &OrderPipelineStatus| {
        s.conditions
            .iter()
            .find(|c| c.type_ == types::DUPLICATE_WINDOW && c.status == "False")
            .cloned()
    };
    let mut out = Vec::new();
    if let (None, Some(c)) = (short(old), short(new)) {
        out.push(Note {
            type_: EventType::Warning,
            reason: reasons::WINDOW_TOO_SHORT,
            action: "Validate",
            message: c.message,
        });
    }
    if let (Some(new), Some(prev)) = (new.dead_letters, old.dead_letters)
        && new > prev
    {
        out.push(Note {
            type_: EventType::Warning,
            reason: "DeadLettersGrew",
            action: "Observe",
            message: format!(
                "{} new dead letter(s) in {dlq_stream} (total {new}); inspect them with `orderctl dlq list`",
                new - prev
            ),
        });
    }
    out
}
