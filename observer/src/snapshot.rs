//! One interval's measurements: what every sink receives.

use std::time::{Duration, SystemTime};

use observer_common::TrafficValue;

use crate::workloads::WorkloadReport;

/// Everything measured in one interval. Sinks read it; nothing writes it after it is made.
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
    /// Entries in the traffic map after this interval's clean-up.
    pub map_entries: usize,
    pub map_capacity: u32,
    /// Packets not counted during this interval because the map was full.
    pub map_full_drops: u64,
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
    fn rates_divide_by_the_measured_interval() {
        assert_eq!(per_second(1000, Duration::from_secs(2)), 500.0);
        assert_eq!(per_second(3, Duration::from_millis(500)), 6.0);
        assert_eq!(per_second(3, Duration::ZERO), 0.0);
    }
}
