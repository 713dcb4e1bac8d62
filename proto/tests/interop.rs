//! The contract is interoperable, not just self-consistent: bytes produced by
//! Python's protobuf implementation decode with prost, and prost's bytes decode in
//! Python, with every field intact. Needs the interpreter `hack/python-env` prints
//! (`make test` passes it as ORDERPIPE_PYTHON).

use std::io::Write as _;
use std::process::{Command, Stdio};

use orderpipeline_proto::*;

fn python() -> String {
    std::env::var("ORDERPIPE_PYTHON").unwrap_or_else(|_| {
        panic!("ORDERPIPE_PYTHON is not set: run `make test`, or `export ORDERPIPE_PYTHON=$(hack/python-env)`")
    })
}

fn script() -> (String, String) {
    // At run time (cargo sets it for tests): a shared target dir may hold a binary
    // compiled from another clone, whose compile-time path no longer exists.
    let root = format!(
        "{}/..",
        std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").into())
    );
    (
        format!("{root}/hack/interop/orders_interop.py"),
        format!("{root}/proto"),
    )
}

fn hex_decode(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex from the script"))
        .collect()
}

fn hex_encode(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn python_encoded_messages_decode_with_prost() {
    let (script, root) = script();
    let out = Command::new(python())
        .args([&script, &root, "encode"])
        .output()
        .expect("run the Python interop script");
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON from the script");
    let bytes = |k: &str| hex_decode(v[k]["hex"].as_str().expect("hex field"));

    let created = OrderCreated::decode(bytes("created").as_slice()).expect("OrderCreated");
    assert_eq!(created.order_id, "ord-42");
    assert_eq!(created.customer_id, "cust-7");
    assert_eq!(created.total_amount, 25.5);
    assert_eq!(created.items.len(), 2);
    assert_eq!(created.items[0].product_id, "sku-1");
    assert_eq!(created.items[0].quantity, 2);
    assert_eq!(created.items[0].unit_price, 10.0);
    assert_eq!(created.items[1].unit_price, 5.5);
    assert_eq!(
        created.created_at,
        Some(Timestamp {
            seconds: 1_700_000_000,
            nanos: 123
        })
    );

    let rejected = OrderRejected::decode(bytes("rejected").as_slice()).expect("OrderRejected");
    assert_eq!(rejected.reason_code(), RejectReason::TotalMismatch);
    assert_eq!(rejected.message, "total 10.00 != sum of items 12.00");

    let dead = DeadLetter::decode(bytes("dead").as_slice()).expect("DeadLetter");
    assert_eq!(dead.error_class(), ErrorClass::Undecodable);
    assert_eq!(dead.payload, b"\xff\x00garbage");
    assert_eq!(dead.original_stream_sequence, 99);
    assert_eq!(dead.headers.len(), 2);
    assert_eq!(dead.headers[1].name, "traceparent");

    let processed = OrderProcessed::decode(bytes("processed").as_slice()).expect("OrderProcessed");
    assert_eq!(processed.delivery_count, 3);
    assert_eq!(processed.worker, "pod-a");
}

#[test]
fn prost_encoded_messages_decode_in_python() {
    let created = OrderCreated {
        order_id: "ord-1".into(),
        customer_id: "cust-1".into(),
        items: vec![OrderItem {
            product_id: "sku-9".into(),
            quantity: 3,
            unit_price: 1.25,
        }],
        total_amount: 3.75,
        created_at: Some(Timestamp {
            seconds: 1_800_000_000,
            nanos: 0,
        }),
    };
    let dead = DeadLetter {
        original_subject: "ORDER.created".into(),
        payload: vec![0, 1, 2, 255],
        error_class: ErrorClass::AttemptsExhausted as i32,
        delivery_count: 5,
        ..Default::default()
    };
    let input = serde_json::json!([
        {"type": "OrderCreated", "hex": hex_encode(&created.encode_to_vec())},
        {"type": "DeadLetter", "hex": hex_encode(&dead.encode_to_vec())},
    ]);
    let (script, root) = script();
    let mut child = Command::new(python())
        .args([&script, &root, "decode"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the Python interop script");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.to_string().as_bytes())
        .expect("write to python");
    let out = child.wait_with_output().expect("python output");
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON from the script");
    assert_eq!(v[0]["order_id"], "ord-1");
    assert_eq!(v[0]["items"][0]["product_id"], "sku-9");
    assert_eq!(v[0]["items"][0]["quantity"], 3);
    assert_eq!(v[0]["items"][0]["unit_price"], 1.25);
    assert_eq!(v[0]["total_amount"], 3.75);
    assert_eq!(v[0]["created_at"], "2027-01-15T08:00:00Z");
    assert_eq!(v[1]["error_class"], "ERROR_CLASS_ATTEMPTS_EXHAUSTED");
    assert_eq!(v[1]["payload"], "AAEC/w==");
    assert_eq!(v[1]["delivery_count"], "5");
}
