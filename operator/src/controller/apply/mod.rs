//! The apply step: JetStream objects, one function each, the workers'
//! NetworkPolicy and PodDisruptionBudget, and the Deployment.

pub(crate) mod deployment;
pub(crate) mod disruption_budget;
pub(crate) mod jetstream;
pub(crate) mod network_policy;
pub(crate) mod owned;
