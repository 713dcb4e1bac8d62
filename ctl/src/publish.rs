//! `orderctl publish`: publish orders the way the contract says (a
//! `Nats-Msg-Id` and a `traceparent` on each), counting an order only once
//! JetStream acknowledged it. What to send is a pure, seeded [`Plan`]; sending
//! it is one window of publishes awaiting their PubAck, re-sent with the same
//! id until acknowledged.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream;
use bytes::Bytes;
use orderpipeline_common::duration::parse_duration;
use orderpipeline_common::{names, trace};
use orderpipeline_proto::{Message as _, OrderCreated, OrderItem};
use tracing::Instrument as _;

use crate::target::{Binding, Session};

/// `orderctl publish`'s flags.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// How many orders.
    #[arg(long, default_value_t = 100)]
    pub count: u64,
    /// Orders per second (0 = as fast as acks come back).
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Fraction of orders that are invalid (rejected by the workers).
    #[arg(long, default_value_t = 0.0)]
    pub invalid_ratio: f64,
    /// Fraction of publishes that repeat an earlier order with the same Nats-Msg-Id.
    #[arg(long, default_value_t = 0.0)]
    pub duplicate_ratio: f64,
    /// Order id prefix (ids are PREFIX-N); default: a random run id.
    #[arg(long)]
    pub prefix: Option<String>,
    /// Subject to publish on.
    #[arg(long, env = "INPUT_SUBJECT", default_value = names::DEFAULT_INPUT_SUBJECT)]
    pub subject: String,
    /// Undecodable messages to publish too (they end in the dead-letter stream).
    #[arg(long, default_value_t = 0)]
    pub poison: u64,
    /// Publishes in flight at once.
    #[arg(long, default_value_t = 256)]
    pub window: usize,
    /// How long to wait for a PubAck before re-sending with the same id.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub ack_timeout: Duration,
}

impl Args {
    /// Publishes on the pipeline's input subject unless `--subject` was given.
    pub fn bind(&mut self, b: &Binding<'_>) -> anyhow::Result<()> {
        if b.given.on_command_line("subject") {
            return Ok(());
        }
        let p = b.pipeline;
        if p.input_subject.contains(['*', '>']) {
            anyhow::bail!(
                "pipeline {}/{} consumes {}, a wildcard: give the subject to publish on with --subject",
                p.namespace,
                p.name,
                p.input_subject
            );
        }
        self.subject = p.input_subject.clone();
        Ok(())
    }

    fn options(self, progress: bool) -> anyhow::Result<PublishOptions> {
        for (name, v) in [
            ("--invalid-ratio", self.invalid_ratio),
            ("--duplicate-ratio", self.duplicate_ratio),
        ] {
            if !(0.0..=1.0).contains(&v) {
                anyhow::bail!("{name} must be between 0 and 1, got {v}");
            }
        }
        Ok(PublishOptions {
            subject: self.subject,
            count: self.count,
            rate: self.rate,
            invalid_ratio: self.invalid_ratio,
            duplicate_ratio: self.duplicate_ratio,
            prefix: self
                .prefix
                .unwrap_or_else(|| format!("ord-{:08x}", rand::random::<u32>())),
            window: self.window,
            ack_timeout: self.ack_timeout,
            progress,
            poison: self.poison,
        })
    }
}

pub async fn run(s: &Session, args: Args) -> anyhow::Result<()> {
    let r = publish_orders(&s.js, &args.options(!s.json)?).await?;
    if s.json {
        return s.print_json(&r);
    }
    print!("{}", human(&r));
    Ok(())
}

fn human(r: &PublishReport) -> String {
    let mut out = format!(
        "published {} orders in {:.1}s ({:.0}/s): {} valid, {} invalid, {} poison, {} duplicate publishes ({} acked as duplicate), {} retried\n",
        r.valid + r.invalid,
        r.seconds,
        r.published as f64 / r.seconds.max(0.001),
        r.valid,
        r.invalid,
        r.poison,
        r.duplicates_sent,
        r.duplicates_acked,
        r.retries
    );
    if let Some(t) = &r.first_trace_id {
        out.push_str(&format!("trace of the first order: {t}\n"));
    }
    out
}

/// Builds a valid order with a deterministic content for `id`.
pub fn valid_order(id: &str, n: u64) -> OrderCreated {
    let items: Vec<OrderItem> = (0..(1 + n % 3))
        .map(|i| OrderItem {
            product_id: format!("sku-{}", (n + i) % 97),
            quantity: i32::try_from(1 + (n + i) % 4).unwrap_or(1),
            unit_price: ((n + i) % 50) as f64 + 0.25,
        })
        .collect();
    let total = items
        .iter()
        .map(|i| f64::from(i.quantity) * i.unit_price)
        .sum();
    OrderCreated {
        order_id: id.to_string(),
        customer_id: format!("cust-{}", n % 1000),
        items,
        total_amount: total,
        created_at: Some(orderpipeline_proto::now()),
    }
}

/// An order that fails validation (its total does not match its items).
pub fn invalid_order(id: &str, n: u64) -> OrderCreated {
    let mut o = valid_order(id, n);
    o.total_amount += 1.0;
    o
}

#[derive(Clone, Debug)]
pub struct PublishOptions {
    pub subject: String,
    pub count: u64,
    /// Orders per second; 0 = as fast as acks allow.
    pub rate: f64,
    pub invalid_ratio: f64,
    pub duplicate_ratio: f64,
    /// Order ids are `<prefix>-<n>`.
    pub prefix: String,
    /// Publishes awaiting their PubAck at once.
    pub window: usize,
    pub ack_timeout: Duration,
    pub progress: bool,
    /// Undecodable messages to publish after the orders (they end in the DLQ).
    pub poison: u64,
}

/// What a publish run achieved; "published" means acknowledged by JetStream.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct PublishReport {
    pub published: u64,
    pub valid: u64,
    pub invalid: u64,
    /// Undecodable messages published on purpose.
    pub poison: u64,
    /// Re-publishes of an earlier order with the same Nats-Msg-Id.
    pub duplicates_sent: u64,
    /// PubAcks that said "duplicate" (the stream already had the id).
    pub duplicates_acked: u64,
    /// Publishes retried after an error or a timeout (same Nats-Msg-Id).
    pub retries: u64,
    pub seconds: f64,
    /// The trace id of the first order, to look it up in Jaeger.
    pub first_trace_id: Option<String>,
    #[serde(skip)]
    pub valid_ids: Vec<String>,
    #[serde(skip)]
    pub invalid_ids: Vec<String>,
}

/// What one planned publish is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Valid,
    Invalid,
    /// An earlier order again, with the same id and content (a producer retrying).
    Duplicate,
    /// An undecodable message (after all orders).
    Poison,
}

/// One planned publish.
#[derive(Clone, Debug)]
pub struct Planned {
    pub kind: Kind,
    /// Its `Nats-Msg-Id`: the order id, or `<prefix>-poison-<i>`.
    pub id: String,
    /// The new order's number (`<prefix>-<n>`); `None` for duplicates and poison.
    pub n: Option<u64>,
    pub payload: Bytes,
}

/// The publishes of a run, in order: `count` orders (some invalid, some
/// publishes repeating an earlier order), then the poison. Pure and seeded.
pub struct Plan {
    rng: u64,
    prefix: String,
    count: u64,
    poison: u64,
    invalid_ratio: f64,
    duplicate_ratio: f64,
    /// Ids sent so far, and whether each was invalid.
    sent: Vec<(String, bool)>,
    poison_sent: u64,
}

impl Plan {
    pub fn new(opts: &PublishOptions, seed: u64) -> Self {
        Self {
            rng: (seed ^ 0x9e37_79b9_7f4a_7c15).max(1),
            prefix: opts.prefix.clone(),
            count: opts.count,
            poison: opts.poison,
            invalid_ratio: opts.invalid_ratio,
            duplicate_ratio: opts.duplicate_ratio,
            sent: Vec::new(),
            poison_sent: 0,
        }
    }

    /// A number in [0, 1) (xorshift: cheap and good enough to choose which
    /// orders to vary).
    fn next_rand(&mut self) -> f64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng >> 11) as f64 / (1u64 << 53) as f64
    }

    /// New orders planned so far.
    pub fn orders(&self) -> u64 {
        self.sent.len() as u64
    }

    fn duplicate(&mut self) -> Planned {
        let pick = (self.next_rand() * self.sent.len() as f64) as usize;
        let (id, invalid) = self.sent[pick.min(self.sent.len() - 1)].clone();
        // The same content: the index is the order's own number.
        let idx = id
            .rsplit('-')
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let o = if invalid {
            invalid_order(&id, idx)
        } else {
            valid_order(&id, idx)
        };
        Planned {
            kind: Kind::Duplicate,
            id,
            n: None,
            payload: Bytes::from(o.encode_to_vec()),
        }
    }

    fn order(&mut self) -> Planned {
        let n = self.orders();
        let id = format!("{}-{n}", self.prefix);
        let invalid = self.next_rand() < self.invalid_ratio;
        let o = if invalid {
            invalid_order(&id, n)
        } else {
            valid_order(&id, n)
        };
        self.sent.push((id.clone(), invalid));
        Planned {
            kind: if invalid { Kind::Invalid } else { Kind::Valid },
            id,
            n: Some(n),
            payload: Bytes::from(o.encode_to_vec()),
        }
    }

    fn poison(&mut self) -> Planned {
        let i = self.poison_sent;
        self.poison_sent += 1;
        Planned {
            kind: Kind::Poison,
            id: format!("{}-poison-{i}", self.prefix),
            n: None,
            // A field tag with an invalid wire type: no protobuf decoder accepts it.
            payload: Bytes::from(vec![0x0f, 0xff, 0xff, 0xff, 0xff, i as u8]),
        }
    }
}

impl Iterator for Plan {
    type Item = Planned;

    fn next(&mut self) -> Option<Planned> {
        if self.orders() < self.count {
            let dup = !self.sent.is_empty() && self.next_rand() < self.duplicate_ratio;
            return Some(if dup { self.duplicate() } else { self.order() });
        }
        (self.poison_sent < self.poison).then(|| self.poison())
    }
}

/// A publish awaiting its PubAck.
struct Pending {
    planned: Planned,
    headers: HeaderMap,
    fut: jetstream::context::PublishAckFuture,
    /// When the PubAck stops being worth waiting for (sent + ack timeout), so
    /// a window of publishes lost in an outage times out together, not one by one.
    deadline: tokio::time::Instant,
}

/// Publishes the plan of `opts`, and counts an order only once JetStream
/// acknowledged it. A failed or timed-out publish is re-sent with the same id
/// until acknowledged.
pub async fn publish_orders(
    js: &jetstream::Context,
    opts: &PublishOptions,
) -> anyhow::Result<PublishReport> {
    let start = Instant::now();
    let mut report = PublishReport::default();
    let bar = progress_bar(opts);
    let mut plan = Plan::new(opts, u64::from(std::process::id())).peekable();
    let mut window: VecDeque<Pending> = VecDeque::new();
    while plan.peek().is_some() || !window.is_empty() {
        // Keep the window full.
        while window.len() < opts.window.max(1)
            && let Some(planned) = plan.next()
        {
            if let (Some(n), true) = (planned.n, opts.rate > 0.0) {
                tokio::time::sleep_until(
                    (start + Duration::from_secs_f64(n as f64 / opts.rate)).into(),
                )
                .await;
            }
            window.push_back(send_planned(js, opts, planned, &mut report).await);
        }
        // Collect the oldest ack; re-send on error with the same id.
        if let Some(p) = window.pop_front() {
            match tokio::time::timeout_at(p.deadline, p.fut).await {
                Ok(Ok(ack)) => {
                    count_ack(&mut report, p.planned.kind, ack.duplicate);
                    if p.planned.kind != Kind::Poison {
                        bar.inc(1);
                    }
                }
                Ok(Err(_)) | Err(_) => {
                    report.retries += 1;
                    let fut = send(js, &opts.subject, &p.headers, &p.planned, &mut report).await;
                    window.push_front(Pending {
                        fut,
                        deadline: tokio::time::Instant::now() + opts.ack_timeout,
                        ..p
                    });
                }
            }
        }
    }
    bar.finish_and_clear();
    // `published` counts acks, including those of deliberate duplicates.
    report.valid = report.valid_ids.len() as u64;
    report.invalid = report.invalid_ids.len() as u64;
    report.seconds = start.elapsed().as_secs_f64();
    Ok(report)
}

fn progress_bar(opts: &PublishOptions) -> indicatif::ProgressBar {
    if !opts.progress {
        return indicatif::ProgressBar::hidden();
    }
    let b = indicatif::ProgressBar::new(opts.count);
    b.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} {bar:40} {pos}/{len} orders acked ({per_sec}, eta {eta})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    b
}

fn count_ack(report: &mut PublishReport, kind: Kind, duplicate: bool) {
    if kind == Kind::Poison {
        report.poison += 1;
        return;
    }
    report.published += 1;
    if duplicate {
        report.duplicates_acked += 1;
    }
}

/// Sends one planned publish with its id and trace context, and records the
/// order's id as valid or invalid.
async fn send_planned(
    js: &jetstream::Context,
    opts: &PublishOptions,
    planned: Planned,
    report: &mut PublishReport,
) -> Pending {
    let span = tracing::info_span!(
        "publish",
        otel.name = format!("publish {}", opts.subject),
        otel.kind = "producer",
        messaging.system = "nats",
        messaging.operation.type = "publish",
        messaging.destination.name = opts.subject.as_str(),
        messaging.message.id = planned.id.as_str(),
    );
    let mut headers = HeaderMap::new();
    headers.insert(names::MSG_ID_HEADER, planned.id.as_str());
    if planned.kind != Kind::Poison {
        let _g = span.enter();
        trace::inject_current(&mut headers);
        if report.first_trace_id.is_none() {
            report.first_trace_id = trace::current_trace_id();
        }
    }
    let fut = send(js, &opts.subject, &headers, &planned, report)
        .instrument(span)
        .await;
    match planned.kind {
        Kind::Valid => report.valid_ids.push(planned.id.clone()),
        Kind::Invalid => report.invalid_ids.push(planned.id.clone()),
        Kind::Duplicate => report.duplicates_sent += 1,
        Kind::Poison => {}
    }
    Pending {
        planned,
        headers,
        fut,
        deadline: tokio::time::Instant::now() + opts.ack_timeout,
    }
}

/// Hands the publish to the client, retrying (same id) until it takes it.
async fn send(
    js: &jetstream::Context,
    subject: &str,
    headers: &HeaderMap,
    planned: &Planned,
    report: &mut PublishReport,
) -> jetstream::context::PublishAckFuture {
    loop {
        match js
            .publish_with_headers(
                subject.to_string(),
                headers.clone(),
                planned.payload.clone(),
            )
            .await
        {
            Ok(f) => return f,
            Err(e) => {
                report.retries += 1;
                tracing::warn!(error = %e, id = planned.id, "publish failed; retrying with the same id");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(count: u64, invalid: f64, dup: f64, poison: u64) -> PublishOptions {
        PublishOptions {
            subject: "ORDER.created".into(),
            count,
            rate: 0.0,
            invalid_ratio: invalid,
            duplicate_ratio: dup,
            prefix: "t".into(),
            window: 8,
            ack_timeout: Duration::from_secs(1),
            progress: false,
            poison,
        }
    }

    fn kinds(p: &PublishOptions, seed: u64) -> Vec<(Kind, String)> {
        Plan::new(p, seed).map(|x| (x.kind, x.id)).collect()
    }

    #[test]
    fn a_plan_is_count_orders_then_the_poison() {
        let plan = kinds(&opts(5, 0.0, 0.0, 2), 7);
        let ids: Vec<&str> = plan.iter().map(|(_, id)| id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "t-0",
                "t-1",
                "t-2",
                "t-3",
                "t-4",
                "t-poison-0",
                "t-poison-1"
            ]
        );
        assert!(plan[..5].iter().all(|(k, _)| *k == Kind::Valid));
        assert!(plan[5..].iter().all(|(k, _)| *k == Kind::Poison));
    }

    #[test]
    fn a_plan_is_the_same_for_the_same_seed_and_varies_as_asked() {
        let p = opts(2000, 0.25, 0.1, 0);
        assert_eq!(kinds(&p, 42), kinds(&p, 42));
        assert_ne!(kinds(&p, 42), kinds(&p, 43));
        let plan = kinds(&p, 42);
        let count = |k: Kind| plan.iter().filter(|(x, _)| *x == k).count();
        // 2000 new orders; duplicates come on top of them.
        assert_eq!(count(Kind::Valid) + count(Kind::Invalid), 2000);
        let invalid = count(Kind::Invalid) as f64 / 2000.0;
        assert!((0.2..0.3).contains(&invalid), "{invalid}");
        let dups = count(Kind::Duplicate) as f64 / plan.len() as f64;
        assert!((0.07..0.13).contains(&dups), "{dups}");
    }

    #[test]
    fn a_duplicate_repeats_an_earlier_order_exactly() {
        let p = opts(500, 0.5, 0.3, 0);
        let plan: Vec<Planned> = Plan::new(&p, 9).collect();
        let mut by_id = std::collections::HashMap::new();
        for x in &plan {
            match x.kind {
                Kind::Duplicate => {
                    let first: &Bytes = by_id
                        .get(&x.id)
                        .expect("a duplicate of an order sent before");
                    let (a, b) = (
                        OrderCreated::decode(first.as_ref()).unwrap(),
                        OrderCreated::decode(x.payload.as_ref()).unwrap(),
                    );
                    assert_eq!(
                        (a.order_id, a.items, a.total_amount),
                        (b.order_id, b.items, b.total_amount)
                    );
                }
                _ => {
                    by_id.insert(x.id.clone(), x.payload.clone());
                }
            }
        }
    }

    #[test]
    fn valid_and_invalid_orders_are_what_the_worker_decides() {
        use orderpipeline_protocol::decide::validate;
        let p = opts(300, 0.5, 0.0, 0);
        for x in Plan::new(&p, 3) {
            let o = OrderCreated::decode(x.payload.as_ref()).unwrap();
            assert_eq!(validate(&o).is_ok(), x.kind == Kind::Valid, "{}", x.id);
        }
    }

    #[test]
    fn ratios_outside_zero_to_one_are_refused_naming_the_flag() {
        let mut a = <Args as clap::FromArgMatches>::from_arg_matches(
            &<Args as clap::Args>::augment_args(clap::Command::new("t"))
                .try_get_matches_from(["t"])
                .unwrap(),
        )
        .unwrap();
        a.invalid_ratio = 1.5;
        let e = a.options(false).unwrap_err().to_string();
        assert!(
            e.contains("--invalid-ratio must be between 0 and 1, got 1.5"),
            "{e}"
        );
    }
}
