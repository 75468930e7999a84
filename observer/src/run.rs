//! The interval loop: programs attached, then per interval maps -> collector -> inventory join
//! -> snapshot -> sinks, until --once is done or a signal arrives; programs detached and the
//! Mackerel queue flushed on the way out.

use std::{
    io::{self, IsTerminal as _},
    time::Duration,
};

use anyhow::Context as _;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{signal, SignalKind},
    time::MissedTickBehavior,
};

use crate::{
    cgroupfs::CgroupIndex,
    collect::Collector,
    config::{Args, Output},
    host_paths::{HostPathArgs, HostPaths},
    inventory::{
        refresh::{RefreshConfig, Refresher},
        sources::{self, Platform, PlatformEnv, SourceConfig},
    },
    mackerel::{self, MackerelReporter},
    preflight,
    programs::Programs,
    resources::{self, CgroupFs},
    sink::{
        json::JsonSink,
        prometheus::{Handle as PrometheusHandle, PrometheusSink},
        table::{Rows, TableSink},
        Sink,
    },
    snapshot::{PlatformStatus, Snapshot},
    traffic::TrafficReader,
    workloads::{Host, Joiner},
};

/// How long SIGTERM may wait for the Mackerel queue to drain.
const MACKEREL_FLUSH: Duration = Duration::from_secs(10);

pub async fn run(args: Args) -> anyhow::Result<()> {
    // First: in a container observer is PID 1 of its PID namespace, and the kernel drops a
    // signal PID 1 has no handler for, so a SIGTERM during start-up (a pod deleted as it
    // starts) would be lost and the kubelet would wait out the grace period.
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
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
    let prometheus = args
        .prometheus_listen
        .map(|listen| PrometheusSink::start(listen, args.interval))
        .transpose()?;
    let mackerel = mackerel::MackerelConfig::from_sources(
        mackerel::Sources {
            api_key: std::env::var("MACKEREL_APIKEY").ok(),
            api_key_file: args.mackerel_api_key_file.clone(),
            api_base: Some(args.mackerel_api_base.clone()),
            roles: std::env::var("MACKEREL_ROLES").ok(),
            retire_after: Some(args.interval * args.retire_after),
        },
        args.interval,
    )?
    .map(MackerelReporter::start)
    .transpose()?;

    let selected = sources::select(&source_config(&args)).await?;
    log::info!("platform: {} ({})", selected.platform, selected.reason);
    let mut refresher = (selected.platform != Platform::None)
        .then(|| Refresher::new(selected.source, RefreshConfig::for_interval(args.interval)));
    let mut joiner = Joiner::new(cgroupfs_for_resources(&host), host_facts(&host));

    let mut programs = Programs::load_observer(args.map_entries)?;
    spawn_kernel_logger(&mut programs);
    let reader = TrafficReader::new(programs.ebpf_mut())?;
    programs
        .attach(&root)
        .with_context(|| format!("attaching at {}", root.display()))?;
    let ids: Vec<String> = programs
        .program_ids()
        .iter()
        .map(|(name, id)| format!("{name} (id {id})"))
        .collect();
    log::info!(
        "attached {} at {}; {} cgroups in the hierarchy; traffic map of {} entries; reporting every {}",
        ids.join(", "),
        root.display(),
        index.len(),
        reader.capacity(),
        humantime::format_duration(args.interval)
    );

    let (prometheus_sink, prometheus): (Option<PrometheusSink>, Option<PrometheusHandle>) =
        prometheus.unzip();
    if let Some(h) = &prometheus {
        h.set_programs_attached(ids.len());
        log::info!("Prometheus metrics at http://{}/metrics", h.local_addr());
    }
    let mut sinks: Vec<Box<dyn Sink>> =
        match Output::choose(args.output, io::stdout().is_terminal()) {
            Output::Json => vec![Box::new(JsonSink::new(io::stdout()))],
            Output::Table => vec![Box::new(TableSink::new(io::stdout(), Rows::Terminal))],
        };
    sinks.extend(prometheus_sink.map(|s| Box::new(s) as Box<dyn Sink>));

    let mut collector = Collector::new(reader, index);
    let mut ticker =
        tokio::time::interval_at(tokio::time::Instant::now() + args.interval, args.interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut failures_seen = 0;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = sigint.recv() => { log::info!("SIGINT: detaching"); break }
            _ = sigterm.recv() => { log::info!("SIGTERM: detaching"); break }
        }
        let mut snapshot = match collector.collect() {
            Ok(snapshot) => snapshot,
            // One bad interval is logged and the next one tried: measurement goes on.
            Err(e) => {
                log::error!("collecting this interval: {e}");
                continue;
            }
        };
        if let Some(refresher) = &mut refresher {
            join_workloads(&mut snapshot, &mut collector, refresher, &mut joiner).await;
            let failures = refresher.stale().map_or(0, |s| s.failures);
            if let Some(h) = &prometheus {
                h.add_metadata_api_errors(u64::from(failures.saturating_sub(failures_seen)));
            }
            failures_seen = failures;
            // A stale inventory would make running tasks look gone: Mackerel waits for a good one.
            if let (Some(m), None) = (&mackerel, refresher.stale()) {
                m.report(mackerel::report::interval_report(&snapshot));
            }
            if let (Some(m), Some(h)) = (&mackerel, &prometheus) {
                h.set_mackerel_queue_depth(m.queue_depth());
            }
        }
        for sink in &mut sinks {
            if let Err(e) = sink.emit(&snapshot) {
                log::error!("{} output: {e}", sink.name());
            }
        }
        if args.once {
            break;
        }
    }
    drop(collector);
    drop(programs);
    if let Some(h) = &prometheus {
        h.set_programs_attached(0);
    }
    log::info!("programs detached");
    if let Some(m) = mackerel {
        // Hosts stay: the node is stopping, not its tasks.
        // No answer in time is warned about inside shutdown.
        if let Some(left) = m.shutdown(MACKEREL_FLUSH).await {
            if left.unsent > 0 || left.unregistered > 0 {
                log::warn!("Mackerel: stopped with data not yet sent: {left:?}");
            }
        }
    }
    Ok(())
}

/// Refreshes the inventory (at most once per interval, at once for unknown containers), hangs
/// this interval's cgroups on it and adds the task/pod view to the snapshot.
async fn join_workloads(
    snapshot: &mut Snapshot,
    collector: &mut Collector,
    refresher: &mut Refresher,
    joiner: &mut Joiner,
) {
    let paths: Vec<(u64, &str)> = collector.index().iter().collect();
    let (inventory, mut unknown) = refresher.tick(tokio::time::Instant::now(), &paths).await;
    // A container newer than the last walk of the hierarchy has no cgroup yet: walk again.
    if collector.should_walk(inventory) {
        if let Err(e) = collector.rescan() {
            log::warn!("walking the cgroup hierarchy: {e}");
        }
        let paths: Vec<(u64, &str)> = collector.index().iter().collect();
        unknown = refresher.tick(tokio::time::Instant::now(), &paths).await.1;
    }
    joiner.join_into(snapshot, refresher.inventory(), collector.index(), &unknown);
    snapshot.platform = Some(PlatformStatus {
        source: refresher.source_name(),
        stale_since: refresher.stale().map(|s| s.since),
    });
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
