//! The worker's decisions as pure functions: validate an order, pick a backoff,
//! classify a downstream answer, size a dead letter. What a delivery does next is
//! the protocol's state machine (`protocol.rs`); the async shell in `handler`
//! only carries these out.

use std::time::Duration;

use orderpipeline_proto::{OrderCreated, RejectReason};

/// Why an order is invalid: a business outcome (`OrderRejected`), not an error.
#[derive(Clone, Debug, PartialEq)]
pub struct Rejection {
    pub reason: RejectReason,
    pub message: String,
}

fn reject(reason: RejectReason, message: impl Into<String>) -> Rejection {
    Rejection {
        reason,
        message: message.into(),
    }
}

/// How many bytes of an original payload a dead letter can carry: the envelope
/// (its other fields, `overhead` bytes once encoded, plus the message headers)
/// must fit the server's `max_payload`. `None` when the whole payload fits.
pub fn dead_letter_payload_cap(
    payload_len: usize,
    overhead: usize,
    max_payload: usize,
) -> Option<usize> {
    // Room for the headers (ids, trace context, the original's) and protobuf framing.
    const MARGIN: usize = 8 * 1024;
    let room = max_payload.saturating_sub(overhead + MARGIN);
    (payload_len > room).then_some(room)
}

/// Whether a record of the protocol before v2 (its KV bucket's JSON) says the
/// order had its outcome: processed, rejected or dead_lettered.
pub fn legacy_record_is_final(value: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(value)
        .ok()
        .and_then(|r| r.get("state").and_then(|s| s.as_str()).map(str::to_string))
        .is_some_and(|s| matches!(s.as_str(), "processed" | "rejected" | "dead_lettered"))
}

/// Checks an order: an id of 1 to 256 bytes (any UTF-8), a customer, at least one item, quantities > 0, prices >= 0
/// (and finite), and `total_amount` equal to the sum of the items within a cent.
pub fn validate(order: &OrderCreated) -> Result<(), Rejection> {
    if order.order_id.trim().is_empty() {
        return Err(reject(RejectReason::MissingOrderId, "order_id is empty"));
    }
    if order.order_id.len() > crate::keys::MAX_ORDER_ID_BYTES {
        return Err(reject(
            RejectReason::InvalidOrderId,
            format!(
                "order_id is {} bytes long; the limit is {} bytes (UTF-8): use a shorter id",
                order.order_id.len(),
                crate::keys::MAX_ORDER_ID_BYTES
            ),
        ));
    }
    if order.customer_id.trim().is_empty() {
        return Err(reject(
            RejectReason::MissingCustomerId,
            "customer_id is empty",
        ));
    }
    if order.items.is_empty() {
        return Err(reject(
            RejectReason::NoItems,
            "an order needs at least one item",
        ));
    }
    let mut sum = 0.0f64;
    for (i, item) in order.items.iter().enumerate() {
        let n = i + 1;
        if item.product_id.trim().is_empty() {
            return Err(reject(
                RejectReason::MissingProductId,
                format!("item {n}: product_id is empty"),
            ));
        }
        if item.quantity <= 0 {
            return Err(reject(
                RejectReason::InvalidQuantity,
                format!("item {n}: quantity must be > 0, got {}", item.quantity),
            ));
        }
        if !item.unit_price.is_finite() || item.unit_price < 0.0 {
            return Err(reject(
                RejectReason::InvalidPrice,
                format!(
                    "item {n}: unit_price must be a number >= 0, got {}",
                    item.unit_price
                ),
            ));
        }
        sum += f64::from(item.quantity) * item.unit_price;
    }
    if !order.total_amount.is_finite() || (order.total_amount - sum).abs() >= 0.01 {
        return Err(reject(
            RejectReason::TotalMismatch,
            format!(
                "total_amount {:.2} != sum of items {sum:.2}",
                order.total_amount
            ),
        ));
    }
    Ok(())
}

/// How a downstream answer (or failure to answer) is treated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CallClass {
    Ok,
    /// Worth retrying: timeouts, connection errors, 408, 429, 5xx.
    Transient,
    /// Retrying cannot help: other 4xx (and 1xx/3xx, which we do not follow).
    Permanent,
}

pub fn classify_status(status: u16) -> CallClass {
    match status {
        200..=299 => CallClass::Ok,
        408 | 429 | 500..=599 => CallClass::Transient,
        _ => CallClass::Permanent,
    }
}

/// In-process retry delay before try `attempt + 1` (attempt counts from 1):
/// exponential from `initial`, capped at `max`, with "equal jitter" (half fixed,
/// half random) so retries of many orders spread out. `jitter` is in 0..1.
pub fn retry_backoff(attempt: u32, initial: Duration, max: Duration, jitter: f64) -> Duration {
    let exp = initial.saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1).min(30)));
    let capped = exp.min(max);
    let half = capped / 2;
    half + half.mul_f64(jitter.clamp(0.0, 1.0))
}

/// NAK delay after a failed delivery number `delivered` (from 1): grows with the
/// delivery count, never zero (a bare NAK redelivers at once).
pub fn nak_delay(delivered: u64, initial: Duration, max: Duration) -> Duration {
    let shift = u32::try_from(delivered.saturating_sub(1))
        .unwrap_or(u32::MAX)
        .min(30);
    initial
        .max(Duration::from_millis(1))
        .saturating_mul(2u32.saturating_pow(shift))
        .min(max.max(Duration::from_millis(1)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use orderpipeline_proto::OrderItem;

    fn order() -> OrderCreated {
        OrderCreated {
            order_id: "o1".into(),
            customer_id: "c1".into(),
            items: vec![
                OrderItem {
                    product_id: "p1".into(),
                    quantity: 2,
                    unit_price: 10.0,
                },
                OrderItem {
                    product_id: "p2".into(),
                    quantity: 1,
                    unit_price: 0.5,
                },
            ],
            total_amount: 20.5,
            created_at: None,
        }
    }

    #[test]
    fn a_dead_letter_keeps_the_whole_payload_only_when_it_fits() {
        let mib = 1024 * 1024;
        assert_eq!(dead_letter_payload_cap(100, 300, mib), None);
        assert_eq!(
            dead_letter_payload_cap(mib, 300, mib),
            Some(mib - 300 - 8192)
        );
        assert_eq!(dead_letter_payload_cap(mib - 300 - 8192, 300, mib), None);
        assert_eq!(dead_letter_payload_cap(10, 300, 1000), Some(0));
    }

    #[test]
    fn only_final_records_of_the_old_protocol_count() {
        for (json, fin) in [
            (r#"{"state":"processed","worker":"w"}"#, true),
            (r#"{"state":"rejected"}"#, true),
            (r#"{"state":"dead_lettered"}"#, true),
            (r#"{"state":"pending"}"#, false),
            ("not json", false),
            (r#"{"other":1}"#, false),
        ] {
            assert_eq!(legacy_record_is_final(json.as_bytes()), fin, "{json}");
        }
    }

    #[test]
    fn a_valid_order_passes() {
        validate(&order()).unwrap();
        let mut o = order();
        o.total_amount = 20.509; // within a cent
        validate(&o).unwrap();
    }

    #[test]
    fn each_rule_rejects_with_its_reason() {
        type Mutation = Box<dyn Fn(&mut OrderCreated)>;
        let cases: Vec<(Mutation, RejectReason)> = vec![
            (
                Box::new(|o| o.order_id.clear()),
                RejectReason::MissingOrderId,
            ),
            (
                Box::new(|o| o.order_id = "x".repeat(257)),
                RejectReason::InvalidOrderId,
            ),
            (
                Box::new(|o| o.customer_id = " ".into()),
                RejectReason::MissingCustomerId,
            ),
            (Box::new(|o| o.items.clear()), RejectReason::NoItems),
            (
                Box::new(|o| o.items[0].product_id.clear()),
                RejectReason::MissingProductId,
            ),
            (
                Box::new(|o| o.items[1].quantity = 0),
                RejectReason::InvalidQuantity,
            ),
            (
                Box::new(|o| o.items[1].quantity = -3),
                RejectReason::InvalidQuantity,
            ),
            (
                Box::new(|o| o.items[0].unit_price = -0.01),
                RejectReason::InvalidPrice,
            ),
            (
                Box::new(|o| o.items[0].unit_price = f64::NAN),
                RejectReason::InvalidPrice,
            ),
            (
                Box::new(|o| o.total_amount = 20.52),
                RejectReason::TotalMismatch,
            ),
            (
                Box::new(|o| o.total_amount = f64::INFINITY),
                RejectReason::TotalMismatch,
            ),
        ];
        for (mutate, reason) in cases {
            let mut o = order();
            mutate(&mut o);
            assert_eq!(validate(&o).unwrap_err().reason, reason, "{o:?}");
        }
    }

    #[test]
    fn any_utf8_id_up_to_the_limit_is_valid() {
        for id in [
            "ord\r\nNats-Msg-Id: x",
            "A:processed",
            "über ördér",
            "a.b.*.>",
            &"é".repeat(128),
        ] {
            let mut o = order();
            o.order_id = id.to_string();
            validate(&o).unwrap();
        }
        let mut o = order();
        o.order_id = "é".repeat(129);
        assert_eq!(
            validate(&o).unwrap_err().message,
            "order_id is 258 bytes long; the limit is 256 bytes (UTF-8): use a shorter id"
        );
    }

    #[test]
    fn rejection_messages_say_what_is_wrong() {
        let mut o = order();
        o.items[1].quantity = 0;
        assert_eq!(
            validate(&o).unwrap_err().message,
            "item 2: quantity must be > 0, got 0"
        );
    }

    #[test]
    fn statuses_are_classified() {
        for (s, c) in [
            (200, CallClass::Ok),
            (204, CallClass::Ok),
            (408, CallClass::Transient),
            (429, CallClass::Transient),
            (500, CallClass::Transient),
            (503, CallClass::Transient),
            (400, CallClass::Permanent),
            (404, CallClass::Permanent),
            (409, CallClass::Permanent),
            (302, CallClass::Permanent),
        ] {
            assert_eq!(classify_status(s), c, "{s}");
        }
    }

    #[test]
    fn retry_backoff_grows_caps_and_jitters_within_bounds() {
        let (i, m) = (Duration::from_millis(100), Duration::from_secs(1));
        assert_eq!(retry_backoff(1, i, m, 0.0), Duration::from_millis(50));
        assert_eq!(retry_backoff(1, i, m, 1.0), Duration::from_millis(100));
        assert_eq!(retry_backoff(3, i, m, 1.0), Duration::from_millis(400));
        assert_eq!(retry_backoff(10, i, m, 1.0), m);
        assert_eq!(
            retry_backoff(u32::MAX, i, m, 0.5),
            Duration::from_millis(750)
        );
    }

    #[test]
    fn nak_delay_grows_with_deliveries_and_is_never_zero() {
        let (i, m) = (Duration::from_secs(1), Duration::from_secs(60));
        assert_eq!(nak_delay(1, i, m), Duration::from_secs(1));
        assert_eq!(nak_delay(2, i, m), Duration::from_secs(2));
        assert_eq!(nak_delay(4, i, m), Duration::from_secs(8));
        assert_eq!(nak_delay(100, i, m), m);
        assert!(nak_delay(0, Duration::ZERO, Duration::ZERO) > Duration::ZERO);
    }

    proptest::proptest! {
        #[test]
        fn decode_and_validate_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..1024)) {
            use orderpipeline_proto::Message as _;
            if let Ok(o) = OrderCreated::decode(bytes.as_slice()) {
                let _ = validate(&o);
                let _ = crate::keys::order_key(&o.order_id);
            }
        }

        #[test]
        fn validate_never_panics_on_any_numbers(q in proptest::prelude::any::<i32>(), p in proptest::prelude::any::<f64>(), t in proptest::prelude::any::<f64>()) {
            let o = OrderCreated {
                order_id: "o".into(),
                customer_id: "c".into(),
                items: vec![OrderItem { product_id: "p".into(), quantity: q, unit_price: p }],
                total_amount: t,
                created_at: None,
            };
            let _ = validate(&o);
        }
    }
}
