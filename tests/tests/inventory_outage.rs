//! No mass retirement, end to end through the real binary: the strict fake ECS agent and fake
//! kubelet (tests/src/fake_platform.rs) answer that nothing runs, or leave one workload out,
//! while its containers (real Docker containers in real cgroups) keep running and sending. The
//! JSON lines must keep listing them, marked (`stale` with the outage's reason, or
//! `unlisted_since`), with every byte they sent; once the containers really stop, or the
//! platform says the pod failed, they leave.
//!
//! Traffic is ping to docker0's address: 84-byte IP packets (20 + 8 + 56), so a task's bytes
//! are exact, as in tests/tests/one_path.rs.
//!
//! Needs root and a running dockerd (`cargo xtask setup`); says SKIPPED otherwise. Containers
//! and their cgroup parents are removed by guards, also when an assertion fails.

use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context as _};
use serde_json::Value;
use testbed::{
    docker::{self, skip_unless_docker, Containers, EcsLabels, Run},
    fake_platform::{task_arn, FakeEcsAgent, FakeKubelet, FakePod, FakeTask},
    prometheus_server::free_port,
    ObserverCmd,
};

const OBSERVER: &str = env!("CARGO_BIN_EXE_observer-e2e");
/// An ICMP echo request with ping's default 56-byte payload: IP 20 + ICMP 8 + 56.
const PING_BYTES: u64 = 84;
/// Long enough for any step here (a few intervals of 1 s, and a backoff of up to 8 s after a
/// short outage); reached only when something is wrong.
const PATIENCE: Duration = Duration::from_secs(60);
const CLUSTER: &str = "inventory-outage";

// ---------------------------------------------------------------------------------------------
// Workloads

/// A fresh 32-hex ECS task id.
fn task_id(n: u32) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64;
    format!("{:08x}{n:08x}{nanos:016x}", std::process::id())
}

/// One ECS task of one container, as the agent makes it: its labels, under `/ecs/<task id>`.
fn start_task(containers: &mut Containers, id: &str) -> anyhow::Result<String> {
    let arn = task_arn(CLUSTER, id);
    containers.start(
        Run::new()
            .name(&testbed::unique("outage-task"))
            .ecs(&EcsLabels {
                task_arn: &arn,
                container_name: "app",
                cluster: CLUSTER,
                family: "outage",
                version: "1",
            })
            .cgroup_parent(&format!("/ecs/{id}")),
    )
}

/// The agent's entry for it.
fn listed(id: &str, container: &str) -> FakeTask {
    FakeTask::running(CLUSTER, id, "outage", "1").container(container, "app")
}

/// A pod's container as the kubelet's cgroupfs driver places it: `/kubepods/besteffort/pod<uid>`.
fn start_pod_container(containers: &mut Containers, uid: &str) -> anyhow::Result<String> {
    containers.start(
        Run::new()
            .name(&testbed::unique("outage-pod"))
            .cgroup_parent(&format!("/kubepods/besteffort/pod{uid}")),
    )
}

/// A fresh pod UID.
fn pod_uid(n: u32) -> String {
    let t = task_id(n);
    format!(
        "{}-{}-{}-{}-{}",
        &t[..8],
        &t[8..12],
        &t[12..16],
        &t[16..20],
        &t[20..32]
    )
}

fn ping(container: &str, count: u32, to: Ipv4Addr) -> anyhow::Result<()> {
    testbed::sh(
        "docker",
        &[
            "exec",
            container,
            "ping",
            "-c",
            &count.to_string(),
            "-i",
            "0.2",
            "-q",
            &to.to_string(),
        ],
    )
    .map(drop)
}

// ---------------------------------------------------------------------------------------------
// The observer's JSON lines, grouped by interval

/// One interval: its task lines and its observer line.
#[derive(Debug, Clone)]
struct Interval {
    tasks: Vec<Value>,
}

impl Interval {
    fn task(&self, id: &str) -> Option<&Value> {
        self.tasks.iter().find(|t| t["id"] == id)
    }

    fn has(&self, id: &str) -> bool {
        self.task(id).is_some()
    }
}

/// The whole intervals among `lines` (each closed by its `observer` line).
fn intervals(lines: &[String]) -> Vec<Interval> {
    let mut out = Vec::new();
    let mut tasks = Vec::new();
    for line in lines {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        match v["type"].as_str() {
            Some("task") => tasks.push(v),
            Some("observer") => out.push(Interval {
                tasks: std::mem::take(&mut tasks),
            }),
            _ => {}
        }
    }
    out
}

/// The sum of `field` over the task lines of `id`.
fn sum(intervals: &[Interval], id: &str, field: &str) -> u64 {
    intervals
        .iter()
        .filter_map(|i| i.task(id))
        .map(|t| t[field].as_u64().unwrap_or(0))
        .sum()
}

/// Waits until the intervals so far satisfy `done`; returns how many there were.
fn wait_for(
    observer: &mut ObserverCmd,
    what: &str,
    done: impl Fn(&[Interval]) -> bool,
) -> anyhow::Result<usize> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let all = intervals(observer.stdout_so_far());
        if done(&all) {
            return Ok(all.len());
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "{what}: not within {PATIENCE:?}; log:\n{}",
                observer.log_so_far().join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits for `more` intervals after the first `seen`.
fn wait_intervals(observer: &mut ObserverCmd, seen: usize, more: usize) -> anyhow::Result<usize> {
    wait_for(observer, "more intervals", |all| all.len() >= seen + more)
}

fn log_count(observer: &mut ObserverCmd, needle: &str) -> usize {
    observer
        .log_so_far()
        .iter()
        .filter(|l| l.contains(needle))
        .count()
}

fn json_args(platform: &str, url_flag: &str, url: &str) -> Vec<String> {
    [
        "--platform",
        platform,
        url_flag,
        url,
        "--interval",
        "1s",
        "--output",
        "json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

// ---------------------------------------------------------------------------------------------
// ECS

/// The agent answers `{"Tasks":null}` while both tasks run: an outage (stale, with the reason),
/// both tasks listed every interval with every byte they sent; when the containers really stop,
/// the same empty answer is the truth and both leave.
#[test]
fn an_empty_task_list_while_the_tasks_run_is_an_outage() -> anyhow::Result<()> {
    const TEST: &str = "an_empty_task_list_while_the_tasks_run_is_an_outage";
    if skip_unless_docker(TEST) {
        return Ok(());
    }
    let rt = tokio::runtime::Runtime::new()?;
    let agent = rt.block_on(FakeEcsAgent::start());
    let gateway = docker::bridge_address()?;
    let mut containers = Containers::new();
    let (a, b) = (task_id(1), task_id(2));
    let ca = start_task(&mut containers, &a)?;
    let cb = start_task(&mut containers, &b)?;
    agent.set_tasks(&[listed(&a, &ca), listed(&b, &cb)]);

    let args = json_args("ecs", "--ecs-agent-url", &agent.url());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut observer = ObserverCmd::start(OBSERVER, &args)?;
    wait_for(&mut observer, "both tasks listed", |all| {
        all.iter().any(|i| i.has(&a) && i.has(&b))
    })?;

    // Before: sent and reported while listed.
    ping(&ca, 5, gateway)?;
    ping(&cb, 3, gateway)?;
    wait_for(&mut observer, "the first pings reported", |all| {
        sum(all, &a, "tx_bytes") == 5 * PING_BYTES && sum(all, &b, "tx_bytes") == 3 * PING_BYTES
    })?;
    let before = intervals(observer.stdout_so_far()).len();

    // The agent forgets everything (a restarted agent) while both tasks run.
    agent.set_tasks(&[]);
    observer.wait_log("treating it as an outage", PATIENCE)?;
    let outage_seen = wait_for(&mut observer, "a stale interval", |all| {
        all.iter()
            .any(|i| i.task(&a).is_some_and(|t| t["stale"] == true))
    })?;
    ping(&ca, 7, gateway)?;
    ping(&cb, 4, gateway)?;
    let during = wait_intervals(&mut observer, outage_seen, 3)?;

    // The tasks really stop; the agent still lists nothing, which is now the truth.
    containers.remove(&ca)?;
    containers.remove(&cb)?;
    let stopped_at = during;
    wait_for(&mut observer, "both tasks gone", |all| {
        all.len() > stopped_at && all.last().is_some_and(|i| !i.has(&a) && !i.has(&b))
    })?;
    let gone_at = intervals(observer.stdout_so_far()).len();
    let after = wait_intervals(&mut observer, gone_at, 2)?;
    // The warning's own words: the recovery line quotes the reason too.
    let outages = log_count(&mut observer, "outage; keeping the last good inventory");
    let recoveries = log_count(&mut observer, "source is back after");
    observer.signal(libc::SIGTERM);
    let done = observer.finish(PATIENCE)?;
    ensure!(
        done.status.success(),
        "observer: {}\n{}",
        done.status,
        done.log
    );
    let all = intervals(&done.stdout);
    drop(containers);

    // Every interval from the first listing until the containers stopped has both tasks:
    // the empty answers removed nothing.
    let first = all
        .iter()
        .position(|i| i.has(&a) && i.has(&b))
        .context("never both")?;
    for (n, interval) in all[first..stopped_at].iter().enumerate() {
        ensure!(
            interval.has(&a) && interval.has(&b),
            "interval {} lacks a task while both ran: {:?}",
            first + n,
            interval.tasks
        );
    }
    // Stale from the outage on, with the reason; not before it.
    let stale: Vec<&Interval> = all[before..stopped_at]
        .iter()
        .filter(|i| i.task(&a).is_some_and(|t| t["stale"] == true))
        .collect();
    ensure!(stale.len() >= 3, "only {} stale intervals", stale.len());
    for interval in &stale {
        for id in [&a, &b] {
            let t = interval.task(id).context("listed")?;
            ensure!(t["stale"] == true, "{t}");
            let reason = t["stale_reason"].as_str().unwrap_or_default();
            ensure!(
                reason.starts_with("the ECS agent listed no tasks while 2 tasks' containers")
                    && reason.ends_with("treating it as an outage"),
                "{reason}"
            );
            ensure!(
                t["unlisted_since"].is_null(),
                "kept as the last good one: {t}"
            );
        }
    }
    ensure!(
        all[first..before]
            .iter()
            .all(|i| i.tasks.iter().all(|t| t["stale"] == false)),
        "stale before the outage"
    );
    // Every byte, each counted once, and to its task.
    let during_tx = |id: &str| {
        all[before..stopped_at]
            .iter()
            .filter_map(|i| i.task(id))
            .map(|t| t["tx_bytes"].as_u64().unwrap_or(0))
            .sum::<u64>()
    };
    eprintln!(
        "A: {} B before + {} B during the outage; B: {} + {}; {} stale intervals; \
         {outages} outage and {recoveries} recovery lines",
        sum(&all[..before], &a, "tx_bytes"),
        during_tx(&a),
        sum(&all[..before], &b, "tx_bytes"),
        during_tx(&b),
        stale.len()
    );
    ensure!(
        during_tx(&a) == 7 * PING_BYTES,
        "A during: {}",
        during_tx(&a)
    );
    ensure!(
        during_tx(&b) == 4 * PING_BYTES,
        "B during: {}",
        during_tx(&b)
    );
    ensure!(sum(&all, &a, "tx_bytes") == 12 * PING_BYTES);
    ensure!(sum(&all, &b, "tx_bytes") == 7 * PING_BYTES);
    // Gone once their containers were, and not back.
    ensure!(
        all[gone_at - 1..after]
            .iter()
            .all(|i| !i.has(&a) && !i.has(&b)),
        "a stopped task came back"
    );
    ensure!(
        all[gone_at - 1].tasks.iter().all(|t| t["stale"] == false),
        "still stale after the truth"
    );
    // Logged once each: the outage, and its end.
    ensure!(outages == 1, "{outages} outage lines:\n{}", done.log);
    ensure!(
        recoveries == 1,
        "{recoveries} recovery lines:\n{}",
        done.log
    );
    Ok(())
}

/// The agent leaves one of two tasks out while its container runs: no outage; the task stays,
/// marked `unlisted_since` (the same time every interval) and counted in
/// `observer_inventory_unlisted_workloads`, with every byte it sends; when its container
/// stops, it leaves and the gauge is 0.
#[test]
fn a_task_the_agent_leaves_out_while_it_runs_is_kept_until_it_stops() -> anyhow::Result<()> {
    const TEST: &str = "a_task_the_agent_leaves_out_while_it_runs_is_kept_until_it_stops";
    if skip_unless_docker(TEST) {
        return Ok(());
    }
    let rt = tokio::runtime::Runtime::new()?;
    let agent = rt.block_on(FakeEcsAgent::start());
    let gateway = docker::bridge_address()?;
    let mut containers = Containers::new();
    let (a, b) = (task_id(3), task_id(4));
    let ca = start_task(&mut containers, &a)?;
    let cb = start_task(&mut containers, &b)?;
    agent.set_tasks(&[listed(&a, &ca), listed(&b, &cb)]);

    let listen = format!("127.0.0.1:{}", free_port()?);
    let mut args = json_args("ecs", "--ecs-agent-url", &agent.url());
    args.extend(["--prometheus-listen".into(), listen.clone()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut observer = ObserverCmd::start(OBSERVER, &args)?;
    wait_for(&mut observer, "both tasks listed", |all| {
        all.iter().any(|i| i.has(&a) && i.has(&b))
    })?;
    ping(&cb, 2, gateway)?;
    wait_for(&mut observer, "B's first pings", |all| {
        sum(all, &b, "tx_bytes") == 2 * PING_BYTES
    })?;
    let before = intervals(observer.stdout_so_far()).len();

    agent.set_tasks(&[listed(&a, &ca)]);
    observer.wait_log(
        "no longer listed, but its cgroups still hold processes",
        PATIENCE,
    )?;
    let left_out = wait_for(&mut observer, "B marked", |all| {
        all.last()
            .and_then(|i| i.task(&b))
            .is_some_and(|t| t["unlisted_since"].is_string())
    })?;
    let gauge = r#"observer_inventory_unlisted_workloads{source="ecs"}"#;
    let during_gauge = rt.block_on(metric(&listen, gauge))?;
    ping(&cb, 6, gateway)?;
    ping(&ca, 3, gateway)?;
    let kept_until = wait_intervals(&mut observer, left_out, 3)?;

    containers.remove(&cb)?;
    wait_for(&mut observer, "B gone", |all| {
        all.len() > kept_until && all.last().is_some_and(|i| i.has(&a) && !i.has(&b))
    })?;
    let after_gauge = rt.block_on(metric(&listen, gauge))?;
    let left = log_count(&mut observer, "no longer kept as not listed");
    observer.signal(libc::SIGTERM);
    let done = observer.finish(PATIENCE)?;
    ensure!(
        done.status.success(),
        "observer: {}\n{}",
        done.status,
        done.log
    );
    let all = intervals(&done.stdout);
    drop(containers);

    // While left out: B in every interval, marked with one time; never stale, A unmarked.
    let marked: Vec<&Value> = all[before..kept_until]
        .iter()
        .filter_map(|i| i.task(&b))
        .filter(|t| t["unlisted_since"].is_string())
        .collect();
    let since: BTreeSet<&str> = marked
        .iter()
        .filter_map(|t| t["unlisted_since"].as_str())
        .collect();
    eprintln!(
        "B kept unlisted for {} intervals since {since:?}; gauge {during_gauge} then \
         {after_gauge}; B sent {} B in all",
        marked.len(),
        sum(&all, &b, "tx_bytes")
    );
    ensure!(marked.len() >= 3, "B marked in {} intervals", marked.len());
    ensure!(since.len() == 1, "B's mark moved: {since:?}");
    for interval in &all[before..kept_until] {
        ensure!(interval.has(&a) && interval.has(&b), "{:?}", interval.tasks);
        for t in &interval.tasks {
            ensure!(t["stale"] == false, "a partial answer is no outage: {t}");
        }
        let ta = interval.task(&a).context("A")?;
        ensure!(ta["unlisted_since"].is_null(), "A is listed: {ta}");
    }
    ensure!(
        during_gauge == 1.0,
        "gauge while B was left out: {during_gauge}"
    );
    ensure!(after_gauge == 0.0, "gauge after B stopped: {after_gauge}");
    // Every byte, to its task: B's while unlisted too.
    ensure!(sum(&all, &b, "tx_bytes") == 8 * PING_BYTES);
    ensure!(sum(&all, &a, "tx_bytes") == 3 * PING_BYTES);
    let last_b = all.iter().rposition(|i| i.has(&b)).context("B")?;
    ensure!(
        last_b < all.len() - 1 && all[last_b + 1..].iter().all(|i| !i.has(&b)),
        "B came back after it stopped"
    );
    ensure!(left == 1, "{left} lines about B leaving:\n{}", done.log);
    Ok(())
}

/// One sample of `/metrics` at `listen`.
async fn metric(listen: &str, series: &str) -> anyhow::Result<f64> {
    let text = reqwest::get(format!("http://{listen}/metrics"))
        .await?
        .text()
        .await?;
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .with_context(|| format!("no {series} in:\n{text}"))
}

// ---------------------------------------------------------------------------------------------
// Kubernetes

/// The kubelet answers an empty PodList while both pods run (a restarted kubelet): an outage,
/// both pods listed with every byte; then it answers again, saying one pod Failed while its
/// container still runs and leaving the other out: the failed one leaves at once, the other is
/// kept unlisted until its container stops.
#[test]
fn an_empty_pod_list_while_the_pods_run_is_an_outage() -> anyhow::Result<()> {
    const TEST: &str = "an_empty_pod_list_while_the_pods_run_is_an_outage";
    if skip_unless_docker(TEST) {
        return Ok(());
    }
    let rt = tokio::runtime::Runtime::new()?;
    let kubelet = rt.block_on(FakeKubelet::start());
    let gateway = docker::bridge_address()?;
    let mut containers = Containers::new();
    let (p, q) = (pod_uid(5), pod_uid(6));
    let cp = start_pod_container(&mut containers, &p)?;
    let cq = start_pod_container(&mut containers, &q)?;
    let pod = |uid: &str, name: &str, container: &str| {
        FakePod::running(uid, "shop", name).container("app", &format!("docker://{container}"))
    };
    kubelet.set_pods(&[pod(&p, "web-p", &cp), pod(&q, "web-q", &cq)]);

    let args = json_args("kubernetes", "--kubelet-url", &kubelet.url());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut observer = ObserverCmd::start(OBSERVER, &args)?;
    wait_for(&mut observer, "both pods listed", |all| {
        all.iter().any(|i| i.has(&p) && i.has(&q))
    })?;
    let before = intervals(observer.stdout_so_far()).len();

    kubelet.set_pods(&[]);
    observer.wait_log("treating it as an outage", PATIENCE)?;
    let outage_seen = wait_for(&mut observer, "a stale interval", |all| {
        all.iter()
            .any(|i| i.task(&p).is_some_and(|t| t["stale"] == true))
    })?;
    ping(&cp, 5, gateway)?;
    ping(&cq, 3, gateway)?;
    let during = wait_intervals(&mut observer, outage_seen, 3)?;

    // Back, with P failed (its container still runs) and Q left out.
    kubelet.set_pods(&[pod(&p, "web-p", &cp).phase("Failed")]);
    wait_for(&mut observer, "P gone, Q kept unlisted", |all| {
        all.len() > during
            && all.last().is_some_and(|i| {
                !i.has(&p) && i.task(&q).is_some_and(|t| t["unlisted_since"].is_string())
            })
    })?;
    let answered = intervals(observer.stdout_so_far()).len();
    ping(&cq, 4, gateway)?;
    let kept_until = wait_intervals(&mut observer, answered, 3)?;
    containers.remove(&cq)?;
    wait_for(&mut observer, "Q gone", |all| {
        all.len() > kept_until && all.last().is_some_and(|i| !i.has(&q))
    })?;
    let recoveries = log_count(&mut observer, "source is back after");
    observer.signal(libc::SIGTERM);
    let done = observer.finish(PATIENCE)?;
    ensure!(
        done.status.success(),
        "observer: {}\n{}",
        done.status,
        done.log
    );
    let all = intervals(&done.stdout);
    drop(containers);

    for interval in &all[before..during] {
        ensure!(interval.has(&p) && interval.has(&q), "{:?}", interval.tasks);
    }
    let stale = all[before..during]
        .iter()
        .filter(|i| i.task(&q).is_some_and(|t| t["stale"] == true))
        .count();
    let reason = all[during - 1]
        .task(&q)
        .and_then(|t| t["stale_reason"].as_str())
        .unwrap_or_default()
        .to_owned();
    eprintln!(
        "{stale} stale intervals ({reason}); P {} B, Q {} B; {recoveries} recovery lines",
        sum(&all, &p, "tx_bytes"),
        sum(&all, &q, "tx_bytes")
    );
    ensure!(stale >= 3, "{stale} stale intervals");
    ensure!(
        reason.starts_with("the kubelet listed no pods while 2 pods' containers still run"),
        "{reason}"
    );
    ensure!(sum(&all, &p, "tx_bytes") == 5 * PING_BYTES);
    ensure!(sum(&all, &q, "tx_bytes") == 7 * PING_BYTES);
    // P left at the answer that said it failed, though its container ran on.
    let last_p = all.iter().rposition(|i| i.has(&p)).context("P")?;
    ensure!(last_p < answered, "P listed after it failed");
    ensure!(all[last_p + 1..].iter().all(|i| !i.has(&p)), "P came back");
    for interval in &all[answered..kept_until] {
        let t = interval.task(&q).context("Q kept")?;
        ensure!(
            t["stale"] == false && t["unlisted_since"].is_string(),
            "{t}"
        );
    }
    ensure!(
        recoveries == 1,
        "{recoveries} recovery lines:\n{}",
        done.log
    );
    Ok(())
}
