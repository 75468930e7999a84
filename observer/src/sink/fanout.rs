//! Hands each snapshot to every sink without waiting for any of them.
//!
//! Each sink gets a thread and a bounded queue. A snapshot that finds a sink's queue full is
//! dropped for that sink alone and counted ([`SinkStatus::dropped`], exported as
//! `observer_sink_dropped_total{sink}`): the interval, the probes and the other sinks go on. A
//! sink whose output is gone for good (EPIPE) says so once and ends; when every sink has ended,
//! [`Fanout::all_ended`] tells the run loop there is no one left to measure for.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc::{self, SyncSender, TrySendError},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use tokio::sync::Notify;

use super::Sink;
use crate::snapshot::{SinkStatus, Snapshot};

/// Snapshots a sink may have waiting. Two: one being delivered, one more; a sink slower than
/// that for long drops intervals rather than memory.
pub const QUEUE: usize = 2;

/// What a lane's thread shares with the fan-out.
#[derive(Debug, Default)]
struct Shared {
    dropped: AtomicU64,
    /// `u64::MAX` while the sink has not said.
    backlog: AtomicU64,
    /// `u64::MAX` while the sink has not said.
    lost: AtomicU64,
    ended: AtomicBool,
    /// Set when shutting down: flush by then.
    deadline: Mutex<Option<Instant>>,
}

struct Lane {
    name: &'static str,
    tx: Option<SyncSender<Arc<Snapshot>>>,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    /// A full queue was logged; cleared once a snapshot gets through again.
    full_logged: bool,
}

pub struct Fanout {
    lanes: Vec<Lane>,
    ended: Arc<Notify>,
}

impl Fanout {
    /// Starts a thread per sink.
    pub fn start(sinks: Vec<Box<dyn Sink>>) -> std::io::Result<Self> {
        let ended = Arc::new(Notify::new());
        let mut lanes = Vec::with_capacity(sinks.len());
        for sink in sinks {
            let name = sink.name();
            let (tx, rx) = mpsc::sync_channel::<Arc<Snapshot>>(QUEUE);
            let shared = Arc::new(Shared {
                backlog: AtomicU64::new(u64::MAX),
                lost: AtomicU64::new(u64::MAX),
                ..Shared::default()
            });
            let thread = std::thread::Builder::new()
                .name(format!("sink-{name}"))
                .spawn({
                    let shared = shared.clone();
                    let ended = ended.clone();
                    move || deliver(sink, rx, &shared, &ended)
                })?;
            lanes.push(Lane {
                name,
                tx: Some(tx),
                shared,
                thread: Some(thread),
                full_logged: false,
            });
        }
        Ok(Self { lanes, ended })
    }

    /// Queues `snapshot` for every sink that is still running; never blocks.
    pub fn send(&mut self, snapshot: Snapshot) {
        let snapshot = Arc::new(snapshot);
        for lane in &mut self.lanes {
            let Some(tx) = &lane.tx else { continue };
            match tx.try_send(snapshot.clone()) {
                Ok(()) => lane.full_logged = false,
                Err(TrySendError::Full(_)) => {
                    lane.shared.dropped.fetch_add(1, Ordering::Relaxed);
                    if !lane.full_logged {
                        log::warn!(
                            "{} output is not keeping up (still delivering earlier intervals): \
                             dropping its intervals until it catches up (counted in \
                             observer_sink_dropped_total)",
                            lane.name
                        );
                        lane.full_logged = true;
                    }
                }
                Err(TrySendError::Disconnected(_)) => lane.tx = None,
            }
        }
    }

    /// How every sink stands now.
    pub fn status(&self) -> Vec<SinkStatus> {
        self.lanes
            .iter()
            .map(|lane| {
                let said = |v: &AtomicU64| {
                    let v = v.load(Ordering::Relaxed);
                    (v != u64::MAX).then_some(v)
                };
                SinkStatus {
                    name: lane.name,
                    dropped: lane.shared.dropped.load(Ordering::Relaxed),
                    backlog: said(&lane.shared.backlog),
                    lost: said(&lane.shared.lost),
                    ended: lane.shared.ended.load(Ordering::Relaxed),
                }
            })
            .collect()
    }

    /// True when there were sinks and none of them runs any more.
    pub fn all_ended(&self) -> bool {
        !self.lanes.is_empty()
            && self
                .lanes
                .iter()
                .all(|lane| lane.shared.ended.load(Ordering::Relaxed))
    }

    /// Resolves when some sink ends; check [`Fanout::all_ended`] then.
    pub async fn an_end(&self) {
        self.ended.notified().await
    }

    /// Lets every sink deliver what it has queued and flush, all within `timeout`; a sink still
    /// busy then is left behind (its thread ends with the process) and named in the log.
    pub async fn close(mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        for lane in &mut self.lanes {
            *lane
                .shared
                .deadline
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Some(deadline);
            // Dropping the sender ends the thread's queue once it is drained.
            lane.tx = None;
        }
        for lane in &mut self.lanes {
            let Some(thread) = lane.thread.take() else {
                continue;
            };
            while !thread.is_finished() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if thread.is_finished() {
                let _ = thread.join();
            } else {
                log::warn!(
                    "{} output did not finish delivering within {timeout:?}; leaving it",
                    lane.name
                );
            }
        }
    }
}

/// A sink's thread: emit every snapshot in order until the queue closes, then flush.
fn deliver(
    mut sink: Box<dyn Sink>,
    rx: mpsc::Receiver<Arc<Snapshot>>,
    shared: &Shared,
    ended: &Notify,
) {
    let name = sink.name();
    let mut last_error: Option<String> = None;
    while let Ok(snapshot) = rx.recv() {
        match sink.emit(&snapshot) {
            Ok(()) => last_error = None,
            Err(e) if e.is_closed() => {
                log::info!("{name} output: its reader is gone ({e}); no more {name} output");
                shared.ended.store(true, Ordering::Relaxed);
                ended.notify_one();
                return;
            }
            Err(e) => {
                // The same failure every interval is one line, not one per interval.
                let message = e.to_string();
                if last_error.as_deref() != Some(&message) {
                    log::error!("{name} output: {message}");
                }
                last_error = Some(message);
            }
        }
        shared
            .backlog
            .store(sink.backlog().unwrap_or(u64::MAX), Ordering::Relaxed);
        shared
            .lost
            .store(sink.lost().unwrap_or(u64::MAX), Ordering::Relaxed);
    }
    let deadline = *shared.deadline.lock().unwrap_or_else(|e| e.into_inner());
    let left = deadline.map_or(Duration::ZERO, |d| {
        d.saturating_duration_since(Instant::now())
    });
    if let Err(e) = sink.flush(left) {
        log::warn!("{name} output: flushing at shutdown: {e}");
    }
    shared.ended.store(true, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc::Receiver;

    use super::*;
    use crate::{sink::SinkError, snapshot::Health};

    fn snapshot() -> Snapshot {
        Snapshot {
            time: std::time::SystemTime::now(),
            interval: Duration::from_secs(1),
            cgroups: Vec::new(),
            workloads: Vec::new(),
            held: Vec::new(),
            host: Default::default(),
            platform: None,
            health: Health::default(),
        }
    }

    /// Emits by waiting for a go from the test; counts what it got.
    struct Gated {
        go: Mutex<Receiver<()>>,
        /// Snapshots it started on (before waiting for the gate).
        entered: Arc<AtomicU64>,
        got: Arc<AtomicU64>,
        flushed: Arc<AtomicBool>,
    }

    /// Waits for `done`, at most 5 s: for a sink thread to get to its work, however loaded
    /// the machine (a bound on liveness, not a measure of speed).
    async fn until(what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !done() {
            assert!(Instant::now() < deadline, "never: {what}");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    impl Sink for Gated {
        fn name(&self) -> &'static str {
            "gated"
        }
        fn emit(&mut self, _: &Snapshot) -> Result<(), SinkError> {
            self.entered.fetch_add(1, Ordering::Relaxed);
            let _ = self.go.lock().unwrap().recv();
            self.got.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
        fn flush(&mut self, _: Duration) -> Result<(), SinkError> {
            self.flushed.store(true, Ordering::Relaxed);
            Ok(())
        }
    }

    struct Closed;

    impl Sink for Closed {
        fn name(&self) -> &'static str {
            "closed"
        }
        fn emit(&mut self, _: &Snapshot) -> Result<(), SinkError> {
            Err(std::io::Error::from(std::io::ErrorKind::BrokenPipe).into())
        }
    }

    #[tokio::test]
    async fn a_stuck_sink_drops_and_counts_while_others_receive() {
        let (go, gate) = mpsc::channel();
        let got = Arc::new(AtomicU64::new(0));
        let flushed = Arc::new(AtomicBool::new(false));
        let entered = Arc::new(AtomicU64::new(0));
        let stuck = Gated {
            go: Mutex::new(gate),
            entered: entered.clone(),
            got: got.clone(),
            flushed: flushed.clone(),
        };
        let (go2, gate2) = mpsc::channel();
        let got2 = Arc::new(AtomicU64::new(0));
        let free = Gated {
            go: Mutex::new(gate2),
            entered: Arc::new(AtomicU64::new(0)),
            got: got2.clone(),
            flushed: Arc::new(AtomicBool::new(false)),
        };
        for _ in 0..10 {
            go2.send(()).unwrap();
        }
        let mut fanout = Fanout::start(vec![Box::new(stuck), Box::new(free)]).unwrap();
        for i in 1..=10 {
            // Never blocks, although the first sink takes nothing.
            fanout.send(snapshot());
            // The free sink has each one before the next (so its queue never fills); the
            // stuck one holds the first.
            until("the free sink took it", || {
                got2.load(Ordering::Relaxed) == i
            })
            .await;
            until("the stuck sink holds the first", || {
                entered.load(Ordering::Relaxed) == 1
            })
            .await;
        }
        let status = fanout.status();
        // One in delivery, QUEUE waiting, the rest dropped.
        assert_eq!(status[0].dropped, 10 - 1 - QUEUE as u64, "{status:?}");
        assert_eq!(status[1].dropped, 0, "{status:?}");
        assert_eq!(got2.load(Ordering::Relaxed), 10);
        for _ in 0..10 {
            go.send(()).unwrap();
        }
        fanout.close(Duration::from_secs(5)).await;
        assert_eq!(got.load(Ordering::Relaxed), 1 + QUEUE as u64);
        assert!(flushed.load(Ordering::Relaxed), "flushed at close");
    }

    #[tokio::test]
    async fn a_closed_output_ends_its_sink_once() {
        let mut fanout = Fanout::start(vec![Box::new(Closed)]).unwrap();
        assert!(!fanout.all_ended());
        fanout.send(snapshot());
        tokio::time::timeout(Duration::from_secs(5), fanout.an_end())
            .await
            .expect("the end is announced");
        assert!(fanout.all_ended());
        // Later snapshots go nowhere and do not count as drops.
        fanout.send(snapshot());
        fanout.send(snapshot());
        assert_eq!(fanout.status()[0].dropped, 0);
        assert!(fanout.status()[0].ended);
        fanout.close(Duration::from_secs(1)).await;
    }

    #[tokio::test]
    async fn a_sink_stuck_at_close_is_left_behind_in_time() {
        let (_go, gate) = mpsc::channel::<()>();
        let stuck = Gated {
            go: Mutex::new(gate),
            entered: Arc::new(AtomicU64::new(0)),
            got: Arc::new(AtomicU64::new(0)),
            flushed: Arc::new(AtomicBool::new(false)),
        };
        let mut fanout = Fanout::start(vec![Box::new(stuck)]).unwrap();
        fanout.send(snapshot());
        let started = Instant::now();
        fanout.close(Duration::from_millis(300)).await;
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}
