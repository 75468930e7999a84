//! What a mackerel-agent metric plugin prints, read as mackerel-agent reads it
//! (`metrics/plugin.go`), with caps and checks where mackerel-agent has none:
//!
//! - values: one `name value epoch` per line (split on whitespace; lines of fewer than three
//!   fields are skipped), `custom.` put before the name; the run's time is used unless the
//!   plugin is configured with `use_plugin_timestamp` (then the line's epoch, refused if more
//!   than 15 minutes from now). A name seen twice keeps its last value. Here also: a name
//!   must be Mackerel's `[A-Za-z0-9._-]`, at most [`MAX_NAME_LEN`], with no empty segment; a
//!   value must be finite (mackerel-agent drops NaN and infinities before posting); at most
//!   `max_series` names, the rest dropped and counted.
//! - graph definitions (a run with `MACKEREL_AGENT_PLUGIN_META=1`): a first line
//!   `# mackerel-agent-plugin [version=1]`, then one JSON value
//!   `{"graphs": {"<key>": {"label", "unit", "metrics": [{"name", "label", "stacked"}]}}}`,
//!   each graph `custom.<key>` (unit `float` when empty) with metrics `custom.<key>.<name>`.
//!   Here also: keys and names checked as above (`*` and `#` allowed, Mackerel's wildcards),
//!   units one of Mackerel's, labels cut to [`MAX_LABEL_CHARS`], at most [`MAX_GRAPHS`]
//!   graphs of [`MAX_GRAPH_METRICS`] metrics; a graph that fails a check is left out and counted.

use std::collections::{BTreeMap, HashMap};

use serde::Deserialize;

use crate::mackerel::client::{GraphDef, GraphMetric};

/// Put before every name a plugin prints, as mackerel-agent does.
pub const PREFIX: &str = "custom.";
/// Longest metric or graph name with its prefix.
pub const MAX_NAME_LEN: usize = 250;
/// Longest graph or metric label kept.
pub const MAX_LABEL_CHARS: usize = 200;
/// Graphs one plugin may define.
pub const MAX_GRAPHS: usize = 200;
/// Metrics one graph may list.
pub const MAX_GRAPH_METRICS: usize = 200;
/// mackerel-agent's window for a plugin's own timestamps.
pub const TIME_WINDOW_SECS: i64 = 15 * 60;
/// The units Mackerel takes for a graph.
pub const UNITS: [&str; 9] = [
    "float",
    "integer",
    "percentage",
    "seconds",
    "milliseconds",
    "bytes",
    "bytes/sec",
    "bits/sec",
    "iops",
];

/// One value to post on the workload's host.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// With the `custom.` prefix.
    pub name: String,
    pub value: f64,
    /// Unix seconds.
    pub time: i64,
}

/// The values of one run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Values {
    /// In the order the names first appeared.
    pub samples: Vec<Sample>,
    /// Lines refused: a bad name, value or time, or too few fields (blank lines aside).
    pub invalid: usize,
    /// Lines of names past the `max_series` cap.
    pub dropped: usize,
}

/// Reads a values run's stdout; `now` is the run's time.
pub fn parse_values(
    stdout: &[u8],
    now: i64,
    max_series: usize,
    use_plugin_timestamp: bool,
) -> Values {
    let mut out = Values::default();
    let mut index: HashMap<String, usize> = HashMap::new();
    for line in stdout.split(|&b| b == b'\n') {
        let line = String::from_utf8_lossy(line);
        let fields: Vec<&str> = line.split_whitespace().take(3).collect();
        if fields.is_empty() {
            continue;
        }
        let &[key, value, time] = fields.as_slice() else {
            out.invalid += 1;
            continue;
        };
        let name = format!("{PREFIX}{key}");
        let value = value.parse::<f64>().ok().filter(|v| v.is_finite());
        let time = if use_plugin_timestamp {
            time.parse::<i64>()
                .ok()
                .filter(|t| t.abs_diff(now) < TIME_WINDOW_SECS as u64)
        } else {
            Some(now)
        };
        let (Some(value), Some(time), true) = (value, time, valid_metric_name(&name, false)) else {
            out.invalid += 1;
            continue;
        };
        match index.get(&name) {
            Some(&i) => out.samples[i] = Sample { name, value, time },
            None if out.samples.len() < max_series => {
                index.insert(name.clone(), out.samples.len());
                out.samples.push(Sample { name, value, time });
            }
            None => out.dropped += 1,
        }
    }
    out
}

/// Mackerel's charset, no empty segment, at most [`MAX_NAME_LEN`]; `*` and `#` where a graph
/// definition may use wildcards.
pub fn valid_metric_name(name: &str, wildcards: bool) -> bool {
    name.len() <= MAX_NAME_LEN
        && name.split('.').all(|segment| {
            !segment.is_empty()
                && segment.bytes().all(|b| {
                    b.is_ascii_alphanumeric()
                        || b == b'_'
                        || b == b'-'
                        || (wildcards && (b == b'*' || b == b'#'))
                })
        })
}

/// The graph definitions of one meta run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Meta {
    /// Sorted by name.
    pub graph_defs: Vec<GraphDef>,
    /// Graphs or metrics left out: a bad key, name or unit, or past a cap.
    pub invalid: usize,
}

/// Why a meta run's output is not graph definitions.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetaError {
    #[error("the first line is not `# mackerel-agent-plugin`: {0:?}")]
    Header(String),
    #[error("unsupported plugin meta version {0:?} (mackerel-agent knows 1)")]
    Version(String),
    #[error("graph definitions: {0}")]
    Json(String),
}

// Go's encoding/json matches field names without regard to case; plugins print lower case.
#[derive(Deserialize)]
struct RawMeta {
    #[serde(default, alias = "Graphs")]
    graphs: Option<BTreeMap<String, RawGraph>>,
}

#[derive(Deserialize)]
struct RawGraph {
    #[serde(default, alias = "Label")]
    label: Option<String>,
    #[serde(default, alias = "Unit")]
    unit: Option<String>,
    #[serde(default, alias = "Metrics")]
    metrics: Option<Vec<RawMetric>>,
}

#[derive(Deserialize)]
struct RawMetric {
    #[serde(default, alias = "Name")]
    name: Option<String>,
    #[serde(default, alias = "Label")]
    label: Option<String>,
    #[serde(default, alias = "Stacked")]
    stacked: Option<bool>,
}

/// Reads a meta run's stdout.
pub fn parse_meta(stdout: &[u8]) -> Result<Meta, MetaError> {
    let text = String::from_utf8_lossy(stdout);
    let (header, rest) = text.split_once('\n').unwrap_or((&text, ""));
    let fields = header_fields(header).ok_or_else(|| MetaError::Header(clip(header, 80)))?;
    if let Some(version) = fields.iter().find_map(|f| {
        f.strip_prefix("version=")
            .or((*f == "version").then_some(""))
    }) {
        if version != "1" {
            return Err(MetaError::Version(clip(version, 20)));
        }
    }
    // One JSON value, as Go's json.Decoder reads it: what follows is not read.
    let raw: RawMeta = serde_json::Deserializer::from_str(rest)
        .into_iter()
        .next()
        .unwrap_or_else(|| Err(serde::de::Error::custom("nothing after the first line")))
        .map_err(|e| MetaError::Json(crate::body::clip(&e)))?;
    let mut meta = Meta::default();
    for (key, graph) in raw.graphs.unwrap_or_default() {
        if meta.graph_defs.len() == MAX_GRAPHS {
            meta.invalid += 1;
            continue;
        }
        let name = format!("{PREFIX}{key}");
        let unit = match graph.unit.as_deref() {
            None | Some("") => "float",
            Some(u) => match UNITS.iter().find(|&&known| known == u) {
                Some(known) => known,
                None => {
                    meta.invalid += 1;
                    continue;
                }
            },
        };
        if !valid_metric_name(&name, true) {
            meta.invalid += 1;
            continue;
        }
        let mut metrics = Vec::new();
        for m in graph.metrics.unwrap_or_default() {
            let metric = format!("{name}.{}", m.name.unwrap_or_default());
            if metrics.len() == MAX_GRAPH_METRICS || !valid_metric_name(&metric, true) {
                meta.invalid += 1;
                continue;
            }
            metrics.push(GraphMetric {
                name: metric,
                display_name: clip(&m.label.unwrap_or_default(), MAX_LABEL_CHARS),
                is_stacked: m.stacked.unwrap_or(false),
            });
        }
        meta.graph_defs.push(GraphDef {
            name,
            display_name: clip(&graph.label.unwrap_or_default(), MAX_LABEL_CHARS),
            unit: unit.to_owned(),
            metrics,
        });
    }
    Ok(meta)
}

/// The words after `#\s*mackerel-agent-plugin\b`, or None if the line is not that.
fn header_fields(line: &str) -> Option<Vec<&str>> {
    let rest = line
        .strip_prefix('#')?
        .trim_start()
        .strip_prefix("mackerel-agent-plugin")?;
    // \b: the word ends here.
    if rest.starts_with(|c: char| c.is_alphanumeric() || c == '_') {
        return None;
    }
    Some(rest.split_whitespace().collect())
}

/// At most `max` characters of `s`.
pub fn clip(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_767_225_600;

    fn sample(name: &str, value: f64) -> Sample {
        Sample {
            name: name.into(),
            value,
            time: NOW,
        }
    }

    #[test]
    fn lines_become_custom_samples_at_the_runs_time() {
        let v = parse_values(
            b"gostats.memory.alloc\t1024\t1700000000\ngostats.gc.num 3.5 1700000000\n",
            NOW,
            10,
            false,
        );
        assert_eq!(
            v.samples,
            vec![
                sample("custom.gostats.memory.alloc", 1024.0),
                sample("custom.gostats.gc.num", 3.5)
            ]
        );
        assert_eq!((v.invalid, v.dropped), (0, 0));
    }

    #[test]
    fn plugin_timestamps_are_taken_only_inside_the_window() {
        let text = format!(
            "a\t1\t{}\nb\t2\t{}\nc\t3\tsoon\n",
            NOW - 60,
            NOW - TIME_WINDOW_SECS - 1
        );
        let v = parse_values(text.as_bytes(), NOW, 10, true);
        assert_eq!(
            v.samples,
            vec![Sample {
                name: "custom.a".into(),
                value: 1.0,
                time: NOW - 60
            }]
        );
        assert_eq!(v.invalid, 2);
    }

    #[test]
    fn hostile_lines_are_counted_not_taken() {
        let text = "\n\
            short\t1\n\
            bad/name\t1\t0\n\
            custom..x\t1\t0\n\
            .lead\t1\t0\n\
            nan\tNaN\t0\n\
            inf\tinf\t0\n\
            word\tten\t0\n\
            ünicode\t1\t0\n\
            \x1b[31mred\t1\t0\n\
            ok\t-1.5e3\t0\textra\tfields\n";
        let v = parse_values(text.as_bytes(), NOW, 10, false);
        assert_eq!(v.samples, vec![sample("custom.ok", -1500.0)]);
        assert_eq!(v.invalid, 9);
        let long = format!("{}\t1\t0\n", "a".repeat(MAX_NAME_LEN));
        assert_eq!(parse_values(long.as_bytes(), NOW, 10, false).invalid, 1);
        let binary: Vec<u8> = (0..=255u8).cycle().take(10_000).collect();
        let v = parse_values(&binary, NOW, 10, false);
        assert!(v.samples.is_empty());
    }

    #[test]
    fn a_repeated_name_keeps_its_last_value_and_the_cap_drops_the_rest() {
        let v = parse_values(b"a 1 0\nb 2 0\na 3 0\nc 4 0\nd 5 0\nb 6 0\n", NOW, 2, false);
        assert_eq!(
            v.samples,
            vec![sample("custom.a", 3.0), sample("custom.b", 6.0)]
        );
        assert_eq!(v.dropped, 2);
        let huge: String = (0..100_000).map(|i| format!("m.{i}\t{i}\t0\n")).collect();
        let v = parse_values(huge.as_bytes(), NOW, 500, false);
        assert_eq!(v.samples.len(), 500);
        assert_eq!(v.samples[499], sample("custom.m.499", 499.0));
        assert_eq!(v.dropped, 100_000 - 500);
    }

    #[test]
    fn meta_becomes_custom_graph_definitions() {
        let out = br#"# mackerel-agent-plugin version=1
{"graphs": {"dice": {"label": "My Dice", "unit": "integer",
   "metrics": [{"name": "d6", "label": "Die (d6)"}, {"name": "d20", "label": "Die (d20)", "stacked": true}]},
  "gostats.memory": {"label": "Memory", "metrics": [{"name": "*", "label": "%1"}]}}}
trailing text is not read"#;
        let m = parse_meta(out).unwrap();
        assert_eq!(m.invalid, 0);
        assert_eq!(
            m.graph_defs,
            vec![
                GraphDef {
                    name: "custom.dice".into(),
                    display_name: "My Dice".into(),
                    unit: "integer".into(),
                    metrics: vec![
                        GraphMetric {
                            name: "custom.dice.d6".into(),
                            display_name: "Die (d6)".into(),
                            is_stacked: false
                        },
                        GraphMetric {
                            name: "custom.dice.d20".into(),
                            display_name: "Die (d20)".into(),
                            is_stacked: true
                        },
                    ],
                },
                GraphDef {
                    name: "custom.gostats.memory".into(),
                    display_name: "Memory".into(),
                    unit: "float".into(),
                    metrics: vec![GraphMetric {
                        name: "custom.gostats.memory.*".into(),
                        display_name: "%1".into(),
                        is_stacked: false
                    }],
                },
            ]
        );
        let go_case = parse_meta(b"#mackerel-agent-plugin\n{\"Graphs\":{\"a\":{\"Label\":\"A\",\"Metrics\":[{\"Name\":\"x\",\"Stacked\":true}]}}}").unwrap();
        assert_eq!(go_case.graph_defs[0].metrics[0].name, "custom.a.x");
        assert!(go_case.graph_defs[0].metrics[0].is_stacked);
    }

    #[test]
    fn bad_meta_is_refused_or_counted() {
        assert!(matches!(
            parse_meta(b"{\"graphs\":{}}"),
            Err(MetaError::Header(_))
        ));
        assert!(matches!(
            parse_meta(b"# mackerel-agent-pluginx\n{}"),
            Err(MetaError::Header(_))
        ));
        assert_eq!(
            parse_meta(b"# mackerel-agent-plugin version=2\n{}"),
            Err(MetaError::Version("2".into()))
        );
        assert!(matches!(
            parse_meta(b"# mackerel-agent-plugin\n{\"graphs\": [1]}"),
            Err(MetaError::Json(_))
        ));
        assert!(matches!(
            parse_meta(b"# mackerel-agent-plugin\n"),
            Err(MetaError::Json(_))
        ));
        assert_eq!(
            parse_meta(b"# mackerel-agent-plugin\n{}").unwrap(),
            Meta::default()
        );
        let m = parse_meta(
            br#"# mackerel-agent-plugin
{"graphs": {"bad key": {"metrics": []}, "u": {"unit": "furlongs"},
 "ok": {"label": "LLLLLLLLLL", "metrics": [{"name": "a/b"}, {"name": ""}, {"name": "fine"}]}}}"#,
        )
        .unwrap();
        assert_eq!(m.graph_defs.len(), 1);
        assert_eq!(m.graph_defs[0].metrics.len(), 1);
        assert_eq!(m.invalid, 4);
        let many: String = (0..MAX_GRAPHS + 5)
            .map(|i| format!("\"g{i}\":{{}}"))
            .collect::<Vec<_>>()
            .join(",");
        let m =
            parse_meta(format!("# mackerel-agent-plugin\n{{\"graphs\":{{{many}}}}}").as_bytes())
                .unwrap();
        assert_eq!((m.graph_defs.len(), m.invalid), (MAX_GRAPHS, 5));
        let label = "x".repeat(10_000);
        let m = parse_meta(
            format!("# mackerel-agent-plugin\n{{\"graphs\":{{\"a\":{{\"label\":\"{label}\"}}}}}}")
                .as_bytes(),
        )
        .unwrap();
        assert_eq!(
            m.graph_defs[0].display_name.chars().count(),
            MAX_LABEL_CHARS
        );
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;
        use crate::fuzz;

        fn check_values(text: &[u8]) -> Result<(), TestCaseError> {
            let v = parse_values(text, NOW, 20, true);
            prop_assert!(v.samples.len() <= 20);
            for s in &v.samples {
                prop_assert!(s.name.starts_with(PREFIX) && valid_metric_name(&s.name, false));
                prop_assert!(s.value.is_finite() && s.time.abs_diff(NOW) < TIME_WINDOW_SECS as u64);
            }
            Ok(())
        }

        fn check_meta(text: &[u8]) -> Result<(), TestCaseError> {
            if let Ok(m) = parse_meta(text) {
                prop_assert!(m.graph_defs.len() <= MAX_GRAPHS);
                for g in &m.graph_defs {
                    prop_assert!(g.name.starts_with(PREFIX) && valid_metric_name(&g.name, true));
                    prop_assert!(UNITS.contains(&g.unit.as_str()));
                    prop_assert!(g.display_name.chars().count() <= MAX_LABEL_CHARS);
                    prop_assert!(g.metrics.len() <= MAX_GRAPH_METRICS);
                    let graph_prefix = format!("{}.", g.name);
                    for m in &g.metrics {
                        prop_assert!(m.name.starts_with(&graph_prefix));
                        prop_assert!(valid_metric_name(&m.name, true));
                    }
                }
            }
            Ok(())
        }

        const SEED: &str = "# mackerel-agent-plugin\n{\"graphs\": {\"dice\": {\"label\": \"My Dice\", \"unit\": \"integer\", \"metrics\": [{\"name\": \"d6\", \"label\": \"d6\", \"stacked\": true}]}}}\n";
        const KEYS: &[&str] = &[
            "graphs", "dice", "label", "unit", "metrics", "name", "stacked", "integer", "*",
        ];

        proptest! {
            #![proptest_config(fuzz::config(1000))]

            #[test]
            fn any_output(text in prop::collection::vec(any::<u8>(), 0..600)) {
                check_values(&text)?;
                check_meta(&text)?;
            }

            #[test]
            fn lines_of_plugin_words(text in fuzz::words(&["custom.", "a.b", ".", "\t", " ", "\n", "1", "-2.5e3", "NaN", "inf", "1767225600", "#", "*"], 60)) {
                check_values(text.as_bytes())?;
            }

            #[test]
            fn mutated_meta(text in fuzz::mutated_text(vec![SEED.to_owned()], 6)) {
                check_meta(text.as_bytes())?;
            }

            #[test]
            fn meta_of_known_keys(value in fuzz::json_value(KEYS)) {
                check_meta(format!("# mackerel-agent-plugin\n{value}").as_bytes())?;
            }
        }
    }
}
