//! Hash maps for what every interval looks up per container: ids and cgroup paths.
//!
//! std's SipHash costs more than the lookups' other work on 100-byte paths; foldhash is several
//! times faster and still seeded per process, so keys a workload chooses cannot be lined up
//! in advance to collide.

pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// What is kept per key (a container id, a cgroup path) from one cycle to the next: a key the
/// cycle does not touch is dropped when the cycle ends, so what is kept follows what is listed
/// without a set of every key built each cycle.
///
/// hashbrown for its `entry_ref`: a touch hashes the key once and copies it only when new
/// (std's map needs a second lookup for that, and hashing the keys was 7 % of a cycle).
#[derive(Debug)]
pub struct Stamped<V> {
    map: hashbrown::HashMap<String, (V, u64), foldhash::fast::RandomState>,
    cycle: u64,
}

impl<V> Default for Stamped<V> {
    fn default() -> Self {
        Self {
            map: hashbrown::HashMap::with_hasher(foldhash::fast::RandomState::default()),
            cycle: 0,
        }
    }
}

impl<V: Default> Stamped<V> {
    /// What is kept of `key`, made if there is none, and kept through this cycle.
    pub fn touch(&mut self, key: &str) -> &mut V {
        let (value, stamp) = self.map.entry_ref(key).or_default();
        *stamp = self.cycle;
        value
    }

    /// [`Stamped::touch`], with how many keys are kept now (this one counted).
    pub fn touch_counted(&mut self, key: &str) -> (&mut V, usize) {
        let len = self.map.len();
        let entry = self.map.entry_ref(key);
        let len = len + usize::from(matches!(entry, hashbrown::hash_map::EntryRef::Vacant(_)));
        let (value, stamp) = entry.or_default();
        *stamp = self.cycle;
        (value, len)
    }

    /// Ends the cycle: what it did not touch is dropped, each passed to `dropped` first.
    pub fn end_cycle(&mut self, mut dropped: impl FnMut(&V)) {
        let cycle = self.cycle;
        self.map.retain(|_, (value, stamp)| {
            let keep = *stamp == cycle;
            if !keep {
                dropped(value);
            }
            keep
        });
        self.cycle += 1;
    }

    /// The cycle under way: 0, then one more after each [`Stamped::end_cycle`].
    pub fn cycle(&self) -> u64 {
        self.cycle
    }

    /// Every value kept, in no particular order.
    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut V> {
        self.map.values_mut().map(|(value, _)| value)
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_a_cycle_does_not_touch_is_dropped_at_its_end() {
        let mut kept: Stamped<u32> = Stamped::default();
        *kept.touch("a") += 1;
        *kept.touch("b") += 10;
        kept.end_cycle(|_| panic!("both were touched"));
        assert_eq!(kept.cycle(), 1);
        // Cycle 1 touches only a: b goes at its end, a keeps its value.
        *kept.touch("a") += 1;
        let mut dropped = Vec::new();
        kept.end_cycle(|v| dropped.push(*v));
        assert_eq!(dropped, [10]);
        assert_eq!(kept.len(), 1);
        assert_eq!(*kept.touch("a"), 2);
        // A key dropped and touched again starts afresh; it is counted with the others.
        assert_eq!(kept.touch_counted("b"), (&mut 0, 2));
        assert_eq!(kept.touch_counted("a"), (&mut 2, 2));
        kept.end_cycle(|_| {});
        kept.end_cycle(|_| {});
        assert!(kept.is_empty());
    }
}
