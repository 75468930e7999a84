//! What a cgroup path says about its container: runtime, container id, and the ECS task or
//! Kubernetes pod it sits under.
//!
//! Paths are relative to the root of a hierarchy (v2, or any v1 controller), as
//! `/proc/<pid>/cgroup` or a walk of the hierarchy gives them. The layouts Docker, the ECS agent,
//! the kubelet and the CRI runtimes make:
//!
//! | platform | path |
//! |---|---|
//! | Docker, cgroupfs | `/docker/<id>` |
//! | Docker, systemd | `/system.slice/docker-<id>.scope` |
//! | ECS, cgroup v1 | `/ecs/<task id>/<id>` (task id 32 hex, or a dashed UUID for old ARNs) |
//! | ECS, cgroup v1, older agents | `/ecs/<cluster>/<task id>/<id>` |
//! | ECS, cgroup v2 | `/ecstasks.slice/ecstasks-<task id>.slice/docker-<id>.scope` |
//! | Kubernetes, cgroupfs | `/kubepods[/burstable\|/besteffort]/pod<uid>/<leaf>` |
//! | Kubernetes, systemd | `/kubepods.slice[/kubepods-<qos>.slice]/kubepods[-<qos>]-pod<uid_with_underscores>.slice/<leaf>` |
//! | containerd, mixed | `.../kubepods-<qos>-pod<uid>.slice:cri-containerd:<id>` |
//! | a node in a container (kind, minikube) | any of these below a container: `/docker/<node>/kubepods/...`, `/system.slice/docker-<node>.scope/kubepods.slice/...`, `/actions_job/<node>/kubepods/...` |
//!
//! Leaves: `<id>` (containerd or Docker, cgroupfs), `cri-containerd-<id>.scope`,
//! `crio-<id>.scope`, `crio-<id>`, `docker-<id>.scope`; crun adds a `container` child under
//! CRI-O's scope; `crio-conmon-<id>.scope` is CRI-O's monitor, not a container.
//!
//! Containers inside containers (a node's pods, Docker in Docker) give the innermost container
//! and its task or pod, with the containers around it; which one a cgroup goes to is the
//! platform's to say (the innermost it lists, [`CgroupIdentity::candidates`]).
//!
//! A cgroup namespace shows cgroups outside it with leading `/..` components, so matching is
//! never anchored at the root. Anything else is a plain cgroup: kept, never an error.
//!
//! `testdata/cgroup_paths.tsv` holds 91 real-world paths from other projects' tests with the
//! answers those tests expect: 85 are attributed right; the other 6 are layouts left out on
//! purpose (rkt's and Cloud Foundry's ids, Podman's `libpod-<id>`, a slice without `.slice`).

use serde::Serialize;

use super::Runtime;

/// What one cgroup path says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CgroupIdentity {
    /// The ECS task or Kubernetes pod the path lies under, if any (inside the innermost
    /// container's node, for a nested path).
    pub owner: Option<Owner>,
    /// What the innermost cgroup the path names is.
    pub kind: CgroupKind,
    /// The containers this cgroup lies inside, innermost first: a Kubernetes node that is itself
    /// a container (kind, minikube), Docker in Docker. Empty for a host's own containers.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub enclosing: Vec<Enclosing>,
}

/// A container with more containers inside it, and the task or pod it sits under.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Enclosing {
    pub runtime: Runtime,
    pub id: String,
    pub owner: Option<Owner>,
}

/// The ECS task or Kubernetes pod a cgroup belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Owner {
    /// `task_id` as in the path and in the task ARN's last component: 32 hex digits, or a
    /// dashed UUID for tasks with old-format ARNs.
    EcsTask { task_id: String },
    /// `uid` in the API's form: dashed (systemd's `_` turned back into `-`), or 32 hex digits
    /// for static pods, whose UID is a hash.
    KubernetesPod { uid: String, qos: QosClass },
}

/// Kubernetes QoS class, read from the pod cgroup's parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum QosClass {
    Guaranteed,
    Burstable,
    BestEffort,
}

/// What the cgroup itself is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum CgroupKind {
    /// A container's cgroup, or a cgroup below it (crun's `container` child, a container's own
    /// sub-cgroups). Sandbox (pause) containers are containers too.
    Container { runtime: Runtime, id: String },
    /// The task or pod cgroup itself; its containers are children.
    Owner,
    /// A runtime's helper next to a container (CRI-O's conmon), not a container.
    Monitor { runtime: Runtime, id: String },
    /// Anything else. With an owner: an unknown cgroup inside a task or pod.
    Plain,
}

impl CgroupIdentity {
    /// Reads `path`. Never fails: what it does not recognise is [`CgroupKind::Plain`].
    ///
    /// A path may hold containers inside containers (a kind node's pods, Docker in Docker):
    /// the innermost one is `kind` and `owner`, the ones around it are `enclosing`. Which of
    /// them a cgroup belongs to depends on what the platform lists: [`Self::candidates`].
    pub fn parse(path: &str) -> Self {
        let mut scan = Scan::default();
        // Containers passed so far, outermost first.
        let mut outer: Vec<Enclosing> = Vec::new();
        // "" from leading/doubled/trailing slashes, "." and ".." from a cgroup namespace.
        let parts = path.split('/').filter(|p| !matches!(*p, "" | "." | ".."));
        for (i, part) in parts.enumerate() {
            match scan.step(i, part) {
                Some(CgroupKind::Container { runtime, id }) => {
                    outer.push(Enclosing {
                        runtime,
                        id,
                        owner: scan.owner.take(),
                    });
                    // Below a container its own layouts start again (a node's kubepods).
                    scan = Scan::default();
                }
                // A monitor has no containers inside it.
                Some(kind) => return Self::nested(scan.owner, kind, outer),
                None => {}
            }
            scan.last = i;
        }
        if scan.owner.is_none() {
            if let Some(inner) = outer.pop() {
                let kind = CgroupKind::Container {
                    runtime: inner.runtime,
                    id: inner.id,
                };
                return Self::nested(inner.owner, kind, outer);
            }
        }
        let kind = match scan.owner_at {
            Some(at) if scan.owner.is_some() && at == scan.last => CgroupKind::Owner,
            _ => CgroupKind::Plain,
        };
        Self::nested(scan.owner, kind, outer)
    }

    fn nested(owner: Option<Owner>, kind: CgroupKind, mut outer: Vec<Enclosing>) -> Self {
        outer.reverse();
        Self {
            owner,
            kind,
            enclosing: outer,
        }
    }

    /// What the cgroup may belong to, innermost first: its container and its task or pod, then
    /// each enclosing container with its own. The join takes the first the platform lists, so
    /// a kind node's pod wins where the kubelet lists it, and the node container where only the
    /// host's Docker does.
    pub fn candidates(&self) -> impl Iterator<Item = (Option<&str>, Option<&Owner>)> {
        let enclosing = (self.enclosing.iter()).map(|e| (Some(e.id.as_str()), e.owner.as_ref()));
        std::iter::once((self.container_id(), self.owner.as_ref())).chain(enclosing)
    }

    /// The container id, if the cgroup is (inside) a container.
    pub fn container_id(&self) -> Option<&str> {
        match &self.kind {
            CgroupKind::Container { id, .. } => Some(id),
            _ => None,
        }
    }
}

/// State carried from one path component to the next.
#[derive(Default)]
struct Scan {
    owner: Option<Owner>,
    /// Index of the component that named the owner.
    owner_at: Option<usize>,
    /// Index of the last component seen.
    last: usize,
    /// A `kubepods` component was seen: `pod<uid>`, `burstable`, `besteffort` mean something.
    kubernetes: bool,
    qos: Option<QosClass>,
    /// The previous component was `ecs` (or `ecs/<cluster>`): the next may be a task id.
    after_ecs: bool,
    /// A cluster name was passed under `ecs`: the older `/ecs/<cluster>/<task id>` form.
    ecs_cluster: bool,
    /// The previous component was `docker`: a bare id is a Docker container.
    after_docker: bool,
}

impl Scan {
    /// Looks at one component; returns the kind once a container (or monitor) is found.
    fn step(&mut self, i: usize, part: &str) -> Option<CgroupKind> {
        let after_ecs = std::mem::take(&mut self.after_ecs);
        let after_docker = std::mem::take(&mut self.after_docker);

        // containerd with a systemd-style parent but cgroupfs runc: "<parent>:<prefix>:<id>".
        let mut fields = part.splitn(3, ':');
        let head = fields.next().unwrap_or_default();
        if let (Some(prefix), Some(id)) = (fields.next(), fields.next()) {
            self.owner_component(i, head, after_ecs);
            if !is_container_id(id) {
                // Not the pod cgroup itself either: something unknown inside it.
                self.owner_at = self.owner_at.filter(|&at| at != i);
                return None;
            }
            return Some(CgroupKind::Container {
                runtime: runtime_of_prefix(prefix),
                id: id.to_owned(),
            });
        }

        if let Some(kind) = self.leaf(part, after_docker) {
            return Some(kind);
        }
        match part {
            "ecs" => self.after_ecs = true,
            "docker" => self.after_docker = true,
            _ => self.owner_component(i, part, after_ecs),
        }
        None
    }

    /// Task, pod, QoS and `kubepods` components.
    fn owner_component(&mut self, i: usize, part: &str, after_ecs: bool) {
        if after_ecs && is_task_id(part) {
            self.set_owner(
                i,
                Owner::EcsTask {
                    task_id: part.to_owned(),
                },
            );
        } else if after_ecs && !self.ecs_cluster && is_cluster_name(part) {
            // Older agents put the cluster between `ecs` and the task.
            self.ecs_cluster = true;
            self.after_ecs = true;
        } else if let Some(name) = part.strip_suffix(".slice") {
            self.slice(i, name);
        } else if part == "kubepods" {
            self.kubernetes = true;
        } else if self.kubernetes {
            match part {
                "burstable" => self.qos = Some(QosClass::Burstable),
                "besteffort" => self.qos = Some(QosClass::BestEffort),
                _ => {
                    if let Some(uid) = part.strip_prefix("pod").and_then(pod_uid) {
                        self.set_pod(i, uid);
                    }
                }
            }
        }
    }

    /// A systemd slice name without `.slice`: `ecstasks-<task>` or `kubepods-...-pod<uid>`.
    fn slice(&mut self, i: usize, name: &str) {
        if let Some(task) = name.strip_prefix("ecstasks-") {
            // Dashed (old-format) task ids are tolerated; their partial parent slices are not
            // task ids and fall through.
            if is_task_id(task) {
                self.set_owner(
                    i,
                    Owner::EcsTask {
                        task_id: task.to_owned(),
                    },
                );
            }
            return;
        }
        if !name.split('-').any(|s| s == "kubepods") {
            return;
        }
        self.kubernetes = true;
        for segment in name.split('-') {
            match segment {
                "burstable" => self.qos = Some(QosClass::Burstable),
                "besteffort" => self.qos = Some(QosClass::BestEffort),
                _ => {
                    // systemd escapes the UID's dashes as underscores.
                    let uid = segment.strip_prefix("pod").map(|u| u.replace('_', "-"));
                    if let Some(uid) = uid.as_deref().and_then(pod_uid) {
                        self.set_pod(i, uid);
                    }
                }
            }
        }
    }

    fn set_pod(&mut self, i: usize, uid: &str) {
        let qos = self.qos.unwrap_or(QosClass::Guaranteed);
        self.set_owner(
            i,
            Owner::KubernetesPod {
                uid: uid.to_owned(),
                qos,
            },
        );
    }

    fn set_owner(&mut self, i: usize, owner: Owner) {
        self.owner = Some(owner);
        self.owner_at = Some(i);
    }

    /// Container leaves: `docker-<id>.scope`, `cri-containerd-<id>.scope`, `crio-<id>[.scope]`,
    /// `crio-conmon-<id>.scope`, or a bare id.
    fn leaf(&self, part: &str, after_docker: bool) -> Option<CgroupKind> {
        let name = part.strip_suffix(".scope").unwrap_or(part);
        let container = |runtime, id: &str| {
            is_container_id(id).then(|| CgroupKind::Container {
                runtime,
                id: id.to_owned(),
            })
        };
        if let Some(id) = name.strip_prefix("crio-conmon-") {
            return is_container_id(id).then(|| CgroupKind::Monitor {
                runtime: Runtime::CriO,
                id: id.to_owned(),
            });
        }
        if let Some(id) = name.strip_prefix("crio-") {
            return container(Runtime::CriO, id);
        }
        if let Some(id) = name.strip_prefix("cri-containerd-") {
            return container(Runtime::Containerd, id);
        }
        if let Some(id) = name.strip_prefix("docker-") {
            return container(Runtime::Docker, id);
        }
        // A bare id is Docker's under /docker and under ECS (the agent drives Docker); under a
        // pod it may be containerd's or Docker's.
        let docker = after_docker || matches!(self.owner, Some(Owner::EcsTask { .. }));
        let runtime = if docker {
            Runtime::Docker
        } else {
            Runtime::Unknown
        };
        container(runtime, part)
    }
}

fn runtime_of_prefix(prefix: &str) -> Runtime {
    match prefix {
        "cri-containerd" => Runtime::Containerd,
        "crio" => Runtime::CriO,
        "docker" => Runtime::Docker,
        _ => Runtime::Unknown,
    }
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// 64 lowercase hex digits: the id Docker, containerd and CRI-O give a container.
pub fn is_container_id(s: &str) -> bool {
    s.len() == 64 && is_lower_hex(s)
}

/// 32 lowercase hex digits, or a lowercase 8-4-4-4-12 UUID.
fn is_hex_id(s: &str) -> bool {
    if s.len() == 32 {
        return is_lower_hex(s);
    }
    let mut groups = s.split('-');
    let ok = [8, 4, 4, 4, 12].iter().all(|&len| {
        groups
            .next()
            .is_some_and(|g| g.len() == len && is_lower_hex(g))
    });
    ok && groups.next().is_none()
}

/// An ECS task id: 32 hex digits (new ARNs) or a dashed UUID (old ARNs).
pub fn is_task_id(s: &str) -> bool {
    is_hex_id(s)
}

/// An ECS cluster name: 1 to 255 letters, digits, `-` and `_`.
fn is_cluster_name(s: &str) -> bool {
    (1..=255).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// `uid` if it is a pod UID (dashed UUID, or 32 hex digits for static pods).
fn pod_uid(uid: &str) -> Option<&str> {
    is_hex_id(uid).then_some(uid)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "5fc21e5b015f899d22618f8aede80b6d70d71b2a75465ea49d9462c8f3d2d3af";
    const TASK32: &str = "8f03e41243824aea923aca126495f665";
    const TASK_UUID: &str = "090eff9b-1ce3-4db6-848a-a8d14064fd24";
    const UID: &str = "8712f785-1a3e-41ec-a00b-e2dcc77431cb";
    const UID_SD: &str = "8712f785_1a3e_41ec_a00b_e2dcc77431cb";
    const STATIC_UID: &str = "9729a196c4723b60ab401eaff722982d";

    /// What a table row expects, in short.
    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Want {
        Plain,
        Container(Runtime, &'static str),
        Monitor(&'static str),
        Owner,
    }

    fn ecs(task: &str) -> Option<Owner> {
        Some(Owner::EcsTask {
            task_id: task.into(),
        })
    }
    fn pod(uid: &str, qos: QosClass) -> Option<Owner> {
        Some(Owner::KubernetesPod {
            uid: uid.into(),
            qos,
        })
    }

    fn check(path: &str, owner: Option<Owner>, want: Want) {
        let got = CgroupIdentity::parse(path);
        let kind = match want {
            Want::Plain => CgroupKind::Plain,
            Want::Owner => CgroupKind::Owner,
            Want::Container(runtime, id) => CgroupKind::Container {
                runtime,
                id: id.into(),
            },
            Want::Monitor(id) => CgroupKind::Monitor {
                runtime: Runtime::CriO,
                id: id.into(),
            },
        };
        let want = CgroupIdentity {
            owner,
            kind,
            enclosing: Vec::new(),
        };
        assert_eq!(got, want, "path {path:?}");
    }

    #[test]
    fn docker_layouts() {
        use Runtime::Docker;
        check(&format!("/docker/{ID}"), None, Want::Container(Docker, ID));
        check(
            &format!("/system.slice/docker-{ID}.scope"),
            None,
            Want::Container(Docker, ID),
        );
        // Rootless Docker and custom --cgroup-parent values.
        check(
            &format!("/user.slice/user-1000.slice/user@1000.service/docker-{ID}.scope"),
            None,
            Want::Container(Docker, ID),
        );
        check(
            &format!("/mygroup/docker/{ID}"),
            None,
            Want::Container(Docker, ID),
        );
        // Sub-cgroups a container makes (systemd inside it) stay the container's.
        check(
            &format!("/docker/{ID}/init.scope"),
            None,
            Want::Container(Docker, ID),
        );
        check(
            &format!("/system.slice/docker-{ID}.scope/x"),
            None,
            Want::Container(Docker, ID),
        );
        check("/docker", None, Want::Plain);
        check("/system.slice/docker.service", None, Want::Plain);
    }

    #[test]
    fn ecs_layouts() {
        use Runtime::Docker;
        check(
            &format!("/ecs/{TASK32}/{ID}"),
            ecs(TASK32),
            Want::Container(Docker, ID),
        );
        check(
            &format!("/ecs/{TASK_UUID}/{ID}"),
            ecs(TASK_UUID),
            Want::Container(Docker, ID),
        );
        check(&format!("/ecs/{TASK32}"), ecs(TASK32), Want::Owner);
        check(&format!("/ecs/{TASK_UUID}/"), ecs(TASK_UUID), Want::Owner);
        check("/ecs", None, Want::Plain);
        check(
            &format!("/ecstasks.slice/ecstasks-{TASK32}.slice/docker-{ID}.scope"),
            ecs(TASK32),
            Want::Container(Docker, ID),
        );
        check(
            &format!("/ecstasks.slice/ecstasks-{TASK32}.slice"),
            ecs(TASK32),
            Want::Owner,
        );
        check("/ecstasks.slice", None, Want::Plain);
        // Dashed task ids, flat and as systemd would nest them.
        check(
            &format!("/ecstasks.slice/ecstasks-{TASK_UUID}.slice/docker-{ID}.scope"),
            ecs(TASK_UUID),
            Want::Container(Docker, ID),
        );
        let nested = format!(
            "/ecstasks.slice/ecstasks-090eff9b.slice/ecstasks-090eff9b-1ce3.slice/\
             ecstasks-090eff9b-1ce3-4db6.slice/ecstasks-090eff9b-1ce3-4db6-848a.slice/\
             ecstasks-{TASK_UUID}.slice/docker-{ID}.scope"
        );
        check(&nested, ecs(TASK_UUID), Want::Container(Docker, ID));
        check("/ecstasks.slice/ecstasks-090eff9b.slice", None, Want::Plain);
        // Older agents: /ecs/<cluster>/<task id>/<id>, the awsvpc pause container included.
        check(
            &format!("/ecs/my-cluster_1/{TASK32}/{ID}"),
            ecs(TASK32),
            Want::Container(Docker, ID),
        );
        check(
            &format!("/ecs/default/{TASK_UUID}/{ID}"),
            ecs(TASK_UUID),
            Want::Container(Docker, ID),
        );
        check(&format!("/ecs/default/{TASK32}"), ecs(TASK32), Want::Owner);
        check("/ecs/default", None, Want::Plain);
        // One cluster level only, and a cluster name is letters, digits, - and _.
        check(&format!("/ecs/a/b/{TASK32}"), None, Want::Plain);
        check(&format!("/ecs/a.b/{TASK32}"), None, Want::Plain);
        check(
            &format!("/x/{TASK32}/{ID}"),
            None,
            Want::Container(Runtime::Unknown, ID),
        );
        // The ECS agent itself, and a non-task directory under /ecs.
        check("/system.slice/ecs.service", None, Want::Plain);
        check("/ecs/not-a-task", None, Want::Plain);
        check(
            &format!("/ecs/not-a-task/{ID}"),
            None,
            Want::Container(Runtime::Unknown, ID),
        );
    }

    #[test]
    fn kubernetes_cgroupfs_driver() {
        use QosClass::*;
        use Runtime::{CriO, Unknown};
        check(
            &format!("/kubepods/pod{UID}/{ID}"),
            pod(UID, Guaranteed),
            Want::Container(Unknown, ID),
        );
        check(
            &format!("/kubepods/burstable/pod{UID}/{ID}"),
            pod(UID, Burstable),
            Want::Container(Unknown, ID),
        );
        check(
            &format!("/kubepods/besteffort/pod{UID}/{ID}"),
            pod(UID, BestEffort),
            Want::Container(Unknown, ID),
        );
        check(
            &format!("/kubepods/besteffort/pod{UID}"),
            pod(UID, BestEffort),
            Want::Owner,
        );
        check(
            &format!("/kubepods/pod{UID}/crio-{ID}"),
            pod(UID, Guaranteed),
            Want::Container(CriO, ID),
        );
        check(
            &format!("/kubepods/burstable/pod{STATIC_UID}/{ID}"),
            pod(STATIC_UID, Burstable),
            Want::Container(Unknown, ID),
        );
        check("/kubepods", None, Want::Plain);
        check("/kubepods/burstable", None, Want::Plain);
        // kind / kubelet with a custom root.
        check(
            &format!("/kubelet/kubepods/pod{UID}/{ID}"),
            pod(UID, Guaranteed),
            Want::Container(Unknown, ID),
        );
        // "pod<uid>" outside kubepods means nothing.
        check(&format!("/pod{UID}"), None, Want::Plain);
    }

    #[test]
    fn kubernetes_systemd_driver() {
        use QosClass::*;
        use Runtime::*;
        let be = format!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_SD}.slice"
        );
        let bu = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_SD}.slice"
        );
        let gu = format!("/kubepods.slice/kubepods-pod{UID_SD}.slice");
        check(&be, pod(UID, BestEffort), Want::Owner);
        check(&bu, pod(UID, Burstable), Want::Owner);
        check(&gu, pod(UID, Guaranteed), Want::Owner);
        for (parent, qos) in [(&be, BestEffort), (&bu, Burstable), (&gu, Guaranteed)] {
            check(
                &format!("{parent}/cri-containerd-{ID}.scope"),
                pod(UID, qos),
                Want::Container(Containerd, ID),
            );
            check(
                &format!("{parent}/crio-{ID}.scope"),
                pod(UID, qos),
                Want::Container(CriO, ID),
            );
            check(
                &format!("{parent}/crio-{ID}.scope/container"),
                pod(UID, qos),
                Want::Container(CriO, ID),
            );
            check(
                &format!("{parent}/crio-conmon-{ID}.scope"),
                pod(UID, qos),
                Want::Monitor(ID),
            );
            check(
                &format!("{parent}/docker-{ID}.scope"),
                pod(UID, qos),
                Want::Container(Docker, ID),
            );
            check(
                &format!("{parent}/{ID}"),
                pod(UID, qos),
                Want::Container(Unknown, ID),
            );
            check(
                &format!("{parent}/unknown.scope"),
                pod(UID, qos),
                Want::Plain,
            );
        }
        check(
            &format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{STATIC_UID}.slice/cri-containerd-{ID}.scope"),
            pod(STATIC_UID, Burstable),
            Want::Container(Containerd, ID),
        );
        check("/kubepods.slice", None, Want::Plain);
        check(
            "/kubepods.slice/kubepods-burstable.slice",
            None,
            Want::Plain,
        );
        // kind nodes name the slices kubelet-kubepods-*.
        check(
            &format!("/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{UID_SD}.slice/cri-containerd-{ID}.scope"),
            pod(UID, BestEffort),
            Want::Container(Containerd, ID),
        );
    }

    /// Like [`check`], for a path with containers around the innermost one.
    fn check_nested(
        path: &str,
        owner: Option<Owner>,
        want: Want,
        enclosing: &[(Runtime, &str, Option<Owner>)],
    ) {
        let got = CgroupIdentity::parse(path);
        let enclosing: Vec<Enclosing> = (enclosing.iter())
            .map(|(runtime, id, owner)| Enclosing {
                runtime: *runtime,
                id: (*id).into(),
                owner: owner.clone(),
            })
            .collect();
        assert_eq!(got.enclosing, enclosing, "path {path:?}");
        let inner = CgroupIdentity {
            enclosing: Vec::new(),
            ..got
        };
        let kind = match want {
            Want::Plain => CgroupKind::Plain,
            Want::Owner => CgroupKind::Owner,
            Want::Container(runtime, id) => CgroupKind::Container {
                runtime,
                id: id.into(),
            },
            Want::Monitor(id) => CgroupKind::Monitor {
                runtime: Runtime::CriO,
                id: id.into(),
            },
        };
        let want = CgroupIdentity {
            owner,
            kind,
            enclosing: Vec::new(),
        };
        assert_eq!(inner, want, "path {path:?}");
    }

    /// A kind or minikube node container and its CRI.
    const NODE: &str = "9f45a1e3a6ae985b6318b24123314eb8a7d6580accd9d279adb7867dc8c43a48";
    const MIDDLE: &str = "ee08638adaaf009d78c248913f629e38299471d45fe7dc944d1039077e3424ca";

    /// Kubernetes nodes that are containers (kind, minikube) and Docker in Docker, seen from the
    /// host: the innermost container and its pod, with the containers around it.
    #[test]
    fn nested_containers() {
        use QosClass::*;
        use Runtime::*;
        let node = [(Docker, NODE, None)];
        check_nested(
            &format!("/system.slice/docker-{NODE}.scope/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_SD}.slice/cri-containerd-{ID}.scope"),
            pod(UID, Burstable),
            Want::Container(Containerd, ID),
            &node,
        );
        check_nested(
            &format!("/docker/{NODE}/kubepods/besteffort/pod{UID}/{ID}"),
            pod(UID, BestEffort),
            Want::Container(Unknown, ID),
            &node,
        );
        check_nested(
            &format!("/system.slice/docker-{NODE}.scope/kubelet/kubepods/pod{UID}/{ID}"),
            pod(UID, Guaranteed),
            Want::Container(Unknown, ID),
            &node,
        );
        check_nested(
            &format!("/system.slice/docker-{NODE}.scope/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{UID_SD}.slice/crio-{ID}.scope/container"),
            pod(UID, BestEffort),
            Want::Container(CriO, ID),
            &node,
        );
        // From inside a cgroup namespace the node is a bare id.
        check_nested(
            &format!("/../{NODE}/kubepods.slice/kubepods-pod{UID_SD}.slice/docker-{ID}.scope"),
            pod(UID, Guaranteed),
            Want::Container(Docker, ID),
            &[(Unknown, NODE, None)],
        );
        // The pod cgroup inside the node, something unknown in it, CRI-O's monitor.
        check_nested(
            &format!("/docker/{NODE}/kubepods/besteffort/pod{UID}"),
            pod(UID, BestEffort),
            Want::Owner,
            &node,
        );
        check_nested(
            &format!("/docker/{NODE}/kubepods/besteffort/pod{UID}/x"),
            pod(UID, BestEffort),
            Want::Plain,
            &node,
        );
        check_nested(
            &format!(
                "/docker/{NODE}/kubepods.slice/kubepods-pod{UID_SD}.slice/crio-conmon-{ID}.scope"
            ),
            pod(UID, Guaranteed),
            Want::Monitor(ID),
            &node,
        );
        // The node's own services and sub-cgroups are the node container's.
        check(
            &format!("/system.slice/docker-{NODE}.scope/system.slice/kubelet.service"),
            None,
            Want::Container(Docker, NODE),
        );
        check(
            &format!("/docker/{NODE}/init.scope"),
            None,
            Want::Container(Docker, NODE),
        );
        // Docker in Docker in Docker, and a task container running Docker: each layer keeps
        // its own owner.
        check_nested(
            &format!("/docker/{NODE}/docker/{MIDDLE}/docker/{ID}"),
            None,
            Want::Container(Docker, ID),
            &[(Docker, MIDDLE, None), (Docker, NODE, None)],
        );
        check_nested(
            &format!("/ecs/{TASK32}/{NODE}/docker/{ID}"),
            None,
            Want::Container(Docker, ID),
            &[(Docker, NODE, ecs(TASK32))],
        );
    }

    #[test]
    fn candidates_are_innermost_first() {
        let candidates = |path: String| -> Vec<(Option<String>, Option<Owner>)> {
            (CgroupIdentity::parse(&path).candidates())
                .map(|(id, owner)| (id.map(str::to_owned), owner.cloned()))
                .collect()
        };
        let be = pod(UID, QosClass::BestEffort);
        assert_eq!(
            candidates(format!("/docker/{NODE}/kubepods/besteffort/pod{UID}/{ID}")),
            [(Some(ID.into()), be.clone()), (Some(NODE.into()), None)]
        );
        assert_eq!(
            candidates(format!("/docker/{NODE}/kubepods/besteffort/pod{UID}")),
            [(None, be), (Some(NODE.into()), None)]
        );
        assert_eq!(
            candidates(format!("/ecs/{TASK32}/{ID}")),
            [(Some(ID.into()), ecs(TASK32))]
        );
        assert_eq!(
            candidates("/system.slice/sshd.service".into()),
            [(None, None)]
        );
    }

    /// Real-world paths from other projects' tests, `testdata/cgroup_paths.tsv` (its header says
    /// how the answers were worked out): every row parses to its source's answer, save the
    /// layouts it marks as misses, which must still miss.
    #[test]
    fn real_world_corpus() {
        let corpus = include_str!("testdata/cgroup_paths.tsv");
        let (mut rows, mut right) = (0, 0);
        let mut wrong = Vec::new();
        for line in corpus
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            let fields: Vec<&str> = line.split('\t').collect();
            assert!((4..=5).contains(&fields.len()), "corpus row {line:?}");
            let (path, containers, owner) = (fields[0], fields[1], fields[2]);
            let miss = fields.get(4).is_some_and(|note| note.starts_with("miss:"));
            let identity = CgroupIdentity::parse(path);
            let ids: Vec<&str> = identity.candidates().filter_map(|(id, _)| id).collect();
            let ids = if ids.is_empty() {
                "-".into()
            } else {
                ids.join(",")
            };
            let ok = ids == containers && owner_is(identity.owner.as_ref(), owner);
            rows += 1;
            match (ok, miss) {
                (true, false) => right += 1,
                (false, true) => {}
                (false, false) => wrong.push(format!("{path}\n  got {identity:?}")),
                (true, true) => wrong.push(format!("{path}\n  is right: drop its miss mark")),
            }
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
        eprintln!("cgroup path corpus: {right} of {rows} attributed right");
    }

    /// `want` as the corpus writes it: `-`, `ecs:<task>`, `pod:<uid>` or `pod:<uid>:<qos>`.
    fn owner_is(got: Option<&Owner>, want: &str) -> bool {
        let mut want = want.split(':');
        match (got, want.next(), want.next(), want.next()) {
            (None, Some("-"), None, None) => true,
            (Some(Owner::EcsTask { task_id }), Some("ecs"), Some(task), None) => task_id == task,
            (Some(Owner::KubernetesPod { uid, qos }), Some("pod"), Some(want_uid), want_qos) => {
                let qos_name = match qos {
                    QosClass::Guaranteed => "guaranteed",
                    QosClass::Burstable => "burstable",
                    QosClass::BestEffort => "besteffort",
                };
                uid == want_uid && want_qos.is_none_or(|q| q == qos_name)
            }
            _ => false,
        }
    }

    #[test]
    fn containerd_mixed_form() {
        check(
            &format!("/system.slice/containerd.service/kubepods-burstable-pod{UID_SD}.slice:cri-containerd:{ID}"),
            pod(UID, QosClass::Burstable),
            Want::Container(Runtime::Containerd, ID),
        );
        check(
            &format!("/kubepods-pod{UID_SD}.slice:crio:{ID}"),
            pod(UID, QosClass::Guaranteed),
            Want::Container(Runtime::CriO, ID),
        );
        check(
            &format!("/kubepods-besteffort-pod{UID_SD}.slice:cri-containerd:nothex"),
            pod(UID, QosClass::BestEffort),
            Want::Plain,
        );
        check("a:b:c", None, Want::Plain);
        check(":::", None, Want::Plain);
    }

    /// Real-world paths, ids complete: coroot-node-agent's `cgroup/cgroup_test.go` fixtures
    /// (@0789560) and the ECS agent's examples.
    #[test]
    fn real_world_fixtures() {
        use QosClass::*;
        use Runtime::*;
        let rows: &[(&str, Option<Owner>, Want)] = &[
            (
                "/docker/b43d92bf1e5c6f78bb9b7bc6f40721280299855ba692092716e3a1b6c0b86f3f",
                None,
                Want::Container(Docker, "b43d92bf1e5c6f78bb9b7bc6f40721280299855ba692092716e3a1b6c0b86f3f"),
            ),
            (
                "/system.slice/docker-cf87ba651579c9231db817909e7865e5747bd7abcac0c57ce23cf4abbaee046b.scope",
                None,
                Want::Container(Docker, "cf87ba651579c9231db817909e7865e5747bd7abcac0c57ce23cf4abbaee046b"),
            ),
            ("/system.slice/docker.service", None, Want::Plain),
            ("/system.slice/springboot.service", None, Want::Plain),
            ("/system.slice/system-serial\\x2dgetty.slice", None, Want::Plain),
            ("/runtime.slice/kubelet.service", None, Want::Plain),
            ("/podruntime/kubelet", None, Want::Plain),
            ("/lxc/mysql-primary-db", None, Want::Plain),
            (
                "/kubepods/burstable/pod6a4ce4a0-ba47-11ea-b2a7-0cc47ac5979e/17db96a24ae1e9dd57143e62b1cb0d2d35e693c65c774c7470e87b0572e07c1a",
                pod("6a4ce4a0-ba47-11ea-b2a7-0cc47ac5979e", Burstable),
                Want::Container(Unknown, "17db96a24ae1e9dd57143e62b1cb0d2d35e693c65c774c7470e87b0572e07c1a"),
            ),
            (
                "/kubepods/besteffort/pod0d08203e-255a-11e9-8cd9-0007cb0b2cc8/671a50f5d60566556912f61511d0ec9e4d5c78d53fbc4676727180438bbbbc55/kube-proxy",
                pod("0d08203e-255a-11e9-8cd9-0007cb0b2cc8", BestEffort),
                Want::Container(Unknown, "671a50f5d60566556912f61511d0ec9e4d5c78d53fbc4676727180438bbbbc55"),
            ),
            (
                "/kubepods/poda38c12e8-255a-11e9-8cd9-0007cb0b2cc8/32c562ed81a2622b37b80cb216859820ba51bd694f60ee4cf10d07a4011266f8",
                pod("a38c12e8-255a-11e9-8cd9-0007cb0b2cc8", Guaranteed),
                Want::Container(Unknown, "32c562ed81a2622b37b80cb216859820ba51bd694f60ee4cf10d07a4011266f8"),
            ),
            (
                "/kubepods/burstable/pod9729a196c4723b60ab401eaff722982d/d166c6190614efc91956b78e96d74c3fbc96ca8e91948c36de3bc5b0e7b27d48",
                pod("9729a196c4723b60ab401eaff722982d", Burstable),
                Want::Container(Unknown, "d166c6190614efc91956b78e96d74c3fbc96ca8e91948c36de3bc5b0e7b27d48"),
            ),
            (
                "/kubepods/poda48c12e8-255a-11e9-8cd9-0007cb0b2cc8/crio-63425c4a8b4291744a79dd9011fddc7a1f8ffda61f65d72196aa01d00cae2e2e",
                pod("a48c12e8-255a-11e9-8cd9-0007cb0b2cc8", Guaranteed),
                Want::Container(CriO, "63425c4a8b4291744a79dd9011fddc7a1f8ffda61f65d72196aa01d00cae2e2e"),
            ),
            (
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod8712f785_1a3e_41ec_a00b_e2dcc77431cb.slice/docker-73051af271105c07e1f493b34856a77e665e3b0b4fc72f76c807dfbffeb881bd.scope",
                pod("8712f785-1a3e-41ec-a00b-e2dcc77431cb", BestEffort),
                Want::Container(Docker, "73051af271105c07e1f493b34856a77e665e3b0b4fc72f76c807dfbffeb881bd"),
            ),
            (
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod2942c55e_c9cb_428a_93f4_eaf89c1f3ce0.slice/crio-49f9e8e5395d57c1083996c09e2e6f042d5fe1ec0310facab32f94912b35ce59.scope",
                pod("2942c55e-c9cb-428a-93f4-eaf89c1f3ce0", Burstable),
                Want::Container(CriO, "49f9e8e5395d57c1083996c09e2e6f042d5fe1ec0310facab32f94912b35ce59"),
            ),
            (
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-podea19ff5d_943a_4466_a07e_a71e9e50cc62.slice/crio-21572039dd8398ff8272b031fa5422a40165145ab37f2f8794e1e7f844fe8118.scope/container",
                pod("ea19ff5d-943a-4466-a07e-a71e9e50cc62", Burstable),
                Want::Container(CriO, "21572039dd8398ff8272b031fa5422a40165145ab37f2f8794e1e7f844fe8118"),
            ),
            (
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod3e61c214bc3ed9ff81e21474dd6cba17.slice/cri-containerd-c74b0f5062f0bc726cae1e9369ad4a95deed6b298d247f0407475adb23fa3190",
                pod("3e61c214bc3ed9ff81e21474dd6cba17", Burstable),
                Want::Container(Containerd, "c74b0f5062f0bc726cae1e9369ad4a95deed6b298d247f0407475adb23fa3190"),
            ),
            (
                "/system.slice/containerd.service/kubepods-burstable-pod4ed02c0b_0df8_4d14_a30e_fd589ee4143a.slice:cri-containerd:d4a9f9195eaf7e4a729f24151101e1de61f1398677e7b82acfb936dff0b4ce55",
                pod("4ed02c0b-0df8-4d14-a30e-fd589ee4143a", Burstable),
                Want::Container(Containerd, "d4a9f9195eaf7e4a729f24151101e1de61f1398677e7b82acfb936dff0b4ce55"),
            ),
            (
                "/ecs/8f03e41243824aea923aca126495f665/5fc21e5b015f899d22618f8aede80b6d70d71b2a75465ea49d9462c8f3d2d3af",
                ecs("8f03e41243824aea923aca126495f665"),
                Want::Container(Docker, ID),
            ),
            (
                "/ecstasks.slice/ecstasks-8f03e41243824aea923aca126495f665.slice/docker-5fc21e5b015f899d22618f8aede80b6d70d71b2a75465ea49d9462c8f3d2d3af.scope",
                ecs("8f03e41243824aea923aca126495f665"),
                Want::Container(Docker, ID),
            ),
        ];
        for (path, owner, want) in rows {
            check(path, owner.clone(), *want);
        }
    }

    #[test]
    fn cgroup_namespace_prefixes() {
        use Runtime::Docker;
        check(
            &format!("/../../ecstasks-{TASK32}.slice/docker-{ID}.scope"),
            ecs(TASK32),
            Want::Container(Docker, ID),
        );
        check(
            &format!("/../../../docker/{ID}"),
            None,
            Want::Container(Docker, ID),
        );
        check(
            &format!("/../ecs/{TASK32}/{ID}"),
            ecs(TASK32),
            Want::Container(Docker, ID),
        );
        check(
            &format!("/../../kubepods-besteffort-pod{UID_SD}.slice/cri-containerd-{ID}.scope"),
            pod(UID, QosClass::BestEffort),
            Want::Container(Runtime::Containerd, ID),
        );
        // A namespace rooted inside the pod: only the leaf is left, and it still is a container.
        check(
            &format!("/../cri-containerd-{ID}.scope"),
            None,
            Want::Container(Runtime::Containerd, ID),
        );
        check("/..", None, Want::Plain);
        check("../..", None, Want::Plain);
        check(&format!("./docker/{ID}"), None, Want::Container(Docker, ID));
    }

    #[test]
    fn odd_and_malformed_paths() {
        let upper = ID.to_uppercase();
        let short = &ID[..63];
        let long = format!("{ID}0");
        let wrong_char = format!("{}g", &ID[..63]);
        let rows: Vec<String> = vec![
            "".into(),
            "/".into(),
            "//".into(),
            "/init.scope".into(),
            "/user.slice".into(),
            "/user.slice/user-0.slice/session-1.scope".into(),
            "/system.slice/sshd.service".into(),
            format!("/docker/{upper}"),
            format!("/docker/{short}"),
            format!("/docker/{long}"),
            format!("/docker/{wrong_char}"),
            format!("/system.slice/docker-{short}.scope"),
            format!("/system.slice/docker-{upper}.scope"),
            format!("/system.slice/docker-{ID}.scope.x"),
            format!("/ecs/{}/x", TASK32.to_uppercase()),
            format!("/kubepods/pod{}", UID.to_uppercase()),
            format!("/kubepods/pod{}", &UID[..35]),
            "/kubepods/pod".into(),
            "/kubepods.slice/kubepods-pod.slice".into(),
            "/kubepods.slice/kubepods-burstable-pod8712f785_1a3e.slice".into(),
            "/ecstasks.slice/ecstasks-.slice".into(),
            "/docker-.scope".into(),
            "/crio-conmon-.scope".into(),
            "\0\0\0".into(),
            "/ü/😀/docker".into(),
        ];
        for path in &rows {
            check(path, None, Want::Plain);
        }
        // Trailing and doubled slashes change nothing.
        check(
            &format!("/docker/{ID}/"),
            None,
            Want::Container(Runtime::Docker, ID),
        );
        check(
            &format!("//docker//{ID}//"),
            None,
            Want::Container(Runtime::Docker, ID),
        );
        // crio-conmon is never a container, even without an owner.
        check(&format!("/crio-conmon-{ID}.scope"), None, Want::Monitor(ID));
    }

    #[test]
    fn ids() {
        assert!(is_container_id(ID));
        assert!(!is_container_id(&ID[1..]));
        assert!(is_task_id(TASK32) && is_task_id(TASK_UUID));
        assert!(!is_task_id(UID_SD));
        assert!(!is_task_id(&format!("{TASK_UUID}-")));
        assert!(!is_task_id("8f03e412-4382-4aea-923a-ca126495f665-"));
        assert!(!is_task_id("8f03e4124-382-4aea-923a-ca126495f665"));
        assert_eq!(
            CgroupIdentity::parse(&format!("/docker/{ID}")).container_id(),
            Some(ID)
        );
        assert_eq!(CgroupIdentity::parse("/").container_id(), None);
    }

    /// xorshift64*: enough randomness for a fuzz-ish test without a crate.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[test]
    fn arbitrary_strings_never_panic() {
        let pieces = [
            "/",
            "/",
            "/",
            "..",
            ".",
            "-",
            "_",
            ":",
            ".slice",
            ".scope",
            "kubepods",
            "pod",
            "burstable",
            "besteffort",
            "ecs",
            "ecstasks-",
            "docker",
            "docker-",
            "crio-",
            "crio-conmon-",
            "cri-containerd-",
            "cri-containerd",
            ID,
            &ID[..63],
            TASK32,
            TASK_UUID,
            UID,
            UID_SD,
            "a",
            "0",
            "é",
            "😀",
            "\0",
            " ",
            "\n",
            "%",
        ];
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..20_000 {
            let mut s = String::new();
            for _ in 0..rng.below(12) {
                s.push_str(pieces[rng.below(pieces.len())]);
            }
            let identity = CgroupIdentity::parse(&s);
            if let Some(id) = identity.container_id() {
                assert!(is_container_id(id), "{s:?} gave container id {id:?}");
            }
        }
        // Every prefix and suffix of real paths, cut at any char boundary.
        let real = format!(
            "/../kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_SD}.slice/crio-{ID}.scope/container"
        );
        for (i, _) in real.char_indices() {
            CgroupIdentity::parse(&real[..i]);
            CgroupIdentity::parse(&real[i..]);
        }
    }

    /// Fuzzing: any path parses, and what it finds is really in the path.
    mod fuzz {
        use proptest::prelude::*;

        use super::*;
        use crate::fuzz;

        const PARTS: &[&str] = &[
            "/",
            "/",
            "/",
            ".",
            "..",
            ":",
            "-",
            "_",
            ".slice",
            ".scope",
            "docker",
            "docker-",
            "ecs",
            "ecstasks-",
            "ecstasks.slice",
            "kubepods",
            "kubepods-",
            "kubepods.slice",
            "burstable",
            "besteffort",
            "pod",
            "cri-containerd",
            "cri-containerd-",
            "crio-",
            "crio-conmon-",
            "container",
            ID,
            TASK32,
            TASK_UUID,
            UID,
            UID_SD,
            STATIC_UID,
        ];

        fn check(path: &str) -> Result<(), TestCaseError> {
            let identity = CgroupIdentity::parse(path);
            for outer in &identity.enclosing {
                prop_assert!(is_container_id(&outer.id) && path.contains(outer.id.as_str()));
            }
            match &identity.kind {
                CgroupKind::Container { id, .. } | CgroupKind::Monitor { id, .. } => {
                    prop_assert!(is_container_id(id) && path.contains(id.as_str()));
                }
                CgroupKind::Owner => prop_assert!(identity.owner.is_some()),
                CgroupKind::Plain => {}
            }
            match &identity.owner {
                Some(Owner::EcsTask { task_id }) => {
                    prop_assert!(is_task_id(task_id) && path.contains(task_id.as_str()));
                }
                Some(Owner::KubernetesPod { uid, .. }) => {
                    prop_assert!(is_hex_id(uid));
                    prop_assert!(
                        path.contains(uid.as_str()) || path.contains(&uid.replace('-', "_"))
                    );
                }
                None => {}
            }
            Ok(())
        }

        proptest! {
            #![proptest_config(fuzz::config(1000))]

            #[test]
            fn any_text(path in ".{0,300}") {
                check(&path)?;
            }

            #[test]
            fn mutated_layouts(path in fuzz::mutated_text(fuzz::line_seeds("cgroup_paths"), 6)) {
                check(&path)?;
            }

            #[test]
            fn built_from_layout_words(path in fuzz::words(PARTS, 24)) {
                check(&path)?;
            }
        }
    }
}
