//! Builds the kernel programs (observer-ebpf) for bpfel-unknown-none and leaves the object in
//! OUT_DIR, where src/programs.rs embeds it. `cargo xtask build` installs what this needs.

use anyhow::{anyhow, Context as _};

fn main() -> anyhow::Result<()> {
    let ebpf_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("observer has no parent directory")?
        .join("observer-ebpf");
    let on_path = std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|dir| dir.join("bpf-linker").is_file())
    });
    if !on_path {
        return Err(anyhow!(
            "bpf-linker is not on PATH: run `cargo xtask build`, which installs it"
        ));
    }
    // The nested build needs -Z build-std=core. On a stable toolchain that takes RUSTC_BOOTSTRAP,
    // set here so that it reaches only the nested cargo, never the host crates.
    // SAFETY: nothing else runs in this build script yet.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    println!("cargo:rerun-if-env-changed=OBSERVER_EBPF_TOOLCHAIN");
    let toolchain = std::env::var("OBSERVER_EBPF_TOOLCHAIN").unwrap_or_else(|_| "stable".into());
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "observer-ebpf",
            root_dir: ebpf_dir.to_str().context("non-UTF-8 path")?,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&toolchain),
    )
}
