//! One interval's measurements: what every sink receives, whole. The cycle makes it once;
//! nothing writes it afterwards, and sinks only read it. A leaf: it depends on nothing else
//! in observer, so every part can use its types.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    time::{Duration, SystemTime},
};

use observer_common::TrafficValue;
use serde::Serialize;

/// Everything measured in one interval.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// When the interval ended.
    pub time: SystemTime,
    /// Measured length of the interval (rates divide by this, not by the configured interval).
    pub interval: Duration,
    pub cgroups: Vec<CgroupTraffic>,
    /// ECS tasks, pods, Compose projects and lone containers, when a platform is known.
    pub workloads: Vec<WorkloadReport>,
    /// cgroups whose traffic this interval is held for a container the inventory does not
    /// list yet: neither a workload's nor the host's (it goes to the container next interval).
    pub held: Vec<u64>,
    /// Traffic of the cgroups no workload claims and none is held for: host processes and
    /// system services; with no platform, every cgroup.
    pub host: TrafficValue,
    pub platform: Option<PlatformStatus>,
    pub health: Health,
}

/// Where the workloads came from, and whether that source is answering.
#[derive(Debug, Clone, PartialEq)]
pub struct PlatformStatus {
    /// "ecs", "kubernetes", "docker".
    pub source: &'static str,
    /// Set while the source fails: the workloads are the last good answer, from this time.
    pub stale_since: Option<SystemTime>,
    /// Why, while stale: the latest failure, or an answer that listed no workload while
    /// workloads' cgroups still held processes.
    pub stale_reason: Option<String>,
    /// Failed calls to the source's API since start, empty answers taken for outages included.
    pub failures_total: u64,
    /// Workloads kept although the source's answers no longer list them: their cgroups still
    /// exist and the source has not said they stopped. At most one per cgroup that exists.
    pub unlisted: Vec<Unlisted>,
}

impl PlatformStatus {
    pub fn is_stale(&self) -> bool {
        self.stale_since.is_some()
    }

    /// Since when the source has not listed this workload, if it is one kept unlisted.
    pub fn unlisted_since(&self, kind: WorkloadKind, id: &str) -> Option<SystemTime> {
        self.unlisted
            .iter()
            .find(|u| u.kind == kind && u.id == id)
            .map(|u| u.since)
    }
}

/// A workload in the snapshot that its platform no longer lists while its cgroups hold processes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unlisted {
    pub kind: WorkloadKind,
    pub id: String,
    /// The first answer that left it out.
    pub since: SystemTime,
}

/// Traffic of one cgroup during the interval.
#[derive(Debug, Clone, PartialEq)]
pub struct CgroupTraffic {
    pub cgroup_id: u64,
    /// Path relative to the cgroup v2 root ("/docker/<id>"); None when the cgroup was gone
    /// before observer ever saw its directory.
    pub path: Option<String>,
    pub delta: TrafficValue,
}

/// observer's own state during the interval.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Health {
    /// Kernel programs attached while the interval was measured.
    pub programs_attached: usize,
    /// Entries in the traffic map after this interval's clean-up.
    pub map_entries: usize,
    pub map_capacity: u32,
    /// Packets not counted during this interval because the map was full.
    pub map_full_drops: u64,
    /// The outputs as they were when the interval ended.
    pub sinks: Vec<SinkStatus>,
}

/// One output's delivery state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SinkStatus {
    /// "json", "table", "prometheus", "mackerel".
    pub name: &'static str,
    /// Snapshots it could not take because it was still busy with earlier ones, since start.
    pub dropped: u64,
    /// What waits inside it for delivery (Mackerel: values for the API), when it says.
    pub backlog: Option<u64>,
    /// What its own bounds dropped since start (Mackerel: values the API never took in
    /// time), when it keeps such a bound.
    pub lost: Option<u64>,
    /// It has stopped for good (stdout closed).
    pub ended: bool,
}

/// What a workload is. Containers that belong to no task, pod or Compose project are
/// workloads of their own (`Container`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkloadKind {
    EcsTask,
    KubernetesPod,
    /// Containers sharing a `com.docker.compose.project` label.
    ComposeProject,
    Container,
}

/// Kind and name of an owning object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OwnerRef {
    pub kind: String,
    pub name: String,
}

/// Whose network namespace a container or workload uses. It decides how traffic may be summed:
/// containers sharing one namespace must not be counted once each.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case", tag = "mode", content = "target")]
pub enum NetworkMode {
    /// Docker's default bridge (`default` or `bridge`).
    Bridge,
    /// The host's namespace.
    Host,
    /// No network.
    None,
    /// Another container's namespace (`container:<id>`; ECS awsvpc app containers).
    Container(String),
    /// A user-defined Docker network, by name: a namespace of its own on that network.
    Network(String),
    /// ECS awsvpc: one namespace per task, owned by the pause container.
    Awsvpc,
    /// A Kubernetes pod's own namespace, shared by its containers.
    Pod,
    /// The source did not say.
    #[default]
    Unknown,
}

impl NetworkMode {
    /// "bridge", "host", "awsvpc", "container:<id>", ... as outputs show it.
    pub fn name(&self) -> String {
        match self {
            Self::Bridge => "bridge".into(),
            Self::Host => "host".into(),
            Self::None => "none".into(),
            Self::Container(target) => format!("container:{target}"),
            Self::Network(name) => name.clone(),
            Self::Awsvpc => "awsvpc".into(),
            Self::Pod => "pod".into(),
            Self::Unknown => "unknown".into(),
        }
    }
}

/// CPU and memory of one cgroup during the interval.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    /// Percent of one core (100 = one core busy for the whole interval).
    pub cpu_percent: Option<f64>,
    pub cpu_limit_cores: Option<f64>,
    /// Usage without inactive page cache.
    pub memory_working_set: Option<u64>,
    pub memory_limit: Option<u64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ContainerReport {
    pub id: String,
    pub name: String,
    pub image: Option<String>,
    pub network_mode: NetworkMode,
    pub cgroup_ids: Vec<u64>,
    pub traffic: TrafficValue,
    pub usage: Usage,
    /// Where its own metrics may be fetched, as the platform says.
    pub reach: Reach,
}

/// How a container can be reached, as its platform lists it, and what it declares about its
/// metrics endpoint. Nothing here is checked: `appmetrics::reach` validates it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Reach {
    /// Published ports (ECS `Ports`; Docker's port map as fallback).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortMapping>,
    /// The container's own addresses: an awsvpc task's ENI (`Networks`), a pod's IP (its
    /// node's for hostNetwork pods).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<IpAddr>,
    /// The scrape declarations of the workload: `ECS_PROMETHEUS_*` and `mackerel.io/plugins`
    /// Docker labels, `prometheus.io/*` pod annotations, as set.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub declared: BTreeMap<String, String>,
}

/// One published port: the container's port and the node's port it is mapped to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PortMapping {
    pub container_port: u16,
    /// None when the platform did not say (or the port is not published).
    pub host_port: Option<u16>,
    /// True for TCP (the default when the platform leaves it out).
    pub tcp: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct WorkloadReport {
    pub kind: WorkloadKind,
    pub id: String,
    pub name: String,
    pub namespace: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub controller: Option<OwnerRef>,
    pub network_mode: NetworkMode,
    /// Every cgroup of the workload (its containers' and its own, such as a pause container
    /// no API lists), each once.
    pub cgroup_ids: Vec<u64>,
    pub traffic: TrafficValue,
    /// Sums over the containers; limits are the workload's own when the platform sets one.
    pub usage: Usage,
    pub containers: Vec<ContainerReport>,
}

/// Traffic of the cgroups that no workload claims and none is held for: the host's.
pub fn host_traffic(
    cgroups: &[CgroupTraffic],
    workloads: &[WorkloadReport],
    held: &[u64],
) -> TrafficValue {
    let claimed: std::collections::HashSet<u64> = workloads
        .iter()
        .flat_map(|w| {
            w.cgroup_ids
                .iter()
                .chain(w.containers.iter().flat_map(|c| &c.cgroup_ids))
        })
        .chain(held)
        .copied()
        .collect();
    cgroups
        .iter()
        .filter(|c| !claimed.contains(&c.cgroup_id))
        .map(|c| c.delta)
        .sum()
}

/// Per-second rate of `count` over `interval`.
pub fn per_second(count: u64, interval: Duration) -> f64 {
    let secs = interval.as_secs_f64();
    if secs > 0.0 {
        count as f64 / secs
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_modes_are_named_as_docker_names_them() {
        assert_eq!(NetworkMode::Container("abc".into()).name(), "container:abc");
        assert_eq!(
            NetworkMode::Network("web_default".into()).name(),
            "web_default"
        );
        assert_eq!(NetworkMode::Awsvpc.name(), "awsvpc");
    }

    #[test]
    fn rates_divide_by_the_measured_interval() {
        assert_eq!(per_second(1000, Duration::from_secs(2)), 500.0);
        assert_eq!(per_second(3, Duration::from_millis(500)), 6.0);
        assert_eq!(per_second(3, Duration::ZERO), 0.0);
    }
}
