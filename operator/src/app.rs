//! The operator process: its HTTP endpoints, leader election and the
//! controller, and the order they stop in (the Lease is handed back last).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::controller::{self, Context};
use crate::metrics::Metrics;
use anyhow::Context as _;
use axum::routing::get;
use orderpipeline_common::duration::parse_duration;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

/// What `order-operator run` is told (flags and their environment variables).
#[derive(clap::Args, Debug)]
pub struct Settings {
    /// Watch these namespaces only, comma separated (default: all
    /// namespaces); RBAC then needs a Role in each of them only.
    #[arg(long, env = "WATCH_NAMESPACE", value_delimiter = ',')]
    pub namespace: Vec<String>,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "HTTP_ADDR", default_value = "0.0.0.0:8080")]
    pub http_addr: SocketAddr,
    /// Worker image used when a pipeline sets none.
    #[arg(long, env = "WORKER_IMAGE")]
    pub worker_image: Option<String>,
    /// How often each pipeline's figures are refreshed (jittered +-10%).
    #[arg(long, env = "RESYNC_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub resync_interval: Duration,
    /// This replica's name, for Events and the Lease (the Pod name in a cluster).
    #[arg(long, env = "POD_NAME", default_value = "order-operator")]
    pub pod_name: String,
    /// Elect a leader with a Lease so only one replica reconciles.
    #[arg(long, env = "LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_elect: bool,
    /// Namespace of the Lease: the operator's own (default: POD_NAMESPACE, else
    /// orderpipeline-system), where its RBAC Role grants Leases.
    #[arg(long, env = "LEASE_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// How long the Lease stays valid without renewal; a standby takes over within it.
    #[arg(long, env = "LEASE_DURATION", default_value = "15s", value_parser = parse_duration)]
    pub lease_duration: Duration,
    /// This cluster's identity in the downstream Idempotency-Key
    /// (`<cluster>/<namespace>/<pipeline>:<key>`), pinned in each input stream
    /// the operator creates. Default: the UID of the kube-system namespace.
    #[arg(long, env = "CLUSTER_ID")]
    pub cluster_id: Option<String>,
    /// NATS server memory per subject of an input stream (one per retained
    /// order), for the estimate in each pipeline's status and metrics. The
    /// default is `make bench-growth`'s RSS per stored order on a 2-core machine
    /// with a short duplicate window, rounded up; measure yours.
    #[arg(long, env = "NATS_BYTES_PER_SUBJECT", default_value_t = 400)]
    pub nats_bytes_per_subject: u64,
    /// How long a pipeline's consumer may deliver nothing and keep its ack
    /// floor while orders wait and its workers are available before it is
    /// Stalled (condition, Warning Event, orderoperator_pipeline_stalled).
    /// Never shorter than a pipeline's ack wait (or longest backoff step) plus
    /// its workers' longest NAK delay: a message in backoff is not a stall.
    #[arg(long, env = "STALL_WINDOW", default_value = crate::controller::stall::DEFAULT_WINDOW, value_parser = parse_duration)]
    pub stall_window: Duration,
    /// Let pipelines send credentials (`spec.nats.credentialsSecretRef`) over a
    /// plain `nats://` URL without TLS. Off by default: anyone on the network
    /// path could read them. For a trusted network or a local environment.
    #[arg(long, env = "ALLOW_PLAINTEXT_CREDENTIALS", default_value_t = false, action = clap::ArgAction::Set)]
    pub allow_plaintext_credentials: bool,
    /// Image prefixes a pipeline's `spec.workers.image` must start with, comma
    /// separated (e.g. `ghcr.io/orderpipeline/`); empty: any image.
    #[arg(long, env = "ALLOWED_IMAGES", value_delimiter = ',')]
    pub allowed_images: Vec<String>,
    /// NATS hosts pipelines may use, comma separated: a name, or `*.suffix`
    /// for every name under it; empty: any host.
    #[arg(long, env = "ALLOWED_NATS_HOSTS", value_delimiter = ',')]
    pub allowed_nats_hosts: Vec<String>,
    /// Where the NATS accounts (`spec.nats.accountRef`) live: Secrets labelled
    /// `orderpipeline.dev/nats-account=true`. Default: POD_NAMESPACE (the
    /// operator's own namespace); unset: pipelines cannot use accountRef.
    #[arg(long, env = "ACCOUNTS_NAMESPACE")]
    pub accounts_namespace: Option<String>,
    /// How long the NATS identities the operator mints are valid; it renews
    /// them at half of it. A deleted pipeline's identities stop working when
    /// they expire; the workers keep working while the operator is down for
    /// up to half of it.
    #[arg(long, env = "NATS_IDENTITY_TTL", default_value = "6h", value_parser = parse_duration)]
    pub nats_identity_ttl: Duration,
    /// Give each pipeline's workers a NetworkPolicy: ingress on their HTTP
    /// port only, egress to DNS and the endpoints their spec names (NATS, the
    /// downstream, OTLP) only. Needs get, create and patch on networkpolicies.
    #[arg(long, env = "WORKER_NETWORK_POLICY", default_value_t = true, action = clap::ArgAction::Set)]
    pub worker_network_policy: bool,
}

/// The cluster identity: `--cluster-id`, else the kube-system namespace's UID
/// (unique per cluster, stable for its life).
async fn cluster_identity(args: &Settings, client: &kube::Client) -> anyhow::Result<String> {
    if let Some(id) = args
        .cluster_id
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        anyhow::ensure!(
            id.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')),
            "--cluster-id/CLUSTER_ID {id:?}: use letters, digits, '-', '_' and '.' only (it becomes part of the downstream's Idempotency-Key)"
        );
        return Ok(id.to_string());
    }
    let api: kube::Api<k8s_openapi::api::core::v1::Namespace> = kube::Api::all(client.clone());
    let ns = api.get("kube-system").await.map_err(|e| {
        anyhow::anyhow!(
            "cannot read namespace kube-system, whose UID is the default cluster identity of the downstream's Idempotency-Key ({e}); grant get on it (manifests/rbac.yaml does) or set --cluster-id/CLUSTER_ID (chart value clusterId)"
        )
    })?;
    ns.metadata
        .uid
        .context("namespace kube-system has no UID; set --cluster-id/CLUSTER_ID")
}

/// Runs until SIGTERM/SIGINT (or until leadership is lost: an error, so that the
/// restart rejoins as a standby).
impl Settings {
    /// The watched namespaces (`--namespace`), trimmed, without blanks or
    /// repeats; none: every namespace.
    pub fn namespaces(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for ns in self.namespace.iter().map(|n| n.trim()) {
            if !ns.is_empty() && !out.iter().any(|o| o == ns) {
                out.push(ns.to_string());
            }
        }
        out
    }
}

pub async fn run(args: Settings) -> anyhow::Result<()> {
    let client = kube::Client::try_default()
        .await
        .context("cannot build a Kubernetes client (in-cluster config or KUBECONFIG)")?;
    let mut registry = Registry::default();
    let metrics = Metrics::new(&mut registry);
    let leader = metrics.leader.clone();
    controller::init_metrics(&metrics);
    let cluster = cluster_identity(&args, &client).await?;
    tracing::info!(
        cluster,
        "cluster identity (the downstream Idempotency-Key's scope)"
    );
    let ctx = context(&args, client.clone(), metrics, cluster);
    let shutdown = shutdown_on_signal();
    let http = serve_http(args.http_addr, Arc::new(registry), shutdown.clone()).await?;
    tracing::info!(
        version = orderpipeline_common::version::VERSION,
        namespaces = ?args.namespaces(),
        addr = %args.http_addr,
        "order-operator starting"
    );
    let Some(leadership) = Leadership::take(&args, &client, &shutdown).await else {
        let _ = http.await;
        return Ok(());
    };
    leader.set(1);
    let lost = leadership
        .reconcile(ctx, args.namespaces(), &shutdown, &leader)
        .await;
    let _ = http.await;
    if lost {
        anyhow::bail!("lost leadership; exiting so a restart rejoins as a standby");
    }
    tracing::info!("stopped");
    Ok(())
}

/// The controller's shared context.
fn context(
    args: &Settings,
    client: kube::Client,
    metrics: Metrics,
    cluster: String,
) -> Arc<Context> {
    let image = args
        .worker_image
        .clone()
        .unwrap_or_else(crate::render::default_worker_image);
    let mut ctx = Context::new(
        client,
        metrics,
        image,
        args.resync_interval,
        args.pod_name.clone(),
    );
    ctx.cluster_id = cluster;
    ctx.nats_bytes_per_subject = args.nats_bytes_per_subject;
    ctx.stall_window = args.stall_window;
    ctx.allow_plaintext_credentials = args.allow_plaintext_credentials;
    ctx.allowlists = crate::render::Allowlists::new(&args.allowed_images, &args.allowed_nats_hosts);
    ctx.accounts_namespace = args
        .accounts_namespace
        .clone()
        .or_else(|| std::env::var("POD_NAMESPACE").ok())
        .filter(|n| !n.is_empty());
    ctx.identity_ttl = args.nats_identity_ttl;
    ctx.worker_network_policy = args.worker_network_policy;
    Arc::new(ctx)
}

/// A token cancelled by SIGTERM/SIGINT.
fn shutdown_on_signal() -> CancellationToken {
    let shutdown = CancellationToken::new();
    let s = shutdown.clone();
    tokio::spawn(async move {
        orderpipeline_common::signal::shutdown_signal().await;
        tracing::info!("signal received; shutting down");
        s.cancel();
    });
    shutdown
}

/// This process's leadership: held by a task renewing the Lease (none without
/// leader election).
struct Leadership {
    holder: Option<tokio::task::JoinHandle<()>>,
    /// Cancelled when the Lease is lost.
    lost: CancellationToken,
    /// Its own token: the Lease is handed back only once no reconcile runs (a
    /// SIGTERM cancels `shutdown` while reconciles are still finishing).
    release: CancellationToken,
}

impl Leadership {
    /// Waits for the Lease (with leader election); `None` when shutdown came first.
    async fn take(
        args: &Settings,
        client: &kube::Client,
        shutdown: &CancellationToken,
    ) -> Option<Self> {
        let (lost, release) = (CancellationToken::new(), CancellationToken::new());
        let mut holder = None;
        if args.leader_elect {
            let lease = lease_config(args);
            if !crate::leader::acquire(client, &lease, shutdown).await {
                return None;
            }
            let hold = crate::leader::hold(client.clone(), lease, release.clone(), lost.clone());
            holder = Some(tokio::spawn(hold));
        }
        Some(Self {
            holder,
            lost,
            release,
        })
    }

    /// Reconciles until shutdown or until leadership is lost (`true`), then
    /// hands the Lease back.
    async fn reconcile(
        self,
        ctx: Arc<Context>,
        namespaces: Vec<String>,
        shutdown: &CancellationToken,
        leader: &prometheus_client::metrics::gauge::Gauge,
    ) -> bool {
        let cs = shutdown.clone();
        let run = controller::run(ctx, namespaces, async move { cs.cancelled().await });
        tokio::select! {
            // SIGTERM: in-flight reconciles finish, then the Lease is released.
            _ = run => {}
            // Leadership lost: another replica may lead already, so in-flight
            // reconciles are dropped at once rather than finished.
            _ = self.lost.cancelled() => {}
        }
        shutdown.cancel();
        leader.set(0);
        self.release.cancel();
        if let Some(h) = self.holder {
            let _ = h.await;
        }
        self.lost.is_cancelled()
    }
}

/// /healthz, /readyz and /metrics until `shutdown`.
async fn serve_http(
    addr: SocketAddr,
    registry: Arc<Registry>,
    shutdown: CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<std::io::Result<()>>> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("HTTP_ADDR {addr}: cannot listen there; pick a free host:port"))?;
    let app = axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(|| async { "ok\n" }))
        .route(
            "/metrics",
            get(move || {
                let reg = registry.clone();
                async move {
                    let mut out = String::new();
                    let _ = prometheus_client::encoding::text::encode(&mut out, &reg);
                    (
                        [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
                        out,
                    )
                }
            }),
        );
    Ok(tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await
    }))
}

/// The Lease's name: one per set of watched namespaces, so that operators
/// installed for different namespaces each lead their own.
fn lease_name(namespaces: &[String]) -> String {
    let mut sorted: Vec<&str> = namespaces.iter().map(String::as_str).collect();
    sorted.sort_unstable();
    match sorted.join(".") {
        all if all.is_empty() => "order-operator".into(),
        // A Lease's name is at most 253 characters.
        set if set.len() <= 200 => format!("order-operator-{set}"),
        set => {
            use sha2::Digest as _;
            let d = sha2::Sha256::digest(set.as_bytes());
            let hex: String = d.iter().take(8).map(|b| format!("{b:02x}")).collect();
            format!("order-operator-{hex}")
        }
    }
}

/// The Lease: in the operator's own namespace, one per set of watched namespaces.
fn lease_config(args: &Settings) -> crate::leader::LeaseConfig {
    crate::leader::LeaseConfig {
        namespace: args
            .lease_namespace
            .clone()
            .or_else(|| std::env::var("POD_NAMESPACE").ok())
            .unwrap_or_else(|| "orderpipeline-system".into()),
        name: lease_name(&args.namespaces()),
        identity: args.pod_name.clone(),
        duration: args.lease_duration,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        settings: Settings,
    }

    #[test]
    fn a_list_of_namespaces_is_watched_under_one_lease_per_set() {
        let cli = Cli::parse_from(["op", "--namespace", " shop,billing,,shop "]);
        let ns = cli.settings.namespaces();
        assert_eq!(ns, ["shop", "billing"]);
        assert_eq!(lease_name(&ns), "order-operator-billing.shop");
        assert_eq!(lease_name(&["shop".into()]), "order-operator-shop");
        assert_eq!(lease_name(&[]), "order-operator");
        let many: Vec<String> = (0..40).map(|i| format!("tenant-{i:03}")).collect();
        let long = lease_name(&many);
        assert!(
            long.len() <= 63 && long.starts_with("order-operator-"),
            "{long}"
        );
        assert_ne!(long, lease_name(&many[1..]), "another set, another Lease");
    }
}
