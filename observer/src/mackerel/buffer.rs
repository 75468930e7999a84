//! Delivery buffer: every Mackerel interval's values wait here until the API has taken them,
//! so an outage shorter than the bounds loses nothing. Values go out oldest first, in batches
//! that mix hosts; values of a host without a Mackerel id yet wait without holding up the
//! others.
//!
//! Bounded twice: by the age of the data ([`DEFAULT_MAX_AGE`], as the container agent) and by
//! the number of values ([`DEFAULT_MAX_VALUES`]), whichever bites first; the oldest go first
//! and every drop is counted. Each host has its own queue, so a batch, a removal and "has this
//! host values left" cost what they touch, not the whole backlog.

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap, HashSet, VecDeque},
    sync::Arc,
    time::Duration,
};

use serde::{Deserialize, Serialize};

use super::client::MetricValue;
/// The sender's pause between failed posts; `sink` imports it from here.
pub use crate::backoff::Backoff;

/// How much data is kept while the API cannot be reached: the container agent keeps 6 hours.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(6 * 3600);
/// Values per POST /api/v0/tsdb.
pub const DEFAULT_BATCH_SIZE: usize = 1000;
/// Most values kept: at most 44 MB at [`BYTES_PER_VALUE`], a sixth of the DaemonSet's memory
/// limit; 100 pods of 2 containers and 10 series each fill it in about 4 hours of outage.
pub const DEFAULT_MAX_VALUES: usize = 500_000;
/// What one queued value costs at most: the value itself is 40 B, and a host's queue may hold
/// up to twice its length in capacity (it doubles); its share of the arrival index comes on
/// top. Measured by tests/tests/mackerel_memory.rs (85 B a value with every queue just past a
/// doubling).
pub const BYTES_PER_VALUE: usize = 88;

#[derive(Debug)]
struct Queued {
    /// Order of arrival; batches and removals go by it.
    seq: u64,
    name: Arc<str>,
    time: i64,
    value: f64,
}

/// One push, in arrival order: what the bounds drop first.
#[derive(Debug)]
struct Chunk {
    key: Arc<str>,
    /// Seqs `start..end` of the host's queue.
    end: u64,
    time: i64,
}

/// Values waiting to be posted.
#[derive(Debug)]
pub struct Buffer {
    hosts: HashMap<Arc<str>, VecDeque<Queued>>,
    arrivals: VecDeque<Chunk>,
    len: usize,
    max_age_secs: i64,
    max_values: usize,
    next_seq: u64,
    newest: i64,
    /// One copy of each metric name: a 6-hour backlog repeats them thousands of times.
    interned: HashSet<Arc<str>>,
    /// Values dropped since the last delivery, for the one log line at the end of an outage.
    dropped: u64,
    /// Values dropped since start, for observer's own metrics.
    dropped_total: u64,
}

/// Values taken from the buffer for one POST. They stay in the buffer until
/// [`Buffer::remove`] says they are done with.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub values: Vec<MetricValue>,
    /// customIdentifier of each value's host, in the same order.
    pub keys: Vec<Arc<str>>,
    seqs: Vec<u64>,
}

/// One host's values of one time, as the state file keeps them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedChunk {
    pub key: String,
    pub time: i64,
    pub values: Vec<(String, f64)>,
}

impl Batch {
    fn empty() -> Self {
        Self {
            values: Vec::new(),
            keys: Vec::new(),
            seqs: Vec::new(),
        }
    }

    /// One batch per host, in order of first appearance: after a refusal, so that one host's
    /// bad values cost only that host's values.
    pub fn split_by_host(self) -> Vec<Batch> {
        let mut out: Vec<Batch> = Vec::new();
        let mut index: HashMap<Arc<str>, usize> = HashMap::new();
        for ((value, key), seq) in self.values.into_iter().zip(self.keys).zip(self.seqs) {
            let i = *index.entry(key.clone()).or_insert_with(|| {
                out.push(Batch::empty());
                out.len() - 1
            });
            out[i].values.push(value);
            out[i].keys.push(key);
            out[i].seqs.push(seq);
        }
        out
    }

    /// How many hosts the batch has values of.
    pub fn hosts(&self) -> usize {
        self.keys.iter().collect::<HashSet<_>>().len()
    }

    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }
}

impl Buffer {
    /// Keeps values no older than `max_age` before the newest one, and at most `max_values`.
    pub fn new(max_age: Duration, max_values: usize) -> Self {
        Self {
            hosts: HashMap::new(),
            arrivals: VecDeque::new(),
            len: 0,
            max_age_secs: i64::try_from(max_age.as_secs()).unwrap_or(i64::MAX),
            max_values: max_values.max(1),
            next_seq: 0,
            newest: i64::MIN,
            interned: HashSet::new(),
            dropped: 0,
            dropped_total: 0,
        }
    }

    /// Queues one host's values of one time, then drops what is now beyond the bounds.
    pub fn push(&mut self, key: &str, time: i64, values: impl IntoIterator<Item = (String, f64)>) {
        let key = self.host_key(key);
        let mut added = 0;
        for (name, value) in values {
            let name = self.intern(&name);
            let queue = self.hosts.get_mut(&key).expect("made by host_key");
            queue.push_back(Queued {
                seq: self.next_seq,
                name,
                time,
                value,
            });
            self.next_seq += 1;
            added += 1;
        }
        if added == 0 {
            if self.hosts.get(&key).is_some_and(VecDeque::is_empty) {
                self.hosts.remove(&key);
            }
            return;
        }
        self.len += added;
        self.arrivals.push_back(Chunk {
            key,
            end: self.next_seq,
            time,
        });
        self.newest = self.newest.max(time);
        self.trim();
    }

    /// Up to `max` of the oldest values whose host has an id (`host_id` tells), or None when
    /// no value can be sent now.
    pub fn next_batch(
        &self,
        max: usize,
        host_id: impl Fn(&str) -> Option<String>,
    ) -> Option<Batch> {
        // A merge of the queues of hosts with an id, by arrival: hosts looked up once each.
        let sendable: Vec<(&Arc<str>, String, &VecDeque<Queued>)> = self
            .hosts
            .iter()
            .filter_map(|(key, queue)| Some((key, host_id(key)?, queue)))
            .collect();
        let mut heads: BinaryHeap<Reverse<(u64, usize, usize)>> = sendable
            .iter()
            .enumerate()
            .filter_map(|(i, (_, _, q))| Some(Reverse((q.front()?.seq, i, 0))))
            .collect();
        let mut batch = Batch::empty();
        while batch.len() < max {
            let Some(Reverse((_, i, at))) = heads.pop() else {
                break;
            };
            let (key, id, queue) = &sendable[i];
            let q = &queue[at];
            batch.values.push(MetricValue {
                host_id: id.clone(),
                name: q.name.to_string(),
                time: q.time,
                value: q.value,
            });
            batch.keys.push(Arc::clone(key));
            batch.seqs.push(q.seq);
            if let Some(next) = queue.get(at + 1) {
                heads.push(Reverse((next.seq, i, at + 1)));
            }
        }
        (!batch.is_empty()).then_some(batch)
    }

    /// Forgets the values of `batch`: delivered, or refused for good. A batch holds the front
    /// of each of its hosts' queues, so this pops fronts.
    pub fn remove(&mut self, batch: &Batch) {
        let mut last: HashMap<&Arc<str>, u64> = HashMap::new();
        for (key, seq) in batch.keys.iter().zip(&batch.seqs) {
            let e = last.entry(key).or_insert(*seq);
            *e = (*e).max(*seq);
        }
        for (key, last) in last {
            let Some(queue) = self.hosts.get_mut(key) else {
                continue;
            };
            while queue.front().is_some_and(|q| q.seq <= last) {
                queue.pop_front();
                self.len -= 1;
            }
            if queue.is_empty() {
                self.hosts.remove(key);
            }
        }
        self.settle();
    }

    /// Records a successful post; ends an outage's drop count with one log line.
    pub fn delivered(&mut self) {
        if self.dropped > 0 {
            log::warn!(
                "Mackerel: delivery resumed; {} metric values were dropped in all while the API could not take them (bounds: {} of data, {} values; --mackerel-buffer)",
                self.dropped,
                humantime::format_duration(Duration::from_secs(self.max_age_secs as u64)),
                self.max_values
            );
            self.dropped = 0;
        }
    }

    /// Drops every value of one host (gone before it ever got an id, or retired).
    pub fn forget_host(&mut self, key: &str) -> usize {
        let n = self.hosts.remove(key).map_or(0, |q| q.len());
        self.len -= n;
        self.settle();
        n
    }

    pub fn has_values_for(&self, key: &str) -> bool {
        self.hosts.contains_key(key)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Values dropped by the bounds since start.
    pub fn dropped_total(&self) -> u64 {
        self.dropped_total
    }

    /// Time of the oldest value waiting.
    pub fn oldest(&self) -> Option<i64> {
        self.hosts
            .values()
            .filter_map(|q| q.front().map(|v| (v.seq, v.time)))
            .min()
            .map(|(_, t)| t)
    }

    /// Everything waiting, oldest first, one chunk per host and time: for the state file.
    pub fn save(&self) -> Vec<SavedChunk> {
        let mut out: Vec<(u64, SavedChunk)> = Vec::new();
        for (key, queue) in &self.hosts {
            for q in queue {
                match out.last_mut() {
                    Some((_, c)) if c.time == q.time && *c.key == **key => {
                        c.values.push((q.name.to_string(), q.value))
                    }
                    _ => out.push((
                        q.seq,
                        SavedChunk {
                            key: key.to_string(),
                            time: q.time,
                            values: vec![(q.name.to_string(), q.value)],
                        },
                    )),
                }
            }
        }
        out.sort_by_key(|(seq, _)| *seq);
        out.into_iter().map(|(_, c)| c).collect()
    }

    /// Queues what an earlier run saved, within this run's bounds.
    pub fn restore(&mut self, chunks: Vec<SavedChunk>) {
        for c in chunks {
            self.push(&c.key, c.time, c.values);
        }
    }

    fn trim(&mut self) {
        let limit = self.newest.saturating_sub(self.max_age_secs);
        let mut dropped = 0u64;
        let mut too_old = false;
        while let Some(front) = self.arrivals.front() {
            let old = front.time < limit;
            if !old && self.len <= self.max_values {
                break;
            }
            too_old |= old;
            let chunk = self.arrivals.pop_front().expect("front exists");
            if let Some(queue) = self.hosts.get_mut(&chunk.key) {
                // The chunk's values still queued are at the front: later ones came after.
                while queue.front().is_some_and(|q| q.seq < chunk.end) {
                    queue.pop_front();
                    self.len -= 1;
                    dropped += 1;
                }
                if queue.is_empty() {
                    self.hosts.remove(&chunk.key);
                }
            }
        }
        self.settle();
        if dropped == 0 {
            return;
        }
        if self.dropped == 0 {
            // Once per outage; the total follows when delivery resumes.
            let why = if too_old {
                format!(
                    "older than {}",
                    humantime::format_duration(Duration::from_secs(self.max_age_secs as u64))
                )
            } else {
                format!("beyond the bound of {} values", self.max_values)
            };
            log::warn!(
                "Mackerel: the API has not taken metric values in time; dropped the {dropped} oldest ({why}); more will be dropped until it does"
            );
        }
        self.dropped += dropped;
        self.dropped_total += dropped;
    }

    /// Drops arrival records whose values are all gone, and names no value uses.
    fn settle(&mut self) {
        while let Some(front) = self.arrivals.front() {
            let pending = self
                .hosts
                .get(&front.key)
                .and_then(|q| q.front())
                .is_some_and(|q| q.seq < front.end);
            if pending {
                break;
            }
            self.arrivals.pop_front();
        }
        if self.len == 0 {
            self.arrivals.clear();
            self.interned.clear();
        }
    }

    fn host_key(&mut self, key: &str) -> Arc<str> {
        if let Some((k, _)) = self.hosts.get_key_value(key) {
            return Arc::clone(k);
        }
        let k: Arc<str> = Arc::from(key);
        self.hosts.insert(Arc::clone(&k), VecDeque::new());
        k
    }

    fn intern(&mut self, s: &str) -> Arc<str> {
        if let Some(a) = self.interned.get(s) {
            return a.clone();
        }
        let a: Arc<str> = Arc::from(s);
        self.interned.insert(a.clone());
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vals(names: &[&str], v: f64) -> Vec<(String, f64)> {
        names.iter().map(|n| (n.to_string(), v)).collect()
    }

    fn ids(known: &'static [&'static str]) -> impl Fn(&str) -> Option<String> {
        move |k| known.contains(&k).then(|| format!("id-{k}"))
    }

    fn buffer() -> Buffer {
        Buffer::new(DEFAULT_MAX_AGE, DEFAULT_MAX_VALUES)
    }

    fn values(b: &Buffer) -> Vec<f64> {
        b.save()
            .into_iter()
            .flat_map(|c| c.values.into_iter().map(|(_, v)| v))
            .collect()
    }

    #[test]
    fn oldest_first_in_batches() {
        let mut b = buffer();
        for t in 0..5 {
            b.push("a", 1000 + t * 60, vals(&["m1", "m2"], t as f64));
        }
        let batch = b.next_batch(3, ids(&["a"])).unwrap();
        let times: Vec<_> = batch.values.iter().map(|v| v.time).collect();
        assert_eq!(times, [1000, 1000, 1060]);
        assert_eq!(batch.values[0].host_id, "id-a");
        // Not removed until told.
        assert_eq!(b.next_batch(3, ids(&["a"])).unwrap(), batch);
        b.remove(&batch);
        assert_eq!(b.len(), 7);
        let next = b.next_batch(100, ids(&["a"])).unwrap();
        assert_eq!(next.values[0].time, 1060);
        assert_eq!(next.values[0].name, "m2");
        b.remove(&next);
        assert!(b.is_empty());
        assert!(b.interned.is_empty());
        assert!(b.arrivals.is_empty());
    }

    #[test]
    fn batches_mix_hosts_in_arrival_order() {
        let mut b = buffer();
        b.push("a", 60, vals(&["m"], 1.0));
        b.push("b", 60, vals(&["m"], 2.0));
        b.push("a", 120, vals(&["m"], 3.0));
        b.push("b", 120, vals(&["m"], 4.0));
        let batch = b.next_batch(3, ids(&["a", "b"])).unwrap();
        assert_eq!(
            batch.values.iter().map(|v| v.value).collect::<Vec<_>>(),
            [1.0, 2.0, 3.0]
        );
        b.remove(&batch);
        assert_eq!(values(&b), [4.0]);
    }

    #[test]
    fn a_host_without_an_id_does_not_hold_up_the_others() {
        let mut b = buffer();
        b.push("pending", 100, vals(&["x"], 1.0));
        b.push("ok", 100, vals(&["y"], 2.0));
        b.push("pending", 160, vals(&["x"], 3.0));
        b.push("ok", 160, vals(&["y"], 4.0));
        let batch = b.next_batch(10, ids(&["ok"])).unwrap();
        assert_eq!(
            batch.values.iter().map(|v| v.value).collect::<Vec<_>>(),
            [2.0, 4.0]
        );
        b.remove(&batch);
        assert!(b.has_values_for("pending"));
        assert!(!b.has_values_for("ok"));
        assert!(b.next_batch(10, ids(&["ok"])).is_none());
        assert_eq!(b.forget_host("pending"), 2);
        assert!(b.is_empty());
        assert!(b.arrivals.is_empty());
    }

    #[test]
    fn bounded_by_age_of_data() {
        let mut b = Buffer::new(Duration::from_secs(600), DEFAULT_MAX_VALUES);
        for i in 0..20 {
            b.push("a", i * 60, vals(&["m"], i as f64));
        }
        // 600 s before the newest (1140) is 540: the values at 540..=1140 remain.
        assert_eq!(b.len(), 11);
        assert_eq!(b.oldest(), Some(540));
        assert_eq!(b.dropped, 9);
        assert_eq!(b.dropped_total(), 9);
        b.delivered();
        assert_eq!(b.dropped, 0);
        assert_eq!(b.dropped_total(), 9);
    }

    #[test]
    fn bounded_by_number_of_values_oldest_first() {
        let mut b = Buffer::new(DEFAULT_MAX_AGE, 5);
        for i in 0..4 {
            b.push("a", i * 60, vals(&["m1", "m2"], i as f64));
        }
        // 8 values pushed, bound 5: whole chunks go, oldest first, until it fits.
        assert_eq!(b.len(), 4);
        assert_eq!(values(&b), [2.0, 2.0, 3.0, 3.0]);
        assert_eq!(b.dropped_total(), 4);
    }

    #[test]
    fn the_bound_skips_values_already_delivered() {
        let mut b = Buffer::new(DEFAULT_MAX_AGE, 4);
        b.push("a", 60, vals(&["m"], 1.0));
        b.push("b", 60, vals(&["m"], 2.0));
        let sent = b.next_batch(10, ids(&["a"])).unwrap();
        b.remove(&sent);
        for i in 0..3 {
            b.push("b", 120 + i * 60, vals(&["m"], 3.0 + i as f64));
        }
        // 4 left: b's 4 values, within the bound; nothing dropped.
        assert_eq!(b.len(), 4);
        assert_eq!(b.dropped_total(), 0);
        b.push("b", 400, vals(&["m"], 9.0));
        assert_eq!(values(&b), [3.0, 4.0, 5.0, 9.0]);
        assert_eq!(b.dropped_total(), 1);
    }

    #[test]
    fn removal_matches_by_seq_only() {
        let mut b = buffer();
        b.push("a", 1, vals(&["m"], 1.0));
        b.push("b", 1, vals(&["m"], 2.0));
        b.push("a", 2, vals(&["m"], 3.0));
        b.push("b", 2, vals(&["m"], 4.0));
        let only_b = b.next_batch(10, ids(&["b"])).unwrap();
        b.remove(&only_b);
        assert_eq!(values(&b), [1.0, 3.0]);
    }

    #[test]
    fn split_by_host_keeps_order() {
        let mut b = buffer();
        b.push("a", 1, vals(&["m"], 1.0));
        b.push("b", 1, vals(&["m"], 2.0));
        b.push("a", 2, vals(&["m"], 3.0));
        let batch = b.next_batch(10, ids(&["a", "b"])).unwrap();
        assert_eq!(batch.hosts(), 2);
        let parts = batch.split_by_host();
        assert_eq!(parts.len(), 2);
        assert_eq!(
            parts[0].values.iter().map(|v| v.value).collect::<Vec<_>>(),
            [1.0, 3.0]
        );
        assert_eq!(
            parts[1].values.iter().map(|v| v.value).collect::<Vec<_>>(),
            [2.0]
        );
        b.remove(&parts[1]);
        assert_eq!(b.len(), 2);
        b.remove(&parts[0]);
        assert!(b.is_empty());
    }

    #[test]
    fn saved_and_restored_in_order() {
        let mut b = buffer();
        b.push("a", 60, vals(&["m1", "m2"], 1.0));
        b.push("b", 60, vals(&["m1"], 2.0));
        b.push("a", 120, vals(&["m1"], 3.0));
        let saved = b.save();
        assert_eq!(saved.len(), 3);
        assert_eq!((saved[0].key.as_str(), saved[0].time), ("a", 60));
        assert_eq!(saved[0].values.len(), 2);
        assert_eq!((saved[2].key.as_str(), saved[2].time), ("a", 120));
        let mut again = buffer();
        again.restore(saved.clone());
        assert_eq!(again.save(), saved);
        assert_eq!(again.len(), 4);
        // Restored within this run's bound.
        let mut small = Buffer::new(DEFAULT_MAX_AGE, 2);
        small.restore(saved);
        assert_eq!(values(&small), [2.0, 3.0]);
    }

    /// An hour of a 100-pod outage, a value per series a minute: draining it is linear, and
    /// the buffer never holds more than its bound.
    #[test]
    fn a_long_outage_of_many_hosts_stays_bounded_and_drains() {
        let bound = 100_000;
        let mut b = Buffer::new(DEFAULT_MAX_AGE, bound);
        let names: Vec<String> = (0..20).map(|i| format!("container.m{i}")).collect();
        for minute in 0..60 {
            for pod in 0..100 {
                let values = names.iter().map(|n| (n.clone(), minute as f64));
                b.push(&format!("pod-{pod}"), minute * 60, values);
                assert!(b.len() <= bound);
            }
        }
        assert_eq!(b.len(), bound);
        assert_eq!(b.dropped_total(), 60 * 100 * 20 - bound as u64);
        let all = |_: &str| Some("id".to_string());
        let mut posts = 0;
        while let Some(batch) = b.next_batch(DEFAULT_BATCH_SIZE, all) {
            b.remove(&batch);
            posts += 1;
        }
        assert_eq!(posts, bound / DEFAULT_BATCH_SIZE);
        assert!(b.is_empty() && b.hosts.is_empty() && b.arrivals.is_empty());
    }

    #[test]
    fn memory_per_value() {
        // The queued value itself, twice over for a queue's capacity, plus a chunk record
        // shared by the values of one push.
        assert_eq!(size_of::<Queued>(), 40);
        assert!(size_of::<Chunk>() <= 40);
        assert!(BYTES_PER_VALUE >= 2 * size_of::<Queued>() + size_of::<Chunk>() / 4);
    }
}
