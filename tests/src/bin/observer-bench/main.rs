//! `cargo xtask bench`: what observer costs, measured side by side in one run.
//!
//! 1. Data plane: 64-byte UDP over loopback, 64-byte UDP over a veth into a namespace, a TCP
//!    stream over loopback, each sent from a process in a cgroup made here, and 64-byte UDP over
//!    the loopback of a real Docker container from processes in its cgroup, in interleaved
//!    rounds with observer's programs attached, with its hash-only pair (the design before the
//!    cache), with an empty program pair attached the same way (the hook's floor), and with
//!    nothing attached. Prints the kernel's own ns per program run
//!    (kernel.bpf_stats_enabled=1 for the run, restored after) and end-to-end rates as ratios to
//!    detached.
//! 2. Reading the counters: user-space time of one read of the map with 10, 1,000 and 5,000
//!    active cgroups (batch lookup, key by key, and a whole collection cycle).
//!
//! 3. Inventory: one inventory + metrics cycle over 10, 100, 1,000 and 5,000 cgroups (CPU time,
//!    peak RSS), and beside it Docker's stats API for the same real containers.
//!
//! Options: --rounds N (default 10), --seconds S per measurement (default 1),
//! --cgroups 10,1000,5000, --containers 10,100,1000,5000, --only dataplane|read|inventory.

mod deploy_cost;
mod inventory_cost;

use std::{
    io::Write as _,
    process::{Command, ExitCode, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::Instant,
};

use anyhow::{bail, Context as _};
use observer::{
    cgroupfs::CgroupIndex,
    collect::Collector,
    programs::{Programs, RunStats},
    traffic::TrafficReader,
};
use observer_common::DEFAULT_MAX_ENTRIES;
use testbed::{
    stats::Summary,
    sysctl::Sysctl,
    traffic::{at, at_in, trafficgen},
    NetNs, Spawned, TestCgroup,
};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

pub(crate) fn check_interrupted() -> anyhow::Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted: cleaning up");
    }
    Ok(())
}

struct Opts {
    rounds: usize,
    seconds: u64,
    cgroups: Vec<usize>,
    dataplane: bool,
    read: bool,
    inventory: bool,
    deploy: bool,
    containers: Vec<usize>,
}

fn parse_opts() -> anyhow::Result<Opts> {
    let mut opts = Opts {
        rounds: 10,
        seconds: 1,
        cgroups: vec![10, 1000, 5000],
        dataplane: true,
        read: true,
        inventory: true,
        deploy: true,
        containers: vec![10, 100, 1000, 5000],
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--rounds" => opts.rounds = value()?.parse()?,
            "--seconds" => opts.seconds = value()?.parse()?,
            "--cgroups" => {
                opts.cgroups = value()?
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<_, _>>()?
            }
            "--containers" => {
                opts.containers = value()?
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<_, _>>()?
            }
            "--only" => {
                let only = value()?;
                opts.dataplane = only == "dataplane";
                opts.read = only == "read";
                opts.inventory = only == "inventory";
                opts.deploy = only == "deploy";
                if !(opts.dataplane || opts.read || opts.inventory || opts.deploy) {
                    bail!("--only takes dataplane, read, inventory or deploy, not {only}");
                }
            }
            "-h" | "--help" => {
                println!("observer-bench [--rounds N] [--seconds S] [--cgroups 10,1000,5000] [--containers 10,100,1000,5000] [--only dataplane|read|inventory|deploy]");
                std::process::exit(0);
            }
            other => bail!("unknown option {other} (see --help)"),
        }
    }
    Ok(opts)
}

fn main() -> ExitCode {
    if !testbed::is_root() {
        eprintln!(
            "observer-bench needs root: it loads eBPF programs and makes cgroups and namespaces"
        );
        return ExitCode::FAILURE;
    }
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    match parse_opts().and_then(|opts| bench(&opts)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("observer-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn bench(opts: &Opts) -> anyhow::Result<()> {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")?;
    println!(
        "observer benchmark: kernel {}, {} CPUs, cgroup v2 at {}",
        kernel.trim(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        testbed::v2_root().display()
    );
    println!(
        "command: cargo xtask bench -- {}",
        std::env::args().skip(1).collect::<Vec<_>>().join(" ")
    );
    if opts.dataplane {
        dataplane(opts)?;
    }
    if opts.read {
        read_cost(opts)?;
    }
    if opts.inventory {
        inventory_cost::inventory_cost(&opts.containers)?;
    }
    if opts.deploy {
        deploy_cost::deploy_cost()?;
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Detached,
    Floor,
    Observer,
    /// observer's hash-only pair (the design before the cache; what arm64 runs).
    Hashed,
    /// The cache keyed by cgroup id (what x86-64 kernels before 6.3 run).
    ById,
}
const MODES: [Mode; 5] = [
    Mode::Detached,
    Mode::Floor,
    Mode::Observer,
    Mode::Hashed,
    Mode::ById,
];
/// The pairs measured, in [`Mode`] order after Detached.
const PAIRS: usize = MODES.len() - 1;

#[derive(Clone, Copy)]
enum Workload {
    UdpLo,
    UdpVeth,
    TcpLo,
    UdpContainer,
}
const WORKLOADS: [Workload; 4] = [
    Workload::UdpLo,
    Workload::UdpVeth,
    Workload::TcpLo,
    Workload::UdpContainer,
];

impl Workload {
    fn label(self) -> &'static str {
        match self {
            Workload::UdpLo => "udp 64B loopback",
            Workload::UdpVeth => "udp 64B veth",
            Workload::TcpLo => "tcp loopback",
            Workload::UdpContainer => "udp 64B container",
        }
    }
}

/// Per workload: end-to-end rates per mode, and ns per run per (mode, direction).
#[derive(Default)]
struct Results {
    rates: [[Vec<f64>; MODES.len()]; 4],
    /// [workload][0 = floor, 1 = observer, 2 = hash alone, 3 = by id][0 = ingress, 1 = egress]
    ns: [[[Vec<f64>; 2]; PAIRS]; 4],
}

struct Bed {
    ns: NetNs,
    tx: TestCgroup,
    rx: TestCgroup,
    /// A real container (Docker, bridge network): both ends run in its cgroup and network
    /// namespace and talk over its loopback. Removed on drop.
    container: Container,
}

struct Container {
    _guard: testbed::docker::Containers,
    cgroup: std::path::PathBuf,
    pid: String,
}

impl Container {
    fn start() -> anyhow::Result<Self> {
        let mut guard = testbed::docker::Containers::new();
        let id = guard
            .start(testbed::docker::Run::new().name(&testbed::unique("bench")))
            .context("starting the container the bench sends from (is dockerd running?)")?;
        let pid = testbed::sh("docker", &["inspect", "--format", "{{.State.Pid}}", &id])?
            .trim()
            .to_owned();
        let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
        let rel = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .context("the container's cgroup v2 line")?;
        Ok(Self {
            _guard: guard,
            cgroup: testbed::v2_root().join(rel.trim().trim_start_matches('/')),
            pid,
        })
    }

    fn spawn(&self, args: &[&str]) -> anyhow::Result<Spawned> {
        let netns = std::fs::File::open(format!("/proc/{}/ns/net", self.pid))?;
        Spawned::start_joining(&trafficgen(), args, &self.cgroup, Some(netns))
    }
}

fn dataplane(opts: &Opts) -> anyhow::Result<()> {
    let root = testbed::v2_root();
    refuse_other_skb_programs(&root)?;
    let stats = Sysctl::set("kernel.bpf_stats_enabled", "1")
        .context("turning on kernel.bpf_stats_enabled")?;
    let mut observer = Programs::load_observer(DEFAULT_MAX_ENTRIES)?;
    let mut floor = Programs::load_floor()?;
    let mut hashed = Programs::load_hashed(DEFAULT_MAX_ENTRIES)?;
    let mut by_id = Programs::load_by_id(DEFAULT_MAX_ENTRIES)?;
    let bed = Bed {
        ns: NetNs::with_veth("bench")?,
        tx: TestCgroup::new("bench-tx")?,
        rx: TestCgroup::new("bench-rx")?,
        container: Container::start()?,
    };
    let mut results = Results::default();
    eprint!(
        "data plane: {} rounds of {} modes x 4 workloads x 2 passes x {} s ",
        opts.rounds,
        MODES.len(),
        opts.seconds
    );
    for round in 0..opts.rounds {
        // Rotate the order of modes so that none always runs first after a quiet spell.
        for k in 0..MODES.len() {
            let m = (round + k) % MODES.len();
            let programs = match MODES[m] {
                Mode::Detached => None,
                Mode::Floor => Some(&mut floor),
                Mode::Observer => Some(&mut observer),
                Mode::Hashed => Some(&mut hashed),
                Mode::ById => Some(&mut by_id),
            };
            if let Some(p) = programs {
                p.attach(&root)?;
            }
            for (w, workload) in WORKLOADS.iter().enumerate() {
                check_interrupted()?;
                // Rates with the kernel's statistics off, as in production (they add two clock
                // reads to every run); ns per run from a second pass with them on.
                stats.write("0")?;
                results.rates[w][m].push(run(*workload, opts.seconds, &bed)?);
                stats.write("1")?;
                let before = run_stats(MODES[m], [&floor, &observer, &hashed, &by_id])?;
                run(*workload, opts.seconds, &bed)?;
                let after = run_stats(MODES[m], [&floor, &observer, &hashed, &by_id])?;
                if let (Some(b), Some(a)) = (before, after) {
                    let slot = MODES[m] as usize - 1;
                    for dir in 0..2 {
                        let runs = a[dir].run_count - b[dir].run_count;
                        let ns = (a[dir].run_time_ns - b[dir].run_time_ns) as f64 / runs as f64;
                        results.ns[w][slot][dir].push(if runs > 0 { ns } else { f64::NAN });
                    }
                }
            }
            observer.detach()?;
            floor.detach()?;
            hashed.detach()?;
            by_id.detach()?;
        }
        eprint!(".");
        let _ = std::io::stderr().flush();
    }
    eprintln!(" done");
    drop(stats);
    print_dataplane(opts, &results, observer.names()[0].0);
    Ok(())
}

/// Stops when cgroup_skb programs are already attached at `root`: every packet would run them
/// too, in front of the measured pair, which then finds the socket's lines warm and looks
/// cheaper than it is (a pinned observer stopped with SIGTERM stays attached, by design).
fn refuse_other_skb_programs(root: &std::path::Path) -> anyhow::Result<()> {
    let shown = testbed::sh("bpftool", &["cgroup", "show", &root.to_string_lossy()])
        .context("listing the programs attached at the cgroup v2 root (bpftool cgroup show)")?;
    let attached: Vec<&str> = shown
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .next()
                .is_some_and(|id| id.parse::<u32>().is_ok())
        })
        .filter(|l| l.contains("ingress") || l.contains("egress"))
        .collect();
    if !attached.is_empty() {
        bail!(
            "cgroup_skb programs are already attached at {}; the data plane would measure them \
             too:\n{}\ndetach them first (a pinned observer: observer detach --bpf-pin-dir \
             /sys/fs/bpf/observer)",
            root.display(),
            attached.join("\n")
        );
    }
    Ok(())
}

/// Run statistics of the pair `mode` attaches: [floor, observer, hash alone, by id].
fn run_stats(mode: Mode, programs: [&Programs; PAIRS]) -> anyhow::Result<Option<Vec<RunStats>>> {
    Ok(match mode {
        Mode::Detached => None,
        _ => Some(programs[mode as usize - 1].run_stats()?),
    })
}

/// One measurement; returns datagrams/s (UDP) or bytes/s (TCP) as the sender saw them.
fn run(workload: Workload, seconds: u64, bed: &Bed) -> anyhow::Result<f64> {
    let gen = trafficgen();
    let secs = seconds.to_string();
    let (mut receiver, flood, payload): (Spawned, &str, Option<&str>) = match workload {
        Workload::UdpLo => (
            Spawned::start(
                &gen,
                &["udp-recv", "127.0.0.1:0", &u64::MAX.to_string(), "300"],
                at(&bed.rx),
            )?,
            "udp-flood",
            Some("64"),
        ),
        Workload::UdpVeth => (
            Spawned::start(
                &gen,
                &[
                    "udp-recv",
                    &format!("{}:0", bed.ns.veth().ns_addr),
                    &u64::MAX.to_string(),
                    "300",
                ],
                at_in(&bed.rx, &bed.ns),
            )?,
            "udp-flood",
            Some("64"),
        ),
        Workload::TcpLo => (
            Spawned::start(&gen, &["tcp-recv", "127.0.0.1:0"], at(&bed.rx))?,
            "tcp-flood",
            None,
        ),
        Workload::UdpContainer => (
            bed.container
                .spawn(&["udp-recv", "127.0.0.1:0", &u64::MAX.to_string(), "300"])?,
            "udp-flood",
            Some("64"),
        ),
    };
    let addr = receiver.expect("ready ")?;
    let mut args = vec![flood, addr.as_str(), secs.as_str()];
    args.extend(payload);
    let mut sender = match workload {
        Workload::UdpContainer => bed.container.spawn(&args)?,
        _ => Spawned::start(&gen, &args, at(&bed.tx))?,
    };
    let sent = sender.expect("sent ")?;
    let (count, elapsed) = sent
        .split_once(' ')
        .with_context(|| format!("unexpected sender report {sent:?}"))?;
    let rate = count.parse::<f64>()? / elapsed.parse::<f64>()?;
    receiver.expect("received ")?;
    sender.wait(std::time::Duration::from_secs(10))?;
    receiver.wait(std::time::Duration::from_secs(10))?;
    Ok(rate)
}

fn fmt(s: Option<Summary>, scale: f64, digits: usize) -> String {
    match s {
        Some(s) => format!(
            "{:.d$} [{:.d$}..{:.d$}]",
            s.median / scale,
            s.min / scale,
            s.max / scale,
            d = digits
        ),
        None => "-".into(),
    }
}

fn print_dataplane(opts: &Opts, r: &Results, observer_pair: &str) {
    println!();
    println!(
        "Kernel cost per program run, ns, and its ratio to the empty program's (median [min..max] of {} rounds; kernel.bpf_stats_enabled)",
        opts.rounds
    );
    println!(
        "{:<18} {:<9} {:>18} {:>18} {:>18} {:>20} {:>20} {:>20} {:>20}",
        "workload",
        "program",
        "observer / empty",
        "by id / empty",
        "hash alone / empty",
        "observer",
        "by id",
        "hash alone",
        "empty (floor)"
    );
    for (w, workload) in WORKLOADS.iter().enumerate() {
        // A datagram (or segment) passes both programs: its cost is their sum.
        let both = |slot: usize| -> Vec<f64> {
            r.ns[w][slot][0]
                .iter()
                .zip(&r.ns[w][slot][1])
                .map(|(i, e)| i + e)
                .collect()
        };
        let slots = [0, 1, 3, 2];
        let rows = [
            ("ingress", slots.map(|slot| r.ns[w][slot][0].clone())),
            ("egress", slots.map(|slot| r.ns[w][slot][1].clone())),
            ("both", slots.map(both)),
        ];
        for (name, [floor, obs, by_id, hashed]) in rows {
            // Each pair measured in the same round as the floor, so drift between rounds cancels.
            let ratio =
                |x: &[f64]| -> Vec<f64> { x.iter().zip(&floor).map(|(o, f)| o / f).collect() };
            println!(
                "{:<18} {:<9} {:>18} {:>18} {:>18} {:>20} {:>20} {:>20} {:>20}",
                workload.label(),
                name,
                fmt(Summary::of(&ratio(&obs)), 1.0, 2),
                fmt(Summary::of(&ratio(&by_id)), 1.0, 2),
                fmt(Summary::of(&ratio(&hashed)), 1.0, 2),
                fmt(Summary::of(&obs), 1.0, 1),
                fmt(Summary::of(&by_id), 1.0, 1),
                fmt(Summary::of(&hashed), 1.0, 1),
                fmt(Summary::of(&floor), 1.0, 1),
            );
        }
    }
    println!(
        "(x / empty: the ratio of each round's pair, median [min..max]; \"both\" is per datagram, \
         ingress + egress; \"observer\": the pair this kernel runs ({}); \"by id\": the cache keyed \
         by cgroup id, what kernels before 6.3 run; \"hash alone\": the hash-only pair, the design \
         before the cache)",
        observer_pair
    );
    println!();
    println!(
        "End to end, as the sender saw it, kernel.bpf_stats_enabled=0 (median [min..max] of {} rounds of {} s)",
        opts.rounds, opts.seconds
    );
    println!(
        "{:<18} {:>34} {:>22} {:>22} {:>22} {:>22}",
        "workload",
        "detached",
        "floor / detached",
        "observer / detached",
        "by id / detached",
        "hash alone / detached"
    );
    for (w, workload) in WORKLOADS.iter().enumerate() {
        let (scale, unit) = match workload {
            Workload::TcpLo => (1e9, "GB/s"),
            _ => (1e3, "k datagrams/s"),
        };
        let detached = Summary::of(&r.rates[w][0]);
        let ratio = |m: usize| detached.and_then(|d| Summary::ratio_to(&r.rates[w][m], &d));
        println!(
            "{:<18} {:>34} {:>22} {:>22} {:>22} {:>22}",
            workload.label(),
            format!("{} {unit}", fmt(detached, scale, 1)),
            fmt(ratio(Mode::Floor as usize), 1.0, 3),
            fmt(ratio(Mode::Observer as usize), 1.0, 3),
            fmt(ratio(Mode::ById as usize), 1.0, 3),
            fmt(ratio(Mode::Hashed as usize), 1.0, 3)
        );
    }
}

fn read_cost(opts: &Opts) -> anyhow::Result<()> {
    const READS: usize = 20;
    println!();
    println!(
        "Reading the counters: user-space time of one read, ms (median [min..max] of {READS})"
    );
    println!(
        "{:>8} {:>8} {:>24} {:>24} {:>24} {:>12}",
        "cgroups", "entries", "batch lookup", "key by key", "whole cycle", "map memory"
    );
    let root = testbed::v2_root();
    for &n in &opts.cgroups {
        check_interrupted()?;
        let mut programs = Programs::load_observer(DEFAULT_MAX_ENTRIES.max(n as u32 * 2))?;
        let reader = TrafficReader::new(programs.ebpf_mut())?;
        programs.attach(&root)?;
        let sink = TestCgroup::new("read-sink")?;
        let cgroups = (0..n)
            .map(|i| TestCgroup::new(&format!("read{i}")))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut receiver = Spawned::start(
            &trafficgen(),
            &["udp-recv", "127.0.0.1:0", &n.to_string(), "1000"],
            at(&sink),
        )?;
        let addr = receiver.expect("ready ")?;
        send_from_each(&addr, &cgroups)?;
        receiver.expect("received ")?;
        drop(receiver);

        let mut collector = Collector::new(reader, CgroupIndex::scan(&root)?);
        collector.collect()?;
        let entries = collector.reader_mut().read()?.entries.len();
        let time = |f: &mut dyn FnMut() -> anyhow::Result<()>| -> anyhow::Result<Option<Summary>> {
            let mut ms = Vec::with_capacity(READS);
            for _ in 0..READS {
                let start = Instant::now();
                f()?;
                ms.push(start.elapsed().as_secs_f64() * 1e3);
            }
            Ok(Summary::of(&ms))
        };
        let batch = time(&mut || {
            collector.reader_mut().read()?;
            Ok(())
        })?;
        let key_by_key = time(&mut || {
            collector.reader_mut().read_key_by_key()?;
            Ok(())
        })?;
        let cycle = time(&mut || {
            collector.collect()?;
            Ok(())
        })?;
        let memory = collector
            .reader_mut()
            .kernel_memory()
            .map_or("-".into(), |b| {
                format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))
            });
        println!(
            "{:>8} {:>8} {:>24} {:>24} {:>24} {:>12}",
            n,
            entries,
            fmt(batch, 1.0, 3),
            fmt(key_by_key, 1.0, 3),
            fmt(cycle, 1.0, 3),
            memory
        );
    }
    Ok(())
}

/// One datagram from a fresh socket in each cgroup, by one process that joins them in turn.
fn send_from_each(addr: &str, cgroups: &[TestCgroup]) -> anyhow::Result<()> {
    let mut child = Command::new(trafficgen())
        .args(["udp-each", addr, "32"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    {
        let mut stdin = child.stdin.take().expect("piped");
        for c in cgroups {
            writeln!(stdin, "{}", c.path().display())?;
        }
    }
    let out = child.wait_with_output()?;
    anyhow::ensure!(out.status.success(), "udp-each failed: {}", out.status);
    Ok(())
}
