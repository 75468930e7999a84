//! Starting processes: the PATH every child gets, running commands, who we are.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use anyhow::{bail, Context as _, Result};

/// Prints one progress line, prefixed so that it stands out among cargo's output.
macro_rules! say {
    ($($arg:tt)*) => { println!("xtask: {}", format_args!($($arg)*)) };
}
pub(crate) use say;

/// `$CARGO_HOME/bin`, or `~/.cargo/bin`: where rustup and `cargo install` put programs.
pub fn cargo_bin_dir() -> Option<PathBuf> {
    if let Some(home) = std::env::var_os("CARGO_HOME").filter(|h| !h.is_empty()) {
        return Some(PathBuf::from(home).join("bin"));
    }
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|home| PathBuf::from(home).join(".cargo").join("bin"))
}

/// `current` with `dir` appended, unless `dir` is already one of its entries.
pub fn path_with(current: Option<&OsStr>, dir: &Path) -> OsString {
    let mut dirs: Vec<PathBuf> = current
        .map(|p| std::env::split_paths(p).collect())
        .unwrap_or_default();
    if !dirs.iter().any(|d| d == dir) {
        dirs.push(dir.to_path_buf());
    }
    // join_paths fails only on a directory containing ':'; then leave PATH as it was.
    std::env::join_paths(dirs)
        .unwrap_or_else(|_| current.map(OsStr::to_os_string).unwrap_or_default())
}

/// The PATH for every child process: ours, plus the cargo bin directory (bpf-linker lives there).
pub fn child_path() -> &'static OsString {
    static PATH: OnceLock<OsString> = OnceLock::new();
    PATH.get_or_init(|| {
        let current = std::env::var_os("PATH");
        match cargo_bin_dir() {
            Some(dir) => path_with(current.as_deref(), &dir),
            None => current.unwrap_or_default(),
        }
    })
}

/// A command for `program`, looked up in and given [`child_path`].
pub fn command(program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new(program);
    cmd.env("PATH", child_path());
    cmd
}

/// The command line, for messages.
pub fn describe(cmd: &Command) -> String {
    let mut parts = vec![cmd.get_program().to_string_lossy().into_owned()];
    parts.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    parts.join(" ")
}

/// Runs `cmd` with inherited stdio and fails unless it exits 0.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot start `{}`", describe(cmd)))?;
    if !status.success() {
        bail!("`{}` failed ({status})", describe(cmd));
    }
    Ok(())
}

/// Runs `cmd` silently; true iff it started and exited 0.
pub fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs `cmd` and returns its stdout if it exits 0, None if it cannot start or fails.
pub fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The effective uid, from the `Uid:` line of a /proc/PID/status file.
pub fn parse_euid(status: &str) -> Option<u32> {
    let line = status.lines().find_map(|l| l.strip_prefix("Uid:"))?;
    // Fields: real, effective, saved set, filesystem.
    line.split_whitespace().nth(1)?.parse().ok()
}

/// True iff this process runs with effective uid 0.
pub fn is_root() -> Result<bool> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("cannot read /proc/self/status")?;
    let euid = parse_euid(&status).context("no Uid line in /proc/self/status")?;
    Ok(euid == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn euid_is_the_second_uid_field() {
        let status = "Name:\tcat\nUmask:\t0022\nState:\tR (running)\nUid:\t1000\t0\t0\t0\nGid:\t1000\t1000\t1000\t1000\n";
        assert_eq!(parse_euid(status), Some(0));
        assert_eq!(parse_euid("Uid:\t0\t0\t0\t0\n"), Some(0));
        assert_eq!(parse_euid("Uid:\t1000\t1000\t1000\t1000"), Some(1000));
    }

    #[test]
    fn euid_missing_or_garbled() {
        assert_eq!(parse_euid("Name:\tcat\n"), None);
        assert_eq!(parse_euid("Uid:\t1000\n"), None);
        assert_eq!(parse_euid("Uid:\tx\ty\n"), None);
    }

    #[test]
    fn path_gets_the_directory_appended_once() {
        let dir = Path::new("/root/.cargo/bin");
        assert_eq!(
            path_with(Some(OsStr::new("/usr/bin:/bin")), dir),
            "/usr/bin:/bin:/root/.cargo/bin"
        );
        assert_eq!(
            path_with(Some(OsStr::new("/root/.cargo/bin:/usr/bin")), dir),
            "/root/.cargo/bin:/usr/bin"
        );
        assert_eq!(
            path_with(Some(OsStr::new("/usr/bin:/root/.cargo/bin")), dir),
            "/usr/bin:/root/.cargo/bin"
        );
        assert_eq!(path_with(None, dir), "/root/.cargo/bin");
    }

    #[test]
    fn describe_shows_program_and_arguments() {
        let mut cmd = Command::new("apt-get");
        cmd.args(["install", "-y", "bpftool"]);
        assert_eq!(describe(&cmd), "apt-get install -y bpftool");
    }
}
