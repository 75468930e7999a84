//! Mackerel names for a workload's own metrics, and their graph definitions.
//!
//! A sample `<metric>{<label>="<value>",...}` of a target with prefix `<prefix>` is posted as
//!
//! ```text
//! custom.<prefix>.<metric>.<value of the first label>.<value of the next>...   (labels by name)
//! custom.<prefix>.<metric>.value                                               (no labels)
//! ```
//!
//! Every part is sanitised as the container agent sanitises container names (every character
//! but `A-Z a-z 0-9 _ -` becomes `_`, so a dot in a value cannot add a part; an empty part is
//! `_`). Label values go in the order of their label names, so the same series keeps its name
//! whatever order the exporter writes labels in. No port or address is part of a name: a task's
//! graphs follow the task, and a role graph can sum every task's `custom.<prefix>.<metric>.*`.
//! A name longer than [`MAX_NAME_CHARS`] is dropped (counted with the capped series).
//!
//! Gauges are posted as served. Counters are posted as per-second rates between two scrapes,
//! as mackerel-agent's diff metrics are: the difference over the seconds between the two
//! periods (scrapes start just after each period boundary); nothing on the first scrape, and
//! nothing when the counter went down (a restart).
//!
//! One graph definition per metric and label count: `custom.<prefix>.<metric>` (one line per
//! label value, `*`) for one label; with more labels one graph per value of the first ones (`#`)
//! and a line per value of the last (`*`); for no labels, the one line `value`.

use std::collections::{HashMap, HashSet};

use super::{Kind, Sample, Target};
use crate::mackerel::client::{GraphDef, GraphMetric};

/// Longest prefix.
pub const MAX_PREFIX_CHARS: usize = 64;
/// Longest metric name posted.
pub const MAX_NAME_CHARS: usize = 255;
/// Most graph definitions remembered as posted (then forgotten, and posted again: harmless).
const MAX_GRAPHS_REMEMBERED: usize = 10_000;

/// One name part: every character but `A-Z a-z 0-9 _ -` becomes `_`; empty becomes `_`.
pub fn part(s: &str) -> String {
    if s.is_empty() {
        return "_".into();
    }
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// A prefix from a label (or a container name): sanitised, cut to [`MAX_PREFIX_CHARS`];
/// None when empty.
pub fn prefix(raw: &str) -> Option<String> {
    let raw = raw.trim();
    if raw.is_empty() {
        return None;
    }
    Some(part(raw).chars().take(MAX_PREFIX_CHARS).collect())
}

/// The Mackerel name of `sample`, or None when it would be too long.
pub fn series_name(prefix: &str, sample: &Sample) -> Option<String> {
    let mut name = format!("custom.{prefix}.{}", part(&sample.name));
    if sample.labels.is_empty() {
        name.push_str(".value");
    } else {
        let mut labels: Vec<&(String, String)> = sample.labels.iter().collect();
        labels.sort();
        for (_, value) in labels {
            name.push('.');
            name.push_str(&part(value));
        }
    }
    (name.len() <= MAX_NAME_CHARS).then_some(name)
}

/// The graph definition of `sample`'s metric.
pub fn graph_def(prefix: &str, sample: &Sample) -> GraphDef {
    let metric = part(&sample.name);
    let base = format!("custom.{prefix}.{metric}");
    let (name, line, display) = match sample.labels.len() {
        0 => (base.clone(), format!("{base}.value"), metric.clone()),
        n => {
            let graph = format!("{base}{}", ".#".repeat(n - 1));
            (graph.clone(), format!("{graph}.*"), "%1".to_owned())
        }
    };
    let display_name = match sample.kind {
        Kind::Gauge => format!("{prefix} {metric}"),
        Kind::Counter => format!("{prefix} {metric} per second"),
    };
    GraphDef {
        name,
        display_name,
        unit: "float".into(),
        metrics: vec![GraphMetric {
            name: line,
            display_name: display,
            is_stacked: false,
        }],
    }
}

/// Turns samples into posted values: the previous value of each counter, per target, for
/// rates; and which graph definitions were handed out already.
#[derive(Debug, Default)]
pub struct Namer {
    previous: HashMap<Target, HashMap<String, (f64, i64)>>,
    graphs: HashSet<String>,
}

/// One target's scrape as Mackerel values.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Named {
    pub values: Vec<(String, f64)>,
    /// Graph definitions not handed out before.
    pub graph_defs: Vec<GraphDef>,
    /// Samples whose name was too long.
    pub too_long: usize,
}

impl Namer {
    /// The values of one scrape of `target`, of the period starting at `at` (Unix seconds).
    pub fn name(&mut self, target: &Target, samples: &[Sample], at: i64) -> Named {
        let mut out = Named::default();
        let before = self.previous.remove(target).unwrap_or_default();
        let mut now = HashMap::with_capacity(samples.len());
        for sample in samples {
            let Some(name) = series_name(&target.prefix, sample) else {
                out.too_long += 1;
                continue;
            };
            let def = graph_def(&target.prefix, sample);
            if !self.graphs.contains(&def.name) {
                if self.graphs.len() >= MAX_GRAPHS_REMEMBERED {
                    self.graphs.clear();
                }
                self.graphs.insert(def.name.clone());
                out.graph_defs.push(def);
            }
            match sample.kind {
                Kind::Gauge => out.values.push((name, sample.value)),
                Kind::Counter => {
                    if let Some(rate) = before
                        .get(&name)
                        .and_then(|&(v, t)| rate(v, t, sample.value, at))
                    {
                        out.values.push((name.clone(), rate));
                    }
                    now.insert(name, (sample.value, at));
                }
            }
        }
        self.previous.insert(target.clone(), now);
        out
    }

    /// Forgets the counters of targets no longer listed.
    pub fn retain(&mut self, live: &HashSet<&Target>) {
        self.previous.retain(|t, _| live.contains(t));
    }
}

/// Per second from `(v0, t0)` to `(v1, t1)` (Unix seconds); None after a reset or without
/// time between.
pub fn rate(v0: f64, t0: i64, v1: f64, t1: i64) -> Option<f64> {
    let secs = t1.checked_sub(t0).filter(|s| *s > 0)? as f64;
    (v1 >= v0).then(|| (v1 - v0) / secs)
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;

    fn sample(name: &str, labels: &[(&str, &str)], value: f64, kind: Kind) -> Sample {
        Sample {
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            value,
            kind,
        }
    }

    fn target(prefix: &str) -> Target {
        Target {
            host_key: "k".into(),
            workload: "w".into(),
            workload_id: "id-w".into(),
            container: "c".into(),
            address: IpAddr::from([127, 0, 0, 1]),
            port: 32768,
            path: "/metrics".into(),
            prefix: prefix.into(),
            source: Default::default(),
        }
    }

    #[test]
    fn names_fold_labels_by_label_name() {
        let s = sample(
            "http_requests_total",
            &[("method", "GET"), ("code", "200")],
            1.0,
            Kind::Counter,
        );
        assert_eq!(
            series_name("web", &s).unwrap(),
            "custom.web.http_requests_total.200.GET"
        );
        let swapped = sample(
            "http_requests_total",
            &[("code", "200"), ("method", "GET")],
            1.0,
            Kind::Counter,
        );
        assert_eq!(series_name("web", &s), series_name("web", &swapped));
        let s = sample("go:goroutines", &[], 1.0, Kind::Gauge);
        assert_eq!(
            series_name("web", &s).unwrap(),
            "custom.web.go_goroutines.value"
        );
        let s = sample("m", &[("path", "/api/v1.2"), ("e", "")], 1.0, Kind::Gauge);
        assert_eq!(series_name("p", &s).unwrap(), "custom.p.m._._api_v1_2");
        let s = sample("m", &[("v", &"x".repeat(300))], 1.0, Kind::Gauge);
        assert_eq!(series_name("p", &s), None);
        assert_eq!(prefix(" my.job "), Some("my_job".into()));
        assert_eq!(prefix("  "), None);
    }

    #[test]
    fn graph_defs_use_wildcards_for_label_values() {
        let g = graph_def("web", &sample("temp", &[], 1.0, Kind::Gauge));
        assert_eq!(
            (g.name.as_str(), g.metrics[0].name.as_str()),
            ("custom.web.temp", "custom.web.temp.value")
        );
        let g = graph_def(
            "web",
            &sample("req_total", &[("code", "200")], 1.0, Kind::Counter),
        );
        assert_eq!(
            (g.name.as_str(), g.metrics[0].name.as_str()),
            ("custom.web.req_total", "custom.web.req_total.*")
        );
        assert_eq!(g.display_name, "web req_total per second");
        let g = graph_def(
            "web",
            &sample(
                "req_total",
                &[("code", "200"), ("m", "GET")],
                1.0,
                Kind::Counter,
            ),
        );
        assert_eq!(
            (g.name.as_str(), g.metrics[0].name.as_str()),
            ("custom.web.req_total.#", "custom.web.req_total.#.*")
        );
        // Each name a posted series matches: the graph's name is the series name less its last part.
        let s = sample(
            "req_total",
            &[("code", "200"), ("m", "GET")],
            1.0,
            Kind::Counter,
        );
        let series = series_name("web", &s).unwrap();
        let (graph, _) = series.rsplit_once('.').unwrap();
        assert_eq!(graph.split('.').count(), g.name.split('.').count());
    }

    #[test]
    fn counters_become_rates_between_scrapes_gauges_stay() {
        let mut namer = Namer::default();
        let t = target("app");
        let t0 = 1_767_225_600;
        let first = namer.name(
            &t,
            &[
                sample("req_total", &[], 100.0, Kind::Counter),
                sample("temp", &[], 21.5, Kind::Gauge),
            ],
            t0,
        );
        assert_eq!(
            first.values,
            [("custom.app.temp.value".to_string(), 21.5)],
            "no rate on the first scrape"
        );
        assert_eq!(first.graph_defs.len(), 2);
        let second = namer.name(
            &t,
            &[
                sample("req_total", &[], 700.0, Kind::Counter),
                sample("temp", &[], 22.0, Kind::Gauge),
            ],
            t0 + 60,
        );
        assert_eq!(
            second.values,
            [
                ("custom.app.req_total.value".to_string(), 10.0),
                ("custom.app.temp.value".to_string(), 22.0)
            ]
        );
        assert!(second.graph_defs.is_empty(), "graph definitions once");
        // A restart: the counter went down, no point; the next one counts from there.
        let third = namer.name(
            &t,
            &[sample("req_total", &[], 5.0, Kind::Counter)],
            t0 + 120,
        );
        assert!(third.values.is_empty());
        let fourth = namer.name(
            &t,
            &[sample("req_total", &[], 35.0, Kind::Counter)],
            t0 + 150,
        );
        assert_eq!(
            fourth.values,
            [("custom.app.req_total.value".to_string(), 1.0)]
        );

        // Another target's counter of the same name is its own.
        let other = target("other");
        assert!(namer
            .name(
                &other,
                &[sample("req_total", &[], 1e6, Kind::Counter)],
                t0 + 150
            )
            .values
            .is_empty());
        namer.retain(&HashSet::from([&other]));
        assert!(
            namer
                .name(
                    &t,
                    &[sample("req_total", &[], 40.0, Kind::Counter)],
                    t0 + 160
                )
                .values
                .is_empty(),
            "forgotten"
        );
    }

    #[test]
    fn rates() {
        let t0 = 1_767_225_600;
        assert_eq!(rate(10.0, t0, 20.0, t0 + 5), Some(2.0));
        assert_eq!(rate(10.0, t0, 9.0, t0 + 5), None);
        assert_eq!(rate(10.0, t0, 20.0, t0), None);
        assert_eq!(rate(10.0, t0 + 1, 20.0, t0), None);
    }
}
