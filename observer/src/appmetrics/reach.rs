//! Where each container of a Mackerel host's workload serves its metrics, from what the
//! platform says and what the workload declares.
//!
//! | platform, mode | address | port |
//! |---|---|---|
//! | ECS bridge (and user networks) | the node (`--app-metrics-node-address`) | the host port the introspection API's `Ports` map the declared container port to; Docker's port map when the agent lists none |
//! | ECS host | the node | the declared container port |
//! | ECS awsvpc | the task's ENI address (`Networks`) | the declared container port |
//! | Kubernetes pod | the pod IP | `prometheus.io/port` |
//! | Kubernetes hostNetwork pod | the host IP | `prometheus.io/port` |
//!
//! A workload's `mackerel.io/plugins` (an ECS container's Docker label, a pod's annotation)
//! makes a [`Source::Plugin`] target per configured name it lists, at the same address; its
//! port is the declared one (`ECS_PROMETHEUS_EXPORTER_PORT`, `prometheus.io/port`) where that
//! is reachable, else an ECS container's first reachable TCP port, else 0 (unknown).
//!
//! The node's address is 127.0.0.1 by default: published and host ports are reached from the
//! host's network namespace, where the ECS daemon task runs observer.
//!
//! Labels and annotations are the workload's to set, so they choose only a port and a path on
//! the workload's own address, each checked: a port 1-65535, a path of plain characters that
//! starts with `/`; never a host name or a URL.

use std::{collections::BTreeMap, net::IpAddr};

use super::{naming, plugin::PluginSet, Source, Target};
use crate::snapshot::{ContainerReport, NetworkMode, WorkloadKind, WorkloadReport};

/// ECS Docker labels of the CloudWatch agent's Prometheus discovery.
pub const ECS_PORT: &str = "ECS_PROMETHEUS_EXPORTER_PORT";
pub const ECS_PATH: &str = "ECS_PROMETHEUS_METRICS_PATH";
pub const ECS_JOB: &str = "ECS_PROMETHEUS_JOB_NAME";
/// Pod annotations of Prometheus' Kubernetes discovery.
pub const K8S_SCRAPE: &str = "prometheus.io/scrape";
pub const K8S_PORT: &str = "prometheus.io/port";
pub const K8S_PATH: &str = "prometheus.io/path";

pub const DEFAULT_PATH: &str = "/metrics";
/// Longest path taken from a label.
pub const MAX_PATH_CHARS: usize = 256;

/// Why a container that declares an endpoint is not scraped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReachError {
    #[error("{label} {value:?} is not a port (1-65535)")]
    Port { label: &'static str, value: String },
    #[error(
        "{label} is not a path starting with '/' of at most {MAX_PATH_CHARS} plain characters"
    )]
    Path { label: &'static str },
    #[error("{label} {value:?} leaves nothing to name the metrics by")]
    Prefix { label: &'static str, value: String },
    #[error("container port {0}/tcp is not published on the node")]
    NotPublished(u16),
    #[error("the platform lists no address for it")]
    NoAddress,
}

/// The targets of one Mackerel host's workload (`containers`: those the host keeps), and why
/// the others that declare one are left out. `plugins` are the operator's: a workload's
/// `mackerel.io/plugins` picks from them.
pub fn targets(
    w: &WorkloadReport,
    containers: &[&ContainerReport],
    host_key: &str,
    node: IpAddr,
    plugins: &PluginSet,
) -> (Vec<Target>, Vec<(String, ReachError)>) {
    let mut found = Vec::new();
    let mut refused = Vec::new();
    match w.kind {
        WorkloadKind::EcsTask => {
            for c in containers {
                match ecs_target(w, c, containers, host_key, node) {
                    Ok(Some(t)) => found.push(t),
                    Ok(None) => {}
                    Err(e) => refused.push((c.name.clone(), e)),
                }
                match ecs_plugin_targets(w, c, containers, host_key, node, plugins) {
                    Ok(t) => found.extend(t),
                    Err(e) => refused.push((c.name.clone(), e)),
                }
            }
        }
        WorkloadKind::KubernetesPod => {
            if let Some(first) = containers.first() {
                match pod_target(w, first, host_key) {
                    Ok(Some(t)) => found.push(t),
                    Ok(None) => {}
                    Err(e) => refused.push((first.name.clone(), e)),
                }
                match pod_plugin_targets(w, first, host_key, plugins) {
                    Ok(t) => found.extend(t),
                    Err(e) => refused.push((first.name.clone(), e)),
                }
            }
        }
        WorkloadKind::ComposeProject | WorkloadKind::Container => {}
    }
    (found, refused)
}

fn ecs_target(
    w: &WorkloadReport,
    c: &ContainerReport,
    all: &[&ContainerReport],
    host_key: &str,
    node: IpAddr,
) -> Result<Option<Target>, ReachError> {
    let declared = &c.reach.declared;
    let Some(port) = declared.get(ECS_PORT) else {
        return Ok(None);
    };
    let port = parse_port(ECS_PORT, port)?;
    let path = parse_path(ECS_PATH, declared.get(ECS_PATH))?;
    let prefix = parse_prefix(ECS_JOB, declared.get(ECS_JOB), &c.name)?;
    let (address, published) = ecs_address(w, c, all, node)?;
    let port = ecs_port(c, port, published).ok_or(ReachError::NotPublished(port))?;
    Ok(Some(Target {
        host_key: host_key.to_owned(),
        workload: w.name.clone(),
        workload_id: w.id.clone(),
        container: c.name.clone(),
        address,
        port,
        path,
        prefix,
        source: Source::Prometheus,
    }))
}

/// The plugins a container's own `mackerel.io/plugins` Docker label names, at its address.
/// `{port}` is its declared `ECS_PROMETHEUS_EXPORTER_PORT` where that is reachable, else the
/// first of its TCP ports (as the platform lists them) that is; 0 (unknown) if none is.
fn ecs_plugin_targets(
    w: &WorkloadReport,
    c: &ContainerReport,
    all: &[&ContainerReport],
    host_key: &str,
    node: IpAddr,
    plugins: &PluginSet,
) -> Result<Vec<Target>, ReachError> {
    let names = plugins.names_for(&w.name, &c.reach.declared);
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let (address, published) = ecs_address(w, c, all, node)?;
    let declared = (c.reach.declared.get(ECS_PORT)).and_then(|p| parse_port(ECS_PORT, p).ok());
    let listed = c
        .reach
        .ports
        .iter()
        .filter(|p| p.tcp)
        .map(|p| p.container_port);
    let port = (declared.into_iter().chain(listed))
        .find_map(|p| ecs_port(c, p, published))
        .unwrap_or(0);
    Ok(plugin_targets(w, &c.name, host_key, address, port, names))
}

/// A container's address, and whether its ports are reached as the node's published ports.
fn ecs_address(
    w: &WorkloadReport,
    c: &ContainerReport,
    all: &[&ContainerReport],
    node: IpAddr,
) -> Result<(IpAddr, bool), ReachError> {
    let mode = match &c.network_mode {
        NetworkMode::Unknown => &w.network_mode,
        mode => mode,
    };
    match mode {
        NetworkMode::Host => Ok((node, false)),
        NetworkMode::Awsvpc | NetworkMode::Container(_) | NetworkMode::Pod => {
            // The ENI is the task's: any container may carry it in `Networks`.
            let address = (c.reach.addresses.iter())
                .chain(all.iter().flat_map(|o| &o.reach.addresses))
                .next()
                .copied()
                .ok_or(ReachError::NoAddress)?;
            Ok((address, false))
        }
        NetworkMode::None => Err(ReachError::NoAddress),
        NetworkMode::Bridge | NetworkMode::Network(_) | NetworkMode::Unknown => Ok((node, true)),
    }
}

/// Where container port `port` answers: itself, or the node's port it is published on.
fn ecs_port(c: &ContainerReport, port: u16, published: bool) -> Option<u16> {
    if !published {
        return Some(port);
    }
    (c.reach.ports.iter())
        .find(|p| p.tcp && p.container_port == port)
        .and_then(|p| p.host_port)
}

/// The plugins a pod's `mackerel.io/plugins` annotation names, at the pod's address;
/// `{port}` is its `prometheus.io/port`, 0 (unknown) without one.
fn pod_plugin_targets(
    w: &WorkloadReport,
    first: &ContainerReport,
    host_key: &str,
    plugins: &PluginSet,
) -> Result<Vec<Target>, ReachError> {
    let names = plugins.names_for(&w.name, &w.labels);
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let address = *first.reach.addresses.first().ok_or(ReachError::NoAddress)?;
    let port = (first.reach.declared.get(K8S_PORT))
        .and_then(|p| parse_port(K8S_PORT, p).ok())
        .unwrap_or(0);
    Ok(plugin_targets(
        w,
        &first.name,
        host_key,
        address,
        port,
        names,
    ))
}

fn plugin_targets(
    w: &WorkloadReport,
    container: &str,
    host_key: &str,
    address: IpAddr,
    port: u16,
    names: Vec<String>,
) -> Vec<Target> {
    names
        .into_iter()
        .map(|name| Target {
            host_key: host_key.to_owned(),
            workload: w.name.clone(),
            workload_id: w.id.clone(),
            container: container.to_owned(),
            address,
            port,
            path: String::new(),
            prefix: name.clone(),
            source: Source::Plugin(name),
        })
        .collect()
}

/// A pod's one target: its annotations are the pod's, its address is shared by its containers.
/// The prefix is the pod's controller (a Deployment's name: the same for every replica), else
/// its first container's name.
fn pod_target(
    w: &WorkloadReport,
    first: &ContainerReport,
    host_key: &str,
) -> Result<Option<Target>, ReachError> {
    let declared: &BTreeMap<String, String> = &first.reach.declared;
    let wanted = declared
        .get(K8S_SCRAPE)
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
    if !wanted {
        return Ok(None);
    }
    let port = match declared.get(K8S_PORT) {
        Some(p) => parse_port(K8S_PORT, p)?,
        None => {
            return Err(ReachError::Port {
                label: K8S_PORT,
                value: String::new(),
            })
        }
    };
    let path = parse_path(K8S_PATH, declared.get(K8S_PATH))?;
    let default = w
        .controller
        .as_ref()
        .map(|o| o.name.as_str())
        .unwrap_or(&first.name);
    let prefix = parse_prefix("the pod's controller or container name", None, default)?;
    let address = *first.reach.addresses.first().ok_or(ReachError::NoAddress)?;
    Ok(Some(Target {
        host_key: host_key.to_owned(),
        workload: w.name.clone(),
        workload_id: w.id.clone(),
        container: first.name.clone(),
        address,
        port,
        path,
        prefix,
        source: Source::Prometheus,
    }))
}

fn parse_port(label: &'static str, value: &str) -> Result<u16, ReachError> {
    value
        .trim()
        .parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| ReachError::Port {
            label,
            value: value.chars().take(32).collect(),
        })
}

/// A path: `/` first, then printable ASCII without spaces, `\` or `#`; at most
/// [`MAX_PATH_CHARS`]; not `//` (which reads as an authority to some).
fn parse_path(label: &'static str, value: Option<&String>) -> Result<String, ReachError> {
    let Some(value) = value.map(|v| v.trim()).filter(|v| !v.is_empty()) else {
        return Ok(DEFAULT_PATH.to_owned());
    };
    let plain = value
        .bytes()
        .all(|b| b.is_ascii_graphic() && b != b'\\' && b != b'#');
    if value.starts_with('/') && !value.starts_with("//") && plain && value.len() <= MAX_PATH_CHARS
    {
        Ok(value.to_owned())
    } else {
        Err(ReachError::Path { label })
    }
}

fn parse_prefix(
    label: &'static str,
    value: Option<&String>,
    default: &str,
) -> Result<String, ReachError> {
    let raw = value
        .map(|v| v.trim())
        .filter(|v| !v.is_empty())
        .unwrap_or(default);
    naming::prefix(raw).ok_or_else(|| ReachError::Prefix {
        label,
        value: raw.chars().take(32).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        inventory::PLUGINS_LABEL,
        snapshot::{OwnerRef, PortMapping, Reach},
    };

    const NODE: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    fn container(name: &str, mode: NetworkMode, reach: Reach) -> ContainerReport {
        ContainerReport {
            id: format!("id-{name}"),
            name: name.into(),
            image: None,
            network_mode: mode,
            cgroup_ids: vec![],
            traffic: Default::default(),
            usage: Default::default(),
            reach,
        }
    }

    fn workload(
        kind: WorkloadKind,
        mode: NetworkMode,
        containers: Vec<ContainerReport>,
    ) -> WorkloadReport {
        WorkloadReport {
            kind,
            id: "id".into(),
            name: "web:3".into(),
            namespace: None,
            labels: BTreeMap::new(),
            controller: None,
            network_mode: mode,
            cgroup_ids: vec![],
            traffic: Default::default(),
            usage: Default::default(),
            containers,
        }
    }

    fn declared(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn run(w: &WorkloadReport) -> (Vec<Target>, Vec<(String, ReachError)>) {
        let cs: Vec<&ContainerReport> = w.containers.iter().collect();
        targets(w, &cs, "arn:task", NODE, &PluginSet::empty())
    }

    fn mapping(container_port: u16, host_port: Option<u16>) -> PortMapping {
        PortMapping {
            container_port,
            host_port,
            tcp: true,
        }
    }

    #[test]
    fn ecs_bridge_scrapes_the_host_port_of_the_declared_container_port() {
        let reach = Reach {
            ports: vec![mapping(8080, Some(32768)), mapping(9100, Some(32769))],
            addresses: vec![],
            declared: declared(&[
                (ECS_PORT, "9100"),
                (ECS_PATH, "/stats"),
                (ECS_JOB, "my.app"),
            ]),
        };
        let w = workload(
            WorkloadKind::EcsTask,
            NetworkMode::Bridge,
            vec![
                container("app", NetworkMode::Bridge, reach),
                container("side", NetworkMode::Bridge, Reach::default()),
            ],
        );
        let (found, refused) = run(&w);
        assert_eq!(refused, []);
        assert_eq!(found.len(), 1);
        let t = &found[0];
        assert_eq!(
            (t.address, t.port, t.path.as_str()),
            (NODE, 32769, "/stats")
        );
        assert_eq!(t.prefix, "my_app");
        assert_eq!(t.url(), "http://127.0.0.1:32769/stats");
        assert_eq!(t.host_key, "arn:task");
    }

    #[test]
    fn ecs_bridge_without_a_published_port_is_refused() {
        let reach = Reach {
            ports: vec![
                mapping(9100, None),
                PortMapping {
                    container_port: 9101,
                    host_port: Some(1),
                    tcp: false,
                },
            ],
            addresses: vec![],
            declared: declared(&[(ECS_PORT, "9100")]),
        };
        let w = workload(
            WorkloadKind::EcsTask,
            NetworkMode::Bridge,
            vec![container("app", NetworkMode::Bridge, reach)],
        );
        let (found, refused) = run(&w);
        assert!(found.is_empty());
        assert_eq!(
            refused,
            [("app".to_string(), ReachError::NotPublished(9100))]
        );
    }

    #[test]
    fn ecs_host_mode_scrapes_the_container_port_on_the_node() {
        let reach = Reach {
            // The agent repeats the task definition's mappings in host mode.
            ports: vec![mapping(9100, Some(9100))],
            addresses: vec![],
            declared: declared(&[(ECS_PORT, "9100")]),
        };
        let w = workload(
            WorkloadKind::EcsTask,
            NetworkMode::Host,
            vec![container("app", NetworkMode::Host, reach)],
        );
        let (found, _) = run(&w);
        assert_eq!((found[0].address, found[0].port), (NODE, 9100));
        assert_eq!(found[0].path, DEFAULT_PATH);
        assert_eq!(found[0].prefix, "app", "the container name by default");
    }

    #[test]
    fn ecs_awsvpc_scrapes_the_task_address() {
        let eni: IpAddr = "10.0.2.61".parse().unwrap();
        let app = container(
            "app",
            NetworkMode::Awsvpc,
            Reach {
                declared: declared(&[(ECS_PORT, "9100")]),
                ..Reach::default()
            },
        );
        let other = container(
            "side",
            NetworkMode::Awsvpc,
            Reach {
                addresses: vec![eni],
                ..Reach::default()
            },
        );
        let w = workload(WorkloadKind::EcsTask, NetworkMode::Awsvpc, vec![app, other]);
        let (found, _) = run(&w);
        assert_eq!((found[0].address, found[0].port), (eni, 9100));

        let lone = container(
            "app",
            NetworkMode::Awsvpc,
            Reach {
                declared: declared(&[(ECS_PORT, "9100")]),
                ..Reach::default()
            },
        );
        let w = workload(WorkloadKind::EcsTask, NetworkMode::Awsvpc, vec![lone]);
        assert_eq!(run(&w).1, [("app".to_string(), ReachError::NoAddress)]);
    }

    #[test]
    fn pods_are_scraped_on_their_address_when_annotated() {
        let ip: IpAddr = "172.17.0.5".parse().unwrap();
        let reach = |d: &[(&str, &str)]| Reach {
            addresses: vec![ip],
            declared: declared(d),
            ..Reach::default()
        };
        let mut w = workload(
            WorkloadKind::KubernetesPod,
            NetworkMode::Pod,
            vec![container(
                "api",
                NetworkMode::Pod,
                reach(&[(K8S_SCRAPE, "true"), (K8S_PORT, "9102"), (K8S_PATH, "/m")]),
            )],
        );
        w.controller = Some(OwnerRef {
            kind: "Deployment".into(),
            name: "api-server".into(),
        });
        let (found, _) = run(&w);
        assert_eq!(
            (found[0].address, found[0].port, found[0].path.as_str()),
            (ip, 9102, "/m")
        );
        assert_eq!(found[0].prefix, "api-server");

        w.containers[0].reach = reach(&[(K8S_SCRAPE, "false"), (K8S_PORT, "9102")]);
        assert_eq!(run(&w), (vec![], vec![]), "scrape=false: nothing");
        w.containers[0].reach = reach(&[(K8S_SCRAPE, "true")]);
        assert!(
            matches!(run(&w).1[0].1, ReachError::Port { .. }),
            "no port: refused"
        );
    }

    #[test]
    fn hostile_declarations_never_leave_the_workload_address() {
        let bad_ports = ["0", "65536", "-1", "80 80", "http://evil:80", ""];
        for port in bad_ports {
            let reach = Reach {
                ports: vec![mapping(80, Some(80))],
                addresses: vec![],
                declared: declared(&[(ECS_PORT, port)]),
            };
            let w = workload(
                WorkloadKind::EcsTask,
                NetworkMode::Host,
                vec![container("app", NetworkMode::Host, reach)],
            );
            assert!(
                matches!(run(&w).1[0].1, ReachError::Port { .. }),
                "{port:?}"
            );
        }
        let long = format!("/{}", "a".repeat(MAX_PATH_CHARS));
        let bad_paths = [
            "metrics",
            "//evil.example/metrics",
            "/a b",
            "/a\r\nHost: x",
            "/a#b",
            "/\\evil",
            long.as_str(),
            "http://evil/",
        ];
        for path in bad_paths {
            let reach = Reach {
                declared: declared(&[(ECS_PORT, "9100"), (ECS_PATH, path)]),
                ..Reach::default()
            };
            let w = workload(
                WorkloadKind::EcsTask,
                NetworkMode::Host,
                vec![container("app", NetworkMode::Host, reach)],
            );
            assert!(
                matches!(run(&w).1[0].1, ReachError::Path { .. }),
                "{path:?}"
            );
        }
        // A query string is the workload's business: it stays on its own address.
        let reach = Reach {
            declared: declared(&[(ECS_PORT, "9100"), (ECS_PATH, "/m?x=@evil:1")]),
            ..Reach::default()
        };
        let w = workload(
            WorkloadKind::EcsTask,
            NetworkMode::Host,
            vec![container("app", NetworkMode::Host, reach)],
        );
        let t = &run(&w).0[0];
        let url = reqwest::Url::parse(&t.url()).unwrap();
        assert_eq!(
            (url.host_str(), url.port()),
            (Some("127.0.0.1"), Some(9100))
        );

        let reach = Reach {
            declared: declared(&[(ECS_PORT, "9100"), (ECS_JOB, "...")]),
            ..Reach::default()
        };
        let w = workload(
            WorkloadKind::EcsTask,
            NetworkMode::Host,
            vec![container("app", NetworkMode::Host, reach)],
        );
        let t = &run(&w).0[0];
        assert_eq!(
            t.prefix, "___",
            "sanitised, not refused: dots would add name parts"
        );
        let reach = Reach {
            declared: declared(&[(ECS_PORT, "9100"), (ECS_JOB, &"x".repeat(500))]),
            ..Reach::default()
        };
        let w = workload(
            WorkloadKind::EcsTask,
            NetworkMode::Host,
            vec![container("app", NetworkMode::Host, reach)],
        );
        assert_eq!(run(&w).0[0].prefix.len(), naming::MAX_PREFIX_CHARS);
    }

    fn with_plugins(w: &WorkloadReport, text: &str) -> (Vec<Target>, Vec<(String, ReachError)>) {
        let cs: Vec<&ContainerReport> = w.containers.iter().collect();
        targets(w, &cs, "arn:task", NODE, &PluginSet::unchecked(text))
    }

    const PLUGINS: &str =
        "[plugin.gostats]\ncommand = [\"/bin/g\"]\n[plugin.redis]\ncommand = [\"/bin/r\"]\n";

    fn plugin_reach(plugins: &str, ports: Vec<PortMapping>, extra: &[(&str, &str)]) -> Reach {
        let mut d = declared(extra);
        d.insert(PLUGINS_LABEL.into(), plugins.into());
        Reach {
            ports,
            addresses: vec![],
            declared: d,
        }
    }

    fn plugins_of(found: &[Target]) -> Vec<(String, String, IpAddr, u16)> {
        found
            .iter()
            .filter_map(|t| match &t.source {
                Source::Plugin(n) => Some((n.clone(), t.container.clone(), t.address, t.port)),
                Source::Prometheus => None,
            })
            .collect()
    }

    #[test]
    fn ecs_plugins_run_at_the_declared_port_else_the_first_reachable_one() {
        // Bridge: the declared exporter port's host port.
        let app = container(
            "app",
            NetworkMode::Bridge,
            plugin_reach(
                "gostats, ghost, redis",
                vec![mapping(8080, Some(32768)), mapping(9100, Some(32769))],
                &[(ECS_PORT, "9100")],
            ),
        );
        let side = container("side", NetworkMode::Bridge, Reach::default());
        let w = workload(WorkloadKind::EcsTask, NetworkMode::Bridge, vec![app, side]);
        let (found, refused) = with_plugins(&w, PLUGINS);
        assert_eq!(refused, []);
        assert_eq!(
            plugins_of(&found),
            [
                ("gostats".into(), "app".into(), NODE, 32769),
                ("redis".into(), "app".into(), NODE, 32769)
            ],
            "configured names only, on the labelled container"
        );
        let t = found
            .iter()
            .find(|t| t.source != Source::Prometheus)
            .unwrap();
        assert_eq!(
            (t.workload_id.as_str(), t.host_key.as_str()),
            ("id", "arn:task")
        );
        assert_eq!(found.len(), 3, "the endpoint's own target too");

        // Bridge, nothing declared: the first published TCP port as listed.
        let app = container(
            "app",
            NetworkMode::Bridge,
            plugin_reach(
                "gostats",
                vec![
                    PortMapping {
                        container_port: 53,
                        host_port: Some(5353),
                        tcp: false,
                    },
                    mapping(8080, None),
                    mapping(6379, Some(32770)),
                ],
                &[],
            ),
        );
        let w = workload(WorkloadKind::EcsTask, NetworkMode::Bridge, vec![app]);
        assert_eq!(
            plugins_of(&with_plugins(&w, PLUGINS).0),
            [("gostats".into(), "app".into(), NODE, 32770)]
        );

        // A declared port that is not published: the next reachable one.
        let app = container(
            "app",
            NetworkMode::Bridge,
            plugin_reach(
                "gostats",
                vec![mapping(9100, None), mapping(80, Some(8080))],
                &[(ECS_PORT, "9100")],
            ),
        );
        let w = workload(WorkloadKind::EcsTask, NetworkMode::Bridge, vec![app]);
        let (found, refused) = with_plugins(&w, PLUGINS);
        assert_eq!(
            plugins_of(&found),
            [("gostats".into(), "app".into(), NODE, 8080)]
        );
        assert_eq!(
            refused,
            [("app".to_string(), ReachError::NotPublished(9100))],
            "the endpoint's"
        );

        // No port at all: 0, for the run to refuse {port} (a plugin may not need one).
        let app = container(
            "app",
            NetworkMode::Bridge,
            plugin_reach("gostats", vec![], &[]),
        );
        let w = workload(WorkloadKind::EcsTask, NetworkMode::Bridge, vec![app]);
        assert_eq!(
            plugins_of(&with_plugins(&w, PLUGINS).0),
            [("gostats".into(), "app".into(), NODE, 0)]
        );

        // Host mode: the container port on the node.
        let app = container(
            "app",
            NetworkMode::Host,
            plugin_reach("redis", vec![mapping(6379, Some(6379))], &[]),
        );
        let w = workload(WorkloadKind::EcsTask, NetworkMode::Host, vec![app]);
        assert_eq!(
            plugins_of(&with_plugins(&w, PLUGINS).0),
            [("redis".into(), "app".into(), NODE, 6379)]
        );

        // awsvpc: the task's address, the declared port.
        let eni: IpAddr = "10.0.2.61".parse().unwrap();
        let app = container(
            "app",
            NetworkMode::Awsvpc,
            plugin_reach("redis", vec![], &[(ECS_PORT, "9121")]),
        );
        let pause = container(
            "pause",
            NetworkMode::Awsvpc,
            Reach {
                addresses: vec![eni],
                ..Reach::default()
            },
        );
        let w = workload(WorkloadKind::EcsTask, NetworkMode::Awsvpc, vec![app, pause]);
        assert_eq!(
            plugins_of(&with_plugins(&w, PLUGINS).0),
            [("redis".into(), "app".into(), eni, 9121)]
        );

        // None: nowhere to run it against, said.
        let app = container("app", NetworkMode::None, plugin_reach("redis", vec![], &[]));
        let w = workload(WorkloadKind::EcsTask, NetworkMode::None, vec![app]);
        assert_eq!(
            with_plugins(&w, PLUGINS),
            (vec![], vec![("app".to_string(), ReachError::NoAddress)])
        );

        // Only unconfigured names, or no plugins file: nothing, nothing refused.
        let app = container("app", NetworkMode::None, plugin_reach("ghost", vec![], &[]));
        let w = workload(WorkloadKind::EcsTask, NetworkMode::None, vec![app]);
        assert_eq!(with_plugins(&w, PLUGINS), (vec![], vec![]));
        let app = container("app", NetworkMode::Host, plugin_reach("redis", vec![], &[]));
        let w = workload(WorkloadKind::EcsTask, NetworkMode::Host, vec![app]);
        assert_eq!(run(&w), (vec![], vec![]));
    }

    #[test]
    fn pod_plugins_run_at_the_pod_address_and_its_prometheus_port() {
        let ip: IpAddr = "172.17.0.5".parse().unwrap();
        let reach = |d: &[(&str, &str)]| Reach {
            addresses: vec![ip],
            declared: declared(d),
            ..Reach::default()
        };
        let mut w = workload(
            WorkloadKind::KubernetesPod,
            NetworkMode::Pod,
            vec![container(
                "api",
                NetworkMode::Pod,
                reach(&[(K8S_PORT, "9102")]),
            )],
        );
        w.labels.insert(PLUGINS_LABEL.into(), "gostats".into());
        assert_eq!(
            with_plugins(&w, PLUGINS),
            (
                vec![Target {
                    host_key: "arn:task".into(),
                    workload: "web:3".into(),
                    workload_id: "id".into(),
                    container: "api".into(),
                    address: ip,
                    port: 9102,
                    path: String::new(),
                    prefix: "gostats".into(),
                    source: Source::Plugin("gostats".into()),
                }],
                vec![]
            ),
            "no prometheus.io/scrape needed"
        );
        w.containers[0].reach = reach(&[]);
        assert_eq!(with_plugins(&w, PLUGINS).0[0].port, 0, "no port known");
        w.containers[0].reach.addresses.clear();
        assert_eq!(
            with_plugins(&w, PLUGINS).1,
            [("api".to_string(), ReachError::NoAddress)]
        );
    }
}
