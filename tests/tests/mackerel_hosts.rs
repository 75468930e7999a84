//! Which workloads become Mackerel hosts, end to end through the real binary: real containers
//! laid out as ECS and the kubelet lay them out (Docker labels, `--cgroup-parent`), the fake
//! ECS agent or kubelet listing them, and the strict fake Mackerel. In every case the
//! workload that gets no host still shows in the JSON output: selection is Mackerel's alone.
//!
//! "Never a host" is judged after the host of a chosen workload exists and three more
//! intervals have been reported on stdout: both are made from the same reports, so a host the
//! other would have had would exist by then.
//!
//! Needs root and dockerd; says SKIPPED otherwise. Containers and observer are removed by
//! guards, also when a test fails.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _, Result};
use serde_json::Value;
use testbed::{
    docker::{skip_unless_docker, Containers, EcsLabels, Run},
    fake_mackerel::{FakeHost, FakeMackerel},
    fake_platform::{task_arn, FakeEcsAgent, FakeKubelet, FakePod, FakeTask},
    observer_cmd::Finished,
    unique, ObserverCmd,
};

const OBSERVER: &str = env!("CARGO_BIN_EXE_observer-e2e");
const API_KEY: &str = "mackerel-hosts-key-93c1e7a2";
const CLUSTER: &str = "hosts-test";
const HOST: &str = "mackerel.io/host";
/// Generous bounds of waits on a loaded machine; nothing is asserted about speed.
const WAIT: Duration = Duration::from_secs(60);

/// A random dashed UUID, as the API server gives pods.
fn uuid() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/uuid")
        .expect("/proc/sys/kernel/random/uuid")
        .trim()
        .to_owned()
}

/// An ECS task of real containers, each with the ECS agent's labels and the test's own.
struct Task {
    id: String,
    arn: String,
    family: &'static str,
    /// (task definition name, Docker id).
    containers: Vec<(&'static str, String)>,
}

impl Task {
    fn start(
        docker: &mut Containers,
        family: &'static str,
        containers: &[(&'static str, &[(&str, &str)])],
    ) -> Result<Self> {
        let id = uuid().replace('-', "");
        let arn = task_arn(CLUSTER, &id);
        let mut started = Vec::new();
        for (name, labels) in containers {
            let mut run = Run::new()
                .name(&unique(&format!("obs-hosts-{family}-{name}")))
                .cgroup_parent(&format!("/ecs/{id}"))
                .ecs(&EcsLabels {
                    task_arn: &arn,
                    container_name: name,
                    cluster: CLUSTER,
                    family,
                    version: "1",
                });
            for (k, v) in *labels {
                run = run.label(k, v);
            }
            started.push((*name, docker.start(run)?));
        }
        Ok(Self {
            id,
            arn,
            family,
            containers: started,
        })
    }

    fn fake(&self) -> FakeTask {
        let mut t = FakeTask::running(CLUSTER, &self.id, self.family, "1");
        for (name, id) in &self.containers {
            t = t.container(id, name);
        }
        t
    }
}

fn host_by_identifier(mackerel: &FakeMackerel, ci: &str) -> Option<FakeHost> {
    mackerel
        .hosts()
        .into_iter()
        .find(|h| h.custom_identifier.as_deref() == Some(ci))
}

/// observer with `args` and the Mackerel key, once its programs are attached.
fn start_observer(args: &[String], env: &[(&str, &str)]) -> Result<ObserverCmd> {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut env = env.to_vec();
    env.push(("MACKEREL_APIKEY", API_KEY));
    let mut observer = ObserverCmd::start_with_env(OBSERVER, &args, &env)?;
    tokio::task::block_in_place(|| observer.wait_log("attached", WAIT))?;
    Ok(observer)
}

fn ecs_args(agent: &FakeEcsAgent, mackerel: &FakeMackerel, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "--platform",
        "ecs",
        "--ecs-agent-url",
        &agent.url(),
        "--interval",
        "1s",
        "--output",
        "json",
        "--mackerel-api-base",
        &mackerel.url(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Waits for `ok` while the fakes keep answering (the test's thread only sleeps).
async fn wait_until(what: &str, mut ok: impl FnMut() -> bool) -> Result<()> {
    let end = Instant::now() + WAIT;
    while !ok() {
        ensure!(Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Waits until observer has reported `n` more intervals on stdout.
fn intervals(observer: &mut ObserverCmd, n: usize) -> Result<()> {
    tokio::task::block_in_place(|| {
        for _ in 0..n {
            observer.wait_stdout(r#""type":"observer""#, WAIT)?;
        }
        Ok(())
    })
}

/// SIGTERM, then the whole run; fails if observer did not exit cleanly.
fn stop(observer: ObserverCmd) -> Result<Finished> {
    observer.signal(libc::SIGTERM);
    let done = tokio::task::block_in_place(|| observer.finish(WAIT))?;
    ensure!(
        done.status.success(),
        "observer exited with {}:\n{}",
        done.status,
        done.log
    );
    ensure!(!done.log.contains(API_KEY), "the API key is in the log");
    Ok(done)
}

/// The JSON workload lines of workload `id`.
fn json_lines_of(done: &Finished, id: &str) -> Vec<Value> {
    done.stdout
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["type"] == "task" && l["id"] == id)
        .collect()
}

fn log_lines<'a>(done: &'a Finished, needles: &[&str]) -> Vec<&'a str> {
    done.log
        .lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .collect()
}

/// A task with `mackerel.io/host=true` on one container and `false` on another gets no host
/// (false wins); a task without the label gets one, with the display name and memo of its
/// labels, the status of `--mackerel-host-status-on-start`, and no values of the container
/// `--mackerel-ignore-containers` names. After a restart the found host keeps the status
/// someone gave it meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_false_wins_and_a_new_host_gets_status_display_name_and_memo() -> Result<()> {
    const TEST: &str = "host_false_wins_and_a_new_host_gets_status_display_name_and_memo";
    if skip_unless_docker(TEST) {
        return Ok(());
    }
    let mackerel = FakeMackerel::start(API_KEY).await;
    let agent = FakeEcsAgent::start().await;
    agent.set_cluster(CLUSTER);
    let mut docker = Containers::new();
    let batch = Task::start(
        &mut docker,
        "batch",
        &[("app", &[(HOST, "true")]), ("log", &[(HOST, "false")])],
    )?;
    let web = Task::start(
        &mut docker,
        "web",
        &[
            (
                "app",
                &[
                    ("mackerel.io/display-name", "Web frontend"),
                    ("mackerel.io/memo", "owned by team web"),
                ],
            ),
            ("sidecar", &[]),
        ],
    )?;
    agent.set_tasks(&[batch.fake(), web.fake()]);
    let args = ecs_args(
        &agent,
        &mackerel,
        &[
            "--mackerel-host-status-on-start",
            "standby",
            "--mackerel-ignore-containers",
            "^sidecar$",
            // Values go out when a Mackerel interval closes: at the default minute the first
            // can come later than the wait, whatever second of the minute the test starts at.
            "--mackerel-interval",
            "5s",
        ],
    );
    let mut observer = start_observer(&args, &[])?;
    wait_until("the web task's host and its values", || {
        host_by_identifier(&mackerel, &web.arn).is_some_and(|h| {
            mackerel
                .points()
                .iter()
                .any(|p| p.host_id == h.id && p.name == "container.cpu.app.usage")
        })
    })
    .await?;
    intervals(&mut observer, 3)?;
    let done = stop(observer)?;

    ensure!(
        host_by_identifier(&mackerel, &batch.arn).is_none(),
        "a task with {HOST}=false on one container got a host: {:#?}",
        mackerel.hosts()
    );
    ensure!(mackerel.hosts().len() == 1, "{:#?}", mackerel.hosts());
    let host = host_by_identifier(&mackerel, &web.arn).context("the web host")?;
    ensure!(
        host.display_name.as_deref() == Some("Web frontend"),
        "{host:#?}"
    );
    ensure!(
        host.memo.as_deref() == Some("owned by team web"),
        "{host:#?}"
    );
    ensure!(host.status == "standby", "{host:#?}");
    ensure!(
        mackerel.statuses() == [(host.id.clone(), "standby".to_owned())],
        "one status call, for the created host: {:?}",
        mackerel.statuses()
    );
    let sidecar_points: Vec<String> = mackerel
        .points()
        .into_iter()
        .filter(|p| p.host_id == host.id && p.name.contains("sidecar"))
        .map(|p| p.name)
        .collect();
    ensure!(
        sidecar_points.is_empty(),
        "ignored container's values: {sidecar_points:?}"
    );
    ensure!(
        host.meta["cloud"]["metadata"]["containers"] == serde_json::json!(["app"]),
        "{:#}",
        host.meta
    );

    // Not a host, still in the JSON output, both containers; the ignored container too.
    let lines = json_lines_of(&done, &batch.id);
    ensure!(
        !lines.is_empty(),
        "the batch task is missing from the JSON output"
    );
    ensure!(
        lines[0]["containers"].as_array().map(Vec::len) == Some(2),
        "{}",
        lines[0]
    );
    let web_lines = json_lines_of(&done, &web.id);
    let names: Vec<&str> = web_lines
        .first()
        .and_then(|l| l["containers"].as_array())
        .map(|cs| cs.iter().filter_map(|c| c["name"].as_str()).collect())
        .unwrap_or_default();
    ensure!(
        names.contains(&"sidecar"),
        "JSON containers of web: {names:?}"
    );

    // Someone puts the host in maintenance; a restarted observer finds it and leaves it so.
    let (status, body) = mackerel
        .raw(
            "POST",
            &format!("/api/v0/hosts/{}/status", host.id),
            Some(API_KEY),
            Some(r#"{"status":"maintenance"}"#),
        )
        .await;
    ensure!(status == 200, "{body}");
    let updates = host.updates;
    let mut observer = start_observer(&args, &[])?;
    wait_until("the found host's update", || {
        host_by_identifier(&mackerel, &web.arn).is_some_and(|h| h.updates > updates)
    })
    .await?;
    intervals(&mut observer, 2)?;
    stop(observer)?;
    let host = host_by_identifier(&mackerel, &web.arn).context("the web host")?;
    ensure!(host.status == "maintenance", "{host:#?}");
    ensure!(mackerel.statuses().len() == 2, "{:?}", mackerel.statuses());
    ensure!(mackerel.hosts().len() == 1, "{:#?}", mackerel.hosts());
    // An update carries the display name and memo too.
    ensure!(
        host.display_name.as_deref() == Some("Web frontend"),
        "{host:#?}"
    );
    Ok(())
}

/// `--mackerel-hosts opt-in`: only the task marked `true` gets a host; an unmarked task and one
/// marked with neither true nor false get none, the latter warned about once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opt_in_makes_hosts_only_of_workloads_marked_true() -> Result<()> {
    const TEST: &str = "opt_in_makes_hosts_only_of_workloads_marked_true";
    if skip_unless_docker(TEST) {
        return Ok(());
    }
    let mackerel = FakeMackerel::start(API_KEY).await;
    let agent = FakeEcsAgent::start().await;
    agent.set_cluster(CLUSTER);
    let mut docker = Containers::new();
    let marked = Task::start(&mut docker, "marked", &[("app", &[(HOST, "true")])])?;
    let plain = Task::start(&mut docker, "plain", &[("app", &[])])?;
    let odd = Task::start(&mut docker, "odd", &[("app", &[(HOST, "maybe")])])?;
    agent.set_tasks(&[marked.fake(), plain.fake(), odd.fake()]);
    let args = ecs_args(&agent, &mackerel, &["--mackerel-hosts", "opt-in"]);
    let mut observer = start_observer(&args, &[])?;
    wait_until("the marked task's host", || {
        host_by_identifier(&mackerel, &marked.arn).is_some()
    })
    .await?;
    intervals(&mut observer, 3)?;
    let done = stop(observer)?;

    let hosts = mackerel.hosts();
    ensure!(
        hosts.len() == 1,
        "only the marked task is a host: {hosts:#?}"
    );
    for t in [&plain, &odd] {
        ensure!(
            !json_lines_of(&done, &t.id).is_empty(),
            "task {} is missing from the JSON output",
            t.family
        );
    }
    let warned = log_lines(&done, &[HOST, &odd.id, "\"maybe\""]);
    ensure!(
        warned.len() == 1,
        "{} warnings about the odd label, not one:\n{}",
        warned.len(),
        done.log
    );
    ensure!(
        log_lines(&done, &[HOST, &plain.id]).is_empty(),
        "an unmarked task is not warned about:\n{}",
        done.log
    );
    Ok(())
}

/// A pod of the kubelet laid out with real containers (`/kubepods/burstable/pod<uid>`).
struct TestPod {
    uid: String,
    namespace: &'static str,
    name: String,
    container: String,
}

impl TestPod {
    fn start(docker: &mut Containers, namespace: &'static str, name: &str) -> Result<Self> {
        let uid = uuid();
        let container = docker.start(
            Run::new()
                .name(&unique(&format!("k8s_app_{name}")))
                .cgroup_parent(&format!("/kubepods/burstable/pod{uid}"))
                .label("io.kubernetes.pod.name", name)
                .label("io.kubernetes.pod.namespace", namespace)
                .label("io.kubernetes.pod.uid", &uid)
                .label("io.kubernetes.container.name", "app")
                .label("io.kubernetes.docker.type", "container"),
        )?;
        Ok(Self {
            uid,
            namespace,
            name: name.to_owned(),
            container,
        })
    }

    fn fake(&self) -> FakePod {
        FakePod::running(&self.uid, self.namespace, &self.name)
            .owned_by("ReplicaSet", &format!("{}-rs", self.name))
            .container("app", &format!("docker://{}", self.container))
    }
}

/// Kubernetes: a pod of an excluded namespace gets no host; a pod whose `mackerel.io/roles`
/// names a service outside `--mackerel-allowed-roles` gets its host without that role (and
/// with the allowed one and the operator's MACKEREL_ROLES), said in one log line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filtered_namespace_gets_no_host_and_a_forbidden_role_is_refused() -> Result<()> {
    const TEST: &str = "a_filtered_namespace_gets_no_host_and_a_forbidden_role_is_refused";
    if skip_unless_docker(TEST) {
        return Ok(());
    }
    let mackerel = FakeMackerel::start(API_KEY).await;
    let kubelet = FakeKubelet::start().await;
    let mut docker = Containers::new();
    let web = TestPod::start(&mut docker, "shop", "web-7d9c5b8f4-abcde")?;
    let dns = TestPod::start(&mut docker, "kube-system", "coredns-5d78c9869d-xyz12")?;
    kubelet.set_pods(&[
        web.fake()
            .annotation("mackerel.io/roles", "shop:web,billing:db"),
        dns.fake(),
    ]);
    let args: Vec<String> = [
        "--platform",
        "kubernetes",
        "--kubelet-url",
        &kubelet.url(),
        "--interval",
        "1s",
        "--output",
        "json",
        "--mackerel-api-base",
        &mackerel.url(),
        "--mackerel-exclude-namespaces",
        "kube-system",
        "--mackerel-allowed-roles",
        "shop:*",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut observer = start_observer(&args, &[("MACKEREL_ROLES", "base:node")])?;
    let web_ci = format!("{}.kubernetes", web.uid);
    wait_until("the web pod's host", || {
        host_by_identifier(&mackerel, &web_ci).is_some()
    })
    .await?;
    intervals(&mut observer, 3)?;
    let done = stop(observer)?;

    let hosts = mackerel.hosts();
    ensure!(hosts.len() == 1, "no host for kube-system: {hosts:#?}");
    let host = &hosts[0];
    ensure!(host.custom_identifier.as_deref() == Some(web_ci.as_str()));
    ensure!(
        host.role_fullnames == ["base:node", "shop:web"],
        "roles: {:?}",
        host.role_fullnames
    );
    let refused = log_lines(&done, &["refused", "billing:db", &web.name]);
    ensure!(
        refused.len() == 1,
        "{} lines about the refused role, not one:\n{}",
        refused.len(),
        done.log
    );
    ensure!(
        !json_lines_of(&done, &dns.uid).is_empty(),
        "the kube-system pod is missing from the JSON output"
    );
    Ok(())
}

/// The fake takes display names, memos and statuses as the API does, and refuses what it
/// refuses: a status that is not one of the four, a display name that is not a string.
#[tokio::test]
async fn the_fake_checks_display_names_memos_and_statuses() {
    let server = FakeMackerel::start(API_KEY).await;
    let create = r#"{"name":"h1","displayName":"Web","memo":"m","meta":{}}"#;
    let (status, body) = server
        .raw("POST", "/api/v0/hosts", Some(API_KEY), Some(create))
        .await;
    assert_eq!(status, 200, "{body}");
    let id = serde_json::from_str::<Value>(&body).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let h = &server.hosts()[0];
    assert_eq!(
        (h.display_name.as_deref(), h.memo.as_deref()),
        (Some("Web"), Some("m"))
    );
    let (status, _) = server
        .raw(
            "POST",
            "/api/v0/hosts",
            Some(API_KEY),
            Some(r#"{"name":"h2","displayName":7,"meta":{}}"#),
        )
        .await;
    assert_eq!(status, 400);
    let path = format!("/api/v0/hosts/{id}/status");
    for (body, want) in [
        (r#"{"status":"standby"}"#, 200),
        (r#"{"status":"sleeping"}"#, 400),
        (r#"{"status":"Working"}"#, 400),
        (r#"{}"#, 400),
        (r#"{"status":"poweroff"}"#, 200),
    ] {
        let (status, answer) = server.raw("POST", &path, Some(API_KEY), Some(body)).await;
        assert_eq!(status, want, "{body}: {answer}");
    }
    assert_eq!(
        server.statuses(),
        [
            (id.clone(), "standby".to_owned()),
            (id.clone(), "poweroff".to_owned())
        ]
    );
    assert_eq!(server.hosts()[0].status, "poweroff");
    let (status, _) = server
        .raw(
            "POST",
            "/api/v0/hosts/nope/status",
            Some(API_KEY),
            Some(r#"{"status":"working"}"#),
        )
        .await;
    assert_eq!(status, 404);
}
