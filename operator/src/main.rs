//! `order-operator`: reconciles `OrderPipeline` resources into JetStream objects
//! and a worker Deployment.

use clap::{Parser, Subcommand};
use kube::CustomResourceExt as _;
use order_operator::crd::OrderPipeline;

#[derive(Parser, Debug)]
#[command(name = "order-operator", version, about = "Kubernetes operator for OrderPipeline resources")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the controller.
    Run,
    /// Print the OrderPipeline CRD as YAML.
    Crd,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => {
            print!("{}", serde_yaml::to_string(&OrderPipeline::crd())?);
            Ok(())
        }
        Command::Run => anyhow::bail!("not implemented yet"),
    }
}
