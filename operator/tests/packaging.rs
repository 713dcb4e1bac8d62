//! The checked-in CRD is what the code generates, and the Dockerfile builds what
//! exists in the workspace (there is no Docker engine here to build it).

use kube::CustomResourceExt as _;
use order_operator::crd::OrderPipeline;

fn root() -> std::path::PathBuf {
    // At run time: a shared target dir may hold a binary built from another clone.
    let dir =
        std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").into());
    std::path::PathBuf::from(dir).join("..")
}

#[test]
fn checked_in_crd_matches_the_code() {
    let generated = serde_yaml::to_string(&OrderPipeline::crd()).unwrap();
    let path = root().join("crds/orderpipeline.dev_orderpipelines.yaml");
    let committed = std::fs::read_to_string(&path).unwrap();
    assert!(
        generated == committed,
        "{} is stale: run `cargo run -p order-operator -- crd > {}`",
        path.display(),
        path.display()
    );
}

#[test]
fn every_field_of_the_crd_has_a_description() {
    let crd = serde_json::to_value(OrderPipeline::crd()).unwrap();
    let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    fn walk(path: &str, v: &serde_json::Value, missing: &mut Vec<String>) {
        if let Some(props) = v.get("properties").and_then(|p| p.as_object()) {
            for (k, p) in props {
                let here = format!("{path}.{k}");
                if p.get("description").is_none() {
                    missing.push(here.clone());
                }
                // Kubernetes' own embedded types (resources, affinity, ...) are documented upstream.
                if !["resources", "affinity", "tolerations", "env"].contains(&k.as_str()) {
                    walk(&here, p, missing);
                    if let Some(items) = p.get("items") {
                        walk(&here, items, missing);
                    }
                }
            }
        }
    }
    let mut missing = Vec::new();
    walk("spec", schema, &mut missing);
    assert!(
        missing.is_empty(),
        "fields without a description: {missing:?}"
    );
}

/// Every integer of the spec says its real limit (`maximum`), every string its
/// longest (`maxLength`, unless an enum bounds it), every list its longest
/// (`maxItems`) and every map its largest (`maxProperties`): a tenant cannot
/// store a spec the operator or NATS would choke on, and `kubectl explain`
/// says what fits. Kubernetes' own embedded types (resources, affinity, the
/// items of env, tolerations and topologySpreadConstraints) are bounded
/// upstream.
#[test]
fn every_field_of_the_spec_is_bounded() {
    let crd = serde_json::to_value(OrderPipeline::crd()).unwrap();
    let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    fn walk(path: &str, v: &serde_json::Value, unbounded: &mut Vec<String>) {
        let has = |k: &str| v.get(k).is_some();
        match v.get("type").and_then(|t| t.as_str()) {
            Some("integer") | Some("number") if !has("maximum") => {
                unbounded.push(format!("{path}: no maximum"))
            }
            Some("string") if !has("maxLength") && !has("enum") => {
                unbounded.push(format!("{path}: no maxLength"))
            }
            Some("array") if !has("maxItems") => unbounded.push(format!("{path}: no maxItems")),
            Some("object") if has("additionalProperties") && !has("maxProperties") => {
                unbounded.push(format!("{path}: no maxProperties"))
            }
            _ => {}
        }
        let embedded = ["resources", "affinity"];
        if let Some(props) = v.get("properties").and_then(|p| p.as_object()) {
            for (k, p) in props {
                if !embedded.contains(&k.as_str()) {
                    walk(&format!("{path}.{k}"), p, unbounded);
                }
            }
        }
        let upstream_items = [".env", ".tolerations", ".topologySpreadConstraints"]
            .iter()
            .any(|s| path.ends_with(s));
        if let (Some(items), false) = (v.get("items"), upstream_items) {
            walk(&format!("{path}[]"), items, unbounded);
        }
        if let Some(values) = v.get("additionalProperties").filter(|a| a.is_object()) {
            walk(&format!("{path}{{}}"), values, unbounded);
        }
    }
    let mut unbounded = Vec::new();
    walk("spec", schema, &mut unbounded);
    assert!(unbounded.is_empty(), "unbounded fields: {unbounded:#?}");
}

#[test]
fn the_dockerfile_builds_what_exists() {
    let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    for line in dockerfile
        .lines()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
    {
        for src in line
            .split_whitespace()
            .skip(1)
            .collect::<Vec<_>>()
            .split_last()
            .map(|(_, s)| s.to_vec())
            .unwrap_or_default()
        {
            assert!(
                root().join(src).exists(),
                "Dockerfile copies {src}, which does not exist"
            );
        }
    }
    let manifest = std::fs::read_to_string(root().join("Cargo.toml")).unwrap();
    for pkg in ["order-operator", "order-worker", "orderpipeline-ctl"] {
        assert!(
            dockerfile.contains(&format!("-p {pkg}")),
            "Dockerfile builds {pkg}"
        );
    }
    for bin in ["order-operator", "order-worker", "orderctl"] {
        assert!(
            dockerfile.contains(&format!("target/release/{bin}")),
            "Dockerfile copies {bin}"
        );
    }
    let ctl = std::fs::read_to_string(root().join("ctl/Cargo.toml")).unwrap();
    assert!(ctl.contains("name = \"orderctl\""));
    // Each workspace member is copied by name, so the build stage has them all.
    let members = manifest
        .split("members = [")
        .nth(1)
        .and_then(|s| s.split(']').next())
        .unwrap_or_default();
    for member in members.split(',').map(|m| m.trim().trim_matches('"')) {
        assert!(
            dockerfile.contains(&format!("COPY {member} {member}")),
            "Dockerfile copies the workspace member {member}"
        );
    }
    let operator_manifest =
        std::fs::read_to_string(root().join("manifests/operator.yaml")).unwrap();
    assert!(
        operator_manifest.contains("/usr/local/bin/order-operator"),
        "manifests run the binary the image has"
    );
    assert!(dockerfile.contains("/usr/local/bin/"));
    assert!(dockerfile.contains("USER 65532"), "non-root image");
}
