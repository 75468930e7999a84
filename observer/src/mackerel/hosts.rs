//! Host lifecycle, one Mackerel host per task or pod, as a pure state machine: it is told what
//! is live each interval and how each call went, and says which call to make next. The clock
//! is passed in, so the tests drive time by hand.
//!
//! - A live task without a host id is registered: found by customIdentifier (so a restarted
//!   observer re-uses its hosts), else created. The API creates hosts in status working, its
//!   default, and the caller then sets `--mackerel-host-status-on-start` if given; the status
//!   of a found host is left as it is (someone may have set maintenance).
//! - A registered host whose name, meta or roles differ from what was last sent is updated.
//! - A task missing from the reports is retired once `retire_after` has passed since the last
//!   report that had it. Absence is judged by complete reports only: while the inventory is
//!   stale (an incomplete report) or no report arrives, the hosts seen last stay live and
//!   nothing is retired. A live task's host is never retired. On shutdown, the hosts of tasks
//!   already gone are retired at once (nobody else will); the others stay.
//! - Hosts an earlier run saved come back as not live: retired after the grace period unless
//!   a report lists them again.
//! - A refused request (4xx) is tried again for that host only after `refused_retry`;
//!   unavailability (5xx, timeouts) is the caller's global backoff, not a host's.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use super::{client::HostParam, model::HostMeta, state::SavedHost};

/// Wait before repeating a request the API refused for one host.
pub const DEFAULT_REFUSED_RETRY: Duration = Duration::from_secs(600);

#[derive(Debug)]
struct Entry {
    /// What the latest report says the host should look like.
    wanted: HostParam,
    host_id: Option<String>,
    /// What was last sent successfully; None after finding a host made by an earlier run.
    sent: Option<HostParam>,
    /// Time of the latest report that listed the task.
    last_seen: Instant,
    /// Listed in the latest report.
    live: bool,
    /// No request for this host before then (after a refusal).
    retry_at: Option<Instant>,
}

/// One API call the caller should make, and report back on.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Find the host by customIdentifier, and create it if none is found; then
    /// [`HostTable::registered`].
    Register { key: String, param: HostParam },
    /// PUT the host; then [`HostTable::updated`].
    Update {
        key: String,
        host_id: String,
        param: HostParam,
    },
    /// Retire the host; then [`HostTable::retired`].
    Retire {
        key: String,
        host_id: String,
        name: String,
    },
}

impl Action {
    /// customIdentifier of the host the action is about.
    pub fn key(&self) -> &str {
        match self {
            Action::Register { key, .. }
            | Action::Update { key, .. }
            | Action::Retire { key, .. } => key,
        }
    }
}

/// The hosts observer manages, keyed by customIdentifier.
#[derive(Debug)]
pub struct HostTable {
    entries: BTreeMap<String, Entry>,
    retire_after: Duration,
    refused_retry: Duration,
    /// Time of the latest complete report: absence is measured up to it, not up to "now".
    latest_report: Option<Instant>,
    /// Whether the latest report was complete: retirement waits while it is not.
    latest_complete: bool,
}

/// Which retirements [`HostTable::actions`] may return.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retire {
    No,
    /// Hosts of tasks gone for the grace period.
    AfterGrace,
    /// Hosts of every task the latest complete report did not list (at shutdown).
    AllGone,
}

impl HostTable {
    pub fn new(retire_after: Duration, refused_retry: Duration) -> Self {
        Self {
            entries: BTreeMap::new(),
            retire_after,
            refused_retry,
            latest_report: None,
            latest_complete: false,
        }
    }

    /// Takes one interval's list of live hosts. When `complete` is false (a stale inventory)
    /// hosts missing from it are kept live: absence then proves nothing. Returns the keys of
    /// hosts forgotten without ever being registered (gone for `retire_after`): their buffered
    /// values can go.
    pub fn observe(&mut self, now: Instant, live: Vec<HostParam>, complete: bool) -> Vec<String> {
        self.latest_complete = complete;
        if !complete {
            for e in self.entries.values_mut().filter(|e| e.live) {
                e.last_seen = now;
            }
            for param in live {
                self.upsert(now, param);
            }
            return Vec::new();
        }
        self.latest_report = Some(now);
        for e in self.entries.values_mut() {
            e.live = false;
        }
        for param in live {
            self.upsert(now, param);
        }
        let retire_after = self.retire_after;
        let mut forgotten = Vec::new();
        self.entries.retain(|key, e| {
            let keep = e.live || e.host_id.is_some() || now - e.last_seen < retire_after;
            if !keep {
                forgotten.push(key.clone());
            }
            keep
        });
        forgotten
    }

    fn upsert(&mut self, now: Instant, param: HostParam) {
        let key = param.custom_identifier.clone();
        match self.entries.get_mut(&key) {
            Some(e) => {
                e.wanted = param;
                e.last_seen = now;
                e.live = true;
            }
            None => {
                self.entries.insert(
                    key,
                    Entry {
                        wanted: param,
                        host_id: None,
                        sent: None,
                        last_seen: now,
                        live: true,
                        retry_at: None,
                    },
                );
            }
        }
    }

    /// Hosts an earlier run made, from the state file: known ids, not live until a report
    /// lists them.
    pub fn restore(&mut self, now: Instant, saved: Vec<SavedHost>) {
        for h in saved {
            self.entries.entry(h.key.clone()).or_insert(Entry {
                wanted: HostParam {
                    name: h.name,
                    display_name: None,
                    memo: None,
                    custom_identifier: h.key,
                    meta: HostMeta::observer(None),
                    role_fullnames: Vec::new(),
                },
                host_id: Some(h.host_id),
                sent: None,
                last_seen: now,
                live: false,
                retry_at: None,
            });
        }
    }

    /// The hosts with an id, for the state file.
    pub fn save(&self) -> Vec<SavedHost> {
        self.entries
            .iter()
            .filter_map(|(key, e)| {
                Some(SavedHost {
                    key: key.clone(),
                    host_id: e.host_id.clone()?,
                    name: e.wanted.name.clone(),
                })
            })
            .collect()
    }

    /// The calls due at `now`. Retirements as `retire` says, never while the latest report
    /// is incomplete, and only for hosts with no values left to send (`has_values`).
    pub fn actions(
        &self,
        now: Instant,
        retire: Retire,
        has_values: impl Fn(&str) -> bool,
    ) -> Vec<Action> {
        let may_retire = |e: &Entry| match retire {
            Retire::No => false,
            _ if !self.latest_complete => false,
            Retire::AfterGrace => self.gone_long_enough(e),
            Retire::AllGone => true,
        };
        let mut out = Vec::new();
        for (key, e) in &self.entries {
            if e.retry_at.is_some_and(|t| now < t) {
                continue;
            }
            match (&e.host_id, e.live) {
                (None, true) => out.push(Action::Register {
                    key: key.clone(),
                    param: e.wanted.clone(),
                }),
                (Some(id), true) if e.sent.as_ref() != Some(&e.wanted) => {
                    out.push(Action::Update {
                        key: key.clone(),
                        host_id: id.clone(),
                        param: e.wanted.clone(),
                    })
                }
                (Some(id), false) if may_retire(e) && !has_values(key) => {
                    out.push(Action::Retire {
                        key: key.clone(),
                        host_id: id.clone(),
                        name: e.wanted.name.clone(),
                    })
                }
                _ => {}
            }
        }
        out
    }

    /// The earliest time after `now` that a host waiting after a refusal may be tried again.
    pub fn next_retry(&self, now: Instant) -> Option<Instant> {
        self.entries
            .values()
            .filter_map(|e| e.retry_at)
            .filter(|t| *t > now)
            .min()
    }

    /// The host was found (`sent` None: it will be updated next) or created (`sent` = what
    /// was sent).
    pub fn registered(&mut self, key: &str, host_id: String, sent: Option<HostParam>) {
        if let Some(e) = self.entries.get_mut(key) {
            e.host_id = Some(host_id);
            e.sent = sent;
            e.retry_at = None;
        }
    }

    pub fn updated(&mut self, key: &str, sent: HostParam) {
        if let Some(e) = self.entries.get_mut(key) {
            e.sent = Some(sent);
            e.retry_at = None;
        }
    }

    /// The host is retired (or the API no longer knows it): forget it.
    pub fn retired(&mut self, key: &str) {
        self.entries.remove(key);
    }

    /// The API refused a request about this host: wait before asking again.
    pub fn refused(&mut self, key: &str, now: Instant) {
        if let Some(e) = self.entries.get_mut(key) {
            e.retry_at = Some(now + self.refused_retry);
        }
    }

    /// The Mackerel id of the host with this customIdentifier, once known.
    pub fn host_id(&self, key: &str) -> Option<&str> {
        self.entries.get(key)?.host_id.as_deref()
    }

    /// The host name of a customIdentifier, for logs.
    pub fn name(&self, key: &str) -> Option<&str> {
        self.entries.get(key).map(|e| e.wanted.name.as_str())
    }

    /// Live hosts still without an id.
    pub fn unregistered(&self) -> usize {
        self.entries
            .values()
            .filter(|e| e.live && e.host_id.is_none())
            .count()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn gone_long_enough(&self, e: &Entry) -> bool {
        self.latest_report.is_some_and(|latest| {
            latest.saturating_duration_since(e.last_seen) >= self.retire_after
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mackerel::model::HostMeta;
    use crate::mackerel::state::SavedHost;

    const I: Duration = Duration::from_secs(60);

    fn param(key: &str, role: &str) -> HostParam {
        HostParam {
            name: format!("name-{key}"),
            display_name: None,
            memo: None,
            custom_identifier: key.to_string(),
            meta: HostMeta::observer(None),
            role_fullnames: vec![role.to_string()],
        }
    }

    fn table() -> HostTable {
        HostTable::new(2 * I, Duration::from_secs(600))
    }

    fn none(_: &str) -> bool {
        false
    }

    fn kinds(actions: &[Action]) -> Vec<String> {
        actions
            .iter()
            .map(|a| {
                let kind = match a {
                    Action::Register { .. } => "register",
                    Action::Update { .. } => "update",
                    Action::Retire { .. } => "retire",
                };
                format!("{kind} {}", a.key())
            })
            .collect()
    }

    #[test]
    fn live_tasks_are_registered_once() {
        let t0 = Instant::now();
        let mut h = table();
        h.observe(t0, vec![param("a", "s:r"), param("b", "s:r")], true);
        assert_eq!(
            kinds(&h.actions(t0, Retire::AfterGrace, none)),
            ["register a", "register b"]
        );
        h.registered("a", "ida".into(), Some(param("a", "s:r")));
        assert_eq!(
            kinds(&h.actions(t0, Retire::AfterGrace, none)),
            ["register b"]
        );
        assert_eq!(h.unregistered(), 1);
        h.registered("b", "idb".into(), Some(param("b", "s:r")));
        h.observe(t0 + I, vec![param("a", "s:r"), param("b", "s:r")], true);
        assert!(h.actions(t0 + I, Retire::AfterGrace, none).is_empty());
        assert_eq!(h.host_id("a"), Some("ida"));
    }

    #[test]
    fn a_found_host_is_updated_and_changes_are_sent() {
        let t0 = Instant::now();
        let mut h = table();
        h.observe(t0, vec![param("a", "s:r")], true);
        h.registered("a", "ida".into(), None);
        let actions = h.actions(t0, Retire::AfterGrace, none);
        assert_eq!(
            actions,
            [Action::Update {
                key: "a".into(),
                host_id: "ida".into(),
                param: param("a", "s:r")
            }]
        );
        h.updated("a", param("a", "s:r"));
        assert!(h.actions(t0, Retire::AfterGrace, none).is_empty());
        h.observe(t0 + I, vec![param("a", "s:other")], true);
        assert_eq!(
            kinds(&h.actions(t0 + I, Retire::AfterGrace, none)),
            ["update a"]
        );
    }

    #[test]
    fn gone_hosts_are_retired_after_the_grace_period_and_not_before() {
        let t0 = Instant::now();
        let mut h = table();
        h.observe(t0, vec![param("a", "s:r"), param("b", "s:r")], true);
        h.registered("a", "ida".into(), Some(param("a", "s:r")));
        h.registered("b", "idb".into(), Some(param("b", "s:r")));
        h.observe(t0 + I, vec![param("a", "s:r")], true);
        assert!(
            h.actions(t0 + I, Retire::AfterGrace, none).is_empty(),
            "one interval is not enough"
        );
        h.observe(t0 + 2 * I, vec![param("a", "s:r")], true);
        let actions = h.actions(t0 + 2 * I, Retire::AfterGrace, none);
        assert_eq!(
            actions,
            [Action::Retire {
                key: "b".into(),
                host_id: "idb".into(),
                name: "name-b".into()
            }]
        );
        // Not on shutdown, and not while values for it wait to be sent.
        assert!(h.actions(t0 + 2 * I, Retire::No, none).is_empty());
        assert!(h
            .actions(t0 + 2 * I, Retire::AfterGrace, |k| k == "b")
            .is_empty());
        h.retired("b");
        assert!(h.actions(t0 + 2 * I, Retire::AfterGrace, none).is_empty());
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn no_reports_means_no_retirement() {
        let t0 = Instant::now();
        let mut h = table();
        h.observe(t0, vec![param("a", "s:r")], true);
        h.registered("a", "ida".into(), Some(param("a", "s:r")));
        // Hours pass without a report: the inventory is failing, the task may well be alive.
        assert!(h.actions(t0 + 100 * I, Retire::AfterGrace, none).is_empty());
    }

    #[test]
    fn a_task_that_comes_back_keeps_its_host() {
        let t0 = Instant::now();
        let mut h = table();
        h.observe(t0, vec![param("a", "s:r")], true);
        h.registered("a", "ida".into(), Some(param("a", "s:r")));
        h.observe(t0 + I, vec![], true);
        h.observe(
            t0 + 2 * I - Duration::from_secs(1),
            vec![param("a", "s:r")],
            true,
        );
        h.observe(t0 + 3 * I, vec![param("a", "s:r")], true);
        assert!(h.actions(t0 + 3 * I, Retire::AfterGrace, none).is_empty());
    }

    #[test]
    fn refused_hosts_wait_and_others_go_on() {
        let t0 = Instant::now();
        let mut h = table();
        h.observe(t0, vec![param("a", "s:r"), param("b", "s:r")], true);
        h.refused("a", t0);
        assert_eq!(
            kinds(&h.actions(t0, Retire::AfterGrace, none)),
            ["register b"]
        );
        assert_eq!(h.next_retry(t0), Some(t0 + Duration::from_secs(600)));
        assert_eq!(h.next_retry(t0 + Duration::from_secs(600)), None);
        let later = t0 + Duration::from_secs(600);
        assert_eq!(
            kinds(&h.actions(later, Retire::AfterGrace, none)),
            ["register a", "register b"]
        );
    }

    #[test]
    fn unregistered_gone_tasks_are_forgotten_after_the_grace_period() {
        let t0 = Instant::now();
        let mut h = table();
        h.observe(t0, vec![param("a", "s:r")], true);
        assert!(h.observe(t0 + I, vec![], true).is_empty());
        // Gone and without a host: nothing to register and nothing to retire.
        assert!(h.actions(t0 + I, Retire::AfterGrace, none).is_empty());
        assert_eq!(h.observe(t0 + 2 * I, vec![], true), ["a"]);
        assert!(h.is_empty());
    }

    #[test]
    fn a_stale_report_keeps_every_host_and_retires_none() {
        let t0 = Instant::now();
        let mut h = table();
        h.observe(t0, vec![param("a", "s:r"), param("b", "s:r")], true);
        h.registered("a", "ida".into(), Some(param("a", "s:r")));
        h.registered("b", "idb".into(), Some(param("b", "s:r")));
        // The platform answers nothing useful for ten intervals: the hosts stay live.
        for i in 1..=10 {
            h.observe(t0 + i * I, vec![], false);
            assert!(h.actions(t0 + i * I, Retire::AfterGrace, none).is_empty());
            assert!(h.actions(t0 + i * I, Retire::AllGone, none).is_empty());
        }
        // Back, and b really is gone: the grace period counts from the last stale report.
        h.observe(t0 + 11 * I, vec![param("a", "s:r")], true);
        assert!(h.actions(t0 + 11 * I, Retire::AfterGrace, none).is_empty());
        h.observe(t0 + 12 * I, vec![param("a", "s:r")], true);
        assert_eq!(
            kinds(&h.actions(t0 + 12 * I, Retire::AfterGrace, none)),
            ["retire b"]
        );
    }

    #[test]
    fn at_shutdown_hosts_of_tasks_already_gone_are_retired_at_once() {
        let t0 = Instant::now();
        let mut h = table();
        h.observe(t0, vec![param("a", "s:r"), param("b", "s:r")], true);
        h.registered("a", "ida".into(), Some(param("a", "s:r")));
        h.registered("b", "idb".into(), Some(param("b", "s:r")));
        h.observe(t0 + I, vec![param("a", "s:r")], true);
        assert!(h.actions(t0 + I, Retire::AfterGrace, none).is_empty());
        assert_eq!(
            kinds(&h.actions(t0 + I, Retire::AllGone, none)),
            ["retire b"]
        );
    }

    #[test]
    fn saved_hosts_come_back_and_are_retired_if_their_tasks_are_gone() {
        let t0 = Instant::now();
        let mut before = table();
        before.observe(
            t0,
            vec![param("a", "s:r"), param("b", "s:r"), param("c", "s:r")],
            true,
        );
        before.registered("a", "ida".into(), Some(param("a", "s:r")));
        before.registered("b", "idb".into(), Some(param("b", "s:r")));
        let saved = before.save();
        assert_eq!(
            saved,
            [
                SavedHost {
                    key: "a".into(),
                    host_id: "ida".into(),
                    name: "name-a".into()
                },
                SavedHost {
                    key: "b".into(),
                    host_id: "idb".into(),
                    name: "name-b".into()
                },
            ],
            "c has no id: nothing to keep"
        );
        let mut after = table();
        after.restore(t0, saved);
        // a still runs: updated (what it looks like now), never registered again.
        after.observe(t0 + I, vec![param("a", "s:r")], true);
        assert_eq!(
            kinds(&after.actions(t0 + I, Retire::AfterGrace, none)),
            ["update a"]
        );
        after.updated("a", param("a", "s:r"));
        after.observe(t0 + 2 * I, vec![param("a", "s:r")], true);
        assert_eq!(
            kinds(&after.actions(t0 + 2 * I, Retire::AfterGrace, none)),
            ["retire b"]
        );
    }
}
