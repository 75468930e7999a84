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
    /// Parents made for it (innermost first), removed after it.
    parents: Vec<PathBuf>,
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
            parents: Vec::new(),
        })
    }

    /// Makes `<root>/<rel>` exactly (e.g. `ecstasks.slice/ecstasks-<task>.slice/docker-<id>.scope`,
    /// a platform's layout), with the parents that are missing. Each parent made gets the
    /// controllers of its own parent enabled for its children, as systemd does, so the leaf has
    /// cpu.stat and memory.* on a pure v2 host. Fails if the leaf exists already.
    pub fn nested(root: &Path, rel: &str) -> anyhow::Result<Self> {
        let rel = rel.trim_matches('/');
        let mut parents = Vec::new();
        let mut dir = root.to_path_buf();
        let components: Vec<&str> = rel.split('/').collect();
        let made = (|| -> anyhow::Result<()> {
            for parent in &components[..components.len() - 1] {
                let controllers = fs::read_to_string(dir.join("cgroup.subtree_control"))?;
                dir.push(parent);
                if !dir.exists() {
                    fs::create_dir(&dir)?;
                    parents.push(dir.clone());
                    let enable: Vec<String> = controllers
                        .split_whitespace()
                        .map(|c| format!("+{c}"))
                        .collect();
                    if !enable.is_empty() {
                        fs::write(dir.join("cgroup.subtree_control"), enable.join(" "))?;
                    }
                }
            }
            fs::create_dir(root.join(rel))?;
            Ok(())
        })();
        parents.reverse();
        if let Err(e) = made {
            for p in &parents {
                let _ = fs::remove_dir(p);
            }
            return Err(e);
        }
        let path = root.join(rel);
        let id = observer::cgroupfs::cgroup_id(&path)?;
        Ok(Self {
            path,
            rel: format!("/{rel}"),
            id,
            parents,
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
                Ok(()) => return self.remove_parents(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return self.remove_parents(),
                Err(e) if Instant::now() > deadline => return Err(e.into()),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

impl TestCgroup {
    fn remove_parents(&self) -> anyhow::Result<()> {
        for parent in &self.parents {
            match fs::remove_dir(parent) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(anyhow::anyhow!("{}: {e}", parent.display())),
            }
        }
        Ok(())
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        if let Err(e) = self.remove() {
            eprintln!("could not remove cgroup {}: {e}", self.path.display());
        }
    }
}
