use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, Patch, PatchParams};

use super::super::*;

/// Before applying without `spec.replicas` (External mode): if our field manager
/// still owns the field, hand it to a separate manager at its live value (right
/// after a pause: the replicas from before it), so
/// server-side apply does not reset it when we stop applying it.
pub(crate) async fn release_replicas(
    api: &Api<Deployment>,
    name: &str,
    live: Option<&Deployment>,
    resume_at: Option<i32>,
) -> Result<(), Error> {
    let Some(live) = live else { return Ok(()) };
    let owned = live.metadata.managed_fields.iter().flatten().any(|m| {
        m.manager.as_deref() == Some(MANAGER)
            && m.operation.as_deref() == Some("Apply")
            && m.fields_v1.as_ref().is_some_and(|f| {
                f.0.get("f:spec")
                    .and_then(|s| s.get("f:replicas"))
                    .is_some()
            })
    });
    let Some(replicas) = resume_at.or(live.spec.as_ref().and_then(|s| s.replicas)) else {
        return Ok(());
    };
    if owned {
        let patch = serde_json::json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name},
            "spec": {"replicas": replicas},
        });
        api.patch(
            name,
            &PatchParams::apply(&format!("{MANAGER}-handoff")).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map_err(Error::Kube)?;
    }
    Ok(())
}
