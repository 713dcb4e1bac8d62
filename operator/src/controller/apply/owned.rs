//! The objects the operator applies beside each pipeline's Deployment (the
//! workers' NetworkPolicy and PodDisruptionBudget): applied when they change
//! and at most every [`REAPPLY`] otherwise, so the usual resync writes nothing.

use std::time::{Duration, Instant};

use k8s_openapi::NamespaceResourceScope;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::{Resource, ResourceExt as _};

use crate::crd::OrderPipeline;

use super::super::*;

/// How often an unchanged object is applied again (it puts back one deleted
/// or edited by hand; the operator does not watch them).
pub(crate) const REAPPLY: Duration = Duration::from_secs(300);

/// The API server refused the write.
pub(crate) enum Refused {
    /// 403: the operator may not write it (its RBAC).
    Forbidden(String),
    /// 400 or 422: the object is invalid.
    Invalid(String),
}

/// Applies `desired` (server-side, forced) unless this process applied the
/// same within [`REAPPLY`].
pub(crate) async fn apply_owned<K>(
    p: &OrderPipeline,
    ctx: &Context,
    desired: &K,
) -> Result<(), Result<Refused, Error>>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::Serialize
        + serde::de::DeserializeOwned,
{
    let digest = super::deployment::digest(&serde_json::to_vec(desired).unwrap_or_default());
    let memo = (key_of(p), K::kind(&()).to_string());
    let fresh = |(d, at): &(u64, Instant)| *d == digest && at.elapsed() < REAPPLY;
    if ctx.owned.lock().unwrap().get(&memo).is_some_and(fresh) {
        return Ok(());
    }
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &p.namespace().unwrap_or_default());
    let params = PatchParams::apply(MANAGER).force();
    match api
        .patch(&desired.name_any(), &params, &Patch::Apply(desired))
        .await
    {
        Ok(_) => {
            ctx.owned
                .lock()
                .unwrap()
                .insert(memo, (digest, Instant::now()));
            Ok(())
        }
        Err(e) => Err(refused(e)),
    }
}

/// Deletes the object `name` of kind `K` (gone already is fine), once per
/// [`REAPPLY`].
pub(crate) async fn delete_owned<K>(
    p: &OrderPipeline,
    ctx: &Context,
    name: &str,
) -> Result<(), Result<Refused, Error>>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned,
{
    let memo = (key_of(p), K::kind(&()).to_string());
    let gone = |(d, at): &(u64, Instant)| *d == 0 && at.elapsed() < REAPPLY;
    if ctx.owned.lock().unwrap().get(&memo).is_some_and(gone) {
        return Ok(());
    }
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &p.namespace().unwrap_or_default());
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 404 => {}
        Err(e) => return Err(refused(e)),
    }
    ctx.owned.lock().unwrap().insert(memo, (0, Instant::now()));
    Ok(())
}

fn refused(e: kube::Error) -> Result<Refused, Error> {
    match e {
        kube::Error::Api(s) if s.code == 403 => Ok(Refused::Forbidden(s.message)),
        kube::Error::Api(s) if s.code == 400 || s.code == 422 => Ok(Refused::Invalid(s.message)),
        e => Err(Error::Kube(e)),
    }
}
