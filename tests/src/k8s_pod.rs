//! A Kubernetes pod template run the way the kubelet and containerd's CRI plugin would run it,
//! without either: [`translate`] turns the DaemonSet's single container into the OCI runtime
//! `config.json` containerd would hand to runc, [`Rootfs`] is the image's root filesystem
//! (`docker create` + `docker export`), and [`Runc`] runs the bundle with `runc run -d`.
//!
//! What the translation does, after containerd 1.6's `pkg/cri/server/container_create_linux.go`
//! and the kubelet's `kuberuntime`:
//! - process: the image's ENTRYPOINT (or `command`) + `args` (or the image's CMD), with
//!   `$(VAR)` expanded; env = image env, `HOSTNAME`, the kubelet's service variables, then the
//!   container's `env` (downward-API `fieldRef` and `secretKeyRef` values are supplied by the
//!   caller; an optional secret that is not supplied is left out, as the kubelet does);
//! - capabilities: bounding = effective = permitted = containerd's defaults, or none after
//!   `drop: [ALL]`, plus `add` (as `CAP_` names); no inheritable or ambient ones;
//! - user from `runAsUser`/`runAsGroup` (else the image's numeric USER), `noNewPrivileges` from
//!   `allowPrivilegeEscalation: false`, `root.readonly` from `readOnlyRootFilesystem`;
//! - namespaces: pid (not with hostPID), ipc (not with hostIPC), uts and network (not with
//!   hostNetwork; the network one is a path the caller made), mount, and a private cgroup
//!   namespace (what containerd does on cgroup v2 hosts; on hybrid hosts like the test machine it
//!   would not, so this is the stricter case, the one real v2 nodes have);
//! - mounts: /proc, /dev, /dev/pts, /dev/shm, /dev/mqueue, /sys (ro), /sys/fs/cgroup (ro, as CRI
//!   adds), then each hostPath `volumeMount` as an `rbind` (`ro` when readOnly) and the
//!   service-account directory (ro) when `automountServiceAccountToken` is true, ordered by
//!   depth as containerd orders them; the kubelet's masked and read-only /proc and /sys paths;
//! - cgroups: `/kubepods[/<qos>]/pod<uid>/<container id>` (cgroupfs driver), memory limit from
//!   `limits.memory`, CPU shares from `requests.cpu` and quota from `limits.cpu`;
//! - seccomp: `RuntimeDefault` is the profile the caller's generator gives for the container's
//!   capabilities ([`containerd_runtime_default`] asks this machine's containerd for exactly the
//!   profile CRI would apply); `Unconfined` is none;
//! - rlimits: none, as CRI (it removes the default spec's): the process inherits runc's, so
//!   never more than this machine's hard limits.
//!
//! Not made, and why it does not matter here: the kubelet's /etc/hosts and
//! /dev/termination-log and the sandbox's /etc/hostname and /etc/resolv.conf bind mounts
//! (observer resolves no names and writes no termination message); joining a sandbox's ipc and
//! uts namespaces (a one-container pod: new ones are the same); CRI's annotations; the
//! kubelet's oom_score_adj (see [`IGNORED`]); AppArmor (the test machine's kernel has none, so
//! containerd would apply none either).
//!
//! Every field of the DaemonSet, the pod template, the pod spec and the container is either
//! honoured (here, or by the caller: probes, ports, grace period, labels, annotations, returned
//! in [`Pod`]) or on [`IGNORED`] with the reason; any other field fails the translation, so a
//! manifest change the test does not understand cannot pass unnoticed.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    os::unix::fs::DirBuilderExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
use serde::Deserialize as _;
use serde_json::{json, Map, Value};

/// Fields present in the manifest that the translation does not turn into anything, each with
/// the reason that is sound. Paths are generic: `containers[]` for every container.
pub const IGNORED: &[(&str, &str)] = &[
    (
        "metadata.labels",
        "object metadata of the DaemonSet: selects nothing on the node",
    ),
    (
        "spec.updateStrategy",
        "rollout only: how many nodes change at once, not how one pod runs",
    ),
    (
        "spec.template.spec.tolerations",
        "scheduling only: which nodes get the pod",
    ),
    (
        "spec.template.spec.nodeSelector",
        "scheduling only: which nodes get the pod (this node is linux)",
    ),
    (
        "spec.template.spec.priorityClassName",
        "scheduling and preemption only. (The kubelet also gives node-critical pods \
         oom_score_adj -997; lowering it needs CAP_SYS_RESOURCE, which this machine's bounding \
         set lacks, so the process keeps the test's)",
    ),
    (
        "spec.template.spec.serviceAccountName",
        "which account's token is mounted: the test writes that token itself",
    ),
    (
        "spec.template.spec.restartPolicy",
        "what the kubelet does after an exit: the test runs each container once",
    ),
    (
        "spec.template.spec.containers[].imagePullPolicy",
        "the image is local (cargo xtask image); nothing is pulled",
    ),
    (
        "spec.template.spec.containers[].resources.requests.memory",
        "scheduling only: the kubelet writes no cgroup setting for it (memory.min only with the \
         MemoryQoS feature gate)",
    ),
    (
        "spec.template.spec.containers[].terminationMessagePath",
        "the kubelet's /dev/termination-log is not mounted: observer writes none",
    ),
    (
        "spec.template.spec.containers[].terminationMessagePolicy",
        "the kubelet's /dev/termination-log is not mounted: observer writes none",
    ),
];

/// A field present in the manifest and on [`IGNORED`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ignored {
    /// The concrete path, e.g. `spec.template.spec.tolerations`.
    pub field: String,
    pub reason: &'static str,
}

/// The image's config, as `docker image inspect` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    /// `uid[:gid]` (numeric; names would need the image's /etc/passwd), or empty.
    pub user: String,
    pub working_dir: String,
}

impl ImageConfig {
    /// `.Config` of a local image.
    pub fn inspect(image: &str) -> Result<Self> {
        let out = crate::sh(
            "docker",
            &["image", "inspect", "--format", "{{json .Config}}", image],
        )?;
        let config: Value = serde_json::from_str(out.trim()).context("image config JSON")?;
        let strings = |key: &str| -> Vec<String> {
            config[key]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default()
        };
        Ok(Self {
            entrypoint: strings("Entrypoint"),
            cmd: strings("Cmd"),
            env: strings("Env"),
            user: config["User"].as_str().unwrap_or_default().to_owned(),
            working_dir: config["WorkingDir"].as_str().unwrap_or_default().to_owned(),
        })
    }
}

/// Makes the RuntimeDefault seccomp profile (OCI `linux.seccomp`) for a capability set.
pub type SeccompGenerator<'a> = &'a dyn Fn(&[String]) -> Result<Value>;

/// What the kubelet and the runtime know that the manifest does not.
pub struct Inputs<'a> {
    pub image: &'a ImageConfig,
    /// The image's root filesystem (absolute).
    pub rootfs: &'a Path,
    pub pod_name: &'a str,
    pub pod_uid: &'a str,
    /// The runtime's id of the container (64 hex digits, as containerd makes them).
    pub container_id: &'a str,
    /// Downward API: `spec.nodeName`, `status.hostIP`, `status.podIP`.
    pub node_name: &'a str,
    pub host_ip: &'a str,
    pub pod_ip: &'a str,
    /// Secret values by (secret name, key).
    pub secrets: &'a BTreeMap<(String, String), String>,
    /// What the kubelet adds for services (`KUBERNETES_SERVICE_HOST`, ...), before the
    /// container's own env.
    pub service_env: &'a [(String, String)],
    /// The pod's network namespace (a path for setns); needed unless hostNetwork.
    pub netns: Option<&'a Path>,
    /// Directory holding `token`, `ca.crt` and `namespace`; needed when the token is mounted.
    pub service_account_dir: Option<&'a Path>,
    /// Gives the RuntimeDefault profile; needed when the manifest asks for RuntimeDefault.
    pub runtime_default_seccomp: Option<SeccompGenerator<'a>>,
    /// Variables the test adds after the manifest's (not part of the manifest: reported).
    pub test_env: &'a [(String, String)],
    /// Host path replacing a hostPath volume's `path`, by volume name: a directory under one
    /// the test made instead of the node's real one (e.g. /var/lib/observer). The volume's
    /// type is then checked (and DirectoryOrCreate honoured) on that path. Naming a volume the
    /// pod does not declare fails.
    pub host_paths: &'a BTreeMap<String, PathBuf>,
}

/// Kubernetes QoS class, from the container's requests and limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Qos {
    Guaranteed,
    Burstable,
    BestEffort,
}

/// An httpGet probe, its port resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpProbe {
    pub path: String,
    pub port: u16,
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub failure_threshold: u32,
    pub success_threshold: u32,
}

/// A containerPort.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Port {
    pub name: Option<String>,
    pub container_port: u16,
    pub protocol: String,
}

/// Seccomp as asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seccomp {
    RuntimeDefault,
    Unconfined,
}

/// The pod, translated.
#[derive(Debug, Clone)]
pub struct Pod {
    /// The DaemonSet's namespace: the pod's.
    pub namespace: String,
    /// The template's labels.
    pub labels: BTreeMap<String, String>,
    pub container_name: String,
    /// The image reference of the manifest.
    pub image: String,
    pub qos: Qos,
    pub cgroups_path: String,
    pub host_network: bool,
    pub ports: Vec<Port>,
    pub liveness: Option<HttpProbe>,
    pub readiness: Option<HttpProbe>,
    /// `prometheus.io/port` and `prometheus.io/path` of the template, when `scrape` is "true".
    pub scrape: Option<(u16, String)>,
    pub termination_grace: Duration,
    /// Bounding = effective = permitted.
    pub capabilities: Vec<String>,
    pub seccomp: Seccomp,
    /// Present fields on [`IGNORED`].
    pub ignored: Vec<Ignored>,
    /// The OCI runtime config.
    pub config: Value,
}

/// Reads a manifest file; the document whose kind is DaemonSet, as JSON values.
pub fn load_daemonset(path: &Path) -> Result<Value> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse_daemonset(&text).with_context(|| format!("in {}", path.display()))
}

/// The DaemonSet document of a (multi-document) YAML text.
pub fn parse_daemonset(text: &str) -> Result<Value> {
    let mut found = None;
    for doc in serde_norway::Deserializer::from_str(text) {
        let value = Value::deserialize(doc).context("YAML")?;
        if value["kind"] == "DaemonSet" {
            ensure!(found.is_none(), "more than one DaemonSet");
            found = Some(value);
        }
    }
    found.context("no document of kind DaemonSet")
}

/// The single container of a DaemonSet's pod template, to change for a variant.
pub fn container_mut(daemonset: &mut Value) -> &mut Value {
    &mut daemonset["spec"]["template"]["spec"]["containers"][0]
}

/// Path with list indexes dropped: the form [`IGNORED`] uses.
fn generic(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    let mut in_index = false;
    for c in path.chars() {
        match c {
            '[' => {
                in_index = true;
                out.push('[');
            }
            ']' => {
                in_index = false;
                out.push(']');
            }
            _ if in_index => {}
            c => out.push(c),
        }
    }
    out
}

/// One mapping of the manifest: every key must be taken (honoured) or be on [`IGNORED`].
struct Obj<'a> {
    at: String,
    map: &'a Map<String, Value>,
    taken: BTreeSet<&'a str>,
}

impl<'a> Obj<'a> {
    fn new(value: &'a Value, at: &str) -> Result<Self> {
        let map = value
            .as_object()
            .with_context(|| format!("{at}: expected a mapping, found {value}"))?;
        Ok(Self {
            at: at.to_owned(),
            map,
            taken: BTreeSet::new(),
        })
    }

    fn path(&self, key: &str) -> String {
        if self.at.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.at)
        }
    }

    fn get(&mut self, key: &str) -> Option<&'a Value> {
        let (k, v) = self.map.get_key_value(key)?;
        self.taken.insert(k.as_str());
        Some(v).filter(|v| !v.is_null())
    }

    fn str(&mut self, key: &str) -> Result<Option<&'a str>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .with_context(|| format!("{}: expected a string, found {v}", self.path(key))),
        }
    }

    fn bool(&mut self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .with_context(|| format!("{}: expected true or false, found {v}", self.path(key))),
        }
    }

    fn int(&mut self, key: &str) -> Result<Option<i64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_i64()
                .map(Some)
                .with_context(|| format!("{}: expected an integer, found {v}", self.path(key))),
        }
    }

    fn obj(&mut self, key: &str) -> Result<Option<Obj<'a>>> {
        let path = self.path(key);
        self.get(key).map(|v| Obj::new(v, &path)).transpose()
    }

    fn list(&mut self, key: &str) -> Result<Vec<(String, &'a Value)>> {
        let path = self.path(key);
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => Ok(items
                .iter()
                .enumerate()
                .map(|(i, v)| (format!("{path}[{i}]"), v))
                .collect()),
            Some(v) => bail!("{path}: expected a list, found {v}"),
        }
    }

    fn strings(&mut self, key: &str) -> Result<Option<Vec<String>>> {
        let path = self.path(key);
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_owned)
                        .with_context(|| format!("{path}: expected strings, found {v}"))
                })
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(v) => bail!("{path}: expected a list of strings, found {v}"),
        }
    }

    /// Fails on the first key neither taken nor on [`IGNORED`]; records the ignored ones.
    fn done(self, ignored: &mut Vec<Ignored>) -> Result<()> {
        for key in self.map.keys() {
            if self.taken.contains(key.as_str()) {
                continue;
            }
            let field = self.path(key);
            let generic = generic(&field);
            match IGNORED.iter().find(|(f, _)| *f == generic) {
                Some((_, reason)) => ignored.push(Ignored { field, reason }),
                None => bail!(
                    "{field}: the pod translation does not honour this field and it is not on \
                     its ignored list (tests/src/k8s_pod.rs IGNORED): honour it or ignore it \
                     with a reason"
                ),
            }
        }
        Ok(())
    }
}

/// Every capability name runc knows, by number.
pub const ALL_CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// containerd's default capabilities (oci/spec.go `defaultUnixCaps`), which a container has
/// unless it drops them.
pub const CONTAINERD_DEFAULT_CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// The kubelet's masked and read-only paths for the default procMount.
const MASKED_PATHS: &[&str] = &[
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];
const READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// Where the kubelet mounts the service-account token.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// `KEY` as a capability name: `CAP_KEY`, checked against the known ones.
fn cap_name(name: &str, at: &str) -> Result<String> {
    let full = if name.starts_with("CAP_") {
        name.to_owned()
    } else {
        format!("CAP_{name}")
    };
    ensure!(
        ALL_CAPABILITIES.contains(&full.as_str()),
        "{at}: unknown capability {name:?}"
    );
    Ok(full)
}

/// A CPU quantity in millicores: "50m", "1", "0.5".
pub fn millicores(quantity: &str) -> Result<u64> {
    if let Some(m) = quantity.strip_suffix('m') {
        return m
            .parse()
            .with_context(|| format!("CPU quantity {quantity:?}"));
    }
    let cores: f64 = quantity
        .parse()
        .with_context(|| format!("CPU quantity {quantity:?}"))?;
    ensure!(cores >= 0.0, "CPU quantity {quantity:?}");
    Ok((cores * 1000.0).round() as u64)
}

/// A memory quantity in bytes: "256Mi", "1Gi", "64M", "1000".
pub fn bytes(quantity: &str) -> Result<u64> {
    const SUFFIXES: &[(&str, u64)] = &[
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("k", 1_000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
    ];
    for (suffix, factor) in SUFFIXES {
        if let Some(n) = quantity.strip_suffix(suffix) {
            let n: u64 = n
                .parse()
                .with_context(|| format!("memory quantity {quantity:?}"))?;
            return Ok(n * factor);
        }
    }
    quantity
        .parse()
        .with_context(|| format!("memory quantity {quantity:?}"))
}

/// The kubelet's `$(VAR)` expansion: defined names are replaced, `$$` is a `$`, anything else
/// stays as written.
pub fn expand(s: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(') {
            match inner.find(')') {
                Some(end) if env.contains_key(&inner[..end]) => {
                    out.push_str(&env[&inner[..end]]);
                    rest = &inner[end + 1..];
                }
                Some(end) => {
                    out.push_str(&rest[i..i + 2 + end + 1]);
                    rest = &inner[end + 1..];
                }
                None => {
                    out.push_str(&rest[i..]);
                    rest = "";
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// A string or integer port of a probe, resolved against the container's named ports.
fn probe_port(value: &Value, ports: &[Port], at: &str) -> Result<u16> {
    match value {
        Value::Number(n) => n
            .as_u64()
            .and_then(|n| u16::try_from(n).ok())
            .with_context(|| format!("{at}: port {n}")),
        Value::String(name) => ports
            .iter()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .map(|p| p.container_port)
            .with_context(|| format!("{at}: no containerPort named {name:?}")),
        v => bail!("{at}: expected a port number or name, found {v}"),
    }
}

fn seconds(value: Option<i64>, default: u64, at: &str) -> Result<Duration> {
    match value {
        None => Ok(Duration::from_secs(default)),
        Some(s) if s >= 0 => Ok(Duration::from_secs(s as u64)),
        Some(s) => bail!("{at}: {s} seconds"),
    }
}

fn probe(
    obj: Option<Obj<'_>>,
    ports: &[Port],
    ignored: &mut Vec<Ignored>,
) -> Result<Option<HttpProbe>> {
    let Some(mut obj) = obj else {
        return Ok(None);
    };
    let at = obj.at.clone();
    let mut http = obj
        .obj("httpGet")?
        .with_context(|| format!("{at}: only httpGet probes are honoured (the test makes them)"))?;
    let path = http.str("path")?.unwrap_or("/").to_owned();
    let port_at = http.path("port");
    let port = probe_port(
        http.get("port")
            .with_context(|| format!("{port_at}: missing"))?,
        ports,
        &port_at,
    )?;
    if let Some(scheme) = http.str("scheme")? {
        ensure!(
            scheme == "HTTP",
            "{at}.httpGet.scheme {scheme}: only HTTP is honoured"
        );
    }
    http.done(ignored)?;
    let initial_delay = seconds(obj.int("initialDelaySeconds")?, 0, &at)?;
    let period = seconds(obj.int("periodSeconds")?, 10, &at)?;
    let timeout = seconds(obj.int("timeoutSeconds")?, 1, &at)?;
    let failure_threshold = obj.int("failureThreshold")?.unwrap_or(3) as u32;
    let success_threshold = obj.int("successThreshold")?.unwrap_or(1) as u32;
    obj.done(ignored)?;
    Ok(Some(HttpProbe {
        path,
        port,
        initial_delay,
        period,
        timeout,
        failure_threshold,
        success_threshold,
    }))
}

/// Turns the DaemonSet's pod template into the OCI runtime config containerd would make.
pub fn translate(daemonset: &Value, inputs: &Inputs<'_>) -> Result<Pod> {
    let mut ignored = Vec::new();
    let mut top = Obj::new(daemonset, "")?;
    ensure!(
        top.str("apiVersion")? == Some("apps/v1"),
        "apiVersion: expected apps/v1"
    );
    ensure!(
        top.str("kind")? == Some("DaemonSet"),
        "kind: expected DaemonSet"
    );
    let mut meta = top.obj("metadata")?.context("metadata: missing")?;
    meta.str("name")?.context("metadata.name: missing")?;
    let namespace = meta.str("namespace")?.unwrap_or("default").to_owned();
    meta.done(&mut ignored)?;
    let mut spec = top.obj("spec")?.context("spec: missing")?;
    let mut template = spec.obj("template")?.context("spec.template: missing")?;

    // Template metadata: labels (the pod's, checked against the selector) and annotations.
    let mut labels = BTreeMap::new();
    let mut scrape = None;
    if let Some(mut tmeta) = template.obj("metadata")? {
        if let Some(mut l) = tmeta.obj("labels")? {
            for (k, v) in l.map {
                let v = v
                    .as_str()
                    .with_context(|| format!("{}.{k}: expected a string", l.at))?;
                labels.insert(k.clone(), v.to_owned());
            }
            l.taken.extend(l.map.keys().map(String::as_str));
            l.done(&mut ignored)?;
        }
        if let Some(mut a) = tmeta.obj("annotations")? {
            // Honoured by the test: it scrapes where they say.
            let on = a.str("prometheus.io/scrape")?;
            let port = a.str("prometheus.io/port")?;
            let path = a.str("prometheus.io/path")?.unwrap_or("/metrics");
            if on == Some("true") {
                let port: u16 = port
                    .context("prometheus.io/port: missing")?
                    .parse()
                    .context("prometheus.io/port")?;
                scrape = Some((port, path.to_owned()));
            }
            a.done(&mut ignored)?;
        }
        tmeta.done(&mut ignored)?;
    }
    if let Some(mut selector) = spec.obj("selector")? {
        if let Some(mut m) = selector.obj("matchLabels")? {
            for (k, v) in m.map {
                ensure!(
                    labels.get(k).map(String::as_str) == v.as_str(),
                    "spec.selector.matchLabels.{k}: the template's labels do not match"
                );
            }
            m.taken.extend(m.map.keys().map(String::as_str));
            m.done(&mut ignored)?;
        }
        selector.done(&mut ignored)?;
    }

    let mut pod = template
        .obj("spec")?
        .context("spec.template.spec: missing")?;
    let host_network = pod.bool("hostNetwork")?.unwrap_or(false);
    let host_pid = pod.bool("hostPID")?.unwrap_or(false);
    let host_ipc = pod.bool("hostIPC")?.unwrap_or(false);
    let automount = pod.bool("automountServiceAccountToken")?.unwrap_or(true);
    let termination_grace = seconds(
        pod.int("terminationGracePeriodSeconds")?,
        30,
        "terminationGracePeriodSeconds",
    )?;
    // Pod-level security context: the fallbacks of the container's.
    let (mut pod_uid_default, mut pod_gid_default, mut pod_non_root, mut pod_seccomp) =
        (None, None, None, None);
    if let Some(mut psc) = pod.obj("securityContext")? {
        pod_uid_default = psc.int("runAsUser")?;
        pod_gid_default = psc.int("runAsGroup")?;
        pod_non_root = psc.bool("runAsNonRoot")?;
        if let Some(mut s) = psc.obj("seccompProfile")? {
            pod_seccomp = Some(s.str("type")?.unwrap_or_default().to_owned());
            // Taken so that the type is what fails: Localhost is not honoured.
            s.get("localhostProfile");
            s.done(&mut ignored)?;
        }
        psc.done(&mut ignored)?;
    }

    // Volumes: hostPath only, each checked as the kubelet checks its type.
    let mut volumes = BTreeMap::new();
    for (at, v) in pod.list("volumes")? {
        let mut vol = Obj::new(v, &at)?;
        let name = vol
            .str("name")?
            .with_context(|| format!("{at}.name: missing"))?;
        let mut hp = vol
            .obj("hostPath")?
            .with_context(|| format!("{at}: only hostPath volumes are honoured"))?;
        let manifest_path = hp
            .str("path")?
            .with_context(|| format!("{at}.hostPath.path: missing"))?;
        let path = match inputs.host_paths.get(name) {
            Some(p) => p
                .to_str()
                .with_context(|| format!("{at}: the test's host path is not UTF-8"))?,
            None => manifest_path,
        };
        let kind = hp.str("type")?.unwrap_or("");
        let meta = fs::metadata(path);
        match kind {
            "" => {}
            // As the kubelet does: made 0755 (root-owned, the kubelet's user) if missing, and
            // then it must be a directory.
            "DirectoryOrCreate" => {
                if meta.is_err() {
                    fs::DirBuilder::new()
                        .recursive(true)
                        .mode(0o755)
                        .create(path)
                        .with_context(|| {
                            format!("{at}: creating hostPath {path} (DirectoryOrCreate)")
                        })?;
                }
                ensure!(
                    fs::metadata(path).is_ok_and(|m| m.is_dir()),
                    "{at}: hostPath {path} is not a directory on this node (type DirectoryOrCreate)"
                );
            }
            "Directory" => ensure!(
                meta.as_ref().is_ok_and(|m| m.is_dir()),
                "{at}: hostPath {path} is not a directory on this node (type Directory)"
            ),
            "File" => ensure!(
                meta.as_ref().is_ok_and(|m| m.is_file()),
                "{at}: hostPath {path} is not a file on this node (type File)"
            ),
            "Socket" => ensure!(
                meta.as_ref()
                    .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type())),
                "{at}: hostPath {path} is not a socket on this node (type Socket)"
            ),
            other => bail!("{at}: hostPath type {other} is not honoured (it would create {path})"),
        }
        hp.done(&mut ignored)?;
        vol.done(&mut ignored)?;
        volumes.insert(name.to_owned(), path.to_owned());
    }
    for name in inputs.host_paths.keys() {
        ensure!(
            volumes.contains_key(name),
            "the test replaces the host path of volume {name}, which the pod does not declare"
        );
    }

    let containers = pod.list("containers")?;
    ensure!(
        containers.len() == 1,
        "spec.template.spec.containers: {} containers; the translation makes one",
        containers.len()
    );
    let (cat, cvalue) = &containers[0];
    let mut c = Obj::new(cvalue, cat)?;
    let container_name = c
        .str("name")?
        .context("container name: missing")?
        .to_owned();
    let image = c
        .str("image")?
        .context("container image: missing")?
        .to_owned();

    // Ports (their names resolve the probes' ports).
    let mut ports = Vec::new();
    for (at, p) in c.list("ports")? {
        let mut p = Obj::new(p, &at)?;
        let container_port = p
            .int("containerPort")?
            .and_then(|n| u16::try_from(n).ok())
            .with_context(|| format!("{at}.containerPort"))?;
        let protocol = p.str("protocol")?.unwrap_or("TCP").to_owned();
        ensure!(
            protocol == "TCP",
            "{at}.protocol {protocol}: only TCP is honoured"
        );
        let name = p.str("name")?.map(str::to_owned);
        p.done(&mut ignored)?;
        ports.push(Port {
            name,
            container_port,
            protocol,
        });
    }
    let liveness = probe(c.obj("livenessProbe")?, &ports, &mut ignored)?;
    let readiness = probe(c.obj("readinessProbe")?, &ports, &mut ignored)?;

    // Environment, in the kubelet's order, expanded as it goes.
    let mut env_map: BTreeMap<String, String> = BTreeMap::new();
    let mut container_env: Vec<(String, String)> = Vec::new();
    for (k, v) in inputs.service_env {
        env_map.insert(k.clone(), v.clone());
        container_env.push((k.clone(), v.clone()));
    }
    for (at, e) in c.list("env")? {
        let mut e = Obj::new(e, &at)?;
        let name = e
            .str("name")?
            .with_context(|| format!("{at}.name: missing"))?
            .to_owned();
        let value = if let Some(v) = e.str("value")? {
            Some(expand(v, &env_map))
        } else if let Some(mut from) = e.obj("valueFrom")? {
            let value = if let Some(mut f) = from.obj("fieldRef")? {
                let field = f.str("fieldPath")?.context("fieldRef.fieldPath: missing")?;
                if let Some(api) = f.str("apiVersion")? {
                    ensure!(api == "v1", "{at}: fieldRef apiVersion {api}");
                }
                f.done(&mut ignored)?;
                Some(match field {
                    "spec.nodeName" => inputs.node_name.to_owned(),
                    "status.hostIP" => inputs.host_ip.to_owned(),
                    "status.podIP" => inputs.pod_ip.to_owned(),
                    "metadata.name" => inputs.pod_name.to_owned(),
                    "metadata.namespace" => namespace.clone(),
                    "metadata.uid" => inputs.pod_uid.to_owned(),
                    other => bail!("{at}: fieldRef {other} is not supplied by the test"),
                })
            } else if let Some(mut s) = from.obj("secretKeyRef")? {
                let secret = s.str("name")?.context("secretKeyRef.name: missing")?;
                let key = s.str("key")?.context("secretKeyRef.key: missing")?;
                let optional = s.bool("optional")?.unwrap_or(false);
                s.done(&mut ignored)?;
                match inputs.secrets.get(&(secret.to_owned(), key.to_owned())) {
                    Some(v) => Some(v.clone()),
                    None if optional => None,
                    None => bail!(
                        "{at}: secret {secret} key {key} is not supplied and not optional (the \
                         kubelet would not start the container)"
                    ),
                }
            } else {
                bail!("{at}.valueFrom: only fieldRef and secretKeyRef are honoured");
            };
            from.done(&mut ignored)?;
            value
        } else {
            Some(String::new())
        };
        e.done(&mut ignored)?;
        if let Some(value) = value {
            env_map.insert(name.clone(), value.clone());
            container_env.push((name, value));
        }
    }
    for (k, v) in inputs.test_env {
        env_map.insert(k.clone(), v.clone());
        container_env.push((k.clone(), v.clone()));
    }

    // Arguments: command replaces ENTRYPOINT (and drops CMD); args replace CMD.
    let command = c.strings("command")?;
    let args = c.strings("args")?;
    let mut argv: Vec<String> = match (&command, &args) {
        (Some(cmd), Some(args)) => cmd.iter().chain(args).cloned().collect(),
        (Some(cmd), None) => cmd.clone(),
        (None, Some(args)) => inputs
            .image
            .entrypoint
            .iter()
            .chain(args)
            .cloned()
            .collect(),
        (None, None) => inputs
            .image
            .entrypoint
            .iter()
            .chain(&inputs.image.cmd)
            .cloned()
            .collect(),
    };
    argv = argv.iter().map(|a| expand(a, &env_map)).collect();
    ensure!(
        !argv.is_empty(),
        "no command: neither the image nor the container has one"
    );
    let cwd = match c.str("workingDir")? {
        Some(dir) => dir.to_owned(),
        None if !inputs.image.working_dir.is_empty() => inputs.image.working_dir.clone(),
        None => "/".to_owned(),
    };

    // Resources.
    let (mut req_cpu, mut req_mem, mut lim_cpu, mut lim_mem) = (None, None, None, None);
    if let Some(mut r) = c.obj("resources")? {
        if let Some(mut req) = r.obj("requests")? {
            req_cpu = req.str("cpu")?.map(millicores).transpose()?;
            // Taken for the QoS class; no cgroup setting (see IGNORED).
            req_mem = req
                .map
                .get("memory")
                .and_then(Value::as_str)
                .map(bytes)
                .transpose()?;
            req.done(&mut ignored)?;
        }
        if let Some(mut lim) = r.obj("limits")? {
            lim_cpu = lim.str("cpu")?.map(millicores).transpose()?;
            lim_mem = lim.str("memory")?.map(bytes).transpose()?;
            lim.done(&mut ignored)?;
        }
        r.done(&mut ignored)?;
    }
    // Requests default to limits.
    let req_cpu = req_cpu.or(lim_cpu);
    let req_mem = req_mem.or(lim_mem);
    let qos = if [req_cpu, req_mem, lim_cpu, lim_mem]
        .iter()
        .all(Option::is_none)
    {
        Qos::BestEffort
    } else if lim_cpu.is_some() && lim_mem.is_some() && req_cpu == lim_cpu && req_mem == lim_mem {
        Qos::Guaranteed
    } else {
        Qos::Burstable
    };

    // Security context.
    let mut caps: Vec<String> = CONTAINERD_DEFAULT_CAPABILITIES
        .iter()
        .map(|s| s.to_string())
        .collect();
    let (mut uid, mut gid, mut non_root) = (pod_uid_default, pod_gid_default, pod_non_root);
    let (mut readonly_root, mut no_new_privs, mut seccomp) = (false, false, pod_seccomp);
    if let Some(mut sc) = c.obj("securityContext")? {
        if sc.bool("privileged")? == Some(true) {
            bail!("{}.privileged: true is not honoured", sc.at);
        }
        if let Some(mut cs) = sc.obj("capabilities")? {
            let at = cs.at.clone();
            let drop = cs.strings("drop")?.unwrap_or_default();
            let add = cs.strings("add")?.unwrap_or_default();
            cs.done(&mut ignored)?;
            if drop.iter().any(|d| d == "ALL") {
                caps.clear();
            } else {
                for d in &drop {
                    let d = cap_name(d, &at)?;
                    caps.retain(|c| *c != d);
                }
            }
            if add.iter().any(|a| a == "ALL") {
                caps = ALL_CAPABILITIES.iter().map(|s| s.to_string()).collect();
            } else {
                for a in &add {
                    let a = cap_name(a, &at)?;
                    if !caps.contains(&a) {
                        caps.push(a);
                    }
                }
            }
        }
        uid = sc.int("runAsUser")?.or(uid);
        gid = sc.int("runAsGroup")?.or(gid);
        non_root = sc.bool("runAsNonRoot")?.or(non_root);
        readonly_root = sc.bool("readOnlyRootFilesystem")?.unwrap_or(false);
        if let Some(allow) = sc.bool("allowPrivilegeEscalation")? {
            ensure!(
                allow || !caps.iter().any(|c| c == "CAP_SYS_ADMIN"),
                "{}: allowPrivilegeEscalation false with CAP_SYS_ADMIN is refused by the API server",
                sc.at
            );
            no_new_privs = !allow;
        }
        if let Some(mut s) = sc.obj("seccompProfile")? {
            seccomp = Some(s.str("type")?.unwrap_or_default().to_owned());
            s.get("localhostProfile");
            s.done(&mut ignored)?;
        }
        sc.done(&mut ignored)?;
    }
    let (image_uid, image_gid) = match inputs.image.user.split_once(':') {
        _ if inputs.image.user.is_empty() => (0, 0),
        Some((u, g)) => (
            u.parse().context("image USER uid: only numeric users")?,
            g.parse().context("image USER gid: only numeric groups")?,
        ),
        None => (
            inputs
                .image
                .user
                .parse()
                .context("image USER: only numeric users")?,
            0,
        ),
    };
    let uid = uid
        .map_or(Ok(image_uid), u32::try_from)
        .context("runAsUser")?;
    let gid = gid
        .map_or(Ok(image_gid), u32::try_from)
        .context("runAsGroup")?;
    ensure!(
        !(non_root == Some(true) && uid == 0),
        "runAsNonRoot with uid 0: the kubelet would not start the container"
    );
    let seccomp = match seccomp.as_deref() {
        Some("RuntimeDefault") => Seccomp::RuntimeDefault,
        Some("Unconfined") | None => Seccomp::Unconfined,
        Some(other) => bail!("seccompProfile type {other:?} is not honoured"),
    };

    // Mounts: the runtime's, then the kubelet's ordered by depth.
    let mut kubelet_mounts: Vec<Value> = Vec::new();
    for (at, m) in c.list("volumeMounts")? {
        let mut m = Obj::new(m, &at)?;
        let name = m
            .str("name")?
            .with_context(|| format!("{at}.name: missing"))?;
        let dest = m
            .str("mountPath")?
            .with_context(|| format!("{at}.mountPath: missing"))?;
        let readonly = m.bool("readOnly")?.unwrap_or(false);
        if let Some(p) = m.str("mountPropagation")? {
            ensure!(
                p == "None",
                "{at}.mountPropagation {p}: only None is honoured"
            );
        }
        m.done(&mut ignored)?;
        let source = volumes
            .get(name)
            .with_context(|| format!("{at}: no volume named {name}"))?;
        kubelet_mounts.push(bind_mount(dest, source, readonly));
    }
    if automount {
        let dir = inputs.service_account_dir.context(
            "automountServiceAccountToken: the test must supply the service-account directory",
        )?;
        kubelet_mounts.push(bind_mount(
            SERVICE_ACCOUNT_DIR,
            &dir.to_string_lossy(),
            true,
        ));
    }
    let depth = |m: &Value| {
        m["destination"]
            .as_str()
            .map_or(0, |d| d.split('/').filter(|s| !s.is_empty()).count())
    };
    kubelet_mounts.sort_by_key(depth);
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc",
               "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
               "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts",
               "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
               "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
               "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs",
               "options": ["nosuid", "noexec", "nodev", "ro"]}),
        json!({"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
               "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]}),
    ];
    mounts.extend(kubelet_mounts);

    // Namespaces.
    let mut namespaces = Vec::new();
    if !host_pid {
        namespaces.push(json!({"type": "pid"}));
    }
    if !host_ipc {
        namespaces.push(json!({"type": "ipc"}));
    }
    if !host_network {
        namespaces.push(json!({"type": "uts"}));
    }
    namespaces.push(json!({"type": "mount"}));
    namespaces.push(json!({"type": "cgroup"}));
    if !host_network {
        let netns = inputs
            .netns
            .context("a pod without hostNetwork needs the network namespace the test made")?;
        namespaces.push(json!({"type": "network", "path": netns}));
    }

    // cgroups (cgroupfs driver) and resources.
    let cgroups_path = match qos {
        Qos::Guaranteed => format!("/kubepods/pod{}/{}", inputs.pod_uid, inputs.container_id),
        Qos::Burstable => format!(
            "/kubepods/burstable/pod{}/{}",
            inputs.pod_uid, inputs.container_id
        ),
        Qos::BestEffort => format!(
            "/kubepods/besteffort/pod{}/{}",
            inputs.pod_uid, inputs.container_id
        ),
    };
    let mut resources = json!({"devices": [{"allow": false, "access": "rwm"}]});
    if let Some(limit) = lim_mem {
        resources["memory"] = json!({"limit": limit});
    }
    let mut cpu = Map::new();
    // The kubelet's MilliCPUToShares; BestEffort gets the minimum, 2.
    let shares = req_cpu.map_or(2, |m| (m * 1024 / 1000).max(2));
    cpu.insert("shares".into(), json!(shares));
    if let Some(limit) = lim_cpu {
        cpu.insert("quota".into(), json!((limit * 100_000 / 1000).max(1_000)));
        cpu.insert("period".into(), json!(100_000));
    }
    resources["cpu"] = Value::Object(cpu);

    let mut env: Vec<String> = inputs.image.env.clone();
    let hostname = if host_network {
        // The node's name, as the pod's hostname is on hostNetwork.
        inputs.node_name.to_owned()
    } else {
        inputs.pod_name.to_owned()
    };
    env.push(format!("HOSTNAME={hostname}"));
    env.extend(container_env.iter().map(|(k, v)| format!("{k}={v}")));

    let mut linux = json!({
        "cgroupsPath": cgroups_path,
        "resources": resources,
        "namespaces": namespaces,
        "maskedPaths": MASKED_PATHS,
        "readonlyPaths": READONLY_PATHS,
    });
    if seccomp == Seccomp::RuntimeDefault {
        let generate = inputs.runtime_default_seccomp.context(
            "seccompProfile RuntimeDefault: the test must supply the runtime's default profile",
        )?;
        linux["seccomp"] = generate(&caps)?;
    }
    let mut config = json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": uid, "gid": gid, "additionalGids": [gid]},
            "args": argv,
            "env": env,
            "cwd": cwd,
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "noNewPrivileges": no_new_privs,
        },
        "root": {"path": inputs.rootfs, "readonly": readonly_root},
        "mounts": mounts,
        "linux": linux,
    });
    if !host_network {
        config["hostname"] = json!(hostname);
    }

    c.done(&mut ignored)?;
    pod.done(&mut ignored)?;
    template.done(&mut ignored)?;
    spec.done(&mut ignored)?;
    top.done(&mut ignored)?;
    Ok(Pod {
        namespace,
        labels,
        container_name,
        image,
        qos,
        cgroups_path,
        host_network,
        ports,
        liveness,
        readiness,
        scrape,
        termination_grace,
        capabilities: caps,
        seccomp,
        ignored,
        config,
    })
}

/// A hostPath (or service-account) mount as containerd's CRI plugin writes it.
fn bind_mount(dest: &str, source: &str, readonly: bool) -> Value {
    json!({
        "destination": dest,
        "type": "bind",
        "source": source,
        "options": ["rbind", "rprivate", if readonly { "ro" } else { "rw" }],
    })
}

// ---------------------------------------------------------------------------------------------
// Seccomp: containerd's own RuntimeDefault

/// containerd's socket on this machine: a standalone containerd's, else dockerd's.
pub fn containerd_socket() -> Option<PathBuf> {
    [
        "/run/containerd/containerd.sock",
        "/var/run/docker/containerd/containerd.sock",
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

/// The seccomp profile containerd's CRI plugin applies for `RuntimeDefault` to a container with
/// bounding set `caps`: containerd's `contrib/seccomp.DefaultProfile`, which is what
/// `ctr containers create --seccomp` puts in the spec (capabilities are set before it, as in
/// CRI). The container is only created (no task, no snapshot) in a namespace of its own, read
/// back and removed. Returns the profile and the containerd version that made it.
pub fn containerd_runtime_default(caps: &[String]) -> Result<(Value, String)> {
    let socket = containerd_socket().context("no containerd socket on this machine")?;
    let address = socket.to_string_lossy().into_owned();
    let namespace = crate::unique("obs-seccomp");
    let id = "profile";
    let rootfs = TempDir::new("obs-seccomp-rootfs")?;
    let ctr = |args: &[&str]| -> Result<String> {
        let mut all = vec!["--address", &address, "-n", &namespace];
        all.extend_from_slice(args);
        crate::sh("ctr", &all)
    };
    let mut args: Vec<String> = vec!["containers".into(), "create".into(), "--seccomp".into()];
    for c in caps {
        args.push("--cap-add".into());
        args.push(c.clone());
    }
    for c in ALL_CAPABILITIES
        .iter()
        .filter(|c| !caps.iter().any(|k| k == *c))
    {
        args.push("--cap-drop".into());
        args.push(c.to_string());
    }
    args.push("--rootfs".into());
    args.push(rootfs.path().to_string_lossy().into_owned());
    args.push(id.into());
    args.push("/observer".into());
    let created = ctr(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let info = created.and_then(|_| ctr(&["containers", "info", id]));
    let _ = ctr(&["containers", "rm", id]);
    let _ = crate::sh(
        "ctr",
        &["--address", &address, "namespaces", "rm", &namespace],
    );
    let info: Value = serde_json::from_str(&info?).context("ctr containers info")?;
    let spec = &info["Spec"];
    let bounding: Vec<String> = spec["process"]["capabilities"]["bounding"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let (mut want, mut got) = (caps.to_vec(), bounding);
    want.sort();
    got.sort();
    ensure!(
        want == got,
        "ctr made a spec with capabilities {got:?}, not {want:?}"
    );
    let profile = spec["linux"]["seccomp"].clone();
    ensure!(profile.is_object(), "ctr made no seccomp profile: {spec}");
    let version = crate::sh("containerd", &["--version"])
        .unwrap_or_default()
        .split_whitespace()
        .nth(2)
        .unwrap_or("unknown")
        .to_owned();
    Ok((profile, version))
}

/// Whether an OCI seccomp profile lets `syscall` through unconditionally.
pub fn seccomp_allows(profile: &Value, syscall: &str) -> bool {
    profile["syscalls"].as_array().is_some_and(|rules| {
        rules.iter().any(|r| {
            r["action"] == "SCMP_ACT_ALLOW"
                && r["args"].as_array().is_none_or(|a| a.is_empty())
                && r["names"]
                    .as_array()
                    .is_some_and(|n| n.iter().any(|n| n == syscall))
        })
    })
}

// ---------------------------------------------------------------------------------------------
// Bundles and runc

/// A directory removed with everything in it when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(label: &str) -> Result<Self> {
        let path = std::env::temp_dir().join(crate::unique(label));
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self(path))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.0) {
            eprintln!("could not remove {}: {e}", self.0.display());
        }
    }
}

/// An image's root filesystem, exported with `docker create` + `docker export` into a
/// directory of its own: what a runtime's snapshotter would give the container.
pub struct Rootfs {
    dir: TempDir,
    pub config: ImageConfig,
}

impl Rootfs {
    pub fn export(image: &str) -> Result<Self> {
        let config = ImageConfig::inspect(image)?;
        let dir = TempDir::new("obs-rootfs")?;
        let rootfs = dir.path().join("rootfs");
        fs::create_dir(&rootfs)?;
        let id = crate::sh("docker", &["create", image])?.trim().to_owned();
        let exported = (|| -> Result<()> {
            let mut export = Command::new("docker")
                .args(["export", &id])
                .stdout(Stdio::piped())
                .spawn()
                .context("docker export")?;
            let tar = Command::new("tar")
                .arg("-C")
                .arg(&rootfs)
                .arg("-x")
                .stdin(export.stdout.take().expect("piped"))
                .status()
                .context("tar -x")?;
            let export = export.wait()?;
            ensure!(
                export.success() && tar.success(),
                "docker export | tar -x failed"
            );
            Ok(())
        })();
        let _ = crate::sh("docker", &["rm", "-f", &id]);
        exported?;
        Ok(Self { dir, config })
    }

    /// The root filesystem (absolute).
    pub fn path(&self) -> PathBuf {
        self.dir.path().join("rootfs")
    }
}

/// Makes this process the reaper of its orphaned descendants, as containerd's shim is: a
/// container started with `runc run -d` becomes its child once runc exits, so its exit status
/// can be read with waitpid.
pub fn become_subreaper() -> Result<()> {
    // SAFETY: prctl with integer arguments.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    ensure!(
        rc == 0,
        "PR_SET_CHILD_SUBREAPER: {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

enum Reap {
    Exited(Exit),
    Running,
    NotOurs,
}

/// How a container ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

/// A container started with `runc run -d` from a bundle of its own (config.json, stdout and
/// stderr files; the root filesystem is shared). `runc delete -f` on drop, the exit reaped,
/// the cgroup parents the runtime made removed, the bundle directory removed.
pub struct Runc {
    pub id: String,
    pub pid: i32,
    pub started: Instant,
    bundle: TempDir,
    cgroups_path: String,
    exit: std::cell::Cell<Option<Exit>>,
}

impl Runc {
    /// Writes `config` and runs `runc run -d`; the container's stdout and stderr go to files.
    /// Call [`become_subreaper`] first to get exit statuses.
    pub fn run(id: &str, config: &Value) -> Result<Self> {
        let bundle = TempDir::new("obs-bundle")?;
        fs::write(
            bundle.path().join("config.json"),
            serde_json::to_vec_pretty(config)?,
        )?;
        let stdout = fs::File::create(bundle.path().join("stdout.log"))?;
        let stderr = fs::File::create(bundle.path().join("stderr.log"))?;
        let pid_file = bundle.path().join("pid");
        let started = Instant::now();
        let cgroups_path = config["linux"]["cgroupsPath"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let status = Command::new("runc")
            .arg("run")
            .arg("-d")
            .arg("--bundle")
            .arg(bundle.path())
            .arg("--pid-file")
            .arg(&pid_file)
            .arg(id)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .status()
            .context("runc run -d")?;
        let mut runc = Self {
            id: id.to_owned(),
            pid: 0,
            started,
            bundle,
            cgroups_path,
            exit: std::cell::Cell::new(None),
        };
        ensure!(
            status.success(),
            "runc run -d {id} failed ({status}):\n{}",
            runc.log()
        );
        runc.pid = fs::read_to_string(&pid_file)?
            .trim()
            .parse()
            .context("runc's pid file")?;
        Ok(runc)
    }

    /// stdout, then stderr (observer's log, and runc's own errors).
    pub fn log(&self) -> String {
        let read =
            |name: &str| fs::read_to_string(self.bundle.path().join(name)).unwrap_or_default();
        format!("{}{}", read("stdout.log"), read("stderr.log"))
    }

    /// The exit, if the container's process has ended (reaped here: see [`become_subreaper`]).
    pub fn exited(&self) -> Option<Exit> {
        match self.reap() {
            Reap::Exited(exit) => Some(exit),
            Reap::Running | Reap::NotOurs => None,
        }
    }

    fn reap(&self) -> Reap {
        if let Some(exit) = self.exit.get() {
            return Reap::Exited(exit);
        }
        if self.pid <= 0 {
            return Reap::NotOurs;
        }
        let mut status = 0;
        // SAFETY: waitpid on one pid with a valid status pointer.
        let rc = unsafe { libc::waitpid(self.pid, &mut status, libc::WNOHANG) };
        if rc == self.pid {
            let exit = if libc::WIFEXITED(status) {
                Exit::Code(libc::WEXITSTATUS(status))
            } else {
                Exit::Signal(libc::WTERMSIG(status))
            };
            self.exit.set(Some(exit));
            return Reap::Exited(exit);
        }
        if rc < 0 {
            // Not (or no longer) our child: without the subreaper, or already reaped.
            return Reap::NotOurs;
        }
        Reap::Running
    }

    /// Waits up to `timeout` for the exit; None if it did not come (or is not ours to see).
    pub fn wait(&self, timeout: Duration) -> Option<Exit> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.reap() {
                Reap::Exited(exit) => return Some(exit),
                Reap::NotOurs if !Path::new(&format!("/proc/{}", self.pid)).exists() => {
                    return None
                }
                _ => {}
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `runc kill <id> <signal>`.
    pub fn kill(&self, signal: &str) -> Result<()> {
        crate::sh("runc", &["kill", &self.id, signal]).map(|_| ())
    }

    /// /proc/<pid>/status of the container's process.
    pub fn proc_status(&self) -> Result<String> {
        Ok(fs::read_to_string(format!("/proc/{}/status", self.pid))?)
    }
}

impl Drop for Runc {
    fn drop(&mut self) {
        if let Err(e) = crate::sh("runc", &["delete", "-f", &self.id]) {
            if !e.to_string().contains("does not exist") {
                eprintln!("cleanup: {e}");
            }
        }
        let _ = self.wait(Duration::from_secs(5));
        remove_cgroup_parents(&self.cgroups_path);
    }
}

/// rmdir the directories of `path` (relative to a hierarchy root) in every cgroup hierarchy,
/// deepest first; a directory still in use (another test's) stays.
pub fn remove_cgroup_parents(path: &str) {
    let relative = path.trim_matches('/');
    if relative.is_empty() || relative.contains("..") {
        return;
    }
    let mut roots = vec![PathBuf::from("/sys/fs/cgroup")];
    if let Ok(entries) = fs::read_dir("/sys/fs/cgroup") {
        roots.extend(entries.flatten().map(|e| e.path()));
    }
    for root in roots {
        let mut p = Path::new(relative);
        loop {
            let _ = fs::remove_dir(root.join(p));
            match p.parent() {
                Some(parent) if !parent.as_os_str().is_empty() => p = parent,
                _ => break,
            }
        }
    }
}

/// Capability names of a `CapEff:`-style hex mask.
pub fn capability_names(mask: u64) -> Vec<&'static str> {
    ALL_CAPABILITIES
        .iter()
        .enumerate()
        .filter(|(i, _)| mask & (1u64 << i) != 0)
        .map(|(_, n)| *n)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn daemonset() -> Value {
        load_daemonset(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes/daemonset.yaml"),
        )
        .expect("deploy/kubernetes/daemonset.yaml")
    }

    fn image() -> ImageConfig {
        ImageConfig {
            entrypoint: vec!["/observer".into()],
            cmd: vec![],
            env: vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()],
            user: "0:0".into(),
            working_dir: String::new(),
        }
    }

    /// A fake RuntimeDefault: says which capabilities it was made for.
    fn fake_seccomp(caps: &[String]) -> Result<Value> {
        Ok(json!({"defaultAction": "SCMP_ACT_ERRNO", "made_for": caps}))
    }

    fn translate_with(ds: &Value, secrets: &BTreeMap<(String, String), String>) -> Result<Pod> {
        // The manifest's state dir is the node's /var/lib/observer, which DirectoryOrCreate
        // would make: a directory of the test's instead.
        let state = TempDir::new("obs-k8s-unit-state")?;
        translate_paths(
            ds,
            secrets,
            &[("state", state.path().join("observer"))].into(),
        )
    }

    fn translate_paths(
        ds: &Value,
        secrets: &BTreeMap<(String, String), String>,
        host_paths: &BTreeMap<&str, PathBuf>,
    ) -> Result<Pod> {
        let host_paths: BTreeMap<String, PathBuf> = host_paths
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect();
        let image = image();
        let inputs = Inputs {
            image: &image,
            rootfs: Path::new("/tmp/rootfs"),
            pod_name: "observer-abcde",
            pod_uid: "0d1c2b3a-4f5e-6d7c-8b9a-0f1e2d3c4b5a",
            container_id: &"ab".repeat(32),
            node_name: "node-1",
            host_ip: "10.201.7.1",
            pod_ip: "10.201.7.2",
            secrets,
            service_env: &[("KUBERNETES_SERVICE_HOST".into(), "10.201.7.1".into())],
            netns: Some(Path::new("/run/netns/pod")),
            service_account_dir: Some(Path::new("/tmp/sa")),
            runtime_default_seccomp: Some(&fake_seccomp),
            test_env: &[("OBSERVER_INTERVAL".into(), "2s".into())],
            host_paths: &host_paths,
        };
        translate(ds, &inputs)
    }

    fn env_of(pod: &Pod) -> Vec<String> {
        pod.config["process"]["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect()
    }

    fn mount<'a>(pod: &'a Pod, dest: &str) -> &'a Value {
        pod.config["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["destination"] == dest)
            .unwrap_or_else(|| panic!("no mount at {dest}: {}", pod.config["mounts"]))
    }

    #[test]
    fn the_daemonset_translates_as_containerd_would() {
        let pod = translate_with(&daemonset(), &BTreeMap::new()).unwrap();
        let p = &pod.config["process"];
        assert_eq!(p["args"], json!(["/observer"]));
        let caps = json!(["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"]);
        for set in ["bounding", "effective", "permitted"] {
            assert_eq!(p["capabilities"][set], caps, "{set}");
        }
        assert!(p["capabilities"].get("ambient").is_none());
        assert_eq!(p["user"]["uid"], 0);
        assert_eq!(p["noNewPrivileges"], true);
        assert_eq!(pod.config["root"]["readonly"], true);
        let env = env_of(&pod);
        for want in [
            "OBSERVER_PLATFORM=kubernetes",
            "OBSERVER_HOST_ROOT=/host",
            "OBSERVER_PROMETHEUS_LISTEN=0.0.0.0:9435",
            "NODE_NAME=node-1",
            "NODE_IP=10.201.7.1",
            "HOSTNAME=observer-abcde",
            "KUBERNETES_SERVICE_HOST=10.201.7.1",
            "OBSERVER_INTERVAL=2s",
        ] {
            assert!(env.iter().any(|e| e == want), "{want} not in {env:?}");
        }
        // The optional secret is not supplied: no variable at all.
        assert!(
            !env.iter().any(|e| e.starts_with("MACKEREL_APIKEY")),
            "{env:?}"
        );
        // Image env first, the test's last.
        assert!(env[0].starts_with("PATH="));
        assert_eq!(env.last().unwrap(), "OBSERVER_INTERVAL=2s");

        let types: Vec<&str> = pod.config["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["pid", "ipc", "uts", "mount", "cgroup", "network"]);
        assert_eq!(
            pod.config["linux"]["namespaces"][5]["path"],
            "/run/netns/pod"
        );
        assert_eq!(pod.config["hostname"], "observer-abcde");

        assert_eq!(
            mount(&pod, "/host/sys/fs/cgroup"),
            &json!({"destination": "/host/sys/fs/cgroup", "type": "bind", "source": "/sys/fs/cgroup",
                    "options": ["rbind", "rprivate", "ro"]})
        );
        assert_eq!(mount(&pod, "/host/proc")["options"][2], "ro");
        assert_eq!(mount(&pod, "/sys/fs/bpf")["options"][2], "rw");
        assert_eq!(mount(&pod, SERVICE_ACCOUNT_DIR)["source"], "/tmp/sa");
        assert_eq!(mount(&pod, SERVICE_ACCOUNT_DIR)["options"][2], "ro");
        assert_eq!(mount(&pod, "/sys")["options"][3], "ro");
        for dest in ["/proc", "/dev", "/dev/pts", "/dev/shm", "/dev/mqueue"] {
            mount(&pod, dest);
        }
        // /sys before /sys/fs/bpf: a parent is mounted before what goes on it.
        let dests: Vec<&str> = pod.config["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["destination"].as_str().unwrap())
            .collect();
        let at = |d: &str| dests.iter().position(|x| *x == d).unwrap();
        assert!(at("/sys") < at("/sys/fs/bpf"), "{dests:?}");

        assert_eq!(pod.qos, Qos::Burstable);
        assert_eq!(
            pod.config["linux"]["cgroupsPath"],
            format!(
                "/kubepods/burstable/pod0d1c2b3a-4f5e-6d7c-8b9a-0f1e2d3c4b5a/{}",
                "ab".repeat(32)
            )
        );
        assert_eq!(
            pod.config["linux"]["resources"]["memory"]["limit"],
            256u64 << 20
        );
        assert_eq!(pod.config["linux"]["resources"]["cpu"]["shares"], 51);
        assert!(pod.config["linux"]["resources"]["cpu"]
            .get("quota")
            .is_none());
        assert_eq!(pod.seccomp, Seccomp::RuntimeDefault);
        assert_eq!(
            pod.config["linux"]["seccomp"]["made_for"],
            json!(["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"])
        );
        assert!(pod.config["process"].get("rlimits").is_none());

        let readiness = pod.readiness.as_ref().unwrap();
        assert_eq!((readiness.path.as_str(), readiness.port), ("/readyz", 9435));
        let liveness = pod.liveness.as_ref().unwrap();
        assert_eq!((liveness.path.as_str(), liveness.port), ("/healthz", 9435));
        assert_eq!(liveness.initial_delay, Duration::from_secs(10));
        assert_eq!(pod.scrape, Some((9435, "/metrics".to_owned())));
        assert_eq!(pod.termination_grace, Duration::from_secs(30));
        assert_eq!(pod.namespace, "observer");
        assert_eq!(pod.container_name, "observer");
        let ignored: Vec<&str> = pod.ignored.iter().map(|i| i.field.as_str()).collect();
        for field in [
            "spec.updateStrategy",
            "spec.template.spec.tolerations",
            "spec.template.spec.priorityClassName",
        ] {
            assert!(ignored.contains(&field), "{field} not in {ignored:?}");
        }
    }

    #[test]
    fn a_supplied_secret_is_set_and_a_missing_required_one_fails() {
        let mut secrets = BTreeMap::new();
        secrets.insert(("observer-mackerel".into(), "apikey".into()), "k3y".into());
        let pod = translate_with(&daemonset(), &secrets).unwrap();
        assert!(env_of(&pod).contains(&"MACKEREL_APIKEY=k3y".to_owned()));

        let mut ds = daemonset();
        let env = container_mut(&mut ds)["env"].as_array_mut().unwrap();
        let mackerel = env
            .iter_mut()
            .find(|e| e["name"] == "MACKEREL_APIKEY")
            .unwrap();
        mackerel["valueFrom"]["secretKeyRef"]["optional"] = json!(false);
        let err = translate_with(&ds, &BTreeMap::new())
            .unwrap_err()
            .to_string();
        assert!(err.contains("not supplied and not optional"), "{err}");
    }

    #[test]
    fn an_unknown_field_fails_the_translation() {
        let mut ds = daemonset();
        container_mut(&mut ds)["stdin"] = json!(true);
        let err = translate_with(&ds, &BTreeMap::new())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("spec.template.spec.containers[0].stdin")
                && err.contains("does not honour"),
            "{err}"
        );

        let mut ds = daemonset();
        ds["spec"]["template"]["spec"]["dnsPolicy"] = json!("ClusterFirstWithHostNet");
        let err = translate_with(&ds, &BTreeMap::new())
            .unwrap_err()
            .to_string();
        assert!(err.contains("spec.template.spec.dnsPolicy"), "{err}");

        let mut ds = daemonset();
        container_mut(&mut ds)["securityContext"]["procMount"] = json!("Unmasked");
        let err = translate_with(&ds, &BTreeMap::new())
            .unwrap_err()
            .to_string();
        assert!(err.contains("securityContext.procMount"), "{err}");

        let mut ds = daemonset();
        ds["spec"]["minReadySeconds"] = json!(5);
        let err = translate_with(&ds, &BTreeMap::new())
            .unwrap_err()
            .to_string();
        assert!(err.contains("spec.minReadySeconds"), "{err}");
    }

    #[test]
    fn unsupported_values_fail_too() {
        type Change = Box<dyn Fn(&mut Value)>;
        let cases: Vec<(Change, &str)> = vec![
            (
                Box::new(|ds| container_mut(ds)["securityContext"]["privileged"] = json!(true)),
                "privileged: true",
            ),
            (
                Box::new(|ds| {
                    container_mut(ds)["securityContext"]["capabilities"]["add"] =
                        json!(["SYS_ADMIN", "NET_ADMIN"])
                }),
                "allowPrivilegeEscalation false with CAP_SYS_ADMIN",
            ),
            (
                Box::new(|ds| {
                    ds["spec"]["template"]["spec"]["volumes"][0] =
                        json!({"name": "host-cgroup", "emptyDir": {}})
                }),
                "only hostPath volumes",
            ),
            (
                Box::new(|ds| {
                    ds["spec"]["template"]["spec"]["volumes"][0]["hostPath"]["path"] =
                        json!("/no/such/dir")
                }),
                "is not a directory on this node",
            ),
            (
                Box::new(|ds| {
                    container_mut(ds)["env"][0] = json!({"name": "X", "valueFrom":
                        {"configMapKeyRef": {"name": "c", "key": "k"}}})
                }),
                "only fieldRef and secretKeyRef",
            ),
            (
                Box::new(|ds| {
                    container_mut(ds)["securityContext"]["seccompProfile"] =
                        json!({"type": "Localhost", "localhostProfile": "x.json"})
                }),
                "\"Localhost\" is not honoured",
            ),
            (
                Box::new(|ds| {
                    container_mut(ds)["securityContext"]["capabilities"]["add"] = json!(["BFP"])
                }),
                "unknown capability",
            ),
            (
                Box::new(|ds| {
                    container_mut(ds)["readinessProbe"]["httpGet"]["port"] = json!("web")
                }),
                "no containerPort named \"web\"",
            ),
        ];
        for (change, want) in cases {
            let mut ds = daemonset();
            change(&mut ds);
            let err = format!("{:#}", translate_with(&ds, &BTreeMap::new()).unwrap_err());
            assert!(err.contains(want), "wanted {want:?} in: {err}");
        }
    }

    #[test]
    fn directory_or_create_is_made_as_the_kubelet_makes_it() {
        use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
        let dir = TempDir::new("obs-k8s-unit-doc").unwrap();
        let state = dir.path().join("var/lib/observer");
        let pod = translate_paths(
            &daemonset(),
            &BTreeMap::new(),
            &[("state", state.clone())].into(),
        )
        .unwrap();
        let meta = fs::metadata(&state).expect("DirectoryOrCreate made the directory");
        assert!(meta.is_dir());
        assert_eq!(meta.permissions().mode() & 0o7777, 0o755);
        // SAFETY: geteuid cannot fail.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(meta.uid(), euid);
        let m = mount(&pod, "/var/lib/observer");
        assert_eq!(m["source"], state.to_str().unwrap());
        let opts = m["options"].as_array().unwrap();
        assert!(!opts.iter().any(|o| o == "ro"), "{m}");
        // There already: used as it is.
        fs::set_permissions(&state, fs::Permissions::from_mode(0o700)).unwrap();
        translate_paths(
            &daemonset(),
            &BTreeMap::new(),
            &[("state", state.clone())].into(),
        )
        .unwrap();
        assert_eq!(
            fs::metadata(&state).unwrap().permissions().mode() & 0o7777,
            0o700
        );
        // A file in its place fails, as the kubelet fails the pod.
        let file = dir.path().join("file");
        fs::write(&file, b"").unwrap();
        let err = translate_paths(&daemonset(), &BTreeMap::new(), &[("state", file)].into())
            .unwrap_err()
            .to_string();
        assert!(err.contains("DirectoryOrCreate"), "{err}");
        // A volume the pod does not have.
        let err = translate_paths(
            &daemonset(),
            &BTreeMap::new(),
            &[("state", state.clone()), ("cache", state)].into(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("volume cache") && err.contains("does not declare"),
            "{err}"
        );
    }

    #[test]
    fn host_network_and_host_pid_share_the_nodes_namespaces() {
        let mut ds = daemonset();
        ds["spec"]["template"]["spec"]["hostNetwork"] = json!(true);
        ds["spec"]["template"]["spec"]["hostPID"] = json!(true);
        let pod = translate_with(&ds, &BTreeMap::new()).unwrap();
        let types: Vec<&str> = pod.config["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["ipc", "mount", "cgroup"]);
        assert!(pod.config.get("hostname").is_none());
        assert!(env_of(&pod).contains(&"HOSTNAME=node-1".to_owned()));
    }

    #[test]
    fn capabilities_start_from_containerds_defaults_unless_all_are_dropped() {
        let mut ds = daemonset();
        container_mut(&mut ds)["securityContext"]["capabilities"] =
            json!({"drop": ["NET_RAW", "MKNOD"], "add": ["BPF"]});
        let pod = translate_with(&ds, &BTreeMap::new()).unwrap();
        assert!(pod.capabilities.contains(&"CAP_CHOWN".to_owned()));
        assert!(pod.capabilities.contains(&"CAP_BPF".to_owned()));
        assert!(!pod.capabilities.contains(&"CAP_NET_RAW".to_owned()));
        assert!(!pod.capabilities.contains(&"CAP_MKNOD".to_owned()));
        assert_eq!(
            pod.capabilities.len(),
            CONTAINERD_DEFAULT_CAPABILITIES.len() - 1
        );
    }

    #[test]
    fn guaranteed_and_best_effort_pods_have_their_cgroup_parents() {
        let mut ds = daemonset();
        container_mut(&mut ds)["resources"] = json!({"limits": {"cpu": "500m", "memory": "128Mi"}});
        let pod = translate_with(&ds, &BTreeMap::new()).unwrap();
        assert_eq!(pod.qos, Qos::Guaranteed);
        assert!(
            pod.cgroups_path.starts_with("/kubepods/pod0d1c"),
            "{}",
            pod.cgroups_path
        );
        let cpu = &pod.config["linux"]["resources"]["cpu"];
        assert_eq!(
            (cpu["shares"].clone(), cpu["quota"].clone()),
            (json!(512), json!(50_000))
        );
        let mut ds = daemonset();
        container_mut(&mut ds)
            .as_object_mut()
            .unwrap()
            .remove("resources");
        let pod = translate_with(&ds, &BTreeMap::new()).unwrap();
        assert_eq!(pod.qos, Qos::BestEffort);
        assert!(pod.cgroups_path.starts_with("/kubepods/besteffort/pod"));
    }

    #[test]
    fn command_args_and_expansion_follow_the_kubelet() {
        let mut env = BTreeMap::new();
        env.insert("NODE_IP".to_owned(), "10.0.0.1".to_owned());
        assert_eq!(
            expand("https://$(NODE_IP):10250", &env),
            "https://10.0.0.1:10250"
        );
        assert_eq!(
            expand("$(UNSET) $$(NODE_IP) $5", &env),
            "$(UNSET) $(NODE_IP) $5"
        );
        assert_eq!(expand("$(open", &env), "$(open");
        let mut ds = daemonset();
        container_mut(&mut ds)["args"] = json!(["--kubelet-url", "https://$(NODE_IP):10250"]);
        let pod = translate_with(&ds, &BTreeMap::new()).unwrap();
        assert_eq!(
            pod.config["process"]["args"],
            json!(["/observer", "--kubelet-url", "https://10.201.7.1:10250"])
        );
        container_mut(&mut ds)["command"] = json!(["/bin/other"]);
        let pod = translate_with(&ds, &BTreeMap::new()).unwrap();
        assert_eq!(pod.config["process"]["args"][0], "/bin/other");
    }

    #[test]
    fn quantities() {
        assert_eq!(millicores("50m").unwrap(), 50);
        assert_eq!(millicores("2").unwrap(), 2000);
        assert_eq!(millicores("0.25").unwrap(), 250);
        assert_eq!(bytes("256Mi").unwrap(), 256 << 20);
        assert_eq!(bytes("1G").unwrap(), 1_000_000_000);
        assert_eq!(bytes("4096").unwrap(), 4096);
        assert!(bytes("lots").is_err());
        assert_eq!(generic("a.b[3].c[12].d"), "a.b[].c[].d");
        assert_eq!(
            capability_names(0x000000c000001000),
            ["CAP_NET_ADMIN", "CAP_PERFMON", "CAP_BPF"]
        );
    }

    #[test]
    fn seccomp_rules_are_read() {
        let profile = json!({"syscalls": [
            {"names": ["read", "bpf"], "action": "SCMP_ACT_ALLOW"},
            {"names": ["clone"], "action": "SCMP_ACT_ALLOW", "args": [{"index": 0}]},
        ]});
        assert!(seccomp_allows(&profile, "bpf"));
        assert!(!seccomp_allows(&profile, "clone"));
        assert!(!seccomp_allows(&profile, "perf_event_open"));
    }
}
