//! Helpers for pipeline tests: a downstream stub that records Idempotency-Keys,
//! a real `order-worker` process, and an audit of every order's outcome.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;

use crate::{free_port, wait_for};

/// How the stub answers.
#[derive(Clone, Debug, Default)]
pub struct StubBehaviour {
    /// Answer 503 to the first N calls of each key.
    pub fail_first: u32,
    /// Answer 400 (permanent) to keys starting with this prefix.
    pub refuse_prefix: Option<String>,
    /// Delay every answer.
    pub delay: Duration,
    /// Flap on a schedule of this period: in every third period answer 503, in
    /// the next one stall for `stall` (past the worker's timeout) before a 2xx.
    pub flap_period: Option<Duration>,
    pub stall: Duration,
}

/// A downstream HTTP service on loopback that records every call's
/// `Idempotency-Key` (`<pipeline>:<order key>`, recorded by order key; a key
/// without the pipeline scope is refused with 400) and counts "effective
/// charges" (first 2xx per key).
pub struct DownstreamStub {
    pub url: String,
    pub calls: Arc<Mutex<HashMap<String, u32>>>,
    pub charged: Arc<Mutex<HashMap<String, u32>>>,
    /// When each call arrived (wall clock), by order key.
    pub call_times: Arc<Mutex<HashMap<String, Vec<std::time::SystemTime>>>>,
    /// The scopes (the Idempotency-Key before its last `:`) the calls carried.
    pub scopes: Arc<Mutex<std::collections::BTreeSet<String>>>,
    task: tokio::task::JoinHandle<()>,
}

type Counts = Arc<Mutex<HashMap<String, u32>>>;
type Times = Arc<Mutex<HashMap<String, Vec<std::time::SystemTime>>>>;

/// Records one call to the stub: its scope, its arrival and its number for the
/// key; returns the order key and that number.
fn record_call(
    full: &str,
    calls: &Counts,
    times: &Times,
    scopes: &Mutex<std::collections::BTreeSet<String>>,
) -> (String, u32) {
    let arrived = std::time::SystemTime::now();
    let (scope, key) = full
        .rsplit_once(':')
        .map_or((String::new(), String::new()), |(s, k)| {
            (s.to_string(), k.to_string())
        });
    scopes
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(scope);
    times
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(key.clone())
        .or_default()
        .push(arrived);
    let mut m = calls.lock().unwrap_or_else(|p| p.into_inner());
    let e = m.entry(key.clone()).or_insert(0);
    *e += 1;
    (key, *e)
}

impl DownstreamStub {
    pub async fn start(behaviour: StubBehaviour) -> anyhow::Result<Self> {
        use axum::http::{HeaderMap, StatusCode};
        let calls: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
        let charged: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
        let call_times: Arc<Mutex<HashMap<String, Vec<std::time::SystemTime>>>> = Arc::default();
        let (c, ch, b) = (calls.clone(), charged.clone(), Arc::new(behaviour));
        let ct = call_times.clone();
        let scopes: Arc<Mutex<std::collections::BTreeSet<String>>> = Arc::default();
        let sc = scopes.clone();
        let started = std::time::Instant::now();
        let app = axum::Router::new().route(
            "/charge",
            axum::routing::post(move |headers: HeaderMap| {
                let (c, ch, b, ct) = (c.clone(), ch.clone(), b.clone(), ct.clone());
                let sc = sc.clone();
                async move {
                    // `<scope>:<order key>`: recorded by order key (see calls_for).
                    let full = headers
                        .get("idempotency-key")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("");
                    let (key, n) = record_call(full, &c, &ct, &sc);
                    if !b.delay.is_zero() {
                        tokio::time::sleep(b.delay).await;
                    }
                    if key.is_empty() {
                        return StatusCode::BAD_REQUEST;
                    }
                    if b.refuse_prefix
                        .as_deref()
                        .is_some_and(|p| key.starts_with(p))
                    {
                        return StatusCode::BAD_REQUEST;
                    }
                    if n <= b.fail_first {
                        return StatusCode::SERVICE_UNAVAILABLE;
                    }
                    if let Some(period) = b.flap_period {
                        let phase = (started.elapsed().as_millis() / period.as_millis().max(1)) % 3;
                        if phase == 1 {
                            return StatusCode::SERVICE_UNAVAILABLE;
                        }
                        if phase == 2 {
                            tokio::time::sleep(b.stall).await;
                        }
                    }
                    // Idempotent: a repeated key is acknowledged without a second charge.
                    let mut m = ch.lock().unwrap_or_else(|p| p.into_inner());
                    *m.entry(key).or_insert(0) += 1;
                    StatusCode::OK
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/charge", listener.local_addr()?);
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self {
            url,
            calls,
            charged,
            call_times,
            scopes,
            task,
        })
    }

    /// Calls made for the order with this id.
    pub fn calls_for(&self, order_id: &str) -> u32 {
        let key = orderpipeline_common::names::order_key(order_id).unwrap_or_default();
        self.calls
            .lock()
            .map(|m| m.get(&key).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    pub fn total_calls(&self) -> u64 {
        self.calls
            .lock()
            .map(|m| m.values().map(|v| u64::from(*v)).sum())
            .unwrap_or(0)
    }

    /// Orders charged at least once: with the Idempotency-Key, a repeated call
    /// for the same key is not a new charge.
    pub fn effective_charges(&self) -> usize {
        self.charged.lock().map(|m| m.len()).unwrap_or(0)
    }

    pub fn charged(&self, order_id: &str) -> bool {
        let key = orderpipeline_common::names::order_key(order_id).unwrap_or_default();
        self.charged
            .lock()
            .map(|m| m.contains_key(&key))
            .unwrap_or(false)
    }

    /// Order keys the downstream charged (answered 2xx at least once).
    pub fn charged_keys(&self) -> Vec<String> {
        self.charged
            .lock()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// The latest call for an order key.
    pub fn last_call(&self, key: &str) -> Option<std::time::SystemTime> {
        self.call_times
            .lock()
            .ok()
            .and_then(|m| m.get(key).and_then(|v| v.iter().max().copied()))
    }

    /// Keys that got more than one 2xx (a repeated call after a lost answer or a
    /// crash; harmless thanks to the Idempotency-Key, but never expected when
    /// nothing failed).
    pub fn charged_twice(&self) -> Vec<String> {
        self.charged
            .lock()
            .map(|m| {
                m.iter()
                    .filter(|(_, v)| **v > 1)
                    .map(|(k, _)| k.clone())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for DownstreamStub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Where the workspace's binaries are (built by `cargo build` before the tests).
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target")));
    let p = dir.join("debug").join(name);
    anyhow::ensure!(
        p.is_file(),
        "{} not found: run `cargo build --workspace` first",
        p.display()
    );
    Ok(p)
}

/// A real `order-worker` process on a private HTTP port.
pub struct WorkerProcess {
    pub http_port: u16,
    child: Option<tokio::process::Child>,
    pub log: PathBuf,
}

impl WorkerProcess {
    /// Starts `bin` with `env` (NATS_URL etc.); HTTP_ADDR is picked here.
    pub async fn spawn(bin: &std::path::Path, env: &[(&str, String)]) -> anyhow::Result<Self> {
        let http_port = free_port()?;
        let log = std::env::temp_dir().join(format!(
            "order-worker-{}-{http_port}.log",
            crate::random_suffix()
        ));
        let file = std::fs::File::create(&log)?;
        let mut cmd = tokio::process::Command::new(bin);
        cmd.env("HTTP_ADDR", format!("127.0.0.1:{http_port}"))
            .env("RUST_LOG", "info,async_nats=warn")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .stdout(std::process::Stdio::null())
            .stderr(file)
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().context("starting order-worker")?;
        Ok(Self {
            http_port,
            child: Some(child),
            log,
        })
    }

    pub async fn readyz(&self) -> Option<(u16, String)> {
        http_get(&format!("http://127.0.0.1:{}/readyz", self.http_port)).await
    }

    pub async fn wait_ready(&self) -> anyhow::Result<()> {
        wait_for("the worker's /readyz", Duration::from_secs(30), || async {
            Ok(matches!(self.readyz().await, Some((200, _))).then_some(()))
        })
        .await
        .with_context(|| {
            format!(
                "worker log: {}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            )
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }

    pub async fn signal(&self, sig: &str) -> anyhow::Result<()> {
        if let Some(pid) = self.pid() {
            tokio::process::Command::new("kill")
                .args([&format!("-{sig}"), &pid.to_string()])
                .status()
                .await?;
        }
        Ok(())
    }

    /// Waits for exit and returns the exit code.
    pub async fn wait(&mut self, timeout: Duration) -> anyhow::Result<Option<i32>> {
        let Some(child) = self.child.as_mut() else {
            return Ok(None);
        };
        let status = tokio::time::timeout(timeout, child.wait())
            .await
            .context("worker did not exit in time")??;
        self.child = None;
        Ok(status.code())
    }

    pub async fn kill(&mut self) -> anyhow::Result<()> {
        self.signal("KILL").await?;
        self.wait(Duration::from_secs(10)).await?;
        Ok(())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.log);
    }
}

/// A plain HTTP GET on loopback: (status, body).
pub async fn http_get(url: &str) -> Option<(u16, String)> {
    let out = tokio::process::Command::new("curl")
        .args([
            "-s",
            "--max-time",
            "2",
            "--noproxy",
            "*",
            "-w",
            "\n%{http_code}",
            url,
        ])
        .output()
        .await
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n')?;
    Some((code.trim().parse().ok()?, body.to_string()))
}

pub use orderpipeline_ctl::audit::Audit;

/// Waits until `stream` holds at least `n` messages.
pub async fn wait_stream_holds(
    js: &async_nats::jetstream::Context,
    stream: &str,
    n: u64,
    timeout: Duration,
) -> anyhow::Result<()> {
    wait_for(&format!("{n} messages in {stream}"), timeout, || async {
        let mut s = js.get_stream(stream).await?;
        Ok((s.info().await?.state.messages >= n).then_some(()))
    })
    .await
}

/// The path a `hack/` build script (e.g. `build-v1-worker`, `build-previous`)
/// prints: what it built, or found in its cache.
pub fn built_by(script: &str) -> anyhow::Result<PathBuf> {
    let script = crate::operator::repo_root().join("hack").join(script);
    let out = std::process::Command::new(&script)
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    anyhow::ensure!(
        out.status.success(),
        "{} failed: {}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?.trim().into())
}

/// The test pipelines' consumer (`order-workers` of `ORDERS`), read now.
pub async fn order_consumer(
    js: &async_nats::jetstream::Context,
) -> anyhow::Result<async_nats::jetstream::consumer::Info> {
    let s = js.get_stream("ORDERS").await?;
    Ok(s.consumer_info("order-workers").await?)
}

/// Waits until `consumer` of `stream` has nothing pending, holds nothing, and
/// has delivered the last input on `subject`. The last check matters right
/// after a publish: the consumer's pending count follows the stream
/// asynchronously, so for a moment it may not count the newest input yet.
pub async fn wait_drained(
    js: &async_nats::jetstream::Context,
    stream: &str,
    consumer: &str,
    subject: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    use async_nats::jetstream::stream::LastRawMessageErrorKind;
    wait_for(
        &format!("{consumer} of {stream} to drain"),
        timeout,
        || async {
            let s = js.get_stream(stream).await?;
            let c = s.consumer_info(consumer).await?;
            if c.num_pending != 0 || c.num_ack_pending != 0 {
                return Ok(None);
            }
            let last = match s.get_last_raw_message_by_subject(subject).await {
                Ok(m) => m.sequence,
                Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => 0,
                Err(e) => return Err(e.into()),
            };
            Ok((c.delivered.stream_sequence >= last).then_some(()))
        },
    )
    .await
}

/// Waits until the dead-letter stream `dlq` holds no letter (replays remove
/// theirs once their outcome exists).
pub async fn wait_dlq_empty(
    js: &async_nats::jetstream::Context,
    dlq: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    wait_for("the replayed letters to go", timeout, || async {
        Ok(orderpipeline_ctl::dlq_list(js, dlq, 10)
            .await?
            .is_empty()
            .then_some(()))
    })
    .await
}
