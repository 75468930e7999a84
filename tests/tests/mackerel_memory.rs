//! The Mackerel buffer's memory through a long outage, measured: 100 pods of 2 containers
//! report an hour of simulated minutes while the API answers 503. The buffer holds at most
//! `--mackerel-buffer` values (the oldest dropped and counted), and the heap the reporter holds
//! stays within that bound at the documented bytes per value. A test binary of its own, with a
//! counting allocator, its tests one at a time: the live bytes are the reporter's.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    sync::atomic::{AtomicIsize, Ordering},
    time::{Duration, Instant, SystemTime},
};

use observer::mackerel::{
    buffer::BYTES_PER_VALUE, ApiKey, CloudMeta, ContainerMetrics, HostIdentity, HostMeta,
    HostReport, IntervalReport, MackerelConfig, MackerelReporter,
};
use serde_json::json;
use testbed::fake_mackerel::{FakeMackerel, Fault, Scope};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);
/// The tests here measure the whole process's heap: one at a time.
static ALONE: std::sync::Mutex<()> = std::sync::Mutex::new(());

// SAFETY: forwards to the system allocator, counting what is live.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller's contract, passed on unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller's contract, passed on unchanged.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: the caller's contract, passed on unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const KEY: &str = "memory-test-key-4b2c";
const PODS: usize = 100;
const MINUTES: u64 = 60;
const BOUND: usize = 50_000;
/// What the reporter holds besides its values (100 hosts' tables, the HTTP client, the
/// minute being filled), at most.
const FIXED: isize = 1 << 20;
/// Minute 0: 2026-01-01T00:00:00Z.
const T0: u64 = 1_767_225_600;

fn pod(i: usize, minute: u64) -> HostReport {
    let container = |name: &str| ContainerMetrics {
        name: name.to_string(),
        cpu_percent: Some(minute as f64),
        cpu_limit_percent: Some(100.0),
        memory_bytes: Some(1 << 20),
        memory_limit_bytes: Some(1 << 28),
        rx_bytes_per_sec: 1.0,
        tx_bytes_per_sec: 2.0,
        lo_rx_bytes_per_sec: 3.0,
        lo_tx_bytes_per_sec: 4.0,
        rx_packets_per_sec: 5.0,
        tx_packets_per_sec: 6.0,
    };
    HostReport {
        identity: HostIdentity::kubernetes(&format!("pod-{i}"), &format!("uid-{i:04}")).unwrap(),
        meta: HostMeta::observer(Some(CloudMeta::kubernetes(
            json!({"name": format!("pod-{i}")}),
        ))),
        roles_label: None,
        display_name: None,
        memo: None,
        app: Default::default(),
        containers: vec![container("app"), container("sidecar")],
    }
}

#[test]
fn an_hour_of_outage_for_a_hundred_pods_stays_within_the_buffer_bound() {
    let _alone = ALONE.lock().unwrap_or_else(|e| e.into_inner());
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(an_hour_of_outage());
}

async fn an_hour_of_outage() {
    let server = FakeMackerel::start(KEY).await;
    // Down from the start: no host is ever registered, every value waits.
    server.fail(Fault::Unavailable, Scope::all());
    let mut config = MackerelConfig::new(ApiKey::new(KEY).unwrap(), Duration::from_millis(10));
    config.api_base = server.url();
    config.max_values = BOUND;
    config.backoff_initial = Duration::from_millis(50);
    config.backoff_max = Duration::from_millis(200);
    config.request_timeout = Duration::from_millis(500);
    let reporters_before = LIVE.load(Ordering::Relaxed);
    let reporter = MackerelReporter::start(config).unwrap();
    let per_minute = PODS * 2 * 10;
    let mut peak = 0isize;
    for minute in 0..MINUTES {
        let hosts = (0..PODS).map(|i| pod(i, minute)).collect();
        reporter.report(IntervalReport {
            time: SystemTime::UNIX_EPOCH + Duration::from_secs(T0 + (minute + 1) * 60),
            interval: Duration::from_secs(60),
            complete: true,
            hosts,
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        peak = peak.max(LIVE.load(Ordering::Relaxed) - reporters_before);
        assert!(
            reporter.queue_depth() <= BOUND,
            "minute {minute}: {}",
            reporter.queue_depth()
        );
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while reporter.queue_depth() != BOUND || reporter.lost() == 0 {
        assert!(
            Instant::now() < deadline,
            "queue {} lost {}",
            reporter.queue_depth(),
            reporter.lost()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let held = LIVE.load(Ordering::Relaxed) - reporters_before;
    let offered = per_minute * MINUTES as usize;
    let budget = (BOUND * BYTES_PER_VALUE) as isize;
    eprintln!(
        "{offered} values offered, {} kept, {} dropped; heap held {:.1} MiB (peak {:.1} MiB); \
         the bound's budget {:.1} MiB ({BYTES_PER_VALUE} B x {BOUND})",
        reporter.queue_depth(),
        reporter.lost(),
        held as f64 / 1048576.0,
        peak as f64 / 1048576.0,
        budget as f64 / 1048576.0
    );
    assert_eq!(
        reporter.lost() as usize,
        offered - BOUND,
        "every drop counted"
    );
    // The host table, the client and the open minute come on top of the values' budget.
    assert!(
        peak <= budget + FIXED,
        "the reporter held {peak} bytes at its peak, more than {budget} + {FIXED}"
    );
    let _ = reporter.shutdown(Duration::from_millis(200)).await;
}

/// The buffer alone, fed the same hour: what a value costs, against the planning figure.
#[test]
fn a_buffered_value_costs_at_most_the_planning_figure() {
    let _alone = ALONE.lock().unwrap_or_else(|e| e.into_inner());
    use observer::mackerel::buffer::{Buffer, DEFAULT_MAX_AGE};
    let names: Vec<String> = (0..20)
        .map(|i| format!("container.cpu.app{i}.usage"))
        .collect();
    let before = LIVE.load(Ordering::Relaxed);
    let mut b = Buffer::new(DEFAULT_MAX_AGE, BOUND);
    for minute in 0..MINUTES as i64 {
        for pod in 0..PODS {
            let values = names.iter().map(|n| (n.clone(), 1.0));
            b.push(&format!("uid-{pod:04}.kubernetes"), minute * 60, values);
        }
    }
    let per_value = (LIVE.load(Ordering::Relaxed) - before) as f64 / b.len() as f64;
    eprintln!(
        "the buffer alone: {} values, {per_value:.1} B each",
        b.len()
    );
    assert_eq!(b.len(), BOUND);
    assert!(
        per_value <= BYTES_PER_VALUE as f64,
        "{per_value:.1} B a value, above the documented {BYTES_PER_VALUE}"
    );
}
