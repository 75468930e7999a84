//! Docker: the Engine API's answers decoded ([`decode`]), a small client of its unix socket
//! ([`client`], also the ECS source's helper and fallback), and the plain-Docker source,
//! containers grouped by Compose project ([`source`]).

pub mod client;
pub mod decode;
pub mod source;

pub(crate) use client::InspectCache;
pub use client::{DockerClient, DockerError};
pub use source::DockerSource;
