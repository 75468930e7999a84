//! One interval's snapshot as Mackerel host reports: one host per ECS task or Kubernetes pod,
//! with each container's CPU, memory and network (every network mode, loopback apart).

use std::collections::HashSet;

use serde_json::json;

use super::{
    model::{CloudMeta, ContainerMetrics, HostIdentity, HostMeta, HostReport, IntervalReport},
    select::{capped, Selector, MAX_DISPLAY_NAME_CHARS, MAX_MEMO_CHARS},
};
use crate::{
    appmetrics::{reach, scrape::TargetList, AppMetricsConfig},
    inventory::{ecs::LABEL_TASK_ARN, DISPLAY_NAME_LABEL, MEMO_LABEL},
    snapshot::{per_second, Snapshot},
    snapshot::{ContainerReport, WorkloadKind, WorkloadReport},
};

pub use crate::inventory::ROLES_LABEL;

/// Hosts for the tasks and pods of `snapshot` that `selector` chooses; Compose projects and
/// lone containers have none. Workloads that cannot be named (an ECS task without its ARN)
/// are left out with a debug line.
pub fn interval_report(snapshot: &Snapshot, selector: &mut Selector) -> IntervalReport {
    interval_report_with(snapshot, selector, None)
}

/// [`interval_report`] with each host's application metrics targets, their published and
/// host ports reached at `app`'s node address, the plugins workloads name picked from its
/// (None: application metrics off).
pub fn interval_report_with(
    snapshot: &Snapshot,
    selector: &mut Selector,
    app: Option<&AppMetricsConfig>,
) -> IntervalReport {
    let mut hosts = Vec::new();
    for w in &snapshot.workloads {
        if let Err(why) = selector.verdict(w) {
            log::debug!("Mackerel: no host for {}: {why}", w.name);
            continue;
        }
        match host_report(w, snapshot, selector, app) {
            Ok(Some(host)) => hosts.push(host),
            Ok(None) => {}
            Err(e) => log::debug!("Mackerel: no host for {}: {e}", w.name),
        }
    }
    if let Some(app) = app {
        // An unconfigured name is logged again only once its workload is gone and back.
        let live: HashSet<&str> = snapshot.workloads.iter().map(|w| w.name.as_str()).collect();
        app.plugins.retain_workloads(|w| live.contains(w));
    }
    IntervalReport {
        time: snapshot.time,
        interval: snapshot.interval,
        complete: snapshot.platform.as_ref().is_some_and(|p| !p.is_stale()),
        hosts,
    }
}

fn host_report(
    w: &WorkloadReport,
    snapshot: &Snapshot,
    selector: &mut Selector,
    app: Option<&AppMetricsConfig>,
) -> Result<Option<HostReport>, super::model::IdentityError> {
    // Ignored containers are left out of the host altogether, meta included.
    let containers: Vec<&ContainerReport> = w
        .containers
        .iter()
        .filter(|c| selector.keeps_container(&c.name))
        .collect();
    let (identity, cloud) = match w.kind {
        WorkloadKind::EcsTask => {
            let Some(arn) = w.labels.get(LABEL_TASK_ARN) else {
                return Ok(None);
            };
            let cloud = CloudMeta::ecs(json!({
                "task_arn": arn,
                "task_id": w.id,
                "task_definition": w.name,
                "cluster": w.namespace,
                "network_mode": w.network_mode.name(),
                "containers": containers.iter().map(|c| &c.name).collect::<Vec<_>>(),
            }));
            (HostIdentity::ecs(arn)?, cloud)
        }
        WorkloadKind::KubernetesPod => {
            // Workload names of pods are "<namespace>/<name>"; the host is named by the pod.
            let pod = w.name.rsplit('/').next().unwrap_or(&w.name);
            let cloud = CloudMeta::kubernetes(json!({
                "namespace": w.namespace,
                "name": pod,
                "uid": w.id,
                "labels": w.labels,
                "controller": w.controller.as_ref().map(|o| json!({"kind": o.kind, "name": o.name})),
                "containers": containers.iter().map(|c| &c.name).collect::<Vec<_>>(),
            }));
            (HostIdentity::kubernetes(pod, &w.id)?, cloud)
        }
        WorkloadKind::ComposeProject | WorkloadKind::Container => return Ok(None),
    };
    let app = match app {
        Some(app) => {
            let (targets, refused) = reach::targets(
                w,
                &containers,
                &identity.custom_identifier,
                app.node_address,
                &app.plugins,
            );
            TargetList {
                targets,
                refused: refused
                    .into_iter()
                    .map(|(c, why)| (w.name.clone(), c, why))
                    .collect(),
            }
        }
        None => TargetList::default(),
    };
    Ok(Some(HostReport {
        app,
        identity,
        meta: HostMeta::observer(Some(cloud)),
        roles_label: selector.roles_label(w),
        display_name: capped(w.labels.get(DISPLAY_NAME_LABEL), MAX_DISPLAY_NAME_CHARS),
        memo: capped(w.labels.get(MEMO_LABEL), MAX_MEMO_CHARS),
        containers: containers
            .into_iter()
            .map(|c| container_metrics(c, snapshot))
            .collect(),
    }))
}

fn container_metrics(c: &ContainerReport, snapshot: &Snapshot) -> ContainerMetrics {
    let rate = |n| per_second(n, snapshot.interval);
    let t = &c.traffic;
    ContainerMetrics {
        name: c.name.clone(),
        cpu_percent: c.usage.cpu_percent,
        cpu_limit_percent: c.usage.cpu_limit_cores.map(|cores| cores * 100.0),
        memory_bytes: c.usage.memory_working_set,
        memory_limit_bytes: c.usage.memory_limit,
        rx_bytes_per_sec: rate(t.rx.bytes),
        tx_bytes_per_sec: rate(t.tx.bytes),
        lo_rx_bytes_per_sec: rate(t.lo_rx.bytes),
        lo_tx_bytes_per_sec: rate(t.lo_tx.bytes),
        rx_packets_per_sec: rate(t.rx.packets + t.lo_rx.packets),
        tx_packets_per_sec: rate(t.tx.packets + t.lo_tx.packets),
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::BTreeMap,
        time::{Duration, UNIX_EPOCH},
    };

    use observer_common::{Counter, TrafficValue};

    use super::*;
    use crate::snapshot::{Health, NetworkMode, Usage};

    fn workload(
        kind: WorkloadKind,
        id: &str,
        name: &str,
        labels: &[(&str, &str)],
    ) -> WorkloadReport {
        let traffic = TrafficValue {
            rx: Counter {
                bytes: 6000,
                packets: 6,
            },
            lo_tx: Counter {
                bytes: 900,
                packets: 3,
            },
            ..Default::default()
        };
        WorkloadReport {
            kind,
            id: id.into(),
            name: name.into(),
            namespace: Some("shop".into()),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
            controller: None,
            network_mode: NetworkMode::Host,
            cgroup_ids: vec![1],
            traffic,
            usage: Usage::default(),
            containers: vec![ContainerReport {
                id: "c".repeat(64),
                name: "app".into(),
                image: None,
                network_mode: NetworkMode::Host,
                cgroup_ids: vec![1],
                traffic,
                usage: Usage {
                    cpu_percent: Some(12.0),
                    cpu_limit_cores: Some(0.25),
                    memory_working_set: Some(1 << 20),
                    memory_limit: Some(1 << 30),
                },
                reach: Default::default(),
            }],
        }
    }

    fn snapshot(workloads: Vec<WorkloadReport>) -> Snapshot {
        Snapshot {
            time: UNIX_EPOCH + Duration::from_secs(1_795_000_000),
            interval: Duration::from_secs(3),
            cgroups: Vec::new(),
            workloads,
            held: Vec::new(),
            host: Default::default(),
            platform: None,
            health: Health::default(),
        }
    }

    #[test]
    fn one_host_per_task_and_pod_named_like_the_container_agent() {
        let arn = "arn:aws:ecs:us-east-1:111122223333:task/prod/8f03e41243824aea923aca126495f665";
        let s = snapshot(vec![
            workload(
                WorkloadKind::EcsTask,
                "8f03e41243824aea923aca126495f665",
                "web:12",
                &[(LABEL_TASK_ARN, arn), (ROLES_LABEL, "shop:web")],
            ),
            workload(
                WorkloadKind::KubernetesPod,
                "8712f785-1a3e-41ec-a00b-e2dcc77431cb",
                "shop/web-7d9c5b8f4-abcde",
                &[],
            ),
            workload(WorkloadKind::ComposeProject, "proj", "proj", &[]),
            workload(WorkloadKind::EcsTask, "no-arn", "x:1", &[]),
        ]);
        let r = interval_report(&s, &mut Selector::default());
        assert_eq!(r.time, s.time);
        assert_eq!(
            r.hosts.len(),
            2,
            "compose projects and unnamed tasks get no host"
        );
        let ecs = &r.hosts[0];
        assert_eq!(ecs.identity.name, "8f03e41243824aea923aca126495f665");
        assert_eq!(ecs.identity.custom_identifier, arn);
        assert_eq!(ecs.roles_label.as_deref(), Some("shop:web"));
        let pod = &r.hosts[1];
        assert_eq!(pod.identity.name, "web-7d9c5b8f4-abcde");
        assert_eq!(
            pod.identity.custom_identifier,
            "8712f785-1a3e-41ec-a00b-e2dcc77431cb.kubernetes"
        );
    }

    /// Selection happens here: a workload that is not a host has no report at all, an ignored
    /// container gives its host nothing, and display name and memo come from the labels.
    #[test]
    fn the_selection_decides_hosts_containers_and_labels() {
        use crate::{
            inventory::HOST_LABEL,
            mackerel::select::{parse_regex, AllowedRoles, Selection},
        };
        let pod = |name: &str, labels: &[(&str, &str)]| {
            let mut w = workload(
                WorkloadKind::KubernetesPod,
                &format!("uid-{name}"),
                &format!("shop/{name}"),
                labels,
            );
            let mut sidecar = w.containers[0].clone();
            sidecar.name = "istio-proxy".into();
            w.containers.push(sidecar);
            w
        };
        let s = snapshot(vec![
            pod("out", &[(HOST_LABEL, "false")]),
            pod(
                "web",
                &[
                    (DISPLAY_NAME_LABEL, " Web frontend "),
                    (MEMO_LABEL, "owned by team web"),
                    (ROLES_LABEL, "shop:web,billing:db"),
                ],
            ),
        ]);
        let mut selector = Selector::new(Selection {
            ignore_containers: Some(parse_regex("^istio-proxy$").unwrap()),
            allowed_roles: Some(AllowedRoles::parse("shop:*").unwrap()),
            ..Selection::default()
        });
        let r = interval_report(&s, &mut selector);
        assert_eq!(r.hosts.len(), 1, "{:?}", r.hosts);
        let host = &r.hosts[0];
        assert_eq!(host.identity.name, "web");
        assert_eq!(host.display_name.as_deref(), Some("Web frontend"));
        assert_eq!(host.memo.as_deref(), Some("owned by team web"));
        assert_eq!(host.roles_label.as_deref(), Some("shop:web"));
        let names: Vec<_> = host.containers.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["app"]);
        assert_eq!(
            host.meta.cloud.as_ref().unwrap().metadata["containers"],
            serde_json::json!(["app"])
        );
        // Without rules, both pods and both containers.
        let r = interval_report(&s, &mut Selector::default());
        assert_eq!(r.hosts.len(), 1, "host=false still holds");
        assert_eq!(r.hosts[0].containers.len(), 2);
        assert_eq!(
            r.hosts[0].roles_label.as_deref(),
            Some("shop:web,billing:db")
        );
    }

    #[test]
    fn container_metrics_are_rates_with_loopback_apart() {
        let arn = "arn:aws:ecs:us-east-1:111122223333:task/prod/8f03e41243824aea923aca126495f665";
        let s = snapshot(vec![workload(
            WorkloadKind::EcsTask,
            "t",
            "web:12",
            &[(LABEL_TASK_ARN, arn)],
        )]);
        let c = &interval_report(&s, &mut Selector::default()).hosts[0].containers[0];
        assert_eq!(c.name, "app");
        assert_eq!(c.rx_bytes_per_sec, 2000.0);
        assert_eq!(c.tx_bytes_per_sec, 0.0);
        assert_eq!(c.lo_tx_bytes_per_sec, 300.0);
        assert_eq!(c.cpu_percent, Some(12.0));
        assert_eq!(c.cpu_limit_percent, Some(25.0));
        assert_eq!(c.memory_limit_bytes, Some(1 << 30));
    }
}
