//! What a run takes over from the run before it when the state is pinned: counts the earlier
//! run had not reported yet, from maps this build could not re-open as they were (an upgrade
//! that changed their size), so that they are reported once, neither lost nor doubled.

use std::collections::HashMap as StdHashMap;

use aya::maps::{HashMap, Map, PerCpuHashMap};
use observer_common::{
    TrafficKey, TrafficValue, REPORTED_MAP, REPORTED_MAP_FULL_KEY, STATS_MAP, TRAFFIC_MAP,
};

use crate::{
    collect::Resume,
    programs::{Programs, SetAside},
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
    let old_reported = take(REPORTED_MAP);
    let old_stats = take(STATS_MAP);
    let mut resume = Resume::default();
    if let Some(old) = old_traffic {
        log::warn!(
            "the pinned traffic map is {} but this build's is {}: it was set aside",
            old.found,
            old.want
        );
        let old_reported: StdHashMap<TrafficKey, TrafficValue> = old_reported
            .filter(|r| r.readable)
            .map(read_reported)
            .unwrap_or_default();
        if old.readable {
            for (key, total) in read_traffic(old) {
                let unreported = match old_reported.get(&key) {
                    Some(reported) => total.since(*reported).unwrap_or(total),
                    None => total,
                };
                if !unreported.is_zero() {
                    resume.pending.push((key, unreported));
                }
            }
            log::info!(
                "carried over {} cgroups' counts not yet reported from the earlier map",
                resume.pending.len()
            );
        } else {
            log::warn!(
                "this build cannot read the earlier map's values: traffic it counted since its \
                 last report (at most one interval) is not reported"
            );
        }
        // The new map starts from zero: what was reported of the old one means nothing to it.
        for (key, _) in reader.reported()? {
            if key != REPORTED_MAP_FULL_KEY {
                reader.forget_reported(&key)?;
            }
        }
    }
    if old_stats.is_some() {
        // A new stats map counts from zero.
        reader.forget_reported(&REPORTED_MAP_FULL_KEY)?;
    }
    // The set-aside maps are closed here, their last reference: the kernel frees them.
    Ok(resume)
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
