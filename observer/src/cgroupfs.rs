//! The cgroup v2 hierarchy: where it is mounted, and which directory each cgroup id names.
//!
//! A cgroup v2 id (what `bpf_skb_cgroup_id` returns) is the inode number of the cgroup's
//! directory, so one walk of the hierarchy maps ids to paths.

use std::{
    fs, io,
    os::unix::fs::{DirEntryExt as _, MetadataExt as _},
    path::{Path, PathBuf},
};

use crate::{
    defaults,
    fastmap::FastMap,
    mountinfo::{self, Mount},
    resources::is_gone,
};

/// statfs(2) magic of a cgroup2 file system.
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error(
        "no cgroup v2 hierarchy is mounted (looked in /proc/self/mountinfo for a cgroup2 mount); \
         mount one (mount -t cgroup2 none /sys/fs/cgroup/unified) or pass --cgroup-root PATH"
    )]
    NoV2Mount,
    #[error("--cgroup-root {0}: not a cgroup v2 mount (statfs type is not cgroup2)")]
    NotCgroup2(PathBuf),
    #[error("reading {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("cannot read {path}: {source}; the cgroups found by the last walk are kept{hint}")]
    Walk {
        path: PathBuf,
        source: io::Error,
        hint: &'static str,
    },
}

impl CgroupError {
    fn walk(path: &Path, source: io::Error) -> Self {
        let hint = match source.raw_os_error() {
            Some(libc::EMFILE) => {
                ": observer is out of file descriptors, raise its open-files limit (ulimit -n, \
                 LimitNOFILE= in a systemd unit, the nofile ulimit of an ECS task, or the \
                 container runtime's default)"
            }
            Some(libc::ENFILE) => ": the host is out of file descriptors (fs.file-max)",
            _ => "",
        };
        Self::Walk {
            path: path.to_owned(),
            source,
            hint,
        }
    }
}

/// Finds the cgroup v2 mount point among `mounts` (this process's: [`mountinfo::read_self`]).
///
/// A pure v2 host mounts it at /sys/fs/cgroup, a hybrid host at /sys/fs/cgroup/unified; when
/// there are several, /sys/fs/cgroup wins, then the shortest path.
pub fn find_v2_mount(mounts: &[Mount]) -> Option<PathBuf> {
    v2_mount_points(mounts)
        .min_by_key(|m| (*m != Path::new(defaults::CGROUP_DIR), m.as_os_str().len()))
        .map(Path::to_owned)
}

/// The cgroup v2 mount at or below `dir` (the shortest), e.g. the host's hierarchy that a
/// container mounts at /host/sys/fs/cgroup, or /host/sys/fs/cgroup/unified on a hybrid host.
pub fn find_v2_mount_under(mounts: &[Mount], dir: &Path) -> Option<PathBuf> {
    v2_mount_points(mounts)
        .filter(|m| m.starts_with(dir))
        .min_by_key(|m| m.as_os_str().len())
        .map(Path::to_owned)
}

/// Every cgroup2 mount point among `mounts`.
fn v2_mount_points(mounts: &[Mount]) -> impl Iterator<Item = &Path> {
    mounts
        .iter()
        .filter(|m| m.fstype == "cgroup2")
        .map(|m| m.mount_point.as_path())
}

/// The cgroup v2 root to attach to: `explicit` if given (checked to be cgroup2), else the mount
/// found in this process's mountinfo.
pub fn detect_root(explicit: Option<&Path>) -> Result<PathBuf, CgroupError> {
    if let Some(path) = explicit {
        return if is_cgroup2(path)? {
            Ok(path.to_owned())
        } else {
            Err(CgroupError::NotCgroup2(path.to_owned()))
        };
    }
    let mounts = mountinfo::read_self().map_err(|source| CgroupError::Io {
        path: mountinfo::SELF.into(),
        source,
    })?;
    find_v2_mount(&mounts).ok_or(CgroupError::NoV2Mount)
}

/// True iff `path` is on a cgroup2 file system.
pub fn is_cgroup2(path: &Path) -> Result<bool, CgroupError> {
    let io_err = |source| CgroupError::Io {
        path: path.to_owned(),
        source,
    };
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| io_err(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
    // SAFETY: statfs is plain integers, for which all zeroes is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c_path is NUL-terminated and st is a valid out-pointer.
    if unsafe { libc::statfs(c_path.as_ptr(), &mut st) } != 0 {
        return Err(io_err(io::Error::last_os_error()));
    }
    Ok(st.f_type as i64 == CGROUP2_SUPER_MAGIC)
}

/// The cgroup id of a directory in the v2 hierarchy.
pub fn cgroup_id(dir: &Path) -> io::Result<u64> {
    Ok(fs::metadata(dir)?.ino())
}

/// Whether a v2 cgroup or one of its descendants holds a process (`populated` of its
/// `cgroup.events`, which every cgroup but the root has). An error when the file cannot be
/// read or says neither.
pub fn is_populated(dir: &Path) -> io::Result<bool> {
    let events = fs::read_to_string(dir.join("cgroup.events"))?;
    events
        .lines()
        .find_map(|l| l.strip_prefix("populated "))
        .map(|v| v.trim() == "1")
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no populated line"))
}

/// Whether the directory `entry` names has no directories in it, by its link count: kernfs
/// (as ext4 and tmpfs) counts a directory's links as 2 plus its subdirectories. A container's
/// cgroup is usually a leaf, and a stat relative to the open parent costs about 2 us where
/// opening and listing it (its control files) costs about 15. Anything but exactly 2 (a failed
/// stat, a file system that says 1 for directories) is listed as before.
fn has_no_subdirs(entry: &fs::DirEntry) -> bool {
    entry.metadata().is_ok_and(|m| m.nlink() == 2)
}

/// cgroup id -> path relative to the v2 root ("/" is the root, "/docker/<id>" a container).
#[derive(Debug, Default)]
pub struct CgroupIndex {
    root: PathBuf,
    paths: FastMap<u64, String>,
}

impl CgroupIndex {
    /// Walks the whole hierarchy under `root`.
    pub fn scan(root: &Path) -> Result<Self, CgroupError> {
        let mut index = Self {
            root: root.to_owned(),
            paths: FastMap::default(),
        };
        index.rescan()?;
        Ok(index)
    }

    /// Walks the hierarchy again: cgroups come and go between intervals. A walk that cannot
    /// read a directory for any reason but its removal (no descriptor left, say) fails and
    /// keeps the last walk's index: a partial one would drop the containers it missed.
    pub fn rescan(&mut self) -> Result<(), CgroupError> {
        let mut paths =
            FastMap::with_capacity_and_hasher(self.paths.len().max(64), Default::default());
        let root_id = cgroup_id(&self.root).map_err(|source| CgroupError::Io {
            path: self.root.clone(),
            source,
        })?;
        paths.insert(root_id, "/".to_owned());
        let mut stack = vec![(self.root.clone(), String::new())];
        while let Some((dir, rel)) = stack.pop() {
            // A cgroup removed while we walk is not an error: it is simply gone.
            let entries = match fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(e) if is_gone(&e) => continue,
                Err(e) => return Err(CgroupError::walk(&dir, e)),
            };
            for entry in entries {
                let entry = match entry {
                    Ok(entry) => entry,
                    Err(e) if is_gone(&e) => break,
                    Err(e) => return Err(CgroupError::walk(&dir, e)),
                };
                // d_type and d_ino come with getdents: no stat per control file. kernfs reports
                // the same inode number there as stat does: the cgroup id.
                let Ok(file_type) = entry.file_type() else {
                    continue;
                };
                if !file_type.is_dir() {
                    continue;
                }
                let child_rel = format!("{rel}/{}", entry.file_name().to_string_lossy());
                if !has_no_subdirs(&entry) {
                    stack.push((entry.path(), child_rel.clone()));
                }
                paths.insert(entry.ino(), child_rel);
            }
        }
        self.paths = paths;
        Ok(())
    }

    pub fn path(&self, id: u64) -> Option<&str> {
        self.paths.get(&id).map(String::as_str)
    }

    /// Every cgroup with its path.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &str)> {
        self.paths.iter().map(|(id, path)| (*id, path.as_str()))
    }

    pub fn len(&self) -> usize {
        self.paths.len()
    }

    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mountinfo::parse;

    const EMFILE_CHILD: &str = "OBSERVER_TEST_EMFILE_CHILD";

    /// Runs in a process of its own (the test binary again, this test only), because it uses
    /// up the process's descriptors.
    #[test]
    fn a_walk_out_of_descriptors_fails_and_keeps_the_last_index() {
        let name = "cgroupfs::tests::a_walk_out_of_descriptors_fails_and_keeps_the_last_index";
        if std::env::var_os(EMFILE_CHILD).is_none() {
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args([name, "--exact", "--nocapture", "--test-threads=1"])
                .env(EMFILE_CHILD, "1")
                .output()
                .unwrap();
            let printed = String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "{printed}");
            assert!(printed.contains("emfile child: walk refused"), "{printed}");
            return;
        }
        struct Removed(PathBuf);
        impl Drop for Removed {
            fn drop(&mut self) {
                let _ = fs::remove_dir_all(&self.0);
            }
        }
        let root = std::env::temp_dir().join(format!("observer-emfile-{}", std::process::id()));
        let _removed = Removed(root.clone());
        for dir in ["a/b", "a/c", "d"] {
            fs::create_dir_all(root.join(dir)).unwrap();
        }
        let mut index = CgroupIndex::scan(&root).unwrap();
        assert_eq!(index.len(), 5, "the root and four directories");
        // Down to a low limit, then every descriptor under it taken.
        let limit = libc::rlimit {
            rlim_cur: 64,
            rlim_max: 64,
        };
        // SAFETY: a plain syscall on a struct that lives through it.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) }, 0);
        let mut held = Vec::new();
        let err = loop {
            match fs::File::open("/dev/null") {
                Ok(f) => held.push(f),
                Err(e) => break e,
            }
        };
        assert_eq!(err.raw_os_error(), Some(libc::EMFILE));
        let refused = index.rescan().unwrap_err();
        let text = refused.to_string();
        assert!(text.contains("open-files limit"), "{text}");
        assert!(text.contains("last walk are kept"), "{text}");
        assert_eq!(index.len(), 5, "the last walk's index is kept");
        drop(held);
        fs::create_dir(root.join("d/e")).unwrap();
        index.rescan().unwrap();
        assert_eq!(
            index.len(),
            6,
            "with descriptors back, the walk sees the new directory"
        );
        println!("emfile child: walk refused: {text}");
    }

    #[test]
    fn a_directory_removed_during_the_walk_is_gone_not_an_error() {
        for errno in [libc::ENOENT, libc::ENODEV] {
            assert!(is_gone(&io::Error::from_raw_os_error(errno)), "{errno}");
        }
        for errno in [libc::EMFILE, libc::ENFILE, libc::EACCES, libc::ENOMEM] {
            assert!(!is_gone(&io::Error::from_raw_os_error(errno)), "{errno}");
        }
        let err = CgroupError::walk(Path::new("/x"), io::Error::from_raw_os_error(libc::ENFILE));
        assert!(err.to_string().contains("fs.file-max"), "{err}");
    }

    #[test]
    fn populated_comes_from_cgroup_events() {
        let dir = std::env::temp_dir().join(format!("observer-events-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let events = |text: &str| {
            fs::write(dir.join("cgroup.events"), text).unwrap();
            is_populated(&dir).ok()
        };
        assert_eq!(events("populated 1\nfrozen 0\n"), Some(true));
        assert_eq!(events("populated 0\nfrozen 0\n"), Some(false));
        assert_eq!(events("frozen 0\n"), None);
        fs::remove_file(dir.join("cgroup.events")).unwrap();
        assert!(is_populated(&dir).is_err());
        fs::remove_dir(&dir).unwrap();
    }

    const HYBRID: &str = "\
24 30 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
29 24 0:26 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
30 29 0:27 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
31 29 0:28 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,xattr,name=systemd
33 29 0:30 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:15 - cgroup cgroup rw,memory
";
    const PURE_V2: &str = "\
25 30 0:23 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";

    #[test]
    fn hybrid_host_uses_unified() {
        assert_eq!(
            find_v2_mount(&parse(HYBRID)),
            Some("/sys/fs/cgroup/unified".into())
        );
    }

    #[test]
    fn pure_v2_host_uses_sys_fs_cgroup() {
        assert_eq!(
            find_v2_mount(&parse(PURE_V2)),
            Some("/sys/fs/cgroup".into())
        );
    }

    #[test]
    fn sys_fs_cgroup_wins_over_other_v2_mounts() {
        let both = format!("{PURE_V2}90 25 0:23 / /host/sys/fs/cgroup rw - cgroup2 cgroup2 rw\n");
        assert_eq!(find_v2_mount(&parse(&both)), Some("/sys/fs/cgroup".into()));
        let other = "90 25 0:23 / /host/sys/fs/cgroup rw - cgroup2 cgroup2 rw\n\
                     91 25 0:23 / /a/much/longer/path/cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            find_v2_mount(&parse(other)),
            Some("/host/sys/fs/cgroup".into())
        );
    }

    #[test]
    fn v1_only_has_no_v2_mount() {
        let v1_only: String = HYBRID
            .lines()
            .filter(|l| !l.contains("cgroup2"))
            .collect::<Vec<_>>()
            .join("\n");
        assert_eq!(find_v2_mount(&parse(&v1_only)), None);
        assert_eq!(find_v2_mount(&parse("")), None);
        assert_eq!(
            find_v2_mount(&parse("garbage line without separator\n - \n")),
            None
        );
    }

    #[test]
    fn the_hosts_tree_in_a_container_is_found_under_its_mount() {
        // A container on a hybrid host with a private cgroup namespace: its own cgroup2 at
        // /sys/fs/cgroup (root "/"), the host's tree bind-mounted at /host/sys/fs/cgroup, whose
        // cgroup2 part sits at .../unified and shows as "/.." from inside the namespace.
        let in_container = "\
700 690 0:27 / /sys/fs/cgroup ro,nosuid - cgroup2 cgroup rw
701 690 0:26 / /host/sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
702 701 0:27 /../.. /host/sys/fs/cgroup/unified ro,nosuid - cgroup2 cgroup2 rw,nsdelegate
703 701 0:30 / /host/sys/fs/cgroup/memory ro,nosuid - cgroup cgroup rw,memory
";
        assert_eq!(
            find_v2_mount_under(&parse(in_container), Path::new("/host/sys/fs/cgroup")),
            Some("/host/sys/fs/cgroup/unified".into())
        );
        let pure = "800 790 0:23 / /host/sys/fs/cgroup ro - cgroup2 cgroup2 rw\n";
        assert_eq!(
            find_v2_mount_under(&parse(pure), Path::new("/host/sys/fs/cgroup")),
            Some("/host/sys/fs/cgroup".into())
        );
        // Not "/host/sys/fs/cgroupfoo": a path prefix is a whole component.
        let beside = "801 790 0:23 / /host/sys/fs/cgroupfoo ro - cgroup2 cgroup2 rw\n";
        assert_eq!(
            find_v2_mount_under(&parse(beside), Path::new("/host/sys/fs/cgroup")),
            None
        );
        assert_eq!(
            find_v2_mount_under(&parse(in_container), Path::new("/elsewhere")),
            None
        );
    }

    #[test]
    fn escaped_mount_points_are_unescaped() {
        let line = "30 29 0:27 / /mnt/my\\040cgroups rw - cgroup2 cgroup2 rw\n";
        assert_eq!(find_v2_mount(&parse(line)), Some("/mnt/my cgroups".into()));
    }

    #[test]
    fn index_maps_inodes_to_relative_paths() {
        let dir = std::env::temp_dir().join(format!("observer-index-{}", std::process::id()));
        fs::create_dir_all(dir.join("a/b")).unwrap();
        fs::create_dir_all(dir.join("c")).unwrap();
        fs::write(dir.join("a/file"), b"").unwrap();
        let index = CgroupIndex::scan(&dir).unwrap();
        let id_b = cgroup_id(&dir.join("a/b")).unwrap();
        assert_eq!(index.path(id_b), Some("/a/b"));
        assert_eq!(index.path(cgroup_id(&dir).unwrap()), Some("/"));
        assert_eq!(index.len(), 4, "root, a, a/b, c: files are not cgroups");
        fs::remove_dir_all(&dir).unwrap();
    }
}
