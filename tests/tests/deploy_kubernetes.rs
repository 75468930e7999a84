//! deploy/kubernetes/daemonset.yaml end to end, without a cluster: observer's image run the way
//! the kubelet and containerd would run the DaemonSet's pod, by runc from the OCI bundle
//! tests/src/k8s_pod.rs translates the pod template into (Docker 20.10 here knows neither
//! CAP_BPF nor CAP_PERFMON, so `docker run` cannot express the pod).
//!
//! The node: a network namespace joined to the host by a veth pair, whose host side is the
//! node IP (status.hostIP) and whose pod side is the pod IP (status.podIP). A fake kubelet serves
//! HTTPS on <node IP>:10250 with a certificate for the node IP from a CA of its own, which the
//! test writes as the service account's `ca.crt` beside the `token` the kubelet requires. Pods
//! are real containers laid out as the kubelet lays them out (`--cgroup-parent
//! /kubepods/burstable/pod<uid>`, the kubelet's labels): a two-container pod sharing its
//! sandbox's network namespace, and a hostNetwork pod; each sends a known upload to a sink in
//! a namespace of the test's own. Nothing leaves this machine.
//!
//! Seccomp: the DaemonSet asks for `RuntimeDefault`, and the test honours it: the profile is
//! the one this machine's containerd (1.6.20, Debian's, installed with docker.io) makes for
//! exactly the container's capability set (`ctr containers create --seccomp`, the same
//! `contrib/seccomp.DefaultProfile` CRI applies for RuntimeDefault). containerd has allowed
//! bpf() to CAP_BPF and perf_event_open() to CAP_PERFMON in that profile since 1.6.9 and 1.7.0.
//!
//! Not from the DaemonSet: `OBSERVER_INTERVAL=2s` (the manifest keeps the 60 s default; the
//! test would otherwise wait a minute for readiness), probes are polled every 100 ms to
//! time readiness, more often than the manifest's periods, and the state volume's hostPath
//! (/var/lib/observer) is a directory under one the test made, which the DirectoryOrCreate
//! type then creates as the kubelet would. The restart test also gives the optional Mackerel
//! Secret, with a fake Mackerel API on the node IP and `OBSERVER_MACKEREL_INTERVAL=2s`.
//!
//! Needs root, dockerd, runc and ctr (`cargo xtask setup --for-tests`) and the image
//! (`cargo xtask image`); says SKIPPED otherwise. Every container, namespace, cgroup, server
//! and directory is removed by guards, also when a test fails.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
use serde_json::{json, Value};
use testbed::{
    docker::{skip_unless_docker, Containers, Run},
    fake_mackerel::FakeMackerel,
    fake_platform::{FakeKubelet, FakePod},
    host_bpffs::{self, HostBpffs, PIN_DIR},
    k8s_pod::{
        self, capability_names, containerd_runtime_default, seccomp_allows, Exit, Inputs, Pod,
        Rootfs, Runc, Seccomp, TempDir,
    },
    sh, skip,
    state_dir::{self, StateDir},
    unique, NetNs,
};

const DEFAULT_IMAGE: &str = "registry.example.com/observer/observer:0.1.0";
const IMAGE_ENV: &str = "OBSERVER_TEST_IMAGE";
const DAEMONSET: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../deploy/kubernetes/daemonset.yaml"
);
const NODE_NAME: &str = "node-1";
/// The kubelet's authenticated port, which observer's default kubelet URL names.
const KUBELET_PORT: u16 = 10250;
/// What the test adds to the manifest's environment (see the module comment).
const TEST_INTERVAL: &str = "2s";
/// Payload bytes of a full TCP segment on these veths (MTU 1500, timestamps on): what one
/// segment of RetransSegs stands for.
const MSS: u64 = 1448;
/// The log line observer writes once its programs are attached.
const ATTACHED: &str = "attached count_ingress";
/// observer on the host, for `observer detach`.
const OBSERVER: &str = env!("CARGO_BIN_EXE_observer-e2e");
/// The DaemonSet's volume for observer's state dir.
const STATE_VOLUME: &str = "state";
/// The optional Secret's key, when a test gives it.
const MACKEREL_KEY: &str = "deploy-k8s-mackerel-key-5c2a90e1";
/// What the test sets for the Mackerel period: one per interval.
const TEST_MACKEREL_INTERVAL: Duration = Duration::from_secs(2);

/// The host's /sys/fs/bpf is every observer pod's bpffs hostPath, and observer pins there
/// whenever it is a bpffs (on hosts that mount one at boot, always): one test at a time.
static HOST_BPFFS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Runs `test` alone on the host's bpffs (mounted if missing, as the deploy manifests expect
/// one), then removes whatever its observers pinned (`observer detach`) and the bpffs if it was
/// mounted here, also when the test failed: a SIGTERM keeps observer's pins for the next
/// container, which for a test is the next test.
async fn alone_on_host_bpffs<T>(test: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    let _alone = HOST_BPFFS.lock().await;
    let bpffs = HostBpffs::prepare(Path::new(OBSERVER))?;
    let mounted = bpffs.mounted();
    let result = test.await;
    drop(bpffs);
    let left = host_bpffs::leftovers(mounted);
    let value = result?;
    ensure!(left.is_empty(), "left behind: {left:?}");
    Ok(value)
}

fn image() -> String {
    std::env::var(IMAGE_ENV)
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| DEFAULT_IMAGE.to_owned())
}

/// A random dashed UUID, as the API server gives pods.
fn uuid() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/uuid")
        .expect("/proc/sys/kernel/random/uuid")
        .trim()
        .to_owned()
}

/// A random 64-hex-digit id, as containerd gives containers.
fn container_id() -> String {
    format!("{}{}", uuid(), uuid()).replace('-', "")
}

/// True (and says why) when `test` cannot run here; under CI a skip fails.
fn skipped(test: &str) -> bool {
    if skip_unless_docker(test) {
        return true;
    }
    for tool in ["runc", "ctr"] {
        if sh("sh", &["-c", &format!("command -v {tool}")]).is_err() {
            return skip(
                test,
                &format!(
                    "{tool} is missing (apt-get install docker.io brings runc and containerd)"
                ),
            );
        }
    }
    if k8s_pod::containerd_socket().is_none() {
        return skip(test, "no containerd socket (is dockerd running?)");
    }
    let image = image();
    if sh(
        "docker",
        &["image", "inspect", "--format", "{{.Id}}", &image],
    )
    .is_err()
    {
        return skip(
            test,
            &format!("image missing: run cargo xtask image ({image})"),
        );
    }
    false
}

// ---------------------------------------------------------------------------------------
// The node: pod netns, fake kubelet, service account, image root filesystem
// ---------------------------------------------------------------------------------------

struct Node {
    kubelet: FakeKubelet,
    token: String,
    service_account: TempDir,
    rootfs: Rootfs,
    daemonset: Value,
    /// The observer pod's network namespace; its veth's host side is the node IP.
    pod_net: NetNs,
    node_ip: Ipv4Addr,
    pod_ip: Ipv4Addr,
    /// The observer pod's identity (one pod; each run is a new container of it).
    pod_name: String,
    pod_uid: String,
    /// The containerd version whose RuntimeDefault profiles were used.
    containerd: Mutex<String>,
    /// Stands in for the node's /var/lib/observer (the state volume's hostPath).
    state: StateDir,
    /// A fake Mackerel API on the node IP, when the test gives the optional Secret.
    mackerel: Option<FakeMackerel>,
}

impl Node {
    async fn new() -> Result<Self> {
        k8s_pod::become_subreaper()?;
        let pod_net = NetNs::with_veth("k8s-pod")?;
        let (node_ip, pod_ip) = (pod_net.veth().host_addr, pod_net.veth().ns_addr);
        let kubelet = FakeKubelet::start_tls_at(
            &format!("{node_ip}:{KUBELET_PORT}"),
            &[&node_ip.to_string()],
        )
        .await?;
        let token = format!("k8s-sa-token-{}", uuid());
        kubelet.require_token(Some(&token));
        let service_account = TempDir::new("obs-k8s-sa")?;
        std::fs::write(service_account.path().join("token"), &token)?;
        kubelet
            .ca()
            .context("a TLS kubelet has a CA")?
            .write(&service_account.path().join("ca.crt"))?;
        let daemonset = k8s_pod::load_daemonset(Path::new(DAEMONSET))?;
        let namespace = daemonset["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_owned();
        std::fs::write(service_account.path().join("namespace"), &namespace)?;
        let rootfs = Rootfs::export(&image())?;
        ensure!(
            rootfs.config.entrypoint == ["/observer"],
            "the image's ENTRYPOINT is {:?}, not [\"/observer\"]",
            rootfs.config.entrypoint
        );
        Ok(Self {
            kubelet,
            token,
            service_account,
            rootfs,
            daemonset,
            pod_net,
            node_ip,
            pod_ip,
            pod_name: format!("observer-{}", &uuid()[..5]),
            pod_uid: uuid(),
            containerd: Mutex::new(String::new()),
            state: StateDir::new("obs-k8s-state")?,
            mackerel: None,
        })
    }

    /// Gives the pod the optional Mackerel Secret, with a fake API on the node IP.
    async fn with_mackerel(mut self) -> Self {
        self.mackerel =
            Some(FakeMackerel::start_at(MACKEREL_KEY, &format!("{}:0", self.node_ip)).await);
        self
    }

    /// The DaemonSet's pod translated for a new container; `daemonset` may be a variant.
    fn pod(&self, daemonset: &Value, container_id: &str) -> Result<Pod> {
        let rootfs = self.rootfs.path();
        let netns = format!("/run/netns/{}", self.pod_net.name());
        let (node_ip, pod_ip) = (self.node_ip.to_string(), self.pod_ip.to_string());
        let service_env = [
            // What the kubelet adds for the default namespace's `kubernetes` service; here the
            // node IP, where nothing listens on 443 (observer never calls the API server).
            ("KUBERNETES_SERVICE_HOST".to_owned(), node_ip.clone()),
            ("KUBERNETES_SERVICE_PORT".to_owned(), "443".to_owned()),
        ];
        let mut test_env = vec![("OBSERVER_INTERVAL".to_owned(), TEST_INTERVAL.to_owned())];
        let mut secrets = BTreeMap::new();
        if let Some(mackerel) = &self.mackerel {
            test_env.push(("MACKEREL_APIBASE".to_owned(), mackerel.url()));
            test_env.push((
                "OBSERVER_MACKEREL_INTERVAL".to_owned(),
                format!("{}s", TEST_MACKEREL_INTERVAL.as_secs()),
            ));
            secrets.insert(
                ("observer-mackerel".to_owned(), "apikey".to_owned()),
                MACKEREL_KEY.to_owned(),
            );
        }
        let host_paths = [(STATE_VOLUME.to_owned(), self.state.path())].into();
        let generate = |caps: &[String]| -> Result<Value> {
            let (profile, version) = containerd_runtime_default(caps)?;
            *self.containerd.lock().unwrap() = version;
            Ok(profile)
        };
        let inputs = Inputs {
            image: &self.rootfs.config,
            rootfs: &rootfs,
            pod_name: &self.pod_name,
            pod_uid: &self.pod_uid,
            container_id,
            node_name: NODE_NAME,
            host_ip: &node_ip,
            pod_ip: &pod_ip,
            // Without the optional Mackerel Secret observer runs without Mackerel.
            secrets: &secrets,
            service_env: &service_env,
            netns: Some(Path::new(&netns)),
            service_account_dir: Some(self.service_account.path()),
            runtime_default_seccomp: Some(&generate),
            test_env: &test_env,
            host_paths: &host_paths,
        };
        k8s_pod::translate(daemonset, &inputs)
    }

    /// The observer pod as the kubelet lists it, running `container_id`.
    fn fake_pod(&self, pod: &Pod, container_id: &str) -> FakePod {
        let mut fake = FakePod::running(&self.pod_uid, &pod.namespace, &self.pod_name)
            .owned_by("DaemonSet", "observer")
            .container(&pod.container_name, &format!("containerd://{container_id}"));
        for (k, v) in &pod.labels {
            fake = fake.label(k, v);
        }
        fake
    }

    /// Starts the pod's container with `runc run -d`.
    fn start(&self, pod: &Pod, container_id: &str) -> Result<Runc> {
        let runc = Runc::run(container_id, &pod.config)?;
        Ok(runc)
    }

    fn url(&self, port: u16, path: &str) -> String {
        format!("http://{}:{port}{path}", self.pod_ip)
    }
}

/// A client for the probes and scrapes: no proxy, the probe's timeout.
fn client(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(timeout)
        .build()
        .expect("HTTP client")
}

async fn get(client: &reqwest::Client, url: &str) -> Result<(u16, String)> {
    let response = client
        .get(url)
        .send()
        .await
        .with_context(|| format!("GET {url}"))?;
    let status = response.status().as_u16();
    Ok((status, response.text().await?))
}

/// Polls `url` until it answers 200; the time from `since`.
async fn wait_200(
    client: &reqwest::Client,
    url: &str,
    since: Instant,
    within: Duration,
    runc: &Runc,
) -> Result<Duration> {
    let deadline = Instant::now() + within;
    loop {
        let last = match get(client, url).await {
            Ok((200, _)) => return Ok(since.elapsed()),
            Ok((status, body)) => format!("{status} {body}"),
            Err(e) => format!("{e:#}"),
        };
        if let Some(exit) = runc.exited() {
            bail!(
                "observer exited ({exit:?}) before {url} answered 200:\n{}",
                tail(&runc.log())
            );
        }
        if Instant::now() > deadline {
            bail!(
                "{url} did not answer 200 within {within:?} (last: {last}); observer log:\n{}",
                tail(&runc.log())
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The value of the sample `name{labels}` whose label set is exactly `labels`.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut want: Vec<(String, String)> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    want.sort();
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?.strip_prefix('{')?;
        let (inner, value) = rest.rsplit_once("} ")?;
        let mut got: Vec<(String, String)> = Vec::new();
        for pair in inner.split("\",") {
            let (k, v) = pair.split_once("=\"")?;
            got.push((k.to_owned(), v.trim_end_matches('"').to_owned()));
        }
        got.sort();
        (got == want)
            .then(|| value.split(' ').next()?.parse().ok())
            .flatten()
    })
}

// ---------------------------------------------------------------------------------------
// Pods and traffic
// ---------------------------------------------------------------------------------------

/// A pod laid out with real containers as the kubelet does with the Docker runtime.
struct TestPod {
    namespace: &'static str,
    name: String,
    uid: String,
    /// The sandbox ("pause") container: holds the network namespace.
    sandbox: String,
    /// (name, docker id, payload to upload).
    containers: Vec<(&'static str, String, u64)>,
    host_network: bool,
}

impl TestPod {
    fn start(
        docker: &mut Containers,
        namespace: &'static str,
        name: &str,
        host_network: bool,
        containers: &[(&'static str, u64)],
    ) -> Result<Self> {
        let uid = uuid();
        let parent = format!("/kubepods/burstable/pod{uid}");
        let labelled = |run: Run, container: &str, kind: &str| {
            run.cgroup_parent(&parent)
                .label("io.kubernetes.pod.name", name)
                .label("io.kubernetes.pod.namespace", namespace)
                .label("io.kubernetes.pod.uid", &uid)
                .label("io.kubernetes.container.name", container)
                .label("io.kubernetes.docker.type", kind)
        };
        let network = if host_network { "host" } else { "bridge" };
        let sandbox = docker.start(
            labelled(Run::new(), "POD", "podsandbox")
                .name(&unique(&format!("k8s_POD_{name}")))
                .network(network),
        )?;
        let mut started = Vec::new();
        for (container, payload) in containers {
            let net = if host_network {
                "host".to_owned()
            } else {
                format!("container:{sandbox}")
            };
            let id = docker.start(
                labelled(Run::new(), container, "container")
                    .name(&unique(&format!("k8s_{container}_{name}")))
                    .network(&net),
            )?;
            started.push((*container, id, *payload));
        }
        Ok(Self {
            namespace,
            name: name.to_owned(),
            uid,
            sandbox,
            containers: started,
            host_network,
        })
    }

    fn fake(&self) -> FakePod {
        let mut fake = FakePod::running(&self.uid, self.namespace, &self.name)
            .owned_by("ReplicaSet", &format!("{}-rs", self.name));
        if self.host_network {
            fake = fake.host_network();
        }
        for (name, id, _) in &self.containers {
            fake = fake.container(name, &format!("docker://{id}"));
        }
        fake
    }

    fn payload(&self) -> u64 {
        self.containers.iter().map(|c| c.2).sum()
    }
}

/// The main process of a container, as the host sees it.
fn container_pid(id: &str) -> Result<u32> {
    let pid = sh("docker", &["inspect", "--format", "{{.State.Pid}}", id])?;
    pid.trim()
        .parse()
        .with_context(|| format!("pid of {id}: {pid:?}"))
}

/// TCP segments retransmitted in the network namespace of `pid` (RetransSegs of
/// /proc/<pid>/net/snmp).
fn retransmitted_segments(pid: u32) -> Result<u64> {
    let snmp = std::fs::read_to_string(format!("/proc/{pid}/net/snmp"))?;
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (Some(names), Some(values)) = (tcp.next(), tcp.next()) else {
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

/// An HTTP sink in a network namespace of the test's: each POST's body is read and counted by
/// its path. One connection at a time; stopped (and its thread joined) on drop.
struct Sink {
    addr: SocketAddr,
    received: Arc<Mutex<BTreeMap<String, u64>>>,
    errors: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Sink {
    fn start_in(netns: &NetNs, ip: Ipv4Addr) -> Result<Self> {
        let ns = netns.open()?;
        // A thread that enters the namespace makes the socket there; the socket stays there.
        let listener = std::thread::spawn(move || -> Result<TcpListener> {
            // SAFETY: setns on this thread only, with an open namespace file.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            ensure!(rc == 0, "setns: {}", std::io::Error::last_os_error());
            Ok(TcpListener::bind((ip, 0))?)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the sink's setns thread panicked"))??;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let received = Arc::new(Mutex::new(BTreeMap::new()));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (received, errors, stop) = (received.clone(), errors.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => match receive(stream) {
                            Ok((path, n)) => {
                                *received.lock().unwrap().entry(path).or_default() += n
                            }
                            Err(e) => errors.lock().unwrap().push(format!("{e:#}")),
                        },
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(10));
                        }
                        Err(e) => errors.lock().unwrap().push(format!("accept: {e}")),
                    }
                }
            })
        };
        Ok(Self {
            addr,
            received,
            errors,
            stop,
            thread: Some(thread),
        })
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Reads one POST: its path and body bytes; answers 200 and waits for the client's close.
fn receive(stream: TcpStream) -> Result<(String, u64)> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request = String::new();
    reader.read_line(&mut request)?;
    let mut words = request.split_whitespace();
    ensure!(words.next() == Some("POST"), "not a POST: {request:?}");
    let path = words.next().context("no path")?.to_owned();
    let mut length = 0u64;
    loop {
        let mut header = String::new();
        ensure!(
            reader.read_line(&mut header)? > 0,
            "{path}: closed within the head"
        );
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().context("Content-Length")?;
            }
        }
    }
    let got = std::io::copy(&mut reader.by_ref().take(length), &mut std::io::sink())?;
    ensure!(got == length, "{path}: {got} of {length} body bytes");
    let mut out = stream;
    out.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
    let _ = out.shutdown(std::net::Shutdown::Write);
    let _ = std::io::copy(&mut reader, &mut std::io::sink());
    Ok((path, got))
}

/// `docker exec` in a container: writes `payload` bytes (not zeros: busybox wget reads
/// --post-file as a C string) and POSTs them to `url`.
fn upload(container: &str, payload: u64, url: &str) -> Result<()> {
    sh(
        "docker",
        &[
            "exec",
            container,
            "sh",
            "-c",
            &format!(
                "head -c {payload} /dev/zero | tr '\\0' u > /tmp/upload && \
                 wget -q -O /dev/null --post-file /tmp/upload {url} && rm /tmp/upload"
            ),
        ],
    )
    .map(|_| ())
}

fn percent_off(actual: f64, expected: u64) -> f64 {
    (actual - expected as f64) / expected as f64 * 100.0
}

/// Stops observer as the kubelet would (SIGTERM, SIGKILL after the grace period); it must exit 0
/// within the grace period.
fn stop(runc: &Runc, pod: &Pod) -> Result<Duration> {
    let asked = Instant::now();
    runc.kill("TERM")?;
    match runc.wait(pod.termination_grace) {
        Some(Exit::Code(0)) => Ok(asked.elapsed()),
        Some(exit) => bail!(
            "observer ended with {exit:?} on SIGTERM:\n{}",
            tail(&runc.log())
        ),
        None => {
            let _ = runc.kill("KILL");
            bail!(
                "observer was still running {:?} after SIGTERM (terminationGracePeriodSeconds):\n{}",
                pod.termination_grace,
                tail(&runc.log())
            )
        }
    }
}

/// The last lines of a container's log, for failure messages (its JSON lines are long).
fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// The status lines of /proc/<pid>/status a runtime sets.
fn status_field<'a>(status: &'a str, field: &str) -> Option<&'a str> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .map(str::trim)
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

/// observer in the DaemonSet's pod: ready on the pod IP, pods' uploads in /metrics under their
/// namespace and pod names within 2 % (plus what TCP resent), the kubelet called with the
/// service-account token, a clean exit on SIGTERM within the grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemonset_pod_measures_pods_and_answers_its_probes() -> Result<()> {
    const TEST: &str = "the_daemonset_pod_measures_pods_and_answers_its_probes";
    if skipped(TEST) {
        return Ok(());
    }
    alone_on_host_bpffs(async {
    let node = Node::new().await?;
    let id = container_id();
    let pod = node.pod(&node.daemonset, &id)?;
    eprintln!(
        "ignored fields: {:#?}",
        pod.ignored
            .iter()
            .map(|i| format!("{}: {}", i.field, i.reason))
            .collect::<Vec<_>>()
    );
    assert_eq!(pod.seccomp, Seccomp::RuntimeDefault);
    let profile = &pod.config["linux"]["seccomp"];
    assert!(
        seccomp_allows(profile, "bpf") && seccomp_allows(profile, "perf_event_open"),
        "containerd's RuntimeDefault for {:?} does not allow bpf and perf_event_open",
        pod.capabilities
    );

    // Pods: two containers sharing a sandbox's namespace on the bridge, and a hostNetwork pod.
    let mut docker = Containers::new();
    let web = TestPod::start(
        &mut docker,
        "shop",
        &format!("web-{}", &uuid()[..5]),
        false,
        &[("app", 3_000_000), ("sidecar", 2_000_000)],
    )?;
    let agent = TestPod::start(
        &mut docker,
        "monitoring",
        &format!("agent-{}", &uuid()[..5]),
        true,
        &[("agent", 1_500_000)],
    )?;
    node.kubelet
        .set_pods(&[web.fake(), agent.fake(), node.fake_pod(&pod, &id)]);
    let sink_net = NetNs::with_veth("k8s-sink")?;
    let sink = Sink::start_in(&sink_net, sink_net.veth().ns_addr)?;

    // observer, as the kubelet would start it, then its readiness probe on the pod IP.
    let runc = node.start(&pod, &id)?;
    let readiness = pod
        .readiness
        .clone()
        .context("the DaemonSet has a readinessProbe")?;
    let liveness = pod
        .liveness
        .clone()
        .context("the DaemonSet has a livenessProbe")?;
    let probe = client(readiness.timeout);
    let ready_after = wait_200(
        &probe,
        &node.url(readiness.port, &readiness.path),
        runc.started,
        Duration::from_secs(30),
        &runc,
    )
    .await?;
    eprintln!("runc run -d to {} 200: {ready_after:?}", readiness.path);

    // What the runtime gave the process.
    let status = runc.proc_status()?;
    let caps = u64::from_str_radix(status_field(&status, "CapEff").context("CapEff")?, 16)?;
    assert_eq!(
        capability_names(caps),
        ["CAP_NET_ADMIN", "CAP_PERFMON", "CAP_BPF"],
        "effective capabilities"
    );
    for (field, want) in [("NoNewPrivs", "1"), ("Seccomp", "2")] {
        assert_eq!(
            status_field(&status, field),
            Some(want),
            "{field}:\n{status}"
        );
    }
    assert!(
        status_field(&status, "Uid").is_some_and(|u| u.starts_with("0\t")),
        "{status}"
    );
    // The host mounts as the process sees them. A readOnly hostPath is a read-only bind of
    // the top directory only: mounts below it (the cgroup hierarchies under /sys/fs/cgroup)
    // stay as they are on the host, as with containerd (recursive read-only needs
    // `recursiveReadOnly`, Kubernetes 1.30 and containerd 2.0).
    let mountinfo = std::fs::read_to_string(format!("/proc/{}/mountinfo", runc.pid))?;
    let mounts: Vec<(String, String)> = mountinfo
        .lines()
        .filter_map(|l| {
            let mut f = l.split(' ');
            let point = f.nth(4)?.to_owned();
            let options = f.next()?.to_owned();
            Some((point, options))
        })
        .filter(|(p, _)| {
            p.starts_with("/host") || p == "/sys/fs/bpf" || p == k8s_pod::SERVICE_ACCOUNT_DIR
        })
        .collect();
    for (point, options) in &mounts {
        eprintln!(
            "  mount {point}: {}",
            options.split(',').next().unwrap_or_default()
        );
    }
    let top = |point: &str| {
        mounts
            .iter()
            .find(|(p, _)| p == point)
            .map(|(_, o)| o.split(',').next().unwrap_or_default().to_owned())
    };
    assert_eq!(top("/host/proc").as_deref(), Some("ro"), "{mountinfo}");
    assert_eq!(
        top("/host/sys/fs/cgroup").as_deref(),
        Some("ro"),
        "{mountinfo}"
    );
    assert_eq!(top("/sys/fs/bpf").as_deref(), Some("rw"), "{mountinfo}");
    assert_eq!(
        top(k8s_pod::SERVICE_ACCOUNT_DIR).as_deref(),
        Some("ro"),
        "{mountinfo}"
    );
    let cgroup = std::fs::read_to_string(format!("/proc/{}/cgroup", runc.pid))?;
    assert!(
        cgroup
            .lines()
            .any(|l| l == format!("0::{}", pod.cgroups_path)),
        "{cgroup}"
    );

    // Known uploads from every container, and what TCP resent in each pod's namespace.
    let mut resent = BTreeMap::new();
    for p in [&web, &agent] {
        let netns_pid = container_pid(&p.sandbox)?;
        let before = retransmitted_segments(netns_pid)?;
        for (name, id, payload) in &p.containers {
            upload(id, *payload, &sink.url(&format!("/{}/{name}", p.name)))?;
        }
        resent.insert(
            p.name.clone(),
            (retransmitted_segments(netns_pid)? - before) * MSS,
        );
    }
    let errors = sink.errors.lock().unwrap().clone();
    assert!(errors.is_empty(), "sink: {errors:?}");
    let received = sink.received.lock().unwrap().clone();
    for p in [&web, &agent] {
        for (name, _, payload) in &p.containers {
            assert_eq!(
                received.get(&format!("/{}/{name}", p.name)),
                Some(payload),
                "{received:?}"
            );
        }
    }

    // /metrics where the pod's annotations say, on the pod IP.
    let (port, path) = pod.scrape.clone().context("prometheus.io annotations")?;
    let metrics_url = node.url(port, &path);
    let scrape = client(Duration::from_secs(5));
    let within = |counted: Option<f64>, payload: u64, resent: u64| {
        counted.is_some_and(|c| c >= payload as f64 * 0.98 && c <= (payload + resent) as f64 * 1.02)
    };
    let tx = "observer_workload_network_transmit_bytes_total";
    let ctx = "observer_container_network_transmit_bytes_total";
    let pod_labels = |p: &TestPod| {
        [
            ("kind", "kubernetes_pod".to_owned()),
            ("namespace", p.namespace.to_owned()),
            ("pod", p.name.clone()),
            ("interface_class", "device".to_owned()),
        ]
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let text = loop {
        let (status, text) = get(&scrape, &metrics_url).await?;
        ensure!(status == 200, "{metrics_url}: {status}");
        let all = [&web, &agent].iter().all(|p| {
            let labels = pod_labels(p);
            let labels: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
            within(sample(&text, tx, &labels), p.payload(), resent[&p.name])
        });
        if all {
            break text;
        }
        if Instant::now() > deadline {
            bail!(
                "the pods' uploads ({} and {} bytes) never showed in {metrics_url}:\n{}\nobserver log:\n{}",
                web.payload(),
                agent.payload(),
                text.lines().filter(|l| l.contains("kubernetes_pod") || l.contains("namespace=")).collect::<Vec<_>>().join("\n"),
                tail(&runc.log())
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    for p in [&web, &agent] {
        let labels = pod_labels(p);
        let labels: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let counted = sample(&text, tx, &labels).unwrap_or_default();
        eprintln!(
            "pod {}/{}: sent {} payload bytes ({} resent allowed), {tx} {counted} ({:+.3} %)",
            p.namespace,
            p.name,
            p.payload(),
            resent[&p.name],
            percent_off(counted, p.payload())
        );
        for (name, _, payload) in &p.containers {
            let labels = [
                ("namespace", p.namespace),
                ("pod", p.name.as_str()),
                ("container", name),
                ("interface_class", "device"),
            ];
            let counted = sample(&text, ctx, &labels);
            eprintln!(
                "  container {name}: sent {payload}, {ctx} {counted:?} ({:+.3} %)",
                percent_off(counted.unwrap_or_default(), *payload)
            );
            assert!(
                within(counted, *payload, resent[&p.name]),
                "{ctx}{labels:?} = {counted:?} for {payload} bytes"
            );
        }
    }
    // observer's own pod is in the kubelet's list too: its calls to the kubelet are its own.
    let own = [
        ("kind", "kubernetes_pod"),
        ("namespace", pod.namespace.as_str()),
        ("pod", node.pod_name.as_str()),
        ("interface_class", "device"),
    ];
    let own_tx = sample(&text, tx, &own);
    assert!(
        own_tx.is_some_and(|v| v > 0.0),
        "no {tx}{own:?} in:\n{text}"
    );

    // The kubelet was called with the service-account token, and only so.
    let requests = node.kubelet.requests();
    let wanted = format!("Bearer {}", node.token);
    assert!(!requests.is_empty(), "observer never called the kubelet");
    assert!(
        requests
            .iter()
            .all(|r| r.uri == "/pods" && r.authorization.as_deref() == Some(wanted.as_str())),
        "{requests:?}"
    );

    // The liveness probe, first asked after its initial delay.
    let live_at = runc.started + liveness.initial_delay;
    if let Some(wait) = live_at.checked_duration_since(Instant::now()) {
        tokio::time::sleep(wait).await;
    }
    let (status, live) = get(
        &client(liveness.timeout),
        &node.url(liveness.port, &liveness.path),
    )
    .await?;
    assert_eq!(status, 200, "{}: {live}", liveness.path);
    let (status, ready) = get(&probe, &node.url(readiness.port, &readiness.path)).await?;
    assert_eq!(status, 200, "{}: {ready}", readiness.path);
    eprintln!(
        "after {:?}: {} {live:?}, {} {ready:?}; kubelet called {} times",
        runc.started.elapsed(),
        liveness.path,
        readiness.path,
        requests.len()
    );

    let stopped = stop(&runc, &pod)?;
    let log = runc.log();
    assert!(!log.contains("panicked"), "{log}");
    eprintln!(
        "SIGTERM to exit 0: {stopped:?}; RuntimeDefault from containerd {}",
        node.containerd.lock().unwrap()
    );
        Ok(())
    })
    .await
}

/// Exactly the DaemonSet's capabilities start observer and attach its programs; without any one
/// of the added ones it exits non-zero at once, naming the capability it lacks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_added_capability_is_needed() -> Result<()> {
    const TEST: &str = "each_added_capability_is_needed";
    if skipped(TEST) {
        return Ok(());
    }
    alone_on_host_bpffs(async {
        let node = Node::new().await?;
        let added: Vec<String> = k8s_pod::container_mut(&mut node.daemonset.clone())
            ["securityContext"]["capabilities"]["add"]
            .as_array()
            .context("securityContext.capabilities.add")?
            .iter()
            .map(|c| c.as_str().unwrap_or_default().to_owned())
            .collect();
        assert_eq!(added, ["BPF", "PERFMON", "NET_ADMIN"]);

        let id = container_id();
        let pod = node.pod(&node.daemonset, &id)?;
        node.kubelet.set_pods(&[node.fake_pod(&pod, &id)]);
        let runc = node.start(&pod, &id)?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while !runc.log().contains(ATTACHED) {
            if let Some(exit) = runc.exited() {
                bail!(
                    "observer exited ({exit:?}) with the DaemonSet's capabilities:\n{}",
                    tail(&runc.log())
                );
            }
            ensure!(
                Instant::now() < deadline,
                "never attached:\n{}",
                tail(&runc.log())
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let attached = runc.started.elapsed();
        let line = runc
            .log()
            .lines()
            .find(|l| l.contains(ATTACHED))
            .unwrap_or_default()
            .to_owned();
        eprintln!(
            "{:?}: attached after {attached:?}: {line}",
            pod.capabilities
        );
        stop(&runc, &pod)?;
        drop(runc);

        for cap in &added {
            let mut variant = node.daemonset.clone();
            let add = k8s_pod::container_mut(&mut variant)["securityContext"]["capabilities"]
                ["add"]
                .as_array_mut()
                .context("add")?;
            add.retain(|c| c != &json!(cap));
            let id = container_id();
            let pod = node.pod(&variant, &id)?;
            let full = format!("CAP_{cap}");
            assert!(!pod.capabilities.contains(&full));
            node.kubelet.set_pods(&[node.fake_pod(&pod, &id)]);
            let runc = node.start(&pod, &id)?;
            let exit = runc.wait(Duration::from_secs(10));
            let took = runc.started.elapsed();
            let log = runc.log();
            let message = log
                .lines()
                .find(|l| l.contains("lacks"))
                .unwrap_or_default()
                .to_owned();
            eprintln!("without {full}: {exit:?} after {took:?}: {message}");
            match exit {
                Some(Exit::Code(code)) if code != 0 => {}
                other => bail!(
                    "without {full} observer ended with {other:?}:\n{}",
                    tail(&log)
                ),
            }
            assert!(
                took < Duration::from_secs(5),
                "without {full}: exited after {took:?}"
            );
            assert!(
                message.contains(&format!("lacks {full}")),
                "without {full}:\n{log}"
            );
            assert!(
                !log.contains(ATTACHED),
                "without {full} it attached:\n{log}"
            );
        }
        Ok(())
    })
    .await
}

/// A SIGTERM while observer is still starting (a pod deleted as it starts) ends it cleanly at
/// once. In the pod observer is PID 1 of its PID namespace, and the kernel drops any signal
/// PID 1 has no handler for: a handler installed only after start-up would lose it, and the
/// kubelet would wait out terminationGracePeriodSeconds before SIGKILL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigterm_during_start_up_is_not_lost() -> Result<()> {
    const TEST: &str = "a_sigterm_during_start_up_is_not_lost";
    /// observer's first log line, written before the programs are loaded.
    const STARTING: &str = "Prometheus endpoint on";
    if skipped(TEST) {
        return Ok(());
    }
    alone_on_host_bpffs(async {
        let node = Node::new().await?;
        let id = container_id();
        let pod = node.pod(&node.daemonset, &id)?;
        node.kubelet.set_pods(&[node.fake_pod(&pod, &id)]);
        let runc = node.start(&pod, &id)?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while !runc.log().contains(STARTING) {
            ensure!(
                runc.exited().is_none(),
                "observer exited:\n{}",
                tail(&runc.log())
            );
            ensure!(
                Instant::now() < deadline,
                "observer never started:\n{}",
                tail(&runc.log())
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let attached_before = runc.log().contains(ATTACHED);
        let sent = Instant::now();
        runc.kill("TERM")?;
        let exit = runc.wait(Duration::from_secs(10));
        let took = sent.elapsed();
        eprintln!(
            "SIGTERM {:?} after runc run -d ({}): {exit:?} after {took:?}",
            sent - runc.started,
            if attached_before {
                "already attached"
            } else {
                "before the programs were attached"
            }
        );
        ensure!(
            exit == Some(Exit::Code(0)),
            "a SIGTERM during start-up did not end observer within 10 s ({exit:?}; the kubelet \
         would wait {:?}, then SIGKILL):\n{}",
            pod.termination_grace,
            tail(&runc.log())
        );
        Ok(())
    })
    .await
}

/// The kubelet restarting observer's container (a new container in the same pod: SIGTERM, and
/// once SIGKILL, then a new container id) while the pods upload in batches before, during and
/// after each gap. The DaemonSet's bpffs hostPath is the host's /sys/fs/bpf, a bpffs (mounted
/// by the test if missing): observer pins its state there with CAP_BPF alone, each new
/// container takes over the programs of the one before, which kept counting in the gap, and
/// the JSON lines of the three runs add up to what every pod and container sent (within 2 %,
/// plus what TCP resent): nothing lost, nothing twice. With the Mackerel Secret given, the
/// state volume (DirectoryOrCreate) holds observer's Mackerel state, private to the container's
/// user, after the SIGTERM and after the SIGKILL; each new container takes up its hosts, Mackerel
/// has one host per pod across the three runs, and their txBytes add up the same way.
/// `observer detach` at the end removes the pins and unloads every program.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_daemonset_pod_takes_over_and_loses_nothing() -> Result<()> {
    const TEST: &str = "a_restarted_daemonset_pod_takes_over_and_loses_nothing";
    if skipped(TEST) {
        return Ok(());
    }
    let _alone = HOST_BPFFS.lock().await;
    let started = Instant::now();
    let bpffs = HostBpffs::prepare(Path::new(OBSERVER))?;
    let mounted = bpffs.mounted();
    let result = restarts(&bpffs).await;
    drop(bpffs);
    let mut left = host_bpffs::leftovers(mounted);
    left.extend(result.as_ref().ok().and_then(|made| made.clone()));
    eprintln!("test took {:.1?}", started.elapsed());
    result?;
    ensure!(left.is_empty(), "left behind: {left:?}");
    Ok(())
}

/// Returns what it left that it must not have (the node's real state dir).
async fn restarts(bpffs: &HostBpffs) -> Result<Option<String>> {
    let node = Node::new().await?.with_mackerel().await;
    let mut docker = Containers::new();
    let web = TestPod::start(
        &mut docker,
        "shop",
        &format!("web-{}", &uuid()[..5]),
        false,
        &[("app", 2_000_000), ("sidecar", 1_000_000)],
    )?;
    let agent = TestPod::start(
        &mut docker,
        "monitoring",
        &format!("agent-{}", &uuid()[..5]),
        true,
        &[("agent", 1_500_000)],
    )?;
    let sink_net = NetNs::with_veth("k8s-sink")?;
    let sink = Sink::start_in(&sink_net, sink_net.veth().ns_addr)?;
    let pods = [&web, &agent];
    let uploads: Vec<(String, u64, String)> = pods
        .iter()
        .flat_map(|p| {
            p.containers
                .iter()
                .map(|(name, id, payload)| {
                    (
                        id.clone(),
                        *payload,
                        sink.url(&format!("/{}/{name}", p.name)),
                    )
                })
                .collect::<Vec<_>>()
        })
        .collect();
    let netns_pids: Vec<u32> = pods
        .iter()
        .map(|p| container_pid(&p.sandbox))
        .collect::<Result<_>>()?;
    let resent_before: Vec<u64> = netns_pids
        .iter()
        .map(|pid| retransmitted_segments(*pid))
        .collect::<Result<_>>()?;

    // Run 1: new programs, pinned.
    let mut runs: Vec<Runc> = Vec::new();
    let (pod, run) = start_pinned(&node, &[&web, &agent], false).await?;
    runs.push(run);
    let traffic = Arc::new(Batches::default());
    let _stop = StopBatches(traffic.clone());
    let poster = {
        let traffic = traffic.clone();
        std::thread::spawn(move || -> Result<u64> {
            let posted = post_batches(&uploads, &traffic);
            traffic.ended.store(true, Ordering::SeqCst);
            posted
        })
    };
    traffic.wait_more(3, "in the first run").await?;

    // The kubelet restarts the container: SIGTERM, then a new container in the same pod.
    let stopped = stop(&runs[0], &pod)?;
    let down = Instant::now();
    let log = runs[0].log();
    ensure!(
        log.contains("programs stay attached and counting"),
        "observer did not leave its programs pinned:\n{}",
        tail(&log)
    );
    eprintln!(
        "run 1: SIGTERM to exit 0 in {stopped:.1?}, after {} batches",
        traffic.count()
    );
    ensure!(
        log.contains("Mackerel: all values delivered"),
        "no complete Mackerel flush on SIGTERM:\n{}",
        tail(&log)
    );
    let uid = pod.config["process"]["user"]["uid"]
        .as_u64()
        .context("the container's uid")? as u32;
    let saved_hosts = check_state(&node, uid, pods.len(), "after SIGTERM")?;
    traffic
        .wait_more(2, "while no observer runs (after SIGTERM)")
        .await?;
    let (_, run) = start_pinned(&node, &[&web, &agent], true).await?;
    let gap_term = down.elapsed();
    took_up(&run, saved_hosts).await?;
    runs.push(run);
    traffic.wait_more(3, "in the second run").await?;

    // SIGKILL (a failed liveness probe past its grace, the OOM killer) mid-interval.
    let reports = |run: &Runc| {
        run.log()
            .lines()
            .filter(|l| l.starts_with("{\"type\":\"observer\""))
            .count()
    };
    let before = reports(&runs[1]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while reports(&runs[1]) == before {
        ensure!(Instant::now() < deadline, "no report from the second run");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    runs[1].kill("KILL")?;
    let down = Instant::now();
    let exit = runs[1].wait(Duration::from_secs(10));
    ensure!(
        exit == Some(Exit::Signal(libc::SIGKILL)),
        "SIGKILL: {exit:?}"
    );
    eprintln!("run 2: SIGKILLed after {} batches", traffic.count());
    let saved_hosts = check_state(&node, uid, pods.len(), "after SIGKILL")?;
    traffic
        .wait_more(2, "while no observer runs (after SIGKILL)")
        .await?;
    let (pod, run) = start_pinned(&node, &[&web, &agent], true).await?;
    let gap_kill = down.elapsed();
    took_up(&run, saved_hosts).await?;
    runs.push(run);
    // Past the new run's first report, which holds the gap.
    let deadline = Instant::now() + Duration::from_secs(10);
    while reports(&runs[2]) == 0 {
        ensure!(Instant::now() < deadline, "no report from the third run");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    traffic
        .wait_more(3, "after the third run's first report")
        .await?;
    traffic.stop.store(true, Ordering::SeqCst);
    let batches = poster
        .join()
        .map_err(|_| anyhow::anyhow!("the posting thread panicked"))??;
    let resent: Vec<u64> = netns_pids
        .iter()
        .zip(&resent_before)
        .map(|(pid, before)| Ok((retransmitted_segments(*pid)? - before) * MSS))
        .collect::<Result<_>>()?;
    eprintln!(
        "{batches} batches; observer down {gap_term:.1?} (SIGTERM) and {gap_kill:.1?} \
         (SIGKILL) until the next container took over; resent bytes per pod {resent:?}"
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    let stopped = stop(&runs[2], &pod)?;
    eprintln!("run 3: SIGTERM to exit 0 in {stopped:.1?}");

    // Everything arrived, and the three runs' JSON lines add up to it.
    let errors = sink.errors.lock().unwrap().clone();
    ensure!(errors.is_empty(), "sink: {errors:?}");
    let received = sink.received.lock().unwrap().clone();
    for p in pods {
        for (name, _, payload) in &p.containers {
            let path = format!("/{}/{name}", p.name);
            ensure!(
                received.get(&path) == Some(&(payload * batches)),
                "{path}: received {:?} of {} x {batches}",
                received.get(&path),
                payload
            );
        }
    }
    let mut pod_tx: BTreeMap<String, u64> = BTreeMap::new();
    let mut container_tx: BTreeMap<String, u64> = BTreeMap::new();
    for (n, run) in runs.iter().enumerate() {
        let mut mine: BTreeMap<String, u64> = BTreeMap::new();
        for line in run.log().lines().filter(|l| l.starts_with('{')) {
            let l: Value =
                serde_json::from_str(line).with_context(|| format!("not JSON: {line}"))?;
            if l["type"] != "task" || l["kind"] != "kubernetes_pod" {
                continue;
            }
            // A pod's line names it namespace/name.
            let Some(p) = pods
                .iter()
                .find(|p| l["name"] == format!("{}/{}", p.namespace, p.name).as_str())
            else {
                continue;
            };
            let tx = l["tx_bytes"].as_u64().context("tx_bytes")?;
            *mine.entry(p.name.clone()).or_default() += tx;
            *pod_tx.entry(p.name.clone()).or_default() += tx;
            for c in l["containers"].as_array().context("containers")? {
                let key = format!("{}/{}", p.name, c["name"].as_str().unwrap_or_default());
                *container_tx.entry(key).or_default() += c["tx_bytes"].as_u64().unwrap_or(0);
            }
        }
        eprintln!("run {}: device tx per pod {mine:?}", n + 1);
    }
    let within = |measured: u64, sent: u64, resent: u64| {
        measured >= sent && measured as f64 <= sent as f64 * 1.02 + resent as f64
    };
    for (p, resent) in pods.iter().zip(&resent) {
        let sent = p.payload() * batches;
        let got = pod_tx.get(&p.name).copied().unwrap_or(0);
        eprintln!(
            "pod {}/{}: sent {sent}, JSON lines of the three runs {got} ({:+.3} %, {resent} \
             resent bytes allowed)",
            p.namespace,
            p.name,
            percent_off(got as f64, sent)
        );
        ensure!(
            within(got, sent, *resent),
            "pod {}: measured {got} for {sent} sent (+{resent} resent)",
            p.name
        );
        for (name, _, payload) in &p.containers {
            let key = format!("{}/{name}", p.name);
            let got = container_tx.get(&key).copied().unwrap_or(0);
            ensure!(
                within(got, payload * batches, *resent),
                "container {key}: measured {got} for {} sent (+{resent} resent)",
                payload * batches
            );
        }
    }

    // Mackerel: one host per pod across the three runs, and its txBytes add up the same way.
    let mackerel = node
        .mackerel
        .as_ref()
        .context("the restart test gives Mackerel")?;
    let hosts = mackerel.hosts();
    eprintln!(
        "Mackerel: {} hosts, {} points ({} stored)",
        hosts.len(),
        mackerel.points().len(),
        mackerel.stored().len()
    );
    let mut identifiers: Vec<&str> = hosts
        .iter()
        .filter_map(|h| h.custom_identifier.as_deref())
        .collect();
    identifiers.sort_unstable();
    let before = identifiers.len();
    identifiers.dedup();
    ensure!(
        identifiers.len() == before,
        "a host made twice across the restarts: {hosts:#?}"
    );
    for (p, resent) in pods.iter().zip(&resent) {
        let mine: Vec<_> = hosts
            .iter()
            .filter(|h| h.custom_identifier.as_deref() == Some(&format!("{}.kubernetes", p.uid)))
            .collect();
        ensure!(mine.len() == 1, "pod {}: hosts {mine:#?}", p.name);
        ensure!(
            !mine[0].retired,
            "pod {}: a live pod's host was retired",
            p.name
        );
        let sum = mackerel.bytes_told(&mine[0].id, ".txBytes.delta", TEST_MACKEREL_INTERVAL);
        let sent = p.payload() * batches;
        eprintln!(
            "pod {}/{}: sent {sent}, Mackerel sum of txBytes.delta x period {sum:.1} ({:+.3} %)",
            p.namespace,
            p.name,
            percent_off(sum, sent)
        );
        ensure!(
            within(sum.round() as u64, sent, *resent),
            "pod {}: Mackerel's txBytes.delta add up to {sum:.1} for {sent} sent (+{resent} resent)",
            p.name
        );
    }

    // Uninstalled: `observer detach` removes the pins, and with them every program.
    let ids: Vec<String> = runs
        .iter()
        .flat_map(|r| host_bpffs::program_ids(&r.log()))
        .collect();
    drop(runs);
    let removed = bpffs.detach()?;
    ensure!(removed.contains("link_"), "observer detach: {removed}");
    ensure!(
        !Path::new(PIN_DIR).exists(),
        "{PIN_DIR} is left after observer detach"
    );
    host_bpffs::check_unloaded(&ids)?;
    eprintln!("observer detach removed the pins; programs {ids:?} unloaded");
    Ok(node.state.node_dir_made())
}

/// The state volume holds observer's Mackerel state, private to the container's user, naming
/// at least the test pods' hosts; returns how many hosts it names.
fn check_state(node: &Node, uid: u32, pods: usize, when: &str) -> Result<usize> {
    let facts = node
        .state
        .check_file(uid)
        .with_context(|| format!("the state volume {when}"))?;
    let saved = node.state.read()?;
    let hosts = saved["hosts"].as_array().map_or(0, Vec::len);
    ensure!(
        hosts >= pods,
        "the state file {when} names {hosts} hosts, fewer than the {pods} pods: {saved}"
    );
    eprintln!(
        "state {when}: {} in the state volume, {} bytes, mode {:o} (dir {:o}), uid {uid}: {hosts} \
         hosts, {} buffered chunks, open period from {}",
        state_dir::MACKEREL_FILE,
        facts.file_bytes,
        facts.file_mode,
        facts.dir_mode,
        saved["buffer"].as_array().map_or(0, Vec::len),
        saved["open"]["start"]
    );
    Ok(hosts)
}

/// The new container took up the hosts the state file named.
async fn took_up(run: &Runc, hosts: usize) -> Result<()> {
    let want = format!("Mackerel: took up {hosts} hosts");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = run.log();
        if let Some(line) = log.lines().find(|l| l.contains("Mackerel: took up")) {
            ensure!(
                line.contains(&want),
                "{line} (the state file named {hosts} hosts)"
            );
            eprintln!("container {}: {}", &run.id[..12], line.trim());
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "the new container did not take up the Mackerel state within 10 s:\n{}",
            tail(&log)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A new observer container in the DaemonSet's pod (a new container id, as the kubelet's
/// restart makes), listed by the fake kubelet; waits for it to pin its state, taking over the
/// programs of the one before when `takes_over`.
async fn start_pinned(node: &Node, pods: &[&TestPod], takes_over: bool) -> Result<(Pod, Runc)> {
    let id = container_id();
    let pod = node.pod(&node.daemonset, &id)?;
    let mut listed: Vec<FakePod> = pods.iter().map(|p| p.fake()).collect();
    listed.push(node.fake_pod(&pod, &id));
    node.kubelet.set_pods(&listed);
    let runc = node.start(&pod, &id)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let pinned = loop {
        let log = runc.log();
        if let Some(line) = log.lines().find(|l| l.contains("state pinned in ")) {
            break line.to_owned();
        }
        ensure!(
            !log.contains("running without pinned state"),
            "observer did not pin its state:\n{}",
            tail(&log)
        );
        if let Some(exit) = runc.exited() {
            bail!("observer exited ({exit:?}):\n{}", tail(&log));
        }
        ensure!(
            Instant::now() < deadline,
            "observer did not pin its state within 30 s:\n{}",
            tail(&log)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let want = if takes_over {
        "took over the programs"
    } else {
        "new programs attached"
    };
    ensure!(
        pinned.contains(&format!("state pinned in {PIN_DIR}: {want}")),
        "{pinned}"
    );
    eprintln!(
        "container {} after {:.1?}: {pinned}",
        &id[..12],
        runc.started.elapsed()
    );
    Ok((pod, runc))
}

/// Uploads in batches, counted.
#[derive(Default)]
struct Batches {
    count: AtomicU64,
    stop: AtomicBool,
    ended: AtomicBool,
}

impl Batches {
    fn count(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }

    /// Waits for `n` more batches to be uploaded whole.
    async fn wait_more(&self, n: u64, when: &str) -> Result<()> {
        let target = self.count() + n;
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.count() < target {
            ensure!(
                !self.ended.load(Ordering::SeqCst),
                "the uploads ended {when} (the error follows)"
            );
            ensure!(
                Instant::now() < deadline,
                "{n} batches of uploads {when} took over 60 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }
}

/// Stops the uploads when dropped, also when the test fails.
struct StopBatches(Arc<Batches>);

impl Drop for StopBatches {
    fn drop(&mut self) {
        self.0.stop.store(true, Ordering::SeqCst);
    }
}

/// Every (container, payload, url) uploads once per batch, batch after batch until
/// `traffic.stop`; returns the number of batches.
fn post_batches(uploads: &[(String, u64, String)], traffic: &Batches) -> Result<u64> {
    let mut batches = 0;
    while !traffic.stop.load(Ordering::SeqCst) {
        ensure!(batches < 200, "200 batches and no stop");
        for (id, payload, url) in uploads {
            upload(id, *payload, url).with_context(|| format!("upload from {id}"))?;
        }
        batches += 1;
        traffic.count.store(batches, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(300));
    }
    Ok(batches)
}
