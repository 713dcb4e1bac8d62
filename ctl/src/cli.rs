//! `orderctl`'s command line: the global flags, one subcommand per module
//! ([`crate::publish`], [`crate::status`], [`crate::audit`], [`crate::dlq`]), and
//! [`exec`], which binds a command to its pipeline, connects and runs it.
//! `kubectl orderpipeline` builds the same [`Global`] and [`Command`] directly.

use clap::{CommandFactory as _, FromArgMatches as _, Parser, Subcommand};
use orderpipeline_common::flags::NatsArgs;
use orderpipeline_common::names;

use crate::target::{self, Binding, Given, Session};
use crate::{audit, dlq, publish, status};

#[derive(Parser, Debug)]
#[command(
    name = "orderctl",
    version = orderpipeline_common::version::VERSION,
    about = "Publish orders and inspect the order pipeline"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// The flags every command takes.
#[derive(clap::Args, Debug, Clone)]
pub struct Global {
    #[command(flatten)]
    pub nats: NatsArgs,
    /// Input stream.
    #[arg(long, env = "STREAM_NAME", default_value = names::DEFAULT_STREAM, global = true)]
    pub stream: String,
    /// Print results as JSON.
    #[arg(long, global = true)]
    pub json: bool,
    /// The pipeline to work on, `[NAMESPACE/]NAME` of an OrderPipeline (read
    /// through KUBECONFIG): its stream, consumer, input subject and dead-letter
    /// stream, and its NATS URL unless --nats-url/NATS_URL is given. It wins over
    /// STREAM_NAME, CONSUMER_NAME, INPUT_SUBJECT and DLQ_STREAM; a flag that
    /// names something else than the pipeline has is an error.
    #[arg(
        long,
        env = "ORDERPIPELINE",
        global = true,
        value_name = "[NAMESPACE/]NAME"
    )]
    pub pipeline: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Publish orders (each counted once JetStream acknowledged it).
    Publish(publish::Args),
    /// Count orders by outcome, and what the consumer still holds.
    Status(status::Args),
    /// Read every input and outcome back and check exactly-once: published,
    /// processed, rejected, dead-lettered, duplicates suppressed, lost, two
    /// outcomes, outcomes or dead letters without an input, stranded messages.
    /// Exits 1 on any violation, naming it.
    Audit(audit::Args),
    /// Inspect and replay dead letters.
    Dlq(dlq::Args),
}

impl Command {
    /// Takes the pipeline's names where the person did not give them.
    fn bind(&mut self, b: &Binding<'_>) -> anyhow::Result<()> {
        match self {
            Command::Publish(a) => a.bind(b),
            Command::Status(a) => a.bind(b),
            Command::Audit(a) => a.bind(b),
            Command::Dlq(a) => a.bind(b),
        }
    }

    async fn run(self, s: &Session) -> anyhow::Result<()> {
        match self {
            Command::Publish(a) => publish::run(s, a).await,
            Command::Status(a) => status::run(s, a).await,
            Command::Audit(a) => audit::run(s, a).await,
            Command::Dlq(a) => dlq::run(s, a).await,
        }
    }
}

/// Runs orderctl with these arguments (the first is the program name).
pub async fn main_from<I, T>(args: I) -> std::process::ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let matches = Cli::command().get_matches_from(args);
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    exec(
        cli.global,
        cli.command,
        &Given::from_matches(&matches),
        "orderctl",
    )
    .await
}

/// Binds `command` to its pipeline (with `--pipeline`), connects and runs it;
/// `program` prefixes the error printed on failure.
pub async fn exec(
    global: Global,
    command: Command,
    given: &Given,
    program: &str,
) -> std::process::ExitCode {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let telemetry = orderpipeline_common::telemetry::init("orderctl", "warn").ok();
    let result = bind_and_run(global, command, given).await;
    if let Some(t) = telemetry {
        let _ = tokio::task::spawn_blocking(move || t.shutdown()).await;
    }
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{program}: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn bind_and_run(
    mut global: Global,
    mut command: Command,
    given: &Given,
) -> anyhow::Result<()> {
    // The pipeline's Secrets stay on disk until the command is done.
    let mut _secret_files = None;
    if let Some(reference) = global.pipeline.clone() {
        let (p, files) =
            target::resolve(&reference, &mut global.nats, &mut global.stream, given).await?;
        _secret_files = Some(files);
        command.bind(&Binding {
            pipeline: &p,
            given,
        })?;
    }
    let session = Session::connect(&global.nats, global.stream, global.json).await?;
    let result = command.run(&session).await;
    session.client.flush().await.ok();
    result
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Every command's `--help`, as checked in under `ctl/tests/help/`.
    /// `UPDATE_HELP=1 cargo test -p orderpipeline-ctl help` rewrites them.
    pub(crate) fn check_help(mut cmd: clap::Command, prefix: &str) {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/help");
        let mut paths = vec![vec![]];
        collect_paths(&cmd, &mut vec![], &mut paths);
        cmd.build();
        for path in paths {
            let mut c = &mut cmd;
            for name in &path {
                c = c.find_subcommand_mut(name).expect("a listed subcommand");
            }
            let help =
                without_env_values(&c.clone().term_width(100).render_long_help().to_string());
            let file = dir.join(format!(
                "{}.txt",
                [prefix.to_string()]
                    .into_iter()
                    .chain(path.iter().cloned())
                    .collect::<Vec<_>>()
                    .join("-")
            ));
            if std::env::var_os("UPDATE_HELP").is_some() {
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(&file, &help).unwrap();
            }
            let want = std::fs::read_to_string(&file)
                .unwrap_or_else(|e| panic!("{}: {e}; run with UPDATE_HELP=1", file.display()));
            assert_eq!(
                help,
                want,
                "{} changed; run with UPDATE_HELP=1 and review the diff",
                file.display()
            );
        }
    }

    fn collect_paths(cmd: &clap::Command, at: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
        for sub in cmd.get_subcommands() {
            if sub.get_name() == "help" {
                continue;
            }
            at.push(sub.get_name().to_string());
            out.push(at.clone());
            collect_paths(sub, at, out);
            at.pop();
        }
    }

    /// `[env: NATS_URL=nats://...]` -> `[env: NATS_URL]`: the snapshot must not
    /// depend on the environment the test runs in.
    fn without_env_values(help: &str) -> String {
        let mut out = String::with_capacity(help.len());
        let mut rest = help;
        while let Some(i) = rest.find("[env: ") {
            out.push_str(&rest[..i + 6]);
            rest = &rest[i + 6..];
            let end = rest.find(']').unwrap_or(rest.len());
            let var = &rest[..end];
            out.push_str(var.split_once('=').map_or(var, |(name, _)| name));
            rest = &rest[end..];
        }
        out.push_str(rest);
        out
    }

    #[test]
    fn help_of_every_orderctl_command() {
        check_help(Cli::command(), "orderctl");
    }

    #[test]
    fn given_flags_are_told_from_defaults() {
        let m = Cli::command()
            .try_get_matches_from([
                "orderctl",
                "--stream",
                "S",
                "dlq",
                "--dlq-stream",
                "D",
                "list",
            ])
            .unwrap();
        let g = Given::from_matches(&m);
        assert!(g.on_command_line("stream"));
        assert!(g.on_command_line("dlq_stream"));
        assert!(!g.on_command_line("nats_url"));
        assert!(!g.set("limit"));
    }
}
