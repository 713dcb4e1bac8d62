//! `kubectl orderpipeline`: orderctl's status, audit and dead-letter commands for
//! one pipeline, named as kubectl names things (`NAME -n NAMESPACE`). Everything
//! else (the stream, consumer, dead-letter stream, NATS URL, credentials and TLS
//! Secrets) comes from the `OrderPipeline` resource: the plugin builds orderctl's
//! [`Global`] and [`Command`] itself, so no orderctl environment variable
//! (STREAM_NAME, NATS_URL, ...) reaches it.

use clap::{Parser, Subcommand};
use orderpipeline_common::flags::NatsArgs;
use orderpipeline_common::names;

use crate::cli::{Command, Global};
use crate::target::Given;
use crate::{audit, dlq, status};

#[derive(Parser, Debug)]
#[command(
    name = "kubectl orderpipeline",
    bin_name = "kubectl orderpipeline",
    version = orderpipeline_common::version::VERSION,
    about = "Status, audit and dead letters of an OrderPipeline, from its resource alone",
    after_help = "Examples:\n  kubectl orderpipeline status orders -n shop\n  kubectl orderpipeline dlq list orders -n shop\n  kubectl orderpipeline dlq replay orders 12 -n shop\n  kubectl orderpipeline audit orders -n shop --nats-url nats://127.0.0.1:4222   # through kubectl port-forward"
)]
pub struct Cli {
    /// The pipeline's namespace (default: the kubeconfig context's).
    #[arg(short = 'n', long, global = true)]
    pub namespace: Option<String>,
    /// NATS URL to use instead of the resource's spec.nats.url (which is often
    /// in-cluster only: reach it with kubectl port-forward).
    #[arg(long, global = true)]
    pub nats_url: Option<String>,
    /// Print results as JSON.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: PluginCommand,
}

#[derive(Subcommand, Debug)]
pub enum PluginCommand {
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
    /// One archive to attach to a bug report: the pipeline (every served API
    /// version), its status and Events, the workers' and the operator's
    /// Deployments, Pods and recent logs, the stream, consumer and DLQ from
    /// NATS; Secrets never, and secret values redacted.
    Report {
        name: String,
        /// The archive to write (default:
        /// orderpipeline-report-NAMESPACE-NAME-TIME.tar.gz here).
        #[arg(short = 'o', long)]
        output: Option<std::path::PathBuf>,
        /// The operator's namespace.
        #[arg(long, default_value = "orderpipeline-system")]
        operator_namespace: String,
        /// Log lines per container.
        #[arg(long, default_value_t = 500)]
        tail: i64,
    },
}

#[derive(Subcommand, Debug)]
pub enum Dlq {
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

impl Cli {
    /// The pipeline's `[NAMESPACE/]NAME`.
    fn reference(&self) -> String {
        let name = match &self.command {
            PluginCommand::Status { name }
            | PluginCommand::Audit { name }
            | PluginCommand::Report { name, .. } => name,
            PluginCommand::Dlq { command } => match command {
                Dlq::List { name, .. } | Dlq::Show { name, .. } | Dlq::Replay { name, .. } => name,
            },
        };
        match &self.namespace {
            Some(ns) => format!("{ns}/{name}"),
            None => name.clone(),
        }
    }

    /// orderctl's global flags: the pipeline, and from the environment only the
    /// credentials and TLS files a person may give instead of the pipeline's
    /// Secrets (NATS_USER/NATS_PASSWORD, NATS_TOKEN, NATS_CREDS_FILE, ...): never
    /// a name or a URL, which come from the resource (or --nats-url).
    pub fn global(&self) -> (Global, Given) {
        let (mut nats, given) = nats_credentials_from_env();
        nats.nats_url = self
            .nats_url
            .clone()
            .unwrap_or_else(|| names::DEFAULT_NATS_URL.into());
        let given = match self.nats_url {
            Some(_) => given.with_command_line("nats_url"),
            None => given,
        };
        let global = Global {
            nats,
            stream: names::DEFAULT_STREAM.into(),
            json: self.json,
            pipeline: Some(self.reference()),
        };
        (global, given)
    }

    /// The orderctl command this invocation stands for; its names are filled in
    /// from the pipeline when it is bound.
    pub fn command(&self) -> Command {
        let dlq_stream = names::DEFAULT_DLQ_STREAM.to_string();
        match &self.command {
            PluginCommand::Status { .. } => Command::Status(status::Args {
                consumer: names::DEFAULT_CONSUMER.into(),
                input_subject: names::DEFAULT_INPUT_SUBJECT.into(),
                dlq_stream,
            }),
            PluginCommand::Audit { .. } => Command::Audit(audit::Args {
                consumer: names::DEFAULT_CONSUMER.into(),
                dlq_stream,
                latency_from_seq: 1,
                legacy_state_bucket: None,
                legacy_if_present: false,
                removed: None,
            }),
            // Not an orderctl command: `main` runs it before this is asked.
            PluginCommand::Report { .. } => Command::Status(status::Args {
                consumer: names::DEFAULT_CONSUMER.into(),
                input_subject: names::DEFAULT_INPUT_SUBJECT.into(),
                dlq_stream,
            }),
            PluginCommand::Dlq { command } => Command::Dlq(dlq::Args {
                dlq_stream,
                command: match command {
                    Dlq::List { limit, .. } => dlq::Command::List { limit: *limit },
                    Dlq::Show { sequence, .. } => dlq::Command::Show {
                        sequence: *sequence,
                    },
                    Dlq::Replay { sequence, all, .. } => dlq::Command::Replay {
                        sequence: *sequence,
                        all: *all,
                    },
                },
            }),
        }
    }
}

/// The NATS flags' environment variables (credentials, TLS files), and which
/// of them were set; NATS_URL is not taken.
fn nats_credentials_from_env() -> (NatsArgs, Given) {
    use clap::{Args as _, FromArgMatches as _};
    let matches = NatsArgs::augment_args(clap::Command::new("kubectl-orderpipeline"))
        .try_get_matches_from(["kubectl-orderpipeline"]);
    let parsed = matches.ok().and_then(|m| {
        let nats = NatsArgs::from_arg_matches(&m).ok()?;
        Some((nats, Given::from_matches(&m).without("nats_url")))
    });
    parsed.unwrap_or_else(|| {
        let nats = NatsArgs::with_url(names::DEFAULT_NATS_URL);
        (nats, Given::default())
    })
}

/// The plugin's `main`.
pub fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) if matches!(cli.command, PluginCommand::Report { .. }) => {
            rt.block_on(run_report(&cli))
        }
        Ok(rt) => {
            let (global, given) = cli.global();
            rt.block_on(crate::cli::exec(
                global,
                cli.command(),
                &given,
                "kubectl orderpipeline",
            ))
        }
        Err(e) => {
            eprintln!("kubectl orderpipeline: cannot start the async runtime: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `kubectl orderpipeline report`: writes the archive, says where and what
/// it could not collect.
async fn run_report(cli: &Cli) -> std::process::ExitCode {
    let PluginCommand::Report {
        name,
        output,
        operator_namespace,
        tail,
    } = &cli.command
    else {
        return std::process::ExitCode::FAILURE;
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let o = crate::report::Options {
        namespace: cli.namespace.clone(),
        name: name.clone(),
        output: output.clone(),
        nats_url: cli.nats_url.clone(),
        operator_namespace: operator_namespace.clone(),
        tail: *tail,
    };
    match crate::report::report(&o).await {
        Ok(path) => {
            println!(
                "wrote {} (summary.txt in it lists its files and what could not be collected); attach it to the bug report",
                path.display()
            );
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("kubectl orderpipeline report: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(line: &str) -> Cli {
        Cli::try_parse_from(line.split_whitespace()).unwrap()
    }

    #[test]
    fn plugin_commands_name_the_pipeline_and_nothing_else() {
        let c = parse("k status orders -n shop");
        let (g, given) = c.global();
        assert_eq!(g.pipeline.as_deref(), Some("shop/orders"));
        assert!(!g.json);
        assert!(
            !given.set("nats_url"),
            "NATS_URL never overrides the resource"
        );
        assert!(matches!(c.command(), Command::Status(_)));

        let c = parse("k -n shop audit orders --json");
        assert_eq!(c.global().0.pipeline.as_deref(), Some("shop/orders"));
        assert!(c.global().0.json);
        assert!(matches!(
            c.command(),
            Command::Audit(audit::Args {
                legacy_state_bucket: None,
                ..
            })
        ));

        let c = parse("k dlq list orders --limit 5 --nats-url nats://127.0.0.1:1");
        assert_eq!(c.global().0.pipeline.as_deref(), Some("orders"));
        assert_eq!(c.global().0.nats.nats_url, "nats://127.0.0.1:1");
        assert!(c.global().1.on_command_line("nats_url"));
        assert!(matches!(
            c.command(),
            Command::Dlq(dlq::Args {
                command: dlq::Command::List { limit: 5 },
                ..
            })
        ));

        let c = parse("k dlq show orders 7 -n a");
        assert_eq!(c.global().0.pipeline.as_deref(), Some("a/orders"));
        assert!(matches!(
            c.command(),
            Command::Dlq(dlq::Args {
                command: dlq::Command::Show { sequence: 7 },
                ..
            })
        ));

        let c = parse("k dlq replay orders --all");
        assert!(matches!(
            c.command(),
            Command::Dlq(dlq::Args {
                command: dlq::Command::Replay {
                    sequence: None,
                    all: true
                },
                ..
            })
        ));
        assert!(
            Cli::try_parse_from(["k", "status"]).is_err(),
            "NAME is required"
        );
    }

    #[test]
    fn help_of_every_plugin_command() {
        crate::cli::tests::check_help(<Cli as CommandFactory>::command(), "kubectl-orderpipeline");
    }
}
