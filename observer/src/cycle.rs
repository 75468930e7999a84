//! One interval, one way: the traffic map, the cgroup hierarchy, the inventory and the join in,
//! one whole [`Snapshot`] out. Every decision of the interval is made here (whether to walk the
//! hierarchy, whether to fetch the inventory: at most once), so the run loop only waits, calls
//! [`Cycle::run`] and hands the snapshot to the sinks. The bench measures this same code.

use std::{collections::HashMap, time::SystemTime};

use observer_common::TrafficValue;

use crate::{
    collect::{CollectError, Collector},
    inventory::{refresh::Refresher, Inventory},
    snapshot::{host_traffic, Health, PlatformStatus, SinkStatus, Snapshot, Unlisted},
    workloads::Joiner,
};

/// The hierarchy is walked at least every this many intervals, to pick up cgroups no
/// inventory asks about (a runtime's child cgroups); otherwise only when something is missing.
pub const WALK_AT_LEAST_EVERY: u32 = 10;

pub struct Cycle {
    collector: Collector,
    /// None with `--platform none`: cgroups only.
    refresher: Option<Refresher>,
    joiner: Joiner,
    programs_attached: usize,
    since_walk: u32,
}

impl Cycle {
    pub fn new(
        collector: Collector,
        refresher: Option<Refresher>,
        joiner: Joiner,
        programs_attached: usize,
    ) -> Self {
        Self {
            collector,
            refresher,
            joiner,
            programs_attached,
            since_walk: 0,
        }
    }

    /// The traffic collector, for tests that look at the map behind it.
    pub fn collector_mut(&mut self) -> &mut Collector {
        &mut self.collector
    }

    /// The platform source's name, if there is one.
    pub fn platform(&self) -> Option<&'static str> {
        self.refresher.as_ref().map(Refresher::source_name)
    }

    /// Measures the interval since the last call. `sinks` is how the outputs stand now (their
    /// drops and backlogs are observer's own health, reported with the rest).
    pub async fn run(&mut self, sinks: Vec<SinkStatus>) -> Result<Snapshot, CollectError> {
        let collected = self.collector.collect()?;
        let traffic: HashMap<u64, TrafficValue> = collected
            .cgroups
            .iter()
            .map(|c| (c.cgroup_id, c.delta))
            .collect();

        let (workloads, held, platform) = match &mut self.refresher {
            None => {
                // Cgroups only: walk now and then so that entries of removed cgroups are
                // freed, and every interval while the map is (nearly) full, so it recovers as
                // soon as they go.
                self.since_walk += 1;
                let nearly_full =
                    collected.map_entries as u64 * 10 >= u64::from(collected.map_capacity) * 9;
                if self.since_walk >= WALK_AT_LEAST_EVERY
                    || collected.map_full_drops > 0
                    || nearly_full
                {
                    self.since_walk = 0;
                    if let Err(e) = self.collector.rescan() {
                        log::warn!("walking the cgroup hierarchy: {e}");
                    }
                }
                (Vec::new(), Vec::new(), None)
            }
            Some(refresher) => {
                let unknown =
                    Self::inventory(&mut self.collector, refresher, &mut self.since_walk).await;
                let index = self.collector.index();
                let workloads = self.joiner.join(
                    refresher.inventory(),
                    &|id| index.path(id),
                    &traffic,
                    &unknown,
                    std::time::Instant::now(),
                );
                let platform = PlatformStatus {
                    source: refresher.source_name(),
                    stale_since: refresher.stale().map(|s| s.since),
                    stale_reason: refresher.stale().map(|s| s.reason.clone()),
                    failures_total: refresher.failures_total(),
                    unlisted: unlisted(refresher.inventory()),
                };
                (workloads, self.joiner.held(), Some(platform))
            }
        };

        let host = host_traffic(&collected.cgroups, &workloads, &held);
        Ok(Snapshot {
            time: SystemTime::now(),
            interval: collected.interval,
            cgroups: collected.cgroups,
            workloads,
            held,
            host,
            platform,
            health: Health {
                programs_attached: self.programs_attached,
                map_entries: collected.map_entries,
                map_capacity: collected.map_capacity,
                map_full_drops: collected.map_full_drops,
                sinks,
            },
        })
    }

    /// This interval's inventory with the cgroups attached: at most one fetch, and a walk of
    /// the hierarchy when a listed container has no cgroup yet (it is newer than the last
    /// walk) or the last walk is [`WALK_AT_LEAST_EVERY`] intervals old. Returns the cgroups
    /// that look like containers the inventory does not list yet.
    async fn inventory(
        collector: &mut Collector,
        refresher: &mut Refresher,
        since_walk: &mut u32,
    ) -> Vec<u64> {
        let paths: Vec<(u64, &str)> = collector.index().iter().collect();
        let (inventory, mut unknown) = refresher.tick(tokio::time::Instant::now(), &paths).await;
        *since_walk += 1;
        if *since_walk >= WALK_AT_LEAST_EVERY || has_container_without_cgroup(inventory) {
            *since_walk = 0;
            if let Err(e) = collector.rescan() {
                log::warn!("walking the cgroup hierarchy: {e}");
            }
            let paths: Vec<(u64, &str)> = collector.index().iter().collect();
            // Attach only: the one fetch of this interval, if any, is done.
            unknown = refresher.attach(&paths);
        }
        unknown.into_iter().map(|u| u.cgroup_id).collect()
    }
}

/// The workloads kept while their platform does not list them.
fn unlisted(inventory: &Inventory) -> Vec<Unlisted> {
    (inventory.workloads.iter())
        .filter_map(|w| {
            Some(Unlisted {
                kind: w.kind,
                id: w.id.clone(),
                since: w.unlisted_since?,
            })
        })
        .collect()
}

fn has_container_without_cgroup(inventory: &Inventory) -> bool {
    inventory
        .workloads
        .iter()
        .flat_map(|t| t.containers.iter())
        .chain(inventory.standalone.iter())
        .any(|c| c.cgroup_ids.is_empty())
}
