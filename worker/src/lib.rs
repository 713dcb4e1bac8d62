//! The order worker: consumes `OrderCreated` from a JetStream pull consumer and
//! gives every message exactly one outcome (processed, rejected, dead-lettered),
//! written once as the order's outcome message. Also the library behind `orderctl`.

pub mod audit;
pub mod cli;
pub mod config;
pub mod ctl;
pub mod decide;
pub mod downstream;
pub mod handler;
pub mod health;
pub mod metrics;
pub mod pipeline_ref;
pub mod protocol;
pub mod run;
pub mod trace;

#[cfg(test)]
mod model;
