//! Helpers for pipeline tests: a downstream stub that records Idempotency-Keys,
//! a real `order-worker` process, and an audit of every order's outcome.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer};
use futures::StreamExt as _;
use orderpipeline_proto::{DeadLetter, Message as _, OrderProcessed, OrderRejected};

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
}

/// A downstream HTTP service on loopback that records every call's
/// `Idempotency-Key` and counts "effective charges" (first 2xx per key).
pub struct DownstreamStub {
    pub url: String,
    pub calls: Arc<Mutex<HashMap<String, u32>>>,
    pub charged: Arc<Mutex<HashMap<String, u32>>>,
    task: tokio::task::JoinHandle<()>,
}

impl DownstreamStub {
    pub async fn start(behaviour: StubBehaviour) -> anyhow::Result<Self> {
        use axum::http::{HeaderMap, StatusCode};
        let calls: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
        let charged: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
        let (c, ch, b) = (calls.clone(), charged.clone(), Arc::new(behaviour));
        let app = axum::Router::new().route(
            "/charge",
            axum::routing::post(move |headers: HeaderMap| {
                let (c, ch, b) = (c.clone(), ch.clone(), b.clone());
                async move {
                    let key = headers
                        .get("idempotency-key")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_string();
                    let n = {
                        let mut m = c.lock().unwrap_or_else(|p| p.into_inner());
                        let e = m.entry(key.clone()).or_insert(0);
                        *e += 1;
                        *e
                    };
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
            task,
        })
    }

    pub fn calls_for(&self, key: &str) -> u32 {
        self.calls
            .lock()
            .map(|m| m.get(key).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    pub fn total_calls(&self) -> u64 {
        self.calls
            .lock()
            .map(|m| m.values().map(|v| u64::from(*v)).sum())
            .unwrap_or(0)
    }

    /// Keys charged (first 2xx) more than once: must always be empty.
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

/// Every outcome in the streams, for exactly-once assertions.
#[derive(Debug, Default)]
pub struct Audit {
    /// order id -> number of OrderProcessed events
    pub processed: HashMap<String, u32>,
    pub rejected: HashMap<String, u32>,
    /// original stream sequence -> dead letters
    pub dead_letters: HashMap<u64, Vec<DeadLetter>>,
    /// input stream sequences with their order id ("" when undecodable)
    pub inputs: Vec<(u64, String)>,
    pub consumer_pending: u64,
    pub consumer_ack_pending: u64,
}

async fn read_all(
    js: &jetstream::Context,
    stream: &str,
    filter: &str,
) -> anyhow::Result<Vec<jetstream::Message>> {
    let s = js.get_stream(stream).await?;
    let c = s
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: filter.to_string(),
            ..Default::default()
        })
        .await?;
    let mut info = c.clone();
    let mut remaining = info.info().await?.num_pending;
    let mut out = Vec::new();
    if remaining == 0 {
        return Ok(out);
    }
    let mut msgs = c.messages().await?;
    while remaining > 0 {
        let m = tokio::time::timeout(Duration::from_secs(10), msgs.next())
            .await
            .context("reading the stream stalled")?
            .context("stream ended")??;
        remaining = m.info().map(|i| i.pending).unwrap_or(0);
        out.push(m);
    }
    Ok(out)
}

impl Audit {
    pub async fn collect(
        js: &jetstream::Context,
        stream: &str,
        dlq_stream: &str,
        consumer: &str,
    ) -> anyhow::Result<Self> {
        let mut a = Audit::default();
        for m in read_all(js, stream, "ORDER.processed").await? {
            let e = OrderProcessed::decode(m.payload.as_ref())?;
            *a.processed.entry(e.order_id).or_default() += 1;
        }
        for m in read_all(js, stream, "ORDER.rejected").await? {
            let e = OrderRejected::decode(m.payload.as_ref())?;
            *a.rejected.entry(e.order_id).or_default() += 1;
        }
        for m in read_all(js, dlq_stream, ">").await? {
            let d = DeadLetter::decode(m.payload.as_ref())?;
            a.dead_letters
                .entry(d.original_stream_sequence)
                .or_default()
                .push(d);
        }
        for m in read_all(js, stream, "ORDER.created").await? {
            let seq = m.info().map(|i| i.stream_sequence).unwrap_or(0);
            let id = orderpipeline_proto::OrderCreated::decode(m.payload.as_ref())
                .map(|o| o.order_id)
                .unwrap_or_default();
            a.inputs.push((seq, id));
        }
        let s = js.get_stream(stream).await?;
        let c = s.consumer_info(consumer).await?;
        a.consumer_pending = c.num_pending;
        a.consumer_ack_pending = c.num_ack_pending as u64;
        Ok(a)
    }

    /// Asserts exactly-once outcomes: each valid id processed once, each invalid
    /// id rejected once, nothing else; the consumer holds nothing; every input
    /// sequence is accounted for (its order has an outcome, or it is dead-lettered).
    pub fn assert_exactly_once(&self, valid: &[String], invalid: &[String]) -> anyhow::Result<()> {
        let valid_set: HashSet<&String> = valid.iter().collect();
        let invalid_set: HashSet<&String> = invalid.iter().collect();
        let missing: Vec<_> = valid
            .iter()
            .filter(|id| !self.processed.contains_key(*id))
            .take(5)
            .collect();
        anyhow::ensure!(
            missing.is_empty(),
            "lost: valid orders without OrderProcessed, e.g. {missing:?}"
        );
        let twice: Vec<_> = self
            .processed
            .iter()
            .filter(|(_, n)| **n > 1)
            .take(5)
            .collect();
        anyhow::ensure!(twice.is_empty(), "processed twice: {twice:?}");
        let extra: Vec<_> = self
            .processed
            .keys()
            .filter(|id| !valid_set.contains(id))
            .take(5)
            .collect();
        anyhow::ensure!(extra.is_empty(), "unexpected OrderProcessed for {extra:?}");
        let missing: Vec<_> = invalid
            .iter()
            .filter(|id| !self.rejected.contains_key(*id))
            .take(5)
            .collect();
        anyhow::ensure!(
            missing.is_empty(),
            "invalid orders without OrderRejected: {missing:?}"
        );
        let twice: Vec<_> = self
            .rejected
            .iter()
            .filter(|(_, n)| **n > 1)
            .take(5)
            .collect();
        anyhow::ensure!(twice.is_empty(), "rejected twice: {twice:?}");
        let extra: Vec<_> = self
            .rejected
            .keys()
            .filter(|id| !invalid_set.contains(id))
            .take(5)
            .collect();
        anyhow::ensure!(extra.is_empty(), "unexpected OrderRejected for {extra:?}");
        let dl_twice: Vec<_> = self
            .dead_letters
            .iter()
            .filter(|(_, v)| v.len() > 1)
            .map(|(k, _)| k)
            .take(5)
            .collect();
        anyhow::ensure!(
            dl_twice.is_empty(),
            "dead-lettered twice: input sequences {dl_twice:?}"
        );
        anyhow::ensure!(
            self.consumer_pending == 0 && self.consumer_ack_pending == 0,
            "stranded: consumer pending {} ack-pending {}",
            self.consumer_pending,
            self.consumer_ack_pending
        );
        let unaccounted: Vec<_> = self
            .inputs
            .iter()
            .filter(|(seq, id)| {
                !(self.dead_letters.contains_key(seq)
                    || self.processed.contains_key(id)
                    || self.rejected.contains_key(id))
            })
            .take(5)
            .collect();
        anyhow::ensure!(
            unaccounted.is_empty(),
            "input sequences without an outcome: {unaccounted:?}"
        );
        Ok(())
    }

    pub fn dead_letter_count(&self) -> usize {
        self.dead_letters.values().map(Vec::len).sum()
    }
}
