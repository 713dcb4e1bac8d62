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

/// The header JetStream deduplicates on.
pub const MSG_ID_HEADER: &str = "Nats-Msg-Id";

/// `Nats-Msg-Id` of an order's `OrderProcessed` event.
pub fn processed_msg_id(order_id: &str) -> String {
    format!("{order_id}:processed")
}

/// `Nats-Msg-Id` of an order's `OrderRejected` event.
pub fn rejected_msg_id(order_id: &str) -> String {
    format!("{order_id}:rejected")
}

/// `Nats-Msg-Id` of a dead letter: the original message's stream and sequence.
pub fn dead_letter_msg_id(stream: &str, stream_sequence: u64) -> String {
    format!("{stream}:{stream_sequence}")
}

/// The KV key of an order's state record. Order ids that are valid KV keys are
/// used as they are; any other id (and any id starting with `x.`) is hex-encoded
/// behind an `x.` prefix, so every id maps to exactly one valid key.
pub fn state_key(order_id: &str) -> String {
    let valid = !order_id.is_empty()
        && !order_id.starts_with('.')
        && !order_id.ends_with('.')
        && !order_id.starts_with("x.")
        && !order_id.contains("..")
        && order_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'=' | b'.' | b'/'));
    if valid {
        order_id.to_string()
    } else {
        let hex: String = order_id.bytes().map(|b| format!("{b:02x}")).collect();
        format!("x.{hex}")
    }
}

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
    fn message_ids_never_collide_across_kinds() {
        let id = "ord-1";
        let ids = [
            id.to_string(),
            processed_msg_id(id),
            rejected_msg_id(id),
            dead_letter_msg_id("ORDERS", 1),
        ];
        let unique: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len());
    }

    #[test]
    fn state_keys_are_valid_and_injective() {
        assert_eq!(state_key("ord-1"), "ord-1");
        assert_eq!(state_key("a b"), "x.612062");
        assert_eq!(state_key("x.1"), "x.782e31");
        assert_eq!(state_key(""), "x.");
        assert_ne!(state_key("x.612062"), state_key("a b"));
        assert_eq!(state_key("über"), "x.c3bc626572");
    }

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
