//! JSON lines: one object per cgroup per interval, then one object about observer itself.
//!
//! Schema (docs/output.md has the full description):
//! `{"type":"cgroup","time":"2026-11-23T08:00:00.000Z","interval_seconds":5.0,"cgroup_id":1234,
//!   "cgroup_path":"/docker/<id>","rx_bytes":..,"rx_packets":..,"tx_bytes":..,"tx_packets":..,
//!   "lo_rx_bytes":..,"lo_rx_packets":..,"lo_tx_bytes":..,"lo_tx_packets":..,
//!   "rx_bytes_per_second":..,"tx_bytes_per_second":..,"lo_rx_bytes_per_second":..,
//!   "lo_tx_bytes_per_second":..,"rx_packets_per_second":..,"tx_packets_per_second":..,
//!   "lo_rx_packets_per_second":..,"lo_tx_packets_per_second":..}`
//! `{"type":"observer","time":..,"interval_seconds":..,"cgroups":..,"map_entries":..,
//!   "map_capacity":..,"map_full_drops":..}`

use std::io::Write;

use serde::Serialize;

use super::{Sink, SinkError};
use crate::snapshot::{per_second, CgroupTraffic, Snapshot};

pub struct JsonSink<W: Write + Send> {
    out: W,
}

impl<W: Write + Send> JsonSink<W> {
    pub fn new(out: W) -> Self {
        Self { out }
    }

    pub fn into_inner(self) -> W {
        self.out
    }
}

#[derive(Serialize)]
struct CgroupLine<'a> {
    r#type: &'static str,
    time: &'a str,
    interval_seconds: f64,
    cgroup_id: u64,
    cgroup_path: Option<&'a str>,
    rx_bytes: u64,
    rx_packets: u64,
    tx_bytes: u64,
    tx_packets: u64,
    lo_rx_bytes: u64,
    lo_rx_packets: u64,
    lo_tx_bytes: u64,
    lo_tx_packets: u64,
    rx_bytes_per_second: f64,
    tx_bytes_per_second: f64,
    lo_rx_bytes_per_second: f64,
    lo_tx_bytes_per_second: f64,
    rx_packets_per_second: f64,
    tx_packets_per_second: f64,
    lo_rx_packets_per_second: f64,
    lo_tx_packets_per_second: f64,
}

#[derive(Serialize)]
struct ObserverLine<'a> {
    r#type: &'static str,
    time: &'a str,
    interval_seconds: f64,
    cgroups: usize,
    map_entries: usize,
    map_capacity: u32,
    map_full_drops: u64,
}

impl<'a> CgroupLine<'a> {
    fn new(time: &'a str, snapshot: &Snapshot, c: &'a CgroupTraffic) -> Self {
        let rate = |n| per_second(n, snapshot.interval);
        let d = &c.delta;
        Self {
            r#type: "cgroup",
            time,
            interval_seconds: snapshot.interval.as_secs_f64(),
            cgroup_id: c.cgroup_id,
            cgroup_path: c.path.as_deref(),
            rx_bytes: d.rx.bytes,
            rx_packets: d.rx.packets,
            tx_bytes: d.tx.bytes,
            tx_packets: d.tx.packets,
            lo_rx_bytes: d.lo_rx.bytes,
            lo_rx_packets: d.lo_rx.packets,
            lo_tx_bytes: d.lo_tx.bytes,
            lo_tx_packets: d.lo_tx.packets,
            rx_bytes_per_second: rate(d.rx.bytes),
            tx_bytes_per_second: rate(d.tx.bytes),
            lo_rx_bytes_per_second: rate(d.lo_rx.bytes),
            lo_tx_bytes_per_second: rate(d.lo_tx.bytes),
            rx_packets_per_second: rate(d.rx.packets),
            tx_packets_per_second: rate(d.tx.packets),
            lo_rx_packets_per_second: rate(d.lo_rx.packets),
            lo_tx_packets_per_second: rate(d.lo_tx.packets),
        }
    }
}

impl<W: Write + Send> Sink for JsonSink<W> {
    fn name(&self) -> &'static str {
        "json"
    }

    fn emit(&mut self, snapshot: &Snapshot) -> Result<(), SinkError> {
        let time = humantime::format_rfc3339_millis(snapshot.time).to_string();
        for c in &snapshot.cgroups {
            serde_json::to_writer(&mut self.out, &CgroupLine::new(&time, snapshot, c))?;
            self.out.write_all(b"\n")?;
        }
        let h = &snapshot.health;
        serde_json::to_writer(
            &mut self.out,
            &ObserverLine {
                r#type: "observer",
                time: &time,
                interval_seconds: snapshot.interval.as_secs_f64(),
                cgroups: snapshot.cgroups.len(),
                map_entries: h.map_entries,
                map_capacity: h.map_capacity,
                map_full_drops: h.map_full_drops,
            },
        )?;
        self.out.write_all(b"\n")?;
        self.out.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use observer_common::{Counter, TrafficValue};
    use serde_json::Value;

    use super::*;
    use crate::snapshot::Health;

    #[test]
    fn one_line_per_cgroup_then_one_for_observer() {
        let snapshot = Snapshot {
            time: UNIX_EPOCH + Duration::from_secs(1_795_000_000),
            interval: Duration::from_secs(2),
            cgroups: vec![CgroupTraffic {
                cgroup_id: 42,
                path: Some("/docker/abc".into()),
                delta: TrafficValue {
                    tx: Counter {
                        bytes: 1280,
                        packets: 10,
                    },
                    lo_rx: Counter {
                        bytes: 64,
                        packets: 1,
                    },
                    ..Default::default()
                },
            }],
            health: Health {
                map_entries: 3,
                map_capacity: 16384,
                map_full_drops: 0,
            },
        };
        let mut sink = JsonSink::new(Vec::new());
        sink.emit(&snapshot).unwrap();
        let text = String::from_utf8(sink.into_inner()).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        let c = &lines[0];
        assert_eq!(c["type"], "cgroup");
        assert_eq!(c["time"], "2026-11-18T11:06:40.000Z");
        assert_eq!(c["cgroup_id"], 42);
        assert_eq!(c["cgroup_path"], "/docker/abc");
        assert_eq!(c["tx_bytes"], 1280);
        assert_eq!(c["tx_packets"], 10);
        assert_eq!(c["tx_bytes_per_second"], 640.0);
        assert_eq!(c["lo_rx_bytes"], 64);
        assert_eq!(c["lo_rx_packets_per_second"], 0.5);
        assert_eq!(c["rx_bytes"], 0);
        assert_eq!(c["interval_seconds"], 2.0);
        let o = &lines[1];
        assert_eq!(o["type"], "observer");
        assert_eq!(o["cgroups"], 1);
        assert_eq!(o["map_capacity"], 16384);
        assert_eq!(o["map_full_drops"], 0);
    }
}
