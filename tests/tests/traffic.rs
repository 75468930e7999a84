//! observer's programs against real cgroups, namespaces and packets. Needs root; each test
//! skips with a message otherwise. Every test loads its own copy of the programs, so tests may
//! run in parallel: each asserts only on cgroups it made.

use std::time::Duration;

use observer::{programs::Programs, traffic::TrafficReader};
use observer_common::{Counter, TrafficValue};
use testbed::{
    skip_unless_root,
    traffic::{at, at_in, trafficgen, udp, udp_exchange, udp_from_each},
    NetNs, Spawned, TestCgroup,
};

/// observer's programs attached at the v2 root, with their map to read.
struct Counting {
    programs: Programs,
    reader: TrafficReader,
}

impl Counting {
    fn attach() -> Self {
        Self::with_entries(4096)
    }

    fn with_entries(entries: u32) -> Self {
        Self::with(Programs::load_observer(entries).expect("load"))
    }

    fn with(mut programs: Programs) -> Self {
        let reader = TrafficReader::new(programs.ebpf_mut()).expect("maps");
        programs.attach(&testbed::v2_root()).expect("attach");
        Self { programs, reader }
    }

    /// Everything counted for `cgroup` so far.
    fn of(&mut self, cgroup: &TestCgroup) -> TrafficValue {
        self.of_id(cgroup.id())
    }

    fn of_id(&mut self, cgroup_id: u64) -> TrafficValue {
        let reading = self.reader.read().expect("read");
        let mut total = TrafficValue::default();
        for (key, value) in reading.entries {
            if key.cgroup_id == cgroup_id {
                total += value;
            }
        }
        total
    }
}

#[test]
fn udp_over_loopback_is_counted_exactly_per_cgroup() {
    if skip_unless_root("udp_over_loopback_is_counted_exactly_per_cgroup") {
        return;
    }
    let mut counting = Counting::attach();
    let (sender, receiver) = (
        TestCgroup::new("lo-tx").unwrap(),
        TestCgroup::new("lo-rx").unwrap(),
    );
    udp_exchange(at(&sender), at(&receiver), "127.0.0.1:0", 1000, 100);

    let expected = udp(1000, 100);
    assert_eq!(
        counting.of(&sender),
        TrafficValue {
            lo_tx: expected,
            ..Default::default()
        },
        "sender: loopback egress only"
    );
    assert_eq!(
        counting.of(&receiver),
        TrafficValue {
            lo_rx: expected,
            ..Default::default()
        },
        "receiver: loopback ingress only"
    );
}

#[test]
fn udp_over_veth_into_a_namespace_is_not_loopback() {
    if skip_unless_root("udp_over_veth_into_a_namespace_is_not_loopback") {
        return;
    }
    let mut counting = Counting::attach();
    let ns = NetNs::with_veth("veth").unwrap();
    let (sender, receiver) = (
        TestCgroup::new("veth-tx").unwrap(),
        TestCgroup::new("veth-rx").unwrap(),
    );
    let bind = format!("{}:0", ns.veth().ns_addr);
    udp_exchange(at(&sender), at_in(&receiver, &ns), &bind, 700, 512);

    let expected = udp(700, 512);
    assert_eq!(
        counting.of(&sender),
        TrafficValue {
            tx: expected,
            ..Default::default()
        },
        "sender in the host netns: device egress only"
    );
    assert_eq!(
        counting.of(&receiver),
        TrafficValue {
            rx: expected,
            ..Default::default()
        },
        "receiver in its own netns: device ingress only, under its cgroup"
    );
}

#[test]
fn udp_over_loopback_inside_a_namespace() {
    if skip_unless_root("udp_over_loopback_inside_a_namespace") {
        return;
    }
    let mut counting = Counting::attach();
    let ns = NetNs::new("nslo").unwrap();
    let (sender, receiver) = (
        TestCgroup::new("nslo-tx").unwrap(),
        TestCgroup::new("nslo-rx").unwrap(),
    );
    udp_exchange(
        at_in(&sender, &ns),
        at_in(&receiver, &ns),
        "127.0.0.1:0",
        300,
        1200,
    );

    let expected = udp(300, 1200);
    assert_eq!(
        counting.of(&sender),
        TrafficValue {
            lo_tx: expected,
            ..Default::default()
        }
    );
    assert_eq!(
        counting.of(&receiver),
        TrafficValue {
            lo_rx: expected,
            ..Default::default()
        }
    );
}

#[test]
fn two_cgroups_sending_at_once_are_not_mixed_up() {
    if skip_unless_root("two_cgroups_sending_at_once_are_not_mixed_up") {
        return;
    }
    let mut counting = Counting::attach();
    let (a, b, sink) = (
        TestCgroup::new("mix-a").unwrap(),
        TestCgroup::new("mix-b").unwrap(),
        TestCgroup::new("mix-sink").unwrap(),
    );
    std::thread::scope(|s| {
        s.spawn(|| udp_exchange(at(&a), at(&sink), "127.0.0.1:0", 3000, 64));
        s.spawn(|| udp_exchange(at(&b), at(&sink), "127.0.0.1:0", 2000, 900));
    });
    assert_eq!(
        counting.of(&a),
        TrafficValue {
            lo_tx: udp(3000, 64),
            ..Default::default()
        }
    );
    assert_eq!(
        counting.of(&b),
        TrafficValue {
            lo_tx: udp(2000, 900),
            ..Default::default()
        }
    );
    let both = Counter {
        bytes: udp(3000, 64).bytes + udp(2000, 900).bytes,
        packets: 5000,
    };
    assert_eq!(
        counting.of(&sink),
        TrafficValue {
            lo_rx: both,
            ..Default::default()
        }
    );
}

/// What this kernel runs (keyed by cgroup serial number on 6.3+), the pair keyed by cgroup id
/// (older kernels) and the hash alone (off x86-64), all attached at once: each sees every
/// packet and must count it under the same cgroup, UDP exactly and TCP (handshake, ACKs and
/// teardown included) to the byte alike.
#[test]
fn every_program_pair_counts_the_same_packets_alike() {
    if skip_unless_root("every_program_pair_counts_the_same_packets_alike") {
        return;
    }
    let mut pairs = [
        Counting::attach(),
        Counting::with(Programs::load_by_id(4096).expect("load by id")),
        Counting::with(Programs::load_hashed(4096).expect("load hashed")),
    ];
    let (a, b, sink) = (
        TestCgroup::new("pairs-a").unwrap(),
        TestCgroup::new("pairs-b").unwrap(),
        TestCgroup::new("pairs-sink").unwrap(),
    );
    udp_exchange(at(&a), at(&sink), "127.0.0.1:0", 700, 64);
    udp_exchange(at(&b), at(&sink), "127.0.0.1:0", 300, 1200);
    let mut rx = Spawned::start(&trafficgen(), &["tcp-recv", "127.0.0.1:0"], at(&sink)).unwrap();
    let addr = rx.expect("ready ").unwrap();
    let mut tx = Spawned::start(&trafficgen(), &["tcp-send", &addr, "1048576"], at(&a)).unwrap();
    assert_eq!(tx.expect("sent ").unwrap(), "1048576");
    rx.expect("received ").unwrap();
    tx.wait(Duration::from_secs(10)).unwrap();
    rx.wait(Duration::from_secs(10)).unwrap();

    let names = pairs.each_ref().map(|p| p.programs.names()[0].0);
    let counted: Vec<[TrafficValue; 3]> = pairs
        .iter_mut()
        .map(|p| [p.of(&a), p.of(&b), p.of(&sink)])
        .collect();
    assert_eq!(
        counted[0][1].lo_tx,
        udp(300, 1200),
        "{}: b sent UDP only",
        names[0]
    );
    assert!(counted[0][0].lo_tx.bytes > 1 << 20, "{}: a's TCP", names[0]);
    for (name, other) in names.iter().zip(&counted).skip(1) {
        assert_eq!(other, &counted[0], "{name} against {}", names[0]);
    }
}

#[test]
fn tcp_transfer_is_counted_within_one_percent() {
    if skip_unless_root("tcp_transfer_is_counted_within_one_percent") {
        return;
    }
    const BYTES: u64 = 16 << 20;
    let mut counting = Counting::attach();
    let (sender, receiver) = (
        TestCgroup::new("tcp-tx").unwrap(),
        TestCgroup::new("tcp-rx").unwrap(),
    );
    let mut rx =
        Spawned::start(&trafficgen(), &["tcp-recv", "127.0.0.1:0"], at(&receiver)).unwrap();
    let addr = rx.expect("ready ").unwrap();
    let mut tx = Spawned::start(
        &trafficgen(),
        &["tcp-send", &addr, &BYTES.to_string()],
        at(&sender),
    )
    .unwrap();
    assert_eq!(rx.expect("received ").unwrap(), BYTES.to_string());
    assert_eq!(tx.expect("sent ").unwrap(), BYTES.to_string());
    tx.wait(Duration::from_secs(10)).unwrap();
    rx.wait(Duration::from_secs(10)).unwrap();

    let (s, r) = (counting.of(&sender), counting.of(&receiver));
    let within = |measured: u64| {
        let ratio = measured as f64 / BYTES as f64;
        assert!(
            (1.0..=1.01).contains(&ratio),
            "{measured} bytes counted for a {BYTES}-byte transfer (ratio {ratio:.5})"
        );
    };
    within(s.lo_tx.bytes);
    within(r.lo_rx.bytes);
    // The other direction carries only ACKs; nothing went over a device.
    assert!(s.lo_rx.bytes < BYTES / 100 && r.lo_tx.bytes < BYTES / 100);
    assert_eq!((s.rx, s.tx, r.rx, r.tx), Default::default());
}

#[test]
fn a_full_map_counts_what_it_drops() {
    if skip_unless_root("a_full_map_counts_what_it_drops") {
        return;
    }
    // One entry: the first cgroup whose counts leave the per-CPU cache takes it. More cgroups
    // than the cache has slots, so that many share one and move each other's counts out.
    let mut counting = Counting::with_entries(1);
    let sink = TestCgroup::new("full-rx").unwrap();
    let senders: Vec<TestCgroup> = (0..2 * observer_common::CACHE_SLOTS + 8)
        .map(|i| TestCgroup::new(&format!("full-{i}")).unwrap())
        .collect();
    udp_from_each(&senders, &sink, 10).unwrap();
    let reading = counting.reader.read().unwrap();
    assert_eq!(reading.hash_entries, 1);
    assert!(
        reading.map_full > 0,
        "packets that found no room are counted as dropped"
    );
}

#[test]
fn a_process_outside_any_container_is_counted_under_its_own_cgroup() {
    if skip_unless_root("a_process_outside_any_container_is_counted_under_its_own_cgroup") {
        return;
    }
    // This test process, wherever the runner put it (often the root cgroup), is the sender.
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let rel = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("a cgroup v2 line")
        .to_owned();
    let own_id =
        observer::cgroupfs::cgroup_id(&testbed::v2_root().join(rel.trim_start_matches('/')))
            .unwrap();
    let mut counting = Counting::attach();
    let receiver = TestCgroup::new("host-rx").unwrap();
    let mut rx = Spawned::start(
        &trafficgen(),
        &["udp-recv", "127.0.0.1:0", "250"],
        at(&receiver),
    )
    .unwrap();
    let addr = rx.expect("ready ").unwrap();
    let before = counting.of_id(own_id);
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for _ in 0..250 {
        socket.send_to(&[7u8; 300], &addr).unwrap();
    }
    assert_eq!(
        rx.expect("received ").unwrap(),
        format!("250 {}", 250 * 300)
    );
    rx.wait(Duration::from_secs(10)).unwrap();
    let after = counting.of_id(own_id);

    let expected = udp(250, 300);
    assert_eq!(counting.of(&receiver).lo_rx, expected, "receiver: exact");
    // Other threads of this test binary may send too, never less than ours.
    assert!(
        after.lo_tx.bytes - before.lo_tx.bytes >= expected.bytes
            && after.lo_tx.packets - before.lo_tx.packets >= expected.packets,
        "sender cgroup {rel} ({own_id}) counted {:?} -> {:?}",
        before.lo_tx,
        after.lo_tx
    );
}
