//! What the endpoint shows, kept between scrapes: each interval's deltas added up into totals
//! per label set, the latest gauges, and observer's own health.
//!
//! Pure bookkeeping, no I/O: [`State::record`] takes a snapshot, the collector reads the
//! result at scrape time. A workload or container missing from a snapshot loses its series;
//! if it comes back its counters start again from zero, which `rate()` reads as a reset.

use std::{
    collections::BTreeMap,
    time::{Instant, SystemTime},
};

use observer_common::TrafficValue;

use super::labels::{ContainerInfo, ContainerSeries, Owner, WorkloadInfo, WorkloadSeries};
use crate::{
    snapshot::Snapshot,
    snapshot::{ContainerReport, SinkStatus, Usage, WorkloadReport},
};

/// Bytes and packets since the series began, per direction, loopback apart.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TrafficTotals(pub TrafficValue);

impl TrafficTotals {
    /// Adds one interval's delta. Saturating: a counter never goes backwards.
    pub fn add(&mut self, d: &TrafficValue) {
        self.0 = self.0.saturating_plus(*d);
    }
}

/// Counters and gauges of one workload or container.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Totals {
    pub traffic: TrafficTotals,
    /// CPU time, summed from each interval's `cpu_percent` x interval; None until the first
    /// interval with a CPU reading (a container's first interval has no earlier sample).
    pub cpu_seconds: Option<f64>,
    /// The latest interval's values.
    pub usage: Usage,
}

impl Totals {
    fn add(&mut self, traffic: &TrafficValue, usage: &Usage, interval_secs: f64) {
        self.traffic.add(traffic);
        if let Some(percent) = usage.cpu_percent {
            // A negative reading would make the counter go backwards; cgroupfs never gives one.
            let used = (percent / 100.0 * interval_secs).max(0.0);
            *self.cpu_seconds.get_or_insert(0.0) += used;
        }
        self.usage = *usage;
    }
}

/// A live workload: its totals and the facts of its info series.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkloadEntry {
    pub totals: Totals,
    pub info: WorkloadInfo,
}

/// A live container: its totals and the facts of its info series.
#[derive(Debug, Clone, PartialEq)]
pub struct ContainerEntry {
    pub totals: Totals,
    pub info: ContainerInfo,
}

/// observer's own health, from the snapshots.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Own {
    /// Kernel programs attached during the latest interval.
    pub programs_attached: usize,
    /// Traffic map entries and capacity after the latest interval.
    pub map_entries: usize,
    pub map_capacity: u32,
    /// Packets not counted because the traffic map was full, since start.
    pub map_full_drops: u64,
    /// Failed calls to the platform's metadata API, since start.
    pub metadata_api_errors: u64,
    /// Once a platform is known.
    pub inventory: Option<InventoryState>,
    /// Values waiting for the Mackerel API; None while no Mackerel output says otherwise.
    pub mackerel_queue_depth: Option<u64>,
    pub mackerel_dropped_values: Option<u64>,
    /// Every output's delivery state, as of the latest interval.
    pub sinks: Vec<SinkStatus>,
    /// Intervals recorded since start.
    pub cycles: u64,
    /// End of the latest interval (wall clock, for the metric).
    pub last_cycle_time: Option<SystemTime>,
    /// When the latest interval was recorded (monotonic, for /healthz).
    pub last_cycle_at: Option<Instant>,
}

/// How the platform's inventory stands, as of the latest interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InventoryState {
    pub source: &'static str,
    /// The metadata API fails; the workloads are its last good answer.
    pub stale: bool,
    /// Workloads kept while the source does not list them (their cgroups hold processes).
    pub unlisted: usize,
}

/// Everything the endpoint shows.
#[derive(Debug, Default)]
pub struct State {
    pub workloads: BTreeMap<WorkloadSeries, WorkloadEntry>,
    pub containers: BTreeMap<ContainerSeries, ContainerEntry>,
    /// Traffic of cgroups that belong to no workload: host processes, system services, and
    /// (with no platform) everything.
    pub host: TrafficTotals,
    pub own: Own,
}

impl State {
    /// Adds one interval. Workloads and containers not in `snapshot` lose their series.
    pub fn record(&mut self, snapshot: &Snapshot, now: Instant) {
        let secs = snapshot.interval.as_secs_f64();
        let mut workloads = BTreeMap::new();
        let mut containers = BTreeMap::new();
        for w in &snapshot.workloads {
            let key = WorkloadSeries::of(w);
            // Two reports with the same labels (which no platform makes) add up.
            let entry = workloads
                .entry(key.clone())
                .or_insert_with(|| WorkloadEntry {
                    totals: self
                        .workloads
                        .remove(&key)
                        .map(|e| e.totals)
                        .unwrap_or_default(),
                    info: workload_info(w),
                });
            entry.totals.add(&w.traffic, &w.usage, secs);
            for c in &w.containers {
                let key = ContainerSeries::of(w, c);
                let entry = containers
                    .entry(key.clone())
                    .or_insert_with(|| ContainerEntry {
                        totals: self
                            .containers
                            .remove(&key)
                            .map(|e| e.totals)
                            .unwrap_or_default(),
                        info: container_info(c),
                    });
                entry.totals.add(&c.traffic, &c.usage, secs);
            }
        }
        self.workloads = workloads;
        self.containers = containers;
        self.host.add(&snapshot.host);

        let own = &mut self.own;
        own.programs_attached = snapshot.health.programs_attached;
        own.metadata_api_errors = snapshot.platform.as_ref().map_or(0, |p| p.failures_total);
        let mackerel = snapshot.health.sinks.iter().find(|s| s.name == "mackerel");
        own.mackerel_queue_depth = mackerel.and_then(|s| s.backlog);
        own.mackerel_dropped_values = mackerel.and_then(|s| s.lost);
        own.sinks.clone_from(&snapshot.health.sinks);
        own.map_entries = snapshot.health.map_entries;
        own.map_capacity = snapshot.health.map_capacity;
        own.map_full_drops = own
            .map_full_drops
            .saturating_add(snapshot.health.map_full_drops);
        own.inventory = snapshot.platform.as_ref().map(|p| InventoryState {
            source: p.source,
            stale: p.is_stale(),
            unlisted: p.unlisted.len(),
        });
        own.cycles += 1;
        own.last_cycle_time = Some(snapshot.time);
        own.last_cycle_at = Some(now);
    }
}

fn workload_info(w: &WorkloadReport) -> WorkloadInfo {
    WorkloadInfo {
        owner: Owner(
            w.controller
                .as_ref()
                .map(|o| (o.kind.clone(), o.name.clone())),
        ),
        network_mode: w.network_mode.name(),
    }
}

fn container_info(c: &ContainerReport) -> ContainerInfo {
    ContainerInfo {
        container_id: c.id.clone(),
        image: c.image.clone().unwrap_or_default(),
        network_mode: c.network_mode.name(),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;
    use crate::snapshot::{
        host_traffic, CgroupTraffic, Health, NetworkMode, PlatformStatus, WorkloadKind,
    };
    use observer_common::Counter;

    pub fn traffic(rx: u64, tx: u64, lo: u64) -> TrafficValue {
        TrafficValue {
            rx: Counter {
                bytes: rx,
                packets: rx / 100,
            },
            tx: Counter {
                bytes: tx,
                packets: tx / 100,
            },
            lo_rx: Counter {
                bytes: lo,
                packets: lo / 100,
            },
            lo_tx: Counter {
                bytes: lo,
                packets: lo / 100,
            },
        }
    }

    /// A Kubernetes pod `shop/<pod>` with one container `app` on cgroup `cgroup`.
    pub fn pod(
        pod: &str,
        cgroup: u64,
        t: TrafficValue,
        cpu_percent: Option<f64>,
    ) -> WorkloadReport {
        let usage = Usage {
            cpu_percent,
            cpu_limit_cores: Some(0.5),
            memory_working_set: Some(64 << 20),
            memory_limit: Some(256 << 20),
        };
        WorkloadReport {
            kind: WorkloadKind::KubernetesPod,
            id: format!("uid-{pod}"),
            name: format!("shop/{pod}"),
            namespace: Some("shop".into()),
            labels: BTreeMap::new(),
            controller: None,
            network_mode: NetworkMode::Pod,
            cgroup_ids: vec![cgroup],
            traffic: t,
            usage,
            containers: vec![ContainerReport {
                id: format!("{cgroup:064x}"),
                name: "app".into(),
                image: Some("shop/web:1".into()),
                network_mode: NetworkMode::Pod,
                cgroup_ids: vec![cgroup],
                traffic: t,
                usage,
                reach: Default::default(),
            }],
        }
    }

    pub fn snapshot(workloads: Vec<WorkloadReport>, cgroups: Vec<(u64, TrafficValue)>) -> Snapshot {
        let cgroups: Vec<CgroupTraffic> = cgroups
            .into_iter()
            .map(|(cgroup_id, delta)| CgroupTraffic {
                cgroup_id,
                path: Some(format!("/test/{cgroup_id}")),
                delta,
            })
            .collect();
        Snapshot {
            time: UNIX_EPOCH + Duration::from_secs(1_795_000_000),
            interval: Duration::from_secs(2),
            host: host_traffic(&cgroups, &workloads, &[]),
            cgroups,
            workloads,
            held: Vec::new(),
            platform: Some(PlatformStatus {
                source: "kubernetes",
                stale_since: None,
                failures_total: 0,
                stale_reason: None,
                unlisted: Vec::new(),
            }),
            health: Health {
                programs_attached: 2,
                map_entries: 3,
                map_capacity: 16384,
                map_full_drops: 1,
                sinks: Vec::new(),
            },
        }
    }

    fn only_container(state: &State) -> &ContainerEntry {
        assert_eq!(state.containers.len(), 1);
        state.containers.values().next().unwrap()
    }

    #[test]
    fn counters_accumulate_interval_deltas() {
        let mut state = State::default();
        let now = Instant::now();
        for _ in 0..3 {
            let t = traffic(1000, 300, 100);
            state.record(
                &snapshot(vec![pod("web", 7, t, Some(25.0))], vec![(7, t)]),
                now,
            );
        }
        let c = only_container(&state);
        assert_eq!(c.totals.traffic.0, traffic(3000, 900, 300));
        // 25 % of one core for 3 x 2 s.
        assert_eq!(c.totals.cpu_seconds, Some(1.5));
        assert_eq!(c.totals.usage.memory_working_set, Some(64 << 20));
        let w = state.workloads.values().next().unwrap();
        assert_eq!(w.totals.traffic.0.rx.bytes, 3000);
        assert_eq!(state.own.cycles, 3);
        assert_eq!(state.own.map_full_drops, 3);
        assert_eq!(
            state.own.inventory,
            Some(InventoryState {
                source: "kubernetes",
                stale: false,
                unlisted: 0
            })
        );
        assert_eq!(
            state.host,
            TrafficTotals::default(),
            "the pod's cgroup is not host traffic"
        );
    }

    #[test]
    fn cpu_seconds_start_with_the_first_reading() {
        let mut state = State::default();
        let now = Instant::now();
        let t = TrafficValue::default();
        state.record(&snapshot(vec![pod("web", 7, t, None)], vec![]), now);
        assert_eq!(only_container(&state).totals.cpu_seconds, None);
        state.record(&snapshot(vec![pod("web", 7, t, Some(50.0))], vec![]), now);
        assert_eq!(only_container(&state).totals.cpu_seconds, Some(1.0));
        state.record(&snapshot(vec![pod("web", 7, t, None)], vec![]), now);
        assert_eq!(only_container(&state).totals.cpu_seconds, Some(1.0));
    }

    #[test]
    fn gone_containers_lose_their_series_and_come_back_from_zero() {
        let mut state = State::default();
        let now = Instant::now();
        let t = traffic(1000, 0, 0);
        let both = || vec![pod("web", 7, t, None), pod("db", 8, t, None)];
        state.record(&snapshot(both(), vec![]), now);
        state.record(&snapshot(vec![pod("db", 8, t, None)], vec![]), now);
        assert_eq!(state.containers.len(), 1);
        assert_eq!(state.workloads.len(), 1);
        let db = only_container(&state);
        assert_eq!(
            db.totals.traffic.0.rx.bytes, 2000,
            "the survivor keeps its total"
        );
        state.record(&snapshot(both(), vec![]), now);
        let totals: Vec<u64> = state
            .containers
            .values()
            .map(|c| c.totals.traffic.0.rx.bytes)
            .collect();
        assert_eq!(totals, [3000, 1000], "db keeps counting; web starts again");
        state.record(&snapshot(vec![], vec![]), now);
        assert!(state.containers.is_empty() && state.workloads.is_empty());
    }

    #[test]
    fn cgroups_of_no_workload_are_host_traffic() {
        let mut state = State::default();
        let now = Instant::now();
        let t = traffic(100, 10, 1);
        let s = snapshot(vec![pod("web", 7, t, None)], vec![(7, t), (1, t), (2, t)]);
        state.record(&s, now);
        state.record(&s, now);
        assert_eq!(state.host.0, traffic(400, 40, 4));
    }

    #[test]
    fn counters_saturate_instead_of_wrapping() {
        let mut totals = TrafficTotals::default();
        totals.add(&traffic(u64::MAX - 1, 0, 0));
        totals.add(&traffic(5, 0, 0));
        assert_eq!(totals.0.rx.bytes, u64::MAX);
    }

    #[test]
    fn staleness_and_unlisted_workloads_follow_the_latest_snapshot() {
        let mut state = State::default();
        let mut s = snapshot(vec![], vec![]);
        let unlisted = |id: &str| crate::snapshot::Unlisted {
            kind: WorkloadKind::EcsTask,
            id: id.into(),
            since: UNIX_EPOCH,
        };
        s.platform = Some(PlatformStatus {
            source: "ecs",
            stale_since: Some(UNIX_EPOCH),
            failures_total: 0,
            stale_reason: None,
            unlisted: vec![unlisted("a"), unlisted("b")],
        });
        state.record(&s, Instant::now());
        assert_eq!(
            state.own.inventory,
            Some(InventoryState {
                source: "ecs",
                stale: true,
                unlisted: 2
            })
        );
        s.platform.as_mut().unwrap().unlisted.pop();
        state.record(&s, Instant::now());
        assert_eq!(state.own.inventory.unwrap().unlisted, 1);
        s.platform = None;
        state.record(&s, Instant::now());
        assert_eq!(state.own.inventory, None);
    }
}
