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
    /// This cluster's identity, the first part of the Idempotency-Key scope
    /// pinned in the input streams the operator creates.
    pub cluster_id: String,
    /// NATS server memory per input-stream subject, for the capacity estimate.
    pub nats_bytes_per_subject: u64,
    /// `--stall-window` (see [`super::stall`]).
    pub stall_window: Duration,
    /// Whether credentials may travel over plain `nats://` (see
    /// `render::credentials_in_clear`).
    pub allow_plaintext_credentials: bool,
    /// The images and NATS hosts pipelines may use.
    pub allowlists: crate::render::Allowlists,
    /// The namespace of the NATS account Secrets (`spec.nats.accountRef`).
    pub accounts_namespace: Option<String>,
    /// How long minted NATS identities are valid (renewed at half of it).
    pub identity_ttl: Duration,
    /// Whether each pipeline's workers get a NetworkPolicy (see [`crate::netpol`]).
    pub worker_network_policy: bool,
    /// What this process last applied beside each pipeline's Deployment (by
    /// pipeline and kind: a digest, 0 for a deletion), and when.
    pub(crate) owned: std::sync::Mutex<HashMap<(String, String), (u64, std::time::Instant)>>,
    /// NATS connections, shared by the pipelines that use the same server and
    /// credentials.
    pub(crate) nats: Mutex<NatsPool>,
    /// Every pipeline the controller watches (its reflector store), for the
    /// check that two pipelines never share NATS objects or subjects.
    pub(crate) pipelines: std::sync::OnceLock<kube::runtime::reflector::Store<OrderPipeline>>,
    /// Their footprints for that check, rendered once per spec.
    pub(crate) footprints: crate::render::Footprints,
    /// Where a removed stream or consumer asks for its pipeline's reconcile.
    pub(crate) removals: std::sync::OnceLock<
        tokio::sync::mpsc::UnboundedSender<kube::runtime::reflector::ObjectRef<OrderPipeline>>,
    >,
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
    /// Per pipeline: its last consumer read and the deliveries the server ended
    /// because their input was removed (see [`retention`]).
    pub(crate) retention: Arc<std::sync::Mutex<HashMap<String, Track>>>,
    /// Per pipeline: the consumer's deliveries and ack floor, and the first
    /// fresh look that saw them there (see [`Context::still_since`]).
    pub(crate) cursors: std::sync::Mutex<HashMap<String, (Cursor, Time)>>,
    /// How long a reconcile may reuse the last full JetStream pass (see
    /// [`REUSE_FIGURES`]; zero: never).
    pub(crate) reuse_figures: Duration,
    /// Set by the reconcile tests: every pipeline's JetStream is this fake.
    pub(crate) jetstream_override: Option<Arc<dyn JetStream>>,
}

/// What the operator remembers of one pipeline between reconciles to count its
/// removed, unprocessed inputs, and its last full JetStream pass.
#[derive(Clone, Default)]
pub(crate) struct Track {
    last: Option<retention::Observation>,
    /// `MSG_TERMINATED` advisories for a removed input, not yet in the status.
    terminated: u64,
    /// Removal advisories for the pipeline so far: a pass that started before
    /// one is not reused.
    epoch: u64,
    recent: Option<Pass>,
}

/// A full JetStream pass of a reconcile (see `controller::jetstream_step`).
#[derive(Clone)]
pub(crate) struct Pass {
    at: std::time::Instant,
    uid: Option<String>,
    generation: Option<i64>,
    connection: String,
    epoch: u64,
    pub(crate) figures: Figures,
    /// The input stream's maxAge after the hold.
    pub(crate) max_age: Duration,
}

/// A consumer's deliveries and ack floor, as its status shows them.
pub(crate) type Cursor = (i64, i64);

/// How long a full JetStream pass may be reused (at most a third of the resync).
pub(crate) const REUSE_FIGURES: Duration = Duration::from_secs(10);

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
            cluster_id: "cluster".into(),
            nats_bytes_per_subject: 400,
            stall_window: Duration::from_secs(300),
            allow_plaintext_credentials: false,
            allowlists: Default::default(),
            accounts_namespace: None,
            identity_ttl: Duration::from_secs(6 * 3600),
            worker_network_policy: false,
            owned: Default::default(),
            nats: Mutex::new(NatsPool::default()),
            pipelines: std::sync::OnceLock::new(),
            footprints: Default::default(),
            deployments: std::sync::OnceLock::new(),
            removals: std::sync::OnceLock::new(),
            applied: Default::default(),
            statuses: Default::default(),
            cursors: Default::default(),
            retention: Default::default(),
            reuse_figures: REUSE_FIGURES.min(resync / 3),
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
        let scope = account_scope(&c).await;
        let mut pool = self.nats.lock().await;
        if let Some(scope) = scope {
            pool.scopes.insert(conn_key.to_string(), scope);
        }
        // Another pipeline may have connected meanwhile: keep one.
        if !pool.conns.contains_key(conn_key)
            && let (Some(store), Some(tx)) = (self.pipelines.get(), self.removals.get())
        {
            let l =
                listen_for_removals(c.clone(), store.clone(), tx.clone(), self.retention.clone());
            pool.listeners.insert(conn_key.to_string(), l);
        }
        let c = pool.conns.entry(conn_key.to_string()).or_insert(c).clone();
        pool.users.insert(pipeline.into(), conn_key.into());
        self.metrics.nats_connections.set(pool.conns.len() as i64);
        Ok(c)
    }

    /// The inputs of pipeline `key` removed unprocessed since its last read:
    /// the advisories received meanwhile and the never-delivered ones `now`
    /// shows gone. `now` becomes the baseline of the next call.
    pub(crate) fn removed_since_last_read(
        &self,
        key: &str,
        now: &retention::Observation,
    ) -> retention::Removed {
        let mut all = self.retention.lock().unwrap();
        let t = all.entry(key.to_string()).or_default();
        let mut removed = match &t.last {
            Some(prev) => retention::removed_undelivered(prev, now),
            None => retention::Removed {
                count: 0,
                exact: true,
            },
        };
        removed.count += std::mem::take(&mut t.terminated);
        t.last = Some(*now);
        removed
    }

    /// The last full JetStream pass of `p`, if a reconcile now may reuse it:
    /// recent, for the same object, spec and connection, and no removal
    /// advisory for it since it started.
    pub(crate) fn recent_pass(&self, p: &OrderPipeline, connection: &str) -> Option<Pass> {
        let all = self.retention.lock().unwrap();
        let t = all.get(&key_of(p))?;
        let pass = t.recent.as_ref()?;
        let fresh = pass.at.elapsed() < self.reuse_figures
            && pass.uid == p.metadata.uid
            && pass.generation == p.metadata.generation
            && pass.connection == connection
            && pass.epoch == t.epoch;
        fresh.then(|| pass.clone())
    }

    /// A removal advisory for `pipeline` (as the listener notes it).
    #[cfg(test)]
    pub(crate) fn removal_seen(&self, pipeline: &str) {
        note_removal(&self.retention, pipeline.to_string());
    }

    /// The removal advisories seen for `pipeline` so far.
    pub(crate) fn removal_epoch(&self, pipeline: &str) -> u64 {
        self.retention
            .lock()
            .unwrap()
            .get(pipeline)
            .map_or(0, |t| t.epoch)
    }

    /// Remembers a full JetStream pass that started at removal `epoch`.
    pub(crate) fn remember_pass(
        &self,
        p: &OrderPipeline,
        connection: &str,
        epoch: u64,
        figures: &Figures,
        max_age: Duration,
    ) {
        if self.reuse_figures.is_zero() {
            return;
        }
        let mut all = self.retention.lock().unwrap();
        all.entry(key_of(p)).or_default().recent = Some(Pass {
            at: std::time::Instant::now(),
            uid: p.metadata.uid.clone(),
            generation: p.metadata.generation,
            connection: connection.to_string(),
            epoch,
            figures: figures.clone(),
            max_age,
        });
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
            pool.close(&k);
        }
        self.metrics.nats_connections.set(pool.conns.len() as i64);
    }

    /// The time of the first look of this process that saw the consumer's
    /// deliveries and ack floor where they are now (`now` when they moved):
    /// the consumer has not moved since at least then.
    pub(crate) fn still_since(&self, pipeline: &str, at: Cursor, now: &Time) -> Time {
        let mut cursors = self.cursors.lock().unwrap();
        match cursors.get(pipeline) {
            Some((seen, since)) if *seen == at => since.clone(),
            _ => {
                cursors.insert(pipeline.to_string(), (at, now.clone()));
                now.clone()
            }
        }
    }

    /// `pipeline` is gone: its connection closes unless another pipeline uses
    /// it, and what was applied for it is forgotten.
    pub(crate) async fn release_nats(&self, pipeline: &str) {
        self.applied.lock().unwrap().remove(pipeline);
        self.owned.lock().unwrap().retain(|(k, _), _| k != pipeline);
        self.statuses.lock().unwrap().remove(pipeline);
        self.retention.lock().unwrap().remove(pipeline);
        self.cursors.lock().unwrap().remove(pipeline);
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
    /// Per connection, the task that listens for removed streams and consumers.
    listeners: HashMap<String, tokio::task::AbortHandle>,
    /// Per connection, the NATS account it is in (see [`account_scope`]).
    scopes: HashMap<String, String>,
}

impl NatsPool {
    fn release(&mut self, pipeline: &str) {
        if let Some(k) = self.users.remove(pipeline)
            && !self.users.values().any(|v| *v == k)
        {
            self.close(&k);
            self.scopes.remove(&k);
        }
    }

    /// The NATS account (server and account) of the connection pipeline `p`
    /// last used, if its server said (the conflict check compares accounts).
    /// Kept while a failed connection is reopened.
    pub(crate) fn scope_of(&self, p: &OrderPipeline) -> Option<String> {
        self.scopes.get(self.users.get(&key_of(p))?).cloned()
    }

    fn close(&mut self, conn_key: &str) {
        self.conns.remove(conn_key);
        if let Some(l) = self.listeners.remove(conn_key) {
            l.abort();
        }
        // Its TLS files (none without TLS): a deleted pipeline leaves nothing behind.
        let _ = std::fs::remove_dir_all(dereference::tls_dir(conn_key));
    }
}

/// The subjects on which JetStream announces a deleted stream or consumer.
pub(crate) const REMOVAL_ADVISORIES: [&str; 2] = [
    "$JS.EVENT.ADVISORY.STREAM.DELETED.*",
    "$JS.EVENT.ADVISORY.CONSUMER.DELETED.*.*",
];

/// The pipelines a removal advisory on `subject` concerns: those whose input
/// or dead-letter stream or bucket (or consumer) it names. Not the ones being
/// deleted (their cleanup removes these objects itself).
pub(crate) fn removed_for(
    subject: &str,
    pipelines: &[Arc<OrderPipeline>],
) -> Vec<kube::runtime::reflector::ObjectRef<OrderPipeline>> {
    let (stream, consumer) =
        if let Some(s) = subject.strip_prefix("$JS.EVENT.ADVISORY.STREAM.DELETED.") {
            (s, None)
        } else if let Some(rest) = subject.strip_prefix("$JS.EVENT.ADVISORY.CONSUMER.DELETED.") {
            match rest.split_once('.') {
                Some((s, c)) => (s, Some(c)),
                None => return Vec::new(),
            }
        } else {
            return Vec::new();
        };
    pipelines
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| {
            let s = &p.spec;
            match consumer {
                Some(c) => s.stream.name == stream && s.consumer.name == c,
                None => {
                    s.stream.name == stream
                        || s.dlq_stream() == stream
                        || stream.strip_prefix("KV_") == Some(s.state_bucket().as_str())
                }
            }
        })
        .map(|p| kube::runtime::reflector::ObjectRef::from_obj(p.as_ref()))
        .collect()
}

/// The pipelines whose input a `MSG_TERMINATED` advisory on `subject` says was
/// removed from the stream while delivered and unacknowledged (not the ones
/// being deleted).
pub(crate) fn terminated_for(
    subject: &str,
    payload: &[u8],
    pipelines: &[Arc<OrderPipeline>],
) -> Vec<kube::runtime::reflector::ObjectRef<OrderPipeline>> {
    let Some(rest) = subject.strip_prefix("$JS.EVENT.ADVISORY.CONSUMER.MSG_TERMINATED.") else {
        return Vec::new();
    };
    let Some((stream, consumer)) = rest.split_once('.') else {
        return Vec::new();
    };
    let reason = serde_json::from_slice::<serde_json::Value>(payload)
        .ok()
        .and_then(|v| v.get("reason")?.as_str().map(str::to_string))
        .unwrap_or_default();
    if !retention::TERMINATED_BY_REMOVAL.contains(&reason.as_str()) {
        return Vec::new();
    }
    pipelines
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| p.spec.stream.name == stream && p.spec.consumer.name == consumer)
        .map(|p| kube::runtime::reflector::ObjectRef::from_obj(p.as_ref()))
        .collect()
}

/// Which NATS account a connection is in, as `<server>/<account>`: the server
/// by its cluster name (else its name), the account as the server's user-info
/// service (`$SYS.REQ.USER.INFO`, offered to every account) says. `None` when
/// the server does not answer it (no system account, or no permission): the
/// conflict check then compares URLs.
async fn account_scope(c: &async_nats::Client) -> Option<String> {
    let info = c.server_info();
    let server = info
        .cluster
        .clone()
        .filter(|s| !s.is_empty())
        .unwrap_or(info.server_name.clone());
    let ask = c.request("$SYS.REQ.USER.INFO", Vec::new().into());
    let reply = tokio::time::timeout(Duration::from_secs(2), ask)
        .await
        .ok()?
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&reply.payload).ok()?;
    let account = v["data"]["account"].as_str()?;
    Some(format!("{server}/{account}"))
}

/// A removal advisory for `pipeline`: its next reconcile makes a full pass.
fn note_removal(retention: &std::sync::Mutex<HashMap<String, Track>>, pipeline: String) {
    retention.lock().unwrap().entry(pipeline).or_default().epoch += 1;
}

/// Listens on `client` for removed streams and consumers and asks for a
/// reconcile of the pipelines they belonged to: drift is repaired at once, not
/// at the next resync.
fn listen_for_removals(
    client: async_nats::Client,
    pipelines: kube::runtime::reflector::Store<OrderPipeline>,
    triggers: tokio::sync::mpsc::UnboundedSender<
        kube::runtime::reflector::ObjectRef<OrderPipeline>,
    >,
    retention: Arc<std::sync::Mutex<HashMap<String, Track>>>,
) -> tokio::task::AbortHandle {
    use futures::StreamExt as _;
    tokio::spawn(async move {
        let mut subs = Vec::new();
        for subject in REMOVAL_ADVISORIES.into_iter().chain([retention::TERMINATED_ADVISORIES]) {
            match client.subscribe(subject).await {
                Ok(s) => subs.push(s),
                Err(e) => {
                    // Not fatal: the resync still finds what is missing.
                    tracing::warn!(error = %e, subject, "cannot listen for removed JetStream objects");
                    return;
                }
            }
        }
        let mut all = futures::stream::select_all(subs);
        while let Some(m) = all.next().await {
            let lost = terminated_for(m.subject.as_str(), &m.payload, &pipelines.state());
            for p in &lost {
                tracing::warn!(pipeline = %p, subject = %m.subject, "an input was removed from the stream before it was processed");
                let key = key_of_ref(p);
                retention.lock().unwrap().entry(key).or_default().terminated += 1;
            }
            for p in lost.into_iter().chain(removed_for(m.subject.as_str(), &pipelines.state())) {
                tracing::info!(pipeline = %p, subject = %m.subject, "a JetStream object of the pipeline was removed; reconciling");
                note_removal(&retention, key_of_ref(&p));
                if triggers.send(p).is_err() {
                    return;
                }
            }
        }
    })
    .abort_handle()
}

#[cfg(test)]
mod removal_tests {
    use super::*;

    /// A deleted pipeline's TLS files go with the last pipeline on their
    /// connection (issue 25: they stayed in the operator's temp directory).
    #[test]
    fn a_released_connection_takes_its_tls_files_with_it() {
        let key = format!("tls://n:4222|{}", rand::random::<u64>());
        let dir = dereference::tls_dir(&key);
        let mut auth = NatsAuth::default();
        dereference::write_tls_files(&dir, &[("ca.crt".into(), "pem".into())], &mut auth).unwrap();
        assert_eq!(auth.tls_ca.as_deref(), Some(dir.join("ca.crt").as_path()));
        let mut pool = NatsPool::default();
        pool.users.insert("demo/a".into(), key.clone());
        pool.users.insert("demo/b".into(), key.clone());
        pool.release("demo/a");
        assert!(
            dir.join("ca.crt").exists(),
            "demo/b still uses the connection"
        );
        pool.release("demo/b");
        assert!(!dir.exists(), "{} left behind", dir.display());
    }

    fn pipeline(name: &str, stream: &str) -> Arc<OrderPipeline> {
        let mut p: OrderPipeline = serde_yaml::from_str(include_str!(
            "../../../manifests/samples/orderpipeline.yaml"
        ))
        .unwrap();
        p.metadata.name = Some(name.into());
        p.metadata.namespace = Some("demo".into());
        p.spec.on_own_stream(stream);
        Arc::new(p)
    }

    #[test]
    fn a_removal_advisory_names_the_pipelines_whose_object_it_was() {
        let (orders, shop) = (pipeline("orders", "ORDERS"), pipeline("shop", "SHOP"));
        let mut gone = (*pipeline("gone", "GONE")).clone();
        gone.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::now(),
            ));
        let all = [orders.clone(), shop.clone(), Arc::new(gone)];
        let names = |subject: &str| {
            removed_for(subject, &all)
                .into_iter()
                .map(|r| r.name)
                .collect::<Vec<_>>()
        };
        let plan = crate::render::plan(&shop).unwrap();
        let t = &plan.topology;
        assert_eq!(names("$JS.EVENT.ADVISORY.STREAM.DELETED.SHOP"), ["shop"]);
        let dlq = format!("$JS.EVENT.ADVISORY.STREAM.DELETED.{}", t.dlq_stream);
        assert_eq!(names(&dlq), ["shop"]);
        let kv = format!("$JS.EVENT.ADVISORY.STREAM.DELETED.KV_{}", t.bucket);
        assert_eq!(names(&kv), ["shop"]);
        let consumer = format!("$JS.EVENT.ADVISORY.CONSUMER.DELETED.SHOP.{}", t.consumer);
        assert_eq!(names(&consumer), ["shop"]);
        // Another stream's consumer of the same name, an unknown stream, a
        // pipeline being deleted, another advisory: nothing.
        assert!(names("$JS.EVENT.ADVISORY.CONSUMER.DELETED.OTHER.x").is_empty());
        assert!(names("$JS.EVENT.ADVISORY.STREAM.DELETED.NOPE").is_empty());
        assert!(names("$JS.EVENT.ADVISORY.STREAM.DELETED.GONE").is_empty());
        assert!(names("$JS.EVENT.ADVISORY.STREAM.CREATED.SHOP").is_empty());
    }

    #[test]
    fn a_terminated_delivery_counts_only_when_its_input_was_removed() {
        let shop = pipeline("shop", "SHOP");
        let all = [shop.clone(), pipeline("orders", "ORDERS")];
        let consumer = crate::render::plan(&shop).unwrap().topology.consumer;
        let subject = format!("$JS.EVENT.ADVISORY.CONSUMER.MSG_TERMINATED.SHOP.{consumer}");
        let names = |subject: &str, reason: &str| {
            let payload = serde_json::json!({"stream_seq": 7, "reason": reason}).to_string();
            terminated_for(subject, payload.as_bytes(), &all)
                .into_iter()
                .map(|r| r.name)
                .collect::<Vec<_>>()
        };
        for reason in retention::TERMINATED_BY_REMOVAL {
            assert_eq!(names(&subject, reason), ["shop"], "{reason}");
        }
        // A worker's own term (a reason of its own), another consumer, garbage.
        assert!(names(&subject, "poison").is_empty());
        let other = "$JS.EVENT.ADVISORY.CONSUMER.MSG_TERMINATED.SHOP.other";
        assert!(names(other, retention::TERMINATED_BY_REMOVAL[0]).is_empty());
        assert!(terminated_for(&subject, b"not json", &all).is_empty());
    }
}
