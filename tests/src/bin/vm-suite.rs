//! The suite `cargo xtask vm-test` runs inside each kernel's VM (pure cgroup v2 at
//! /sys/fs/cgroup, bpffs at /sys/fs/bpf): real processes, real packets, exact counts, with the
//! host tests' helpers (tests/src). It prints one line per check on stdout,
//!
//!   vm-check {"check":"<name>","pass":true|false,"detail":"..."}
//!
//! which the host reads from the serial console. `observer` and `trafficgen` are taken from the
//! directory of this binary. Also the workloads it runs in test cgroups:
//!
//!   vm-suite spin <ms>    burns <ms> of CPU time, then prints "spun <usec of CPU used>"
//!   vm-suite hold <MiB>   allocates and touches <MiB>, prints "held", sleeps until killed
//!   vm-suite [CHECK...]   runs the named checks (all when none is named)

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{ensure, Context as _, Result};
use observer::resources::{stat_value, CgroupFs};
use serde_json::{json, Value};
use testbed::{
    fake_platform::{FakeEcsAgent, FakeKubelet, FakePod, FakeTask},
    traffic::{at, udp, udp_exchange},
    ObserverCmd, Spawned, TestCgroup, Where,
};

const MIB: u64 = 1024 * 1024;
/// How long an observer may take to load and attach under TCG (no KVM here).
const ATTACH: Duration = Duration::from_secs(120);
const LINE: Duration = Duration::from_secs(60);

type Check = fn() -> Result<String>;

const CHECKS: &[(&str, Check)] = &[
    ("traffic_per_cgroup", traffic_per_cgroup),
    ("cpu_of_a_busy_loop", cpu_of_a_busy_loop),
    ("memory_of_an_allocation", memory_of_an_allocation),
    ("ecs_task_systemd_layout", ecs_task_systemd_layout),
    (
        "kubernetes_pod_systemd_layout",
        kubernetes_pod_systemd_layout,
    ),
    (
        "pinned_state_survives_sigkill",
        pinned_state_survives_sigkill,
    ),
];

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("spin") => spin(args.get(1).and_then(|a| a.parse().ok()).unwrap_or(500)),
        Some("hold") => hold(args.get(1).and_then(|a| a.parse().ok()).unwrap_or(64)),
        _ => {
            let mut failed = 0;
            for (name, check) in CHECKS {
                if !args.is_empty() && !args.iter().any(|a| a == name) {
                    continue;
                }
                let outcome = std::panic::catch_unwind(check)
                    .unwrap_or_else(|p| Err(anyhow::anyhow!("panicked: {}", panic_text(&p))));
                let (pass, detail) = match outcome {
                    Ok(detail) => (true, detail),
                    Err(e) => {
                        failed += 1;
                        (false, format!("{e:#}"))
                    }
                };
                println!(
                    "vm-check {}",
                    json!({"check": name, "pass": pass, "detail": detail})
                );
            }
            std::process::exit(i32::from(failed > 0));
        }
    }
}

fn panic_text(payload: &Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

/// A binary beside this one.
fn beside(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    exe.parent().expect("exe dir").join(name)
}

fn observer() -> String {
    beside("observer").to_string_lossy().into_owned()
}

fn root() -> PathBuf {
    testbed::v2_root()
}

/// Starts observer with `args` and waits until its programs are attached.
fn start_observer(args: &[&str], env: &[(&str, &str)]) -> Result<ObserverCmd> {
    let mut cmd = ObserverCmd::start_with_env(&observer(), args, env)?;
    cmd.wait_log("attached", ATTACH)?;
    Ok(cmd)
}

/// Waits for two more interval ends (so the interval holding what was sent is reported), then
/// stops observer with SIGTERM; returns its JSON lines.
fn two_intervals_then_stop(mut cmd: ObserverCmd) -> Result<Vec<Value>> {
    for _ in 0..2 {
        if let Err(e) = cmd.wait_stdout(r#""type":"observer""#, LINE) {
            anyhow::bail!("{e}; observer's log:\n{}", cmd.log_so_far().join("\n"));
        }
    }
    cmd.signal(libc::SIGTERM);
    let done = cmd.finish(LINE)?;
    ensure!(
        done.status.success(),
        "observer: {}\n{}",
        done.status,
        done.log
    );
    Ok(parse(&done.stdout))
}

fn parse(lines: &[String]) -> Vec<Value> {
    lines
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

const FIELDS: [&str; 8] = [
    "tx_bytes",
    "tx_packets",
    "rx_bytes",
    "rx_packets",
    "lo_tx_bytes",
    "lo_tx_packets",
    "lo_rx_bytes",
    "lo_rx_packets",
];

/// The eight traffic counters summed over the lines where `pick` holds.
fn sum(lines: &[Value], pick: impl Fn(&Value) -> bool) -> HashMap<&'static str, u64> {
    FIELDS
        .iter()
        .map(|f| {
            let total = lines
                .iter()
                .filter(|l| pick(l))
                .map(|l| l[*f].as_u64().unwrap_or(0))
                .sum();
            (*f, total)
        })
        .collect()
}

fn of_cgroup(lines: &[Value], id: u64) -> HashMap<&'static str, u64> {
    sum(lines, |l| l["type"] == "cgroup" && l["cgroup_id"] == id)
}

/// Counters that are all zero except those named.
fn expect(nonzero: &[(&'static str, u64)]) -> HashMap<&'static str, u64> {
    let mut all: HashMap<&'static str, u64> = FIELDS.iter().map(|f| (*f, 0)).collect();
    all.extend(nonzero.iter().copied());
    all
}

fn loopback_tx(n: u64, payload: u64) -> HashMap<&'static str, u64> {
    let c = udp(n, payload);
    expect(&[("lo_tx_bytes", c.bytes), ("lo_tx_packets", c.packets)])
}

fn same(
    what: &str,
    got: &HashMap<&'static str, u64>,
    want: &HashMap<&'static str, u64>,
) -> Result<()> {
    let mut keys: Vec<_> = want.keys().collect();
    keys.sort();
    let show = |m: &HashMap<&str, u64>| {
        keys.iter()
            .map(|k| format!("{k}={}", m.get(*k).unwrap_or(&0)))
            .collect::<Vec<_>>()
            .join(" ")
    };
    ensure!(
        got == want,
        "{what}: got {}, want {}",
        show(got),
        show(want)
    );
    Ok(())
}

/// Two senders in two cgroups, one receiver in a third: each cgroup gets exactly its own
/// loopback bytes and packets, nothing on other devices. The pair counting them is the one
/// this kernel's BTF allows: keyed by cgroup serial number where it has bpf_cast_to_kern_ctx
/// (6.3+), by cgroup id before, never a silent fall-back.
fn traffic_per_cgroup() -> Result<String> {
    let (a, b, sink) = (
        TestCgroup::new("vm-a")?,
        TestCgroup::new("vm-b")?,
        TestCgroup::new("vm-sink")?,
    );
    let mut cmd = start_observer(
        &["--platform", "none", "--interval", "1s", "--output", "json"],
        &[],
    )?;
    let want = match observer::cache_key::KernelKey::find() {
        Ok(_) => "attached count_ingress (",
        Err(_) => "attached count_ingress_by_id (",
    };
    let attached = cmd
        .log_so_far()
        .iter()
        .find(|l| l.contains("attached count_"))
        .cloned()
        .unwrap_or_default();
    ensure!(
        attached.contains(want),
        "want {want:?}, observer logged {attached:?}"
    );
    let pair = want.trim_start_matches("attached ").trim_end_matches(" (");
    udp_exchange(at(&a), at(&sink), "127.0.0.1:0", 300, 1000);
    udp_exchange(at(&b), at(&sink), "127.0.0.1:0", 200, 500);
    let lines = two_intervals_then_stop(cmd)?;
    same(
        "sender a",
        &of_cgroup(&lines, a.id()),
        &loopback_tx(300, 1000),
    )?;
    same(
        "sender b",
        &of_cgroup(&lines, b.id()),
        &loopback_tx(200, 500),
    )?;
    let (ra, rb) = (udp(300, 1000), udp(200, 500));
    let rx = observer_common::Counter {
        bytes: ra.bytes + rb.bytes,
        packets: ra.packets + rb.packets,
    };
    same(
        "receiver",
        &of_cgroup(&lines, sink.id()),
        &expect(&[("lo_rx_bytes", rx.bytes), ("lo_rx_packets", rx.packets)]),
    )?;
    Ok(format!(
        "{pair}: a lo_tx {} B, b lo_tx {} B, sink lo_rx {} B",
        udp(300, 1000).bytes,
        udp(200, 500).bytes,
        rx.bytes
    ))
}

fn spawn_self(args: &[&str], cgroup: &TestCgroup) -> Result<Spawned> {
    Spawned::start(
        &std::env::current_exe()?,
        args,
        Where {
            cgroup,
            netns: None,
        },
    )
}

/// A busy loop of known CPU time in one cgroup: its cpu.stat usage_usec covers it, observer's
/// reader agrees with the file, and an idle sibling did not get it.
fn cpu_of_a_busy_loop() -> Result<String> {
    const SPIN_MS: u64 = 300;
    let (busy, idle) = (TestCgroup::new("vm-cpu")?, TestCgroup::new("vm-idle")?);
    let mut spin = spawn_self(&["spin", &SPIN_MS.to_string()], &busy)?;
    let spun: u64 = spin.expect("spun ")?.parse()?;
    spin.wait(LINE)?;
    let file = std::fs::read_to_string(busy.path().join("cpu.stat"))?;
    let usage_usec = stat_value(&file, "usage_usec").context("no usage_usec in cpu.stat")?;
    ensure!(
        spun >= SPIN_MS * 1000 && usage_usec >= spun,
        "cpu.stat usage_usec {usage_usec} < the {spun} us the loop burnt"
    );
    let fs = CgroupFs::detect(&root())?;
    let read = fs
        .cpu_usage(busy.rel())?
        .context("observer read no CPU usage")?;
    ensure!(
        read.as_micros() as u64 >= spun,
        "observer read {read:?} < the {spun} us the loop burnt"
    );
    let idle_usage = fs.cpu_usage(idle.rel())?.unwrap_or_default();
    ensure!(
        idle_usage < Duration::from_micros(spun),
        "the idle cgroup shows {idle_usage:?}"
    );
    Ok(format!(
        "loop {spun} us, cpu.stat {usage_usec} us, observer {} us, idle {} us",
        read.as_micros(),
        idle_usage.as_micros()
    ))
}

/// A process holding a known, touched allocation: memory.current, memory.stat anon and
/// observer's working set cover it.
fn memory_of_an_allocation() -> Result<String> {
    const HOLD_MIB: u64 = 64;
    let cgroup = TestCgroup::new("vm-mem")?;
    let mut hold = spawn_self(&["hold", &HOLD_MIB.to_string()], &cgroup)?;
    hold.expect("held")?;
    let want = HOLD_MIB * MIB;
    let current: u64 = std::fs::read_to_string(cgroup.path().join("memory.current"))?
        .trim()
        .parse()?;
    let stat = std::fs::read_to_string(cgroup.path().join("memory.stat"))?;
    let anon = stat_value(&stat, "anon").context("no anon in memory.stat")?;
    let fs = CgroupFs::detect(&root())?;
    let working_set = fs
        .memory_working_set(cgroup.rel())?
        .context("observer read no working set")?;
    ensure!(anon >= want, "memory.stat anon {anon} < {want}");
    ensure!(current >= anon, "memory.current {current} < anon {anon}");
    ensure!(
        working_set >= want && working_set <= current,
        "observer's working set {working_set} not in [{want}, memory.current {current}]"
    );
    Ok(format!(
        "held {want} B: anon {anon}, memory.current {current}, working set {working_set}"
    ))
}

/// The task lines (of every interval) for workload `id`.
fn task_lines(lines: &[Value], id: &str) -> Vec<Value> {
    lines
        .iter()
        .filter(|l| l["type"] == "task" && l["id"] == id)
        .cloned()
        .collect()
}

/// A workload's traffic and largest working set over the run, checked against what its one
/// container cgroup sent and holds.
fn check_workload(
    lines: &[Value],
    id: &str,
    leaf: &TestCgroup,
    sent: (u64, u64),
) -> Result<String> {
    let tasks = task_lines(lines, id);
    ensure!(!tasks.is_empty(), "no task line for {id}; lines: {lines:?}");
    ensure!(
        tasks.iter().all(|t| t["cgroup_ids"]
            .as_array()
            .is_some_and(|ids| ids.iter().any(|i| i == leaf.id()))),
        "the task's cgroup_ids do not name {} ({}): {:?}",
        leaf.rel(),
        leaf.id(),
        tasks.last()
    );
    same(
        "the workload",
        &sum(&tasks, |_| true),
        &loopback_tx(sent.0, sent.1),
    )?;
    let working_set = tasks
        .iter()
        .filter_map(|t| t["memory_working_set_bytes"].as_u64())
        .max()
        .context("no memory_working_set_bytes")?;
    ensure!(
        working_set >= HELD_MIB * MIB,
        "working set {working_set} < the {HELD_MIB} MiB held"
    );
    Ok(format!(
        "{} lo_tx {} B exact, working set {working_set} B",
        leaf.rel(),
        udp(sent.0, sent.1).bytes
    ))
}

/// What the layout checks' container holds.
const HELD_MIB: u64 = 32;

/// Runs a workload in `leaf` (an allocation and a UDP sender to a sink elsewhere) while observer
/// runs with `args`; returns its JSON lines.
fn run_workload(leaf: &TestCgroup, args: &[&str], sent: (u64, u64)) -> Result<Vec<Value>> {
    let sink = TestCgroup::new("vm-layout-sink")?;
    let mut hold = spawn_self(&["hold", &HELD_MIB.to_string()], leaf)?;
    hold.expect("held")?;
    let mut cmd = start_observer(args, &[])?;
    // An interval that lists the workload before the traffic.
    cmd.wait_stdout(r#""type":"observer""#, LINE)?;
    udp_exchange(at(leaf), at(&sink), "127.0.0.1:0", sent.0, sent.1);
    let lines = two_intervals_then_stop(cmd)?;
    drop(hold);
    Ok(lines)
}

fn hex_id(seed: u8) -> String {
    (0..32)
        .map(|i| format!("{:02x}", seed.wrapping_add(i)))
        .collect()
}

/// An ECS task under the systemd driver's layout, listed by a fake agent.
fn ecs_task_systemd_layout() -> Result<String> {
    let task_id = "0f5d6c2a4b3e4f7a8b9c0d1e2f3a4b5c";
    let docker_id = hex_id(0x10);
    let leaf = TestCgroup::nested(
        &root(),
        &format!("ecstasks.slice/ecstasks-{task_id}.slice/docker-{docker_id}.scope"),
    )?;
    let rt = tokio::runtime::Runtime::new()?;
    let agent = rt.block_on(FakeEcsAgent::start());
    agent.set_tasks(&[
        FakeTask::running("test-cluster", task_id, "web", "3").container(&docker_id, "app")
    ]);
    let url = agent.url();
    let sent = (150, 700);
    let lines = run_workload(
        &leaf,
        &[
            "--platform",
            "ecs",
            "--ecs-agent-url",
            &url,
            "--interval",
            "1s",
            "--output",
            "json",
        ],
        sent,
    )?;
    check_workload(&lines, task_id, &leaf, sent)
}

/// A burstable pod under the systemd driver's layout with containerd, listed by a fake kubelet.
fn kubernetes_pod_systemd_layout() -> Result<String> {
    let uid = "6b1f2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d";
    let container_id = hex_id(0x40);
    let leaf = TestCgroup::nested(
        &root(),
        &format!(
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{container_id}.scope",
            uid.replace('-', "_")
        ),
    )?;
    let rt = tokio::runtime::Runtime::new()?;
    let kubelet = rt.block_on(FakeKubelet::start());
    kubelet.set_pods(&[FakePod::running(uid, "shop", "web-0")
        .container("app", &format!("containerd://{container_id}"))]);
    let url = kubelet.url();
    let sent = (120, 900);
    let lines = run_workload(
        &leaf,
        &[
            "--platform",
            "kubernetes",
            "--kubelet-url",
            &url,
            "--interval",
            "1s",
            "--output",
            "json",
        ],
        sent,
    )?;
    check_workload(&lines, uid, &leaf, sent)
}

/// Pinned at /sys/fs/bpf: traffic before a SIGKILL, traffic while observer is down, then a
/// restart: the two runs' lines add up to exactly what was sent; `observer detach` then
/// removes the pins.
fn pinned_state_survives_sigkill() -> Result<String> {
    let pin_dir = Path::new("/sys/fs/bpf/observer-vm-suite");
    let pin = pin_dir.to_string_lossy().into_owned();
    let env = [("OBSERVER_BPF_PIN_DIR", pin.as_str())];
    let args = ["--platform", "none", "--interval", "1s", "--output", "json"];
    let (sender, sink) = (TestCgroup::new("vm-pin-tx")?, TestCgroup::new("vm-pin-rx")?);
    let result = (|| -> Result<String> {
        let mut first = start_observer(&args, &env)?;
        udp_exchange(at(&sender), at(&sink), "127.0.0.1:0", 40, 100);
        first.wait_stdout(r#""type":"observer""#, LINE)?;
        first.wait_stdout(r#""type":"observer""#, LINE)?;
        first.signal(libc::SIGKILL);
        let first = first.finish(LINE)?;
        // Sent while no observer runs: the pinned programs still count it.
        udp_exchange(at(&sender), at(&sink), "127.0.0.1:0", 60, 100);
        let second = start_observer(&args, &env)?;
        let second = two_intervals_then_stop(second)?;
        let before = of_cgroup(&parse(&first.stdout), sender.id());
        let after = of_cgroup(&second, sender.id());
        let total: HashMap<_, _> = FIELDS.iter().map(|f| (*f, before[f] + after[f])).collect();
        same("both runs together", &total, &loopback_tx(100, 100))?;
        Ok(format!(
            "lo_tx {} B before the kill + {} B after the restart = {} B sent",
            before["lo_tx_bytes"],
            after["lo_tx_bytes"],
            udp(100, 100).bytes
        ))
    })();
    let detach = std::process::Command::new(observer())
        .args(["detach", "--bpf-pin-dir", &pin])
        .output();
    let detail = result?;
    let detach = detach?;
    ensure!(
        detach.status.success() && !pin_dir.exists(),
        "observer detach: {}",
        String::from_utf8_lossy(&detach.stderr)
    );
    Ok(detail)
}

fn cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn spin(ms: u64) {
    let target = Duration::from_millis(ms);
    let mut x: u64 = 1;
    while cpu_time() < target {
        for _ in 0..10_000 {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
    }
    println!("spun {}", cpu_time().as_micros());
}

fn hold(mib: u64) {
    let mut block = vec![0u8; (mib * MIB) as usize];
    // Touch every page so it is resident, not just reserved.
    for i in (0..block.len()).step_by(4096) {
        block[i] = 1;
    }
    std::hint::black_box(&block);
    println!("held");
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
