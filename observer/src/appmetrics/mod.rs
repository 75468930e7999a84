//! Each task's and pod's own application metrics, on its own Mackerel host.
//!
//! A workload declares where its metrics are served (ECS `ECS_PROMETHEUS_*` Docker labels, pod
//! `prometheus.io/*` annotations); [`reach`] turns that and what the platform says about the
//! workload's addresses and ports into [`Target`]s. Once per Mackerel period [`scrape`] fetches
//! each target on a task of its own (a timeout, a body cap), [`prometheus`] parses the text
//! format or OpenMetrics into [`Samples`], and [`naming`] names them for Mackerel (counters as
//! per-second rates) and makes their graph definitions. The values go to the Mackerel worker,
//! which posts them on the workload's host like its own.
//!
//! A second source, the operator's mackerel-agent plugins a workload names (docs/plugins.md),
//! plugs in as a [`scrape::Collect`] for targets of [`Source::Plugin`] ([`plugin_collect`]):
//! its values come already named (`custom.` + the plugin's names, as mackerel-agent posts
//! them) with the plugin's own graph definitions; the schedule, caps, counts and posting are
//! the same.

pub mod naming;
pub mod plugin;
pub mod plugin_collect;
pub mod plugin_config;
pub mod plugin_output;
pub mod prometheus;
pub mod reach;
pub mod scrape;
pub mod stats;

use std::{net::IpAddr, sync::Arc, time::Duration};

use crate::mackerel::client::GraphDef;

pub use scrape::Scraper;
pub use stats::AppStats;

/// Where one container's metrics are served, and whose host they go to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Target {
    /// The Mackerel host's customIdentifier (the task ARN, the pod's namespace/name/uid key).
    pub host_key: String,
    /// For people and for observer's own metrics: "family:revision", "namespace/name".
    pub workload: String,
    /// The task's id or the pod's uid (a plugin's `{task}`).
    pub workload_id: String,
    pub container: String,
    /// Always the workload's own address (or the node's, for published and host ports).
    pub address: IpAddr,
    /// For a plugin, 0 when the workload lists no reachable port.
    pub port: u16,
    /// Starts with `/`, no scheme or authority; empty for a plugin.
    pub path: String,
    /// The first part of every name after `custom.`: sanitised, at most
    /// [`naming::MAX_PREFIX_CHARS`]. A plugin's own names have none: this is its name.
    pub prefix: String,
    /// What collects its samples.
    pub source: Source,
}

/// What collects a target's samples.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Source {
    /// `GET http://<address>:<port><path>`: the Prometheus text format or OpenMetrics.
    #[default]
    Prometheus,
    /// A command the node's operator configured (a mackerel-agent plugin), by its name.
    Plugin(String),
}

impl Target {
    /// For logs: the URL, or the plugin and the address it is given.
    pub fn describe(&self) -> String {
        match &self.source {
            Source::Prometheus => self.url(),
            Source::Plugin(name) => format!(
                "plugin {name} for {}",
                std::net::SocketAddr::new(self.address, self.port)
            ),
        }
    }

    /// The URL to scrape: only address, port and path, all checked.
    pub fn url(&self) -> String {
        format!(
            "http://{}{}",
            std::net::SocketAddr::new(self.address, self.port),
            self.path
        )
    }
}

/// How a sample's value is posted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// As served.
    Gauge,
    /// Only goes up (resets apart): posted as a per-second rate between two scrapes.
    Counter,
}

/// One value a source returned.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The metric name as served (`http_requests_total`).
    pub name: String,
    /// Label names and values as served, in any order.
    pub labels: Vec<(String, String)>,
    pub value: f64,
    pub kind: Kind,
}

/// A value a source named itself (a plugin's `custom.<name>`): posted as it is.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedValue {
    pub name: String,
    pub value: f64,
    /// Unix seconds of its own (a plugin's `use_plugin_timestamp`); None: the period's.
    pub time: Option<i64>,
}

/// What one scrape (or plugin run) returned, within the caps.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Samples {
    /// To be named and made rates ([`naming`]): an endpoint's.
    pub samples: Vec<Sample>,
    /// Named by the source itself: a plugin's.
    pub named: Vec<NamedValue>,
    /// The source's own graph definitions (a plugin's meta), each handed on once.
    pub graph_defs: Vec<GraphDef>,
    /// Samples left out by the series cap.
    pub dropped: usize,
    /// Lines that were not samples, comments or blank.
    pub bad_lines: usize,
    /// What went wrong beside the values (a plugin's meta run, its output cut at its cap):
    /// counted and logged as errors are, the values posted all the same.
    pub problems: Vec<Problem>,
}

/// Something that went wrong without costing the values, with its `cause` label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub cause: &'static str,
    pub message: String,
}

/// Settings of the application metrics; see the `--app-metrics*` flags.
#[derive(Debug, Clone)]
pub struct AppMetricsConfig {
    /// Scrape once per this (the Mackerel interval).
    pub period: Duration,
    /// Per scrape, connection included.
    pub timeout: Duration,
    /// Largest body read; a longer one is an error.
    pub max_body: usize,
    /// Most series per workload per scrape; the rest are dropped and counted.
    pub max_series: usize,
    /// The node's address for ports published on it (ECS bridge and host mode):
    /// 127.0.0.1 when observer runs in the host's network namespace, as the ECS daemon does.
    pub node_address: IpAddr,
    /// The operator's plugins (`--plugins-config`) workloads may name; empty: none.
    pub plugins: Arc<plugin::PluginSet>,
}

impl AppMetricsConfig {
    pub fn new(period: Duration) -> Self {
        Self {
            period,
            timeout: crate::defaults::APP_METRICS_TIMEOUT,
            max_body: crate::defaults::APP_METRICS_MAX_BODY,
            max_series: crate::defaults::APP_METRICS_MAX_SERIES,
            node_address: IpAddr::from([127, 0, 0, 1]),
            plugins: Arc::new(plugin::PluginSet::empty()),
        }
    }
}
