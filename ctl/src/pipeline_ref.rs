//! `orderctl --pipeline [NAMESPACE/]NAME`: the NATS names of one pipeline, read
//! from its `OrderPipeline` resource, so that nobody has to know or export them.

use anyhow::Context as _;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use orderpipeline_common::names;
use orderpipeline_common::names::REMOVED_ACKNOWLEDGED_ANNOTATION as ACKNOWLEDGED_ANNOTATION;
use serde_json::Value;

/// Everything `orderctl` needs to find a pipeline's objects on NATS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PipelineNames {
    pub namespace: String,
    pub name: String,
    /// `spec.nats.url`: the URL the workers use (often in-cluster only).
    pub nats_url: String,
    pub stream: String,
    pub consumer: String,
    /// The consumer's filter: where orders are published.
    pub input_subject: String,
    pub dlq_stream: String,
    /// The KV bucket of the protocol before v2 (it may no longer exist).
    pub state_bucket: String,
    /// `spec.nats.credentialsSecretRef.name`
    pub credentials_secret: Option<String>,
    /// `spec.nats.tlsSecretRef.name`
    pub tls_secret: Option<String>,
    /// `status.removedUnprocessed`, less what was acknowledged: the orders the
    /// stream's limits removed before they were processed, as the operator
    /// counted them.
    pub removed_unprocessed: Option<RemovedUnprocessed>,
}

/// Orders removed unprocessed, from the OrderPipeline's status.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RemovedUnprocessed {
    /// Not yet acknowledged.
    pub count: i64,
    pub exact: bool,
    pub first: String,
    pub last: String,
}

impl RemovedUnprocessed {
    /// From the resource as the API server returns it; `None` when none are
    /// unacknowledged.
    pub fn of(obj: &Value) -> Option<Self> {
        let r = obj.pointer("/status/removedUnprocessed")?;
        let acked = obj
            .pointer("/metadata/annotations")
            .and_then(|a| a.get(ACKNOWLEDGED_ANNOTATION))
            .and_then(Value::as_str);
        let count = names::unacknowledged(r.get("count")?.as_i64()?, acked);
        (count > 0).then(|| Self {
            count,
            exact: r.get("exact").and_then(Value::as_bool).unwrap_or(false),
            first: text(r, "/first").unwrap_or("?").into(),
            last: text(r, "/last").unwrap_or("?").into(),
        })
    }
}

/// Splits `NAMESPACE/NAME` (or `NAME`, in `default_namespace`).
pub fn parse_reference(
    reference: &str,
    default_namespace: &str,
) -> anyhow::Result<(String, String)> {
    let (ns, name) = match reference.split_once('/') {
        Some((ns, name)) => (ns, name),
        None => (default_namespace, reference),
    };
    if ns.is_empty() || name.is_empty() || name.contains('/') {
        anyhow::bail!(
            "--pipeline {reference:?}: expected NAME or NAMESPACE/NAME (e.g. --pipeline shop/orders)"
        );
    }
    Ok((ns.to_string(), name.to_string()))
}

fn text<'a>(spec: &'a Value, path: &str) -> Option<&'a str> {
    spec.pointer(path)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

impl PipelineNames {
    /// The names from a resource's spec as the API server stores it (schema
    /// defaults applied; the operator's defaults for what the schema leaves unset).
    pub fn from_spec(namespace: &str, name: &str, spec: &Value) -> anyhow::Result<Self> {
        let nats_url = text(spec, "/nats/url")
            .with_context(|| format!("OrderPipeline {namespace}/{name} has no spec.nats.url"))?;
        let stream = text(spec, "/stream/name").unwrap_or(names::DEFAULT_STREAM);
        let filter = text(spec, "/consumer/filterSubject").unwrap_or(names::DEFAULT_INPUT_SUBJECT);
        Ok(Self {
            namespace: namespace.into(),
            name: name.into(),
            nats_url: nats_url.into(),
            stream: stream.into(),
            consumer: text(spec, "/consumer/name")
                .unwrap_or(names::DEFAULT_CONSUMER)
                .into(),
            input_subject: filter.into(),
            dlq_stream: text(spec, "/deadLetter/streamName")
                .map_or_else(|| names::derived_dlq_stream(stream), str::to_string),
            state_bucket: text(spec, "/state/bucket")
                .map_or_else(|| names::derived_state_bucket(stream), str::to_string),
            credentials_secret: text(spec, "/nats/credentialsSecretRef/name").map(str::to_string),
            tls_secret: text(spec, "/nats/tlsSecretRef/name").map(str::to_string),
            removed_unprocessed: None,
        })
    }
}

/// Reads the pipeline from the cluster `KUBECONFIG` (or the in-cluster config)
/// points at; the client comes back for reading its Secrets.
pub async fn fetch(reference: &str) -> anyhow::Result<(PipelineNames, kube::Client)> {
    // kube's error repeats its sources in its own text: only that text, once.
    let client = kube::Client::try_default().await.map_err(|e| {
        anyhow::anyhow!(
            "--pipeline {reference}: cannot reach Kubernetes to read the OrderPipeline ({e}); set KUBECONFIG, or give --stream/--consumer/--input-subject/--dlq-stream instead"
        )
    })?;
    let (ns, name) = parse_reference(reference, client.default_namespace())?;
    let gvk = GroupVersionKind::gvk("orderpipeline.dev", "v1alpha1", "OrderPipeline");
    let ar = ApiResource::from_gvk_with_plural(&gvk, "orderpipelines");
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &ar);
    let obj = api
        .get_opt(&name)
        .await
        .with_context(|| format!("--pipeline {reference}: cannot read OrderPipeline {ns}/{name}"))?
        .with_context(|| {
            format!(
                "--pipeline {reference}: there is no OrderPipeline {name} in namespace {ns} (`kubectl get orderpipelines -A` lists them)"
            )
        })?;
    let spec = obj.data.get("spec").cloned().unwrap_or(Value::Null);
    let mut names = PipelineNames::from_spec(&ns, &name, &spec)?;
    let mut whole = obj.data.clone();
    whole["metadata"] = serde_json::to_value(&obj.metadata)?;
    names.removed_unprocessed = RemovedUnprocessed::of(&whole);
    Ok((names, client))
}

/// The pipeline's NATS credentials and TLS material, read from its Secrets as
/// the workers get them; files (creds, nkey seed, certificates) are written to a
/// private directory that is removed when this is dropped.
#[derive(Debug, Default)]
pub struct SecretFiles {
    dir: Option<std::path::PathBuf>,
    user: Option<String>,
    password: Option<String>,
    token: Option<String>,
    creds: Option<std::path::PathBuf>,
    nkey: Option<std::path::PathBuf>,
    ca: Option<std::path::PathBuf>,
    cert: Option<std::path::PathBuf>,
    key: Option<std::path::PathBuf>,
}

impl Drop for SecretFiles {
    fn drop(&mut self) {
        if let Some(d) = &self.dir {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

impl SecretFiles {
    /// Fills the NATS flags the Secrets provide.
    pub fn apply(&self, a: &mut orderpipeline_common::flags::NatsArgs) {
        let set = |to: &mut Option<String>, v: &Option<String>| {
            if v.is_some() {
                *to = v.clone();
            }
        };
        set(&mut a.nats_user, &self.user);
        set(&mut a.nats_password, &self.password);
        set(&mut a.nats_token, &self.token);
        let setp = |to: &mut Option<std::path::PathBuf>, v: &Option<std::path::PathBuf>| {
            if v.is_some() {
                *to = v.clone();
            }
        };
        setp(&mut a.nats_creds_file, &self.creds);
        setp(&mut a.nats_nkey_seed_file, &self.nkey);
        setp(&mut a.nats_tls_ca_file, &self.ca);
        setp(&mut a.nats_tls_cert_file, &self.cert);
        setp(&mut a.nats_tls_key_file, &self.key);
    }

    fn file(&mut self, name: &str, data: &[u8]) -> anyhow::Result<std::path::PathBuf> {
        use std::io::Write as _;
        use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
        let dir = match &self.dir {
            Some(d) => d.clone(),
            None => {
                let d = std::env::temp_dir().join(format!(
                    "orderctl-{}-{:08x}",
                    std::process::id(),
                    rand::random::<u32>()
                ));
                std::fs::DirBuilder::new().mode(0o700).create(&d)?;
                self.dir = Some(d.clone());
                d
            }
        };
        let path = dir.join(name);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?
            .write_all(data)?;
        Ok(path)
    }
}

/// Reads one Secret of the pipeline, naming the field that refers to it and
/// the fix when the user's RBAC or the cluster says no.
async fn secret(
    client: &kube::Client,
    p: &PipelineNames,
    name: &str,
    field: &str,
    instead: &str,
) -> anyhow::Result<std::collections::BTreeMap<String, Vec<u8>>> {
    let api: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(client.clone(), &p.namespace);
    let ns = &p.namespace;
    match api.get(name).await {
        Ok(s) => Ok(s
            .data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.0))
            .collect()),
        Err(kube::Error::Api(e)) if e.code == 403 => anyhow::bail!(
            "you may not read Secret {ns}/{name} ({field} of pipeline {ns}/{}): ask for `get` on secrets in namespace {ns} (kubectl auth can-i get secret/{name} -n {ns}), or give the credentials yourself with {instead}",
            p.name
        ),
        Err(kube::Error::Api(e)) if e.code == 404 => anyhow::bail!(
            "Secret {ns}/{name} ({field} of pipeline {ns}/{}) does not exist; the pipeline's workers cannot connect either (kubectl describe orderpipeline -n {ns} {})",
            p.name,
            p.name
        ),
        Err(e) => Err(e).with_context(|| format!("cannot read Secret {ns}/{name} ({field})")),
    }
}

/// The pipeline's credentials (when `auth`) and TLS Secret (when `tls`).
pub async fn read_secrets(
    client: &kube::Client,
    p: &PipelineNames,
    auth: bool,
    tls: bool,
) -> anyhow::Result<SecretFiles> {
    let mut f = SecretFiles::default();
    let text = |b: &Vec<u8>| String::from_utf8_lossy(b).trim().to_string();
    if let (true, Some(name)) = (auth, &p.credentials_secret) {
        let d = secret(
            client,
            p,
            name,
            "spec.nats.credentialsSecretRef",
            "NATS_USER/NATS_PASSWORD, NATS_TOKEN, NATS_CREDS_FILE or NATS_NKEY_SEED_FILE (orderctl: the --nats-* flags)",
        )
        .await?;
        f.user = d.get("user").map(text);
        f.password = d.get("password").map(text);
        f.token = d.get("token").map(text);
        if let Some(c) = d.get("creds") {
            f.creds = Some(f.file("creds", c)?);
        }
        if let Some(n) = d.get("nkey") {
            f.nkey = Some(f.file("nkey", n)?);
        }
    }
    if let (true, Some(name)) = (tls, &p.tls_secret) {
        let d = secret(
            client,
            p,
            name,
            "spec.nats.tlsSecretRef",
            "NATS_TLS_CA_FILE (and NATS_TLS_CERT_FILE/NATS_TLS_KEY_FILE; orderctl: the --nats-tls-* flags)",
        )
        .await?;
        for (key, slot) in [("ca.crt", 0), ("tls.crt", 1), ("tls.key", 2)] {
            if let Some(v) = d.get(key) {
                let path = Some(f.file(key, v)?);
                match slot {
                    0 => f.ca = path,
                    1 => f.cert = path,
                    _ => f.key = path,
                }
            }
        }
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removed_unprocessed_is_read_from_the_status_less_what_was_acknowledged() {
        let obj = |ack: Option<&str>| {
            let mut o = serde_json::json!({
                "metadata": {"name": "shop"},
                "status": {"removedUnprocessed": {"count": 5, "exact": true,
                    "first": "2026-12-07T01:00:00Z", "last": "2026-12-07T01:00:05Z"}},
            });
            if let Some(a) = ack {
                o["metadata"]["annotations"] = serde_json::json!({ACKNOWLEDGED_ANNOTATION: a});
            }
            o
        };
        let r = RemovedUnprocessed::of(&obj(None)).unwrap();
        assert_eq!(
            (r.count, r.exact, r.first.as_str()),
            (5, true, "2026-12-07T01:00:00Z")
        );
        assert_eq!(RemovedUnprocessed::of(&obj(Some("3"))).unwrap().count, 2);
        assert_eq!(RemovedUnprocessed::of(&obj(Some("5"))), None);
        assert_eq!(RemovedUnprocessed::of(&obj(Some("junk"))).unwrap().count, 5);
        assert_eq!(
            RemovedUnprocessed::of(&serde_json::json!({"status": {}})),
            None
        );
    }

    #[test]
    fn references_name_a_namespace_or_take_the_default() {
        assert_eq!(
            parse_reference("shop/orders", "default").unwrap(),
            ("shop".into(), "orders".into())
        );
        assert_eq!(
            parse_reference("orders", "demo").unwrap(),
            ("demo".into(), "orders".into())
        );
        for bad in ["", "/x", "x/", "a/b/c"] {
            let e = parse_reference(bad, "demo").unwrap_err().to_string();
            assert!(e.contains("NAMESPACE/NAME"), "{bad}: {e}");
        }
    }

    #[test]
    fn unset_names_are_derived_as_the_operator_derives_them() {
        let spec = serde_json::json!({
            "nats": {"url": "nats://nats.nats:4222"},
            "stream": {"name": "SHOP", "subjects": ["SHOP.*"]},
            "consumer": {"name": "shop-workers", "filterSubject": "SHOP.created"},
            "deadLetter": {},
            "state": {}
        });
        let n = PipelineNames::from_spec("t", "shop", &spec).unwrap();
        assert_eq!(n.stream, "SHOP");
        assert_eq!(n.consumer, "shop-workers");
        assert_eq!(n.input_subject, "SHOP.created");
        assert_eq!(n.dlq_stream, "SHOP_DLQ");
        assert_eq!(n.state_bucket, "SHOP_STATE");
        assert_eq!(n.nats_url, "nats://nats.nats:4222");
        let named = serde_json::json!({
            "nats": {"url": "nats://x:4222"},
            "stream": {"name": "SHOP"},
            "deadLetter": {"streamName": "LETTERS"},
            "state": {"bucket": "OLD"}
        });
        let n = PipelineNames::from_spec("t", "shop", &named).unwrap();
        assert_eq!(
            (n.dlq_stream.as_str(), n.state_bucket.as_str()),
            ("LETTERS", "OLD")
        );
        let e = PipelineNames::from_spec("t", "shop", &serde_json::json!({}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("spec.nats.url"), "{e}");
    }
}
