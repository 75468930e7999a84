//! The observer command end to end: what it prints, how it stops, how it fails.

use std::time::Duration;

use serde_json::Value;
use testbed::{
    observer_cmd::Finished,
    sh, skip_unless_root,
    traffic::{at, udp, udp_exchange, udp_from_each},
    ObserverCmd, TestCgroup,
};

const OBSERVER: &str = env!("CARGO_BIN_EXE_observer-e2e");
const ATTACHED: &str = "attached count_ingress";
/// Twice as many cgroups as the per-CPU cache has slots per direction, so that many share one.
const CROWD: usize = 2 * observer_common::CACHE_SLOTS as usize + 8;

fn lines(stdout: &[String]) -> Vec<Value> {
    stdout
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

fn line_for<'a>(lines: &'a [Value], cgroup: &TestCgroup) -> &'a Value {
    lines
        .iter()
        .find(|l| l["type"] == "cgroup" && l["cgroup_path"] == cgroup.rel())
        .unwrap_or_else(|| panic!("no line for {}", cgroup.rel()))
}

/// Program ids from the "attached count_ingress (id N), count_egress (id M)" log line.
fn program_ids(line: &str) -> Vec<u32> {
    line.split("(id ")
        .skip(1)
        .filter_map(|s| s.split(')').next()?.parse().ok())
        .collect()
}

fn attached_ids() -> String {
    sh(
        "bpftool",
        &[
            "-j",
            "cgroup",
            "show",
            &testbed::v2_root().display().to_string(),
        ],
    )
    .unwrap()
}

#[test]
fn once_prints_one_interval_of_exact_json_lines() {
    if skip_unless_root("once_prints_one_interval_of_exact_json_lines") {
        return;
    }
    let mut observer = ObserverCmd::start(OBSERVER, &["--once", "--interval", "3s"]).unwrap();
    observer
        .wait_log(ATTACHED, Duration::from_secs(20))
        .unwrap();
    let (sender, receiver) = (
        TestCgroup::new("cli-tx").unwrap(),
        TestCgroup::new("cli-rx").unwrap(),
    );
    udp_exchange(at(&sender), at(&receiver), "127.0.0.1:0", 400, 250);
    let done = observer.finish(Duration::from_secs(20)).unwrap();
    assert!(
        done.status.success(),
        "exit status {}: {}",
        done.status,
        done.log
    );
    let lines = lines(&done.stdout);

    let expected = udp(400, 250);
    let tx = line_for(&lines, &sender);
    let interval = tx["interval_seconds"].as_f64().unwrap();
    assert!(
        (2.5..4.0).contains(&interval),
        "interval_seconds {interval}"
    );
    assert_eq!(tx["cgroup_id"], sender.id());
    assert_eq!(tx["lo_tx_bytes"], expected.bytes);
    assert_eq!(tx["lo_tx_packets"], expected.packets);
    for zero in [
        "rx_bytes",
        "tx_bytes",
        "lo_rx_bytes",
        "rx_packets",
        "tx_packets",
        "lo_rx_packets",
    ] {
        assert_eq!(tx[zero], 0, "{zero}");
    }
    let rate = tx["lo_tx_bytes_per_second"].as_f64().unwrap();
    assert!((rate - expected.bytes as f64 / interval).abs() < 1e-6);
    let rx = line_for(&lines, &receiver);
    assert_eq!(rx["lo_rx_bytes"], expected.bytes);
    assert_eq!(rx["lo_rx_packets"], expected.packets);
    assert_eq!(rx["lo_tx_bytes"], 0);
    assert!(rx["time"].as_str().unwrap().ends_with('Z'));

    let summary = lines.last().unwrap();
    assert_eq!(summary["type"], "observer");
    assert_eq!(summary["map_full_drops"], 0);
    assert_eq!(
        lines.iter().filter(|l| l["type"] == "observer").count(),
        1,
        "--once: one interval"
    );
}

fn stops_cleanly_on(signal: i32, name: &str) {
    if skip_unless_root(name) {
        return;
    }
    let mut observer = ObserverCmd::start(OBSERVER, &["--interval", "60s"]).unwrap();
    let line = observer
        .wait_log(ATTACHED, Duration::from_secs(20))
        .unwrap();
    let ids = program_ids(&line);
    assert_eq!(ids.len(), 2, "two program ids in {line:?}");
    let before = attached_ids();
    for id in &ids {
        assert!(
            before.contains(&format!("\"id\":{id},")),
            "program {id} attached: {before}"
        );
    }
    observer.signal(signal);
    let done = observer.finish(Duration::from_secs(10)).unwrap();
    assert!(
        done.status.success(),
        "exit status {}: {}",
        done.status,
        done.log
    );
    assert!(done.log.contains("programs detached"), "{}", done.log);
    let after = attached_ids();
    for id in &ids {
        assert!(
            !after.contains(&format!("\"id\":{id},")),
            "program {id} still attached: {after}"
        );
        assert!(
            sh("bpftool", &["prog", "show", "id", &id.to_string()]).is_err(),
            "program {id} still loaded"
        );
    }
}

#[test]
fn sigterm_detaches_every_program() {
    stops_cleanly_on(libc::SIGTERM, "sigterm_detaches_every_program");
}

#[test]
fn sigint_detaches_every_program() {
    stops_cleanly_on(libc::SIGINT, "sigint_detaches_every_program");
}

#[test]
fn a_full_map_is_reported_once_per_interval() {
    if skip_unless_root("a_full_map_is_reported_once_per_interval") {
        return;
    }
    let mut observer = ObserverCmd::start(
        OBSERVER,
        &["--once", "--interval", "2s", "--map-entries", "1"],
    )
    .unwrap();
    observer
        .wait_log(ATTACHED, Duration::from_secs(20))
        .unwrap();
    // More cgroups than the per-CPU cache has slots: some share a slot, and the second to
    // come moves the first one's counts into the map, which has room for one.
    let sink = TestCgroup::new("cli-full-rx").unwrap();
    let senders: Vec<TestCgroup> = (0..CROWD)
        .map(|i| TestCgroup::new(&format!("cli-full-{i}")).unwrap())
        .collect();
    udp_from_each(&senders, &sink, 10).unwrap();
    let done = observer.finish(Duration::from_secs(20)).unwrap();
    assert!(done.status.success(), "{}", done.log);
    assert!(done.log.contains("raise --map-entries"), "{}", done.log);
    let summary = lines(&done.stdout).into_iter().last().unwrap();
    assert_eq!(summary["map_capacity"], 1);
    assert!(summary["map_full_drops"].as_u64().unwrap() > 0, "{summary}");
    assert!(summary["map_entries"].as_u64().unwrap() <= 1);
}

#[test]
fn a_full_map_recovers_once_its_cgroups_are_gone() {
    if skip_unless_root("a_full_map_recovers_once_its_cgroups_are_gone") {
        return;
    }
    const ENTRIES: usize = 64;
    let mut observer = ObserverCmd::start(
        OBSERVER,
        &[
            "--platform",
            "none",
            "--interval",
            "500ms",
            "--map-entries",
            "64",
        ],
    )
    .unwrap();
    observer
        .wait_log(ATTACHED, Duration::from_secs(20))
        .unwrap();
    let sink = TestCgroup::new("cli-recover-rx").unwrap();
    // More cgroups than the cache's slots and the map's entries together: it fills up.
    let filling: Vec<TestCgroup> = (0..CROWD + ENTRIES)
        .map(|i| TestCgroup::new(&format!("cli-recover-{i}")).unwrap())
        .collect();
    udp_from_each(&filling, &sink, 10).unwrap();
    std::thread::sleep(Duration::from_millis(1200));
    drop(filling);
    // Their entries go within a couple of intervals; then a new cgroup is counted again.
    std::thread::sleep(Duration::from_secs(2));
    let late = TestCgroup::new("cli-recover-late").unwrap();
    udp_exchange(at(&late), at(&sink), "127.0.0.1:0", 5, 10);
    std::thread::sleep(Duration::from_millis(1200));
    observer.signal(libc::SIGTERM);
    let done = observer.finish(Duration::from_secs(20)).unwrap();
    assert!(done.status.success(), "{}", done.log);
    let lines = lines(&done.stdout);
    let drops: u64 = lines
        .iter()
        .filter(|l| l["type"] == "observer")
        .map(|l| l["map_full_drops"].as_u64().unwrap_or(0))
        .sum();
    assert!(drops > 0, "the map never filled");
    let late_tx: u64 = lines
        .iter()
        .filter(|l| l["type"] == "cgroup" && l["cgroup_id"] == late.id())
        .map(|l| l["lo_tx_bytes"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(
        late_tx,
        udp(5, 10).bytes,
        "a cgroup made after the full map's cgroups went is counted exactly"
    );
}

#[test]
fn without_privileges_it_says_what_it_needs() {
    if skip_unless_root("without_privileges_it_says_what_it_needs") {
        return;
    }
    // nobody: no capabilities at all.
    let done = run(ObserverCmd::start_as(
        OBSERVER,
        &["--once", "--interval", "1s"],
        Some(65534),
    ));
    assert_eq!(done.status.code(), Some(1), "{}", done.log);
    assert!(
        done.stdout.is_empty(),
        "nothing on stdout: {:?}",
        done.stdout
    );
    assert!(
        done.log.contains("CAP_BPF") && done.log.contains("root"),
        "{}",
        done.log
    );
    assert!(!done.log.contains("panicked"), "{}", done.log);
}

#[test]
fn a_cgroup_root_that_is_not_cgroup2_is_explained() {
    if skip_unless_root("a_cgroup_root_that_is_not_cgroup2_is_explained") {
        return;
    }
    let done = run(ObserverCmd::start(
        OBSERVER,
        &["--once", "--cgroup-root", "/tmp"],
    ));
    assert_eq!(done.status.code(), Some(1));
    assert!(done.stdout.is_empty());
    assert!(
        done.log.contains("/tmp: not a cgroup v2 mount"),
        "{}",
        done.log
    );
    let done = run(ObserverCmd::start(
        OBSERVER,
        &["--once", "--cgroup-root", "/does/not/exist"],
    ));
    assert_eq!(done.status.code(), Some(1));
    assert!(
        done.log.contains("/does/not/exist") && !done.log.contains("panicked"),
        "{}",
        done.log
    );
}

#[test]
fn bad_flags_are_rejected_before_anything_loads() {
    let done = run(ObserverCmd::start(OBSERVER, &["--interval", "soon"]));
    assert_eq!(done.status.code(), Some(2), "clap's usage error");
    assert!(done.stdout.is_empty());
    assert!(
        done.log.contains("--interval") && done.log.contains("60s"),
        "{}",
        done.log
    );
}

/// Durations past their ceiling are refused at start with the ceiling named: later arithmetic
/// on them (deadlines, retire-after x interval) could overflow.
#[test]
fn huge_durations_are_refused_with_their_ceiling() {
    for (flags, ceiling) in [
        (
            &["--interval", "100000000000000s"][..],
            "the longest interval is 1h",
        ),
        (
            &["--shutdown-timeout", "1000000h"][..],
            "the longest shutdown timeout is 10m",
        ),
        (&["--retire-after", "4294967295"][..], "1..=10000"),
    ] {
        let done = run(ObserverCmd::start(OBSERVER, flags));
        assert_eq!(done.status.code(), Some(2), "{flags:?}: clap's usage error");
        assert!(done.stdout.is_empty());
        assert!(done.log.contains(ceiling), "{flags:?}: {}", done.log);
    }
}

#[test]
fn help_shows_every_flag_with_its_default() {
    let done = run(ObserverCmd::start(OBSERVER, &["--help"]));
    assert!(done.status.success());
    let help = done.stdout.join("\n");
    for needle in [
        "--interval",
        "[default: 60s]",
        "--once",
        "--output",
        "--cgroup-root",
        "--map-entries",
        "OBSERVER_INTERVAL",
    ] {
        assert!(help.contains(needle), "--help lacks {needle}:\n{help}");
    }
}

fn run(cmd: anyhow::Result<ObserverCmd>) -> Finished {
    cmd.unwrap().finish(Duration::from_secs(20)).unwrap()
}
