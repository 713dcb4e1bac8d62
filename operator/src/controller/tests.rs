//! Reconciles without the environment: the Kubernetes client talks to an
//! in-memory API server (kube's `tower-test` mock, answered by [`ApiServer`]),
//! and JetStream is the in-memory [`Fake`]. Each test asserts the requests one
//! reconcile makes. The e2e tests run the same code against the real thing.

use std::collections::BTreeMap;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use http::{Request, Response};
use kube::client::Body;
use serde_json::{Value, json};

use super::jetstream_api::{Fake, StreamView};
use super::*;
use crate::crd::{DeletionPolicy, OrderPipeline};

const PIPELINE: &str = "/apis/orderpipeline.dev/v1alpha1/namespaces/demo/orderpipelines/orders";
const DEPLOYMENT: &str = "/apis/apps/v1/namespaces/demo/deployments/orders-workers";
const PDB: &str = "/apis/policy/v1/namespaces/demo/poddisruptionbudgets/orders-workers";

/// Objects by path, and every request as "METHOD path [patch type]".
#[derive(Default)]
struct ApiServer {
    objects: std::sync::Mutex<BTreeMap<String, Value>>,
    log: std::sync::Mutex<Vec<String>>,
    /// The Deployment's pods are still starting: none available.
    workers_starting: std::sync::atomic::AtomicBool,
}

impl ApiServer {
    /// The API requests other than Events, in order.
    fn requests(&self) -> Vec<String> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|r| !r.starts_with("event "))
            .cloned()
            .collect()
    }

    fn count(&self, prefix: &str) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.starts_with(prefix))
            .count()
    }

    fn clear(&self) {
        self.log.lock().unwrap().clear();
    }

    /// The reasons of the Events posted since the last `clear`.
    fn event_reasons(&self) -> Vec<String> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter_map(|r| r.strip_prefix("event "))
            .map(str::to_string)
            .collect()
    }

    fn answer(
        &self,
        method: &str,
        path: &str,
        kind: &str,
        dry_run: bool,
        body: &[u8],
    ) -> (u16, Value) {
        let body: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let mut objects = self.objects.lock().unwrap();
        if path.ends_with("/events") || path.contains("/events/") {
            let reason = body["reason"].as_str().unwrap_or_default().to_string();
            self.log.lock().unwrap().push(format!("event {reason}"));
            return (201, body);
        }
        let (target, status) = match path.strip_suffix("/status") {
            Some(t) => (t.to_string(), true),
            None => (path.to_string(), false),
        };
        match method {
            "GET" => match objects.get(&target) {
                Some(o) => (200, o.clone()),
                None => (404, not_found()),
            },
            "PATCH" => {
                let mut o = objects.get(&target).cloned().unwrap_or(Value::Null);
                if status {
                    o["status"] = body["status"].clone();
                } else if kind == "merge" {
                    merge(&mut o, &body);
                } else {
                    let before = o.clone();
                    o = body;
                    if target == DEPLOYMENT {
                        // The generation moves when the spec does, as on a real server.
                        let g = before["metadata"]["generation"].as_i64().unwrap_or(0);
                        let g = if before["spec"] == o["spec"] {
                            g
                        } else {
                            g + 1
                        };
                        let n = o["spec"]["replicas"].as_i64().unwrap_or(1);
                        let up = match self.workers_starting.load(Ordering::SeqCst) {
                            true => 0,
                            false => n,
                        };
                        o["status"] = json!({"observedGeneration": g, "replicas": n,
                            "updatedReplicas": n, "readyReplicas": up, "availableReplicas": up});
                        o["metadata"]["generation"] = json!(g);
                        let uid = before["metadata"]["uid"].clone();
                        o["metadata"]["uid"] = match uid {
                            Value::Null => json!("5e1f0c3a-0000-4000-8000-00000000d001"),
                            uid => uid,
                        };
                    }
                }
                if !dry_run {
                    objects.insert(target, o.clone());
                }
                (200, o)
            }
            "DELETE" => match objects.remove(&target) {
                Some(o) => (200, o),
                None => (404, not_found()),
            },
            _ => (405, not_found()),
        }
    }
}

fn not_found() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
           "message": "not found", "reason": "NotFound", "code": 404})
}

fn merge(a: &mut Value, b: &Value) {
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                if v.is_null() {
                    a.remove(k);
                } else {
                    merge(a.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (a, b) => *a = b.clone(),
    }
}

/// A client whose every request the in-memory API server answers.
fn client(server: Arc<ApiServer>) -> kube::Client {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    tokio::spawn(async move {
        let mut handle = pin!(handle);
        while let Some((req, send)) = handle.next_request().await {
            let method = req.method().to_string();
            let path = req.uri().path().to_string();
            let dry_run = req.uri().query().is_some_and(|q| q.contains("dryRun"));
            let kind = match req
                .headers()
                .get("content-type")
                .map(|v| v.to_str().unwrap_or(""))
            {
                Some(t) if t.contains("apply-patch") => "apply",
                Some(t) if t.contains("merge-patch") => "merge",
                Some(t) if t.contains("json-patch") => "json",
                _ => "",
            };
            let accept = req
                .headers()
                .get("accept")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            let body = req.into_body().collect_bytes().await.unwrap_or_default();
            if path.contains("/secrets") {
                // What the Secret requests ask for (full objects or metadata).
                let line = format!("{method} {path} accept={accept}");
                server.log.lock().unwrap().push(line);
            } else if !path.contains("/events") {
                let dry = if dry_run { " dry-run" } else { "" };
                let line = format!("{method} {path} {kind}{dry}");
                server.log.lock().unwrap().push(line.trim_end().to_string());
            }
            let (code, value) = server.answer(&method, &path, kind, dry_run, &body);
            let response = Response::builder()
                .status(code)
                .header("content-type", "application/json")
                .body(Body::from(serde_json::to_vec(&value).unwrap()))
                .unwrap();
            send.send_response(response);
        }
    });
    kube::Client::new(service, "demo")
}

struct Harness {
    api: Arc<ApiServer>,
    js: Arc<Fake>,
    ctx: Arc<Context>,
}

impl Harness {
    fn new(p: &OrderPipeline) -> Self {
        let api = Arc::new(ApiServer::default());
        api.objects
            .lock()
            .unwrap()
            .insert(PIPELINE.into(), serde_json::to_value(p).unwrap());
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = crate::metrics::Metrics::new(&mut registry);
        let js = Arc::new(Fake::default());
        let mut ctx = Context::new(
            client(api.clone()),
            metrics,
            "example.invalid/order-worker:test".into(),
            Duration::from_secs(30),
            "test".into(),
        );
        ctx.jetstream_override = Some(js.clone());
        // Every reconcile reads JetStream (the reuse has its own test).
        ctx.reuse_figures = Duration::ZERO;
        Self {
            api,
            js,
            ctx: Arc::new(ctx),
        }
    }

    async fn reconcile(&self, p: &OrderPipeline) -> Action {
        self.api.clear();
        self.js.requests.lock().unwrap().clear();
        apply(Arc::new(p.clone()), self.ctx.clone())
            .await
            .expect("reconcile")
    }

    fn status(&self) -> Value {
        self.api.objects.lock().unwrap()[PIPELINE]["status"].clone()
    }

    /// The status's Ready condition (`Null` while there is none).
    fn ready_condition(&self) -> Value {
        self.status()["conditions"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["type"] == "Ready"))
            .cloned()
            .unwrap_or_default()
    }

    fn ready(&self) -> (String, String) {
        let c = self.ready_condition();
        (
            c["status"].as_str().unwrap_or_default().into(),
            c["reason"].as_str().unwrap_or_default().into(),
        )
    }
}

fn sample() -> OrderPipeline {
    let mut p: OrderPipeline = serde_yaml::from_str(include_str!(
        "../../../manifests/samples/orderpipeline.yaml"
    ))
    .unwrap();
    p.metadata.namespace = Some("demo".into());
    p.metadata.uid = Some("9a1c4a34-0000-4000-8000-000000000001".into());
    p.metadata.generation = Some(1);
    p.metadata.finalizers = Some(vec![FINALIZER.into()]);
    p
}

#[tokio::test]
async fn a_new_pipeline_gets_its_objects_its_deployment_and_one_status_write() {
    let p = sample();
    let h = Harness::new(&p);
    h.reconcile(&p).await;
    assert_eq!(
        h.js.writes(),
        [
            "create stream ORDERS",
            "create stream ORDERS_DLQ",
            "put consumer ORDERS/order-workers"
        ]
    );
    assert!(
        !h.js.streams.lock().unwrap().contains_key("KV_ORDERS_STATE"),
        "v2 keeps outcomes in the stream: no bucket of the protocol before v2"
    );
    assert_eq!(
        h.api.requests(),
        [
            format!("GET {PIPELINE}/status"),
            format!("GET {DEPLOYMENT}"),
            format!("PATCH {PDB} apply"),
            format!("PATCH {DEPLOYMENT} apply"),
            format!("PATCH {PIPELINE}/status apply"),
        ]
    );
    assert_eq!(
        h.api.event_reasons(),
        ["JetStreamCreated", "DeploymentCreated"],
        "one Event for the JetStream objects, one for the Deployment"
    );
    assert_eq!(h.ready(), ("True".into(), "PipelineReady".into()));
}

/// A new pipeline whose workers are starting: no status yet (the Events say
/// what was created); one write once they are available, saying Ready; and
/// one saying WorkersUnavailable once the first status has waited long enough.
#[tokio::test]
async fn a_new_pipeline_writes_its_first_status_once_its_workers_are_available() {
    let mut p = sample();
    let now = k8s_openapi::jiff::Timestamp::now();
    p.metadata.creation_timestamp = Some(Time(now));
    let h = Harness::new(&p);
    h.api.workers_starting.store(true, Ordering::SeqCst);
    let action = h.reconcile(&p).await;
    assert_eq!(h.api.count(&format!("PATCH {PIPELINE}/status")), 0);
    assert_eq!(h.status(), Value::Null, "no status while the workers start");
    assert_eq!(
        h.api.event_reasons(),
        ["JetStreamCreated", "DeploymentCreated"]
    );
    assert!(action != Action::await_change(), "{action:?}");
    // Still starting: still nothing written, no Event repeated.
    h.reconcile(&p).await;
    assert_eq!(h.api.count(&format!("PATCH {PIPELINE}/status")), 0);
    assert_eq!(h.api.event_reasons(), Vec::<String>::new());
    // Available: one write, Ready.
    h.api.objects.lock().unwrap().get_mut(DEPLOYMENT).unwrap()["status"]["availableReplicas"] =
        json!(2);
    h.reconcile(&p).await;
    assert_eq!(h.api.count(&format!("PATCH {PIPELINE}/status")), 1);
    assert_eq!(h.ready(), ("True".into(), "PipelineReady".into()));

    // Created longer ago than the wait: written at once, workers unavailable.
    let mut p = sample();
    let past =
        now - k8s_openapi::jiff::SignedDuration::try_from(status::FIRST_STATUS_WAIT).unwrap();
    p.metadata.creation_timestamp = Some(Time(past));
    let h = Harness::new(&p);
    h.api.workers_starting.store(true, Ordering::SeqCst);
    h.reconcile(&p).await;
    assert_eq!(h.api.count(&format!("PATCH {PIPELINE}/status")), 1);
    assert_eq!(h.ready(), ("False".into(), "WorkersUnavailable".into()));
}

#[tokio::test]
async fn nothing_changed_means_no_status_write_and_no_jetstream_write() {
    let p = sample();
    let h = Harness::new(&p);
    h.reconcile(&p).await;
    h.reconcile(&p).await;
    assert_eq!(
        h.api.requests(),
        [format!("GET {DEPLOYMENT}"),],
        "one read: the status is the one this process wrote, the live Deployment the one it applied (no dry run)"
    );
    assert!(h.js.writes().is_empty(), "{:?}", h.js.writes());
    // One read per JetStream object: the status figures reuse what the checks read.
    assert_eq!(
        *h.js.requests.lock().unwrap(),
        [
            "read stream ORDERS",
            "read stream ORDERS_DLQ",
            "read stream KV_ORDERS_STATE",
            "read consumer ORDERS/order-workers"
        ]
    );
    assert!(
        h.api.event_reasons().is_empty(),
        "{:?}",
        h.api.event_reasons()
    );
}

/// Credentials go to NATS only over TLS unless the operator allows clear text,
/// and a ServiceAccount token Secret never goes at all (issue 25, spec hardening).
#[tokio::test]
async fn credentials_go_to_nats_only_over_tls_and_never_a_service_account_token() {
    let mut p = sample();
    p.spec.nats.credentials_secret_ref = Some(crate::crd::SecretRef {
        name: "nats-auth".into(),
    });
    let with_secret = |type_: &str, allow: bool| {
        let mut h = Harness::new(&p);
        h.api.objects.lock().unwrap().insert(
            "/api/v1/namespaces/demo/secrets/nats-auth".into(),
            json!({"apiVersion": "v1", "kind": "Secret", "type": type_,
                "metadata": {"name": "nats-auth", "namespace": "demo"},
                "data": {"token": "dG9rZW4="}}),
        );
        Arc::get_mut(&mut h.ctx)
            .unwrap()
            .allow_plaintext_credentials = allow;
        h
    };
    let message = |h: &Harness| {
        h.ready_condition()["message"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    // Clear text, not allowed: refused before any connection.
    let h = with_secret("Opaque", false);
    h.reconcile(&p).await;
    assert_eq!(h.ready(), ("False".into(), "InvalidSpec".into()));
    let m = message(&h);
    assert!(
        m.contains("spec.nats.credentialsSecretRef (nats-auth)")
            && m.contains("tls://")
            && m.contains("--allow-plaintext-credentials"),
        "{m}"
    );
    assert!(h.js.requests.lock().unwrap().is_empty());
    // Allowed: it goes through.
    let h = with_secret("Opaque", true);
    h.reconcile(&p).await;
    assert_eq!(h.ready(), ("True".into(), "PipelineReady".into()));
    // A ServiceAccount token: refused even where clear text is allowed.
    let h = with_secret("kubernetes.io/service-account-token", true);
    h.reconcile(&p).await;
    assert_eq!(h.ready(), ("False".into(), "SecretInvalid".into()));
    assert!(
        message(&h).contains("ServiceAccount token"),
        "{}",
        message(&h)
    );
    assert!(h.js.requests.lock().unwrap().is_empty());
}

/// Reconciles right after a full pass (the worker Deployment's status moving)
/// reuse its JetStream reads; a removal advisory, a new spec or the end of the
/// window brings a full pass again.
#[tokio::test]
async fn reconciles_right_after_a_full_pass_reuse_its_jetstream_reads() {
    let mut p = sample();
    let mut h = Harness::new(&p);
    Arc::get_mut(&mut h.ctx).unwrap().reuse_figures = Duration::from_secs(3600);
    h.reconcile(&p).await;
    let status = h.status();
    assert!(!h.js.requests.lock().unwrap().is_empty());
    // The Deployment's status moved: nothing read, nothing written.
    h.reconcile(&p).await;
    assert_eq!(*h.js.requests.lock().unwrap(), Vec::<String>::new());
    assert_eq!(h.api.count(&format!("PATCH {PIPELINE}/status")), 0);
    assert_eq!(h.status(), status);
    // The stream removed (its advisory noted): read, and created again.
    h.js.streams.lock().unwrap().remove("ORDERS");
    h.ctx.removal_seen(&key_of(&p));
    h.reconcile(&p).await;
    assert!(
        h.js.writes().contains(&"create stream ORDERS".to_string()),
        "{:?}",
        h.js.writes()
    );
    h.reconcile(&p).await;
    assert_eq!(*h.js.requests.lock().unwrap(), Vec::<String>::new());
    // A new spec: a full pass.
    p.metadata.generation = Some(2);
    h.reconcile(&p).await;
    assert!(!h.js.requests.lock().unwrap().is_empty());
    // Past the window: a full pass.
    Arc::get_mut(&mut h.ctx).unwrap().reuse_figures = Duration::ZERO;
    h.reconcile(&p).await;
    assert!(!h.js.requests.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_pipeline_recreated_under_the_same_name_has_its_status_read_again() {
    let mut p = sample();
    let h = Harness::new(&p);
    h.reconcile(&p).await;
    p.metadata.uid = Some("9a1c4a34-0000-4000-8000-000000000002".into());
    h.api
        .objects
        .lock()
        .unwrap()
        .insert(PIPELINE.into(), serde_json::to_value(&p).unwrap());
    h.reconcile(&p).await;
    assert_eq!(
        h.api.requests().first(),
        Some(&format!("GET {PIPELINE}/status")),
        "{:?}",
        h.api.requests()
    );
}

#[tokio::test]
async fn a_deployment_changed_by_hand_is_dry_run_and_applied_back() {
    let p = sample();
    let h = Harness::new(&p);
    h.reconcile(&p).await;
    let applied = h.api.objects.lock().unwrap()[DEPLOYMENT].clone();
    // A hand edit of the template: the server moves the generation.
    {
        let mut objects = h.api.objects.lock().unwrap();
        let d = objects.get_mut(DEPLOYMENT).unwrap();
        d["spec"]["template"]["spec"]["containers"][0]["image"] = json!("example.invalid/other:1");
        let g = d["metadata"]["generation"].as_i64().unwrap();
        d["metadata"]["generation"] = json!(g + 1);
    }
    h.reconcile(&p).await;
    assert_eq!(
        h.api.requests(),
        [
            format!("GET {DEPLOYMENT}"),
            format!("PATCH {DEPLOYMENT} apply dry-run"),
            format!("PATCH {DEPLOYMENT} apply"),
        ]
    );
    let now = h.api.objects.lock().unwrap()[DEPLOYMENT].clone();
    assert_eq!(now["spec"], applied["spec"], "the template is back");
    // A label of ours changed by hand does not move the generation: found all
    // the same, and set back.
    let label = |h: &Harness| {
        h.api.objects.lock().unwrap()[DEPLOYMENT]["metadata"]["labels"]
            ["app.kubernetes.io/managed-by"]
            .clone()
    };
    let ours = label(&h);
    {
        let mut objects = h.api.objects.lock().unwrap();
        let d = objects.get_mut(DEPLOYMENT).unwrap();
        d["metadata"]["labels"]["app.kubernetes.io/managed-by"] = json!("someone");
    }
    h.reconcile(&p).await;
    assert!(
        h.api
            .requests()
            .contains(&format!("PATCH {DEPLOYMENT} apply")),
        "{:?}",
        h.api.requests()
    );
    assert_eq!(label(&h), ours);
    // A label or annotation someone else adds is theirs (an apply leaves it):
    // no dry run for it.
    {
        let mut objects = h.api.objects.lock().unwrap();
        let d = objects.get_mut(DEPLOYMENT).unwrap();
        d["metadata"]["annotations"]["deployment.kubernetes.io/revision"] = json!("2");
        d["metadata"]["labels"]["team"] = json!("someone");
    }
    // Then nothing changed: reads only.
    h.reconcile(&p).await;
    assert_eq!(h.api.requests(), [format!("GET {DEPLOYMENT}")]);
}

#[tokio::test]
async fn a_spec_change_updates_the_stream_and_writes_the_status_once() {
    let mut p = sample();
    let h = Harness::new(&p);
    h.reconcile(&p).await;
    p.spec.stream.max_age = "2h".into();
    p.metadata.generation = Some(2);
    h.reconcile(&p).await;
    assert_eq!(h.js.writes(), ["update stream ORDERS"]);
    assert_eq!(h.api.event_reasons(), ["StreamUpdated"]);
    assert_eq!(h.api.count(&format!("PATCH {PIPELINE}/status")), 1);
    assert_eq!(h.status()["appliedGeneration"], 2);
}

#[tokio::test]
async fn a_nats_outage_is_ready_false_and_touches_nothing_else() {
    let p = sample();
    let h = Harness::new(&p);
    h.reconcile(&p).await;
    h.js.outage.store(true, Ordering::SeqCst);
    let action = h.reconcile(&p).await;
    assert_eq!(h.ready(), ("False".into(), "NatsUnreachable".into()));
    assert_eq!(
        h.api.requests(),
        [format!("PATCH {PIPELINE}/status apply"),],
        "no Deployment request while NATS is away"
    );
    assert_eq!(h.api.event_reasons(), ["NatsUnreachable"]);
    assert!(h.js.writes().is_empty());
    assert!(
        format!("{action:?}").contains("requeue_after: Some"),
        "{action:?}"
    );
    // Back: Ready again, no second outage Event.
    h.js.outage.store(false, Ordering::SeqCst);
    h.reconcile(&p).await;
    assert_eq!(h.ready(), ("True".into(), "PipelineReady".into()));
}

/// A bucket that a pipeline upgraded from v1 still has (the operator never
/// creates one).
fn leave_v1_bucket(h: &Harness, ttl: Duration) {
    let cfg = async_nats::jetstream::stream::Config {
        name: "KV_ORDERS_STATE".into(),
        max_age: ttl,
        num_replicas: 1,
        ..Default::default()
    };
    h.js.streams.lock().unwrap().insert(
        cfg.name.clone(),
        StreamView {
            config: cfg,
            ..Default::default()
        },
    );
}

#[tokio::test]
async fn deletion_removes_the_objects_under_delete_and_keeps_them_under_retain() {
    for (policy, v1_bucket, writes, reason) in [
        (
            DeletionPolicy::Delete,
            false,
            vec!["delete stream ORDERS", "delete stream ORDERS_DLQ"],
            "Deleted",
        ),
        (
            DeletionPolicy::Delete,
            true,
            vec![
                "delete bucket ORDERS_STATE",
                "delete stream ORDERS",
                "delete stream ORDERS_DLQ",
            ],
            "Deleted",
        ),
        (DeletionPolicy::Retain, true, vec![], "Retained"),
    ] {
        let mut p = sample();
        p.spec.stream.deletion_policy = policy;
        let h = Harness::new(&p);
        h.reconcile(&p).await;
        if v1_bucket {
            leave_v1_bucket(&h, Duration::from_secs(7 * 86400));
        }
        h.api.clear();
        h.js.requests.lock().unwrap().clear();
        cleanup(Arc::new(p.clone()), h.ctx.clone())
            .await
            .expect("cleanup");
        assert_eq!(h.js.writes(), writes, "{policy:?}");
        assert_eq!(h.api.event_reasons(), [reason], "{policy:?}");
        if policy == DeletionPolicy::Delete {
            assert!(h.js.streams.lock().unwrap().is_empty());
        }
    }
}

#[tokio::test]
async fn a_bucket_left_by_v1_follows_the_spec_and_is_never_created() {
    let p = sample();
    let h = Harness::new(&p);
    leave_v1_bucket(&h, Duration::from_secs(3600));
    h.reconcile(&p).await;
    let writes = h.js.writes();
    assert!(
        writes.contains(&"put bucket ORDERS_STATE".to_string()),
        "{writes:?}"
    );
    assert!(!h.api.event_reasons().contains(&"BucketCreated".to_string()));
    let ttl = h.js.streams.lock().unwrap()["KV_ORDERS_STATE"]
        .config
        .max_age;
    assert_eq!(
        ttl,
        Duration::from_secs(7 * 86400),
        "the spec's TTL (the stream's maxAge)"
    );
    // Removed behind the operator's back: not created again.
    h.js.streams.lock().unwrap().remove("KV_ORDERS_STATE");
    h.js.requests.lock().unwrap().clear();
    h.reconcile(&p).await;
    assert!(h.js.writes().is_empty(), "{:?}", h.js.writes());
}

#[tokio::test]
async fn objects_deleted_behind_the_operators_back_come_back_with_drift_warnings() {
    let p = sample();
    let h = Harness::new(&p);
    h.reconcile(&p).await;
    // `nats stream rm ORDERS` takes its consumer with it.
    h.js.streams.lock().unwrap().remove("ORDERS");
    h.js.consumers.lock().unwrap().clear();
    h.reconcile(&p).await;
    assert_eq!(
        h.js.writes(),
        ["create stream ORDERS", "put consumer ORDERS/order-workers"]
    );
    assert_eq!(h.api.event_reasons(), ["DriftCorrected", "DriftCorrected"]);
}

#[tokio::test]
async fn a_consumer_lost_on_the_same_stream_resumes_after_the_ack_floor_last_read() {
    let p = sample();
    let h = Harness::new(&p);
    let key = ("ORDERS".to_string(), "order-workers".to_string());
    h.reconcile(&p).await;
    // Work done: 40 inputs acknowledged, the stream at 100; the status records it.
    h.js.streams
        .lock()
        .unwrap()
        .get_mut("ORDERS")
        .unwrap()
        .last_sequence = 100;
    let floor = super::jetstream_api::Cursor {
        delivered_stream_seq: 45,
        deliveries: 45,
        ack_floor_stream_seq: 40,
    };
    h.js.consumers.lock().unwrap().get_mut(&key).unwrap().cursor = floor;
    h.reconcile(&p).await;
    assert_eq!(h.status()["consumer"]["ackFloor"], 40);
    // The server loses the consumer (the stream stays).
    h.js.consumers.lock().unwrap().clear();
    h.reconcile(&p).await;
    assert_eq!(h.js.writes(), ["put consumer ORDERS/order-workers"]);
    let policy = h.js.consumers.lock().unwrap()[&key].config.deliver_policy;
    assert_eq!(
        policy,
        async_nats::jetstream::consumer::DeliverPolicy::ByStartSequence { start_sequence: 41 }
    );
    assert_eq!(h.api.event_reasons(), ["DriftCorrected"]);
}

#[tokio::test]
async fn the_workers_budget_is_applied_once_and_deleted_when_turned_off() {
    let mut p = sample();
    let h = Harness::new(&p);
    h.reconcile(&p).await;
    let budget = h.api.objects.lock().unwrap()[PDB].clone();
    assert_eq!(budget["spec"]["maxUnavailable"], 1);
    assert_eq!(budget["spec"]["unhealthyPodEvictionPolicy"], "AlwaysAllow");
    h.reconcile(&p).await;
    assert_eq!(
        h.api.count(&format!("PATCH {PDB}")),
        0,
        "unchanged: not applied again"
    );
    p.spec.workers.disruption_budget.enabled = false;
    p.metadata.generation = Some(2);
    h.reconcile(&p).await;
    assert_eq!(h.api.count(&format!("DELETE {PDB}")), 1);
    assert!(!h.api.objects.lock().unwrap().contains_key(PDB));
    h.reconcile(&p).await;
    assert_eq!(h.api.count(&format!("DELETE {PDB}")), 0, "deleted once");
}

/// The controller watches Secrets for changes only: it asks for their metadata
/// (`PartialObjectMetadata`), so no Secret's data is ever cached.
#[tokio::test]
async fn secrets_are_watched_as_metadata_only() {
    let p = sample();
    let h = Harness::new(&p);
    let controller = tokio::spawn(run(
        h.ctx.clone(),
        vec!["demo".into()],
        std::future::pending::<()>(),
    ));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let secrets = loop {
        let seen: Vec<String> = h
            .api
            .requests()
            .into_iter()
            .filter(|r| r.contains("/secrets"))
            .collect();
        if !seen.is_empty() {
            break seen;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the controller never listed Secrets: {:?}",
            h.api.requests()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    controller.abort();
    for r in &secrets {
        assert!(r.contains("as=PartialObjectMetadata"), "{r}");
    }
}
