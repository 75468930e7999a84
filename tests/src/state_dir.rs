//! observer's state directory for the deploy tests: a directory of the test's own standing in
//! for the node's /var/lib/observer (which the manifests mount), so that a test never writes
//! into the real one. Its parent is made here; the directory itself is left for the platform
//! (Docker's bind, the kubelet's DirectoryOrCreate) to create, as on a new node. Removed with
//! everything in it when dropped, also when the test fails.

use std::{
    fs,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use anyhow::{ensure, Context as _, Result};

use crate::k8s_pod::TempDir;

/// The host directory the deploy manifests mount as observer's state dir.
pub const NODE_STATE_DIR: &str = "/var/lib/observer";
/// The Mackerel output's file in it (observer/src/mackerel/state.rs).
pub const MACKEREL_FILE: &str = "mackerel.json";

/// A stand-in for the node's state directory.
pub struct StateDir {
    parent: TempDir,
    /// Whether the node's real directory existed when the test began.
    node_dir_existed: bool,
}

/// What [`StateDir::check_file`] found.
#[derive(Debug, Clone, Copy)]
pub struct StateFacts {
    pub file_bytes: u64,
    pub file_mode: u32,
    pub dir_mode: u32,
}

impl StateDir {
    pub fn new(label: &str) -> Result<Self> {
        Ok(Self {
            node_dir_existed: Path::new(NODE_STATE_DIR).exists(),
            parent: TempDir::new(label)?,
        })
    }

    /// Where the manifest's state volume points instead (not made yet).
    pub fn path(&self) -> PathBuf {
        self.parent.path().join("var-lib-observer")
    }

    /// The Mackerel state file is there, private to `uid` (0600, owned by it), in a
    /// directory owned by `uid` that no one else can write to (so no one can swap the file).
    pub fn check_file(&self, uid: u32) -> Result<StateFacts> {
        let dir = self.path();
        let file = dir.join(MACKEREL_FILE);
        let d = fs::metadata(&dir).with_context(|| format!("state dir {}", dir.display()))?;
        let f = fs::metadata(&file).with_context(|| {
            format!(
                "no state file {} (the dir holds {:?})",
                file.display(),
                fs::read_dir(&dir)
                    .map(|r| r.flatten().map(|e| e.file_name()).collect::<Vec<_>>())
                    .unwrap_or_default()
            )
        })?;
        let facts = StateFacts {
            file_bytes: f.len(),
            file_mode: f.permissions().mode() & 0o7777,
            dir_mode: d.permissions().mode() & 0o7777,
        };
        ensure!(f.is_file(), "{} is not a regular file", file.display());
        ensure!(
            facts.file_mode == 0o600,
            "{} has mode {:o}, want 600",
            file.display(),
            facts.file_mode
        );
        ensure!(
            f.uid() == uid && d.uid() == uid,
            "state file owned by uid {}, its dir by uid {}; the container runs as uid {uid}",
            f.uid(),
            d.uid()
        );
        ensure!(
            facts.dir_mode & 0o022 == 0,
            "state dir {} has mode {:o}: others can replace the file",
            dir.display(),
            facts.dir_mode
        );
        ensure!(facts.file_bytes > 0, "{} is empty", file.display());
        Ok(facts)
    }

    /// The state file's JSON.
    pub fn read(&self) -> Result<serde_json::Value> {
        let file = self.path().join(MACKEREL_FILE);
        let text = fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
        serde_json::from_slice(&text).with_context(|| format!("{} is not JSON", file.display()))
    }

    /// The node's real state directory, if the test made it (it must not).
    pub fn node_dir_made(&self) -> Option<String> {
        (!self.node_dir_existed && Path::new(NODE_STATE_DIR).exists())
            .then(|| format!("{NODE_STATE_DIR} (the node's real state dir) was created"))
    }
}
