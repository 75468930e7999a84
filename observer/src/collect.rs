//! The traffic half of an interval: read the map, turn totals into deltas, name each cgroup,
//! free the entries of cgroups that are gone once their last counts were taken.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    time::{Duration, Instant},
};

use observer_common::{Counter, TrafficKey, TrafficValue, REPORTED_MAP_FULL_KEY};

use crate::{
    cgroupfs::{CgroupError, CgroupIndex},
    delta::DeltaTracker,
    snapshot::CgroupTraffic,
    traffic::{Reading, Retired, TrafficError, TrafficReader},
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
    /// Pinned: every report is recorded in the reported map, for the next run to resume from.
    persist: bool,
    /// Counts an earlier run had not reported, from maps it left in another shape: added to
    /// the first interval.
    pending: Vec<(TrafficKey, TrafficValue)>,
    /// Keys the reported map holds that the next reading may no longer have.
    stale_reported: HashSet<TrafficKey>,
}

/// What a run resumes from: the reported map of the run before, and counts it had not
/// reported from maps that could not be re-opened as they were.
#[derive(Debug, Clone, Default)]
pub struct Resume {
    pub pending: Vec<(TrafficKey, TrafficValue)>,
}

/// One interval of the traffic map.
#[derive(Debug, Clone, Default)]
pub struct Collected {
    /// Measured since the previous collection.
    pub interval: Duration,
    /// Every cgroup with traffic this interval, or gone with its last counts.
    pub cgroups: Vec<CgroupTraffic>,
    /// Entries left in the map after the clean-up, and what it can hold.
    pub map_entries: usize,
    pub map_capacity: u32,
    /// Packets not counted this interval because the map was full.
    pub map_full_drops: u64,
}

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
            persist: false,
            pending: Vec::new(),
            stale_reported: HashSet::new(),
        }
    }

    /// A collector that goes on from pinned state: the deltas start from what the run before
    /// reported (so the gap between the runs is counted once), and every report is recorded.
    pub fn resume(
        reader: TrafficReader,
        index: CgroupIndex,
        resume: Resume,
    ) -> Result<Self, CollectError> {
        let mut this = Self::new(reader, index);
        for (key, total) in this.reader.reported()? {
            if key == REPORTED_MAP_FULL_KEY {
                this.last_map_full = total.rx.packets;
            } else {
                this.deltas.seed(key, total);
                this.reader.seed(key, total);
                this.stale_reported.insert(key);
            }
        }
        this.persist = true;
        this.pending = resume.pending;
        Ok(this)
    }

    /// Walks the cgroup v2 hierarchy again (new containers that have not sent anything yet).
    pub fn rescan(&mut self) -> Result<(), CgroupError> {
        self.index.rescan()
    }

    /// Entries the traffic map can hold.
    pub fn capacity(&self) -> u32 {
        self.reader.capacity()
    }

    /// The cgroup v2 hierarchy as last walked.
    pub fn index(&self) -> &CgroupIndex {
        &self.index
    }

    /// The map reader, for tests that check what the clean-up left in the map.
    pub fn reader_mut(&mut self) -> &mut TrafficReader {
        &mut self.reader
    }

    /// Drops what was reported of a key whose entry is gone for good.
    fn forget(&mut self, key: &TrafficKey) -> Result<(), CollectError> {
        if self.persist {
            self.reader.forget_reported(key)?;
        }
        self.deltas.retain(|k| k != key);
        Ok(())
    }

    pub fn collect(&mut self) -> Result<Collected, CollectError> {
        let reading = self.reader.read()?;
        let now = Instant::now();
        let interval = now - self.last;
        self.last = now;
        let mut collected = self.build(reading)?;
        collected.interval = interval;
        Ok(collected)
    }

    fn build(&mut self, reading: Reading) -> Result<Collected, CollectError> {
        let Reading {
            entries,
            map_full,
            hash_entries,
            lingering,
            gone,
        } = reading;
        let present: HashSet<TrafficKey> = entries.iter().map(|(k, _)| *k).collect();
        // Retired keys keep what was reported of them while a cache slot still holds them.
        self.deltas
            .retain(|k| present.contains(k) || lingering.contains(k));

        // Keys may gain dimensions besides the cgroup (observer-common); a cgroup is their sum.
        let mut by_cgroup: BTreeMap<u64, (TrafficValue, Vec<TrafficKey>)> = BTreeMap::new();
        for (key, total) in entries {
            let delta = self.deltas.delta(key, total);
            if self.persist {
                self.stale_reported.remove(&key);
                if !delta.is_zero() {
                    self.reader.set_reported(key, total)?;
                }
            }
            let slot = by_cgroup.entry(key.cgroup_id).or_default();
            slot.0 += delta;
            slot.1.push(key);
        }
        // What the run before counted and did not report, once.
        for (key, unreported) in std::mem::take(&mut self.pending) {
            by_cgroup.entry(key.cgroup_id).or_default().0 += unreported;
        }
        // Keys reported by the run before and gone from the map since.
        for key in std::mem::take(&mut self.stale_reported) {
            self.reader.forget_reported(&key)?;
        }

        let new_unknown = by_cgroup.keys().any(|id| {
            self.index.path(*id).is_none()
                && !self.last_paths.contains_key(id)
                && !self.unresolved.contains(id)
        });
        // A failed walk keeps the last index: new cgroups go by id until a walk works, and
        // this interval's counts, already taken from the map, are still reported.
        if new_unknown {
            if let Err(e) = self.index.rescan() {
                log::warn!("walking the cgroup hierarchy: {e}");
            }
        }

        let mut cgroups = Vec::with_capacity(by_cgroup.len());
        let mut paths = HashMap::with_capacity(by_cgroup.len());
        for (cgroup_id, (delta, keys)) in by_cgroup {
            let path = self
                .index
                .path(cgroup_id)
                .map(str::to_owned)
                .or_else(|| self.last_paths.get(&cgroup_id).cloned());
            let exists = self.index.path(cgroup_id).is_some();
            if !exists && delta.is_zero() {
                // Gone, and its last counts were reported: free its entries. A socket that
                // outlives its cgroup and sends again would get a fresh entry from zero.
                let mut all_gone = true;
                for key in &keys {
                    match self.reader.retire(key)? {
                        Retired::Gone => self.forget(key)?,
                        Retired::Lingering => all_gone = false,
                    }
                }
                if all_gone {
                    self.unresolved.remove(&cgroup_id);
                }
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
        for key in &gone {
            self.forget(key)?;
        }

        let map_full_drops = map_full.wrapping_sub(self.last_map_full);
        self.last_map_full = map_full;
        if self.persist && map_full_drops > 0 {
            let total = TrafficValue {
                rx: Counter {
                    bytes: 0,
                    packets: map_full,
                },
                ..TrafficValue::default()
            };
            self.reader.set_reported(REPORTED_MAP_FULL_KEY, total)?;
        }
        if map_full_drops > 0 {
            log::warn!(
                "{map_full_drops} packets were not counted this interval: the traffic map is full \
                 ({} entries); raise --map-entries",
                self.reader.capacity()
            );
        }
        Ok(Collected {
            interval: Duration::ZERO,
            cgroups,
            map_entries: self.reader.hash_entries_after(hash_entries),
            map_capacity: self.reader.capacity(),
            map_full_drops,
        })
    }
}
