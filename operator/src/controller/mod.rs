//! The reconciler: dereference (Secrets, NATS) -> plan (pure) -> apply
//! (JetStream objects, Deployment) -> status. Errors become conditions and
//! Events; only unexpected failures reach `error_policy`.

mod apply;
mod cleanup;
mod context;
mod dereference;
mod error;
mod plan;
mod status;
mod watch;

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self};
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Resource, ResourceExt as _};

use crate::conditions::{self, reasons, types};
use crate::crd::{ManagementPolicy, OrderPipeline, ReplicaMode};
use crate::events::EventType;
use crate::render::{self};
use crate::scaling;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use orderpipeline_common::duration::parse_duration;

use self::apply::deployment::*;
use self::apply::jetstream::*;
use self::cleanup::*;
pub use self::context::Context;
use self::dereference::*;
pub use self::error::Error;
use self::error::*;
pub use self::plan::replica_mode;
use self::status::*;
pub use self::watch::run;

pub const MANAGER: &str = "order-operator";

pub const FINALIZER: &str = "orderpipeline.dev/cleanup";

/// Annotation that lets a deletion finish without deleting JetStream objects.
pub const SKIP_CLEANUP_ANNOTATION: &str = "orderpipeline.dev/skip-cleanup";

/// How long a `Delete` cleanup keeps retrying an unreachable NATS before giving up.
pub const CLEANUP_GIVE_UP: Duration = Duration::from_secs(120);

pub(crate) fn key_of(p: &OrderPipeline) -> String {
    format!("{}/{}", p.namespace().unwrap_or_default(), p.name_any())
}

pub(crate) fn jittered(d: Duration) -> Duration {
    d.mul_f64(0.9 + rand::random::<f64>() * 0.2)
}

pub async fn reconcile(p: Arc<OrderPipeline>, ctx: Arc<Context>) -> Result<Action, Error> {
    let start = std::time::Instant::now();
    let ns = p.namespace().unwrap_or_default();
    let api: Api<OrderPipeline> = Api::namespaced(ctx.client.clone(), &ns);
    let result = finalizer(&api, FINALIZER, p, |event| async {
        match event {
            Finalizer::Apply(p) => apply(p, ctx.clone()).await,
            Finalizer::Cleanup(p) => cleanup(p, ctx.clone()).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    ctx.metrics.reconciled(
        start.elapsed(),
        result.as_ref().err().map(Error::metric_label),
    );
    result
}

pub fn error_policy(p: Arc<OrderPipeline>, error: &Error, ctx: Arc<Context>) -> Action {
    tracing::warn!(pipeline = %key_of(&p), error = %error, "reconcile failed; retrying");
    let _ = ctx;
    Action::requeue(Duration::from_secs(10))
}

pub(crate) async fn apply(p: Arc<OrderPipeline>, ctx: Arc<Context>) -> Result<Action, Error> {
    let generation = p.metadata.generation;
    // The status from the API server, not the watch cache: a reconcile triggered
    // right after our own status write may see the cache without it, and the
    // scaler's clocks and lastScaleTime must not be lost.
    let api: Api<OrderPipeline> =
        Api::namespaced(ctx.client.clone(), &p.namespace().unwrap_or_default());
    let old = match api.get_status(&p.name_any()).await {
        Ok(fresh) => fresh.status.unwrap_or_default(),
        Err(_) => p.status.clone().unwrap_or_default(),
    };
    let key = key_of(&p);

    let others = ctx.pipelines.get().map(|s| s.state()).unwrap_or_default();
    let plan = match render::plan(&p).and_then(|plan| {
        render::conflicts(&p, &plan, &others)?;
        Ok(plan)
    }) {
        Ok(plan) => plan,
        Err(e) => {
            let msg = format!("{e}; fix the spec");
            return finish_blocked(&p, &ctx, &old, NotReady::new(Cause::InvalidSpec, msg)).await;
        }
    };
    let (mut auth, secrets, files) = match read_secrets(&p, &ctx.client).await {
        Ok(x) => x,
        Err(b) => return finish_blocked(&p, &ctx, &old, b).await,
    };
    if let Err(b) = write_tls_files(&key, &files, &mut auth) {
        return finish_blocked(&p, &ctx, &old, b).await;
    }
    let auth_hash = format!("{}|{:?}", p.spec.nats.url, secrets.checksum);
    let client = match ctx.nats(&key, &p.spec.nats.url, &auth, &auth_hash).await {
        Ok(c) => c,
        Err(e) => {
            let b = NotReady::new(Cause::of_connect(&e), e.to_string());
            return finish_blocked(&p, &ctx, &old, b).await;
        }
    };
    if client.connection_state() != async_nats::connection::State::Connected {
        let b = NotReady::new(
            Cause::NatsUnreachable,
            format!(
                "lost the connection to NATS at {}; reconnecting (check that nats-server runs there)",
                p.spec.nats.url
            ),
        );
        return finish_blocked(&p, &ctx, &old, b).await;
    }
    let mut js = jetstream::new(client.clone());
    js.set_timeout(Duration::from_secs(5));

    let observe = p.spec.management_policy == ManagementPolicy::Observe;

    // JetStream objects (Observe: change nothing, only report).
    // Between reconciles of an unchanged spec, any difference is drift.
    // (`status.stream` is set once the stream has been seen, and kept when a
    // later read fails, so a failed read in between does not hide drift.)
    // Judged against the last generation applied in full: a blocked reconcile
    // records observedGeneration too, and applying its spec later is no drift.
    let drift = old.applied_generation == generation && old.stream.is_some();
    if !observe && let Err(b) = ensure_topology(&p, &ctx, &js, &plan.topology, drift).await {
        if b.cause.drops_connection() {
            ctx.forget_nats(&key).await;
        }
        return finish_blocked(&p, &ctx, &old, b).await;
    }
    let figures = read_figures(&js, &plan.topology).await;
    if !observe && let Err(b) = ensure_paused(&p, &ctx, &js, &plan.topology, &figures).await {
        return finish_blocked(&p, &ctx, &old, b).await;
    }

    // Who sets the replicas, and to what.
    let deployments: Api<Deployment> =
        Api::namespaced(ctx.client.clone(), &p.namespace().unwrap_or_default());
    let name = render::deployment_name(&p);
    let before = deployments.get_opt(&name).await.map_err(Error::Kube)?;
    let live_replicas = before
        .as_ref()
        .and_then(|d| d.spec.as_ref())
        .and_then(|s| s.replicas);
    // While the bucket holds records of the protocol before v2, the workers check
    // them (unknown when NATS cannot be read: keep what the workers have).
    let mut plan = plan;
    plan.legacy_bucket = match figures.as_ref().ok().and_then(|f| f.legacy_records) {
        Some(n) => (n > 0).then(|| plan.topology.bucket.clone()),
        None => before
            .as_ref()
            .and_then(|d| d.spec.as_ref())
            .and_then(|s| s.template.spec.as_ref())
            .and_then(|s| s.containers.first())
            .and_then(|c| c.env.as_ref())
            .and_then(|env| env.iter().find(|v| v.name == "LEGACY_STATE_BUCKET"))
            .and_then(|v| v.value.clone()),
    };
    plan.replaces_old_protocol = before.as_ref().is_some_and(render::replaces_old_protocol);
    let mode = replica_mode(&p);
    let lag = figures
        .as_ref()
        .ok()
        .map(|f| u64::try_from(f.consumer.pending + f.consumer.ack_pending).unwrap_or(0));
    let now = k8s_openapi::jiff::Timestamp::now();
    let mut scale_note: Option<(bool, String)> = None;
    let mut scaling_clock = (old.last_busy_time.clone(), old.idle_since.clone());
    // Remember the replicas a pause took away, to give them back in External mode.
    let mut replicas_before_pause = old.replicas_before_pause;
    let mut resume_at = None;
    if p.spec.paused {
        if replicas_before_pause.is_none() {
            replicas_before_pause = live_replicas.filter(|r| *r > 0);
        }
    } else {
        resume_at = replicas_before_pause.take();
    }
    let replicas: Option<i32> = if p.spec.paused {
        Some(0)
    } else {
        match mode {
            ReplicaMode::Manual => Some(p.spec.workers.replicas),
            ReplicaMode::External => None,
            ReplicaMode::Operator => {
                let sc = &p.spec.workers.scaling;
                let min = p.spec.workers.min_replicas.unwrap_or(1);
                let max = p
                    .spec
                    .workers
                    .max_replicas
                    .unwrap_or(p.spec.workers.replicas.max(min));
                let d = scaling::decide(&scaling::Inputs {
                    lag,
                    current: live_replicas.unwrap_or(p.spec.workers.replicas.clamp(min, max)),
                    min,
                    max,
                    target_lag_per_replica: u64::try_from(sc.target_lag_per_replica).unwrap_or(1),
                    activation_lag: u64::try_from(sc.activation_lag).unwrap_or(0),
                    max_step: sc.max_step,
                    stabilization_window: parse_duration(&sc.stabilization_window)
                        .unwrap_or(Duration::from_secs(300)),
                    cooldown: parse_duration(&sc.cooldown).unwrap_or(Duration::from_secs(300)),
                    now,
                    last_busy: old.last_busy_time.as_ref().map(|t| t.0),
                    idle_since: old.idle_since.as_ref().map(|t| t.0),
                });
                scaling_clock = (d.last_busy.map(Time), d.idle_since.map(Time));
                scale_note = Some((d.lag_known, d.reason.clone()));
                Some(d.desired)
            }
        }
    };

    // The worker Deployment (Observe: leave it alone).
    let after = if observe {
        before.clone().unwrap_or_default()
    } else {
        if replicas.is_none() {
            release_replicas(&deployments, &name, before.as_ref(), resume_at).await?;
        }
        if let Some(patch) = before
            .as_ref()
            .and_then(|live| render::strategy_patch(live, plan.replaces_old_protocol))
        {
            deployments
                .patch(&name, &PatchParams::apply(MANAGER), &Patch::Merge(&patch))
                .await
                .map_err(Error::Kube)?;
        }
        let desired = render::deployment(&p, &plan, &secrets, &ctx.default_image, replicas);
        match deployments
            .patch(
                &name,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(&desired),
            )
            .await
        {
            Ok(d) => d,
            // Refused as invalid (e.g. a bad resources or affinity value): the
            // spec must change, so say so instead of retrying quietly.
            Err(kube::Error::Api(s)) if s.code == 400 || s.code == 422 => {
                let b = NotReady::new(
                    Cause::DeploymentInvalid,
                    format!(
                        "the API server refused the worker Deployment {name}: {}; fix spec.workers",
                        s.message
                    ),
                );
                return finish_blocked(&p, &ctx, &old, b).await;
            }
            Err(e) => return Err(Error::Kube(e)),
        }
    };
    let applied_replicas = after.spec.as_ref().and_then(|s| s.replicas);
    match &before {
        None if !observe => {
            ctx.event(
                &p,
                EventType::Normal,
                "DeploymentCreated",
                "Create",
                format!(
                    "created Deployment {name} with {} replica(s)",
                    applied_replicas.unwrap_or(1)
                ),
            )
            .await;
        }
        Some(b)
            if b.spec.as_ref().map(|s| &s.template) != after.spec.as_ref().map(|s| &s.template) =>
        {
            ctx.event(
                &p,
                EventType::Normal,
                "DeploymentUpdated",
                "Update",
                format!("updated Deployment {name}"),
            )
            .await;
        }
        _ => {}
    }
    let scaled =
        before.is_some() && !observe && replicas.is_some() && live_replicas != applied_replicas;
    if scaled {
        let why = if p.spec.paused {
            format!("paused, scaling {} -> 0", live_replicas.unwrap_or(0))
        } else if let Some((_, r)) = &scale_note {
            r.clone()
        } else {
            format!(
                "spec.workers.replicas, scaling {} -> {}",
                live_replicas.unwrap_or(0),
                applied_replicas.unwrap_or(0)
            )
        };
        let mut related = after.object_ref(&());
        // A new resourceVersion per scale keeps each Scaled event its own.
        related.resource_version = after.metadata.resource_version.clone();
        ctx.event_about(&p, EventType::Normal, "Scaled", "Scale", why, Some(related))
            .await;
    }

    let mut status = old.clone();
    status.observed_generation = generation;
    status.applied_generation = generation;
    status.replica_mode = Some(mode);
    status.replicas_before_pause = replicas_before_pause;
    // The operator's own decision; absent when it decides nothing (External
    // mode). What the Deployment asks for is `workers.desired`.
    status.desired_replicas = replicas;
    (status.last_busy_time, status.idle_since) = scaling_clock;
    if scaled {
        status.last_scale_time = Some(Time(now));
    }
    let mut conds = Vec::new();
    let mut ready = true;
    conds.push(if p.spec.paused {
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
    });
    match (&scale_note, p.spec.paused, mode) {
        (_, true, _) => conds.push(conditions::condition(types::SCALING, false, reasons::PAUSED, "paused", generation)),
        (Some((true, why)), _, _) => conds.push(conditions::condition(types::SCALING, true, reasons::SCALING_ACTIVE, why.clone(), generation)),
        (Some((false, why)), _, _) => conds.push(conditions::condition(types::SCALING, false, reasons::LAG_UNAVAILABLE, format!("{why}; check the consumer and NATS"), generation)),
        (None, _, ReplicaMode::Manual) => conds.push(conditions::condition(types::SCALING, false, reasons::MANUAL, "replica mode Manual: spec.workers.replicas (kubectl scale orderpipeline/NAME) sets the replicas", generation)),
        (None, _, _) => conds.push(conditions::condition(types::SCALING, false, reasons::EXTERNAL, "replica mode External: another scaler (KEDA, HPA) sets the Deployment's replicas", generation)),
    }
    match &figures {
        Ok(f) => {
            status.stream = Some(f.stream.clone());
            status.consumer = Some(f.consumer.clone());
            status.lag = Some(f.consumer.pending + f.consumer.ack_pending);
            status.dead_letters = Some(f.dead_letters);
            conds.push(conditions::condition(
                types::STREAM_READY,
                true,
                reasons::STREAM_READY,
                format!(
                    "stream {} and dead-letter stream {} exist",
                    plan.topology.stream, plan.topology.dlq_stream
                ),
                generation,
            ));
            conds.push(conditions::condition(
                types::CONSUMER_READY,
                true,
                reasons::CONSUMER_READY,
                format!(
                    "consumer {} on {} filters {}",
                    plan.topology.consumer, plan.topology.stream, plan.topology.filter_subject
                ),
                generation,
            ));
        }
        Err(e) => {
            ready = false;
            conds.extend(topology_not_ready(reasons::JETSTREAM_ERROR, e, generation));
        }
    }
    let ds = after.status.clone().unwrap_or_default();
    let desired_replicas = applied_replicas.unwrap_or(0);
    let ready_pods = ds.ready_replicas.unwrap_or(0);
    let available = ds.available_replicas.unwrap_or(0);
    status.workers = Some(crate::crd::WorkersStatus {
        desired: desired_replicas,
        ready: ready_pods,
        available,
    });
    status.workers_ready = Some(format!("{ready_pods}/{desired_replicas}"));
    status.replicas = Some(ds.replicas.unwrap_or(0));
    status.selector = Some(render::selector_string(&p));
    status.secrets_checksum = secrets.checksum.clone();
    let workers_ok = available >= desired_replicas;
    if !workers_ok {
        ready = false;
    }
    conds.push(conditions::condition(
        types::WORKERS_AVAILABLE,
        workers_ok,
        if workers_ok {
            reasons::WORKERS_AVAILABLE
        } else {
            reasons::WORKERS_UNAVAILABLE
        },
        format!("{available} of {desired_replicas} worker pod(s) available"),
        generation,
    ));
    match &plan.window_warning {
        None => conds.push(conditions::condition(
            types::DUPLICATE_WINDOW,
            true,
            reasons::WINDOW_COVERS,
            "the stream's duplicate window covers the redelivery horizon",
            generation,
        )),
        Some(w) => {
            conds.push(conditions::condition(
                types::DUPLICATE_WINDOW,
                false,
                reasons::WINDOW_TOO_SHORT,
                w.clone(),
                generation,
            ));
            if !old
                .conditions
                .iter()
                .any(|c| c.type_ == types::DUPLICATE_WINDOW && c.status == "False")
            {
                ctx.event(
                    &p,
                    EventType::Warning,
                    reasons::WINDOW_TOO_SHORT,
                    "Validate",
                    w.clone(),
                )
                .await;
            }
        }
    }
    let (reason, message) = if ready {
        (
            reasons::READY,
            format!("stream, consumer and {available} worker pod(s) ready"),
        )
    } else if !workers_ok {
        (
            reasons::WORKERS_UNAVAILABLE,
            format!("waiting for workers: {available} of {desired_replicas} available"),
        )
    } else {
        (
            reasons::JETSTREAM_ERROR,
            figures.as_ref().err().cloned().unwrap_or_default(),
        )
    };
    conds.insert(
        0,
        conditions::condition(types::READY, ready, reason, message, generation),
    );
    status.conditions = conditions::merge(&old.conditions, conds);

    if let (Some(new), Some(prev)) = (status.dead_letters, old.dead_letters)
        && new > prev
    {
        ctx.event(
            &p,
            EventType::Warning,
            "DeadLettersGrew",
            "Observe",
            format!(
                "{} new dead letter(s) in {} (total {new}); inspect them with `orderctl dlq list`",
                new - prev,
                plan.topology.dlq_stream
            ),
        )
        .await;
    }
    ctx.metrics.pipeline(
        &key,
        status.lag.unwrap_or(0),
        status.dead_letters.unwrap_or(0),
        i64::from(ds.replicas.unwrap_or(0)),
    );
    write_status(&p, &ctx, &old, &status).await?;
    let next = if ready {
        ctx.resync
    } else {
        ctx.resync.min(Duration::from_secs(5))
    };
    Ok(Action::requeue(jittered(next)))
}
