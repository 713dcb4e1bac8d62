//! Every message of the contract survives an encode/decode round trip, and
//! decoding arbitrary bytes never panics.

use orderpipeline_proto::*;
use proptest::prelude::*;

fn order() -> OrderCreated {
    OrderCreated {
        order_id: "ord-1".into(),
        customer_id: "cust-1".into(),
        items: vec![
            OrderItem {
                product_id: "a".into(),
                quantity: 1,
                unit_price: 2.5,
            },
            OrderItem {
                product_id: "b".into(),
                quantity: 4,
                unit_price: 0.0,
            },
        ],
        total_amount: 2.5,
        created_at: Some(now()),
    }
}

#[test]
fn order_created_round_trips() {
    let o = order();
    assert_eq!(
        OrderCreated::decode(o.encode_to_vec().as_slice()).unwrap(),
        o
    );
}

#[test]
fn results_and_dead_letters_round_trip() {
    let p = OrderProcessed {
        order_id: "x".into(),
        delivery_count: 2,
        processed_at: Some(now()),
        ..Default::default()
    };
    assert_eq!(
        OrderProcessed::decode(p.encode_to_vec().as_slice()).unwrap(),
        p
    );
    let r = OrderRejected {
        order_id: "x".into(),
        reason_code: RejectReason::NoItems as i32,
        message: "an order needs at least one item".into(),
        ..Default::default()
    };
    assert_eq!(
        OrderRejected::decode(r.encode_to_vec().as_slice()).unwrap(),
        r
    );
    let d = DeadLetter {
        payload: order().encode_to_vec(),
        headers: vec![Header {
            name: "Nats-Msg-Id".into(),
            value: "ord-1".into(),
        }],
        error_class: ErrorClass::Permanent as i32,
        dead_lettered_at: Some(now()),
        ..Default::default()
    };
    assert_eq!(DeadLetter::decode(d.encode_to_vec().as_slice()).unwrap(), d);
}

#[test]
fn the_blog_field_numbers_are_kept() {
    // order_id=1 (tag 0x0a), customer_id=2 (0x12), items=3 (0x1a), total_amount=4 (fixed64: 0x21)
    let o = OrderCreated {
        order_id: "a".into(),
        customer_id: "b".into(),
        items: vec![OrderItem::default()],
        total_amount: 1.0,
        created_at: None,
    };
    let b = o.encode_to_vec();
    assert_eq!(&b[..6], &[0x0a, 1, b'a', 0x12, 1, b'b']);
    assert_eq!(&b[6..8], &[0x1a, 0]);
    assert_eq!(b[8], 0x21);
}

proptest! {
    #[test]
    fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = OrderCreated::decode(bytes.as_slice());
        let _ = DeadLetter::decode(bytes.as_slice());
    }
}
