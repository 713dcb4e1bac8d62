//! `orderctl` and `kubectl orderpipeline` as a library: one module per
//! subcommand, each owning its flags (`Args`), its binding to a pipeline named by
//! `--pipeline`, its run and its human and JSON printers. The tests use the
//! operations directly (`publish_orders`, `Audit::collect`, `dlq_replay`).

pub mod audit;
pub mod cli;
pub mod dlq;
pub mod pipeline_ref;
pub mod plugin;
pub mod publish;
pub mod report;
pub mod status;
pub mod target;

pub use dlq::{StoredDeadLetter, dlq_list, dlq_replay};
pub use publish::{PublishOptions, PublishReport, invalid_order, publish_orders, valid_order};
