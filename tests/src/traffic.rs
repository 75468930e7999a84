//! Known traffic between processes in test cgroups, through the `trafficgen` binary.

use std::{
    io::Write as _,
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{ensure, Context as _};

use observer_common::Counter;

use crate::{NetNs, Spawned, TestCgroup, Where};

/// IPv4 (20) + UDP (8) header bytes on top of each datagram's payload.
pub const UDP_OVERHEAD: u64 = 28;

/// What `n` datagrams of `payload` bytes count as: n x (payload + 28) bytes, n packets.
pub fn udp(n: u64, payload: u64) -> Counter {
    Counter {
        bytes: n * (payload + UDP_OVERHEAD),
        packets: n,
    }
}

/// The trafficgen binary built beside the running test or bench binary.
pub fn trafficgen() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join("trafficgen")
}

pub fn at(cgroup: &TestCgroup) -> Where<'_> {
    Where {
        cgroup,
        netns: None,
    }
}

pub fn at_in<'a>(cgroup: &'a TestCgroup, netns: &'a NetNs) -> Where<'a> {
    Where {
        cgroup,
        netns: Some(netns),
    }
}

/// Sends `count` datagrams of `payload` bytes from `sender` to a receiver bound to `bind` in
/// `receiver`, and waits until both are done and the receiver got every datagram.
pub fn udp_exchange(sender: Where, receiver: Where, bind: &str, count: u64, payload: u64) {
    let gen = trafficgen();
    let mut rx = Spawned::start(&gen, &["udp-recv", bind, &count.to_string()], receiver)
        .expect("start receiver");
    let addr = rx.expect("ready ").expect("receiver ready");
    let mut tx = Spawned::start(
        &gen,
        &["udp-send", &addr, &count.to_string(), &payload.to_string()],
        sender,
    )
    .expect("start sender");
    assert_eq!(tx.expect("sent ").unwrap(), count.to_string());
    let received = rx.expect("received ").unwrap();
    assert_eq!(
        received,
        format!("{count} {}", count * payload),
        "the receiver got every datagram"
    );
    tx.wait(Duration::from_secs(10)).unwrap();
    rx.wait(Duration::from_secs(10)).unwrap();
}

/// One UDP datagram over loopback from each of `cgroups` (one `trafficgen udp-each` joins each
/// in turn and sends from a new socket), to a receiver in `sink` that must get them all.
pub fn udp_from_each(
    cgroups: &[TestCgroup],
    sink: &TestCgroup,
    payload: u64,
) -> anyhow::Result<()> {
    let gen = trafficgen();
    let count = cgroups.len().to_string();
    let mut rx = Spawned::start(
        &gen,
        &["udp-recv", "127.0.0.1:0", &count],
        Where {
            cgroup: sink,
            netns: None,
        },
    )?;
    let addr = rx.expect("ready ")?;
    let mut each = Command::new(&gen)
        .args(["udp-each", &addr, &payload.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("trafficgen udp-each")?;
    let mut paths = String::new();
    for c in cgroups {
        paths.push_str(&c.path().to_string_lossy());
        paths.push('\n');
    }
    each.stdin
        .take()
        .context("stdin")?
        .write_all(paths.as_bytes())?;
    let out = each.wait_with_output()?;
    ensure!(out.status.success(), "trafficgen udp-each: {}", out.status);
    ensure!(
        String::from_utf8_lossy(&out.stdout).trim() == format!("sent {count}"),
        "udp-each said {:?}",
        String::from_utf8_lossy(&out.stdout)
    );
    let received = rx.expect("received ")?;
    ensure!(
        received == format!("{count} {}", cgroups.len() as u64 * payload),
        "the receiver got {received}, not every datagram"
    );
    rx.wait(Duration::from_secs(10))?;
    Ok(())
}
