//! `orderctl --pipeline [NAMESPACE/]NAME`: the NATS names of one pipeline, read
//! from its `OrderPipeline` resource, so that nobody has to know or export them.

use anyhow::Context as _;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use orderpipeline_common::names;
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
        })
    }
}

/// Reads the pipeline from the cluster `KUBECONFIG` (or the in-cluster config) points at.
pub async fn fetch(reference: &str) -> anyhow::Result<PipelineNames> {
    // kube's error repeats its sources in its own text: only that text, once.
    let client = kube::Client::try_default().await.map_err(|e| {
        anyhow::anyhow!(
            "--pipeline {reference}: cannot reach Kubernetes to read the OrderPipeline ({e}); set KUBECONFIG, or give --stream/--consumer/--input-subject/--dlq-stream instead"
        )
    })?;
    let (ns, name) = parse_reference(reference, client.default_namespace())?;
    let gvk = GroupVersionKind::gvk("orderpipeline.dev", "v1alpha1", "OrderPipeline");
    let ar = ApiResource::from_gvk_with_plural(&gvk, "orderpipelines");
    let api: Api<DynamicObject> = Api::namespaced_with(client, &ns, &ar);
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
    PipelineNames::from_spec(&ns, &name, &spec)
}

#[cfg(test)]
mod tests {
    use super::*;

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
