//! The inventory: which containers run on this node, which ECS task, Kubernetes pod or Compose
//! project each belongs to, and which cgroups are theirs.
//!
//! Each platform is a folder with its API's decoding (pure, tested on fixtures) and its
//! [`InventorySource`] (the I/O): [`ecs`], [`kubernetes`], [`docker`]. [`sources`] builds the
//! one `--platform` names or [`detect`] finds, [`refresh::Refresher`] keeps its answer fresh,
//! and [`Inventory::attach_cgroups`] hangs the cgroup ids of the v2 hierarchy on it, using what
//! [`cgroup_path`] reads out of each cgroup's path.

pub mod cgroup_path;
pub mod detect;
pub mod docker;
pub mod ecs;
mod http;
pub mod kubernetes;
pub mod refresh;
pub mod sources;

use std::{
    collections::{BTreeMap, HashMap},
    time::SystemTime,
};

use serde::{Deserialize, Deserializer, Serialize};

use cgroup_path::{CgroupIdentity, Owner};
pub use sources::{InventoryFuture, InventorySource, NoSource, SourceError};

// Shared with the reports: one model of what a workload and a network mode are.
pub use crate::snapshot::{NetworkMode, OwnerRef, PortMapping, Reach, WorkloadKind};

/// Docker label (ECS task containers) or pod annotation whose value, "service:role,...",
/// names the Mackerel roles of a task's or pod's host.
pub const ROLES_LABEL: &str = "mackerel.io/roles";
/// Docker label or pod annotation, `"true"` or `"false"`: whether the task or pod is a
/// Mackerel host (`--mackerel-hosts`). For a task, any container's label counts; false wins.
pub const HOST_LABEL: &str = "mackerel.io/host";
/// Docker label or pod annotation: the Mackerel host's display name.
pub const DISPLAY_NAME_LABEL: &str = "mackerel.io/display-name";
/// Docker label or pod annotation: the Mackerel host's memo.
pub const MEMO_LABEL: &str = "mackerel.io/memo";
/// Docker label or pod annotation: the names of the operator's mackerel-agent plugins to run
/// for the task or pod, comma-separated (docs/plugins.md).
pub const PLUGINS_LABEL: &str = "mackerel.io/plugins";
/// The labels and annotations observer reads for Mackerel, carried with a workload's labels.
pub const MACKEREL_LABELS: [&str; 5] = [
    ROLES_LABEL,
    HOST_LABEL,
    DISPLAY_NAME_LABEL,
    MEMO_LABEL,
    PLUGINS_LABEL,
];

/// A `mackerel.io/host` value: true, false, or None for anything else (ignored, with a
/// warning where it is used).
pub fn host_label_value(value: &str) -> Option<bool> {
    let value = value.trim();
    if value.eq_ignore_ascii_case("true") {
        Some(true)
    } else if value.eq_ignore_ascii_case("false") {
        Some(false)
    } else {
        None
    }
}

/// Everything a source knows about the node at one moment.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Inventory {
    /// [`InventorySource::name`] of the source that produced it.
    pub source: &'static str,
    /// When the source's answer arrived.
    pub fetched_at: SystemTime,
    /// Node-level facts: ECS cluster and container instance, Kubernetes node name.
    pub node: NodeInfo,
    /// ECS tasks, Kubernetes pods or Compose projects.
    pub workloads: Vec<Workload>,
    /// Containers that belong to no task, pod or project (plain `docker run`).
    pub standalone: Vec<Container>,
    /// Set when the source answered from a fallback (the ECS agent was down, tasks come from
    /// Docker labels): why, for the output and the log.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub degraded: Option<String>,
    /// Set by [`refresh::Refresher`] while the source fails: this is the last good inventory,
    /// kept since then.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stale: Option<Stale>,
    /// Workloads the answer lists as ended (ECS `KnownStatus` STOPPED, pod phase Succeeded or
    /// Failed): not in `workloads`, and gone whatever cgroups of theirs linger. At most one
    /// answer's worth ([`MAX_ITEMS`]), replaced by every answer.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub stopped: Vec<(WorkloadKind, String)>,
}

/// Why an inventory is old: its source has been failing since `since`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Stale {
    /// The first failure of this outage.
    pub since: SystemTime,
    /// The latest failure's reason.
    pub reason: String,
    /// Failed attempts in this outage.
    pub failures: u32,
}

/// Facts about the node as the platform sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct NodeInfo {
    /// ECS cluster name.
    pub cluster: Option<String>,
    /// ECS container instance ARN, or the Kubernetes node name.
    pub instance: Option<String>,
    /// Version of the agent that answered (ECS agent), for the start-up log.
    pub agent_version: Option<String>,
}

/// An ECS task, a Kubernetes pod or a Compose project, with its containers.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Workload {
    pub kind: WorkloadKind,
    /// The key the cgroup paths use: ECS task id (the last ARN component), pod UID, or the
    /// Compose project name.
    pub id: String,
    /// For people: "family:revision", "namespace/name", or the project name.
    pub name: String,
    /// Kubernetes namespace or ECS cluster.
    pub namespace: Option<String>,
    /// Pod labels; for ECS and Compose the labels are on the containers.
    pub labels: BTreeMap<String, String>,
    /// The direct owner as the platform reports it (a pod's controlling ReplicaSet, say).
    pub owner: Option<OwnerRef>,
    /// The top-level owner when it can be derived without more API calls (the Deployment
    /// behind a ReplicaSet); otherwise the same as `owner`.
    pub controller: Option<OwnerRef>,
    /// Platform status string as reported ("RUNNING", "Running").
    pub status: Option<String>,
    pub network_mode: NetworkMode,
    pub limits: Limits,
    pub containers: Vec<Container>,
    /// cgroups of this workload that no listed container claims: the task or pod cgroup itself,
    /// sandbox (pause) containers the API does not list, CRI-O's conmon.
    pub cgroup_ids: Vec<u64>,
    /// Set by [`refresh::Refresher`]: the source's answers have not listed this workload since
    /// then, nor said it stopped, and its cgroups still hold processes, so it is kept as it was last
    /// listed. None for a workload of the latest answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unlisted_since: Option<SystemTime>,
}

/// One container as the platform lists it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Container {
    /// The runtime's id: 64 hex digits for Docker, containerd and CRI-O.
    pub id: String,
    pub name: String,
    pub runtime: Runtime,
    pub image: Option<String>,
    pub network_mode: NetworkMode,
    pub limits: Limits,
    pub labels: BTreeMap<String, String>,
    /// cgroup v2 ids of this container: usually one; CRI-O with crun adds a `container` child.
    pub cgroup_ids: Vec<u64>,
    /// Its ports, addresses and scrape declarations (for `appmetrics`).
    #[serde(skip_serializing_if = "reach_is_empty")]
    pub reach: Reach,
}

fn reach_is_empty(reach: &Reach) -> bool {
    *reach == Reach::default()
}

/// The container runtime a container id belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum Runtime {
    #[serde(rename = "docker")]
    Docker,
    #[serde(rename = "containerd")]
    Containerd,
    #[serde(rename = "cri-o")]
    CriO,
    #[serde(rename = "unknown")]
    Unknown,
}

/// Resource limits. None means no limit, or none the source reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Limits {
    /// CPU in cores (1.0 = one core).
    pub cpu_cores: Option<f64>,
    pub memory_bytes: Option<u64>,
}

impl Workload {
    /// Every cgroup attached to it: its containers' and its own.
    pub fn all_cgroup_ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.containers
            .iter()
            .flat_map(|c| c.cgroup_ids.iter())
            .chain(&self.cgroup_ids)
            .copied()
    }
}

impl Inventory {
    /// An inventory with nothing in it, from `source`, now.
    pub fn empty(source: &'static str) -> Self {
        Self {
            source,
            fetched_at: SystemTime::now(),
            node: NodeInfo::default(),
            workloads: Vec::new(),
            standalone: Vec::new(),
            degraded: None,
            stale: None,
            stopped: Vec::new(),
        }
    }

    /// Attributes cgroups (v2 id, path relative to the v2 root) to the containers and workloads
    /// of this inventory, replacing earlier attributions.
    ///
    /// A container cgroup goes to the listed container with that id; a cgroup under a task or
    /// pod that no listed container claims goes to the workload itself. In a nested path (a
    /// kind node's pods) the innermost container, task or pod listed wins, so the node container
    /// takes its pods' cgroups when the platform lists only it (plain Docker). Returns the cgroups that
    /// look like a container or a task/pod but matched nothing: the inventory is older than
    /// they are, so the caller should refresh it.
    pub fn attach_cgroups<'a>(
        &mut self,
        cgroups: impl IntoIterator<Item = (u64, &'a str)>,
    ) -> Vec<Unmatched> {
        // Indices into self.workloads / containers, so the borrow ends before the updates.
        let mut by_container: HashMap<&str, (Option<usize>, usize)> = HashMap::new();
        let mut by_owner: HashMap<(WorkloadKind, &str), usize> = HashMap::new();
        for (t, task) in self.workloads.iter().enumerate() {
            by_owner.insert((task.kind, task.id.as_str()), t);
            for (c, container) in task.containers.iter().enumerate() {
                by_container.insert(container.id.as_str(), (Some(t), c));
            }
        }
        for (c, container) in self.standalone.iter().enumerate() {
            by_container.insert(container.id.as_str(), (None, c));
        }

        enum Target {
            Container(Option<usize>, usize),
            Workload(usize),
        }
        let mut targets = Vec::new();
        let mut unmatched = Vec::new();
        for (cgroup_id, path) in cgroups {
            let identity = CgroupIdentity::parse(path);
            // Innermost first: a nested node's pod where the platform lists it, else the node
            // container (what the host's Docker lists), else nothing.
            let target = identity.candidates().find_map(|(container, owner)| {
                let container = container.and_then(|id| by_container.get(id));
                let owner = owner.and_then(|owner| {
                    let key = match owner {
                        Owner::EcsTask { task_id } => (WorkloadKind::EcsTask, task_id.as_str()),
                        Owner::KubernetesPod { uid, .. } => {
                            (WorkloadKind::KubernetesPod, uid.as_str())
                        }
                    };
                    by_owner.get(&key)
                });
                match (container, owner) {
                    (Some(&(t, c)), _) => Some(Target::Container(t, c)),
                    (None, Some(&t)) => Some(Target::Workload(t)),
                    (None, None) => None,
                }
            });
            match target {
                Some(target) => targets.push((cgroup_id, target)),
                None => {
                    let looks_known = (identity.candidates())
                        .any(|(container, owner)| container.is_some() || owner.is_some());
                    if looks_known {
                        unmatched.push(Unmatched {
                            cgroup_id,
                            identity,
                        });
                    }
                }
            }
        }

        for task in &mut self.workloads {
            task.cgroup_ids.clear();
            task.containers
                .iter_mut()
                .for_each(|c| c.cgroup_ids.clear());
        }
        self.standalone
            .iter_mut()
            .for_each(|c| c.cgroup_ids.clear());
        for (cgroup_id, target) in targets {
            match target {
                Target::Container(Some(t), c) => {
                    self.workloads[t].containers[c].cgroup_ids.push(cgroup_id)
                }
                Target::Container(None, c) => self.standalone[c].cgroup_ids.push(cgroup_id),
                Target::Workload(t) => self.workloads[t].cgroup_ids.push(cgroup_id),
            }
        }
        unmatched
    }
}

/// A cgroup that looks like a container or a task/pod the inventory does not list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unmatched {
    pub cgroup_id: u64,
    pub identity: CgroupIdentity,
}

/// Deserializes JSON `null` as the type's default: Go encodes nil slices and maps as `null`.
pub(crate) fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

/// Most pods, tasks or containers one answer may list. A node runs a few hundred at most
/// (the kubelet's `--max-pods` defaults to 110); an answer with more is refused before the rest
/// is decoded, so a flood of tiny items cannot multiply into much more memory than the body.
pub const MAX_ITEMS: usize = 10_000;

/// Most entries kept of a list or map inside one item (a task's containers, a pod's labels):
/// far more than any workload has. The rest are skipped unread rather than refused, so one
/// workload's spec cannot fail the node's inventory.
pub const MAX_NESTED: usize = 1_000;

/// What to do with the entries past a limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Past {
    Refuse,
    Skip,
}

/// A JSON array (or `null`, as empty) of at most `limit` elements.
struct BoundedSeq<T> {
    limit: usize,
    past: Past,
    item: std::marker::PhantomData<T>,
}

impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for BoundedSeq<T> {
    type Value = Vec<T>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "an array of at most {} items", self.limit)
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<Vec<T>, E> {
        Ok(Vec::new())
    }

    fn visit_none<E: serde::de::Error>(self) -> Result<Vec<T>, E> {
        Ok(Vec::new())
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Vec<T>, D::Error> {
        d.deserialize_seq(self)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
        // The size hint is the sender's to choose: never trusted for the allocation.
        let mut items = Vec::new();
        while items.len() < self.limit {
            match seq.next_element()? {
                Some(item) => items.push(item),
                None => return Ok(items),
            }
        }
        match self.past {
            Past::Refuse if seq.next_element::<serde::de::IgnoredAny>()?.is_some() => {
                Err(serde::de::Error::custom(format_args!(
                    "more than {} items in one list",
                    self.limit
                )))
            }
            Past::Refuse => Ok(items),
            Past::Skip => {
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(items)
            }
        }
    }
}

/// Deserializes a JSON array (or `null`, as empty) of at most `limit` elements; past that, an
/// error that says so, before the rest is decoded.
pub(crate) fn bounded_seq<'de, D, T>(deserializer: D, limit: usize) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    deserializer.deserialize_option(BoundedSeq {
        limit,
        past: Past::Refuse,
        item: std::marker::PhantomData,
    })
}

/// [`bounded_seq`] with [`MAX_ITEMS`], for `deserialize_with`: a whole answer's list.
pub(crate) fn at_most_max_items<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    bounded_seq(deserializer, MAX_ITEMS)
}

/// A list inside one item (or `null`, as empty): its first [`MAX_NESTED`] elements.
pub(crate) fn nested_seq<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    deserializer.deserialize_option(BoundedSeq {
        limit: MAX_NESTED,
        past: Past::Skip,
        item: std::marker::PhantomData,
    })
}

/// A map inside one item, labels say (or `null`, as empty): its first [`MAX_NESTED`] entries.
pub(crate) fn nested_map<'de, D, V>(deserializer: D) -> Result<BTreeMap<String, V>, D::Error>
where
    D: Deserializer<'de>,
    V: Deserialize<'de>,
{
    struct Bounded<V>(std::marker::PhantomData<V>);
    impl<'de, V: Deserialize<'de>> serde::de::Visitor<'de> for Bounded<V> {
        type Value = BTreeMap<String, V>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an object")
        }

        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(BTreeMap::new())
        }

        fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(BTreeMap::new())
        }

        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_map(self)
        }

        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<Self::Value, A::Error> {
            let mut out = BTreeMap::new();
            while out.len() < MAX_NESTED {
                match map.next_entry()? {
                    Some((k, v)) => {
                        out.insert(k, v);
                    }
                    None => return Ok(out),
                }
            }
            while map
                .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
                .is_some()
            {}
            Ok(out)
        }
    }
    deserializer.deserialize_option(Bounded(std::marker::PhantomData))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CID_A: &str = "5fc21e5b015f899d22618f8aede80b6d70d71b2a75465ea49d9462c8f3d2d3af";
    const CID_B: &str = "ee08638adaaf009d78c248913f629e38299471d45fe7dc944d1039077e3424ca";
    const PAUSE: &str = "598cba581fe3f939459eaba1e071d5c93bb2c49b7d1ba7db6bb19deeb70d8e38";
    const LONE: &str = "73051af271105c07e1f493b34856a77e665e3b0b4fc72f76c807dfbffeb881bd";
    const NEW: &str = "17db96a24ae1e9dd57143e62b1cb0d2d35e693c65c774c7470e87b0572e07c1a";
    const TASK: &str = "8f03e41243824aea923aca126495f665";

    fn container(id: &str) -> Container {
        Container {
            id: id.into(),
            name: "app".into(),
            runtime: Runtime::Docker,
            image: None,
            network_mode: NetworkMode::Unknown,
            limits: Limits::default(),
            labels: BTreeMap::new(),
            cgroup_ids: vec![99],
            reach: Default::default(),
        }
    }

    fn inventory() -> Inventory {
        let mut inv = Inventory::empty("test");
        inv.workloads.push(Workload {
            kind: WorkloadKind::EcsTask,
            id: TASK.into(),
            name: "web:12".into(),
            namespace: None,
            labels: BTreeMap::new(),
            owner: None,
            controller: None,
            status: None,
            network_mode: NetworkMode::Awsvpc,
            limits: Limits::default(),
            containers: vec![container(CID_A), container(CID_B)],
            cgroup_ids: vec![98],
            unlisted_since: None,
        });
        inv.standalone.push(container(LONE));
        inv
    }

    #[test]
    fn cgroups_attach_to_containers_and_workloads() {
        let mut inv = inventory();
        let a = format!("/ecs/{TASK}/{CID_A}");
        let b = format!("/ecs/{TASK}/{CID_B}");
        let pause = format!("/ecs/{TASK}/{PAUSE}");
        let task = format!("/ecs/{TASK}");
        let lone = format!("/docker/{LONE}");
        let new = format!("/docker/{NEW}");
        let other_task = format!("/ecs/{}/{NEW}", "0".repeat(32));
        let unmatched = inv.attach_cgroups([
            (1, a.as_str()),
            (2, b.as_str()),
            (3, pause.as_str()),
            (4, task.as_str()),
            (5, lone.as_str()),
            (6, new.as_str()),
            (7, "/system.slice/sshd.service"),
            (8, other_task.as_str()),
        ]);
        let task = &inv.workloads[0];
        assert_eq!(task.containers[0].cgroup_ids, [1]);
        assert_eq!(task.containers[1].cgroup_ids, [2]);
        assert_eq!(
            task.cgroup_ids,
            [3, 4],
            "pause and the task cgroup go to the task"
        );
        assert_eq!(inv.standalone[0].cgroup_ids, [5]);
        let ids: Vec<u64> = unmatched.iter().map(|u| u.cgroup_id).collect();
        assert_eq!(
            ids,
            [6, 8],
            "unknown containers and tasks ask for a refresh; plain ones do not"
        );
    }

    const UID: &str = "8712f785-1a3e-41ec-a00b-e2dcc77431cb";
    const UID_SD: &str = "8712f785_1a3e_41ec_a00b_e2dcc77431cb";

    /// Paths inside a kind node seen from the host: its pod's container, the pod's pause
    /// container, and the node's own kubelet.
    fn kind_node_paths() -> [String; 3] {
        let pod = format!(
            "/system.slice/docker-{LONE}.scope/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_SD}.slice"
        );
        [
            format!("{pod}/cri-containerd-{CID_A}.scope"),
            format!("{pod}/cri-containerd-{PAUSE}.scope"),
            format!("/system.slice/docker-{LONE}.scope/system.slice/kubelet.service"),
        ]
    }

    #[test]
    fn nested_pods_attach_to_the_pod_the_platform_lists() {
        let mut inv = Inventory::empty("test");
        inv.workloads.push(Workload {
            kind: WorkloadKind::KubernetesPod,
            id: UID.into(),
            name: "default/web".into(),
            containers: vec![container(CID_A)],
            cgroup_ids: vec![],
            ..inventory().workloads.remove(0)
        });
        let [app, pause, kubelet] = kind_node_paths();
        let unmatched = inv.attach_cgroups([
            (1, app.as_str()),
            (2, pause.as_str()),
            (3, kubelet.as_str()),
        ]);
        let pod = &inv.workloads[0];
        assert_eq!(
            pod.containers[0].cgroup_ids,
            [1],
            "the inner container wins"
        );
        assert_eq!(
            pod.cgroup_ids,
            [2],
            "the unlisted pause container goes to its pod"
        );
        let ids: Vec<u64> = unmatched.iter().map(|u| u.cgroup_id).collect();
        assert_eq!(
            ids,
            [3],
            "the node container is not listed: it asks for a refresh"
        );
    }

    #[test]
    fn nested_pods_fall_back_to_the_node_container() {
        // Plain Docker on the host lists the node container and nothing inside it.
        let mut inv = Inventory::empty("test");
        inv.standalone.push(container(LONE));
        let [app, pause, kubelet] = kind_node_paths();
        let unmatched = inv.attach_cgroups([
            (1, app.as_str()),
            (2, pause.as_str()),
            (3, kubelet.as_str()),
        ]);
        assert!(unmatched.is_empty(), "{unmatched:?}");
        assert_eq!(inv.standalone[0].cgroup_ids, [1, 2, 3]);
    }

    #[test]
    fn lists_are_bounded() {
        #[derive(Debug, Deserialize)]
        struct List {
            #[serde(deserialize_with = "at_most_max_items")]
            items: Vec<u8>,
        }
        let list = |n: usize| format!(r#"{{"items":[{}]}}"#, vec!["1"; n].join(","));
        assert_eq!(
            serde_json::from_str::<List>(&list(MAX_ITEMS))
                .unwrap()
                .items
                .len(),
            MAX_ITEMS
        );
        let err = serde_json::from_str::<List>(&list(MAX_ITEMS + 1)).unwrap_err();
        assert!(err.to_string().contains("more than 10000 items"), "{err}");
        let null: List = serde_json::from_str(r#"{"items":null}"#).unwrap();
        assert!(null.items.is_empty());
        assert!(serde_json::from_str::<List>(r#"{"items":{}}"#).is_err());
    }

    /// A workload's own lists and maps keep their first entries; the rest are skipped unread.
    #[test]
    fn nested_lists_and_maps_are_cut() {
        #[derive(Debug, Deserialize)]
        struct Item {
            #[serde(deserialize_with = "nested_seq")]
            list: Vec<u32>,
            #[serde(deserialize_with = "nested_map")]
            labels: BTreeMap<String, String>,
        }
        let n = MAX_NESTED + 500;
        let list = (0..n).map(|i| i.to_string()).collect::<Vec<_>>().join(",");
        let labels = (0..n)
            .map(|i| format!(r#""k{i}":"v""#))
            .collect::<Vec<_>>()
            .join(",");
        let body = format!(r#"{{"list":[{list}],"labels":{{{labels}}},"after":[1]}}"#);
        let item: Item = serde_json::from_str(&body).unwrap();
        assert_eq!(item.list.len(), MAX_NESTED);
        assert_eq!(item.list[MAX_NESTED - 1], MAX_NESTED as u32 - 1);
        assert_eq!(item.labels.len(), MAX_NESTED);
        let null: Item = serde_json::from_str(r#"{"list":null,"labels":null}"#).unwrap();
        assert!(null.list.is_empty() && null.labels.is_empty());
        // Still checked for syntax past the cut.
        let bad = format!(r#"{{"list":[{list},],"labels":{{}}}}"#);
        assert!(serde_json::from_str::<Item>(&bad).is_err());
    }

    #[test]
    fn network_modes_serialize_with_their_target() {
        let json = serde_json::to_string(&NetworkMode::Container(PAUSE.into())).unwrap();
        assert_eq!(
            json,
            format!(r#"{{"mode":"container","target":"{PAUSE}"}}"#)
        );
        assert_eq!(
            serde_json::to_string(&NetworkMode::Host).unwrap(),
            r#"{"mode":"host"}"#
        );
        assert_eq!(serde_json::to_string(&Runtime::CriO).unwrap(), r#""cri-o""#);
    }
}
