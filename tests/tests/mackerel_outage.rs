//! Outages with real containers and real traffic: the ECS agent failing (the inventory goes
//! stale, or Docker labels stand in when observer has the Docker socket) and the Mackerel API
//! failing across a restart of observer. In each, every Mackerel period of the outage gets its
//! values, nothing is retired, and the bytes Mackerel is told add up to what the tasks sent.
//!
//! The tasks are busybox containers under `/ecs/<task id>`, listed by the strict fake ECS
//! agent; their traffic is ping to docker0's address in bursts of a known count: 84-byte IP
//! packets (ICMP, so nothing is ever resent and the count is exact). Needs root and a running
//! dockerd; says SKIPPED otherwise. Containers, observers and state directories are removed by
//! guards, also when an assertion fails.

use std::{
    net::Ipv4Addr,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{ensure, Context as _};
use serde_json::Value;
use testbed::{
    docker::{self, skip_unless_docker, Containers, EcsLabels, Run},
    ecs_scenario::{task_id, wait_for, within},
    fake_mackerel::{FakeMackerel, Fault, Point, Scope},
    fake_platform::{task_arn, FakeEcsAgent, FakeTask, Mode},
    ObserverCmd,
};

const OBSERVER: &str = env!("CARGO_BIN_EXE_observer-e2e");
const API_KEY: &str = "outage-mackerel-key-7e21c9";
const CLUSTER: &str = "outage";
const FAMILY: &str = "outage-app";
/// An ICMP echo request with ping's default 56-byte payload: IP 20 + ICMP 8 + 56.
const PING_BYTES: u64 = 84;
/// Pings per burst (0.2 s apart: two seconds a burst).
const BURST: u32 = 10;
/// observer's interval.
const INTERVAL: &str = "1s";
/// The Mackerel period: two intervals, so each period gets a report even if a tick is late.
const PERIOD: Duration = Duration::from_secs(2);
const SERIES: &str = ".txBytes.delta";

/// One ECS task of one container.
struct Task {
    arn: String,
    container: String,
}

fn start_task(containers: &mut Containers, label: &str) -> anyhow::Result<Task> {
    let id = task_id();
    let arn = task_arn(CLUSTER, &id);
    let container = containers.start(
        Run::new()
            .name(&testbed::unique(&format!("obs-outage-{label}")))
            .ecs(&EcsLabels {
                task_arn: &arn,
                container_name: "app",
                cluster: CLUSTER,
                family: FAMILY,
                version: "1",
            })
            .cgroup_parent(&format!("/ecs/{id}"))
            .cmd(&["sleep", "3600"]),
    )?;
    Ok(Task { arn, container })
}

fn fake_tasks(tasks: &[&Task]) -> Vec<FakeTask> {
    tasks
        .iter()
        .map(|t| {
            let id = t.arn.rsplit('/').next().unwrap_or_default();
            FakeTask::running(CLUSTER, id, FAMILY, "1").container(&t.container, "app")
        })
        .collect()
}

/// One burst of `BURST` pings from `container`; returns the requests sent (ping's own count).
fn ping_burst(container: &str, to: Ipv4Addr) -> anyhow::Result<u64> {
    let out = Command::new("docker")
        .args(["exec", container, "ping", "-q", "-i", "0.2", "-c"])
        .arg(BURST.to_string())
        .arg(to.to_string())
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .find_map(|l| l.split_once(" packets transmitted")?.0.trim().parse().ok())
        .with_context(|| {
            format!(
                "no ping statistics from {container}: {stdout} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
}

/// Bursts of pings one after another until stopped; [`Pinger::stop`] says how many were sent.
struct Pinger {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<anyhow::Result<u64>>,
}

impl Pinger {
    fn start(container: &str, to: Ipv4Addr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, container) = (Arc::clone(&stop), container.to_owned());
        let thread = std::thread::spawn(move || {
            let mut sent = 0;
            while !flag.load(Ordering::Relaxed) {
                sent += ping_burst(&container, to)?;
            }
            Ok(sent)
        });
        Self { stop, thread }
    }

    /// Lets the burst under way finish; returns the pings sent in all.
    fn stop(self) -> anyhow::Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("the ping thread panicked"))?
    }
}

/// Pings `BURST` x `bursts` from `container` now; returns the count sent.
fn ping_for(container: &str, to: Ipv4Addr, bursts: u32) -> anyhow::Result<u64> {
    (0..bursts).map(|_| ping_burst(container, to)).sum()
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Starts of the whole periods between `from` and `to` (unix seconds).
fn periods_within(from: i64, to: i64) -> Vec<i64> {
    let p = PERIOD.as_secs() as i64;
    let first = (from + p - 1).div_euclid(p) * p;
    (first..)
        .step_by(p as usize)
        .take_while(|s| s + p <= to)
        .collect()
}

fn host_id(mackerel: &FakeMackerel, arn: &str) -> Option<String> {
    mackerel
        .hosts()
        .into_iter()
        .find(|h| h.custom_identifier.as_deref() == Some(arn))
        .map(|h| h.id)
}

/// The period starts of a host's stored points of `metric`.
fn times_of(stored: &[Point], host: &str, metric: &str) -> Vec<i64> {
    stored
        .iter()
        .filter(|p| p.host_id == host && p.name == metric)
        .map(|p| p.time)
        .collect()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn wait_for_hosts(mackerel: &FakeMackerel, tasks: &[&Task]) -> Vec<String> {
    wait_for("a Mackerel host per task", Duration::from_secs(30), || {
        tasks.iter().all(|t| host_id(mackerel, &t.arn).is_some())
    });
    tasks
        .iter()
        .map(|t| host_id(mackerel, &t.arn).expect("waited for"))
        .collect()
}

#[test]
fn a_metadata_outage_loses_no_mackerel_value_and_retires_nothing() -> anyhow::Result<()> {
    const TEST: &str = "a_metadata_outage_loses_no_mackerel_value_and_retires_nothing";
    if skip_unless_docker(TEST) {
        return Ok(());
    }
    metadata_outage(Fallback::None)
}

/// The same outage on a node where observer has the Docker socket (as the ECS deployment
/// mounts it): the tasks come from their containers' labels meanwhile, which must give the
/// same hosts, so nothing is retired or made twice.
#[test]
fn a_metadata_outage_with_docker_labels_standing_in_loses_nothing() -> anyhow::Result<()> {
    const TEST: &str = "a_metadata_outage_with_docker_labels_standing_in_loses_nothing";
    if skip_unless_docker(TEST) {
        return Ok(());
    }
    metadata_outage(Fallback::DockerLabels)
}

/// What stands in for the ECS agent while it is down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fallback {
    /// Nothing: the last good inventory, marked stale.
    None,
    /// The `com.amazonaws.ecs.*` labels of the containers, through the Docker socket.
    DockerLabels,
}

impl Fallback {
    /// What observer logs when the agent goes down, and when it is back.
    fn logs(self) -> (&'static str, &'static str) {
        match self {
            Fallback::None => (
                "keeping the last good inventory (marked stale)",
                "source is back",
            ),
            Fallback::DockerLabels => ("tasks from Docker labels", "full source answers again"),
        }
    }
}

fn metadata_outage(fallback: Fallback) -> anyhow::Result<()> {
    let rt = runtime();
    let mut agent = rt.block_on(FakeEcsAgent::start());
    agent.set_cluster(CLUSTER);
    let mackerel = rt.block_on(FakeMackerel::start(API_KEY));
    let gateway = docker::bridge_address()?;
    let mut containers = Containers::new();
    let tasks = [
        start_task(&mut containers, "a")?,
        start_task(&mut containers, "b")?,
    ];
    let tasks: Vec<&Task> = tasks.iter().collect();
    agent.set_tasks(&fake_tasks(&tasks));

    let (agent_url, mackerel_url) = (agent.url(), mackerel.url());
    let period = format!("{}s", PERIOD.as_secs());
    // Without the Docker socket the agent is the only source: its outage leaves the last
    // good inventory, marked stale.
    let socket = match fallback {
        Fallback::None => "/nonexistent/observer-outage-test.sock",
        Fallback::DockerLabels => observer::defaults::DOCKER_SOCKET,
    };
    let mut observer = ObserverCmd::start_with_env(
        OBSERVER,
        &[
            "--platform",
            "ecs",
            "--ecs-agent-url",
            &agent_url,
            "--docker-socket",
            socket,
            "--interval",
            INTERVAL,
            "--mackerel-interval",
            &period,
            "--mackerel-api-base",
            &mackerel_url,
            // Two intervals: an outage of eight would retire every host if absence counted.
            "--retire-after",
            "2",
        ],
        &[("MACKEREL_APIKEY", API_KEY)],
    )?;
    observer.wait_log("attached", Duration::from_secs(30))?;
    let hosts = wait_for_hosts(&mackerel, &tasks);

    let pingers: Vec<Pinger> = tasks
        .iter()
        .map(|t| Pinger::start(&t.container, gateway))
        .collect();
    std::thread::sleep(Duration::from_secs(4));

    // The agent's port closes for eight intervals.
    rt.block_on(agent.set_mode(Mode::Down));
    let down_at = unix_now();
    let down = Instant::now();
    let (gone_log, back_log) = fallback.logs();
    let gone = observer.wait_log(gone_log, Duration::from_secs(15))?;
    eprintln!("observer: {gone}");
    std::thread::sleep(Duration::from_secs(8).saturating_sub(down.elapsed()));
    rt.block_on(agent.set_mode(Mode::Ok));
    let up_at = unix_now();
    // The refresher retries with backoff (1 s doubling): back within about 16 s.
    let back = observer.wait_log(back_log, Duration::from_secs(60))?;
    eprintln!("observer: {back}");
    std::thread::sleep(Duration::from_secs(2));

    let mut sent = Vec::new();
    for p in pingers {
        sent.push(p.stop()? * PING_BYTES);
    }
    // Two periods with no traffic, then stop: SIGTERM flushes what is left.
    std::thread::sleep(PERIOD * 2 + Duration::from_secs(1));
    observer.signal(libc::SIGTERM);
    let done = observer.finish(Duration::from_secs(30))?;
    ensure!(
        done.status.success(),
        "observer exited with {}:\n{}",
        done.status,
        done.log
    );
    ensure!(
        done.log.contains(gone_log),
        "observer never said {gone_log:?} ({fallback:?}):\n{}",
        done.log
    );
    ensure!(
        done.log.contains("Mackerel: all values delivered"),
        "{}",
        done.log
    );

    // With the Docker socket the labels show every ECS container on this machine, those of
    // tests running alongside too: their hosts come and go with them. Ours must stay, once each.
    let made = mackerel.hosts();
    let ours = |id: &str| hosts.iter().any(|h| h == id);
    let retired: Vec<_> = mackerel
        .retirements()
        .into_iter()
        .filter(|r| fallback == Fallback::None || ours(&r.host_id))
        .collect();
    ensure!(retired.is_empty(), "hosts retired: {retired:?}");
    ensure!(
        made.iter().filter(|h| ours(&h.id)).all(|h| !h.retired),
        "a host is marked retired"
    );
    for task in &tasks {
        let n = made
            .iter()
            .filter(|h| h.custom_identifier.as_deref() == Some(&task.arn))
            .count();
        ensure!(n == 1, "{n} hosts for {}: {made:#?}", task.arn);
    }
    if fallback == Fallback::None {
        ensure!(
            made.len() == tasks.len(),
            "{} hosts for {} tasks: {made:#?}",
            made.len(),
            tasks.len()
        );
    }
    let outage = periods_within(down_at, up_at);
    eprintln!("agent down {down_at}..{up_at}: whole periods {outage:?}");
    ensure!(outage.len() >= 3, "the outage covered only {outage:?}");
    let stored = mackerel.stored();
    for ((task, host), sent) in tasks.iter().zip(&hosts).zip(&sent) {
        let metric = format!("interface.app{SERIES}");
        let times = times_of(&stored, host, &metric);
        let missing: Vec<i64> = outage
            .iter()
            .filter(|s| !times.contains(s))
            .copied()
            .collect();
        ensure!(
            missing.is_empty(),
            "host {host} ({}) has no {metric} for the outage's periods {missing:?}; it has {times:?}",
            task.arn
        );
        let told = mackerel.bytes_told(host, SERIES, PERIOD);
        let error = (told - *sent as f64) / *sent as f64 * 100.0;
        eprintln!(
            "task {}: sent {sent} B, Mackerel told {told:.1} B ({error:+.3} %)",
            task.arn
        );
        // ICMP: nothing resent.
        ensure!(
            within(told, *sent as f64, 0),
            "Mackerel was told {told:.1} B for {}, {sent} B were sent",
            task.arn
        );
    }
    Ok(())
}

/// A state directory the test makes; removed on drop, also when the test fails.
struct StateDir(PathBuf);

impl StateDir {
    fn new() -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(testbed::unique("observer-outage-state"));
        std::fs::create_dir_all(&dir)?;
        Ok(Self(dir))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn a_restart_during_a_mackerel_outage_keeps_the_unsent_values() -> anyhow::Result<()> {
    const TEST: &str = "a_restart_during_a_mackerel_outage_keeps_the_unsent_values";
    if skip_unless_docker(TEST) {
        return Ok(());
    }
    let rt = runtime();
    let agent = rt.block_on(FakeEcsAgent::start());
    agent.set_cluster(CLUSTER);
    let mackerel = rt.block_on(FakeMackerel::start(API_KEY));
    let gateway = docker::bridge_address()?;
    let mut containers = Containers::new();
    let task = start_task(&mut containers, "restart")?;
    agent.set_tasks(&fake_tasks(&[&task]));
    let state = StateDir::new()?;
    let state_file = state.path().join("mackerel.json");

    let (agent_url, mackerel_url) = (agent.url(), mackerel.url());
    let period = format!("{}s", PERIOD.as_secs());
    let args = [
        "--platform",
        "ecs",
        "--ecs-agent-url",
        &agent_url,
        "--interval",
        INTERVAL,
        "--mackerel-interval",
        &period,
        "--mackerel-api-base",
        &mackerel_url,
        // The API is down at the stop: no point waiting long for it.
        "--shutdown-timeout",
        "3s",
    ];
    let state_env = state.path().to_string_lossy().into_owned();
    // Unpinned (ObserverCmd's default): counters start fresh with each run, so the test sends
    // only while an observer is attached, never in the gap between the runs.
    let env = [
        ("MACKEREL_APIKEY", API_KEY),
        ("OBSERVER_STATE_DIR", state_env.as_str()),
    ];

    // Run 1: up, the host made, a period stored, then the API fails.
    let mut first = ObserverCmd::start_with_env(OBSERVER, &args, &env)?;
    first.wait_log("attached", Duration::from_secs(30))?;
    let host = wait_for_hosts(&mackerel, &[&task]).remove(0);
    wait_for(
        "a stored point of the host",
        Duration::from_secs(30),
        || mackerel.stored().iter().any(|p| p.host_id == host),
    );
    // Every series the host had before the outage: each must be there for every period of it.
    let before: std::collections::BTreeSet<String> = mackerel
        .stored()
        .into_iter()
        .filter(|p| p.host_id == host)
        .map(|p| p.name)
        .collect();
    mackerel.fail(Fault::Unavailable, Scope::all());
    let failed_at = unix_now();
    let sent_first = ping_for(&task.container, gateway, 3)? * PING_BYTES;
    std::thread::sleep(PERIOD);
    let stopped_at = unix_now();
    first.signal(libc::SIGTERM);
    let done = first.finish(Duration::from_secs(30))?;
    ensure!(
        done.status.success(),
        "first observer exited with {}:\n{}",
        done.status,
        done.log
    );
    ensure!(
        done.log.contains("kept in"),
        "the first observer did not keep its unsent values:\n{}",
        done.log
    );
    let mode = std::fs::metadata(&state_file)
        .with_context(|| format!("{} after the first run", state_file.display()))?
        .permissions()
        .mode()
        & 0o777;
    ensure!(mode == 0o600, "{} has mode {mode:o}", state_file.display());
    let saved: Value = serde_json::from_slice(&std::fs::read(&state_file)?)?;
    let buffered: usize = saved["buffer"]
        .as_array()
        .map(|chunks| {
            chunks
                .iter()
                .filter_map(|c| c["values"].as_array().map(Vec::len))
                .sum()
        })
        .unwrap_or(0);
    ensure!(buffered > 0, "no values in the state file: {saved}");
    ensure!(
        saved["hosts"]
            .as_array()
            .is_some_and(|hs| hs.iter().any(|h| h["host_id"] == host.as_str())),
        "the host is not in the state file: {saved}"
    );
    eprintln!(
        "first run stopped with {buffered} values in {}",
        state_file.display()
    );

    // Run 2: the same state directory, the API still down a while.
    let mut second = ObserverCmd::start_with_env(OBSERVER, &args, &env)?;
    let took = second.wait_log("took up", Duration::from_secs(30))?;
    eprintln!("second observer: {took}");
    second.wait_log("attached", Duration::from_secs(30))?;
    let sent_second = ping_for(&task.container, gateway, 3)? * PING_BYTES;
    std::thread::sleep(PERIOD);
    mackerel.heal();
    second.wait_log("API available again", Duration::from_secs(90))?;
    std::thread::sleep(PERIOD * 2 + Duration::from_secs(1));
    second.signal(libc::SIGTERM);
    let done = second.finish(Duration::from_secs(30))?;
    ensure!(
        done.status.success(),
        "second observer exited with {}:\n{}",
        done.status,
        done.log
    );
    ensure!(
        done.log.contains("Mackerel: all values delivered"),
        "{}",
        done.log
    );

    let stored = mackerel.stored();
    // The periods wholly inside the first run's outage, up to the one SIGTERM fell in.
    let outage = periods_within(failed_at, stopped_at);
    eprintln!("API down from {failed_at}, first run stopped at {stopped_at}: periods {outage:?}");
    ensure!(
        outage.len() >= 2,
        "the first run's outage covered only {outage:?}"
    );
    let mut missing = Vec::new();
    for metric in &before {
        let times = times_of(&stored, &host, metric);
        missing.extend(
            outage
                .iter()
                .filter(|s| !times.contains(s))
                .map(|s| (metric.clone(), *s)),
        );
    }
    ensure!(
        missing.is_empty(),
        "points missing for the outage (metric, period start): {missing:?}"
    );
    let sent = sent_first + sent_second;
    let told = mackerel.bytes_told(&host, SERIES, PERIOD);
    let error = (told - sent as f64) / sent as f64 * 100.0;
    eprintln!(
        "sent {sent_first} B + {sent_second} B = {sent} B; Mackerel told {told:.1} B ({error:+.3} %)"
    );
    // ICMP: nothing resent.
    ensure!(
        within(told, sent as f64, 0),
        "Mackerel was told {told:.1} B, {sent} B were sent across both runs"
    );
    Ok(())
}
