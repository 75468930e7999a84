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
