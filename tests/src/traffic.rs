//! Known traffic between processes in test cgroups, through the `trafficgen` binary.

use std::{path::PathBuf, time::Duration};

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
