//! Per-cgroup traffic counters.
//!
//! Hook: `cgroup_skb/ingress` and `cgroup_skb/egress` attached at the cgroup v2 root, so every
//! socket on the host is seen from its first packet, whatever its network namespace.
//! Attribution: `bpf_skb_cgroup_id(skb)` (the owning socket's cgroup, fixed at socket creation),
//! never `bpf_get_current_cgroup_id()` (whatever task happens to run on ingress).

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, BPF_NOEXIST},
    helpers::bpf_skb_cgroup_id,
    macros::{cgroup_skb, map},
    maps::{PerCpuArray, PerCpuHashMap},
    programs::SkBuffContext,
};
use aya_log_ebpf::warn;
use observer_common::{
    Counter, Stat, TrafficKey, TrafficValue, DEFAULT_MAX_ENTRIES, LOOPBACK_IFINDEX, STAT_COUNT,
};

/// Sized by the loader (`--map-entries`); the default is only what the object file declares.
/// Not preallocated: a preallocated per-CPU hash costs entries x 64 B x CPUs whatever runs
/// (96 MiB at 16,384 entries on 96 vCPUs); this one costs that per live cgroup only.
#[map]
static TRAFFIC: PerCpuHashMap<TrafficKey, TrafficValue> =
    PerCpuHashMap::with_max_entries(DEFAULT_MAX_ENTRIES, BPF_F_NO_PREALLOC);

#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STAT_COUNT, 0);

/// cgroup_skb return value that lets the packet through: we only count, never filter.
const PASS: i32 = 1;

const EEXIST: i32 = 17;

#[cgroup_skb]
pub fn count_ingress(ctx: SkBuffContext) -> i32 {
    count(&ctx, Direction::Ingress);
    PASS
}

#[cgroup_skb]
pub fn count_egress(ctx: SkBuffContext) -> i32 {
    count(&ctx, Direction::Egress);
    PASS
}

#[derive(Clone, Copy)]
enum Direction {
    Ingress,
    Egress,
}

#[inline(always)]
fn counter(value: &mut TrafficValue, direction: Direction, loopback: bool) -> &mut Counter {
    match (direction, loopback) {
        (Direction::Ingress, false) => &mut value.rx,
        (Direction::Egress, false) => &mut value.tx,
        (Direction::Ingress, true) => &mut value.lo_rx,
        (Direction::Egress, true) => &mut value.lo_tx,
    }
}

#[inline(always)]
fn count(ctx: &SkBuffContext, direction: Direction) {
    let skb = ctx.skb.skb;
    // SAFETY: skb is the context pointer the kernel handed to this program.
    let (cgroup_id, len, ifindex) =
        unsafe { (bpf_skb_cgroup_id(skb), (*skb).len as u64, (*skb).ifindex) };
    let loopback = ifindex == LOOPBACK_IFINDEX;
    let key = TrafficKey::new(cgroup_id);

    // Per-CPU values: no atomics needed, user space sums the CPUs.
    if let Some(value) = TRAFFIC.get_ptr_mut(&key) {
        // SAFETY: the map value lives as long as this program run.
        counter(unsafe { &mut *value }, direction, loopback).add(len);
        return;
    }
    let mut value = TrafficValue::default();
    counter(&mut value, direction, loopback).add(len);
    match TRAFFIC.insert(&key, &value, BPF_NOEXIST as u64) {
        Ok(()) => {}
        // Another CPU created the entry between our lookup and insert: add to it.
        Err(e) if e == -EEXIST => {
            if let Some(value) = TRAFFIC.get_ptr_mut(&key) {
                // SAFETY: as above.
                counter(unsafe { &mut *value }, direction, loopback).add(len);
            }
        }
        // Map full (E2BIG) or out of memory: count the miss, user space reports it per interval.
        Err(_) => {
            if let Some(n) = STATS.get_ptr_mut(Stat::MapFull as u32) {
                // SAFETY: per-CPU slot, only this CPU writes it.
                let first = unsafe {
                    *n += 1;
                    *n == 1
                };
                // Once per CPU, not per packet: the count itself goes out every interval.
                if first {
                    warn!(ctx, "traffic map full: packets of new cgroups go uncounted");
                }
            }
        }
    }
}
