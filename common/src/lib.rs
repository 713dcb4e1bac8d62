//! Code that the operator and the worker share, so it lives once:
//! telemetry setup (JSON logs, OTLP traces from the standard `OTEL_*` variables).

pub mod telemetry;
