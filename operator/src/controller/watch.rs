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

/// What a worker Deployment event must change to trigger a reconcile: what the
/// reconcile reads of it (the object, its generation, its labels and
/// annotations, the replica counts of its status). Not the controller's own
/// bookkeeping (the revision annotation, condition timestamps).
pub(crate) fn deployment_trigger(d: &Deployment) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    d.metadata.uid.hash(&mut h);
    d.metadata.generation.hash(&mut h);
    d.metadata.labels.hash(&mut h);
    for (k, v) in d.metadata.annotations.iter().flatten() {
        if !k.starts_with("deployment.kubernetes.io/") {
            (k, v).hash(&mut h);
        }
    }
    d.status
        .as_ref()
        .map(|s| {
            (
                s.observed_generation,
                s.replicas,
                s.updated_replicas,
                s.ready_replicas,
                s.available_replicas,
            )
        })
        .hash(&mut h);
    h.finish()
}

/// The worker Deployments' events that change what a reconcile reads (each
/// new object, each change of [`deployment_trigger`], every deletion).
fn deployment_triggers(
    events: super::merge::Watch<Deployment>,
    cache: kube::runtime::reflector::store::Writer<Deployment>,
) -> impl futures::Stream<Item = Result<Deployment, watcher::Error>> + Send + 'static {
    let mut seen: std::collections::HashMap<ObjectRef<Deployment>, u64> = Default::default();
    // The objects of a re-list: the others are gone (forgotten at its end).
    let mut listed: std::collections::HashSet<ObjectRef<Deployment>> = Default::default();
    events.reflect(cache).filter_map(move |e| {
        let mut changed = |d: &Deployment| {
            let h = deployment_trigger(d);
            seen.insert(ObjectRef::from_obj(d), h) != Some(h)
        };
        let out = match e {
            Ok(watcher::Event::Apply(d)) => changed(&d).then_some(Ok(d)),
            Ok(watcher::Event::InitApply(d)) => {
                listed.insert(ObjectRef::from_obj(&d));
                changed(&d).then_some(Ok(d))
            }
            Ok(watcher::Event::Delete(d)) => {
                seen.remove(&ObjectRef::from_obj(&d));
                Some(Ok(d))
            }
            Ok(watcher::Event::Init) => {
                listed.clear();
                None
            }
            Ok(watcher::Event::InitDone) => {
                seen.retain(|k, _| listed.contains(k));
                listed.clear();
                None
            }
            Err(e) => Some(Err(e)),
        };
        std::future::ready(out)
    })
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

/// The watch of `K` (with `cfg`) in each of `namespaces` (none: all), as one
/// stream (see [`super::merge`]); `trim` drops what the cache never reads,
/// before anything keeps the object.
fn watch_in<K>(
    client: &kube::Client,
    namespaces: &[String],
    cfg: &watcher::Config,
    trim: fn(&mut K),
) -> super::merge::Watch<K>
where
    K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + 'static,
{
    let one = |api: Api<K>| {
        watcher(api, cfg.clone())
            .default_backoff()
            .modify(trim)
            .boxed()
    };
    match namespaces {
        [] => one(Api::all(client.clone())),
        [ns] => one(Api::namespaced(client.clone(), ns)),
        many => super::merge::merged(
            many.iter()
                .map(|ns| one(Api::namespaced(client.clone(), ns)))
                .collect(),
        ),
    }
}

/// Only our own field manager's entries are ever read (who owns
/// spec.replicas); the rest would only take memory in the cache.
fn trim_deployment(d: &mut Deployment) {
    if let Some(m) = d.metadata.managed_fields.as_mut() {
        m.retain(|f| f.manager.as_deref() == Some(MANAGER));
    }
}

/// The Secrets' changes (metadata only, so no Secret's data is ever cached)
/// in each of `namespaces` (none: all).
fn secret_changes(
    client: &kube::Client,
    namespaces: &[String],
) -> impl futures::Stream<Item = Result<PartialObjectMeta<Secret>, watcher::Error>> + Send + 'static
{
    let apis: Vec<Api<PartialObjectMeta<Secret>>> = match namespaces {
        [] => vec![Api::all(client.clone())],
        many => many
            .iter()
            .map(|ns| Api::namespaced(client.clone(), ns))
            .collect(),
    };
    futures::stream::select_all(apis.into_iter().map(|api| {
        watcher(api, watcher::Config::default())
            .touched_objects()
            .boxed()
    }))
}

/// What a channel receives, as a stream.
fn received<T>(rx: tokio::sync::mpsc::UnboundedReceiver<T>) -> impl futures::Stream<Item = T> {
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|p| (p, rx)) })
}

/// Runs the controller until `shutdown` resolves, for the pipelines of
/// `namespaces` (none: every namespace).
pub async fn run(
    ctx: Arc<Context>,
    namespaces: Vec<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    // Only changes that need a reconcile trigger one: not the operator's own
    // status writes (under traffic every write changes the figures, which would
    // reconcile back to back instead of on the jittered resync).
    let (reader, writer) = kube::runtime::reflector::store();
    let _ = ctx.pipelines.set(reader.clone());
    // The worker Deployments as the watch last saw them: a reconcile reads its
    // Deployment there (see `dereference::live_deployment`).
    let (deployments_seen, deployment_cache) = kube::runtime::reflector::store();
    let _ = ctx.deployments.set(deployments_seen);
    // Streams and consumers removed behind the operator's back (JetStream's
    // advisories, on each NATS connection): their pipeline is reconciled now.
    let (removals, removed) = tokio::sync::mpsc::unbounded_channel();
    let _ = ctx.removals.set(removals);
    let pipelines = watch_in(&client, &namespaces, &watcher::Config::default(), |_| {});
    let trigger = pipelines
        .reflect(writer)
        .applied_objects()
        .predicate_filter(reconcile_trigger, Default::default());
    let ours = watcher::Config::default().labels("app.kubernetes.io/managed-by=order-operator");
    let deployments = watch_in(&client, &namespaces, &ours, trim_deployment);
    let controller = Controller::for_stream(trigger, reader);
    let store = controller.store();
    controller
        // Deployments: only the changes a reconcile would see (a new Pod's
        // status moves the Deployment's several times a second while it starts).
        .owns_stream(deployment_triggers(deployments, deployment_cache))
        .reconcile_on(received(removed))
        // Secrets: metadata only (a changed Secret gets a new resourceVersion,
        // which is all a trigger needs), so no Secret's data is ever cached;
        // reconcile GETs the few a pipeline references.
        .watches_stream(secret_changes(&client, &namespaces), move |s| {
            pipelines_using(&s, &store)
        })
        // A Deployment's status moves in several writes while its Pods start
        // (replicas, updated, ready, available): a short trailing debounce makes
        // that one reconcile instead of one each.
        .with_config(kube::runtime::controller::Config::default().debounce(DEBOUNCE))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|r| async move { log_event(r) })
        .await;
}

/// A reconcile's result as the controller reports it (errors are counted and
/// requeued by `error_policy`; here they are only logged).
fn log_event<T, E: std::fmt::Display>(r: Result<T, E>) {
    if let Err(e) = r {
        tracing::debug!(error = %e, "controller event");
    }
}

#[cfg(test)]
mod trigger_tests {
    use super::*;

    fn deployment(available: i32) -> Deployment {
        serde_yaml::from_str(&format!(
            "metadata: {{name: orders-workers, uid: u1, generation: 2,
  labels: {{app.kubernetes.io/managed-by: order-operator}}}}
status: {{observedGeneration: 2, replicas: 1, updatedReplicas: 1, availableReplicas: {available},
  conditions: [{{type: Available, status: 'True', lastUpdateTime: '2026-11-28T10:00:00Z'}}]}}"
        ))
        .unwrap()
    }

    #[test]
    fn a_deployment_triggers_a_reconcile_only_for_what_the_reconcile_reads() {
        let d = deployment(0);
        let mut bookkeeping = d.clone();
        bookkeeping.metadata.annotations = Some(
            [(
                "deployment.kubernetes.io/revision".to_string(),
                "1".to_string(),
            )]
            .into(),
        );
        let s = bookkeeping.status.as_mut().unwrap();
        s.conditions.as_mut().unwrap()[0].last_update_time = None;
        assert_eq!(deployment_trigger(&d), deployment_trigger(&bookkeeping));
        assert_ne!(deployment_trigger(&d), deployment_trigger(&deployment(1)));
        let mut edited = d.clone();
        edited.metadata.generation = Some(3);
        assert_ne!(deployment_trigger(&d), deployment_trigger(&edited));
        let mut labelled = d.clone();
        labelled.metadata.labels = None;
        assert_ne!(deployment_trigger(&d), deployment_trigger(&labelled));
    }
}
