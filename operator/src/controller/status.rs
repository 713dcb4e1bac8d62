use kube::ResourceExt as _;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;

use crate::conditions::{self, reasons, types};
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

/// Ends a reconcile that cannot go on: Ready=False with the reason, an Event, a requeue.
pub(crate) async fn finish_blocked(
    p: &OrderPipeline,
    ctx: &Context,
    old: &OrderPipelineStatus,
    b: Blocked,
) -> Result<Action, Error> {
    let generation = p.metadata.generation;
    let was = old.conditions.iter().find(|c| c.type_ == types::READY);
    if was.is_none_or(|c| c.reason != b.reason || c.message != b.message) {
        ctx.event(
            p,
            EventType::Warning,
            b.reason,
            "Reconcile",
            b.message.clone(),
        )
        .await;
    }
    tracing::warn!(pipeline = %key_of(p), reason = b.reason, message = %b.message, "pipeline not ready");
    ctx.metrics
        .not_ready
        .get_or_create(&crate::metrics::ReasonLabels { reason: b.reason })
        .inc();
    let mut status = old.clone();
    status.observed_generation = generation;
    let mut conds = vec![conditions::condition(
        types::READY,
        false,
        b.reason,
        b.message.clone(),
        generation,
    )];
    if matches!(
        b.reason,
        reasons::NATS_UNREACHABLE
            | reasons::NATS_AUTH_FAILED
            | reasons::NATS_TLS_FAILED
            | reasons::STREAM_CONFLICT
            | reasons::STREAM_INCOMPATIBLE
            | reasons::JETSTREAM_ERROR
    ) {
        conds.extend(topology_not_ready(b.reason, &b.message, generation));
    }
    status.conditions = conditions::merge(&old.conditions, conds);
    write_status(p, ctx, &status).await?;
    Ok(Action::requeue(jittered(b.retry)))
}

pub(crate) async fn write_status(
    p: &OrderPipeline,
    ctx: &Context,
    status: &OrderPipelineStatus,
) -> Result<(), Error> {
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
