//! What the Mackerel output keeps across restarts, in one file under `--state-dir`: the hosts
//! it made (so a restarted observer retires those whose tasks ended while it was down), the
//! values the API has not taken yet (so a restart during an outage loses none), and the
//! Mackerel interval being filled (so a restart inside a minute does not post it twice).
//!
//! Written whole to a temporary file and renamed, so a crash leaves the old file or the new
//! one. A value posted before a crash may be posted again after it: same host, name and time,
//! which Mackerel stores once. The file holds no key; it names the API base it belongs to.

use std::{
    fs,
    io::{self, Write},
    os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use super::{buffer::SavedChunk, minutes::Period};

/// Name of the file under the state directory.
pub const FILE: &str = "mackerel.json";
const VERSION: u32 = 1;
/// Largest state file read: the buffer's bound at its default is far below it.
const MAX_FILE: u64 = 512 << 20;

/// A host observer made or found, as the file keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedHost {
    pub key: String,
    pub host_id: String,
    pub name: String,
}

/// The whole file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Saved {
    pub version: u32,
    /// The API the hosts and values belong to.
    pub api_base: String,
    pub hosts: Vec<SavedHost>,
    pub open: Option<Period>,
    pub buffer: Vec<SavedChunk>,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("Mackerel state directory {path}: {source}")]
    Dir { path: PathBuf, source: io::Error },
    #[error("writing Mackerel state {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("reading Mackerel state {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("Mackerel state {path} is larger than {} MiB; set aside", MAX_FILE >> 20)]
    TooLarge { path: PathBuf },
    #[error("Mackerel state {path} cannot be read ({reason}); set aside")]
    Corrupt { path: PathBuf, reason: String },
}

/// The state file of one state directory.
#[derive(Debug, Clone)]
pub struct StateFile {
    path: PathBuf,
}

impl StateFile {
    /// Creates the directory if needed, mode 0700 (the file says which hosts exist); one the
    /// platform made for a mount (0755, as the kubelet and Docker make them) is narrowed to
    /// 0700 when observer owns it.
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        let dir_error = |source| StateError::Dir {
            path: dir.to_path_buf(),
            source,
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(dir_error)?;
        let meta = fs::metadata(dir).map_err(dir_error)?;
        // SAFETY: geteuid cannot fail.
        let me = unsafe { libc::geteuid() };
        if meta.permissions().mode() & 0o077 != 0 && meta.uid() == me {
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(dir_error)?;
        }
        Ok(Self {
            path: dir.join(FILE),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The saved state, None if there is none. A file that cannot be read is renamed to
    /// `<name>.bad` (kept for a person to look at) and reported, never fatal.
    pub fn load(&self) -> Result<Option<Saved>, StateError> {
        let read = |source| StateError::Read {
            path: self.path.clone(),
            source,
        };
        let len = match fs::metadata(&self.path) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(read(e)),
        };
        if len > MAX_FILE {
            self.set_aside();
            return Err(StateError::TooLarge {
                path: self.path.clone(),
            });
        }
        let bytes = fs::read(&self.path).map_err(read)?;
        let saved: Saved = match serde_json::from_slice(&bytes) {
            Ok(s) => s,
            Err(e) => {
                self.set_aside();
                return Err(StateError::Corrupt {
                    path: self.path.clone(),
                    reason: crate::body::clip(&e),
                });
            }
        };
        if saved.version != VERSION {
            self.set_aside();
            return Err(StateError::Corrupt {
                path: self.path.clone(),
                reason: format!("version {}, this observer reads {VERSION}", saved.version),
            });
        }
        Ok(Some(saved))
    }

    /// Replaces the file with `saved`; removes it when there is nothing to keep.
    pub fn store(&self, saved: &Saved) -> Result<(), StateError> {
        let write = |source| StateError::Write {
            path: self.path.clone(),
            source,
        };
        if saved.hosts.is_empty() && saved.open.is_none() && saved.buffer.is_empty() {
            return match fs::remove_file(&self.path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(write(e)),
                _ => Ok(()),
            };
        }
        let tmp = self.path.with_extension("json.tmp");
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(write)?;
        let mut out = io::BufWriter::new(&mut file);
        serde_json::to_writer(&mut out, saved).map_err(|e| write(e.into()))?;
        out.flush().map_err(write)?;
        drop(out);
        file.sync_data().map_err(write)?;
        fs::rename(&tmp, &self.path).map_err(write)
    }

    fn set_aside(&self) {
        let _ = fs::rename(&self.path, self.path.with_extension("json.bad"));
    }
}

impl Saved {
    pub fn new(api_base: &str) -> Self {
        Self {
            version: VERSION,
            api_base: api_base.to_string(),
            hosts: Vec::new(),
            open: None,
            buffer: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("observer-state-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn sample() -> Saved {
        Saved {
            hosts: vec![SavedHost {
                key: "uid.kubernetes".into(),
                host_id: "3Cdb7Yqz5Hx".into(),
                name: "web-1".into(),
            }],
            buffer: vec![SavedChunk {
                key: "uid.kubernetes".into(),
                time: 1_800_000_000,
                values: vec![("container.cpu.app.usage".into(), 12.5)],
            }],
            ..Saved::new("https://api.mackerelio.com/")
        }
    }

    #[test]
    fn a_directory_made_by_the_platform_is_narrowed() {
        let d = dir("narrowed");
        fs::create_dir_all(&d).unwrap();
        fs::set_permissions(&d, fs::Permissions::from_mode(0o755)).unwrap();
        StateFile::open(&d).unwrap();
        assert_eq!(
            fs::metadata(&d).unwrap().permissions().mode() & 0o777,
            0o700
        );
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn stored_and_loaded_with_private_modes() {
        let d = dir("roundtrip");
        let f = StateFile::open(&d).unwrap();
        assert_eq!(f.load().unwrap(), None);
        f.store(&sample()).unwrap();
        assert_eq!(f.load().unwrap(), Some(sample()));
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(f.path()), 0o600);
        assert_eq!(mode(&d), 0o700);
        // Nothing to keep: no file.
        f.store(&Saved::new("x")).unwrap();
        assert!(!f.path().exists());
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn a_bad_file_is_set_aside_not_fatal() {
        let d = dir("bad");
        let f = StateFile::open(&d).unwrap();
        fs::write(f.path(), b"{\"version\":1,\"hosts\":[tru").unwrap();
        let err = f.load().unwrap_err().to_string();
        assert!(err.contains("cannot be read"), "{err}");
        assert!(d.join("mackerel.json.bad").exists());
        assert_eq!(f.load().unwrap(), None);
        let mut future = sample();
        future.version = 9;
        fs::write(f.path(), serde_json::to_vec(&future).unwrap()).unwrap();
        let err = f.load().unwrap_err().to_string();
        assert!(err.contains("version 9"), "{err}");
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn a_directory_that_cannot_be_made_is_an_error_naming_it() {
        let err = StateFile::open(Path::new("/proc/observer-state"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/proc/observer-state"), "{err}");
    }
}
