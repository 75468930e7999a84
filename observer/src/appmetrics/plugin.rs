//! mackerel-agent metric plugins per task or pod, as the node's operator configured them.
//!
//! A workload opts in with a `mackerel.io/plugins` label or annotation listing names
//! (`gostats,redis`). Each name picks a `[plugin.<name>]` of the operator's file
//! ([`plugin_config`](super::plugin_config), docs/plugins.md); a name the file lacks runs
//! nothing (one log line per workload and name). Nothing a label says is run or substituted:
//! arguments get only observer's own values ([`Target`]: an IP, a port, and a container name
//! and task id checked to be plain words).
//!
//! The pipeline's use, per workload and interval:
//! ```text
//! let set = PluginSet::from_config(PluginsConfig::load(path)?)?;    // once, at start
//! for run in set.runs_for(&workload.id, &workload.labels, &target) { // per workload
//!     tokio::spawn(async move { run.values().await });               // PluginOutput or PluginError
//! }
//! run.meta().await   // once per plugin and workload: the graph definitions (Meta)
//! ```
//! Each run is its own process (tokio::process), so runs never wait for one another. A run:
//! - is the configured argv, no shell, as the configured user (default `nobody`; root
//!   refused; observer needs CAP_SETUID and CAP_SETGID to switch, checked at start), with
//!   `no_new_privs`, cwd `/`, stdin `/dev/null`, in a process group of its own;
//! - has an empty environment plus the configured `env` (PATH defaulted) and
//!   `MACKEREL_AGENT_PLUGIN_META` (`1` for [`Run::meta`], empty for [`Run::values`]):
//!   nothing of observer's (its Mackerel key, a kubelet token) reaches it;
//! - is killed with its whole process group at its timeout, when its stdout passes
//!   `max_output` (what came before is still read), and after it exits (stragglers);
//! - keeps [`STDERR_MAX`] bytes of stderr, as one line, for the caller's log.
//!
//! What it prints is read by [`plugin_output`](super::plugin_output), as mackerel-agent reads it.

use std::{
    collections::{BTreeMap, HashSet},
    fmt,
    net::IpAddr,
    process::Stdio,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tokio::io::{AsyncRead, AsyncReadExt as _};

use super::{
    plugin_config::{Placeholder, PluginConfig, PluginsConfig, META_ENV},
    plugin_output::{self, Meta, MetaError, Values},
};

pub use crate::inventory::PLUGINS_LABEL;
/// Names one workload's label may list; the rest are ignored.
pub const MAX_NAMES_PER_WORKLOAD: usize = 16;
/// (workload, name) pairs remembered so an unconfigured name is logged once.
pub const MAX_LOGGED_UNKNOWN: usize = 4096;
/// Bytes of a run's stderr kept for its log line.
pub const STDERR_MAX: usize = 1024;
/// Where /etc/passwd is read to resolve a user name.
const PASSWD: &str = "/etc/passwd";
/// `nobody`'s ids where /etc/passwd does not list it (a scratch image has none).
const NOBODY: (u32, u32) = (65534, 65534);
/// capability.h: setgid(2) and setgroups(2); setuid(2).
const CAP_SETGID: u32 = 6;
const CAP_SETUID: u32 = 7;

/// Where and what a run is about: observer's own values, never a label's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub addr: IpAddr,
    /// 0 when the workload has none: `{port}` then fails the run with a substitution error.
    pub port: u16,
    /// The container's name, for `{container}`.
    pub container: Option<String>,
    /// The task's or pod's id, for `{task}`.
    pub task: Option<String>,
}

/// Why a plugin file cannot be used on this node.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("plugin {plugin}: user {user:?}: {reason}")]
    User {
        plugin: String,
        user: String,
        reason: String,
    },
    #[error(
        "plugin {plugin} runs as uid {uid} gid {gid}, and observer (uid {own_uid}) lacks {missing} \
         to switch to it: grant CAP_SETUID and CAP_SETGID, or run observer as that user"
    )]
    Privileges {
        plugin: String,
        uid: u32,
        gid: u32,
        own_uid: u32,
        missing: String,
    },
}

/// Why one run gave nothing.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("plugin {plugin}: {{{placeholder}}} {reason}")]
    Substitution {
        plugin: String,
        placeholder: &'static str,
        reason: String,
    },
    #[error("plugin {plugin}: starting {program}: {source}")]
    Spawn {
        plugin: String,
        program: String,
        source: std::io::Error,
    },
    #[error("plugin {plugin}: reading its output: {source}")]
    Io {
        plugin: String,
        source: std::io::Error,
    },
    #[error("plugin {plugin}: killed at its timeout of {}", humantime::format_duration(*.timeout))]
    Timeout { plugin: String, timeout: Duration },
    #[error("plugin {plugin}: {status} with no values; stderr: {stderr:?}")]
    Failed {
        plugin: String,
        status: String,
        stderr: String,
    },
    #[error("plugin {plugin}: {source}; stderr: {stderr:?}")]
    Meta {
        plugin: String,
        source: MetaError,
        stderr: String,
    },
}

impl PluginError {
    /// A short word for the cause, for counters and once-per-cause logging.
    pub fn cause(&self) -> &'static str {
        match self {
            Self::Substitution { .. } => "substitution",
            Self::Spawn { .. } => "spawn",
            Self::Io { .. } => "io",
            Self::Timeout { .. } => "timeout",
            Self::Failed { .. } => "failed",
            Self::Meta { .. } => "meta",
        }
    }

    /// The `cause` label of `observer_app_scrape_errors_total`: the cause, apart from a
    /// scrape's own (`plugin_timeout` is not an endpoint's `timeout`).
    pub fn counted_cause(&self) -> &'static str {
        match self {
            Self::Substitution { .. } => "plugin_substitution",
            Self::Spawn { .. } => "plugin_spawn",
            Self::Io { .. } => "plugin_io",
            Self::Timeout { .. } => "plugin_timeout",
            Self::Failed { .. } => "plugin_failed",
            Self::Meta { .. } => "plugin_meta",
        }
    }
}

/// A plugin ready to run: its configuration and the ids it runs as (None: as observer).
#[derive(Debug)]
struct Plugin {
    config: PluginConfig,
    ids: Option<(u32, u32)>,
}

/// The operator's plugins, checked against this node.
pub struct PluginSet {
    plugins: BTreeMap<String, Arc<Plugin>>,
    /// (workload, name) pairs already logged as unconfigured.
    logged: Mutex<HashSet<(String, String)>>,
}

impl fmt::Debug for PluginSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PluginSet")
            .field("plugins", &self.plugins.keys())
            .finish()
    }
}

impl PluginSet {
    /// Resolves each plugin's user (root refused) and checks observer may switch to it.
    pub fn from_config(config: PluginsConfig) -> Result<Self, SetupError> {
        // A scratch image has no /etc/passwd: `nobody` is then 65534, other names refused.
        let passwd = std::fs::read_to_string(PASSWD).unwrap_or_default();
        // SAFETY: geteuid and getegid cannot fail.
        let own = unsafe { (libc::geteuid(), libc::getegid()) };
        Self::checked(config, &passwd, own, effective_caps())
    }

    /// `config` for a process of ids `own` and effective capabilities `caps`.
    fn checked(
        config: PluginsConfig,
        passwd: &str,
        own: (u32, u32),
        caps: u64,
    ) -> Result<Self, SetupError> {
        let mut plugins = BTreeMap::new();
        for (name, config) in config.plugins {
            let (uid, gid) =
                resolve_user(&config.user, passwd).map_err(|reason| SetupError::User {
                    plugin: name.clone(),
                    user: config.user.clone(),
                    reason,
                })?;
            let ids = if (uid, gid) == own {
                None
            } else {
                let mut missing = Vec::new();
                if uid != own.0 && caps & (1 << CAP_SETUID) == 0 {
                    missing.push("CAP_SETUID");
                }
                // Switching away from root's groups needs CAP_SETGID too.
                if caps & (1 << CAP_SETGID) == 0 {
                    missing.push("CAP_SETGID");
                }
                if !missing.is_empty() {
                    return Err(SetupError::Privileges {
                        plugin: name,
                        uid,
                        gid,
                        own_uid: own.0,
                        missing: missing.join(" and "),
                    });
                }
                Some((uid, gid))
            };
            plugins.insert(name, Arc::new(Plugin { config, ids }));
        }
        Ok(Self {
            plugins,
            logged: Mutex::new(HashSet::new()),
        })
    }

    /// The plugins of `text` as if each ran as observer: for tests that only pick names and
    /// build argv, never for runs.
    #[cfg(test)]
    pub(crate) fn unchecked(text: &str) -> Self {
        let plugins = PluginsConfig::parse(text).unwrap().plugins;
        Self {
            plugins: (plugins.into_iter())
                .map(|(n, config)| (n, Arc::new(Plugin { config, ids: None })))
                .collect(),
            logged: Mutex::new(HashSet::new()),
        }
    }

    /// No plugins: what observer has without `--plugins-config`.
    pub fn empty() -> Self {
        Self {
            plugins: BTreeMap::new(),
            logged: Mutex::new(HashSet::new()),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.plugins.is_empty()
    }

    /// The configured names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.plugins.keys().map(String::as_str)
    }

    /// The runs `labels`' [`PLUGINS_LABEL`] asks for, for the workload `workload` at
    /// `target`: configured names only, each once, at most [`MAX_NAMES_PER_WORKLOAD`].
    pub fn runs_for(
        &self,
        workload: &str,
        labels: &BTreeMap<String, String>,
        target: &Target,
    ) -> Vec<Run> {
        self.names_for(workload, labels)
            .iter()
            .filter_map(|name| self.run(name, target))
            .collect()
    }

    /// The configured names `labels`' [`PLUGINS_LABEL`] lists, each once, at most
    /// [`MAX_NAMES_PER_WORKLOAD`] read; an unconfigured one is logged once per workload.
    pub fn names_for(&self, workload: &str, labels: &BTreeMap<String, String>) -> Vec<String> {
        let Some(list) = labels.get(PLUGINS_LABEL) else {
            return Vec::new();
        };
        let mut seen = HashSet::new();
        let mut names = Vec::new();
        for name in list
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .take(MAX_NAMES_PER_WORKLOAD)
        {
            if !seen.insert(name) {
                continue;
            }
            if self.plugins.contains_key(name) {
                names.push(name.to_owned());
            } else {
                self.log_unknown(workload, name);
            }
        }
        names
    }

    /// The configured plugin `name` at `target`; None if the file does not define it.
    pub fn run(&self, name: &str, target: &Target) -> Option<Run> {
        self.plugins.get(name).map(|plugin| Run {
            plugin: plugin.clone(),
            target: target.clone(),
        })
    }

    /// Forgets the logged names of workloads `live` says are gone, so they may be logged again.
    pub fn retain_workloads(&self, live: impl Fn(&str) -> bool) {
        let mut logged = self.logged.lock().unwrap_or_else(|e| e.into_inner());
        logged.retain(|(w, _)| live(w));
    }

    fn log_unknown(&self, workload: &str, name: &str) {
        let mut logged = self.logged.lock().unwrap_or_else(|e| e.into_inner());
        if logged.len() >= MAX_LOGGED_UNKNOWN {
            return;
        }
        let name = plugin_output::clip(name, 2 * super::plugin_config::MAX_NAME_LEN);
        let workload = plugin_output::clip(workload, 128);
        if logged.insert((workload.clone(), name.clone())) {
            let known: Vec<&str> = self.names().collect();
            log::warn!(
                "plugins: {workload:?} names {name:?} in {PLUGINS_LABEL}, which the plugins config does not define (defined: {known:?}); nothing runs for it"
            );
            if logged.len() == MAX_LOGGED_UNKNOWN {
                log::warn!(
                    "plugins: {MAX_LOGGED_UNKNOWN} unconfigured names logged; further ones are not"
                );
            }
        }
    }
}

/// One plugin for one workload.
#[derive(Debug, Clone)]
pub struct Run {
    plugin: Arc<Plugin>,
    target: Target,
}

/// What a run's process left, before parsing.
struct Finished {
    stdout: Vec<u8>,
    stderr: String,
    status: std::process::ExitStatus,
}

/// The values of a run, with what it said on stderr.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginOutput {
    pub values: Values,
    /// stdout passed `max_output`: the run was killed there, its complete lines read.
    pub truncated: bool,
    /// A non-zero exit (mackerel-agent reads the values regardless).
    pub exit_code: Option<i32>,
    /// Up to [`STDERR_MAX`] bytes of stderr as one line (escaped), empty if it wrote none.
    pub stderr: String,
}

impl Run {
    pub fn plugin(&self) -> &str {
        &self.plugin.config.name
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    /// Its values carry their own times (`use_plugin_timestamp`), not the run's.
    pub fn uses_plugin_timestamp(&self) -> bool {
        self.plugin.config.use_plugin_timestamp
    }

    /// The argv after substitution.
    pub fn argv(&self) -> Result<Vec<String>, PluginError> {
        let config = &self.plugin.config;
        let mut argv = vec![config.program.clone()];
        for arg in &config.args {
            argv.push(arg.render(|p| self.value(p))?);
        }
        Ok(argv)
    }

    fn value(&self, p: Placeholder) -> Result<String, PluginError> {
        let fail = |reason: &str| PluginError::Substitution {
            plugin: self.plugin().to_owned(),
            placeholder: p.name(),
            reason: reason.to_owned(),
        };
        let word = |v: &Option<String>| match v {
            None => Err(fail("is not known for this workload")),
            Some(v) if plain_word(v) => Ok(v.clone()),
            Some(_) => Err(fail(
                "is not a plain word (A-Z a-z 0-9 . _ -, not starting with - or .)",
            )),
        };
        match p {
            Placeholder::Addr => Ok(self.target.addr.to_string()),
            // 0: the workload publishes no port observer could give.
            Placeholder::Port if self.target.port == 0 => Err(fail(
                "is not known for this workload: it lists no reachable TCP port",
            )),
            Placeholder::Port => Ok(self.target.port.to_string()),
            Placeholder::Container => word(&self.target.container),
            Placeholder::Task => word(&self.target.task),
        }
    }

    /// One values run: `name value epoch` lines as [`Values`].
    pub async fn values(&self) -> Result<PluginOutput, PluginError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let (done, truncated) = self.execute(false).await?;
        let config = &self.plugin.config;
        let values = plugin_output::parse_values(
            complete_lines(&done.stdout, truncated),
            now,
            config.max_series,
            config.use_plugin_timestamp,
        );
        // Killed at the cap by observer: not the plugin's failure.
        let exit_code =
            (!truncated && !done.status.success()).then(|| done.status.code().unwrap_or(-1));
        if exit_code.is_some() && values.samples.is_empty() {
            return Err(PluginError::Failed {
                plugin: self.plugin().to_owned(),
                status: done.status.to_string(),
                stderr: done.stderr,
            });
        }
        Ok(PluginOutput {
            values,
            truncated,
            exit_code,
            stderr: done.stderr,
        })
    }

    /// One meta run: the plugin's graph definitions, `custom.` names.
    pub async fn meta(&self) -> Result<Meta, PluginError> {
        let (done, _) = self.execute(true).await?;
        plugin_output::parse_meta(&done.stdout).map_err(|source| PluginError::Meta {
            plugin: self.plugin().to_owned(),
            source,
            stderr: done.stderr,
        })
    }

    async fn execute(&self, meta: bool) -> Result<(Finished, bool), PluginError> {
        let plugin = &self.plugin;
        let config = &plugin.config;
        let name = || config.name.clone();
        let argv = self.argv()?;
        let mut cmd = tokio::process::Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .env_clear()
            .envs(&config.env)
            .env(META_ENV, if meta { "1" } else { "" })
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        if let Some((uid, gid)) = plugin.ids {
            // std drops the supplementary groups when root sets a uid.
            cmd.uid(uid).gid(gid);
        }
        // SAFETY: prctl is async-signal-safe and touches only the child.
        unsafe {
            cmd.pre_exec(|| {
                // No setuid binary (sudo) gives the plugin back what it was denied.
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|source| PluginError::Spawn {
            plugin: name(),
            program: config.program.clone(),
            source,
        })?;
        let group = Group::new(child.id());
        let (Some(mut stdout), Some(mut stderr)) = (child.stdout.take(), child.stderr.take())
        else {
            unreachable!("both piped above");
        };
        let max_output = config.max_output;
        let work = async {
            let out = async {
                let read = read_capped(&mut stdout, max_output).await;
                if matches!(read, Ok((_, true))) {
                    group.kill();
                }
                read
            };
            let err = read_capped_draining(&mut stderr, STDERR_MAX);
            let (out, err, status) = tokio::join!(out, err, child.wait());
            Ok::<_, std::io::Error>((out?, err?, status?))
        };
        let result = tokio::time::timeout(config.timeout, work).await;
        // Stragglers too: whatever is left of the group goes, whichever way the run ended.
        group.end();
        match result {
            Err(_) => {
                // SIGKILL was sent: the wait is short, and kill_on_drop reaps it otherwise.
                let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
                Err(PluginError::Timeout {
                    plugin: name(),
                    timeout: config.timeout,
                })
            }
            Ok(Err(source)) => Err(PluginError::Io {
                plugin: name(),
                source,
            }),
            Ok(Ok(((stdout, truncated), (stderr, _), status))) => Ok((
                Finished {
                    stdout,
                    stderr: one_line(&stderr),
                    status,
                },
                truncated,
            )),
        }
    }
}

/// The process group of a run (its leader's pid); killing an empty group does nothing.
/// Killed at most once after the run: its id is not used again once it may be free.
struct Group {
    pgid: Option<libc::pid_t>,
    ended: AtomicBool,
}

impl Group {
    fn new(leader: Option<u32>) -> Self {
        let pgid = leader
            .and_then(|p| libc::pid_t::try_from(p).ok())
            .filter(|&p| p > 1);
        Self {
            pgid,
            ended: AtomicBool::new(false),
        }
    }

    /// While the run goes on (the output cap): the group is surely still there.
    fn kill(&self) {
        if let Some(pgid) = self.pgid {
            // SAFETY: kill has no memory effects; a negative pid names the group.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
        }
    }

    /// When the run is over: whatever is left of the group, once.
    fn end(&self) {
        if !self.ended.swap(true, Ordering::Relaxed) {
            self.kill();
        }
    }
}

impl Drop for Group {
    /// A caller that drops a run mid-way leaves no process behind.
    fn drop(&mut self) {
        self.end();
    }
}

/// Up to `cap` bytes; true when there was more.
async fn read_capped(
    r: &mut (impl AsyncRead + Unpin),
    cap: usize,
) -> std::io::Result<(Vec<u8>, bool)> {
    let mut buf = Vec::new();
    (&mut *r).take(cap as u64 + 1).read_to_end(&mut buf).await?;
    let over = buf.len() > cap;
    buf.truncate(cap);
    Ok((buf, over))
}

/// Up to `cap` bytes, reading the rest to the end so the writer never blocks on a full pipe.
async fn read_capped_draining(
    r: &mut (impl AsyncRead + Unpin),
    cap: usize,
) -> std::io::Result<(Vec<u8>, bool)> {
    let (buf, over) = read_capped(r, cap).await?;
    if over {
        tokio::io::copy(r, &mut tokio::io::sink()).await?;
    }
    Ok((buf, over))
}

/// A cut output without its last, partial line.
fn complete_lines(stdout: &[u8], truncated: bool) -> &[u8] {
    if !truncated {
        return stdout;
    }
    match stdout.iter().rposition(|&b| b == b'\n') {
        Some(end) => &stdout[..end],
        None => &[],
    }
}

/// stderr as one log line: lines joined with ` | `, control characters escaped.
fn one_line(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    lines
        .join(" | ")
        .chars()
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}

/// A container name or task id fit for an argument: no option, no path, no spaces.
fn plain_word(s: &str) -> bool {
    (1..=255).contains(&s.len())
        && !s.starts_with(['-', '.'])
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// `user` as (uid, gid): a name from `passwd`, `uid` (gid from passwd, else the same number)
/// or `uid:gid`; root's uid or gid is refused.
fn resolve_user(user: &str, passwd: &str) -> Result<(u32, u32), String> {
    let entry = |pred: &dyn Fn(&[&str]) -> bool| {
        passwd
            .lines()
            .map(|l| l.split(':').collect::<Vec<_>>())
            .find(|f| f.len() >= 4 && pred(f))
            .and_then(|f| Some((f[2].parse::<u32>().ok()?, f[3].parse::<u32>().ok()?)))
    };
    let ids = if let Some((u, g)) = user.split_once(':') {
        match (u.parse::<u32>(), g.parse::<u32>()) {
            (Ok(u), Ok(g)) => (u, g),
            _ => return Err("uid:gid must be two numbers".into()),
        }
    } else if let Ok(uid) = user.parse::<u32>() {
        (uid, entry(&|f| f[2] == user).map_or(uid, |(_, g)| g))
    } else {
        match entry(&|f| f[0] == user) {
            Some(ids) => ids,
            None if user == super::plugin_config::DEFAULT_USER => NOBODY,
            None => return Err(format!("not in {PASSWD}; give a uid or uid:gid")),
        }
    };
    if ids.0 == 0 || ids.1 == 0 {
        return Err(format!(
            "is uid {} gid {}: plugins never run as root or root's group",
            ids.0, ids.1
        ));
    }
    Ok(ids)
}

/// observer's effective capabilities; none if unreadable.
fn effective_caps() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| crate::preflight::effective_capabilities(&s))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD_TEXT: &str = "root:x:0:0:root:/root:/bin/bash\nnobody:x:65534:65534:nobody:/:/usr/sbin/nologin\napp:x:1000:1001::/home/app:/bin/sh\nbad:x:notanumber:1\n";

    /// A set whose plugins would run as observer: argv and names only, nothing is run.
    fn set(text: &str) -> PluginSet {
        PluginSet::unchecked(text)
    }

    fn target() -> Target {
        Target {
            addr: "10.1.2.3".parse().unwrap(),
            port: 32768,
            container: Some("app".into()),
            task: Some("abc123".into()),
        }
    }

    fn labels(v: &str) -> BTreeMap<String, String> {
        [(PLUGINS_LABEL.to_owned(), v.to_owned())].into()
    }

    #[test]
    fn users_resolve_and_root_is_refused() {
        assert_eq!(resolve_user("nobody", PASSWD_TEXT), Ok((65534, 65534)));
        assert_eq!(resolve_user("app", PASSWD_TEXT), Ok((1000, 1001)));
        assert_eq!(resolve_user("1000", PASSWD_TEXT), Ok((1000, 1001)));
        assert_eq!(resolve_user("4242", PASSWD_TEXT), Ok((4242, 4242)));
        assert_eq!(resolve_user("5:6", PASSWD_TEXT), Ok((5, 6)));
        assert_eq!(
            resolve_user("nobody", ""),
            Ok(NOBODY),
            "a scratch image has no /etc/passwd"
        );
        for root in ["root", "0", "0:5", "5:0"] {
            let e = resolve_user(root, PASSWD_TEXT).unwrap_err();
            assert!(e.contains("never run as root"), "{root}: {e}");
        }
        assert!(resolve_user("ghost", PASSWD_TEXT)
            .unwrap_err()
            .contains("not in /etc/passwd"));
        assert!(resolve_user("bad", PASSWD_TEXT).is_err());
        assert!(resolve_user("a:b", PASSWD_TEXT).is_err());
    }

    #[test]
    fn switching_users_needs_setuid_and_setgid_and_says_so() {
        let config = || PluginsConfig::parse("[plugin.p]\ncommand = [\"/bin/p\"]\n").unwrap();
        let setid = (1 << CAP_SETUID) | (1 << CAP_SETGID);
        let s = PluginSet::checked(config(), PASSWD_TEXT, (0, 0), setid).unwrap();
        assert_eq!(s.plugins["p"].ids, Some((65534, 65534)));
        let e = PluginSet::checked(config(), PASSWD_TEXT, (0, 0), 0)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "plugin p runs as uid 65534 gid 65534, and observer (uid 0) lacks CAP_SETUID and \
             CAP_SETGID to switch to it: grant CAP_SETUID and CAP_SETGID, or run observer as that user"
        );
        let e = PluginSet::checked(config(), PASSWD_TEXT, (0, 0), 1 << CAP_SETUID)
            .unwrap_err()
            .to_string();
        assert!(e.contains("lacks CAP_SETGID to"), "{e}");
        // Already that user: nothing to switch.
        let s = PluginSet::checked(config(), PASSWD_TEXT, (65534, 65534), 0).unwrap();
        assert_eq!(s.plugins["p"].ids, None);
        let root =
            PluginsConfig::parse("[plugin.p]\ncommand = [\"/bin/p\"]\nuser = \"root\"\n").unwrap();
        let e = PluginSet::checked(root, PASSWD_TEXT, (0, 0), setid)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("plugin p: user \"root\": is uid 0 gid 0: plugins never run as root"),
            "{e}"
        );
    }

    #[test]
    fn substitution_takes_observers_values_only() {
        let s = set("[plugin.p]\nuser = \"4242\"\ncommand = [\"/bin/p\", \"-host\", \"{addr}\", \"-port={port}\", \"{container}/{task}\", \"{{addr}}\"]\n");
        let runs = s.runs_for("w", &labels("p"), &target());
        assert_eq!(runs.len(), 1);
        assert_eq!(
            runs[0].argv().unwrap(),
            [
                "/bin/p",
                "-host",
                "10.1.2.3",
                "-port=32768",
                "app/abc123",
                "{addr}"
            ]
        );
        let v6 = Target {
            addr: "fd00::1".parse().unwrap(),
            ..target()
        };
        assert_eq!(
            s.runs_for("w", &labels("p"), &v6)[0].argv().unwrap()[2],
            "fd00::1"
        );
        for hostile in ["--config=/etc/shadow", "a b", "../x", "$(id)", ""] {
            let t = Target {
                container: Some(hostile.into()),
                ..target()
            };
            let e = s.runs_for("w", &labels("p"), &t)[0].argv().unwrap_err();
            assert!(
                matches!(
                    e,
                    PluginError::Substitution {
                        placeholder: "container",
                        ..
                    }
                ),
                "{hostile}: {e}"
            );
        }
        let t = Target {
            task: None,
            ..target()
        };
        assert!(s.runs_for("w", &labels("p"), &t)[0]
            .argv()
            .unwrap_err()
            .to_string()
            .contains("{task} is not known"));
        let no_port = Target {
            port: 0,
            ..target()
        };
        let e = s.runs_for("w", &labels("p"), &no_port)[0]
            .argv()
            .unwrap_err();
        assert_eq!(e.counted_cause(), "plugin_substitution");
        assert!(e.to_string().contains("{port} is not known"), "{e}");
        // A plugin that takes no {port} runs without one.
        let s = set("[plugin.q]\ncommand = [\"/bin/q\", \"{addr}\"]\n");
        assert_eq!(
            s.run("q", &no_port).unwrap().argv().unwrap(),
            ["/bin/q", "10.1.2.3"]
        );
        assert!(s.run("p", &no_port).is_none(), "not configured");
    }

    #[test]
    fn a_label_picks_configured_names_only_each_once() {
        let s = set("[plugin.a]\nuser = \"4242\"\ncommand = [\"/bin/a\"]\n[plugin.b]\nuser = \"4242\"\ncommand = [\"/bin/b\"]\n");
        let names = |v: &str| {
            s.runs_for("w", &labels(v), &target())
                .iter()
                .map(|r| r.plugin().to_owned())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(" b , a,b,,"), ["b", "a"]);
        assert_eq!(s.names_for("w", &labels(" b , a,b,c,")), ["b", "a"]);
        assert_eq!(names("/bin/sh -c id, c, a"), ["a"]);
        assert!(names("").is_empty());
        assert!(s.runs_for("w", &BTreeMap::new(), &target()).is_empty());
        let many = (0..100)
            .map(|i| format!("x{i}"))
            .collect::<Vec<_>>()
            .join(",")
            + ",a";
        assert!(names(&many).is_empty(), "names past the cap are not read");
    }

    #[test]
    fn unconfigured_names_are_remembered_boundedly() {
        let s = set("");
        for i in 0..MAX_LOGGED_UNKNOWN + 100 {
            s.runs_for(&format!("w{i}"), &labels("gostats,gostats"), &target());
        }
        assert_eq!(s.logged.lock().unwrap().len(), MAX_LOGGED_UNKNOWN);
        s.retain_workloads(|w| w == "w1");
        assert_eq!(s.logged.lock().unwrap().len(), 1);
    }

    #[test]
    fn runs_can_be_spawned_on_the_runtime() {
        fn send<T: Send + 'static>(_: T) {}
        let s = set("[plugin.p]\ncommand = [\"/bin/p\"]\n");
        let run = s.runs_for("w", &labels("p"), &target()).remove(0);
        send(async move { (run.values().await.is_ok(), run.meta().await.is_ok()) });
    }

    #[test]
    fn stderr_is_one_escaped_line_and_cut_output_loses_its_partial_line() {
        assert_eq!(
            one_line(b"first\n\n  second \x1b[0m\n"),
            "first | second \\u{1b}[0m"
        );
        assert_eq!(complete_lines(b"a 1 0\nb 2", true), b"a 1 0");
        assert_eq!(complete_lines(b"a 1 0\nb 2", false), b"a 1 0\nb 2");
        assert_eq!(complete_lines(b"no newline", true), b"");
    }
}
