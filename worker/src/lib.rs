//! The order worker (the data plane): consumes `OrderCreated` from a JetStream
//! pull consumer and gives every message exactly one outcome (processed,
//! rejected, dead-lettered), written once as the order's outcome message. The
//! protocol's decisions are the pure `orderpipeline_protocol` crate; this crate
//! carries them out against NATS.

pub mod config;
pub mod downstream;
pub mod handler;
pub mod health;
pub mod metrics;
pub mod run;
