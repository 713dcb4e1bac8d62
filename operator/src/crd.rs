//! The `OrderPipeline` custom resource (`orderpipeline.dev/v1alpha1`): the spec a
//! user writes and the status the operator reports. Doc comments become the
//! descriptions `kubectl explain` shows; defaults and CEL rules live in the schema.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, EnvVar, ResourceRequirements, Toleration, TopologySpreadConstraint,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{CustomResource, KubeSchema};
use orderpipeline_common::duration::DURATION_PATTERN;
use orderpipeline_common::names;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub const GROUP: &str = "orderpipeline.dev";

// The spec's bounds (`maximum`, `maxLength`, `maxItems`, `maxProperties` in the
// schema): what the operator, NATS and Kubernetes can hold, so that a spec
// beyond them is refused by `kubectl apply` with the limit in the message.
/// A duration such as `90s` or `1h30m`.
pub const DURATION_MAX: u32 = 32;
/// NATS server URLs, comma separated; the downstream and OTLP URLs.
pub const URL_MAX: u32 = 2048;
/// A stream, consumer or bucket name (a directory name in the file store).
pub const NATS_NAME_MAX: u32 = 255;
/// A subject.
pub const SUBJECT_MAX: u32 = 255;
/// Subjects of the input stream.
pub const SUBJECTS_MAX: u32 = 64;
/// A Kubernetes object name (a DNS subdomain).
pub const K8S_NAME_MAX: u32 = 253;
/// Worker replicas: a bound for a Deployment the operator sizes and scales.
pub const REPLICAS_MAX: i32 = 1000;
/// A lag in orders (target per replica, activation).
pub const LAG_MAX: i64 = 1_000_000_000;
/// The consumer's maxAckPending (orders delivered and not yet acknowledged).
pub const ACK_PENDING_MAX: i64 = 10_000_000;
/// Backoff steps: at most one per delivery attempt.
pub const BACKOFF_MAX: u32 = 1000;
/// An image reference.
pub const IMAGE_MAX: u32 = 1024;
/// Extra environment variables of the workers.
pub const ENV_MAX: u32 = 128;
/// Tolerations of the worker pods.
pub const TOLERATIONS_MAX: u32 = 64;
/// Topology spread constraints of the worker pods.
pub const SPREAD_MAX: u32 = 8;
/// Node selector labels, and the longest label value.
pub const LABELS_MAX: u32 = 64;
pub const LABEL_VALUE_MAX: u32 = 63;

/// Why `workers.env` may not read Secrets or ConfigMaps (a CEL rule of the
/// schema, and the operator's own check).
pub const ENV_FROM_REFUSED: &str = "spec.workers.env may not read Secrets or ConfigMaps (valueFrom.secretKeyRef, valueFrom.configMapKeyRef): the operator creates the workers, so they would get what the pipeline's author may not be allowed to read; put the value in the spec, or use valueFrom.fieldRef";

/// An order-processing pipeline on NATS JetStream: an input stream, a durable
/// pull consumer, a dead-letter stream, an idempotency KV bucket, and a
/// Deployment of workers that process every order exactly once.
// clippy reads the repeated `printcolumn(type_ = ...)` keys as duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "orderpipeline.dev",
    version = "v1alpha1",
    kind = "OrderPipeline",
    plural = "orderpipelines",
    singular = "orderpipeline",
    shortname = "op",
    category = "all",
    namespaced,
    status = "OrderPipelineStatus",
    doc = "An order-processing pipeline on NATS JetStream: stream, consumer, dead-letter stream, idempotency KV bucket and a Deployment of workers.",
    scale(
        spec_replicas_path = ".spec.workers.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Whether the pipeline is ready"
    ),
    printcolumn(
        name = "Workers",
        type_ = "string",
        json_path = ".status.workersReady",
        description = "Ready worker pods / desired"
    ),
    printcolumn(
        name = "Lag",
        type_ = "integer",
        json_path = ".status.lag",
        description = "Orders not yet processed (consumer pending + ack pending)"
    ),
    printcolumn(
        name = "Dead letters",
        type_ = "integer",
        json_path = ".status.deadLetters",
        description = "Messages in the dead-letter stream"
    ),
    printcolumn(
        name = "Paused",
        type_ = "boolean",
        json_path = ".spec.paused",
        description = "Whether the pipeline is paused"
    ),
    printcolumn(
        name = "Mode",
        type_ = "string",
        json_path = ".status.replicaMode",
        priority = 1,
        description = "Who sets the worker replicas"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason",
        priority = 1,
        description = "Why Ready is what it is"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct OrderPipelineSpec {
    /// Pause the pipeline: workers scale to zero and the consumer is paused
    /// (JetStream consumer pause); the stream keeps accepting orders. Unpausing
    /// resumes where it stopped. Wins over every replica mode.
    #[serde(default)]
    pub paused: bool,
    /// What the operator may do with the JetStream objects: Manage (create, update,
    /// repair drift), Adopt (take over existing streams not created by a pipeline),
    /// Observe (report status, change nothing).
    #[serde(default)]
    pub management_policy: ManagementPolicy,
    /// How the operator and the workers reach NATS.
    pub nats: NatsSpec,
    /// The input stream that holds orders and result events.
    #[serde(default)]
    pub stream: StreamSpec,
    /// The durable pull consumer the workers share.
    #[serde(default)]
    pub consumer: ConsumerSpec,
    /// Where messages that cannot be processed go.
    #[serde(default)]
    pub dead_letter: DeadLetterSpec,
    /// The KV bucket of the protocol before v2, for pipelines upgraded from v1
    /// only: a new pipeline gets none.
    #[serde(default)]
    pub state: StateSpec,
    /// The worker Deployment.
    #[serde(default)]
    pub workers: WorkersSpec,
    /// OpenTelemetry settings rendered into the workers.
    #[serde(default)]
    pub telemetry: TelemetrySpec,
}

/// Why a pipeline may not both bring credentials and have them minted.
pub const ACCOUNT_AND_CREDENTIALS: &str = "spec.nats.accountRef and spec.nats.credentialsSecretRef are exclusive: with accountRef the operator mints the workers' and the producer's credentials; remove one";

/// NATS connection settings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.accountRef) || !has(self.credentialsSecretRef)").message(ACCOUNT_AND_CREDENTIALS))]
pub struct NatsSpec {
    /// NATS server URL(s), comma separated, e.g. `nats://nats.nats.svc:4222`.
    #[schemars(length(min = 1, max = URL_MAX))]
    pub url: String,
    /// A Secret in the pipeline's namespace with credentials, by key: `user` and
    /// `password`, or `token`, or `creds` (a NATS credentials file), or `nkey`
    /// (an nkey seed). Changing the Secret rolls the workers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<SecretRef>,
    /// A NATS account (operator mode) the administrator offers this namespace:
    /// the name of a Secret labelled `orderpipeline.dev/nats-account` in the
    /// operator's namespace. The operator then mints the pipeline's own
    /// identities, each allowed only what it needs: the workers' (its stream,
    /// consumer, outcomes and DLQ) and a producer's (publish the input subject),
    /// renewed before they expire; `status.natsIdentity` names their Secrets.
    /// Exclusive with credentialsSecretRef.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account_ref: Option<AccountRef>,
    /// A Secret with TLS material: `ca.crt` (to verify the server), and
    /// optionally `tls.crt` and `tls.key` (a client certificate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_secret_ref: Option<SecretRef>,
}

/// What the operator may change in NATS.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ManagementPolicy {
    /// Create and update the objects, and repair drift (the default). An existing
    /// stream not created by this pipeline is a conflict.
    #[default]
    Manage,
    /// Like Manage, but take over existing streams that no pipeline owns.
    Adopt,
    /// Change nothing in NATS or Kubernetes; only report status.
    Observe,
}

/// Who sets the worker Deployment's replicas.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ReplicaMode {
    /// The operator copies spec.workers.replicas (set by `kubectl scale
    /// orderpipeline/NAME` or an HPA targeting the pipeline's scale subresource).
    Manual,
    /// The operator scales on consumer lag within minReplicas..maxReplicas.
    Operator,
    /// Something else (a KEDA ScaledObject, an HPA on the Deployment) sets the
    /// Deployment's replicas; the operator leaves them alone.
    External,
}

fn default_target_lag() -> i64 {
    1000
}
fn default_max_step() -> i32 {
    10
}
fn default_window() -> String {
    "5m".into()
}

/// Lag-based scaling: desired = clamp(ceil(lag / targetLagPerReplica), min, max),
/// where lag = consumer pending + ack pending.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScalingSpec {
    /// Manual, Operator or External. Default: Operator when minReplicas or
    /// maxReplicas is set, otherwise Manual.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<ReplicaMode>,
    /// Lag one worker pod is expected to handle.
    #[serde(default = "default_target_lag")]
    #[schemars(range(min = 1, max = LAG_MAX))]
    pub target_lag_per_replica: i64,
    /// Lag above which the pipeline scales from zero.
    #[serde(default)]
    #[schemars(range(min = 0, max = LAG_MAX))]
    pub activation_lag: i64,
    /// Most replicas added or removed by one decision.
    #[serde(default = "default_max_step")]
    #[schemars(range(min = 1, max = REPLICAS_MAX))]
    pub max_step: i32,
    /// Scale down only when no decision in this window wanted the current replicas.
    #[serde(default = "default_window")]
    #[schemars(length(max = DURATION_MAX), regex(pattern = DURATION_PATTERN))]
    pub stabilization_window: String,
    /// With minReplicas 0: scale to zero after the lag stayed 0 this long.
    #[serde(default = "default_window")]
    #[schemars(length(max = DURATION_MAX), regex(pattern = DURATION_PATTERN))]
    pub cooldown: String,
}

impl Default for ScalingSpec {
    fn default() -> Self {
        Self {
            mode: None,
            target_lag_per_replica: default_target_lag(),
            activation_lag: 0,
            max_step: default_max_step(),
            stabilization_window: default_window(),
            cooldown: default_window(),
        }
    }
}

/// A reference to a NATS account the operator mints identities in.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct AccountRef {
    /// The name of the account's Secret in the operator's namespace.
    #[schemars(length(min = 1, max = K8S_NAME_MAX))]
    pub name: String,
}

/// A reference to a Secret in the pipeline's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct SecretRef {
    /// The Secret's name.
    #[schemars(length(min = 1, max = K8S_NAME_MAX))]
    pub name: String,
}

/// What happens to the JetStream objects when the pipeline is deleted.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum DeletionPolicy {
    /// Keep the streams and the KV bucket (the default: orders are data).
    #[default]
    Retain,
    /// Delete the consumer, both streams and the KV bucket.
    Delete,
}

/// JetStream retention policy of the input stream.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Retention {
    /// Keep messages until the stream's limits (age, bytes) remove them.
    #[default]
    Limits,
    /// Keep messages while a consumer has not acknowledged them.
    Interest,
    /// Remove a message once acknowledged. Cannot be changed to or from later.
    WorkQueue,
}

/// JetStream storage of the streams and the KV bucket.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Storage {
    /// On disk (survives a nats-server restart).
    #[default]
    File,
    /// In memory (lost on restart).
    Memory,
}

fn default_stream_name() -> String {
    names::DEFAULT_STREAM.into()
}
fn default_subjects() -> Vec<String> {
    vec![names::DEFAULT_STREAM_SUBJECTS.into()]
}
fn default_replicas() -> i32 {
    1
}
fn default_max_age() -> String {
    "7d".into()
}
fn default_max_bytes() -> i64 {
    -1
}
fn default_duplicate_window() -> String {
    "30m".into()
}

/// The input stream.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StreamSpec {
    /// Stream name.
    #[serde(default = "default_stream_name")]
    #[schemars(length(min = 1, max = NATS_NAME_MAX), regex(pattern = r"^[^.*> ]+$"))]
    pub name: String,
    /// Subjects the stream captures; they must include the consumer's filter subject
    /// and must not match the dead-letter subject.
    #[serde(default = "default_subjects")]
    #[schemars(length(min = 1, max = SUBJECTS_MAX), inner(length(min = 1, max = SUBJECT_MAX)))]
    pub subjects: Vec<String>,
    /// Retention policy. Limits and Interest can be switched; WorkQueue cannot be
    /// switched to or from once the stream exists.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self == oldSelf || (self != 'WorkQueue' && oldSelf != 'WorkQueue')").message("stream retention cannot change to or from WorkQueue: NATS cannot change it in place; create a new pipeline (or stream) instead"))]
    pub retention: Retention,
    /// Storage: File (default) or Memory. Cannot change once the stream exists.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self == oldSelf").message("stream storage is immutable: NATS cannot change it in place; create a new pipeline (or stream) instead"))]
    pub storage: Storage,
    /// Stream replicas (1, 3 or 5 in a NATS cluster); the KV bucket and dead-letter
    /// stream use the same. R3 survives the loss of a node.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 1, max = 5))]
    pub replicas: i32,
    /// Oldest message kept, e.g. `7d`.
    #[serde(default = "default_max_age")]
    #[schemars(length(max = DURATION_MAX), regex(pattern = DURATION_PATTERN))]
    pub max_age: String,
    /// Largest stream size in bytes; -1 for no limit.
    #[serde(default = "default_max_bytes")]
    #[schemars(range(min = -1, max = 9_007_199_254_740_991i64))]
    pub max_bytes: i64,
    /// Window in which JetStream drops a producer's re-send of a Nats-Msg-Id it
    /// has seen. Exactly-once outcomes do not depend on it (an order stored twice
    /// gets its existing outcome); the DuplicateWindowSufficient condition reports
    /// whether it covers the redelivery horizon (ack wait or backoff times
    /// attempts, plus NAK delays), so that producer retries within that time stay
    /// out of the stream.
    #[serde(default = "default_duplicate_window")]
    #[schemars(length(max = DURATION_MAX), regex(pattern = DURATION_PATTERN))]
    pub duplicate_window: String,
    /// Retain (default) keeps the JetStream objects when the pipeline is deleted;
    /// Delete removes them.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
    /// When the live stream differs in what NATS cannot change in place (storage,
    /// retention to or from WorkQueue), delete and recreate it. Its messages are
    /// lost, so the default (false) reports ImmutableFieldChanged instead.
    #[serde(default)]
    pub recreate_on_immutable_change: bool,
    /// Keep orders that wait from being removed by maxAge unprocessed: once the
    /// oldest unprocessed order is half of maxAge old, the operator doubles the
    /// stream's maxAge (again each time it reaches half of that), and puts
    /// maxAge back once the backlog is younger than half of it. The stream then
    /// keeps everything that much longer (maxBytes still applies). false:
    /// maxAge applies as set, and orders that outlive it are counted as lost
    /// (status.removedUnprocessed).
    #[serde(default = "default_true")]
    pub hold_unprocessed: bool,
}

fn default_true() -> bool {
    true
}

impl Default for StreamSpec {
    fn default() -> Self {
        Self {
            name: default_stream_name(),
            subjects: default_subjects(),
            retention: Retention::default(),
            storage: Storage::default(),
            replicas: default_replicas(),
            max_age: default_max_age(),
            max_bytes: default_max_bytes(),
            duplicate_window: default_duplicate_window(),
            deletion_policy: DeletionPolicy::default(),
            recreate_on_immutable_change: false,
            hold_unprocessed: true,
        }
    }
}

fn default_consumer_name() -> String {
    names::DEFAULT_CONSUMER.into()
}
fn default_filter_subject() -> String {
    names::DEFAULT_INPUT_SUBJECT.into()
}
fn default_ack_wait() -> String {
    "30s".into()
}
fn default_max_attempts() -> i32 {
    5
}

/// The durable pull consumer.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConsumerSpec {
    /// Durable consumer name.
    #[serde(default = "default_consumer_name")]
    #[schemars(length(min = 1, max = NATS_NAME_MAX), regex(pattern = r"^[^.*> ]+$"))]
    pub name: String,
    /// Subject the workers consume (orders in).
    #[serde(default = "default_filter_subject")]
    #[schemars(length(min = 1, max = SUBJECT_MAX))]
    pub filter_subject: String,
    /// How long JetStream waits for an ack before redelivering (workers send
    /// in-progress acks for long work).
    #[serde(default = "default_ack_wait")]
    #[schemars(length(max = DURATION_MAX), regex(pattern = DURATION_PATTERN))]
    pub ack_wait: String,
    /// Deliveries after which a failing order is dead-lettered. Enforced by the
    /// workers (MAX_DELIVERIES); the server-side max_deliver stays unlimited so a
    /// last delivery that dies with its worker is not stranded.
    #[serde(default = "default_max_attempts")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_attempts: i32,
    /// Optional redelivery backoff per delivery (replaces ackWait per delivery),
    /// e.g. `["1s", "5s", "30s"]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = BACKOFF_MAX), inner(length(max = DURATION_MAX), regex(pattern = DURATION_PATTERN)))]
    pub backoff: Vec<String>,
    /// Messages awaiting ack across all workers. Default: maxReplicas (or
    /// replicas) x poolSize, so JetStream never throttles the workers below their pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = ACK_PENDING_MAX))]
    pub max_ack_pending: Option<i64>,
}

impl Default for ConsumerSpec {
    fn default() -> Self {
        Self {
            name: default_consumer_name(),
            filter_subject: default_filter_subject(),
            ack_wait: default_ack_wait(),
            max_attempts: default_max_attempts(),
            backoff: Vec::new(),
            max_ack_pending: None,
        }
    }
}

fn default_dlq_max_age() -> String {
    "30d".into()
}

/// The dead-letter stream.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetterSpec {
    /// Dead-letter stream name; default `<stream.name>_DLQ` (`ORDERS_DLQ`). It
    /// sources the input stream's `<prefix>.deadlettered.*` outcomes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = NATS_NAME_MAX), regex(pattern = r"^[^.*> ]+$"))]
    pub stream_name: Option<String>,
    /// The dead-letter stream's own subject (for letters published by hand);
    /// must not be matched by the input stream's subjects. Default `DLQ.<consumer.filterSubject>`
    /// (`DLQ.ORDER.created`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = SUBJECT_MAX))]
    pub subject: Option<String>,
    /// How long dead letters are kept.
    #[serde(default = "default_dlq_max_age")]
    #[schemars(length(max = DURATION_MAX), regex(pattern = DURATION_PATTERN))]
    pub max_age: String,
}

impl Default for DeadLetterSpec {
    fn default() -> Self {
        Self {
            stream_name: None,
            subject: None,
            max_age: default_dlq_max_age(),
        }
    }
}

/// The KV bucket of earlier versions (v1 kept one record per order there; the
/// outcomes are now the records, in the input stream). Kept so existing specs
/// still apply. The operator never creates it; while a pipeline upgraded from v1
/// still has it, its TTL and replicas follow this spec, the workers consult its
/// records, and a `Delete` cleanup removes it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StateSpec {
    /// The bucket's name, as v1 created it; default `<stream.name>_STATE`
    /// (`ORDERS_STATE`). Only for pipelines upgraded from v1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = NATS_NAME_MAX), regex(pattern = r"^[a-zA-Z0-9_-]+$"))]
    pub bucket: Option<String>,
    /// How long an order's record is kept; at least the stream's maxAge (the
    /// operator uses the longer of the two). Replicas follow the stream's.
    #[serde(default = "default_max_age")]
    #[schemars(length(max = DURATION_MAX), regex(pattern = DURATION_PATTERN))]
    pub ttl: String,
}

impl Default for StateSpec {
    fn default() -> Self {
        Self {
            bucket: None,
            ttl: default_max_age(),
        }
    }
}

impl OrderPipelineSpec {
    /// This spec on its own stream `stream` (subjects `<stream>.*`, filter
    /// `<stream>.created`), with every other NATS name derived from it: one of
    /// several pipelines on one NATS (tests, examples).
    pub fn on_own_stream(&mut self, stream: &str) {
        self.stream.name = stream.into();
        self.stream.subjects = vec![format!("{stream}.*")];
        self.consumer.filter_subject = format!("{stream}.created");
        self.dead_letter.stream_name = None;
        self.dead_letter.subject = None;
        self.state.bucket = None;
    }

    /// The dead-letter stream: `deadLetter.streamName`, or `<stream.name>_DLQ`.
    pub fn dlq_stream(&self) -> String {
        self.dead_letter
            .stream_name
            .clone()
            .unwrap_or_else(|| names::derived_dlq_stream(&self.stream.name))
    }
    /// The dead-letter stream's subject: `deadLetter.subject`, or `DLQ.<filter>`.
    pub fn dlq_subject(&self) -> String {
        self.dead_letter
            .subject
            .clone()
            .unwrap_or_else(|| names::derived_dlq_subject(&self.consumer.filter_subject))
    }
    /// The KV bucket: `state.bucket`, or `<stream.name>_STATE`.
    pub fn state_bucket(&self) -> String {
        self.state
            .bucket
            .clone()
            .unwrap_or_else(|| names::derived_state_bucket(&self.stream.name))
    }
}

fn default_pool_size() -> i32 {
    10
}
fn default_worker_replicas() -> i32 {
    1
}
fn default_shutdown_grace() -> String {
    "25s".into()
}
fn default_downstream_timeout() -> String {
    "5s".into()
}

/// The worker Deployment.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.minReplicas) || !has(self.maxReplicas) || self.minReplicas <= self.maxReplicas").message("workers.minReplicas must not exceed workers.maxReplicas"))]
#[x_kube(validation = Rule::new("!has(self.env) || self.env.all(e, !has(e.valueFrom) || (!has(e.valueFrom.secretKeyRef) && !has(e.valueFrom.configMapKeyRef)))").message(ENV_FROM_REFUSED))]
pub struct WorkersSpec {
    /// Worker image. Default: the release matching the operator's own version
    /// (the operator renders the worker's flags, so the two must agree).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = IMAGE_MAX))]
    pub image: Option<String>,
    /// Orders each worker processes at once (WORKER_POOL_SIZE).
    #[serde(default = "default_pool_size")]
    #[schemars(range(min = 1, max = 10000))]
    pub pool_size: i32,
    /// Worker pods. `kubectl scale orderpipeline/NAME --replicas=N` sets it.
    #[serde(default = "default_worker_replicas")]
    #[schemars(range(min = 0, max = REPLICAS_MAX))]
    pub replicas: i32,
    /// Lower bound for lag-based scaling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = REPLICAS_MAX))]
    pub min_replicas: Option<i32>,
    /// Upper bound for lag-based scaling; also sizes the consumer's maxAckPending.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = REPLICAS_MAX))]
    pub max_replicas: Option<i32>,
    /// Who sets the replicas, and the lag-based scaler's settings.
    #[serde(default)]
    pub scaling: ScalingSpec,
    /// CPU and memory requests and limits of the worker container. Default:
    /// requests cpu 50m and memory 64Mi, a memory limit of 512Mi, no CPU limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Extra environment variables for the worker container, e.g. `RUST_LOG` or
    /// `OTEL_*`; one the operator also renders (such as `OTEL_SERVICE_NAME`) is
    /// replaced. Variables that carry the spec to the workers (`NATS_*`,
    /// `STREAM_NAME`, `WORKER_POOL_SIZE`, ...) are refused: set the spec's field.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = ENV_MAX))]
    pub env: Vec<EnvVar>,
    /// In-process retries and NAK delays for transient errors.
    #[serde(default)]
    pub retry: RetrySpec,
    /// Optional downstream service: each order is POSTed there as JSON with
    /// `Idempotency-Key: <cluster>/<namespace>/<name>:<order key>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = URL_MAX), regex(pattern = r"^https?://"))]
    pub downstream_url: Option<String>,
    /// Timeout of one downstream call.
    #[serde(default = "default_downstream_timeout")]
    #[schemars(length(max = DURATION_MAX), regex(pattern = DURATION_PATTERN))]
    pub downstream_timeout: String,
    /// Time a worker gets after SIGTERM to finish in-flight orders (the pod's
    /// terminationGracePeriodSeconds is this plus 5 s).
    #[serde(default = "default_shutdown_grace")]
    #[schemars(length(max = DURATION_MAX), regex(pattern = DURATION_PATTERN))]
    pub shutdown_grace: String,
    /// Node labels the worker pods must match.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = LABELS_MAX, "additionalProperties" = {"type": "string", "maxLength": LABEL_VALUE_MAX}))]
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations of the worker pods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = TOLERATIONS_MAX))]
    pub tolerations: Vec<Toleration>,
    /// Affinity of the worker pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// How the worker pods spread over the cluster (Kubernetes topology spread
    /// constraints; the label selector, when a constraint has none, is the
    /// workers'). Absent: one constraint, at most one worker more on any node
    /// than on another (`kubernetes.io/hostname`, `ScheduleAnyway`), so a node
    /// drained or lost takes as few workers as the nodes allow; `[]`: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = SPREAD_MAX))]
    pub topology_spread_constraints: Option<Vec<TopologySpreadConstraint>>,
    /// The workers' PodDisruptionBudget: how many worker pods a voluntary
    /// disruption (a node drain) may take at once.
    #[serde(default)]
    pub disruption_budget: DisruptionBudgetSpec,
}

/// The workers' PodDisruptionBudget (`<name>-workers`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DisruptionBudgetSpec {
    /// Create it. false: the operator deletes the one it made.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Worker pods a drain may evict at once: a count or a percentage ("25%").
    /// A stopping worker finishes or NAKs what it holds within shutdownGrace,
    /// so this bounds the throughput lost during a drain, not orders.
    #[serde(default = "default_max_unavailable")]
    pub max_unavailable: IntOrString,
}

fn default_max_unavailable() -> IntOrString {
    IntOrString::Int(1)
}

impl Default for DisruptionBudgetSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            max_unavailable: default_max_unavailable(),
        }
    }
}

impl Default for WorkersSpec {
    fn default() -> Self {
        Self {
            image: None,
            pool_size: default_pool_size(),
            replicas: default_worker_replicas(),
            min_replicas: None,
            max_replicas: None,
            scaling: ScalingSpec::default(),
            resources: None,
            env: Vec::new(),
            retry: RetrySpec::default(),
            downstream_url: None,
            downstream_timeout: default_downstream_timeout(),
            shutdown_grace: default_shutdown_grace(),
            node_selector: BTreeMap::new(),
            tolerations: Vec::new(),
            affinity: None,
            topology_spread_constraints: None,
            disruption_budget: DisruptionBudgetSpec::default(),
        }
    }
}

fn default_attempts_per_delivery() -> i32 {
    3
}
fn default_initial_backoff() -> String {
    "100ms".into()
}
fn default_max_backoff() -> String {
    "5s".into()
}
fn default_nak_initial() -> String {
    "1s".into()
}
fn default_nak_max() -> String {
    "60s".into()
}

/// Retry policy for transient errors.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetrySpec {
    /// Tries per delivery, with exponential backoff and jitter (RETRY_ATTEMPTS).
    #[serde(default = "default_attempts_per_delivery")]
    #[schemars(range(min = 1, max = 1000))]
    pub attempts_per_delivery: i32,
    /// First in-process retry delay.
    #[serde(default = "default_initial_backoff")]
    #[schemars(length(max = DURATION_MAX), regex(pattern = DURATION_PATTERN))]
    pub initial_backoff: String,
    /// Longest in-process retry delay.
    #[serde(default = "default_max_backoff")]
    #[schemars(length(max = DURATION_MAX), regex(pattern = DURATION_PATTERN))]
    pub max_backoff: String,
    /// NAK delay after the first failed delivery; doubles per delivery.
    #[serde(default = "default_nak_initial")]
    #[schemars(length(max = DURATION_MAX), regex(pattern = DURATION_PATTERN))]
    pub nak_initial_delay: String,
    /// Longest NAK delay.
    #[serde(default = "default_nak_max")]
    #[schemars(length(max = DURATION_MAX), regex(pattern = DURATION_PATTERN))]
    pub nak_max_delay: String,
}

impl Default for RetrySpec {
    fn default() -> Self {
        Self {
            attempts_per_delivery: default_attempts_per_delivery(),
            initial_backoff: default_initial_backoff(),
            max_backoff: default_max_backoff(),
            nak_initial_delay: default_nak_initial(),
            nak_max_delay: default_nak_max(),
        }
    }
}

fn default_sampling_ratio() -> f64 {
    1.0
}

/// OpenTelemetry settings for the workers.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TelemetrySpec {
    /// OTLP/gRPC endpoint traces are sent to, e.g. `http://jaeger-collector:4317`.
    /// Unset: no trace export.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = URL_MAX))]
    pub otlp_endpoint: Option<String>,
    /// Fraction of new traces sampled (0..1); a producer's sampled trace is always followed.
    #[serde(default = "default_sampling_ratio")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub sampling_ratio: f64,
}

impl Default for TelemetrySpec {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            sampling_ratio: default_sampling_ratio(),
        }
    }
}

/// Stream figures.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StreamStatus {
    /// Messages in the input stream.
    pub messages: i64,
    /// Bytes in the input stream.
    pub bytes: i64,
    /// First sequence still stored.
    pub first_sequence: i64,
    /// Last sequence stored.
    pub last_sequence: i64,
    /// Distinct subjects in the input stream: one per order with an outcome,
    /// plus the input subject. The NATS server keeps each in memory.
    #[serde(default)]
    pub subjects: i64,
    /// The NATS server memory the stream's subjects hold, estimated: subjects
    /// x the operator's `--nats-bytes-per-subject` (measure yours with `make
    /// bench-growth`).
    #[serde(default)]
    pub estimated_server_memory_bytes: i64,
    /// When NATS created the stream (RFC 3339, to the nanosecond): which
    /// stream the consumer's figures belong to (a stream deleted and recreated
    /// starts its sequences again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
}

/// Consumer figures.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConsumerStatus {
    /// Messages not yet delivered.
    pub pending: i64,
    /// Messages delivered and awaiting ack.
    pub ack_pending: i64,
    /// Messages redelivered at least once.
    pub redelivered: i64,
    /// Deliveries so far, redeliveries included (the consumer's delivered
    /// consumer sequence): it moves whenever a worker is handed a message.
    #[serde(default)]
    pub delivered: i64,
    /// The ack floor: every input at or below this stream sequence is
    /// acknowledged. A consumer the server loses is recreated from the next one.
    #[serde(default)]
    pub ack_floor: i64,
    /// Since when work has waited (messages pending or awaiting ack) with no
    /// delivery and no acknowledgement; absent while the consumer moves or has
    /// nothing to do. Longer than the stall window: the Stalled condition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_since: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
}

/// Worker figures, all read from the worker Deployment.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkersStatus {
    /// Pods the Deployment asks for (its spec.replicas), whoever set it (see
    /// replicaMode).
    pub desired: i32,
    /// Pods ready.
    pub ready: i32,
    /// Pods available.
    pub available: i32,
}

/// What the operator observed.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OrderPipelineStatus {
    /// The spec generation this status describes (also when it could not be
    /// applied: see the conditions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The last spec generation applied in full (JetStream objects and the
    /// worker Deployment). A difference found while it equals the current
    /// generation was made outside the operator: drift.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_generation: Option<i64>,
    /// Ready (aggregate), StreamReady, ConsumerReady, WorkersAvailable,
    /// DuplicateWindowSufficient.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Input stream figures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<StreamStatus>,
    /// Consumer figures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumer: Option<ConsumerStatus>,
    /// Orders not yet processed: consumer pending + ack pending.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag: Option<i64>,
    /// Messages in the dead-letter stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letters: Option<i64>,
    /// Worker pod figures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers: Option<WorkersStatus>,
    /// workers.ready "/" workers.desired, as one string for the Workers column.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers_ready: Option<String>,
    /// Worker pods that exist now (the Deployment's status.replicas; the scale
    /// subresource's status replicas).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
    /// Label selector of the worker pods (for the scale subresource and HPAs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// The replica mode in force (Manual, Operator, External).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica_mode: Option<ReplicaMode>,
    /// The replicas the operator decided: spec.workers.replicas in Manual mode,
    /// the lag scaler's decision in Operator mode, 0 while paused. Absent in
    /// External mode, where the operator decides nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_replicas: Option<i32>,
    /// When the operator last changed the replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_time: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    /// Last time a scaling decision wanted at least the current replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_busy_time: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    /// Since when the lag has been zero.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_since: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    /// Worker replicas when the pipeline was paused; in External mode they are
    /// handed back to the external scaler on unpause (an HPA does not scale up
    /// from zero).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas_before_pause: Option<i32>,
    /// Which version of the referenced Secrets the pod template carries: a
    /// digest of their uid and resourceVersion (nothing of their data).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secrets_checksum: Option<String>,
    /// Seconds since the oldest order not yet processed was stored (the first
    /// input above the consumer's ack floor); absent when none is waiting. The
    /// stream removes it unprocessed when this reaches `maxAge`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_unprocessed_age_seconds: Option<i64>,
    /// The maxAge (seconds) the operator holds the input stream at, above
    /// spec.stream.maxAge, while orders wait (spec.stream.holdUnprocessed);
    /// absent when the spec's maxAge applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_max_age_seconds: Option<i64>,
    /// Orders the input stream's limits removed before they were processed
    /// (lost), counted by the operator; see the InputsRetained condition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub removed_unprocessed: Option<RemovedUnprocessed>,
    /// The identities the operator minted (spec.nats.accountRef).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nats_identity: Option<NatsIdentityStatus>,
}

/// Where a pipeline's minted NATS identities are.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NatsIdentityStatus {
    /// The Secret (key `creds`) the workers mount.
    pub worker_secret: String,
    /// The Secret (key `creds`) for the application that publishes orders:
    /// it may publish the input subject only.
    pub producer_secret: String,
    /// The inbox prefix both identities must use (the client's custom inbox
    /// prefix, e.g. `NATS_INBOX_PREFIX`): replies reach only this pipeline.
    pub inbox_prefix: String,
    /// When the current credentials expire; the operator renews them at half
    /// their lifetime.
    pub expires: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time,
}

/// Orders removed by the input stream's limits before they were processed.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RemovedUnprocessed {
    /// How many, since the pipeline was created.
    pub count: i64,
    /// False: some were counted while workers were delivering, and `count` is
    /// a lower bound.
    pub exact: bool,
    /// When the operator first saw one removed.
    pub first: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time,
    /// When it last saw one removed.
    pub last: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time,
}
