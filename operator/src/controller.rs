//! The reconciler: dereference (Secrets, NATS) -> plan (pure) -> apply
//! (JetStream objects, Deployment) -> status. Errors become conditions and
//! Events; only unexpected failures reach `error_policy`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use futures::StreamExt as _;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Client, Resource, ResourceExt as _};
use orderpipeline_common::nats::{NatsAuth, NatsConnectError};
use orderpipeline_common::topology::{OWNER_METADATA_KEY, Topology};
use tokio::sync::Mutex;

use crate::conditions::{self, reasons, types};
use crate::crd::{
    DeletionPolicy, ManagementPolicy, OrderPipeline, OrderPipelineStatus, ReplicaMode,
};
use crate::drift;
use crate::events::{Event, EventType, Recorder};
use crate::metrics::Metrics;
use crate::render::{self, Credentials, SecretsView};
use crate::scaling;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use orderpipeline_common::duration::parse_duration;

pub const MANAGER: &str = "order-operator";
pub const FINALIZER: &str = "orderpipeline.dev/cleanup";
/// Annotation that lets a deletion finish without deleting JetStream objects.
pub const SKIP_CLEANUP_ANNOTATION: &str = "orderpipeline.dev/skip-cleanup";
/// How long a `Delete` cleanup keeps retrying an unreachable NATS before giving up.
pub const CLEANUP_GIVE_UP: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API error: {0}")]
    Kube(#[source] kube::Error),
    #[error("finalizer error: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("NATS: {0}")]
    Nats(String),
}

impl Error {
    /// A short label for the failure metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kubernetes",
            Error::Finalizer(_) => "finalizer",
            Error::Nats(_) => "nats",
        }
    }
}

/// Shared state of the controller.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Metrics,
    pub default_image: String,
    pub resync: Duration,
    /// NATS connections keyed by `namespace/name`, with the hash of the auth they used.
    nats: Mutex<HashMap<String, (String, async_nats::Client)>>,
    /// Every pipeline the controller watches (its reflector store), for the
    /// check that two pipelines never share NATS objects or subjects.
    pipelines: std::sync::OnceLock<kube::runtime::reflector::Store<OrderPipeline>>,
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
        }
    }

    async fn event(
        &self,
        p: &OrderPipeline,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        self.event_about(p, type_, reason, action, note, None).await;
    }

    /// An Event with a related object (e.g. the Deployment a scale changed).
    async fn event_about(
        &self,
        p: &OrderPipeline,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
        related: Option<k8s_openapi::api::core::v1::ObjectReference>,
    ) {
        let ev = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: related,
        };
        if let Err(e) = self.recorder.publish(&ev, &p.object_ref(&())).await {
            tracing::warn!(error = %e, "could not publish event");
        }
    }

    /// The pipeline's own NATS connection; reconnects when its auth changed.
    async fn nats(
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

    async fn forget_nats(&self, key: &str) {
        self.nats.lock().await.remove(key);
    }
}

fn key_of(p: &OrderPipeline) -> String {
    format!("{}/{}", p.namespace().unwrap_or_default(), p.name_any())
}

fn jittered(d: Duration) -> Duration {
    d.mul_f64(0.9 + rand::random::<f64>() * 0.2)
}

/// A reason + message that ends this reconcile with Ready=False.
struct Blocked {
    reason: &'static str,
    message: String,
    retry: Duration,
}

fn blocked(reason: &'static str, message: impl Into<String>, retry: Duration) -> Blocked {
    Blocked {
        reason,
        message: message.into(),
        retry,
    }
}

pub async fn reconcile(p: Arc<OrderPipeline>, ctx: Arc<Context>) -> Result<Action, Error> {
    let start = std::time::Instant::now();
    let ns = p.namespace().unwrap_or_default();
    let api: Api<OrderPipeline> = Api::namespaced(ctx.client.clone(), &ns);
    let result = finalizer(&api, FINALIZER, p, |event| async {
        match event {
            Finalizer::Apply(p) => apply(p, ctx.clone()).await,
            Finalizer::Cleanup(p) => cleanup(p, ctx.clone()).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    ctx.metrics.reconciled(
        start.elapsed(),
        result.as_ref().err().map(Error::metric_label),
    );
    result
}

pub fn error_policy(p: Arc<OrderPipeline>, error: &Error, ctx: Arc<Context>) -> Action {
    tracing::warn!(pipeline = %key_of(&p), error = %error, "reconcile failed; retrying");
    let _ = ctx;
    Action::requeue(Duration::from_secs(10))
}

/// Reads the referenced Secrets: the auth for the operator's connection, what to
/// project into the pods, and a checksum that rolls the pods when they change.
async fn read_secrets(
    p: &OrderPipeline,
    client: &Client,
) -> Result<(NatsAuth, SecretsView, Vec<(String, String)>), Blocked> {
    let ns = p.namespace().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let mut auth = NatsAuth::default();
    let mut view = SecretsView::default();
    let mut files = Vec::new();
    let mut hasher = sha_lite::Hasher::default();
    let get = |name: String| {
        let secrets = secrets.clone();
        let ns = ns.clone();
        async move {
            match secrets.get_opt(&name).await {
                Ok(Some(s)) => Ok(s),
                Ok(None) => Err(blocked(
                    reasons::SECRET_MISSING,
                    format!(
                        "Secret {ns}/{name} referenced by the pipeline does not exist; create it or fix the reference"
                    ),
                    Duration::from_secs(15),
                )),
                Err(e) => Err(blocked(
                    reasons::KUBERNETES_ERROR,
                    format!("reading Secret {name}: {e}"),
                    Duration::from_secs(15),
                )),
            }
        }
    };
    let text = |s: &Secret, key: &str| -> Option<String> {
        s.data
            .as_ref()
            .and_then(|d| d.get(key))
            .map(|b| String::from_utf8_lossy(&b.0).to_string())
            .or_else(|| s.string_data.as_ref().and_then(|d| d.get(key).cloned()))
    };
    if let Some(r) = &p.spec.nats.credentials_secret_ref {
        let s = get(r.name.clone()).await?;
        hasher.update_secret(&s);
        let kind = if text(&s, "user").is_some() || text(&s, "password").is_some() {
            auth.user = text(&s, "user");
            auth.password = text(&s, "password");
            if auth.user.is_none() || auth.password.is_none() {
                return Err(blocked(
                    reasons::SECRET_INVALID,
                    format!(
                        "Secret {} has only one of the keys user and password; set both",
                        r.name
                    ),
                    Duration::from_secs(30),
                ));
            }
            Credentials::UserPassword
        } else if let Some(t) = text(&s, "token") {
            auth.token = Some(t);
            Credentials::Token
        } else if let Some(c) = text(&s, "creds") {
            auth.creds = Some(c);
            Credentials::CredsFile
        } else if let Some(n) = text(&s, "nkey") {
            auth.nkey_seed = Some(n);
            Credentials::NkeySeed
        } else {
            return Err(blocked(
                reasons::SECRET_INVALID,
                format!(
                    "Secret {} has none of the keys user+password, token, creds or nkey; add one",
                    r.name
                ),
                Duration::from_secs(30),
            ));
        };
        view.credentials = Some((r.name.clone(), kind));
    }
    if let Some(r) = &p.spec.nats.tls_secret_ref {
        let s = get(r.name.clone()).await?;
        hasher.update_secret(&s);
        let Some(ca) = text(&s, "ca.crt") else {
            return Err(blocked(
                reasons::SECRET_INVALID,
                format!(
                    "TLS Secret {} has no ca.crt; add the CA that signed the NATS server's certificate",
                    r.name
                ),
                Duration::from_secs(30),
            ));
        };
        files.push(("ca.crt".to_string(), ca));
        let client_cert = match (text(&s, "tls.crt"), text(&s, "tls.key")) {
            (Some(c), Some(k)) => {
                files.push(("tls.crt".into(), c));
                files.push(("tls.key".into(), k));
                true
            }
            (None, None) => false,
            _ => {
                return Err(blocked(
                    reasons::SECRET_INVALID,
                    format!(
                        "TLS Secret {} has only one of tls.crt and tls.key; set both",
                        r.name
                    ),
                    Duration::from_secs(30),
                ));
            }
        };
        view.tls = Some((r.name.clone(), client_cert));
    }
    if view.credentials.is_some() || view.tls.is_some() {
        view.checksum = Some(hasher.finish_hex());
    }
    Ok((auth, view, files))
}

/// Writes TLS material where the NATS client can read it (a private directory).
fn write_tls_files(
    key: &str,
    files: &[(String, String)],
    auth: &mut NatsAuth,
) -> Result<(), Blocked> {
    if files.is_empty() {
        return Ok(());
    }
    let dir = std::env::temp_dir()
        .join("order-operator")
        .join(key.replace('/', "_"));
    let io = |e: std::io::Error| {
        blocked(
            reasons::KUBERNETES_ERROR,
            format!("writing TLS files: {e}"),
            Duration::from_secs(30),
        )
    };
    std::fs::create_dir_all(&dir).map_err(io)?;
    for (name, content) in files {
        let path = dir.join(name);
        std::fs::write(&path, content).map_err(io)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
        }
        match name.as_str() {
            "ca.crt" => auth.tls_ca = Some(path),
            "tls.crt" => auth.tls_cert = Some(path),
            "tls.key" => auth.tls_key = Some(path),
            _ => {}
        }
    }
    Ok(())
}

async fn apply(p: Arc<OrderPipeline>, ctx: Arc<Context>) -> Result<Action, Error> {
    let generation = p.metadata.generation;
    // The status from the API server, not the watch cache: a reconcile triggered
    // right after our own status write may see the cache without it, and the
    // scaler's clocks and lastScaleTime must not be lost.
    let api: Api<OrderPipeline> =
        Api::namespaced(ctx.client.clone(), &p.namespace().unwrap_or_default());
    let old = match api.get_status(&p.name_any()).await {
        Ok(fresh) => fresh.status.unwrap_or_default(),
        Err(_) => p.status.clone().unwrap_or_default(),
    };
    let key = key_of(&p);

    let others = ctx.pipelines.get().map(|s| s.state()).unwrap_or_default();
    let plan = match render::plan(&p).and_then(|plan| {
        render::conflicts(&p, &plan, &others)?;
        Ok(plan)
    }) {
        Ok(plan) => plan,
        Err(e) => {
            let msg = format!("{e}; fix the spec");
            return finish_blocked(
                &p,
                &ctx,
                &old,
                blocked(reasons::INVALID_SPEC, msg, Duration::from_secs(300)),
            )
            .await;
        }
    };
    let (mut auth, secrets, files) = match read_secrets(&p, &ctx.client).await {
        Ok(x) => x,
        Err(b) => return finish_blocked(&p, &ctx, &old, b).await,
    };
    if let Err(b) = write_tls_files(&key, &files, &mut auth) {
        return finish_blocked(&p, &ctx, &old, b).await;
    }
    let auth_hash = format!("{}|{:?}", p.spec.nats.url, secrets.checksum);
    let client = match ctx.nats(&key, &p.spec.nats.url, &auth, &auth_hash).await {
        Ok(c) => c,
        Err(e) => {
            let reason = match e {
                NatsConnectError::Authentication { .. } => reasons::NATS_AUTH_FAILED,
                NatsConnectError::Tls { .. } => reasons::NATS_TLS_FAILED,
                NatsConnectError::Options(_) => reasons::SECRET_INVALID,
                NatsConnectError::Unreachable { .. } => reasons::NATS_UNREACHABLE,
            };
            return finish_blocked(
                &p,
                &ctx,
                &old,
                blocked(reason, e.to_string(), Duration::from_secs(10)),
            )
            .await;
        }
    };
    if client.connection_state() != async_nats::connection::State::Connected {
        let b = blocked(
            reasons::NATS_UNREACHABLE,
            format!(
                "lost the connection to NATS at {}; reconnecting (check that nats-server runs there)",
                p.spec.nats.url
            ),
            Duration::from_secs(5),
        );
        return finish_blocked(&p, &ctx, &old, b).await;
    }
    let mut js = jetstream::new(client.clone());
    js.set_timeout(Duration::from_secs(5));

    let observe = p.spec.management_policy == ManagementPolicy::Observe;

    // JetStream objects (Observe: change nothing, only report).
    // Between reconciles of an unchanged spec, any difference is drift.
    // (`status.stream` is set once the stream has been seen, and kept when a
    // later read fails, so a failed read in between does not hide drift.)
    // Judged against the last generation applied in full: a blocked reconcile
    // records observedGeneration too, and applying its spec later is no drift.
    let drift = old.applied_generation == generation && old.stream.is_some();
    if !observe && let Err(b) = ensure_topology(&p, &ctx, &js, &plan.topology, drift).await {
        if b.reason == reasons::NATS_UNREACHABLE || b.reason == reasons::JETSTREAM_ERROR {
            ctx.forget_nats(&key).await;
        }
        return finish_blocked(&p, &ctx, &old, b).await;
    }
    let figures = read_figures(&js, &plan.topology).await;
    if !observe && let Err(b) = ensure_paused(&p, &ctx, &js, &plan.topology, &figures).await {
        return finish_blocked(&p, &ctx, &old, b).await;
    }

    // Who sets the replicas, and to what.
    let deployments: Api<Deployment> =
        Api::namespaced(ctx.client.clone(), &p.namespace().unwrap_or_default());
    let name = render::deployment_name(&p);
    let before = deployments.get_opt(&name).await.map_err(Error::Kube)?;
    let live_replicas = before
        .as_ref()
        .and_then(|d| d.spec.as_ref())
        .and_then(|s| s.replicas);
    // While the bucket holds records of the protocol before v2, the workers check
    // them (unknown when NATS cannot be read: keep what the workers have).
    let mut plan = plan;
    plan.legacy_bucket = match figures.as_ref().ok().and_then(|f| f.legacy_records) {
        Some(n) => (n > 0).then(|| plan.topology.bucket.clone()),
        None => before
            .as_ref()
            .and_then(|d| d.spec.as_ref())
            .and_then(|s| s.template.spec.as_ref())
            .and_then(|s| s.containers.first())
            .and_then(|c| c.env.as_ref())
            .and_then(|env| env.iter().find(|v| v.name == "LEGACY_STATE_BUCKET"))
            .and_then(|v| v.value.clone()),
    };
    plan.replaces_old_protocol = before.as_ref().is_some_and(render::replaces_old_protocol);
    let mode = replica_mode(&p);
    let lag = figures
        .as_ref()
        .ok()
        .map(|f| u64::try_from(f.consumer.pending + f.consumer.ack_pending).unwrap_or(0));
    let now = k8s_openapi::jiff::Timestamp::now();
    let mut scale_note: Option<(bool, String)> = None;
    let mut scaling_clock = (old.last_busy_time.clone(), old.idle_since.clone());
    // Remember the replicas a pause took away, to give them back in External mode.
    let mut replicas_before_pause = old.replicas_before_pause;
    let mut resume_at = None;
    if p.spec.paused {
        if replicas_before_pause.is_none() {
            replicas_before_pause = live_replicas.filter(|r| *r > 0);
        }
    } else {
        resume_at = replicas_before_pause.take();
    }
    let replicas: Option<i32> = if p.spec.paused {
        Some(0)
    } else {
        match mode {
            ReplicaMode::Manual => Some(p.spec.workers.replicas),
            ReplicaMode::External => None,
            ReplicaMode::Operator => {
                let sc = &p.spec.workers.scaling;
                let min = p.spec.workers.min_replicas.unwrap_or(1);
                let max = p
                    .spec
                    .workers
                    .max_replicas
                    .unwrap_or(p.spec.workers.replicas.max(min));
                let d = scaling::decide(&scaling::Inputs {
                    lag,
                    current: live_replicas.unwrap_or(p.spec.workers.replicas.clamp(min, max)),
                    min,
                    max,
                    target_lag_per_replica: u64::try_from(sc.target_lag_per_replica).unwrap_or(1),
                    activation_lag: u64::try_from(sc.activation_lag).unwrap_or(0),
                    max_step: sc.max_step,
                    stabilization_window: parse_duration(&sc.stabilization_window)
                        .unwrap_or(Duration::from_secs(300)),
                    cooldown: parse_duration(&sc.cooldown).unwrap_or(Duration::from_secs(300)),
                    now,
                    last_busy: old.last_busy_time.as_ref().map(|t| t.0),
                    idle_since: old.idle_since.as_ref().map(|t| t.0),
                });
                scaling_clock = (d.last_busy.map(Time), d.idle_since.map(Time));
                scale_note = Some((d.lag_known, d.reason.clone()));
                Some(d.desired)
            }
        }
    };

    // The worker Deployment (Observe: leave it alone).
    let after = if observe {
        before.clone().unwrap_or_default()
    } else {
        if replicas.is_none() {
            release_replicas(&deployments, &name, before.as_ref(), resume_at).await?;
        }
        if let Some(patch) = before
            .as_ref()
            .and_then(|live| render::strategy_patch(live, plan.replaces_old_protocol))
        {
            deployments
                .patch(&name, &PatchParams::apply(MANAGER), &Patch::Merge(&patch))
                .await
                .map_err(Error::Kube)?;
        }
        let desired = render::deployment(&p, &plan, &secrets, &ctx.default_image, replicas);
        match deployments
            .patch(
                &name,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(&desired),
            )
            .await
        {
            Ok(d) => d,
            // Refused as invalid (e.g. a bad resources or affinity value): the
            // spec must change, so say so instead of retrying quietly.
            Err(kube::Error::Api(s)) if s.code == 400 || s.code == 422 => {
                let b = blocked(
                    reasons::DEPLOYMENT_INVALID,
                    format!(
                        "the API server refused the worker Deployment {name}: {}; fix spec.workers",
                        s.message
                    ),
                    Duration::from_secs(60),
                );
                return finish_blocked(&p, &ctx, &old, b).await;
            }
            Err(e) => return Err(Error::Kube(e)),
        }
    };
    let applied_replicas = after.spec.as_ref().and_then(|s| s.replicas);
    match &before {
        None if !observe => {
            ctx.event(
                &p,
                EventType::Normal,
                "DeploymentCreated",
                "Create",
                format!(
                    "created Deployment {name} with {} replica(s)",
                    applied_replicas.unwrap_or(1)
                ),
            )
            .await;
        }
        Some(b)
            if b.spec.as_ref().map(|s| &s.template) != after.spec.as_ref().map(|s| &s.template) =>
        {
            ctx.event(
                &p,
                EventType::Normal,
                "DeploymentUpdated",
                "Update",
                format!("updated Deployment {name}"),
            )
            .await;
        }
        _ => {}
    }
    let scaled =
        before.is_some() && !observe && replicas.is_some() && live_replicas != applied_replicas;
    if scaled {
        let why = if p.spec.paused {
            format!("paused, scaling {} -> 0", live_replicas.unwrap_or(0))
        } else if let Some((_, r)) = &scale_note {
            r.clone()
        } else {
            format!(
                "spec.workers.replicas, scaling {} -> {}",
                live_replicas.unwrap_or(0),
                applied_replicas.unwrap_or(0)
            )
        };
        let mut related = after.object_ref(&());
        // A new resourceVersion per scale keeps each Scaled event its own.
        related.resource_version = after.metadata.resource_version.clone();
        ctx.event_about(&p, EventType::Normal, "Scaled", "Scale", why, Some(related))
            .await;
    }

    let mut status = old.clone();
    status.observed_generation = generation;
    status.applied_generation = generation;
    status.replica_mode = Some(mode);
    status.replicas_before_pause = replicas_before_pause;
    // The operator's own decision; absent when it decides nothing (External
    // mode). What the Deployment asks for is `workers.desired`.
    status.desired_replicas = replicas;
    (status.last_busy_time, status.idle_since) = scaling_clock;
    if scaled {
        status.last_scale_time = Some(Time(now));
    }
    let mut conds = Vec::new();
    let mut ready = true;
    conds.push(if p.spec.paused {
        conditions::condition(
            types::PAUSED,
            true,
            reasons::PAUSED,
            "workers scaled to zero and the consumer paused; set spec.paused: false to resume",
            generation,
        )
    } else {
        conditions::condition(
            types::PAUSED,
            false,
            reasons::RUNNING,
            "not paused",
            generation,
        )
    });
    match (&scale_note, p.spec.paused, mode) {
        (_, true, _) => conds.push(conditions::condition(types::SCALING, false, reasons::PAUSED, "paused", generation)),
        (Some((true, why)), _, _) => conds.push(conditions::condition(types::SCALING, true, reasons::SCALING_ACTIVE, why.clone(), generation)),
        (Some((false, why)), _, _) => conds.push(conditions::condition(types::SCALING, false, reasons::LAG_UNAVAILABLE, format!("{why}; check the consumer and NATS"), generation)),
        (None, _, ReplicaMode::Manual) => conds.push(conditions::condition(types::SCALING, false, reasons::MANUAL, "replica mode Manual: spec.workers.replicas (kubectl scale orderpipeline/NAME) sets the replicas", generation)),
        (None, _, _) => conds.push(conditions::condition(types::SCALING, false, reasons::EXTERNAL, "replica mode External: another scaler (KEDA, HPA) sets the Deployment's replicas", generation)),
    }
    match &figures {
        Ok(f) => {
            status.stream = Some(f.stream.clone());
            status.consumer = Some(f.consumer.clone());
            status.lag = Some(f.consumer.pending + f.consumer.ack_pending);
            status.dead_letters = Some(f.dead_letters);
            conds.push(conditions::condition(
                types::STREAM_READY,
                true,
                reasons::STREAM_READY,
                format!(
                    "stream {} and dead-letter stream {} exist",
                    plan.topology.stream, plan.topology.dlq_stream
                ),
                generation,
            ));
            conds.push(conditions::condition(
                types::CONSUMER_READY,
                true,
                reasons::CONSUMER_READY,
                format!(
                    "consumer {} on {} filters {}",
                    plan.topology.consumer, plan.topology.stream, plan.topology.filter_subject
                ),
                generation,
            ));
        }
        Err(e) => {
            ready = false;
            conds.extend(topology_not_ready(reasons::JETSTREAM_ERROR, e, generation));
        }
    }
    let ds = after.status.clone().unwrap_or_default();
    let desired_replicas = applied_replicas.unwrap_or(0);
    let ready_pods = ds.ready_replicas.unwrap_or(0);
    let available = ds.available_replicas.unwrap_or(0);
    status.workers = Some(crate::crd::WorkersStatus {
        desired: desired_replicas,
        ready: ready_pods,
        available,
    });
    status.workers_ready = Some(format!("{ready_pods}/{desired_replicas}"));
    status.replicas = Some(ds.replicas.unwrap_or(0));
    status.selector = Some(render::selector_string(&p));
    status.secrets_checksum = secrets.checksum.clone();
    let workers_ok = available >= desired_replicas;
    if !workers_ok {
        ready = false;
    }
    conds.push(conditions::condition(
        types::WORKERS_AVAILABLE,
        workers_ok,
        if workers_ok {
            reasons::WORKERS_AVAILABLE
        } else {
            reasons::WORKERS_UNAVAILABLE
        },
        format!("{available} of {desired_replicas} worker pod(s) available"),
        generation,
    ));
    match &plan.window_warning {
        None => conds.push(conditions::condition(
            types::DUPLICATE_WINDOW,
            true,
            reasons::WINDOW_COVERS,
            "the stream's duplicate window covers the redelivery horizon",
            generation,
        )),
        Some(w) => {
            conds.push(conditions::condition(
                types::DUPLICATE_WINDOW,
                false,
                reasons::WINDOW_TOO_SHORT,
                w.clone(),
                generation,
            ));
            if !old
                .conditions
                .iter()
                .any(|c| c.type_ == types::DUPLICATE_WINDOW && c.status == "False")
            {
                ctx.event(
                    &p,
                    EventType::Warning,
                    reasons::WINDOW_TOO_SHORT,
                    "Validate",
                    w.clone(),
                )
                .await;
            }
        }
    }
    let (reason, message) = if ready {
        (
            reasons::READY,
            format!("stream, consumer and {available} worker pod(s) ready"),
        )
    } else if !workers_ok {
        (
            reasons::WORKERS_UNAVAILABLE,
            format!("waiting for workers: {available} of {desired_replicas} available"),
        )
    } else {
        (
            reasons::JETSTREAM_ERROR,
            figures.as_ref().err().cloned().unwrap_or_default(),
        )
    };
    conds.insert(
        0,
        conditions::condition(types::READY, ready, reason, message, generation),
    );
    status.conditions = conditions::merge(&old.conditions, conds);

    if let (Some(new), Some(prev)) = (status.dead_letters, old.dead_letters)
        && new > prev
    {
        ctx.event(
            &p,
            EventType::Warning,
            "DeadLettersGrew",
            "Observe",
            format!(
                "{} new dead letter(s) in {} (total {new}); inspect them with `orderctl dlq list`",
                new - prev,
                plan.topology.dlq_stream
            ),
        )
        .await;
    }
    ctx.metrics.pipeline(
        &key,
        status.lag.unwrap_or(0),
        status.dead_letters.unwrap_or(0),
        i64::from(ds.replicas.unwrap_or(0)),
    );
    write_status(&p, &ctx, &status).await?;
    let next = if ready {
        ctx.resync
    } else {
        ctx.resync.min(Duration::from_secs(5))
    };
    Ok(Action::requeue(jittered(next)))
}

/// The replica mode in force: the spec's, else Operator when bounds are set.
pub fn replica_mode(p: &OrderPipeline) -> ReplicaMode {
    let w = &p.spec.workers;
    w.scaling
        .mode
        .unwrap_or(if w.min_replicas.is_some() || w.max_replicas.is_some() {
            ReplicaMode::Operator
        } else {
            ReplicaMode::Manual
        })
}

/// Before applying without `spec.replicas` (External mode): if our field manager
/// still owns the field, hand it to a separate manager at its live value (right
/// after a pause: the replicas from before it), so
/// server-side apply does not reset it when we stop applying it.
async fn release_replicas(
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

/// Pauses or resumes the consumer to match `spec.paused`.
async fn ensure_paused(
    p: &OrderPipeline,
    ctx: &Context,
    js: &jetstream::Context,
    t: &Topology,
    figures: &Result<Figures, String>,
) -> Result<(), Blocked> {
    let Ok(f) = figures else { return Ok(()) };
    if f.consumer_paused == p.spec.paused {
        return Ok(());
    }
    let s = js.get_stream(&t.stream).await.map_err(|e| {
        blocked(
            reasons::JETSTREAM_ERROR,
            format!("reading stream {}: {e}", t.stream),
            Duration::from_secs(10),
        )
    })?;
    if p.spec.paused {
        let until = time::OffsetDateTime::now_utc() + time::Duration::days(365 * 100);
        s.pause_consumer(&t.consumer, until).await.map_err(|e| {
            blocked(
                reasons::JETSTREAM_ERROR,
                format!("pausing consumer {}: {e}", t.consumer),
                Duration::from_secs(10),
            )
        })?;
        ctx.event(
            p,
            EventType::Normal,
            "Paused",
            "Pause",
            // The workers' scale to zero has its own Event, once the
            // Deployment has been patched.
            format!(
                "paused consumer {}; the stream keeps accepting orders",
                t.consumer
            ),
        )
        .await;
    } else {
        s.resume_consumer(&t.consumer).await.map_err(|e| {
            blocked(
                reasons::JETSTREAM_ERROR,
                format!("resuming consumer {}: {e}", t.consumer),
                Duration::from_secs(10),
            )
        })?;
        ctx.event(
            p,
            EventType::Normal,
            "Resumed",
            "Resume",
            format!("resumed consumer {}", t.consumer),
        )
        .await;
    }
    Ok(())
}

/// StreamReady and ConsumerReady, both False for one cause: neither can be
/// confirmed, and neither may keep a stale True.
fn topology_not_ready(reason: &str, message: &str, generation: Option<i64>) -> [Condition; 2] {
    [types::STREAM_READY, types::CONSUMER_READY]
        .map(|type_| conditions::condition(type_, false, reason, message, generation))
}

/// Ends a reconcile that cannot go on: Ready=False with the reason, an Event, a requeue.
async fn finish_blocked(
    p: &OrderPipeline,
    ctx: &Context,
    old: &OrderPipelineStatus,
    b: Blocked,
) -> Result<Action, Error> {
    let generation = p.metadata.generation;
    let was = old.conditions.iter().find(|c| c.type_ == types::READY);
    if was.is_none_or(|c| c.reason != b.reason || c.message != b.message) {
        ctx.event(
            p,
            EventType::Warning,
            b.reason,
            "Reconcile",
            b.message.clone(),
        )
        .await;
    }
    tracing::warn!(pipeline = %key_of(p), reason = b.reason, message = %b.message, "pipeline not ready");
    ctx.metrics
        .not_ready
        .get_or_create(&crate::metrics::ReasonLabels { reason: b.reason })
        .inc();
    let mut status = old.clone();
    status.observed_generation = generation;
    let mut conds = vec![conditions::condition(
        types::READY,
        false,
        b.reason,
        b.message.clone(),
        generation,
    )];
    if matches!(
        b.reason,
        reasons::NATS_UNREACHABLE
            | reasons::NATS_AUTH_FAILED
            | reasons::NATS_TLS_FAILED
            | reasons::STREAM_CONFLICT
            | reasons::STREAM_INCOMPATIBLE
            | reasons::JETSTREAM_ERROR
    ) {
        conds.extend(topology_not_ready(b.reason, &b.message, generation));
    }
    status.conditions = conditions::merge(&old.conditions, conds);
    write_status(p, ctx, &status).await?;
    Ok(Action::requeue(jittered(b.retry)))
}

async fn write_status(
    p: &OrderPipeline,
    ctx: &Context,
    status: &OrderPipelineStatus,
) -> Result<(), Error> {
    let api: Api<OrderPipeline> =
        Api::namespaced(ctx.client.clone(), &p.namespace().unwrap_or_default());
    let patch = serde_json::json!({
        "apiVersion": "orderpipeline.dev/v1alpha1",
        "kind": "OrderPipeline",
        "status": status,
    });
    api.patch_status(
        &p.name_any(),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(Error::Kube)?;
    Ok(())
}

/// Creates or updates the stream, DLQ stream, KV bucket and consumer; refuses a
/// stream that belongs to something else or that NATS cannot change in place.
async fn ensure_topology(
    p: &OrderPipeline,
    ctx: &Context,
    js: &jetstream::Context,
    t: &Topology,
    drift: bool,
) -> Result<(), Blocked> {
    // Drift (a change made behind the operator's back) is reported as such, as
    // a Warning whatever the object: the Event for a change is `reason`
    // (Normal), or DriftCorrected (Warning).
    let report = move |reason: &str, action: &'static str, message: String| {
        let (type_, reason, message) = if drift {
            (
                EventType::Warning,
                reasons::DRIFT_CORRECTED.to_string(),
                format!("{message} (it had been changed outside the operator)"),
            )
        } else {
            (EventType::Normal, reason.to_string(), message)
        };
        async move { ctx.event(p, type_, &reason, action, message).await }
    };
    // The same for a creation: under drift the object had been deleted.
    let created = move |reason: &str, object: String, message: String| {
        let (type_, reason, message) = if drift {
            (
                EventType::Warning,
                reasons::DRIFT_CORRECTED.to_string(),
                format!("recreated {object}: it had been deleted outside the operator"),
            )
        } else {
            (EventType::Normal, reason.to_string(), message)
        };
        async move { ctx.event(p, type_, &reason, "Create", message).await }
    };
    let api_err = |what: &str, e: &dyn std::fmt::Display| {
        let s = e.to_string();
        if s.contains("timed out") || s.contains("no responders") || s.contains("disconnected") {
            blocked(
                reasons::NATS_UNREACHABLE,
                format!(
                    "{what}: NATS did not answer ({s}); check that nats-server (with JetStream) runs at {}",
                    p.spec.nats.url
                ),
                Duration::from_secs(5),
            )
        } else {
            blocked(
                reasons::JETSTREAM_ERROR,
                format!("{what}: {s}"),
                Duration::from_secs(15),
            )
        }
    };
    for (cfg, what) in [
        (t.stream_config(), "Stream"),
        (t.dlq_stream_config(), "DeadLetterStream"),
    ] {
        let name = cfg.name.clone();
        match js.get_stream(&name).await {
            Ok(mut s) => {
                let live = s
                    .info()
                    .await
                    .map_err(|e| api_err(&format!("reading stream {name}"), &e))?
                    .config
                    .clone();
                let owner = live.metadata.get(OWNER_METADATA_KEY).cloned();
                let adopt = owner.is_none() && p.spec.management_policy == ManagementPolicy::Adopt;
                if owner.as_deref() != t.owner.as_deref() && !adopt {
                    let msg = match owner {
                        Some(o) => format!(
                            "stream {name} already belongs to pipeline {o}; give this pipeline other stream names (spec.stream.name / spec.deadLetter.streamName)"
                        ),
                        None => format!(
                            "stream {name} exists and was not created by an OrderPipeline; delete it (nats stream rm {name}) or choose another name"
                        ),
                    };
                    return Err(blocked(
                        reasons::STREAM_CONFLICT,
                        msg,
                        Duration::from_secs(30),
                    ));
                }
                let wq = stream::RetentionPolicy::WorkQueue;
                let immutable = if live.storage != cfg.storage {
                    Some(format!(
                        "stream {name} has {:?} storage but the spec asks for {:?}; NATS cannot change storage in place",
                        live.storage, cfg.storage
                    ))
                } else if (live.retention == wq) != (cfg.retention == wq) {
                    Some(format!(
                        "stream {name} has {:?} retention but the spec asks for {:?}; NATS cannot change to or from WorkQueue in place",
                        live.retention, cfg.retention
                    ))
                } else {
                    None
                };
                if let Some(why) = immutable {
                    if !p.spec.stream.recreate_on_immutable_change {
                        return Err(blocked(
                            reasons::STREAM_INCOMPATIBLE,
                            format!(
                                "{why}: set spec.stream.recreateOnImmutableChange: true to delete and recreate it (its messages are lost), or recreate it by hand"
                            ),
                            Duration::from_secs(60),
                        ));
                    }
                    js.delete_stream(&name)
                        .await
                        .map_err(|e| api_err(&format!("deleting stream {name}"), &e))?;
                    js.create_stream(cfg.clone())
                        .await
                        .map_err(|e| api_err(&format!("recreating stream {name}"), &e))?;
                    ctx.event(
                        p,
                        EventType::Warning,
                        "StreamRecreated",
                        "Recreate",
                        format!("{why}; recreated it (spec.stream.recreateOnImmutableChange)"),
                    )
                    .await;
                    continue;
                }
                if adopt {
                    js.update_stream(cfg.clone())
                        .await
                        .map_err(|e| api_err(&format!("adopting stream {name}"), &e))?;
                    ctx.event(
                        p,
                        EventType::Normal,
                        "Adopted",
                        "Adopt",
                        format!("adopted existing stream {name} (managementPolicy Adopt)"),
                    )
                    .await;
                } else if let Some(field) = drift::stream_differs(&live, &cfg) {
                    js.update_stream(cfg.clone())
                        .await
                        .map_err(|e| api_err(&format!("updating stream {name}"), &e))?;
                    report(
                        &format!("{what}Updated"),
                        "Update",
                        format!("updated stream {name} ({field} changed)"),
                    )
                    .await;
                }
            }
            Err(e) if orderpipeline_common::nats::is_not_found(&e) => {
                js.create_stream(cfg.clone())
                    .await
                    .map_err(|e| api_err(&format!("creating stream {name}"), &e))?;
                created(
                    &format!("{what}Created"),
                    format!("stream {name}"),
                    format!("created stream {name} on {:?}", cfg.subjects),
                )
                .await;
            }
            Err(e) => return Err(api_err(&format!("reading stream {name}"), &e)),
        }
    }
    // The bucket's settings (TTL, replicas) follow the spec like the streams'.
    let bucket_stream = format!("KV_{}", t.bucket);
    match js.get_stream(&bucket_stream).await {
        Ok(mut s) => {
            let live = s
                .info()
                .await
                .map_err(|e| api_err(&format!("reading KV bucket {}", t.bucket), &e))?
                .config
                .clone();
            let want = t.kv_config();
            if let Some(field) = drift::bucket_differs(&live, &want) {
                js.update_key_value(want)
                    .await
                    .map_err(|e| api_err(&format!("updating KV bucket {}", t.bucket), &e))?;
                report(
                    "BucketUpdated",
                    "Update",
                    format!("updated KV bucket {} ({field} changed)", t.bucket),
                )
                .await;
            }
        }
        Err(e) if !orderpipeline_common::nats::is_not_found(&e) => {
            return Err(api_err(&format!("reading KV bucket {}", t.bucket), &e));
        }
        Err(_) => {
            js.create_or_update_key_value(t.kv_config())
                .await
                .map_err(|e| api_err(&format!("creating KV bucket {}", t.bucket), &e))?;
            created(
                "BucketCreated",
                format!("KV bucket {}", t.bucket),
                format!("created KV bucket {}", t.bucket),
            )
            .await;
        }
    }
    let mut desired = t.consumer_config();
    if p.spec.paused {
        // Keep a paused consumer paused when its config is rewritten.
        desired.pause_until =
            Some(time::OffsetDateTime::now_utc() + time::Duration::days(365 * 100));
    }
    let s = js
        .get_stream(&t.stream)
        .await
        .map_err(|e| api_err(&format!("reading stream {}", t.stream), &e))?;
    match s.consumer_info(&t.consumer).await {
        Ok(info) => {
            if let Some(field) = drift::consumer_differs(&info.config, &desired) {
                s.create_consumer(desired.clone())
                    .await
                    .map_err(|e| api_err(&format!("updating consumer {}", t.consumer), &e))?;
                report(
                    "ConsumerUpdated",
                    "Update",
                    format!(
                        "updated consumer {} ({field} changed; max ack pending {}, ack wait {:?})",
                        t.consumer, desired.max_ack_pending, desired.ack_wait
                    ),
                )
                .await;
            }
        }
        Err(e) if orderpipeline_common::nats::is_not_found(&e) => {
            s.create_consumer(desired.clone())
                .await
                .map_err(|e| api_err(&format!("creating consumer {}", t.consumer), &e))?;
            created(
                "ConsumerCreated",
                format!("consumer {}", t.consumer),
                format!(
                    "created durable consumer {} filtering {}",
                    t.consumer, t.filter_subject
                ),
            )
            .await;
        }
        Err(e) => return Err(api_err(&format!("reading consumer {}", t.consumer), &e)),
    }
    Ok(())
}

struct Figures {
    consumer_paused: bool,
    /// Records in the state bucket (left by the protocol before v2); `None` when
    /// the bucket could not be read (then the workers keep what they have).
    legacy_records: Option<u64>,
    stream: crate::crd::StreamStatus,
    consumer: crate::crd::ConsumerStatus,
    dead_letters: i64,
}

async fn read_figures(js: &jetstream::Context, t: &Topology) -> Result<Figures, String> {
    let i64_of = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    let mut s = js
        .get_stream(&t.stream)
        .await
        .map_err(|e| format!("reading stream {}: {e}", t.stream))?;
    let st = s
        .info()
        .await
        .map_err(|e| format!("reading stream {}: {e}", t.stream))?
        .state
        .clone();
    let c = s
        .consumer_info(&t.consumer)
        .await
        .map_err(|e| format!("reading consumer {}: {e}", t.consumer))?;
    let mut d = js
        .get_stream(&t.dlq_stream)
        .await
        .map_err(|e| format!("reading stream {}: {e}", t.dlq_stream))?;
    let dead = d
        .info()
        .await
        .map_err(|e| format!("reading stream {}: {e}", t.dlq_stream))?
        .state
        .messages;
    // The bucket may be absent (Observe, or not created yet): no records then.
    let legacy_records = match js.get_stream(format!("KV_{}", t.bucket)).await {
        Ok(mut b) => b.info().await.ok().map(|i| i.state.messages),
        Err(e) if orderpipeline_common::nats::is_not_found(&e) => Some(0),
        Err(_) => None,
    };
    Ok(Figures {
        consumer_paused: c.paused,
        legacy_records,
        stream: crate::crd::StreamStatus {
            messages: i64_of(st.messages),
            bytes: i64_of(st.bytes),
            first_sequence: i64_of(st.first_sequence),
            last_sequence: i64_of(st.last_sequence),
        },
        consumer: crate::crd::ConsumerStatus {
            pending: i64_of(c.num_pending),
            ack_pending: i64::try_from(c.num_ack_pending).unwrap_or(i64::MAX),
            redelivered: i64::try_from(c.num_redelivered).unwrap_or(i64::MAX),
        },
        dead_letters: i64_of(dead),
    })
}

/// Deletion: `Retain` keeps the JetStream objects; `Delete` removes them. If NATS
/// stays unreachable for CLEANUP_GIVE_UP after the deletion was requested (or
/// the pipeline carries `orderpipeline.dev/skip-cleanup: "true"`), the finalizer
/// gives up so the pipeline can still be deleted, and says so in an Event.
async fn cleanup(p: Arc<OrderPipeline>, ctx: Arc<Context>) -> Result<Action, Error> {
    let key = key_of(&p);
    let observe = p.spec.management_policy == ManagementPolicy::Observe;
    if p.spec.stream.deletion_policy == DeletionPolicy::Retain || observe {
        let why = if observe {
            "managementPolicy Observe"
        } else {
            "deletionPolicy Retain"
        };
        ctx.forget_nats(&key).await;
        ctx.event(
            &p,
            EventType::Normal,
            "Retained",
            "Delete",
            format!(
                "{why}: kept stream {}, {} and bucket {}",
                p.spec.stream.name,
                p.spec.dlq_stream(),
                p.spec.state_bucket()
            ),
        )
        .await;
        ctx.metrics.forget(&key);
        return Ok(Action::await_change());
    }
    let skip = p
        .annotations()
        .get(SKIP_CLEANUP_ANNOTATION)
        .is_some_and(|v| v == "true");
    let waited = p
        .metadata
        .deletion_timestamp
        .as_ref()
        .map(|t| {
            k8s_openapi::jiff::Timestamp::now()
                .duration_since(t.0)
                .unsigned_abs()
        })
        .unwrap_or_default();
    let outcome = if skip {
        Err("skip-cleanup annotation set".to_string())
    } else {
        delete_topology(&p, &ctx).await
    };
    match outcome {
        Ok(kept) => {
            ctx.forget_nats(&key).await;
            ctx.metrics.forget(&key);
            let note = if kept.is_empty() {
                format!(
                    "deleted consumer {}, streams {} and {}, bucket {}",
                    p.spec.consumer.name,
                    p.spec.stream.name,
                    p.spec.dlq_stream(),
                    p.spec.state_bucket()
                )
            } else {
                format!(
                    "deleted what this pipeline owned; kept {} (not created by this pipeline)",
                    kept.join(", ")
                )
            };
            ctx.event(&p, EventType::Normal, "Deleted", "Delete", note)
                .await;
            Ok(Action::await_change())
        }
        Err(e) if skip || waited >= CLEANUP_GIVE_UP => {
            ctx.forget_nats(&key).await;
            ctx.metrics.forget(&key);
            ctx.event(&p, EventType::Warning, "CleanupAbandoned", "Delete", format!("gave up deleting the JetStream objects ({e}); delete them by hand: nats stream rm {}; nats stream rm {}; nats kv del {}", p.spec.stream.name, p.spec.dlq_stream(), p.spec.state_bucket())).await;
            Ok(Action::await_change())
        }
        Err(e) => {
            ctx.event(&p, EventType::Warning, "CleanupFailed", "Delete", format!("cannot delete the JetStream objects yet ({e}); retrying, giving up after {}s (or set annotation {SKIP_CLEANUP_ANNOTATION}=true)", CLEANUP_GIVE_UP.as_secs())).await;
            Err(Error::Nats(e))
        }
    }
}

/// Deletes the pipeline's streams and KV bucket, but only what it owns: a stream
/// whose owner metadata names another pipeline (or none: it was never created
/// or adopted by this one) is kept, and so is the bucket unless the input stream
/// is this pipeline's. Returns what was kept.
async fn delete_topology(p: &OrderPipeline, ctx: &Context) -> Result<Vec<String>, String> {
    let key = key_of(p);
    let (mut auth, _view, files) = read_secrets(p, &ctx.client).await.map_err(|b| b.message)?;
    write_tls_files(&key, &files, &mut auth).map_err(|b| b.message)?;
    let auth_hash = format!("{}|cleanup", p.spec.nats.url);
    let client = ctx
        .nats(&key, &p.spec.nats.url, &auth, &auth_hash)
        .await
        .map_err(|e| e.to_string())?;
    let mut js = jetstream::new(client);
    js.set_timeout(Duration::from_secs(5));
    let ignore_missing = |r: Result<(), String>| match r {
        Err(e) if e.contains("not found") => Ok(()),
        other => other,
    };
    let input = stream_owned_by(&js, &p.spec.stream.name, &key).await?;
    let dlq = stream_owned_by(&js, &p.spec.dlq_stream(), &key).await?;
    let mut kept = Vec::new();
    if input == Some(true) {
        ignore_missing(
            js.delete_key_value(&p.spec.state_bucket())
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
        )?;
    } else {
        kept.push(format!("bucket {}", p.spec.state_bucket()));
    }
    for (name, owned) in [(&p.spec.stream.name, input), (&p.spec.dlq_stream(), dlq)] {
        match owned {
            Some(true) => ignore_missing(
                js.delete_stream(name)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
            )?,
            Some(false) => kept.push(format!("stream {name}")),
            None => {}
        }
    }
    Ok(kept)
}

/// Whether stream `name` belongs to pipeline `owner` (its owner metadata):
/// `None` when it does not exist.
async fn stream_owned_by(
    js: &jetstream::Context,
    name: &str,
    owner: &str,
) -> Result<Option<bool>, String> {
    match js.get_stream(name).await {
        Ok(mut s) => {
            let info = s
                .info()
                .await
                .map_err(|e| format!("reading stream {name}: {e}"))?;
            Ok(Some(
                info.config
                    .metadata
                    .get(OWNER_METADATA_KEY)
                    .map(String::as_str)
                    == Some(owner),
            ))
        }
        Err(e) if orderpipeline_common::nats::is_not_found(&e) => Ok(None),
        Err(e) => Err(format!("reading stream {name}: {e}")),
    }
}

/// What a pipeline event must change to trigger a reconcile: the spec (its
/// generation), the finalizers, the deletion, or the skip-cleanup annotation.
fn reconcile_trigger(p: &OrderPipeline) -> Option<u64> {
    use std::hash::{Hash as _, Hasher as _};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    p.metadata.generation.hash(&mut h);
    p.metadata.finalizers.hash(&mut h);
    p.metadata.deletion_timestamp.is_some().hash(&mut h);
    p.annotations().get(SKIP_CLEANUP_ANNOTATION).hash(&mut h);
    Some(h.finish())
}

/// Maps a Secret to the pipelines in its namespace that reference it.
fn pipelines_using(
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
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "controller event");
            }
        })
        .await;
}

/// A small, dependency-free FNV-1a based digest for the Secrets checksum (not a
/// security measure: it only detects change).
mod sha_lite {
    use k8s_openapi::api::core::v1::Secret;

    pub struct Hasher(u64, u64);

    impl Default for Hasher {
        fn default() -> Self {
            Self(0xcbf2_9ce4_8422_2325, 0x8422_2325_cbf2_9ce4)
        }
    }

    impl Hasher {
        fn bytes(&mut self, b: &[u8]) {
            for x in b {
                self.0 = (self.0 ^ u64::from(*x)).wrapping_mul(0x0100_0000_01b3);
                self.1 = (self.1 ^ u64::from(*x))
                    .wrapping_mul(0x0000_0100_0000_01b3)
                    .rotate_left(5);
            }
        }
        pub fn update_secret(&mut self, s: &Secret) {
            self.bytes(s.metadata.name.as_deref().unwrap_or("").as_bytes());
            let data: super::BTreeMap<&String, &Vec<u8>> =
                s.data.iter().flatten().map(|(k, v)| (k, &v.0)).collect();
            for (k, v) in data {
                self.bytes(k.as_bytes());
                self.bytes(&[0]);
                self.bytes(v);
                self.bytes(&[0xff]);
            }
        }
        pub fn finish_hex(&self) -> String {
            format!("{:016x}{:016x}", self.0, self.1)
        }
    }
}
