//! Per-cgroup traffic counters.
//!
//! Hook: `cgroup_skb/ingress` and `cgroup_skb/egress` attached at the cgroup v2 root, so every
//! socket on the host is seen from its first packet, whatever its network namespace.
//! Attribution: the owning socket's cgroup, fixed at socket creation (what `bpf_skb_cgroup_id`
//! reads), never `bpf_get_current_cgroup_id()` (whatever task happens to run on ingress).
//!
//! Three program pairs share the maps; the loader picks one:
//! - `count_*` (x86-64, kernels with `bpf_cast_to_kern_ctx`, 6.3+): a per-CPU direct-mapped
//!   cache of cgroup slots in front of the hash, looked up by the cgroup's serial number, read
//!   from the socket ([`kernel_key`]). A hit costs three loads from the kernel's own structures,
//!   an array lookup with a constant key (inlined by recent kernels) and an offset; no helper
//!   call and no hashing. A miss fetches the cgroup id, moves the slot's counts into the hash
//!   and takes the slot over.
//! - `count_*_by_id` (x86-64, older kernels): the same cache looked up by
//!   `bpf_skb_cgroup_id`, a helper call that reaches the id through two more lines the hook
//!   never touches (docs/benchmarks.md).
//!   Readers copy slots while they are taken over; the move's order (see [`CacheSlot`]) tells
//!   them when a copy was torn, which holds where stores are seen in program order (x86-64).
//! - `count_*_hashed` (everywhere else): the per-CPU hash alone.

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, BPF_NOEXIST},
    helpers::bpf_skb_cgroup_id,
    macros::{cgroup_skb, map},
    maps::{PerCpuArray, PerCpuHashMap},
    programs::SkBuffContext,
};
use aya_log_ebpf::warn;
use core::ptr::{read_volatile, write_volatile};
use observer_common::{
    cache_slot, CacheSlot, CacheSlots, Counter, Stat, TrafficKey, TrafficValue, CACHE_EGRESS,
    CACHE_INGRESS, CAST_TO_KERN_CTX_PLACEHOLDER, DEFAULT_MAX_ENTRIES, LOOPBACK_IFINDEX, STAT_COUNT,
};

/// Sized by the loader (`--map-entries`); the default is only what the object file declares.
/// Not preallocated: a preallocated per-CPU hash costs entries x 64 B x CPUs whatever runs
/// (96 MiB at 16,384 entries on 96 vCPUs); this one costs that per live cgroup only.
#[map]
static TRAFFIC: PerCpuHashMap<TrafficKey, TrafficValue> =
    PerCpuHashMap::with_max_entries(DEFAULT_MAX_ENTRIES, BPF_F_NO_PREALLOC);

/// 64 B x 512 slots per direction per CPU (64 KiB; 6 MiB on 96 vCPUs). One element per
/// direction, so the ingress program (softirq) never takes over a slot the egress program on
/// the same CPU is in the middle of.
#[map]
static CACHE: PerCpuArray<CacheSlots> = PerCpuArray::with_max_entries(2, 0);

#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STAT_COUNT, 0);

/// cgroup_skb return value that lets the packet through: we only count, never filter.
const PASS: i32 = 1;

const EEXIST: i32 = 17;

#[cgroup_skb]
pub fn count_ingress(ctx: SkBuffContext) -> i32 {
    count_cached(&ctx, Direction::Ingress, kernel_key(&ctx));
    PASS
}

#[cgroup_skb]
pub fn count_egress(ctx: SkBuffContext) -> i32 {
    count_cached(&ctx, Direction::Egress, kernel_key(&ctx));
    PASS
}

#[cgroup_skb]
pub fn count_ingress_by_id(ctx: SkBuffContext) -> i32 {
    count_cached(&ctx, Direction::Ingress, cgroup_id(&ctx));
    PASS
}

#[cgroup_skb]
pub fn count_egress_by_id(ctx: SkBuffContext) -> i32 {
    count_cached(&ctx, Direction::Egress, cgroup_id(&ctx));
    PASS
}

#[cgroup_skb]
pub fn count_ingress_hashed(ctx: SkBuffContext) -> i32 {
    count_hashed(&ctx, Direction::Ingress);
    PASS
}

#[cgroup_skb]
pub fn count_egress_hashed(ctx: SkBuffContext) -> i32 {
    count_hashed(&ctx, Direction::Egress);
    PASS
}

#[derive(Clone, Copy, PartialEq, Eq)]
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

/// The id of the packet's socket's cgroup (0 for a socket that is not a full one).
#[inline(always)]
fn cgroup_id(ctx: &SkBuffContext) -> u64 {
    // SAFETY: skb is the context pointer the kernel handed to this program.
    unsafe { bpf_skb_cgroup_id(ctx.skb.skb) }
}

/// The packet's length and whether it is on loopback.
#[inline(always)]
fn packet(ctx: &SkBuffContext) -> (u64, bool) {
    let skb = ctx.skb.skb;
    // SAFETY: as above.
    let (len, ifindex) = unsafe { ((*skb).len as u64, (*skb).ifindex) };
    (len, ifindex == LOOPBACK_IFINDEX)
}

/// Offsets into the kernel's structures, from its BTF: the loader sets them (Rust emits no
/// CO-RE relocations); read-only, so the verifier knows each as a constant.
#[unsafe(no_mangle)]
static SKB_SK_OFFSET: u64 = 0;
#[unsafe(no_mangle)]
static SOCK_STATE_OFFSET: u64 = 0;
#[unsafe(no_mangle)]
static SOCK_CGROUP_OFFSET: u64 = 0;
#[unsafe(no_mangle)]
static CGROUP_SERIAL_OFFSET: u64 = 0;

/// Marks a key that is a cgroup serial number, not an id (kernfs ids never set the top bit).
const SERIAL_KEY: u64 = 1 << 63;

/// `TCP_TIME_WAIT` and `TCP_NEW_SYN_RECV`: a socket that is not a full one, with no cgroup.
const TCP_TIME_WAIT: u8 = 6;
const TCP_NEW_SYN_RECV: u8 = 12;

/// The cache key of the packet's socket's cgroup: `skb->sk->sk_cgrp_data.cgroup->self.serial_nr`,
/// tagged. The hook has just read the socket's cgroup pointer itself, so the only line this
/// adds is the cgroup's serial number; `bpf_skb_cgroup_id` goes on from the cgroup to its
/// kernfs node, two lines the hook never touches, behind a helper call. Serial numbers are
/// never reused while the host runs; a cgroup's address would be. Falls back to the cgroup id
/// where the socket has no cgroup of its own, as the helper does.
#[inline(always)]
fn kernel_key(ctx: &SkBuffContext) -> u64 {
    // SAFETY: the placeholder becomes bpf_cast_to_kern_ctx(ctx), which returns the kernel's
    // sk_buff of this context. The loads are BTF-typed (checked by the verifier against the
    // kernel's types, reading 0 where a pointer is bad) at offsets taken from the same BTF.
    unsafe {
        let cast: unsafe extern "C" fn(*mut core::ffi::c_void) -> *const u8 =
            core::mem::transmute(CAST_TO_KERN_CTX_PLACEHOLDER as usize);
        let skb = cast(ctx.skb.skb.cast());
        // In the hook, skb->sk is the full socket the programs run for (the kernel sets it so
        // for the run); the state check keeps a request or time-wait socket on the helper.
        let sk = *skb
            .add(read_volatile(&SKB_SK_OFFSET) as usize)
            .cast::<*const u8>();
        if sk.is_null() {
            return cgroup_id(ctx);
        }
        let state = *sk.add(read_volatile(&SOCK_STATE_OFFSET) as usize);
        if state == TCP_TIME_WAIT || state == TCP_NEW_SYN_RECV {
            return cgroup_id(ctx);
        }
        let cgroup = *sk
            .add(read_volatile(&SOCK_CGROUP_OFFSET) as usize)
            .cast::<*const u8>();
        if cgroup.is_null() {
            return cgroup_id(ctx);
        }
        *cgroup
            .add(read_volatile(&CGROUP_SERIAL_OFFSET) as usize)
            .cast::<u64>()
            | SERIAL_KEY
    }
}

/// Counts the packet in the slot of `key` (a cgroup id, or a [`kernel_key`]).
#[inline(always)]
fn count_cached(ctx: &SkBuffContext, direction: Direction, key: u64) {
    let (len, loopback) = packet(ctx);
    let element = match direction {
        Direction::Ingress => CACHE_INGRESS,
        Direction::Egress => CACHE_EGRESS,
    };
    let Some(slots) = CACHE.get_ptr_mut(element) else {
        return; // never: the array has both elements
    };
    // SAFETY: this CPU's slots, which only programs on this CPU write; cache_slot is always
    // below CACHE_SLOTS (the verifier checks the bound too).
    let slot = unsafe { (*slots).slots.get_unchecked_mut(cache_slot(key) as usize) };
    if slot.key != key {
        take_over(ctx, slot, key, direction);
    }
    // Per-CPU values: no atomics needed, user space sums the CPUs.
    let counter = if loopback {
        &mut slot.lo
    } else {
        &mut slot.net
    };
    counter.add(len);
}

/// Moves the slot's counts into the hash and gives the slot to `key`'s cgroup, empty.
///
/// Out of line (a BPF subprogram), as is everything it calls: a hit then needs no more
/// registers than its own, so nothing is spilled to the stack and the hit path stays short.
#[inline(never)]
#[cold]
fn take_over(ctx: &SkBuffContext, slot: &mut CacheSlot, key: u64, direction: Direction) {
    let cgroup_id = if key & SERIAL_KEY == 0 {
        key
    } else {
        cgroup_id(ctx)
    };
    let seq = slot.begin.wrapping_add(1);
    // Volatile: these stores stay in this order, `end` first and `begin` last (CacheSlot).
    // SAFETY: plain stores into this CPU's slot.
    unsafe { write_volatile(&mut slot.end, seq) };
    if slot.cgroup_id != 0 {
        let mut value = TrafficValue::default();
        *counter(&mut value, direction, false) = slot.net;
        *counter(&mut value, direction, true) = slot.lo;
        add_to_hash(ctx, TrafficKey::new(slot.cgroup_id), &value);
    }
    let zero = Counter::default();
    // SAFETY: as above.
    unsafe {
        write_volatile(&mut slot.net, zero);
        write_volatile(&mut slot.lo, zero);
        write_volatile(&mut slot.cgroup_id, cgroup_id);
        write_volatile(&mut slot.key, key);
        write_volatile(&mut slot.begin, seq);
    }
}

#[inline(always)]
fn count_hashed(ctx: &SkBuffContext, direction: Direction) {
    let (len, loopback) = packet(ctx);
    let key = TrafficKey::new(cgroup_id(ctx));
    if let Some(entry) = TRAFFIC.get_ptr_mut(&key) {
        // SAFETY: the map value lives as long as this program run.
        counter(unsafe { &mut *entry }, direction, loopback).add(len);
        return;
    }
    let mut value = TrafficValue::default();
    counter(&mut value, direction, loopback).add(len);
    add_to_hash(ctx, key, &value);
}

/// Adds `value` to this CPU's entry of `key`, making the entry if there is none.
#[inline(always)]
fn add_to_hash(ctx: &SkBuffContext, key: TrafficKey, value: &TrafficValue) {
    if let Some(entry) = TRAFFIC.get_ptr_mut(&key) {
        // SAFETY: the map value lives as long as this program run.
        unsafe { *entry += *value };
        return;
    }
    match TRAFFIC.insert(&key, value, BPF_NOEXIST as u64) {
        Ok(()) => {}
        // Another CPU created the entry between our lookup and insert: add to it.
        Err(e) if e == -EEXIST => {
            if let Some(entry) = TRAFFIC.get_ptr_mut(&key) {
                // SAFETY: as above.
                unsafe { *entry += *value };
            }
        }
        // Map full (E2BIG) or out of memory: count the miss, user space reports it per interval.
        Err(_) => map_full(ctx, value),
    }
}

#[inline(always)]
fn map_full(ctx: &SkBuffContext, lost: &TrafficValue) {
    let Some(n) = STATS.get_ptr_mut(Stat::MapFull as u32) else {
        return;
    };
    let packets = lost
        .counters()
        .iter()
        .fold(0u64, |a, c| a.wrapping_add(c.packets));
    // SAFETY: per-CPU slot, only this CPU writes it.
    let first = unsafe {
        let before = *n;
        *n = before.wrapping_add(packets);
        before == 0
    };
    // Once per CPU, not per packet: the count itself goes out every interval.
    if first {
        warn_map_full(ctx);
    }
}

/// Its own subprogram: inlined, LLVM merges the log's code with the take-over's, and the
/// verifier then rejects a register read on one of the merged paths.
#[inline(never)]
#[cold]
fn warn_map_full(ctx: &SkBuffContext) {
    warn!(ctx, "traffic map full: packets of new cgroups go uncounted");
}
