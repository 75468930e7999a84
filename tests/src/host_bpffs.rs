//! The host's /sys/fs/bpf as the deploy manifests mount it into observer's container (the ECS
//! task definition's bpffs volume, the DaemonSet's bpffs hostPath): a bpffs, mounted by the
//! test if it is not one (on some hosts it is a plain sysfs directory), so that observer in the
//! container pins its state in /sys/fs/bpf/observer. When dropped, whatever observer pinned is
//! removed with `observer detach`, and the bpffs is unmounted if the test mounted it, also
//! when the test fails.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{ensure, Context as _};

use crate::sh;

/// Where the manifests mount the host's bpffs, on the host and in the container.
pub const BPFFS: &str = "/sys/fs/bpf";
/// observer's default --bpf-pin-dir, in the container and so on the host.
pub const PIN_DIR: &str = "/sys/fs/bpf/observer";

/// See the module's documentation.
pub struct HostBpffs {
    observer: PathBuf,
    mounted: bool,
    ours: bool,
}

impl HostBpffs {
    /// Mounts a bpffs at [`BPFFS`] unless one is there; fails if something is pinned at
    /// [`PIN_DIR`] already (another observer's state, which is not the test's to take over
    /// or remove). `observer` is the binary that runs `observer detach`.
    pub fn prepare(observer: &Path) -> anyhow::Result<Self> {
        let mut this = Self {
            observer: observer.to_owned(),
            mounted: false,
            ours: false,
        };
        let fs = fs_type(BPFFS);
        if fs != "bpf_fs" {
            sh("mount", &["-t", "bpf", "bpf", BPFFS])
                .with_context(|| format!("mount -t bpf bpf {BPFFS}"))?;
            this.mounted = true;
            eprintln!("mounted a bpffs at {BPFFS} (it was {fs:?})");
        }
        ensure!(
            !Path::new(PIN_DIR).exists(),
            "{PIN_DIR} exists before the test: another observer's state is pinned on this host \
             (`observer detach` removes it)"
        );
        this.ours = true;
        Ok(this)
    }

    /// True when the test mounted the bpffs (and unmounts it when dropped).
    pub fn mounted(&self) -> bool {
        self.mounted
    }

    /// `observer detach --bpf-pin-dir /sys/fs/bpf/observer`; its log.
    pub fn detach(&self) -> anyhow::Result<String> {
        let out = Command::new(&self.observer)
            .args(["detach", "--bpf-pin-dir", PIN_DIR])
            .output()
            .with_context(|| format!("running {}", self.observer.display()))?;
        let log = String::from_utf8_lossy(&out.stderr).into_owned();
        ensure!(out.status.success(), "observer detach failed: {log}");
        Ok(log)
    }
}

impl Drop for HostBpffs {
    fn drop(&mut self) {
        if self.ours && Path::new(PIN_DIR).exists() {
            if let Err(e) = self.detach() {
                eprintln!("cleanup: {e}");
            }
        }
        if self.mounted {
            if let Err(e) = sh("umount", &[BPFFS]) {
                eprintln!("cleanup: {e}");
            }
        }
    }
}

/// What is left of the guard's work after it was dropped: the pins, the bpffs it mounted.
pub fn leftovers(mounted: bool) -> Vec<String> {
    let mut left = Vec::new();
    if Path::new(PIN_DIR).exists() {
        left.push(format!("pinned state {PIN_DIR}"));
    }
    if mounted && fs_type(BPFFS) == "bpf_fs" {
        left.push(format!("the bpffs mounted at {BPFFS}"));
    }
    left
}

/// `stat -f -c %T`: the type of the filesystem `path` is on.
pub fn fs_type(path: &str) -> String {
    sh("stat", &["-f", "-c", "%T", path])
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// The program ids an observer log's "attached" lines name ("attached count_ingress (id 12),
/// count_egress (id 13) at ...").
pub fn program_ids(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("] attached "))
        .flat_map(|l| {
            l.split("(id ")
                .skip(1)
                .filter_map(|s| s.split(')').next().map(str::to_owned))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Each of `ids` is no longer loaded (`bpftool prog show id` fails).
pub fn check_unloaded(ids: &[String]) -> anyhow::Result<()> {
    for id in ids {
        ensure!(
            sh("bpftool", &["prog", "show", "id", id]).is_err(),
            "program {id} is still loaded after observer detach"
        );
    }
    Ok(())
}
