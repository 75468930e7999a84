//! Command line and environment.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Parser, ValueEnum};
use observer_common::DEFAULT_MAX_ENTRIES;

use crate::{
    defaults,
    inventory::sources::Platform,
    mackerel::{
        select::{parse_list, parse_regex},
        AllowedRoles, HostStatus, HostsMode,
    },
};

/// Per-container and per-task network traffic, measured by eBPF at the cgroup v2 root.
///
/// observer attaches two cgroup_skb programs (ingress, egress) at the cgroup v2 root, counts
/// bytes and packets per cgroup (loopback apart), and every interval prints what each cgroup
/// sent and received. It needs root (CAP_BPF + CAP_NET_ADMIN). Ctrl-C or SIGTERM detaches the
/// programs and exits.
///
/// Example: observer --interval 5s
#[derive(Debug, Parser)]
#[command(name = "observer", version, about, long_about)]
pub struct Args {
    /// How often to report: "60s", "5s", "1m", "500ms"; from 100ms to 1h.
    #[arg(long, env = "OBSERVER_INTERVAL", default_value = defaults::INTERVAL,
          value_parser = parse_interval)]
    pub interval: Duration,

    /// Report one interval, then detach and exit.
    #[arg(long)]
    pub once: bool,

    /// Output on stdout [default: table on a terminal, json otherwise].
    #[arg(long, env = "OBSERVER_OUTPUT", value_enum)]
    pub output: Option<Output>,

    /// Where the host's files are mounted when observer runs in a container, e.g. /host with
    /// the host's /sys/fs/cgroup at /host/sys/fs/cgroup and its /proc at /host/proc (read-only
    /// mounts are enough). observer then attaches at the host's cgroup v2 root found there
    /// (/host/sys/fs/cgroup, or /host/sys/fs/cgroup/unified on hybrid hosts) and reads CPU,
    /// memory and host facts from there; a missing mount is named at start. Not needed on
    /// the host itself.
    #[arg(long, env = "OBSERVER_HOST_ROOT")]
    pub host_root: Option<PathBuf>,

    /// cgroup v2 mount to attach at [default: found in /proc/self/mountinfo (under
    /// --host-root if set): /sys/fs/cgroup on pure v2 hosts, /sys/fs/cgroup/unified on hybrid
    /// ones].
    #[arg(long, env = "OBSERVER_CGROUP_ROOT")]
    pub cgroup_root: Option<PathBuf>,

    /// Entries of the kernel's traffic map: one per cgroup that sends or receives. When it is
    /// full, new cgroups go uncounted and observer says so every interval.
    #[arg(long, env = "OBSERVER_MAP_ENTRIES", default_value_t = DEFAULT_MAX_ENTRIES,
          value_parser = clap::value_parser!(u32).range(1..=1_048_576))]
    pub map_entries: u32,

    /// Where tasks and pods come from. auto tries, in order: the ECS agent, the kubelet
    /// (KUBERNETES_SERVICE_HOST or NODE_NAME set), the Docker socket; else none (cgroups only).
    #[arg(long, env = "OBSERVER_PLATFORM", value_enum, default_value_t = Platform::Auto)]
    pub platform: Platform,

    /// ECS agent introspection API (the agent runs in the host network namespace).
    #[arg(long, env = "OBSERVER_ECS_AGENT_URL", default_value = defaults::ECS_AGENT_URL)]
    pub ecs_agent_url: String,

    /// kubelet API [default: https://$NODE_IP:10250 if NODE_IP is set (downward API
    /// status.hostIP: node names often do not resolve from pods), else https://$NODE_NAME:10250].
    /// The read-only port also works: http://$NODE_IP:10255.
    #[arg(long, env = "OBSERVER_KUBELET_URL")]
    pub kubelet_url: Option<String>,

    /// Bearer token for the kubelet, read again on every request (tokens rotate).
    #[arg(
        long,
        env = "OBSERVER_KUBELET_TOKEN_FILE",
        default_value = defaults::KUBELET_TOKEN_FILE
    )]
    pub kubelet_token_file: PathBuf,

    /// CA that signed the kubelet's serving certificate.
    #[arg(long, env = "OBSERVER_KUBELET_CA_FILE", default_value = defaults::KUBELET_CA_FILE)]
    pub kubelet_ca_file: PathBuf,

    /// Do not verify the kubelet's certificate (self-signed serving certificates). The
    /// service-account token then goes to an unverified peer; observer warns at start.
    #[arg(long, env = "OBSERVER_KUBELET_INSECURE_TLS")]
    pub kubelet_insecure_tls: bool,

    /// Docker Engine API socket: containers and labels on Docker hosts, and the ECS fallback
    /// when the agent does not answer.
    #[arg(long, env = "OBSERVER_DOCKER_SOCKET", default_value = defaults::DOCKER_SOCKET)]
    pub docker_socket: PathBuf,

    /// cgroupfs to read CPU and memory from [default: /sys/fs/cgroup, or
    /// <host-root>/sys/fs/cgroup].
    #[arg(long, env = "OBSERVER_CGROUPFS")]
    pub cgroupfs: Option<PathBuf>,

    /// procfs of the host, for its CPU count and memory [default: /proc, or <host-root>/proc].
    #[arg(long, env = "OBSERVER_PROC")]
    pub proc: Option<PathBuf>,

    /// Serve Prometheus metrics, /healthz and /readyz at this address (e.g. 0.0.0.0:9435:
    /// in a pod, probes come to the pod's IP, so not 127.0.0.1). Off unless set.
    #[arg(long, env = "OBSERVER_PROMETHEUS_LISTEN", global = true)]
    pub prometheus_listen: Option<SocketAddr>,

    /// Mackerel API. The API key comes from the MACKEREL_APIKEY environment variable or
    /// --mackerel-api-key-file; without one, nothing is sent to Mackerel.
    #[arg(long, env = "MACKEREL_APIBASE", default_value = defaults::MACKEREL_API_BASE)]
    pub mackerel_api_base: String,

    /// File holding the Mackerel API key (a mounted secret).
    #[arg(long, env = "OBSERVER_MACKEREL_API_KEY_FILE")]
    pub mackerel_api_key_file: Option<PathBuf>,

    /// Retire a task's Mackerel host once the task has been gone this many intervals (at most
    /// 10000, and at most 7 days in all).
    #[arg(long, env = "OBSERVER_RETIRE_AFTER", default_value_t = defaults::RETIRE_AFTER_INTERVALS,
          value_parser = clap::value_parser!(u32).range(1..=MAX_RETIRE_AFTER_INTERVALS as i64))]
    pub retire_after: u32,

    /// Which tasks and pods become Mackerel hosts: all, or opt-in (only those whose Docker
    /// label, ECS dockerLabel or pod annotation mackerel.io/host is "true"). In either mode
    /// mackerel.io/host=false makes none (for a task, any container's label counts; false
    /// wins). Workloads that are not hosts still show in every other output.
    #[arg(long, env = "OBSERVER_MACKEREL_HOSTS", value_enum, default_value_t = HostsMode::All)]
    pub mackerel_hosts: HostsMode,

    /// Only pods of these Kubernetes namespaces become Mackerel hosts (comma-separated)
    /// [default: every namespace].
    #[arg(
        long,
        env = "OBSERVER_MACKEREL_INCLUDE_NAMESPACES",
        value_name = "NAMES",
        value_delimiter = ','
    )]
    pub mackerel_include_namespaces: Vec<String>,

    /// Pods of these Kubernetes namespaces never become Mackerel hosts (comma-separated), e.g.
    /// kube-system.
    #[arg(
        long,
        env = "OBSERVER_MACKEREL_EXCLUDE_NAMESPACES",
        value_name = "NAMES",
        value_delimiter = ','
    )]
    pub mackerel_exclude_namespaces: Vec<String>,

    /// Only workloads whose name matches this regular expression become Mackerel hosts: the
    /// pod name, or the ECS task definition family. Unanchored (use ^...$ for a whole name).
    #[arg(long, env = "OBSERVER_MACKEREL_INCLUDE_WORKLOADS", value_name = "REGEX",
          value_parser = parse_regex)]
    pub mackerel_include_workloads: Option<regex::Regex>,

    /// Workloads whose name (pod name, ECS task definition family) matches this regular
    /// expression never become Mackerel hosts.
    #[arg(long, env = "OBSERVER_MACKEREL_EXCLUDE_WORKLOADS", value_name = "REGEX",
          value_parser = parse_regex)]
    pub mackerel_exclude_workloads: Option<regex::Regex>,

    /// Containers whose name matches this regular expression give their Mackerel host no
    /// values and are left out of its meta, as mackerel-container-agent's ignoreContainer
    /// (e.g. '^(istio-proxy|log-router)$'). Other outputs still show them.
    #[arg(long, env = "MACKEREL_IGNORE_CONTAINER", value_name = "REGEX",
          value_parser = parse_regex)]
    pub mackerel_ignore_containers: Option<regex::Regex>,

    /// Roles a workload's own mackerel.io/roles label or annotation may name, e.g.
    /// 'shop:*,web:api' (service:role, service:* or *:*); `none` allows none. An entry outside
    /// is not given to the host and is logged once per workload. MACKEREL_ROLES (the
    /// operator's) are always given. [default: any role]
    #[arg(long, env = "OBSERVER_MACKEREL_ALLOWED_ROLES", value_name = "PATTERNS",
          value_parser = parse_allowed_roles)]
    pub mackerel_allowed_roles: Option<AllowedRoles>,

    /// Status set on each Mackerel host observer creates (as mackerel-container-agent's
    /// hostStatusOnStart); a host found again after a restart keeps the status it has
    /// [default: none set, the API's working].
    #[arg(long, env = "MACKEREL_HOST_STATUS_ON_START", value_enum)]
    pub mackerel_host_status_on_start: Option<HostStatus>,

    /// On SIGTERM or SIGINT, how long the outputs may take to deliver the last interval
    /// (Mackerel's buffer included) before observer exits anyway. Keep it below the
    /// platform's stop timeout (ECS stopTimeout, Kubernetes terminationGracePeriodSeconds);
    /// at most 10m.
    #[arg(long, env = "OBSERVER_SHUTDOWN_TIMEOUT", default_value = defaults::SHUTDOWN_TIMEOUT,
          value_parser = parse_shutdown_timeout)]
    pub shutdown_timeout: Duration,

    /// bpffs directory for observer's pinned state (the traffic maps and the program links),
    /// so a restart or an upgrade loses no traffic: the programs keep counting while observer
    /// is down, and the next run reports the gap once. A bpffs is mounted at /sys/fs/bpf if
    /// none is (that needs CAP_SYS_ADMIN; in a container mount the host's /sys/fs/bpf).
    /// `observer detach` removes it all.
    #[arg(long, env = "OBSERVER_BPF_PIN_DIR", default_value = defaults::BPF_PIN_DIR, global = true)]
    pub bpf_pin_dir: PathBuf,

    /// Pin nothing: the programs are detached when observer stops, and counts of the gap
    /// until the next start are lost.
    #[arg(long, env = "OBSERVER_NO_PIN")]
    pub no_pin: bool,

    /// Directory for what must outlive a restart besides the pinned maps: the Mackerel hosts
    /// observer made (so hosts of tasks that ended while it was down are retired), the values
    /// the API has not taken yet, and the minute being filled. Created (mode 0700) if missing;
    /// if it cannot be, observer warns and runs without. Mount it from the host in a container.
    #[arg(long, env = "OBSERVER_STATE_DIR", default_value = defaults::STATE_DIR)]
    pub state_dir: PathBuf,

    /// How often values go to Mackerel: one value per series per period, aggregated over it
    /// (bytes and packets as rates over the whole period, CPU the average, memory the latest),
    /// stamped with the period's start. Whole seconds, 1s to 1h. Mackerel keeps one point per
    /// minute: shorter periods are for tests.
    #[arg(long, env = "OBSERVER_MACKEREL_INTERVAL", default_value = "1m",
          value_parser = parse_mackerel_interval)]
    pub mackerel_interval: Duration,

    /// Most values kept for Mackerel while its API cannot take them, as a count (500000) or
    /// as memory (44MiB, at 88 bytes a value at most); the oldest go first, and 6 hours of
    /// data at most. The default fits a 256 MiB memory limit with room to spare.
    #[arg(long, env = "OBSERVER_MACKEREL_BUFFER", default_value = "500000",
          value_parser = parse_buffer)]
    pub mackerel_buffer: usize,

    /// This node's name, recorded in the meta of each Mackerel host observer makes (the
    /// downward API's spec.nodeName on Kubernetes) [default: the host name].
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,

    /// The cluster's name, recorded in the meta of each Mackerel host observer makes
    /// [default: the ECS cluster of each task; none on Kubernetes].
    #[arg(long, env = "OBSERVER_CLUSTER_NAME")]
    pub cluster_name: Option<String>,

    /// Retire the Mackerel hosts of another node of this cluster once none of them has had a
    /// new value for this long (a node terminated, or its observer killed before its tasks
    /// ended). Judged by what arrives at Mackerel, checked every quarter of it; at least 10
    /// Mackerel intervals; needs MACKEREL_ROLES (hosts are found by role) and a cluster name.
    /// Off by default: retiring another node's hosts is for an operator to choose; 1h is a
    /// sane value (longer than an observer restart or an API outage it rides out).
    #[arg(long, env = "OBSERVER_MACKEREL_RETIRE_SILENT_AFTER",
          value_parser = parse_silent_after)]
    pub mackerel_retire_silent_after: Option<Duration>,

    /// Scrape each Mackerel host's workload's own Prometheus endpoint once per Mackerel
    /// interval and post its samples on that host (`custom.<prefix>.<metric>.<label values>`,
    /// counters as per-second rates; docs/app-metrics.md). A workload opts in: ECS Docker labels
    /// ECS_PROMETHEUS_EXPORTER_PORT (with ECS_PROMETHEUS_METRICS_PATH, ECS_PROMETHEUS_JOB_NAME),
    /// pod annotations prometheus.io/scrape=true and prometheus.io/port (with
    /// prometheus.io/path). Only with the Mackerel output; off: nothing is scraped.
    #[arg(long, env = "OBSERVER_APP_METRICS", default_value = "on", value_parser = parse_on_off,
          action = clap::ArgAction::Set, value_name = "on|off")]
    pub app_metrics: bool,

    /// How long one scrape of a workload's metrics endpoint may take, connection and body
    /// included; less than --mackerel-interval [default: 3s, at most half of
    /// --mackerel-interval].
    #[arg(long, env = "OBSERVER_APP_METRICS_TIMEOUT", value_parser = humantime::parse_duration)]
    pub app_metrics_timeout: Option<Duration>,

    /// Most series posted per workload endpoint and scrape; the rest are dropped and counted
    /// (observer_app_series_dropped_total).
    #[arg(long, env = "OBSERVER_APP_METRICS_MAX_SERIES", default_value_t = defaults::APP_METRICS_MAX_SERIES)]
    pub app_metrics_max_series: usize,

    /// Where the node's published and host ports of ECS tasks are reached: 127.0.0.1 when
    /// observer runs in the host's network namespace, as the ECS daemon task does (host
    /// network mode); else the node's address. Pods are reached at their pod or host IP.
    #[arg(
        long,
        env = "OBSERVER_APP_METRICS_NODE_ADDRESS",
        default_value = "127.0.0.1"
    )]
    pub app_metrics_node_address: std::net::IpAddr,

    #[command(flatten)]
    pub plugins: crate::appmetrics::plugin_config::PluginArgs,

    #[command(subcommand)]
    pub command: Option<Command>,
}

/// `on`/`off` (also true/false, yes/no, 1/0).
pub fn parse_on_off(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        _ => Err(format!("{s:?}: on or off")),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, clap::Subcommand)]
pub enum Command {
    /// Ask a running observer's /healthz (at --prometheus-listen; 0.0.0.0 is asked at
    /// 127.0.0.1) and exit 0 if it is healthy, 1 if not: a health check for images without a
    /// shell (ECS healthCheck ["CMD", "/observer", "health"]).
    Health {
        /// How long to wait for the answer (at most 1m).
        #[arg(long, default_value = defaults::HEALTH_TIMEOUT, value_parser = parse_health_timeout)]
        timeout: Duration,
    },
    /// Remove everything observer pinned in --bpf-pin-dir: the links (which detaches the
    /// programs) and the maps with their counts. For uninstalling; a running observer keeps
    /// its programs attached until it stops.
    Detach,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// One JSON object per line (docs/output.md).
    Json,
    /// A table per interval, top talkers first.
    Table,
}

impl Output {
    /// The table on a terminal, JSON lines into pipes and files, unless one was asked for.
    pub fn choose(explicit: Option<Output>, stdout_is_terminal: bool) -> Output {
        explicit.unwrap_or(if stdout_is_terminal {
            Output::Table
        } else {
            Output::Json
        })
    }
}

/// Shortest interval accepted: below it the reading itself becomes the load.
pub const MIN_INTERVAL: Duration = Duration::from_millis(100);
/// Longest interval accepted: past it a report says little, and the durations derived from
/// the interval (health staleness, host retirement) stay far from overflowing.
pub const MAX_INTERVAL: Duration = Duration::from_secs(3600);
/// Most `--retire-after` intervals: with [`MAX_INTERVAL`] the product still fits easily.
pub const MAX_RETIRE_AFTER_INTERVALS: u32 = 10_000;
/// Longest `--retire-after` x `--interval`: a week of keeping a gone task's host.
pub const MAX_RETIRE_AFTER: Duration = Duration::from_secs(7 * 24 * 3600);
/// Longest `--shutdown-timeout`: longer than any platform waits for a stop.
pub const MAX_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(600);
/// Longest `observer health --timeout`: health checks run every few seconds.
pub const MAX_HEALTH_TIMEOUT: Duration = Duration::from_secs(60);

pub fn parse_interval(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < MIN_INTERVAL {
        return Err(format!("{s} is too short: the shortest interval is 100ms"));
    }
    at_most(s, d, MAX_INTERVAL, "interval")
}

/// Longest `--mackerel-interval`.
pub const MAX_MACKEREL_INTERVAL: Duration = Duration::from_secs(3600);
/// Bounds of `--mackerel-buffer`, in values.
pub const MACKEREL_BUFFER_RANGE: std::ops::RangeInclusive<usize> = 1_000..=50_000_000;

pub fn parse_mackerel_interval(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.subsec_nanos() != 0 || d.is_zero() {
        return Err(format!(
            "{s}: the Mackerel interval is whole seconds, at least 1s"
        ));
    }
    at_most(s, d, MAX_MACKEREL_INTERVAL, "Mackerel interval")
}

/// A count of values, or a size in memory (`24MiB`, `64MB`) turned into one.
pub fn parse_buffer(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?}: expected a number of values (500000) or a size (24MiB)"))?;
    let scale: u64 = match unit.trim() {
        "" => 1,
        "B" => 1,
        "KB" | "kB" => 1000,
        "KiB" => 1 << 10,
        "MB" => 1_000_000,
        "MiB" => 1 << 20,
        "GB" => 1_000_000_000,
        "GiB" => 1 << 30,
        other => {
            return Err(format!(
                "{s:?}: unknown unit {other:?} (B, KiB, MiB, GiB, KB, MB, GB)"
            ))
        }
    };
    let values = if unit.trim().is_empty() {
        n
    } else {
        n.saturating_mul(scale) / crate::mackerel::buffer::BYTES_PER_VALUE as u64
    };
    let values = usize::try_from(values).unwrap_or(usize::MAX);
    if !MACKEREL_BUFFER_RANGE.contains(&values) {
        return Err(format!(
            "{s}: the Mackerel buffer holds {} to {} values ({} bytes each)",
            MACKEREL_BUFFER_RANGE.start(),
            MACKEREL_BUFFER_RANGE.end(),
            crate::mackerel::buffer::BYTES_PER_VALUE
        ));
    }
    Ok(values)
}

/// Longest `--mackerel-retire-silent-after`.
pub const MAX_SILENT_AFTER: Duration = Duration::from_secs(30 * 24 * 3600);

pub fn parse_silent_after(s: &str) -> Result<Duration, String> {
    at_most(s, parse_duration(s)?, MAX_SILENT_AFTER, "silent period")
}

pub fn parse_shutdown_timeout(s: &str) -> Result<Duration, String> {
    at_most(
        s,
        parse_duration(s)?,
        MAX_SHUTDOWN_TIMEOUT,
        "shutdown timeout",
    )
}

pub fn parse_health_timeout(s: &str) -> Result<Duration, String> {
    at_most(s, parse_duration(s)?, MAX_HEALTH_TIMEOUT, "health timeout")
}

fn parse_allowed_roles(s: &str) -> Result<AllowedRoles, String> {
    AllowedRoles::parse(s).map_err(|e| e.to_string())
}

impl Args {
    /// The Mackerel host selection the flags describe.
    /// The application metrics settings, when on; an error when they cannot work.
    pub fn app_metrics(&self) -> Result<Option<crate::appmetrics::AppMetricsConfig>, String> {
        if !self.app_metrics {
            return Ok(None);
        }
        // Unset: the default, kept inside the period so that a scrape ends before the next.
        let timeout = self
            .app_metrics_timeout
            .unwrap_or_else(|| defaults::APP_METRICS_TIMEOUT.min(self.mackerel_interval / 2));
        if timeout.is_zero() || timeout >= self.mackerel_interval {
            return Err(format!(
                "--app-metrics-timeout {} must be more than 0 and less than --mackerel-interval {}",
                humantime::format_duration(timeout),
                humantime::format_duration(self.mackerel_interval)
            ));
        }
        if self.app_metrics_max_series == 0 {
            return Err(
                "--app-metrics-max-series must be at least 1 (or --app-metrics off)".into(),
            );
        }
        let mut config = crate::appmetrics::AppMetricsConfig::new(self.mackerel_interval);
        config.timeout = timeout;
        config.max_series = self.app_metrics_max_series;
        config.node_address = self.app_metrics_node_address;
        Ok(Some(config))
    }

    pub fn mackerel_selection(&self) -> crate::mackerel::Selection {
        crate::mackerel::Selection {
            mode: self.mackerel_hosts,
            include_namespaces: parse_list(&self.mackerel_include_namespaces.join(",")),
            exclude_namespaces: parse_list(&self.mackerel_exclude_namespaces.join(",")),
            include_workloads: self.mackerel_include_workloads.clone(),
            exclude_workloads: self.mackerel_exclude_workloads.clone(),
            ignore_containers: self.mackerel_ignore_containers.clone(),
            allowed_roles: self.mackerel_allowed_roles.clone(),
        }
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("{e} (expected a duration such as 60s, 5s, 1m or 500ms)"))
}

fn at_most(s: &str, d: Duration, max: Duration, what: &str) -> Result<Duration, String> {
    if d > max {
        return Err(format!(
            "{s} is too long: the longest {what} is {}",
            humantime::format_duration(max)
        ));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mackerel_intervals_and_buffers() {
        assert_eq!(parse_mackerel_interval("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_mackerel_interval("5s"), Ok(Duration::from_secs(5)));
        assert!(parse_mackerel_interval("1500ms").is_err());
        assert!(parse_mackerel_interval("0s").is_err());
        assert!(parse_mackerel_interval("2h").is_err());
        assert_eq!(parse_buffer("500000"), Ok(500_000));
        assert_eq!(parse_buffer("44MiB"), Ok((44 << 20) / 88));
        assert_eq!(parse_buffer("88 MB"), Ok(1_000_000));
        assert!(parse_buffer("10").unwrap_err().contains("1000 to 50000000"));
        assert!(parse_buffer("1TiB").unwrap_err().contains("unknown unit"));
        assert!(parse_buffer("99999999999999999999999").is_err());
        assert!(parse_buffer("-5").is_err());
        let args = Args::try_parse_from(["observer"]).unwrap();
        assert_eq!(args.mackerel_interval, defaults::MACKEREL_INTERVAL);
        assert_eq!(
            args.mackerel_buffer,
            crate::mackerel::buffer::DEFAULT_MAX_VALUES
        );
        assert_eq!(args.state_dir, PathBuf::from(defaults::STATE_DIR));
    }

    #[test]
    fn intervals() {
        assert_eq!(parse_interval("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_interval("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_interval("500ms"), Ok(Duration::from_millis(500)));
        assert!(parse_interval("10ms").is_err());
        assert!(parse_interval("fast").is_err());
        assert!(parse_interval("").is_err());
    }

    /// `--interval 100000000000000s` used to be taken, and later arithmetic overflowed.
    #[test]
    fn durations_have_a_ceiling() {
        assert_eq!(parse_interval("1h"), Ok(MAX_INTERVAL));
        let err = parse_interval("100000000000000s").unwrap_err();
        assert_eq!(
            err,
            "100000000000000s is too long: the longest interval is 1h"
        );
        assert!(parse_interval("61m").is_err());
        // Past what humantime holds: its own error, not a panic.
        assert!(parse_interval("99999999999999999999999999s").is_err());
        assert!(parse_shutdown_timeout("10m").is_ok());
        assert!(parse_shutdown_timeout("11m")
            .unwrap_err()
            .contains("the longest shutdown timeout is 10m"));
        assert!(parse_health_timeout("2m").is_err());
        for flags in [
            ["--interval", "2h"],
            ["--shutdown-timeout", "1000000000s"],
            ["--retire-after", "10001"],
        ] {
            let mut argv = vec!["observer"];
            argv.extend(flags);
            assert!(Args::try_parse_from(&argv).is_err(), "{flags:?}");
        }
        let args =
            Args::try_parse_from(["observer", "--interval", "1h", "--retire-after", "10000"])
                .unwrap();
        // The product run.rs takes stays far inside a Duration.
        assert_eq!(
            args.interval.checked_mul(args.retire_after),
            Some(Duration::from_secs(36_000_000))
        );
        assert!(Args::try_parse_from(["observer", "health", "--timeout", "5m"]).is_err());
    }

    #[test]
    fn defaults() {
        let args = Args::try_parse_from(["observer"]).unwrap();
        assert_eq!(args.interval, Duration::from_secs(60));
        assert!(!args.once);
        assert_eq!(args.output, None);
        assert_eq!(args.platform, Platform::Auto);
        assert_eq!(args.prometheus_listen, None);
        assert_eq!(args.retire_after, 2);
        assert_eq!(args.map_entries, DEFAULT_MAX_ENTRIES);
        assert_eq!(args.cgroup_root, None);
        assert_eq!(args.host_root, None);
        assert_eq!(args.command, None);
        assert_eq!(args.shutdown_timeout, Duration::from_secs(10));
    }

    #[test]
    fn app_metrics_flags() {
        let args = Args::try_parse_from(["observer"]).unwrap();
        let app = args.app_metrics().unwrap().expect("on by default");
        assert_eq!(app.timeout, defaults::APP_METRICS_TIMEOUT);
        assert_eq!(app.max_series, defaults::APP_METRICS_MAX_SERIES);
        assert_eq!(app.period, args.mackerel_interval);
        assert_eq!(app.node_address.to_string(), "127.0.0.1");
        let off = Args::try_parse_from(["observer", "--app-metrics", "off"]).unwrap();
        assert!(off.app_metrics().unwrap().is_none());
        assert!(Args::try_parse_from(["observer", "--app-metrics", "maybe"]).is_err());
        let slow = Args::try_parse_from([
            "observer",
            "--mackerel-interval",
            "5s",
            "--app-metrics-timeout",
            "5s",
        ])
        .unwrap();
        let err = slow.app_metrics().unwrap_err();
        assert!(err.contains("less than --mackerel-interval 5s"), "{err}");
        let short = Args::try_parse_from(["observer", "--mackerel-interval", "1s"]).unwrap();
        assert_eq!(
            short.app_metrics().unwrap().unwrap().timeout,
            Duration::from_millis(500),
            "the default stays inside a short period"
        );
        let none = Args::try_parse_from(["observer", "--app-metrics-max-series", "0"]).unwrap();
        assert!(none.app_metrics().is_err());
    }

    #[test]
    fn the_plugins_config_flag() {
        let args = Args::try_parse_from(["observer"]).unwrap();
        assert_eq!(args.plugins.plugins_config, None, "no plugins by default");
        let args =
            Args::try_parse_from(["observer", "--plugins-config", "/etc/observer/plugins.toml"])
                .unwrap();
        assert_eq!(
            args.plugins.plugins_config,
            Some(PathBuf::from("/etc/observer/plugins.toml"))
        );
        let help = <Args as clap::CommandFactory>::command()
            .render_long_help()
            .to_string();
        for text in [
            "--plugins-config <PATH>",
            "OBSERVER_PLUGINS_CONFIG",
            "mackerel.io/plugins",
            "never root",
            "[default: no plugins]",
        ] {
            assert!(help.contains(text), "--help lacks {text}:\n{help}");
        }
    }

    /// The flags' defaults are the library's: one constant each.
    #[test]
    fn defaults_are_the_librarys() {
        let args = Args::try_parse_from(["observer"]).unwrap();
        let sources = crate::inventory::sources::SourceConfig::new(Default::default());
        assert_eq!(args.ecs_agent_url, sources.ecs_agent_url);
        assert_eq!(args.kubelet_token_file, sources.kubelet_token_file);
        assert_eq!(args.kubelet_ca_file, sources.kubelet_ca_file);
        assert_eq!(args.docker_socket, sources.docker_socket);
        assert_eq!(args.platform, sources.platform);
        assert_eq!(args.mackerel_api_base, defaults::MACKEREL_API_BASE);
        assert_eq!(args.retire_after, defaults::RETIRE_AFTER_INTERVALS);
        assert_eq!(Ok(args.interval), parse_interval(defaults::INTERVAL));
    }

    #[test]
    fn platforms_parse_as_flags() {
        for (value, platform) in [
            ("auto", Platform::Auto),
            ("ecs", Platform::Ecs),
            ("kubernetes", Platform::Kubernetes),
            ("k8s", Platform::Kubernetes),
            ("docker", Platform::Docker),
            ("none", Platform::None),
        ] {
            let args = Args::try_parse_from(["observer", "--platform", value]).unwrap();
            assert_eq!(args.platform, platform, "{value}");
        }
        assert!(Args::try_parse_from(["observer", "--platform", "swarm"]).is_err());
    }

    #[test]
    fn health_is_a_subcommand() {
        let args = Args::try_parse_from(["observer", "health"]).unwrap();
        assert_eq!(
            args.command,
            Some(Command::Health {
                timeout: Duration::from_secs(3)
            })
        );
        let args =
            Args::try_parse_from(["observer", "--prometheus-listen", "0.0.0.0:9435", "health"])
                .unwrap();
        assert!(args.prometheus_listen.is_some());
    }

    #[test]
    fn bad_flags_are_rejected() {
        assert!(Args::try_parse_from(["observer", "--interval", "0s"]).is_err());
        assert!(Args::try_parse_from(["observer", "--map-entries", "0"]).is_err());
        assert!(Args::try_parse_from(["observer", "--output", "xml"]).is_err());
    }

    #[test]
    fn mackerel_selection_flags() {
        let args = Args::try_parse_from(["observer"]).unwrap();
        let s = args.mackerel_selection();
        assert_eq!(s.mode, HostsMode::All);
        assert!(s.include_namespaces.is_empty() && s.allowed_roles.is_none());
        assert_eq!(args.mackerel_host_status_on_start, None);
        let args = Args::try_parse_from([
            "observer",
            "--mackerel-hosts",
            "opt-in",
            "--mackerel-exclude-namespaces",
            "kube-system, monitoring",
            "--mackerel-ignore-containers",
            "^istio-proxy$",
            "--mackerel-allowed-roles",
            "shop:*",
            "--mackerel-host-status-on-start",
            "standby",
        ])
        .unwrap();
        let s = args.mackerel_selection();
        assert_eq!(s.mode, HostsMode::OptIn);
        assert_eq!(s.exclude_namespaces, ["kube-system", "monitoring"]);
        assert!(s.ignore_containers.unwrap().is_match("istio-proxy"));
        assert!(s.allowed_roles.unwrap().allows("shop:web"));
        assert_eq!(
            args.mackerel_host_status_on_start,
            Some(HostStatus::Standby)
        );
        for (flag, value) in [
            ("--mackerel-ignore-containers", "(app"),
            ("--mackerel-include-workloads", "[z-a]"),
            ("--mackerel-exclude-workloads", "*x"),
            ("--mackerel-allowed-roles", "shop"),
            ("--mackerel-host-status-on-start", "asleep"),
            ("--mackerel-hosts", "some"),
        ] {
            let err = Args::try_parse_from(["observer", flag, value])
                .unwrap_err()
                .to_string();
            assert!(err.contains(flag), "{flag}: {err}");
        }
    }

    #[test]
    fn output_follows_the_terminal_unless_asked() {
        assert_eq!(Output::choose(None, true), Output::Table);
        assert_eq!(Output::choose(None, false), Output::Json);
        assert_eq!(Output::choose(Some(Output::Json), true), Output::Json);
        assert_eq!(Output::choose(Some(Output::Table), false), Output::Table);
    }

    #[test]
    fn help_explains_every_flag() {
        let help = <Args as clap::CommandFactory>::command()
            .render_long_help()
            .to_string();
        for flag in [
            "--interval",
            "--once",
            "--output",
            "--cgroup-root",
            "--map-entries",
            "--host-root",
            "health",
        ] {
            assert!(help.contains(flag), "--help lacks {flag}");
        }
        assert!(help.contains("OBSERVER_INTERVAL"));
    }

    /// `--help` shows every default, taken from [`defaults`].
    #[test]
    fn help_shows_the_defaults() {
        let mut command = <Args as clap::CommandFactory>::command();
        let help = command.render_long_help().to_string();
        let kubelet_port = format!(":{}", defaults::KUBELET_PORT);
        let retire_after = format!("[default: {}]", defaults::RETIRE_AFTER_INTERVALS);
        for default in [
            defaults::INTERVAL,
            defaults::ECS_AGENT_URL,
            &kubelet_port,
            defaults::KUBELET_TOKEN_FILE,
            defaults::KUBELET_CA_FILE,
            defaults::DOCKER_SOCKET,
            defaults::CGROUP_DIR,
            defaults::PROC_DIR,
            defaults::MACKEREL_API_BASE,
            &retire_after,
            "[default: auto]",
        ] {
            assert!(help.contains(default), "--help lacks {default}:\n{help}");
        }
        let health = command
            .find_subcommand_mut("health")
            .unwrap()
            .render_long_help()
            .to_string();
        assert!(
            health.contains(&format!("[default: {}]", defaults::HEALTH_TIMEOUT)),
            "{health}"
        );
    }

    /// Fuzzing: any duration text is taken or refused, and what is taken is within bounds.
    mod fuzz {
        use proptest::prelude::*;

        use super::*;
        use crate::fuzz;

        const PARTS: &[&str] = &[
            "0",
            "1",
            "9",
            "60",
            "100",
            "18446744073709551615",
            "99999999999999999999",
            " ",
            ".",
            "-",
            "+",
            "ns",
            "us",
            "ms",
            "s",
            "m",
            "h",
            "d",
            "w",
            "M",
            "y",
            "min",
            "sec",
        ];

        fn check(s: &str) -> Result<(), TestCaseError> {
            if let Ok(d) = parse_interval(s) {
                prop_assert!((MIN_INTERVAL..=MAX_INTERVAL).contains(&d), "{:?}", s);
                // What run.rs and the probes derive from it cannot overflow.
                prop_assert!(d.checked_mul(MAX_RETIRE_AFTER_INTERVALS).is_some());
            }
            if let Ok(d) = parse_shutdown_timeout(s) {
                prop_assert!(d <= MAX_SHUTDOWN_TIMEOUT);
            }
            if let Ok(d) = parse_health_timeout(s) {
                prop_assert!(d <= MAX_HEALTH_TIMEOUT);
            }
            if let Ok(d) = parse_mackerel_interval(s) {
                prop_assert!(d <= MAX_MACKEREL_INTERVAL && d.as_secs() >= 1);
            }
            if let Ok(d) = parse_silent_after(s) {
                prop_assert!(d <= MAX_SILENT_AFTER);
            }
            if let Ok(n) = parse_buffer(s) {
                prop_assert!(MACKEREL_BUFFER_RANGE.contains(&n));
            }
            Ok(())
        }

        proptest! {
            #![proptest_config(fuzz::config(1000))]

            #[test]
            fn any_text(s in ".{0,40}") {
                check(&s)?;
            }

            #[test]
            fn mutated_durations(s in fuzz::mutated_text(fuzz::line_seeds("durations"), 4)) {
                check(&s)?;
            }

            #[test]
            fn durations_from_their_parts(s in fuzz::words(PARTS, 8)) {
                check(&s)?;
            }
        }
    }
}
