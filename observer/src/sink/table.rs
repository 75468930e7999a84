//! A compact table per interval for a person at a terminal: top talkers first.
//!
//! ```text
//! 2026-11-18T11:06:40Z  interval 2.0s  kubernetes  3 workloads
//! NAME                   RX/s       TX/s    CPU       MEM
//! shop/web-5d9f7    1.2 MB/s  300.0 kB/s  12.5%  64.0 MiB
//! +2 more
//! ```
//!
//! One row per workload (ECS task, pod, Compose project, lone container) when a platform
//! reports them, else one per cgroup by path. Rates count every device but loopback, in
//! decimal units as `docker stats` shows network I/O; memory is the working set, in binary
//! units. Rows are sorted by received plus sent bytes.
//!
//! Which output a run gets (the `Output` enum is in `config.rs`): `--output` when given, else
//! the table when stdout is a terminal and JSON lines when it is not:
//! `explicit.unwrap_or(if stdout.is_terminal() { Output::Table } else { Output::Json })`.

use std::io::Write;

use super::{Sink, SinkError};
use crate::{
    snapshot::{per_second, Snapshot},
    snapshot::{WorkloadKind, WorkloadReport},
};

/// Rows shown when the terminal's height is unknown.
pub const DEFAULT_ROWS: usize = 20;
/// Longest name shown; longer ones are cut in the middle.
const NAME_WIDTH: usize = 40;
/// Lines of a table that are not rows: the header, the column names, "+K more", a blank.
const FRAME_LINES: usize = 4;

/// How many rows a table may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rows {
    /// At most this many.
    Fixed(usize),
    /// As many as fit the height of the terminal on stdout, read each interval;
    /// [`DEFAULT_ROWS`] when it cannot be read.
    Terminal,
}

pub struct TableSink<W: Write + Send> {
    out: W,
    rows: Rows,
}

impl<W: Write + Send> TableSink<W> {
    /// A table of at most `rows` rows per interval, written to `out`.
    pub fn new(out: W, rows: Rows) -> Self {
        Self { out, rows }
    }

    pub fn into_inner(self) -> W {
        self.out
    }

    fn max_rows(&self) -> usize {
        match self.rows {
            Rows::Fixed(n) => n.max(1),
            Rows::Terminal => terminal_height()
                .map_or(DEFAULT_ROWS, |h| h.saturating_sub(FRAME_LINES))
                .max(3),
        }
    }
}

/// Rows of the terminal on stdout, if it is one.
pub fn terminal_height() -> Option<usize> {
    let mut size = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one winsize into `size`, which outlives the call.
    let r = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut size) };
    (r == 0 && size.ws_row > 0).then_some(usize::from(size.ws_row))
}

/// One line of the table.
#[derive(Debug, Clone, PartialEq)]
struct Row {
    name: String,
    rx: f64,
    tx: f64,
    cpu_percent: Option<f64>,
    memory: Option<u64>,
}

/// What a person calls a workload: ECS tasks add the start of their id, since two tasks of
/// one revision share a name.
fn workload_name(w: &WorkloadReport) -> String {
    match w.kind {
        WorkloadKind::EcsTask => format!("{} ({})", w.name, w.id.get(..8).unwrap_or(&w.id)),
        _ => w.name.clone(),
    }
}

fn rows(snapshot: &Snapshot) -> Vec<Row> {
    let rate = |n| per_second(n, snapshot.interval);
    let mut rows: Vec<Row> = if snapshot.workloads.is_empty() {
        snapshot
            .cgroups
            .iter()
            .map(|c| Row {
                name: c
                    .path
                    .clone()
                    .unwrap_or_else(|| format!("cgroup {}", c.cgroup_id)),
                rx: rate(c.delta.rx.bytes),
                tx: rate(c.delta.tx.bytes),
                cpu_percent: None,
                memory: None,
            })
            .collect()
    } else {
        snapshot
            .workloads
            .iter()
            .map(|w| Row {
                name: workload_name(w),
                rx: rate(w.traffic.rx.bytes),
                tx: rate(w.traffic.tx.bytes),
                cpu_percent: w.usage.cpu_percent,
                memory: w.usage.memory_working_set,
            })
            .collect()
    };
    rows.sort_by(|a, b| {
        (b.rx + b.tx)
            .total_cmp(&(a.rx + a.tx))
            .then_with(|| a.name.cmp(&b.name))
    });
    rows
}

/// "0 B/s", "950 B/s", "1.2 kB/s", "12.3 MB/s": decimal, as network rates are.
pub fn rate(bytes_per_second: f64) -> String {
    const UNITS: [&str; 5] = ["kB/s", "MB/s", "GB/s", "TB/s", "PB/s"];
    if bytes_per_second < 1000.0 {
        return format!("{bytes_per_second:.0} B/s");
    }
    let mut value = bytes_per_second;
    let mut unit = UNITS[0];
    for u in UNITS {
        value /= 1000.0;
        unit = u;
        if value < 1000.0 {
            break;
        }
    }
    format!("{value:.1} {unit}")
}

/// "512 B", "64.0 MiB", "1.5 GiB": binary, as memory is.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64;
    let mut unit = UNITS[0];
    for u in UNITS {
        value /= 1024.0;
        unit = u;
        if value < 1024.0 {
            break;
        }
    }
    format!("{value:.1} {unit}")
}

/// A name fit for one cell: control characters shown as '?', long names cut in the middle.
fn cell(name: &str) -> String {
    let clean: Vec<char> = name
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if clean.len() <= NAME_WIDTH {
        return clean.into_iter().collect();
    }
    let head = (NAME_WIDTH - 1) / 2;
    let tail = NAME_WIDTH - 1 - head;
    let mut s: String = clean[..head].iter().collect();
    s.push('…');
    s.extend(&clean[clean.len() - tail..]);
    s
}

/// The table of one snapshot, at most `max_rows` rows.
fn render(out: &mut impl Write, snapshot: &Snapshot, max_rows: usize) -> std::io::Result<()> {
    let rows = rows(snapshot);
    let what = match (snapshot.workloads.is_empty(), rows.len()) {
        (true, 1) => "cgroup",
        (true, _) => "cgroups",
        (false, 1) => "workload",
        (false, _) => "workloads",
    };
    write!(
        out,
        "{}  interval {:.1}s  {}  {} {what}",
        humantime::format_rfc3339_seconds(snapshot.time),
        snapshot.interval.as_secs_f64(),
        snapshot
            .platform
            .as_ref()
            .map_or("no platform", |p| p.source),
        rows.len(),
    )?;
    if let Some(since) = snapshot.platform.as_ref().and_then(|p| p.stale_since) {
        write!(
            out,
            "  inventory stale since {}",
            humantime::format_rfc3339_seconds(since)
        )?;
    }
    let unlisted = snapshot.platform.as_ref().map_or(0, |p| p.unlisted.len());
    if unlisted > 0 {
        write!(out, "  {unlisted} not listed, kept: their cgroups run")?;
    }
    if snapshot.health.map_full_drops > 0 {
        write!(
            out,
            "  traffic map full: {} packets not counted",
            snapshot.health.map_full_drops
        )?;
    }
    writeln!(out)?;

    let shown = &rows[..rows.len().min(max_rows)];
    let names: Vec<String> = shown.iter().map(|r| cell(&r.name)).collect();
    let width = names
        .iter()
        .map(|n| n.chars().count())
        .max()
        .unwrap_or(0)
        .max("NAME".len());
    writeln!(
        out,
        "{:<width$}  {:>10}  {:>10}  {:>6}  {:>10}",
        "NAME", "RX/s", "TX/s", "CPU", "MEM"
    )?;
    for (row, name) in shown.iter().zip(&names) {
        // Pad by characters: format's width counts chars, which is what a terminal shows
        // for most names (wide CJK glyphs aside).
        writeln!(
            out,
            "{name:<width$}  {:>10}  {:>10}  {:>6}  {:>10}",
            rate(row.rx),
            rate(row.tx),
            row.cpu_percent.map_or("-".into(), |p| format!("{p:.1}%")),
            row.memory.map_or("-".into(), bytes),
        )?;
    }
    if rows.len() > shown.len() {
        writeln!(out, "+{} more", rows.len() - shown.len())?;
    }
    writeln!(out)
}

impl<W: Write + Send + 'static> Sink for TableSink<W> {
    fn name(&self) -> &'static str {
        "table"
    }

    fn emit(&mut self, snapshot: &Snapshot) -> Result<(), SinkError> {
        // One write per table, so lines of two intervals never interleave with logs mid-table.
        let mut buf = Vec::with_capacity(4096);
        render(&mut buf, snapshot, self.max_rows())?;
        self.out.write_all(&buf)?;
        self.out.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::BTreeMap,
        time::{Duration, UNIX_EPOCH},
    };

    use observer_common::{Counter, TrafficValue};

    use super::*;
    use crate::{
        inventory::NetworkMode,
        snapshot::Usage,
        snapshot::{CgroupTraffic, Health, PlatformStatus},
    };

    fn tv(rx: u64, tx: u64) -> TrafficValue {
        TrafficValue {
            rx: Counter {
                bytes: rx,
                packets: 1,
            },
            tx: Counter {
                bytes: tx,
                packets: 1,
            },
            // Loopback is not in the rates.
            lo_rx: Counter {
                bytes: 1 << 40,
                packets: 1,
            },
            ..Default::default()
        }
    }

    fn workload(kind: WorkloadKind, name: &str, rx: u64, tx: u64, usage: Usage) -> WorkloadReport {
        WorkloadReport {
            kind,
            id: "8f03e41243824aea923aca126495f665".into(),
            name: name.into(),
            namespace: None,
            labels: BTreeMap::new(),
            controller: None,
            network_mode: NetworkMode::Bridge,
            cgroup_ids: vec![],
            traffic: tv(rx, tx),
            usage,
            containers: vec![],
        }
    }

    fn snapshot(workloads: Vec<WorkloadReport>) -> Snapshot {
        Snapshot {
            time: UNIX_EPOCH + Duration::from_secs(1_795_000_000),
            interval: Duration::from_secs(2),
            cgroups: vec![],
            workloads,
            held: Vec::new(),
            host: Default::default(),
            platform: Some(PlatformStatus {
                source: "ecs",
                stale_since: None,
                failures_total: 0,
                stale_reason: None,
                unlisted: Vec::new(),
            }),
            health: Health::default(),
        }
    }

    fn table(s: &Snapshot, rows: usize) -> String {
        let mut sink = TableSink::new(Vec::new(), Rows::Fixed(rows));
        sink.emit(s).unwrap();
        String::from_utf8(sink.into_inner()).unwrap()
    }

    #[test]
    fn workloads_top_talkers_first() {
        let usage = Usage {
            cpu_percent: Some(12.5),
            memory_working_set: Some(64 << 20),
            ..Default::default()
        };
        let s = snapshot(vec![
            workload(
                WorkloadKind::ComposeProject,
                "quiet",
                0,
                0,
                Usage::default(),
            ),
            workload(WorkloadKind::EcsTask, "web:12", 2_400_000, 600_000, usage),
            workload(WorkloadKind::Container, "redis", 3000, 1000, usage),
        ]);
        assert_eq!(
            table(&s, 20),
            "\
2026-11-18T11:06:40Z  interval 2.0s  ecs  3 workloads
NAME                     RX/s        TX/s     CPU         MEM
web:12 (8f03e412)    1.2 MB/s  300.0 kB/s   12.5%    64.0 MiB
redis                1.5 kB/s     500 B/s   12.5%    64.0 MiB
quiet                   0 B/s       0 B/s       -           -

"
        );
    }

    #[test]
    fn at_most_n_rows_then_how_many_more() {
        let s = snapshot(
            (0..25)
                .map(|i| {
                    workload(
                        WorkloadKind::Container,
                        &format!("c{i:02}"),
                        i * 100,
                        0,
                        Usage::default(),
                    )
                })
                .collect(),
        );
        let out = table(&s, 20);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2 + 20 + 1 + 1);
        assert!(lines[0].ends_with("25 workloads"), "{}", lines[0]);
        assert!(lines[2].starts_with("c24 "), "{}", lines[2]);
        assert_eq!(lines[22], "+5 more");
    }

    #[test]
    fn cgroups_by_path_without_a_platform() {
        let mut s = snapshot(vec![]);
        s.platform = None;
        s.health.map_full_drops = 7;
        s.cgroups = vec![
            CgroupTraffic {
                cgroup_id: 1,
                path: Some("/system.slice/sshd.service".into()),
                delta: tv(100, 100),
            },
            CgroupTraffic {
                cgroup_id: 42,
                path: None,
                delta: tv(5000, 0),
            },
        ];
        let out = table(&s, 20);
        assert_eq!(
            out,
            "\
2026-11-18T11:06:40Z  interval 2.0s  no platform  2 cgroups  traffic map full: 7 packets not counted
NAME                              RX/s        TX/s     CPU         MEM
cgroup 42                     2.5 kB/s       0 B/s       -           -
/system.slice/sshd.service      50 B/s      50 B/s       -           -

"
        );
    }

    #[test]
    fn odd_and_long_names_stay_on_one_line() {
        let long = format!("shop/{}", "x".repeat(60));
        let s = snapshot(vec![
            workload(
                WorkloadKind::Container,
                "evil\nname\"\\",
                2,
                0,
                Usage::default(),
            ),
            workload(WorkloadKind::KubernetesPod, &long, 1, 0, Usage::default()),
        ]);
        let out = table(&s, 20);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 5, "{out}");
        assert!(lines[2].starts_with("evil?name\"\\ "), "{}", lines[2]);
        let cut: String = lines[3].chars().take(NAME_WIDTH).collect();
        assert_eq!(cut.chars().count(), NAME_WIDTH);
        assert!(cut.starts_with("shop/xxx") && cut.contains('…'), "{cut}");
    }

    #[test]
    fn stale_inventory_is_said() {
        let mut s = snapshot(vec![workload(
            WorkloadKind::Container,
            "a",
            0,
            0,
            Usage::default(),
        )]);
        s.platform = Some(PlatformStatus {
            source: "kubernetes",
            stale_since: Some(UNIX_EPOCH + Duration::from_secs(1_794_999_000)),
            failures_total: 0,
            stale_reason: None,
            unlisted: Vec::new(),
        });
        let out = table(&s, 20);
        assert!(
            out.lines()
                .next()
                .unwrap()
                .ends_with("inventory stale since 2026-11-18T10:50:00Z"),
            "{out}"
        );
        s.platform.as_mut().unwrap().unlisted = vec![crate::snapshot::Unlisted {
            kind: WorkloadKind::KubernetesPod,
            id: "u".into(),
            since: UNIX_EPOCH,
        }];
        let out = table(&s, 20);
        assert!(
            out.lines().next().unwrap().ends_with(
                "inventory stale since 2026-11-18T10:50:00Z  1 not listed, kept: their cgroups run"
            ),
            "{out}"
        );
    }

    #[test]
    fn units() {
        assert_eq!(rate(0.0), "0 B/s");
        assert_eq!(rate(999.0), "999 B/s");
        assert_eq!(rate(1000.0), "1.0 kB/s");
        assert_eq!(rate(12_345_678.0), "12.3 MB/s");
        assert_eq!(rate(2e12), "2.0 TB/s");
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(64 << 20), "64.0 MiB");
        assert_eq!(bytes(3 << 30), "3.0 GiB");
    }

    #[test]
    fn rows_are_at_least_three_and_follow_the_setting() {
        assert_eq!(TableSink::new(Vec::new(), Rows::Fixed(0)).max_rows(), 1);
        assert_eq!(TableSink::new(Vec::new(), Rows::Fixed(7)).max_rows(), 7);
        // Under `cargo test` stdout is rarely a terminal: then the default.
        let n = TableSink::new(Vec::new(), Rows::Terminal).max_rows();
        assert!(n >= 3);
        if terminal_height().is_none() {
            assert_eq!(n, DEFAULT_ROWS);
        }
    }
}
