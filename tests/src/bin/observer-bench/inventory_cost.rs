//! What one interval of inventory and metrics costs: map read, cgroup walk, attaching cgroups
//! to containers and tasks, CPU and memory of every container from cgroupfs, and the JSON
//! output, over 10 to 5,000 real cgroup directories laid out as ECS tasks of ten containers.
//! Beside it: the same containers' CPU, memory and network through the Docker stats API, for
//! real containers.

use std::{collections::BTreeMap, fs, path::PathBuf, time::Duration};

use anyhow::Context as _;
use observer::{
    cgroupfs::CgroupIndex,
    collect::Collector,
    cycle::Cycle,
    inventory::{
        docker::{DockerClient, DockerSource},
        refresh::{RefreshConfig, Refresher},
        Container, Inventory, InventoryFuture, InventorySource, Limits, NetworkMode, Runtime,
        Workload, WorkloadKind,
    },
    programs::Programs,
    resources::{self, CgroupFs},
    sink::{json::JsonSink, Sink},
    traffic::TrafficReader,
    usage_files,
    workloads::{Host, Joiner},
};
use observer_common::DEFAULT_MAX_ENTRIES;
use testbed::{docker, stats::Summary};

/// Three whole periods of what is done one cycle in ten (the walk; each container's limits
/// are read in one cycle of its ten), so the mean is what a node spends.
const CYCLES: usize = 30;
/// Collections of the real containers, through observer and through Docker's stats API.
const DOCKER_ROUNDS: usize = 10;
const CONTAINERS_PER_TASK: usize = 10;
/// Real containers for the side-by-side with Docker's stats API.
const REAL_CONTAINERS: usize = 10;

/// CPU time of this process (user + system).
fn process_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Peak resident set since the last reset, KiB.
fn peak_rss_kib() -> u64 {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn reset_peak_rss() {
    // "5" resets VmHWM to the current RSS (proc(5), clear_refs).
    let _ = fs::write("/proc/self/clear_refs", "5");
}

/// CPU time of the Docker engine's processes (dockerd, containerd and its shims), which serve
/// both Docker's stats and our container list.
fn docker_daemons_cpu() -> Duration {
    // SAFETY: sysconf cannot fail for _SC_CLK_TCK.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let mut total = 0u64;
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(comm) = fs::read_to_string(entry.path().join("comm")) else {
            continue;
        };
        let comm = comm.trim();
        if !(comm == "dockerd" || comm == "containerd" || comm.starts_with("containerd-shim")) {
            continue;
        }
        let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // Fields after the ")" of comm: state is field 3; utime and stime are 14 and 15.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        let (utime, stime) = (f.get(11), f.get(12));
        if let (Some(u), Some(s)) = (utime, stime) {
            total += u.parse::<u64>().unwrap_or(0) + s.parse::<u64>().unwrap_or(0);
        }
    }
    Duration::from_millis(total * 1000 / ticks)
}

/// ECS-like cgroups (`/ecs/<task>/<container>`) in the v2 hierarchy and in every v1 one that
/// holds CPU or memory; removed on drop.
struct SyntheticTasks {
    dirs: Vec<PathBuf>,
    inventory: Inventory,
}

impl SyntheticTasks {
    fn create(n: usize) -> anyhow::Result<Self> {
        let hierarchies: Vec<PathBuf> = ["unified", "cpu", "cpuacct", "memory"]
            .iter()
            .map(|h| PathBuf::from("/sys/fs/cgroup").join(h))
            .filter(|p| p.is_dir())
            .chain(std::iter::once(testbed::v2_root()))
            // Where cpu and cpuacct are one hierarchy (cpu,cpuacct and two symlinks), once.
            .map(|p| p.canonicalize().unwrap_or(p))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let mut this = Self {
            dirs: Vec::new(),
            inventory: Inventory::empty("bench"),
        };
        // The `ecs` parents too, where the bench made them (removed last: children first).
        for h in &hierarchies {
            let parent = h.join("ecs");
            if !parent.exists() {
                fs::create_dir(&parent).with_context(|| format!("mkdir {}", parent.display()))?;
                this.dirs.push(parent);
            }
        }
        let pid = std::process::id();
        for t in 0..n.div_ceil(CONTAINERS_PER_TASK) {
            let task_id = format!("{:08x}{:024x}", pid, t);
            let mut task = Workload {
                kind: WorkloadKind::EcsTask,
                id: task_id.clone(),
                name: format!("bench:{t}"),
                namespace: Some("bench".into()),
                labels: BTreeMap::new(),
                owner: None,
                controller: None,
                status: Some("RUNNING".into()),
                network_mode: NetworkMode::Bridge,
                limits: Limits::default(),
                containers: Vec::new(),
                cgroup_ids: Vec::new(),
                unlisted_since: None,
            };
            for h in &hierarchies {
                let dir = h.join("ecs").join(&task_id);
                fs::create_dir_all(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
                this.dirs.push(dir);
            }
            for c in 0..CONTAINERS_PER_TASK.min(n - t * CONTAINERS_PER_TASK) {
                let id = format!("{:08x}{:056x}", pid, t * CONTAINERS_PER_TASK + c);
                for h in &hierarchies {
                    let dir = h.join("ecs").join(&task_id).join(&id);
                    fs::create_dir(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
                    this.dirs.push(dir);
                }
                task.containers.push(Container {
                    id,
                    name: format!("app{c}"),
                    runtime: Runtime::Docker,
                    image: Some("bench".into()),
                    network_mode: NetworkMode::Bridge,
                    limits: Limits::default(),
                    labels: BTreeMap::new(),
                    cgroup_ids: Vec::new(),
                    reach: Default::default(),
                });
            }
            this.inventory.workloads.push(task);
        }
        Ok(this)
    }
}

impl Drop for SyntheticTasks {
    fn drop(&mut self) {
        // Children before parents.
        for dir in self.dirs.iter().rev() {
            if let Err(e) = fs::remove_dir(dir) {
                eprintln!("could not remove {}: {e}", dir.display());
            }
        }
    }
}

/// The synthetic tasks as a platform would list them.
struct Fixed(Inventory);

impl InventorySource for Fixed {
    fn name(&self) -> &'static str {
        "bench"
    }
    fn fetch(&mut self) -> InventoryFuture<'_> {
        let inventory = self.0.clone();
        Box::pin(async move { Ok(inventory) })
    }
}

/// The product's own cycle over `source`: maps, the walk and fetch decisions, attach, join,
/// CPU and memory. A 60 s report interval, so a run of back-to-back cycles fetches once, as
/// observer does within one interval.
fn product_cycle(
    programs: &mut Programs,
    source: Box<dyn InventorySource>,
    joiner: Joiner,
) -> anyhow::Result<Cycle> {
    let reader = TrafficReader::new(programs.ebpf_mut())?;
    let collector = Collector::new(reader, CgroupIndex::scan(&testbed::v2_root())?);
    let refresher = Refresher::new(source, RefreshConfig::for_interval(Duration::from_secs(60)));
    Ok(Cycle::new(collector, Some(refresher), joiner, 2))
}

/// One interval as observer runs it, minus the wait, with the JSON output; returns the
/// containers joined.
fn cycle(rt: &tokio::runtime::Runtime, cycle: &mut Cycle) -> anyhow::Result<usize> {
    let snapshot = rt.block_on(cycle.run(Vec::new()))?;
    JsonSink::new(std::io::sink()).emit(&snapshot)?;
    Ok(snapshot.workloads.iter().map(|w| w.containers.len()).sum())
}

/// The joiner as run.rs makes it, with the open-file limit raised as run.rs raises it; with
/// `budget`, that many files kept open instead.
fn joiner(budget: Option<usage_files::Budget>) -> Joiner {
    if let Err(e) = usage_files::raise_open_files_limit() {
        eprintln!("raising the open-files limit: {e}");
    }
    let fs = CgroupFs::detect(std::path::Path::new("/sys/fs/cgroup"))
        .unwrap_or_else(|_| CgroupFs::probe(std::path::Path::new("/sys/fs/cgroup")));
    let proc = std::path::Path::new("/proc");
    let host = Host {
        cpus: resources::host_cpu_count(proc).ok(),
        memory: resources::host_memory_total(proc).ok(),
    };
    match budget {
        Some(budget) => Joiner::with_budget(fs, host, budget),
        None => Joiner::new(fs, host),
    }
}

fn ms(d: &[Duration]) -> Option<Summary> {
    Summary::of(&d.iter().map(|d| d.as_secs_f64() * 1e3).collect::<Vec<_>>())
}

pub fn inventory_cost(counts: &[usize]) -> anyhow::Result<()> {
    println!();
    println!(
        "Inventory + metrics cycle (map read, cgroup walk, attach, CPU and memory from cgroupfs, JSON): \
         CPU time per cycle, ms (median [min..max] and mean of {CYCLES}), and peak RSS"
    );
    println!(
        "{:>10} {:>10} {:>37} {:>14}",
        "cgroups", "containers", "CPU per cycle       mean", "peak RSS"
    );
    let root = testbed::v2_root();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (mut reopened, mut skipped) = (Vec::new(), Vec::new());
    for &n in counts {
        crate::check_interrupted()?;
        let tasks = SyntheticTasks::create(n)?;
        let mut programs = Programs::load_observer(DEFAULT_MAX_ENTRIES)?;
        let mut run = product_cycle(
            &mut programs,
            Box::new(Fixed(tasks.inventory.clone())),
            joiner(None),
        )?;
        // The same cycle with room for the usage files only, so limit files are opened at each
        // read (the design before 2026-12-03): its cycles alternate with the product's, so the
        // machine's drift falls on both alike. Its programs are loaded, not attached. Only
        // where both cycles' files fit this process's open-file limit (up to five each per
        // container): a walk that runs out of descriptors would measure nothing.
        let fits = usage_files::raise_open_files_limit()
            .is_ok_and(|soft| n as u64 * 10 + 2 * usage_files::RESERVED_DESCRIPTORS <= soft);
        let mut other = Programs::load_observer(DEFAULT_MAX_ENTRIES)?;
        let mut reopen = fits
            .then(|| {
                product_cycle(
                    &mut other,
                    Box::new(Fixed(tasks.inventory.clone())),
                    joiner(Some(usage_files::Budget(
                        n * resources::UsageFile::USAGE_PER_CGROUP,
                    ))),
                )
            })
            .transpose()?;
        programs.attach(&root)?;
        let containers = cycle(&rt, &mut run)?;
        anyhow::ensure!(containers == n, "{containers} containers joined, {n} made");
        if let Some(reopen) = &mut reopen {
            cycle(&rt, reopen)?;
        }
        reset_peak_rss();
        let mut cpu = Vec::with_capacity(CYCLES);
        let mut cpu_reopen = Vec::with_capacity(CYCLES);
        for _ in 0..CYCLES {
            crate::check_interrupted()?;
            let before = process_cpu();
            cycle(&rt, &mut run)?;
            cpu.push(process_cpu() - before);
            if let Some(reopen) = &mut reopen {
                let before = process_cpu();
                cycle(&rt, reopen)?;
                cpu_reopen.push(process_cpu() - before);
            }
        }
        // The mean too: the walk is done in one cycle of ten, which the median leaves out and
        // the CPU a node spends does not.
        let mean = |d: &[Duration]| {
            d.iter().map(Duration::as_secs_f64).sum::<f64>() * 1e3 / d.len() as f64
        };
        let fmt = ms(&cpu).map_or("-".into(), |s| {
            format!(
                "{:.2} [{:.2}..{:.2}] {:>8.2}",
                s.median,
                s.min,
                s.max,
                mean(&cpu)
            )
        });
        println!(
            "{:>10} {:>10} {:>37} {:>11} MiB",
            run.collector_mut().index().len(),
            n,
            fmt,
            peak_rss_kib() / 1024
        );
        if reopen.is_some() {
            reopened.push((n, mean(&cpu), mean(&cpu_reopen), ms(&cpu), ms(&cpu_reopen)));
        } else {
            skipped.push(n);
        }
        drop(tasks);
    }
    println!();
    println!(
        "Limit files kept open (observer) against opened at each read, cycles alternating in \
         this run: CPU per cycle, ms, median (mean)"
    );
    println!(
        "{:>10} {:>20} {:>20} {:>14}",
        "containers", "kept", "opened", "mean kept/opened"
    );
    for (n, kept, opened, k, o) in reopened {
        let med = |s: Option<Summary>| s.map_or("-".into(), |s| format!("{:.2}", s.median));
        println!(
            "{:>10} {:>20} {:>20} {:>14.2}",
            n,
            format!("{} ({kept:.2})", med(k)),
            format!("{} ({opened:.2})", med(o)),
            kept / opened
        );
    }
    if !skipped.is_empty() {
        println!(
            "  (not at {skipped:?} containers: two cycles' files do not fit this process's \
             open-file limit)"
        );
    }
    docker_side_by_side()
}

/// The same real containers through observer's cycle (with the Docker platform) and through
/// one-shot Docker stats calls (CPU, memory and network per container).
fn docker_side_by_side() -> anyhow::Result<()> {
    if let Some(why) = docker::unavailable() {
        println!("(Docker stats comparison skipped: {why})");
        return Ok(());
    }
    let mut containers = docker::Containers::new();
    for i in 0..REAL_CONTAINERS {
        containers.start(
            docker::Run::new()
                .name(&format!("obs-bench-{}-{i}", std::process::id()))
                .cmd(&["sleep", "3600"]),
        )?;
    }
    let ids: Vec<String> = containers.ids().to_vec();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let client = DockerClient::new("/var/run/docker.sock", Duration::from_secs(10));
    let root = testbed::v2_root();
    let mut programs = Programs::load_observer(DEFAULT_MAX_ENTRIES)?;
    let reader = TrafficReader::new(programs.ebpf_mut())?;
    let collector = Collector::new(reader, CgroupIndex::scan(&root)?);
    // Fetch every cycle: each collection lists the containers, as Docker stats would need.
    let every_cycle = RefreshConfig {
        interval: Duration::ZERO,
        min_spacing: Duration::ZERO,
        ..RefreshConfig::for_interval(Duration::from_secs(10))
    };
    let refresher = Refresher::new(Box::new(DockerSource::new(client.clone())), every_cycle);
    let mut run = Cycle::new(collector, Some(refresher), joiner(None), 2);
    programs.attach(&root)?;

    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    // Warm both paths once (inspect cache, Docker's stats collector).
    cycle(&rt, &mut run)?;
    for id in &ids {
        rt.block_on(client.get_json::<serde_json::Value>(&format!(
            "/containers/{id}/stats?stream=false&one-shot=true"
        )))?;
    }
    for _ in 0..DOCKER_ROUNDS {
        crate::check_interrupted()?;
        let (own, daemons) = (process_cpu(), docker_daemons_cpu());
        let joined = cycle(&rt, &mut run)?;
        anyhow::ensure!(joined >= REAL_CONTAINERS, "only {joined} containers joined");
        // Saturating: a shim that exits between the two readings takes its CPU with it.
        ours.push((process_cpu() - own) + docker_daemons_cpu().saturating_sub(daemons));

        let (own, daemons) = (process_cpu(), docker_daemons_cpu());
        for id in &ids {
            let stats: serde_json::Value = rt.block_on(client.get_json(&format!(
                "/containers/{id}/stats?stream=false&one-shot=true"
            )))?;
            anyhow::ensure!(
                stats.get("memory_stats").is_some(),
                "no memory_stats for {id}"
            );
        }
        theirs.push((process_cpu() - own) + docker_daemons_cpu().saturating_sub(daemons));
    }
    let (o, t) = (ms(&ours), ms(&theirs));
    println!();
    println!(
        "{REAL_CONTAINERS} real containers, CPU per collection of all of them incl. the Docker engine's \
         processes, ms (median [min..max] of {DOCKER_ROUNDS}; engine CPU has 10 ms resolution)"
    );
    let fmt = |s: Option<Summary>| {
        s.map_or("-".into(), |s| {
            format!("{:.2} [{:.2}..{:.2}]", s.median, s.min, s.max)
        })
    };
    println!(
        "  observer cycle (Docker list + cgroupfs + eBPF map): {}",
        fmt(o)
    );
    println!(
        "  Docker stats API, one-shot, per container:         {}",
        fmt(t)
    );
    if let (Some(o), Some(t)) = (o, t) {
        println!(
            "  Docker stats / observer: {:.1}x",
            t.median / o.median.max(1e-6)
        );
    }
    Ok(())
}
