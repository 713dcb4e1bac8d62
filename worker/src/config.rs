//! The worker's configuration: flags with environment fallbacks. These names are
//! the contract the operator renders into the worker Pods.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
pub use orderpipeline_common::flags::NatsArgs;
use orderpipeline_common::names;

pub use orderpipeline_common::duration::parse_duration;

fn parse_pool_size(s: &str) -> Result<u32, String> {
    match s.trim().parse::<u32>() {
        Ok(n) if (1..=10_000).contains(&n) => Ok(n),
        _ => Err(format!(
            "'{s}' is not a pool size; use a whole number from 1 to 10000"
        )),
    }
}

fn parse_attempts(s: &str) -> Result<u32, String> {
    match s.trim().parse::<u32>() {
        Ok(n) if (1..=1000).contains(&n) => Ok(n),
        _ => Err(format!(
            "'{s}' is not a count; use a whole number from 1 to 1000"
        )),
    }
}

fn parse_payload_bytes(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if (1..=64 * 1024 * 1024).contains(&n) => Ok(n),
        _ => Err(format!(
            "'{s}' is not a size in bytes; use a whole number from 1 to 67108864"
        )),
    }
}

fn parse_http_addr(s: &str) -> Result<SocketAddr, String> {
    s.trim().parse().map_err(|_| {
        format!(
            "'{s}' is not an address to listen on; use IP:PORT, e.g. 0.0.0.0:8080 or 127.0.0.1:8080"
        )
    })
}

fn parse_downstream_url(s: &str) -> Result<String, String> {
    let hint = "use an http(s) URL with a host, e.g. http://127.0.0.1:9000/charge";
    match reqwest::Url::parse(s.trim()) {
        Ok(u)
            if matches!(u.scheme(), "http" | "https")
                && u.host_str().is_some_and(|h| !h.is_empty()) =>
        {
            Ok(s.trim().to_string())
        }
        Ok(_) => Err(format!("'{s}' is not an http(s) URL with a host; {hint}")),
        Err(e) => Err(format!("'{s}' is not a URL ({e}); {hint}")),
    }
}

/// `order-worker`: processes orders from a JetStream pull consumer, exactly once.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "order-worker",
    version = orderpipeline_common::version::VERSION,
    about = "Processes orders from a JetStream pull consumer: each order gets exactly one outcome (processed, rejected or dead-lettered)"
)]
pub struct Config {
    #[command(flatten)]
    pub nats: NatsArgs,

    /// Orders processed concurrently by this process (also the most it pulls at once).
    #[arg(long, env = "WORKER_POOL_SIZE", default_value = "10", value_parser = parse_pool_size)]
    pub worker_pool_size: u32,

    /// Input stream.
    #[arg(long, env = "STREAM_NAME", default_value = names::DEFAULT_STREAM)]
    pub stream: String,
    /// Durable pull consumer on the input stream.
    #[arg(long, env = "CONSUMER_NAME", default_value = names::DEFAULT_CONSUMER)]
    pub consumer: String,
    /// Subject orders arrive on (the consumer's filter).
    #[arg(long, env = "INPUT_SUBJECT", default_value = names::DEFAULT_INPUT_SUBJECT)]
    pub input_subject: String,
    /// Dead-letter stream (the operator makes it source the pipeline's
    /// `<prefix>.deadlettered.*` outcomes from the input stream).
    #[arg(long, env = "DLQ_STREAM", default_value = names::DEFAULT_DLQ_STREAM)]
    pub dlq_stream: String,
    /// The KV bucket of the protocol before v2 (one record per order). When set,
    /// an order recorded final there (processed, rejected, dead_lettered) is
    /// acked as a duplicate: it had its outcome before the upgrade. The operator
    /// sets it while the pipeline's bucket holds records.
    #[arg(long, env = "LEGACY_STATE_BUCKET")]
    pub legacy_state_bucket: Option<String>,
    /// The pipeline this worker serves (`namespace/name`): scopes the downstream
    /// `Idempotency-Key` when the input stream pins no scope in its metadata
    /// (`orderpipeline.dev/idempotency-scope`, set by the operator and by
    /// `--create-topology`, which pins this value). Defaults to the stream's
    /// name. Make it unique across clusters that share a downstream.
    #[arg(long, env = "PIPELINE")]
    pub pipeline: Option<String>,

    /// Tries per delivery for transient errors (in process, with backoff).
    #[arg(long, env = "RETRY_ATTEMPTS", default_value = "3", value_parser = parse_attempts)]
    pub retry_attempts: u32,
    /// First in-process retry delay.
    #[arg(long, env = "RETRY_INITIAL_BACKOFF", default_value = "100ms", value_parser = parse_duration)]
    pub retry_initial_backoff: Duration,
    /// Longest in-process retry delay.
    #[arg(long, env = "RETRY_MAX_BACKOFF", default_value = "5s", value_parser = parse_duration)]
    pub retry_max_backoff: Duration,
    /// Deliveries after which an order that still fails is dead-lettered.
    #[arg(long, env = "MAX_DELIVERIES", default_value = "5", value_parser = parse_attempts)]
    pub max_deliveries: u32,
    /// NAK delay after the first failed delivery; doubles per delivery.
    #[arg(long, env = "NAK_INITIAL_DELAY", default_value = "1s", value_parser = parse_duration)]
    pub nak_initial_delay: Duration,
    /// Longest NAK delay.
    #[arg(long, env = "NAK_MAX_DELAY", default_value = "60s", value_parser = parse_duration)]
    pub nak_max_delay: Duration,
    /// Largest payload accepted; larger messages are dead-lettered as oversized.
    #[arg(long, env = "MAX_PAYLOAD_BYTES", default_value = "1048576", value_parser = parse_payload_bytes)]
    pub max_payload_bytes: usize,

    /// Optional downstream service: each order is POSTed there as JSON with `Idempotency-Key: <scope>:<order key>` (see PIPELINE).
    #[arg(long, env = "DOWNSTREAM_URL", value_parser = parse_downstream_url)]
    pub downstream_url: Option<String>,
    /// Timeout of one downstream call.
    #[arg(long, env = "DOWNSTREAM_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub downstream_timeout: Duration,

    /// Address of the HTTP server for /health, /livez, /readyz and /metrics.
    #[arg(long, env = "HTTP_ADDR", default_value = "127.0.0.1:8080", value_parser = parse_http_addr)]
    pub http_addr: SocketAddr,
    /// Time to finish in-flight orders after SIGTERM before NAKing the rest.
    #[arg(long, env = "SHUTDOWN_GRACE", default_value = "25s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,
    /// Create the stream, dead-letter stream, KV bucket and consumer with defaults
    /// if missing (to run without the operator, e.g. against a bare nats-server).
    #[arg(long, env = "CREATE_TOPOLOGY", default_value_t = false)]
    pub create_topology: bool,
    /// Worker identity in events and traces (defaults to POD_NAME, then the host name).
    #[arg(long, env = "POD_NAME")]
    pub worker_name: Option<String>,
}

impl Config {
    /// Cross-field checks clap cannot express.
    pub fn check(&self) -> Result<(), String> {
        if self.retry_initial_backoff > self.retry_max_backoff {
            return Err(format!(
                "RETRY_INITIAL_BACKOFF ({:?}) is longer than RETRY_MAX_BACKOFF ({:?}); make the initial backoff the shorter one",
                self.retry_initial_backoff, self.retry_max_backoff
            ));
        }
        if self.nak_initial_delay > self.nak_max_delay {
            return Err(format!(
                "NAK_INITIAL_DELAY ({:?}) is longer than NAK_MAX_DELAY ({:?}); make the initial delay the shorter one",
                self.nak_initial_delay, self.nak_max_delay
            ));
        }
        if self.downstream_timeout.is_zero() {
            return Err(
                "DOWNSTREAM_TIMEOUT is 0; use a duration longer than 0, e.g. 5s".to_string(),
            );
        }
        self.outcome_subjects()?;
        Ok(())
    }

    /// Where outcomes go: `<prefix>.processed|rejected|deadlettered.<key>`, the
    /// prefix being INPUT_SUBJECT without its last token.
    pub fn outcome_subjects(&self) -> Result<names::OutcomeSubjects, String> {
        names::OutcomeSubjects::for_filter(&self.input_subject).ok_or_else(|| {
            format!(
                "INPUT_SUBJECT {} has no prefix for the outcome subjects; use a subject of two or more tokens ending in a literal token, e.g. ORDER.created (outcomes then go to ORDER.processed.<key>, ORDER.rejected.<key>, ORDER.deadlettered.<key>)",
                self.input_subject
            )
        })
    }

    pub fn worker_name(&self) -> String {
        self.worker_name
            .clone()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_else(|| format!("order-worker-{}", std::process::id()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_size_is_bounded() {
        assert_eq!(parse_pool_size("10").unwrap(), 10);
        assert!(parse_pool_size("0").unwrap_err().contains("1 to 10000"));
        assert!(parse_pool_size("ten").is_err());
    }

    #[test]
    fn defaults_are_the_blogs() {
        let c = Config::try_parse_from(["order-worker"]).unwrap();
        assert_eq!(c.worker_pool_size, 10);
        assert_eq!(c.stream, "ORDERS");
        assert_eq!(c.input_subject, "ORDER.created");
        c.check().unwrap();
    }

    #[test]
    fn bad_values_name_the_flag_and_the_form() {
        let e = Config::try_parse_from(["order-worker", "--worker-pool-size", "0"]).unwrap_err();
        let s = e.to_string();
        assert!(
            s.contains("--worker-pool-size") && s.contains("1 to 10000"),
            "{s}"
        );
        for (flag, value, form) in [
            ("--downstream-url", "ftp://x", "http(s) URL with a host"),
            ("--downstream-url", "http://", "http(s) URL"),
            ("--max-payload-bytes", "0", "1 to 67108864"),
            ("--max-payload-bytes", "1MB", "1 to 67108864"),
            ("--http-addr", "localhost:8080", "IP:PORT"),
        ] {
            let s = Config::try_parse_from(["order-worker", flag, value])
                .unwrap_err()
                .to_string();
            assert!(s.contains(flag) && s.contains(form), "{flag} {value}: {s}");
        }
        let c = Config::try_parse_from(["order-worker", "--downstream-timeout", "0s"]).unwrap();
        assert!(c.check().unwrap_err().contains("DOWNSTREAM_TIMEOUT"));
        let c = Config::try_parse_from([
            "order-worker",
            "--downstream-url",
            "http://127.0.0.1:9000/charge",
        ])
        .unwrap();
        c.check().unwrap();
    }
}
