//! `orderctl` (and `kubectl orderpipeline`, which drives it): publish orders,
//! count outcomes, inspect and replay dead letters.

use std::time::Duration;

use anyhow::Context as _;

use crate::config::{NatsArgs, parse_duration};
use crate::ctl::{self, Names, PublishOptions};
use crate::pipeline_ref;
use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory as _, FromArgMatches as _, Parser, Subcommand};
use orderpipeline_common::names;
use orderpipeline_proto::ErrorClass;

#[derive(Parser, Debug)]
#[command(
    name = "orderctl",
    version,
    about = "Publish orders and inspect the order pipeline"
)]
struct Cli {
    #[command(flatten)]
    nats: NatsArgs,
    /// Input stream.
    #[arg(long, env = "STREAM_NAME", default_value = names::DEFAULT_STREAM, global = true)]
    stream: String,
    /// Print results as JSON.
    #[arg(long, global = true)]
    json: bool,
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
    pipeline: Option<String>,
    /// Set by --pipeline: honour the legacy bucket only if it still exists.
    #[arg(skip)]
    legacy_if_present: bool,
    /// Set by --pipeline: the pipeline's Secrets written for the NATS client
    /// (removed on exit).
    #[arg(skip)]
    secret_files: Option<pipeline_ref::SecretFiles>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Publish orders (each counted once JetStream acknowledged it).
    Publish {
        /// How many orders.
        #[arg(long, default_value_t = 100)]
        count: u64,
        /// Orders per second (0 = as fast as acks come back).
        #[arg(long, default_value_t = 0.0)]
        rate: f64,
        /// Fraction of orders that are invalid (rejected by the workers).
        #[arg(long, default_value_t = 0.0)]
        invalid_ratio: f64,
        /// Fraction of publishes that repeat an earlier order with the same Nats-Msg-Id.
        #[arg(long, default_value_t = 0.0)]
        duplicate_ratio: f64,
        /// Order id prefix (ids are PREFIX-N); default: a random run id.
        #[arg(long)]
        prefix: Option<String>,
        /// Subject to publish on.
        #[arg(long, env = "INPUT_SUBJECT", default_value = names::DEFAULT_INPUT_SUBJECT)]
        subject: String,
        /// Undecodable messages to publish too (they end in the dead-letter stream).
        #[arg(long, default_value_t = 0)]
        poison: u64,
        /// Publishes in flight at once.
        #[arg(long, default_value_t = 256)]
        window: usize,
        /// How long to wait for a PubAck before re-sending with the same id.
        #[arg(long, default_value = "5s", value_parser = parse_duration)]
        ack_timeout: Duration,
    },
    /// Count orders by outcome, and what the consumer still holds.
    Status {
        #[arg(long, env = "CONSUMER_NAME", default_value = names::DEFAULT_CONSUMER)]
        consumer: String,
        /// The pipeline's input subject (its consumer's filter); outcomes are
        /// counted on the subjects derived from it.
        #[arg(long, env = "INPUT_SUBJECT", default_value = names::DEFAULT_INPUT_SUBJECT)]
        input_subject: String,
        #[arg(long, env = "DLQ_STREAM", default_value = names::DEFAULT_DLQ_STREAM)]
        dlq_stream: String,
    },
    /// Read every input and outcome back and check exactly-once: published,
    /// processed, rejected, dead-lettered, duplicates suppressed, lost, two
    /// outcomes, outcomes or dead letters without an input, stranded messages.
    /// Exits 1 on any violation, naming it.
    Audit {
        #[arg(long, env = "CONSUMER_NAME", default_value = names::DEFAULT_CONSUMER)]
        consumer: String,
        #[arg(long, env = "DLQ_STREAM", default_value = names::DEFAULT_DLQ_STREAM)]
        dlq_stream: String,
        /// Publish -> outcome latency (p50, p99, from the stream's timestamps) of
        /// the inputs stored from this stream sequence on.
        #[arg(long, default_value_t = 1)]
        latency_from_seq: u64,
        /// After an upgrade from the protocol before v2: its KV bucket (e.g.
        /// ORDERS_STATE), whose final records count as outcomes.
        #[arg(long, env = "LEGACY_STATE_BUCKET")]
        legacy_state_bucket: Option<String>,
    },
    /// Inspect and replay dead letters.
    Dlq {
        #[arg(long, env = "DLQ_STREAM", default_value = names::DEFAULT_DLQ_STREAM, global = true)]
        dlq_stream: String,
        #[command(subcommand)]
        command: DlqCommand,
    },
}

#[derive(Subcommand, Debug)]
enum DlqCommand {
    /// List dead letters.
    List {
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Show one dead letter in full.
    Show { sequence: u64 },
    /// Re-submit dead letters for processing (one sequence, or --all).
    Replay {
        sequence: Option<u64>,
        #[arg(long)]
        all: bool,
    },
}

fn class_name(c: ErrorClass) -> &'static str {
    match c {
        ErrorClass::Undecodable => "undecodable",
        ErrorClass::Permanent => "permanent",
        ErrorClass::AttemptsExhausted => "attempts_exhausted",
        ErrorClass::Oversized => "oversized",
        ErrorClass::Unspecified => "unspecified",
    }
}

/// Runs orderctl with these arguments (the first is the program name);
/// `program` prefixes the error printed on failure.
pub async fn main_from<I, T>(args: I, program: &str) -> std::process::ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let matches = Cli::command().get_matches_from(args);
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let telemetry = orderpipeline_common::telemetry::init("orderctl", "warn").ok();
    let result = match resolve_pipeline(cli, &matches).await {
        Ok(cli) => run(cli).await,
        Err(e) => Err(e),
    };
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

/// How a flag got its value, looking into the subcommands too.
fn source_of(m: &ArgMatches, id: &str) -> Option<ValueSource> {
    let own = m
        .try_get_raw(id)
        .ok()
        .flatten()
        .and_then(|_| m.value_source(id));
    match m.subcommand() {
        Some((_, sub)) => source_of(sub, id).or(own),
        None => own,
    }
}

/// With `--pipeline`, fills the names in from the resource; a name given on the
/// command line that differs from the pipeline's is an error naming both.
async fn resolve_pipeline(mut cli: Cli, m: &ArgMatches) -> anyhow::Result<Cli> {
    let Some(reference) = cli.pipeline.clone() else {
        return Ok(cli);
    };
    let (p, client) = pipeline_ref::fetch(&reference).await?;
    let given = |id: &str| {
        matches!(
            source_of(m, id),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        )
    };
    // The pipeline's Secrets, unless credentials or TLS files were given.
    let auth_given = [
        "nats_creds_file",
        "nats_user",
        "nats_password",
        "nats_token",
        "nats_nkey_seed_file",
    ]
    .iter()
    .any(|id| given(id));
    let tls_given = [
        "nats_tls_ca_file",
        "nats_tls_cert_file",
        "nats_tls_key_file",
    ]
    .iter()
    .any(|id| given(id));
    let files = pipeline_ref::read_secrets(&client, &p, !auth_given, !tls_given).await?;
    files.apply(&mut cli.nats);
    cli.secret_files = Some(files);
    let on_command_line = |id: &str| source_of(m, id) == Some(ValueSource::CommandLine);
    let set = |field: &mut String, id: &str, want: &str| -> anyhow::Result<()> {
        let flag = format!("--{}", id.replace('_', "-"));
        let what = match id {
            "dlq_stream" => "dead-letter stream",
            "input_subject" => "input subject (its consumer's filter)",
            other => other,
        };
        if on_command_line(id) && field != want {
            anyhow::bail!(
                "{flag} {field} does not match pipeline {}/{}, whose {what} is {want}; drop {flag} or --pipeline",
                p.namespace,
                p.name,
            );
        }
        *field = want.to_string();
        Ok(())
    };
    set(&mut cli.stream, "stream", &p.stream)?;
    if !given("nats_url") {
        cli.nats.nats_url = p.nats_url.clone();
    }
    match &mut cli.command {
        Command::Publish { subject, .. } => {
            if !on_command_line("subject") {
                if p.input_subject.contains(['*', '>']) {
                    anyhow::bail!(
                        "pipeline {}/{} consumes {}, a wildcard: give the subject to publish on with --subject",
                        p.namespace,
                        p.name,
                        p.input_subject
                    );
                }
                *subject = p.input_subject.clone();
            }
        }
        Command::Status {
            consumer,
            input_subject,
            dlq_stream,
        } => {
            set(consumer, "consumer", &p.consumer)?;
            set(input_subject, "input_subject", &p.input_subject)?;
            set(dlq_stream, "dlq_stream", &p.dlq_stream)?;
        }
        Command::Audit {
            consumer,
            dlq_stream,
            legacy_state_bucket,
            ..
        } => {
            set(consumer, "consumer", &p.consumer)?;
            set(dlq_stream, "dlq_stream", &p.dlq_stream)?;
            if legacy_state_bucket.is_none() {
                *legacy_state_bucket = Some(p.state_bucket.clone());
                cli.legacy_if_present = true;
            }
        }
        Command::Dlq { dlq_stream, .. } => {
            set(dlq_stream, "dlq_stream", &p.dlq_stream)?;
        }
    }
    Ok(cli)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let auth = cli.nats.auth()?;
    let _secret_files = cli.secret_files;
    let client = orderpipeline_common::nats::connect(&cli.nats.nats_url, &auth, "orderctl").await?;
    let js = async_nats::jetstream::new(client.clone());
    match cli.command {
        Command::Publish {
            count,
            rate,
            invalid_ratio,
            duplicate_ratio,
            prefix,
            subject,
            window,
            ack_timeout,
            poison,
        } => {
            for (name, v) in [
                ("--invalid-ratio", invalid_ratio),
                ("--duplicate-ratio", duplicate_ratio),
            ] {
                if !(0.0..=1.0).contains(&v) {
                    anyhow::bail!("{name} must be between 0 and 1, got {v}");
                }
            }
            let prefix = prefix.unwrap_or_else(|| format!("ord-{:08x}", rand::random::<u32>()));
            let opts = PublishOptions {
                subject,
                count,
                rate,
                invalid_ratio,
                duplicate_ratio,
                prefix,
                window,
                ack_timeout,
                progress: !cli.json,
                poison,
            };
            let r = ctl::publish_orders(&js, &opts).await?;
            if cli.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "published {} orders in {:.1}s ({:.0}/s): {} valid, {} invalid, {} poison, {} duplicate publishes ({} acked as duplicate), {} retried",
                    r.valid + r.invalid,
                    r.seconds,
                    r.published as f64 / r.seconds.max(0.001),
                    r.valid,
                    r.invalid,
                    r.poison,
                    r.duplicates_sent,
                    r.duplicates_acked,
                    r.retries
                );
                if let Some(t) = r.first_trace_id {
                    println!("trace of the first order: {t}");
                }
            }
        }
        Command::Status {
            consumer,
            input_subject,
            dlq_stream,
        } => {
            let n = Names {
                stream: cli.stream,
                consumer,
                input_subject,
                dlq_stream,
            };
            let r = ctl::status(&js, &n).await?;
            if cli.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!("created      {}", r.created);
                println!("processed    {}", r.processed);
                println!("rejected     {}", r.rejected);
                println!("dead letters {}", r.dead_letters);
                println!(
                    "pending      {} (ack pending {}, redelivered {})",
                    r.consumer_pending, r.consumer_ack_pending, r.consumer_redelivered
                );
            }
        }
        Command::Audit {
            consumer,
            dlq_stream,
            latency_from_seq,
            legacy_state_bucket,
        } => {
            let mut a =
                crate::audit::Audit::collect(&js, &cli.stream, &dlq_stream, &consumer).await?;
            if let Some(bucket) = &legacy_state_bucket {
                let exists = match js.get_key_value(bucket.as_str()).await {
                    Ok(_) => true,
                    Err(e)
                        if cli.legacy_if_present
                            && orderpipeline_common::nats::is_not_found(&e) =>
                    {
                        false
                    }
                    Err(e) => {
                        return Err(e).with_context(|| {
                            format!("cannot open the legacy state bucket {bucket}")
                        });
                    }
                };
                if exists {
                    a.honour_legacy_records(&js, bucket).await?;
                }
            }
            let s = a.summary();
            let violations = a.violations();
            let lat = a.latencies_ms(latency_from_seq);
            let (p50, p99) = (
                crate::audit::quantile(&lat, 0.5),
                crate::audit::quantile(&lat, 0.99),
            );
            if cli.json {
                println!(
                    "{}",
                    serde_json::json!({"summary": s, "violations": violations,
                        "latency_ms": {"inputs": lat.len(), "p50": p50, "p99": p99}})
                );
            } else {
                println!("published              {}", s.published);
                println!("processed              {}", s.processed);
                println!("rejected               {}", s.rejected);
                println!(
                    "dead-lettered          {} ({} valid orders whose attempts ran out)",
                    s.dead_lettered, s.attempts_exhausted
                );
                println!("duplicates suppressed  {}", s.duplicates_suppressed);
                println!("still pending          {}", s.pending);
                println!("lost                   {}", s.lost);
                println!("processed twice        {}", s.processed_twice);
                println!("two outcomes           {}", s.two_outcomes);
                if let (Some(p50), Some(p99)) = (p50, p99) {
                    println!(
                        "publish -> outcome     p50 {p50:.1} ms, p99 {p99:.1} ms ({} inputs, stream timestamps)",
                        lat.len()
                    );
                }
                for v in &violations {
                    println!("VIOLATION: {v}");
                }
            }
            if !violations.is_empty() {
                anyhow::bail!("{} violation(s) of exactly-once", violations.len());
            }
        }
        Command::Dlq {
            dlq_stream,
            command,
        } => match command {
            DlqCommand::List { limit } => {
                let letters = ctl::dlq_list(&js, &dlq_stream, limit).await?;
                if cli.json {
                    let v: Vec<_> = letters
                        .iter()
                        .map(|l| {
                            serde_json::json!({
                                "sequence": l.dlq_sequence,
                                "order_id": l.letter.order_id,
                                "class": class_name(l.letter.error_class()),
                                "error": l.letter.error_message,
                                "original_stream_sequence": l.letter.original_stream_sequence,
                                "delivery_count": l.letter.delivery_count,
                            })
                        })
                        .collect();
                    println!("{}", serde_json::to_string(&v)?);
                } else {
                    println!(
                        "{:>6}  {:<20} {:<18} {:>8}  error",
                        "seq", "order", "class", "orig seq"
                    );
                    for l in &letters {
                        println!(
                            "{:>6}  {:<20} {:<18} {:>8}  {}",
                            l.dlq_sequence,
                            if l.letter.order_id.is_empty() {
                                "-"
                            } else {
                                &l.letter.order_id
                            },
                            class_name(l.letter.error_class()),
                            l.letter.original_stream_sequence,
                            l.letter.error_message
                        );
                    }
                    println!("{} dead letter(s)", letters.len());
                }
            }
            DlqCommand::Show { sequence } => {
                let letters = ctl::dlq_list(&js, &dlq_stream, usize::MAX).await?;
                let l = letters
                    .iter()
                    .find(|l| l.dlq_sequence == sequence)
                    .ok_or_else(|| anyhow::anyhow!("no dead letter with sequence {sequence} in {dlq_stream}; see `orderctl dlq list`"))?;
                let d = &l.letter;
                println!("sequence:        {}", l.dlq_sequence);
                if let Some(m) = l.marker {
                    println!(
                        "marker:          {} seq {m} (the order's outcome record)",
                        d.original_stream
                    );
                }
                println!("order id:        {}", d.order_id);
                println!("class:           {}", class_name(d.error_class()));
                println!("error:           {}", d.error_message);
                println!(
                    "original:        {} seq {} on {}",
                    d.original_stream, d.original_stream_sequence, d.original_subject
                );
                println!("deliveries:      {}", d.delivery_count);
                println!("worker:          {}", d.worker);
                if d.payload_truncated {
                    println!(
                        "payload:         first {} of {} bytes (truncated to fit the dead-letter stream)",
                        d.payload.len(),
                        d.payload_size
                    );
                } else {
                    println!("payload:         {} bytes", d.payload.len());
                }
                for h in &d.headers {
                    println!("header:          {}: {}", h.name, h.value);
                }
            }
            DlqCommand::Replay { sequence, all } => {
                let seqs: Vec<u64> = match (sequence, all) {
                    (Some(s), false) => vec![s],
                    (None, true) => ctl::dlq_list(&js, &dlq_stream, usize::MAX)
                        .await?
                        .iter()
                        .map(|l| l.dlq_sequence)
                        .collect(),
                    _ => anyhow::bail!("give one dead-letter sequence or --all"),
                };
                for s in seqs {
                    let how = ctl::dlq_replay(&js, &dlq_stream, s).await?;
                    println!(
                        "replayed dead letter {s} (replay of {how}); the worker removes the letter once the replay has its outcome"
                    );
                }
            }
        },
    }
    client.flush().await.ok();
    Ok(())
}
