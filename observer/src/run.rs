//! The interval loop: programs attached, then maps -> collector -> snapshot -> sinks until
//! --once is done or a signal arrives; programs detached on the way out.

use std::{io, time::Duration};

use anyhow::Context as _;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{signal, SignalKind},
    time::MissedTickBehavior,
};

use crate::{
    cgroupfs::{self, CgroupIndex},
    collect::Collector,
    config::{Args, Output},
    preflight,
    programs::Programs,
    sink::{json::JsonSink, Sink},
    traffic::TrafficReader,
};

pub async fn run(args: Args) -> anyhow::Result<()> {
    preflight::check()?;
    let root = cgroupfs::detect_root(args.cgroup_root.as_deref())?;
    let index = CgroupIndex::scan(&root)?;

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
        "attached {} at {}; counting traffic of {} cgroups (map of {} entries); reporting every {}",
        ids.join(", "),
        root.display(),
        index.len(),
        reader.capacity(),
        humantime::format_duration(args.interval)
    );

    let mut collector = Collector::new(reader, index);
    let mut sinks: Vec<Box<dyn Sink>> = match args.output {
        Output::Json => vec![Box::new(JsonSink::new(io::stdout()))],
    };

    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut ticker =
        tokio::time::interval_at(tokio::time::Instant::now() + args.interval, args.interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = sigint.recv() => { log::info!("SIGINT: detaching"); break }
            _ = sigterm.recv() => { log::info!("SIGTERM: detaching"); break }
        }
        match collector.collect() {
            Ok(snapshot) => {
                for sink in &mut sinks {
                    if let Err(e) = sink.emit(&snapshot) {
                        log::error!("{} output: {e}", sink.name());
                    }
                }
            }
            // One bad interval is logged and the next one tried: measurement goes on.
            Err(e) => log::error!("collecting this interval: {e}"),
        }
        if args.once {
            break;
        }
    }
    drop(collector);
    drop(programs);
    log::info!("programs detached");
    Ok(())
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
