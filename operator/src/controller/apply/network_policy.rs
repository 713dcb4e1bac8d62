//! The workers' NetworkPolicy (see [`crate::netpol`]): applied when it changes
//! and at most every [`REAPPLY`] otherwise, so the usual resync writes nothing.

use std::time::{Duration, Instant};

use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::ResourceExt as _;
use kube::api::{Api, Patch, PatchParams};

use crate::crd::OrderPipeline;

use super::super::*;

/// How often an unchanged policy is applied again (it puts back one deleted or
/// edited by hand; the operator does not watch NetworkPolicies).
pub(crate) const REAPPLY: Duration = Duration::from_secs(300);

/// Applies `p`'s workers' NetworkPolicy unless this process applied the same
/// one within [`REAPPLY`]. The API server refusing it is a clear NotReady.
pub(crate) async fn apply_network_policy(p: &OrderPipeline, ctx: &Context) -> Result<(), Stop> {
    if !ctx.worker_network_policy {
        return Ok(());
    }
    let desired = crate::netpol::worker_policy(p);
    let digest = super::deployment::digest(&serde_json::to_vec(&desired).unwrap_or_default());
    let key = key_of(p);
    let fresh = |(d, at): &(u64, Instant)| *d == digest && at.elapsed() < REAPPLY;
    if ctx.policies.lock().unwrap().get(&key).is_some_and(fresh) {
        return Ok(());
    }
    let ns = p.namespace().unwrap_or_default();
    let name = desired.name_any();
    let api: Api<NetworkPolicy> = Api::namespaced(ctx.client.clone(), &ns);
    let params = PatchParams::apply(MANAGER).force();
    match api.patch(&name, &params, &Patch::Apply(&desired)).await {
        Ok(_) => {
            ctx.policies.lock().unwrap().insert(key, (digest, Instant::now()));
            Ok(())
        }
        Err(kube::Error::Api(s)) if s.code == 403 => Err(NotReady::new(
            Cause::KubernetesError,
            format!(
                "the operator may not write the workers' NetworkPolicy {name} in {ns} ({}); grant it get, create and patch on networkpolicies there (manifests/rbac.yaml and the chart do), or run it with --worker-network-policy=false (chart value networkPolicy.workers: false)",
                s.message
            ),
        )
        .into()),
        Err(kube::Error::Api(s)) if s.code == 400 || s.code == 422 => Err(NotReady::new(
            Cause::InvalidSpec,
            format!(
                "the API server refused the workers' NetworkPolicy {name}: {}; check the hosts and ports of spec.nats.url, spec.workers.downstreamUrl and spec.telemetry.otlpEndpoint",
                s.message
            ),
        )
        .into()),
        Err(e) => Err(e.into()),
    }
}
