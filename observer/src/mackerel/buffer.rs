//! Delivery buffer: every interval's values wait here until the API has taken them, so an
//! outage shorter than the bound loses nothing. Values go out oldest first, in batches that mix
//! hosts; values of a host without a Mackerel id yet wait without holding up the others.

use std::{
    collections::{HashSet, VecDeque},
    sync::Arc,
    time::Duration,
};

use super::client::MetricValue;
/// The sender's pause between failed posts; `sink` imports it from here.
pub use crate::backoff::Backoff;

/// How much data is kept while the API cannot be reached: the container agent keeps 6 hours.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(6 * 3600);
/// Values per POST /api/v0/tsdb.
pub const DEFAULT_BATCH_SIZE: usize = 1000;

#[derive(Debug)]
struct Queued {
    /// Order of arrival; batches and removals go by it.
    seq: u64,
    /// customIdentifier of the host the value belongs to.
    key: Arc<str>,
    name: Arc<str>,
    time: i64,
    value: f64,
}

/// Values waiting to be posted.
#[derive(Debug)]
pub struct Buffer {
    queue: VecDeque<Queued>,
    max_age_secs: i64,
    next_seq: u64,
    newest: i64,
    /// One copy of each key and metric name: a 6-hour backlog repeats them thousands of times.
    interned: HashSet<Arc<str>>,
    /// Values dropped since the last delivery, for the one log line at the end of an outage.
    dropped: u64,
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

impl Batch {
    /// One batch per host, in order of first appearance: after a refusal, so that one host's
    /// bad values cost only that host's values.
    pub fn split_by_host(self) -> Vec<Batch> {
        let mut out: Vec<Batch> = Vec::new();
        for ((value, key), seq) in self.values.into_iter().zip(self.keys).zip(self.seqs) {
            let i = match out.iter().position(|b| b.keys[0] == key) {
                Some(i) => i,
                None => {
                    out.push(Batch {
                        values: Vec::new(),
                        keys: Vec::new(),
                        seqs: Vec::new(),
                    });
                    out.len() - 1
                }
            };
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
    /// Keeps values no older than `max_age` before the newest one.
    pub fn new(max_age: Duration) -> Self {
        Self {
            queue: VecDeque::new(),
            max_age_secs: i64::try_from(max_age.as_secs()).unwrap_or(i64::MAX),
            next_seq: 0,
            newest: i64::MIN,
            interned: HashSet::new(),
            dropped: 0,
        }
    }

    /// Queues one host's values of one interval, then drops what is now too old.
    pub fn push(&mut self, key: &str, time: i64, values: impl IntoIterator<Item = (String, f64)>) {
        let key = self.intern(key);
        for (name, value) in values {
            let name = self.intern(&name);
            self.queue.push_back(Queued {
                seq: self.next_seq,
                key: key.clone(),
                name,
                time,
                value,
            });
            self.next_seq += 1;
        }
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
        let mut batch = Batch {
            values: Vec::new(),
            keys: Vec::new(),
            seqs: Vec::new(),
        };
        // Hosts looked up once per batch, not once per value.
        let mut last: Option<(&Arc<str>, Option<String>)> = None;
        for q in &self.queue {
            if batch.values.len() >= max {
                break;
            }
            let id = match &last {
                Some((k, id)) if Arc::ptr_eq(k, &q.key) => id.clone(),
                _ => {
                    let id = host_id(&q.key);
                    last = Some((&q.key, id.clone()));
                    id
                }
            };
            let Some(host_id) = id else { continue };
            batch.values.push(MetricValue {
                host_id,
                name: q.name.to_string(),
                time: q.time,
                value: q.value,
            });
            batch.keys.push(q.key.clone());
            batch.seqs.push(q.seq);
        }
        (!batch.is_empty()).then_some(batch)
    }

    /// Forgets the values of `batch`: delivered, or refused for good.
    pub fn remove(&mut self, batch: &Batch) {
        // Both are in seq order, so one merge pass does it.
        let mut done = batch.seqs.iter().peekable();
        self.queue.retain(|q| {
            while done.next_if(|s| **s < q.seq).is_some() {}
            done.next_if_eq(&&q.seq).is_none()
        });
        self.forget_names_if_empty();
    }

    /// Records a successful post; ends an outage's drop count with one log line.
    pub fn delivered(&mut self) {
        if self.dropped > 0 {
            log::warn!(
                "Mackerel: delivery resumed; {} metric values older than {} were dropped in all while the API could not be reached",
                self.dropped,
                humantime::format_duration(Duration::from_secs(self.max_age_secs as u64))
            );
            self.dropped = 0;
        }
    }

    /// Drops every value of one host (gone before it ever got an id, or retired).
    pub fn forget_host(&mut self, key: &str) -> usize {
        let before = self.queue.len();
        self.queue.retain(|q| &*q.key != key);
        self.forget_names_if_empty();
        before - self.queue.len()
    }

    pub fn has_values_for(&self, key: &str) -> bool {
        self.queue.iter().any(|q| &*q.key == key)
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Time of the oldest value waiting.
    pub fn oldest(&self) -> Option<i64> {
        self.queue.front().map(|q| q.time)
    }

    fn trim(&mut self) {
        let limit = self.newest.saturating_sub(self.max_age_secs);
        let mut dropped = 0u64;
        while self.queue.front().is_some_and(|q| q.time < limit) {
            self.queue.pop_front();
            dropped += 1;
        }
        if dropped == 0 {
            return;
        }
        if self.dropped == 0 {
            // Once per outage; the total follows when delivery resumes.
            log::warn!(
                "Mackerel: the API has not taken metric values for {}; dropped the {dropped} oldest (more will be dropped every interval until it does)",
                humantime::format_duration(Duration::from_secs(self.max_age_secs as u64))
            );
        }
        self.dropped += dropped;
    }

    fn intern(&mut self, s: &str) -> Arc<str> {
        if let Some(a) = self.interned.get(s) {
            return a.clone();
        }
        let a: Arc<str> = Arc::from(s);
        self.interned.insert(a.clone());
        a
    }

    fn forget_names_if_empty(&mut self) {
        if self.queue.is_empty() {
            self.interned.clear();
        }
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

    #[test]
    fn oldest_first_in_batches() {
        let mut b = Buffer::new(DEFAULT_MAX_AGE);
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
    }

    #[test]
    fn a_host_without_an_id_does_not_hold_up_the_others() {
        let mut b = Buffer::new(DEFAULT_MAX_AGE);
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
    }

    #[test]
    fn bounded_by_age_of_data() {
        let mut b = Buffer::new(Duration::from_secs(600));
        for i in 0..20 {
            b.push("a", i * 60, vals(&["m"], i as f64));
        }
        // 600 s before the newest (1140) is 540: the values at 540..=1140 remain.
        assert_eq!(b.len(), 11);
        assert_eq!(b.oldest(), Some(540));
        assert_eq!(b.dropped, 9);
        b.delivered();
        assert_eq!(b.dropped, 0);
    }

    #[test]
    fn removal_matches_by_seq_only() {
        let mut b = Buffer::new(DEFAULT_MAX_AGE);
        b.push("a", 1, vals(&["m"], 1.0));
        b.push("b", 1, vals(&["m"], 2.0));
        b.push("a", 2, vals(&["m"], 3.0));
        b.push("b", 2, vals(&["m"], 4.0));
        let only_b = b.next_batch(10, ids(&["b"])).unwrap();
        b.remove(&only_b);
        let rest: Vec<_> = b.queue.iter().map(|q| q.value).collect();
        assert_eq!(rest, [1.0, 3.0]);
    }

    #[test]
    fn split_by_host_keeps_order() {
        let mut b = Buffer::new(DEFAULT_MAX_AGE);
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
}
