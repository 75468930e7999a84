//! The contract between observer's kernel programs and user space: map names, keys and values.
//!
//! Everything here is `#[repr(C)]`, `Copy` and free of hidden padding, so the same bytes mean the
//! same thing on both sides of the map.
#![no_std]

/// Name of the per-CPU hash of traffic counters, keyed by [`TrafficKey`].
pub const TRAFFIC_MAP: &str = "TRAFFIC";
/// Name of the hash user space keeps its last reported totals in, keyed by [`TrafficKey`], so
/// that a restart with pinned maps reports the difference. The programs never touch it.
pub const REPORTED_MAP: &str = "REPORTED";
/// The [`REPORTED_MAP`] key that holds the last reported map-full count (in `rx.packets`): no
/// cgroup has id 0.
pub const REPORTED_MAP_FULL_KEY: TrafficKey = TrafficKey::new(0);
/// Name of the per-CPU array of the cache in front of [`TRAFFIC_MAP`]: the counters of recent
/// cgroups. Two elements of [`CacheSlots`], [`CACHE_INGRESS`] and [`CACHE_EGRESS`].
pub const CACHE_MAP: &str = "CACHE";
/// The [`CACHE_MAP`] element the ingress program counts in.
pub const CACHE_INGRESS: u32 = 0;
/// The [`CACHE_MAP`] element the egress program counts in.
pub const CACHE_EGRESS: u32 = 1;
/// log2 of the cache's slots per direction.
pub const CACHE_BITS: u32 = 9;
/// Slots per direction (per element of [`CACHE_MAP`]).
pub const CACHE_SLOTS: u32 = 1 << CACHE_BITS;
/// Name of the per-CPU array of the data plane's own event counters, indexed by [`Stat`].
pub const STATS_MAP: &str = "STATS";
/// Entries of [`TRAFFIC_MAP`] when the loader does not say otherwise.
pub const DEFAULT_MAX_ENTRIES: u32 = 16_384;
/// Loopback devices have this ifindex in every network namespace.
pub const LOOPBACK_IFINDEX: u32 = 1;

/// Stands for the kernel's `bpf_cast_to_kern_ctx` kfunc (6.3+) in the programs, which turns
/// the context into the kernel's `struct sk_buff` (the verifier makes the call a register
/// move). aya cannot emit a kfunc call, so the programs call this helper number, which no
/// kernel has, and the loader rewrites each such call into the kfunc's (observer's
/// cache_key.rs).
pub const CAST_TO_KERN_CTX_PLACEHOLDER: i32 = 0x7fff_0001;
/// The read-only globals the loader sets to offsets from the kernel's BTF for those programs.
pub const SKB_SK_OFFSET: &str = "SKB_SK_OFFSET";
pub const SOCK_STATE_OFFSET: &str = "SOCK_STATE_OFFSET";
pub const SOCK_CGROUP_OFFSET: &str = "SOCK_CGROUP_OFFSET";
pub const CGROUP_SERIAL_OFFSET: &str = "CGROUP_SERIAL_OFFSET";

/// One row of the traffic map: what the counters in a [`TrafficValue`] belong to.
///
/// How to add a dimension: one of few values (a destination class: loopback, same node, VPC,
/// internet) becomes more counters in [`TrafficValue`], as loopback already is, so every packet
/// still costs one lookup; one of many values (a remote port) becomes a field here. Readers
/// group by `cgroup_id` and sum the rest. The key is 8 bytes because the hash over it is paid
/// per packet: 16 bytes cost about 5 ns more per TCP run (docs/benchmarks.md).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrafficKey {
    /// cgroup v2 id of the socket that owns the packet (`bpf_skb_cgroup_id`): the inode number
    /// of the cgroup's directory in the v2 hierarchy.
    pub cgroup_id: u64,
}

impl TrafficKey {
    pub const fn new(cgroup_id: u64) -> Self {
        Self { cgroup_id }
    }
}

/// Bytes (IP packet length, no link-layer header) and packets (kernel buffers: GSO-merged TCP
/// counts as one) seen in one direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub bytes: u64,
    pub packets: u64,
}

impl Counter {
    #[inline(always)]
    pub fn add(&mut self, bytes: u64) {
        self.bytes = self.bytes.wrapping_add(bytes);
        self.packets = self.packets.wrapping_add(1);
    }
}

/// Counters of one key on one CPU. Loopback (ifindex 1) is kept apart from every other device.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficValue {
    pub rx: Counter,
    pub tx: Counter,
    pub lo_rx: Counter,
    pub lo_tx: Counter,
}

impl Counter {
    /// `self + other`, wrapping as the kernel's counters do.
    pub const fn wrapping_plus(self, other: Counter) -> Counter {
        Counter {
            bytes: self.bytes.wrapping_add(other.bytes),
            packets: self.packets.wrapping_add(other.packets),
        }
    }

    /// `self + other`, stopping at the maximum: for totals that must never go backwards.
    pub const fn saturating_plus(self, other: Counter) -> Counter {
        Counter {
            bytes: self.bytes.saturating_add(other.bytes),
            packets: self.packets.saturating_add(other.packets),
        }
    }

    /// The larger of each: a total read while counts were moving never goes back.
    pub const fn larger(self, other: Counter) -> Counter {
        Counter {
            bytes: if self.bytes > other.bytes {
                self.bytes
            } else {
                other.bytes
            },
            packets: if self.packets > other.packets {
                self.packets
            } else {
                other.packets
            },
        }
    }

    /// `self - earlier`, or None when either counter went backwards.
    pub const fn since(self, earlier: Counter) -> Option<Counter> {
        match (
            self.bytes.checked_sub(earlier.bytes),
            self.packets.checked_sub(earlier.packets),
        ) {
            (Some(bytes), Some(packets)) => Some(Counter { bytes, packets }),
            _ => None,
        }
    }
}

impl TrafficValue {
    /// Every counter combined with the same counter of `other` by `f`. New counters added to
    /// the value (destination classes) need only be added here and in the struct.
    #[inline]
    pub fn zip_with(self, other: TrafficValue, f: impl Fn(Counter, Counter) -> Counter) -> Self {
        TrafficValue {
            rx: f(self.rx, other.rx),
            tx: f(self.tx, other.tx),
            lo_rx: f(self.lo_rx, other.lo_rx),
            lo_tx: f(self.lo_tx, other.lo_tx),
        }
    }

    /// The counters in a fixed order (rx, tx, lo_rx, lo_tx).
    pub const fn counters(&self) -> [Counter; 4] {
        [self.rx, self.tx, self.lo_rx, self.lo_tx]
    }

    pub fn is_zero(&self) -> bool {
        self.counters()
            .iter()
            .all(|c| c.bytes == 0 && c.packets == 0)
    }

    /// Totals plus a delta, saturating: a counter shown to people never goes backwards.
    pub fn saturating_plus(self, other: TrafficValue) -> Self {
        self.zip_with(other, Counter::saturating_plus)
    }

    /// `self - earlier`, or None when any counter went backwards (the entry was made again).
    pub fn since(self, earlier: TrafficValue) -> Option<Self> {
        let mut out = TrafficValue::default();
        for (o, (c, e)) in [&mut out.rx, &mut out.tx, &mut out.lo_rx, &mut out.lo_tx]
            .into_iter()
            .zip(self.counters().into_iter().zip(earlier.counters()))
        {
            *o = c.since(e)?;
        }
        Some(out)
    }
}

/// Sums of deltas (a workload over its cgroups, a cgroup over its CPUs) wrap as the kernel's
/// counters do.
impl core::ops::AddAssign for TrafficValue {
    #[inline]
    fn add_assign(&mut self, other: TrafficValue) {
        *self = self.zip_with(other, Counter::wrapping_plus);
    }
}

impl core::ops::Add for TrafficValue {
    type Output = TrafficValue;
    #[inline]
    fn add(mut self, other: TrafficValue) -> TrafficValue {
        self += other;
        self
    }
}

impl core::iter::Sum for TrafficValue {
    fn sum<I: Iterator<Item = TrafficValue>>(iter: I) -> Self {
        iter.fold(TrafficValue::default(), |a, b| a + b)
    }
}

/// One slot of the per-CPU cache ([`CACHE_MAP`]): one direction's counts of the cgroup that
/// last sent or received on this CPU among those whose keys fall on this slot, not yet moved to
/// [`TRAFFIC_MAP`]. Which direction is the element of [`CACHE_MAP`] it is in. 64 bytes: one
/// cache line when the kernel's per-CPU allocation is aligned.
///
/// A packet of another cgroup moves the slot's counts into the traffic map (its entry for
/// `cgroup_id`) and takes the slot over. That move writes `end` first and `begin` last, each to
/// the same new sequence number, so a reader that copies the slot from `begin` to `end` knows
/// it saw a whole slot when the two are equal.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheSlot {
    pub begin: u64,
    /// 0: the slot was never used.
    pub cgroup_id: u64,
    /// Every device but loopback.
    pub net: Counter,
    pub lo: Counter,
    pub end: u64,
    /// What the programs look the slot up by: the cgroup id, or a key the kernel finds sooner
    /// (observer-ebpf's traffic.rs). 0 in slots of builds before it, which miss once.
    pub key: u64,
}

impl CacheSlot {
    /// The slot was not being taken over while it was copied.
    pub const fn is_whole(&self) -> bool {
        self.begin == self.end
    }

    /// The slot's counts as a [`TrafficValue`]; `index` says which direction they are.
    pub const fn value(&self, index: u32) -> TrafficValue {
        let zero = Counter {
            bytes: 0,
            packets: 0,
        };
        if index >= CACHE_SLOTS {
            TrafficValue {
                rx: zero,
                tx: self.net,
                lo_rx: zero,
                lo_tx: self.lo,
            }
        } else {
            TrafficValue {
                rx: self.net,
                tx: zero,
                lo_rx: self.lo,
                lo_tx: zero,
            }
        }
    }
}

/// One direction's slots: one element of [`CACHE_MAP`], 32 KiB, the most a per-CPU value can
/// be. One element per direction, not one per slot, because the element's address then does
/// not depend on the cgroup id: the kernel can load it while the id is still being fetched,
/// one dependent load fewer per packet (0.06-0.13 of the hook's floor on TCP,
/// docs/benchmarks.md).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheSlots {
    pub slots: [CacheSlot; CACHE_SLOTS as usize],
}

impl Default for CacheSlots {
    fn default() -> Self {
        Self {
            slots: [CacheSlot::default(); CACHE_SLOTS as usize],
        }
    }
}

/// Which slot of a direction's [`CacheSlots`] holds the counts of the cgroup keyed `cgroup_id`
/// (its id, or the key [`CacheSlot::key`] says): Fibonacci hashing
/// (the top bits of a multiply), which spreads ids that differ only in their low bits, as the
/// inode numbers of sibling cgroups do. Always below [`CACHE_SLOTS`].
#[inline(always)]
pub const fn cache_slot(cgroup_id: u64) -> u32 {
    (cgroup_id.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - CACHE_BITS)) as u32
}

/// A slot's place in both directions' slots taken as one run: ingress first, then egress, as
/// [`CacheSlot::value`] reads it (and as the cache of earlier builds, one element per slot,
/// was indexed).
#[inline(always)]
pub const fn cache_index(cgroup_id: u64, egress: bool) -> u32 {
    let slot = cache_slot(cgroup_id);
    if egress {
        slot + CACHE_SLOTS
    } else {
        slot
    }
}

/// Indexes of the [`STATS_MAP`] array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// Packets not counted because [`TRAFFIC_MAP`] was full.
    MapFull = 0,
}

/// Entries of [`STATS_MAP`].
pub const STAT_COUNT: u32 = 1;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain #[repr(C)] integers with no padding.
    unsafe impl aya::Pod for super::TrafficKey {}
    // SAFETY: as above: four pairs of u64.
    unsafe impl aya::Pod for super::TrafficValue {}
    // SAFETY: as above: u64s and a TrafficValue.
    unsafe impl aya::Pod for super::CacheSlot {}
    // SAFETY: as above: an array of CacheSlot.
    unsafe impl aya::Pod for super::CacheSlots {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(tx: u64, lo_rx: u64) -> TrafficValue {
        TrafficValue {
            tx: Counter {
                bytes: tx,
                packets: tx / 100,
            },
            lo_rx: Counter {
                bytes: lo_rx,
                packets: lo_rx / 100,
            },
            ..Default::default()
        }
    }

    #[test]
    fn values_add_counter_by_counter() {
        assert_eq!(v(100, 200) + v(300, 400), v(400, 600));
        let mut a = v(100, 0);
        a += v(0, 500);
        assert_eq!(a, v(100, 500));
        assert_eq!(
            [v(100, 0), v(200, 100)].into_iter().sum::<TrafficValue>(),
            v(300, 100)
        );
        assert!(TrafficValue::default().is_zero());
        assert!(!v(0, 100).is_zero());
    }

    #[test]
    fn cache_indexes_stay_in_their_half_and_spread_neighbours() {
        let mut ingress = [false; CACHE_SLOTS as usize];
        for id in 5_000..5_000 + u64::from(CACHE_SLOTS) {
            let i = cache_index(id, false);
            assert!(i < CACHE_SLOTS);
            assert_eq!(cache_index(id, true), i + CACHE_SLOTS);
            ingress[i as usize] = true;
        }
        // Consecutive ids (sibling cgroups) land on most slots, not a few.
        let used = ingress.iter().filter(|u| **u).count();
        assert!(used > CACHE_SLOTS as usize / 2, "{used} of {CACHE_SLOTS}");
        assert_eq!(size_of::<CacheSlot>(), 64);
        // The most a per-CPU value can be (PCPU_MIN_UNIT_SIZE).
        assert_eq!(size_of::<CacheSlots>(), 32 * 1024);
    }

    #[test]
    fn differences_fail_when_a_counter_went_back() {
        assert_eq!(v(500, 300).since(v(200, 100)), Some(v(300, 200)));
        assert_eq!(v(500, 50).since(v(200, 100)), None);
    }

    #[test]
    fn saturating_totals_stop_at_the_top() {
        let top = TrafficValue {
            rx: Counter {
                bytes: u64::MAX - 1,
                packets: 0,
            },
            ..Default::default()
        };
        let one = TrafficValue {
            rx: Counter {
                bytes: 5,
                packets: 1,
            },
            ..Default::default()
        };
        assert_eq!(top.saturating_plus(one).rx.bytes, u64::MAX);
        assert_eq!((top + one).rx.bytes, 3);
    }
}
