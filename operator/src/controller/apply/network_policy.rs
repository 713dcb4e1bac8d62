//! The workers' NetworkPolicy (see [`crate::netpol`]).

use kube::ResourceExt as _;

use crate::crd::OrderPipeline;

use super::super::*;
use super::owned::{Refused, apply_owned};

/// Applies `p`'s workers' NetworkPolicy (see [`super::owned`]). The API
/// server refusing it is a clear NotReady.
pub(crate) async fn apply_network_policy(p: &OrderPipeline, ctx: &Context) -> Result<(), Stop> {
    if !ctx.worker_network_policy {
        return Ok(());
    }
    let desired = crate::netpol::worker_policy(p);
    let (ns, name) = (p.namespace().unwrap_or_default(), desired.name_any());
    match apply_owned(p, ctx, &desired).await {
        Ok(()) => Ok(()),
        Err(Ok(Refused::Forbidden(m))) => Err(NotReady::new(
            Cause::KubernetesError,
            format!(
                "the operator may not write the workers' NetworkPolicy {name} in {ns} ({m}); grant it get, create and patch on networkpolicies there (manifests/rbac.yaml and the chart do), or run it with --worker-network-policy=false (chart value networkPolicy.workers: false)"
            ),
        )
        .into()),
        Err(Ok(Refused::Invalid(m))) => Err(NotReady::new(
            Cause::InvalidSpec,
            format!(
                "the API server refused the workers' NetworkPolicy {name}: {m}; check the hosts and ports of spec.nats.url, spec.workers.downstreamUrl and spec.telemetry.otlpEndpoint"
            ),
        )
        .into()),
        Err(Err(e)) => Err(e.into()),
    }
}
