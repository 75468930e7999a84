//! JSON lines: per interval, one object per cgroup, one per task/pod (with its containers),
//! then one about observer itself. docs/output.md describes every field.

use std::io::Write;

use observer_common::TrafficValue;
use serde::Serialize;

use super::{Sink, SinkError};
use crate::snapshot::{
    per_second, ContainerReport, OwnerRef, Snapshot, Usage, WorkloadKind, WorkloadReport,
};

pub struct JsonSink<W: Write + Send> {
    out: W,
}

impl<W: Write + Send> JsonSink<W> {
    pub fn new(out: W) -> Self {
        Self { out }
    }

    pub fn into_inner(self) -> W {
        self.out
    }
}

/// The eight counters of an interval with their per-second rates; flattened into every line
/// that carries traffic.
#[derive(Serialize)]
struct TrafficFields {
    rx_bytes: u64,
    rx_packets: u64,
    tx_bytes: u64,
    tx_packets: u64,
    lo_rx_bytes: u64,
    lo_rx_packets: u64,
    lo_tx_bytes: u64,
    lo_tx_packets: u64,
    rx_bytes_per_second: f64,
    tx_bytes_per_second: f64,
    lo_rx_bytes_per_second: f64,
    lo_tx_bytes_per_second: f64,
    rx_packets_per_second: f64,
    tx_packets_per_second: f64,
    lo_rx_packets_per_second: f64,
    lo_tx_packets_per_second: f64,
}

impl TrafficFields {
    fn new(d: &TrafficValue, snapshot: &Snapshot) -> Self {
        let rate = |n| per_second(n, snapshot.interval);
        Self {
            rx_bytes: d.rx.bytes,
            rx_packets: d.rx.packets,
            tx_bytes: d.tx.bytes,
            tx_packets: d.tx.packets,
            lo_rx_bytes: d.lo_rx.bytes,
            lo_rx_packets: d.lo_rx.packets,
            lo_tx_bytes: d.lo_tx.bytes,
            lo_tx_packets: d.lo_tx.packets,
            rx_bytes_per_second: rate(d.rx.bytes),
            tx_bytes_per_second: rate(d.tx.bytes),
            lo_rx_bytes_per_second: rate(d.lo_rx.bytes),
            lo_tx_bytes_per_second: rate(d.lo_tx.bytes),
            rx_packets_per_second: rate(d.rx.packets),
            tx_packets_per_second: rate(d.tx.packets),
            lo_rx_packets_per_second: rate(d.lo_rx.packets),
            lo_tx_packets_per_second: rate(d.lo_tx.packets),
        }
    }
}

#[derive(Serialize)]
struct UsageFields {
    cpu_percent: Option<f64>,
    cpu_limit_cores: Option<f64>,
    memory_working_set_bytes: Option<u64>,
    memory_limit_bytes: Option<u64>,
}

impl From<&Usage> for UsageFields {
    fn from(u: &Usage) -> Self {
        Self {
            cpu_percent: u.cpu_percent,
            cpu_limit_cores: u.cpu_limit_cores,
            memory_working_set_bytes: u.memory_working_set,
            memory_limit_bytes: u.memory_limit,
        }
    }
}

/// Common head of every line.
#[derive(Serialize)]
struct Head<'a> {
    r#type: &'static str,
    time: &'a str,
    interval_seconds: f64,
}

#[derive(Serialize)]
struct CgroupLine<'a> {
    #[serde(flatten)]
    head: Head<'a>,
    cgroup_id: u64,
    cgroup_path: Option<&'a str>,
    #[serde(flatten)]
    traffic: TrafficFields,
}

#[derive(Serialize)]
struct WorkloadLine<'a> {
    #[serde(flatten)]
    head: Head<'a>,
    platform: Option<&'static str>,
    stale: bool,
    stale_reason: Option<&'a str>,
    /// RFC 3339: the platform has not listed it since then, its cgroups still hold processes.
    unlisted_since: Option<String>,
    kind: WorkloadKind,
    id: &'a str,
    name: &'a str,
    namespace: Option<&'a str>,
    controller: Option<&'a OwnerRef>,
    labels: &'a std::collections::BTreeMap<String, String>,
    network_mode: String,
    cgroup_ids: &'a [u64],
    #[serde(flatten)]
    traffic: TrafficFields,
    #[serde(flatten)]
    usage: UsageFields,
    containers: Vec<ContainerLine<'a>>,
}

#[derive(Serialize)]
struct ContainerLine<'a> {
    id: &'a str,
    name: &'a str,
    image: Option<&'a str>,
    network_mode: String,
    cgroup_ids: &'a [u64],
    #[serde(flatten)]
    traffic: TrafficFields,
    #[serde(flatten)]
    usage: UsageFields,
}

#[derive(Serialize)]
struct ObserverLine<'a> {
    #[serde(flatten)]
    head: Head<'a>,
    cgroups: usize,
    workloads: usize,
    map_entries: usize,
    map_capacity: u32,
    map_full_drops: u64,
}

impl<W: Write + Send> JsonSink<W> {
    fn line(&mut self, value: &impl Serialize) -> Result<(), SinkError> {
        serde_json::to_writer(&mut self.out, value)?;
        self.out.write_all(b"\n")?;
        Ok(())
    }
}

fn container_line<'a>(c: &'a ContainerReport, snapshot: &Snapshot) -> ContainerLine<'a> {
    ContainerLine {
        id: &c.id,
        name: &c.name,
        image: c.image.as_deref(),
        network_mode: c.network_mode.name(),
        cgroup_ids: &c.cgroup_ids,
        traffic: TrafficFields::new(&c.traffic, snapshot),
        usage: (&c.usage).into(),
    }
}

fn workload_line<'a>(
    w: &'a WorkloadReport,
    time: &'a str,
    snapshot: &'a Snapshot,
) -> WorkloadLine<'a> {
    let platform = snapshot.platform.as_ref();
    WorkloadLine {
        head: Head {
            r#type: "task",
            time,
            interval_seconds: snapshot.interval.as_secs_f64(),
        },
        platform: platform.map(|p| p.source),
        stale: platform.is_some_and(|p| p.stale_since.is_some()),
        stale_reason: platform.and_then(|p| p.stale_reason.as_deref()),
        unlisted_since: platform
            .and_then(|p| p.unlisted_since(w.kind, &w.id))
            .map(|t| humantime::format_rfc3339_millis(t).to_string()),
        kind: w.kind,
        id: &w.id,
        name: &w.name,
        namespace: w.namespace.as_deref(),
        controller: w.controller.as_ref(),
        labels: &w.labels,
        network_mode: w.network_mode.name(),
        cgroup_ids: &w.cgroup_ids,
        traffic: TrafficFields::new(&w.traffic, snapshot),
        usage: (&w.usage).into(),
        containers: w
            .containers
            .iter()
            .map(|c| container_line(c, snapshot))
            .collect(),
    }
}

impl<W: Write + Send + 'static> Sink for JsonSink<W> {
    fn name(&self) -> &'static str {
        "json"
    }

    fn emit(&mut self, snapshot: &Snapshot) -> Result<(), SinkError> {
        let time = humantime::format_rfc3339_millis(snapshot.time).to_string();
        let head = |r#type| Head {
            r#type,
            time: &time,
            interval_seconds: snapshot.interval.as_secs_f64(),
        };
        for c in &snapshot.cgroups {
            self.line(&CgroupLine {
                head: head("cgroup"),
                cgroup_id: c.cgroup_id,
                cgroup_path: c.path.as_deref(),
                traffic: TrafficFields::new(&c.delta, snapshot),
            })?;
        }
        for w in &snapshot.workloads {
            self.line(&workload_line(w, &time, snapshot))?;
        }
        let h = &snapshot.health;
        self.line(&ObserverLine {
            head: head("observer"),
            cgroups: snapshot.cgroups.len(),
            workloads: snapshot.workloads.len(),
            map_entries: h.map_entries,
            map_capacity: h.map_capacity,
            map_full_drops: h.map_full_drops,
        })?;
        self.out.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::BTreeMap,
        time::{Duration, UNIX_EPOCH},
    };

    use observer_common::Counter;
    use serde_json::Value;

    use super::*;
    use crate::snapshot::{CgroupTraffic, Health, NetworkMode, PlatformStatus, Unlisted};

    fn lines(snapshot: &Snapshot) -> Vec<Value> {
        let mut sink = JsonSink::new(Vec::new());
        sink.emit(snapshot).unwrap();
        String::from_utf8(sink.into_inner())
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn snapshot() -> Snapshot {
        Snapshot {
            time: UNIX_EPOCH + Duration::from_secs(1_795_000_000),
            interval: Duration::from_secs(2),
            cgroups: vec![CgroupTraffic {
                cgroup_id: 42,
                path: Some("/docker/abc".into()),
                delta: TrafficValue {
                    tx: Counter {
                        bytes: 1280,
                        packets: 10,
                    },
                    lo_rx: Counter {
                        bytes: 64,
                        packets: 1,
                    },
                    ..Default::default()
                },
            }],
            workloads: Vec::new(),
            held: Vec::new(),
            host: Default::default(),
            platform: None,
            health: Health {
                programs_attached: 2,
                map_entries: 3,
                map_capacity: 16384,
                map_full_drops: 0,
                sinks: Vec::new(),
            },
        }
    }

    #[test]
    fn one_line_per_cgroup_then_one_for_observer() {
        let lines = lines(&snapshot());
        assert_eq!(lines.len(), 2);
        let c = &lines[0];
        assert_eq!(c["type"], "cgroup");
        assert_eq!(c["time"], "2026-11-18T11:06:40.000Z");
        assert_eq!(c["cgroup_id"], 42);
        assert_eq!(c["cgroup_path"], "/docker/abc");
        assert_eq!(c["tx_bytes"], 1280);
        assert_eq!(c["tx_packets"], 10);
        assert_eq!(c["tx_bytes_per_second"], 640.0);
        assert_eq!(c["lo_rx_bytes"], 64);
        assert_eq!(c["lo_rx_packets_per_second"], 0.5);
        assert_eq!(c["rx_bytes"], 0);
        assert_eq!(c["interval_seconds"], 2.0);
        let o = &lines[1];
        assert_eq!(o["type"], "observer");
        assert_eq!(o["cgroups"], 1);
        assert_eq!(o["workloads"], 0);
        assert_eq!(o["map_capacity"], 16384);
        assert_eq!(o["map_full_drops"], 0);
    }

    #[test]
    fn tasks_carry_their_containers_usage_and_staleness() {
        let mut s = snapshot();
        let traffic = TrafficValue {
            rx: Counter {
                bytes: 4000,
                packets: 4,
            },
            ..Default::default()
        };
        s.platform = Some(PlatformStatus {
            source: "ecs",
            stale_since: Some(UNIX_EPOCH),
            failures_total: 1,
            stale_reason: Some("the ECS agent listed no tasks".into()),
            unlisted: vec![
                Unlisted {
                    kind: WorkloadKind::EcsTask,
                    id: "8f03e41243824aea923aca126495f665".into(),
                    since: UNIX_EPOCH + Duration::from_millis(1_794_999_000_250),
                },
                // Same id, another kind: not this task.
                Unlisted {
                    kind: WorkloadKind::KubernetesPod,
                    id: "0".into(),
                    since: UNIX_EPOCH,
                },
            ],
        });
        s.workloads = vec![WorkloadReport {
            kind: WorkloadKind::EcsTask,
            id: "8f03e41243824aea923aca126495f665".into(),
            name: "web:12".into(),
            namespace: None,
            labels: BTreeMap::new(),
            controller: None,
            network_mode: NetworkMode::Awsvpc,
            cgroup_ids: vec![7, 8],
            traffic,
            usage: Usage {
                cpu_percent: Some(25.0),
                cpu_limit_cores: Some(0.5),
                memory_working_set: Some(1 << 20),
                memory_limit: Some(512 << 20),
            },
            containers: vec![ContainerReport {
                id: "c".repeat(64),
                name: "app".into(),
                image: Some("web:1.4".into()),
                network_mode: NetworkMode::Container("p".into()),
                cgroup_ids: vec![8],
                traffic,
                usage: Usage::default(),
                reach: Default::default(),
            }],
        }];
        let lines = lines(&s);
        assert_eq!(lines.len(), 3);
        let t = &lines[1];
        assert_eq!(t["type"], "task");
        assert_eq!(t["platform"], "ecs");
        assert_eq!(t["stale"], true);
        assert_eq!(t["stale_reason"], "the ECS agent listed no tasks");
        assert_eq!(t["unlisted_since"], "2026-11-18T10:50:00.250Z");
        assert_eq!(t["kind"], "ecs_task");
        assert_eq!(t["network_mode"], "awsvpc");
        assert_eq!(t["rx_bytes"], 4000);
        assert_eq!(t["rx_bytes_per_second"], 2000.0);
        assert_eq!(t["cpu_percent"], 25.0);
        assert_eq!(t["memory_limit_bytes"], 512u64 << 20);
        assert_eq!(t["cgroup_ids"], serde_json::json!([7, 8]));
        let c = &t["containers"][0];
        assert_eq!(c["name"], "app");
        assert_eq!(c["network_mode"], "container:p");
        assert_eq!(c["rx_bytes"], 4000);
        assert_eq!(c["cpu_percent"], Value::Null);
        assert_eq!(lines[2]["workloads"], 1);

        // Listed and answering: both null.
        s.platform = Some(PlatformStatus {
            stale_since: None,
            stale_reason: None,
            unlisted: Vec::new(),
            ..s.platform.clone().unwrap()
        });
        let t = &self::lines(&s)[1];
        assert_eq!(t["stale"], false);
        assert_eq!(t["stale_reason"], Value::Null);
        assert_eq!(t["unlisted_since"], Value::Null);
    }
}
