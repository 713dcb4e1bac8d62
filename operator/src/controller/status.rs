use kube::ResourceExt as _;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;

use crate::conditions::{self, types};
use crate::crd::{OrderPipeline, OrderPipelineStatus};
use crate::events::Kind;
use crate::metrics::PipelineFigures;
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
        ctx.event(p, Kind::NotReady { reason }, b.message.clone())
            .await;
    }
    tracing::warn!(pipeline = %key_of(p), reason, message = %b.message, "pipeline not ready");
    ctx.metrics
        .not_ready
        .get_or_create(&crate::metrics::ReasonLabels { reason })
        .inc();
    ctx.metrics.not_ready(&key_of(p));
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
    let key = key_of(p);
    // Until the answer says what is stored, the next reconcile reads it.
    ctx.statuses.lock().unwrap().remove(&key);
    let written = api
        .patch_status(
            &p.name_any(),
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map_err(Error::Kube)?;
    ctx.remember_status(&key, &written);
    Ok(())
}

/// The end of a reconcile that went through: the status built from what was
/// observed, the Events a change calls for, the metrics, one status write (none
/// when nothing changed), and the next look: the resync, sooner while not Ready.
pub(crate) async fn finish(
    p: &OrderPipeline,
    ctx: &Context,
    old: &OrderPipelineStatus,
    o: &Observed<'_>,
) -> Result<Action, Error> {
    let status = build(old, o);
    ctx.metrics.pipeline(&key_of(p), &figures_of(p, &status));
    if let Some(left) = first_status_wait(old, &status, o) {
        // The Deployment's next status change (its workers available) or the
        // end of the wait brings the reconcile that writes it; the lag (the
        // scaler) is still looked at as for any pipeline not Ready yet.
        let next = jittered(ctx.resync.min(retry::NOT_READY_RESYNC));
        return Ok(Action::requeue(left.min(next)));
    }
    for n in notes(old, &status, &o.plan.topology.dlq_stream) {
        ctx.event(p, n.kind, n.message).await;
    }
    write_status(p, ctx, old, &status).await?;
    let next = match conditions::is_true(&status.conditions, types::READY) {
        true => ctx.resync,
        false => ctx.resync.min(retry::NOT_READY_RESYNC),
    };
    let next = jittered(next);
    // While orders wait on a still consumer, the next look is when the
    // window runs out.
    let stall = super::stall::next_look(&status, &o.now, o.stall_window);
    Ok(Action::requeue(stall.map_or(next, |s| s.min(next))))
}

/// How long a new pipeline's first status may wait for its workers to start.
pub(crate) const FIRST_STATUS_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// A new pipeline (no status stored yet) whose only missing piece is its
/// workers starting: its first status waits until they are available, so that
/// one write says Ready, for at most [`FIRST_STATUS_WAIT`] after its creation
/// (workers that do not start show as WorkersUnavailable then; the Events
/// already name the objects created). How much longer it may wait; `None`
/// writes now. Anything else (a spec error, NATS down, a scale decision,
/// inputs removed) is written at once.
pub(crate) fn first_status_wait(
    old: &OrderPipelineStatus,
    new: &OrderPipelineStatus,
    o: &Observed,
) -> Option<std::time::Duration> {
    let never_written = *old == OrderPipelineStatus::default();
    let ready = new.conditions.iter().find(|c| c.type_ == types::READY)?;
    let removed = new
        .removed_unprocessed
        .as_ref()
        .is_some_and(|r| r.count > 0);
    let scaled = o.scaled_at.is_some();
    if !never_written || ready.reason != reasons::WORKERS_UNAVAILABLE || removed || scaled {
        return None;
    }
    let created = o.pipeline.metadata.creation_timestamp.as_ref()?.0;
    let age = o.now.0.duration_since(created);
    let left = k8s_openapi::jiff::SignedDuration::try_from(FIRST_STATUS_WAIT).ok()? - age;
    std::time::Duration::try_from(left)
        .ok()
        .filter(|d| !d.is_zero())
}

/// The figures the metrics export, from the status just built.
pub(crate) fn figures_of(p: &OrderPipeline, s: &OrderPipelineStatus) -> PipelineFigures {
    let w = s.workers.as_ref();
    let stream = s.stream.clone().unwrap_or_default();
    PipelineFigures {
        ready: conditions::is_true(&s.conditions, types::READY),
        paused: p.spec.paused,
        lag: s.lag.unwrap_or(0),
        dead_letters: s.dead_letters.unwrap_or(0),
        replicas: i64::from(s.replicas.unwrap_or(0)),
        workers_desired: w.map_or(0, |w| i64::from(w.desired)),
        workers_available: w.map_or(0, |w| i64::from(w.available)),
        target_lag_per_replica: p.spec.workers.scaling.target_lag_per_replica,
        oldest_unprocessed_age_seconds: s.oldest_unprocessed_age_seconds.unwrap_or(0),
        max_age_seconds: retention::spec_max_age_seconds(p),
        removed_unprocessed: retention::unacknowledged(p, s),
        stream_subjects: stream.subjects,
        stream_bytes: stream.bytes,
        estimated_server_memory_bytes: stream.estimated_server_memory_bytes,
        stalled: conditions::is_true(&s.conditions, types::STALLED),
    }
}

/// What a full reconcile observed, for the status (everything the pure build
/// needs, nothing it must fetch).
pub(crate) struct Observed<'a> {
    pub(crate) pipeline: &'a OrderPipeline,
    /// Inputs removed unprocessed since the last reconcile.
    pub(crate) removed: super::retention::Removed,
    pub(crate) now: Time,
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
    pub(crate) nats_identity: Option<crate::crd::NatsIdentityStatus>,
    /// Set when this reconcile changed the replicas.
    pub(crate) scaled_at: Option<Time>,
    /// The figures were read now: since when the consumer's deliveries and ack
    /// floor are where they are, as far as this process saw (`None`: the
    /// figures are reused from a recent pass).
    pub(crate) still_since: Option<Time>,
    /// How long work may wait with nothing moving before it is a stall.
    pub(crate) stall_window: std::time::Duration,
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
    let figures_ok = with_figures(&mut status, &mut conds, old, o);
    let (workers, workers_condition) = workers(o.deployment, generation);
    status.workers_ready = Some(format!("{}/{}", workers.ready, workers.desired));
    status.replicas = Some(
        o.deployment
            .status
            .as_ref()
            .and_then(|s| s.replicas)
            .unwrap_or(0),
    );
    status.selector = Some(o.selector.clone());
    status.secrets_checksum = o.secrets_checksum.clone();
    status.nats_identity = o.nats_identity.clone();
    let workers_ok = workers_condition.status == "True";
    conds.push(workers_condition);
    conds.extend(with_stall(&mut status, old, o, &workers));
    conds.push(window_condition(o.plan, generation));
    let ready = figures_ok && workers_ok;
    let (reason, message) = if ready {
        (
            reasons::READY,
            format!(
                "stream, consumer and {} worker pod(s) ready",
                workers.available
            ),
        )
    } else if !workers_ok {
        (
            reasons::WORKERS_UNAVAILABLE,
            format!(
                "waiting for workers: {} of {} available",
                workers.available, workers.desired
            ),
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
    status.workers = Some(workers);
    status.conditions = conditions::merge(&old.conditions, conds);
    status
}

/// The JetStream figures into `status` and their conditions (StreamReady,
/// ConsumerReady, InputsRetained); `false` when they could not be read.
fn with_figures(
    status: &mut OrderPipelineStatus,
    conds: &mut Vec<Condition>,
    old: &OrderPipelineStatus,
    o: &Observed,
) -> bool {
    let generation = o.generation;
    match o.figures {
        Ok(f) => {
            status.stream = Some(f.stream.clone());
            status.consumer = Some(f.consumer.clone());
            status.lag = Some(lag(&f.consumer));
            status.dead_letters = Some(f.dead_letters);
            status.oldest_unprocessed_age_seconds = f.oldest_unprocessed_age_seconds;
            status.held_max_age_seconds =
                retention::held_seconds(o.pipeline, o.plan.topology.max_age);
            status.removed_unprocessed =
                retention::fold(old.removed_unprocessed.as_ref(), o.removed, &o.now);
            conds.extend(topology_ready(&o.plan.topology, generation));
            let max_age = retention::spec_max_age_seconds(o.pipeline);
            conds.push(retention::condition(
                o.pipeline, status, max_age, generation,
            ));
            true
        }
        Err(e) => {
            conds.extend(topology_not_ready(reasons::JETSTREAM_ERROR, e, generation));
            false
        }
    }
}

/// Whether the consumer is stalled (see [`super::stall`]): the wait into
/// `status`, and the Stalled condition (none without figures).
fn with_stall(
    status: &mut OrderPipelineStatus,
    old: &OrderPipelineStatus,
    o: &Observed,
    workers: &crate::crd::WorkersStatus,
) -> Option<Condition> {
    let (Ok(f), Some(c)) = (o.figures, status.consumer.as_mut()) else {
        return None;
    };
    let look = super::stall::Look {
        figures: f,
        old,
        now: &o.now,
        still_since: o.still_since.clone(),
        paused: o.paused || f.consumer_paused,
        workers_available: workers.available,
        workers_desired: workers.desired,
        window: o.stall_window,
        consumer: &o.plan.topology.consumer,
        generation: o.generation,
    };
    let (since, stalled) = super::stall::assess(&look);
    c.waiting_since = since;
    Some(stalled)
}

/// The worker figures, all from the Deployment, and WorkersAvailable.
fn workers(d: &Deployment, generation: Option<i64>) -> (crate::crd::WorkersStatus, Condition) {
    let ds = d.status.clone().unwrap_or_default();
    let desired = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0);
    let available = ds.available_replicas.unwrap_or(0);
    let ok = available >= desired;
    let condition = conditions::condition(
        types::WORKERS_AVAILABLE,
        ok,
        if ok {
            reasons::WORKERS_AVAILABLE
        } else {
            reasons::WORKERS_UNAVAILABLE
        },
        format!("{available} of {desired} worker pod(s) available"),
        generation,
    );
    let w = crate::crd::WorkersStatus {
        desired,
        ready: ds.ready_replicas.unwrap_or(0),
        available,
    };
    (w, condition)
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
    pub(crate) kind: Kind,
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
            kind: Kind::WindowTooShort,
            message: c.message,
        });
    }
    out.extend(retention_notes(old, new));
    out.extend(stall_notes(old, new));
    if let (Some(new), Some(prev)) = (new.dead_letters, old.dead_letters)
        && new > prev
    {
        out.push(Note {
            kind: Kind::DeadLettersGrew,
            message: format!(
                "{} new dead letter(s) in {dlq_stream} (total {new}); inspect them with `orderctl dlq list`",
                new - prev
            ),
        });
    }
    out
}

/// A Warning when the consumer turns Stalled (with the figures), and a
/// Normal Event when it moves again.
fn stall_notes(old: &OrderPipelineStatus, new: &OrderPipelineStatus) -> Vec<Note> {
    let stalled = |s: &OrderPipelineStatus| conditions::is_true(&s.conditions, types::STALLED);
    match (stalled(old), stalled(new)) {
        (false, true) => {
            let c = new.conditions.iter().find(|c| c.type_ == types::STALLED);
            vec![Note {
                kind: Kind::Stalled,
                message: c.map(|c| c.message.clone()).unwrap_or_default(),
            }]
        }
        (true, false) => {
            let since = old.consumer.as_ref().and_then(|c| c.waiting_since.clone());
            let c = new.conditions.iter().find(|c| c.type_ == types::STALLED);
            let stalled_for = match (since, c.map(|c| &c.last_transition_time)) {
                (Some(s), Some(t)) => format!(
                    " after {}s without moving",
                    t.0.duration_since(s.0).as_secs().max(0)
                ),
                _ => String::new(),
            };
            let now = c.map(|c| c.message.clone()).unwrap_or_default();
            vec![Note {
                kind: Kind::StallEnded,
                message: format!("the consumer is no longer stalled{stalled_for}: {now}"),
            }]
        }
        _ => Vec::new(),
    }
}

/// A Warning when more inputs were removed unprocessed, and when the oldest
/// unprocessed order turns half `maxAge` old; each with InputsRetained's message.
fn retention_notes(old: &OrderPipelineStatus, new: &OrderPipelineStatus) -> Vec<Note> {
    let retained = |s: &OrderPipelineStatus| {
        s.conditions
            .iter()
            .find(|c| c.type_ == types::INPUTS_RETAINED)
            .cloned()
    };
    let count = |s: &OrderPipelineStatus| s.removed_unprocessed.as_ref().map_or(0, |r| r.count);
    let Some(c) = retained(new) else {
        return Vec::new();
    };
    let was = retained(old).map(|c| c.reason);
    if count(new) > count(old) && c.reason == reasons::INPUTS_REMOVED_UNPROCESSED {
        vec![Note {
            kind: Kind::InputsRemovedUnprocessed,
            message: c.message,
        }]
    } else if c.reason == reasons::OLDEST_UNPROCESSED_AGING
        && was.as_deref() != Some(reasons::OLDEST_UNPROCESSED_AGING)
    {
        vec![Note {
            kind: Kind::OldestUnprocessedAging,
            message: c.message,
        }]
    } else {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{ConsumerStatus, StreamStatus};

    fn sample() -> OrderPipeline {
        let mut p: OrderPipeline = serde_yaml::from_str(include_str!(
            "../../../manifests/samples/orderpipeline.yaml"
        ))
        .unwrap();
        p.metadata.namespace = Some("demo".into());
        p.metadata.generation = Some(4);
        p
    }

    /// The worker Deployment as the API server returns it.
    fn deployment(desired: i32, available: i32) -> Deployment {
        serde_yaml::from_str(&format!(
            "metadata: {{name: orders-workers}}
spec:
  replicas: {desired}
  selector: {{matchLabels: {{app: w}}}}
  template: {{metadata: {{labels: {{app: w}}}}}}
status: {{replicas: {desired}, readyReplicas: {available}, availableReplicas: {available}}}"
        ))
        .unwrap()
    }

    fn figures(dead_letters: i64) -> Result<Figures, String> {
        Ok(Figures {
            consumer_paused: false,
            legacy_records: Some(0),
            stream: StreamStatus {
                messages: 10,
                ..Default::default()
            },
            consumer: ConsumerStatus {
                pending: 3,
                ack_pending: 2,
                ..Default::default()
            },
            dead_letters,
            observation: Default::default(),
            oldest_unprocessed_age_seconds: Some(30),
            stream_config: Default::default(),
            unseen_input: false,
        })
    }

    fn manual(apply: Option<i32>) -> Replicas {
        Replicas {
            mode: if apply.is_some() {
                ReplicaMode::Manual
            } else {
                ReplicaMode::External
            },
            apply,
            before_pause: None,
            resume_at: None,
            note: None,
            clock: (None, None),
        }
    }

    fn condition<'a>(s: &'a OrderPipelineStatus, type_: &str) -> (&'a str, &'a str) {
        let c = s.conditions.iter().find(|c| c.type_ == type_).unwrap();
        (c.status.as_str(), c.reason.as_str())
    }

    fn built(
        plan: &Plan,
        r: &Replicas,
        f: &Result<Figures, String>,
        d: &Deployment,
    ) -> OrderPipelineStatus {
        let p = sample();
        build(
            &OrderPipelineStatus::default(),
            &Observed {
                pipeline: &p,
                removed: Default::default(),
                now: Time(k8s_openapi::jiff::Timestamp::now()),
                generation: p.metadata.generation,
                paused: false,
                plan,
                replicas: r,
                figures: f,
                deployment: d,
                selector: "app=w".into(),
                secrets_checksum: None,
                nats_identity: None,
                scaled_at: None,
                still_since: None,
                stall_window: std::time::Duration::from_secs(60),
            },
        )
    }

    #[test]
    fn inputs_removed_unprocessed_turn_inputs_retained_false_until_acknowledged() {
        let mut p = sample();
        p.metadata.name = Some("orders".into());
        p.spec.stream.max_age = "60s".into();
        let plan = crate::render::plan(&p).unwrap();
        let (r, d) = (manual(Some(1)), deployment(1, 1));
        let observe = |p: &OrderPipeline, old: &OrderPipelineStatus, age, removed: u64| {
            let mut f = figures(0).unwrap();
            f.oldest_unprocessed_age_seconds = age;
            build(
                old,
                &Observed {
                    pipeline: p,
                    removed: super::retention::Removed {
                        count: removed,
                        exact: true,
                    },
                    now: Time(k8s_openapi::jiff::Timestamp::now()),
                    generation: p.metadata.generation,
                    paused: false,
                    plan: &plan,
                    replicas: &r,
                    figures: &Ok(f),
                    deployment: &d,
                    selector: "app=w".into(),
                    secrets_checksum: None,
                    nats_identity: None,
                    scaled_at: None,
                    still_since: None,
                    stall_window: std::time::Duration::from_secs(60),
                },
            )
        };
        let fresh = observe(&p, &OrderPipelineStatus::default(), Some(10), 0);
        assert_eq!(
            condition(&fresh, types::INPUTS_RETAINED),
            ("True", "InputsRetained")
        );
        assert!(notes(&OrderPipelineStatus::default(), &fresh, "DLQ").is_empty());
        // Half maxAge: a warning before anything is lost, once.
        let aging = observe(&p, &fresh, Some(30), 0);
        assert_eq!(
            condition(&aging, types::INPUTS_RETAINED),
            ("False", "OldestUnprocessedAging")
        );
        let n = notes(&fresh, &aging, "DLQ");
        assert_eq!(n.len(), 1);
        assert_eq!(n[0].kind, Kind::OldestUnprocessedAging);
        assert!(n[0].message.contains("30s old"), "{}", n[0].message);
        assert!(notes(&aging, &observe(&p, &aging, Some(31), 0), "DLQ").is_empty());
        // Removed: the loss, counted, with a Warning naming how many.
        let lost = observe(&p, &aging, None, 4);
        assert_eq!(lost.removed_unprocessed.as_ref().unwrap().count, 4);
        assert_eq!(
            condition(&lost, types::INPUTS_RETAINED),
            ("False", "InputsRemovedUnprocessed")
        );
        let n = notes(&aging, &lost, "DLQ");
        assert_eq!(n[0].kind, Kind::InputsRemovedUnprocessed);
        assert!(
            n[0].message.starts_with("4 order(s) were removed"),
            "{}",
            n[0].message
        );
        assert!(n[0].message.contains("removed-unprocessed-acknowledged=4"));
        // It stays False on later reconciles, until a person acknowledges it.
        let later = observe(&p, &lost, None, 0);
        assert_eq!(later.removed_unprocessed, lost.removed_unprocessed);
        assert_eq!(condition(&later, types::INPUTS_RETAINED).0, "False");
        assert!(notes(&lost, &later, "DLQ").is_empty());
        p.metadata.annotations = Some(
            [(
                super::retention::ACKNOWLEDGED_ANNOTATION.to_string(),
                "4".to_string(),
            )]
            .into(),
        );
        let acked = observe(&p, &later, None, 0);
        assert_eq!(condition(&acked, types::INPUTS_RETAINED).0, "True");
        assert_eq!(figures_of(&p, &acked).removed_unprocessed, 0);
        assert_eq!(figures_of(&sample(), &acked).removed_unprocessed, 4);
    }

    #[test]
    fn ready_needs_the_figures_and_every_worker() {
        let plan = crate::render::plan(&sample()).unwrap();
        let s = built(&plan, &manual(Some(2)), &figures(0), &deployment(2, 2));
        assert_eq!(condition(&s, types::READY), ("True", reasons::READY));
        assert_eq!(condition(&s, types::STREAM_READY).0, "True");
        assert_eq!(
            (s.lag, s.observed_generation, s.applied_generation),
            (Some(5), Some(4), Some(4))
        );
        assert_eq!(s.workers_ready.as_deref(), Some("2/2"));
        assert_eq!(s.desired_replicas, Some(2));

        let s = built(&plan, &manual(Some(3)), &figures(0), &deployment(3, 1));
        assert_eq!(
            condition(&s, types::READY),
            ("False", reasons::WORKERS_UNAVAILABLE)
        );
        assert_eq!(condition(&s, types::WORKERS_AVAILABLE).0, "False");

        let s = built(
            &plan,
            &manual(Some(2)),
            &Err("reading stream ORDERS: timed out".into()),
            &deployment(2, 2),
        );
        assert_eq!(
            condition(&s, types::READY),
            ("False", reasons::JETSTREAM_ERROR)
        );
        assert_eq!(
            condition(&s, types::STREAM_READY),
            ("False", reasons::JETSTREAM_ERROR)
        );
        assert_eq!(condition(&s, types::CONSUMER_READY).0, "False");

        // External: the operator decided nothing; the Deployment asks for 7.
        let s = built(&plan, &manual(None), &figures(0), &deployment(7, 7));
        assert_eq!(s.desired_replicas, None);
        assert_eq!(s.workers.as_ref().map(|w| w.desired), Some(7));
        assert_eq!(condition(&s, types::SCALING).1, reasons::EXTERNAL);
    }

    #[test]
    fn a_blocked_reconcile_observes_the_generation_but_applies_nothing() {
        let plan = crate::render::plan(&sample()).unwrap();
        let ok = built(&plan, &manual(Some(2)), &figures(0), &deployment(2, 2));
        let b = NotReady::new(
            Cause::NatsUnreachable,
            "NATS at nats://x:4222 is unreachable",
        );
        let s = blocked_status(Some(5), &ok, &b);
        assert_eq!(
            (s.observed_generation, s.applied_generation),
            (Some(5), Some(4))
        );
        assert_eq!(
            condition(&s, types::READY),
            ("False", reasons::NATS_UNREACHABLE)
        );
        assert_eq!(
            condition(&s, types::STREAM_READY),
            ("False", reasons::NATS_UNREACHABLE)
        );
        assert_eq!(s.lag, ok.lag, "the last figures stay");
        let b = NotReady::new(Cause::SecretMissing, "Secret demo/x does not exist");
        let s = blocked_status(Some(5), &ok, &b);
        assert_eq!(
            condition(&s, types::STREAM_READY),
            ("True", reasons::STREAM_READY)
        );
    }

    #[test]
    fn events_for_a_window_turning_short_and_dead_letters_growing() {
        let mut p = sample();
        p.spec.stream.duplicate_window = "1s".into();
        let short = crate::render::plan(&p).unwrap();
        let fine = crate::render::plan(&sample()).unwrap();
        let before = built(&fine, &manual(Some(2)), &figures(1), &deployment(2, 2));
        let after = built(&short, &manual(Some(2)), &figures(4), &deployment(2, 2));
        let n = notes(&before, &after, "ORDERS_DLQ");
        let kinds: Vec<_> = n.iter().map(|n| n.kind).collect();
        assert_eq!(kinds, [Kind::WindowTooShort, Kind::DeadLettersGrew]);
        assert!(
            n[1].message
                .starts_with("3 new dead letter(s) in ORDERS_DLQ (total 4)")
        );
        assert!(
            notes(&after, &after, "ORDERS_DLQ").is_empty(),
            "once, not on every reconcile"
        );
    }
}
