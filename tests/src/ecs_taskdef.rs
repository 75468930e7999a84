//! An ECS task definition (the RegisterTaskDefinition JSON of deploy/ecs/task-definition.json)
//! turned into the `docker run` of one of its containers, the way the ECS agent on an EC2
//! container instance creates it, so a test runs the manifest as written in the local Docker
//! engine.
//!
//! Every key is handled, or deliberately ignored for a stated reason ([`TASK_KEYS`],
//! [`CONTAINER_KEYS`]); any other key is an error, so a test cannot silently drift from the
//! manifest: whoever adds a key to the manifest has to say here what it means for the test.
//!
//! Two things `docker run` cannot express as ECS does:
//! - a health check in exec form (`["CMD", ...]`): `--health-cmd` always makes `CMD-SHELL`,
//!   which runs `/bin/sh -c`, and an image without a shell (observer's is `FROM scratch`) is
//!   then never healthy. The ECS agent hands the array to Docker as it is. So an exec-form check
//!   is returned as [`DockerRun::exec_health_check`], to be baked into a derived image
//!   ([`HealthCheck::dockerfile`]: `HEALTHCHECK ... CMD [...]` is exec form there) that the
//!   test runs instead; the image itself is not changed.
//! - `awslogs` needs CloudWatch: the container logs to Docker's `json-file` driver instead, which
//!   `docker logs` reads.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use anyhow::{bail, ensure, Context as _, Result};
use serde_json::{Map, Value};

/// What the translation does with a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handling {
    /// Turned into `docker run` options.
    Handled,
    /// Deliberately not honoured, for this reason.
    Ignored(&'static str),
}
use Handling::{Handled, Ignored};

/// Keys of the task definition itself.
pub const TASK_KEYS: &[(&str, Handling)] = &[
    ("containerDefinitions", Handled),
    ("networkMode", Handled),
    ("pidMode", Handled),
    ("ipcMode", Handled),
    ("volumes", Handled),
    (
        "family",
        Ignored("the task definition's name in ECS; the test names the container"),
    ),
    (
        "executionRoleArn",
        Ignored(
            "lets the agent pull from ECR and read Secrets Manager: the image is local here \
             and the test supplies each secret's value",
        ),
    ),
    (
        "taskRoleArn",
        Ignored("AWS credentials for the container; none exist here"),
    ),
    (
        "requiresCompatibilities",
        Ignored("a placement check (EC2): this Docker engine plays the container instance"),
    ),
    ("tags", Ignored("AWS resource tags")),
];

/// Keys of a container definition.
pub const CONTAINER_KEYS: &[(&str, Handling)] = &[
    ("name", Handled),
    ("image", Handled),
    ("command", Handled),
    ("cpu", Handled),
    ("memory", Handled),
    ("memoryReservation", Handled),
    ("user", Handled),
    ("privileged", Handled),
    ("readonlyRootFilesystem", Handled),
    ("linuxParameters", Handled),
    ("ulimits", Handled),
    ("environment", Handled),
    ("secrets", Handled),
    ("mountPoints", Handled),
    ("portMappings", Handled),
    ("healthCheck", Handled),
    ("stopTimeout", Handled),
    ("dockerLabels", Handled),
    // Handled by replacement: see LOG_DRIVER_NOTE.
    ("logConfiguration", Handled),
    (
        "essential",
        Ignored("the task stops when an essential container stops; only this container runs"),
    ),
];

const LINUX_PARAMETER_KEYS: &[(&str, Handling)] =
    &[("capabilities", Handled), ("initProcessEnabled", Handled)];
const CAPABILITY_KEYS: &[(&str, Handling)] = &[("add", Handled), ("drop", Handled)];
const VOLUME_KEYS: &[(&str, Handling)] = &[("name", Handled), ("host", Handled)];
const VOLUME_HOST_KEYS: &[(&str, Handling)] = &[("sourcePath", Handled)];
const MOUNT_POINT_KEYS: &[(&str, Handling)] = &[
    ("sourceVolume", Handled),
    ("containerPath", Handled),
    ("readOnly", Handled),
];
const PORT_MAPPING_KEYS: &[(&str, Handling)] = &[
    ("containerPort", Handled),
    ("hostPort", Handled),
    ("protocol", Handled),
    (
        "name",
        Ignored("names the port for Service Connect; nothing in Docker"),
    ),
];
const HEALTH_CHECK_KEYS: &[(&str, Handling)] = &[
    ("command", Handled),
    ("interval", Handled),
    ("timeout", Handled),
    ("retries", Handled),
    ("startPeriod", Handled),
];
const NAME_VALUE_KEYS: &[(&str, Handling)] = &[("name", Handled), ("value", Handled)];
const SECRET_KEYS: &[(&str, Handling)] = &[
    ("name", Handled),
    (
        "valueFrom",
        Ignored("a Secrets Manager / SSM reference: the test supplies the value"),
    ),
];
const ULIMIT_KEYS: &[(&str, Handling)] = &[
    ("name", Handled),
    ("softLimit", Handled),
    ("hardLimit", Handled),
];
const LOG_CONFIGURATION_KEYS: &[(&str, Handling)] = &[
    ("logDriver", Handled),
    (
        "options",
        Ignored("the awslogs options (group, region, prefix) mean nothing to json-file"),
    ),
];

/// Why `awslogs` becomes `json-file`.
pub const LOG_DRIVER_NOTE: &str = "logConfiguration awslogs needs CloudWatch Logs, which is not \
     here: the container logs to Docker's json-file driver, which `docker logs` reads (stdout \
     and stderr apart, as awslogs keeps them in one stream)";

/// The ECS defaults of a healthCheck (Docker's own timeout default, 30 s, differs).
const HEALTH_INTERVAL_DEFAULT: u64 = 30;
const HEALTH_TIMEOUT_DEFAULT: u64 = 5;
const HEALTH_RETRIES_DEFAULT: u64 = 3;

/// What the test adds to or replaces in the task definition.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--name` (the ECS agent names containers `ecs-<family>-<rev>-<name>-<random>`).
    pub container_name: Option<String>,
    /// Environment: a name the task definition sets is replaced in place, others are added.
    pub env: Vec<(String, String)>,
    /// The value of every `secrets` entry, by name (ECS reads them from Secrets Manager).
    pub secrets: BTreeMap<String, String>,
    /// `--label`s, e.g. for cleaning up.
    pub labels: Vec<(String, String)>,
    /// (soft, hard) replacing a ulimit the task definition sets, by name: where the Docker
    /// engine cannot grant it (a dockerd without CAP_SYS_RESOURCE cannot raise a hard limit:
    /// runc then fails the container). Naming one the definition does not set fails.
    pub ulimits: BTreeMap<String, (i64, i64)>,
    /// Host path replacing a volume's `host.sourcePath`, by volume name: a directory the test
    /// made instead of the host's real one (e.g. /var/lib/observer). Naming a volume the
    /// definition does not declare fails.
    pub volume_sources: BTreeMap<String, PathBuf>,
}

/// A container health check as Docker runs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    /// Docker's `Test`: `["CMD", ...]` (exec) or `["CMD-SHELL", "..."]`.
    pub test: Vec<String>,
    pub interval: Duration,
    pub timeout: Duration,
    pub retries: u64,
    /// None: no start period.
    pub start_period: Option<Duration>,
}

impl HealthCheck {
    fn timing(&self) -> Vec<(&'static str, String)> {
        let mut t = vec![
            ("interval", secs(self.interval)),
            ("timeout", secs(self.timeout)),
            ("retries", self.retries.to_string()),
        ];
        if let Some(p) = self.start_period {
            t.push(("start-period", secs(p)));
        }
        t
    }

    /// A Dockerfile deriving from `base` that adds this check (exec form stays exec form:
    /// `HEALTHCHECK CMD ["a", "b"]`).
    pub fn dockerfile(&self, base: &str) -> String {
        let options: Vec<String> = self
            .timing()
            .into_iter()
            .map(|(k, v)| format!("--{k}={v}"))
            .collect();
        let cmd = match self.test.split_first() {
            Some((kind, rest)) if kind == "CMD" => {
                serde_json::to_string(rest).expect("strings serialise")
            }
            _ => self.test[1..].join(" "),
        };
        format!("FROM {base}\nHEALTHCHECK {} CMD {cmd}\n", options.join(" "))
    }
}

fn secs(d: Duration) -> String {
    format!("{}s", d.as_secs())
}

/// One container's `docker run`.
#[derive(Debug, Clone)]
pub struct DockerRun {
    /// Options between `docker run` and the image.
    pub options: Vec<String>,
    pub image: String,
    /// After the image (the container definition's `command`).
    pub command: Vec<String>,
    /// The health check, however it is passed.
    pub health_check: Option<HealthCheck>,
    /// An exec-form health check `docker run` cannot pass: bake it into an image derived from
    /// [`DockerRun::image`] ([`HealthCheck::dockerfile`]) and run that
    /// ([`DockerRun::args_with_image`]).
    pub exec_health_check: Option<HealthCheck>,
    /// `stopTimeout`: how long `docker stop` waits after SIGTERM before SIGKILL.
    pub stop_timeout: Option<Duration>,
    /// What was ignored or replaced, and why.
    pub notes: Vec<String>,
}

impl DockerRun {
    /// `run -d <options> <image> <command>` (without the `docker`).
    pub fn args(&self) -> Vec<String> {
        self.args_with_image(&self.image)
    }

    /// The same with another image (one derived from [`DockerRun::image`]).
    pub fn args_with_image(&self, image: &str) -> Vec<String> {
        let mut args = vec!["run".to_owned(), "-d".to_owned()];
        args.extend(self.options.iter().cloned());
        args.push(image.to_owned());
        args.extend(self.command.iter().cloned());
        args
    }
}

/// Checks that `obj` has only keys of `known`; notes the ignored ones present.
fn check_keys(
    obj: &Map<String, Value>,
    known: &[(&str, Handling)],
    what: &str,
    notes: &mut Vec<String>,
) -> Result<()> {
    for key in obj.keys() {
        match known.iter().find(|(k, _)| k == key) {
            Some((_, Handled)) => {}
            Some((_, Ignored(why))) => notes.push(format!("{what}.{key} ignored: {why}")),
            None => bail!(
                "{what}.{key}: the test does not know how to honour this key; handle it (or \
                 ignore it, with the reason) in tests/src/ecs_taskdef.rs"
            ),
        }
    }
    Ok(())
}

fn object<'a>(v: &'a Value, what: &str) -> Result<&'a Map<String, Value>> {
    v.as_object()
        .with_context(|| format!("{what} is not an object: {v}"))
}

fn array<'a>(v: &'a Value, what: &str) -> Result<&'a Vec<Value>> {
    v.as_array()
        .with_context(|| format!("{what} is not an array: {v}"))
}

fn string<'a>(v: &'a Value, what: &str) -> Result<&'a str> {
    v.as_str()
        .with_context(|| format!("{what} is not a string: {v}"))
}

fn unsigned(v: &Value, what: &str) -> Result<u64> {
    v.as_u64()
        .with_context(|| format!("{what} is not a non-negative integer: {v}"))
}

fn boolean(v: &Value, what: &str) -> Result<bool> {
    v.as_bool()
        .with_context(|| format!("{what} is not a boolean: {v}"))
}

fn strings(v: &Value, what: &str) -> Result<Vec<String>> {
    array(v, what)?
        .iter()
        .enumerate()
        .map(|(i, s)| string(s, &format!("{what}[{i}]")).map(str::to_owned))
        .collect()
}

/// The `docker run` of container `container` of `task_def` with `overrides`.
pub fn docker_run(task_def: &Value, container: &str, overrides: &Overrides) -> Result<DockerRun> {
    let mut notes = Vec::new();
    let task = object(task_def, "the task definition")?;
    check_keys(task, TASK_KEYS, "taskDefinition", &mut notes)?;
    let definitions = array(
        task.get("containerDefinitions")
            .context("the task definition has no containerDefinitions")?,
        "containerDefinitions",
    )?;
    let named: Vec<&Value> = definitions
        .iter()
        .filter(|c| c.get("name").and_then(Value::as_str) == Some(container))
        .collect();
    let def = match named.as_slice() {
        [one] => object(one, container)?,
        [] => bail!("no container named {container:?} in containerDefinitions"),
        _ => bail!("{} containers are named {container:?}", named.len()),
    };
    ensure!(
        definitions.len() == 1,
        "the task definition has {} containers; only one-container tasks are run here \
         (other containers would share the task's namespaces and fate)",
        definitions.len()
    );
    let what = format!("containerDefinitions[{container}]");
    check_keys(def, CONTAINER_KEYS, &what, &mut notes)?;
    let field = |key: &str| def.get(key);
    let at = |key: &str| format!("{what}.{key}");
    let mut o: Vec<String> = Vec::new();
    fn opt(o: &mut Vec<String>, flag: &str, value: String) {
        o.push(flag.to_owned());
        o.push(value);
    }

    if let Some(name) = &overrides.container_name {
        opt(&mut o, "--name", name.clone());
    }
    for (k, v) in &overrides.labels {
        opt(&mut o, "--label", format!("{k}={v}"));
    }
    if let Some(labels) = field("dockerLabels") {
        for (k, v) in object(labels, &at("dockerLabels"))? {
            let v = string(v, &at(&format!("dockerLabels.{k}")))?;
            opt(&mut o, "--label", format!("{k}={v}"));
        }
    }

    // Namespaces of the task.
    let network = match task.get("networkMode") {
        // The default on Linux container instances.
        None => "bridge",
        Some(m) => string(m, "networkMode")?,
    };
    match network {
        "host" | "bridge" | "none" => opt(&mut o, "--network", network.to_owned()),
        other => {
            bail!("networkMode {other:?} cannot run here (awsvpc needs an ENI from the ECS agent)")
        }
    }
    if let Some(mode) = task.get("pidMode") {
        match string(mode, "pidMode")? {
            "host" => opt(&mut o, "--pid", "host".into()),
            other => bail!("pidMode {other:?}: only host is handled"),
        }
    }
    if let Some(mode) = task.get("ipcMode") {
        match string(mode, "ipcMode")? {
            m @ ("host" | "none") => opt(&mut o, "--ipc", m.to_owned()),
            other => bail!("ipcMode {other:?}: only host and none are handled"),
        }
    }

    // Identity and privileges.
    if let Some(user) = field("user") {
        opt(&mut o, "--user", string(user, &at("user"))?.to_owned());
    }
    if let Some(p) = field("privileged") {
        if boolean(p, &at("privileged"))? {
            o.push("--privileged".into());
        }
    }
    if let Some(ro) = field("readonlyRootFilesystem") {
        if boolean(ro, &at("readonlyRootFilesystem"))? {
            o.push("--read-only".into());
        }
    }
    if let Some(lp) = field("linuxParameters") {
        let lp_what = at("linuxParameters");
        let lp = object(lp, &lp_what)?;
        check_keys(lp, LINUX_PARAMETER_KEYS, &lp_what, &mut notes)?;
        if let Some(caps) = lp.get("capabilities") {
            let caps_what = format!("{lp_what}.capabilities");
            let caps = object(caps, &caps_what)?;
            check_keys(caps, CAPABILITY_KEYS, &caps_what, &mut notes)?;
            // Docker applies drops before adds whatever the order (ALL then the adds).
            for (key, flag) in [("drop", "--cap-drop"), ("add", "--cap-add")] {
                if let Some(list) = caps.get(key) {
                    for cap in strings(list, &format!("{caps_what}.{key}"))? {
                        opt(&mut o, flag, cap);
                    }
                }
            }
        }
        if let Some(init) = lp.get("initProcessEnabled") {
            if boolean(init, &format!("{lp_what}.initProcessEnabled"))? {
                o.push("--init".into());
            }
        }
    }
    let mut declared_ulimits = Vec::new();
    if let Some(ulimits) = field("ulimits") {
        for (i, u) in array(ulimits, &at("ulimits"))?.iter().enumerate() {
            let u_what = format!("{}[{i}]", at("ulimits"));
            let u = object(u, &u_what)?;
            check_keys(u, ULIMIT_KEYS, &u_what, &mut notes)?;
            let get = |k: &str| {
                u.get(k)
                    .with_context(|| format!("{u_what} has no {k}"))
                    .and_then(|v| {
                        v.as_i64()
                            .with_context(|| format!("{u_what}.{k} is not an integer: {v}"))
                    })
            };
            let name = string(
                u.get("name")
                    .with_context(|| format!("{u_what} has no name"))?,
                &u_what,
            )?;
            let (mut soft, mut hard) = (get("softLimit")?, get("hardLimit")?);
            if let Some(&(s, h)) = overrides.ulimits.get(name) {
                notes.push(format!(
                    "ulimit {name}={soft}:{hard} replaced by the test with {name}={s}:{h}"
                ));
                (soft, hard) = (s, h);
            }
            opt(&mut o, "--ulimit", format!("{name}={soft}:{hard}"));
            declared_ulimits.push(name);
        }
    }
    for name in overrides.ulimits.keys() {
        ensure!(
            declared_ulimits.contains(&name.as_str()),
            "the test replaces ulimit {name}, which the task definition does not set"
        );
    }

    // Resources, as the agent sets them: cpu units are CPU shares, memory in MiB.
    if let Some(cpu) = field("cpu") {
        // The kernel's minimum of shares; the agent raises 0 and 1 to it.
        let shares = unsigned(cpu, &at("cpu"))?.max(2);
        opt(&mut o, "--cpu-shares", shares.to_string());
    }
    if let Some(m) = field("memoryReservation") {
        opt(
            &mut o,
            "--memory-reservation",
            format!("{}m", unsigned(m, &at("memoryReservation"))?),
        );
    }
    if let Some(m) = field("memory") {
        opt(
            &mut o,
            "--memory",
            format!("{}m", unsigned(m, &at("memory"))?),
        );
    }

    // Environment: the definition's, the test's replacing or adding, then the secrets.
    let mut env: Vec<(String, String)> = Vec::new();
    if let Some(list) = field("environment") {
        for (i, e) in array(list, &at("environment"))?.iter().enumerate() {
            let e_what = format!("{}[{i}]", at("environment"));
            let e = object(e, &e_what)?;
            check_keys(e, NAME_VALUE_KEYS, &e_what, &mut notes)?;
            let get = |k: &str| {
                string(
                    e.get(k).with_context(|| format!("{e_what} has no {k}"))?,
                    &format!("{e_what}.{k}"),
                )
            };
            env.push((get("name")?.to_owned(), get("value")?.to_owned()));
        }
    }
    for (k, v) in &overrides.env {
        match env.iter_mut().find(|(name, _)| name == k) {
            Some(slot) => {
                notes.push(format!("environment {k} replaced by the test"));
                slot.1 = v.clone();
            }
            None => env.push((k.clone(), v.clone())),
        }
    }
    let mut declared_secrets = Vec::new();
    if let Some(list) = field("secrets") {
        for (i, s) in array(list, &at("secrets"))?.iter().enumerate() {
            let s_what = format!("{}[{i}]", at("secrets"));
            let s = object(s, &s_what)?;
            check_keys(s, SECRET_KEYS, &s_what, &mut notes)?;
            let name = string(
                s.get("name")
                    .with_context(|| format!("{s_what} has no name"))?,
                &s_what,
            )?;
            ensure!(
                !env.iter().any(|(k, _)| k == name),
                "secret {name} is also set in the environment"
            );
            let value = overrides.secrets.get(name).with_context(|| {
                format!(
                    "the task definition reads secret {name}; the test supplies no value for it"
                )
            })?;
            env.push((name.to_owned(), value.clone()));
            declared_secrets.push(name);
        }
    }
    for name in overrides.secrets.keys() {
        ensure!(
            declared_secrets.contains(&name.as_str()),
            "the test supplies secret {name}, which the task definition does not declare"
        );
    }
    for (k, v) in env {
        opt(&mut o, "-e", format!("{k}={v}"));
    }

    // Volumes.
    let mut volumes: BTreeMap<&str, String> = BTreeMap::new();
    if let Some(list) = task.get("volumes") {
        for (i, v) in array(list, "volumes")?.iter().enumerate() {
            let v_what = format!("volumes[{i}]");
            let v = object(v, &v_what)?;
            check_keys(v, VOLUME_KEYS, &v_what, &mut notes)?;
            let name = string(
                v.get("name")
                    .with_context(|| format!("{v_what} has no name"))?,
                &v_what,
            )?;
            let host = object(
                v.get("host").with_context(|| {
                    format!("volume {name} has no host (Docker-managed volumes are not handled)")
                })?,
                &format!("{v_what}.host"),
            )?;
            check_keys(
                host,
                VOLUME_HOST_KEYS,
                &format!("{v_what}.host"),
                &mut notes,
            )?;
            let source = string(
                host.get("sourcePath")
                    .with_context(|| format!("volume {name} has no host.sourcePath"))?,
                &format!("{v_what}.host.sourcePath"),
            )?;
            let source = match overrides.volume_sources.get(name) {
                Some(dir) => {
                    notes.push(format!(
                        "volume {name}: host path {source} replaced by the test with {}",
                        dir.display()
                    ));
                    dir.to_str()
                        .with_context(|| format!("volume {name}: the test's path is not UTF-8"))?
                        .to_owned()
                }
                None => source.to_owned(),
            };
            ensure!(
                volumes.insert(name, source).is_none(),
                "two volumes are named {name}"
            );
        }
    }
    for name in overrides.volume_sources.keys() {
        ensure!(
            volumes.contains_key(name.as_str()),
            "the test replaces the host path of volume {name}, which the task definition does \
             not declare"
        );
    }
    if let Some(list) = field("mountPoints") {
        for (i, m) in array(list, &at("mountPoints"))?.iter().enumerate() {
            let m_what = format!("{}[{i}]", at("mountPoints"));
            let m = object(m, &m_what)?;
            check_keys(m, MOUNT_POINT_KEYS, &m_what, &mut notes)?;
            let get = |k: &str| {
                string(
                    m.get(k).with_context(|| format!("{m_what} has no {k}"))?,
                    &format!("{m_what}.{k}"),
                )
            };
            let volume = get("sourceVolume")?;
            let source = volumes
                .get(volume)
                .with_context(|| format!("{m_what}: no volume named {volume}"))?;
            let read_only = match m.get("readOnly") {
                Some(ro) => boolean(ro, &format!("{m_what}.readOnly"))?,
                None => false,
            };
            // The agent passes binds as "src:dst[:ro]", as -v does.
            let mut bind = format!("{source}:{}", get("containerPath")?);
            if read_only {
                bind.push_str(":ro");
            }
            opt(&mut o, "-v", bind);
        }
    }

    // Ports.
    if let Some(list) = field("portMappings") {
        for (i, p) in array(list, &at("portMappings"))?.iter().enumerate() {
            let p_what = format!("{}[{i}]", at("portMappings"));
            let p = object(p, &p_what)?;
            check_keys(p, PORT_MAPPING_KEYS, &p_what, &mut notes)?;
            let container_port = unsigned(
                p.get("containerPort")
                    .with_context(|| format!("{p_what} has no containerPort"))?,
                &format!("{p_what}.containerPort"),
            )?;
            let host_port = p
                .get("hostPort")
                .map(|h| unsigned(h, &format!("{p_what}.hostPort")))
                .transpose()?;
            let protocol = match p.get("protocol") {
                Some(proto) => string(proto, &format!("{p_what}.protocol"))?,
                None => "tcp",
            };
            ensure!(
                matches!(protocol, "tcp" | "udp"),
                "{p_what}.protocol {protocol:?}"
            );
            match network {
                // The container listens on the host's ports itself: nothing to publish.
                "host" => ensure!(
                    host_port.is_none_or(|h| h == container_port),
                    "{p_what}: in host network mode hostPort must equal containerPort"
                ),
                "bridge" => opt(
                    &mut o,
                    "-p",
                    format!(
                        "{}:{container_port}/{protocol}",
                        host_port.map(|h| h.to_string()).unwrap_or_default()
                    ),
                ),
                _ => bail!("{p_what}: ports in network mode {network}"),
            }
        }
    }

    // Health check.
    let mut health_check = None;
    let mut exec_health_check = None;
    if let Some(h) = field("healthCheck") {
        let h_what = at("healthCheck");
        let h = object(h, &h_what)?;
        check_keys(h, HEALTH_CHECK_KEYS, &h_what, &mut notes)?;
        let test = strings(
            h.get("command")
                .with_context(|| format!("{h_what} has no command"))?,
            &format!("{h_what}.command"),
        )?;
        let seconds = |k: &str, default: Option<u64>| -> Result<Option<u64>> {
            match h.get(k) {
                Some(v) => Ok(Some(unsigned(v, &format!("{h_what}.{k}"))?)),
                None => Ok(default),
            }
        };
        let check = HealthCheck {
            interval: Duration::from_secs(
                seconds("interval", Some(HEALTH_INTERVAL_DEFAULT))?.unwrap_or_default(),
            ),
            timeout: Duration::from_secs(
                seconds("timeout", Some(HEALTH_TIMEOUT_DEFAULT))?.unwrap_or_default(),
            ),
            retries: seconds("retries", Some(HEALTH_RETRIES_DEFAULT))?.unwrap_or_default(),
            start_period: seconds("startPeriod", None)?
                .filter(|&s| s > 0)
                .map(Duration::from_secs),
            test: test.clone(),
        };
        match test.first().map(String::as_str) {
            Some("CMD-SHELL") if test.len() == 2 => {
                opt(&mut o, "--health-cmd", test[1].clone());
                for (k, v) in check.timing() {
                    opt(&mut o, &format!("--health-{k}"), v);
                }
            }
            Some("CMD") if test.len() >= 2 => {
                notes.push(format!(
                    "healthCheck {test:?} is exec form, which docker run cannot pass \
                     (--health-cmd always means CMD-SHELL, i.e. /bin/sh -c): it goes into a \
                     derived image's HEALTHCHECK instead"
                ));
                exec_health_check = Some(check.clone());
            }
            _ => {
                bail!("{h_what}.command {test:?}: want [\"CMD\", ...] or [\"CMD-SHELL\", \"...\"]")
            }
        }
        health_check = Some(check);
    }

    let stop_timeout = field("stopTimeout")
        .map(|t| unsigned(t, &at("stopTimeout")))
        .transpose()?
        .map(Duration::from_secs);
    if let Some(t) = stop_timeout {
        opt(&mut o, "--stop-timeout", t.as_secs().to_string());
    }

    if let Some(lc) = field("logConfiguration") {
        let lc_what = at("logConfiguration");
        let lc = object(lc, &lc_what)?;
        let driver = string(
            lc.get("logDriver")
                .with_context(|| format!("{lc_what} has no logDriver"))?,
            &format!("{lc_what}.logDriver"),
        )?;
        match driver {
            "awslogs" => {
                check_keys(lc, LOG_CONFIGURATION_KEYS, &lc_what, &mut notes)?;
                notes.push(LOG_DRIVER_NOTE.to_owned());
            }
            "json-file" => ensure!(
                lc.keys().all(|k| k == "logDriver"),
                "{lc_what}: json-file options are not handled"
            ),
            other => bail!("{lc_what}.logDriver {other:?} is not handled"),
        }
    }
    // Explicit, whatever the daemon's default: `docker logs` must read it.
    opt(&mut o, "--log-driver", "json-file".into());

    let image = string(
        field("image").with_context(|| format!("{what} has no image"))?,
        &at("image"),
    )?
    .to_owned();
    let command = match field("command") {
        Some(c) => strings(c, &at("command"))?,
        None => Vec::new(),
    };
    Ok(DockerRun {
        options: o,
        image,
        command,
        health_check,
        exec_health_check,
        stop_timeout,
        notes,
    })
}

/// CAP_SYS_RESOURCE, which raising a hard rlimit takes.
const CAP_SYS_RESOURCE: u32 = 24;

/// The memlock ulimit to run with when the manifest's cannot be had here: a Docker engine
/// without CAP_SYS_RESOURCE (this machine when it is itself a container) cannot raise the hard
/// limit, and runc then refuses to start the container ("error setting rlimit type 8"). It
/// gets the engine's own hard limit instead, said loudly. On an ECS container instance dockerd
/// has every capability and the manifest's value stands. (Since Linux 5.11 BPF memory is
/// charged to the memory cgroup, not to RLIMIT_MEMLOCK, so observer does not need it there.)
pub fn memlock_this_engine_grants(
    task_def: &Value,
    container: &str,
) -> BTreeMap<String, (i64, i64)> {
    let mut out = BTreeMap::new();
    let wanted = task_def["containerDefinitions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["name"] == container)
        .flat_map(|c| c["ulimits"].as_array().cloned().unwrap_or_default())
        .find(|u| u["name"] == "memlock");
    let Some(wanted) = wanted else { return out };
    let hard = wanted["hardLimit"].as_i64().unwrap_or(0);
    // The engine's processes share this machine's bounding set and limits: ask about dockerd.
    let dockerd = crate::sh("pidof", &["dockerd"]).unwrap_or_default();
    let pid = dockerd.split_whitespace().next().unwrap_or("self");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(u64::MAX);
    if cap_eff & (1 << CAP_SYS_RESOURCE) != 0 {
        return out;
    }
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap_or_default();
    let engine_hard: Option<i64> = limits
        .lines()
        .find(|l| l.starts_with("Max locked memory"))
        .and_then(|l| l.split_whitespace().nth(4))
        .and_then(|v| v.parse().ok());
    if let Some(engine_hard) = engine_hard {
        if hard < 0 || hard > engine_hard {
            eprintln!(
                "NOTE: dockerd (pid {pid}) lacks CAP_SYS_RESOURCE and its memlock hard limit is \
                 {engine_hard} bytes: the manifest's memlock ulimit {wanted} cannot be granted \
                 here; running with memlock={engine_hard}:{engine_hard}"
            );
            out.insert("memlock".to_owned(), (engine_hard, engine_hard));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn manifest_like() -> Value {
        json!({
            "family": "observer",
            "executionRoleArn": "arn:aws:iam::123456789012:role/x",
            "networkMode": "host",
            "pidMode": "host",
            "requiresCompatibilities": ["EC2"],
            "containerDefinitions": [{
                "name": "observer",
                "image": "registry.example.com/observer/observer:0.1.0",
                "essential": true,
                "cpu": 64,
                "memoryReservation": 64,
                "memory": 256,
                "user": "0",
                "readonlyRootFilesystem": true,
                "linuxParameters": {"capabilities": {"add": ["SYS_ADMIN", "NET_ADMIN"], "drop": ["ALL"]}},
                "ulimits": [{"name": "memlock", "softLimit": -1, "hardLimit": -1}],
                "environment": [
                    {"name": "OBSERVER_PLATFORM", "value": "ecs"},
                    {"name": "RUST_LOG", "value": "info"}
                ],
                "secrets": [{"name": "MACKEREL_APIKEY", "valueFrom": "arn:aws:secretsmanager:x"}],
                "mountPoints": [
                    {"sourceVolume": "host-proc", "containerPath": "/host/proc", "readOnly": true},
                    {"sourceVolume": "bpffs", "containerPath": "/sys/fs/bpf", "readOnly": false}
                ],
                "portMappings": [{"name": "metrics", "containerPort": 9435, "hostPort": 9435, "protocol": "tcp"}],
                "healthCheck": {"command": ["CMD", "/observer", "health"], "interval": 30,
                                "timeout": 5, "retries": 3, "startPeriod": 30},
                "stopTimeout": 15,
                "logConfiguration": {"logDriver": "awslogs", "options": {"awslogs-group": "/ecs/observer"}}
            }],
            "volumes": [
                {"name": "host-proc", "host": {"sourcePath": "/proc"}},
                {"name": "bpffs", "host": {"sourcePath": "/sys/fs/bpf"}}
            ]
        })
    }

    fn overrides() -> Overrides {
        Overrides {
            container_name: Some("obs".into()),
            env: vec![
                ("OBSERVER_INTERVAL".into(), "2s".into()),
                ("RUST_LOG".into(), "debug".into()),
            ],
            secrets: [("MACKEREL_APIKEY".to_owned(), "k3y".to_owned())].into(),
            labels: vec![("test".into(), "deploy".into())],
            ulimits: BTreeMap::new(),
            volume_sources: BTreeMap::new(),
        }
    }

    #[test]
    fn a_manifest_like_definition_becomes_these_arguments() {
        let run = docker_run(&manifest_like(), "observer", &overrides()).unwrap();
        #[rustfmt::skip]
        let want = [
            "run", "-d",
            "--name", "obs",
            "--label", "test=deploy",
            "--network", "host",
            "--pid", "host",
            "--user", "0",
            "--read-only",
            "--cap-drop", "ALL",
            "--cap-add", "SYS_ADMIN",
            "--cap-add", "NET_ADMIN",
            "--ulimit", "memlock=-1:-1",
            "--cpu-shares", "64",
            "--memory-reservation", "64m",
            "--memory", "256m",
            "-e", "OBSERVER_PLATFORM=ecs",
            "-e", "RUST_LOG=debug",
            "-e", "OBSERVER_INTERVAL=2s",
            "-e", "MACKEREL_APIKEY=k3y",
            "-v", "/proc:/host/proc:ro",
            "-v", "/sys/fs/bpf:/sys/fs/bpf",
            "--stop-timeout", "15",
            "--log-driver", "json-file",
            "registry.example.com/observer/observer:0.1.0",
        ];
        assert_eq!(run.args(), want);
        assert_eq!(run.stop_timeout, Some(Duration::from_secs(15)));
        let health = run
            .exec_health_check
            .as_ref()
            .expect("exec-form health check");
        assert_eq!(run.health_check.as_ref(), Some(health));
        assert_eq!(health.start_period, Some(Duration::from_secs(30)));
        assert_eq!(
            health.dockerfile("img:1"),
            "FROM img:1\nHEALTHCHECK --interval=30s --timeout=5s --retries=3 \
             --start-period=30s CMD [\"/observer\",\"health\"]\n"
        );
        let notes = run.notes.join("\n");
        for ignored in [
            "executionRoleArn",
            "essential",
            "valueFrom",
            "awslogs",
            "RUST_LOG replaced",
        ] {
            assert!(notes.contains(ignored), "{ignored} not noted: {notes}");
        }
        assert_eq!(
            run.args_with_image("derived")[run.args().len() - 1],
            "derived"
        );
    }

    #[test]
    fn the_deploy_manifest_translates() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/ecs/task-definition.json"
        );
        let Ok(text) = std::fs::read_to_string(path) else {
            panic!("{path} is missing");
        };
        let def: Value = serde_json::from_str(&text).expect("the manifest is JSON");
        let run = docker_run(&def, "observer", &overrides())
            .unwrap_or_else(|e| panic!("deploy/ecs/task-definition.json: {e:#}"));
        assert!(run.args().contains(&"--read-only".to_owned()));
    }

    #[test]
    fn an_unknown_key_fails() {
        for (pointer, key) in [
            ("", "placementConstraints"),
            ("/containerDefinitions/0", "entryPoint"),
            ("/containerDefinitions/0/linuxParameters", "devices"),
            ("/containerDefinitions/0/healthCheck", "startInterval"),
            ("/volumes/0/host", "type"),
        ] {
            let mut def = manifest_like();
            def.pointer_mut(pointer)
                .unwrap()
                .as_object_mut()
                .unwrap()
                .insert(key.into(), json!("x"));
            let err = docker_run(&def, "observer", &overrides())
                .unwrap_err()
                .to_string();
            assert!(err.contains(key) && err.contains("does not know"), "{err}");
        }
    }

    #[test]
    fn a_missing_or_undeclared_secret_fails() {
        let mut o = overrides();
        o.secrets.clear();
        let err = docker_run(&manifest_like(), "observer", &o)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("MACKEREL_APIKEY") && err.contains("no value"),
            "{err}"
        );
        let mut o = overrides();
        o.secrets.insert("OTHER".into(), "x".into());
        let err = docker_run(&manifest_like(), "observer", &o)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("OTHER") && err.contains("does not declare"),
            "{err}"
        );
    }

    #[test]
    fn a_ulimit_can_be_replaced_but_not_invented() {
        let mut o = overrides();
        o.ulimits.insert("memlock".into(), (8_388_608, 8_388_608));
        let run = docker_run(&manifest_like(), "observer", &o).unwrap();
        assert!(run
            .args()
            .join(" ")
            .contains("--ulimit memlock=8388608:8388608"));
        assert!(
            run.notes
                .iter()
                .any(|n| n.contains("memlock=-1:-1 replaced")),
            "{:?}",
            run.notes
        );
        o.ulimits.insert("nofile".into(), (1024, 1024));
        let err = docker_run(&manifest_like(), "observer", &o)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("nofile") && err.contains("does not set"),
            "{err}"
        );
    }

    #[test]
    fn a_volumes_host_path_can_be_replaced_but_not_invented() {
        let mut o = overrides();
        o.volume_sources
            .insert("bpffs".into(), PathBuf::from("/tmp/obs-test-bpf"));
        let run = docker_run(&manifest_like(), "observer", &o).unwrap();
        let args = run.args();
        assert!(
            args.contains(&"/tmp/obs-test-bpf:/sys/fs/bpf".to_owned()),
            "{args:?}"
        );
        assert!(
            !args.iter().any(|a| a.starts_with("/sys/fs/bpf:")),
            "{args:?}"
        );
        assert!(
            run.notes
                .iter()
                .any(|n| n.contains("host path /sys/fs/bpf replaced")),
            "{:?}",
            run.notes
        );
        o.volume_sources
            .insert("state".into(), PathBuf::from("/tmp/x"));
        let err = docker_run(&manifest_like(), "observer", &o)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("volume state") && err.contains("does not declare"),
            "{err}"
        );
    }

    #[test]
    fn shell_form_health_checks_are_docker_run_options() {
        let mut def = manifest_like();
        def["containerDefinitions"][0]["healthCheck"] =
            json!({"command": ["CMD-SHELL", "curl -f localhost || exit 1"]});
        let run = docker_run(&def, "observer", &overrides()).unwrap();
        assert!(run.exec_health_check.is_none());
        let args = run.args().join(" ");
        assert!(
            args.contains(
                "--health-cmd curl -f localhost || exit 1 --health-interval 30s \
                 --health-timeout 5s --health-retries 3 --stop-timeout"
            ),
            "{args}"
        );
    }

    #[test]
    fn what_cannot_run_here_fails() {
        let cases: [(&str, Value, &str); 5] = [
            ("/networkMode", json!("awsvpc"), "awsvpc"),
            ("/pidMode", json!("task"), "pidMode"),
            (
                "/containerDefinitions/0/portMappings/0/hostPort",
                json!(80),
                "hostPort",
            ),
            (
                "/containerDefinitions/0/logConfiguration/logDriver",
                json!("fluentd"),
                "fluentd",
            ),
            ("/volumes/1", json!({"name": "bpffs"}), "no host"),
        ];
        for (pointer, value, needle) in cases {
            let mut def = manifest_like();
            *def.pointer_mut(pointer).unwrap() = value;
            let err = docker_run(&def, "observer", &overrides())
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{pointer}: {err}");
        }
        let err = docker_run(&manifest_like(), "other", &overrides())
            .unwrap_err()
            .to_string();
        assert!(err.contains("no container named"), "{err}");
    }

    #[test]
    fn bridge_mode_publishes_ports() {
        let mut def = manifest_like();
        def["networkMode"] = json!("bridge");
        def["containerDefinitions"][0]["portMappings"][0]["hostPort"] = json!(19435);
        let args = docker_run(&def, "observer", &overrides())
            .unwrap()
            .args()
            .join(" ");
        assert!(args.contains("--network bridge"), "{args}");
        assert!(args.contains("-p 19435:9435/tcp"), "{args}");
    }
}
