use std::time::Duration;

use orderpipeline_common::nats::NatsConnectError;

use crate::conditions::reasons;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API error: {0}")]
    Kube(#[source] kube::Error),
    #[error("finalizer error: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("NATS: {0}")]
    Nats(String),
}

impl Error {
    /// A short label for the failure metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kubernetes",
            Error::Finalizer(_) => "finalizer",
            Error::Nats(_) => "nats",
        }
    }
}

/// The requeue delays that are not a [`Cause`]'s.
pub(crate) mod retry {
    use std::time::Duration;

    /// A reconcile that failed unexpectedly (`error_policy`).
    pub(crate) const FAILED: Duration = Duration::from_secs(10);
    /// A pipeline that went through but is not Ready yet (e.g. workers starting):
    /// looked at again this soon, or at the resync interval if that is shorter.
    pub(crate) const NOT_READY_RESYNC: Duration = Duration::from_secs(5);
    /// How long a JetStream API request may take.
    pub(crate) const JETSTREAM_REQUEST: Duration = Duration::from_secs(5);
}

/// How a reconcile step ends the reconcile early: the pipeline is not ready
/// (a condition, an Event, a requeue), or an unexpected failure (`error_policy`).
#[derive(Debug)]
pub(crate) enum Stop {
    NotReady(NotReady),
    Failed(Error),
}

impl From<NotReady> for Stop {
    fn from(b: NotReady) -> Self {
        Stop::NotReady(b)
    }
}

impl From<Error> for Stop {
    fn from(e: Error) -> Self {
        Stop::Failed(e)
    }
}

impl From<kube::Error> for Stop {
    fn from(e: kube::Error) -> Self {
        Stop::Failed(Error::Kube(e))
    }
}

/// Why a reconcile cannot go on. Each cause knows its condition reason, how
/// soon to try again, and which conditions it takes down with Ready.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Cause {
    InvalidSpec,
    SecretMissing,
    SecretInvalid,
    KubernetesError,
    NatsUnreachable,
    NatsAuthFailed,
    NatsTlsFailed,
    JetStreamError,
    StreamConflict,
    StreamIncompatible,
    DeploymentInvalid,
}

impl Cause {
    /// Every cause, so each reason's counter exists (at 0) before it happens.
    pub(crate) const ALL: [Cause; 11] = [
        Cause::InvalidSpec,
        Cause::SecretMissing,
        Cause::SecretInvalid,
        Cause::KubernetesError,
        Cause::NatsUnreachable,
        Cause::NatsAuthFailed,
        Cause::NatsTlsFailed,
        Cause::JetStreamError,
        Cause::StreamConflict,
        Cause::StreamIncompatible,
        Cause::DeploymentInvalid,
    ];

    /// The Ready condition's reason (and the Warning Event's).
    pub(crate) fn reason(self) -> &'static str {
        match self {
            Cause::InvalidSpec => reasons::INVALID_SPEC,
            Cause::SecretMissing => reasons::SECRET_MISSING,
            Cause::SecretInvalid => reasons::SECRET_INVALID,
            Cause::KubernetesError => reasons::KUBERNETES_ERROR,
            Cause::NatsUnreachable => reasons::NATS_UNREACHABLE,
            Cause::NatsAuthFailed => reasons::NATS_AUTH_FAILED,
            Cause::NatsTlsFailed => reasons::NATS_TLS_FAILED,
            Cause::JetStreamError => reasons::JETSTREAM_ERROR,
            Cause::StreamConflict => reasons::STREAM_CONFLICT,
            Cause::StreamIncompatible => reasons::STREAM_INCOMPATIBLE,
            Cause::DeploymentInvalid => reasons::DEPLOYMENT_INVALID,
        }
    }

    /// How soon to try again (jittered by the caller): soon for what heals by
    /// itself, late for what needs a person to change something.
    pub(crate) fn retry(self) -> Duration {
        Duration::from_secs(match self {
            Cause::NatsUnreachable => 5,
            Cause::NatsAuthFailed | Cause::NatsTlsFailed => 10,
            Cause::SecretMissing
            | Cause::SecretInvalid
            | Cause::KubernetesError
            | Cause::JetStreamError => 15,
            Cause::StreamConflict => 30,
            Cause::StreamIncompatible | Cause::DeploymentInvalid => 60,
            Cause::InvalidSpec => 300,
        })
    }

    /// Whether StreamReady and ConsumerReady are False for the same cause:
    /// neither can be confirmed, and neither may keep a stale True.
    pub(crate) fn takes_down_topology(self) -> bool {
        matches!(
            self,
            Cause::NatsUnreachable
                | Cause::NatsAuthFailed
                | Cause::NatsTlsFailed
                | Cause::StreamConflict
                | Cause::StreamIncompatible
                | Cause::JetStreamError
        )
    }

    /// Whether the cached NATS connection is suspect and dropped.
    pub(crate) fn drops_connection(self) -> bool {
        matches!(self, Cause::NatsUnreachable | Cause::JetStreamError)
    }

    /// The cause of a failed NATS connect.
    pub(crate) fn of_connect(e: &NatsConnectError) -> Self {
        match e {
            NatsConnectError::Authentication { .. } => Cause::NatsAuthFailed,
            NatsConnectError::Tls { .. } => Cause::NatsTlsFailed,
            NatsConnectError::Options(_) => Cause::SecretInvalid,
            NatsConnectError::Unreachable { .. } => Cause::NatsUnreachable,
        }
    }
}

/// A cause and the message that says what to fix: ends the reconcile with
/// Ready=False.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct NotReady {
    pub(crate) cause: Cause,
    pub(crate) message: String,
}

impl NotReady {
    pub(crate) fn new(cause: Cause, message: impl Into<String>) -> Self {
        Self {
            cause,
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_cause_has_its_own_reason_and_a_retry() {
        let reasons: std::collections::BTreeSet<_> =
            Cause::ALL.iter().map(|c| c.reason()).collect();
        assert_eq!(reasons.len(), Cause::ALL.len(), "one reason per cause");
        for c in Cause::ALL {
            assert!(c.retry() >= Duration::from_secs(5), "{c:?}");
            // A dropped connection implies the topology cannot be confirmed.
            assert!(!c.drops_connection() || c.takes_down_topology(), "{c:?}");
        }
        // What needs a person waits longer than what heals by itself.
        assert!(Cause::InvalidSpec.retry() > Cause::NatsUnreachable.retry());
        assert!(!Cause::SecretMissing.takes_down_topology());
    }
}
