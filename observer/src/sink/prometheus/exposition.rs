//! Which format a scraper gets, and the Prometheus text format (0.0.4) made from the crate's
//! OpenMetrics text.
//!
//! prometheus-client writes OpenMetrics only. For counters and gauges the two formats differ
//! in three places: OpenMetrics names a counter family without `_total` (its samples carry
//! it), has `# UNIT` lines, and ends with `# EOF`. [`to_prometheus_text`] adjusts exactly
//! those; samples, label escaping and values are the crate's, untouched.

use prometheus_client::{encoding::text, registry::Registry};

/// The format of a /metrics answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `text/plain; version=0.0.4`: what curl and older scrapers get.
    PrometheusText,
    /// `application/openmetrics-text; version=1.0.0`: what Prometheus asks for first.
    OpenMetrics,
}

impl Format {
    /// The format the `Accept` header prefers: OpenMetrics when it is asked for with a quality
    /// at least that of plain text, else the Prometheus text format.
    pub fn negotiate(accept: Option<&str>) -> Self {
        let (mut openmetrics, mut plain) = (0.0f32, 0.0f32);
        for range in accept.unwrap_or("").split(',') {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or("").to_ascii_lowercase();
            let q = parts
                .filter_map(|p| p.strip_prefix("q=").or_else(|| p.strip_prefix("Q=")))
                .find_map(|q| q.parse::<f32>().ok())
                .unwrap_or(1.0);
            match media.as_str() {
                "application/openmetrics-text" => openmetrics = openmetrics.max(q),
                "text/plain" | "text/*" | "*/*" => plain = plain.max(q),
                _ => {}
            }
        }
        if openmetrics > 0.0 && openmetrics >= plain {
            Self::OpenMetrics
        } else {
            Self::PrometheusText
        }
    }

    /// The `Content-Type` of an answer in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::PrometheusText => "text/plain; version=0.0.4; charset=utf-8",
            Self::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// Everything in `registry`, in `format`.
pub fn render(registry: &Registry, format: Format) -> Result<String, std::fmt::Error> {
    let mut openmetrics = String::new();
    text::encode(&mut openmetrics, registry)?;
    Ok(match format {
        Format::OpenMetrics => openmetrics,
        Format::PrometheusText => to_prometheus_text(&openmetrics),
    })
}

/// The Prometheus text format (0.0.4) of an OpenMetrics exposition of counters and gauges:
/// counter families take their samples' `_total` name, `# UNIT` and `# EOF` go, `unknown`
/// becomes `untyped`.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    // The crate writes HELP right before TYPE; HELP must name the family as TYPE does.
    let mut help: Option<&str> = None;
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if line.starts_with("# HELP ") {
            flush_help(&mut out, help.take(), None);
            help = Some(line);
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.rsplit_once(' ').unwrap_or((rest, ""));
            let (name, kind) = match kind {
                "counter" if !name.ends_with("_total") => (format!("{name}_total"), kind),
                "unknown" => (name.to_owned(), "untyped"),
                _ => (name.to_owned(), kind),
            };
            let family = rest.rsplit_once(' ').map_or(rest, |(n, _)| n);
            flush_help(&mut out, help.take(), Some((family, &name)));
            out.push_str("# TYPE ");
            out.push_str(&name);
            out.push(' ');
            out.push_str(kind);
            out.push('\n');
            continue;
        }
        flush_help(&mut out, help.take(), None);
        out.push_str(line);
        out.push('\n');
    }
    flush_help(&mut out, help, None);
    out
}

/// Writes a held `# HELP` line, renamed `from` -> `to` when it names that family.
fn flush_help(out: &mut String, help: Option<&str>, rename: Option<(&str, &str)>) {
    let Some(line) = help else { return };
    let rest = &line["# HELP ".len()..];
    match rename {
        Some((from, to)) if rest.strip_prefix(from).is_some_and(|r| r.starts_with(' ')) => {
            out.push_str("# HELP ");
            out.push_str(to);
            out.push_str(&rest[from.len()..]);
        }
        _ => out.push_str(line),
    }
    out.push('\n');
}

#[cfg(test)]
mod tests {
    use prometheus_client::metrics::{counter::Counter, family::Family, gauge::Gauge};

    use super::*;

    #[test]
    fn prometheus_asks_for_openmetrics_first() {
        // Prometheus 2.x scrape Accept header.
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;\
            version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(Format::negotiate(Some(prometheus)), Format::OpenMetrics);
        assert_eq!(
            Format::negotiate(Some("application/openmetrics-text")),
            Format::OpenMetrics
        );
    }

    #[test]
    fn everyone_else_gets_the_text_format() {
        assert_eq!(Format::negotiate(None), Format::PrometheusText);
        assert_eq!(Format::negotiate(Some("*/*")), Format::PrometheusText);
        assert_eq!(
            Format::negotiate(Some("text/plain;version=0.0.4")),
            Format::PrometheusText
        );
        assert_eq!(
            Format::negotiate(Some("text/plain, application/openmetrics-text;q=0.5")),
            Format::PrometheusText
        );
        assert_eq!(
            Format::negotiate(Some("application/openmetrics-text;q=0")),
            Format::PrometheusText
        );
    }

    #[test]
    fn counters_take_their_total_name_and_units_go() {
        let mut registry = Registry::with_prefix("observer");
        let bytes = Family::<Vec<(String, String)>, Counter>::default();
        registry.register_with_unit(
            "sent",
            "Bytes sent",
            prometheus_client::registry::Unit::Bytes,
            bytes.clone(),
        );
        bytes
            .get_or_create(&vec![("container".into(), "a\"b".into())])
            .inc_by(7);
        let gauge = Gauge::<i64>::default();
        registry.register("programs_attached", "Programs", gauge.clone());
        gauge.set(2);

        let om = render(&registry, Format::OpenMetrics).unwrap();
        assert!(om.contains("# TYPE observer_sent_bytes counter\n"), "{om}");
        assert!(om.contains("# UNIT observer_sent_bytes bytes\n"), "{om}");
        assert!(om.ends_with("# EOF\n"), "{om}");

        let text = render(&registry, Format::PrometheusText).unwrap();
        assert_eq!(
            text,
            [
                "# HELP observer_sent_bytes_total Bytes sent.",
                "# TYPE observer_sent_bytes_total counter",
                r#"observer_sent_bytes_total{container="a\"b"} 7"#,
                "# HELP observer_programs_attached Programs.",
                "# TYPE observer_programs_attached gauge",
                "observer_programs_attached 2",
                "",
            ]
            .join("\n")
        );
    }
}
