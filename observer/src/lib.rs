//! observer: per-container and per-task traffic, measured by eBPF at the cgroup v2 root.
//!
//! Data flows one way per interval: kernel maps -> [`traffic`] reader -> [`collect`] ->
//! [`snapshot`] -> [`sink`]s.

pub mod cgroupfs;
pub mod collect;
pub mod config;
pub mod delta;
pub mod preflight;
pub mod programs;
pub mod run;
pub mod sink;
pub mod snapshot;
pub mod traffic;
