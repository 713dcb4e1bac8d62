//! Pure builders: from an `OrderPipeline` (and what was read about its Secrets)
//! to the JetStream topology and the worker Deployment. No I/O here, so the
//! whole mapping is unit-tested.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction,
    ObjectFieldSelector, PodSecurityContext, PodSpec, PodTemplateSpec, Probe, SeccompProfile,
    SecretKeySelector, SecretVolumeSource, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Resource as _;
use kube::api::ObjectMeta;
use orderpipeline_common::duration::parse_duration;
use orderpipeline_common::topology::{Topology, redelivery_horizon};

use crate::crd::{OrderPipeline, Retention, Storage};

pub const PIPELINE_LABEL: &str = "orderpipeline.dev/pipeline";
pub const COMPONENT_LABEL: &str = "app.kubernetes.io/component";
pub const CHECKSUM_ANNOTATION: &str = "orderpipeline.dev/secrets-checksum";
/// On the workers' pod template: the outcome protocol its workers speak. A
/// Deployment whose template does not say `2` runs workers from before v2.
pub const PROTOCOL_ANNOTATION: &str = "orderpipeline.dev/outcome-protocol";
pub const PROTOCOL_VERSION: &str = "2";
pub const WORKER_HTTP_PORT: i32 = 8080;
const CREDS_MOUNT: &str = "/etc/orderpipeline/nats-credentials";
const TLS_MOUNT: &str = "/etc/orderpipeline/nats-tls";

/// The default worker image: the release matching this operator's version.
pub fn default_worker_image() -> String {
    format!(
        "ghcr.io/orderpipeline/orderpipeline:{}",
        env!("CARGO_PKG_VERSION")
    )
}

/// How the credentials Secret authenticates (decided from its keys).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Credentials {
    UserPassword,
    Token,
    CredsFile,
    NkeySeed,
}

/// What the shell read about the referenced Secrets.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SecretsView {
    pub credentials: Option<(String, Credentials)>,
    /// Secret name, and whether it has a client certificate and key.
    pub tls: Option<(String, bool)>,
    /// Which version of the Secrets (their uid and resourceVersion, digested):
    /// the pods' checksum annotation and `status.secretsChecksum`.
    pub checksum: Option<String>,
    /// A SHA-256 of their data: the connection pool's key, never shown.
    pub content: Option<String>,
    /// The inbox prefix of a minted identity (`NATS_INBOX_PREFIX`).
    pub inbox_prefix: Option<String>,
}

/// Everything parsed and checked from the spec.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub topology: Topology,
    pub ack_wait: Duration,
    pub max_deliveries: u32,
    pub nak_max_delay: Duration,
    pub shutdown_grace: Duration,
    /// `Some(message)` when the duplicate window is shorter than the redelivery horizon.
    pub window_warning: Option<String>,
    /// The lag scaler's scale-down stabilization window and cooldown.
    pub stabilization_window: Duration,
    pub cooldown: Duration,
    /// The state bucket, while it holds records of the protocol before v2: the
    /// workers then treat an order recorded final there as done
    /// (`LEGACY_STATE_BUCKET`). Set by the controller from what NATS holds.
    pub legacy_bucket: Option<String>,
    /// The live Deployment runs workers of the protocol before v2: this rollout
    /// is `Recreate`, so that old and new workers never share the consumer (an
    /// old worker does not see v2's outcomes). Set by the controller.
    pub replaces_old_protocol: bool,
}

/// A spec the operator cannot act on, with what to change.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("{0}")]
pub struct InvalidSpec(pub String);

fn dur(field: &str, value: &str) -> Result<Duration, InvalidSpec> {
    parse_duration(value).map_err(|e| InvalidSpec(format!("spec.{field}: {e}")))
}

/// Every duration of the spec, parsed once (a bad one names its field).
struct Durations {
    ack_wait: Duration,
    backoff: Vec<Duration>,
    max_age: Duration,
    duplicate_window: Duration,
    dlq_max_age: Duration,
    bucket_ttl: Duration,
    shutdown_grace: Duration,
    downstream_timeout: Duration,
    retry_initial: Duration,
    retry_max: Duration,
    nak_initial: Duration,
    nak_max: Duration,
    stabilization_window: Duration,
    cooldown: Duration,
}

impl Durations {
    fn parse(s: &crate::crd::OrderPipelineSpec) -> Result<Self, InvalidSpec> {
        let (r, sc) = (&s.workers.retry, &s.workers.scaling);
        Ok(Self {
            ack_wait: dur("consumer.ackWait", &s.consumer.ack_wait)?,
            backoff: s
                .consumer
                .backoff
                .iter()
                .enumerate()
                .map(|(i, b)| dur(&format!("consumer.backoff[{i}]"), b))
                .collect::<Result<Vec<_>, _>>()?,
            max_age: dur("stream.maxAge", &s.stream.max_age)?,
            duplicate_window: dur("stream.duplicateWindow", &s.stream.duplicate_window)?,
            dlq_max_age: dur("deadLetter.maxAge", &s.dead_letter.max_age)?,
            bucket_ttl: dur("state.ttl", &s.state.ttl)?,
            shutdown_grace: dur("workers.shutdownGrace", &s.workers.shutdown_grace)?,
            downstream_timeout: dur("workers.downstreamTimeout", &s.workers.downstream_timeout)?,
            retry_initial: dur("workers.retry.initialBackoff", &r.initial_backoff)?,
            retry_max: dur("workers.retry.maxBackoff", &r.max_backoff)?,
            nak_initial: dur("workers.retry.nakInitialDelay", &r.nak_initial_delay)?,
            nak_max: dur("workers.retry.nakMaxDelay", &r.nak_max_delay)?,
            stabilization_window: dur(
                "workers.scaling.stabilizationWindow",
                &sc.stabilization_window,
            )?,
            cooldown: dur("workers.scaling.cooldown", &sc.cooldown)?,
        })
    }
}

/// What CEL cannot check: pairs of fields, and the filter inside the subjects.
fn check(s: &crate::crd::OrderPipelineSpec, d: &Durations) -> Result<(), InvalidSpec> {
    let r = &s.workers.retry;
    if d.retry_initial > d.retry_max {
        return Err(InvalidSpec(format!(
            "spec.workers.retry.initialBackoff ({}) is longer than maxBackoff ({}); make it the shorter one",
            r.initial_backoff, r.max_backoff
        )));
    }
    if d.nak_initial > d.nak_max {
        return Err(InvalidSpec(format!(
            "spec.workers.retry.nakInitialDelay ({}) is longer than nakMaxDelay ({}); make it the shorter one",
            r.nak_initial_delay, r.nak_max_delay
        )));
    }
    if let (Some(min), Some(max)) = (s.workers.min_replicas, s.workers.max_replicas)
        && min > max
    {
        return Err(InvalidSpec(format!(
            "spec.workers.minReplicas ({min}) exceeds maxReplicas ({max})"
        )));
    }
    let filter = &s.consumer.filter_subject;
    if !s
        .stream
        .subjects
        .iter()
        .any(|p| orderpipeline_common::names::subject_matches(p, filter))
    {
        return Err(InvalidSpec(format!(
            "spec.consumer.filterSubject {filter} is not captured by spec.stream.subjects {:?}; add it to the stream's subjects",
            s.stream.subjects
        )));
    }
    for (i, v) in s.workers.env.iter().enumerate() {
        if CONTRACT_ENV.contains(&v.name.as_str()) {
            return Err(InvalidSpec(format!(
                "spec.workers.env[{i}] sets {}, which the operator renders from the pipeline's spec (it is part of the operator -> worker contract); remove it and set the matching spec field",
                v.name
            )));
        }
        let from = v.value_from.as_ref();
        if let Some(kind) = from.and_then(|f| {
            (f.secret_key_ref.is_some().then_some("secretKeyRef"))
                .or(f.config_map_key_ref.is_some().then_some("configMapKeyRef"))
        }) {
            return Err(InvalidSpec(format!(
                "spec.workers.env[{i}] ({}) uses valueFrom.{kind}; {}",
                v.name,
                crate::crd::ENV_FROM_REFUSED
            )));
        }
    }
    Ok(())
}

/// The pipeline's JetStream objects, checked by the topology's own rules.
fn topology(p: &OrderPipeline, d: &Durations) -> Result<Topology, InvalidSpec> {
    let s = &p.spec;
    let max_workers = s.workers.max_replicas.unwrap_or(s.workers.replicas).max(1);
    let max_ack_pending = s
        .consumer
        .max_ack_pending
        .unwrap_or(i64::from(max_workers) * i64::from(s.workers.pool_size));
    let owner = format!(
        "{}/{}",
        p.meta().namespace.clone().unwrap_or_default(),
        p.meta().name.clone().unwrap_or_default()
    );
    use async_nats::jetstream::stream::{RetentionPolicy, StorageType};
    let topology = Topology {
        stream: s.stream.name.clone(),
        subjects: s.stream.subjects.clone(),
        retention: match s.stream.retention {
            Retention::Limits => RetentionPolicy::Limits,
            Retention::Interest => RetentionPolicy::Interest,
            Retention::WorkQueue => RetentionPolicy::WorkQueue,
        },
        storage: match s.stream.storage {
            Storage::File => StorageType::File,
            Storage::Memory => StorageType::Memory,
        },
        replicas: usize::try_from(s.stream.replicas).unwrap_or(1),
        max_age: d.max_age,
        max_bytes: s.stream.max_bytes,
        duplicate_window: d.duplicate_window,
        dlq_stream: s.dlq_stream(),
        dlq_subject: s.dlq_subject(),
        dlq_max_age: d.dlq_max_age,
        bucket: s.state_bucket(),
        bucket_ttl: d.bucket_ttl,
        consumer: s.consumer.name.clone(),
        filter_subject: s.consumer.filter_subject.clone(),
        ack_wait: d.ack_wait,
        max_ack_pending,
        backoff: d.backoff.clone(),
        owner: Some(owner),
        // Set by the reconcile, which knows the cluster identity.
        idempotency_scope: None,
    };
    topology
        .validate()
        .map_err(|e| InvalidSpec(e.to_string()))?;
    Ok(topology)
}

/// `Some(message)` when the duplicate window is shorter than the redelivery
/// horizon: how long after its first delivery an order can still be redelivered.
fn window_warning(s: &crate::crd::OrderPipelineSpec, d: &Durations) -> Option<String> {
    let max_deliveries = u32::try_from(s.consumer.max_attempts).unwrap_or(1);
    // Time one delivery may take inside the worker: its retries plus the downstream timeouts.
    let attempts = u32::try_from(s.workers.retry.attempts_per_delivery).unwrap_or(1);
    let per_delivery = (d.retry_max + d.downstream_timeout) * attempts;
    let horizon = redelivery_horizon(
        d.ack_wait,
        &d.backoff,
        max_deliveries,
        d.nak_max,
        per_delivery,
    );
    (d.duplicate_window < horizon).then(|| {
        let h = orderpipeline_common::duration::format_duration(horizon);
        format!(
            "stream.duplicateWindow {} is shorter than the redelivery horizon {h} ({} deliveries, ack wait {}, NAK delay up to {}): a producer re-sending an order later than the window stores it again (the workers answer it with the order's existing outcome, so exactly-once holds); raise duplicateWindow to at least {h} to keep such re-sends out of the stream",
            s.stream.duplicate_window, max_deliveries, s.consumer.ack_wait, s.workers.retry.nak_max_delay,
        )
    })
}

/// Parses and checks the spec (what CEL could not), and builds the topology.
pub fn plan(p: &OrderPipeline) -> Result<Plan, InvalidSpec> {
    let s = &p.spec;
    let d = Durations::parse(s)?;
    check(s, &d)?;
    let topology = topology(p, &d)?;
    Ok(Plan {
        topology,
        ack_wait: d.ack_wait,
        max_deliveries: u32::try_from(s.consumer.max_attempts).unwrap_or(1),
        nak_max_delay: d.nak_max,
        shutdown_grace: d.shutdown_grace,
        window_warning: window_warning(s, &d),
        stabilization_window: d.stabilization_window,
        cooldown: d.cooldown,
        legacy_bucket: None,
        replaces_old_protocol: false,
    })
}

/// The NATS objects and subjects a pipeline uses, for the conflict check.
pub struct Footprint {
    /// `<namespace>/<name>`.
    name: String,
    url: String,
    objects: Vec<(&'static str, String, String)>,
    subjects: Vec<String>,
}

fn footprint(p: &OrderPipeline, t: &Topology) -> Footprint {
    let mut subjects = t.stream_subjects();
    subjects.push(t.dlq_subject.clone());
    Footprint {
        name: pipeline_name(p),
        url: p.spec.nats.url.trim().to_string(),
        // (what, its name, the JetStream stream behind it: a bucket is `KV_<name>`)
        objects: vec![
            ("stream", t.stream.clone(), t.stream.clone()),
            ("stream", t.dlq_stream.clone(), t.dlq_stream.clone()),
            ("KV bucket", t.bucket.clone(), format!("KV_{}", t.bucket)),
        ],
        subjects,
    }
}

fn pipeline_name(p: &OrderPipeline) -> String {
    format!(
        "{}/{}",
        p.meta().namespace.clone().unwrap_or_default(),
        p.meta().name.clone().unwrap_or_default()
    )
}

/// The other pipelines' footprints, each rendered once per spec (its uid and
/// generation): every reconcile checks its pipeline against all the others,
/// and rendering each one's plan every time made a reconcile cost O(N) plans
/// (most of the operator's CPU when 500 pipelines were created at once).
#[derive(Default)]
pub struct Footprints(std::sync::Mutex<std::collections::HashMap<String, Remembered>>);

/// A footprint and the generation it was rendered from (`None`: the spec does
/// not render, so it conflicts with nothing).
type Remembered = (i64, Option<std::sync::Arc<Footprint>>);

impl Footprints {
    fn of(&self, q: &OrderPipeline) -> Option<std::sync::Arc<Footprint>> {
        let render = || {
            plan(q)
                .ok()
                .map(|pl| std::sync::Arc::new(footprint(q, &pl.topology)))
        };
        let (Some(uid), Some(generation)) = (q.meta().uid.as_ref(), q.meta().generation) else {
            return render();
        };
        if let Some((g, f)) = self.0.lock().unwrap().get(uid)
            && *g == generation
        {
            return f.clone();
        }
        let f = render();
        self.0
            .lock()
            .unwrap()
            .insert(uid.clone(), (generation, f.clone()));
        f
    }

    /// Forgets the pipelines that are gone (once the map holds twice as many
    /// as there are).
    fn prune(&self, live: &[std::sync::Arc<OrderPipeline>]) {
        let mut m = self.0.lock().unwrap();
        if m.len() > 2 * live.len() + 16 {
            let uids: std::collections::HashSet<&str> = live
                .iter()
                .filter_map(|q| q.meta().uid.as_deref())
                .collect();
            m.retain(|uid, _| uids.contains(uid.as_str()));
        }
    }
}

/// Refuses a pipeline whose streams, bucket or subjects another pipeline on the
/// same NATS server already uses: pipelines are isolated (the same order id in
/// two pipelines is two orders, and one pipeline's results never land in
/// another's stream). The older pipeline (by creation time, then name) keeps
/// them; the message names the other pipeline and the field to change.
pub fn conflicts(
    p: &OrderPipeline,
    mine: &Plan,
    others: &[std::sync::Arc<OrderPipeline>],
    footprints: &Footprints,
    scope_of: &dyn Fn(&OrderPipeline) -> Option<String>,
) -> Result<(), InvalidSpec> {
    footprints.prune(others);
    let me = footprint(p, &mine.topology);
    let my_scope = scope_of(p);
    let my_time = p.meta().creation_timestamp.as_ref();
    for q in others {
        if q.meta().deletion_timestamp.is_some() {
            continue;
        }
        // The newer one is refused, not this one.
        let their_time = q.meta().creation_timestamp.as_ref();
        if their_time > my_time {
            continue;
        }
        let Some(them) = footprints.of(q) else {
            continue;
        };
        if them.name == me.name || (their_time == my_time && them.name > me.name) {
            continue;
        }
        // One NATS account is one namespace of subjects and streams: compare
        // accounts where both are known (another account on the same server
        // cannot collide; the same account under another URL can), else URLs.
        let same_place = match (&my_scope, scope_of(q)) {
            (Some(a), Some(b)) => *a == b,
            _ => them.url == me.url,
        };
        if !same_place {
            continue;
        }
        // Another tenant's pipeline is not named, nor its subjects.
        let same_namespace = q.meta().namespace == p.meta().namespace;
        let other_name = match same_namespace {
            true => format!("pipeline {}", them.name),
            false => "a pipeline in another namespace".to_string(),
        };
        for (kind, name, js_name) in &me.objects {
            if them.objects.iter().any(|(_, _, n)| n == js_name) {
                let field = match *kind {
                    "KV bucket" => "spec.state.bucket",
                    _ if *name == mine.topology.stream => "spec.stream.name",
                    _ => "spec.deadLetter.streamName",
                };
                return Err(InvalidSpec(format!(
                    "{kind} {name} belongs to {other_name} on the same NATS server and account; every pipeline needs its own: set {field} to another name"
                )));
            }
        }
        for mine in &me.subjects {
            if let Some(theirs) = them
                .subjects
                .iter()
                .find(|t| orderpipeline_common::names::subjects_overlap(mine, t))
            {
                let theirs = match same_namespace {
                    true => format!("{theirs} of {other_name}"),
                    false => format!("a subject of {other_name}"),
                };
                return Err(InvalidSpec(format!(
                    "subject {mine} overlaps {theirs} on the same NATS server and account (inputs, results and dead letters of two pipelines must not mix); give this pipeline its own subjects: spec.stream.subjects and spec.consumer.filterSubject (results go to <filter prefix>.processed|rejected|deadlettered.<key>), spec.deadLetter.subject"
                )));
            }
        }
    }
    Ok(())
}

/// What an administrator allows pipelines to use (operator flags; empty: anything).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Allowlists {
    /// Prefixes a `spec.workers.image` must start with (`ALLOWED_IMAGES`).
    pub images: Vec<String>,
    /// NATS hosts, lowercase: a name, or `*.suffix` for every name under it
    /// (`ALLOWED_NATS_HOSTS`).
    pub nats_hosts: Vec<String>,
}

impl Allowlists {
    /// The lists as given on the command line: entries trimmed, blanks
    /// dropped, hosts lowercased (once, not on every check).
    pub fn new(images: &[String], nats_hosts: &[String]) -> Self {
        let listed = |v: &[String]| -> Vec<String> {
            v.iter()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect()
        };
        let mut nats_hosts = listed(nats_hosts);
        nats_hosts.iter_mut().for_each(|h| h.make_ascii_lowercase());
        Self {
            images: listed(images),
            nats_hosts,
        }
    }
}

/// The host of one NATS URL (`nats://user:pw@host:4222` -> `host`, `[::1]:4222`
/// -> `::1`), as the client parses it; lowercase.
fn url_host(url: &str) -> String {
    let url = url.trim();
    url.parse::<async_nats::ServerAddr>()
        .map_or_else(|_| url.to_string(), |a| a.host().to_string())
        .to_ascii_lowercase()
}

/// Why the spec uses what `allow` does not permit, naming the field, the
/// value and what is allowed; `None` when it is allowed.
pub fn not_allowed(p: &OrderPipeline, allow: &Allowlists) -> Option<String> {
    if let Some(image) = &p.spec.workers.image
        && !allow.images.is_empty()
        && !allow.images.iter().any(|a| image.starts_with(a.as_str()))
    {
        return Some(format!(
            "spec.workers.image {image} is not among the images this operator allows (prefixes {}); use one of them, or ask the administrator to add it to --allowed-images",
            allow.images.join(", ")
        ));
    }
    if allow.nats_hosts.is_empty() {
        return None;
    }
    let allowed = |host: &str| {
        allow.nats_hosts.iter().any(|a| match a.strip_prefix("*.") {
            Some(suffix) => host.strip_suffix(suffix).is_some_and(|h| h.ends_with('.')),
            None => host == a,
        })
    };
    let refused = orderpipeline_common::nats::servers(&p.spec.nats.url)
        .map(url_host)
        .find(|h| !allowed(h))?;
    Some(format!(
        "spec.nats.url names host {refused}, which this operator does not allow (allowed: {}); use an allowed NATS server, or ask the administrator to add it to --allowed-nats-hosts",
        allow.nats_hosts.join(", ")
    ))
}

/// Whether the spec sends credentials over a URL without TLS: a
/// `credentialsSecretRef` with a plain `nats://` (or `ws://`, or scheme-less)
/// URL and no `tlsSecretRef`. The refusal names the fields and the ways out.
pub fn credentials_in_clear(p: &OrderPipeline) -> Option<String> {
    let n = &p.spec.nats;
    let field = match (&n.credentials_secret_ref, &n.account_ref) {
        (Some(s), _) => format!("spec.nats.credentialsSecretRef ({})", s.name),
        (None, Some(a)) => format!("spec.nats.accountRef ({}, minted credentials)", a.name),
        (None, None) => return None,
    };
    if n.tls_secret_ref.is_some() {
        return None;
    }
    let plain = orderpipeline_common::nats::servers(&n.url)
        .find(|u| !(u.starts_with("tls://") || u.starts_with("wss://")))?;
    Some(format!(
        "{field} would send credentials in clear text to {plain}: use a tls:// URL or set spec.nats.tlsSecretRef; where the network is trusted, the operator's --allow-plaintext-credentials (chart value allowPlaintextCredentials) permits it"
    ))
}

/// The worker container's resources when the spec sets none: a request the
/// scheduler can count (a worker at the default pool size idles at a few MiB
/// and a few millicores) and a memory limit, so that one worker cannot take a
/// node's memory; no CPU limit (throttling would only slow the acks down).
pub fn default_worker_resources() -> k8s_openapi::api::core::v1::ResourceRequirements {
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    let q = |v: &str| Quantity(v.to_string());
    k8s_openapi::api::core::v1::ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_string(), q("50m")),
            ("memory".to_string(), q("64Mi")),
        ])),
        limits: Some(BTreeMap::from([("memory".to_string(), q("512Mi"))])),
        ..Default::default()
    }
}

pub fn deployment_name(p: &OrderPipeline) -> String {
    format!("{}-workers", p.meta().name.clone().unwrap_or_default())
}

/// The metadata of an object the operator keeps beside the workers'
/// Deployment (their NetworkPolicy, their PodDisruptionBudget): the same name,
/// the workers' labels and the operator's, owned by the pipeline.
pub fn workers_object_meta(p: &OrderPipeline) -> ObjectMeta {
    let mut labels = selector_labels(p);
    labels.insert(
        "app.kubernetes.io/managed-by".into(),
        "order-operator".into(),
    );
    ObjectMeta {
        name: Some(deployment_name(p)),
        namespace: p.meta().namespace.clone(),
        labels: Some(labels),
        owner_references: p.controller_owner_ref(&()).map(|o| vec![o]),
        ..Default::default()
    }
}

pub fn selector_labels(p: &OrderPipeline) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            PIPELINE_LABEL.to_string(),
            p.meta().name.clone().unwrap_or_default(),
        ),
        (COMPONENT_LABEL.to_string(), "worker".to_string()),
    ])
}

/// The label selector string for `status.selector`.
pub fn selector_string(p: &OrderPipeline) -> String {
    selector_labels(p)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        value_from: None,
    }
}

fn env_secret(name: &str, secret: &str, key: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: None,
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.into(),
                key: key.into(),
                optional: Some(false),
            }),
            ..Default::default()
        }),
    }
}

fn env_field(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                api_version: None,
            }),
            ..Default::default()
        }),
    }
}

/// Worker variables that carry the pipeline's spec to the workers: `workers.env`
/// may not set them (the spec's fields do). Others, e.g. `OTEL_*` or `RUST_LOG`,
/// it may set or override.
pub const CONTRACT_ENV: &[&str] = &[
    "POD_NAME",
    "POD_NAMESPACE",
    "NATS_URL",
    "NATS_USER",
    "NATS_PASSWORD",
    "NATS_TOKEN",
    "NATS_CREDS_FILE",
    "NATS_NKEY_SEED_FILE",
    "NATS_TLS_CA_FILE",
    "NATS_TLS_CERT_FILE",
    "NATS_TLS_KEY_FILE",
    "WORKER_POOL_SIZE",
    "STREAM_NAME",
    "CONSUMER_NAME",
    "INPUT_SUBJECT",
    "DLQ_STREAM",
    "PIPELINE",
    "LEGACY_STATE_BUCKET",
    "RETRY_ATTEMPTS",
    "RETRY_INITIAL_BACKOFF",
    "RETRY_MAX_BACKOFF",
    "MAX_DELIVERIES",
    "NAK_INITIAL_DELAY",
    "NAK_MAX_DELAY",
    "HTTP_ADDR",
    "SHUTDOWN_GRACE",
    "DOWNSTREAM_URL",
    "DOWNSTREAM_TIMEOUT",
    "CREATE_TOPOLOGY",
];

/// The worker container's environment: exactly the worker's flags (see
/// `order-worker --help`), then the user's extra env, which replaces a rendered
/// variable of the same name (only non-contract ones, see [`CONTRACT_ENV`]).
pub fn worker_env(p: &OrderPipeline, plan: &Plan, secrets: &SecretsView) -> Vec<EnvVar> {
    let s = &p.spec;
    let name = p.meta().name.clone().unwrap_or_default();
    let ns = p.meta().namespace.clone().unwrap_or_default();
    let t = &plan.topology;
    let mut e = vec![
        env_field("POD_NAME", "metadata.name"),
        env_field("POD_NAMESPACE", "metadata.namespace"),
        env("NATS_URL", &s.nats.url),
        env("WORKER_POOL_SIZE", s.workers.pool_size.to_string()),
        env("STREAM_NAME", &t.stream),
        env("CONSUMER_NAME", &t.consumer),
        env("INPUT_SUBJECT", &t.filter_subject),
        env("DLQ_STREAM", &t.dlq_stream),
        env("PIPELINE", format!("{ns}/{name}")),
        env(
            "RETRY_ATTEMPTS",
            s.workers.retry.attempts_per_delivery.to_string(),
        ),
        env("RETRY_INITIAL_BACKOFF", &s.workers.retry.initial_backoff),
        env("RETRY_MAX_BACKOFF", &s.workers.retry.max_backoff),
        env("MAX_DELIVERIES", s.consumer.max_attempts.to_string()),
        env("NAK_INITIAL_DELAY", &s.workers.retry.nak_initial_delay),
        env("NAK_MAX_DELAY", &s.workers.retry.nak_max_delay),
        env("HTTP_ADDR", format!("0.0.0.0:{WORKER_HTTP_PORT}")),
        env("SHUTDOWN_GRACE", &s.workers.shutdown_grace),
        env("OTEL_SERVICE_NAME", "order-worker"),
        env(
            "OTEL_RESOURCE_ATTRIBUTES",
            format!("orderpipeline.name={name},k8s.namespace.name={ns},k8s.pod.name=$(POD_NAME)"),
        ),
        env("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
        env(
            "OTEL_TRACES_SAMPLER_ARG",
            s.telemetry.sampling_ratio.to_string(),
        ),
    ];
    if let Some(b) = &plan.legacy_bucket {
        e.push(env("LEGACY_STATE_BUCKET", b));
    }
    if let Some(u) = &s.workers.downstream_url {
        e.push(env("DOWNSTREAM_URL", u));
        e.push(env("DOWNSTREAM_TIMEOUT", &s.workers.downstream_timeout));
    }
    if let Some(ep) = &s.telemetry.otlp_endpoint {
        e.push(env("OTEL_EXPORTER_OTLP_ENDPOINT", ep));
    }
    if let Some((secret, kind)) = &secrets.credentials {
        match kind {
            Credentials::UserPassword => {
                e.push(env_secret("NATS_USER", secret, "user"));
                e.push(env_secret("NATS_PASSWORD", secret, "password"));
            }
            Credentials::Token => e.push(env_secret("NATS_TOKEN", secret, "token")),
            Credentials::CredsFile => {
                e.push(env("NATS_CREDS_FILE", format!("{CREDS_MOUNT}/creds")))
            }
            Credentials::NkeySeed => {
                e.push(env("NATS_NKEY_SEED_FILE", format!("{CREDS_MOUNT}/nkey")))
            }
        }
    }
    if let Some(prefix) = &secrets.inbox_prefix {
        e.push(env("NATS_INBOX_PREFIX", prefix));
    }
    if let Some((_, client_cert)) = &secrets.tls {
        e.push(env("NATS_TLS_CA_FILE", format!("{TLS_MOUNT}/ca.crt")));
        if *client_cert {
            e.push(env("NATS_TLS_CERT_FILE", format!("{TLS_MOUNT}/tls.crt")));
            e.push(env("NATS_TLS_KEY_FILE", format!("{TLS_MOUNT}/tls.key")));
        }
    }
    e.retain(|v| !s.workers.env.iter().any(|u| u.name == v.name));
    e.extend(s.workers.env.iter().cloned());
    e
}

fn probe(path: &str) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(WORKER_HTTP_PORT),
            ..Default::default()
        }),
        period_seconds: Some(10),
        failure_threshold: Some(3),
        ..Default::default()
    }
}

/// The worker Deployment. `replicas` is `None` when someone else owns the field.
/// Whether the rollout onto `live` must be `Recreate`: its pods run workers of
/// the protocol before v2 (no protocol annotation on the template), or such a
/// `Recreate` rollout is still going on (switching to a rolling update half way
/// would start new workers beside old ones).
pub fn replaces_old_protocol(live: &Deployment) -> bool {
    let Some(spec) = live.spec.as_ref() else {
        return false;
    };
    let speaks_v2 = spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.annotations.as_ref())
        .and_then(|a| a.get(PROTOCOL_ANNOTATION))
        .is_some_and(|v| v == PROTOCOL_VERSION);
    let recreating = spec
        .strategy
        .as_ref()
        .is_some_and(|s| s.type_.as_deref() == Some("Recreate"));
    let status = live.status.clone().unwrap_or_default();
    let rolled_out = status.observed_generation >= live.metadata.generation
        && status.replicas.unwrap_or(0) == status.updated_replicas.unwrap_or(0);
    !speaks_v2 || (recreating && !rolled_out)
}

/// The merge patch that gives `live` the rollout strategy the plan needs, if it
/// has another: `Recreate` (its `rollingUpdate` defaults removed, which the API
/// server requires and an apply cannot do) while old workers are replaced, the
/// default rolling update otherwise. Sent before the Deployment is applied, so
/// that a template change rolls out with it. The strategy is left out of the
/// applied Deployment for the same reason.
pub fn strategy_patch(live: &Deployment, recreate: bool) -> Option<serde_json::Value> {
    let current = live
        .spec
        .as_ref()
        .and_then(|s| s.strategy.as_ref())
        .and_then(|s| s.type_.as_deref())
        .unwrap_or("RollingUpdate");
    match (recreate, current) {
        (true, "Recreate") | (false, "RollingUpdate") => None,
        (true, _) => Some(serde_json::json!({
            "spec": {"strategy": {"type": "Recreate", "rollingUpdate": null}}
        })),
        (false, _) => Some(serde_json::json!({
            "spec": {"strategy": {"type": "RollingUpdate"}}
        })),
    }
}

pub fn deployment(
    p: &OrderPipeline,
    plan: &Plan,
    secrets: &SecretsView,
    default_image: &str,
    replicas: Option<i32>,
) -> Deployment {
    let s = &p.spec;
    let mut labels = selector_labels(p);
    labels.insert("app.kubernetes.io/name".into(), "order-worker".into());
    labels.insert(
        "app.kubernetes.io/instance".into(),
        p.meta().name.clone().unwrap_or_default(),
    );
    labels.insert(
        "app.kubernetes.io/managed-by".into(),
        "order-operator".into(),
    );
    let mut annotations = BTreeMap::from([(
        PROTOCOL_ANNOTATION.to_string(),
        PROTOCOL_VERSION.to_string(),
    )]);
    if let Some(c) = &secrets.checksum {
        annotations.insert(CHECKSUM_ANNOTATION.to_string(), c.clone());
    }
    let (volumes, mounts) = secret_volumes(secrets);
    let grace = i64::try_from(plan.shutdown_grace.as_secs()).unwrap_or(25) + 5;
    let image = s
        .workers
        .image
        .clone()
        .unwrap_or_else(|| default_image.to_string());
    let container = worker_container(image, worker_env(p, plan, secrets), mounts, s);
    Deployment {
        metadata: ObjectMeta {
            name: Some(deployment_name(p)),
            namespace: p.meta().namespace.clone(),
            labels: Some(labels.clone()),
            owner_references: p.controller_owner_ref(&()).map(|o| vec![o]),
            ..Default::default()
        },
        spec: Some(DeploymentSpec {
            replicas,
            selector: LabelSelector {
                match_labels: Some(selector_labels(p)),
                match_expressions: None,
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    annotations: Some(annotations),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    topology_spread_constraints: crate::disruption::worker_spread(p),
                    ..pod_spec(container, grace, volumes, s)
                }),
            },
            ..Default::default()
        }),
        status: None,
    }
}

/// The Secrets whose contents the worker reads as files: read-only volumes and
/// their mounts.
fn secret_volumes(secrets: &SecretsView) -> (Vec<Volume>, Vec<VolumeMount>) {
    let mut file_secrets: Vec<(&str, &str, &str)> = Vec::new();
    if let Some((secret, kind)) = &secrets.credentials
        && matches!(kind, Credentials::CredsFile | Credentials::NkeySeed)
    {
        file_secrets.push(("nats-credentials", secret, CREDS_MOUNT));
    }
    if let Some((secret, _)) = &secrets.tls {
        file_secrets.push(("nats-tls", secret, TLS_MOUNT));
    }
    let volumes = file_secrets
        .iter()
        .map(|(name, secret, _)| Volume {
            name: (*name).into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some((*secret).into()),
                default_mode: Some(0o440),
                ..Default::default()
            }),
            ..Default::default()
        })
        .collect();
    let mounts = file_secrets
        .iter()
        .map(|(name, _, path)| VolumeMount {
            name: (*name).into(),
            mount_path: (*path).into(),
            read_only: Some(true),
            ..Default::default()
        })
        .collect();
    (volumes, mounts)
}

/// The worker container: probes, the restricted security context.
fn worker_container(
    image: String,
    env: Vec<EnvVar>,
    mounts: Vec<VolumeMount>,
    s: &crate::crd::OrderPipelineSpec,
) -> Container {
    Container {
        name: "worker".into(),
        image: Some(image),
        env: Some(env),
        ports: Some(vec![ContainerPort {
            name: Some("http".into()),
            container_port: WORKER_HTTP_PORT,
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        liveness_probe: Some(probe("/livez")),
        readiness_probe: Some(probe("/readyz")),
        resources: Some(
            s.workers
                .resources
                .clone()
                .unwrap_or_else(default_worker_resources),
        ),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                add: None,
            }),
            ..Default::default()
        }),
        volume_mounts: (!mounts.is_empty()).then_some(mounts),
        ..Default::default()
    }
}

/// The pod: non-root with the default seccomp profile, no API token, the
/// placement the spec asks for.
fn pod_spec(
    container: Container,
    grace: i64,
    volumes: Vec<Volume>,
    s: &crate::crd::OrderPipelineSpec,
) -> PodSpec {
    PodSpec {
        containers: vec![container],
        termination_grace_period_seconds: Some(grace),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(65532),
            run_as_group: Some(65532),
            // The Secret volumes (NATS creds, nkey, TLS) are root's files; the
            // kubelet gives them this group (and its read bit), so the worker,
            // not root, can read them.
            fs_group: Some(65532),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                localhost_profile: None,
            }),
            ..Default::default()
        }),
        node_selector: (!s.workers.node_selector.is_empty())
            .then(|| s.workers.node_selector.clone()),
        tolerations: (!s.workers.tolerations.is_empty()).then(|| s.workers.tolerations.clone()),
        affinity: s.workers.affinity.clone(),
        volumes: (!volumes.is_empty()).then_some(volumes),
        automount_service_account_token: Some(false),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> OrderPipeline {
        let mut p: OrderPipeline = serde_yaml::from_str(
            r#"
apiVersion: orderpipeline.dev/v1alpha1
kind: OrderPipeline
metadata: {name: orders, namespace: shop, uid: "1234"}
spec:
  nats: {url: "nats://127.0.0.1:4222"}
  workers: {poolSize: 20, replicas: 2, maxReplicas: 5, downstreamUrl: "http://127.0.0.1:9000/charge"}
  telemetry: {otlpEndpoint: "http://127.0.0.1:4317", samplingRatio: 0.5}
"#,
        )
        .unwrap();
        p.metadata.uid = Some("1234".into());
        p
    }

    /// A pipeline from YAML, created at second `created` of the epoch.
    fn pipeline(yaml: &str, created: i64) -> std::sync::Arc<OrderPipeline> {
        let mut p: OrderPipeline = serde_yaml::from_str(yaml).unwrap();
        p.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::from_second(created).unwrap(),
        ));
        std::sync::Arc::new(p)
    }

    fn conflict(p: &OrderPipeline, others: &[std::sync::Arc<OrderPipeline>]) -> Option<String> {
        let pl = plan(p).unwrap();
        conflicts(p, &pl, others, &Footprints::default(), &|_| None)
            .err()
            .map(|e| e.0)
    }

    #[test]
    fn unset_names_derive_from_the_stream_and_the_filter() {
        let shop = pipeline(
            "{apiVersion: orderpipeline.dev/v1alpha1, kind: OrderPipeline, metadata: {name: shop, namespace: b}, spec: {nats: {url: 'nats://n:4222'}, stream: {name: SHOP, subjects: [SHOP.*]}, consumer: {filterSubject: SHOP.created}}}",
            2,
        );
        let t = plan(&shop).unwrap().topology;
        assert_eq!(t.dlq_stream, "SHOP_DLQ");
        assert_eq!(t.bucket, "SHOP_STATE");
        assert_eq!(t.dlq_subject, "DLQ.SHOP.created");
        assert_eq!(
            t.stream_subjects(),
            [
                "SHOP.*",
                "SHOP.processed.*",
                "SHOP.rejected.*",
                "SHOP.deadlettered.*",
                "SHOP.kept.*"
            ]
        );
        let d = plan(&sample()).unwrap().topology;
        assert_eq!(
            (
                d.stream.as_str(),
                d.dlq_stream.as_str(),
                d.bucket.as_str(),
                d.dlq_subject.as_str()
            ),
            ("ORDERS", "ORDERS_DLQ", "ORDERS_STATE", "DLQ.ORDER.created"),
            "today's names stay the defaults"
        );
    }

    #[test]
    fn a_second_pipeline_on_the_same_objects_or_subjects_is_refused_naming_the_first() {
        let y = |name: &str, extra: &str| {
            format!(
                "{{apiVersion: orderpipeline.dev/v1alpha1, kind: OrderPipeline, metadata: {{name: {name}, namespace: ns}}, spec: {{nats: {{url: 'nats://n:4222'}}{extra}}}}}"
            )
        };
        let first = pipeline(&y("orders", ""), 1);
        let all = |p: &std::sync::Arc<OrderPipeline>| vec![first.clone(), p.clone()];
        // The same defaults: the stream is the first's.
        let twin = pipeline(&y("twin", ""), 2);
        let e = conflict(&twin, &all(&twin)).unwrap();
        assert!(
            e.contains("stream ORDERS belongs to pipeline ns/orders")
                && e.contains("spec.stream.name"),
            "{e}"
        );
        assert_eq!(
            conflict(&first, &all(&twin)),
            None,
            "the older one keeps its objects"
        );
        // Its own stream but subjects that capture the first's results.
        let greedy = pipeline(
            &y(
                "greedy",
                ", stream: {name: ALL, subjects: ['ORDER.created']}, consumer: {filterSubject: ORDER.created}",
            ),
            2,
        );
        let e = conflict(&greedy, &all(&greedy)).unwrap();
        assert!(e.contains("overlaps") && e.contains("ns/orders"), "{e}");
        // Its own stream, subjects and derived names: fine.
        let shop = pipeline(
            &y(
                "shop",
                ", stream: {name: SHOP, subjects: ['SHOP.*']}, consumer: {filterSubject: SHOP.created}",
            ),
            2,
        );
        assert_eq!(conflict(&shop, &all(&shop)), None);
        // ... unless it names the first's DLQ.
        let shared = pipeline(
            &y(
                "shared",
                ", stream: {name: SHOP, subjects: ['SHOP.*']}, consumer: {filterSubject: SHOP.created}, deadLetter: {streamName: ORDERS_DLQ}",
            ),
            2,
        );
        let e = conflict(&shared, &all(&shared)).unwrap();
        assert!(
            e.contains("ORDERS_DLQ") && e.contains("spec.deadLetter.streamName"),
            "{e}"
        );
        // Another NATS server: no conflict.
        let elsewhere = pipeline(&y("twin", "").replace("nats://n:4222", "nats://m:4222"), 2);
        assert_eq!(conflict(&elsewhere, &all(&elsewhere)), None);
        // Another namespace's pipeline: refused, without its name or its subjects.
        let tenant = pipeline(
            &y(
                "greedy",
                ", stream: {name: ALL, subjects: ['ORDER.created']}, consumer: {filterSubject: ORDER.created}",
            )
            .replace("namespace: ns", "namespace: other"),
            2,
        );
        let e = conflict(&tenant, &all(&tenant)).unwrap();
        assert!(
            e.contains("overlaps a subject of a pipeline in another namespace")
                && !e.contains("ns/orders")
                && !e.contains("ORDER.*"),
            "{e}"
        );
        let twin = pipeline(
            &y("twin", "").replace("namespace: ns", "namespace: other"),
            2,
        );
        let e = conflict(&twin, &all(&twin)).unwrap();
        assert!(
            e.contains("stream ORDERS belongs to a pipeline in another namespace")
                && !e.contains("ns/orders"),
            "{e}"
        );
    }

    /// Where both accounts are known they decide, not the URLs: the same
    /// subjects in two accounts of one server do not collide (no squatting
    /// across accounts), the same account under two spellings of its URL does.
    #[test]
    fn the_check_compares_nats_accounts_where_the_server_says_them() {
        let y = |name: &str, url: &str| {
            format!(
                "{{apiVersion: orderpipeline.dev/v1alpha1, kind: OrderPipeline, metadata: {{name: {name}, namespace: ns}}, spec: {{nats: {{url: '{url}'}}}}}}"
            )
        };
        let first = pipeline(&y("first", "nats://nats.nats.svc:4222"), 1);
        let check = |p: &std::sync::Arc<OrderPipeline>, scopes: [(&str, &str); 2]| {
            let pl = plan(p).unwrap();
            let scope_of = |q: &OrderPipeline| {
                let name = q.metadata.name.as_deref().unwrap_or_default();
                scopes
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, s)| s.to_string())
            };
            conflicts(
                p,
                &pl,
                &[first.clone(), p.clone()],
                &Footprints::default(),
                &scope_of,
            )
            .err()
            .map(|e| e.0)
        };
        // The same URL and names, another account: both run.
        let tenant = pipeline(&y("tenant", "nats://nats.nats.svc:4222"), 2);
        assert_eq!(check(&tenant, [("first", "c/A"), ("tenant", "c/B")]), None);
        // The same account: refused, as on the same URL without accounts.
        let e = check(&tenant, [("first", "c/A"), ("tenant", "c/A")]).unwrap();
        assert!(
            e.contains("stream ORDERS belongs to pipeline ns/first"),
            "{e}"
        );
        assert!(
            check(&tenant, [("first", "c/A"), ("x", "")]).is_some(),
            "unknown: URLs"
        );
        // Another spelling of the same server's URL, the same account: refused.
        let long = pipeline(&y("long", "nats://nats.nats.svc.cluster.local:4222"), 2);
        assert!(check(&long, [("first", "c/A"), ("long", "c/A")]).is_some());
        assert_eq!(
            check(&long, [("first", "c/A"), ("x", "")]),
            None,
            "unknown: URLs differ"
        );
    }

    #[test]
    fn the_check_sees_another_pipelines_new_spec_and_forgets_deleted_ones() {
        let y = |name: &str, subjects: &str| {
            format!(
                "{{apiVersion: orderpipeline.dev/v1alpha1, kind: OrderPipeline, metadata: {{name: {name}, namespace: ns, uid: {name}-uid, generation: 1}}, spec: {{nats: {{url: 'nats://n:4222'}}, stream: {{name: {}, subjects: ['{subjects}.*']}}, consumer: {{filterSubject: {subjects}.created}}}}}}",
                name.to_uppercase()
            )
        };
        let footprints = Footprints::default();
        let first = pipeline(&y("first", "SHOP"), 1);
        let second = pipeline(&y("second", "BOOKS"), 2);
        let check = |others: &[std::sync::Arc<OrderPipeline>]| {
            let pl = plan(&second).unwrap();
            conflicts(&second, &pl, others, &footprints, &|_| None)
                .err()
                .map(|e| e.0)
        };
        assert_eq!(check(&[first.clone(), second.clone()]), None);
        // The first moves onto the second's subjects: a new generation, a new footprint.
        let mut moved = (*pipeline(&y("first", "BOOKS"), 1)).clone();
        moved.metadata.generation = Some(2);
        let moved = std::sync::Arc::new(moved);
        let e = check(&[moved.clone(), second.clone()]).unwrap();
        assert!(e.contains("overlaps") && e.contains("ns/first"), "{e}");
        // Deleted pipelines' footprints do not pile up.
        for i in 0..40 {
            let gone = pipeline(&y(&format!("gone{i}"), &format!("G{i}")), 1);
            assert_eq!(check(&[gone, second.clone()]), None);
        }
        let remembered = footprints.0.lock().unwrap().len();
        assert!(
            remembered <= 2 * 2 + 16 + 1,
            "{remembered} footprints remembered"
        );
    }

    #[test]
    fn allowlists_refuse_other_images_and_nats_hosts_naming_the_flag() {
        let allow = Allowlists {
            images: vec!["ghcr.io/orderpipeline/".into()],
            nats_hosts: vec!["nats.nats.svc".into(), "*.nats.example.com".into()],
        };
        let with = |image: Option<&str>, url: &str| {
            let mut p = sample();
            p.spec.workers.image = image.map(str::to_string);
            p.spec.nats.url = url.into();
            not_allowed(&p, &allow)
        };
        assert_eq!(
            with(None, "nats://nats.nats.svc:4222"),
            None,
            "the default image"
        );
        assert_eq!(
            with(
                Some("ghcr.io/orderpipeline/orderpipeline:1"),
                "nats://u:p@nats.nats.svc:4222"
            ),
            None
        );
        let e = with(Some("evil.example/miner:1"), "nats://nats.nats.svc:4222").unwrap();
        assert!(
            e.contains("spec.workers.image evil.example/miner:1") && e.contains("--allowed-images"),
            "{e}"
        );
        assert_eq!(
            with(None, "tls://a.nats.example.com:4222,nats://NATS.nats.svc"),
            None
        );
        let e = with(
            None,
            "nats://nats.nats.svc:4222, nats://attacker.example:4222",
        )
        .unwrap();
        assert!(
            e.contains("host attacker.example") && e.contains("--allowed-nats-hosts"),
            "{e}"
        );
        assert!(
            with(None, "nats://nats.example.com:4222").is_some(),
            "*.x is not x itself"
        );
        assert_eq!(url_host("nats://[::1]:4222"), "::1");
        assert_eq!(
            not_allowed(&sample(), &Allowlists::default()),
            None,
            "empty: anything"
        );
    }

    #[test]
    fn credentials_in_clear_text_are_named_with_the_way_out() {
        let with = |url: &str, creds: bool, tls: bool| {
            let mut p = sample();
            p.spec.nats.url = url.into();
            p.spec.nats.credentials_secret_ref = creds.then(|| crate::crd::SecretRef {
                name: "nats-auth".into(),
            });
            p.spec.nats.tls_secret_ref = tls.then(|| crate::crd::SecretRef { name: "ca".into() });
            credentials_in_clear(&p)
        };
        assert_eq!(with("nats://n:4222", false, false), None, "no credentials");
        let m = with("nats://n:4222", true, false).unwrap();
        assert!(m.contains("nats://n:4222") && m.contains("tls://"), "{m}");
        assert_eq!(with("tls://n:4222", true, false), None);
        assert_eq!(with("nats://n:4222", true, true), None, "tlsSecretRef");
        let m = with("tls://a:4222, nats://b:4222", true, false).unwrap();
        assert!(m.contains("nats://b:4222"), "{m}");
        assert!(with("ws://n:80", true, false).is_some());
        assert_eq!(with("wss://n:443", true, false), None);
    }

    #[test]
    fn workers_check_the_old_bucket_only_while_it_holds_records() {
        let p = sample();
        let mut pl = plan(&p).unwrap();
        let view = SecretsView::default();
        assert!(
            !worker_env(&p, &pl, &view)
                .iter()
                .any(|v| v.name == "LEGACY_STATE_BUCKET")
        );
        pl.legacy_bucket = Some("ORDERS_STATE".into());
        let env = worker_env(&p, &pl, &view);
        let v = env
            .iter()
            .find(|v| v.name == "LEGACY_STATE_BUCKET")
            .unwrap();
        assert_eq!(v.value.as_deref(), Some("ORDERS_STATE"));
    }

    #[test]
    fn replacing_workers_of_the_old_protocol_is_a_recreate_rollout() {
        let p = sample();
        let pl = plan(&p).unwrap();
        let d = deployment(&p, &pl, &SecretsView::default(), "img", Some(1));
        let spec = d.spec.as_ref().unwrap();
        assert_eq!(spec.strategy, None, "the strategy is patched, not applied");
        let annotations = spec
            .template
            .metadata
            .as_ref()
            .unwrap()
            .annotations
            .as_ref();
        assert_eq!(
            annotations
                .unwrap()
                .get(PROTOCOL_ANNOTATION)
                .map(String::as_str),
            Some(PROTOCOL_VERSION)
        );
        // As the API server returns a Deployment: the rolling-update defaults filled in.
        let rolling: Deployment = serde_yaml::from_str(
            "metadata: {name: orders-workers}
spec:
  strategy: {type: RollingUpdate, rollingUpdate: {maxSurge: 25%, maxUnavailable: 25%}}
  selector: {matchLabels: {app: w}}
  template: {metadata: {labels: {app: w}}}",
        )
        .unwrap();
        assert_eq!(strategy_patch(&rolling, false), None);
        assert_eq!(
            strategy_patch(&rolling, true),
            Some(serde_json::json!({
                "spec": {"strategy": {"type": "Recreate", "rollingUpdate": null}}
            }))
        );
        let mut recreate = rolling.clone();
        recreate.spec.as_mut().unwrap().strategy =
            serde_yaml::from_str("{type: Recreate}").unwrap();
        assert_eq!(strategy_patch(&recreate, true), None);
        assert_eq!(
            strategy_patch(&recreate, false),
            Some(serde_json::json!({"spec": {"strategy": {"type": "RollingUpdate"}}}))
        );
    }

    #[test]
    fn the_recreate_lasts_until_the_new_workers_have_replaced_the_old() {
        // Live Deployments as the API server returns them.
        let live = |yaml: &str| -> Deployment { serde_yaml::from_str(yaml).unwrap() };
        let old = live(
            "metadata: {name: orders-workers, generation: 3}
spec:
  selector: {matchLabels: {app: w}}
  template: {metadata: {labels: {app: w}}}
status: {observedGeneration: 3, replicas: 2, updatedReplicas: 2}",
        );
        assert!(
            replaces_old_protocol(&old),
            "a template without the protocol annotation"
        );
        let recreating = live(
            "metadata: {name: orders-workers, generation: 4}
spec:
  strategy: {type: Recreate}
  selector: {matchLabels: {app: w}}
  template: {metadata: {labels: {app: w}, annotations: {orderpipeline.dev/outcome-protocol: '2'}}}
status: {observedGeneration: 4, replicas: 2, updatedReplicas: 0}",
        );
        assert!(replaces_old_protocol(&recreating), "old pods still there");
        let mut unobserved = recreating.clone();
        unobserved.status.as_mut().unwrap().updated_replicas = Some(2);
        unobserved.status.as_mut().unwrap().observed_generation = Some(3);
        assert!(
            replaces_old_protocol(&unobserved),
            "the controller has not seen it yet"
        );
        let mut done = unobserved.clone();
        done.status.as_mut().unwrap().observed_generation = Some(4);
        assert!(
            !replaces_old_protocol(&done),
            "rolled out: rolling updates again"
        );
    }

    #[test]
    fn interest_and_workqueue_retention_are_refused_with_the_migration() {
        for r in ["Interest", "WorkQueue"] {
            let mut p = sample();
            p.spec.stream.retention = serde_yaml::from_str(r).unwrap();
            let e = plan(&p).unwrap_err().0;
            assert!(
                e.contains(r) && e.contains("use retention Limits") && e.contains("migrate"),
                "{e}"
            );
        }
    }

    fn env_map(d: &Deployment) -> BTreeMap<String, String> {
        d.spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap()
            .containers[0]
            .env
            .as_ref()
            .unwrap()
            .iter()
            .filter_map(|e| Some((e.name.clone(), e.value.clone()?)))
            .collect()
    }

    #[test]
    fn defaults_follow_the_blog_and_the_contract() {
        let p = sample();
        let plan = plan(&p).unwrap();
        let t = &plan.topology;
        assert_eq!(t.stream, "ORDERS");
        assert_eq!(t.subjects, vec!["ORDER.*"]);
        assert_eq!(t.filter_subject, "ORDER.created");
        assert_eq!(t.dlq_subject, "DLQ.ORDER.created");
        assert_eq!(t.max_ack_pending, 5 * 20, "maxReplicas x poolSize");
        assert_eq!(t.owner.as_deref(), Some("shop/orders"));
        assert_eq!(t.consumer_config().max_deliver, -1);
        assert!(plan.window_warning.is_none(), "{:?}", plan.window_warning);
    }

    #[test]
    fn env_matches_the_worker_flags() {
        let p = sample();
        let plan = plan(&p).unwrap();
        let d = deployment(&p, &plan, &SecretsView::default(), "img:1", Some(2));
        let env = env_map(&d);
        assert_eq!(env["WORKER_POOL_SIZE"], "20");
        assert_eq!(env["NATS_URL"], "nats://127.0.0.1:4222");
        assert_eq!(env["MAX_DELIVERIES"], "5");
        assert_eq!(env["DOWNSTREAM_URL"], "http://127.0.0.1:9000/charge");
        assert_eq!(env["OTEL_TRACES_SAMPLER_ARG"], "0.5");
        assert!(env["OTEL_RESOURCE_ATTRIBUTES"].contains("orderpipeline.name=orders"));
        assert!(env["OTEL_RESOURCE_ATTRIBUTES"].contains("k8s.namespace.name=shop"));
        // Every variable rendered is one the worker accepts (read from its flag definitions).
        let worker_flags: Vec<&str> = [
            include_str!("../../worker/src/config.rs"),
            include_str!("../../common/src/flags.rs"),
        ]
        .iter()
        .flat_map(|src| src.split("env = \"").skip(1))
        .filter_map(|s| s.split('"').next())
        .collect();
        for name in env.keys() {
            if name.starts_with("OTEL_") || name == "POD_NAMESPACE" {
                continue;
            }
            assert!(
                worker_flags.contains(&name.as_str()),
                "the worker has no flag for {name}"
            );
        }
    }

    #[test]
    fn workers_get_default_resources_unless_the_spec_sets_them() {
        let container = |p: &OrderPipeline| {
            let plan = plan(p).unwrap();
            let d = deployment(p, &plan, &SecretsView::default(), "img:1", Some(1));
            d.spec.unwrap().template.spec.unwrap().containers[0].clone()
        };
        let r = container(&sample()).resources.unwrap();
        assert_eq!(r.requests.unwrap()["memory"].0, "64Mi");
        assert_eq!(r.limits.as_ref().unwrap()["memory"].0, "512Mi");
        assert!(!r.limits.unwrap().contains_key("cpu"), "no CPU limit");
        let mut p = sample();
        let own: k8s_openapi::api::core::v1::ResourceRequirements =
            serde_json::from_value(serde_json::json!({"limits": {"memory": "2Gi"}})).unwrap();
        p.spec.workers.resources = Some(own.clone());
        assert_eq!(container(&p).resources, Some(own));
    }

    #[test]
    fn pod_is_restricted_and_probed() {
        let p = sample();
        let plan = plan(&p).unwrap();
        let d = deployment(&p, &plan, &SecretsView::default(), "img:1", Some(2));
        let pod = d.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        let c = &pod.containers[0];
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(
            sc.capabilities.as_ref().unwrap().drop.as_ref().unwrap(),
            &vec!["ALL".to_string()]
        );
        let psc = pod.security_context.as_ref().unwrap();
        assert_eq!(psc.run_as_non_root, Some(true));
        // The worker's group owns the Secret volumes' files: it can read them
        // (a creds file was "Permission denied" on the real node before).
        assert_eq!(psc.fs_group, psc.run_as_group);
        assert_eq!(
            psc.seccomp_profile.as_ref().unwrap().type_,
            "RuntimeDefault"
        );
        assert_eq!(
            c.liveness_probe
                .as_ref()
                .unwrap()
                .http_get
                .as_ref()
                .unwrap()
                .path
                .as_deref(),
            Some("/livez")
        );
        assert_eq!(
            c.readiness_probe
                .as_ref()
                .unwrap()
                .http_get
                .as_ref()
                .unwrap()
                .path
                .as_deref(),
            Some("/readyz")
        );
        assert_eq!(
            pod.termination_grace_period_seconds,
            Some(30),
            "25s grace + 5s"
        );
        assert_eq!(d.spec.as_ref().unwrap().replicas, Some(2));
        assert_eq!(c.image.as_deref(), Some("img:1"));
        let owner = &d.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(owner.kind, "OrderPipeline");
        assert_eq!(owner.controller, Some(true));
    }

    #[test]
    fn secrets_are_projected_and_checksummed() {
        let p = sample();
        let plan = plan(&p).unwrap();
        let secrets = SecretsView {
            credentials: Some(("creds".into(), Credentials::UserPassword)),
            tls: Some(("tls".into(), true)),
            checksum: Some("abc".into()),
            content: None,
            inbox_prefix: None,
        };
        let d = deployment(&p, &plan, &secrets, "img:1", Some(1));
        let t = &d.spec.as_ref().unwrap().template;
        assert_eq!(
            t.metadata.as_ref().unwrap().annotations.as_ref().unwrap()[CHECKSUM_ANNOTATION],
            "abc"
        );
        let c = &t.spec.as_ref().unwrap().containers[0];
        let envs = c.env.as_ref().unwrap();
        let user = envs.iter().find(|e| e.name == "NATS_USER").unwrap();
        assert_eq!(
            user.value_from
                .as_ref()
                .unwrap()
                .secret_key_ref
                .as_ref()
                .unwrap()
                .name,
            "creds"
        );
        assert_eq!(
            env_map(&d)["NATS_TLS_CA_FILE"],
            "/etc/orderpipeline/nats-tls/ca.crt"
        );
        assert_eq!(
            c.volume_mounts.as_ref().unwrap()[0].mount_path,
            "/etc/orderpipeline/nats-tls"
        );
    }

    #[test]
    fn invalid_specs_are_explained() {
        let mut p = sample();
        p.spec.dead_letter.subject = Some("ORDER.dead".into());
        let e = plan(&p).unwrap_err().0;
        assert!(e.contains("ORDER.dead") && e.contains("ORDER.*"), "{e}");

        let mut p = sample();
        p.spec.consumer.filter_subject = "OTHER.created".into();
        assert!(plan(&p).unwrap_err().0.contains("not captured"));

        let mut p = sample();
        p.spec.consumer.ack_wait = "30".into();
        assert!(plan(&p).unwrap_err().0.contains("spec.consumer.ackWait"));

        let mut p = sample();
        p.spec.workers.env = vec![EnvVar {
            name: "NATS_URL".into(),
            value: Some("nats://elsewhere:4222".into()),
            ..Default::default()
        }];
        let e = plan(&p).unwrap_err().0;
        assert!(e.contains("spec.workers.env[0] sets NATS_URL"), "{e}");

        // A Secret or ConfigMap read through the operator's Deployment: refused.
        for from in [
            serde_json::json!({"secretKeyRef": {"name": "db", "key": "password"}}),
            serde_json::json!({"configMapKeyRef": {"name": "cfg", "key": "k"}}),
        ] {
            let mut p = sample();
            p.spec.workers.env = vec![EnvVar {
                name: "DB_PASSWORD".into(),
                value_from: Some(serde_json::from_value(from).unwrap()),
                ..Default::default()
            }];
            let e = plan(&p).unwrap_err().0;
            assert!(
                e.contains("spec.workers.env[0] (DB_PASSWORD) uses valueFrom.")
                    && e.contains("use valueFrom.fieldRef"),
                "{e}"
            );
        }
        // fieldRef stays.
        let mut p = sample();
        p.spec.workers.env = vec![EnvVar {
            name: "NODE".into(),
            value_from: Some(
                serde_json::from_value(
                    serde_json::json!({"fieldRef": {"fieldPath": "spec.nodeName"}}),
                )
                .unwrap(),
            ),
            ..Default::default()
        }];
        assert!(plan(&p).is_ok());
    }

    #[test]
    fn extra_env_replaces_a_rendered_non_contract_variable() {
        let mut p = sample();
        p.spec.workers.env = vec![
            EnvVar {
                name: "OTEL_SERVICE_NAME".into(),
                value: Some("payments-worker".into()),
                ..Default::default()
            },
            EnvVar {
                name: "RUST_LOG".into(),
                value: Some("debug".into()),
                ..Default::default()
            },
        ];
        let plan = plan(&p).unwrap();
        let env = worker_env(&p, &plan, &SecretsView::default());
        let names: Vec<_> = env.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names.iter().filter(|n| **n == "OTEL_SERVICE_NAME").count(),
            1,
            "{names:?}"
        );
        let d = deployment(&p, &plan, &SecretsView::default(), "img", Some(1));
        assert_eq!(env_map(&d)["OTEL_SERVICE_NAME"], "payments-worker");
        assert_eq!(env_map(&d)["RUST_LOG"], "debug");
    }

    #[test]
    fn every_rendered_variable_is_contract_or_telemetry() {
        let p = sample();
        let plan = plan(&p).unwrap();
        for credentials in [
            Credentials::UserPassword,
            Credentials::Token,
            Credentials::CredsFile,
            Credentials::NkeySeed,
        ] {
            let secrets = SecretsView {
                credentials: Some(("nats-auth".into(), credentials)),
                tls: Some(("nats-tls".into(), true)),
                ..Default::default()
            };
            for v in worker_env(&p, &plan, &secrets) {
                assert!(
                    CONTRACT_ENV.contains(&v.name.as_str()) || v.name.starts_with("OTEL_"),
                    "{} is rendered but neither in CONTRACT_ENV nor OTEL_*",
                    v.name
                );
            }
        }
    }

    #[test]
    fn a_short_duplicate_window_is_reported() {
        let mut p = sample();
        p.spec.stream.duplicate_window = "1m".into();
        let w = plan(&p).unwrap().window_warning.unwrap();
        assert!(w.contains("duplicateWindow 1m is shorter"), "{w}");
        // 5 deliveries x (max(ack wait 30s, NAK delay 60s) + 3 tries x (5s backoff + 5s timeout))
        assert!(w.contains("redelivery horizon 450s"), "{w}");
    }

    #[test]
    fn external_replicas_are_left_out() {
        let p = sample();
        let plan = plan(&p).unwrap();
        let d = deployment(&p, &plan, &SecretsView::default(), "img", None);
        let v = serde_json::to_value(&d).unwrap();
        assert!(v["spec"].get("replicas").is_none());
    }
}
