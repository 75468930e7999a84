//! Real things for observer's tests and benchmark: cgroups under the v2 root, network
//! namespaces with veth pairs, and processes started inside them. Every guard removes what it
//! made when dropped, so a failing test leaves nothing behind.

pub mod cgroup;
pub mod docker;
pub mod fake_mackerel;
pub mod fake_platform;
pub mod netns;
pub mod observer_cmd;
pub mod process;
pub mod prometheus_server;
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
    eprintln!("SKIPPED {test}: needs root (load eBPF programs, make cgroups and namespaces)");
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
