//! Outputs. Each sink formats and delivers what a snapshot holds, nothing else; each runs on a
//! thread of its own behind a bounded queue ([`fanout`]), so a slow or stuck one (a pipe
//! nobody reads, an API that hangs) never delays the interval, the probes or another sink.

pub mod fanout;
pub mod json;
pub mod prometheus;
pub mod table;

#[cfg(test)]
mod hostile;

use std::time::Duration;

use crate::snapshot::Snapshot;

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("writing: {0}")]
    Io(#[from] std::io::Error),
    #[error("encoding: {0}")]
    Encode(#[from] serde_json::Error),
}

impl SinkError {
    /// The reader is gone for good (EPIPE: `observer | head`): no later write can succeed.
    pub fn is_closed(&self) -> bool {
        let kind = match self {
            Self::Io(e) => Some(e.kind()),
            Self::Encode(e) => e.io_error_kind(),
        };
        kind == Some(std::io::ErrorKind::BrokenPipe)
    }
}

/// One output. Its methods run on the sink's own thread, so they may block.
pub trait Sink: Send + 'static {
    /// Short name for logs and metrics ("json", "table", "prometheus", "mackerel").
    fn name(&self) -> &'static str;
    /// Formats and delivers one interval.
    fn emit(&mut self, snapshot: &Snapshot) -> Result<(), SinkError>;
    /// What waits inside the sink for delivery, if it keeps a queue of its own.
    fn backlog(&self) -> Option<u64> {
        None
    }
    /// What the sink's own bounds dropped since start, if it keeps a bounded queue.
    fn lost(&self) -> Option<u64> {
        None
    }
    /// Delivers what is still pending, within `timeout`: called once, after the last snapshot.
    fn flush(&mut self, _timeout: Duration) -> Result<(), SinkError> {
        Ok(())
    }
}
