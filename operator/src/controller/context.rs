use std::collections::HashMap;
use std::time::Duration;

use kube::{Client, Resource};
use orderpipeline_common::nats::{NatsAuth, NatsConnectError};
use tokio::sync::Mutex;

use crate::crd::OrderPipeline;
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
    /// NATS connections keyed by `namespace/name`, with the hash of the auth they used.
    pub(crate) nats: Mutex<HashMap<String, (String, async_nats::Client)>>,
    /// Every pipeline the controller watches (its reflector store), for the
    /// check that two pipelines never share NATS objects or subjects.
    pub(crate) pipelines: std::sync::OnceLock<kube::runtime::reflector::Store<OrderPipeline>>,
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
            nats: Mutex::new(HashMap::new()),
            pipelines: std::sync::OnceLock::new(),
            jetstream_override: None,
        }
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
        auth_hash: &str,
    ) -> Result<Arc<dyn JetStream>, NotReady> {
        if let Some(js) = &self.jetstream_override {
            return Ok(js.clone());
        }
        let url = &p.spec.nats.url;
        let client = self
            .nats(&key_of(p), url, auth, auth_hash)
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

    /// The pipeline's own NATS connection; reconnects when its auth changed.
    pub(crate) async fn nats(
        &self,
        key: &str,
        url: &str,
        auth: &NatsAuth,
        auth_hash: &str,
    ) -> Result<async_nats::Client, NatsConnectError> {
        {
            let mut cache = self.nats.lock().await;
            if let Some((hash, c)) = cache.get(key)
                && hash == auth_hash
            {
                return Ok(c.clone());
            }
            if cache.remove(key).is_some() {
                tracing::info!(pipeline = key, "NATS settings changed; reconnecting");
            }
        }
        // Connect without holding the lock, so one pipeline's unreachable NATS
        // does not stall the others' reconciles (the controller never runs two
        // reconciles of the same pipeline at once).
        let c = orderpipeline_common::nats::connect(url, auth, &format!("order-operator {key}"))
            .await?;
        self.nats
            .lock()
            .await
            .insert(key.to_string(), (auth_hash.to_string(), c.clone()));
        Ok(c)
    }

    /// Every pipeline the controller knows (for the conflict check).
    pub(crate) fn other_pipelines(&self) -> Vec<Arc<OrderPipeline>> {
        self.pipelines.get().map(|s| s.state()).unwrap_or_default()
    }

    pub(crate) async fn forget_nats(&self, key: &str) {
        self.nats.lock().await.remove(key);
    }
}
