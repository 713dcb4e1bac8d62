//! The outcome protocol (v2), with no I/O: what the worker decides, in what order
//! it acts, how it names an input's outcome, and what "exactly one outcome" means.
//!
//! - [`keys`]: the outcome key of an input, the outcome subjects
//!   `<prefix>.<kind>.<key>`, the Idempotency-Key and the protocol's headers.
//! - [`decide`]: the pure decisions (validation, error classes, backoff).
//! - [`machine`]: one delivery's steps as a state machine; the worker's handler
//!   carries them out against NATS, the model checker (`tests/model.rs`) against a
//!   model of the stream with faults.
//! - [`replay`]: whether a replayed input may supersede the letter it names.
//! - [`promise`]: the promise as one check over an order's outcome chain, used
//!   by the model checker, `orderctl audit` and the worker's tests.

pub mod decide;
pub mod keys;
pub mod machine;
pub mod promise;
pub mod replay;
