//! Command line and environment.

use std::{path::PathBuf, time::Duration};

use clap::{Parser, ValueEnum};
use observer_common::DEFAULT_MAX_ENTRIES;

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
    /// How often to report: "60s", "5s", "1m", "500ms".
    #[arg(long, env = "OBSERVER_INTERVAL", default_value = "60s", value_parser = parse_interval)]
    pub interval: Duration,

    /// Report one interval, then detach and exit.
    #[arg(long)]
    pub once: bool,

    /// Output format on stdout.
    #[arg(long, env = "OBSERVER_OUTPUT", value_enum, default_value_t = Output::Json)]
    pub output: Output,

    /// cgroup v2 mount to attach at [default: found in /proc/self/mountinfo:
    /// /sys/fs/cgroup on pure v2 hosts, /sys/fs/cgroup/unified on hybrid ones].
    #[arg(long, env = "OBSERVER_CGROUP_ROOT")]
    pub cgroup_root: Option<PathBuf>,

    /// Entries of the kernel's traffic map: one per cgroup that sends or receives. When it is
    /// full, new cgroups go uncounted and observer says so every interval.
    #[arg(long, env = "OBSERVER_MAP_ENTRIES", default_value_t = DEFAULT_MAX_ENTRIES,
          value_parser = clap::value_parser!(u32).range(1..=1_048_576))]
    pub map_entries: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// One JSON object per line (docs/output.md).
    Json,
}

/// Shortest interval accepted: below it the reading itself becomes the load.
pub const MIN_INTERVAL: Duration = Duration::from_millis(100);

pub fn parse_interval(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("{e} (expected a duration such as 60s, 5s, 1m or 500ms)"))?;
    if d < MIN_INTERVAL {
        return Err(format!("{s} is too short: the shortest interval is 100ms"));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals() {
        assert_eq!(parse_interval("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_interval("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_interval("500ms"), Ok(Duration::from_millis(500)));
        assert!(parse_interval("10ms").is_err());
        assert!(parse_interval("fast").is_err());
        assert!(parse_interval("").is_err());
    }

    #[test]
    fn defaults() {
        let args = Args::try_parse_from(["observer"]).unwrap();
        assert_eq!(args.interval, Duration::from_secs(60));
        assert!(!args.once);
        assert_eq!(args.output, Output::Json);
        assert_eq!(args.map_entries, DEFAULT_MAX_ENTRIES);
        assert_eq!(args.cgroup_root, None);
    }

    #[test]
    fn bad_flags_are_rejected() {
        assert!(Args::try_parse_from(["observer", "--interval", "0s"]).is_err());
        assert!(Args::try_parse_from(["observer", "--map-entries", "0"]).is_err());
        assert!(Args::try_parse_from(["observer", "--output", "xml"]).is_err());
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
        ] {
            assert!(help.contains(flag), "--help lacks {flag}");
        }
        assert!(help.contains("OBSERVER_INTERVAL"));
    }
}
