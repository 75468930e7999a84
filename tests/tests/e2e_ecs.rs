//! End to end with real containers: three "ECS tasks" (host mode, bridge mode, and an
//! awsvpc-like task of a pause container plus two apps in its network namespace) send known
//! HTTP bodies to a sink in a network namespace of the test, reached through a veth pair, so
//! every byte crosses a real device (Mackerel's interface metrics leave loopback out).
//! observer runs as a command with `--platform ecs` against a fake ECS agent and reports to a
//! fake Mackerel API. Checked: each task's device tx within 2% of what it posted (the
//! awsvpc-like task counted once), the Docker stats gap observer closes (no `networks` for
//! host mode; the same namespace counters for every container of the awsvpc-like task), and
//! one Mackerel host per task whose `interface.*.txBytes.delta` add up to what it sent.
//!
//! Needs root and a running dockerd (`cargo xtask setup`); says SKIPPED otherwise. Everything
//! it makes is removed by guards, also when an assertion fails, and checked to be gone.

use std::{
    collections::BTreeMap,
    panic::{catch_unwind, resume_unwind, AssertUnwindSafe},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use observer::{defaults, inventory::docker::DockerClient};
use serde_json::Value;
use testbed::{
    docker::{skip_unless_docker, Containers, EcsLabels, Run},
    ecs_scenario::{
        docker_exec, reach_sink, retrans_segs, task_id, wait_child, wait_for, within, SEGMENT_BYTES,
    },
    fake_mackerel::FakeMackerel,
    fake_platform::{task_arn, FakeEcsAgent, FakeTask},
    sh,
    traffic::{at_in, trafficgen},
    unique, NetNs, ObserverCmd, Spawned, TestCgroup,
};

const OBSERVER: &str = env!("CARGO_BIN_EXE_observer-e2e");
const TEST: &str = "ecs_tasks_in_every_network_mode_are_measured_once_and_reported_to_mackerel";
const API_KEY: &str = "e2e-ecs-mackerel-key-3f9c2a71";
const CLUSTER: &str = "e2e";
const FAMILY: &str = "e2e-web";
const VERSION: &str = "7";
const PAUSE: &str = "~internal~ecs~pause";
const INTERVAL: Duration = Duration::from_secs(2);

/// One app container and the HTTP body it posts.
struct App {
    /// Index into the tasks.
    task: usize,
    name: &'static str,
    body_bytes: u64,
    id: String,
}

/// One fake ECS task.
struct Task {
    label: &'static str,
    id: String,
    arn: String,
    /// `--network` of its app containers, once the pause container (if any) exists.
    network: String,
    pause_id: Option<String>,
    /// Bytes TCP resent from the task's network namespace while the apps posted: the device
    /// counts them, the bodies do not. An upper bound (the host namespace has other senders).
    resent_bytes: u64,
}

/// What the test made, for the check that nothing is left afterwards.
#[derive(Default)]
struct Made {
    containers: Vec<String>,
    netns: Option<String>,
    host_if: Option<String>,
    task_ids: Vec<String>,
    observer_pid: Option<u32>,
    sink_cgroup: Option<PathBuf>,
    iptables_rules: Vec<Vec<String>>,
}

#[test]
fn ecs_tasks_in_every_network_mode_are_measured_once_and_reported_to_mackerel() {
    if skip_unless_docker(TEST) {
        return;
    }
    let made = Mutex::new(Made::default());
    let result = catch_unwind(AssertUnwindSafe(|| scenario(&made)));
    let made = made.into_inner().unwrap_or_else(|e| e.into_inner());
    let leftovers = leftovers(&made);
    if let Err(panic) = result {
        if !leftovers.is_empty() {
            eprintln!("LEFT BEHIND after the failure: {leftovers:#?}");
        }
        resume_unwind(panic);
    }
    assert!(leftovers.is_empty(), "left behind: {leftovers:#?}");
}

// ---------------------------------------------------------------------------------------------
// The scenario

fn scenario(made: &Mutex<Made>) {
    let record = |f: &dyn Fn(&mut Made)| f(&mut made.lock().unwrap_or_else(|e| e.into_inner()));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let agent = rt.block_on(FakeEcsAgent::start());
    agent.set_cluster(CLUSTER);
    let mackerel = rt.block_on(FakeMackerel::start(API_KEY));

    // 1. The sink: in a namespace of its own behind a veth pair, in a test cgroup.
    let ns = NetNs::with_veth("ecs").expect("netns with veth");
    let veth = ns.veth();
    record(&|m| {
        m.netns = Some(ns.name().to_owned());
        m.host_if = Some(ns.veth().host_if.clone());
    });
    // Replies to the bridge containers go back through the host end (Docker masquerades them
    // to the host end's address anyway; the route makes it not depend on that).
    sh(
        "ip",
        &[
            "-n",
            ns.name(),
            "route",
            "add",
            "default",
            "via",
            &veth.host_addr.to_string(),
        ],
    )
    .expect("default route in the namespace");
    let sink_cgroup = TestCgroup::new("ecs-sink").expect("sink cgroup");
    record(&|m| m.sink_cgroup = Some(sink_cgroup.path().to_owned()));
    let mut sink = Spawned::start(
        &trafficgen(),
        &["http-sink", &format!("{}:0", veth.ns_addr)],
        at_in(&sink_cgroup, &ns),
    )
    .expect("start the HTTP sink");
    let sink_addr = sink.expect("ready ").expect("sink ready");
    let url = format!("http://{sink_addr}/");
    eprintln!("sink at {url} in netns {}", ns.name());

    // 2. Three tasks with real containers.
    let mut tasks: Vec<Task> = ["host", "bridge", "awsvpc"]
        .into_iter()
        .map(|label| {
            let id = task_id();
            Task {
                label,
                arn: task_arn(CLUSTER, &id),
                id,
                network: label.to_owned(),
                pause_id: None,
                resent_bytes: 0,
            }
        })
        .collect();
    record(&|m| m.task_ids = tasks.iter().map(|t| t.id.clone()).collect());
    let mut apps = vec![
        app(0, "app-host", 3_000_000),
        app(1, "app-bridge", 2_000_000),
        app(2, "app-a1", 1_500_000),
        app(2, "app-a2", 1_000_000),
    ];
    let mut containers = Containers::new();
    // Docker names allow no `~`: the pause container is named "pause" for Docker.
    let run = |task: &Task, container_name: &str| {
        let docker_name = container_name.replace(PAUSE, "pause");
        Run::new()
            .name(&unique(&format!("obs-ecs-{docker_name}")))
            .cgroup_parent(&format!("/ecs/{}", task.id))
            .ecs(&EcsLabels {
                task_arn: &task.arn,
                container_name,
                cluster: CLUSTER,
                family: FAMILY,
                version: VERSION,
            })
    };
    let pause = containers
        .start(run(&tasks[2], PAUSE).network("bridge"))
        .expect("pause container");
    record(&|m| m.containers.push(pause.clone()));
    tasks[2].network = format!("container:{pause}");
    tasks[2].pause_id = Some(pause.clone());
    for a in &mut apps {
        let task = &tasks[a.task];
        a.id = containers
            .start(run(task, a.name).network(&task.network))
            .unwrap_or_else(|e| panic!("container {}: {e}", a.name));
        record(&|m| m.containers.push(a.id.clone()));
    }

    // The bodies are made before observer starts (no traffic), with bytes that are not NUL:
    // busybox wget sends a --post-file with Content-Length strlen(file), so zeros post nothing.
    for a in &apps {
        docker_exec(
            &a.id,
            &format!(
                "dd if=/dev/zero bs=1000 count={} 2>/dev/null | tr '\\000' x > /tmp/body && \
                 test $(wc -c < /tmp/body) -eq {}",
                a.body_bytes / 1000,
                a.body_bytes
            ),
            Duration::from_secs(30),
        )
        .unwrap_or_else(|e| panic!("making the body of {}: {e}", a.name));
    }

    // The bridge and awsvpc-like namespaces reach the sink through docker0 and the host's
    // forwarding; checked before observer starts (a GET posts nothing; the sink prints got 0).
    let probed: Vec<(&str, &str)> = [1, 2]
        .iter()
        .filter_map(|&task| apps.iter().find(|a| a.task == task))
        .map(|a| (a.name, a.id.as_str()))
        .collect();
    let _forwarding = reach_sink(&probed, &url, &mut sink, veth, &|rule| {
        made.lock().unwrap().iptables_rules.push(rule)
    });

    // The fake agent lists the app containers, not the pause container (like the real one).
    let fake_tasks: Vec<FakeTask> = tasks
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let mut ft = FakeTask::running(CLUSTER, &t.id, FAMILY, VERSION);
            for a in apps.iter().filter(|a| a.task == i) {
                ft = ft.container(&a.id, a.name);
            }
            if t.pause_id.is_some() {
                ft = ft.awsvpc();
            }
            ft
        })
        .collect();
    agent.set_tasks(&fake_tasks);

    // 3. observer, reporting every 2 s to stdout and to the fake Mackerel.
    let interval = format!("{}s", INTERVAL.as_secs());
    let agent_url = agent.url();
    let mackerel_url = mackerel.url();
    let mut observer = ObserverCmd::start_with_env(
        OBSERVER,
        &[
            "--platform",
            "ecs",
            "--ecs-agent-url",
            &agent_url,
            "--interval",
            &interval,
            "--output",
            "json",
            "--mackerel-api-base",
            &mackerel_url,
            // A Mackerel period per interval: each interval reaches Mackerel at once.
            "--mackerel-interval",
            &interval,
        ],
        &[("MACKEREL_APIKEY", API_KEY)],
    )
    .expect("start observer");
    record(&|m| m.observer_pid = Some(observer.pid()));
    observer
        .wait_log("attached", Duration::from_secs(30))
        .unwrap();
    // One interval has passed once the first report made the three hosts.
    wait_for("a Mackerel host per task", Duration::from_secs(30), || {
        let hosts = mackerel.hosts();
        tasks.iter().all(|t| {
            hosts
                .iter()
                .any(|h| h.custom_identifier.as_deref() == Some(&t.arn))
        })
    });

    // 4. The traffic: every app posts its body at once, from a process docker exec puts in
    // the container's cgroup.
    // One app per task names the task's network namespace for its TCP retransmissions.
    let first_app = |i: usize| apps.iter().find(|a| a.task == i).expect("an app per task");
    let resent_before: Vec<u64> = (0..tasks.len())
        .map(|i| retrans_segs(&first_app(i).id))
        .collect();
    let started = Instant::now();
    let posts: Vec<(&App, Child)> = apps
        .iter()
        .map(|a| {
            let child = Command::new("docker")
                .args(["exec", &a.id, "wget", "-q", "-O", "/dev/null"])
                .args(["--post-file", "/tmp/body", &url])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("docker exec");
            (a, child)
        })
        .collect();
    for (a, child) in posts {
        let out = wait_child(child, Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("{} posting: {e}", a.name));
        assert!(
            out.status.success(),
            "{} posting: {}",
            a.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Every post succeeded, so the sink answered each and prints (or printed) its size.
    let mut got: Vec<u64> = (0..apps.len())
        .map(|_| sink.expect("got ").unwrap().parse().unwrap())
        .collect();
    let mut want: Vec<u64> = apps.iter().map(|a| a.body_bytes).collect();
    got.sort_unstable();
    want.sort_unstable();
    assert_eq!(got, want, "the sink received every body whole");
    eprintln!("traffic sent in {:?}", started.elapsed());
    for (i, t) in tasks.iter_mut().enumerate() {
        let segs = retrans_segs(&first_app(i).id).saturating_sub(resent_before[i]);
        t.resent_bytes = segs * SEGMENT_BYTES;
        eprintln!(
            "task {}: {segs} TCP segments resent in its namespace",
            t.label
        );
    }

    // (b) What Docker's stats API says meanwhile (the gap observer closes).
    let docker = DockerClient::new(defaults::DOCKER_SOCKET, Duration::from_secs(20));
    check_docker_stats(&rt, &docker, &apps);

    // Two more intervals after the traffic, then stop: SIGTERM flushes Mackerel.
    std::thread::sleep(INTERVAL * 2 + Duration::from_secs(1));
    observer.signal(libc::SIGTERM);
    let finished = observer
        .finish(Duration::from_secs(30))
        .expect("observer stops");
    assert!(
        finished.status.success(),
        "observer exited with {}; log:\n{}",
        finished.status,
        finished.log
    );
    assert!(
        !finished.log.contains(API_KEY),
        "the API key appears in the log"
    );
    // SIGTERM flushed the Mackerel queue before exiting.
    assert!(
        finished.log.contains("Mackerel: all values delivered"),
        "no complete Mackerel flush on SIGTERM; log:\n{}",
        finished.log
    );
    for line in finished.log.lines() {
        if line.contains(" WARN ") || line.contains(" ERROR ") {
            eprintln!("observer logged: {line}");
        }
    }

    // 5a. The JSON task lines.
    let lines: Vec<Value> = finished
        .stdout
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let measured = check_json(&lines, &tasks, &apps);

    // 5c. Mackerel.
    check_mackerel(&mackerel, &tasks, &apps, &measured);
    // The guards go in reverse order: containers, sink, its cgroup, the namespace.
}

fn app(task: usize, name: &'static str, body_bytes: u64) -> App {
    App {
        task,
        name,
        body_bytes,
        id: String::new(),
    }
}

// ---------------------------------------------------------------------------------------------
// Docker stats

/// The raw one-shot stats: no `networks` at all for the host-mode container; the bridge
/// container's own eth0; the two apps of the awsvpc-like task the same counters, those of the
/// namespace they share (so summing them counts it twice).
fn check_docker_stats(rt: &tokio::runtime::Runtime, docker: &DockerClient, apps: &[App]) {
    let stats = |id: &str| rt.block_on(docker.stats(id)).expect("docker stats");
    let host = stats(&apps[0].id);
    assert!(
        host.get("networks").is_none(),
        "docker stats reports networks for the host-mode container: {}",
        host.get("networks").unwrap()
    );
    assert!(
        host.get("cpu_stats").is_some(),
        "a real stats answer: {host}"
    );
    let bridge = stats(&apps[1].id);
    let tx = |s: &Value| s["networks"]["eth0"]["tx_bytes"].as_u64();
    assert!(
        tx(&bridge).is_some_and(|tx| tx >= apps[1].body_bytes),
        "bridge container's networks: {}",
        bridge["networks"]
    );
    // The namespace is idle now; read again if a stray packet moved it in between.
    let (a1, a2) = (0..5)
        .map(|_| (stats(&apps[2].id), stats(&apps[3].id)))
        .find(|(a1, a2)| a1["networks"] == a2["networks"])
        .unwrap_or_else(|| panic!("the two apps of the awsvpc-like task never agreed"));
    assert!(a1["networks"].is_object(), "{a1}");
    let both = apps[2].body_bytes + apps[3].body_bytes;
    assert!(
        tx(&a1).is_some_and(|tx| tx >= both) && tx(&a2) == tx(&a1),
        "each app of the awsvpc-like task shows the whole namespace's tx: {} / {}",
        a1["networks"],
        a2["networks"]
    );
    eprintln!(
        "docker stats: host-mode networks absent; bridge eth0 tx {}; awsvpc apps eth0 tx {} \
         each (summed: {}, twice the namespace)",
        tx(&bridge).unwrap(),
        tx(&a1).unwrap(),
        2 * tx(&a1).unwrap()
    );
}

// ---------------------------------------------------------------------------------------------
// JSON task lines

/// Checks the task lines; returns the device tx measured per task id, summed over intervals.
fn check_json(lines: &[Value], tasks: &[Task], apps: &[App]) -> BTreeMap<String, u64> {
    let task_lines: Vec<&Value> = lines
        .iter()
        .filter(|l| l["type"] == "task" && l["kind"] == "ecs_task")
        .filter(|l| tasks.iter().any(|t| l["id"] == t.id.as_str()))
        .collect();
    assert!(!task_lines.is_empty(), "no ecs_task lines for our tasks");

    // Per interval, for the record (and for investigating a value that is off).
    eprintln!("per interval, device tx bytes (per container):");
    for l in &task_lines {
        let task = tasks.iter().find(|t| l["id"] == t.id.as_str()).unwrap();
        let per_container: Vec<String> = l["containers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| format!("{}={}", c["name"].as_str().unwrap_or("?"), c["tx_bytes"]))
            .collect();
        eprintln!(
            "  {} {:.3}s {:<6} {:>4} tx={:>8} rx={:>6} lo_tx={} [{}]",
            l["time"].as_str().unwrap_or("?"),
            l["interval_seconds"].as_f64().unwrap_or(0.0),
            task.label,
            l["network_mode"].as_str().unwrap_or("?"),
            l["tx_bytes"],
            l["rx_bytes"],
            l["lo_tx_bytes"],
            per_container.join(" ")
        );
    }

    let mut task_tx: BTreeMap<String, u64> = BTreeMap::new();
    let mut container_tx: BTreeMap<String, u64> = BTreeMap::new();
    for l in &task_lines {
        *task_tx
            .entry(l["id"].as_str().unwrap().to_owned())
            .or_default() += l["tx_bytes"].as_u64().expect("tx_bytes");
        for c in l["containers"].as_array().expect("containers") {
            *container_tx
                .entry(c["name"].as_str().unwrap().to_owned())
                .or_default() += c["tx_bytes"].as_u64().expect("container tx_bytes");
        }
    }

    eprintln!("per task: sent (bodies) vs measured device tx:");
    for (i, t) in tasks.iter().enumerate() {
        let sent: u64 = apps
            .iter()
            .filter(|a| a.task == i)
            .map(|a| a.body_bytes)
            .sum();
        let got = task_tx.get(&t.id).copied().unwrap_or(0);
        eprintln!(
            "  {:<6} sent {sent:>8}  measured {got:>8}  ({:+.3}%)",
            t.label,
            (got as f64 / sent as f64 - 1.0) * 100.0
        );
    }
    for a in apps {
        let got = container_tx.get(a.name).copied().unwrap_or(0);
        eprintln!(
            "  container {:<10} sent {:>8}  measured {got:>8}  ({:+.3}%)",
            a.name,
            a.body_bytes,
            (got as f64 / a.body_bytes as f64 - 1.0) * 100.0
        );
    }

    for (i, t) in tasks.iter().enumerate() {
        let sent: u64 = apps
            .iter()
            .filter(|a| a.task == i)
            .map(|a| a.body_bytes)
            .sum();
        let got = task_tx.get(&t.id).copied().unwrap_or(0);
        assert!(
            within(got as f64, sent as f64, t.resent_bytes),
            "task {} ({}): measured tx {got} is not within 2% (+{} resent) above the {sent} bytes it posted",
            t.label,
            t.id,
            t.resent_bytes
        );
    }
    // The awsvpc-like task is its two apps once, not the namespace once per container.
    let a = &tasks[2];
    let a_sent = apps[2].body_bytes + apps[3].body_bytes;
    let a_got = task_tx[&a.id];
    assert!(
        (a_got as f64) < 1.5 * a_sent as f64,
        "the awsvpc-like task is counted more than once: {a_got} for {a_sent} posted"
    );
    for app in apps {
        let got = container_tx.get(app.name).copied().unwrap_or(0);
        assert!(
            within(got as f64, app.body_bytes as f64, tasks[app.task].resent_bytes),
            "container {}: measured tx {got} is not within 2% (+{} resent in its namespace) above the {} bytes it posted",
            app.name,
            tasks[app.task].resent_bytes,
            app.body_bytes
        );
    }

    // The pause container's cgroup counts for its task (the agent does not list it): the
    // task's cgroups are its three containers' and possibly /ecs/<task> itself, nothing else.
    let a_dir = testbed::v2_root().join("ecs").join(&a.id);
    let id_of = |dir: &Path| {
        observer::cgroupfs::cgroup_id(dir)
            .unwrap_or_else(|e| panic!("cgroup id of {}: {e}", dir.display()))
    };
    let pause = a.pause_id.as_deref().unwrap();
    let mut expected = vec![id_of(&a_dir.join(pause))];
    expected.extend(apps[2..].iter().map(|app| id_of(&a_dir.join(&app.id))));
    let allowed = id_of(&a_dir);
    let last_a = task_lines
        .iter()
        .rev()
        .find(|l| l["id"] == a.id.as_str())
        .unwrap();
    let ids: Vec<u64> = last_a["cgroup_ids"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_u64)
        .collect();
    assert!(
        expected.iter().all(|e| ids.contains(e))
            && ids.iter().all(|i| expected.contains(i) || *i == allowed),
        "the awsvpc-like task's cgroups {ids:?}: want pause + apps {expected:?} (and maybe \
         the task's own {allowed})"
    );
    task_tx
}

// ---------------------------------------------------------------------------------------------
// Mackerel

fn check_mackerel(
    mackerel: &FakeMackerel,
    tasks: &[Task],
    apps: &[App],
    measured: &BTreeMap<String, u64>,
) {
    let hosts = mackerel.hosts();
    let points = mackerel.points();
    eprintln!("Mackerel: {} hosts, {} points", hosts.len(), points.len());
    assert_eq!(
        hosts.len(),
        tasks.len(),
        "one host per task, nothing else: {hosts:#?}"
    );
    for (i, t) in tasks.iter().enumerate() {
        let mine: Vec<_> = hosts
            .iter()
            .filter(|h| h.custom_identifier.as_deref() == Some(&t.arn))
            .collect();
        assert_eq!(mine.len(), 1, "task {}: hosts {mine:#?}", t.label);
        let host = mine[0];
        assert_eq!(host.name, t.id, "host name = task id");
        assert!(!host.retired, "a live task's host was retired");
        let pts: Vec<_> = points.iter().filter(|p| p.host_id == host.id).collect();
        let names: std::collections::BTreeSet<&str> = pts.iter().map(|p| p.name.as_str()).collect();
        for a in apps.iter().filter(|a| a.task == i) {
            for metric in [
                format!("container.cpu.{}.usage", a.name),
                format!("container.memory.{}.usage", a.name),
                format!("interface.{}.rxBytes.delta", a.name),
                format!("interface.{}.txBytes.delta", a.name),
            ] {
                assert!(
                    names.contains(metric.as_str()),
                    "task {}: no {metric} among {names:?}",
                    t.label
                );
            }
        }
        if t.pause_id.is_some() {
            // The pause container is reported too, its name sanitised like the agent does.
            let metric = "interface._internal_ecs_pause.txBytes.delta";
            assert!(names.contains(metric), "no {metric} among {names:?}");
        }
        // Each value is a rate over a whole Mackerel period (one interval here).
        let sum = mackerel.bytes_told(&host.id, ".txBytes.delta", INTERVAL);
        let sent: u64 = apps
            .iter()
            .filter(|a| a.task == i)
            .map(|a| a.body_bytes)
            .sum();
        eprintln!(
            "  {:<6} Mackerel sum of txBytes.delta x period {sum:>11.1}  sent {sent:>8}  \
             JSON {:>8}  ({:+.3}%)",
            t.label,
            measured[&t.id],
            (sum / sent as f64 - 1.0) * 100.0,
        );
        // Rates times periods give the byte counts back, to float rounding.
        assert!(
            within(sum.round(), sent as f64, t.resent_bytes),
            "task {}: Mackerel's txBytes.delta add up to {sum:.1} bytes, not within 2% (+{} \
             resent) above the {sent} it sent",
            t.label,
            t.resent_bytes
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Leftovers

fn leftovers(made: &Made) -> Vec<String> {
    let mut left = Vec::new();
    if !made.containers.is_empty() {
        let all = sh("docker", &["ps", "-aq", "--no-trunc"]).unwrap_or_default();
        for id in &made.containers {
            if all.lines().any(|l| l.trim() == id) {
                left.push(format!("container {id}"));
            }
        }
    }
    if let Some(ns) = &made.netns {
        let list = sh("ip", &["netns", "list"]).unwrap_or_default();
        if list
            .lines()
            .any(|l| l.split_whitespace().next() == Some(ns))
        {
            left.push(format!("netns {ns}"));
        }
    }
    if let Some(host_if) = &made.host_if {
        if Path::new("/sys/class/net").join(host_if).exists() {
            left.push(format!("veth {host_if}"));
        }
    }
    let mut roots = vec![PathBuf::from("/sys/fs/cgroup")];
    if let Ok(entries) = std::fs::read_dir("/sys/fs/cgroup") {
        roots.extend(entries.flatten().map(|e| e.path()));
    }
    for id in &made.task_ids {
        for root in &roots {
            let dir = root.join("ecs").join(id);
            if dir.exists() {
                left.push(format!("cgroup {}", dir.display()));
            }
        }
    }
    if let Some(dir) = &made.sink_cgroup {
        if dir.exists() {
            left.push(format!("cgroup {}", dir.display()));
        }
    }
    if let Some(pid) = made.observer_pid {
        if Path::new(&format!("/proc/{pid}")).exists() {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains("observer-e2e") {
                left.push(format!("observer process {pid}"));
            }
        }
    }
    if let (false, Some(host_if)) = (made.iptables_rules.is_empty(), &made.host_if) {
        let rules = sh("iptables", &["-S", "FORWARD"]).unwrap_or_default();
        for line in rules.lines().filter(|l| l.contains(host_if.as_str())) {
            left.push(format!("iptables rule {line}"));
        }
    }
    left
}
