//! `order-worker`: processes orders from a JetStream pull consumer, exactly once.

use clap::Parser as _;
use order_worker::config::Config;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cfg = Config::parse();
    if let Err(e) = cfg.check() {
        eprintln!("order-worker: invalid configuration: {e}");
        return std::process::ExitCode::from(2);
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let telemetry = match orderpipeline_common::telemetry::init("order-worker", "info") {
        Ok(t) => t,
        Err(e) => {
            eprintln!("order-worker: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        orderpipeline_common::signal::shutdown_signal().await;
        tracing::info!("signal received; shutting down");
        signal.cancel();
    });
    let result = order_worker::run::run(cfg, shutdown).await;
    let code = match &result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e)
            if e.downcast_ref::<order_worker::run::Misconfigured>()
                .is_some() =>
        {
            tracing::error!(error = format!("{e:#}"), "order-worker refused to start");
            eprintln!("order-worker: {e:#}");
            std::process::ExitCode::from(2)
        }
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "order-worker failed");
            eprintln!("order-worker: {e:#}");
            std::process::ExitCode::FAILURE
        }
    };
    let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    code
}
