//! order-worker against a real nats-server (and Jaeger for tracing): every
//! outcome path, crashes, restarts, retries, dead letters and replay, config
//! errors. Each test runs its own nats-server, so they run in parallel.

use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream;
use orderpipeline_common::topology::Topology;
use orderpipeline_ctl::{self as ctl, PublishOptions};
use orderpipeline_e2e::pipeline::{
    Audit, DownstreamStub, StubBehaviour, WorkerProcess, binary, http_get, wait_dlq_empty,
    wait_stream_holds,
};
use orderpipeline_e2e::{NatsServer, env_var, random_suffix, wait_for};
use orderpipeline_proto::{ErrorClass, Message as _};

fn topology(ack_wait: Duration) -> Topology {
    Topology {
        ack_wait,
        ..Topology::default()
    }
}

async fn setup(ack_wait: Duration) -> anyhow::Result<(NatsServer, jetstream::Context)> {
    let server = NatsServer::start().await?;
    let client = async_nats::connect(server.url()).await?;
    let js = jetstream::new(client);
    topology(ack_wait).ensure(&js).await?;
    Ok((server, js))
}

fn worker_env(server: &NatsServer, extra: &[(&str, &str)]) -> Vec<(&'static str, String)> {
    let mut env = vec![
        ("NATS_URL", server.url()),
        ("WORKER_POOL_SIZE", "10".to_string()),
        ("NAK_INITIAL_DELAY", "100ms".to_string()),
        ("NAK_MAX_DELAY", "500ms".to_string()),
        ("RETRY_INITIAL_BACKOFF", "10ms".to_string()),
        ("RETRY_MAX_BACKOFF", "50ms".to_string()),
    ];
    for (k, v) in extra {
        let k: &'static str = Box::leak(k.to_string().into_boxed_str());
        env.retain(|(e, _)| *e != k);
        env.push((k, v.to_string()));
    }
    env
}

fn publish_opts(prefix: &str, count: u64) -> PublishOptions {
    PublishOptions {
        subject: "ORDER.created".into(),
        count,
        rate: 0.0,
        invalid_ratio: 0.0,
        duplicate_ratio: 0.0,
        prefix: prefix.into(),
        window: 128,
        ack_timeout: Duration::from_secs(5),
        progress: false,
        poison: 0,
    }
}

/// Waits until the consumer has nothing pending or awaiting ack.
/// Waits until the consumer has acknowledged every input up to stream
/// sequence `seq` and holds nothing.
async fn acked_through(js: &jetstream::Context, seq: u64) -> anyhow::Result<()> {
    wait_for(
        &format!("the inputs up to {seq} acknowledged"),
        Duration::from_secs(30),
        || async {
            let c = orderpipeline_e2e::pipeline::order_consumer(js).await?;
            let done = c.ack_floor.stream_sequence >= seq && c.num_ack_pending == 0;
            Ok(done.then_some(()))
        },
    )
    .await
}

async fn drained(js: &jetstream::Context, timeout: Duration) -> anyhow::Result<()> {
    let (stream, consumer) = ("ORDERS", "order-workers");
    orderpipeline_e2e::pipeline::wait_drained(js, stream, consumer, "ORDER.created", timeout).await
}

/// Waits until the dead-letter stream holds `n` letters: it sources them from
/// the input stream's `deadlettered` outcomes asynchronously, so a drained
/// consumer does not yet mean they have arrived.
async fn dead_letters_arrived(js: &jetstream::Context, n: u64) -> anyhow::Result<()> {
    wait_stream_holds(js, "ORDERS_DLQ", n, Duration::from_secs(30)).await
}

async fn publish_raw(js: &jetstream::Context, id: &str, payload: Vec<u8>) -> anyhow::Result<u64> {
    let mut h = async_nats::HeaderMap::new();
    h.insert("Nats-Msg-Id", id);
    Ok(js
        .publish_with_headers("ORDER.created", h, payload.into())
        .await?
        .await?
        .sequence)
}

async fn audit(js: &jetstream::Context) -> anyhow::Result<Audit> {
    Audit::collect(js, "ORDERS", "ORDERS_DLQ", "order-workers").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_outcome_path_is_taken_exactly_once() -> anyhow::Result<()> {
    let (server, js) = setup(Duration::from_secs(5)).await?;
    let w = WorkerProcess::spawn(
        &binary("order-worker")?,
        &worker_env(&server, &[("MAX_PAYLOAD_BYTES", "4096")]),
    )
    .await?;
    w.wait_ready().await?;

    let mut opts = publish_opts(&format!("o{}", random_suffix()), 300);
    opts.invalid_ratio = 0.1;
    opts.duplicate_ratio = 0.05;
    let report = ctl::publish_orders(&js, &opts).await?;
    assert!(
        report.invalid > 0 && report.duplicates_sent > 0,
        "{report:?}"
    );
    assert_eq!(
        report.duplicates_acked, report.duplicates_sent,
        "same Nats-Msg-Id is deduplicated by the stream"
    );

    // Poison: random bytes, a truncated protobuf, an oversized payload.
    let good = ctl::valid_order("trunc", 1).encode_to_vec();
    let poison = [
        ("poison-random", vec![0xff, 0xff, 0xff, 0x0f, 0x01, 0x02]),
        ("poison-truncated", good[..good.len() - 3].to_vec()),
        (
            "poison-oversized",
            ctl::valid_order(&"x".repeat(5000), 2).encode_to_vec(),
        ),
        // Just under the server's 1 MiB max_payload: no envelope can carry it whole.
        ("poison-huge", vec![0xff; 1024 * 1024 - 1024]),
    ];
    let mut poison_seqs = Vec::new();
    for (id, payload) in &poison {
        poison_seqs.push(publish_raw(&js, id, payload.clone()).await?);
    }
    // The same order again under a different Nats-Msg-Id: one effect.
    let again = &report.valid_ids[0];
    let idx: u64 = again.rsplit('-').next().unwrap_or("0").parse()?;
    publish_raw(
        &js,
        &format!("{again}-republished"),
        ctl::valid_order(again, idx).encode_to_vec(),
    )
    .await?;

    // Hostile but legal ids: any UTF-8 up to 256 bytes is an order like any other
    // (CR LF, dots and wildcards, an id shaped like another order's result);
    // a longer one is rejected with the limit in the message.
    let s = random_suffix();
    let hostile = [
        format!("crlf-{s}\r\nNats-Msg-Id: forged"),
        format!("{}:processed", report.valid_ids[1]),
        format!("dots.{s}.*.>"),
        format!("ünïcödé-{s}"),
        format!("{s}{}", "é".repeat(120)),
    ];
    for (i, id) in hostile.iter().enumerate() {
        publish_raw(
            &js,
            &format!("hostile-{s}-{i}"),
            ctl::valid_order(id, 1).encode_to_vec(),
        )
        .await?;
    }
    let too_long = format!("{s}{}", "x".repeat(300));
    publish_raw(
        &js,
        &format!("long-{s}"),
        ctl::valid_order(&too_long, 1).encode_to_vec(),
    )
    .await?;

    drained(&js, Duration::from_secs(60)).await?;
    dead_letters_arrived(&js, 4).await?;
    let a = audit(&js).await?;
    let mut invalid = report.invalid_ids.clone();
    invalid.push(too_long.clone());
    let mut valid = report.valid_ids.clone();
    valid.extend(hostile.iter().cloned());
    a.assert_exactly_once(&valid, &invalid)?;
    assert_eq!(a.dead_letter_count(), 4, "{:?}", a.dead_letters.keys());
    let class_of = |seq: u64| a.dead_letters[&seq][0].error_class();
    assert_eq!(class_of(poison_seqs[0]), ErrorClass::Undecodable);
    assert_eq!(class_of(poison_seqs[1]), ErrorClass::Undecodable);
    assert_eq!(class_of(poison_seqs[2]), ErrorClass::Oversized);
    assert_eq!(class_of(poison_seqs[3]), ErrorClass::Oversized);
    let huge = &a.dead_letters[&poison_seqs[3]][0];
    assert!(huge.payload_truncated, "the huge payload is truncated");
    assert_eq!(huge.payload_size, poison[3].1.len() as u64);
    assert!(!huge.payload.is_empty() && huge.payload.len() < poison[3].1.len());
    assert!(!a.dead_letters[&poison_seqs[2]][0].payload_truncated);
    assert!(
        a.dead_letters[&poison_seqs[2]][0]
            .error_message
            .contains("MAX_PAYLOAD_BYTES")
    );
    assert_eq!(
        a.dead_letters[&poison_seqs[0]][0].payload, poison[0].1,
        "the DLQ keeps the original payload"
    );

    let (code, metrics) = http_get(&format!("http://127.0.0.1:{}/metrics", w.http_port))
        .await
        .context("metrics")?;
    assert_eq!(code, 200);
    assert!(
        metrics.contains("orderworker_duplicates_skipped_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            "orderworker_messages_total{{outcome=\"processed\"}} {}",
            report.valid + hostile.len() as u64
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains("orderworker_dead_letters_total{class=\"undecodable\"} 2"),
        "{metrics}"
    );
    let (code, _) = http_get(&format!("http://127.0.0.1:{}/health", w.http_port))
        .await
        .context("health")?;
    assert_eq!(code, 200);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downstream_retries_then_succeeds_and_permanent_refusal_dead_letters() -> anyhow::Result<()>
{
    let (server, js) = setup(Duration::from_secs(10)).await?;
    let stub = DownstreamStub::start(StubBehaviour {
        fail_first: 2,
        refuse_prefix: Some("perm-".into()),
        ..Default::default()
    })
    .await?;
    let w = WorkerProcess::spawn(
        &binary("order-worker")?,
        &worker_env(
            &server,
            &[("DOWNSTREAM_URL", &stub.url), ("RETRY_ATTEMPTS", "3")],
        ),
    )
    .await?;
    w.wait_ready().await?;
    let report =
        ctl::publish_orders(&js, &publish_opts(&format!("d{}", random_suffix()), 20)).await?;
    let perm =
        ctl::publish_orders(&js, &publish_opts(&format!("perm-{}", random_suffix()), 2)).await?;
    drained(&js, Duration::from_secs(60)).await?;
    dead_letters_arrived(&js, 2).await?;

    let a = audit(&js).await?;
    a.assert_exactly_once(&report.valid_ids, &[])?;
    for id in &report.valid_ids {
        assert_eq!(stub.calls_for(id), 3, "two 503s then one 2xx for {id}");
    }
    assert!(
        stub.charged_twice().is_empty(),
        "no call after an order is recorded processed"
    );
    assert_eq!(a.dead_letter_count(), 2);
    for letters in a.dead_letters.values() {
        assert_eq!(letters[0].error_class(), ErrorClass::Permanent);
        assert!(
            letters[0].error_message.contains("400"),
            "{}",
            letters[0].error_message
        );
    }
    let dead_ids: Vec<&String> = a.dead_letters.values().map(|l| &l[0].order_id).collect();
    for id in &perm.valid_ids {
        assert!(dead_ids.contains(&id), "{id} dead-lettered: {dead_ids:?}");
        assert_eq!(stub.calls_for(id), 1, "a permanent refusal is not retried");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_orders_dead_letter_on_the_last_delivery_and_replay_once() -> anyhow::Result<()> {
    let (server, js) = setup(Duration::from_secs(10)).await?;
    let broken = DownstreamStub::start(StubBehaviour {
        fail_first: u32::MAX,
        ..Default::default()
    })
    .await?;
    let mut w = WorkerProcess::spawn(
        &binary("order-worker")?,
        &worker_env(
            &server,
            &[
                ("DOWNSTREAM_URL", &broken.url),
                ("RETRY_ATTEMPTS", "2"),
                ("MAX_DELIVERIES", "3"),
            ],
        ),
    )
    .await?;
    w.wait_ready().await?;
    let report =
        ctl::publish_orders(&js, &publish_opts(&format!("x{}", random_suffix()), 4)).await?;
    drained(&js, Duration::from_secs(60)).await?;
    dead_letters_arrived(&js, 4).await?;
    let a = audit(&js).await?;
    assert_eq!(a.dead_letter_count(), 4);
    for letters in a.dead_letters.values() {
        let d = &letters[0];
        assert_eq!(d.error_class(), ErrorClass::AttemptsExhausted);
        assert_eq!(
            d.delivery_count, 3,
            "dead-lettered by the worker on the last allowed delivery"
        );
    }
    for id in &report.valid_ids {
        assert_eq!(broken.calls_for(id), 6, "2 tries x 3 deliveries for {id}");
    }
    w.signal("TERM").await?;
    assert_eq!(
        w.wait(Duration::from_secs(30)).await?,
        Some(0),
        "SIGTERM exits 0"
    );

    // Replay against a healthy downstream: each order processed exactly once.
    let healthy = DownstreamStub::start(StubBehaviour::default()).await?;
    let w2 = WorkerProcess::spawn(
        &binary("order-worker")?,
        &worker_env(&server, &[("DOWNSTREAM_URL", &healthy.url)]),
    )
    .await?;
    w2.wait_ready().await?;
    let letters = ctl::dlq_list(&js, "ORDERS_DLQ", 100).await?;
    assert_eq!(
        letters.len(),
        4,
        "the server copied every marker to the DLQ"
    );
    // Every letter replayed twice at once: one replay supersedes it, the other
    // finds the order processed; the letter goes once the outcome exists.
    for l in &letters {
        assert!(l.marker.is_some(), "letters carry their marker");
        ctl::dlq_replay(&js, "ORDERS_DLQ", l.dlq_sequence).await?;
        ctl::dlq_replay(&js, "ORDERS_DLQ", l.dlq_sequence).await?;
    }
    if let Err(e) = drained(&js, Duration::from_secs(60)).await {
        eprintln!("worker log:\n{}", w2.log_text());
        return Err(e);
    }
    wait_dlq_empty(&js, "ORDERS_DLQ", Duration::from_secs(30)).await?;
    let a = audit(&js).await?;
    a.assert_exactly_once(&report.valid_ids, &[])?;
    for id in &report.valid_ids {
        assert_eq!(
            a.processed.get(id),
            Some(&1),
            "{id} processed once after replay"
        );
        assert!(healthy.charged(id), "{id} charged by the replay");
        let key = orderpipeline_common::names::order_key(id).context("key")?;
        let chain: Vec<_> = a.chains[&key].iter().map(|o| o.kind.token()).collect();
        assert_eq!(chain, ["deadlettered", "processed"], "{id}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_order_gives_exactly_one_result_after_redelivery() -> anyhow::Result<()> {
    let (server, js) = setup(Duration::from_secs(2)).await?;
    let stub = DownstreamStub::start(StubBehaviour {
        delay: Duration::from_millis(1500),
        ..Default::default()
    })
    .await?;
    let env = worker_env(
        &server,
        &[("DOWNSTREAM_URL", &stub.url), ("WORKER_POOL_SIZE", "5")],
    );
    let mut w1 = WorkerProcess::spawn(&binary("order-worker")?, &env).await?;
    w1.wait_ready().await?;
    let report =
        ctl::publish_orders(&js, &publish_opts(&format!("k{}", random_suffix()), 15)).await?;
    wait_for(
        "the first downstream calls",
        Duration::from_secs(20),
        || async { Ok((stub.total_calls() >= 3).then_some(())) },
    )
    .await?;
    w1.kill().await?; // mid-order: calls are in flight for 1.5 s
    let w2 = WorkerProcess::spawn(&binary("order-worker")?, &env).await?;
    w2.wait_ready().await?;
    drained(&js, Duration::from_secs(90)).await?;
    let a = audit(&js).await?;
    a.assert_exactly_once(&report.valid_ids, &[])?;
    let repeated = report
        .valid_ids
        .iter()
        .filter(|id| stub.calls_for(id) > 1)
        .count();
    assert!(
        repeated >= 1,
        "some order was in flight when the worker died"
    );
    for id in &report.valid_ids {
        assert!(
            stub.calls_for(id) <= 2,
            "{id} called {} times",
            stub.calls_for(id)
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restart_during_a_10k_run_loses_and_duplicates_nothing() -> anyhow::Result<()> {
    let (mut server, js) = setup(Duration::from_secs(5)).await?;
    let env = worker_env(&server, &[("WORKER_POOL_SIZE", "50")]);
    let w1 = WorkerProcess::spawn(&binary("order-worker")?, &env).await?;
    let w2 = WorkerProcess::spawn(&binary("order-worker")?, &env).await?;
    w1.wait_ready().await?;
    w2.wait_ready().await?;
    let prefix = format!("r{}", random_suffix());
    let mut first = publish_opts(&format!("{prefix}a"), 5_000);
    first.invalid_ratio = 0.05;
    let r1 = ctl::publish_orders(&js, &first).await?;
    // Restart while the workers are busy with the backlog.
    server.restart().await?;
    let client = async_nats::connect(server.url()).await?;
    let js = jetstream::new(client);
    let mut second = publish_opts(&format!("{prefix}b"), 5_000);
    second.invalid_ratio = 0.05;
    let r2 = ctl::publish_orders(&js, &second).await?;
    drained(&js, Duration::from_secs(180)).await?;
    let a = audit(&js).await?;
    let valid: Vec<String> = r1.valid_ids.iter().chain(&r2.valid_ids).cloned().collect();
    let invalid: Vec<String> = r1
        .invalid_ids
        .iter()
        .chain(&r2.invalid_ids)
        .cloned()
        .collect();
    assert_eq!(valid.len() + invalid.len(), 10_000);
    a.assert_exactly_once(&valid, &invalid)?;
    assert_eq!(a.dead_letter_count(), 0);
    for w in [&w1, &w2] {
        w.wait_ready()
            .await
            .context("workers are ready again after the restart")?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_started_by_orderctl_continues_in_the_worker() -> anyhow::Result<()> {
    let otlp = env_var("OTEL_EXPORTER_OTLP_ENDPOINT")?;
    let jaeger = env_var("JAEGER_QUERY_URL")?;
    let (server, _js) = setup(Duration::from_secs(5)).await?;
    let service = format!("order-worker-{}", random_suffix());
    let mut env = worker_env(&server, &[]);
    env.push(("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.clone()));
    env.push(("OTEL_SERVICE_NAME", service.clone()));
    env.push((
        "OTEL_RESOURCE_ATTRIBUTES",
        "orderpipeline.name=test,k8s.namespace.name=e2e".into(),
    ));
    let w = WorkerProcess::spawn(&binary("order-worker")?, &env).await?;
    w.wait_ready().await?;
    let out = tokio::process::Command::new(binary("orderctl")?)
        .args(["--json", "publish", "--count", "1"])
        .env("NATS_URL", server.url())
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &otlp)
        .env("OTEL_SERVICE_NAME", format!("orderctl-{}", random_suffix()))
        .output()
        .await?;
    assert!(
        out.status.success(),
        "orderctl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let trace_id = v["first_trace_id"]
        .as_str()
        .context("orderctl printed a trace id")?
        .to_string();

    let url = format!("{jaeger}/api/traces/{trace_id}");
    let trace = wait_for(
        "the worker's spans in Jaeger",
        Duration::from_secs(30),
        || {
            let url = url.clone();
            let service = service.clone();
            async move {
                let Some((200, body)) = http_get(&url).await else {
                    return Ok(None);
                };
                let v: serde_json::Value = serde_json::from_str(&body)?;
                let t = v["data"][0].clone();
                let has = |name: &str| {
                    t["spans"]
                        .as_array()
                        .is_some_and(|s| s.iter().any(|s| s["operationName"] == name))
                };
                let worker_service = t["processes"]
                    .as_object()
                    .is_some_and(|p| p.values().any(|p| p["serviceName"] == service.as_str()));
                Ok((worker_service
                    && has("process ORDER.created")
                    && has("publish ORDER.processed")
                    && has("validate"))
                .then_some(t))
            }
        },
    )
    .await?;
    let spans = trace["spans"].as_array().context("spans")?;
    let by_name = |n: &str| {
        spans
            .iter()
            .find(|s| s["operationName"] == n)
            .cloned()
            .unwrap_or_default()
    };
    let producer = by_name("publish ORDER.created");
    let consumer = by_name("process ORDER.created");
    let parent_of = |s: &serde_json::Value| {
        s["references"][0]["spanID"]
            .as_str()
            .unwrap_or("")
            .to_string()
    };
    assert_eq!(
        parent_of(&consumer),
        producer["spanID"].as_str().unwrap_or("-"),
        "the worker's span is a child of orderctl's"
    );
    let tags = consumer["tags"].as_array().context("tags")?;
    let tag = |k: &str| {
        tags.iter()
            .find(|t| t["key"] == k)
            .map(|t| t["value"].clone())
    };
    assert_eq!(tag("messaging.system"), Some("nats".into()));
    assert_eq!(
        tag("messaging.consumer.group.name"),
        Some("order-workers".into())
    );
    assert_eq!(tag("messaging.nats.delivery_count"), Some(1.into()));
    for child in ["validate", "publish ORDER.processed"] {
        let s = by_name(child);
        let mut p = parent_of(&s);
        let mut hops = 0;
        while p != consumer["spanID"].as_str().unwrap_or("-") && hops < 5 {
            p = spans
                .iter()
                .find(|x| x["spanID"] == p.as_str())
                .map(parent_of)
                .unwrap_or_default();
            hops += 1;
        }
        assert!(hops < 5, "{child} descends from the consumer span");
    }
    let process = &trace["processes"][consumer["processID"].as_str().unwrap_or("")];
    let ptags = process["tags"].as_array().cloned().unwrap_or_default();
    assert!(
        ptags
            .iter()
            .any(|t| t["key"] == "orderpipeline.name" && t["value"] == "test"),
        "OTEL_RESOURCE_ATTRIBUTES reach the trace: {ptags:?}"
    );
    Ok(())
}

#[tokio::test]
async fn bad_configuration_exits_naming_the_variable_and_the_form() -> anyhow::Result<()> {
    let bin = binary("order-worker")?;
    for (var, value, expect) in [
        ("WORKER_POOL_SIZE", "0", "1 to 10000"),
        ("WORKER_POOL_SIZE", "ten", "1 to 10000"),
        ("RETRY_INITIAL_BACKOFF", "5", "no unit"),
        ("DOWNSTREAM_URL", "ftp://example", "http(s) URL with a host"),
        ("DOWNSTREAM_TIMEOUT", "0s", "longer than 0"),
        ("HTTP_ADDR", "nowhere", "IP:PORT"),
        ("MAX_PAYLOAD_BYTES", "1MB", "1 to 67108864"),
    ] {
        let out = tokio::process::Command::new(&bin)
            .env(var, value)
            .output()
            .await?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{var}={value}: {stderr}");
        assert!(stderr.contains(expect), "{var}={value}: {stderr}");
        assert!(
            stderr.contains(var) || stderr.contains(&var.to_lowercase().replace('_', "-")),
            "{var}: {stderr}"
        );
    }
    Ok(())
}

/// A worker started by hand on objects that contradict its flags refuses to
/// start (exit 2), naming the setting and the fix, instead of writing outcomes
/// where nothing reads them (another prefix) or letting the server strand
/// orders (a server-side max_deliver); it takes no order.
#[tokio::test]
async fn a_worker_refuses_a_topology_that_contradicts_its_flags() -> anyhow::Result<()> {
    let (server, js) = setup(Duration::from_secs(5)).await?;
    let stream = js.get_stream("ORDERS").await?;
    stream
        .create_consumer(jetstream::consumer::pull::Config {
            durable_name: Some("capped".into()),
            filter_subject: "ORDER.created".into(),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            max_deliver: 5,
            ..Default::default()
        })
        .await?;
    publish_raw(&js, "o-1", ctl::valid_order("o-1", 1).encode_to_vec()).await?;
    let bin = binary("order-worker")?;
    for (var, value, expect) in [
        (
            "INPUT_SUBJECT",
            "SHOP.created",
            "INPUT_SUBJECT is SHOP.created but consumer order-workers on stream ORDERS filters [\"ORDER.created\"]",
        ),
        (
            "CONSUMER_NAME",
            "capped",
            "consumer capped has max_deliver 5",
        ),
    ] {
        let port = orderpipeline_e2e::free_port()?;
        let env = worker_env(
            &server,
            &[(var, value), ("HTTP_ADDR", &format!("127.0.0.1:{port}"))],
        );
        let out = tokio::time::timeout(
            Duration::from_secs(30),
            tokio::process::Command::new(&bin)
                .envs(env)
                .kill_on_drop(true)
                .output(),
        )
        .await
        .with_context(|| format!("{var}={value}: the worker did not refuse to start"))??;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{var}={value}: {stderr}");
        assert!(stderr.contains("refusing to start"), "{stderr}");
        assert!(stderr.contains(expect), "{var}={value}: {stderr}");
    }
    for consumer in ["order-workers", "capped"] {
        let c = stream.consumer_info(consumer).await?;
        assert_eq!(
            (c.num_pending, c.num_ack_pending),
            (1, 0),
            "{consumer}: no order taken"
        );
    }
    Ok(())
}

#[tokio::test]
async fn missing_topology_or_nats_is_reported_by_the_probes() -> anyhow::Result<()> {
    let server = NatsServer::start().await?;
    let w = WorkerProcess::spawn(&binary("order-worker")?, &worker_env(&server, &[])).await?;
    let body = wait_for(
        "/readyz to name the missing stream",
        Duration::from_secs(20),
        || async {
            Ok(match w.readyz().await {
                Some((503, b)) if b.contains("stream ORDERS does not exist") => Some(b),
                _ => None,
            })
        },
    )
    .await?;
    assert!(body.contains("--create-topology"), "{body}");
    let (code, _) = http_get(&format!("http://127.0.0.1:{}/health", w.http_port))
        .await
        .context("health")?;
    assert_eq!(code, 200, "connected to NATS, so /health is fine");

    let port = orderpipeline_e2e::free_port()?;
    let env = vec![("NATS_URL", format!("nats://127.0.0.1:{port}"))];
    let w = WorkerProcess::spawn(&binary("order-worker")?, &env).await?;
    wait_for(
        "/health 503 and /readyz naming NATS",
        Duration::from_secs(20),
        || async {
            let h = http_get(&format!("http://127.0.0.1:{}/health", w.http_port)).await;
            let r = w.readyz().await;
            Ok(
                matches!((h, r), (Some((503, _)), Some((503, b))) if b.contains("NATS"))
                    .then_some(()),
            )
        },
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_deleted_mid_run_is_reported_and_bound_again() -> anyhow::Result<()> {
    let (server, js) = setup(Duration::from_secs(5)).await?;
    let w = WorkerProcess::spawn(&binary("order-worker")?, &worker_env(&server, &[])).await?;
    w.wait_ready().await?;
    js.get_stream("ORDERS")
        .await?
        .delete_consumer("order-workers")
        .await?;
    wait_for(
        "/readyz to name the deleted consumer",
        Duration::from_secs(20),
        || async {
            Ok(match w.readyz().await {
                Some((503, b))
                    if b.contains("consumer order-workers on stream ORDERS does not exist") =>
                {
                    Some(())
                }
                _ => None,
            })
        },
    )
    .await?;
    topology(Duration::from_secs(5)).ensure(&js).await?;
    w.wait_ready().await?;
    let report =
        ctl::publish_orders(&js, &publish_opts(&format!("c{}", random_suffix()), 20)).await?;
    drained(&js, Duration::from_secs(60)).await?;
    audit(&js)
        .await?
        .assert_exactly_once(&report.valid_ids, &report.invalid_ids)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_work_is_kept_alive_with_in_progress_acks() -> anyhow::Result<()> {
    // ack wait 1 s, each downstream call 2.5 s: without in-progress acks every
    // order would be redelivered while still being processed.
    let (server, js) = setup(Duration::from_secs(1)).await?;
    let stub = DownstreamStub::start(StubBehaviour {
        delay: Duration::from_millis(2500),
        ..Default::default()
    })
    .await?;
    let w = WorkerProcess::spawn(
        &binary("order-worker")?,
        &worker_env(
            &server,
            &[("DOWNSTREAM_URL", &stub.url), ("DOWNSTREAM_TIMEOUT", "10s")],
        ),
    )
    .await?;
    w.wait_ready().await?;
    let report =
        ctl::publish_orders(&js, &publish_opts(&format!("s{}", random_suffix()), 3)).await?;
    drained(&js, Duration::from_secs(60)).await?;
    let a = audit(&js).await?;
    a.assert_exactly_once(&report.valid_ids, &[])?;
    for id in &report.valid_ids {
        assert_eq!(stub.calls_for(id), 1, "{id} was not redelivered");
    }
    let s = js.get_stream("ORDERS").await?;
    assert_eq!(s.consumer_info("order-workers").await?.num_redelivered, 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_naks_what_cannot_finish_within_the_grace_and_exits_0() -> anyhow::Result<()> {
    let (server, js) = setup(Duration::from_secs(30)).await?;
    let stub = DownstreamStub::start(StubBehaviour {
        delay: Duration::from_secs(6),
        ..Default::default()
    })
    .await?;
    let env = worker_env(
        &server,
        &[
            ("DOWNSTREAM_URL", &stub.url),
            ("DOWNSTREAM_TIMEOUT", "20s"),
            ("SHUTDOWN_GRACE", "1s"),
        ],
    );
    let mut w = WorkerProcess::spawn(&binary("order-worker")?, &env).await?;
    w.wait_ready().await?;
    let report =
        ctl::publish_orders(&js, &publish_opts(&format!("t{}", random_suffix()), 3)).await?;
    wait_for("the calls to start", Duration::from_secs(20), || async {
        Ok((stub.total_calls() >= 3).then_some(()))
    })
    .await?;
    w.signal("TERM").await?;
    assert_eq!(
        w.wait(Duration::from_secs(15)).await?,
        Some(0),
        "exits 0 after the grace: {}",
        w.log_text()
    );
    assert!(
        w.log_text().contains("shutdown grace expired"),
        "{}",
        w.log_text()
    );
    // NAKed, not left to the 30 s ack wait: another worker finishes them now.
    let fast = DownstreamStub::start(StubBehaviour::default()).await?;
    let w2 = WorkerProcess::spawn(
        &binary("order-worker")?,
        &worker_env(&server, &[("DOWNSTREAM_URL", &fast.url)]),
    )
    .await?;
    w2.wait_ready().await?;
    drained(&js, Duration::from_secs(20)).await?;
    audit(&js)
        .await?
        .assert_exactly_once(&report.valid_ids, &[])?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_of_the_protocol_before_v2_still_count_after_the_upgrade() -> anyhow::Result<()> {
    use orderpipeline_common::names::legacy_state_key;
    let (server, js) = setup(Duration::from_secs(5)).await?;
    // The bucket as the protocol before v2 left it: final records and a pending one.
    let kv = js.create_key_value(Topology::default().kv_config()).await?;
    let s = random_suffix();
    let (done, spaced, pending, fresh) = (
        format!("old-{s}"),
        format!("old {s}"),
        format!("half-{s}"),
        format!("new-{s}"),
    );
    let record = |state: &str| {
        format!(
            r#"{{"state":"{state}","stream_sequence":1,"delivery_count":1,"worker":"w","updated_at_ms":1}}"#
        )
    };
    kv.put(legacy_state_key(&done), record("processed").into())
        .await?;
    kv.put(legacy_state_key(&spaced), record("rejected").into())
        .await?;
    kv.put(legacy_state_key(&pending), record("pending").into())
        .await?;
    let w = WorkerProcess::spawn(
        &binary("order-worker")?,
        &worker_env(&server, &[("LEGACY_STATE_BUCKET", "ORDERS_STATE")]),
    )
    .await?;
    w.wait_ready().await?;
    for (n, id) in [&done, &spaced, &pending, &fresh].into_iter().enumerate() {
        publish_raw(&js, id, ctl::valid_order(id, n as u64).encode_to_vec()).await?;
    }
    drained(&js, Duration::from_secs(60)).await?;
    let mut a = audit(&js).await?;
    for id in [&done, &spaced] {
        let key = orderpipeline_common::names::order_key(id).context("key")?;
        assert!(
            !a.chains.contains_key(&key),
            "{id} had its outcome before v2"
        );
    }
    assert!(
        !a.violations().is_empty(),
        "without the old records the audit misses two outcomes"
    );
    a.honour_legacy_records(&js, "ORDERS_STATE").await?;
    // A pending record is no outcome: that order and the new one are processed now.
    a.assert_exactly_once(&[pending.clone(), fresh.clone()], &[])?;
    let (_, metrics) = http_get(&format!("http://127.0.0.1:{}/metrics", w.http_port))
        .await
        .context("metrics")?;
    assert!(
        metrics.contains("orderworker_duplicates_skipped_total 2"),
        "{metrics}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_replay_header_is_ignored_and_a_letter_without_id_is_replayed_once()
-> anyhow::Result<()> {
    let (server, js) = setup(Duration::from_secs(5)).await?;
    let w = WorkerProcess::spawn(&binary("order-worker")?, &worker_env(&server, &[])).await?;
    w.wait_ready().await?;
    let id = format!("forge-{}", random_suffix());
    publish_raw(&js, &id, ctl::valid_order(&id, 1).encode_to_vec()).await?;
    publish_raw(
        &js,
        &format!("poison-{}", random_suffix()),
        vec![0xff, 0xff, 0x01],
    )
    .await?;
    drained(&js, Duration::from_secs(30)).await?;
    // The DLQ stream sources the letter from the input stream asynchronously:
    // it may arrive just after the input is acked.
    let letters = wait_for(
        "the poison's letter in ORDERS_DLQ",
        Duration::from_secs(10),
        || async {
            let l = ctl::dlq_list(&js, "ORDERS_DLQ", 10).await?;
            Ok((!l.is_empty()).then_some(l))
        },
    )
    .await?;
    assert_eq!(letters.len(), 1, "the poison's letter");
    let a = audit(&js).await?;
    let processed = a.chains[&orderpipeline_common::names::order_key(&id).context("key")?][0].seq;

    // A producer sets the replay header naming the order's processed outcome and
    // the poison's letter: ignored (not a dead letter), nothing is removed.
    let mut h = async_nats::HeaderMap::new();
    h.insert("Nats-Msg-Id", format!("{id}-forged").as_str());
    h.insert(
        orderpipeline_common::names::REPLAY_OF_HEADER,
        format!("{processed}/{}", letters[0].dlq_sequence).as_str(),
    );
    js.publish_with_headers(
        "ORDER.created",
        h,
        ctl::valid_order(&id, 1).encode_to_vec().into(),
    )
    .await?
    .await?;
    // The poison's letter (keyed by the input's position) replayed twice.
    ctl::dlq_replay(&js, "ORDERS_DLQ", letters[0].dlq_sequence).await?;
    if let Err(e) = ctl::dlq_replay(&js, "ORDERS_DLQ", letters[0].dlq_sequence).await {
        assert!(e.to_string().contains("already replayed"), "{e:#}");
    }
    drained(&js, Duration::from_secs(30)).await?;
    let a = audit(&js).await?;
    assert!(a.violations().is_empty(), "{:?}", a.violations());
    a.assert_exactly_once(std::slice::from_ref(&id), &[])?;
    // Still undecodable: one current dead letter, which superseded the first.
    assert_eq!(a.dead_letter_count(), 1);
    let poison_chain = a
        .chains
        .values()
        .find(|c| c[0].kind == orderpipeline_common::names::OutcomeKind::DeadLettered)
        .context("the poison's chain")?;
    assert_eq!(poison_chain.len(), 2, "{poison_chain:?}");
    assert_eq!(poison_chain[1].replay_of, Some(poison_chain[0].seq));
    Ok(())
}

/// A replay whose letter's marker is removed while its downstream call is in
/// flight (maxAge, `nats stream rmm`, a purge) still ends with exactly one
/// outcome: its write over the vanished marker conflicts, the key has no outcome
/// left, and it writes over nothing; then the letter goes. (Before, the conflict
/// read as "superseded": the letter was removed, the downstream charged, and the
/// order left with no outcome.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_whose_marker_vanishes_mid_flight_still_ends_with_one_outcome()
-> anyhow::Result<()> {
    let (server, js) = setup(Duration::from_secs(10)).await?;
    let bin = binary("order-worker")?;
    // Dead-lettered first: the downstream refuses the order for good.
    let id = format!("dl-gone-{}", random_suffix());
    let marker = dead_letter_one(&server, &js, &id).await?;
    let letter = letter_of(&js, marker, &id).await?;

    // The replay meets a slow downstream; the marker goes while it waits.
    let slow = DownstreamStub::start(StubBehaviour {
        delay: Duration::from_secs(3),
        ..Default::default()
    })
    .await?;
    let w2 =
        WorkerProcess::spawn(&bin, &worker_env(&server, &[("DOWNSTREAM_URL", &slow.url)])).await?;
    w2.wait_ready().await?;
    ctl::dlq_replay(&js, "ORDERS_DLQ", letter.dlq_sequence).await?;
    wait_for(
        "the replay's downstream call",
        Duration::from_secs(20),
        || async { Ok((slow.calls_for(&id) > 0).then_some(())) },
    )
    .await?;
    js.get_stream("ORDERS")
        .await?
        .delete_message(marker)
        .await?;
    drained(&js, Duration::from_secs(30)).await?;
    wait_dlq_empty(&js, "ORDERS_DLQ", Duration::from_secs(30)).await?;
    let a = audit(&js).await?;
    let chain = chain_of(&a, &id);
    assert_eq!(
        chain,
        ["processed"],
        "one outcome, written over nothing\n{}",
        w2.log_text()
    );
    assert_eq!(a.processed.get(&id), Some(&1));
    assert!(slow.charged(&id), "the replay's charge has its outcome");
    assert_eq!(a.summary().lost, 0);
    assert!(a.violations().is_empty(), "{:?}", a.violations());
    Ok(())
}

/// Dead-letters `id` with a worker whose downstream refuses it; returns its
/// marker's sequence in the input stream.
async fn dead_letter_one(
    server: &NatsServer,
    js: &jetstream::Context,
    id: &str,
) -> anyhow::Result<u64> {
    let refusing = DownstreamStub::start(StubBehaviour {
        refuse_prefix: Some("dl-".into()),
        ..Default::default()
    })
    .await?;
    let mut w = WorkerProcess::spawn(
        &binary("order-worker")?,
        &worker_env(server, &[("DOWNSTREAM_URL", &refusing.url)]),
    )
    .await?;
    w.wait_ready().await?;
    publish_raw(js, id, ctl::valid_order(id, 1).encode_to_vec()).await?;
    drained(js, Duration::from_secs(30)).await?;
    w.signal("TERM").await?;
    w.wait(Duration::from_secs(30)).await?;
    let key = orderpipeline_common::names::order_key(id).context("key")?;
    Ok(js
        .get_stream("ORDERS")
        .await?
        .get_last_raw_message_by_subject(&format!("ORDER.deadlettered.{key}"))
        .await?
        .sequence)
}

/// Waits for `order_id`'s letter the DLQ stream copied from `marker` (it
/// sources the letters asynchronously: one may arrive just after its input is
/// acked, and after the input stream is recreated only once the source's 10 s
/// health check notices the new stream).
async fn letter_of(
    js: &jetstream::Context,
    marker: u64,
    order_id: &str,
) -> anyhow::Result<ctl::StoredDeadLetter> {
    wait_for(
        &format!("the letter of {order_id} (marker {marker}) in ORDERS_DLQ"),
        Duration::from_secs(60),
        || async {
            let l = ctl::dlq_list(js, "ORDERS_DLQ", 100).await?;
            Ok(l.into_iter()
                .find(|l| l.marker == Some(marker) && l.letter.order_id == order_id))
        },
    )
    .await
}

/// The key's outcome kinds, oldest first.
fn chain_of(a: &Audit, id: &str) -> Vec<&'static str> {
    let key = orderpipeline_common::names::order_key(id).unwrap_or_default();
    a.chains
        .get(&key)
        .map(|c| c.iter().map(|o| o.kind.token()).collect())
        .unwrap_or_default()
}

/// An old dead letter replayed after its input stream was deleted and created
/// again (the DLQ kept: sequences restart) names a sequence that now holds
/// another order's marker. The replay must not write that order's outcome:
/// orderctl sees that the letter's stream is gone and replays it as a new input
/// (the letter goes); a replay header naming the other order's marker (forged,
/// or from an older orderctl) is refused by the worker and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_letter_replayed_after_its_stream_was_recreated_touches_no_other_order()
-> anyhow::Result<()> {
    let (server, js) = setup(Duration::from_secs(5)).await?;
    let (a, b) = (
        format!("dl-a-{}", random_suffix()),
        format!("dl-b-{}", random_suffix()),
    );
    let a_marker = dead_letter_one(&server, &js, &a).await?;
    let letter_a = letter_of(&js, a_marker, &a).await?;
    let old_created = orderpipeline_common::topology::unix_ns(
        js.get_stream("ORDERS").await?.info().await?.created,
    );
    js.delete_stream("ORDERS").await?;
    topology(Duration::from_secs(5)).ensure(&js).await?;
    let b_marker = dead_letter_one(&server, &js, &b).await?;
    assert_eq!(b_marker, a_marker, "B's marker took the sequence of A's");
    // B's letter reaches the DLQ although its sequence is one the DLQ copied
    // before (nats-server 2.15 re-sources a recreated origin; 2.12 skipped it,
    // nats-server #6206), and it is B's, beside A's.
    let letter_b = letter_of(&js, b_marker, &b).await?;
    assert_ne!(letter_b.dlq_sequence, letter_a.dlq_sequence);

    let healthy = DownstreamStub::start(StubBehaviour::default()).await?;
    let w = WorkerProcess::spawn(
        &binary("order-worker")?,
        &worker_env(&server, &[("DOWNSTREAM_URL", &healthy.url)]),
    )
    .await?;
    w.wait_ready().await?;
    let how = ctl::dlq_replay(&js, "ORDERS_DLQ", letter_a.dlq_sequence).await?;
    assert!(how.contains("as a new input"), "{how}");
    drained(&js, Duration::from_secs(30)).await?;
    // The same replay with the old stream's identity, and one naming B's marker
    // with A's order (a forger's, or an older orderctl's): both refused.
    for (n, stream_header) in [(1, Some(old_created)), (2, None)] {
        let mut h = async_nats::HeaderMap::new();
        h.insert("Nats-Msg-Id", format!("{a}-forged-{n}").as_str());
        h.insert(
            orderpipeline_common::names::REPLAY_OF_HEADER,
            format!("{b_marker}/{}", letter_a.dlq_sequence).as_str(),
        );
        if let Some(c) = stream_header {
            h.insert(
                orderpipeline_common::names::REPLAY_STREAM_HEADER,
                c.to_string().as_str(),
            );
        }
        js.publish_with_headers(
            "ORDER.created",
            h,
            ctl::valid_order(&a, 1).encode_to_vec().into(),
        )
        .await?
        .await?;
    }
    drained(&js, Duration::from_secs(30)).await?;
    let audit = audit(&js).await?;
    assert_eq!(
        chain_of(&audit, &b),
        ["deadlettered"],
        "B keeps its own outcome\n{}",
        w.log_text()
    );
    // (Copies of A stored after its outcome keep it: `kept`, no outcome of their own.)
    let chain = chain_of(&audit, &a);
    assert!(
        chain.first() == Some(&"processed") && chain[1..].iter().all(|k| *k == "kept"),
        "A processed once, under its own key: {chain:?}"
    );
    assert!(healthy.charged(&a) && !healthy.charged(&b));
    let (_, metrics) = http_get(&format!("http://127.0.0.1:{}/metrics", w.http_port))
        .await
        .context("metrics")?;
    for reason in ["other_stream", "other_order"] {
        assert!(
            metrics.contains(&format!(
                "orderworker_replays_refused_total{{reason=\"{reason}\"}} 1"
            )),
            "{reason}: {metrics}"
        );
    }
    assert!(
        ctl::dlq_list(&js, "ORDERS_DLQ", 100)
            .await?
            .iter()
            .all(|l| l.dlq_sequence != letter_a.dlq_sequence),
        "A's letter is gone with its replay"
    );
    Ok(())
}

/// A healthy pipeline a week later, time compressed: its oldest inputs are
/// removed from the stream (as `maxAge` removes them; here a purge up to a
/// sequence) while their newer outcomes stay, then the outcomes and a dead
/// letter's marker too while the DLQ keeps the letter. The audit reports those
/// as archived, not as violations, and `orderctl audit` exits 0 (before: 1, with
/// "outcomes with no stored input" and "dead letters with no input").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aged_healthy_pipeline_audits_clean() -> anyhow::Result<()> {
    let (server, js) = setup(Duration::from_secs(5)).await?;
    let prefix = format!("aged{}", random_suffix());
    ctl::publish_orders(&js, &publish_opts(&prefix, 20)).await?;
    publish_raw(&js, &format!("{prefix}-poison"), vec![0xff, 0xff, 0x01]).await?;
    let stream = js.get_stream("ORDERS").await?;
    let last_input = stream.get_info().await?.state.last_sequence;
    let w = WorkerProcess::spawn(&binary("order-worker")?, &worker_env(&server, &[])).await?;
    w.wait_ready().await?;
    drained(&js, Duration::from_secs(30)).await?;
    wait_for("the poison's letter", Duration::from_secs(10), || async {
        Ok((!ctl::dlq_list(&js, "ORDERS_DLQ", 10).await?.is_empty()).then_some(()))
    })
    .await?;
    let orderctl_audit = || async {
        tokio::process::Command::new(binary("orderctl")?)
            .args(["audit"])
            .env("NATS_URL", server.url())
            .output()
            .await
            .context("orderctl audit")
    };

    // The inputs age out; their outcomes (newer) stay.
    stream.purge().sequence(last_input + 1).await?;
    let a = audit(&js).await?;
    assert!(a.violations().is_empty(), "{:?}", a.violations());
    assert_eq!((a.summary().archived_outcomes, a.summary().lost), (21, 0));
    let out = orderctl_audit().await?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("archived               21 outcomes and 0 dead letters"),
        "{text}"
    );

    // Then the outcomes and the poison's marker too; the DLQ keeps the letter.
    stream.purge().await?;
    let a = audit(&js).await?;
    assert!(a.violations().is_empty(), "{:?}", a.violations());
    assert_eq!(a.summary().archived_letters, 1);
    let out = orderctl_audit().await?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(())
}

/// A letter whose marker aged out of the input stream (the DLQ keeps letters
/// longer: 30 d against 7 d by default) replayed: the order is a new input under
/// its own key, and the letter goes once it has its outcome (before: the replay
/// was processed but the letter stayed in the DLQ for good).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_letter_whose_marker_aged_out_is_replayed_and_removed() -> anyhow::Result<()> {
    let (server, js) = setup(Duration::from_secs(5)).await?;
    let id = format!("dl-old-{}", random_suffix());
    let marker = dead_letter_one(&server, &js, &id).await?;
    let letter = letter_of(&js, marker, &id).await?;
    // The input and its marker age out.
    js.get_stream("ORDERS")
        .await?
        .purge()
        .sequence(marker + 1)
        .await?;
    let healthy = DownstreamStub::start(StubBehaviour::default()).await?;
    let w = WorkerProcess::spawn(
        &binary("order-worker")?,
        &worker_env(&server, &[("DOWNSTREAM_URL", &healthy.url)]),
    )
    .await?;
    w.wait_ready().await?;
    ctl::dlq_replay(&js, "ORDERS_DLQ", letter.dlq_sequence).await?;
    drained(&js, Duration::from_secs(30)).await?;
    wait_dlq_empty(&js, "ORDERS_DLQ", Duration::from_secs(30))
        .await
        .with_context(|| w.log_text())?;
    let a = audit(&js).await?;
    assert_eq!(chain_of(&a, &id), ["processed"]);
    assert!(healthy.charged(&id));
    assert!(a.violations().is_empty(), "{:?}", a.violations());
    Ok(())
}

/// The one "not found" test (`orderpipeline_common::nats::is_not_found`) on a real
/// server's answers: a missing stream, bucket and consumer are; others are not.
#[tokio::test]
async fn not_found_is_recognised_from_the_servers_code() -> anyhow::Result<()> {
    use orderpipeline_common::nats::is_not_found;
    let (_server, js) = setup(Duration::from_secs(5)).await?;
    let e = js
        .get_stream("NOPE")
        .await
        .err()
        .context("no stream NOPE")?;
    assert!(is_not_found(&e), "{e}");
    let e = js
        .get_key_value("NOPE")
        .await
        .err()
        .context("no bucket NOPE")?;
    assert!(is_not_found(&e), "{e}");
    let stream = js.get_stream("ORDERS").await?;
    let e = stream
        .get_consumer::<jetstream::consumer::pull::Config>("nope")
        .await
        .err()
        .context("no consumer nope")?;
    assert!(is_not_found(&*e), "{e}");
    // An invalid name is refused by the client, not "not found".
    let e = js
        .get_key_value("bad.name")
        .await
        .err()
        .context("invalid")?;
    assert!(!is_not_found(&e), "{e}");
    Ok(())
}

/// Issue 23, item 6, the worker's half: the Idempotency-Key's scope is the one
/// pinned in the input stream's metadata (by the operator: `<cluster>/<ns>/<name>`),
/// whatever the worker's PIPELINE says, so every worker of a stream, the
/// operator's or one run by hand, sends the same key for an order, and the same
/// pipeline in two clusters never does. Without a pin, PIPELINE (then the stream
/// name) is the scope, as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_idempotency_key_carries_the_scope_pinned_on_the_stream() -> anyhow::Result<()> {
    let server = NatsServer::start().await?;
    let js = jetstream::new(async_nats::connect(server.url()).await?);
    let t = Topology {
        idempotency_scope: Some("cluster-a/shop/orders".into()),
        ..topology(Duration::from_secs(10))
    };
    t.ensure(&js).await?;
    let stub = DownstreamStub::start(StubBehaviour::default()).await?;
    let w = WorkerProcess::spawn(
        &binary("order-worker")?,
        &worker_env(
            &server,
            &[("DOWNSTREAM_URL", &stub.url), ("PIPELINE", "shop/orders")],
        ),
    )
    .await?;
    w.wait_ready().await?;
    let report = ctl::publish_orders(&js, &publish_opts("scoped", 5)).await?;
    drained(&js, Duration::from_secs(30)).await?;
    audit(&js)
        .await?
        .assert_exactly_once(&report.valid_ids, &[])?;
    let scopes = stub.scopes.lock().unwrap().clone();
    assert_eq!(
        scopes.into_iter().collect::<Vec<_>>(),
        ["cluster-a/shop/orders"],
        "{}",
        w.log_text()
    );
    Ok(())
}

/// Issue 23, item 3: an order stored a second time after its outcome (a
/// producer's re-send after the duplicate window) keeps that outcome alive: the
/// second copy writes `ORDER.kept.<key>` over it, so the key's last message is
/// newer than every copy. When the first copy and its outcome are removed (aged
/// out; here `rmm`, as maxAge would) and the consumer is recreated (delivering
/// everything stored again), the second copy finds the kept outcome: no second
/// downstream call, no second OrderProcessed. Before, it found nothing and was
/// processed and charged again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_copy_keeps_the_outcome_when_the_first_is_removed() -> anyhow::Result<()> {
    let (server, js) = setup(Duration::from_secs(5)).await?;
    let stub = DownstreamStub::start(StubBehaviour::default()).await?;
    let w = WorkerProcess::spawn(
        &binary("order-worker")?,
        &worker_env(&server, &[("DOWNSTREAM_URL", &stub.url)]),
    )
    .await?;
    w.wait_ready().await?;
    let id = format!("kept-{}", random_suffix());
    let order = ctl::valid_order(&id, 1).encode_to_vec();
    let first = publish_raw(&js, &format!("{id}-1"), order.clone()).await?;
    acked_through(&js, first).await?;
    let stream = js.get_stream("ORDERS").await?;
    let outcome = stream
        .get_last_raw_message_by_subject(&format!("ORDER.processed.{id}"))
        .await?
        .sequence;
    let second = publish_raw(&js, &format!("{id}-2"), order).await?;
    // Acknowledged, not only "nothing pending": right after a publish the
    // consumer may not count the new input yet (its pending count follows the
    // stream asynchronously), and the copy would then be processed after the
    // first is removed below.
    acked_through(&js, second).await?;
    assert_eq!(stub.calls_for(&id), 1);
    // The first copy and its outcome go, as maxAge would take them.
    for seq in [first, outcome] {
        assert!(stream.delete_message(seq).await?);
    }
    // A consumer recreated (DeliverPolicy All) delivers the second copy again.
    stream.delete_consumer("order-workers").await?;
    topology(Duration::from_secs(5)).ensure(&js).await?;
    w.wait_ready().await?;
    drained(&js, Duration::from_secs(30)).await?;
    assert_eq!(
        stub.calls_for(&id),
        1,
        "the second copy was charged again: {}",
        w.log_text()
    );
    let kept = stream
        .get_last_raw_message_by_subject(&format!("ORDER.*.{id}"))
        .await?;
    assert_eq!(
        kept.subject.as_str(),
        format!("ORDER.kept.{id}"),
        "{}",
        w.log_text()
    );
    let a = audit(&js).await?;
    assert_eq!(a.violations(), Vec::<String>::new());
    assert!(second > outcome);
    Ok(())
}
