//! Hosts whose node went away: a node terminated (spot, scale-in) or an observer killed before
//! its tasks ended leaves hosts nobody retires. With `--mackerel-retire-silent-after`, every
//! observer of a cluster watches the hosts of the other nodes and retires those of a node that
//! has posted nothing for that long.
//!
//! - Finding them: Mackerel lists hosts by service and role, not by meta, so observers list the
//!   roles every host they make has (`MACKEREL_ROLES`), then keep the hosts whose
//!   `meta.cloud.metadata.observer` names this cluster and another node. Once per
//!   [`Orphans::check_every`] (a quarter of the silent period), never every interval.
//! - "Posted nothing" is judged by what arrived, on this observer's clock: the latest value of
//!   one series of each host (GET /api/v0/tsdb/latest) is remembered, and a host is silent once
//!   that value has not changed for the silent period. A replay of old values does not make a
//!   host look silent, and value timestamps are never compared with the clock.
//! - A node is silent when all its hosts are. One observer acts first: the nodes still posting
//!   (and this one) are ranked by a hash of (silent node, observer node), and the observer of
//!   rank r waits r more checks, so the others find the hosts gone (or retired, 404) instead of
//!   retiring them again.
//!
//! A pure state machine, told what the API said; the clock is passed in.

use std::{
    collections::{BTreeMap, HashMap},
    time::{Duration, Instant},
};

use super::{
    client::{Host, Latest},
    names,
    state::SavedHost,
};

/// What the watcher knows of one host of another node.
#[derive(Debug, Clone)]
struct Watch {
    node: String,
    name: String,
    /// The series whose latest value tells whether the host still gets values.
    probe: Option<String>,
    last: Option<(i64, u64)>,
    /// When this observer last saw `last` change (or first saw the host).
    changed_at: Instant,
}

/// What a listing gave: the other nodes' hosts to ask about (with the series to ask for) and
/// this node's own.
#[derive(Debug, Default)]
pub struct Listed {
    pub ids: Vec<String>,
    pub probes: Vec<String>,
    pub own: Vec<SavedHost>,
}

/// One host to retire, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Orphan {
    pub host_id: String,
    pub name: String,
    pub node: String,
}

#[derive(Debug)]
pub struct Orphans {
    silent_after: Duration,
    check_every: Duration,
    node: String,
    cluster: Option<String>,
    next_check: Option<Instant>,
    watched: BTreeMap<String, Watch>,
}

impl Orphans {
    /// Watches for `node`'s peers; checks every quarter of `silent_after` (at least
    /// `min_check`, a Mackerel interval).
    pub fn new(silent_after: Duration, min_check: Duration, node: String) -> Self {
        Self {
            silent_after,
            check_every: (silent_after / 4).max(min_check),
            node,
            cluster: None,
            next_check: None,
            watched: BTreeMap::new(),
        }
    }

    pub fn check_every(&self) -> Duration {
        self.check_every
    }

    /// The cluster this observer is in, once known (configured, or its tasks' own).
    pub fn set_cluster(&mut self, cluster: Option<String>) {
        if cluster.is_some() {
            self.cluster = cluster;
        }
    }

    /// Whether a check is due: the cluster is known and the last check is old enough.
    pub fn due(&self, now: Instant) -> bool {
        self.cluster.is_some() && self.next_check.is_none_or(|t| now >= t)
    }

    /// The hosts the roles' listings gave (duplicates allowed); keeps those of this cluster
    /// and other nodes. Returns the hosts whose latest values to ask for, with the series, and
    /// this node's own hosts (which a run that lost its state file would not know of).
    pub fn listed(&mut self, now: Instant, hosts: Vec<Host>) -> Listed {
        self.next_check = Some(now + self.check_every);
        let mut seen: BTreeMap<String, Watch> = BTreeMap::new();
        let mut own = Vec::new();
        for h in hosts {
            if h.is_retired || seen.contains_key(&h.id) {
                continue;
            }
            let Some((node, cluster, probe)) = origin(&h.meta) else {
                continue;
            };
            if Some(&cluster) != self.cluster.as_ref() {
                continue;
            }
            if node == self.node {
                if let Some(key) = h.custom_identifier.filter(|k| !k.is_empty()) {
                    own.push(SavedHost {
                        key,
                        host_id: h.id,
                        name: h.name,
                    });
                }
                continue;
            }
            let watch = match self.watched.remove(&h.id) {
                Some(mut w) => {
                    w.probe = probe;
                    w.node = node;
                    w
                }
                None => Watch {
                    node,
                    name: h.name,
                    probe,
                    last: None,
                    changed_at: now,
                },
            };
            seen.insert(h.id, watch);
        }
        // Hosts no longer listed were retired (by their node or a peer): forgotten.
        self.watched = seen;
        let ids: Vec<String> = self.watched.keys().cloned().collect();
        let mut probes: Vec<String> = self
            .watched
            .values()
            .filter_map(|w| w.probe.clone())
            .collect();
        probes.sort();
        probes.dedup();
        own.sort_by(|a, b| a.host_id.cmp(&b.host_id));
        own.dedup_by(|a, b| a.host_id == b.host_id);
        Listed { ids, probes, own }
    }

    /// The latest values the API gave for the watched hosts.
    pub fn latest(
        &mut self,
        now: Instant,
        values: &HashMap<String, HashMap<String, Option<Latest>>>,
    ) {
        for (id, w) in &mut self.watched {
            let Some(probe) = &w.probe else { continue };
            let got = values
                .get(id)
                .and_then(|m| m.get(probe))
                .copied()
                .flatten()
                .map(|l| (l.time, l.value.to_bits()));
            if got.is_some() && got != w.last {
                if w.last.is_some() {
                    w.changed_at = now;
                }
                w.last = got;
            }
        }
    }

    /// Hosts of silent nodes that this observer should retire now.
    pub fn to_retire(&self, now: Instant) -> Vec<Orphan> {
        let silent = |w: &Watch| now.saturating_duration_since(w.changed_at) >= self.silent_after;
        let mut nodes: BTreeMap<&str, Vec<(&String, &Watch)>> = BTreeMap::new();
        for (id, w) in &self.watched {
            nodes.entry(w.node.as_str()).or_default().push((id, w));
        }
        let posting: Vec<&str> = nodes
            .iter()
            .filter(|(_, hosts)| !hosts.iter().all(|(_, w)| silent(w)))
            .map(|(n, _)| *n)
            .chain(std::iter::once(self.node.as_str()))
            .collect();
        let mut out = Vec::new();
        for (node, hosts) in &nodes {
            if posting.contains(node) {
                continue;
            }
            let rank = rank(node, &self.node, &posting);
            let quiet = hosts
                .iter()
                .map(|(_, w)| now.saturating_duration_since(w.changed_at))
                .min()
                .unwrap_or_default();
            if quiet >= self.silent_after + self.check_every * rank {
                out.extend(hosts.iter().map(|(id, w)| Orphan {
                    host_id: (*id).clone(),
                    name: w.name.clone(),
                    node: w.node.clone(),
                }));
            }
        }
        out
    }

    /// A host was retired (by this observer or found gone).
    pub fn retired(&mut self, host_id: &str) {
        self.watched.remove(host_id);
    }

    /// Hosts watched, for tests and logs.
    pub fn len(&self) -> usize {
        self.watched.len()
    }

    pub fn is_empty(&self) -> bool {
        self.watched.is_empty()
    }
}

/// `(node, cluster, probe series)` from a host's `meta.cloud.metadata`.
fn origin(meta: &serde_json::Value) -> Option<(String, String, Option<String>)> {
    let metadata = meta.get("cloud")?.get("metadata")?;
    let observer = metadata.get("observer")?;
    let node = observer.get("node")?.as_str()?.to_string();
    let cluster = observer.get("cluster")?.as_str()?.to_string();
    // Every host gets its containers' received bytes, whatever else is known.
    let probe = metadata
        .get("containers")
        .and_then(|c| c.as_array())
        .and_then(|c| c.first())
        .and_then(|c| c.as_str())
        .map(|c| format!("interface.{}.rxBytes.delta", names::sanitize(c)));
    Some((node, cluster, probe))
}

/// Position of `me` among `posting` nodes, ordered by a hash of (silent node, node): each
/// silent node gets its own order, so one observer is not the first for every node.
fn rank(silent: &str, me: &str, posting: &[&str]) -> u32 {
    let mut order: Vec<(u64, &str)> = posting.iter().map(|n| (fnv(silent, n), *n)).collect();
    order.sort();
    order.dedup();
    order.iter().position(|(_, n)| *n == me).unwrap_or(0) as u32
}

/// FNV-1a: the same on every observer, whatever its build.
fn fnv(a: &str, b: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in a.bytes().chain([0]).chain(b.bytes()) {
        h ^= u64::from(byte);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SILENT: Duration = Duration::from_secs(3600);
    const CHECK: Duration = Duration::from_secs(900);

    fn host(id: &str, node: &str, cluster: &str) -> Host {
        Host {
            id: id.into(),
            name: format!("name-{id}"),
            custom_identifier: None,
            status: Some("working".into()),
            meta: json!({"cloud": {"provider": "ecs", "metadata": {
                "containers": ["app"],
                "observer": {"node": node, "cluster": cluster},
            }}}),
            is_retired: false,
        }
    }

    fn latest(values: &[(&str, i64, f64)]) -> HashMap<String, HashMap<String, Option<Latest>>> {
        values
            .iter()
            .map(|(id, time, value)| {
                let m = HashMap::from([(
                    "interface.app.rxBytes.delta".to_string(),
                    Some(Latest {
                        time: *time,
                        value: *value,
                    }),
                )]);
                (id.to_string(), m)
            })
            .collect()
    }

    fn watcher(node: &str) -> Orphans {
        let mut o = Orphans::new(SILENT, Duration::from_secs(60), node.into());
        o.set_cluster(Some("prod".into()));
        o
    }

    #[test]
    fn only_other_nodes_of_this_cluster_are_watched() {
        let t0 = Instant::now();
        let mut o = watcher("b");
        assert_eq!(o.check_every(), CHECK);
        let listed = o.listed(
            t0,
            vec![
                host("a1", "a", "prod"),
                host("a1", "a", "prod"),
                Host {
                    custom_identifier: Some("arn-b1".into()),
                    ..host("b1", "b", "prod")
                },
                host("x1", "x", "staging"),
                Host {
                    meta: json!({}),
                    ..host("m", "a", "prod")
                },
            ],
        );
        assert_eq!(listed.ids, ["a1"]);
        assert_eq!(listed.probes, ["interface.app.rxBytes.delta"]);
        // This node's own host, to take up if this run does not know it.
        assert_eq!(
            listed.own,
            [SavedHost {
                key: "arn-b1".into(),
                host_id: "b1".into(),
                name: "name-b1".into()
            }]
        );
        assert!(!o.due(t0 + CHECK / 2));
        assert!(o.due(t0 + CHECK));
    }

    #[test]
    fn a_node_whose_values_stop_changing_is_retired_after_the_silent_period() {
        let t0 = Instant::now();
        let mut o = watcher("b");
        let list = || vec![host("a1", "a", "prod"), host("a2", "a", "prod")];
        o.listed(t0, list());
        o.latest(t0, &latest(&[("a1", 60, 1.0), ("a2", 60, 2.0)]));
        // a keeps posting for a while: new values arrive.
        let t1 = t0 + CHECK;
        o.listed(t1, list());
        o.latest(t1, &latest(&[("a1", 120, 1.0), ("a2", 120, 2.0)]));
        // Then nothing new, check after check.
        for k in 1..=4u32 {
            let t = t1 + CHECK * k;
            o.listed(t, list());
            o.latest(t, &latest(&[("a1", 120, 1.0), ("a2", 120, 2.0)]));
            let retire = o.to_retire(t);
            if k < 4 {
                assert!(retire.is_empty(), "check {k}: {retire:?}");
            } else {
                let ids: Vec<_> = retire.iter().map(|r| r.host_id.as_str()).collect();
                assert_eq!(ids, ["a1", "a2"]);
            }
        }
        o.retired("a1");
        o.retired("a2");
        assert!(o.is_empty());
    }

    #[test]
    fn one_host_still_posting_keeps_its_node() {
        let t0 = Instant::now();
        let mut o = watcher("b");
        let list = || vec![host("a1", "a", "prod"), host("a2", "a", "prod")];
        o.listed(t0, list());
        o.latest(t0, &latest(&[("a1", 60, 1.0), ("a2", 60, 2.0)]));
        let later = t0 + SILENT + CHECK;
        o.listed(later, list());
        // a2's task ended long ago (its host waits for a's grace period), a1 still posts.
        o.latest(later, &latest(&[("a1", 999, 1.0), ("a2", 60, 2.0)]));
        assert!(o.to_retire(later).is_empty());
    }

    #[test]
    fn a_replay_of_old_values_counts_as_posting() {
        let t0 = Instant::now();
        let mut o = watcher("b");
        o.listed(t0, vec![host("a1", "a", "prod")]);
        o.latest(t0, &latest(&[("a1", 600, 5.0)]));
        // The latest value is from long ago by its timestamp, but it just changed: a
        // backlog is arriving.
        let t = t0 + SILENT - Duration::from_secs(1);
        o.latest(t, &latest(&[("a1", 660, 6.0)]));
        assert!(o.to_retire(t0 + SILENT + CHECK).is_empty());
    }

    #[test]
    fn observers_of_one_cluster_take_turns_not_all_at_once() {
        let t0 = Instant::now();
        let list = || {
            vec![
                host("a1", "a", "prod"),
                host("c1", "c", "prod"),
                host("d1", "d", "prod"),
            ]
        };
        let mut first_at = Vec::new();
        for me in ["c", "d"] {
            let mut o = watcher(me);
            o.listed(t0, list());
            o.latest(
                t0,
                &latest(&[("a1", 1, 1.0), ("c1", 1, 1.0), ("d1", 1, 1.0)]),
            );
            let mut step = 0;
            loop {
                step += 1;
                let t = t0 + CHECK * step;
                o.listed(t, list());
                // c and d post on; a is silent.
                let n = step as i64 + 1;
                o.latest(
                    t,
                    &latest(&[("a1", 1, 1.0), ("c1", n, 1.0), ("d1", n, 1.0)]),
                );
                if !o.to_retire(t).is_empty() {
                    first_at.push(step);
                    break;
                }
                assert!(step < 20);
            }
        }
        first_at.sort();
        assert_eq!(
            first_at,
            [4, 5],
            "one observer first, the other one check later"
        );
    }
}
