//! The outcome key encoding and the outcome subjects: how an input is named
//! in `<prefix>.<kind>.<key>`, the Idempotency-Key, and the protocol's headers.

/// The longest order id, in UTF-8 bytes. A longer id is rejected with
/// `REJECT_REASON_INVALID_ORDER_ID` (see proto/orders/v1/orders.proto).
pub const MAX_ORDER_ID_BYTES: usize = 256;

/// The subject token that names one input's outcome.
///
/// - An order id of 1 to [`MAX_ORDER_ID_BYTES`] bytes made only of `A-Z a-z 0-9 _ -`
///   is used as it is (readable in `nats stream view`).
/// - Any other id is `~` followed by the hex of its UTF-8 bytes.
/// - An input with no usable id (undecodable, empty or too long) is keyed by its
///   position: `=` + the stream's creation time (ns) + `-` + its sequence, so the
///   key of a recreated stream's input never repeats an old one.
///
/// The three forms start differently, so no two inputs share a key unless they
/// carry the same order id (the same order).
pub fn order_key(order_id: &str) -> Option<String> {
    let n = order_id.len();
    if n == 0 || n > MAX_ORDER_ID_BYTES {
        return None;
    }
    if order_id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Some(order_id.to_string());
    }
    let mut k = String::with_capacity(1 + 2 * n);
    k.push('~');
    for b in order_id.bytes() {
        k.push_str(&format!("{b:02x}"));
    }
    Some(k)
}

/// The key of an input that has no usable order id (see [`order_key`]).
pub fn position_key(stream_created_ns: u128, stream_sequence: u64) -> String {
    format!("={stream_created_ns}-{stream_sequence}")
}

/// The kinds of outcome an input can have; the token after the outcome prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum OutcomeKind {
    Processed,
    Rejected,
    DeadLettered,
    /// Not an outcome of its own: a copy of the key's final outcome, written by a
    /// later input of the same order (stored after that outcome), so that the
    /// key's last message is never older than any of its inputs. It carries the
    /// outcome's event and the kind it keeps (`Orderpipeline-Keeps`).
    Kept,
}

impl OutcomeKind {
    pub const ALL: [OutcomeKind; 4] = [
        OutcomeKind::Processed,
        OutcomeKind::Rejected,
        OutcomeKind::DeadLettered,
        OutcomeKind::Kept,
    ];
    pub fn token(self) -> &'static str {
        match self {
            OutcomeKind::Processed => "processed",
            OutcomeKind::Rejected => "rejected",
            OutcomeKind::DeadLettered => "deadlettered",
            OutcomeKind::Kept => "kept",
        }
    }
    pub fn from_token(t: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.token() == t)
    }
}

/// Where a pipeline's outcomes live: one subject per input key and kind,
/// `<prefix>.<kind>.<key>`, in the pipeline's own input stream. The prefix is
/// the consumer's filter subject without its last token (`ORDER.created` ->
/// `ORDER`), so results are `ORDER.processed.<key>`, `ORDER.rejected.<key>` and
/// `ORDER.deadlettered.<key>`. A write of an outcome expects the last sequence
/// on `<prefix>.*.<key>`: the stream itself lets only one outcome per key in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutcomeSubjects {
    pub prefix: String,
}

impl OutcomeSubjects {
    /// From the consumer's filter subject; `None` when it has a single token or
    /// ends in a wildcard (there is then no prefix the results could share).
    pub fn for_filter(filter: &str) -> Option<Self> {
        let (prefix, last) = filter.rsplit_once('.')?;
        if prefix.is_empty()
            || last.is_empty()
            || last == ">"
            || prefix
                .split('.')
                .any(|t| t.is_empty() || t == ">" || t == "*")
        {
            return None;
        }
        Some(Self {
            prefix: prefix.to_string(),
        })
    }
    pub fn subject(&self, kind: OutcomeKind, key: &str) -> String {
        format!("{}.{}.{key}", self.prefix, kind.token())
    }
    /// The pattern covering every kind of outcome of `key`.
    pub fn any_kind(&self, key: &str) -> String {
        format!("{}.*.{key}", self.prefix)
    }
    /// The stream subject capturing every outcome of one kind.
    pub fn all_of(&self, kind: OutcomeKind) -> String {
        format!("{}.{}.*", self.prefix, kind.token())
    }
    /// The kind and key of an outcome subject of this pipeline.
    pub fn parse<'a>(&self, subject: &'a str) -> Option<(OutcomeKind, &'a str)> {
        let rest = subject
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix('.')?;
        let (kind, key) = rest.split_once('.')?;
        if key.is_empty() || key.contains('.') {
            return None;
        }
        Some((OutcomeKind::from_token(kind)?, key))
    }
}

/// The input stream's metadata key that pins the Idempotency-Key's scope for
/// the stream's whole life: `<cluster>/<namespace>/<pipeline>` for a stream the
/// operator created, `<namespace>/<pipeline>` for one created before the scope
/// carried a cluster identity (the keys its orders were already called with).
/// Workers take the scope from here, so orders redelivered after the
/// operator's cluster identity changed keep their key.
pub const IDEMPOTENCY_SCOPE_METADATA: &str = "orderpipeline.dev/idempotency-scope";

/// The Idempotency-Key scope a worker uses: the stream's pinned one (see
/// [`IDEMPOTENCY_SCOPE_METADATA`]), else its `PIPELINE` setting, else the
/// stream's name.
pub fn idempotency_scope(
    stream_metadata: &std::collections::HashMap<String, String>,
    pipeline: Option<&str>,
    stream: &str,
) -> String {
    stream_metadata
        .get(IDEMPOTENCY_SCOPE_METADATA)
        .map(String::as_str)
        .filter(|s| !s.is_empty())
        .or(pipeline)
        .unwrap_or(stream)
        .to_string()
}

/// The `Idempotency-Key` sent to the downstream service: scoped (by cluster and
/// pipeline, see [`idempotency_scope`]) and carrying the encoded key, so two
/// pipelines, or the same pipeline in two clusters, sharing a downstream never
/// collide, and any id is a valid header value.
pub fn idempotency_key(pipeline: &str, key: &str) -> String {
    let scope: String = pipeline
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    format!("{scope}:{key}")
}

/// The KV key the protocol before v2 gave an order's record in the state
/// bucket (read by workers while records of that protocol may remain; see the
/// worker's LEGACY_STATE_BUCKET).
pub fn legacy_state_key(order_id: &str) -> String {
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

/// Header naming the dead-letter marker (its sequence in the input stream) that
/// a replayed input supersedes.
pub const REPLAY_OF_HEADER: &str = "Orderpipeline-Replay-Of";
/// Header on a dead-letter outcome (the marker, and so on its letter): the key
/// it is the outcome of.
pub const KEY_HEADER: &str = "Orderpipeline-Key";
/// Header on a dead-letter outcome: the input stream's creation time (ns since
/// the epoch), its identity across a deletion and re-creation (sequences restart).
pub const STREAM_CREATED_HEADER: &str = "Orderpipeline-Stream-Created";
/// Header on a replay: the key of the letter it replays (its marker's
/// `Orderpipeline-Key`).
pub const REPLAY_KEY_HEADER: &str = "Orderpipeline-Replay-Key";
/// Header on a replay: the creation time of the stream its letter's marker was
/// in (the marker's `Orderpipeline-Stream-Created`).
pub const REPLAY_STREAM_HEADER: &str = "Orderpipeline-Replay-Stream";
/// Header on every outcome: the input's stream sequence.
pub const INPUT_SEQ_HEADER: &str = "Orderpipeline-Input-Seq";

/// On a `kept` message: `<sequence>/<kind>`, the outcome it was written over
/// and copies, and the kind it keeps (`processed`, `rejected`).
pub const KEEPS_HEADER: &str = "Orderpipeline-Keeps";

/// The `Orderpipeline-Keeps: <sequence>/<kind>` header, parsed.
pub fn parse_keeps(value: &str) -> Option<(u64, OutcomeKind)> {
    let (seq, kind) = value.trim().split_once('/')?;
    let kind = OutcomeKind::from_token(kind)?;
    (kind == OutcomeKind::Processed || kind == OutcomeKind::Rejected)
        .then_some(())
        .and(seq.parse().ok().filter(|s| *s > 0))
        .map(|s| (s, kind))
}

/// The `Orderpipeline-Replay-Of: <marker>/<letter>` header, parsed: the
/// dead-letter marker (input stream sequence) and the letter (DLQ sequence).
pub fn parse_replay_of(value: &str) -> Option<(u64, u64)> {
    let (marker, letter) = value.split_once('/')?;
    Some((marker.trim().parse().ok()?, letter.trim().parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_injective_and_subject_safe() {
        assert_eq!(order_key("ord-1_A").as_deref(), Some("ord-1_A"));
        assert_eq!(order_key("a b").as_deref(), Some("~612062"));
        assert_eq!(
            order_key("A:processed").as_deref(),
            Some("~413a70726f636573736564")
        );
        assert_eq!(order_key("~61").as_deref(), Some("~7e3631"));
        assert_eq!(order_key("").as_deref(), None);
        assert_eq!(order_key(&"x".repeat(257)), None);
        assert!(order_key(&"x".repeat(256)).is_some());
        assert_eq!(order_key("über").as_deref(), Some("~c3bc626572"));
        assert_eq!(order_key("a\r\nb").as_deref(), Some("~610d0a62"));
        assert_eq!(position_key(12, 7), "=12-7");
        for id in ["a.b", "a*", ">", "a\tb", "\u{0}", "Ω", &"é".repeat(128)] {
            let k = order_key(id).unwrap();
            assert!(
                k.bytes()
                    .all(|b| b.is_ascii_graphic() && !matches!(b, b'.' | b'*' | b'>')),
                "{k}"
            );
        }
    }

    #[test]
    fn outcome_subjects_follow_the_filter() {
        let o = OutcomeSubjects::for_filter("SHOP.created").unwrap();
        assert_eq!(o.subject(OutcomeKind::Processed, "k"), "SHOP.processed.k");
        assert_eq!(o.any_kind("k"), "SHOP.*.k");
        assert_eq!(o.all_of(OutcomeKind::Rejected), "SHOP.rejected.*");
        assert_eq!(
            o.parse("SHOP.deadlettered.=1-2"),
            Some((OutcomeKind::DeadLettered, "=1-2"))
        );
        assert_eq!(o.parse("SHOP.created"), None);
        assert_eq!(o.parse("SHOPX.processed.k"), None);
        assert!(OutcomeSubjects::for_filter("ORDER").is_none());
        assert!(OutcomeSubjects::for_filter("ORDER.>").is_none());
        assert_eq!(OutcomeSubjects::for_filter("a.*").unwrap().prefix, "a");
        assert!(
            OutcomeSubjects::for_filter("*.created").is_none(),
            "no wildcard in the prefix"
        );
        assert!(OutcomeSubjects::for_filter("a.*.created").is_none());
    }

    #[test]
    fn idempotency_keys_are_scoped_and_header_safe() {
        assert_eq!(idempotency_key("shop/eu", "o1"), "shop/eu:o1");
        assert_ne!(idempotency_key("a/b", "o1"), idempotency_key("a/c", "o1"));
        assert_eq!(idempotency_key("a b/c", "k"), "a%20b/c:k");
        assert_eq!(
            idempotency_key("1b4e28ba-2fa1/shop/eu", "o1"),
            "1b4e28ba-2fa1/shop/eu:o1"
        );
    }

    #[test]
    fn keeps_headers_name_a_final_outcome() {
        assert_eq!(
            parse_keeps("12/processed"),
            Some((12, OutcomeKind::Processed))
        );
        assert_eq!(
            parse_keeps(" 3/rejected "),
            Some((3, OutcomeKind::Rejected))
        );
        for bad in [
            "12/deadlettered",
            "12/kept",
            "0/processed",
            "x/processed",
            "12",
            "",
        ] {
            assert_eq!(parse_keeps(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_scope_is_the_streams_pin_then_the_pipeline_then_the_stream() {
        let pinned: std::collections::HashMap<String, String> = [(
            IDEMPOTENCY_SCOPE_METADATA.to_string(),
            "c1/shop/eu".to_string(),
        )]
        .into();
        let none = std::collections::HashMap::new();
        assert_eq!(
            idempotency_scope(&pinned, Some("shop/eu"), "ORDERS"),
            "c1/shop/eu"
        );
        assert_eq!(
            idempotency_scope(&none, Some("shop/eu"), "ORDERS"),
            "shop/eu"
        );
        assert_eq!(idempotency_scope(&none, None, "ORDERS"), "ORDERS");
        let empty: std::collections::HashMap<String, String> =
            [(IDEMPOTENCY_SCOPE_METADATA.to_string(), String::new())].into();
        assert_eq!(idempotency_scope(&empty, None, "ORDERS"), "ORDERS");
    }
}
