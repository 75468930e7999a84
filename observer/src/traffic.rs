//! Reading the kernel's traffic counters: one pass over the per-CPU map per interval, summed
//! over CPUs.

use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _, OwnedFd},
};

use aya::{
    maps::{HashMap, Map, MapData, MapError, PerCpuArray, PerCpuHashMap},
    Ebpf,
};
use observer_common::{Stat, TrafficKey, TrafficValue, REPORTED_MAP, STATS_MAP, TRAFFIC_MAP};

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
    /// Every key in the map with its counters summed over CPUs (totals since the entry was made).
    pub entries: Vec<(TrafficKey, TrafficValue)>,
    /// Packets not counted since load because the map was full.
    pub map_full: u64,
}

/// Owns the traffic, stats and reported maps, taken out of the loaded object.
pub struct TrafficReader {
    traffic: PerCpuHashMap<MapData, TrafficKey, TrafficValue>,
    traffic_fd: OwnedFd,
    stats: PerCpuArray<MapData, u64>,
    /// What was last reported per key: kept in the kernel so a restart finds it (pinned).
    reported: HashMap<MapData, TrafficKey, TrafficValue>,
    capacity: u32,
    cpus: usize,
    batch_supported: bool,
}

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
        Ok(Self {
            traffic,
            traffic_fd,
            stats,
            reported,
            capacity,
            cpus,
            batch_supported: crate::kernel::Features::running().batch_lookups,
        })
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
        let entries = if self.batch_supported {
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
        };
        let map_full = self
            .stats
            .get(&(Stat::MapFull as u32), 0)
            .map(|per_cpu| per_cpu.iter().fold(0u64, |a, b| a.wrapping_add(*b)))
            .map_err(|source| TrafficError::Map {
                name: STATS_MAP,
                source,
            })?;
        Ok(Reading { entries, map_full })
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
        match self.traffic.remove(key) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
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

/// The whole map in `len / BATCH` syscalls. Per-CPU values come back as `cpus` consecutive
/// values per key (the value size is already a multiple of 8).
fn lookup_batch(fd: &OwnedFd, cpus: usize) -> io::Result<Vec<(TrafficKey, TrafficValue)>> {
    const _: () = assert!(size_of::<TrafficValue>().is_multiple_of(8));
    let mut keys = vec![TrafficKey::default(); BATCH];
    let mut values = vec![TrafficValue::default(); BATCH * cpus];
    let mut entries = Vec::new();
    // The hash map's batch token is a bucket index (u32); in and out may share it.
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
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &mut attr as *mut BatchAttr,
                size_of::<BatchAttr>(),
            )
        };
        let err = (ret < 0).then(io::Error::last_os_error);
        let n = attr.count as usize;
        for (i, key) in keys.iter().take(n).enumerate() {
            entries.push((*key, sum(values[i * cpus..(i + 1) * cpus].iter())));
        }
        match err {
            None => first = false,
            Some(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(entries),
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
