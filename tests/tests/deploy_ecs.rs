//! The ECS deployment end to end: observer's container image run in the local Docker engine
//! exactly as deploy/ecs/task-definition.json says (translated to `docker run` by
//! testbed::ecs_taskdef, which fails on any key it does not know), against a fake ECS agent on
//! the real agent's address (127.0.0.1:51678: the manifest relies on the default agent URL) and
//! a fake Mackerel API. Three "ECS tasks" of real containers (host mode, bridge mode, and an
//! awsvpc-like task of a pause container plus two apps in its network namespace) post known
//! HTTP bodies to a sink in a network namespace of the test, behind a veth pair.
//!
//! The apps post in batches from the first run until after the second restart. observer is
//! restarted as ECS restarts an essential container: `docker stop`, then a new container of
//! the same arguments (ECS starts a new one, it does not `docker restart`), and once more after
//! `docker kill -s KILL`. The task definition's bpffs volume is the host's /sys/fs/bpf, which
//! the test mounts a bpffs at if none is there (and unmounts afterwards); observer pins its
//! state there, and each new container takes over the programs of the one before, which kept
//! counting in the gap.
//!
//! Checked: one Mackerel host per task whose `interface.*.txBytes.delta` over all three runs
//! add up to what it sent (within 2 %, plus what TCP resent: nothing lost in the gaps, nothing
//! twice), the same in the JSON lines on the three containers' stdout (`docker logs`), which
//! name the three tasks; observer attached at the host's cgroup v2 root under
//! /host/sys/fs/cgroup; its state pinned in /sys/fs/bpf/observer and taken over by the new
//! containers; the container's health check (`/observer health`) makes it "healthy"; `docker
//! stop` ends it with exit code 0 within the stop timeout; `observer detach` at the end
//! removes the pins and unloads every program. The task definition's state volume (the
//! instance's /var/lib/observer) is pointed at a directory under one the test made: after the
//! `docker stop` and after the SIGKILL it holds observer's Mackerel state (mackerel.json, 0600,
//! owned by the container's user), and each new container takes up the hosts it names.
//!
//! Needs root, a running dockerd and the image (`cargo xtask image`; OBSERVER_TEST_IMAGE
//! names another); says SKIPPED otherwise (under CI a skip fails). Everything it makes is
//! removed by guards, also when an assertion fails, and checked to be gone: the pins too (with
//! `observer detach`), and the bpffs if the test mounted it.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::TcpStream,
    panic::{catch_unwind, resume_unwind, AssertUnwindSafe},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Mutex,
    },
    time::{Duration, Instant},
};

use serde_json::Value;
use testbed::{
    docker::{skip_unless_docker, Containers, EcsLabels, Run},
    ecs_scenario::{
        docker_exec, reach_sink, retrans_segs, task_id, unix_seconds, wait_child, wait_for, within,
        SEGMENT_BYTES,
    },
    ecs_taskdef::{self, Overrides},
    fake_mackerel::FakeMackerel,
    fake_platform::{task_arn, FakeEcsAgent, FakeTask},
    host_bpffs::{self, HostBpffs, PIN_DIR},
    sh,
    state_dir::{StateDir, MACKEREL_FILE, NODE_STATE_DIR},
    traffic::{at_in, trafficgen},
    unique, NetNs, Spawned, TestCgroup,
};

const TEST: &str =
    "the_ecs_task_definition_runs_observer_healthy_and_reporting_every_task_across_restarts";
const TASK_DEFINITION: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../deploy/ecs/task-definition.json"
);
/// The container of the task definition that is observer.
const CONTAINER: &str = "observer";
/// The task definition's volume for observer's state dir.
const STATE_VOLUME: &str = "observer-state";
/// The image `cargo xtask image` builds (the manifest's); this variable names another.
const IMAGE_ENV: &str = "OBSERVER_TEST_IMAGE";
const DEFAULT_IMAGE: &str = "registry.example.com/observer/observer:0.1.0";
/// The real ECS agent's introspection address, observer's default agent URL.
const AGENT_ADDR: &str = "127.0.0.1:51678";
/// What the manifest's OBSERVER_PROMETHEUS_LISTEN binds on the host network.
const METRICS_PORT: u16 = 9435;
/// On the observer container, for finding what a failed run left.
const CLEANUP_LABEL: &str = "observer-test";
const API_KEY: &str = "deploy-ecs-mackerel-key-8d1e5b07";
const CLUSTER: &str = "deploy";
const FAMILY: &str = "deploy-web";
const VERSION: &str = "3";
const PAUSE: &str = "~internal~ecs~pause";
const INTERVAL: Duration = Duration::from_secs(2);
/// observer on the host, for `observer detach`.
const OBSERVER: &str = env!("CARGO_BIN_EXE_observer-e2e");
/// Between two batches of posts.
const BATCH_PAUSE: Duration = Duration::from_millis(500);
/// A bound on the posting loop.
const MAX_BATCHES: u64 = 200;

/// One app container and the HTTP body it posts.
struct App {
    /// Index into the tasks.
    task: usize,
    name: &'static str,
    body_bytes: u64,
    /// How many times it posted its body.
    posts: u64,
    id: String,
}

impl App {
    fn sent(&self) -> u64 {
        self.body_bytes * self.posts
    }
}

/// One fake ECS task.
struct Task {
    label: &'static str,
    id: String,
    arn: String,
    /// `--network` of its app containers, once the pause container (if any) exists.
    network: String,
    pause_id: Option<String>,
    /// Bytes TCP resent from the task's network namespace while the apps posted (an upper
    /// bound: the host namespace has other senders).
    resent_bytes: u64,
}

/// What the test made, for the check that nothing is left afterwards.
#[derive(Default)]
struct Made {
    containers: Vec<String>,
    images: Vec<String>,
    netns: Option<String>,
    host_if: Option<String>,
    task_ids: Vec<String>,
    sink_cgroup: Option<PathBuf>,
    iptables_rules: Vec<Vec<String>>,
    /// The test mounted the bpffs at /sys/fs/bpf.
    bpffs_mounted: bool,
    /// The instance's real state dir existed before the test (the test must not make it).
    node_state_existed: bool,
}

#[test]
fn the_ecs_task_definition_runs_observer_healthy_and_reporting_every_task_across_restarts() {
    if skip_unless_docker(TEST) {
        return;
    }
    let image = std::env::var(IMAGE_ENV).unwrap_or_else(|_| DEFAULT_IMAGE.to_owned());
    let present = Command::new("docker")
        .args(["image", "inspect", "--format", "{{.Id}}", &image])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !present
        && testbed::skip(
            TEST,
            &format!("image missing: run cargo xtask image ({image})"),
        )
    {
        return;
    }
    let started = Instant::now();
    let made = Mutex::new(Made {
        node_state_existed: Path::new(NODE_STATE_DIR).exists(),
        ..Made::default()
    });
    let result = catch_unwind(AssertUnwindSafe(|| scenario(&image, &made)));
    let made = made.into_inner().unwrap_or_else(|e| e.into_inner());
    let leftovers = leftovers(&made);
    eprintln!("test took {:.1?}", started.elapsed());
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

fn scenario(image: &str, made: &Mutex<Made>) {
    let record = |f: &dyn Fn(&mut Made)| f(&mut made.lock().unwrap_or_else(|e| e.into_inner()));

    // 0. The manifest, translated before anything is made: an unknown key fails here.
    let text = std::fs::read_to_string(TASK_DEFINITION)
        .unwrap_or_else(|e| panic!("{TASK_DEFINITION}: {e}"));
    let task_def: Value = serde_json::from_str(&text).expect("the task definition is JSON");
    let observer_name = unique("obs-deploy-ecs");
    // Stands in for the instance's /var/lib/observer; Docker creates the directory itself.
    let state = StateDir::new("obs-deploy-ecs-state").expect("the state dir's parent");

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let agent = rt
        .block_on(FakeEcsAgent::start_at(AGENT_ADDR))
        .unwrap_or_else(|e| {
            panic!(
                "the fake ECS agent must listen where observer's default agent URL points: {e} \
             (a real ECS agent or another test holds it: `ss -ltnp 'sport = :51678'`)"
            )
        });
    agent.set_cluster(CLUSTER);
    let mackerel = rt.block_on(FakeMackerel::start(API_KEY));
    // observer (host network) binds the manifest's metrics port: say so if it is taken.
    if let Err(e) = std::net::TcpListener::bind(("0.0.0.0", METRICS_PORT)) {
        panic!("port {METRICS_PORT} (OBSERVER_PROMETHEUS_LISTEN of the manifest) is taken: {e}");
    }

    let run = ecs_taskdef::docker_run(
        &task_def,
        CONTAINER,
        &Overrides {
            container_name: Some(observer_name.clone()),
            env: vec![
                ("MACKEREL_APIBASE".into(), mackerel.url()),
                (
                    "OBSERVER_INTERVAL".into(),
                    format!("{}s", INTERVAL.as_secs()),
                ),
                // A Mackerel period per interval: each interval reaches Mackerel at once.
                (
                    "OBSERVER_MACKEREL_INTERVAL".into(),
                    format!("{}s", INTERVAL.as_secs()),
                ),
            ],
            secrets: [("MACKEREL_APIKEY".to_owned(), API_KEY.to_owned())].into(),
            labels: vec![(CLEANUP_LABEL.into(), TEST.into())],
            ulimits: ecs_taskdef::memlock_this_engine_grants(&task_def, CONTAINER),
            volume_sources: [(STATE_VOLUME.to_owned(), state.path())].into(),
        },
    )
    .unwrap_or_else(|e| panic!("deploy/ecs/task-definition.json: {e:#}"));
    for note in &run.notes {
        eprintln!("task definition: {note}");
    }
    if image != run.image {
        eprintln!(
            "image {image} ({IMAGE_ENV}) instead of the manifest's {}",
            run.image
        );
    }

    // 1. The sink: in a namespace of its own behind a veth pair, in a test cgroup.
    let ns = NetNs::with_veth("deploy").expect("netns with veth");
    let veth = ns.veth();
    record(&|m| {
        m.netns = Some(ns.name().to_owned());
        m.host_if = Some(ns.veth().host_if.clone());
    });
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
    let sink_cgroup = TestCgroup::new("deploy-sink").expect("sink cgroup");
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
    let run_app = |task: &Task, container_name: &str| {
        let docker_name = container_name.replace(PAUSE, "pause");
        Run::new()
            .name(&unique(&format!("obs-deploy-{docker_name}")))
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
        .start(run_app(&tasks[2], PAUSE).network("bridge"))
        .expect("pause container");
    record(&|m| m.containers.push(pause.clone()));
    tasks[2].network = format!("container:{pause}");
    tasks[2].pause_id = Some(pause.clone());
    for a in &mut apps {
        let task = &tasks[a.task];
        a.id = containers
            .start(run_app(task, a.name).network(&task.network))
            .unwrap_or_else(|e| panic!("container {}: {e}", a.name));
        record(&|m| m.containers.push(a.id.clone()));
    }
    // Bodies of bytes that are not NUL (busybox wget posts strlen(file) bytes).
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

    // The task definition's bpffs volume: the host's /sys/fs/bpf, a bpffs.
    let bpffs = HostBpffs::prepare(Path::new(OBSERVER)).unwrap_or_else(|e| panic!("{e:#}"));
    record(&|m| m.bpffs_mounted = bpffs.mounted());

    // 3. observer, as the task definition runs it.
    let mut observer = ObserverContainer {
        name: observer_name.clone(),
        health_image: None,
    };
    record(&|m| m.containers.push(observer_name.clone()));
    let run_image = match &run.exec_health_check {
        // docker run cannot pass an exec-form check: an image with only that added.
        Some(check) => {
            let tag = format!("observer-deploy-test/health:{}", unique("t"));
            record(&|m| m.images.push(tag.clone()));
            build_image(&check.dockerfile(image), &tag).expect("the health-check image");
            observer.health_image = Some(tag.clone());
            tag
        }
        None => image.to_owned(),
    };
    let args = run.args_with_image(&run_image);
    eprintln!(
        "docker {}",
        args.join(" ").replace(API_KEY, "<MACKEREL_APIKEY>")
    );
    let t0 = Instant::now();
    start_observer(&args);

    let attached = observer.wait_log("attached ", Duration::from_secs(30));
    eprintln!("observer attached after {:.1?}: {attached}", t0.elapsed());
    // Its state in the host's bpffs, through the task definition's volume.
    let pinned = observer.wait_log("state pinned in ", Duration::from_secs(1));
    assert!(
        pinned.contains(&format!("state pinned in {PIN_DIR}: new programs attached")),
        "observer did not pin its state in {PIN_DIR}: {pinned}\nlog:\n{}",
        observer.logs().1
    );
    let root = attached
        .split(" at ")
        .nth(1)
        .and_then(|rest| rest.split(';').next())
        .unwrap_or_else(|| panic!("no cgroup root in {attached:?}"));
    assert!(
        Path::new(root).starts_with("/host/sys/fs/cgroup"),
        "observer attached at {root}, not at the host's cgroup v2 root under /host/sys/fs/cgroup"
    );
    // The same hierarchy the test's containers are in, as the host sees it.
    let host_root = Path::new("/").join(Path::new(root).strip_prefix("/host").unwrap());
    assert_eq!(
        host_root,
        testbed::v2_root(),
        "observer attached at another hierarchy than the host's cgroup v2 root"
    );
    wait_for("a Mackerel host per task", Duration::from_secs(30), || {
        let hosts = mackerel.hosts();
        tasks.iter().all(|t| {
            hosts
                .iter()
                .any(|h| h.custom_identifier.as_deref() == Some(&t.arn))
        })
    });
    eprintln!("a Mackerel host per task after {:.1?}", t0.elapsed());
    // The port mapping: host networking puts observer's metrics on the host's port.
    let metrics = http_get(&format!("127.0.0.1:{METRICS_PORT}"), "/metrics")
        .unwrap_or_else(|e| panic!("GET /metrics on the host's port {METRICS_PORT}: {e}"));
    assert!(
        metrics.starts_with("HTTP/1.") && metrics.contains(" 200 "),
        "/metrics on the host: {}",
        metrics.lines().next().unwrap_or("")
    );

    // 4. The traffic: every app posts its body, all at once, batch after batch from now until
    // after the second restart, so that it spans both gaps.
    let first_app = |i: usize| apps.iter().find(|a| a.task == i).expect("an app per task");
    let resent_before: Vec<u64> = (0..tasks.len())
        .map(|i| retrans_segs(&first_app(i).id))
        .collect();
    let traffic = Traffic::default();
    let traffic_started = Instant::now();
    let stop_timeout = run.stop_timeout.unwrap_or(Duration::from_secs(30));
    let (batches, later, gaps) = std::thread::scope(|s| {
        let _stop = StopTraffic(&traffic);
        let poster = s.spawn(|| {
            let posted = post_batches(&apps, &url, &traffic);
            traffic.ended.store(true, Ordering::SeqCst);
            posted
        });
        traffic.wait_more(2, "before the first restart");

        // 5. Healthy, by the task definition's health check (first run one interval after
        // start).
        let check = run
            .health_check
            .as_ref()
            .expect("the task definition has a healthCheck");
        let deadline = check.interval + check.timeout + Duration::from_secs(10);
        let healthy_after = loop {
            let status = observer.inspect("{{.State.Health.Status}}");
            match status.as_str() {
                "healthy" => break t0.elapsed(),
                "unhealthy" => panic!(
                    "the container is unhealthy: {}\nlog:\n{}",
                    observer.inspect("{{json .State.Health}}"),
                    observer.logs().1
                ),
                _ => {}
            }
            assert!(
                t0.elapsed() < deadline,
                "not healthy {deadline:?} after the start (status {status:?}): {}",
                observer.inspect("{{json .State.Health}}")
            );
            std::thread::sleep(Duration::from_millis(200));
        };
        eprintln!(
            "healthy after {healthy_after:.1?} (health check every {:?}, start period {:?}): {}",
            check.interval,
            check.start_period,
            observer.inspect("{{json .State.Health.Log}}")
        );

        // The check Docker ran is the manifest's command, in exec form.
        let test_cmd: Value =
            serde_json::from_str(&observer.inspect("{{json .Config.Healthcheck.Test}}")).unwrap();
        assert_eq!(
            test_cmd,
            serde_json::json!(check.test),
            "the container's health check is not the task definition's"
        );
        if let Some(peak) = observer.memory_peak() {
            eprintln!(
                "observer's memory peak: {:.1} MiB (the manifest's memory limit: {})",
                peak as f64 / (1024.0 * 1024.0),
                observer.inspect("{{.HostConfig.Memory}}")
            );
        }

        // 6. docker stop: SIGTERM, and an exit of its own within the stop timeout; the
        // Mackerel state is in the state volume.
        stop_gracefully(&observer, stop_timeout);
        let down = Instant::now();
        let saved_hosts = check_state(&state, &task_def, tasks.len(), "after docker stop");
        eprintln!(
            "run 1 stopped after {} batches",
            traffic.batches.load(Ordering::SeqCst)
        );

        // 7. ECS replaces a stopped essential container with a new one (not `docker
        // restart`): the same arguments under a new name. Traffic goes on in the gap.
        traffic.wait_more(2, "while no observer runs (after docker stop)");
        let second = start_again(&args, 2, made);
        let gap_stop = take_over(&second, down);
        took_up(&second, saved_hosts);

        // 8. A SIGKILL (the OOM killer, a lost instance), once the second run's last report
        // is on stdout and in Mackerel: what it counted since is only in the pinned maps.
        traffic.wait_more(3, "in the second run");
        let last = wait_delivered(&second, &mackerel, &tasks, &apps);
        std::thread::sleep(INTERVAL / 4);
        sh("docker", &["kill", "-s", "KILL", &second.name]).expect("docker kill -s KILL");
        let down = Instant::now();
        wait_for(
            "the killed container to end",
            Duration::from_secs(10),
            || second.inspect("{{.State.Running}}") == "false",
        );
        let exit = second.inspect("{{.State.ExitCode}}");
        eprintln!(
            "run 2 killed (exit code {exit}) {:?} after its report of second {last} reached \
             Mackerel, after {} batches",
            INTERVAL / 4,
            traffic.batches.load(Ordering::SeqCst)
        );
        assert_eq!(exit, "137", "docker kill -s KILL: exit code");
        let saved_hosts = check_state(&state, &task_def, tasks.len(), "after docker kill");
        traffic.wait_more(2, "while no observer runs (after docker kill)");
        let third = start_again(&args, 3, made);
        let gap_kill = take_over(&third, down);
        took_up(&third, saved_hosts);
        // Past the new run's first report, which holds the gap.
        wait_for("the third run's first report", INTERVAL * 3, || {
            third.logs().0.contains("{\"type\":\"observer\"")
        });
        traffic.wait_more(3, "after the third run's first report");
        traffic.stop.store(true, Ordering::SeqCst);
        let batches = poster
            .join()
            .expect("the posting thread")
            .unwrap_or_else(|e| panic!("posting: {e:#}"));
        (batches, [second, third], [gap_stop, gap_kill])
    });
    let [second, third] = later;
    let mut got: Vec<u64> = (0..apps.len() as u64 * batches)
        .map(|_| sink.expect("got ").unwrap().parse().unwrap())
        .collect();
    let mut want: Vec<u64> = apps
        .iter()
        .flat_map(|a| std::iter::repeat_n(a.body_bytes, batches as usize))
        .collect();
    got.sort_unstable();
    want.sort_unstable();
    assert_eq!(got, want, "the sink received every body whole");
    eprintln!(
        "traffic: {batches} batches in {:.1?}; observer down {:.1?} (docker stop) and {:.1?} \
         (docker kill -s KILL) until the next run took over",
        traffic_started.elapsed(),
        gaps[0],
        gaps[1]
    );
    for (i, t) in tasks.iter_mut().enumerate() {
        let segs = retrans_segs(&first_app(i).id).saturating_sub(resent_before[i]);
        t.resent_bytes = segs * SEGMENT_BYTES;
        eprintln!(
            "task {}: {segs} TCP segments resent in its namespace",
            t.label
        );
    }
    for a in &mut apps {
        a.posts = batches;
    }

    // Two more intervals after the traffic, so it is reported; then the last run stops.
    std::thread::sleep(INTERVAL * 2 + Duration::from_secs(1));
    stop_gracefully(&third, stop_timeout);

    // 9. The JSON lines on stdout of all three runs, then Mackerel.
    let runs = [&observer, &second, &third];
    let mut lines: Vec<Value> = Vec::new();
    for (n, r) in runs.iter().enumerate() {
        let (stdout, log) = r.logs();
        for line in log.lines() {
            if line.contains(" WARN ") || line.contains(" ERROR ") {
                eprintln!("observer (run {}) logged: {line}", n + 1);
            }
        }
        let mine: Vec<Value> = stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect();
        let per_task: Vec<String> = tasks
            .iter()
            .map(|t| {
                let tx: u64 = mine
                    .iter()
                    .filter(|l| l["type"] == "task" && l["id"] == t.id.as_str())
                    .filter_map(|l| l["tx_bytes"].as_u64())
                    .sum();
                format!("{} {tx}", t.label)
            })
            .collect();
        // The first report of a run that took over holds the gap before it.
        let first_time = mine.iter().find(|l| l["type"] == "observer").map(|l| {
            (
                l["time"].clone(),
                l["interval_seconds"].as_f64().unwrap_or(0.0),
            )
        });
        let first: Vec<String> = first_time
            .iter()
            .flat_map(|(time, _)| {
                mine.iter()
                    .filter(move |l| l["type"] == "task" && l["time"] == *time)
                    .filter_map(|l| {
                        let t = tasks.iter().find(|t| l["id"] == t.id.as_str())?;
                        Some(format!("{} {}", t.label, l["tx_bytes"].as_u64()?))
                    })
            })
            .collect();
        eprintln!(
            "run {}: {} JSON lines; device tx per task: {}; first report ({:.2} s): {}",
            n + 1,
            mine.len(),
            per_task.join(", "),
            first_time.map_or(0.0, |(_, secs)| secs),
            first.join(", ")
        );
        lines.extend(mine);
    }
    for t in &tasks {
        let mine: Vec<&Value> = lines
            .iter()
            .filter(|l| l["type"] == "task" && l["kind"] == "ecs_task" && l["id"] == t.id.as_str())
            .collect();
        assert!(
            !mine.is_empty(),
            "no ecs_task line for the {} task {} on the container's stdout",
            t.label,
            t.id
        );
        eprintln!(
            "stdout: {} ecs_task lines for the {} task (network_mode {})",
            mine.len(),
            t.label,
            mine[mine.len() - 1]["network_mode"]
        );
    }
    let measured = check_json(&lines, &tasks, &apps);
    check_mackerel(&mackerel, &tasks, &apps, &measured);

    // 10. Uninstalled: `observer detach` removes the pins, and with them every program.
    let program_ids: Vec<String> = runs.iter().flat_map(|r| r.program_ids()).collect();
    drop((third, second, observer));
    let removed = bpffs
        .detach()
        .unwrap_or_else(|e| panic!("observer detach: {e:#}"));
    assert!(removed.contains("link_"), "observer detach: {removed}");
    assert!(
        !Path::new(PIN_DIR).exists(),
        "{PIN_DIR} is left after observer detach"
    );
    host_bpffs::check_unloaded(&program_ids).unwrap_or_else(|e| panic!("{e:#}"));
    eprintln!(
        "observer detach removed the pins; programs {} unloaded",
        program_ids.join(", ")
    );
    // The other guards go in reverse order: containers, sink, its cgroup, the namespace, the
    // bpffs.
}

/// Waits for the new run to take over the pinned programs; returns how long observer was
/// down (from `down` to its takeover).
fn take_over(run: &ObserverContainer, down: Instant) -> Duration {
    let pinned = run.wait_log("state pinned in ", Duration::from_secs(30));
    let gap = down.elapsed();
    assert!(
        pinned.contains(&format!(
            "state pinned in {PIN_DIR}: took over the programs"
        )),
        "the new container did not take over the pinned programs: {pinned}\nlog:\n{}",
        run.logs().1
    );
    run.wait_log("attached ", Duration::from_secs(10));
    eprintln!("{} took over after {gap:.1?}: {pinned}", run.name);
    gap
}

/// The state volume holds observer's Mackerel state, private to the container's user, naming
/// at least every task's host; returns how many hosts it names.
fn check_state(state: &StateDir, task_def: &Value, tasks: usize, when: &str) -> usize {
    let uid: u32 = task_def["containerDefinitions"][0]["user"]
        .as_str()
        .and_then(|u| u.split(':').next()?.parse().ok())
        .expect("the task definition's numeric user");
    let facts = state
        .check_file(uid)
        .unwrap_or_else(|e| panic!("the state volume {when}: {e:#}"));
    let saved = state.read().unwrap_or_else(|e| panic!("{e:#}"));
    let hosts = saved["hosts"].as_array().map_or(0, Vec::len);
    assert!(
        hosts >= tasks,
        "the state file {when} names {hosts} hosts, fewer than the {tasks} tasks: {saved}"
    );
    eprintln!(
        "state {when}: {MACKEREL_FILE} in the state volume, {} bytes, mode {:o} (dir {:o}), uid \
         {uid}: {hosts} hosts, {} buffered chunks, open period from {}",
        facts.file_bytes,
        facts.file_mode,
        facts.dir_mode,
        saved["buffer"].as_array().map_or(0, Vec::len),
        saved["open"]["start"]
    );
    hosts
}

/// The new container took up the hosts the state file named.
fn took_up(run: &ObserverContainer, hosts: usize) {
    let line = run.wait_log("Mackerel: took up", Duration::from_secs(10));
    assert!(
        line.contains(&format!("Mackerel: took up {hosts} hosts")),
        "{line} (the state file named {hosts} hosts)"
    );
    eprintln!("{}: {}", run.name, line.trim());
}

/// docker stop: SIGTERM, an exit 0 of its own within the stop timeout, the partial interval
/// reported and Mackerel flushed.
fn stop_gracefully(observer: &ObserverContainer, stop_timeout: Duration) {
    let stopping = Instant::now();
    sh("docker", &["stop", &observer.name]).expect("docker stop");
    let stopped_in = stopping.elapsed();
    let exit = observer.inspect("{{.State.ExitCode}} {{.State.OOMKilled}}");
    eprintln!(
        "docker stop {} took {stopped_in:.1?}; exit code, OOM killed: {exit}",
        observer.name
    );
    let (stdout, log) = observer.logs();
    assert_eq!(
        exit, "0 false",
        "observer did not exit 0 on docker stop; log:\n{log}"
    );
    assert!(
        stopped_in < stop_timeout,
        "docker stop took {stopped_in:?}, the stop timeout is {stop_timeout:?}"
    );
    assert!(
        log.contains("SIGTERM: reporting the partial interval"),
        "observer did not see SIGTERM; log:\n{log}"
    );
    assert!(
        log.contains("Mackerel: all values delivered"),
        "no complete Mackerel flush on docker stop; log:\n{log}"
    );
    assert!(
        log.contains("programs stay attached and counting"),
        "observer did not leave its programs pinned; log:\n{log}"
    );
    assert!(
        !log.contains(API_KEY) && !stdout.contains(API_KEY),
        "the API key appears in the container's output"
    );
}

/// A new observer container from `args` (the task definition's), under a new name as ECS
/// gives it.
fn start_again(args: &[String], run: usize, made: &Mutex<Made>) -> ObserverContainer {
    let name = unique(&format!("obs-deploy-ecs-run{run}"));
    made.lock()
        .unwrap_or_else(|e| e.into_inner())
        .containers
        .push(name.clone());
    let container = ObserverContainer {
        name: name.clone(),
        health_image: None,
    };
    let mut args = args.to_vec();
    let at = args
        .iter()
        .position(|a| a == "--name")
        .expect("--name in the arguments");
    args[at + 1] = name;
    start_observer(&args);
    container
}

/// `docker run` of the generated arguments.
fn start_observer(args: &[String]) {
    let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
    sh("docker", &arg_refs).unwrap_or_else(|e| {
        panic!(
            "docker run of the task definition: {}",
            e.to_string().replace(API_KEY, "<MACKEREL_APIKEY>")
        )
    });
}

/// Waits for the next report on `run`'s stdout, then for Mackerel to have the Mackerel period
/// it closed (a txBytes point for every app arriving after the report); returns its time.
fn wait_delivered(
    run: &ObserverContainer,
    mackerel: &FakeMackerel,
    tasks: &[Task],
    apps: &[App],
) -> i64 {
    let reports = || -> Vec<i64> {
        run.logs()
            .0
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|l| l["type"] == "observer")
            .filter_map(|l| unix_seconds(l["time"].as_str()?))
            .collect()
    };
    let before = reports().len();
    let mut last = 0;
    wait_for("the next report on stdout", INTERVAL * 3, || {
        let all = reports();
        last = all.last().copied().unwrap_or(0);
        all.len() > before
    });
    let seen = Instant::now();
    wait_for(
        "Mackerel to have the report for every app",
        Duration::from_secs(10),
        || {
            let hosts = mackerel.hosts();
            let points = mackerel.points();
            apps.iter().all(|a| {
                let arn = &tasks[a.task].arn;
                let metric = format!("interface.{}.txBytes.delta", a.name);
                hosts
                    .iter()
                    .filter(|h| h.custom_identifier.as_deref() == Some(arn))
                    .any(|h| {
                        points
                            .iter()
                            .any(|p| p.host_id == h.id && p.at >= seen && p.name == metric)
                    })
            })
        },
    );
    last
}

/// The posts in batches, counted.
#[derive(Default)]
struct Traffic {
    batches: AtomicU64,
    stop: AtomicBool,
    ended: AtomicBool,
}

impl Traffic {
    /// Waits for `n` more batches to be posted whole.
    fn wait_more(&self, n: u64, when: &str) {
        let target = self.batches.load(Ordering::SeqCst) + n;
        wait_for(
            &format!("{n} batches of posts {when}"),
            Duration::from_secs(60),
            || self.batches.load(Ordering::SeqCst) >= target || self.ended.load(Ordering::SeqCst),
        );
        assert!(
            self.batches.load(Ordering::SeqCst) >= target,
            "the posts ended {when} (see the error after this one)"
        );
    }
}

/// Stops the posts when dropped, also when the test fails.
struct StopTraffic<'a>(&'a Traffic);

impl Drop for StopTraffic<'_> {
    fn drop(&mut self) {
        self.0.stop.store(true, Ordering::SeqCst);
    }
}

/// Every app posts its body at once, batch after batch, until `traffic.stop`; returns the
/// number of batches, each posted whole by every app.
fn post_batches(apps: &[App], url: &str, traffic: &Traffic) -> anyhow::Result<u64> {
    let mut batches = 0;
    while !traffic.stop.load(Ordering::SeqCst) {
        anyhow::ensure!(batches < MAX_BATCHES, "{MAX_BATCHES} batches and no stop");
        let posts: Vec<(&App, Child)> = apps
            .iter()
            .map(|a| {
                let child = Command::new("docker")
                    .args(["exec", &a.id, "wget", "-q", "-O", "/dev/null"])
                    .args(["--post-file", "/tmp/body", url])
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("docker exec");
                (a, child)
            })
            .collect();
        for (a, child) in posts {
            let out = wait_child(child, Duration::from_secs(60))
                .map_err(|e| anyhow::anyhow!("{} posting: {e}", a.name))?;
            anyhow::ensure!(
                out.status.success(),
                "{} posting: {}",
                a.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        batches += 1;
        traffic.batches.store(batches, Ordering::SeqCst);
        std::thread::sleep(BATCH_PAUSE);
    }
    Ok(batches)
}

/// The observer container (and the image made for its health check): removed when dropped.
struct ObserverContainer {
    name: String,
    health_image: Option<String>,
}

impl ObserverContainer {
    /// `docker inspect --format`, trimmed; empty when it fails.
    fn inspect(&self, format: &str) -> String {
        sh("docker", &["inspect", "--format", format, &self.name])
            .map(|s| s.trim().to_owned())
            .unwrap_or_default()
    }

    /// stdout and stderr of the container so far.
    fn logs(&self) -> (String, String) {
        let out = Command::new("docker")
            .args(["logs", &self.name])
            .output()
            .expect("docker logs");
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// The container's peak memory use so far (cgroup v1 max_usage or v2 memory.peak).
    fn memory_peak(&self) -> Option<u64> {
        let id = self.inspect("{{.Id}}");
        let parent = self.inspect("{{.HostConfig.CgroupParent}}");
        let parent = if parent.is_empty() {
            "docker".to_owned()
        } else {
            parent
        };
        let parent = parent.trim_matches('/');
        [
            format!("/sys/fs/cgroup/memory/{parent}/{id}/memory.max_usage_in_bytes"),
            format!("/sys/fs/cgroup/{parent}/{id}/memory.peak"),
            format!("/sys/fs/cgroup/system.slice/docker-{id}.scope/memory.peak"),
        ]
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok()?.trim().parse().ok())
    }

    /// The ids of the programs its "attached" log line names.
    fn program_ids(&self) -> Vec<String> {
        host_bpffs::program_ids(&self.logs().1)
    }

    /// The first log line containing `needle`; fails early if the container stopped.
    fn wait_log(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let (_, log) = self.logs();
            if let Some(line) = log.lines().find(|l| l.contains(needle)) {
                return line.to_owned();
            }
            let running = self.inspect("{{.State.Running}}");
            assert!(
                running == "true",
                "the observer container stopped ({}) before logging {needle:?}; log:\n{log}",
                self.inspect("{{.State.Status}} exit {{.State.ExitCode}} {{.State.Error}}")
            );
            assert!(
                Instant::now() < deadline,
                "observer did not log {needle:?} within {timeout:?}; log:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for ObserverContainer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let (stdout, log) = self.logs();
            let tail: Vec<&str> = stdout.lines().rev().take(5).collect();
            eprintln!("observer container log:\n{log}\nlast stdout lines: {tail:#?}");
        }
        if let Err(e) = sh("docker", &["rm", "-f", &self.name]) {
            eprintln!("cleanup: {e}");
        }
        if let Some(tag) = &self.health_image {
            if let Err(e) = sh("docker", &["rmi", tag]) {
                eprintln!("cleanup: {e}");
            }
        }
    }
}

/// `docker build -t tag -` of a Dockerfile without a context.
fn build_image(dockerfile: &str, tag: &str) -> anyhow::Result<()> {
    let mut child = Command::new("docker")
        .args(["build", "--quiet", "--tag", tag, "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(dockerfile.as_bytes())?;
    let out = wait_child(child, Duration::from_secs(60))?;
    anyhow::ensure!(
        out.status.success(),
        "docker build of\n{dockerfile}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// A plain HTTP/1.0 GET; the whole answer.
fn http_get(addr: &str, path: &str) -> anyhow::Result<String> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    Ok(answer)
}

fn app(task: usize, name: &'static str, body_bytes: u64) -> App {
    App {
        task,
        name,
        body_bytes,
        posts: 0,
        id: String::new(),
    }
}

fn sent_by(apps: &[App], task: usize) -> u64 {
    apps.iter().filter(|a| a.task == task).map(App::sent).sum()
}

/// Checks the task lines; returns the device tx measured per task id, summed over intervals.
fn check_json(lines: &[Value], tasks: &[Task], apps: &[App]) -> BTreeMap<String, u64> {
    let task_lines: Vec<&Value> = lines
        .iter()
        .filter(|l| l["type"] == "task" && l["kind"] == "ecs_task")
        .filter(|l| tasks.iter().any(|t| l["id"] == t.id.as_str()))
        .collect();
    assert!(!task_lines.is_empty(), "no ecs_task lines for our tasks");

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

    eprintln!("per task: sent (bodies) vs measured device tx (JSON lines of docker logs):");
    for (i, t) in tasks.iter().enumerate() {
        let sent = sent_by(apps, i);
        let got = task_tx.get(&t.id).copied().unwrap_or(0);
        eprintln!(
            "  {:<6} sent {sent:>8}  measured {got:>8}  ({:+.3}%, {} resent bytes allowed)",
            t.label,
            (got as f64 / sent as f64 - 1.0) * 100.0,
            t.resent_bytes
        );
    }
    for (i, t) in tasks.iter().enumerate() {
        let sent = sent_by(apps, i);
        let got = task_tx.get(&t.id).copied().unwrap_or(0);
        assert!(
            within(got as f64, sent as f64, t.resent_bytes),
            "task {} ({}): measured tx {got} is not within 2% (+{} resent) above the {sent} bytes it posted",
            t.label,
            t.id,
            t.resent_bytes
        );
    }
    for app in apps {
        let got = container_tx.get(app.name).copied().unwrap_or(0);
        assert!(
            within(got as f64, app.sent() as f64, tasks[app.task].resent_bytes),
            "container {}: measured tx {got} is not within 2% (+{} resent in its namespace) above the {} bytes it posted",
            app.name,
            tasks[app.task].resent_bytes,
            app.sent()
        );
    }

    // observer in its container names cgroups as the host does: the awsvpc-like task's
    // cgroups are its three containers' (and maybe /ecs/<task> itself).
    let a = &tasks[2];
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
    eprintln!(
        "Mackerel: {} hosts, {} points ({} stored)",
        hosts.len(),
        points.len(),
        mackerel.stored().len()
    );
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
        // Each value is a rate over a whole Mackerel period (one interval here); a period
        // posted partial at a stop and whole by the next run is stored once, the later value.
        let sum = mackerel.bytes_told(&host.id, ".txBytes.delta", INTERVAL);
        let sent = sent_by(apps, i);
        eprintln!(
            "  {:<6} Mackerel sum of txBytes.delta x period {sum:>11.1}  sent {sent:>8}  \
             JSON {:>8}  ({:+.3}%)",
            t.label,
            measured[&t.id],
            (sum / sent as f64 - 1.0) * 100.0,
        );
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
        let all = sh(
            "docker",
            &["ps", "-a", "--no-trunc", "--format", "{{.ID}} {{.Names}}"],
        )
        .unwrap_or_default();
        for id in &made.containers {
            if all.lines().any(|l| l.split_whitespace().any(|w| w == id)) {
                left.push(format!("container {id}"));
            }
        }
    }
    let labelled = sh(
        "docker",
        &[
            "ps",
            "-aq",
            "--filter",
            &format!("label={CLEANUP_LABEL}={TEST}"),
        ],
    )
    .unwrap_or_default();
    left.extend(
        labelled
            .lines()
            .map(|id| format!("labelled container {id}")),
    );
    for tag in &made.images {
        let present = Command::new("docker")
            .args(["image", "inspect", tag])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if present {
            left.push(format!("image {tag}"));
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
    left.extend(host_bpffs::leftovers(made.bpffs_mounted));
    if !made.node_state_existed && Path::new(NODE_STATE_DIR).exists() {
        left.push(format!("{NODE_STATE_DIR} (the instance's real state dir)"));
    }
    if let (false, Some(host_if)) = (made.iptables_rules.is_empty(), &made.host_if) {
        let rules = sh("iptables", &["-S", "FORWARD"]).unwrap_or_default();
        for line in rules.lines().filter(|l| l.contains(host_if.as_str())) {
            left.push(format!("iptables rule {line}"));
        }
    }
    left
}
