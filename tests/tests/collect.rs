//! One interval after another through the collector, with cgroups that come and go.

use observer::{
    cgroupfs::CgroupIndex,
    collect::{Collected, Collector},
    programs::Programs,
    traffic::TrafficReader,
};
use observer_common::TrafficValue;
use testbed::{
    skip_unless_root,
    traffic::{at, udp, udp_exchange},
    TestCgroup,
};

fn collector() -> (Programs, Collector) {
    let root = testbed::v2_root();
    let mut programs = Programs::load_observer(4096).unwrap();
    let reader = TrafficReader::new(programs.ebpf_mut()).unwrap();
    programs.attach(&root).unwrap();
    (
        programs,
        Collector::new(reader, CgroupIndex::scan(&root).unwrap()),
    )
}

fn find(collected: &Collected, id: u64) -> Option<&observer::snapshot::CgroupTraffic> {
    collected.cgroups.iter().find(|c| c.cgroup_id == id)
}

fn lo_tx(n: u64, payload: u64) -> TrafficValue {
    TrafficValue {
        lo_tx: udp(n, payload),
        ..Default::default()
    }
}

/// The walk lists only directories that have subdirectories (by their link count) and stats
/// the rest: every cgroup is still found at any depth, a child made in what was a leaf at the
/// last walk is found by the next, and a removed one is gone.
#[test]
fn the_walk_finds_cgroups_at_every_depth_and_children_of_former_leaves() {
    if skip_unless_root("the_walk_finds_cgroups_at_every_depth_and_children_of_former_leaves") {
        return;
    }
    let root = testbed::v2_root();
    let top = TestCgroup::new("walk").unwrap();
    let a = TestCgroup::under(top.path(), "a").unwrap();
    let b = TestCgroup::under(a.path(), "b").unwrap();
    let c = TestCgroup::under(b.path(), "c").unwrap();
    let leaf = TestCgroup::under(top.path(), "leaf").unwrap();
    let rel = |cg: &TestCgroup| {
        let rel = cg.path().strip_prefix(&root).unwrap();
        format!("/{}", rel.display())
    };
    let mut index = CgroupIndex::scan(&root).unwrap();
    for cg in [&top, &a, &b, &c, &leaf] {
        assert_eq!(index.path(cg.id()), Some(rel(cg).as_str()));
    }

    let child = TestCgroup::under(leaf.path(), "child").unwrap();
    let grandchild = TestCgroup::under(child.path(), "grandchild").unwrap();
    index.rescan().unwrap();
    assert_eq!(index.path(child.id()), Some(rel(&child).as_str()));
    assert_eq!(index.path(grandchild.id()), Some(rel(&grandchild).as_str()));

    c.remove().unwrap();
    index.rescan().unwrap();
    assert_eq!(index.path(c.id()), None, "removed");
    assert_eq!(index.path(b.id()), Some(rel(&b).as_str()), "a leaf again");
}

#[test]
fn a_cgroup_made_mid_interval_starts_from_its_first_packet() {
    if skip_unless_root("a_cgroup_made_mid_interval_starts_from_its_first_packet") {
        return;
    }
    let (_programs, mut collector) = collector();
    collector.collect().unwrap();
    // Made after the collector's walk of the hierarchy: found by the re-walk an unknown id asks for.
    let (sender, sink) = (
        TestCgroup::new("mid-tx").unwrap(),
        TestCgroup::new("mid-rx").unwrap(),
    );
    udp_exchange(at(&sender), at(&sink), "127.0.0.1:0", 100, 50);
    let first = collector.collect().unwrap();
    let c = find(&first, sender.id()).expect("reported");
    assert_eq!(c.path.as_deref(), Some(sender.rel()));
    assert_eq!(c.delta, lo_tx(100, 50));

    udp_exchange(at(&sender), at(&sink), "127.0.0.1:0", 30, 50);
    let second = collector.collect().unwrap();
    assert_eq!(
        find(&second, sender.id()).unwrap().delta,
        lo_tx(30, 50),
        "only the new traffic"
    );
    let third = collector.collect().unwrap();
    assert_eq!(
        find(&third, sender.id()).unwrap().delta,
        TrafficValue::default()
    );
}

#[test]
fn a_cgroup_removed_between_reads_loses_nothing_and_is_then_freed() {
    if skip_unless_root("a_cgroup_removed_between_reads_loses_nothing_and_is_then_freed") {
        return;
    }
    let (_programs, mut collector) = collector();
    let sink = TestCgroup::new("gone-rx").unwrap();

    // Seen once, then traffic, then removed before the next read: reported under its old name.
    let seen = TestCgroup::new("gone-seen").unwrap();
    udp_exchange(at(&seen), at(&sink), "127.0.0.1:0", 10, 20);
    collector.collect().unwrap();
    udp_exchange(at(&seen), at(&sink), "127.0.0.1:0", 70, 20);
    let (seen_id, seen_rel) = (seen.id(), seen.rel().to_owned());
    drop(seen);

    // Made, used and removed within one interval: never seen by name, still counted.
    let brief = TestCgroup::new("gone-brief").unwrap();
    udp_exchange(at(&brief), at(&sink), "127.0.0.1:0", 40, 20);
    let brief_id = brief.id();
    drop(brief);

    let last = collector.collect().unwrap();
    let s = find(&last, seen_id).expect("final counts of a removed cgroup");
    assert_eq!(s.delta, lo_tx(70, 20));
    assert_eq!(s.path.as_deref(), Some(seen_rel.as_str()));
    let b = find(&last, brief_id).expect("counts of a cgroup that lived within one interval");
    assert_eq!(b.delta, lo_tx(40, 20));
    assert_eq!(b.path, None);

    // Nothing new: both are gone with nothing left to report, so their entries are freed.
    let after = collector.collect().unwrap();
    assert!(find(&after, seen_id).is_none() && find(&after, brief_id).is_none());
    let entries = collector.reader_mut().read().unwrap().entries;
    assert!(
        !entries
            .iter()
            .any(|(k, _)| k.cgroup_id == seen_id || k.cgroup_id == brief_id),
        "entries of removed cgroups were freed"
    );
}
