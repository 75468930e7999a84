//! Keeping the inventory fresh without letting the platform's API stop measurement.
//!
//! [`Refresher`] wraps an [`InventorySource`]: it fetches once per interval (and sooner when a
//! new cgroup shows up), under a timeout. A failure keeps the last good inventory, marked
//! [`Stale`], logs once per outage, and retries with exponential backoff; the first success
//! after an outage logs once too and replaces the inventory, so a task that stopped meanwhile
//! is gone from it.
//!
//! Time is passed in (`now`, a tokio [`Instant`]) so the logic can be tested with paused time
//! or made-up instants.

use std::{
    collections::HashSet,
    time::{Duration, SystemTime},
};

use tokio::time::Instant;

use super::{Inventory, InventorySource, Stale, Unmatched};
use crate::{backoff::Backoff, defaults};

/// How often and how patiently to ask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefreshConfig {
    /// A fetch is due once per interval (the report interval).
    pub interval: Duration,
    /// A fetch taking longer fails; the caller waits at most this long for the platform.
    pub timeout: Duration,
    /// Fetches are never closer than this, however many new cgroups ask for one.
    pub min_spacing: Duration,
    /// Retry delays after failures: `backoff_min` doubling up to `backoff_max`.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl RefreshConfig {
    /// Defaults for a report interval: timeout half the interval within 1..10 s, fetches at
    /// least 1 s apart, backoff [`defaults::BACKOFF_MIN`] doubling to [`defaults::BACKOFF_MAX`].
    pub fn for_interval(interval: Duration) -> Self {
        Self {
            interval,
            timeout: (interval / 2).clamp(Duration::from_secs(1), Duration::from_secs(10)),
            min_spacing: Duration::from_secs(1),
            backoff_min: defaults::BACKOFF_MIN,
            backoff_max: defaults::BACKOFF_MAX,
        }
    }
}

/// The last good inventory of one source, refreshed on demand.
///
/// Each report interval, the run loop calls [`Refresher::tick`] with the cgroups it saw:
///
/// ```no_run
/// # async fn demo(cgroups: Vec<(u64, String)>) {
/// use std::time::Duration;
/// use observer::inventory::{refresh::{RefreshConfig, Refresher}, NoSource};
///
/// let mut refresher = Refresher::new(
///     Box::new(NoSource),
///     RefreshConfig::for_interval(Duration::from_secs(60)),
/// );
/// let paths: Vec<(u64, &str)> = cgroups.iter().map(|(id, p)| (*id, p.as_str())).collect();
/// let (inventory, unmatched) = refresher.tick(tokio::time::Instant::now(), &paths).await;
/// # let _ = (inventory, unmatched);
/// # }
/// ```
pub struct Refresher {
    source: Box<dyn InventorySource>,
    config: RefreshConfig,
    /// The last good inventory, marked stale while the source fails; cgroups attached.
    inventory: Inventory,
    /// Knows, after a failure, when to try again.
    backoff: Backoff<Instant>,
    last_attempt: Option<Instant>,
    /// A fetch was asked for ([`Refresher::want_now`]) and has not happened yet.
    wanted: bool,
    /// Unmatched cgroups that a fetch has already been made for: they do not ask again.
    asked: HashSet<u64>,
    attempts: u64,
    failures_total: u64,
}

impl std::fmt::Debug for Refresher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Refresher")
            .field("source", &self.source.name())
            .field("config", &self.config)
            .field("stale", &self.inventory.stale)
            .field("attempts", &self.attempts)
            .finish_non_exhaustive()
    }
}

impl Refresher {
    /// Nothing is fetched until the first [`Refresher::refresh`] or [`Refresher::tick`];
    /// until a fetch succeeds the inventory is empty.
    pub fn new(source: Box<dyn InventorySource>, config: RefreshConfig) -> Self {
        let inventory = Inventory::empty(source.name());
        let backoff = Backoff::new(config.backoff_min, config.backoff_max);
        Self {
            source,
            config,
            inventory,
            backoff,
            last_attempt: None,
            wanted: false,
            asked: HashSet::new(),
            attempts: 0,
            failures_total: 0,
        }
    }

    /// The source's name ("ecs", "kubernetes", "docker", "none").
    pub fn source_name(&self) -> &'static str {
        self.source.name()
    }

    /// The current inventory: the last good one, with [`Inventory::stale`] set while the
    /// source fails.
    pub fn inventory(&self) -> &Inventory {
        &self.inventory
    }

    /// Set while the source fails.
    pub fn stale(&self) -> Option<&Stale> {
        self.inventory.stale.as_ref()
    }

    /// Fetches made so far, failed ones included.
    pub fn attempts(&self) -> u64 {
        self.attempts
    }

    /// Failed fetches since start.
    pub fn failures_total(&self) -> u64 {
        self.failures_total
    }

    /// Attaches `cgroups` to the current inventory again, without asking for a fetch (after a
    /// walk of the hierarchy found the cgroups of containers the last fetch listed).
    pub fn attach(&mut self, cgroups: &[(u64, &str)]) -> Vec<Unmatched> {
        self.inventory.attach_cgroups(cgroups.iter().copied())
    }

    /// Asks for a fetch at the next [`Refresher::refresh`], before the interval is up (a new
    /// cgroup appeared). It still waits for `min_spacing` since the last fetch, and for the
    /// backoff while the source fails, so a storm of new cgroups cannot hammer the API.
    pub fn want_now(&mut self) {
        self.wanted = true;
    }

    /// Fetches if one is due (an interval since the last attempt, or wanted) and allowed
    /// (not backing off, `min_spacing` passed); returns the current inventory either way.
    pub async fn refresh(&mut self, now: Instant) -> &Inventory {
        self.refresh_if_due(now).await;
        &self.inventory
    }

    /// One interval's inventory for the cgroups seen (id, path under the v2 root): attaches
    /// them, asks for a fetch when one of them is a container or task/pod the inventory does
    /// not know yet (each such cgroup asks once), refreshes, and attaches again after a fetch.
    /// Returns the inventory and the cgroups that still match nothing.
    pub async fn tick(
        &mut self,
        now: Instant,
        cgroups: &[(u64, &str)],
    ) -> (&Inventory, Vec<Unmatched>) {
        let mut unmatched = self.inventory.attach_cgroups(cgroups.iter().copied());
        if unmatched.iter().any(|u| !self.asked.contains(&u.cgroup_id)) {
            self.want_now();
        }
        if self.refresh_if_due(now).await {
            unmatched = self.inventory.attach_cgroups(cgroups.iter().copied());
            // A fetch happened with these in view: they have had their chance.
            self.asked = unmatched.iter().map(|u| u.cgroup_id).collect();
        }
        (&self.inventory, unmatched)
    }

    /// Returns true when a fetch was made (whatever its outcome).
    async fn refresh_if_due(&mut self, now: Instant) -> bool {
        if !self.backoff.ready(now) {
            return false;
        }
        let since_last = self
            .last_attempt
            .map(|at| now.saturating_duration_since(at));
        // The same 90 % as below: at a 1 s interval a tick lands a few ms under a second after
        // the last fetch, and a strict check would skip every other one.
        if since_last.is_some_and(|d| d < self.config.min_spacing.mul_f64(0.9)) {
            return false;
        }
        // 90 %: a tick that comes a little early still counts as an interval.
        let due = since_last.is_none_or(|d| d >= self.config.interval.mul_f64(0.9));
        let retrying = self.backoff.until().is_some();
        if !(due || self.wanted || retrying) {
            return false;
        }
        self.wanted = false;
        self.last_attempt = Some(now);
        self.attempts += 1;
        let timeout = self.config.timeout;
        match tokio::time::timeout(timeout, self.source.fetch()).await {
            Ok(Ok(inventory)) => self.succeeded(inventory),
            Ok(Err(e)) => self.failed(now, e.to_string()),
            Err(_) => self.failed(now, format!("no answer within {timeout:?}")),
        }
        true
    }

    fn succeeded(&mut self, inventory: Inventory) {
        let name = self.source.name();
        if let Some(stale) = &self.inventory.stale {
            let down = SystemTime::now()
                .duration_since(stale.since)
                .unwrap_or_default();
            log::info!(
                "inventory ({name}): source is back after {} and {} failed attempts (last: {}); \
                 inventory refreshed",
                humantime::format_duration(Duration::from_secs(down.as_secs())),
                stale.failures,
                stale.reason
            );
        }
        match (&self.inventory.degraded, &inventory.degraded) {
            (None, Some(why)) => log::warn!("inventory ({name}): {why}"),
            (Some(_), None) => log::info!("inventory ({name}): full source answers again"),
            _ => {}
        }
        self.inventory = inventory;
        self.backoff.succeeded();
    }

    fn failed(&mut self, now: Instant, reason: String) {
        self.failures_total += 1;
        let name = self.source.name();
        let delay = self.backoff.failed(now, None);
        match &mut self.inventory.stale {
            Some(stale) => {
                stale.failures += 1;
                log::debug!(
                    "inventory ({name}): still failing ({} attempts): {reason}; next try in {delay:?}",
                    stale.failures
                );
                stale.reason = reason;
            }
            None => {
                log::warn!(
                    "inventory ({name}): {reason}; keeping the last good inventory (marked \
                     stale) and retrying with backoff from {delay:?}"
                );
                self.inventory.stale = Some(Stale {
                    since: SystemTime::now(),
                    reason,
                    failures: 1,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::{BTreeMap, VecDeque},
        sync::{
            atomic::{AtomicU32, Ordering},
            Arc, Mutex,
        },
    };

    use super::*;
    use crate::inventory::{
        Container, InventoryFuture, Limits, NetworkMode, Runtime, SourceError, Workload,
        WorkloadKind,
    };

    /// What the fake source does at its next fetch.
    enum Step {
        Tasks(Vec<&'static str>),
        Fail,
        Hang,
    }

    /// A source that plays a script and counts its fetches.
    #[derive(Clone, Default)]
    struct Script {
        steps: Arc<Mutex<VecDeque<Step>>>,
        calls: Arc<AtomicU32>,
    }

    impl Script {
        fn then(&self, step: Step) -> &Self {
            self.steps.lock().unwrap().push_back(step);
            self
        }
        fn calls(&self) -> u32 {
            self.calls.load(Ordering::SeqCst)
        }
    }

    const TASK_A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const TASK_B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    fn container_of(task: &str) -> String {
        task.repeat(2)
    }

    impl InventorySource for Script {
        fn name(&self) -> &'static str {
            "script"
        }
        fn fetch(&mut self) -> InventoryFuture<'_> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let step = self.steps.lock().unwrap().pop_front();
            Box::pin(async move {
                match step {
                    Some(Step::Tasks(ids)) => {
                        let mut inv = Inventory::empty("script");
                        inv.workloads = ids.into_iter().map(task).collect();
                        Ok(inv)
                    }
                    Some(Step::Fail) | None => Err(SourceError::Status {
                        url: "http://agent/v1/tasks".into(),
                        status: 500,
                    }),
                    Some(Step::Hang) => {
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                        unreachable!("the refresher times out first")
                    }
                }
            })
        }
    }

    fn task(id: &'static str) -> Workload {
        Workload {
            kind: WorkloadKind::EcsTask,
            id: id.into(),
            name: "web:1".into(),
            namespace: None,
            labels: BTreeMap::new(),
            owner: None,
            controller: None,
            status: None,
            network_mode: NetworkMode::Bridge,
            limits: Limits::default(),
            containers: vec![Container {
                id: container_of(id),
                name: "app".into(),
                runtime: Runtime::Docker,
                image: None,
                network_mode: NetworkMode::Bridge,
                limits: Limits::default(),
                labels: BTreeMap::new(),
                cgroup_ids: Vec::new(),
            }],
            cgroup_ids: Vec::new(),
        }
    }

    fn ids(inv: &Inventory) -> Vec<&str> {
        inv.workloads.iter().map(|t| t.id.as_str()).collect()
    }

    fn config() -> RefreshConfig {
        RefreshConfig {
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(2),
            min_spacing: Duration::from_secs(1),
            backoff_min: Duration::from_secs(1),
            backoff_max: Duration::from_secs(8),
        }
    }

    fn refresher(script: &Script) -> Refresher {
        Refresher::new(Box::new(script.clone()), config())
    }

    const S: Duration = Duration::from_secs(1);

    #[tokio::test(start_paused = true)]
    async fn fetches_once_per_interval() {
        let script = Script::default();
        script
            .then(Step::Tasks(vec![TASK_A]))
            .then(Step::Tasks(vec![TASK_A, TASK_B]));
        let mut r = refresher(&script);
        let t0 = Instant::now();
        assert_eq!(ids(r.refresh(t0).await), [TASK_A]);
        // Within the interval: no call.
        assert_eq!(ids(r.refresh(t0 + 5 * S).await), [TASK_A]);
        assert_eq!(script.calls(), 1);
        // A tick a little early still counts.
        assert_eq!(ids(r.refresh(t0 + 9500 * S / 1000).await), [TASK_A, TASK_B]);
        assert_eq!(script.calls(), 2);
        assert!(r.stale().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn failures_keep_the_last_good_inventory_and_back_off() {
        let script = Script::default();
        script
            .then(Step::Tasks(vec![TASK_A, TASK_B]))
            .then(Step::Fail)
            .then(Step::Hang)
            .then(Step::Fail)
            .then(Step::Tasks(vec![TASK_A]));
        let mut r = refresher(&script);
        let t0 = Instant::now();
        r.refresh(t0).await;

        // Fails at t0+10: stale, first retry 1 s later.
        let t1 = t0 + 10 * S;
        let inv = r.refresh(t1).await;
        assert_eq!(ids(inv), [TASK_A, TASK_B], "last good kept");
        let stale = inv.stale.clone().unwrap();
        assert_eq!(stale.failures, 1);
        assert!(stale.reason.contains("HTTP 500"), "{}", stale.reason);
        // Backing off: no call, even when wanted.
        r.want_now();
        r.refresh(t1 + S / 2).await;
        assert_eq!(script.calls(), 2);

        // Hangs: the timeout (2 s of paused time) turns it into a failure.
        let t2 = t1 + S;
        let inv = r.refresh(t2).await;
        assert_eq!(ids(inv), [TASK_A, TASK_B]);
        let stale = inv.stale.clone().unwrap();
        assert_eq!(stale.failures, 2);
        assert!(
            stale.reason.contains("no answer within 2s"),
            "{}",
            stale.reason
        );
        // The next delay doubled to 2 s.
        r.refresh(t2 + S).await;
        assert_eq!(script.calls(), 3);
        let t3 = t2 + 2 * S;
        r.refresh(t3).await;
        assert_eq!(script.calls(), 4);
        assert_eq!(r.stale().unwrap().failures, 3);
        assert_eq!(
            r.stale().unwrap().since,
            stale.since,
            "since the first failure"
        );

        // Retries do not wait for the interval: 4 s later it succeeds; B stopped meanwhile.
        let inv = r.refresh(t3 + 4 * S).await;
        assert_eq!(ids(inv), [TASK_A]);
        assert!(inv.stale.is_none());
        assert_eq!(script.calls(), 5);
        // Back on the interval, backoff reset.
        r.refresh(t3 + 5 * S).await;
        assert_eq!(script.calls(), 5);
        assert_eq!(r.backoff, Backoff::new(S, 8 * S));
    }

    #[tokio::test(start_paused = true)]
    async fn a_source_that_never_answered_is_empty_and_stale() {
        let script = Script::default();
        let mut r = refresher(&script);
        let inv = r.refresh(Instant::now()).await;
        assert!(inv.workloads.is_empty());
        assert_eq!(inv.source, "script");
        assert!(inv.stale.is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn new_cgroups_ask_once_and_are_spaced() {
        let script = Script::default();
        script
            .then(Step::Tasks(vec![TASK_A]))
            .then(Step::Tasks(vec![TASK_A, TASK_B]))
            .then(Step::Tasks(vec![TASK_A, TASK_B]));
        let mut r = refresher(&script);
        let t0 = Instant::now();
        let a = format!("/ecs/{TASK_A}/{}", container_of(TASK_A));
        let b = format!("/ecs/{TASK_B}/{}", container_of(TASK_B));
        let unknown = format!("/docker/{}", "c".repeat(64));

        let (inv, unmatched) = r.tick(t0, &[(1, a.as_str())]).await;
        assert_eq!(inv.workloads[0].containers[0].cgroup_ids, [1]);
        assert!(unmatched.is_empty());

        // B's container shows up 0.5 s later: wanted, but spacing holds it back.
        let cgroups = [(1, a.as_str()), (2, b.as_str())];
        let (_, unmatched) = r.tick(t0 + S / 2, &cgroups).await;
        assert_eq!(unmatched.len(), 1);
        assert_eq!(script.calls(), 1);
        // At 1 s it is fetched and attached, well before the interval.
        let (inv, unmatched) = r.tick(t0 + S, &cgroups).await;
        assert!(unmatched.is_empty());
        assert_eq!(inv.workloads[1].containers[0].cgroup_ids, [2]);
        assert_eq!(script.calls(), 2);

        // A container no source lists asks for one fetch, then waits like the rest.
        let cgroups = [(1, a.as_str()), (2, b.as_str()), (3, unknown.as_str())];
        let (_, unmatched) = r.tick(t0 + 3 * S, &cgroups).await;
        assert_eq!(unmatched.len(), 1);
        assert_eq!(script.calls(), 3);
        for s in 4..9 {
            r.tick(t0 + s * S, &cgroups).await;
        }
        assert_eq!(
            script.calls(),
            3,
            "no fetch storm for a cgroup nobody lists"
        );
    }
}
