//! Label sets of the per-workload and per-container series.
//!
//! Which labels name a workload depends on its platform, following each ecosystem's habits:
//! `namespace`, `pod`, `container` for Kubernetes (cAdvisor, kube-state-metrics); `cluster`,
//! `task_id`, `family`, `container` for ECS; `compose_project`, `container` for Compose. Never a
//! cgroup path or id: every label here takes at most as many values as there are live
//! containers, and the series of a container go away with it.

use prometheus_client::encoding::{EncodeLabelSet, LabelSetEncoder};

use crate::snapshot::{ContainerReport, WorkloadKind, WorkloadReport};

/// Kubernetes: the pod's namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, EncodeLabelSet)]
pub struct PodLabels {
    pub namespace: String,
    pub pod: String,
}

/// ECS: the task, by its id (the last component of its ARN) and task definition family.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, EncodeLabelSet)]
pub struct EcsTaskLabels {
    #[prometheus(flatten)]
    pub cluster: Cluster,
    pub task_id: String,
    pub family: String,
}

/// `cluster`, left out (not written empty) when the source does not know it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cluster(pub Option<String>);

impl EncodeLabelSet for Cluster {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        match &self.0 {
            Some(cluster) => [("cluster", cluster.as_str())].encode(encoder),
            None => Ok(()),
        }
    }
}

/// Docker Compose: the project name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, EncodeLabelSet)]
pub struct ComposeLabels {
    pub compose_project: String,
}

/// A container that belongs to no task, pod or project: its name is the workload's.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, EncodeLabelSet)]
pub struct StandaloneLabels {
    pub container: String,
}

/// What names a workload, by platform.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WorkloadLabels {
    Pod(PodLabels),
    EcsTask(EcsTaskLabels),
    Compose(ComposeLabels),
    Standalone(StandaloneLabels),
}

impl EncodeLabelSet for WorkloadLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        match self {
            Self::Pod(l) => l.encode(encoder),
            Self::EcsTask(l) => l.encode(encoder),
            Self::Compose(l) => l.encode(encoder),
            Self::Standalone(l) => l.encode(encoder),
        }
    }
}

impl WorkloadLabels {
    /// The labels of `w`, from what the inventory reports: a pod's name is "namespace/name",
    /// a task's "family:revision".
    pub fn of(w: &WorkloadReport) -> Self {
        match w.kind {
            WorkloadKind::KubernetesPod => {
                let namespace = w.namespace.clone().unwrap_or_default();
                let pod = w
                    .name
                    .strip_prefix(namespace.as_str())
                    .and_then(|rest| rest.strip_prefix('/'))
                    .unwrap_or(&w.name)
                    .to_owned();
                Self::Pod(PodLabels { namespace, pod })
            }
            WorkloadKind::EcsTask => Self::EcsTask(EcsTaskLabels {
                cluster: Cluster(w.namespace.clone().filter(|c| !c.is_empty())),
                task_id: w.id.clone(),
                family: w
                    .name
                    .rsplit_once(':')
                    .map_or(w.name.as_str(), |(f, _)| f)
                    .to_owned(),
            }),
            WorkloadKind::ComposeProject => Self::Compose(ComposeLabels {
                compose_project: w.name.clone(),
            }),
            WorkloadKind::Container => Self::Standalone(StandaloneLabels {
                container: w.name.clone(),
            }),
        }
    }
}

/// `kind`: "ecs_task", "kubernetes_pod", "compose_project" or "container".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

impl From<WorkloadKind> for KindLabel {
    fn from(kind: WorkloadKind) -> Self {
        let kind = match kind {
            WorkloadKind::EcsTask => "ecs_task",
            WorkloadKind::KubernetesPod => "kubernetes_pod",
            WorkloadKind::ComposeProject => "compose_project",
            WorkloadKind::Container => "container",
        };
        Self { kind }
    }
}

/// The labels of a workload's series: its kind, then its platform's names.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, EncodeLabelSet)]
pub struct WorkloadSeries {
    #[prometheus(flatten)]
    pub kind: KindLabel,
    #[prometheus(flatten)]
    pub workload: WorkloadLabels,
}

impl WorkloadSeries {
    pub fn of(w: &WorkloadReport) -> Self {
        Self {
            kind: w.kind.into(),
            workload: WorkloadLabels::of(w),
        }
    }
}

/// The labels of a container's series: its workload's names and its own.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContainerSeries {
    pub workload: WorkloadLabels,
    pub container: String,
}

impl ContainerSeries {
    pub fn of(w: &WorkloadReport, c: &ContainerReport) -> Self {
        Self {
            workload: WorkloadLabels::of(w),
            container: c.name.clone(),
        }
    }
}

impl EncodeLabelSet for ContainerSeries {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        match &self.workload {
            // A workload of one container is named by that container already.
            WorkloadLabels::Standalone(_) => {}
            other => other.encode(encoder)?,
        }
        [("container", self.container.as_str())].encode(encoder)
    }
}

/// `interface_class`: traffic on the loopback device is kept apart from every other device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct InterfaceClass {
    pub interface_class: &'static str,
}

impl InterfaceClass {
    pub const DEVICE: Self = Self {
        interface_class: "device",
    };
    pub const LOOPBACK: Self = Self {
        interface_class: "loopback",
    };
}

/// `source` of the inventory: "ecs", "kubernetes", "docker".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct SourceLabel {
    pub source: &'static str,
}

/// `sink` of observer's own output metrics: "json", "table", "prometheus", "mackerel".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct SinkLabel {
    pub sink: &'static str,
}

/// The extra facts of `observer_container_info`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ContainerInfo {
    pub container_id: String,
    pub image: String,
    pub network_mode: String,
}

/// The extra facts of `observer_workload_info`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct WorkloadInfo {
    #[prometheus(flatten)]
    pub owner: Owner,
    pub network_mode: String,
}

/// `owner_kind` and `owner_name` (a pod's Deployment, say), left out when there is none.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Owner(pub Option<(String, String)>);

impl EncodeLabelSet for Owner {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        match &self.0 {
            Some((kind, name)) => {
                [("owner_kind", kind.as_str()), ("owner_name", name.as_str())].encode(encoder)
            }
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use prometheus_client::{
        collector::Collector,
        encoding::{DescriptorEncoder, EncodeMetric},
        metrics::{gauge::ConstGauge, TypedMetric},
        registry::Registry,
    };

    use super::*;
    use crate::snapshot::{NetworkMode, Usage};

    fn workload(kind: WorkloadKind, name: &str, namespace: Option<&str>) -> WorkloadReport {
        WorkloadReport {
            kind,
            id: "8f03e41243824aea923aca126495f665".into(),
            name: name.into(),
            namespace: namespace.map(Into::into),
            labels: BTreeMap::new(),
            controller: None,
            network_mode: NetworkMode::Awsvpc,
            cgroup_ids: vec![],
            traffic: Default::default(),
            usage: Usage::default(),
            containers: vec![],
        }
    }

    /// One gauge family with the given label sets, as the text format writes it.
    fn exposition<S: EncodeLabelSet + std::fmt::Debug + Send + Sync + 'static>(
        sets: Vec<S>,
    ) -> String {
        #[derive(Debug)]
        struct Sets<S>(Vec<S>);
        impl<S: EncodeLabelSet + std::fmt::Debug + Send + Sync + 'static> Collector for Sets<S> {
            fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
                let mut family =
                    encoder.encode_descriptor("t", "t", None, ConstGauge::<i64>::TYPE)?;
                for s in &self.0 {
                    ConstGauge::new(1i64).encode(family.encode_family(s)?)?;
                }
                Ok(())
            }
        }
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Sets(sets)));
        let mut out = String::new();
        prometheus_client::encoding::text::encode_registry(&mut out, &registry).unwrap();
        out.lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn each_platform_names_its_workloads_its_own_way() {
        let pod = workload(
            WorkloadKind::KubernetesPod,
            "shop/web-5d9f7-abcde",
            Some("shop"),
        );
        let task = workload(WorkloadKind::EcsTask, "web:12", Some("prod"));
        let mut lone_task = workload(WorkloadKind::EcsTask, "batch", None);
        lone_task.id = "0123".into();
        let compose = workload(WorkloadKind::ComposeProject, "shop", None);
        let lone = workload(WorkloadKind::Container, "redis", None);
        let out = exposition(
            [&pod, &task, &lone_task, &compose, &lone]
                .into_iter()
                .map(WorkloadSeries::of)
                .collect(),
        );
        assert_eq!(
            out,
            [
                r#"t{kind="kubernetes_pod",namespace="shop",pod="web-5d9f7-abcde"} 1"#,
                r#"t{kind="ecs_task",cluster="prod",task_id="8f03e41243824aea923aca126495f665",family="web"} 1"#,
                r#"t{kind="ecs_task",task_id="0123",family="batch"} 1"#,
                r#"t{kind="compose_project",compose_project="shop"} 1"#,
                r#"t{kind="container",container="redis"} 1"#,
            ]
            .join("\n")
        );
    }

    #[test]
    fn containers_add_their_name_once() {
        let pod = workload(WorkloadKind::KubernetesPod, "shop/web", Some("shop"));
        let lone = workload(WorkloadKind::Container, "redis", None);
        let c = |name: &str| ContainerReport {
            id: "c".repeat(64),
            name: name.into(),
            image: None,
            network_mode: NetworkMode::Pod,
            cgroup_ids: vec![],
            traffic: Default::default(),
            usage: Usage::default(),
            reach: Default::default(),
        };
        let out = exposition(vec![
            ContainerSeries::of(&pod, &c("app")),
            ContainerSeries::of(&lone, &c("redis")),
        ]);
        assert_eq!(
            out,
            [
                r#"t{namespace="shop",pod="web",container="app"} 1"#,
                r#"t{container="redis"} 1"#,
            ]
            .join("\n")
        );
    }

    #[test]
    fn odd_names_are_escaped() {
        let names = [
            "quote\"d",
            r"back\slash",
            "new\nline",
            "ünïcødé-コンテナ-🚀",
            "all\\\"\n",
        ];
        let out = exposition(
            names
                .iter()
                .map(|n| StandaloneLabels {
                    container: n.to_string(),
                })
                .collect(),
        );
        assert_eq!(
            out,
            [
                r#"t{container="quote\"d"} 1"#,
                r#"t{container="back\\slash"} 1"#,
                r#"t{container="new\nline"} 1"#,
                r#"t{container="ünïcødé-コンテナ-🚀"} 1"#,
                r#"t{container="all\\\"\n"} 1"#,
            ]
            .join("\n")
        );
        assert_eq!(
            out.lines().count(),
            names.len(),
            "a newline never breaks a sample"
        );
    }
}
