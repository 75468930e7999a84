//! Pinned state: the maps and the program links live in a bpffs directory
//! (`--bpf-pin-dir`, default /sys/fs/bpf/observer), so they outlive the process. A restarted or
//! upgraded observer re-opens the maps, swaps its new programs in behind the pinned links
//! (`BPF_LINK_UPDATE`: atomic, no packet lost or counted twice) and reports the difference
//! since the last report. `observer detach` removes it all.
//!
//! aya re-uses a pinned map without checking its shape, so every pin is compared with what this
//! build defines before it is used; one of another shape is set aside (unpinned, held open)
//! for its counts to be carried over, never read as if it were the new one.

use std::{
    ffi::CString,
    fs, io,
    os::{
        fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::{Path, PathBuf},
};

use aya::maps::{MapData, MapInfo, MapType};

/// statfs(2) magic of a bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// Where distributions mount bpffs; observer mounts one there if nothing is.
pub const BPFFS: &str = "/sys/fs/bpf";

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_DETACH: libc::c_long = 34;

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error(
        "{dir} is not on a bpffs, so nothing can be pinned there: mount one \
         (mount -t bpf bpf {BPFFS}; in a container mount the host's {BPFFS}) or choose \
         another --bpf-pin-dir; --no-pin runs without (counts are then lost on every restart)"
    )]
    NotBpffs { dir: PathBuf },
    #[error(
        "no bpffs is mounted at {BPFFS} and mounting one failed ({source}): mount it on the \
         host (mount -t bpf bpf {BPFFS}, or systemd's sys-fs-bpf.mount) or run with --no-pin"
    )]
    Mount { source: io::Error },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{what} {path}: {source}")]
    Syscall {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> PinError + '_ {
    move |source| PinError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A directory on a bpffs that observer pins into.
#[derive(Debug, Clone)]
pub struct PinDir {
    dir: PathBuf,
}

/// What a map of this build looks like, to compare a pin with.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shape {
    pub map_type: MapType,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    /// BPF_F_* creation flags (preallocation).
    pub map_flags: u32,
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:?}, {} B keys, {} B values, {} entries, flags {:#x}",
            self.map_type, self.key_size, self.value_size, self.max_entries, self.map_flags
        )
    }
}

/// How a pinned map compares with this build's.
#[derive(Debug)]
pub enum Found {
    /// Nothing pinned: it will be made.
    Absent,
    /// The same shape: re-opened, its counts go on.
    Same,
    /// Another shape: unpinned so that this build's can be made at its path, and held open
    /// here meanwhile. `readable` when keys and values are laid out as this build's (only the
    /// size changed), so its counts can be carried over.
    Other {
        found: Shape,
        map: MapData,
        readable: bool,
    },
}

impl PinDir {
    /// `dir`, made if missing, on a bpffs: when `dir` lies under [`BPFFS`], no bpffs is
    /// mounted there and `may_mount` (on the host, not in a container, where a bpffs of its
    /// own would vanish with it), one is mounted (what bpfman does; it needs CAP_SYS_ADMIN).
    pub fn prepare(dir: &Path, may_mount: bool) -> Result<Self, PinError> {
        if may_mount && dir.starts_with(BPFFS) && !is_bpffs(Path::new(BPFFS)) {
            mount_bpffs(Path::new(BPFFS))?;
            log::info!("mounted a bpffs at {BPFFS} for observer's pinned state");
        }
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        if !is_bpffs(dir) {
            return Err(PinError::NotBpffs {
                dir: dir.to_owned(),
            });
        }
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where map `name` is pinned.
    pub fn map(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Where the link of program `name` is pinned.
    pub fn link(&self, program: &str) -> PathBuf {
        self.dir.join(format!("link_{program}"))
    }

    /// Compares the pin of map `name` with `want`; one of another shape is moved aside.
    pub fn check_map(&self, name: &str, want: Shape) -> Result<Found, PinError> {
        let path = self.map(name);
        if !path.exists() {
            return Ok(Found::Absent);
        }
        let info = MapInfo::from_pin(&path).map_err(|e| PinError::Syscall {
            what: "reading the pinned map",
            path: path.clone(),
            source: io::Error::other(e.to_string()),
        })?;
        let found = Shape {
            map_type: info.map_type().unwrap_or(MapType::Unspecified),
            key_size: info.key_size(),
            value_size: info.value_size(),
            max_entries: info.max_entries(),
            map_flags: info.map_flags(),
        };
        if found == want {
            return Ok(Found::Same);
        }
        // bpffs does not rename: hold the old map by its fd and free the path for the new one.
        let map = MapData::from_pin(&path).map_err(|e| PinError::Syscall {
            what: "opening the pinned map",
            path: path.clone(),
            source: io::Error::other(e.to_string()),
        })?;
        fs::remove_file(&path).map_err(io_err(&path))?;
        Ok(Found::Other {
            found,
            map,
            readable: found.map_type == want.map_type
                && found.key_size == want.key_size
                && found.value_size == want.value_size,
        })
    }
}

/// True iff `path` is on a bpffs.
pub fn is_bpffs(path: &Path) -> bool {
    let Ok(c_path) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs is plain integers, for which all zeroes is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c_path is NUL-terminated and st is a valid out-pointer.
    unsafe { libc::statfs(c_path.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC }
}

fn mount_bpffs(at: &Path) -> Result<(), PinError> {
    fs::create_dir_all(at).map_err(|source| PinError::Mount { source })?;
    let target = CString::new(at.as_os_str().as_bytes()).map_err(|e| PinError::Mount {
        source: io::Error::new(io::ErrorKind::InvalidInput, e),
    })?;
    // SAFETY: all pointers are to NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(PinError::Mount {
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// bpf(2) with `attr`, the prefix of `union bpf_attr` that `cmd` reads: what the kernel
/// returned (-1 with errno set on failure).
///
/// # Safety
/// `attr` must be laid out as `cmd` reads it, and every pointer in it valid for the call.
pub(crate) unsafe fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> libc::c_long {
    // SAFETY: the caller's promise; the kernel reads at most size_of::<T>() bytes of attr.
    unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, size_of::<T>()) }
}

/// `union bpf_attr` as BPF_OBJ_GET reads it.
#[repr(C)]
#[derive(Default)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

/// `union bpf_attr` as BPF_LINK_UPDATE reads it.
#[repr(C)]
#[derive(Default)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// Opens a pinned object.
pub fn open_pinned(path: &Path) -> Result<OwnedFd, PinError> {
    let c_path = CString::new(path.as_os_str().as_bytes()).map_err(|e| PinError::Io {
        path: path.to_owned(),
        source: io::Error::new(io::ErrorKind::InvalidInput, e),
    })?;
    let mut attr = ObjGetAttr {
        pathname: c_path.as_ptr() as u64,
        ..Default::default()
    };
    // SAFETY: attr is a valid bpf_attr prefix for BPF_OBJ_GET; the path outlives the call.
    let fd = unsafe { sys_bpf(BPF_OBJ_GET, &mut attr) };
    if fd < 0 {
        return Err(PinError::Syscall {
            what: "opening the pin",
            path: path.to_owned(),
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: the kernel just returned this fd to us alone.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Swaps the program behind the pinned link at `link` for `program`, atomically: the hook
/// never runs without one, nor with both.
pub fn update_link(link: &Path, program: BorrowedFd<'_>) -> Result<(), PinError> {
    let link_fd = open_pinned(link)?;
    let mut attr = LinkUpdateAttr {
        link_fd: link_fd.as_raw_fd() as u32,
        new_prog_fd: program.as_raw_fd() as u32,
        ..Default::default()
    };
    // SAFETY: attr is a valid bpf_attr prefix for BPF_LINK_UPDATE; both fds are open.
    let rc = unsafe { sys_bpf(BPF_LINK_UPDATE, &mut attr) };
    if rc < 0 {
        return Err(PinError::Syscall {
            what: "replacing the program behind the pinned link",
            path: link.to_owned(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// What `observer detach` removed, and the programs that were still loaded when it stopped
/// waiting (held by another process, such as an observer still running).
#[derive(Debug, Default)]
pub struct Removed {
    pub paths: Vec<PathBuf>,
    pub still_loaded: Vec<u32>,
}

/// How long `remove_all` waits for the kernel to free the programs behind removed links.
const FREED_WITHIN: std::time::Duration = std::time::Duration::from_secs(10);

/// Removes everything observer pinned in `dir`, links first, then the maps, then the
/// directory, and waits until the programs behind the links are gone. A directory that is not
/// there is nothing to do.
///
/// Each link is detached explicitly (`BPF_LINK_DETACH`) before its pin goes: removing a pin
/// alone frees the link only after an RCU grace period and a kernel work item, so its program
/// would go on counting, and stay loaded, for a moment after this returned.
pub fn remove_all(dir: &Path) -> Result<Removed, PinError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Removed::default()),
        Err(source) => {
            return Err(PinError::Io {
                path: dir.to_owned(),
                source,
            })
        }
    };
    let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    let is_link = |p: &Path| {
        p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("link_"))
    };
    // Links before maps: the programs stop before their maps go.
    paths.sort_by_key(|p| !is_link(p));
    let mut programs = Vec::new();
    for path in &paths {
        if is_link(path) {
            // Best effort: a kernel without BPF_LINK_DETACH (before 5.9) or a link whose cgroup
            // is gone still detaches when the pin goes; the wait below covers both.
            if let Ok(link) = open_pinned(path) {
                programs.extend(link_program(link.as_fd()));
                link_detach(link.as_fd());
            }
        }
        fs::remove_file(path).map_err(io_err(path))?;
    }
    fs::remove_dir(dir).map_err(io_err(dir))?;
    let deadline = std::time::Instant::now() + FREED_WITHIN;
    loop {
        programs.retain(|&id| program_loaded(id));
        if programs.is_empty() || std::time::Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Ok(Removed {
        paths,
        still_loaded: programs,
    })
}

/// `union bpf_attr` as BPF_OBJ_GET_INFO_BY_FD reads it.
#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// The id of the program behind a link (`struct bpf_link_info`: type, id, prog_id).
fn link_program(link: BorrowedFd<'_>) -> Option<u32> {
    let mut info = [0u32; 16];
    let mut attr = InfoAttr {
        bpf_fd: link.as_raw_fd() as u32,
        info_len: size_of_val(&info) as u32,
        info: info.as_mut_ptr() as u64,
    };
    // SAFETY: attr is a valid bpf_attr prefix for BPF_OBJ_GET_INFO_BY_FD; the kernel writes at
    // most info_len bytes into info, which outlives the call.
    let rc = unsafe { sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr) };
    (rc == 0 && info[2] != 0).then_some(info[2])
}

fn link_detach(link: BorrowedFd<'_>) {
    let mut attr = [link.as_raw_fd() as u32, 0];
    // SAFETY: attr is a valid bpf_attr prefix for BPF_LINK_DETACH (link_fd).
    unsafe { sys_bpf(BPF_LINK_DETACH, &mut attr) };
}

/// Whether a program with this id is still loaded.
fn program_loaded(id: u32) -> bool {
    // prog_id, next_id, open_flags
    let mut attr = [id, 0, 0];
    // SAFETY: attr is a valid bpf_attr prefix for BPF_PROG_GET_FD_BY_ID.
    let fd = unsafe { sys_bpf(BPF_PROG_GET_FD_BY_ID, &mut attr) };
    if fd >= 0 {
        // SAFETY: the kernel just returned this fd to us alone.
        drop(unsafe { OwnedFd::from_raw_fd(fd as i32) });
        return true;
    }
    // Anything but "no such program" (a permission error) is not proof that it is gone.
    io::Error::last_os_error().raw_os_error() != Some(libc::ENOENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_directory_is_not_a_bpffs() {
        let dir = std::env::temp_dir().join(format!("observer-pin-{}", std::process::id()));
        let err = PinDir::prepare(&dir, false).unwrap_err();
        assert!(matches!(err, PinError::NotBpffs { .. }), "{err}");
        assert!(err.to_string().contains("--no-pin"), "{err}");
        let _ = fs::remove_dir(&dir);
    }

    #[test]
    fn removing_a_directory_that_is_not_there_is_nothing() {
        assert!(remove_all(Path::new("/nonexistent/observer-pins"))
            .unwrap()
            .paths
            .is_empty());
    }

    #[test]
    fn shapes_say_what_they_are() {
        let s = Shape {
            map_type: MapType::PerCpuHash,
            key_size: 8,
            value_size: 64,
            max_entries: 16384,
            map_flags: 1,
        };
        assert_eq!(
            s.to_string(),
            "PerCpuHash, 8 B keys, 64 B values, 16384 entries, flags 0x1"
        );
    }
}
