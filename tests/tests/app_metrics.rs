//! Each task's and pod's own metrics on its own Mackerel host, end to end through the real
//! binary: real containers serving a Prometheus text page (busybox httpd), laid out as the ECS
//! agent and the kubelet lay them out, the fake ECS agent and kubelet listing their ports and
//! addresses as the real ones do, and the strict fake Mackerel.
//!
//! ECS: a bridge task whose container port 9100 is published on a port Docker picks (the
//! agent's `Ports` say which), a host-mode task, and a task whose declared port is a listener
//! that never answers. Kubernetes: a pod on Docker's bridge, annotated, reached at its pod IP.
//!
//! Needs root and dockerd; says SKIPPED otherwise. Containers and observer are removed by
//! guards, also when a test fails.

use std::{
    net::TcpListener,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context as _, Result};
use serde_json::Value;
use testbed::{
    docker::{skip_unless_docker, Containers, EcsLabels, Run},
    ecs_scenario::docker_exec,
    fake_mackerel::{FakeHost, FakeMackerel, Point},
    fake_platform::{task_arn, FakeEcsAgent, FakeKubelet, FakePod, FakeTask},
    observer_cmd::Finished,
    sh, unique, ObserverCmd,
};

const OBSERVER: &str = env!("CARGO_BIN_EXE_observer-e2e");
const API_KEY: &str = "app-metrics-key-5d2a91c4";
const CLUSTER: &str = "app-metrics-test";
/// Generous bounds of waits on a loaded machine; nothing is asserted about speed.
const WAIT: Duration = Duration::from_secs(90);

const WEB_BEFORE: &str = "# HELP web_requests Requests served.\n\
# TYPE web_requests counter\n\
web_requests_total{path=\"/api\",code=\"200\"} 100\n\
# TYPE web_temperature gauge\n\
web_temperature 21.5\n";
const WEB_AFTER: &str = "# HELP web_requests Requests served.\n\
# TYPE web_requests counter\n\
web_requests_total{path=\"/api\",code=\"200\"} 400\n\
# TYPE web_temperature gauge\n\
web_temperature 23.25\n";
const HOSTAPP: &str = "# TYPE queue_depth gauge\nqueue_depth{queue=\"mail\"} 3\n";
const POD: &str = "# TYPE api_inflight gauge\napi_inflight 12\n# EOF\n";

fn uuid() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/uuid")
        .expect("/proc/sys/kernel/random/uuid")
        .trim()
        .to_owned()
}

/// `sh -c` that writes `page` to `/www/<file>` and serves `/www` with busybox httpd on
/// `listen` (`9100` or `127.0.0.1:9100`).
fn httpd(listen: &str, file: &str, page: &str) -> Vec<String> {
    vec![
        "sh".into(),
        "-c".into(),
        format!("mkdir -p /www && printf '%s' '{page}' > /www/{file} && exec httpd -f -p {listen} -h /www"),
    ]
}

/// Replaces the page at once (a rename), so a scrape sees the old page or the new one.
fn serve(id: &str, file: &str, page: &str) -> Result<()> {
    docker_exec(
        id,
        &format!("printf '%s' '{page}' > /www/.{file} && mv /www/.{file} /www/{file}"),
        Duration::from_secs(30),
    )
}

/// A port free on loopback a moment ago.
fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

struct Task {
    id: String,
    arn: String,
    family: &'static str,
    docker_id: String,
}

impl Task {
    /// One container `app` of task family `family`, with `labels` and `run`'s own options.
    fn start(
        docker: &mut Containers,
        family: &'static str,
        labels: &[(&str, &str)],
        run: impl FnOnce(Run) -> Run,
        cmd: &[String],
    ) -> Result<Self> {
        let id = uuid().replace('-', "");
        let arn = task_arn(CLUSTER, &id);
        let mut r = Run::new()
            .name(&unique(&format!("obs-app-{family}")))
            .cgroup_parent(&format!("/ecs/{id}"))
            .ecs(&EcsLabels {
                task_arn: &arn,
                container_name: "app",
                cluster: CLUSTER,
                family,
                version: "1",
            });
        for (k, v) in labels {
            r = r.label(k, v);
        }
        let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
        let r = run(r).cmd(&cmd);
        let docker_id = docker.start(r)?;
        Ok(Self {
            id,
            arn,
            family,
            docker_id,
        })
    }

    fn fake(&self, container_port: u16, host_port: u16) -> FakeTask {
        FakeTask::running(CLUSTER, &self.id, self.family, "1")
            .container(&self.docker_id, "app")
            .port(container_port, host_port)
    }
}

fn host_by_identifier(mackerel: &FakeMackerel, ci: &str) -> Option<FakeHost> {
    mackerel
        .hosts()
        .into_iter()
        .find(|h| h.custom_identifier.as_deref() == Some(ci))
}

/// The points of `ci`'s host named `name`, oldest first.
fn points(mackerel: &FakeMackerel, ci: &str, name: &str) -> Vec<Point> {
    let Some(host) = host_by_identifier(mackerel, ci) else {
        return Vec::new();
    };
    let mut out: Vec<Point> = mackerel
        .points()
        .into_iter()
        .filter(|p| p.host_id == host.id && p.name == name)
        .collect();
    out.sort_by_key(|p| p.time);
    out
}

fn custom_names(mackerel: &FakeMackerel, ci: &str) -> Vec<String> {
    let Some(host) = host_by_identifier(mackerel, ci) else {
        return Vec::new();
    };
    let mut names: Vec<String> = mackerel
        .points()
        .into_iter()
        .filter(|p| {
            p.host_id == host.id
                && p.name.starts_with("custom.")
                && !p.name.starts_with("custom.observer.")
        })
        .map(|p| p.name)
        .collect();
    names.sort();
    names.dedup();
    names
}

fn graph_def<'a>(defs: &'a [Value], name: &str) -> Option<&'a Value> {
    defs.iter().find(|d| d["name"] == name)
}

fn start_observer(args: &[String]) -> Result<ObserverCmd> {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut observer =
        ObserverCmd::start_with_env(OBSERVER, &args, &[("MACKEREL_APIKEY", API_KEY)])?;
    tokio::task::block_in_place(|| observer.wait_log("attached", WAIT))?;
    Ok(observer)
}

fn args(platform: &[&str], mackerel: &FakeMackerel) -> Vec<String> {
    let mut args: Vec<String> = platform.iter().map(|s| s.to_string()).collect();
    args.extend(
        [
            "--interval",
            "1s",
            "--output",
            "json",
            "--mackerel-api-base",
            &mackerel.url(),
            "--mackerel-interval",
            "3s",
            "--app-metrics-timeout",
            "2s",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    args
}

async fn wait_until(what: &str, mut ok: impl FnMut() -> bool) -> Result<()> {
    let end = Instant::now() + WAIT;
    while !ok() {
        ensure!(Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

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

/// observer's own `/metrics`, waiting until the scrape errors are counted there.
async fn observer_metrics(url: &str) -> Result<String> {
    let http = reqwest::Client::builder().no_proxy().build()?;
    let end = Instant::now() + WAIT;
    loop {
        let text = http.get(url).send().await?.text().await?;
        if text.contains("cause=\"timeout\"") && text.contains("cause=\"reach\"") {
            return Ok(text);
        }
        ensure!(
            Instant::now() < end,
            "no scrape errors counted at {url}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The port Docker published `container_port` on (`docker port`: `127.0.0.1:49153`).
fn published(id: &str, container_port: u16) -> Result<u16> {
    let out = sh("docker", &["port", id, &format!("{container_port}/tcp")])?;
    let line = out.lines().next().context("docker port printed nothing")?;
    let port = line.rsplit(':').next().unwrap_or_default();
    port.trim()
        .parse()
        .with_context(|| format!("docker port printed {out:?}"))
}

/// ECS bridge (dynamic host port), host mode and a hung endpoint: each task's own samples
/// arrive on its own host, gauges as served, the counter as the rate of what changed between
/// two scrapes, names without the port, graph definitions; the hung one costs only itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_ecs_task_posts_its_own_metrics_on_its_own_host() -> Result<()> {
    const TEST: &str = "each_ecs_task_posts_its_own_metrics_on_its_own_host";
    if skip_unless_docker(TEST) {
        return Ok(());
    }
    let mackerel = FakeMackerel::start(API_KEY).await;
    let agent = FakeEcsAgent::start().await;
    agent.set_cluster(CLUSTER);
    let mut docker = Containers::new();

    // Connections queue on it and nothing ever answers.
    let hung = TcpListener::bind("127.0.0.1:0")?;
    let hung_port = hung.local_addr()?.port();
    let host_port = free_port()?;

    let web = Task::start(
        &mut docker,
        "web",
        &[
            ("ECS_PROMETHEUS_EXPORTER_PORT", "9100"),
            ("ECS_PROMETHEUS_JOB_NAME", "web"),
        ],
        // `-p 0:9100` as ECS asks for a dynamic host port, on loopback only.
        |r| r.network("bridge").arg("-p").arg("127.0.0.1::9100"),
        &httpd("9100", "metrics", WEB_BEFORE),
    )?;
    let web_port = published(&web.docker_id, 9100)?;
    let hostapp = Task::start(
        &mut docker,
        "hostapp",
        &[
            ("ECS_PROMETHEUS_EXPORTER_PORT", &host_port.to_string()),
            ("ECS_PROMETHEUS_METRICS_PATH", "/stats"),
        ],
        |r| r.network("host"),
        &httpd(&format!("127.0.0.1:{host_port}"), "stats", HOSTAPP),
    )?;
    let stuck = Task::start(
        &mut docker,
        "stuck",
        &[
            ("ECS_PROMETHEUS_EXPORTER_PORT", &hung_port.to_string()),
            ("ECS_PROMETHEUS_JOB_NAME", "stuck"),
        ],
        |r| r.network("host"),
        &["sleep".into(), "3600".into()],
    )?;
    // A path that would reach past the task's own address: refused, said once.
    let evil = Task::start(
        &mut docker,
        "evil",
        &[
            ("ECS_PROMETHEUS_EXPORTER_PORT", "9100"),
            ("ECS_PROMETHEUS_METRICS_PATH", "//169.254.169.254/latest"),
        ],
        |r| r.network("bridge").arg("-p").arg("127.0.0.1::9100"),
        &["sleep".into(), "3600".into()],
    )?;
    let evil_port = published(&evil.docker_id, 9100)?;
    agent.set_tasks(&[
        web.fake(9100, web_port),
        // Host mode: the agent repeats the task definition's mappings.
        hostapp.fake(host_port, host_port),
        stuck.fake(hung_port, hung_port),
        evil.fake(9100, evil_port),
    ]);

    let mut observer = start_observer(&args(
        &[
            "--platform",
            "ecs",
            "--ecs-agent-url",
            &agent.url(),
            "--prometheus-listen",
            "127.0.0.1:0",
        ],
        &mackerel,
    ))?;
    let metrics_url = observer
        .log_so_far()
        .iter()
        .find_map(|l| {
            let at = l.find("Prometheus endpoint on ")? + "Prometheus endpoint on ".len();
            Some(l[at..].split_whitespace().next()?.to_owned())
        })
        .context("the Prometheus endpoint's address in the log")?;
    let temperature = "custom.web.web_temperature.value";
    let requests = "custom.web.web_requests_total.200._api";
    wait_until("the web task's first scrape", || {
        !points(&mackerel, &web.arn, temperature).is_empty()
    })
    .await?;
    serve(&web.docker_id, "metrics", WEB_AFTER)?;
    wait_until("the web task's counter rate after the change", || {
        points(&mackerel, &web.arn, requests)
            .iter()
            .any(|p| p.value > 0.0)
            && !points(&mackerel, &hostapp.arn, "custom.app.queue_depth.mail").is_empty()
    })
    .await?;
    let own = observer_metrics(&metrics_url).await?;
    let done = stop(observer)?;

    // observer's own counts: the hung endpoint's timeouts, the refused declaration.
    ensure!(
        own.lines().any(|l| l.starts_with(
            r#"observer_app_scrape_errors_total{workload="stuck:1",cause="timeout"} "#
        )),
        "{own}"
    );
    ensure!(
        own.lines().any(|l| l
            .starts_with(r#"observer_app_scrape_errors_total{workload="evil:1",cause="reach"} "#)),
        "{own}"
    );
    ensure!(!own.contains("web:1"), "no errors of the good task: {own}");
    let evil_lines: Vec<&str> = done
        .log
        .lines()
        .filter(|l| {
            l.contains("Application metrics of evil:1 (app) not scraped")
                && l.contains("ECS_PROMETHEUS_METRICS_PATH")
        })
        .collect();
    ensure!(evil_lines.len() == 1, "one line:\n{}", done.log);
    ensure!(custom_names(&mackerel, &evil.arn).is_empty());

    // Gauges as served; the counter as (400 - 100) over the seconds between the two scrapes
    // (the times of the gauge's points, one per scrape).
    let gauges = points(&mackerel, &web.arn, temperature);
    ensure!(
        gauges.iter().all(|p| p.value == 21.5 || p.value == 23.25),
        "{gauges:?}"
    );
    let rates = points(&mackerel, &web.arn, requests);
    let changed: Vec<&Point> = rates.iter().filter(|p| p.value != 0.0).collect();
    ensure!(changed.len() == 1, "one scrape saw the change: {rates:?}");
    let at = changed[0].time;
    let before = gauges
        .iter()
        .map(|p| p.time)
        .filter(|t| *t < at)
        .max()
        .context("a scrape before the change")?;
    let expected = 300.0 / (at - before) as f64;
    ensure!(
        (changed[0].value - expected).abs() < 1e-9,
        "rate {} at {at}, expected {expected} (previous scrape at {before}): {rates:?}",
        changed[0].value
    );
    ensure!(
        gauges.iter().any(|p| p.time == at && p.value == 23.25),
        "the same scrape's gauge is the new one: {gauges:?}"
    );
    ensure!(
        points(&mackerel, &hostapp.arn, "custom.app.queue_depth.mail")
            .iter()
            .all(|p| p.value == 3.0),
        "host mode, prefix = container name"
    );

    // Each task's names on its own host only, none with a port in it.
    let web_names = custom_names(&mackerel, &web.arn);
    ensure!(web_names == [requests, temperature], "{web_names:?}");
    let hostapp_names = custom_names(&mackerel, &hostapp.arn);
    ensure!(
        hostapp_names == ["custom.app.queue_depth.mail"],
        "{hostapp_names:?}"
    );
    for name in web_names.iter().chain(&hostapp_names) {
        for port in [web_port, host_port, 9100] {
            ensure!(!name.contains(&port.to_string()), "{name} has port {port}");
        }
    }
    // The hung endpoint: its host has its container values, no samples, one log line.
    ensure!(
        host_by_identifier(&mackerel, &stuck.arn).is_some(),
        "{:#?}",
        mackerel.hosts()
    );
    ensure!(
        custom_names(&mackerel, &stuck.arn).is_empty(),
        "{:?}",
        custom_names(&mackerel, &stuck.arn)
    );
    let stuck_lines: Vec<&str> = done
        .log
        .lines()
        .filter(|l| {
            l.contains("Application metrics of stuck:1") && l.contains("no answer within 2s")
        })
        .collect();
    ensure!(
        stuck_lines.len() == 1,
        "one line per workload and cause:\n{}",
        done.log
    );

    let defs = mackerel.graph_defs();
    let g = graph_def(&defs, "custom.web.web_requests_total.#").context("the counter's graph")?;
    ensure!(
        g["metrics"][0]["name"] == "custom.web.web_requests_total.#.*",
        "{g}"
    );
    let g = graph_def(&defs, "custom.web.web_temperature").context("the gauge's graph")?;
    ensure!(g["metrics"][0]["name"] == temperature, "{g}");
    ensure!(
        graph_def(&defs, "custom.app.queue_depth").is_some(),
        "{defs:#?}"
    );
    let web_defs = defs
        .iter()
        .filter(|d| d["name"] == "custom.web.web_temperature")
        .count();
    ensure!(web_defs == 1, "graph definitions once: {defs:#?}");
    drop(hung);
    Ok(())
}

/// Kubernetes: an annotated pod is scraped at its pod IP (a container on Docker's bridge), and
/// named by its Deployment; an unannotated one is not scraped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_annotated_pod_posts_its_own_metrics_on_its_host() -> Result<()> {
    const TEST: &str = "an_annotated_pod_posts_its_own_metrics_on_its_host";
    if skip_unless_docker(TEST) {
        return Ok(());
    }
    let mackerel = FakeMackerel::start(API_KEY).await;
    let kubelet = FakeKubelet::start().await;
    let mut docker = Containers::new();
    let mut pods = Vec::new();
    for name in ["api-7d9c5b8f4-abcde", "quiet-5d78c9869d-xyz12"] {
        let uid = uuid();
        let id = docker.start(
            Run::new()
                .name(&unique(&format!("k8s_app_{name}")))
                .cgroup_parent(&format!("/kubepods/burstable/pod{uid}"))
                .label("io.kubernetes.pod.name", name)
                .label("io.kubernetes.pod.namespace", "shop")
                .label("io.kubernetes.pod.uid", &uid)
                .label("io.kubernetes.container.name", "app")
                .label("io.kubernetes.docker.type", "container")
                .network("bridge")
                .cmd(
                    &httpd("9102", "metrics", POD)
                        .iter()
                        .map(String::as_str)
                        .collect::<Vec<_>>(),
                ),
        )?;
        let ip = sh(
            "docker",
            &["inspect", "-f", "{{.NetworkSettings.IPAddress}}", &id],
        )?
        .trim()
        .to_owned();
        ensure!(!ip.is_empty(), "no bridge address for {id}");
        pods.push((uid, name, id, ip));
    }
    let fake = |(uid, name, id, ip): &(String, &str, String, String)| {
        let hash = name.split('-').nth(1).unwrap_or_default();
        let deployment = name.split('-').next().unwrap_or_default();
        FakePod::running(uid, "shop", name)
            .label("pod-template-hash", hash)
            .owned_by("ReplicaSet", &format!("{deployment}-{hash}"))
            .container("app", &format!("docker://{id}"))
            .pod_ip(ip)
    };
    kubelet.set_pods(&[
        fake(&pods[0])
            .annotation("prometheus.io/scrape", "true")
            .annotation("prometheus.io/port", "9102"),
        fake(&pods[1]),
    ]);
    let observer = start_observer(&args(
        &["--platform", "kubernetes", "--kubelet-url", &kubelet.url()],
        &mackerel,
    ))?;
    let api = format!("{}.kubernetes", pods[0].0);
    let quiet = format!("{}.kubernetes", pods[1].0);
    wait_until("the api pod's samples and the quiet pod's host", || {
        !points(&mackerel, &api, "custom.api.api_inflight.value").is_empty()
            && host_by_identifier(&mackerel, &quiet).is_some()
    })
    .await?;
    // Two more periods: what the quiet pod would have had, it would have by then.
    tokio::time::sleep(Duration::from_secs(6)).await;
    stop(observer)?;

    let inflight = points(&mackerel, &api, "custom.api.api_inflight.value");
    ensure!(inflight.iter().all(|p| p.value == 12.0), "{inflight:?}");
    ensure!(
        custom_names(&mackerel, &api) == ["custom.api.api_inflight.value"],
        "{:?}",
        custom_names(&mackerel, &api)
    );
    ensure!(
        custom_names(&mackerel, &quiet).is_empty(),
        "not annotated, not scraped: {:?}",
        custom_names(&mackerel, &quiet)
    );
    let defs = mackerel.graph_defs();
    ensure!(
        graph_def(&defs, "custom.api.api_inflight").is_some(),
        "{defs:#?}"
    );
    Ok(())
}
