//! order-operator on the real control plane and a real nats-server. Every test
//! runs the operator as its ServiceAccount (RBAC from manifests/), in its own
//! namespace, against its own nats-server.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use order_operator::crd::OrderPipeline;
use orderpipeline_e2e::natsauth::{jetstream_as, operator_mode, probe};
use orderpipeline_e2e::operator::{
    OPERATOR_NAMESPACE, OperatorProcess, install_crd_and_rbac, repo_root,
    service_account_kubeconfig,
};
use orderpipeline_e2e::{NatsServer, TestNamespace, kube_client, wait_for};

fn sample(nats_url: &str) -> anyhow::Result<OrderPipeline> {
    let text = std::fs::read_to_string(repo_root().join("manifests/samples/orderpipeline.yaml"))?;
    let mut p: OrderPipeline = serde_yaml::from_str(&text)?;
    p.spec.nats.url = nats_url.to_string();
    p.spec.telemetry.otlp_endpoint = None;
    Ok(p)
}

struct Setup {
    client: Client,
    ns: TestNamespace,
    nats: NatsServer,
    js: jetstream::Context,
    operator: OperatorProcess,
    api: Api<OrderPipeline>,
    /// Stops the pod runner (real workers for the namespace's worker Pods) on drop.
    _runner: Option<tokio_util::sync::DropGuard>,
}

/// `setup`, then the sample pipeline created and Ready.
/// The sample as pipeline `name` on its own stream `stream` (subjects
/// `<stream>.*`, filter `<stream>.created`); every other name derived.
fn sample_named(nats_url: &str, name: &str, stream: &str) -> anyhow::Result<OrderPipeline> {
    orderpipeline_e2e::operator::sample_on_stream(nats_url, name, stream)
}

async fn setup_ready(prefix: &str) -> anyhow::Result<Setup> {
    let s = setup(prefix).await?;
    s.api
        .create(&PostParams::default(), &sample(&s.nats.url())?)
        .await?;
    wait_ready(&s, "orders", "True", None).await?;
    Ok(s)
}

async fn setup(prefix: &str) -> anyhow::Result<Setup> {
    setup_with(prefix, true).await
}

/// `runner`: whether real workers run for the namespace's worker Pods.
async fn setup_with(prefix: &str, runner: bool) -> anyhow::Result<Setup> {
    let nats = NatsServer::start().await?;
    let js = jetstream::new(async_nats::connect(nats.url()).await?);
    setup_on(prefix, runner, nats, js, "2s").await
}

/// `resync`: the operator's RESYNC_INTERVAL (short, so most tests need not wait).
async fn setup_on(
    prefix: &str,
    runner: bool,
    nats: NatsServer,
    js: jetstream::Context,
    resync: &str,
) -> anyhow::Result<Setup> {
    setup_env(prefix, runner, nats, js, resync, |_| Vec::new()).await
}

/// [`setup_on`] with the operator's extra environment, given the namespace.
async fn setup_env(
    prefix: &str,
    runner: bool,
    nats: NatsServer,
    js: jetstream::Context,
    resync: &str,
    env: impl FnOnce(&str) -> Vec<(&'static str, String)>,
) -> anyhow::Result<Setup> {
    install_crd_and_rbac().await?;
    let client = kube_client().await?;
    let ns = TestNamespace::create(&client, prefix).await?;
    let operator = OperatorProcess::spawn_env(&ns.name, resync, &env(&ns.name)).await?;
    let api = Api::namespaced(client.clone(), &ns.name);
    let runner = match runner {
        true => Some(orderpipeline_e2e::podrunner::for_namespace(
            &client,
            &ns.name,
            Vec::new(),
        )?),
        false => None,
    };
    Ok(Setup {
        client,
        ns,
        nats,
        js,
        operator,
        api,
        _runner: runner,
    })
}

/// Waits until pipeline `name` of `api` is Ready=True.
async fn wait_ready_in(api: &Api<OrderPipeline>, name: &str) -> anyhow::Result<OrderPipeline> {
    wait_for(&format!("{name} Ready"), Duration::from_secs(60), || {
        let api = api.clone();
        async move {
            let p = api.get(name).await?;
            let ready = condition(&p, "Ready").is_some_and(|c| c.status == "True");
            Ok(ready.then_some(p))
        }
    })
    .await
}

fn condition<'a>(
    p: &'a OrderPipeline,
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    p.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
}

/// Waits until Ready has `status` (and `reason`, when given).
async fn wait_ready(
    s: &Setup,
    name: &str,
    status: &str,
    reason: Option<&str>,
) -> anyhow::Result<OrderPipeline> {
    let api = s.api.clone();
    wait_for(
        &format!("{name} Ready={status} {reason:?}"),
        Duration::from_secs(60),
        || {
            let api = api.clone();
            async move {
                let p = api.get(name).await?;
                let ok = condition(&p, "Ready")
                    .is_some_and(|c| c.status == status && reason.is_none_or(|r| c.reason == r));
                Ok(ok.then_some(p))
            }
        },
    )
    .await
    .with_context(|| format!("operator log:\n{}", s.operator.log_text()))
}

fn env_of(d: &Deployment) -> BTreeMap<String, String> {
    d.spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .map(|p| p.containers[0].env.clone().unwrap_or_default())
        .unwrap_or_default()
        .into_iter()
        .filter_map(|e| Some((e.name, e.value?)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sample_becomes_ready_with_matching_jetstream_objects_and_workers() -> anyhow::Result<()>
{
    let s = setup("op-sample").await?;
    s.api
        .create(&PostParams::default(), &sample(&s.nats.url())?)
        .await?;
    let p = wait_ready(&s, "orders", "True", Some("PipelineReady")).await?;
    let st = p.status.clone().context("status")?;
    assert_eq!(st.observed_generation, p.metadata.generation);
    assert_eq!(st.workers_ready.as_deref(), Some("2/2"));
    assert_eq!(st.lag, Some(0));
    assert_eq!(st.dead_letters, Some(0));
    for t in [
        "StreamReady",
        "ConsumerReady",
        "WorkersAvailable",
        "DuplicateWindowSufficient",
    ] {
        assert_eq!(
            condition(&p, t).map(|c| c.status.as_str()),
            Some("True"),
            "{t}"
        );
    }

    // JetStream objects, read back with a NATS client.
    let mut stream = s.js.get_stream("ORDERS").await?;
    let cfg = stream.info().await?.config.clone();
    // The spec's subjects, plus the outcome subjects (outcomes live in the input
    // stream since the v2 protocol).
    assert_eq!(
        cfg.subjects,
        vec![
            "ORDER.*",
            "ORDER.processed.*",
            "ORDER.rejected.*",
            "ORDER.deadlettered.*",
            "ORDER.kept.*"
        ]
    );
    let dlq_cfg =
        s.js.get_stream("ORDERS_DLQ")
            .await?
            .info()
            .await?
            .config
            .clone();
    let sources: Vec<_> = dlq_cfg
        .sources
        .iter()
        .flatten()
        .map(|x| (x.name.as_str(), x.filter_subject.as_deref()))
        .collect();
    assert_eq!(sources, [("ORDERS", Some("ORDER.deadlettered.*"))]);
    assert_eq!(cfg.storage, jetstream::stream::StorageType::File);
    assert_eq!(cfg.num_replicas, 1);
    assert_eq!(cfg.max_age, Duration::from_secs(7 * 86400));
    assert_eq!(cfg.duplicate_window, Duration::from_secs(30 * 60));
    assert_eq!(
        cfg.metadata
            .get("orderpipeline.dev/owner")
            .map(String::as_str),
        Some(format!("{}/orders", s.ns.name).as_str())
    );
    let mut dlq = s.js.get_stream("ORDERS_DLQ").await?;
    assert_eq!(dlq.info().await?.config.subjects, vec!["DLQ.ORDER.created"]);
    assert!(
        s.js.get_key_value("ORDERS_STATE").await.is_err(),
        "a new pipeline gets no bucket of the protocol before v2"
    );
    let c = stream.consumer_info("order-workers").await?;
    assert_eq!(c.config.filter_subject, "ORDER.created");
    assert_eq!(c.config.ack_wait, Duration::from_secs(30));
    assert_eq!(
        c.config.max_deliver, -1,
        "the workers count attempts; the server never strands"
    );
    assert_eq!(c.config.max_ack_pending, 2 * 10, "replicas x poolSize");

    // The worker Deployment.
    let deployments: Api<Deployment> = Api::namespaced(s.client.clone(), &s.ns.name);
    let d = deployments.get("orders-workers").await?;
    assert_eq!(d.spec.as_ref().and_then(|s| s.replicas), Some(2));
    let env = env_of(&d);
    assert_eq!(env["NATS_URL"], s.nats.url());
    assert_eq!(env["WORKER_POOL_SIZE"], "10");
    assert_eq!(env["STREAM_NAME"], "ORDERS");
    assert_eq!(env["MAX_DELIVERIES"], "5");
    assert!(env["OTEL_RESOURCE_ATTRIBUTES"].contains(&format!("k8s.namespace.name={}", s.ns.name)));
    let owner = &d.metadata.owner_references.as_ref().context("owner")?[0];
    assert_eq!(owner.kind, "OrderPipeline");
    assert_eq!(owner.uid, p.metadata.uid.clone().unwrap_or_default());

    // The workers' NetworkPolicy: the Deployment's Pods, in only on the HTTP
    // port, out only to DNS and this NATS (an address: its ipBlock and port).
    let policies: Api<NetworkPolicy> = Api::namespaced(s.client.clone(), &s.ns.name);
    let np = policies.get("orders-workers").await?;
    let spec = serde_json::to_value(np.spec.as_ref().context("policy spec")?)?;
    let selector = d.spec.as_ref().map(|s| s.selector.clone());
    assert_eq!(spec["podSelector"], serde_json::to_value(&selector)?);
    assert_eq!(
        spec["policyTypes"],
        serde_json::json!(["Ingress", "Egress"])
    );
    assert_eq!(
        spec["ingress"],
        serde_json::json!([{"ports": [{"protocol": "TCP", "port": 8080}]}])
    );
    let nats = s.nats.url().parse::<async_nats::ServerAddr>()?;
    assert_eq!(
        spec["egress"][1],
        serde_json::json!({"to": [{"ipBlock": {"cidr": format!("{}/32", nats.host())}}],
            "ports": [{"protocol": "TCP", "port": nats.port()}]}),
        "{spec}"
    );
    assert_eq!(spec["egress"].as_array().map(Vec::len), Some(2), "{spec}");
    let owner = &np.metadata.owner_references.as_ref().context("owner")?[0];
    assert_eq!(owner.uid, p.metadata.uid.clone().unwrap_or_default());

    // Spread over the nodes, and a drain takes one worker at a time.
    let pod = d
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.clone())
        .context("pod spec")?;
    let spread = serde_json::to_value(pod.topology_spread_constraints)?;
    assert_eq!(
        spread[0]["topologyKey"], "kubernetes.io/hostname",
        "{spread}"
    );
    assert_eq!(spread[0]["whenUnsatisfiable"], "ScheduleAnyway", "{spread}");
    let budgets: Api<PodDisruptionBudget> = Api::namespaced(s.client.clone(), &s.ns.name);
    let pdb = budgets.get("orders-workers").await?;
    let spec = serde_json::to_value(pdb.spec.as_ref().context("budget spec")?)?;
    assert_eq!(spec["maxUnavailable"], 1, "{spec}");
    assert_eq!(spec["selector"], serde_json::to_value(selector)?);
    let owner = &pdb.metadata.owner_references.as_ref().context("owner")?[0];
    assert_eq!(owner.uid, p.metadata.uid.clone().unwrap_or_default());

    // Events for the children.
    let events = tokio::process::Command::new("kubectl")
        .args([
            "-n",
            &s.ns.name,
            "get",
            "events",
            "-o",
            "jsonpath={.items[*].reason}",
        ])
        .output()
        .await?;
    let reasons = String::from_utf8_lossy(&events.stdout).to_string();
    for r in ["JetStreamCreated", "DeploymentCreated"] {
        assert_eq!(
            reasons.matches(r).count(),
            1,
            "one {r} Event expected: {reasons}"
        );
    }

    // The operator's metrics carry the pipeline.
    let metrics = operator_metrics(&s).await?;
    assert!(
        metrics.contains(&format!(
            "orderoperator_pipeline_replicas{{pipeline=\"{}/orders\"}} 2",
            s.ns.name
        )),
        "{metrics}"
    );
    s.ns.delete().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cel_rules_and_spec_checks_refuse_bad_specs_with_their_message() -> anyhow::Result<()> {
    let s = setup_ready("op-cel").await?;

    let patch = |v: serde_json::Value| {
        let api = s.api.clone();
        async move {
            api.patch("orders", &PatchParams::default(), &Patch::Merge(&v))
                .await
        }
    };
    let e = patch(serde_json::json!({"spec": {"stream": {"storage": "Memory"}}}))
        .await
        .expect_err("storage is immutable");
    assert!(e.to_string().contains("stream storage is immutable"), "{e}");
    let e = patch(serde_json::json!({"spec": {"stream": {"retention": "WorkQueue"}}}))
        .await
        .expect_err("to WorkQueue");
    assert!(
        e.to_string().contains("cannot change to or from WorkQueue"),
        "{e}"
    );
    // Interest passes the CEL rules but would delete the outcomes nobody consumes:
    // refused with the way back, which works.
    patch(serde_json::json!({"spec": {"stream": {"retention": "Interest"}}}))
        .await
        .context("Limits -> Interest passes the schema")?;
    let p = wait_ready(&s, "orders", "False", Some("InvalidSpec")).await?;
    let msg = &condition(&p, "Ready").context("Ready")?.message;
    assert!(
        msg.contains("retention Interest") && msg.contains("use retention Limits"),
        "{msg}"
    );
    patch(serde_json::json!({"spec": {"stream": {"retention": "Limits"}}})).await?;
    wait_ready(&s, "orders", "True", None).await?;
    let e = patch(serde_json::json!({"spec": {"workers": {"minReplicas": 5, "maxReplicas": 2}}}))
        .await
        .expect_err("min > max");
    assert!(e.to_string().contains("minReplicas must not exceed"), "{e}");
    let e = patch(serde_json::json!({"spec": {"workers": {"poolSize": 0}}}))
        .await
        .expect_err("positive sizes");
    assert!(e.to_string().contains("poolSize"), "{e}");
    // Every integer states its limit; the API server names the field and the bound.
    let e = patch(serde_json::json!({"spec": {"workers": {"replicas": 100000}}}))
        .await
        .expect_err("replicas beyond the bound");
    assert!(
        e.to_string().contains("spec.workers.replicas") && e.to_string().contains("1000"),
        "{e}"
    );
    let many = vec!["ORDER.*"; 65];
    let e = patch(serde_json::json!({"spec": {"stream": {"subjects": many}}}))
        .await
        .expect_err("too many subjects");
    assert!(e.to_string().contains("spec.stream.subjects"), "{e}");
    // A Secret read through the operator's Deployment: refused by the schema's CEL rule.
    let e = patch(serde_json::json!({"spec": {"workers": {"env": [
        {"name": "DB_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "db", "key": "password"}}}
    ]}}}))
    .await
    .expect_err("env from a Secret");
    assert!(
        e.to_string().contains("may not read Secrets or ConfigMaps"),
        "{e}"
    );

    // A dead-letter subject the stream would capture: refused before anything is created.
    let mut bad = sample(&s.nats.url())?;
    bad.metadata.name = Some("overlap".into());
    bad.spec.stream.name = "OTHER".into();
    bad.spec.dead_letter.stream_name = Some("OTHER_DLQ".into());
    bad.spec.state.bucket = Some("OTHER_STATE".into());
    bad.spec.dead_letter.subject = Some("ORDER.dead".into());
    s.api.create(&PostParams::default(), &bad).await?;
    let p = wait_ready(&s, "overlap", "False", Some("InvalidSpec")).await?;
    let msg = &condition(&p, "Ready").context("Ready")?.message;
    assert!(
        msg.contains("ORDER.dead") && msg.contains("ORDER.*"),
        "names both subjects: {msg}"
    );
    assert!(
        s.js.get_stream("OTHER").await.is_err(),
        "nothing is created for an invalid spec"
    );

    // workers.env may not override the operator -> worker contract.
    let mut env = sample(&s.nats.url())?;
    env.metadata.name = Some("env".into());
    env.spec.workers.env = vec![serde_json::from_value(
        serde_json::json!({"name": "STREAM_NAME", "value": "ELSEWHERE"}),
    )?];
    s.api.create(&PostParams::default(), &env).await?;
    let p = wait_ready(&s, "env", "False", Some("InvalidSpec")).await?;
    let msg = &condition(&p, "Ready").context("Ready")?.message;
    assert!(
        msg.contains("spec.workers.env[0] sets STREAM_NAME"),
        "{msg}"
    );

    // A Deployment the API server refuses (an invalid nodeSelector label value)
    // is a state with the server's words, not a quiet retry loop.
    s.api
        .patch(
            "orders",
            &PatchParams::default(),
            &Patch::Merge(&serde_json::json!({"spec": {"workers": {"nodeSelector": {"zone": "not a label value!"}}}})),
        )
        .await?;
    let p = wait_ready(&s, "orders", "False", Some("DeploymentInvalid")).await?;
    let msg = &condition(&p, "Ready").context("Ready")?.message;
    assert!(
        msg.contains("nodeSelector") && msg.contains("fix spec.workers"),
        "{msg}"
    );
    s.api
        .patch(
            "orders",
            &PatchParams::default(),
            &Patch::Merge(&serde_json::json!({"spec": {"workers": {"nodeSelector": null}}})),
        )
        .await?;
    wait_ready(&s, "orders", "True", None).await?;
    s.ns.delete().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_size_and_secret_changes_roll_into_the_deployment_and_consumer() -> anyhow::Result<()>
{
    let s = setup("op-change").await?;
    let secrets: Api<Secret> = Api::namespaced(s.client.clone(), &s.ns.name);
    // A token the (auth-less) test server ignores, to exercise the checksum.
    let secret = |token: &str| -> anyhow::Result<Secret> {
        Ok(serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "nats-creds"},
            "stringData": {"token": token}
        }))?)
    };
    let mut p = sample(&s.nats.url())?;
    p.spec.nats.credentials_secret_ref = Some(order_operator::crd::SecretRef {
        name: "nats-creds".into(),
    });
    s.api.create(&PostParams::default(), &p).await?;
    let blocked = wait_ready(&s, "orders", "False", Some("SecretMissing")).await?;
    assert!(condition(&blocked, "Ready").is_some_and(|c| c.message.contains("nats-creds")));
    secrets
        .create(&PostParams::default(), &secret("one")?)
        .await?;
    wait_ready(&s, "orders", "True", None)
        .await
        .context("fixing the cause makes the pipeline Ready")?;

    let deployments: Api<Deployment> = Api::namespaced(s.client.clone(), &s.ns.name);
    let checksum = |d: &Deployment| {
        d.spec
            .as_ref()
            .and_then(|s| s.template.metadata.as_ref())
            .and_then(|m| m.annotations.as_ref())
            .and_then(|a| a.get("orderpipeline.dev/secrets-checksum").cloned())
    };
    let first =
        checksum(&deployments.get("orders-workers").await?).context("checksum annotation")?;
    let d = deployments.get("orders-workers").await?;
    let token_env = d
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .map(|p| p.containers[0].env.clone().unwrap_or_default())
        .unwrap_or_default();
    assert!(
        token_env
            .iter()
            .any(|e| e.name == "NATS_TOKEN" && e.value_from.is_some()),
        "token projected from the Secret"
    );

    secrets
        .replace("nats-creds", &PostParams::default(), &{
            let mut s2 = secret("two")?;
            s2.metadata.resource_version =
                secrets.get("nats-creds").await?.metadata.resource_version;
            s2
        })
        .await?;
    wait_for(
        "the pod template checksum to change",
        Duration::from_secs(30),
        || {
            let deployments = deployments.clone();
            let first = first.clone();
            async move {
                Ok(checksum(&deployments.get("orders-workers").await?).filter(|c| *c != first))
            }
        },
    )
    .await?;

    s.api
        .patch(
            "orders",
            &PatchParams::default(),
            &Patch::Merge(&serde_json::json!({"spec": {"workers": {"poolSize": 25}}})),
        )
        .await?;
    wait_for(
        "WORKER_POOL_SIZE=25 and max_ack_pending=50",
        Duration::from_secs(30),
        || {
            let (deployments, js) = (deployments.clone(), s.js.clone());
            async move {
                let env = env_of(&deployments.get("orders-workers").await?);
                let stream = js.get_stream("ORDERS").await?;
                let c = stream.consumer_info("order-workers").await?;
                Ok(
                    (env.get("WORKER_POOL_SIZE").map(String::as_str) == Some("25")
                        && c.config.max_ack_pending == 50)
                        .then_some(()),
                )
            }
        },
    )
    .await?;
    s.ns.delete().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retain_keeps_the_stream_and_delete_removes_it() -> anyhow::Result<()> {
    let s = setup("op-delete").await?;
    let mut keep = sample(&s.nats.url())?;
    keep.metadata.name = Some("keep".into());
    s.api.create(&PostParams::default(), &keep).await?;
    let mut gone = sample(&s.nats.url())?;
    gone.metadata.name = Some("gone".into());
    gone.spec.stream.name = "GONE".into();
    gone.spec.stream.subjects = vec!["GONE.*".into()];
    gone.spec.consumer.filter_subject = "GONE.created".into();
    gone.spec.dead_letter.stream_name = Some("GONE_DLQ".into());
    gone.spec.dead_letter.subject = Some("DLQ.GONE.created".into());
    gone.spec.state.bucket = Some("GONE_STATE".into());
    gone.spec.stream.deletion_policy = order_operator::crd::DeletionPolicy::Delete;
    s.api.create(&PostParams::default(), &gone).await?;
    wait_ready(&s, "keep", "True", None).await?;
    wait_ready(&s, "gone", "True", None).await?;
    // gone was upgraded from v1: it still has the bucket v1 created.
    v1_bucket(&s.js, "GONE_STATE", Duration::ZERO).await?;

    // A pipeline naming keep's streams is refused (naming keep); deleting it, even
    // with deletionPolicy Delete, must not delete what belongs to keep.
    let mut intruder = sample(&s.nats.url())?;
    intruder.metadata.name = Some("intruder".into());
    intruder.spec.stream.deletion_policy = order_operator::crd::DeletionPolicy::Delete;
    s.api.create(&PostParams::default(), &intruder).await?;
    let p = wait_ready(&s, "intruder", "False", Some("InvalidSpec")).await?;
    let msg = &condition(&p, "Ready").context("Ready")?.message;
    assert!(
        msg.contains(&format!("belongs to pipeline {}/keep", s.ns.name)),
        "{msg}"
    );
    s.api.delete("intruder", &DeleteParams::default()).await?;
    wait_for("the intruder deleted", Duration::from_secs(60), || async {
        Ok(s.api.get_opt("intruder").await?.is_none().then_some(()))
    })
    .await?;
    assert!(
        s.js.get_stream("ORDERS").await.is_ok(),
        "keep's stream stays"
    );
    assert!(s.js.get_stream("ORDERS_DLQ").await.is_ok());
    assert!(
        event_reasons(&s.ns.name)
            .await?
            .contains("kept stream ORDERS, stream ORDERS_DLQ (not created by this pipeline)")
    );
    wait_ready(&s, "keep", "True", None).await?;

    for name in ["keep", "gone"] {
        s.api.delete(name, &DeleteParams::default()).await?;
    }
    let api = s.api.clone();
    wait_for(
        "both pipelines to be deleted",
        Duration::from_secs(60),
        || {
            let api = api.clone();
            async move {
                Ok(
                    (api.get_opt("keep").await?.is_none() && api.get_opt("gone").await?.is_none())
                        .then_some(()),
                )
            }
        },
    )
    .await?;
    assert!(
        s.js.get_stream("ORDERS").await.is_ok(),
        "Retain keeps the stream"
    );
    assert!(s.js.get_stream("ORDERS_DLQ").await.is_ok());
    assert!(
        s.js.get_key_value("ORDERS_STATE").await.is_err(),
        "never created"
    );
    assert!(
        s.js.get_stream("GONE").await.is_err(),
        "Delete removes the stream"
    );
    assert!(s.js.get_stream("GONE_DLQ").await.is_err());
    assert!(
        s.js.get_key_value("GONE_STATE").await.is_err(),
        "Delete removes the bucket a pipeline upgraded from v1 still had"
    );
    s.ns.delete().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_going_away_turns_ready_false_and_back() -> anyhow::Result<()> {
    let mut s = setup_ready("op-nats").await?;
    s.nats.stop().await?;
    let p = wait_ready(&s, "orders", "False", Some("NatsUnreachable")).await?;
    let msg = &condition(&p, "Ready").context("Ready")?.message;
    assert!(msg.contains(&s.nats.url()) || msg.contains("NATS"), "{msg}");
    for type_ in ["StreamReady", "ConsumerReady"] {
        let c = condition(&p, type_).context(type_)?;
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "NatsUnreachable"),
            "{type_} does not keep a stale True"
        );
    }
    // A spec change made during the outage is recorded as observed (tools read
    // observedGeneration) but not applied: once NATS is back, applying it is an
    // update the user asked for, not drift.
    s.api
        .patch(
            "orders",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"stream": {"maxAge": "2h"}}})),
        )
        .await?;
    wait_for(
        "the change observed while NATS is away",
        Duration::from_secs(30),
        || async {
            let p = s.api.get("orders").await?;
            let st = p.status.unwrap_or_default();
            Ok((st.observed_generation == p.metadata.generation).then_some(()))
        },
    )
    .await?;
    s.nats.restart().await?;
    wait_ready(&s, "orders", "True", Some("PipelineReady"))
        .await
        .context("Ready again without restarting anything")?;
    wait_max_age(&s.js, "ORDERS", Duration::from_secs(7200)).await?;
    wait_events(&s.ns.name, &["StreamUpdated"]).await?;
    let events = event_reasons(&s.ns.name).await?;
    assert!(
        !events.contains("DriftCorrected"),
        "the user's own change reported as drift:\n{events}"
    );
    s.ns.delete().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_whose_nats_is_gone_can_still_be_deleted() -> anyhow::Result<()> {
    let mut s = setup("op-gone").await?;
    let mut p = sample(&s.nats.url())?;
    p.spec.stream.deletion_policy = order_operator::crd::DeletionPolicy::Delete;
    s.api.create(&PostParams::default(), &p).await?;
    wait_ready(&s, "orders", "True", None).await?;
    s.nats.stop().await?;
    s.api.delete("orders", &DeleteParams::default()).await?;
    // The annotation lets the finalizer give up at once (otherwise after 2 minutes).
    s.api
        .patch("orders", &PatchParams::default(), &Patch::Merge(&serde_json::json!({"metadata": {"annotations": {"orderpipeline.dev/skip-cleanup": "true"}}})))
        .await?;
    let api = s.api.clone();
    wait_for(
        "the pipeline to be deleted",
        Duration::from_secs(60),
        || {
            let api = api.clone();
            async move { Ok(api.get_opt("orders").await?.is_none().then_some(())) }
        },
    )
    .await?;
    s.ns.delete().await
}

#[tokio::test]
async fn the_service_account_cannot_act_outside_its_role() -> anyhow::Result<()> {
    install_crd_and_rbac().await?;
    let kubeconfig = service_account_kubeconfig()?;
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(&kubeconfig)?,
        &kube::config::KubeConfigOptions::default(),
    )
    .await?;
    let sa = Client::try_from(config)?;
    let err = Api::<Namespace>::all(sa.clone())
        .delete("default", &DeleteParams::default())
        .await
        .expect_err("deleting a Namespace is outside the operator's role");
    assert!(
        err.to_string().contains("forbidden") || err.to_string().contains("403"),
        "{err}"
    );
    // Secrets: it reads them and creates and patches the identities it mints
    // (spec.nats.accountRef); it never deletes one (they go with their
    // pipeline, by owner reference) nor replaces one with an update.
    let secrets = Api::<Secret>::namespaced(sa.clone(), "default");
    let err = secrets
        .delete("x", &DeleteParams::default())
        .await
        .expect_err("the operator never deletes Secrets");
    assert!(err.to_string().contains("forbidden"), "{err}");
    let err = secrets
        .replace("x", &PostParams::default(), &serde_json::from_value(serde_json::json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "x"}}))?)
        .await
        .expect_err("the operator never updates Secrets");
    assert!(err.to_string().contains("forbidden"), "{err}");
    // Of the Namespaces, it reads kube-system only (its UID: the cluster identity).
    let namespaces = Api::<Namespace>::all(sa.clone());
    assert!(namespaces.get("kube-system").await?.metadata.uid.is_some());
    let err = namespaces
        .get("default")
        .await
        .expect_err("other Namespaces are outside the operator's role");
    assert!(err.to_string().contains("forbidden"), "{err}");
    // Leases only in its own namespace, not e.g. the control plane's.
    let err = Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(sa, "kube-system")
        .get("kube-scheduler")
        .await
        .expect_err("Leases outside the operator's namespace");
    assert!(err.to_string().contains("forbidden"), "{err}");
    let _ = std::fs::remove_file(kubeconfig);
    Ok(())
}

/// One operator for a list of namespaces (`--namespace a,b`), with only the
/// Roles the chart renders for them (`watchNamespace: [a, b]`, a `clusterId`:
/// no ClusterRole at all): the pipelines of both become Ready, each with its
/// workers; a pipeline in a third namespace is left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_operator_watches_a_list_of_namespaces_with_roles_only() -> anyhow::Result<()> {
    install_crd_and_rbac().await?;
    let client = kube_client().await?;
    let home = TestNamespace::create(&client, "op-home").await?;
    let a = TestNamespace::create(&client, "op-wa").await?;
    let b = TestNamespace::create(&client, "op-wb").await?;
    let c = TestNamespace::create(&client, "op-wc").await?;
    let chart = orderpipeline_e2e::operator::repo_root().join("charts/order-operator");
    let rendered = orderpipeline_e2e::run_tool_async(
        "helm",
        &[
            "template",
            "order-operator",
            &chart.to_string_lossy(),
            "--namespace",
            &home.name,
            "--set",
            &format!("watchNamespace={{{},{}}}", a.name, b.name),
            "--set",
            "clusterId=test",
            "--show-only",
            "templates/serviceaccount.yaml",
            "--show-only",
            "templates/rbac.yaml",
        ],
    )
    .await?;
    anyhow::ensure!(
        !rendered.contains("kind: Cluster"),
        "the namespaced chart with a clusterId renders no cluster-wide RBAC:\n{rendered}"
    );
    let file = std::env::temp_dir().join(format!("rbac-{}.yaml", home.name));
    std::fs::write(&file, &rendered)?;
    orderpipeline_e2e::operator::kubectl(&["apply", "-f", &file.to_string_lossy()]).await?;
    let _ = std::fs::remove_file(&file);
    let kubeconfig = orderpipeline_e2e::operator::kubeconfig_as(&format!(
        "system:serviceaccount:{}:order-operator",
        home.name
    ))?;
    let nats = NatsServer::start().await?;
    let env = [
        ("CLUSTER_ID", "test".to_string()),
        ("LEASE_NAMESPACE", home.name.clone()),
    ];
    let watched = format!("{},{}", a.name, b.name);
    let operator = OperatorProcess::spawn_as(&watched, "2s", &kubeconfig, &env).await?;
    let mut runners = Vec::new();
    for ns in [&a, &b] {
        runners.push(orderpipeline_e2e::podrunner::for_namespace(
            &client,
            &ns.name,
            Vec::new(),
        )?);
    }
    let streams = [("A", &a), ("B", &b), ("C", &c)];
    for (stream, ns) in streams {
        let p = sample_named(&nats.url(), "orders", &format!("ORDERS_{stream}"))?;
        Api::<OrderPipeline>::namespaced(client.clone(), &ns.name)
            .create(&PostParams::default(), &p)
            .await?;
    }
    for ns in [&a, &b] {
        let api = Api::<OrderPipeline>::namespaced(client.clone(), &ns.name);
        wait_ready_in(&api, "orders")
            .await
            .with_context(|| format!("operator log:\n{}", operator.log_text()))?;
    }
    let unwatched = Api::<OrderPipeline>::namespaced(client.clone(), &c.name)
        .get("orders")
        .await?;
    assert!(
        unwatched.status.is_none() && unwatched.metadata.finalizers.is_none(),
        "a pipeline outside the watched namespaces was touched: {:?}",
        unwatched.status
    );
    let log = operator.log_text();
    assert!(
        !log.contains("forbidden"),
        "the Roles were not enough:\n{log}"
    );
    let _ = std::fs::remove_file(kubeconfig);
    drop(runners);
    for ns in [a, b, c, home] {
        ns.delete().await?;
    }
    Ok(())
}

/// The operator's ServiceAccount as a client of the API server.
async fn service_account_client() -> anyhow::Result<(Client, std::path::PathBuf)> {
    let kubeconfig = service_account_kubeconfig()?;
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(&kubeconfig)?,
        &kube::config::KubeConfigOptions::default(),
    )
    .await?;
    Ok((Client::try_from(config)?, kubeconfig))
}

/// A Deployment as the operator would write one: labelled as its own, with the
/// restricted pod template; `change` alters it.
fn restricted_deployment(name: &str, change: serde_json::Value) -> anyhow::Result<Deployment> {
    let mut d = serde_json::json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": "order-operator"}},
        "spec": {
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "automountServiceAccountToken": false,
                    "securityContext": {"runAsNonRoot": true},
                    "containers": [{"name": "worker", "image": "worker:dev", "securityContext": {
                        "allowPrivilegeEscalation": false,
                        "capabilities": {"drop": ["ALL"]}}}]
                }
            }
        }
    });
    json_merge(&mut d, change);
    Ok(serde_json::from_value(d)?)
}

/// RFC 7386 merge of `patch` into `v`.
fn json_merge(v: &mut serde_json::Value, patch: serde_json::Value) {
    match (v, patch) {
        (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
            for (k, p) in b {
                if p.is_null() {
                    a.remove(&k);
                } else {
                    json_merge(a.entry(k).or_insert(serde_json::Value::Null), p);
                }
            }
        }
        (v, p) => *v = p,
    }
}

/// The cluster-wide install's ValidatingAdmissionPolicies
/// (manifests/admission-policy.yaml), on the real API server: the operator's
/// ServiceAccount, which RBAC lets write Secrets and Deployments in every
/// namespace, writes only objects labelled as its own and Deployments only with
/// the restricted pod template; an admin's writes are not affected.
#[tokio::test]
async fn the_operator_account_writes_only_its_own_labelled_restricted_objects() -> anyhow::Result<()>
{
    install_crd_and_rbac().await?;
    let admin = kube_client().await?;
    let ns = TestNamespace::create(&admin, "op-vap").await?;
    let (sa, kubeconfig) = service_account_client().await?;
    let apply = PatchParams::apply("vap-test").force();
    let secret = |name: &str, labels: serde_json::Value| -> anyhow::Result<Secret> {
        Ok(serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": name, "labels": labels},
            "stringData": {"password": "s3cret"}
        }))?)
    };
    let denied = |e: kube::Error, want: &str| -> anyhow::Result<()> {
        let text = e.to_string();
        anyhow::ensure!(
            text.contains("ValidatingAdmissionPolicy") && text.contains(want),
            "expected a denial by the admission policy saying {want:?}: {text}"
        );
        Ok(())
    };
    let sa_secrets = Api::<Secret>::namespaced(sa.clone(), &ns.name);
    // A tenant's own Secret, unlabelled: the operator may not write one, nor
    // take one over by adding its label. (The policy is in force within a
    // few seconds of being applied: wait for the first denial.)
    let own = "the operator writes only Deployments, Secrets, NetworkPolicies and PodDisruptionBudgets labelled";
    wait_for(
        "the admission policy to deny",
        Duration::from_secs(30),
        || {
            let (sa_secrets, apply) = (sa_secrets.clone(), apply.clone());
            async move {
                let s = secret("tenant-probe", serde_json::json!({}))?;
                match sa_secrets
                    .patch("tenant-probe", &apply, &Patch::Apply(&s))
                    .await
                {
                    Err(e) if e.to_string().contains(own) => Ok(Some(())),
                    other => anyhow::bail!("not denied yet: {other:?}"),
                }
            }
        },
    )
    .await?;
    let tenant = secret("tenant-db", serde_json::json!({}))?;
    Api::<Secret>::namespaced(admin.clone(), &ns.name)
        .create(&PostParams::default(), &tenant)
        .await?;
    let err = sa_secrets
        .create(
            &PostParams::default(),
            &secret("unlabelled", serde_json::json!({}))?,
        )
        .await
        .expect_err("an unlabelled Secret");
    denied(err, own)?;
    let taken = secret(
        "tenant-db",
        serde_json::json!({"app.kubernetes.io/managed-by": "order-operator"}),
    )?;
    let err = sa_secrets
        .patch("tenant-db", &apply, &Patch::Apply(&taken))
        .await
        .expect_err("taking over a tenant's Secret by labelling it");
    denied(err, "may not take over an object it did not create")?;
    let minted = secret(
        "orders-nats-worker",
        serde_json::json!({"app.kubernetes.io/managed-by": "order-operator"}),
    )?;
    sa_secrets
        .patch("orders-nats-worker", &apply, &Patch::Apply(&minted))
        .await
        .context("a Secret labelled as the operator's own is allowed")?;

    // PodDisruptionBudgets: its own may be written and deleted, a tenant's
    // may not be deleted (which would let a drain take every pod).
    let budget = |name: &str, labels: serde_json::Value| -> anyhow::Result<PodDisruptionBudget> {
        Ok(serde_json::from_value(serde_json::json!({
            "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
            "metadata": {"name": name, "labels": labels},
            "spec": {"maxUnavailable": 0, "selector": {"matchLabels": {"app": name}}}
        }))?)
    };
    Api::<PodDisruptionBudget>::namespaced(admin.clone(), &ns.name)
        .create(
            &PostParams::default(),
            &budget("tenant-db", serde_json::json!({}))?,
        )
        .await?;
    let sa_budgets = Api::<PodDisruptionBudget>::namespaced(sa.clone(), &ns.name);
    let err = sa_budgets
        .delete("tenant-db", &Default::default())
        .await
        .expect_err("deleting a tenant's PodDisruptionBudget");
    denied(err, "may not take over an object it did not create")?;
    let ours = serde_json::json!({"app.kubernetes.io/managed-by": "order-operator"});
    sa_budgets
        .patch(
            "orders-workers",
            &apply,
            &Patch::Apply(&budget("orders-workers", ours)?),
        )
        .await
        .context("a PodDisruptionBudget labelled as the operator's own is allowed")?;
    sa_budgets
        .delete("orders-workers", &Default::default())
        .await
        .context("deleting its own PodDisruptionBudget is allowed")?;

    // Deployments: only the restricted pod template.
    let sa_deployments = Api::<Deployment>::namespaced(sa.clone(), &ns.name);
    let cases = [
        (
            serde_json::json!({"spec": {"template": {"spec": {"hostNetwork": true}}}}),
            "host's network",
        ),
        (
            serde_json::json!({"spec": {"template": {"spec": {"automountServiceAccountToken": null}}}}),
            "automountServiceAccountToken: false",
        ),
        (
            serde_json::json!({"spec": {"template": {"spec": {"securityContext": null}}}}),
            "run as non-root",
        ),
        (
            serde_json::json!({"spec": {"template": {"spec": {"volumes": [{"name": "root", "hostPath": {"path": "/"}}]}}}}),
            "Secret volumes only",
        ),
        (
            serde_json::json!({"spec": {"template": {"spec": {"containers": [{"name": "worker", "image": "worker:dev", "securityContext": {"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN"]}}}]}}}}),
            "must be restricted",
        ),
        (serde_json::json!({"metadata": {"labels": null}}), own),
    ];
    for (i, (change, want)) in cases.into_iter().enumerate() {
        let name = format!("denied-{i}");
        let d = restricted_deployment(&name, change)?;
        let err = sa_deployments
            .patch(&name, &apply, &Patch::Apply(&d))
            .await
            .expect_err(want);
        denied(err, want)?;
    }
    sa_deployments
        .patch(
            "orders-workers",
            &apply,
            &Patch::Apply(&restricted_deployment(
                "orders-workers",
                serde_json::json!({}),
            )?),
        )
        .await
        .context("a restricted Deployment labelled as the operator's own is allowed")?;
    // The policies bind the operator's account only: an admin may still write
    // an unlabelled, privileged Deployment.
    let admin_d = restricted_deployment(
        "admins",
        serde_json::json!({"metadata": {"labels": null}, "spec": {"template": {"spec": {"hostNetwork": true}}}}),
    )?;
    Api::<Deployment>::namespaced(admin.clone(), &ns.name)
        .patch("admins", &apply, &Patch::Apply(&admin_d))
        .await
        .context("the policies do not bind an admin")?;
    let _ = std::fs::remove_file(kubeconfig);
    ns.delete().await
}

async fn deployment_replicas(s: &Setup) -> anyhow::Result<Option<i32>> {
    let deployments: Api<Deployment> = Api::namespaced(s.client.clone(), &s.ns.name);
    Ok(deployments
        .get_opt("orders-workers")
        .await?
        .and_then(|d| d.spec?.replicas))
}

async fn wait_replicas(s: &Setup, want: i32, within: Duration) -> anyhow::Result<()> {
    wait_for(
        &format!("the Deployment at {want} replicas"),
        within,
        || async { Ok((deployment_replicas(s).await? == Some(want)).then_some(())) },
    )
    .await
    .with_context(|| format!("operator log:\n{}", s.operator.log_text()))
}

/// The namespace's Events, one `type reason: note` line each.
async fn event_reasons(ns: &str) -> anyhow::Result<String> {
    orderpipeline_e2e::operator::event_lines(ns).await
}

/// Waits until the namespace's Events include every one of `texts`
/// (`type reason: note` lines, see [`event_reasons`]).
async fn wait_events(ns: &str, texts: &[&str]) -> anyhow::Result<()> {
    wait_for(
        &format!("Events {texts:?}"),
        Duration::from_secs(30),
        || async {
            let events = event_reasons(ns).await?;
            Ok(texts.iter().all(|t| events.contains(t)).then_some(()))
        },
    )
    .await
}

/// Waits until stream `name` has `max_age` `want` (e.g. drift reverted).
async fn wait_max_age(js: &jetstream::Context, name: &str, want: Duration) -> anyhow::Result<()> {
    orderpipeline_e2e::wait_max_age(js, name, want, Duration::from_secs(30)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_scales_the_workers_up_and_back_down_after_the_window() -> anyhow::Result<()> {
    let s = setup_with("op-scale", false).await?;
    // Publish the backlog first; the pipeline's workers are not run here (the
    // backlog is drained below by acking with a NATS client), so the lag is exact.
    let mut p = sample(&s.nats.url())?;
    p.spec.workers.min_replicas = Some(1);
    p.spec.workers.max_replicas = Some(20);
    p.spec.workers.scaling.target_lag_per_replica = 2000;
    p.spec.workers.scaling.stabilization_window = "8s".into();
    p.spec.workers.pool_size = 100;
    s.api.create(&PostParams::default(), &p).await?;
    wait_replicas(&s, 1, Duration::from_secs(30)).await?;
    let mut opts = orderpipeline_ctl::PublishOptions {
        subject: "ORDER.created".into(),
        count: 20_000,
        rate: 0.0,
        invalid_ratio: 0.0,
        duplicate_ratio: 0.0,
        prefix: "scale".into(),
        window: 512,
        ack_timeout: Duration::from_secs(5),
        progress: false,
        poison: 0,
    };
    opts.count = 20_000;
    orderpipeline_ctl::publish_orders(&s.js, &opts).await?;
    // Two resync intervals (2 s each), plus slack for the Deployment write.
    wait_replicas(&s, 10, Duration::from_secs(6)).await?;
    // The status is written right after the Deployment.
    let p = wait_for(
        "status.desiredReplicas 10",
        Duration::from_secs(5),
        || async {
            let p = s.api.get("orders").await?;
            Ok((p.status.as_ref().and_then(|s| s.desired_replicas) == Some(10)).then_some(p))
        },
    )
    .await?;
    let st = p.status.clone().context("status")?;
    assert!(st.last_scale_time.is_some());
    assert!(condition(&p, "Scaling").is_some_and(|c| c.status == "True"));
    let events = event_reasons(&s.ns.name).await?;
    // The first decision may come while the backlog is still being published,
    // e.g. "lag 16157 > 1 x 2000, scaling 1 -> 9", then "... scaling 9 -> 10".
    assert!(
        events.lines().any(|l| l.starts_with("Normal Scaled: lag ")
            && l.contains(" x 2000, scaling ")
            && l.ends_with("-> 10")),
        "{events}"
    );

    // Drain by acking with a NATS client, then the window passes and it scales down.
    let stream = s.js.get_stream("ORDERS").await?;
    let consumer: jetstream::consumer::PullConsumer = stream
        .get_consumer("order-workers")
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    let mut acked = 0;
    while acked < 20_000 {
        let mut batch = consumer
            .fetch()
            .max_messages(1000)
            .messages()
            .await
            .map_err(|e| anyhow::anyhow!(e))?;
        while let Some(m) = futures::StreamExt::next(&mut batch).await {
            m.map_err(|e| anyhow::anyhow!(e))?
                .ack()
                .await
                .map_err(|e| anyhow::anyhow!(e))?;
            acked += 1;
        }
    }
    let before_down = std::time::Instant::now();
    wait_replicas(&s, 1, Duration::from_secs(40)).await?;
    assert!(
        before_down.elapsed() >= Duration::from_secs(5),
        "scaled down only after the stabilization window"
    );
    s.ns.delete().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_mode_follows_kubectl_scale_and_external_mode_leaves_replicas_alone()
-> anyhow::Result<()> {
    let s = setup_ready("op-modes").await?;
    let kubectl = |args: Vec<String>| async move {
        let out = tokio::process::Command::new("kubectl")
            .args(&args)
            .output()
            .await?;
        anyhow::ensure!(
            out.status.success(),
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok::<_, anyhow::Error>(())
    };
    // Manual: the scale subresource of the pipeline.
    kubectl(vec![
        "-n".into(),
        s.ns.name.clone(),
        "scale".into(),
        "orderpipeline/orders".into(),
        "--replicas=3".into(),
    ])
    .await?;
    wait_replicas(&s, 3, Duration::from_secs(20)).await?;
    wait_ready(&s, "orders", "True", None).await?;
    // status.replicas feeds the scale subresource: the Deployment's, as the
    // next status write after the Deployment's own status moved sees it.
    wait_status(&s, "status.replicas 3", Duration::from_secs(20), |p| {
        p.status.as_ref().and_then(|s| s.replicas) == Some(3)
    })
    .await?;

    // External: the operator stops applying replicas; what someone else sets stays.
    s.api
        .patch(
            "orders",
            &PatchParams::default(),
            &Patch::Merge(
                &serde_json::json!({"spec": {"workers": {"scaling": {"mode": "External"}}}}),
            ),
        )
        .await?;
    wait_for(
        "replica mode External in status",
        Duration::from_secs(20),
        || async {
            let p = s.api.get("orders").await?;
            Ok((p.status.and_then(|s| s.replica_mode)
                == Some(order_operator::crd::ReplicaMode::External))
            .then_some(()))
        },
    )
    .await?;
    assert_eq!(
        deployment_replicas(&s).await?,
        Some(3),
        "switching to External keeps the live replicas"
    );
    kubectl(vec![
        "-n".into(),
        s.ns.name.clone(),
        "scale".into(),
        "deployment/orders-workers".into(),
        "--replicas=5".into(),
    ])
    .await?;
    // Several reconciles (resync 2 s) must not touch it.
    let p0 = s.api.get("orders").await?;
    let rv0 = p0.metadata.resource_version.clone();
    wait_for("a few reconciles", Duration::from_secs(30), || async {
        let p = s.api.get("orders").await?;
        Ok((p.metadata.resource_version != rv0
            && condition(&p, "WorkersAvailable").is_some_and(|c| c.message.contains("of 5")))
        .then_some(()))
    })
    .await?;
    assert_eq!(
        deployment_replicas(&s).await?,
        Some(5),
        "External mode leaves the replicas alone"
    );
    // One meaning per field: the operator decided nothing; the Deployment asks for 5.
    let st = s.api.get("orders").await?.status.unwrap_or_default();
    assert_eq!(st.desired_replicas, None, "{st:?}");
    assert_eq!(st.workers.as_ref().map(|w| w.desired), Some(5), "{st:?}");

    // Pause wins over External; unpausing gives the external scaler back the
    // replicas from before the pause (an HPA does not scale up from zero).
    let pause = |paused: bool| {
        let api = s.api.clone();
        async move {
            api.patch(
                "orders",
                &PatchParams::default(),
                &Patch::Merge(&serde_json::json!({"spec": {"paused": paused}})),
            )
            .await
        }
    };
    pause(true).await?;
    wait_replicas(&s, 0, Duration::from_secs(20)).await?;
    pause(false).await?;
    wait_replicas(&s, 5, Duration::from_secs(20)).await?;
    s.ns.delete().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_scales_to_zero_and_pauses_the_consumer_and_unpause_resumes() -> anyhow::Result<()> {
    let s = setup_ready("op-pause").await?;
    s.api
        .patch(
            "orders",
            &PatchParams::default(),
            &Patch::Merge(&serde_json::json!({"spec": {"paused": true}})),
        )
        .await?;
    wait_replicas(&s, 0, Duration::from_secs(20)).await?;
    let js = s.js.clone();
    wait_for("the consumer paused", Duration::from_secs(20), || {
        let js = js.clone();
        async move {
            Ok(js
                .get_stream("ORDERS")
                .await?
                .consumer_info("order-workers")
                .await?
                .paused
                .then_some(()))
        }
    })
    .await?;
    wait_status(&s, "Paused=True", Duration::from_secs(20), |p| {
        condition(p, "Paused").is_some_and(|c| c.status == "True")
    })
    .await?;
    // Orders published while paused wait in the stream.
    let report = publish_ids(&s.js, "ORDER.created", "paused", 50).await?;
    s.api
        .patch(
            "orders",
            &PatchParams::default(),
            &Patch::Merge(&serde_json::json!({"spec": {"paused": false}})),
        )
        .await?;
    wait_replicas(&s, 2, Duration::from_secs(20)).await?;
    wait_for(
        "the backlog processed after unpausing",
        Duration::from_secs(60),
        || {
            let js = js.clone();
            async move {
                let c = js
                    .get_stream("ORDERS")
                    .await?
                    .consumer_info("order-workers")
                    .await?;
                Ok((!c.paused && c.num_pending == 0 && c.num_ack_pending == 0).then_some(()))
            }
        },
    )
    .await?;
    let audit =
        orderpipeline_ctl::audit::Audit::collect(&s.js, "ORDERS", "ORDERS_DLQ", "order-workers")
            .await?;
    audit.assert_exactly_once(&report.valid_ids, &[])?;
    s.ns.delete().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_removed_behind_the_operators_back_is_recreated_and_storage_drift_is_refused()
-> anyhow::Result<()> {
    let s = setup_ready("op-drift").await?;
    // Both streams removed: two DriftCorrected Events with the same reason and
    // their own notes (not one series that keeps the first note).
    s.js.delete_stream("ORDERS").await?;
    s.js.delete_stream("ORDERS_DLQ").await?;
    wait_for("the streams recreated", Duration::from_secs(30), || async {
        Ok(
            (s.js.get_stream("ORDERS").await.is_ok()
                && s.js.get_stream("ORDERS_DLQ").await.is_ok())
            .then_some(()),
        )
    })
    .await?;
    wait_events(
        &s.ns.name,
        &[
            "DriftCorrected: recreated stream ORDERS:",
            "DriftCorrected: recreated stream ORDERS_DLQ:",
            "DriftCorrected: recreated consumer order-workers:",
        ],
    )
    .await?;
    // Whatever was changed or deleted, drift is a Warning.
    let events = event_reasons(&s.ns.name).await?;
    for l in events.lines().filter(|l| l.contains("DriftCorrected")) {
        assert!(l.starts_with("Warning "), "{l}");
    }
    wait_ready(&s, "orders", "True", None).await?;

    // Hand-recreated with other storage: NATS cannot change it in place.
    s.js.delete_stream("ORDERS").await?;
    let mut cfg =
        s.js.get_stream("ORDERS_DLQ")
            .await?
            .info()
            .await?
            .config
            .clone();
    cfg.name = "ORDERS".into();
    cfg.subjects = vec!["ORDER.*".into()];
    cfg.storage = jetstream::stream::StorageType::Memory;
    s.js.create_stream(cfg).await?;
    let p = wait_ready(&s, "orders", "False", Some("ImmutableFieldChanged")).await?;
    assert!(condition(&p, "Ready").is_some_and(|c| c.message.contains("storage")));

    // Recreation only when the spec opts in.
    s.api
        .patch(
            "orders",
            &PatchParams::default(),
            &Patch::Merge(
                &serde_json::json!({"spec": {"stream": {"recreateOnImmutableChange": true}}}),
            ),
        )
        .await?;
    wait_ready(&s, "orders", "True", None).await?;
    let mut stream = s.js.get_stream("ORDERS").await?;
    assert_eq!(
        stream.info().await?.config.storage,
        jetstream::stream::StorageType::File
    );
    assert!(event_reasons(&s.ns.name).await?.contains("StreamRecreated"));

    // A field changed behind the operator's back is reverted.
    let mut cfg = stream.info().await?.config.clone();
    cfg.max_age = Duration::from_secs(3600);
    s.js.update_stream(cfg).await?;
    wait_max_age(&s.js, "ORDERS", Duration::from_secs(7 * 86400)).await?;
    wait_events(
        &s.ns.name,
        &["max age changed) (it had been changed outside the operator)"],
    )
    .await?;

    // The KV bucket a pipeline upgraded from v1 still has follows the spec too:
    // its TTL (another than the spec's) is set to the spec's, the stream's maxAge.
    v1_bucket(&s.js, "ORDERS_STATE", Duration::from_secs(3600)).await?;
    wait_max_age(&s.js, "KV_ORDERS_STATE", Duration::from_secs(7 * 86400)).await?;
    wait_events(
        &s.ns.name,
        &["DriftCorrected: updated KV bucket ORDERS_STATE (ttl changed)"],
    )
    .await?;
    s.ns.delete().await
}

async fn lease_holder(s: &Setup) -> anyhow::Result<Option<String>> {
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(s.client.clone(), OPERATOR_NAMESPACE);
    Ok(leases
        .get_opt(&format!("order-operator-{}", s.ns.name))
        .await?
        .and_then(|l| l.spec?.holder_identity))
}

async fn event_instances(ns: &str) -> anyhow::Result<Vec<String>> {
    let out = tokio::process::Command::new("kubectl")
        .args(["-n", ns, "get", "events.events.k8s.io", "-o", "jsonpath={range .items[?(@.reportingController==\"order-operator\")]}{.reportingInstance}{\"\\n\"}{end}"])
        .output()
        .await?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_operators_one_leader_and_killing_it_hands_over() -> anyhow::Result<()> {
    let mut s = setup("op-ha").await?; // replica "order-operator-test" leads
    wait_for(
        "the first replica to hold the Lease",
        Duration::from_secs(20),
        || async {
            Ok(lease_holder(&s)
                .await?
                .filter(|h| h == "order-operator-test"))
        },
    )
    .await?;
    let kc = service_account_kubeconfig()?;
    let mut standby = OperatorProcess::spawn_named(&s.ns.name, "2s", &kc, "standby").await?;
    s.api
        .create(&PostParams::default(), &sample(&s.nats.url())?)
        .await?;
    wait_ready(&s, "orders", "True", None).await?;
    let instances = event_instances(&s.ns.name).await?;
    assert!(
        !instances.is_empty() && instances.iter().all(|i| i == "order-operator-test"),
        "only the leader reconciles: {instances:?}"
    );
    assert!(
        standby.log_text().contains("standing by"),
        "{}",
        standby.log_text()
    );

    // Kill the leader: the standby takes over within the lease duration (3 s here).
    s.operator.kill().await?;
    let killed = std::time::Instant::now();
    wait_for(
        "the standby to hold the Lease",
        Duration::from_secs(15),
        || async { Ok(lease_holder(&s).await?.filter(|h| h == "standby")) },
    )
    .await?;
    assert!(
        killed.elapsed() < Duration::from_secs(10),
        "handover took {:?}",
        killed.elapsed()
    );
    s.api
        .patch(
            "orders",
            &PatchParams::default(),
            &Patch::Merge(&serde_json::json!({"spec": {"workers": {"poolSize": 7}}})),
        )
        .await?;
    let deployments: Api<Deployment> = Api::namespaced(s.client.clone(), &s.ns.name);
    wait_for(
        "the new leader to reconcile",
        Duration::from_secs(20),
        || async {
            Ok((env_of(&deployments.get("orders-workers").await?)
                .get("WORKER_POOL_SIZE")
                .map(String::as_str)
                == Some("7"))
            .then_some(()))
        },
    )
    .await?;

    // A leader that loses its Lease exits (and would be restarted as a standby).
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(s.client.clone(), OPERATOR_NAMESPACE);
    let name = format!("order-operator-{}", s.ns.name);
    // The holder renews concurrently: retry on a conflict until the take sticks.
    wait_for(
        "the Lease taken by an intruder",
        Duration::from_secs(15),
        || {
            let (leases, name) = (leases.clone(), name.clone());
            async move {
                let mut l = leases.get(&name).await?;
                if let Some(spec) = l.spec.as_mut() {
                    spec.holder_identity = Some("intruder".into());
                    spec.renew_time =
                        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
                            k8s_openapi::jiff::Timestamp::now(),
                        ));
                }
                match leases.replace(&name, &PostParams::default(), &l).await {
                    Ok(_) => Ok(Some(())),
                    Err(kube::Error::Api(e)) if e.code == 409 => Ok(None),
                    Err(e) => Err(e.into()),
                }
            }
        },
    )
    .await?;
    let code = standby.wait_exit(Duration::from_secs(15)).await?;
    assert_eq!(code, Some(1), "{}", standby.log_text());
    assert!(
        standby.log_text().contains("lost the Lease"),
        "{}",
        standby.log_text()
    );
    s.ns.delete().await
}

/// Runs the sample against a nats-server configured with `server_config`, with
/// the given Secrets referenced, and waits for `Ready` = `status`/`reason`.
/// Ready=True needs the operator connected and the workers (pod runner) ready,
/// so it proves the credentials reach both.
async fn with_auth(
    prefix: &str,
    server_config: &str,
    credentials: Option<serde_json::Value>,
    tls: Option<serde_json::Value>,
    status: &str,
    reason: &str,
) -> anyhow::Result<OrderPipeline> {
    let nats = NatsServer::start_with_config(server_config).await?;
    // The test itself does not talk to this server (it may refuse anonymous
    // clients); a client that retries in the background fills the slot.
    let idle = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connect(format!("127.0.0.1:{}", nats.port))
        .await?;
    let js = jetstream::new(idle);
    let s = setup_on(prefix, true, nats, js, "2s").await?;
    let secrets: Api<Secret> = Api::namespaced(s.client.clone(), &s.ns.name);
    let mut p = sample(&s.nats.url())?;
    if let Some(data) = credentials {
        secrets.create(&PostParams::default(), &serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "nats-credentials"}, "stringData": data
        }))?).await?;
        p.spec.nats.credentials_secret_ref = Some(order_operator::crd::SecretRef {
            name: "nats-credentials".into(),
        });
    }
    if let Some(data) = tls {
        secrets.create(&PostParams::default(), &serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "nats-tls"}, "stringData": data
        }))?).await?;
        p.spec.nats.tls_secret_ref = Some(order_operator::crd::SecretRef {
            name: "nats-tls".into(),
        });
    }
    s.api.create(&PostParams::default(), &p).await?;
    let got = wait_ready(&s, "orders", status, Some(reason)).await?;
    s.ns.delete().await?;
    Ok(got)
}

/// Two tenants on one nats-server, each in its own account: the same stream
/// name, consumer and subjects do not collide (the check compares the accounts
/// the server reports for each connection), so neither squats the other; a
/// later pipeline in the first one's account is still refused (issue 25).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelines_in_two_nats_accounts_do_not_squat_each_other() -> anyhow::Result<()> {
    let conf = r#"accounts {
  A { jetstream: enabled, users: [{user: a, password: "pa-s3cret"}] }
  B { jetstream: enabled, users: [{user: b, password: "pb-s3cret"}] }
}"#;
    let nats = NatsServer::start_with_config(conf).await?;
    let idle = async_nats::ConnectOptions::with_user_and_password("a".into(), "pa-s3cret".into())
        .connect(format!("127.0.0.1:{}", nats.port))
        .await?;
    let s = setup_on("op-accounts", true, nats, jetstream::new(idle), "2s").await?;
    let secrets: Api<Secret> = Api::namespaced(s.client.clone(), &s.ns.name);
    let tenant = |name: &str, user: &str, password: &str| {
        let mut p = sample(&s.nats.url())?;
        p.metadata.name = Some(name.into());
        p.spec.nats.credentials_secret_ref = Some(order_operator::crd::SecretRef {
            name: format!("nats-{user}"),
        });
        let secret: Secret = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": format!("nats-{user}")},
            "stringData": {"user": user, "password": password}
        }))?;
        anyhow::Ok((p, secret))
    };
    let (a, secret_a) = tenant("orders-a", "a", "pa-s3cret")?;
    let (b, secret_b) = tenant("orders-b", "b", "pb-s3cret")?;
    let (twin, _) = tenant("twin-a", "a", "pa-s3cret")?;
    secrets.create(&PostParams::default(), &secret_a).await?;
    secrets.create(&PostParams::default(), &secret_b).await?;
    s.api.create(&PostParams::default(), &a).await?;
    wait_ready(&s, "orders-a", "True", None).await?;
    s.api.create(&PostParams::default(), &b).await?;
    wait_ready(&s, "orders-b", "True", None).await?;
    s.api.create(&PostParams::default(), &twin).await?;
    let t = wait_ready(&s, "twin-a", "False", Some("InvalidSpec")).await?;
    let msg = &condition(&t, "Ready").context("Ready")?.message;
    assert!(
        msg.contains(&format!(
            "stream ORDERS belongs to pipeline {}/orders-a",
            s.ns.name
        )),
        "{msg}"
    );
    // And orders-b is still Ready: the twin in account A did not disturb it.
    let b = s.api.get("orders-b").await?;
    assert_eq!(
        condition(&b, "Ready").map(|c| c.status.as_str()),
        Some("True")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_and_password_reach_the_operator_and_the_workers() -> anyhow::Result<()> {
    let conf = "authorization { user: orders, password: \"s3cret-pw\" }";
    with_auth(
        "op-auth-user",
        conf,
        Some(serde_json::json!({"user": "orders", "password": "s3cret-pw"})),
        None,
        "True",
        "PipelineReady",
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_reported_as_authentication() -> anyhow::Result<()> {
    let conf = "authorization { user: orders, password: \"s3cret-pw\" }";
    let p = with_auth(
        "op-auth-wrong",
        conf,
        Some(serde_json::json!({"user": "orders", "password": "wrong"})),
        None,
        "False",
        "NatsAuthenticationFailed",
    )
    .await?;
    let msg = &condition(&p, "Ready").context("Ready")?.message;
    assert!(msg.contains("authentication"), "{msg}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_reaches_the_operator_and_the_workers() -> anyhow::Result<()> {
    with_auth(
        "op-auth-token",
        "authorization { token: \"t0ken-value\" }",
        Some(serde_json::json!({"token": "t0ken-value"})),
        None,
        "True",
        "PipelineReady",
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_nkey_reaches_the_operator_and_the_workers() -> anyhow::Result<()> {
    let (seed, public) = orderpipeline_e2e::natsauth::user_nkey()?;
    let conf = format!("authorization {{ users: [ {{ nkey: {public} }} ] }}");
    with_auth(
        "op-auth-nkey",
        &conf,
        Some(serde_json::json!({"nkey": seed})),
        None,
        "True",
        "PipelineReady",
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_creds_file_with_jwt_accounts_reaches_the_operator_and_the_workers() -> anyhow::Result<()>
{
    let d = orderpipeline_e2e::natsauth::mint()?;
    with_auth(
        "op-auth-creds",
        &d.server_config,
        Some(serde_json::json!({"creds": d.creds})),
        None,
        "True",
        "PipelineReady",
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_test_ca_reaches_the_operator_and_the_workers() -> anyhow::Result<()> {
    let dir = orderpipeline_e2e::tempdir::TempDir::new("nats-tls")?;
    let (ca, cert, key) = orderpipeline_e2e::natsauth::tls_files(dir.path())?;
    let conf = format!(
        "tls {{ cert_file: \"{}\", key_file: \"{}\" }}",
        cert.display(),
        key.display()
    );
    let ca_pem = std::fs::read_to_string(ca)?;
    with_auth(
        "op-tls",
        &conf,
        None,
        Some(serde_json::json!({"ca.crt": ca_pem})),
        "True",
        "PipelineReady",
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_stream_is_a_conflict_until_adopted_and_observe_changes_nothing()
-> anyhow::Result<()> {
    let s = setup("op-policy").await?;
    // A stream created by hand, not by a pipeline.
    s.js.create_stream(jetstream::stream::Config {
        name: "ORDERS".into(),
        subjects: vec!["ORDER.*".into()],
        duplicate_window: Duration::from_secs(1800),
        ..Default::default()
    })
    .await?;
    s.api
        .create(&PostParams::default(), &sample(&s.nats.url())?)
        .await?;
    let p = wait_ready(&s, "orders", "False", Some("StreamOwnedByAnotherPipeline")).await?;
    assert!(
        condition(&p, "Ready")
            .is_some_and(|c| c.message.contains("not created by an OrderPipeline"))
    );
    s.api
        .patch(
            "orders",
            &PatchParams::default(),
            &Patch::Merge(&serde_json::json!({"spec": {"managementPolicy": "Adopt"}})),
        )
        .await?;
    wait_ready(&s, "orders", "True", None).await?;
    let mut st = s.js.get_stream("ORDERS").await?;
    assert_eq!(
        st.info()
            .await?
            .config
            .metadata
            .get("orderpipeline.dev/owner")
            .map(String::as_str),
        Some(format!("{}/orders", s.ns.name).as_str())
    );
    assert!(event_reasons(&s.ns.name).await?.contains("Adopted"));

    // Observe: report status, change nothing.
    let mut observed = sample(&s.nats.url())?;
    observed.metadata.name = Some("watching".into());
    observed.spec.management_policy = order_operator::crd::ManagementPolicy::Observe;
    observed.spec.stream.name = "ELSEWHERE".into();
    observed.spec.stream.subjects = vec!["ELSE.*".into()];
    observed.spec.consumer.filter_subject = "ELSE.created".into();
    observed.spec.dead_letter.stream_name = Some("ELSEWHERE_DLQ".into());
    observed.spec.dead_letter.subject = Some("DLQ.ELSE.created".into());
    observed.spec.state.bucket = Some("ELSEWHERE_STATE".into());
    s.api.create(&PostParams::default(), &observed).await?;
    let p = wait_ready(&s, "watching", "False", None).await?;
    assert!(condition(&p, "StreamReady").is_some_and(|c| c.status == "False"));
    assert!(
        s.js.get_stream("ELSEWHERE").await.is_err(),
        "Observe creates nothing"
    );
    let deployments: Api<Deployment> = Api::namespaced(s.client.clone(), &s.ns.name);
    assert!(
        deployments.get_opt("watching-workers").await?.is_none(),
        "Observe creates no Deployment"
    );
    s.ns.delete().await
}

/// Publishes `count` valid orders with ids `<prefix>-<n>` on `subject`.
async fn publish_ids(
    js: &jetstream::Context,
    subject: &str,
    prefix: &str,
    count: u64,
) -> anyhow::Result<orderpipeline_ctl::PublishReport> {
    orderpipeline_ctl::publish_orders(
        js,
        &orderpipeline_ctl::PublishOptions {
            subject: subject.into(),
            count,
            rate: 0.0,
            invalid_ratio: 0.0,
            duplicate_ratio: 0.0,
            prefix: prefix.into(),
            window: 64,
            ack_timeout: Duration::from_secs(5),
            progress: false,
            poison: 0,
        },
    )
    .await
}

async fn wait_drained(js: &jetstream::Context, stream: &str, consumer: &str) -> anyhow::Result<()> {
    wait_for(
        &format!("{stream}/{consumer} to drain"),
        Duration::from_secs(60),
        || async move {
            let c = js.get_stream(stream).await?.consumer_info(consumer).await?;
            Ok((c.num_pending == 0 && c.num_ack_pending == 0).then_some(()))
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pipelines_on_one_nats_keep_their_orders_apart_and_a_clash_is_refused()
-> anyhow::Result<()> {
    let s = setup_ready("iso").await?;
    // A second shop on the same NATS: its own stream and filter; every other name
    // is derived (SHOP_DLQ, SHOP_STATE, SHOP.processed.<key>, ...).
    let shop = sample_named(&s.nats.url(), "shop", "SHOP")?;
    s.api.create(&PostParams::default(), &shop).await?;
    wait_ready(&s, "shop", "True", None).await?;
    // A third one that names the first's stream: refused, naming the first.
    let mut twin = sample(&s.nats.url())?;
    twin.metadata.name = Some("twin".into());
    s.api.create(&PostParams::default(), &twin).await?;
    let t = wait_ready(&s, "twin", "False", Some("InvalidSpec")).await?;
    let msg = condition(&t, "Ready")
        .map(|c| c.message.clone())
        .unwrap_or_default();
    assert!(
        msg.contains(&format!(
            "stream ORDERS belongs to pipeline {}/orders",
            s.ns.name
        )) && msg.contains("spec.stream.name"),
        "{msg}"
    );

    // Both shops number their orders the same way: the same ids are two orders each.
    let a = publish_ids(&s.js, "ORDER.created", "same", 50).await?;
    let b = publish_ids(&s.js, "SHOP.created", "same", 50).await?;
    assert_eq!(a.valid_ids, b.valid_ids);
    wait_drained(&s.js, "ORDERS", "order-workers").await?;
    wait_drained(&s.js, "SHOP", "order-workers").await?;
    let orders =
        orderpipeline_ctl::audit::Audit::collect(&s.js, "ORDERS", "ORDERS_DLQ", "order-workers")
            .await?;
    orders.assert_exactly_once(&a.valid_ids, &[])?;
    let shop = orderpipeline_ctl::audit::Audit::collect(&s.js, "SHOP", "SHOP_DLQ", "order-workers")
        .await?;
    shop.assert_exactly_once(&b.valid_ids, &[])?;
    // Nothing of the shop's reached the first pipeline's stream, nor its KV bucket.
    let mut orders_stream = s.js.get_stream("ORDERS").await?;
    let subjects = orders_stream.info().await?.config.subjects.clone();
    assert!(
        subjects.iter().all(|x| !x.starts_with("SHOP")),
        "{subjects:?}"
    );
    for bucket in ["ORDERS_STATE", "SHOP_STATE"] {
        assert!(
            s.js.get_key_value(bucket).await.is_err(),
            "no bucket of the protocol before v2 for new pipelines: {bucket}"
        );
    }

    // Both pipelines share the operator's one connection to this NATS.
    let metrics = operator_metrics(&s).await?;
    assert!(
        metrics
            .lines()
            .any(|l| l == "orderoperator_nats_connections 1"),
        "{metrics}"
    );

    // orderctl finds the shop's objects and its NATS from the resource alone.
    let shop_ref = format!("{}/shop", s.ns.name);
    let out = orderctl(&["--json", "--pipeline", &shop_ref, "audit"]).await?;
    assert!(out.status.success(), "orderctl audit: {}", stderr_of(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(
        (
            v["summary"]["published"].as_u64(),
            v["summary"]["processed"].as_u64()
        ),
        (Some(50), Some(50)),
        "{v}"
    );
    let out = orderctl(&["--json", "--pipeline", &shop_ref, "dlq", "list"]).await?;
    assert!(
        out.status.success(),
        "orderctl dlq list: {}",
        stderr_of(&out)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[]");
    // A flag that names another pipeline's object, and a pipeline that does not exist.
    let out = orderctl(&["--pipeline", &shop_ref, "--stream", "ORDERS", "status"]).await?;
    let err = stderr_of(&out);
    assert!(
        !out.status.success()
            && err.contains(&format!(
                "--stream ORDERS does not match pipeline {shop_ref}, whose stream is SHOP"
            )),
        "{err}"
    );
    let out = orderctl(&["--pipeline", &format!("{}/nope", s.ns.name), "status"]).await?;
    let err = stderr_of(&out);
    assert!(
        !out.status.success()
            && err.contains(&format!(
                "there is no OrderPipeline nope in namespace {}",
                s.ns.name
            )),
        "{err}"
    );
    s.ns.delete().await
}

/// Runs orderctl with the test's KUBECONFIG and none of the name variables.
async fn orderctl(args: &[&str]) -> anyhow::Result<std::process::Output> {
    let mut c = tokio::process::Command::new(orderpipeline_e2e::pipeline::binary("orderctl")?);
    c.args(args);
    for v in [
        "NATS_URL",
        "STREAM_NAME",
        "CONSUMER_NAME",
        "INPUT_SUBJECT",
        "DLQ_STREAM",
        "ORDERPIPELINE",
    ] {
        c.env_remove(v);
    }
    Ok(c.output().await?)
}

fn stderr_of(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The KV bucket a v1 pipeline had (one record per order; history 1), as a
/// pipeline upgraded from v1 still has it: the operator never creates one.
async fn v1_bucket(
    js: &async_nats::jetstream::Context,
    bucket: &str,
    ttl: Duration,
) -> anyhow::Result<async_nats::jetstream::kv::Store> {
    Ok(js
        .create_key_value(async_nats::jetstream::kv::Config {
            bucket: bucket.into(),
            history: 1,
            max_age: ttl,
            ..Default::default()
        })
        .await?)
}

fn worker_env_var(d: &Deployment, name: &str) -> Option<String> {
    env_of(d).get(name).cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_check_the_records_of_the_protocol_before_v2_while_there_are_any()
-> anyhow::Result<()> {
    let s = setup_ready("op-legacy").await?;
    let deployments: Api<Deployment> = Api::namespaced(s.client.clone(), &s.ns.name);
    let d = deployments.get("orders-workers").await?;
    assert_eq!(
        worker_env_var(&d, "LEGACY_STATE_BUCKET"),
        None,
        "a new pipeline has no old records"
    );
    // A record as the protocol before v2 wrote it, in the bucket v1 created: the
    // workers must consult the bucket.
    let kv = v1_bucket(&s.js, "ORDERS_STATE", Duration::ZERO).await?;
    kv.put("o-1", r#"{"state":"processed"}"#.to_string().into())
        .await?;
    wait_for(
        "LEGACY_STATE_BUCKET in the workers' env",
        Duration::from_secs(30),
        || async {
            let d = deployments.get("orders-workers").await?;
            Ok(
                (worker_env_var(&d, "LEGACY_STATE_BUCKET").as_deref() == Some("ORDERS_STATE"))
                    .then_some(()),
            )
        },
    )
    .await
    .with_context(|| format!("operator log:\n{}", s.operator.log_text()))?;
    // Once the records are gone (their TTL; here purged), the check goes too.
    kv.purge("o-1").await?;
    s.js.get_stream("KV_ORDERS_STATE").await?.purge().await?;
    wait_for(
        "LEGACY_STATE_BUCKET gone",
        Duration::from_secs(30),
        || async {
            let d = deployments.get("orders-workers").await?;
            Ok(worker_env_var(&d, "LEGACY_STATE_BUCKET")
                .is_none()
                .then_some(()))
        },
    )
    .await?;
    s.ns.delete().await
}

/// The Deployment an operator from before v2 left behind (its template has no
/// protocol annotation) is replaced by a `Recreate` rollout, so that old and new
/// workers never share the consumer; afterwards rollouts are rolling again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_of_the_old_protocol_are_replaced_by_a_recreate_rollout() -> anyhow::Result<()> {
    use futures::StreamExt as _;
    use kube::runtime::{WatchStreamExt as _, watcher};
    let s = setup_ready("op-recreate").await?;
    let deployments: Api<Deployment> = Api::namespaced(s.client.clone(), &s.ns.name);
    let strategy_of = |d: &Deployment| {
        d.spec
            .as_ref()
            .and_then(|s| s.strategy.as_ref())
            .and_then(|s| s.type_.clone())
            .unwrap_or_default()
    };
    let protocol_of = |d: &Deployment| {
        d.spec
            .as_ref()
            .and_then(|s| s.template.metadata.as_ref())
            .and_then(|m| m.annotations.as_ref())
            .and_then(|a| a.get("orderpipeline.dev/outcome-protocol").cloned())
    };
    let d = deployments.get("orders-workers").await?;
    assert_eq!(
        (strategy_of(&d).as_str(), protocol_of(&d).as_deref()),
        ("RollingUpdate", Some("2"))
    );
    // Every version of the Deployment, as the API server hands them out.
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(String, Option<String>)>::new()));
    let watch = {
        let seen = seen.clone();
        let cfg = watcher::Config::default().fields("metadata.name=orders-workers");
        let stream = watcher(deployments.clone(), cfg).applied_objects();
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while let Some(Ok(d)) = stream.next().await {
                let entry = (strategy_of(&d), protocol_of(&d));
                seen.lock().unwrap().push(entry);
            }
        })
    };
    // The template as the operator before v2 rendered it: no protocol annotation.
    deployments
        .patch(
            "orders-workers",
            &PatchParams::default(),
            &Patch::<()>::Json(serde_json::from_value(serde_json::json!([
                {"op": "remove",
                 "path": "/spec/template/metadata/annotations/orderpipeline.dev~1outcome-protocol"}
            ]))?),
        )
        .await?;
    let result = wait_for(
        "a Recreate rollout to v2, then rolling updates again",
        Duration::from_secs(60),
        || async {
            let seen = seen.lock().unwrap().clone();
            let recreate = seen
                .iter()
                .position(|(st, pr)| st == "Recreate" && pr.as_deref() == Some("2"));
            Ok(recreate.and_then(|i| {
                seen[i..]
                    .iter()
                    .any(|(st, pr)| st == "RollingUpdate" && pr.as_deref() == Some("2"))
                    .then_some(())
            }))
        },
    )
    .await;
    watch.abort();
    result.with_context(|| {
        format!(
            "versions seen: {:?}\noperator log:\n{}",
            seen.lock().unwrap(),
            s.operator.log_text()
        )
    })?;
    s.ns.delete().await
}

/// On SIGTERM the Lease is handed back only once the in-flight reconciles have
/// ended: a reconcile stuck connecting to a NATS that never answers (it gives up
/// after its 5 s connection timeout) still holds its connection when SIGTERM
/// arrives, and the Lease must stay this replica's until that connection is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sigterm_the_lease_is_handed_back_after_the_running_reconciles() -> anyhow::Result<()> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let s = setup("op-drain").await?;
    wait_for(
        "the replica to hold the Lease",
        Duration::from_secs(20),
        || async { Ok(lease_holder(&s).await?.is_some().then_some(())) },
    )
    .await?;
    // A "NATS" that accepts connections and never says anything.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = silent.local_addr()?.port();
    let (accepted, open) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let server = {
        let (accepted, open) = (accepted.clone(), open.clone());
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = silent.accept().await {
                accepted.fetch_add(1, Ordering::SeqCst);
                open.fetch_add(1, Ordering::SeqCst);
                let open = open.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = tokio::io::AsyncReadExt::read(&mut conn, &mut buf).await {
                        if n == 0 {
                            break;
                        }
                    }
                    open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        })
    };
    let stuck = sample_named(&format!("nats://127.0.0.1:{port}"), "stuck", "STUCK")?;
    s.api.create(&PostParams::default(), &stuck).await?;
    wait_for(
        "a reconcile connecting to the silent NATS",
        Duration::from_secs(20),
        || async { Ok((accepted.load(Ordering::SeqCst) > 0).then_some(())) },
    )
    .await?;
    s.operator.terminate().await?;
    // When the Lease is handed back, no reconcile may hold its connection any more.
    let open_at_release = wait_for("the Lease handed back", Duration::from_secs(30), || async {
        Ok(lease_holder(&s)
            .await?
            .is_none()
            .then(|| open.load(Ordering::SeqCst)))
    })
    .await
    .with_context(|| format!("operator log:\n{}", s.operator.log_text()))?;
    server.abort();
    assert_eq!(
        open_at_release, 0,
        "the Lease was handed back while a reconcile was still connecting to NATS"
    );
    s.ns.delete().await
}

/// The operator's /metrics text.
async fn operator_metrics(s: &Setup) -> anyhow::Result<String> {
    let url = format!("http://127.0.0.1:{}/metrics", s.operator.http_port);
    Ok(orderpipeline_e2e::pipeline::http_get(&url)
        .await
        .context("operator /metrics")?
        .1)
}

async fn reconciles_run(s: &Setup) -> anyhow::Result<u64> {
    operator_metrics(s)
        .await?
        .lines()
        .find_map(|l| l.strip_prefix("orderoperator_reconciles_total "))
        .context("orderoperator_reconciles_total in /metrics")?
        .trim()
        .parse()
        .context("reconciles_total")
}

/// With `consumer.backoff` the server replaces the ack wait by the first step:
/// that is no reason to update the consumer (and report it) on every resync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_with_backoff_is_left_alone_between_spec_changes() -> anyhow::Result<()> {
    let s = setup("op-backoff").await?;
    let mut p = sample(&s.nats.url())?;
    p.spec.consumer.backoff = vec!["1s".into(), "5s".into(), "20s".into()];
    s.api.create(&PostParams::default(), &p).await?;
    wait_ready(&s, "orders", "True", None).await?;
    let info =
        s.js.get_stream("ORDERS")
            .await?
            .consumer_info("order-workers")
            .await?;
    assert_eq!(
        info.config.ack_wait,
        Duration::from_secs(1),
        "the server's rule"
    );
    // Three more resyncs (2 s each here).
    let before = reconciles_run(&s).await?;
    wait_for("three more reconciles", Duration::from_secs(30), || async {
        Ok((reconciles_run(&s).await? >= before + 3).then_some(()))
    })
    .await?;
    let events = event_reasons(&s.ns.name).await?;
    assert!(
        !events.contains("ConsumerUpdated") && !events.contains("DriftCorrected"),
        "the consumer was rewritten without a change:\n{events}"
    );
    s.ns.delete().await
}

/// A hand edit of the worker Deployment (its image, with another field manager)
/// is put back: the edit moves the Deployment's generation, so the operator's
/// record of what it applied no longer matches and it applies again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_edit_of_the_worker_deployment_is_put_back() -> anyhow::Result<()> {
    let s = setup_ready("op-depdrift").await?;
    let deployments: Api<Deployment> = Api::namespaced(s.client.clone(), &s.ns.name);
    let image_of = |d: &Deployment| {
        d.spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .and_then(|p| p.containers.first())
            .and_then(|c| c.image.clone())
            .unwrap_or_default()
    };
    let ours = image_of(&deployments.get("orders-workers").await?);
    let edit = serde_json::json!({"spec": {"template": {"spec": {"containers": [
        {"name": "worker", "image": "example.invalid/edited-by-hand:1"}]}}}});
    deployments
        .patch(
            "orders-workers",
            &PatchParams::default(),
            &Patch::Strategic(&edit),
        )
        .await?;
    assert_eq!(
        image_of(&deployments.get("orders-workers").await?),
        "example.invalid/edited-by-hand:1"
    );
    wait_for(
        "the operator to put its image back",
        Duration::from_secs(30),
        || {
            let (deployments, ours) = (deployments.clone(), ours.clone());
            async move {
                let d = deployments.get("orders-workers").await?;
                Ok((image_of(&d) == ours).then_some(()))
            }
        },
    )
    .await?;
    s.ns.delete().await
}

/// A stream or consumer removed behind the operator's back is back at once,
/// not at the next resync (an hour here): JetStream announces the removal and
/// the operator reconciles the pipeline it belonged to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_stream_is_back_at_once_not_at_the_next_resync() -> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let js = jetstream::new(async_nats::connect(nats.url()).await?);
    let s = setup_on("op-advisory", true, nats, js, "1h").await?;
    s.api
        .create(&PostParams::default(), &sample(&s.nats.url())?)
        .await?;
    wait_ready(&s, "orders", "True", None).await?;
    s.js.delete_stream("ORDERS_DLQ").await?;
    wait_for("ORDERS_DLQ recreated", Duration::from_secs(15), || async {
        Ok(s.js.get_stream("ORDERS_DLQ").await.is_ok().then_some(()))
    })
    .await?;
    s.js.delete_consumer_from_stream("order-workers", "ORDERS")
        .await?;
    wait_for(
        "the consumer recreated",
        Duration::from_secs(15),
        || async {
            let stream = s.js.get_stream("ORDERS").await?;
            Ok(stream
                .consumer_info("order-workers")
                .await
                .is_ok()
                .then_some(()))
        },
    )
    .await?;
    s.ns.delete().await
}

/// The status of pipeline `name` once `ok` holds for it.
async fn wait_status(
    s: &Setup,
    what: &str,
    within: Duration,
    ok: impl Fn(&OrderPipeline) -> bool,
) -> anyhow::Result<OrderPipeline> {
    let api = s.api.clone();
    let ok = &ok;
    wait_for(what, within, || {
        let api = api.clone();
        async move {
            let p = api.get("orders").await?;
            Ok(ok(&p).then_some(p))
        }
    })
    .await
    .with_context(|| format!("operator log:\n{}", s.operator.log_text()))
}

/// Issue 23, item 4: a pipeline paused for longer than its maxAge (6 s here),
/// with the hold turned off (`holdUnprocessed: false`), loses the orders waiting in it, since JetStream removes them by age whether
/// acknowledged or not. The stream keeps nothing of them, so before the operator
/// counted them the audit said "lost 0". Now the age of the oldest one warns at
/// half maxAge, and the loss is on the status, in `kubectl describe`, a Warning
/// Event, the metric and the audit (exit 1), until a person acknowledges it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_paused_longer_than_its_max_age_shows_the_orders_it_lost() -> anyhow::Result<()>
{
    let s = setup("op-aged").await?;
    assert_eq!(paused_with_five_orders(&s, false, "6s").await?.len(), 5);
    // Half maxAge: the warning, while nothing is lost yet.
    let aging = wait_status(&s, "OldestUnprocessedAging", Duration::from_secs(30), |p| {
        condition(p, "InputsRetained").is_some_and(|c| c.reason == "OldestUnprocessedAging")
    })
    .await?;
    let age = aging
        .status
        .as_ref()
        .and_then(|st| st.oldest_unprocessed_age_seconds);
    assert!(age.is_some_and(|a| (3..6).contains(&a)), "{age:?}");
    // maxAge: the five are gone from the stream, and counted.
    let lost = wait_status(&s, "5 removed unprocessed", Duration::from_secs(40), |p| {
        p.status
            .as_ref()
            .and_then(|st| st.removed_unprocessed.as_ref())
            .is_some_and(|r| r.count >= 5)
    })
    .await?;
    let r = lost
        .status
        .as_ref()
        .unwrap()
        .removed_unprocessed
        .clone()
        .unwrap();
    assert_eq!((r.count, r.exact), (5, true), "{r:?}");
    let c = condition(&lost, "InputsRetained").unwrap();
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("False", "InputsRemovedUnprocessed")
    );
    assert!(
        c.message.starts_with("5 order(s) were removed"),
        "{}",
        c.message
    );
    let info = s.js.get_stream("ORDERS").await?.info().await?.state.clone();
    assert_eq!(info.messages, 0, "the stream removed them: {info:?}");
    wait_events(
        &s.ns.name,
        &[
            "Warning OldestUnprocessedAging: the oldest unprocessed order is",
            "Warning InputsRemovedUnprocessed: 5 order(s) were removed",
        ],
    )
    .await?;
    let described = tokio::process::Command::new("kubectl")
        .args(["-n", &s.ns.name, "describe", "orderpipeline", "orders"])
        .output()
        .await?;
    let described = String::from_utf8_lossy(&described.stdout);
    assert!(
        described.contains("InputsRemovedUnprocessed"),
        "{described}"
    );
    assert!(described.contains("Removed Unprocessed:"), "{described}");
    let metric = format!(
        "orderoperator_pipeline_inputs_removed_unprocessed{{pipeline=\"{}/orders\"}} 5",
        s.ns.name
    );
    assert!(operator_metrics(&s).await?.contains(&metric), "{metric}");
    // The audit reads the operator's count: exit 1, the count named.
    let pipeline = format!("{}/orders", s.ns.name);
    let out = orderctl(&["audit", "--pipeline", &pipeline]).await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(
        stdout.contains("removed unprocessed    5 (removed by the input stream's limits"),
        "{stdout}"
    );
    assert!(
        stdout.contains("VIOLATION: removed unprocessed: 5 order(s)"),
        "{stdout}"
    );
    // Acknowledged: the condition, the metric and the audit are clear again.
    s.api
        .patch(
            "orders",
            &PatchParams::default(),
            &Patch::Merge(&serde_json::json!({"metadata": {"annotations": {
                "orderpipeline.dev/removed-unprocessed-acknowledged": "5"}}})),
        )
        .await?;
    wait_status(&s, "acknowledged", Duration::from_secs(30), |p| {
        condition(p, "InputsRetained").is_some_and(|c| c.status == "True")
    })
    .await?;
    let out = orderctl(&["audit", "--pipeline", &pipeline]).await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", stderr_of(&out));
    assert!(stdout.contains("removed unprocessed    0\n"), "{stdout}");
    s.ns.delete().await
}

/// Five orders published into a paused pipeline whose stream has `maxAge`
/// `max_age`.
async fn paused_with_five_orders(
    s: &Setup,
    hold: bool,
    max_age: &str,
) -> anyhow::Result<Vec<String>> {
    let mut p = sample(&s.nats.url())?;
    p.spec.stream.max_age = max_age.into();
    p.spec.stream.duplicate_window = "1s".into();
    p.spec.stream.hold_unprocessed = hold;
    p.spec.paused = true;
    s.api.create(&PostParams::default(), &p).await?;
    wait_status(s, "paused, InputsRetained", Duration::from_secs(60), |p| {
        condition(p, "InputsRetained").is_some_and(|c| c.status == "True")
            && condition(p, "Paused").is_some_and(|c| c.status == "True")
    })
    .await?;
    let report = publish_ids(&s.js, "ORDER.created", "held", 5).await?;
    Ok(report.valid_ids)
}

/// Issue 23, item 4, avoided by default: with `holdUnprocessed` (the default) the
/// same pause loses nothing. The operator doubles the stream's maxAge each time
/// the oldest unprocessed order reaches half of it, so after more than three
/// times the spec's maxAge all five are still there; unpaused, they are processed
/// once, and maxAge goes back to the spec's. (maxAge 10 s here: half of it,
/// the hold's margin, covers a reconcile on the 2 s resync under load.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_paused_longer_than_its_max_age_loses_nothing_by_default() -> anyhow::Result<()>
{
    let s = setup("op-held").await?;
    // maxAge 10 s: the hold has 5 s (half of it) to react, on a 2 s resync.
    let ids = paused_with_five_orders(&s, true, "10s").await?;
    assert_eq!(ids.len(), 5);
    let held = wait_status(&s, "an order 25 s old", Duration::from_secs(60), |p| {
        p.status
            .as_ref()
            .and_then(|st| st.oldest_unprocessed_age_seconds)
            .is_some_and(|a| a >= 25)
    })
    .await?;
    let st = held.status.clone().unwrap_or_default();
    assert_eq!(st.removed_unprocessed, None, "{st:?}");
    assert!(st.held_max_age_seconds.is_some_and(|h| h > 25), "{st:?}");
    let c = condition(&held, "InputsRetained").unwrap();
    assert_eq!(c.reason, "OldestUnprocessedAging");
    assert!(
        c.message
            .contains("the operator holds the stream's maxAge at"),
        "{}",
        c.message
    );
    let info = s.js.get_stream("ORDERS").await?.info().await?.clone();
    assert_eq!(info.state.messages, 5, "{:?}", info.state);
    assert!(
        info.config.max_age > Duration::from_secs(20),
        "{:?}",
        info.config.max_age
    );
    // A maxAge the hold moved is no drift.
    assert!(!event_reasons(&s.ns.name).await?.contains("DriftCorrected"));
    s.api
        .patch(
            "orders",
            &PatchParams::default(),
            &Patch::Merge(&serde_json::json!({"spec": {"paused": false}})),
        )
        .await?;
    wait_drained(&s.js, "ORDERS", "order-workers").await?;
    let audit =
        orderpipeline_ctl::audit::Audit::collect(&s.js, "ORDERS", "ORDERS_DLQ", "order-workers")
            .await?;
    audit.assert_exactly_once(&ids, &[])?;
    // Capacity: the five outcomes are five subjects in the server's memory
    // (six with the inputs' while they stay), estimated at the default 400 B.
    wait_status(
        &s,
        "the outcomes' subjects in the status",
        Duration::from_secs(8),
        |p| {
            p.status
                .as_ref()
                .and_then(|st| st.stream.as_ref())
                .is_some_and(|st| {
                    st.subjects >= 5 && st.estimated_server_memory_bytes == st.subjects * 400
                })
        },
    )
    .await?;
    wait_max_age(&s.js, "ORDERS", Duration::from_secs(10)).await?;
    let back = wait_status(&s, "the hold released", Duration::from_secs(30), |p| {
        p.status
            .as_ref()
            .is_some_and(|st| st.held_max_age_seconds.is_none())
    })
    .await?;
    assert_eq!(condition(&back, "InputsRetained").unwrap().status, "True");
    s.ns.delete().await
}

/// Issue 23, item 4, the delivered half: an input a worker holds (its downstream
/// hangs) that is removed from the stream ends its delivery with nats-server's
/// MSG_TERMINATED advisory, and the operator counts it from that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_input_removed_while_a_worker_holds_it_is_counted_from_the_advisory()
-> anyhow::Result<()> {
    let s = setup("op-term").await?;
    // A downstream that accepts and never answers: the worker holds the order.
    let hang = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/orders", hang.local_addr()?);
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((c, _)) = hang.accept().await {
            open.push(c);
        }
    });
    let mut p = sample(&s.nats.url())?;
    p.spec.workers.downstream_url = Some(url);
    p.spec.workers.downstream_timeout = "120s".into();
    p.spec.workers.replicas = 1;
    s.api.create(&PostParams::default(), &p).await?;
    wait_ready(&s, "orders", "True", None).await?;
    let ack =
        s.js.publish(
            "ORDER.created",
            orderpipeline_proto::Message::encode_to_vec(&orderpipeline_ctl::valid_order(
                "held-1", 1,
            ))
            .into(),
        )
        .await?
        .await?;
    let js = s.js.clone();
    wait_for(
        "the worker holds the order",
        Duration::from_secs(30),
        || {
            let js = js.clone();
            async move {
                let c = js
                    .get_stream("ORDERS")
                    .await?
                    .consumer_info("order-workers")
                    .await?;
                Ok((c.num_ack_pending == 1).then_some(()))
            }
        },
    )
    .await?;
    assert!(
        s.js.get_stream("ORDERS")
            .await?
            .delete_message(ack.sequence)
            .await?
    );
    let lost = wait_status(&s, "1 removed unprocessed", Duration::from_secs(30), |p| {
        p.status
            .as_ref()
            .and_then(|st| st.removed_unprocessed.as_ref())
            .is_some_and(|r| r.count >= 1)
    })
    .await?;
    // (`exact` may be false: the head passed the consumer's cursor of the read
    // before while it delivered, so never-delivered removals are a lower bound.)
    let r = lost.status.unwrap().removed_unprocessed.unwrap();
    assert_eq!(r.count, 1, "{r:?}");
    held.abort();
    s.ns.delete().await
}

/// Issue 23, item 6: the downstream's Idempotency-Key carries the cluster's
/// identity (the UID of kube-system by default), pinned in the input stream's
/// metadata when the operator creates it, so the same pipeline in two clusters
/// sharing a downstream never shares a key. A stream an operator created before
/// the scope existed is pinned to the scope its workers used (`<ns>/<name>`), so
/// orders redelivered across the upgrade keep their key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_idempotency_scope_is_the_clusters_and_pinned_on_the_stream() -> anyhow::Result<()> {
    let s = setup("op-scope").await?;
    let uid = Api::<Namespace>::all(s.client.clone())
        .get("kube-system")
        .await?
        .metadata
        .uid
        .context("kube-system's uid")?;
    let ns = s.ns.name.clone();
    // An older operator's stream: owned, no scope.
    let old = sample_named(&s.nats.url(), "legacy", "LEGACY")?;
    let plan = order_operator::render::plan(&old)?;
    let mut cfg = plan.topology.stream_config();
    cfg.metadata.insert(
        orderpipeline_common::topology::OWNER_METADATA_KEY.into(),
        format!("{ns}/legacy"),
    );
    s.js.create_stream(cfg).await?;
    s.api.create(&PostParams::default(), &old).await?;
    s.api
        .create(&PostParams::default(), &sample(&s.nats.url())?)
        .await?;
    wait_ready(&s, "orders", "True", None).await?;
    wait_ready(&s, "legacy", "True", None).await?;
    let scope = |stream: &'static str| {
        let js = s.js.clone();
        async move {
            let info = js.get_stream(stream).await?.info().await?.clone();
            anyhow::Ok(
                info.config
                    .metadata
                    .get(orderpipeline_common::names::IDEMPOTENCY_SCOPE_METADATA)
                    .cloned(),
            )
        }
    };
    assert_eq!(scope("ORDERS").await?, Some(format!("{uid}/{ns}/orders")));
    let js = s.js.clone();
    wait_for("the legacy stream pinned", Duration::from_secs(30), || {
        let js = js.clone();
        let want = format!("{ns}/legacy");
        async move {
            let info = js.get_stream("LEGACY").await?.info().await?.clone();
            let got = info
                .config
                .metadata
                .get(orderpipeline_common::names::IDEMPOTENCY_SCOPE_METADATA)
                .cloned();
            Ok((got.as_deref() == Some(want.as_str())).then_some(()))
        }
    })
    .await?;
    s.ns.delete().await
}

/// Waits until credentials expiring at `exp` (Unix seconds) have expired.
async fn expired(exp: u64) -> anyhow::Result<()> {
    wait_for("credentials to expire", Duration::from_secs(30), || async {
        Ok((orderpipeline_common::natsauth::now() > exp + 1).then_some(()))
    })
    .await
}

/// The creds in a minted Secret and their JWT's expiry.
async fn minted(secrets: &Api<Secret>, name: &str) -> anyhow::Result<(String, u64)> {
    let s = secrets.get(name).await?;
    let creds = s
        .data
        .as_ref()
        .and_then(|d| d.get("creds"))
        .map(|b| String::from_utf8_lossy(&b.0).to_string())
        .context("no creds")?;
    let exp = orderpipeline_common::natsauth::creds_expiry(&creds).context("no exp")?;
    Ok((creds, exp))
}

/// Two pipelines in one NATS account (operator mode) with `accountRef`: the
/// operator connects as a user it mints, creates their streams, and keeps a
/// worker and a producer identity per pipeline in Secrets; the workers (real
/// processes, as the Pods run them) process the orders a producer sends on its
/// minted identity, lose none, and keep working across renewals of their
/// 20 s credentials without a rollout; A's worker identity cannot pull from B
/// or subscribe to B's outcomes; a deleted pipeline's identity stops working
/// when it expires (issue 25).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelines_with_minted_identities_run_apart_in_one_account() -> anyhow::Result<()> {
    let auth = operator_mode()?;
    let nats = NatsServer::start_with_config(&auth.server_config).await?;
    let admin = jetstream_as(&nats.url(), &auth.admin_creds, None).await?;
    let url = nats.url();
    let s = setup_env("op-minted", true, nats, admin, "2s", |ns| {
        vec![
            ("ACCOUNTS_NAMESPACE", ns.to_string()),
            ("NATS_IDENTITY_TTL", "20s".to_string()),
        ]
    })
    .await?;
    let secrets: Api<Secret> = Api::namespaced(s.client.clone(), &s.ns.name);
    let account: Secret = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "tenants", "labels": {"orderpipeline.dev/nats-account": "true"}},
        "stringData": {
            "account": auth.account,
            "signingKey": auth.signing_key.seed().map_err(|e| anyhow::anyhow!("{e}"))?,
            "urls": url,
            "namespaces": s.ns.name,
        }
    }))?;
    secrets.create(&PostParams::default(), &account).await?;
    let mut ready = Vec::new();
    for (name, stream) in [("a", "TA"), ("b", "TB")] {
        let mut p = sample_named(&url, name, stream)?;
        p.spec.nats.account_ref = Some(order_operator::crd::AccountRef {
            name: "tenants".into(),
        });
        p.spec.workers.replicas = 1;
        s.api.create(&PostParams::default(), &p).await?;
        ready.push(wait_ready(&s, name, "True", None).await?);
    }
    let id = ready[0]
        .status
        .as_ref()
        .and_then(|st| st.nats_identity.clone())
        .context("status.natsIdentity")?;
    assert_eq!(
        (id.worker_secret.as_str(), id.producer_secret.as_str()),
        ("a-nats-worker", "a-nats-producer")
    );
    let deployments: Api<Deployment> = Api::namespaced(s.client.clone(), &s.ns.name);
    let d = deployments.get("a-workers").await?;
    let env = env_of(&d);
    assert_eq!(env.get("NATS_INBOX_PREFIX"), Some(&id.inbox_prefix));
    assert!(env.contains_key("NATS_CREDS_FILE"), "{env:?}");
    let generation = d.metadata.generation;

    // A's producer identity sends A's orders; A's workers process them.
    let (producer_creds, _) = minted(&secrets, "a-nats-producer").await?;
    let producer = jetstream_as(&url, &producer_creds, Some(&id.inbox_prefix)).await?;
    let (worker_creds, first_exp) = minted(&secrets, "a-nats-worker").await?;
    publish_ids(&producer, "TA.created", "minted1", 100).await?;
    wait_drained(&s.js, "TA", "order-workers").await?;

    // A's worker identity does not reach B.
    let a_worker = probe(&url, &worker_creds, &id.inbox_prefix).await?;
    a_worker
        .publish_denied("$JS.API.CONSUMER.MSG.NEXT.TB.order-workers")
        .await?;
    a_worker.subscribe_denied("TB.processed.>").await?;

    // The credentials are renewed before they expire, the workers go on with
    // the new ones after the old ones expired, and nothing rolls.
    let renewed = wait_for(
        "the worker's credentials renewed",
        Duration::from_secs(30),
        || async {
            let (_, exp) = minted(&secrets, "a-nats-worker").await?;
            Ok((exp > first_exp).then_some(exp))
        },
    )
    .await?;
    expired(first_exp).await?;
    // The producer's credentials were renewed too: an application reads its
    // Secret's file again when it reconnects (nats.go's UserCredentials does).
    let (producer_creds, _) = minted(&secrets, "a-nats-producer").await?;
    let producer = jetstream_as(&url, &producer_creds, Some(&id.inbox_prefix)).await?;
    publish_ids(&producer, "TA.created", "minted2", 100).await?;
    wait_drained(&s.js, "TA", "order-workers").await?;
    let audit =
        orderpipeline_e2e::pipeline::Audit::collect(&s.js, "TA", "TA_DLQ", "order-workers").await?;
    assert!(audit.violations().is_empty(), "{:?}", audit.violations());
    assert_eq!(
        (audit.summary().processed, audit.summary().lost),
        (200, 0),
        "{:?}",
        audit.summary()
    );
    assert_eq!(
        deployments.get("a-workers").await?.metadata.generation,
        generation,
        "a renewal rolled the workers"
    );
    assert!(renewed > first_exp);

    // A tenant's own Secret where a pipeline's identity would go is refused,
    // not overwritten.
    let theirs: Secret = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "c-nats-worker"},
        "stringData": {"creds": "the tenant's own"}
    }))?;
    secrets.create(&PostParams::default(), &theirs).await?;
    let mut c = sample_named(&url, "c", "TC")?;
    c.spec.nats.account_ref = Some(order_operator::crd::AccountRef {
        name: "tenants".into(),
    });
    s.api.create(&PostParams::default(), &c).await?;
    let c = wait_ready(&s, "c", "False", Some("InvalidSpec")).await?;
    let msg = &condition(&c, "Ready").context("Ready")?.message;
    assert!(msg.contains("will not overwrite"), "{msg}");
    let kept = secrets.get("c-nats-worker").await?;
    assert_eq!(
        kept.data
            .as_ref()
            .and_then(|d| d.get("creds"))
            .map(|b| b.0.as_slice()),
        Some(&b"the tenant's own"[..])
    );

    // A deleted: its Secrets go with it, and its identity stops working when
    // it expires.
    let (last_creds, last_exp) = minted(&secrets, "a-nats-worker").await?;
    s.api.delete("a", &DeleteParams::default()).await?;
    wait_for(
        "a's identities removed",
        Duration::from_secs(30),
        || async {
            Ok(secrets
                .get_opt("a-nats-worker")
                .await?
                .is_none()
                .then_some(()))
        },
    )
    .await?;
    expired(last_exp).await?;
    let refused = async_nats::ConnectOptions::with_credentials(&last_creds)?
        .connect(&url)
        .await;
    assert!(refused.is_err(), "an expired identity still connects");
    // B is untouched.
    let b = s.api.get("b").await?;
    assert_eq!(
        condition(&b, "Ready").map(|c| c.status.as_str()),
        Some("True")
    );
    Ok(())
}

/// Two tenants' namespaces watched by one operator, one NATS account offered
/// to both (operator mode): each pipeline runs on the identities the operator
/// mints for it, and each tenant's worker and producer identities reach only
/// their own pipeline, both ways (issue 25: two pipelines in two namespaces).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_in_two_namespaces_reach_only_their_own_pipeline() -> anyhow::Result<()> {
    install_crd_and_rbac().await?;
    let auth = operator_mode()?;
    let nats = NatsServer::start_with_config(&auth.server_config).await?;
    let admin = jetstream_as(&nats.url(), &auth.admin_creds, None).await?;
    let url = nats.url();
    let client = kube_client().await?;
    let home = TestNamespace::create(&client, "op-accounts").await?;
    let tenants = [
        TestNamespace::create(&client, "op-tenant-a").await?,
        TestNamespace::create(&client, "op-tenant-b").await?,
    ];
    let account: Secret = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "tenants", "labels": {"orderpipeline.dev/nats-account": "true"}},
        "stringData": {
            "account": auth.account,
            "signingKey": auth.signing_key.seed().map_err(|e| anyhow::anyhow!("{e}"))?,
            "urls": url,
            "namespaces": format!("{},{}", tenants[0].name, tenants[1].name),
        }
    }))?;
    Api::<Secret>::namespaced(client.clone(), &home.name)
        .create(&PostParams::default(), &account)
        .await?;
    let watched = format!("{},{}", tenants[0].name, tenants[1].name);
    let env = [("ACCOUNTS_NAMESPACE", home.name.clone())];
    let operator = OperatorProcess::spawn_env(&watched, "2s", &env).await?;
    let mut runners = Vec::new();
    let mut ids = Vec::new();
    for (ns, stream) in tenants.iter().zip(["TA", "TB"]) {
        runners.push(orderpipeline_e2e::podrunner::for_namespace(
            &client,
            &ns.name,
            Vec::new(),
        )?);
        let mut p = sample_named(&url, "orders", stream)?;
        p.spec.nats.account_ref = Some(order_operator::crd::AccountRef {
            name: "tenants".into(),
        });
        p.spec.workers.replicas = 1;
        let api = Api::<OrderPipeline>::namespaced(client.clone(), &ns.name);
        api.create(&PostParams::default(), &p).await?;
        let ready = wait_ready_in(&api, "orders")
            .await
            .with_context(|| format!("operator log:\n{}", operator.log_text()))?;
        let id = ready
            .status
            .and_then(|s| s.nats_identity)
            .context("Ready without status.natsIdentity")?;
        let secrets = Api::<Secret>::namespaced(client.clone(), &ns.name);
        let (worker, _) = minted(&secrets, &id.worker_secret).await?;
        let (producer, _) = minted(&secrets, &id.producer_secret).await?;
        ids.push((stream, id, worker, producer));
    }
    // Each tenant's producer identity sends its orders; its workers process them.
    for (stream, id, _, producer) in &ids {
        let js = jetstream_as(&url, producer, Some(&id.inbox_prefix)).await?;
        publish_ids(&js, &format!("{stream}.created"), stream, 50).await?;
    }
    for (stream, ..) in &ids {
        wait_drained(&admin, stream, "order-workers").await?;
        let dlq = format!("{stream}_DLQ");
        let audit =
            orderpipeline_e2e::pipeline::Audit::collect(&admin, stream, &dlq, "order-workers")
                .await?;
        let s = audit.summary();
        assert_eq!((s.processed, s.lost), (50, 0), "{stream}: {s:?}");
    }
    // Each one's identities against the other's pipeline.
    for (mine, theirs) in [(0, 1), (1, 0)] {
        let (_, id, worker, producer) = &ids[mine];
        let (other, other_id, ..) = &ids[theirs];
        let w = probe(&url, worker, &id.inbox_prefix).await?;
        for subject in [
            format!("$JS.API.CONSUMER.MSG.NEXT.{other}.order-workers"),
            format!("$JS.API.CONSUMER.INFO.{other}.order-workers"),
            format!("$JS.API.STREAM.INFO.{other}"),
            format!("$JS.API.DIRECT.GET.{other}"),
            format!("$JS.API.STREAM.MSG.GET.{other}_DLQ"),
            format!("$JS.ACK.{other}.order-workers.1.1.1.1.0"),
            format!("{other}.processed.k1"),
            format!("{other}.created"),
        ] {
            w.publish_denied(&subject).await?;
        }
        for subject in [format!("{other}.>"), format!("{}.>", other_id.inbox_prefix)] {
            w.subscribe_denied(&subject).await?;
        }
        let p = probe(&url, producer, &id.inbox_prefix).await?;
        p.publish_denied(&format!("{other}.created")).await?;
        p.subscribe_denied(&format!("{other}.>")).await?;
    }
    drop(runners);
    drop(operator);
    for ns in tenants.into_iter().chain([home]) {
        ns.delete().await?;
    }
    Ok(())
}
