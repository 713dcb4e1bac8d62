//! Helpers for operator tests: the operator as a real process, run with the
//! identity of its ServiceAccount (impersonated) so the manifests' RBAC is what
//! is tested, and the CRD and RBAC applied from the repository.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;

use crate::pipeline::binary;
use crate::{env_var, free_port, random_suffix};

pub const OPERATOR_NAMESPACE: &str = "orderpipeline-system";
pub const OPERATOR_SA: &str = "system:serviceaccount:orderpipeline-system:order-operator";

pub fn repo_root() -> PathBuf {
    // At run time (cargo sets it for tests): a shared target dir may hold a binary
    // compiled from another clone, whose compile-time path no longer exists.
    let dir =
        std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").into());
    PathBuf::from(dir).join("..")
}

/// `manifests/samples/orderpipeline.yaml` as pipeline `name` on NATS `nats_url`,
/// on its own stream `stream` (subjects `<stream>.*`, filter `<stream>.created`),
/// every other name derived from it, no trace export.
pub fn sample_on_stream(
    nats_url: &str,
    name: &str,
    stream: &str,
) -> anyhow::Result<order_operator::crd::OrderPipeline> {
    let text = std::fs::read_to_string(repo_root().join("manifests/samples/orderpipeline.yaml"))?;
    let mut p: order_operator::crd::OrderPipeline = serde_yaml::from_str(&text)?;
    p.metadata.name = Some(name.into());
    p.spec.nats.url = nats_url.to_string();
    p.spec.telemetry.otlp_endpoint = None;
    p.spec.on_own_stream(stream);
    Ok(p)
}

/// Runs kubectl with the environment's KUBECONFIG; its stderr in the error.
pub async fn kubectl(args: &[&str]) -> anyhow::Result<String> {
    crate::run_tool_async("kubectl", args).await
}

/// The namespace's Events, one `type reason: note` line each (events.k8s.io
/// `note`, else core `message`).
pub async fn event_lines(ns: &str) -> anyhow::Result<String> {
    kubectl(&[
        "-n",
        ns,
        "get",
        "events",
        "-o",
        "jsonpath={range .items[*]}{.type} {.reason}: {.note}{.message}{\"\\n\"}{end}",
    ])
    .await
}

/// Applies the CRD, the operator's namespace and its RBAC from `crds/` and
/// `manifests/` (idempotent; server-side apply), and waits for the CRD.
pub async fn install_crd_and_rbac() -> anyhow::Result<()> {
    let root = repo_root();
    let crd = root.join("crds/orderpipeline.dev_orderpipelines.yaml");
    kubectl(&[
        "apply",
        "--server-side",
        "--force-conflicts",
        "-f",
        &crd.to_string_lossy(),
    ])
    .await?;
    kubectl(&[
        "apply",
        "--server-side",
        "--force-conflicts",
        "-f",
        &root.join("manifests/namespace.yaml").to_string_lossy(),
    ])
    .await?;
    kubectl(&[
        "apply",
        "--server-side",
        "--force-conflicts",
        "-n",
        OPERATOR_NAMESPACE,
        "-f",
        &root.join("manifests/rbac.yaml").to_string_lossy(),
    ])
    .await?;
    // The admission policies that narrow the cluster-wide rights to the
    // operator's own objects (cluster-scoped: no namespace).
    kubectl(&[
        "apply",
        "--server-side",
        "--force-conflicts",
        "-f",
        &root
            .join("manifests/admission-policy.yaml")
            .to_string_lossy(),
    ])
    .await?;
    kubectl(&[
        "wait",
        "--for",
        "condition=established",
        "--timeout=60s",
        "crd/orderpipelines.orderpipeline.dev",
    ])
    .await?;
    Ok(())
}

/// A kubeconfig that acts as the operator's ServiceAccount (the admin certificate
/// impersonating it), written next to the environment's.
pub fn service_account_kubeconfig() -> anyhow::Result<PathBuf> {
    kubeconfig_as(OPERATOR_SA)
}

/// A kubeconfig that acts as `user` (the admin certificate impersonating it).
pub fn kubeconfig_as(user: &str) -> anyhow::Result<PathBuf> {
    let admin = env_var("KUBECONFIG")?;
    let text = std::fs::read_to_string(&admin)?;
    let mut out = String::new();
    for line in text.lines() {
        out.push_str(line);
        out.push('\n');
        if line.trim_start().starts_with("client-key:") {
            out.push_str(&format!("    as: {user}\n"));
        }
    }
    let path = std::env::temp_dir().join(format!("kubeconfig-operator-sa-{}", random_suffix()));
    std::fs::write(&path, out)?;
    Ok(path)
}

/// A real `order-operator run` process.
pub struct OperatorProcess {
    child: Option<tokio::process::Child>,
    pub http_port: u16,
    pub log: PathBuf,
    /// A kubeconfig this process made for itself (removed on drop).
    own_kubeconfig: Option<PathBuf>,
}

impl OperatorProcess {
    /// Runs the operator for `namespace` as its ServiceAccount.
    pub async fn spawn(namespace: &str, resync: &str) -> anyhow::Result<Self> {
        Self::spawn_env(namespace, resync, &[]).await
    }

    /// [`Self::spawn`] with more environment variables (flags).
    pub async fn spawn_env(
        namespace: &str,
        resync: &str,
        env: &[(&str, String)],
    ) -> anyhow::Result<Self> {
        let kubeconfig = service_account_kubeconfig()?;
        let mut p =
            Self::spawn_full(namespace, resync, &kubeconfig, "order-operator-test", env).await?;
        p.own_kubeconfig = Some(kubeconfig);
        Ok(p)
    }

    /// Runs the operator for `namespace` (comma separated: several) as the
    /// user of `kubeconfig`, with more environment variables (flags).
    pub async fn spawn_as(
        namespace: &str,
        resync: &str,
        kubeconfig: &Path,
        env: &[(&str, String)],
    ) -> anyhow::Result<Self> {
        Self::spawn_full(namespace, resync, kubeconfig, "order-operator-test", env).await
    }

    pub async fn spawn_with(
        namespace: &str,
        resync: &str,
        kubeconfig: &Path,
    ) -> anyhow::Result<Self> {
        Self::spawn_named(namespace, resync, kubeconfig, "order-operator-test").await
    }

    /// Runs a replica named `pod` (its Lease identity and Event instance).
    pub async fn spawn_named(
        namespace: &str,
        resync: &str,
        kubeconfig: &Path,
        pod: &str,
    ) -> anyhow::Result<Self> {
        Self::spawn_full(namespace, resync, kubeconfig, pod, &[]).await
    }

    async fn spawn_full(
        namespace: &str,
        resync: &str,
        kubeconfig: &Path,
        pod: &str,
        env: &[(&str, String)],
    ) -> anyhow::Result<Self> {
        let bin = binary("order-operator")?;
        Self::spawn_binary(&bin, namespace, resync, kubeconfig, pod, env).await
    }

    /// [`Self::spawn_as`] with another `order-operator` binary (another
    /// release's) and Pod name.
    pub async fn spawn_binary(
        bin: &Path,
        namespace: &str,
        resync: &str,
        kubeconfig: &Path,
        pod: &str,
        env: &[(&str, String)],
    ) -> anyhow::Result<Self> {
        let http_port = free_port()?;
        let log = std::env::temp_dir().join(format!("order-operator-{}.log", random_suffix()));
        let file = std::fs::File::create(&log)?;
        let child = tokio::process::Command::new(bin)
            .args(["run", "--namespace", namespace, "--resync-interval", resync])
            .env("KUBECONFIG", kubeconfig)
            .env("HTTP_ADDR", format!("127.0.0.1:{http_port}"))
            .env("WORKER_IMAGE", "example.invalid/order-worker:test")
            .env("POD_NAME", pod)
            .env("LEASE_DURATION", "3s")
            // The test NATS servers listen without TLS on loopback.
            .env("ALLOW_PLAINTEXT_CREDENTIALS", "true")
            .env("RUST_LOG", "info,kube=warn,async_nats=warn")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(std::process::Stdio::null())
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .context("starting order-operator")?;
        Ok(Self {
            child: Some(child),
            http_port,
            log,
            own_kubeconfig: None,
        })
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL, as a crash.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill().await?;
        }
        Ok(())
    }

    /// Waits for the process to exit on its own; returns its exit code.
    pub async fn wait_exit(&mut self, within: Duration) -> anyhow::Result<Option<i32>> {
        let Some(c) = self.child.as_mut() else {
            return Ok(None);
        };
        let status = tokio::time::timeout(within, c.wait())
            .await
            .context("operator did not exit")??;
        self.child = None;
        Ok(status.code())
    }

    /// SIGTERM, without waiting for the exit.
    pub async fn terminate(&self) -> anyhow::Result<()> {
        if let Some(pid) = self.child.as_ref().and_then(tokio::process::Child::id) {
            tokio::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await?;
        }
        Ok(())
    }

    pub async fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.child.take() {
            if let Some(pid) = c.id() {
                tokio::process::Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status()
                    .await?;
            }
            tokio::time::timeout(Duration::from_secs(20), c.wait())
                .await
                .context("operator did not stop")??;
        }
        Ok(())
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.log);
        if let Some(k) = &self.own_kubeconfig {
            let _ = std::fs::remove_file(k);
        }
    }
}
