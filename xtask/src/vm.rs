//! `cargo xtask vm-test`: the in-VM suite (tests/src/bin/vm-suite.rs) on the kernels operators
//! run, each booted in QEMU with pure cgroup v2: Debian's kernels from the Debian archive
//! (fetched once, cached under target/vm-cache), an initramfs of busybox, observer, trafficgen
//! and the suite, and the suite's `vm-check` lines read from the serial console.
//!
//! QEMU runs under TCG: KVM guests hang at boot on the machines this project runs on.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

use crate::sys::say;
use crate::{cargo, setup, sys};

/// A kernel of the matrix: what operators run (Amazon Linux 2: 5.10; AL2023, Bottlerocket and
/// Debian 12: 6.1; Debian 13: 6.12), taken from the Debian release that ships it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kernel {
    pub name: &'static str,
    pub suite: &'static str,
}

pub const KERNELS: &[Kernel] = &[
    Kernel {
        name: "5.10",
        suite: "bullseye",
    },
    Kernel {
        name: "6.1",
        suite: "bookworm",
    },
    Kernel {
        name: "6.12",
        suite: "trixie",
    },
];

/// The checks vm-suite runs; a kernel passes when every one of them printed `pass`.
const CHECKS: &[&str] = &[
    "traffic_per_cgroup",
    "cpu_of_a_busy_loop",
    "memory_of_an_allocation",
    "ecs_task_systemd_layout",
    "kubernetes_pod_systemd_layout",
    "pinned_state_survives_sigkill",
];
/// Packages the host needs to boot the VMs and build the initramfs.
const HOST_PACKAGES: &[(&str, &str)] = &[
    ("qemu-system-x86", "/usr/bin/qemu-system-x86_64"),
    ("cpio", "/usr/bin/cpio"),
    ("busybox-static", "/bin/busybox"),
];
/// The whole life of one VM, boot to power-off; a guest still running then is killed.
const VM_TIMEOUT: Duration = Duration::from_secs(420);
/// The binaries that go into the initramfs (built, name in the VM), all from the tests package:
/// observer-e2e is observer's own main.
const BINARIES: &[(&str, &str)] = &[
    ("observer-e2e", "observer"),
    ("trafficgen", "trafficgen"),
    ("vm-suite", "vm-suite"),
];

/// The kernels `--kernel` names: one of [`KERNELS`] or `all`.
pub fn select(name: &str) -> Result<Vec<Kernel>> {
    if name == "all" {
        return Ok(KERNELS.to_vec());
    }
    match KERNELS.iter().find(|k| k.name == name) {
        Some(k) => Ok(vec![*k]),
        None => bail!(
            "no kernel {name:?} in the matrix; choose one of {} or all",
            KERNELS
                .iter()
                .map(|k| k.name)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// What one kernel's VM did.
#[derive(Debug, Default)]
pub struct Outcome {
    /// `uname -r` in the guest.
    pub release: String,
    /// From starting QEMU to the init script's first line.
    pub boot: Option<Duration>,
    /// From starting QEMU to its exit (or to the kill).
    pub total: Duration,
    /// (check, passed, detail) per `vm-check` line.
    pub checks: Vec<(String, bool, String)>,
    /// Why the VM failed as a whole (hung, no result line, ...).
    pub problem: Option<String>,
}

impl Outcome {
    pub fn passed(&self) -> bool {
        self.problem.is_none()
            && CHECKS
                .iter()
                .all(|c| self.checks.iter().any(|(n, ok, _)| n == c && *ok))
    }

    /// Reads one serial console line; true once the suite has finished.
    pub fn read_line(&mut self, line: &str, since_start: Duration) -> bool {
        // The firmware's screen clearing may sit before a marker on the same line.
        let marked = |marker: &str| line.find(marker).map(|at| &line[at + marker.len()..]);
        if let Some(rest) = marked("vm-boot ") {
            self.release = rest.split_whitespace().next().unwrap_or_default().into();
            self.boot = Some(since_start);
        } else if let Some(json) = marked("vm-check ") {
            match parse_check(json) {
                Some(check) => self.checks.push(check),
                None => self.problem = Some(format!("unreadable result line: {line}")),
            }
        } else if let Some(code) = marked("vm-suite-exit ") {
            if code.trim() != "0" && self.checks.iter().all(|(_, ok, _)| *ok) {
                self.problem = Some(format!("vm-suite exited {}", code.trim()));
            }
            return true;
        }
        false
    }
}

/// `{"check":..., "pass":..., "detail":...}`: one line of the suite's.
pub fn parse_check(json: &str) -> Option<(String, bool, String)> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    Some((
        v["check"].as_str()?.to_string(),
        v["pass"].as_bool()?,
        v["detail"].as_str().unwrap_or_default().to_string(),
    ))
}

fn cache_dir() -> PathBuf {
    cargo::target_dir().join("vm-cache")
}

/// `cargo xtask vm-test`: every selected kernel booted and checked; fails unless all pass.
pub fn vm_test(kernel: &str, release: bool) -> Result<()> {
    let results = run(&select(kernel)?, release)?;
    if results
        .iter()
        .any(|(_, o)| !o.as_ref().is_ok_and(Outcome::passed))
    {
        bail!("vm-test failed on some kernels");
    }
    Ok(())
}

/// What each kernel did: Err when its VM could not be set up (QEMU not installable, the
/// kernel not fetched) or started. An Err of the whole is a broken build of what goes into the
/// VM. Prints the per-kernel report.
pub fn run(kernels: &[Kernel], release: bool) -> Result<Vec<(Kernel, Result<Outcome>)>> {
    let started = Instant::now();
    if let Err(e) = host_packages() {
        let why = format!("{e:#}");
        return Ok(kernels
            .iter()
            .map(|k| (*k, Err(anyhow::anyhow!("{why}"))))
            .collect());
    }
    let mut build = cargo::cargo(["build", "--package", "observer-tests"]);
    if release {
        build.arg("--release");
    }
    for (bin, _) in BINARIES {
        build.args(["--bin", bin]);
    }
    sys::run(&mut build).context("building the binaries that go into the VM")?;
    let profile = if release { "release" } else { "debug" };
    let initramfs = initramfs(profile).context("building the initramfs")?;
    let mut results = Vec::new();
    for k in kernels {
        let outcome = fetch_kernel(k)
            .with_context(|| format!("fetching kernel {}", k.name))
            .and_then(|vmlinuz| {
                say!(
                    "vm-test {}: booting {} under QEMU (TCG)",
                    k.name,
                    vmlinuz.display()
                );
                boot(k, &vmlinuz, &initramfs)
            });
        results.push((*k, outcome));
    }
    report(&results);
    say!("vm-test: {:.0} s in all", started.elapsed().as_secs_f64());
    Ok(results)
}

fn report(results: &[(Kernel, Result<Outcome>)]) {
    for (k, outcome) in results {
        let outcome = match outcome {
            Ok(o) => o,
            Err(e) => {
                say!("vm-test {}: FAILED to run: {e:#}", k.name);
                continue;
            }
        };
        let verdict = if outcome.passed() { "passed" } else { "FAILED" };
        say!(
            "vm-test {} ({}): {verdict}; booted in {}, whole VM {:.1} s",
            k.name,
            outcome.release,
            outcome
                .boot
                .map_or("never".into(), |b| format!("{:.1} s", b.as_secs_f64())),
            outcome.total.as_secs_f64()
        );
        for (name, ok, detail) in &outcome.checks {
            say!("  {} {name}: {detail}", if *ok { "pass" } else { "FAIL" });
        }
        for missing in CHECKS
            .iter()
            .filter(|c| !outcome.checks.iter().any(|(n, _, _)| n == *c))
        {
            say!("  FAIL {missing}: no result");
        }
        if let Some(problem) = &outcome.problem {
            say!("  FAIL: {problem}");
        }
    }
}

fn host_packages() -> Result<()> {
    let missing: Vec<&str> = HOST_PACKAGES
        .iter()
        .filter(|(_, file)| !Path::new(file).exists())
        .map(|(p, _)| *p)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    say!(
        "vm-test: installing {} (QEMU boots the kernels; cpio and busybox make the initramfs)",
        missing.join(", ")
    );
    setup::apt_install(&missing)
}

/// The private apt options of one suite: its own sources list, lists and cache under
/// target/vm-cache, so the system's apt configuration is neither used nor changed.
fn apt_options(dir: &Path) -> Vec<String> {
    [
        format!(
            "Dir::Etc::SourceList={}",
            dir.join("sources.list").display()
        ),
        "Dir::Etc::SourceParts=/nonexistent".into(),
        format!("Dir::State::Lists={}", dir.join("lists").display()),
        format!("Dir::Cache={}", dir.join("cache").display()),
        "Acquire::Languages=none".into(),
        "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false".into(),
        "Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false".into(),
        "Acquire::IndexTargets::deb::Contents-deb::DefaultEnabled=false".into(),
    ]
    .into_iter()
    .flat_map(|o| ["-o".to_string(), o])
    .collect()
}

/// The package `linux-image-amd64` depends on, from `apt-cache depends` output.
pub fn image_package(depends: &str) -> Option<String> {
    depends.lines().find_map(|l| {
        let dep = l.trim().strip_prefix("Depends: ")?;
        dep.starts_with("linux-image-")
            .then(|| dep.trim().to_string())
    })
}

/// The kernel's vmlinuz, from the cache or fetched from the Debian archive.
fn fetch_kernel(k: &Kernel) -> Result<PathBuf> {
    let dir = cache_dir().join(format!("kernel-{}", k.name));
    let vmlinuz = dir.join("vmlinuz");
    if vmlinuz.is_file() {
        return Ok(vmlinuz);
    }
    say!(
        "vm-test {}: fetching Debian {}'s kernel (once; cached in {})",
        k.name,
        k.suite,
        dir.display()
    );
    let apt = cache_dir().join(format!("apt-{}", k.suite));
    for sub in ["lists/partial", "cache/archives/partial"] {
        std::fs::create_dir_all(apt.join(sub))?;
    }
    std::fs::write(
        apt.join("sources.list"),
        format!("deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian {} main\n", k.suite),
    )?;
    let opts = apt_options(&apt);
    sys::run(sys::command("apt-get").args(&opts).arg("update"))
        .with_context(|| format!("apt-get update for Debian {}", k.suite))?;
    let depends = sys::output(
        sys::command("apt-cache")
            .args(&opts)
            .args(["depends", "linux-image-amd64"]),
    )
    .context("apt-cache depends linux-image-amd64")?;
    let package = image_package(&depends)
        .with_context(|| format!("no linux-image package in:\n{depends}"))?;
    let work = dir.join("work");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    sys::run(
        sys::command("apt-get")
            .args(&opts)
            .args(["download", &package])
            .current_dir(&work),
    )
    .with_context(|| format!("apt-get download {package}"))?;
    sys::run(sys::command("sh").current_dir(&work).args([
        "-c",
        "dpkg-deb --fsys-tarfile ./*.deb | tar -x --wildcards './boot/vmlinuz-*'",
    ]))
    .context("extracting vmlinuz")?;
    let boot = std::fs::read_dir(work.join("boot"))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .context("no vmlinuz in the package")?;
    std::fs::rename(&boot, &vmlinuz)?;
    std::fs::write(dir.join("package"), format!("{package}\n"))?;
    // Keep only vmlinuz: the package and the lists are 100+ MiB.
    std::fs::remove_dir_all(&work)?;
    let _ = std::fs::remove_dir_all(&apt);
    Ok(vmlinuz)
}

/// The shared libraries `ldd` names for `binary` (none for a static one).
pub fn libraries(ldd: &str) -> Vec<PathBuf> {
    ldd.lines()
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with('/')))
        .map(PathBuf::from)
        .collect()
}

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf
ip link set lo up
echo "+cpu +memory +io" > /sys/fs/cgroup/cgroup.subtree_control
echo "vm-boot $(uname -r) controllers: $(cat /sys/fs/cgroup/cgroup.subtree_control)"
/bin/vm-suite
echo "vm-suite-exit $?"
poweroff -f
"#;

/// target/vm-cache/initramfs.cpio: busybox, the binaries with their libraries, and /init.
fn initramfs(profile: &str) -> Result<PathBuf> {
    let root = cache_dir().join("initramfs");
    let _ = std::fs::remove_dir_all(&root);
    for dir in ["bin", "proc", "sys", "dev", "tmp"] {
        std::fs::create_dir_all(root.join(dir))?;
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).context("copying /bin/busybox")?;
    let built = cargo::target_dir().join(profile);
    for (name, in_vm) in BINARIES {
        let binary = built.join(name);
        std::fs::copy(&binary, root.join("bin").join(in_vm))
            .with_context(|| format!("copying {}", binary.display()))?;
        let ldd = sys::output(sys::command("ldd").arg(&binary)).unwrap_or_default();
        for lib in libraries(&ldd) {
            let to = root.join(lib.strip_prefix("/").unwrap_or(&lib));
            std::fs::create_dir_all(to.parent().expect("has a parent"))?;
            std::fs::copy(&lib, &to).with_context(|| format!("copying {}", lib.display()))?;
        }
    }
    let init = root.join("init");
    std::fs::write(&init, INIT)?;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&init, std::fs::Permissions::from_mode(0o755))?;
    let cpio = cache_dir().join("initramfs.cpio");
    sys::run(sys::command("sh").current_dir(&root).arg("-c").arg(format!(
        "find . | cpio --quiet -o -H newc > {}",
        cpio.display()
    )))?;
    std::fs::remove_dir_all(&root)?;
    Ok(cpio)
}

/// Boots `vmlinuz` with the initramfs, echoes the console, and reads the suite's lines.
fn boot(k: &Kernel, vmlinuz: &Path, initramfs: &Path) -> Result<Outcome> {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-nographic",
        "-no-reboot",
        "-m",
        "1024",
        "-smp",
        "2",
        "-accel",
        "tcg",
        "-nic",
        "none",
    ])
    .arg("-kernel")
    .arg(vmlinuz)
    .arg("-initrd")
    .arg(initramfs)
    .args(["-append", "console=ttyS0 panic=-1 quiet"])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    let start = Instant::now();
    let mut child = cmd.spawn().context("starting qemu-system-x86_64")?;
    let stdout = child.stdout.take().expect("piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut outcome = Outcome::default();
    let mut finished = false;
    loop {
        let left = VM_TIMEOUT.saturating_sub(start.elapsed());
        match rx.recv_timeout(left) {
            Ok(line) => {
                let line = line.trim_end_matches('\r');
                println!("  [{}] {line}", k.name);
                finished |= outcome.read_line(line, start.elapsed());
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                outcome.problem = Some(format!(
                    "the VM was still running after {} s and was killed",
                    VM_TIMEOUT.as_secs()
                ));
                break;
            }
        }
    }
    let status = child.wait()?;
    outcome.total = start.elapsed();
    if outcome.problem.is_none() && !finished {
        outcome.problem = Some(format!(
            "the VM ended ({status}) before the suite finished{}",
            if outcome.boot.is_none() {
                "; the init script never ran"
            } else {
                ""
            }
        ));
    }
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_are_selected_by_name() {
        assert_eq!(select("all").unwrap().len(), KERNELS.len());
        assert_eq!(select("6.1").unwrap()[0].suite, "bookworm");
        let err = select("4.19").unwrap_err().to_string();
        assert!(err.contains("5.10, 6.1, 6.12"), "{err}");
    }

    #[test]
    fn check_lines_are_read() {
        assert_eq!(
            parse_check(r#"{"check":"cpu","detail":"a \"b\" c","pass":true}"#),
            Some(("cpu".into(), true, r#"a "b" c"#.into()))
        );
        assert_eq!(
            parse_check(r#"{"check":"x","detail":"","pass":false}"#),
            Some(("x".into(), false, String::new()))
        );
        assert_eq!(parse_check(r#"{"check":"x","pass":maybe}"#), None);
    }

    #[test]
    fn a_kernel_passes_only_with_every_check() {
        let mut o = Outcome::default();
        assert!(!o.read_line(
            "\x1bc\x1b[2Jvm-boot 6.1.0-50-amd64 controllers: cpu io memory",
            Duration::from_secs(9)
        ));
        assert_eq!(o.release, "6.1.0-50-amd64");
        for c in CHECKS {
            o.read_line(
                &format!(r#"vm-check {{"check":"{c}","detail":"","pass":true}}"#),
                Duration::ZERO,
            );
        }
        assert!(o.read_line("vm-suite-exit 0", Duration::ZERO));
        assert!(o.passed());
        o.checks.pop();
        assert!(!o.passed(), "a check without a result fails");
    }

    #[test]
    fn the_image_package_is_the_dependency() {
        let out = "linux-image-amd64\n  Depends: linux-image-6.1.0-50-amd64\n";
        assert_eq!(
            image_package(out).as_deref(),
            Some("linux-image-6.1.0-50-amd64")
        );
        assert_eq!(image_package("linux-image-amd64\n"), None);
    }

    #[test]
    fn libraries_from_ldd() {
        let ldd = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x7f)\n\t/lib64/ld-linux-x86-64.so.2 (0x7f)\n";
        assert_eq!(
            libraries(ldd),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libgcc_s.so.1"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
        assert!(libraries("\tnot a dynamic executable\n").is_empty());
    }
}
