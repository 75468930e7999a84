//! One value per series per Mackerel interval (`--mackerel-interval`, a minute by default),
//! whatever observer's own `--interval`: mackerel-agent and the container agent post once a
//! minute, and Mackerel keeps one point per minute.
//!
//! Each interval's report goes to the period its middle falls in (so it is counted once).
//! A period closes with the report that reaches its end, or when a report of a later period
//! arrives (after a gap): bytes and packets become
//! rates over the whole period (so rate x period adds up to what was counted), CPU the
//! average over the time measured, memory and limits the latest. Values carry the period's
//! start as their time.

use std::{
    collections::BTreeMap,
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};

use super::model::{ContainerMetrics, HostReport, IntervalReport};

/// Periods of one Mackerel interval, aggregating host reports.
#[derive(Debug)]
pub struct Minutes {
    period_secs: i64,
    open: Option<Period>,
}

/// The period being filled: the hosts seen in it so far.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Period {
    /// Unix seconds, a multiple of the period.
    pub start: i64,
    pub hosts: BTreeMap<String, HostSum>,
}

/// One host over a period.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostSum {
    pub containers: BTreeMap<String, ContainerSum>,
}

/// One container over a period: totals and the latest gauges.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ContainerSum {
    /// CPU % x seconds, over the seconds CPU was known.
    cpu_weighted: f64,
    cpu_secs: f64,
    cpu_limit_percent: Option<f64>,
    memory_bytes: Option<u64>,
    memory_limit_bytes: Option<u64>,
    rx_bytes: f64,
    tx_bytes: f64,
    lo_rx_bytes: f64,
    lo_tx_bytes: f64,
    rx_packets: f64,
    tx_packets: f64,
}

/// A finished period: each host's containers as values over it, at its start.
#[derive(Debug, Clone, PartialEq)]
pub struct Closed {
    pub time: i64,
    pub hosts: Vec<(String, Vec<ContainerMetrics>)>,
}

impl ContainerSum {
    fn add(&mut self, c: &ContainerMetrics, secs: f64) {
        if let Some(cpu) = c.cpu_percent {
            self.cpu_weighted += cpu * secs;
            self.cpu_secs += secs;
        }
        // Gauges: the latest known value.
        self.cpu_limit_percent = c.cpu_limit_percent.or(self.cpu_limit_percent);
        self.memory_bytes = c.memory_bytes.or(self.memory_bytes);
        self.memory_limit_bytes = c.memory_limit_bytes.or(self.memory_limit_bytes);
        self.rx_bytes += c.rx_bytes_per_sec * secs;
        self.tx_bytes += c.tx_bytes_per_sec * secs;
        self.lo_rx_bytes += c.lo_rx_bytes_per_sec * secs;
        self.lo_tx_bytes += c.lo_tx_bytes_per_sec * secs;
        self.rx_packets += c.rx_packets_per_sec * secs;
        self.tx_packets += c.tx_packets_per_sec * secs;
    }

    fn over(&self, name: &str, period: f64) -> ContainerMetrics {
        ContainerMetrics {
            name: name.to_string(),
            cpu_percent: (self.cpu_secs > 0.0).then(|| self.cpu_weighted / self.cpu_secs),
            cpu_limit_percent: self.cpu_limit_percent,
            memory_bytes: self.memory_bytes,
            memory_limit_bytes: self.memory_limit_bytes,
            rx_bytes_per_sec: self.rx_bytes / period,
            tx_bytes_per_sec: self.tx_bytes / period,
            lo_rx_bytes_per_sec: self.lo_rx_bytes / period,
            lo_tx_bytes_per_sec: self.lo_tx_bytes / period,
            rx_packets_per_sec: self.rx_packets / period,
            tx_packets_per_sec: self.tx_packets / period,
        }
    }
}

impl Minutes {
    /// Periods of `period` (whole seconds, at least one).
    pub fn new(period: Duration) -> Self {
        Self {
            period_secs: i64::try_from(period.as_secs().max(1)).unwrap_or(i64::MAX),
            open: None,
        }
    }

    /// Adds one interval; returns the periods that ended: an earlier one a gap left open,
    /// and this one if the interval reaches its end.
    pub fn add(&mut self, report: &IntervalReport) -> Vec<Closed> {
        let secs = report.interval.as_secs_f64();
        let end = unix_seconds(report.time);
        let middle = end - (report.interval / 2).as_secs() as i64;
        let start = period_start(middle, self.period_secs);
        let mut closed = Vec::new();
        match &self.open {
            // A clock stepped back: keep adding to the open period rather than post a period
            // twice.
            Some(open) if open.start >= start => {}
            Some(_) => closed.extend(self.close()),
            None => {}
        }
        let open = self.open.get_or_insert_with(|| Period {
            start,
            hosts: BTreeMap::new(),
        });
        for host in &report.hosts {
            open.add(host, secs);
        }
        if end >= open.start.saturating_add(self.period_secs) {
            closed.extend(self.close());
        }
        closed
    }

    /// Ends the open period now.
    pub fn close(&mut self) -> Option<Closed> {
        let closed = self.peek();
        self.open = None;
        closed
    }

    /// The open period's values as they stand, the period staying open: at shutdown they are
    /// posted, and a restarted observer goes on filling the period and posts it whole (the
    /// same timestamp: Mackerel keeps the later value).
    pub fn peek(&self) -> Option<Closed> {
        let open = self.open.as_ref()?;
        let period = self.period_secs as f64;
        Some(Closed {
            time: open.start,
            hosts: open
                .hosts
                .iter()
                .map(|(key, h)| {
                    let containers = h
                        .containers
                        .iter()
                        .map(|(name, c)| c.over(name, period))
                        .collect();
                    (key.clone(), containers)
                })
                .collect(),
        })
    }

    /// Whether the open period holds values of this host (not yet in the buffer).
    pub fn has(&self, key: &str) -> bool {
        self.open
            .as_ref()
            .is_some_and(|o| o.hosts.contains_key(key))
    }

    /// Forgets a host's part of the open period (it was retired).
    pub fn forget(&mut self, key: &str) {
        if let Some(open) = &mut self.open {
            open.hosts.remove(key);
        }
    }

    /// The open period, for the state file.
    pub fn open(&self) -> Option<&Period> {
        self.open.as_ref()
    }

    /// Continues a period an earlier run saved; one of another period length is closed at
    /// once and returned.
    pub fn restore(&mut self, period: Period) -> Option<Closed> {
        self.open = Some(period);
        let aligned = self
            .open
            .as_ref()
            .is_some_and(|o| o.start.rem_euclid(self.period_secs) == 0);
        if aligned {
            None
        } else {
            self.close()
        }
    }
}

impl Period {
    fn add(&mut self, host: &HostReport, secs: f64) {
        let sum = self
            .hosts
            .entry(host.identity.custom_identifier.clone())
            .or_insert_with(|| HostSum {
                containers: BTreeMap::new(),
            });
        for c in &host.containers {
            sum.containers
                .entry(c.name.clone())
                .or_default()
                .add(c, secs);
        }
    }
}

/// The start of the period of `period_secs` that the Unix second `unix` falls in: what every
/// Mackerel value of that period is stamped with.
pub fn period_start(unix: i64, period_secs: i64) -> i64 {
    let p = period_secs.max(1);
    unix.div_euclid(p) * p
}

/// Unix seconds (0 before the epoch).
pub fn unix_seconds(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mackerel::model::{HostIdentity, HostMeta};

    const MINUTE: Duration = Duration::from_secs(60);
    /// A whole minute: 30,000,000 x 60 s.
    const T0: u64 = 1_800_000_000;

    fn host(pod: &str, rx_per_sec: f64, cpu: Option<f64>, memory: u64) -> HostReport {
        HostReport {
            identity: HostIdentity::kubernetes(pod, pod).unwrap(),
            meta: HostMeta::observer(None),
            roles_label: None,
            display_name: None,
            memo: None,
            app: Default::default(),
            containers: vec![ContainerMetrics {
                name: "app".into(),
                cpu_percent: cpu,
                memory_bytes: Some(memory),
                rx_bytes_per_sec: rx_per_sec,
                ..Default::default()
            }],
        }
    }

    fn report(end: u64, secs: u64, hosts: Vec<HostReport>) -> IntervalReport {
        IntervalReport {
            time: SystemTime::UNIX_EPOCH + Duration::from_secs(end),
            interval: Duration::from_secs(secs),
            complete: true,
            hosts,
        }
    }

    #[test]
    fn a_minute_of_intervals_becomes_one_value_each() {
        let mut m = Minutes::new(MINUTE);
        let t0 = T0;
        // Twelve 5 s intervals of the minute t0: 100 B/s, then 300 B/s; CPU 10 then 30.
        for i in 1..=11u64 {
            let (rx, cpu) = if i <= 6 { (100.0, 10.0) } else { (300.0, 30.0) };
            let r = report(t0 + i * 5, 5, vec![host("a", rx, Some(cpu), i * 1000)]);
            assert_eq!(m.add(&r), [], "interval {i} is within the minute");
        }
        assert!(m.has("a.kubernetes"));
        // The interval that reaches the minute's end closes it.
        let closed = m
            .add(&report(
                t0 + 60,
                5,
                vec![host("a", 300.0, Some(30.0), 12_000)],
            ))
            .remove(0);
        assert!(!m.has("a.kubernetes"));
        assert_eq!(closed.time as u64, t0);
        let (key, containers) = &closed.hosts[0];
        assert_eq!(key, "a.kubernetes");
        let c = &containers[0];
        // 6 x 5 x 100 + 6 x 5 x 300 = 12,000 bytes over 60 s.
        assert_eq!(c.rx_bytes_per_sec, 200.0);
        assert_eq!(c.cpu_percent, Some(20.0));
        assert_eq!(c.memory_bytes, Some(12_000), "memory is the latest");
    }

    #[test]
    fn rates_are_over_the_whole_period_so_a_partial_one_adds_up() {
        let mut m = Minutes::new(MINUTE);
        let t0 = T0;
        // Started 20 s into the minute: 40 s at 600 B/s = 24,000 bytes.
        let mut closed = Vec::new();
        for i in 1..=4u64 {
            closed = m.add(&report(
                t0 + 20 + i * 10,
                10,
                vec![host("a", 600.0, None, 1)],
            ));
        }
        let c = closed.remove(0).hosts[0].1[0].clone();
        assert_eq!(c.rx_bytes_per_sec * 60.0, 24_000.0);
        assert_eq!(c.cpu_percent, None, "CPU never known: not posted");
        assert!(m.close().is_none());
    }

    #[test]
    fn an_interval_counts_in_the_period_of_its_middle() {
        let mut m = Minutes::new(MINUTE);
        let t0 = T0;
        m.add(&report(t0 + 50, 10, vec![host("a", 1.0, None, 1)]));
        // Ends 4 s into the next minute but mostly covers this one: counted in it, and it
        // closes the minute.
        let closed = m
            .add(&report(t0 + 64, 14, vec![host("a", 1.0, None, 1)]))
            .remove(0);
        assert_eq!(closed.time as u64, t0);
        assert_eq!(closed.hosts[0].1[0].rx_bytes_per_sec * 60.0, 24.0);
        assert!(m.open().is_none());
    }

    #[test]
    fn a_host_seen_only_part_of_the_period_still_closes_with_it() {
        let mut m = Minutes::new(MINUTE);
        let t0 = T0;
        m.add(&report(t0 + 10, 10, vec![host("a", 1.0, None, 1)]));
        m.add(&report(t0 + 20, 10, vec![host("b", 1.0, None, 1)]));
        // A gap: the next report is of the minute after; the open one closes first.
        let closed = m.add(&report(t0 + 70, 10, vec![])).remove(0);
        let keys: Vec<_> = closed.hosts.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["a.kubernetes", "b.kubernetes"]);
        assert!(!m.has("a.kubernetes"));
    }

    #[test]
    fn a_saved_period_continues_after_a_restart() {
        let t0 = T0;
        let mut before = Minutes::new(MINUTE);
        before.add(&report(t0 + 10, 10, vec![host("a", 100.0, None, 1)]));
        let saved = before.open().cloned().unwrap();
        let json = serde_json::to_string(&saved).unwrap();
        let mut after = Minutes::new(MINUTE);
        assert_eq!(after.restore(serde_json::from_str(&json).unwrap()), None);
        assert_eq!(after.peek().unwrap().time as u64, t0);
        after.add(&report(t0 + 30, 20, vec![host("a", 100.0, None, 1)]));
        let c = after.close().unwrap().hosts[0].1[0].clone();
        assert_eq!(c.rx_bytes_per_sec * 60.0, 3000.0);
        // Saved by a run with another period: closed at once, not mixed.
        let mut other = Minutes::new(Duration::from_secs(7));
        let mut odd = saved;
        odd.start += 1;
        assert!(other.restore(odd).is_some());
    }

    #[test]
    fn a_clock_step_back_does_not_post_a_period_twice() {
        let mut m = Minutes::new(MINUTE);
        let t0 = T0;
        m.add(&report(t0 + 70, 10, vec![host("a", 1.0, None, 1)]));
        assert_eq!(
            m.add(&report(t0 + 10, 10, vec![host("a", 1.0, None, 1)])),
            []
        );
        assert_eq!(m.close().unwrap().time as u64, t0 + 60);
    }
}
