//! Condition types and reasons (constants, never literals in the reconciler), and
//! the helper that keeps `lastTransitionTime` when a condition's status is unchanged.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

pub mod types {
    pub const READY: &str = "Ready";
    pub const STREAM_READY: &str = "StreamReady";
    pub const CONSUMER_READY: &str = "ConsumerReady";
    pub const WORKERS_AVAILABLE: &str = "WorkersAvailable";
    pub const DUPLICATE_WINDOW: &str = "DuplicateWindowSufficient";
    pub const PAUSED: &str = "Paused";
    pub const SCALING: &str = "Scaling";
    pub const INPUTS_RETAINED: &str = "InputsRetained";
    pub const STALLED: &str = "Stalled";
}

pub mod reasons {
    pub const READY: &str = "PipelineReady";
    pub const RECONCILING: &str = "Reconciling";
    pub const INVALID_SPEC: &str = "InvalidSpec";
    pub const SECRET_MISSING: &str = "SecretMissing";
    pub const SECRET_INVALID: &str = "SecretInvalid";
    pub const NATS_UNREACHABLE: &str = "NatsUnreachable";
    pub const NATS_AUTH_FAILED: &str = "NatsAuthenticationFailed";
    pub const NATS_TLS_FAILED: &str = "NatsTlsFailed";
    pub const JETSTREAM_ERROR: &str = "JetStreamError";
    pub const STREAM_CONFLICT: &str = "StreamOwnedByAnotherPipeline";
    pub const STREAM_INCOMPATIBLE: &str = "ImmutableFieldChanged";
    pub const DEPLOYMENT_INVALID: &str = "DeploymentInvalid";
    pub const PAUSED: &str = "Paused";
    pub const RUNNING: &str = "Running";
    pub const SCALING_ACTIVE: &str = "ScalingActive";
    pub const LAG_UNAVAILABLE: &str = "LagUnavailable";
    pub const MANUAL: &str = "ManualReplicas";
    pub const EXTERNAL: &str = "ExternalScaler";
    pub const DRIFT_CORRECTED: &str = "DriftCorrected";
    pub const STREAM_READY: &str = "StreamReady";
    pub const CONSUMER_READY: &str = "ConsumerReady";
    pub const WORKERS_AVAILABLE: &str = "WorkersAvailable";
    pub const WORKERS_UNAVAILABLE: &str = "WorkersUnavailable";
    pub const WINDOW_COVERS: &str = "WindowCoversRedelivery";
    pub const WINDOW_TOO_SHORT: &str = "WindowShorterThanRedelivery";
    pub const KUBERNETES_ERROR: &str = "KubernetesError";
    pub const INPUTS_RETAINED: &str = "InputsRetained";
    pub const INPUTS_REMOVED_UNPROCESSED: &str = "InputsRemovedUnprocessed";
    pub const OLDEST_UNPROCESSED_AGING: &str = "OldestUnprocessedAging";
    pub const CONSUMER_STALLED: &str = "ConsumerStalled";
    pub const CONSUMER_WAITING: &str = "ConsumerWaiting";
    pub const CONSUMER_MOVING: &str = "ConsumerMoving";
    pub const NOTHING_WAITING: &str = "NothingWaiting";
}

/// Builds a condition.
pub fn condition(
    type_: &str,
    ok: bool,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
) -> Condition {
    Condition {
        type_: type_.to_string(),
        status: if ok { "True" } else { "False" }.to_string(),
        reason: reason.to_string(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time: Time(k8s_openapi::jiff::Timestamp::now()),
    }
}

/// Merges `new` into `existing`: a condition whose status did not change keeps its
/// `lastTransitionTime`; others are replaced or added. Order follows `new`, then
/// conditions only in `existing` (kept as they are).
/// Whether the condition `type_` is there and True.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    conditions
        .iter()
        .any(|c| c.type_ == type_ && c.status == "True")
}

pub fn merge(existing: &[Condition], new: Vec<Condition>) -> Vec<Condition> {
    let mut out: Vec<Condition> = new
        .into_iter()
        .map(|mut c| {
            if let Some(old) = existing.iter().find(|o| o.type_ == c.type_)
                && old.status == c.status
            {
                c.last_transition_time = old.last_transition_time.clone();
            }
            c
        })
        .collect();
    for old in existing {
        if !out.iter().any(|c| c.type_ == old.type_) {
            out.push(old.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(c: &mut Condition, secs: i64) {
        c.last_transition_time = Time(k8s_openapi::jiff::Timestamp::from_second(secs).unwrap());
    }

    #[test]
    fn unchanged_status_keeps_transition_time() {
        let mut old = condition(types::READY, true, reasons::READY, "ok", Some(1));
        at(&mut old, 100);
        let new = condition(types::READY, true, reasons::READY, "still ok", Some(2));
        let merged = merge(&[old.clone()], vec![new]);
        assert_eq!(merged[0].last_transition_time, old.last_transition_time);
        assert_eq!(merged[0].message, "still ok");
        assert_eq!(merged[0].observed_generation, Some(2));
    }

    #[test]
    fn changed_status_moves_transition_time() {
        let mut old = condition(types::READY, true, reasons::READY, "ok", Some(1));
        at(&mut old, 100);
        let new = condition(
            types::READY,
            false,
            reasons::NATS_UNREACHABLE,
            "down",
            Some(1),
        );
        let merged = merge(&[old.clone()], vec![new]);
        assert_ne!(merged[0].last_transition_time, old.last_transition_time);
        assert_eq!(merged[0].reason, reasons::NATS_UNREACHABLE);
    }

    #[test]
    fn conditions_not_reported_again_are_kept() {
        let old = condition(
            types::WORKERS_AVAILABLE,
            true,
            reasons::WORKERS_AVAILABLE,
            "2/2",
            None,
        );
        let merged = merge(
            &[old],
            vec![condition(
                types::READY,
                false,
                reasons::INVALID_SPEC,
                "x",
                None,
            )],
        );
        assert_eq!(merged.len(), 2);
    }
}
