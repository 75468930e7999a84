//! Prometheus endpoint: `/metrics` (Prometheus text format, or OpenMetrics when the `Accept`
//! header asks for it), `/healthz` and `/readyz`, served by a tokio task.
//!
//! [`PrometheusSink::emit`] adds each interval's deltas to totals kept per label set, in memory
//! behind a mutex; a scrape reads them through a `prometheus-client` collector. Counters are
//! cumulative since observer started (or since the container appeared) and never go back;
//! the series of a container or workload missing from a snapshot are removed at once.
//!
//! # Metrics
//!
//! `<what>` is `container`, `workload` (an ECS task, a Kubernetes pod, a Compose project, or a
//! container of none of them) or `host` (cgroups that belong to no workload: host processes
//! and system services; with no platform, every cgroup).
//!
//! | name | type | labels | meaning |
//! |---|---|---|---|
//! | `observer_<what>_network_receive_bytes_total` | counter | L, `interface_class` | IP bytes received (no link-layer header) |
//! | `observer_<what>_network_transmit_bytes_total` | counter | L, `interface_class` | IP bytes sent |
//! | `observer_<what>_network_receive_packets_total` | counter | L, `interface_class` | packets received (a GSO batch counts once) |
//! | `observer_<what>_network_transmit_packets_total` | counter | L, `interface_class` | packets sent |
//! | `observer_<what>_cpu_usage_seconds_total` | counter | L | CPU time: the sum of `cpu_percent / 100 x interval`; from the second interval of a container on (its first has no earlier sample); not for `host` |
//! | `observer_<what>_memory_working_set_bytes` | gauge | L | memory in use without inactive page cache, latest interval; not for `host` |
//! | `observer_<what>_spec_cpu_limit_cores` | gauge | L | CPU limit in cores: container's own, else its cgroup's, else its task's, else the host's CPUs; for a workload, the platform's workload limit only |
//! | `observer_<what>_spec_memory_limit_bytes` | gauge | L | memory limit, same fallbacks |
//! | `observer_container_info` | gauge (1) | L, `container_id`, `image`, `network_mode` | facts of a live container |
//! | `observer_workload_info` | gauge (1) | L, `owner_kind`, `owner_name`, `network_mode` | facts of a live workload (owner: Deployment, ...) |
//! | `observer_programs_attached` | gauge | | kernel programs attached during the latest interval |
//! | `observer_traffic_map_entries` | gauge | | entries of the kernel's traffic map after the latest interval |
//! | `observer_traffic_map_capacity` | gauge | | entries the map can hold (fill = entries / capacity) |
//! | `observer_traffic_map_full_drops_total` | counter | | packets not counted because the map was full |
//! | `observer_metadata_api_errors_total` | counter | | failed metadata API calls |
//! | `observer_inventory_stale` | gauge | `source` | 1 while the metadata API fails and workloads are its last good answer |
//! | `observer_inventory_unlisted_workloads` | gauge | `source` | workloads the metadata API no longer lists while their cgroups still hold processes, kept |
//! | `observer_mackerel_queue_depth` | gauge | | values waiting for the Mackerel API (absent without the Mackerel output) |
//! | `observer_mackerel_dropped_values_total` | counter | | values dropped unsent: the API did not take them within the buffer's bounds |
//! | `observer_sink_dropped_total` | counter | `sink` | intervals an output could not take because it was still delivering earlier ones |
//! | `observer_cycles_total` | counter | | intervals measured |
//! | `observer_last_cycle_timestamp_seconds` | gauge | | end of the latest interval, Unix time |
//! | `observer_app_scrape_errors_total` | counter | `workload`, `cause` | failed scrapes of a workload's own metrics endpoint (`connect`, `timeout`, `status`, `body`, `reach`: a declaration refused); with the Mackerel output and `--app-metrics` |
//! | `observer_app_series_dropped_total` | counter | `workload` | series of a workload's own metrics left out by `--app-metrics-max-series` or too long a name |
//!
//! `interface_class` is `device` (every interface but loopback) or `loopback`. L, the labels
//! that name a workload, by platform (a container adds `container`, its name in the task
//! definition, pod spec or Docker):
//!
//! | platform | workload series | container series |
//! |---|---|---|
//! | Kubernetes | `kind="kubernetes_pod"`, `namespace`, `pod` | `namespace`, `pod`, `container` |
//! | ECS | `kind="ecs_task"`, `cluster` (when known), `task_id`, `family` | `cluster`, `task_id`, `family`, `container` |
//! | Compose | `kind="compose_project"`, `compose_project` | `compose_project`, `container` |
//! | lone container | `kind="container"`, `container` | `container` |
//!
//! No cgroup path or id is ever a label: the series are bounded by the live containers.
//!
//! # Probes
//!
//! `/healthz`: 200 while the latest cycle (before the first: the start) is at most three
//! intervals old, else 503. `/readyz`: 200 once programs are attached and a cycle is done,
//! else 503. Both answer with one line of plain text saying why.

mod collector;
mod exposition;
mod health;
mod labels;
mod server;
mod state;

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use prometheus_client::registry::Registry;
use tokio::sync::oneshot;

pub use exposition::Format;
pub use health::STALE_AFTER_INTERVALS;

use super::{Sink, SinkError};
use crate::{appmetrics::AppStats, snapshot::Snapshot};
use state::State;

/// The prefix of every metric name.
pub const PREFIX: &str = "observer";

/// Why the endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum PrometheusError {
    #[error(
        "cannot listen on {addr} for Prometheus: the address is in use \
         (another observer or exporter?); choose another with --prometheus-listen"
    )]
    AddressInUse { addr: SocketAddr },
    #[error("cannot listen on {addr} for Prometheus: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the Prometheus endpoint must be started from within a tokio runtime")]
    NoRuntime,
}

/// The sink half: records each snapshot. Dropping it stops the HTTP server.
pub struct PrometheusSink {
    state: Arc<Mutex<State>>,
    addr: SocketAddr,
    // Dropped with the sink, which tells the server to stop.
    _stop: oneshot::Sender<()>,
}

impl PrometheusSink {
    /// Binds `listen` and serves the endpoint on the current tokio runtime. `interval` is the
    /// configured reporting interval (for /healthz). Port 0 picks a free port: see
    /// [`Self::local_addr`].
    pub fn start(listen: SocketAddr, interval: Duration) -> Result<Self, PrometheusError> {
        Self::start_with(listen, interval, server::Limits::default(), None)
    }

    /// [`Self::start`], also showing the application metrics' own counts.
    pub fn start_with_app(
        listen: SocketAddr,
        interval: Duration,
        app: &AppStats,
    ) -> Result<Self, PrometheusError> {
        Self::start_with(listen, interval, server::Limits::default(), Some(app))
    }

    /// [`Self::start`] with other limits on what a client may cost.
    fn start_with(
        listen: SocketAddr,
        interval: Duration,
        limits: server::Limits,
        app: Option<&AppStats>,
    ) -> Result<Self, PrometheusError> {
        let runtime =
            tokio::runtime::Handle::try_current().map_err(|_| PrometheusError::NoRuntime)?;
        let listener = bind(listen)?;
        let addr = listener
            .local_addr()
            .map_err(|source| PrometheusError::Bind {
                addr: listen,
                source,
            })?;
        let listener = {
            let _guard = runtime.enter();
            tokio::net::TcpListener::from_std(listener)
                .map_err(|source| PrometheusError::Bind { addr, source })?
        };

        let state = Arc::new(Mutex::new(State::default()));
        let mut registry = Registry::with_prefix(PREFIX);
        registry.register_collector(Box::new(collector::StateCollector(state.clone())));
        if let Some(app) = app {
            app.register(&mut registry);
        }
        let shared = Arc::new(server::Shared {
            registry,
            state: state.clone(),
            started: Instant::now(),
            interval,
        });
        let (stop, stopped) = oneshot::channel::<()>();
        runtime.spawn(server::serve(
            listener,
            server::router(shared),
            limits,
            stopped,
        ));
        log::info!("Prometheus endpoint on http://{addr}/metrics (and /healthz, /readyz)");
        Ok(Self {
            state,
            addr,
            _stop: stop,
        })
    }

    /// The address the endpoint listens on (with the port chosen when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

fn bind(listen: SocketAddr) -> Result<std::net::TcpListener, PrometheusError> {
    let listener = std::net::TcpListener::bind(listen).map_err(|source| {
        if source.kind() == std::io::ErrorKind::AddrInUse {
            PrometheusError::AddressInUse { addr: listen }
        } else {
            PrometheusError::Bind {
                addr: listen,
                source,
            }
        }
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|source| PrometheusError::Bind {
            addr: listen,
            source,
        })?;
    Ok(listener)
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // A panic elsewhere mid-update leaves totals still worth serving.
    state.lock().unwrap_or_else(|e| e.into_inner())
}

impl Sink for PrometheusSink {
    fn name(&self) -> &'static str {
        "prometheus"
    }

    fn emit(&mut self, snapshot: &Snapshot) -> Result<(), SinkError> {
        lock(&self.state).record(snapshot, Instant::now());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{
        state::tests::{pod, snapshot, traffic},
        *,
    };

    const I: Duration = Duration::from_secs(60);

    async fn get(addr: SocketAddr, path: &str, accept: Option<&str>) -> (u16, String, String) {
        let mut request = reqwest::Client::new().get(format!("http://{addr}{path}"));
        if let Some(accept) = accept {
            request = request.header("accept", accept);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        (status, content_type, response.text().await.unwrap())
    }

    fn sample<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
        text.lines()
            .find_map(|l| l.strip_prefix(prefix).and_then(|r| r.strip_prefix(' ')))
    }

    #[tokio::test]
    async fn metrics_accumulate_and_gone_containers_disappear() {
        let mut sink = PrometheusSink::start("127.0.0.1:0".parse().unwrap(), I).unwrap();
        let handle = sink.local_addr();
        let t = traffic(1000, 300, 40);
        for _ in 0..3 {
            let s = snapshot(
                vec![pod("web", 7, t, Some(50.0)), pod("db", 8, t, None)],
                vec![(7, t), (9, t)],
            );
            sink.emit(&s).unwrap();
        }
        let (status, content_type, text) = get(handle, "/metrics", None).await;
        assert_eq!(status, 200);
        assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
        let web = r#"{namespace="shop",pod="web",container="app""#;
        let rx = format!(
            "observer_container_network_receive_bytes_total{web},interface_class=\"device\"}}"
        );
        assert_eq!(sample(&text, &rx), Some("3000"), "{text}");
        let lo = format!(
            "observer_container_network_transmit_packets_total{web},interface_class=\"loopback\"}}"
        );
        assert_eq!(sample(&text, &lo), Some("0"));
        let cpu = format!("observer_container_cpu_usage_seconds_total{web}}}");
        assert_eq!(
            sample(&text, &cpu).map(|v| v.parse::<f64>().unwrap()),
            Some(3.0)
        );
        let pod_rx = r#"observer_workload_network_receive_bytes_total{kind="kubernetes_pod",namespace="shop",pod="web",interface_class="device"}"#;
        assert_eq!(sample(&text, pod_rx), Some("3000"));
        let host_rx = r#"observer_host_network_receive_bytes_total{interface_class="device"}"#;
        assert_eq!(
            sample(&text, host_rx),
            Some("3000"),
            "only cgroup 9 is host traffic"
        );
        assert_eq!(
            sample(&text, "observer_traffic_map_full_drops_total"),
            Some("3")
        );
        assert_eq!(sample(&text, "observer_cycles_total"), Some("3"));
        assert_eq!(
            sample(&text, "observer_last_cycle_timestamp_seconds"),
            Some("1795000000.0")
        );
        assert_eq!(
            sample(&text, r#"observer_inventory_stale{source="kubernetes"}"#),
            Some("0")
        );
        assert_eq!(
            sample(
                &text,
                r#"observer_inventory_unlisted_workloads{source="kubernetes"}"#
            ),
            Some("0")
        );
        assert!(!text.contains("mackerel"), "absent until set");
        assert!(text.contains(r#"pod="db""#));
        assert!(!text.contains("/test/"), "never a cgroup path");

        // db is gone: its series go; web keeps counting.
        sink.emit(&snapshot(vec![pod("web", 7, t, None)], vec![]))
            .unwrap();
        let (_, _, text) = get(handle, "/metrics", None).await;
        assert!(!text.contains(r#"pod="db""#), "{text}");
        assert_eq!(sample(&text, &rx), Some("4000"));

        let mut s = snapshot(vec![pod("web", 7, t, None)], vec![]);
        s.health.sinks = vec![crate::snapshot::SinkStatus {
            name: "mackerel",
            dropped: 3,
            backlog: Some(12),
            lost: Some(5),
            ended: false,
        }];
        s.platform.as_mut().unwrap().failures_total = 2;
        s.platform.as_mut().unwrap().unlisted = vec![crate::snapshot::Unlisted {
            kind: crate::snapshot::WorkloadKind::KubernetesPod,
            id: "web".into(),
            since: std::time::UNIX_EPOCH,
        }];
        sink.emit(&s).unwrap();
        let (_, _, text) = get(handle, "/metrics", None).await;
        assert_eq!(
            sample(
                &text,
                r#"observer_inventory_unlisted_workloads{source="kubernetes"}"#
            ),
            Some("1")
        );
        assert_eq!(sample(&text, "observer_mackerel_queue_depth"), Some("12"));
        assert_eq!(
            sample(&text, "observer_mackerel_dropped_values_total"),
            Some("5")
        );
        assert_eq!(
            sample(&text, "observer_metadata_api_errors_total"),
            Some("2")
        );
        assert_eq!(
            sample(&text, r#"observer_sink_dropped_total{sink="mackerel"}"#),
            Some("3")
        );
    }

    #[tokio::test]
    async fn openmetrics_when_asked_for() {
        let mut sink = PrometheusSink::start("127.0.0.1:0".parse().unwrap(), I).unwrap();
        let handle = sink.local_addr();
        sink.emit(&snapshot(
            vec![pod("web", 7, traffic(5, 5, 5), None)],
            vec![],
        ))
        .unwrap();
        let (status, content_type, text) = get(
            handle,
            "/metrics",
            Some("application/openmetrics-text;version=1.0.0"),
        )
        .await;
        assert_eq!(status, 200);
        assert_eq!(
            content_type,
            "application/openmetrics-text; version=1.0.0; charset=utf-8"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert!(text.contains("# TYPE observer_container_network_receive_bytes counter\n"));
        assert!(text.contains("# UNIT observer_container_network_receive_bytes bytes\n"));
    }

    #[tokio::test]
    async fn probes_say_why() {
        let interval = Duration::from_millis(100);
        let mut sink = PrometheusSink::start("127.0.0.1:0".parse().unwrap(), interval).unwrap();
        let handle = sink.local_addr();
        assert_eq!(
            get(handle, "/readyz", None).await,
            (
                503,
                "text/plain; charset=utf-8".into(),
                "not ready: no kernel programs attached\n".into()
            )
        );
        let (status, _, body) = get(handle, "/healthz", None).await;
        assert_eq!(status, 200, "{body}");
        assert!(body.starts_with("ok: starting"), "{body}");

        sink.emit(&snapshot(vec![], vec![])).unwrap();
        let (status, _, body) = get(handle, "/readyz", None).await;
        assert_eq!(
            (status, body.as_str()),
            (200, "ready: 2 programs attached, 1 cycles done\n")
        );
        let (status, _, body) = get(handle, "/healthz", None).await;
        assert_eq!(status, 200, "{body}");
        assert!(body.starts_with("ok: last cycle"), "{body}");

        // No cycle for more than three intervals: the loop is stuck.
        tokio::time::sleep(interval * 4).await;
        let (status, _, body) = get(handle, "/healthz", None).await;
        assert_eq!(status, 503, "{body}");
        assert!(body.starts_with("stuck: last cycle"), "{body}");
        sink.emit(&snapshot(vec![], vec![])).unwrap();
        assert_eq!(get(handle, "/healthz", None).await.0, 200);
    }

    /// Reads until the server closes the connection; Err if it is still open after `within`.
    async fn closed_within(stream: &mut tokio::net::TcpStream, within: Duration) -> Result<(), ()> {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 1024];
        tokio::time::timeout(within, async {
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await
        .map_err(drop)
    }

    #[tokio::test]
    async fn a_client_that_sends_nothing_is_closed_after_the_timeout() {
        let limits = server::Limits {
            header_read_timeout: Duration::from_millis(300),
            ..server::Limits::default()
        };
        let sink =
            PrometheusSink::start_with("127.0.0.1:0".parse().unwrap(), I, limits, None).unwrap();
        let addr = sink.local_addr();
        let started = Instant::now();
        let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
        closed_within(&mut idle, Duration::from_secs(5))
            .await
            .expect("an idle connection is closed");
        assert!(started.elapsed() >= Duration::from_millis(250));
        // Half a request line is no better.
        let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut slow, b"GET /metr")
            .await
            .unwrap();
        closed_within(&mut slow, Duration::from_secs(5))
            .await
            .expect("a slow request is closed");
        assert_eq!(get(addr, "/healthz", None).await.0, 200);
    }

    #[tokio::test]
    async fn probes_answer_while_a_hundred_idle_connections_are_open() {
        // The default limits: 64 connections, 10 s to send headers.
        let sink = PrometheusSink::start("127.0.0.1:0".parse().unwrap(), I).unwrap();
        let addr = sink.local_addr();
        let mut idle = Vec::new();
        for _ in 0..100 {
            idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        for _ in 0..3 {
            let answer = tokio::time::timeout(Duration::from_secs(2), get(addr, "/healthz", None));
            assert_eq!(answer.await.expect("/healthz answers at once").0, 200);
        }
        // The cap at work: the oldest idle ones were let go, at most 64 stay open.
        let mut closed = 0;
        for stream in &mut idle {
            if closed_within(stream, Duration::from_millis(20))
                .await
                .is_ok()
            {
                closed += 1;
            }
        }
        assert!(closed >= 100 - server::MAX_CONNECTIONS, "{closed} closed");
        assert!(
            closed < 100,
            "the newest idle connections wait for their timeout"
        );
    }

    #[tokio::test]
    async fn a_taken_address_is_named() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let err = PrometheusSink::start(addr, I).err().unwrap();
        assert!(
            matches!(err, PrometheusError::AddressInUse { .. }),
            "{err:?}"
        );
        let message = err.to_string();
        assert!(
            message.contains(&addr.to_string()) && message.contains("in use"),
            "{message}"
        );
    }

    #[test]
    fn starting_outside_a_runtime_is_an_error() {
        let err = PrometheusSink::start("127.0.0.1:0".parse().unwrap(), I)
            .err()
            .unwrap();
        assert!(matches!(err, PrometheusError::NoRuntime));
    }

    #[tokio::test]
    async fn dropping_the_sink_stops_the_server() {
        let sink = PrometheusSink::start("127.0.0.1:0".parse().unwrap(), I).unwrap();
        let handle = sink.local_addr();
        assert_eq!(get(handle, "/healthz", None).await.0, 200);
        drop(sink);
        // Graceful shutdown closes the listener once the task sees the signal.
        let mut closed = false;
        for _ in 0..50 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            if tokio::net::TcpStream::connect(handle).await.is_err() {
                closed = true;
                break;
            }
        }
        assert!(closed, "the endpoint still accepts connections");
    }
}
