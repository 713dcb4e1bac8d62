//! The OrderPipeline operator: CRD types, the pure builders (topology, Deployment,
//! conditions), the reconciler and its runtime wiring.

pub mod app;
pub mod conditions;
pub mod controller;
pub mod crd;
pub mod disruption;
pub mod drift;
pub mod events;
pub mod leader;
pub mod metrics;
pub mod netpol;
pub mod render;
pub mod scaling;
