//! The Prometheus text exposition format (0.0.4) and OpenMetrics 1.0 text, parsed into
//! [`Samples`], bounded: at most `max_series` samples are kept (the rest counted), a line
//! longer than [`MAX_LINE_BYTES`] or with more than [`MAX_LABELS`] labels is skipped (counted),
//! and nothing allocates more than the line it reads.
//!
//! Kinds come from `# TYPE`: counter samples (`x`, `x_total`) and the `_count`, `_sum` and
//! `_bucket` of histograms and summaries are [`Kind::Counter`]; gauges, summary quantiles,
//! untyped and unknown are [`Kind::Gauge`]. OpenMetrics `_created` samples (timestamps, not
//! values) and values that are not finite (`NaN`, `+Inf`) are left out; a sample's own
//! timestamp is ignored (Mackerel takes one value per period). Exemplars (` # {...} v`) are
//! cut off. `# EOF` ends an OpenMetrics body.

use std::collections::HashMap;

use super::{Kind, Sample, Samples};

/// Longest line read; a longer one is skipped.
pub const MAX_LINE_BYTES: usize = 16 << 10;
/// Most labels on one sample; a sample with more is skipped.
pub const MAX_LABELS: usize = 32;
/// Most `# TYPE` lines remembered: more families than series are never needed.
const MAX_TYPES_FACTOR: usize = 4;

/// Family types as `# TYPE` gives them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FamilyType {
    Counter,
    Gauge,
    Histogram,
    Summary,
    Other,
}

/// Parses `body`, keeping at most `max_series` samples.
pub fn parse(body: &[u8], max_series: usize) -> Samples {
    let mut out = Samples::default();
    let mut types: HashMap<&str, FamilyType> = HashMap::new();
    for raw in body.split(|b| *b == b'\n') {
        if raw.len() > MAX_LINE_BYTES {
            out.bad_lines += 1;
            continue;
        }
        let Ok(line) = std::str::from_utf8(raw) else {
            out.bad_lines += 1;
            continue;
        };
        let line = line.trim_end_matches('\r').trim_start();
        if line.is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let comment = comment.trim_start();
            if comment == "EOF" {
                break;
            }
            if let Some(rest) = comment.strip_prefix("TYPE") {
                let mut words = rest.split_whitespace();
                if let (Some(name), Some(kind)) = (words.next(), words.next()) {
                    if types.len() < max_series.saturating_mul(MAX_TYPES_FACTOR).max(64) {
                        types.insert(name, family_type(kind));
                    }
                }
            }
            continue;
        }
        let Some(sample) = parse_sample(line) else {
            out.bad_lines += 1;
            continue;
        };
        let Some(kind) = kind_of(sample.0, &sample.1, &types) else {
            continue;
        };
        if !sample.2.is_finite() {
            continue;
        }
        if out.samples.len() >= max_series {
            out.dropped += 1;
            continue;
        }
        out.samples.push(Sample {
            name: sample.0.to_owned(),
            labels: sample.1,
            value: sample.2,
            kind,
        });
    }
    out
}

fn family_type(kind: &str) -> FamilyType {
    match kind {
        "counter" => FamilyType::Counter,
        "gauge" => FamilyType::Gauge,
        "histogram" | "gaugehistogram" => FamilyType::Histogram,
        "summary" => FamilyType::Summary,
        _ => FamilyType::Other,
    }
}

/// The kind of sample `name`, or None for one to leave out (`_created`).
fn kind_of(
    name: &str,
    labels: &[(String, String)],
    types: &HashMap<&str, FamilyType>,
) -> Option<Kind> {
    if let Some(t) = types.get(name) {
        return Some(match t {
            FamilyType::Counter => Kind::Counter,
            // A summary's quantiles are gauges; its bare name carries them.
            FamilyType::Summary if labels.iter().any(|(k, _)| k == "quantile") => Kind::Gauge,
            FamilyType::Summary | FamilyType::Histogram => Kind::Counter,
            FamilyType::Gauge | FamilyType::Other => Kind::Gauge,
        });
    }
    for suffix in [
        "_total", "_created", "_bucket", "_count", "_sum", "_gcount", "_gsum",
    ] {
        let Some(family) = name.strip_suffix(suffix) else {
            continue;
        };
        let Some(t) = types.get(family) else { continue };
        return match (t, suffix) {
            (_, "_created") => None,
            (FamilyType::Counter, "_total") => Some(Kind::Counter),
            (FamilyType::Histogram | FamilyType::Summary, "_bucket" | "_count" | "_sum") => {
                Some(Kind::Counter)
            }
            _ => Some(Kind::Gauge),
        };
    }
    Some(Kind::Gauge)
}

/// Label names and values as served.
type Labels = Vec<(String, String)>;

/// `name{label="value",...} value [timestamp] [# exemplar]`.
fn parse_sample(line: &str) -> Option<(&str, Labels, f64)> {
    let name_end = line
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .unwrap_or(line.len());
    let name = &line[..name_end];
    if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
        return None;
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(after) = rest.strip_prefix('{') {
        let (parsed, after) = parse_labels(after)?;
        labels = parsed;
        rest = after;
    }
    // Whitespace, then the value; a timestamp or an exemplar may follow.
    if !rest.starts_with([' ', '\t']) {
        return None;
    }
    let value = rest.split_whitespace().next()?;
    Some((name, labels, parse_value(value)?))
}

/// Labels up to the closing `}`; returns them and what follows.
fn parse_labels(mut s: &str) -> Option<(Labels, &str)> {
    let mut labels: Labels = Vec::new();
    loop {
        s = s.trim_start_matches([' ', '\t']);
        if let Some(after) = s.strip_prefix('}') {
            return Some((labels, after));
        }
        let end = s
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(s.len());
        let key = &s[..end];
        if key.is_empty() || labels.len() >= MAX_LABELS {
            return None;
        }
        s = s[end..].trim_start_matches([' ', '\t']).strip_prefix('=')?;
        s = s.trim_start_matches([' ', '\t']).strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = s.char_indices();
        let close = loop {
            let (i, c) = chars.next()?;
            match c {
                '"' => break i,
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    '\\' => value.push('\\'),
                    '"' => value.push('"'),
                    other => {
                        value.push('\\');
                        value.push(other);
                    }
                },
                c => value.push(c),
            }
        };
        s = &s[close + 1..];
        // A label given twice: the exposition is wrong; keep the first.
        if !labels.iter().any(|(k, _)| k == key) {
            labels.push((key.to_owned(), value));
        }
        s = s.trim_start_matches([' ', '\t']);
        if let Some(after) = s.strip_prefix(',') {
            s = after;
        } else if !s.starts_with('}') {
            return None;
        }
    }
}

fn parse_value(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        // Rust's parser also takes "inf", "infinity" and "nan": the formats do not.
        s if s
            .bytes()
            .any(|b| b.is_ascii_alphabetic() && !matches!(b, b'e' | b'E')) =>
        {
            None
        }
        s => s.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn one(body: &str) -> Vec<(String, Labels, f64, Kind)> {
        parse(body.as_bytes(), 1000)
            .samples
            .into_iter()
            .map(|s| (s.name, s.labels, s.value, s.kind))
            .collect()
    }

    fn l(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_text_format() {
        let body = r#"# HELP http_requests_total The total number of HTTP requests.
# TYPE http_requests_total counter
http_requests_total{method="post",code="200"} 1027 1395066363000
http_requests_total{method="post",code="400"}    3 1395066363000

# Escaping in label values:
msdos_file_access_time_seconds{path="C:\\DIR\\FILE.TXT",error="Cannot find file:\n\"FILE.TXT\""} 1.458255915e9

# Minimalistic line:
metric_without_timestamp_and_labels 12.47
# TYPE go_goroutines gauge
go_goroutines 7
something_weird{problem="division by zero"} +Inf -3982045
# TYPE http_request_duration_seconds histogram
http_request_duration_seconds_bucket{le="0.05"} 24054
http_request_duration_seconds_bucket{le="+Inf"} 144320
http_request_duration_seconds_sum 53423
http_request_duration_seconds_count 144320
# TYPE rpc_duration_seconds summary
rpc_duration_seconds{quantile="0.5"} 4773
rpc_duration_seconds_sum 1.7560473e+07
rpc_duration_seconds_count 2693
"#;
        let got = one(body);
        use Kind::*;
        assert_eq!(
            got,
            vec![
                (
                    "http_requests_total".into(),
                    l(&[("method", "post"), ("code", "200")]),
                    1027.0,
                    Counter
                ),
                (
                    "http_requests_total".into(),
                    l(&[("method", "post"), ("code", "400")]),
                    3.0,
                    Counter
                ),
                (
                    "msdos_file_access_time_seconds".into(),
                    l(&[
                        ("path", r"C:\DIR\FILE.TXT"),
                        ("error", "Cannot find file:\n\"FILE.TXT\"")
                    ]),
                    1.458255915e9,
                    Gauge
                ),
                (
                    "metric_without_timestamp_and_labels".into(),
                    vec![],
                    12.47,
                    Gauge
                ),
                ("go_goroutines".into(), vec![], 7.0, Gauge),
                (
                    "http_request_duration_seconds_bucket".into(),
                    l(&[("le", "0.05")]),
                    24054.0,
                    Counter
                ),
                (
                    "http_request_duration_seconds_bucket".into(),
                    l(&[("le", "+Inf")]),
                    144320.0,
                    Counter
                ),
                (
                    "http_request_duration_seconds_sum".into(),
                    vec![],
                    53423.0,
                    Counter
                ),
                (
                    "http_request_duration_seconds_count".into(),
                    vec![],
                    144320.0,
                    Counter
                ),
                (
                    "rpc_duration_seconds".into(),
                    l(&[("quantile", "0.5")]),
                    4773.0,
                    Gauge
                ),
                (
                    "rpc_duration_seconds_sum".into(),
                    vec![],
                    1.7560473e7,
                    Counter
                ),
                ("rpc_duration_seconds_count".into(), vec![], 2693.0, Counter),
            ]
        );
    }

    #[test]
    fn openmetrics() {
        let body = "# TYPE acme_http_router_request_seconds summary\n\
# UNIT acme_http_router_request_seconds seconds\n\
acme_http_router_request_seconds_sum{path=\"/api/v1\",method=\"GET\"} 9036.32\n\
acme_http_router_request_seconds_count{path=\"/api/v1\",method=\"GET\"} 807283.0\n\
acme_http_router_request_seconds_created{path=\"/api/v1\",method=\"GET\"} 1605281325.0\n\
# TYPE foo counter\n\
foo_total 17.0 1520879607.789 # {id=\"counter-test\"} 5\n\
foo_created 1520872607.123\n\
# TYPE temp gauge\n\
temp{room=\"a\",} 21.5\n\
# EOF\n\
after_eof 1\n";
        let got = one(body);
        let names: Vec<_> = got.iter().map(|g| (g.0.as_str(), g.2, g.3)).collect();
        assert_eq!(
            names,
            [
                (
                    "acme_http_router_request_seconds_sum",
                    9036.32,
                    Kind::Counter
                ),
                (
                    "acme_http_router_request_seconds_count",
                    807283.0,
                    Kind::Counter
                ),
                ("foo_total", 17.0, Kind::Counter),
                ("temp", 21.5, Kind::Gauge),
            ]
        );
    }

    #[test]
    fn bad_lines_are_skipped_and_counted() {
        let body = "ok 1\n1bad 2\nno_value\nx{a=\"1\" 3\nx{a=1} 3\nx{=\"1\"} 3\ny nan\nz 0x10\nw{a=\"unterminated} 4\nok2 2\n";
        let s = parse(body.as_bytes(), 100);
        let names: Vec<_> = s.samples.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["ok", "ok2"]);
        assert_eq!(s.bad_lines, 8);
    }

    #[test]
    fn caps_bite() {
        let body: String = (0..50).map(|i| format!("m{i} {i}\n")).collect();
        let s = parse(body.as_bytes(), 10);
        assert_eq!((s.samples.len(), s.dropped), (10, 40));

        let long = format!("m{{a=\"{}\"}} 1\nok 1\n", "x".repeat(MAX_LINE_BYTES));
        let s = parse(long.as_bytes(), 10);
        assert_eq!((s.samples.len(), s.bad_lines), (1, 1));

        let many: Vec<String> = (0..=MAX_LABELS).map(|i| format!("l{i}=\"v\"")).collect();
        let s = parse(format!("m{{{}}} 1\n", many.join(",")).as_bytes(), 10);
        assert_eq!((s.samples.len(), s.bad_lines), (0, 1));
    }

    proptest! {
        #![proptest_config(crate::fuzz::config(512))]

        /// Any bytes: no panic, the cap holds, every kept value is finite.
        #[test]
        fn any_bytes(body in proptest::collection::vec(any::<u8>(), 0..4096), cap in 0usize..20) {
            let s = parse(&body, cap);
            prop_assert!(s.samples.len() <= cap);
            prop_assert!(s.samples.iter().all(|s| s.value.is_finite() && s.labels.len() <= MAX_LABELS));
        }

        /// Text made of the format's own characters, where the tricky cases are.
        #[test]
        fn format_like_text(body in "([a-z_]{1,4}(\\{([a-z]{1,2}=\"[a-z\\\\\"{},= ]{0,4}\",?){0,3}\\})? ?[-+0-9.eInfNa]{0,5}( [0-9]{0,3})?\n|# (TYPE|HELP) [a-z_]{1,4} [a-z]{0,8}\n){0,20}") {
            let s = parse(body.as_bytes(), 1000);
            prop_assert!(s.samples.iter().all(|s| s.value.is_finite()));
        }

        /// A well-formed sample comes back as written, whatever its label values hold.
        #[test]
        fn round_trip(name in "[a-zA-Z_:][a-zA-Z0-9_:]{0,20}", value in "[^\\n]{0,20}", v in -1e12f64..1e12) {
            let escaped = value.replace('\\', "\\\\").replace('"', "\\\"");
            let body = format!("{name}{{a=\"{escaped}\"}} {v}\n");
            let s = parse(body.as_bytes(), 10);
            prop_assert_eq!(s.samples.len(), 1);
            prop_assert_eq!(&s.samples[0].name, &name);
            prop_assert_eq!(&s.samples[0].labels, &vec![("a".to_string(), value.clone())]);
            prop_assert_eq!(s.samples[0].value, v);
        }
    }
}
