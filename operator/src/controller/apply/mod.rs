//! The apply step: JetStream objects, one function each, and the Deployment.

pub(crate) mod deployment;
pub(crate) mod jetstream;
