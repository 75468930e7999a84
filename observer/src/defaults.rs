//! Defaults, each written once: clap shows them in `--help` (`config`), and the library's
//! constructors (`SourceConfig::new`, `MackerelConfig::new`, `HostPaths::resolve`) use the
//! same constants, so the two cannot drift apart.

use std::time::Duration;

/// `--interval`: how often to report.
pub const INTERVAL: &str = "60s";

/// `--ecs-agent-url`: the ECS agent's introspection API; the agent runs in the host network
/// namespace.
pub const ECS_AGENT_URL: &str = "http://127.0.0.1:51678";

/// The kubelet's authenticated HTTPS port: `--kubelet-url` is `https://$NODE_IP:<port>` (or
/// `$NODE_NAME`) unless given.
pub const KUBELET_PORT: u16 = 10250;

/// `--kubelet-token-file`: the pod's service-account token.
pub const KUBELET_TOKEN_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";

/// `--kubelet-ca-file`: the cluster CA of the pod's service account.
pub const KUBELET_CA_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";

/// `--docker-socket`.
pub const DOCKER_SOCKET: &str = "/var/run/docker.sock";

/// Per request to the ECS agent, the kubelet or the Docker socket.
pub const PLATFORM_TIMEOUT: Duration = Duration::from_secs(3);

/// `--cgroupfs`: the cgroup tree (under `--host-root` in a container). Pure v2 hosts mount
/// the v2 hierarchy here too, so it is the preferred v2 mount when there are several.
pub const CGROUP_DIR: &str = "/sys/fs/cgroup";

/// `--proc`: procfs of the host (under `--host-root` in a container).
pub const PROC_DIR: &str = "/proc";

/// `--mackerel-api-base`.
pub const MACKEREL_API_BASE: &str = "https://api.mackerelio.com";

/// `--retire-after`: intervals a task may be missing before its Mackerel host is retired.
pub const RETIRE_AFTER_INTERVALS: u32 = 2;
/// `--mackerel-interval`: one value per series a minute, as mackerel-agent posts and as
/// Mackerel stores.
pub const MACKEREL_INTERVAL: Duration = Duration::from_secs(60);
/// `--state-dir`: what outlives a restart (the Mackerel hosts and unsent values).
pub const STATE_DIR: &str = "/var/lib/observer";

/// `observer health --timeout`.
pub const HEALTH_TIMEOUT: &str = "3s";

/// First pause after a failure (the platform API, the ECS agent, the Mackerel API); it
/// doubles up to [`BACKOFF_MAX`].
pub const BACKOFF_MIN: Duration = Duration::from_secs(1);
pub const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// `--bpf-pin-dir`: observer's directory in the bpffs distributions mount at /sys/fs/bpf.
pub const BPF_PIN_DIR: &str = "/sys/fs/bpf/observer";

/// `--shutdown-timeout`: what the outputs get on SIGTERM, within the platforms' stop timeouts
/// (ECS 30 s by default, Kubernetes' grace period 30 s).
pub const SHUTDOWN_TIMEOUT: &str = "10s";

/// `--app-metrics-timeout`: per scrape of a workload's metrics endpoint. Well inside the
/// shortest Mackerel interval (5 s), so a scrape never runs into the next one.
pub const APP_METRICS_TIMEOUT: Duration = Duration::from_secs(3);
/// Largest metrics body read per scrape (an exporter's page is usually tens of KiB).
pub const APP_METRICS_MAX_BODY: usize = 4 << 20;
/// `--app-metrics-max-series`: series per workload per scrape. A standard Mackerel host
/// includes 200 metrics; this bounds the bill and the buffer.
pub const APP_METRICS_MAX_SERIES: usize = 500;
