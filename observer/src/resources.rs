//! CPU and memory of one cgroup, read from cgroupfs on cgroup v2 and on v1/hybrid hosts, plus
//! the host facts (memory, CPUs) that stand in when a cgroup has no limit.
//!
//! On a hybrid host the v1 controllers (`cpu`, `cpuacct`, `memory`) hold the numbers and the
//! cgroup2 mount has only `cpu.stat`; on a pure v2 host everything is in one tree. Paths given
//! to the readers are relative to the hierarchy root (`/docker/<id>`), which is the same in
//! every hierarchy for the container runtimes observer meets.
//!
//! Each metric is read on its own: a file missing in one controller (a cgroup that exists in
//! one hierarchy only, a controller that is not mounted) gives None for that metric, never an
//! error for the whole cgroup.

use std::{
    fs, io,
    path::{Path, PathBuf},
    time::Duration,
};

use crate::mountinfo::{self, Mount};

#[derive(Debug, thiserror::Error)]
pub enum ResourceError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path}: cannot parse {what} from {text:?}")]
    Parse {
        path: PathBuf,
        what: &'static str,
        text: String,
    },
    #[error(
        "no cgroup hierarchy found at {0} (neither in /proc/self/mountinfo nor by looking for \
         cgroup.controllers, memory/ or cpuacct/ there)"
    )]
    NotFound(PathBuf),
}

/// Where one hierarchy is visible, and which part of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hierarchy {
    pub mount_point: PathBuf,
    /// The hierarchy directory at `mount_point`, relative to the hierarchy root.
    pub root: String,
}

impl Hierarchy {
    /// A whole hierarchy mounted at `mount_point`.
    pub fn at(mount_point: impl Into<PathBuf>) -> Self {
        Self {
            mount_point: mount_point.into(),
            root: "/".into(),
        }
    }

    /// The directory of cgroup `rel` (relative to the hierarchy root), if this mount shows it.
    pub fn dir(&self, rel: &str) -> Option<PathBuf> {
        let parts = |s: &'_ str| -> Vec<String> {
            s.split('/')
                .filter(|p| !p.is_empty() && *p != ".")
                .map(str::to_owned)
                .collect()
        };
        let rel = parts(rel);
        // ".." in a path seen through a cgroup namespace cannot be placed without that
        // namespace's root.
        if rel.iter().any(|p| p == "..") {
            return None;
        }
        // A mount made inside a cgroup namespace shows its root as "/.." when the mounted
        // directory lies above the namespace: that is the hierarchy's real root, as far as a
        // bind-mounted host tree goes.
        let root: Vec<String> = parts(&self.root)
            .into_iter()
            .filter(|p| p != "..")
            .collect();
        let rest = rel.strip_prefix(root.as_slice())?;
        Some(
            rest.iter()
                .fold(self.mount_point.clone(), |dir, p| dir.join(p)),
        )
    }
}

/// The hierarchies metrics come from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CgroupFs {
    /// cgroup2: /sys/fs/cgroup on a pure v2 host, /sys/fs/cgroup/unified on a hybrid one.
    pub unified: Option<Hierarchy>,
    /// v1 hierarchy with the `cpu` controller (CFS quota).
    pub cpu: Option<Hierarchy>,
    /// v1 hierarchy with `cpuacct` (usage); often the same mount as `cpu`.
    pub cpuacct: Option<Hierarchy>,
    /// v1 hierarchy with `memory`.
    pub memory: Option<Hierarchy>,
}

impl CgroupFs {
    /// The cgroup hierarchies among `mounts` that are mounted at or below `cgroup_dir`; for
    /// each, the shortest mount point wins.
    pub fn from_mounts(mounts: &[Mount], cgroup_dir: &Path) -> Self {
        let mut under: Vec<&Mount> = mounts
            .iter()
            .filter(|m| m.mount_point.starts_with(cgroup_dir))
            .collect();
        under.sort_by_key(|m| m.mount_point.as_os_str().len());
        let pick = |want: &dyn Fn(&Mount) -> bool| {
            under.iter().find(|m| want(m)).map(|m| Hierarchy {
                mount_point: m.mount_point.clone(),
                root: m.root.clone(),
            })
        };
        // A v1 hierarchy's controllers are its super options.
        let v1 = |name: &'static str| {
            move |m: &Mount| m.fstype == "cgroup" && m.options().any(|c| c == name)
        };
        Self {
            unified: pick(&|m| m.fstype == "cgroup2"),
            cpu: pick(&v1("cpu")),
            cpuacct: pick(&v1("cpuacct")),
            memory: pick(&v1("memory")),
        }
    }

    /// Finds the hierarchies under `cgroup_dir` ([`crate::defaults::CGROUP_DIR`], or where a
    /// container sees the host's tree): from this process's mountinfo, else by looking at the
    /// directory.
    pub fn detect(cgroup_dir: &Path) -> Result<Self, ResourceError> {
        let found = mountinfo::read_self()
            .map(|mounts| Self::from_mounts(&mounts, cgroup_dir))
            .unwrap_or_default();
        let found = if found.is_empty() {
            Self::probe(cgroup_dir)
        } else {
            found
        };
        if found.is_empty() {
            return Err(ResourceError::NotFound(cgroup_dir.to_owned()));
        }
        Ok(found)
    }

    /// The usual layouts under `cgroup_dir` without mountinfo: `cgroup.controllers` at the top
    /// is pure v2; otherwise v1 directories `cpu`, `cpuacct` (or `cpu,cpuacct`), `memory`, and
    /// `unified` for the cgroup2 part of a hybrid host.
    pub fn probe(cgroup_dir: &Path) -> Self {
        if cgroup_dir.join("cgroup.controllers").is_file() {
            return Self {
                unified: Some(Hierarchy::at(cgroup_dir)),
                ..Self::default()
            };
        }
        let first_dir = |names: &[&str]| {
            names
                .iter()
                .map(|n| cgroup_dir.join(n))
                .find(|p| p.is_dir())
                .map(Hierarchy::at)
        };
        Self {
            unified: Some(cgroup_dir.join("unified"))
                .filter(|p| p.join("cgroup.controllers").is_file())
                .map(Hierarchy::at),
            cpu: first_dir(&["cpu", "cpu,cpuacct", "cpuacct,cpu"]),
            cpuacct: first_dir(&["cpuacct", "cpu,cpuacct", "cpuacct,cpu"]),
            memory: first_dir(&["memory"]),
        }
    }

    fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Cumulative CPU time of cgroup `rel`: v1 `cpuacct.usage`, else v2 `cpu.stat` usage_usec.
    pub fn cpu_usage(&self, rel: &str) -> Result<Option<Duration>, ResourceError> {
        cpu_usage(&mut Afresh { fs: self, rel })
    }

    /// CPU limit of cgroup `rel` in cores: v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`
    /// (-1 = none), else v2 `cpu.max` ("max 100000" = none). None when unlimited or unknown.
    pub fn cpu_limit(&self, rel: &str) -> Result<Option<f64>, ResourceError> {
        cpu_limit(&mut Afresh { fs: self, rel })
    }

    /// Memory in use by cgroup `rel` without reclaimable page cache (the working set, as
    /// the kubelet and docker stats count it): usage minus inactive file pages, at least 0.
    /// v1: `memory.usage_in_bytes` - `total_inactive_file`; v2: `memory.current` -
    /// `inactive_file`.
    pub fn memory_working_set(&self, rel: &str) -> Result<Option<u64>, ResourceError> {
        memory_working_set(&mut Afresh { fs: self, rel })
    }

    /// Where `file` of cgroup `rel` is, if its hierarchy is mounted here and shows the cgroup.
    pub fn usage_path(&self, rel: &str, file: UsageFile) -> Option<PathBuf> {
        let (hierarchy, name) = match file {
            UsageFile::CpuacctUsage => (&self.cpuacct, "cpuacct.usage"),
            UsageFile::CpuStat => (&self.unified, "cpu.stat"),
            UsageFile::MemoryUsage if self.memory.is_some() => {
                (&self.memory, "memory.usage_in_bytes")
            }
            UsageFile::MemoryUsage => (&self.unified, "memory.current"),
            UsageFile::MemoryStat if self.memory.is_some() => (&self.memory, "memory.stat"),
            UsageFile::MemoryStat => (&self.unified, "memory.stat"),
            UsageFile::CpuQuota => (&self.cpu, "cpu.cfs_quota_us"),
            UsageFile::CpuPeriod => (&self.cpu, "cpu.cfs_period_us"),
            UsageFile::CpuMax => (&self.unified, "cpu.max"),
            UsageFile::MemoryLimit if self.memory.is_some() => {
                (&self.memory, "memory.limit_in_bytes")
            }
            UsageFile::MemoryLimit => (&self.unified, "memory.max"),
        };
        self::file(hierarchy, rel, name)
    }

    /// Memory limit of cgroup `rel` in bytes: v1 `memory.limit_in_bytes` (the huge "no limit"
    /// value reads as None), v2 `memory.max` ("max" = None).
    pub fn memory_limit(&self, rel: &str) -> Result<Option<u64>, ResourceError> {
        memory_limit(&mut Afresh { fs: self, rel })
    }

    /// Every metric of cgroup `rel`; a metric that cannot be read is None and its error is
    /// kept in [`CgroupResources::errors`].
    pub fn read(&self, rel: &str) -> CgroupResources {
        let mut errors = Vec::new();
        CgroupResources {
            cpu_usage: keep(&mut errors, self.cpu_usage(rel)),
            cpu_limit_cores: keep(&mut errors, self.cpu_limit(rel)),
            memory_working_set: keep(&mut errors, self.memory_working_set(rel)),
            memory_limit: keep(&mut errors, self.memory_limit(rel)),
            errors,
        }
    }
}

/// A file of a cgroup's CPU and memory: its usage, read each interval, or its limits, read
/// every few intervals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageFile {
    /// v1 `cpuacct.usage`, nanoseconds.
    CpuacctUsage,
    /// v2 `cpu.stat`, for `usage_usec`.
    CpuStat,
    /// v1 `memory.usage_in_bytes`, v2 `memory.current`.
    MemoryUsage,
    /// `memory.stat` of the hierarchy that holds memory, for the inactive file pages.
    MemoryStat,
    /// v1 `cpu.cfs_quota_us`.
    CpuQuota,
    /// v1 `cpu.cfs_period_us`.
    CpuPeriod,
    /// v2 `cpu.max`.
    CpuMax,
    /// v1 `memory.limit_in_bytes`, v2 `memory.max`.
    MemoryLimit,
}

impl UsageFile {
    pub const ALL: [Self; 8] = [
        Self::CpuacctUsage,
        Self::CpuStat,
        Self::MemoryUsage,
        Self::MemoryStat,
        Self::CpuQuota,
        Self::CpuPeriod,
        Self::CpuMax,
        Self::MemoryLimit,
    ];

    /// How many usage (not limit) files a cgroup has open at most: CPU, memory, memory.stat.
    pub const USAGE_PER_CGROUP: usize = 3;

    /// A limit, read every few intervals rather than each.
    pub fn is_limit(self) -> bool {
        matches!(
            self,
            Self::CpuQuota | Self::CpuPeriod | Self::CpuMax | Self::MemoryLimit
        )
    }
}

/// Reads one cgroup's usage files: afresh ([`CgroupFs::cpu_usage`]) or through descriptors
/// kept open between intervals ([`crate::usage_files`]).
pub trait UsageFiles {
    /// Whether memory comes from the v1 hierarchy (whose memory.stat says
    /// `total_inactive_file`).
    fn memory_v1(&self) -> bool;

    /// `parse` of the text of `file`; None if the file or its cgroup does not exist. `what`
    /// names the figure in the error when `parse` finds none.
    fn parse<T>(
        &mut self,
        file: UsageFile,
        what: &'static str,
        parse: impl FnOnce(&str) -> Option<T>,
    ) -> Result<Option<T>, ResourceError>;
}

/// Cumulative CPU time: v1 `cpuacct.usage`, else v2 `cpu.stat` usage_usec.
pub fn cpu_usage(files: &mut impl UsageFiles) -> Result<Option<Duration>, ResourceError> {
    let ns = files.parse(UsageFile::CpuacctUsage, "cpuacct.usage", |t| {
        t.trim().parse().ok()
    })?;
    if let Some(ns) = ns {
        return Ok(Some(Duration::from_nanos(ns)));
    }
    let us = files.parse(UsageFile::CpuStat, "usage_usec", |t| {
        stat_value(t, "usage_usec")
    })?;
    Ok(us.map(Duration::from_micros))
}

/// The working set: usage minus inactive file pages, at least 0 ([`CgroupFs::memory_working_set`]).
pub fn memory_working_set(files: &mut impl UsageFiles) -> Result<Option<u64>, ResourceError> {
    let (usage_file, keys): (_, &[&str]) = if files.memory_v1() {
        (
            "memory.usage_in_bytes",
            &["total_inactive_file", "inactive_file"],
        )
    } else {
        ("memory.current", &["inactive_file"])
    };
    let usage = files.parse(UsageFile::MemoryUsage, usage_file, |t| {
        t.trim().parse::<u64>().ok()
    })?;
    let Some(usage) = usage else {
        return Ok(None);
    };
    // Without memory.stat (or the key) the usage alone is the best figure there is.
    let inactive = files
        .parse(UsageFile::MemoryStat, "memory.stat", |stat| {
            Some(keys.iter().find_map(|k| stat_value(stat, k)).unwrap_or(0))
        })?
        .unwrap_or(0);
    Ok(Some(usage.saturating_sub(inactive)))
}

/// CPU limit in cores ([`CgroupFs::cpu_limit`]).
pub fn cpu_limit(files: &mut impl UsageFiles) -> Result<Option<f64>, ResourceError> {
    let quota = files.parse(UsageFile::CpuQuota, "quota", |t| {
        t.trim().parse::<i64>().ok()
    })?;
    if let Some(quota) = quota {
        if quota <= 0 {
            return Ok(None);
        }
        let period = files.parse(UsageFile::CpuPeriod, "period", |t| {
            t.trim().parse::<u64>().ok()
        })?;
        return Ok(period
            .filter(|&p| p > 0)
            .map(|period| quota as f64 / period as f64));
    }
    Ok(files
        .parse(UsageFile::CpuMax, "cpu.max", parse_cpu_max)?
        .flatten())
}

/// Memory limit in bytes ([`CgroupFs::memory_limit`]).
pub fn memory_limit(files: &mut impl UsageFiles) -> Result<Option<u64>, ResourceError> {
    let what = if files.memory_v1() {
        "memory.limit_in_bytes"
    } else {
        "memory.max"
    };
    let limit = files.parse(UsageFile::MemoryLimit, what, |t| match t.trim() {
        "max" => Some(None),
        t => t
            .parse::<u64>()
            .ok()
            .map(|l| (l < V1_UNLIMITED).then_some(l)),
    })?;
    Ok(limit.flatten())
}

/// A cgroup's usage files opened and read at each call.
struct Afresh<'a> {
    fs: &'a CgroupFs,
    rel: &'a str,
}

impl UsageFiles for Afresh<'_> {
    fn memory_v1(&self) -> bool {
        self.fs.memory.is_some()
    }

    fn parse<T>(
        &mut self,
        file: UsageFile,
        what: &'static str,
        parse: impl FnOnce(&str) -> Option<T>,
    ) -> Result<Option<T>, ResourceError> {
        let Some(path) = self.fs.usage_path(self.rel, file) else {
            return Ok(None);
        };
        let Some(text) = read(&path)? else {
            return Ok(None);
        };
        parse_text(&path, what, &text, parse).map(Some)
    }
}

/// `parse` of `text`, or the error that names `path` and `what`.
pub fn parse_text<T>(
    path: &Path,
    what: &'static str,
    text: &str,
    parse: impl FnOnce(&str) -> Option<T>,
) -> Result<T, ResourceError> {
    parse(text).ok_or_else(|| parse_error(path, what, text))
}

/// Not found, or ENODEV: the cgroup was removed (while its file was open).
pub fn is_gone(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENODEV)
}

fn keep<T>(errors: &mut Vec<ResourceError>, result: Result<Option<T>, ResourceError>) -> Option<T> {
    result.unwrap_or_else(|e| {
        errors.push(e);
        None
    })
}

/// One reading of a cgroup.
#[derive(Debug, Default)]
pub struct CgroupResources {
    /// Cumulative CPU time; see [`cpu_percent`].
    pub cpu_usage: Option<Duration>,
    /// None: no limit, or none readable.
    pub cpu_limit_cores: Option<f64>,
    pub memory_working_set: Option<u64>,
    /// None: no limit (fall back to the task's, then the host's), or none readable.
    pub memory_limit: Option<u64>,
    /// Why metrics that exist could not be read (permissions, unparsable text).
    pub errors: Vec<ResourceError>,
}

/// v1 says "no limit" with PAGE_COUNTER_MAX pages (0x7FFFFFFFFFFFF000 with 4 KiB pages; other
/// page sizes round differently), so anything from 2^62 bytes up is no limit.
const V1_UNLIMITED: u64 = 1 << 62;

/// CPU use between two cumulative samples as percent of one core (100 = one core busy).
/// None when no time passed or the counter went back (the cgroup was recreated).
pub fn cpu_percent(before: Duration, after: Duration, elapsed: Duration) -> Option<f64> {
    let used = after.checked_sub(before)?;
    if elapsed.is_zero() {
        return None;
    }
    Some(used.as_secs_f64() / elapsed.as_secs_f64() * 100.0)
}

/// `cpu.max`: "max <period>" is no limit, "<quota> <period>" is quota/period cores.
pub fn parse_cpu_max(text: &str) -> Option<Option<f64>> {
    let mut fields = text.split_whitespace();
    let quota = fields.next()?;
    let period: u64 = fields.next().map_or(Some(100_000), |p| p.parse().ok())?;
    if quota == "max" {
        return Some(None);
    }
    let quota: u64 = quota.parse().ok()?;
    Some((period > 0).then(|| quota as f64 / period as f64))
}

/// The value of `key` in a "key value" per line file (cpu.stat, memory.stat, meminfo).
pub fn stat_value(text: &str, key: &str) -> Option<u64> {
    // Runs on every container's memory.stat each interval (about 80 lines on cgroup v1, the
    // key near the end): a vectorised search for the key, then checks on that spot only.
    let bytes = text.as_bytes();
    memchr::memmem::find_iter(bytes, key.as_bytes()).find_map(|at| {
        // The key starts its line (after blanks at most)...
        let line_start = bytes[..at]
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1);
        if !bytes[line_start..at].iter().all(u8::is_ascii_whitespace) {
            return None;
        }
        let rest = &text[at + key.len()..];
        let rest = &rest[..rest.find('\n').unwrap_or(rest.len())];
        let rest = rest.strip_prefix(':').unwrap_or(rest);
        // ...and is the whole key: "inactive_file" is not "inactive_file_x".
        if !rest.starts_with(|c: char| c.is_ascii_whitespace()) {
            return None;
        }
        rest.split_ascii_whitespace().next()?.parse().ok()
    })
}

/// `MemTotal` from the text of /proc/meminfo, in bytes.
pub fn parse_meminfo_total(text: &str) -> Option<u64> {
    stat_value(text, "MemTotal")?.checked_mul(1024)
}

/// The host's memory in bytes, from `<proc_dir>/meminfo` (/proc, or /host/proc in a container).
pub fn host_memory_total(proc_dir: &Path) -> Result<u64, ResourceError> {
    let path = proc_dir.join("meminfo");
    let text = fs::read_to_string(&path).map_err(|source| ResourceError::Read {
        path: path.clone(),
        source,
    })?;
    parse_meminfo_total(&text).ok_or_else(|| parse_error(&path, "MemTotal", &text))
}

/// The number of CPUs in the text of /proc/stat (its `cpuN` lines).
pub fn parse_stat_cpus(text: &str) -> usize {
    text.lines()
        .filter_map(|l| l.strip_prefix("cpu"))
        .filter(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
        .count()
}

/// The host's online CPUs from `<proc_dir>/stat`.
pub fn host_cpu_count(proc_dir: &Path) -> Result<usize, ResourceError> {
    let path = proc_dir.join("stat");
    let text = fs::read_to_string(&path).map_err(|source| ResourceError::Read {
        path: path.clone(),
        source,
    })?;
    match parse_stat_cpus(&text) {
        0 => Err(parse_error(&path, "cpu lines", &text)),
        n => Ok(n),
    }
}

fn file(hierarchy: &Option<Hierarchy>, rel: &str, name: &str) -> Option<PathBuf> {
    hierarchy.as_ref()?.dir(rel).map(|dir| dir.join(name))
}

/// The file's text, None if it (or its cgroup) does not exist.
fn read(path: &Path) -> Result<Option<String>, ResourceError> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if is_gone(&e) => Ok(None),
        Err(source) => Err(ResourceError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

fn parse_error(path: &Path, what: &'static str, text: &str) -> ResourceError {
    // Keep the message short: memory.stat is long.
    let text: String = text.chars().take(80).collect();
    ResourceError::Parse {
        path: path.to_owned(),
        what,
        text,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::{defaults::CGROUP_DIR, mountinfo::parse};

    /// This machine's layout: separate cpu and cpuacct hierarchies, cgroup2 at unified.
    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    /// Ubuntu/AL2 style: cpu and cpuacct co-mounted.
    const COMOUNTED: &str = "\
34 25 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:16 - cgroup cgroup rw,cpu,cpuacct
36 25 0:31 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:18 - cgroup cgroup rw,memory
";
    const PURE_V2: &str = "\
25 30 0:23 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";
    /// Inside a container: its own namespaced mount, and the host's tree at /host.
    const IN_CONTAINER: &str = "\
700 690 0:23 / /sys/fs/cgroup ro,nosuid,nodev,noexec,relatime - cgroup2 cgroup rw,nsdelegate
701 690 0:23 /.. /host/sys/fs/cgroup ro,relatime - cgroup2 cgroup2 rw,nsdelegate
";

    #[test]
    fn mountinfo_layouts() {
        let fs = CgroupFs::from_mounts(&parse(HYBRID), Path::new(CGROUP_DIR));
        assert_eq!(fs.unified, Some(Hierarchy::at("/sys/fs/cgroup/unified")));
        assert_eq!(fs.cpu, Some(Hierarchy::at("/sys/fs/cgroup/cpu")));
        assert_eq!(fs.cpuacct, Some(Hierarchy::at("/sys/fs/cgroup/cpuacct")));
        assert_eq!(fs.memory, Some(Hierarchy::at("/sys/fs/cgroup/memory")));

        let fs = CgroupFs::from_mounts(&parse(COMOUNTED), Path::new(CGROUP_DIR));
        assert_eq!(fs.cpu, fs.cpuacct);
        assert_eq!(fs.cpu, Some(Hierarchy::at("/sys/fs/cgroup/cpu,cpuacct")));
        assert_eq!(fs.unified, None);

        let fs = CgroupFs::from_mounts(&parse(PURE_V2), Path::new(CGROUP_DIR));
        assert_eq!(
            fs,
            CgroupFs {
                unified: Some(Hierarchy::at("/sys/fs/cgroup")),
                ..CgroupFs::default()
            }
        );

        let mounts = parse(IN_CONTAINER);
        let host = CgroupFs::from_mounts(&mounts, Path::new("/host/sys/fs/cgroup"));
        let unified = host.unified.unwrap();
        assert_eq!(unified.mount_point, Path::new("/host/sys/fs/cgroup"));
        assert_eq!(
            unified.dir("/docker/abc"),
            Some("/host/sys/fs/cgroup/docker/abc".into())
        );
        let own = CgroupFs::from_mounts(&mounts, Path::new(CGROUP_DIR));
        assert_eq!(
            own.unified.unwrap().mount_point,
            Path::new("/sys/fs/cgroup")
        );
    }

    #[test]
    fn hierarchy_dirs_respect_the_mount_root() {
        let whole = Hierarchy::at("/sys/fs/cgroup/memory");
        assert_eq!(
            whole.dir("/docker/x"),
            Some("/sys/fs/cgroup/memory/docker/x".into())
        );
        assert_eq!(whole.dir("/"), Some("/sys/fs/cgroup/memory".into()));
        assert_eq!(
            whole.dir("docker//x/"),
            Some("/sys/fs/cgroup/memory/docker/x".into())
        );
        assert_eq!(whole.dir("/../docker/x"), None);
        let part = Hierarchy {
            mount_point: "/sys/fs/cgroup".into(),
            root: "/docker/self".into(),
        };
        assert_eq!(
            part.dir("/docker/self/child"),
            Some("/sys/fs/cgroup/child".into())
        );
        assert_eq!(part.dir("/docker/self"), Some("/sys/fs/cgroup".into()));
        assert_eq!(part.dir("/docker/other"), None);
    }

    /// A temporary directory removed on drop.
    pub(crate) struct TempDir(pub(crate) PathBuf);
    impl TempDir {
        pub(crate) fn new(name: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("observer-res-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
        /// Writes in place (same inode), as a kept descriptor sees a cgroup file change.
        pub(crate) fn write(&self, rel: &str, text: &str) {
            let path = self.0.join(rel);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, text).unwrap();
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    const C: &str = "/docker/abc";

    #[test]
    fn fake_v2_tree() {
        let t = TempDir::new("v2");
        t.write("cgroup.controllers", "cpuset cpu io memory pids\n");
        t.write(
            "docker/abc/cpu.stat",
            "usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\n",
        );
        t.write("docker/abc/cpu.max", "50000 100000\n");
        t.write("docker/abc/memory.current", "104857600\n");
        t.write(
            "docker/abc/memory.stat",
            "anon 52428800\nfile 52428800\ninactive_file 20971520\nactive_file 1\n",
        );
        t.write("docker/abc/memory.max", "268435456\n");
        t.write("docker/free/cpu.max", "max 100000\n");
        t.write("docker/free/memory.max", "max\n");
        t.write("docker/free/memory.current", "1000\n");
        t.write("docker/free/memory.stat", "inactive_file 5000\n");

        let fs = CgroupFs::probe(&t.0);
        assert_eq!(
            fs,
            CgroupFs {
                unified: Some(Hierarchy::at(&t.0)),
                ..CgroupFs::default()
            }
        );
        let r = fs.read(C);
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        assert_eq!(r.cpu_usage, Some(Duration::from_millis(2500)));
        assert_eq!(r.cpu_limit_cores, Some(0.5));
        assert_eq!(r.memory_working_set, Some(80 << 20));
        assert_eq!(r.memory_limit, Some(256 << 20));

        let free = fs.read("/docker/free");
        assert_eq!(free.cpu_limit_cores, None);
        assert_eq!(free.memory_limit, None);
        assert_eq!(free.memory_working_set, Some(0), "floored at zero");
        assert_eq!(free.cpu_usage, None, "no cpu.stat: None, not an error");
        assert!(free.errors.is_empty());

        let gone = fs.read("/docker/gone");
        assert!(
            gone.cpu_usage.is_none() && gone.memory_working_set.is_none() && gone.errors.is_empty()
        );
    }

    #[test]
    fn fake_hybrid_tree() {
        let t = TempDir::new("v1");
        t.write("cpu/docker/abc/cpu.cfs_quota_us", "150000\n");
        t.write("cpu/docker/abc/cpu.cfs_period_us", "100000\n");
        t.write("cpuacct/docker/abc/cpuacct.usage", "1500000000\n");
        t.write("memory/docker/abc/memory.usage_in_bytes", "209715200\n");
        t.write(
            "memory/docker/abc/memory.stat",
            "cache 1\ninactive_file 999999999\ntotal_inactive_file 104857600\n",
        );
        t.write("memory/docker/abc/memory.limit_in_bytes", "536870912\n");
        t.write("unified/cgroup.controllers", "\n");
        t.write("unified/docker/abc/cpu.stat", "usage_usec 7\n");
        // Unlimited, and a cgroup with only the v2 cpu.stat.
        t.write("cpu/docker/free/cpu.cfs_quota_us", "-1\n");
        t.write("cpu/docker/free/cpu.cfs_period_us", "100000\n");
        t.write(
            "memory/docker/free/memory.limit_in_bytes",
            "9223372036854771712\n",
        );
        t.write("memory/docker/free/memory.usage_in_bytes", "4096\n");
        t.write("memory/docker/free/memory.stat", "inactive_file 1024\n");
        t.write("unified/docker/free/cpu.stat", "usage_usec 42\n");

        let fs = CgroupFs::probe(&t.0);
        assert_eq!(fs.memory, Some(Hierarchy::at(t.0.join("memory"))));
        assert_eq!(fs.unified, Some(Hierarchy::at(t.0.join("unified"))));
        let r = fs.read(C);
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        assert_eq!(
            r.cpu_usage,
            Some(Duration::from_millis(1500)),
            "cpuacct wins over cpu.stat"
        );
        assert_eq!(r.cpu_limit_cores, Some(1.5));
        assert_eq!(
            r.memory_working_set,
            Some(100 << 20),
            "total_inactive_file preferred"
        );
        assert_eq!(r.memory_limit, Some(512 << 20));

        let free = fs.read("/docker/free");
        assert_eq!(
            free.cpu_usage,
            Some(Duration::from_micros(42)),
            "falls back to cgroup2 cpu.stat"
        );
        assert_eq!(free.cpu_limit_cores, None);
        assert_eq!(free.memory_limit, None, "PAGE_COUNTER_MAX is no limit");
        assert_eq!(
            free.memory_working_set,
            Some(3072),
            "inactive_file when total_ is absent"
        );
    }

    #[test]
    fn garbage_files_are_errors_for_that_metric_only() {
        let t = TempDir::new("garbage");
        t.write("memory/docker/abc/memory.usage_in_bytes", "lots\n");
        t.write("memory/docker/abc/memory.limit_in_bytes", "1048576\n");
        t.write("cpuacct/docker/abc/cpuacct.usage", "\n");
        t.write("cpu/docker/abc/cpu.cfs_quota_us", "x\n");
        let r = CgroupFs::probe(&t.0).read(C);
        assert_eq!(r.memory_limit, Some(1 << 20));
        assert_eq!(r.memory_working_set, None);
        assert_eq!(r.cpu_usage, None);
        assert_eq!(r.cpu_limit_cores, None);
        assert_eq!(r.errors.len(), 3, "{:?}", r.errors);
        assert!(r
            .errors
            .iter()
            .all(|e| matches!(e, ResourceError::Parse { .. })));
        let message = r.errors[0].to_string();
        assert!(message.contains("docker/abc"), "{message}");
    }

    #[test]
    fn nothing_there() {
        let t = TempDir::new("empty");
        assert!(CgroupFs::probe(&t.0).is_empty());
        assert!(matches!(
            CgroupFs::detect(&t.0),
            Err(ResourceError::NotFound(_))
        ));
        let r = CgroupFs::default().read(C);
        assert!(r.cpu_usage.is_none() && r.memory_limit.is_none() && r.errors.is_empty());
    }

    #[test]
    fn cpu_max_and_percent() {
        assert_eq!(parse_cpu_max("max 100000\n"), Some(None));
        assert_eq!(parse_cpu_max("max"), Some(None));
        assert_eq!(parse_cpu_max("50000 100000"), Some(Some(0.5)));
        assert_eq!(parse_cpu_max("200000 100000"), Some(Some(2.0)));
        assert_eq!(parse_cpu_max("1 0"), Some(None));
        assert_eq!(parse_cpu_max(""), None);
        assert_eq!(parse_cpu_max("x 100000"), None);

        let s = Duration::from_secs;
        assert_eq!(cpu_percent(s(10), s(11), s(1)), Some(100.0));
        assert_eq!(cpu_percent(s(10), s(14), s(2)), Some(200.0));
        assert_eq!(cpu_percent(s(10), s(10), s(5)), Some(0.0));
        assert_eq!(
            cpu_percent(Duration::ZERO, Duration::from_millis(250), s(1)),
            Some(25.0)
        );
        assert_eq!(cpu_percent(s(10), s(9), s(1)), None, "counter went back");
        assert_eq!(cpu_percent(s(10), s(11), Duration::ZERO), None);
    }

    #[test]
    fn host_facts() {
        let meminfo = "MemTotal:       16318480 kB\nMemFree:         1234 kB\n";
        assert_eq!(parse_meminfo_total(meminfo), Some(16_318_480 * 1024));
        assert_eq!(parse_meminfo_total("MemFree: 1 kB\n"), None);
        assert_eq!(parse_meminfo_total(""), None);
        let stat = "cpu  1 2 3\ncpu0 1 2 3\ncpu1 1 2 3\nintr 5\ncpufreq 1\n";
        assert_eq!(parse_stat_cpus(stat), 2);
        assert_eq!(
            stat_value("usage_usec 12\nuser_usec 3", "user_usec"),
            Some(3)
        );
        assert_eq!(stat_value("usage_usec x", "usage_usec"), None);
        // Only a whole key at the start of a line, its value on that line.
        let stat = "total_inactive_file_x 1\ntotal_inactive_file 2\ninactive_file 3\n";
        assert_eq!(stat_value(stat, "inactive_file"), Some(3));
        assert_eq!(stat_value(stat, "total_inactive_file"), Some(2));
        assert_eq!(stat_value("inactive_file\n7", "inactive_file"), None);
        assert_eq!(stat_value("  inactive_file 4", "inactive_file"), Some(4));
        assert_eq!(
            stat_value("inactive_file x\ninactive_file 5", "inactive_file"),
            Some(5)
        );
        assert_eq!(stat_value("anon 1\nfile 2", "inactive_file"), None);

        // This machine's /proc.
        let total = host_memory_total(Path::new("/proc")).unwrap();
        assert!(total > 64 << 20, "{total}");
        assert!(host_cpu_count(Path::new("/proc")).unwrap() >= 1);
        assert!(host_memory_total(Path::new("/nonexistent")).is_err());
    }

    /// Moves a child process into v1 cgroups made for the test and removes them on drop.
    struct RealCgroup {
        dirs: Vec<PathBuf>,
        child: Option<std::process::Child>,
    }

    impl Drop for RealCgroup {
        fn drop(&mut self) {
            if let Some(mut child) = self.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
            for dir in &self.dirs {
                // The killed child may take a moment to leave the cgroup.
                for _ in 0..50 {
                    if fs::remove_dir(dir).is_ok() || !dir.exists() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }

    #[test]
    fn real_v1_cgroup_of_this_machine() {
        use std::io::{BufRead as _, Write as _};
        use std::process::{Command, Stdio};

        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED real_v1_cgroup_of_this_machine: needs root to create cgroups");
            return;
        }
        let fs = CgroupFs::detect(Path::new(CGROUP_DIR)).unwrap();
        let (Some(memory), Some(cpu), Some(cpuacct)) = (&fs.memory, &fs.cpu, &fs.cpuacct) else {
            eprintln!(
                "SKIPPED real_v1_cgroup_of_this_machine: no v1 memory/cpu/cpuacct hierarchies here"
            );
            return;
        };
        if Command::new("python3")
            .arg("-c")
            .arg("")
            .status()
            .map_or(true, |s| !s.success())
        {
            eprintln!("SKIPPED real_v1_cgroup_of_this_machine: python3 is not available");
            return;
        }

        let rel = format!("/observer-res-test-{}", std::process::id());
        let mut guard = RealCgroup {
            dirs: Vec::new(),
            child: None,
        };
        let mut hierarchies = vec![memory, cpu, cpuacct];
        hierarchies.dedup();
        for h in hierarchies {
            let dir = h.dir(&rel).unwrap();
            fs::create_dir(&dir).unwrap();
            guard.dirs.push(dir);
        }
        let memory_dir = memory.dir(&rel).unwrap();
        fs::write(memory_dir.join("memory.limit_in_bytes"), "268435456").unwrap();
        fs::write(cpu.dir(&rel).unwrap().join("cpu.cfs_quota_us"), "50000").unwrap();

        // The child waits on stdin until it is in the cgroups, so its memory is charged there.
        let script = "import time\n\
                      b = b'x' * (50 << 20)\n\
                      print('ready', flush=True)\n\
                      while True: pass\n";
        let mut child = Command::new("sh")
            .args(["-c", "read go && exec python3 -c \"$0\"", script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id().to_string();
        let mut stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        guard.child = Some(child);
        for dir in &guard.dirs {
            fs::write(dir.join("cgroup.procs"), &pid).unwrap();
        }
        writeln!(stdin, "go").unwrap();
        let mut line = String::new();
        io::BufReader::new(stdout).read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ready");

        let first = fs.read(&rel);
        assert!(first.errors.is_empty(), "{:?}", first.errors);
        let started = std::time::Instant::now();
        std::thread::sleep(Duration::from_millis(600));
        let second = fs.read(&rel);
        let elapsed = started.elapsed();

        let working_set = second.memory_working_set.unwrap();
        assert!(
            (45 << 20..256 << 20).contains(&working_set),
            "working set {working_set}"
        );
        assert_eq!(second.memory_limit, Some(256 << 20));
        assert_eq!(second.cpu_limit_cores, Some(0.5));
        let (before, after) = (first.cpu_usage.unwrap(), second.cpu_usage.unwrap());
        assert!(
            after > before && before > Duration::ZERO,
            "{before:?} -> {after:?}"
        );
        let percent = cpu_percent(before, after, elapsed).unwrap();
        // The busy loop wants a whole core; the quota allows half of one.
        assert!(
            percent > 5.0 && percent < 65.0,
            "cpu {percent:.1}% with a 0.5 core quota"
        );
        eprintln!(
            "real v1 cgroup: working set {} MiB, cpu {percent:.1}% (quota 0.5 core)",
            working_set >> 20
        );
    }
}
