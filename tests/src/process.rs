//! Processes started inside a test cgroup (and optionally a test netns) before they run a
//! single instruction of their own, so every socket they make belongs to that cgroup.

use std::{
    fs::OpenOptions,
    io::{BufRead, BufReader, Lines},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::Path,
    process::{Child, ChildStdout, Command, Stdio},
    time::Duration,
};

use crate::{NetNs, TestCgroup};

/// Where a process runs.
pub struct Where<'a> {
    pub cgroup: &'a TestCgroup,
    pub netns: Option<&'a NetNs>,
}

/// A running process that is killed when dropped; its stdout is read line by line.
pub struct Spawned {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Spawned {
    /// Starts `program args` in `at`. Membership is set between fork and exec: write "0" to
    /// cgroup.procs (moves the caller), then setns into the namespace. `ip netns exec` is not
    /// used because it remounts /sys and hides cgroupfs.
    pub fn start(program: &Path, args: &[&str], at: Where<'_>) -> anyhow::Result<Self> {
        let netns = at.netns.map(NetNs::open).transpose()?;
        Self::start_joining(program, args, at.cgroup.path(), netns)
    }

    /// Starts `program args` in the v2 cgroup directory `cgroup` and the network namespace
    /// `netns` (an open namespace file), e.g. a real container's (`/proc/<pid>/ns/net`).
    pub fn start_joining(
        program: &Path,
        args: &[&str],
        cgroup: &Path,
        netns: Option<std::fs::File>,
    ) -> anyhow::Result<Self> {
        let procs = OpenOptions::new()
            .write(true)
            .open(cgroup.join("cgroup.procs"))?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let procs_fd = procs.as_raw_fd();
        let netns_fd = netns.as_ref().map(|f| f.as_raw_fd());
        // SAFETY: only async-signal-safe syscalls (write, setns) run in the child before exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(fd) = netns_fd {
                    if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn()?;
        let stdout = child.stdout.take().expect("piped stdout");
        Ok(Self {
            child,
            lines: BufReader::new(stdout).lines(),
        })
    }

    /// The next line of stdout, or an error if the process closed it.
    pub fn line(&mut self) -> anyhow::Result<String> {
        match self.lines.next() {
            Some(line) => Ok(line?),
            None => anyhow::bail!("process ended without printing the expected line"),
        }
    }

    /// Reads stdout up to a line starting with `prefix`; returns the rest of that line.
    pub fn expect(&mut self, prefix: &str) -> anyhow::Result<String> {
        loop {
            let line = self.line()?;
            if let Some(rest) = line.strip_prefix(prefix) {
                return Ok(rest.trim().to_owned());
            }
        }
    }

    /// Waits for a clean exit, within `timeout`.
    pub fn wait(mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                anyhow::ensure!(status.success(), "process exited with {status}");
                return Ok(());
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "process still running after {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
