//! The Prometheus endpoint end to end: the observer command (`--platform docker
//! --prometheus-listen`) counting real kernel traffic of real Docker containers, scraped by a
//! real Prometheus server (Debian package `prometheus`) whose HTTP API the tests query.
//!
//! A busybox container on the default bridge downloads a body of known size from, and uploads
//! a file of known size to, a small HTTP server this test process runs on the bridge's
//! gateway address; its counters in Prometheus must match the payloads (plus what TCP resent,
//! which crosses the wire twice) within 2 %: IP and TCP headers and the HTTP heads are the
//! overhead. Then: series of a removed container leave /metrics, label values with quotes,
//! backslashes, newlines and UTF-8 are escaped, and traffic at a container's very start is
//! its own.
//!
//! Needs root, a running dockerd (`cargo xtask setup --for-tests`) and, for the tests that
//! start Prometheus or promtool, the `prometheus` package; each test says SKIPPED otherwise.
//! Every container, server, temporary directory and the observer process are removed by
//! guards, also when a test fails.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _};
use serde_json::Value;
use testbed::{
    docker::{self, skip_unless_docker, Containers, Run},
    observer_cmd::Finished,
    prometheus_server::{
        close, escape_label_value, free_port, get, promtool_check, sample, scrape,
        skip_unless_prometheus, PrometheusServer,
    },
    sh, unique, ObserverCmd,
};

const OBSERVER: &str = env!("CARGO_BIN_EXE_observer-e2e");
const ATTACHED: &str = "attached count_ingress";
const INTERVAL: Duration = Duration::from_secs(1);
/// Bytes of the body the container downloads.
const DOWNLOAD: u64 = 4_000_000;
/// Bytes of the file the container uploads (not DOWNLOAD: swapped directions would show).
const UPLOAD: u64 = 3_000_000;
/// Payload bytes of a full TCP segment on Docker's bridge (MTU 1500, timestamps on): what a
/// retransmitted segment of RetransSegs stands for.
const MSS: u64 = 1448;

// ---------------------------------------------------------------------------------------
// observer, Docker and HTTP helpers
// ---------------------------------------------------------------------------------------

/// observer with `--platform docker --interval 1s --output json --prometheus-listen`, once its
/// programs are attached and its endpoint serves. Killed on drop (ObserverCmd's guard).
struct Observer {
    cmd: ObserverCmd,
    addr: SocketAddr,
}

impl Observer {
    fn start() -> anyhow::Result<Self> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
            let listen = addr.to_string();
            let mut cmd = ObserverCmd::start(
                OBSERVER,
                &[
                    "--platform",
                    "docker",
                    "--interval",
                    "1s",
                    "--output",
                    "json",
                    "--prometheus-listen",
                    &listen,
                ],
            )?;
            let ready = cmd
                .wait_log(ATTACHED, Duration::from_secs(30))
                .and_then(|_| {
                    cmd.wait_log(
                        &format!("Prometheus metrics at http://{listen}/metrics"),
                        Duration::from_secs(10),
                    )
                });
            match ready {
                Ok(_) => return Ok(Self { cmd, addr }),
                // The free port was taken before observer bound it: choose another.
                Err(_) if attempt < 3 && cmd.log.iter().any(|l| l.contains("in use")) => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Scrapes /metrics until `ok` holds; the text that satisfied it.
    async fn wait_metrics(
        &self,
        what: &str,
        within: Duration,
        ok: impl Fn(&str) -> bool,
    ) -> anyhow::Result<String> {
        let deadline = Instant::now() + within;
        loop {
            let text = scrape(self.addr).await?;
            if ok(&text) {
                return Ok(text);
            }
            if Instant::now() > deadline {
                bail!(
                    "/metrics never showed {what} within {within:?}; last scrape:\n{text}\n\
                     observer log:\n{}",
                    self.cmd.log.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// SIGTERM, then its exit, stdout and log.
    fn stop(self) -> anyhow::Result<Finished> {
        self.cmd.signal(libc::SIGTERM);
        let done = self.cmd.finish(Duration::from_secs(20))?;
        ensure!(
            done.status.success(),
            "observer exited with {}:\n{}",
            done.status,
            done.log
        );
        ensure!(!done.log.contains("panicked"), "{}", done.log);
        Ok(done)
    }
}

/// `docker exec <container> <cmd>`; fails with its stderr.
fn docker_exec(container: &str, cmd: &[&str]) -> anyhow::Result<String> {
    let mut args = vec!["exec", container];
    args.extend_from_slice(cmd);
    sh("docker", &args)
}

/// What the HTTP server did.
#[derive(Debug, Clone, Default)]
struct Served {
    /// Request lines, in order.
    requests: Vec<String>,
    /// Body bytes sent in answers to GET.
    sent: u64,
    /// Body bytes read from POST requests.
    received: u64,
    /// Body bytes TCP sent again in answers to GET (tcpi_bytes_retrans): the receiver
    /// counts them twice, as it should.
    resent: u64,
    /// The same, per GET request line.
    resent_by_request: Vec<(String, u64)>,
    errors: Vec<String>,
}

/// A one-connection-at-a-time HTTP/1.1 server: GET answers a body of `download` zero bytes
/// with its Content-Length; POST reads the request's Content-Length bytes and answers an empty
/// 200. Stopped (and its thread joined) on drop.
struct HttpServer {
    addr: SocketAddr,
    served: Arc<Mutex<Served>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl HttpServer {
    fn start(ip: Ipv4Addr, download: u64) -> anyhow::Result<Self> {
        let listener = TcpListener::bind((ip, 0)).with_context(|| format!("binding {ip}:0"))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let served = Arc::new(Mutex::new(Served::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (served, stop) = (served.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            if let Err(e) = answer(stream, download, &served) {
                                lock(&served).errors.push(e.to_string());
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        Err(e) => lock(&served).errors.push(format!("accept: {e}")),
                    }
                }
            })
        };
        Ok(Self {
            addr,
            served,
            stop,
            thread: Some(thread),
        })
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn served(&self) -> Served {
        lock(&self.served).clone()
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn lock(served: &Mutex<Served>) -> std::sync::MutexGuard<'_, Served> {
    served.lock().unwrap_or_else(|e| e.into_inner())
}

/// Serves one request on `stream`.
fn answer(stream: TcpStream, download: u64, served: &Mutex<Served>) -> anyhow::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    stream.set_write_timeout(Some(Duration::from_secs(20)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request = String::new();
    reader.read_line(&mut request)?;
    let request = request.trim_end().to_owned();
    let mut content_length = 0u64;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 {
            bail!("{request}: the connection closed within the head");
        }
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                content_length = value.trim().parse().context("Content-Length")?;
            }
        }
    }
    lock(served).requests.push(request.clone());
    let mut out = stream;
    if request.starts_with("GET ") {
        write!(
            out,
            "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\
             Content-Length: {download}\r\nConnection: close\r\n\r\n"
        )?;
        let chunk = vec![0u8; 64 * 1024];
        let mut left = download;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            out.write_all(&chunk[..n])?;
            left -= n as u64;
        }
        out.flush()?;
        lock(served).sent += download;
    } else if request.starts_with("POST ") {
        let got = std::io::copy(
            &mut reader.by_ref().take(content_length),
            &mut std::io::sink(),
        )?;
        ensure!(
            got == content_length,
            "{request}: {got} of {content_length} body bytes"
        );
        lock(served).received += got;
        out.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
    } else {
        out.write_all(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")?;
        bail!("unexpected request {request:?}");
    }
    // Half-close and wait for the client's close, so every byte is delivered before we go.
    let _ = out.shutdown(std::net::Shutdown::Write);
    let _ = std::io::copy(&mut reader, &mut std::io::sink());
    if request.starts_with("GET ") {
        let (sent, resent) = tcp_bytes_sent_and_retransmitted(&out)?;
        ensure!(
            sent >= download,
            "{request}: TCP_INFO says {sent} bytes sent"
        );
        let mut served = lock(served);
        served.resent += resent;
        served.resent_by_request.push((request, resent));
    }
    Ok(())
}

/// `tcpi_bytes_sent` and `tcpi_bytes_retrans` of `stream`'s TCP_INFO (Linux 4.19 and later;
/// libc's `tcp_info` stops before them).
fn tcp_bytes_sent_and_retransmitted(stream: &TcpStream) -> anyhow::Result<(u64, u64)> {
    // Offsets in the kernel's struct tcp_info (include/uapi/linux/tcp.h).
    const BYTES_SENT: usize = 200;
    const BYTES_RETRANS: usize = 208;
    let mut info = [0u8; 512];
    let mut len = info.len() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `info` and says how many.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("TCP_INFO");
    }
    ensure!(
        len as usize >= BYTES_RETRANS + 8,
        "TCP_INFO of {len} bytes: kernel too old"
    );
    let at =
        |offset: usize| u64::from_ne_bytes(info[offset..offset + 8].try_into().expect("8 bytes"));
    Ok((at(BYTES_SENT), at(BYTES_RETRANS)))
}

/// TCP segments retransmitted in the network namespace of process `pid` (RetransSegs of its
/// /proc/<pid>/net/snmp).
fn retransmitted_segments(pid: u32) -> anyhow::Result<u64> {
    let snmp = std::fs::read_to_string(format!("/proc/{pid}/net/snmp"))?;
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (tcp.next(), tcp.next());
    let (Some(names), Some(values)) = (names, values) else {
        bail!("no Tcp lines in /proc/{pid}/net/snmp");
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == "RetransSegs")
        .context("no RetransSegs")?
        .1
        .parse()
        .context("RetransSegs")
}

/// The main process of a running container, as the host sees it.
fn container_pid(container: &str) -> anyhow::Result<u32> {
    let pid = sh(
        "docker",
        &["inspect", "--format", "{{.State.Pid}}", container],
    )?;
    pid.trim()
        .parse()
        .with_context(|| format!("pid of {container}: {pid:?}"))
}

/// `observer_<scope>_network_<direction>_bytes_total{<labels>,interface_class="<class>"}`.
fn bytes_series(scope: &str, direction: &str, labels: &str, class: &str) -> String {
    format!(
        r#"observer_{scope}_network_{direction}_bytes_total{{{labels},interface_class="{class}"}}"#
    )
}

/// Sums `field` of the JSON `task` lines of `name` (a lone container is its own task).
fn json_task_sum(stdout: &[String], name: &str, field: &str) -> u64 {
    stdout
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["type"] == "task" && l["name"] == name)
        .map(|l| l[field].as_u64().unwrap_or(0))
        .sum()
}

fn percent_off(actual: f64, expected: u64) -> f64 {
    (actual - expected as f64) / expected as f64 * 100.0
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

/// Known kernel-counted traffic of a container reaches a real Prometheus within 2 %;
/// promtool accepts the live exposition; the probes answer 200 while observer runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_containers_known_traffic_reaches_a_real_prometheus() -> anyhow::Result<()> {
    const TEST: &str = "a_containers_known_traffic_reaches_a_real_prometheus";
    if skip_unless_docker(TEST) {
        return Ok(());
    }
    let Some(tools) = skip_unless_prometheus(TEST) else {
        return Ok(());
    };
    let observer = Observer::start()?;
    let http = HttpServer::start(docker::bridge_address()?, DOWNLOAD)?;
    let mut containers = Containers::new();
    let name = unique("obs-prom");
    containers.start(Run::new().name(&name).network("bridge"))?;

    let lone = format!(r#"container="{name}""#);
    let rx = bytes_series("container", "receive", &lone, "device");
    // Known to observer before it sends a byte, so every byte is its own in any interval (the
    // last test covers traffic from the very start).
    observer
        .wait_metrics(&rx, Duration::from_secs(20), |t| sample(t, &rx).is_some())
        .await?;
    let server = PrometheusServer::start(&tools.prometheus, observer.addr)?;
    server.wait_until_up(Duration::from_secs(60)).await?;

    // Not zeros: busybox wget reads --post-file as a C string.
    docker_exec(
        &name,
        &[
            "sh",
            "-c",
            &format!("head -c {UPLOAD} /dev/zero | tr '\\0' u > /tmp/upload"),
        ],
    )?;
    let pid = container_pid(&name)?;
    docker_exec(
        &name,
        &["wget", "-q", "-O", "/dev/null", &http.url("/download")],
    )?;
    let segments_before = retransmitted_segments(pid)?;
    docker_exec(
        &name,
        &[
            "wget",
            "-q",
            "-O",
            "/dev/null",
            "--post-file",
            "/tmp/upload",
            &http.url("/upload"),
        ],
    )?;
    let upload_resent = (retransmitted_segments(pid)? - segments_before) * MSS;
    let served = http.served();
    assert!(served.errors.is_empty(), "HTTP server: {served:?}");
    assert_eq!(
        (served.sent, served.received),
        (DOWNLOAD, UPLOAD),
        "{served:?}"
    );
    // A segment TCP sends again crosses the wire again, and is counted again: on a busy
    // machine a spurious retransmission (or tail loss probe) of a 64 KiB GSO segment is 1.6 %
    // of 4 MB. Whatever was resent is part of what must be counted.
    let download_resent = served.resent;
    // The transfer is done: two intervals to count it, then Prometheus' next scrape.
    tokio::time::sleep(INTERVAL * 5 / 2).await;

    let workload = format!(r#"kind="container",{lone}"#);
    let mut figures = Vec::new();
    for (scope, labels) in [("container", &lone), ("workload", &workload)] {
        for (direction, payload, resent) in [
            ("receive", DOWNLOAD, download_resent),
            ("transmit", UPLOAD, upload_resent),
        ] {
            let promql = bytes_series(scope, direction, labels, "device");
            let expected = (payload + resent) as f64;
            let samples = server
                .wait_for(&promql, Duration::from_secs(30), |s| {
                    s.len() == 1 && close(s[0].1, expected)
                })
                .await
                .with_context(|| format!("{payload} payload bytes, {resent} of them resent"))?;
            let counted = samples[0].1;
            assert!(
                counted >= payload as f64,
                "{promql} = {counted}: less than the {payload} payload bytes"
            );
            figures.push((promql, counted, payload, resent));
        }
    }
    for (promql, counted, payload, resent) in &figures {
        eprintln!(
            "{promql} = {counted} for {payload} payload bytes + {resent} resent ({:+.3} % of \
             the payload, {:+.3} % of payload + resent)",
            percent_off(*counted, *payload),
            percent_off(*counted, payload + resent)
        );
    }
    let lo = bytes_series("container", "receive", &lone, "loopback");
    let samples = server.query(&lo).await?;
    assert_eq!(samples.len(), 1, "{lo}: {samples:?}");
    assert_eq!(samples[0].1, 0.0, "{lo}: nothing on loopback");

    // A live scrape: what Prometheus stored, and promtool's lint.
    let text = scrape(observer.addr).await?;
    promtool_check(&tools.promtool, &text)?;
    let scraped_rx = sample(&text, &rx).context("rx in the live scrape")?;
    assert!(
        scraped_rx >= figures[0].1 && close(scraped_rx, (DOWNLOAD + download_resent) as f64),
        "/metrics {scraped_rx} vs Prometheus {}",
        figures[0].1
    );
    let info = format!(r#"observer_container_info{{{lone},container_id=""#);
    assert!(
        text.lines().any(|l| l.starts_with(&info)
            && l.contains(r#"image="local/busybox",network_mode="bridge"} 1"#)),
        "no {info}...: {text}"
    );

    let (status, body) = get(&observer.url("/healthz")).await?;
    assert_eq!(status, 200, "/healthz: {body}");
    assert!(body.starts_with("ok: last cycle"), "/healthz: {body}");
    let (status, body) = get(&observer.url("/readyz")).await?;
    assert_eq!(status, 200, "/readyz: {body}");
    assert!(
        body.starts_with("ready: 2 programs attached"),
        "/readyz: {body}"
    );

    // The JSON lines of the same run say the same (observer's two outputs agree).
    let done = observer.stop()?;
    let json_rx = json_task_sum(&done.stdout, &name, "rx_bytes");
    let json_tx = json_task_sum(&done.stdout, &name, "tx_bytes");
    eprintln!("JSON lines: rx_bytes {json_rx}, tx_bytes {json_tx}");
    assert!(
        json_rx as f64 >= scraped_rx && close(json_rx as f64, (DOWNLOAD + download_resent) as f64),
        "JSON rx {json_rx} vs /metrics {scraped_rx}"
    );
    assert!(
        close(json_tx as f64, (UPLOAD + upload_resent) as f64),
        "JSON tx {json_tx} vs {UPLOAD}"
    );
    Ok(())
}

/// A stopped and removed container's series leave /metrics within two intervals (and do not
/// come back); observer keeps measuring and serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_containers_series_leave_metrics() -> anyhow::Result<()> {
    const TEST: &str = "a_removed_containers_series_leave_metrics";
    if skip_unless_docker(TEST) {
        return Ok(());
    }
    let observer = Observer::start()?;
    let http = HttpServer::start(docker::bridge_address()?, 100_000)?;
    let mut containers = Containers::new();
    let name = unique("obs-prom-gone");
    let id = containers.start(Run::new().name(&name).network("bridge"))?;
    let lone = format!(r#"container="{name}""#);
    let rx = bytes_series("container", "receive", &lone, "device");
    observer
        .wait_metrics(&rx, Duration::from_secs(20), |t| sample(t, &rx).is_some())
        .await?;
    docker_exec(
        &name,
        &["wget", "-q", "-O", "/dev/null", &http.url("/download")],
    )?;
    let text = observer
        .wait_metrics("its download", Duration::from_secs(10), |t| {
            sample(t, &rx).is_some_and(|v| v >= 100_000.0)
        })
        .await?;
    let mentions = text.lines().filter(|l| l.contains(&name)).count();
    assert!(mentions >= 20, "{mentions} lines mention {name}:\n{text}");
    let cycles = |t: &str| sample(t, "observer_cycles_total").unwrap_or(0.0);
    let cycles_before = cycles(&text);

    // `docker rm -f` stops and removes it.
    containers.remove(&id)?;
    let removed = Instant::now();
    let grace = INTERVAL * 2 + Duration::from_millis(1500);
    let text = observer
        .wait_metrics(&format!("no line with {name}"), grace, |t| {
            !t.contains(&name)
        })
        .await?;
    eprintln!(
        "{name}: series gone {:?} after docker rm returned",
        removed.elapsed()
    );
    tokio::time::sleep(INTERVAL * 2).await;
    let text_later = scrape(observer.addr).await?;
    assert!(
        !text_later.contains(&name),
        "{name} came back:\n{text_later}"
    );
    assert!(
        cycles(&text_later) >= cycles_before + 2.0,
        "observer stopped measuring: cycles {cycles_before} -> {}",
        cycles(&text_later)
    );
    assert!(
        text.contains("observer_host_network_receive_bytes_total"),
        "{text}"
    );
    for probe in ["/healthz", "/readyz"] {
        let (status, body) = get(&observer.url(probe)).await?;
        assert_eq!(status, 200, "{probe}: {body}");
    }
    observer.stop()?;
    Ok(())
}

/// A Compose project whose name needs escaping (Docker names cannot: `[a-zA-Z0-9][a-zA-Z0-9_.-]`,
/// but labels can hold anything): /metrics escapes it as the text format says, promtool accepts
/// it, and Prometheus reads back the very same value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_compose_project_names_are_escaped() -> anyhow::Result<()> {
    const TEST: &str = "odd_compose_project_names_are_escaped";
    if skip_unless_docker(TEST) {
        return Ok(());
    }
    let Some(tools) = skip_unless_prometheus(TEST) else {
        return Ok(());
    };
    let observer = Observer::start()?;
    let tag = unique("proj");
    let project = format!("odd \"quoted\" back\\slash\nnew line ünïcødé コンテナ 🚀 {tag}");
    let escaped = escape_label_value(&project);
    assert_eq!(
        escaped,
        format!(r#"odd \"quoted\" back\\slash\nnew line ünïcødé コンテナ 🚀 {tag}"#)
    );
    let mut containers = Containers::new();
    let name = unique("obs-prom-odd");
    let id = containers.start(
        Run::new()
            .name(&name)
            .network("bridge")
            .label("com.docker.compose.project", &project)
            .label("com.docker.compose.service", "web"),
    )?;

    let workload_info =
        format!(r#"observer_workload_info{{kind="compose_project",compose_project="{escaped}","#);
    let text = observer
        .wait_metrics(&workload_info, Duration::from_secs(20), |t| {
            t.lines().any(|l| l.starts_with(&workload_info))
        })
        .await?;
    let container = format!(r#"compose_project="{escaped}",container="{name}""#);
    for series in [
        bytes_series("container", "receive", &container, "device"),
        bytes_series("container", "transmit", &container, "loopback"),
        bytes_series(
            "workload",
            "receive",
            &format!(r#"kind="compose_project",compose_project="{escaped}""#),
            "device",
        ),
    ] {
        assert!(sample(&text, &series).is_some(), "no {series}:\n{text}");
    }
    let info = format!(r#"observer_container_info{{{container},container_id="{id}","#);
    assert!(
        text.lines().any(|l| l.starts_with(&info)),
        "no {info}...:\n{text}"
    );
    // Every line that names the project names it escaped: no raw quote ended a value early,
    // no raw newline split a sample.
    let mentioning: Vec<&str> = text.lines().filter(|l| l.contains(&tag)).collect();
    assert!(mentioning.len() >= 20, "{mentioning:#?}");
    for line in &mentioning {
        assert!(
            line.contains(&format!(r#"compose_project="{escaped}""#)),
            "not escaped: {line}"
        );
    }
    assert!(
        !text.lines().any(|l| l.starts_with("new line")),
        "a raw newline split a sample:\n{text}"
    );
    promtool_check(&tools.promtool, &text)?;

    // OpenMetrics (what Prometheus asks for) escapes the same way.
    let openmetrics = reqwest::Client::new()
        .get(observer.url("/metrics"))
        .header("accept", "application/openmetrics-text;version=1.0.0")
        .send()
        .await?
        .text()
        .await?;
    assert!(openmetrics.ends_with("# EOF\n"));
    assert!(
        openmetrics.lines().any(|l| l.starts_with(&workload_info)),
        "{openmetrics}"
    );

    // And Prometheus reads back exactly the label value Docker holds.
    let server = PrometheusServer::start(&tools.prometheus, observer.addr)?;
    server.wait_until_up(Duration::from_secs(60)).await?;
    // (?s): the value has a newline, which `.` does not match otherwise.
    let promql = format!(r#"observer_workload_info{{compose_project=~"(?s).*{tag}"}}"#);
    let samples = server
        .wait_for(&promql, Duration::from_secs(30), |s| s.len() == 1)
        .await?;
    assert_eq!(samples[0].0["compose_project"], project.as_str());
    assert_eq!(samples[0].0["kind"], "compose_project");
    let promql = format!(r#"observer_container_info{{compose_project=~"(?s).*{tag}"}}"#);
    let samples = server
        .wait_for(&promql, Duration::from_secs(30), |s| s.len() == 1)
        .await?;
    assert_eq!(samples[0].0["compose_project"], project.as_str());
    assert_eq!(samples[0].0["container"], name.as_str());
    assert_eq!(samples[0].0["container_id"], id.as_str());
    observer.stop()?;
    Ok(())
}

/// Traffic a container makes right at its start belongs to it, not to the host.
///
/// The inventory can lag a container's start by an interval, more so at `--interval 1s`:
/// the refresher's `min_spacing` (1 s) has no tolerance, so a tick a few milliseconds short of
/// a second after the last fetch skips the fetch a new cgroup asked for
/// (observer/src/inventory/refresh.rs, `refresh_if_due`). Before the joiner held such
/// traffic and credited it once the container was listed, about one container in four here
/// lost its first interval's bytes to the host series. Eight containers, started 1.3 s apart
/// so that they fall in different phases of the tick, must each count their whole download.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_at_a_containers_start_is_its_own() -> anyhow::Result<()> {
    const TEST: &str = "traffic_at_a_containers_start_is_its_own";
    const BODY: u64 = 1_000_000;
    if skip_unless_docker(TEST) {
        return Ok(());
    }
    let observer = Observer::start()?;
    let http = HttpServer::start(docker::bridge_address()?, BODY)?;
    let mut containers = Containers::new();
    let mut names = Vec::new();
    for _ in 0..8 {
        let name = unique("obs-prom-start");
        let script = format!(
            "wget -q -O /dev/null {} && sleep 3600",
            http.url(&format!("/download/{name}"))
        );
        containers.start(
            Run::new()
                .name(&name)
                .network("bridge")
                .cmd(&["sh", "-c", &script]),
        )?;
        names.push(name);
        // Start in different phases of observer's 1 s tick.
        tokio::time::sleep(Duration::from_millis(1300)).await;
    }
    tokio::time::sleep(INTERVAL * 3).await;
    let served = http.served();
    assert_eq!(served.sent, BODY * names.len() as u64, "{served:?}");
    let text = scrape(observer.addr).await?;
    // (name, counted, what its connection resent)
    let counted: Vec<(String, Option<f64>, u64)> = names
        .iter()
        .map(|name| {
            let rx = bytes_series(
                "container",
                "receive",
                &format!(r#"container="{name}""#),
                "device",
            );
            let line = format!("GET /download/{name} ");
            let resent: Vec<u64> = served
                .resent_by_request
                .iter()
                .filter(|(request, _)| request.starts_with(&line))
                .map(|(_, resent)| *resent)
                .collect();
            assert_eq!(resent.len(), 1, "{line:?} served once: {served:?}");
            (name.clone(), sample(&text, &rx), resent[0])
        })
        .collect();
    eprintln!("{BODY} bytes each: {counted:?}");
    let wrong: Vec<_> = counted
        .iter()
        .filter(|(_, v, resent)| !v.is_some_and(|v| close(v, (BODY + resent) as f64)))
        .collect();
    assert!(
        wrong.is_empty(),
        "{} of {} containers lost their start's {BODY} bytes: {wrong:?}",
        wrong.len(),
        names.len()
    );
    observer.stop()?;
    Ok(())
}
