//! The Mackerel output: [`MackerelSink`] turns each snapshot into an [`IntervalReport`] and
//! hands it to [`MackerelReporter`], a tokio task that owns the API client, the host table and
//! the delivery buffer; at shutdown the sink flushes it within the bound.
//!
//! Each round the task posts buffered values (oldest first), then registers or updates hosts,
//! posts again (the values of hosts just registered), posts the graph definitions once, and
//! retires hosts of tasks gone for the grace period. A retryable failure (unreachable, 5xx,
//! 429) pauses every call (exponential backoff, or the server's Retry-After); a refusal (other
//! 4xx) is logged with the response body and costs only that host or that batch.

use std::{
    collections::HashSet,
    future::Future,
    ops::ControlFlow,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant, SystemTime},
};

use tokio::sync::{mpsc, oneshot, watch};

use crate::{
    appmetrics::{
        scrape::{Scraped, TargetList},
        Scraper,
    },
    sink::{Sink, SinkError},
    snapshot::Snapshot,
};

use super::{
    buffer::{Backoff, Batch, Buffer},
    client::{ApiError, Client, ClientError, GraphDef, HostParam},
    hosts::{Action, HostTable, Retire},
    minutes::{Closed, Minutes},
    model::{HostReport, HostStatus, IntervalReport, Roles, RolesError},
    names,
    orphans::Orphans,
    report::interval_report_with,
    select::Selector,
    state::{Saved, StateFile},
    MackerelConfig,
};

/// Handle on the Mackerel task. Dropping it stops the task without flushing; call
/// [`Self::shutdown`] to flush first.
#[derive(Debug)]
pub struct MackerelReporter {
    tx: mpsc::UnboundedSender<Command>,
    /// Values waiting for the API, as of the worker's latest round.
    queued: Arc<AtomicUsize>,
    /// Values the buffer's bounds dropped since start.
    lost: Arc<AtomicU64>,
    /// The shutdown deadline, seen by a call under way too, so it cannot outlast the bound.
    deadline: watch::Sender<Option<Instant>>,
    task: tokio::task::JoinHandle<()>,
    /// Scrapes the workloads' own metrics (`--app-metrics`); its values come back as
    /// [`Command::App`].
    scraper: Option<Scraper>,
}

/// What was left undone when the reporter stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownSummary {
    /// Values not delivered.
    pub unsent: usize,
    /// Live tasks whose host was never registered.
    pub unregistered: usize,
}

#[derive(Debug)]
enum Command {
    Report(IntervalReport),
    /// One workload's own metrics of one period.
    App(Scraped),
    Shutdown {
        deadline: Instant,
        done: oneshot::Sender<ShutdownSummary>,
    },
}

impl MackerelReporter {
    /// Starts the task on the current tokio runtime.
    pub fn start(config: MackerelConfig) -> Result<Self, ClientError> {
        let client = Client::new(
            config.api_key.clone(),
            &config.api_base,
            config.request_timeout,
        )?;
        log::info!(
            "Mackerel output to {}: one host per task or pod{}, values every {}, retired {} after its task is gone",
            client.base(),
            if config.roles.is_empty() {
                String::new()
            } else {
                format!(" in roles {}", config.roles)
            },
            humantime::format_duration(config.period),
            humantime::format_duration(config.retire_after)
        );
        let (tx, rx) = mpsc::unbounded_channel();
        let scraper = match &config.app_metrics {
            Some(app) => {
                let tx = tx.clone();
                let scraper = Scraper::start(
                    app.clone(),
                    config.app_stats.clone(),
                    config.app_plugins.clone(),
                    move |s| {
                        let _ = tx.send(Command::App(s));
                    },
                )
                .map_err(|e| ClientError::AppMetrics(e.to_string()))?;
                Some(scraper)
            }
            None => None,
        };
        let (deadline, deadline_rx) = watch::channel(None);
        let mut worker = Worker::new(client, config, rx, deadline_rx);
        worker.load_state();
        let queued = Arc::clone(&worker.queued);
        let lost = Arc::clone(&worker.lost);
        let task = tokio::spawn(worker.run());
        Ok(Self {
            tx,
            queued,
            lost,
            deadline,
            task,
            scraper,
        })
    }

    /// Values the buffer's bounds dropped since start (for observer's own metrics).
    pub fn lost(&self) -> u64 {
        self.lost.load(Ordering::Relaxed)
    }

    /// Values waiting for the API (for observer's own metrics).
    pub fn queue_depth(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// Hands over one interval: every live task or pod. Returns at once.
    pub fn report(&self, report: IntervalReport) {
        if let Some(scraper) = &self.scraper {
            let mut list = TargetList::default();
            for host in &report.hosts {
                list.targets.extend(host.app.targets.iter().cloned());
                list.refused.extend(host.app.refused.iter().cloned());
            }
            scraper.set_targets(list);
        }
        if self.tx.send(Command::Report(report)).is_err() {
            log::error!("Mackerel: the reporting task has stopped; this interval is not sent");
        }
    }

    /// Flushes what is buffered for at most `timeout`, retires the hosts of tasks already gone,
    /// saves what is left to the state file, then stops. Hosts of running tasks stay: only
    /// observer is stopping.
    /// Returns None if the task had stopped already or did not answer in time.
    pub async fn shutdown(mut self, timeout: Duration) -> Option<ShutdownSummary> {
        // No more scrapes: what is in is flushed with the rest.
        self.scraper.take();
        let deadline = Instant::now() + timeout;
        let (done, summary) = oneshot::channel();
        self.deadline.send_replace(Some(deadline));
        if self.tx.send(Command::Shutdown { deadline, done }).is_err() {
            return None;
        }
        // The task keeps to the deadline itself; the margin is for a task that is stuck.
        match tokio::time::timeout_at((deadline + SHUTDOWN_MARGIN).into(), summary).await {
            Ok(Ok(summary)) => Some(summary),
            _ => {
                self.task.abort();
                log::warn!("Mackerel: the reporting task did not stop in time");
                None
            }
        }
    }
}

/// How long past its deadline [`MackerelReporter::shutdown`] waits for a stuck task.
const SHUTDOWN_MARGIN: Duration = Duration::from_millis(500);

/// The Mackerel output as a [`Sink`]: runs on the sink's thread, hands each interval to the
/// reporter's task and never waits for the API.
pub struct MackerelSink {
    reporter: Option<MackerelReporter>,
    runtime: tokio::runtime::Handle,
    selector: Selector,
    /// The application metrics settings (node address, plugins), when they are on.
    app: Option<crate::appmetrics::AppMetricsConfig>,
}

impl MackerelSink {
    /// Starts the reporter on the current tokio runtime.
    pub fn start(config: MackerelConfig) -> Result<Self, ClientError> {
        let runtime = tokio::runtime::Handle::current();
        let selector = Selector::new(config.selection.clone());
        let app = config.app_metrics.clone();
        Ok(Self {
            app,
            reporter: Some(MackerelReporter::start(config)?),
            runtime,
            selector,
        })
    }
}

impl Sink for MackerelSink {
    fn name(&self) -> &'static str {
        "mackerel"
    }

    fn emit(&mut self, snapshot: &Snapshot) -> Result<(), SinkError> {
        // No platform, no tasks. A stale inventory still reports (its tasks' values are
        // real), marked incomplete so that nothing is retired on it.
        if snapshot.platform.is_some() {
            if let Some(reporter) = &self.reporter {
                reporter.report(interval_report_with(
                    snapshot,
                    &mut self.selector,
                    self.app.as_ref(),
                ));
            }
        }
        Ok(())
    }

    fn backlog(&self) -> Option<u64> {
        self.reporter.as_ref().map(|r| r.queue_depth() as u64)
    }

    fn lost(&self) -> Option<u64> {
        self.reporter.as_ref().map(MackerelReporter::lost)
    }

    fn flush(&mut self, timeout: Duration) -> Result<(), SinkError> {
        let Some(reporter) = self.reporter.take() else {
            return Ok(());
        };
        // Hosts stay: the node is stopping, not its tasks. The reporter may overrun its
        // deadline by a margin; keep that inside ours.
        let timeout = timeout.saturating_sub(SHUTDOWN_MARGIN);
        if let Some(left) = self.runtime.block_on(reporter.shutdown(timeout)) {
            if left.unsent > 0 || left.unregistered > 0 {
                log::warn!("Mackerel: stopped with data not yet sent: {left:?}");
            }
        }
        Ok(())
    }
}

struct Worker {
    client: Client,
    hosts: HostTable,
    buffer: Buffer,
    /// The Mackerel interval being filled.
    minutes: Minutes,
    /// Watches other nodes' hosts when `--mackerel-retire-silent-after` is set.
    orphans: Option<Orphans>,
    state: Option<StateFile>,
    /// Something the state file should keep changed since it was written.
    state_dirty: bool,
    /// Pause of every call after the API was unavailable.
    gate: Backoff,
    /// Retryable failures in a row, to log the first and the recovery only.
    failures: u32,
    graph_defs_due: bool,
    /// Graph definitions of the workloads' own metrics, waiting to be posted (each once).
    app_graph_defs: Vec<GraphDef>,
    config: MackerelConfig,
    /// Hashes of the roles label values already warned about (at most
    /// [`MAX_WARNED_LABELS`]: labels are the workloads' to choose).
    warned_labels: HashSet<u64>,
    rx: mpsc::UnboundedReceiver<Command>,
    /// Set by [`MackerelReporter::shutdown`]; every call gives up when it passes.
    deadline: watch::Receiver<Option<Instant>>,
    stop: Option<(Instant, oneshot::Sender<ShutdownSummary>)>,
    queued: Arc<AtomicUsize>,
    lost: Arc<AtomicU64>,
}

/// Most graph definitions of application metrics waiting for the API.
const MAX_PENDING_APP_GRAPHS: usize = 1000;

/// Hosts per GET /api/v0/tsdb/latest.
const LATEST_HOSTS_PER_CALL: usize = 100;

/// Below this many buffered values the state file is written every interval (it is small);
/// above, once per Mackerel interval.
const SAVE_EVERY_INTERVAL_BELOW: usize = 10_000;

/// Most distinct bad roles labels remembered, so each is warned about once.
const MAX_WARNED_LABELS: usize = 1024;

/// A label value as the warned set keeps it: a hash, whatever the value's length.
fn label_key(label: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::hash::DefaultHasher::new();
    label.hash(&mut hasher);
    hasher.finish()
}

impl Worker {
    fn new(
        client: Client,
        config: MackerelConfig,
        rx: mpsc::UnboundedReceiver<Command>,
        deadline: watch::Receiver<Option<Instant>>,
    ) -> Self {
        Self {
            client,
            hosts: HostTable::new(config.retire_after, config.refused_retry),
            buffer: Buffer::new(config.max_age, config.max_values),
            minutes: Minutes::new(config.period),
            orphans: match (config.retire_silent_after, &config.node) {
                (Some(silent), Some(node)) => {
                    let mut o = Orphans::new(silent, config.period, node.clone());
                    o.set_cluster(config.cluster.clone());
                    Some(o)
                }
                _ => None,
            },
            state: None,
            state_dirty: false,
            gate: Backoff::new(config.backoff_initial, config.backoff_max),
            failures: 0,
            graph_defs_due: config.custom_series,
            app_graph_defs: Vec::new(),
            config,
            warned_labels: HashSet::new(),
            rx,
            deadline,
            stop: None,
            queued: Arc::new(AtomicUsize::new(0)),
            lost: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Takes up what an earlier run left in the state directory. Any failure is a warning:
    /// the output works without its state, it only cannot carry it across a restart.
    fn load_state(&mut self) {
        let Some(dir) = self.config.state_dir.clone() else {
            return;
        };
        let file = match StateFile::open(&dir) {
            Ok(f) => f,
            Err(e) => {
                log::warn!("{e}; Mackerel hosts and unsent values will not survive a restart");
                return;
            }
        };
        match file.load() {
            Ok(None) => {}
            Err(e) => log::warn!("{e}"),
            Ok(Some(saved)) if saved.api_base != self.client.base() => log::warn!(
                "Mackerel state {} belongs to {}, not {}: not used (and replaced)",
                file.path().display(),
                saved.api_base,
                self.client.base()
            ),
            Ok(Some(saved)) => {
                let (hosts, values) = (
                    saved.hosts.len(),
                    saved.buffer.iter().map(|c| c.values.len()).sum::<usize>(),
                );
                self.hosts.restore(Instant::now(), saved.hosts);
                self.buffer.restore(saved.buffer);
                if let Some(open) = saved.open {
                    if let Some(closed) = self.minutes.restore(open) {
                        self.push_closed(closed);
                    }
                }
                log::info!(
                    "Mackerel: took up {hosts} hosts and {values} unsent values from {}",
                    file.path().display()
                );
            }
        }
        self.state = Some(file);
    }

    /// Writes the state file if something changed (`force`: whatever the buffer's size).
    fn save_state(&mut self, force: bool) {
        let Some(file) = &self.state else { return };
        if !self.state_dirty || (!force && self.buffer.len() >= SAVE_EVERY_INTERVAL_BELOW) {
            return;
        }
        let saved = Saved {
            hosts: self.hosts.save(),
            open: self.minutes.open().cloned(),
            buffer: self.buffer.save(),
            ..Saved::new(self.client.base())
        };
        match file.store(&saved) {
            Ok(()) => self.state_dirty = false,
            Err(e) => log::warn!("{e}; trying again next interval"),
        }
    }

    /// A finished Mackerel interval goes to the buffer.
    fn push_closed(&mut self, closed: Closed) {
        for (key, containers) in closed.hosts {
            let values = containers
                .iter()
                .flat_map(|c| names::container_values(c, self.config.custom_series));
            self.buffer.push(&key, closed.time, values);
        }
        self.lost
            .store(self.buffer.dropped_total(), Ordering::Relaxed);
    }

    /// Values of this host wait: in the buffer or in the interval being filled.
    fn has_values(&self, key: &str) -> bool {
        self.buffer.has_values_for(key) || self.minutes.has(key)
    }

    async fn run(mut self) {
        while self.stop.is_none() {
            let wake = self.wake_at(Instant::now());
            tokio::select! {
                command = self.rx.recv() => match command {
                    Some(command) => self.handle(command),
                    // The reporter was dropped without shutdown.
                    None => return,
                },
                _ = sleep_until(wake) => {}
            }
            self.drain();
            if self.stop.is_none() {
                let _ = self.round(Retire::AfterGrace).await;
            }
            self.queued.store(self.buffer.len(), Ordering::Relaxed);
        }
        if let Some((deadline, done)) = self.stop.take() {
            let summary = self.flush(deadline).await;
            let _ = done.send(summary);
        }
    }

    /// When to start the next round without a new report: now if there is work the API may
    /// take, else when a pause ends.
    fn wake_at(&self, now: Instant) -> Option<Instant> {
        if !self.gate.ready(now) {
            return self.gate.until();
        }
        if self.has_work(now) {
            return Some(now);
        }
        self.hosts.next_retry(now)
    }

    fn has_work(&self, now: Instant) -> bool {
        self.sendable()
            || self.graph_defs_due
            || !self.app_graph_defs.is_empty()
            || !self
                .hosts
                .actions(now, Retire::AfterGrace, |k| self.has_values(k))
                .is_empty()
    }

    fn sendable(&self) -> bool {
        self.buffer
            .next_batch(1, |k| self.hosts.host_id(k).map(str::to_owned))
            .is_some()
    }

    fn handle(&mut self, command: Command) {
        match command {
            Command::Report(report) => self.ingest(report),
            Command::App(scraped) => self.ingest_app(scraped),
            Command::Shutdown { deadline, done } => self.stop = Some((deadline, done)),
        }
    }

    /// Takes the reports that arrived during a call, so a long catch-up does not delay them.
    fn drain(&mut self) {
        while let Ok(command) = self.rx.try_recv() {
            self.handle(command);
        }
    }

    fn ingest(&mut self, report: IntervalReport) {
        let closed = self.minutes.add(&report);
        let period_ended = !closed.is_empty();
        for closed in closed {
            self.push_closed(closed);
        }
        let mut live = Vec::with_capacity(report.hosts.len());
        for host in report.hosts {
            let roles = self.roles_of(&host);
            let mut meta = host.meta;
            meta.set_origin(self.config.node.as_deref(), self.config.cluster.as_deref());
            if let Some(orphans) = &mut self.orphans {
                orphans.set_cluster(meta.cluster().map(str::to_owned));
            }
            live.push(HostParam {
                name: host.identity.name,
                display_name: host.display_name,
                memo: host.memo,
                custom_identifier: host.identity.custom_identifier,
                meta,
                role_fullnames: roles,
            });
        }
        for key in self.hosts.observe(Instant::now(), live, report.complete) {
            let n = self.buffer.forget_host(&key);
            self.minutes.forget(&key);
            if n > 0 {
                log::warn!("Mackerel: {key} ended before it had a host; dropped its {n} values");
            }
        }
        self.state_dirty = true;
        self.save_state(period_ended);
    }

    /// One workload's own metrics go into the buffer with its host's other values; a host
    /// gone meanwhile takes none.
    fn ingest_app(&mut self, scraped: Scraped) {
        if self.hosts.name(&scraped.host_key).is_none() {
            return;
        }
        for def in scraped.graph_defs {
            if self.app_graph_defs.len() < MAX_PENDING_APP_GRAPHS {
                self.app_graph_defs.push(def);
            }
        }
        if !scraped.values.is_empty() {
            self.buffer
                .push(&scraped.host_key, scraped.time, scraped.values);
            self.lost
                .store(self.buffer.dropped_total(), Ordering::Relaxed);
            self.state_dirty = true;
        }
    }

    /// `MACKEREL_ROLES` plus the good entries of the task's own label.
    fn roles_of(&mut self, host: &HostReport) -> Vec<String> {
        let Some(label) = &host.roles_label else {
            return self.config.roles.as_slice().to_vec();
        };
        let (own, bad) = Roles::parse_lenient(label);
        if !bad.is_empty() {
            if self.warned_labels.len() >= MAX_WARNED_LABELS {
                // Forgetting costs a repeated warning, never memory.
                self.warned_labels.clear();
            }
            if self.warned_labels.insert(label_key(label)) {
                log::warn!(
                    "Mackerel: mackerel.io/roles of {:?}: ignoring {}",
                    host.identity.name,
                    RolesError(bad)
                );
            }
        }
        self.config.roles.merged(&own).as_slice().to_vec()
    }

    /// One pass over everything due. Breaks off when the API is unavailable or a shutdown
    /// arrives.
    async fn round(&mut self, retire: Retire) -> ControlFlow<()> {
        if !self.gate.ready(Instant::now()) {
            return ControlFlow::Break(());
        }
        self.send_values().await?;
        let actions = self
            .hosts
            .actions(Instant::now(), Retire::No, |k| self.has_values(k));
        for action in actions {
            self.execute(action).await?;
        }
        self.send_values().await?;
        if self.graph_defs_due {
            self.post_graph_defs().await?;
        }
        if !self.app_graph_defs.is_empty() {
            self.post_app_graph_defs().await?;
        }
        if retire != Retire::No {
            let actions = self
                .hosts
                .actions(Instant::now(), retire, |k| self.has_values(k));
            for action in actions {
                if matches!(action, Action::Retire { .. }) {
                    self.execute(action).await?;
                }
            }
        }
        if retire == Retire::AfterGrace {
            self.retire_orphans().await?;
        }
        ControlFlow::Continue(())
    }

    /// Retires the hosts of other nodes of the cluster that went silent, when a check is due.
    async fn retire_orphans(&mut self) -> ControlFlow<()> {
        if !self.orphans.as_ref().is_some_and(|o| o.due(Instant::now())) {
            return ControlFlow::Continue(());
        }
        let mut listed = Vec::new();
        for role in self.config.roles.as_slice().to_vec() {
            let Some((service, role)) = role.split_once(':') else {
                continue;
            };
            match self.bounded(self.client.hosts_in_role(service, role)).await {
                Ok(hosts) => listed.extend(hosts),
                Err(e) if e.is_retryable() => return self.unavailable(&e),
                Err(e) => {
                    log::warn!("Mackerel: {e} -- hosts of silent nodes not looked for this time");
                    self.orphans_listed(Vec::new());
                    return self.between_calls();
                }
            }
            self.between_calls()?;
        }
        let super::orphans::Listed { ids, probes, own } = self.orphans_listed(listed);
        // Hosts of this node a lost state file forgot: known again, retired after the grace
        // period if no task of theirs runs.
        self.hosts.restore(Instant::now(), own);
        // The API takes a bounded number of hosts per query.
        for ids in ids.chunks(LATEST_HOSTS_PER_CALL) {
            match self.bounded(self.client.latest(ids, &probes)).await {
                Ok(values) => {
                    if let Some(o) = &mut self.orphans {
                        o.latest(Instant::now(), &values);
                    }
                }
                Err(e) if e.is_retryable() => return self.unavailable(&e),
                Err(e) => {
                    log::warn!("Mackerel: {e} -- silent nodes not judged this time");
                    return self.between_calls();
                }
            }
            self.between_calls()?;
        }
        let due = self
            .orphans
            .as_ref()
            .map(|o| o.to_retire(Instant::now()))
            .unwrap_or_default();
        for orphan in due {
            let silent = self.config.retire_silent_after.unwrap_or_default();
            match self.bounded(self.client.retire_host(&orphan.host_id)).await {
                Ok(()) => {
                    self.available();
                    log::info!(
                        "Mackerel: retired host {} ({}) of node {}: no new value from that node for {}",
                        orphan.host_id,
                        orphan.name,
                        orphan.node,
                        humantime::format_duration(silent)
                    );
                }
                // Another observer of the cluster was first.
                Err(ApiError::Rejected { status: 404, .. }) => {}
                Err(e) if e.is_retryable() => return self.unavailable(&e),
                Err(e) => log::warn!(
                    "Mackerel: {e} -- host {} ({}) of silent node {} left in place",
                    orphan.host_id,
                    orphan.name,
                    orphan.node
                ),
            }
            if let Some(o) = &mut self.orphans {
                o.retired(&orphan.host_id);
            }
            self.between_calls()?;
        }
        ControlFlow::Continue(())
    }

    fn orphans_listed(&mut self, listed: Vec<super::client::Host>) -> super::orphans::Listed {
        match &mut self.orphans {
            Some(o) => o.listed(Instant::now(), listed),
            None => super::orphans::Listed::default(),
        }
    }

    /// After a call: take new reports; stop the round if asked to shut down.
    fn between_calls(&mut self) -> ControlFlow<()> {
        self.drain();
        if self.stop.is_some() {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    }

    async fn send_values(&mut self) -> ControlFlow<()> {
        loop {
            let hosts = &self.hosts;
            let batch = self.buffer.next_batch(self.config.batch_size, |k| {
                hosts.host_id(k).map(str::to_owned)
            });
            let Some(batch) = batch else {
                return ControlFlow::Continue(());
            };
            self.post(batch).await?;
            self.between_calls()?;
        }
    }

    async fn post(&mut self, batch: Batch) -> ControlFlow<()> {
        match self.bounded(self.client.post_metrics(&batch.values)).await {
            Err(e) if e.is_retryable() => self.unavailable(&e),
            // A bad key or missing permission (401/403) refuses every host alike: no split.
            Err(ApiError::Rejected { status, .. })
                if batch.hosts() > 1 && status != 401 && status != 403 =>
            {
                // Post each host's values alone, so one host's refusal costs only its values.
                for part in batch.split_by_host() {
                    match self.bounded(self.client.post_metrics(&part.values)).await {
                        Err(e) if e.is_retryable() => return self.unavailable(&e),
                        result => self.posted(&part, result),
                    }
                }
                ControlFlow::Continue(())
            }
            result => {
                self.posted(&batch, result);
                ControlFlow::Continue(())
            }
        }
    }

    /// Forgets a batch the API took, or refused for good (logged with the body).
    fn posted(&mut self, batch: &Batch, result: Result<(), ApiError>) {
        match result {
            Ok(()) => {
                self.available();
                self.buffer.delivered();
            }
            // An answer we cannot read: sending again could store the values twice.
            Err(e @ ApiError::Decode { .. }) => {
                self.available();
                log::warn!(
                    "Mackerel: {e} -- {} values may not have arrived",
                    batch.len()
                );
            }
            Err(e) => {
                let whose = match batch.hosts() {
                    1 => {
                        let key = &batch.keys[0];
                        let name = self.hosts.name(key).unwrap_or(key);
                        format!("host {name} ({})", batch.values[0].host_id)
                    }
                    n => format!("{n} hosts"),
                };
                let (first, last) = (batch.values[0].time, batch.values[batch.len() - 1].time);
                log::error!(
                    "Mackerel: {e} -- dropped {} values of {whose} from {} to {}; not retried",
                    batch.len(),
                    rfc3339(first),
                    rfc3339(last)
                );
            }
        }
        self.buffer.remove(batch);
    }

    async fn execute(&mut self, action: Action) -> ControlFlow<()> {
        match action {
            Action::Register { key, param } => {
                let found = match self.bounded(self.client.find_hosts(&key)).await {
                    Ok(found) => found.into_iter().next(),
                    Err(e) => return self.host_failed(&key, &param.name, e),
                };
                self.available();
                if let Some(host) = found {
                    log::info!(
                        "Mackerel: re-using host {} ({}) for {key}",
                        host.id,
                        param.name
                    );
                    self.hosts.registered(&key, host.id, None);
                    self.state_dirty = true;
                } else {
                    match self.bounded(self.client.create_host(&param)).await {
                        Ok(id) => {
                            self.available();
                            log::info!("Mackerel: created host {id} ({}) for {key}", param.name);
                            self.hosts.registered(&key, id.clone(), Some(param));
                            self.state_dirty = true;
                            if let Some(status) = self.config.host_status_on_start {
                                self.status_on_start(&id, status).await?;
                            }
                        }
                        Err(e) => return self.host_failed(&key, &param.name, e),
                    }
                }
            }
            Action::Update {
                key,
                host_id,
                param,
            } => match self
                .bounded(self.client.update_host(&host_id, &param))
                .await
            {
                Ok(()) => {
                    self.available();
                    log::debug!("Mackerel: updated host {host_id} ({})", param.name);
                    self.hosts.updated(&key, param);
                }
                Err(e) => return self.host_failed(&key, &param.name, e),
            },
            Action::Retire { key, host_id, name } => {
                match self.bounded(self.client.retire_host(&host_id)).await {
                    Ok(()) => {
                        self.available();
                        log::info!(
                            "Mackerel: retired host {host_id} ({name}): its task has been gone for {}",
                            humantime::format_duration(self.config.retire_after)
                        );
                        self.hosts.retired(&key);
                    }
                    Err(ApiError::Rejected { status: 404, .. }) => {
                        log::info!("Mackerel: host {host_id} ({name}) was already gone");
                        self.hosts.retired(&key);
                    }
                    Err(e) => return self.host_failed(&key, &name, e),
                }
                self.buffer.forget_host(&key);
                self.minutes.forget(&key);
                self.state_dirty = true;
            }
        }
        self.between_calls()
    }

    /// `--mackerel-host-status-on-start` on a host just created. Tried once: a failure leaves
    /// the host working (the API's default), said in a warning.
    async fn status_on_start(&mut self, host_id: &str, status: HostStatus) -> ControlFlow<()> {
        match self
            .bounded(self.client.set_host_status(host_id, status))
            .await
        {
            Ok(()) => {
                self.available();
                log::info!("Mackerel: host {host_id} set to {status}");
                ControlFlow::Continue(())
            }
            Err(e) => {
                log::warn!("Mackerel: {e} -- host {host_id} stays working, not {status}");
                if e.is_retryable() {
                    self.unavailable(&e)
                } else {
                    ControlFlow::Continue(())
                }
            }
        }
    }

    /// Runs one call, cut short when the shutdown deadline passes.
    async fn bounded<T>(
        &self,
        call: impl Future<Output = Result<T, ApiError>>,
    ) -> Result<T, ApiError> {
        let mut deadline = self.deadline.clone();
        let passed = async move {
            loop {
                let at = *deadline.borrow_and_update();
                match at {
                    Some(at) => return tokio::time::sleep_until(at.into()).await,
                    // The reporter is gone: nothing will set a deadline.
                    None if deadline.changed().await.is_err() => std::future::pending().await,
                    None => {}
                }
            }
        };
        tokio::select! {
            result = call => result,
            () = passed => Err(ApiError::Retryable {
                call: "stopping",
                reason: "the shutdown time limit was reached".to_string(),
                retry_after: None,
            }),
        }
    }

    /// A call about one host failed: pause everything if the API is unavailable, else wait
    /// before asking about this host again and go on with the others.
    fn host_failed(&mut self, key: &str, name: &str, e: ApiError) -> ControlFlow<()> {
        if e.is_retryable() {
            return self.unavailable(&e);
        }
        log::error!(
            "Mackerel: {e} -- for host {name} ({key}); asking again in {}",
            humantime::format_duration(self.config.refused_retry)
        );
        self.hosts.refused(key, Instant::now());
        self.between_calls()
    }

    async fn post_graph_defs(&mut self) -> ControlFlow<()> {
        match self
            .bounded(self.client.create_graph_defs(&names::graph_defs()))
            .await
        {
            Err(e) if e.is_retryable() => return self.unavailable(&e),
            Err(e) => log::error!("Mackerel: {e} -- custom.observer.* graphs will use defaults"),
            Ok(()) => self.available(),
        }
        self.graph_defs_due = false;
        self.between_calls()
    }

    /// The workloads' own graph definitions, in one call; a refusal drops them (logged).
    async fn post_app_graph_defs(&mut self) -> ControlFlow<()> {
        let defs = std::mem::take(&mut self.app_graph_defs);
        match self.bounded(self.client.create_graph_defs(&defs)).await {
            Err(e) if e.is_retryable() => {
                self.app_graph_defs = defs;
                return self.unavailable(&e);
            }
            Err(e) => log::error!(
                "Mackerel: {e} -- {} graph definitions of application metrics not made; their graphs use defaults",
                defs.len()
            ),
            Ok(()) => self.available(),
        }
        self.between_calls()
    }

    fn unavailable(&mut self, e: &ApiError) -> ControlFlow<()> {
        let retry_after = match e {
            ApiError::Retryable { retry_after, .. } => *retry_after,
            _ => None,
        };
        let wait = self.gate.failed(Instant::now(), retry_after);
        self.failures += 1;
        let how = format!(
            "{e}; next try in {}; {} values buffered",
            humantime::format_duration(wait),
            self.buffer.len()
        );
        if self.failures == 1 {
            log::warn!("Mackerel: {how}");
        } else {
            log::debug!("Mackerel: {how}");
        }
        ControlFlow::Break(())
    }

    fn available(&mut self) {
        if self.failures > 0 {
            log::info!(
                "Mackerel: API available again after {} failed tries; {} values to send",
                self.failures,
                self.buffer.len()
            );
            self.failures = 0;
        }
        self.gate.succeeded();
    }

    /// Sends what it can before `deadline`, registering hosts (their values need an id) and
    /// retiring the hosts of tasks already gone; then saves what is left.
    async fn flush(&mut self, deadline: Instant) -> ShutdownSummary {
        // The period being filled goes now, partial; the state file keeps it open too, so a
        // restarted observer goes on filling it and posts it whole under the same time.
        if let Some(partial) = self.minutes.peek() {
            self.push_closed(partial);
        }
        let flushing = async {
            loop {
                let _ = self.round(Retire::AllGone).await;
                if self.buffer.is_empty() {
                    return;
                }
                // Values are left: wait for what holds them up if it ends in time.
                let now = Instant::now();
                let wake = if !self.gate.ready(now) {
                    self.gate.until()
                } else if self.sendable() {
                    Some(now)
                } else {
                    // Values of hosts waiting after a refusal.
                    self.hosts.next_retry(now)
                };
                match wake {
                    Some(t) if t <= deadline => tokio::time::sleep_until(t.into()).await,
                    _ => return,
                }
            }
        };
        // Calls end at the deadline by themselves; this ends the waits between them.
        let _ = tokio::time::timeout_at(deadline.into(), flushing).await;
        let summary = ShutdownSummary {
            unsent: self.buffer.len(),
            unregistered: self.hosts.unregistered(),
        };
        self.state_dirty = true;
        self.save_state(true);
        if summary.unsent > 0 {
            match &self.state {
                Some(file) => log::warn!(
                    "Mackerel: stopping with {} values not delivered; kept in {} for the next run",
                    summary.unsent,
                    file.path().display()
                ),
                None => log::warn!(
                    "Mackerel: stopping with {} values not delivered (no --state-dir: lost)",
                    summary.unsent
                ),
            }
        } else {
            log::info!("Mackerel: all values delivered; hosts left in place for their tasks");
        }
        summary
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

fn rfc3339(unix: i64) -> String {
    let t = SystemTime::UNIX_EPOCH + Duration::from_secs(unix.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mackerel::{
        model::{ContainerMetrics, HostIdentity, HostMeta},
        ApiKey,
    };

    fn worker(custom_series: bool) -> Worker {
        let key = ApiKey::new("k").unwrap();
        let mut config = MackerelConfig::new(key.clone(), Duration::from_secs(60));
        config.roles = Roles::parse("base:node").unwrap();
        config.custom_series = custom_series;
        // Never called: these tests stop before any request.
        let client = Client::new(key, "http://127.0.0.1:9", Duration::from_secs(1)).unwrap();
        let (_tx, rx) = mpsc::unbounded_channel();
        let (_deadline, deadline_rx) = watch::channel(None);
        Worker::new(client, config, rx, deadline_rx)
    }

    fn host(pod: &str, label: Option<&str>) -> HostReport {
        HostReport {
            identity: HostIdentity::kubernetes(pod, &format!("uid-{pod}")).unwrap(),
            meta: HostMeta::observer(None),
            roles_label: label.map(str::to_string),
            display_name: None,
            memo: None,
            app: Default::default(),
            containers: vec![ContainerMetrics {
                name: "app".into(),
                cpu_percent: Some(1.0),
                ..Default::default()
            }],
        }
    }

    /// A 60 s interval ending at `secs`.
    fn interval(secs: u64, hosts: Vec<HostReport>) -> IntervalReport {
        IntervalReport {
            time: SystemTime::UNIX_EPOCH + Duration::from_secs(secs),
            interval: Duration::from_secs(60),
            complete: true,
            hosts,
        }
    }

    #[test]
    fn a_report_queues_values_and_hosts_with_merged_roles() {
        let mut w = worker(true);
        w.ingest(interval(
            1_767_225_660,
            vec![host("a", Some("web:app,bad")), host("b", None)],
        ));
        // The minute closed with the interval that reached its end.
        // cpu usage, 2 interfaces, 4 custom: the unknown values are left out.
        assert_eq!(w.buffer.len(), 2 * 7);
        assert_eq!(w.buffer.oldest(), Some(1_767_225_600));
        let actions = w
            .hosts
            .actions(Instant::now(), Retire::AfterGrace, |_| false);
        let roles: Vec<_> = actions
            .iter()
            .map(|a| match a {
                Action::Register { param, .. } => param.role_fullnames.clone(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(roles, [vec!["base:node", "web:app"], vec!["base:node"]]);
        assert!(w.warned_labels.contains(&label_key("web:app,bad")));
        assert!(w.has_work(Instant::now()));
    }

    /// Each pod may carry a bad label of its own: what is remembered to warn once stays small.
    #[test]
    fn warned_labels_stay_bounded() {
        let mut w = worker(false);
        for i in 0..3 * MAX_WARNED_LABELS {
            let label = format!("bad-{i}-{}", "x".repeat(1000));
            w.roles_of(&host("a", Some(&label)));
            assert!(w.warned_labels.len() <= MAX_WARNED_LABELS);
        }
    }

    #[test]
    fn without_custom_series_no_graph_defs() {
        let mut w = worker(false);
        assert!(!w.graph_defs_due);
        w.ingest(interval(120, vec![host("a", None)]));
        assert_eq!(w.buffer.len(), 3);
    }

    #[test]
    fn a_pause_holds_off_the_next_round() {
        let mut w = worker(false);
        let now = Instant::now();
        assert_eq!(
            w.wake_at(now),
            None,
            "nothing to do, no pause: wait for a report"
        );
        w.ingest(interval(60, vec![host("a", None)]));
        assert_eq!(w.wake_at(now), Some(now), "a host to register: at once");
        let wait = w.gate.failed(now, Some(Duration::from_secs(7)));
        assert_eq!(w.wake_at(now), Some(now + wait));
    }

    #[test]
    fn application_metrics_join_their_host_values() {
        let mut w = worker(false);
        w.ingest(interval(60, vec![host("a", None)]));
        let key = host("a", None).identity.custom_identifier;
        let before = w.buffer.len();
        let def = GraphDef {
            name: "custom.app.temp".into(),
            display_name: "app temp".into(),
            unit: "float".into(),
            metrics: vec![],
        };
        w.handle(Command::App(Scraped {
            host_key: key.clone(),
            time: 60,
            values: vec![("custom.app.temp.value".into(), 21.5)],
            graph_defs: vec![def.clone()],
        }));
        assert_eq!(w.buffer.len(), before + 1);
        assert_eq!(w.app_graph_defs, [def]);
        assert!(w.has_work(Instant::now()));
        // A host the reports never named (gone meanwhile) takes nothing.
        w.handle(Command::App(Scraped {
            host_key: "unknown".into(),
            time: 60,
            values: vec![("custom.app.temp.value".into(), 1.0)],
            graph_defs: vec![],
        }));
        assert_eq!(w.buffer.len(), before + 1);
    }

    #[test]
    fn times() {
        assert_eq!(rfc3339(1_767_225_600), "2026-01-01T00:00:00Z");
    }
}
