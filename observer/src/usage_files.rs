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
//! Each kept file holds a descriptor and about 4.4 KiB of kernel memory (the open file's page
//! of text), charged to observer's own cgroup; both are bounded by [`Budget`]. Files beyond
//! it are opened, read and closed each interval, as before.

use std::{
    collections::HashMap,
    fs::File,
    io,
    os::unix::fs::FileExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use crate::resources::{self, CgroupFs, ResourceError, UsageFile};

/// At most this many usage files are kept open: three per container, so 5,000 containers fit,
/// with about 70 MiB of kernel memory at most.
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
        Self(usize::try_from(left).unwrap_or(usize::MAX).min(MAX_KEPT_FILES))
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
    /// The interval it was last read in: cgroups not read in one are closed.
    read_in: u64,
}

/// CPU and memory usage of cgroups, read through files kept open between intervals.
#[derive(Debug)]
pub struct UsageReader {
    fs: CgroupFs,
    cgroups: HashMap<String, CgroupFiles>,
    kept: usize,
    budget: Budget,
    /// One buffer for every read, grown to the longest text (memory.stat).
    buf: Vec<u8>,
    interval: u64,
}

impl UsageReader {
    pub fn new(fs: CgroupFs, budget: Budget) -> Self {
        Self {
            fs,
            cgroups: HashMap::new(),
            kept: 0,
            budget,
            buf: vec![0; 4096],
            interval: 0,
        }
    }

    /// The hierarchies, for what is read afresh (limits).
    pub fn fs(&self) -> &CgroupFs {
        &self.fs
    }

    /// Files kept open now.
    pub fn kept(&self) -> usize {
        self.kept
    }

    /// [`CgroupFs::cpu_usage`], through kept files.
    pub fn cpu_usage(&mut self, rel: &str) -> Result<Option<Duration>, ResourceError> {
        resources::cpu_usage(&mut self.cgroup(rel))
    }

    /// [`CgroupFs::memory_working_set`], through kept files.
    pub fn memory_working_set(&mut self, rel: &str) -> Result<Option<u64>, ResourceError> {
        resources::memory_working_set(&mut self.cgroup(rel))
    }

    /// Ends an interval: the files of cgroups not read in it are closed.
    pub fn end_interval(&mut self) {
        let interval = self.interval;
        let mut closed = 0;
        self.cgroups.retain(|_, c| {
            let keep = c.read_in == interval;
            if !keep {
                closed += c.files.iter().flatten().count();
            }
            keep
        });
        self.kept -= closed;
        self.interval += 1;
    }

    fn cgroup<'a>(&'a mut self, rel: &'a str) -> Cgroup<'a> {
        // A lookup by &str allocates nothing; a cgroup's path is copied once, when first read.
        if !self.cgroups.contains_key(rel) {
            self.cgroups.insert(rel.to_owned(), CgroupFiles::default());
        }
        let files = self.cgroups.get_mut(rel).expect("inserted above");
        files.read_in = self.interval;
        Cgroup {
            fs: &self.fs,
            rel,
            files,
            kept: &mut self.kept,
            budget: self.budget,
            buf: &mut self.buf,
        }
    }
}

/// One cgroup's files, as [`resources::UsageFiles`].
struct Cgroup<'a> {
    fs: &'a CgroupFs,
    rel: &'a str,
    files: &'a mut CgroupFiles,
    kept: &'a mut usize,
    budget: Budget,
    buf: &'a mut Vec<u8>,
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
        let slot = &mut self.files.files[file as usize];
        if let Some(kept) = slot {
            match read_whole(&kept.file, self.buf) {
                Ok(len) => return parse_buf(&kept.path, what, &self.buf[..len], parse).map(Some),
                // Removed (ENODEV), or anything else: opened again by path below, which says
                // which it was.
                Err(_) => {
                    *slot = None;
                    *self.kept -= 1;
                }
            }
        }
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
        if *self.kept < self.budget.0 {
            *slot = Some(Kept { file: opened, path });
            *self.kept += 1;
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
