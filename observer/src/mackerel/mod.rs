//! Mackerel output: one Mackerel host per ECS task or Kubernetes pod, with the container
//! agent's metric names, so its dashboards and monitors keep working.
//!
//! [`sink::MackerelSink`] is the output: each interval [`report`] turns the snapshot's tasks and
//! pods into a [`model::IntervalReport`] and hands it to [`sink::MackerelReporter::report`],
//! which never blocks; [`select`] decides which workloads are hosts at all. A tokio task owns
//! the rest: [`hosts`] decides which host to find, create, update or retire, [`names`] turns
//! values into metric names, [`buffer`] keeps them until the API has taken them, and
//! [`client`] makes the calls.

pub mod buffer;
pub mod client;
pub mod hosts;
pub mod minutes;
pub mod model;
pub mod names;
pub mod orphans;
pub mod report;
pub mod select;
pub mod sink;
pub mod state;

use std::{path::PathBuf, time::Duration};

use crate::{
    appmetrics::{AppMetricsConfig, AppStats},
    defaults,
};

pub use client::{ApiError, ApiKey};
pub use model::{
    CloudMeta, ContainerMetrics, HostIdentity, HostMeta, HostReport, HostStatus, IntervalReport,
    Roles,
};
pub use select::{AllowedRoles, HostsMode, Selection};
pub use sink::{MackerelReporter, MackerelSink, ShutdownSummary};

/// Everything the reporter needs. [`MackerelConfig::new`] has the defaults; the fields can be
/// changed before [`MackerelReporter::start`].
#[derive(Debug, Clone)]
pub struct MackerelConfig {
    pub api_key: ApiKey,
    /// e.g. `https://api.mackerelio.com`.
    pub api_base: String,
    /// `MACKEREL_ROLES`: given to every host, with the roles of the task's own label.
    pub roles: Roles,
    /// A task missing from the reports for this long has its host retired.
    pub retire_after: Duration,
    /// Per request, connection included.
    pub request_timeout: Duration,
    /// Span of data kept while the API cannot take it; older values are dropped.
    pub max_age: Duration,
    /// Most values kept while the API cannot take them; the oldest are dropped.
    pub max_values: usize,
    /// One value per series per this period (`--mackerel-interval`).
    pub period: Duration,
    /// Where hosts, unsent values and the period being filled survive a restart.
    pub state_dir: Option<PathBuf>,
    /// This node and its cluster, recorded in each host's meta (`meta.cloud.metadata.observer`).
    pub node: Option<String>,
    pub cluster: Option<String>,
    /// Retire hosts of other nodes of the cluster that posted nothing for this long
    /// ([`orphans`]); None = off.
    pub retire_silent_after: Option<Duration>,
    /// Values per POST /api/v0/tsdb.
    pub batch_size: usize,
    /// First pause after the API was unavailable; it doubles up to `backoff_max`.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// Pause before asking again about a host whose request the API refused (4xx).
    pub refused_retry: Duration,
    /// Also post the `custom.observer.*` series (loopback bytes, packets) and their graphs.
    /// Each container adds 4 of them to the 6 the container agent's names take.
    pub custom_series: bool,
    /// Which tasks and pods become hosts, and what their labels may decide.
    pub selection: Selection,
    /// Set once on each host observer creates; a host found after a restart keeps its own.
    pub host_status_on_start: Option<HostStatus>,
    /// Scrape each host's workload's own metrics and post them on it; None = off.
    pub app_metrics: Option<AppMetricsConfig>,
    /// Their errors and drops, for observer's own metrics.
    pub app_stats: AppStats,
    /// Runs the mackerel-agent plugins workloads name (`Source::Plugin` targets); None: none.
    pub app_plugins: Option<std::sync::Arc<dyn crate::appmetrics::scrape::Collect>>,
}

/// Where the settings come from: flags or environment, as the caller read them.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// `MACKEREL_APIKEY`.
    pub api_key: Option<String>,
    /// `--mackerel-api-key-file`.
    pub api_key_file: Option<PathBuf>,
    /// `--mackerel-api-base` / `MACKEREL_APIBASE`.
    pub api_base: Option<String>,
    /// `MACKEREL_ROLES`.
    pub roles: Option<String>,
    /// `--retire-after`; default [`defaults::RETIRE_AFTER_INTERVALS`] intervals.
    pub retire_after: Option<Duration>,
    /// `--mackerel-interval`.
    pub period: Option<Duration>,
    /// `--mackerel-buffer`, in values.
    pub max_values: Option<usize>,
    /// `--state-dir`.
    pub state_dir: Option<PathBuf>,
    /// `--node-name` / `--cluster-name`.
    pub node: Option<String>,
    pub cluster: Option<String>,
    /// `--mackerel-retire-silent-after`.
    pub retire_silent_after: Option<Duration>,
}

/// Settings that cannot work. None of the messages quotes the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "give the Mackerel API key once: MACKEREL_APIKEY or --mackerel-api-key-file, not both"
    )]
    TwoKeys,
    #[error("reading the Mackerel API key file {path}: {source}")]
    KeyFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Key(#[from] client::KeyError),
    #[error("MACKEREL_ROLES: {0}")]
    Roles(#[from] model::RolesError),
    #[error(
        "--mackerel-retire-silent-after needs MACKEREL_ROLES: observers find their cluster's hosts by role (Mackerel lists hosts by service and role, not by meta), so every host they make must have one"
    )]
    SilentNeedsRoles,
    #[error(
        "--mackerel-retire-silent-after {} is too short: at least 10 Mackerel intervals ({}), so that a slow API or a restart is not taken for a node gone",
        humantime::format_duration(*.0),
        humantime::format_duration(*.1)
    )]
    SilentTooShort(Duration, Duration),
    #[error(
        "--retire-after x --interval is {}, longer than {}: retire hosts sooner",
        humantime::format_duration(*.0),
        humantime::format_duration(crate::config::MAX_RETIRE_AFTER)
    )]
    RetireAfter(Duration),
}

impl MackerelConfig {
    /// Defaults for reporting every `interval`.
    pub fn new(api_key: ApiKey, interval: Duration) -> Self {
        Self {
            api_key,
            api_base: defaults::MACKEREL_API_BASE.to_string(),
            roles: Roles::default(),
            retire_after: interval * defaults::RETIRE_AFTER_INTERVALS,
            request_timeout: Duration::from_secs(30),
            max_age: buffer::DEFAULT_MAX_AGE,
            max_values: buffer::DEFAULT_MAX_VALUES,
            period: defaults::MACKEREL_INTERVAL,
            state_dir: None,
            node: None,
            cluster: None,
            retire_silent_after: None,
            batch_size: buffer::DEFAULT_BATCH_SIZE,
            backoff_initial: defaults::BACKOFF_MIN,
            backoff_max: defaults::BACKOFF_MAX,
            refused_retry: hosts::DEFAULT_REFUSED_RETRY,
            custom_series: true,
            selection: Selection::default(),
            host_status_on_start: None,
            app_metrics: None,
            app_stats: AppStats::default(),
            app_plugins: None,
        }
    }

    /// The configuration, or None (said once, at info level) when no key is given: the
    /// Mackerel output is then off.
    pub fn from_sources(sources: Sources, interval: Duration) -> Result<Option<Self>, ConfigError> {
        let key = match (
            sources.api_key.filter(|k| !k.trim().is_empty()),
            sources.api_key_file,
        ) {
            (Some(_), Some(_)) => return Err(ConfigError::TwoKeys),
            (Some(key), None) => ApiKey::new(&key)?,
            (None, Some(path)) => {
                let text = std::fs::read_to_string(&path)
                    .map_err(|source| ConfigError::KeyFile { path, source })?;
                ApiKey::new(&text)?
            }
            (None, None) => {
                log::info!("Mackerel output off: no MACKEREL_APIKEY or --mackerel-api-key-file");
                return Ok(None);
            }
        };
        let mut config = Self::new(key, interval);
        if let Some(base) = sources.api_base.filter(|b| !b.trim().is_empty()) {
            config.api_base = base.trim().to_string();
        }
        if let Some(roles) = sources.roles {
            config.roles = Roles::parse(&roles)?;
        }
        if let Some(after) = sources.retire_after {
            // The host table keeps a gone task for this long: a bound on what churn leaves.
            if after > crate::config::MAX_RETIRE_AFTER {
                return Err(ConfigError::RetireAfter(after));
            }
            config.retire_after = after;
        }
        if let Some(period) = sources.period {
            config.period = period;
        }
        if let Some(n) = sources.max_values {
            config.max_values = n;
        }
        config.state_dir = sources.state_dir;
        config.node = sources.node.filter(|n| !n.trim().is_empty());
        config.cluster = sources.cluster.filter(|c| !c.trim().is_empty());
        if let Some(silent) = sources.retire_silent_after {
            if config.roles.is_empty() {
                return Err(ConfigError::SilentNeedsRoles);
            }
            let least = config.period * 10;
            if silent < least {
                return Err(ConfigError::SilentTooShort(silent, least));
            }
            config.retire_silent_after = Some(silent);
        }
        Ok(Some(config))
    }

    /// [`Self::from_sources`] with `MACKEREL_APIKEY`, `MACKEREL_APIBASE` and `MACKEREL_ROLES`
    /// from the environment.
    pub fn from_env(interval: Duration) -> Result<Option<Self>, ConfigError> {
        let var = |name| std::env::var(name).ok();
        Self::from_sources(
            Sources {
                api_key: var("MACKEREL_APIKEY"),
                api_base: var("MACKEREL_APIBASE"),
                roles: var("MACKEREL_ROLES"),
                ..Sources::default()
            },
            interval,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const I: Duration = Duration::from_secs(60);

    #[test]
    fn no_key_means_off() {
        assert!(MackerelConfig::from_sources(Sources::default(), I)
            .unwrap()
            .is_none());
        let blank = Sources {
            api_key: Some("  ".into()),
            ..Sources::default()
        };
        assert!(MackerelConfig::from_sources(blank, I).unwrap().is_none());
    }

    #[test]
    fn defaults_and_overrides() {
        let sources = Sources {
            api_key: Some("k3y".into()),
            roles: Some("svc:app".into()),
            ..Sources::default()
        };
        let c = MackerelConfig::from_sources(sources, I).unwrap().unwrap();
        assert_eq!(c.api_base, defaults::MACKEREL_API_BASE);
        assert_eq!(c.retire_after, 2 * I);
        assert_eq!(c.roles.as_slice(), ["svc:app"]);
        assert_eq!(c.max_age, Duration::from_secs(6 * 3600));
        assert!(!format!("{c:?}").contains("k3y"));

        let sources = Sources {
            api_key: Some("k3y".into()),
            api_base: Some("http://127.0.0.1:9".into()),
            retire_after: Some(Duration::from_secs(5)),
            ..Sources::default()
        };
        let c = MackerelConfig::from_sources(sources, I).unwrap().unwrap();
        assert_eq!(c.api_base, "http://127.0.0.1:9");
        assert_eq!(c.retire_after, Duration::from_secs(5));
    }

    #[test]
    fn retirement_is_at_most_a_week() {
        let week = crate::config::MAX_RETIRE_AFTER;
        let with = |after| Sources {
            api_key: Some("k".into()),
            retire_after: Some(after),
            ..Sources::default()
        };
        let c = MackerelConfig::from_sources(with(week), I)
            .unwrap()
            .unwrap();
        assert_eq!(c.retire_after, week);
        let err = MackerelConfig::from_sources(with(week + Duration::from_secs(1)), I)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "--retire-after x --interval is 7days 1s, longer than 7days: retire hosts sooner"
        );
    }

    #[test]
    fn key_from_a_file() {
        let dir = std::env::temp_dir().join(format!("observer-mackerel-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("key");
        std::fs::write(&path, "s3cret\n").unwrap();
        let sources = Sources {
            api_key_file: Some(path.clone()),
            ..Sources::default()
        };
        let c = MackerelConfig::from_sources(sources, I).unwrap().unwrap();
        assert_eq!(c.api_key, ApiKey::new("s3cret").unwrap());
        let both = Sources {
            api_key: Some("x".into()),
            api_key_file: Some(path),
            ..Sources::default()
        };
        assert!(matches!(
            MackerelConfig::from_sources(both, I),
            Err(ConfigError::TwoKeys)
        ));
        let missing = Sources {
            api_key_file: Some(dir.join("missing")),
            ..Sources::default()
        };
        let err = MackerelConfig::from_sources(missing, I)
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn bad_roles_are_an_error_naming_them() {
        let sources = Sources {
            api_key: Some("k".into()),
            roles: Some("svc:app,oops".into()),
            ..Sources::default()
        };
        let err = MackerelConfig::from_sources(sources, I)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("MACKEREL_ROLES: "), "{err}");
        assert!(err.contains("\"oops\""), "{err}");
    }
}
