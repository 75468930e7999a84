//! User space's own state, kept in the kernel so it survives observer's restarts with the
//! pinned counters. The programs never touch it.

use aya_ebpf::{bindings::BPF_F_NO_PREALLOC, macros::map, maps::HashMap};
use observer_common::{TrafficKey, TrafficValue, DEFAULT_MAX_ENTRIES};

/// What was last reported per key (totals summed over CPUs): a restarted observer reports the
/// difference, so no interval is reported twice or lost. Sized like TRAFFIC by the loader.
#[map]
static REPORTED: HashMap<TrafficKey, TrafficValue> =
    HashMap::with_max_entries(DEFAULT_MAX_ENTRIES, BPF_F_NO_PREALLOC);
