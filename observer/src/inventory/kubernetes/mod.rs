//! Kubernetes: the kubelet's `/pods` decoded ([`decode`]), and the source that asks the
//! kubelet of this node ([`source`]).

pub mod decode;
pub mod source;

pub use decode::{KubeletError, Pod, PodList};
pub use source::KubeletSource;
