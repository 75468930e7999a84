//! The ECS container agent's introspection API (`http://127.0.0.1:51678`): `/v1/metadata` and
//! `/v1/tasks` decoded, turned into [`Workload`]s, and the Docker-label fallback for when the
//! API cannot be reached.
//!
//! Field names follow the agent's struct tags (`ecs-agent/introspection/v1/response.go` in
//! aws/amazon-ecs-agent): PascalCase, Go omits empty optional fields and writes nil slices as
//! `null`, so every field may be missing or null; unknown fields are ignored.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::inventory::{
    at_most_max_items, nested_seq, null_as_default, Container, Limits, NetworkMode, NodeInfo,
    PortMapping, Reach, Runtime, Workload, WorkloadKind,
};

/// `GET /v1/metadata`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct AgentMetadata {
    #[serde(deserialize_with = "null_as_default")]
    pub cluster: String,
    pub container_instance_arn: Option<String>,
    /// Absent when the agent hides its version.
    pub version: Option<String>,
}

/// `GET /v1/tasks`: every task the agent manages on this instance.
///
/// `Tasks` is required (`null` is fine): a body without it is not the agent's answer, and
/// must not read as "no tasks on this instance".
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct TasksResponse {
    /// At most [`crate::inventory::MAX_ITEMS`]: more is not an instance's answer.
    #[serde(deserialize_with = "at_most_max_items")]
    pub tasks: Vec<TaskResponse>,
}

/// One task; also the whole body of `GET /v1/tasks?dockerid=` and `?taskarn=`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct TaskResponse {
    #[serde(deserialize_with = "null_as_default")]
    pub arn: String,
    /// Omitted by the agent in some transitions (KnownStatus STOPPED but desired not).
    pub desired_status: Option<String>,
    #[serde(deserialize_with = "null_as_default")]
    pub known_status: String,
    #[serde(deserialize_with = "null_as_default")]
    pub family: String,
    #[serde(deserialize_with = "null_as_default")]
    pub version: String,
    /// Internal containers (the awsvpc pause container) are never listed.
    #[serde(deserialize_with = "nested_seq")]
    pub containers: Vec<ContainerResponse>,
}

/// One (non-internal) container of a task.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct ContainerResponse {
    #[serde(deserialize_with = "null_as_default")]
    pub docker_id: String,
    #[serde(deserialize_with = "null_as_default")]
    pub docker_name: String,
    /// The name in the task definition.
    #[serde(deserialize_with = "null_as_default")]
    pub name: String,
    pub image: Option<String>,
    #[serde(rename = "ImageID")]
    pub image_id: Option<String>,
    /// RFC 3339, kept as text: only reported, never computed with.
    pub created_at: Option<String>,
    pub started_at: Option<String>,
    #[serde(deserialize_with = "nested_seq")]
    pub ports: Vec<PortResponse>,
    /// Only filled for awsvpc tasks (from the task's ENI).
    #[serde(deserialize_with = "nested_seq")]
    pub networks: Vec<Network>,
    #[serde(deserialize_with = "nested_seq")]
    pub volumes: Vec<VolumeResponse>,
    pub restart_count: Option<i64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct PortResponse {
    pub container_port: Option<u16>,
    pub protocol: Option<String>,
    pub host_port: Option<u16>,
    pub host_ip: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct Network {
    #[serde(rename = "NetworkMode", deserialize_with = "null_as_default")]
    pub network_mode: String,
    #[serde(rename = "IPv4Addresses", deserialize_with = "nested_seq")]
    pub ipv4_addresses: Vec<String>,
    #[serde(rename = "IPv6Addresses", deserialize_with = "nested_seq")]
    pub ipv6_addresses: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct VolumeResponse {
    pub docker_name: Option<String>,
    pub source: Option<String>,
    pub destination: Option<String>,
}

/// The task id in an ARN: its last `/` component, as the agent names the task's cgroup.
///
/// `arn:aws:ecs:<region>:<account>:task/<cluster>/<32 hex>` (current) and
/// `arn:aws:ecs:<region>:<account>:task/<uuid>` (old) both work.
pub fn task_id_from_arn(arn: &str) -> Option<&str> {
    let resource = arn.rsplit(':').next()?;
    let rest = resource.strip_prefix("task/")?;
    let id = rest.rsplit('/').next()?;
    (!id.is_empty()).then_some(id)
}

/// An ECS `NetworkMode` string.
pub fn network_mode(mode: &str) -> NetworkMode {
    match mode {
        "awsvpc" => NetworkMode::Awsvpc,
        "bridge" | "default" => NetworkMode::Bridge,
        "host" => NetworkMode::Host,
        "none" => NetworkMode::None,
        "" => NetworkMode::Unknown,
        other => NetworkMode::Network(other.to_owned()),
    }
}

impl AgentMetadata {
    pub fn node_info(&self) -> NodeInfo {
        NodeInfo {
            cluster: (!self.cluster.is_empty()).then(|| self.cluster.clone()),
            instance: self.container_instance_arn.clone(),
            agent_version: self.version.clone(),
        }
    }
}

impl TaskResponse {
    pub fn task_id(&self) -> Option<&str> {
        task_id_from_arn(&self.arn)
    }

    /// The task as a [`Workload`], or None when its ARN names no task.
    ///
    /// The network mode is known only for awsvpc tasks (the only ones with `Networks`); the v1
    /// API reports no limits. Containers without a Docker id (not created yet) are left out:
    /// they have no cgroup.
    pub fn to_workload(&self, cluster: Option<&str>) -> Option<Workload> {
        let id = self.task_id()?;
        let containers: Vec<Container> = self
            .containers
            .iter()
            .filter(|c| !c.docker_id.is_empty())
            .map(ContainerResponse::to_container)
            .collect();
        let network_mode = containers
            .iter()
            .map(|c| c.network_mode.clone())
            .find(|m| *m != NetworkMode::Unknown)
            .unwrap_or_default();
        Some(Workload {
            kind: WorkloadKind::EcsTask,
            id: id.to_owned(),
            name: format!("{}:{}", self.family, self.version),
            namespace: cluster.map(str::to_owned),
            // The ARN, under the label the agent puts on every task container: the Mackerel
            // host's customIdentifier.
            labels: BTreeMap::from([(LABEL_TASK_ARN.to_owned(), self.arn.clone())]),
            owner: None,
            controller: None,
            status: (!self.known_status.is_empty()).then(|| self.known_status.clone()),
            network_mode,
            limits: Limits::default(),
            containers,
            cgroup_ids: Vec::new(),
            unlisted_since: None,
        })
    }
}

impl ContainerResponse {
    pub fn to_container(&self) -> Container {
        let network_mode = self
            .networks
            .iter()
            .map(|n| network_mode(&n.network_mode))
            .find(|m| *m != NetworkMode::Unknown)
            .unwrap_or_default();
        Container {
            id: self.docker_id.clone(),
            name: self.name.clone(),
            runtime: Runtime::Docker,
            image: self.image.clone(),
            network_mode,
            limits: Limits::default(),
            labels: BTreeMap::new(),
            cgroup_ids: Vec::new(),
            reach: self.reach(),
        }
    }

    /// The `Ports` (bridge: the host port Docker picked; host: the task definition's
    /// mappings repeated) and the awsvpc ENI's addresses of `Networks`. The agent's
    /// `HostIp` is not used: the introspection API leaves it empty.
    pub fn reach(&self) -> Reach {
        let ports = self
            .ports
            .iter()
            .filter_map(|p| {
                Some(PortMapping {
                    container_port: p.container_port.filter(|p| *p != 0)?,
                    host_port: p.host_port.filter(|p| *p != 0),
                    tcp: p
                        .protocol
                        .as_deref()
                        .is_none_or(|p| p.eq_ignore_ascii_case("tcp")),
                })
            })
            .collect();
        let addresses = self
            .networks
            .iter()
            .flat_map(|n| &n.ipv4_addresses)
            .filter_map(|a| a.parse().ok())
            .collect();
        Reach {
            ports,
            addresses,
            declared: BTreeMap::new(),
        }
    }
}

/// Docker labels the ECS agent puts on every container of a task, pause container included.
pub const LABEL_TASK_ARN: &str = "com.amazonaws.ecs.task-arn";
pub const LABEL_CONTAINER_NAME: &str = "com.amazonaws.ecs.container-name";
pub const LABEL_CLUSTER: &str = "com.amazonaws.ecs.cluster";
pub const LABEL_FAMILY: &str = "com.amazonaws.ecs.task-definition-family";
pub const LABEL_VERSION: &str = "com.amazonaws.ecs.task-definition-version";

/// What a container's ECS Docker labels say: the fallback when the agent's API is down.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EcsLabels {
    pub task_arn: String,
    pub container_name: Option<String>,
    pub cluster: Option<String>,
    pub family: Option<String>,
    pub version: Option<String>,
}

impl EcsLabels {
    /// None unless the labels name a task ARN with a task id.
    pub fn from_labels(labels: &BTreeMap<String, String>) -> Option<Self> {
        let task_arn = labels.get(LABEL_TASK_ARN)?;
        task_id_from_arn(task_arn)?;
        let get = |key: &str| labels.get(key).filter(|v| !v.is_empty()).cloned();
        Some(Self {
            task_arn: task_arn.clone(),
            container_name: get(LABEL_CONTAINER_NAME),
            cluster: get(LABEL_CLUSTER),
            family: get(LABEL_FAMILY),
            version: get(LABEL_VERSION),
        })
    }

    pub fn task_id(&self) -> &str {
        // from_labels checked that there is one.
        task_id_from_arn(&self.task_arn).unwrap_or_default()
    }
}

/// Groups Docker containers into ECS tasks by their labels; returns the tasks and the
/// containers that carry no ECS labels. Each container keeps its labels; its name becomes the
/// task definition's container name when the labels give one.
pub fn workloads_from_labels(containers: Vec<Container>) -> (Vec<Workload>, Vec<Container>) {
    let mut tasks: Vec<Workload> = Vec::new();
    let mut rest = Vec::new();
    for mut container in containers {
        let Some(labels) = EcsLabels::from_labels(&container.labels) else {
            rest.push(container);
            continue;
        };
        if let Some(name) = &labels.container_name {
            container.name = name.clone();
        }
        let task_id = labels.task_id();
        let task = match tasks.iter().position(|t| t.id == task_id) {
            Some(i) => &mut tasks[i],
            None => {
                let name = match (&labels.family, &labels.version) {
                    (Some(f), Some(v)) => format!("{f}:{v}"),
                    (Some(f), None) => f.clone(),
                    _ => task_id.to_owned(),
                };
                tasks.push(Workload {
                    kind: WorkloadKind::EcsTask,
                    id: task_id.to_owned(),
                    name,
                    namespace: labels.cluster.clone(),
                    labels: BTreeMap::from([(LABEL_TASK_ARN.to_owned(), labels.task_arn.clone())]),
                    owner: None,
                    controller: None,
                    status: None,
                    network_mode: NetworkMode::Unknown,
                    limits: Limits::default(),
                    containers: Vec::new(),
                    cgroup_ids: Vec::new(),
                    unlisted_since: None,
                });
                tasks.last_mut().expect("just pushed")
            }
        };
        task.containers.push(container);
    }
    for task in &mut tasks {
        task.network_mode = task_network_mode(&task.containers);
    }
    (tasks, rest)
}

/// A task's network mode from its containers' Docker modes, for when the agent does not say
/// (label fallback; bridge and host tasks in `/v1/tasks`).
///
/// ECS modes are per task, and a container in another's namespace (`container:<pause>`) only
/// happens in awsvpc tasks, whether or not the pause container is listed; otherwise the first
/// mode that says something (the pause container's `none` does not).
pub fn task_network_mode(containers: &[Container]) -> NetworkMode {
    if containers
        .iter()
        .any(|c| matches!(c.network_mode, NetworkMode::Container(_)))
    {
        return NetworkMode::Awsvpc;
    }
    containers
        .iter()
        .map(|c| &c.network_mode)
        .find(|m| !matches!(m, NetworkMode::Unknown | NetworkMode::None))
        .cloned()
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOCS: &str = include_str!("fixtures/ecs_tasks_docs.json");
    const CURRENT: &str = include_str!("fixtures/ecs_task_current.json");
    const AWSVPC: &str = include_str!("fixtures/ecs_tasks_awsvpc.json");
    const METADATA: &str = include_str!("fixtures/ecs_metadata.json");

    #[test]
    fn metadata_from_the_docs() {
        let m: AgentMetadata = serde_json::from_str(METADATA).unwrap();
        assert_eq!(m.cluster, "cluster_name");
        assert_eq!(
            m.container_instance_arn.as_deref(),
            Some("arn:aws:ecs:region:aws_account_id:container-instance/cluster_name/container_instance_id")
        );
        assert_eq!(
            m.version.as_deref(),
            Some("Amazon ECS Agent - v1.30.0 (02ff320c)")
        );
        let node = m.node_info();
        assert_eq!(node.cluster.as_deref(), Some("cluster_name"));
        // Hidden version, null instance ARN, extra fields.
        let m: AgentMetadata =
            serde_json::from_str(r#"{"Cluster":"c","ContainerInstanceArn":null,"New":1}"#).unwrap();
        assert_eq!(
            m,
            AgentMetadata {
                cluster: "c".into(),
                container_instance_arn: None,
                version: None
            }
        );
        assert_eq!(
            serde_json::from_str::<AgentMetadata>("{}").unwrap(),
            AgentMetadata::default()
        );
    }

    #[test]
    fn tasks_from_the_docs() {
        let r: TasksResponse = serde_json::from_str(DOCS).unwrap();
        assert_eq!(r.tasks.len(), 1);
        let t = &r.tasks[0];
        assert_eq!(t.task_id(), Some("example5-58ff-46c9-ae05-543f8example"));
        assert_eq!(
            (t.family.as_str(), t.version.as_str()),
            ("hello_world", "8")
        );
        assert_eq!(t.desired_status.as_deref(), Some("RUNNING"));
        let c = &t.containers[0];
        assert_eq!(
            c.docker_id,
            "9581a69a761a557fbfce1d0f6745e4af5b9dbfb86b6b2c5c4df156f1a5932ff1"
        );
        assert_eq!(
            c.docker_name,
            "ecs-hello_world-8-mysql-fcae8ac8f9f1d89d8301"
        );
        assert_eq!(c.name, "mysql");
        assert!(c.image.is_none() && c.networks.is_empty() && c.ports.is_empty());

        let w = t.to_workload(Some("default")).unwrap();
        assert_eq!(w.name, "hello_world:8");
        assert_eq!(w.namespace.as_deref(), Some("default"));
        assert_eq!(
            w.network_mode,
            NetworkMode::Unknown,
            "bridge/host tasks have no Networks"
        );
        assert_eq!(w.containers[0].runtime, Runtime::Docker);
    }

    #[test]
    fn task_from_a_current_agent() {
        let t: TaskResponse = serde_json::from_str(CURRENT).unwrap();
        assert_eq!(t.task_id(), Some("8f03e41243824aea923aca126495f665"));
        let c = &t.containers[0];
        assert_eq!(
            c.image_id.as_deref(),
            Some("sha256:d691691e9652791a60114e67b365688d20d19940dde7c4736ea30e660d8d3553")
        );
        assert_eq!(c.started_at.as_deref(), Some("2026-01-01T00:00:01Z"));
        assert_eq!(
            c.ports,
            [PortResponse {
                container_port: Some(8080),
                protocol: Some("tcp".into()),
                host_port: Some(32768),
                host_ip: None
            }]
        );
        assert_eq!(
            c.volumes[0].destination.as_deref(),
            Some("/opt/ecs/metadata/...")
        );
        let w = t.to_workload(None).unwrap();
        assert_eq!(w.id, "8f03e41243824aea923aca126495f665");
        assert_eq!(w.status.as_deref(), Some("RUNNING"));
        assert_eq!(
            w.containers[0].image.as_deref(),
            Some("111122223333.dkr.ecr.us-east-1.amazonaws.com/web:1.4")
        );
    }

    #[test]
    fn awsvpc_and_null_containers() {
        let r: TasksResponse = serde_json::from_str(AWSVPC).unwrap();
        let web = r.tasks[0].to_workload(Some("prod")).unwrap();
        assert_eq!(web.network_mode, NetworkMode::Awsvpc);
        assert_eq!(
            r.tasks[0].containers[0].networks[0].ipv4_addresses,
            ["10.0.2.61"]
        );
        assert_eq!(r.tasks[0].containers[0].restart_count, Some(0));
        let batch = &r.tasks[1];
        assert!(batch.containers.is_empty() && batch.desired_status.is_none());
        assert_eq!(
            batch.task_id(),
            Some("090eff9b-1ce3-4db6-848a-a8d14064fd24"),
            "old ARN form"
        );
        assert_eq!(
            batch.to_workload(None).unwrap().status.as_deref(),
            Some("STOPPED")
        );
    }

    #[test]
    fn odd_bodies() {
        for body in [r#"{"Tasks":null}"#, r#"{"Tasks":[],"Extra":{"a":[1]}}"#] {
            assert_eq!(
                serde_json::from_str::<TasksResponse>(body).unwrap().tasks,
                []
            );
        }
        // The agent's 404 body is an empty TaskResponse.
        let empty: TaskResponse = serde_json::from_str(
            r#"{"Arn":"","KnownStatus":"","Family":"","Version":"","Containers":null}"#,
        )
        .unwrap();
        assert_eq!(empty.to_workload(None), None);
        let t: TaskResponse = serde_json::from_str(
            r#"{"Arn":"arn:aws:ecs:r:1:task/c/abc","Containers":[{"DockerId":"","Name":"pending"},{"DockerId":null}]}"#,
        )
        .unwrap();
        assert!(
            t.to_workload(None).unwrap().containers.is_empty(),
            "no id, no cgroup"
        );
        for garbage in [
            "",
            "[",
            "[]",
            "{}",
            r#"{"Message":"error"}"#,
            r#"{"Tasks":{}}"#,
            r#"{"Tasks":[{"Containers":"x"}]}"#,
            "null",
        ] {
            assert!(
                serde_json::from_str::<TasksResponse>(garbage).is_err(),
                "{garbage:?}"
            );
        }
    }

    #[test]
    fn task_ids_from_arns() {
        let rows = [
            (
                "arn:aws:ecs:us-east-1:111122223333:task/prod/8f03e41243824aea923aca126495f665",
                Some("8f03e41243824aea923aca126495f665"),
            ),
            (
                "arn:aws:ecs:us-east-1:111122223333:task/090eff9b-1ce3-4db6-848a-a8d14064fd24",
                Some("090eff9b-1ce3-4db6-848a-a8d14064fd24"),
            ),
            ("arn:aws-cn:ecs:cn-north-1:1:task/c/abc", Some("abc")),
            ("arn:aws:ecs:us-east-1:1:container-instance/c/abc", None),
            ("arn:aws:ecs:us-east-1:1:task/", None),
            ("arn:aws:ecs:us-east-1:1:task/c/", None),
            ("task/c/abc", Some("abc")),
            ("", None),
            ("garbage", None),
        ];
        for (arn, want) in rows {
            assert_eq!(task_id_from_arn(arn), want, "{arn}");
        }
    }

    fn labelled(id: &str, task: Option<&str>, name: &str, mode: NetworkMode) -> Container {
        let mut labels = BTreeMap::new();
        if let Some(task) = task {
            labels.insert(
                LABEL_TASK_ARN.into(),
                format!("arn:aws:ecs:us-east-1:1:task/prod/{task}"),
            );
            labels.insert(LABEL_CONTAINER_NAME.into(), name.into());
            labels.insert(LABEL_CLUSTER.into(), "prod".into());
            labels.insert(LABEL_FAMILY.into(), "web".into());
            labels.insert(LABEL_VERSION.into(), "26".into());
        }
        Container {
            id: id.into(),
            name: format!("ecs-web-26-{name}-abc"),
            runtime: Runtime::Docker,
            image: None,
            network_mode: mode,
            limits: Limits::default(),
            labels,
            cgroup_ids: Vec::new(),
            reach: Default::default(),
        }
    }

    #[test]
    fn label_fallback_groups_tasks() {
        let (a, b) = ("a".repeat(32), "b".repeat(32));
        let pause = "1".repeat(64);
        let containers = vec![
            labelled(&pause, Some(&a), "~internal~ecs~pause", NetworkMode::None),
            labelled(
                &"2".repeat(64),
                Some(&a),
                "app",
                NetworkMode::Container(pause.clone()),
            ),
            labelled(&"3".repeat(64), Some(&b), "web", NetworkMode::Host),
            labelled(&"4".repeat(64), None, "plain", NetworkMode::Bridge),
        ];
        let (tasks, rest) = workloads_from_labels(containers);
        assert_eq!(tasks.len(), 2);
        assert_eq!(tasks[0].id, a);
        assert_eq!(tasks[0].name, "web:26");
        assert_eq!(tasks[0].namespace.as_deref(), Some("prod"));
        assert_eq!(tasks[0].network_mode, NetworkMode::Awsvpc);
        let names: Vec<&str> = tasks[0]
            .containers
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(names, ["~internal~ecs~pause", "app"]);
        assert_eq!(tasks[1].network_mode, NetworkMode::Host);
        assert_eq!(rest.len(), 1);

        let labels = &tasks[1].containers[0].labels;
        let parsed = EcsLabels::from_labels(labels).unwrap();
        assert_eq!(parsed.task_id(), b);
        assert_eq!(parsed.version.as_deref(), Some("26"));
        let mut bad = labels.clone();
        bad.insert(LABEL_TASK_ARN.into(), "not an arn".into());
        assert_eq!(EcsLabels::from_labels(&bad), None);
    }

    /// One rule for the label fallback and for filling in the agent's answer: sharing another
    /// container's namespace is awsvpc even when that container is not listed.
    #[test]
    fn task_network_modes() {
        let pause = "1".repeat(64);
        let task = "a".repeat(32);
        let c = |id: &str, mode| labelled(id, Some(&task), "app", mode);
        let rows = [
            (
                vec![
                    c(&pause, NetworkMode::None),
                    c(&"2".repeat(64), NetworkMode::Container(pause.clone())),
                ],
                NetworkMode::Awsvpc,
            ),
            (
                vec![c(&"2".repeat(64), NetworkMode::Container(pause.clone()))],
                NetworkMode::Awsvpc,
            ),
            (
                vec![c(&"2".repeat(64), NetworkMode::Container(String::new()))],
                NetworkMode::Awsvpc,
            ),
            (
                vec![
                    c(&pause, NetworkMode::None),
                    c(&"2".repeat(64), NetworkMode::Host),
                ],
                NetworkMode::Host,
            ),
            (
                vec![
                    c(&pause, NetworkMode::Unknown),
                    c(&"2".repeat(64), NetworkMode::Bridge),
                ],
                NetworkMode::Bridge,
            ),
            (vec![c(&pause, NetworkMode::None)], NetworkMode::Unknown),
            (vec![], NetworkMode::Unknown),
        ];
        for (containers, want) in rows {
            let modes: Vec<_> = containers.iter().map(|c| c.network_mode.clone()).collect();
            assert_eq!(task_network_mode(&containers), want, "{modes:?}");
        }
    }

    #[test]
    fn network_modes() {
        assert_eq!(network_mode("awsvpc"), NetworkMode::Awsvpc);
        assert_eq!(network_mode("bridge"), NetworkMode::Bridge);
        assert_eq!(network_mode("host"), NetworkMode::Host);
        assert_eq!(network_mode("none"), NetworkMode::None);
        assert_eq!(network_mode(""), NetworkMode::Unknown);
        assert_eq!(
            network_mode("my-net"),
            NetworkMode::Network("my-net".into())
        );
    }

    /// More than 10000 tasks is not an instance's answer; a task's containers keep 1000.
    #[test]
    fn floods_of_tasks_and_containers_are_bounded() {
        let flood = format!(r#"{{"Tasks":[{}]}}"#, vec!["{}"; 10_001].join(","));
        let err = serde_json::from_str::<TasksResponse>(&flood).unwrap_err();
        assert!(err.to_string().contains("more than 10000 items"), "{err}");
        let containers = vec![r#"{"DockerId":"x"}"#; 50_000].join(",");
        let task: TaskResponse = serde_json::from_str(&format!(
            r#"{{"Arn":"arn:aws:ecs:r:1:task/c/abc","Containers":[{containers}]}}"#
        ))
        .unwrap();
        assert_eq!(task.containers.len(), crate::inventory::MAX_NESTED);
    }

    /// Fuzzing: no body the agent (or whatever answers in its place) sends makes the decoders
    /// or the task building panic, and the label fallback keeps every container.
    mod fuzz {
        use proptest::prelude::*;

        use super::*;
        use crate::{fuzz, inventory::ecs::source::from_agent_answers};

        const KEYS: &[&str] = &[
            "Cluster",
            "ContainerInstanceArn",
            "Version",
            "Tasks",
            "Arn",
            "DesiredStatus",
            "KnownStatus",
            "Family",
            "Containers",
            "DockerId",
            "DockerName",
            "Name",
            "Image",
            "ImageID",
            "CreatedAt",
            "StartedAt",
            "Ports",
            "ContainerPort",
            "Protocol",
            "HostPort",
            "HostIp",
            "Networks",
            "NetworkMode",
            "IPv4Addresses",
            "IPv6Addresses",
            "Volumes",
            "Source",
            "Destination",
            "RestartCount",
        ];

        fn decode_everything(body: &[u8]) {
            let metadata = serde_json::from_slice::<AgentMetadata>(body).unwrap_or_default();
            if let Ok(tasks) = serde_json::from_slice::<TasksResponse>(body) {
                let inventory = from_agent_answers(&metadata, &tasks);
                assert!(inventory.workloads.len() <= tasks.tasks.len());
            }
            if let Ok(task) = serde_json::from_slice::<TaskResponse>(body) {
                if let Some(w) = task.to_workload(Some("c")) {
                    assert!(task.arn.ends_with(&w.id));
                }
            }
        }

        fn arn() -> impl Strategy<Value = String> {
            prop_oneof![
                ".{0,40}",
                fuzz::words(
                    &[
                        "arn:",
                        "aws:",
                        "ecs:",
                        ":",
                        "/",
                        "task/",
                        "prod",
                        "8f03e41243824aea923aca126495f665"
                    ],
                    8
                ),
            ]
        }

        fn labelled_container() -> impl Strategy<Value = Container> {
            let labels = prop::collection::btree_map(
                prop::sample::select(vec![
                    LABEL_TASK_ARN,
                    LABEL_CONTAINER_NAME,
                    LABEL_CLUSTER,
                    LABEL_FAMILY,
                    LABEL_VERSION,
                    "other",
                ])
                .prop_map(str::to_owned),
                arn(),
                0..6,
            );
            (labels, "[0-9a-f]{64}", ".{0,8}").prop_map(|(labels, id, name)| Container {
                id,
                name,
                runtime: Runtime::Docker,
                image: None,
                network_mode: NetworkMode::Unknown,
                limits: Limits::default(),
                labels,
                cgroup_ids: Vec::new(),
                reach: Default::default(),
            })
        }

        proptest! {
            #![proptest_config(fuzz::config(500))]

            #[test]
            fn any_bytes(body in prop::collection::vec(any::<u8>(), 0..256)) {
                decode_everything(&body);
            }

            #[test]
            fn mutated_fixtures(body in fuzz::mutated(fuzz::json_seeds("ecs"), 8)) {
                decode_everything(&body);
            }

            #[test]
            fn documents_of_agent_fields(doc in fuzz::json_value(KEYS)) {
                decode_everything(&serde_json::to_vec(&doc).unwrap());
                let tasks = serde_json::json!({ "Tasks": [doc] });
                decode_everything(&serde_json::to_vec(&tasks).unwrap());
            }

            #[test]
            fn task_ids_are_the_end_of_the_arn(arn in arn()) {
                if let Some(id) = task_id_from_arn(&arn) {
                    prop_assert!(arn.ends_with(id) && !id.is_empty() && !id.contains('/'));
                }
            }

        }

        proptest! {
            // Building label maps is the costly part: fewer cases, each with many containers.
            #![proptest_config(fuzz::config(150))]

            #[test]
            fn the_label_fallback_keeps_every_container(
                containers in prop::collection::vec(labelled_container(), 0..12)
            ) {
                let count = containers.len();
                let (tasks, rest) = workloads_from_labels(containers);
                let in_tasks: usize = tasks.iter().map(|t| t.containers.len()).sum();
                prop_assert_eq!(in_tasks + rest.len(), count);
                for task in &tasks {
                    for c in &task.containers {
                        let labels = EcsLabels::from_labels(&c.labels).unwrap();
                        prop_assert_eq!(labels.task_id(), task.id.as_str());
                    }
                }
            }
        }
    }

    #[test]
    fn ports_and_networks_are_where_the_task_is_reached() {
        let t: TaskResponse = serde_json::from_str(CURRENT).unwrap();
        let c = t.to_workload(None).unwrap().containers.remove(0);
        assert_eq!(
            c.reach.ports,
            [PortMapping {
                container_port: 8080,
                host_port: Some(32768),
                tcp: true
            }]
        );
        assert!(c.reach.addresses.is_empty());
        let r: TasksResponse = serde_json::from_str(AWSVPC).unwrap();
        let w = r.tasks[0].to_workload(None).unwrap();
        let addresses: Vec<_> = w
            .containers
            .iter()
            .flat_map(|c| c.reach.addresses.clone())
            .collect();
        assert!(
            addresses.contains(&"10.0.2.61".parse().unwrap()),
            "{addresses:?}"
        );
        // Ports without a container port, or of UDP, are kept as the agent says.
        let c: ContainerResponse = serde_json::from_str(
            r#"{"DockerId":"x","Ports":[{"HostPort":1},{"ContainerPort":53,"Protocol":"udp","HostPort":53},{"ContainerPort":9100}]}"#,
        )
        .unwrap();
        assert_eq!(
            c.reach().ports,
            [
                PortMapping {
                    container_port: 53,
                    host_port: Some(53),
                    tcp: false
                },
                PortMapping {
                    container_port: 9100,
                    host_port: None,
                    tcp: true
                },
            ]
        );
    }
}
