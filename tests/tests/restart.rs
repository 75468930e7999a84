//! Restarts with pinned state: steady UDP from a test cgroup while observer is SIGKILLed and
//! restarted, stopped and restarted, and upgraded to another map size. The JSON lines of all
//! runs add up to exactly what was sent (no interval lost, none twice), and `observer detach`
//! leaves nothing attached.
//!
//! Each test pins into a bpffs of its own, mounted for it and removed after it.

use std::{
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::Duration,
};

use anyhow::{ensure, Context as _};
use serde_json::Value;
use testbed::{
    sh, skip_unless_root,
    traffic::{at, udp, udp_exchange},
    ObserverCmd, TestCgroup,
};

const OBSERVER: &str = env!("CARGO_BIN_EXE_observer-e2e");
const PAYLOAD: u64 = 100;
const BATCH: u64 = 20;

/// A bpffs mounted at a directory of its own; on drop, whatever is pinned is removed with
/// `observer detach`, then it is unmounted.
struct Bpffs {
    mount: PathBuf,
}

impl Bpffs {
    fn new() -> anyhow::Result<Self> {
        let mount = std::env::temp_dir().join(testbed::unique("observer-bpffs"));
        std::fs::create_dir_all(&mount)?;
        sh("mount", &["-t", "bpf", "bpf", &mount.to_string_lossy()])?;
        Ok(Self { mount })
    }

    fn pin_dir(&self) -> PathBuf {
        self.mount.join("observer")
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let dir = self.pin_dir();
        let _ = detach(&dir);
        let _ = sh("umount", &[&self.mount.to_string_lossy()]);
        let _ = std::fs::remove_dir(&self.mount);
    }
}

fn detach(pin_dir: &Path) -> anyhow::Result<String> {
    let out = std::process::Command::new(OBSERVER)
        .args(["detach", "--bpf-pin-dir", &pin_dir.to_string_lossy()])
        .output()?;
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    ensure!(out.status.success(), "observer detach failed: {log}");
    Ok(log)
}

fn start(pin_dir: &Path, extra: &[&str]) -> anyhow::Result<ObserverCmd> {
    let pin = pin_dir.to_string_lossy().into_owned();
    let mut args = vec!["--platform", "none", "--interval", "1s", "--output", "json"];
    args.extend_from_slice(extra);
    let mut observer =
        ObserverCmd::start_with_env(OBSERVER, &args, &[("OBSERVER_BPF_PIN_DIR", pin.as_str())])?;
    observer.wait_log("attached", Duration::from_secs(30))?;
    Ok(observer)
}

/// lo_tx bytes of cgroup `id` over every cgroup line of `stdout`.
fn lo_tx(stdout: &[String], id: u64) -> u64 {
    stdout
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["type"] == "cgroup" && l["cgroup_id"] == id)
        .map(|l| l["lo_tx_bytes"].as_u64().unwrap_or(0))
        .sum()
}

/// Sends batches from `sender` to `sink` until `stop`; returns the bytes sent.
fn steady(sender: &TestCgroup, sink: &TestCgroup, stop: &AtomicBool, sent: &AtomicU64) {
    while !stop.load(Ordering::Relaxed) {
        udp_exchange(at(sender), at(sink), "127.0.0.1:0", BATCH, PAYLOAD);
        sent.fetch_add(udp(BATCH, PAYLOAD).bytes, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `restart` (which stops the first observer and starts the second) while traffic flows;
/// returns (sent, reported by the first, reported by the second, the second's log).
fn across(
    bpffs: &Bpffs,
    first_args: &[&str],
    restart: impl FnOnce(ObserverCmd) -> anyhow::Result<(Vec<String>, ObserverCmd)>,
) -> anyhow::Result<(u64, u64, u64, String)> {
    let (sender, sink) = (
        TestCgroup::new("restart-tx")?,
        TestCgroup::new("restart-rx")?,
    );
    let stop = AtomicBool::new(false);
    let sent = AtomicU64::new(0);
    let first = start(&bpffs.pin_dir(), first_args)?;
    std::thread::scope(|scope| -> anyhow::Result<_> {
        let traffic = scope.spawn(|| steady(&sender, &sink, &stop, &sent));
        let result = (|| {
            let (first_out, mut second) = restart(first)?;
            // The second run for a while, then the traffic stops and a last interval passes.
            std::thread::sleep(Duration::from_secs(2));
            stop.store(true, Ordering::Relaxed);
            while !traffic.is_finished() {
                std::thread::sleep(Duration::from_millis(20));
            }
            second.wait_stdout(r#""type":"observer""#, Duration::from_secs(5))?;
            second.wait_stdout(r#""type":"observer""#, Duration::from_secs(5))?;
            second.signal(libc::SIGTERM);
            let done = second.finish(Duration::from_secs(20))?;
            ensure!(
                done.status.success(),
                "second run: {}\n{}",
                done.status,
                done.log
            );
            Ok((
                lo_tx(&first_out, sender.id()),
                lo_tx(&done.stdout, sender.id()),
                done.log,
            ))
        })();
        stop.store(true, Ordering::Relaxed);
        let (a, b, log) = result?;
        Ok((sent.load(Ordering::Relaxed), a, b, log))
    })
}

#[test]
fn a_sigkilled_observer_restarted_2s_later_loses_nothing() -> anyhow::Result<()> {
    if skip_unless_root("a_sigkilled_observer_restarted_2s_later_loses_nothing") {
        return Ok(());
    }
    let bpffs = Bpffs::new()?;
    let pin_dir = bpffs.pin_dir();
    let (sent, a, b, log) = across(&bpffs, &[], |mut first| {
        // Killed between two reports, not while one is written.
        first.wait_stdout(r#""type":"observer""#, Duration::from_secs(10))?;
        first.wait_stdout(r#""type":"observer""#, Duration::from_secs(10))?;
        std::thread::sleep(Duration::from_millis(300));
        first.signal(libc::SIGKILL);
        let done = first.finish(Duration::from_secs(10))?;
        std::thread::sleep(Duration::from_secs(2));
        let second = start(&pin_dir, &[])?;
        Ok((done.stdout, second))
    })?;
    eprintln!(
        "sent {sent} B; first run reported {a}, second {b}: {}",
        a + b
    );
    ensure!(a > 0 && b > 0, "both runs should have reported traffic");
    ensure!(
        a + b == sent,
        "reported {} bytes over both runs, not the {sent} sent:\n{log}",
        a + b
    );
    ensure!(log.contains("took over the programs"), "{log}");
    Ok(())
}

#[test]
fn a_graceful_restart_and_an_upgrade_of_the_map_size_lose_nothing() -> anyhow::Result<()> {
    if skip_unless_root("a_graceful_restart_and_an_upgrade_of_the_map_size_lose_nothing") {
        return Ok(());
    }
    let bpffs = Bpffs::new()?;
    let pin_dir = bpffs.pin_dir();
    let (sent, a, b, log) = across(&bpffs, &["--map-entries", "4096"], |mut first| {
        first.wait_stdout(r#""type":"observer""#, Duration::from_secs(10))?;
        std::thread::sleep(Duration::from_millis(500));
        first.signal(libc::SIGTERM);
        let done = first.finish(Duration::from_secs(20))?;
        ensure!(done.status.success(), "first run: {}", done.log);
        ensure!(
            done.log.contains("stay attached and counting"),
            "{}",
            done.log
        );
        std::thread::sleep(Duration::from_secs(1));
        // The upgrade: another map size, so the pinned maps are not this run's shape.
        let second = start(&pin_dir, &["--map-entries", "8192"])?;
        Ok((done.stdout, second))
    })?;
    eprintln!(
        "sent {sent} B; first run reported {a}, second {b}: {}",
        a + b
    );
    ensure!(
        a + b == sent,
        "reported {} bytes over both runs, not the {sent} sent:\n{log}",
        a + b
    );
    ensure!(
        log.contains("set aside") && log.contains("carried over"),
        "{log}"
    );

    // Uninstall: everything pinned goes, and with it the programs.
    let ids: Vec<String> = log
        .lines()
        .find(|l| l.contains("attached count_ingress"))
        .context("no attach line")?
        .split("(id ")
        .skip(1)
        .filter_map(|s| s.split(')').next().map(str::to_owned))
        .collect();
    ensure!(ids.len() == 2, "program ids from {log}");
    let removed = detach(&pin_dir)?;
    ensure!(removed.contains("link_count_ingress"), "{removed}");
    ensure!(!pin_dir.exists(), "{} still exists", pin_dir.display());
    for id in &ids {
        ensure!(
            sh("bpftool", &["prog", "show", "id", id]).is_err(),
            "program {id} is still loaded after observer detach"
        );
    }
    let again = detach(&pin_dir)?;
    ensure!(again.contains("nothing pinned"), "{again}");
    Ok(())
}

/// An upgrade from a build whose cache was one element per slot (a per-CPU array of 1,024
/// 64-byte slots, ingress then egress): the counts its slots held are carried over and
/// reported once, under their cgroup.
#[test]
fn an_upgrade_from_the_cache_of_one_slot_per_element_carries_its_counts_over() -> anyhow::Result<()>
{
    if skip_unless_root("an_upgrade_from_the_cache_of_one_slot_per_element_carries_its_counts_over")
    {
        return Ok(());
    }
    const LO_BYTES: u64 = 1234;
    const LO_PACKETS: u64 = 7;
    let bpffs = Bpffs::new()?;
    let pin_dir = bpffs.pin_dir();
    std::fs::create_dir_all(&pin_dir)?;
    let idle = TestCgroup::new("restart-legacy")?;
    let cache = pin_dir.join(observer_common::CACHE_MAP);
    let cache_path = cache.to_string_lossy().into_owned();
    sh(
        "bpftool",
        &[
            "map",
            "create",
            &cache_path,
            "type",
            "percpu_array",
            "key",
            "4",
            "value",
            "64",
            "entries",
            "1024",
            "name",
            "CACHE",
        ],
    )?;
    // The earlier build's slot of the idle cgroup's egress: a whole slot (begin == end) with
    // loopback counts. bpftool writes the same value on every CPU.
    let index = observer_common::cache_index(idle.id(), true);
    let words = [1, idle.id(), 0, 0, LO_BYTES, LO_PACKETS, 1, 0];
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>();
    let key = hex(&index.to_ne_bytes());
    let value = hex(&words
        .iter()
        .flat_map(|w: &u64| w.to_ne_bytes())
        .collect::<Vec<_>>());
    let mut args = vec!["map", "update", "pinned", &cache_path, "key", "hex"];
    args.extend(key.iter().map(String::as_str));
    args.extend(["value", "hex"]);
    args.extend(value.iter().map(String::as_str));
    sh("bpftool", &args)?;
    // Per-CPU maps hold a value for every possible CPU ("0-1", "0-3,5-7").
    let possible = std::fs::read_to_string("/sys/devices/system/cpu/possible")?;
    let cpus = 1 + possible
        .trim()
        .rsplit(['-', ','])
        .next()
        .and_then(|last| last.parse::<u64>().ok())
        .with_context(|| format!("possible CPUs {possible:?}"))?;

    let mut observer = start(&pin_dir, &[])?;
    observer.wait_stdout(r#""type":"observer""#, Duration::from_secs(10))?;
    observer.wait_stdout(r#""type":"observer""#, Duration::from_secs(5))?;
    observer.signal(libc::SIGTERM);
    let done = observer.finish(Duration::from_secs(20))?;
    ensure!(done.status.success(), "{}", done.log);
    ensure!(
        done.log.contains("the pinned CACHE map") && done.log.contains("set aside"),
        "{}",
        done.log
    );
    ensure!(
        !done.log.contains("cannot read the earlier CACHE"),
        "{}",
        done.log
    );
    let lines: Vec<Value> = done
        .stdout
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["type"] == "cgroup" && l["cgroup_id"] == idle.id())
        .collect();
    let bytes: u64 = lines.iter().filter_map(|l| l["lo_tx_bytes"].as_u64()).sum();
    let packets: u64 = lines
        .iter()
        .filter_map(|l| l["lo_tx_packets"].as_u64())
        .sum();
    ensure!(
        (bytes, packets) == (LO_BYTES * cpus, LO_PACKETS * cpus),
        "carried over {bytes} B / {packets} packets, not {} / {} ({cpus} CPUs): {lines:?}\n{}",
        LO_BYTES * cpus,
        LO_PACKETS * cpus,
        done.log
    );
    Ok(())
}
