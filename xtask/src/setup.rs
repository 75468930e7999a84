//! Installs what building and testing need. Every step checks first, so running it again is cheap.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

use crate::cargo;
use crate::sys::{self, say};

const LLVM_CONFIG: &str = "/usr/lib/llvm-22/bin/llvm-config";
const LLVM_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
];
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Debian packages the integration tests and the bench use.
const TEST_PACKAGES: &[&str] = &[
    "bpftool",
    "iproute2",
    "docker.io",
    "busybox-static",
    "iptables",
    "prometheus",
];
const DOCKERD_ARGS: &[&str] = &["--exec-opt", "native.cgroupdriver=cgroupfs"];
const DOCKERD_LOG: &str = "/tmp/observer-dockerd.log";
const DOCKER_WAIT: Duration = Duration::from_secs(30);

/// Runs every set-up step; `for_tests` adds the test tools and a running Docker engine.
pub fn setup(for_tests: bool) -> Result<()> {
    let mut apt = Apt::default();
    rust_src().context("setting up rust-src")?;
    llvm(&mut apt).context("setting up LLVM 22")?;
    bpf_linker().context("setting up bpf-linker")?;
    if for_tests {
        test_packages(&mut apt).context("setting up the test tools")?;
        docker().context("starting a Docker engine")?;
    }
    Ok(())
}

/// docker.io installed and a Docker engine answering (for `cargo xtask image`).
pub fn docker_engine() -> Result<()> {
    let mut apt = Apt::default();
    let has_dockerd = ["/usr/sbin/dockerd", "/usr/bin/dockerd"]
        .iter()
        .any(|p| Path::new(p).exists());
    if !has_dockerd && !dpkg_installed("docker.io") {
        apt.install(&["docker.io"])?;
    }
    docker()
}

/// Installs Debian packages with apt-get (updating the lists first).
pub fn apt_install(packages: &[&str]) -> Result<()> {
    Apt::default().install(packages)
}

/// Docker's state as on a machine where it never ran: dockerd stopped, /var/lib/docker moved
/// aside, docker0 gone. The next `docker()` starts a new engine on empty state.
pub fn fresh_docker() -> Result<()> {
    if !sys::is_root()? {
        bail!("--fresh-docker stops dockerd and moves /var/lib/docker: run it as root");
    }
    if dockerd_running() {
        say!("fresh docker: stopping dockerd");
        sys::run(sys::command("pkill").args(["-TERM", "-x", "dockerd"]))?;
        let start = Instant::now();
        while dockerd_running() {
            if start.elapsed() > DOCKER_WAIT {
                bail!("dockerd did not stop within {} s", DOCKER_WAIT.as_secs());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let state = Path::new("/var/lib/docker");
    if state.exists() {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let aside = PathBuf::from(format!("/var/lib/docker.aside-{secs}"));
        std::fs::rename(state, &aside)
            .with_context(|| format!("moving {} to {}", state.display(), aside.display()))?;
        say!(
            "fresh docker: the old state is at {} (delete it when done)",
            aside.display()
        );
    }
    if Path::new("/sys/class/net/docker0").exists() {
        sys::run(sys::command("ip").args(["link", "delete", "docker0"]))?;
    }
    Ok(())
}

/// The toolchain that builds the eBPF crate: the one observer's build.rs uses.
fn ebpf_toolchain() -> String {
    std::env::var("OBSERVER_EBPF_TOOLCHAIN")
        .ok()
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| "stable".into())
}

/// True iff `rustup component list --installed` output lists `component`.
pub fn component_listed(list: &str, component: &str) -> bool {
    list.lines()
        .any(|line| line.split_whitespace().next() == Some(component))
}

fn rust_src() -> Result<()> {
    let toolchain = ebpf_toolchain();
    let list = sys::output(sys::command("rustup").args(["component", "list", "--installed", "--toolchain", &toolchain]))
        .with_context(|| format!("`rustup component list --installed --toolchain {toolchain}` failed: is rustup installed and the toolchain {toolchain} present?"))?;
    if component_listed(&list, "rust-src") {
        say!("rust-src for toolchain {toolchain}: present");
        return Ok(());
    }
    say!("rust-src for toolchain {toolchain}: missing; installing it (the eBPF build compiles core from source)");
    sys::run(sys::command("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        &toolchain,
    ]))
}

fn llvm(apt: &mut Apt) -> Result<()> {
    if Path::new(LLVM_CONFIG).exists() {
        say!("llvm-22-dev: present ({LLVM_CONFIG})");
        return Ok(());
    }
    say!("llvm-22-dev: missing; installing it with apt-get (bpf-linker must link the LLVM 22 that rustc uses)");
    apt.install(LLVM_PACKAGES)?;
    if !Path::new(LLVM_CONFIG).exists() {
        bail!(
            "{LLVM_CONFIG} is still missing after installing {}",
            LLVM_PACKAGES.join(" ")
        );
    }
    Ok(())
}

/// What `bpf-linker --version` prints, if it runs (PATH includes the cargo bin directory).
fn bpf_linker_version() -> Option<String> {
    sys::output(sys::command("bpf-linker").arg("--version")).map(|v| v.trim().to_string())
}

fn bpf_linker() -> Result<()> {
    if let Some(version) = bpf_linker_version() {
        say!("bpf-linker: present ({version})");
        return Ok(());
    }
    say!(
        "bpf-linker: missing; installing {BPF_LINKER_VERSION} built against LLVM 22 with cargo install (the eBPF build links with it; takes about 60 s)"
    );
    sys::run(
        cargo::cargo([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
            "--no-default-features",
            "--features",
            "llvm-22",
        ])
        // Without it the build finds /usr/bin/llvm-config, an older LLVM, and fails to link.
        .env("LLVM_PREFIX", "/usr/lib/llvm-22")
        // Its own target dir: do not fill the workspace's with the linker's build.
        .env_remove("CARGO_TARGET_DIR"),
    )?;
    let version = bpf_linker_version()
        .context("bpf-linker was installed but `bpf-linker --version` does not run")?;
    say!("bpf-linker: installed ({version})");
    Ok(())
}

/// True iff a `dpkg-query -W -f='${Status}'` status says the package is installed.
pub fn dpkg_status_installed(status: &str) -> bool {
    // "want error-flag state", e.g. "install ok installed", "hold ok installed",
    // "deinstall ok config-files" (removed, configuration kept).
    let words: Vec<&str> = status.split_whitespace().collect();
    matches!(words.as_slice(), [_, "ok", "installed"])
}

fn dpkg_installed(package: &str) -> bool {
    sys::output(sys::command("dpkg-query").args(["-W", "-f=${Status}", package]))
        .is_some_and(|status| dpkg_status_installed(&status))
}

fn test_packages(apt: &mut Apt) -> Result<()> {
    let missing: Vec<&str> = TEST_PACKAGES
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if missing.is_empty() {
        say!("test tools ({}): present", TEST_PACKAGES.join(", "));
        return Ok(());
    }
    say!("test tools: {} missing; installing with apt-get (the integration tests and the bench use them)", missing.join(", "));
    apt.install(&missing)
}

fn docker_answers() -> bool {
    sys::succeeds(sys::command("docker").arg("info"))
}

fn dockerd_running() -> bool {
    sys::succeeds(sys::command("pgrep").args(["-x", "dockerd"]))
}

fn docker() -> Result<()> {
    if docker_answers() {
        say!("docker engine: answering");
        return Ok(());
    }
    if dockerd_running() {
        say!(
            "docker engine: dockerd runs but does not answer yet; waiting up to {} s",
            DOCKER_WAIT.as_secs()
        );
    } else {
        if !sys::is_root()? {
            bail!(
                "no Docker engine answers and xtask is not root; start one as root: setsid -f dockerd {} >{DOCKERD_LOG} 2>&1",
                DOCKERD_ARGS.join(" ")
            );
        }
        say!(
            "docker engine: none running; starting dockerd in the background (log: {DOCKERD_LOG})"
        );
        let log =
            File::create(DOCKERD_LOG).with_context(|| format!("cannot create {DOCKERD_LOG}"))?;
        let log_err = log
            .try_clone()
            .context("cannot duplicate the log file handle")?;
        // setsid -f: dockerd gets its own session, so it outlives xtask and ignores its Ctrl-C.
        sys::run(
            sys::command("setsid")
                .arg("-f")
                .arg("dockerd")
                .args(DOCKERD_ARGS)
                .stdin(Stdio::null())
                .stdout(log)
                .stderr(log_err),
        )?;
    }
    let start = Instant::now();
    while start.elapsed() < DOCKER_WAIT {
        if docker_answers() {
            say!("docker engine: ready after {} s", start.elapsed().as_secs());
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let log = std::fs::read_to_string(DOCKERD_LOG).unwrap_or_default();
    bail!(
        "no Docker engine answered `docker info` within {} s; last lines of {DOCKERD_LOG}:\n{}",
        DOCKER_WAIT.as_secs(),
        last_lines(&log, 20)
    )
}

/// The last `n` lines of `text`.
pub fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// apt-get, updating the package lists once per xtask run, before the first install.
#[derive(Default)]
struct Apt {
    updated: bool,
}

impl Apt {
    fn install(&mut self, packages: &[&str]) -> Result<()> {
        if !sys::is_root()? {
            bail!(
                "xtask is not root, so it cannot install {}; run: sudo apt-get update && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends {}",
                packages.join(", "),
                packages.join(" ")
            );
        }
        if !self.updated {
            say!("apt-get update (once, before installing)");
            sys::run(
                sys::command("apt-get")
                    .arg("update")
                    .env("DEBIAN_FRONTEND", "noninteractive"),
            )?;
            self.updated = true;
        }
        sys::run(
            sys::command("apt-get")
                .args(["install", "-y", "--no-install-recommends"])
                .args(packages)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dpkg_status() {
        assert!(dpkg_status_installed("install ok installed"));
        assert!(dpkg_status_installed("hold ok installed"));
        assert!(!dpkg_status_installed("deinstall ok config-files"));
        assert!(!dpkg_status_installed("install ok half-configured"));
        assert!(!dpkg_status_installed("unknown ok not-installed"));
        assert!(!dpkg_status_installed(""));
    }

    #[test]
    fn rust_src_in_component_list() {
        let list = "cargo-x86_64-unknown-linux-gnu\nrust-src\nrustc-x86_64-unknown-linux-gnu\n";
        assert!(component_listed(list, "rust-src"));
        assert!(!component_listed(
            "cargo-x86_64-unknown-linux-gnu\nrust-std-x86_64-unknown-linux-gnu\n",
            "rust-src"
        ));
        assert!(component_listed("rust-src (installed)\n", "rust-src"));
        assert!(!component_listed("rust-src-extra\n", "rust-src"));
    }

    #[test]
    fn last_lines_of_a_log() {
        assert_eq!(last_lines("a\nb\nc\n", 2), "b\nc");
        assert_eq!(last_lines("a\n", 5), "a");
        assert_eq!(last_lines("", 5), "");
    }
}
