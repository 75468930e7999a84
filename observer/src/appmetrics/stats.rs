//! observer's own counts of the application metrics, for its Prometheus endpoint:
//! `observer_app_scrape_errors_total{workload,cause}` and
//! `observer_app_series_dropped_total{workload}`.
//!
//! Workloads are the platform's to create, so the label sets are bounded: a workload's series go
//! when its last target does, and past [`MAX_WORKLOADS`] distinct workloads the rest count
//! under `workload="_other"`.

use std::sync::{Arc, Mutex};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};

/// Most workloads with series of their own.
pub const MAX_WORKLOADS: usize = 1000;
const OTHER: &str = "_other";

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ErrorLabels {
    workload: String,
    /// "connect", "timeout", "status", "body", "reach", and a plugin run's "plugin_*".
    cause: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct WorkloadLabel {
    workload: String,
}

/// Shared by the scraper (which counts) and the Prometheus sink (which shows); cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct AppStats {
    errors: Family<ErrorLabels, Counter>,
    dropped: Family<WorkloadLabel, Counter>,
    /// Workloads that have series, to bound them and to remove them.
    known: Arc<Mutex<Known>>,
}

#[derive(Debug, Default)]
struct Known {
    workloads: Vec<String>,
    /// The causes each has counted, to remove their series.
    causes: Vec<(String, &'static str)>,
}

impl AppStats {
    /// Adds the two families to `registry` (whose prefix is `observer`).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "app_scrape_errors",
            "Failed scrapes of a workload's metrics endpoint and runs of the plugins it names, by cause",
            self.errors.clone(),
        );
        registry.register(
            "app_series_dropped",
            "Series of a workload's metrics left out by --app-metrics-max-series, a plugin's max_series or too long a name",
            self.dropped.clone(),
        );
    }

    pub fn error(&self, workload: &str, cause: &'static str) {
        let workload = self.label(workload);
        {
            let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
            if !known
                .causes
                .iter()
                .any(|(w, c)| *w == workload && *c == cause)
            {
                known.causes.push((workload.clone(), cause));
            }
        }
        self.errors
            .get_or_create(&ErrorLabels { workload, cause })
            .inc();
    }

    pub fn dropped(&self, workload: &str, n: usize) {
        if n > 0 {
            let workload = self.label(workload);
            self.dropped
                .get_or_create(&WorkloadLabel { workload })
                .inc_by(n as u64);
        }
    }

    /// Removes the series of workloads not in `live` (`_other` stays).
    pub fn retain(&self, live: &std::collections::HashSet<&str>) {
        let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        let Known { workloads, causes } = &mut *known;
        workloads.retain(|w| {
            let keep = live.contains(w.as_str());
            if !keep {
                self.dropped.remove(&WorkloadLabel {
                    workload: w.clone(),
                });
            }
            keep
        });
        causes.retain(|(w, cause)| {
            let keep = w == OTHER || workloads.contains(w);
            if !keep {
                self.errors.remove(&ErrorLabels {
                    workload: w.clone(),
                    cause,
                });
            }
            keep
        });
    }

    fn label(&self, workload: &str) -> String {
        let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        if known.workloads.iter().any(|w| w == workload) {
            return workload.to_owned();
        }
        if known.workloads.len() >= MAX_WORKLOADS {
            return OTHER.to_owned();
        }
        known.workloads.push(workload.to_owned());
        workload.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(stats: &AppStats) -> String {
        let mut registry = Registry::with_prefix("observer");
        stats.register(&mut registry);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        out
    }

    #[test]
    fn counted_then_removed_with_the_workload() {
        let stats = AppStats::default();
        stats.error("web:3", "timeout");
        stats.error("web:3", "timeout");
        stats.dropped("web:3", 7);
        // A cause of another source (a plugin runner's) goes the same way.
        stats.error("web:3", "plugin_timeout");
        let text = render(&stats);
        assert!(
            text.contains(
                r#"observer_app_scrape_errors_total{workload="web:3",cause="timeout"} 2"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"observer_app_series_dropped_total{workload="web:3"} 7"#),
            "{text}"
        );
        stats.retain(&Default::default());
        assert!(!render(&stats).contains("web:3"));
    }

    #[test]
    fn workloads_are_bounded() {
        let stats = AppStats::default();
        for i in 0..MAX_WORKLOADS + 5 {
            stats.error(&format!("w{i}"), "connect");
        }
        let text = render(&stats);
        assert_eq!(
            text.matches("observer_app_scrape_errors_total{").count(),
            MAX_WORKLOADS + 1
        );
        assert!(
            text.contains(r#"workload="_other",cause="connect"} 5"#),
            "{text}"
        );
    }
}
