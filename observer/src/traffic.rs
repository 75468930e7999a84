//! Reading the kernel's traffic counters: one pass over the per-CPU hash and the per-CPU cache
//! in front of it per interval, summed over CPUs.
//!
//! Counts move one way only, from a cache slot into the hash, while we read. Reading the hash
//! first and the cache second, a count is never seen twice, but one that moves in between is
//! missed once: that key's total lags, and the next reading has it. So a key's total is the
//! larger of this reading and the last, counter by counter.
//!
//! A cgroup that is gone may still own cache slots on some CPUs until other cgroups take them
//! over. [`TrafficReader::retire`] frees its hash entry at once and remembers what it took
//! (`offset`), so counts that reach the hash later are not new traffic; the key is forgotten
//! when no slot holds it any more ([`Reading::gone`]).

use std::{
    collections::{HashMap as StdHashMap, HashSet},
    io,
    os::fd::{AsFd as _, AsRawFd as _, OwnedFd},
};

use aya::{
    maps::{HashMap, Map, MapData, MapError, PerCpuArray, PerCpuHashMap},
    Ebpf,
};
use observer_common::{
    CacheSlot, CacheSlots, Counter, Stat, TrafficKey, TrafficValue, CACHE_EGRESS, CACHE_INGRESS,
    CACHE_MAP, CACHE_SLOTS, REPORTED_MAP, STATS_MAP, TRAFFIC_MAP,
};

#[derive(Debug, thiserror::Error)]
pub enum TrafficError {
    #[error("map {0} is missing from the eBPF object")]
    MissingMap(&'static str),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("reading map {name}: {source}")]
    Read {
        name: &'static str,
        #[source]
        source: io::Error,
    },
}

/// What one pass over the maps found.
#[derive(Debug, Default, Clone)]
pub struct Reading {
    /// Every key with its counters summed over CPUs (totals since the entry was made), but for
    /// retired keys with nothing new.
    pub entries: Vec<(TrafficKey, TrafficValue)>,
    /// Packets not counted since load because the map was full.
    pub map_full: u64,
    /// Entries of the hash: what `--map-entries` bounds.
    pub hash_entries: usize,
    /// Retired keys some cache slot still holds: what was reported of them must be kept.
    pub lingering: HashSet<TrafficKey>,
    /// Retired keys no slot holds any more: forget what was reported of them.
    pub gone: Vec<TrafficKey>,
}

/// What [`TrafficReader::retire`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retired {
    /// Entry freed, key forgotten.
    Gone,
    /// Entry freed, but a cache slot still holds the key: it is forgotten once none does.
    Lingering,
}

/// Owns the traffic, stats and reported maps, taken out of the loaded object.
pub struct TrafficReader {
    traffic: PerCpuHashMap<MapData, TrafficKey, TrafficValue>,
    traffic_fd: OwnedFd,
    stats: PerCpuArray<MapData, u64>,
    /// What was last reported per key: kept in the kernel so a restart finds it (pinned).
    reported: HashMap<MapData, TrafficKey, TrafficValue>,
    /// The per-CPU cache, when this build's programs count through it.
    cache: Option<PerCpuArray<MapData, CacheSlots>>,
    /// What the last reading returned per key (with the cache only): totals never go back.
    last: StdHashMap<TrafficKey, TrafficValue>,
    /// Per retired key, what its freed hash entries held: added to its later readings.
    offset: StdHashMap<TrafficKey, TrafficValue>,
    /// Keys the last reading found in a cache slot or whose total lagged, or every key when a
    /// slot could not be copied whole: their entries may still gain counts that were read.
    held: HashSet<TrafficKey>,
    whole: bool,
    /// Hash entries freed since the last reading.
    freed: usize,
    capacity: u32,
    cpus: usize,
    batch_supported: bool,
}

/// Copies of a slot taken while it is being taken over are made again, this many times; a
/// slot torn every time leaves the whole reading unsettled (nothing freed), never wrong.
const TORN_RETRIES: usize = 3;

/// Elements per batch syscall: large enough to read 5,000 cgroups in a handful of calls, small
/// enough that the buffer stays modest on hosts with many CPUs.
const BATCH: usize = 1024;

impl TrafficReader {
    pub fn new(ebpf: &mut Ebpf) -> Result<Self, TrafficError> {
        let map = ebpf
            .take_map(TRAFFIC_MAP)
            .ok_or(TrafficError::MissingMap(TRAFFIC_MAP))?;
        let map_err = |name| move |source| TrafficError::Map { name, source };
        let Map::PerCpuHashMap(data) = map else {
            return Err(TrafficError::Map {
                name: TRAFFIC_MAP,
                source: MapError::InvalidMapType { map_type: 0 },
            });
        };
        let capacity = data.info().map_err(map_err(TRAFFIC_MAP))?.max_entries();
        let traffic_fd =
            data.fd()
                .as_fd()
                .try_clone_to_owned()
                .map_err(|source| TrafficError::Read {
                    name: TRAFFIC_MAP,
                    source,
                })?;
        let traffic =
            PerCpuHashMap::try_from(Map::PerCpuHashMap(data)).map_err(map_err(TRAFFIC_MAP))?;
        let stats = ebpf
            .take_map(STATS_MAP)
            .ok_or(TrafficError::MissingMap(STATS_MAP))?;
        let stats = PerCpuArray::try_from(stats).map_err(map_err(STATS_MAP))?;
        let reported = ebpf
            .take_map(REPORTED_MAP)
            .ok_or(TrafficError::MissingMap(REPORTED_MAP))?;
        let reported = HashMap::try_from(reported).map_err(map_err(REPORTED_MAP))?;
        let cpus = aya::util::nr_cpus().map_err(|(_, source)| TrafficError::Read {
            name: TRAFFIC_MAP,
            source,
        })?;
        let cache = match ebpf.take_map(CACHE_MAP) {
            Some(Map::PerCpuArray(data)) if crate::programs::CACHED => {
                Some(PerCpuArray::try_from(Map::PerCpuArray(data)).map_err(map_err(CACHE_MAP))?)
            }
            _ => None,
        };
        Ok(Self {
            traffic,
            traffic_fd,
            stats,
            reported,
            cache,
            last: StdHashMap::new(),
            offset: StdHashMap::new(),
            held: HashSet::new(),
            whole: true,
            freed: 0,
            capacity,
            cpus,
            batch_supported: crate::kernel::Features::running().batch_lookups,
        })
    }

    /// Whether the programs count through the per-CPU cache, whose slots outlive a change of
    /// the traffic map.
    pub fn has_cache(&self) -> bool {
        self.cache.is_some()
    }

    /// Entries the traffic map can hold.
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Kernel memory the traffic map takes now, as the kernel accounts it (`memlock` in its
    /// fdinfo): grows with live entries, since the map is not preallocated.
    pub fn kernel_memory(&self) -> Option<u64> {
        let fdinfo =
            std::fs::read_to_string(format!("/proc/self/fdinfo/{}", self.traffic_fd.as_raw_fd()))
                .ok()?;
        fdinfo
            .lines()
            .find_map(|l| l.strip_prefix("memlock:"))
            .and_then(|v| v.trim().parse().ok())
    }

    pub fn read(&mut self) -> Result<Reading, TrafficError> {
        // Retired keys first: what reached their freed entries since goes to their offsets,
        // before the hash is read, so that no count is both taken here and read there.
        let retired: Vec<TrafficKey> = self.offset.keys().copied().collect();
        for key in &retired {
            if let Some(moved) = self.take_entry(key)? {
                *self.offset.entry(*key).or_default() += moved;
            }
        }
        // The hash before the cache: see the module's doc.
        let hashed = self.read_hash()?;
        self.freed = 0;
        let map_full = self
            .stats
            .get(&(Stat::MapFull as u32), 0)
            .map(|per_cpu| per_cpu.iter().fold(0u64, |a, b| a.wrapping_add(*b)))
            .map_err(|source| TrafficError::Map {
                name: STATS_MAP,
                source,
            })?;
        let hash_entries = hashed.len();
        let Some(cache) = &self.cache else {
            return Ok(Reading {
                entries: hashed,
                map_full,
                hash_entries,
                ..Reading::default()
            });
        };
        let (slots, whole) = read_cache(cache)?;
        let mut totals: StdHashMap<TrafficKey, TrafficValue> = hashed.into_iter().collect();
        let mut held = HashSet::new();
        for (index, slot) in &slots {
            let key = TrafficKey::new(slot.cgroup_id);
            *totals.entry(key).or_default() += slot.value(*index);
            held.insert(key);
        }
        let mut hash_entries = hash_entries;
        let mut gone = Vec::new();
        let retired: Vec<(TrafficKey, TrafficValue)> =
            self.offset.iter().map(|(k, v)| (*k, *v)).collect();
        for (key, offset) in retired {
            if whole && !held.contains(&key) {
                // No slot holds it: whatever reached the hash since the reading is all of it.
                if let Some(moved) = self.take_entry(&key)? {
                    hash_entries = hash_entries.saturating_sub(1);
                    totals.insert(key, moved + offset);
                } else {
                    totals.insert(key, offset);
                }
                gone.push(key);
            } else {
                *totals.entry(key).or_default() += offset;
            }
        }
        for (key, last) in &self.last {
            let total = totals.entry(*key).or_default();
            let larger = total.zip_with(*last, Counter::larger);
            if larger != *total {
                // Lagging: some of its counts moved while we read. Not to be freed yet.
                held.insert(*key);
                *total = larger;
            }
        }
        let mut lingering = HashSet::new();
        let mut entries = Vec::with_capacity(totals.len());
        for (key, total) in &totals {
            let retired = self.offset.contains_key(key);
            if retired && !gone.contains(key) {
                lingering.insert(*key);
            }
            // A retired key appears again only with new traffic (a socket that outlived its
            // cgroup).
            if !retired || self.last.get(key) != Some(total) {
                entries.push((*key, *total));
            }
        }
        for key in &gone {
            self.offset.remove(key);
            totals.remove(key);
        }
        self.last = totals;
        self.held = if whole {
            held
        } else {
            self.last.keys().copied().collect()
        };
        self.whole = whole;
        Ok(Reading {
            entries,
            map_full,
            hash_entries,
            lingering,
            gone,
        })
    }

    /// Frees the hash entry of `key`, a cgroup that is gone and whose last counts were read.
    /// Without the cache, or when no slot held the key at the last reading, it is forgotten;
    /// else it lingers until no slot does.
    pub fn retire(&mut self, key: &TrafficKey) -> Result<Retired, TrafficError> {
        if self.cache.is_none() || (self.whole && !self.held.contains(key)) {
            // Hash read, then cache read, then this: everything of the key was in the hash.
            self.last.remove(key);
            self.offset.remove(key);
            self.remove(key)?;
            return Ok(Retired::Gone);
        }
        if let Some(taken) = self.take_entry(key)? {
            self.freed += 1;
            *self.offset.entry(*key).or_default() += taken;
        } else {
            self.offset.entry(*key).or_default();
        }
        Ok(Retired::Lingering)
    }

    /// Entries of the hash after the clean-up that followed a reading that found `read`.
    pub fn hash_entries_after(&self, read: usize) -> usize {
        read.saturating_sub(self.freed)
    }

    /// Removes `key`'s hash entry and returns what it held then, summed over CPUs.
    fn take_entry(&mut self, key: &TrafficKey) -> Result<Option<TrafficValue>, TrafficError> {
        let value = match lookup_and_delete(&self.traffic_fd, key, self.cpus) {
            Ok(value) => value,
            // Kernels before 5.14 cannot do both at once on a hash: read, then delete. A move
            // into the entry between the two is lost (a slot of a cgroup that is gone, at
            // the moment it is taken over).
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOTSUP | 524)) => {
                let value = match self.traffic.get(key, 0) {
                    Ok(per_cpu) => Some(sum(per_cpu.iter())),
                    Err(MapError::KeyNotFound) => None,
                    Err(source) => {
                        return Err(TrafficError::Map {
                            name: TRAFFIC_MAP,
                            source,
                        })
                    }
                };
                match self.traffic.remove(key) {
                    Ok(()) | Err(MapError::KeyNotFound) => {}
                    Err(source) => {
                        return Err(TrafficError::Map {
                            name: TRAFFIC_MAP,
                            source,
                        })
                    }
                }
                value
            }
            Err(source) => {
                return Err(TrafficError::Read {
                    name: TRAFFIC_MAP,
                    source,
                })
            }
        };
        Ok(value)
    }

    /// Takes `total` as what the last reading returned for `key` (a restart resuming from
    /// what the run before reported).
    pub fn seed(&mut self, key: TrafficKey, total: TrafficValue) {
        if self.cache.is_some() {
            self.last.insert(key, total);
        }
    }

    fn read_hash(&mut self) -> Result<Vec<(TrafficKey, TrafficValue)>, TrafficError> {
        Ok(if self.batch_supported {
            match lookup_batch(&self.traffic_fd, self.cpus) {
                Ok(entries) => entries,
                // A kernel that refuses them anyway (a build without them): key by key.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOTSUP | 524)) => {
                    self.batch_supported = false;
                    self.read_key_by_key()?
                }
                Err(source) => {
                    return Err(TrafficError::Read {
                        name: TRAFFIC_MAP,
                        source,
                    })
                }
            }
        } else {
            self.read_key_by_key()?
        })
    }

    /// Two syscalls per entry (next key, lookup): what kernels without batch operations allow.
    pub fn read_key_by_key(&self) -> Result<Vec<(TrafficKey, TrafficValue)>, TrafficError> {
        let mut entries = Vec::new();
        for item in self.traffic.iter() {
            match item {
                Ok((key, per_cpu)) => entries.push((key, sum(per_cpu.iter()))),
                // An entry removed between get_next_key and lookup is simply gone.
                Err(MapError::KeyNotFound) => continue,
                Err(source) => {
                    return Err(TrafficError::Map {
                        name: TRAFFIC_MAP,
                        source,
                    })
                }
            }
        }
        Ok(entries)
    }

    /// Every entry of the reported map: what the last run reported per key.
    pub fn reported(&self) -> Result<Vec<(TrafficKey, TrafficValue)>, TrafficError> {
        let mut out = Vec::new();
        for item in self.reported.iter() {
            match item {
                Ok(entry) => out.push(entry),
                Err(MapError::KeyNotFound) => continue,
                Err(source) => {
                    return Err(TrafficError::Map {
                        name: REPORTED_MAP,
                        source,
                    })
                }
            }
        }
        Ok(out)
    }

    /// Records that `total` has been reported for `key`.
    pub fn set_reported(
        &mut self,
        key: TrafficKey,
        total: TrafficValue,
    ) -> Result<(), TrafficError> {
        self.reported
            .insert(key, total, 0)
            .map_err(|source| TrafficError::Map {
                name: REPORTED_MAP,
                source,
            })
    }

    /// Forgets what was reported for `key` (its entry is gone).
    pub fn forget_reported(&mut self, key: &TrafficKey) -> Result<(), TrafficError> {
        match self.reported.remove(key) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(TrafficError::Map {
                name: REPORTED_MAP,
                source,
            }),
        }
    }

    /// Removes an entry (of a cgroup that no longer exists, after its last counts were read).
    pub fn remove(&mut self, key: &TrafficKey) -> Result<(), TrafficError> {
        self.last.remove(key);
        match self.traffic.remove(key) {
            Ok(()) => {
                self.freed += 1;
                Ok(())
            }
            Err(MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(TrafficError::Map {
                name: TRAFFIC_MAP,
                source,
            }),
        }
    }
}

/// Sums one key's per-CPU values.
pub fn sum<'a>(values: impl Iterator<Item = &'a TrafficValue>) -> TrafficValue {
    values.copied().sum()
}

/// The whole hash in `len / BATCH` syscalls, each key's values summed over CPUs.
fn lookup_batch(fd: &OwnedFd, cpus: usize) -> io::Result<Vec<(TrafficKey, TrafficValue)>> {
    let mut entries = Vec::new();
    batch::<TrafficKey, TrafficValue>(fd, cpus, |key, per_cpu| {
        entries.push((key, sum(per_cpu.iter())))
    })?;
    Ok(entries)
}

/// Every used slot of every CPU with its index ([`cache_index`]: ingress, then egress), and
/// whether all were copied whole. A direction's slots are one element, copied in one syscall;
/// a slot torn by a take-over (CacheSlot) is copied again with the rest of its element; one
/// torn every time is left out, and the reading is then not whole: its counts come next time,
/// and nothing is freed now.
///
/// [`cache_index`]: observer_common::cache_index
fn read_cache(
    cache: &PerCpuArray<MapData, CacheSlots>,
) -> Result<(Vec<(u32, CacheSlot)>, bool), TrafficError> {
    let get = |element: u32| {
        cache.get(&element, 0).map_err(|source| TrafficError::Map {
            name: CACHE_MAP,
            source,
        })
    };
    let mut slots = Vec::new();
    let mut whole = true;
    for element in [CACHE_INGRESS, CACHE_EGRESS] {
        let base = element * CACHE_SLOTS;
        let mut per_cpu = get(element)?;
        let mut pending: Vec<usize> = (0..CACHE_SLOTS as usize).collect();
        for attempt in 0..=TORN_RETRIES {
            if attempt > 0 {
                per_cpu = get(element)?;
            }
            pending.retain(|&i| {
                if !per_cpu.iter().all(|s| s.slots[i].is_whole()) {
                    return true;
                }
                let used = per_cpu
                    .iter()
                    .map(|s| s.slots[i])
                    .filter(|s| s.cgroup_id != 0);
                slots.extend(used.map(|s| (base + i as u32, s)));
                false
            });
            if pending.is_empty() {
                break;
            }
        }
        whole &= pending.is_empty();
    }
    Ok((slots, whole))
}

/// `union bpf_attr` as BPF_MAP_LOOKUP_AND_DELETE_ELEM reads it.
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;

/// Removes `key` and returns what it held at that moment, summed over CPUs; None if absent.
fn lookup_and_delete(
    fd: &OwnedFd,
    key: &TrafficKey,
    cpus: usize,
) -> io::Result<Option<TrafficValue>> {
    let mut values = vec![TrafficValue::default(); cpus];
    let mut attr = ElemAttr {
        map_fd: fd.as_raw_fd() as u32,
        key: key as *const TrafficKey as u64,
        value: values.as_mut_ptr() as u64,
        ..Default::default()
    };
    // SAFETY: attr points at one key and a value per CPU.
    let ret = unsafe { crate::pin::sys_bpf(BPF_MAP_LOOKUP_AND_DELETE_ELEM, &mut attr) };
    if ret < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENOENT) => Ok(None),
            _ => Err(e),
        };
    }
    Ok(Some(sum(values.iter())))
}

/// `union bpf_attr` as BPF_MAP_LOOKUP_BATCH reads it.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// The whole per-CPU map `fd` in `len / BATCH` syscalls: `each(key, one value per CPU)`. The
/// kernel returns per-CPU values as `cpus` consecutive values per key, each rounded up to 8
/// bytes, which `V` already is. Hashes and arrays both take a u32 batch token.
fn batch<K: aya::Pod + Default, V: aya::Pod + Default>(
    fd: &OwnedFd,
    cpus: usize,
    mut each: impl FnMut(K, &[V]),
) -> io::Result<()> {
    const { assert!(size_of::<V>().is_multiple_of(8)) };
    let mut keys = vec![K::default(); BATCH];
    let mut values = vec![V::default(); BATCH * cpus];
    let mut token: u32 = 0;
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                &token as *const u32 as u64
            },
            out_batch: &mut token as *mut u32 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: BATCH as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..Default::default()
        };
        // SAFETY: attr points at buffers of BATCH keys and BATCH * cpus values.
        let ret = unsafe { crate::pin::sys_bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) };
        let err = (ret < 0).then(io::Error::last_os_error);
        let n = attr.count as usize;
        for (i, key) in keys.iter().take(n).enumerate() {
            each(*key, &values[i * cpus..(i + 1) * cpus]);
        }
        match err {
            None => first = false,
            Some(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
            Some(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use observer_common::Counter;

    use super::*;

    #[test]
    fn sums_every_counter_over_cpus() {
        let c = |bytes, packets| Counter { bytes, packets };
        let a = TrafficValue {
            rx: c(1, 1),
            tx: c(2, 1),
            lo_rx: c(3, 1),
            lo_tx: c(4, 1),
        };
        let b = TrafficValue {
            rx: c(10, 2),
            tx: c(20, 2),
            lo_rx: c(30, 2),
            lo_tx: c(40, 2),
        };
        let total = sum([a, b].iter());
        assert_eq!(total.rx, c(11, 3));
        assert_eq!(total.tx, c(22, 3));
        assert_eq!(total.lo_rx, c(33, 3));
        assert_eq!(total.lo_tx, c(44, 3));
        assert_eq!(sum([].iter()), TrafficValue::default());
    }
}
