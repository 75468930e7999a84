//! Where the host's files are: on the host itself, or inside a container that mounts them under
//! one directory (`--host-root /host`: the host's `/sys/fs/cgroup` at `/host/sys/fs/cgroup`, its
//! `/proc` at `/host/proc`).
//!
//! Inside a container, `/sys/fs/cgroup` and `/proc` are the container's own (a private cgroup
//! namespace, the default for Docker and containerd on cgroup v2, shows only its own subtree),
//! so every host path observer uses comes from this one place.

use std::path::{Path, PathBuf};

use crate::{
    cgroupfs::{self, CgroupError},
    defaults::{CGROUP_DIR, PROC_DIR},
    mountinfo,
};

#[derive(Debug, thiserror::Error)]
pub enum HostPathError {
    #[error(
        "--host-root {root}: {cgroup_dir} holds no cgroup v2 hierarchy (neither it nor \
         {cgroup_dir}/unified is a cgroup2 mount): mount the host's /sys/fs/cgroup there \
         (Docker: -v /sys/fs/cgroup:{cgroup_dir}:ro; Kubernetes: a hostPath volume of /sys/fs/cgroup)"
    )]
    NoCgroupMount { root: PathBuf, cgroup_dir: PathBuf },
    #[error(
        "--host-root {root}: {proc_dir}/stat is missing: mount the host's /proc there \
         (Docker: -v /proc:{proc_dir}:ro; Kubernetes: a hostPath volume of /proc)"
    )]
    NoProc { root: PathBuf, proc_dir: PathBuf },
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
}

/// The host paths one run uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPaths {
    /// The cgroup v2 mount programs attach at and ids are named from.
    pub cgroup_root: PathBuf,
    /// The cgroup tree CPU and memory are read from (v1 controllers beside v2 on hybrid hosts).
    pub cgroupfs: PathBuf,
    /// procfs of the host (CPU count, memory).
    pub proc: PathBuf,
}

/// What the command line says; each explicit path wins over what `host_root` implies.
#[derive(Debug, Clone, Default)]
pub struct HostPathArgs<'a> {
    pub host_root: Option<&'a Path>,
    pub cgroup_root: Option<&'a Path>,
    pub cgroupfs: Option<&'a Path>,
    pub proc: Option<&'a Path>,
}

impl HostPaths {
    /// Resolves the paths, checking each one `host_root` implies, so a missing mount is named.
    pub fn resolve(args: &HostPathArgs<'_>) -> Result<Self, HostPathError> {
        let Some(root) = args.host_root else {
            return Ok(Self {
                cgroup_root: cgroupfs::detect_root(args.cgroup_root)?,
                cgroupfs: args
                    .cgroupfs
                    .map_or_else(|| CGROUP_DIR.into(), Path::to_owned),
                proc: args.proc.map_or_else(|| PROC_DIR.into(), Path::to_owned),
            });
        };
        let cgroupfs = args
            .cgroupfs
            .map_or_else(|| under(root, CGROUP_DIR), Path::to_owned);
        let cgroup_root = match args.cgroup_root {
            Some(explicit) => cgroupfs::detect_root(Some(explicit))?,
            None => v2_root_under(&cgroupfs).ok_or_else(|| HostPathError::NoCgroupMount {
                root: root.to_owned(),
                cgroup_dir: cgroupfs.clone(),
            })?,
        };
        let proc = args
            .proc
            .map_or_else(|| under(root, PROC_DIR), Path::to_owned);
        if !proc.join("stat").is_file() {
            return Err(HostPathError::NoProc {
                root: root.to_owned(),
                proc_dir: proc,
            });
        }
        Ok(Self {
            cgroup_root,
            cgroupfs,
            proc,
        })
    }
}

/// `path` (absolute) moved under `root`.
fn under(root: &Path, path: &str) -> PathBuf {
    root.join(path.trim_start_matches('/'))
}

/// The cgroup2 mount at or below `cgroup_dir`: from /proc/self/mountinfo (the shortest mount
/// point under it), else `cgroup_dir` itself or its `unified` directory if either is cgroup2.
fn v2_root_under(cgroup_dir: &Path) -> Option<PathBuf> {
    let from_mountinfo = mountinfo::read_self()
        .ok()
        .and_then(|mounts| cgroupfs::find_v2_mount_under(&mounts, cgroup_dir));
    from_mountinfo.or_else(|| {
        [cgroup_dir.to_owned(), cgroup_dir.join("unified")]
            .into_iter()
            .find(|p| cgroupfs::is_cgroup2(p).unwrap_or(false))
    })
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    #[test]
    fn paths_move_under_the_host_root() {
        assert_eq!(
            under(Path::new("/host"), "/sys/fs/cgroup"),
            Path::new("/host/sys/fs/cgroup")
        );
        assert_eq!(under(Path::new("/host"), "/proc"), Path::new("/host/proc"));
    }

    #[test]
    fn a_host_root_without_mounts_names_what_is_missing() {
        let dir = std::env::temp_dir().join(format!("observer-host-root-{}", std::process::id()));
        fs::create_dir_all(dir.join("sys/fs/cgroup")).unwrap();
        let err = HostPaths::resolve(&HostPathArgs {
            host_root: Some(&dir),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("sys/fs/cgroup holds no cgroup v2 hierarchy"),
            "{err}"
        );
        assert!(err.contains("-v /sys/fs/cgroup:"), "{err}");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn without_a_host_root_the_defaults_stand() {
        let paths = HostPaths::resolve(&HostPathArgs {
            cgroup_root: None,
            ..Default::default()
        });
        // The machine running the tests may have no cgroup2 at all; only check the rest.
        if let Ok(paths) = paths {
            assert_eq!(paths.cgroupfs, Path::new(CGROUP_DIR));
            assert_eq!(paths.proc, Path::new(PROC_DIR));
        }
    }
}
