//! A cgroup made by a test under the v2 root.

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

pub struct TestCgroup {
    path: PathBuf,
    rel: String,
    id: u64,
}

impl TestCgroup {
    /// Makes `<v2 root>/observer-test-<label>-<pid>-<n>`.
    pub fn new(label: &str) -> anyhow::Result<Self> {
        Self::under(&crate::v2_root(), label)
    }

    pub fn under(root: &Path, label: &str) -> anyhow::Result<Self> {
        let name = crate::unique(&format!("observer-test-{label}"));
        let path = root.join(&name);
        fs::create_dir(&path)?;
        let id = observer::cgroupfs::cgroup_id(&path)?;
        Ok(Self {
            path,
            rel: format!("/{name}"),
            id,
        })
    }

    /// The id bpf_skb_cgroup_id reports for sockets made in this cgroup.
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Path relative to the v2 root, as observer prints it.
    pub fn rel(&self) -> &str {
        &self.rel
    }

    pub fn procs(&self) -> Vec<i32> {
        fs::read_to_string(self.path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// Kills what runs here and removes the directory.
    pub fn remove(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            for pid in self.procs() {
                // SAFETY: signalling a pid; at worst it is already gone.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            match fs::remove_dir(&self.path) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(e) if Instant::now() > deadline => return Err(e.into()),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        if let Err(e) = self.remove() {
            eprintln!("could not remove cgroup {}: {e}", self.path.display());
        }
    }
}
