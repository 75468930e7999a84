//! The answers of /healthz (liveness) and /readyz (readiness), for the DaemonSet's probes.
//!
//! Alive: the interval loop still runs, so the latest cycle (or, before the first one, the
//! start) is at most [`STALE_AFTER_INTERVALS`] intervals old. Ready: the kernel programs are
//! attached and at least one cycle is done, so /metrics has something to say.

use std::time::{Duration, Instant};

use super::state::Own;

/// A loop whose latest cycle is older than this many intervals is taken for stuck.
pub const STALE_AFTER_INTERVALS: u32 = 3;

/// A probe's verdict: healthy or not, and a sentence for whoever reads the probe's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub ok: bool,
    pub message: String,
}

impl Verdict {
    fn ok(message: String) -> Self {
        Self { ok: true, message }
    }

    fn failing(message: String) -> Self {
        Self { ok: false, message }
    }
}

fn secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

/// /healthz: is the interval loop alive at `now`?
pub fn liveness(own: &Own, started: Instant, interval: Duration, now: Instant) -> Verdict {
    let limit = interval * STALE_AFTER_INTERVALS;
    match own.last_cycle_at {
        Some(at) => {
            let age = now.saturating_duration_since(at);
            if age <= limit {
                Verdict::ok(format!(
                    "ok: last cycle {} ago (interval {})",
                    secs(age),
                    secs(interval)
                ))
            } else {
                Verdict::failing(format!(
                    "stuck: last cycle {} ago, more than {STALE_AFTER_INTERVALS} intervals ({})",
                    secs(age),
                    secs(limit)
                ))
            }
        }
        None => {
            let age = now.saturating_duration_since(started);
            if age <= limit {
                Verdict::ok(format!(
                    "ok: starting, no cycle yet ({} since start)",
                    secs(age)
                ))
            } else {
                Verdict::failing(format!(
                    "stuck: no cycle in {} since start, more than {STALE_AFTER_INTERVALS} intervals ({})",
                    secs(age),
                    secs(limit)
                ))
            }
        }
    }
}

/// /readyz: are programs attached and has a cycle been measured?
pub fn readiness(own: &Own) -> Verdict {
    match (own.programs_attached, own.cycles) {
        (0, _) => Verdict::failing("not ready: no kernel programs attached".into()),
        (_, 0) => Verdict::failing(format!(
            "not ready: {} programs attached, waiting for the first cycle",
            own.programs_attached
        )),
        (programs, cycles) => Verdict::ok(format!(
            "ready: {programs} programs attached, {cycles} cycles done"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const I: Duration = Duration::from_secs(10);

    #[test]
    fn alive_while_cycles_keep_coming() {
        let t0 = Instant::now();
        let mut own = Own::default();
        assert!(liveness(&own, t0, I, t0 + Duration::from_secs(5)).ok);
        assert!(liveness(&own, t0, I, t0 + Duration::from_secs(30)).ok);
        let v = liveness(&own, t0, I, t0 + Duration::from_secs(31));
        assert!(!v.ok);
        assert!(v.message.contains("no cycle in 31.0s"), "{}", v.message);

        own.last_cycle_at = Some(t0 + Duration::from_secs(40));
        let v = liveness(&own, t0, I, t0 + Duration::from_secs(45));
        assert_eq!(
            v,
            Verdict::ok("ok: last cycle 5.0s ago (interval 10.0s)".into())
        );
        assert!(liveness(&own, t0, I, t0 + Duration::from_secs(70)).ok);
        let v = liveness(&own, t0, I, t0 + Duration::from_secs(71));
        assert_eq!(
            v,
            Verdict::failing("stuck: last cycle 31.0s ago, more than 3 intervals (30.0s)".into())
        );
    }

    #[test]
    fn ready_once_attached_and_measured() {
        let mut own = Own::default();
        assert_eq!(
            readiness(&own).message,
            "not ready: no kernel programs attached"
        );
        own.cycles = 1;
        assert!(
            !readiness(&own).ok,
            "a cycle without programs measures nothing"
        );
        own.programs_attached = 2;
        own.cycles = 0;
        assert_eq!(
            readiness(&own).message,
            "not ready: 2 programs attached, waiting for the first cycle"
        );
        own.cycles = 4;
        assert_eq!(
            readiness(&own),
            Verdict::ok("ready: 2 programs attached, 4 cycles done".into())
        );
    }
}
