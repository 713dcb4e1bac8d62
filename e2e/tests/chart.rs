//! The Helm chart (`charts/order-operator`) and its alerts, with the real tools:
//! `helm lint`, `helm template` (defaults, every option on, values the schema
//! refuses), the same operator objects as `manifests/` (kustomize), the CRD the
//! same file as `crds/`, and `promtool test rules` on the rendered alerts.
//! `helm install` on a real node is in `real_node.rs`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context as _;
use orderpipeline_e2e::operator::repo_root;
use serde_yaml::Value;

fn chart() -> PathBuf {
    repo_root().join("charts/order-operator")
}

/// Runs a tool from the environment's PATH; its output, or stderr in the error.
fn run(tool: &str, args: &[&str]) -> anyhow::Result<std::process::Output> {
    std::process::Command::new(tool)
        .args(args)
        .output()
        .with_context(|| {
            format!("running {tool} (hack/build-tools builds it; hack/env env puts it on PATH)")
        })
}

fn ok(tool: &str, args: &[&str]) -> anyhow::Result<String> {
    orderpipeline_e2e::run_tool(tool, args)
}

fn template(extra: &[&str]) -> anyhow::Result<String> {
    let c = chart();
    let mut args = vec![
        "template",
        "order-operator",
        c.to_str().unwrap_or_default(),
        "--namespace",
        "orderpipeline-system",
        "--include-crds",
    ];
    args.extend_from_slice(extra);
    ok("helm", &args)
}

/// The documents of a multi-document YAML stream, keyed `Kind/name`.
fn objects(text: &str) -> anyhow::Result<BTreeMap<String, Value>> {
    let mut out = BTreeMap::new();
    for doc in serde_yaml::Deserializer::from_str(text) {
        let v = Value::deserialize(doc)?;
        if v.is_null() {
            continue;
        }
        let kind = v["kind"].as_str().unwrap_or_default().to_string();
        let name = v["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        out.insert(format!("{kind}/{name}"), v);
    }
    Ok(out)
}

use k8s_openapi::serde::Deserialize as _;

/// An object without what only says who rendered it: top-level labels and
/// annotations (the chart adds helm.sh/chart, the release, ...).
fn essence(mut v: Value) -> Value {
    // kubectl's kustomize does not know the admission policies are
    // cluster-scoped and gives them the namespace (the API server drops it).
    let cluster_scoped = v["kind"]
        .as_str()
        .is_some_and(|k| k.starts_with("ValidatingAdmissionPolicy"));
    if let Some(m) = v.get_mut("metadata").and_then(Value::as_mapping_mut) {
        m.remove("labels");
        m.remove("annotations");
        if cluster_scoped {
            m.remove("namespace");
        }
    }
    v
}

/// Where two YAML values differ, as `path: left != right` lines (at most 10).
fn differences(path: &str, a: &Value, b: &Value, out: &mut Vec<String>) {
    if out.len() >= 10 || a == b {
        return;
    }
    match (a, b) {
        (Value::Mapping(x), Value::Mapping(y)) => {
            let keys: std::collections::BTreeSet<String> = x
                .keys()
                .chain(y.keys())
                .filter_map(|k| k.as_str().map(str::to_string))
                .collect();
            for k in keys {
                let (l, r) = (
                    x.get(&k).unwrap_or(&Value::Null),
                    y.get(&k).unwrap_or(&Value::Null),
                );
                differences(&format!("{path}/{k}"), l, r, out);
            }
        }
        (Value::Sequence(x), Value::Sequence(y)) if x.len() == y.len() => {
            for (i, (l, r)) in x.iter().zip(y).enumerate() {
                differences(&format!("{path}/{i}"), l, r, out);
            }
        }
        _ => {
            let show = |v: &Value| {
                serde_yaml::to_string(v)
                    .unwrap_or_default()
                    .chars()
                    .take(200)
                    .collect::<String>()
            };
            out.push(format!("{path}: {} != {}", show(a).trim(), show(b).trim()));
        }
    }
}

#[test]
fn helm_lint_passes_with_defaults_and_with_every_option_on() -> anyhow::Result<()> {
    let c = chart();
    let c = c.to_string_lossy();
    ok("helm", &["lint", "--strict", &c])?;
    ok(
        "helm",
        &[
            "lint",
            "--strict",
            &c,
            "--set",
            "metrics.serviceMonitor.enabled=true,metrics.podMonitor.enabled=true,prometheusRule.enabled=true,dashboard.enabled=true,watchNamespace=shop",
        ],
    )?;
    Ok(())
}

#[test]
fn the_chart_renders_the_same_operator_objects_as_manifests() -> anyhow::Result<()> {
    let helm = objects(&template(&[])?)?;
    let kustomize = objects(&ok(
        "kubectl",
        &[
            "kustomize",
            &repo_root().join("manifests").to_string_lossy(),
        ],
    )?)?;
    // The chart does not create its namespace (helm install --create-namespace).
    let mut want: Vec<&String> = kustomize
        .keys()
        .filter(|k| !k.starts_with("Namespace/"))
        .collect();
    want.sort();
    let mut got: Vec<&String> = helm.keys().collect();
    got.sort();
    assert_eq!(
        got, want,
        "the chart and manifests/ render different objects"
    );
    for (key, k) in &kustomize {
        // The CRD: the same file (checked below); kustomize re-prints 1.0 as 1.
        if key.starts_with("Namespace/") || key.starts_with("CustomResourceDefinition/") {
            continue;
        }
        let mut diffs = Vec::new();
        differences(
            "",
            &essence(helm[key].clone()),
            &essence(k.clone()),
            &mut diffs,
        );
        assert!(
            diffs.is_empty(),
            "{key} differs between the chart (left) and manifests/ (right):\n{}",
            diffs.join("\n")
        );
    }
    // The chart's labels are on every object it renders.
    for (key, h) in &helm {
        if key.starts_with("CustomResourceDefinition/") {
            continue;
        }
        assert_eq!(
            h["metadata"]["labels"]["app.kubernetes.io/managed-by"].as_str(),
            Some("Helm"),
            "{key}"
        );
    }
    // The operator admits traffic only on its HTTP port (metrics and probes).
    let np = &helm
        .get("NetworkPolicy/order-operator")
        .context("the chart's NetworkPolicy")?["spec"];
    assert_eq!(
        np["podSelector"]["matchLabels"]["app.kubernetes.io/name"].as_str(),
        Some("order-operator")
    );
    assert_eq!(
        serde_json::to_value(&np["policyTypes"])?,
        serde_json::json!(["Ingress"])
    );
    assert_eq!(
        serde_json::to_value(&np["ingress"])?,
        serde_json::json!([{"ports": [{"port": 8080, "protocol": "TCP"}]}]),
        "ingress only on the HTTP port, from anywhere (Prometheus, kubelet probes)"
    );
    // The CRD is the generated file itself.
    let crd =
        std::fs::read_to_string(repo_root().join("crds/orderpipeline.dev_orderpipelines.yaml"))?;
    let chart_crd =
        std::fs::read_to_string(chart().join("crds/orderpipeline.dev_orderpipelines.yaml"))?;
    assert!(
        crd == chart_crd,
        "charts/order-operator/crds/ is not crds/orderpipeline.dev_orderpipelines.yaml: cp crds/orderpipeline.dev_orderpipelines.yaml charts/order-operator/crds/"
    );
    Ok(())
}

#[test]
fn values_set_what_they_say() -> anyhow::Result<()> {
    let o = objects(&template(&[
        "--set",
        "image.repository=registry.example/op,image.tag=1.2.3,replicaCount=3,resyncInterval=1m,watchNamespace=shop,logLevel=debug",
        "--set",
        "metrics.serviceMonitor.enabled=true,metrics.podMonitor.enabled=true,prometheusRule.enabled=true,prometheusRule.for.notReady=2m,dashboard.enabled=true",
        "--set",
        "podDisruptionBudget.enabled=false,metrics.service.enabled=false,networkPolicy.enabled=false",
        "--set",
        "allowedImages={ghcr.io/orderpipeline/,registry.example/},allowedNatsHosts={nats.nats.svc,*.nats.example.com}",
    ])?)?;
    let d = &o["Deployment/order-operator"];
    let c = &d["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["image"].as_str(), Some("registry.example/op:1.2.3"));
    assert_eq!(d["spec"]["replicas"].as_i64(), Some(3));
    let env: BTreeMap<&str, &str> = c["env"]
        .as_sequence()
        .context("env")?
        .iter()
        .filter_map(|e| Some((e["name"].as_str()?, e["value"].as_str()?)))
        .collect();
    assert_eq!(env.get("WORKER_IMAGE"), Some(&"registry.example/op:1.2.3"));
    assert_eq!(env.get("RESYNC_INTERVAL"), Some(&"1m"));
    assert_eq!(env.get("WATCH_NAMESPACE"), Some(&"shop"));
    assert_eq!(env.get("RUST_LOG"), Some(&"debug"));
    assert_eq!(
        env.get("ALLOWED_IMAGES"),
        Some(&"ghcr.io/orderpipeline/,registry.example/")
    );
    assert_eq!(
        env.get("ALLOWED_NATS_HOSTS"),
        Some(&"nats.nats.svc,*.nats.example.com")
    );
    assert_eq!(
        env.get("ALLOW_PLAINTEXT_CREDENTIALS"),
        Some(&"false"),
        "credentials only over TLS unless a value says otherwise"
    );
    assert!(!o.contains_key("PodDisruptionBudget/order-operator"));
    assert!(!o.contains_key("NetworkPolicy/order-operator"));
    // One watched namespace: Secrets, Deployments and pipelines are granted in
    // it only (a Role); cluster-wide, only the read of kube-system's identity.
    let grants = |o: &Value, resource: &str| {
        o["rules"].as_sequence().is_some_and(|rules| {
            rules.iter().any(|r| {
                r["resources"]
                    .as_sequence()
                    .is_some_and(|rs| rs.iter().any(|x| x.as_str() == Some(resource)))
            })
        })
    };
    let role = &o["Role/order-operator"];
    assert_eq!(role["metadata"]["namespace"].as_str(), Some("shop"));
    for r in ["secrets", "deployments", "orderpipelines", "events"] {
        assert!(grants(role, r), "the Role in shop grants {r}");
    }
    for (key, v) in o.iter().filter(|(k, _)| k.starts_with("ClusterRole/")) {
        for r in ["secrets", "deployments", "orderpipelines"] {
            assert!(!grants(v, r), "{key} grants {r} cluster-wide");
        }
    }
    assert!(o.contains_key("ClusterRole/order-operator-cluster-id"));
    assert_eq!(
        o["RoleBinding/order-operator"]["metadata"]["namespace"].as_str(),
        Some("shop")
    );
    assert!(!o.contains_key("Service/order-operator-metrics"));
    assert!(o.contains_key("ServiceMonitor/order-operator"));
    assert!(o.contains_key("PodMonitor/order-workers"));
    let rule = &o["PrometheusRule/order-operator"];
    let rules = rule["spec"]["groups"][0]["rules"]
        .as_sequence()
        .context("rules")?;
    let not_ready = rules
        .iter()
        .find(|r| r["alert"].as_str() == Some("OrderPipelineNotReady"))
        .context("OrderPipelineNotReady")?;
    assert_eq!(not_ready["for"].as_str(), Some("2m"));
    for r in rules {
        let a = r["alert"].as_str().unwrap_or_default();
        assert!(
            r["annotations"]["runbook"]
                .as_str()
                .is_some_and(|t| t.len() > 80),
            "{a}: runbook"
        );
    }
    let dash = &o["ConfigMap/order-operator-dashboard"];
    assert_eq!(
        dash["metadata"]["labels"]["grafana_dashboard"].as_str(),
        Some("1")
    );
    let json: serde_json::Value = serde_json::from_str(
        dash["data"]["orderpipeline.json"]
            .as_str()
            .context("dashboard")?,
    )?;
    assert_eq!(json["uid"], "orderpipeline");
    Ok(())
}

#[test]
fn the_schema_refuses_bad_values_naming_them() -> anyhow::Result<()> {
    for (set, names) in [
        ("replicaCount=0", "replicaCount"),
        ("resyncInterval=soon", "resyncInterval"),
        ("image.pullPolicy=Sometimes", "pullPolicy"),
        ("prometheusRule.for.notReady=5 minutes", "notReady"),
        ("replicas=2", "replicas"),
    ] {
        let c = chart();
        let out = run(
            "helm",
            &["template", "x", &c.to_string_lossy(), "--set", set],
        )?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "--set {set} was accepted");
        assert!(
            err.contains("values don't meet the specifications of the schema"),
            "--set {set}: {err}"
        );
        assert!(
            err.contains(names),
            "--set {set}: the error does not name {names}: {err}"
        );
    }
    Ok(())
}

/// The alerts as the chart renders them, as a plain rules file.
pub fn rendered_rules(for_overrides: &str) -> anyhow::Result<String> {
    let mut args = vec!["--set", "prometheusRule.enabled=true"];
    if !for_overrides.is_empty() {
        args.extend_from_slice(&["--set", for_overrides]);
    }
    let o = objects(&template(&args)?)?;
    Ok(serde_yaml::to_string(
        &o["PrometheusRule/order-operator"]["spec"],
    )?)
}

/// One promtool alert test: at `at`, alert `name` fires for these pipelines
/// (`(pipeline label or "", $value)`), or not at all when empty.
struct Case {
    name: &'static str,
    at: &'static str,
    fires: Vec<(&'static str, &'static str)>,
}

/// The expected alert as promtool compares it: labels, and the annotations the
/// rendered rule gives with `$labels.pipeline` and `$value` filled in.
fn expected(rule: &Value, pipeline: &str, value: &str) -> serde_json::Value {
    let mut labels = serde_json::Map::new();
    for (k, v) in rule["labels"].as_mapping().into_iter().flatten() {
        labels.insert(
            k.as_str().unwrap_or_default().into(),
            v.as_str().unwrap_or_default().into(),
        );
    }
    if !pipeline.is_empty() {
        labels.insert("pipeline".into(), pipeline.into());
    }
    let mut ann = serde_json::Map::new();
    for (k, v) in rule["annotations"].as_mapping().into_iter().flatten() {
        let text = v
            .as_str()
            .unwrap_or_default()
            .replace("{{ $labels.pipeline }}", pipeline)
            .replace("{{ $value }}", value);
        ann.insert(k.as_str().unwrap_or_default().into(), text.into());
    }
    serde_json::json!({"exp_labels": labels, "exp_annotations": ann})
}

#[test]
fn promtool_checks_and_unit_tests_the_alerts() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("alerts-{}", orderpipeline_e2e::random_suffix()));
    std::fs::create_dir_all(&dir)?;
    let rules_text = rendered_rules("prometheusRule.natsMemoryBudgetBytes=1000000")?;
    let rules_file = dir.join("alerts.yaml");
    std::fs::write(&rules_file, &rules_text)?;
    ok(
        "promtool",
        &["check", "rules", &rules_file.to_string_lossy()],
    )?;
    let rules: Value = serde_yaml::from_str(&rules_text)?;
    let rule = |name: &str| -> anyhow::Result<Value> {
        rules["groups"][0]["rules"]
            .as_sequence()
            .and_then(|r| r.iter().find(|r| r["alert"].as_str() == Some(name)))
            .cloned()
            .with_context(|| format!("no alert {name}"))
    };
    // Series every minute; the chart's default `for:` windows (5m, 10m, 0m,
    // 10m, 10m, 5m) decide when each alert may fire.
    let series = serde_json::json!([
        {"series": "orderoperator_pipeline_ready{pipeline=\"shop/orders\"}", "values": "1 1 0x20"},
        {"series": "orderoperator_pipeline_ready{pipeline=\"shop/ok\"}", "values": "1x22"},
        {"series": "orderoperator_pipeline_lag{pipeline=\"shop/orders\"}", "values": "0 0 1500x20"},
        {"series": "orderoperator_pipeline_lag{pipeline=\"shop/ok\"}", "values": "400x22"},
        {"series": "orderoperator_pipeline_target_lag_per_replica{pipeline=\"shop/orders\"}", "values": "100x22"},
        {"series": "orderoperator_pipeline_target_lag_per_replica{pipeline=\"shop/ok\"}", "values": "100x22"},
        {"series": "orderoperator_pipeline_workers_available{pipeline=\"shop/orders\"}", "values": "2x22"},
        {"series": "orderoperator_pipeline_workers_available{pipeline=\"shop/ok\"}", "values": "5x22"},
        {"series": "orderoperator_pipeline_workers_desired{pipeline=\"shop/orders\"}", "values": "3x22"},
        {"series": "orderoperator_pipeline_workers_desired{pipeline=\"shop/ok\"}", "values": "5x22"},
        {"series": "orderoperator_pipeline_dead_letters{pipeline=\"shop/orders\"}", "values": "0 0 0 3x20"},
        {"series": "orderoperator_pipeline_dead_letters{pipeline=\"shop/ok\"}", "values": "7x22"},
        {"series": "orderoperator_reconcile_failures_total{kind=\"nats\"}", "values": "0 0 0+1x20"},
        {"series": "orderoperator_leader{pod=\"a\"}", "values": "1x5 0x17"},
        {"series": "orderoperator_pipeline_inputs_removed_unprocessed{pipeline=\"shop/orders\"}", "values": "0 0 0 4x8 0x11"},
        {"series": "orderoperator_pipeline_inputs_removed_unprocessed{pipeline=\"shop/ok\"}", "values": "0x22"},
        {"series": "orderoperator_pipeline_max_age_seconds{pipeline=\"shop/orders\"}", "values": "600x22"},
        {"series": "orderoperator_pipeline_max_age_seconds{pipeline=\"shop/ok\"}", "values": "0x22"},
        {"series": "orderoperator_pipeline_oldest_unprocessed_age_seconds{pipeline=\"shop/orders\"}", "values": "0 60 120 180 240 300 360 420 480 540 600 660 0x10"},
        {"series": "orderoperator_pipeline_oldest_unprocessed_age_seconds{pipeline=\"shop/ok\"}", "values": "900x22"},
        {"series": "orderoperator_pipeline_estimated_server_memory_bytes{pipeline=\"shop/orders\"}", "values": "400000+20000x30"},
        {"series": "orderoperator_pipeline_estimated_server_memory_bytes{pipeline=\"shop/ok\"}", "values": "200000x30"},
        {"series": "orderoperator_pipeline_stalled{pipeline=\"shop/orders\"}", "values": "0 0 0 0 1x4 0x14"},
        {"series": "orderoperator_pipeline_stalled{pipeline=\"shop/ok\"}", "values": "0x22"},
    ]);
    let cases = [
        // 4 removed at minute 3, acknowledged at minute 12: critical at once, until then.
        Case {
            name: "OrderPipelineInputsRemovedUnprocessed",
            at: "2m",
            fires: vec![],
        },
        Case {
            name: "OrderPipelineInputsRemovedUnprocessed",
            at: "3m",
            fires: vec![("shop/orders", "4")],
        },
        Case {
            name: "OrderPipelineInputsRemovedUnprocessed",
            at: "12m",
            fires: vec![],
        },
        // Half of maxAge 600 s from minute 5 (300 s old): firing 5m later; a
        // pipeline with no maxAge never.
        Case {
            name: "OrderPipelineOldestUnprocessedAging",
            at: "9m",
            fires: vec![],
        },
        Case {
            name: "OrderPipelineOldestUnprocessedAging",
            at: "10m",
            fires: vec![("shop/orders", "")],
        },
        // Ready=0 from minute 2: pending, then firing after 5m; the Ready one never.
        Case {
            name: "OrderPipelineNotReady",
            at: "5m",
            fires: vec![],
        },
        Case {
            name: "OrderPipelineNotReady",
            at: "8m",
            fires: vec![("shop/orders", "0")],
        },
        // 1500 > 100 x 2 available from minute 2 (400 < 100 x 5 never): 10m.
        Case {
            name: "OrderPipelineLagAboveTarget",
            at: "11m",
            fires: vec![],
        },
        Case {
            name: "OrderPipelineLagAboveTarget",
            at: "13m",
            fires: vec![("shop/orders", "1500")],
        },
        // 0 -> 3 at minute 3: fires at once, and stops 10m after the last growth.
        Case {
            name: "OrderPipelineDeadLettersGrowing",
            at: "2m",
            fires: vec![],
        },
        Case {
            name: "OrderPipelineDeadLettersGrowing",
            at: "5m",
            fires: vec![("shop/orders", "")],
        },
        Case {
            name: "OrderPipelineDeadLettersGrowing",
            at: "20m",
            fires: vec![],
        },
        // 2 of 3 available all along: after 10m.
        Case {
            name: "OrderPipelineWorkersUnavailable",
            at: "9m",
            fires: vec![],
        },
        Case {
            name: "OrderPipelineWorkersUnavailable",
            at: "11m",
            fires: vec![("shop/orders", "2")],
        },
        // Failures from minute 3: after 10m.
        Case {
            name: "OrderOperatorReconcileErrors",
            at: "10m",
            fires: vec![],
        },
        Case {
            name: "OrderOperatorReconcileErrors",
            at: "16m",
            fires: vec![("", "")],
        },
        // Summed 600,000 + 20,000 a minute: above 80 % of the 1,000,000 budget
        // from minute 11 (820,000), firing 15m later.
        Case {
            name: "OrderPipelinesNatsMemoryNearBudget",
            at: "25m",
            fires: vec![],
        },
        Case {
            name: "OrderPipelinesNatsMemoryNearBudget",
            at: "26m",
            fires: vec![("", "1.12e+06")],
        },
        // Stalled at minutes 4 to 7 (the operator waited its window): at once,
        // and no longer once it moves.
        Case {
            name: "OrderPipelineStalled",
            at: "3m",
            fires: vec![],
        },
        Case {
            name: "OrderPipelineStalled",
            at: "4m",
            fires: vec![("shop/orders", "1")],
        },
        Case {
            name: "OrderPipelineStalled",
            at: "9m",
            fires: vec![],
        },
        // No leader from minute 6: after 5m.
        Case {
            name: "OrderOperatorAbsent",
            at: "9m",
            fires: vec![],
        },
        Case {
            name: "OrderOperatorAbsent",
            at: "13m",
            fires: vec![("", "1")],
        },
    ];
    let mut alert_tests = Vec::new();
    for c in &cases {
        let r = rule(c.name)?;
        let exp: Vec<serde_json::Value> = c.fires.iter().map(|(p, v)| expected(&r, p, v)).collect();
        alert_tests
            .push(serde_json::json!({"eval_time": c.at, "alertname": c.name, "exp_alerts": exp}));
    }
    let doc = serde_json::json!({
        "rule_files": ["alerts.yaml"],
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": series, "alert_rule_test": alert_tests}],
    });
    let tests = dir.join("alerts_test.yaml");
    std::fs::write(&tests, serde_yaml::to_string(&doc)?)?;
    let out = ok("promtool", &["test", "rules", &tests.to_string_lossy()]);
    if out.is_ok() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    let out = out?;
    assert!(out.contains("SUCCESS"), "{out}");
    Ok(())
}

/// Deletes what a test applied to the API server, even when it fails.
struct Applied(Vec<String>);

impl Drop for Applied {
    fn drop(&mut self) {
        for what in self.0.iter().rev() {
            let args: Vec<&str> = ["delete", "--ignore-not-found", "--wait=false"]
                .into_iter()
                .chain(what.split(' '))
                .collect();
            let _ = run("kubectl", &args);
        }
    }
}

/// What `kubectl auth can-i` says the operator's ServiceAccount in `ns` may do.
fn can_i(ns: &str, verb: &str, resource: &str, scope: &[&str]) -> anyhow::Result<String> {
    let sa = format!("system:serviceaccount:{ns}:order-operator");
    let mut args = vec!["auth", "can-i", verb, resource, "--as", &sa];
    args.extend_from_slice(scope);
    let out = run("kubectl", &args)?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Fresh namespaces: the operator's, `watched` watched ones, another one.
struct Namespaces {
    home: String,
    watched: Vec<String>,
    other: String,
}

fn namespaces(applied: &mut Applied, watched: usize) -> anyhow::Result<Namespaces> {
    let suffix = orderpipeline_e2e::random_suffix();
    let names = Namespaces {
        home: format!("opns-{suffix}"),
        watched: (0..watched).map(|i| format!("shop{i}-{suffix}")).collect(),
        other: format!("other-{suffix}"),
    };
    for ns in names.watched.iter().chain([&names.home, &names.other]) {
        ok("kubectl", &["create", "namespace", ns])?;
        applied.0.push(format!("namespace {ns}"));
    }
    Ok(names)
}

/// Applies the ServiceAccount and RBAC objects of `rendered` (cluster-scoped
/// ones renamed, so they never replace the ones other tests run with), then
/// asks `kubectl auth can-i` as the operator's ServiceAccount in `home`: it
/// may read Secrets and write Deployments in each watched namespace, read
/// Secrets (the NATS accounts) in `home`, and nothing in `other`.
fn only_its_namespaces(
    rendered: &str,
    ns: &Namespaces,
    applied: &mut Applied,
) -> anyhow::Result<()> {
    let (home, other) = (&ns.home, &ns.other);
    let suffix = orderpipeline_e2e::random_suffix();
    let mut docs = Vec::new();
    // Every document (a Role of the same name is in each watched namespace).
    let rendered: Vec<Value> = serde_yaml::Deserializer::from_str(rendered)
        .map(Value::deserialize)
        .collect::<Result<_, _>>()?;
    for mut o in rendered.into_iter().filter(|v| !v.is_null()) {
        let kind = o["kind"].as_str().unwrap_or_default().to_string();
        if !matches!(
            kind.as_str(),
            "ServiceAccount" | "Role" | "RoleBinding" | "ClusterRole" | "ClusterRoleBinding"
        ) {
            continue;
        }
        if kind.starts_with("Cluster") {
            let name = format!(
                "{}-{suffix}",
                o["metadata"]["name"].as_str().unwrap_or_default()
            );
            o["metadata"]["name"] = Value::from(name.clone());
            if kind == "ClusterRoleBinding" {
                let role = format!(
                    "{}-{suffix}",
                    o["roleRef"]["name"].as_str().unwrap_or_default()
                );
                o["roleRef"]["name"] = Value::from(role);
            }
            applied.0.push(format!("{kind} {name}"));
        }
        docs.push(serde_yaml::to_string(&o)?);
    }
    let file = std::env::temp_dir().join(format!("namespaced-rbac-{suffix}.yaml"));
    std::fs::write(&file, docs.join("---\n"))?;
    let out = ok(
        "kubectl",
        &["apply", "-f", file.to_str().unwrap_or_default()],
    );
    let _ = std::fs::remove_file(&file);
    out?;
    let mut checks = vec![
        ("get", "secrets", vec!["-n", other.as_str()], "no"),
        ("list", "secrets", vec!["--all-namespaces"], "no"),
        ("create", "deployments", vec!["-n", other.as_str()], "no"),
        (
            "get",
            "orderpipelines.orderpipeline.dev",
            vec!["-n", other.as_str()],
            "no",
        ),
        ("get", "secrets", vec!["-n", home.as_str()], "yes"),
        ("list", "secrets", vec!["-n", home.as_str()], "no"),
    ];
    for watched in &ns.watched {
        checks.extend([
            ("watch", "secrets", vec!["-n", watched.as_str()], "yes"),
            ("patch", "secrets", vec!["-n", watched.as_str()], "yes"),
            ("create", "deployments", vec!["-n", watched.as_str()], "yes"),
            (
                "patch",
                "networkpolicies",
                vec!["-n", watched.as_str()],
                "yes",
            ),
        ]);
    }
    let mut wrong = Vec::new();
    for (verb, resource, scope, want) in &checks {
        let got = can_i(home, verb, resource, scope)?;
        if got != *want {
            wrong.push(format!(
                "can-i {verb} {resource} {scope:?}: {got}, want {want}"
            ));
        }
    }
    anyhow::ensure!(wrong.is_empty(), "{wrong:#?}");
    Ok(())
}

/// The chart installed for two watched namespaces (a list), against the real
/// API server (issue 25: `kubectl auth can-i` as the operator).
#[test]
fn the_namespaced_chart_reads_no_secret_outside_its_namespaces() -> anyhow::Result<()> {
    let mut applied = Applied(Vec::new());
    let ns = namespaces(&mut applied, 2)?;
    let c = chart();
    let rendered = ok(
        "helm",
        &[
            "template",
            "order-operator",
            c.to_str().unwrap_or_default(),
            "--namespace",
            &ns.home,
            "--set",
            &format!("watchNamespace={{{}}}", ns.watched.join(",")),
            "--show-only",
            "templates/serviceaccount.yaml",
            "--show-only",
            "templates/rbac.yaml",
        ],
    )?;
    only_its_namespaces(&rendered, &ns, &mut applied)
}

/// The kustomize overlay `overlays/namespaced` (its `shop` and
/// `orderpipeline-system` replaced by fresh namespaces), the same checks.
#[test]
fn the_namespaced_overlay_reads_no_secret_outside_its_namespaces() -> anyhow::Result<()> {
    let mut applied = Applied(Vec::new());
    let ns = namespaces(&mut applied, 1)?;
    let overlay = repo_root().join("overlays/namespaced");
    let rendered = ok(
        "kubectl",
        &["kustomize", overlay.to_str().unwrap_or_default()],
    )?
    .replace("namespace: shop", &format!("namespace: {}", ns.watched[0]))
    .replace("value: shop", &format!("value: {}", ns.watched[0]))
    .replace("orderpipeline-system", &ns.home);
    anyhow::ensure!(
        rendered.contains(&format!("value: {}", ns.watched[0])),
        "the overlay sets no WATCH_NAMESPACE"
    );
    only_its_namespaces(&rendered, &ns, &mut applied)
}
