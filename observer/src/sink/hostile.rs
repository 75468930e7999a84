//! Names and labels a workload chooses (container and pod names, labels, the
//! `mackerel.io/roles` annotation, images, cgroup paths) reach every output as data only: no
//! output runs them, and none lets them break its format. observer starts no process and
//! builds no shell line from them; in URLs they go through percent-encoding (the Mackerel
//! client), and the Docker client asks only about ids that are container ids.

use std::{
    collections::BTreeMap,
    time::{Duration, UNIX_EPOCH},
};

use observer_common::{Counter, TrafficValue};

use super::{json::JsonSink, prometheus::PrometheusSink, Sink};
use crate::{
    inventory::{ecs::LABEL_TASK_ARN, DISPLAY_NAME_LABEL, MEMO_LABEL, ROLES_LABEL},
    mackerel::{self, client::HostParam, names},
    snapshot::{
        CgroupTraffic, ContainerReport, Health, NetworkMode, OwnerRef, PlatformStatus, Snapshot,
        Usage, WorkloadKind, WorkloadReport,
    },
};

/// Values a hostile workload might choose.
fn hostile() -> Vec<String> {
    vec![
        "x".repeat(10_000),
        "$(reboot)".into(),
        "`id`; rm -rf / && curl http://169.254.169.254/".into(),
        "line\nbreak\n# TYPE fake counter\nfake_total 1\n{\"kind\":\"fake\"}".into(),
        "ctl\u{1b}[2J\u{1b}]0;title\u{7}\r\t\0end".into(),
        "quote\"}\\ back\\slash\\".into(),
        "rtl\u{202e}txt.exe ünïcødé コンテナ 🚀".into(),
        String::new(),
    ]
}

fn traffic(n: u64) -> TrafficValue {
    let c = Counter {
        bytes: n,
        packets: n / 100,
    };
    TrafficValue {
        rx: c,
        tx: c,
        lo_rx: c,
        lo_tx: c,
    }
}

fn container(i: usize, name: &str) -> ContainerReport {
    ContainerReport {
        id: format!("{i:064x}"),
        name: name.to_owned(),
        image: Some(name.to_owned()),
        network_mode: NetworkMode::Network(name.to_owned()),
        cgroup_ids: vec![i as u64],
        traffic: traffic(1000),
        usage: Usage {
            cpu_percent: Some(1.0),
            cpu_limit_cores: Some(0.5),
            memory_working_set: Some(1 << 20),
            memory_limit: Some(1 << 30),
        },
        reach: Default::default(),
    }
}

/// One workload of each kind per hostile value, the value in every string it has.
fn snapshot() -> Snapshot {
    let mut workloads = Vec::new();
    let mut cgroups = Vec::new();
    for (i, value) in hostile().iter().enumerate() {
        let labels = BTreeMap::from([
            (value.clone(), value.clone()),
            (ROLES_LABEL.to_owned(), format!("{value},ok:fine,{value}:x")),
            (DISPLAY_NAME_LABEL.to_owned(), format!("x{value}")),
            (MEMO_LABEL.to_owned(), format!("x{value}")),
            (
                LABEL_TASK_ARN.to_owned(),
                format!("arn:aws:ecs:r:1:task/c/{value}"),
            ),
        ]);
        for (k, kind) in [
            WorkloadKind::KubernetesPod,
            WorkloadKind::EcsTask,
            WorkloadKind::ComposeProject,
            WorkloadKind::Container,
        ]
        .into_iter()
        .enumerate()
        {
            let id = i * 10 + k + 1;
            workloads.push(WorkloadReport {
                kind,
                id: format!("uid-{i}-{k}"),
                name: format!("{value}/{value}"),
                namespace: Some(value.clone()),
                labels: labels.clone(),
                controller: Some(OwnerRef {
                    kind: value.clone(),
                    name: value.clone(),
                }),
                network_mode: NetworkMode::Container(value.clone()),
                cgroup_ids: vec![id as u64],
                traffic: traffic(1000),
                usage: Usage::default(),
                containers: vec![container(id, value)],
            });
            cgroups.push(CgroupTraffic {
                cgroup_id: id as u64,
                path: Some(format!("/kubepods/{value}/{id}")),
                delta: traffic(1000),
            });
        }
    }
    Snapshot {
        time: UNIX_EPOCH + Duration::from_secs(1_795_000_000),
        interval: Duration::from_secs(10),
        cgroups,
        workloads,
        held: Vec::new(),
        host: TrafficValue::default(),
        platform: Some(PlatformStatus {
            source: "kubernetes",
            stale_since: None,
            failures_total: 0,
            stale_reason: None,
            unlisted: Vec::new(),
        }),
        health: Health {
            programs_attached: 2,
            map_entries: 1,
            map_capacity: 16384,
            map_full_drops: 0,
            sinks: Vec::new(),
        },
    }
}

#[test]
fn json_lines_stay_one_object_a_line() {
    let snapshot = snapshot();
    let mut sink = JsonSink::new(Vec::new());
    sink.emit(&snapshot).unwrap();
    let out = String::from_utf8(sink.into_inner()).unwrap();
    let mut seen = Vec::new();
    for line in out.lines() {
        let value: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line:.200}"));
        collect_strings(&value, &mut seen);
    }
    // One line per cgroup, per workload and one of observer's own: no value split a line.
    assert_eq!(
        out.lines().count(),
        snapshot.cgroups.len() + snapshot.workloads.len() + 1
    );
    for value in hostile() {
        assert!(
            seen.contains(&value),
            "{value:.80?} did not come back whole"
        );
    }
}

fn collect_strings(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::String(s) => out.push(s.clone()),
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_strings(v, out)),
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                out.push(k.clone());
                collect_strings(v, out);
            }
        }
        _ => {}
    }
}

#[tokio::test]
async fn prometheus_samples_stay_one_a_line() {
    let snapshot = snapshot();
    let mut sink =
        PrometheusSink::start("127.0.0.1:0".parse().unwrap(), Duration::from_secs(60)).unwrap();
    sink.emit(&snapshot).unwrap();
    let url = format!("http://{}/metrics", sink.local_addr());
    for accept in ["text/plain", "application/openmetrics-text;version=1.0.0"] {
        let text = reqwest::Client::new()
            .get(&url)
            .header("accept", accept)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let mut values = Vec::new();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            sample_label_values(line, &mut values)
                .unwrap_or_else(|| panic!("{accept}: not a sample: {line:.200}"));
        }
        for value in hostile() {
            assert!(
                values.contains(&value),
                "{accept}: {value:.80?} did not come back whole"
            );
        }
        assert!(
            !text.contains("\nfake_total"),
            "a label made a sample of its own"
        );
    }
}

/// The unescaped label values of one exposition sample line (`name{l="v",...} value`), or
/// None if the line is not one.
fn sample_label_values(line: &str, out: &mut Vec<String>) -> Option<()> {
    let name_len = line
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .unwrap_or(line.len());
    if name_len == 0 {
        return None;
    }
    let mut rest = &line[name_len..];
    if let Some(labels) = rest.strip_prefix('{') {
        rest = labels;
        loop {
            if let Some(after) = rest.strip_prefix('}') {
                rest = after;
                break;
            }
            let eq = rest.find("=\"")?;
            let label = &rest[..eq];
            if label.is_empty() || !label.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return None;
            }
            let mut value = String::new();
            let mut chars = rest[eq + 2..].char_indices();
            let end = loop {
                match chars.next()? {
                    (_, '\\') => match chars.next()?.1 {
                        '\\' => value.push('\\'),
                        '"' => value.push('"'),
                        'n' => value.push('\n'),
                        _ => return None,
                    },
                    (at, '"') => break at,
                    (_, '\n') => return None,
                    (_, c) => value.push(c),
                }
            };
            out.push(value);
            rest = &rest[eq + 2 + end + 1..];
            rest = rest.strip_prefix(',').unwrap_or(rest);
        }
    }
    let value = rest.strip_prefix(' ')?;
    let value = value.split(' ').next()?;
    (value.parse::<f64>().is_ok()).then_some(())
}

#[test]
fn mackerel_names_and_bodies_keep_their_shape() {
    let snapshot = snapshot();
    let report =
        mackerel::report::interval_report(&snapshot, &mut mackerel::select::Selector::default());
    assert!(!report.hosts.is_empty());
    for host in &report.hosts {
        for c in &host.containers {
            for (name, _) in names::container_values(c, true) {
                let ok = name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
                assert!(ok && !name.contains(".."), "metric name {name:.80?}");
            }
        }
        let (roles, _) = mackerel::Roles::parse_lenient(host.roles_label.as_deref().unwrap());
        assert_eq!(roles.as_slice(), ["ok:fine"], "only well-formed roles");
        // The host's name and identifier travel as JSON strings, whatever they hold.
        let param = HostParam {
            name: host.identity.name.clone(),
            display_name: host.display_name.clone(),
            memo: host.memo.clone(),
            custom_identifier: host.identity.custom_identifier.clone(),
            meta: host.meta.clone(),
            role_fullnames: roles.as_slice().to_vec(),
        };
        let body = serde_json::to_string(&param).unwrap();
        let back: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(back["name"], host.identity.name.as_str());
        let display_name = host.display_name.as_deref().expect("a display name");
        assert_eq!(back["displayName"], display_name);
        assert!(display_name.chars().count() <= mackerel::select::MAX_DISPLAY_NAME_CHARS);
        assert_eq!(
            back["customIdentifier"],
            host.identity.custom_identifier.as_str()
        );
    }
}
