//! Real things for observer's tests and benchmark: cgroups under the v2 root, network
//! namespaces with veth pairs, and processes started inside them. Every guard removes what it
//! made when dropped, so a failing test leaves nothing behind.

pub mod cgroup;
pub mod docker;
pub mod ecs_scenario;
pub mod ecs_taskdef;
pub mod fake_mackerel;
pub mod fake_platform;
pub mod host_bpffs;
pub mod k8s_pod;
pub mod netns;
pub mod observer_cmd;
pub mod process;
pub mod prometheus_server;
pub mod state_dir;
pub mod stats;
pub mod sysctl;
pub mod traffic;

use std::path::PathBuf;

pub use cgroup::TestCgroup;
pub use netns::NetNs;
pub use observer_cmd::ObserverCmd;
pub use process::{Spawned, Where};

/// True when the tests may load eBPF programs and make cgroups and namespaces.
pub fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Returns true (and says so) when `test` cannot run here because we are not root.
pub fn skip_unless_root(test: &str) -> bool {
    if is_root() {
        return false;
    }
    skip(
        test,
        "needs root (load eBPF programs, make cgroups and namespaces)",
    )
}

/// Set (to any value but `false`/`0`/empty) where every integration test must run: CI runs as
/// root with Docker and the test tools installed, so a skip there hides a broken set-up.
pub const CI_ENV: &str = "CI";
/// A file `cargo xtask test` names, to which each skip appends `test\treason`, so that its
/// tally shows skips apart from passes.
pub const SKIP_LOG_ENV: &str = "OBSERVER_TEST_SKIP_LOG";

/// True when the environment says this is CI.
pub fn in_ci() -> bool {
    std::env::var(CI_ENV).is_ok_and(|v| !matches!(v.trim(), "" | "0" | "false"))
}

/// Records that `test` cannot run here because of `why` and returns true, so the caller
/// returns early. Under CI a skip is a failure: it panics with the reason.
pub fn skip(test: &str, why: &str) -> bool {
    if in_ci() {
        panic!("{test} would be skipped, and skips fail under {CI_ENV}=true: {why}");
    }
    eprintln!("SKIPPED {test}: {why}");
    if let Some(path) = std::env::var_os(SKIP_LOG_ENV) {
        use std::io::Write as _;
        // One short line per write, appended: concurrent tests do not interleave within it.
        if let Ok(mut file) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(file, "{test}\t{}", why.replace(['\n', '\t'], " "));
        }
    }
    true
}

/// The cgroup v2 mount of this host, as observer finds it.
pub fn v2_root() -> PathBuf {
    observer::cgroupfs::detect_root(None).expect("a cgroup v2 mount")
}

/// A name no other test or run of this process uses.
pub fn unique(label: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{label}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs a command, failing with its stderr when it fails.
pub fn sh(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = std::process::Command::new(program).args(args).output()?;
    if !out.status.success() {
        anyhow::bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
