//! `order-operator`: reconciles `OrderPipeline` resources into JetStream objects
//! and a worker Deployment.

use clap::{Parser, Subcommand};

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
    /// Run the controller (not implemented yet: see the operator issue).
    Run,
    /// Print the OrderPipeline CRD as YAML (not implemented yet).
    Crd,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run | Command::Crd => {
            anyhow::bail!("{:?} is not implemented yet", cli.command)
        }
    }
}
