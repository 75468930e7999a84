//! Hosts a node left behind: observer A makes the hosts of its two tasks and is SIGKILLed, and
//! its tasks end, so nobody retires their hosts. Observers B and P (other nodes of the same
//! cluster, each with its own fake ECS agent) retire them once the node has been silent for
//! `--mackerel-retire-silent-after`, each host once in all, and leave alone the host of P's
//! own task, which still posts. Real containers and traffic counters, the strict fake
//! Mackerel; every observer finds hosts by role, never by listing the organisation.

use std::time::{Duration, Instant};

use testbed::{
    docker::{skip_unless_docker, Containers},
    ecs_scenario::{wait_for, SleepingTask},
    fake_mackerel::FakeMackerel,
    fake_platform::FakeEcsAgent,
    ObserverCmd,
};

const OBSERVER: &str = env!("CARGO_BIN_EXE_observer-e2e");
const API_KEY: &str = "orphans-mackerel-key-9c1e";
const CLUSTER: &str = "orphans";
const ROLES: &str = "orphans:task";
const SILENT: Duration = Duration::from_secs(10);

fn observer(
    node: &str,
    agent: &FakeEcsAgent,
    mackerel: &FakeMackerel,
    silent: bool,
) -> ObserverCmd {
    let (agent_url, mackerel_url) = (agent.url(), mackerel.url());
    let silent_after = humantime::format_duration(SILENT).to_string();
    let mut args = vec![
        "--platform",
        "ecs",
        "--ecs-agent-url",
        &agent_url,
        "--interval",
        "1s",
        "--mackerel-interval",
        "1s",
        "--output",
        "json",
        "--mackerel-api-base",
        &mackerel_url,
        "--node-name",
        node,
        "--cluster-name",
        CLUSTER,
    ];
    if silent {
        args.extend(["--mackerel-retire-silent-after", &silent_after]);
    }
    ObserverCmd::start_with_env(
        OBSERVER,
        &args,
        &[("MACKEREL_APIKEY", API_KEY), ("MACKEREL_ROLES", ROLES)],
    )
    .expect("start observer")
}

fn host_id(mackerel: &FakeMackerel, arn: &str) -> Option<String> {
    mackerel
        .hosts()
        .into_iter()
        .find(|h| h.custom_identifier.as_deref() == Some(arn))
        .map(|h| h.id)
}

#[test]
fn hosts_of_a_silent_node_are_retired_by_a_peer_once_each() {
    const TEST: &str = "hosts_of_a_silent_node_are_retired_by_a_peer_once_each";
    if skip_unless_docker(TEST) {
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _guard = rt.enter();
    let mackerel = rt.block_on(FakeMackerel::start(API_KEY));
    let (agent_a, agent_b, agent_p) = rt.block_on(async {
        (
            FakeEcsAgent::start().await,
            FakeEcsAgent::start().await,
            FakeEcsAgent::start().await,
        )
    });
    for agent in [&agent_a, &agent_b, &agent_p] {
        agent.set_cluster(CLUSTER);
    }
    let mut containers = Containers::new();
    let start = |c: &mut Containers| SleepingTask::start(c, CLUSTER).expect("docker run");
    let a_tasks = [start(&mut containers), start(&mut containers)];
    let p_task = start(&mut containers);
    let listed = |t: &SleepingTask| t.listed(CLUSTER, "orphans");
    agent_a.set_tasks(&a_tasks.iter().map(listed).collect::<Vec<_>>());
    agent_p.set_tasks(&[listed(&p_task)]);

    // 1. A and P make their hosts; P watches for silent peers.
    let mut a = observer("node-a", &agent_a, &mackerel, false);
    let mut p = observer("node-p", &agent_p, &mackerel, true);
    a.wait_log("attached", Duration::from_secs(30)).unwrap();
    p.wait_log("attached", Duration::from_secs(30)).unwrap();
    wait_for(
        "hosts with values for all three tasks",
        Duration::from_secs(30),
        || {
            let points = mackerel.points();
            a_tasks.iter().chain([&p_task]).all(|t| {
                host_id(&mackerel, &t.arn).is_some_and(|id| points.iter().any(|p| p.host_id == id))
            })
        },
    );
    for h in mackerel.hosts() {
        let origin = &h.meta["cloud"]["metadata"]["observer"];
        assert_eq!(origin["cluster"], CLUSTER, "{}: meta {}", h.name, h.meta);
        assert!(
            origin["node"] == "node-a" || origin["node"] == "node-p",
            "{}",
            h.meta
        );
        assert_eq!(h.role_fullnames, [ROLES]);
    }
    let a_ids: Vec<String> = a_tasks
        .iter()
        .map(|t| host_id(&mackerel, &t.arn).unwrap())
        .collect();
    let p_id = host_id(&mackerel, &p_task.arn).unwrap();

    // 2. A dies without a word, and its tasks end: its hosts are orphans.
    a.signal(libc::SIGKILL);
    let _ = a.finish(Duration::from_secs(10));
    let killed = Instant::now();
    for t in &a_tasks {
        containers.remove(&t.docker_id).unwrap();
    }
    // 3. B, on a third node, watches too (its agent lists no task).
    let mut b = observer("node-b", &agent_b, &mackerel, true);
    b.wait_log("attached", Duration::from_secs(30)).unwrap();

    wait_for("A's hosts retired", SILENT * 4, || {
        mackerel
            .hosts()
            .iter()
            .filter(|h| a_ids.contains(&h.id))
            .all(|h| h.retired)
    });
    // One more check period of each watcher, to see any duplicate call.
    std::thread::sleep(SILENT / 2);
    let last_a_point = mackerel
        .points()
        .iter()
        .filter(|pt| a_ids.contains(&pt.host_id))
        .map(|pt| pt.at)
        .max()
        .unwrap();
    for id in &a_ids {
        let calls = mackerel.count("POST", &format!("/api/v0/hosts/{id}/retire"));
        assert_eq!(calls, 1, "host {id}: {calls} retire calls");
        let at = mackerel
            .retirements()
            .iter()
            .find(|r| &r.host_id == id)
            .unwrap()
            .at;
        assert!(
            at.duration_since(last_a_point) >= SILENT,
            "host {id} retired {:?} after A's last value arrived, before the silent period",
            at.duration_since(last_a_point)
        );
    }
    let p_host = mackerel.hosts().into_iter().find(|h| h.id == p_id).unwrap();
    assert!(!p_host.retired, "P's own host, still posting, was retired");
    assert_eq!(
        mackerel.count("POST", &format!("/api/v0/hosts/{p_id}/retire")),
        0
    );

    // Found by role: no GET of the host list without a filter.
    for r in mackerel.requests() {
        if r.method == "GET" && r.path == "/api/v0/hosts" {
            assert!(
                r.query.contains("service=") || r.query.contains("customIdentifier="),
                "an unfiltered host listing: {r:?}"
            );
        }
    }
    let (listings, latest) = mackerel.lookups();
    let watched = killed.elapsed();
    eprintln!(
        "A's {} hosts retired {:?} after the kill; {listings} role listings and {latest} latest-value queries by P and B",
        a_ids.len(),
        mackerel.retirements().iter().map(|r| r.at.duration_since(killed)).collect::<Vec<_>>()
    );
    // Each watcher looks once per quarter of the silent period, not every interval.
    let per_watcher = (watched.as_secs_f64() / (SILENT.as_secs_f64() / 4.0)).ceil() as u64 + 4;
    assert!(
        listings <= 2 * per_watcher,
        "{listings} role listings in {watched:?} by two watchers"
    );

    p.signal(libc::SIGTERM);
    b.signal(libc::SIGTERM);
    let p_log = p.finish(Duration::from_secs(20)).unwrap().log;
    let b_log = b.finish(Duration::from_secs(20)).unwrap().log;
    let retired_lines = |log: &str| {
        log.lines()
            .filter(|l| l.contains("of node node-a: no new value"))
            .count()
    };
    assert_eq!(
        retired_lines(&p_log) + retired_lines(&b_log),
        2,
        "P's log:\n{p_log}\nB's log:\n{b_log}"
    );
    assert!(!p_log.contains(API_KEY) && !b_log.contains(API_KEY));
}
