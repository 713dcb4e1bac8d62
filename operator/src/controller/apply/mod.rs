//! The apply step: JetStream objects, one function each, the workers'
//! NetworkPolicy and the Deployment.

pub(crate) mod deployment;
pub(crate) mod jetstream;
pub(crate) mod network_policy;
