//! Running cargo in the workspace and finding what it builds.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::sys;

/// The workspace root: the parent of this crate's directory.
pub fn workspace_root() -> PathBuf {
    let xtask_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    xtask_dir.parent().unwrap_or(xtask_dir).to_path_buf()
}

/// `dir` made absolute against `base` (cargo reads a relative CARGO_TARGET_DIR against its cwd).
pub fn absolute_against(base: &Path, dir: &Path) -> PathBuf {
    if dir.is_absolute() {
        dir.to_path_buf()
    } else {
        base.join(dir)
    }
}

/// CARGO_TARGET_DIR as an absolute path, when set.
fn target_dir_override() -> Option<PathBuf> {
    let dir = std::env::var_os("CARGO_TARGET_DIR").filter(|d| !d.is_empty())?;
    let cwd = std::env::current_dir().unwrap_or_else(|_| workspace_root());
    Some(absolute_against(&cwd, Path::new(&dir)))
}

/// Where cargo puts build output: CARGO_TARGET_DIR, else `<workspace root>/target`.
pub fn target_dir() -> PathBuf {
    target_dir_override().unwrap_or_else(|| workspace_root().join("target"))
}

/// The built `observer` binary for a profile.
pub fn observer_binary(release: bool) -> PathBuf {
    target_dir()
        .join(if release { "release" } else { "debug" })
        .join("observer")
}

/// True once the integration-test package (tests/Cargo.toml) exists.
pub fn has_tests_package() -> bool {
    workspace_root().join("tests").join("Cargo.toml").is_file()
}

/// A cargo command run from the workspace root: the cargo that runs xtask ($CARGO), else `cargo`.
pub fn cargo<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: Into<OsString>,
{
    let program = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = sys::command(program);
    cmd.current_dir(workspace_root())
        .args(args.into_iter().map(Into::into));
    if let Some(dir) = target_dir_override() {
        // Absolute, so that running from the workspace root does not move it.
        cmd.env("CARGO_TARGET_DIR", dir);
    }
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workspace_root_holds_the_workspace_manifest() {
        let manifest = std::fs::read_to_string(workspace_root().join("Cargo.toml")).unwrap();
        assert!(manifest.contains("[workspace]"));
        assert!(manifest.contains("\"xtask\""));
    }

    #[test]
    fn relative_target_dir_is_resolved_against_the_base() {
        assert_eq!(
            absolute_against(Path::new("/w"), Path::new("t")),
            Path::new("/w/t")
        );
        assert_eq!(
            absolute_against(Path::new("/w"), Path::new("/t")),
            Path::new("/t")
        );
    }

    #[test]
    fn cargo_runs_in_the_workspace_root() {
        let cmd = cargo(["build", "--package", "observer"]);
        assert_eq!(cmd.get_current_dir(), Some(workspace_root().as_path()));
        let args: Vec<_> = cmd.get_args().collect();
        assert_eq!(args, ["build", "--package", "observer"]);
    }
}
