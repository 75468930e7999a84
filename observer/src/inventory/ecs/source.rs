//! `--platform ecs`: the ECS agent's introspection API (`/v1/metadata`, `/v1/tasks`), with
//! the Docker socket filling in what the API leaves out and standing in when it is down.
//!
//! With the socket, each container gets Docker's network mode, limits and labels, and the
//! task's internal containers (the awsvpc pause container, which `/v1/tasks` never lists) are
//! added from their `com.amazonaws.ecs.*` labels. When the API fails, the tasks come from those
//! labels alone and the inventory says so in [`Inventory::degraded`]; the API is retried with
//! backoff meanwhile, so a down agent does not cost a timeout every interval.

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, SystemTime},
};

use tokio::time::Instant;

use super::decode::{
    task_network_mode, workloads_from_labels, AgentMetadata, EcsLabels, TasksResponse,
};
use crate::{
    backoff::Backoff,
    defaults,
    inventory::{
        docker::{DockerClient, InspectCache},
        http::{base_url, get, ECS_AGENT},
        sources::{BuildError, SourceConfig},
        Container, Inventory, InventoryFuture, InventorySource, NetworkMode, SourceError,
        WorkloadKind,
    },
};

/// The agent's status for a task that has stopped; the agent keeps listing such tasks for
/// hours (`ECS_ENGINE_TASK_CLEANUP_WAIT_DURATION`). They are no workloads, and a cgroup of
/// theirs that lingers does not keep them ([`Inventory::stopped`]).
const STOPPED: &str = "STOPPED";

/// The ECS agent introspection API, with the Docker socket as helper and fallback.
#[derive(Debug)]
pub struct EcsSource {
    agent_url: String,
    http: reqwest::Client,
    timeout: Duration,
    docker: Option<DockerClient>,
    cache: InspectCache,
    /// When to ask the agent again after it failed, while Docker labels stand in.
    agent_backoff: Backoff<Instant>,
    /// Why the agent last failed, for the degraded inventory; None once it answers.
    agent_error: Option<String>,
}

impl EcsSource {
    /// A source for `config.ecs_agent_url`; the Docker socket is used when it exists.
    pub fn new(config: &SourceConfig) -> Result<Self, BuildError> {
        let docker = config
            .docker_socket
            .exists()
            .then(|| config.docker_client());
        Self::with_docker(config, docker)
    }

    /// A source with an explicit Docker client (or none: no fallback, no enrichment).
    pub fn with_docker(
        config: &SourceConfig,
        docker: Option<DockerClient>,
    ) -> Result<Self, BuildError> {
        let url = base_url(&config.ecs_agent_url);
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(BuildError::EcsScheme {
                url: config.ecs_agent_url.clone(),
            });
        }
        let http = reqwest::Client::builder()
            // Node-local APIs: never through an HTTP(S)_PROXY from the environment.
            .no_proxy()
            .connect_timeout(config.timeout)
            .build()
            .map_err(|e| BuildError::Http(e.to_string()))?;
        Ok(Self {
            agent_url: url.to_owned(),
            http,
            timeout: config.timeout,
            docker,
            cache: InspectCache::default(),
            agent_backoff: Backoff::new(defaults::BACKOFF_MIN, defaults::BACKOFF_MAX),
            agent_error: None,
        })
    }

    /// How long to leave the agent alone after a failure while Docker labels stand in
    /// (default [`defaults::BACKOFF_MIN`] doubling to [`defaults::BACKOFF_MAX`]).
    pub fn with_agent_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.agent_backoff = Backoff::new(min, max);
        self
    }

    pub fn agent_url(&self) -> &str {
        &self.agent_url
    }

    async fn fetch_inner(&mut self) -> Result<Inventory, SourceError> {
        // Without a fallback there is nothing to do but ask; the Refresher backs off.
        let ask_agent = self.docker.is_none() || self.agent_backoff.ready(Instant::now());
        if ask_agent {
            match self.ask_agent().await {
                Ok(mut inventory) => {
                    self.agent_backoff.succeeded();
                    self.agent_error = None;
                    if let Some(docker) = &self.docker {
                        match docker.containers(&mut self.cache).await {
                            Ok(containers) => enrich(&mut inventory, containers),
                            Err(e) => log::debug!("ECS inventory without Docker details: {e}"),
                        }
                    }
                    return Ok(inventory);
                }
                Err(e) if self.docker.is_some() => self.agent_failed(&e),
                Err(e) => return Err(e),
            }
        }
        let docker = self.docker.as_ref().expect("only reached with a fallback");
        let agent_error = self.agent_error.clone().unwrap_or_default();
        let containers = docker.containers(&mut self.cache).await.map_err(|e| {
            SourceError::Other(format!(
                "{agent_error}; the Docker-label fallback failed too: {e}"
            ))
        })?;
        let mut inventory = from_labels(containers);
        inventory.degraded = Some(format!(
            "ECS agent introspection API failed ({agent_error}); tasks from Docker labels"
        ));
        Ok(inventory)
    }

    /// `/v1/metadata` and `/v1/tasks`, asked together.
    async fn ask_agent(&self) -> Result<Inventory, SourceError> {
        let metadata_url = format!("{}/v1/metadata", self.agent_url);
        let tasks_url = format!("{}/v1/tasks", self.agent_url);
        let (metadata, tasks) = tokio::join!(
            get(ECS_AGENT, &self.http, &metadata_url, self.timeout, None),
            get(ECS_AGENT, &self.http, &tasks_url, self.timeout, None),
        );
        let metadata: AgentMetadata =
            serde_json::from_slice(&metadata?).map_err(|source| SourceError::Decode {
                url: metadata_url,
                source,
            })?;
        let tasks: TasksResponse =
            serde_json::from_slice(&tasks?).map_err(|source| SourceError::Decode {
                url: tasks_url,
                source,
            })?;
        Ok(from_agent_answers(&metadata, &tasks))
    }

    fn agent_failed(&mut self, e: &SourceError) {
        let wait = self.agent_backoff.failed(Instant::now(), None);
        self.agent_error = Some(e.to_string());
        log::debug!("ECS agent: {e}; Docker labels stand in, next try in {wait:?}");
    }
}

impl InventorySource for EcsSource {
    fn name(&self) -> &'static str {
        "ecs"
    }

    fn fetch(&mut self) -> InventoryFuture<'_> {
        Box::pin(self.fetch_inner())
    }
}

/// The inventory the agent's two answers describe: its running (not STOPPED) tasks, and the
/// ids of the STOPPED ones in [`Inventory::stopped`].
///
/// Only `KnownStatus` says a task stopped: a task whose `DesiredStatus` is STOPPED is still
/// stopping, its containers may run, so it is listed like any other until the agent knows.
pub fn from_agent_answers(metadata: &AgentMetadata, tasks: &TasksResponse) -> Inventory {
    let node = metadata.node_info();
    let mut inventory = Inventory::empty("ecs");
    inventory.fetched_at = SystemTime::now();
    let (stopped, running): (Vec<_>, Vec<_>) =
        tasks.tasks.iter().partition(|t| t.known_status == STOPPED);
    inventory.workloads = running
        .into_iter()
        .filter_map(|t| t.to_workload(node.cluster.as_deref()))
        .collect();
    inventory.stopped = stopped
        .into_iter()
        .filter_map(|t| Some((WorkloadKind::EcsTask, t.task_id()?.to_owned())))
        .collect();
    inventory.node = node;
    inventory
}

/// The inventory from Docker labels alone (the agent is down).
pub fn from_labels(containers: Vec<Container>) -> Inventory {
    let (tasks, standalone) = workloads_from_labels(containers);
    let mut inventory = Inventory::empty("ecs");
    inventory.fetched_at = SystemTime::now();
    // Every task container carries the cluster label; take the first.
    inventory.node.cluster = tasks.iter().find_map(|t| t.namespace.clone());
    inventory.workloads = tasks;
    inventory.standalone = standalone;
    inventory
}

/// Adds what Docker knows to the agent's inventory: per-container network mode (the v1 API
/// gives it only for awsvpc), limits and labels, and the task containers the API hides.
pub fn enrich(inventory: &mut Inventory, docker: Vec<Container>) {
    let by_id: HashMap<&str, &Container> = docker.iter().map(|c| (c.id.as_str(), c)).collect();
    let listed: HashSet<&str> = inventory
        .workloads
        .iter()
        .flat_map(|t| t.containers.iter().map(|c| c.id.as_str()))
        .collect();
    // Internal containers of listed tasks, by task id.
    let mut hidden: HashMap<String, Vec<Container>> = HashMap::new();
    for container in docker.iter().filter(|c| !listed.contains(c.id.as_str())) {
        if let Some(labels) = EcsLabels::from_labels(&container.labels) {
            let mut container = container.clone();
            if let Some(name) = &labels.container_name {
                container.name = name.clone();
            }
            hidden
                .entry(labels.task_id().to_owned())
                .or_default()
                .push(container);
        }
    }
    for task in &mut inventory.workloads {
        for container in &mut task.containers {
            let Some(known) = by_id.get(container.id.as_str()) else {
                continue;
            };
            if container.network_mode == NetworkMode::Unknown {
                container.network_mode = known.network_mode.clone();
            }
            container.limits = known.limits;
            container.labels = known.labels.clone();
            // The agent's Ports first: Docker's port map only when the agent lists none.
            if container.reach.ports.is_empty() {
                container.reach.ports = known.reach.ports.clone();
            }
            container.reach.declared = known.reach.declared.clone();
            if container.image.is_none() {
                container.image = known.image.clone();
            }
        }
        if let Some(extra) = hidden.remove(&task.id) {
            task.containers.extend(extra);
        }
        if task.network_mode == NetworkMode::Unknown {
            task.network_mode = task_network_mode(&task.containers);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::inventory::{
        ecs::{LABEL_CLUSTER, LABEL_CONTAINER_NAME, LABEL_TASK_ARN},
        Limits, Runtime,
    };

    const METADATA: &str = include_str!("fixtures/ecs_metadata.json");
    const AWSVPC: &str = include_str!("fixtures/ecs_tasks_awsvpc.json");

    const TASK: &str = "8f03e41243824aea923aca126495f665";
    const OLD_TASK: &str = "090eff9b-1ce3-4db6-848a-a8d14064fd24";

    fn cid(c: char) -> String {
        c.to_string().repeat(64)
    }

    fn task_json(task: &str, status: &str, containers: &[&str]) -> String {
        let containers: Vec<String> = containers
            .iter()
            .map(|id| format!(r#"{{"DockerId":"{id}","Name":"app-{}"}}"#, &id[..1]))
            .collect();
        format!(
            r#"{{"Arn":"arn:aws:ecs:us-east-1:1:task/prod/{task}","KnownStatus":"{status}","Family":"web","Version":"3","Containers":[{}]}}"#,
            containers.join(",")
        )
    }

    fn answers(tasks: &[String]) -> Inventory {
        let metadata: AgentMetadata = serde_json::from_str(METADATA).unwrap();
        let tasks: TasksResponse =
            serde_json::from_str(&format!(r#"{{"Tasks":[{}]}}"#, tasks.join(","))).unwrap();
        from_agent_answers(&metadata, &tasks)
    }

    #[test]
    fn agent_answers_give_running_tasks_with_the_cluster() {
        let metadata: AgentMetadata = serde_json::from_str(METADATA).unwrap();
        let tasks: TasksResponse = serde_json::from_str(AWSVPC).unwrap();
        let inv = from_agent_answers(&metadata, &tasks);
        assert_eq!(inv.source, "ecs");
        assert_eq!(inv.node.cluster.as_deref(), Some("cluster_name"));
        assert!(inv
            .node
            .instance
            .as_deref()
            .unwrap()
            .contains("container-instance"));
        // The fixture's second task is STOPPED: not a workload, but known to have ended.
        assert_eq!(inv.workloads.len(), 1);
        assert_eq!(
            inv.stopped,
            [(
                WorkloadKind::EcsTask,
                "090eff9b-1ce3-4db6-848a-a8d14064fd24".to_owned()
            )]
        );
        assert_eq!(inv.workloads[0].namespace.as_deref(), Some("cluster_name"));
        assert_eq!(inv.workloads[0].network_mode, NetworkMode::Awsvpc);
        assert!(inv.degraded.is_none() && inv.stale.is_none());
    }

    /// Every ECS cgroup layout attributes containers to themselves and the hidden pause
    /// container and the task cgroup to the task.
    #[test]
    fn ecs_cgroup_layouts_attach() {
        let (a, pause) = (cid('a'), cid('f'));
        let b = cid('b');
        for (task, task_path) in [
            (TASK, format!("/ecs/{TASK}")),
            (OLD_TASK, format!("/ecs/{OLD_TASK}")),
            // Older agents name the cluster in between.
            (TASK, format!("/ecs/default/{TASK}")),
            (OLD_TASK, format!("/ecs/my-cluster/{OLD_TASK}")),
            (TASK, format!("/ecstasks.slice/ecstasks-{TASK}.slice")),
            // Seen from inside a cgroup namespace.
            (TASK, format!("/../../ecs/{TASK}")),
        ] {
            let v2 = task_path.contains("slice");
            let leaf = |id: &str| {
                if v2 {
                    format!("{task_path}/docker-{id}.scope")
                } else {
                    format!("{task_path}/{id}")
                }
            };
            let mut inv = answers(&[task_json(task, "RUNNING", &[&a, &b])]);
            let (pa, pb, pp) = (leaf(&a), leaf(&b), leaf(&pause));
            let unmatched = inv.attach_cgroups([
                (1, pa.as_str()),
                (2, pb.as_str()),
                (3, pp.as_str()),
                (4, task_path.as_str()),
            ]);
            assert!(unmatched.is_empty(), "{task_path}: {unmatched:?}");
            let t = &inv.workloads[0];
            assert_eq!(t.id, task);
            assert_eq!(t.containers[0].cgroup_ids, [1], "{task_path}");
            assert_eq!(t.containers[1].cgroup_ids, [2], "{task_path}");
            assert_eq!(t.cgroup_ids, [3, 4], "{task_path}: pause and task cgroup");
        }
    }

    #[test]
    fn stopped_tasks_leave() {
        let (a, b) = (cid('a'), cid('b'));
        let other = "1".repeat(32);
        let inv = answers(&[
            task_json(TASK, "RUNNING", &[&a]),
            task_json(&other, STOPPED, &[&b]),
        ]);
        let ids: Vec<&str> = inv.workloads.iter().map(|t| t.id.as_str()).collect();
        assert_eq!(ids, [TASK]);
    }

    fn docker_container(id: &str, task: Option<&str>, name: &str, mode: NetworkMode) -> Container {
        let mut labels = BTreeMap::new();
        if let Some(task) = task {
            labels.insert(
                LABEL_TASK_ARN.to_owned(),
                format!("arn:aws:ecs:us-east-1:1:task/prod/{task}"),
            );
            labels.insert(LABEL_CONTAINER_NAME.to_owned(), name.to_owned());
            labels.insert(LABEL_CLUSTER.to_owned(), "prod".to_owned());
        }
        Container {
            id: id.to_owned(),
            name: format!("ecs-web-3-{name}-0123"),
            runtime: Runtime::Docker,
            image: Some("local/busybox".into()),
            network_mode: mode,
            limits: Limits {
                cpu_cores: Some(0.5),
                memory_bytes: Some(256 << 20),
            },
            labels,
            cgroup_ids: Vec::new(),
            reach: Default::default(),
        }
    }

    #[test]
    fn docker_fills_in_modes_limits_and_the_pause_container() {
        let (a, pause, host_app, lone) = (cid('a'), cid('f'), cid('c'), cid('d'));
        let host_task = "2".repeat(32);
        let mut inv = answers(&[
            task_json(TASK, "RUNNING", &[&a]),
            task_json(&host_task, "RUNNING", &[&host_app]),
        ]);
        enrich(
            &mut inv,
            vec![
                docker_container(&a, Some(TASK), "app", NetworkMode::Container(pause.clone())),
                docker_container(&pause, Some(TASK), "~internal~ecs~pause", NetworkMode::None),
                docker_container(&host_app, Some(&host_task), "web", NetworkMode::Host),
                docker_container(&lone, None, "lone", NetworkMode::Bridge),
            ],
        );
        let awsvpc = &inv.workloads[0];
        assert_eq!(awsvpc.network_mode, NetworkMode::Awsvpc);
        let names: Vec<&str> = awsvpc.containers.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["app-a", "~internal~ecs~pause"]);
        assert_eq!(awsvpc.containers[0].limits.cpu_cores, Some(0.5));
        assert!(awsvpc.containers[0].labels.contains_key(LABEL_TASK_ARN));
        assert_eq!(inv.workloads[1].network_mode, NetworkMode::Host);
        assert_eq!(
            inv.workloads[1].containers[0].network_mode,
            NetworkMode::Host
        );
        assert!(
            inv.standalone.is_empty(),
            "non-ECS containers are not the agent's"
        );
    }

    /// The agent's `Ports` stay; Docker's port map stands in when the agent lists none; the
    /// `ECS_PROMETHEUS_*` declarations come from Docker either way.
    #[test]
    fn docker_adds_scrape_declarations_and_a_port_map_fallback() {
        use crate::inventory::{PortMapping, Reach};
        let (a, b) = (cid('a'), cid('b'));
        let mut inv = answers(&[task_json(TASK, "RUNNING", &[&a, &b])]);
        inv.workloads[0].containers[0].reach.ports = vec![PortMapping {
            container_port: 9100,
            host_port: Some(32768),
            tcp: true,
        }];
        let docker_reach = |host_port| Reach {
            ports: vec![PortMapping {
                container_port: 9100,
                host_port: Some(host_port),
                tcp: true,
            }],
            addresses: vec![],
            declared: [(
                "ECS_PROMETHEUS_EXPORTER_PORT".to_string(),
                "9100".to_string(),
            )]
            .into(),
        };
        let mut docker_a = docker_container(&a, Some(TASK), "app", NetworkMode::Bridge);
        docker_a.reach = docker_reach(40000);
        let mut docker_b = docker_container(&b, Some(TASK), "side", NetworkMode::Bridge);
        docker_b.reach = docker_reach(40001);
        enrich(&mut inv, vec![docker_a, docker_b]);
        let [a, b] = &inv.workloads[0].containers[..] else {
            panic!("{:?}", inv.workloads[0].containers)
        };
        assert_eq!(a.reach.ports[0].host_port, Some(32768), "the agent's");
        assert_eq!(b.reach.ports[0].host_port, Some(40001), "Docker's");
        assert_eq!(a.reach.declared.len(), 1);
        assert_eq!(b.reach.declared.len(), 1);
    }

    #[test]
    fn labels_alone_make_tasks() {
        let (a, pause) = (cid('a'), cid('f'));
        let inv = from_labels(vec![
            docker_container(&pause, Some(TASK), "~internal~ecs~pause", NetworkMode::None),
            docker_container(&a, Some(TASK), "app", NetworkMode::Container(pause.clone())),
            docker_container(&cid('d'), None, "lone", NetworkMode::Bridge),
        ]);
        assert_eq!(inv.node.cluster.as_deref(), Some("prod"));
        assert_eq!(inv.workloads.len(), 1);
        assert_eq!(inv.workloads[0].network_mode, NetworkMode::Awsvpc);
        assert_eq!(inv.standalone.len(), 1);
    }

    /// An agent that streams without end costs at most the cap, and the error says so.
    #[tokio::test]
    async fn an_endless_agent_answer_stops_at_the_cap() {
        let (addr, written) = crate::body::tests::flood(usize::MAX).await;
        let mut config = SourceConfig::new(Default::default());
        config.ecs_agent_url = format!("http://{addr}");
        config.timeout = Duration::from_secs(30);
        let mut source = EcsSource::with_docker(&config, None).unwrap();
        let err = source.fetch().await.unwrap_err();
        assert!(matches!(err, SourceError::TooLarge { .. }), "{err}");
        assert!(
            err.to_string().starts_with("the ECS agent at http://")
                && err.to_string().contains("answered more than 8 MiB"),
            "{err}"
        );
        let sent = written.load(std::sync::atomic::Ordering::Relaxed);
        assert!(sent < crate::body::ECS_AGENT_MAX * 3, "{sent} bytes sent");
    }

    #[test]
    fn urls_must_be_http() {
        let mut config = SourceConfig::new(Default::default());
        config.ecs_agent_url = "127.0.0.1:51678".into();
        assert!(matches!(
            EcsSource::with_docker(&config, None),
            Err(BuildError::EcsScheme { .. })
        ));
        config.ecs_agent_url = "http://127.0.0.1:51678/".into();
        let source = EcsSource::with_docker(&config, None).unwrap();
        assert_eq!(source.agent_url(), "http://127.0.0.1:51678");
    }
}
