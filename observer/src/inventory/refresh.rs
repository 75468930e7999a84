//! Keeping the inventory fresh without letting the platform's API stop measurement.
//!
//! [`Refresher`] wraps an [`InventorySource`]: it fetches once per interval (and sooner when a
//! new cgroup shows up), under a timeout. A failure keeps the last good inventory, marked
//! [`Stale`], logs once per outage, and retries with exponential backoff; the first success
//! after an outage logs once too and replaces the inventory, so a task that stopped meanwhile
//! is gone from it.
//!
//! An answer is not the only word on what runs: the kernel's is the other. A workload the
//! previous inventory had and a new answer leaves out is gone only when none of its cgroups
//! is left in cgroupfs with a process in it, or when the answer says it stopped
//! ([`Inventory::stopped`]); until then it is kept, marked [`Workload::unlisted_since`], so
//! its traffic, CPU and memory stay its own. An answer that lists nothing at all while
//! workloads of the last one still run is not believed: it is an outage, like a failed fetch
//! (`Refresher::succeeded` says why both rules are needed).
//!
//! Time is passed in (`now`, a tokio [`Instant`]) so the logic can be tested with paused time
//! or made-up instants.

use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    time::{Duration, SystemTime},
};

use tokio::time::Instant;

use super::{Inventory, InventorySource, Stale, Unmatched, Workload, WorkloadKind};
use crate::{backoff::Backoff, cgroupfs, defaults};

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
    /// The cgroup v2 mount, where a workload's cgroups are looked for once an answer leaves it
    /// out. None: the last walk of the hierarchy is taken at its word.
    cgroup_root: Option<PathBuf>,
    /// Path under the v2 root of every cgroup attached to a workload at the last attach: where
    /// to look for it. Replaced at every attach, so bounded by the cgroups that exist.
    attached_paths: HashMap<u64, String>,
    /// The cgroups of the last attach and what matched nothing, until a fetch: an interval
    /// whose walk and inventory are those of the one before has nothing new to attach, and
    /// parsing every cgroup's path again cost more than the rest of its inventory work.
    last_attach: Option<LastAttach>,
}

/// The cgroups (id, path) an attach was given, and what of them matched nothing.
type LastAttach = (Vec<(u64, Box<str>)>, Vec<Unmatched>);

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
            cgroup_root: None,
            attached_paths: HashMap::new(),
            last_attach: None,
        }
    }

    /// Looks in the cgroup v2 hierarchy mounted at `root` (the one the ids are of) whether a
    /// workload that an answer leaves out still runs. Without it, the last walk of the
    /// hierarchy says (it may be [`crate::cycle::WALK_AT_LEAST_EVERY`] intervals old).
    pub fn with_cgroup_root(mut self, root: PathBuf) -> Self {
        self.cgroup_root = Some(root);
        self
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
        if let Some((last, unmatched)) = &self.last_attach {
            let same = last.len() == cgroups.len()
                && (last.iter().zip(cgroups)).all(|((a, p), (b, q))| a == b && **p == **q);
            if same {
                return unmatched.clone();
            }
        }
        let unmatched = self.inventory.attach_cgroups(cgroups.iter().copied());
        let attached: HashSet<u64> = (self.inventory.workloads.iter())
            .flat_map(Workload::all_cgroup_ids)
            .collect();
        self.attached_paths = cgroups
            .iter()
            .filter(|(id, _)| attached.contains(id))
            .map(|(id, path)| (*id, (*path).to_owned()))
            .collect();
        let seen = cgroups.iter().map(|(id, path)| (*id, (*path).into()));
        self.last_attach = Some((seen.collect(), unmatched.clone()));
        unmatched
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
        let mut unmatched = self.attach(cgroups);
        if unmatched.iter().any(|u| !self.asked.contains(&u.cgroup_id)) {
            self.want_now();
        }
        if self.refresh_if_due(now).await {
            unmatched = self.attach(cgroups);
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
        // Whatever the outcome, the inventory may have changed: attach afresh.
        self.last_attach = None;
        let timeout = self.config.timeout;
        match tokio::time::timeout(timeout, self.source.fetch()).await {
            Ok(Ok(inventory)) => self.succeeded(now, inventory),
            Ok(Err(e)) => self.failed(now, e.to_string()),
            Err(_) => self.failed(now, format!("no answer within {timeout:?}")),
        }
        true
    }

    /// Takes a source's answer, with the kernel's word on what it leaves out.
    ///
    /// Why two rules and not one: keeping each left-out workload while its cgroups run would
    /// by itself keep every workload of an empty answer too, so nothing would be retired and no
    /// count lost. But it would take the empty answer for a true one: nothing would say that
    /// the source is broken (no stale mark, no `failures_total`, no log line of an outage), the
    /// next try would wait a whole interval instead of the backoff, and the rest of the answer
    /// (workloads that start meanwhile, their labels) would be believed while the source that
    /// gave it has plainly lost track (a kubelet or agent just restarted). An answer that lists
    /// nothing while the node runs workloads carries no information, so it is a failure; a
    /// partial answer is believed for what it lists, and the kernel decides about the rest.
    fn succeeded(&mut self, now: Instant, mut inventory: Inventory) {
        let name = self.source.name();
        let kept = self.still_running(&inventory);
        // Only workloads the last answer listed make an empty answer an outage: ones kept
        // unlisted already are the kernel's word alone, and must not hold the source stale
        // for as long as a cgroup of theirs lingers.
        let listed_before = |&i: &usize| self.inventory.workloads[i].unlisted_since.is_none();
        let lists_nothing = inventory.workloads.is_empty() && inventory.stopped.is_empty();
        if lists_nothing && kept.iter().any(listed_before) {
            let reason = empty_answer(name, inventory.degraded.is_some(), kept.len());
            self.failed(now, reason);
            return;
        }
        self.carry_over(&mut inventory, &kept);
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

    /// Indices of the workloads of the current inventory that `answer` leaves out, does not
    /// say stopped, and a cgroup of which still runs something ([`Refresher::cgroup_runs`]).
    /// A workload one of whose containers the answer lists elsewhere is not among them: the
    /// platform knows where that container is.
    fn still_running(&self, answer: &Inventory) -> Vec<usize> {
        let listed: HashSet<(WorkloadKind, &str)> = (answer.workloads.iter())
            .map(|w| (w.kind, w.id.as_str()))
            .chain(answer.stopped.iter().map(|(kind, id)| (*kind, id.as_str())))
            .collect();
        let containers: HashSet<&str> = (answer.workloads.iter())
            .flat_map(|w| &w.containers)
            .chain(&answer.standalone)
            .map(|c| c.id.as_str())
            .collect();
        (self.inventory.workloads.iter().enumerate())
            .filter(|(_, w)| !listed.contains(&(w.kind, w.id.as_str())))
            .filter(|(_, w)| {
                !w.containers
                    .iter()
                    .any(|c| containers.contains(c.id.as_str()))
            })
            .filter(|(_, w)| w.all_cgroup_ids().any(|id| self.cgroup_runs(id)))
            .map(|(i, _)| i)
            .collect()
    }

    /// True when the cgroup `id` still runs something: its directory (by the path it was
    /// attached under) is there, is the same cgroup (inode = cgroup id), and it or a child
    /// holds a process. Populated, not only present: a task's or pod's own cgroup outlives its
    /// containers until the agent or kubelet removes it, which a restarting one may not do.
    fn cgroup_runs(&self, id: u64) -> bool {
        let Some(path) = self.attached_paths.get(&id) else {
            return false;
        };
        let Some(root) = &self.cgroup_root else {
            return true;
        };
        let dir = root.join(path.trim_start_matches('/'));
        // No readable cgroup.events (not cgroup2): the directory alone says.
        cgroupfs::cgroup_id(&dir).is_ok_and(|found| found == id)
            && cgroupfs::is_populated(&dir).unwrap_or(true)
    }

    /// Moves the current inventory's workloads at `kept` into `answer`, marked as not listed
    /// (since the first answer that left them out), and logs who starts and stops being kept.
    fn carry_over(&mut self, answer: &mut Inventory, kept: &[usize]) {
        let kept: HashSet<usize> = kept.iter().copied().collect();
        let label = |w: &Workload| format!("{} ({})", w.name, w.id);
        let (mut newly, mut left) = (Vec::new(), Vec::new());
        let previous = std::mem::take(&mut self.inventory.workloads);
        for (i, mut w) in previous.into_iter().enumerate() {
            if kept.contains(&i) {
                if w.unlisted_since.is_none() {
                    newly.push(label(&w));
                    w.unlisted_since = Some(SystemTime::now());
                }
                answer.workloads.push(w);
            } else if w.unlisted_since.is_some() {
                left.push(label(&w));
            }
        }
        let name = self.source.name();
        if !newly.is_empty() {
            let (its, it) = if newly.len() == 1 {
                ("its", "it")
            } else {
                ("their", "them")
            };
            log::info!(
                "inventory ({name}): {} no longer listed, but {its} cgroups still hold \
                 processes: kept (marked not listed) until they are empty or the source lists \
                 or stops {it}",
                names(&newly),
            );
        }
        if !left.is_empty() {
            log::info!(
                "inventory ({name}): {} no longer kept as not listed (listed again, stopped, or \
                 nothing left in its cgroups)",
                names(&left)
            );
        }
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

/// Why an answer that lists nothing is taken for an outage, in the platform's words.
fn empty_answer(source: &str, degraded: bool, running: usize) -> String {
    let (who, one, many) = match source {
        "ecs" if degraded => ("the ECS Docker-label fallback", "task", "tasks"),
        "ecs" => ("the ECS agent", "task", "tasks"),
        "kubernetes" => ("the kubelet", "pod", "pods"),
        "docker" => ("the Docker engine", "workload", "workloads"),
        other => (other, "workload", "workloads"),
    };
    let whose = if running == 1 {
        format!("1 {one}'s")
    } else {
        format!("{running} {many}'")
    };
    format!(
        "{who} listed no {many} while {whose} containers still run (their cgroups hold \
         processes); treating it as an outage"
    )
}

/// Up to five names, then how many more.
fn names(all: &[String]) -> String {
    const SHOWN: usize = 5;
    let mut text = all
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if all.len() > SHOWN {
        text.push_str(&format!(" and {} more", all.len() - SHOWN));
    }
    text
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
        /// Lists the first tasks as running and says the second ones stopped.
        Stopped(Vec<&'static str>, Vec<&'static str>),
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
                    Some(Step::Stopped(running, stopped)) => {
                        let mut inv = Inventory::empty("script");
                        inv.workloads = running.into_iter().map(task).collect();
                        inv.stopped = (stopped.into_iter())
                            .map(|id| (WorkloadKind::EcsTask, id.to_owned()))
                            .collect();
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
                reach: Default::default(),
            }],
            cgroup_ids: Vec::new(),
            unlisted_since: None,
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

    #[tokio::test(start_paused = true)]
    async fn a_walk_that_changed_is_attached_again_without_a_fetch() {
        let script = Script::default();
        script.then(Step::Tasks(vec![TASK_A]));
        let mut r = refresher(&script);
        let t0 = Instant::now();
        let a = format!("/ecs/{TASK_A}/{}", container_of(TASK_A));
        let sub = format!("{a}/sub");
        let (inv, _) = r.tick(t0, &[(1, a.as_str())]).await;
        assert_eq!(inv.workloads[0].containers[0].cgroup_ids, [1]);
        // The same walk: the same answer.
        let (inv, unmatched) = r.tick(t0 + S / 10, &[(1, a.as_str())]).await;
        assert_eq!(inv.workloads[0].containers[0].cgroup_ids, [1]);
        assert!(unmatched.is_empty());
        // A child cgroup appears, then the container's cgroup is made again under a new id:
        // each walk is attached, with no fetch in between.
        let (inv, _) = r
            .tick(t0 + S / 5, &[(1, a.as_str()), (4, sub.as_str())])
            .await;
        let mut ids = inv.workloads[0].containers[0].cgroup_ids.clone();
        ids.sort();
        assert_eq!(ids, [1, 4]);
        let (inv, _) = r.tick(t0 + S / 4, &[(5, a.as_str())]).await;
        assert_eq!(inv.workloads[0].containers[0].cgroup_ids, [5]);
        assert_eq!(script.calls(), 1);
    }

    // ---- workloads an answer leaves out: the kernel's word ----

    const TASK_C: &str = "cccccccccccccccccccccccccccccccc";

    /// A directory tree standing in for the cgroup v2 hierarchy: a "cgroup" is a directory,
    /// its id the directory's inode, as in cgroupfs. Removed when dropped.
    struct Hierarchy {
        root: PathBuf,
        /// (id, path under the root) of every container cgroup made.
        cgroups: Vec<(u64, String)>,
    }

    impl Hierarchy {
        fn new(label: &str) -> Self {
            let root = std::env::temp_dir()
                .join(format!("observer-refresh-{label}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&root);
            std::fs::create_dir_all(&root).unwrap();
            Self {
                root,
                cgroups: Vec::new(),
            }
        }

        /// Makes `/ecs/<task>/<container>` and returns its id.
        fn container(&mut self, task: &str) -> u64 {
            let path = format!("/ecs/{task}/{}", container_of(task));
            let dir = self.root.join(&path[1..]);
            std::fs::create_dir_all(&dir).unwrap();
            let id = cgroupfs::cgroup_id(&dir).unwrap();
            self.cgroups.push((id, path));
            id
        }

        /// Removes the task's container cgroup from the tree; a walk may still list it.
        fn remove(&self, task: &str) {
            let dir = self.root.join(format!("ecs/{task}/{}", container_of(task)));
            std::fs::remove_dir(dir).unwrap();
        }

        /// Leaves the task's container cgroup in place with no process in it, as cgroupfs
        /// says in `cgroup.events`.
        fn empty(&self, task: &str) {
            let dir = self.root.join(format!("ecs/{task}/{}", container_of(task)));
            std::fs::write(dir.join("cgroup.events"), "populated 0\nfrozen 0\n").unwrap();
        }

        /// What a walk of the hierarchy made before any removal shows.
        fn walk(&self) -> Vec<(u64, &str)> {
            self.cgroups
                .iter()
                .map(|(id, p)| (*id, p.as_str()))
                .collect()
        }
    }

    impl Drop for Hierarchy {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }

    fn refresher_in(script: &Script, tree: &Hierarchy) -> Refresher {
        refresher(script).with_cgroup_root(tree.root.clone())
    }

    fn unlisted(inv: &Inventory, id: &str) -> Option<SystemTime> {
        let w = inv
            .workloads
            .iter()
            .find(|w| w.id == id)
            .expect("in the inventory");
        w.unlisted_since
    }

    /// An answer that lists nothing while the tasks' cgroups hold processes is an outage: last good
    /// inventory kept, stale with a reason, counted, retried with backoff; once the cgroups
    /// are gone the same empty answer is the truth.
    #[tokio::test(start_paused = true)]
    async fn an_empty_answer_while_cgroups_exist_is_an_outage() {
        let mut tree = Hierarchy::new("outage");
        let (a, b) = (tree.container(TASK_A), tree.container(TASK_B));
        let script = Script::default();
        script
            .then(Step::Tasks(vec![TASK_A, TASK_B]))
            .then(Step::Tasks(vec![]))
            .then(Step::Tasks(vec![]))
            .then(Step::Tasks(vec![TASK_A, TASK_B]))
            .then(Step::Tasks(vec![]));
        let mut r = refresher_in(&script, &tree);
        let t0 = Instant::now();
        let walk = tree.walk();
        r.tick(t0, &walk).await;

        let t1 = t0 + 10 * S;
        let (inv, _) = r.tick(t1, &walk).await;
        assert_eq!(ids(inv), [TASK_A, TASK_B], "the last good inventory");
        assert!(inv.workloads.iter().all(|w| w.unlisted_since.is_none()));
        assert_eq!(inv.workloads[0].containers[0].cgroup_ids, [a]);
        assert_eq!(inv.workloads[1].containers[0].cgroup_ids, [b]);
        let stale = inv.stale.clone().expect("stale");
        assert_eq!(
            stale.reason,
            "script listed no workloads while 2 workloads' containers still run (their \
             cgroups hold processes); treating it as an outage"
        );
        assert_eq!(r.failures_total(), 1);
        // Retried on the backoff (1 s), not the interval; still empty: still an outage.
        r.tick(t1 + S, &walk).await;
        assert_eq!(script.calls(), 3);
        assert_eq!(r.stale().unwrap().failures, 2);
        assert_eq!(r.failures_total(), 2);
        // Then the source lists them again: fresh, nothing marked.
        let (inv, _) = r.tick(t1 + 3 * S, &walk).await;
        assert_eq!(script.calls(), 4);
        assert!(inv.stale.is_none());
        assert_eq!(ids(inv), [TASK_A, TASK_B]);

        // The tasks really stop (their cgroups go; the walk has not seen it yet): the next
        // empty answer is believed.
        tree.remove(TASK_A);
        tree.remove(TASK_B);
        let (inv, _) = r.tick(t1 + 13 * S, &walk).await;
        assert!(inv.workloads.is_empty(), "{:?}", ids(inv));
        assert!(inv.stale.is_none());
        assert_eq!(r.failures_total(), 2);
    }

    /// One task left out while its cgroup exists: kept, marked since the first answer that
    /// left it out, its cgroup still its own; listed again, it is a plain workload again.
    #[tokio::test(start_paused = true)]
    async fn a_task_left_out_while_its_cgroup_exists_is_kept_and_marked() {
        let mut tree = Hierarchy::new("kept");
        let (_, b) = (tree.container(TASK_A), tree.container(TASK_B));
        let script = Script::default();
        script
            .then(Step::Tasks(vec![TASK_A, TASK_B]))
            .then(Step::Tasks(vec![TASK_A]))
            .then(Step::Tasks(vec![TASK_A]))
            .then(Step::Tasks(vec![TASK_A, TASK_B]));
        let mut r = refresher_in(&script, &tree);
        let t0 = Instant::now();
        let walk = tree.walk();
        r.tick(t0, &walk).await;

        let before = SystemTime::now();
        let (inv, unmatched) = r.tick(t0 + 10 * S, &walk).await;
        assert!(inv.stale.is_none(), "a partial answer is no outage");
        assert_eq!(ids(inv), [TASK_A, TASK_B]);
        assert!(unlisted(inv, TASK_A).is_none());
        let since = unlisted(inv, TASK_B).expect("B marked not listed");
        assert!(since >= before);
        assert_eq!(inv.workloads[1].containers[0].cgroup_ids, [b], "still B's");
        assert!(unmatched.is_empty(), "B's cgroup asks for no fetch");
        assert_eq!(r.failures_total(), 0);

        // Left out again: the same mark, from the first time.
        let (inv, _) = r.tick(t0 + 20 * S, &walk).await;
        assert_eq!(unlisted(inv, TASK_B), Some(since));
        assert_eq!(inv.workloads.len(), 2);

        // Listed again: a plain workload, no mark.
        let (inv, _) = r.tick(t0 + 30 * S, &walk).await;
        assert_eq!(ids(inv), [TASK_A, TASK_B]);
        assert!(inv.workloads.iter().all(|w| w.unlisted_since.is_none()));
    }

    /// Left out and its cgroup gone: gone, even while the last walk still lists the cgroup
    /// (cgroupfs is asked, not the walk); kept while it ran, gone once its cgroup is empty.
    #[tokio::test(start_paused = true)]
    async fn a_task_left_out_whose_cgroup_is_gone_is_removed() {
        let mut tree = Hierarchy::new("gone");
        tree.container(TASK_A);
        tree.container(TASK_B);
        let script = Script::default();
        script
            .then(Step::Tasks(vec![TASK_A, TASK_B]))
            .then(Step::Tasks(vec![TASK_A]))
            .then(Step::Tasks(vec![TASK_A]));
        let mut r = refresher_in(&script, &tree);
        let t0 = Instant::now();
        let walk = tree.walk();
        r.tick(t0, &walk).await;
        tree.remove(TASK_B);
        let (inv, _) = r.tick(t0 + 10 * S, &walk).await;
        assert_eq!(ids(inv), [TASK_A]);
        assert!(inv.stale.is_none());

        // Kept while it ran, removed once its cgroup goes.
        tree.container(TASK_C);
        let script = Script::default();
        script
            .then(Step::Tasks(vec![TASK_A, TASK_C]))
            .then(Step::Tasks(vec![TASK_A]))
            .then(Step::Tasks(vec![TASK_A]));
        let mut r = refresher_in(&script, &tree);
        let walk: Vec<(u64, &str)> = tree.walk();
        r.tick(t0, &walk).await;
        let (inv, _) = r.tick(t0 + 10 * S, &walk).await;
        assert!(unlisted(inv, TASK_C).is_some());
        // Its cgroup lingers, but holds no process: nothing of it runs.
        tree.empty(TASK_C);
        let (inv, _) = r.tick(t0 + 20 * S, &walk).await;
        assert_eq!(ids(inv), [TASK_A]);
    }

    /// The platform says it stopped: gone, whatever cgroup lingers; and an answer that only
    /// says so lists something, so it is no outage.
    #[tokio::test(start_paused = true)]
    async fn a_task_the_platform_says_stopped_is_removed_though_its_cgroup_lingers() {
        let mut tree = Hierarchy::new("stopped");
        tree.container(TASK_A);
        tree.container(TASK_B);
        tree.container(TASK_C);
        let script = Script::default();
        script
            .then(Step::Tasks(vec![TASK_A, TASK_B, TASK_C]))
            .then(Step::Stopped(vec![TASK_A], vec![TASK_B]))
            .then(Step::Stopped(vec![], vec![TASK_A, TASK_C]));
        let mut r = refresher_in(&script, &tree);
        let t0 = Instant::now();
        let walk = tree.walk();
        r.tick(t0, &walk).await;
        let (inv, _) = r.tick(t0 + 10 * S, &walk).await;
        assert_eq!(ids(inv), [TASK_A, TASK_C], "B stopped; C only left out");
        assert!(unlisted(inv, TASK_C).is_some());
        let (inv, _) = r.tick(t0 + 20 * S, &walk).await;
        assert!(inv.workloads.is_empty(), "{:?}", ids(inv));
        assert!(inv.stale.is_none());
    }

    /// An empty answer when only workloads kept unlisted are left is no outage: they stay
    /// kept, and the source is not held stale for as long as a cgroup lingers.
    #[tokio::test(start_paused = true)]
    async fn an_empty_answer_after_only_unlisted_ones_is_believed() {
        let mut tree = Hierarchy::new("only-unlisted");
        tree.container(TASK_A);
        tree.container(TASK_B);
        let script = Script::default();
        script
            .then(Step::Tasks(vec![TASK_A, TASK_B]))
            .then(Step::Stopped(vec![], vec![TASK_A]))
            .then(Step::Tasks(vec![]));
        let mut r = refresher_in(&script, &tree);
        let t0 = Instant::now();
        let walk = tree.walk();
        r.tick(t0, &walk).await;
        let (inv, _) = r.tick(t0 + 10 * S, &walk).await;
        assert_eq!(ids(inv), [TASK_B]);
        let since = unlisted(inv, TASK_B).unwrap();
        let (inv, _) = r.tick(t0 + 20 * S, &walk).await;
        assert!(inv.stale.is_none());
        assert_eq!(unlisted(inv, TASK_B), Some(since));
        assert_eq!(r.failures_total(), 0);
    }

    #[test]
    fn outage_reasons_speak_the_platforms_words() {
        assert_eq!(
            empty_answer("ecs", false, 3),
            "the ECS agent listed no tasks while 3 tasks' containers still run (their cgroups \
             hold processes); treating it as an outage"
        );
        assert!(empty_answer("kubernetes", false, 1)
            .starts_with("the kubelet listed no pods while 1 pod's containers still run"));
        assert!(empty_answer("ecs", true, 2).starts_with("the ECS Docker-label fallback"));
        let many: Vec<String> = (0..7).map(|i| i.to_string()).collect();
        assert_eq!(names(&many), "0, 1, 2, 3, 4 and 2 more");
    }
}
