//! Hash maps for what every interval looks up per container: ids and cgroup paths.
//!
//! std's SipHash costs more than the lookups' other work on 100-byte paths; foldhash is several
//! times faster and still seeded per process, so keys a workload chooses cannot be lined up
//! in advance to collide.

pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
