//! Upgrading the operator under traffic, and downgrading it back: the previous
//! release (commit 7bb91e9, built from history by `hack/build-previous`,
//! cached by commit) runs two pipelines while a prober publishes orders to both
//! without pause; then the CRD is upgraded (`kubectl apply --server-side`, as
//! Helm never upgrades its `crds/`), the old operator stops and the new one
//! starts, as a Deployment rollout replaces its Pod; then back. The workers'
//! image follows the operator (the previous release's workers run the previous
//! worker binary), so each way they roll exactly once.
//!
//! It swaps the cluster's CRD, so it runs alone: `#[ignore]`d in `make test`,
//! run by `make test-faults` (hack/test-faults) after the fault suite. Its line
//! starts with `fault` and lands in the durability page's fault-suite block.

use std::io::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Event;
use kube::Api;
use order_operator::crd::OrderPipeline;
use orderpipeline_ctl::audit::Audit;
use orderpipeline_ctl::{self as ctl, PublishOptions, PublishReport};
use orderpipeline_e2e::operator::{
    OperatorProcess, install_crd_and_rbac, kubectl, repo_root, service_account_kubeconfig,
};
use orderpipeline_e2e::pipeline::binary;
use orderpipeline_e2e::{NatsServer, random_suffix, wait_for};

const PREVIOUS_IMAGE: &str = "example.invalid/order-worker:previous";
const NEW_IMAGE: &str = "example.invalid/order-worker:new";

/// How long every pipeline may take to be Ready again, its workers rolled.
const READY_WITHIN: Duration = Duration::from_secs(90);

/// The previous release's directory (binaries and CRD), built if needed.
fn previous() -> anyhow::Result<PathBuf> {
    orderpipeline_e2e::pipeline::built_by("build-previous")
}

/// The two pipelines: the sample, and a second one on its own stream.
fn pipelines(url: &str) -> anyhow::Result<Vec<OrderPipeline>> {
    let text = std::fs::read_to_string(repo_root().join("manifests/samples/orderpipeline.yaml"))?;
    let mut out = Vec::new();
    for (name, stream, prefix) in [("orders", "ORDERS", "ORDER"), ("shop", "SHOP", "SHOP")] {
        let mut p: OrderPipeline = serde_yaml::from_str(&text)?;
        p.metadata.name = Some(name.into());
        p.spec.nats.url = url.to_string();
        p.spec.telemetry.otlp_endpoint = None;
        p.spec.stream.name = stream.into();
        p.spec.stream.subjects = vec![format!("{prefix}.*")];
        p.spec.consumer.name = format!("{name}-workers");
        p.spec.consumer.filter_subject = format!("{prefix}.created");
        p.spec.consumer.ack_wait = "5s".into();
        p.spec.dead_letter.stream_name = Some(format!("{stream}_DLQ"));
        p.spec.dead_letter.subject = Some(format!("DLQ.{prefix}.created"));
        p.spec.workers.replicas = 1;
        out.push(p);
    }
    Ok(out)
}

/// Publishes small batches to every pipeline until `stop`: a prober that never
/// pauses across the upgrade. Every batch's report.
fn prober(
    js: jetstream::Context,
    subjects: Vec<String>,
    stop: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<anyhow::Result<Vec<(String, PublishReport)>>> {
    tokio::spawn(async move {
        let mut reports = Vec::new();
        let suffix = random_suffix();
        let mut batch = 0;
        while !stop.is_cancelled() {
            for subject in &subjects {
                let o = PublishOptions {
                    subject: subject.clone(),
                    count: 20,
                    rate: 100.0,
                    invalid_ratio: 0.05,
                    duplicate_ratio: 0.0,
                    prefix: format!("p{suffix}-{batch}"),
                    window: 64,
                    ack_timeout: Duration::from_secs(3),
                    progress: false,
                    poison: 0,
                };
                reports.push((subject.clone(), ctl::publish_orders(&js, &o).await?));
            }
            batch += 1;
        }
        Ok(reports)
    })
}

/// Waits until the prober's orders have gone on: `more` messages stored in
/// `stream` (inputs and their outcomes) after this call.
async fn traffic(js: &jetstream::Context, stream: &str, more: u64) -> anyhow::Result<()> {
    let count = || async { anyhow::Ok(js.get_stream(stream).await?.info().await?.state.messages) };
    let from = count().await?;
    wait_for(
        &format!("{more} more messages in {stream}"),
        Duration::from_secs(60),
        || async { Ok((count().await? >= from + more).then_some(())) },
    )
    .await
}

/// Every pipeline Ready for its current generation, its Deployment at
/// generation `want` and rolled out; the seconds it took from `since`.
async fn ready_at(
    api: &Api<OrderPipeline>,
    deployments: &Api<Deployment>,
    want: &[(String, i64)],
    since: Instant,
    op: &OperatorProcess,
) -> anyhow::Result<f64> {
    wait_for(
        "every pipeline Ready, its workers rolled",
        READY_WITHIN,
        || async {
            for (name, generation) in want {
                let p = api.get(name).await?;
                let s = p.status.unwrap_or_default();
                let ready = s
                    .conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True");
                let d = deployments.get(&format!("{name}-workers")).await?;
                let ds = d.status.unwrap_or_default();
                let rolled = d.metadata.generation == Some(*generation)
                    && ds.observed_generation == Some(*generation)
                    && ds.updated_replicas == Some(1)
                    && ds.replicas == Some(1)
                    && ds.available_replicas == Some(1);
                if !(ready && rolled && s.observed_generation == p.metadata.generation) {
                    return Ok(None);
                }
            }
            Ok(Some(()))
        },
    )
    .await
    .with_context(|| format!("operator log:\n{}", op.log_text()))?;
    Ok(since.elapsed().as_secs_f64())
}

/// The Deployments' generations, by pipeline.
async fn generations(
    deployments: &Api<Deployment>,
    names: &[&str],
) -> anyhow::Result<Vec<(String, i64)>> {
    let mut out = Vec::new();
    for n in names {
        let d = deployments.get(&format!("{n}-workers")).await?;
        out.push((n.to_string(), d.metadata.generation.unwrap_or(0)));
    }
    Ok(out)
}

fn plus_one(g: &[(String, i64)]) -> Vec<(String, i64)> {
    g.iter().map(|(n, g)| (n.clone(), g + 1)).collect()
}

/// The namespace's Warning Events, one `reason: message` each.
async fn warnings(events: &Api<Event>) -> anyhow::Result<Vec<String>> {
    let list = events.list(&Default::default()).await?;
    Ok(list
        .items
        .into_iter()
        .filter(|e| e.type_.as_deref() == Some("Warning"))
        .map(|e| {
            format!(
                "{}: {}",
                e.reason.unwrap_or_default(),
                e.message.unwrap_or_default()
            )
        })
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "swaps the cluster's CRD: make test-faults runs it alone"]
async fn the_operator_upgrades_and_downgrades_under_traffic_losing_nothing() -> anyhow::Result<()> {
    let started = Instant::now();
    let prev = previous()?;
    install_crd_and_rbac().await?;
    // The previous release's CRD, as it was installed.
    let old_crd = prev.join("crd.yaml");
    kubectl(&[
        "apply",
        "--server-side",
        "--force-conflicts",
        "-f",
        &old_crd.to_string_lossy(),
    ])
    .await?;
    let client = orderpipeline_e2e::kube_client().await?;
    let ns = orderpipeline_e2e::TestNamespace::create(&client, "upgrade").await?;
    let server = NatsServer::start().await?;
    let js = jetstream::new(async_nats::connect(server.url()).await?);
    let previous_workers = vec![(PREVIOUS_IMAGE.into(), prev.join("order-worker"))];
    let _runner = orderpipeline_e2e::podrunner::for_namespace(&client, &ns.name, previous_workers)?;
    let kc = service_account_kubeconfig()?;
    let image = |i: &str| vec![("WORKER_IMAGE", i.to_string())];
    let old_op = prev.join("order-operator");
    let mut op = OperatorProcess::spawn_binary(
        &old_op,
        &ns.name,
        "2s",
        &kc,
        "op-previous",
        &image(PREVIOUS_IMAGE),
    )
    .await?;
    let api: Api<OrderPipeline> = Api::namespaced(client.clone(), &ns.name);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let events: Api<Event> = Api::namespaced(client.clone(), &ns.name);
    let specs = pipelines(&server.url())?;
    for p in &specs {
        api.create(&Default::default(), p).await?;
    }
    let names = ["orders", "shop"];
    let zero: Vec<(String, i64)> = names.iter().map(|n| (n.to_string(), 1)).collect();
    ready_at(&api, &deployments, &zero, Instant::now(), &op).await?;

    let stop = tokio_util::sync::CancellationToken::new();
    let subjects: Vec<String> = specs
        .iter()
        .map(|p| p.spec.consumer.filter_subject.clone())
        .collect();
    let probe = prober(js.clone(), subjects, stop.clone());
    let _stop_probe = stop.clone().drop_guard();
    traffic(&js, "SHOP", 400).await?;

    // Upgrade: the CRD first, then the operator's Pod replaced.
    let before = generations(&deployments, &names).await?;
    let crd = repo_root().join("crds/orderpipeline.dev_orderpipelines.yaml");
    kubectl(&[
        "apply",
        "--server-side",
        "--force-conflicts",
        "-f",
        &crd.to_string_lossy(),
    ])
    .await?;
    op.stop().await?;
    let up = Instant::now();
    op = OperatorProcess::spawn_binary(
        &binary("order-operator")?,
        &ns.name,
        "2s",
        &kc,
        "op-new",
        &image(NEW_IMAGE),
    )
    .await?;
    let upgraded = plus_one(&before);
    let t_up = ready_at(&api, &deployments, &upgraded, up, &op).await?;
    traffic(&js, "SHOP", 400).await?;

    // Downgrade: the previous release reads what this one wrote.
    op.stop().await?;
    let down = Instant::now();
    op = OperatorProcess::spawn_binary(
        &old_op,
        &ns.name,
        "2s",
        &kc,
        "op-previous-again",
        &image(PREVIOUS_IMAGE),
    )
    .await?;
    let downgraded = plus_one(&upgraded);
    let t_down = ready_at(&api, &deployments, &downgraded, down, &op).await?;
    traffic(&js, "SHOP", 400).await?;

    stop.cancel();
    let reports = probe.await??;
    let mut published = 0;
    let (mut lost, mut two) = (0, 0);
    for p in &specs {
        let s = &p.spec;
        let stream = &s.stream.name;
        let (consumer, subject) = (&s.consumer.name, &s.consumer.filter_subject);
        let within = Duration::from_secs(120);
        orderpipeline_e2e::pipeline::wait_drained(&js, stream, consumer, subject, within).await?;
        let dlq = s.dead_letter.stream_name.clone().unwrap_or_default();
        let audit = Audit::collect(&js, stream, &dlq, &s.consumer.name).await?;
        let mine = reports
            .iter()
            .filter(|(subj, _)| *subj == s.consumer.filter_subject);
        let (mut valid, mut invalid) = (Vec::new(), Vec::new());
        for (_, r) in mine {
            published += r.published;
            valid.extend(r.valid_ids.iter().cloned());
            invalid.extend(r.invalid_ids.iter().cloned());
        }
        let summary = audit.summary();
        (lost, two) = (lost + summary.lost, two + summary.two_outcomes);
        audit
            .assert_exactly_once(&valid, &invalid)
            .with_context(|| format!("pipeline {}", p.metadata.name.as_deref().unwrap_or("")))?;
    }
    // Generations: exactly one roll each way (the image), none more.
    let now = generations(&deployments, &names).await?;
    anyhow::ensure!(
        now == downgraded,
        "Deployment generations {now:?}, expected {downgraded:?}"
    );
    let warned = warnings(&events).await?;
    let line = format!(
        "fault upgrade-operator (7bb91e9 -> this commit -> 7bb91e9, 2 pipelines): published {published} lost {lost} two outcomes {two}; Ready again {t_up:.1}s after the new operator started, {t_down:.1}s after the downgrade; workers rolled once each way; Warning Events {}; wall {:.1}s\n",
        warned.len(),
        started.elapsed().as_secs_f64()
    );
    let _ = std::io::stderr().write_all(line.as_bytes());
    anyhow::ensure!(warned.is_empty(), "Warning Events: {warned:#?}");
    anyhow::ensure!(lost == 0 && two == 0, "lost {lost}, two outcomes {two}");
    let _ = std::fs::remove_file(&kc);
    ns.delete().await
}
