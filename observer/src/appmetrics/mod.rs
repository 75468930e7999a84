//! Each task's own application metrics on its own Mackerel host.

pub mod plugin;
pub mod plugin_config;
pub mod plugin_output;
