//! The plugins as a [`Collect`]: each [`Source::Plugin`] target is one run of the named
//! plugin with the target's address, port, container and task substituted. Its values keep
//! the names mackerel-agent gives them (`custom.` + the name as printed, never observer's
//! `custom.<prefix>.` of endpoints) and are not made rates: a plugin posts what it means.
//!
//! The plugin's graph definitions (its `MACKEREL_AGENT_PLUGIN_META=1` run) are asked for once
//! per plugin and host, beside its first values run that works (each with the plugin's
//! timeout, neither waiting for the other); each graph is handed on once. A meta run that
//! fails beside a values run that works costs only the graphs: the values still go, the
//! failure is counted and logged as the others are, and it is not asked again.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
};

use super::{
    plugin::{self, PluginError, PluginSet},
    scrape::{Collect, Collecting, ScrapeError},
    NamedValue, Problem, Samples, Source, Target,
};
use crate::mackerel::client::GraphDef;

/// Most graph names remembered as handed on (then forgotten, and handed on again: harmless).
const MAX_GRAPHS_REMEMBERED: usize = 10_000;

/// Runs the operator's plugins for the targets that name them.
#[derive(Debug)]
pub struct PluginCollector {
    set: Arc<PluginSet>,
    /// (host, plugin) whose meta run was started: once each while the target lives.
    meta_asked: Mutex<HashSet<(String, String)>>,
    /// Graph names handed on.
    graphs: Mutex<HashSet<String>>,
}

impl PluginCollector {
    pub fn new(set: Arc<PluginSet>) -> Self {
        Self {
            set,
            meta_asked: Mutex::new(HashSet::new()),
            graphs: Mutex::new(HashSet::new()),
        }
    }

    /// True the first time for `target`'s host and plugin.
    fn meta_due(&self, target: &Target, name: &str) -> bool {
        let mut asked = self.meta_asked.lock().unwrap_or_else(|e| e.into_inner());
        asked.insert((target.host_key.clone(), name.to_owned()))
    }

    fn forget_meta(&self, target: &Target, name: &str) {
        let mut asked = self.meta_asked.lock().unwrap_or_else(|e| e.into_inner());
        asked.remove(&(target.host_key.clone(), name.to_owned()));
    }

    /// The graphs of `defs` not handed on before.
    fn new_graphs(&self, defs: Vec<GraphDef>) -> Vec<GraphDef> {
        let mut graphs = self.graphs.lock().unwrap_or_else(|e| e.into_inner());
        if graphs.len() + defs.len() > MAX_GRAPHS_REMEMBERED {
            graphs.clear();
        }
        defs.into_iter()
            .filter(|d| graphs.insert(d.name.clone()))
            .collect()
    }

    async fn run(&self, target: &Target) -> Result<Samples, ScrapeError> {
        let Source::Plugin(name) = &target.source else {
            return Err(ScrapeError::Other {
                cause: "plugin_unknown",
                message: "not a plugin target".into(),
            });
        };
        let at = plugin::Target {
            addr: target.address,
            port: target.port,
            container: Some(target.container.clone()),
            task: Some(target.workload_id.clone()),
        };
        // reach.rs names configured plugins only; the file does not change while observer runs.
        let run = self.set.run(name, &at).ok_or_else(|| ScrapeError::Other {
            cause: "plugin_unknown",
            message: format!("plugin {name} is not in the plugins config"),
        })?;
        let meta_due = self.meta_due(target, name);
        let meta = async {
            if meta_due {
                Some(run.meta().await)
            } else {
                None
            }
        };
        let (values, meta) = tokio::join!(run.values(), meta);
        if meta_due && values.is_err() {
            // The plugin did not run well at all (not installed yet, hung): ask again next time.
            self.forget_meta(target, name);
        }
        let mut samples = Samples::default();
        match meta {
            Some(Ok(meta)) => {
                samples.graph_defs = self.new_graphs(meta.graph_defs);
                if meta.invalid > 0 {
                    log::debug!(
                        "plugin {name} of {}: {} graphs or metrics of its meta left out",
                        target.workload,
                        meta.invalid
                    );
                }
            }
            Some(Err(e)) => samples.problems.push(problem(name, &e)),
            None => {}
        }
        let output = values.map_err(|e| {
            let Problem { cause, message } = problem(name, &e);
            ScrapeError::Other { cause, message }
        })?;
        let own_time = run.uses_plugin_timestamp();
        samples.named = (output.values.samples.into_iter())
            .map(|s| NamedValue {
                name: s.name,
                value: s.value,
                time: own_time.then_some(s.time),
            })
            .collect();
        samples.dropped = output.values.dropped;
        samples.bad_lines = output.values.invalid;
        if output.truncated {
            samples.problems.push(Problem {
                cause: "plugin_output",
                message: "killed at its max_output; its complete lines were read".into(),
            });
        }
        if let Some(code) = output.exit_code {
            log::debug!(
                "plugin {name} of {} exited with {code}; its values were read (stderr: {:?})",
                target.workload,
                output.stderr
            );
        }
        Ok(samples)
    }
}

impl Collect for PluginCollector {
    fn collect<'a>(&'a self, target: &'a Target) -> Collecting<'a> {
        Box::pin(self.run(target))
    }

    /// Forgets the meta runs of hosts and plugins no longer listed, so a new task asks again.
    fn retain(&self, targets: &[Target]) {
        let live: HashSet<(&str, &str)> = (targets.iter())
            .filter_map(|t| match &t.source {
                Source::Plugin(name) => Some((t.host_key.as_str(), name.as_str())),
                Source::Prometheus => None,
            })
            .collect();
        let mut asked = self.meta_asked.lock().unwrap_or_else(|e| e.into_inner());
        asked.retain(|(host, name)| live.contains(&(host.as_str(), name.as_str())));
    }
}

/// `e` for the scraper's log line, which names the plugin already.
fn problem(name: &str, e: &PluginError) -> Problem {
    let message = e.to_string();
    let message = match message.strip_prefix(&format!("plugin {name}: ")) {
        Some(rest) => rest.to_owned(),
        None => message,
    };
    Problem {
        cause: e.counted_cause(),
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(host: &str, source: Source) -> Target {
        Target {
            host_key: host.into(),
            workload: "web:1".into(),
            workload_id: "abc".into(),
            container: "app".into(),
            address: std::net::IpAddr::from([127, 0, 0, 1]),
            port: 32768,
            path: String::new(),
            prefix: "p".into(),
            source,
        }
    }

    fn graph(name: &str) -> GraphDef {
        GraphDef {
            name: name.into(),
            display_name: name.into(),
            unit: "float".into(),
            metrics: vec![],
        }
    }

    #[test]
    fn meta_once_per_host_and_plugin_while_listed_and_each_graph_once() {
        let c = PluginCollector::new(Arc::new(PluginSet::empty()));
        let a = target("task-a", Source::Plugin("gostats".into()));
        let b = target("task-b", Source::Plugin("gostats".into()));
        assert!(c.meta_due(&a, "gostats"));
        assert!(!c.meta_due(&a, "gostats"), "once");
        assert!(c.meta_due(&a, "redis"), "per plugin");
        assert!(c.meta_due(&b, "gostats"), "per host");
        c.retain(&[b.clone(), target("task-a", Source::Prometheus)]);
        assert!(c.meta_due(&a, "gostats"), "a's target went: asked again");
        assert!(!c.meta_due(&b, "gostats"), "b's stays");

        let names = |defs: Vec<GraphDef>| defs.into_iter().map(|d| d.name).collect::<Vec<_>>();
        assert_eq!(
            names(c.new_graphs(vec![graph("custom.a"), graph("custom.b")])),
            ["custom.a", "custom.b"]
        );
        assert_eq!(
            names(c.new_graphs(vec![graph("custom.b"), graph("custom.c")])),
            ["custom.c"],
            "another host's meta: only what is new"
        );
    }

    #[test]
    fn a_target_of_an_unconfigured_plugin_is_an_error_not_a_run() {
        let c = PluginCollector::new(Arc::new(PluginSet::unchecked(
            "[plugin.gostats]\ncommand = [\"/nonexistent/gostats\"]\n",
        )));
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let e = rt
            .block_on(c.collect(&target("t", Source::Plugin("redis".into()))))
            .unwrap_err();
        assert_eq!(e.cause(), "plugin_unknown", "{e}");
        let e = rt
            .block_on(c.collect(&target("t", Source::Prometheus)))
            .unwrap_err();
        assert_eq!(e.cause(), "plugin_unknown", "{e}");
        // Configured, but its program is not there: the spawn's error, named for the log
        // line that already names the plugin; its meta is asked for again next time.
        let gostats = target("t", Source::Plugin("gostats".into()));
        let e = rt.block_on(c.collect(&gostats)).unwrap_err();
        assert!(c.meta_due(&gostats, "gostats"), "not marked asked");
        assert_eq!(e.cause(), "plugin_spawn", "{e}");
        let text = e.to_string();
        assert!(
            text.starts_with("starting /nonexistent/gostats: "),
            "{text}"
        );
    }
}
