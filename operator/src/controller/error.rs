use std::time::Duration;

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

/// A reason + message that ends this reconcile with Ready=False.
pub(crate) struct Blocked {
    pub(crate) reason: &'static str,
    pub(crate) message: String,
    pub(crate) retry: Duration,
}

pub(crate) fn blocked(
    reason: &'static str,
    message: impl Into<String>,
    retry: Duration,
) -> Blocked {
    Blocked {
        reason,
        message: message.into(),
        retry,
    }
}
