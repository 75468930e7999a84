//! The kubelet's `/pods` answer (a v1 `PodList`) decoded, container ids and resource quantities
//! parsed, and pods turned into [`Workload`]s.
//!
//! Only the fields observer reports are decoded (v1.Pod names, camelCase); the rest is ignored.
//! Pods are decoded one by one, so one malformed pod is skipped instead of losing the node.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;

use crate::inventory::{
    bounded_seq, nested_map, nested_seq, null_as_default, Container, Limits, NetworkMode, OwnerRef,
    Reach, Runtime, Workload, WorkloadKind, MAX_ITEMS,
};

#[derive(Debug, thiserror::Error)]
pub enum KubeletError {
    #[error("kubelet /pods body is not JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("kubelet /pods body is a {kind:?}, not a PodList with items")]
    NotPodList { kind: Option<String> },
}

/// Reasons kept for skipped pods, for the log; the rest are counted.
const MAX_SKIP_REASONS: usize = 5;
/// Longest reason kept: serde quotes the offending value, which may be long.
const MAX_SKIP_REASON_CHARS: usize = 200;

/// The pods of one `/pods` answer, and why any were skipped.
#[derive(Debug, Default)]
pub struct PodList {
    pub pods: Vec<Pod>,
    /// Items that did not decode as a pod.
    pub skipped: usize,
    /// Why, for the first few of them.
    pub skip_reasons: Vec<String>,
}

impl PodList {
    /// Decodes a `/pods` body. The body must be a PodList (an `items` key, `kind` PodList if
    /// given): an error object must not read as "no pods on this node". At most
    /// [`MAX_ITEMS`] items.
    pub fn decode(body: &[u8]) -> Result<Self, KubeletError> {
        // None for a missing `items` (not a PodList); `"items": null` is an empty list.
        // Items stay slices of the body until each is decoded on its own.
        #[derive(Deserialize)]
        struct Raw<'a> {
            kind: Option<String>,
            #[serde(default, deserialize_with = "present", borrow)]
            items: Option<Vec<&'a RawValue>>,
        }
        fn present<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Option<Vec<&'de RawValue>>, D::Error> {
            bounded_seq(d, MAX_ITEMS).map(Some)
        }
        let raw: Raw<'_> = serde_json::from_slice(body)?;
        let kind_ok = raw.kind.as_deref().is_none_or(|k| k == "PodList");
        let (true, Some(items)) = (kind_ok, raw.items) else {
            return Err(KubeletError::NotPodList { kind: raw.kind });
        };
        let mut list = PodList::default();
        for (i, item) in items.into_iter().enumerate() {
            match serde_json::from_str::<Pod>(item.get()) {
                Ok(pod) => list.pods.push(pod),
                Err(e) => {
                    list.skipped += 1;
                    if list.skip_reasons.len() < MAX_SKIP_REASONS {
                        let reason: String =
                            e.to_string().chars().take(MAX_SKIP_REASON_CHARS).collect();
                        list.skip_reasons.push(format!("item {i}: {reason}"));
                    }
                }
            }
        }
        Ok(list)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Pod {
    pub metadata: ObjectMeta,
    pub spec: PodSpec,
    pub status: PodStatus,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct ObjectMeta {
    #[serde(deserialize_with = "null_as_default")]
    pub name: String,
    #[serde(deserialize_with = "null_as_default")]
    pub namespace: String,
    /// Dashed UUID; 32 hex digits (a config hash) for static pods.
    #[serde(deserialize_with = "null_as_default")]
    pub uid: String,
    #[serde(deserialize_with = "nested_map")]
    pub labels: BTreeMap<String, String>,
    #[serde(deserialize_with = "nested_map")]
    pub annotations: BTreeMap<String, String>,
    #[serde(deserialize_with = "nested_seq")]
    pub owner_references: Vec<OwnerReference>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct OwnerReference {
    #[serde(deserialize_with = "null_as_default")]
    pub kind: String,
    #[serde(deserialize_with = "null_as_default")]
    pub name: String,
    pub controller: Option<bool>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct PodSpec {
    pub node_name: Option<String>,
    #[serde(deserialize_with = "null_as_default")]
    pub host_network: bool,
    #[serde(deserialize_with = "nested_seq")]
    pub containers: Vec<ContainerSpec>,
    #[serde(deserialize_with = "nested_seq")]
    pub init_containers: Vec<ContainerSpec>,
    /// Pod-level resources (Kubernetes 1.32+, PodLevelResources).
    pub resources: Option<Resources>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct ContainerSpec {
    #[serde(deserialize_with = "null_as_default")]
    pub name: String,
    pub image: Option<String>,
    #[serde(deserialize_with = "null_as_default")]
    pub resources: Resources,
}

/// Quantities as written ("500m", "128Mi"); see [`cpu_millicores`] and [`memory_bytes`].
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Resources {
    #[serde(deserialize_with = "quantity_map")]
    pub limits: BTreeMap<String, String>,
    #[serde(deserialize_with = "quantity_map")]
    pub requests: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct PodStatus {
    /// Pending, Running, Succeeded, Failed, Unknown.
    pub phase: Option<String>,
    /// Guaranteed, Burstable, BestEffort.
    pub qos_class: Option<String>,
    #[serde(rename = "podIP")]
    pub pod_ip: Option<String>,
    #[serde(rename = "hostIP")]
    pub host_ip: Option<String>,
    #[serde(deserialize_with = "nested_seq")]
    pub container_statuses: Vec<ContainerStatus>,
    #[serde(deserialize_with = "nested_seq")]
    pub init_container_statuses: Vec<ContainerStatus>,
    #[serde(deserialize_with = "nested_seq")]
    pub ephemeral_container_statuses: Vec<ContainerStatus>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct ContainerStatus {
    #[serde(deserialize_with = "null_as_default")]
    pub name: String,
    /// `<runtime>://<id>`; missing until the container is created.
    #[serde(rename = "containerID")]
    pub container_id: Option<String>,
    pub image: Option<String>,
    #[serde(rename = "imageID")]
    pub image_id: Option<String>,
    pub ready: Option<bool>,
    pub restart_count: Option<i64>,
    #[serde(deserialize_with = "null_as_default")]
    pub state: ContainerState,
}

/// At most one of the three is set.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct ContainerState {
    pub running: Option<StateRunning>,
    pub waiting: Option<StateWaiting>,
    pub terminated: Option<StateTerminated>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct StateRunning {
    pub started_at: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct StateWaiting {
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct StateTerminated {
    pub exit_code: Option<i32>,
    pub reason: Option<String>,
}

/// Quantities are strings, but a hand-written manifest may reach us as a number.
fn quantity_map<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    let raw: BTreeMap<String, Quantity> = nested_map(d)?;
    Ok(raw
        .into_iter()
        .filter_map(|(k, Quantity(v))| Some((k, v?)))
        .collect())
}

/// A quantity as written: a string, or a number as text; anything else is skipped unread
/// (a `serde_json::Value` would hold a nested value whole).
struct Quantity(Option<String>);

impl<'de> Deserialize<'de> for Quantity {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{IgnoredAny, MapAccess, SeqAccess, Visitor};
        struct Text;
        impl<'de> Visitor<'de> for Text {
            type Value = Quantity;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a quantity")
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Quantity, E> {
                Ok(Quantity(Some(v.to_owned())))
            }

            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Quantity, E> {
                Ok(Quantity(Some(v.to_string())))
            }

            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Quantity, E> {
                Ok(Quantity(Some(v.to_string())))
            }

            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Quantity, E> {
                Ok(Quantity(
                    serde_json::Number::from_f64(v).map(|n| n.to_string()),
                ))
            }

            fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<Quantity, E> {
                Ok(Quantity(None))
            }

            fn visit_unit<E: serde::de::Error>(self) -> Result<Quantity, E> {
                Ok(Quantity(None))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Quantity, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Quantity(None))
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Quantity, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Quantity(None))
            }
        }
        d.deserialize_any(Text)
    }
}

/// The runtime and id in a status `containerID`: `containerd://<id>`, `cri-o://<id>`,
/// `docker://<id>`. Another scheme gives [`Runtime::Unknown`]; no scheme or no id gives None.
pub fn parse_container_id(s: &str) -> Option<(Runtime, &str)> {
    let (scheme, id) = s.split_once("://")?;
    if id.is_empty() {
        return None;
    }
    let runtime = match scheme {
        "containerd" => Runtime::Containerd,
        "cri-o" => Runtime::CriO,
        "docker" => Runtime::Docker,
        _ => Runtime::Unknown,
    };
    Some((runtime, id))
}

/// The pod annotations of Prometheus' own Kubernetes discovery that observer reads.
pub const PROMETHEUS_ANNOTATIONS: [&str; 3] = [
    "prometheus.io/scrape",
    "prometheus.io/port",
    "prometheus.io/path",
];

/// Label the Deployment controller puts on the pods of each ReplicaSet it makes.
pub const POD_TEMPLATE_HASH: &str = "pod-template-hash";

/// Pod labels, plus the `mackerel.io/*` annotations the pod has (roles, host, display name,
/// memo, plugins of its Mackerel host): the only annotations observer reports on.
fn with_mackerel_annotations(
    labels: &BTreeMap<String, String>,
    annotations: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut labels = labels.clone();
    for key in crate::inventory::MACKEREL_LABELS {
        if let Some(value) = annotations.get(key) {
            labels.insert(key.to_owned(), value.clone());
        }
    }
    labels
}

impl Pod {
    /// The controlling owner reference, else the first one.
    pub fn owner(&self) -> Option<OwnerRef> {
        let refs = &self.metadata.owner_references;
        let r = refs
            .iter()
            .find(|r| r.controller == Some(true))
            .or(refs.first())?;
        Some(OwnerRef {
            kind: r.kind.clone(),
            name: r.name.clone(),
        })
    }

    /// The top-level owner: the Deployment behind a ReplicaSet owner whose name ends in the
    /// pod's `pod-template-hash`; otherwise [`Pod::owner`].
    pub fn controller(&self) -> Option<OwnerRef> {
        let owner = self.owner()?;
        let hash = self.metadata.labels.get(POD_TEMPLATE_HASH);
        let deployment = hash
            .filter(|_| owner.kind == "ReplicaSet")
            .and_then(|h| owner.name.strip_suffix(h.as_str())?.strip_suffix('-'))
            .filter(|name| !name.is_empty());
        Some(match deployment {
            Some(name) => OwnerRef {
                kind: "Deployment".into(),
                name: name.to_owned(),
            },
            None => owner,
        })
    }

    /// The pod as a [`Workload`], or None without a UID.
    ///
    /// Containers are those with a `containerID` (others have no cgroup yet); init and
    /// ephemeral containers only while running. The pod's sandbox (pause) container is not in
    /// the PodList: its cgroup reaches the pod through the path. Limits are the pod-level ones
    /// if set, else the sum over containers when every container has one (what the kubelet
    /// sets on the pod cgroup); init containers are left out of the sum.
    pub fn to_workload(&self) -> Option<Workload> {
        let meta = &self.metadata;
        if meta.uid.is_empty() {
            return None;
        }
        let network_mode = if self.spec.host_network {
            NetworkMode::Host
        } else {
            NetworkMode::Pod
        };
        let reach = self.reach();
        let running = |s: &&ContainerStatus| s.state.running.is_some();
        let statuses = self
            .status
            .container_statuses
            .iter()
            .map(|s| (s, &self.spec.containers));
        let others = (self.status.init_container_statuses.iter())
            .chain(&self.status.ephemeral_container_statuses)
            .filter(running)
            .map(|s| (s, &self.spec.init_containers));
        let containers = statuses
            .chain(others)
            .filter_map(|(status, specs)| {
                let (runtime, id) = parse_container_id(status.container_id.as_deref()?)?;
                let spec = specs.iter().find(|c| c.name == status.name);
                Some(Container {
                    id: id.to_owned(),
                    name: status.name.clone(),
                    runtime,
                    image: (status.image.clone().filter(|i| !i.is_empty()))
                        .or_else(|| spec.and_then(|s| s.image.clone())),
                    network_mode: network_mode.clone(),
                    limits: spec.map(|s| limits(&s.resources)).unwrap_or_default(),
                    labels: BTreeMap::new(),
                    cgroup_ids: Vec::new(),
                    reach: reach.clone(),
                })
            })
            .collect();
        Some(Workload {
            kind: WorkloadKind::KubernetesPod,
            id: meta.uid.clone(),
            name: format!("{}/{}", meta.namespace, meta.name),
            namespace: Some(meta.namespace.clone()),
            labels: with_mackerel_annotations(&meta.labels, &meta.annotations),
            owner: self.owner(),
            controller: self.controller(),
            status: self.status.phase.clone(),
            network_mode,
            limits: self.limits(),
            containers,
            cgroup_ids: Vec::new(),
            unlisted_since: None,
        })
    }

    /// The pod's address (its node's for a hostNetwork pod) and its `prometheus.io/*`
    /// annotations, the same for each of its containers: they share the pod's network.
    fn reach(&self) -> Reach {
        // A hostNetwork pod's podIP is its node's too; hostIP says so directly.
        let ip = if self.spec.host_network {
            self.status.host_ip.as_ref().or(self.status.pod_ip.as_ref())
        } else {
            self.status.pod_ip.as_ref()
        };
        Reach {
            ports: Vec::new(),
            addresses: ip.iter().filter_map(|ip| ip.parse().ok()).collect(),
            declared: PROMETHEUS_ANNOTATIONS
                .iter()
                .filter_map(|k| Some((k.to_string(), self.metadata.annotations.get(*k)?.clone())))
                .collect(),
        }
    }

    fn limits(&self) -> Limits {
        if let Some(resources) = &self.spec.resources {
            let pod = limits(resources);
            if pod != Limits::default() {
                return pod;
            }
        }
        let each: Vec<Limits> = self
            .spec
            .containers
            .iter()
            .map(|c| limits(&c.resources))
            .collect();
        let sum_cpu = each.iter().map(|l| l.cpu_cores).sum::<Option<f64>>();
        // Checked: two `8Ei` limits overflow a u64, and no sum means no limit to report.
        let sum_memory = each
            .iter()
            .try_fold(0u64, |sum, l| sum.checked_add(l.memory_bytes?));
        let any = !each.is_empty();
        Limits {
            cpu_cores: sum_cpu.filter(|_| any),
            memory_bytes: sum_memory.filter(|_| any),
        }
    }
}

fn limits(resources: &Resources) -> Limits {
    Limits {
        cpu_cores: (resources.limits.get("cpu").and_then(|q| cpu_millicores(q)))
            .map(|m| m as f64 / 1000.0),
        memory_bytes: resources.limits.get("memory").and_then(|q| memory_bytes(q)),
    }
}

/// A CPU quantity in millicores, rounded up as the kubelet does: "500m" 500, "2" 2000,
/// "1.5" 1500, "100u" 1.
pub fn cpu_millicores(quantity: &str) -> Option<u64> {
    scaled_up(quantity, 1_000_000)
}

/// A memory quantity in bytes, rounded up: "128Mi", "1Gi", "1G", "1000", "1e3", "1.5Gi".
pub fn memory_bytes(quantity: &str) -> Option<u64> {
    scaled_up(quantity, 1_000_000_000)
}

/// `quantity` in nano-units divided by `per_unit`, rounded up; None if negative or malformed.
fn scaled_up(quantity: &str, per_unit: i128) -> Option<u64> {
    let nanos = quantity_nanos(quantity)?;
    if nanos < 0 {
        return None;
    }
    u64::try_from(div_ceil(nanos, per_unit)).ok()
}

/// `n / d` rounded up, for `n >= 0` and `d > 0`; `n + d - 1` would overflow near `i128::MAX`.
fn div_ceil(n: i128, d: i128) -> i128 {
    n / d + i128::from(n % d != 0)
}

/// A Kubernetes quantity (`<sign><digits>[.<digits>]<suffix>`, suffix binary Ki..Ei, decimal
/// n u m k M G T P E, or an exponent e<n>/E<n>) in billionths, rounded up; None if malformed
/// or out of range.
pub fn quantity_nanos(quantity: &str) -> Option<i128> {
    let s = quantity.trim();
    let (negative, s) = match s.as_bytes().first()? {
        b'-' => (true, &s[1..]),
        b'+' => (false, &s[1..]),
        _ => (false, s),
    };
    let number_len = s
        .bytes()
        .take_while(|b| b.is_ascii_digit() || *b == b'.')
        .count();
    let (number, suffix) = s.split_at(number_len);
    let (int, frac) = number.split_once('.').unwrap_or((number, ""));
    if int.is_empty() && frac.is_empty() || frac.contains('.') || int.len() + frac.len() > 30 {
        return None;
    }
    let mantissa: i128 = format!("{int}{frac}").parse().ok()?;

    // Value = mantissa * 2^binary * 10^(decimal - frac digits); result in 10^-9 units.
    let (binary, decimal): (u32, i32) = match suffix {
        "Ki" => (10, 0),
        "Mi" => (20, 0),
        "Gi" => (30, 0),
        "Ti" => (40, 0),
        "Pi" => (50, 0),
        "Ei" => (60, 0),
        "n" => (0, -9),
        "u" => (0, -6),
        "m" => (0, -3),
        "" => (0, 0),
        "k" => (0, 3),
        "M" => (0, 6),
        "G" => (0, 9),
        "T" => (0, 12),
        "P" => (0, 15),
        "E" => (0, 18),
        _ => {
            let exp = suffix.strip_prefix(['e', 'E'])?;
            let digits = exp.strip_prefix(['+', '-']).unwrap_or(exp);
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) || digits.len() > 3
            {
                return None;
            }
            (0, exp.parse().ok()?)
        }
    };
    let mut value = mantissa.checked_mul(1i128.checked_shl(binary)?)?;
    let exp10 = decimal + 9 - frac.len() as i32;
    if exp10 >= 0 {
        value = value.checked_mul(10i128.checked_pow(u32::try_from(exp10).ok()?)?)?;
    } else {
        let div = 10i128.checked_pow(exp10.unsigned_abs());
        value = match div {
            Some(div) => div_ceil(value, div),
            // Smaller than a billionth: rounds up to one unless zero.
            None => i128::from(value > 0),
        };
    }
    Some(if negative { -value } else { value })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOCS: &str = include_str!("fixtures/kubelet_pods.json");
    const FULL: &str = include_str!("fixtures/kubelet_pods_full.json");

    #[test]
    fn the_roles_annotation_is_carried_with_the_labels() {
        let body = r#"{"kind":"PodList","apiVersion":"v1","metadata":{},"items":[{
            "metadata":{"name":"web-1","namespace":"shop","uid":"8712f785-1a3e-41ec-a00b-e2dcc77431cb",
              "labels":{"app":"web"},"annotations":{"mackerel.io/roles":"shop:web","other":"x",
                "mackerel.io/host":"false","mackerel.io/memo":"m","mackerel.io/plugins":"gostats"}},
            "spec":{"containers":[{"name":"app"}]},"status":{"phase":"Running"}}]}"#;
        let list = PodList::decode(body.as_bytes()).unwrap();
        let w = list.pods[0].to_workload().unwrap();
        assert_eq!(
            w.labels.get("mackerel.io/roles").map(String::as_str),
            Some("shop:web")
        );
        assert_eq!(w.labels.get("app").map(String::as_str), Some("web"));
        assert_eq!(
            w.labels.get("mackerel.io/host").map(String::as_str),
            Some("false")
        );
        assert_eq!(
            w.labels.get("mackerel.io/memo").map(String::as_str),
            Some("m")
        );
        assert_eq!(
            w.labels.get("mackerel.io/plugins").map(String::as_str),
            Some("gostats")
        );
        assert!(
            !w.labels.contains_key("other"),
            "other annotations stay out"
        );
    }

    #[test]
    fn the_documented_example() {
        let list = PodList::decode(DOCS.as_bytes()).unwrap();
        assert_eq!(list.skipped, 0);
        let pod = &list.pods[0];
        assert_eq!(pod.metadata.namespace, "shop");
        assert_eq!(
            pod.spec.node_name.as_deref(),
            Some("ip-10-0-1-5.ec2.internal")
        );
        assert_eq!(pod.status.qos_class.as_deref(), Some("BestEffort"));
        assert_eq!(pod.status.pod_ip.as_deref(), Some("10.0.1.23"));
        let w = pod.to_workload().unwrap();
        assert_eq!(w.kind, WorkloadKind::KubernetesPod);
        assert_eq!(w.id, "8712f785-1a3e-41ec-a00b-e2dcc77431cb");
        assert_eq!(w.name, "shop/web-7d9c5b8f4-abcde");
        assert_eq!(
            w.owner,
            Some(OwnerRef {
                kind: "ReplicaSet".into(),
                name: "web-7d9c5b8f4".into()
            })
        );
        assert_eq!(
            w.controller,
            Some(OwnerRef {
                kind: "Deployment".into(),
                name: "web".into()
            })
        );
        assert_eq!(w.status.as_deref(), Some("Running"));
        assert_eq!(w.network_mode, NetworkMode::Pod);
        assert_eq!(w.limits, Limits::default(), "BestEffort: no limits");
        assert_eq!(w.containers.len(), 1);
        let c = &w.containers[0];
        assert_eq!(
            c.id,
            "73051af271105c07e1f493b34856a77e665e3b0b4fc72f76c807dfbffeb881bd"
        );
        assert_eq!(c.runtime, Runtime::Containerd);
        assert_eq!(c.image.as_deref(), Some("web:1.4"));
    }

    #[test]
    fn a_fuller_list_with_garbage_items() {
        let list = PodList::decode(FULL.as_bytes()).unwrap();
        assert_eq!(list.pods.len(), 3);
        assert_eq!(list.skipped, 2, "{:?}", list.skip_reasons);

        let api = list.pods[0].to_workload().unwrap();
        let names: Vec<&str> = api.containers.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            ["api", "debugger"],
            "waiting and terminated init containers have no cgroup"
        );
        assert!(api.containers.iter().all(|c| c.runtime == Runtime::CriO));
        assert_eq!(
            api.containers[0].limits,
            Limits {
                cpu_cores: Some(0.5),
                memory_bytes: Some(512 << 20)
            }
        );
        assert_eq!(
            api.limits,
            Limits {
                cpu_cores: Some(2.0),
                memory_bytes: Some((512 << 20) + 1_000_000_000)
            }
        );
        assert_eq!(
            api.controller.as_ref().map(|o| o.name.as_str()),
            Some("api")
        );
        assert_eq!(api.labels["app"], "api");
        let status = &list.pods[0].status.container_statuses[0];
        assert_eq!(status.restart_count, Some(2));
        assert!(status.state.running.is_some());
        let waiting = &list.pods[0].status.container_statuses[1].state.waiting;
        assert_eq!(
            waiting.as_ref().and_then(|w| w.reason.as_deref()),
            Some("ContainerCreating")
        );

        let proxy = list.pods[1].to_workload().unwrap();
        assert_eq!(
            proxy.id, "9729a196c4723b60ab401eaff722982d",
            "static pods keep the hash"
        );
        assert_eq!(proxy.network_mode, NetworkMode::Host);
        assert_eq!(
            proxy.owner,
            Some(OwnerRef {
                kind: "Node".into(),
                name: "node-1".into()
            })
        );
        assert_eq!(proxy.controller, proxy.owner);
        assert_eq!(proxy.containers[0].runtime, Runtime::Docker);
        assert_eq!(
            proxy.limits,
            Limits {
                cpu_cores: Some(2.0),
                memory_bytes: Some(128_974_848)
            }
        );

        let pending = list.pods[2].to_workload().unwrap();
        assert!(pending.containers.is_empty());
        assert_eq!(pending.limits, Limits::default());
        assert_eq!(pending.owner, None);
    }

    #[test]
    fn bodies_that_are_not_pod_lists() {
        let ok = |b: &str| PodList::decode(b.as_bytes()).map(|l| l.pods.len());
        assert_eq!(ok(r#"{"kind":"PodList","items":[]}"#).unwrap(), 0);
        assert_eq!(ok(r#"{"items":null}"#).unwrap(), 0);
        assert_eq!(ok(r#"{"items":[{}]}"#).unwrap(), 1);
        for bad in [
            "",
            "Unauthorized",
            "{}",
            "[]",
            r#"{"kind":"Status","status":"Failure","message":"forbidden","code":403}"#,
            r#"{"kind":"Status","items":[]}"#,
            r#"{"items":{}}"#,
            r#"{"items":[1,2"#,
        ] {
            assert!(PodList::decode(bad.as_bytes()).is_err(), "{bad:?}");
        }
        // A pod without a UID cannot be joined to cgroups.
        let list = PodList::decode(br#"{"items":[{"metadata":{"name":"x"}}]}"#).unwrap();
        assert_eq!(list.pods[0].to_workload(), None);
    }

    /// A body of tiny items or huge per-pod lists cannot multiply into far more memory than
    /// itself: more than 10000 items is refused, a pod's lists and labels keep 1000 entries,
    /// and one skip reason per bad item is not kept past the first few.
    #[test]
    fn floods_of_items_are_bounded() {
        let flood = format!(r#"{{"items":[{}]}}"#, vec!["{}"; MAX_ITEMS + 1].join(","));
        let err = PodList::decode(flood.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("more than 10000 items"), "{err}");

        let garbage = format!(r#"{{"items":[{}]}}"#, vec!["1"; MAX_ITEMS].join(","));
        let list = PodList::decode(garbage.as_bytes()).unwrap();
        assert_eq!((list.pods.len(), list.skipped), (0, MAX_ITEMS));
        assert_eq!(list.skip_reasons.len(), MAX_SKIP_REASONS);

        let labels: Vec<String> = (0..5000).map(|i| format!(r#""l{i}":"v""#)).collect();
        let statuses = vec![r#"{"name":"a","containerID":"docker://x"}"#; 5000].join(",");
        let pod = format!(
            r#"{{"items":[{{"metadata":{{"uid":"u","labels":{{{}}}}},"status":{{"containerStatuses":[{statuses}]}}}}]}}"#,
            labels.join(",")
        );
        let list = PodList::decode(pod.as_bytes()).unwrap();
        let w = list.pods[0].to_workload().unwrap();
        assert_eq!(w.labels.len(), crate::inventory::MAX_NESTED);
        assert_eq!(w.containers.len(), crate::inventory::MAX_NESTED);
    }

    #[test]
    fn container_ids() {
        let id = "73051af271105c07e1f493b34856a77e665e3b0b4fc72f76c807dfbffeb881bd";
        assert_eq!(
            parse_container_id(&format!("containerd://{id}")),
            Some((Runtime::Containerd, id))
        );
        assert_eq!(
            parse_container_id(&format!("cri-o://{id}")),
            Some((Runtime::CriO, id))
        );
        assert_eq!(
            parse_container_id(&format!("docker://{id}")),
            Some((Runtime::Docker, id))
        );
        assert_eq!(
            parse_container_id("rkt://abc"),
            Some((Runtime::Unknown, "abc"))
        );
        assert_eq!(parse_container_id("docker://"), None);
        assert_eq!(parse_container_id(id), None);
        assert_eq!(parse_container_id(""), None);
    }

    #[test]
    fn cpu_quantities() {
        let rows = [
            ("500m", Some(500)),
            ("2", Some(2000)),
            ("1.5", Some(1500)),
            ("0.1", Some(100)),
            (".5", Some(500)),
            ("100u", Some(1)),
            ("1n", Some(1)),
            ("0", Some(0)),
            ("250m ", Some(250)),
            ("+1", Some(1000)),
            ("1e3", Some(1_000_000)),
            ("2k", Some(2_000_000)),
            ("-1", None),
            ("", None),
            ("m", None),
            ("1.2.3", None),
            ("abc", None),
            ("1x", None),
            ("1Ki2", None),
            (".", None),
        ];
        for (q, want) in rows {
            assert_eq!(cpu_millicores(q), want, "{q:?}");
        }
    }

    #[test]
    fn memory_quantities() {
        let rows = [
            ("128Mi", Some(128 << 20)),
            ("1Gi", Some(1 << 30)),
            ("1.5Gi", Some(3 << 29)),
            ("1G", Some(1_000_000_000)),
            ("1000", Some(1000)),
            ("1e3", Some(1000)),
            ("1E3", Some(1000)),
            ("1e+3", Some(1000)),
            ("1e-3", Some(1)),
            ("64Ki", Some(65536)),
            ("1Ti", Some(1 << 40)),
            ("1Pi", Some(1 << 50)),
            ("1Ei", Some(1 << 60)),
            ("1k", Some(1000)),
            ("1M", Some(1_000_000)),
            ("1T", Some(1_000_000_000_000)),
            ("2P", Some(2_000_000_000_000_000)),
            ("1E", Some(1_000_000_000_000_000_000)),
            ("128974848000m", Some(128_974_848)),
            ("129e6", Some(129_000_000)),
            ("16Ei", None),
            ("1e999", None),
            ("99999999999999999999999999999999", None),
            ("1Mb", None),
            ("1 Gi", None),
            ("Gi", None),
            ("1e", None),
            ("-128Mi", None),
        ];
        for (q, want) in rows {
            assert_eq!(memory_bytes(q), want, "{q:?}");
        }
    }

    /// Found by the quantity property below: `nanos + per_unit - 1` overflowed i128.
    #[test]
    fn quantities_near_the_i128_limit_do_not_overflow() {
        // 30 digits, times 10^9: just under i128::MAX.
        let q = "170141183460469231731687303715";
        assert_eq!(
            quantity_nanos(q),
            Some(170141183460469231731687303715 * 1_000_000_000)
        );
        assert_eq!(memory_bytes(q), None, "more bytes than a u64 holds");
        assert_eq!(cpu_millicores(q), None);
        assert_eq!(memory_bytes("170141183460469231731687303715n"), None);
        assert_eq!(memory_bytes("9223372036854775807999999999n"), Some(1 << 63));
    }

    /// Two `8Ei` limits are 2^64 bytes: the pod's sum is unknown, not a wrapped number.
    #[test]
    fn limit_sums_that_overflow_are_unknown() {
        let container = |name: &str| ContainerSpec {
            name: name.into(),
            resources: Resources {
                limits: BTreeMap::from([
                    ("cpu".to_owned(), "1".to_owned()),
                    ("memory".to_owned(), "8Ei".to_owned()),
                ]),
                ..Resources::default()
            },
            ..ContainerSpec::default()
        };
        let mut pod = Pod::default();
        pod.spec.containers = vec![container("a"), container("b")];
        assert_eq!(
            pod.limits(),
            Limits {
                cpu_cores: Some(2.0),
                memory_bytes: None
            }
        );
        pod.spec.containers.pop();
        assert_eq!(pod.limits().memory_bytes, Some(8 << 60));
    }

    #[test]
    fn numbers_in_resource_maps_are_tolerated() {
        let spec: ContainerSpec = serde_json::from_str(
            r#"{"name":"c","resources":{"limits":{"cpu":2,"memory":"1Gi","nvidia.com/gpu":[1]}}}"#,
        )
        .unwrap();
        assert_eq!(
            limits(&spec.resources),
            Limits {
                cpu_cores: Some(2.0),
                memory_bytes: Some(1 << 30)
            }
        );
        let spec: ContainerSpec = serde_json::from_str(r#"{"name":"c","resources":null}"#).unwrap();
        assert_eq!(limits(&spec.resources), Limits::default());
    }

    #[test]
    fn deployment_names_need_the_matching_hash() {
        let pod = |owner_kind: &str, owner: &str, hash: Option<&str>| {
            let mut p = Pod::default();
            p.metadata.owner_references.push(OwnerReference {
                kind: owner_kind.into(),
                name: owner.into(),
                controller: Some(true),
            });
            if let Some(h) = hash {
                p.metadata.labels.insert(POD_TEMPLATE_HASH.into(), h.into());
            }
            p.controller().map(|o| format!("{}/{}", o.kind, o.name))
        };
        assert_eq!(
            pod("ReplicaSet", "web-7d9c5b8f4", Some("7d9c5b8f4")).unwrap(),
            "Deployment/web"
        );
        assert_eq!(
            pod("ReplicaSet", "web-7d9c5b8f4", None).unwrap(),
            "ReplicaSet/web-7d9c5b8f4"
        );
        assert_eq!(
            pod("ReplicaSet", "web-abc", Some("7d9c5b8f4")).unwrap(),
            "ReplicaSet/web-abc"
        );
        assert_eq!(pod("ReplicaSet", "-h", Some("h")).unwrap(), "ReplicaSet/-h");
        assert_eq!(
            pod("DaemonSet", "agent", Some("x")).unwrap(),
            "DaemonSet/agent"
        );
        assert_eq!(Pod::default().controller(), None);
    }

    /// Fuzzing: no `/pods` body makes the decoder or the pod building panic, and quantities
    /// parse without overflow and agree with their units.
    mod fuzz {
        use proptest::prelude::*;

        use super::*;
        use crate::fuzz;

        const KEYS: &[&str] = &[
            "kind",
            "PodList",
            "items",
            "metadata",
            "name",
            "namespace",
            "uid",
            "labels",
            "annotations",
            "ownerReferences",
            "controller",
            "spec",
            "nodeName",
            "hostNetwork",
            "containers",
            "initContainers",
            "image",
            "resources",
            "limits",
            "requests",
            "cpu",
            "memory",
            "status",
            "phase",
            "qosClass",
            "podIP",
            "hostIP",
            "containerStatuses",
            "initContainerStatuses",
            "ephemeralContainerStatuses",
            "containerID",
            "imageID",
            "ready",
            "restartCount",
            "state",
            "running",
            "waiting",
            "terminated",
            "startedAt",
            "reason",
            "exitCode",
            "pod-template-hash",
            "mackerel.io/roles",
            "ReplicaSet",
            "Running",
            "Succeeded",
        ];

        const QUANTITY_PARTS: &[&str] = &[
            "0",
            "1",
            "5",
            "9",
            "99999",
            "170141183460469231731687303715",
            ".",
            "+",
            "-",
            "e",
            "E",
            "e-",
            "e+",
            "n",
            "u",
            "m",
            "k",
            "M",
            "G",
            "T",
            "P",
            "E",
            "Ki",
            "Mi",
            "Gi",
            "Ti",
            "Pi",
            "Ei",
            " ",
        ];

        fn decode_everything(body: &[u8]) {
            let Ok(list) = PodList::decode(body) else {
                return;
            };
            for pod in &list.pods {
                if let Some(w) = pod.to_workload() {
                    assert_eq!(w.id, pod.metadata.uid);
                    assert!(
                        w.containers.len()
                            <= pod.status.container_statuses.len()
                                + pod.status.init_container_statuses.len()
                                + pod.status.ephemeral_container_statuses.len()
                    );
                }
            }
        }

        fn check_quantity(q: &str) -> Result<(), TestCaseError> {
            let nanos = quantity_nanos(q);
            for scaled in [cpu_millicores(q), memory_bytes(q)] {
                if scaled.is_some() {
                    prop_assert!(nanos.is_some_and(|n| n >= 0), "{:?}", q);
                }
            }
            Ok(())
        }

        proptest! {
            #![proptest_config(fuzz::config(500))]

            #[test]
            fn any_bytes(body in prop::collection::vec(any::<u8>(), 0..256)) {
                decode_everything(&body);
            }

            #[test]
            fn mutated_fixtures(body in fuzz::mutated(fuzz::json_seeds("kubernetes"), 8)) {
                decode_everything(&body);
            }

            #[test]
            fn documents_of_pod_fields(doc in fuzz::json_value(KEYS)) {
                decode_everything(&serde_json::to_vec(&doc).unwrap());
                let list = serde_json::json!({ "kind": "PodList", "items": [doc] });
                decode_everything(&serde_json::to_vec(&list).unwrap());
            }
        }

        proptest! {
            #![proptest_config(fuzz::config(1500))]

            #[test]
            fn any_quantity_text(q in ".{0,40}") {
                check_quantity(&q)?;
            }

            #[test]
            fn mutated_quantities(q in fuzz::mutated_text(fuzz::line_seeds("quantities"), 4)) {
                check_quantity(&q)?;
            }

            #[test]
            fn quantities_from_their_parts(q in fuzz::words(QUANTITY_PARTS, 8)) {
                check_quantity(&q)?;
            }

            #[test]
            fn units_agree(n in any::<u32>()) {
                let n64 = u64::from(n);
                prop_assert_eq!(memory_bytes(&format!("{n}Ki")), Some(n64 * 1024));
                prop_assert_eq!(memory_bytes(&format!("{n}k")), Some(n64 * 1000));
                prop_assert_eq!(cpu_millicores(&format!("{n}m")), Some(n64));
                prop_assert_eq!(cpu_millicores(&format!("{n}u")), Some(n64.div_ceil(1000)));
                prop_assert_eq!(memory_bytes(&format!("{n}e-3")), Some(n64.div_ceil(1000)));
            }

            #[test]
            fn container_ids_are_the_end(s in fuzz::words(&["docker", "cri-o", "containerd", "://", ":", "/", "x"], 6)) {
                if let Some((_, id)) = parse_container_id(&s) {
                    prop_assert!(s.ends_with(id) && !id.is_empty());
                }
            }
        }
    }

    #[test]
    fn pods_carry_their_address_and_prometheus_annotations() {
        let body = r#"{"items":[
          {"metadata":{"name":"api","namespace":"shop","uid":"u1",
             "annotations":{"prometheus.io/scrape":"true","prometheus.io/port":"9102","other":"x"}},
           "spec":{"containers":[{"name":"api"}]},
           "status":{"podIP":"10.0.1.40","hostIP":"10.0.1.5",
             "containerStatuses":[{"name":"api","containerID":"containerd://0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef","state":{"running":{}}}]}},
          {"metadata":{"name":"proxy","namespace":"kube-system","uid":"u2"},
           "spec":{"hostNetwork":true,"containers":[{"name":"proxy"}]},
           "status":{"podIP":"10.0.1.5","hostIP":"10.0.1.6",
             "containerStatuses":[{"name":"proxy","containerID":"containerd://1123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef","state":{"running":{}}}]}}
        ]}"#;
        let list = PodList::decode(body.as_bytes()).unwrap();
        let api = list.pods[0].to_workload().unwrap();
        let reach = &api.containers[0].reach;
        assert_eq!(
            reach.addresses,
            ["10.0.1.40".parse::<std::net::IpAddr>().unwrap()]
        );
        assert_eq!(
            reach.declared,
            BTreeMap::from([
                ("prometheus.io/port".to_string(), "9102".to_string()),
                ("prometheus.io/scrape".to_string(), "true".to_string()),
            ])
        );
        let proxy = list.pods[1].to_workload().unwrap();
        assert_eq!(
            proxy.containers[0].reach.addresses,
            ["10.0.1.6".parse::<std::net::IpAddr>().unwrap()],
            "hostNetwork: the host's address"
        );
    }
}
