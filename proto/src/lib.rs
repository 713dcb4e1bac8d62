//! The order pipeline's protobuf contract: `orders.v1` (see `orders/v1/orders.proto`).
//!
//! `OrderCreated`/`OrderItem` are wire-compatible with the blog's Go design; the
//! result, rejection and dead-letter messages are ours.

/// Generated prost types for `orders.v1`.
pub mod orders {
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/orders.v1.rs"));
    }
}

pub use orders::v1::*;
pub use prost::Message;
pub use prost_types::Timestamp;

/// The `.proto` source, for tools that want to show or re-compile the contract.
pub const ORDERS_PROTO: &str = include_str!("../orders/v1/orders.proto");

/// Converts a system time to a protobuf timestamp.
pub fn timestamp(t: std::time::SystemTime) -> Timestamp {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// Now, as a protobuf timestamp.
pub fn now() -> Timestamp {
    timestamp(std::time::SystemTime::now())
}

impl ErrorClass {
    /// The class as a metric label and in orderctl's output (snake case, no prefix).
    pub fn label(self) -> &'static str {
        match self {
            ErrorClass::Undecodable => "undecodable",
            ErrorClass::Permanent => "permanent",
            ErrorClass::AttemptsExhausted => "attempts_exhausted",
            ErrorClass::Oversized => "oversized",
            ErrorClass::Unspecified => "unspecified",
        }
    }
}
