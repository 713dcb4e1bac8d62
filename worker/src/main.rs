//! `order-worker`: consumes orders from JetStream and processes each exactly once.

use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    name = "order-worker",
    version,
    about = "Processes orders from a JetStream pull consumer"
)]
struct Config {
    /// NATS server URL(s), comma separated.
    #[arg(long, env = "NATS_URL", default_value = "nats://localhost:4222")]
    nats_url: String,
    /// Orders processed concurrently by this process.
    #[arg(long, env = "WORKER_POOL_SIZE", default_value_t = 10)]
    worker_pool_size: u32,
}

fn main() -> anyhow::Result<()> {
    let cfg = Config::parse();
    anyhow::bail!("order processing is not implemented yet ({cfg:?})")
}
