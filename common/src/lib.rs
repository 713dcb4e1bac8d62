//! Code that the operator and the worker share, so it lives once:
//! telemetry setup and W3C trace context in NATS headers, NATS connection
//! options and flags, minted NATS identities (operator mode), names and subjects of the
//! pipeline's JetStream objects, the topology (stream, DLQ, KV, consumer), and
//! the version and commit the binaries are built from.

pub mod duration;
pub mod flags;
pub mod names;
pub mod nats;
pub mod natsauth;
pub mod signal;
pub mod telemetry;
pub mod topology;
pub mod trace;
pub mod version;
