//! The pod runner: test and demo support, not product. kwok Pods run nothing, so
//! this stands in for the kubelet for OrderPipeline worker Pods: one real
//! `order-worker` process per Running Pod, with that Pod's container args and
//! env (Secret, ConfigMap and field references resolved, `$(VAR)` expanded,
//! Secret volumes written to a private directory). It reflects the process's
//! `/readyz` into the Pod's Ready condition, and stops the process when the Pod
//! goes away (SIGTERM, the Pod's grace period, then SIGKILL).
//!
//! Two rewrites keep everything on loopback and let several "pods" share one
//! machine: `HTTP_ADDR` becomes `127.0.0.1:<free port>`, and mount paths of
//! Secret volumes point into the runner's directory. Nothing dials Pod IPs.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, Secret};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::watcher;
use kube::{Client, ResourceExt as _};
use tokio_util::sync::CancellationToken;

use crate::free_port;

/// Label selecting the Pods the runner runs.
pub const WORKER_SELECTOR: &str =
    "app.kubernetes.io/component=worker,app.kubernetes.io/managed-by=order-operator";

struct Running {
    child: tokio::process::Child,
    http_port: u16,
    grace: Duration,
    dir: PathBuf,
    ready: Option<bool>,
}

/// Configuration of a runner.
#[derive(Clone, Debug)]
pub struct RunnerConfig {
    /// Namespace to watch (`None`: all).
    pub namespace: Option<String>,
    /// The `order-worker` binary to run for each Pod.
    pub worker_binary: PathBuf,
    /// Another binary for the Pods whose image is this one (`(image, binary)`):
    /// the workers of another release, as its image would run them.
    pub image_binaries: Vec<(String, PathBuf)>,
    /// Where per-Pod files and logs go.
    pub work_dir: PathBuf,
}

impl RunnerConfig {
    /// The binary a Pod with `image` runs.
    fn binary_for(&self, image: Option<&str>) -> &PathBuf {
        self.image_binaries
            .iter()
            .find(|(i, _)| Some(i.as_str()) == image)
            .map_or(&self.worker_binary, |(_, b)| b)
    }
}

fn expand(value: &str, env: &BTreeMap<String, String>) -> String {
    // Kubernetes' $(VAR) expansion of earlier variables; $$ escapes.
    let mut out = String::new();
    let mut rest = value;
    while let Some(i) = rest.find("$(") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        match after.find(')') {
            Some(j) => {
                let name = &after[..j];
                match env.get(name) {
                    Some(v) => out.push_str(v),
                    None => out.push_str(&rest[i..i + 3 + j]),
                }
                rest = &after[j + 1..];
            }
            None => {
                out.push_str(&rest[i..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

/// Resolves a container's env the way the kubelet would.
async fn resolve_env(
    client: &Client,
    pod: &Pod,
    c: &Container,
) -> anyhow::Result<BTreeMap<String, String>> {
    let ns = pod.namespace().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let mut env = BTreeMap::new();
    for e in c.env.iter().flatten() {
        let value = if let Some(v) = &e.value {
            expand(v, &env)
        } else if let Some(src) = &e.value_from {
            if let Some(f) = &src.field_ref {
                match f.field_path.as_str() {
                    "metadata.name" => pod.name_any(),
                    "metadata.namespace" => ns.clone(),
                    "metadata.uid" => pod.uid().unwrap_or_default(),
                    "spec.nodeName" => pod
                        .spec
                        .as_ref()
                        .and_then(|s| s.node_name.clone())
                        .unwrap_or_default(),
                    other => {
                        anyhow::bail!("field reference {other} is not supported by the pod runner")
                    }
                }
            } else if let Some(k) = &src.secret_key_ref {
                let s = secrets
                    .get(&k.name)
                    .await
                    .with_context(|| format!("Secret {} for env {}", k.name, e.name))?;
                let v = s
                    .data
                    .as_ref()
                    .and_then(|d| d.get(&k.key))
                    .map(|b| String::from_utf8_lossy(&b.0).to_string());
                match v {
                    Some(v) => v,
                    None if k.optional == Some(true) => continue,
                    None => {
                        anyhow::bail!("Secret {} has no key {} (env {})", k.name, k.key, e.name)
                    }
                }
            } else if let Some(k) = &src.config_map_key_ref {
                let m = maps
                    .get(&k.name)
                    .await
                    .with_context(|| format!("ConfigMap {} for env {}", k.name, e.name))?;
                match m.data.as_ref().and_then(|d| d.get(&k.key)).cloned() {
                    Some(v) => v,
                    None if k.optional == Some(true) => continue,
                    None => {
                        anyhow::bail!("ConfigMap {} has no key {} (env {})", k.name, k.key, e.name)
                    }
                }
            } else {
                continue;
            }
        } else {
            String::new()
        };
        env.insert(e.name.clone(), value);
    }
    Ok(env)
}

/// Writes the Pod's Secret volumes into `dir` and returns mount path -> local path.
async fn write_volumes(
    client: &Client,
    pod: &Pod,
    c: &Container,
    dir: &Path,
) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let ns = pod.namespace().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let volumes = pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.clone())
        .unwrap_or_default();
    let mut out = Vec::new();
    for m in c.volume_mounts.iter().flatten() {
        let Some(v) = volumes.iter().find(|v| v.name == m.name) else {
            continue;
        };
        let Some(sv) = &v.secret else { continue };
        let name = sv.secret_name.clone().unwrap_or_default();
        let s = secrets
            .get(&name)
            .await
            .with_context(|| format!("Secret {name} for volume {}", v.name))?;
        let local = dir.join(&v.name);
        std::fs::create_dir_all(&local)?;
        for (k, b) in s.data.iter().flatten() {
            // Replaced whole, as the kubelet swaps a Secret volume's files.
            let tmp = local.join(format!(".{k}.new"));
            std::fs::write(&tmp, &b.0)?;
            std::fs::rename(&tmp, local.join(k))?;
        }
        out.push((m.mount_path.clone(), local));
    }
    Ok(out)
}

async fn start(client: &Client, cfg: &RunnerConfig, pod: &Pod) -> anyhow::Result<Running> {
    let spec = pod.spec.as_ref().context("pod without spec")?;
    let c = spec.containers.first().context("pod without containers")?;
    let dir = cfg.work_dir.join(format!(
        "{}_{}",
        pod.namespace().unwrap_or_default(),
        pod.name_any()
    ));
    std::fs::create_dir_all(&dir)?;
    let mut env = resolve_env(client, pod, c).await?;
    let mounts = write_volumes(client, pod, c, &dir).await?;
    for v in env.values_mut() {
        for (mount, local) in &mounts {
            if let Some(rest) = v.strip_prefix(mount.as_str()) {
                *v = format!("{}{rest}", local.display());
            }
        }
    }
    let http_port = free_port()?;
    env.insert("HTTP_ADDR".into(), format!("127.0.0.1:{http_port}"));
    let log = std::fs::File::create(dir.join("worker.log"))?;
    let binary = cfg.binary_for(c.image.as_deref());
    let mut cmd = tokio::process::Command::new(binary);
    cmd.env_clear()
        .envs(&env)
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .args(c.args.iter().flatten())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .kill_on_drop(true);
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let grace = Duration::from_secs(
        u64::try_from(spec.termination_grace_period_seconds.unwrap_or(30)).unwrap_or(30),
    );
    tracing::info!(pod = %pod.name_any(), pid = child.id(), http_port, "started worker");
    Ok(Running {
        child,
        http_port,
        grace,
        dir,
        ready: None,
    })
}

async fn stop(name: &str, mut r: Running) {
    if let Some(pid) = r.child.id() {
        let _ = tokio::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await;
    }
    if tokio::time::timeout(r.grace, r.child.wait()).await.is_err() {
        tracing::warn!(
            pod = name,
            "worker did not stop within the grace period; SIGKILL"
        );
        let _ = r.child.kill().await;
    }
    tracing::info!(pod = name, "stopped worker");
    let _ = r.dir;
}

async fn readyz(port: u16) -> bool {
    let addr = format!("127.0.0.1:{port}");
    let Ok(Ok(mut s)) = tokio::time::timeout(
        Duration::from_secs(1),
        tokio::net::TcpStream::connect(&addr),
    )
    .await
    else {
        return false;
    };
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    if s.write_all(format!("GET /readyz HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .is_err()
    {
        return false;
    }
    let mut buf = vec![0u8; 64];
    matches!(tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await, Ok(Ok(n)) if n >= 12 && &buf[9..12] == b"200")
}

async fn set_ready(
    client: &Client,
    ns: &str,
    name: &str,
    ready: bool,
    reason: &str,
) -> anyhow::Result<()> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let pod = pods.get_status(name).await?;
    let mut status = pod.status.unwrap_or_default();
    let now =
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now());
    let mut conds = status.conditions.take().unwrap_or_default();
    for t in ["Ready", "ContainersReady"] {
        let s = if ready { "True" } else { "False" };
        match conds.iter_mut().find(|c| c.type_ == t) {
            Some(c) if c.status == s => {}
            Some(c) => {
                c.status = s.into();
                c.reason = (!ready).then(|| reason.to_string());
                c.last_transition_time = Some(now.clone());
            }
            None => conds.push(k8s_openapi::api::core::v1::PodCondition {
                type_: t.into(),
                status: s.into(),
                reason: (!ready).then(|| reason.to_string()),
                last_transition_time: Some(now.clone()),
                ..Default::default()
            }),
        }
    }
    let mut cs = status.container_statuses.take().unwrap_or_default();
    for c in &mut cs {
        c.ready = ready;
    }
    let patch = serde_json::json!({"status": {"conditions": conds, "containerStatuses": cs}});
    pods.patch_status(name, &PatchParams::default(), &Patch::Strategic(&patch))
        .await?;
    Ok(())
}

fn runnable(p: &Pod) -> bool {
    p.metadata.deletion_timestamp.is_none()
        && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
        && p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some()
}

/// A Pod's `(namespace, name)`.
type PodKey = (String, String);

/// The worker Pods as the watch last saw them.
type PodStore = std::sync::Arc<tokio::sync::Mutex<HashMap<PodKey, Pod>>>;

fn pod_key(p: &Pod) -> PodKey {
    (p.namespace().unwrap_or_default(), p.name_any())
}

/// Mirrors the worker Pods into `store` until `stop` fires or the watch ends.
async fn mirror_pods(pods: Api<Pod>, store: PodStore, stop: CancellationToken) {
    let mut events = watcher(pods, watcher::Config::default().labels(WORKER_SELECTOR)).boxed();
    loop {
        let ev = tokio::select! {
            e = events.next() => e,
            _ = stop.cancelled() => break,
        };
        let Some(ev) = ev else { break };
        let mut m = store.lock().await;
        match ev {
            Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) => {
                m.insert(pod_key(&p), p);
            }
            Ok(watcher::Event::Delete(p)) => {
                m.remove(&pod_key(&p));
            }
            Ok(watcher::Event::Init) => m.clear(),
            Ok(watcher::Event::InitDone) => {}
            Err(e) => tracing::warn!(error = %e, "pod watch error"),
        }
    }
}

/// The Pods in `store` that should have a worker process.
async fn wanted_pods(store: &PodStore) -> HashMap<PodKey, Pod> {
    let pods: Vec<Pod> = store.lock().await.values().cloned().collect();
    pods.into_iter()
        .filter(runnable)
        .map(|p| (pod_key(&p), p))
        .collect()
}

/// The worker processes the runner started, and the Pods it could not start one for.
struct Runner {
    client: Client,
    cfg: RunnerConfig,
    running: HashMap<PodKey, Running>,
    /// The last start error per Pod, so each distinct error is reported once.
    failed: HashMap<PodKey, String>,
}

impl Runner {
    fn new(client: Client, cfg: RunnerConfig) -> Self {
        Self {
            client,
            cfg,
            running: HashMap::new(),
            failed: HashMap::new(),
        }
    }

    /// Writes the running Pods' Secret volumes again, as the kubelet updates
    /// them when a Secret changes (a renewed minted identity).
    async fn refresh_volumes(&self, wanted: &HashMap<PodKey, Pod>) {
        for (k, r) in &self.running {
            let Some(p) = wanted.get(k) else { continue };
            let Some(c) = p.spec.as_ref().and_then(|s| s.containers.first()) else {
                continue;
            };
            if let Err(e) = write_volumes(&self.client, p, c, &r.dir).await {
                tracing::warn!(pod = %k.1, error = %e, "refreshing Secret volumes");
            }
        }
    }

    /// Stop workers whose Pod is gone or terminating.
    fn stop_gone(&mut self, wanted: &HashMap<PodKey, Pod>) {
        let gone: Vec<_> = self
            .running
            .keys()
            .filter(|k| !wanted.contains_key(*k))
            .cloned()
            .collect();
        for k in gone {
            if let Some(r) = self.running.remove(&k) {
                tokio::spawn(async move { stop(&k.1, r).await });
            }
        }
    }

    /// Start workers for new Pods.
    async fn start_new(&mut self, wanted: &HashMap<PodKey, Pod>) {
        for (k, p) in wanted {
            if self.running.contains_key(k) {
                continue;
            }
            match start(&self.client, &self.cfg, p).await {
                Ok(r) => {
                    self.failed.remove(k);
                    self.running.insert(k.clone(), r);
                }
                Err(e) => self.report_start_failure(k, e).await,
            }
        }
    }

    /// Logs a start error and marks the Pod not ready, once per distinct error.
    async fn report_start_failure(&mut self, k: &PodKey, e: anyhow::Error) {
        let msg = format!("{e:#}");
        if self.failed.get(k) != Some(&msg) {
            tracing::warn!(pod = %k.1, error = %msg, "cannot start worker");
            let _ = set_ready(&self.client, &k.0, &k.1, false, "PodRunnerCannotStart").await;
            self.failed.insert(k.clone(), msg);
        }
    }

    /// Reflect readiness; restart exited processes (like the kubelet would).
    async fn reflect_readiness(&mut self, wanted: &HashMap<PodKey, Pod>) {
        for (k, r) in self.running.iter_mut() {
            if let Ok(Some(status)) = r.child.try_wait() {
                tracing::warn!(pod = %k.1, %status, "worker exited; it will be restarted");
                let _ = set_ready(&self.client, &k.0, &k.1, false, "WorkerExited").await;
                r.ready = Some(false);
                if let Some(p) = wanted.get(k)
                    && let Ok(new) = start(&self.client, &self.cfg, p).await
                {
                    *r = new;
                }
                continue;
            }
            let ready = readyz(r.http_port).await;
            if r.ready != Some(ready) {
                match set_ready(&self.client, &k.0, &k.1, ready, "WorkerNotReady").await {
                    Ok(()) => r.ready = Some(ready),
                    Err(e) => {
                        tracing::debug!(pod = %k.1, error = %e, "cannot update pod readiness yet")
                    }
                }
            }
        }
    }

    /// Stops every worker at once and waits for them all.
    async fn stop_all(mut self) {
        let stops: Vec<_> = self
            .running
            .drain()
            .map(|(k, r)| tokio::spawn(async move { stop(&k.1, r).await }))
            .collect();
        for s in stops {
            let _ = s.await;
        }
    }
}

/// Runs until `shutdown` fires; then stops every worker it started.
pub async fn run(
    client: Client,
    cfg: RunnerConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let pods: Api<Pod> = match &cfg.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let store = PodStore::default();
    let watch = tokio::spawn(mirror_pods(pods, store.clone(), shutdown.clone()));
    let mut runner = Runner::new(client, cfg);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut ticks = 0u64;
    while !shutdown.is_cancelled() {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => break,
        }
        let wanted = wanted_pods(&store).await;
        runner.stop_gone(&wanted);
        runner.start_new(&wanted).await;
        runner.reflect_readiness(&wanted).await;
        ticks += 1;
        if ticks.is_multiple_of(4) {
            runner.refresh_volumes(&wanted).await;
        }
    }
    watch.abort();
    runner.stop_all().await;
    Ok(())
}

/// Real workers for the worker Pods of `namespace` (those of an image in
/// `image_binaries` run its binary, the others this workspace's
/// `order-worker`), until the guard drops.
pub fn for_namespace(
    client: &Client,
    namespace: &str,
    image_binaries: Vec<(String, PathBuf)>,
) -> anyhow::Result<tokio_util::sync::DropGuard> {
    let stop = CancellationToken::new();
    let cfg = RunnerConfig {
        namespace: Some(namespace.to_string()),
        worker_binary: crate::pipeline::binary("order-worker")?,
        image_binaries,
        work_dir: std::env::temp_dir().join(format!("podrunner-{namespace}")),
    };
    tokio::spawn(run(client.clone(), cfg, stop.clone()));
    Ok(stop.drop_guard())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_earlier_variables_like_the_kubelet() {
        let env = BTreeMap::from([("POD_NAME".to_string(), "w-1".to_string())]);
        assert_eq!(
            expand("k8s.pod.name=$(POD_NAME),x=1", &env),
            "k8s.pod.name=w-1,x=1"
        );
        assert_eq!(expand("$(UNKNOWN)", &env), "$(UNKNOWN)");
        assert_eq!(expand("plain", &env), "plain");
    }
}
