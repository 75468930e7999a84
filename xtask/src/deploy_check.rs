//! `cargo xtask check-deploy`: offline validation of deploy/ (the ECS task definition and
//! CloudFormation template, the Kubernetes manifests) by deploy/check/validate.py, run in a
//! Python venv under the target directory that holds the pinned validators of
//! deploy/check/requirements.txt (botocore, cfn-lint, kubernetes-validate, PyYAML).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context as _, Result};

use crate::cargo;
use crate::sys::{self, say};

/// The pinned validators, relative to the workspace root.
const REQUIREMENTS: &str = "deploy/check/requirements.txt";
/// The script that runs every check, relative to the workspace root.
const VALIDATE: &str = "deploy/check/validate.py";
/// Written into the venv once it holds exactly these requirements.
const STAMP: &str = "observer-requirements.txt";

/// Makes sure the venv holds the pinned validators, then runs every deploy check.
pub fn check_deploy() -> Result<()> {
    let started = Instant::now();
    let root = cargo::workspace_root();
    let venv = cargo::target_dir().join("deploy-venv");
    let python = ensure_venv(&venv, &root.join(REQUIREMENTS))?;
    let mut cmd = sys::command(&python);
    cmd.current_dir(&root).arg(root.join(VALIDATE));
    let result = sys::run(&mut cmd).context("the deploy checks failed (see the FAIL lines above)");
    say!(
        "check-deploy: {} in {:.1}s",
        if result.is_ok() { "passed" } else { "FAILED" },
        started.elapsed().as_secs_f64()
    );
    result
}

/// The venv's interpreter, after (re)installing the requirements if they changed since the
/// venv was last filled. A venv that is already up to date costs nothing.
fn ensure_venv(venv: &Path, requirements: &Path) -> Result<PathBuf> {
    let wanted = std::fs::read_to_string(requirements)
        .with_context(|| format!("cannot read {}", requirements.display()))?;
    let python = venv.join("bin").join("python");
    let stamp = venv.join(STAMP);
    if python.is_file() && std::fs::read_to_string(&stamp).ok().as_deref() == Some(&wanted) {
        return Ok(python);
    }
    if !python.is_file() {
        say!("creating the deploy-check venv at {}", venv.display());
        sys::run(sys::command("python3").args(["-m", "venv"]).arg(venv)).context(
            "cannot create a Python venv: the deploy checks need python3 with its venv module \
             (Debian: apt-get install python3-venv)",
        )?;
    }
    say!("installing the pinned validators of {REQUIREMENTS}");
    let _ = std::fs::remove_file(&stamp);
    sys::run(
        sys::command(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(["--no-input", "--requirement"])
            .arg(requirements),
    )
    .context("cannot install the deploy validators from PyPI")?;
    std::fs::write(&stamp, &wanted).with_context(|| format!("cannot write {}", stamp.display()))?;
    if !python.is_file() {
        bail!("{} is missing after creating the venv", python.display());
    }
    Ok(python)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requirements_pin_every_package() {
        let text = std::fs::read_to_string(cargo::workspace_root().join(REQUIREMENTS)).unwrap();
        let pins: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .collect();
        for wanted in [
            "botocore==",
            "cfn-lint==",
            "kubernetes-validate==",
            "PyYAML==",
        ] {
            assert!(
                pins.iter().any(|p| p.starts_with(wanted)),
                "{wanted} not pinned"
            );
        }
        for pin in pins {
            assert!(pin.contains("=="), "{pin} is not pinned to one version");
        }
    }

    #[test]
    fn the_script_exists() {
        assert!(cargo::workspace_root().join(VALIDATE).is_file());
    }
}
