//! What a command works on: the flags a person set, the pipeline a `--pipeline`
//! names (whose names fill in what was not set), and the NATS session.

use std::collections::HashSet;

use clap::ArgMatches;
use clap::parser::ValueSource;
use orderpipeline_common::flags::NatsArgs;

use crate::pipeline_ref::{self, PipelineNames, SecretFiles};

/// Which flags were set by the person (on the command line or in the
/// environment), by clap id (the field name: `nats_url`, `dlq_stream`, ...).
#[derive(Clone, Debug, Default)]
pub struct Given {
    command_line: HashSet<String>,
    environment: HashSet<String>,
}

impl Given {
    /// From orderctl's parsed arguments, subcommands included.
    pub fn from_matches(m: &ArgMatches) -> Self {
        let mut g = Given::default();
        g.collect(m);
        g
    }

    fn collect(&mut self, m: &ArgMatches) {
        for id in m.ids() {
            let id = id.as_str();
            // Only the arguments of this (sub)command have a source here.
            if !matches!(m.try_get_raw(id), Ok(Some(_))) {
                continue;
            }
            match m.value_source(id) {
                Some(ValueSource::CommandLine) => {
                    self.command_line.insert(id.to_string());
                }
                Some(ValueSource::EnvVariable) => {
                    self.environment.insert(id.to_string());
                }
                _ => {}
            }
        }
        if let Some((_, sub)) = m.subcommand() {
            self.collect(sub);
        }
    }

    /// Marks a flag as given on the command line (the plugin's own flags).
    pub fn with_command_line(mut self, id: &str) -> Self {
        self.command_line.insert(id.to_string());
        self
    }

    /// Forgets flag `id` (a value the caller does not take).
    pub fn without(mut self, id: &str) -> Self {
        self.command_line.remove(id);
        self.environment.remove(id);
        self
    }

    /// Set by the person, on the command line or in the environment.
    pub fn set(&self, id: &str) -> bool {
        self.command_line.contains(id) || self.environment.contains(id)
    }

    pub fn on_command_line(&self, id: &str) -> bool {
        self.command_line.contains(id)
    }
}

/// A command's binding to the pipeline `--pipeline` names.
pub struct Binding<'a> {
    pub pipeline: &'a PipelineNames,
    pub given: &'a Given,
}

impl Binding<'_> {
    /// Sets `field` (flag id `id`) to the pipeline's `want`; a different value
    /// given on the command line is an error naming both.
    pub fn name(&self, field: &mut String, id: &str, want: &str) -> anyhow::Result<()> {
        let flag = format!("--{}", id.replace('_', "-"));
        let what = match id {
            "dlq_stream" => "dead-letter stream",
            "input_subject" => "input subject (its consumer's filter)",
            other => other,
        };
        if self.given.on_command_line(id) && field != want {
            anyhow::bail!(
                "{flag} {field} does not match pipeline {}/{}, whose {what} is {want}; drop {flag} or --pipeline",
                self.pipeline.namespace,
                self.pipeline.name,
            );
        }
        *field = want.to_string();
        Ok(())
    }
}

/// Reads the pipeline, fills the NATS flags and the stream in from it, and
/// returns it with its Secrets' files (removed when dropped).
pub async fn resolve(
    reference: &str,
    nats: &mut NatsArgs,
    stream: &mut String,
    given: &Given,
) -> anyhow::Result<(PipelineNames, SecretFiles)> {
    let (p, client) = pipeline_ref::fetch(reference).await?;
    // The pipeline's Secrets, unless credentials or TLS files were given.
    let auth_given = [
        "nats_creds_file",
        "nats_user",
        "nats_password",
        "nats_token",
        "nats_nkey_seed_file",
    ]
    .iter()
    .any(|id| given.set(id));
    let tls_given = [
        "nats_tls_ca_file",
        "nats_tls_cert_file",
        "nats_tls_key_file",
    ]
    .iter()
    .any(|id| given.set(id));
    let files = pipeline_ref::read_secrets(&client, &p, !auth_given, !tls_given).await?;
    files.apply(nats);
    Binding {
        pipeline: &p,
        given,
    }
    .name(stream, "stream", &p.stream)?;
    if !given.set("nats_url") {
        nats.nats_url = p.nats_url.clone();
    }
    Ok((p, files))
}

/// The NATS session every command runs in.
pub struct Session {
    pub client: async_nats::Client,
    pub js: async_nats::jetstream::Context,
    /// The input stream.
    pub stream: String,
    /// Print JSON instead of text.
    pub json: bool,
}

impl Session {
    pub async fn connect(nats: &NatsArgs, stream: String, json: bool) -> anyhow::Result<Self> {
        let auth = nats.auth()?;
        let client = orderpipeline_common::nats::connect(&nats.nats_url, &auth, "orderctl").await?;
        let js = async_nats::jetstream::new(client.clone());
        Ok(Self {
            client,
            js,
            stream,
            json,
        })
    }

    /// Prints `value` as one line of JSON.
    pub fn print_json(&self, value: &impl serde::Serialize) -> anyhow::Result<()> {
        println!("{}", serde_json::to_string(value)?);
        Ok(())
    }
}
