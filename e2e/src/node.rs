//! Helpers for the tests on the real node (`hack/env up --real-node`): the
//! project's image in the node's containerd, the operator installed from
//! `manifests/` as a user installs it, and the containers' processes as the host
//! sees them (to kill or freeze one the way a crash or a hang would).

use std::time::Duration;

use anyhow::{Context as _, bail};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::{Api, Client};
use tokio::sync::OnceCell;

use crate::operator::{OPERATOR_NAMESPACE, kubectl, repo_root};
use crate::{env_var, wait_for};

/// The image `hack/image` builds and `hack/install` names.
pub const IMAGE: &str = "orderpipeline.local/orderpipeline:dev";
pub const OPERATOR_LABEL: &str = "app.kubernetes.io/name=order-operator";

/// NATS and the OTLP receiver as the node's Pods reach them.
pub fn node_nats_url() -> anyhow::Result<String> {
    env_var("ORDERPIPE_NODE_NATS_URL")
}

static INSTALLED: OnceCell<()> = OnceCell::const_new();

/// The image imported into the node's containerd, then `kubectl apply
/// --server-side -k hack/install` (manifests/ with the local image), both
/// operator Pods Ready and one holding the Lease. Once per test binary.
pub async fn install_operator(client: &Client) -> anyhow::Result<()> {
    INSTALLED
        .get_or_try_init(|| async {
            install_image().await?;
            let install = repo_root().join("hack/install");
            kubectl(&[
                "apply",
                "--server-side",
                "--force-conflicts",
                "-k",
                &install.to_string_lossy(),
            ])
            .await?;
            kubectl(&[
                "-n",
                OPERATOR_NAMESPACE,
                "rollout",
                "status",
                "deployment/order-operator",
                "--timeout=180s",
            ])
            .await?;
            let holder = wait_for(
                "an operator Pod holding the Lease",
                Duration::from_secs(120),
                || lease_holder(client),
            )
            .await?;
            eprintln!("real node: operator installed from manifests/; Lease held by {holder}");
            anyhow::Ok(())
        })
        .await?;
    Ok(())
}

/// The image's OCI archive (`ORDERPIPE_IMAGE_ARCHIVE`, else built by `hack/image`)
/// imported into the node's containerd.
pub async fn install_image() -> anyhow::Result<()> {
    let archive = match std::env::var("ORDERPIPE_IMAGE_ARCHIVE") {
        Ok(a) => a,
        Err(_) => {
            let out = tokio::process::Command::new(repo_root().join("hack/image"))
                .output()
                .await
                .context("running hack/image")?;
            if !out.status.success() {
                bail!(
                    "hack/image failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        }
    };
    ctr(&["images", "import", &archive]).await?;
    Ok(())
}

async fn ctr(args: &[&str]) -> anyhow::Result<String> {
    let address = env_var("CONTAINERD_ADDRESS")?;
    let mut all = vec!["--address", address.as_str(), "-n", "k8s.io"];
    all.extend_from_slice(args);
    crate::run_tool_async("ctr", &all).await
}

/// The holder of the operator's Lease, once there is one.
pub async fn lease_holder(client: &Client) -> anyhow::Result<Option<String>> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), OPERATOR_NAMESPACE);
    Ok(leases
        .get_opt("order-operator")
        .await?
        .and_then(|l| l.spec?.holder_identity)
        .filter(|h| !h.is_empty()))
}

/// The Pods matching `selector` in `ns`.
pub async fn pods(client: &Client, ns: &str, selector: &str) -> anyhow::Result<Vec<Pod>> {
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    Ok(api
        .list(&ListParams::default().labels(selector))
        .await?
        .items)
}

pub fn name_of(p: &Pod) -> String {
    p.metadata.name.clone().unwrap_or_default()
}

/// Whether the Pod is Ready (its readiness probe, as the kubelet ran it) and not
/// being deleted.
pub fn is_ready(p: &Pod) -> bool {
    p.metadata.deletion_timestamp.is_none()
        && p.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The restart count of the Pod's first container.
pub fn restarts(p: &Pod) -> i32 {
    p.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.first())
        .map(|c| c.restart_count)
        .unwrap_or(0)
}

/// The host pid of the Pod's first (running) container: what a crash or a hang
/// is done to.
pub async fn container_pid(p: &Pod) -> anyhow::Result<u32> {
    let id = p
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.first())
        .and_then(|c| c.container_id.clone())
        .with_context(|| format!("pod {} has no running container", name_of(p)))?;
    let id = id.trim_start_matches("containerd://");
    let tasks = ctr(&["tasks", "ls"]).await?;
    for line in tasks.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() >= 3 && f[0] == id && f[2] == "RUNNING" {
            return f[1].parse().context("ctr tasks ls: pid");
        }
    }
    bail!("container {id} of pod {} is not running", name_of(p))
}

/// One field of `/proc/<pid>/status` (e.g. `Uid`).
pub fn proc_status(pid: u32, field: &str) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(|v| v.trim().to_string())
        .with_context(|| format!("/proc/{pid}/status has no {field}"))
}

/// The mount options of the process's root filesystem (e.g. `ro,relatime`).
pub fn root_mount_options(pid: u32) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))?;
    text.lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f.get(4) == Some(&"/")).then(|| f.get(5).map(|s| s.to_string()))?
        })
        .with_context(|| format!("/proc/{pid}/mountinfo has no / mount"))
}
