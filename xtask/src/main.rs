//! `cargo xtask`: set-up, build, run, test and bench for the observer workspace.

mod cargo;
mod deploy_check;
mod image;
mod setup;
mod sys;
mod tally;
mod vm;

use std::os::unix::process::CommandExt as _;

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

use crate::sys::say;

/// Development tasks for the observer: each one first installs what it needs.
#[derive(Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building needs (rust-src, llvm-22-dev, bpf-linker); checks first, safe to repeat.
    Setup {
        /// Also install the test tools (bpftool, iproute2, docker.io, busybox-static, iptables,
        /// prometheus) and make sure a Docker engine answers, starting dockerd if needed.
        #[arg(long)]
        for_tests: bool,
    },
    /// Set up, then build the observer (its build script builds the eBPF programs).
    Build {
        /// Build with the release profile.
        #[arg(long)]
        release: bool,
    },
    /// Set up, build (release unless --debug), then run the observer: `cargo xtask run -- ARGS`.
    Run {
        /// Build and run the debug profile instead of release.
        #[arg(long)]
        debug: bool,
        /// Arguments for the observer, after `--`.
        #[arg(last = true, value_name = "OBSERVER_ARGS")]
        args: Vec<String>,
    },
    /// Set up for tests, then run the unit tests and the root-only integration tests.
    Test {
        /// First reproduce a machine where Docker never ran: stop dockerd, move /var/lib/docker
        /// aside (the path is printed), delete docker0, then let set-up start a new engine.
        /// Catches tests that rely on state a warm engine has and a fresh one lacks.
        #[arg(long)]
        fresh_docker: bool,
        /// Extra arguments for the integration test binaries, after `--` (a name filter,
        /// --nocapture, ...).
        #[arg(last = true, value_name = "TEST_ARGS")]
        args: Vec<String>,
    },
    /// Build observer's container image (a static binary on scratch) into the local Docker
    /// engine, tagged with the reference the manifests in deploy/ use; prints its size.
    Image {
        /// Only build the static binary (target/image/observer): the Dockerfile's build stage.
        #[arg(long)]
        binary_only: bool,
    },
    /// Validate deploy/ offline (ECS task definition, CloudFormation, Kubernetes manifests) with
    /// pinned validators in a venv under target/; `test` runs this too.
    CheckDeploy,
    /// Boot the kernels operators run (Debian's 5.10, 6.1, 6.12) in QEMU with pure cgroup v2
    /// and run the in-VM suite (tests/src/bin/vm-suite.rs) in each; reports per kernel. The
    /// kernels are fetched from the Debian archive once and cached in target/vm-cache.
    VmTest {
        /// Which kernel: 5.10, 6.1, 6.12 or all.
        #[arg(long, default_value = "all")]
        kernel: String,
        /// Put the debug builds into the VM (what `test` does, reusing its builds) instead of
        /// release ones.
        #[arg(long)]
        debug: bool,
    },
    /// Set up for tests, then run the observer-bench binary (release): `cargo xtask bench -- ARGS`.
    Bench {
        /// Arguments for observer-bench, after `--`.
        #[arg(last = true, value_name = "BENCH_ARGS")]
        args: Vec<String>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Task::Setup { for_tests } => setup::setup(for_tests),
        Task::Build { release } => build(release),
        Task::Run { debug, args } => run(!debug, &args),
        Task::Test { fresh_docker, args } => {
            if fresh_docker {
                setup::fresh_docker()?;
            }
            test(&args)
        }
        Task::Image { binary_only } => image::image(binary_only),
        Task::CheckDeploy => deploy_check::check_deploy(),
        Task::Bench { args } => bench(&args),
        Task::VmTest { kernel, debug } => {
            setup::setup(false)?;
            vm::vm_test(&kernel, !debug)
        }
    }
}

fn build(release: bool) -> Result<()> {
    setup::setup(false)?;
    let mut cmd = cargo::cargo(["build", "--package", "observer"]);
    if release {
        cmd.arg("--release");
    }
    sys::run(&mut cmd).context("building the observer")
}

fn run(release: bool, args: &[String]) -> Result<()> {
    build(release)?;
    let binary = cargo::observer_binary(release);
    let mut cmd = sys::command(&binary);
    cmd.args(args);
    // Replace xtask with the observer: it gets the terminal's signals (Ctrl-C) directly and
    // its exit status becomes ours.
    let err = cmd.exec();
    Err(err).with_context(|| format!("cannot run {}", binary.display()))
}

/// Where the integration tests append the tests they skipped (tests/src/lib.rs `skip`).
const SKIP_LOG_ENV: &str = "OBSERVER_TEST_SKIP_LOG";

fn test(args: &[String]) -> Result<()> {
    setup::setup(true)?;
    let skip_log = cargo::target_dir().join("observer-test-skips.log");
    std::fs::create_dir_all(cargo::target_dir()).context("creating the target directory")?;
    // A fresh log per run: only this run's skips count.
    let _ = std::fs::remove_file(&skip_log);
    let mut total = tally::Tally::default();
    let (unit, counted) = tally::run_counting(&mut cargo::cargo([
        "test",
        "--no-fail-fast",
        "--package",
        "observer-common",
        "--package",
        "observer",
        "--package",
        "xtask",
    ]));
    total.add(counted);
    if let Err(e) = &unit {
        say!("unit tests failed: {e:#}");
    }
    // The deploy manifests' checks count as one test of their own.
    let deploy = deploy_check::check_deploy();
    if deploy.is_ok() {
        total.passed += 1;
    } else {
        total.failed += 1;
    }
    // The deploy tests run the image as the manifests say: build it first, as operators would.
    let image = image::image(false);
    if let Err(e) = &image {
        say!("building the image failed: {e:#}");
        total.failed += 1;
    }
    let integration = if cargo::has_tests_package() {
        let mut cmd = cargo::cargo([
            "test",
            "--no-fail-fast",
            "--package",
            "observer-tests",
            "--",
            "--test-threads=2",
        ]);
        cmd.args(args)
            .env(SKIP_LOG_ENV, &skip_log)
            .env("OBSERVER_TEST_IMAGE", image::IMAGE);
        let (result, counted) = tally::run_counting(&mut cmd);
        total.add(counted);
        if let Err(e) = &result {
            say!("integration tests failed: {e:#}");
        }
        Some(result)
    } else {
        say!("integration tests: skipped, tests/Cargo.toml (package observer-tests) does not exist yet");
        None
    };
    let mut skips = tally::read_skips(&std::fs::read_to_string(&skip_log).unwrap_or_default());
    // A skipped test returned early, so libtest counted it as passed: move it to skipped.
    total.passed = total.passed.saturating_sub(skips.len() as u64);
    // The kernels operators run, each in a VM with pure cgroup v2 (this host has one kernel
    // and hybrid cgroups): one test per kernel, after the integration tests, whose debug
    // builds go into the VM.
    let vms = if has_name_filter(args) {
        say!("vm-test: not run, a test name filter was given (run it alone: cargo xtask vm-test)");
        Ok(())
    } else {
        vm_tests(&mut total, &mut skips)
    };
    for (name, why) in &skips {
        say!("skipped {name}: {why}");
    }
    let verdict = |r: &Result<()>| if r.is_ok() { "passed" } else { "FAILED" };
    say!(
        "test summary: unit tests {}, deploy check {}, integration tests {}, kernels in VMs {}",
        verdict(&unit),
        verdict(&deploy),
        integration.as_ref().map_or("skipped", verdict),
        verdict(&vms)
    );
    // One plain closing line that counts every test run, whatever cargo printed last.
    println!(
        "tests: {} passed, {} failed, {} skipped (not run here), {} ignored",
        total.passed,
        total.failed,
        skips.len(),
        total.ignored
    );
    if unit.is_err()
        || deploy.is_err()
        || image.is_err()
        || vms.is_err()
        || integration.is_some_and(|r| r.is_err())
    {
        bail!("some tests failed");
    }
    Ok(())
}

/// True when the extra test arguments hold a test name filter (not only flags).
fn has_name_filter(args: &[String]) -> bool {
    args.iter().any(|a| !a.starts_with('-'))
}

/// True when the environment says this is CI (as tests/src/lib.rs `in_ci` reads it).
fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !matches!(v.trim(), "" | "0" | "false"))
}

/// `vm-test --kernel all` as part of `test`: a kernel that ran counts passed or failed; one
/// whose VM could not be set up or started is a skip, except under CI, where it fails.
fn vm_tests(
    total: &mut tally::Tally,
    skips: &mut std::collections::BTreeMap<String, String>,
) -> Result<()> {
    let results = match vm::run(vm::KERNELS, false) {
        Ok(results) => results,
        Err(e) => {
            total.failed += 1;
            return Err(e.context("building what goes into the VMs"));
        }
    };
    let mut failed = false;
    for (k, outcome) in results {
        let name = format!("vm_test_kernel_{}", k.name);
        match outcome {
            Ok(o) if o.passed() => total.passed += 1,
            Ok(_) => {
                total.failed += 1;
                failed = true;
            }
            Err(e) if in_ci() => {
                say!("{name}: the VM could not run, and under CI that fails: {e:#}");
                total.failed += 1;
                failed = true;
            }
            Err(e) => {
                skips.insert(name, format!("the VM could not run: {e:#}"));
            }
        }
    }
    if failed {
        bail!("the VM suite failed on some kernels");
    }
    Ok(())
}

fn bench(args: &[String]) -> Result<()> {
    setup::setup(true)?;
    if !cargo::has_tests_package() {
        bail!("tests/Cargo.toml (package observer-tests, which holds observer-bench) does not exist yet");
    }
    // The bench runs release binaries beside itself (trafficgen, the observer): build them
    // all first, so a clean clone needs nothing else.
    sys::run(&mut cargo::cargo([
        "build",
        "--release",
        "--package",
        "observer",
        "--package",
        "observer-tests",
        "--bins",
    ]))
    .context("building the bench and the binaries it runs")?;
    // The deploy section runs the image as the ECS task definition says.
    image::image(false).context("building the image the bench runs")?;
    let bench = cargo::target_dir().join("release").join("observer-bench");
    let mut cmd = sys::command(&bench);
    cmd.current_dir(cargo::workspace_root()).args(args);
    sys::run(&mut cmd).with_context(|| format!("running {}", bench.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_passes_everything_after_the_separator() {
        let cli =
            Cli::try_parse_from(["xtask", "run", "--debug", "--", "--interval", "2s"]).unwrap();
        match cli.command {
            Task::Run { debug, args } => {
                assert!(debug);
                assert_eq!(args, ["--interval", "2s"]);
            }
            _ => panic!("not run"),
        }
    }

    #[test]
    fn only_a_name_filter_holds_the_vms_back() {
        assert!(!has_name_filter(&[]));
        assert!(!has_name_filter(&["--nocapture".into()]));
        assert!(has_name_filter(&["restart".into(), "--nocapture".into()]));
    }

    #[test]
    fn test_takes_extra_arguments() {
        let cli = Cli::try_parse_from(["xtask", "test", "--", "cpu", "--nocapture"]).unwrap();
        assert!(
            matches!(cli.command, Task::Test { fresh_docker: false, args } if args == ["cpu", "--nocapture"])
        );
        let cli = Cli::try_parse_from(["xtask", "test", "--fresh-docker"]).unwrap();
        assert!(matches!(
            cli.command,
            Task::Test {
                fresh_docker: true,
                ..
            }
        ));
        let cli = Cli::try_parse_from(["xtask", "setup", "--for-tests"]).unwrap();
        assert!(matches!(cli.command, Task::Setup { for_tests: true }));
    }
}
