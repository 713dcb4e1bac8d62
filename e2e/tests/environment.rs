//! Proves the local environment is real: a real kube-apiserver with controllers
//! and kwok nodes, a real nats-server with JetStream, a real OTLP receiver.

use std::time::Duration;

use anyhow::Context as _;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Api;
use kube::api::{DeleteParams, DynamicObject, ListParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use orderpipeline_e2e::{NatsServer, TestNamespace, env_var, kube_client, random_suffix, wait_for};

#[tokio::test]
async fn deployment_pods_run_on_kwok_nodes_and_are_garbage_collected() -> anyhow::Result<()> {
    let client = kube_client().await?;
    let ns = TestNamespace::create(&client, "env-deploy").await?;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let replicasets: Api<ReplicaSet> = Api::namespaced(client.clone(), &ns.name);

    let dep: Deployment = serde_json::from_value(serde_json::json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "web", "image": "example.invalid/web:1"}]}
            }
        }
    }))?;
    deployments
        .create(&PostParams::default(), &dep.clone())
        .await?;

    let running = wait_for(
        "2 Running pods on kwok nodes",
        Duration::from_secs(90),
        || {
            let pods = pods.clone();
            async move {
                let list = pods.list(&ListParams::default().labels("app=web")).await?;
                let on_kwok: Vec<String> = list
                    .items
                    .iter()
                    .filter(|p| {
                        p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
                    })
                    .filter_map(|p| p.spec.as_ref()?.node_name.clone())
                    .filter(|n| n.starts_with("kwok-node-"))
                    .collect();
                Ok((on_kwok.len() == 2).then_some(on_kwok))
            }
        },
    )
    .await?;
    assert_eq!(running.len(), 2, "pods on kwok nodes: {running:?}");
    for p in pods
        .list(&ListParams::default().labels("app=web"))
        .await?
        .items
    {
        let ready = p
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        assert!(ready, "kwok marks ordinary pods Ready");
    }

    // OrderPipeline worker pods run but are not Ready until a real worker says so
    // (the pod runner reflects /readyz); kwok must not fake it.
    let mut worker: Deployment = dep.clone();
    worker.metadata.name = Some("worker".into());
    let labels = serde_json::json!({"app": "worker", "orderpipeline.dev/pipeline": "x"});
    let spec = worker.spec.as_mut().context("spec")?;
    spec.selector = serde_json::from_value(serde_json::json!({"matchLabels": labels}))?;
    spec.template.metadata = Some(serde_json::from_value(
        serde_json::json!({"labels": labels}),
    )?);
    deployments.create(&PostParams::default(), &worker).await?;
    wait_for(
        "worker pods Running and not Ready",
        Duration::from_secs(90),
        || {
            let pods = pods.clone();
            async move {
                let list = pods
                    .list(&ListParams::default().labels("app=worker"))
                    .await?;
                let ok = list.items.len() == 2
                    && list.items.iter().all(|p| {
                        let st = p.status.clone().unwrap_or_default();
                        st.phase.as_deref() == Some("Running")
                            && st
                                .conditions
                                .unwrap_or_default()
                                .iter()
                                .any(|c| c.type_ == "Ready" && c.status == "False")
                    });
                Ok(ok.then_some(()))
            }
        },
    )
    .await?;
    deployments
        .delete("worker", &DeleteParams::background())
        .await?;

    deployments
        .delete("web", &DeleteParams::background())
        .await?;
    wait_for(
        "the ReplicaSet and Pods to be garbage-collected",
        Duration::from_secs(90),
        || {
            let (pods, replicasets) = (pods.clone(), replicasets.clone());
            async move {
                let p = pods
                    .list(&ListParams::default().labels("app=web"))
                    .await?
                    .items
                    .len();
                let r = replicasets.list(&ListParams::default()).await?.items.len();
                Ok((p == 0 && r == 0).then_some(()))
            }
        },
    )
    .await?;
    ns.delete().await
}

#[tokio::test]
async fn crd_with_cel_rule_is_established_and_enforced() -> anyhow::Result<()> {
    let client = kube_client().await?;
    let group = format!("{}.e2e.orderpipeline.test", random_suffix());
    let name = format!("widgets.{group}");
    let crd: CustomResourceDefinition = serde_json::from_value(serde_json::json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": name},
        "spec": {
            "group": group, "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "versions": [{
                "name": "v1", "served": true, "storage": true,
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "properties": {"spec": {
                        "type": "object",
                        "properties": {
                            "minReplicas": {"type": "integer"},
                            "maxReplicas": {"type": "integer"}
                        },
                        "x-kubernetes-validations": [{
                            "rule": "self.minReplicas <= self.maxReplicas",
                            "message": "minReplicas must not exceed maxReplicas"
                        }]
                    }}
                }}
            }]
        }
    }))?;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.create(&PostParams::default(), &crd).await?;
    let established = tokio::time::timeout(
        Duration::from_secs(60),
        kube::runtime::wait::await_condition(
            crds.clone(),
            &name,
            kube::runtime::conditions::is_crd_established(),
        ),
    )
    .await
    .context("CRD not Established within 60s")??;
    assert!(established.is_some());

    let ns = TestNamespace::create(&client, "env-crd").await?;
    let gvk = GroupVersionKind::gvk(&group, "v1", "Widget");
    let ar = ApiResource::from_gvk_with_plural(&gvk, "widgets");
    let widgets: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns.name, &ar);
    let mk = |min: i64, max: i64| -> anyhow::Result<DynamicObject> {
        Ok(serde_json::from_value(serde_json::json!({
            "apiVersion": format!("{group}/v1"), "kind": "Widget",
            "metadata": {"name": format!("w-{min}-{max}")},
            "spec": {"minReplicas": min, "maxReplicas": max}
        }))?)
    };
    // The apiserver may need a moment after Established before it serves the type.
    wait_for(
        "a valid Widget to be accepted",
        Duration::from_secs(30),
        || {
            let widgets = widgets.clone();
            let obj = mk(1, 3);
            async move {
                widgets.create(&PostParams::default(), &obj?).await?;
                Ok(Some(()))
            }
        },
    )
    .await?;
    let err = widgets
        .create(&PostParams::default(), &mk(5, 2)?)
        .await
        .expect_err("an object breaking the CEL rule must be rejected");
    let msg = err.to_string();
    assert!(
        msg.contains("minReplicas must not exceed maxReplicas"),
        "rejection must carry the rule's message, got: {msg}"
    );
    crds.delete(&name, &DeleteParams::default()).await?;
    ns.delete().await
}

#[tokio::test]
async fn jetstream_file_stream_dedups_and_survives_restart() -> anyhow::Result<()> {
    use async_nats::jetstream::{self, stream};
    let mut server = NatsServer::start().await?;
    let stream_name = format!("ENV_{}", random_suffix().to_uppercase());
    let subject = format!("{stream_name}.created");
    {
        let client = async_nats::connect(server.url()).await?;
        let js = jetstream::new(client);
        js.create_stream(stream::Config {
            name: stream_name.clone(),
            subjects: vec![format!("{stream_name}.*")],
            storage: stream::StorageType::File,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await?;
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", "order-1");
        let first = js
            .publish_with_headers(subject.clone(), headers.clone(), "a".into())
            .await?
            .await?;
        let second = js
            .publish_with_headers(subject.clone(), headers, "a".into())
            .await?
            .await?;
        assert!(!first.duplicate, "first publish must be stored");
        assert!(
            second.duplicate,
            "same Nats-Msg-Id must be reported as a duplicate"
        );
        assert_eq!(first.sequence, second.sequence);
    }

    server.restart().await?;

    let client = async_nats::connect(server.url()).await?;
    let js = jetstream::new(client);
    let mut s = js.get_stream(&stream_name).await?;
    let info = s.info().await?;
    assert_eq!(info.config.storage, stream::StorageType::File);
    assert_eq!(
        info.state.messages, 1,
        "the stored message survives a restart"
    );
    let msg = s.get_raw_message(1).await?;
    assert_eq!(msg.subject.as_str(), subject);
    server.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_span_exported_over_otlp_is_returned_by_jaeger() -> anyhow::Result<()> {
    use opentelemetry::trace::{Span as _, Tracer as _, TracerProvider as _};
    let endpoint = env_var("OTEL_EXPORTER_OTLP_ENDPOINT")?;
    let query = env_var("JAEGER_QUERY_URL")?;
    let service = format!("env-test-{}", random_suffix());
    let provider = orderpipeline_common::telemetry::tracer_provider(&endpoint, &service)?;
    let tracer = provider.tracer("e2e");
    let mut span = tracer.start("environment-check");
    let trace_id = span.span_context().trace_id().to_string();
    span.end();
    // force_flush blocks until the exporter (which needs the runtime) is done.
    let p = provider.clone();
    tokio::task::spawn_blocking(move || p.force_flush()).await??;

    let url = format!("{query}/api/traces/{trace_id}");
    let body: serde_json::Value = wait_for(
        "Jaeger to return the trace",
        Duration::from_secs(30),
        || {
            let url = url.clone();
            async move {
                let out = tokio::process::Command::new("curl")
                    .args(["-sS", "--max-time", "2", "--noproxy", "*", &url])
                    .output()
                    .await?;
                let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
                let found = v["data"].as_array().is_some_and(|d| !d.is_empty());
                Ok(found.then_some(v))
            }
        },
    )
    .await?;
    let span = &body["data"][0]["spans"][0];
    assert_eq!(span["operationName"], "environment-check");
    assert_eq!(body["data"][0]["traceID"], trace_id);
    let process = &body["data"][0]["processes"][span["processID"].as_str().unwrap_or_default()];
    assert_eq!(process["serviceName"], service.as_str());
    tokio::task::spawn_blocking(move || provider.shutdown()).await??;
    Ok(())
}

#[tokio::test]
async fn kwok_nodes_are_ready() -> anyhow::Result<()> {
    let client = kube_client().await?;
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client);
    let list = nodes.list(&ListParams::default()).await?;
    let ready = list
        .items
        .iter()
        .filter(|n| {
            n.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .count();
    assert!(
        ready >= 2,
        "expected at least 2 Ready kwok nodes, got {ready}"
    );
    let version = kube_client().await?.apiserver_version().await?;
    assert_eq!(version.major, "1");
    assert_eq!(version.minor, "36", "server version {version:?}");
    Ok(())
}

/// A test that fails half way (its namespace dropped without `delete`) still
/// leaves nothing behind: the guard deletes the namespace.
#[tokio::test]
async fn a_test_namespace_dropped_without_delete_is_deleted_all_the_same() -> anyhow::Result<()> {
    use k8s_openapi::api::core::v1::Namespace;
    let client = kube_client().await?;
    let ns = TestNamespace::create(&client, "env-guard").await?;
    let name = ns.name.clone();
    // As a panicking test would: the guard goes out of scope on the way out.
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        let _guard = ns;
        panic!("a failing test");
    }));
    let namespaces: Api<Namespace> = Api::all(client);
    wait_for(
        &format!("namespace {name} deleted or terminating"),
        Duration::from_secs(30),
        || {
            let namespaces = namespaces.clone();
            let name = name.clone();
            async move {
                Ok(match namespaces.get_opt(&name).await? {
                    None => Some(()),
                    Some(n) => n.metadata.deletion_timestamp.map(|_| ()),
                })
            }
        },
    )
    .await
}

/// A test nats-server whose port was taken between picking and binding (tests
/// run in parallel) fails at once, naming the bind error, instead of after the
/// 20 s readiness wait (which made CI's auth test fail on a taken monitoring port).
#[tokio::test]
async fn a_test_nats_server_on_a_taken_port_fails_fast_with_the_bind_error() -> anyhow::Result<()> {
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = taken.local_addr()?.port();
    let started = std::time::Instant::now();
    // A later `http:` line wins in nats-server's config: the monitor port is taken.
    let r = NatsServer::start_with_config(&format!("http: 127.0.0.1:{port}")).await;
    let err = match r {
        Ok(_) => anyhow::bail!("started on a taken port"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("address already in use"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "took {:?} to give up",
        started.elapsed()
    );
    drop(taken);
    Ok(())
}
