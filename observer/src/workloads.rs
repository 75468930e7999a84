//! The join: cgroup ids -> containers -> ECS tasks, Kubernetes pods or Compose projects, with
//! each container's traffic, CPU and memory, and each workload's sums.
//!
//! A workload's traffic is the sum over the union of its cgroups, each counted once: the
//! containers of an awsvpc task or a pod share one network namespace, but every socket belongs
//! to exactly one cgroup, so nothing is counted twice.

use std::{
    borrow::Cow,
    collections::{BTreeMap, BTreeSet, HashMap},
    time::{Duration, Instant},
};

use observer_common::TrafficValue;

use crate::{
    fastmap::Stamped,
    inventory::{
        host_label_value, Container, Inventory, Limits, Workload, WorkloadKind, DISPLAY_NAME_LABEL,
        HOST_LABEL, MEMO_LABEL, PLUGINS_LABEL, ROLES_LABEL,
    },
    resources::{cpu_percent, CgroupFs, ResourceError},
    snapshot::{ContainerReport, Usage, WorkloadReport},
    usage_files::{Budget, Cgroup, UsageReader},
};

/// Host facts used as the last fallback for limits.
#[derive(Debug, Clone, Copy, Default)]
pub struct Host {
    pub cpus: Option<usize>,
    pub memory: Option<u64>,
}

/// Reads CPU and memory per container and keeps the previous CPU sample of each.
pub struct Joiner {
    usage: UsageReader,
    host: Host,
    /// Per container and workload id listed in this cycle or the last.
    kept: Stamped<Kept>,
    /// Traffic of cgroups that look like containers no inventory lists yet, with the number
    /// of intervals it has waited.
    held: HashMap<u64, (TrafficValue, u32)>,
}

/// What the join keeps of a container or workload between cycles.
#[derive(Debug, Default)]
struct Kept {
    /// The last CPU sample (containers only).
    cpu: Option<(Duration, Instant)>,
    /// cgroup limits with the cycle they are read again in: limits change rarely (docker
    /// update), and every file read costs microseconds per container per interval.
    limits: Option<(CgroupLimits, u64)>,
}

/// Held traffic of a cgroup no workload claims is given up after this many intervals (it
/// stays visible in the per-cgroup output).
const HOLD_INTERVALS: u32 = 5;

#[derive(Debug, Clone, Copy, Default)]
struct CgroupLimits {
    cpu_cores: Option<f64>,
    memory: Option<u64>,
}

/// cgroup limits are read again after this many cycles.
const LIMITS_EVERY: u64 = 10;

/// The cycle a key's limits are read again in after its first read in `cycle`: within
/// [`LIMITS_EVERY`] cycles, at a point fixed by the key, so that keys listed together (all of
/// them, at start) are read again over ten cycles and not all in one, which cost that cycle
/// 2.6 times the others at 1,000 containers.
fn first_reread(key: &str, cycle: u64) -> u64 {
    use std::hash::BuildHasher;
    let phase = foldhash::fast::FixedState::with_seed(0).hash_one(key) % LIMITS_EVERY;
    cycle + 1 + phase
}

impl Joiner {
    /// Usage files are kept open as far as this process's open-file limit allows
    /// ([`Budget::from_limit`]).
    pub fn new(fs: CgroupFs, host: Host) -> Self {
        Self::with_budget(fs, host, Budget::from_limit())
    }

    pub fn with_budget(fs: CgroupFs, host: Host, budget: Budget) -> Self {
        Self {
            usage: UsageReader::new(fs, budget),
            host,
            kept: Stamped::default(),
            held: HashMap::new(),
        }
    }

    /// One report per workload of `inventory` (whose cgroups were attached already).
    /// `paths` names cgroup ids; `traffic` holds this interval's delta per cgroup id.
    ///
    /// `unknown` names cgroups that look like a container or task the inventory does not list
    /// yet (it lags a container's start by up to an interval). Their traffic is held, and
    /// credited to the container in the first interval that lists it, so a container's first
    /// packets are its own; [`Joiner::held`] tells which cgroups are held now.
    pub fn join<'p>(
        &mut self,
        inventory: &Inventory,
        paths: &dyn Fn(u64) -> Option<&'p str>,
        traffic: &HashMap<u64, TrafficValue>,
        unknown: &[u64],
        now: Instant,
    ) -> Vec<WorkloadReport> {
        let traffic = self.with_held(inventory, traffic, unknown);
        let traffic = &traffic;
        let mut reports =
            Vec::with_capacity(inventory.workloads.len() + inventory.standalone.len());
        for workload in &inventory.workloads {
            let limits = self.workload_limits(workload, paths);
            let usages: Vec<Usage> = workload
                .containers
                .iter()
                .map(|c| self.usage(c, limits, paths, now))
                .collect();
            reports.push(report(workload, limits, &usages, traffic));
        }
        for container in &inventory.standalone {
            let alone = Workload::alone(container);
            let usage = self.usage(container, alone.limits, paths, now);
            reports.push(report(&alone, alone.limits, &[usage], traffic));
        }
        // Containers that are gone take their CPU sample and limits with them, workloads
        // their limits.
        self.kept.end_cycle(|_| {});
        self.usage.end_interval();
        reports
    }

    /// cgroups whose traffic is held for a container the inventory does not list yet.
    pub fn held(&self) -> Vec<u64> {
        self.held.keys().copied().collect()
    }

    /// This interval's traffic plus what was held for cgroups the inventory now lists; holds
    /// the traffic of `unknown` cgroups.
    fn with_held<'t>(
        &mut self,
        inventory: &Inventory,
        traffic: &'t HashMap<u64, TrafficValue>,
        unknown: &[u64],
    ) -> Cow<'t, HashMap<u64, TrafficValue>> {
        // The common case: nothing held and nothing new, so no copy of every cgroup's traffic.
        if self.held.is_empty() && unknown.is_empty() {
            return Cow::Borrowed(traffic);
        }
        let attached: BTreeSet<u64> = inventory
            .workloads
            .iter()
            .flat_map(|t| {
                t.cgroup_ids
                    .iter()
                    .chain(t.containers.iter().flat_map(|c| &c.cgroup_ids))
            })
            .chain(inventory.standalone.iter().flat_map(|c| &c.cgroup_ids))
            .copied()
            .collect();
        let mut traffic = traffic.clone();
        self.held.retain(|id, (held, age)| {
            if attached.contains(id) {
                *traffic.entry(*id).or_default() += *held;
                return false;
            }
            *age += 1;
            if *age >= HOLD_INTERVALS {
                log::debug!("cgroup {id}: no workload claimed it in {HOLD_INTERVALS} intervals");
                return false;
            }
            true
        });
        for id in unknown.iter().filter(|id| !attached.contains(id)) {
            if let Some(t) = traffic.remove(id) {
                self.held.entry(*id).or_default().0 += t;
            }
        }
        Cow::Owned(traffic)
    }

    /// The limits of cgroup `key`, from `kept` if they are not due to be read again
    /// (every [`LIMITS_EVERY`] cycles; the first time sooner, [`first_reread`]).
    fn limits(kept: &mut Kept, files: &mut Cgroup<'_>, key: &str, cycle: u64) -> CgroupLimits {
        let due = match kept.limits {
            // Its limit files stay open for the next read (`files` keeps them).
            Some((limits, due)) if cycle < due => return limits,
            Some(_) => cycle + LIMITS_EVERY,
            None => first_reread(key, cycle),
        };
        let limits = CgroupLimits {
            cpu_cores: or_debug(key, files.cpu_limit()),
            memory: or_debug(key, files.memory_limit()),
        };
        kept.limits = Some((limits, due));
        limits
    }

    /// A workload's limits: the platform's, else its own cgroup's. An ECS task's
    /// `/ecs/<task>` cgroup carries the task-level limits that the agent's API leaves out; a
    /// pod's cgroup carries the pod's.
    fn workload_limits<'p>(
        &mut self,
        workload: &Workload,
        paths: &dyn Fn(u64) -> Option<&'p str>,
    ) -> Limits {
        let own = workload.limits;
        if own.cpu_cores.is_some() && own.memory_bytes.is_some() {
            return own;
        }
        let Some(path) = workload
            .cgroup_ids
            .iter()
            .filter_map(|id| paths(*id))
            .min_by_key(|p| p.len())
        else {
            return own;
        };
        let cycle = self.kept.cycle();
        let kept = self.kept.touch(&workload.id);
        let cgroup = Self::limits(kept, &mut self.usage.cgroup(path), &workload.id, cycle);
        Limits {
            cpu_cores: own.cpu_cores.or(cgroup.cpu_cores),
            memory_bytes: own.memory_bytes.or(cgroup.memory),
        }
    }

    fn usage<'p>(
        &mut self,
        container: &Container,
        workload_limits: Limits,
        paths: &dyn Fn(u64) -> Option<&'p str>,
        now: Instant,
    ) -> Usage {
        // One lookup of what is kept of the container and one of its files, for every figure.
        let cycle = self.kept.cycle();
        let kept = self.kept.touch(&container.id);
        // The container's own cgroup is the shortest of its paths (deeper ones are children).
        let Some(path) = container
            .cgroup_ids
            .iter()
            .filter_map(|id| paths(*id))
            .min_by_key(|p| p.len())
        else {
            return Usage::default();
        };
        let name = container.name.as_str();
        let mut files = self.usage.cgroup(path);
        let cpu_percent = or_debug(name, files.cpu_usage()).and_then(|usage| {
            let before = kept.cpu.replace((usage, now));
            before
                .and_then(|(prev, at)| cpu_percent(prev, usage, now.saturating_duration_since(at)))
        });
        let memory_working_set = or_debug(name, files.memory_working_set());
        let cgroup = Self::limits(kept, &mut files, &container.id, cycle);
        Usage {
            cpu_percent,
            cpu_limit_cores: container
                .limits
                .cpu_cores
                .or(cgroup.cpu_cores)
                .or(workload_limits.cpu_cores)
                .or(self.host.cpus.map(|n| n as f64)),
            memory_working_set,
            memory_limit: container
                .limits
                .memory_bytes
                .or(cgroup.memory)
                .or(workload_limits.memory_bytes)
                .or(self.host.memory),
        }
    }
}

/// A metric that cannot be read is left out; why is worth a debug line only.
fn or_debug<T>(container: &str, read: Result<Option<T>, ResourceError>) -> Option<T> {
    read.unwrap_or_else(|e| {
        log::debug!("{container}: {e}");
        None
    })
}

impl Workload {
    /// A container that belongs to no workload, as a workload of one.
    fn alone(container: &Container) -> Self {
        Self {
            kind: WorkloadKind::Container,
            id: container.id.clone(),
            name: container.name.clone(),
            namespace: None,
            labels: container.labels.clone(),
            owner: None,
            controller: None,
            status: None,
            network_mode: container.network_mode.clone(),
            limits: container.limits,
            containers: vec![container.clone()],
            cgroup_ids: Vec::new(),
            unlisted_since: None,
        }
    }
}

/// The workload's labels, plus the `mackerel.io/*` labels of its containers (ECS puts task
/// labels on containers): roles, display name, memo and plugins from the first container that
/// has them when the workload itself has none; `mackerel.io/host` from all of them, `"false"`
/// winning over `"true"`, and either over a value that is neither.
fn labels_with_mackerel(workload: &Workload) -> BTreeMap<String, String> {
    let mut labels = workload.labels.clone();
    for key in [ROLES_LABEL, DISPLAY_NAME_LABEL, MEMO_LABEL, PLUGINS_LABEL] {
        if !labels.contains_key(key) {
            if let Some(value) = workload.containers.iter().find_map(|c| c.labels.get(key)) {
                labels.insert(key.to_owned(), value.clone());
            }
        }
    }
    let values = std::iter::once(&workload.labels)
        .chain(workload.containers.iter().map(|c| &c.labels))
        .filter_map(|l| l.get(HOST_LABEL));
    let mut host: Option<&String> = None;
    for value in values {
        let rank = |v: &String| match host_label_value(v) {
            Some(false) => 2,
            Some(true) => 1,
            None => 0,
        };
        if host.is_none_or(|h| rank(value) > rank(h)) {
            host = Some(value);
        }
    }
    if let Some(host) = host {
        labels.insert(HOST_LABEL.to_owned(), host.clone());
    }
    labels
}

fn sum_traffic<'a>(
    ids: impl Iterator<Item = &'a u64>,
    traffic: &HashMap<u64, TrafficValue>,
) -> TrafficValue {
    ids.filter_map(|id| traffic.get(id)).copied().sum()
}

fn add_opt<T: std::ops::Add<Output = T>>(a: Option<T>, b: Option<T>) -> Option<T> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a + b),
        (a, None) => a,
        (None, b) => b,
    }
}

/// A workload's report from its containers' usage (in container order).
pub fn report(
    workload: &Workload,
    limits: Limits,
    usages: &[Usage],
    traffic: &HashMap<u64, TrafficValue>,
) -> WorkloadReport {
    let mut all: BTreeSet<u64> = workload.cgroup_ids.iter().copied().collect();
    let containers: Vec<ContainerReport> = workload
        .containers
        .iter()
        .zip(
            usages
                .iter()
                .copied()
                .chain(std::iter::repeat(Usage::default())),
        )
        .map(|(c, usage)| {
            all.extend(c.cgroup_ids.iter().copied());
            ContainerReport {
                id: c.id.clone(),
                name: c.name.clone(),
                image: c.image.clone(),
                network_mode: c.network_mode.clone(),
                cgroup_ids: c.cgroup_ids.clone(),
                traffic: sum_traffic(c.cgroup_ids.iter(), traffic),
                usage,
                reach: c.reach.clone(),
            }
        })
        .collect();
    let usage = Usage {
        cpu_percent: containers
            .iter()
            .fold(None, |a, c| add_opt(a, c.usage.cpu_percent)),
        cpu_limit_cores: limits.cpu_cores,
        memory_working_set: containers
            .iter()
            .fold(None, |a, c| add_opt(a, c.usage.memory_working_set)),
        memory_limit: limits.memory_bytes,
    };
    WorkloadReport {
        kind: workload.kind,
        id: workload.id.clone(),
        name: workload.name.clone(),
        namespace: workload.namespace.clone(),
        labels: labels_with_mackerel(workload),
        controller: workload
            .controller
            .clone()
            .or_else(|| workload.owner.clone()),
        network_mode: workload.network_mode.clone(),
        traffic: sum_traffic(all.iter(), traffic),
        cgroup_ids: all.into_iter().collect(),
        usage,
        containers,
    }
}

#[cfg(test)]
mod tests {
    use observer_common::Counter;

    use super::*;
    use crate::inventory::{Limits, NetworkMode, Runtime};

    fn container(id: &str, cgroups: &[u64]) -> Container {
        Container {
            id: id.into(),
            name: format!("name-{id}"),
            runtime: Runtime::Docker,
            image: None,
            network_mode: NetworkMode::Container("pause".into()),
            limits: Limits::default(),
            labels: BTreeMap::new(),
            cgroup_ids: cgroups.to_vec(),
            reach: Default::default(),
        }
    }

    fn tx(bytes: u64) -> TrafficValue {
        TrafficValue {
            tx: Counter { bytes, packets: 1 },
            ..Default::default()
        }
    }

    fn task(containers: Vec<Container>, own: &[u64]) -> Workload {
        Workload {
            kind: WorkloadKind::EcsTask,
            id: "8f03e41243824aea923aca126495f665".into(),
            name: "web:12".into(),
            namespace: None,
            labels: BTreeMap::new(),
            owner: None,
            controller: None,
            status: Some("RUNNING".into()),
            network_mode: NetworkMode::Awsvpc,
            limits: Limits {
                cpu_cores: Some(0.5),
                memory_bytes: Some(512 << 20),
            },
            containers,
            cgroup_ids: own.to_vec(),
            unlisted_since: None,
        }
    }

    #[test]
    fn a_task_sums_its_containers_and_its_own_cgroups_once() {
        // Pause container cgroup 10 belongs to the task; app containers 11 and 12; 13 is
        // a child cgroup of container 12.
        let w = task(
            vec![container("a", &[11]), container("b", &[12, 13])],
            &[10],
        );
        let traffic: HashMap<u64, TrafficValue> = [
            (10, tx(100)),
            (11, tx(1000)),
            (12, tx(20)),
            (13, tx(3)),
            (99, tx(7777)),
        ]
        .into();
        let r = report(&w, w.limits, &[], &traffic);
        assert_eq!(
            r.traffic.tx.bytes, 1123,
            "each cgroup once, nothing of other workloads"
        );
        assert_eq!(r.traffic.tx.packets, 4);
        assert_eq!(r.cgroup_ids, vec![10, 11, 12, 13]);
        assert_eq!(r.containers[0].traffic.tx.bytes, 1000);
        assert_eq!(r.containers[1].traffic.tx.bytes, 23);
        assert_eq!(r.kind, WorkloadKind::EcsTask);
    }

    #[test]
    fn a_containers_roles_and_plugins_labels_become_the_tasks() {
        let mut c = container("a", &[11]);
        c.labels.insert(ROLES_LABEL.into(), "shop:web".into());
        c.labels.insert(PLUGINS_LABEL.into(), "gostats".into());
        let w = task(vec![container("b", &[12]), c], &[]);
        let r = report(&w, w.limits, &[], &HashMap::new());
        assert_eq!(
            r.labels.get(ROLES_LABEL).map(String::as_str),
            Some("shop:web")
        );
        assert_eq!(
            r.labels.get(PLUGINS_LABEL).map(String::as_str),
            Some("gostats")
        );
    }

    /// Any container's `mackerel.io/host` counts for its task, and "false" wins.
    #[test]
    fn the_host_label_of_a_task_comes_from_its_containers_and_false_wins() {
        let with = |name: &str, id: u64, host: Option<&str>| {
            let mut c = container(name, &[id]);
            if let Some(v) = host {
                c.labels.insert(HOST_LABEL.into(), v.into());
            }
            c
        };
        for (values, want) in [
            (vec![None, None], None),
            (vec![Some("true"), None], Some("true")),
            (vec![Some("true"), Some("false")], Some("false")),
            (vec![Some("false"), Some("TRUE")], Some("false")),
            (vec![Some("maybe"), Some("true")], Some("true")),
            (vec![Some("maybe"), None], Some("maybe")),
        ] {
            let containers = values
                .iter()
                .enumerate()
                .map(|(i, v)| with(&format!("c{i}"), 11 + i as u64, *v))
                .collect();
            let w = task(containers, &[]);
            let r = report(&w, w.limits, &[], &HashMap::new());
            assert_eq!(
                r.labels.get(HOST_LABEL).map(String::as_str),
                want,
                "{values:?}"
            );
        }
        let mut c = container("a", &[11]);
        c.labels
            .insert(MEMO_LABEL.into(), "on call: web team".into());
        let w = task(vec![c], &[]);
        let r = report(&w, w.limits, &[], &HashMap::new());
        assert_eq!(
            r.labels.get(MEMO_LABEL).map(String::as_str),
            Some("on call: web team")
        );
    }

    #[test]
    fn a_cgroup_listed_twice_is_still_counted_once() {
        let w = task(vec![container("a", &[11]), container("b", &[11])], &[11]);
        let traffic: HashMap<u64, TrafficValue> = [(11, tx(500))].into();
        assert_eq!(report(&w, w.limits, &[], &traffic).traffic.tx.bytes, 500);
    }

    #[test]
    fn usage_sums_what_is_known_and_limits_come_from_the_workload() {
        let w = task(vec![container("a", &[11]), container("b", &[12])], &[]);
        let usages = [
            Usage {
                cpu_percent: Some(12.5),
                memory_working_set: Some(100),
                ..Default::default()
            },
            Usage {
                cpu_percent: None,
                memory_working_set: Some(50),
                ..Default::default()
            },
        ];
        let r = report(&w, w.limits, &usages, &HashMap::new());
        assert_eq!(r.usage.cpu_percent, Some(12.5));
        assert_eq!(r.usage.memory_working_set, Some(150));
        assert_eq!(r.usage.cpu_limit_cores, Some(0.5));
        assert_eq!(r.usage.memory_limit, Some(512 << 20));
        assert_eq!(r.traffic, TrafficValue::default());
    }

    #[test]
    fn traffic_before_a_container_is_listed_is_credited_once_it_is() {
        let mut joiner = Joiner::new(CgroupFs::default(), Host::default());
        let paths = |_: u64| None;
        let now = Instant::now();
        let mut inventory = Inventory::empty("test");
        // Interval 1: cgroup 11 sends 700 bytes, but no inventory lists its container yet.
        let r = joiner.join(&inventory, &paths, &[(11, tx(700))].into(), &[11], now);
        assert!(r.is_empty());
        assert_eq!(joiner.held(), vec![11]);
        // Interval 2: listed; its 50 new bytes come with the 700 held ones.
        inventory
            .workloads
            .push(task(vec![container("a", &[11])], &[]));
        let r = joiner.join(&inventory, &paths, &[(11, tx(50))].into(), &[], now);
        assert_eq!(r[0].traffic.tx.bytes, 750);
        assert_eq!(r[0].containers[0].traffic.tx.bytes, 750);
        assert!(joiner.held().is_empty());
        // Interval 3: only new traffic.
        let r = joiner.join(&inventory, &paths, &[(11, tx(5))].into(), &[], now);
        assert_eq!(r[0].traffic.tx.bytes, 5);
    }

    #[test]
    fn held_traffic_nobody_claims_is_given_up() {
        let mut joiner = Joiner::new(CgroupFs::default(), Host::default());
        let inventory = Inventory::empty("test");
        let now = Instant::now();
        joiner.join(&inventory, &|_| None, &[(9, tx(1))].into(), &[9], now);
        for _ in 0..HOLD_INTERVALS {
            assert_eq!(joiner.held(), vec![9]);
            joiner.join(&inventory, &|_| None, &HashMap::new(), &[], now);
        }
        assert!(joiner.held().is_empty());
    }

    #[test]
    fn a_task_without_platform_limits_gets_its_own_cgroups() {
        let dir = std::env::temp_dir().join(format!("observer-task-limits-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("memory/ecs/t/c")).unwrap();
        std::fs::write(
            dir.join("memory/ecs/t/memory.limit_in_bytes"),
            "536870912\n",
        )
        .unwrap();
        let fs = CgroupFs {
            memory: Some(crate::resources::Hierarchy::at(dir.join("memory"))),
            ..Default::default()
        };
        let mut joiner = Joiner::new(
            fs,
            Host {
                cpus: Some(2),
                memory: Some(8 << 30),
            },
        );
        let mut t = task(vec![container("c", &[6])], &[5]);
        t.limits = Limits::default();
        let mut inventory = Inventory::empty("test");
        inventory.workloads.push(t);
        let paths = |id: u64| Some(if id == 5 { "/ecs/t" } else { "/ecs/t/c" });
        let r = joiner.join(&inventory, &paths, &HashMap::new(), &[], Instant::now());
        assert_eq!(
            r[0].usage.memory_limit,
            Some(512 << 20),
            "the task cgroup's limit"
        );
        assert_eq!(
            r[0].containers[0].usage.memory_limit,
            Some(512 << 20),
            "containers fall back to it"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A task's own cgroup limit is read once, again at its [`first_reread`] and then every
    /// [`LIMITS_EVERY`] cycles, like a container's (it used to be read in every cycle).
    #[test]
    fn a_tasks_cgroup_limits_are_read_again_only_after_some_cycles() {
        let dir = std::env::temp_dir().join(format!("observer-task-reread-{}", std::process::id()));
        let limit_file = dir.join("memory/ecs/t/memory.limit_in_bytes");
        std::fs::create_dir_all(dir.join("memory/ecs/t/c")).unwrap();
        std::fs::write(&limit_file, "536870912\n").unwrap();
        let fs = CgroupFs {
            memory: Some(crate::resources::Hierarchy::at(dir.join("memory"))),
            ..Default::default()
        };
        let mut joiner = Joiner::new(fs, Host::default());
        let mut t = task(vec![container("c", &[6])], &[5]);
        t.limits = Limits::default();
        let mut inventory = Inventory::empty("test");
        inventory.workloads.push(t);
        let paths = |id: u64| Some(if id == 5 { "/ecs/t" } else { "/ecs/t/c" });
        let mut limit = || {
            joiner.join(&inventory, &paths, &HashMap::new(), &[], Instant::now())[0]
                .usage
                .memory_limit
        };
        assert_eq!(limit(), Some(512 << 20));
        std::fs::write(&limit_file, "1073741824\n").unwrap();
        let first = first_reread(&inventory.workloads[0].id, 0);
        let mut seen: Vec<Option<u64>> = (1..=first).map(|_| limit()).collect();
        std::fs::write(&limit_file, "536870912\n").unwrap();
        seen.extend((1..=LIMITS_EVERY).map(|_| limit()));
        std::fs::remove_dir_all(&dir).unwrap();
        let mut want = vec![Some(512 << 20); first as usize - 1];
        want.extend(vec![Some(1 << 30); LIMITS_EVERY as usize]);
        want.push(Some(512 << 20));
        assert_eq!(seen, want, "read again in the wrong cycles");
    }

    /// Containers listed in one cycle have their limits read again spread over the next
    /// [`LIMITS_EVERY`] cycles, none in the cycle of the first read.
    #[test]
    fn limits_of_containers_listed_together_are_read_again_in_different_cycles() {
        let mut per_cycle = [0u32; LIMITS_EVERY as usize + 1];
        for n in 0..1_000u32 {
            // Ids shaped like Docker's: 64 hex digits.
            let id = format!("{:064x}", u128::from(n).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let due = first_reread(&id, 7);
            assert!(
                (8..=7 + LIMITS_EVERY).contains(&due),
                "{id}: due in cycle {due}"
            );
            per_cycle[(due - 7) as usize] += 1;
        }
        assert_eq!(per_cycle[0], 0);
        for (i, n) in per_cycle.iter().enumerate().skip(1) {
            assert!(
                (60..=140).contains(n),
                "{n} of 1,000 read again in cycle +{i}: {per_cycle:?}"
            );
        }
    }

    #[test]
    fn limits_fall_back_from_container_to_cgroup_to_task_to_host() {
        let dir = std::env::temp_dir().join(format!("observer-join-{}", std::process::id()));
        // A v1-style memory hierarchy with a limit on /c2 only.
        std::fs::create_dir_all(dir.join("memory/c1")).unwrap();
        std::fs::create_dir_all(dir.join("memory/c2")).unwrap();
        std::fs::write(dir.join("memory/c2/memory.limit_in_bytes"), "268435456\n").unwrap();
        let fs = CgroupFs {
            memory: Some(crate::resources::Hierarchy::at(dir.join("memory"))),
            ..Default::default()
        };
        let host = Host {
            cpus: Some(2),
            memory: Some(8 << 30),
        };
        let mut joiner = Joiner::new(fs, host);
        let mut c0 = container("c0", &[1]);
        c0.limits.memory_bytes = Some(64 << 20);
        let (c1, c2) = (container("c1", &[1]), container("c2", &[2]));
        let paths = |id: u64| Some(if id == 1 { "/c1" } else { "/c2" });
        let now = Instant::now();
        let mut w = task(vec![], &[]);
        assert_eq!(
            joiner.usage(&c0, w.limits, &paths, now).memory_limit,
            Some(64 << 20),
            "container"
        );
        assert_eq!(
            joiner.usage(&c2, w.limits, &paths, now).memory_limit,
            Some(256 << 20),
            "cgroup"
        );
        assert_eq!(
            joiner.usage(&c1, w.limits, &paths, now).memory_limit,
            Some(512 << 20),
            "task"
        );
        assert_eq!(
            joiner.usage(&c1, w.limits, &paths, now).cpu_limit_cores,
            Some(0.5)
        );
        w.limits = Limits::default();
        let u = joiner.usage(&c1, w.limits, &paths, now);
        assert_eq!(
            (u.memory_limit, u.cpu_limit_cores),
            (Some(8 << 30), Some(2.0)),
            "host"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
