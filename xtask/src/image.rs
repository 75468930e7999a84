//! `cargo xtask image`: observer's container image, built from local files into the local Docker
//! engine (no registry is needed), tagged with the reference the deploy manifests use.
//!
//! The binary is linked statically (glibc with `crt-static`: its resolver for files and DNS is
//! built in since glibc 2.34), so the image is that one file on `scratch`. The runtime stage is
//! read from deploy/image/Dockerfile, so operators building with the Dockerfile get the same
//! image.

use std::path::PathBuf;

use anyhow::{bail, Context as _, Result};

use crate::sys::say;
use crate::{cargo, sys};

/// The reference every manifest in deploy/ uses; `registry.example.com` is the operator's to
/// replace when pushing to a real registry.
pub const IMAGE: &str = concat!(
    "registry.example.com/observer/observer:",
    env!("CARGO_PKG_VERSION")
);
/// The target triple the static binary is built for.
const TARGET: &str = "x86_64-unknown-linux-gnu";
/// The Dockerfile whose runtime stage is built here.
const DOCKERFILE: &str = "deploy/image/Dockerfile";
/// Where the static binary is left, relative to the target directory (the Dockerfile copies it
/// from there).
const BINARY_IN_TARGET: &str = "image/observer";

/// Builds the static observer and leaves it at `<target>/image/observer`; returns that path.
pub fn static_binary() -> Result<PathBuf> {
    crate::setup::setup(false)?;
    // RUSTFLAGS for the target only: build scripts and proc macros stay dynamic, and the nested
    // eBPF build (bpfel-unknown-none) is not touched.
    let flags_var = format!(
        "CARGO_TARGET_{}_RUSTFLAGS",
        TARGET.to_uppercase().replace('-', "_")
    );
    sys::run(
        cargo::cargo([
            "build",
            "--release",
            "--package",
            "observer",
            "--bin",
            "observer",
            "--target",
            TARGET,
        ])
        .env(flags_var, "-C target-feature=+crt-static"),
    )
    .context("building the static observer")?;
    let built = cargo::target_dir()
        .join(TARGET)
        .join("release")
        .join("observer");
    let out = cargo::target_dir().join(BINARY_IN_TARGET);
    std::fs::create_dir_all(out.parent().expect("has a parent"))?;
    std::fs::copy(&built, &out)
        .with_context(|| format!("copying {} to {}", built.display(), out.display()))?;
    let ldd = sys::output(sys::command("ldd").arg(&out)).unwrap_or_default();
    let is_static = ldd.contains("not a dynamic executable") || ldd.contains("statically linked");
    if !is_static && !ldd.is_empty() {
        bail!("{} is not static; ldd says:\n{ldd}", out.display());
    }
    say!(
        "static observer: {} ({})",
        out.display(),
        human_size(std::fs::metadata(&out)?.len())
    );
    Ok(out)
}

/// The runtime stage of `dockerfile`: from its last `FROM` line on, with `COPY --from=<stage>
/// <src> <dst>` turned into `COPY <file> <dst>` of a local file.
pub fn runtime_stage(dockerfile: &str, local_file: &str) -> Result<String> {
    let lines: Vec<&str> = dockerfile.lines().collect();
    let start = lines
        .iter()
        .rposition(|l| l.trim_start().to_ascii_uppercase().starts_with("FROM "))
        .context("the Dockerfile has no FROM line")?;
    let mut out = String::new();
    let mut copies = 0;
    for line in &lines[start..] {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["COPY", from, _src, dst] if from.starts_with("--from=") => {
                copies += 1;
                out.push_str(&format!("COPY {local_file} {dst}\n"));
            }
            _ => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    if copies != 1 {
        bail!("the runtime stage should copy exactly one file from the build stage, it copies {copies}");
    }
    Ok(out)
}

/// `cargo xtask image`: the static binary, then the runtime stage built and tagged [`IMAGE`].
pub fn image(binary_only: bool) -> Result<()> {
    let binary = static_binary()?;
    if binary_only {
        return Ok(());
    }
    crate::setup::docker_engine().context("the image is built into the local Docker engine")?;
    let dockerfile_path = cargo::workspace_root().join(DOCKERFILE);
    let dockerfile = std::fs::read_to_string(&dockerfile_path)
        .with_context(|| format!("reading {}", dockerfile_path.display()))?;
    let context = cargo::target_dir().join("image-context");
    let _ = std::fs::remove_dir_all(&context);
    std::fs::create_dir_all(&context)?;
    std::fs::copy(&binary, context.join("observer"))?;
    std::fs::write(
        context.join("Dockerfile"),
        runtime_stage(&dockerfile, "observer")?,
    )?;
    sys::run(
        sys::command("docker")
            .args(["build", "--quiet", "--tag", IMAGE])
            .arg(&context),
    )
    .context("docker build of the runtime stage")?;
    let size = sys::output(sys::command("docker").args([
        "image",
        "inspect",
        "--format",
        "{{.Size}}",
        IMAGE,
    ]))
    .and_then(|s| s.trim().parse::<u64>().ok())
    .context("docker image inspect")?;
    say!("image {IMAGE}: {} ({size} bytes)", human_size(size));
    Ok(())
}

fn human_size(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_runtime_stage_is_taken_from_the_dockerfile() {
        let dockerfile = std::fs::read_to_string(cargo::workspace_root().join(DOCKERFILE)).unwrap();
        let stage = runtime_stage(&dockerfile, "observer").unwrap();
        assert!(stage.starts_with("FROM scratch"), "{stage}");
        assert!(stage.contains("COPY observer /observer\n"), "{stage}");
        assert!(stage.contains(r#"ENTRYPOINT ["/observer"]"#), "{stage}");
        assert!(!stage.contains("--from="), "{stage}");
        assert!(
            !stage.contains("cargo"),
            "the build stage leaked in: {stage}"
        );
    }

    #[test]
    fn a_runtime_stage_must_copy_one_file() {
        assert!(runtime_stage("FROM scratch\nENTRYPOINT [\"/x\"]\n", "x").is_err());
        assert!(runtime_stage("no from here\n", "x").is_err());
    }

    #[test]
    fn the_image_follows_the_version() {
        assert!(IMAGE.ends_with(concat!(":", env!("CARGO_PKG_VERSION"))));
    }
}
