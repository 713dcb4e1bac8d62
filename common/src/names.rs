//! Default names and subjects of the pipeline's JetStream objects, and the
//! message-id rules of the contract (see ARCHITECTURE.md). The operator's CRD
//! defaults, the worker's flag defaults and orderctl all read them from here.

pub const DEFAULT_NATS_URL: &str = "nats://localhost:4222";
pub const DEFAULT_STREAM: &str = "ORDERS";
pub const DEFAULT_STREAM_SUBJECTS: &str = "ORDER.*";
pub const DEFAULT_INPUT_SUBJECT: &str = "ORDER.created";
pub const DEFAULT_PROCESSED_SUBJECT: &str = "ORDER.processed";
pub const DEFAULT_REJECTED_SUBJECT: &str = "ORDER.rejected";
pub const DEFAULT_DLQ_STREAM: &str = "ORDERS_DLQ";
pub const DEFAULT_DLQ_SUBJECT: &str = "DLQ.ORDER.created";
pub const DEFAULT_CONSUMER: &str = "order-workers";
pub const DEFAULT_STATE_BUCKET: &str = "ORDERS_STATE";
pub const DEFAULT_WORKER_POOL_SIZE: u32 = 10;

/// The Secret the operator mints pipeline `name`'s worker NATS identity into
/// (`spec.nats.accountRef`).
pub fn minted_worker_secret(name: &str) -> String {
    format!("{name}-nats-worker")
}

/// The Secret the operator mints pipeline `name`'s producer NATS identity into.
pub fn minted_producer_secret(name: &str) -> String {
    format!("{name}-nats-producer")
}

/// The dead-letter stream a pipeline gets when `deadLetter.streamName` is unset.
pub fn derived_dlq_stream(stream: &str) -> String {
    format!("{stream}_DLQ")
}

/// The dead-letter subject a pipeline gets when `deadLetter.subject` is unset.
pub fn derived_dlq_subject(filter_subject: &str) -> String {
    format!("DLQ.{filter_subject}")
}

/// The (legacy) KV bucket a pipeline gets when `state.bucket` is unset.
pub fn derived_state_bucket(stream: &str) -> String {
    format!("{stream}_STATE")
}

/// The annotation on an OrderPipeline with which a person acknowledges the
/// orders its stream's limits removed unprocessed: the count handled.
pub const REMOVED_ACKNOWLEDGED_ANNOTATION: &str =
    "orderpipeline.dev/removed-unprocessed-acknowledged";

/// Orders removed unprocessed (`count`, from the status) that the annotation's
/// value (`acknowledged`, when set) does not cover; a value that is not a
/// number acknowledges nothing.
pub fn unacknowledged(count: i64, acknowledged: Option<&str>) -> i64 {
    let acked = acknowledged
        .and_then(|v| v.trim().parse::<i64>().ok())
        .unwrap_or(0);
    (count - acked).max(0)
}

/// The header JetStream deduplicates on.
pub const MSG_ID_HEADER: &str = "Nats-Msg-Id";

// The key encoding, the outcome subjects and the protocol's headers live in
// the protocol crate; re-exported so every user keeps one path for names.
pub use orderpipeline_protocol::keys::*;

/// Whether `subject` is matched by the NATS subject pattern `pattern`
/// (`*` matches one token, `>` one or more trailing tokens).
pub fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut p = pattern.split('.');
    let mut s = subject.split('.');
    loop {
        match (p.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Whether two subject patterns can match a common subject.
pub fn subjects_overlap(a: &str, b: &str) -> bool {
    let mut x = a.split('.');
    let mut y = b.split('.');
    loop {
        match (x.next(), y.next()) {
            (Some(">"), Some(_)) | (Some(_), Some(">")) => return true,
            (Some("*"), Some(_)) | (Some(_), Some("*")) => {}
            (Some(p), Some(q)) if p == q => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subject_matching_follows_nats_wildcards() {
        assert!(subject_matches("ORDER.*", "ORDER.created"));
        assert!(!subject_matches("ORDER.*", "DLQ.ORDER.created"));
        assert!(!subject_matches("ORDER.*", "ORDER.a.b"));
        assert!(subject_matches("ORDER.>", "ORDER.a.b"));
        assert!(subject_matches(">", "DLQ.ORDER.created"));
        assert!(!subject_matches("ORDER", "ORDER.created"));
    }

    #[test]
    fn overlap_considers_wildcards_on_both_sides() {
        assert!(subjects_overlap("ORDER.*", "ORDER.created"));
        assert!(subjects_overlap("*.ORDER.created", "DLQ.>"));
        assert!(!subjects_overlap("ORDER.*", "DLQ.ORDER.created"));
        assert!(subjects_overlap(">", "DLQ.ORDER.created"));
        assert!(!subjects_overlap("ORDER.*", "ORDER.a.b"));
    }
}
