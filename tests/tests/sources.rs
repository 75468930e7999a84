//! The platform sources against fake ECS agent and kubelet servers, and against the real
//! dockerd of this machine: what they list, how failures keep the last good inventory (stale,
//! logged once, retried with backoff), bearer tokens and TLS, and auto-detection.
//!
//! Docker tests need root and a running dockerd (`cargo xtask setup`); they say SKIPPED
//! otherwise.

use std::{
    path::PathBuf,
    sync::{Mutex, Once},
    time::Duration,
};

use observer::{
    defaults,
    inventory::{
        detect::detect,
        docker::{DockerClient, DockerSource},
        ecs::EcsSource,
        kubernetes::KubeletSource,
        refresh::{RefreshConfig, Refresher},
        sources::{self, Platform, PlatformEnv, SourceConfig},
        Inventory, InventorySource, NetworkMode, WorkloadKind,
    },
};
use testbed::{
    docker::{skip_unless_docker, Containers, EcsLabels, Run},
    fake_platform::{task_arn, FakeEcsAgent, FakeKubelet, FakePod, FakeTask, Mode},
    unique, TestCgroup,
};
use tokio::time::Instant;

// ---------------------------------------------------------------------------------------------
// Captured log lines, to check that an outage is logged once.

struct Capture;

static LINES: Mutex<Vec<(log::Level, String)>> = Mutex::new(Vec::new());

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        let line = record.args().to_string();
        LINES
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((record.level(), line));
    }
    fn flush(&self) {}
}

fn capture_logs() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        log::set_logger(&Capture).expect("no other logger");
        log::set_max_level(log::LevelFilter::Debug);
    });
}

/// Log lines at `level` that contain `needle` (tests run in parallel: the needle is a URL
/// only one test uses).
fn logged(level: log::Level, needle: &str) -> Vec<String> {
    LINES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter(|(l, line)| *l == level && line.contains(needle))
        .map(|(_, line)| line.clone())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Helpers

const S: Duration = Duration::from_secs(1);
/// Per request; the slow fake sleeps well past it.
const TIMEOUT: Duration = Duration::from_millis(300);

fn config() -> SourceConfig {
    SourceConfig {
        timeout: TIMEOUT,
        docker_socket: "/nonexistent/docker.sock".into(),
        ..SourceConfig::new(PlatformEnv::default())
    }
}

fn ecs_config(agent: &FakeEcsAgent) -> SourceConfig {
    SourceConfig {
        platform: Platform::Ecs,
        ecs_agent_url: agent.url(),
        ..config()
    }
}

/// A fresh 32-hex ECS task id.
fn task_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write(unique("task").as_bytes());
    let a = h.finish();
    h.write_u64(a);
    format!("{a:016x}{:016x}", h.finish())
}

fn cid(c: char) -> String {
    c.to_string().repeat(64)
}

fn task_ids(inv: &Inventory) -> Vec<&str> {
    inv.workloads.iter().map(|t| t.id.as_str()).collect()
}

fn temp_file(label: &str, content: &str) -> PathBuf {
    let path = std::env::temp_dir().join(unique(label));
    std::fs::write(&path, content).unwrap();
    path
}

// ---------------------------------------------------------------------------------------------
// ECS agent

#[tokio::test]
async fn ecs_source_lists_tasks_containers_and_cluster() {
    let agent = FakeEcsAgent::start().await;
    agent.set_cluster("prod");
    let (web, batch) = (task_id(), task_id());
    agent.set_tasks(&[
        FakeTask::running("prod", &web, "web", "12")
            .awsvpc()
            .container(&cid('a'), "app")
            .container(&cid('b'), "envoy"),
        FakeTask::running("prod", &batch, "batch", "3").container(&cid('c'), "job"),
    ]);
    let mut source = EcsSource::with_docker(&ecs_config(&agent), None).unwrap();
    let inv = source.fetch().await.unwrap();

    assert_eq!(inv.source, "ecs");
    assert_eq!(inv.node.cluster.as_deref(), Some("prod"));
    assert!(inv
        .node
        .instance
        .as_deref()
        .unwrap()
        .contains(":container-instance/prod/"));
    assert_eq!(
        inv.node.agent_version.as_deref(),
        Some("Amazon ECS Agent - v1.30.0 (02ff320c)")
    );
    assert_eq!(task_ids(&inv), [web.as_str(), batch.as_str()]);
    let t = &inv.workloads[0];
    assert_eq!(t.kind, WorkloadKind::EcsTask);
    assert_eq!(t.name, "web:12");
    assert_eq!(t.namespace.as_deref(), Some("prod"));
    assert_eq!(t.status.as_deref(), Some("RUNNING"));
    assert_eq!(t.network_mode, NetworkMode::Awsvpc);
    let containers: Vec<(&str, &str)> = t
        .containers
        .iter()
        .map(|c| (c.id.as_str(), c.name.as_str()))
        .collect();
    assert_eq!(
        containers,
        [(cid('a').as_str(), "app"), (cid('b').as_str(), "envoy")]
    );
    assert_eq!(
        inv.workloads[1].network_mode,
        NetworkMode::Unknown,
        "v1 says nothing for bridge"
    );
    assert!(inv.degraded.is_none() && inv.stale.is_none());

    let uris: Vec<String> = agent.requests().into_iter().map(|r| r.uri).collect();
    assert!(uris.contains(&"/v1/metadata".to_string()) && uris.contains(&"/v1/tasks".to_string()));
}

/// Slow, 500, garbage and down each keep the last good inventory, marked stale; the outage is
/// logged once, retried with backoff, and the recovery logged once; a task that stopped
/// meanwhile is gone after it.
#[tokio::test]
async fn ecs_failures_keep_the_last_good_inventory() {
    capture_logs();
    let mut agent = FakeEcsAgent::start().await;
    let (a, b) = (task_id(), task_id());
    let task_a = FakeTask::running("test-cluster", &a, "web", "1").container(&cid('a'), "app");
    let task_b = FakeTask::running("test-cluster", &b, "web", "1").container(&cid('b'), "app");
    agent.set_tasks(&[task_a.clone(), task_b]);
    let source = EcsSource::with_docker(&ecs_config(&agent), None).unwrap();
    let mut refresher = Refresher::new(
        Box::new(source),
        RefreshConfig {
            interval: 10 * S,
            timeout: 5 * S,
            min_spacing: S,
            backoff_min: S,
            backoff_max: 8 * S,
        },
    );
    // Made-up instants: the backoff is checked without waiting for it.
    let t0 = Instant::now();
    assert_eq!(task_ids(refresher.refresh(t0).await), [&a, &b]);

    let steps = [
        (Mode::Slow(2 * S), 10, "did not answer within 300ms"),
        (Mode::Error500, 11, "answered HTTP 500"),
        (Mode::Garbage, 13, "does not decode"),
        (Mode::Down, 17, "cannot reach"),
    ];
    for (i, (mode, at, reason)) in steps.into_iter().enumerate() {
        agent.set_mode(mode).await;
        let before = refresher.attempts();
        // Half a second early is still backing off: no request.
        if i > 0 {
            refresher.refresh(t0 + at * S - S / 2).await;
            assert_eq!(refresher.attempts(), before, "{mode:?}: backing off");
        }
        let inv = refresher.refresh(t0 + at * S).await;
        assert_eq!(task_ids(inv), [&a, &b], "{mode:?}: last good kept");
        let stale = inv.stale.as_ref().expect("marked stale");
        assert!(stale.reason.contains(reason), "{mode:?}: {}", stale.reason);
        assert_eq!(stale.failures, i as u32 + 1);
        assert_eq!(refresher.attempts(), before + 1);
    }
    let url = agent.url();
    let warnings = logged(log::Level::Warn, &url);
    assert_eq!(warnings.len(), 1, "one warning per outage: {warnings:?}");
    assert!(
        warnings[0].contains("keeping the last good inventory"),
        "{}",
        warnings[0]
    );

    // Back, without task B (stopped meanwhile); the backoff has grown to 8 s.
    agent.set_mode(Mode::Ok).await;
    agent.set_tasks(&[task_a]);
    let inv = refresher.refresh(t0 + 25 * S).await;
    assert_eq!(task_ids(inv), [&a]);
    assert!(inv.stale.is_none());
    let recovered = logged(log::Level::Info, &url);
    assert_eq!(recovered.len(), 1, "{recovered:?}");
    assert!(recovered[0].contains("back after"), "{}", recovered[0]);
    assert_eq!(logged(log::Level::Warn, &url).len(), 1);
}

#[tokio::test]
async fn a_stopped_task_leaves_on_the_next_refresh() {
    let agent = FakeEcsAgent::start().await;
    let (a, b) = (task_id(), task_id());
    let task_a = FakeTask::running("c", &a, "web", "1").container(&cid('a'), "app");
    let task_b = FakeTask::running("c", &b, "web", "1").container(&cid('b'), "app");
    agent.set_tasks(&[task_a.clone(), task_b.clone()]);
    let source = EcsSource::with_docker(&ecs_config(&agent), None).unwrap();
    let mut refresher = Refresher::new(Box::new(source), RefreshConfig::for_interval(5 * S));
    let t0 = Instant::now();
    assert_eq!(task_ids(refresher.refresh(t0).await), [&a, &b]);
    // The agent keeps listing a stopped task for hours, as STOPPED.
    agent.set_tasks(&[task_a.clone(), task_b.stopped()]);
    let inv = refresher.refresh(t0 + 5 * S).await;
    assert_eq!(task_ids(inv), [&a]);
    assert_eq!(inv.stopped, [(WorkloadKind::EcsTask, b.clone())]);
    agent.set_tasks(&[task_a]);
    assert_eq!(task_ids(refresher.refresh(t0 + 10 * S).await), [&a]);
}

// ---------------------------------------------------------------------------------------------
// kubelet

fn pods() -> Vec<FakePod> {
    vec![
        FakePod::running(
            "8712f785-1a3e-41ec-a00b-e2dcc77431cb",
            "shop",
            "web-7d9c5b8f4-abcde",
        )
        .label("app", "web")
        .label("pod-template-hash", "7d9c5b8f4")
        .owned_by("ReplicaSet", "web-7d9c5b8f4")
        .container("app", &format!("containerd://{}", cid('a')))
        .limits("500m", "128Mi")
        .container("sidecar", &format!("containerd://{}", cid('b')))
        .limits("250m", "64Mi"),
        FakePod::running(
            "0b0a7e2e-5f8f-4c59-9d4c-2f0c1e6c3b1a",
            "kube-system",
            "node-exporter-x",
        )
        .owned_by("DaemonSet", "node-exporter")
        .host_network()
        .container("exporter", &format!("docker://{}", cid('c'))),
        FakePod::running("3c3f4a1d-2b7e-4e0a-8f4d-6d8c9b0a1e2f", "jobs", "once-abc")
            .phase("Succeeded")
            .container("job", &format!("containerd://{}", cid('d'))),
    ]
}

fn kubelet_config(kubelet: &FakeKubelet, token: &std::path::Path) -> SourceConfig {
    let mut config = SourceConfig {
        platform: Platform::Kubernetes,
        kubelet_url: Some(kubelet.url()),
        kubelet_token_file: token.to_owned(),
        ..SourceConfig::new(PlatformEnv {
            node_name: Some("node-1".into()),
            ..PlatformEnv::default()
        })
    };
    config.timeout = TIMEOUT;
    config
}

#[tokio::test]
async fn kubelet_source_sends_the_rotating_token_over_verified_tls() {
    let kubelet = FakeKubelet::start_tls().await;
    kubelet.set_pods(&pods());
    let ca = temp_file("kubelet-ca", &kubelet.ca().unwrap().ca_pem);
    let token = temp_file("kubelet-token", "token-one\n");
    let mut config = kubelet_config(&kubelet, &token);
    config.kubelet_ca_file = ca.clone();
    let mut source = KubeletSource::new(&config).unwrap();

    kubelet.require_token(Some("token-one"));
    let inv = source.fetch().await.unwrap();
    assert_eq!(inv.source, "kubernetes");
    assert_eq!(inv.node.instance.as_deref(), Some("node-1"));
    assert_eq!(
        inv.workloads.len(),
        2,
        "the Succeeded pod has no cgroups left"
    );
    assert_eq!(
        inv.stopped,
        [(
            WorkloadKind::KubernetesPod,
            "3c3f4a1d-2b7e-4e0a-8f4d-6d8c9b0a1e2f".to_owned()
        )],
        "but it is known to have ended"
    );
    let web = &inv.workloads[0];
    assert_eq!(web.kind, WorkloadKind::KubernetesPod);
    assert_eq!(web.id, "8712f785-1a3e-41ec-a00b-e2dcc77431cb");
    assert_eq!(web.name, "shop/web-7d9c5b8f4-abcde");
    assert_eq!(web.controller.as_ref().unwrap().kind, "Deployment");
    assert_eq!(web.controller.as_ref().unwrap().name, "web");
    assert_eq!(web.limits.cpu_cores, Some(0.75));
    assert_eq!(web.limits.memory_bytes, Some(192 << 20));
    assert_eq!(web.containers[0].id, cid('a'));
    assert_eq!(inv.workloads[1].network_mode, NetworkMode::Host);

    // The token rotates: the next request reads the new one.
    std::fs::write(&token, "token-two").unwrap();
    kubelet.require_token(Some("token-two"));
    source.fetch().await.unwrap();
    let sent: Vec<Option<String>> = kubelet
        .requests()
        .into_iter()
        .map(|r| r.authorization)
        .collect();
    assert_eq!(
        sent,
        [
            Some("Bearer token-one".to_string()),
            Some("Bearer token-two".to_string())
        ]
    );

    // A rejected token: the error says why and does not carry the token.
    kubelet.require_token(Some("another"));
    let err = source.fetch().await.unwrap_err().to_string();
    assert!(err.contains("401"), "{err}");
    assert!(!err.contains("token-two"), "{err}");

    for path in [ca, token] {
        std::fs::remove_file(path).unwrap();
    }
}

#[tokio::test]
async fn kubelet_with_an_unknown_ca_fails_clearly_unless_insecure() {
    let kubelet = FakeKubelet::start_tls().await;
    kubelet.set_pods(&pods());
    let stranger = FakeKubelet::start_tls().await;
    let other_ca = temp_file("other-ca", &stranger.ca().unwrap().ca_pem);
    let token = temp_file("kubelet-token", "token-one");
    let mut config = kubelet_config(&kubelet, &token);
    config.kubelet_ca_file = other_ca.clone();

    let err = KubeletSource::new(&config)
        .unwrap()
        .fetch()
        .await
        .unwrap_err();
    let err = err.to_string();
    assert!(
        err.contains("certificate") && err.contains("--kubelet-insecure-tls"),
        "{err}"
    );
    assert!(
        kubelet.requests().is_empty(),
        "no request over an unverified connection"
    );

    config.kubelet_insecure_tls = true;
    config.kubelet_ca_file = "/nonexistent/ca.crt".into();
    let inv = KubeletSource::new(&config).unwrap().fetch().await.unwrap();
    assert_eq!(inv.workloads.len(), 2);

    for path in [other_ca, token] {
        std::fs::remove_file(path).unwrap();
    }
}

#[tokio::test]
async fn kubelet_read_only_port_gets_no_token() {
    let mut kubelet = FakeKubelet::start().await;
    kubelet.set_pods(&pods());
    let token = temp_file("kubelet-token", "secret-token");
    let mut source = KubeletSource::new(&kubelet_config(&kubelet, &token)).unwrap();
    assert_eq!(source.fetch().await.unwrap().workloads.len(), 2);
    assert_eq!(kubelet.requests()[0].authorization, None);

    // Garbage and 500 are errors (the Refresher keeps the last good inventory).
    kubelet.set_mode(Mode::Garbage).await;
    let err = source.fetch().await.unwrap_err().to_string();
    assert!(err.contains("does not decode"), "{err}");
    kubelet.set_mode(Mode::Error500).await;
    let err = source.fetch().await.unwrap_err().to_string();
    assert!(err.contains("HTTP 500"), "{err}");
    kubelet.set_mode(Mode::Slow(2 * S)).await;
    let err = source.fetch().await.unwrap_err().to_string();
    assert!(err.contains("did not answer within"), "{err}");
    std::fs::remove_file(token).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Auto-detection

/// A closed port on 127.0.0.1.
fn closed_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("http://{}", listener.local_addr().unwrap())
}

#[tokio::test]
async fn detection_prefers_ecs_then_kubernetes_then_docker() {
    let agent = FakeEcsAgent::start().await;
    let kubelet = FakeKubelet::start_tls().await;
    let k8s_env = PlatformEnv {
        kubernetes_service_host: Some("10.96.0.1".into()),
        ..PlatformEnv::default()
    };

    // The agent answers: ECS, even inside a Kubernetes-looking environment.
    let mut config = SourceConfig {
        ecs_agent_url: agent.url(),
        ..config()
    };
    config.env = k8s_env.clone();
    let found = detect(&config).await;
    assert_eq!(found.platform, Platform::Ecs);
    assert_eq!(
        found.reason,
        format!(
            "ECS agent answered at {} (cluster \"test-cluster\")",
            agent.url()
        )
    );

    // No agent: the environment says Kubernetes.
    config.ecs_agent_url = closed_url();
    let found = detect(&config).await;
    assert_eq!(found.platform, Platform::Kubernetes, "{}", found.reason);

    // NODE_NAME with a kubelet answering (TLS, its certificate unknown to the probe, 401).
    kubelet.require_token(Some("nobody-has-it"));
    config.env = PlatformEnv {
        node_name: Some("node-1".into()),
        ..PlatformEnv::default()
    };
    config.kubelet_url = Some(kubelet.url());
    let found = detect(&config).await;
    assert_eq!(found.platform, Platform::Kubernetes, "{}", found.reason);
    assert!(found.reason.contains(&kubelet.url()), "{}", found.reason);
    assert_eq!(
        kubelet.requests()[0].authorization,
        None,
        "the probe sends no token"
    );

    // NODE_NAME but no kubelet, no Docker socket: none.
    config.kubelet_url = Some(closed_url());
    let found = detect(&config).await;
    assert_eq!(found.platform, Platform::None, "{}", found.reason);

    // select() builds what it detected.
    config.ecs_agent_url = agent.url();
    let selected = sources::select(&config).await.unwrap();
    assert_eq!(selected.platform, Platform::Ecs);
    assert_eq!(selected.source.name(), "ecs");
}

#[tokio::test]
async fn detection_finds_docker() {
    if skip_unless_docker("detection_finds_docker") {
        return;
    }
    let config = SourceConfig {
        ecs_agent_url: closed_url(),
        docker_socket: defaults::DOCKER_SOCKET.into(),
        ..config()
    };
    let found = detect(&config).await;
    assert_eq!(found.platform, Platform::Docker, "{}", found.reason);
    assert_eq!(found.reason, "Docker answered on /var/run/docker.sock");
}

// ---------------------------------------------------------------------------------------------
// Real Docker

fn docker() -> DockerClient {
    DockerClient::new(defaults::DOCKER_SOCKET, 10 * S)
}

/// The cgroup v2 path of a running container, from its main process.
async fn cgroup_path(client: &DockerClient, id: &str) -> String {
    let pid = client.inspect(id).await.unwrap().state.pid.unwrap();
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("a cgroup v2 line")
        .to_owned()
}

#[tokio::test]
async fn docker_source_lists_containers_with_compose_groups_and_limits() {
    if skip_unless_docker("docker_source_lists_containers_with_compose_groups_and_limits") {
        return;
    }
    let project = unique("obsproj");
    let mut containers = Containers::new();
    let web = containers
        .start(
            Run::new()
                .label("com.docker.compose.project", &project)
                .label("com.docker.compose.service", "web"),
        )
        .unwrap();
    let db = containers
        .start(
            Run::new()
                .label("com.docker.compose.project", &project)
                .label("com.docker.compose.service", "db")
                .network("host"),
        )
        .unwrap();
    let name = unique("obs-lone");
    let lone = containers
        .start(Run::new().name(&name).arg("--memory=64m").arg("--cpus=0.5"))
        .unwrap();

    let mut source = DockerSource::new(docker());
    let inv = source.fetch().await.unwrap();
    assert_eq!(inv.source, "docker");
    let group = inv
        .workloads
        .iter()
        .find(|t| t.id == project)
        .expect("the project");
    assert_eq!(group.kind, WorkloadKind::ComposeProject);
    let mut ids: Vec<&str> = group.containers.iter().map(|c| c.id.as_str()).collect();
    ids.sort();
    let mut want = [web.as_str(), db.as_str()];
    want.sort();
    assert_eq!(ids, want);
    let db_container = group.containers.iter().find(|c| c.id == db).unwrap();
    assert_eq!(db_container.network_mode, NetworkMode::Host);
    assert_eq!(
        group.network_mode,
        NetworkMode::Unknown,
        "bridge and host differ"
    );
    let lone_container = inv
        .standalone
        .iter()
        .find(|c| c.id == lone)
        .expect("standalone");
    assert_eq!(lone_container.name, name);
    assert_eq!(lone_container.network_mode, NetworkMode::Bridge);
    assert_eq!(lone_container.limits.cpu_cores, Some(0.5));
    assert_eq!(lone_container.limits.memory_bytes, Some(64 << 20));

    // The Docker attribution of each cgroup, through the real path.
    let mut inv = inv;
    let path = cgroup_path(&docker(), &lone).await;
    let unmatched = inv.attach_cgroups([(7, path.as_str())]);
    assert!(unmatched.is_empty(), "{path}");
    let lone_container = inv.standalone.iter().find(|c| c.id == lone).unwrap();
    assert_eq!(lone_container.cgroup_ids, [7]);

    // A removed container is gone at the next fetch.
    containers.remove(&lone).unwrap();
    let inv = source.fetch().await.unwrap();
    assert!(inv.standalone.iter().all(|c| c.id != lone));

    // One-shot stats: bridge containers have `networks`, host-mode ones do not.
    let client = docker();
    let bridge = client.stats(&web).await.unwrap();
    assert!(bridge["networks"]["eth0"]["rx_bytes"].is_u64(), "{bridge}");
    let host = client.stats(&db).await.unwrap();
    assert!(host.get("networks").is_none(), "{host}");
}

/// A Kubernetes node that is itself a container (kind, minikube), seen from the host: its pod's
/// cgroups, made inside a real container's cgroup, go to the pod where the node's kubelet lists
/// it, and to the node container where only the host's Docker lists anything.
#[tokio::test]
async fn a_node_in_a_container_gives_its_pods_to_what_the_platform_lists() {
    if skip_unless_docker("a_node_in_a_container_gives_its_pods_to_what_the_platform_lists") {
        return;
    }
    let mut containers = Containers::new();
    let node = containers.start(Run::new()).unwrap();
    let node_path = cgroup_path(&docker(), &node).await;
    let root = testbed::v2_root();
    let node_cgroup =
        observer::cgroupfs::cgroup_id(&root.join(node_path.trim_start_matches('/'))).unwrap();
    let uid = "5c7e4a1d-2b7e-4e0a-8f4d-6d8c9b0a1e2f";
    let pod = format!(
        "{node_path}/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice",
        uid.replace('-', "_")
    );
    let (app, pause) = (cid('a'), cid('f'));
    // After the container, so they are removed before it; the pause one (no parents of its
    // own) before the app one, which removes the pod's slices.
    let app_cgroup =
        TestCgroup::nested(&root, &format!("{pod}/cri-containerd-{app}.scope")).unwrap();
    let pause_cgroup =
        TestCgroup::nested(&root, &format!("{pod}/cri-containerd-{pause}.scope")).unwrap();
    let cgroups = [
        (app_cgroup.id(), app_cgroup.rel()),
        (pause_cgroup.id(), pause_cgroup.rel()),
        (node_cgroup, node_path.as_str()),
    ];

    // Plain Docker lists the node container and nothing inside it.
    let mut inv = DockerSource::new(docker()).fetch().await.unwrap();
    let unmatched = inv.attach_cgroups(cgroups);
    assert!(unmatched.is_empty(), "{unmatched:?}");
    let listed = inv
        .standalone
        .iter()
        .find(|c| c.id == node)
        .expect("the node");
    let mut ids = listed.cgroup_ids.clone();
    ids.sort();
    let mut want = [app_cgroup.id(), pause_cgroup.id(), node_cgroup];
    want.sort();
    assert_eq!(ids, want);

    // The node's kubelet lists the pod and its app container, not the pause container.
    let kubelet = FakeKubelet::start().await;
    kubelet.set_pods(&[
        FakePod::running(uid, "shop", "web").container("app", &format!("containerd://{app}"))
    ]);
    let token = temp_file("kubelet-token", "token");
    let fetched = KubeletSource::new(&kubelet_config(&kubelet, &token))
        .unwrap()
        .fetch()
        .await;
    std::fs::remove_file(token).unwrap();
    let mut inv = fetched.unwrap();
    let unmatched = inv.attach_cgroups(cgroups);
    let web = inv.workloads.iter().find(|w| w.id == uid).expect("the pod");
    assert_eq!(web.containers[0].cgroup_ids, [app_cgroup.id()]);
    assert_eq!(web.cgroup_ids, [pause_cgroup.id()], "the pause container");
    let unmatched: Vec<u64> = unmatched.iter().map(|u| u.cgroup_id).collect();
    assert_eq!(
        unmatched,
        [node_cgroup],
        "the kubelet does not list its own node"
    );
}

/// ECS tasks as the agent makes them (labels, `--cgroup-parent /ecs/<task id>`): with the agent
/// down they come from Docker labels, marked degraded; with the agent up, Docker fills in the
/// network modes and the pause container the API hides.
#[tokio::test]
async fn ecs_falls_back_to_docker_labels_and_fills_in_from_docker() {
    if skip_unless_docker("ecs_falls_back_to_docker_labels_and_fills_in_from_docker") {
        return;
    }
    let (awsvpc, host) = (task_id(), task_id());
    let awsvpc_arn = task_arn("prod", &awsvpc);
    let host_arn = task_arn("prod", &host);
    fn labels<'a>(task_arn: &'a str, container_name: &'a str, family: &'a str) -> EcsLabels<'a> {
        EcsLabels {
            task_arn,
            container_name,
            cluster: "prod",
            family,
            version: "7",
        }
    }
    let mut containers = Containers::new();
    let awsvpc_parent = format!("/ecs/{awsvpc}");
    let pause = containers
        .start(
            Run::new()
                .ecs(&labels(&awsvpc_arn, "~internal~ecs~pause", "web"))
                .cgroup_parent(&awsvpc_parent)
                .network("none"),
        )
        .unwrap();
    let app = containers
        .start(
            Run::new()
                .ecs(&labels(&awsvpc_arn, "app", "web"))
                .cgroup_parent(&awsvpc_parent)
                .network(&format!("container:{pause}")),
        )
        .unwrap();
    let worker = containers
        .start(
            Run::new()
                .ecs(&labels(&host_arn, "worker", "worker"))
                .cgroup_parent(&format!("/ecs/{host}"))
                .network("host"),
        )
        .unwrap();
    let client = docker();
    let mut paths = Vec::new();
    for (i, id) in [&pause, &app, &worker].into_iter().enumerate() {
        let path = cgroup_path(&client, id).await;
        assert!(
            path.ends_with(&format!(
                "/ecs/{}/{id}",
                if i < 2 { &awsvpc } else { &host }
            )),
            "{path}"
        );
        paths.push((i as u64 + 1, path));
    }
    let paths: Vec<(u64, &str)> = paths.iter().map(|(i, p)| (*i, p.as_str())).collect();

    // The agent is down: Docker labels.
    let mut agent = FakeEcsAgent::start().await;
    agent.set_cluster("prod");
    agent.set_mode(Mode::Down).await;
    let config = SourceConfig {
        docker_socket: defaults::DOCKER_SOCKET.into(),
        ..ecs_config(&agent)
    };
    let mut source = EcsSource::with_docker(&config, Some(client.clone()))
        .unwrap()
        .with_agent_backoff(Duration::ZERO, Duration::ZERO);
    let mut inv = source.fetch().await.unwrap();
    let why = inv.degraded.clone().expect("marked as the fallback");
    assert!(
        why.contains("tasks from Docker labels") && why.contains(&agent.url()),
        "{why}"
    );
    assert_eq!(inv.node.cluster.as_deref(), Some("prod"));
    let unmatched = inv.attach_cgroups(paths.iter().copied());
    assert!(unmatched.is_empty(), "{unmatched:?}");
    let t = inv
        .workloads
        .iter()
        .find(|t| t.id == awsvpc)
        .expect("awsvpc task");
    assert_eq!(t.name, "web:7");
    assert_eq!(t.network_mode, NetworkMode::Awsvpc);
    let mut names: Vec<&str> = t.containers.iter().map(|c| c.name.as_str()).collect();
    names.sort();
    assert_eq!(names, ["app", "~internal~ecs~pause"]);
    let h = inv
        .workloads
        .iter()
        .find(|t| t.id == host)
        .expect("host task");
    assert_eq!(h.network_mode, NetworkMode::Host);
    assert_eq!(h.containers[0].cgroup_ids, [3]);

    // The agent is back and lists the tasks without the pause container.
    agent.set_mode(Mode::Ok).await;
    agent.set_tasks(&[
        FakeTask::running("prod", &awsvpc, "web", "7")
            .awsvpc()
            .container(&app, "app"),
        FakeTask::running("prod", &host, "worker", "7").container(&worker, "worker"),
    ]);
    let mut inv = source.fetch().await.unwrap();
    assert!(inv.degraded.is_none());
    let unmatched = inv.attach_cgroups(paths.iter().copied());
    assert!(unmatched.is_empty(), "{unmatched:?}");
    let t = inv
        .workloads
        .iter()
        .find(|t| t.id == awsvpc)
        .expect("awsvpc task");
    assert_eq!(t.network_mode, NetworkMode::Awsvpc);
    let by_name = |name: &str| t.containers.iter().find(|c| c.name == name).unwrap();
    assert_eq!(by_name("app").cgroup_ids, [2]);
    assert_eq!(
        by_name("~internal~ecs~pause").cgroup_ids,
        [1],
        "added from its labels"
    );
    let h = inv
        .workloads
        .iter()
        .find(|t| t.id == host)
        .expect("host task");
    assert_eq!(
        h.network_mode,
        NetworkMode::Host,
        "from Docker: v1 does not say"
    );
    assert_eq!(h.containers[0].network_mode, NetworkMode::Host);
    assert_eq!(h.containers[0].cgroup_ids, [3]);
}
