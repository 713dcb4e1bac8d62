//! `kubectl orderpipeline`, installed with krew from `plugins/orderpipeline.yaml`
//! and a local archive, against a real API server and a nats-server that wants a
//! password: everything comes from the `OrderPipeline` resource and its Secret, and
//! a user who may not read the Secret is refused with the fix.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::PostParams;
use order_operator::crd::OrderPipeline;
use orderpipeline_common::topology::Topology;
use orderpipeline_ctl::{self as ctl, PublishOptions};
use orderpipeline_e2e::operator::{install_crd_and_rbac, kubectl, repo_root};
use orderpipeline_e2e::pipeline::{WorkerProcess, binary};
use orderpipeline_e2e::{NatsServer, TestNamespace, env_var, kube_client, random_suffix, wait_for};

const USER: &str = "plugin";
const PASSWORD: &str = "s3cret-pw";
const API_TOKEN: &str = "tok-4b1d-report";

/// The files of a `report` archive (extracted with tar into `dir`), by their
/// path below the archive's top directory.
fn report_files(archive: &Path, dir: &Path) -> anyhow::Result<Vec<(String, String)>> {
    std::fs::create_dir_all(dir)?;
    let st = std::process::Command::new("tar")
        .args([
            "-xzf",
            &archive.to_string_lossy(),
            "-C",
            &dir.to_string_lossy(),
        ])
        .status()?;
    anyhow::ensure!(st.success(), "tar -xzf {} failed", archive.display());
    let top = std::fs::read_dir(dir)?
        .next()
        .context("an empty archive")??
        .path();
    let mut out = Vec::new();
    let mut todo = vec![top.clone()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d)? {
            let path = e?.path();
            if path.is_dir() {
                todo.push(path);
            } else {
                let name = path.strip_prefix(&top)?.to_string_lossy().to_string();
                out.push((name, std::fs::read_to_string(&path)?));
            }
        }
    }
    Ok(out)
}

/// The plugin installed by krew into a private KREW_ROOT, from the repository's
/// manifest with the sha256 of an archive made here from the built binary.
fn krew_install(root: &Path) -> anyhow::Result<PathBuf> {
    let stage = root.join("stage");
    std::fs::create_dir_all(&stage)?;
    std::fs::copy(
        binary("kubectl-orderpipeline")?,
        stage.join("kubectl-orderpipeline"),
    )?;
    let archive = root.join("kubectl-orderpipeline-linux-amd64.tar.gz");
    let st = std::process::Command::new("tar")
        .args([
            "-czf",
            &archive.to_string_lossy(),
            "-C",
            &stage.to_string_lossy(),
            "kubectl-orderpipeline",
        ])
        .status()?;
    anyhow::ensure!(st.success(), "tar failed");
    let sha = sha256_hex(&std::fs::read(&archive)?)?;
    let manifest = std::fs::read_to_string(repo_root().join("plugins/orderpipeline.yaml"))?;
    let (before, after) = manifest
        .split_once("sha256: ")
        .context("plugins/orderpipeline.yaml has no sha256")?;
    let rest = after.split_once('\n').map_or("", |(_, r)| r);
    let manifest = format!("{before}sha256: {sha}\n{rest}");
    let m = root.join("orderpipeline.yaml");
    std::fs::write(&m, manifest)?;
    let out = std::process::Command::new("kubectl")
        .args([
            "krew",
            "install",
            &format!("--manifest={}", m.display()),
            &format!("--archive={}", archive.display()),
        ])
        .env("KREW_ROOT", root.join("krew"))
        .env("KREW_NO_UPGRADE_CHECK", "1")
        .output()
        .context("kubectl krew (hack/build-tools builds kubectl-krew)")?;
    anyhow::ensure!(
        out.status.success(),
        "kubectl krew install: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(root.join("krew/bin"))
}

fn sha256_hex(data: &[u8]) -> anyhow::Result<String> {
    let mut c = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    use std::io::Write as _;
    c.stdin.take().context("stdin")?.write_all(data)?;
    let out = c.wait_with_output()?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string())
}

/// `kubectl orderpipeline ARGS` with the krew bin dir first on PATH and a
/// NATS_URL that would be wrong (the resource's URL must win).
fn plugin(
    bin: &Path,
    kubeconfig: &str,
    args: &[&str],
    extra_env: &[(&str, &str)],
) -> anyhow::Result<std::process::Output> {
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut c = std::process::Command::new("kubectl");
    c.arg("orderpipeline")
        .args(args)
        .env("PATH", path)
        .env("KUBECONFIG", kubeconfig)
        .env("NATS_URL", "nats://127.0.0.1:1")
        .env_remove("NATS_USER")
        .env_remove("NATS_PASSWORD");
    for (k, v) in extra_env {
        c.env(k, v);
    }
    Ok(c.output()?)
}

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_krew_installed_plugin_reads_everything_from_the_resource_and_refuses_without_secret_rights()
-> anyhow::Result<()> {
    install_crd_and_rbac().await?;
    let client = kube_client().await?;
    let ns = TestNamespace::create(&client, "plugin").await?;
    let nats = NatsServer::start_with_config(&format!(
        "authorization {{ user: \"{USER}\", password: \"{PASSWORD}\" }}"
    ))
    .await?;
    let nc = async_nats::ConnectOptions::with_user_and_password(USER.into(), PASSWORD.into())
        .connect(nats.url())
        .await?;
    let js = jetstream::new(nc);
    Topology::default().ensure(&js).await?;

    // 40 orders (some invalid) and 2 poison messages, through a real worker.
    let opts = PublishOptions {
        subject: "ORDER.created".into(),
        count: 40,
        rate: 0.0,
        invalid_ratio: 0.1,
        duplicate_ratio: 0.0,
        prefix: format!("pl{}", random_suffix()),
        window: 16,
        ack_timeout: Duration::from_secs(3),
        progress: false,
        poison: 2,
    };
    let published = ctl::publish_orders(&js, &opts).await?;
    let worker = WorkerProcess::spawn(
        &binary("order-worker")?,
        &[
            ("NATS_URL", nats.url()),
            ("NATS_USER", USER.into()),
            ("NATS_PASSWORD", PASSWORD.into()),
        ],
    )
    .await?;
    wait_for("the worker to drain", Duration::from_secs(60), || async {
        let c = js
            .get_stream("ORDERS")
            .await?
            .consumer_info("order-workers")
            .await?;
        Ok((c.num_pending == 0 && c.num_ack_pending == 0).then_some(()))
    })
    .await?;
    drop(worker);

    // The resource and its Secret; no operator needed for the plugin.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({
                "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "nats-credentials"},
                "stringData": {"user": USER, "password": PASSWORD}
            }))?,
        )
        .await?;
    let text_yaml =
        std::fs::read_to_string(repo_root().join("manifests/samples/orderpipeline.yaml"))?;
    let mut p: OrderPipeline = serde_yaml::from_str(&text_yaml)?;
    p.spec.nats.url = nats.url();
    p.spec.nats.credentials_secret_ref = Some(order_operator::crd::SecretRef {
        name: "nats-credentials".into(),
    });
    p.spec.workers.env = vec![k8s_openapi::api::core::v1::EnvVar {
        name: "PAYMENT_API_TOKEN".into(),
        value: Some(API_TOKEN.into()),
        value_from: None,
    }];
    Api::<OrderPipeline>::namespaced(client.clone(), &ns.name)
        .create(&PostParams::default(), &p)
        .await?;

    let root = std::env::temp_dir().join(format!("krew-{}", random_suffix()));
    let bin = krew_install(&root)?;
    let admin = env_var("KUBECONFIG")?;
    let n = ns.name.as_str();

    let out = plugin(&bin, &admin, &["status", "orders", "-n", n, "--json"], &[])?;
    assert!(out.status.success(), "status: {}", text(&out));
    let s: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(s["processed"], published.valid, "{s}");
    assert_eq!(s["rejected"], published.invalid, "{s}");
    assert_eq!(s["dead_letters"], 2, "{s}");

    let out = plugin(&bin, &admin, &["dlq", "list", "orders", "-n", n], &[])?;
    assert!(
        out.status.success() && text(&out).contains("2 dead letter(s)"),
        "dlq list: {}",
        text(&out)
    );
    let first: u64 = String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .context("no sequence in dlq list")?;
    let out = plugin(
        &bin,
        &admin,
        &["dlq", "show", "orders", &first.to_string(), "-n", n],
        &[],
    )?;
    assert!(
        out.status.success() && text(&out).contains("undecodable"),
        "dlq show: {}",
        text(&out)
    );

    // --nats-url replaces the resource's URL (here: one where nothing listens).
    let out = plugin(
        &bin,
        &admin,
        &[
            "status",
            "orders",
            "-n",
            n,
            "--nats-url",
            "nats://127.0.0.1:1",
        ],
        &[],
    )?;
    assert!(
        !out.status.success(),
        "--nats-url was ignored: {}",
        text(&out)
    );
    let out = plugin(
        &bin,
        &admin,
        &["status", "orders", "-n", n, "--nats-url", &nats.url()],
        &[],
    )?;
    assert!(
        out.status.success(),
        "--nats-url {}: {}",
        nats.url(),
        text(&out)
    );

    let out = plugin(&bin, &admin, &["audit", "orders", "-n", n], &[])?;
    assert!(out.status.success(), "audit: {}", text(&out));
    assert!(
        text(&out).contains("lost                   0"),
        "audit: {}",
        text(&out)
    );

    // Replay last: the letter goes back to the (now stopped) workers.
    let seq = first.to_string();
    let out = plugin(
        &bin,
        &admin,
        &["dlq", "replay", "orders", &seq, "-n", n],
        &[],
    )?;
    assert!(
        out.status.success() && text(&out).contains(&format!("replayed dead letter {first}")),
        "dlq replay: {}",
        text(&out)
    );
    // The support bundle: everything about the pipeline in one archive, no
    // Secret value in it (the Secret's password, a secret-named env value).
    let archive = root.join("report.tar.gz");
    let out = plugin(
        &bin,
        &admin,
        &[
            "report",
            "orders",
            "-n",
            n,
            "-o",
            &archive.to_string_lossy(),
        ],
        &[],
    )?;
    assert!(out.status.success(), "report: {}", text(&out));
    let files = report_files(&archive, &root.join("report"))?;
    let names: Vec<&str> = files.iter().map(|(f, _)| f.as_str()).collect();
    for want in [
        "summary.txt",
        "pipeline.v1alpha1.yaml",
        "events.txt",
        "nats/stream.json",
        "nats/consumer.json",
        "nats/dlq-stream.json",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    let file = |f: &str| {
        files
            .iter()
            .find(|(n, _)| n == f)
            .map_or("", |(_, t)| t.as_str())
    };
    assert!(file("pipeline.v1alpha1.yaml").contains("kind: OrderPipeline"));
    assert!(
        file("nats/stream.json").contains("\"ORDERS\""),
        "{}",
        file("nats/stream.json")
    );
    assert!(file("nats/consumer.json").contains("order-workers"));
    let summary = file("summary.txt");
    eprintln!("report: {}\n{summary}", text(&out).trim());
    assert!(
        summary.contains("no Deployment orders-workers"),
        "{summary}"
    );
    assert!(
        summary.contains(&format!("report orders -n {n}")),
        "only secret values are redacted, not the user name in other words: {summary}"
    );
    assert!(
        summary.contains("Secret nats-credentials: referenced"),
        "{summary}"
    );
    assert!(file("pipeline.v1alpha1.yaml").contains("PAYMENT_API_TOKEN"));
    for (f, t) in &files {
        for secret in [PASSWORD, API_TOKEN] {
            assert!(
                !t.contains(secret),
                "{f} holds a secret value ({secret}):\n{t}"
            );
        }
    }

    // A user who may read OrderPipelines but not Secrets.
    let user = format!("plugin-reader-{}", random_suffix());
    let role = format!(
        "apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata: {{name: pipeline-reader, namespace: {n}}}\nrules:\n- apiGroups: [orderpipeline.dev]\n  resources: [orderpipelines]\n  verbs: [get, list]\n---\napiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata: {{name: pipeline-reader, namespace: {n}}}\nroleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: pipeline-reader}}\nsubjects:\n- {{apiGroup: rbac.authorization.k8s.io, kind: User, name: {user}}}\n"
    );
    let role_file = root.join("role.yaml");
    std::fs::write(&role_file, role)?;
    kubectl(&["apply", "-f", &role_file.to_string_lossy()]).await?;
    let mut kc = String::new();
    for line in std::fs::read_to_string(&admin)?.lines() {
        kc.push_str(line);
        kc.push('\n');
        if line.trim_start().starts_with("client-key:") {
            kc.push_str(&format!("    as: {user}\n"));
        }
    }
    let reader = root.join("kubeconfig-reader");
    std::fs::write(&reader, kc)?;
    let reader = reader.to_string_lossy().to_string();
    let out = plugin(&bin, &reader, &["status", "orders", "-n", n], &[])?;
    let t = text(&out);
    assert!(
        !out.status.success(),
        "a user without Secret rights got: {t}"
    );
    assert!(
        t.contains(&format!("you may not read Secret {n}/nats-credentials"))
            && t.contains("spec.nats.credentialsSecretRef")
            && t.contains("kubectl auth can-i get secret/nats-credentials"),
        "{t}"
    );
    // ... and gets through with the credentials given by hand.
    let out = plugin(
        &bin,
        &reader,
        &["status", "orders", "-n", n],
        &[("NATS_USER", USER), ("NATS_PASSWORD", PASSWORD)],
    )?;
    assert!(
        out.status.success(),
        "with NATS_USER/NATS_PASSWORD: {}",
        text(&out)
    );

    let _ = std::fs::remove_dir_all(&root);
    ns.delete().await
}
