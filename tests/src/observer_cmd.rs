//! The observer command run as a child process, with its stdout and stderr read line by line.

use std::{
    io::{BufRead, BufReader},
    os::unix::process::CommandExt,
    process::{Child, Command, ExitStatus, Stdio},
    sync::mpsc::{channel, Receiver},
    time::{Duration, Instant},
};

/// How a run ended.
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: Vec<String>,
    pub log: String,
}

/// Numbers the state directories of the observers this process starts.
static STATE_DIRS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

pub struct ObserverCmd {
    child: Child,
    /// The state directory made for it, removed when it is dropped.
    state_dir: Option<std::path::PathBuf>,
    stdout: Receiver<String>,
    stderr: Receiver<String>,
    /// Every stderr line read so far.
    pub log: Vec<String>,
    /// stdout lines [`ObserverCmd::wait_stdout`] read (they are part of what finish returns).
    seen: Vec<String>,
}

impl ObserverCmd {
    pub fn start(binary: &str, args: &[&str]) -> anyhow::Result<Self> {
        Self::start_as(binary, args, None)
    }

    /// Starts it with these environment variables added (e.g. `MACKEREL_APIKEY`).
    pub fn start_with_env(
        binary: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        Self::spawn(binary, args, None, env)
    }

    /// Starts it as `uid` (for the tests of an unprivileged start).
    pub fn start_as(binary: &str, args: &[&str], uid: Option<u32>) -> anyhow::Result<Self> {
        Self::spawn(binary, args, uid, &[])
    }

    fn spawn(
        binary: &str,
        args: &[&str],
        uid: Option<u32>,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let mut cmd = Command::new(binary);
        // Unpinned unless a test asks for pinning: tests run side by side, and each wants its
        // own fresh counters and programs that go when it ends.
        if !env
            .iter()
            .any(|(k, _)| *k == "OBSERVER_BPF_PIN_DIR" || *k == "OBSERVER_NO_PIN")
        {
            cmd.env("OBSERVER_NO_PIN", "true");
        }
        // A state directory of its own, not the host's /var/lib/observer.
        let state_dir = if env.iter().any(|(k, _)| *k == "OBSERVER_STATE_DIR") {
            None
        } else {
            let dir = std::env::temp_dir().join(format!(
                "observer-test-state-{}-{}",
                std::process::id(),
                STATE_DIRS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ));
            cmd.env("OBSERVER_STATE_DIR", &dir);
            Some(dir)
        };
        cmd.envs(env.iter().copied());
        cmd.args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(uid) = uid {
            cmd.uid(uid).gid(uid);
        }
        let mut child = cmd.spawn()?;
        let stdout = lines(child.stdout.take().expect("piped"));
        let stderr = lines(child.stderr.take().expect("piped"));
        Ok(Self {
            child,
            state_dir,
            stdout,
            stderr,
            log: Vec::new(),
            seen: Vec::new(),
        })
    }

    /// Waits for a stderr line containing `needle`; returns it.
    pub fn wait_log(&mut self, needle: &str, timeout: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(line) => {
                    self.log.push(line.clone());
                    if line.contains(needle) {
                        return Ok(line);
                    }
                }
                Err(_) => anyhow::bail!(
                    "no log line with {needle:?} within {timeout:?}; log so far:\n{}",
                    self.log.join("\n")
                ),
            }
        }
    }

    /// Waits for a stdout line containing `needle`; returns it.
    pub fn wait_stdout(&mut self, needle: &str, timeout: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stdout.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return Ok(line);
                    }
                }
                Err(_) => anyhow::bail!("no stdout line with {needle:?} within {timeout:?}"),
            }
        }
    }

    /// Every stdout line printed since the last call, without waiting (a test that reads a
    /// long run as it goes). These lines are not kept for [`ObserverCmd::finish`]. The log
    /// read meanwhile is added to [`ObserverCmd::log`].
    pub fn take_stdout(&mut self) -> Vec<String> {
        self.log.extend(self.stderr.try_iter());
        self.stdout.try_iter().collect()
    }

    /// Every stdout line so far (without waiting): those [`ObserverCmd::wait_stdout`] read
    /// and those that have arrived since.
    pub fn stdout_so_far(&mut self) -> &[String] {
        self.seen.extend(self.stdout.try_iter());
        &self.seen
    }

    /// Every stderr line so far (without waiting).
    pub fn log_so_far(&mut self) -> &[String] {
        self.log.extend(self.stderr.try_iter());
        &self.log
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    /// Waits for exit; returns the status, everything printed on stdout and the whole log.
    pub fn finish(mut self, timeout: Duration) -> anyhow::Result<Finished> {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                anyhow::bail!("observer still running after {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        // The reader threads end at EOF, which follows exit.
        let mut stdout = std::mem::take(&mut self.seen);
        stdout.extend(self.stdout.iter());
        self.log.extend(self.stderr.iter());
        Ok(Finished {
            status,
            stdout,
            log: self.log.join("\n"),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

fn lines(pipe: impl std::io::Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

impl Drop for ObserverCmd {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if let Some(dir) = &self.state_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
