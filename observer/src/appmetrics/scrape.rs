//! The scraper: a tokio task of its own, fed the latest targets by the Mackerel sink each
//! interval. Once per Mackerel period it starts one task per target (an HTTP GET with a timeout
//! and a body cap); each result is named and handed on as soon as it is in, so a slow or hung
//! endpoint costs only its own values, never another target's or the interval's. A target whose
//! previous scrape is still under way is skipped for that period.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    future::Future,
    pin::Pin,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tokio::{sync::watch, task::JoinSet};

use super::{
    naming::Namer, prometheus, reach::ReachError, stats::AppStats, AppMetricsConfig, Samples,
    Source, Target,
};
use crate::{body, mackerel::client::GraphDef};

/// One target's values for one period, for the Mackerel worker.
#[derive(Debug, Clone, PartialEq)]
pub struct Scraped {
    /// The host's customIdentifier.
    pub host_key: String,
    /// Unix seconds of the period's start, as every value of the period.
    pub time: i64,
    pub values: Vec<(String, f64)>,
    /// Graph definitions of families not seen before.
    pub graph_defs: Vec<GraphDef>,
}

/// What the sink hands over each interval: the targets, and the declarations it refused.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TargetList {
    pub targets: Vec<Target>,
    /// (workload, container, why).
    pub refused: Vec<(String, String, ReachError)>,
}

/// Why a scrape failed.
#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("no answer within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    #[error("answered HTTP {0}")]
    Status(u16),
    #[error("reading the answer: {0}")]
    Body(#[from] body::BodyError),
    #[error("building the HTTP client: {0}")]
    Client(String),
    /// Another source's failure (a plugin's), with its `cause` label.
    #[error("{message}")]
    Other {
        cause: &'static str,
        message: String,
    },
}

impl ScrapeError {
    /// The `cause` label of `observer_app_scrape_errors_total`.
    pub fn cause(&self) -> &'static str {
        match self {
            Self::Connect(_) | Self::Client(_) => "connect",
            Self::Timeout(_) => "timeout",
            Self::Status(_) => "status",
            Self::Body(_) => "body",
            Self::Other { cause, .. } => cause,
        }
    }
}

/// A future of one target's samples.
pub type Collecting<'a> = Pin<Box<dyn Future<Output = Result<Samples, ScrapeError>> + Send + 'a>>;

/// Collects one target's samples once; bounded by itself (the scraper adds nothing but the
/// schedule). [`Http`] for [`Source::Prometheus`]; a plugin runner for [`Source::Plugin`].
pub trait Collect: Send + Sync + std::fmt::Debug + 'static {
    fn collect<'a>(&'a self, target: &'a Target) -> Collecting<'a>;

    /// Told each period which targets are listed, to forget what it keeps of the others.
    fn retain(&self, _targets: &[Target]) {}
}

/// The HTTP scrape of a Prometheus endpoint.
#[derive(Debug, Clone)]
pub struct Http {
    client: reqwest::Client,
    config: AppMetricsConfig,
}

impl Http {
    pub fn new(config: AppMetricsConfig) -> Result<Self, ScrapeError> {
        let client = reqwest::Client::builder()
            // The workload's own address only: no proxy, no redirect elsewhere.
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(config.timeout)
            .timeout(config.timeout)
            .build()
            .map_err(|e| ScrapeError::Client(e.to_string()))?;
        Ok(Self { client, config })
    }
}

impl Collect for Http {
    fn collect<'a>(&'a self, target: &'a Target) -> Collecting<'a> {
        Box::pin(fetch(&self.client, target, &self.config))
    }
}

/// Handle on the scraper task; dropping it stops the task.
#[derive(Debug)]
pub struct Scraper {
    targets: watch::Sender<Arc<TargetList>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Scraper {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Scraper {
    /// Starts the task on the current runtime; `out` gets each target's values. `plugins`
    /// collects the targets of [`Source::Plugin`] (None: they are skipped).
    pub fn start(
        config: AppMetricsConfig,
        stats: AppStats,
        plugins: Option<Arc<dyn Collect>>,
        out: impl Fn(Scraped) + Send + 'static,
    ) -> Result<Self, ScrapeError> {
        let http: Arc<dyn Collect> = Arc::new(Http::new(config.clone())?);
        let (targets, rx) = watch::channel(Arc::new(TargetList::default()));
        log::info!(
            "Application metrics: workloads' declared Prometheus endpoints scraped every {} (timeout {}, at most {} series each){}",
            humantime::format_duration(config.period),
            humantime::format_duration(config.timeout),
            config.max_series,
            match &plugins {
                Some(_) if !config.plugins.is_empty() => format!(
                    "; the plugins they name run as often: {}",
                    config.plugins.names().collect::<Vec<_>>().join(", ")
                ),
                _ => String::new(),
            }
        );
        let task = tokio::spawn(run(config, Collectors { http, plugins }, stats, rx, out));
        Ok(Self { targets, task })
    }

    /// The targets of the latest interval; the next period scrapes these.
    pub fn set_targets(&self, list: TargetList) {
        self.targets.send_replace(Arc::new(list));
    }
}

/// Unix seconds of the start of the period `now` falls in.
pub fn period_start(now: SystemTime, period: Duration) -> i64 {
    let p = i64::try_from(period.as_secs()).unwrap_or(i64::MAX);
    crate::mackerel::minutes::period_start(crate::mackerel::minutes::unix_seconds(now), p)
}

/// How long from `now` to the next period boundary.
fn until_next_period(now: SystemTime, period: Duration) -> Duration {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let p = period.as_millis().max(1000);
    let into = since.as_millis() % p;
    Duration::from_millis((p - into) as u64)
}

type Done = (Target, i64, Result<Samples, ScrapeError>);

/// Who collects which source.
struct Collectors {
    http: Arc<dyn Collect>,
    plugins: Option<Arc<dyn Collect>>,
}

impl Collectors {
    fn of(&self, target: &Target) -> Option<Arc<dyn Collect>> {
        match target.source {
            Source::Prometheus => Some(self.http.clone()),
            Source::Plugin(_) => self.plugins.clone(),
        }
    }
}

async fn run(
    config: AppMetricsConfig,
    collectors: Collectors,
    stats: AppStats,
    mut rx: watch::Receiver<Arc<TargetList>>,
    out: impl Fn(Scraped),
) {
    // Scrapes start just after each period boundary: the values are the period's.
    let first = tokio::time::Instant::now() + until_next_period(SystemTime::now(), config.period);
    let mut tick = tokio::time::interval_at(first, config.period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut running: JoinSet<Done> = JoinSet::new();
    // By task, so that a scrape that panicked frees its target too.
    let mut in_flight: HashMap<tokio::task::Id, Target> = HashMap::new();
    let mut namer = Namer::default();
    // (workload, cause) already logged while the workload lives: one line each.
    let mut logged: HashSet<(String, &'static str)> = HashSet::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let list = rx.borrow_and_update().clone();
                forget_gone(&list, &mut namer, &stats, &mut logged);
                if let Some(plugins) = &collectors.plugins {
                    plugins.retain(&list.targets);
                }
                let time = period_start(SystemTime::now(), config.period);
                for (workload, container, why) in &list.refused {
                    stats.error(workload, "reach");
                    if logged.insert((workload.clone(), "reach")) {
                        log::warn!("Application metrics of {workload} ({container}) not scraped: {why}");
                    }
                }
                for target in &list.targets {
                    if in_flight.values().any(|t| t == target) {
                        log::debug!("Application metrics: {} still being collected; skipped this period", target.describe());
                        continue;
                    }
                    let Some(collector) = collectors.of(target) else {
                        continue;
                    };
                    let t = target.clone();
                    let task = running.spawn(async move {
                        let result = collector.collect(&t).await;
                        (t, time, result)
                    });
                    in_flight.insert(task.id(), target.clone());
                }
            }
            Some(done) = running.join_next_with_id(), if !running.is_empty() => {
                let (target, time, result) = match done {
                    Ok((id, done)) => {
                        in_flight.remove(&id);
                        done
                    }
                    Err(e) => {
                        in_flight.remove(&e.id());
                        log::warn!("Application metrics: a scrape failed: {e}");
                        continue;
                    }
                };
                handle(&target, time, result, &config, &mut namer, &stats, &mut logged, &out);
            }
            changed = rx.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
    }
}

/// Forgets counters, counts and log marks of workloads no longer listed.
fn forget_gone(
    list: &TargetList,
    namer: &mut Namer,
    stats: &AppStats,
    logged: &mut HashSet<(String, &'static str)>,
) {
    namer.retain(&list.targets.iter().collect());
    let live: HashSet<&str> = (list.targets.iter().map(|t| t.workload.as_str()))
        .chain(list.refused.iter().map(|r| r.0.as_str()))
        .collect();
    stats.retain(&live);
    logged.retain(|(w, _)| live.contains(w.as_str()));
}

#[allow(clippy::too_many_arguments)]
fn handle(
    target: &Target,
    time: i64,
    result: Result<Samples, ScrapeError>,
    config: &AppMetricsConfig,
    namer: &mut Namer,
    stats: &AppStats,
    logged: &mut HashSet<(String, &'static str)>,
    out: &impl Fn(Scraped),
) {
    let samples = match result {
        Ok(s) => s,
        Err(e) => {
            count_error(target, e.cause(), &e.to_string(), stats, logged);
            return;
        }
    };
    for p in &samples.problems {
        count_error(target, p.cause, &p.message, stats, logged);
    }
    let named = namer.name(target, &samples.samples, time);
    let dropped = samples.dropped + named.too_long;
    stats.dropped(&target.workload, dropped);
    if dropped > 0 && logged.insert((target.workload.clone(), "series")) {
        let cap = match &target.source {
            Source::Prometheus => format!(
                "at most {} per endpoint, names of at most {} characters",
                config.max_series,
                super::naming::MAX_NAME_CHARS
            ),
            Source::Plugin(_) => "at most the plugin's max_series per run".to_owned(),
        };
        log::warn!(
            "Application metrics of {} ({}): {} {dropped} series left out ({cap})",
            target.workload,
            target.container,
            target.describe()
        );
    }
    let mut values = named.values;
    // A plugin's own times (use_plugin_timestamp) go apart, a batch per time.
    let mut own_times: BTreeMap<i64, Vec<(String, f64)>> = BTreeMap::new();
    for v in samples.named {
        match v.time {
            None => values.push((v.name, v.value)),
            Some(t) => own_times.entry(t).or_default().push((v.name, v.value)),
        }
    }
    let mut graph_defs = named.graph_defs;
    graph_defs.extend(samples.graph_defs);
    out(Scraped {
        host_key: target.host_key.clone(),
        time,
        values,
        graph_defs,
    });
    for (time, values) in own_times {
        out(Scraped {
            host_key: target.host_key.clone(),
            time,
            values,
            graph_defs: Vec::new(),
        });
    }
}

/// Counts a failure of `target` under `cause`, logged once per workload and cause.
fn count_error(
    target: &Target,
    cause: &'static str,
    message: &str,
    stats: &AppStats,
    logged: &mut HashSet<(String, &'static str)>,
) {
    stats.error(&target.workload, cause);
    if logged.insert((target.workload.clone(), cause)) {
        log::warn!(
            "Application metrics of {} ({}): {}: {message}; counted in observer_app_scrape_errors_total{{cause=\"{cause}\"}}, not logged again for this cause",
            target.workload,
            target.container,
            target.describe()
        );
    }
}

/// One GET of `target`, bounded by the timeout (body included) and the body cap.
pub async fn fetch(
    http: &reqwest::Client,
    target: &Target,
    config: &AppMetricsConfig,
) -> Result<Samples, ScrapeError> {
    let get = async {
        let response = http
            .get(target.url())
            .header(
                reqwest::header::ACCEPT,
                "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.4,*/*;q=0.1",
            )
            .send()
            .await
            .map_err(|e| {
                if e.is_timeout() {
                    ScrapeError::Timeout(config.timeout)
                } else {
                    ScrapeError::Connect(body::clip(&e))
                }
            })?;
        if !response.status().is_success() {
            return Err(ScrapeError::Status(response.status().as_u16()));
        }
        let bytes = body::read_capped(response, config.max_body).await?;
        Ok(prometheus::parse(&bytes, config.max_series))
    };
    match tokio::time::timeout(config.timeout, get).await {
        Ok(result) => result,
        Err(_) => Err(ScrapeError::Timeout(config.timeout)),
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
        sync::mpsc,
    };

    use super::*;

    /// An HTTP server answering every request with `body`, or never answering when `hang`.
    async fn server(body: &'static str, hang: bool) -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = s.read(&mut buf).await;
                    if hang {
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                    }
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = s.write_all(answer.as_bytes()).await;
                });
            }
        });
        port
    }

    fn target(workload: &str, port: u16) -> Target {
        Target {
            host_key: format!("key-{workload}"),
            workload: workload.into(),
            workload_id: format!("id-{workload}"),
            container: "app".into(),
            address: IpAddr::from([127, 0, 0, 1]),
            port,
            path: "/metrics".into(),
            prefix: "app".into(),
            source: Default::default(),
        }
    }

    fn config() -> AppMetricsConfig {
        AppMetricsConfig {
            timeout: Duration::from_millis(500),
            max_body: 1024,
            ..AppMetricsConfig::new(Duration::from_secs(1))
        }
    }

    #[tokio::test]
    async fn fetch_parses_and_bounds() {
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        let ok = server("# TYPE temp gauge\ntemp 21.5\n", false).await;
        let s = fetch(&http, &target("w", ok), &config()).await.unwrap();
        assert_eq!(s.samples.len(), 1);
        assert_eq!(s.samples[0].value, 21.5);

        let hung = server("", true).await;
        let e = fetch(&http, &target("w", hung), &config())
            .await
            .unwrap_err();
        assert_eq!(e.cause(), "timeout", "{e}");

        let (big, _) = body::tests::flood(1 << 20).await;
        let e = fetch(&http, &target("w", big.port()), &config())
            .await
            .unwrap_err();
        assert_eq!(e.cause(), "body", "{e}");

        // A port nothing listens on.
        let closed = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let e = fetch(&http, &target("w", closed), &config())
            .await
            .unwrap_err();
        assert_eq!(e.cause(), "connect", "{e}");
    }

    /// A hung endpoint's scrape does not hold back another's values.
    #[tokio::test]
    async fn one_hung_target_does_not_hold_back_the_others() {
        let ok = server("# TYPE temp gauge\ntemp 21.5\n", false).await;
        let hung = server("", true).await;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let stats = AppStats::default();
        let cfg = AppMetricsConfig {
            // Longer than the test waits: the good value must come before the hung one's end.
            timeout: Duration::from_secs(30),
            ..config()
        };
        let scraper = Scraper::start(cfg, stats, None, move |s| {
            let _ = tx.send(s);
        })
        .unwrap();
        scraper.set_targets(TargetList {
            targets: vec![target("hung", hung), target("ok", ok)],
            refused: vec![],
        });
        let got = rx.recv().await.unwrap();
        assert_eq!(got.host_key, "key-ok");
        assert_eq!(got.values, [("custom.app.temp.value".to_string(), 21.5)]);
        assert_eq!(got.graph_defs.len(), 1);
    }

    /// What a plugin runner returns: values it named itself (one at a time of its own), a
    /// graph definition, and a problem that did not cost the values.
    #[derive(Debug)]
    struct Named;

    impl Collect for Named {
        fn collect<'a>(&'a self, target: &'a Target) -> Collecting<'a> {
            let value = f64::from(target.port);
            Box::pin(async move {
                Ok(Samples {
                    named: vec![
                        crate::appmetrics::NamedValue {
                            name: "custom.gostats.port".into(),
                            value,
                            time: None,
                        },
                        crate::appmetrics::NamedValue {
                            name: "custom.gostats.own_time".into(),
                            value: 1.0,
                            time: Some(1_767_225_600),
                        },
                    ],
                    graph_defs: vec![GraphDef {
                        name: "custom.gostats".into(),
                        display_name: "gostats".into(),
                        unit: "integer".into(),
                        metrics: vec![],
                    }],
                    problems: vec![crate::appmetrics::Problem {
                        cause: "plugin_meta",
                        message: "no meta".into(),
                    }],
                    ..Samples::default()
                })
            })
        }
    }

    /// Plugin targets go to the plugin collector and keep the names it gives, with its graph
    /// definitions and its own times; its problems are counted. Without a collector they are
    /// skipped, and Prometheus targets still go to HTTP.
    #[tokio::test]
    async fn a_second_source_plugs_in() {
        let ok = server("temp 1\n", false).await;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let plugins: Arc<dyn Collect> = Arc::new(Named);
        let stats = AppStats::default();
        let scraper = Scraper::start(config(), stats.clone(), Some(plugins), move |s| {
            let _ = tx.send(s);
        })
        .unwrap();
        let mut plugin = target("plug", 4242);
        plugin.source = Source::Plugin("gostats".into());
        scraper.set_targets(TargetList {
            targets: vec![plugin.clone(), target("http", ok)],
            refused: vec![],
        });
        let mut got = Vec::new();
        for _ in 0..3 {
            got.push(rx.recv().await.unwrap());
        }
        got.sort_by(|a, b| (&a.host_key, a.time).cmp(&(&b.host_key, b.time)));
        assert_eq!(got[0].host_key, "key-http");
        assert_eq!(got[0].values, [("custom.app.temp.value".to_string(), 1.0)]);
        assert_eq!(got[1].host_key, "key-plug");
        assert_eq!(got[1].time, 1_767_225_600, "its own time, apart");
        assert_eq!(
            got[1].values,
            [("custom.gostats.own_time".to_string(), 1.0)]
        );
        assert!(got[1].graph_defs.is_empty());
        assert_ne!(got[2].time, 1_767_225_600, "the period's");
        assert_eq!(
            got[2].values,
            [("custom.gostats.port".to_string(), 4242.0)],
            "no prefix, no .value: as named"
        );
        assert_eq!(got[2].graph_defs.len(), 1);
        assert_eq!(got[2].graph_defs[0].name, "custom.gostats");
        let mut registry = prometheus_client::registry::Registry::with_prefix("observer");
        stats.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains(
                r#"observer_app_scrape_errors_total{workload="plug",cause="plugin_meta"} 1"#
            ),
            "{text}"
        );

        // No plugin collector: the plugin target is skipped, the endpoint still scraped.
        let (tx, mut rx) = mpsc::unbounded_channel();
        let scraper = Scraper::start(config(), AppStats::default(), None, move |s| {
            let _ = tx.send(s);
        })
        .unwrap();
        scraper.set_targets(TargetList {
            targets: vec![plugin, target("http", ok)],
            refused: vec![],
        });
        for _ in 0..2 {
            assert_eq!(rx.recv().await.unwrap().host_key, "key-http");
        }
    }

    #[test]
    fn periods() {
        let t = UNIX_EPOCH + Duration::from_millis(125_500);
        assert_eq!(period_start(t, Duration::from_secs(60)), 120);
        assert_eq!(
            until_next_period(t, Duration::from_secs(60)),
            Duration::from_millis(54_500)
        );
    }
}
