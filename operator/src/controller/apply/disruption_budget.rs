//! The workers' PodDisruptionBudget (see [`crate::disruption`]).

use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::ResourceExt as _;

use crate::crd::OrderPipeline;

use super::super::*;
use super::owned::{Refused, apply_owned, delete_owned};

/// Applies `p`'s workers' PodDisruptionBudget, or deletes it when the spec
/// turns it off. The API server refusing it is a clear NotReady.
pub(crate) async fn apply_disruption_budget(p: &OrderPipeline, ctx: &Context) -> Result<(), Stop> {
    let ns = p.namespace().unwrap_or_default();
    let (result, name) = match crate::disruption::worker_budget(p) {
        Some(desired) => (apply_owned(p, ctx, &desired).await, desired.name_any()),
        None => {
            let name = crate::render::deployment_name(p);
            (
                delete_owned::<PodDisruptionBudget>(p, ctx, &name).await,
                name,
            )
        }
    };
    match result {
        Ok(()) => Ok(()),
        Err(Ok(Refused::Forbidden(m))) => Err(NotReady::new(
            Cause::KubernetesError,
            format!(
                "the operator may not write the workers' PodDisruptionBudget {name} in {ns} ({m}); grant it get, create, patch and delete on poddisruptionbudgets (policy) there: manifests/rbac.yaml and the chart do"
            ),
        )
        .into()),
        Err(Ok(Refused::Invalid(m))) => Err(NotReady::new(
            Cause::InvalidSpec,
            format!(
                "the API server refused the workers' PodDisruptionBudget {name}: {m}; check spec.workers.disruptionBudget.maxUnavailable (a count, or a percentage such as \"25%\")"
            ),
        )
        .into()),
        Err(Err(e)) => Err(e.into()),
    }
}
