//! `orderctl`: publish orders and inspect outcomes and dead letters.

use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    name = "orderctl",
    version,
    about = "Publish orders and inspect the order pipeline"
)]
struct Cli {
    /// NATS server URL(s), comma separated.
    #[arg(long, env = "NATS_URL", default_value = "nats://localhost:4222")]
    nats_url: String,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    anyhow::bail!("orderctl is not implemented yet ({cli:?})")
}
