//! The operator's plugin file (`--plugins-config`, TOML; docs/plugins.md): which
//! mackerel-agent metric plugins a workload may name, their argv templates, user, timeout,
//! environment and caps. Only this file says what runs; a workload's labels only pick names
//! from it. Parsing is pure: users are resolved and privileges checked in `plugin.rs`.

use std::{collections::BTreeMap, fmt, ops::Range, path::PathBuf, time::Duration};

use serde::Deserialize;
use toml::Spanned;

/// Longest plugin file read: a few hundred plugins fit in a fraction of it.
pub const MAX_FILE_BYTES: u64 = 1 << 20;
/// Default time a run may take; mackerel-agent's is 30 s in a 60 s interval.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest timeout: a run must end well inside Mackerel's 60 s interval.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(50);
/// Default cap on the series one run reports (the rest dropped and counted).
pub const DEFAULT_MAX_SERIES: usize = 500;
/// Largest `max_series` a plugin may be given.
pub const MAX_MAX_SERIES: usize = 10_000;
/// Default cap on the bytes of one run's stdout (the run is killed there).
pub const DEFAULT_MAX_OUTPUT: usize = 1 << 20;
/// Largest `max_output` a plugin may be given.
pub const MAX_MAX_OUTPUT: usize = 16 << 20;
/// The user plugins run as unless the file names another.
pub const DEFAULT_USER: &str = "nobody";
/// PATH of a plugin's environment unless its `env` sets one: the environment starts empty.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Set by observer itself (`1` for graph definitions, empty for values), as mackerel-agent does.
pub const META_ENV: &str = "MACKEREL_AGENT_PLUGIN_META";
/// Longest plugin name (`mackerel.io/plugins` lists names).
pub const MAX_NAME_LEN: usize = 64;

/// The flag that names the file, for `#[command(flatten)]` into observer's arguments.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct PluginArgs {
    /// TOML file of the mackerel-agent metric plugins a task or pod may have run for it by
    /// naming them in its mackerel.io/plugins Docker label or pod annotation (docs/plugins.md):
    /// `[plugin.<name>]` with `command = ["/path/to/plugin", "-host", "{addr}", "-port",
    /// "{port}"]`, and optionally user (default nobody; never root), timeout (10s), env,
    /// max_series, max_output. Each named plugin runs once per --mackerel-interval with the
    /// workload's address and port, and its values go to the workload's Mackerel host as
    /// custom.<name> (with --app-metrics on). Only this file says what runs. A file that cannot
    /// be read or used stops observer at start, naming the line at fault. Switching to the
    /// plugins' user needs CAP_SETUID and CAP_SETGID [default: no plugins].
    #[arg(long, env = "OBSERVER_PLUGINS_CONFIG", value_name = "PATH")]
    pub plugins_config: Option<PathBuf>,
}

/// The whole file, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginsConfig {
    pub plugins: BTreeMap<String, PluginConfig>,
}

/// One `[plugin.<name>]` table, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginConfig {
    pub name: String,
    /// The program (never substituted) and its argument templates.
    pub program: String,
    pub args: Vec<Template>,
    /// As written: a name looked up in /etc/passwd, `uid` or `uid:gid`.
    pub user: String,
    pub timeout: Duration,
    /// The whole environment of a run, apart from [`META_ENV`]; PATH defaults to [`DEFAULT_PATH`].
    pub env: BTreeMap<String, String>,
    pub max_series: usize,
    pub max_output: usize,
    /// Take each line's own epoch (within 15 minutes of now) rather than the run's time, as
    /// mackerel-agent's `use_plugin_timestamp` does.
    pub use_plugin_timestamp: bool,
}

/// What observer may put into an argument: its own values, never a label's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placeholder {
    /// The workload's address (an IP, no brackets).
    Addr,
    /// The port (a number).
    Port,
    /// The container's name.
    Container,
    /// The task's or pod's id.
    Task,
}

impl Placeholder {
    fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "addr" => Self::Addr,
            "port" => Self::Port,
            "container" => Self::Container,
            "task" => Self::Task,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Addr => "addr",
            Self::Port => "port",
            Self::Container => "container",
            Self::Task => "task",
        }
    }
}

/// One piece of an argument template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Text(String),
    Value(Placeholder),
}

/// One argument: text and placeholders, `{{` and `}}` for literal braces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template(pub Vec<Piece>);

impl Template {
    /// `-host={addr}` and friends; an unknown or unclosed placeholder is refused.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut pieces = Vec::new();
        let mut text = String::new();
        let mut chars = s.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    text.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    text.push('}');
                }
                '{' => {
                    let mut name = String::new();
                    let mut closed = false;
                    for c in chars.by_ref() {
                        if c == '}' {
                            closed = true;
                            break;
                        }
                        name.push(c);
                    }
                    if !closed {
                        return Err(format!(
                            "{s:?}: `{{` without a closing `}}` (write `{{{{` for a brace)"
                        ));
                    }
                    let Some(p) = Placeholder::parse(&name) else {
                        return Err(format!(
                            "{s:?}: unknown placeholder {{{name}}} (known: {{addr}}, {{port}}, {{container}}, {{task}}; write `{{{{` for a brace)"
                        ));
                    };
                    if !text.is_empty() {
                        pieces.push(Piece::Text(std::mem::take(&mut text)));
                    }
                    pieces.push(Piece::Value(p));
                }
                '}' => {
                    return Err(format!(
                        "{s:?}: `}}` without `{{` (write `}}}}` for a brace)"
                    ))
                }
                c => text.push(c),
            }
        }
        if !text.is_empty() || pieces.is_empty() {
            pieces.push(Piece::Text(text));
        }
        Ok(Self(pieces))
    }

    /// The argument with each placeholder replaced by `value(p)`.
    pub fn render<E>(
        &self,
        mut value: impl FnMut(Placeholder) -> Result<String, E>,
    ) -> Result<String, E> {
        let mut out = String::new();
        for piece in &self.0 {
            match piece {
                Piece::Text(t) => out.push_str(t),
                Piece::Value(p) => out.push_str(&value(*p)?),
            }
        }
        Ok(out)
    }
}

/// A file that cannot be used, with where and why.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("plugins config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("plugins config {path}: larger than {MAX_FILE_BYTES} bytes")]
    TooLarge { path: PathBuf },
    /// The TOML itself, or a field of the wrong type or name (toml's message has the line).
    #[error("plugins config{}: {message}", At(.path))]
    Syntax {
        path: Option<PathBuf>,
        message: String,
    },
    /// A field that parses but cannot be used.
    #[error("plugins config{} line {line}: {field}: {message}", At(.path))]
    Field {
        path: Option<PathBuf>,
        line: usize,
        field: String,
        message: String,
    },
}

struct At<'a>(&'a Option<PathBuf>);
impl fmt::Display for At<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(p) => write!(f, " {}", p.display()),
            None => Ok(()),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    plugin: BTreeMap<Spanned<String>, Spanned<RawPlugin>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlugin {
    command: Spanned<Vec<Spanned<String>>>,
    user: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    #[serde(default)]
    env: BTreeMap<Spanned<String>, Spanned<String>>,
    max_series: Option<Spanned<i64>>,
    max_output: Option<Spanned<i64>>,
    #[serde(default)]
    use_plugin_timestamp: bool,
}

impl PluginsConfig {
    /// Reads and checks the file at `path` (at most [`MAX_FILE_BYTES`]).
    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        use std::io::Read as _;
        let read = |source| ConfigError::Read {
            path: path.to_owned(),
            source,
        };
        let file = std::fs::File::open(path).map_err(read)?;
        let mut text = String::new();
        file.take(MAX_FILE_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(read)?;
        if text.len() as u64 > MAX_FILE_BYTES {
            return Err(ConfigError::TooLarge {
                path: path.to_owned(),
            });
        }
        Self::parse(&text).map_err(|e| match e {
            ConfigError::Syntax { message, .. } => ConfigError::Syntax {
                path: Some(path.to_owned()),
                message,
            },
            ConfigError::Field {
                line,
                field,
                message,
                ..
            } => ConfigError::Field {
                path: Some(path.to_owned()),
                line,
                field,
                message,
            },
            e => e,
        })
    }

    /// Checks a file's text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let raw: RawFile = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: None,
            message: e.to_string().trim_end().to_owned(),
        })?;
        let line_of =
            |span: Range<usize>| text[..span.start.min(text.len())].matches('\n').count() + 1;
        let field = |span: Range<usize>, field: String, message: String| ConfigError::Field {
            path: None,
            line: line_of(span),
            field,
            message,
        };
        let mut plugins = BTreeMap::new();
        for (name, raw) in raw.plugin {
            let (name_span, name) = (name.span(), name.into_inner());
            let at = format!("plugin.{name}");
            if !valid_name(&name) {
                return Err(field(
                    name_span,
                    at,
                    format!("a plugin name is 1 to {MAX_NAME_LEN} of A-Z a-z 0-9 _ - (workloads list names, comma-separated)"),
                ));
            }
            let raw = raw.into_inner();
            let command_span = raw.command.span();
            let mut command = raw.command.into_inner().into_iter();
            let Some(program) = command.next() else {
                return Err(field(
                    command_span,
                    format!("{at}.command"),
                    "empty: give the program and its arguments".into(),
                ));
            };
            let (program_span, program) = (program.span(), program.into_inner());
            if program.is_empty() || program.contains(['{', '}', '\0']) {
                return Err(field(
                    program_span,
                    format!("{at}.command[0]"),
                    format!(
                        "{program:?}: the program is a plain path or name, with no placeholders"
                    ),
                ));
            }
            let mut args = Vec::new();
            for (i, arg) in command.enumerate() {
                let span = arg.span();
                let arg = arg.into_inner();
                let check = if arg.contains('\0') {
                    Err(format!("{arg:?}: a NUL byte"))
                } else {
                    Template::parse(&arg)
                };
                args.push(check.map_err(|m| field(span, format!("{at}.command[{}]", i + 1), m))?);
            }
            let user = match raw.user {
                Some(u) if u.get_ref().trim().is_empty() => {
                    return Err(field(
                        u.span(),
                        format!("{at}.user"),
                        "empty: name a user, uid or uid:gid".into(),
                    ))
                }
                Some(u) => u.into_inner().trim().to_owned(),
                None => DEFAULT_USER.to_owned(),
            };
            let timeout = match raw.timeout {
                None => DEFAULT_TIMEOUT,
                Some(t) => {
                    let span = t.span();
                    let d = humantime::parse_duration(t.get_ref()).map_err(|e| {
                        field(
                            span.clone(),
                            format!("{at}.timeout"),
                            format!("{:?}: {e} (e.g. \"10s\")", t.get_ref()),
                        )
                    })?;
                    if d < Duration::from_millis(100) || d > MAX_TIMEOUT {
                        return Err(field(
                            span,
                            format!("{at}.timeout"),
                            format!(
                                "{:?}: from 100ms to {}",
                                t.get_ref(),
                                humantime::format_duration(MAX_TIMEOUT)
                            ),
                        ));
                    }
                    d
                }
            };
            let mut env = BTreeMap::new();
            for (key, value) in raw.env {
                let (span, key) = (key.span(), key.into_inner());
                let f = format!("{at}.env.{key}");
                if !valid_env_name(&key) {
                    return Err(field(
                        span,
                        f,
                        "an environment name is A-Z a-z 0-9 _, not starting with a digit".into(),
                    ));
                }
                if key == META_ENV {
                    return Err(field(
                        span,
                        f,
                        "set by observer for each run, as mackerel-agent does".into(),
                    ));
                }
                if key == "MACKEREL_APIKEY" {
                    return Err(field(span, f, "observer posts what a plugin prints: a plugin never needs the Mackerel API key".into()));
                }
                if value.get_ref().contains('\0') {
                    return Err(field(value.span(), f, "a NUL byte".into()));
                }
                env.insert(key, value.into_inner());
            }
            env.entry("PATH".to_owned())
                .or_insert_with(|| DEFAULT_PATH.to_owned());
            let bounded = |v: Option<Spanned<i64>>, name: &str, default: usize, max: usize| match v
            {
                None => Ok(default),
                Some(v) => match usize::try_from(*v.get_ref()) {
                    Ok(n) if (1..=max).contains(&n) => Ok(n),
                    _ => Err(field(
                        v.span(),
                        format!("{at}.{name}"),
                        format!("{}: from 1 to {max}", v.get_ref()),
                    )),
                },
            };
            let max_series = bounded(
                raw.max_series,
                "max_series",
                DEFAULT_MAX_SERIES,
                MAX_MAX_SERIES,
            )?;
            let max_output = bounded(
                raw.max_output,
                "max_output",
                DEFAULT_MAX_OUTPUT,
                MAX_MAX_OUTPUT,
            )?;
            plugins.insert(
                name.clone(),
                PluginConfig {
                    name,
                    program,
                    args,
                    user,
                    timeout,
                    env,
                    max_series,
                    max_output,
                    use_plugin_timestamp: raw.use_plugin_timestamp,
                },
            );
        }
        Ok(Self { plugins })
    }
}

/// A plugin name as a file and a label may give it.
pub fn valid_name(name: &str) -> bool {
    (1..=MAX_NAME_LEN).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn valid_env_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        PluginsConfig::parse(text).expect_err("refused").to_string()
    }

    #[test]
    fn a_full_plugin_parses_with_its_templates() {
        let c = PluginsConfig::parse(
            r#"
[plugin.gostats]
command = ["mackerel-plugin-gostats", "-host", "{addr}", "-port={port}", "{{x}}-{container}-{task}"]
user = "65534:65534"
timeout = "3s"
env = { A = "1", PATH = "/opt/bin" }
max_series = 20
max_output = 4096
use_plugin_timestamp = true
"#,
        )
        .unwrap();
        let p = &c.plugins["gostats"];
        assert_eq!(p.program, "mackerel-plugin-gostats");
        assert_eq!(p.args[0], Template(vec![Piece::Text("-host".into())]));
        assert_eq!(p.args[1], Template(vec![Piece::Value(Placeholder::Addr)]));
        assert_eq!(
            p.args[2],
            Template(vec![
                Piece::Text("-port=".into()),
                Piece::Value(Placeholder::Port)
            ])
        );
        assert_eq!(
            p.args[3],
            Template(vec![
                Piece::Text("{x}-".into()),
                Piece::Value(Placeholder::Container),
                Piece::Text("-".into()),
                Piece::Value(Placeholder::Task),
            ])
        );
        assert_eq!(p.user, "65534:65534");
        assert_eq!(p.timeout, Duration::from_secs(3));
        assert_eq!(p.env["A"], "1");
        assert_eq!(p.env["PATH"], "/opt/bin", "the file's PATH wins");
        assert_eq!(
            (p.max_series, p.max_output, p.use_plugin_timestamp),
            (20, 4096, true)
        );
    }

    #[test]
    fn defaults_are_nobody_ten_seconds_and_a_path() {
        let c = PluginsConfig::parse("[plugin.a]\ncommand = [\"/bin/true\"]\n").unwrap();
        let p = &c.plugins["a"];
        assert_eq!(p.user, "nobody");
        assert_eq!(p.timeout, DEFAULT_TIMEOUT);
        assert_eq!(p.env.len(), 1);
        assert_eq!(p.env["PATH"], DEFAULT_PATH);
        assert!(p.args.is_empty());
        assert_eq!(
            (p.max_series, p.max_output),
            (DEFAULT_MAX_SERIES, DEFAULT_MAX_OUTPUT)
        );
        assert!(PluginsConfig::parse("").unwrap().plugins.is_empty());
    }

    #[test]
    fn bad_fields_are_refused_with_their_line_and_name() {
        let e = err("[plugin.a]\ncommand = [\"x\", \"{host}\"]\n");
        assert!(
            e.contains("line 2") && e.contains("plugin.a.command[1]") && e.contains("{host}"),
            "{e}"
        );
        let e = err("[plugin.a]\n\ncommand = [\"{addr}\"]\n");
        assert!(
            e.contains("line 3") && e.contains("command[0]") && e.contains("no placeholders"),
            "{e}"
        );
        let e = err("[plugin.a]\ncommand = []\n");
        assert!(
            e.contains("line 2") && e.contains("plugin.a.command") && e.contains("empty"),
            "{e}"
        );
        let e = err("[plugin.a]\ncommand = [\"x\"]\ntimeout = \"forever\"\n");
        assert!(
            e.contains("line 3") && e.contains("plugin.a.timeout"),
            "{e}"
        );
        let e = err("[plugin.a]\ncommand = [\"x\"]\ntimeout = \"5m\"\n");
        assert!(e.contains("from 100ms to 50s"), "{e}");
        let e = err("[plugin.a]\ncommand = [\"x\"]\nenv = { MACKEREL_APIKEY = \"k\" }\n");
        assert!(
            e.contains("line 3") && e.contains("env.MACKEREL_APIKEY") && !e.contains("\"k\""),
            "{e}"
        );
        let e =
            err("[plugin.a]\ncommand = [\"x\"]\nenv = { MACKEREL_AGENT_PLUGIN_META = \"1\" }\n");
        assert!(e.contains("set by observer"), "{e}");
        let e = err("[plugin.a]\ncommand = [\"x\"]\nenv = { \"A-B\" = \"1\" }\n");
        assert!(e.contains("env.A-B"), "{e}");
        let e = err("[plugin.a]\ncommand = [\"x\"]\nmax_series = 0\n");
        assert!(
            e.contains("line 3") && e.contains("plugin.a.max_series") && e.contains("from 1 to"),
            "{e}"
        );
        let e = err("[plugin.a]\ncommand = [\"x\"]\nuser = \" \"\n");
        assert!(e.contains("plugin.a.user"), "{e}");
        let e = err("[plugin.\"a b\"]\ncommand = [\"x\"]\n");
        assert!(
            e.contains("line 1") && e.contains("plugin.a b") && e.contains("plugin name"),
            "{e}"
        );
    }

    #[test]
    fn toml_errors_name_the_line_and_unknown_fields_are_refused() {
        let e = err("[plugin.a]\ncommand = [\"x\"]\ncomand = [\"y\"]\n");
        assert!(e.contains("line 3") && e.contains("comand"), "{e}");
        let e = err("[plugin.a]\ncommand = \"x -h {addr}\"\n");
        assert!(
            e.contains("line 2"),
            "a shell string is not an argv array: {e}"
        );
        let e = err("[plugin.a]\n");
        assert!(e.contains("command"), "{e}");
        let e = err("[plugins.a]\ncommand = [\"x\"]\n");
        assert!(e.contains("plugins"), "{e}");
    }

    #[test]
    fn templates_render_whole_and_partial_arguments() {
        let t = Template::parse("http://{addr}:{port}/m").unwrap();
        let out = t
            .render(|p| {
                Ok::<_, ()>(match p {
                    Placeholder::Addr => "10.0.0.1".into(),
                    Placeholder::Port => "9100".into(),
                    _ => unreachable!(),
                })
            })
            .unwrap();
        assert_eq!(out, "http://10.0.0.1:9100/m");
        assert_eq!(
            Template::parse("").unwrap().render(|_| Err(())),
            Ok(String::new())
        );
        assert_eq!(
            Template::parse("{{}}").unwrap().render(|_| Err(())),
            Ok("{}".into())
        );
        for bad in ["{addr", "x}", "{}", "{ADDR}", "{addr }"] {
            assert!(Template::parse(bad).is_err(), "{bad}");
        }
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;
        use crate::fuzz;

        const SEED: &str = "[plugin.gostats]\ncommand = [\"mackerel-plugin-gostats\", \"-host\", \"{addr}\", \"-port={port}\"]\nuser = \"nobody\"\ntimeout = \"10s\"\nenv = { A = \"\u{e9}\" }\nmax_series = 5\n";

        proptest! {
            #![proptest_config(fuzz::config(1000))]

            /// No panic (line numbers come from byte spans); what passes holds what it must.
            #[test]
            fn mutated_files(text in fuzz::mutated_text(vec![SEED.to_owned()], 8)) {
                match PluginsConfig::parse(&text) {
                    Ok(c) => {
                        for p in c.plugins.values() {
                            prop_assert!(valid_name(&p.name));
                            let plain = !p.program.is_empty() && !p.program.contains(['{', '}']);
                            prop_assert!(plain);
                            prop_assert!(p.timeout <= MAX_TIMEOUT && !p.env.contains_key("MACKEREL_APIKEY"));
                        }
                    }
                    Err(e) => prop_assert!(!e.to_string().is_empty()),
                }
            }
        }
    }
}
