//! The contract between observer's kernel programs and user space: map names, keys and values.
//!
//! Everything here is `#[repr(C)]`, `Copy` and free of hidden padding, so the same bytes mean the
//! same thing on both sides of the map.
#![no_std]

/// Name of the per-CPU hash of traffic counters, keyed by [`TrafficKey`].
pub const TRAFFIC_MAP: &str = "TRAFFIC";
/// Name of the per-CPU array of the data plane's own event counters, indexed by [`Stat`].
pub const STATS_MAP: &str = "STATS";
/// Entries of [`TRAFFIC_MAP`] when the loader does not say otherwise.
pub const DEFAULT_MAX_ENTRIES: u32 = 16_384;
/// Loopback devices have this ifindex in every network namespace.
pub const LOOPBACK_IFINDEX: u32 = 1;

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
    unsafe impl aya::Pod for super::TrafficValue {}
}
