//! The Prometheus endpoint scraped by a real Prometheus server (Debian package `prometheus`,
//! which also ships `promtool`), started on loopback with a 1 s scrape interval. No root
//! needed: the snapshots are synthetic, with known traffic, so the totals are exact. Skipped,
//! with a message, when Prometheus is not installed.

use std::{
    collections::BTreeMap,
    io::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{bail, Context as _};
use observer::{
    inventory::NetworkMode,
    sink::{prometheus::PrometheusSink, Sink},
    snapshot::{CgroupTraffic, Health, PlatformStatus, Snapshot},
    workloads::{ContainerReport, ReportKind, Usage, WorkloadReport},
};
use observer_common::{Counter, TrafficValue};
use serde_json::Value;

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
        kind: ReportKind::KubernetesPod,
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
        }],
    }
}

fn snapshot(workloads: Vec<WorkloadReport>) -> Snapshot {
    let cgroups = workloads
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
        cgroups,
        workloads,
        platform: Some(PlatformStatus {
            source: "kubernetes",
            stale_since: None,
        }),
        health: Health {
            map_entries: 2,
            map_capacity: 16_384,
            map_full_drops: 0,
        },
    }
}

fn both() -> Snapshot {
    snapshot(vec![
        pod("web", "app", 11, web_delta()),
        pod("odd", ODD, 12, TrafficValue::default()),
    ])
}

/// `name` on PATH or in /usr/bin.
fn find(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/bin")])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A Prometheus server in a temporary directory; killed, and the directory removed, on drop.
struct PrometheusServer {
    child: Child,
    dir: PathBuf,
    base: String,
    http: reqwest::Client,
}

impl PrometheusServer {
    fn start(binary: &Path, target: SocketAddr) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(testbed::unique("observer-prometheus"));
        std::fs::create_dir_all(dir.join("data"))?;
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: observer\n    static_configs:\n      \
                 - targets: ['{target}']\n"
            ),
        )?;
        let port = free_port()?;
        let log = std::fs::File::create(dir.join("prometheus.log"))?;
        let spawned = Command::new(binary)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn();
        let child = match spawned {
            Ok(child) => child,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e).context("starting prometheus");
            }
        };
        Ok(Self {
            child,
            dir,
            base: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::new(),
        })
    }

    /// The end of Prometheus' log, for failure messages.
    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// The samples of an instant query: (labels, value) each.
    async fn query(&self, promql: &str) -> anyhow::Result<Vec<(Value, f64)>> {
        let url = format!(
            "{}/api/v1/query?query={}",
            self.base,
            percent_encode(promql)
        );
        let body: Value = serde_json::from_str(&self.http.get(url).send().await?.text().await?)?;
        if body["status"] != "success" {
            bail!("query {promql}: {body}");
        }
        let result = body["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        result
            .into_iter()
            .map(|r| {
                let value = r["value"][1].as_str().context("a value")?.parse::<f64>()?;
                Ok((r["metric"].clone(), value))
            })
            .collect()
    }

    /// Waits until `ok` holds for the query's samples; the last samples otherwise.
    async fn wait_for(
        &self,
        promql: &str,
        within: Duration,
        ok: impl Fn(&[(Value, f64)]) -> bool,
    ) -> anyhow::Result<Vec<(Value, f64)>> {
        let deadline = Instant::now() + within;
        loop {
            let samples = self.query(promql).await.unwrap_or_default();
            if ok(&samples) {
                return Ok(samples);
            }
            if Instant::now() > deadline {
                bail!(
                    "{promql} never matched within {within:?}; last answer {samples:?}\n\
                     prometheus log:\n{}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

impl Drop for PrometheusServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Percent-encoding of a query parameter: unreserved characters stay, every other byte goes.
fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

async fn scrape(addr: SocketAddr) -> anyhow::Result<String> {
    let response = reqwest::get(format!("http://{addr}/metrics")).await?;
    if !response.status().is_success() {
        bail!("/metrics answered {}", response.status());
    }
    Ok(response.text().await?)
}

/// `promtool check metrics` on `text`: its complaints, if any.
fn promtool_check(promtool: &Path, text: &str) -> anyhow::Result<()> {
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting promtool")?;
    child
        .stdin
        .take()
        .context("promtool's stdin")?
        .write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "promtool check metrics failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn close(actual: f64, expected: f64) -> bool {
    (actual - expected).abs() <= expected.abs() * 0.02
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_exact_totals_and_forgets_gone_containers() -> anyhow::Result<()>
{
    let (Some(prometheus), Some(promtool)) = (find("prometheus"), find("promtool")) else {
        eprintln!(
            "SKIPPED a_real_prometheus_scrapes_exact_totals_and_forgets_gone_containers: \
             prometheus/promtool not installed (apt-get install prometheus)"
        );
        return Ok(());
    };
    let (mut sink, handle) = PrometheusSink::start("127.0.0.1:0".parse()?, INTERVAL)?;
    let addr = handle.local_addr();
    handle.set_programs_attached(2);

    // Five intervals before Prometheus starts, five while it scrapes.
    for _ in 0..5 {
        sink.emit(&both())?;
    }
    let server = PrometheusServer::start(&prometheus, addr)?;
    server
        .wait_for(r#"up{job="observer"}"#, Duration::from_secs(60), |s| {
            s.first().is_some_and(|(_, v)| *v == 1.0)
        })
        .await?;
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
