//! The project's Pods on the real node: the image built from `./Dockerfile`, the
//! operator installed from `manifests/` (two Pods, leader election, its
//! ServiceAccount through the in-cluster configuration, the restricted security
//! context, probes as the kubelet runs them) and the workers it creates, killed
//! and frozen the ways real Pods die, with no order lost.
//!
//! These need `hack/env up --real-node` (root, Debian's containerd, runc, CNI
//! plugins and buildah): `make integration-real-node` runs them in a private
//! environment. In the kwok environment of `make integration` they are ignored.

use std::time::{Duration, Instant};

use async_nats::jetstream;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use order_operator::crd::OrderPipeline;
use orderpipeline_ctl::audit::Audit;
use orderpipeline_ctl::{self as ctl, PublishOptions};
use orderpipeline_e2e::node::{
    OPERATOR_LABEL, container_pid, install_operator, is_ready, lease_holder, name_of,
    node_nats_url, pods, proc_status, restarts, root_mount_options,
};
use orderpipeline_e2e::operator::{OPERATOR_NAMESPACE, kubectl, sample_on_stream};
use orderpipeline_e2e::{
    TestNamespace, env_var, kube_client, random_suffix, wait_for, wait_max_age,
};

const NEEDS: &str = "needs the real node: make integration-real-node";

/// The sample on its own stream `<stream>` (every other name derived), with the
/// node's NATS URL: the operator's and the workers' Pods dial it.
fn pipeline(stream: &str, replicas: i32) -> anyhow::Result<OrderPipeline> {
    let mut p = sample_on_stream(&node_nats_url()?, "orders", stream)?;
    p.spec.telemetry.otlp_endpoint = Some(env_var("ORDERPIPE_NODE_OTLP_ENDPOINT")?);
    p.spec.workers.replicas = replicas;
    Ok(p)
}

async fn host_js() -> anyhow::Result<jetstream::Context> {
    let url = env_var("NATS_URL")?;
    Ok(jetstream::new(async_nats::connect(url).await?))
}

async fn wait_ready(api: &Api<OrderPipeline>, within: Duration) -> anyhow::Result<()> {
    wait_for("the pipeline Ready", within, || async {
        let p = api.get("orders").await?;
        let ready = p
            .status
            .and_then(|s| s.conditions.into_iter().find(|c| c.type_ == "Ready"))
            .is_some_and(|c| c.status == "True");
        Ok(ready.then_some(()))
    })
    .await
}

const WORKERS: &str = "app.kubernetes.io/component=worker";

/// The worker Pods, once `n` of them are Ready (and none is terminating).
async fn ready_workers(client: &Client, ns: &str, n: usize) -> anyhow::Result<Vec<Pod>> {
    wait_for(
        &format!("{n} worker Pods Ready"),
        Duration::from_secs(180),
        || async {
            let all = pods(client, ns, WORKERS).await?;
            let ready: Vec<Pod> = all.iter().filter(|p| is_ready(p)).cloned().collect();
            Ok((ready.len() == n && all.len() == n).then_some(ready))
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the real node: make integration-real-node"]
async fn the_operator_from_manifests_runs_restricted_in_cluster_and_the_standby_takes_over()
-> anyhow::Result<()> {
    let _ = NEEDS;
    let client = kube_client().await?;
    install_operator(&client).await?;

    // Both Pods Ready through their real /readyz, the restricted context applied
    // to the process itself: user 65532, a read-only root, no capabilities.
    let ops = wait_for(
        "two operator Pods Ready",
        Duration::from_secs(120),
        || async {
            let p = pods(&client, OPERATOR_NAMESPACE, OPERATOR_LABEL).await?;
            Ok((p.len() == 2 && p.iter().all(is_ready)).then_some(p))
        },
    )
    .await?;
    for p in &ops {
        let pid = container_pid(p).await?;
        let uid = proc_status(pid, "Uid")?;
        assert!(uid.starts_with("65532\t"), "{}: Uid {uid}", name_of(p));
        assert_eq!(
            proc_status(pid, "CapEff")?,
            "0000000000000000",
            "{}",
            name_of(p)
        );
        let root = root_mount_options(pid)?;
        assert!(
            root.split(',').any(|o| o == "ro"),
            "{}: root mounted {root}",
            name_of(p)
        );
    }
    let names: Vec<String> = ops.iter().map(name_of).collect();
    // One of these Pods holds the Lease (after a reinstall, once the previous
    // install's holder has expired).
    let leader = wait_for(
        &format!("one of {names:?} holding the Lease"),
        Duration::from_secs(60),
        || async { Ok(lease_holder(&client).await?.filter(|h| names.contains(h))) },
    )
    .await?;

    // The leader, in-cluster, makes a pipeline Ready.
    let ns = TestNamespace::create(&client, "rn-op").await?;
    let stream = format!("RNOP{}", random_suffix().to_uppercase());
    let api: Api<OrderPipeline> = Api::namespaced(client.clone(), &ns.name);
    api.create(&PostParams::default(), &pipeline(&stream, 1)?)
        .await?;
    wait_ready(&api, Duration::from_secs(120)).await?;

    // The leader's Pod deleted: the standby (or the replacement) takes the Lease
    // and reconciles a spec change made after the handover.
    let started = Instant::now();
    Api::<Pod>::namespaced(client.clone(), OPERATOR_NAMESPACE)
        .delete(&leader, &DeleteParams::default())
        .await?;
    let next = wait_for(
        "another Pod holding the Lease",
        Duration::from_secs(90),
        || async { Ok(lease_holder(&client).await?.filter(|h| *h != leader)) },
    )
    .await?;
    eprintln!(
        "real node: leader {leader} deleted; {next} took over in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    let patch = serde_json::json!({"spec": {"stream": {"maxAge": "3d"}}});
    api.patch("orders", &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    let js = host_js().await?;
    let three_days = Duration::from_secs(3 * 86_400);
    wait_max_age(&js, &stream, three_days, Duration::from_secs(90)).await?;
    let log = kubectl(&["-n", OPERATOR_NAMESPACE, "logs", &next, "--tail=200"]).await?;
    assert!(
        log.contains("\"level\""),
        "the operator's log is not JSON: {log}"
    );

    api.delete("orders", &DeleteParams::default()).await?;
    ns.delete().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the real node: make integration-real-node"]
async fn worker_pods_lose_no_order_through_kills_a_hang_and_a_rolling_update() -> anyhow::Result<()>
{
    let client = kube_client().await?;
    install_operator(&client).await?;
    let ns = TestNamespace::create(&client, "rn-work").await?;
    let stream = format!("RNW{}", random_suffix().to_uppercase());
    let api: Api<OrderPipeline> = Api::namespaced(client.clone(), &ns.name);
    api.create(&PostParams::default(), &pipeline(&stream, 3)?)
        .await?;
    wait_ready(&api, Duration::from_secs(120)).await?;
    let first = ready_workers(&client, &ns.name, 3).await?;

    // Orders at a steady rate from the host, in batches until the faults are over.
    let js = host_js().await?;
    let opts = PublishOptions {
        subject: format!("{stream}.created"),
        count: 200,
        rate: 100.0,
        invalid_ratio: 0.05,
        duplicate_ratio: 0.01,
        prefix: String::new(),
        window: 64,
        ack_timeout: Duration::from_secs(3),
        progress: false,
        poison: 0,
    };
    let stop = tokio_util::sync::CancellationToken::new();
    let publisher = {
        let (js, stop, run) = (js.clone(), stop.clone(), random_suffix());
        tokio::spawn(async move {
            let mut reports = Vec::new();
            for batch in 0.. {
                if stop.is_cancelled() {
                    break;
                }
                let o = PublishOptions {
                    prefix: format!("rn{run}b{batch}-"),
                    ..opts.clone()
                };
                reports.push(ctl::publish_orders(&js, &o).await?);
            }
            anyhow::Ok(reports)
        })
    };

    // 1. A Pod force-deleted (no grace): its orders in flight come back after ackWait.
    let victim = name_of(&first[0]);
    kubectl(&[
        "-n",
        &ns.name,
        "delete",
        "pod",
        &victim,
        "--grace-period=0",
        "--force",
    ])
    .await?;
    // 2. A container's process killed (a crash): the kubelet restarts it.
    let crashed = first[1].clone();
    let pid = container_pid(&crashed).await?;
    nix_kill(pid, "KILL")?;
    // 3. A container's process frozen (a hang): the liveness probe fails and the
    //    kubelet restarts it.
    let hung = first[2].clone();
    let pid = container_pid(&hung).await?;
    nix_kill(pid, "STOP")?;
    for (p, what) in [(&crashed, "killed"), (&hung, "frozen")] {
        let before = restarts(p);
        let name = name_of(p);
        let pods_api: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
        wait_for(
            &format!("the {what} container of {name} restarted"),
            Duration::from_secs(120),
            || async {
                let p = pods_api.get(&name).await?;
                Ok((restarts(&p) > before && is_ready(&p)).then_some(()))
            },
        )
        .await?;
    }
    // 4. A rolling update during traffic (a new pool size is a new Pod template).
    let patch = serde_json::json!({"spec": {"workers": {"poolSize": 20}}});
    api.patch("orders", &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    kubectl(&[
        "-n",
        &ns.name,
        "rollout",
        "status",
        "deployment/orders-workers",
        "--timeout=180s",
    ])
    .await?;
    // kubectl logs of a new worker: JSON lines that lead to their trace (an
    // order rejected after the rollout logs one).
    let now = ready_workers(&client, &ns.name, 3).await?;
    let pod = name_of(&now[0]);
    wait_for(
        "a JSON log line with a trace_id from a new worker",
        Duration::from_secs(60),
        || async {
            let log = kubectl(&["-n", &ns.name, "logs", &pod, "--tail=1000"]).await?;
            Ok(log
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .find(|v| v.get("trace_id").is_some()))
        },
    )
    .await?;
    stop.cancel();
    let reports = publisher.await??;
    let valid: Vec<String> = reports.iter().flat_map(|r| r.valid_ids.clone()).collect();
    let invalid: Vec<String> = reports.iter().flat_map(|r| r.invalid_ids.clone()).collect();

    wait_for("the consumer drained", Duration::from_secs(180), || async {
        let s = js.get_stream(&stream).await?;
        let c = s.consumer_info("order-workers").await?;
        Ok((c.num_pending == 0 && c.num_ack_pending == 0).then_some(()))
    })
    .await?;
    let audit = Audit::collect(&js, &stream, &format!("{stream}_DLQ"), "order-workers").await?;
    let s = audit.summary();
    eprintln!(
        "real node: published {} processed {} rejected {} dead-lettered {} lost {} two outcomes {}",
        s.published, s.processed, s.rejected, s.dead_lettered, s.lost, s.two_outcomes
    );
    audit.assert_exactly_once(&valid, &invalid)?;
    assert_eq!(
        audit.dead_letter_count(),
        0,
        "dead letters without a poison message"
    );

    api.delete("orders", &DeleteParams::default()).await?;
    ns.delete().await
}

/// Sends a signal to a host process (the container's, seen from the host).
fn nix_kill(pid: u32, signal: &str) -> anyhow::Result<()> {
    let st = std::process::Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()?;
    anyhow::ensure!(st.success(), "kill -{signal} {pid} failed");
    Ok(())
}
