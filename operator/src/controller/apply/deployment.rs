use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, Patch, PatchParams};

use kube::{Resource as _, ResourceExt as _};

use crate::crd::OrderPipeline;
use crate::events::{Kind, Object};
use crate::render::{self, Plan, SecretsView};

use super::super::plan::Replicas;
use super::super::*;

/// Applies the worker Deployment: hands the replicas over first when the
/// operator stops setting them, switches the rollout strategy when the plan
/// needs another, then one server-side apply; Events for a creation or a
/// template change. The API server refusing it is the spec's fault: NotReady.
pub(crate) async fn apply_deployment(
    p: &OrderPipeline,
    ctx: &Context,
    plan: &Plan,
    secrets: &SecretsView,
    replicas: &Replicas,
    live: Option<&Deployment>,
) -> Result<Deployment, Stop> {
    let api: Api<Deployment> =
        Api::namespaced(ctx.client.clone(), &p.namespace().unwrap_or_default());
    let name = render::deployment_name(p);
    if replicas.apply.is_none() {
        release_replicas(&api, &name, live, replicas.resume_at).await?;
    }
    if let Some(patch) = live.and_then(|l| render::strategy_patch(l, plan.replaces_old_protocol)) {
        api.patch(&name, &PatchParams::apply(MANAGER), &Patch::Merge(&patch))
            .await?;
    }
    let desired = render::deployment(p, plan, secrets, &ctx.default_image, replicas.apply);
    let apply = PatchParams::apply(MANAGER).force();
    let key = key_of(p);
    let memo = Applied::of(&desired);
    // Nothing to change (the usual resync): the live Deployment is the one this
    // process applied (same generation, labels and annotations: a change by
    // hand moves one of them) for the same desired object, or else a dry run
    // says so. Nothing is written then.
    if let Some(l) = live {
        let same = |m: &Applied| m.matches(&memo, l);
        if ctx.applied.lock().unwrap().get(&key).is_some_and(same) {
            return Ok(l.clone());
        }
        let dry = ssa(&api, &name, &apply.clone().dry_run(), &desired).await?;
        if unchanged(l, &dry) {
            ctx.applied.lock().unwrap().insert(key, memo.at(l));
            return Ok(l.clone());
        }
    }
    let after = ssa(&api, &name, &apply, &desired).await?;
    ctx.applied.lock().unwrap().insert(key, memo.at(&after));
    let template = |d: &Deployment| d.spec.as_ref().map(|s| s.template.clone());
    match live {
        None => {
            let n = after.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
            let note = format!("created Deployment {name} with {n} replica(s)");
            ctx.event(p, Kind::DeploymentCreated, note).await;
        }
        Some(b) if template(b) != template(&after) => {
            let note = format!("updated Deployment {name}");
            ctx.event(p, Kind::Updated(Object::Deployment), note).await;
        }
        Some(_) => {}
    }
    Ok(after)
}

/// One server-side apply of the Deployment; the API server refusing it (e.g. a
/// bad resources or affinity value) is the spec's fault: NotReady, not a retry.
async fn ssa(
    api: &Api<Deployment>,
    name: &str,
    params: &PatchParams,
    desired: &Deployment,
) -> Result<Deployment, Stop> {
    match api.patch(name, params, &Patch::Apply(desired)).await {
        Ok(d) => Ok(d),
        Err(kube::Error::Api(s)) if s.code == 400 || s.code == 422 => Err(NotReady::new(
            Cause::DeploymentInvalid,
            format!(
                "the API server refused the worker Deployment {name}: {}; fix spec.workers",
                s.message
            ),
        )
        .into()),
        Err(e) => Err(e.into()),
    }
}

/// A Deployment as this process applied it: a digest of the desired object, its
/// labels and annotations, and the live object's uid and generation (moved by
/// any spec change, by anyone).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Applied {
    desired: u64,
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
    uid: Option<String>,
    generation: Option<i64>,
}

impl Applied {
    pub(crate) fn of(desired: &Deployment) -> Self {
        Self {
            desired: digest(&serde_json::to_vec(desired).unwrap_or_default()),
            labels: desired.metadata.labels.clone().unwrap_or_default(),
            annotations: desired.metadata.annotations.clone().unwrap_or_default(),
            ..Self::default()
        }
    }

    /// This desired object, applied and now `live`.
    pub(crate) fn at(self, live: &Deployment) -> Self {
        Self {
            uid: live.metadata.uid.clone(),
            generation: live.metadata.generation,
            ..self
        }
    }

    /// Whether `live` is still what applying `desired` left: the same object at
    /// the same generation, with our labels and annotations at our values (the
    /// ones others add, e.g. the controller's revision, are theirs: an apply
    /// leaves them too).
    pub(crate) fn matches(&self, desired: &Applied, live: &Deployment) -> bool {
        let has = |ours: &BTreeMap<String, String>, theirs: &Option<BTreeMap<String, String>>| {
            ours.iter()
                .all(|(k, v)| theirs.as_ref().and_then(|t| t.get(k)) == Some(v))
        };
        self.uid.is_some()
            && self.uid == live.metadata.uid
            && self.generation == live.metadata.generation
            && self.desired == desired.desired
            && has(&self.labels, &live.metadata.labels)
            && has(&self.annotations, &live.metadata.annotations)
    }
}

pub(crate) fn digest(b: &[u8]) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    b.hash(&mut h);
    h.finish()
}

/// Whether applying would change nothing: the dry run's result has the live
/// spec (same generation) and the same labels and annotations.
pub(crate) fn unchanged(live: &Deployment, dry_run: &Deployment) -> bool {
    let (l, d) = (&live.metadata, &dry_run.metadata);
    l.generation == d.generation && l.labels == d.labels && l.annotations == d.annotations
}

/// The Scaled Event, related to the Deployment at its new resourceVersion (so
/// that each scale is its own Event).
pub(crate) async fn report_scaled(
    p: &OrderPipeline,
    ctx: &Context,
    after: &Deployment,
    why: String,
) {
    let mut related = after.object_ref(&());
    related.resource_version = after.metadata.resource_version.clone();
    ctx.event_about(p, Kind::Scaled, why, Some(related)).await;
}

/// Whether the operator's server-side apply owns the Deployment's
/// `spec.replicas` (its managed fields say so): then it must hand them over
/// before it stops applying them, or the API server resets them.
pub(crate) fn owns_replicas(live: &Deployment) -> bool {
    live.metadata.managed_fields.iter().flatten().any(|m| {
        m.manager.as_deref() == Some(MANAGER)
            && m.operation.as_deref() == Some("Apply")
            && m.fields_v1.as_ref().is_some_and(|f| {
                f.0.get("f:spec")
                    .and_then(|s| s.get("f:replicas"))
                    .is_some()
            })
    })
}

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
    let owned = owns_replicas(live);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A Deployment as the API server returns it, with its managed fields.
    fn live(managers: &str) -> Deployment {
        serde_yaml::from_str(&format!(
            "metadata:
  name: orders-workers
  managedFields: {managers}
spec:
  replicas: 4
  selector: {{matchLabels: {{app: w}}}}
  template: {{metadata: {{labels: {{app: w}}}}}}"
        ))
        .unwrap()
    }

    #[test]
    fn the_replicas_are_handed_over_only_while_the_operators_apply_owns_them() {
        let ours = "[{manager: order-operator, operation: Apply, fieldsType: FieldsV1, fieldsV1: {f:spec: {f:replicas: {}, f:template: {}}}}]";
        assert!(owns_replicas(&live(ours)));
        let handed = "[{manager: order-operator, operation: Apply, fieldsType: FieldsV1, fieldsV1: {f:spec: {f:template: {}}}}, {manager: order-operator-handoff, operation: Apply, fieldsType: FieldsV1, fieldsV1: {f:spec: {f:replicas: {}}}}]";
        assert!(!owns_replicas(&live(handed)), "already handed over");
        let hpa = "[{manager: kube-controller-manager, operation: Update, fieldsType: FieldsV1, fieldsV1: {f:spec: {f:replicas: {}}}}]";
        assert!(!owns_replicas(&live(hpa)));
    }
}
