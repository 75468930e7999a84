//! The image as deployed: its size, the time from `docker run` (exactly as
//! deploy/ecs/task-definition.json says) to the programs attached and to /readyz, and observer's
//! RSS after a minute beside 10 real containers.

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use testbed::{
    docker::{self, Containers, Run},
    ecs_taskdef::{self, Overrides},
    fake_mackerel::FakeMackerel,
    host_bpffs::{self, HostBpffs},
    sh,
    state_dir::StateDir,
};

const TASK_DEFINITION: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../deploy/ecs/task-definition.json"
);
const IMAGE: &str = "registry.example.com/observer/observer:0.1.0";
const CONTAINERS: usize = 10;
const SETTLE: Duration = Duration::from_secs(60);
/// The manifest's interval is 60 s; ready (a first interval in) is measured at this one.
const INTERVAL: &str = "10s";

fn vm_rss_kib(pid: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")
}

/// Removes the observer container when dropped.
struct Observer(String);

impl Drop for Observer {
    fn drop(&mut self) {
        let _ = sh("docker", &["rm", "-f", &self.0]);
    }
}

pub fn deploy_cost() -> anyhow::Result<()> {
    println!();
    println!(
        "The image as deployed (deploy/ecs/task-definition.json, run by the local Docker engine)"
    );
    if let Some(why) = docker::unavailable() {
        println!("(skipped: {why})");
        return Ok(());
    }
    let size: u64 = sh(
        "docker",
        &["image", "inspect", "--format", "{{.Size}}", IMAGE],
    )
    .with_context(|| format!("{IMAGE} is missing: cargo xtask image builds it"))?
    .trim()
    .parse()?;
    println!(
        "  image {IMAGE}: {:.1} MiB",
        size as f64 / (1024.0 * 1024.0)
    );

    let mut containers = Containers::new();
    for i in 0..CONTAINERS {
        containers.start(
            Run::new()
                .name(&format!("obs-bench-deploy-{}-{i}", std::process::id()))
                .cmd(&["sleep", "3600"]),
        )?;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mackerel = rt.block_on(FakeMackerel::start("bench-key"));
    let task_def: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(TASK_DEFINITION)?)?;
    let name = format!("obs-bench-observer-{}", std::process::id());
    // Not the host's /var/lib/observer: a directory of the bench's own, removed afterwards.
    let state = StateDir::new("obs-bench-state")?;
    let run = ecs_taskdef::docker_run(
        &task_def,
        "observer",
        &Overrides {
            container_name: Some(name.clone()),
            env: vec![
                ("OBSERVER_PLATFORM".into(), "docker".into()),
                ("OBSERVER_INTERVAL".into(), INTERVAL.into()),
                ("MACKEREL_APIBASE".into(), mackerel.url()),
            ],
            secrets: [("MACKEREL_APIKEY".to_owned(), "bench-key".to_owned())].into(),
            ulimits: ecs_taskdef::memlock_this_engine_grants(&task_def, "observer"),
            volume_sources: [("observer-state".to_owned(), state.path())].into(),
            ..Overrides::default()
        },
    )?;
    let args = run.args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    // The task definition's bpffs volume is the host's /sys/fs/bpf: observer pins there, and
    // removing its container leaves the pins for the next one. The guard outlives the
    // container and removes them, with the bpffs if it mounted one.
    let observer_binary = std::env::current_exe()?.with_file_name("observer");
    let bpffs = HostBpffs::prepare(&observer_binary)?;
    let bpffs_mounted = bpffs.mounted();
    let started = Instant::now();
    sh("docker", &args)?;
    let observer = Observer(name);
    let mut attached = None;
    let mut ready = None;
    while ready.is_none() {
        if started.elapsed() > Duration::from_secs(60) {
            bail!(
                "observer not ready in 60 s:\n{}",
                sh("docker", &["logs", &observer.0]).unwrap_or_default()
            );
        }
        if attached.is_none() {
            let out = std::process::Command::new("docker")
                .args(["logs", &observer.0])
                .output()?;
            if String::from_utf8_lossy(&out.stderr).contains("attached") {
                attached = Some(started.elapsed());
            }
        }
        let readyz = rt.block_on(async {
            let r = reqwest::get("http://127.0.0.1:9435/readyz").await.ok()?;
            Some(r.status().as_u16())
        });
        if readyz == Some(200) {
            ready = Some(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let fmt = |d: Option<Duration>| d.map_or("-".into(), |d| format!("{:.2} s", d.as_secs_f64()));
    println!(
        "  docker run -> programs attached: {}; -> /readyz 200: {} (first interval of {INTERVAL} in)",
        fmt(attached),
        fmt(ready)
    );
    let pid = sh(
        "docker",
        &["inspect", "--format", "{{.State.Pid}}", &observer.0],
    )?
    .trim()
    .to_owned();
    let early = vm_rss_kib(&pid)?;
    std::thread::sleep(SETTLE.saturating_sub(started.elapsed()));
    let later = vm_rss_kib(&pid)?;
    println!(
        "  RSS with {CONTAINERS} containers: {:.1} MiB when ready, {:.1} MiB after {} s",
        early as f64 / 1024.0,
        later as f64 / 1024.0,
        started.elapsed().as_secs()
    );
    drop(observer);
    drop(bpffs);
    drop(containers);
    let left = host_bpffs::leftovers(bpffs_mounted);
    anyhow::ensure!(left.is_empty(), "left behind: {left:?}");
    Ok(())
}
