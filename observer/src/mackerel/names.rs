//! Metric names: the container agent's names for what it also reports, so its graphs, role
//! graphs and monitors keep working, and `custom.observer.*` for what only observer measures.

use super::{
    client::{GraphDef, GraphMetric},
    model::ContainerMetrics,
};

/// Prefix of the series only observer reports.
pub const CUSTOM_PREFIX: &str = "custom.observer";

/// A container name as the container agent puts it in metric names: every character but
/// `A-Z a-z 0-9 _ -` becomes `_` (`~internal~ecs~pause` -> `_internal_ecs_pause`).
pub fn sanitize(name: &str) -> String {
    if name.is_empty() {
        // An empty part would make "container.cpu..usage", which the API refuses.
        return "_".to_string();
    }
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The named values of one container for one interval. Unknown values (None) and values that
/// are not finite are left out: JSON has no NaN, and a missing point beats a false one.
/// `custom` adds the `custom.observer.*` series.
pub fn container_values(c: &ContainerMetrics, custom: bool) -> Vec<(String, f64)> {
    let n = sanitize(&c.name);
    let mut out = Vec::with_capacity(10);
    let mut add = |name: String, value: Option<f64>| {
        if let Some(v) = value.filter(|v| v.is_finite()) {
            out.push((name, v));
        }
    };
    add(format!("container.cpu.{n}.usage"), c.cpu_percent);
    add(format!("container.cpu.{n}.limit"), c.cpu_limit_percent);
    add(
        format!("container.memory.{n}.usage"),
        c.memory_bytes.map(|b| b as f64),
    );
    add(
        format!("container.memory.{n}.limit"),
        c.memory_limit_bytes.map(|b| b as f64),
    );
    add(
        format!("interface.{n}.rxBytes.delta"),
        Some(c.rx_bytes_per_sec),
    );
    add(
        format!("interface.{n}.txBytes.delta"),
        Some(c.tx_bytes_per_sec),
    );
    if custom {
        let p = CUSTOM_PREFIX;
        add(
            format!("{p}.loopback.{n}.rxBytes"),
            Some(c.lo_rx_bytes_per_sec),
        );
        add(
            format!("{p}.loopback.{n}.txBytes"),
            Some(c.lo_tx_bytes_per_sec),
        );
        add(format!("{p}.packets.{n}.rx"), Some(c.rx_packets_per_sec));
        add(format!("{p}.packets.{n}.tx"), Some(c.tx_packets_per_sec));
    }
    out
}

/// Graph definitions of the `custom.observer.*` series, one graph per kind with a line per
/// container (`#` groups the legend by container). `container.*` and `interface.*` are system
/// metrics that Mackerel graphs by itself, so they need none.
pub fn graph_defs() -> Vec<GraphDef> {
    let graph = |kind: &str, display: &str, unit: &str, metrics: &[(&str, &str)]| GraphDef {
        name: format!("{CUSTOM_PREFIX}.{kind}.#"),
        display_name: display.to_string(),
        unit: unit.to_string(),
        metrics: metrics
            .iter()
            .map(|(m, label)| GraphMetric {
                name: format!("{CUSTOM_PREFIX}.{kind}.#.{m}"),
                display_name: format!("%1 {label}"),
                is_stacked: false,
            })
            .collect(),
    };
    vec![
        graph(
            "loopback",
            "Loopback traffic",
            "bytes/sec",
            &[("rxBytes", "received"), ("txBytes", "sent")],
        ),
        // Mackerel has no packets/sec unit; float shows the number as it is.
        graph(
            "packets",
            "Packets (loopback excluded)",
            "float",
            &[("rx", "received"), ("tx", "sent")],
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_metric_name(s: &str) -> bool {
        !s.is_empty()
            && !s.contains("..")
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    }

    #[test]
    fn sanitised_like_the_container_agent() {
        assert_eq!(sanitize("~internal~ecs~pause"), "_internal_ecs_pause");
        assert_eq!(sanitize("app-1_x"), "app-1_x");
        assert_eq!(sanitize("web.v2/é"), "web_v2__");
        assert_eq!(sanitize(""), "_");
    }

    #[test]
    fn container_agent_names_and_units() {
        let c = ContainerMetrics {
            name: "app".into(),
            cpu_percent: Some(12.5),
            cpu_limit_percent: Some(25.0),
            memory_bytes: Some(83_886_080),
            memory_limit_bytes: Some(268_435_456),
            rx_bytes_per_sec: 5321.7,
            tx_bytes_per_sec: 1180.2,
            lo_rx_bytes_per_sec: 10.0,
            lo_tx_bytes_per_sec: 11.0,
            rx_packets_per_sec: 3.0,
            tx_packets_per_sec: 4.0,
        };
        let v = container_values(&c, false);
        assert_eq!(
            v,
            vec![
                ("container.cpu.app.usage".to_string(), 12.5),
                ("container.cpu.app.limit".to_string(), 25.0),
                ("container.memory.app.usage".to_string(), 83_886_080.0),
                ("container.memory.app.limit".to_string(), 268_435_456.0),
                ("interface.app.rxBytes.delta".to_string(), 5321.7),
                ("interface.app.txBytes.delta".to_string(), 1180.2),
            ]
        );
        let all = container_values(&c, true);
        assert_eq!(all.len(), 10);
        assert!(all.contains(&("custom.observer.loopback.app.rxBytes".into(), 10.0)));
        assert!(all.contains(&("custom.observer.loopback.app.txBytes".into(), 11.0)));
        assert!(all.contains(&("custom.observer.packets.app.rx".into(), 3.0)));
        assert!(all.contains(&("custom.observer.packets.app.tx".into(), 4.0)));
        assert!(all.iter().all(|(n, _)| is_metric_name(n)));
    }

    #[test]
    fn unknown_and_non_finite_values_are_left_out() {
        let c = ContainerMetrics {
            name: "~internal~ecs~pause".into(),
            cpu_percent: Some(f64::NAN),
            rx_bytes_per_sec: f64::INFINITY,
            ..Default::default()
        };
        let names: Vec<_> = container_values(&c, false)
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(names, ["interface._internal_ecs_pause.txBytes.delta"]);
    }

    #[test]
    fn graph_defs_cover_every_custom_series() {
        let defs = graph_defs();
        let c = ContainerMetrics {
            name: "web".into(),
            ..Default::default()
        };
        for (name, _) in container_values(&c, true) {
            if !name.starts_with("custom.") {
                continue;
            }
            let covered = defs.iter().any(|g| {
                assert!(g.name.starts_with("custom.") && g.name.ends_with(".#"));
                g.metrics.iter().any(|m| m.name.replace('#', "web") == name)
            });
            assert!(covered, "{name} has no graph definition");
        }
        let units: Vec<_> = defs.iter().map(|g| g.unit.as_str()).collect();
        assert_eq!(units, ["bytes/sec", "float"]);
    }
}
