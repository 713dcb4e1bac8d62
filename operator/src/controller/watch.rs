use std::sync::Arc;

use futures::StreamExt as _;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt as _;
use kube::api::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::Controller;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{WatchStreamExt as _, watcher};

use crate::crd::OrderPipeline;

use super::*;

/// What a pipeline event must change to trigger a reconcile: the spec (its
/// generation), the finalizers, the deletion, or the skip-cleanup annotation.
pub(crate) fn reconcile_trigger(p: &OrderPipeline) -> Option<u64> {
    use std::hash::{Hash as _, Hasher as _};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    p.metadata.generation.hash(&mut h);
    p.metadata.finalizers.hash(&mut h);
    p.metadata.deletion_timestamp.is_some().hash(&mut h);
    p.annotations().get(SKIP_CLEANUP_ANNOTATION).hash(&mut h);
    Some(h.finish())
}

/// Maps a Secret to the pipelines in its namespace that reference it.
pub(crate) fn pipelines_using(
    secret: &PartialObjectMeta<Secret>,
    store: &kube::runtime::reflector::Store<OrderPipeline>,
) -> Vec<ObjectRef<OrderPipeline>> {
    let ns = secret.namespace();
    let name = secret.name_any();
    store
        .state()
        .iter()
        .filter(|p| p.namespace() == ns)
        .filter(|p| {
            p.spec
                .nats
                .credentials_secret_ref
                .as_ref()
                .is_some_and(|r| r.name == name)
                || p.spec
                    .nats
                    .tls_secret_ref
                    .as_ref()
                    .is_some_and(|r| r.name == name)
        })
        .map(|p| ObjectRef::from_obj(p.as_ref()))
        .collect()
}

/// How long the controller waits for more changes to an object before it
/// reconciles it.
const DEBOUNCE: std::time::Duration = std::time::Duration::from_millis(500);

/// Runs the controller until `shutdown` resolves.
pub async fn run(
    ctx: Arc<Context>,
    namespace: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    // Secrets through a metadata-only Api: see the watch below.
    let (pipelines, deployments, secrets): (
        Api<OrderPipeline>,
        Api<Deployment>,
        Api<PartialObjectMeta<Secret>>,
    ) = match &namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
        ),
        None => (
            Api::all(client.clone()),
            Api::all(client.clone()),
            Api::all(client.clone()),
        ),
    };
    // Only changes that need a reconcile trigger one: not the operator's own
    // status writes (under traffic every write changes the figures, which would
    // reconcile back to back instead of on the jittered resync).
    let (reader, writer) = kube::runtime::reflector::store();
    let _ = ctx.pipelines.set(reader.clone());
    let trigger = watcher(pipelines, watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .applied_objects()
        .predicate_filter(reconcile_trigger, Default::default());
    let controller = Controller::for_stream(trigger, reader);
    let store = controller.store();
    controller
        .owns(
            deployments,
            watcher::Config::default().labels("app.kubernetes.io/managed-by=order-operator"),
        )
        // Secrets: metadata only (a changed Secret gets a new resourceVersion,
        // which is all a trigger needs), so no Secret's data is ever cached;
        // reconcile GETs the few a pipeline references.
        .watches(secrets, watcher::Config::default(), move |s| {
            pipelines_using(&s, &store)
        })
        // A Deployment's status moves in several writes while its Pods start
        // (replicas, updated, ready, available): a short trailing debounce makes
        // that one reconcile instead of one each.
        .with_config(kube::runtime::controller::Config::default().debounce(DEBOUNCE))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "controller event");
            }
        })
        .await;
}
