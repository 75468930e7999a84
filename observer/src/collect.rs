//! One interval: read the maps, turn totals into deltas, name each cgroup, clean up entries of
//! cgroups that are gone, and hand back a [`Snapshot`].

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    time::{Instant, SystemTime},
};

use observer_common::{TrafficKey, TrafficValue};

use crate::{
    cgroupfs::{CgroupError, CgroupIndex},
    delta::{accumulate, is_zero, DeltaTracker},
    inventory::Inventory,
    snapshot::{CgroupTraffic, Health, Snapshot},
    traffic::{Reading, TrafficError, TrafficReader},
};

#[derive(Debug, thiserror::Error)]
pub enum CollectError {
    #[error(transparent)]
    Traffic(#[from] TrafficError),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
}

pub struct Collector {
    reader: TrafficReader,
    index: CgroupIndex,
    deltas: DeltaTracker,
    /// Paths named in the last snapshot: a cgroup removed since still gets its final counts
    /// under its name.
    last_paths: HashMap<u64, String>,
    /// Ids no walk of the hierarchy found: not worth another walk until a new one shows up.
    unresolved: HashSet<u64>,
    last: Instant,
    last_map_full: u64,
    walks_skipped: u32,
}

/// The hierarchy is walked at least this often (in calls of [`Collector::should_walk`]), to
/// pick up cgroups no inventory asks about (a runtime's child cgroups).
pub const WALK_AT_LEAST_EVERY: u32 = 10;

impl Collector {
    pub fn new(reader: TrafficReader, index: CgroupIndex) -> Self {
        Self {
            reader,
            index,
            deltas: DeltaTracker::default(),
            last_paths: HashMap::new(),
            unresolved: HashSet::new(),
            last: Instant::now(),
            last_map_full: 0,
            walks_skipped: 0,
        }
    }

    /// Walks the cgroup v2 hierarchy again (new containers that have not sent anything yet).
    pub fn rescan(&mut self) -> Result<(), CgroupError> {
        self.walks_skipped = 0;
        self.index.rescan()
    }

    /// Whether the hierarchy should be walked again before joining `inventory`: one of its
    /// containers has no cgroup (it is newer than the last walk), or the last walk is
    /// [`WALK_AT_LEAST_EVERY`] calls old. Walking every interval would cost a few syscalls
    /// per cgroup for nothing on a node whose containers do not change.
    pub fn should_walk(&mut self, inventory: &Inventory) -> bool {
        self.walks_skipped += 1;
        self.walks_skipped >= WALK_AT_LEAST_EVERY
            || inventory
                .tasks
                .iter()
                .flat_map(|t| t.containers.iter())
                .chain(inventory.standalone.iter())
                .any(|c| c.cgroup_ids.is_empty())
    }

    /// The cgroup v2 hierarchy as last walked.
    pub fn index(&self) -> &CgroupIndex {
        &self.index
    }

    /// The map reader, for tests that check what the clean-up left in the map.
    pub fn reader_mut(&mut self) -> &mut TrafficReader {
        &mut self.reader
    }

    pub fn collect(&mut self) -> Result<Snapshot, CollectError> {
        let reading = self.reader.read()?;
        let now = Instant::now();
        let interval = now - self.last;
        self.last = now;
        let mut snapshot = self.build(reading)?;
        snapshot.interval = interval;
        Ok(snapshot)
    }

    fn build(&mut self, reading: Reading) -> Result<Snapshot, CollectError> {
        let Reading { entries, map_full } = reading;
        let present: HashSet<TrafficKey> = entries.iter().map(|(k, _)| *k).collect();
        self.deltas.retain(|k| present.contains(k));

        // Keys may gain dimensions besides the cgroup (observer-common); a cgroup is their sum.
        let mut by_cgroup: BTreeMap<u64, (TrafficValue, Vec<TrafficKey>)> = BTreeMap::new();
        for (key, total) in entries {
            let delta = self.deltas.delta(key, total);
            let slot = by_cgroup.entry(key.cgroup_id).or_default();
            accumulate(&mut slot.0, &delta);
            slot.1.push(key);
        }

        let new_unknown = by_cgroup.keys().any(|id| {
            self.index.path(*id).is_none()
                && !self.last_paths.contains_key(id)
                && !self.unresolved.contains(id)
        });
        if new_unknown {
            self.index.rescan()?;
        }

        let mut cgroups = Vec::with_capacity(by_cgroup.len());
        let mut paths = HashMap::with_capacity(by_cgroup.len());
        let mut entries_left = present.len();
        for (cgroup_id, (delta, keys)) in by_cgroup {
            let path = self
                .index
                .path(cgroup_id)
                .map(str::to_owned)
                .or_else(|| self.last_paths.get(&cgroup_id).cloned());
            let exists = self.index.path(cgroup_id).is_some();
            if !exists && is_zero(&delta) {
                // Gone, and its last counts were reported: free its entries. A socket that
                // outlives its cgroup and sends again would get a fresh entry from zero.
                for key in &keys {
                    self.reader.remove(key)?;
                }
                self.deltas.retain(|k| k.cgroup_id != cgroup_id);
                self.unresolved.remove(&cgroup_id);
                entries_left -= keys.len();
                continue;
            }
            if path.is_none() {
                self.unresolved.insert(cgroup_id);
            }
            if let Some(p) = &path {
                paths.insert(cgroup_id, p.clone());
            }
            cgroups.push(CgroupTraffic {
                cgroup_id,
                path,
                delta,
            });
        }
        self.last_paths = paths;

        let map_full_drops = map_full.wrapping_sub(self.last_map_full);
        self.last_map_full = map_full;
        if map_full_drops > 0 {
            log::warn!(
                "{map_full_drops} packets were not counted this interval: the traffic map is full \
                 ({} entries); raise --map-entries",
                self.reader.capacity()
            );
        }
        Ok(Snapshot {
            time: SystemTime::now(),
            interval: Default::default(),
            cgroups,
            workloads: Vec::new(),
            held: Vec::new(),
            platform: None,
            health: Health {
                map_entries: entries_left,
                map_capacity: self.reader.capacity(),
                map_full_drops,
            },
        })
    }
}
