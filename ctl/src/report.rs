//! `kubectl orderpipeline report NAME`: one archive to attach to a bug report.
//! It holds the pipeline (in every API version the CRD serves), its status and
//! Events, the workers' Deployment, Pods and recent logs, the operator's
//! Deployment (its flags), Pods and recent logs, the stream, consumer and DLQ
//! as NATS reports them, and a summary naming what could not be collected and
//! why. It never holds a Secret: Secrets are not collected, the values of the
//! pipeline's Secrets and of environment variables whose names look secret are
//! replaced by `<redacted>` wherever they appear, and so are passwords in URLs.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Event, Pod, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, LogParams};
use serde_json::Value;

use crate::pipeline_ref::PipelineNames;
use orderpipeline_common::names;

/// Where to write and what to read.
#[derive(Clone, Debug)]
pub struct Options {
    pub namespace: Option<String>,
    pub name: String,
    /// The archive (default: `orderpipeline-report-NAMESPACE-NAME-TIME.tar.gz`).
    pub output: Option<PathBuf>,
    /// Instead of the resource's `spec.nats.url` (e.g. through a port-forward).
    pub nats_url: Option<String>,
    /// Where the operator runs.
    pub operator_namespace: String,
    /// Log lines per container.
    pub tail: i64,
}

pub const REDACTED: &str = "<redacted>";

/// The files of the archive, and what could not be collected.
#[derive(Default)]
struct Bundle {
    files: Vec<(String, String)>,
    notes: Vec<String>,
    /// Values never to appear (the pipeline's Secrets' data).
    secrets: Vec<String>,
}

impl Bundle {
    fn add(&mut self, path: impl Into<String>, text: impl Into<String>) {
        self.files.push((path.into(), text.into()));
    }

    fn yaml(&mut self, path: &str, v: &impl serde::Serialize) {
        match serde_yaml::to_string(v) {
            Ok(t) => self.add(path, t),
            Err(e) => self.note(format!("{path}: cannot render ({e})")),
        }
    }

    fn note(&mut self, n: impl Into<String>) {
        self.notes.push(n.into());
    }

    /// The text with every secret value, secret-named env value and URL
    /// password replaced.
    fn redact(&self, text: &str) -> String {
        let mut out = redact_urls(text);
        let mut secrets: Vec<&String> = self.secrets.iter().filter(|s| s.len() >= 4).collect();
        // Longer first, so a value containing another is replaced whole.
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        for s in secrets {
            out = out.replace(s.as_str(), REDACTED);
        }
        out
    }
}

/// `scheme://user:password@host` -> `scheme://user:<redacted>@host`.
pub fn redact_urls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        let end = tail
            .find(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '/' | ','))
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        match authority.rsplit_once('@') {
            Some((userinfo, host)) => {
                let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
                out.push_str(&format!("{user}:{REDACTED}@{host}"));
            }
            None => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// Whether an environment variable's name says its value is a secret.
pub fn secret_name(name: &str) -> bool {
    let n = name.to_ascii_uppercase();
    [
        "PASSWORD",
        "TOKEN",
        "SECRET",
        "CREDENTIAL",
        "PRIVATE",
        "SEED",
        "API_KEY",
    ]
    .iter()
    .any(|w| n.contains(w))
        || n.ends_with("_KEY")
}

/// Replaces the values of secret-named variables in every `env` list of `v`.
pub fn redact_env(v: &mut Value) {
    match v {
        Value::Object(m) => {
            if let Some(Value::Array(env)) = m.get_mut("env") {
                for e in env.iter_mut() {
                    let named = e
                        .get("name")
                        .and_then(Value::as_str)
                        .is_some_and(secret_name);
                    if let (true, Some(val)) = (named, e.get_mut("value")) {
                        *val = Value::from(REDACTED);
                    }
                }
            }
            m.values_mut().for_each(redact_env);
        }
        Value::Array(a) => a.iter_mut().for_each(redact_env),
        _ => {}
    }
}

/// An object as it goes into the archive: no managed fields, secret-named env
/// values redacted.
fn tidy(obj: &impl serde::Serialize) -> Value {
    let mut v = serde_json::to_value(obj).unwrap_or(Value::Null);
    if let Some(m) = v.pointer_mut("/metadata").and_then(Value::as_object_mut) {
        m.remove("managedFields");
    }
    redact_env(&mut v);
    v
}

/// Collects the report and writes the archive; returns its path.
pub async fn report(o: &Options) -> anyhow::Result<PathBuf> {
    let client = kube::Client::try_default().await.map_err(|e| {
        anyhow::anyhow!("cannot reach Kubernetes ({e}); set KUBECONFIG or the kubectl context")
    })?;
    let ns = o
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_string());
    let mut b = Bundle::default();
    let spec = pipeline(&client, &ns, &o.name, &mut b).await?;
    let names = PipelineNames::from_spec(&ns, &o.name, &spec)?;
    secret_values(&client, &names, &mut b).await;
    events(&client, &ns, &o.name, &mut b).await;
    workers(&client, &ns, &o.name, o.tail, &mut b).await;
    operator(&client, &o.operator_namespace, o.tail, &mut b).await;
    nats(&client, &names, o.nats_url.as_deref(), &mut b).await;
    let stamp = k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y%m%dT%H%M%SZ")
        .to_string();
    let top = format!("orderpipeline-report-{ns}-{}-{stamp}", o.name);
    b.add("summary.txt", summary(o, &ns, &b));
    let path = o
        .output
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("{top}.tar.gz")));
    write_archive(&path, &top, &b)?;
    Ok(path)
}

/// The pipeline in every served API version; its spec (from the first).
async fn pipeline(
    client: &kube::Client,
    ns: &str,
    name: &str,
    b: &mut Bundle,
) -> anyhow::Result<Value> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let versions = match crds.get("orderpipelines.orderpipeline.dev").await {
        Ok(crd) => {
            b.yaml(
                "crd-versions.yaml",
                &crd.status.as_ref().map(|s| &s.stored_versions),
            );
            let served = crd.spec.versions.iter().filter(|v| v.served);
            served.map(|v| v.name.clone()).collect()
        }
        Err(e) => {
            b.note(format!(
                "cannot read the CRD ({e}): the pipeline in v1alpha1 only"
            ));
            vec!["v1alpha1".to_string()]
        }
    };
    let mut spec = None;
    for v in versions {
        let gvk = GroupVersionKind::gvk("orderpipeline.dev", &v, "OrderPipeline");
        let ar = ApiResource::from_gvk_with_plural(&gvk, "orderpipelines");
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &ar);
        match api.get_opt(name).await {
            Ok(Some(obj)) => {
                spec.get_or_insert_with(|| obj.data.get("spec").cloned().unwrap_or_default());
                b.yaml(&format!("pipeline.{v}.yaml"), &tidy(&obj));
            }
            Ok(None) => anyhow::bail!(
                "there is no OrderPipeline {name} in namespace {ns} (`kubectl get orderpipelines -A` lists them)"
            ),
            Err(e) => b.note(format!("cannot read the pipeline as {v}: {e}")),
        }
    }
    spec.with_context(|| format!("cannot read OrderPipeline {ns}/{name} in any served version"))
}

/// The values the archive must never hold: the pipeline's Secrets' data
/// (read only to redact them; nothing of them is written).
async fn secret_values(client: &kube::Client, p: &PipelineNames, b: &mut Bundle) {
    let api: Api<Secret> = Api::namespaced(client.clone(), &p.namespace);
    let minted = [
        names::minted_worker_secret(&p.name),
        names::minted_producer_secret(&p.name),
    ];
    let refs = [p.credentials_secret.clone(), p.tls_secret.clone()];
    for name in refs.into_iter().flatten().chain(minted) {
        match api.get_opt(&name).await {
            Ok(Some(s)) => {
                for (key, v) in s.data.iter().flatten() {
                    b.secrets.extend(secret_parts(key, &String::from_utf8_lossy(&v.0)));
                }
                b.note(format!("Secret {name}: referenced; its data is not collected"));
            }
            Ok(None) => {}
            Err(e) => b.note(format!("Secret {name}: cannot read it to redact its values ({e}); check the archive before sharing it")),
        }
    }
}

/// What of a Secret's entry `key` must not appear: nothing of the public
/// ones (a user name, certificates, an account's public key), else the whole
/// value and each of its lines that is one token (a JWT, a seed, a PEM line).
pub fn secret_parts(key: &str, value: &str) -> Vec<String> {
    const PUBLIC: [&str; 6] = ["user", "ca.crt", "tls.crt", "account", "urls", "namespaces"];
    if PUBLIC.contains(&key) {
        return Vec::new();
    }
    let token = |l: &&str| l.len() >= 8 && !l.contains(char::is_whitespace);
    let lines = value
        .lines()
        .map(str::trim)
        .filter(token)
        .map(str::to_string);
    std::iter::once(value.trim().to_string())
        .chain(lines)
        .collect()
}

/// The namespace's Events about the pipeline, its Deployment and its Pods.
async fn events(client: &kube::Client, ns: &str, name: &str, b: &mut Bundle) {
    let api: Api<Event> = Api::namespaced(client.clone(), ns);
    let workers = format!("{name}-workers");
    match api.list(&ListParams::default()).await {
        Ok(list) => {
            let mut about: Vec<&Event> = list
                .items
                .iter()
                .filter(|e| {
                    let n = e.involved_object.name.as_deref().unwrap_or_default();
                    n == name || n.starts_with(&workers)
                })
                .collect();
            about.sort_by_key(|e| event_time(e));
            let lines: Vec<String> = about.iter().map(|e| event_line(e)).collect();
            b.add("events.txt", lines.join("\n") + "\n");
        }
        Err(e) => b.note(format!("cannot list Events in {ns}: {e}")),
    }
}

/// When an Event last happened: its lastTimestamp (core Events), else its
/// eventTime (events.k8s.io), else its creation.
fn event_time(e: &Event) -> Option<k8s_openapi::jiff::Timestamp> {
    let created = e.metadata.creation_timestamp.as_ref().map(|t| t.0);
    let last = e.last_timestamp.as_ref().map(|t| t.0);
    last.or_else(|| e.event_time.as_ref().map(|t| t.0))
        .or(created)
}

fn event_line(e: &Event) -> String {
    let when = event_time(e).map(|t| t.to_string()).unwrap_or_default();
    format!(
        "{when} {} {} {}/{} x{}: {}",
        e.type_.as_deref().unwrap_or("-"),
        e.reason.as_deref().unwrap_or("-"),
        e.involved_object.kind.as_deref().unwrap_or("-"),
        e.involved_object.name.as_deref().unwrap_or("-"),
        e.count.unwrap_or(1),
        e.message.as_deref().unwrap_or_default()
    )
}

/// The workers' Deployment, Pods and recent logs.
async fn workers(client: &kube::Client, ns: &str, name: &str, tail: i64, b: &mut Bundle) {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    match deployments.get_opt(&format!("{name}-workers")).await {
        Ok(Some(d)) => b.yaml("workers/deployment.yaml", &tidy(&d)),
        Ok(None) => b.note(format!("no Deployment {name}-workers in {ns}")),
        Err(e) => b.note(format!("cannot read Deployment {name}-workers: {e}")),
    }
    let selector = format!("orderpipeline.dev/pipeline={name}");
    pods(client, ns, &selector, "workers", tail, b).await;
}

/// The operator's Deployment (its flags are its env), Pods and recent logs.
async fn operator(client: &kube::Client, ns: &str, tail: i64, b: &mut Bundle) {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let lp = ListParams::default().labels("app.kubernetes.io/name=order-operator");
    match deployments.list(&lp).await {
        Ok(l) if l.items.is_empty() => b.note(format!(
            "no operator Deployment in {ns} (label app.kubernetes.io/name=order-operator); give --operator-namespace"
        )),
        Ok(l) => b.yaml("operator/deployments.yaml", &tidy(&l.items)),
        Err(e) => b.note(format!("cannot list the operator's Deployments in {ns}: {e}")),
    }
    pods(
        client,
        ns,
        "app.kubernetes.io/name=order-operator",
        "operator",
        tail,
        b,
    )
    .await;
}

/// The Pods of `selector`, and the last `tail` lines of each one's containers.
async fn pods(
    client: &kube::Client,
    ns: &str,
    selector: &str,
    dir: &str,
    tail: i64,
    b: &mut Bundle,
) {
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    let list = match api.list(&ListParams::default().labels(selector)).await {
        Ok(l) => l.items,
        Err(e) => return b.note(format!("cannot list Pods {selector} in {ns}: {e}")),
    };
    b.yaml(&format!("{dir}/pods.yaml"), &tidy(&list));
    for pod in &list {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let containers = pod.spec.iter().flat_map(|s| s.containers.iter());
        for c in containers {
            let lp = LogParams {
                container: Some(c.name.clone()),
                tail_lines: Some(tail),
                ..LogParams::default()
            };
            let log = tokio::time::timeout(Duration::from_secs(10), api.logs(&name, &lp)).await;
            match log {
                Ok(Ok(text)) => b.add(format!("{dir}/logs/{name}.{}.log", c.name), text),
                Ok(Err(e)) => b.note(format!("no logs of {ns}/{name} ({}): {e}", c.name)),
                Err(_) => b.note(format!("no logs of {ns}/{name} ({}): timed out", c.name)),
            }
        }
    }
}

/// The stream, the consumer and the DLQ as NATS reports them.
async fn nats(client: &kube::Client, p: &PipelineNames, url: Option<&str>, b: &mut Bundle) {
    let mut args = orderpipeline_common::flags::NatsArgs::with_url(url.unwrap_or(&p.nats_url));
    match crate::pipeline_ref::read_secrets(client, p, true, true).await {
        Ok(files) => {
            files.apply(&mut args);
            let info = tokio::time::timeout(Duration::from_secs(15), nats_info(&args, p)).await;
            match info {
                Ok(Ok(files)) => files.into_iter().for_each(|(f, t)| b.add(f, t)),
                Ok(Err(e)) => b.note(format!("NATS at {}: {e:#}", args.nats_url)),
                Err(_) => b.note(format!(
                    "NATS at {}: no answer in 15 s (an in-cluster URL? give --nats-url through kubectl port-forward)",
                    args.nats_url
                )),
            }
        }
        Err(e) => b.note(format!("NATS: cannot read the pipeline's Secrets ({e:#})")),
    }
}

/// The JetStream API's own answers (`$JS.API.STREAM.INFO`, `CONSUMER.INFO`),
/// pretty-printed: exactly what the server reports.
async fn nats_info(
    args: &orderpipeline_common::flags::NatsArgs,
    p: &PipelineNames,
) -> anyhow::Result<Vec<(String, String)>> {
    let auth = args.auth()?;
    let c =
        orderpipeline_common::nats::connect(&args.nats_url, &auth, "orderpipeline-report").await?;
    let asks = [
        (
            "nats/stream.json",
            format!("$JS.API.STREAM.INFO.{}", p.stream),
        ),
        (
            "nats/consumer.json",
            format!("$JS.API.CONSUMER.INFO.{}.{}", p.stream, p.consumer),
        ),
        (
            "nats/dlq-stream.json",
            format!("$JS.API.STREAM.INFO.{}", p.dlq_stream),
        ),
    ];
    let mut out = Vec::new();
    for (file, subject) in asks {
        let text = match c.request(subject.clone(), "".into()).await {
            Ok(m) => match serde_json::from_slice::<Value>(&m.payload) {
                Ok(v) => serde_json::to_string_pretty(&v)?,
                Err(_) => String::from_utf8_lossy(&m.payload).to_string(),
            },
            Err(e) => format!("{{\"error\": {:?}}}", format!("{subject}: {e}")),
        };
        out.push((file.to_string(), text));
    }
    Ok(out)
}

fn summary(o: &Options, ns: &str, b: &Bundle) -> String {
    let mut s = format!(
        "kubectl orderpipeline report {} -n {ns}\ncollected: {}\nplugin: {}\noperator namespace: {}\n\nfiles:\n",
        o.name,
        k8s_openapi::jiff::Timestamp::now(),
        orderpipeline_common::version::VERSION,
        o.operator_namespace
    );
    for (f, _) in &b.files {
        s.push_str(&format!("  {f}\n"));
    }
    s.push_str("\nnotes (what could not be collected, and why):\n");
    for n in &b.notes {
        s.push_str(&format!("  - {n}\n"));
    }
    if b.notes.is_empty() {
        s.push_str("  (none)\n");
    }
    s.push_str("\nSecrets are never collected; their values, secret-named environment values and URL passwords are replaced by <redacted>.\n");
    s
}

/// A gzipped tar of the bundle's files under `top/`, every file redacted.
fn write_archive(path: &Path, top: &str, b: &Bundle) -> anyhow::Result<()> {
    let file =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let gz = flate2::write::GzEncoder::new(file, flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    for (name, text) in &b.files {
        let data = b.redact(text);
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(k8s_openapi::jiff::Timestamp::now().as_second().max(0) as u64);
        h.set_cksum();
        tar.append_data(&mut h, format!("{top}/{name}"), data.as_bytes())?;
    }
    tar.into_inner()?.finish()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_in_urls_and_secret_named_env_values_are_redacted() {
        assert_eq!(
            redact_urls("url: nats://app:hunter22@nats:4222, tls://x:4222 http://h/p"),
            "url: nats://app:<redacted>@nats:4222, tls://x:4222 http://h/p"
        );
        assert_eq!(
            redact_urls("nats://token@nats"),
            "nats://token:<redacted>@nats"
        );
        for name in [
            "NATS_PASSWORD",
            "NATS_TOKEN",
            "API_KEY",
            "STRIPE_SECRET",
            "signing_key",
        ] {
            assert!(secret_name(name), "{name}");
        }
        for name in ["NATS_URL", "WORKER_POOL_SIZE", "KEY_PREFIX", "POD_NAME"] {
            assert!(!secret_name(name), "{name}");
        }
        let mut v = serde_json::json!({"spec": {"containers": [{"env": [
            {"name": "PAYMENT_API_TOKEN", "value": "tok-1"},
            {"name": "NATS_URL", "value": "nats://n:4222"},
            {"name": "NATS_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "s", "key": "password"}}}
        ]}]}});
        redact_env(&mut v);
        let env = &v["spec"]["containers"][0]["env"];
        assert_eq!(env[0]["value"], REDACTED);
        assert_eq!(env[1]["value"], "nats://n:4222");
        assert_eq!(env[2]["valueFrom"]["secretKeyRef"]["name"], "s");
    }

    #[test]
    fn a_secrets_private_parts_are_the_ones_kept_out() {
        assert!(
            secret_parts("user", "plugin").is_empty(),
            "a user name is no secret"
        );
        assert!(secret_parts("ca.crt", "-----BEGIN CERTIFICATE-----").is_empty());
        assert_eq!(
            secret_parts("password", "s3cret-pw"),
            ["s3cret-pw", "s3cret-pw"]
        );
        let creds = "-----BEGIN NATS USER JWT-----\neyJ0eXAiOiJKV1QiLCJhbGciOiJlZDI1NTE5In0.x.y\n------END NATS USER JWT------\n\n************************* IMPORTANT *************************\nNKEY Seed printed below can be used to sign and prove identity.\n\n-----BEGIN USER NKEY SEED-----\nSUAM3ZJ5XMMPDUWTSDRCB5PMYOU7IZSGXMNFT6PHBE4UPGPJQGJS6ACOVI\n------END USER NKEY SEED------\n";
        let parts = secret_parts("creds", creds);
        assert!(
            parts.contains(
                &"SUAM3ZJ5XMMPDUWTSDRCB5PMYOU7IZSGXMNFT6PHBE4UPGPJQGJS6ACOVI".to_string()
            )
        );
        assert!(parts.contains(&"eyJ0eXAiOiJKV1QiLCJhbGciOiJlZDI1NTE5In0.x.y".to_string()));
        assert!(
            !parts
                .iter()
                .any(|p| p.contains("IMPORTANT") && p.len() < 70),
            "{parts:?}"
        );
    }

    #[test]
    fn the_secrets_values_are_replaced_wherever_they_appear() {
        let b = Bundle {
            secrets: vec!["s3cret-pw".into(), "s3c".into(), "s3cret-pw-longer".into()],
            ..Bundle::default()
        };
        assert_eq!(
            b.redact("a s3cret-pw-longer b s3cret-pw c s3c"),
            "a <redacted> b <redacted> c s3c",
            "values shorter than 4 characters are too common to replace"
        );
    }
}
