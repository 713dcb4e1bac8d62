//! Minted NATS identities on a real nats-server in operator mode: two
//! pipelines in one account, each with a worker and a producer identity whose
//! permissions `orderpipeline_common::natsauth::PipelineScope` derives from its
//! names. Each pipeline's worker runs on its own identity and loses nothing;
//! neither identity reaches the other pipeline's stream, consumer, outcomes,
//! DLQ or inbox, and none may create a consumer. A short-lived identity renewed
//! in place keeps a worker running across the expiries.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use orderpipeline_common::natsauth::{self, PipelineScope};
use orderpipeline_common::topology::Topology;
use orderpipeline_ctl::{self as ctl, PublishOptions};
use orderpipeline_e2e::natsauth::{OperatorMode, jetstream_as, operator_mode, probe};
use orderpipeline_e2e::pipeline::{Audit, WorkerProcess, binary};
use orderpipeline_e2e::tempdir::TempDir;
use orderpipeline_e2e::{NatsServer, random_suffix, wait_for};

/// One pipeline's names, all distinct per test run.
struct Tenant {
    scope: PipelineScope,
    topology: Topology,
}

fn tenant(tag: &str) -> Tenant {
    let s = format!("T{tag}{}", random_suffix().to_uppercase());
    let topology = Topology {
        stream: s.clone(),
        subjects: vec![format!("{s}.created")],
        dlq_stream: format!("{s}_DLQ"),
        dlq_subject: format!("DLQ.{s}.created"),
        consumer: "workers".into(),
        filter_subject: format!("{s}.created"),
        ack_wait: Duration::from_secs(5),
        ..Topology::default()
    };
    let scope = PipelineScope {
        stream: topology.stream.clone(),
        consumer: topology.consumer.clone(),
        dlq_stream: topology.dlq_stream.clone(),
        input_subject: topology.filter_subject.clone(),
        legacy_bucket: None,
        inbox_prefix: PipelineScope::inbox_prefix_for(&format!("{tag}-{}", random_suffix())),
    };
    Tenant { scope, topology }
}

/// A nats-server in operator mode and JetStream as its account's admin.
async fn operator_mode_server() -> anyhow::Result<(OperatorMode, NatsServer, jetstream::Context)> {
    let auth = operator_mode()?;
    let server = NatsServer::start_with_config(&auth.server_config).await?;
    let admin = jetstream_as(&server.url(), &auth.admin_creds, None).await?;
    Ok((auth, server, admin))
}

fn mint(
    auth: &OperatorMode,
    name: &str,
    p: &natsauth::Permissions,
    expires: Option<u64>,
) -> anyhow::Result<String> {
    Ok(natsauth::mint_user(&auth.signing_key, &auth.account, name, p, expires)?.creds)
}

fn worker_env(url: &str, t: &Tenant, creds_file: &std::path::Path) -> Vec<(&'static str, String)> {
    vec![
        ("NATS_URL", url.to_string()),
        ("NATS_CREDS_FILE", creds_file.display().to_string()),
        ("NATS_INBOX_PREFIX", t.scope.inbox_prefix.clone()),
        ("STREAM_NAME", t.topology.stream.clone()),
        ("CONSUMER_NAME", t.topology.consumer.clone()),
        ("INPUT_SUBJECT", t.topology.filter_subject.clone()),
        ("DLQ_STREAM", t.topology.dlq_stream.clone()),
        ("WORKER_POOL_SIZE", "10".into()),
    ]
}

fn publish_opts(t: &Tenant, count: u64) -> PublishOptions {
    PublishOptions {
        subject: t.topology.filter_subject.clone(),
        count,
        rate: 0.0,
        invalid_ratio: 0.1,
        duplicate_ratio: 0.0,
        prefix: format!("o{}", random_suffix()),
        window: 64,
        ack_timeout: Duration::from_secs(5),
        progress: false,
        poison: 0,
    }
}

/// Publishes the orders of `o` with the producer identity and waits until the
/// worker drained them; the audit (as the admin) finds none lost.
async fn orders_flow(
    admin: &jetstream::Context,
    producer: &jetstream::Context,
    t: &Tenant,
    o: &PublishOptions,
) -> anyhow::Result<()> {
    let count = o.count;
    let r = ctl::publish_orders(producer, o).await?;
    anyhow::ensure!(r.published == count, "published {} of {count}", r.published);
    wait_for("the consumer to drain", Duration::from_secs(60), || async {
        let s = admin.get_stream(&t.topology.stream).await?;
        let c = s.consumer_info(&t.topology.consumer).await?;
        Ok((c.num_pending == 0 && c.num_ack_pending == 0).then_some(()))
    })
    .await?;
    let a = Audit::collect(
        admin,
        &t.topology.stream,
        &t.topology.dlq_stream,
        &t.topology.consumer,
    )
    .await?;
    anyhow::ensure!(a.violations().is_empty(), "{:?}", a.violations());
    let s = a.summary();
    anyhow::ensure!(
        s.lost == 0 && s.processed + s.rejected >= count,
        "{s:?} for {count} orders"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minted_identities_reach_only_their_own_pipeline() -> anyhow::Result<()> {
    let (auth, server, admin) = operator_mode_server().await?;
    let url = server.url();
    let (a, b) = (tenant("a"), tenant("b"));
    for t in [&a, &b] {
        t.topology.ensure(&admin).await?;
    }
    let dir = TempDir::new("tenancy")?;
    let a_worker = mint(&auth, "a-worker", &a.scope.worker()?, None)?;
    let a_creds = dir.path().join("a-worker.creds");
    std::fs::write(&a_creds, &a_worker)?;
    let a_producer = mint(&auth, "a-producer", &a.scope.producer(), None)?;

    // A's worker, on its own identity, processes A's orders sent with A's
    // producer identity: nothing lost.
    let w = WorkerProcess::spawn(&binary("order-worker")?, &worker_env(&url, &a, &a_creds)).await?;
    w.wait_ready().await?;
    let producer = probe(&url, &a_producer, &a.scope.inbox_prefix).await?;
    let js = jetstream::new(producer.client.clone());
    orders_flow(&admin, &js, &a, &publish_opts(&a, 200)).await?;
    let log = w.log_text();
    anyhow::ensure!(
        !log.contains("Permissions Violation"),
        "A's worker hit a permission it needs:\n{log}"
    );

    // A's worker identity against B's objects, and against its own admin API.
    let worker = probe(&url, &a_worker, &a.scope.inbox_prefix).await?;
    let (bs, bc, bd) = (
        &b.topology.stream,
        &b.topology.consumer,
        &b.topology.dlq_stream,
    );
    for subject in [
        format!("$JS.API.CONSUMER.MSG.NEXT.{bs}.{bc}"),
        format!("$JS.API.CONSUMER.INFO.{bs}.{bc}"),
        format!("$JS.API.STREAM.INFO.{bs}"),
        format!("$JS.API.DIRECT.GET.{bs}"),
        format!("$JS.API.STREAM.MSG.GET.{bd}"),
        format!("$JS.ACK.{bs}.{bc}.1.1.1.1.0"),
        format!("{bs}.processed.k1"),
        format!("{bs}.created"),
        // Its own pipeline: no consumer or stream changes, no producing.
        format!("$JS.API.CONSUMER.CREATE.{}", a.topology.stream),
        format!("$JS.API.CONSUMER.DURABLE.CREATE.{}.x", a.topology.stream),
        format!("$JS.API.STREAM.DELETE.{}", a.topology.stream),
        format!("$JS.API.STREAM.PURGE.{}", a.topology.stream),
        a.topology.filter_subject.clone(),
    ] {
        worker.publish_denied(&subject).await?;
    }
    for subject in [
        format!("{bs}.>"),
        format!("{}.>", b.scope.inbox_prefix),
        "_INBOX.>".to_string(),
        ">".to_string(),
    ] {
        worker.subscribe_denied(&subject).await?;
    }
    worker
        .publish_allowed(&format!("{}.processed.probe", a.topology.stream))
        .await?;

    // A's producer identity: A's input subject only.
    for subject in [
        format!("{bs}.created"),
        format!("{}.processed.k1", a.topology.stream),
        format!("$JS.API.CONSUMER.MSG.NEXT.{}.workers", a.topology.stream),
        format!("$JS.API.STREAM.INFO.{}", a.topology.stream),
    ] {
        producer.publish_denied(&subject).await?;
    }
    producer
        .subscribe_denied(&format!("{}.>", a.topology.stream))
        .await?;
    producer
        .subscribe_denied(&format!("{}.>", b.scope.inbox_prefix))
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_lived_identity_renewed_in_place_keeps_the_worker_running() -> anyhow::Result<()> {
    let (auth, server, admin) = operator_mode_server().await?;
    let auth = Arc::new(auth);
    let url = server.url();
    let t = tenant("r");
    t.topology.ensure(&admin).await?;
    let dir = TempDir::new("tenancy-renew")?;
    let creds = dir.path().join("worker.creds");
    // JWTs valid for 4 s, renewed every second: the connection a worker opened
    // is closed by the server when the JWT it presented expires, and the
    // worker reconnects with the file's newer one.
    let ttl = 4;
    let renew = {
        let (auth, creds, perms) = (auth.clone(), creds.clone(), t.scope.worker()?);
        move || -> anyhow::Result<()> {
            let c = mint(&auth, "r-worker", &perms, Some(natsauth::now() + ttl))?;
            // Replaced atomically, as the kubelet updates a mounted Secret.
            let tmp = creds.with_extension("new");
            std::fs::write(&tmp, c)?;
            std::fs::rename(&tmp, &creds)?;
            Ok(())
        }
    };
    renew()?;
    // The renewal schedule, as the operator's (a ticker, not a wait).
    let renewer = tokio::spawn({
        let renew = renew.clone();
        async move {
            let mut every = tokio::time::interval(Duration::from_secs(1));
            loop {
                every.tick().await;
                if let Err(e) = renew() {
                    return e;
                }
            }
        }
    });
    let w = WorkerProcess::spawn(&binary("order-worker")?, &worker_env(&url, &t, &creds)).await?;
    let producer_creds = mint(&auth, "r-producer", &t.scope.producer(), None)?;
    let producer = jetstream_as(&url, &producer_creds, Some(&t.scope.inbox_prefix)).await?;
    let flow = async {
        w.wait_ready().await?;
        // 600 orders at 50/s: 12 s, three lifetimes of a JWT.
        let mut o = publish_opts(&t, 600);
        o.rate = 50.0;
        orders_flow(&admin, &producer, &t, &o).await
    };
    let r = flow.await;
    renewer.abort();
    r?;
    let log = w.log_text();
    let expired = log.matches("NATS connection lost").count();
    anyhow::ensure!(
        expired >= 2,
        "the worker's connection was closed {expired} times in 12 s of 4 s JWTs:\n{log}"
    );
    Ok(())
}
