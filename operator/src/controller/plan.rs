use crate::crd::{OrderPipeline, ReplicaMode};

/// The replica mode in force: the spec's, else Operator when bounds are set.
pub fn replica_mode(p: &OrderPipeline) -> ReplicaMode {
    let w = &p.spec.workers;
    w.scaling
        .mode
        .unwrap_or(if w.min_replicas.is_some() || w.max_replicas.is_some() {
            ReplicaMode::Operator
        } else {
            ReplicaMode::Manual
        })
}
