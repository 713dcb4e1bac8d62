//! `/health` (the blog's: 503 when NATS is not connected), `/livez`, `/readyz`
//! (connected and consumer bound, with the reason when not) and `/metrics`.

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use prometheus_client::registry::Registry;

/// What the probes report; written by the consumer loop.
#[derive(Default)]
pub struct Readiness {
    /// `None` when ready, otherwise why not.
    pub not_ready: Mutex<Option<String>>,
}

impl Readiness {
    pub fn set_ready(&self) {
        if let Ok(mut g) = self.not_ready.lock() {
            *g = None;
        }
    }
    pub fn set_not_ready(&self, why: impl Into<String>) {
        if let Ok(mut g) = self.not_ready.lock() {
            *g = Some(why.into());
        }
    }
    pub fn reason(&self) -> Option<String> {
        self.not_ready
            .lock()
            .map(|g| g.clone())
            .unwrap_or_else(|_| Some("state lock poisoned".into()))
    }
}

#[derive(Clone)]
pub struct HealthState {
    pub client: Arc<std::sync::OnceLock<async_nats::Client>>,
    pub readiness: Arc<Readiness>,
    pub registry: Arc<Registry>,
}

fn connected(s: &HealthState) -> bool {
    s.client
        .get()
        .is_some_and(|c| c.connection_state() == async_nats::connection::State::Connected)
}

async fn health(State(s): State<HealthState>) -> (StatusCode, &'static str) {
    if connected(&s) {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "NATS not connected\n")
    }
}

async fn readyz(State(s): State<HealthState>) -> (StatusCode, String) {
    if !connected(&s) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: NATS not connected\n".into(),
        );
    }
    match s.readiness.reason() {
        None => (StatusCode::OK, "ready\n".into()),
        Some(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

async fn metrics(State(s): State<HealthState>) -> ([(&'static str, &'static str); 1], String) {
    (
        [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
        crate::metrics::render(&s.registry),
    )
}

pub fn router(state: HealthState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}
