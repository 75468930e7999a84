//! One interval, one path, end to end through the real binary: an output that stalls or goes
//! away stops nothing else, SIGTERM reports the partial interval, and a metadata API that hangs
//! costs the interval at most one fetch timeout.
//!
//! The workload is an ECS-like task made with Docker alone: a busybox container with the ECS
//! agent's labels under `/ecs/<task id>`; observer runs with `--platform ecs` and an agent URL
//! where nothing answers, so the task comes from the Docker labels (the documented fallback).
//! Its traffic is ping to docker0's address: 84-byte IP packets, so byte counts are exact.

use std::{
    io::{BufRead as _, BufReader},
    net::{Ipv4Addr, TcpListener},
    os::fd::{FromRawFd as _, OwnedFd},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context as _};
use serde_json::Value;
use testbed::{
    docker::{self, skip_unless_docker, Containers, EcsLabels, Run},
    fake_mackerel::FakeMackerel,
    prometheus_server::free_port,
    ObserverCmd,
};

const OBSERVER: &str = env!("CARGO_BIN_EXE_observer-e2e");
const API_KEY: &str = "one-path-mackerel-key-51d2";
/// An ICMP echo request with ping's default 56-byte payload: IP 20 + ICMP 8 + 56.
const PING_BYTES: u64 = 84;

/// One ECS-like task of one container, from Docker labels.
struct Task {
    id: String,
    arn: String,
    container: String,
    _containers: Containers,
}

fn task(label: &str, cmd: &[&str]) -> anyhow::Result<Task> {
    // 32 hex digits, as new-format task ARNs end: this process, this test, now.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos() as u64;
    let id = format!("{:08x}{:08x}{nanos:016x}", std::process::id(), label.len());
    let arn = format!("arn:aws:ecs:us-east-1:123456789012:task/one-path/{id}");
    let mut containers = Containers::new();
    let name = testbed::unique(label);
    let container = containers.start(
        Run::new()
            .name(&name)
            .ecs(&EcsLabels {
                task_arn: &arn,
                container_name: "app",
                cluster: "one-path",
                family: "one-path",
                version: "1",
            })
            .cgroup_parent(&format!("/ecs/{id}"))
            .cmd(cmd),
    )?;
    Ok(Task {
        id,
        arn,
        container,
        _containers: containers,
    })
}

/// The flags every test here gives observer: the ECS platform from Docker labels.
fn ecs_args(interval: &str) -> Vec<String> {
    [
        "--platform",
        "ecs",
        // Nothing listens on port 1: the agent is "down", tasks come from Docker labels.
        "--ecs-agent-url",
        "http://127.0.0.1:1",
        "--interval",
        interval,
        // A Mackerel period per interval, so each interval's values reach it at once.
        "--mackerel-interval",
        interval,
        "--output",
        "json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn ping(container: &str, count: u32, to: Ipv4Addr) -> anyhow::Result<()> {
    testbed::sh(
        "docker",
        &[
            "exec",
            container,
            "ping",
            "-c",
            &count.to_string(),
            "-i",
            "0.2",
            "-q",
            &to.to_string(),
        ],
    )
    .map(drop)
}

/// The sum of `field` over the task lines of `task_id`.
fn task_sum(lines: &[Value], task_id: &str, field: &str) -> u64 {
    lines
        .iter()
        .filter(|l| l["type"] == "task" && l["id"] == task_id)
        .map(|l| l[field].as_u64().unwrap_or(0))
        .sum()
}

fn json_lines(stdout: &[String]) -> Vec<Value> {
    stdout
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The bytes Mackerel was told `host_arn`'s task sent: its `interface.*.txBytes.delta` values
/// are rates over whole Mackerel periods of `period`.
fn mackerel_tx_bytes(mackerel: &FakeMackerel, host_arn: &str, period: Duration) -> Option<f64> {
    let host = mackerel
        .hosts()
        .into_iter()
        .find(|h| h.custom_identifier.as_deref() == Some(host_arn))?;
    Some(mackerel.bytes_told(&host.id, ".txBytes.delta", period))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_interval_reports_the_partial_interval_everywhere() -> anyhow::Result<()> {
    const TEST: &str = "sigterm_mid_interval_reports_the_partial_interval_everywhere";
    if skip_unless_docker(TEST) {
        return Ok(());
    }
    let mackerel = FakeMackerel::start(API_KEY).await;
    let gateway = docker::bridge_address()?;
    let t = task("sigterm", &["sleep", "3600"])?;
    let mut args = ecs_args("3s");
    args.extend(["--mackerel-api-base".into(), mackerel.url()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut observer =
        ObserverCmd::start_with_env(OBSERVER, &args, &[("MACKEREL_APIKEY", API_KEY)])?;
    observer.wait_log("attached", Duration::from_secs(30))?;

    // A first batch in a whole interval, then a second batch in the interval SIGTERM cuts short.
    ping(&t.container, 10, gateway)?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !mackerel
        .hosts()
        .iter()
        .any(|h| h.custom_identifier.as_deref() == Some(&t.arn))
    {
        ensure!(Instant::now() < deadline, "no Mackerel host for the task");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Wait for an interval to end (Mackerel got a point), then send and stop within the next.
    let points = mackerel.points().len();
    while mackerel.points().len() == points {
        ensure!(Instant::now() < deadline, "no further Mackerel points");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cut = Instant::now();
    ping(&t.container, 5, gateway)?;
    observer.signal(libc::SIGTERM);
    let in_interval = cut.elapsed();
    let done = observer.finish(Duration::from_secs(20))?;
    ensure!(
        done.status.success(),
        "observer exited with {}:\n{}",
        done.status,
        done.log
    );
    ensure!(
        in_interval < Duration::from_millis(2500),
        "SIGTERM came {in_interval:?} into a 3 s interval, not in its middle"
    );

    let lines = json_lines(&done.stdout);
    let sent = 15 * PING_BYTES;
    let json_tx = task_sum(&lines, &t.id, "tx_bytes");
    let last = lines
        .iter()
        .rev()
        .find(|l| l["type"] == "observer")
        .context("no observer line")?;
    let last_interval = last["interval_seconds"].as_f64().unwrap_or(0.0);
    eprintln!("sent {sent} B; JSON {json_tx} B; last interval {last_interval:.2} s");
    ensure!(
        json_tx == sent,
        "the JSON task lines add up to {json_tx} bytes, not the {sent} sent:\n{}",
        done.log
    );
    ensure!(
        last_interval < 2.9,
        "the last interval ({last_interval} s) is not the partial one"
    );
    let told = mackerel_tx_bytes(&mackerel, &t.arn, Duration::from_secs(3))
        .context("no Mackerel host for the task")?;
    eprintln!("Mackerel: {told:.1} B");
    ensure!(
        (told - sent as f64).abs() < 1.0,
        "Mackerel was told {told:.1} bytes, not the {sent} sent"
    );
    ensure!(!done.log.contains(API_KEY), "the API key is in the log");
    Ok(())
}

/// observer with stdout a pipe nobody reads; stderr read by a thread.
struct Stalled {
    child: Child,
    // Held open and never read: the pipe fills and writes block.
    _unread: OwnedFd,
    log: mpsc::Receiver<String>,
}

impl Stalled {
    fn start(args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let mut fds = [0; 2];
        // SAFETY: a valid out-array of two fds.
        ensure!(unsafe { libc::pipe(fds.as_mut_ptr()) } == 0, "pipe failed");
        // SAFETY: both fds were just made and are owned here alone.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let mut child = Command::new(OBSERVER)
            .args(args)
            .envs(env.iter().copied())
            .env("OBSERVER_NO_PIN", "true")
            .env("RUST_LOG", "info")
            .stdout(Stdio::from(write))
            .stderr(Stdio::piped())
            .spawn()?;
        let stderr = child.stderr.take().expect("piped");
        let (tx, log) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Self {
            child,
            _unread: read,
            log,
        })
    }

    fn log(&self) -> String {
        self.log.try_iter().collect::<Vec<_>>().join("\n")
    }
}

impl Drop for Stalled {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The first sample of `series` (name with labels, exactly) in a text exposition.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stdout_nobody_reads_stalls_nothing_else() -> anyhow::Result<()> {
    const TEST: &str = "a_stdout_nobody_reads_stalls_nothing_else";
    if skip_unless_docker(TEST) {
        return Ok(());
    }
    let mackerel = FakeMackerel::start(API_KEY).await;
    let gateway = docker::bridge_address()?.to_string();
    let t = task("stalled", &["ping", "-i", "0.2", "-q", &gateway])?;
    let port = free_port()?;
    let listen = format!("127.0.0.1:{port}");
    let mut args = ecs_args("1s");
    args.extend([
        "--prometheus-listen".into(),
        listen.clone(),
        "--mackerel-api-base".into(),
        mackerel.url(),
        "--shutdown-timeout".into(),
        "2s".into(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut observer = Stalled::start(&args, &[("MACKEREL_APIKEY", API_KEY)])?;

    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(1))
        .build()?;
    let get = |path: &str| {
        let request = client.get(format!("http://{listen}{path}"));
        async move {
            let started = Instant::now();
            let response = request.send().await?;
            let status = response.status().as_u16();
            let body = response.text().await?;
            anyhow::Ok((status, body, started.elapsed()))
        }
    };
    // Up and measuring.
    let start = Instant::now();
    loop {
        if let Ok((200, body, _)) = get("/readyz").await {
            eprintln!("ready: {}", body.trim());
            break;
        }
        ensure!(
            start.elapsed() < Duration::from_secs(30),
            "never ready:\n{}",
            observer.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let started = Instant::now();
    let mut first_cycles = None;
    let mut slowest = Duration::ZERO;
    let mut probes = 0;
    let mut text = String::new();
    while started.elapsed() < Duration::from_secs(30) {
        for path in ["/healthz", "/metrics"] {
            let (status, body, took) = get(path)
                .await
                .with_context(|| format!("{path} did not answer within 1 s"))?;
            ensure!(status == 200, "{path} answered {status}: {body}");
            slowest = slowest.max(took);
            probes += 1;
            if path == "/metrics" {
                first_cycles.get_or_insert(sample(&body, "observer_cycles_total").unwrap_or(0.0));
                text = body;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let cycles =
        sample(&text, "observer_cycles_total").unwrap_or(0.0) - first_cycles.unwrap_or(0.0);
    let dropped = sample(&text, r#"observer_sink_dropped_total{sink="json"}"#).unwrap_or(0.0);
    let recent = mackerel
        .points()
        .iter()
        .filter(|p| p.at.elapsed() < Duration::from_secs(5))
        .count();
    eprintln!(
        "30 s with stdout unread: {probes} probes, slowest {slowest:?}; {cycles} cycles; \
         json dropped {dropped}; {recent} Mackerel points in the last 5 s"
    );
    ensure!(
        cycles >= 25.0,
        "only {cycles} cycles in 30 s at a 1 s interval"
    );
    ensure!(
        dropped > 0.0,
        "stdout never filled: nothing dropped for json"
    );
    ensure!(recent > 0, "Mackerel stopped receiving");
    ensure!(
        mackerel
            .hosts()
            .iter()
            .any(|h| h.custom_identifier.as_deref() == Some(&t.arn)),
        "no host for the task"
    );

    // The stuck output cannot hold the exit beyond --shutdown-timeout.
    // SAFETY: signalling our own child.
    unsafe { libc::kill(observer.child.id() as i32, libc::SIGTERM) };
    let stop = Instant::now();
    let status = loop {
        if let Some(status) = observer.child.try_wait()? {
            break status;
        }
        ensure!(
            stop.elapsed() < Duration::from_secs(10),
            "still running 10 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let log = observer.log();
    eprintln!("exited {status} {:?} after SIGTERM", stop.elapsed());
    ensure!(status.success(), "exit {status}:\n{log}");
    ensure!(log.contains("json output did not finish"), "{log}");
    Ok(())
}

#[test]
fn observer_piped_into_head_ends_promptly() -> anyhow::Result<()> {
    if testbed::skip_unless_root("observer_piped_into_head_ends_promptly") {
        return Ok(());
    }
    let started = Instant::now();
    let mut child = Command::new("bash")
        .env("OBSERVER_NO_PIN", "true")
        .args([
            "-c",
            r#""$0" --platform none --interval 1s --output json | head -n 1; echo "observer=${PIPESTATUS[0]}""#,
            OBSERVER,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            anyhow::bail!("observer | head -n 1 still running after 20 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("ended in {:?}: {stdout}", started.elapsed());
    ensure!(status.success(), "bash: {status}\n{stderr}");
    let mut lines = stdout.lines();
    let first: Value = serde_json::from_str(lines.next().unwrap_or(""))
        .with_context(|| format!("not a JSON line: {stdout}"))?;
    ensure!(first["type"].is_string(), "{first}");
    let code = lines.next().unwrap_or("");
    ensure!(
        code == "observer=0" || code == "observer=141",
        "observer ended with {code:?}\n{stderr}"
    );
    ensure!(
        stderr.matches("its reader is gone").count() == 1,
        "one line about the closed stdout:\n{stderr}"
    );
    ensure!(
        started.elapsed() < Duration::from_secs(8),
        "took {:?}",
        started.elapsed()
    );
    Ok(())
}

#[test]
fn a_metadata_api_that_hangs_costs_an_interval_one_fetch_timeout_at_most() -> anyhow::Result<()> {
    const TEST: &str = "a_metadata_api_that_hangs_costs_an_interval_one_fetch_timeout_at_most";
    if skip_unless_docker(TEST) {
        return Ok(());
    }
    // Accepts connections and never answers.
    let hung = TcpListener::bind("127.0.0.1:0")?;
    let url = format!("http://{}", hung.local_addr()?);
    let held = std::thread::spawn(move || {
        let mut open = Vec::new();
        for stream in hung.incoming().map_while(Result::ok) {
            open.push(stream);
            if open.len() > 100 {
                break;
            }
        }
    });
    let mut observer = ObserverCmd::start(
        OBSERVER,
        &[
            "--platform",
            "ecs",
            "--ecs-agent-url",
            &url,
            "--interval",
            "1s",
            "--output",
            "json",
        ],
    )?;
    observer.wait_log("attached", Duration::from_secs(30))?;
    std::thread::sleep(Duration::from_secs(8));
    observer.signal(libc::SIGTERM);
    let done = observer.finish(Duration::from_secs(20))?;
    drop(held);
    ensure!(done.status.success(), "{}", done.log);
    let lines = json_lines(&done.stdout);
    let intervals: Vec<f64> = lines
        .iter()
        .filter(|l| l["type"] == "observer")
        .filter_map(|l| l["interval_seconds"].as_f64())
        .collect();
    eprintln!("intervals with a hanging agent: {intervals:.2?}");
    ensure!(
        intervals.len() >= 5,
        "only {} intervals in 8 s",
        intervals.len()
    );
    // The fetch timeout at a 1 s interval is 1 s (half the interval, at least 1 s): an
    // interval may be late by that, never by more, and never by a second fetch.
    let worst = intervals.iter().cloned().fold(0.0, f64::max);
    ensure!(
        worst < 2.5,
        "an interval took {worst:.2} s with a 1 s fetch timeout"
    );
    Ok(())
}
