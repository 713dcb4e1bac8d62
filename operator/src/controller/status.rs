use kube::ResourceExt as _;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;

use crate::conditions::{self, types};
use crate::crd::{OrderPipeline, OrderPipelineStatus};
use crate::events::EventType;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

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
