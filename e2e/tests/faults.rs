//! The fault suite: the blog's promise ("no order lost when services crash or the
//! network fails") on real components, with the worker's shipped defaults
//! (`MAX_DELIVERIES` 5) and a stream duplicate window (5 s) shorter than every run,
//! so a second outcome that relied on deduplication would show. Each scenario runs
//! orders through real worker processes while something breaks, then checks
//! exactly-once effects (`Audit::violations` and more): every stored input has
//! exactly one current outcome (one OrderProcessed per valid order, one
//! OrderRejected per invalid one, one dead letter per poison message, nothing
//! else); no outcome or dead letter without its input; nothing pending; the
//! downstream charged only processed orders, once each, and was never called
//! after the order's outcome was stored. Each prints one line, with the valid
//! orders dead-lettered because their attempts ran out (0 where nothing failed).
//!
//! `make test` runs short versions; `make test-faults` (ORDERPIPE_FAULTS=long)
//! the long ones (50k orders for the SIGKILL run).

use std::io::Write as _;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream;
use orderpipeline_common::topology::Topology;
use orderpipeline_ctl::audit::Audit;
use orderpipeline_ctl::{self as ctl, PublishOptions, PublishReport};
use orderpipeline_e2e::pipeline::{
    DownstreamStub, StubBehaviour, WorkerProcess, binary, wait_dlq_empty,
};
use orderpipeline_e2e::proxy::Proxy;
use orderpipeline_e2e::{NatsCluster, NatsServer, random_suffix, wait_for};
use orderpipeline_proto::Message as _;

fn long() -> bool {
    std::env::var("ORDERPIPE_FAULTS").is_ok_and(|v| v == "long")
}

fn orders(short: u64, long_n: u64) -> u64 {
    if long() { long_n } else { short }
}

fn opts(prefix: &str, count: u64) -> PublishOptions {
    PublishOptions {
        subject: "ORDER.created".into(),
        count,
        rate: 0.0,
        invalid_ratio: 0.05,
        duplicate_ratio: 0.01,
        prefix: prefix.into(),
        window: 256,
        ack_timeout: Duration::from_secs(3),
        progress: false,
        poison: 0,
    }
}

/// The worker's environment: the shipped defaults for deliveries and NAK delays
/// (5 deliveries over 1 s, 2 s, 4 s, 8 s), so an outage shorter than that does not
/// exhaust an order's attempts here any more than in production.
fn worker_env(url: &str, extra: &[(&'static str, String)]) -> Vec<(&'static str, String)> {
    let mut env = vec![
        ("NATS_URL", url.to_string()),
        ("WORKER_POOL_SIZE", "20".to_string()),
        ("RETRY_INITIAL_BACKOFF", "20ms".to_string()),
        ("RETRY_MAX_BACKOFF", "200ms".to_string()),
        ("SHUTDOWN_GRACE", "2s".to_string()),
    ];
    for (k, v) in extra {
        env.retain(|(e, _)| e != k);
        env.push((k, v.clone()));
    }
    env
}

/// A private single nats-server with the pipeline's topology.
async fn single_server() -> anyhow::Result<(NatsServer, jetstream::Context)> {
    let server = NatsServer::start().await?;
    let js = jetstream::new(async_nats::connect(server.url()).await?);
    topology(&js, 1).await?;
    Ok((server, js))
}

/// The stream's duplicate window in every scenario: shorter than each run.
const WINDOW: Duration = Duration::from_secs(5);

async fn topology(js: &jetstream::Context, replicas: usize) -> anyhow::Result<()> {
    Topology {
        ack_wait: Duration::from_secs(3),
        replicas,
        duplicate_window: WINDOW,
        ..Topology::default()
    }
    .ensure(js)
    .await?;
    Ok(())
}

async fn drained(js: &jetstream::Context, within: Duration) -> anyhow::Result<()> {
    let (stream, consumer) = ("ORDERS", "order-workers");
    orderpipeline_e2e::pipeline::wait_drained(js, stream, consumer, "ORDER.created", within).await
}

/// Waits until the input stream holds at least `n` orders: "mid-run".
async fn stored(js: &jetstream::Context, n: u64) -> anyhow::Result<()> {
    orderpipeline_e2e::pipeline::wait_stream_holds(js, "ORDERS", n, Duration::from_secs(60)).await
}

/// Reads every outcome back, retrying while a recovering cluster times out.
async fn audit(js: &jetstream::Context) -> anyhow::Result<Audit> {
    wait_for(
        "the audit to read the streams",
        Duration::from_secs(90),
        || async {
            Ok(Some(
                Audit::collect(js, "ORDERS", "ORDERS_DLQ", "order-workers").await?,
            ))
        },
    )
    .await
}

/// Keeps a fault in place for `d` (the fault's length, not synchronisation).
async fn hold_fault(d: Duration) {
    tokio::time::sleep(d).await;
}

/// Checks exactly-once and prints the scenario's line; no valid order may end
/// dead-lettered (nothing failed for long enough).
fn report(
    name: &str,
    audit: &Audit,
    published: &[&PublishReport],
    poison: usize,
    stub: Option<&DownstreamStub>,
    started: Instant,
) -> anyhow::Result<()> {
    report_with(name, audit, published, poison, stub, started, false)
}

/// `report` for a scenario whose downstream keeps failing: a valid order may end
/// dead-lettered because its attempts ran out (its one outcome; `orderctl dlq
/// replay` completes it), and may have been charged by a call whose answer was
/// lost (the known limit in docs/src/durability.md).
fn report_with(
    name: &str,
    audit: &Audit,
    published: &[&PublishReport],
    poison: usize,
    stub: Option<&DownstreamStub>,
    started: Instant,
    exhausted_ok: bool,
) -> anyhow::Result<()> {
    let valid: Vec<String> = published
        .iter()
        .flat_map(|r| r.valid_ids.iter().cloned())
        .collect();
    let invalid: Vec<String> = published
        .iter()
        .flat_map(|r| r.invalid_ids.iter().cloned())
        .collect();
    let s = audit.summary();
    let (calls, charges) = stub
        .map(|d| (d.total_calls(), d.effective_charges()))
        .unwrap_or((0, 0));
    let line = format!(
        "fault {name}: published {} processed {} rejected {} dead-lettered {} (attempts exhausted {}) duplicates suppressed {} lost {} two outcomes {} downstream calls {calls} effective charges {charges} wall {:.1}s\n",
        s.published,
        s.processed,
        s.rejected,
        s.dead_lettered,
        s.attempts_exhausted,
        s.duplicates_suppressed,
        s.lost,
        s.two_outcomes,
        started.elapsed().as_secs_f64()
    );
    // Written to stderr directly so the line shows in `make test` output.
    let _ = std::io::stderr().write_all(line.as_bytes());
    let exhausted: std::collections::HashSet<String> = audit
        .dead_letters
        .values()
        .flatten()
        .filter(|d| d.error_class() == orderpipeline_proto::ErrorClass::AttemptsExhausted)
        .map(|d| d.order_id.clone())
        .collect();
    anyhow::ensure!(
        exhausted_ok || exhausted.is_empty(),
        "{} valid orders dead-lettered as attempts exhausted",
        exhausted.len()
    );
    let processed: Vec<String> = valid
        .iter()
        .filter(|id| !exhausted.contains(*id))
        .cloned()
        .collect();
    audit.assert_exactly_once(&processed, &invalid)?;
    anyhow::ensure!(
        audit.dead_letter_count() == poison + exhausted.len(),
        "dead letters {} != poison {poison} + attempts exhausted {}",
        audit.dead_letter_count(),
        exhausted.len()
    );
    if let Some(d) = stub {
        for id in &processed {
            anyhow::ensure!(d.charged(id), "order {id} processed but never charged");
        }
        anyhow::ensure!(
            (processed.len()..=valid.len()).contains(&charges),
            "effective charges {charges} for {} processed orders ({} dead-lettered)",
            processed.len(),
            exhausted.len()
        );
        check_downstream(audit, d, &exhausted)?;
    }
    Ok(())
}

/// The downstream charged only orders whose outcome is processed, and no call
/// arrived after the order's outcome was stored (a delivery reads the outcome
/// before it calls).
fn check_downstream(
    audit: &Audit,
    d: &DownstreamStub,
    exhausted: &std::collections::HashSet<String>,
) -> anyhow::Result<()> {
    use orderpipeline_common::names::{OutcomeKind, order_key};
    let exhausted_keys: std::collections::HashSet<String> =
        exhausted.iter().filter_map(|id| order_key(id)).collect();
    for key in d.charged_keys() {
        if exhausted_keys.contains(&key) {
            continue;
        }
        let last = audit.chains.get(&key).and_then(|c| c.last());
        anyhow::ensure!(
            last.is_some_and(|o| o.outcome_kind() == OutcomeKind::Processed),
            "the downstream charged order key {key} whose outcome is {:?}",
            last.map(|o| o.outcome_kind())
        );
        if let (Some(o), Some(call)) = (last, d.last_call(&key)) {
            // The first outcome of the chain is the one no call may follow.
            let first = audit.chains[&key][0].stored_at;
            anyhow::ensure!(
                call <= first || o.replay_of.is_some(),
                "a downstream call for {key} arrived {:?} after its outcome was stored",
                call.duration_since(first).unwrap_or_default()
            );
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_1_sigkill_a_random_worker_every_few_seconds() -> anyhow::Result<()> {
    let started = Instant::now();
    let (server, js) = single_server().await?;
    let stub = DownstreamStub::start(StubBehaviour::default()).await?;
    let env = worker_env(&server.url(), &[("DOWNSTREAM_URL", stub.url.clone())]);
    let bin = binary("order-worker")?;
    let mut workers = ready_workers(&bin, &env, 3).await?;
    let count = orders(3_000, 50_000);
    let mut o = opts(&format!("k{}", random_suffix()), count);
    o.rate = if long() { 2_000.0 } else { 1_000.0 };
    let publisher = {
        let js = js.clone();
        tokio::spawn(async move { ctl::publish_orders(&js, &o).await })
    };
    let every = Duration::from_secs(if long() { 3 } else { 1 });
    let mut kills = 0;
    while !publisher.is_finished() {
        hold_fault(every).await;
        kill_one_at_random(&mut workers, &bin, &env).await?;
        kills += 1;
    }
    let r = publisher.await??;
    drained(&js, Duration::from_secs(300)).await?;
    anyhow::ensure!(
        kills >= 2,
        "the run was too short to kill workers ({kills})"
    );
    let audit = audit(&js).await?;
    report(
        &format!("sigkill-workers ({kills} kills)"),
        &audit,
        &[&r],
        0,
        Some(&stub),
        started,
    )
}

fn rand_index() -> u32 {
    let n = Instant::now().elapsed().subsec_nanos() ^ std::process::id();
    n.wrapping_mul(2_654_435_761)
}

/// `n` workers of `bin` with `env`, each Ready.
async fn ready_workers(
    bin: &std::path::Path,
    env: &[(&'static str, String)],
    n: usize,
) -> anyhow::Result<Vec<WorkerProcess>> {
    let mut workers = Vec::new();
    for _ in 0..n {
        let w = WorkerProcess::spawn(bin, env).await?;
        w.wait_ready().await?;
        workers.push(w);
    }
    Ok(workers)
}

/// SIGKILLs one of `workers` at random and starts another in its place.
async fn kill_one_at_random(
    workers: &mut [WorkerProcess],
    bin: &std::path::Path,
    env: &[(&'static str, String)],
) -> anyhow::Result<()> {
    let i = (rand_index() as usize) % workers.len();
    workers[i].kill().await?;
    workers[i] = WorkerProcess::spawn(bin, env).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_2_restart_nats_server_mid_run() -> anyhow::Result<()> {
    let started = Instant::now();
    let mut server = NatsServer::start().await?;
    let js = jetstream::new(async_nats::connect(server.url()).await?);
    topology(&js, 1).await?;
    let env = worker_env(&server.url(), &[]);
    let bin = binary("order-worker")?;
    let w1 = WorkerProcess::spawn(&bin, &env).await?;
    let w2 = WorkerProcess::spawn(&bin, &env).await?;
    w1.wait_ready().await?;
    w2.wait_ready().await?;
    let mut o = opts(&format!("n{}", random_suffix()), orders(4_000, 20_000));
    o.rate = 2_000.0;
    let publisher = {
        let js = js.clone();
        tokio::spawn(async move { ctl::publish_orders(&js, &o).await })
    };
    stored(&js, 1_000).await?;
    server.restart().await?;
    let r = publisher.await??;
    drained(&js, Duration::from_secs(180)).await?;
    let audit = audit(&js).await?;
    report("restart-nats", &audit, &[&r], 0, None, started)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_3_kill_restart_and_isolate_a_node_of_a_3_node_cluster() -> anyhow::Result<()> {
    let started = Instant::now();
    // Node 2's routes run through loopback proxies, so they can be cut alone.
    let (mut cluster, routes) = NatsCluster::start_partitionable(3, Some(2)).await?;
    let js = jetstream::new(NatsCluster::connect_urls(&cluster.url()).await?);
    wait_for("an R3 topology", Duration::from_secs(30), || async {
        Ok(topology(&js, 3).await.ok())
    })
    .await?;
    let bin = binary("order-worker")?;
    // Workers on different nodes: clients keep using every node.
    let mut workers = Vec::new();
    for node in &cluster.nodes {
        let w = WorkerProcess::spawn(
            &bin,
            &worker_env(&format!("{},{}", node.url(), cluster.url()), &[]),
        )
        .await?;
        w.wait_ready().await?;
        workers.push(w);
    }
    let mut o = opts(&format!("c{}", random_suffix()), orders(3_000, 20_000));
    o.rate = 1_500.0;
    let publisher = {
        let js = js.clone();
        tokio::spawn(async move { ctl::publish_orders(&js, &o).await })
    };
    stored(&js, 500).await?;
    cluster.nodes[2].kill().await?;
    hold_fault(Duration::from_secs(2)).await;
    cluster.nodes[2].start_again().await?;
    let r = publisher.await??;

    // Isolate node 2 from the other two (its cluster routes cut) while its
    // clients stay connected to it and orders keep coming; then heal.
    let mut o2 = opts(&format!("i{}", random_suffix()), orders(3_000, 20_000));
    o2.rate = 1_500.0;
    let publisher = {
        let js = js.clone();
        tokio::spawn(async move { ctl::publish_orders(&js, &o2).await })
    };
    stored(&js, r.valid + r.invalid + 500).await?;
    for p in &routes {
        p.cut();
    }
    let isolated_at = Instant::now();
    let routez = format!(
        "{}/routez",
        cluster.nodes[2].monitor_url().context("monitor")?
    );
    wait_for(
        "node 2 to have no routes",
        Duration::from_secs(10),
        || async {
            let Some((200, body)) = orderpipeline_e2e::pipeline::http_get(&routez).await else {
                return Ok(None);
            };
            let v: serde_json::Value = serde_json::from_str(&body)?;
            Ok((v["num_routes"] == 0).then_some(()))
        },
    )
    .await?;
    hold_fault(
        Duration::from_secs(if long() { 10 } else { 5 }).saturating_sub(isolated_at.elapsed()),
    )
    .await;
    for p in &routes {
        p.heal();
    }
    let r2 = publisher.await??;
    drained(&js, Duration::from_secs(180)).await?;
    // Judge only a settled cluster: every replica of the stream current again.
    wait_for(
        "all stream replicas current",
        Duration::from_secs(60),
        || async {
            let mut st = js.get_stream("ORDERS").await?;
            let info = st.info().await?;
            let cluster = info.cluster.clone().unwrap_or_default();
            let ok = cluster.leader.is_some()
                && cluster.replicas.len() == 2
                && cluster.replicas.iter().all(|p| p.current && !p.offline);
            Ok(ok.then_some(()))
        },
    )
    .await?;
    let audit = audit(&js).await?;
    let replicas = wait_for("the stream's info", Duration::from_secs(60), || async {
        Ok(Some(
            js.get_stream("ORDERS")
                .await?
                .info()
                .await?
                .config
                .num_replicas,
        ))
    })
    .await?;
    anyhow::ensure!(replicas == 3, "R3 stream");
    report(
        "cluster-node-kill-and-isolation",
        &audit,
        &[&r, &r2],
        0,
        None,
        started,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_4_cut_workers_then_the_producer_from_nats() -> anyhow::Result<()> {
    let started = Instant::now();
    let server = NatsServer::start().await?;
    let admin = jetstream::new(async_nats::connect(server.url()).await?);
    topology(&admin, 1).await?;
    let workers_link = Proxy::start(server.port).await?;
    let producer_link = Proxy::start(server.port).await?;
    let bin = binary("order-worker")?;
    let env = worker_env(&workers_link.url(), &[]);
    let w1 = WorkerProcess::spawn(&bin, &env).await?;
    let w2 = WorkerProcess::spawn(&bin, &env).await?;
    w1.wait_ready().await?;
    w2.wait_ready().await?;
    let producer = jetstream::new(
        async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect(producer_link.url())
            .await?,
    );
    let cut = Duration::from_secs(if long() { 10 } else { 4 });

    // Workers cut off while orders keep arriving.
    let mut o1 = opts(&format!("w{}", random_suffix()), orders(2_000, 10_000));
    o1.rate = 500.0;
    let p1 = {
        let js = producer.clone();
        tokio::spawn(async move { ctl::publish_orders(&js, &o1).await })
    };
    stored(&admin, 300).await?;
    workers_link.cut();
    hold_fault(cut).await;
    workers_link.heal();
    let r1 = p1.await??;

    // The producer cut off mid-publish: it retries with the same ids.
    let mut o2 = opts(&format!("p{}", random_suffix()), orders(2_000, 10_000));
    o2.rate = 500.0;
    let p2 = {
        let js = producer.clone();
        tokio::spawn(async move { ctl::publish_orders(&js, &o2).await })
    };
    stored(&admin, r1.valid + r1.invalid + 300).await?;
    producer_link.cut();
    hold_fault(cut).await;
    producer_link.heal();
    let r2 = p2.await??;
    anyhow::ensure!(
        r2.retries > 0,
        "the producer saw the cut (retries {})",
        r2.retries
    );
    drained(&admin, Duration::from_secs(180)).await?;
    let audit = audit(&admin).await?;
    report(
        &format!("network-cut ({}s each)", cut.as_secs()),
        &audit,
        &[&r1, &r2],
        0,
        None,
        started,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_5_downstream_flaps_with_503s_and_timeouts() -> anyhow::Result<()> {
    let started = Instant::now();
    let (server, js) = single_server().await?;
    let stub = DownstreamStub::start(StubBehaviour {
        flap_period: Some(Duration::from_millis(700)),
        stall: Duration::from_millis(1500),
        ..Default::default()
    })
    .await?;
    let env = worker_env(
        &server.url(),
        &[
            ("DOWNSTREAM_URL", stub.url.clone()),
            ("DOWNSTREAM_TIMEOUT", "500ms".into()),
            ("RETRY_ATTEMPTS", "3".into()),
        ],
    );
    let bin = binary("order-worker")?;
    let w = WorkerProcess::spawn(&bin, &env).await?;
    w.wait_ready().await?;
    let mut o = opts(&format!("f{}", random_suffix()), orders(1_000, 10_000));
    o.rate = 400.0;
    let r = ctl::publish_orders(&js, &o).await?;
    drained(&js, Duration::from_secs(180)).await?;
    let audit = audit(&js).await?;
    anyhow::ensure!(stub.total_calls() > r.valid, "the flapping forced retries");
    report_with(
        "downstream-flapping",
        &audit,
        &[&r],
        0,
        Some(&stub),
        started,
        true,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_7_poison_interleaved_with_valid_orders() -> anyhow::Result<()> {
    let started = Instant::now();
    let (server, js) = single_server().await?;
    let env = worker_env(&server.url(), &[("MAX_PAYLOAD_BYTES", "8192".into())]);
    let w = WorkerProcess::spawn(&binary("order-worker")?, &env).await?;
    w.wait_ready().await?;
    let batches = orders(10, 100);
    let mut reports = Vec::new();
    let mut poison = 0;
    let good = ctl::valid_order("t", 1).encode_to_vec();
    for b in 0..batches {
        reports
            .push(ctl::publish_orders(&js, &opts(&format!("v{b}{}", random_suffix()), 100)).await?);
        for (i, payload) in [
            (
                0,
                (0..64)
                    .map(|x| (x * 37 + b) as u8 ^ 0xa5)
                    .collect::<Vec<u8>>(),
            ),
            (1, good[..good.len() / 2].to_vec()),
            (2, ctl::valid_order(&"x".repeat(9000), b).encode_to_vec()),
        ] {
            let mut h = async_nats::HeaderMap::new();
            h.insert(
                "Nats-Msg-Id",
                format!("poison-{b}-{i}-{}", random_suffix()).as_str(),
            );
            js.publish_with_headers("ORDER.created", h, payload.into())
                .await?
                .await?;
            poison += 1;
        }
    }
    drained(&js, Duration::from_secs(120)).await?;
    let audit = audit(&js).await?;
    for letters in audit.dead_letters.values() {
        anyhow::ensure!(
            !letters[0].error_message.is_empty(),
            "every dead letter has a reason"
        );
    }
    let refs: Vec<&PublishReport> = reports.iter().collect();
    report("poison-interleaved", &audit, &refs, poison, None, started)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_8_the_same_order_published_twice_has_one_effect() -> anyhow::Result<()> {
    let started = Instant::now();
    let (server, js) = single_server().await?;
    let stub = DownstreamStub::start(StubBehaviour::default()).await?;
    let w = WorkerProcess::spawn(
        &binary("order-worker")?,
        &worker_env(&server.url(), &[("DOWNSTREAM_URL", stub.url.clone())]),
    )
    .await?;
    w.wait_ready().await?;
    let mut o = opts(&format!("d{}", random_suffix()), orders(500, 5_000));
    o.duplicate_ratio = 0.2; // same Nats-Msg-Id: dropped by the stream
    let r = ctl::publish_orders(&js, &o).await?;
    anyhow::ensure!(
        r.duplicates_acked == r.duplicates_sent,
        "the stream reported every same-id publish as duplicate"
    );
    // Again under a different Nats-Msg-Id: stored, then acked as duplicate by the worker.
    for (n, id) in r.valid_ids.iter().take(50).enumerate() {
        let mut h = async_nats::HeaderMap::new();
        h.insert("Nats-Msg-Id", format!("{id}-again").as_str());
        let idx: u64 = id
            .rsplit('-')
            .next()
            .unwrap_or("0")
            .parse()
            .unwrap_or(n as u64);
        js.publish_with_headers(
            "ORDER.created",
            h,
            ctl::valid_order(id, idx).encode_to_vec().into(),
        )
        .await?
        .await?;
    }
    drained(&js, Duration::from_secs(60)).await?;
    let audit = audit(&js).await?;
    let s = audit.summary();
    anyhow::ensure!(
        s.duplicates_suppressed == 50,
        "50 re-published orders suppressed, got {}",
        s.duplicates_suppressed
    );
    for id in r.valid_ids.iter().take(50) {
        anyhow::ensure!(stub.calls_for(id) == 1, "{id}: one downstream call");
    }
    report(
        "duplicate-publishes",
        &audit,
        &[&r],
        0,
        Some(&stub),
        started,
    )
    .context("exactly once")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_6_operator_killed_during_reconcile_and_scaling() -> anyhow::Result<()> {
    use k8s_openapi::api::apps::v1::Deployment;
    use kube::Api;
    use kube::api::PostParams;
    use order_operator::crd::OrderPipeline;
    use orderpipeline_e2e::operator::{
        OperatorProcess, install_crd_and_rbac, repo_root, service_account_kubeconfig,
    };

    let started = Instant::now();
    install_crd_and_rbac().await?;
    let client = orderpipeline_e2e::kube_client().await?;
    let ns = orderpipeline_e2e::TestNamespace::create(&client, "fault-op").await?;
    let server = NatsServer::start().await?;
    let js = jetstream::new(async_nats::connect(server.url()).await?);
    let _runner = orderpipeline_e2e::podrunner::for_namespace(&client, &ns.name, Vec::new())?;
    let kc = service_account_kubeconfig()?;
    let mut op = OperatorProcess::spawn_named(&ns.name, "1s", &kc, "op-a").await?;

    let text = std::fs::read_to_string(repo_root().join("manifests/samples/orderpipeline.yaml"))?;
    let mut p: OrderPipeline = serde_yaml::from_str(&text)?;
    p.spec.nats.url = server.url();
    p.spec.telemetry.otlp_endpoint = None;
    p.spec.consumer.ack_wait = "3s".into();
    p.spec.workers.min_replicas = Some(1);
    p.spec.workers.max_replicas = Some(4);
    p.spec.workers.scaling.target_lag_per_replica = 300;
    p.spec.workers.scaling.stabilization_window = "3s".into();
    // A downstream that takes 20 ms per call caps one worker (pool 10) at about
    // 500 orders/s, below the 1,500/s published: the lag must grow and scale the
    // workers up, however fast the rest of the worker is.
    let stub = DownstreamStub::start(StubBehaviour {
        delay: Duration::from_millis(20),
        ..Default::default()
    })
    .await?;
    p.spec.workers.downstream_url = Some(stub.url.clone());
    let api: Api<OrderPipeline> = Api::namespaced(client.clone(), &ns.name);
    api.create(&PostParams::default(), &p).await?;
    // Killed during the first reconcile.
    op.kill().await?;
    op = OperatorProcess::spawn_named(&ns.name, "1s", &kc, "op-b").await?;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    wait_for(
        "the Deployment after the restart",
        Duration::from_secs(30),
        || async { Ok(deployments.get_opt("orders-workers").await?.map(|_| ())) },
    )
    .await
    .with_context(|| format!("operator log:\n{}", op.log_text()))?;
    stored_or_created(&js).await?;

    let mut o = opts(&format!("o{}", random_suffix()), orders(3_000, 20_000));
    o.rate = 1_500.0;
    let publisher = {
        let js = js.clone();
        tokio::spawn(async move { ctl::publish_orders(&js, &o).await })
    };
    // Killed during scaling: once it has scaled up, kill and restart it.
    wait_for("a scale-up", Duration::from_secs(60), || async {
        let d = deployments.get("orders-workers").await?;
        Ok((d.spec.and_then(|s| s.replicas).unwrap_or(0) > 1).then_some(()))
    })
    .await
    .with_context(|| {
        format!(
            "operator log (last 3000 bytes):\n{}",
            op.log_text()
                .chars()
                .rev()
                .take(3000)
                .collect::<String>()
                .chars()
                .rev()
                .collect::<String>()
        )
    })?;
    op.kill().await?;
    if long() {
        // The API server restarts too (this environment is the fault run's own).
        let env_dir = std::env::var("ORDERPIPE_ENV_DIR").context("ORDERPIPE_ENV_DIR")?;
        let out = tokio::process::Command::new(repo_root().join("hack/env"))
            .args(["restart", "kube-apiserver"])
            .env("ORDERPIPE_ENV_DIR", env_dir)
            .output()
            .await?;
        anyhow::ensure!(
            out.status.success(),
            "restarting kube-apiserver: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let _op = OperatorProcess::spawn_named(&ns.name, "1s", &kc, "op-c").await?;
    let r = publisher.await??;
    drained(&js, Duration::from_secs(180)).await?;
    wait_for(
        "scaled back to 1 after the window",
        Duration::from_secs(60),
        || async {
            let d = deployments.get("orders-workers").await?;
            Ok((d.spec.and_then(|s| s.replicas) == Some(1)).then_some(()))
        },
    )
    .await?;
    let audit = audit(&js).await?;
    let name = if long() {
        "operator-and-apiserver-restarts"
    } else {
        "operator-kills"
    };
    report(name, &audit, &[&r], 0, Some(&stub), started)?;
    let _ = std::fs::remove_file(&kc);
    ns.delete().await
}

/// Waits until the operator has created the input stream.
async fn stored_or_created(js: &jetstream::Context) -> anyhow::Result<()> {
    wait_for("the stream to exist", Duration::from_secs(30), || async {
        Ok(js.get_stream("ORDERS").await.ok().map(|_| ()))
    })
    .await
}

/// Reads `total_connections` from the server's `/varz`.
async fn total_connections(server: &NatsServer) -> anyhow::Result<u64> {
    let url = server
        .monitor_url()
        .context("a server with a monitoring port")?;
    let (code, body) = orderpipeline_e2e::pipeline::http_get(&format!("{url}/varz"))
        .await
        .context("GET /varz")?;
    anyhow::ensure!(code == 200, "/varz answered {code}");
    let v: serde_json::Value = serde_json::from_str(&body)?;
    v["total_connections"].as_u64().context("total_connections")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_9_a_5000_byte_order_id_among_normal_orders_disturbs_no_connection()
-> anyhow::Result<()> {
    let started = Instant::now();
    let server = NatsServer::start_with_config("").await?;
    let js = jetstream::new(async_nats::connect(server.url()).await?);
    topology(&js, 1).await?;
    let w = WorkerProcess::spawn(&binary("order-worker")?, &worker_env(&server.url(), &[])).await?;
    w.wait_ready().await?;
    let before = total_connections(&server).await?;
    let mut o = opts(&format!("l{}", random_suffix()), orders(500, 5_000));
    o.rate = 500.0;
    let publisher = {
        let js = js.clone();
        tokio::spawn(async move { ctl::publish_orders(&js, &o).await })
    };
    let long_id = format!("{}{}", random_suffix(), "L".repeat(5_000));
    let mut h = async_nats::HeaderMap::new();
    h.insert("Nats-Msg-Id", format!("long-{}", random_suffix()).as_str());
    js.publish_with_headers(
        "ORDER.created",
        h,
        ctl::valid_order(&long_id, 1).encode_to_vec().into(),
    )
    .await?
    .await?;
    let mut r = publisher.await??;
    drained(&js, Duration::from_secs(120)).await?;
    anyhow::ensure!(
        total_connections(&server).await? == before,
        "a connection was opened again: the long id knocked a client off NATS (before {before})"
    );
    let audit = audit(&js).await?;
    let rejected = audit
        .chains
        .values()
        .flatten()
        .find(|o| o.order_id == long_id)
        .context("the long id's outcome")?;
    anyhow::ensure!(
        rejected.outcome_kind() == orderpipeline_common::names::OutcomeKind::Rejected,
        "the 5000-byte id is rejected, not {:?}",
        rejected.outcome_kind()
    );
    r.invalid_ids.push(long_id);
    report("long-order-id", &audit, &[&r], 0, None, started)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_10_a_consumer_deleted_while_the_stream_holds_poison_and_rejected_inputs()
-> anyhow::Result<()> {
    let started = Instant::now();
    let (server, js) = single_server().await?;
    let w = WorkerProcess::spawn(&binary("order-worker")?, &worker_env(&server.url(), &[])).await?;
    w.wait_ready().await?;
    let r = ctl::publish_orders(
        &js,
        &opts(&format!("c{}", random_suffix()), orders(500, 5_000)),
    )
    .await?;
    for i in 0..5 {
        let mut h = async_nats::HeaderMap::new();
        h.insert(
            "Nats-Msg-Id",
            format!("poison-{i}-{}", random_suffix()).as_str(),
        );
        js.publish_with_headers("ORDER.created", h, vec![0xff, 0xfe, i].into())
            .await?
            .await?;
    }
    drained(&js, Duration::from_secs(60)).await?;
    // Deleted and recreated: the new consumer (DeliverPolicy::All) hands the
    // worker every input again; each finds its outcome.
    js.get_stream("ORDERS")
        .await?
        .delete_consumer("order-workers")
        .await?;
    topology(&js, 1).await?;
    wait_for(
        "every input delivered again",
        Duration::from_secs(60),
        || async {
            let c = js
                .get_stream("ORDERS")
                .await?
                .consumer_info("order-workers")
                .await?;
            Ok(
                (c.delivered.stream_sequence > 0 && c.num_pending == 0 && c.num_ack_pending == 0)
                    .then_some(()),
            )
        },
    )
    .await?;
    let audit = audit(&js).await?;
    report("consumer-recreated", &audit, &[&r], 5, None, started)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_11_a_pause_longer_than_the_duplicate_window() -> anyhow::Result<()> {
    let started = Instant::now();
    let (server, js) = single_server().await?;
    let stub = DownstreamStub::start(StubBehaviour {
        delay: Duration::from_millis(200),
        ..Default::default()
    })
    .await?;
    let env = worker_env(&server.url(), &[("DOWNSTREAM_URL", stub.url.clone())]);
    let bin = binary("order-worker")?;
    let mut w = WorkerProcess::spawn(&bin, &env).await?;
    w.wait_ready().await?;
    let r = ctl::publish_orders(
        &js,
        &opts(&format!("p{}", random_suffix()), orders(300, 3_000)),
    )
    .await?;
    // Killed with calls in flight, then nothing runs for longer than the window.
    wait_for("calls in flight", Duration::from_secs(20), || async {
        Ok((stub.total_calls() >= 5).then_some(()))
    })
    .await?;
    w.kill().await?;
    hold_fault(WINDOW + Duration::from_secs(2)).await;
    // The producer re-sends some orders with their own ids: past the window the
    // stream stores them again, as second inputs of the same orders.
    let mut resent = 0;
    for (n, id) in r.valid_ids.iter().take(30).enumerate() {
        let ack = publish_order(&js, id, id, n as u64).await?;
        resent += u64::from(!ack.duplicate);
    }
    anyhow::ensure!(
        resent == 30,
        "past the window every re-send is stored ({resent})"
    );
    let _w2 = WorkerProcess::spawn(&bin, &env).await?;
    drained(&js, Duration::from_secs(120)).await?;
    let audit = audit(&js).await?;
    anyhow::ensure!(
        audit.summary().duplicates_suppressed >= 30,
        "the re-sent orders are duplicates"
    );
    report(
        "pause-past-the-window",
        &audit,
        &[&r],
        0,
        Some(&stub),
        started,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_12_replays_racing_redeliveries_of_the_same_orders() -> anyhow::Result<()> {
    let started = Instant::now();
    let (server, js) = single_server().await?;
    let broken = DownstreamStub::start(StubBehaviour {
        fail_first: u32::MAX,
        ..Default::default()
    })
    .await?;
    let bin = binary("order-worker")?;
    let mut w = WorkerProcess::spawn(
        &bin,
        &worker_env(
            &server.url(),
            &[
                ("DOWNSTREAM_URL", broken.url.clone()),
                ("RETRY_ATTEMPTS", "1".into()),
            ],
        ),
    )
    .await?;
    w.wait_ready().await?;
    let mut o = opts(&format!("x{}", random_suffix()), 40);
    o.invalid_ratio = 0.0;
    o.duplicate_ratio = 0.0;
    let r = ctl::publish_orders(&js, &o).await?;
    drained(&js, Duration::from_secs(120)).await?;
    w.signal("TERM").await?;
    w.wait(Duration::from_secs(30)).await?;
    let letters = ctl::dlq_list(&js, "ORDERS_DLQ", 1000).await?;
    anyhow::ensure!(
        letters.len() == 40,
        "40 dead letters, got {}",
        letters.len()
    );
    // With a healthy downstream: every letter replayed twice while the same
    // orders arrive again as new inputs (another id), all at once.
    let healthy = DownstreamStub::start(StubBehaviour::default()).await?;
    let env = worker_env(&server.url(), &[("DOWNSTREAM_URL", healthy.url.clone())]);
    let _w1 = WorkerProcess::spawn(&bin, &env).await?;
    let _w2 = WorkerProcess::spawn(&bin, &env).await?;
    for (n, l) in letters.iter().enumerate() {
        ctl::dlq_replay(&js, "ORDERS_DLQ", l.dlq_sequence).await?;
        let mut h = async_nats::HeaderMap::new();
        h.insert(
            "Nats-Msg-Id",
            format!("{}-again", l.letter.order_id).as_str(),
        );
        js.publish_with_headers(
            "ORDER.created",
            h,
            ctl::valid_order(&l.letter.order_id, n as u64)
                .encode_to_vec()
                .into(),
        )
        .await?
        .await?;
        // The second replay races the first: the letter may already be gone.
        if let Err(e) = ctl::dlq_replay(&js, "ORDERS_DLQ", l.dlq_sequence).await {
            anyhow::ensure!(e.to_string().contains("already replayed"), "{e:#}");
        }
    }
    drained(&js, Duration::from_secs(120)).await?;
    wait_dlq_empty(&js, "ORDERS_DLQ", Duration::from_secs(30)).await?;
    let audit = audit(&js).await?;
    // The orders were dead-lettered before the replay, which superseded each
    // letter once: one current outcome each, processed.
    audit.assert_exactly_once(&r.valid_ids, &[])?;
    report(
        "replay-racing-redelivery",
        &audit,
        &[&r],
        0,
        Some(&healthy),
        started,
    )
}

/// The worker of the protocol before v2, built from this repository's history
/// by `hack/build-v1-worker` (cached; `make test` builds it first).
fn v1_worker() -> anyhow::Result<std::path::PathBuf> {
    orderpipeline_e2e::pipeline::built_by("build-v1-worker")
}

/// 13: the upgrade from workers of the protocol before v2, under traffic. Real
/// v1 workers (commit fb71e36) are SIGKILLed at random, leaving orders half done
/// (a result published without its final record, a final record without the
/// ack); then every v1 worker is gone before the first v2 worker starts (the
/// `Recreate` rollout the operator uses for this upgrade), the topology becomes
/// v2's, and v2 workers with `LEGACY_STATE_BUCKET` take over, SIGKILLed at random
/// too, while orders keep coming. Every stored input ends with exactly one
/// outcome: its final v1 record or one v2 outcome, never both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_13_upgrade_from_v1_workers_under_traffic() -> anyhow::Result<()> {
    let started = Instant::now();
    let v1 = v1_worker()?;
    let server = NatsServer::start().await?;
    let js = jetstream::new(async_nats::connect(server.url()).await?);
    let v1_env = vec![
        ("NATS_URL", server.url()),
        ("CREATE_TOPOLOGY", "true".to_string()),
        ("WORKER_POOL_SIZE", "20".to_string()),
        ("NAK_INITIAL_DELAY", "1s".to_string()),
        ("NAK_MAX_DELAY", "8s".to_string()),
        ("SHUTDOWN_GRACE", "2s".to_string()),
    ];
    let prefix = format!("u{}", random_suffix());
    // v1's own topology, created by a v1 worker that stops before any order.
    let mut creator = WorkerProcess::spawn(&v1, &v1_env).await?;
    creator.wait_ready().await?;
    creator.kill().await?;
    // A backlog first, so that every v1 worker has its whole pool in flight
    // when it is killed (orders half done at every step), then orders keep
    // coming through the upgrade.
    let backlog =
        ctl::publish_orders(&js, &opts(&format!("{prefix}a"), orders(6_000, 20_000))).await?;
    let mut workers = ready_workers(&v1, &v1_env, 3).await?;
    let mut o = opts(&format!("{prefix}b"), orders(3_000, 20_000));
    o.rate = if long() { 2_000.0 } else { 1_000.0 };
    let publisher = {
        let js = js.clone();
        tokio::spawn(async move { ctl::publish_orders(&js, &o).await })
    };
    // v1 killed at random until it has taken a third of the backlog.
    let third = backlog.valid_ids.len() as u64 / 3;
    let mut kills = 0;
    loop {
        let taken = js
            .get_stream("ORDERS")
            .await?
            .consumer_info("order-workers")
            .await?
            .delivered
            .stream_sequence;
        if taken >= third {
            break;
        }
        hold_fault(Duration::from_millis(150)).await;
        kill_one_at_random(&mut workers, &v1, &v1_env).await?;
        kills += 1;
    }
    // The upgrade: every v1 worker gone (killed mid-work), then v2's topology
    // and v2 workers that honour v1's final records.
    for w in &mut workers {
        w.kill().await?;
    }
    let v1_records = js
        .get_key_value("ORDERS_STATE")
        .await?
        .status()
        .await?
        .values();
    topology(&js, 1).await?;
    let env = worker_env(
        &server.url(),
        &[("LEGACY_STATE_BUCKET", "ORDERS_STATE".into())],
    );
    let bin = binary("order-worker")?;
    let mut workers = ready_workers(&bin, &env, 3).await?;
    while !publisher.is_finished() {
        hold_fault(Duration::from_secs(1)).await;
        kill_one_at_random(&mut workers, &bin, &env).await?;
        kills += 1;
    }
    let r = publisher.await??;
    drained(&js, Duration::from_secs(300)).await?;
    anyhow::ensure!(v1_records > 0, "the v1 workers recorded nothing");
    let (valid, invalid): (Vec<&String>, Vec<&String>) = (
        backlog.valid_ids.iter().chain(&r.valid_ids).collect(),
        backlog.invalid_ids.iter().chain(&r.invalid_ids).collect(),
    );
    let mut audit = audit(&js).await?;
    audit.honour_legacy_records(&js, "ORDERS_STATE").await?;
    let s = audit.summary();
    let line = format!(
        "fault upgrade-from-v1 ({kills} kills): published {} v1 records {v1_records} final before v2 {} processed by v2 {} rejected by v2 {} dead-lettered {} lost {} two outcomes {} wall {:.1}s\n",
        s.published,
        audit.legacy_final.len(),
        s.processed,
        s.rejected,
        s.dead_lettered,
        s.lost,
        s.two_outcomes,
        started.elapsed().as_secs_f64()
    );
    let _ = std::io::stderr().write_all(line.as_bytes());
    let v = audit.violations();
    anyhow::ensure!(v.is_empty(), "{}", v.join("; "));
    // Every order the producer stored has its outcome: before v2, or from v2.
    let by_id: std::collections::HashSet<&str> = audit
        .stored_inputs
        .iter()
        .filter(|i| audit.legacy_final.contains(&i.seq))
        .map(|i| i.order_id.as_str())
        .collect();
    for (ids, by_v2, what) in [
        (valid, &audit.processed, "valid order, processed"),
        (invalid, &audit.rejected, "invalid order, rejected"),
    ] {
        for id in ids {
            let before = by_id.contains(id.as_str());
            anyhow::ensure!(
                by_v2.get(id).copied().unwrap_or(0) + u32::from(before) == 1,
                "{what} by v2 {:?}, final before v2 {before}: {id}",
                by_v2.get(id)
            );
        }
    }
    Ok(())
}

/// 14: weeks of a pipeline's life compressed into seconds (the input stream's
/// `maxAge` 12 s, the duplicate window 1 s), workers SIGKILLed throughout:
/// orders dead-lettered whose markers age out before their letters are
/// replayed; orders stored again past the window whose first copy and outcome
/// age out while the later copy stays, then a consumer recreated that delivers
/// those copies again. A mirror of the input stream with no limits keeps every
/// message the stream ever held: every key's whole chain holds the promise (one
/// final outcome), and the audit of the aged stream finds no violation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_14_weeks_compressed_into_seconds() -> anyhow::Result<()> {
    let started = Instant::now();
    let server = NatsServer::start().await?;
    let js = jetstream::new(async_nats::connect(server.url()).await?);
    aged_topology(&js).await?;
    let suffix = random_suffix();
    // The downstream refuses the `d` orders for good: they are dead-lettered.
    let refusing = DownstreamStub::start(StubBehaviour {
        refuse_prefix: Some(format!("d{suffix}")),
        ..Default::default()
    })
    .await?;
    let bin = binary("order-worker")?;
    let env = worker_env(&server.url(), &[("DOWNSTREAM_URL", refusing.url.clone())]);
    let mut workers = ready_workers(&bin, &env, 3).await?;
    let mut o = opts(&format!("d{suffix}"), orders(20, 100));
    (o.invalid_ratio, o.duplicate_ratio) = (0.0, 0.0);
    let doomed = ctl::publish_orders(&js, &o).await?;
    let mut o = opts(&format!("w{suffix}"), orders(600, 4_000));
    o.rate = if long() { 400.0 } else { 200.0 };
    // No random copies: `opts` re-sends an earlier order under the same id
    // anywhere in the run, up to 10 s after its outcome here, and under the
    // kills such a copy can wait past the outcome's 12 s `maxAge`; a copy
    // delivered after its order's outcome aged out is a new order (the
    // documented bound). The scenario's later copies are the 50 below.
    o.duplicate_ratio = 0.0;
    let kills = killing_workers(&mut workers, &bin, &env, || async {
        let r = ctl::publish_orders(&js, &o).await?;
        drained(&js, Duration::from_secs(120)).await?;
        Ok(r)
    })
    .await?;
    let r = kills.0?;
    // 4 s later the producer sends the last 50 orders again, under other ids,
    // while their outcomes are stored: later copies, each keeping its order's
    // outcome.
    hold_fault(Duration::from_secs(4)).await;
    let copies = &r.valid_ids[r.valid_ids.len() - 50..];
    let first_copy = resend(&js, copies).await?;
    drained(&js, Duration::from_secs(60)).await?;
    // Everything stored before the copies ages out (their first inputs, their
    // outcomes, the dead letters' markers); then a recreated consumer
    // (DeliverPolicy::All) hands the workers the copies again.
    wait_for("the first copies to age out", AGED_MAX_AGE * 3, || async {
        let mut s = js.get_stream("ORDERS").await?;
        Ok((s.info().await?.state.first_sequence >= first_copy).then_some(()))
    })
    .await?;
    js.get_stream("ORDERS")
        .await?
        .delete_consumer("order-workers")
        .await?;
    aged_topology(&js).await?;
    wait_for(
        "the copies delivered again",
        Duration::from_secs(60),
        || async {
            let s = js.get_stream("ORDERS").await?;
            let c = s.consumer_info("order-workers").await?;
            let again = c.delivered.stream_sequence >= first_copy + copies.len() as u64 - 1;
            Ok((again && c.num_pending == 0 && c.num_ack_pending == 0).then_some(()))
        },
    )
    .await?;
    // The downstream is mended; every letter is replayed (its marker is gone)
    // while workers are killed.
    let healthy = DownstreamStub::start(StubBehaviour::default()).await?;
    for w in &mut workers {
        w.kill().await?;
    }
    let env = worker_env(&server.url(), &[("DOWNSTREAM_URL", healthy.url.clone())]);
    let mut workers = ready_workers(&bin, &env, 3).await?;
    let letters = ctl::dlq_list(&js, "ORDERS_DLQ", 10_000).await?;
    anyhow::ensure!(
        letters.len() == doomed.valid_ids.len(),
        "{} letters for {} refused orders",
        letters.len(),
        doomed.valid_ids.len()
    );
    let replays = killing_workers(&mut workers, &bin, &env, || async {
        for l in &letters {
            ctl::dlq_replay(&js, "ORDERS_DLQ", l.dlq_sequence).await?;
        }
        drained(&js, Duration::from_secs(120)).await?;
        wait_dlq_empty(&js, "ORDERS_DLQ", Duration::from_secs(60)).await
    })
    .await?;
    replays.0?;
    let kills = kills.1 + replays.1;

    // The aged stream: no violation.
    let audit = audit(&js).await?;
    let s = audit.summary();
    anyhow::ensure!(
        audit.violations().is_empty(),
        "the aged stream's audit: {:?}",
        audit.violations()
    );
    // The stream's whole life: one final outcome per key, the right one.
    let history = whole_life(&js).await?;
    let two = history.keys_with_two_finals();
    if !two.is_empty() {
        anyhow::bail!(
            "over the stream's whole life, two outcomes: {two:?}; {}",
            two_finals_timeline(&js, &history).await?
        );
    }
    use orderpipeline_common::names::{OutcomeKind, order_key};
    let last = |id: &String| {
        order_key(id)
            .and_then(|k| history.chains.get(&k))
            .and_then(|c| c.last())
            .map(|o| o.outcome_kind())
    };
    for (ids, want) in [
        (&r.valid_ids, OutcomeKind::Processed),
        (&doomed.valid_ids, OutcomeKind::Processed),
        (&r.invalid_ids, OutcomeKind::Rejected),
    ] {
        for id in ids {
            anyhow::ensure!(
                last(id) == Some(want),
                "{id}: {:?}, want {want:?}",
                last(id)
            );
        }
    }
    for id in &doomed.valid_ids {
        anyhow::ensure!(healthy.charged(id), "replayed order {id} never charged");
    }
    for id in copies {
        let chain = order_key(id).and_then(|k| history.chains.get(&k));
        anyhow::ensure!(
            chain.is_some_and(|c| c.iter().any(|o| o.kind == OutcomeKind::Kept)),
            "the copy of {id} kept no outcome (sent after its outcome aged out?): {chain:?}"
        );
    }
    let line = format!(
        "fault weeks-compressed ({kills} kills): published {} later copies {} letters replayed {} keys over the whole life {} archived outcomes {} violations 0 wall {:.1}s\n",
        r.valid_ids.len() + r.invalid_ids.len() + doomed.valid_ids.len(),
        copies.len(),
        letters.len(),
        history.chains.len(),
        s.archived_outcomes,
        started.elapsed().as_secs_f64()
    );
    let _ = std::io::stderr().write_all(line.as_bytes());
    Ok(())
}

/// The input stream's `maxAge` in the weeks-compressed scenario.
const AGED_MAX_AGE: Duration = Duration::from_secs(12);

/// The pipeline's topology with `maxAge` [`AGED_MAX_AGE`] and a 1 s duplicate
/// window, and a mirror of the input stream (`HISTORY`) without limits that
/// keeps every message the input stream ever held.
async fn aged_topology(js: &jetstream::Context) -> anyhow::Result<()> {
    Topology {
        ack_wait: Duration::from_secs(3),
        max_age: AGED_MAX_AGE,
        duplicate_window: Duration::from_secs(1),
        ..Topology::default()
    }
    .ensure(js)
    .await?;
    js.get_or_create_stream(jetstream::stream::Config {
        name: "HISTORY".into(),
        mirror: Some(jetstream::stream::Source {
            name: "ORDERS".into(),
            ..Default::default()
        }),
        ..Default::default()
    })
    .await?;
    Ok(())
}

/// Every outcome the input stream ever held, read from its mirror once the
/// mirror has caught up.
async fn whole_life(js: &jetstream::Context) -> anyhow::Result<Audit> {
    let last = js
        .get_stream("ORDERS")
        .await?
        .info()
        .await?
        .state
        .last_sequence;
    wait_for(
        "the mirror to catch up",
        Duration::from_secs(30),
        || async {
            let mut h = js.get_stream("HISTORY").await?;
            Ok((h.info().await?.state.last_sequence >= last).then_some(()))
        },
    )
    .await?;
    let subjects = orderpipeline_common::names::OutcomeSubjects::for_filter("ORDER.created")
        .context("outcome subjects")?;
    let (chains, _) = ctl::audit::read::outcome_chains(js, "HISTORY", &subjects).await?;
    Ok(Audit {
        chains,
        first_seq: 1,
        ..Default::default()
    })
}

/// For each key with two final outcomes in `history`: when each final's input
/// was stored and when the final was written, in seconds after the key's first
/// final (from the mirror's timestamps), to tell a copy delivered after its
/// order's outcome aged out (the documented bound) from a protocol breach.
async fn two_finals_timeline(js: &jetstream::Context, history: &Audit) -> anyhow::Result<String> {
    use orderpipeline_common::names::OutcomeKind;
    let h = js.get_stream("HISTORY").await?;
    let mut lines = Vec::new();
    for (key, chain) in &history.chains {
        let finals: Vec<_> = chain
            .iter()
            .filter(|o| matches!(o.kind, OutcomeKind::Processed | OutcomeKind::Rejected))
            .collect();
        if finals.len() < 2 {
            continue;
        }
        let time = |seq| {
            let h = &h;
            async move { Ok::<_, anyhow::Error>(h.get_raw_message(seq).await?.time) }
        };
        let t0 = time(finals[0].seq).await?;
        let mut parts = Vec::new();
        for f in finals {
            let input = match f.input_seq {
                Some(i) => format!("{:+.1}", (time(i).await? - t0).as_seconds_f64()),
                None => "?".into(),
            };
            let wrote = (time(f.seq).await? - t0).as_seconds_f64();
            parts.push(format!(
                "{:?} {} (input {:?} stored {input} s, written {wrote:+.1} s)",
                f.kind, f.seq, f.input_seq
            ));
        }
        lines.push(format!("{key}: {}", parts.join(", ")));
    }
    Ok(lines.join("; "))
}

/// Runs `work` while SIGKILLing one of `workers` every second; its result and
/// the kills.
async fn killing_workers<T, F, Fut>(
    workers: &mut [WorkerProcess],
    bin: &std::path::Path,
    env: &[(&'static str, String)],
    work: F,
) -> anyhow::Result<(anyhow::Result<T>, u32)>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let work = work();
    tokio::pin!(work);
    let mut kills = 0;
    loop {
        tokio::select! {
            r = &mut work => return Ok((r, kills)),
            () = hold_fault(Duration::from_secs(1)) => {
                kill_one_at_random(workers, bin, env).await?;
                kills += 1;
            }
        }
    }
}

/// Publishes each of `ids` again under another message id (stored: past the
/// window); the sequence of the first.
async fn resend(js: &jetstream::Context, ids: &[String]) -> anyhow::Result<u64> {
    let mut first = None;
    for (n, id) in ids.iter().enumerate() {
        let ack = publish_order(js, id, &format!("{id}-again"), n as u64).await?;
        anyhow::ensure!(!ack.duplicate, "{id} again: a duplicate");
        first.get_or_insert(ack.sequence);
    }
    first.context("nothing to send again")
}

/// Publishes order `id` (a valid body, `n` its position) with message id
/// `msg_id`, and waits for the stream's ack.
async fn publish_order(
    js: &jetstream::Context,
    id: &str,
    msg_id: &str,
    n: u64,
) -> anyhow::Result<jetstream::publish::PublishAck> {
    let mut h = async_nats::HeaderMap::new();
    h.insert("Nats-Msg-Id", msg_id);
    Ok(js
        .publish_with_headers(
            "ORDER.created",
            h,
            ctl::valid_order(id, n).encode_to_vec().into(),
        )
        .await?
        .await?)
}

/// A client that is not a worker takes every slot of the consumer's
/// `maxAckPending` and keeps them with in-progress acks: the server delivers
/// nothing more while orders wait and the workers are available, a real stall.
/// The operator must say so within its window (condition with the figures,
/// Warning Event, metric); once the client goes, the orders are redelivered
/// and it says the stall ended. Then the server loses the consumer (its
/// directory removed while the server is down): the operator recreates it
/// from the ack floor it last read, not from the start of the stream. No
/// order lost, none with two outcomes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_15_a_stalled_consumer_is_detected_and_a_lost_one_resumes_after_its_ack_floor()
-> anyhow::Result<()> {
    use kube::Api;
    use order_operator::crd::OrderPipeline;
    use orderpipeline_e2e::operator::{
        OperatorProcess, install_crd_and_rbac, service_account_kubeconfig,
    };

    let started = Instant::now();
    install_crd_and_rbac().await?;
    let client = orderpipeline_e2e::kube_client().await?;
    let ns = orderpipeline_e2e::TestNamespace::create(&client, "fault-stall").await?;
    let mut server = NatsServer::start().await?;
    let js = jetstream::new(async_nats::connect(server.url()).await?);
    let _runner = orderpipeline_e2e::podrunner::for_namespace(&client, &ns.name, Vec::new())?;
    let kc = service_account_kubeconfig()?;
    let window = [("STALL_WINDOW", "4s".to_string())];
    let op = OperatorProcess::spawn_as(&ns.name, "1s", &kc, &window).await?;
    let api: Api<OrderPipeline> = Api::namespaced(client.clone(), &ns.name);
    api.create(&Default::default(), &stall_pipeline(&server.url())?)
        .await?;
    let key = format!("{}/orders", ns.name);
    let log = || op.log_text();
    pipeline_condition(&api, "Ready", "True", Duration::from_secs(60))
        .await
        .with_context(log)?;

    // Orders flow, then the foreign client takes every slot while more arrive.
    let suffix = random_suffix();
    let first = ctl::publish_orders(&js, &opts(&format!("a{suffix}"), orders(300, 3_000))).await?;
    drained(&js, Duration::from_secs(120)).await?;
    let still = ConsumerClock::watch(js.clone());
    let holder = Holder::start(&server.url(), 20).await?;
    let mut o = opts(&format!("b{suffix}"), orders(300, 2_000));
    o.rate = 200.0;
    let publisher = {
        let js = js.clone();
        tokio::spawn(async move { ctl::publish_orders(&js, &o).await })
    };
    holder.wait_holding(20).await?;
    let stalled = pipeline_condition(&api, "Stalled", "True", Duration::from_secs(90))
        .await
        .with_context(log)?;
    let detected_after = still.still_for();
    anyhow::ensure!(
        holder.held() == 20,
        "the client holds {} messages",
        holder.held()
    );
    for part in [
        "ack floor has stayed at stream sequence",
        "behind 20 delivered but never acknowledged",
    ] {
        anyhow::ensure!(stalled.contains(part), "Stalled message: {stalled}");
    }
    wait_event(&ns.name, "Warning ConsumerStalled").await?;
    let metric = format!("orderoperator_pipeline_stalled{{pipeline=\"{key}\"}} 1");
    operator_metric(op.http_port, &metric).await?;

    // The client goes: its messages are redelivered after the ack wait.
    holder.stop();
    pipeline_condition_not(&api, "Stalled", "True", Duration::from_secs(60)).await?;
    wait_event(&ns.name, "Normal StallEnded").await?;
    let second = publisher.await??;
    drained(&js, Duration::from_secs(120)).await?;

    // The server loses the consumer; the operator recreates it after the floor.
    let floor = recorded_floor(&api, &js).await?;
    server.kill().await?;
    remove_consumer_state(server.store_dir.path(), "order-workers")?;
    server.start_again().await?;
    let start = wait_for(
        "the consumer recreated",
        Duration::from_secs(60),
        || async {
            let c = orderpipeline_e2e::pipeline::order_consumer(&js).await;
            Ok(c.ok().map(|c| c.config.deliver_policy))
        },
    )
    .await?;
    let want = jetstream::consumer::DeliverPolicy::ByStartSequence {
        start_sequence: floor + 1,
    };
    anyhow::ensure!(start == want, "recreated with {start:?}, not {want:?}");
    wait_event(&ns.name, &format!("from stream sequence {}", floor + 1)).await?;
    let third = ctl::publish_orders(&js, &opts(&format!("c{suffix}"), orders(200, 1_000))).await?;
    drained(&js, Duration::from_secs(120)).await?;
    let c = orderpipeline_e2e::pipeline::order_consumer(&js).await?;
    let before_loss = first.published + second.published;
    anyhow::ensure!(
        c.delivered.consumer_sequence < before_loss,
        "the recreated consumer delivered {} messages: the {before_loss} orders from before the loss were replayed",
        c.delivered.consumer_sequence
    );
    let audit = audit(&js).await?;
    let line = format!(
        "fault stall: detected {:.1}s after the consumer stopped (window 4s, resync 1s); lost consumer recreated from sequence {}, delivered {} after it (orders published before the loss {before_loss})\n",
        detected_after.as_secs_f64(),
        floor + 1,
        c.delivered.consumer_sequence
    );
    let _ = std::io::stderr().write_all(line.as_bytes());
    report(
        "stall-and-lost-consumer",
        &audit,
        &[&first, &second, &third],
        0,
        None,
        started,
    )?;
    let _ = std::fs::remove_file(&kc);
    ns.delete().await
}

/// The sample on this server: one worker, 20 messages in flight at most, a
/// 3 s ack wait and 1 s NAK delays (a stall window of 4 s is then the floor).
fn stall_pipeline(url: &str) -> anyhow::Result<order_operator::crd::OrderPipeline> {
    let root = orderpipeline_e2e::operator::repo_root();
    let text = std::fs::read_to_string(root.join("manifests/samples/orderpipeline.yaml"))?;
    let mut p: order_operator::crd::OrderPipeline = serde_yaml::from_str(&text)?;
    p.spec.nats.url = url.to_string();
    p.spec.telemetry.otlp_endpoint = None;
    p.spec.consumer.ack_wait = "3s".into();
    p.spec.consumer.max_ack_pending = Some(20);
    p.spec.workers.replicas = 1;
    p.spec.workers.retry.nak_max_delay = "1s".into();
    Ok(p)
}

/// Waits until the pipeline's condition `type_` has `status`; its message.
async fn pipeline_condition(
    api: &kube::Api<order_operator::crd::OrderPipeline>,
    type_: &str,
    status: &str,
    within: Duration,
) -> anyhow::Result<String> {
    wait_for(&format!("{type_}={status}"), within, || async {
        let p = api.get("orders").await?;
        let conds = p.status.map(|s| s.conditions).unwrap_or_default();
        Ok(conds
            .into_iter()
            .find(|c| c.type_ == type_ && c.status == status)
            .map(|c| c.message))
    })
    .await
}

/// Waits until the condition `type_` exists without `status`.
async fn pipeline_condition_not(
    api: &kube::Api<order_operator::crd::OrderPipeline>,
    type_: &str,
    status: &str,
    within: Duration,
) -> anyhow::Result<()> {
    wait_for(&format!("{type_}!={status}"), within, || async {
        let p = api.get("orders").await?;
        let conds = p.status.map(|s| s.conditions).unwrap_or_default();
        Ok(conds
            .iter()
            .any(|c| c.type_ == type_ && c.status != status)
            .then_some(()))
    })
    .await
}

/// Waits until one of the namespace's Events (`type reason: message`) contains `text`.
async fn wait_event(ns: &str, text: &str) -> anyhow::Result<()> {
    wait_for(
        &format!("an Event with {text:?}"),
        Duration::from_secs(30),
        || async {
            let out = orderpipeline_e2e::operator::event_lines(ns).await?;
            Ok(out.contains(text).then_some(()))
        },
    )
    .await
}

/// Waits until the operator's /metrics has the line `line`.
async fn operator_metric(port: u16, line: &str) -> anyhow::Result<()> {
    let url = format!("http://127.0.0.1:{port}/metrics");
    wait_for(
        &format!("{line} on /metrics"),
        Duration::from_secs(30),
        || async {
            let body = orderpipeline_e2e::pipeline::http_get(&url).await;
            Ok(body.filter(|(_, b)| b.contains(line)).map(|_| ()))
        },
    )
    .await
}

/// The ack floor the pipeline's status records, once it is the consumer's own
/// (the workers idle): where a lost consumer must resume from.
async fn recorded_floor(
    api: &kube::Api<order_operator::crd::OrderPipeline>,
    js: &jetstream::Context,
) -> anyhow::Result<u64> {
    wait_for(
        "the status to record the ack floor",
        Duration::from_secs(30),
        || async {
            let live = orderpipeline_e2e::pipeline::order_consumer(js).await?;
            let p = api.get("orders").await?;
            let recorded = p.status.and_then(|s| s.consumer).map(|c| c.ack_floor);
            let live = live.ack_floor.stream_sequence;
            Ok((recorded == i64::try_from(live).ok() && live > 0).then_some(live))
        },
    )
    .await
}

/// Removes a consumer's state from a stopped server's store, as a server that
/// lost it: the directory `obs/<name>` under the stream's.
fn remove_consumer_state(store: &std::path::Path, name: &str) -> anyhow::Result<()> {
    fn find(dir: &std::path::Path, name: &str) -> Option<std::path::PathBuf> {
        for e in std::fs::read_dir(dir).ok()?.flatten() {
            let path = e.path();
            if !path.is_dir() {
                continue;
            }
            let obs = path.parent().and_then(|p| p.file_name()) == Some("obs".as_ref());
            if obs && e.file_name() == name {
                return Some(path);
            }
            if let Some(found) = find(&path, name) {
                return Some(found);
            }
        }
        None
    }
    let dir =
        find(store, name).with_context(|| format!("no obs/{name} under {}", store.display()))?;
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// A NATS client that is not a worker: pulls from the durable consumer until it
/// holds `slots` messages and keeps them with in-progress acks every second,
/// never acknowledging; dropped (`stop`), its messages are redelivered.
struct Holder {
    held: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    stop: tokio_util::sync::CancellationToken,
}

impl Holder {
    async fn start(url: &str, slots: usize) -> anyhow::Result<Self> {
        let client = async_nats::connect(url).await?;
        let js = jetstream::new(client.clone());
        let consumer: jetstream::consumer::PullConsumer = js
            .get_stream("ORDERS")
            .await?
            .get_consumer("order-workers")
            .await
            .map_err(|e| anyhow::anyhow!(e))?;
        let held = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let stop = tokio_util::sync::CancellationToken::new();
        let (count, cancel) = (held.clone(), stop.clone());
        tokio::spawn(async move {
            let mut kept = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            let mut messages = match consumer
                .stream()
                .max_messages_per_batch(slots)
                .expires(Duration::from_secs(5))
                .messages()
                .await
            {
                Ok(m) => m,
                Err(_) => return,
            };
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    m = futures::StreamExt::next(&mut messages), if kept.len() < slots => {
                        if let Some(Ok(m)) = m {
                            kept.push(m);
                            count.store(kept.len(), std::sync::atomic::Ordering::SeqCst);
                        }
                    }
                    _ = tick.tick() => {
                        for m in &kept {
                            let _ = m.ack_with(jetstream::AckKind::Progress).await;
                        }
                    }
                }
            }
            drop(messages);
            drop(client);
        });
        Ok(Self { held, stop })
    }

    /// Waits until it holds `slots` messages.
    async fn wait_holding(&self, slots: usize) -> anyhow::Result<()> {
        wait_for(
            "the client to hold every slot",
            Duration::from_secs(60),
            || async { Ok((self.held() >= slots).then_some(())) },
        )
        .await
    }

    fn held(&self) -> usize {
        self.held.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn stop(&self) {
        self.stop.cancel();
    }
}

/// Watches the consumer's deliveries and ack floor: how long since either moved.
struct ConsumerClock {
    moved: std::sync::Arc<std::sync::Mutex<Instant>>,
    _stop: tokio_util::sync::DropGuard,
}

impl ConsumerClock {
    fn watch(js: jetstream::Context) -> Self {
        let moved = std::sync::Arc::new(std::sync::Mutex::new(Instant::now()));
        let stop = tokio_util::sync::CancellationToken::new();
        let (at, cancel) = (moved.clone(), stop.clone());
        tokio::spawn(async move {
            let mut last = None;
            let mut every = tokio::time::interval(Duration::from_millis(200));
            while !cancel.is_cancelled() {
                every.tick().await;
                if let Ok(c) = orderpipeline_e2e::pipeline::order_consumer(&js).await {
                    let now = Some((c.delivered.consumer_sequence, c.ack_floor.stream_sequence));
                    if now != last {
                        *at.lock().unwrap() = Instant::now();
                        last = now;
                    }
                }
            }
        });
        Self {
            moved,
            _stop: stop.drop_guard(),
        }
    }

    fn still_for(&self) -> Duration {
        self.moved.lock().unwrap().elapsed()
    }
}
