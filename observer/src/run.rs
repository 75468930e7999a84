//! The run loop: set up, then per interval wait -> [`Cycle::run`] -> [`Fanout::send`], until
//! `--once` is done, a signal arrives or every output has ended. On the way out the partial
//! interval is measured and handed over too, the sinks get `--shutdown-timeout` to deliver,
//! and the programs are detached.

use std::{
    io::{self, IsTerminal as _},
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{signal, SignalKind},
    time::MissedTickBehavior,
};

use crate::{
    appmetrics::{
        plugin::PluginSet, plugin_collect::PluginCollector, plugin_config::PluginsConfig, AppStats,
    },
    cgroupfs::CgroupIndex,
    collect::Collector,
    config::{Args, Output},
    cycle::Cycle,
    host_paths::{HostPathArgs, HostPaths},
    inventory::{
        refresh::{RefreshConfig, Refresher},
        sources::{self, Platform, PlatformEnv, SourceConfig},
    },
    mackerel::{self, MackerelSink},
    pin::PinDir,
    preflight,
    programs::{Attached, Programs},
    resources::{self, CgroupFs},
    resume,
    sink::{
        fanout::Fanout,
        json::JsonSink,
        prometheus::PrometheusSink,
        table::{Rows, TableSink},
        Sink,
    },
    traffic::TrafficReader,
    usage_files,
    workloads::{Host, Joiner},
};

pub async fn run(args: Args) -> anyhow::Result<()> {
    // First: in a container observer is PID 1 of its PID namespace, and the kernel drops a
    // signal PID 1 has no handler for, so a SIGTERM during start-up (a pod deleted as it
    // starts) would be lost and the kubelet would wait out the grace period.
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    // The operator's own file: a mistake in it stops observer before anything is loaded.
    let plugins = load_plugins(&args)?;
    preflight::check()?;
    let host = HostPaths::resolve(&HostPathArgs {
        host_root: args.host_root.as_deref(),
        cgroup_root: args.cgroup_root.as_deref(),
        cgroupfs: args.cgroupfs.as_deref(),
        proc: args.proc.as_deref(),
    })?;
    let root = host.cgroup_root.clone();
    let index = CgroupIndex::scan(&root)?;

    // Outputs that can fail on configuration go first: nothing is loaded if they cannot work.
    let mut sinks: Vec<Box<dyn Sink>> =
        match Output::choose(args.output, io::stdout().is_terminal()) {
            Output::Json => vec![Box::new(JsonSink::new(io::stdout()))],
            Output::Table => vec![Box::new(TableSink::new(io::stdout(), Rows::Terminal))],
        };
    let mut prometheus_at = None;
    let mut app_metrics = args.app_metrics().map_err(anyhow::Error::msg)?;
    if let Some(app) = &mut app_metrics {
        app.plugins = plugins.clone();
    } else if !plugins.is_empty() {
        log::warn!("--plugins-config is given but --app-metrics is off: no plugin runs");
    }
    let app_stats = AppStats::default();
    if let Some(listen) = args.prometheus_listen {
        let prometheus = PrometheusSink::start_with_app(listen, args.interval, &app_stats)?;
        prometheus_at = Some(prometheus.local_addr());
        sinks.push(Box::new(prometheus));
    }
    let mackerel = mackerel::MackerelConfig::from_sources(
        mackerel::Sources {
            api_key: std::env::var("MACKEREL_APIKEY").ok(),
            api_key_file: args.mackerel_api_key_file.clone(),
            api_base: Some(args.mackerel_api_base.clone()),
            roles: std::env::var("MACKEREL_ROLES").ok(),
            retire_after: Some(args.interval * args.retire_after),
            period: Some(args.mackerel_interval),
            max_values: Some(args.mackerel_buffer),
            state_dir: Some(args.state_dir.clone()),
            node: args.node_name.clone().or_else(host_name),
            cluster: args.cluster_name.clone(),
            retire_silent_after: args.mackerel_retire_silent_after,
        },
        args.interval,
    )?;
    if let Some(mut config) = mackerel {
        config.selection = args.mackerel_selection();
        config.host_status_on_start = args.mackerel_host_status_on_start;
        if !plugins.is_empty() {
            config.app_plugins = Some(Arc::new(PluginCollector::new(plugins.clone())));
        }
        config.app_metrics = app_metrics;
        config.app_stats = app_stats;
        sinks.push(Box::new(MackerelSink::start(config)?));
    }

    let selected = sources::select(&source_config(&args)).await?;
    log::info!("platform: {} ({})", selected.platform, selected.reason);
    let refresher = (selected.platform != Platform::None).then(|| {
        Refresher::new(selected.source, RefreshConfig::for_interval(args.interval))
            .with_cgroup_root(root.clone())
    });
    // Usage files are kept open between intervals, as many as the open-file limit allows.
    if let Err(e) = usage_files::raise_open_files_limit() {
        log::warn!(
            "raising the open-files limit to its hard limit: {e}; CPU and memory files beyond \
             the current limit are opened anew each interval"
        );
    }
    let joiner = Joiner::new(cgroupfs_for_resources(&host), host_facts(&host));

    let pins = if args.no_pin {
        None
    } else {
        match PinDir::prepare(&args.bpf_pin_dir, args.host_root.is_none()) {
            Ok(pins) => Some(pins),
            // Measuring unpinned beats not measuring: a restart then loses its gap.
            Err(e) => {
                log::warn!("{e}; running without pinned state");
                None
            }
        }
    };
    let mut programs = Programs::load_observer_pinned(args.map_entries, pins.as_ref())?;
    spawn_kernel_logger(&mut programs);
    let reader = TrafficReader::new(programs.ebpf_mut())?;
    let mut reader = reader;
    let attached = programs
        .attach(&root)
        .with_context(|| format!("attaching at {}", root.display()))?;
    let collector = match programs.pins().cloned() {
        None => Collector::new(reader, index),
        Some(pins) => {
            let resume = resume::take_over(&mut programs, &mut reader)?;
            let taken = attached
                .iter()
                .filter(|(_, a)| *a == Attached::TakenOver)
                .count();
            log::info!(
                "state pinned in {}: {}",
                pins.dir().display(),
                if taken > 0 {
                    "took over the programs of the run before, which never stopped counting"
                } else {
                    "new programs attached"
                }
            );
            Collector::resume(reader, index, resume)?
        }
    };
    let ids: Vec<String> = programs
        .program_ids()
        .iter()
        .map(|(name, id)| format!("{name} (id {id})"))
        .collect();
    log::info!(
        "attached {} at {}; {} cgroups in the hierarchy; traffic map of {} entries; reporting every {}",
        ids.join(", "),
        root.display(),
        collector.index().len(),
        collector.capacity(),
        humantime::format_duration(args.interval)
    );

    if let Some(addr) = prometheus_at {
        log::info!("Prometheus metrics at http://{addr}/metrics");
    }
    let mut cycle = Cycle::new(collector, refresher, joiner, ids.len());
    let mut fanout = Fanout::start(sinks).context("starting the output threads")?;
    let mut ticker =
        tokio::time::interval_at(tokio::time::Instant::now() + args.interval, args.interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        let last = tokio::select! {
            _ = ticker.tick() => args.once,
            _ = sigint.recv() => { log::info!("SIGINT: reporting the partial interval, then stopping"); true }
            _ = sigterm.recv() => { log::info!("SIGTERM: reporting the partial interval, then stopping"); true }
            _ = fanout.an_end() => {
                if fanout.all_ended() {
                    log::info!("every output has ended: stopping");
                    break;
                }
                continue;
            }
        };
        match cycle.run(fanout.status()).await {
            Ok(snapshot) => fanout.send(snapshot),
            // One bad interval is logged and the next one tried: measurement goes on.
            Err(e) => log::error!("collecting this interval: {e}"),
        }
        if last {
            break;
        }
    }
    fanout.close(args.shutdown_timeout).await;
    let pinned = programs.pins().map(|p| p.dir().to_owned());
    drop(cycle);
    drop(programs);
    match pinned {
        None => log::info!("programs detached"),
        Some(dir) => log::info!(
            "programs stay attached and counting (pinned in {}) for the next observer to take              over; `observer detach` removes them",
            dir.display()
        ),
    }
    Ok(())
}

/// The plugins of `--plugins-config` (none without it), checked against this node.
fn load_plugins(args: &Args) -> anyhow::Result<Arc<PluginSet>> {
    let Some(path) = &args.plugins.plugins_config else {
        return Ok(Arc::new(PluginSet::empty()));
    };
    // Its errors name the file and the line.
    let config = PluginsConfig::load(path)?;
    let set = PluginSet::from_config(config)
        .with_context(|| format!("plugins config {}", path.display()))?;
    log::info!(
        "plugins config {}: {} plugins workloads may name in {}: {}",
        path.display(),
        set.names().count(),
        crate::inventory::PLUGINS_LABEL,
        set.names().collect::<Vec<_>>().join(", ")
    );
    Ok(Arc::new(set))
}

fn source_config(args: &Args) -> SourceConfig {
    let mut config = SourceConfig::new(PlatformEnv::from_process());
    config.platform = args.platform;
    config.ecs_agent_url = args.ecs_agent_url.clone();
    if args.kubelet_url.is_some() {
        config.kubelet_url = args.kubelet_url.clone();
    }
    config.kubelet_token_file = args.kubelet_token_file.clone();
    config.kubelet_ca_file = args.kubelet_ca_file.clone();
    config.kubelet_insecure_tls = args.kubelet_insecure_tls;
    config.docker_socket = args.docker_socket.clone();
    config
}

fn cgroupfs_for_resources(host: &HostPaths) -> CgroupFs {
    CgroupFs::detect(&host.cgroupfs).unwrap_or_else(|e| {
        log::warn!(
            "finding cgroupfs under {}: {e}; CPU and memory will be missing where it cannot be read",
            host.cgroupfs.display()
        );
        CgroupFs::probe(&host.cgroupfs)
    })
}

fn host_facts(host: &HostPaths) -> Host {
    Host {
        cpus: resources::host_cpu_count(&host.proc).ok(),
        memory: resources::host_memory_total(&host.proc).ok(),
    }
}

/// Forwards the kernel programs' rare aya-log records to our logger. A failure here costs only
/// those records, so it is a warning.
fn spawn_kernel_logger(programs: &mut Programs) {
    let logger = match aya_log::EbpfLogger::init(programs.ebpf_mut()) {
        Ok(logger) => logger,
        Err(e) => {
            log::warn!("kernel log records will not be shown: {e}");
            return;
        }
    };
    // SAFETY: the logger owns its ring buffer's fd for as long as the AsyncFd owns the logger.
    let registered =
        unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) };
    let mut logger = match registered {
        Ok(fd) => fd,
        Err(e) => {
            log::warn!("kernel log records will not be shown: {e}");
            return;
        }
    };
    tokio::spawn(async move {
        loop {
            match logger.readable_mut().await {
                Ok(mut guard) => {
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                }
                Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
            }
        }
    });
}

/// The name of the host observer runs on (its UTS namespace: the node's with host networking,
/// as the ECS daemon runs), for the meta of the Mackerel hosts it makes.
fn host_name() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let name = name.trim();
    (!name.is_empty()).then(|| name.to_string())
}
