//! The files a container's CPU and memory come from, kept open between intervals and read
//! again at offset 0, instead of opened, read and closed each time: the path lookup and the
//! set-up of an open kernfs file were most of an interval's CPU at 1,000 containers.
//!
//! cgroup files are kernfs files with one record: a read at offset 0 runs the kernel's show
//! function anew (fresh figures), and one read returns the whole text when the buffer is
//! larger than it. A removed cgroup's open files fail with ENODEV: its descriptors are
//! dropped and the file is opened again by path, which finds nothing (the cgroup is gone) or
//! the new cgroup of the same name (a restarted container).
//!
//! Limit files are kept too, though they are read only every few intervals: an open, read and
//! close costs ten times a read of a kept file, and opening them cost a cycle as much as
//! reading memory.stat in it (docs/benchmarks.md).
//!
//! Each kept file holds a descriptor and about 4 KiB of kernel memory (the open file's page
//! of text), charged to observer's own cgroup; both are bounded by [`Budget`]. Usage files
//! come first: limit files are kept only in what the budget leaves after three usage files for
//! every cgroup read, and are closed again when more cgroups need that room. Files beyond it
//! are opened, read and closed each time, as before.

use std::{
    fs::File,
    io,
    os::unix::fs::FileExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use crate::{
    fastmap::Stamped,
    resources::{self, CgroupFs, ResourceError, UsageFile},
};

/// At most this many files are kept open: three usage files per container, so 5,000
/// containers fit, and their limit files as far as the rest goes; about 70 MiB of kernel
/// memory at most.
pub const MAX_KEPT_FILES: usize = 16_384;

/// Descriptors left for everything else (sockets, maps, the state files, HTTP clients).
pub const RESERVED_DESCRIPTORS: u64 = 1024;

/// How many usage files may be kept open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget(pub usize);

impl Budget {
    /// What this process's open-file limit leaves after [`RESERVED_DESCRIPTORS`], at most
    /// [`MAX_KEPT_FILES`]. Reads the limit only; [`raise_open_files_limit`] raises it.
    pub fn from_limit() -> Self {
        let soft = open_files_limit().map_or(0, |(soft, _)| soft);
        Self::within(soft)
    }

    fn within(soft_limit: u64) -> Self {
        let left = soft_limit.saturating_sub(RESERVED_DESCRIPTORS);
        Self(
            usize::try_from(left)
                .unwrap_or(usize::MAX)
                .min(MAX_KEPT_FILES),
        )
    }
}

/// The soft and hard RLIMIT_NOFILE.
fn open_files_limit() -> io::Result<(u64, u64)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid out-pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((limit.rlim_cur, limit.rlim_max))
}

/// Raises the soft limit on open files to the hard one (which needs no privilege), so that
/// usage files can be kept open; returns the soft limit now in force.
pub fn raise_open_files_limit() -> io::Result<u64> {
    let (soft, hard) = open_files_limit()?;
    if soft >= hard {
        return Ok(soft);
    }
    let raised = libc::rlimit {
        rlim_cur: hard,
        rlim_max: hard,
    };
    // SAFETY: a valid pointer to an initialised rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(hard)
}

/// One open usage file and where it is (for errors).
#[derive(Debug)]
struct Kept {
    file: File,
    path: PathBuf,
}

/// The kept files of one cgroup, by [`UsageFile`]; None: not open (missing, or over budget).
#[derive(Debug, Default)]
struct CgroupFiles {
    files: [Option<Kept>; UsageFile::ALL.len()],
}

/// CPU and memory usage of cgroups, read through files kept open between intervals.
#[derive(Debug)]
pub struct UsageReader {
    fs: CgroupFs,
    /// Cgroups not read in an interval are closed at its end.
    cgroups: Stamped<CgroupFiles>,
    kept: usize,
    /// Of `kept`, limit files.
    kept_limits: usize,
    budget: Budget,
    /// One buffer for every read, grown to the longest text (memory.stat).
    buf: Vec<u8>,
}

impl UsageReader {
    pub fn new(fs: CgroupFs, budget: Budget) -> Self {
        Self {
            fs,
            cgroups: Stamped::default(),
            kept: 0,
            kept_limits: 0,
            budget,
            buf: vec![0; 4096],
        }
    }

    /// Files kept open now.
    pub fn kept(&self) -> usize {
        self.kept
    }

    /// [`CgroupFs::cpu_usage`], through kept files.
    pub fn cpu_usage(&mut self, rel: &str) -> Result<Option<Duration>, ResourceError> {
        self.cgroup(rel).cpu_usage()
    }

    /// [`CgroupFs::memory_working_set`], through kept files.
    pub fn memory_working_set(&mut self, rel: &str) -> Result<Option<u64>, ResourceError> {
        self.cgroup(rel).memory_working_set()
    }

    /// [`CgroupFs::cpu_limit`], through kept files.
    pub fn cpu_limit(&mut self, rel: &str) -> Result<Option<f64>, ResourceError> {
        self.cgroup(rel).cpu_limit()
    }

    /// [`CgroupFs::memory_limit`], through kept files.
    pub fn memory_limit(&mut self, rel: &str) -> Result<Option<u64>, ResourceError> {
        self.cgroup(rel).memory_limit()
    }

    /// Ends an interval: the files of cgroups not read in it are closed, and limit files
    /// beyond what the usage files of the cgroups read leave of the budget.
    pub fn end_interval(&mut self) {
        let (mut closed, mut limits) = (0, 0);
        self.cgroups.end_cycle(|c| {
            for (file, kept) in UsageFile::ALL.iter().zip(&c.files) {
                if kept.is_some() {
                    closed += 1;
                    limits += usize::from(file.is_limit());
                }
            }
        });
        self.kept -= closed;
        self.kept_limits -= limits;
        let room = limit_room(self.budget, self.cgroups.len());
        if self.kept_limits > room {
            let mut excess = self.kept_limits - room;
            for c in self.cgroups.values_mut() {
                for (file, slot) in UsageFile::ALL.iter().zip(&mut c.files) {
                    if excess > 0 && file.is_limit() && slot.take().is_some() {
                        excess -= 1;
                        self.kept -= 1;
                        self.kept_limits -= 1;
                    }
                }
                if excess == 0 {
                    break;
                }
            }
        }
    }

    /// The files of cgroup `rel`, kept through this interval whether or not any is read:
    /// one lookup for every figure of a cgroup (hashing its path was a few percent of a
    /// cycle, once per figure).
    pub fn cgroup<'a>(&'a mut self, rel: &'a str) -> Cgroup<'a> {
        // `rel` counted, new or not, so its usage files have their room before its limits.
        let (files, cgroups) = self.cgroups.touch_counted(rel);
        let limit_room = limit_room(self.budget, cgroups);
        Cgroup {
            fs: &self.fs,
            rel,
            files,
            kept: &mut self.kept,
            kept_limits: &mut self.kept_limits,
            limit_room,
            budget: self.budget,
            buf: &mut self.buf,
        }
    }
}

/// How many limit files may be kept beside the usage files of `cgroups` cgroups.
fn limit_room(budget: Budget, cgroups: usize) -> usize {
    budget
        .0
        .saturating_sub(cgroups.saturating_mul(UsageFile::USAGE_PER_CGROUP))
}

/// One cgroup's files, as [`resources::UsageFiles`] ([`UsageReader::cgroup`]).
pub struct Cgroup<'a> {
    fs: &'a CgroupFs,
    rel: &'a str,
    files: &'a mut CgroupFiles,
    kept: &'a mut usize,
    kept_limits: &'a mut usize,
    /// How many limit files may be kept in all.
    limit_room: usize,
    budget: Budget,
    buf: &'a mut Vec<u8>,
}

impl Cgroup<'_> {
    /// [`CgroupFs::cpu_usage`].
    pub fn cpu_usage(&mut self) -> Result<Option<Duration>, ResourceError> {
        resources::cpu_usage(self)
    }

    /// [`CgroupFs::memory_working_set`].
    pub fn memory_working_set(&mut self) -> Result<Option<u64>, ResourceError> {
        resources::memory_working_set(self)
    }

    /// [`CgroupFs::cpu_limit`].
    pub fn cpu_limit(&mut self) -> Result<Option<f64>, ResourceError> {
        resources::cpu_limit(self)
    }

    /// [`CgroupFs::memory_limit`].
    pub fn memory_limit(&mut self) -> Result<Option<u64>, ResourceError> {
        resources::memory_limit(self)
    }
}

impl resources::UsageFiles for Cgroup<'_> {
    fn memory_v1(&self) -> bool {
        self.fs.memory.is_some()
    }

    fn parse<T>(
        &mut self,
        file: UsageFile,
        what: &'static str,
        parse: impl FnOnce(&str) -> Option<T>,
    ) -> Result<Option<T>, ResourceError> {
        if let Some(kept) = &self.files.files[file as usize] {
            match read_whole(&kept.file, self.buf) {
                Ok(len) => return parse_buf(&kept.path, what, &self.buf[..len], parse).map(Some),
                // Removed (ENODEV): none of its files is worth keeping. Anything else: this
                // one is opened again by path below, which says what it was.
                Err(e) => {
                    let drop: &mut [Option<Kept>] = if resources::is_gone(&e) {
                        &mut self.files.files
                    } else {
                        std::slice::from_mut(&mut self.files.files[file as usize])
                    };
                    let files = if drop.len() == 1 {
                        &[file][..]
                    } else {
                        &UsageFile::ALL[..]
                    };
                    for (f, slot) in files.iter().zip(drop.iter_mut()) {
                        if slot.take().is_some() {
                            *self.kept -= 1;
                            *self.kept_limits -= usize::from(f.is_limit());
                        }
                    }
                }
            }
        }
        let slot = &mut self.files.files[file as usize];
        let Some(path) = self.fs.usage_path(self.rel, file) else {
            return Ok(None);
        };
        let read = File::open(&path).and_then(|f| read_whole(&f, self.buf).map(|len| (f, len)));
        let (opened, len) = match read {
            Ok(read) => read,
            Err(e) if resources::is_gone(&e) => return Ok(None),
            Err(source) => return Err(ResourceError::Read { path, source }),
        };
        let parsed = parse_buf(&path, what, &self.buf[..len], parse);
        let room = !file.is_limit() || *self.kept_limits < self.limit_room;
        if *self.kept < self.budget.0 && room {
            *slot = Some(Kept { file: opened, path });
            *self.kept += 1;
            *self.kept_limits += usize::from(file.is_limit());
        }
        parsed.map(Some)
    }
}

/// The whole text of a cgroup file into `buf` (grown as needed): its length.
fn read_whole(file: &File, buf: &mut Vec<u8>) -> io::Result<usize> {
    let mut len = 0;
    loop {
        let n = file.read_at(&mut buf[len..], len as u64)?;
        len += n;
        // A read that leaves room is the whole text (one record: see the module comment), so
        // no second read to see the end.
        if n == 0 || len < buf.len() {
            return Ok(len);
        }
        buf.resize(buf.len() * 2, 0);
    }
}

fn parse_buf<T>(
    path: &Path,
    what: &'static str,
    bytes: &[u8],
    parse: impl FnOnce(&str) -> Option<T>,
) -> Result<T, ResourceError> {
    let text = std::str::from_utf8(bytes).map_err(|e| ResourceError::Read {
        path: path.to_owned(),
        source: io::Error::new(io::ErrorKind::InvalidData, e),
    })?;
    resources::parse_text(path, what, text, parse)
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use crate::defaults::CGROUP_DIR;

    use crate::resources::tests::TempDir;

    fn hybrid(t: &TempDir, usage_ns: u64, memory: u64) {
        t.write("cpuacct/docker/a/cpuacct.usage", &format!("{usage_ns}\n"));
        t.write(
            "memory/docker/a/memory.usage_in_bytes",
            &format!("{memory}\n"),
        );
        t.write(
            "memory/docker/a/memory.stat",
            "cache 1\ninactive_file 999\ntotal_inactive_file 1000\n",
        );
    }

    #[test]
    fn kept_files_give_what_fresh_reads_give_and_see_new_text() {
        let t = TempDir::new("kept-same");
        hybrid(&t, 1_500_000_000, 5000);
        let fs = CgroupFs::probe(&t.0);
        let mut reader = UsageReader::new(fs.clone(), Budget(100));
        for (usage_ns, memory) in [(1_500_000_000, 5000), (2_000_000_000, 800)] {
            hybrid(&t, usage_ns, memory);
            let cpu = reader.cpu_usage("/docker/a").unwrap();
            let memory_ws = reader.memory_working_set("/docker/a").unwrap();
            assert_eq!(cpu, fs.cpu_usage("/docker/a").unwrap());
            assert_eq!(memory_ws, fs.memory_working_set("/docker/a").unwrap());
            assert_eq!(cpu, Some(Duration::from_nanos(usage_ns)));
            assert_eq!(memory_ws, Some(memory.saturating_sub(1000)));
            assert_eq!(
                reader.kept(),
                3,
                "cpuacct.usage, usage_in_bytes, memory.stat"
            );
            reader.end_interval();
        }
        // A file longer than the buffer is read whole.
        let long: String = (0..400).map(|i| format!("key_{i} {i}\n")).collect();
        t.write(
            "memory/docker/a/memory.stat",
            &format!("{long}total_inactive_file 300\n"),
        );
        assert_eq!(reader.memory_working_set("/docker/a").unwrap(), Some(500));
    }

    #[test]
    fn v2_and_missing_files_and_errors_as_fresh_reads() {
        let t = TempDir::new("kept-v2");
        t.write("cgroup.controllers", "cpu memory\n");
        t.write("docker/a/cpu.stat", "usage_usec 2500000\nuser_usec 1\n");
        t.write("docker/a/memory.current", "104857600\n");
        t.write("docker/a/memory.stat", "anon 1\ninactive_file 20971520\n");
        t.write("docker/b/memory.current", "junk\n");
        let fs = CgroupFs::probe(&t.0);
        let mut reader = UsageReader::new(fs, Budget(100));
        assert_eq!(
            reader.cpu_usage("/docker/a").unwrap(),
            Some(Duration::from_millis(2500))
        );
        assert_eq!(
            reader.memory_working_set("/docker/a").unwrap(),
            Some(80 << 20)
        );
        assert_eq!(reader.cpu_usage("/docker/b").unwrap(), None, "no cpu.stat");
        let e = reader.memory_working_set("/docker/b").unwrap_err();
        assert!(matches!(e, ResourceError::Parse { .. }), "{e}");
        assert!(e.to_string().contains("docker/b"), "{e}");
        assert_eq!(reader.cpu_usage("/docker/gone").unwrap(), None);
        assert_eq!(reader.kept(), 4, "a: three files; b: memory.current");
    }

    #[test]
    fn the_budget_bounds_kept_files_and_the_rest_are_read_afresh() {
        let t = TempDir::new("kept-budget");
        hybrid(&t, 7, 5000);
        t.write("cpuacct/docker/b/cpuacct.usage", "9\n");
        let fs = CgroupFs::probe(&t.0);
        let mut reader = UsageReader::new(fs, Budget(2));
        for _ in 0..2 {
            assert_eq!(reader.memory_working_set("/docker/a").unwrap(), Some(4000));
            assert_eq!(
                reader.cpu_usage("/docker/b").unwrap(),
                Some(Duration::from_nanos(9))
            );
            assert_eq!(reader.kept(), 2);
            reader.end_interval();
        }
        let mut none = UsageReader::new(CgroupFs::probe(&t.0), Budget(0));
        assert_eq!(none.memory_working_set("/docker/a").unwrap(), Some(4000));
        assert_eq!(none.kept(), 0);
        // A cgroup not read in an interval has its files closed at its end.
        reader.memory_working_set("/docker/a").unwrap();
        reader.end_interval();
        assert_eq!(reader.kept(), 2, "a's two memory files");
        reader.end_interval();
        assert_eq!(reader.kept(), 0);
    }

    fn limits(t: &TempDir, cgroup: &str, quota: i64, memory: u64) {
        t.write(
            &format!("cpu/docker/{cgroup}/cpu.cfs_quota_us"),
            &format!("{quota}\n"),
        );
        t.write(
            &format!("cpu/docker/{cgroup}/cpu.cfs_period_us"),
            "100000\n",
        );
        t.write(
            &format!("memory/docker/{cgroup}/memory.limit_in_bytes"),
            &format!("{memory}\n"),
        );
    }

    #[test]
    fn kept_limit_files_give_what_fresh_reads_give_and_see_a_changed_limit() {
        let t = TempDir::new("kept-limits");
        hybrid(&t, 1, 5000);
        limits(&t, "a", 1, 1);
        let fs = CgroupFs::probe(&t.0);
        let mut reader = UsageReader::new(fs.clone(), Budget(100));
        for (quota, memory) in [(150_000, 512 << 20), (50_000, 256 << 20), (-1, u64::MAX)] {
            limits(&t, "a", quota, memory);
            let cpu = reader.cpu_limit("/docker/a").unwrap();
            let mem = reader.memory_limit("/docker/a").unwrap();
            assert_eq!(cpu, fs.cpu_limit("/docker/a").unwrap());
            assert_eq!(mem, fs.memory_limit("/docker/a").unwrap());
            assert_eq!(cpu, (quota > 0).then(|| quota as f64 / 100_000.0));
            assert_eq!(mem, (memory < u64::MAX).then_some(memory));
            reader.memory_working_set("/docker/a").unwrap();
            reader.end_interval();
        }
        // Quota, memory limit and the two memory files; the period was read while it was
        // kept, so it is still open.
        assert_eq!(reader.kept(), 5);
        // Kept through an interval that reads no limits.
        reader.memory_working_set("/docker/a").unwrap();
        reader.end_interval();
        assert_eq!(reader.kept(), 5);
    }

    #[test]
    fn limit_files_make_room_for_the_usage_files_of_more_cgroups() {
        let t = TempDir::new("kept-limit-room");
        for c in ["a", "b", "c"] {
            t.write(&format!("cpuacct/docker/{c}/cpuacct.usage"), "1\n");
            limits(&t, c, 200_000, 1 << 30);
        }
        let mut reader = UsageReader::new(CgroupFs::probe(&t.0), Budget(4));
        let read = |reader: &mut UsageReader, c: &str| {
            let rel = format!("/docker/{c}");
            assert_eq!(
                reader.cpu_usage(&rel).unwrap(),
                Some(Duration::from_nanos(1))
            );
            assert_eq!(reader.cpu_limit(&rel).unwrap(), Some(2.0));
            assert_eq!(reader.memory_limit(&rel).unwrap(), Some(1 << 30));
        };
        // One cgroup: three usage files are set aside for it, one limit file fits.
        read(&mut reader, "a");
        assert_eq!(reader.kept(), 2, "cpuacct.usage and one limit file");
        reader.end_interval();
        // Two: 6 set aside is more than the budget, so no limit file is kept, and the one kept
        // is closed at the interval's end; usage files are kept as far as the budget goes.
        read(&mut reader, "a");
        read(&mut reader, "b");
        reader.end_interval();
        assert_eq!(reader.kept(), 2, "the two cpuacct.usage");
        for _ in 0..2 {
            for c in ["a", "b", "c"] {
                read(&mut reader, c);
            }
            reader.end_interval();
            assert_eq!(reader.kept(), 3, "a cpuacct.usage each, no limit file");
        }
    }

    #[test]
    fn the_budget_leaves_descriptors_for_the_rest() {
        assert_eq!(Budget::within(1024), Budget(0));
        assert_eq!(Budget::within(0), Budget(0));
        assert_eq!(Budget::within(4096), Budget(3072));
        assert_eq!(Budget::within(1 << 20), Budget(MAX_KEPT_FILES));
        assert_eq!(Budget::within(u64::MAX), Budget(MAX_KEPT_FILES));
    }

    /// A real v1 memory cgroup: its kept files fail with ENODEV once it is removed, and a
    /// cgroup made again under the same name is read, not the removed one.
    #[test]
    fn a_removed_cgroup_is_none_and_one_of_the_same_name_is_read_anew() {
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED a_removed_cgroup_is_none...: needs root to create cgroups");
            return;
        }
        let fs = CgroupFs::detect(Path::new(CGROUP_DIR)).unwrap();
        let Some(hierarchy) = fs.memory.clone().or_else(|| fs.unified.clone()) else {
            eprintln!("SKIPPED a_removed_cgroup_is_none...: no memory hierarchy here");
            return;
        };
        let only_memory = CgroupFs {
            memory: fs.memory.clone(),
            unified: fs.memory.is_none().then_some(hierarchy.clone()),
            ..CgroupFs::default()
        };
        let rel = format!("/observer-kept-test-{}", std::process::id());
        let dir = hierarchy.dir(&rel).unwrap();
        struct Rmdir(PathBuf);
        impl Drop for Rmdir {
            fn drop(&mut self) {
                let _ = fs::remove_dir(&self.0);
            }
        }
        fs::create_dir(&dir).unwrap();
        let _guard = Rmdir(dir.clone());
        let mut reader = UsageReader::new(only_memory, Budget(100));
        assert_eq!(
            reader.memory_working_set(&rel).unwrap(),
            Some(0),
            "empty cgroup"
        );
        assert_eq!(reader.kept(), 2);
        // A limit set after its file was opened is read through the kept file.
        let limit_file = dir.join(if fs.memory.is_some() {
            "memory.limit_in_bytes"
        } else {
            "memory.max"
        });
        assert_eq!(reader.memory_limit(&rel).unwrap(), None, "no limit yet");
        assert_eq!(reader.kept(), 3);
        fs::write(&limit_file, "268435456").unwrap();
        assert_eq!(reader.memory_limit(&rel).unwrap(), Some(256 << 20));
        assert_eq!(reader.kept(), 3, "read through the kept file");
        reader.end_interval();

        fs::remove_dir(&dir).unwrap();
        assert_eq!(reader.memory_working_set(&rel).unwrap(), None, "removed");
        assert_eq!(
            reader.kept(),
            0,
            "its descriptors are dropped, the limit file's too"
        );
        assert_eq!(reader.memory_limit(&rel).unwrap(), None, "removed");
        reader.end_interval();

        // The same name again: read through new descriptors, not the removed cgroup's.
        fs::create_dir(&dir).unwrap();
        assert_eq!(reader.memory_working_set(&rel).unwrap(), Some(0));
        assert_eq!(reader.kept(), 2, "opened again");
    }
}
