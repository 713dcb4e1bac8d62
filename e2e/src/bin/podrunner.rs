//! `podrunner`: runs a real order-worker for every OrderPipeline worker Pod on the
//! local kwok nodes (test and demo support; see e2e/src/podrunner.rs).

use std::path::PathBuf;

use orderpipeline_e2e::podrunner::{RunnerConfig, run};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut namespace = None;
    let mut worker = None;
    let mut dir = None;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--namespace" => namespace = args.next(),
            "--worker-binary" => worker = args.next().map(PathBuf::from),
            "--work-dir" => dir = args.next().map(PathBuf::from),
            "-h" | "--help" => {
                println!("podrunner [--namespace NS] --worker-binary PATH [--work-dir DIR]");
                return Ok(());
            }
            other => anyhow::bail!("unknown argument {other}; see --help"),
        }
    }
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let worker_binary = worker.ok_or_else(|| anyhow::anyhow!("--worker-binary is required"))?;
    let work_dir = dir.unwrap_or_else(|| std::env::temp_dir().join("podrunner"));
    let client = kube::Client::try_default().await?;
    let shutdown = CancellationToken::new();
    let s = shutdown.clone();
    tokio::spawn(async move {
        orderpipeline_common::signal::shutdown_signal().await;
        s.cancel();
    });
    run(
        client,
        RunnerConfig {
            namespace,
            worker_binary,
            image_binaries: Vec::new(),
            work_dir,
        },
        shutdown,
    )
    .await
}
