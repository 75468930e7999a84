//! Outputs. Each sink receives every snapshot, in order, once per interval.
//!
//! `emit` must not block for long: a sink that talks to a network service owns a task of its
//! own and hands the snapshot to it.

pub mod json;
pub mod prometheus;
pub mod table;

use crate::snapshot::Snapshot;

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("writing: {0}")]
    Io(#[from] std::io::Error),
    #[error("encoding: {0}")]
    Encode(#[from] serde_json::Error),
}

pub trait Sink: Send {
    /// Short name for logs ("json", "prometheus", "mackerel").
    fn name(&self) -> &'static str;
    fn emit(&mut self, snapshot: &Snapshot) -> Result<(), SinkError>;
}
