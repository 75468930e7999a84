//! What a run takes over from the run before it when the state is pinned: counts the earlier
//! run had not reported yet, from maps this build could not re-open as they were (an upgrade
//! that changed their size), so that they are reported once, neither lost nor doubled. The
//! traffic map and the cache in front of it may change apart: what was reported of both is
//! split between the map set aside and the one kept.

use std::collections::HashMap as StdHashMap;

use aya::maps::{HashMap, Map, PerCpuArray, PerCpuHashMap};
use observer_common::{
    CacheSlot, CacheSlots, TrafficKey, TrafficValue, CACHE_MAP, CACHE_SLOTS, REPORTED_MAP,
    REPORTED_MAP_FULL_KEY, STATS_MAP, TRAFFIC_MAP,
};

use crate::{
    collect::Resume,
    programs::{is_legacy_cache, Programs, SetAside},
    traffic::{sum, TrafficError, TrafficReader},
};

/// Reads the set-aside maps (the new programs already run, so they no longer change), works
/// out what was never reported, and removes them. Runs after [`Programs::attach`].
pub fn take_over(
    programs: &mut Programs,
    reader: &mut TrafficReader,
) -> Result<Resume, TrafficError> {
    let mut set_aside = programs.take_set_aside();
    let mut take = |name: &str| {
        set_aside
            .iter()
            .position(|s| s.name == name)
            .map(|i| set_aside.swap_remove(i))
    };
    let old_traffic = take(TRAFFIC_MAP);
    let old_cache = take(CACHE_MAP);
    let old_reported = take(REPORTED_MAP);
    let old_stats = take(STATS_MAP);
    let mut resume = Resume::default();
    if old_traffic.is_some() || old_cache.is_some() {
        // What the set-aside maps hold: counted by the run before, no longer visible.
        let mut gone: StdHashMap<TrafficKey, TrafficValue> = StdHashMap::new();
        for old in [old_traffic, old_cache].into_iter().flatten() {
            log::warn!(
                "the pinned {} map is {} but this build's is {}: it was set aside",
                old.name,
                old.found,
                old.want
            );
            if !old.readable {
                log::warn!(
                    "this build cannot read the earlier {} map's values: traffic it counted \
                     since its last report (at most one interval) is not reported",
                    old.name
                );
                continue;
            }
            let entries = if old.name == CACHE_MAP {
                read_cache(old)
            } else {
                read_traffic(old)
            };
            for (key, total) in entries {
                *gone.entry(key).or_default() += total;
            }
        }
        let old_reported: StdHashMap<TrafficKey, TrafficValue> = match old_reported {
            Some(r) if r.readable => read_reported(r),
            Some(_) => StdHashMap::new(),
            // Kept: it is the reported map this run opened.
            None => reader
                .reported()?
                .into_iter()
                .filter(|(k, _)| *k != REPORTED_MAP_FULL_KEY)
                .collect(),
        };
        for (key, _) in reader.reported()? {
            if key != REPORTED_MAP_FULL_KEY {
                reader.forget_reported(&key)?;
            }
        }
        for (key, split) in carry_over(&gone, &old_reported) {
            if !split.pending.is_zero() {
                resume.pending.push((key, split.pending));
            }
            if !split.reported.is_zero() {
                reader.set_reported(key, split.reported)?;
            }
        }
        log::info!(
            "carried over {} cgroups' counts not yet reported from the earlier maps",
            resume.pending.len()
        );
    }
    if old_stats.is_some() {
        // A new stats map counts from zero.
        reader.forget_reported(&REPORTED_MAP_FULL_KEY)?;
    }
    // The set-aside maps are closed here, their last reference: the kernel frees them.
    Ok(resume)
}

/// One key's counts across a change of the traffic map.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Split {
    /// Reported in the first interval on top of what the new maps count.
    pending: TrafficValue,
    /// Taken as already reported of what the new maps count.
    reported: TrafficValue,
}

/// What was reported (`reported`) covered the set-aside maps' counts (`gone`) and part of
/// what the maps still in use hold (the cache kept across a new traffic map, or the other
/// way round). Counter by counter: what the report went beyond the set-aside counts by was
/// reported of the maps still in use; what it fell short by is pending.
fn carry_over(
    gone: &StdHashMap<TrafficKey, TrafficValue>,
    reported: &StdHashMap<TrafficKey, TrafficValue>,
) -> Vec<(TrafficKey, Split)> {
    let keys: std::collections::BTreeSet<TrafficKey> =
        gone.keys().chain(reported.keys()).copied().collect();
    keys.into_iter()
        .map(|key| {
            let total = gone.get(&key).copied().unwrap_or_default();
            let done = reported.get(&key).copied().unwrap_or_default();
            let split = Split {
                pending: total.zip_with(done, |t, r| t.since(r).unwrap_or_default()),
                reported: done.zip_with(total, |r, t| r.since(t).unwrap_or_default()),
            };
            (key, split)
        })
        .collect()
}

/// What a set-aside cache's whole slots hold, per key, in either layout.
fn read_cache(old: SetAside) -> Vec<(TrafficKey, TrafficValue)> {
    let mut sums: StdHashMap<TrafficKey, TrafficValue> = StdHashMap::new();
    let mut add = |index: u32, slot: &CacheSlot| {
        if slot.cgroup_id != 0 && slot.is_whole() {
            *sums.entry(TrafficKey::new(slot.cgroup_id)).or_default() += slot.value(index);
        }
    };
    let read = if is_legacy_cache(&old.found) {
        PerCpuArray::<_, CacheSlot>::try_from(Map::PerCpuArray(old.map)).map(|map| {
            for (index, per_cpu) in map.iter().enumerate() {
                let Ok(per_cpu) = per_cpu else { continue };
                per_cpu.iter().for_each(|slot| add(index as u32, slot));
            }
        })
    } else {
        PerCpuArray::<_, CacheSlots>::try_from(Map::PerCpuArray(old.map)).map(|map| {
            for (element, per_cpu) in map.iter().enumerate() {
                let Ok(per_cpu) = per_cpu else { continue };
                let base = element as u32 * CACHE_SLOTS;
                for slots in per_cpu.iter() {
                    for (i, slot) in slots.slots.iter().enumerate() {
                        add(base + i as u32, slot);
                    }
                }
            }
        })
    };
    if let Err(e) = read {
        log::warn!("reading the set-aside cache: {e}");
    }
    sums.into_iter().collect()
}

fn read_traffic(old: SetAside) -> Vec<(TrafficKey, TrafficValue)> {
    match PerCpuHashMap::<_, TrafficKey, TrafficValue>::try_from(Map::PerCpuHashMap(old.map)) {
        Ok(map) => map
            .iter()
            .filter_map(Result::ok)
            .map(|(k, per_cpu)| (k, sum(per_cpu.iter())))
            .collect(),
        Err(e) => {
            log::warn!("reading the set-aside traffic map: {e}");
            Vec::new()
        }
    }
}

fn read_reported(old: SetAside) -> StdHashMap<TrafficKey, TrafficValue> {
    match HashMap::<_, TrafficKey, TrafficValue>::try_from(Map::HashMap(old.map)) {
        Ok(map) => map.iter().filter_map(Result::ok).collect(),
        Err(e) => {
            log::warn!("reading the set-aside reported map: {e}");
            StdHashMap::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use observer_common::Counter;

    use super::*;

    fn tx(bytes: u64) -> TrafficValue {
        TrafficValue {
            tx: Counter {
                bytes,
                packets: bytes / 10,
            },
            ..TrafficValue::default()
        }
    }

    #[test]
    fn a_report_beyond_the_old_map_was_of_the_cache() {
        let key = TrafficKey::new(7);
        let totals = StdHashMap::from([(key, tx(300))]);
        let reported = StdHashMap::from([(key, tx(500))]);
        let split = carry_over(&totals, &reported);
        assert_eq!(
            split,
            vec![(
                key,
                Split {
                    pending: TrafficValue::default(),
                    reported: tx(200)
                }
            )]
        );
    }

    #[test]
    fn a_report_short_of_the_old_map_leaves_the_rest_pending() {
        let (a, b) = (TrafficKey::new(7), TrafficKey::new(8));
        let totals = StdHashMap::from([(a, tx(500)), (b, tx(40))]);
        let reported = StdHashMap::from([(a, tx(300))]);
        let split = carry_over(&totals, &reported);
        assert_eq!(
            split[0],
            (
                a,
                Split {
                    pending: tx(200),
                    reported: TrafficValue::default()
                }
            )
        );
        assert_eq!(
            split[1],
            (
                b,
                Split {
                    pending: tx(40),
                    reported: TrafficValue::default()
                }
            )
        );
    }
}
