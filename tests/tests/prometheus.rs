//! The Prometheus endpoint scraped by a real Prometheus server (Debian package `prometheus`,
//! which also ships `promtool`), started on loopback with a 1 s scrape interval. No root
//! needed: the snapshots are synthetic, with known traffic, so the totals are exact. Skipped,
//! with a message, when Prometheus is not installed.

use std::{
    collections::BTreeMap,
    time::{Duration, SystemTime},
};

use observer::{
    sink::{prometheus::PrometheusSink, Sink},
    snapshot::{
        host_traffic, CgroupTraffic, ContainerReport, Health, NetworkMode, PlatformStatus,
        Snapshot, Usage, WorkloadKind, WorkloadReport,
    },
};
use observer_common::{Counter, TrafficValue};
use testbed::prometheus_server::{
    close, promtool_check, scrape, skip_unless_prometheus, PrometheusServer,
};

const INTERVAL: Duration = Duration::from_secs(1);
/// A container name with everything the text format must escape, and then some.
const ODD: &str = "odd \"quoted\" back\\slash\nnew line ünïcødé コンテナ 🚀";

/// Traffic of container `web` in each interval.
fn web_delta() -> TrafficValue {
    TrafficValue {
        rx: Counter {
            bytes: 123_456,
            packets: 101,
        },
        tx: Counter {
            bytes: 654_321,
            packets: 202,
        },
        lo_rx: Counter {
            bytes: 1_000,
            packets: 10,
        },
        lo_tx: Counter {
            bytes: 2_000,
            packets: 20,
        },
    }
}

fn pod(name: &str, container: &str, cgroup: u64, traffic: TrafficValue) -> WorkloadReport {
    let usage = Usage {
        cpu_percent: Some(50.0),
        cpu_limit_cores: Some(1.0),
        memory_working_set: Some(32 << 20),
        memory_limit: Some(128 << 20),
    };
    WorkloadReport {
        kind: WorkloadKind::KubernetesPod,
        id: format!("uid-{cgroup}"),
        name: format!("shop/{name}"),
        namespace: Some("shop".into()),
        labels: BTreeMap::new(),
        controller: None,
        network_mode: NetworkMode::Pod,
        cgroup_ids: vec![cgroup],
        traffic,
        usage,
        containers: vec![ContainerReport {
            id: format!("{cgroup:064x}"),
            name: container.into(),
            image: Some("registry.example/shop:1".into()),
            network_mode: NetworkMode::Pod,
            cgroup_ids: vec![cgroup],
            traffic,
            usage,
            reach: Default::default(),
        }],
    }
}

fn snapshot(workloads: Vec<WorkloadReport>) -> Snapshot {
    let cgroups: Vec<CgroupTraffic> = workloads
        .iter()
        .map(|w| CgroupTraffic {
            cgroup_id: w.cgroup_ids[0],
            path: Some(format!("/kubepods/pod{}", w.id)),
            delta: w.traffic,
        })
        .collect();
    Snapshot {
        time: SystemTime::now(),
        interval: INTERVAL,
        host: host_traffic(&cgroups, &workloads, &[]),
        cgroups,
        workloads,
        held: Vec::new(),
        platform: Some(PlatformStatus {
            source: "kubernetes",
            stale_since: None,
            failures_total: 0,
            stale_reason: None,
            unlisted: Vec::new(),
        }),
        health: Health {
            programs_attached: 2,
            map_entries: 2,
            map_capacity: 16_384,
            map_full_drops: 0,
            sinks: Vec::new(),
        },
    }
}

fn both() -> Snapshot {
    snapshot(vec![
        pod("web", "app", 11, web_delta()),
        pod("odd", ODD, 12, TrafficValue::default()),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_exact_totals_and_forgets_gone_containers() -> anyhow::Result<()>
{
    let Some(tools) = skip_unless_prometheus(
        "a_real_prometheus_scrapes_exact_totals_and_forgets_gone_containers",
    ) else {
        return Ok(());
    };
    let (prometheus, promtool) = (tools.prometheus, tools.promtool);
    let mut sink = PrometheusSink::start("127.0.0.1:0".parse()?, INTERVAL)?;
    let addr = sink.local_addr();

    // Five intervals before Prometheus starts, five while it scrapes.
    for _ in 0..5 {
        sink.emit(&both())?;
    }
    let server = PrometheusServer::start(&prometheus, addr)?;
    server.wait_until_up(Duration::from_secs(60)).await?;
    for _ in 0..5 {
        sink.emit(&both())?;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    let d = web_delta();
    let expected = [
        ("network_receive_bytes_total", "device", d.rx.bytes),
        ("network_transmit_bytes_total", "device", d.tx.bytes),
        ("network_receive_packets_total", "device", d.rx.packets),
        ("network_transmit_packets_total", "device", d.tx.packets),
        ("network_receive_bytes_total", "loopback", d.lo_rx.bytes),
        ("network_transmit_bytes_total", "loopback", d.lo_tx.bytes),
        ("network_receive_packets_total", "loopback", d.lo_rx.packets),
        (
            "network_transmit_packets_total",
            "loopback",
            d.lo_tx.packets,
        ),
    ];
    for (name, class, per_interval) in expected {
        let total = (per_interval * 10) as f64;
        for (scope, selector) in [
            ("container", r#"namespace="shop",pod="web",container="app""#),
            (
                "workload",
                r#"kind="kubernetes_pod",namespace="shop",pod="web""#,
            ),
        ] {
            let promql =
                format!(r#"observer_{scope}_{name}{{{selector},interface_class="{class}"}}"#);
            let samples = server
                .wait_for(&promql, Duration::from_secs(30), |s| {
                    s.len() == 1 && close(s[0].1, total)
                })
                .await?;
            assert_eq!(samples.len(), 1, "{promql}");
        }
    }
    let cpu = r#"observer_container_cpu_usage_seconds_total{pod="web",container="app"}"#;
    server
        .wait_for(cpu, Duration::from_secs(30), |s| {
            s.len() == 1 && close(s[0].1, 5.0)
        })
        .await?;

    // The odd name reaches Prometheus intact: escaping works both ways.
    let odd = server
        .wait_for(
            r#"observer_container_memory_working_set_bytes{pod="odd"}"#,
            Duration::from_secs(30),
            |s| s.len() == 1,
        )
        .await?;
    assert_eq!(odd[0].0["container"], ODD);
    assert_eq!(odd[0].1, (32u64 << 20) as f64);

    let text = scrape(addr).await?;
    promtool_check(&promtool, &text)?;

    // web's container goes away: its series leave /metrics, and Prometheus marks them stale.
    sink.emit(&snapshot(vec![pod(
        "odd",
        ODD,
        12,
        TrafficValue::default(),
    )]))?;
    let text = scrape(addr).await?;
    assert!(!text.contains(r#"pod="web""#), "{text}");
    assert!(text.contains(r#"pod="odd""#));
    promtool_check(&promtool, &text)?;
    server
        .wait_for(
            r#"{__name__=~"observer_(container|workload)_.*",pod="web"}"#,
            Duration::from_secs(30),
            |s| s.is_empty(),
        )
        .await?;
    let still = server
        .query(r#"observer_container_info{pod="odd"}"#)
        .await?;
    assert_eq!(still.len(), 1, "the other container keeps its series");
    Ok(())
}
