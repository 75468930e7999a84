//! mackerel-agent metric plugins run for real (observer/src/appmetrics/plugin.rs): shell
//! scripts the tests write into a directory of their own, configured through the operator's
//! TOML, picked by a workload's `mackerel.io/plugins` label, run as `nobody` with observer's
//! address and port substituted, killed with their whole process group at their timeout or
//! output cap, and never handed observer's environment.

use std::{
    collections::BTreeMap,
    os::unix::fs::PermissionsExt as _,
    path::PathBuf,
    time::{Duration, Instant},
};

use observer::appmetrics::{
    plugin::{PluginError, PluginSet, Target, PLUGINS_LABEL},
    plugin_config::PluginsConfig,
};

/// A directory of plugin scripts, readable by `nobody`, with `out/` it may write; removed on drop.
struct PluginDir(PathBuf);

impl PluginDir {
    fn new() -> Self {
        let dir = Self(std::env::temp_dir().join(testbed::unique("app-plugins")));
        std::fs::create_dir_all(dir.out()).expect("plugin dir");
        std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(dir.out(), std::fs::Permissions::from_mode(0o777)).unwrap();
        dir
    }

    fn out(&self) -> PathBuf {
        self.0.join("out")
    }

    /// Writes an executable `#!/bin/sh` script.
    fn script(&self, name: &str, body: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }
}

impl Drop for PluginDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn set(toml: &str) -> PluginSet {
    let config = PluginsConfig::parse(toml).unwrap_or_else(|e| panic!("{e}\n{toml}"));
    PluginSet::from_config(config).unwrap_or_else(|e| panic!("{e}"))
}

fn labels(plugins: &str) -> BTreeMap<String, String> {
    [(PLUGINS_LABEL.to_owned(), plugins.to_owned())].into()
}

fn target() -> Target {
    Target {
        addr: "127.0.0.1".parse().unwrap(),
        port: 32768,
        container: Some("app".into()),
        task: Some("5f0a1b2c3d".into()),
    }
}

/// `id -u nobody`, `id -g nobody`.
fn nobody() -> (f64, f64) {
    let id = |flag: &str| {
        let out = std::process::Command::new("id")
            .args([flag, "nobody"])
            .output()
            .expect("id");
        String::from_utf8(out.stdout)
            .unwrap()
            .trim()
            .parse::<f64>()
            .expect("nobody's id")
    };
    (id("-u"), id("-g"))
}

/// Kills the group `pgid` when dropped, so a failing test leaves no plugin running.
struct KillGroup(i32);

impl Drop for KillGroup {
    fn drop(&mut self) {
        if self.0 > 1 {
            // SAFETY: kill has no memory effects; a negative pid names the group.
            unsafe { libc::kill(-self.0, libc::SIGKILL) };
        }
    }
}

/// Processes (zombies aside) whose process group is `pgid`.
fn group_members(pgid: i32) -> Vec<i32> {
    let mut members = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid pgrp ...: comm may hold spaces, so read after its last ')'.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.len() > 2 && fields[0] != "Z" && fields[2] == pgid.to_string() {
            members.push(pid);
        }
    }
    members
}

/// Waits (a generous while: a SIGKILLed process exits when the kernel gets to it) until no
/// live process is in the group `pgid`; the members left if some remain.
fn group_gone(pgid: i32) -> Result<(), Vec<i32>> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let members = group_members(pgid);
        if members.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(members);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn value(out: &observer::appmetrics::plugin::PluginOutput, name: &str) -> f64 {
    out.values
        .samples
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("{name} in {:?}", out.values))
        .value
}

#[tokio::test]
async fn a_plugin_runs_as_nobody_with_observers_values_and_none_of_its_environment() {
    if testbed::skip_unless_root(
        "a_plugin_runs_as_nobody_with_observers_values_and_none_of_its_environment",
    ) {
        return;
    }
    // What observer would have: its Mackerel key must never reach a plugin.
    std::env::set_var("MACKEREL_APIKEY", "observer-key-must-not-leak");
    std::env::set_var("HOME", "/root");
    let dir = PluginDir::new();
    let script = dir.script(
        "echoargs.sh",
        r#"now=$(date +%s)
if [ "$MACKEREL_AGENT_PLUGIN_META" = 1 ]; then
  echo '# mackerel-agent-plugin'
  echo '{"graphs": {"echo.ids": {"label": "Ids", "unit": "integer", "metrics": [{"name": "uid", "label": "uid"}, {"name": "gid", "label": "gid", "stacked": true}]}}}'
  exit 0
fi
printf 'echo.ids.uid\t%s\t%s\n' "$(id -u)" "$now"
printf 'echo.ids.gid\t%s\t%s\n' "$(id -g)" "$now"
printf 'echo.host.%s\t1\t%s\n' "$(echo "$2" | tr . _)" "$now"
printf 'echo.port\t%s\t%s\n' "$4" "$now"
printf 'echo.url.%s\t1\t%s\n' "$(printf %s "$5" | tr -c 'A-Za-z0-9' _)" "$now"
printf 'echo.env.apikey\t%s\t%s\n' "${MACKEREL_APIKEY:+1}0" "$now"
printf 'echo.env.home\t%s\t%s\n' "${HOME:+1}0" "$now"
printf 'echo.env.mackerel_vars\t%s\t%s\n' "$(env | grep -c '^MACKEREL')" "$now"
printf 'echo.env.meta_len\t%s\t%s\n' "${#MACKEREL_AGENT_PLUGIN_META}" "$now"
printf 'echo.env.foo\t%s\t%s\n' "$FOO" "$now"
echo 'not a metric line'
echo 'a warning on stderr' >&2
"#,
    );
    let set = set(&format!(
        r#"
[plugin.echoargs]
command = ["{}", "-host", "{{addr}}", "-port", "{{port}}", "http://{{addr}}:{{port}}/{{container}}/{{task}}"]
user = "nobody"
timeout = "20s"
env = {{ FOO = "42" }}
"#,
        script.display()
    ));
    let runs = set.runs_for("task-1", &labels("echoargs"), &target());
    assert_eq!(runs.len(), 1);
    let out = runs[0].values().await.unwrap_or_else(|e| panic!("{e}"));

    let (uid, gid) = nobody();
    assert_ne!(uid, 0.0);
    assert_eq!(value(&out, "custom.echo.ids.uid"), uid, "ran as nobody");
    assert_eq!(
        value(&out, "custom.echo.ids.gid"),
        gid,
        "with nobody's group"
    );
    assert_eq!(
        value(&out, "custom.echo.host.127_0_0_1"),
        1.0,
        "{{addr}} as a whole argument"
    );
    assert_eq!(
        value(&out, "custom.echo.port"),
        32768.0,
        "{{port}} as a whole argument"
    );
    assert_eq!(
        value(
            &out,
            "custom.echo.url.http___127_0_0_1_32768_app_5f0a1b2c3d"
        ),
        1.0,
        "placeholders inside an argument"
    );
    assert_eq!(
        std::env::var("MACKEREL_APIKEY").as_deref(),
        Ok("observer-key-must-not-leak")
    );
    assert_eq!(
        value(&out, "custom.echo.env.apikey"),
        0.0,
        "MACKEREL_APIKEY is not inherited"
    );
    assert_eq!(
        value(&out, "custom.echo.env.home"),
        0.0,
        "nothing of observer's environment is"
    );
    assert_eq!(
        value(&out, "custom.echo.env.mackerel_vars"),
        1.0,
        "only MACKEREL_AGENT_PLUGIN_META"
    );
    assert_eq!(
        value(&out, "custom.echo.env.meta_len"),
        0.0,
        "empty for a values run"
    );
    assert_eq!(
        value(&out, "custom.echo.env.foo"),
        42.0,
        "the configured env is"
    );
    assert_eq!(out.values.samples.len(), 10);
    assert_eq!(out.values.invalid, 1, "the line of two words");
    assert_eq!(out.stderr, "a warning on stderr");
    assert_eq!(out.exit_code, None);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        out.values
            .samples
            .iter()
            .all(|s| (now - s.time).abs() < 600),
        "the run's time"
    );

    let meta = runs[0].meta().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(meta.invalid, 0);
    assert_eq!(meta.graph_defs.len(), 1);
    let graph = &meta.graph_defs[0];
    assert_eq!(
        (
            graph.name.as_str(),
            graph.display_name.as_str(),
            graph.unit.as_str()
        ),
        ("custom.echo.ids", "Ids", "integer")
    );
    let metrics: Vec<(&str, bool)> = graph
        .metrics
        .iter()
        .map(|m| (m.name.as_str(), m.is_stacked))
        .collect();
    assert_eq!(
        metrics,
        [
            ("custom.echo.ids.uid", false),
            ("custom.echo.ids.gid", true)
        ]
    );
}

#[tokio::test]
async fn a_hanging_plugin_is_killed_with_its_group_at_its_timeout_and_another_still_reports() {
    if testbed::skip_unless_root(
        "a_hanging_plugin_is_killed_with_its_group_at_its_timeout_and_another_still_reports",
    ) {
        return;
    }
    let dir = PluginDir::new();
    let pid_file = dir.out().join("hang.pid");
    let hang = dir.script(
        "hang.sh",
        "echo $$ > \"$1\"\nprintf 'hang.started\\t1\\t0\\n'\nsleep 600 &\nsleep 600\n",
    );
    let fast = dir.script("fast.sh", "printf 'fast.port\\t%s\\t0\\n' \"$1\"\n");
    let set = set(&format!(
        r#"
[plugin.hang]
command = ["{}", "{}"]
timeout = "1s"

[plugin.fast]
command = ["{}", "{{port}}"]
"#,
        hang.display(),
        pid_file.display(),
        fast.display()
    ));
    let runs = set.runs_for("task-1", &labels("hang,fast"), &target());
    assert_eq!(
        runs.iter().map(|r| r.plugin()).collect::<Vec<_>>(),
        ["hang", "fast"]
    );
    let (hung, fast) = tokio::join!(runs[0].values(), runs[1].values());

    match hung {
        Err(PluginError::Timeout { plugin, timeout }) => {
            assert_eq!((plugin.as_str(), timeout), ("hang", Duration::from_secs(1)));
        }
        other => panic!("the hanging plugin: {other:?}"),
    }
    let fast = fast.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(value(&fast, "custom.fast.port"), 32768.0);

    let pgid: i32 = std::fs::read_to_string(&pid_file)
        .expect("the hanging plugin ran")
        .trim()
        .parse()
        .unwrap();
    let _cleanup = KillGroup(pgid);
    assert_eq!(
        group_gone(pgid),
        Ok(()),
        "the shell and its background sleep are gone"
    );
}

#[tokio::test]
async fn output_past_its_cap_kills_the_run_and_keeps_the_series_cap() {
    if testbed::skip_unless_root("output_past_its_cap_kills_the_run_and_keeps_the_series_cap") {
        return;
    }
    let dir = PluginDir::new();
    let pid_file = dir.out().join("flood.pid");
    let flood = dir.script(
        "flood.sh",
        "echo $$ > \"$1\"\ni=0\nwhile :; do i=$((i+1)); echo \"flood.m$i $i 0\"; done\n",
    );
    let set = set(&format!(
        "[plugin.flood]\ncommand = [\"{}\", \"{}\"]\ntimeout = \"50s\"\nmax_output = 65536\nmax_series = 50\n",
        flood.display(),
        pid_file.display()
    ));
    let runs = set.runs_for("task-1", &labels("flood"), &target());
    // An endless writer: only the cap ends it before its 50 s timeout.
    let out = runs[0].values().await.unwrap_or_else(|e| panic!("{e}"));
    assert!(out.truncated);
    assert_eq!(out.values.samples.len(), 50);
    assert_eq!(value(&out, "custom.flood.m50"), 50.0);
    assert!(out.values.dropped > 1000, "{:?}", out.values.dropped);
    assert_eq!(out.values.invalid, 0, "the line cut at the cap is not read");
    let pgid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let _cleanup = KillGroup(pgid);
    assert_eq!(group_gone(pgid), Ok(()));
}

#[tokio::test]
async fn a_label_naming_an_unconfigured_plugin_runs_nothing() {
    if testbed::skip_unless_root("a_label_naming_an_unconfigured_plugin_runs_nothing") {
        return;
    }
    let dir = PluginDir::new();
    let marker = dir.out().join("ran");
    let script = dir.script(
        "marker.sh",
        "touch \"$1\"\nprintf 'marker.ran\\t1\\t0\\n'\n",
    );
    let set = set(&format!(
        "[plugin.marker]\ncommand = [\"{}\", \"{}\"]\n",
        script.display(),
        marker.display()
    ));
    let hostile = format!(
        "Marker, {script}, {script} {marker}, sh -c 'touch {marker}', gostats",
        script = script.display(),
        marker = marker.display()
    );
    let runs = set.runs_for("task-1", &labels(&hostile), &target());
    assert!(
        runs.is_empty(),
        "{:?}",
        runs.iter().map(|r| r.plugin()).collect::<Vec<_>>()
    );
    assert!(!marker.exists(), "nothing ran");

    // The same script, named as configured, does run: the check above could have failed.
    let runs = set.runs_for("task-1", &labels("marker"), &target());
    assert_eq!(runs.len(), 1);
    let out = runs[0].values().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(value(&out, "custom.marker.ran"), 1.0);
    assert!(marker.exists());
}

/// What the end-to-end tests share: the observer binary, the fakes' key, generous waits.
mod e2e {
    use std::time::{Duration, Instant};

    use anyhow::{ensure, Context as _, Result};
    use testbed::{
        docker::{Containers, EcsLabels, Run},
        fake_mackerel::{FakeHost, FakeMackerel, Point},
        fake_platform::{task_arn, FakeTask},
        observer_cmd::Finished,
        sh, unique, ObserverCmd,
    };

    pub const OBSERVER: &str = env!("CARGO_BIN_EXE_observer-e2e");
    pub const API_KEY: &str = "app-plugins-key-7c1e04b9";
    pub const CLUSTER: &str = "app-plugins-test";
    /// Generous bounds of waits on a loaded machine; nothing is asserted about speed.
    pub const WAIT: Duration = Duration::from_secs(90);

    pub struct Task {
        pub id: String,
        pub arn: String,
        pub family: &'static str,
        pub docker_id: String,
    }

    impl Task {
        /// One container `app` (busybox sleeping) of task family `family` with `labels`.
        pub fn start(
            docker: &mut Containers,
            family: &'static str,
            labels: &[(&str, &str)],
            run: impl FnOnce(Run) -> Run,
        ) -> Result<Self> {
            let id = std::fs::read_to_string("/proc/sys/kernel/random/uuid")?
                .trim()
                .replace('-', "");
            let arn = task_arn(CLUSTER, &id);
            let mut r = Run::new()
                .name(&unique(&format!("obs-plugin-{family}")))
                .cgroup_parent(&format!("/ecs/{id}"))
                .ecs(&EcsLabels {
                    task_arn: &arn,
                    container_name: "app",
                    cluster: CLUSTER,
                    family,
                    version: "1",
                });
            for (k, v) in labels {
                r = r.label(k, v);
            }
            let docker_id = docker.start(run(r).cmd(&["sleep", "3600"]))?;
            Ok(Self {
                id,
                arn,
                family,
                docker_id,
            })
        }

        pub fn fake(&self) -> FakeTask {
            FakeTask::running(CLUSTER, &self.id, self.family, "1").container(&self.docker_id, "app")
        }
    }

    /// The port Docker published `container_port` on (`docker port`: `127.0.0.1:49153`).
    pub fn published(id: &str, container_port: u16) -> Result<u16> {
        let out = sh("docker", &["port", id, &format!("{container_port}/tcp")])?;
        let line = out.lines().next().context("docker port printed nothing")?;
        let port = line.rsplit(':').next().unwrap_or_default();
        port.trim()
            .parse()
            .with_context(|| format!("docker port printed {out:?}"))
    }

    pub fn host_by_identifier(mackerel: &FakeMackerel, ci: &str) -> Option<FakeHost> {
        mackerel
            .hosts()
            .into_iter()
            .find(|h| h.custom_identifier.as_deref() == Some(ci))
    }

    /// The points of `ci`'s host named `name`.
    pub fn points(mackerel: &FakeMackerel, ci: &str, name: &str) -> Vec<Point> {
        let Some(host) = host_by_identifier(mackerel, ci) else {
            return Vec::new();
        };
        (mackerel.points().into_iter())
            .filter(|p| p.host_id == host.id && p.name == name)
            .collect()
    }

    /// The workload's own `custom.*` names on `ci`'s host (observer's `custom.observer.*` apart).
    pub fn custom_names(mackerel: &FakeMackerel, ci: &str) -> Vec<String> {
        let Some(host) = host_by_identifier(mackerel, ci) else {
            return Vec::new();
        };
        let mut names: Vec<String> = (mackerel.points().into_iter())
            .filter(|p| {
                p.host_id == host.id
                    && p.name.starts_with("custom.")
                    && !p.name.starts_with("custom.observer.")
            })
            .map(|p| p.name)
            .collect();
        names.sort();
        names.dedup();
        names
    }

    pub fn start_observer(args: &[String]) -> Result<ObserverCmd> {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut observer =
            ObserverCmd::start_with_env(OBSERVER, &args, &[("MACKEREL_APIKEY", API_KEY)])?;
        tokio::task::block_in_place(|| observer.wait_log("attached", WAIT))?;
        Ok(observer)
    }

    pub async fn wait_until(what: &str, mut ok: impl FnMut() -> bool) -> Result<()> {
        let end = Instant::now() + WAIT;
        while !ok() {
            ensure!(Instant::now() < end, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    pub fn stop(observer: ObserverCmd) -> Result<Finished> {
        observer.signal(libc::SIGTERM);
        let done = tokio::task::block_in_place(|| observer.finish(WAIT))?;
        ensure!(
            done.status.success(),
            "observer exited with {}:\n{}",
            done.status,
            done.log
        );
        ensure!(!done.log.contains(API_KEY), "the API key is in the log");
        Ok(done)
    }

    /// observer's own `/metrics`, once `ok` holds of it.
    pub async fn own_metrics(url: &str, ok: impl Fn(&str) -> bool) -> Result<String> {
        let http = reqwest::Client::builder().no_proxy().build()?;
        let end = Instant::now() + WAIT;
        loop {
            let text = http.get(url).send().await?.text().await?;
            if ok(&text) {
                return Ok(text);
            }
            ensure!(Instant::now() < end, "not yet at {url}:\n{text}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// The whole path through the real binary: ECS-like tasks (real containers, the fake agent
/// listing their ports as the introspection API does) name plugins in their Docker labels;
/// observer runs the configured script per task with the task's address and port (bridge:
/// the published port on the node; host: the container port on the node; awsvpc: the task's
/// address), and the fake Mackerel gets each task's values on its own host under
/// mackerel-agent's names, and the plugin's graph definitions once. A plugin that hangs on
/// one task is killed at its timeout, counted and logged once, while every task's values still
/// arrive; a label naming an unconfigured plugin (or a command) runs nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_task_gets_its_plugins_values_on_its_own_host_and_a_hanging_one_costs_only_itself(
) -> anyhow::Result<()> {
    use anyhow::{ensure, Context as _};
    use e2e::*;
    use testbed::{
        docker::{skip_unless_docker, Containers},
        fake_mackerel::FakeMackerel,
        fake_platform::FakeEcsAgent,
    };

    const TEST: &str =
        "each_task_gets_its_plugins_values_on_its_own_host_and_a_hanging_one_costs_only_itself";
    if skip_unless_docker(TEST) {
        return Ok(());
    }
    let dir = PluginDir::new();
    let out = dir.out();
    // Prints what it was given as values; leaves a marker per task it ran for.
    let echo = dir.script(
        "echo.sh",
        r#"if [ "$MACKEREL_AGENT_PLUGIN_META" = 1 ]; then
  echo '# mackerel-agent-plugin'
  echo '{"graphs": {"echo": {"label": "Echo", "unit": "integer", "metrics": [{"name": "port", "label": "Port"}]}, "echo.addr": {"label": "Address", "metrics": [{"name": "*", "label": "%1"}]}}}'
  exit 0
fi
now=$(date +%s)
touch "$5/ran-$4"
printf 'echo.port\t%s\t%s\n' "$2" "$now"
printf 'echo.addr.%s\t1\t%s\n' "$(echo "$1" | tr . _)" "$now"
printf 'echo.task.%s\t1\t%s\n' "$4" "$now"
printf 'echo.container.%s\t1\t%s\n' "$3" "$now"
"#,
    );
    // Says it started, then never ends (nor does what it started).
    let hang = dir.script(
        "hang.sh",
        "echo $$ >> \"$1/hang.pids\"\nprintf 'hang.started\\t1\\t0\\n'\nsleep 600 &\nsleep 600\n",
    );
    let config = dir.0.join("plugins.toml");
    std::fs::write(
        &config,
        format!(
            r#"[plugin.echo]
command = ["{echo}", "{{addr}}", "{{port}}", "{{container}}", "{{task}}", "{out}"]
timeout = "20s"

[plugin.hang]
command = ["{hang}", "{out}"]
timeout = "1s"
"#,
            echo = echo.display(),
            hang = hang.display(),
            out = out.display()
        ),
    )?;

    let mackerel = FakeMackerel::start(API_KEY).await;
    let agent = FakeEcsAgent::start().await;
    agent.set_cluster(CLUSTER);
    let mut docker = Containers::new();
    let label = PLUGINS_LABEL;
    // Bridge: 8080 published on a port Docker picks, on loopback.
    let web = Task::start(&mut docker, "web", &[(label, "echo")], |r| {
        r.network("bridge").arg("-p").arg("127.0.0.1::8080")
    })?;
    let web_port = published(&web.docker_id, 8080)?;
    // Host mode, and the plugin that hangs.
    let cache = Task::start(&mut docker, "cache", &[(label, "hang, echo")], |r| {
        r.network("host")
    })?;
    // awsvpc as the agent lists it (the task's ENI address): nothing is sent there, the
    // script only prints what it is given.
    let vpc = Task::start(&mut docker, "vpc", &[(label, "echo")], |r| {
        r.network("none")
    })?;
    // Names that are not the operator's: an unknown one, the script's path, a command.
    let hostile = format!(
        "ghost, {}, sh -c 'touch {}/ran-evil'",
        echo.display(),
        out.display()
    );
    let ghost = Task::start(&mut docker, "ghost", &[(label, &hostile)], |r| {
        r.network("bridge")
    })?;
    agent.set_tasks(&[
        web.fake().port(8080, web_port),
        // Host mode: the agent repeats the task definition's mappings.
        cache.fake().port(6379, 6379),
        vpc.fake().port(9121, 9121).awsvpc(),
        ghost.fake(),
    ]);

    let args: Vec<String> = [
        "--platform",
        "ecs",
        "--ecs-agent-url",
        &agent.url(),
        "--interval",
        "1s",
        "--output",
        "json",
        "--mackerel-api-base",
        &mackerel.url(),
        "--mackerel-interval",
        "3s",
        "--prometheus-listen",
        "127.0.0.1:0",
        "--plugins-config",
        &config.display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut observer = start_observer(&args)?;
    let metrics_url = observer
        .log_so_far()
        .iter()
        .find_map(|l| {
            let at = l.find("Prometheus endpoint on ")? + "Prometheus endpoint on ".len();
            Some(l[at..].split_whitespace().next()?.to_owned())
        })
        .context("the Prometheus endpoint's address in the log")?;

    wait_until("every task's echo values", || {
        [&web, &cache, &vpc]
            .iter()
            .all(|t| !points(&mackerel, &t.arn, "custom.echo.port").is_empty())
    })
    .await?;
    // The hanging plugin: timeouts counted, and more than one run started.
    let own = own_metrics(&metrics_url, |m| m.contains("cause=\"plugin_timeout\"")).await?;
    let pids = out.join("hang.pids");
    wait_until("a second run of the hanging plugin", || {
        std::fs::read_to_string(&pids).is_ok_and(|p| p.lines().count() >= 2)
    })
    .await?;
    let pgids: Vec<i32> = std::fs::read_to_string(&pids)?
        .lines()
        .map(|l| l.trim().parse().context("a pid"))
        .collect::<anyhow::Result<_>>()?;
    let _cleanup: Vec<KillGroup> = pgids.iter().map(|&p| KillGroup(p)).collect();
    // The first run is long over its 1 s: killed with what it started, observer still running.
    ensure!(
        group_gone(pgids[0]) == Ok(()),
        "the first hanging run's group is still there: {:?}",
        group_members(pgids[0])
    );
    let done = stop(observer)?;

    // Each task's values on its own host, under mackerel-agent's names, its own address and
    // port substituted.
    let node = "127_0_0_1";
    for (task, addr, port) in [
        (&web, node, web_port),
        (&cache, node, 6379),
        (&vpc, "10_0_2_61", 9121),
    ] {
        let names = custom_names(&mackerel, &task.arn);
        let want = vec![
            format!("custom.echo.addr.{addr}"),
            "custom.echo.container.app".to_owned(),
            "custom.echo.port".to_owned(),
            format!("custom.echo.task.{}", task.id),
        ];
        ensure!(names == want, "{}: {names:?}, want {want:?}", task.family);
        let ports = points(&mackerel, &task.arn, "custom.echo.port");
        ensure!(
            ports.iter().all(|p| p.value == f64::from(port)),
            "{}: {{port}} is {port}: {ports:?}",
            task.family
        );
        ensure!(
            out.join(format!("ran-{}", task.id)).exists(),
            "{}: ran with its task id",
            task.family
        );
    }
    // What the hanging plugin printed before its timeout is not posted: the run failed.
    ensure!(
        custom_names(&mackerel, &cache.arn)
            .iter()
            .all(|n| !n.starts_with("custom.hang")),
        "a killed run posts nothing"
    );

    // Unconfigured names ran nothing: no marker, no values, one line per workload and name.
    ensure!(
        !out.join(format!("ran-{}", ghost.id)).exists() && !out.join("ran-evil").exists(),
        "nothing ran for the ghost task: {:?}",
        std::fs::read_dir(&out)?
            .flatten()
            .map(|e| e.file_name())
            .collect::<Vec<_>>()
    );
    ensure!(
        host_by_identifier(&mackerel, &ghost.arn).is_some(),
        "the ghost task still has its host"
    );
    ensure!(
        custom_names(&mackerel, &ghost.arn).is_empty(),
        "{:?}",
        custom_names(&mackerel, &ghost.arn)
    );
    let ghost_lines = done
        .log
        .lines()
        .filter(|l| l.contains("\"ghost:1\" names \"ghost\" in mackerel.io/plugins"))
        .count();
    ensure!(ghost_lines == 1, "one line:\n{}", done.log);

    // The hanging plugin: counted for its workload only, one log line for the cause.
    ensure!(
        own.lines().any(|l| l.starts_with(
            r#"observer_app_scrape_errors_total{workload="cache:1",cause="plugin_timeout"} "#
        )),
        "{own}"
    );
    ensure!(
        !own.contains("web:1") && !own.contains("vpc:1"),
        "no errors of the others: {own}"
    );
    let hang_lines = done
        .log
        .lines()
        .filter(|l| {
            l.contains("Application metrics of cache:1 (app): plugin hang for 127.0.0.1:6379: killed at its timeout of 1s")
        })
        .count();
    ensure!(
        hang_lines == 1,
        "one line per workload and cause:\n{}",
        done.log
    );

    // The plugin's graph definitions, its names, once for every task.
    let defs = mackerel.graph_defs();
    let echo_defs: Vec<&serde_json::Value> =
        defs.iter().filter(|d| d["name"] == "custom.echo").collect();
    ensure!(echo_defs.len() == 1, "once: {defs:#?}");
    let g = echo_defs[0];
    ensure!(
        g["displayName"] == "Echo"
            && g["unit"] == "integer"
            && g["metrics"][0]["name"] == "custom.echo.port"
            && g["metrics"][0]["displayName"] == "Port",
        "{g}"
    );
    let addr = defs
        .iter()
        .find(|d| d["name"] == "custom.echo.addr")
        .context("the second graph")?;
    ensure!(
        addr["unit"] == "float" && addr["metrics"][0]["name"] == "custom.echo.addr.*",
        "{addr}"
    );
    drop(docker);
    Ok(())
}

/// A plugins config that cannot be used stops observer at start, in one line naming the file
/// and what is wrong with it, before anything is loaded.
#[test]
fn an_unusable_plugins_config_stops_observer_with_one_clear_line() {
    let dir = PluginDir::new();
    let missing = dir.0.join("missing.toml");
    let bad = dir.0.join("bad.toml");
    std::fs::write(
        &bad,
        "[plugin.gostats]\ncommand = [\"/bin/true\", \"-port={prot}\"]\n",
    )
    .unwrap();
    let root = dir.0.join("root.toml");
    std::fs::write(
        &root,
        "[plugin.gostats]\ncommand = [\"/bin/true\"]\nuser = \"root\"\n",
    )
    .unwrap();
    for (file, want) in [
        (&missing, format!("plugins config {}: No such file", missing.display())),
        (
            &bad,
            format!(
                "plugins config {} line 2: plugin.gostats.command[1]: \"-port={{prot}}\": unknown placeholder {{prot}}",
                bad.display()
            ),
        ),
        (
            &root,
            format!(
                "plugins config {}: plugin gostats: user \"root\": is uid 0 gid 0: plugins never run as root",
                root.display()
            ),
        ),
    ] {
        let observer = testbed::ObserverCmd::start(
            e2e::OBSERVER,
            &["--plugins-config", &file.display().to_string(), "--once"],
        )
        .unwrap();
        let done = observer.finish(e2e::WAIT).unwrap();
        assert!(!done.status.success(), "{}: {}", file.display(), done.log);
        let errors: Vec<&str> = done.log.lines().filter(|l| l.contains("ERROR")).collect();
        assert_eq!(errors.len(), 1, "{}", done.log);
        assert!(errors[0].contains(&want), "{:?} lacks {want:?}", errors[0]);
        assert!(!done.log.contains("attached"), "nothing loaded: {}", done.log);
    }
}
