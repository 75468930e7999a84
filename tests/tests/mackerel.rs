//! The Mackerel reporter against a fake Mackerel API (tests/src/fake_mackerel.rs). No root
//! needed. Intervals are 100 ms; each report's timestamp is a simulated minute, so "a
//! 10-minute outage" is ten intervals of failure.

use std::{
    collections::BTreeMap,
    sync::{Mutex, Once},
    time::{Duration, Instant, SystemTime},
};

use observer::mackerel::{
    names, ApiKey, CloudMeta, ContainerMetrics, HostIdentity, HostMeta, HostReport, IntervalReport,
    MackerelConfig, MackerelReporter, Roles,
};
use serde_json::json;
use testbed::fake_mackerel::{FakeMackerel, Fault, Scope};

const KEY: &str = "test-api-key-7f3a9c51e2";
const WRONG_KEY: &str = "wrong-api-key-0b1d2e3f4a";
const INTERVAL: Duration = Duration::from_millis(100);
/// Time of step 0: 2026-01-01T00:00:00Z. Step n is n simulated minutes later.
const T0: u64 = 1_767_225_600;

// ---- captured logs ----

static LINES: Mutex<Vec<String>> = Mutex::new(Vec::new());

struct Capture;

impl log::Log for Capture {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::Level::Debug
    }

    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) {
            let line = format!("{} {}: {}", r.level(), r.target(), r.args());
            if std::env::var_os("MACKEREL_TEST_LOG").is_some() {
                eprintln!("{line}");
            }
            LINES.lock().unwrap().push(line);
        }
    }

    fn flush(&self) {}
}

fn capture_logs() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        log::set_logger(&Capture).expect("one logger");
        log::set_max_level(log::LevelFilter::Debug);
    });
}

fn logs() -> Vec<String> {
    LINES.lock().unwrap().clone()
}

fn logged(needle: &str) -> bool {
    logs().iter().any(|l| l.contains(needle))
}

/// Neither key appears in anything logged so far, by this test or another.
fn assert_keys_not_logged() {
    for line in logs() {
        assert!(
            !line.contains(KEY) && !line.contains(WRONG_KEY),
            "a key was logged: {line}"
        );
    }
}

// ---- reports ----

fn arn(task: usize) -> String {
    format!("arn:aws:ecs:ap-northeast-1:123456789012:task/test/{task:032x}")
}

fn container(name: &str, task: usize, step: usize, k: usize) -> ContainerMetrics {
    let v = (task * 10_000 + step * 10 + k) as f64;
    ContainerMetrics {
        name: name.to_string(),
        cpu_percent: Some(v / 100.0),
        cpu_limit_percent: Some(25.0),
        memory_bytes: Some(1_000_000 + v as u64),
        memory_limit_bytes: Some(268_435_456),
        rx_bytes_per_sec: v + 0.5,
        tx_bytes_per_sec: v + 0.25,
        lo_rx_bytes_per_sec: v + 1.0,
        lo_tx_bytes_per_sec: v + 2.0,
        rx_packets_per_sec: v + 3.0,
        tx_packets_per_sec: v + 4.0,
    }
}

fn task(task: usize, step: usize) -> HostReport {
    HostReport {
        identity: HostIdentity::ecs(&arn(task)).unwrap(),
        meta: HostMeta::observer(Some(CloudMeta::ecs(
            json!({"task_arn": arn(task), "task_family": "web"}),
        ))),
        roles_label: None,
        display_name: None,
        memo: None,
        app: Default::default(),
        containers: vec![
            container("app", task, step, 0),
            container("~internal~ecs~pause", task, step, 1),
        ],
    }
}

fn time(step: usize) -> i64 {
    (T0 + step as u64 * 60) as i64
}

/// The simulated minute `step`: it ends a minute after [`time`], so its values are posted at
/// `time(step)`, the minute's start, once the next minute's report closes it.
fn report(step: usize, tasks: &[usize]) -> IntervalReport {
    IntervalReport {
        time: SystemTime::UNIX_EPOCH + Duration::from_secs(time(step) as u64 + 60),
        interval: Duration::from_secs(60),
        complete: true,
        hosts: tasks.iter().map(|&t| task(t, step)).collect(),
    }
}

/// Reports `steps` one interval apart.
async fn drive(reporter: &MackerelReporter, steps: std::ops::Range<usize>, tasks: &[usize]) {
    for step in steps {
        reporter.report(report(step, tasks));
        tokio::time::sleep(INTERVAL).await;
    }
}

fn config(server: &FakeMackerel) -> MackerelConfig {
    let mut c = MackerelConfig::new(ApiKey::new(KEY).unwrap(), INTERVAL);
    c.api_base = server.url();
    c.request_timeout = Duration::from_millis(500);
    c.backoff_initial = Duration::from_millis(50);
    c.backoff_max = Duration::from_millis(400);
    c.refused_retry = Duration::from_secs(10);
    c.retire_after = Duration::from_millis(300);
    c
}

type Key = (String, String, i64);

/// Every value the reports of `tasks` x `steps` hold, keyed by (customIdentifier, name, time).
fn expected(tasks: &[usize], steps: std::ops::Range<usize>) -> BTreeMap<Key, f64> {
    let mut out = BTreeMap::new();
    for step in steps {
        for &t in tasks {
            for c in task(t, step).containers {
                for (name, value) in names::container_values(&c, true) {
                    out.insert((arn(t), name, time(step)), value);
                }
            }
        }
    }
    out
}

/// What the fake received, keyed like [`expected`], every value of every arrival.
fn received(server: &FakeMackerel) -> BTreeMap<Key, Vec<f64>> {
    let ids: BTreeMap<String, String> = server
        .hosts()
        .into_iter()
        .map(|h| (h.id, h.custom_identifier.unwrap_or_default()))
        .collect();
    let mut out: BTreeMap<Key, Vec<f64>> = BTreeMap::new();
    for p in server.points() {
        out.entry((ids[&p.host_id].clone(), p.name, p.time))
            .or_default()
            .push(p.value);
    }
    out
}

fn all_arrived(server: &FakeMackerel, want: &BTreeMap<Key, f64>) -> bool {
    let got = received(server);
    want.keys().all(|k| got.contains_key(k))
}

/// Each expected value arrived exactly once with its value (to float rounding: a minute's
/// value is an aggregate); `only` = nothing else arrived.
fn assert_exactly_once(server: &FakeMackerel, want: &BTreeMap<Key, f64>, only: bool) {
    let got = received(server);
    for (k, v) in want {
        let arrived = got.get(k).map(Vec::as_slice).unwrap_or_default();
        assert!(
            matches!(arrived, [one] if (one - v).abs() <= 1e-9 * v.abs().max(1.0)),
            "{k:?}: expected {v} once, got {arrived:?}"
        );
    }
    if only {
        let extra: Vec<_> = got.keys().filter(|k| !want.contains_key(*k)).collect();
        assert!(extra.is_empty(), "unexpected values: {extra:?}");
    }
}

/// Per host and metric, values arrived in time order.
fn assert_oldest_first(server: &FakeMackerel) {
    let mut last: BTreeMap<(String, String), i64> = BTreeMap::new();
    for p in server.points() {
        let prev = last.insert((p.host_id.clone(), p.name.clone()), p.time);
        assert!(
            prev.is_none_or(|t| t < p.time),
            "{p:?} arrived after {prev:?}"
        );
    }
}

async fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let end = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn host_of(server: &FakeMackerel, task: usize) -> Option<testbed::fake_mackerel::FakeHost> {
    server
        .hosts()
        .into_iter()
        .find(|h| h.custom_identifier.as_deref() == Some(&arn(task)))
}

// ---- the fake itself ----

#[tokio::test]
async fn the_fake_is_strict() {
    let server = FakeMackerel::start(KEY).await;
    let (status, body) = server.raw("GET", "/api/v0/hosts", None, None).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(
        server
            .raw("GET", "/api/v0/hosts", Some(WRONG_KEY), None)
            .await
            .0,
        403
    );
    let create = |name: &str, ci: &str| {
        format!(r#"{{"name":"{name}","meta":{{}},"customIdentifier":"{ci}"}}"#)
    };
    let (status, body) = server
        .raw(
            "POST",
            "/api/v0/hosts",
            Some(KEY),
            Some(&create("h1", "ci-1")),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let id = serde_json::from_str::<serde_json::Value>(&body).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let bad = [
        ("/api/v0/hosts", r#"{"meta":{}}"#.to_string()),
        (
            "/api/v0/hosts",
            r#"{"name":"x","roleFullnames":["nocolon"]}"#.to_string(),
        ),
        ("/api/v0/hosts", create("dup", "ci-1")),
        (
            "/api/v0/tsdb",
            r#"[{"hostId":"nope","name":"a.b","time":1,"value":1}]"#.to_string(),
        ),
        (
            "/api/v0/tsdb",
            format!(r#"[{{"hostId":"{id}","name":"a b","time":1,"value":1}}]"#),
        ),
        (
            "/api/v0/tsdb",
            format!(r#"[{{"hostId":"{id}","name":"a.b","time":1.5,"value":1}}]"#),
        ),
        (
            "/api/v0/tsdb",
            format!(r#"[{{"hostId":"{id}","name":"a.b","time":1,"value":"1"}}]"#),
        ),
        (
            "/api/v0/tsdb",
            format!(r#"[{{"hostId":"{id}","name":"a.b","time":1,"value":null}}]"#),
        ),
        (
            "/api/v0/graph-defs/create",
            r#"[{"name":"x.y","metrics":[]}]"#.to_string(),
        ),
    ];
    for (path, body) in bad {
        let (status, answer) = server.raw("POST", path, Some(KEY), Some(&body)).await;
        assert_eq!(status, 400, "{path} {body}: {answer}");
    }
    let ok = format!(r#"[{{"hostId":"{id}","name":"a.b","time":1,"value":2.5}}]"#);
    assert_eq!(
        server
            .raw("POST", "/api/v0/tsdb", Some(KEY), Some(&ok))
            .await
            .0,
        200
    );
    assert_eq!(server.points().len(), 1);
    let (_, listed) = server
        .raw(
            "GET",
            "/api/v0/hosts?customIdentifier=ci-1",
            Some(KEY),
            None,
        )
        .await;
    assert!(listed.contains(&id), "{listed}");
    let (_, listed) = server
        .raw(
            "GET",
            "/api/v0/hosts?customIdentifier=ci-2",
            Some(KEY),
            None,
        )
        .await;
    assert!(!listed.contains(&id), "{listed}");
    let retire = format!("/api/v0/hosts/{id}/retire");
    assert_eq!(
        server.raw("POST", &retire, Some(KEY), Some("{}")).await.0,
        200
    );
    assert_eq!(
        server.raw("POST", &retire, Some(KEY), Some("{}")).await.0,
        404
    );
    assert_eq!(
        server
            .raw("POST", "/api/v0/tsdb", Some(KEY), Some(&ok))
            .await
            .0,
        400
    );
}

// ---- the reporter ----

#[tokio::test]
async fn first_start_creates_one_host_per_task() {
    capture_logs();
    let server = FakeMackerel::start(KEY).await;
    let mut cfg = config(&server);
    cfg.roles = Roles::parse("base:node").unwrap();
    let reporter = MackerelReporter::start(cfg).unwrap();
    let tasks = [1, 2, 3];
    for step in 0..3 {
        let mut r = report(step, &tasks);
        r.hosts[0].roles_label = Some("web:app,not a role".into());
        reporter.report(r);
        tokio::time::sleep(INTERVAL).await;
    }
    let want = expected(&tasks, 0..3);
    wait_for("every value", Duration::from_secs(5), || {
        all_arrived(&server, &want)
    })
    .await;

    let hosts = server.hosts();
    assert_eq!(hosts.len(), 3, "{hosts:#?}");
    for &t in &tasks {
        let h = host_of(&server, t).expect("a host per task");
        assert_eq!(h.name, format!("{t:032x}"), "name = task id");
        assert_eq!(h.status, "working");
        assert!(!h.retired);
        assert_eq!(
            h.meta["agent-name"],
            format!("observer/{}", env!("CARGO_PKG_VERSION"))
        );
        assert_eq!(h.meta["cloud"]["provider"], "ecs");
        assert_eq!(h.meta["cloud"]["metadata"]["task_arn"], arn(t));
    }
    assert_eq!(
        host_of(&server, 1).unwrap().role_fullnames,
        ["base:node", "web:app"]
    );
    assert_eq!(host_of(&server, 2).unwrap().role_fullnames, ["base:node"]);
    assert!(logged("\"not a role\" (no ':' between service and role)"));
    assert_eq!(server.count("POST", "/api/v0/hosts"), 3);

    assert_exactly_once(&server, &want, true);
    let names: Vec<String> = server
        .points()
        .into_iter()
        .filter(|p| p.host_id == host_of(&server, 1).unwrap().id && p.time == time(0))
        .map(|p| p.name)
        .collect();
    for name in [
        "container.cpu.app.usage",
        "container.cpu.app.limit",
        "container.memory.app.usage",
        "container.memory.app.limit",
        "interface.app.rxBytes.delta",
        "interface.app.txBytes.delta",
        "interface._internal_ecs_pause.txBytes.delta",
        "custom.observer.loopback.app.rxBytes",
        "custom.observer.packets._internal_ecs_pause.tx",
    ] {
        assert!(
            names.iter().any(|n| n == name),
            "{name} missing from {names:?}"
        );
    }
    wait_for("graph definitions", Duration::from_secs(2), || {
        !server.graph_defs().is_empty()
    })
    .await;
    assert_eq!(server.count("POST", "/api/v0/graph-defs/create"), 1);
    assert!(server
        .requests()
        .iter()
        .all(|r| r.user_agent == format!("observer/{}", env!("CARGO_PKG_VERSION"))));

    let summary = reporter.shutdown(Duration::from_secs(2)).await.unwrap();
    assert_eq!(summary.unsent, 0);
    assert!(server.retirements().is_empty());
    assert_keys_not_logged();
}

#[tokio::test]
async fn a_restart_reuses_the_hosts() {
    capture_logs();
    let server = FakeMackerel::start(KEY).await;
    let first = MackerelReporter::start(config(&server)).unwrap();
    drive(&first, 0..2, &[1, 2]).await;
    let want = expected(&[1, 2], 0..2);
    wait_for("first run's values", Duration::from_secs(5), || {
        all_arrived(&server, &want)
    })
    .await;
    let ids: Vec<String> = server.hosts().into_iter().map(|h| h.id).collect();
    first.shutdown(Duration::from_secs(2)).await;

    let second = MackerelReporter::start(config(&server)).unwrap();
    drive(&second, 2..4, &[1, 2]).await;
    let want = expected(&[1, 2], 0..4);
    wait_for("second run's values", Duration::from_secs(5), || {
        all_arrived(&server, &want)
    })
    .await;
    second.shutdown(Duration::from_secs(2)).await;

    let hosts = server.hosts();
    assert_eq!(
        hosts.iter().map(|h| h.id.clone()).collect::<Vec<_>>(),
        ids,
        "no new host"
    );
    assert_eq!(server.count("POST", "/api/v0/hosts"), 2);
    // The second run found each host by customIdentifier and refreshed it.
    assert!(hosts.iter().all(|h| h.updates >= 1), "{hosts:#?}");
    let finds = server
        .requests()
        .into_iter()
        .filter(|r| r.method == "GET" && r.query.contains("customIdentifier="))
        .count();
    assert_eq!(finds, 4);
    assert_exactly_once(&server, &want, true);
    assert!(server.retirements().is_empty());
    assert_keys_not_logged();
}

#[tokio::test]
async fn a_stopped_tasks_host_is_retired_after_the_grace_period_and_not_before() {
    capture_logs();
    let server = FakeMackerel::start(KEY).await;
    let reporter = MackerelReporter::start(config(&server)).unwrap();
    drive(&reporter, 0..2, &[1, 2]).await;
    wait_for("both hosts", Duration::from_secs(5), || {
        host_of(&server, 1).is_some() && host_of(&server, 2).is_some()
    })
    .await;
    let gone = host_of(&server, 2).unwrap().id;
    // The last report with task 2.
    let last_seen = Instant::now();
    drive(&reporter, 2..3, &[1, 2]).await;
    drive(&reporter, 3..12, &[1]).await;
    wait_for("the retirement", Duration::from_secs(3), || {
        !server.retirements().is_empty()
    })
    .await;

    let retirements = server.retirements();
    assert_eq!(retirements.len(), 1, "{retirements:?}");
    assert_eq!(retirements[0].host_id, gone);
    let after = retirements[0].at - last_seen;
    assert!(
        after >= Duration::from_millis(300),
        "retired {after:?} after the last report"
    );
    assert!(
        host_of(&server, 1).is_some_and(|h| !h.retired),
        "the live task keeps its host"
    );
    // Every value of task 2 was delivered before its host was retired.
    assert_exactly_once(&server, &expected(&[2], 0..3), false);
    assert!(server
        .points()
        .iter()
        .filter(|p| p.host_id == gone)
        .all(|p| p.at <= retirements[0].at));
    reporter.shutdown(Duration::from_secs(2)).await;
    assert_eq!(server.retirements().len(), 1);
    assert_keys_not_logged();
}

#[tokio::test]
async fn a_ten_minute_outage_loses_no_value() {
    capture_logs();
    let server = FakeMackerel::start(KEY).await;
    let reporter = MackerelReporter::start(config(&server)).unwrap();
    drive(&reporter, 0..3, &[1, 2]).await;
    wait_for("values before the outage", Duration::from_secs(5), || {
        all_arrived(&server, &expected(&[1, 2], 0..3))
    })
    .await;

    // Ten simulated minutes: five unreachable, five answering 503. Task 3 starts meanwhile.
    let outage_start = Instant::now();
    server.fail(Fault::Unreachable, Scope::all());
    drive(&reporter, 3..8, &[1, 2]).await;
    server.heal();
    server.fail(Fault::Unavailable, Scope::all());
    drive(&reporter, 8..13, &[1, 2, 3]).await;
    // What the outage held back is visible as queue depth (observer's own metrics export it).
    let queued = reporter.queue_depth();
    assert!(queued > 0, "values are queued during the outage");
    server.heal();
    let outage_end = Instant::now();
    drive(&reporter, 13..16, &[1, 2, 3]).await;

    let mut want = expected(&[1, 2], 0..16);
    want.extend(expected(&[3], 8..16));
    wait_for(
        "every value after the outage",
        Duration::from_secs(5),
        || all_arrived(&server, &want),
    )
    .await;
    assert_exactly_once(&server, &want, true);
    assert_oldest_first(&server);
    assert_eq!(server.hosts().len(), 3);
    wait_for("an empty queue", Duration::from_secs(5), || {
        reporter.queue_depth() == 0
    })
    .await;
    // Backoff, not a request per value or per interval.
    let tries = server
        .requests()
        .into_iter()
        .filter(|r| r.at >= outage_start && r.at < outage_end)
        .count();
    assert!(tries <= 12, "{tries} requests during the outage");
    assert!(logged("Mackerel API unavailable"));
    assert!(logged("API available again"));
    let summary = reporter.shutdown(Duration::from_secs(2)).await.unwrap();
    assert_eq!(summary.unsent, 0);
    assert_keys_not_logged();
}

#[tokio::test]
async fn retry_after_is_honoured() {
    capture_logs();
    let server = FakeMackerel::start(KEY).await;
    let reporter = MackerelReporter::start(config(&server)).unwrap();
    drive(&reporter, 0..1, &[1]).await;
    wait_for("the first values", Duration::from_secs(5), || {
        all_arrived(&server, &expected(&[1], 0..1))
    })
    .await;
    server.fail(
        Fault::TooManyRequests {
            retry_after: "1".into(),
        },
        Scope::path("POST", "/api/v0/tsdb").times(1),
    );
    drive(&reporter, 1..5, &[1]).await;
    let want = expected(&[1], 0..5);
    wait_for("every value", Duration::from_secs(5), || {
        all_arrived(&server, &want)
    })
    .await;

    let requests = server.requests();
    let refused = requests
        .iter()
        .find(|r| r.status == 429)
        .expect("a 429 answer")
        .at;
    let next = requests
        .iter()
        .filter(|r| r.at > refused)
        .map(|r| r.at)
        .min()
        .expect("a request after the 429");
    assert!(
        next - refused >= Duration::from_secs(1),
        "asked again {:?} after Retry-After: 1",
        next - refused
    );
    assert_exactly_once(&server, &want, true);
    assert_oldest_first(&server);
    reporter.shutdown(Duration::from_secs(2)).await;
    assert_keys_not_logged();
}

#[tokio::test]
async fn a_400_is_reported_with_its_body_and_not_retried() {
    capture_logs();
    let server = FakeMackerel::start(KEY).await;
    let reporter = MackerelReporter::start(config(&server)).unwrap();
    drive(&reporter, 0..1, &[1, 2]).await;
    wait_for("the first values", Duration::from_secs(5), || {
        all_arrived(&server, &expected(&[1, 2], 0..1))
    })
    .await;
    let marker = "metric value rejected: test-400-marker";
    server.fail(
        Fault::BadRequest {
            body: marker.into(),
        },
        Scope::path("POST", "/api/v0/tsdb"),
    );
    drive(&reporter, 1..4, &[1, 2]).await;
    wait_for("the logged refusal", Duration::from_secs(3), || {
        logged(marker)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let tries = server.count("POST", "/api/v0/tsdb");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        server.count("POST", "/api/v0/tsdb"),
        tries,
        "refused values were sent again"
    );
    // The first values, then one post per interval and one per host when a mixed batch is
    // refused: 3 x (1 + 2) at most.
    assert!(tries <= 2 + 3 * 3, "{tries} posts");
    let line = logs().into_iter().find(|l| l.contains(marker)).unwrap();
    assert!(
        line.contains("HTTP 400") && line.contains("not retried"),
        "{line}"
    );

    server.heal();
    drive(&reporter, 4..5, &[1, 2]).await;
    let mut want = expected(&[1, 2], 0..1);
    want.extend(expected(&[1, 2], 4..5));
    wait_for("values after the fix", Duration::from_secs(5), || {
        all_arrived(&server, &want)
    })
    .await;
    assert_exactly_once(&server, &want, true);
    reporter.shutdown(Duration::from_secs(2)).await;
    assert_keys_not_logged();
}

#[tokio::test]
async fn a_refused_host_does_not_hold_up_the_other_tasks() {
    capture_logs();
    let server = FakeMackerel::start(KEY).await;
    let marker = "test-refused-host-marker";
    server.fail(
        Fault::BadRequest {
            body: marker.into(),
        },
        Scope::path("POST", "/api/v0/hosts").body_contains(&arn(2)),
    );
    let reporter = MackerelReporter::start(config(&server)).unwrap();
    drive(&reporter, 0..5, &[1, 2, 3]).await;
    let want = expected(&[1, 3], 0..5);
    wait_for("the other tasks' values", Duration::from_secs(5), || {
        all_arrived(&server, &want)
    })
    .await;
    assert_exactly_once(&server, &want, true);
    assert!(host_of(&server, 2).is_none());
    assert!(logged(marker));
    // Asked once, not every interval: the next try waits for refused_retry (10 s).
    let refusals = server.requests().iter().filter(|r| r.status == 400).count();
    assert_eq!(refusals, 1);
    let summary = reporter.shutdown(Duration::from_millis(500)).await.unwrap();
    assert_eq!(summary.unregistered, 1);
    assert_eq!(summary.unsent, expected(&[2], 0..5).len());
    assert_keys_not_logged();
}

#[tokio::test]
async fn the_api_key_never_reaches_a_log_line() {
    capture_logs();
    // A server that echoes the key in its error body.
    let server = FakeMackerel::start(KEY).await;
    server.fail(
        Fault::BadRequest {
            body: format!("bad request from key {KEY}"),
        },
        Scope::path("POST", "/api/v0/tsdb").times(1),
    );
    let reporter = MackerelReporter::start(config(&server)).unwrap();
    drive(&reporter, 0..2, &[1]).await;
    wait_for("the echoed body", Duration::from_secs(5), || {
        logged("bad request from key <redacted>")
    })
    .await;
    reporter.shutdown(Duration::from_secs(1)).await;

    // A wrong key: 403 on every call, logged without the key.
    let mut cfg = config(&server);
    cfg.api_key = ApiKey::new(WRONG_KEY).unwrap();
    assert!(!format!("{cfg:?}").contains(WRONG_KEY));
    let reporter = MackerelReporter::start(cfg).unwrap();
    drive(&reporter, 0..2, &[5]).await;
    wait_for("the 403", Duration::from_secs(5), || {
        logged("HTTP 403") && logged("Authentication failed")
    })
    .await;
    reporter.shutdown(Duration::from_millis(300)).await;
    assert_keys_not_logged();
}

#[tokio::test]
async fn graceful_shutdown_flushes_in_time_and_retires_nothing() {
    capture_logs();
    let server = FakeMackerel::start(KEY).await;
    let reporter = MackerelReporter::start(config(&server)).unwrap();
    drive(&reporter, 0..1, &[1, 2]).await;
    wait_for("the first values", Duration::from_secs(5), || {
        all_arrived(&server, &expected(&[1, 2], 0..1))
    })
    .await;
    server.fail(Fault::Slow(Duration::from_millis(150)), Scope::all());
    // The last intervals arrive right before SIGTERM.
    for step in 1..4 {
        reporter.report(report(step, &[1, 2]));
    }
    let start = Instant::now();
    let summary = reporter.shutdown(Duration::from_secs(3)).await.unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(summary.unsent, 0, "{summary:?}");
    assert_exactly_once(&server, &expected(&[1, 2], 0..4), true);
    assert!(server.retirements().is_empty());
    assert!(server
        .requests()
        .iter()
        .all(|r| !r.path.ends_with("/retire")));
    assert_keys_not_logged();
}

#[tokio::test]
async fn shutdown_gives_up_at_its_bound_when_the_api_is_down() {
    capture_logs();
    let server = FakeMackerel::start(KEY).await;
    let reporter = MackerelReporter::start(config(&server)).unwrap();
    drive(&reporter, 0..1, &[1]).await;
    wait_for("the host", Duration::from_secs(5), || {
        host_of(&server, 1).is_some()
    })
    .await;
    server.fail(Fault::Unreachable, Scope::all());
    drive(&reporter, 1..3, &[1]).await;
    let start = Instant::now();
    let summary = reporter.shutdown(Duration::from_millis(500)).await.unwrap();
    let took = start.elapsed();
    assert!(took < Duration::from_millis(1500), "{took:?}");
    assert!(summary.unsent > 0, "{summary:?}");
    assert!(logged("values not delivered"));
    assert!(server.retirements().is_empty());
    assert_keys_not_logged();
}

#[tokio::test]
async fn shutdown_cuts_short_a_call_under_way() {
    capture_logs();
    let server = FakeMackerel::start(KEY).await;
    let mut cfg = config(&server);
    cfg.request_timeout = Duration::from_secs(30);
    let reporter = MackerelReporter::start(cfg).unwrap();
    drive(&reporter, 0..1, &[1]).await;
    wait_for("the host", Duration::from_secs(5), || {
        host_of(&server, 1).is_some()
    })
    .await;
    server.fail(
        Fault::Slow(Duration::from_secs(20)),
        Scope::path("POST", "/api/v0/tsdb"),
    );
    drive(&reporter, 1..3, &[1]).await;
    let start = Instant::now();
    let summary = reporter.shutdown(Duration::from_millis(300)).await;
    let took = start.elapsed();
    // Bound + the reporter's margin, with room for a loaded machine; not the 20 s the call takes.
    assert!(took < Duration::from_secs(1), "{took:?}");
    assert!(summary.expect("a summary, not a stuck task").unsent > 0);
    assert_keys_not_logged();
}
