use std::collections::HashMap;
use std::time::Duration;

use kube::{Client, Resource};
use orderpipeline_common::nats::{NatsAuth, NatsConnectError};
use tokio::sync::Mutex;

use crate::crd::{OrderPipeline, OrderPipelineStatus};
use crate::events::{Event, Kind, Recorder};
use crate::metrics::Metrics;

use std::sync::Arc;

use super::jetstream_api::{JetStream, Live};
use super::*;

/// Shared state of the controller.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Metrics,
    pub default_image: String,
    pub resync: Duration,
    /// NATS connections, shared by the pipelines that use the same server and
    /// credentials.
    pub(crate) nats: Mutex<NatsPool>,
    /// Every pipeline the controller watches (its reflector store), for the
    /// check that two pipelines never share NATS objects or subjects.
    pub(crate) pipelines: std::sync::OnceLock<kube::runtime::reflector::Store<OrderPipeline>>,
    /// The worker Deployments as the controller's watch last saw them.
    pub(crate) deployments: std::sync::OnceLock<
        kube::runtime::reflector::Store<k8s_openapi::api::apps::v1::Deployment>,
    >,
    /// What this process last applied to each worker Deployment (by pipeline):
    /// while the live Deployment is still that one, no dry run is needed.
    pub(crate) applied: std::sync::Mutex<HashMap<String, apply::deployment::Applied>>,
    /// The status each pipeline has as this process last wrote or read it, with
    /// the pipeline's uid: the next reconcile starts from it without a read.
    pub(crate) statuses: std::sync::Mutex<HashMap<String, (Option<String>, OrderPipelineStatus)>>,
    /// Set by the reconcile tests: every pipeline's JetStream is this fake.
    pub(crate) jetstream_override: Option<Arc<dyn JetStream>>,
}

impl Context {
    pub fn new(
        client: Client,
        metrics: Metrics,
        default_image: String,
        resync: Duration,
        pod: String,
    ) -> Self {
        let recorder = Recorder::new(client.clone(), MANAGER, pod);
        Self {
            client,
            recorder,
            metrics,
            default_image,
            resync,
            nats: Mutex::new(NatsPool::default()),
            pipelines: std::sync::OnceLock::new(),
            deployments: std::sync::OnceLock::new(),
            applied: Default::default(),
            statuses: Default::default(),
            jetstream_override: None,
        }
    }

    /// `p` as the API server answered a status read or write.
    pub(crate) fn remember_status(&self, key: &str, p: &OrderPipeline) {
        let status = p.status.clone().unwrap_or_default();
        let entry = (p.metadata.uid.clone(), status);
        self.statuses.lock().unwrap().insert(key.to_string(), entry);
    }

    pub(crate) async fn event(&self, p: &OrderPipeline, kind: Kind, note: String) {
        self.event_about(p, kind, note, None).await;
    }

    /// An Event with a related object (e.g. the Deployment a scale changed).
    pub(crate) async fn event_about(
        &self,
        p: &OrderPipeline,
        kind: Kind,
        note: String,
        related: Option<k8s_openapi::api::core::v1::ObjectReference>,
    ) {
        let ev = Event {
            type_: kind.type_(),
            reason: kind.reason().into(),
            note: Some(note),
            action: kind.action().into(),
            secondary: related,
        };
        if let Err(e) = self.recorder.publish(&ev, &p.object_ref(&())).await {
            tracing::warn!(error = %e, "could not publish event");
        }
    }

    /// JetStream on the pipeline's NATS connection (cached while the URL and
    /// the Secrets are unchanged): refused as NotReady when NATS cannot be
    /// reached or refuses the credentials.
    pub(crate) async fn jetstream(
        &self,
        p: &OrderPipeline,
        auth: &NatsAuth,
        conn_key: &str,
    ) -> Result<Arc<dyn JetStream>, NotReady> {
        if let Some(js) = &self.jetstream_override {
            return Ok(js.clone());
        }
        let url = &p.spec.nats.url;
        let client = self
            .nats(&key_of(p), url, auth, conn_key)
            .await
            .map_err(|e| NotReady::new(Cause::of_connect(&e), e.to_string()))?;
        if client.connection_state() != async_nats::connection::State::Connected {
            return Err(NotReady::new(
                Cause::NatsUnreachable,
                format!(
                    "lost the connection to NATS at {url}; reconnecting (check that nats-server runs there)"
                ),
            ));
        }
        let mut js = async_nats::jetstream::new(client);
        js.set_timeout(retry::JETSTREAM_REQUEST);
        Ok(Arc::new(Live(js)))
    }

    /// The connection for `pipeline` to `url` with the credentials whose hash is
    /// `conn_key`: the one already open for that pair, else a new one. A
    /// pipeline whose settings changed lets go of its old connection (closed
    /// when no other pipeline uses it).
    pub(crate) async fn nats(
        &self,
        pipeline: &str,
        url: &str,
        auth: &NatsAuth,
        conn_key: &str,
    ) -> Result<async_nats::Client, NatsConnectError> {
        {
            let mut pool = self.nats.lock().await;
            if pool.users.get(pipeline).is_some_and(|k| k != conn_key) {
                tracing::info!(pipeline, "NATS settings changed; reconnecting");
                pool.release(pipeline);
            }
            if let Some(c) = pool.conns.get(conn_key).cloned() {
                pool.users.insert(pipeline.into(), conn_key.into());
                return Ok(c);
            }
        }
        // Connect without holding the lock, so one pipeline's unreachable NATS
        // does not stall the others' reconciles.
        let c = orderpipeline_common::nats::connect(url, auth, "order-operator").await?;
        let mut pool = self.nats.lock().await;
        // Another pipeline may have connected meanwhile: keep one.
        let c = pool.conns.entry(conn_key.to_string()).or_insert(c).clone();
        pool.users.insert(pipeline.into(), conn_key.into());
        self.metrics.nats_connections.set(pool.conns.len() as i64);
        Ok(c)
    }

    /// Every pipeline the controller knows (for the conflict check).
    pub(crate) fn other_pipelines(&self) -> Vec<Arc<OrderPipeline>> {
        self.pipelines.get().map(|s| s.state()).unwrap_or_default()
    }

    /// The connection `pipeline` uses failed: closed, so that the next
    /// reconcile of any pipeline on it connects anew.
    pub(crate) async fn forget_nats(&self, pipeline: &str) {
        let mut pool = self.nats.lock().await;
        if let Some(k) = pool.users.get(pipeline).cloned() {
            pool.conns.remove(&k);
        }
        self.metrics.nats_connections.set(pool.conns.len() as i64);
    }

    /// `pipeline` is gone: its connection closes unless another pipeline uses
    /// it, and what was applied for it is forgotten.
    pub(crate) async fn release_nats(&self, pipeline: &str) {
        self.applied.lock().unwrap().remove(pipeline);
        self.statuses.lock().unwrap().remove(pipeline);
        let mut pool = self.nats.lock().await;
        pool.release(pipeline);
        self.metrics.nats_connections.set(pool.conns.len() as i64);
    }
}

/// NATS connections by (URL, credentials) and which pipeline uses which: the
/// operator holds one connection per distinct server and credentials, not one
/// per pipeline.
#[derive(Default)]
pub(crate) struct NatsPool {
    conns: HashMap<String, async_nats::Client>,
    users: HashMap<String, String>,
}

impl NatsPool {
    fn release(&mut self, pipeline: &str) {
        if let Some(k) = self.users.remove(pipeline)
            && !self.users.values().any(|v| *v == k)
        {
            self.conns.remove(&k);
        }
    }
}
