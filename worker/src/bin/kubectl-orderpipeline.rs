//! `kubectl orderpipeline`: orderctl's status, audit and dead-letter commands for
//! one pipeline, named as kubectl names things (`NAME -n NAMESPACE`). Everything
//! else (the stream, consumer, dead-letter stream, NATS URL, credentials and TLS
//! Secrets) comes from the `OrderPipeline` resource.

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "kubectl orderpipeline",
    bin_name = "kubectl orderpipeline",
    version,
    about = "Status, audit and dead letters of an OrderPipeline, from its resource alone",
    after_help = "Examples:\n  kubectl orderpipeline status orders -n shop\n  kubectl orderpipeline dlq list orders -n shop\n  kubectl orderpipeline dlq replay orders 12 -n shop\n  kubectl orderpipeline audit orders -n shop --nats-url nats://127.0.0.1:4222   # through kubectl port-forward"
)]
struct Cli {
    /// The pipeline's namespace (default: the kubeconfig context's).
    #[arg(short = 'n', long, global = true)]
    namespace: Option<String>,
    /// NATS URL to use instead of the resource's spec.nats.url (which is often
    /// in-cluster only: reach it with kubectl port-forward).
    #[arg(long, global = true)]
    nats_url: Option<String>,
    /// Print results as JSON.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Orders by outcome, and what the consumer still holds.
    Status { name: String },
    /// Every input and outcome read back and checked for exactly-once (exits 1
    /// on a violation, naming it).
    Audit { name: String },
    /// Dead letters: list, show, replay.
    Dlq {
        #[command(subcommand)]
        command: Dlq,
    },
}

#[derive(Subcommand, Debug)]
enum Dlq {
    /// List the pipeline's dead letters.
    List {
        name: String,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// One dead letter in full.
    Show { name: String, sequence: u64 },
    /// Re-submit dead letters (one sequence, or --all); each ends with one outcome.
    Replay {
        name: String,
        sequence: Option<u64>,
        #[arg(long)]
        all: bool,
    },
}

/// The orderctl command line this plugin invocation stands for.
fn orderctl_args(cli: &Cli) -> Vec<String> {
    let reference = |name: &str| match &cli.namespace {
        Some(ns) => format!("{ns}/{name}"),
        None => name.to_string(),
    };
    let mut a = vec!["kubectl-orderpipeline".to_string()];
    let name = match &cli.command {
        Command::Status { name } | Command::Audit { name } => name,
        Command::Dlq { command } => match command {
            Dlq::List { name, .. } | Dlq::Show { name, .. } | Dlq::Replay { name, .. } => name,
        },
    };
    a.extend(["--pipeline".into(), reference(name)]);
    if let Some(u) = &cli.nats_url {
        a.extend(["--nats-url".into(), u.clone()]);
    }
    if cli.json {
        a.push("--json".into());
    }
    match &cli.command {
        Command::Status { .. } => a.push("status".into()),
        Command::Audit { .. } => a.push("audit".into()),
        Command::Dlq { command } => {
            a.push("dlq".into());
            match command {
                Dlq::List { limit, .. } => {
                    a.extend(["list".into(), "--limit".into(), limit.to_string()])
                }
                Dlq::Show { sequence, .. } => a.extend(["show".into(), sequence.to_string()]),
                Dlq::Replay { sequence, all, .. } => {
                    a.push("replay".into());
                    if let Some(s) = sequence {
                        a.push(s.to_string());
                    }
                    if *all {
                        a.push("--all".into());
                    }
                }
            }
        }
    }
    a
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // The names come from the resource only: variables meant for orderctl's
    // defaults must not override it (--nats-url is the plugin's own override).
    for v in [
        "STREAM_NAME",
        "CONSUMER_NAME",
        "INPUT_SUBJECT",
        "DLQ_STREAM",
        "ORDERPIPELINE",
        "NATS_URL",
    ] {
        // SAFETY: no other thread exists yet (the runtime is built below).
        unsafe { std::env::remove_var(v) };
    }
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(order_worker::cli::main_from(
            orderctl_args(&cli),
            "kubectl orderpipeline",
        )),
        Err(e) => {
            eprintln!("kubectl orderpipeline: cannot start the async runtime: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> Vec<String> {
        let cli = Cli::try_parse_from(line.split_whitespace()).unwrap();
        orderctl_args(&cli)[1..].to_vec()
    }

    #[test]
    fn plugin_commands_become_orderctl_commands_on_the_pipeline() {
        assert_eq!(
            args("k status orders -n shop"),
            ["--pipeline", "shop/orders", "status"]
        );
        assert_eq!(
            args("k -n shop audit orders --json"),
            ["--pipeline", "shop/orders", "--json", "audit"]
        );
        assert_eq!(
            args("k dlq list orders --limit 5 --nats-url nats://127.0.0.1:1"),
            [
                "--pipeline",
                "orders",
                "--nats-url",
                "nats://127.0.0.1:1",
                "dlq",
                "list",
                "--limit",
                "5"
            ]
        );
        assert_eq!(
            args("k dlq show orders 7 -n a"),
            ["--pipeline", "a/orders", "dlq", "show", "7"]
        );
        assert_eq!(
            args("k dlq replay orders --all"),
            ["--pipeline", "orders", "dlq", "replay", "--all"]
        );
        assert!(
            Cli::try_parse_from(["k", "status"]).is_err(),
            "NAME is required"
        );
    }
}
