//! `order-operator`: reconciles `OrderPipeline` resources into JetStream objects
//! and a worker Deployment.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::routing::get;
use clap::{Parser, Subcommand};
use kube::CustomResourceExt as _;
use order_operator::controller::{self, Context};
use order_operator::crd::OrderPipeline;
use order_operator::metrics::Metrics;
use orderpipeline_common::duration::parse_duration;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(
    name = "order-operator",
    version,
    about = "Kubernetes operator for OrderPipeline resources"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the controller.
    Run(RunArgs),
    /// Print the OrderPipeline CRD as YAML.
    Crd,
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Watch one namespace only (default: all namespaces).
    #[arg(long, env = "WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "HTTP_ADDR", default_value = "0.0.0.0:8080")]
    http_addr: SocketAddr,
    /// Worker image used when a pipeline sets none.
    #[arg(long, env = "WORKER_IMAGE")]
    worker_image: Option<String>,
    /// How often each pipeline's figures are refreshed (jittered +-10%).
    #[arg(long, env = "RESYNC_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    resync_interval: Duration,
    /// This replica's name, for Events and the Lease (the Pod name in a cluster).
    #[arg(long, env = "POD_NAME", default_value = "order-operator")]
    pod_name: String,
    /// Elect a leader with a Lease so only one replica reconciles.
    #[arg(long, env = "LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    leader_elect: bool,
    /// Namespace of the Lease: the operator's own (default: POD_NAMESPACE, else
    /// orderpipeline-system), where its RBAC Role grants Leases.
    #[arg(long, env = "LEASE_NAMESPACE")]
    lease_namespace: Option<String>,
    /// How long the Lease stays valid without renewal; a standby takes over within it.
    #[arg(long, env = "LEASE_DURATION", default_value = "15s", value_parser = parse_duration)]
    lease_duration: Duration,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => match serde_yaml::to_string(&OrderPipeline::crd()) {
            Ok(y) => {
                print!("{y}");
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("order-operator: {e}");
                std::process::ExitCode::FAILURE
            }
        },
        Command::Run(args) => {
            let _ = rustls::crypto::ring::default_provider().install_default();
            let telemetry =
                match orderpipeline_common::telemetry::init("order-operator", "info,kube=warn") {
                    Ok(t) => t,
                    Err(e) => {
                        eprintln!("order-operator: {e}");
                        return std::process::ExitCode::from(2);
                    }
                };
            let r = run(args).await;
            let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
            match r {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = format!("{e:#}"), "order-operator failed");
                    eprintln!("order-operator: {e:#}");
                    std::process::ExitCode::FAILURE
                }
            }
        }
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let client = kube::Client::try_default()
        .await
        .context("cannot build a Kubernetes client (in-cluster config or KUBECONFIG)")?;
    let mut registry = Registry::default();
    let metrics = Metrics::new(&mut registry);
    let registry = Arc::new(registry);
    let image = args
        .worker_image
        .clone()
        .unwrap_or_else(order_operator::render::default_worker_image);
    let ctx = Arc::new(Context::new(
        client.clone(),
        metrics,
        image,
        args.resync_interval,
        args.pod_name.clone(),
    ));

    let shutdown = CancellationToken::new();
    let s = shutdown.clone();
    tokio::spawn(async move {
        orderpipeline_common::signal::shutdown_signal().await;
        tracing::info!("signal received; shutting down");
        s.cancel();
    });

    let listener = tokio::net::TcpListener::bind(args.http_addr)
        .await
        .with_context(|| {
            format!(
                "HTTP_ADDR {}: cannot listen there; pick a free host:port",
                args.http_addr
            )
        })?;
    let reg = registry.clone();
    let app = axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(|| async { "ok\n" }))
        .route(
            "/metrics",
            get(move || {
                let reg = reg.clone();
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
    let hs = shutdown.clone();
    let http = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { hs.cancelled().await })
            .await
    });
    tracing::info!(namespace = ?args.namespace, addr = %args.http_addr, "order-operator starting");
    let lost = CancellationToken::new();
    let release = CancellationToken::new();
    let mut holder = None;
    if args.leader_elect {
        let lease = order_operator::leader::LeaseConfig {
            namespace: args
                .lease_namespace
                .clone()
                .or_else(|| std::env::var("POD_NAMESPACE").ok())
                .unwrap_or_else(|| "orderpipeline-system".into()),
            name: match &args.namespace {
                Some(ns) => format!("order-operator-{ns}"),
                None => "order-operator".into(),
            },
            identity: args.pod_name.clone(),
            duration: args.lease_duration,
        };
        if !order_operator::leader::acquire(&client, &lease, &shutdown).await {
            let _ = http.await;
            return Ok(());
        }
        // Its own token: the Lease is handed back only once no reconcile runs
        // (a SIGTERM cancels `shutdown` while reconciles are still finishing).
        holder = Some(tokio::spawn(order_operator::leader::hold(
            client.clone(),
            lease,
            release.clone(),
            lost.clone(),
        )));
    }
    let cs = shutdown.clone();
    let run = controller::run(ctx, args.namespace, async move { cs.cancelled().await });
    tokio::select! {
        // SIGTERM: in-flight reconciles finish, then the Lease is released.
        _ = run => {}
        // Leadership lost: another replica may lead already, so in-flight
        // reconciles are dropped at once rather than finished.
        _ = lost.cancelled() => {}
    }
    shutdown.cancel();
    release.cancel();
    if let Some(h) = holder {
        let _ = h.await;
    }
    let _ = http.await;
    if lost.is_cancelled() {
        anyhow::bail!("lost leadership; exiting so a restart rejoins as a standby");
    }
    tracing::info!("stopped");
    Ok(())
}
