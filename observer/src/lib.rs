//! observer: per-container and per-task traffic, measured by eBPF at the cgroup v2 root.
//!
//! Data flows one way per interval: kernel maps -> [`traffic`] reader -> [`collect`] ->
//! [`cycle`] (with the [`inventory`] and the [`workloads`] join) -> one [`snapshot`] -> every
//! [`sink`]. docs/architecture.md has the map.

pub mod appmetrics;
pub mod backoff;
pub mod body;
pub mod btf;
pub mod cache_key;
pub mod cgroupfs;
pub mod collect;
pub mod config;
pub mod cycle;
pub mod defaults;
pub mod delta;
pub mod fastmap;
#[cfg(test)]
mod fuzz;
pub mod health;
pub mod host_paths;
pub mod inventory;
pub mod kernel;
pub mod mackerel;
pub mod mountinfo;
pub mod pin;
pub mod preflight;
pub mod programs;
pub mod resources;
pub mod resume;
pub mod run;
pub mod sink;
pub mod snapshot;
pub mod traffic;
pub mod usage_files;
pub mod workloads;

/// The whole `observer` command: logging, arguments, runtime, exit status.
pub fn main() -> std::process::ExitCode {
    use clap::Parser as _;
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .target(env_logger::Target::Stderr)
        .init();
    let args = config::Args::parse();
    if let Some(config::Command::Health { timeout }) = args.command {
        // Quiet on success: health checks run every few seconds.
        return match health::check(args.prometheus_listen, timeout) {
            Ok(_) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                log::error!("unhealthy: {e}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    if let Some(config::Command::Detach) = args.command {
        return match pin::remove_all(&args.bpf_pin_dir) {
            Ok(removed) if removed.paths.is_empty() => {
                log::info!("nothing pinned in {}", args.bpf_pin_dir.display());
                std::process::ExitCode::SUCCESS
            }
            Ok(removed) => {
                for path in &removed.paths {
                    log::info!("removed {}", path.display());
                }
                if removed.still_loaded.is_empty() {
                    log::info!("observer is detached: its programs and maps are gone");
                } else {
                    // Detached from every cgroup, so they count nothing; another process holds them.
                    log::warn!(
                        "observer is detached, but programs {:?} are still loaded: another \
                         process holds them (an observer still running? stop it; \
                         bpftool prog show id N names the holder's pid)",
                        removed.still_loaded
                    );
                }
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                log::error!("{e}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    // Two workers: the interval's blocking reads never hold up the probe endpoints.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            log::error!("starting the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run::run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
