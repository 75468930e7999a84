//! No mass retirement: the ECS agent answers an empty task list (`{"Tasks":null}`, as an agent
//! that just restarted does) while the tasks' containers still run. For many grace periods
//! their Mackerel hosts stay and keep getting values; once the containers really stop, the
//! hosts are retired, each once. Real containers, the fake ECS agent, the strict fake Mackerel.

use std::time::{Duration, Instant};

use testbed::{
    docker::{skip_unless_docker, Containers},
    ecs_scenario::{wait_for, SleepingTask},
    fake_mackerel::FakeMackerel,
    fake_platform::FakeEcsAgent,
    ObserverCmd,
};

const OBSERVER: &str = env!("CARGO_BIN_EXE_observer-e2e");
const API_KEY: &str = "retirement-mackerel-key-77a0";
const CLUSTER: &str = "retirement";
const INTERVAL: Duration = Duration::from_secs(1);
/// `--retire-after` in intervals.
const GRACE: u32 = 2;

#[test]
fn an_empty_task_list_while_tasks_run_retires_nothing_until_they_stop() {
    const TEST: &str = "an_empty_task_list_while_tasks_run_retires_nothing_until_they_stop";
    if skip_unless_docker(TEST) {
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _guard = rt.enter();
    let mackerel = rt.block_on(FakeMackerel::start(API_KEY));
    let agent = rt.block_on(FakeEcsAgent::start());
    agent.set_cluster(CLUSTER);
    let mut containers = Containers::new();
    let tasks: Vec<SleepingTask> = (0..2)
        .map(|_| SleepingTask::start(&mut containers, CLUSTER).expect("docker run"))
        .collect();
    let arns: Vec<String> = tasks.iter().map(|t| t.arn.clone()).collect();
    agent.set_tasks(
        &tasks
            .iter()
            .map(|t| t.listed(CLUSTER, "retirement"))
            .collect::<Vec<_>>(),
    );
    let (agent_url, mackerel_url) = (agent.url(), mackerel.url());
    let grace = GRACE.to_string();
    let mut observer = ObserverCmd::start_with_env(
        OBSERVER,
        &[
            "--platform",
            "ecs",
            "--ecs-agent-url",
            &agent_url,
            "--interval",
            "1s",
            "--mackerel-interval",
            "1s",
            "--retire-after",
            &grace,
            "--output",
            "json",
            "--mackerel-api-base",
            &mackerel_url,
        ],
        &[("MACKEREL_APIKEY", API_KEY)],
    )
    .expect("start observer");
    observer
        .wait_log("attached", Duration::from_secs(30))
        .unwrap();
    let host_ids = || -> Vec<String> {
        mackerel
            .hosts()
            .into_iter()
            .filter(|h| {
                arns.iter()
                    .any(|a| h.custom_identifier.as_deref() == Some(a))
            })
            .map(|h| h.id)
            .collect()
    };
    wait_for("a host per task", Duration::from_secs(30), || {
        host_ids().len() == 2
    });
    let ids = host_ids();

    // The agent forgets its tasks; their containers run on. Ten grace periods pass.
    agent.set_tasks(&[]);
    let emptied = Instant::now();
    std::thread::sleep(INTERVAL * GRACE * 10);
    assert!(
        mackerel.retirements().is_empty(),
        "hosts retired while their tasks ran: {:?}",
        mackerel.retirements()
    );
    let points = mackerel.points();
    for id in &ids {
        let during = points
            .iter()
            .filter(|p| &p.host_id == id && p.at > emptied + INTERVAL * 2)
            .count();
        assert!(
            during > 0,
            "host {id} got no value while the agent listed nothing"
        );
    }
    let log = observer.log_so_far().join("\n");
    assert!(
        log.contains("listed no tasks while"),
        "the empty answer was not taken for an outage:\n{log}"
    );

    // Now they really stop: their hosts go, each once.
    for t in &tasks {
        containers.remove(&t.docker_id).unwrap();
    }
    let stopped = Instant::now();
    wait_for("both hosts retired", Duration::from_secs(30), || {
        mackerel
            .hosts()
            .iter()
            .filter(|h| ids.contains(&h.id))
            .all(|h| h.retired)
    });
    eprintln!(
        "empty task list for {:?}: nothing retired; retired {:?} after the containers stopped",
        stopped.duration_since(emptied),
        mackerel
            .retirements()
            .iter()
            .map(|r| r.at.duration_since(stopped))
            .collect::<Vec<_>>()
    );
    observer.signal(libc::SIGTERM);
    let done = observer.finish(Duration::from_secs(20)).unwrap();
    assert!(done.status.success(), "{}", done.log);
    for id in &ids {
        assert_eq!(
            mackerel.count("POST", &format!("/api/v0/hosts/{id}/retire")),
            1,
            "host {id}"
        );
    }
}
