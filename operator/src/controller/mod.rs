//! The reconciler: dereference (Secrets, NATS) -> plan (pure) -> apply
//! (JetStream objects, Deployment) -> status. Errors become conditions and
//! Events; only unexpected failures reach `error_policy`.

mod apply;
mod cleanup;
mod context;
mod dereference;
mod error;
pub mod identity;
mod jetstream_api;
mod merge;
mod plan;
mod retention;
pub mod stall;
mod status;
#[cfg(test)]
mod tests;
mod watch;

use std::sync::Arc;
use std::time::Duration;

use kube::ResourceExt as _;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};

use crate::crd::{ManagementPolicy, OrderPipeline, OrderPipelineStatus};
use crate::render::{self};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use self::apply::deployment::*;
use self::apply::disruption_budget::*;
use self::apply::jetstream::*;
use self::apply::network_policy::*;
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

/// [`key_of`] for a reference to a pipeline.
pub(crate) fn key_of_ref(r: &kube::runtime::reflector::ObjectRef<OrderPipeline>) -> String {
    format!("{}/{}", r.namespace.as_deref().unwrap_or_default(), r.name)
}

/// `d` shortened by up to 10 %, at random: reconciles of many pipelines spread
/// out, and none waits longer than the interval it was given (a stream removed
/// behind the operator's back is back within one resync).
pub(crate) fn jittered(d: Duration) -> Duration {
    d.mul_f64(0.9 + rand::random::<f64>() * 0.1)
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

/// The labelled counters at 0 for every kind and reason, so that `rate()` and
/// the alerts see them before the first failure.
pub fn init_metrics(m: &crate::metrics::Metrics) {
    for kind in ["kubernetes", "nats", "finalizer"] {
        let _ = m
            .failures
            .get_or_create(&crate::metrics::KindLabels { kind });
    }
    for c in error::Cause::ALL {
        let _ = m
            .not_ready
            .get_or_create(&crate::metrics::ReasonLabels { reason: c.reason() });
    }
}

pub fn error_policy(p: Arc<OrderPipeline>, error: &Error, ctx: Arc<Context>) -> Action {
    tracing::warn!(pipeline = %key_of(&p), error = %error, "reconcile failed; retrying");
    let _ = ctx;
    Action::requeue(retry::FAILED)
}

/// One reconcile of a live pipeline; a step that cannot go on ends it with
/// Ready=False (see [`NotReady`]).
pub(crate) async fn apply(p: Arc<OrderPipeline>, ctx: Arc<Context>) -> Result<Action, Error> {
    let old = dereference::fresh_status(&p, &ctx).await;
    match steps(&p, &ctx, &old).await {
        Ok(action) => Ok(action),
        Err(Stop::NotReady(b)) => finish_blocked(&p, &ctx, &old, b).await,
        Err(Stop::Failed(e)) => Err(e),
    }
}

/// The JetStream step: the objects ensured (not in Observe), their figures
/// read, the hold and the pause applied. A reconcile within
/// `ctx.reuse_figures` of such a pass, for the same spec and NATS connection
/// and with no removal advisory since, reuses it instead: the worker
/// Deployment's status changes bring several reconciles in the seconds after a
/// pipeline is created or scaled, and each would read the streams and the
/// consumer again. The resync always makes a full pass.
async fn jetstream_step(
    p: &OrderPipeline,
    ctx: &Context,
    world: &World,
    plan: &mut render::Plan,
    old: &OrderPipelineStatus,
    hold_moved: bool,
) -> Result<Pass, Stop> {
    let key = key_of(p);
    if let Some(pass) = ctx.recent_pass(p, &world.connection) {
        plan.topology.max_age = pass.max_age;
        return Ok(Pass {
            figures: Ok(pass.figures),
            removed: retention::Removed::default(),
            fresh: false,
        });
    }
    let epoch = ctx.removal_epoch(&key);
    let observe = p.spec.management_policy == ManagementPolicy::Observe;
    let js = world.js.as_ref();
    // Apply: the JetStream objects (Observe: change nothing, only report).
    // What it read of the objects it left unchanged is not read again.
    let mut seen = apply::jetstream::Seen::default();
    if !observe {
        // A maxAge the hold moved is the operator's change, not drift.
        let drift = plan::is_drift(p, old) && !hold_moved;
        match ensure_topology(p, ctx, js, &plan.topology, drift, old).await {
            Ok(s) => seen = s,
            Err(b) => {
                if b.cause.drops_connection() {
                    ctx.forget_nats(&key).await;
                }
                return Err(b.into());
            }
        }
    }
    let last = dereference::LastLook::of(old);
    let figures = read_figures(js, &plan.topology, seen, ctx.nats_bytes_per_subject, last).await;
    let removed = match &figures {
        Ok(f) => ctx.removed_since_last_read(&key, &f.observation),
        Err(_) => retention::Removed::default(),
    };
    if let (false, Ok(f)) = (observe, &figures) {
        let (live, oldest) = (&f.stream_config, f.oldest_unprocessed_age_seconds);
        if let Err(e) = retention::hold_now(p, js, &mut plan.topology, live, oldest).await {
            tracing::warn!(pipeline = %key, error = %e, "could not raise maxAge for the oldest unprocessed order; the next reconcile tries again");
        }
    }
    if !observe {
        ensure_paused(p, ctx, js, &plan.topology, &figures).await?;
    }
    if let Ok(f) = &figures {
        ctx.remember_pass(p, &world.connection, epoch, f, plan.topology.max_age);
    }
    Ok(Pass {
        figures,
        removed,
        fresh: true,
    })
}

/// What the JetStream step read.
struct Pass {
    figures: Result<Figures, String>,
    /// Inputs removed unprocessed since the last read.
    removed: retention::Removed,
    /// Read now, not reused from a recent pass.
    fresh: bool,
}

/// dereference -> plan -> apply -> status, in that order.
async fn steps(
    p: &OrderPipeline,
    ctx: &Context,
    old: &OrderPipelineStatus,
) -> Result<Action, Stop> {
    // Plan (pure): the spec, checked against itself.
    let mut plan = plan::own(p)?;
    if let Some(why) = render::not_allowed(p, &ctx.allowlists) {
        return Err(NotReady::new(error::Cause::InvalidSpec, why).into());
    }
    // Hold maxAge above the oldest unprocessed order (spec.stream.holdUnprocessed).
    let t = &mut plan.topology;
    t.max_age = retention::held_max_age(
        p.spec.stream.hold_unprocessed,
        t.max_age,
        old.oldest_unprocessed_age_seconds,
    );
    let hold_moved = retention::held_seconds(p, t.max_age) != old.held_max_age_seconds;
    // A stream created now pins this cluster's scope (an existing one keeps its own).
    t.idempotency_scope = Some(format!("{}/{}", ctx.cluster_id, key_of(p)));
    // Dereference: the Secrets and the NATS connection.
    let mut world = dereference::world(p, ctx).await?;
    // ... and against the other pipelines on the same NATS account (which
    // each connection told, see `NatsPool::scope_of`).
    let others = ctx.other_pipelines();
    let pool = ctx.nats.lock().await;
    plan::conflicts(p, &plan, &others, &ctx.footprints, &|q| pool.scope_of(q))?;
    drop(pool);
    let observe = p.spec.management_policy == ManagementPolicy::Observe;
    if !observe {
        world.mint(p, ctx, &plan).await?;
    }
    let pass = jetstream_step(p, ctx, &world, &mut plan, old, hold_moved).await?;
    let (figures, removed) = (pass.figures, pass.removed);
    // Dereference the live Deployment; plan the replicas and the workers' view.
    let live = dereference::live_deployment(p, ctx).await?;
    let now = k8s_openapi::jiff::Timestamp::now();
    let replicas = plan::workers(p, &mut plan, old, live.as_ref(), &figures, now);
    // Apply the workers' NetworkPolicy, then their Deployment (Observe: leave
    // both alone).
    if !observe {
        apply_network_policy(p, ctx).await?;
        apply_disruption_budget(p, ctx).await?;
    }
    let after = match observe {
        true => live.clone().unwrap_or_default(),
        false => apply_deployment(p, ctx, &plan, &world.secrets, &replicas, live.as_ref()).await?,
    };
    let live_replicas = live.as_ref().and_then(|d| d.spec.as_ref()?.replicas);
    let applied = after.spec.as_ref().and_then(|s| s.replicas);
    let why = plan::scale_reason(p, &replicas, live_replicas, applied).filter(|_| live.is_some());
    if let Some(why) = &why {
        report_scaled(p, ctx, &after, why.clone()).await;
    }
    // Status: built from what was observed, Events for what changed, one write.
    let observed = status::Observed {
        pipeline: p,
        removed,
        now: Time(now),
        generation: p.metadata.generation,
        paused: p.spec.paused,
        plan: &plan,
        replicas: &replicas,
        figures: &figures,
        deployment: &after,
        selector: render::selector_string(p),
        secrets_checksum: world.secrets.checksum.clone(),
        nats_identity: world.identity.clone(),
        scaled_at: why.map(|_| Time(now)),
        still_since: match (&figures, pass.fresh) {
            (Ok(f), true) => {
                let at = (f.consumer.delivered, f.consumer.ack_floor);
                Some(ctx.still_since(&key_of(p), at, &Time(now)))
            }
            _ => None,
        },
        stall_window: stall::window(ctx.stall_window, &plan),
    };
    Ok(status::finish(p, ctx, old, &observed).await?)
}
