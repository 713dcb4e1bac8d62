//! `order-operator`: reconciles `OrderPipeline` resources into JetStream objects
//! and a worker Deployment.

use clap::{Parser, Subcommand};
use kube::CustomResourceExt as _;
use order_operator::crd::OrderPipeline;

#[derive(Parser, Debug)]
#[command(
    name = "order-operator",
    version = orderpipeline_common::version::VERSION,
    about = "Kubernetes operator for OrderPipeline resources"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the controller.
    Run(Box<order_operator::app::Settings>),
    /// Print the OrderPipeline CRD as YAML.
    Crd,
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
            let r = order_operator::app::run(*args).await;
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
