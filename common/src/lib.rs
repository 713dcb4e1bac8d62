//! Code that the operator and the worker share, so it lives once:
//! telemetry setup, NATS connection options, names and subjects of the
//! pipeline's JetStream objects, and the topology (stream, DLQ, KV, consumer).

pub mod duration;
pub mod names;
pub mod nats;
pub mod signal;
pub mod telemetry;
pub mod topology;
