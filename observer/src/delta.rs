//! Totals -> per-interval deltas. Output counters never go backwards: an entry whose totals
//! shrink was removed and made again, so its new totals are all new traffic.

use std::collections::HashMap;

use observer_common::{TrafficKey, TrafficValue};

#[derive(Debug, Default)]
pub struct DeltaTracker {
    previous: HashMap<TrafficKey, TrafficValue>,
}

impl DeltaTracker {
    /// Traffic of `key` since the last call. A key seen for the first time starts from zero:
    /// the map is new at start, so an entry made mid-interval holds only this interval's traffic.
    pub fn delta(&mut self, key: TrafficKey, total: TrafficValue) -> TrafficValue {
        let previous = self.previous.insert(key, total).unwrap_or_default();
        difference(&previous, &total)
    }

    /// Takes `total` as what `key` last reported (a restart resuming from pinned state).
    pub fn seed(&mut self, key: TrafficKey, total: TrafficValue) {
        self.previous.insert(key, total);
    }

    /// Drops keys that `keep` rejects (entries no longer in the map).
    pub fn retain(&mut self, mut keep: impl FnMut(&TrafficKey) -> bool) {
        self.previous.retain(|k, _| keep(k));
    }

    pub fn len(&self) -> usize {
        self.previous.len()
    }

    pub fn is_empty(&self) -> bool {
        self.previous.is_empty()
    }
}

/// `current - previous`, or `current` when any counter went backwards (the entry restarted).
pub fn difference(previous: &TrafficValue, current: &TrafficValue) -> TrafficValue {
    current.since(*previous).unwrap_or(*current)
}

#[cfg(test)]
mod tests {
    use super::*;
    use observer_common::Counter;

    fn value(tx_bytes: u64, tx_packets: u64, lo_rx_bytes: u64) -> TrafficValue {
        TrafficValue {
            tx: Counter {
                bytes: tx_bytes,
                packets: tx_packets,
            },
            lo_rx: Counter {
                bytes: lo_rx_bytes,
                packets: lo_rx_bytes / 100,
            },
            ..Default::default()
        }
    }

    #[test]
    fn first_sample_starts_from_zero() {
        let mut t = DeltaTracker::default();
        let k = TrafficKey::new(7);
        assert_eq!(t.delta(k, value(500, 5, 1000)), value(500, 5, 1000));
    }

    #[test]
    fn later_samples_are_differences() {
        let mut t = DeltaTracker::default();
        let k = TrafficKey::new(7);
        t.delta(k, value(500, 5, 1000));
        assert_eq!(t.delta(k, value(800, 8, 1500)), value(300, 3, 500));
        assert!(t.delta(k, value(800, 8, 1500)).is_zero());
    }

    #[test]
    fn counters_never_go_backwards() {
        let mut t = DeltaTracker::default();
        let k = TrafficKey::new(7);
        t.delta(k, value(5000, 50, 1000));
        // The entry was removed and made again: what it holds now is all new.
        assert_eq!(t.delta(k, value(200, 2, 1200)), value(200, 2, 1200));
    }

    #[test]
    fn keys_are_independent_and_forgettable() {
        let mut t = DeltaTracker::default();
        let (a, b) = (TrafficKey::new(1), TrafficKey::new(2));
        t.delta(a, value(100, 1, 0));
        t.delta(b, value(900, 9, 0));
        assert_eq!(t.delta(a, value(150, 2, 0)), value(50, 1, 0));
        t.retain(|k| *k != b);
        assert_eq!(t.len(), 1);
        assert_eq!(t.delta(b, value(950, 10, 0)), value(950, 10, 0));
    }

    #[test]
    fn values_add_every_counter() {
        let mut a = value(1, 1, 100);
        a += value(2, 3, 200);
        assert_eq!(a, value(3, 4, 300));
    }
}
