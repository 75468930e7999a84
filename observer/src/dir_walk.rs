//! Walking a directory tree by descriptors: each directory is opened relative to its parent
//! (`openat`), so an open looks up one name instead of the whole path from the root again.
//! observer walks the cgroup hierarchy every interval, a thousand directories or more, where
//! the path lookups were a tenth of the interval's CPU.

use std::{
    ffi::{CStr, CString},
    io,
    os::unix::ffi::OsStrExt as _,
    path::Path,
    ptr::NonNull,
    rc::Rc,
};

/// An open directory stream.
struct Dir(NonNull<libc::DIR>);

impl Dir {
    /// `name` relative to `parent` (or the working directory), as a directory: symbolic
    /// links are not followed below the root.
    fn open_at(parent: Option<&Dir>, name: &CStr) -> io::Result<Self> {
        let (at, nofollow) = match parent {
            Some(p) => (p.fd(), libc::O_NOFOLLOW),
            None => (libc::AT_FDCWD, 0),
        };
        let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC | nofollow;
        // SAFETY: `name` is NUL-terminated; `at` is an open directory or AT_FDCWD.
        let fd = unsafe { libc::openat(at, name.as_ptr(), flags) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is ours; on success the stream owns it.
        let stream = unsafe { libc::fdopendir(fd) };
        match NonNull::new(stream) {
            Some(stream) => Ok(Self(stream)),
            None => {
                let e = io::Error::last_os_error();
                // SAFETY: fdopendir failed, so the fd is still ours to close.
                unsafe { libc::close(fd) };
                Err(e)
            }
        }
    }

    fn fd(&self) -> libc::c_int {
        // SAFETY: the stream is open for as long as self lives.
        unsafe { libc::dirfd(self.0.as_ptr()) }
    }

    /// The entries that may be directories (d_type DT_DIR, or DT_UNKNOWN where the file
    /// system does not say), with their inode numbers; not `.` and `..`.
    fn subdirs(&mut self) -> Vec<(u64, CString)> {
        let mut found = Vec::new();
        loop {
            // SAFETY: the stream is open; the entry is valid until the next readdir.
            let entry = unsafe { libc::readdir(self.0.as_ptr()) };
            let Some(entry) = NonNull::new(entry) else {
                return found;
            };
            // SAFETY: readdir returned a valid entry.
            let entry = unsafe { entry.as_ref() };
            if entry.d_type != libc::DT_DIR && entry.d_type != libc::DT_UNKNOWN {
                continue;
            }
            // SAFETY: d_name is NUL-terminated.
            let name = unsafe { CStr::from_ptr(entry.d_name.as_ptr()) };
            if name == c"." || name == c".." {
                continue;
            }
            found.push((entry.d_ino, name.to_owned()));
        }
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        // SAFETY: the stream is open and closed only here.
        unsafe { libc::closedir(self.0.as_ptr()) };
    }
}

/// Calls `each(inode, path)` for every directory below `root` (not `root` itself), with its
/// path relative to `root` ("/a/b"). Directories that go during the walk are skipped; only
/// `root` itself failing to open is an error. Directory descriptors stay open only while
/// their subdirectories wait to be opened: at most a few per level of depth.
pub fn subdirs(root: &Path, mut each: impl FnMut(u64, &str)) -> io::Result<()> {
    let root_name = CString::new(root.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut root = Dir::open_at(None, &root_name)?;
    let children = root.subdirs();
    let root = Rc::new(root);
    let mut stack: Vec<(Rc<Dir>, u64, CString, Rc<str>)> = children
        .into_iter()
        .map(|(ino, name)| (root.clone(), ino, name, Rc::from("")))
        .collect();
    while let Some((parent, ino, name, parent_rel)) = stack.pop() {
        let opened = Dir::open_at(Some(&parent), &name);
        drop(parent);
        let Ok(mut dir) = opened else {
            // Gone since its parent was listed, or not a directory after all (DT_UNKNOWN).
            continue;
        };
        let rel: Rc<str> = Rc::from(format!("{parent_rel}/{}", name.to_string_lossy()));
        each(ino, &rel);
        let children = dir.subdirs();
        if children.is_empty() {
            continue;
        }
        let dir = Rc::new(dir);
        stack.extend(
            children
                .into_iter()
                .map(|(ino, name)| (dir.clone(), ino, name, rel.clone())),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, fs, os::unix::fs::MetadataExt as _};

    use super::*;

    #[test]
    fn every_directory_below_the_root_with_its_inode_and_no_files_or_links() {
        let root = std::env::temp_dir().join(format!("observer-dir-walk-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        for d in ["a/b/c", "a/d", "e f", "g"] {
            fs::create_dir_all(root.join(d)).unwrap();
        }
        fs::write(root.join("a/file"), "x").unwrap();
        std::os::unix::fs::symlink(root.join("a"), root.join("g/link")).unwrap();
        let mut seen = BTreeMap::new();
        subdirs(&root, |ino, rel| {
            assert!(seen.insert(rel.to_owned(), ino).is_none(), "{rel} twice");
        })
        .unwrap();
        let want: BTreeMap<String, u64> = ["/a", "/a/b", "/a/b/c", "/a/d", "/e f", "/g"]
            .iter()
            .map(|rel| {
                let ino = fs::metadata(root.join(&rel[1..])).unwrap().ino();
                (rel.to_string(), ino)
            })
            .collect();
        fs::remove_dir_all(&root).unwrap();
        assert_eq!(seen, want);
    }

    #[test]
    fn a_missing_root_is_an_error() {
        let err = subdirs(Path::new("/nonexistent/observer-dir-walk"), |_, _| {}).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }
}
