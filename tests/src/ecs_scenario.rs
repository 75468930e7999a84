//! What the ECS end-to-end tests (e2e_ecs.rs, deploy_ecs.rs, the Mackerel lifecycle tests) share:
//! task ids, commands in containers with a time limit, the FORWARD rules that let bridge
//! containers reach a sink in a test namespace, and the tolerance of a byte count.

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::{netns::Veth, sh, unique, Spawned};

/// The issues' tolerance: measured within 2% of what was sent (plus what TCP resent).
pub const TOLERANCE: f64 = 0.02;

/// A fresh 32-hex ECS task id.
pub fn task_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write(unique("ecs-task").as_bytes());
    let a = h.finish();
    h.write_u64(a);
    format!("{a:016x}{:016x}", h.finish())
}

/// `docker exec <id> sh -c <script>`, failing with its stderr.
pub fn docker_exec(id: &str, script: &str, timeout: Duration) -> anyhow::Result<()> {
    let child = Command::new("docker")
        .args(["exec", id, "sh", "-c", script])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let out = wait_child(child, timeout)?;
    anyhow::ensure!(
        out.status.success(),
        "exited with {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// Waits for a child within `timeout`; kills it when the time is up.
pub fn wait_child(mut child: Child, timeout: Duration) -> anyhow::Result<std::process::Output> {
    let deadline = Instant::now() + timeout;
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!("still running after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(child.wait_with_output()?)
}

pub fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// FORWARD rules the test inserted; deleted when dropped.
pub struct ForwardRules {
    rules: Vec<Vec<String>>,
}

impl Drop for ForwardRules {
    fn drop(&mut self) {
        for rule in &self.rules {
            let mut args = vec!["-D", "FORWARD"];
            args.extend(rule.iter().map(String::as_str));
            if let Err(e) = sh("iptables", &args) {
                eprintln!("cleanup: {e}");
            }
        }
    }
}

/// GETs the sink from one bridge and one awsvpc-like app. Docker's own FORWARD rules let
/// docker0 out to any other device and the answers back in; if a firewall here drops it
/// anyway, the narrowest rules that let these two addresses talk are added (removed by the
/// returned guard) and the check is made again.
/// `probed` are (name, container id) of the apps that try; `record` hears of every rule added,
/// for the test's check that nothing is left behind.
pub fn reach_sink(
    probed: &[(&str, &str)],
    url: &str,
    sink: &mut Spawned,
    veth: &Veth,
    record: &dyn Fn(Vec<String>),
) -> Option<ForwardRules> {
    let probe = |(_, id): &(&str, &str)| {
        docker_exec(
            id,
            &format!("timeout 5 wget -q -O /dev/null {url}"),
            Duration::from_secs(15),
        )
    };
    let first: Vec<_> = probed.iter().map(&probe).collect();
    let mut guard = None;
    if first.iter().any(Result::is_err) {
        eprintln!(
            "docker0 -> {} is not forwarded ({first:?}); adding FORWARD rules",
            veth.host_if
        );
        let ns_addr = format!("{}/32", veth.ns_addr);
        let host_if = veth.host_if.as_str();
        let rules: Vec<Vec<String>> = [
            vec![
                "-i", "docker0", "-o", host_if, "-d", &ns_addr, "-j", "ACCEPT",
            ],
            vec![
                "-i",
                host_if,
                "-o",
                "docker0",
                "-s",
                &ns_addr,
                "-m",
                "conntrack",
                "--ctstate",
                "ESTABLISHED,RELATED",
                "-j",
                "ACCEPT",
            ],
        ]
        .iter()
        .map(|r| r.iter().map(|s| s.to_string()).collect())
        .collect();
        let mut added = ForwardRules { rules: Vec::new() };
        for rule in rules {
            let mut args = vec!["-I", "FORWARD", "1"];
            args.extend(rule.iter().map(String::as_str));
            sh("iptables", &args).expect("iptables -I FORWARD");
            record(rule.clone());
            added.rules.push(rule);
        }
        guard = Some(added);
        for a in probed {
            probe(a).unwrap_or_else(|e| panic!("{} cannot reach the sink: {e}", a.0));
        }
    }
    // Each successful GET was answered: one "got 0" line each (failed ones print nothing).
    let answered =
        first.iter().filter(|r| r.is_ok()).count() + if guard.is_some() { probed.len() } else { 0 };
    for _ in 0..answered {
        assert_eq!(sink.expect("got ").unwrap(), "0");
    }
    guard
}

/// Measured is at least what was sent, and above it by at most the tolerance plus what TCP
/// resent (a loaded machine retransmits; each resent segment is counted again, as it should be).
pub fn within(measured: f64, sent: f64, resent: u64) -> bool {
    measured >= sent && measured <= sent * (1.0 + TOLERANCE) + resent as f64
}

/// Largest IP packet a resent segment can be on docker0 and the test's veth (MTU 1500).
pub const SEGMENT_BYTES: u64 = 1500;

/// `RetransSegs` of the network namespace `container` is in, from its /proc/net/snmp.
pub fn retrans_segs(container: &str) -> u64 {
    let snmp = sh("docker", &["exec", container, "cat", "/proc/net/snmp"])
        .unwrap_or_else(|e| panic!("reading /proc/net/snmp in {container}: {e}"));
    let tcp: Vec<&str> = snmp.lines().filter(|l| l.starts_with("Tcp:")).collect();
    let [names, values] = tcp.as_slice() else {
        panic!("no Tcp lines in /proc/net/snmp of {container}: {snmp}")
    };
    let at = names
        .split_whitespace()
        .position(|n| n == "RetransSegs")
        .expect("RetransSegs in /proc/net/snmp");
    values
        .split_whitespace()
        .nth(at)
        .and_then(|v| v.parse().ok())
        .expect("a RetransSegs value")
}

/// Unix seconds of an RFC 3339 UTC time with milliseconds ("2026-11-23T08:59:01.123Z"),
/// rounded down (Mackerel's `time`).
pub fn unix_seconds(rfc3339: &str) -> Option<i64> {
    let (date, time) = rfc3339.strip_suffix('Z')?.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut t = time.split(':');
    let (hh, mm): (i64, i64) = (t.next()?.parse().ok()?, t.next()?.parse().ok()?);
    let ss: f64 = t.next()?.parse().ok()?;
    // Days from 1970-01-01 (Howard Hinnant's days_from_civil).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + hh * 3600 + mm * 60 + ss.floor() as i64)
}

/// An ECS task of one real container (busybox `sleep`) under `/ecs/<task id>`, for a fake agent
/// to list: what the Mackerel lifecycle tests need (hosts, not traffic).
pub struct SleepingTask {
    pub id: String,
    pub arn: String,
    pub docker_id: String,
}

impl SleepingTask {
    /// Starts it in `containers` (removed with them).
    pub fn start(
        containers: &mut crate::docker::Containers,
        cluster: &str,
    ) -> anyhow::Result<Self> {
        let id = task_id();
        let docker_id = containers.start(
            crate::docker::Run::new()
                .name(&unique("sleeping-task"))
                .cgroup_parent(&format!("/ecs/{id}"))
                .cmd(&["sleep", "3600"]),
        )?;
        Ok(Self {
            arn: crate::fake_platform::task_arn(cluster, &id),
            id,
            docker_id,
        })
    }

    /// The task as the fake agent lists it: RUNNING, its container named `app`.
    pub fn listed(&self, cluster: &str, family: &str) -> crate::fake_platform::FakeTask {
        crate::fake_platform::FakeTask::running(cluster, &self.id, family, "1")
            .container(&self.docker_id, "app")
    }
}
