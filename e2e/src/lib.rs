//! Helpers for integration tests against the real local environment started by
//! `hack/env up` (or `make test`, which starts a private one and tears it down).
//!
//! The environment is found through the variables `hack/env env` prints:
//! `KUBECONFIG`, `NATS_URL`, `OTEL_EXPORTER_OTLP_ENDPOINT`, `JAEGER_QUERY_URL`,
//! and the tools on `PATH`. Every address is loopback.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{DeleteParams, PostParams};
use kube::{Api, Client};
use rand::RngExt as _;

/// A variable the environment must provide, with a message naming the fix.
pub fn env_var(name: &str) -> anyhow::Result<String> {
    std::env::var(name).with_context(|| {
        format!("{name} is not set: start the environment with `hack/env up` and `eval \"$(hack/env env)\"`, or run `make test`")
    })
}

/// A short random lowercase suffix for names that must not collide between tests.
pub fn random_suffix() -> String {
    let mut rng = rand::rng();
    (0..8)
        .map(|_| char::from(b'a' + rng.random_range(0..26u8)))
        .collect()
}

/// Polls `check` until it returns `Ok(Some(v))` or the deadline passes; the last
/// error or `what` is reported on timeout.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last: Option<anyhow::Error> = None;
    loop {
        match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = Some(e),
        }
        if tokio::time::Instant::now() >= deadline {
            match last {
                Some(e) => {
                    bail!("timed out after {timeout:?} waiting for {what}; last error: {e:#}")
                }
                None => bail!("timed out after {timeout:?} waiting for {what}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A Kubernetes client for the local environment.
pub async fn kube_client() -> anyhow::Result<Client> {
    env_var("KUBECONFIG")?;
    Client::try_default()
        .await
        .context("cannot build a Kubernetes client from KUBECONFIG")
}

/// A namespace with a random name: [`TestNamespace::delete`] deletes it and says
/// whether that worked; dropped without it (a test that failed or panicked half
/// way) it is deleted all the same, so failed runs leave nothing behind.
pub struct TestNamespace {
    pub name: String,
    client: Client,
    deleted: bool,
}

impl TestNamespace {
    pub async fn create(client: &Client, prefix: &str) -> anyhow::Result<Self> {
        let name = format!("{prefix}-{}", random_suffix());
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": {"orderpipeline.test/e2e": "true"}}
        }))?;
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .with_context(|| format!("creating namespace {name}"))?;
        Ok(Self {
            name,
            client: client.clone(),
            deleted: false,
        })
    }

    pub async fn delete(mut self) -> anyhow::Result<()> {
        self.deleted = true;
        delete_namespace(self.client.clone(), &self.name).await
    }
}

async fn delete_namespace(client: Client, name: &str) -> anyhow::Result<()> {
    match Api::<Namespace>::all(client)
        .delete(name, &DeleteParams::background())
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e).with_context(|| format!("deleting namespace {name}")),
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        if self.deleted {
            return;
        }
        // Drop cannot await, and the test's runtime may be unwinding: a thread
        // with its own runtime and its own client (a client is bound to the
        // runtime that made it).
        let name = self.name.clone();
        let done = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let client = Client::try_default().await?;
                delete_namespace(client, &name).await
            })
        })
        .join();
        match done {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("cleanup: namespace {}: {e:#}", self.name),
            Err(_) => eprintln!(
                "cleanup: namespace {}: the cleanup thread panicked",
                self.name
            ),
        }
    }
}

/// The directory holding the environment's built tools (nats-server, nats, ...).
pub fn tool(name: &str) -> anyhow::Result<PathBuf> {
    let path = env_var("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .with_context(|| {
            format!(
                "{name} is not on PATH: run `eval \"$(hack/env env)\"` (hack/build-tools builds it)"
            )
        })
}

/// Waits until stream `name` has `max_age` `want` (a spec change applied).
pub async fn wait_max_age(
    js: &async_nats::jetstream::Context,
    name: &str,
    want: Duration,
    within: Duration,
) -> anyhow::Result<()> {
    wait_for(
        &format!("stream {name} max_age {want:?}"),
        within,
        || async {
            let mut st = js.get_stream(name).await?;
            Ok((st.info().await?.config.max_age == want).then_some(()))
        },
    )
    .await
}

/// Runs `tool ARGS` and returns its stdout; a failure carries the command
/// line and its stderr.
pub async fn run_tool_async(tool: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = tokio::process::Command::new(tool)
        .args(args)
        .output()
        .await
        .with_context(|| format!("running {tool}"))?;
    anyhow::ensure!(
        out.status.success(),
        "{tool} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

/// Runs `tool ARGS` (blocking) and returns its stdout; a failure carries the
/// command line and everything it printed.
pub fn run_tool(tool: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = std::process::Command::new(tool)
        .args(args)
        .output()
        .with_context(|| {
            format!("running {tool} (hack/build-tools builds it; hack/env env puts it on PATH)")
        })?;
    anyhow::ensure!(
        out.status.success(),
        "{tool} {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A free loopback TCP port.
pub fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("binding a loopback port")?;
    Ok(l.local_addr()?.port())
}

/// A private nats-server with JetStream on file storage, on a random loopback
/// port, for tests that restart or break their server without touching others.
pub struct NatsServer {
    pub port: u16,
    pub store_dir: tempdir::TempDir,
    child: Option<tokio::process::Child>,
    /// Extra configuration (auth, TLS); `None` for a plain server.
    config: Option<String>,
    /// URL scheme and whether the readiness probe needs auth.
    probe_url: Option<String>,
}

pub mod tempdir {
    //! A tiny temporary directory, removed on drop.
    use std::path::{Path, PathBuf};

    pub struct TempDir(PathBuf);

    impl TempDir {
        pub fn new(prefix: &str) -> std::io::Result<Self> {
            let p = std::env::temp_dir().join(format!("{prefix}-{}", super::random_suffix()));
            std::fs::create_dir_all(&p)?;
            Ok(Self(p))
        }
        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl NatsServer {
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_retrying(|| {
            let store_dir = tempdir::TempDir::new("nats-test")?;
            Ok(Self {
                port: free_port()?,
                store_dir,
                child: None,
                config: None,
                probe_url: None,
            })
        })
        .await
    }

    /// A server with extra configuration (e.g. an `authorization` or `tls`
    /// block). Readiness is probed on the monitoring port.
    pub async fn start_with_config(extra: &str) -> anyhow::Result<Self> {
        Self::start_retrying(|| {
            let store_dir = tempdir::TempDir::new("nats-test")?;
            let port = free_port()?;
            let mon = free_port()?;
            let conf = format!(
                "listen: 127.0.0.1:{port}\nhttp: 127.0.0.1:{mon}\njetstream {{ store_dir: \"{}\" }}\n{extra}\n",
                store_dir.path().join("js").display()
            );
            Ok(Self {
                port,
                store_dir,
                child: None,
                config: Some(conf),
                probe_url: Some(format!(
                    "http://127.0.0.1:{mon}/healthz?js-enabled-only=true"
                )),
            })
        })
        .await
    }

    /// A free port is only free until someone binds it: tests in parallel can
    /// take the one just picked. On "address already in use", new ports.
    async fn start_retrying(
        mut make: impl FnMut() -> anyhow::Result<Self>,
    ) -> anyhow::Result<Self> {
        let mut attempt = 0;
        loop {
            let mut s = make()?;
            match s.spawn().await {
                Ok(()) => return Ok(s),
                Err(e) if attempt < 4 && format!("{e:#}").contains("address already in use") => {
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The monitoring endpoint (servers started with a config file).
    pub fn monitor_url(&self) -> Option<String> {
        self.probe_url
            .as_ref()
            .and_then(|u| u.split("/healthz").next())
            .map(str::to_string)
    }

    /// Sends SIGKILL (a crash: no flush) and waits for the exit.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().await?;
        }
        Ok(())
    }

    /// Starts a stopped or killed server again on the same port and store.
    pub async fn start_again(&mut self) -> anyhow::Result<()> {
        self.spawn().await
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let mut cmd = self.command()?;
        let log_path = self.store_dir.path().join("nats-server.log");
        let log = std::fs::File::create(&log_path)?;
        let child = cmd
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("starting nats-server")?;
        self.child = Some(child);
        let waited = match self.probe_url.clone() {
            Some(probe) => wait_healthy(probe, &log_path).await,
            None => wait_accepting(self.url(), &log_path).await,
        };
        self.ensure_running(waited, &log_path)
    }

    /// The nats-server command line: flags for a plain JetStream server, or the
    /// config file (written into the store directory).
    fn command(&self) -> anyhow::Result<tokio::process::Command> {
        let mut cmd = tokio::process::Command::new(tool("nats-server")?);
        match &self.config {
            None => {
                cmd.args([
                    "-a",
                    "127.0.0.1",
                    "-p",
                    &self.port.to_string(),
                    "-js",
                    "-sd",
                ])
                .arg(self.store_dir.path());
            }
            Some(conf) => {
                let path = self.store_dir.path().join("nats.conf");
                std::fs::write(&path, conf)?;
                cmd.arg("-c").arg(path);
            }
        }
        Ok(cmd)
    }

    /// Turns the wait's outcome into the start's, with the server's log on failure.
    fn ensure_running(
        &mut self,
        waited: anyhow::Result<()>,
        log_path: &Path,
    ) -> anyhow::Result<()> {
        // Healthy means: still running (a probe can reach another server that
        // holds the port this one failed to bind).
        let exited = match self.child.as_mut() {
            Some(c) => c.try_wait()?.is_some(),
            None => true,
        };
        if waited.is_err() || exited || died(log_path) {
            let log = std::fs::read_to_string(log_path).unwrap_or_default();
            return Err(waited
                .err()
                .unwrap_or_else(|| anyhow::anyhow!("nats-server exited")))
            .with_context(|| format!("nats-server log:\n{log}"));
        }
        Ok(())
    }

    /// Stops the server (SIGTERM, so JetStream flushes) and waits for it to exit.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            if let Some(pid) = child.id() {
                let _ = tokio::process::Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .stderr(std::process::Stdio::null())
                    .status()
                    .await;
            }
            tokio::time::timeout(Duration::from_secs(20), child.wait())
                .await
                .context("nats-server did not exit within 20s of SIGTERM")??;
        }
        Ok(())
    }

    /// Stops and starts the server on the same port and store directory.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop().await?;
        self.spawn().await
    }
}

/// A server that could not bind exits at once with [FTL]: stop waiting then.
fn died(log_path: &Path) -> bool {
    std::fs::read_to_string(log_path)
        .unwrap_or_default()
        .contains("[FTL]")
}

/// Waits until a configured server's monitoring `probe` answers (or it died).
async fn wait_healthy(probe: String, log_path: &Path) -> anyhow::Result<()> {
    wait_for(
        "nats-server (configured) to be healthy",
        Duration::from_secs(20),
        || {
            let (probe, log_path) = (probe.clone(), log_path.to_path_buf());
            async move {
                if died(&log_path) {
                    return Ok(Some(()));
                }
                let out = tokio::process::Command::new("curl")
                    .args(["-sf", "--max-time", "2", "--noproxy", "*", &probe])
                    .output()
                    .await?;
                Ok(out.status.success().then_some(()))
            }
        },
    )
    .await
}

/// Waits until a plain server at `url` accepts connections (or it died).
async fn wait_accepting(url: String, log_path: &Path) -> anyhow::Result<()> {
    wait_for(
        "nats-server to accept connections",
        Duration::from_secs(20),
        || {
            let (url, log_path) = (url.clone(), log_path.to_path_buf());
            async move {
                if died(&log_path) {
                    return Ok(Some(()));
                }
                Ok(async_nats::connect(&url).await.ok().map(|_| ()))
            }
        },
    )
    .await
}

pub mod natsauth;
pub mod node;
pub mod operator;
pub mod pipeline;
pub mod podrunner;
pub mod proxy;

/// A NATS cluster of `n` nodes on loopback ports (routes between all of them).
pub struct NatsCluster {
    pub nodes: Vec<NatsServer>,
}

impl NatsCluster {
    pub async fn start(n: usize) -> anyhow::Result<Self> {
        Ok(Self::start_partitionable(n, None).await?.0)
    }

    /// A cluster whose node `isolate` reaches the others only through loopback
    /// proxies (its inbound routes and its outbound ones), so cutting the returned
    /// proxies isolates it from the cluster while its clients stay connected.
    pub async fn start_partitionable(
        n: usize,
        isolate: Option<usize>,
    ) -> anyhow::Result<(Self, Vec<proxy::Proxy>)> {
        let routes: Vec<u16> = (0..n).map(|_| free_port()).collect::<Result<_, _>>()?;
        let mut proxies = Vec::new();
        // Route addresses as each node dials them, and what each node advertises.
        let mut dial: Vec<Vec<u16>> = vec![routes.clone(); n];
        let mut advertise: Vec<Option<u16>> = vec![None; n];
        if let Some(x) = isolate {
            // Others reach x through one proxy; x reaches each other node through its own.
            let inbound = proxy::Proxy::start(routes[x]).await?;
            for (i, d) in dial.iter_mut().enumerate() {
                if i != x {
                    d[x] = inbound.port;
                }
            }
            advertise[x] = Some(inbound.port);
            proxies.push(inbound);
            for i in (0..n).filter(|i| *i != x) {
                let out = proxy::Proxy::start(routes[i]).await?;
                dial[x][i] = out.port;
                proxies.push(out);
            }
        }
        let name = format!("test-{}", random_suffix());
        let mut nodes = Vec::new();
        for (i, p) in routes.iter().enumerate() {
            let route_list = dial[i]
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, p)| format!("nats-route://127.0.0.1:{p}"))
                .collect::<Vec<_>>()
                .join(", ");
            let adv = advertise[i]
                .map(|a| format!(", advertise: \"127.0.0.1:{a}\""))
                .unwrap_or_default();
            let extra = format!(
                "server_name: node-{i}\ncluster {{ name: {name}, listen: 127.0.0.1:{p}{adv}, routes: [{route_list}] }}\n"
            );
            nodes.push(NatsServer::start_with_config(&extra).await?);
        }
        let c = Self { nodes };
        let url = c.url();
        wait_for(
            "the cluster to elect a JetStream meta leader",
            Duration::from_secs(30),
            || {
                let url = url.clone();
                async move {
                    let client = NatsCluster::connect_urls(&url).await?;
                    let js = async_nats::jetstream::new(client);
                    Ok(js.query_account().await.ok().map(|_| ()))
                }
            },
        )
        .await?;
        Ok((c, proxies))
    }

    /// Connects to every node of a comma-separated URL list.
    pub async fn connect_urls(urls: &str) -> anyhow::Result<async_nats::Client> {
        let addrs = urls
            .split(',')
            .map(|u| u.parse::<async_nats::ServerAddr>())
            .collect::<Result<Vec<_>, _>>()?;
        Ok(async_nats::connect(addrs).await?)
    }

    /// All nodes' URLs, comma separated.
    pub fn url(&self) -> String {
        self.nodes
            .iter()
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }
}
