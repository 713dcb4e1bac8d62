//! The Helm chart installed on the real node as a platform team would run it,
//! and its alerts and dashboard proven on a real Prometheus: `helm install` ->
//! both operator Pods Ready from their real /readyz, one leader -> the sample
//! pipeline Ready with workers -> Prometheus (inside the node's network namespace,
//! Kubernetes service discovery as the chart's ServiceMonitor and PodMonitor
//! describe it, the chart's rules) finds every metric the rules and the dashboard
//! use, and a paused pipeline with a backlog fires the lag alert, which resolves
//! after unpause -> `helm upgrade` with a changed value rolls the operator ->
//! `helm uninstall` keeps the CRD and the pipeline's streams.
//!
//! Needs `hack/env up --real-node`: `make integration-real-node` runs it in an
//! environment of its own (the kustomize install of `real_node.rs` would be a
//! second operator).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use order_operator::crd::OrderPipeline;
use orderpipeline_ctl::{self as ctl, PublishOptions};
use orderpipeline_e2e::node::{
    OPERATOR_LABEL, install_image, is_ready, lease_holder, name_of, node_nats_url, pods,
};
use orderpipeline_e2e::operator::{OPERATOR_NAMESPACE, kubectl, repo_root, sample_on_stream};
use orderpipeline_e2e::{
    TestNamespace, env_var, kube_client, random_suffix, wait_for, wait_max_age,
};

fn helm(args: &[&str]) -> anyhow::Result<String> {
    orderpipeline_e2e::run_tool("helm", args)
}

/// The image built here, and a short resync so the lag gauge follows quickly.
const LOCAL_IMAGE: &[&str] = &[
    "--set",
    "image.repository=orderpipeline.local/orderpipeline,image.tag=dev,resyncInterval=5s",
];

/// Short alert windows for the test (the chart's values, as a user sets them).
const SHORT_FOR: &str = "prometheusRule.for.lagAboveTarget=10s,prometheusRule.for.notReady=10s,prometheusRule.for.workersUnavailable=30s,prometheusRule.for.reconcileErrors=30s,prometheusRule.for.operatorAbsent=30s";

async fn operator_pods_ready(client: &Client) -> anyhow::Result<Vec<String>> {
    wait_for(
        "two operator Pods Ready",
        Duration::from_secs(180),
        || async {
            let p = pods(client, OPERATOR_NAMESPACE, OPERATOR_LABEL).await?;
            Ok((p.len() == 2 && p.iter().all(is_ready)).then(|| p.iter().map(name_of).collect()))
        },
    )
    .await
}

/// A Prometheus inside the node's network namespace: it discovers the operator's
/// metrics Service (endpointslices) and the workers' Pods through the API server
/// and scrapes them at their Pod addresses, with the chart's rendered alerts.
struct Prometheus {
    child: std::process::Child,
    dir: PathBuf,
    netns: String,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Prometheus {
    fn start(rules: &str) -> anyhow::Result<Self> {
        let netns = env_var("ORDERPIPE_NODE_NETNS")?;
        let dir = std::env::temp_dir().join(format!("prometheus-{}", random_suffix()));
        std::fs::create_dir_all(&dir)?;
        // The API server as the node's namespace reaches it (node-proxy).
        let admin = std::fs::read_to_string(env_var("KUBECONFIG")?)?;
        let kc: String = admin
            .lines()
            .map(|l| match l.trim_start().strip_prefix("server: ") {
                Some(_) => "    server: https://127.0.0.1:6443".to_string(),
                None => l.to_string(),
            })
            .collect::<Vec<_>>()
            .join("\n");
        std::fs::write(dir.join("kubeconfig"), kc)?;
        std::fs::write(dir.join("alerts.yaml"), rules)?;
        let config = format!(
            r#"global: {{scrape_interval: 2s, evaluation_interval: 2s}}
rule_files: [alerts.yaml]
scrape_configs:
  # What the chart's ServiceMonitor selects: Service order-operator-metrics, port http.
  - job_name: order-operator
    kubernetes_sd_configs:
      - {{role: endpointslice, kubeconfig_file: {kc}, namespaces: {{names: [{OPERATOR_NAMESPACE}]}}}}
    relabel_configs:
      - {{source_labels: [__meta_kubernetes_service_name], regex: order-operator-metrics, action: keep}}
      - {{source_labels: [__meta_kubernetes_endpointslice_port_name], regex: http, action: keep}}
      - {{source_labels: [__meta_kubernetes_pod_name], target_label: pod}}
  # What the chart's PodMonitor selects: worker Pods in every namespace, port http,
  # with pipeline="<namespace>/<name>".
  - job_name: order-workers
    kubernetes_sd_configs:
      - {{role: pod, kubeconfig_file: {kc}}}
    relabel_configs:
      - {{source_labels: [__meta_kubernetes_pod_label_app_kubernetes_io_name], regex: order-worker, action: keep}}
      - {{source_labels: [__meta_kubernetes_pod_container_port_name], regex: http, action: keep}}
      - {{source_labels: [__meta_kubernetes_namespace, __meta_kubernetes_pod_label_orderpipeline_dev_pipeline], separator: /, target_label: pipeline}}
      - {{source_labels: [__meta_kubernetes_pod_name], target_label: pod}}
"#,
            kc = dir.join("kubeconfig").display()
        );
        std::fs::write(dir.join("prometheus.yml"), config)?;
        let log = std::fs::File::create(dir.join("prometheus.log"))?;
        let child = std::process::Command::new("nsenter")
            .arg(format!("--net=/run/netns/{netns}"))
            .arg(orderpipeline_e2e::tool("prometheus")?)
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg("--web.listen-address=127.0.0.1:9090")
            .current_dir(&dir)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting prometheus in the node's namespace")?;
        Ok(Self { child, dir, netns })
    }

    /// GET on the Prometheus API from inside the node's namespace.
    fn api(&self, path: &str) -> anyhow::Result<serde_json::Value> {
        let (endpoint, query) = path.split_once('?').unwrap_or((path, ""));
        let mut c = std::process::Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.netns)).args([
            "curl",
            "-sS",
            "--max-time",
            "5",
            "-G",
            &format!("http://127.0.0.1:9090/api/v1/{endpoint}"),
        ]);
        for kv in query.split('&').filter(|s| !s.is_empty()) {
            c.args(["--data-urlencode", kv]);
        }
        let out = c.output()?;
        anyhow::ensure!(
            out.status.success(),
            "curl: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    fn metric_names(&self) -> anyhow::Result<BTreeSet<String>> {
        let v = self.api("label/__name__/values")?;
        Ok(v["data"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str().map(str::to_string))
            .collect())
    }

    /// The alert `name`'s state for `pipeline` (firing, pending), if any.
    fn alert_state(&self, name: &str, pipeline: &str) -> anyhow::Result<Option<String>> {
        let v = self.api("alerts")?;
        Ok(v["data"]["alerts"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| a["labels"]["alertname"] == name && a["labels"]["pipeline"] == pipeline)
            .and_then(|a| a["state"].as_str().map(str::to_string)))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }
}

/// Metric names in PromQL text (identifiers followed by `{`, `[` or `(`... or
/// standing alone) that belong to this project.
fn metrics_in(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut word = String::new();
    for ch in text.chars().chain(std::iter::once(' ')) {
        if ch.is_ascii_alphanumeric() || ch == '_' {
            word.push(ch);
        } else {
            if word.starts_with("orderoperator_") || word.starts_with("orderworker_") {
                out.insert(word.clone());
            }
            word.clear();
        }
    }
    out
}

/// A name Prometheus stores for `m` (histograms as `_bucket`).
fn stored(names: &BTreeSet<String>, m: &str) -> bool {
    names.contains(m) || names.contains(&format!("{m}_bucket"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the real node: make integration-real-node"]
async fn helm_install_alerts_on_a_real_prometheus_upgrade_and_uninstall() -> anyhow::Result<()> {
    let client = kube_client().await?;
    install_image().await?;
    let chart = repo_root().join("charts/order-operator");
    let chart = chart.to_string_lossy();
    let mut install = vec![
        "install",
        "order-operator",
        &*chart,
        "-n",
        OPERATOR_NAMESPACE,
        "--create-namespace",
        "--wait",
        "--timeout",
        "3m",
    ];
    install.extend_from_slice(LOCAL_IMAGE);
    helm(&install)?;
    let first = operator_pods_ready(&client).await?;
    let leader = wait_for("a Lease holder", Duration::from_secs(60), || {
        lease_holder(&client)
    })
    .await?;
    assert!(first.contains(&leader), "{leader} not in {first:?}");

    // The sample, Ready with its workers, reconciled by the chart's operator.
    let ns = TestNamespace::create(&client, "helm").await?;
    let stream = format!("HELM{}", random_suffix().to_uppercase());
    let mut p = sample_on_stream(&node_nats_url()?, "orders", &stream)?;
    p.spec.workers.scaling.target_lag_per_replica = 50;
    let api: Api<OrderPipeline> = Api::namespaced(client.clone(), &ns.name);
    api.create(&PostParams::default(), &p).await?;
    let pipeline = format!("{}/orders", ns.name);
    wait_for(
        "the pipeline Ready with 2 workers",
        Duration::from_secs(180),
        || async {
            let p = api.get("orders").await?;
            let s = p.status.unwrap_or_default();
            let ready = s
                .conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            Ok((ready && s.workers.is_some_and(|w| w.available == 2)).then_some(()))
        },
    )
    .await?;

    // Prometheus with the chart's rules (short windows), as rendered by helm.
    let rendered = helm(&[
        "template",
        "x",
        &chart,
        "--show-only",
        "templates/prometheusrule.yaml",
        "--set",
        "prometheusRule.enabled=true",
        "--set",
        SHORT_FOR,
    ])?;
    let rule: serde_yaml::Value = serde_yaml::from_str(&rendered)?;
    let rules = serde_yaml::to_string(&rule["spec"])?;
    let prom = Prometheus::start(&rules)?;
    let js = jetstream::new(async_nats::connect(env_var("NATS_URL")?).await?);
    // Some traffic, so the workers' counters and histograms have series.
    let opts = |count: u64| PublishOptions {
        subject: format!("{stream}.created"),
        count,
        rate: 0.0,
        invalid_ratio: 0.1,
        duplicate_ratio: 0.0,
        prefix: format!("h{}", random_suffix()),
        window: 64,
        ack_timeout: Duration::from_secs(3),
        progress: false,
        poison: 1,
    };
    ctl::publish_orders(&js, &opts(200)).await?;

    // Every metric the alerts and the dashboard use is scraped for real.
    let dashboard =
        std::fs::read_to_string(repo_root().join("charts/order-operator/files/dashboard.json"))?;
    let mut used = metrics_in(&rules);
    used.extend(metrics_in(&dashboard));
    assert!(
        used.len() >= 12,
        "too few metrics found in the rules and the dashboard: {used:?}"
    );
    let names = wait_for(
        "every metric of the rules and the dashboard scraped",
        Duration::from_secs(90),
        || async {
            let names = prom.metric_names()?;
            let missing: Vec<&String> = used.iter().filter(|m| !stored(&names, m)).collect();
            if missing.is_empty() {
                Ok(Some(names))
            } else {
                anyhow::bail!("missing {missing:?}; Prometheus log:\n{}", prom.log())
            }
        },
    )
    .await?;
    eprintln!(
        "helm: Prometheus scraped {} metric names; all {} used by the rules and the dashboard",
        names.len(),
        used.len()
    );

    // A paused pipeline with a backlog: the lag alert fires, and resolves after unpause.
    let patch = |paused: bool| serde_json::json!({"spec": {"paused": paused}});
    api.patch(
        "orders",
        &PatchParams::default(),
        &Patch::Merge(&patch(true)),
    )
    .await?;
    wait_for(
        "the workers scaled to 0",
        Duration::from_secs(90),
        || async {
            let d: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
            let d = d.get("orders-workers").await?;
            Ok((d.status.and_then(|s| s.replicas).unwrap_or(0) == 0).then_some(()))
        },
    )
    .await?;
    ctl::publish_orders(
        &js,
        &PublishOptions {
            poison: 0,
            ..opts(300)
        },
    )
    .await?;
    let started = Instant::now();
    wait_for(
        "OrderPipelineLagAboveTarget firing",
        Duration::from_secs(90),
        || async {
            Ok((prom
                .alert_state("OrderPipelineLagAboveTarget", &pipeline)?
                .as_deref()
                == Some("firing"))
            .then_some(()))
        },
    )
    .await?;
    eprintln!(
        "helm: OrderPipelineLagAboveTarget fired {:.0}s after the backlog",
        started.elapsed().as_secs_f64()
    );
    api.patch(
        "orders",
        &PatchParams::default(),
        &Patch::Merge(&patch(false)),
    )
    .await?;
    let started = Instant::now();
    wait_for(
        "OrderPipelineLagAboveTarget resolved",
        Duration::from_secs(90),
        || async {
            Ok(prom
                .alert_state("OrderPipelineLagAboveTarget", &pipeline)?
                .is_none()
                .then_some(()))
        },
    )
    .await?;
    eprintln!(
        "helm: resolved {:.0}s after unpause",
        started.elapsed().as_secs_f64()
    );
    // The dead letter of the first batch fired its alert on the way.
    drop(prom);

    // helm upgrade with a changed value rolls the operator.
    let mut upgrade = vec![
        "upgrade",
        "order-operator",
        &*chart,
        "-n",
        OPERATOR_NAMESPACE,
        "--wait",
        "--timeout",
        "3m",
        "--set",
        "logLevel=debug",
    ];
    upgrade.extend_from_slice(LOCAL_IMAGE);
    helm(&upgrade)?;
    let second = operator_pods_ready(&client).await?;
    assert!(
        second.iter().all(|p| !first.contains(p)),
        "not rolled: {first:?} -> {second:?}"
    );
    let d: Api<Deployment> = Api::namespaced(client.clone(), OPERATOR_NAMESPACE);
    let env = d
        .get("order-operator")
        .await?
        .spec
        .and_then(|s| s.template.spec)
        .map(|s| s.containers[0].env.clone().unwrap_or_default())
        .unwrap_or_default();
    assert!(
        env.iter()
            .any(|e| e.name == "RUST_LOG" && e.value.as_deref() == Some("debug"))
    );
    // The new leader still reconciles: a spec change reaches the stream.
    api.patch(
        "orders",
        &PatchParams::default(),
        &Patch::Merge(&serde_json::json!({"spec": {"stream": {"maxAge": "2d"}}})),
    )
    .await?;
    let two_days = Duration::from_secs(2 * 86_400);
    wait_max_age(&js, &stream, two_days, Duration::from_secs(90)).await?;

    // helm uninstall: the operator goes; the CRD, the pipeline and its streams stay.
    helm(&[
        "uninstall",
        "order-operator",
        "-n",
        OPERATOR_NAMESPACE,
        "--wait",
        "--timeout",
        "2m",
    ])?;
    wait_for(
        "the operator's Pods gone",
        Duration::from_secs(120),
        || async {
            Ok(pods(&client, OPERATOR_NAMESPACE, OPERATOR_LABEL)
                .await?
                .is_empty()
                .then_some(()))
        },
    )
    .await?;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    assert!(
        crds.get_opt("orderpipelines.orderpipeline.dev")
            .await?
            .is_some(),
        "the CRD went with the release"
    );
    assert!(
        api.get_opt("orders").await?.is_some(),
        "the pipeline went with the release"
    );
    js.get_stream(&stream)
        .await
        .context("the stream went with the release")?;
    js.get_stream(format!("{stream}_DLQ"))
        .await
        .context("the dead-letter stream went with the release")?;

    // Clean up what the release left by design (no operator: the finalizer is ours to drop).
    let _ = kubectl(&[
        "-n",
        &ns.name,
        "patch",
        "orderpipeline",
        "orders",
        "--type=merge",
        "-p",
        r#"{"metadata":{"finalizers":null}}"#,
    ])
    .await;
    ns.delete().await
}
