//! The Docker Engine API: `GET /containers/json` items and `GET /containers/<id>/json`
//! decoded, network modes classified, and Compose projects grouped into [`Workload`]s.
//!
//! Field names are the Engine API's (PascalCase); unknown fields are ignored and Docker's
//! `null` maps and slices read as empty.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::inventory::{
    at_most_max_items, nested_map, nested_seq, null_as_default, Container, Limits, NetworkMode,
    PortMapping, Reach, Runtime, Workload, WorkloadKind,
};

/// The label Docker Compose puts the project name in.
pub const COMPOSE_PROJECT: &str = "com.docker.compose.project";
/// The label Docker Compose puts the service name in.
pub const COMPOSE_SERVICE: &str = "com.docker.compose.service";

/// The body of `GET /containers/json`: at most [`crate::inventory::MAX_ITEMS`] items.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerList(pub Vec<ContainerSummary>);

impl<'de> Deserialize<'de> for ContainerList {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        at_most_max_items(d).map(Self)
    }
}

/// One item of `GET /containers/json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct ContainerSummary {
    #[serde(deserialize_with = "null_as_default")]
    pub id: String,
    /// With a leading `/`.
    #[serde(deserialize_with = "nested_seq")]
    pub names: Vec<String>,
    pub image: Option<String>,
    #[serde(deserialize_with = "nested_map")]
    pub labels: BTreeMap<String, String>,
    /// "created", "running", "paused", "restarting", "exited", "removing", "dead".
    pub state: Option<String>,
    #[serde(deserialize_with = "null_as_default")]
    pub host_config: SummaryHostConfig,
    /// Published ports: `[{"IP","PrivatePort","PublicPort","Type"}]`.
    #[serde(deserialize_with = "nested_seq")]
    pub ports: Vec<SummaryPort>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct SummaryPort {
    pub private_port: Option<u16>,
    pub public_port: Option<u16>,
    #[serde(rename = "Type")]
    pub kind: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct SummaryHostConfig {
    pub network_mode: Option<String>,
}

/// `GET /containers/<id>/json`, the fields observer uses.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct ContainerInspect {
    #[serde(deserialize_with = "null_as_default")]
    pub id: String,
    /// With a leading `/`.
    #[serde(deserialize_with = "null_as_default")]
    pub name: String,
    /// The image id (`sha256:...`); the name given at `run` is `Config.Image`.
    pub image: Option<String>,
    #[serde(deserialize_with = "null_as_default")]
    pub config: InspectConfig,
    #[serde(deserialize_with = "null_as_default")]
    pub host_config: HostConfig,
    #[serde(deserialize_with = "null_as_default")]
    pub state: InspectState,
    #[serde(deserialize_with = "null_as_default")]
    pub network_settings: NetworkSettings,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct NetworkSettings {
    /// `{"9100/tcp": [{"HostIp": "0.0.0.0", "HostPort": "32768"}, ...]}`; `null` for a port
    /// exposed but not published.
    #[serde(deserialize_with = "nested_map")]
    pub ports: BTreeMap<String, Option<Vec<PortBinding>>>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct PortBinding {
    pub host_port: Option<String>,
}

/// The Docker label prefix of the CloudWatch agent's Prometheus discovery (ECS).
pub const ECS_PROMETHEUS_PREFIX: &str = "ECS_PROMETHEUS_";

/// The `ECS_PROMETHEUS_*` and `mackerel.io/plugins` labels: what a container declares about
/// its own metrics (an endpoint, the operator's plugins to run against it).
pub fn declared(labels: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    labels
        .iter()
        .filter(|(k, _)| {
            k.starts_with(ECS_PROMETHEUS_PREFIX) || *k == crate::inventory::PLUGINS_LABEL
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

impl NetworkSettings {
    /// Docker's port map as [`PortMapping`]s: one per container port, the first host port
    /// (Docker binds IPv4 and IPv6 to the same one).
    pub fn mappings(&self) -> Vec<PortMapping> {
        self.ports
            .iter()
            .filter_map(|(key, bindings)| {
                let (port, proto) = key.split_once('/').unwrap_or((key, "tcp"));
                let host_port = bindings
                    .iter()
                    .flatten()
                    .find_map(|b| b.host_port.as_deref()?.parse::<u16>().ok())
                    .filter(|p| *p != 0);
                Some(PortMapping {
                    container_port: port.parse().ok().filter(|p| *p != 0)?,
                    host_port,
                    tcp: proto == "tcp",
                })
            })
            .collect()
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct InspectConfig {
    pub image: Option<String>,
    #[serde(deserialize_with = "nested_map")]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct HostConfig {
    pub network_mode: Option<String>,
    /// `--cgroup-parent` (the ECS agent sets `/ecs/<task id>` or `ecstasks-<id>.slice`).
    pub cgroup_parent: Option<String>,
    /// `--cpus` in billionths of a CPU; 0 = unset.
    pub nano_cpus: Option<i64>,
    /// CFS quota and period in µs; quota 0 or -1 = unset.
    pub cpu_quota: Option<i64>,
    pub cpu_period: Option<i64>,
    /// Memory limit in bytes; 0 = unset.
    pub memory: Option<i64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct InspectState {
    pub status: Option<String>,
    #[serde(deserialize_with = "null_as_default")]
    pub running: bool,
    /// 0 when not running.
    pub pid: Option<i64>,
}

/// Docker's `HostConfig.NetworkMode`: `default`/`bridge` (or empty), `host`, `none`,
/// `container:<id>`, or a user-defined network's name.
pub fn network_mode(mode: &str) -> NetworkMode {
    match mode {
        "" | "default" | "bridge" => NetworkMode::Bridge,
        "host" => NetworkMode::Host,
        "none" => NetworkMode::None,
        _ => match mode.strip_prefix("container:") {
            Some(target) => NetworkMode::Container(target.to_owned()),
            None => NetworkMode::Network(mode.to_owned()),
        },
    }
}

/// The Compose project a container belongs to, from its labels.
pub fn compose_project(labels: &BTreeMap<String, String>) -> Option<&str> {
    labels
        .get(COMPOSE_PROJECT)
        .map(String::as_str)
        .filter(|p| !p.is_empty())
}

/// A container name without Docker's leading `/`.
fn plain_name(name: &str) -> String {
    name.strip_prefix('/').unwrap_or(name).to_owned()
}

impl ContainerSummary {
    pub fn is_running(&self) -> bool {
        self.state.as_deref() == Some("running")
    }

    /// The list item as a [`Container`]; the list carries no limits (inspect does).
    pub fn to_container(&self) -> Container {
        Container {
            id: self.id.clone(),
            name: self
                .names
                .first()
                .map(|n| plain_name(n))
                .unwrap_or_default(),
            runtime: Runtime::Docker,
            image: self.image.clone(),
            network_mode: network_mode(self.host_config.network_mode.as_deref().unwrap_or("")),
            limits: Limits::default(),
            labels: self.labels.clone(),
            cgroup_ids: Vec::new(),
            reach: Reach {
                ports: self
                    .ports
                    .iter()
                    .filter_map(|p| {
                        Some(PortMapping {
                            container_port: p.private_port.filter(|p| *p != 0)?,
                            host_port: p.public_port.filter(|p| *p != 0),
                            tcp: p.kind.as_deref().is_none_or(|k| k == "tcp"),
                        })
                    })
                    .collect(),
                addresses: Vec::new(),
                declared: declared(&self.labels),
            },
        }
    }
}

impl HostConfig {
    /// CPU from `--cpus` (NanoCpus), else from the CFS quota and period; memory if set.
    pub fn limits(&self) -> Limits {
        let nano = self.nano_cpus.filter(|n| *n > 0).map(|n| n as f64 / 1e9);
        let quota = self.cpu_quota.filter(|q| *q > 0).map(|q| {
            // Docker's period defaults to 100 ms when only the quota is given.
            let period = self.cpu_period.filter(|p| *p > 0).unwrap_or(100_000);
            q as f64 / period as f64
        });
        Limits {
            cpu_cores: nano.or(quota),
            memory_bytes: self.memory.filter(|m| *m > 0).map(|m| m as u64),
        }
    }
}

impl ContainerInspect {
    pub fn to_container(&self) -> Container {
        Container {
            id: self.id.clone(),
            name: plain_name(&self.name),
            runtime: Runtime::Docker,
            image: self.config.image.clone().or_else(|| self.image.clone()),
            network_mode: network_mode(self.host_config.network_mode.as_deref().unwrap_or("")),
            limits: self.host_config.limits(),
            labels: self.config.labels.clone(),
            cgroup_ids: Vec::new(),
            reach: Reach {
                ports: self.network_settings.mappings(),
                addresses: Vec::new(),
                declared: declared(&self.config.labels),
            },
        }
    }
}

/// Groups containers by Compose project; returns the projects and the containers in none.
pub fn group_by_compose(containers: Vec<Container>) -> (Vec<Workload>, Vec<Container>) {
    let mut projects: BTreeMap<String, Vec<Container>> = BTreeMap::new();
    let mut rest = Vec::new();
    for container in containers {
        match compose_project(&container.labels) {
            Some(project) => projects
                .entry(project.to_owned())
                .or_default()
                .push(container),
            None => rest.push(container),
        }
    }
    let workloads = projects
        .into_iter()
        .map(|(project, containers)| {
            // One mode for the project only if its containers agree.
            let first = containers
                .first()
                .map(|c| c.network_mode.clone())
                .unwrap_or_default();
            let same = containers.iter().all(|c| c.network_mode == first);
            Workload {
                kind: WorkloadKind::ComposeProject,
                id: project.clone(),
                name: project,
                namespace: None,
                labels: BTreeMap::new(),
                owner: None,
                controller: None,
                status: None,
                network_mode: if same { first } else { NetworkMode::Unknown },
                limits: Limits::default(),
                containers,
                cgroup_ids: Vec::new(),
                unlisted_since: None,
            }
        })
        .collect();
    (workloads, rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIST: &str = include_str!("fixtures/docker_containers.json");
    const INSPECT: &str = include_str!("fixtures/docker_inspect.json");

    #[test]
    fn container_list() {
        let list: Vec<ContainerSummary> = serde_json::from_str(LIST).unwrap();
        assert_eq!(list.len(), 5);
        let web = list[0].to_container();
        assert_eq!(web.name, "shop-web-1");
        assert_eq!(web.image.as_deref(), Some("nginx:1.25"));
        assert_eq!(
            web.network_mode,
            NetworkMode::Network("shop_default".into())
        );
        assert_eq!(compose_project(&web.labels), Some("shop"));
        assert!(list[2].labels.is_empty(), "null labels read as empty");
        assert_eq!(list[2].to_container().network_mode, NetworkMode::Host);
        assert_eq!(
            list[3].to_container().network_mode,
            NetworkMode::Container(
                "ba7b10d15d16e10e3de7a2dcd408a3d971169ae303f46cfad4c5453c6326fee2".into()
            )
        );
        assert!(!list[3].is_running() && list[4].is_running());
        assert_eq!(list[4].to_container().network_mode, NetworkMode::Bridge);

        let (projects, rest) = group_by_compose(list.iter().map(|c| c.to_container()).collect());
        assert_eq!(projects.len(), 1);
        assert_eq!(projects[0].kind, WorkloadKind::ComposeProject);
        assert_eq!(projects[0].id, "shop");
        assert_eq!(projects[0].containers.len(), 2);
        assert_eq!(
            projects[0].network_mode,
            NetworkMode::Network("shop_default".into())
        );
        assert_eq!(rest.len(), 3);
    }

    #[test]
    fn inspect_of_an_ecs_container() {
        let c: ContainerInspect = serde_json::from_str(INSPECT).unwrap();
        assert_eq!(c.state.pid, Some(4242));
        assert!(c.state.running);
        assert_eq!(
            c.host_config.cgroup_parent.as_deref(),
            Some("/ecs/8f03e41243824aea923aca126495f665")
        );
        let container = c.to_container();
        assert_eq!(container.name, "ecs-web-12-app-c2e5f6e0cf91b0bead01");
        assert_eq!(
            container.image.as_deref(),
            Some("111122223333.dkr.ecr.us-east-1.amazonaws.com/web:1.4")
        );
        assert_eq!(
            container.limits,
            Limits {
                cpu_cores: Some(0.5),
                memory_bytes: Some(512 << 20)
            }
        );
        assert!(
            matches!(container.network_mode, NetworkMode::Container(ref t) if t.starts_with("598cba58"))
        );
        let labels = crate::inventory::ecs::EcsLabels::from_labels(&container.labels).unwrap();
        assert_eq!(labels.task_id(), "8f03e41243824aea923aca126495f665");
    }

    #[test]
    fn limits_from_host_config() {
        let hc = |nano, quota, period, memory| HostConfig {
            nano_cpus: nano,
            cpu_quota: quota,
            cpu_period: period,
            memory,
            ..HostConfig::default()
        };
        assert_eq!(
            hc(Some(1_500_000_000), Some(0), Some(0), Some(0)).limits(),
            Limits {
                cpu_cores: Some(1.5),
                memory_bytes: None
            }
        );
        assert_eq!(
            hc(Some(0), Some(25_000), Some(0), None).limits().cpu_cores,
            Some(0.25)
        );
        assert_eq!(
            hc(None, Some(-1), Some(100_000), Some(-1)).limits(),
            Limits::default()
        );
        assert_eq!(
            hc(None, None, None, Some(1 << 30)).limits().memory_bytes,
            Some(1 << 30)
        );
    }

    #[test]
    fn network_modes() {
        assert_eq!(network_mode("default"), NetworkMode::Bridge);
        assert_eq!(network_mode("bridge"), NetworkMode::Bridge);
        assert_eq!(network_mode(""), NetworkMode::Bridge);
        assert_eq!(network_mode("host"), NetworkMode::Host);
        assert_eq!(network_mode("none"), NetworkMode::None);
        assert_eq!(
            network_mode("container:abc"),
            NetworkMode::Container("abc".into())
        );
        assert_eq!(
            network_mode("my-net"),
            NetworkMode::Network("my-net".into())
        );
    }

    #[test]
    fn odd_bodies() {
        let c: ContainerInspect = serde_json::from_str(
            r#"{"Id":"x","Config":null,"HostConfig":null,"State":null,"New":[1]}"#,
        )
        .unwrap();
        assert_eq!(c.to_container().limits, Limits::default());
        assert_eq!(c.to_container().name, "");
        let list: Vec<ContainerSummary> = serde_json::from_str(r#"[{}]"#).unwrap();
        assert_eq!(list[0].to_container().network_mode, NetworkMode::Bridge);
        for garbage in ["", "{", r#"[{"Names":"x"}]"#, r#"{"State":{"Pid":"x"}}"#] {
            assert!(
                serde_json::from_str::<Vec<ContainerSummary>>(garbage).is_err()
                    && serde_json::from_str::<ContainerInspect>(garbage).is_err(),
                "{garbage:?}"
            );
        }
    }

    /// More than 10000 containers is refused; a container's labels keep 1000.
    #[test]
    fn floods_of_containers_and_labels_are_bounded() {
        let flood = format!("[{}]", vec!["{}"; 10_001].join(","));
        assert!(serde_json::from_str::<ContainerList>(&flood).is_err());
        let list: ContainerList =
            serde_json::from_str(&format!("[{}]", vec!["{}"; 10_000].join(","))).unwrap();
        assert_eq!(list.0.len(), 10_000);
        let labels: Vec<String> = (0..3000).map(|i| format!(r#""l{i}":"v""#)).collect();
        let one: ContainerSummary = serde_json::from_str(&format!(
            r#"{{"Id":"a","Labels":{{{}}}}}"#,
            labels.join(",")
        ))
        .unwrap();
        assert_eq!(one.labels.len(), crate::inventory::MAX_NESTED);
    }

    /// Fuzzing: no list or inspect answer makes the decoders, the limits or the Compose
    /// grouping panic, and grouping keeps every container.
    mod fuzz {
        use proptest::prelude::*;

        use super::*;
        use crate::fuzz;

        const KEYS: &[&str] = &[
            "Id",
            "Names",
            "Name",
            "Image",
            "Labels",
            "State",
            "Status",
            "Running",
            "Pid",
            "HostConfig",
            "NetworkMode",
            "CgroupParent",
            "NanoCpus",
            "CpuQuota",
            "CpuPeriod",
            "Memory",
            "Config",
            COMPOSE_PROJECT,
            COMPOSE_SERVICE,
            "running",
            "host",
            "container:",
            "bridge",
        ];

        fn decode_everything(body: &[u8]) {
            if let Ok(ContainerList(list)) = serde_json::from_slice(body) {
                let containers: Vec<Container> =
                    list.iter().map(ContainerSummary::to_container).collect();
                let count = containers.len();
                let (projects, rest) = group_by_compose(containers);
                let grouped: usize = projects.iter().map(|p| p.containers.len()).sum();
                assert_eq!(grouped + rest.len(), count);
            }
            if let Ok(inspect) = serde_json::from_slice::<ContainerInspect>(body) {
                let c = inspect.to_container();
                check_limits(&c.limits);
            }
        }

        fn check_limits(l: &Limits) {
            if let Some(cpu) = l.cpu_cores {
                assert!(cpu.is_finite() && cpu > 0.0, "{cpu}");
            }
            assert_ne!(l.memory_bytes, Some(0));
        }

        proptest! {
            #![proptest_config(fuzz::config(500))]

            #[test]
            fn any_bytes(body in prop::collection::vec(any::<u8>(), 0..256)) {
                decode_everything(&body);
            }

            #[test]
            fn mutated_fixtures(body in fuzz::mutated(fuzz::json_seeds("docker"), 8)) {
                decode_everything(&body);
            }

            #[test]
            fn documents_of_engine_fields(doc in fuzz::json_value(KEYS)) {
                decode_everything(&serde_json::to_vec(&doc).unwrap());
                let list = serde_json::Value::Array(vec![doc]);
                decode_everything(&serde_json::to_vec(&list).unwrap());
            }

            #[test]
            fn any_limits(
                nano_cpus in any::<Option<i64>>(),
                cpu_quota in any::<Option<i64>>(),
                cpu_period in any::<Option<i64>>(),
                memory in any::<Option<i64>>(),
            ) {
                let host = HostConfig { nano_cpus, cpu_quota, cpu_period, memory, ..HostConfig::default() };
                check_limits(&host.limits());
            }

            #[test]
            fn any_network_mode(mode in ".{0,30}") {
                let _ = network_mode(&mode);
            }
        }
    }

    #[test]
    fn the_port_map_and_the_declaring_labels() {
        let inspect: ContainerInspect = serde_json::from_str(
            r#"{"Id":"abc","Name":"/app",
                "Config":{"Labels":{"ECS_PROMETHEUS_EXPORTER_PORT":"9100","com.amazonaws.ecs.task-arn":"a",
                    "mackerel.io/plugins":"gostats","mackerel.io/roles":"r:r"}},
                "NetworkSettings":{"Ports":{
                    "9100/tcp":[{"HostIp":"0.0.0.0","HostPort":"32770"},{"HostIp":"::","HostPort":"32770"}],
                    "53/udp":[{"HostIp":"0.0.0.0","HostPort":"5353"}],
                    "8080/tcp":null}}}"#,
        )
        .unwrap();
        let c = inspect.to_container();
        assert_eq!(
            c.reach.ports,
            [
                PortMapping {
                    container_port: 53,
                    host_port: Some(5353),
                    tcp: false
                },
                PortMapping {
                    container_port: 8080,
                    host_port: None,
                    tcp: true
                },
                PortMapping {
                    container_port: 9100,
                    host_port: Some(32770),
                    tcp: true
                },
            ]
        );
        assert_eq!(
            c.reach.declared,
            BTreeMap::from([
                (
                    "ECS_PROMETHEUS_EXPORTER_PORT".to_string(),
                    "9100".to_string()
                ),
                ("mackerel.io/plugins".to_string(), "gostats".to_string())
            ])
        );
        let list: Vec<ContainerSummary> = serde_json::from_str(LIST).unwrap();
        assert_eq!(
            list[0].to_container().reach.ports,
            [PortMapping {
                container_port: 80,
                host_port: Some(8080),
                tcp: true
            }]
        );
    }
}
